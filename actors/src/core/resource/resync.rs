//! Resync (docs/protocol.md, "Resync"): after the handshake decided that one side lacks what
//! the other wrote, both send their out-of-sync bitmap for the other, both take the union, and
//! the sync target pulls the dirty blocks in linear order on the resync stream. A bit clears
//! on the target once it wrote the block, and on the source once the target said so. The
//! source reads under a lock of the volume's conflict domain, so an application write to the
//! same blocks lands after the resync write on the target, never before it.

use std::collections::{BTreeMap, VecDeque};

use super::sync_controller::{Pacer, RateControl};
use super::{BlockDigest, CommandId, DigestPurpose, Effect, MetaWaiter, ResourceCore};
use crate::core::device::ByteRange;
use crate::core::messages::PeerMessage;
use crate::core::replication::PeerId;
use crate::core::split_brain::SplitBrainPolicy;
use crate::core::{DiskState, Role, Tick, BLOCK_SIZE};

/// Runs per `SyncBitmap` message.
const RUNS_PER_MESSAGE: usize = 4096;
/// The largest request a source serves.
pub const MAX_RESYNC_REQUEST: u64 = 1 << 20;

/// How a resync runs; settable per resource.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SyncConfig {
    /// Activity-log extents kept hot (DRBD's `al-extents`).
    pub al_extents: usize,
    /// Bytes per resync request.
    pub request_bytes: u64,
    /// How the target paces its requests: the rate controller and its settings.
    pub rate: RateControl,
    /// Automatic split-brain recovery (`after_sb_*`).
    pub split_brain: SplitBrainPolicy,
    /// Checksum-based resync (DRBD's `csums-alg`): the target sends digests of its blocks
    /// first, and the source sends data only where its own differ.
    pub csums: bool,
}

impl Default for SyncConfig {
    fn default() -> Self {
        SyncConfig {
            al_extents: crate::core::activity_log::DEFAULT_AL_EXTENTS,
            request_bytes: 256 << 10,
            rate: RateControl::default(),
            split_brain: SplitBrainPolicy::default(),
            csums: false,
        }
    }
}

/// Which side of a resync this node is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum SyncRole {
    Source,
    Target,
}

impl SyncRole {
    pub fn other(self) -> SyncRole {
        match self {
            SyncRole::Source => SyncRole::Target,
            SyncRole::Target => SyncRole::Source,
        }
    }
}

impl std::fmt::Display for SyncRole {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            SyncRole::Source => "SyncSource",
            SyncRole::Target => "SyncTarget",
        })
    }
}

/// What one side knows of itself at connect time, for [`resync_direction`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SideFacts {
    pub role: Role,
    pub disk: DiskState,
    /// Bytes this side counts out of sync for the other.
    pub bits_for_other: u64,
}

/// The direction of the resync when both sides are in the same data generation: who has the
/// blocks the other may lack. Both sides compute it from the same facts, mirrored, and reach
/// mirrored answers; `None` when there is nothing to sync or no side has the better claim.
pub fn resync_direction(
    local: SideFacts,
    local_id: u8,
    peer: SideFacts,
    peer_id: u8,
) -> Option<SyncRole> {
    if local.bits_for_other == 0 && peer.bits_for_other == 0 {
        return None;
    }
    // A Primary's data is what its application sees: it is never overwritten by a resync.
    match (local.role, peer.role) {
        (Role::Primary, Role::Secondary) => return Some(SyncRole::Source),
        (Role::Secondary, Role::Primary) => return Some(SyncRole::Target),
        _ => {}
    }
    // How good a claim each side's data has: UpToDate over Consistent (crashed, not confirmed
    // since) over none (Outdated, Inconsistent).
    let claim = |disk: DiskState| match disk {
        DiskState::UpToDate => 2,
        DiskState::Consistent => 1,
        _ => 0,
    };
    match claim(local.disk).cmp(&claim(peer.disk)) {
        std::cmp::Ordering::Greater => return Some(SyncRole::Source),
        std::cmp::Ordering::Less => return Some(SyncRole::Target),
        std::cmp::Ordering::Equal if claim(local.disk) == 0 => return None,
        std::cmp::Ordering::Equal => {}
    }
    match (local.bits_for_other > 0, peer.bits_for_other > 0) {
        (true, false) => Some(SyncRole::Source),
        (false, true) => Some(SyncRole::Target),
        _ => {
            // Both count blocks for the other: the Primary's data wins, else the lower id's.
            let local_first = match (local.role, peer.role) {
                (Role::Primary, Role::Secondary) => true,
                (Role::Secondary, Role::Primary) => false,
                _ => local_id < peer_id,
            };
            Some(if local_first {
                SyncRole::Source
            } else {
                SyncRole::Target
            })
        }
    }
}

/// The resync with one peer, on one connection.
#[derive(Debug)]
pub struct Resync {
    pub role: SyncRole,
    received_bitmap: bool,
    /// The transfer runs (bitmaps exchanged, and on the target the Inconsistent mark durable).
    running: bool,
    /// Target: the next block to look at.
    cursor: u64,
    /// Target: requested and not yet written, offset -> len.
    requested: BTreeMap<u64, u64>,
    requested_bytes: u64,
    /// Target: requests whose data arrived (a second arrival is a protocol error).
    arrived: std::collections::BTreeSet<u64>,
    /// Source: requests being read, sent or written on the target: offset -> (len, lock).
    serving: BTreeMap<u64, (u64, u64)>,
    /// Source: requests waiting for application writes to the same blocks, with the target's
    /// digests when it sent them (checksum-based resync).
    blocked: VecDeque<(u64, u64, Option<Vec<BlockDigest>>)>,
    /// Source: the target's digests of requests being compared here.
    target_digests: BTreeMap<u64, Vec<BlockDigest>>,
    /// Source: requests answered `ResyncSame` (nothing moved), until `ResyncWritten`.
    same: std::collections::BTreeSet<u64>,
    /// Out-of-sync blocks when the transfer started (plus any found later).
    pub total_blocks: u64,
    /// Blocks written on the target so far.
    pub done_blocks: u64,
    pub moved_bytes: u64,
    pub started: Tick,
    pub last_progress: Tick,
    /// Why the resync cannot go on, when it cannot.
    pub stalled: Option<String>,
    /// Target: the rate controller, once the transfer runs.
    pacer: Option<Pacer>,
}

/// The observable state of a resync.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct SyncStatus {
    pub role: SyncRole,
    pub running: bool,
    pub total_bytes: u64,
    pub done_bytes: u64,
    pub moved_bytes: u64,
    pub started: Tick,
    pub last_progress: Tick,
    pub stalled: Option<String>,
    /// Target: bytes requested and not yet written.
    pub in_flight_bytes: u64,
    /// Target with the controller on: this step's request budget, in bytes per second.
    pub planned_rate: Option<u64>,
    /// Target: yielding to application writes (one request in flight).
    pub yielding: bool,
}

impl Resync {
    fn new(role: SyncRole, now: Tick) -> Self {
        Resync {
            role,
            received_bitmap: false,
            running: false,
            cursor: 0,
            requested: BTreeMap::new(),
            requested_bytes: 0,
            arrived: std::collections::BTreeSet::new(),
            serving: BTreeMap::new(),
            blocked: VecDeque::new(),
            target_digests: BTreeMap::new(),
            same: std::collections::BTreeSet::new(),
            total_blocks: 0,
            done_blocks: 0,
            moved_bytes: 0,
            started: now,
            last_progress: now,
            stalled: None,
            pacer: None,
        }
    }

    /// Brings `status` up to date without allocating unless the stall reason changed.
    pub fn update_status(&self, status: &mut SyncStatus) {
        status.role = self.role;
        status.running = self.running;
        status.total_bytes = self.total_blocks * BLOCK_SIZE;
        status.done_bytes = self.done_blocks * BLOCK_SIZE;
        status.moved_bytes = self.moved_bytes;
        status.started = self.started;
        status.last_progress = self.last_progress;
        if status.stalled != self.stalled {
            status.stalled.clone_from(&self.stalled);
        }
        let pacer = self.pacer.as_ref().map(Pacer::status).unwrap_or_default();
        status.in_flight_bytes = self.requested_bytes;
        status.planned_rate = pacer.planned_rate;
        status.yielding = pacer.yielding;
    }

    pub fn status(&self) -> SyncStatus {
        let pacer = self.pacer.as_ref().map(Pacer::status).unwrap_or_default();
        SyncStatus {
            role: self.role,
            running: self.running,
            total_bytes: self.total_blocks * BLOCK_SIZE,
            done_bytes: self.done_blocks * BLOCK_SIZE,
            moved_bytes: self.moved_bytes,
            started: self.started,
            last_progress: self.last_progress,
            stalled: self.stalled.clone(),
            in_flight_bytes: self.requested_bytes,
            planned_rate: pacer.planned_rate,
            yielding: pacer.yielding,
        }
    }
}

impl ResourceCore {
    /// Resync, verify and split-brain recovery need a two-node resource for now (a Secondary
    /// cannot tell which of its blocks a third node wrote; docs/protocol.md, "Resync").
    pub(super) fn resync_possible(&self) -> bool {
        self.config.peers.len() == 1
    }

    /// The handshake decided on a resync with `peer`: send our bitmap for it.
    pub(super) fn start_resync(&mut self, peer: PeerId, role: SyncRole, now: Tick) {
        self.abandon_resync(peer, now);
        let runs = self
            .device
            .peer(peer)
            .map(|sender| sender.out_of_sync.runs())
            .unwrap_or_default();
        let Some(link) = self.links.get_mut(&peer) else {
            return;
        };
        tracing::info!(resource = %self.config.resource, peer = %link.name, %role, "resync decided; exchanging bitmaps");
        link.resync = Some(Resync::new(role, now));
        let name = link.name.clone();
        let from_source = role == SyncRole::Source;
        let mut parts = runs.chunks(RUNS_PER_MESSAGE).peekable();
        if parts.peek().is_none() {
            self.effects.push_back(Effect::Send {
                peer,
                message: PeerMessage::SyncBitmap {
                    runs: Vec::new(),
                    last: true,
                    from_source,
                },
            });
        }
        while let Some(part) = parts.next() {
            self.effects.push_back(Effect::Send {
                peer,
                message: PeerMessage::SyncBitmap {
                    runs: part.to_vec(),
                    last: parts.peek().is_none(),
                    from_source,
                },
            });
        }
        self.emit(format!(
            "change peer-device name:{} peer-node-id:{peer} conn-name:{name} replication:{role}",
            self.config.resource
        ));
    }

    /// `invalidate` (`remote`: `invalidate-remote`): every block out of sync with the peer,
    /// and a full resync with this node (or the peer) as the target, now if connected, else at
    /// the next handshake (an Inconsistent node is behind; a node that counts blocks for an
    /// UpToDate peer of the same generation is its source).
    pub(super) fn invalidate(&mut self, id: CommandId, remote: bool, now: Tick) {
        use super::CommandError;
        let refuse = |why: String| Err(CommandError::Refused(why));
        let Some(peer) = self.links.keys().next().copied() else {
            return self.done(id, refuse("the resource has no peer to resync with".into()));
        };
        if !self.resync_possible() {
            return self.done(
                id,
                refuse("invalidate needs a two-node resource for now".into()),
            );
        }
        if self.is_changing() {
            return self.done(id, Err(CommandError::Busy));
        }
        let link = &self.links[&peer];
        let name = link.name.clone();
        if link.resync.is_some() {
            return self.done(id, Err(CommandError::Resyncing(name)));
        }
        let connected = link.is_connected();
        if remote {
            if self.disk != DiskState::UpToDate {
                return self.done(id, Err(CommandError::DiskNotUpToDate(self.disk)));
            }
            if connected && link.role == Some(Role::Primary) {
                return self.done(
                    id,
                    refuse(format!("{name} is Primary; its data cannot be overwritten")),
                );
            }
        } else {
            if self.role == Role::Primary {
                return self.done(id, refuse("this node is Primary; demote it first".into()));
            }
            if connected && !matches!(link.disk, Some(DiskState::UpToDate | DiskState::Consistent))
            {
                return self.done(
                    id,
                    refuse(format!("{name} has no consistent data to resync from")),
                );
            }
        }
        tracing::warn!(resource = %self.config.resource, peer = %name, remote, "invalidated: a full resync follows");
        self.device
            .mark_out_of_sync(peer, ByteRange::new(0, self.config.size_bytes));
        if !remote {
            self.meta.flags.consistent = false;
            self.meta.flags.up_to_date = false;
            self.set_disk(DiskState::Inconsistent, true);
        }
        if connected {
            let role = if remote {
                SyncRole::Source
            } else {
                SyncRole::Target
            };
            self.start_resync(peer, role, now);
        }
        let what = match (remote, connected) {
            (false, true) => format!("Inconsistent; every block comes from {name}"),
            (false, false) => {
                format!("Inconsistent; every block comes from {name} once it connects")
            }
            (true, true) => format!("{name} takes every block from this node"),
            (true, false) => format!("{name} takes every block from this node once it connects"),
        };
        self.done(id, Ok(what));
    }

    /// Learned mid-connection that this node lacks what the connected peer has (the peer's
    /// forced promotion, or its count of what this node misses): catch up as its target. The
    /// peer answers our bitmap with its own (see [`Self::sync_bitmap_received`]).
    pub(super) fn catch_up_from(&mut self, peer: PeerId, now: Tick) {
        let idle = self
            .links
            .get(&peer)
            .is_some_and(|l| l.is_connected() && l.resync.is_none());
        if idle && self.resync_possible() && self.role == Role::Secondary && !self.is_changing() {
            self.start_resync(peer, SyncRole::Target, now);
        }
    }

    pub(super) fn sync_bitmap_received(
        &mut self,
        peer: PeerId,
        runs: Vec<(u64, u64)>,
        last: bool,
        from_source: bool,
        now: Tick,
    ) {
        let peer_role = if from_source {
            SyncRole::Source
        } else {
            SyncRole::Target
        };
        let ours = self.links.get(&peer).map(|l| {
            l.resync
                .as_ref()
                .map(|r| (r.role, r.received_bitmap, r.running))
        });
        match ours {
            None => return,
            Some(None) => {
                // The peer decided on a resync we did not (it saw blocks written during the
                // handshake, or found mid-connection that it lacks our data): take the other
                // side, unless this node cannot.
                let role = peer_role.other();
                if role == SyncRole::Target && (self.role == Role::Primary || self.is_changing()) {
                    return self.protocol_error(
                        peer,
                        "the peer offers a resync to a node that is (becoming) Primary".into(),
                        now,
                    );
                }
                self.start_resync(peer, role, now);
            }
            Some(Some((role, received, running))) if role == peer_role && !received && !running => {
                // Both chose the same side: the Primary, else the lower node id, is the
                // source. Both sides apply the same rule to the same facts.
                let peer_is_primary =
                    self.links.get(&peer).and_then(|l| l.role) == Some(Role::Primary);
                let we_source = match (self.role, peer_is_primary) {
                    (Role::Primary, false) => true,
                    (Role::Secondary, true) => false,
                    _ => self.config.node_id < peer,
                };
                let settled = if we_source {
                    SyncRole::Source
                } else {
                    SyncRole::Target
                };
                if let Some(resync) = self.links.get_mut(&peer).and_then(|l| l.resync.as_mut()) {
                    resync.role = settled;
                }
            }
            Some(Some(_)) => {}
        }
        let in_resync = self
            .links
            .get(&peer)
            .and_then(|link| link.resync.as_ref())
            .is_some_and(|resync| !resync.received_bitmap);
        if !in_resync {
            return self.protocol_error(peer, "SyncBitmap outside a bitmap exchange".into(), now);
        }
        let Some(bitmap) = self.device.out_of_sync_mut(peer) else {
            return;
        };
        let blocks = bitmap.blocks();
        for (first, count) in runs {
            if first >= blocks || count > blocks - first {
                return self.protocol_error(
                    peer,
                    format!("SyncBitmap run of {count} blocks at block {first} is beyond the end"),
                    now,
                );
            }
            bitmap.mark_blocks(first, count);
        }
        if last {
            if let Some(resync) = self.links.get_mut(&peer).and_then(|l| l.resync.as_mut()) {
                resync.received_bitmap = true;
            }
            self.begin_transfer(peer, now);
        }
    }

    /// Both bitmaps are in: the target makes its disk Inconsistent (durably) before the first
    /// resync write; the source waits for requests.
    fn begin_transfer(&mut self, peer: PeerId, now: Tick) {
        let dirty = self
            .device
            .peer(peer)
            .map_or(0, |sender| sender.out_of_sync.dirty_blocks());
        let role = {
            let Some(resync) = self.links.get_mut(&peer).and_then(|l| l.resync.as_mut()) else {
                return;
            };
            resync.total_blocks = dirty;
            resync.started = now;
            resync.last_progress = now;
            resync.role
        };
        tracing::info!(resource = %self.config.resource, peer = %self.peer_name(peer), %role, dirty_bytes = dirty * BLOCK_SIZE, "resync starts");
        match role {
            SyncRole::Source => {
                if let Some(resync) = self.links.get_mut(&peer).and_then(|l| l.resync.as_mut()) {
                    resync.running = true;
                }
            }
            SyncRole::Target if dirty == 0 => self.finish_resync_as_target(peer),
            SyncRole::Target => {
                self.meta.flags.consistent = false;
                self.meta.flags.up_to_date = false;
                self.set_disk(DiskState::Inconsistent, false);
                if !self.store_initial_sync_bitmap(peer) {
                    self.persist(Some(MetaWaiter::ResyncTarget(peer)));
                }
            }
        }
    }

    /// The target's Inconsistent mark is durable: the transfer may start.
    pub(super) fn resync_target_ready(&mut self, peer: PeerId, now: Tick) {
        if let Some(resync) = self.links.get_mut(&peer).and_then(|l| l.resync.as_mut()) {
            if resync.role == SyncRole::Target {
                resync.running = true;
                let sync = &self.config.sync;
                resync.pacer = Some(Pacer::new(&sync.rate, sync.request_bytes, now));
                self.request_more(peer, now);
            }
        }
    }

    /// Target: requests dirty blocks in linear order, as many as the rate controller allows
    /// (docs/protocol.md, "Resync").
    pub(super) fn request_more(&mut self, peer: PeerId, now: Tick) {
        if self.current_conn(peer).is_none() {
            return;
        }
        let mut sends = Vec::new();
        let finished = {
            let Some(bitmap) = self.device.peer(peer).map(|s| &s.out_of_sync) else {
                return;
            };
            let Some(resync) = self.links.get_mut(&peer).and_then(|l| l.resync.as_mut()) else {
                return;
            };
            if resync.role != SyncRole::Target || !resync.running || resync.stalled.is_some() {
                return;
            }
            let Some(pacer) = resync.pacer.as_mut() else {
                return;
            };
            let mut wrapped = false;
            loop {
                let max_blocks = pacer.next_request(now, resync.requested_bytes) / BLOCK_SIZE;
                if max_blocks == 0 {
                    break;
                }
                let Some((first, count)) = bitmap.next_dirty_run(resync.cursor, max_blocks) else {
                    // Blocks behind the cursor can be dirty again (a failed write): another
                    // pass, once nothing requested can overlap it.
                    if !wrapped && resync.cursor > 0 && resync.requested.is_empty() {
                        wrapped = true;
                        resync.cursor = 0;
                        continue;
                    }
                    break;
                };
                let offset = first * BLOCK_SIZE;
                let len = count * BLOCK_SIZE;
                resync.cursor = first + count;
                resync.requested.insert(offset, len);
                resync.requested_bytes += len;
                pacer.requested(len);
                sends.push(PeerMessage::ResyncRequest { offset, len });
            }
            resync.requested.is_empty() && sends.is_empty() && bitmap.dirty_blocks() == 0
        };
        let conn = self.current_conn(peer).unwrap_or_default();
        for message in sends {
            let effect = match message {
                // Checksum-based: digest these blocks first; the request goes with them.
                PeerMessage::ResyncRequest { offset, len } if self.config.sync.csums => {
                    Effect::Digest {
                        peer,
                        conn,
                        offset,
                        len,
                        purpose: DigestPurpose::ResyncTarget,
                    }
                }
                message => Effect::Send { peer, message },
            };
            self.effects.push_back(effect);
        }
        if finished {
            self.finish_resync_as_target(peer);
        }
    }

    /// Target: every block is written. Adopt the source's generation and become UpToDate.
    fn finish_resync_as_target(&mut self, peer: PeerId) {
        let Some(link) = self.links.get_mut(&peer) else {
            return;
        };
        let Some(resync) = link.resync.take() else {
            return;
        };
        let name = link.name.clone();
        let source_uuid = link.current_uuid;
        let source_history = link.peer_history.clone();
        let source_disk = link.disk;
        tracing::info!(resource = %self.config.resource, peer = %name, moved_bytes = resync.moved_bytes, "resync finished; this node is UpToDate");
        if source_uuid != 0 {
            self.meta.current_uuid = source_uuid;
            self.meta.history_uuids = source_history;
        }
        self.meta.bitmap_uuids.remove(&peer);
        self.meta.flags.initial_sync_bitmap_stored = false;
        self.effects.push_back(Effect::Send {
            peer,
            message: PeerMessage::ResyncDone {
                moved_bytes: resync.moved_bytes,
            },
        });
        // The data is the source's, and so is its claim: a Consistent source (it crashed and
        // no UpToDate peer confirmed it since) makes a Consistent target, an Outdated one an
        // Outdated target.
        match source_disk {
            Some(DiskState::UpToDate) => self.set_disk(DiskState::UpToDate, true),
            Some(DiskState::Consistent) => {
                self.meta.flags.consistent = true;
                self.meta.flags.up_to_date = true;
                self.meta.flags.unconfirmed = true;
                self.set_disk(DiskState::Consistent, true);
            }
            _ => {
                self.meta.flags.consistent = true;
                self.meta.flags.up_to_date = false;
                self.set_disk(DiskState::Outdated, true);
            }
        }
        self.emit(format!(
            "change peer-device name:{} peer-node-id:{peer} conn-name:{name} replication:Established moved:{}",
            self.config.resource, resync.moved_bytes
        ));
    }

    /// Source: the target has every block.
    pub(super) fn finish_resync_as_source(&mut self, peer: PeerId, moved_bytes: u64, now: Tick) {
        let is_source = self
            .links
            .get(&peer)
            .and_then(|l| l.resync.as_ref())
            .is_some_and(|r| r.role == SyncRole::Source && r.received_bitmap);
        if !is_source {
            return self.protocol_error(peer, "ResyncDone outside a resync".into(), now);
        }
        let Some(resync) = self.links.get_mut(&peer).and_then(|l| l.resync.take()) else {
            return;
        };
        for (_, (_, lock)) in resync.serving {
            let effects = self.device.unlock_resync(lock);
            self.volume_effects(effects, now);
        }
        let name = self.peer_name(peer);
        tracing::info!(resource = %self.config.resource, peer = %name, moved_bytes, "resync finished; the peer is UpToDate");
        if self.meta.bitmap_uuids.remove(&peer).is_some() {
            self.persist(None);
        }
        self.emit(format!(
            "change peer-device name:{} peer-node-id:{peer} conn-name:{name} replication:Established moved:{moved_bytes}",
            self.config.resource
        ));
        if self.missing_for(peer) > 0 {
            // Blocks marked after the bitmaps were exchanged (a verify of this node's that
            // ended meanwhile): another resync carries them.
            self.resync_marked_blocks(peer, now);
        }
    }

    /// Source: the target asks for blocks.
    pub(super) fn resync_requested(
        &mut self,
        peer: PeerId,
        offset: u64,
        len: u64,
        digests: Option<Vec<BlockDigest>>,
        now: Tick,
    ) {
        if digests
            .as_ref()
            .is_some_and(|d| d.len() as u64 != len / BLOCK_SIZE)
        {
            return self.protocol_error(
                peer,
                format!(
                    "ResyncChecksums for {len} bytes at {offset} has the wrong number of digests"
                ),
                now,
            );
        }
        let serving = self
            .links
            .get(&peer)
            .and_then(|l| l.resync.as_ref())
            .is_some_and(|r| r.role == SyncRole::Source && r.running);
        let valid = len > 0
            && len <= MAX_RESYNC_REQUEST
            && offset % BLOCK_SIZE == 0
            && len % BLOCK_SIZE == 0
            && offset
                .checked_add(len)
                .is_some_and(|end| end <= self.config.size_bytes);
        if !serving || !valid {
            return self.protocol_error(
                peer,
                format!("ResyncRequest of {len} bytes at {offset} is not valid here"),
                now,
            );
        }
        if let Some(resync) = self.links.get_mut(&peer).and_then(|l| l.resync.as_mut()) {
            resync.blocked.push_back((offset, len, digests));
        }
        self.serve_blocked(peer);
    }

    /// Source: starts every waiting request whose blocks no write holds.
    pub(super) fn serve_blocked(&mut self, peer: PeerId) {
        let Some(conn) = self.current_conn(peer) else {
            return;
        };
        let Some(resync) = self.links.get_mut(&peer).and_then(|l| l.resync.as_mut()) else {
            return;
        };
        let mut still = VecDeque::new();
        let mut starts = Vec::new();
        while let Some((offset, len, digests)) = resync.blocked.pop_front() {
            if !still.is_empty() {
                still.push_back((offset, len, digests));
                continue;
            }
            match self.device.lock_for_resync(ByteRange::new(offset, len)) {
                Some(lock) => {
                    resync.serving.insert(offset, (len, lock));
                    let compare = digests.is_some();
                    if let Some(digests) = digests {
                        resync.target_digests.insert(offset, digests);
                    }
                    starts.push((offset, len, compare));
                }
                None => still.push_back((offset, len, digests)),
            }
        }
        resync.blocked = still;
        for (offset, len, compare) in starts {
            self.effects.push_back(if compare {
                Effect::Digest {
                    peer,
                    conn,
                    offset,
                    len,
                    purpose: DigestPurpose::ResyncSource,
                }
            } else {
                Effect::SendResyncData {
                    peer,
                    conn,
                    offset,
                    len,
                }
            });
        }
    }

    /// Source, checksum-based resync: this node's digests of a request's blocks. Where they
    /// match the target's, nothing needs to move.
    pub(super) fn source_digested(
        &mut self,
        peer: PeerId,
        conn: u64,
        offset: u64,
        len: u64,
        result: Result<Vec<BlockDigest>, i32>,
    ) {
        let Some(resync) = self.links.get_mut(&peer).and_then(|l| l.resync.as_mut()) else {
            return;
        };
        let Some(theirs) = resync.target_digests.remove(&offset) else {
            return;
        };
        let same = result.is_ok_and(|ours| ours == theirs);
        let message = if same {
            resync.same.insert(offset);
            Effect::Send {
                peer,
                message: PeerMessage::ResyncSame { offset, len },
            }
        } else {
            Effect::SendResyncData {
                peer,
                conn,
                offset,
                len,
            }
        };
        self.effects.push_back(message);
    }

    /// Target, checksum-based resync: the digests of a request's blocks here go with it.
    pub(super) fn target_digested(
        &mut self,
        peer: PeerId,
        offset: u64,
        len: u64,
        result: Result<Vec<BlockDigest>, i32>,
    ) {
        let requested = self
            .links
            .get(&peer)
            .and_then(|l| l.resync.as_ref())
            .is_some_and(|r| r.requested.get(&offset) == Some(&len));
        if !requested {
            return;
        }
        let message = match result {
            Ok(digests) => PeerMessage::ResyncChecksums {
                offset,
                len,
                digests,
            },
            // Unreadable here: ask for the data.
            Err(_) => PeerMessage::ResyncRequest { offset, len },
        };
        self.effects.push_back(Effect::Send { peer, message });
    }

    /// Target: the answer to a request arrived. Anything but the first answer to a request
    /// made is a protocol error (the connection drops).
    fn answer_arrived(
        &mut self,
        peer: PeerId,
        what: &str,
        offset: u64,
        len: u64,
        now: Tick,
    ) -> bool {
        let expected = self
            .links
            .get_mut(&peer)
            .and_then(|l| l.resync.as_mut())
            .is_some_and(|r| r.requested.get(&offset) == Some(&len) && r.arrived.insert(offset));
        if !expected {
            self.protocol_error(
                peer,
                format!("{what} for {len} bytes at {offset} was not asked for"),
                now,
            );
        }
        expected
    }

    /// Target, checksum-based resync: the source's blocks are the same as these.
    pub(super) fn resync_same(&mut self, peer: PeerId, offset: u64, len: u64, now: Tick) {
        let Some(conn) = self.current_conn(peer) else {
            return;
        };
        if self.answer_arrived(peer, "ResyncSame", offset, len, now) {
            self.block_resynced(peer, conn, offset, len, Ok(()), false, now);
        }
    }

    /// Source: the blocks were read and sent, or the read failed.
    pub(super) fn resync_sent(
        &mut self,
        peer: PeerId,
        conn: u64,
        offset: u64,
        len: u64,
        result: Result<(), i32>,
        now: Tick,
    ) {
        if self.current_conn(peer) != Some(conn) {
            return;
        }
        if let Err(errno) = result {
            tracing::warn!(resource = %self.config.resource, peer = %self.peer_name(peer), offset, len, errno, "resync read failed");
            self.release_resync_lock(peer, offset, now);
            self.effects.push_back(Effect::Send {
                peer,
                message: PeerMessage::ResyncFailed { offset, len, errno },
            });
        }
    }

    fn release_resync_lock(&mut self, peer: PeerId, offset: u64, now: Tick) -> Option<u64> {
        let (len, lock) = self
            .links
            .get_mut(&peer)
            .and_then(|l| l.resync.as_mut())
            .and_then(|r| r.serving.remove(&offset))?;
        let effects = self.device.unlock_resync(lock);
        self.volume_effects(effects, now);
        Some(len)
    }

    /// Source: the target wrote (or failed to write) the blocks.
    pub(super) fn resync_written(
        &mut self,
        peer: PeerId,
        offset: u64,
        len: u64,
        ok: bool,
        now: Tick,
    ) {
        let Some(served) = self.release_resync_lock(peer, offset, now) else {
            return self.protocol_error(
                peer,
                format!("ResyncWritten for {len} bytes at {offset}, which were not sent"),
                now,
            );
        };
        if served != len {
            return self.protocol_error(
                peer,
                format!("ResyncWritten for {len} bytes at {offset}; {served} were sent"),
                now,
            );
        }
        if ok {
            if let Some(bitmap) = self.device.out_of_sync_mut(peer) {
                bitmap.clear(ByteRange::new(offset, len));
            }
            if let Some(link) = self.links.get_mut(&peer) {
                let moved = !link.resync.as_mut().is_some_and(|r| r.same.remove(&offset));
                if moved {
                    link.resynced_bytes += len;
                } else {
                    link.resync_same_bytes += len;
                }
                if let Some(resync) = link.resync.as_mut() {
                    resync.done_blocks += len / BLOCK_SIZE;
                    if moved {
                        resync.moved_bytes += len;
                    }
                    resync.last_progress = now;
                }
            }
        }
        self.serve_blocked(peer);
    }

    /// Target: the source's data for a request arrived.
    pub(super) fn resync_data(
        &mut self,
        peer: PeerId,
        conn: u64,
        offset: u64,
        len: u64,
        now: Tick,
    ) {
        if self.current_conn(peer) != Some(conn) {
            return;
        }
        if !self.answer_arrived(peer, "ResyncData", offset, len, now) {
            return;
        }
        // The blocks change under every other peer: the activity log covers them first, so a
        // crash here leaves them out of sync for every peer, not silently different.
        let range = ByteRange::new(offset, len);
        if self.device.activity_log().covers(range) {
            self.apply_resync_write(peer, conn, offset, len);
        } else {
            self.device.activity_log_mut().want(range);
            self.resync_writes_waiting.push((peer, conn, offset, len));
        }
    }

    /// Issues a resync write. The other peers did not get this data from here: counted out of
    /// sync for them before it lands (a write that lands after its connection is gone counts
    /// too).
    fn apply_resync_write(&mut self, peer: PeerId, conn: u64, offset: u64, len: u64) {
        let range = ByteRange::new(offset, len);
        self.device.activity_log_mut().touch(range);
        let others: Vec<PeerId> = self.device.peer_ids().filter(|p| *p != peer).collect();
        for other in others {
            self.device.mark_out_of_sync(other, range);
        }
        self.effects.push_back(Effect::ApplyResyncWrite {
            peer,
            conn,
            offset,
            len,
        });
    }

    /// The activity log's transaction is durable (or failed): resync writes it held go on.
    pub(super) fn release_resync_writes(&mut self, committed: bool, now: Tick) {
        for (peer, conn, offset, len) in std::mem::take(&mut self.resync_writes_waiting) {
            let range = ByteRange::new(offset, len);
            let still_wanted = self.current_conn(peer) == Some(conn)
                && self
                    .links
                    .get(&peer)
                    .and_then(|l| l.resync.as_ref())
                    .is_some_and(|r| r.requested.get(&offset) == Some(&len));
            if !still_wanted {
                // The connection (and the payload with it) is gone.
                continue;
            }
            if !committed {
                self.resync_write_done(peer, conn, offset, len, Err(5), now);
            } else if self.device.activity_log().covers(range) {
                self.apply_resync_write(peer, conn, offset, len);
            } else {
                self.device.activity_log_mut().want(range);
                self.resync_writes_waiting.push((peer, conn, offset, len));
            }
        }
    }

    /// Extents resync writes may be landing in (requested on this target).
    pub(super) fn resync_busy_extents(&self, busy: &mut std::collections::BTreeSet<u64>) {
        for link in self.links.values() {
            if let Some(resync) = &link.resync {
                for (offset, len) in &resync.requested {
                    if let Some((first, last)) =
                        crate::core::activity_log::extents_of(ByteRange::new(*offset, *len))
                    {
                        busy.extend(first..=last);
                    }
                }
            }
        }
    }

    /// Target: the source could not read the blocks; the resync stalls until reconnected.
    pub(super) fn resync_failed(&mut self, peer: PeerId, offset: u64, len: u64, errno: i32) {
        let name = self.peer_name(peer);
        if let Some(resync) = self.links.get_mut(&peer).and_then(|l| l.resync.as_mut()) {
            if let Some(requested) = resync.requested.remove(&offset) {
                resync.requested_bytes -= requested;
            }
            resync.stalled = Some(format!(
                "{name} could not read {len} bytes at {offset} (errno {errno})"
            ));
        }
        tracing::error!(resource = %self.config.resource, peer = %name, offset, len, errno, "the sync source failed to read; resync stalled");
    }

    /// Target: a resync write finished.
    pub(super) fn resync_write_done(
        &mut self,
        peer: PeerId,
        conn: u64,
        offset: u64,
        len: u64,
        result: Result<(), i32>,
        now: Tick,
    ) {
        self.block_resynced(peer, conn, offset, len, result, true, now);
    }

    /// Target: a request is settled, written (`moved`) or found the same (checksums).
    #[allow(clippy::too_many_arguments)]
    fn block_resynced(
        &mut self,
        peer: PeerId,
        conn: u64,
        offset: u64,
        len: u64,
        result: Result<(), i32>,
        moved: bool,
        now: Tick,
    ) {
        if self.current_conn(peer) != Some(conn) {
            return;
        }
        let name = self.peer_name(peer);
        let Some(link) = self.links.get_mut(&peer) else {
            return;
        };
        if result.is_ok() {
            if moved {
                link.resynced_bytes += len;
            } else {
                link.resync_same_bytes += len;
            }
        }
        let Some(resync) = link.resync.as_mut() else {
            return;
        };
        let Some(requested) = resync.requested.remove(&offset) else {
            return;
        };
        resync.arrived.remove(&offset);
        resync.requested_bytes -= requested;
        let ok = result.is_ok();
        match result {
            Ok(()) => {
                resync.done_blocks += len / BLOCK_SIZE;
                if moved {
                    resync.moved_bytes += len;
                }
                resync.last_progress = now;
                if let Some(pacer) = resync.pacer.as_mut() {
                    pacer.settled(len);
                }
                if let Some(bitmap) = self.device.out_of_sync_mut(peer) {
                    bitmap.clear(ByteRange::new(offset, len));
                }
            }
            Err(errno) => {
                resync.stalled = Some(format!(
                    "writing {len} bytes at {offset} failed here (errno {errno})"
                ));
                tracing::error!(resource = %self.config.resource, peer = %name, offset, len, errno, "resync write failed; resync stalled");
            }
        }
        self.effects.push_back(Effect::Send {
            peer,
            message: PeerMessage::ResyncWritten { offset, len, ok },
        });
        self.request_more(peer, now);
    }

    /// The connection is gone: locks go, the bits stay for the next connection.
    pub(super) fn abandon_resync(&mut self, peer: PeerId, now: Tick) {
        let Some(resync) = self.links.get_mut(&peer).and_then(|l| l.resync.take()) else {
            return;
        };
        for (_, (_, lock)) in resync.serving {
            let effects = self.device.unlock_resync(lock);
            self.volume_effects(effects, now);
        }
        let name = self.peer_name(peer);
        tracing::info!(resource = %self.config.resource, peer = %name, moved_bytes = resync.moved_bytes, "resync interrupted; it resumes from the bitmap on reconnect");
        self.emit(format!(
            "change peer-device name:{} peer-node-id:{peer} conn-name:{name} replication:Off resync-interrupted moved:{}",
            self.config.resource, resync.moved_bytes
        ));
    }

    /// Target: an application write of the source arrived; the resync yields for a while
    /// (unless it is slower than `c_min_rate`), so that the epoch flushes those writes wait for
    /// do not queue behind a window of resync writes.
    pub(super) fn application_write_during_resync(&mut self, peer: PeerId, now: Tick) {
        if let Some(pacer) = self
            .links
            .get_mut(&peer)
            .and_then(|l| l.resync.as_mut())
            .and_then(|r| r.pacer.as_mut())
        {
            pacer.application_write(now);
        }
    }

    /// Time passed: the rate controller's next step may allow more requests.
    pub(super) fn resync_tick(&mut self, now: Tick) {
        let peers: Vec<PeerId> = self
            .links
            .values()
            .filter(|l| {
                l.resync
                    .as_ref()
                    .is_some_and(|r| r.role == SyncRole::Target && r.running)
            })
            .map(|l| l.id)
            .collect();
        for peer in peers {
            self.request_more(peer, now);
        }
    }

    /// After any input: source requests blocked by writes may go now.
    pub(super) fn resync_after_input(&mut self) {
        let peers: Vec<PeerId> = self
            .links
            .values()
            .filter(|l| l.resync.as_ref().is_some_and(|r| !r.blocked.is_empty()))
            .map(|l| l.id)
            .collect();
        for peer in peers {
            self.serve_blocked(peer);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn facts(role: Role, disk: DiskState, bits: u64) -> SideFacts {
        SideFacts {
            role,
            disk,
            bits_for_other: bits,
        }
    }

    /// Every row is checked from both sides: the answers must mirror.
    #[test]
    fn the_direction_rules_mirror() {
        use DiskState::*;
        use Role::*;
        let rows: Vec<(SideFacts, SideFacts, Option<SyncRole>, &str)> = vec![
            (
                facts(Primary, UpToDate, 0),
                facts(Secondary, UpToDate, 0),
                None,
                "nothing to sync",
            ),
            (
                facts(Primary, UpToDate, 8192),
                facts(Secondary, UpToDate, 0),
                Some(SyncRole::Source),
                "only one side counts blocks",
            ),
            (
                facts(Secondary, UpToDate, 0),
                facts(Secondary, UpToDate, 4096),
                Some(SyncRole::Target),
                "the peer counts blocks",
            ),
            (
                facts(Secondary, UpToDate, 4096),
                facts(Primary, UpToDate, 4096),
                Some(SyncRole::Target),
                "both count: the Primary wins",
            ),
            (
                facts(Secondary, UpToDate, 4096),
                facts(Secondary, UpToDate, 4096),
                Some(SyncRole::Source),
                "both count, both Secondary: the lower id wins",
            ),
            (
                facts(Secondary, Consistent, 4096),
                facts(Secondary, UpToDate, 0),
                Some(SyncRole::Target),
                "a crashed node's hot extents come from the UpToDate peer",
            ),
            (
                facts(Secondary, UpToDate, 0),
                facts(Secondary, Consistent, 4096),
                Some(SyncRole::Source),
                "mirror of the above",
            ),
            (
                facts(Secondary, Outdated, 0),
                facts(Primary, UpToDate, 4096),
                Some(SyncRole::Target),
                "an Outdated node catches up",
            ),
            (
                facts(Secondary, Inconsistent, 4096),
                facts(Secondary, Inconsistent, 4096),
                None,
                "neither has a claim",
            ),
            (
                facts(Primary, UpToDate, 0),
                facts(Secondary, UpToDate, 4096),
                Some(SyncRole::Source),
                "a Primary is never a target, whoever counts the blocks",
            ),
            (
                facts(Secondary, Consistent, 4096),
                facts(Secondary, Consistent, 0),
                Some(SyncRole::Source),
                "both crashed: the one that counts blocks (its hot extents) sends them",
            ),
            (
                facts(Secondary, Consistent, 4096),
                facts(Secondary, Consistent, 4096),
                Some(SyncRole::Source),
                "both crashed, both count: the lower id",
            ),
            (
                facts(Secondary, Outdated, 4096),
                facts(Secondary, Consistent, 0),
                Some(SyncRole::Target),
                "an Outdated node gave up its claim",
            ),
        ];
        for (local, peer, expected, why) in rows {
            assert_eq!(resync_direction(local, 1, peer, 2), expected, "{why}");
            let mirrored = expected.map(|role| match role {
                SyncRole::Source => SyncRole::Target,
                SyncRole::Target => SyncRole::Source,
            });
            assert_eq!(
                resync_direction(peer, 2, local, 1),
                mirrored,
                "{why} (mirrored)"
            );
        }
    }
}
