//! Split-brain recovery (docs/protocol.md, "Split brain"): when both nodes wrote in separate
//! generations, who keeps its data is decided by one pure function of facts both nodes have
//! alike (each side's role, `--discard-my-data` flag and change count as its Hello said, the
//! node names and ids, and the configured policies), so that both reach the same answer.

use super::Role;

/// DRBD's `after-sb-0pri`: neither node is Primary.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum AfterSb0Pri {
    /// Stay StandAlone; the administrator decides.
    #[default]
    Disconnect,
    /// The node that wrote nothing since the split is the victim.
    DiscardZeroChanges,
    /// The node with fewer changed blocks is the victim (on a tie, the higher node id).
    DiscardLeastChanges,
    /// The named node is the victim.
    DiscardNode(String),
    /// The node that became Primary during the split is the victim: the one that was Primary
    /// before it keeps its data.
    DiscardYoungerPrimary,
    /// The node that was Primary before the split is the victim.
    DiscardOlderPrimary,
}

/// DRBD's `after-sb-1pri`: one node is Primary.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum AfterSb1Pri {
    #[default]
    Disconnect,
    /// Apply the `after-sb-0pri` policy; accept its answer only if it picks the Secondary.
    Consensus,
    /// The Secondary is the victim.
    DiscardSecondary,
}

/// DRBD's `after-sb-2pri`: both are Primary. Only `disconnect` is safe.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum AfterSb2Pri {
    #[default]
    Disconnect,
}

#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct SplitBrainPolicy {
    pub after_sb_0pri: AfterSb0Pri,
    pub after_sb_1pri: AfterSb1Pri,
    pub after_sb_2pri: AfterSb2Pri,
}

/// One side's facts, as its Hello told them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SplitBrainSide<'a> {
    pub id: u8,
    pub name: &'a str,
    pub role: Role,
    /// `connect --discard-my-data`: this side asked to be the victim.
    pub discard_my_data: bool,
    /// This side was Primary already when it began writing without the other (it did not
    /// become Primary during the split).
    pub primary_before_split: bool,
    /// Blocks this side changed since the split (its out-of-sync count for the other).
    pub changes: u64,
    /// Its data is consistent (UpToDate or Consistent): only such a side can survive.
    pub consistent: bool,
}

/// Who gives up its data, or why nobody does.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SplitBrainOutcome {
    /// The local node discards its changes: it becomes the sync target.
    LocalIsVictim(String),
    /// The peer discards its changes: this node becomes the sync source.
    PeerIsVictim(String),
    /// Nobody: both stay StandAlone, for this reason.
    Disconnect(String),
}

/// The one rule both nodes apply. `local` and `peer` swap on the other node, and so does the
/// answer.
pub fn resolve_split_brain(
    local: &SplitBrainSide<'_>,
    peer: &SplitBrainSide<'_>,
    policy: &SplitBrainPolicy,
) -> SplitBrainOutcome {
    use SplitBrainOutcome::*;
    let victim = |victim_is_local: bool, why: String| -> SplitBrainOutcome {
        let (node, survivor) = if victim_is_local {
            (local, peer)
        } else {
            (peer, local)
        };
        if !survivor.consistent {
            return Disconnect(format!(
                "{why}, but {} has no consistent data to resync from",
                survivor.name
            ));
        }
        if node.role == Role::Primary {
            return Disconnect(format!(
                "{why}, but {} is Primary; demote it, then `qrbd connect --discard-my-data` there",
                node.name
            ));
        }
        if victim_is_local {
            LocalIsVictim(why)
        } else {
            PeerIsVictim(why)
        }
    };
    match (local.discard_my_data, peer.discard_my_data) {
        (true, true) => {
            return Disconnect(
                "both nodes were told to discard their data (--discard-my-data)".into(),
            )
        }
        (true, false) => {
            return victim(
                true,
                format!("{} discards its data (--discard-my-data)", local.name),
            )
        }
        (false, true) => {
            return victim(
                false,
                format!("{} discards its data (--discard-my-data)", peer.name),
            )
        }
        (false, false) => {}
    }
    let primaries = [local.role, peer.role]
        .iter()
        .filter(|r| **r == Role::Primary)
        .count();
    match primaries {
        0 => zero_primaries(local, peer, &policy.after_sb_0pri, &victim),
        1 => {
            match policy.after_sb_1pri {
                AfterSb1Pri::Disconnect => Disconnect("after_sb_1pri = disconnect".into()),
                AfterSb1Pri::DiscardSecondary => {
                    let local_is_secondary = local.role == Role::Secondary;
                    victim(
                        local_is_secondary,
                        "after_sb_1pri = discard-secondary".into(),
                    )
                }
                AfterSb1Pri::Consensus => {
                    let secondary_is_local = local.role == Role::Secondary;
                    match zero_primaries(local, peer, &policy.after_sb_0pri, &|is_local, why| {
                    if is_local { LocalIsVictim(why) } else { PeerIsVictim(why) }
                }) {
                    LocalIsVictim(why) if secondary_is_local => LocalIsVictim(format!("after_sb_1pri = consensus: {why}")),
                    PeerIsVictim(why) if !secondary_is_local => PeerIsVictim(format!("after_sb_1pri = consensus: {why}")),
                    Disconnect(why) => Disconnect(format!("after_sb_1pri = consensus: {why}")),
                    _ => Disconnect("after_sb_1pri = consensus: after_sb_0pri would discard the Primary's data".into()),
                }
                }
            }
        }
        _ => match policy.after_sb_2pri {
            AfterSb2Pri::Disconnect => {
                Disconnect("both nodes are Primary (after_sb_2pri = disconnect)".into())
            }
        },
    }
}

fn zero_primaries(
    local: &SplitBrainSide<'_>,
    peer: &SplitBrainSide<'_>,
    policy: &AfterSb0Pri,
    victim: &dyn Fn(bool, String) -> SplitBrainOutcome,
) -> SplitBrainOutcome {
    match policy {
        AfterSb0Pri::Disconnect => SplitBrainOutcome::Disconnect("after_sb_0pri = disconnect".into()),
        AfterSb0Pri::DiscardZeroChanges => match (local.changes == 0, peer.changes == 0) {
            (true, false) => victim(true, format!("{} changed nothing since the split (discard-zero-changes)", local.name)),
            (false, true) => victim(false, format!("{} changed nothing since the split (discard-zero-changes)", peer.name)),
            (true, true) => {
                // Nothing to lose on either side: the higher id follows the lower.
                let local_loses = local.id > peer.id;
                victim(local_loses, "neither node changed anything since the split (discard-zero-changes)".into())
            }
            (false, false) => SplitBrainOutcome::Disconnect(format!(
                "both nodes changed data since the split ({} blocks on {}, {} on {}); discard-zero-changes does not apply",
                local.changes, local.name, peer.changes, peer.name
            )),
        },
        AfterSb0Pri::DiscardLeastChanges => {
            let local_loses = (local.changes, std::cmp::Reverse(local.id)) < (peer.changes, std::cmp::Reverse(peer.id));
            let (loser, winner) = if local_loses { (local, peer) } else { (peer, local) };
            victim(
                local_loses,
                format!(
                    "{} changed fewer blocks ({} against {} on {}; discard-least-changes)",
                    loser.name, loser.changes, winner.changes, winner.name
                ),
            )
        }
        AfterSb0Pri::DiscardYoungerPrimary | AfterSb0Pri::DiscardOlderPrimary => {
            let discard_older = *policy == AfterSb0Pri::DiscardOlderPrimary;
            let key = if discard_older {
                "discard-older-primary"
            } else {
                "discard-younger-primary"
            };
            match (local.primary_before_split, peer.primary_before_split) {
                (true, false) | (false, true) => {
                    let (older, younger) = if local.primary_before_split {
                        (local, peer)
                    } else {
                        (peer, local)
                    };
                    let loser = if discard_older { older } else { younger };
                    victim(
                        loser.id == local.id,
                        format!(
                            "{} was Primary before the split and {} became Primary during it ({key})",
                            older.name, younger.name
                        ),
                    )
                }
                (both, _) => {
                    // Like DRBD: no answer from the roles, so the change counts decide.
                    let which = if both { "both" } else { "neither" };
                    match zero_primaries(local, peer, &AfterSb0Pri::DiscardLeastChanges, victim) {
                        SplitBrainOutcome::LocalIsVictim(why) => SplitBrainOutcome::LocalIsVictim(format!(
                            "{which} node was Primary before the split ({key}), so: {why}"
                        )),
                        SplitBrainOutcome::PeerIsVictim(why) => SplitBrainOutcome::PeerIsVictim(format!(
                            "{which} node was Primary before the split ({key}), so: {why}"
                        )),
                        other => other,
                    }
                }
            }
        }
        AfterSb0Pri::DiscardNode(name) => {
            if name == local.name {
                victim(true, format!("after_sb_0pri = discard-node-{name}"))
            } else if name == peer.name {
                victim(false, format!("after_sb_0pri = discard-node-{name}"))
            } else {
                SplitBrainOutcome::Disconnect(format!(
                    "after_sb_0pri = discard-node-{name} names neither {} nor {}",
                    local.name, peer.name
                ))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use Role::{Primary, Secondary};

    fn side(
        id: u8,
        name: &'static str,
        role: Role,
        discard: bool,
        changes: u64,
    ) -> SplitBrainSide<'static> {
        SplitBrainSide {
            id,
            name,
            role,
            discard_my_data: discard,
            primary_before_split: false,
            changes,
            consistent: true,
        }
    }

    /// A side that was Primary before the split (it kept writing when the link went).
    fn older(side: SplitBrainSide<'static>) -> SplitBrainSide<'static> {
        SplitBrainSide {
            primary_before_split: true,
            ..side
        }
    }

    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    enum Want {
        A,
        B,
        Nobody,
    }

    fn outcome_for_a(a: &SplitBrainSide, b: &SplitBrainSide, policy: &SplitBrainPolicy) -> Want {
        let from_a = resolve_split_brain(a, b, policy);
        let from_b = resolve_split_brain(b, a, policy);
        let seen_by_a = match from_a {
            SplitBrainOutcome::LocalIsVictim(_) => Want::A,
            SplitBrainOutcome::PeerIsVictim(_) => Want::B,
            SplitBrainOutcome::Disconnect(_) => Want::Nobody,
        };
        let seen_by_b = match from_b {
            SplitBrainOutcome::LocalIsVictim(_) => Want::B,
            SplitBrainOutcome::PeerIsVictim(_) => Want::A,
            SplitBrainOutcome::Disconnect(_) => Want::Nobody,
        };
        assert_eq!(
            seen_by_a, seen_by_b,
            "both sides must agree: {a:?} {b:?} {policy:?}"
        );
        seen_by_a
    }

    /// Every rule, checked from both sides (the answers must mirror).
    #[test]
    fn every_rule_from_both_sides() {
        let p0 = |p: AfterSb0Pri| SplitBrainPolicy {
            after_sb_0pri: p,
            ..SplitBrainPolicy::default()
        };
        let p1 = |p0: AfterSb0Pri, p1: AfterSb1Pri| SplitBrainPolicy {
            after_sb_0pri: p0,
            after_sb_1pri: p1,
            ..SplitBrainPolicy::default()
        };
        let rows: Vec<(SplitBrainSide, SplitBrainSide, SplitBrainPolicy, Want, &str)> = vec![
            (
                side(1, "a", Secondary, false, 5),
                side(2, "b", Secondary, false, 3),
                SplitBrainPolicy::default(),
                Want::Nobody,
                "default: disconnect",
            ),
            (
                side(1, "a", Secondary, true, 5),
                side(2, "b", Secondary, false, 3),
                SplitBrainPolicy::default(),
                Want::A,
                "--discard-my-data wins over any policy",
            ),
            (
                older(side(1, "a", Secondary, false, 5)),
                side(2, "b", Secondary, false, 3),
                p0(AfterSb0Pri::DiscardYoungerPrimary),
                Want::B,
                "discard-younger-primary: the node promoted during the split loses",
            ),
            (
                side(1, "a", Secondary, false, 5),
                older(side(2, "b", Secondary, false, 9)),
                p0(AfterSb0Pri::DiscardOlderPrimary),
                Want::B,
                "discard-older-primary: the node Primary before the split loses",
            ),
            (
                side(1, "a", Secondary, false, 5),
                side(2, "b", Secondary, false, 3),
                p0(AfterSb0Pri::DiscardYoungerPrimary),
                Want::B,
                "discard-younger-primary, both promoted during the split: least changes",
            ),
            (
                older(side(1, "a", Secondary, false, 2)),
                older(side(2, "b", Secondary, false, 3)),
                p0(AfterSb0Pri::DiscardOlderPrimary),
                Want::A,
                "discard-older-primary, no answer from the roles: least changes",
            ),
            (
                older(side(1, "a", Primary, false, 5)),
                side(2, "b", Secondary, false, 3),
                p1(AfterSb0Pri::DiscardOlderPrimary, AfterSb1Pri::Consensus),
                Want::Nobody,
                "consensus refuses when after_sb_0pri would discard the Primary",
            ),
            (
                side(1, "a", Secondary, true, 5),
                side(2, "b", Secondary, true, 3),
                SplitBrainPolicy::default(),
                Want::Nobody,
                "both discard: nobody",
            ),
            (
                side(1, "a", Primary, true, 5),
                side(2, "b", Secondary, false, 3),
                SplitBrainPolicy::default(),
                Want::Nobody,
                "a Primary victim: nobody",
            ),
            (
                side(1, "a", Secondary, false, 0),
                side(2, "b", Secondary, false, 3),
                p0(AfterSb0Pri::DiscardZeroChanges),
                Want::A,
                "zero changes loses",
            ),
            (
                side(1, "a", Secondary, false, 0),
                side(2, "b", Secondary, false, 0),
                p0(AfterSb0Pri::DiscardZeroChanges),
                Want::B,
                "both zero: the higher id follows",
            ),
            (
                side(1, "a", Secondary, false, 2),
                side(2, "b", Secondary, false, 3),
                p0(AfterSb0Pri::DiscardZeroChanges),
                Want::Nobody,
                "both changed: zero-changes does not apply",
            ),
            (
                side(1, "a", Secondary, false, 2),
                side(2, "b", Secondary, false, 3),
                p0(AfterSb0Pri::DiscardLeastChanges),
                Want::A,
                "fewer changes loses",
            ),
            (
                side(1, "a", Secondary, false, 3),
                side(2, "b", Secondary, false, 3),
                p0(AfterSb0Pri::DiscardLeastChanges),
                Want::B,
                "a tie: the higher id loses",
            ),
            (
                side(1, "a", Secondary, false, 9),
                side(2, "b", Secondary, false, 3),
                p0(AfterSb0Pri::DiscardNode("a".into())),
                Want::A,
                "the named node loses",
            ),
            (
                side(1, "a", Secondary, false, 9),
                side(2, "b", Secondary, false, 3),
                p0(AfterSb0Pri::DiscardNode("c".into())),
                Want::Nobody,
                "a name that is neither",
            ),
            (
                side(1, "a", Primary, false, 9),
                side(2, "b", Secondary, false, 3),
                p1(AfterSb0Pri::Disconnect, AfterSb1Pri::DiscardSecondary),
                Want::B,
                "discard-secondary",
            ),
            (
                side(1, "a", Primary, false, 9),
                side(2, "b", Secondary, false, 3),
                p1(AfterSb0Pri::DiscardLeastChanges, AfterSb1Pri::Consensus),
                Want::B,
                "consensus agrees: the Secondary changed less",
            ),
            (
                side(1, "a", Primary, false, 1),
                side(2, "b", Secondary, false, 3),
                p1(AfterSb0Pri::DiscardLeastChanges, AfterSb1Pri::Consensus),
                Want::Nobody,
                "consensus refuses to discard the Primary",
            ),
            (
                side(1, "a", Primary, false, 1),
                side(2, "b", Secondary, false, 3),
                p1(AfterSb0Pri::DiscardLeastChanges, AfterSb1Pri::Disconnect),
                Want::Nobody,
                "after_sb_1pri = disconnect",
            ),
            (
                side(1, "a", Primary, false, 1),
                side(2, "b", Primary, false, 3),
                p1(
                    AfterSb0Pri::DiscardLeastChanges,
                    AfterSb1Pri::DiscardSecondary,
                ),
                Want::Nobody,
                "two primaries: disconnect",
            ),
        ];
        for (a, b, policy, want, why) in rows {
            assert_eq!(outcome_for_a(&a, &b, &policy), want, "{why}");
        }
        let inconsistent = SplitBrainSide {
            consistent: false,
            ..side(2, "b", Secondary, false, 3)
        };
        assert_eq!(
            outcome_for_a(
                &side(1, "a", Secondary, true, 5),
                &inconsistent,
                &SplitBrainPolicy::default()
            ),
            Want::Nobody,
            "no resync from a survivor without consistent data"
        );
    }
}
