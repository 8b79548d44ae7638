//! The DeviceActor: one per volume. It runs the request pipeline of [`DeviceCore`] and carries
//! out its effects: local I/O on a bounded blocking pool, replies to the application, and
//! handing postponed requests to the [`RetryActor`].

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use actix::prelude::*;
use tokio::sync::{oneshot, OwnedSemaphorePermit, Semaphore};

use crate::buffer::PooledBuf;
use crate::core::messages::{Epoch, PeerMessage};
use crate::core::replication::{Outgoing, PeerId, PeerReceiver, ReceiverEffect};
use crate::core::{
    ByteRange, DeviceCore, DeviceStats, Effect, IoFault, IoKind, ReplicationProtocol, RequestId,
    Tick,
};
use crate::ports::BlockStore;
use crate::retry::{PostponedIo, RetryActor, RetryPostponed};

/// How many local I/O operations of one volume run at once on the blocking pool.
pub const LOCAL_IO_SLOTS: usize = 32;

/// An application request as the front end hands it over.
pub enum IoOp {
    /// Read `buf.len()` bytes at `offset` into `buf`.
    Read {
        offset: u64,
        buf: PooledBuf,
    },
    /// Shared: the local write and every peer's send read the same bytes.
    Write {
        offset: u64,
        data: SharedBuf,
    },
    Discard {
        offset: u64,
        len: u64,
    },
    Flush,
}

impl IoOp {
    fn kind_and_range(&self) -> (IoKind, ByteRange) {
        match self {
            IoOp::Read { offset, buf } => (IoKind::Read, ByteRange::new(*offset, buf.len() as u64)),
            IoOp::Write { offset, data } => {
                (IoKind::Write, ByteRange::new(*offset, data.len() as u64))
            }
            IoOp::Discard { offset, len } => (IoKind::Discard, ByteRange::new(*offset, *len)),
            IoOp::Flush => (IoKind::Flush, ByteRange::new(0, 0)),
        }
    }
}

impl std::fmt::Debug for IoOp {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let (kind, range) = self.kind_and_range();
        write!(f, "{kind:?}@{}+{}", range.offset, range.len)
    }
}

/// Write data, shared between the local store and the peers' senders.
pub type SharedBuf = Arc<PooledBuf>;

/// What a completed request gives back.
#[derive(Debug)]
pub enum IoDone {
    Read(PooledBuf),
    Written(u32),
    Discarded,
    Flushed,
}

/// The reply path of one request: called exactly once, from the actor's thread.
pub type IoReply = Box<dyn FnOnce(Result<IoDone, IoFault>) + Send>;

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
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DeviceSnapshot {
    pub stats: DeviceStats,
    pub app_in_flight: u64,
    pub held: u64,
    pub suspended: bool,
    pub writable: bool,
    pub peers: Vec<PeerSnapshot>,
}

/// Replication counters of one peer.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PeerSnapshot {
    pub peer: PeerId,
    pub connected: bool,
    pub out_of_sync_bytes: u64,
    /// Writes sent and not yet covered by a barrier ack.
    pub unacked: u64,
    /// Writes received from the peer and not yet written here.
    pub pending: u64,
    pub sent_bytes: u64,
    pub received_bytes: u64,
}

/// What the device asks a peer's link to send.
pub enum PeerOutbound {
    Data {
        seq: u64,
        epoch: Epoch,
        request: RequestId,
        offset: u64,
        data: SharedBuf,
    },
    Discard {
        seq: u64,
        epoch: Epoch,
        request: RequestId,
        offset: u64,
        len: u64,
    },
    Barrier {
        seq: u64,
        epoch: Epoch,
        writes: u32,
        flush: bool,
    },
    /// An acknowledgement of the peer's writes (ack stream).
    Ack(PeerMessage),
    /// The peer broke the protocol: close the connection with this reason.
    Drop(String),
}

/// Delivered to a peer's link actor.
#[derive(Message)]
#[rtype(result = "()")]
pub struct ToPeer(pub PeerOutbound);

/// A write received from a peer, waiting to be applied.
struct ReceivedWrite {
    offset: u64,
    kind: ReceivedKind,
    /// Released when the write has been applied (dropped with this value).
    _budget: Option<OwnedSemaphorePermit>,
}

enum ReceivedKind {
    Data(Vec<u8>),
    Discard(u64),
}

struct PeerPort {
    link: Option<Recipient<ToPeer>>,
    receiver: PeerReceiver,
    received: HashMap<u64, ReceivedWrite>,
    /// Bumped on every connection, so late completions of an old one are ignored.
    generation: u64,
}

/// Shared, always-current view of a device for status readers.
pub type SharedSnapshot = Arc<Mutex<DeviceSnapshot>>;

pub struct DeviceActor {
    name: String,
    core: DeviceCore,
    store: Arc<dyn BlockStore>,
    pending: HashMap<RequestId, PendingIo>,
    local_slots: Arc<Semaphore>,
    snapshot: SharedSnapshot,
    idle_waiters: Vec<oneshot::Sender<()>>,
    clock_origin: Instant,
    peers: BTreeMap<PeerId, PeerPort>,
    disk_flushes: bool,
}

struct PendingIo {
    /// None while the op is at the local store.
    op: Option<IoOp>,
    reply: IoReply,
    issued: Instant,
}

impl DeviceActor {
    pub fn new(name: &str, store: Arc<dyn BlockStore>, writable: bool) -> Self {
        let core = DeviceCore::new(store.size(), writable);
        DeviceActor {
            name: name.to_owned(),
            core,
            store,
            pending: HashMap::new(),
            local_slots: Arc::new(Semaphore::new(LOCAL_IO_SLOTS)),
            snapshot: Arc::new(Mutex::new(DeviceSnapshot {
                writable,
                ..DeviceSnapshot::default()
            })),
            idle_waiters: Vec::new(),
            clock_origin: Instant::now(),
            peers: BTreeMap::new(),
            disk_flushes: true,
        }
    }

    /// See [`PeerReceiver::without_disk_flushes`]; on by default.
    pub fn with_disk_flushes(mut self, disk_flushes: bool) -> Self {
        self.disk_flushes = disk_flushes;
        self
    }

    fn new_receiver(&self, protocol: ReplicationProtocol) -> PeerReceiver {
        let receiver = PeerReceiver::new(protocol);
        if self.disk_flushes {
            receiver
        } else {
            receiver.without_disk_flushes()
        }
    }

    pub fn snapshot_handle(&self) -> SharedSnapshot {
        self.snapshot.clone()
    }

    fn tick(&self, at: Instant) -> Tick {
        u64::try_from(at.saturating_duration_since(self.clock_origin).as_nanos())
            .unwrap_or(u64::MAX)
    }

    fn submit(&mut self, op: IoOp, reply: IoReply, issued: Instant, ctx: &mut Context<Self>) {
        let (kind, range) = op.kind_and_range();
        let (id, effects) = self.core.submit(kind, range, self.tick(issued));
        self.pending.insert(
            id,
            PendingIo {
                op: Some(op),
                reply,
                issued,
            },
        );
        self.apply(effects, ctx);
    }

    fn apply(&mut self, effects: Vec<Effect>, ctx: &mut Context<Self>) {
        for effect in effects {
            match effect {
                Effect::StartLocal(id) => self.start_local(id, ctx),
                Effect::Complete(id, result) => self.complete(id, result),
                Effect::Postponed(id) => self.hand_to_retry(id, ctx),
                Effect::Send(peer, outgoing) => self.send_to_peer(peer, outgoing),
            }
        }
        self.publish();
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
        let store = self.store.clone();
        let slots = self.local_slots.clone();
        let local_io = async move {
            // The semaphore is never closed, so acquiring only waits.
            let _slot = slots.acquire_owned().await.ok();
            match tokio::task::spawn_blocking(move || run_local(store.as_ref(), op)).await {
                Ok((op, result)) => (Some(op), result),
                Err(join_error) => {
                    tracing::error!(%join_error, "local I/O task failed");
                    (None, Err(IoFault::LocalIo(EIO)))
                }
            }
        };
        ctx.spawn(
            local_io
                .into_actor(self)
                .map(move |(op, result), actor, ctx| {
                    if let Some(pending) = actor.pending.get_mut(&id) {
                        pending.op = op;
                    }
                    let now = actor.tick(Instant::now());
                    let effects = actor.core.local_done(id, result, now);
                    actor.apply(effects, ctx);
                }),
        );
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
                op,
                reply: pending.reply,
                issued: pending.issued,
            },
            device: ctx.address().recipient(),
        });
    }

    fn send_to_peer(&mut self, peer: PeerId, outgoing: Outgoing) {
        let Some(link) = self.peers.get(&peer).and_then(|port| port.link.clone()) else {
            return;
        };
        let message = match outgoing {
            Outgoing::Barrier {
                seq,
                epoch,
                writes,
                flush,
            } => PeerOutbound::Barrier {
                seq,
                epoch,
                writes,
                flush,
            },
            Outgoing::Data {
                request,
                seq,
                epoch,
            } => match self.pending.get(&request).and_then(|p| p.op.as_ref()) {
                Some(IoOp::Write { offset, data }) => PeerOutbound::Data {
                    seq,
                    epoch,
                    request,
                    offset: *offset,
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
            } => match self.pending.get(&request).and_then(|p| p.op.as_ref()) {
                Some(IoOp::Discard { offset, len }) => PeerOutbound::Discard {
                    seq,
                    epoch,
                    request,
                    offset: *offset,
                    len: *len,
                },
                _ => {
                    tracing::error!(device = %self.name, request, "replicated discard has no range");
                    return;
                }
            },
        };
        link.do_send(ToPeer(message));
    }

    fn peer_snapshots(&self) -> impl Iterator<Item = PeerSnapshot> + '_ {
        self.peers.iter().map(|(peer, port)| {
            let sender = self.core.peer(*peer);
            PeerSnapshot {
                peer: *peer,
                connected: port.link.is_some(),
                out_of_sync_bytes: sender.map_or(0, |s| s.out_of_sync.dirty_bytes()),
                unacked: sender.map_or(0, |s| s.unacked_writes()),
                pending: port.receiver.pending(),
                sent_bytes: sender.map_or(0, |s| s.sent_bytes),
                received_bytes: port.receiver.received_bytes,
            }
        })
    }

    fn drop_peer(&mut self, peer: PeerId, reason: String, ctx: &mut Context<Self>) {
        tracing::warn!(device = %self.name, peer, %reason, "dropping the peer connection");
        if let Some(link) = self.peers.get(&peer).and_then(|port| port.link.clone()) {
            link.do_send(ToPeer(PeerOutbound::Drop(reason)));
        }
        self.detach_peer(peer, ctx);
    }

    fn detach_peer(&mut self, peer: PeerId, ctx: &mut Context<Self>) {
        if let Some(port) = self.peers.get_mut(&peer) {
            port.link = None;
            port.received.clear();
            port.generation += 1;
        }
        let effects = self.core.peer_disconnected(peer, self.tick(Instant::now()));
        self.apply(effects, ctx);
    }

    fn apply_received(
        &mut self,
        peer: PeerId,
        effects: Vec<ReceiverEffect>,
        ctx: &mut Context<Self>,
    ) {
        for effect in effects {
            match effect {
                ReceiverEffect::Apply(local) => self.start_peer_write(peer, local, ctx),
                ReceiverEffect::Flush(epoch) => self.start_peer_flush(peer, epoch, ctx),
                ReceiverEffect::EpochWritten(epoch) => {
                    let Some(port) = self.peers.get_mut(&peer) else {
                        continue;
                    };
                    match port.receiver.flush_done(epoch) {
                        Ok(more) => self.apply_received(peer, more, ctx),
                        Err(error) => self.drop_peer(peer, error.to_string(), ctx),
                    }
                }
                ReceiverEffect::Ack(message) => {
                    if let Some(link) = self.peers.get(&peer).and_then(|port| port.link.clone()) {
                        link.do_send(ToPeer(PeerOutbound::Ack(message)));
                    }
                }
            }
        }
        self.publish();
    }

    fn start_peer_write(&mut self, peer: PeerId, local: u64, ctx: &mut Context<Self>) {
        let Some(port) = self.peers.get_mut(&peer) else {
            return;
        };
        let Some(write) = port.received.remove(&local) else {
            return;
        };
        let generation = port.generation;
        let store = self.store.clone();
        let slots = self.local_slots.clone();
        let size = self.core.size();
        let local_io = async move {
            let _slot = slots.acquire_owned().await.ok();
            let result = tokio::task::spawn_blocking(move || {
                let end = match &write.kind {
                    ReceivedKind::Data(data) => write.offset.checked_add(data.len() as u64),
                    ReceivedKind::Discard(len) => write.offset.checked_add(*len),
                };
                if end.is_none_or(|end| end > size) {
                    return Err(EINVAL);
                }
                let result = match &write.kind {
                    ReceivedKind::Data(data) => store.write_at(write.offset, data),
                    ReceivedKind::Discard(len) => store.discard(write.offset, *len),
                };
                result.map_err(|error| error.raw_os_error().unwrap_or(EIO))
            })
            .await;
            result.unwrap_or(Err(EIO))
        };
        ctx.spawn(local_io.into_actor(self).map(move |result, actor, ctx| {
            let Some(port) = actor
                .peers
                .get_mut(&peer)
                .filter(|p| p.generation == generation)
            else {
                return;
            };
            let effects = port.receiver.local_done(local, result);
            actor.apply_received(peer, effects, ctx);
        }));
    }

    fn start_peer_flush(&mut self, peer: PeerId, epoch: Epoch, ctx: &mut Context<Self>) {
        let Some(generation) = self.peers.get(&peer).map(|port| port.generation) else {
            return;
        };
        let store = self.store.clone();
        let flush = async move {
            tokio::task::spawn_blocking(move || store.flush())
                .await
                .map_err(std::io::Error::other)
                .and_then(|result| result)
        };
        ctx.spawn(flush.into_actor(self).map(move |result, actor, ctx| {
            if let Err(error) = result {
                tracing::error!(device = %actor.name, %error, "flush for a peer barrier failed");
            }
            let Some(port) = actor
                .peers
                .get_mut(&peer)
                .filter(|p| p.generation == generation)
            else {
                return;
            };
            match port.receiver.flush_done(epoch) {
                Ok(effects) => actor.apply_received(peer, effects, ctx),
                Err(error) => actor.drop_peer(peer, error.to_string(), ctx),
            }
        }));
    }

    /// Runs after every batch of effects, so it updates the shared snapshot in place: no
    /// allocation per request.
    fn publish(&mut self) {
        {
            let mut snapshot = self.snapshot.lock().unwrap_or_else(|e| e.into_inner());
            snapshot.stats = self.core.stats();
            snapshot.app_in_flight = self.core.app_in_flight();
            snapshot.held = self.core.held() as u64;
            snapshot.suspended = self.core.is_suspended();
            snapshot.writable = self.core.is_writable();
            snapshot.peers.clear();
            snapshot.peers.extend(self.peer_snapshots());
        }
        if self.core.is_idle() {
            for waiter in self.idle_waiters.drain(..) {
                let _ = waiter.send(());
            }
        }
    }
}

/// errno values (this crate does not link libc).
const EIO: i32 = 5;
const EINVAL: i32 = 22;

fn run_local(store: &dyn BlockStore, mut op: IoOp) -> (IoOp, Result<(), IoFault>) {
    let result = match &mut op {
        IoOp::Read { offset, buf } => store.read_at(*offset, buf),
        IoOp::Write { offset, data } => store.write_at(*offset, &data[..]),
        IoOp::Discard { offset, len } => store.discard(*offset, *len),
        IoOp::Flush => store.flush(),
    };
    let result = result.map_err(|error| {
        tracing::error!(%error, op = ?op, "local I/O failed");
        IoFault::LocalIo(error.raw_os_error().unwrap_or(EIO))
    });
    (op, result)
}

impl Actor for DeviceActor {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Context<Self>) {
        // Bounded: senders that use `send` wait for room; the front end bounds its own
        // `do_send`s through the buffer pool.
        ctx.set_mailbox_capacity(1024);
        tracing::debug!(device = %self.name, size = self.core.size(), "device actor started");
    }
}

impl Handler<SubmitIo> for DeviceActor {
    type Result = ();
    fn handle(&mut self, msg: SubmitIo, ctx: &mut Context<Self>) {
        self.submit(msg.op, msg.reply, msg.issued, ctx);
    }
}

/// A postponed request coming back from the retry actor.
#[derive(Message)]
#[rtype(result = "()")]
pub struct Resubmit(pub PostponedIo);

impl Handler<Resubmit> for DeviceActor {
    type Result = ();
    fn handle(&mut self, Resubmit(io): Resubmit, ctx: &mut Context<Self>) {
        self.submit(io.op, io.reply, io.issued, ctx);
    }
}

/// Marks a request as postponed (a peer asked for a retry).
#[derive(Message)]
#[rtype(result = "()")]
pub struct PostponeRequest(pub RequestId);

impl Handler<PostponeRequest> for DeviceActor {
    type Result = ();
    fn handle(&mut self, PostponeRequest(id): PostponeRequest, ctx: &mut Context<Self>) {
        let now = self.tick(Instant::now());
        let effects = self.core.postpone(id, now);
        self.apply(effects, ctx);
    }
}

#[derive(Message)]
#[rtype(result = "()")]
pub struct SetWritable(pub bool);

impl Handler<SetWritable> for DeviceActor {
    type Result = ();
    fn handle(&mut self, SetWritable(writable): SetWritable, _: &mut Context<Self>) {
        self.core.set_writable(writable);
        self.publish();
    }
}

#[derive(Message)]
#[rtype(result = "()")]
pub struct SuspendIo;

impl Handler<SuspendIo> for DeviceActor {
    type Result = ();
    fn handle(&mut self, _: SuspendIo, _: &mut Context<Self>) {
        self.core.suspend();
        tracing::info!(device = %self.name, "I/O suspended");
        self.publish();
    }
}

#[derive(Message)]
#[rtype(result = "()")]
pub struct ResumeIo;

impl Handler<ResumeIo> for DeviceActor {
    type Result = ();
    fn handle(&mut self, _: ResumeIo, ctx: &mut Context<Self>) {
        let effects = self.core.resume(self.tick(Instant::now()));
        tracing::info!(device = %self.name, "I/O resumed");
        self.apply(effects, ctx);
    }
}

/// Refuse new requests from now on (shutdown).
#[derive(Message)]
#[rtype(result = "()")]
pub struct CloseDevice;

impl Handler<CloseDevice> for DeviceActor {
    type Result = ();
    fn handle(&mut self, _: CloseDevice, _: &mut Context<Self>) {
        self.core.close();
        self.publish();
    }
}

/// Resolves once nothing is admitted or held.
#[derive(Message)]
#[rtype(result = "()")]
pub struct WaitIdle;

impl Handler<WaitIdle> for DeviceActor {
    type Result = ResponseFuture<()>;
    fn handle(&mut self, _: WaitIdle, _: &mut Context<Self>) -> Self::Result {
        let (done, idle) = oneshot::channel();
        if self.core.is_idle() {
            let _ = done.send(());
        } else {
            self.idle_waiters.push(done);
        }
        Box::pin(async move {
            let _ = idle.await;
        })
    }
}

/// Makes every completed write durable in the local store (shutdown, role changes).
#[derive(Message)]
#[rtype(result = "Result<(), IoFault>")]
pub struct FlushStore;

impl Handler<FlushStore> for DeviceActor {
    type Result = ResponseFuture<Result<(), IoFault>>;
    fn handle(&mut self, _: FlushStore, _: &mut Context<Self>) -> Self::Result {
        let store = self.store.clone();
        Box::pin(async move {
            match tokio::task::spawn_blocking(move || store.flush()).await {
                Ok(Ok(())) => Ok(()),
                Ok(Err(error)) => Err(IoFault::LocalIo(error.raw_os_error().unwrap_or(EIO))),
                Err(_) => Err(IoFault::LocalIo(EIO)),
            }
        })
    }
}

/// Declares a configured peer (disconnected until `AttachPeer`).
#[derive(Message)]
#[rtype(result = "()")]
pub struct AddPeer {
    pub peer: PeerId,
    pub protocol: ReplicationProtocol,
}

impl Handler<AddPeer> for DeviceActor {
    type Result = ();
    fn handle(&mut self, msg: AddPeer, _: &mut Context<Self>) {
        self.core.add_peer(msg.peer, msg.protocol);
        let receiver = self.new_receiver(msg.protocol);
        self.peers.entry(msg.peer).or_insert_with(|| PeerPort {
            link: None,
            receiver,
            received: HashMap::new(),
            generation: 0,
        });
        self.publish();
    }
}

/// A connection to the peer is established: replicate to `link` from now on.
#[derive(Message)]
#[rtype(result = "()")]
pub struct AttachPeer {
    pub peer: PeerId,
    pub protocol: ReplicationProtocol,
    pub link: Recipient<ToPeer>,
}

impl Handler<AttachPeer> for DeviceActor {
    type Result = ();
    fn handle(&mut self, msg: AttachPeer, ctx: &mut Context<Self>) {
        if self
            .peers
            .get(&msg.peer)
            .is_some_and(|port| port.link.is_some())
        {
            self.detach_peer(msg.peer, ctx);
        }
        self.core.add_peer(msg.peer, msg.protocol);
        self.core.peer_connected(msg.peer);
        let receiver = self.new_receiver(msg.protocol);
        let fresh = self.new_receiver(msg.protocol);
        let port = self.peers.entry(msg.peer).or_insert_with(|| PeerPort {
            link: None,
            receiver,
            received: HashMap::new(),
            generation: 0,
        });
        port.link = Some(msg.link);
        port.receiver = fresh;
        port.received.clear();
        port.generation += 1;
        tracing::info!(device = %self.name, peer = msg.peer, "replicating to peer");
        self.publish();
    }
}

/// The connection to the peer is gone.
#[derive(Message)]
#[rtype(result = "()")]
pub struct DetachPeer {
    pub peer: PeerId,
}

impl Handler<DetachPeer> for DeviceActor {
    type Result = ();
    fn handle(&mut self, msg: DetachPeer, ctx: &mut Context<Self>) {
        if self
            .peers
            .get(&msg.peer)
            .is_some_and(|port| port.link.is_some())
        {
            tracing::info!(device = %self.name, peer = msg.peer, "peer detached; going on without it");
            self.detach_peer(msg.peer, ctx);
        }
    }
}

/// A message from the peer for this volume: a replicated write or barrier (data stream), or an
/// acknowledgement of ours (ack stream).
#[derive(Message)]
#[rtype(result = "()")]
pub struct FromPeer {
    pub peer: PeerId,
    pub message: PeerMessage,
    /// A share of the link's receive budget, held until the write is applied here: a slow
    /// local disk then stops the link reading, and QUIC flow control throttles the sender.
    pub budget: Option<OwnedSemaphorePermit>,
}

impl Handler<FromPeer> for DeviceActor {
    type Result = ();
    fn handle(
        &mut self,
        FromPeer {
            peer,
            message,
            budget,
        }: FromPeer,
        ctx: &mut Context<Self>,
    ) {
        let attached = self
            .peers
            .get(&peer)
            .is_some_and(|port| port.link.is_some());
        if !attached {
            return;
        }
        let now = self.tick(Instant::now());
        let outcome = match message {
            PeerMessage::Data {
                seq,
                epoch,
                request,
                offset,
                data,
            } => self.receive_write(
                peer,
                (seq, epoch, request),
                offset,
                ReceivedKind::Data(data),
                budget,
            ),
            PeerMessage::Discard {
                seq,
                epoch,
                request,
                offset,
                len,
            } => self.receive_write(
                peer,
                (seq, epoch, request),
                offset,
                ReceivedKind::Discard(len),
                budget,
            ),
            PeerMessage::Barrier {
                seq,
                epoch,
                writes,
                flush,
            } => match self.peers.get_mut(&peer) {
                Some(port) => port
                    .receiver
                    .on_barrier(seq, epoch, writes, flush)
                    .map(Some),
                None => Ok(None),
            },
            ack => match self.core.peer_ack(peer, &ack, now) {
                Ok(effects) => {
                    self.apply(effects, ctx);
                    Ok(None)
                }
                Err(error) => Err(error),
            },
        };
        match outcome {
            Ok(Some(effects)) => self.apply_received(peer, effects, ctx),
            Ok(None) => {}
            Err(error) => self.drop_peer(peer, error.to_string(), ctx),
        }
    }
}

impl DeviceActor {
    fn receive_write(
        &mut self,
        peer: PeerId,
        (seq, epoch, request): (u64, Epoch, u64),
        offset: u64,
        kind: ReceivedKind,
        budget: Option<OwnedSemaphorePermit>,
    ) -> Result<Option<Vec<ReceiverEffect>>, crate::core::replication::ProtocolError> {
        let Some(port) = self.peers.get_mut(&peer) else {
            return Ok(None);
        };
        let len = match &kind {
            ReceivedKind::Data(data) => data.len() as u64,
            ReceivedKind::Discard(_) => 0,
        };
        let (local, effects) = port.receiver.on_write(seq, epoch, request, len)?;
        port.received.insert(
            local,
            ReceivedWrite {
                offset,
                kind,
                _budget: budget,
            },
        );
        Ok(Some(effects))
    }
}

/// The peer's link handed a write to the transport (protocol A's completion condition).
#[derive(Message)]
#[rtype(result = "()")]
pub struct PeerSent {
    pub peer: PeerId,
    pub request: RequestId,
}

impl Handler<PeerSent> for DeviceActor {
    type Result = ();
    fn handle(&mut self, msg: PeerSent, ctx: &mut Context<Self>) {
        let effects = self
            .core
            .peer_sent(msg.peer, msg.request, self.tick(Instant::now()));
        self.apply(effects, ctx);
    }
}
