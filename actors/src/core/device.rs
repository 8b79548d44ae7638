//! The request pipeline of one volume as a pure state machine: admission (the application-I/O
//! count and suspension), conflicts between overlapping writes, and the completion rule.
//!
//! The [`crate::device::DeviceActor`] owns the data and reply of each request; this core only
//! knows each request's kind, range and stage, and answers every event with [`VolumeEffect`]s.

use std::collections::{BTreeMap, BTreeSet, VecDeque};

use serde::{Deserialize, Serialize};

use super::activity_log::{extents_of, ActivityLog};
use super::messages::PeerMessage;
use super::replication::{OutOfSync, Outgoing, PeerId, PeerNeed, PeerSender, ProtocolError};
use super::ReplicationProtocol;
use super::BLOCK_SIZE;

/// Why I/O is held: the administrator's `suspend-io`.
pub const HOLD_USER: u8 = 1;
/// Why I/O is held: metadata the next completions rely on (a new data generation) is being
/// made durable.
pub const HOLD_METADATA: u8 = 2;

/// Identifies a request for as long as the core tracks it. Never reused.
pub type RequestId = u64;

/// Time as the shell tells it (nanoseconds since the shell's start); the core never reads a clock.
pub type Tick = u64;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
pub enum IoKind {
    Read,
    Write,
    Discard,
    Flush,
}

impl IoKind {
    /// Writes and discards change data, so they are refused on a Secondary and must not overlap.
    pub fn modifies_data(self) -> bool {
        matches!(self, IoKind::Write | IoKind::Discard)
    }
}

/// A byte range of the volume.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ByteRange {
    pub offset: u64,
    pub len: u64,
}

impl ByteRange {
    pub fn new(offset: u64, len: u64) -> Self {
        ByteRange { offset, len }
    }

    pub fn end(&self) -> Option<u64> {
        self.offset.checked_add(self.len)
    }

    /// The range widened to whole 4 KiB blocks: two writes that touch the same block conflict,
    /// because an unaligned write is a read-modify-write of its edge blocks.
    fn block_span(&self) -> (u64, u64) {
        let align = BLOCK_SIZE;
        let start = self.offset / align * align;
        let end = self.offset.saturating_add(self.len).div_ceil(align) * align;
        (start, end)
    }
}

/// Why a request failed. The FUSE front end maps each to an errno.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum IoFault {
    #[error("the request reaches beyond the end of the device")]
    BeyondEnd,
    #[error("the device is read-only because this node is not Primary")]
    ReadOnly,
    #[error("the device is going down and takes no new requests")]
    Closed,
    #[error("the local backing store failed (errno {0})")]
    LocalIo(i32),
}

/// Where a request is in the pipeline.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum Stage {
    /// Not admitted yet: I/O is suspended.
    Held,
    /// Admitted; waits for an overlapping earlier write to finish.
    WaitingForConflict,
    /// Admitted; waits for its extents to be made hot in the activity log.
    WaitingForActivityLog,
    /// Admitted; waits for a peer's write to the same blocks to land first (two primaries).
    WaitingForPeer,
    /// Submitted to the local store.
    Local,
    /// Local part finished; completion waits for the rest of the rule (peers, suspension).
    ReadyToComplete,
}

/// What the shell must do after an event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VolumeEffect {
    /// Submit the request to the local store, then report `local_done`.
    StartLocal(RequestId),
    /// Reply to the application; the core has forgotten the request.
    Complete(RequestId, Result<(), IoFault>),
    /// The request was postponed and forgotten: hand it to the retry actor, which re-submits it
    /// (as a new request with the original start time).
    Postponed(RequestId),
    /// Send this on the peer's data stream (data and discards carry the request's bytes).
    Send(PeerId, Outgoing),
}

#[derive(Debug)]
struct Request {
    kind: IoKind,
    range: ByteRange,
    stage: Stage,
    start: Tick,
    local_result: Option<Result<(), IoFault>>,
    postponed: bool,
    /// What connected peers still owe before the request may complete.
    waiting: Vec<(PeerId, PeerNeed)>,
    /// When a peer answered RetryWrite: the conflict's age counts from here.
    retry_since: Option<Tick>,
    /// A postponed request issued again: its first local write landed, so failing it now
    /// leaves its blocks out of sync with every peer.
    resubmission: bool,
    /// Two primaries, on the resolver: a concurrent peer write was answered because of this
    /// one, and the conflict is resolved once the peer acknowledges this one.
    decided_against: bool,
}

/// Names a received write while it is in the conflict domain: (peer, connection, sequence
/// number).
pub type ReceivedKey = (PeerId, u64, u64);

/// What to do with a received write (two primaries; docs/protocol.md, "Two primaries").
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReceivedDecision {
    /// Write it now; it holds its blocks until [`DeviceCore::received_landed`].
    Apply,
    /// An overlapping local write must finish (or be answered) first: ask again later.
    Wait,
    /// The resolver's concurrent local write covers it: do not write it; answer Superseded.
    Superseded,
    /// The resolver's concurrent local write overlaps it: do not write it; answer RetryWrite
    /// with `after`, that write's sequence number.
    Retry { after: u64 },
}

/// What of one peer's writes landed here, so that this node's writes can tell the peer which
/// of its writes they follow (the `seen` of [`PeerMessage::Data`]).
#[derive(Debug, Default)]
struct Landed {
    /// Every write up to this sequence number was acknowledged as written.
    acked: u64,
    /// Writes above `acked` that landed: sequence number -> block span.
    above: BTreeMap<u64, (u64, u64)>,
}

impl Landed {
    fn seen_for(&self, (start, end): (u64, u64)) -> u64 {
        self.above
            .iter()
            .rev()
            .find(|(_, (s, e))| *s < end && start < *e)
            .map_or(self.acked, |(seq, _)| *seq)
    }
}

/// Upper bounds (microseconds) of the write latency histogram's buckets; a last, unbounded
/// bucket holds the rest.
pub const WRITE_LATENCY_BOUNDS_US: [u64; 12] = [
    50, 100, 250, 500, 1_000, 2_500, 5_000, 10_000, 25_000, 50_000, 100_000, 250_000,
];

/// Counters the status command shows.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeviceStats {
    pub reads: u64,
    pub writes: u64,
    pub discards: u64,
    pub flushes: u64,
    pub read_bytes: u64,
    pub written_bytes: u64,
    pub discarded_bytes: u64,
    pub failed: u64,
    pub postponed: u64,
    /// Sum of the latencies (submit to completion) of completed writes, in ticks.
    pub write_latency_total: u64,
    /// Completed writes per latency bucket ([`WRITE_LATENCY_BOUNDS_US`]; not cumulative).
    pub write_latency_buckets: [u64; WRITE_LATENCY_BOUNDS_US.len()],
    /// Writes that had to wait for an overlapping earlier write.
    pub conflicts: u64,
    /// Two primaries, on the resolver: a peer's write and a local write were issued
    /// concurrently to overlapping blocks.
    pub concurrent_writes: u64,
    /// Two primaries, on the resolver: peer writes not written here because a concurrent local
    /// write covers them (answered Superseded).
    pub superseded: u64,
    /// Two primaries, on the resolver: peer writes answered RetryWrite.
    pub retries_asked: u64,
    /// Two primaries, on the other side: local writes the peer answered Superseded.
    pub superseded_by_peer: u64,
    /// Postponed writes re-submitted (through the retry actor).
    pub resubmitted: u64,
}

/// The deterministic request pipeline of one volume.
#[derive(Debug)]
pub struct DeviceCore {
    size: u64,
    writable: bool,
    /// Why I/O is held: [`HOLD_USER`] (`suspend-io`) and/or [`HOLD_METADATA`].
    holds: u8,
    closed: bool,
    next_id: RequestId,
    requests: BTreeMap<RequestId, Request>,
    /// Requests waiting for admission while I/O is suspended, in arrival order.
    held: VecDeque<RequestId>,
    /// Block spans of the writes and discards at the local store: start -> (end, id).
    /// Spans in here never overlap, which keeps the overlap check to one lookup.
    active_spans: BTreeMap<u64, (u64, RequestId)>,
    /// Admitted writes waiting for an overlapping earlier one, in arrival order.
    conflict_waiters: VecDeque<RequestId>,
    /// Admitted and not yet completed (the "application I/O" count).
    app_in_flight: u64,
    stats: DeviceStats,
    peers: BTreeMap<PeerId, PeerSender>,
    /// Accepted writes and discards not yet finished (held ones included).
    modifying_in_flight: u64,
    activity_log: ActivityLog,
    /// Writes waiting for the activity log, in arrival order.
    al_waiters: VecDeque<RequestId>,
    /// Spans held by resync reads (docs/protocol.md, "Resync"), by lock id.
    resync_locks: BTreeMap<u64, (u64, u64)>,
    next_resync_lock: u64,
    /// Received writes in the conflict domain until they landed: their block spans.
    received: BTreeMap<ReceivedKey, (u64, u64)>,
    /// Local writes waiting for a received write to land, in arrival order.
    peer_blocked: VecDeque<RequestId>,
    /// Per peer: which of its writes landed here.
    landed: BTreeMap<PeerId, Landed>,
    /// Requests handed back for re-submission and not re-submitted yet: their ranges.
    postponed: BTreeMap<RequestId, ByteRange>,
}

/// Resync locks share `active_spans` with requests; their ids never collide with request ids.
const RESYNC_LOCK_BASE: u64 = 1 << 63;

impl DeviceCore {
    pub fn new(size: u64, writable: bool) -> Self {
        DeviceCore {
            size,
            writable,
            holds: 0,
            closed: false,
            next_id: 1,
            requests: BTreeMap::new(),
            held: VecDeque::new(),
            active_spans: BTreeMap::new(),
            conflict_waiters: VecDeque::new(),
            app_in_flight: 0,
            stats: DeviceStats::default(),
            peers: BTreeMap::new(),
            modifying_in_flight: 0,
            activity_log: ActivityLog::disabled(),
            al_waiters: VecDeque::new(),
            resync_locks: BTreeMap::new(),
            next_resync_lock: RESYNC_LOCK_BASE,
            received: BTreeMap::new(),
            peer_blocked: VecDeque::new(),
            landed: BTreeMap::new(),
            postponed: BTreeMap::new(),
        }
    }

    pub fn set_activity_log(&mut self, log: ActivityLog) {
        self.activity_log = log;
    }

    pub fn activity_log(&self) -> &ActivityLog {
        &self.activity_log
    }

    pub fn activity_log_mut(&mut self) -> &mut ActivityLog {
        &mut self.activity_log
    }

    pub fn out_of_sync_mut(&mut self, peer: PeerId) -> Option<&mut OutOfSync> {
        self.peers
            .get_mut(&peer)
            .map(|sender| &mut sender.out_of_sync)
    }

    pub fn peer_ids(&self) -> impl Iterator<Item = PeerId> + '_ {
        self.peers.keys().copied()
    }

    /// Extents something may still be landing in: writes in the pipeline and writes some
    /// connected peer has not barrier-acknowledged. The activity log keeps them hot.
    pub fn busy_extents(&self) -> BTreeSet<u64> {
        let mut busy = BTreeSet::new();
        let ranges = self
            .requests
            .values()
            .filter(|r| r.kind.modifies_data())
            .map(|r| r.range)
            .chain(self.peers.values().flat_map(|s| s.unacked_ranges()));
        for range in ranges {
            if let Some((first, last)) = extents_of(range) {
                busy.extend(first..=last);
            }
        }
        busy
    }

    /// The activity log's transaction is durable: start the writes it made hot.
    pub fn activity_log_committed(&mut self) -> Vec<VolumeEffect> {
        self.activity_log.committed();
        let mut effects = Vec::new();
        for id in std::mem::take(&mut self.al_waiters) {
            self.start(id, &mut effects);
        }
        effects
    }

    /// The activity log's transaction failed: the writes waiting for it fail, unwritten.
    pub fn activity_log_failed(&mut self, errno: i32, now: Tick) -> Vec<VolumeEffect> {
        self.activity_log.failed();
        let mut effects = Vec::new();
        for id in std::mem::take(&mut self.al_waiters) {
            if let Some(request) = self.requests.get_mut(&id) {
                request.local_result = Some(Err(IoFault::LocalIo(errno)));
                request.stage = Stage::ReadyToComplete;
            }
            self.try_finish(id, now, &mut effects);
        }
        effects
    }

    /// Takes the blocks of `range` for a resync read, unless a write to them is in the
    /// pipeline (then `None`: ask again later). Writes to them wait until the lock is released.
    pub fn lock_for_resync(&mut self, range: ByteRange) -> Option<u64> {
        let span = range.block_span();
        if span.0 >= span.1 || self.overlaps_active(span) || self.overlaps_waiter(span) {
            return None;
        }
        let lock = self.next_resync_lock;
        self.next_resync_lock += 1;
        self.active_spans.insert(span.0, (span.1, lock));
        self.resync_locks.insert(lock, span);
        Some(lock)
    }

    /// Releases a resync lock; writes that waited for it start.
    pub fn unlock_resync(&mut self, lock: u64) -> Vec<VolumeEffect> {
        let mut effects = Vec::new();
        if let Some((start, _)) = self.resync_locks.remove(&lock) {
            if self
                .active_spans
                .get(&start)
                .is_some_and(|(_, owner)| *owner == lock)
            {
                self.active_spans.remove(&start);
            }
            self.start_unblocked_waiters(&mut effects);
        }
        effects
    }

    /// Declares a configured peer (initially disconnected: writes are counted out of sync).
    pub fn add_peer(&mut self, peer: PeerId, protocol: ReplicationProtocol) {
        self.peers
            .entry(peer)
            .or_insert_with(|| PeerSender::new(protocol, self.size));
    }

    pub fn peer(&self, peer: PeerId) -> Option<&PeerSender> {
        self.peers.get(&peer)
    }

    /// Counts `range` out of sync for the peer (it lacks that data).
    pub fn mark_out_of_sync(&mut self, peer: PeerId, range: ByteRange) {
        if let Some(sender) = self.peers.get_mut(&peer) {
            sender.out_of_sync.mark(range);
        }
    }

    /// The peer's connection is established: from now on writes replicate to it.
    pub fn peer_connected(&mut self, peer: PeerId) {
        if let Some(sender) = self.peers.get_mut(&peer) {
            sender.connect();
        }
        // Sequence numbers start over with the connection.
        self.landed.remove(&peer);
    }

    /// The peer's connection is gone: requests stop waiting for it, and everything it did not
    /// acknowledge is out of sync for it.
    pub fn peer_disconnected(&mut self, peer: PeerId, now: Tick) -> Vec<VolumeEffect> {
        let mut effects = Vec::new();
        let Some(sender) = self.peers.get_mut(&peer) else {
            return effects;
        };
        if !sender.is_connected() {
            return effects;
        }
        sender.disconnect();
        self.landed.remove(&peer);
        let mut released = Vec::new();
        for (id, request) in self.requests.iter_mut() {
            let before = request.waiting.len();
            request.waiting.retain(|(p, _)| *p != peer);
            if request.waiting.len() != before {
                if request.kind.modifies_data() {
                    sender.out_of_sync.mark(request.range);
                }
                released.push(*id);
            }
        }
        released.sort_unstable();
        for id in released {
            self.try_finish(id, now, &mut effects);
        }
        effects
    }

    /// The shell handed a protocol-A write to the transport.
    pub fn peer_sent(&mut self, peer: PeerId, id: RequestId, now: Tick) -> Vec<VolumeEffect> {
        let mut effects = Vec::new();
        self.satisfy(id, peer, |need| need == PeerNeed::Sent);
        self.try_finish(id, now, &mut effects);
        effects
    }

    /// An acknowledgement from a peer.
    pub fn peer_ack(
        &mut self,
        peer: PeerId,
        message: &PeerMessage,
        now: Tick,
    ) -> Result<Vec<VolumeEffect>, ProtocolError> {
        let mut effects = Vec::new();
        match *message {
            PeerMessage::RecvAck { up_to } | PeerMessage::WriteAck { up_to } => {
                let need = match message {
                    PeerMessage::RecvAck { .. } => PeerNeed::RecvAck,
                    _ => PeerNeed::WriteAck,
                };
                let Some(sender) = self.peers.get_mut(&peer) else {
                    return Err(ProtocolError(format!(
                        "acknowledgement from unknown peer {peer}"
                    )));
                };
                // An acknowledgement of the other protocol's kind satisfies nothing, as before
                // acknowledgements were cumulative; it must not use up what it covers either.
                let wanted = match sender.protocol {
                    ReplicationProtocol::B => PeerNeed::RecvAck,
                    ReplicationProtocol::C => PeerNeed::WriteAck,
                    ReplicationProtocol::A => PeerNeed::Sent,
                };
                if need == wanted {
                    for request in sender.acked_up_to(up_to)? {
                        self.satisfy(request, peer, |n| n == need);
                        self.try_finish(request, now, &mut effects);
                    }
                }
            }
            PeerMessage::NegAck { request, errno } => {
                tracing::warn!(
                    peer,
                    request,
                    errno,
                    "the peer failed to write a replicated request; it is out of sync there"
                );
                // The peer could not write it: it is out of sync there; the write itself
                // succeeded here, so the application is not told.
                let range = self.requests.get(&request).map(|r| r.range);
                if let (Some(range), Some(sender)) = (range, self.peers.get_mut(&peer)) {
                    sender.out_of_sync.mark(range);
                }
                self.satisfy(request, peer, |need| {
                    matches!(
                        need,
                        PeerNeed::RecvAck | PeerNeed::WriteAck | PeerNeed::Sent
                    )
                });
                self.try_finish(request, now, &mut effects);
            }
            PeerMessage::BarrierAck { epoch, writes } => {
                let Some(sender) = self.peers.get_mut(&peer) else {
                    return Err(ProtocolError(format!(
                        "barrier ack from unknown peer {peer}"
                    )));
                };
                sender.barrier_acked(epoch, writes)?;
                let flushes: Vec<RequestId> = self
                    .requests
                    .iter()
                    .filter(|(_, r)| r.waiting.contains(&(peer, PeerNeed::BarrierAck(epoch))))
                    .map(|(id, _)| *id)
                    .collect();
                for id in flushes {
                    self.satisfy(id, peer, |need| need == PeerNeed::BarrierAck(epoch));
                    self.try_finish(id, now, &mut effects);
                }
            }
            ref other => {
                return Err(ProtocolError(format!(
                    "unexpected message on the ack stream: {other:?}"
                )));
            }
        }
        Ok(effects)
    }

    fn satisfy(&mut self, id: RequestId, peer: PeerId, matches: impl Fn(PeerNeed) -> bool) {
        if let Some(request) = self.requests.get_mut(&id) {
            if let Some(index) = request
                .waiting
                .iter()
                .position(|(p, need)| *p == peer && matches(*need))
            {
                request.waiting.swap_remove(index);
            }
        }
    }

    fn try_finish(&mut self, id: RequestId, now: Tick, effects: &mut Vec<VolumeEffect>) {
        let ready = self.requests.get(&id).is_some_and(|request| {
            request.stage == Stage::ReadyToComplete && request.waiting.is_empty()
        });
        if ready && self.holds == 0 {
            self.finish(id, now, effects);
        }
    }

    /// Sends a write, discard or flush to every peer (or counts it out of sync for the
    /// disconnected ones), and records what each connected peer owes.
    fn replicate(&mut self, id: RequestId, effects: &mut Vec<VolumeEffect>) {
        let Some(request) = self.requests.get(&id) else {
            return;
        };
        let (kind, range) = (request.kind, request.range);
        let mut waiting = Vec::new();
        for (peer, sender) in self.peers.iter_mut() {
            let mut out = Vec::new();
            match kind {
                IoKind::Write | IoKind::Discard if sender.is_connected() => {
                    let seen = self
                        .landed
                        .get(peer)
                        .map_or(0, |landed| landed.seen_for(range.block_span()));
                    let need = sender.replicate(id, range, kind == IoKind::Discard, seen, &mut out);
                    waiting.push((*peer, need));
                }
                IoKind::Write | IoKind::Discard => sender.out_of_sync.mark(range),
                IoKind::Flush
                    if sender.is_connected() && sender.protocol == ReplicationProtocol::C =>
                {
                    waiting.push((*peer, sender.flush(&mut out)));
                }
                // Protocols A and B do not wait for the peer's flush, but the barrier still
                // closes the epoch, so that its writes get barrier-acked instead of staying
                // unacked (and counted out of sync on a disconnect) while the device is idle.
                IoKind::Flush if sender.is_connected() => {
                    sender.flush(&mut out);
                }
                IoKind::Flush | IoKind::Read => {}
            }
            effects.extend(
                out.into_iter()
                    .map(|outgoing| VolumeEffect::Send(*peer, outgoing)),
            );
        }
        if let Some(request) = self.requests.get_mut(&id) {
            request.waiting = waiting;
        }
    }

    pub fn size(&self) -> u64 {
        self.size
    }

    pub fn app_in_flight(&self) -> u64 {
        self.app_in_flight
    }

    pub fn held(&self) -> usize {
        self.held.len()
    }

    /// Suspended by the administrator (`suspend-io`).
    pub fn is_suspended(&self) -> bool {
        self.holds & HOLD_USER != 0
    }

    /// Held for any reason (the administrator, or metadata that must be durable first).
    pub fn is_holding(&self) -> bool {
        self.holds != 0
    }

    /// Admitted and not completed (held requests not included).
    pub fn admitted(&self) -> u64 {
        self.app_in_flight
    }

    pub fn is_writable(&self) -> bool {
        self.writable
    }

    pub fn is_closed(&self) -> bool {
        self.closed
    }

    /// Nothing admitted, nothing held, nothing postponed: a drain may finish.
    pub fn is_idle(&self) -> bool {
        self.app_in_flight == 0 && self.held.is_empty() && self.postponed.is_empty()
    }

    /// Requests handed back for re-submission that have not come back yet.
    pub fn postponed(&self) -> usize {
        self.postponed.len()
    }

    pub fn stats(&self) -> DeviceStats {
        self.stats
    }

    pub fn stage(&self, id: RequestId) -> Option<Stage> {
        self.requests.get(&id).map(|request| request.stage)
    }

    pub fn start_tick(&self, id: RequestId) -> Option<Tick> {
        self.requests.get(&id).map(|request| request.start)
    }

    /// Turning read-only fails the held (never admitted) writes and discards at once: they
    /// must not reach the store of a Secondary when I/O resumes.
    pub fn set_writable(&mut self, writable: bool) -> Vec<VolumeEffect> {
        self.writable = writable;
        let mut effects = Vec::new();
        if writable {
            return effects;
        }
        // Held re-submissions stay: they were accepted once, and a demotion waits for them.
        let requests = &self.requests;
        let (refused, kept): (Vec<RequestId>, Vec<RequestId>) = self.held.iter().partition(|id| {
            requests
                .get(id)
                .is_some_and(|r| r.kind.modifies_data() && !r.resubmission)
        });
        self.held = kept.into();
        for id in refused {
            self.requests.remove(&id);
            self.modifying_in_flight = self.modifying_in_flight.saturating_sub(1);
            self.stats.failed += 1;
            effects.push(VolumeEffect::Complete(id, Err(IoFault::ReadOnly)));
        }
        effects
    }

    /// A re-submitted request that fails leaves what its first local write put here out of
    /// sync with every peer (docs/protocol.md, "Postponed requests").
    fn mark_failed_resubmission(&mut self, request: &Request) {
        if request.resubmission {
            for sender in self.peers.values_mut() {
                sender.out_of_sync.mark(request.range);
            }
        }
    }

    /// Requests the core tracks that change data (admitted or held).
    pub fn modifying_in_flight(&self) -> u64 {
        self.modifying_in_flight
    }

    /// Refuse every new request from now on; admitted ones run to completion.
    pub fn close(&mut self) {
        self.closed = true;
    }

    /// A new application request. `start` is when the application issued it (kept across
    /// re-submissions of a postponed request).
    pub fn submit(
        &mut self,
        kind: IoKind,
        range: ByteRange,
        start: Tick,
    ) -> (RequestId, Vec<VolumeEffect>) {
        let id = self.next_id;
        self.next_id += 1;
        (id, self.submit_as(id, kind, range, start))
    }

    /// Like [`Self::submit`], under an id the caller chose (unique among tracked requests).
    pub fn submit_as(
        &mut self,
        id: RequestId,
        kind: IoKind,
        range: ByteRange,
        start: Tick,
    ) -> Vec<VolumeEffect> {
        if self.requests.contains_key(&id) {
            self.stats.failed += 1;
            return vec![VolumeEffect::Complete(id, Err(IoFault::Closed))];
        }
        if let Err(fault) = self.check_acceptable(kind, range) {
            self.stats.failed += 1;
            return vec![VolumeEffect::Complete(id, Err(fault))];
        }
        self.track(id, kind, range, start, false)
    }

    /// A postponed request comes back from the retry actor, under its old id. It was accepted
    /// once, so a demotion or shutdown begun since does not refuse it: they wait for it (held,
    /// if I/O is suspended, like any request).
    pub fn resubmit(
        &mut self,
        id: RequestId,
        kind: IoKind,
        range: ByteRange,
        start: Tick,
    ) -> Vec<VolumeEffect> {
        if self.postponed.remove(&id).is_none() || self.requests.contains_key(&id) {
            // Not one this core handed back: an ordinary request.
            return self.submit_as(id, kind, range, start);
        }
        self.stats.resubmitted += 1;
        self.track(id, kind, range, start, true)
    }

    fn track(
        &mut self,
        id: RequestId,
        kind: IoKind,
        range: ByteRange,
        start: Tick,
        resubmission: bool,
    ) -> Vec<VolumeEffect> {
        self.requests.insert(
            id,
            Request {
                kind,
                range,
                stage: Stage::Held,
                start,
                local_result: None,
                postponed: false,
                waiting: Vec::new(),
                retry_since: None,
                resubmission,
                decided_against: false,
            },
        );
        if kind.modifies_data() {
            self.modifying_in_flight += 1;
        }

        let mut effects = Vec::new();
        if self.holds != 0 {
            self.held.push_back(id);
        } else {
            self.admit(id, &mut effects);
        }
        effects
    }

    fn check_acceptable(&self, kind: IoKind, range: ByteRange) -> Result<(), IoFault> {
        if self.closed {
            return Err(IoFault::Closed);
        }
        if kind.modifies_data() && !self.writable {
            return Err(IoFault::ReadOnly);
        }
        if kind != IoKind::Flush {
            match range.end() {
                Some(end) if end <= self.size => {}
                _ => return Err(IoFault::BeyondEnd),
            }
        }
        Ok(())
    }

    fn admit(&mut self, id: RequestId, effects: &mut Vec<VolumeEffect>) {
        self.app_in_flight += 1;
        let Some(request) = self.requests.get(&id) else {
            return;
        };
        let span = request.range.block_span();
        // An empty range touches no block: it conflicts with nothing, and must not enter
        // `active_spans`, where it would replace the entry of a write starting at the same block.
        if request.kind.modifies_data() && span.0 < span.1 {
            if self.overlaps_active(span) || self.overlaps_waiter(span) {
                self.set_stage(id, Stage::WaitingForConflict);
                self.conflict_waiters.push_back(id);
                self.stats.conflicts += 1;
                return;
            }
            self.active_spans.insert(span.0, (span.1, id));
        }
        self.start(id, effects);
    }

    fn start(&mut self, id: RequestId, effects: &mut Vec<VolumeEffect>) {
        let Some(request) = self.requests.get(&id) else {
            return;
        };
        if request.kind.modifies_data() {
            let range = request.range;
            if self.overlaps_received(range.block_span()) {
                // A peer's write to these blocks is being applied: this one follows it, on
                // this node and (through `seen`) on the peer.
                self.set_stage(id, Stage::WaitingForPeer);
                self.peer_blocked.push_back(id);
                return;
            }
            if !self.activity_log.covers(range) {
                self.activity_log.want(range);
                self.set_stage(id, Stage::WaitingForActivityLog);
                self.al_waiters.push_back(id);
                return;
            }
            self.activity_log.touch(range);
        }
        self.set_stage(id, Stage::Local);
        self.replicate(id, effects);
        effects.push(VolumeEffect::StartLocal(id));
    }

    fn set_stage(&mut self, id: RequestId, stage: Stage) {
        if let Some(request) = self.requests.get_mut(&id) {
            request.stage = stage;
        }
    }

    fn overlaps_active(&self, (start, end): (u64, u64)) -> bool {
        self.active_spans
            .range(..end)
            .next_back()
            .is_some_and(|(_, (active_end, _))| *active_end > start)
    }

    fn overlaps_waiter(&self, (start, end): (u64, u64)) -> bool {
        self.conflict_waiters.iter().any(|waiter| {
            self.requests.get(waiter).is_some_and(|request| {
                let (w_start, w_end) = request.range.block_span();
                w_start < end && start < w_end
            })
        })
    }

    /// The local store finished the request.
    pub fn local_done(
        &mut self,
        id: RequestId,
        result: Result<(), IoFault>,
        now: Tick,
    ) -> Vec<VolumeEffect> {
        let mut effects = Vec::new();
        let Some(request) = self.requests.get_mut(&id) else {
            return effects;
        };
        if request.stage != Stage::Local {
            return effects;
        }
        request.local_result = Some(result);
        request.stage = Stage::ReadyToComplete;
        self.try_finish(id, now, &mut effects);
        effects
    }

    /// Starts, in arrival order, every waiting write that no longer overlaps an active write or
    /// an earlier waiter.
    fn start_unblocked_waiters(&mut self, effects: &mut Vec<VolumeEffect>) {
        let waiters: Vec<RequestId> = self.conflict_waiters.drain(..).collect();
        let mut still_waiting: Vec<(u64, u64)> = Vec::new();
        for id in waiters {
            let Some(request) = self.requests.get(&id) else {
                continue;
            };
            let span = request.range.block_span();
            let blocked_by_waiter = still_waiting
                .iter()
                .any(|(s, e)| *s < span.1 && span.0 < *e);
            if blocked_by_waiter || self.overlaps_active(span) {
                still_waiting.push(span);
                self.conflict_waiters.push_back(id);
            } else {
                self.active_spans.insert(span.0, (span.1, id));
                self.start(id, effects);
            }
        }
    }

    /// Completes (or, if postponed, hands back) a request whose local part is done.
    fn finish(&mut self, id: RequestId, now: Tick, effects: &mut Vec<VolumeEffect>) {
        let Some(request) = self.requests.remove(&id) else {
            return;
        };
        self.app_in_flight = self.app_in_flight.saturating_sub(1);
        if request.kind.modifies_data() {
            // Overlapping writes wait for full completion, not just the local write: the next
            // one then falls into a later epoch, which every peer applies after this one.
            let span = request.range.block_span();
            if self
                .active_spans
                .get(&span.0)
                .is_some_and(|(_, active)| *active == id)
            {
                self.active_spans.remove(&span.0);
            }
            for sender in self.peers.values_mut() {
                sender.note_completion();
            }
            self.start_unblocked_waiters(effects);
            self.modifying_in_flight = self.modifying_in_flight.saturating_sub(1);
            if self.modifying_in_flight == 0 {
                for (peer, sender) in self.peers.iter_mut() {
                    let mut out = Vec::new();
                    sender.close_idle_epoch(&mut out);
                    effects.extend(
                        out.into_iter()
                            .map(|outgoing| VolumeEffect::Send(*peer, outgoing)),
                    );
                }
            }
        }
        if request.postponed {
            self.stats.postponed += 1;
            self.postponed.insert(id, request.range);
            effects.push(VolumeEffect::Postponed(id));
            return;
        }
        let result = request.local_result.unwrap_or(Err(IoFault::Closed));
        if result.is_err() {
            self.mark_failed_resubmission(&request);
        }
        self.account(&request, result, now);
        effects.push(VolumeEffect::Complete(id, result));
    }

    fn account(&mut self, request: &Request, result: Result<(), IoFault>, now: Tick) {
        if result.is_err() {
            self.stats.failed += 1;
            return;
        }
        let stats = &mut self.stats;
        match request.kind {
            IoKind::Read => {
                stats.reads += 1;
                stats.read_bytes += request.range.len;
            }
            IoKind::Write => {
                stats.writes += 1;
                stats.written_bytes += request.range.len;
                let latency = now.saturating_sub(request.start);
                stats.write_latency_total += latency;
                let latency_us = latency / 1_000;
                if let Some(bucket) = WRITE_LATENCY_BOUNDS_US
                    .iter()
                    .position(|bound| latency_us <= *bound)
                {
                    stats.write_latency_buckets[bucket] += 1;
                }
            }
            IoKind::Discard => {
                stats.discards += 1;
                stats.discarded_bytes += request.range.len;
            }
            IoKind::Flush => stats.flushes += 1,
        }
    }

    /// Marks a request as postponed (a peer answered RetryWrite): it will not complete upward;
    /// once its local part is done it is handed back as [`VolumeEffect::Postponed`] and its
    /// application-I/O count is released, to be taken again when it is re-submitted.
    pub fn postpone(&mut self, id: RequestId, now: Tick) -> Vec<VolumeEffect> {
        let mut effects = Vec::new();
        let Some(request) = self.requests.get_mut(&id) else {
            return effects;
        };
        request.postponed = true;
        self.try_finish(id, now, &mut effects);
        effects
    }

    // ----- two primaries: received writes in the conflict domain -----

    fn overlaps_received(&self, (start, end): (u64, u64)) -> bool {
        self.received.values().any(|(s, e)| *s < end && start < *e)
    }

    /// Where a write received from `peer` stands against the local writes it overlaps
    /// (docs/protocol.md, "Two primaries"). `seen` is the write's own claim of which of this
    /// node's writes it follows; `resolver`: this node decides the peer's conflicts.
    ///
    /// - A local write not yet sent to the peer follows the received one (it waits for it).
    /// - A local write the peer has not answered yet, and the received write does not follow
    ///   (its `seq` above `seen`), was issued concurrently: the resolver decides at once (the
    ///   received write is not written), the other side waits for the resolver's answer.
    /// - Otherwise only the disk's order matters: wait while the local write is at the store.
    pub fn admit_received(
        &mut self,
        key: ReceivedKey,
        range: ByteRange,
        seen: u64,
        resolver: bool,
    ) -> ReceivedDecision {
        let peer = key.0;
        let span = range.block_span();
        let mut wait = false;
        let mut covering = false;
        let mut after = 0;
        let mut concurrent = false;
        let mut winners = Vec::new();
        let sender = self.peers.get(&peer);
        for (_, (active_end, id)) in self.active_spans.range(..span.1).rev() {
            if *active_end <= span.0 {
                break;
            }
            let Some(local) = self.requests.get(id) else {
                continue; // a resync lock
            };
            // Sent to the peer and not answered yet: its sequence number still awaits an
            // acknowledgement (answers and acknowledgements both take it off that list).
            let unanswered = sender.and_then(|s| s.awaiting_seq_of(*id));
            match unanswered {
                Some(seq) if !resolver || seq > seen => {
                    concurrent = true;
                    winners.push(*id);
                    after = after.max(seq);
                    let (start, len) = (local.range.offset, local.range.len);
                    covering |= start <= range.offset
                        && range
                            .end()
                            .is_some_and(|end| end <= start.saturating_add(len));
                }
                _ if local.stage == Stage::Local => wait = true,
                _ => {}
            }
        }
        if concurrent && resolver {
            self.stats.concurrent_writes += 1;
            for id in winners {
                if let Some(winner) = self.requests.get_mut(&id) {
                    winner.decided_against = true;
                }
            }
            return if covering {
                self.stats.superseded += 1;
                ReceivedDecision::Superseded
            } else {
                self.stats.retries_asked += 1;
                ReceivedDecision::Retry { after }
            };
        }
        if concurrent || wait {
            return ReceivedDecision::Wait;
        }
        if span.0 < span.1 {
            self.received.insert(key, span);
        }
        ReceivedDecision::Apply
    }

    /// A received write admitted by [`Self::admit_received`] is on the store (or will never
    /// be): local writes that waited for it go on.
    pub fn received_landed(&mut self, key: ReceivedKey) -> Vec<VolumeEffect> {
        let mut effects = Vec::new();
        if self.received.remove(&key).is_none() || self.peer_blocked.is_empty() {
            return effects;
        }
        for id in std::mem::take(&mut self.peer_blocked) {
            let blocked = self
                .requests
                .get(&id)
                .is_some_and(|r| self.overlaps_received(r.range.block_span()));
            if blocked {
                self.peer_blocked.push_back(id);
            } else {
                self.start(id, &mut effects);
            }
        }
        effects
    }

    /// The peer's write `seq` (current connection) landed here: this node's next writes to
    /// those blocks follow it.
    pub fn note_landed(&mut self, peer: PeerId, seq: u64, range: ByteRange) {
        let landed = self.landed.entry(peer).or_default();
        if seq > landed.acked {
            landed.above.insert(seq, range.block_span());
        }
    }

    /// This node acknowledged the peer's writes up to `up_to` as written: writes postponed
    /// until then are handed back.
    pub fn acknowledged_peer_writes(
        &mut self,
        peer: PeerId,
        up_to: u64,
        now: Tick,
    ) -> Vec<VolumeEffect> {
        let landed = self.landed.entry(peer).or_default();
        landed.acked = landed.acked.max(up_to);
        landed.above = landed.above.split_off(&up_to.saturating_add(1));
        let mut effects = Vec::new();
        let due: Vec<RequestId> = self
            .requests
            .iter()
            .filter(|(_, r)| {
                r.waiting.iter().any(|(p, need)| {
                    *p == peer && matches!(need, PeerNeed::PeerApplied(a) if *a <= up_to)
                })
            })
            .map(|(id, _)| *id)
            .collect();
        for id in due {
            self.satisfy(
                id,
                peer,
                |need| matches!(need, PeerNeed::PeerApplied(a) if a <= up_to),
            );
            self.try_finish(id, now, &mut effects);
        }
        effects
    }

    /// The resolver did not write this node's write `seq`: a concurrent write of its own
    /// covers it, and lands here after it. The request completes as if acknowledged.
    pub fn peer_superseded(
        &mut self,
        peer: PeerId,
        seq: u64,
        now: Tick,
    ) -> Result<Vec<VolumeEffect>, ProtocolError> {
        let id = self.answered_request(peer, seq, "Superseded")?;
        self.stats.superseded_by_peer += 1;
        self.satisfy(id, peer, |need| need == PeerNeed::WriteAck);
        let mut effects = Vec::new();
        self.try_finish(id, now, &mut effects);
        Ok(effects)
    }

    /// The resolver did not write this node's write `seq`, which overlapped its concurrent
    /// write `after`: once the peer's writes up to `after` landed here, the request goes back
    /// to be issued again, so that it lands after that write on both nodes.
    pub fn peer_asked_retry(
        &mut self,
        peer: PeerId,
        seq: u64,
        after: u64,
        now: Tick,
    ) -> Result<Vec<VolumeEffect>, ProtocolError> {
        let id = self.answered_request(peer, seq, "RetryWrite")?;
        let landed = self.landed.get(&peer).map_or(0, |l| l.acked);
        if let Some(request) = self.requests.get_mut(&id) {
            request.postponed = true;
            request.retry_since = Some(now);
            let answered = (peer, PeerNeed::WriteAck);
            if let Some(index) = request.waiting.iter().position(|need| *need == answered) {
                if after <= landed {
                    request.waiting.swap_remove(index);
                } else {
                    request.waiting[index].1 = PeerNeed::PeerApplied(after);
                }
            }
        }
        let mut effects = Vec::new();
        self.try_finish(id, now, &mut effects);
        Ok(effects)
    }

    fn answered_request(
        &mut self,
        peer: PeerId,
        seq: u64,
        what: &str,
    ) -> Result<RequestId, ProtocolError> {
        let sender = self
            .peers
            .get_mut(&peer)
            .ok_or_else(|| ProtocolError(format!("{what} from unknown peer {peer}")))?;
        let id = sender.awaiting(seq).ok_or_else(|| {
            ProtocolError(format!(
                "{what} for write {seq}, which awaits no acknowledgement"
            ))
        })?;
        sender.answered(seq);
        Ok(id)
    }

    /// Two primaries, on the resolver: a local write that won a conflict with `peer` still
    /// waits for the peer's acknowledgement.
    pub fn conflict_unresolved(&self, peer: PeerId) -> bool {
        self.requests
            .values()
            .any(|r| r.decided_against && r.waiting.contains(&(peer, PeerNeed::WriteAck)))
    }

    /// Since when the oldest write postponed for `peer`'s conflicting write has waited for it.
    pub fn oldest_retry_wait(&self, peer: PeerId) -> Option<Tick> {
        self.requests
            .values()
            .filter(|r| {
                r.waiting
                    .iter()
                    .any(|(p, need)| *p == peer && matches!(need, PeerNeed::PeerApplied(_)))
            })
            .filter_map(|r| r.retry_since)
            .min()
    }

    /// Suspend I/O: new requests are held before admission and completions are held back.
    pub fn suspend(&mut self) {
        self.hold(HOLD_USER);
    }

    /// Resume I/O: complete what was held back, then admit the held requests in order.
    pub fn resume(&mut self, now: Tick) -> Vec<VolumeEffect> {
        self.release(HOLD_USER, now)
    }

    /// Holds I/O for `reason` (one of the `HOLD_*` bits).
    pub fn hold(&mut self, reason: u8) {
        self.holds |= reason;
    }

    /// Ends the hold for `reason`; once no reason is left, completes what was held back and
    /// admits the held requests in order.
    pub fn release(&mut self, reason: u8, now: Tick) -> Vec<VolumeEffect> {
        let mut effects = Vec::new();
        if self.holds & reason == 0 {
            return effects;
        }
        self.holds &= !reason;
        if self.holds != 0 {
            return effects;
        }
        let mut ready: Vec<(Tick, RequestId)> = self
            .requests
            .iter()
            .filter(|(_, request)| {
                request.stage == Stage::ReadyToComplete && request.waiting.is_empty()
            })
            .map(|(id, request)| (request.start, *id))
            .collect();
        ready.sort_unstable();
        for (_, id) in ready {
            self.finish(id, now, &mut effects);
        }
        while let Some(id) = self.held.pop_front() {
            let resubmission = self.requests.get(&id).is_some_and(|r| r.resubmission);
            if self.closed && !resubmission {
                if let Some(request) = self.requests.remove(&id) {
                    if request.kind.modifies_data() {
                        self.modifying_in_flight = self.modifying_in_flight.saturating_sub(1);
                    }
                }
                self.stats.failed += 1;
                effects.push(VolumeEffect::Complete(id, Err(IoFault::Closed)));
            } else {
                self.admit(id, &mut effects);
            }
        }
        effects
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: u64 = 1 << 20;

    fn started(effects: &[VolumeEffect]) -> Vec<RequestId> {
        effects
            .iter()
            .filter_map(|effect| match effect {
                VolumeEffect::StartLocal(id) => Some(*id),
                _ => None,
            })
            .collect()
    }

    fn completed(effects: &[VolumeEffect]) -> Vec<(RequestId, Result<(), IoFault>)> {
        effects
            .iter()
            .filter_map(|effect| match effect {
                VolumeEffect::Complete(id, result) => Some((*id, *result)),
                _ => None,
            })
            .collect()
    }

    #[test]
    fn write_starts_and_completes_with_counting() {
        let mut core = DeviceCore::new(MIB, true);
        let (id, effects) = core.submit(IoKind::Write, ByteRange::new(0, 4096), 10);
        assert_eq!(effects, vec![VolumeEffect::StartLocal(id)]);
        assert_eq!(core.app_in_flight(), 1);
        assert_eq!(core.stage(id), Some(Stage::Local));
        let effects = core.local_done(id, Ok(()), 30);
        assert_eq!(completed(&effects), vec![(id, Ok(()))]);
        assert_eq!(core.app_in_flight(), 0);
        assert!(core.is_idle());
        let stats = core.stats();
        assert_eq!((stats.writes, stats.written_bytes), (1, 4096));
        assert_eq!(stats.write_latency_total, 20);
    }

    #[test]
    fn writes_beyond_end_and_on_secondary_are_refused_without_counting() {
        let mut core = DeviceCore::new(MIB, false);
        let (id, effects) = core.submit(IoKind::Write, ByteRange::new(0, 512), 0);
        assert_eq!(completed(&effects), vec![(id, Err(IoFault::ReadOnly))]);
        let (id, effects) = core.submit(IoKind::Read, ByteRange::new(MIB - 1, 2), 0);
        assert_eq!(completed(&effects), vec![(id, Err(IoFault::BeyondEnd))]);
        let (id, effects) = core.submit(IoKind::Read, ByteRange::new(u64::MAX, 2), 0);
        assert_eq!(completed(&effects), vec![(id, Err(IoFault::BeyondEnd))]);
        assert_eq!(core.app_in_flight(), 0);
        core.set_writable(true);
        let (id, effects) = core.submit(IoKind::Discard, ByteRange::new(MIB, 4096), 0);
        assert_eq!(completed(&effects), vec![(id, Err(IoFault::BeyondEnd))]);
    }

    #[test]
    fn overlapping_writes_run_one_after_the_other_in_order() {
        let mut core = DeviceCore::new(MIB, true);
        let (first, e1) = core.submit(IoKind::Write, ByteRange::new(100, 10), 0);
        // Same 4 KiB block, different bytes: still a conflict (read-modify-write).
        let (second, e2) = core.submit(IoKind::Write, ByteRange::new(2000, 10), 0);
        let (third, e3) = core.submit(IoKind::Discard, ByteRange::new(0, 8192), 0);
        let (apart, e4) = core.submit(IoKind::Write, ByteRange::new(8192, 4096), 0);
        assert_eq!(started(&e1), vec![first]);
        assert!(started(&e2).is_empty() && started(&e3).is_empty());
        assert_eq!(started(&e4), vec![apart]);
        assert_eq!(core.stage(second), Some(Stage::WaitingForConflict));
        assert_eq!(core.app_in_flight(), 4);
        let effects = core.local_done(first, Ok(()), 1);
        // The discard overlaps the second write, which arrived earlier: it keeps waiting.
        assert_eq!(started(&effects), vec![second]);
        let effects = core.local_done(second, Ok(()), 2);
        assert_eq!(started(&effects), vec![third]);
    }

    #[test]
    fn suspend_holds_new_requests_and_completions_until_resume() {
        let mut core = DeviceCore::new(MIB, true);
        let (running, _) = core.submit(IoKind::Write, ByteRange::new(0, 4096), 0);
        core.suspend();
        let (held, effects) = core.submit(IoKind::Write, ByteRange::new(4096, 4096), 0);
        assert!(effects.is_empty());
        assert_eq!(core.stage(held), Some(Stage::Held));
        assert_eq!(core.held(), 1);
        let effects = core.local_done(running, Ok(()), 5);
        assert!(
            completed(&effects).is_empty(),
            "completion waits while suspended"
        );
        assert_eq!(core.stage(running), Some(Stage::ReadyToComplete));
        assert!(!core.is_idle());
        let effects = core.resume(6);
        assert_eq!(completed(&effects), vec![(running, Ok(()))]);
        assert_eq!(started(&effects), vec![held]);
        assert_eq!(core.app_in_flight(), 1);
    }

    #[test]
    fn closed_device_refuses_new_requests_and_fails_held_ones() {
        let mut core = DeviceCore::new(MIB, true);
        core.suspend();
        let (held, _) = core.submit(IoKind::Read, ByteRange::new(0, 4096), 0);
        core.close();
        let (refused, effects) = core.submit(IoKind::Read, ByteRange::new(0, 4096), 0);
        assert_eq!(completed(&effects), vec![(refused, Err(IoFault::Closed))]);
        let effects = core.resume(1);
        assert_eq!(completed(&effects), vec![(held, Err(IoFault::Closed))]);
        assert!(core.is_idle());
    }

    #[test]
    fn postponed_request_releases_its_count_exactly_once() {
        let mut core = DeviceCore::new(MIB, true);
        let (id, _) = core.submit(IoKind::Write, ByteRange::new(0, 4096), 7);
        assert!(core.postpone(id, 1).is_empty(), "local part still running");
        assert_eq!(core.app_in_flight(), 1);
        let effects = core.local_done(id, Ok(()), 2);
        assert_eq!(effects, vec![VolumeEffect::Postponed(id)]);
        assert_eq!(core.app_in_flight(), 0);
        // Re-submission is a new request with the original start tick.
        let (again, effects) = core.submit(IoKind::Write, ByteRange::new(0, 4096), 7);
        assert_eq!(started(&effects), vec![again]);
        assert_eq!(core.start_tick(again), Some(7));
        assert_eq!(core.app_in_flight(), 1);
        let effects = core.local_done(again, Ok(()), 9);
        assert_eq!(completed(&effects), vec![(again, Ok(()))]);
        assert_eq!(core.app_in_flight(), 0);
        assert_eq!(core.stats().postponed, 1);
    }

    #[test]
    fn local_failure_is_reported_and_counted() {
        let mut core = DeviceCore::new(MIB, true);
        let (id, _) = core.submit(IoKind::Flush, ByteRange::new(0, 0), 0);
        let effects = core.local_done(id, Err(IoFault::LocalIo(5)), 1);
        assert_eq!(completed(&effects), vec![(id, Err(IoFault::LocalIo(5)))]);
        assert_eq!(core.stats().failed, 1);
    }
}

#[cfg(test)]
mod replication_tests {
    use super::*;
    use crate::core::replication::Outgoing;

    const MIB: u64 = 1 << 20;
    const PEER: PeerId = 1;

    fn connected_core(protocol: ReplicationProtocol) -> DeviceCore {
        let mut core = DeviceCore::new(MIB, true);
        core.add_peer(PEER, protocol);
        core.peer_connected(PEER);
        core
    }

    fn completed(effects: &[VolumeEffect]) -> Vec<RequestId> {
        effects
            .iter()
            .filter_map(|effect| match effect {
                VolumeEffect::Complete(id, Ok(())) => Some(*id),
                _ => None,
            })
            .collect()
    }

    fn sent(effects: &[VolumeEffect]) -> Vec<Outgoing> {
        effects
            .iter()
            .filter_map(|effect| match effect {
                VolumeEffect::Send(PEER, outgoing) => Some(*outgoing),
                _ => None,
            })
            .collect()
    }

    /// Two primaries: the resolver decides a concurrent peer write at once, the other side
    /// waits for the answer; a peer write that follows the local one (by `seen`) is no
    /// conflict.
    #[test]
    fn the_resolver_supersedes_or_retries_concurrent_writes_and_the_other_side_waits() {
        let page = |blocks: u64, count: u64| ByteRange::new(blocks * 4096, count * 4096);
        // The resolver's write to blocks 0..4 is sent as seq 1 and not answered yet.
        let mut resolver = connected_core(ReplicationProtocol::C);
        let (local, _) = resolver.submit(IoKind::Write, page(0, 4), 0);
        assert_eq!(
            resolver.admit_received((PEER, 1, 1), page(1, 2), 0, true),
            ReceivedDecision::Superseded,
            "inside the local write"
        );
        assert_eq!(
            resolver.admit_received((PEER, 1, 2), page(3, 2), 0, true),
            ReceivedDecision::Retry { after: 1 },
            "overlapping, not inside"
        );
        assert_eq!(
            resolver.admit_received((PEER, 1, 3), page(1, 1), 1, true),
            ReceivedDecision::Wait,
            "issued after the peer applied seq 1: it follows, once the local write landed"
        );
        resolver.local_done(local, Ok(()), 1);
        assert_eq!(
            resolver.admit_received((PEER, 1, 3), page(1, 1), 1, true),
            ReceivedDecision::Apply
        );
        let stats = resolver.stats();
        assert_eq!(
            (
                stats.concurrent_writes,
                stats.superseded,
                stats.retries_asked
            ),
            (2, 1, 1)
        );
        // A local write issued while a received one is being applied waits for it.
        assert_eq!(
            resolver.admit_received((PEER, 1, 4), page(8, 1), 0, true),
            ReceivedDecision::Apply
        );
        let (follower, effects) = resolver.submit(IoKind::Write, page(8, 1), 2);
        assert!(sent(&effects).is_empty());
        assert_eq!(resolver.stage(follower), Some(Stage::WaitingForPeer));
        let effects = resolver.received_landed((PEER, 1, 4));
        assert!(effects.contains(&VolumeEffect::StartLocal(follower)));

        // The other side never decides: it waits for the answer to its own write.
        let mut other = connected_core(ReplicationProtocol::C);
        let (mine, _) = other.submit(IoKind::Write, page(3, 2), 0);
        other.local_done(mine, Ok(()), 1);
        assert_eq!(
            other.admit_received((PEER, 1, 1), page(0, 4), 0, false),
            ReceivedDecision::Wait
        );
        // RetryWrite: postponed until the peer's write 1 landed here; the peer's write goes on.
        other
            .peer_asked_retry(PEER, 1, 1, 2)
            .expect("awaits an answer");
        assert_eq!(
            other.admit_received((PEER, 1, 1), page(0, 4), 0, false),
            ReceivedDecision::Apply
        );
        assert!(other.acknowledged_peer_writes(PEER, 0, 3).is_empty());
        other.received_landed((PEER, 1, 1));
        other.note_landed(PEER, 1, page(0, 4));
        let effects = other.acknowledged_peer_writes(PEER, 1, 4);
        assert!(effects.contains(&VolumeEffect::Postponed(mine)));
        assert_eq!((other.postponed(), other.app_in_flight()), (1, 0));
        // It comes back under its old id and is sent again, now following the peer's write.
        let effects = other.resubmit(mine, IoKind::Write, page(3, 2), 0);
        assert!(matches!(
            sent(&effects)[..],
            [Outgoing::Data { request, seen: 1, .. }] if request == mine
        ));
        assert_eq!((other.postponed(), other.app_in_flight()), (0, 1));
        assert!(
            other.peer_superseded(PEER, 7, 5).is_err(),
            "an answer for a write that awaits none"
        );
    }

    #[test]
    fn protocol_c_completes_only_after_local_write_and_write_ack() {
        let mut core = connected_core(ReplicationProtocol::C);
        let (id, effects) = core.submit(IoKind::Write, ByteRange::new(0, 4096), 0);
        assert_eq!(
            sent(&effects),
            vec![Outgoing::Data {
                request: id,
                seq: 1,
                epoch: 1,
                seen: 0
            }]
        );
        assert!(completed(&core.local_done(id, Ok(()), 1)).is_empty());
        // Protocol B's ack is not enough for protocol C.
        let effects = core.peer_ack(PEER, &PeerMessage::RecvAck { up_to: 1 }, 2);
        assert!(completed(&effects.expect("the call under test succeeds")).is_empty());
        let effects = core.peer_ack(PEER, &PeerMessage::WriteAck { up_to: 1 }, 3);
        assert_eq!(
            completed(&effects.expect("the call under test succeeds")),
            vec![id]
        );
    }

    #[test]
    fn ack_before_local_completion_waits_for_the_local_write() {
        let mut core = connected_core(ReplicationProtocol::B);
        let (id, _) = core.submit(IoKind::Write, ByteRange::new(0, 4096), 0);
        let effects = core.peer_ack(PEER, &PeerMessage::RecvAck { up_to: 1 }, 1);
        assert!(completed(&effects.expect("the call under test succeeds")).is_empty());
        assert_eq!(completed(&core.local_done(id, Ok(()), 2)), vec![id]);
    }

    #[test]
    fn protocol_a_completes_once_handed_to_the_transport() {
        let mut core = connected_core(ReplicationProtocol::A);
        let (id, _) = core.submit(IoKind::Write, ByteRange::new(0, 4096), 0);
        assert!(completed(&core.local_done(id, Ok(()), 1)).is_empty());
        assert_eq!(completed(&core.peer_sent(PEER, id, 2)), vec![id]);
    }

    #[test]
    fn flush_waits_for_the_barrier_ack_of_a_flushing_barrier() {
        let mut core = connected_core(ReplicationProtocol::C);
        let (write, _) = core.submit(IoKind::Write, ByteRange::new(0, 4096), 0);
        let (flush, effects) = core.submit(IoKind::Flush, ByteRange::new(0, 0), 0);
        assert_eq!(
            sent(&effects),
            vec![Outgoing::Barrier {
                seq: 2,
                epoch: 1,
                writes: 1,
                flush: true
            }]
        );
        core.local_done(write, Ok(()), 1);
        let effects = core.peer_ack(PEER, &PeerMessage::WriteAck { up_to: 1 }, 2);
        assert_eq!(
            completed(&effects.expect("the call under test succeeds")),
            vec![write]
        );
        assert!(completed(&core.local_done(flush, Ok(()), 4)).is_empty());
        // A wrong count is a protocol error.
        assert!(core
            .peer_ack(
                PEER,
                &PeerMessage::BarrierAck {
                    epoch: 1,
                    writes: 2
                },
                5
            )
            .is_err());
        let effects = core.peer_ack(
            PEER,
            &PeerMessage::BarrierAck {
                epoch: 1,
                writes: 1,
            },
            5,
        );
        assert_eq!(
            completed(&effects.expect("the call under test succeeds")),
            vec![flush]
        );
    }

    #[test]
    fn epochs_close_on_completion_and_when_idle() {
        let mut core = connected_core(ReplicationProtocol::C);
        let (first, _) = core.submit(IoKind::Write, ByteRange::new(0, 4096), 0);
        let (second, _) = core.submit(IoKind::Write, ByteRange::new(8192, 4096), 0);
        core.local_done(first, Ok(()), 1);
        let effects = core
            .peer_ack(PEER, &PeerMessage::WriteAck { up_to: 1 }, 2)
            .expect("the call under test succeeds");
        // A write is still in flight: no barrier yet, but the epoch is marked for closing.
        assert!(sent(&effects).is_empty());
        let (third, effects) = core.submit(IoKind::Write, ByteRange::new(65536, 4096), 3);
        assert_eq!(
            sent(&effects),
            vec![
                Outgoing::Barrier {
                    seq: 3,
                    epoch: 1,
                    writes: 2,
                    flush: false
                },
                Outgoing::Data {
                    request: third,
                    seq: 4,
                    epoch: 2,
                    seen: 0
                },
            ]
        );
        core.local_done(second, Ok(()), 4);
        core.peer_ack(PEER, &PeerMessage::WriteAck { up_to: 2 }, 5)
            .expect("the ack is accepted");
        core.local_done(third, Ok(()), 6);
        let effects = core
            .peer_ack(PEER, &PeerMessage::WriteAck { up_to: 4 }, 7)
            .expect("the call under test succeeds");
        // Idle now: the open epoch is closed at once so that the peer can acknowledge it.
        assert_eq!(
            sent(&effects),
            vec![Outgoing::Barrier {
                seq: 5,
                epoch: 2,
                writes: 1,
                flush: false
            }]
        );
        assert!(core
            .peer_ack(
                PEER,
                &PeerMessage::BarrierAck {
                    epoch: 1,
                    writes: 2
                },
                8
            )
            .is_ok());
        assert!(core
            .peer_ack(
                PEER,
                &PeerMessage::BarrierAck {
                    epoch: 2,
                    writes: 1
                },
                8
            )
            .is_ok());
        assert_eq!(core.peer(PEER).map(|p| p.unacked_writes()), Some(0));
    }

    #[test]
    fn disconnect_releases_waiting_requests_and_counts_out_of_sync() {
        let mut core = connected_core(ReplicationProtocol::C);
        let (id, _) = core.submit(IoKind::Write, ByteRange::new(0, 8192), 0);
        core.local_done(id, Ok(()), 1);
        assert_eq!(completed(&core.peer_disconnected(PEER, 2)), vec![id]);
        let oos = core.peer(PEER).map(|p| p.out_of_sync.dirty_blocks());
        assert_eq!(oos, Some(2));
        // While away, writes complete locally and are counted.
        let (alone, effects) = core.submit(IoKind::Write, ByteRange::new(65536, 4096), 3);
        assert!(sent(&effects).is_empty());
        assert_eq!(completed(&core.local_done(alone, Ok(()), 4)), vec![alone]);
        assert_eq!(
            core.peer(PEER).map(|p| p.out_of_sync.dirty_blocks()),
            Some(3)
        );
    }

    #[test]
    fn overlapping_write_waits_for_full_completion_including_the_peer() {
        let mut core = connected_core(ReplicationProtocol::C);
        let (first, _) = core.submit(IoKind::Write, ByteRange::new(0, 4096), 0);
        let (second, effects) = core.submit(IoKind::Write, ByteRange::new(0, 512), 0);
        assert!(
            sent(&effects).is_empty(),
            "the overlapping write must not be sent yet"
        );
        core.local_done(first, Ok(()), 1);
        assert_eq!(core.stage(second), Some(Stage::WaitingForConflict));
        let effects = core
            .peer_ack(PEER, &PeerMessage::WriteAck { up_to: 1 }, 2)
            .expect("the call under test succeeds");
        // The second write goes out in a later epoch than the first.
        assert_eq!(
            sent(&effects),
            vec![
                Outgoing::Barrier {
                    seq: 2,
                    epoch: 1,
                    writes: 1,
                    flush: false
                },
                Outgoing::Data {
                    request: second,
                    seq: 3,
                    epoch: 2,
                    seen: 0
                },
            ]
        );
    }
}
