//! The messages peers exchange, as plain values. `qrbd`'s transport encodes them on the wire;
//! the core only ever sees decoded, validated values.

use serde::{Deserialize, Serialize};

use super::{DiskState, ReplicationProtocol, Role};

/// Bumped on any incompatible change of the messages or their meaning.
pub const PROTOCOL_VERSION: u32 = 6;

/// Identifies a replicated request on the sending node (its DeviceCore request id).
pub type PeerRequestId = u64;
/// Epoch number; epochs are numbered from 1 per connection.
pub type Epoch = u64;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum PeerMessage {
    /// First message on a new connection, from both sides.
    Hello {
        protocol_version: u32,
        node_id: u8,
        node_name: String,
        resource: String,
        size_bytes: u64,
        protocol: ReplicationProtocol,
        /// The sender's state when it said hello: the handshake decides on it.
        role: Role,
        disk: DiskState,
        current_uuid: u64,
        /// The sender's bitmap identifier for the receiver (0: none).
        bitmap_uuid: u64,
        history_uuids: Vec<u64>,
        /// Bytes the sender counts as out of sync for the receiver.
        receiver_missing_bytes: u64,
        /// The sender was told `connect --discard-my-data`: after a split brain it gives up
        /// its data.
        discard_my_data: bool,
        /// The sender was Primary already when it began writing without the receiver (it did
        /// not become Primary during the split): `discard-younger-primary` keeps its data.
        primary_before_split: bool,
        /// The sender is blank and its initial sync had begun, with its full bitmap durable:
        /// the initial sync resumes from the bitmaps.
        resuming_initial_sync: bool,
        /// The sender's resource allows two primaries; both sides must agree.
        allow_two_primaries: bool,
    },
    /// The other side cannot accept this peer; the connection is closed after it. With
    /// `standalone`, neither side retries until the administrator says `connect`.
    Refused {
        reason: String,
        standalone: bool,
    },
    /// The sender's role, disk state and current data generation (sent after Hello and on
    /// every change).
    State {
        role: Role,
        disk: DiskState,
        current_uuid: u64,
        /// The sender's bitmap identifiers, per node id (the generation at which it started
        /// writing without that node), so that its Secondaries learn who lacks what.
        bitmap_uuids: Vec<(u8, u64)>,
        history_uuids: Vec<u64>,
        /// How many bytes the sender counts as out of sync for the receiver: blocks written
        /// while the receiver was away, which it lacks until a resync.
        receiver_missing_bytes: u64,
    },

    /// A replicated write. `seq` numbers every message on the data stream. `seen` is the
    /// newest write of the receiver's own data stream (its sequence number) that the sender
    /// had applied before it issued this one, among those overlapping it, or the receiver's
    /// writes it acknowledged as written: two primaries' resolver tells by it whether its own
    /// write and this one were issued concurrently (docs/protocol.md, "Two primaries").
    Data {
        seq: u64,
        epoch: Epoch,
        request: PeerRequestId,
        offset: u64,
        seen: u64,
        data: Vec<u8>,
    },
    /// A replicated discard (reads back as zeros afterwards).
    Discard {
        seq: u64,
        epoch: Epoch,
        request: PeerRequestId,
        offset: u64,
        len: u64,
        seen: u64,
    },
    /// Closes `epoch`, which held `writes` writes/discards. With `flush`, the receiver makes
    /// them durable before acknowledging.
    Barrier {
        seq: u64,
        epoch: Epoch,
        writes: u32,
        flush: bool,
    },
    /// Protocol B: every write of the data stream numbered up to `up_to` was received. One
    /// acknowledgement covers many writes (docs/protocol.md, "Completion").
    RecvAck {
        up_to: u64,
    },
    /// Protocol C: every write of the data stream numbered up to `up_to` is on the peer's
    /// backing store, or was refused with a `NegAck` sent before this acknowledgement.
    WriteAck {
        up_to: u64,
    },
    /// The peer failed to write it (its local I/O error, errno).
    NegAck {
        request: PeerRequestId,
        errno: i32,
    },
    /// Every write of `epoch` (there were `writes`) is written, and flushed if asked.
    BarrierAck {
        epoch: Epoch,
        writes: u32,
    },
    Ping {
        nonce: u64,
    },
    /// Phase one of a cluster-wide role change: may `node` become Primary?
    StatePrepare {
        transaction: u64,
        node: u8,
        /// Promoted with `--force` from data that was not UpToDate: the receiver's data is
        /// no longer current and it becomes Outdated on commit.
        outdate_peers: bool,
    },
    /// The answer to a prepare: `refusal` is None when the receiver agrees.
    StateReply {
        transaction: u64,
        refusal: Option<String>,
    },
    /// Phase two: the change happened.
    StateCommit {
        transaction: u64,
    },
    /// Phase two: the change was abandoned.
    StateAbort {
        transaction: u64,
    },
    PingAck {
        nonce: u64,
    },
    /// Two primaries (docs/protocol.md, "Postponed requests"): the resolver did not write the
    /// peer's write `seq`, which lay inside its own conflicting write; the request completes.
    Superseded {
        seq: u64,
    },
    /// Two primaries: the resolver did not write the peer's write `seq`, which overlapped its
    /// own write `after` (a sequence number of the resolver's data stream); the request is
    /// issued again once the writes up to `after` are applied at its origin.
    RetryWrite {
        seq: u64,
        after: u64,
    },
    /// `new-current-uuid --clear-bitmap`: the sender declared the blank replicas identical and
    /// took `uuid` as their first generation, UpToDate; a blank receiver does the same
    /// (docs/protocol.md, "The initial sync").
    SkipInitialSync {
        uuid: u64,
    },

    /// Resync (docs/protocol.md, "Resync"): a part of the sender's out-of-sync bitmap for the
    /// receiver, as runs of (first block, count) in order; `last` ends the exchange.
    SyncBitmap {
        runs: Vec<(u64, u64)>,
        last: bool,
        /// The sender means to be the sync source (else the target). A receiver without a
        /// resync takes the other side; two that chose the same side settle it by a rule both
        /// apply alike (docs/protocol.md, "Resync").
        from_source: bool,
    },
    /// The sync target asks for these blocks (4 KiB aligned).
    ResyncRequest {
        offset: u64,
        len: u64,
    },
    /// The sync source's data for a request (the shell holds the payload: the core sees the
    /// header only, as [`crate::core::resource::Input::ResyncData`]).
    ResyncData {
        offset: u64,
        data: Vec<u8>,
    },
    /// The sync source could not read the blocks (its errno).
    ResyncFailed {
        offset: u64,
        len: u64,
        errno: i32,
    },
    /// The sync target wrote the blocks (`ok`), or failed to.
    ResyncWritten {
        offset: u64,
        len: u64,
        ok: bool,
    },
    /// The sync target has every block: the resync is over. It follows the target's last
    /// `ResyncWritten` on the resync stream, so the source has seen them all.
    ResyncDone {
        moved_bytes: u64,
    },
    /// Checksum-based resync: the target's request, with one SHA-256 digest per 4 KiB block
    /// of its own data (the source answers `ResyncSame` where all match, else `ResyncData`).
    ResyncChecksums {
        offset: u64,
        len: u64,
        digests: Vec<[u8; 32]>,
    },
    /// The source's blocks are the same as the target's: nothing to move.
    ResyncSame {
        offset: u64,
        len: u64,
    },
    /// Online verify: digests of these blocks, please.
    VerifyRequest {
        offset: u64,
        len: u64,
    },
    /// One SHA-256 digest per 4 KiB block of the request, or `errno` (non-zero) when the
    /// blocks could not be read (then no digests).
    VerifyReply {
        offset: u64,
        len: u64,
        digests: Vec<[u8; 32]>,
        errno: i32,
    },
}

/// The stream a message travels on (docs/protocol.md, "Streams").
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StreamKind {
    /// Acknowledgements, pings and the handshake.
    Control,
    /// Writes, barriers and state announcements, in order.
    Data,
    /// Resync traffic, so that it never queues behind application writes.
    Resync,
}

impl PeerMessage {
    /// The message's name, for logs and protocol errors.
    pub fn name(&self) -> &'static str {
        match self {
            PeerMessage::Hello { .. } => "Hello",
            PeerMessage::Refused { .. } => "Refused",
            PeerMessage::State { .. } => "State",
            PeerMessage::Data { .. } => "Data",
            PeerMessage::Discard { .. } => "Discard",
            PeerMessage::Barrier { .. } => "Barrier",
            PeerMessage::RecvAck { .. } => "RecvAck",
            PeerMessage::WriteAck { .. } => "WriteAck",
            PeerMessage::NegAck { .. } => "NegAck",
            PeerMessage::BarrierAck { .. } => "BarrierAck",
            PeerMessage::Ping { .. } => "Ping",
            PeerMessage::PingAck { .. } => "PingAck",
            PeerMessage::StatePrepare { .. } => "StatePrepare",
            PeerMessage::StateReply { .. } => "StateReply",
            PeerMessage::StateCommit { .. } => "StateCommit",
            PeerMessage::StateAbort { .. } => "StateAbort",
            PeerMessage::SkipInitialSync { .. } => "SkipInitialSync",
            PeerMessage::Superseded { .. } => "Superseded",
            PeerMessage::RetryWrite { .. } => "RetryWrite",
            PeerMessage::SyncBitmap { .. } => "SyncBitmap",
            PeerMessage::ResyncRequest { .. } => "ResyncRequest",
            PeerMessage::ResyncData { .. } => "ResyncData",
            PeerMessage::ResyncFailed { .. } => "ResyncFailed",
            PeerMessage::ResyncWritten { .. } => "ResyncWritten",
            PeerMessage::ResyncDone { .. } => "ResyncDone",
            PeerMessage::ResyncChecksums { .. } => "ResyncChecksums",
            PeerMessage::ResyncSame { .. } => "ResyncSame",
            PeerMessage::VerifyRequest { .. } => "VerifyRequest",
            PeerMessage::VerifyReply { .. } => "VerifyReply",
        }
    }

    /// Whether the message travels on the ordered data stream. Role and state announcements
    /// travel there too, so that a peer learns that this node became Primary before it sees
    /// the first write of that Primary (docs/protocol.md, "Streams").
    pub fn on_data_stream(&self) -> bool {
        self.stream() == StreamKind::Data
    }

    pub fn stream(&self) -> StreamKind {
        if matches!(
            self,
            PeerMessage::SyncBitmap { .. }
                | PeerMessage::ResyncRequest { .. }
                | PeerMessage::ResyncData { .. }
                | PeerMessage::ResyncFailed { .. }
                | PeerMessage::ResyncWritten { .. }
                | PeerMessage::ResyncDone { .. }
                | PeerMessage::ResyncChecksums { .. }
                | PeerMessage::ResyncSame { .. }
                | PeerMessage::VerifyRequest { .. }
                | PeerMessage::VerifyReply { .. }
        ) {
            return StreamKind::Resync;
        }
        let data = matches!(
            self,
            PeerMessage::Data { .. }
                | PeerMessage::Discard { .. }
                | PeerMessage::Barrier { .. }
                | PeerMessage::State { .. }
                | PeerMessage::StatePrepare { .. }
                | PeerMessage::StateCommit { .. }
                | PeerMessage::StateAbort { .. }
                | PeerMessage::SkipInitialSync { .. }
        );
        if data {
            StreamKind::Data
        } else {
            StreamKind::Control
        }
    }
}
