//! The DeviceActor: one per resource's volume. A thin shell around the resource's
//! [`ResourceCore`]: it feeds the core every input (application requests, peer messages, I/O
//! and metadata completions, timer ticks, administrator commands) and carries out the effects
//! the core returns: local I/O (io_uring, see [`crate::uring`], or a bounded blocking pool for
//! what the ring does not take), replies to the application, messages
//! to the peers' links, metadata saves, and handing postponed requests to the [`RetryActor`].
//! It keeps no protocol state of its own, only the payloads and reply paths the core refers to.

use std::collections::{BTreeMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use actix::prelude::*;
use tokio::sync::{broadcast, oneshot, OwnedSemaphorePermit, Semaphore};

use crate::buffer::{pooled_capacity, BufferPool, PooledBuf};
use crate::core::activity_log::ActivityLogStats;
use crate::core::messages::{Epoch, PeerMessage, StreamKind};
use crate::core::replication::{Outgoing, PeerId};
use crate::core::resource::{
    Command, CommandError, CommandId, CoreConfig, DigestPurpose, Effect, Input, LinkStatus,
    PeerWrite, ResourceCore, SyncConfig, Timing,
};
use crate::core::{
    DeviceStats, DiskState, IoFault, ReplicationProtocol, RequestId, Role, Tick, BLOCK_SIZE,
};
use crate::meta::{BitmapUpdate, DeviceMeta, StoredBitmaps};
use crate::metadata::{MetaActor, SaveBitmaps, SaveMeta};
use crate::ports::BlockStore;
use crate::retry::{PostponedIo, Resubmit, RetryActor, RetryPostponed};
use crate::uring::{UringBuf, UringDone, UringEngine};

/// How many local I/O operations of one volume run at once on the blocking pool (requests the
/// ring does not take).
pub const LOCAL_IO_SLOTS: usize = 32;
/// Bytes a sync source reads for its peers and has not yet seen the transport through, at most
/// (in KiB permits): a peer asks for blocks faster than they leave, reads wait for room.
pub const RESYNC_READ_BUDGET_KIB: usize = 32 << 10;

pub use crate::io::{IoDone, IoOp, IoReply, SharedBuf};

/// Submits an application request.
#[derive(Message)]
#[rtype(result = "()")]
pub struct SubmitIo {
    pub op: IoOp,
    pub reply: IoReply,
    /// When the application issued it; kept across re-submissions.
    pub issued: Instant,
}

/// What status needs, readable without going through the actor's mailbox.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceSnapshot {
    pub stats: DeviceStats,
    pub app_in_flight: u64,
    pub held: u64,
    pub suspended: bool,
    pub writable: bool,
    pub role: Role,
    pub disk: DiskState,
    pub current_uuid: u64,
    pub bitmap_uuids: BTreeMap<u8, u64>,
    pub history_uuids: Vec<u64>,
    pub changing: bool,
    pub down: bool,
    pub peers: Vec<LinkStatus>,
    /// The core's time when this snapshot was taken (for rates and ages).
    pub now: Tick,
    pub activity_log: ActivityLogStats,
}

impl Default for DeviceSnapshot {
    fn default() -> Self {
        DeviceSnapshot {
            stats: DeviceStats::default(),
            app_in_flight: 0,
            held: 0,
            suspended: false,
            writable: false,
            role: Role::Secondary,
            disk: DiskState::DUnknown,
            current_uuid: 0,
            bitmap_uuids: BTreeMap::new(),
            history_uuids: Vec::new(),
            changing: false,
            down: false,
            peers: Vec::new(),
            now: 0,
            activity_log: ActivityLogStats::default(),
        }
    }
}

/// What the device asks a peer's link to do.
pub enum PeerOutbound {
    /// A replicated write, with the application's bytes (shared, not copied).
    Data {
        seq: u64,
        epoch: Epoch,
        request: RequestId,
        offset: u64,
        seen: u64,
        data: SharedBuf,
    },
    /// Blocks read for a sync target, sent as `ResyncData` only on connection `conn` (a newer
    /// connection's resync asks again).
    ResyncData {
        conn: u64,
        offset: u64,
        data: ResyncPayload,
    },
    /// Any other message (the link picks the stream by [`PeerMessage::stream`]).
    Message(PeerMessage),
    /// Open a connection to the peer.
    Dial,
    /// Close connection `conn` after sending what is queued.
    Close { conn: u64, reason: String },
}

/// Blocks a sync source read for a peer, in an aligned buffer, with the share of the device's
/// resync read budget they hold until the transport is done with them (a large payload goes
/// to quinn as a chunk of its own, without a copy, and lives until the peer acknowledged it).
pub struct ResyncPayload {
    /// Declared before the budget so that the buffer is back in its pool first.
    data: PooledBuf,
    _budget: OwnedSemaphorePermit,
}

impl ResyncPayload {
    pub fn new(data: PooledBuf, budget: OwnedSemaphorePermit) -> Self {
        ResyncPayload {
            data,
            _budget: budget,
        }
    }
}

impl AsRef<[u8]> for ResyncPayload {
    fn as_ref(&self) -> &[u8] {
        &self.data
    }
}

/// Delivered to a peer's link actor: everything one wake-up of the device has for it, in order.
#[derive(Message)]
#[rtype(result = "()")]
pub struct ToPeer(pub Vec<PeerOutbound>);

/// What a peer's link reports.
pub enum LinkEvent {
    TransportUp {
        conn: u64,
    },
    TransportDown {
        conn: u64,
        reason: String,
    },
    DialFailed {
        reason: String,
    },
    Message {
        conn: u64,
        message: PeerMessage,
        /// A share of the link's receive budget, held until the write is applied here: a
        /// slow local disk then stops the link reading, and QUIC flow control throttles the
        /// sender.
        budget: Option<OwnedSemaphorePermit>,
    },
    /// A replicated write as received: its payload in a 4 KiB-aligned buffer from the link's
    /// receive pool, so the local store can write it as is (O_DIRECT, no bounce copy).
    Data {
        conn: u64,
        seq: u64,
        epoch: Epoch,
        request: RequestId,
        offset: u64,
        seen: u64,
        data: PooledBuf,
        /// As for [`LinkEvent::Message`]; it covers the buffer's whole capacity.
        budget: Option<OwnedSemaphorePermit>,
    },
    /// A sync source's blocks as received on the resync stream, in a 4 KiB-aligned buffer from
    /// the link's receive pool, like [`LinkEvent::Data`].
    ResyncData {
        conn: u64,
        offset: u64,
        data: PooledBuf,
        /// As for [`LinkEvent::Message`]; it covers the buffer's whole capacity.
        budget: Option<OwnedSemaphorePermit>,
    },
    /// A protocol-A write was handed to the transport.
    Sent {
        request: RequestId,
    },
}

/// A report from the link of `peer`.
#[derive(Message)]
#[rtype(result = "()")]
pub struct FromPeer {
    pub peer: PeerId,
    pub event: LinkEvent,
}

/// Everything the link of `peer` had to report at one wake-up (the frames of one stream read,
/// the writes of one stream write), handled in order and followed by one round of effects.
#[derive(Message)]
#[rtype(result = "()")]
pub struct FromPeerBatch {
    pub peer: PeerId,
    pub events: Vec<LinkEvent>,
}

/// Registers the link actor of a peer.
#[derive(Message)]
#[rtype(result = "()")]
pub struct AttachLink {
    pub peer: PeerId,
    pub link: Recipient<ToPeer>,
}

/// A received write waiting to be applied.
struct Payload {
    /// Aligned for O_DIRECT; `None` for a discard. Declared before the budget so that the
    /// buffer is back in its pool before the budget it counted against is released.
    data: Option<PooledBuf>,
    _budget: Option<OwnedSemaphorePermit>,
}

/// Shared, always-current view of a device for status readers.
pub type SharedSnapshot = Arc<Mutex<DeviceSnapshot>>;

/// How often the core's timers are driven.
pub const TICK_INTERVAL: Duration = Duration::from_millis(100);

/// Everything a device needs besides its store.
pub struct DeviceSetup {
    pub config: CoreConfig,
    pub meta: DeviceMeta,
    /// The out-of-sync bitmaps and activity log found in the metadata store at `up`.
    pub bitmaps: StoredBitmaps,
    /// Where metadata is made durable; None keeps it in memory (tests of the pipeline alone).
    pub meta_actor: Option<Addr<MetaActor>>,
    pub events: Option<broadcast::Sender<String>>,
}

pub struct DeviceActor {
    name: String,
    /// This device's queue in the retry actor.
    retry_key: u64,
    core: ResourceCore,
    store: Arc<dyn BlockStore>,
    pending: BTreeMap<RequestId, PendingIo>,
    next_request: RequestId,
    local_slots: Arc<Semaphore>,
    snapshot: SharedSnapshot,
    clock_origin: Instant,
    links: BTreeMap<PeerId, Recipient<ToPeer>>,
    /// What the effects being carried out have for each link, sent as one message per link.
    outbox: BTreeMap<PeerId, Vec<PeerOutbound>>,
    payloads: BTreeMap<(PeerId, u64, u64), Payload>,
    /// Received resync blocks waiting to be written, by (peer, conn, offset).
    resync_payloads: BTreeMap<(PeerId, u64, u64), Payload>,
    /// Bounds the blocks read for sync targets and not yet through the transport
    /// ([`RESYNC_READ_BUDGET_KIB`]), and the pool of aligned buffers they are read into.
    resync_reads: Arc<Semaphore>,
    resync_pool: BufferPool,
    meta_actor: Option<Addr<MetaActor>>,
    commands: BTreeMap<CommandId, oneshot::Sender<Result<String, CommandError>>>,
    next_command: CommandId,
    events: Option<broadcast::Sender<String>>,
    /// Inputs produced while carrying out effects (in-memory metadata), fed next.
    follow_ups: VecDeque<Input>,
    /// Peers whose dial the core asked for before their link was attached.
    dial_on_attach: std::collections::BTreeSet<PeerId>,
    /// Local I/O through io_uring, when the store offers a descriptor for it.
    uring: Option<UringEngine>,
    /// What each operation in the ring completes, by token.
    uring_targets: BTreeMap<u64, IoTarget>,
    next_uring_token: u64,
    /// A submit of the ring's queued entries is scheduled for the end of this wake-up.
    uring_submit_scheduled: bool,
    /// Scratch for reaped completions, kept to spare an allocation per wake-up.
    reaped: Vec<UringDone>,
    /// Tests: told of every resync completion reported to the core.
    #[cfg(test)]
    resync_observer: Option<tokio::sync::mpsc::UnboundedSender<Input>>,
}

/// What a local operation completes, whichever way (ring or blocking pool) it ran.
enum IoTarget {
    Local {
        id: RequestId,
        offset: u64,
    },
    PeerWrite {
        peer: PeerId,
        conn: u64,
        seq: u64,
        /// Held until the write is on disk, see [`LinkEvent::Message`].
        _budget: Option<OwnedSemaphorePermit>,
    },
    /// Sync source: blocks read for `peer` (the buffer comes back as an [`IoOp::Read`]).
    ResyncRead {
        peer: PeerId,
        conn: u64,
        offset: u64,
        len: u64,
        budget: OwnedSemaphorePermit,
    },
    /// Sync target: a resync write.
    ResyncWrite {
        peer: PeerId,
        conn: u64,
        offset: u64,
        len: u64,
        /// Held until the write is on disk, see [`LinkEvent::Message`].
        _budget: Option<OwnedSemaphorePermit>,
    },
    Flush(Box<dyn FnOnce(Result<(), i32>) -> Input>),
}

struct PendingIo {
    /// None while the op is at the local store.
    op: Option<IoOp>,
    reply: IoReply,
    issued: Instant,
}

impl DeviceActor {
    pub fn with_setup(store: Arc<dyn BlockStore>, setup: DeviceSetup) -> Self {
        let clock_origin = Instant::now();
        let name = setup.config.resource.clone();
        let core = ResourceCore::restore(setup.config, setup.meta, setup.bitmaps, 0);
        DeviceActor {
            name,
            retry_key: crate::retry::next_device_key(),
            core,
            store,
            pending: BTreeMap::new(),
            next_request: 1,
            local_slots: Arc::new(Semaphore::new(LOCAL_IO_SLOTS)),
            snapshot: Arc::new(Mutex::new(DeviceSnapshot::default())),
            clock_origin,
            links: BTreeMap::new(),
            outbox: BTreeMap::new(),
            payloads: BTreeMap::new(),
            resync_payloads: BTreeMap::new(),
            resync_reads: Arc::new(Semaphore::new(RESYNC_READ_BUDGET_KIB)),
            // Every buffer is taken under permits for its whole capacity, so the permits are
            // what bounds it; the pool's own budget is slack, so taking one never fails.
            resync_pool: BufferPool::new(2 * (RESYNC_READ_BUDGET_KIB << 10)),
            meta_actor: setup.meta_actor,
            commands: BTreeMap::new(),
            next_command: 1,
            events: setup.events,
            follow_ups: VecDeque::new(),
            dial_on_attach: Default::default(),
            uring: None,
            uring_targets: BTreeMap::new(),
            next_uring_token: 1,
            uring_submit_scheduled: false,
            reaped: Vec::new(),
            #[cfg(test)]
            resync_observer: None,
        }
    }

    /// A device of its own, without peers and with in-memory metadata: the pipeline alone.
    /// `writable` promotes it at once.
    pub fn new(name: &str, store: Arc<dyn BlockStore>, writable: bool) -> Self {
        let size = store.size();
        let config = CoreConfig {
            resource: name.to_owned(),
            node_id: 0,
            node_name: "local".into(),
            size_bytes: size,
            protocol: ReplicationProtocol::C,
            disk_flushes: true,
            peers: Vec::new(),
            timing: Timing::default(),
            seed: 1,
            sync: SyncConfig::default(),
            allow_two_primaries: false,
        };
        let meta = DeviceMeta::new(name, 0, size, crate::core::generation::JUST_CREATED_UUID);
        let mut actor = DeviceActor::with_setup(
            store,
            DeviceSetup {
                config,
                meta,
                bitmaps: StoredBitmaps::default(),
                meta_actor: None,
                events: None,
            },
        );
        // What the core asks for at construction (marking the metadata in use) needs no
        // context: the metadata is in memory.
        actor.run_effects(None);
        if writable {
            actor.feed(
                Input::Command {
                    id: 0,
                    command: Command::Promote { force: true },
                },
                None,
            );
        }
        actor
    }

    pub fn snapshot_handle(&self) -> SharedSnapshot {
        self.snapshot.clone()
    }

    fn now(&self) -> Tick {
        self.tick(Instant::now())
    }

    fn tick(&self, at: Instant) -> Tick {
        u64::try_from(at.saturating_duration_since(self.clock_origin).as_nanos())
            .unwrap_or(u64::MAX)
    }

    /// Feeds one input to the core and carries out everything it asks for.
    fn feed(&mut self, input: Input, ctx: Option<&mut Context<Self>>) {
        let now = self.now();
        self.core.handle(now, input);
        self.run_effects(ctx);
    }

    /// Carries out the core's effects, and feeds back what they produce at once (in-memory
    /// metadata), until nothing is left.
    fn run_effects(&mut self, mut ctx: Option<&mut Context<Self>>) {
        loop {
            while let Some(effect) = self.core.poll_effect() {
                self.carry_out(effect, ctx.as_deref_mut());
            }
            let Some(next) = self.follow_ups.pop_front() else {
                break;
            };
            let now = self.now();
            self.core.handle(now, next);
        }
        self.flush_outbox();
        self.publish();
    }

    fn submit(&mut self, op: IoOp, reply: IoReply, issued: Instant, ctx: &mut Context<Self>) {
        let (kind, range) = op.kind_and_range();
        let id = self.next_request;
        self.next_request += 1;
        self.pending.insert(
            id,
            PendingIo {
                op: Some(op),
                reply,
                issued,
            },
        );
        let start = self.tick(issued);
        self.feed(
            Input::Submit {
                id,
                kind,
                range,
                start,
            },
            Some(ctx),
        );
    }

    fn carry_out(&mut self, effect: Effect, ctx: Option<&mut Context<Self>>) {
        match effect {
            Effect::StartLocal(id) => {
                if let Some(ctx) = ctx {
                    self.start_local(id, ctx)
                }
            }
            Effect::Complete(id, result) => self.complete(id, result),
            Effect::Postponed(id) => {
                if let Some(ctx) = ctx {
                    self.hand_to_retry(id, ctx)
                }
            }
            Effect::SendData { peer, outgoing } => self.send_data(peer, outgoing),
            Effect::Send { peer, message } => {
                self.queue_for_link(peer, PeerOutbound::Message(message))
            }
            Effect::ApplyPeerWrite { peer, conn, write } => {
                if let Some(ctx) = ctx {
                    self.apply_peer_write(peer, conn, write, ctx)
                }
            }
            Effect::ForgetPayload { peer, conn, seq } => {
                self.payloads.remove(&(peer, conn, seq));
            }
            Effect::FlushForPeer { peer, conn, epoch } => {
                if let Some(ctx) = ctx {
                    self.flush_then(ctx, move |_| Input::PeerFlushed { peer, conn, epoch });
                }
            }
            Effect::FlushLocal { token } => {
                if let Some(ctx) = ctx {
                    self.flush_then(ctx, move |result| Input::LocalFlushed {
                        token,
                        result: result.map_err(IoFault::LocalIo),
                    });
                }
            }
            Effect::Persist { version, meta } => self.persist(version, meta, ctx),
            Effect::SendResyncData {
                peer,
                conn,
                offset,
                len,
            } => match ctx {
                Some(ctx) => self.send_resync_data(peer, conn, offset, len, ctx),
                // Only the effects of the core's construction run without a context.
                None => self.report_resync(Input::ResyncSent {
                    peer,
                    conn,
                    offset,
                    len,
                    result: Err(EIO),
                }),
            },
            Effect::ApplyResyncWrite {
                peer,
                conn,
                offset,
                len,
            } => match ctx {
                Some(ctx) => self.apply_resync_write(peer, conn, offset, len, ctx),
                None => {
                    self.resync_payloads.remove(&(peer, conn, offset));
                    self.report_resync(Input::ResyncWriteDone {
                        peer,
                        conn,
                        offset,
                        len,
                        result: Err(EIO),
                    });
                }
            },
            Effect::PersistBitmaps { version, update } => {
                self.persist_bitmaps(version, update, ctx)
            }
            Effect::Digest {
                peer,
                conn,
                offset,
                len,
                purpose,
            } => match ctx {
                Some(ctx) => self.digest(peer, conn, offset, len, purpose, ctx),
                None => self.follow_ups.push_back(Input::Digested {
                    peer,
                    conn,
                    offset,
                    len,
                    purpose,
                    result: Err(EIO),
                }),
            },
            Effect::Dial { peer } => {
                if self.links.contains_key(&peer) {
                    self.queue_for_link(peer, PeerOutbound::Dial);
                } else {
                    // The link starts right after the device; it dials once attached.
                    self.dial_on_attach.insert(peer);
                }
            }
            Effect::CloseConnection { peer, conn, reason } => {
                self.payloads
                    .retain(|(p, c, _), _| !(*p == peer && *c == conn));
                self.resync_payloads
                    .retain(|(p, c, _), _| !(*p == peer && *c == conn));
                self.queue_for_link(peer, PeerOutbound::Close { conn, reason });
            }
            Effect::CommandDone { id, result } => {
                if let Some(reply) = self.commands.remove(&id) {
                    // The asker may have given up; the outcome is in the log and status.
                    let _ = reply.send(result);
                }
            }
            Effect::Event(line) => {
                tracing::debug!(device = %self.name, event = %line);
                if let Some(events) = &self.events {
                    // No subscriber is not an error.
                    let _ = events.send(line);
                }
            }
        }
    }

    /// Queues `outbound` for the peer's link until the effects of this wake-up are carried
    /// out ([`Self::flush_outbox`]).
    fn queue_for_link(&mut self, peer: PeerId, outbound: PeerOutbound) {
        if self.links.contains_key(&peer) {
            queue_outbound(self.outbox.entry(peer).or_default(), outbound);
        }
    }

    /// Hands every link what was queued for it, as one message per link.
    fn flush_outbox(&mut self) {
        for (peer, outbound) in std::mem::take(&mut self.outbox) {
            if let Some(link) = self.links.get(&peer) {
                link.do_send(ToPeer(outbound));
            }
        }
    }

    fn persist(&mut self, version: u64, meta: DeviceMeta, ctx: Option<&mut Context<Self>>) {
        let (Some(meta_actor), Some(ctx)) = (self.meta_actor.clone(), ctx) else {
            self.follow_ups.push_back(Input::Persisted {
                version,
                result: Ok(()),
            });
            return;
        };
        let save = async move { save_outcome(meta_actor.send(SaveMeta(meta)).await) };
        ctx.spawn(save.into_actor(self).map(move |result, actor, ctx| {
            actor.feed(Input::Persisted { version, result }, Some(ctx));
        }));
    }

    /// Hands one bitmap transaction to the metadata actor and reports
    /// [`Input::BitmapsPersisted`] once it is durable.
    fn persist_bitmaps(
        &mut self,
        version: u64,
        update: BitmapUpdate,
        ctx: Option<&mut Context<Self>>,
    ) {
        let (Some(meta_actor), Some(ctx)) = (self.meta_actor.as_ref(), ctx) else {
            self.follow_ups.push_back(Input::BitmapsPersisted {
                version,
                result: Ok(()),
            });
            return;
        };
        // The core counts on its transactions reaching the store in version order. `send`
        // queues the message right here (the metadata actor's SyncArbiter mailbox is
        // unbounded, so it is never refused as full), and the metadata actor takes its
        // messages in order on one thread; only the reply is awaited later. Should this actor
        // stop first, the dropped request makes actix skip the save if it is still queued: it
        // was never reported durable to the core.
        let request = meta_actor.send(SaveBitmaps(update));
        let save = async move { save_outcome(request.await) };
        ctx.spawn(save.into_actor(self).map(move |result, actor, ctx| {
            actor.feed(Input::BitmapsPersisted { version, result }, Some(ctx));
        }));
    }

    fn flush_then(
        &mut self,
        ctx: &mut Context<Self>,
        input: impl FnOnce(Result<(), i32>) -> Input + 'static,
    ) {
        let target = IoTarget::Flush(Box::new(input));
        if self.uring.is_some() {
            // The ring has no ordering between entries, but the core asks for a flush only
            // once the writes it must cover have completed.
            return self.push_to_ring(target, 0, UringBuf::Flush, ctx);
        }
        let store = self.store.clone();
        self.run_blocking(target, move || (None, store.flush()), ctx);
    }

    /// Runs `io` on the bounded blocking pool (what the ring does not take) and reports it
    /// done to `target`, with the request it hands back.
    fn run_blocking(
        &mut self,
        target: IoTarget,
        io: impl FnOnce() -> (Option<IoOp>, std::io::Result<()>) + Send + 'static,
        ctx: &mut Context<Self>,
    ) {
        let slots = self.local_slots.clone();
        let local_io = async move {
            // The semaphore is never closed, so acquiring only waits.
            let _slot = slots.acquire_owned().await.ok();
            match tokio::task::spawn_blocking(io).await {
                Ok((op, result)) => (op, result.map_err(|e| e.raw_os_error().unwrap_or(EIO))),
                Err(join_error) => {
                    tracing::error!(%join_error, "local I/O task failed");
                    (None, Err(EIO))
                }
            }
        };
        ctx.spawn(
            local_io
                .into_actor(self)
                .map(move |(op, result), actor, ctx| {
                    actor.local_io_done(target, op, result);
                    actor.run_effects(Some(ctx));
                }),
        );
    }

    fn start_local(&mut self, id: RequestId, ctx: &mut Context<Self>) {
        let Some(op) = self
            .pending
            .get_mut(&id)
            .and_then(|pending| pending.op.take())
        else {
            tracing::error!(device = %self.name, id, "request to start has no data");
            return;
        };
        let (offset, buf) = match op {
            IoOp::Read { offset, buf } if self.ring_accepts(offset, &buf) => {
                (offset, UringBuf::Read(buf))
            }
            IoOp::Write { offset, data } if self.ring_accepts(offset, &data) => {
                // The request keeps its own reference for the reply.
                let in_ring = UringBuf::Write(Box::new(data.clone()));
                self.restore_op(id, IoOp::Write { offset, data });
                (offset, in_ring)
            }
            IoOp::Flush if self.uring.is_some() => {
                self.restore_op(id, IoOp::Flush);
                (0, UringBuf::Flush)
            }
            op => {
                let offset = op.kind_and_range().1.offset;
                let store = self.store.clone();
                let io = move || {
                    let (op, result) = run_local(store.as_ref(), op);
                    (Some(op), result)
                };
                return self.run_blocking(IoTarget::Local { id, offset }, io, ctx);
            }
        };
        self.push_to_ring(IoTarget::Local { id, offset }, offset, buf, ctx);
    }

    fn apply_peer_write(
        &mut self,
        peer: PeerId,
        conn: u64,
        write: PeerWrite,
        ctx: &mut Context<Self>,
    ) {
        let PeerWrite {
            seq,
            offset,
            len,
            discard,
            ..
        } = write;
        let Some(Payload { data, _budget }) = self.payloads.remove(&(peer, conn, seq)) else {
            tracing::error!(device = %self.name, peer, seq, "received write has no payload");
            return;
        };
        let target = IoTarget::PeerWrite {
            peer,
            conn,
            seq,
            _budget,
        };
        match data {
            Some(data) if !discard && self.ring_accepts(offset, &data) => {
                self.push_to_ring(target, offset, UringBuf::Write(Box::new(data)), ctx)
            }
            data => {
                let store = self.store.clone();
                let io = move || {
                    let result = match (&data, discard) {
                        (_, true) => store.discard(offset, len),
                        (Some(data), false) => store.write_at(offset, data),
                        (None, false) => Err(std::io::Error::from_raw_os_error(EINVAL)),
                    };
                    (None, result)
                };
                self.run_blocking(target, io, ctx)
            }
        }
    }

    /// Sync source: reads the blocks into an aligned buffer (through the ring when it takes
    /// them), then hands them to the link as `ResyncData` for connection `conn` and reports
    /// [`Input::ResyncSent`] (see [`DeviceActor::local_io_done`]). The read waits for room in
    /// the resync read budget.
    fn send_resync_data(
        &mut self,
        peer: PeerId,
        conn: u64,
        offset: u64,
        len: u64,
        ctx: &mut Context<Self>,
    ) {
        let Ok(bytes) = usize::try_from(len) else {
            return self.report_resync(Input::ResyncSent {
                peer,
                conn,
                offset,
                len,
                result: Err(EINVAL),
            });
        };
        // A read larger than the whole budget waits until nothing else holds any of it.
        let kib = (pooled_capacity(bytes) >> 10).clamp(1, RESYNC_READ_BUDGET_KIB);
        let permits = u32::try_from(kib).unwrap_or(u32::MAX);
        match self.resync_reads.clone().try_acquire_many_owned(permits) {
            Ok(budget) => self.start_resync_read(peer, conn, offset, len, budget, ctx),
            Err(_) => {
                let reads = self.resync_reads.clone();
                let wait = async move { reads.acquire_many_owned(permits).await };
                ctx.spawn(wait.into_actor(self).map(move |budget, actor, ctx| {
                    match budget {
                        Ok(budget) => actor.start_resync_read(peer, conn, offset, len, budget, ctx),
                        // The semaphore is never closed; fail the read rather than lose it.
                        Err(_) => actor.report_resync(Input::ResyncSent {
                            peer,
                            conn,
                            offset,
                            len,
                            result: Err(EIO),
                        }),
                    }
                    actor.run_effects(Some(ctx));
                }));
            }
        }
    }

    fn start_resync_read(
        &mut self,
        peer: PeerId,
        conn: u64,
        offset: u64,
        len: u64,
        budget: OwnedSemaphorePermit,
        ctx: &mut Context<Self>,
    ) {
        // The budget's permits cover the buffer's capacity, and the pool has twice the room.
        let Some(buf) = usize::try_from(len)
            .ok()
            .and_then(|bytes| self.resync_pool.try_acquire(bytes))
        else {
            let usage = self.resync_pool.usage();
            tracing::error!(device = %self.name, peer, offset, len, in_use = usage.bytes_in_use,
                "no buffer for a resync read");
            return self.report_resync(Input::ResyncSent {
                peer,
                conn,
                offset,
                len,
                result: Err(ENOMEM),
            });
        };
        let target = IoTarget::ResyncRead {
            peer,
            conn,
            offset,
            len,
            budget,
        };
        if self.ring_accepts(offset, &buf) {
            return self.push_to_ring(target, offset, UringBuf::Read(buf), ctx);
        }
        let store = self.store.clone();
        let io = move || {
            let mut buf = buf;
            let result = store.read_at(offset, &mut buf);
            (Some(IoOp::Read { offset, buf }), result)
        };
        self.run_blocking(target, io, ctx);
    }

    /// Sync target: writes the received blocks `(peer, conn, offset)` to the local store, drops
    /// them, and reports [`Input::ResyncWriteDone`].
    fn apply_resync_write(
        &mut self,
        peer: PeerId,
        conn: u64,
        offset: u64,
        len: u64,
        ctx: &mut Context<Self>,
    ) {
        let payload = self.resync_payloads.remove(&(peer, conn, offset));
        let Some(Payload {
            data: Some(data),
            _budget,
        }) = payload.filter(|p| p.data.as_ref().is_some_and(|d| d.len() as u64 == len))
        else {
            tracing::error!(device = %self.name, peer, conn, offset, len,
                "received resync blocks to write are missing");
            return self.report_resync(Input::ResyncWriteDone {
                peer,
                conn,
                offset,
                len,
                result: Err(EIO),
            });
        };
        let target = IoTarget::ResyncWrite {
            peer,
            conn,
            offset,
            len,
            _budget,
        };
        if self.ring_accepts(offset, &data) {
            return self.push_to_ring(target, offset, UringBuf::Write(Box::new(data)), ctx);
        }
        let store = self.store.clone();
        self.run_blocking(target, move || (None, store.write_at(offset, &data)), ctx);
    }

    /// Tells the core how a resync read or write ended, once the effects being carried out are
    /// done (every caller runs them next).
    /// Online verify: reads the blocks on the blocking pool (bounded like other local I/O)
    /// and digests each 4 KiB block.
    fn digest(
        &mut self,
        peer: PeerId,
        conn: u64,
        offset: u64,
        len: u64,
        purpose: DigestPurpose,
        ctx: &mut Context<Self>,
    ) {
        let buf = usize::try_from(len)
            .ok()
            .and_then(|bytes| self.resync_pool.try_acquire(bytes));
        let store = self.store.clone();
        let slots = self.local_slots.clone();
        let work = async move {
            let Some(mut buf) = buf else {
                return Err(ENOMEM);
            };
            // The semaphore is never closed, so acquiring only waits.
            let _slot = slots.acquire_owned().await.ok();
            let read = tokio::task::spawn_blocking(move || {
                store
                    .read_at(offset, &mut buf)
                    .map_err(|e| e.raw_os_error().unwrap_or(EIO))?;
                Ok(buf
                    .chunks(BLOCK_SIZE as usize)
                    .map(|block| {
                        let mut digest = [0u8; 32];
                        digest.copy_from_slice(
                            ring::digest::digest(&ring::digest::SHA256, block).as_ref(),
                        );
                        digest
                    })
                    .collect())
            });
            read.await.unwrap_or(Err(EIO))
        };
        ctx.spawn(work.into_actor(self).map(move |result, actor, ctx| {
            let input = Input::Digested {
                peer,
                conn,
                offset,
                len,
                purpose,
                result,
            };
            actor.feed(input, Some(ctx));
        }));
    }

    fn report_resync(&mut self, input: Input) {
        #[cfg(test)]
        if let Some(observer) = &self.resync_observer {
            let _ = observer.send(input.clone());
        }
        self.follow_ups.push_back(input);
    }

    /// Whether the ring takes I/O of `bytes` at `offset` (aligned, below the store's limit).
    fn ring_accepts(&self, offset: u64, bytes: &[u8]) -> bool {
        self.uring
            .as_ref()
            .is_some_and(|uring| uring.accepts(offset, bytes))
    }

    fn restore_op(&mut self, id: RequestId, op: IoOp) {
        if let Some(pending) = self.pending.get_mut(&id) {
            pending.op = Some(op);
        }
    }

    /// Queues one operation the ring accepts (see [`DeviceActor::ring_accepts`]) and makes
    /// sure it is submitted before this wake-up ends: everything queued by the messages
    /// handled in one wake-up goes in one system call.
    fn push_to_ring(
        &mut self,
        target: IoTarget,
        offset: u64,
        buf: UringBuf,
        ctx: &mut Context<Self>,
    ) {
        let token = self.next_uring_token;
        let pushed = match self.uring.as_mut() {
            Some(uring) => uring.push(token, offset, buf).is_ok(),
            None => false,
        };
        if !pushed {
            // Checked by the caller, so this is a bug: the operation fails rather than vanishes.
            tracing::error!(device = %self.name, offset, "the ring refused an operation");
            self.local_io_done(target, None, Err(EIO));
            return;
        }
        self.next_uring_token += 1;
        self.uring_targets.insert(token, target);
        if !self.uring_submit_scheduled {
            self.uring_submit_scheduled = true;
            // Spawned items run after the mailbox is drained, in the same wake-up.
            ctx.spawn(actix::fut::ready(()).map(|(), actor: &mut DeviceActor, _| {
                actor.uring_submit_scheduled = false;
                if let Some(uring) = actor.uring.as_mut() {
                    uring.submit();
                }
            }));
        }
    }

    /// Feeds the core every completion the ring has posted.
    fn reap_ring(&mut self, ctx: &mut Context<Self>) {
        let Some(uring) = self.uring.as_mut() else {
            return;
        };
        let mut done = std::mem::take(&mut self.reaped);
        uring.reap(&mut done);
        // Short transfers resubmitted by the reap must reach the kernel too.
        if uring.has_unsubmitted() {
            uring.submit();
        }
        for UringDone { token, buf, result } in done.drain(..) {
            if let Some(target) = self.uring_targets.remove(&token) {
                let returned = match (&target, buf) {
                    (
                        IoTarget::Local { offset, .. } | IoTarget::ResyncRead { offset, .. },
                        UringBuf::Read(buf),
                    ) => Some(IoOp::Read {
                        offset: *offset,
                        buf,
                    }),
                    _ => None,
                };
                self.local_io_done(target, returned, result);
            }
        }
        self.reaped = done;
        self.run_effects(Some(ctx));
    }

    /// One local operation finished, in the ring or on the blocking pool: gives the request
    /// back what it lent (`returned`) and tells the core. The caller runs the effects.
    fn local_io_done(&mut self, target: IoTarget, returned: Option<IoOp>, result: Result<(), i32>) {
        let now = self.now();
        match target {
            IoTarget::Local { id, offset } => {
                if let Some(op) = returned {
                    self.restore_op(id, op);
                }
                if let Err(errno) = result {
                    tracing::error!(device = %self.name, id, offset, errno, "local I/O failed");
                }
                let result = result.map_err(IoFault::LocalIo);
                self.core.handle(now, Input::LocalDone { id, result });
            }
            IoTarget::PeerWrite {
                peer, conn, seq, ..
            } => {
                if let Err(errno) = result {
                    tracing::error!(device = %self.name, peer, seq, errno,
                        "applying a peer's write failed");
                }
                self.core.handle(
                    now,
                    Input::PeerWriteApplied {
                        peer,
                        conn,
                        seq,
                        result,
                    },
                );
            }
            IoTarget::ResyncRead {
                peer,
                conn,
                offset,
                len,
                budget,
            } => {
                let result = match (result, returned) {
                    (Ok(()), Some(IoOp::Read { buf, .. })) => {
                        let data = ResyncPayload::new(buf, budget);
                        self.queue_for_link(peer, PeerOutbound::ResyncData { conn, offset, data });
                        Ok(())
                    }
                    (Ok(()), _) => {
                        tracing::error!(device = %self.name, peer, offset, len,
                            "a resync read came back without its buffer");
                        Err(EIO)
                    }
                    (Err(errno), _) => {
                        tracing::error!(device = %self.name, peer, offset, len, errno,
                            "reading blocks for a resync failed");
                        Err(errno)
                    }
                };
                self.report_resync(Input::ResyncSent {
                    peer,
                    conn,
                    offset,
                    len,
                    result,
                });
            }
            IoTarget::ResyncWrite {
                peer,
                conn,
                offset,
                len,
                ..
            } => {
                if let Err(errno) = result {
                    tracing::error!(device = %self.name, peer, offset, len, errno,
                        "writing resync blocks failed");
                }
                self.report_resync(Input::ResyncWriteDone {
                    peer,
                    conn,
                    offset,
                    len,
                    result,
                });
            }
            IoTarget::Flush(input) => {
                if let Err(errno) = result {
                    tracing::error!(device = %self.name, errno, "flush failed");
                }
                self.core.handle(now, input(result));
            }
        }
    }

    fn complete(&mut self, id: RequestId, result: Result<(), IoFault>) {
        let Some(pending) = self.pending.remove(&id) else {
            return;
        };
        let outcome = result.and_then(|()| match pending.op {
            Some(IoOp::Read { buf, .. }) => Ok(IoDone::Read(buf)),
            Some(IoOp::Write { data, .. }) => Ok(IoDone::Written(data.len() as u32)),
            Some(IoOp::Discard { .. }) => Ok(IoDone::Discarded),
            Some(IoOp::Flush) => Ok(IoDone::Flushed),
            None => Err(IoFault::LocalIo(EIO)),
        });
        if let Err(fault) = &outcome {
            tracing::debug!(device = %self.name, id, %fault, "request failed");
        }
        (pending.reply)(outcome);
    }

    fn hand_to_retry(&mut self, id: RequestId, ctx: &mut Context<Self>) {
        let Some(pending) = self.pending.remove(&id) else {
            return;
        };
        let Some(op) = pending.op else {
            (pending.reply)(Err(IoFault::LocalIo(EIO)));
            return;
        };
        RetryActor::from_registry().do_send(RetryPostponed {
            io: PostponedIo {
                id,
                op,
                reply: pending.reply,
                issued: pending.issued,
            },
            device_key: self.retry_key,
            device: ctx.address().recipient(),
        });
    }

    fn send_data(&mut self, peer: PeerId, outgoing: Outgoing) {
        let message = match outgoing {
            Outgoing::Barrier {
                seq,
                epoch,
                writes,
                flush,
            } => PeerOutbound::Message(PeerMessage::Barrier {
                seq,
                epoch,
                writes,
                flush,
            }),
            Outgoing::Data {
                request,
                seq,
                epoch,
                seen,
            } => match self.pending.get(&request).and_then(|p| p.op.as_ref()) {
                Some(IoOp::Write { offset, data }) => PeerOutbound::Data {
                    seq,
                    epoch,
                    request,
                    offset: *offset,
                    seen,
                    data: data.clone(),
                },
                _ => {
                    tracing::error!(device = %self.name, request, "replicated write has no data");
                    return;
                }
            },
            Outgoing::Discard {
                request,
                seq,
                epoch,
                seen,
            } => match self.pending.get(&request).and_then(|p| p.op.as_ref()) {
                Some(IoOp::Discard { offset, len }) => {
                    PeerOutbound::Message(PeerMessage::Discard {
                        seq,
                        epoch,
                        request,
                        offset: *offset,
                        len: *len,
                        seen,
                    })
                }
                _ => {
                    tracing::error!(device = %self.name, request, "replicated discard has no range");
                    return;
                }
            },
        };
        self.queue_for_link(peer, message);
    }

    /// Runs after every batch of effects, so it updates the shared snapshot in place.
    fn publish(&mut self) {
        let core = &self.core;
        let device = core.device();
        let mut snapshot = self.snapshot.lock().unwrap_or_else(|e| e.into_inner());
        snapshot.stats = device.stats();
        snapshot.app_in_flight = device.app_in_flight();
        snapshot.held = device.held() as u64;
        snapshot.suspended = device.is_suspended();
        snapshot.writable = device.is_writable();
        snapshot.role = core.role();
        snapshot.disk = core.disk();
        let meta = core.meta();
        snapshot.current_uuid = meta.current_uuid;
        if snapshot.bitmap_uuids != meta.bitmap_uuids {
            snapshot.bitmap_uuids = meta.bitmap_uuids.clone();
        }
        if snapshot.history_uuids != meta.history_uuids {
            snapshot.history_uuids = meta.history_uuids.clone();
        }
        snapshot.changing = core.is_changing();
        snapshot.down = core.is_down();
        // In place: strings are compared, and copied only when they changed (this runs after
        // every request).
        let mut index = 0;
        for link in core.links_view() {
            if let Some(slot) = snapshot.peers.get_mut(index) {
                link.update(slot);
            } else {
                snapshot.peers.push(link.to_status());
            }
            index += 1;
        }
        snapshot.peers.truncate(index);
        snapshot.activity_log = device.activity_log().stats();
        snapshot.now = self.now();
    }

    fn link_event(&mut self, peer: PeerId, event: LinkEvent, ctx: &mut Context<Self>) {
        let input = self.link_input(peer, event);
        self.feed(input, Some(ctx));
    }

    /// Feeds a link's batch to the core in order, then carries out the effects of all of it
    /// at once: one publish, and one message per peer link for everything the batch made the
    /// core send.
    fn link_events(&mut self, peer: PeerId, events: Vec<LinkEvent>, ctx: &mut Context<Self>) {
        for event in events {
            let input = self.link_input(peer, event);
            let now = self.now();
            self.core.handle(now, input);
        }
        self.run_effects(Some(ctx));
    }

    /// The core's input for a link's report; a received write's payload is kept aside.
    fn link_input(&mut self, peer: PeerId, event: LinkEvent) -> Input {
        match event {
            LinkEvent::TransportUp { conn } => {
                // Payloads of older connections will never be applied.
                self.payloads
                    .retain(|(p, c, _), _| *p != peer || *c == conn);
                self.resync_payloads
                    .retain(|(p, c, _), _| *p != peer || *c == conn);
                Input::TransportUp { peer, conn }
            }
            LinkEvent::TransportDown { conn, reason } => {
                Input::TransportDown { peer, conn, reason }
            }
            LinkEvent::DialFailed { reason } => Input::DialFailed { peer, reason },
            LinkEvent::Sent { request } => Input::PeerSent { peer, request },
            LinkEvent::Data {
                conn,
                seq,
                epoch,
                request,
                offset,
                seen,
                data,
                budget,
            } => {
                let write = PeerWrite {
                    seq,
                    epoch,
                    request,
                    offset,
                    len: data.len() as u64,
                    discard: false,
                    seen,
                };
                self.keep_payload(peer, conn, write, Some(data), budget)
            }
            LinkEvent::ResyncData {
                conn,
                offset,
                data,
                budget,
            } => {
                let len = data.len() as u64;
                // A repeated offset replaces the earlier blocks; the core decides whether it
                // wanted them.
                self.resync_payloads.insert(
                    (peer, conn, offset),
                    Payload {
                        data: Some(data),
                        _budget: budget,
                    },
                );
                Input::ResyncData {
                    peer,
                    conn,
                    offset,
                    len,
                }
            }
            LinkEvent::Message {
                conn,
                message,
                budget,
            } => match message {
                // A `Data` message (its payload not in an aligned buffer) is not what a link
                // delivers; the core refuses it as a protocol error.
                PeerMessage::Discard {
                    seq,
                    epoch,
                    request,
                    offset,
                    len,
                    seen,
                } => {
                    let write = PeerWrite {
                        seq,
                        epoch,
                        request,
                        offset,
                        len,
                        discard: true,
                        seen,
                    };
                    self.keep_payload(peer, conn, write, None, budget)
                }
                message => Input::PeerMessage {
                    peer,
                    conn,
                    message,
                },
            },
        }
    }

    /// Keeps a received write's payload (and its share of the receive budget) for the core,
    /// which refers to it by `(peer, conn, seq)`.
    fn keep_payload(
        &mut self,
        peer: PeerId,
        conn: u64,
        write: PeerWrite,
        data: Option<PooledBuf>,
        budget: Option<OwnedSemaphorePermit>,
    ) -> Input {
        self.payloads.insert(
            (peer, conn, write.seq),
            Payload {
                data,
                _budget: budget,
            },
        );
        Input::PeerWrite { peer, conn, write }
    }

    /// Runs an administrator's command; the answer comes on `reply`, if any.
    fn command(
        &mut self,
        command: Command,
        reply: Option<oneshot::Sender<Result<String, CommandError>>>,
        ctx: &mut Context<Self>,
    ) {
        let id = self.next_command;
        self.next_command += 1;
        if let Some(reply) = reply {
            self.commands.insert(id, reply);
        }
        self.feed(Input::Command { id, command }, Some(ctx));
    }
}

/// Appends `outbound` to a link's queue. Acknowledgements are cumulative (docs/protocol.md,
/// "Completion"), so a RecvAck/WriteAck replaces one of the same kind queued before it, unless
/// another control-stream message (a NegAck must stay ahead of the ack that covers its write)
/// or a connection change lies between them. Only data- and resync-stream messages, whose order
/// relative to the control stream nothing relies on, may lie between.
fn queue_outbound(queue: &mut Vec<PeerOutbound>, outbound: PeerOutbound) {
    if let PeerOutbound::Message(PeerMessage::RecvAck { up_to } | PeerMessage::WriteAck { up_to }) =
        &outbound
    {
        let earlier = queue.iter_mut().rev().find(|queued| match queued {
            PeerOutbound::Data { .. } | PeerOutbound::ResyncData { .. } => false,
            PeerOutbound::Message(message) => message.stream() == StreamKind::Control,
            PeerOutbound::Dial | PeerOutbound::Close { .. } => true,
        });
        if let Some(PeerOutbound::Message(earlier)) = earlier {
            match (earlier, &outbound) {
                (
                    PeerMessage::RecvAck { up_to: covered },
                    PeerOutbound::Message(PeerMessage::RecvAck { .. }),
                )
                | (
                    PeerMessage::WriteAck { up_to: covered },
                    PeerOutbound::Message(PeerMessage::WriteAck { .. }),
                ) => {
                    *covered = (*covered).max(*up_to);
                    return;
                }
                _ => {}
            }
        }
    }
    queue.push(outbound);
}

/// errno values (this crate does not link libc).
const EIO: i32 = 5;
const ENOMEM: i32 = 12;
const EINVAL: i32 = 22;

fn run_local(store: &dyn BlockStore, mut op: IoOp) -> (IoOp, std::io::Result<()>) {
    let result = match &mut op {
        IoOp::Read { offset, buf } => store.read_at(*offset, buf),
        IoOp::Write { offset, data } => store.write_at(*offset, &data[..]),
        IoOp::Discard { offset, len } => store.discard(*offset, *len),
        IoOp::Flush => store.flush(),
    };
    (op, result)
}

impl Actor for DeviceActor {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Context<Self>) {
        // Bounded: senders that use `send` wait for room; the front end bounds its own
        // `do_send`s through the buffer pool.
        ctx.set_mailbox_capacity(1024);
        ctx.run_interval(TICK_INTERVAL, |actor, ctx| {
            actor.feed(Input::Tick, Some(ctx))
        });
        if let Some(access) = self.store.direct_access() {
            match UringEngine::new(access) {
                Ok(engine) => {
                    ctx.add_stream(engine.readiness());
                    self.uring = Some(engine);
                }
                Err(error) => {
                    tracing::warn!(device = %self.name, %error,
                        "io_uring unavailable; local I/O uses the blocking pool")
                }
            }
        }
        // Effects queued by the core when it was created (mark in use, first dials).
        actor_start(self, ctx);
        tracing::debug!(device = %self.name, size = self.core.config().size_bytes, "device actor started");
    }
}

fn actor_start(actor: &mut DeviceActor, ctx: &mut Context<DeviceActor>) {
    actor.feed(Input::Tick, Some(ctx));
}

/// The ring may have posted completions.
impl StreamHandler<()> for DeviceActor {
    fn handle(&mut self, (): (), ctx: &mut Context<Self>) {
        self.reap_ring(ctx);
    }

    fn finished(&mut self, _: &mut Context<Self>) {
        // Only a failing reactor ends the stream. The device must not stop with it (the
        // default): its requests would vanish instead of failing.
        tracing::error!(device = %self.name, "io_uring completions can no longer be watched");
    }
}

impl Handler<SubmitIo> for DeviceActor {
    type Result = ();
    fn handle(&mut self, msg: SubmitIo, ctx: &mut Context<Self>) {
        self.submit(msg.op, msg.reply, msg.issued, ctx);
    }
}

impl Handler<Resubmit> for DeviceActor {
    type Result = ();
    fn handle(&mut self, Resubmit(io): Resubmit, ctx: &mut Context<Self>) {
        // Under its old id: the core knows it as postponed, and takes it back even while a
        // demotion or shutdown drains (they wait for it).
        let (kind, range) = io.op.kind_and_range();
        let start = self.tick(io.issued);
        self.pending.insert(
            io.id,
            PendingIo {
                op: Some(io.op),
                reply: io.reply,
                issued: io.issued,
            },
        );
        self.feed(
            Input::Resubmit {
                id: io.id,
                kind,
                range,
                start,
            },
            Some(ctx),
        );
    }
}

/// Marks a request as postponed (a peer asked for a retry).
#[derive(Message)]
#[rtype(result = "()")]
pub struct PostponeRequest(pub RequestId);

impl Handler<PostponeRequest> for DeviceActor {
    type Result = ();
    fn handle(&mut self, PostponeRequest(id): PostponeRequest, ctx: &mut Context<Self>) {
        self.feed(Input::Postpone { id }, Some(ctx));
    }
}

/// An administrator's command for the resource's core.
#[derive(Message)]
#[rtype(result = "()")]
pub struct RunCommand {
    pub command: Command,
    pub reply: oneshot::Sender<Result<String, CommandError>>,
}

impl Handler<RunCommand> for DeviceActor {
    type Result = ();
    fn handle(&mut self, msg: RunCommand, ctx: &mut Context<Self>) {
        self.command(msg.command, Some(msg.reply), ctx);
    }
}

/// Promotes (true) or demotes (false) a device of its own (tests of the pipeline).
#[derive(Message)]
#[rtype(result = "()")]
pub struct SetWritable(pub bool);

impl Handler<SetWritable> for DeviceActor {
    type Result = ();
    fn handle(&mut self, SetWritable(writable): SetWritable, ctx: &mut Context<Self>) {
        let command = if writable {
            Command::Promote { force: true }
        } else {
            Command::Demote
        };
        self.command(command, None, ctx);
    }
}

#[derive(Message)]
#[rtype(result = "()")]
pub struct SuspendIo;

impl Handler<SuspendIo> for DeviceActor {
    type Result = ();
    fn handle(&mut self, _: SuspendIo, ctx: &mut Context<Self>) {
        self.command(Command::SuspendIo, None, ctx);
    }
}

#[derive(Message)]
#[rtype(result = "()")]
pub struct ResumeIo;

impl Handler<ResumeIo> for DeviceActor {
    type Result = ();
    fn handle(&mut self, _: ResumeIo, ctx: &mut Context<Self>) {
        self.command(Command::ResumeIo, None, ctx);
    }
}

impl Handler<AttachLink> for DeviceActor {
    type Result = ();
    fn handle(&mut self, msg: AttachLink, ctx: &mut Context<Self>) {
        self.links.insert(msg.peer, msg.link);
        if self.dial_on_attach.remove(&msg.peer) {
            self.queue_for_link(msg.peer, PeerOutbound::Dial);
        }
        self.feed(Input::Tick, Some(ctx));
    }
}

impl Handler<FromPeer> for DeviceActor {
    type Result = ();
    fn handle(&mut self, msg: FromPeer, ctx: &mut Context<Self>) {
        self.link_event(msg.peer, msg.event, ctx);
    }
}

impl Handler<FromPeerBatch> for DeviceActor {
    type Result = ();
    fn handle(&mut self, msg: FromPeerBatch, ctx: &mut Context<Self>) {
        self.link_events(msg.peer, msg.events, ctx);
    }
}

/// Stops a device actor once its resource is gone.
#[derive(Message)]
#[rtype(result = "()")]
pub struct StopDevice;

impl Handler<StopDevice> for DeviceActor {
    type Result = ();
    fn handle(&mut self, _: StopDevice, ctx: &mut Context<Self>) {
        ctx.stop();
    }
}

/// A test hook: sends a replicated write to every attached peer, bypassing the core, so that
/// tests can show that a peer refuses data from a node that is not its Primary.
#[derive(Message)]
#[rtype(result = "()")]
pub struct SendRawData {
    pub offset: u64,
    pub data: Vec<u8>,
}

impl Handler<SendRawData> for DeviceActor {
    type Result = ();
    fn handle(&mut self, msg: SendRawData, _: &mut Context<Self>) {
        tracing::warn!(device = %self.name, offset = msg.offset, len = msg.data.len(), "test hook: sending raw data to the peers");
        let peers: Vec<PeerId> = self.links.keys().copied().collect();
        for peer in peers {
            self.queue_for_link(
                peer,
                PeerOutbound::Message(PeerMessage::Data {
                    seq: 1,
                    epoch: 1,
                    request: 0,
                    offset: msg.offset,
                    seen: 0,
                    data: msg.data.clone(),
                }),
            );
        }
        self.flush_outbox();
    }
}

/// What the core hears of a metadata save: durable, or why not.
fn save_outcome(
    answer: Result<Result<(), crate::ports::MetaError>, actix::MailboxError>,
) -> Result<(), String> {
    match answer {
        Ok(Ok(())) => Ok(()),
        Ok(Err(error)) => Err(error.to_string()),
        Err(error) => Err(format!("metadata actor unavailable: {error}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{buf_from, MemStore};
    use std::os::fd::AsRawFd;
    use std::os::unix::fs::{FileExt, OpenOptionsExt};
    use tokio::sync::mpsc;
    use tokio::time::timeout;

    const DEADLINE: Duration = Duration::from_secs(20);
    const PEER: PeerId = 1;
    const CONN: u64 = 3;

    /// A peer's link as the device sees it: everything the device hands it, in order.
    struct LinkProbe(mpsc::UnboundedSender<PeerOutbound>);

    impl Actor for LinkProbe {
        type Context = Context<Self>;
    }

    impl Handler<ToPeer> for LinkProbe {
        type Result = ();
        fn handle(&mut self, ToPeer(batch): ToPeer, _: &mut Context<Self>) {
            for outbound in batch {
                let _ = self.0.send(outbound);
            }
        }
    }

    /// Carries out an effect as if the core had asked for it. (The core does not start a
    /// resync yet, and it ignores the reports for a peer it has no connection with.)
    #[derive(Message)]
    #[rtype(result = "()")]
    struct CarryOut(Effect);

    impl Handler<CarryOut> for DeviceActor {
        type Result = ();
        fn handle(&mut self, CarryOut(effect): CarryOut, ctx: &mut Context<Self>) {
            self.carry_out(effect, Some(ctx));
            self.run_effects(Some(ctx));
        }
    }

    #[derive(Message)]
    #[rtype(result = "()")]
    struct ObserveResync(mpsc::UnboundedSender<Input>);

    impl Handler<ObserveResync> for DeviceActor {
        type Result = ();
        fn handle(&mut self, ObserveResync(observer): ObserveResync, _: &mut Context<Self>) {
            self.resync_observer = Some(observer);
        }
    }

    /// A file opened with O_DIRECT whose descriptor the device may use: I/O through the ring.
    struct DirectFile {
        file: std::fs::File,
        size: u64,
    }

    impl BlockStore for DirectFile {
        fn size(&self) -> u64 {
            self.size
        }
        fn read_at(&self, offset: u64, buf: &mut [u8]) -> std::io::Result<()> {
            self.file.read_exact_at(buf, offset)
        }
        fn write_at(&self, offset: u64, data: &[u8]) -> std::io::Result<()> {
            self.file.write_all_at(data, offset)
        }
        fn discard(&self, _: u64, _: u64) -> std::io::Result<()> {
            Err(std::io::Error::from_raw_os_error(EINVAL))
        }
        fn flush(&self) -> std::io::Result<()> {
            self.file.sync_data()
        }
        fn direct_access(&self) -> Option<crate::ports::DirectAccess> {
            Some(crate::ports::DirectAccess {
                fd: self.file.as_raw_fd(),
                limit: self.size,
            })
        }
    }

    fn pattern(seed: u64, len: usize) -> Vec<u8> {
        (0..len)
            .map(|i| (i as u64 * 31 + seed * 7 + (i as u64 >> 12)) as u8)
            .collect()
    }

    struct Harness {
        device: Addr<DeviceActor>,
        link: mpsc::UnboundedReceiver<PeerOutbound>,
        reports: mpsc::UnboundedReceiver<Input>,
    }

    impl Harness {
        async fn start(store: Arc<dyn BlockStore>) -> Harness {
            let device = DeviceActor::new("r0", store, false).start();
            let (to_link, link) = mpsc::unbounded_channel();
            let probe = LinkProbe(to_link).start();
            device
                .send(AttachLink {
                    peer: PEER,
                    link: probe.recipient(),
                })
                .await
                .expect("device");
            let (observer, reports) = mpsc::unbounded_channel();
            device.send(ObserveResync(observer)).await.expect("device");
            Harness {
                device,
                link,
                reports,
            }
        }

        async fn carry_out(&self, effect: Effect) {
            self.device.send(CarryOut(effect)).await.expect("device");
        }

        async fn report(&mut self) -> Input {
            timeout(DEADLINE, self.reports.recv())
                .await
                .expect("no resync report in time")
                .expect("device gone")
        }

        /// Reads `len` bytes at `offset` as a sync source does; returns what the link got.
        async fn send_resync_data(&mut self, offset: u64, len: u64) -> (u64, u64, Vec<u8>) {
            self.carry_out(Effect::SendResyncData {
                peer: PEER,
                conn: CONN,
                offset,
                len,
            })
            .await;
            let report = self.report().await;
            assert_eq!(
                report,
                Input::ResyncSent {
                    peer: PEER,
                    conn: CONN,
                    offset,
                    len,
                    result: Ok(())
                }
            );
            match timeout(DEADLINE, self.link.recv()).await {
                Ok(Some(PeerOutbound::ResyncData { conn, offset, data })) => {
                    let bytes = data.as_ref();
                    assert_eq!(bytes.as_ptr() as usize % 4096, 0, "buffer not aligned");
                    (conn, offset, bytes.to_vec())
                }
                Ok(Some(_)) => panic!("the link got something else than ResyncData"),
                _ => panic!("the link got nothing"),
            }
        }

        /// Hands the device resync blocks as the link delivers them, holding `budget`.
        fn deliver(&self, offset: u64, bytes: &[u8], budget: OwnedSemaphorePermit) {
            let pool = BufferPool::new(4 << 20);
            self.device.do_send(FromPeerBatch {
                peer: PEER,
                events: vec![LinkEvent::ResyncData {
                    conn: CONN,
                    offset,
                    data: buf_from(&pool, bytes),
                    budget: Some(budget),
                }],
            });
        }

        async fn apply(&mut self, offset: u64, len: u64) -> Result<(), i32> {
            self.carry_out(Effect::ApplyResyncWrite {
                peer: PEER,
                conn: CONN,
                offset,
                len,
            })
            .await;
            match self.report().await {
                Input::ResyncWriteDone {
                    peer: PEER,
                    conn: CONN,
                    offset: o,
                    len: l,
                    result,
                } if (o, l) == (offset, len) => result,
                other => panic!("unexpected report {other:?}"),
            }
        }
    }

    /// Waits until every permit of `budget` is back: whoever held one dropped it.
    async fn all_released(budget: &Semaphore, permits: u32) {
        let all = timeout(DEADLINE, budget.acquire_many(permits))
            .await
            .expect("a payload was never dropped")
            .expect("semaphore closed");
        drop(all);
    }

    /// The sync source's read and the sync target's write, through the store's methods on the
    /// blocking pool (a MemStore offers no descriptor for the ring).
    #[actix_rt::test]
    async fn resync_blocks_are_read_for_the_link_and_written_from_it() {
        let store = MemStore::new(4 << 20);
        let original = pattern(1, 4 << 20);
        store.write_at(0, &original).expect("fill");
        let mut harness = Harness::start(store.clone()).await;

        let (conn, offset, bytes) = harness.send_resync_data(8192, 256 << 10).await;
        assert_eq!((conn, offset), (CONN, 8192));
        assert!(bytes[..] == original[8192..8192 + (256 << 10)]);

        // A read error is reported with its errno, and nothing goes to the link.
        store.fail_next(1, EIO);
        harness
            .carry_out(Effect::SendResyncData {
                peer: PEER,
                conn: CONN,
                offset: 0,
                len: 4096,
            })
            .await;
        assert_eq!(
            harness.report().await,
            Input::ResyncSent {
                peer: PEER,
                conn: CONN,
                offset: 0,
                len: 4096,
                result: Err(EIO)
            }
        );
        let (_, offset, _) = harness.send_resync_data(1 << 20, 4096).await;
        assert_eq!(offset, 1 << 20, "the failed read sent something");

        // Received blocks are kept until the core asks for them to be written, then dropped.
        let budget = Arc::new(Semaphore::new(64));
        let blocks = pattern(2, 64 << 10);
        let permit = budget.clone().acquire_many_owned(64).await.expect("budget");
        harness.deliver(2 << 20, &blocks, permit);
        assert_eq!(harness.apply(2 << 20, 64 << 10).await, Ok(()));
        assert!(store.read_range(2 << 20, 64 << 10) == blocks);
        all_released(&budget, 64).await;

        // Missing blocks (never received, or of a connection that closed) fail the write.
        let writes = store.counters().writes;
        assert_eq!(harness.apply(3 << 20, 4096).await, Err(EIO));
        let permit = budget.clone().acquire_many_owned(64).await.expect("budget");
        harness.deliver(3 << 20, &blocks[..4096], permit);
        harness
            .carry_out(Effect::CloseConnection {
                peer: PEER,
                conn: CONN,
                reason: "test".into(),
            })
            .await;
        all_released(&budget, 64).await;
        assert_eq!(harness.apply(3 << 20, 4096).await, Err(EIO));
        assert_eq!(
            store.counters().writes,
            writes,
            "a missing payload was written"
        );
        assert!(store.read_range(3 << 20, 4096) == original[3 << 20..(3 << 20) + 4096]);

        // A write error comes back with its errno.
        let permit = budget.clone().acquire_many_owned(64).await.expect("budget");
        harness.deliver(3 << 20, &blocks[..4096], permit);
        store.fail_next(1, EIO);
        assert_eq!(harness.apply(3 << 20, 4096).await, Err(EIO));
        all_released(&budget, 64).await;
    }

    /// The same through io_uring, on a file opened with O_DIRECT.
    #[actix_rt::test]
    async fn resync_blocks_go_through_the_ring_when_there_is_one() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("disk");
        let size: u64 = 4 << 20;
        let original = pattern(3, size as usize);
        std::fs::write(&path, &original).expect("fill");
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(0o40000) // O_DIRECT on x86_64 and aarch64
            .open(&path)
            .expect("open");
        let mut harness = Harness::start(Arc::new(DirectFile { file, size })).await;

        let (_, _, bytes) = harness.send_resync_data(1 << 20, 1 << 20).await;
        assert!(bytes[..] == original[1 << 20..2 << 20]);

        let budget = Arc::new(Semaphore::new(256));
        let blocks = pattern(4, 256 << 10);
        let permit = budget
            .clone()
            .acquire_many_owned(256)
            .await
            .expect("budget");
        harness.deliver(0, &blocks, permit);
        assert_eq!(harness.apply(0, 256 << 10).await, Ok(()));
        all_released(&budget, 256).await;
        let (_, _, bytes) = harness.send_resync_data(0, 256 << 10).await;
        assert!(bytes == blocks);
    }

    fn acks(queue: &[PeerOutbound]) -> Vec<String> {
        queue
            .iter()
            .map(|queued| match queued {
                PeerOutbound::Message(message) => format!("{message:?}"),
                PeerOutbound::Data { seq, .. } => format!("Data {seq}"),
                PeerOutbound::ResyncData { offset, .. } => format!("ResyncData {offset}"),
                PeerOutbound::Dial => "Dial".into(),
                PeerOutbound::Close { conn, .. } => format!("Close {conn}"),
            })
            .collect()
    }

    fn message(message: PeerMessage) -> PeerOutbound {
        PeerOutbound::Message(message)
    }

    #[test]
    fn queued_cumulative_acks_merge_but_never_across_a_neg_ack_or_a_close() {
        let mut queue = Vec::new();
        queue_outbound(&mut queue, message(PeerMessage::WriteAck { up_to: 1 }));
        queue_outbound(&mut queue, message(PeerMessage::WriteAck { up_to: 3 }));
        // Data-stream messages may lie between.
        queue_outbound(
            &mut queue,
            message(PeerMessage::Barrier {
                seq: 9,
                epoch: 1,
                writes: 0,
                flush: false,
            }),
        );
        queue_outbound(&mut queue, message(PeerMessage::WriteAck { up_to: 4 }));
        queue_outbound(
            &mut queue,
            message(PeerMessage::NegAck {
                request: 7,
                errno: 5,
            }),
        );
        queue_outbound(&mut queue, message(PeerMessage::WriteAck { up_to: 6 }));
        queue_outbound(&mut queue, message(PeerMessage::WriteAck { up_to: 8 }));
        queue_outbound(
            &mut queue,
            PeerOutbound::Close {
                conn: 1,
                reason: "gone".into(),
            },
        );
        queue_outbound(&mut queue, message(PeerMessage::WriteAck { up_to: 2 }));
        queue_outbound(&mut queue, message(PeerMessage::RecvAck { up_to: 5 }));
        queue_outbound(&mut queue, message(PeerMessage::RecvAck { up_to: 6 }));
        assert_eq!(
            acks(&queue),
            [
                "WriteAck { up_to: 4 }",
                "Barrier { seq: 9, epoch: 1, writes: 0, flush: false }",
                "NegAck { request: 7, errno: 5 }",
                "WriteAck { up_to: 8 }",
                "Close 1",
                "WriteAck { up_to: 2 }",
                "RecvAck { up_to: 6 }",
            ]
        );
    }
}
