//! The protocol of one resource as one deterministic state machine (docs/protocol.md).
//!
//! [`ResourceCore`] owns the volume pipeline ([`DeviceCore`]), one [`Link`] per configured peer
//! (handshake, sending and receiving sides, liveness timers, backoff), the role and disk state,
//! the data generations, and the cluster-wide role changes. It reads no clock (the shell passes
//! the time with every input), does no I/O (it returns [`Effect`]s) and draws its random
//! identifiers from a generator the shell seeds, so a simulation of many nodes replays exactly.

use std::collections::{BTreeMap, BTreeSet, VecDeque};

mod bitmaps;
mod initial_sync;
mod resync;
mod sync_controller;
mod verify;

use resync::Resync;
pub use resync::{resync_direction, SideFacts, SyncConfig, SyncRole, SyncStatus};
pub use sync_controller::RateControl;
pub use verify::{BlockDigest, VerifyResult};

use super::activity_log::ActivityLog;
use super::device::{DeviceCore, VolumeEffect, HOLD_METADATA};
use super::generation::{compare_generations, Generations, SyncDecision, UuidSource};
use super::messages::{Epoch, PeerMessage, StreamKind, PROTOCOL_VERSION};
use super::replication::{Outgoing, PeerId, PeerReceiver, ReceiverEffect};
use super::split_brain::{resolve_split_brain, SplitBrainOutcome, SplitBrainSide};
use super::{
    ByteRange, ConnectionState, DiskState, IoFault, IoKind, ReplicationProtocol, RequestId, Role,
    Tick,
};
use crate::meta::{BitmapUpdate, DeviceMeta, StoredBitmaps};

/// One second in ticks (nanoseconds).
pub const SECOND: Tick = 1_000_000_000;
const MILLISECOND: Tick = 1_000_000;
/// Why a connection was dropped when a conflict between two primaries did not resolve in time.
pub const CONFLICT_TIMEOUT: &str =
    "a write postponed for a conflict waited too long for the peer's conflicting write";

/// Identifies an administrator's command until its [`Effect::CommandDone`].
pub type CommandId = u64;

/// The timers of the protocol, in ticks (nanoseconds).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Timing {
    /// Idle connections ping this often.
    pub ping_interval: Tick,
    /// A ping unanswered this long drops the connection.
    pub ping_timeout: Tick,
    /// A replicated request or barrier unanswered for `timeout` x `ko_count` drops the
    /// connection (DRBD's `timeout` and `ko-count`).
    pub timeout: Tick,
    pub ko_count: u32,
    /// The peer must complete the handshake within this time.
    pub handshake_timeout: Tick,
    /// Peers must answer a cluster-wide state change within this time.
    pub state_change_timeout: Tick,
    /// Redial delays after a failed connection attempt: doubling from min to max.
    pub min_backoff: Tick,
    pub max_backoff: Tick,
    /// Redial delay after the peer refused the handshake (it will likely refuse again).
    pub refused_backoff: Tick,
}

impl Default for Timing {
    fn default() -> Self {
        Timing {
            ping_interval: SECOND,
            ping_timeout: 4 * SECOND,
            timeout: 6 * SECOND,
            ko_count: 7,
            handshake_timeout: 10 * SECOND,
            state_change_timeout: 10 * SECOND,
            min_backoff: 200 * MILLISECOND,
            max_backoff: 5 * SECOND,
            refused_backoff: 10 * SECOND,
        }
    }
}

impl Timing {
    pub fn request_timeout(&self) -> Tick {
        self.timeout.saturating_mul(Tick::from(self.ko_count))
    }
}

/// A configured peer of the resource.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerConfig {
    pub id: PeerId,
    pub name: String,
}

/// What the core needs to know about its resource and node.
#[derive(Debug, Clone)]
pub struct CoreConfig {
    pub resource: String,
    pub node_id: u8,
    pub node_name: String,
    pub size_bytes: u64,
    pub protocol: ReplicationProtocol,
    /// Flush at every epoch boundary when applying a peer's writes (DRBD's `disk-flushes`).
    pub disk_flushes: bool,
    pub peers: Vec<PeerConfig>,
    pub timing: Timing,
    /// Seeds the generator of new generation identifiers.
    pub seed: u64,
    /// The activity log and resync.
    pub sync: SyncConfig,
    /// Both nodes of a connection may be Primary (protocol C only), when both configure it
    /// (docs/protocol.md, "Two primaries").
    pub allow_two_primaries: bool,
}

/// An administrator's command.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Command {
    Promote {
        force: bool,
    },
    Demote,
    SuspendIo,
    ResumeIo,
    /// Leave StandAlone. With `discard_my_data`, a split brain found at the next handshake
    /// makes this node the sync target of the peer (it loses what it wrote since the split).
    Connect {
        discard_my_data: bool,
    },
    Disconnect,
    /// Throw away this node's data: Inconsistent, and a full resync from the peer.
    Invalidate,
    /// Make the peer take every block from this node: a full resync to it.
    InvalidateRemote,
    /// Online verify: compare every block with the peer's, mark the differing ones out of
    /// sync.
    Verify,
    /// `new-current-uuid --clear-bitmap`: blank replicas are identical; skip the initial sync.
    SkipInitialSync,
    /// Refuse new I/O, finish in-flight I/O, flush, record a clean shutdown.
    Shutdown,
}

/// Why a command failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CommandError {
    #[error("another state change of this resource is in progress; try again")]
    Busy,
    #[error("local disk is {0}, not UpToDate; use --force to promote anyway")]
    DiskNotUpToDate(DiskState),
    #[error(
        "this replica was never synced (Inconsistent, fresh metadata): `primary --force` makes \
         its data the one every peer copies (the initial sync); if every replica is blank, run \
         `new-current-uuid --clear-bitmap` first to skip the copy"
    )]
    Blank,
    #[error("peer {0} is Primary; two primaries are not allowed (demote it first)")]
    PeerIsPrimary(String),
    #[error("peer {0} is becoming Primary; two primaries are not allowed")]
    LostRace(String),
    #[error("peer {peer} refused the state change: {reason}")]
    PeerRefused { peer: String, reason: String },
    #[error("peer {0} did not answer the state change in time")]
    PeerTimeout(String),
    #[error("no peer is connected, so a peer may hold newer data; use --force to promote anyway")]
    NoPeerConnected,
    #[error("writes from peer {0} are still being applied here; try again")]
    ApplyingPeerWrites(String),
    #[error("this node is catching up from {0} (SyncTarget); wait for the resync to finish, or disconnect first")]
    SyncTarget(String),
    #[error("{0}")]
    Refused(String),
    #[error("a resync with {0} is running; wait for it to finish, or disconnect first")]
    Resyncing(String),
    #[error("metadata update failed: {0}")]
    Meta(String),
    #[error("local I/O failed: {0}")]
    LocalIo(IoFault),
    #[error("the resource is going down")]
    GoingDown,
}

/// A write or discard received from a peer (its payload stays with the shell, under
/// `(peer, conn, seq)`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PeerWrite {
    pub seq: u64,
    pub epoch: Epoch,
    pub request: u64,
    pub offset: u64,
    pub len: u64,
    pub discard: bool,
    /// See [`PeerMessage::Data`].
    pub seen: u64,
}

/// What a [`Effect::Digest`] is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DigestPurpose {
    /// This node's verify.
    Verify,
    /// The peer's verify asked.
    VerifyForPeer,
    /// Checksum-based resync, the target's blocks (sent with the request).
    ResyncTarget,
    /// Checksum-based resync, the source's blocks (compared with the target's).
    ResyncSource,
}

/// Everything that can happen to a resource.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Input {
    /// An application request; `id` is chosen by the shell, unique among tracked requests.
    Submit {
        id: RequestId,
        kind: IoKind,
        range: ByteRange,
        start: Tick,
    },
    /// The local store finished request `id`.
    LocalDone {
        id: RequestId,
        result: Result<(), IoFault>,
    },
    /// Postpone request `id` as a peer's RetryWrite does, with no peer involved: the shells'
    /// tests of the retry path use it.
    Postpone { id: RequestId },
    /// A request the core postponed ([`Effect::Postponed`]) comes back through the retry
    /// actor, under its old id and with its original start time.
    Resubmit {
        id: RequestId,
        kind: IoKind,
        range: ByteRange,
        start: Tick,
    },
    /// A transport connection to `peer` is up; `conn` names it from now on.
    TransportUp { peer: PeerId, conn: u64 },
    /// Connection `conn` to `peer` is gone.
    TransportDown {
        peer: PeerId,
        conn: u64,
        reason: String,
    },
    /// A dial the core asked for failed before a connection existed.
    DialFailed { peer: PeerId, reason: String },
    /// A write or discard arrived on connection `conn`.
    PeerWrite {
        peer: PeerId,
        conn: u64,
        write: PeerWrite,
    },
    /// Any other message arrived on connection `conn`.
    PeerMessage {
        peer: PeerId,
        conn: u64,
        message: PeerMessage,
    },
    /// The transport took a protocol-A write.
    PeerSent { peer: PeerId, request: RequestId },
    /// A received write (see [`Effect::ApplyPeerWrite`]) is on the local store.
    PeerWriteApplied {
        peer: PeerId,
        conn: u64,
        seq: u64,
        result: Result<(), i32>,
    },
    /// The flush for a peer's epoch (see [`Effect::FlushForPeer`]) finished.
    PeerFlushed {
        peer: PeerId,
        conn: u64,
        epoch: Epoch,
    },
    /// A [`Effect::FlushLocal`] finished.
    LocalFlushed {
        token: u64,
        result: Result<(), IoFault>,
    },
    /// A [`Effect::Persist`] finished.
    Persisted {
        version: u64,
        result: Result<(), String>,
    },
    /// A [`Effect::SendResyncData`] finished: the blocks were read and handed to the
    /// transport, or the read failed (errno).
    ResyncSent {
        peer: PeerId,
        conn: u64,
        offset: u64,
        len: u64,
        result: Result<(), i32>,
    },
    /// A sync source's `ResyncData` arrived on connection `conn`; the shell holds its payload
    /// under `(peer, conn, offset)`.
    ResyncData {
        peer: PeerId,
        conn: u64,
        offset: u64,
        len: u64,
    },
    /// A [`Effect::ApplyResyncWrite`] finished.
    ResyncWriteDone {
        peer: PeerId,
        conn: u64,
        offset: u64,
        len: u64,
        result: Result<(), i32>,
    },
    /// A [`Effect::Digest`] finished: one digest per 4 KiB block, or the errno of the read.
    Digested {
        peer: PeerId,
        conn: u64,
        offset: u64,
        len: u64,
        purpose: DigestPurpose,
        result: Result<Vec<BlockDigest>, i32>,
    },
    /// A [`Effect::PersistBitmaps`] finished.
    BitmapsPersisted {
        version: u64,
        result: Result<(), String>,
    },
    /// Time passed (timers fire).
    Tick,
    /// An administrator's command.
    Command { id: CommandId, command: Command },
}

/// What the shell must do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Effect {
    /// Submit request `id` to the local store, then report [`Input::LocalDone`].
    StartLocal(RequestId),
    /// Reply to the application; the core has forgotten the request.
    Complete(RequestId, Result<(), IoFault>),
    /// The request was postponed and forgotten: hand it to the retry actor.
    Postponed(RequestId),
    /// Send a replicated write, discard or barrier (data and discards carry the request's
    /// bytes, which the shell holds) on the peer's data stream.
    SendData { peer: PeerId, outgoing: Outgoing },
    /// Send a message to the peer (on the stream [`PeerMessage::on_data_stream`] names).
    Send { peer: PeerId, message: PeerMessage },
    /// Write the received payload `(peer, conn, write.seq)` to the local store, then report
    /// [`Input::PeerWriteApplied`].
    ApplyPeerWrite {
        peer: PeerId,
        conn: u64,
        write: PeerWrite,
    },
    /// Sync source: read these blocks from the local store and send them to the peer as
    /// `ResyncData` on connection `conn`, then report [`Input::ResyncSent`].
    SendResyncData {
        peer: PeerId,
        conn: u64,
        offset: u64,
        len: u64,
    },
    /// Sync target: write the received resync payload `(peer, conn, offset)` to the local
    /// store (and drop it), then report [`Input::ResyncWriteDone`].
    ApplyResyncWrite {
        peer: PeerId,
        conn: u64,
        offset: u64,
        len: u64,
    },
    /// Read these blocks and digest each 4 KiB block (SHA-256), then report
    /// [`Input::Digested`] (online verify, checksum-based resync).
    Digest {
        peer: PeerId,
        conn: u64,
        offset: u64,
        len: u64,
        purpose: DigestPurpose,
    },
    /// The received payload `(peer, conn, seq)` will never be applied: drop it.
    ForgetPayload { peer: PeerId, conn: u64, seq: u64 },
    /// Make every applied write durable, then report [`Input::PeerFlushed`].
    FlushForPeer {
        peer: PeerId,
        conn: u64,
        epoch: Epoch,
    },
    /// Make every completed local write durable, then report [`Input::LocalFlushed`].
    FlushLocal { token: u64 },
    /// Make this metadata durable, then report [`Input::Persisted`] with `version`.
    Persist { version: u64, meta: DeviceMeta },
    /// Make this transaction of the bitmaps and the activity log durable, then report
    /// [`Input::BitmapsPersisted`] with `version`. Versions increase; the shell carries out
    /// these transactions in order.
    PersistBitmaps { version: u64, update: BitmapUpdate },
    /// Open a transport connection to the peer (report [`Input::TransportUp`] or
    /// [`Input::DialFailed`]).
    Dial { peer: PeerId },
    /// Close connection `conn` to the peer (and drop every payload received on it).
    CloseConnection {
        peer: PeerId,
        conn: u64,
        reason: String,
    },
    /// An administrator's command finished.
    CommandDone {
        id: CommandId,
        result: Result<String, CommandError>,
    },
    /// A state change, as one `events` line.
    Event(String),
}

/// The observable state of a link.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LinkStatus {
    pub peer: PeerId,
    pub name: String,
    pub connection: ConnectionState,
    pub role: Option<Role>,
    pub disk: Option<DiskState>,
    pub peer_current_uuid: u64,
    /// Why the last handshake or connection failed.
    pub last_error: Option<String>,
    pub out_of_sync_bytes: u64,
    pub unacked: u64,
    pub pending: u64,
    pub sent_bytes: u64,
    pub received_bytes: u64,
    /// The resync with this peer, while one runs.
    pub sync: Option<SyncStatus>,
    /// Bytes resynced with this peer since the resource came up (sent as source or written
    /// as target), over every connection.
    pub resynced_bytes: u64,
    /// Bytes a checksum-based resync found the same on both sides (nothing moved).
    pub resync_same_bytes: u64,
    /// The running online verify, or the last one.
    pub verify: Option<VerifyResult>,
}

/// A borrowed view of one link's observable state.
pub struct LinkView<'a> {
    link: &'a Link,
    sender: Option<&'a super::replication::PeerSender>,
}

impl LinkView<'_> {
    pub fn to_status(&self) -> LinkStatus {
        let mut status = LinkStatus {
            peer: self.link.id,
            name: self.link.name.clone(),
            connection: self.link.state,
            role: None,
            disk: None,
            peer_current_uuid: 0,
            last_error: None,
            out_of_sync_bytes: 0,
            unacked: 0,
            pending: 0,
            sent_bytes: 0,
            received_bytes: 0,
            sync: None,
            resynced_bytes: 0,
            resync_same_bytes: 0,
            verify: None,
        };
        self.update(&mut status);
        status
    }

    /// Brings `status` up to date, copying strings only when they changed.
    pub fn update(&self, status: &mut LinkStatus) {
        let (link, sender) = (self.link, self.sender);
        status.peer = link.id;
        if status.name != link.name {
            status.name.clone_from(&link.name);
        }
        status.connection = link.state;
        status.role = link.role;
        status.disk = link.disk;
        status.peer_current_uuid = link.current_uuid;
        if status.last_error != link.last_error {
            status.last_error.clone_from(&link.last_error);
        }
        status.out_of_sync_bytes = sender.map_or(0, |s| s.out_of_sync.dirty_bytes());
        status.unacked = sender.map_or(0, |s| s.unacked_writes());
        status.pending = link.receiver.pending();
        status.sent_bytes = sender.map_or(0, |s| s.sent_bytes);
        status.received_bytes = link.receiver.received_bytes;
        status.resynced_bytes = link.resynced_bytes;
        status.resync_same_bytes = link.resync_same_bytes;
        // This runs after every request: clone only when the verify result changed.
        let verify = ResourceCore::verify_status(link);
        if status.verify.as_ref() != verify {
            status.verify = verify.cloned();
        }
        match (&mut status.sync, link.resync.as_ref()) {
            (Some(shown), Some(resync)) => resync.update_status(shown),
            (shown, resync) => *shown = resync.map(|r| r.status()),
        }
    }
}

#[derive(Debug)]
struct Link {
    id: PeerId,
    name: String,
    dials: bool,
    state: ConnectionState,
    /// StandAlone by the administrator's `disconnect` or by a refusal that retrying cannot
    /// fix (two primaries, split brain, unrelated data): no redial until `connect`.
    standalone: bool,
    conn: Option<u64>,
    handshake_since: Option<Tick>,
    /// A dial was asked for at this time and has not been answered.
    dialing: Option<Tick>,
    next_dial: Tick,
    backoff: Tick,
    last_error: Option<String>,
    role: Option<Role>,
    disk: Option<DiskState>,
    current_uuid: u64,
    receiver: PeerReceiver,
    // Liveness.
    last_ping: Tick,
    ping_nonce: u64,
    ping_outstanding: Option<Tick>,
    /// Replicated writes (protocols B and C, by data-stream sequence number) and barriers
    /// not yet answered, with when they were sent. Numbers and epochs grow with time, so the
    /// first entry is the oldest.
    awaiting_writes: BTreeMap<u64, Tick>,
    awaiting_barriers: BTreeMap<Epoch, Tick>,
    /// Data-stream messages that overtook the peer's Hello (the streams are independent:
    /// the peer may have finished its side of the handshake and sent its State, or even
    /// writes, before its Hello reaches us); replayed in order once the handshake completes.
    early: Vec<Early>,
    /// The peer's Hello, waiting for the writes of a lost connection to land.
    deferred_hello: Option<PeerMessage>,
    /// The peer's generation history (from its Hello and State): a sync target adopts it.
    peer_history: Vec<u64>,
    resync: Option<Resync>,
    resynced_bytes: u64,
    resync_same_bytes: u64,
    /// `connect --discard-my-data` (until the next handshake that settles a split brain).
    discard_my_data: bool,
    /// The out-of-sync count this node's Hello on the current connection carried.
    hello_changes: u64,
    /// Role, disk and generations as this node's Hello on the current connection told them.
    sent_hello_facts: Option<HelloFacts>,
    verify: Option<verify::Verify>,
    last_verify: Option<VerifyResult>,
}

/// What a Hello told of its sender.
#[derive(Debug, Clone, PartialEq, Eq)]
struct HelloFacts {
    role: Role,
    disk: DiskState,
    current_uuid: u64,
    bitmap_uuid: u64,
    history: Vec<u64>,
    discard_my_data: bool,
    primary_before_split: bool,
    resuming_initial_sync: bool,
}

/// A data-stream arrival kept until the handshake completes.
#[derive(Debug)]
enum Early {
    Message(PeerMessage),
    Write(PeerWrite),
}

/// At most this many data-stream messages may overtake the peer's Hello.
const MAX_EARLY: usize = 4096;

impl Link {
    fn is_connected(&self) -> bool {
        self.state == ConnectionState::Connected
    }
}

/// A cluster-wide promotion this node started.
#[derive(Debug)]
struct Promotion {
    command: CommandId,
    transaction: u64,
    force: bool,
    outdate_peers: bool,
    /// Peers asked and not yet answered.
    awaiting: BTreeSet<PeerId>,
    /// Peers asked (they get the commit or the abort).
    asked: BTreeSet<PeerId>,
    deadline: Tick,
    /// Set once every peer agreed: the metadata version that must be durable first.
    persisting: Option<u64>,
}

/// A peer's promotion this node agreed to, until its commit or abort.
#[derive(Debug, Clone, Copy)]
struct Prepared {
    peer: PeerId,
    transaction: u64,
    outdate_peers: bool,
    deadline: Tick,
}

#[derive(Debug)]
enum Change {
    None,
    Promoting(Promotion),
    /// Waiting for in-flight requests to drain, then the local flush, then the metadata.
    Demoting {
        command: CommandId,
        step: DrainStep,
    },
    ShuttingDown {
        command: CommandId,
        step: DrainStep,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum DrainStep {
    Draining,
    Flushing(u64),
    /// A clean shutdown stores every changed piece of the bitmaps first.
    StoringBitmaps,
    Persisting(u64),
}

/// What waits for a metadata version to become durable.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum MetaWaiter {
    /// I/O held until a new generation (or the in-use mark) is durable.
    ReleaseIo,
    /// A sync target's Inconsistent mark must be durable before its first resync write.
    ResyncTarget(PeerId),
    /// A command is answered once its change is durable.
    CommandDone(CommandId),
}

/// The protocol of one resource.
#[derive(Debug)]
pub struct ResourceCore {
    config: CoreConfig,
    device: DeviceCore,
    links: BTreeMap<PeerId, Link>,
    role: Role,
    disk: DiskState,
    meta: DeviceMeta,
    uuids: UuidSource,
    /// The last metadata version handed out for persisting.
    meta_version: u64,
    meta_waiters: Vec<(u64, MetaWaiter)>,
    change: Change,
    prepared: Option<Prepared>,
    next_transaction: u64,
    next_token: u64,
    going_down: bool,
    down: bool,
    /// The previous run stopped without recording a clean shutdown.
    crashed: bool,
    /// The received writes not yet applied, by (peer, seq).
    received_writes: BTreeMap<(PeerId, u64), PeerWrite>,
    /// Peer writes at the local store (or waiting for the activity log), by (peer, conn, seq),
    /// with their ranges: those of a lost connection still land, so nothing newer may be
    /// written over them before they did, and their extents stay hot in the activity log.
    at_store: BTreeMap<(PeerId, u64, u64), ByteRange>,
    /// Received writes waiting, in order, for an overlapping local write (two primaries) or
    /// for their extents to be made hot.
    peer_writes_waiting: VecDeque<bitmaps::QueuedPeerWrite>,
    effects: VecDeque<Effect>,
    /// The time of the input being handled.
    now: Tick,
    bitmap_writer: bitmaps::BitmapWriter,
    /// Resync writes waiting for the activity log: (peer, conn, offset, len).
    resync_writes_waiting: Vec<(PeerId, u64, u64, u64)>,
}

impl ResourceCore {
    /// A resource coming up with its stored metadata. It comes up Secondary; the first
    /// effects mark the metadata in use (I/O waits until that is durable) and dial the peers.
    pub fn new(config: CoreConfig, meta: DeviceMeta, now: Tick) -> Self {
        Self::restore(config, meta, StoredBitmaps::default(), now)
    }

    /// Like [`Self::new`], with the stored out-of-sync bitmaps and activity log.
    pub fn restore(config: CoreConfig, meta: DeviceMeta, stored: StoredBitmaps, now: Tick) -> Self {
        let mut device = DeviceCore::new(config.size_bytes, false);
        for peer in &config.peers {
            device.add_peer(peer.id, config.protocol);
        }
        if !config.peers.is_empty() {
            device.set_activity_log(ActivityLog::new(
                config.sync.al_extents,
                &stored.activity_log,
            ));
        }
        for chunk in &stored.chunks {
            match device.out_of_sync_mut(chunk.peer) {
                Some(bitmap) => bitmap.load(chunk),
                None => tracing::warn!(resource = %config.resource, node = chunk.peer,
                    "ignoring the stored bitmap of a node that is no longer a peer"),
            }
        }
        if !meta.flags.clean_shutdown {
            // Writes may have been in flight in every hot extent: out of sync for every peer.
            let hot: Vec<u64> = device.activity_log().hot_extents().collect();
            let peers: Vec<PeerId> = device.peer_ids().collect();
            for peer in peers {
                if let Some(bitmap) = device.out_of_sync_mut(peer) {
                    for extent in &hot {
                        bitmap.mark_extent(*extent);
                    }
                }
            }
        }
        let mut meta = meta;
        let crashed = !meta.flags.clean_shutdown;
        if crashed && !config.peers.is_empty() {
            // A peer may have gone on without us: only a connected UpToDate peer or --force
            // makes this data current again (docs/protocol.md, "Disk states").
            meta.flags.unconfirmed = true;
            meta.flags.crashed_primary |= meta.flags.was_primary;
        }
        let disk = if !meta.flags.consistent {
            DiskState::Inconsistent
        } else if !meta.flags.up_to_date {
            DiskState::Outdated
        } else if meta.flags.unconfirmed {
            DiskState::Consistent
        } else {
            DiskState::UpToDate
        };
        let links = config
            .peers
            .iter()
            .map(|peer| {
                let link = Link {
                    id: peer.id,
                    name: peer.name.clone(),
                    dials: config.node_id < peer.id,
                    state: ConnectionState::Connecting,
                    standalone: false,
                    conn: None,
                    handshake_since: None,
                    dialing: None,
                    next_dial: now,
                    backoff: config.timing.min_backoff,
                    last_error: None,
                    role: None,
                    disk: None,
                    current_uuid: 0,
                    receiver: new_receiver(&config),
                    last_ping: now,
                    ping_nonce: 0,
                    ping_outstanding: None,
                    awaiting_writes: BTreeMap::new(),
                    awaiting_barriers: BTreeMap::new(),
                    early: Vec::new(),
                    deferred_hello: None,
                    peer_history: Vec::new(),
                    resync: None,
                    resynced_bytes: 0,
                    resync_same_bytes: 0,
                    discard_my_data: false,
                    hello_changes: 0,
                    sent_hello_facts: None,
                    verify: None,
                    last_verify: None,
                };
                (peer.id, link)
            })
            .collect();
        let uuids = UuidSource::new(config.seed);
        let mut core = ResourceCore {
            config,
            device,
            links,
            role: Role::Secondary,
            disk,
            meta,
            uuids,
            meta_version: 0,
            meta_waiters: Vec::new(),
            change: Change::None,
            prepared: None,
            next_transaction: 1,
            next_token: 1,
            going_down: false,
            down: false,
            crashed,
            received_writes: BTreeMap::new(),
            at_store: BTreeMap::new(),
            peer_writes_waiting: VecDeque::new(),
            effects: VecDeque::new(),
            now,
            bitmap_writer: bitmaps::BitmapWriter::default(),
            resync_writes_waiting: Vec::new(),
        };
        if crashed {
            tracing::warn!(resource = %core.config.resource, "the previous run did not shut down cleanly");
        }
        core.meta.flags.clean_shutdown = false;
        core.meta.flags.was_primary = false;
        core.device.hold(HOLD_METADATA);
        core.persist(Some(MetaWaiter::ReleaseIo));
        core.dial_due(now);
        core
    }

    /// The next effect to carry out, in order.
    pub fn poll_effect(&mut self) -> Option<Effect> {
        self.effects.pop_front()
    }

    /// Every pending effect, in order.
    pub fn drain_effects(&mut self) -> impl Iterator<Item = Effect> + '_ {
        self.effects.drain(..)
    }

    pub fn role(&self) -> Role {
        self.role
    }

    pub fn disk(&self) -> DiskState {
        self.disk
    }

    pub fn meta(&self) -> &DeviceMeta {
        &self.meta
    }

    pub fn device(&self) -> &DeviceCore {
        &self.device
    }

    pub fn config(&self) -> &CoreConfig {
        &self.config
    }

    /// The resource went down (a shutdown finished); it takes no more inputs.
    pub fn is_down(&self) -> bool {
        self.down
    }

    /// The current generation identifiers.
    pub fn generations(&self) -> Generations {
        generations_of(&self.meta)
    }

    pub fn links(&self) -> impl Iterator<Item = LinkStatus> + '_ {
        self.links_view().map(|view| view.to_status())
    }

    /// The links as borrowed views, for a status snapshot updated in place.
    pub fn links_view(&self) -> impl Iterator<Item = LinkView<'_>> + '_ {
        self.links.values().map(|link| LinkView {
            link,
            sender: self.device.peer(link.id),
        })
    }

    pub fn link(&self, peer: PeerId) -> Option<LinkStatus> {
        self.links().find(|link| link.peer == peer)
    }

    /// Whether a cluster-wide or local state change is under way.
    pub fn is_changing(&self) -> bool {
        !matches!(self.change, Change::None)
    }

    /// Carries out one input at time `now`; the effects queue up for [`Self::poll_effect`].
    pub fn handle(&mut self, now: Tick, input: Input) {
        self.now = now;
        if self.down {
            if let Input::Command { id, .. } = input {
                self.done(id, Err(CommandError::GoingDown));
            }
            return;
        }
        match input {
            Input::Submit {
                id,
                kind,
                range,
                start,
            } => self.submit(id, kind, range, start),
            Input::LocalDone { id, result } => {
                let effects = self.device.local_done(id, result, now);
                self.volume_effects(effects, now);
            }
            Input::Postpone { id } => {
                let effects = self.device.postpone(id, now);
                self.volume_effects(effects, now);
            }
            Input::Resubmit {
                id,
                kind,
                range,
                start,
            } => {
                if kind.modifies_data() && self.role == Role::Primary {
                    self.start_generation_if_needed(false, false);
                }
                let effects = self.device.resubmit(id, kind, range, start);
                self.volume_effects(effects, now);
            }
            Input::TransportUp { peer, conn } => self.transport_up(peer, conn, now),
            Input::TransportDown { peer, conn, reason } => {
                if self.current_conn(peer) == Some(conn) {
                    tracing::warn!(resource = %self.config.resource, peer = %self.peer_name(peer), %reason, "connection lost");
                    self.lose_link(peer, ConnectionState::NetworkFailure, reason, now);
                }
            }
            Input::DialFailed { peer, reason } => self.dial_failed(peer, reason, now),
            Input::PeerWrite { peer, conn, write } => self.peer_write(peer, conn, write, now),
            Input::PeerMessage {
                peer,
                conn,
                message,
            } => {
                if self.current_conn(peer) == Some(conn) {
                    self.peer_message(peer, message, now);
                }
            }
            Input::PeerSent { peer, request } => {
                if self.links.get(&peer).is_some_and(Link::is_connected) {
                    let effects = self.device.peer_sent(peer, request, now);
                    self.volume_effects(effects, now);
                }
            }
            Input::PeerWriteApplied {
                peer,
                conn,
                seq,
                result,
            } => {
                let range = self.at_store.remove(&(peer, conn, seq));
                let current = self.current_conn(peer) == Some(conn);
                // Only two primaries' writes need to tell which received writes they follow
                // (and only their protocol C acknowledgements prune the record). Recorded
                // before the local writes that waited for it start: they follow it.
                if current && self.config.allow_two_primaries && result.is_ok() {
                    if let Some(range) = range {
                        self.device.note_landed(peer, seq, range);
                    }
                }
                let effects = self.device.received_landed((peer, conn, seq));
                self.volume_effects(effects, now);
                if current {
                    if let Some(link) = self.links.get_mut(&peer) {
                        let effects = link.receiver.local_done(seq, result);
                        self.receiver_effects(peer, effects, now);
                    }
                }
                self.resume_deferred_hellos(now);
            }
            Input::PeerFlushed { peer, conn, epoch } => {
                if self.current_conn(peer) == Some(conn) {
                    if let Some(link) = self.links.get_mut(&peer) {
                        match link.receiver.flush_done(epoch) {
                            Ok(effects) => self.receiver_effects(peer, effects, now),
                            Err(error) => self.protocol_error(peer, error.0, now),
                        }
                    }
                }
            }
            Input::LocalFlushed { token, result } => self.local_flushed(token, result, now),
            Input::Persisted { version, result } => self.persisted(version, result, now),
            Input::BitmapsPersisted { version, result } => {
                self.bitmaps_persisted(version, result, now)
            }
            Input::ResyncSent {
                peer,
                conn,
                offset,
                len,
                result,
            } => self.resync_sent(peer, conn, offset, len, result, now),
            Input::ResyncData {
                peer,
                conn,
                offset,
                len,
            } => self.resync_data(peer, conn, offset, len, now),
            Input::ResyncWriteDone {
                peer,
                conn,
                offset,
                len,
                result,
            } => self.resync_write_done(peer, conn, offset, len, result, now),
            Input::Digested {
                peer,
                conn,
                offset,
                len,
                purpose,
                result,
            } => self.digested(
                peer,
                conn,
                ByteRange::new(offset, len),
                purpose,
                result,
                now,
            ),
            Input::Tick => self.tick(now),
            Input::Command { id, command } => self.command(id, command, now),
        }
        if !self.peer_writes_waiting.is_empty() {
            // A local write answered, finished or handed back may let a received one go on.
            self.release_peer_writes(false, now);
        }
        self.resync_after_input();
        self.pump_bitmaps(now);
        self.progress_drain(now);
    }

    // ----- application I/O -----

    fn submit(&mut self, id: RequestId, kind: IoKind, range: ByteRange, start: Tick) {
        if kind.modifies_data() && self.role == Role::Primary {
            self.start_generation_if_needed(false, false);
        }
        let effects = self.device.submit_as(id, kind, range, start);
        self.volume_effects(effects, start);
    }

    /// A Primary that writes without some peer starts a new data generation first; the old
    /// one becomes that peer's bitmap identifier (docs/protocol.md, "Data generations").
    /// I/O waits until the new identifiers are durable.
    /// `at_promotion`: the generation starts because this node is being promoted (not because
    /// a Primary writes); recorded for `discard-younger-primary` when a split begins here.
    fn start_generation_if_needed(&mut self, force: bool, at_promotion: bool) {
        let absent: Vec<PeerId> = self
            .links
            .values()
            .filter(|link| {
                !link.is_connected() && self.meta.bitmap_uuids.get(&link.id).is_none_or(|u| *u == 0)
            })
            .map(|link| link.id)
            .collect();
        if absent.is_empty() && !force {
            return;
        }
        let mut generations = generations_of(&self.meta);
        let new = self.uuids.next_uuid();
        let split_begins = absent.iter().any(|peer| generations.bitmap_for(*peer) == 0);
        if split_begins {
            self.meta.flags.primary_before_split = !at_promotion;
        }
        generations.start_new(new, absent);
        set_generations(&mut self.meta, &generations);
        tracing::info!(resource = %self.config.resource, generation = %format!("{new:016X}"), "new data generation");
        self.emit(format!(
            "change resource name:{} current-uuid:{new:016X}",
            self.config.resource
        ));
        self.device.hold(HOLD_METADATA);
        self.persist(Some(MetaWaiter::ReleaseIo));
        self.restart_handshakes("a new data generation started during the handshake");
        self.announce_state();
    }

    /// The Hello this node sent on a link still in its handshake no longer tells its role or
    /// generation: both sides would decide on stale facts, so the handshake starts over.
    /// What a Hello to `peer` tells of this node, for [`Self::hello`]'s staleness check.
    fn hello_facts(&self, peer: PeerId) -> HelloFacts {
        HelloFacts {
            role: self.role,
            disk: self.disk,
            current_uuid: self.meta.current_uuid,
            bitmap_uuid: self.meta.bitmap_uuids.get(&peer).copied().unwrap_or(0),
            history: self.meta.history_uuids.clone(),
            discard_my_data: self.links.get(&peer).is_some_and(|l| l.discard_my_data),
            primary_before_split: self.meta.flags.primary_before_split,
            resuming_initial_sync: self.resuming_initial_sync(),
        }
    }

    /// Drops one link in its handshake and redials at once: nothing is wrong with the peer.
    fn restart_handshake(&mut self, peer: PeerId, reason: &str, now: Tick) {
        self.lose_link(
            peer,
            ConnectionState::NetworkFailure,
            reason.to_owned(),
            now,
        );
        if let Some(link) = self.links.get_mut(&peer) {
            link.next_dial = now;
        }
    }

    fn restart_handshakes(&mut self, reason: &str) {
        let now = self.now;
        let handshaking: Vec<PeerId> = self
            .links
            .values()
            .filter(|link| link.handshake_since.is_some())
            .map(|link| link.id)
            .collect();
        for peer in handshaking {
            self.restart_handshake(peer, reason, now);
        }
    }

    fn volume_effects(&mut self, effects: Vec<VolumeEffect>, now: Tick) {
        for effect in effects {
            match effect {
                VolumeEffect::StartLocal(id) => self.effects.push_back(Effect::StartLocal(id)),
                VolumeEffect::Complete(id, result) => {
                    self.effects.push_back(Effect::Complete(id, result))
                }
                VolumeEffect::Postponed(id) => self.effects.push_back(Effect::Postponed(id)),
                VolumeEffect::Send(peer, outgoing) => {
                    if let Some(link) = self.links.get_mut(&peer) {
                        match outgoing {
                            Outgoing::Data { seq, .. } | Outgoing::Discard { seq, .. }
                                if self.config.protocol != ReplicationProtocol::A =>
                            {
                                link.awaiting_writes.insert(seq, now);
                            }
                            Outgoing::Barrier { epoch, .. } => {
                                link.awaiting_barriers.insert(epoch, now);
                            }
                            _ => {}
                        }
                    }
                    self.effects.push_back(Effect::SendData { peer, outgoing });
                }
            }
        }
    }

    // ----- receiving -----

    fn peer_write(&mut self, peer: PeerId, conn: u64, write: PeerWrite, now: Tick) {
        self.application_write_during_resync(peer, now);
        if self.current_conn(peer) != Some(conn) {
            self.effects.push_back(Effect::ForgetPayload {
                peer,
                conn,
                seq: write.seq,
            });
            return;
        }
        let Some(link) = self.links.get_mut(&peer) else {
            return;
        };
        if link.handshake_since.is_some() && link.early.len() < MAX_EARLY {
            link.early.push(Early::Write(write));
            return;
        }
        // A Secondary is written only by its Primary peer (docs/protocol.md, "Who may write").
        let refusal = if !link.is_connected() {
            Some("a write arrived before the handshake completed".to_owned())
        } else if link.role != Some(Role::Primary) {
            Some(format!(
                "peer {} sent a write while it is not Primary",
                link.name
            ))
        } else if self.role == Role::Primary && !self.config.allow_two_primaries {
            Some(format!(
                "peer {} sent a write to this node, which is Primary",
                link.name
            ))
        } else if write
            .offset
            .checked_add(write.len)
            .is_none_or(|end| end > self.config.size_bytes)
        {
            Some(format!(
                "peer {} sent a write at {}+{} beyond the end of the volume ({} bytes)",
                link.name, write.offset, write.len, self.config.size_bytes
            ))
        } else {
            None
        };
        if let Some(reason) = refusal {
            self.effects.push_back(Effect::ForgetPayload {
                peer,
                conn,
                seq: write.seq,
            });
            self.protocol_error(peer, reason, now);
            return;
        }
        let Some(link) = self.links.get_mut(&peer) else {
            return;
        };
        let counted = if write.discard { 0 } else { write.len };
        match link
            .receiver
            .on_write(write.seq, write.epoch, write.request, counted)
        {
            Ok((_, effects)) => {
                // The receiver names the write by its sequence number; the shell finds the
                // payload under it.
                self.received_writes.insert((peer, write.seq), write);
                self.receiver_effects(peer, effects, now);
            }
            Err(error) => {
                self.effects.push_back(Effect::ForgetPayload {
                    peer,
                    conn,
                    seq: write.seq,
                });
                self.protocol_error(peer, error.0, now);
            }
        }
    }

    fn receiver_effects(&mut self, peer: PeerId, effects: Vec<ReceiverEffect>, now: Tick) {
        let Some(conn) = self.current_conn(peer) else {
            return;
        };
        for effect in effects {
            match effect {
                ReceiverEffect::Apply(seq) => {
                    if let Some(write) = self.received_writes.remove(&(peer, seq)) {
                        if self.disk != DiskState::UpToDate {
                            // This node's generation does not describe its data while it is
                            // not UpToDate: what it takes from one peer may differ from what
                            // another has.
                            let range = ByteRange::new(write.offset, write.len);
                            let others: Vec<PeerId> =
                                self.device.peer_ids().filter(|p| *p != peer).collect();
                            for other in others {
                                self.device.mark_out_of_sync(other, range);
                            }
                        }
                        self.apply_peer_write(peer, conn, write);
                    }
                }
                ReceiverEffect::Flush(epoch) => {
                    self.effects
                        .push_back(Effect::FlushForPeer { peer, conn, epoch })
                }
                ReceiverEffect::EpochWritten(epoch) => {
                    let Some(link) = self.links.get_mut(&peer) else {
                        continue;
                    };
                    match link.receiver.flush_done(epoch) {
                        Ok(more) => self.receiver_effects(peer, more, now),
                        Err(error) => {
                            self.protocol_error(peer, error.0, now);
                            return;
                        }
                    }
                }
                ReceiverEffect::Ack(message) => {
                    let acked = match message {
                        PeerMessage::WriteAck { up_to } => Some(up_to),
                        _ => None,
                    };
                    self.effects.push_back(Effect::Send { peer, message });
                    if let Some(up_to) = acked.filter(|_| self.config.allow_two_primaries) {
                        let effects = self.device.acknowledged_peer_writes(peer, up_to, now);
                        self.volume_effects(effects, now);
                    }
                }
            }
        }
    }

    fn peer_message(&mut self, peer: PeerId, message: PeerMessage, now: Tick) {
        let connected = self.links.get(&peer).is_some_and(Link::is_connected);
        match message {
            PeerMessage::Hello { .. } => self.hello(peer, &message, now),
            PeerMessage::Refused { reason, standalone } => {
                let reason = format!(
                    "peer {} refused the connection: {reason}",
                    self.peer_name(peer)
                );
                tracing::warn!(resource = %self.config.resource, %reason, "handshake refused");
                self.refused(peer, reason, standalone, now);
            }
            _ if !connected
                && message.stream() != StreamKind::Control
                && self.links.get(&peer).is_some_and(|link| {
                    link.handshake_since.is_some() && link.early.len() < MAX_EARLY
                }) =>
            {
                if let Some(link) = self.links.get_mut(&peer) {
                    link.early.push(Early::Message(message));
                }
            }
            _ if !connected => {
                self.protocol_error(
                    peer,
                    format!("{} before the handshake completed", message.name()),
                    now,
                );
            }
            PeerMessage::Ping { nonce } => self.effects.push_back(Effect::Send {
                peer,
                message: PeerMessage::PingAck { nonce },
            }),
            PeerMessage::PingAck { nonce } => {
                if let Some(link) = self.links.get_mut(&peer) {
                    if nonce == link.ping_nonce {
                        link.ping_outstanding = None;
                    }
                }
            }
            PeerMessage::State {
                role,
                disk,
                current_uuid,
                bitmap_uuids,
                history_uuids,
                receiver_missing_bytes,
            } => {
                let generations = Generations {
                    current: current_uuid,
                    bitmap: bitmap_uuids.into_iter().filter(|(_, u)| *u != 0).collect(),
                    history: history_uuids,
                };
                self.peer_state(peer, role, disk, generations, receiver_missing_bytes, now)
            }
            ack @ (PeerMessage::RecvAck { .. }
            | PeerMessage::WriteAck { .. }
            | PeerMessage::NegAck { .. }
            | PeerMessage::BarrierAck { .. }) => {
                if let Some(link) = self.links.get_mut(&peer) {
                    match ack {
                        PeerMessage::RecvAck { up_to } | PeerMessage::WriteAck { up_to } => {
                            // A number never sent is refused by the device core below.
                            link.awaiting_writes =
                                link.awaiting_writes.split_off(&up_to.saturating_add(1));
                        }
                        // The WriteAck that follows covers it (docs/protocol.md, "Completion").
                        PeerMessage::NegAck { .. } => {}
                        PeerMessage::BarrierAck { epoch, .. } => {
                            link.awaiting_barriers.retain(|e, _| *e > epoch);
                        }
                        _ => {}
                    }
                }
                match self.device.peer_ack(peer, &ack, now) {
                    Ok(effects) => self.volume_effects(effects, now),
                    Err(error) => self.protocol_error(peer, error.0, now),
                }
            }
            PeerMessage::StatePrepare {
                transaction,
                node,
                outdate_peers,
            } => self.prepare_received(peer, transaction, node, outdate_peers, now),
            PeerMessage::StateReply {
                transaction,
                refusal,
            } => self.reply_received(peer, transaction, refusal, now),
            PeerMessage::StateCommit { transaction } => {
                self.commit_received(peer, transaction, now)
            }
            PeerMessage::SkipInitialSync { uuid } => self.skip_initial_sync_received(peer, uuid),
            answer @ (PeerMessage::Superseded { .. } | PeerMessage::RetryWrite { .. }) => {
                self.conflict_answer(peer, answer, now)
            }
            PeerMessage::StateAbort { transaction } => {
                if self
                    .prepared
                    .is_some_and(|p| p.peer == peer && p.transaction == transaction)
                {
                    self.prepared = None;
                }
            }
            other @ (PeerMessage::Data { .. }
            | PeerMessage::Discard { .. }
            | PeerMessage::Barrier { .. }) => self.data_stream_message(peer, other, now),
            PeerMessage::SyncBitmap {
                runs,
                last,
                from_source,
            } => self.sync_bitmap_received(peer, runs, last, from_source, now),
            PeerMessage::ResyncRequest { offset, len } => {
                self.resync_requested(peer, offset, len, None, now)
            }
            PeerMessage::ResyncChecksums {
                offset,
                len,
                digests,
            } => self.resync_requested(peer, offset, len, Some(digests), now),
            PeerMessage::ResyncSame { offset, len } => self.resync_same(peer, offset, len, now),
            PeerMessage::ResyncData { .. } => {
                self.protocol_error(peer, "ResyncData must arrive with its payload".into(), now)
            }
            PeerMessage::ResyncFailed { offset, len, errno } => {
                self.resync_failed(peer, offset, len, errno)
            }
            PeerMessage::ResyncWritten { offset, len, ok } => {
                self.resync_written(peer, offset, len, ok, now)
            }
            PeerMessage::ResyncDone { moved_bytes } => {
                self.finish_resync_as_source(peer, moved_bytes, now)
            }
            PeerMessage::VerifyRequest { offset, len } => {
                self.verify_requested(peer, offset, len, now)
            }
            PeerMessage::VerifyReply {
                offset,
                len,
                digests,
                errno,
            } => self.verify_replied(peer, offset, len, digests, errno, now),
        }
    }

    /// Barriers (writes come through [`Input::PeerWrite`]).
    fn data_stream_message(&mut self, peer: PeerId, message: PeerMessage, now: Tick) {
        match message {
            PeerMessage::Barrier {
                seq,
                epoch,
                writes,
                flush,
            } => {
                let Some(link) = self.links.get_mut(&peer) else {
                    return;
                };
                match link.receiver.on_barrier(seq, epoch, writes, flush) {
                    Ok(effects) => self.receiver_effects(peer, effects, now),
                    Err(error) => self.protocol_error(peer, error.0, now),
                }
            }
            other => self.protocol_error(
                peer,
                format!("{} must arrive with its payload", other.name()),
                now,
            ),
        }
    }

    fn peer_state(
        &mut self,
        peer: PeerId,
        role: Role,
        disk: DiskState,
        remote: Generations,
        missing: u64,
        now: Tick,
    ) {
        let current_uuid = remote.current;
        if role == Role::Primary && self.role == Role::Primary && !self.config.allow_two_primaries {
            let reason = format!(
                "both this node and peer {} are Primary; two primaries are not allowed",
                self.peer_name(peer)
            );
            self.refuse(peer, reason, true, now);
            return;
        }
        if role == Role::Primary {
            if let Some(other) = self.primary_peer_other_than(peer) {
                let reason = format!(
                    "peer {} became Primary while {other} is Primary; two primaries are not allowed",
                    self.peer_name(peer)
                );
                self.refuse(peer, reason, true, now);
                return;
            }
        }
        let resource = self.config.resource.clone();
        let Some(link) = self.links.get_mut(&peer) else {
            return;
        };
        let changed = link.role != Some(role) || link.disk != Some(disk);
        link.role = Some(role);
        link.disk = Some(disk);
        link.current_uuid = current_uuid;
        if changed {
            let line = format!(
                "change peer-device name:{resource} peer-node-id:{peer} conn-name:{} peer-role:{role} peer-disk:{disk} peer-generation:{current_uuid:016X}",
                link.name
            );
            self.emit(line);
        }
        if let Some(link) = self.links.get_mut(&peer) {
            link.peer_history = remote.history.clone();
        }
        let catching_up = self
            .links
            .get(&peer)
            .and_then(|l| l.resync.as_ref())
            .is_some_and(|r| r.role == SyncRole::Target);
        if !catching_up
            && current_uuid == self.meta.current_uuid
            && self.resync_possible()
            && self.missing_for(peer) == 0
            && missing == 0
        {
            // The same data, and neither counts a block the other lacks: the peer's claim
            // (an UpToDate peer confirms a Consistent or Outdated node) is ours.
            self.adopt_claim_of(disk);
        }
        if self.links.get(&peer).is_some_and(|l| l.resync.is_some()) {
            // The resync decides what this node lacks.
            return;
        }
        if missing > 0 && self.role == Role::Secondary {
            self.become_outdated(peer, missing);
            self.catch_up_from(peer, now);
            return;
        }

        if current_uuid == self.meta.current_uuid || self.role != Role::Secondary {
            return;
        }
        if role == Role::Primary {
            if self.disk == DiskState::UpToDate
                && remote.history.first() == Some(&self.meta.current_uuid)
            {
                // Our Primary started a new generation (some other node is away) while we
                // have every write of the old one: we follow it, and learn from it who lacks
                // what (its bitmap identifiers for the other nodes).
                let mut generations = generations_of(&self.meta);
                generations.start_new(current_uuid, []);
                for (node, uuid) in &remote.bitmap {
                    if *node != self.config.node_id {
                        generations.bitmap.entry(*node).or_insert(*uuid);
                    }
                }
                set_generations(&mut self.meta, &generations);
                self.persist(None);
                self.announce_state();
            }
            return;
        }
        // A Secondary peer in another generation. A node that follows a connected Primary
        // learns generations from it (a fellow Secondary may just be ahead by a moment); a node
        // without one compares, as at connect time, and learns whether it fell behind.
        if self.connected_primary().is_some() {
            return;
        }
        let mut remote = remote;
        let for_us = remote.bitmap_for(self.config.node_id);
        remote.bitmap.clear();
        if for_us != 0 {
            remote.bitmap.insert(self.config.node_id, for_us);
        }
        let local = generations_of(&self.meta);
        if let SyncDecision::LocalBehind { .. } =
            compare_generations(&local, self.disk, self.config.node_id, &remote, disk, peer)
        {
            self.become_outdated(peer, 0);
        }
    }

    // ----- handshake -----

    /// Two primaries: a write of this node waits for the peer's conflicting write to land
    /// here, a write of the peer waits for a conflicting local write, or (on the resolver) a
    /// local write that won a conflict waits for the peer to write it.
    fn conflict_pending(&self, peer: PeerId) -> bool {
        self.device.oldest_retry_wait(peer).is_some()
            || self.device.conflict_unresolved(peer)
            || self
                .peer_writes_waiting
                .front()
                .is_some_and(|queued| queued.waits_for_conflict(peer))
    }

    /// The resolver's answer to one of this node's writes that was concurrent with its own
    /// (docs/protocol.md, "Two primaries").
    fn conflict_answer(&mut self, peer: PeerId, answer: PeerMessage, now: Tick) {
        if !self.config.allow_two_primaries {
            let reason = format!(
                "{} from a peer, but two primaries are not allowed here",
                answer.name()
            );
            return self.protocol_error(peer, reason, now);
        }
        if self.config.node_id < peer {
            let reason = format!(
                "{} from a peer with a higher node id: this node resolves their conflicts",
                answer.name()
            );
            return self.protocol_error(peer, reason, now);
        }
        let result = match answer {
            PeerMessage::Superseded { seq } => self.device.peer_superseded(peer, seq, now),
            PeerMessage::RetryWrite { seq, after } => {
                self.device.peer_asked_retry(peer, seq, after, now)
            }
            _ => Ok(Vec::new()),
        };
        match result {
            Ok(effects) => self.volume_effects(effects, now),
            Err(error) => self.protocol_error(peer, error.0, now),
        }
    }

    fn hello_message(&self, peer: PeerId) -> PeerMessage {
        PeerMessage::Hello {
            protocol_version: PROTOCOL_VERSION,
            node_id: self.config.node_id,
            node_name: self.config.node_name.clone(),
            resource: self.config.resource.clone(),
            size_bytes: self.config.size_bytes,
            protocol: self.config.protocol,
            role: self.role,
            disk: self.disk,
            current_uuid: self.meta.current_uuid,
            bitmap_uuid: self.meta.bitmap_uuids.get(&peer).copied().unwrap_or(0),
            history_uuids: self.meta.history_uuids.clone(),
            receiver_missing_bytes: self.missing_for(peer),
            discard_my_data: self.links.get(&peer).is_some_and(|l| l.discard_my_data),
            primary_before_split: self.meta.flags.primary_before_split,
            resuming_initial_sync: self.resuming_initial_sync(),
            allow_two_primaries: self.config.allow_two_primaries,
        }
    }

    fn missing_for(&self, peer: PeerId) -> u64 {
        self.device
            .peer(peer)
            .map_or(0, |sender| sender.out_of_sync.dirty_bytes())
    }

    fn transport_up(&mut self, peer: PeerId, conn: u64, now: Tick) {
        let Some(link) = self.links.get_mut(&peer) else {
            self.effects.push_back(Effect::CloseConnection {
                peer,
                conn,
                reason: "no such peer".into(),
            });
            return;
        };
        link.dialing = None;
        if link.standalone || self.going_down {
            self.effects.push_back(Effect::CloseConnection {
                peer,
                conn,
                reason: "StandAlone".into(),
            });
            return;
        }
        if link.conn.is_some() {
            self.lose_link(
                peer,
                ConnectionState::NetworkFailure,
                "replaced by a new connection".into(),
                now,
            );
        }
        let Some(link) = self.links.get_mut(&peer) else {
            return;
        };
        link.conn = Some(conn);
        link.handshake_since = Some(now);
        let hello = self.hello_message(peer);
        if let (
            Some(link),
            PeerMessage::Hello {
                receiver_missing_bytes,
                ..
            },
        ) = (self.links.get_mut(&peer), &hello)
        {
            // What this node told the peer it changed: a split-brain decision uses the counts
            // both Hellos carried, the same facts on both sides.
            link.hello_changes = *receiver_missing_bytes;
        }
        let facts = self.hello_facts(peer);
        if let Some(link) = self.links.get_mut(&peer) {
            link.sent_hello_facts = Some(facts);
        }
        self.effects.push_back(Effect::Send {
            peer,
            message: hello,
        });
    }

    /// Checks a peer's Hello. Both sides run the same checks on the same facts, so both reach
    /// the same verdict and both can say why (docs/protocol.md, "Handshake").
    fn hello(&mut self, peer: PeerId, hello: &PeerMessage, now: Tick) {
        let PeerMessage::Hello {
            protocol_version,
            node_id,
            node_name,
            resource,
            size_bytes,
            protocol,
            role,
            disk,
            current_uuid,
            bitmap_uuid,
            history_uuids,
            receiver_missing_bytes,
            discard_my_data,
            primary_before_split,
            resuming_initial_sync,
            allow_two_primaries,
        } = hello
        else {
            return;
        };
        let Some(link) = self.links.get(&peer) else {
            return;
        };
        if link.handshake_since.is_none() || link.deferred_hello.is_some() {
            self.protocol_error(peer, "a second Hello".into(), now);
            return;
        }
        if self.lost_writes_at_store() {
            // Writes of an earlier connection are still landing: a new connection (and the
            // writes of a new Primary) must wait until they did, or they could be overwritten
            // by the older data. The handshake timeout bounds the wait.
            if let Some(link) = self.links.get_mut(&peer) {
                link.deferred_hello = Some(hello.clone());
            }
            return;
        }
        let name = link.name.clone();
        let ours = &self.config;
        let mismatch = if *protocol_version != PROTOCOL_VERSION {
            Some(format!(
                "incompatible qrbd protocol version {protocol_version} (this node speaks {PROTOCOL_VERSION})"
            ))
        } else if *resource != ours.resource {
            Some(format!(
                "peer offers resource {resource:?}, expected {:?}",
                ours.resource
            ))
        } else if *node_id != peer || *node_name != name {
            Some(format!(
                "peer is node {node_name:?} (id {node_id}), expected {name:?} (id {peer})"
            ))
        } else if *size_bytes != ours.size_bytes {
            Some(format!(
                "resource {:?}: peer size is {size_bytes} bytes, ours is {} bytes",
                ours.resource, ours.size_bytes
            ))
        } else if *protocol != ours.protocol {
            Some(format!(
                "resource {:?}: peer uses protocol {protocol}, ours is {}",
                ours.resource, ours.protocol
            ))
        } else if *allow_two_primaries != ours.allow_two_primaries {
            Some(format!(
                "resource {:?}: allow_two_primaries is {} here and {allow_two_primaries} on the \
                 peer; both must agree",
                ours.resource, ours.allow_two_primaries
            ))
        } else {
            None
        };
        if let Some(reason) = mismatch {
            self.refuse(peer, reason, false, now);
            return;
        }
        let both_primary = *role == Role::Primary && self.role == Role::Primary;
        if both_primary && !ours.allow_two_primaries {
            let reason = format!(
                "both {} and {name} are Primary; two primaries are not allowed (demote one, then `qrbd connect`)",
                ours.node_name
            );
            self.refuse(peer, reason, true, now);
            return;
        }
        if *role == Role::Primary {
            if let Some(other) = self.primary_peer_other_than(peer) {
                // A Secondary follows one Primary: two would write it with diverging data.
                let reason = format!(
                    "{} already follows Primary {other}; two primaries are not allowed",
                    ours.node_name
                );
                self.refuse(peer, reason, false, now);
                return;
            }
        }
        if matches!(self.change, Change::Demoting { .. }) {
            // Its last writes as Primary are draining; a peer that joins now would be sent
            // writes by a node it knows as Secondary. Later.
            let reason = format!(
                "{} is finishing its writes as Primary; try again once it is Secondary",
                ours.node_name
            );
            self.refuse(peer, reason, false, now);
            return;
        }
        if matches!(self.change, Change::Promoting(_)) {
            // This node's promotion did not ask the peer (it was not connected then) and may
            // commit while the peer is, or becomes, Primary too: refuse for now; the retry
            // after the promotion finishes sees the new roles.
            let reason = format!(
                "{} is becoming Primary; try again once it is",
                ours.node_name
            );
            self.refuse(peer, reason, false, now);
            return;
        }
        // Both sides must decide on the facts both Hellos told. If this node's changed since
        // its Hello left (a write started a new generation, a role or disk changed), the peer
        // decides on old facts: start over with fresh Hellos on both sides.
        let sent = self
            .links
            .get(&peer)
            .and_then(|l| l.sent_hello_facts.clone());
        if sent.is_some_and(|sent| sent != self.hello_facts(peer)) {
            self.restart_handshake(peer, "this node's state changed during the handshake", now);
            return;
        }
        let local = generations_of(&self.meta);
        let mut remote = Generations {
            current: *current_uuid,
            bitmap: BTreeMap::new(),
            history: history_uuids.clone(),
        };
        if *bitmap_uuid != 0 {
            remote.bitmap.insert(self.config.node_id, *bitmap_uuid);
        }
        let decision =
            compare_generations(&local, self.disk, self.config.node_id, &remote, *disk, peer);
        let mut split_brain_victim_is_local = false;
        match decision {
            SyncDecision::SplitBrain { .. } => {
                let since = local.bitmap_for(peer).max(*bitmap_uuid);
                let ours = self
                    .links
                    .get(&peer)
                    .map(|l| (l.discard_my_data, l.hello_changes));
                let (our_discard, our_changes) = ours.unwrap_or_default();
                let outcome = resolve_split_brain(
                    &SplitBrainSide {
                        id: self.config.node_id,
                        name: &self.config.node_name,
                        role: self.role,
                        discard_my_data: our_discard,
                        primary_before_split: self.meta.flags.primary_before_split,
                        changes: our_changes,
                        consistent: matches!(
                            self.disk,
                            DiskState::UpToDate | DiskState::Consistent
                        ),
                    },
                    &SplitBrainSide {
                        id: peer,
                        name: &name,
                        role: *role,
                        discard_my_data: *discard_my_data,
                        primary_before_split: *primary_before_split,
                        changes: *receiver_missing_bytes,
                        consistent: matches!(*disk, DiskState::UpToDate | DiskState::Consistent),
                    },
                    &self.config.sync.split_brain,
                );
                let outcome = if self.resync_possible() {
                    outcome
                } else {
                    SplitBrainOutcome::Disconnect(
                        "split-brain recovery needs a two-node resource for now".into(),
                    )
                };
                if let SplitBrainOutcome::Disconnect(why) = outcome {
                    let reason = format!(
                        "split brain: {} and {name} both wrote data since generation {since:016X}; \
                         not resolved automatically ({why}); choose the victim and run \
                         `qrbd connect --discard-my-data` there",
                        self.config.node_name,
                    );
                    self.refuse(peer, reason, true, now);
                    return;
                }
                split_brain_victim_is_local =
                    matches!(outcome, SplitBrainOutcome::LocalIsVictim(_));
                tracing::warn!(resource = %self.config.resource, peer = %name, outcome = ?outcome, "split brain since generation {since:016X}; resolving it");
                self.emit(format!(
                    "change peer-device name:{} peer-node-id:{peer} conn-name:{name} split-brain:resolved outcome:{outcome:?}",
                    self.config.resource
                ));
            }
            SyncDecision::Unrelated => {
                let reason = format!(
                    "unrelated data: generation {:016X} here and {current_uuid:016X} on {name} share no history",
                    local.current
                );
                self.refuse(peer, reason, true, now);
                return;
            }
            SyncDecision::Same
                if both_primary && (self.missing_for(peer) > 0 || *receiver_missing_bytes > 0) =>
            {
                // Neither may become the sync target of the other while Primary.
                let reason = format!(
                    "{} and {name} are both Primary and blocks differ between them; demote \
                     one (it becomes the sync target), then `qrbd connect`",
                    self.config.node_name
                );
                self.refuse(peer, reason, true, now);
                return;
            }
            SyncDecision::LocalBehind { .. } if self.role == Role::Primary => {
                let reason = format!(
                    "this node is Primary but {name} has newer data (generation {current_uuid:016X}); \
                     treating it as split brain"
                );
                self.refuse(peer, reason, true, now);
                return;
            }
            _ => {}
        }
        self.establish(peer, *role, *disk, *current_uuid, now);
        if let Some(link) = self.links.get_mut(&peer) {
            link.peer_history = history_uuids.clone();
        }
        let target_without_resync = matches!(decision, SyncDecision::LocalBehind { .. })
            || (decision == SyncDecision::Same
                && *receiver_missing_bytes > 0
                && self.role == Role::Secondary);
        // A blank node whose initial sync had begun resumes it from the bitmaps.
        let resumes = match decision {
            SyncDecision::LocalBehind { full: true } => self.resuming_initial_sync(),
            SyncDecision::PeerBehind { full: true } => *resuming_initial_sync,
            _ => false,
        };
        if resumes {
            tracing::info!(resource = %self.config.resource, peer = %name, "the interrupted initial sync resumes from the bitmaps");
            self.emit(format!(
                "change peer-device name:{} peer-node-id:{peer} conn-name:{name} initial-sync:resumed",
                self.config.resource
            ));
        }
        let sync = match decision {
            SyncDecision::LocalBehind { full } => {
                if full && !resumes {
                    // No bitmap tracks the difference: every block comes from the peer.
                    self.device
                        .mark_out_of_sync(peer, ByteRange::new(0, self.config.size_bytes));
                }
                Some(SyncRole::Target)
            }
            SyncDecision::PeerBehind { full } => {
                if full && !resumes {
                    self.device
                        .mark_out_of_sync(peer, ByteRange::new(0, self.config.size_bytes));
                }
                Some(SyncRole::Source)
            }
            SyncDecision::Same => {
                let local = SideFacts {
                    role: self.role,
                    disk: self.disk,
                    bits_for_other: self.missing_for(peer),
                };
                let remote = SideFacts {
                    role: *role,
                    disk: *disk,
                    bits_for_other: *receiver_missing_bytes,
                };
                let direction = resync_direction(local, self.config.node_id, remote, peer);
                let nothing_differs = local.bits_for_other == 0 && remote.bits_for_other == 0;
                if direction.is_none() && nothing_differs && self.resync_possible() {
                    // Same generation and neither side counts a block that differs (a crash
                    // here left no hot extent): the data is the peer's, and so is its claim.
                    self.adopt_claim_of(*disk);
                }
                direction
            }
            SyncDecision::SplitBrain { full } => {
                // Only a resolved split brain gets here: the victim takes the survivor's data,
                // the blocks either side changed (both bitmaps count them), or all of them.
                if full {
                    self.device
                        .mark_out_of_sync(peer, ByteRange::new(0, self.config.size_bytes));
                }
                if split_brain_victim_is_local {
                    // The local data is no longer a claim on anything.
                    self.meta.flags.up_to_date = false;
                    Some(SyncRole::Target)
                } else {
                    Some(SyncRole::Source)
                }
            }
            SyncDecision::Unrelated => None,
        };
        // Three-node clusters stay as before (see `resync_possible`): the node behind turns
        // Outdated and waits.
        let sync = sync.filter(|_| self.resync_possible());
        if sync == Some(SyncRole::Target) || (sync.is_none() && target_without_resync) {
            self.become_outdated(peer, *receiver_missing_bytes);
        }
        // The resync first: from now on the State messages this node sends the peer say
        // nothing of the blocks the resync carries (see `announce_state`).
        if let Some(role) = sync {
            self.start_resync(peer, role, now);
        }
        self.announce_state();
        self.replay_early(peer, now);
    }

    /// Handles, in arrival order, the data-stream messages that overtook the peer's Hello.
    fn replay_early(&mut self, peer: PeerId, now: Tick) {
        let Some(link) = self.links.get_mut(&peer) else {
            return;
        };
        let early = std::mem::take(&mut link.early);
        for arrival in early {
            let Some(conn) = self.current_conn(peer) else {
                return;
            };
            match arrival {
                Early::Message(message) => self.peer_message(peer, message, now),
                Early::Write(write) => self.peer_write(peer, conn, write, now),
            }
        }
    }

    fn establish(&mut self, peer: PeerId, role: Role, disk: DiskState, uuid: u64, now: Tick) {
        let resource = self.config.resource.clone();
        let receiver = new_receiver(&self.config);
        let Some(link) = self.links.get_mut(&peer) else {
            return;
        };
        link.handshake_since = None;
        link.role = Some(role);
        link.disk = Some(disk);
        link.current_uuid = uuid;
        link.receiver = receiver;
        link.backoff = self.config.timing.min_backoff;
        link.last_error = None;
        link.last_ping = now;
        link.ping_outstanding = None;
        link.awaiting_writes.clear();
        link.awaiting_barriers.clear();
        // `--discard-my-data` is for one handshake.
        link.discard_my_data = false;
        let name = link.name.clone();
        self.device.peer_connected(peer);
        tracing::info!(resource = %resource, peer = %name, "connected");
        self.set_link_state(peer, ConnectionState::Connected);
        self.emit(format!(
            "change peer-device name:{resource} peer-node-id:{peer} conn-name:{name} peer-role:{role} peer-disk:{disk} peer-generation:{uuid:016X}"
        ));
    }

    /// Refuses the peer: tells it why and closes the connection. `standalone` refusals are
    /// not retried (both sides wait for the administrator).
    fn refuse(&mut self, peer: PeerId, reason: String, standalone: bool, now: Tick) {
        tracing::warn!(resource = %self.config.resource, peer = %self.peer_name(peer), %reason, "refused the peer");
        self.effects.push_back(Effect::Send {
            peer,
            message: PeerMessage::Refused {
                reason: reason.clone(),
                standalone,
            },
        });
        self.refused(peer, reason, standalone, now);
    }

    fn refused(&mut self, peer: PeerId, reason: String, standalone: bool, now: Tick) {
        if let Some(link) = self.links.get_mut(&peer) {
            if standalone {
                link.standalone = true;
            }
            link.backoff = link.backoff.max(self.config.timing.refused_backoff);
        }
        self.lose_link(peer, ConnectionState::ProtocolError, reason.clone(), now);
        if let Some(link) = self.links.get_mut(&peer) {
            link.last_error = Some(reason);
        }
    }

    fn protocol_error(&mut self, peer: PeerId, reason: String, now: Tick) {
        tracing::error!(resource = %self.config.resource, peer = %self.peer_name(peer), %reason, "protocol error; dropping the connection");
        self.lose_link(peer, ConnectionState::ProtocolError, reason, now);
    }

    /// Tears the link down: closes the connection, releases what waited for the peer (it is
    /// out of sync for it from now on), and schedules a redial unless StandAlone.
    fn lose_link(&mut self, peer: PeerId, state: ConnectionState, reason: String, now: Tick) {
        let Some(link) = self.links.get_mut(&peer) else {
            return;
        };
        let was_connected = link.is_connected();
        if let Some(conn) = link.conn.take() {
            self.effects.push_back(Effect::CloseConnection {
                peer,
                conn,
                reason: reason.clone(),
            });
        }
        link.handshake_since = None;
        link.early.clear();
        link.deferred_hello = None;
        self.abandon_resync(peer, now);
        self.abandon_verify(peer, now);
        let Some(link) = self.links.get_mut(&peer) else {
            return;
        };
        link.role = None;
        link.disk = None;
        link.ping_outstanding = None;
        link.awaiting_writes.clear();
        link.awaiting_barriers.clear();
        link.last_error = Some(reason);
        link.next_dial = now.saturating_add(link.backoff);
        link.backoff = link
            .backoff
            .saturating_mul(2)
            .min(self.config.timing.max_backoff.max(link.backoff));
        let standalone = link.standalone;
        self.received_writes.retain(|(p, _), _| *p != peer);
        // Whether writes replicate to the peer, which the link state does not tell when
        // `disconnect_all` already moved it to Disconnecting.
        let replicating = self.device.peer(peer).is_some_and(|s| s.is_connected());
        let mut marked = false;
        let mut hold_taken = false;
        if replicating {
            // Writes released by the disconnect completed without the peer: they belong to a
            // new generation, durable before they complete. Hold completions before the
            // device releases them; the hold ends with the new generation's persist, or at
            // once if nothing was released. Only a Primary's writes replicate, but a demotion
            // in progress has already made the role Secondary while its last writes drain.
            hold_taken = !self
                .meta_waiters
                .iter()
                .any(|(_, w)| *w == MetaWaiter::ReleaseIo);
            self.device.hold(HOLD_METADATA);
            let before = self.missing_for(peer);
            let effects = self.device.peer_disconnected(peer, now);
            marked = self.missing_for(peer) > before;
            self.volume_effects(effects, now);
        }
        if was_connected || state != ConnectionState::NetworkFailure {
            self.set_link_state(peer, state);
        }
        self.set_link_state(
            peer,
            if standalone {
                ConnectionState::StandAlone
            } else {
                ConnectionState::Connecting
            },
        );
        if replicating {
            // The link is no longer Connected here, so the peer counts as absent.
            let generation = self.meta.current_uuid;
            // Writes the peer did not acknowledge, and writes still held or waiting here
            // (they will complete without the peer), belong to a new generation.
            if marked || self.device.modifying_in_flight() > 0 {
                self.start_generation_if_needed(false, false);
            }
            if hold_taken && self.meta.current_uuid == generation {
                let effects = self.device.release(HOLD_METADATA, now);
                self.volume_effects(effects, now);
            }
        }
        // A peer lost before it answered a promotion may be promoting itself (its prepare and
        // ours crossed, then the connection went): without its answer the promotion is
        // abandoned, as if no peer were connected; `--force` goes on without it. A peer that
        // already agreed is not asked again. One this node agreed to for the peer is void.
        if let Change::Promoting(promotion) = &mut self.change {
            promotion.asked.remove(&peer);
            if promotion.awaiting.remove(&peer) {
                if promotion.force {
                    self.maybe_commit_promotion(now);
                } else {
                    let name = self.peer_name(peer);
                    self.abort_promotion(CommandError::PeerRefused {
                        peer: name,
                        reason: "the connection was lost before it answered".into(),
                    });
                }
            }
        }
        if self.prepared.is_some_and(|p| p.peer == peer) {
            self.prepared = None;
        }
    }

    fn dial_failed(&mut self, peer: PeerId, reason: String, now: Tick) {
        let max = self.config.timing.max_backoff;
        let Some(link) = self.links.get_mut(&peer) else {
            return;
        };
        link.dialing = None;
        link.next_dial = now.saturating_add(link.backoff);
        link.backoff = link.backoff.saturating_mul(2).min(max.max(link.backoff));
        // Said once per reason: a peer that stays away must not flood the log.
        if link.last_error.as_deref() != Some(reason.as_str()) {
            tracing::warn!(resource = %self.config.resource, peer = %link.name, %reason, "connecting failed");
        }
        link.last_error = Some(reason);
    }

    fn dial_due(&mut self, now: Tick) {
        let give_up = self.config.timing.handshake_timeout;
        for link in self.links.values_mut() {
            // A dial nobody answered (the shell lost it) is given up and asked for again.
            if link
                .dialing
                .is_some_and(|since| now.saturating_sub(since) > give_up)
            {
                link.dialing = None;
            }
            if link.dials
                && !link.standalone
                && link.dialing.is_none()
                && link.conn.is_none()
                && now >= link.next_dial
                && !self.going_down
            {
                link.dialing = Some(now);
                self.effects.push_back(Effect::Dial { peer: link.id });
            }
        }
    }

    // ----- timers -----

    fn tick(&mut self, now: Tick) {
        self.resync_tick(now);
        let timing = self.config.timing;
        let mut drops = Vec::new();
        let conflicted: BTreeSet<PeerId> = self
            .links
            .keys()
            .copied()
            .filter(|peer| self.conflict_pending(*peer))
            .collect();
        for link in self.links.values_mut() {
            if let Some(since) = link.handshake_since {
                if now.saturating_sub(since) > timing.handshake_timeout {
                    drops.push((link.id, "the handshake timed out".to_owned()));
                }
                continue;
            }
            if !link.is_connected() {
                continue;
            }
            if let Some(sent) = link.ping_outstanding {
                if now.saturating_sub(sent) > timing.ping_timeout {
                    drops.push((
                        link.id,
                        format!(
                            "no ping answer within {} ms",
                            timing.ping_timeout / MILLISECOND
                        ),
                    ));
                    continue;
                }
            } else if now.saturating_sub(link.last_ping) >= timing.ping_interval {
                link.ping_nonce += 1;
                link.last_ping = now;
                link.ping_outstanding = Some(now);
                self.effects.push_back(Effect::Send {
                    peer: link.id,
                    message: PeerMessage::Ping {
                        nonce: link.ping_nonce,
                    },
                });
            }
            let oldest = link
                .awaiting_writes
                .values()
                .next()
                .into_iter()
                .chain(link.awaiting_barriers.values().next())
                .min()
                .copied();
            let unanswered =
                oldest.is_some_and(|sent| now.saturating_sub(sent) > timing.request_timeout());
            if unanswered && !conflicted.contains(&link.id) {
                drops.push((
                    link.id,
                    format!(
                        "a replicated request went unanswered for {} s (timeout x ko-count)",
                        timing.request_timeout() / SECOND
                    ),
                ));
            } else if unanswered
                || self
                    .device
                    .oldest_retry_wait(link.id)
                    .is_some_and(|since| now.saturating_sub(since) > timing.request_timeout())
            {
                drops.push((
                    link.id,
                    format!(
                        "{CONFLICT_TIMEOUT} ({} s, timeout x ko-count)",
                        timing.request_timeout() / SECOND
                    ),
                ));
            }
        }
        for (peer, reason) in drops {
            tracing::warn!(resource = %self.config.resource, peer = %self.peer_name(peer), %reason, "connection timed out");
            self.lose_link(peer, ConnectionState::Timeout, reason, now);
        }
        if let Change::Promoting(promotion) = &self.change {
            if promotion.persisting.is_none() && now >= promotion.deadline {
                let late = promotion
                    .awaiting
                    .iter()
                    .next()
                    .map(|peer| self.peer_name(*peer))
                    .unwrap_or_default();
                self.abort_promotion(CommandError::PeerTimeout(late));
            }
        }
        if self.prepared.is_some_and(|p| now >= p.deadline) {
            self.prepared = None;
        }
        self.dial_due(now);
    }

    // ----- commands -----

    fn command(&mut self, id: CommandId, command: Command, now: Tick) {
        match command {
            Command::Promote { force } => self.promote(id, force, now),
            Command::Demote => self.demote(id, now),
            Command::SuspendIo => {
                self.device.suspend();
                self.emit(format!(
                    "change resource name:{} suspended:user",
                    self.config.resource
                ));
                self.done(id, Ok("I/O suspended".into()));
            }
            Command::ResumeIo => {
                let effects = self.device.resume(now);
                self.emit(format!(
                    "change resource name:{} suspended:no",
                    self.config.resource
                ));
                self.volume_effects(effects, now);
                self.done(id, Ok("I/O resumed".into()));
            }
            Command::Connect { discard_my_data } => {
                let peers: Vec<PeerId> = self.links.keys().copied().collect();
                for peer in peers {
                    let min = self.config.timing.min_backoff;
                    if let Some(link) = self.links.get_mut(&peer) {
                        link.discard_my_data = discard_my_data;
                        if link.standalone {
                            link.standalone = false;
                            link.backoff = min;
                            link.next_dial = now;
                            link.last_error = None;
                            self.set_link_state(peer, ConnectionState::Connecting);
                        }
                    }
                }
                self.dial_due(now);
                self.done(id, Ok("connecting".into()));
            }
            Command::Disconnect => {
                self.disconnect_all(now);
                self.done(id, Ok("disconnected (StandAlone)".into()));
            }
            Command::Invalidate => self.invalidate(id, false, now),
            Command::InvalidateRemote => self.invalidate(id, true, now),
            Command::Verify => self.start_verify(id, now),
            Command::SkipInitialSync => self.skip_initial_sync(id),
            Command::Shutdown => self.shutdown(id, now),
        }
    }

    fn disconnect_all(&mut self, now: Tick) {
        let peers: Vec<PeerId> = self.links.keys().copied().collect();
        for peer in peers {
            if let Some(link) = self.links.get_mut(&peer) {
                link.standalone = true;
                link.dialing = None;
            }
            self.set_link_state(peer, ConnectionState::Disconnecting);
            self.lose_link(
                peer,
                ConnectionState::StandAlone,
                "disconnected by the administrator".into(),
                now,
            );
            if let Some(link) = self.links.get_mut(&peer) {
                link.last_error = None;
            }
        }
    }

    fn promote(&mut self, id: CommandId, force: bool, now: Tick) {
        if self.going_down {
            return self.done(id, Err(CommandError::GoingDown));
        }
        if self.is_changing() {
            return self.done(id, Err(CommandError::Busy));
        }
        if self.role == Role::Primary {
            return self.done(id, Ok("already Primary".into()));
        }
        let two_primaries = self.config.allow_two_primaries;
        if let Some(name) = self.connected_primary().filter(|_| !two_primaries) {
            return self.done(id, Err(CommandError::PeerIsPrimary(name)));
        }
        if let Some(prepared) = self.prepared.filter(|p| !two_primaries || p.outdate_peers) {
            let name = self.peer_name(prepared.peer);
            return self.done(id, Err(CommandError::LostRace(name)));
        }
        if self.is_blank() && !force {
            return self.done(id, Err(CommandError::Blank));
        }
        if self.disk != DiskState::UpToDate && !force {
            return self.done(id, Err(CommandError::DiskNotUpToDate(self.disk)));
        }
        // With two primaries the received writes are in the conflict domain: this node's
        // writes follow them wherever they overlap.
        if let Some(name) = self.peer_with_pending_writes().filter(|_| !two_primaries) {
            return self.done(id, Err(CommandError::ApplyingPeerWrites(name)));
        }
        if let Some(link) = self.links.values().find(|l| {
            l.resync
                .as_ref()
                .is_some_and(|r| r.role == SyncRole::Target)
        }) {
            // Its resync writes would land under the application's writes.
            let name = link.name.clone();
            return self.done(id, Err(CommandError::SyncTarget(name)));
        }
        if force && self.disk != DiskState::UpToDate {
            if let Some(link) = self.links.values().find(|l| l.resync.is_some()) {
                // Forcing makes all of the peer's data out of date: the resync the bitmaps
                // started is no longer the right one.
                let name = link.name.clone();
                return self.done(id, Err(CommandError::Resyncing(name)));
            }
        }
        let connected: BTreeSet<PeerId> = self
            .links
            .values()
            .filter(|link| link.is_connected())
            .map(|link| link.id)
            .collect();
        if !self.links.is_empty() && connected.is_empty() && !force {
            return self.done(id, Err(CommandError::NoPeerConnected));
        }
        let transaction = (u64::from(self.config.node_id) << 56) | self.next_transaction;
        self.next_transaction += 1;
        let outdate_peers = force && self.disk != DiskState::UpToDate;
        for peer in &connected {
            self.effects.push_back(Effect::Send {
                peer: *peer,
                message: PeerMessage::StatePrepare {
                    transaction,
                    node: self.config.node_id,
                    outdate_peers,
                },
            });
        }
        self.change = Change::Promoting(Promotion {
            command: id,
            transaction,
            force,
            outdate_peers,
            awaiting: connected.clone(),
            asked: connected,
            deadline: now.saturating_add(self.config.timing.state_change_timeout),
            persisting: None,
        });
        self.maybe_commit_promotion(now);
    }

    /// Every asked peer agreed: make the new role's metadata durable, then commit.
    fn maybe_commit_promotion(&mut self, _now: Tick) {
        let Change::Promoting(promotion) = &self.change else {
            return;
        };
        if !promotion.awaiting.is_empty() || promotion.persisting.is_some() {
            return;
        }
        let (force, outdate_peers) = (promotion.force, promotion.outdate_peers);
        let two_primaries = self.config.allow_two_primaries;
        if let Some(name) = self.peer_with_pending_writes().filter(|_| !two_primaries) {
            // The old Primary's last writes must land here before this node writes.
            return self.abort_promotion(CommandError::ApplyingPeerWrites(name));
        }
        if let Some(name) = self.connected_primary().filter(|_| !two_primaries) {
            return self.abort_promotion(CommandError::PeerIsPrimary(name));
        }
        self.meta.flags.was_primary = true;
        if force {
            self.meta.flags.consistent = true;
            self.meta.flags.up_to_date = true;
        }
        // Promoted, the data is current by definition (a plain promotion needs UpToDate).
        self.meta.flags.unconfirmed = false;
        self.meta.flags.crashed_primary = false;
        // A promotion without every peer, or over data that was not current, starts a new
        // generation at once.
        let everyone_here = self.links.values().all(Link::is_connected);
        if outdate_peers || !everyone_here {
            let absent_before = self.meta.current_uuid;
            self.start_generation_if_needed(outdate_peers, true);
            if outdate_peers && self.meta.current_uuid == absent_before {
                self.start_generation_if_needed(true, true);
            }
        }
        let version = self.persist(None);
        if let Change::Promoting(promotion) = &mut self.change {
            promotion.persisting = Some(version);
        }
    }

    fn finish_promotion(&mut self, result: Result<(), String>) {
        let Change::Promoting(promotion) = std::mem::replace(&mut self.change, Change::None) else {
            return;
        };
        if let Err(error) = result {
            self.meta.flags.was_primary = false;
            for peer in &promotion.asked {
                self.effects.push_back(Effect::Send {
                    peer: *peer,
                    message: PeerMessage::StateAbort {
                        transaction: promotion.transaction,
                    },
                });
            }
            return self.done(promotion.command, Err(CommandError::Meta(error)));
        }
        for peer in &promotion.asked {
            self.effects.push_back(Effect::Send {
                peer: *peer,
                message: PeerMessage::StateCommit {
                    transaction: promotion.transaction,
                },
            });
        }
        if promotion.outdate_peers {
            let size = self.config.size_bytes;
            for peer in &promotion.asked {
                self.device.mark_out_of_sync(*peer, ByteRange::new(0, size));
            }
        }
        self.role = Role::Primary;
        self.crashed = false;
        self.restart_handshakes("this node became Primary during the handshake");
        let effects = self.device.set_writable(true);
        self.volume_effects(effects, 0);
        self.set_disk(DiskState::UpToDate, false);
        tracing::info!(resource = %self.config.resource, "role changed to Primary");
        self.announce_state();
        self.done(promotion.command, Ok("Primary".into()));
    }

    fn abort_promotion(&mut self, error: CommandError) {
        let Change::Promoting(promotion) = std::mem::replace(&mut self.change, Change::None) else {
            return;
        };
        for peer in &promotion.asked {
            self.effects.push_back(Effect::Send {
                peer: *peer,
                message: PeerMessage::StateAbort {
                    transaction: promotion.transaction,
                },
            });
        }
        tracing::warn!(resource = %self.config.resource, %error, "promotion abandoned");
        self.done(promotion.command, Err(error));
    }

    fn prepare_received(
        &mut self,
        peer: PeerId,
        transaction: u64,
        node: u8,
        outdate_peers: bool,
        now: Tick,
    ) {
        let me = self.config.node_name.clone();
        let two_primaries = self.config.allow_two_primaries;
        let refusal = if node != peer {
            Some(format!(
                "node id {node} does not match the peer's id {peer}"
            ))
        } else if self.role == Role::Primary && !two_primaries {
            Some(format!("{me} is Primary"))
        } else if self.role == Role::Primary && outdate_peers {
            // A forced promotion would outdate this node's data, which it is writing.
            Some(format!(
                "{me} is Primary; a promotion with --force cannot outdate it"
            ))
        } else if self.going_down {
            Some(format!("{me} is going down"))
        } else if matches!(self.change, Change::Demoting { .. }) {
            // Its last writes as Primary are still on their way to the peers.
            Some(format!("{me} is still finishing its writes as Primary"))
        } else if let Some(other) = self.primary_peer_other_than(peer) {
            Some(format!("{other} is Primary"))
        } else if let Some(other) = self.peer_with_pending_writes().filter(|_| !two_primaries) {
            // The old Primary's last writes must land here before a new one writes.
            Some(format!(
                "{me} is still writing data it received from {other}"
            ))
        } else if let Some(other) = self.prepared.filter(|p| p.peer != peer) {
            Some(format!(
                "{} is becoming Primary",
                self.peer_name(other.peer)
            ))
        } else if let Change::Promoting(own) = &self.change {
            if two_primaries && !outdate_peers && !own.outdate_peers {
                // Both may be Primary: neither promotion stands in the other's way (unless
                // one would outdate the other's data).
                None
            } else if peer < self.config.node_id && own.persisting.is_none() {
                // Both want to become Primary at once: the lower node id wins.
                let winner = self.peer_name(peer);
                self.abort_promotion(CommandError::LostRace(winner));
                None
            } else {
                Some(format!("{me} is becoming Primary"))
            }
        } else {
            None
        };
        if refusal.is_none() {
            self.prepared = Some(Prepared {
                peer,
                transaction,
                outdate_peers,
                deadline: now.saturating_add(self.config.timing.state_change_timeout),
            });
        }
        self.effects.push_back(Effect::Send {
            peer,
            message: PeerMessage::StateReply {
                transaction,
                refusal,
            },
        });
    }

    fn reply_received(
        &mut self,
        peer: PeerId,
        transaction: u64,
        refusal: Option<String>,
        now: Tick,
    ) {
        let Change::Promoting(promotion) = &mut self.change else {
            return;
        };
        if promotion.transaction != transaction || !promotion.awaiting.remove(&peer) {
            return;
        }
        match refusal {
            Some(reason) => {
                let peer = self.peer_name(peer);
                self.abort_promotion(CommandError::PeerRefused { peer, reason });
            }
            None => self.maybe_commit_promotion(now),
        }
    }

    fn commit_received(&mut self, peer: PeerId, transaction: u64, now: Tick) {
        let Some(prepared) = self
            .prepared
            .filter(|p| p.peer == peer && p.transaction == transaction)
        else {
            return;
        };
        self.prepared = None;
        if let Some(link) = self.links.get_mut(&peer) {
            link.role = Some(Role::Primary);
        }
        if prepared.outdate_peers {
            self.forced_over_blank(peer);
        }
        if prepared.outdate_peers && self.disk != DiskState::Outdated {
            tracing::warn!(resource = %self.config.resource, peer = %self.peer_name(peer), "the peer was promoted with --force over this node's data; the local disk is Outdated");
            self.become_outdated(peer, 0);
            self.catch_up_from(peer, now);
        }
    }

    fn demote(&mut self, id: CommandId, now: Tick) {
        if self.going_down {
            return self.done(id, Err(CommandError::GoingDown));
        }
        if self.is_changing() {
            return self.done(id, Err(CommandError::Busy));
        }
        if self.role == Role::Secondary {
            return self.done(id, Ok("already Secondary".into()));
        }
        // No new writes from now on; the role stays Primary, to the peers too, until the
        // admitted writes drained and are durable: until then this node's writes may still
        // reach them, and nobody else may become Primary.
        let effects = self.device.set_writable(false);
        self.volume_effects(effects, now);
        self.change = Change::Demoting {
            command: id,
            step: DrainStep::Draining,
        };
        tracing::info!(resource = %self.config.resource, "demoting: draining the writes in flight");
    }

    fn shutdown(&mut self, id: CommandId, now: Tick) {
        if self.going_down {
            return self.done(id, Err(CommandError::GoingDown));
        }
        if let Change::Promoting(_) = self.change {
            self.abort_promotion(CommandError::GoingDown);
        }
        if let Change::Demoting { command, .. } = self.change {
            // The shutdown's own drain, flush and metadata update cover the demotion's.
            self.done(command, Ok("Secondary".into()));
        }
        self.going_down = true;
        self.disconnect_all(now);
        // Held requests are admitted and finished rather than failed: nothing is lost.
        let effects = self.device.resume(now);
        self.volume_effects(effects, now);
        self.device.close();
        if self.role == Role::Primary {
            self.role = Role::Secondary;
            let effects = self.device.set_writable(false);
            self.volume_effects(effects, now);
        }
        self.change = Change::ShuttingDown {
            command: id,
            step: DrainStep::Draining,
        };
    }

    /// Moves a demotion or shutdown along: drained -> flushed -> metadata durable.
    fn progress_drain(&mut self, _now: Tick) {
        let step = match &self.change {
            Change::Demoting { step, .. } | Change::ShuttingDown { step, .. } => *step,
            _ => return,
        };
        let drained = match self.change {
            // Also every connected peer acknowledged (and flushed) every barrier: once
            // Secondary, this node no longer counts what its peers lack, so they must lack
            // nothing (protocols A and B complete writes before the peer wrote them).
            Change::Demoting { .. } => {
                self.device.admitted() == 0
                    && self.device.postponed() == 0
                    && self.device.modifying_in_flight() == 0
                    && self.links.values().all(|link| {
                        !link.is_connected()
                            || self
                                .device
                                .peer(link.id)
                                .is_none_or(|sender| sender.unacked_writes() == 0)
                    })
            }
            _ => self.device.is_idle(),
        };
        if step == DrainStep::Draining && drained {
            let token = self.next_token;
            self.next_token += 1;
            self.effects.push_back(Effect::FlushLocal { token });
            self.set_drain_step(DrainStep::Flushing(token));
        }
    }

    fn set_drain_step(&mut self, new: DrainStep) {
        if let Change::Demoting { step, .. } | Change::ShuttingDown { step, .. } = &mut self.change
        {
            *step = new;
        }
    }

    fn local_flushed(&mut self, token: u64, result: Result<(), IoFault>, now: Tick) {
        if self.flushed_before_eviction(token, result, now) {
            return;
        }
        let (command, step) = match &self.change {
            Change::Demoting { command, step } | Change::ShuttingDown { command, step } => {
                (*command, *step)
            }
            _ => return,
        };
        if step != DrainStep::Flushing(token) {
            return;
        }
        if let Err(fault) = result {
            self.abandon_drain();
            return self.done(command, Err(CommandError::LocalIo(fault)));
        }
        if matches!(self.change, Change::ShuttingDown { .. }) {
            // The bitmaps before the clean mark: a restart that finds the mark trusts them.
            self.set_drain_step(DrainStep::StoringBitmaps);
            self.store_all_bitmaps();
            return;
        }
        self.persist_after_drain();
    }

    fn persist_after_drain(&mut self) {
        self.meta.flags.was_primary = false;
        if matches!(self.change, Change::ShuttingDown { .. }) {
            self.meta.flags.clean_shutdown = true;
        }
        let version = self.persist(None);
        self.set_drain_step(DrainStep::Persisting(version));
    }

    /// A demotion that failed (its flush or metadata) leaves the node Primary, writable again.
    fn abandon_drain(&mut self) {
        if matches!(self.change, Change::Demoting { .. }) && self.role == Role::Primary {
            self.meta.flags.was_primary = true;
            let effects = self.device.set_writable(true);
            self.volume_effects(effects, self.now);
        }
        self.change = Change::None;
    }

    // ----- metadata -----

    fn persist(&mut self, waiter: Option<MetaWaiter>) -> u64 {
        self.meta_version += 1;
        let version = self.meta_version;
        if let Some(waiter) = waiter {
            self.meta_waiters.push((version, waiter));
        }
        self.effects.push_back(Effect::Persist {
            version,
            meta: self.meta.clone(),
        });
        version
    }

    fn persisted(&mut self, version: u64, result: Result<(), String>, now: Tick) {
        if let Err(error) = &result {
            tracing::error!(resource = %self.config.resource, %error, "metadata update failed");
            self.emit(format!(
                "change resource name:{} metadata-error:{error:?}",
                self.config.resource
            ));
        }
        let (ready, waiting): (Vec<_>, Vec<_>) = std::mem::take(&mut self.meta_waiters)
            .into_iter()
            .partition(|(v, _)| *v <= version);
        self.meta_waiters = waiting;
        for (_, waiter) in ready {
            match waiter {
                MetaWaiter::ReleaseIo if result.is_ok() => {
                    if !self
                        .meta_waiters
                        .iter()
                        .any(|(_, w)| *w == MetaWaiter::ReleaseIo)
                    {
                        let effects = self.device.release(HOLD_METADATA, now);
                        self.volume_effects(effects, now);
                    }
                }
                MetaWaiter::ReleaseIo => {
                    // The new generation is not durable: I/O stays held and the update is
                    // tried again, so that no write completes on a generation a crash forgets.
                    self.persist(Some(MetaWaiter::ReleaseIo));
                }
                MetaWaiter::ResyncTarget(peer) if result.is_ok() => {
                    self.resync_target_ready(peer, now)
                }
                MetaWaiter::ResyncTarget(peer) => {
                    self.persist(Some(MetaWaiter::ResyncTarget(peer)));
                }
                MetaWaiter::CommandDone(id) => {
                    let answer = match &result {
                        Ok(()) => Ok("done".to_owned()),
                        Err(error) => Err(CommandError::Meta(error.clone())),
                    };
                    self.done(id, answer);
                }
            }
        }
        if let Change::Promoting(promotion) = &self.change {
            if promotion.persisting.is_some_and(|v| v <= version) {
                self.finish_promotion(result.clone());
            }
        }
        let step = match &self.change {
            Change::Demoting { command, step } | Change::ShuttingDown { command, step } => {
                Some((*command, *step))
            }
            _ => None,
        };
        if let Some((command, DrainStep::Persisting(wanted))) = step {
            if wanted <= version {
                let shutting_down = matches!(self.change, Change::ShuttingDown { .. });
                if result.is_err() {
                    self.abandon_drain();
                }
                self.change = Change::None;
                match result {
                    Err(error) => self.done(command, Err(CommandError::Meta(error))),
                    Ok(()) if shutting_down => {
                        self.down = true;
                        tracing::info!(resource = %self.config.resource, "resource is down");
                        self.done(command, Ok("down".into()));
                    }
                    Ok(()) => {
                        self.role = Role::Secondary;
                        tracing::info!(resource = %self.config.resource, "role changed to Secondary");
                        self.announce_state();
                        self.done(command, Ok("Secondary".into()))
                    }
                }
            }
        }
    }

    // ----- disk state -----

    /// Takes over a peer's better claim on the same data (UpToDate, or Consistent).
    fn adopt_claim_of(&mut self, peer_disk: DiskState) {
        let claim = |disk: DiskState| match disk {
            DiskState::UpToDate => 2,
            DiskState::Consistent => 1,
            _ => 0,
        };
        if claim(peer_disk) <= claim(self.disk) {
            return;
        }
        if peer_disk == DiskState::Consistent {
            self.meta.flags.consistent = true;
            self.meta.flags.up_to_date = true;
            self.meta.flags.unconfirmed = true;
        }
        self.set_disk(peer_disk, true);
    }

    fn become_outdated(&mut self, peer: PeerId, missing_bytes: u64) {
        if matches!(self.disk, DiskState::Outdated | DiskState::Inconsistent) {
            return;
        }
        tracing::warn!(
            resource = %self.config.resource,
            peer = %self.peer_name(peer),
            missing_bytes,
            "the peer has data this node lacks; the local disk is Outdated until resynced"
        );
        self.meta.flags.up_to_date = false;
        self.set_disk(DiskState::Outdated, true);
    }

    fn set_disk(&mut self, disk: DiskState, persist: bool) {
        if self.disk == disk {
            return;
        }
        self.disk = disk;
        if disk == DiskState::UpToDate {
            self.meta.flags.consistent = true;
            self.meta.flags.up_to_date = true;
            self.meta.flags.unconfirmed = false;
            self.meta.flags.crashed_primary = false;
            self.crashed = false;
        }
        self.emit(format!(
            "change device name:{} disk:{disk}",
            self.config.resource
        ));
        if persist {
            self.persist(None);
        }
        self.announce_state();
    }

    /// Tells every connected peer this node's role, disk and generation.
    fn announce_state(&mut self) {
        let peers: Vec<PeerId> = self
            .links
            .values()
            .filter(|link| link.is_connected())
            .map(|link| link.id)
            .collect();
        for peer in peers {
            let message = PeerMessage::State {
                role: self.role,
                disk: self.disk,
                current_uuid: self.meta.current_uuid,
                bitmap_uuids: self
                    .meta
                    .bitmap_uuids
                    .iter()
                    .map(|(node, uuid)| (*node, *uuid))
                    .collect(),
                history_uuids: self.meta.history_uuids.clone(),
                // While a resync runs with the peer, the resync stream tells it what it lacks;
                // a count here could arrive after the resync finished and outdate it again.
                receiver_missing_bytes: if self.links.get(&peer).is_some_and(|l| l.resync.is_some())
                {
                    0
                } else {
                    self.missing_for(peer)
                },
            };
            self.effects.push_back(Effect::Send { peer, message });
        }
        self.emit(format!(
            "change resource name:{} role:{} disk:{}",
            self.config.resource, self.role, self.disk
        ));
    }

    // ----- helpers -----

    /// The name of a peer whose received writes are not all on the local store yet (on the
    /// current connection, or still landing from a lost one).
    fn peer_with_pending_writes(&self) -> Option<String> {
        self.links
            .values()
            .find(|link| link.receiver.pending() > 0)
            .map(|link| link.name.clone())
            .or_else(|| {
                self.at_store
                    .keys()
                    .next()
                    .map(|(peer, _, _)| self.peer_name(*peer))
            })
    }

    /// Whether writes received on a connection that is gone are still at the local store.
    fn lost_writes_at_store(&self) -> bool {
        self.at_store
            .keys()
            .any(|(peer, conn, _)| self.current_conn(*peer) != Some(*conn))
    }

    /// Handshakes that waited for a lost connection's writes to land go on once they did.
    fn resume_deferred_hellos(&mut self, now: Tick) {
        // Checked first: this runs after every applied peer write.
        if self
            .links
            .values()
            .all(|link| link.deferred_hello.is_none())
            || self.lost_writes_at_store()
        {
            return;
        }
        let waiting: Vec<(PeerId, PeerMessage)> = self
            .links
            .values_mut()
            .filter_map(|link| link.deferred_hello.take().map(|hello| (link.id, hello)))
            .collect();
        for (peer, hello) in waiting {
            self.hello(peer, &hello, now);
        }
    }

    /// The name of a connected peer other than `peer` that is Primary.
    fn primary_peer_other_than(&self, peer: PeerId) -> Option<String> {
        self.links
            .values()
            .find(|link| link.id != peer && link.is_connected() && link.role == Some(Role::Primary))
            .map(|link| link.name.clone())
    }

    /// The name of a connected peer that is Primary.
    fn connected_primary(&self) -> Option<String> {
        // No link carries this node's own id.
        self.primary_peer_other_than(self.config.node_id)
    }

    fn current_conn(&self, peer: PeerId) -> Option<u64> {
        self.links.get(&peer).and_then(|link| link.conn)
    }

    fn peer_name(&self, peer: PeerId) -> String {
        self.links
            .get(&peer)
            .map_or_else(|| format!("node {peer}"), |link| link.name.clone())
    }

    fn set_link_state(&mut self, peer: PeerId, state: ConnectionState) {
        let resource = self.config.resource.clone();
        let Some(link) = self.links.get_mut(&peer) else {
            return;
        };
        if link.state == state {
            return;
        }
        link.state = state;
        let line = match (&link.last_error, state) {
            (Some(reason), ConnectionState::ProtocolError | ConnectionState::StandAlone) => {
                format!(
                    "change connection name:{resource} peer-node-id:{peer} conn-name:{} connection:{state} reason:{reason:?}",
                    link.name
                )
            }
            _ => format!(
                "change connection name:{resource} peer-node-id:{peer} conn-name:{} connection:{state}",
                link.name
            ),
        };
        self.emit(line);
    }

    fn emit(&mut self, line: String) {
        self.effects.push_back(Effect::Event(line));
    }

    fn done(&mut self, id: CommandId, result: Result<String, CommandError>) {
        self.effects.push_back(Effect::CommandDone { id, result });
    }
}

/// A resource's state as `exists` lines (the start of `qrbd events`).
pub fn describe_lines(
    resource: &str,
    role: Role,
    disk: DiskState,
    suspended: bool,
    links: &[LinkStatus],
) -> Vec<String> {
    let mut lines = vec![format!(
        "exists resource name:{resource} role:{role} disk:{disk} suspended:{}",
        if suspended { "user" } else { "no" }
    )];
    for link in links {
        lines.push(format!(
            "exists connection name:{resource} peer-node-id:{} conn-name:{} connection:{} role:{}",
            link.peer,
            link.name,
            link.connection,
            link.role
                .map_or_else(|| "Unknown".to_owned(), |r| r.to_string())
        ));
    }
    lines
}

fn new_receiver(config: &CoreConfig) -> PeerReceiver {
    let receiver = PeerReceiver::new(config.protocol);
    if config.disk_flushes {
        receiver
    } else {
        receiver.without_disk_flushes()
    }
}

fn generations_of(meta: &DeviceMeta) -> Generations {
    Generations {
        current: meta.current_uuid,
        bitmap: meta
            .bitmap_uuids
            .iter()
            .filter(|(_, uuid)| **uuid != 0)
            .map(|(peer, uuid)| (*peer, *uuid))
            .collect(),
        history: meta.history_uuids.clone(),
    }
}

fn set_generations(meta: &mut DeviceMeta, generations: &Generations) {
    meta.current_uuid = generations.current;
    meta.bitmap_uuids = generations.bitmap.clone();
    meta.history_uuids = generations.history.clone();
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::generation::JUST_CREATED_UUID;

    const SIZE: u64 = 1 << 20;

    fn config(id: u8, peer: u8) -> CoreConfig {
        CoreConfig {
            resource: "r0".into(),
            node_id: id,
            node_name: format!("n{id}"),
            size_bytes: SIZE,
            protocol: ReplicationProtocol::C,
            disk_flushes: true,
            peers: vec![PeerConfig {
                id: peer,
                name: format!("n{peer}"),
            }],
            timing: Timing::default(),
            seed: u64::from(id),
            sync: SyncConfig::default(),
            allow_two_primaries: false,
        }
    }

    fn meta(id: u8) -> DeviceMeta {
        DeviceMeta::new("r0", id, SIZE, JUST_CREATED_UUID)
    }

    /// Two cores with instant, in-order delivery; every I/O and persist succeeds at once.
    struct Pair {
        nodes: [ResourceCore; 2],
        done: Vec<(u8, CommandId, Result<String, CommandError>)>,
        completed: Vec<(u8, RequestId, Result<(), IoFault>)>,
        sent: Vec<(u8, PeerMessage)>,
    }

    impl Pair {
        fn new() -> Self {
            let mut pair = Pair {
                nodes: [
                    ResourceCore::new(config(1, 2), meta(1), 0),
                    ResourceCore::new(config(2, 1), meta(2), 0),
                ],
                done: Vec::new(),
                completed: Vec::new(),
                sent: Vec::new(),
            };
            pair.run();
            pair
        }

        fn connect(&mut self) {
            self.nodes[0].handle(1, Input::TransportUp { peer: 2, conn: 1 });
            self.nodes[1].handle(1, Input::TransportUp { peer: 1, conn: 1 });
            self.run();
        }

        fn input(&mut self, node: usize, input: Input) {
            self.nodes[node].handle(2, input);
        }

        /// Carries out effects until nothing is left; messages are delivered in order.
        fn run(&mut self) {
            loop {
                let mut progress = false;
                for index in 0..2 {
                    let id = index as u8 + 1;
                    while let Some(effect) = self.nodes[index].poll_effect() {
                        progress = true;
                        let other = 1 - index;
                        match effect {
                            Effect::Persist { version, .. } => self.nodes[index].handle(
                                2,
                                Input::Persisted {
                                    version,
                                    result: Ok(()),
                                },
                            ),
                            Effect::StartLocal(rid) => self.nodes[index].handle(
                                2,
                                Input::LocalDone {
                                    id: rid,
                                    result: Ok(()),
                                },
                            ),
                            Effect::FlushLocal { token } => self.nodes[index].handle(
                                2,
                                Input::LocalFlushed {
                                    token,
                                    result: Ok(()),
                                },
                            ),
                            Effect::Send { message, .. } => {
                                self.sent.push((id, message.clone()));
                                self.nodes[other].handle(
                                    2,
                                    Input::PeerMessage {
                                        peer: id,
                                        conn: 1,
                                        message,
                                    },
                                );
                            }
                            Effect::CommandDone {
                                id: command,
                                result,
                            } => self.done.push((id, command, result)),
                            Effect::Complete(rid, result) => self.completed.push((id, rid, result)),
                            _ => {}
                        }
                    }
                }
                if !progress {
                    return;
                }
            }
        }

        fn result(&self, node: u8, command: CommandId) -> Option<&Result<String, CommandError>> {
            self.done
                .iter()
                .find(|(n, c, _)| *n == node && *c == command)
                .map(|(_, _, result)| result)
        }
    }

    #[test]
    fn a_fresh_pair_connects_and_both_are_up_to_date() {
        let mut pair = Pair::new();
        pair.connect();
        for node in &pair.nodes {
            let link = node.links().next().expect("one link");
            assert_eq!(link.connection, ConnectionState::Connected);
            assert_eq!(node.disk(), DiskState::UpToDate);
        }
    }

    #[test]
    fn incompatible_hellos_are_refused_with_the_reason_on_both_sides() {
        type Change = fn(&mut CoreConfig);
        let cases: [(&str, Change); 2] = [
            ("size", |c| c.size_bytes *= 2),
            ("protocol", |c| c.protocol = ReplicationProtocol::A),
        ];
        for (word, change) in cases {
            let mut pair = Pair::new();
            let mut other = config(2, 1);
            change(&mut other);
            pair.nodes[1] = ResourceCore::new(other, meta(2), 0);
            pair.run();
            pair.connect();
            for node in &pair.nodes {
                let link = node.links().next().expect("one link");
                assert_ne!(link.connection, ConnectionState::Connected, "{word}");
                let error = link.last_error.unwrap_or_default();
                assert!(error.contains(word), "{word}: {error}");
            }
        }
    }

    #[test]
    fn crossing_promotions_end_with_the_lower_id_primary_and_the_loser_names_it() {
        let mut pair = Pair::new();
        pair.connect();
        // Both prepares leave before either arrives.
        pair.nodes[0].handle(
            3,
            Input::Command {
                id: 10,
                command: Command::Promote { force: false },
            },
        );
        pair.nodes[1].handle(
            3,
            Input::Command {
                id: 20,
                command: Command::Promote { force: false },
            },
        );
        pair.run();
        assert_eq!(pair.result(1, 10), Some(&Ok("Primary".to_owned())));
        assert_eq!(
            pair.result(2, 20),
            Some(&Err(CommandError::LostRace("n1".into())))
        );
        assert_eq!(pair.nodes[0].role(), Role::Primary);
        assert_eq!(pair.nodes[1].role(), Role::Secondary);
    }

    #[test]
    fn conflict_answers_without_two_primaries_drop_the_link() {
        for message in [
            PeerMessage::Superseded { seq: 1 },
            PeerMessage::RetryWrite { seq: 1, after: 3 },
        ] {
            let mut pair = Pair::new();
            pair.connect();
            let name = message.name();
            pair.input(
                0,
                Input::PeerMessage {
                    peer: 2,
                    conn: 1,
                    message,
                },
            );
            let effects: Vec<Effect> = pair.nodes[0].drain_effects().collect();
            assert!(
                effects
                    .iter()
                    .any(|e| matches!(e, Effect::CloseConnection { peer: 2, .. })),
                "{name}: {effects:?}"
            );
            let link = pair.nodes[0].link(2).expect("link");
            assert!(link
                .last_error
                .is_some_and(|e| e.contains("two primaries are not allowed")));
        }
    }

    #[test]
    fn a_primary_refuses_data_from_its_peer_and_drops_the_link() {
        let mut pair = Pair::new();
        pair.connect();
        pair.input(
            0,
            Input::Command {
                id: 1,
                command: Command::Promote { force: false },
            },
        );
        pair.run();
        pair.input(
            0,
            Input::PeerWrite {
                peer: 2,
                conn: 1,
                write: PeerWrite {
                    seq: 1,
                    epoch: 1,
                    request: 9,
                    offset: 0,
                    len: 4096,
                    discard: false,
                    seen: 0,
                },
            },
        );
        let effects: Vec<Effect> = pair.nodes[0].drain_effects().collect();
        assert!(
            !effects
                .iter()
                .any(|e| matches!(e, Effect::ApplyPeerWrite { .. })),
            "{effects:?}"
        );
        assert!(effects
            .iter()
            .any(|e| matches!(e, Effect::ForgetPayload { seq: 1, .. })));
        assert!(effects
            .iter()
            .any(|e| matches!(e, Effect::CloseConnection { peer: 2, .. })));
        let link = pair.nodes[0].link(2).expect("link");
        assert!(link
            .last_error
            .is_some_and(|e| e.contains("while it is not Primary")));
    }

    #[test]
    fn a_forced_promotion_alone_starts_a_new_generation_before_writes_complete() {
        let mut pair = Pair::new();
        pair.input(
            0,
            Input::Command {
                id: 1,
                command: Command::Promote { force: true },
            },
        );
        let effects: Vec<Effect> = pair.nodes[0].drain_effects().collect();
        let persisted = effects.iter().find_map(|e| match e {
            Effect::Persist { meta, .. } => Some(meta.clone()),
            _ => None,
        });
        let meta = persisted.expect("the promotion persists its metadata");
        assert_ne!(meta.current_uuid, JUST_CREATED_UUID);
        assert_eq!(meta.bitmap_uuids.get(&2), Some(&JUST_CREATED_UUID));
        assert_eq!(meta.history_uuids, vec![JUST_CREATED_UUID]);
        // Not Primary until durable.
        assert_eq!(pair.nodes[0].role(), Role::Secondary);
    }

    #[test]
    fn a_node_with_peers_comes_back_consistent_after_a_crash_and_stays_so() {
        let mut crashed = meta(1);
        crashed.flags.clean_shutdown = false;
        let mut core = ResourceCore::new(config(1, 2), crashed, 0);
        assert_eq!(core.disk(), DiskState::Consistent);
        let persisted = core.drain_effects().find_map(|e| match e {
            Effect::Persist { meta, .. } => Some(meta),
            _ => None,
        });
        let again = persisted.expect("the in-use mark");
        assert!(again.flags.unconfirmed);
        // A second start from that metadata (another crash, or a clean stop) is Consistent too.
        let core = ResourceCore::new(config(1, 2), again, 0);
        assert_eq!(core.disk(), DiskState::Consistent);
        // Without peers nobody can be newer.
        let mut alone = config(1, 2);
        alone.peers.clear();
        let mut crashed = meta(1);
        crashed.flags.clean_shutdown = false;
        assert_eq!(
            ResourceCore::new(alone, crashed, 0).disk(),
            DiskState::UpToDate
        );
    }
}
