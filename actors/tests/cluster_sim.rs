//! A seeded, deterministic simulation of whole clusters: two or three complete `ResourceCore`s
//! wired together by a simulated network, with simulated stores, driven by a random scheduler.
//!
//! The shell of each node carries out its core's effects the way the real shells do, but every
//! asynchronous step (local I/O, applying a peer's write, flushes, metadata updates, dials, the
//! delivery of each message) waits in a queue until the scheduler picks it, so completions,
//! deliveries and timers interleave in every order a seed can produce.
//!
//! * Network: a connection has one FIFO per direction and stream (control and data stream, as
//!   [`PeerMessage::on_data_stream`] says). Delivery picks any non-empty FIFO, so messages are
//!   reordered across streams and connections but never within one. Faults: long pauses (time
//!   jumps, so liveness timers fire), dropped connections, partitions (dials fail, connections
//!   torn), crash and restart of a node.
//! * Stores hold, per 4 KiB block, the id of the write that last wrote it (0: zeros) and a
//!   volatile write cache: a crash keeps a random part of the cache and loses the rest; only a
//!   flush makes it durable. Metadata is durable once its Persist effect completed.
//! * Admin commands: promote (also forced, also two nodes racing), demote, suspend/resume I/O,
//!   connect/disconnect, shutdown (then the node comes up again).
//!
//! * Two primaries: a quarter of the seeds are a pair with `allow_two_primaries` (protocol C).
//!   Both nodes are promoted often and write a few hot blocks, so their writes collide; a
//!   postponed write goes to a retry queue and is re-submitted later, as the RetryActor does;
//!   a conflict may stall the loser's disk for longer than the request timeout.
//!
//! Invariants (checked after every step unless said otherwise):
//! * at most one Primary among nodes connected to each other (unless two primaries are
//!   allowed); globally at most one Primary unless a promotion happened that the protocol
//!   cannot keep unique (forced, or in a three-node cluster without every peer connected: the
//!   core has no quorum);
//! * a node's store is written by application writes only while it is Primary, and by a peer's
//!   writes only with data that peer originated, and never while it is Primary itself;
//! * a protocol-C write that completes is on the store of every peer connected at that moment
//!   (unless counted out of sync for it; with two primaries, unless the resolver superseded it,
//!   or the peer's own write followed it there);
//! * a flush that completes made every write completed before it durable (survives a crash);
//! * SuspendIo/ResumeIo/Connect/Disconnect are answered in the same step; every command gets
//!   exactly one answer, every request exactly one completion;
//! * when the faults stop and I/O is resumed (quiescence): no request is stuck, every command
//!   was answered, application-I/O counts are zero, and two connected UpToDate nodes hold the
//!   same bytes except in blocks that either counts out of sync for the other.
//!
//! Without tolerances: writes in flight when their node crashed, and a demoted node's writes
//! still at its store, are covered by the activity log and the one conflict domain (received
//! writes joined it with two primaries); replicas compared at quiescence must be equal except
//! in blocks either counts out of sync.
//!
//! A failing seed prints its seed and the last steps; `QRBD_SIM_SEED=<n>` replays it,
//! `QRBD_SIM_SEEDS=<n>` runs more seeds.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::fmt::Write as _;

use qrbd_actors::core::generation::JUST_CREATED_UUID;
use qrbd_actors::core::messages::{PeerMessage, StreamKind};
use qrbd_actors::core::replication::Outgoing;
use qrbd_actors::core::resource::{
    Command, CommandError, CommandId, CoreConfig, DigestPurpose, Effect, Input, PeerConfig,
    PeerWrite, ResourceCore, Timing, CONFLICT_TIMEOUT,
};
use qrbd_actors::core::resource::{RateControl, SyncConfig};
use qrbd_actors::core::split_brain::{AfterSb0Pri, AfterSb1Pri, AfterSb2Pri, SplitBrainPolicy};
use qrbd_actors::core::{
    ByteRange, ConnectionState, DiskState, IoKind, ReplicationProtocol, RequestId, Role, Tick,
};
use qrbd_actors::meta::{BitmapChunk, BitmapUpdate, DeviceMeta, StoredBitmaps};

const BLOCK: u64 = 4096;
/// Three activity-log extents (4 MiB each), so that extents leave the log.
const BLOCKS: u64 = 3 * EXTENT_BLOCKS;
/// Blocks per activity-log extent.
const EXTENT_BLOCKS: u64 = 1024;
/// The blocks the workload uses at the start of each extent (the rest stays as it was).
const USED_PER_EXTENT: u64 = 12;
const SIZE: u64 = BLOCKS * BLOCK;
const SEEDS: u64 = 4000;
const STEPS: u64 = 400;
const MS: Tick = 1_000_000;
const SECOND: Tick = 1_000 * MS;
const TRACE_LINES: usize = 200;
const RESOURCE: &str = "r0";

#[path = "common/rng.rs"]
mod rng;
use rng::Rng;

/// What happened over all seeds; the run fails if some behaviour never happened.
#[derive(Debug, Default, Clone, Copy)]
struct Coverage {
    reordered_deliveries: u64,
    pauses_with_timeouts: u64,
    connection_drops: u64,
    partitions: u64,
    crashes: u64,
    race_one_won: u64,
    race_both_refused: u64,
    c_writes_replicated: u64,
    writes_new_generation: u64,
    forced_promotions: u64,
    outdated: u64,
    refused_two_primaries: u64,
    refused_split_brain: u64,
    promotions: u64,
    demotions: u64,
    shutdowns: u64,
    flushes_checked: u64,
    replicas_compared: u64,
    epochs_checked: u64,
    pairs_converged: u64,
    resyncs_finished: u64,
    resyncs_fixed_rate: u64,
    split_brains_resolved: u64,
    inconsistent: u64,
    verifies_finished: u64,
    resync_same: u64,
    skipped_initial_syncs: u64,
    initial_syncs_compared: u64,
    initial_syncs_resumed: u64,
    two_primaries_connected: u64,
    superseded: u64,
    retries_asked: u64,
    resubmitted: u64,
    retried_twice: u64,
    conflict_timeouts: u64,
    drains_with_parked_writes: u64,
}

impl Coverage {
    fn add(&mut self, o: &Coverage) {
        self.reordered_deliveries += o.reordered_deliveries;
        self.epochs_checked += o.epochs_checked;
        self.pauses_with_timeouts += o.pauses_with_timeouts;
        self.connection_drops += o.connection_drops;
        self.partitions += o.partitions;
        self.crashes += o.crashes;
        self.race_one_won += o.race_one_won;
        self.race_both_refused += o.race_both_refused;
        self.c_writes_replicated += o.c_writes_replicated;
        self.writes_new_generation += o.writes_new_generation;
        self.forced_promotions += o.forced_promotions;
        self.outdated += o.outdated;
        self.refused_two_primaries += o.refused_two_primaries;
        self.refused_split_brain += o.refused_split_brain;
        self.promotions += o.promotions;
        self.demotions += o.demotions;
        self.shutdowns += o.shutdowns;
        self.flushes_checked += o.flushes_checked;
        self.replicas_compared += o.replicas_compared;
        self.pairs_converged += o.pairs_converged;
        self.resyncs_finished += o.resyncs_finished;
        self.resyncs_fixed_rate += o.resyncs_fixed_rate;
        self.split_brains_resolved += o.split_brains_resolved;
        self.inconsistent += o.inconsistent;
        self.verifies_finished += o.verifies_finished;
        self.resync_same += o.resync_same;
        self.skipped_initial_syncs += o.skipped_initial_syncs;
        self.initial_syncs_compared += o.initial_syncs_compared;
        self.initial_syncs_resumed += o.initial_syncs_resumed;
        self.two_primaries_connected += o.two_primaries_connected;
        self.superseded += o.superseded;
        self.retries_asked += o.retries_asked;
        self.resubmitted += o.resubmitted;
        self.retried_twice += o.retried_twice;
        self.conflict_timeouts += o.conflict_timeouts;
        self.drains_with_parked_writes += o.drains_with_parked_writes;
    }

    fn missing(&self) -> Vec<&'static str> {
        let all = [
            ("message reorders", self.reordered_deliveries),
            (
                "pauses that fired a liveness timeout",
                self.pauses_with_timeouts,
            ),
            ("connection drops", self.connection_drops),
            ("partitions", self.partitions),
            ("crashes and restarts", self.crashes),
            ("promotion races one node won", self.race_one_won),
            ("promotion races both lost", self.race_both_refused),
            (
                "protocol-C writes completed while connected",
                self.c_writes_replicated,
            ),
            (
                "writes in a new data generation",
                self.writes_new_generation,
            ),
            ("forced promotions", self.forced_promotions),
            ("Outdated disks", self.outdated),
            (
                "handshakes refused: two primaries",
                self.refused_two_primaries,
            ),
            ("handshakes refused: split brain", self.refused_split_brain),
            ("promotions", self.promotions),
            ("demotions", self.demotions),
            ("shutdowns", self.shutdowns),
            ("flushes checked", self.flushes_checked),
            ("replicas compared", self.replicas_compared),
            (
                "two-node pairs converged at quiescence",
                self.pairs_converged,
            ),
            ("resyncs that moved blocks", self.resyncs_finished),
            (
                "resyncs that moved blocks with the controller off",
                self.resyncs_fixed_rate,
            ),
            ("split brains resolved", self.split_brains_resolved),
            ("Inconsistent disks (sync targets)", self.inconsistent),
            ("online verifies finished", self.verifies_finished),
            (
                "checksum-based resync requests found the same",
                self.resync_same,
            ),
            ("peer writes applied in epoch order", self.epochs_checked),
            (
                "initial syncs skipped (new-current-uuid --clear-bitmap)",
                self.skipped_initial_syncs,
            ),
            (
                "replicas of different blank disks compared after the initial sync",
                self.initial_syncs_compared,
            ),
            (
                "interrupted initial syncs resumed from the bitmaps",
                self.initial_syncs_resumed,
            ),
            (
                "steps with two Primaries connected to each other",
                self.two_primaries_connected,
            ),
            ("peer writes superseded by the resolver", self.superseded),
            ("peer writes answered RetryWrite", self.retries_asked),
            (
                "postponed writes re-submitted through the retry queue",
                self.resubmitted,
            ),
            (
                "writes postponed a second time after their re-submission",
                self.retried_twice,
            ),
            (
                "connections dropped for a conflict that did not resolve in time",
                self.conflict_timeouts,
            ),
            (
                "demotions or shutdowns begun while a postponed write was parked",
                self.drains_with_parked_writes,
            ),
        ];
        all.iter()
            .filter(|(_, n)| *n == 0)
            .map(|(name, _)| *name)
            .collect()
    }
}

/// The generation the replicas share when a run starts with its initial sync long skipped.
const FIRST_GENERATION: u64 = 0x5EED_0000_0000_0010;

/// Write ids from here on stand for what a disk held before `create-md`.
const OLD_CONTENTS: u64 = 1 << 48;

/// A store: per block the write id and a version (the store's write counter), durable part
/// and volatile cache.
#[derive(Debug, Clone)]
struct Store {
    durable: Vec<(u64, u64)>,
    cache: BTreeMap<u64, (u64, u64)>,
    next_version: u64,
}

impl Store {
    fn new() -> Self {
        Store {
            durable: vec![(0, 0); BLOCKS as usize],
            cache: BTreeMap::new(),
            next_version: 1,
        }
    }

    /// Writes `wid` (0 for a discard) to the blocks; returns the version given to each.
    fn write(&mut self, offset: u64, len: u64, wid: u64) -> Vec<(u64, u64)> {
        let mut written = Vec::new();
        for block in offset / BLOCK..(offset + len).div_ceil(BLOCK) {
            let version = self.next_version;
            self.next_version += 1;
            self.cache.insert(block, (version, wid));
            written.push((block, version));
        }
        written
    }

    /// A disk that held something else before `create-md`: every block differs from every
    /// other node's, so only a full initial sync makes two replicas equal.
    fn with_old_contents(node: u8) -> Self {
        let mut store = Store::new();
        for (block, entry) in store.durable.iter_mut().enumerate() {
            *entry = (0, OLD_CONTENTS + u64::from(node) * BLOCKS + block as u64);
        }
        store
    }

    fn read(&self, block: u64) -> u64 {
        self.cache
            .get(&block)
            .copied()
            .unwrap_or(self.durable[block as usize])
            .1
    }

    fn flush(&mut self) {
        for (block, entry) in std::mem::take(&mut self.cache) {
            self.durable[block as usize] = entry;
        }
    }

    /// A crash: the cache may have written back some blocks on its own; the rest is lost.
    fn crash(&mut self, rng: &mut Rng) {
        for (block, entry) in std::mem::take(&mut self.cache) {
            if rng.percent(50) {
                self.durable[block as usize] = entry;
            }
        }
    }
}

/// An application request the shell holds.
#[derive(Debug, Clone)]
struct AppRequest {
    kind: IoKind,
    range: ByteRange,
    wid: u64,
    as_primary: bool,
    /// When the application issued it (kept across re-submissions).
    start: Tick,
    /// How often a peer's RetryWrite postponed it.
    times_postponed: u32,
    /// The resolver answered it Superseded.
    superseded: bool,
    /// Blocks and store versions of the local write, once done.
    written: Vec<(u64, u64)>,
    /// For a flush: the completed writes it must make durable.
    must_persist: Vec<(u64, u64)>,
}

/// Asynchronous work of a node's shell, finished when the scheduler picks it.
#[derive(Debug, Clone)]
enum Work {
    Local(RequestId),
    /// The retry actor re-submits a postponed request.
    Resubmit(RequestId),
    Apply {
        peer: u8,
        conn: u64,
        seq: u64,
        epoch: u64,
        offset: u64,
        len: u64,
        wid: u64,
    },
    PeerFlush {
        peer: u8,
        conn: u64,
        epoch: u64,
    },
    LocalFlush(u64),
    Persist(u64, Box<DeviceMeta>),
    PersistBitmaps(u64, Box<BitmapUpdate>),
    /// Read blocks for a resync and send them.
    ResyncRead {
        peer: u8,
        conn: u64,
        offset: u64,
        len: u64,
    },
    ResyncWrite {
        peer: u8,
        conn: u64,
        offset: u64,
        blocks: Vec<u64>,
    },
    /// Online verify: a digest per block (the write id it holds stands for its bytes).
    Digest {
        peer: u8,
        conn: u64,
        offset: u64,
        len: u64,
        purpose: DigestPurpose,
    },
}

struct Node {
    id: u8,
    core: ResourceCore,
    store: Store,
    persisted: DeviceMeta,
    incarnation: u64,
    work: Vec<Work>,
    requests: BTreeMap<RequestId, AppRequest>,
    next_request: RequestId,
    /// Payloads received, by (peer, conn, seq): the write id (0: discard) and its epoch.
    payloads: BTreeMap<(u8, u64, u64), (u64, u64)>,
    /// Per (peer, conn): the last epoch of the peer's writes flushed here.
    flushed_epochs: BTreeMap<(u8, u64), u64>,
    /// The connection the core uses per peer: (local conn number, global connection).
    current: BTreeMap<u8, (u64, u64)>,
    next_conn: u64,
    /// Completed writes (block, version) no completed flush covers yet.
    unflushed: Vec<(u64, u64)>,
    /// What is durable of the bitmaps and the activity log.
    bitmaps: StoredBitmapsModel,
    /// Resync payloads received, by (peer, conn, offset).
    resync_payloads: BTreeMap<(u8, u64, u64), Vec<u64>>,
    /// The request each replicated write was sent for, by (peer, sequence number).
    sent: BTreeMap<(u8, u64), RequestId>,
}

/// The durable bitmaps, like a metadata store keeps them.
#[derive(Debug, Clone, Default)]
struct StoredBitmapsModel {
    activity_log: Vec<u64>,
    chunks: BTreeMap<(u8, u64), BitmapChunk>,
}

impl StoredBitmapsModel {
    fn apply(&mut self, update: &BitmapUpdate) {
        if let Some(hot) = &update.activity_log {
            self.activity_log = hot.clone();
        }
        for chunk in &update.chunks {
            if chunk.is_clean() {
                self.chunks.remove(&(chunk.peer, chunk.extent));
            } else {
                self.chunks
                    .insert((chunk.peer, chunk.extent), chunk.clone());
            }
        }
    }

    fn stored(&self) -> StoredBitmaps {
        StoredBitmaps {
            activity_log: self.activity_log.clone(),
            chunks: self.chunks.values().cloned().collect(),
        }
    }
}

/// A message in flight.
#[derive(Debug, Clone)]
enum Wire {
    Message(PeerMessage),
    Write(PeerWrite, u64),
    /// A sync source's blocks: the write id held by each block it read.
    ResyncData {
        offset: u64,
        blocks: Vec<u64>,
    },
}

const STREAM_CONTROL: u8 = 0;
const STREAM_DATA: u8 = 1;
const STREAM_RESYNC: u8 = 2;

fn stream_of(message: &PeerMessage) -> u8 {
    match message.stream() {
        StreamKind::Control => STREAM_CONTROL,
        StreamKind::Data => STREAM_DATA,
        StreamKind::Resync => STREAM_RESYNC,
    }
}

struct Connection {
    /// (node, its conn number) of both ends.
    ends: [(u8, u64); 2],
}

/// A pending command: which node, what, and whether it must be answered at once.
#[derive(Debug, Clone, Copy)]
struct Pending {
    node: u8,
    command: Command,
    forced_from: Option<(DiskState, bool)>,
}

struct Sim {
    seed: u64,
    /// Both nodes may be Primary (`allow_two_primaries`).
    dual: bool,
    /// A node whose disk finishes nothing until then (two primaries' seeds).
    stalled: Option<(u8, Tick)>,
    quiescing: bool,
    /// A node whose disk stalls right after this step, while the network and time go on.
    stall_next: Option<u8>,
    rng: Rng,
    now: Tick,
    step: u64,
    protocol: ReplicationProtocol,
    nodes: Vec<Node>,
    conns: BTreeMap<u64, Connection>,
    next_gid: u64,
    /// (connection, from node, data stream) -> FIFO of (send order, message).
    streams: BTreeMap<(u64, u8, u8), VecDeque<(u64, Wire)>>,
    next_send: u64,
    dials: Vec<(u8, u8)>,
    partitioned: BTreeSet<(u8, u8)>,
    next_wid: u64,
    /// Write id -> the node whose application wrote it.
    origin: BTreeMap<u64, u8>,
    next_command: CommandId,
    commands: BTreeMap<CommandId, Pending>,
    answered: BTreeMap<CommandId, Result<String, CommandError>>,
    /// Two racing promotions, until both are answered.
    races: Vec<(CommandId, u8, CommandId, u8)>,
    /// Two Primaries may legitimately exist (no quorum in the core).
    split_possible: bool,
    /// The disks held different data before `create-md`: skipping the initial sync would be
    /// the operator's mistake, so the workload never does.
    old_contents: bool,
    /// The resync settings of a seed (split-brain policy, csums, rate controller, activity-log
    /// size), the same on every node.
    sync: SyncConfig,
    /// A calm seed has no faults and writes mostly on the Primary: long stretches of plain
    /// replication, so that its invariants are exercised as much as the fault handling.
    calm: bool,
    queue: VecDeque<(u8, Input)>,
    trace: VecDeque<String>,
    hash: u64,
    verbose: bool,
    cov: Coverage,
}

fn name(id: u8) -> String {
    format!("n{id}")
}

fn config(
    id: u8,
    nodes: u8,
    protocol: ReplicationProtocol,
    seed: u64,
    sync: &SyncConfig,
    allow_two_primaries: bool,
) -> CoreConfig {
    // Two primaries' seeds stall disks for longer than a request may take: a conflict whose
    // writes cannot land in time drops the connection.
    let ko_count = if allow_two_primaries { 1 } else { 7 };
    CoreConfig {
        resource: RESOURCE.into(),
        node_id: id,
        node_name: name(id),
        size_bytes: SIZE,
        protocol,
        disk_flushes: true,
        peers: (1..=nodes)
            .filter(|p| *p != id)
            .map(|p| PeerConfig {
                id: p,
                name: name(p),
            })
            .collect(),
        timing: Timing {
            refused_backoff: 2 * SECOND,
            ko_count,
            ..Timing::default()
        },
        seed,
        sync: sync.clone(),
        allow_two_primaries,
    }
}

/// The rate controller of a seed, and the size of its resync requests: small requests, so
/// that a resync of the small disk takes many, and every mode of the controller (off with a
/// fixed rate or none, fill or delay target, rate caps, yielding to application writes or not).
/// Drawn from a generator of its own, so that the rest of a seed's run does not change.
fn rate_control(seed: u64) -> (RateControl, u64) {
    let mut rng = Rng::new(seed ^ 0x5eed_c0de_0000_0001);
    let ms = MS;
    let control = RateControl {
        plan_ahead: [0, 0, 100 * ms, 500 * ms, 2 * SECOND, 5 * SECOND][rng.below(6) as usize],
        fill_target: [0, BLOCK, 4 * BLOCK, 16 * BLOCK, 8 << 20][rng.below(5) as usize],
        delay_target: [100 * ms, SECOND][rng.below(2) as usize],
        max_rate: [0, 0, 64 << 10, 256 << 10, 1 << 20][rng.below(5) as usize],
        min_rate: [0, 4 << 10, 4 << 20][rng.below(3) as usize],
        fixed_rate: [0, 64 << 10, 1 << 20][rng.below(3) as usize],
    };
    let request_bytes = [BLOCK, 2 * BLOCK, 4 * BLOCK, 256 << 10][rng.below(4) as usize];
    (control, request_bytes)
}

/// The split-brain policy of a seed (the same on every node, as operators must configure it).
fn split_brain_policy(rng: &mut Rng) -> SplitBrainPolicy {
    SplitBrainPolicy {
        after_sb_0pri: match rng.below(6) {
            0 => AfterSb0Pri::Disconnect,
            1 => AfterSb0Pri::DiscardZeroChanges,
            2 => AfterSb0Pri::DiscardLeastChanges,
            3 => AfterSb0Pri::DiscardYoungerPrimary,
            4 => AfterSb0Pri::DiscardOlderPrimary,
            _ => AfterSb0Pri::DiscardNode(name(1)),
        },
        after_sb_1pri: match rng.below(3) {
            0 => AfterSb1Pri::Disconnect,
            1 => AfterSb1Pri::Consensus,
            _ => AfterSb1Pri::DiscardSecondary,
        },
        after_sb_2pri: AfterSb2Pri::Disconnect,
    }
}

impl Sim {
    fn new(seed: u64) -> Self {
        let mut rng = Rng::new(seed);
        let mut count = if rng.percent(50) { 2 } else { 3 };
        let mut protocol = match rng.below(6) {
            0 => ReplicationProtocol::A,
            1 => ReplicationProtocol::B,
            _ => ReplicationProtocol::C,
        };
        // Two primaries: a pair, protocol C, both configured for it.
        let dual = rng.percent(25);
        if dual {
            count = 2;
            protocol = ReplicationProtocol::C;
        }
        let split_brain = split_brain_policy(&mut rng);
        let csums = rng.percent(50);
        let (rate, request_bytes) = rate_control(seed);
        // A log of one or two extents makes extents leave it all the time.
        let al_extents = match rng.below(3) {
            0 => 1,
            1 => 2,
            _ => qrbd_actors::core::activity_log::DEFAULT_AL_EXTENTS,
        };
        let sync = SyncConfig {
            split_brain,
            csums,
            rate,
            request_bytes,
            al_extents,
        };
        // Fresh metadata (blank, Inconsistent) on new disks or on disks with old contents;
        // otherwise a cluster whose initial sync was skipped long ago.
        // (Two primaries' seeds start in sync, to spend their steps on conflicts.)
        let blank = rng.percent(25) && !dual;
        let old_contents = blank && rng.percent(50);
        let nodes = (1..=count)
            .map(|id| {
                let meta = if blank {
                    DeviceMeta::blank(RESOURCE, id, SIZE)
                } else {
                    // What `new-current-uuid --clear-bitmap` leaves.
                    let mut meta = DeviceMeta::new(RESOURCE, id, SIZE, FIRST_GENERATION);
                    meta.history_uuids = vec![JUST_CREATED_UUID];
                    meta
                };
                Node {
                    id,
                    core: ResourceCore::new(
                        config(id, count, protocol, seed ^ u64::from(id) << 32, &sync, dual),
                        meta.clone(),
                        0,
                    ),
                    store: if old_contents {
                        Store::with_old_contents(id)
                    } else {
                        Store::new()
                    },
                    persisted: meta,
                    incarnation: 0,
                    work: Vec::new(),
                    requests: BTreeMap::new(),
                    next_request: 1,
                    payloads: BTreeMap::new(),
                    flushed_epochs: BTreeMap::new(),
                    current: BTreeMap::new(),
                    next_conn: 1,
                    unflushed: Vec::new(),
                    bitmaps: StoredBitmapsModel::default(),
                    resync_payloads: BTreeMap::new(),
                    sent: BTreeMap::new(),
                }
            })
            .collect();
        let calm = rng.percent(if dual { 60 } else { 35 });
        let mut sim = Sim {
            seed,
            dual,
            stalled: None,
            quiescing: false,
            stall_next: None,
            calm,
            rng,
            now: 0,
            step: 0,
            protocol,
            nodes,
            conns: BTreeMap::new(),
            next_gid: 1,
            streams: BTreeMap::new(),
            next_send: 1,
            dials: Vec::new(),
            partitioned: BTreeSet::new(),
            next_wid: 1,
            origin: BTreeMap::new(),
            next_command: 1,
            commands: BTreeMap::new(),
            answered: BTreeMap::new(),
            races: Vec::new(),
            split_possible: false,
            old_contents,
            sync,
            queue: VecDeque::new(),
            trace: VecDeque::new(),
            hash: 0xcbf2_9ce4_8422_2325,
            verbose: std::env::var_os("QRBD_SIM_TRACE").is_some(),
            cov: Coverage::default(),
        };
        sim.log(format!(
            "{count} nodes, protocol {protocol}{}",
            if dual { ", two primaries allowed" } else { "" }
        ));
        sim.log(format!(
            "resync requests of {} bytes, {:?}",
            sim.sync.request_bytes, sim.sync.rate
        ));
        for id in 1..=count {
            sim.effects(id);
        }
        sim.run_queue();
        sim
    }

    fn log(&mut self, line: String) {
        for byte in line.bytes() {
            self.hash = (self.hash ^ u64::from(byte)).wrapping_mul(0x0100_0000_01b3);
        }
        // Liveness chatter would push everything else out of the ring.
        if line.contains(": Ping") {
            return;
        }
        if self.verbose {
            eprintln!("[{}] {line}", self.step);
        }
        if self.trace.len() == TRACE_LINES {
            self.trace.pop_front();
        }
        self.trace
            .push_back(format!("[{} t={}ms] {line}", self.step, self.now / MS));
    }

    fn fail(&self, what: &str) -> ! {
        let mut text = String::new();
        for line in &self.trace {
            let _ = writeln!(text, "  {line}");
        }
        panic!(
            "cluster simulation seed {} step {}: {what}\nlast steps:\n{text}replay with QRBD_SIM_SEED={}",
            self.seed, self.step, self.seed
        );
    }

    fn ensure(&self, ok: bool, what: impl FnOnce() -> String) {
        if !ok {
            self.fail(&what());
        }
    }

    fn node(&mut self, id: u8) -> &mut Node {
        &mut self.nodes[usize::from(id - 1)]
    }

    fn ids(&self) -> Vec<u8> {
        self.nodes.iter().map(|n| n.id).collect()
    }

    // ----- feeding inputs and carrying out effects -----

    fn feed(&mut self, id: u8, input: Input) {
        self.queue.push_back((id, input));
        self.run_queue();
    }

    fn run_queue(&mut self) {
        while let Some((id, input)) = self.queue.pop_front() {
            let now = self.now;
            self.node(id).core.handle(now, input);
            self.effects(id);
            if self.node(id).core.is_down() {
                self.restart(id, false);
            }
        }
    }

    fn effects(&mut self, id: u8) {
        while let Some(effect) = self.node(id).core.poll_effect() {
            self.effect(id, effect);
        }
    }

    fn effect(&mut self, id: u8, effect: Effect) {
        match effect {
            Effect::StartLocal(rid) => {
                self.log(format!("n{id} starts #{rid}"));
                self.node(id).work.push(Work::Local(rid));
            }
            Effect::Complete(rid, result) => self.completed(id, rid, result.is_ok()),
            Effect::Postponed(rid) => {
                self.ensure(self.dual, || format!("n{id}: request {rid} postponed"));
                let Some(req) = self.node(id).requests.get_mut(&rid) else {
                    self.fail(&format!("n{id}: unknown request {rid} postponed"));
                };
                req.times_postponed += 1;
                if req.times_postponed == 2 {
                    self.cov.retried_twice += 1;
                }
                self.log(format!("n{id} postpones #{rid}: to the retry queue"));
                self.node(id).work.push(Work::Resubmit(rid));
            }
            Effect::SendData { peer, outgoing } => {
                let (wire, request) = match outgoing {
                    Outgoing::Data {
                        request,
                        seq,
                        epoch,
                        seen,
                    }
                    | Outgoing::Discard {
                        request,
                        seq,
                        epoch,
                        seen,
                    } => {
                        let Some(req) = self.node(id).requests.get(&request).cloned() else {
                            self.fail(&format!("n{id}: sends unknown request {request}"));
                        };
                        let discard = matches!(outgoing, Outgoing::Discard { .. });
                        self.node(id).sent.insert((peer, seq), request);
                        let write = PeerWrite {
                            seq,
                            epoch,
                            request,
                            offset: req.range.offset,
                            seen,
                            len: req.range.len,
                            discard,
                        };
                        (
                            Wire::Write(write, if discard { 0 } else { req.wid }),
                            Some(request),
                        )
                    }
                    Outgoing::Barrier {
                        seq,
                        epoch,
                        writes,
                        flush,
                    } => (
                        Wire::Message(PeerMessage::Barrier {
                            seq,
                            epoch,
                            writes,
                            flush,
                        }),
                        None,
                    ),
                };
                self.send(id, peer, STREAM_DATA, wire);
                if let (Some(request), ReplicationProtocol::A) = (request, self.protocol) {
                    self.queue
                        .push_back((id, Input::PeerSent { peer, request }));
                }
            }
            Effect::Send { peer, message } => {
                let stream = stream_of(&message);
                self.send(id, peer, stream, Wire::Message(message));
            }
            Effect::ApplyPeerWrite { peer, conn, write } => {
                let PeerWrite {
                    seq,
                    offset,
                    len,
                    discard,
                    ..
                } = write;
                let Some((wid, epoch)) = self.node(id).payloads.remove(&(peer, conn, seq)) else {
                    self.fail(&format!(
                        "n{id}: applies unknown payload {peer}/{conn}/{seq}"
                    ));
                };
                // Epochs apply in order: a write of epoch E starts only once every earlier
                // epoch of that connection is written and flushed.
                let flushed = self
                    .node(id)
                    .flushed_epochs
                    .get(&(peer, conn))
                    .copied()
                    .unwrap_or(0);
                self.ensure(epoch <= flushed + 1, || {
                    format!("n{id} applies n{peer}'s write of epoch {epoch} before epoch {} was flushed", flushed + 1)
                });
                self.cov.epochs_checked += 1;
                let role = self.node(id).core.role();
                self.ensure(role != Role::Primary || self.dual, || {
                    format!("n{id} applies a write of n{peer} while Primary")
                });
                let from = self.origin.get(&wid).copied();
                self.ensure(discard || from == Some(peer), || {
                    format!("n{id} applies write {wid} of {from:?} received from n{peer}")
                });
                self.node(id).work.push(Work::Apply {
                    peer,
                    conn,
                    seq,
                    epoch,
                    offset,
                    len,
                    wid: if discard { 0 } else { wid },
                });
            }
            Effect::ForgetPayload { peer, conn, seq } => {
                self.node(id).payloads.remove(&(peer, conn, seq));
            }
            Effect::FlushForPeer { peer, conn, epoch } => {
                let unwritten = self.node(id).work.iter().any(|w| {
                    matches!(w, Work::Apply { peer: p, conn: c, epoch: e, .. }
                        if *p == peer && *c == conn && *e <= epoch)
                });
                self.ensure(!unwritten, || {
                    format!(
                        "n{id} flushes n{peer}'s epoch {epoch} with writes of it still unwritten"
                    )
                });
                self.node(id)
                    .work
                    .push(Work::PeerFlush { peer, conn, epoch });
            }
            Effect::FlushLocal { token } => self.node(id).work.push(Work::LocalFlush(token)),
            Effect::Persist { version, meta } => self
                .node(id)
                .work
                .push(Work::Persist(version, Box::new(meta))),
            Effect::PersistBitmaps { version, update } => self
                .node(id)
                .work
                .push(Work::PersistBitmaps(version, Box::new(update))),
            Effect::SendResyncData {
                peer,
                conn,
                offset,
                len,
            } => self.node(id).work.push(Work::ResyncRead {
                peer,
                conn,
                offset,
                len,
            }),
            Effect::ApplyResyncWrite {
                peer,
                conn,
                offset,
                len,
            } => {
                let Some(blocks) = self.node(id).resync_payloads.remove(&(peer, conn, offset))
                else {
                    self.fail(&format!(
                        "n{id}: applies unknown resync payload {peer}/{conn}/{offset}"
                    ));
                };
                self.ensure(blocks.len() as u64 * BLOCK == len, || {
                    format!(
                        "n{id}: resync payload of {} blocks for {len} bytes",
                        blocks.len()
                    )
                });
                let role = self.node(id).core.role();
                self.ensure(role != Role::Primary, || {
                    format!("n{id} applies a resync write while Primary")
                });
                self.node(id).work.push(Work::ResyncWrite {
                    peer,
                    conn,
                    offset,
                    blocks,
                });
            }
            Effect::Digest {
                peer,
                conn,
                offset,
                len,
                purpose,
            } => self.node(id).work.push(Work::Digest {
                peer,
                conn,
                offset,
                len,
                purpose,
            }),
            Effect::Dial { peer } => self.dials.push((id, peer)),
            Effect::CloseConnection { peer, conn, reason } => {
                if reason.contains(CONFLICT_TIMEOUT) {
                    self.cov.conflict_timeouts += 1;
                }
                let gid = self.node(id).current.get(&peer).copied();
                if let Some((local, gid)) = gid.filter(|(local, _)| *local == conn) {
                    let _ = local;
                    self.log(format!("n{id} closes its connection to n{peer}: {reason}"));
                    self.tear(gid);
                }
            }
            Effect::CommandDone { id: cid, result } => self.command_done(id, cid, result),
            Effect::Event(line) => self.event(id, line),
        }
    }

    fn event(&mut self, id: u8, line: String) {
        if line.contains("disk:Inconsistent") {
            self.cov.inconsistent += 1;
        }
        if line.contains("verify-differing-blocks:") {
            self.cov.verifies_finished += 1;
        }
        if line.contains("initial-sync:resumed") {
            self.cov.initial_syncs_resumed += 1;
        }
        if line.contains("write:superseded") {
            self.cov.superseded += 1;
        }
        if line.contains("conflict ")
            && !self.quiescing
            && self.stalled.is_none()
            && self.rng.percent(30)
        {
            // The loser's disk stalls while the conflict is being resolved (carried out
            // after this step).
            self.stall_next = Some(3 - id);
        }
        if line.contains("write:retry") {
            self.cov.retries_asked += 1;
        }
        if line.contains("split-brain:resolved") {
            self.cov.split_brains_resolved += 1;
        }
        if line.contains("replication:Established moved:") && !line.ends_with("moved:0") {
            self.cov.resyncs_finished += 1;
            if !self.sync.rate.dynamic() {
                self.cov.resyncs_fixed_rate += 1;
            }
        }
        if line.contains("disk:Outdated") {
            self.cov.outdated += 1;
        }
        if line.contains("current-uuid:")
            && self.nodes[usize::from(id - 1)].core.role() == Role::Primary
        {
            self.cov.writes_new_generation += 1;
        }
        if line.contains("connection:StandAlone reason:") {
            if line.contains("Primary; two primaries") {
                self.cov.refused_two_primaries += 1;
            }
            if line.contains("split brain") {
                self.cov.refused_split_brain += 1;
            }
        }
        let short = line
            .replace("change ", "")
            .replace(&format!("name:{RESOURCE} "), "");
        self.log(format!("n{id} event {short}"));
    }

    fn send(&mut self, from: u8, to: u8, stream: u8, wire: Wire) {
        let Some((_, gid)) = self.node(from).current.get(&to).copied() else {
            return;
        };
        let order = self.next_send;
        self.next_send += 1;
        self.streams
            .entry((gid, from, stream))
            .or_default()
            .push_back((order, wire));
    }

    /// Tears connection `gid`: messages in flight are lost, both ends hear TransportDown.
    fn tear(&mut self, gid: u64) {
        let Some(conn) = self.conns.remove(&gid) else {
            return;
        };
        self.streams.retain(|(g, _, _), _| *g != gid);
        for (i, (node, local)) in conn.ends.into_iter().enumerate() {
            let peer = conn.ends[1 - i].0;
            let n = self.node(node);
            if n.current.get(&peer).is_some_and(|(l, _)| *l == local) {
                n.current.remove(&peer);
            }
            n.payloads
                .retain(|(p, c, _), _| !(*p == peer && *c == local));
            n.resync_payloads
                .retain(|(p, c, _), _| !(*p == peer && *c == local));
            self.queue.push_back((
                node,
                Input::TransportDown {
                    peer,
                    conn: local,
                    reason: "connection lost".into(),
                },
            ));
        }
    }

    fn completed(&mut self, id: u8, rid: RequestId, ok: bool) {
        let Some(req) = self.node(id).requests.remove(&rid) else {
            self.fail(&format!("n{id}: request {rid} completed twice or unknown"));
        };
        self.log(format!(
            "n{id} completes {:?} {}+{} ({}) {}",
            req.kind,
            req.range.offset / BLOCK,
            req.range.len / BLOCK,
            req.wid,
            if ok { "ok" } else { "failed" }
        ));
        if !ok {
            return;
        }
        match req.kind {
            IoKind::Write | IoKind::Discard => {
                self.ensure(req.as_primary, || {
                    format!("n{id}: write {rid} succeeded though submitted while Secondary")
                });
                self.node(id).unflushed.extend(req.written.iter().copied());
                if self.protocol == ReplicationProtocol::C && !req.superseded {
                    self.check_replicated(id, &req);
                }
            }
            IoKind::Flush => {
                let store = &self.nodes[usize::from(id - 1)].store;
                for (block, version) in &req.must_persist {
                    let durable = store.durable[*block as usize].0;
                    self.ensure(durable >= *version, || {
                        format!("n{id}: flush completed but block {block} version {version} is not durable (durable {durable})")
                    });
                }
                self.cov.flushes_checked += 1;
                let done: BTreeSet<(u64, u64)> = req.must_persist.iter().copied().collect();
                self.node(id).unflushed.retain(|w| !done.contains(w));
            }
            IoKind::Read => {}
        }
    }

    /// A protocol-C write completed: every connected peer that does not count the blocks out
    /// of sync holds it.
    fn check_replicated(&mut self, id: u8, req: &AppRequest) {
        let expected = if req.kind == IoKind::Discard {
            0
        } else {
            req.wid
        };
        let links: Vec<(u8, ConnectionState)> = self.nodes[usize::from(id - 1)]
            .core
            .links()
            .map(|l| (l.peer, l.connection))
            .collect();
        let mut replicated = false;
        for (peer, state) in links {
            if state != ConnectionState::Connected {
                continue;
            }
            for block in req.range.offset / BLOCK..req.range.end().unwrap_or(0).div_ceil(BLOCK) {
                let dirty = self.nodes[usize::from(id - 1)]
                    .core
                    .device()
                    .peer(peer)
                    .is_some_and(|s| s.out_of_sync.is_dirty(block));
                if dirty {
                    continue;
                }
                let there = self.nodes[usize::from(peer - 1)].store.read(block);
                // Two primaries: the peer's own concurrent write may have superseded this one
                // there (and lands here too), or followed it.
                // (Discards of either node leave 0.)
                let peers_own = self.dual && (there == 0 || self.origin.get(&there) == Some(&peer));
                self.ensure(there == expected || peers_own, || {
                    format!("n{id}: protocol-C write {} completed but n{peer} block {block} holds {there}", req.wid)
                });
                replicated = true;
            }
        }
        if replicated {
            self.cov.c_writes_replicated += 1;
        }
    }

    fn command_done(&mut self, id: u8, cid: CommandId, result: Result<String, CommandError>) {
        let Some(pending) = self.commands.remove(&cid) else {
            self.fail(&format!("n{id}: command {cid} answered twice or unknown"));
        };
        self.ensure(pending.node == id, || {
            format!("command {cid} answered by n{id}")
        });
        self.log(format!("n{id} {:?} -> {result:?}", pending.command));
        if let (Command::Promote { .. }, Ok(text)) = (pending.command, &result) {
            if text == "Primary" {
                self.cov.promotions += 1;
                let everyone = self.nodes[usize::from(id - 1)]
                    .core
                    .links()
                    .all(|l| l.connection == ConnectionState::Connected);
                if let Some((disk, connected)) = pending.forced_from {
                    if disk != DiskState::UpToDate || !connected {
                        self.cov.forced_promotions += 1;
                    }
                    // `--force` goes on without peers lost during the promotion, which may
                    // be promoting themselves.
                    self.split_possible = true;
                }
                if self.nodes.len() > 2 && !everyone {
                    self.split_possible = true;
                }
            }
        }
        if matches!(pending.command, Command::Demote) && result.is_ok() {
            self.cov.demotions += 1;
        }
        if matches!(pending.command, Command::Shutdown) && result.is_ok() {
            self.cov.shutdowns += 1;
        }
        if matches!(pending.command, Command::SkipInitialSync) && result.is_ok() {
            self.cov.skipped_initial_syncs += 1;
        }
        self.answered.insert(cid, result);
    }

    // ----- scheduler actions -----

    fn command(&mut self, id: u8, command: Command) -> CommandId {
        let cid = self.next_command;
        self.next_command += 1;
        let core = &self.nodes[usize::from(id - 1)].core;
        let forced_from = match command {
            Command::Promote { force: true } => Some((
                core.disk(),
                core.links()
                    .any(|l| l.connection == ConnectionState::Connected),
            )),
            _ => None,
        };
        self.commands.insert(
            cid,
            Pending {
                node: id,
                command,
                forced_from,
            },
        );
        self.log(format!("n{id} command {command:?} (#{cid})"));
        let parked = self.nodes[usize::from(id - 1)]
            .work
            .iter()
            .any(|w| matches!(w, Work::Resubmit(_)));
        if parked && matches!(command, Command::Demote | Command::Shutdown) {
            self.cov.drains_with_parked_writes += 1;
        }
        self.queue
            .push_back((id, Input::Command { id: cid, command }));
        cid
    }

    fn admin(&mut self, id: u8) {
        // Two primaries need both nodes promoted, and each demotion undoes one.
        let choice = if self.dual && self.rng.percent(50) {
            0
        } else {
            self.rng.below(20)
        };
        let command = match choice {
            0..=4 => Command::Promote {
                force: self.rng.percent(15),
            },
            5..=7 => Command::Demote,
            8..=10 => Command::SuspendIo,
            11..=14 => Command::ResumeIo,
            15..=16 => Command::Connect {
                discard_my_data: self.rng.percent(25),
            },
            17 => Command::Disconnect,
            18 if self.rng.percent(30) => Command::Shutdown,
            19 if self.rng.percent(30) => match self.rng.below(4) {
                0 => Command::Invalidate,
                1 => Command::InvalidateRemote,
                2 if !self.old_contents => Command::SkipInitialSync,
                _ => Command::Verify,
            },
            _ => Command::ResumeIo,
        };
        let cid = self.command(id, command);
        self.run_queue();
        if matches!(
            command,
            Command::SuspendIo
                | Command::ResumeIo
                | Command::Connect { .. }
                | Command::Disconnect
                | Command::Invalidate
                | Command::InvalidateRemote
                | Command::Verify
        ) {
            self.ensure(self.answered.contains_key(&cid), || {
                format!("n{id}: {command:?} was not answered in the same step")
            });
        }
    }

    fn race(&mut self) {
        let ids = self.ids();
        let a = ids[self.rng.below(ids.len() as u64) as usize];
        let b = ids[self.rng.below(ids.len() as u64) as usize];
        if a == b {
            return;
        }
        let force = self.rng.percent(10);
        let ca = self.command(a, Command::Promote { force });
        let cb = self.command(b, Command::Promote { force });
        self.run_queue();
        self.races.push((ca, a, cb, b));
    }

    fn settle_races(&mut self) {
        let races = std::mem::take(&mut self.races);
        for (ca, a, cb, b) in races {
            let (Some(ra), Some(rb)) = (self.answered.get(&ca), self.answered.get(&cb)) else {
                if self.commands.contains_key(&ca) || self.commands.contains_key(&cb) {
                    self.races.push((ca, a, cb, b));
                }
                continue;
            };
            let (ra, rb) = (ra.clone(), rb.clone());
            match (&ra, &rb) {
                (Ok(text), Err(e)) | (Err(e), Ok(text)) if text == "Primary" => {
                    let winner = name(if ra.is_ok() { a } else { b });
                    // Losing to the racing winner must name it; a loser refused because some
                    // third node is already Primary (possible after a partition) names that one.
                    if matches!(e, CommandError::LostRace(_))
                        || matches!(e, CommandError::PeerIsPrimary(p) if *p == winner)
                    {
                        let text = e.to_string();
                        // With three nodes, the third may be the one promoting or Primary.
                        if self.nodes.len() > 2 && !text.contains(&winner) {
                            continue;
                        }
                        self.ensure(text.contains(&winner), || {
                            format!("the loser of a promotion race does not name the winner {winner}: {text}")
                        });
                        self.cov.race_one_won += 1;
                    }
                }
                (Err(_), Err(_)) => self.cov.race_both_refused += 1,
                _ => {}
            }
        }
    }

    fn submit(&mut self, id: u8) {
        let kind = match self.rng.below(10) {
            0..=1 => IoKind::Read,
            2..=6 => IoKind::Write,
            7 => IoKind::Discard,
            _ => IoKind::Flush,
        };
        let range = if kind == IoKind::Flush {
            ByteRange::new(0, 0)
        } else {
            let len = 1 + self.rng.below(3);
            let extent = self.rng.below(BLOCKS / EXTENT_BLOCKS);
            let first = if extent > 0 && self.rng.percent(10) {
                // Across the boundary with the extent before.
                extent * EXTENT_BLOCKS - 1
            } else {
                // Two primaries write a few hot blocks, so that their writes collide.
                let used = if self.dual { 4 } else { USED_PER_EXTENT };
                extent * EXTENT_BLOCKS + self.rng.below(used - len + 1)
            };
            ByteRange::new(first * BLOCK, len * BLOCK)
        };
        let wid = if kind == IoKind::Write {
            let wid = self.next_wid;
            self.next_wid += 1;
            self.origin.insert(wid, id);
            wid
        } else {
            0
        };
        let as_primary = self.node(id).core.role() == Role::Primary;
        let must_persist = if kind == IoKind::Flush {
            self.node(id).unflushed.clone()
        } else {
            Vec::new()
        };
        let start = self.now;
        let n = self.node(id);
        let rid = n.next_request;
        n.next_request += 1;
        n.requests.insert(
            rid,
            AppRequest {
                kind,
                range,
                wid,
                as_primary,
                start,
                times_postponed: 0,
                superseded: false,
                written: Vec::new(),
                must_persist,
            },
        );
        self.log(format!(
            "n{id} submits #{rid} {kind:?} {}+{} ({wid})",
            range.offset / BLOCK,
            range.len / BLOCK
        ));
        self.feed(
            id,
            Input::Submit {
                id: rid,
                kind,
                range,
                start,
            },
        );
    }

    /// Finishes one piece of a node's asynchronous work. Metadata updates finish in order.
    fn do_work(&mut self, id: u8) {
        if let Some((node, until)) = self.stalled {
            if self.now >= until {
                self.stalled = None;
            } else if node == id {
                return;
            }
        }
        let len = self.node(id).work.len() as u64;
        if len == 0 {
            return;
        }
        let mut index = self.rng.below(len) as usize;
        if matches!(self.node(id).work[index], Work::Persist(..)) {
            index = self
                .node(id)
                .work
                .iter()
                .position(|w| matches!(w, Work::Persist(..)))
                .unwrap_or(index);
        }
        if matches!(self.node(id).work[index], Work::PersistBitmaps(..)) {
            index = self
                .node(id)
                .work
                .iter()
                .position(|w| matches!(w, Work::PersistBitmaps(..)))
                .unwrap_or(index);
        }
        let work = self.node(id).work.remove(index);
        match work {
            Work::Resubmit(rid) => {
                let Some(req) = self.node(id).requests.get(&rid).cloned() else {
                    self.fail(&format!("n{id}: re-submits unknown request {rid}"));
                };
                self.cov.resubmitted += 1;
                self.log(format!("n{id} re-submits #{rid}"));
                self.feed(
                    id,
                    Input::Resubmit {
                        id: rid,
                        kind: req.kind,
                        range: req.range,
                        start: req.start,
                    },
                );
            }
            Work::Local(rid) => {
                let Some(req) = self.node(id).requests.get(&rid).cloned() else {
                    self.fail(&format!("n{id}: local I/O for unknown request {rid}"));
                };
                match req.kind {
                    IoKind::Write | IoKind::Discard => {
                        self.ensure(req.as_primary, || {
                            format!("n{id}: application write #{rid} reaches the store of a node that was not Primary")
                        });
                        let wid = req.wid;
                        let written =
                            self.node(id)
                                .store
                                .write(req.range.offset, req.range.len, wid);
                        if let Some(r) = self.node(id).requests.get_mut(&rid) {
                            r.written = written;
                        }
                    }
                    IoKind::Flush => self.node(id).store.flush(),
                    IoKind::Read => {}
                }
                self.log(format!("n{id} local I/O #{rid} done"));
                self.feed(
                    id,
                    Input::LocalDone {
                        id: rid,
                        result: Ok(()),
                    },
                );
            }
            Work::Apply {
                peer,
                conn,
                seq,
                epoch: _,
                offset,
                len,
                wid,
            } => {
                self.node(id).store.write(offset, len, wid);
                self.log(format!(
                    "n{id} applied n{peer} seq {seq} ({wid}) at {}",
                    offset / BLOCK
                ));
                self.feed(
                    id,
                    Input::PeerWriteApplied {
                        peer,
                        conn,
                        seq,
                        result: Ok(()),
                    },
                );
            }
            Work::PeerFlush { peer, conn, epoch } => {
                let flushed = self
                    .node(id)
                    .flushed_epochs
                    .insert((peer, conn), epoch)
                    .unwrap_or(0);
                self.ensure(epoch == flushed + 1, || {
                    format!("n{id} flushed n{peer}'s epoch {epoch} after epoch {flushed}")
                });
                self.node(id).store.flush();
                self.log(format!("n{id} flushed epoch {epoch} of n{peer}"));
                self.feed(id, Input::PeerFlushed { peer, conn, epoch });
            }
            Work::LocalFlush(token) => {
                self.node(id).store.flush();
                self.log(format!("n{id} local flush {token} done"));
                self.feed(
                    id,
                    Input::LocalFlushed {
                        token,
                        result: Ok(()),
                    },
                );
            }
            Work::PersistBitmaps(version, update) => {
                self.node(id).bitmaps.apply(&update);
                self.log(format!("n{id} stored bitmaps v{version}"));
                self.feed(
                    id,
                    Input::BitmapsPersisted {
                        version,
                        result: Ok(()),
                    },
                );
            }
            Work::ResyncRead {
                peer,
                conn,
                offset,
                len,
            } => {
                let blocks: Vec<u64> = (offset / BLOCK..(offset + len) / BLOCK)
                    .map(|block| self.node(id).store.read(block))
                    .collect();
                self.log(format!(
                    "n{id} resync read {}+{} for n{peer}: {blocks:?}",
                    offset / BLOCK,
                    len / BLOCK
                ));
                let current = self.node(id).current.get(&peer).map(|(c, _)| *c);
                if current == Some(conn) {
                    self.send(id, peer, STREAM_RESYNC, Wire::ResyncData { offset, blocks });
                }
                self.feed(
                    id,
                    Input::ResyncSent {
                        peer,
                        conn,
                        offset,
                        len,
                        result: Ok(()),
                    },
                );
            }
            Work::ResyncWrite {
                peer,
                conn,
                offset,
                blocks,
            } => {
                let len = blocks.len() as u64 * BLOCK;
                for (i, wid) in blocks.iter().enumerate() {
                    self.node(id)
                        .store
                        .write(offset + i as u64 * BLOCK, BLOCK, *wid);
                }
                self.log(format!(
                    "n{id} resync wrote {}+{} from n{peer}",
                    offset / BLOCK,
                    len / BLOCK
                ));
                self.feed(
                    id,
                    Input::ResyncWriteDone {
                        peer,
                        conn,
                        offset,
                        len,
                        result: Ok(()),
                    },
                );
            }
            Work::Digest {
                peer,
                conn,
                offset,
                len,
                purpose,
            } => {
                let digests = (offset / BLOCK..(offset + len) / BLOCK)
                    .map(|block| {
                        let mut digest = [0u8; 32];
                        digest[..8].copy_from_slice(&self.node(id).store.read(block).to_le_bytes());
                        digest
                    })
                    .collect();
                self.feed(
                    id,
                    Input::Digested {
                        peer,
                        conn,
                        offset,
                        len,
                        purpose,
                        result: Ok(digests),
                    },
                );
            }
            Work::Persist(version, meta) => {
                self.node(id).persisted = *meta;
                self.log(format!("n{id} persisted metadata v{version}"));
                self.feed(
                    id,
                    Input::Persisted {
                        version,
                        result: Ok(()),
                    },
                );
            }
        }
    }

    fn deliver(&mut self) {
        let keys: Vec<(u64, u8, u8)> = self
            .streams
            .iter()
            .filter(|(_, q)| !q.is_empty())
            .map(|(k, _)| *k)
            .collect();
        if keys.is_empty() {
            return;
        }
        let oldest = self
            .streams
            .values()
            .filter_map(|q| q.front().map(|(order, _)| *order))
            .min();
        let key = keys[self.rng.below(keys.len() as u64) as usize];
        let Some((order, wire)) = self.streams.get_mut(&key).and_then(VecDeque::pop_front) else {
            return;
        };
        if Some(order) != oldest {
            self.cov.reordered_deliveries += 1;
        }
        let (gid, from, _) = key;
        let Some(conn) = self.conns.get(&gid) else {
            return;
        };
        let (to, local) = if conn.ends[0].0 == from {
            conn.ends[1]
        } else {
            conn.ends[0]
        };
        match wire {
            Wire::Message(message) => {
                if matches!(message, PeerMessage::ResyncSame { .. }) {
                    self.cov.resync_same += 1;
                }
                if let PeerMessage::Superseded { seq } = message {
                    // Its blocks hold the resolver's write once that lands, not its own.
                    if let Some(rid) = self.node(to).sent.get(&(from, seq)).copied() {
                        if let Some(req) = self.node(to).requests.get_mut(&rid) {
                            req.superseded = true;
                        }
                    }
                }
                self.log(format!("n{to} <- n{from}: {}", brief(&message)));
                self.feed(
                    to,
                    Input::PeerMessage {
                        peer: from,
                        conn: local,
                        message,
                    },
                );
            }
            Wire::Write(write, wid) => {
                self.log(format!(
                    "n{to} <- n{from}: {} seq {} epoch {} ({wid}) at {}+{}",
                    if write.discard { "Discard" } else { "Data" },
                    write.seq,
                    write.epoch,
                    write.offset / BLOCK,
                    write.len / BLOCK
                ));
                self.node(to)
                    .payloads
                    .insert((from, local, write.seq), (wid, write.epoch));
                self.feed(
                    to,
                    Input::PeerWrite {
                        peer: from,
                        conn: local,
                        write,
                    },
                );
            }
            Wire::ResyncData { offset, blocks } => {
                self.log(format!(
                    "n{to} <- n{from}: ResyncData {}+{} {blocks:?}",
                    offset / BLOCK,
                    blocks.len()
                ));
                let len = blocks.len() as u64 * BLOCK;
                self.node(to)
                    .resync_payloads
                    .insert((from, local, offset), blocks);
                self.feed(
                    to,
                    Input::ResyncData {
                        peer: from,
                        conn: local,
                        offset,
                        len,
                    },
                );
            }
        }
    }

    fn dial(&mut self) {
        if self.dials.is_empty() {
            return;
        }
        let index = self.rng.below(self.dials.len() as u64) as usize;
        let (a, b) = self.dials.remove(index);
        if self.partitioned.contains(&(a.min(b), a.max(b))) || self.rng.percent(5) {
            self.log(format!("n{a} dial to n{b} fails"));
            self.feed(
                a,
                Input::DialFailed {
                    peer: b,
                    reason: "unreachable".into(),
                },
            );
            return;
        }
        let gid = self.next_gid;
        self.next_gid += 1;
        let la = self.node(a).next_conn;
        self.node(a).next_conn += 1;
        let lb = self.node(b).next_conn;
        self.node(b).next_conn += 1;
        self.conns.insert(
            gid,
            Connection {
                ends: [(a, la), (b, lb)],
            },
        );
        // The acceptor hears of it first or second, at random.
        self.log(format!("n{a} connects to n{b} (connection {gid})"));
        let mut ends = [(a, b, la), (b, a, lb)];
        if self.rng.percent(50) {
            ends.swap(0, 1);
        }
        for (node, peer, local) in ends {
            if let Some((_, old)) = self.node(node).current.insert(peer, (local, gid)) {
                // The shell replaces the old connection with the new one.
                self.tear(old);
                self.node(node).current.insert(peer, (local, gid));
            }
            self.queue
                .push_back((node, Input::TransportUp { peer, conn: local }));
        }
        self.run_queue();
    }

    fn tick_all(&mut self, advance: Tick) {
        self.now += advance;
        let before: u64 = self.cov.connection_drops;
        let links_before = self.connected_pairs();
        for id in self.ids() {
            self.queue.push_back((id, Input::Tick));
        }
        self.run_queue();
        let _ = before;
        if advance >= 4 * SECOND && self.connected_pairs() < links_before {
            self.cov.pauses_with_timeouts += 1;
        }
    }

    fn connected_pairs(&self) -> usize {
        self.nodes
            .iter()
            .map(|n| {
                n.core
                    .links()
                    .filter(|l| l.connection == ConnectionState::Connected)
                    .count()
            })
            .sum()
    }

    fn drop_connection(&mut self) {
        let gids: Vec<u64> = self.conns.keys().copied().collect();
        if gids.is_empty() {
            return;
        }
        let gid = gids[self.rng.below(gids.len() as u64) as usize];
        self.log(format!("fault: connection {gid} drops"));
        self.cov.connection_drops += 1;
        self.tear(gid);
        self.run_queue();
    }

    fn partition(&mut self) {
        let ids = self.ids();
        let a = ids[self.rng.below(ids.len() as u64) as usize];
        let b = ids[self.rng.below(ids.len() as u64) as usize];
        if a == b {
            return;
        }
        let pair = (a.min(b), a.max(b));
        if !self.partitioned.insert(pair) {
            return;
        }
        self.log(format!(
            "fault: partition between n{} and n{}",
            pair.0, pair.1
        ));
        self.cov.partitions += 1;
        let cut: Vec<u64> = self
            .conns
            .iter()
            .filter(|(_, c)| {
                let (x, y) = (c.ends[0].0, c.ends[1].0);
                (x.min(y), x.max(y)) == pair
            })
            .map(|(g, _)| *g)
            .collect();
        for gid in cut {
            self.tear(gid);
        }
        self.run_queue();
    }

    fn heal(&mut self) {
        if !self.partitioned.is_empty() {
            self.log("partitions heal".into());
        }
        self.partitioned.clear();
    }

    /// A node stops (crash) or went down (shutdown) and comes up again with what is durable.
    fn restart(&mut self, id: u8, crash: bool) {
        let gids: Vec<u64> = self
            .conns
            .iter()
            .filter(|(_, c)| c.ends.iter().any(|(n, _)| *n == id))
            .map(|(g, _)| *g)
            .collect();
        for gid in gids {
            self.tear(gid);
        }
        // The dead node hears nothing any more.
        self.queue.retain(|(n, _)| *n != id);
        self.dials.retain(|(n, _)| *n != id);
        let count = self.nodes.len() as u8;
        let (protocol, seed, now, dual) = (self.protocol, self.seed, self.now, self.dual);
        let sync = self.sync.clone();
        let mut rng = Rng::new(self.rng.next());
        let n = self.node(id);
        if crash {
            n.store.crash(&mut rng);
        } else {
            n.store.flush();
        }
        n.incarnation += 1;
        n.work.clear();
        n.payloads.clear();
        n.flushed_epochs.clear();
        n.current.clear();
        n.unflushed.clear();
        let lost: Vec<RequestId> = n.requests.keys().copied().collect();
        n.requests.clear();
        let meta = n.persisted.clone();
        let core_seed = seed ^ u64::from(id) << 32 ^ n.incarnation << 48;
        n.resync_payloads.clear();
        n.sent.clear();
        let stored = n.bitmaps.stored();
        n.core = ResourceCore::restore(
            config(id, count, protocol, core_seed, &sync, dual),
            meta,
            stored,
            now,
        );
        self.commands.retain(|_, p| p.node != id);
        self.log(format!(
            "n{id} {} and restarts (lost requests {lost:?})",
            if crash { "crashes" } else { "is down" }
        ));
        self.effects(id);
    }

    fn crash(&mut self) {
        let ids = self.ids();
        let id = ids[self.rng.below(ids.len() as u64) as usize];
        self.cov.crashes += 1;
        self.restart(id, true);
        self.run_queue();
    }

    // ----- invariants -----

    fn check_step(&mut self) {
        let primaries: Vec<u8> = self
            .nodes
            .iter()
            .filter(|n| n.core.role() == Role::Primary)
            .map(|n| n.id)
            .collect();
        if self.dual {
            if primaries.len() == 2 && self.connected(1, 2) && self.connected(2, 1) {
                self.cov.two_primaries_connected += 1;
            }
            self.settle_races();
            return;
        }
        if !self.split_possible {
            self.ensure(primaries.len() <= 1, || {
                format!("two Primaries: {primaries:?}")
            });
        }
        for a in &primaries {
            for b in &primaries {
                if a >= b {
                    continue;
                }
                let ab = self.connected(*a, *b);
                let ba = self.connected(*b, *a);
                self.ensure(!(ab && ba), || {
                    format!("n{a} and n{b} are both Primary and connected to each other")
                });
            }
        }
        self.settle_races();
    }

    fn connected(&self, a: u8, b: u8) -> bool {
        self.nodes[usize::from(a - 1)]
            .core
            .link(b)
            .is_some_and(|l| l.connection == ConnectionState::Connected)
    }

    /// The disk of `id` finishes nothing for 8 s, while messages flow and the other node
    /// works: long enough for any request the stall holds up to time out.
    fn stall_disk(&mut self, id: u8) {
        let until = self.now + 8 * SECOND;
        self.log(format!("n{id}'s disk stalls until t={}ms", until / MS));
        self.stalled = Some((id, until));
        while self.stalled.is_some() {
            self.tick_all(500 * MS);
            while self.streams.values().any(|q| !q.is_empty()) {
                self.deliver();
            }
            let other = 3 - id;
            while !self.node(other).work.is_empty() {
                self.do_work(other);
            }
            // (`do_work` ends the stall once its time is up.)
            self.do_work(id);
        }
    }

    fn random_step(&mut self) {
        self.step += 1;
        if let Some(id) = self.stall_next.take() {
            self.stall_disk(id);
        }
        self.now += self.rng.below(20 * MS);
        let ids = self.ids();
        let mut id = ids[self.rng.below(ids.len() as u64) as usize];
        let mut choice = self.rng.below(100);
        if self.calm {
            // (A calm seed of two primaries keeps its stalled disks.)
            if choice >= 89 && !(self.dual && choice == 96) {
                choice = 0;
            }
            let primaries: Vec<u8> = ids
                .iter()
                .copied()
                .filter(|n| self.nodes[usize::from(*n) - 1].core.role() == Role::Primary)
                .collect();
            if let Some(primary) = self.rng.pick(&primaries) {
                if (60..=74).contains(&choice) && self.rng.percent(80) {
                    id = primary;
                }
            }
        }
        match choice {
            0..=29 => self.deliver(),
            30..=54 => self.do_work(id),
            55..=59 => self.dial(),
            60..=74 => self.submit(id),
            75..=80 => {
                let advance = self.rng.below(500 * MS);
                self.tick_all(advance);
            }
            81..=86 => self.admin(id),
            87..=88 => self.race(),
            89 => {
                // A pause long enough for liveness timers to fire.
                let advance = 3 * SECOND + self.rng.below(4 * SECOND);
                self.tick_all(advance);
            }
            90..=91 => self.drop_connection(),
            92 => self.partition(),
            93..=94 => self.heal(),
            95 if self.rng.percent(40) => self.crash(),
            96 if self.dual => self.stall_disk(id),
            _ => self.deliver(),
        }
        self.check_step();
    }

    /// Stops the faults, resumes I/O and reconnects everyone, then runs until nothing is left
    /// to do and checks that everything finished.
    fn quiesce(&mut self) {
        self.log("quiesce: faults stop".into());
        self.quiescing = true;
        self.heal();
        for id in self.ids() {
            self.command(id, Command::ResumeIo);
            self.command(
                id,
                Command::Connect {
                    discard_my_data: false,
                },
            );
        }
        self.run_queue();
        // Long enough for a full sync of every block at the slowest rate a seed may draw.
        for round in 0..20_000 {
            self.step += 1;
            let mut progressed = false;
            while !self.dials.is_empty() {
                self.dial();
                progressed = true;
            }
            while self.streams.values().any(|q| !q.is_empty()) {
                self.deliver();
                progressed = true;
            }
            for id in self.ids() {
                while !self.node(id).work.is_empty() {
                    self.do_work(id);
                    progressed = true;
                }
            }
            self.check_step();
            // A rate-limited resync may have nothing to do until the next tick.
            let resyncing = self
                .nodes
                .iter()
                .any(|n| n.core.links().any(|l| l.sync.is_some()));
            if !progressed && round > 150 && !resyncing {
                break;
            }
            // Long enough for redials after a refusal and for promotions to time out.
            self.tick_all(200 * MS);
        }
        self.ensure(self.commands.is_empty(), || {
            format!("commands never answered: {:?}", self.commands)
        });
        self.ensure(self.races.is_empty(), || "a race never settled".into());
        for n in &self.nodes {
            self.ensure(n.requests.is_empty(), || {
                let device = n.core.device();
                let stages: Vec<_> = n
                    .requests
                    .keys()
                    .map(|id| (*id, device.stage(*id)))
                    .collect();
                format!(
                    "n{}: requests stuck: {stages:?} (holding {}, suspended {}, links {:?})",
                    n.id,
                    device.is_holding(),
                    device.is_suspended(),
                    n.core
                        .links()
                        .map(|l| (l.peer, l.connection))
                        .collect::<Vec<_>>()
                )
            });
            let device = n.core.device();
            self.ensure(device.app_in_flight() == 0 && device.held() == 0, || {
                format!(
                    "n{}: application I/O count {} held {}",
                    n.id,
                    device.app_in_flight(),
                    device.held()
                )
            });
            self.ensure(n.work.is_empty(), || format!("n{}: work left", n.id));
        }
        self.compare_replicas();
    }

    fn compare_replicas(&mut self) {
        for a in 0..self.nodes.len() {
            for b in a + 1..self.nodes.len() {
                let (na, nb) = (&self.nodes[a], &self.nodes[b]);
                if !(self.connected(na.id, nb.id) && self.connected(nb.id, na.id)) {
                    continue;
                }
                if self.nodes.len() == 2 {
                    // Two nodes that are connected when everything settled have resynced:
                    // the same disk state, nothing counted out of sync either way.
                    let oos = |n: &Node, peer: u8| {
                        n.core
                            .device()
                            .peer(peer)
                            .map_or(0, |s| s.out_of_sync.dirty_blocks())
                    };
                    // Both UpToDate, or both Consistent (both crashed, no one confirmed
                    // either, the data is the same).
                    // (Both Outdated is settled too: the same data, and neither may claim it
                    // without --force.)
                    let settled = |d: DiskState| {
                        matches!(
                            d,
                            DiskState::UpToDate | DiskState::Consistent | DiskState::Outdated
                        )
                    };
                    // Neither with a claim (Outdated or Inconsistent, e.g. after an
                    // `invalidate` toward an Outdated peer) waits for the operator's --force.
                    let no_claim =
                        |d: DiskState| matches!(d, DiskState::Outdated | DiskState::Inconsistent);
                    let waiting_for_operator = no_claim(na.core.disk()) && no_claim(nb.core.disk());
                    self.ensure(
                        (waiting_for_operator
                            || settled(na.core.disk()) && na.core.disk() == nb.core.disk())
                            && oos(na, nb.id) == 0
                            && oos(nb, na.id) == 0,
                        || {
                            format!(
                                "n{} ({}, {} blocks out of sync) and n{} ({}, {}) are connected but did not converge",
                                na.id,
                                na.core.disk(),
                                oos(na, nb.id),
                                nb.id,
                                nb.core.disk(),
                                oos(nb, na.id)
                            )
                        },
                    );
                    self.cov.pairs_converged += 1;
                }
                if na.core.disk() != DiskState::UpToDate || nb.core.disk() != DiskState::UpToDate {
                    continue;
                }
                // Without quorum, a three-node cluster can split into two Primaries; a node
                // connected to both sides follows one side's generation while it stays connected
                // to the other. Until quorum and the multi-peer bitmaps arrive, only nodes in the
                // same generation are held to the same bytes after such a split.
                if self.split_possible && na.core.meta().current_uuid != nb.core.meta().current_uuid
                {
                    continue;
                }
                for block in 0..BLOCKS {
                    let dirty = na
                        .core
                        .device()
                        .peer(nb.id)
                        .is_some_and(|s| s.out_of_sync.is_dirty(block))
                        || nb
                            .core
                            .device()
                            .peer(na.id)
                            .is_some_and(|s| s.out_of_sync.is_dirty(block));
                    if dirty {
                        continue;
                    }
                    let (x, y) = (na.store.read(block), nb.store.read(block));
                    self.ensure(x == y, || {
                        format!(
                            "n{} and n{} are connected and UpToDate but block {block} differs ({x} vs {y}) without being out of sync",
                            na.id, nb.id
                        )
                    });
                }
                self.cov.replicas_compared += 1;
                if self.old_contents {
                    self.cov.initial_syncs_compared += 1;
                }
            }
        }
    }

    fn run(mut self) -> (Coverage, u64) {
        for _ in 0..STEPS {
            self.random_step();
        }
        self.quiesce();
        (self.cov, self.hash)
    }
}

fn brief(message: &PeerMessage) -> String {
    match message {
        PeerMessage::Hello {
            role,
            disk,
            current_uuid,
            receiver_missing_bytes,
            ..
        } => format!("Hello {role} {disk} {current_uuid:016X} missing {receiver_missing_bytes}"),
        other => format!("{other:?}"),
    }
}

fn seeds() -> Vec<u64> {
    if let Ok(seed) = std::env::var("QRBD_SIM_SEED") {
        return vec![seed.parse().expect("QRBD_SIM_SEED is a number")];
    }
    let count = std::env::var("QRBD_SIM_SEEDS")
        .ok()
        .map_or(SEEDS, |n| n.parse().expect("QRBD_SIM_SEEDS is a number"));
    (1..=count).collect()
}

#[test]
fn cluster_invariants_hold_over_many_seeds() {
    let seeds = seeds();
    let single = seeds.len() == 1;
    let mut total = Coverage::default();
    for seed in seeds {
        let (cov, _) = Sim::new(seed).run();
        total.add(&cov);
    }
    eprintln!("cluster simulation coverage: {total:#?}");
    if !single {
        let missing = total.missing();
        assert!(
            missing.is_empty(),
            "never happened over all seeds: {missing:?}"
        );
    }
}

#[test]
fn the_cluster_simulation_is_deterministic() {
    for seed in [7, 12345] {
        let (_, first) = Sim::new(seed).run();
        let (_, second) = Sim::new(seed).run();
        assert_eq!(first, second, "seed {seed} replays differently");
    }
}
