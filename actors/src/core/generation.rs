//! Data generations (docs/protocol.md, "Data generations"): the identifiers that let two nodes
//! tell at connect time whether their data is the same, which one is behind, or whether both
//! wrote on their own (split brain). The connect-time comparison is one pure function,
//! [`compare_generations`].

use std::collections::BTreeMap;

use super::DiskState;

/// A data-generation identifier. Zero means "none".
pub type GenerationUuid = u64;

/// The generation of fresh metadata (`create-md`). A replicated volume starts Inconsistent
/// here: it never held data a peer agreed on, so the first connection after `primary --force`
/// copies every block to it, unless `new-current-uuid --clear-bitmap` declared two blank disks
/// identical first (docs/protocol.md, "The initial sync").
pub const JUST_CREATED_UUID: GenerationUuid = 4;

/// How many earlier generations a node remembers.
pub const HISTORY_LEN: usize = 4;

/// One node's generation identifiers.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Generations {
    pub current: GenerationUuid,
    /// Per peer node id: the generation the peer last shared with this node, set when this node
    /// started writing without it (the start of the peer's out-of-sync tracking).
    pub bitmap: BTreeMap<u8, GenerationUuid>,
    /// Earlier current identifiers, newest first.
    pub history: Vec<GenerationUuid>,
}

impl Generations {
    pub fn bitmap_for(&self, peer: u8) -> GenerationUuid {
        self.bitmap.get(&peer).copied().unwrap_or(0)
    }

    /// Starts a new generation: the old current identifier goes to the history and becomes the
    /// bitmap identifier of every peer in `absent` that has none yet.
    pub fn start_new(&mut self, new: GenerationUuid, absent: impl IntoIterator<Item = u8>) {
        let old = self.current;
        for peer in absent {
            let slot = self.bitmap.entry(peer).or_insert(0);
            if *slot == 0 {
                *slot = old;
            }
        }
        if old != 0 {
            self.history.insert(0, old);
            self.history.truncate(HISTORY_LEN);
        }
        self.current = new;
    }

    fn knows(&self, uuid: GenerationUuid) -> bool {
        uuid != 0 && self.history.contains(&uuid)
    }
}

/// What the two nodes' generations say about their data (docs/protocol.md, "The connect-time
/// decision").
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SyncDecision {
    /// Same generation: the data is the same, up to the out-of-sync blocks either side counts.
    Same,
    /// The peer lacks what this node wrote since the peer's generation; `full` when only the
    /// history relates them (no bitmap tracks the difference).
    PeerBehind { full: bool },
    /// This node lacks what the peer wrote.
    LocalBehind { full: bool },
    /// Both wrote since they were last together; `full` when only the history relates them
    /// (no bitmap tracks what either changed).
    SplitBrain { full: bool },
    /// No common generation: different data sets; never connect them.
    Unrelated,
}

/// The connect-time comparison. `local_id` and `peer_id` are the two node ids. A side whose
/// disk is Outdated or Inconsistent has given up its claim: it is behind whatever the
/// identifiers say, unless both gave it up.
pub fn compare_generations(
    local: &Generations,
    local_disk: DiskState,
    local_id: u8,
    peer: &Generations,
    peer_disk: DiskState,
    peer_id: u8,
) -> SyncDecision {
    let weak = |disk: DiskState| matches!(disk, DiskState::Outdated | DiskState::Inconsistent);
    // An Inconsistent disk still at the fresh generation never held data anyone agreed on:
    // it takes every block from a peer that has moved on (the initial sync).
    let blank = |gens: &Generations, disk: DiskState| {
        gens.current == JUST_CREATED_UUID && disk == DiskState::Inconsistent
    };
    match (blank(local, local_disk), blank(peer, peer_disk)) {
        (true, false) if peer.current != JUST_CREATED_UUID => {
            return SyncDecision::LocalBehind { full: true }
        }
        (false, true) if local.current != JUST_CREATED_UUID => {
            return SyncDecision::PeerBehind { full: true }
        }
        _ => {}
    }
    let decision = compare_uuids(local, local_id, peer, peer_id);
    match (decision, weak(local_disk), weak(peer_disk)) {
        (SyncDecision::Same, _, _) => SyncDecision::Same,
        (_, true, false) => SyncDecision::LocalBehind {
            full: !matches!(decision, SyncDecision::LocalBehind { full: false }),
        },
        (_, false, true) => SyncDecision::PeerBehind {
            full: !matches!(decision, SyncDecision::PeerBehind { full: false }),
        },
        _ => decision,
    }
}

fn compare_uuids(
    local: &Generations,
    local_id: u8,
    peer: &Generations,
    peer_id: u8,
) -> SyncDecision {
    if local.current == peer.current {
        return SyncDecision::Same;
    }
    let local_bitmap = local.bitmap_for(peer_id);
    let peer_bitmap = peer.bitmap_for(local_id);
    // A bitmap started in the fresh generation tracks changes to data the two never agreed
    // on (blank replicas before their initial sync): it cannot say what differs.
    let untracked = |bitmap: GenerationUuid| bitmap == JUST_CREATED_UUID;
    if local_bitmap != 0 && local_bitmap == peer_bitmap {
        // Both started tracking the other at the same generation, and both moved on from it.
        return SyncDecision::SplitBrain {
            full: untracked(local_bitmap),
        };
    }
    if local_bitmap != 0 && local_bitmap == peer.current {
        return SyncDecision::PeerBehind {
            full: untracked(local_bitmap),
        };
    }
    if peer_bitmap != 0 && peer_bitmap == local.current {
        return SyncDecision::LocalBehind {
            full: untracked(peer_bitmap),
        };
    }
    let local_knows_peer = local.knows(peer.current);
    let peer_knows_local = peer.knows(local.current);
    match (local_knows_peer, peer_knows_local) {
        (true, false) => SyncDecision::PeerBehind { full: true },
        (false, true) => SyncDecision::LocalBehind { full: true },
        _ => {
            // Every replica starts in the fresh generation: sharing only that relates nothing.
            let common = local.history.iter().any(|uuid| {
                *uuid != 0 && *uuid != JUST_CREATED_UUID && peer.history.contains(uuid)
            });
            // A bitmap identifier the other side knows relates them too (either way round, so
            // both sides reach the same verdict); the fresh generation relates nothing.
            let related = |bitmap: GenerationUuid, other: &Generations| {
                bitmap != JUST_CREATED_UUID && other.knows(bitmap)
            };
            if common || related(local_bitmap, peer) || related(peer_bitmap, local) {
                SyncDecision::SplitBrain { full: true }
            } else {
                SyncDecision::Unrelated
            }
        }
    }
}

/// A small deterministic generator for new generation identifiers, seeded by the shell (the
/// core reads no OS randomness, so a simulation replays exactly).
#[derive(Debug, Clone)]
pub struct UuidSource(u64);

impl UuidSource {
    pub fn new(seed: u64) -> Self {
        UuidSource(seed ^ 0x6A09_E667_F3BC_C908)
    }

    /// A fresh identifier: never zero, never [`JUST_CREATED_UUID`], low bit clear.
    pub fn next_uuid(&mut self) -> GenerationUuid {
        loop {
            // splitmix64
            self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
            let mut z = self.0;
            z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
            let uuid = (z ^ (z >> 31)) & !1;
            if uuid != 0 && uuid != JUST_CREATED_UUID {
                return uuid;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use DiskState::{Consistent, Inconsistent, Outdated, UpToDate};

    fn generations(current: u64, bitmap: &[(u8, u64)], history: &[u64]) -> Generations {
        Generations {
            current,
            bitmap: bitmap.iter().copied().collect(),
            history: history.to_vec(),
        }
    }

    #[test]
    fn connect_time_decision_table() {
        // (name, local, local disk, peer, peer disk, expected); local is node 0, peer node 1.
        let cases = [
            (
                "same generation",
                generations(10, &[], &[]),
                UpToDate,
                generations(10, &[], &[]),
                UpToDate,
                SyncDecision::Same,
            ),
            (
                "this node wrote without the peer",
                generations(20, &[(1, 10)], &[10]),
                UpToDate,
                generations(10, &[], &[]),
                UpToDate,
                SyncDecision::PeerBehind { full: false },
            ),
            (
                "the peer wrote without this node",
                generations(10, &[], &[]),
                UpToDate,
                generations(20, &[(0, 10)], &[10]),
                UpToDate,
                SyncDecision::LocalBehind { full: false },
            ),
            (
                "both wrote since the same generation",
                generations(20, &[(1, 10)], &[10]),
                UpToDate,
                generations(30, &[(0, 10)], &[10]),
                UpToDate,
                SyncDecision::SplitBrain { full: false },
            ),
            (
                "peer generation only in this node's history",
                generations(30, &[], &[20, 10]),
                UpToDate,
                generations(10, &[], &[]),
                UpToDate,
                SyncDecision::PeerBehind { full: true },
            ),
            (
                "this node's generation only in the peer's history",
                generations(10, &[], &[]),
                Consistent,
                generations(30, &[], &[20, 10]),
                UpToDate,
                SyncDecision::LocalBehind { full: true },
            ),
            (
                "common ancestor, both moved on",
                generations(20, &[], &[10]),
                UpToDate,
                generations(30, &[], &[10]),
                UpToDate,
                SyncDecision::SplitBrain { full: true },
            ),
            (
                "nothing in common",
                generations(20, &[], &[5]),
                UpToDate,
                generations(30, &[], &[7]),
                UpToDate,
                SyncDecision::Unrelated,
            ),
            (
                "an Outdated peer is behind whatever the identifiers say",
                generations(20, &[], &[10]),
                UpToDate,
                generations(30, &[], &[10]),
                Outdated,
                SyncDecision::PeerBehind { full: true },
            ),
            (
                "an Inconsistent local disk is behind",
                generations(20, &[(1, 10)], &[10]),
                Inconsistent,
                generations(30, &[(0, 10)], &[10]),
                UpToDate,
                SyncDecision::LocalBehind { full: true },
            ),
            (
                "an Outdated local disk behind by bitmap keeps the bitmap",
                generations(10, &[], &[]),
                Outdated,
                generations(20, &[(0, 10)], &[10]),
                UpToDate,
                SyncDecision::LocalBehind { full: false },
            ),
            (
                "a blank (fresh, Inconsistent) peer takes everything, whatever bitmaps say",
                generations(20, &[(1, JUST_CREATED_UUID)], &[JUST_CREATED_UUID]),
                UpToDate,
                generations(JUST_CREATED_UUID, &[], &[]),
                Inconsistent,
                SyncDecision::PeerBehind { full: true },
            ),
            (
                "a blank local disk takes everything from an Outdated peer that moved on",
                generations(JUST_CREATED_UUID, &[], &[]),
                Inconsistent,
                generations(20, &[], &[JUST_CREATED_UUID]),
                Outdated,
                SyncDecision::LocalBehind { full: true },
            ),
            (
                "two blank disks: the same generation, nothing to copy",
                generations(JUST_CREATED_UUID, &[], &[]),
                Inconsistent,
                generations(JUST_CREATED_UUID, &[], &[]),
                Inconsistent,
                SyncDecision::Same,
            ),
            (
                "behind the fresh generation: no bitmap tracks what differs",
                generations(JUST_CREATED_UUID, &[], &[]),
                UpToDate,
                generations(20, &[(0, JUST_CREATED_UUID)], &[JUST_CREATED_UUID]),
                UpToDate,
                SyncDecision::LocalBehind { full: true },
            ),
            (
                "two forced promotions of blank replicas: a split brain with nothing tracked",
                generations(20, &[(1, JUST_CREATED_UUID)], &[JUST_CREATED_UUID]),
                UpToDate,
                generations(30, &[(0, JUST_CREATED_UUID)], &[JUST_CREATED_UUID]),
                UpToDate,
                SyncDecision::SplitBrain { full: true },
            ),
            (
                "two clusters that each skipped their initial sync share only the fresh generation",
                generations(20, &[], &[JUST_CREATED_UUID]),
                UpToDate,
                generations(30, &[], &[JUST_CREATED_UUID]),
                UpToDate,
                SyncDecision::Unrelated,
            ),
            (
                "a replica recreated and forced alone meets its old peer: unrelated",
                generations(20, &[], &[JUST_CREATED_UUID]),
                UpToDate,
                generations(30, &[(0, JUST_CREATED_UUID)], &[JUST_CREATED_UUID]),
                UpToDate,
                SyncDecision::Unrelated,
            ),
            (
                "both Outdated: the identifiers decide",
                generations(20, &[(1, 10)], &[10]),
                Outdated,
                generations(30, &[(0, 10)], &[10]),
                Outdated,
                SyncDecision::SplitBrain { full: false },
            ),
        ];
        for (name, local, local_disk, peer, peer_disk, expected) in cases {
            let decision = compare_generations(&local, local_disk, 0, &peer, peer_disk, 1);
            assert_eq!(decision, expected, "{name}");
            // The peer, comparing the other way round, reaches the mirrored verdict.
            let mirrored = compare_generations(&peer, peer_disk, 1, &local, local_disk, 0);
            let expected_mirror = match expected {
                SyncDecision::PeerBehind { full } => SyncDecision::LocalBehind { full },
                SyncDecision::LocalBehind { full } => SyncDecision::PeerBehind { full },
                other => other,
            };
            assert_eq!(mirrored, expected_mirror, "{name} (mirrored)");
        }
    }

    #[test]
    fn a_new_generation_keeps_the_old_one_for_absent_peers_once() {
        let mut gens = generations(10, &[], &[]);
        gens.start_new(20, [1]);
        assert_eq!(gens, generations(20, &[(1, 10)], &[10]));
        // Peer 1 still lacks everything since 10: its bitmap identifier stays.
        gens.start_new(30, [1, 2]);
        assert_eq!(gens, generations(30, &[(1, 10), (2, 20)], &[20, 10]));
    }

    #[test]
    fn uuid_source_is_deterministic_and_never_special() {
        let mut a = UuidSource::new(7);
        let mut b = UuidSource::new(7);
        for _ in 0..1000 {
            let uuid = a.next_uuid();
            assert_eq!(uuid, b.next_uuid());
            assert!(uuid != 0 && uuid != JUST_CREATED_UUID && uuid & 1 == 0);
        }
    }
}
