//! Storing the out-of-sync bitmaps and the activity log (docs/protocol.md, "The activity log
//! and the bitmap"). One transaction is in flight at a time; the activity log's transactions
//! come first, since writes wait for them. Pieces of cold extents that changed (bits a resync
//! cleared, a bitmap exchange added) are stored lazily, and all of them at a clean shutdown.

use std::collections::BTreeSet;

use super::{DrainStep, Effect, PeerWrite, ResourceCore};
use crate::core::activity_log::extents_of;
use crate::core::device::{ByteRange, ReceivedDecision};
use crate::core::messages::PeerMessage;
use crate::core::replication::PeerId;
use crate::core::Tick;
use crate::meta::{BitmapChunk, BitmapUpdate};

/// How often changed pieces of cold extents are stored.
const LAZY_INTERVAL: Tick = 1_000_000_000;
/// Pieces per lazy transaction.
const LAZY_CHUNKS: usize = 1024;
/// errno reported to writes whose activity-log transaction failed.
const EIO: i32 = 5;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Purpose {
    /// Makes extents hot; writes wait for it.
    ActivityLog,
    /// Changed pieces of cold extents.
    Lazy,
    /// Every changed piece: a clean shutdown waits for it.
    All,
}

#[derive(Debug)]
struct InFlight {
    version: u64,
    purpose: Purpose,
    pieces: Vec<(PeerId, u64)>,
}

#[derive(Debug, Default)]
pub(super) struct BitmapWriter {
    version: u64,
    in_flight: Option<InFlight>,
    last_lazy: Tick,
    write_all: bool,
    /// A blank sync target waits for its full bitmap to be stored (docs/protocol.md, "The
    /// initial sync").
    pub(super) initial_sync_for: Option<PeerId>,
    /// An activity-log transaction that lets extents go waits for this local flush (its
    /// token): what was written into them must be durable before nothing marks them.
    flush_before: Option<(u64, BitmapUpdate)>,
}

impl ResourceCore {
    /// Hands out the next transaction of the bitmaps, if one is due and none is in flight.
    pub(super) fn pump_bitmaps(&mut self, now: Tick) {
        if self.bitmap_writer.in_flight.is_some() {
            return;
        }
        let mut evicts = false;
        let (purpose, activity_log, pieces) = if self.bitmap_writer.write_all {
            self.bitmap_writer.write_all = false;
            let hot: Vec<u64> = self.device.activity_log().hot_extents().collect();
            (
                Purpose::All,
                Some(hot),
                self.changed_pieces(usize::MAX, false),
            )
        } else if self.device.activity_log().needs_transaction() {
            let busy = self.busy_extents();
            let Some(tx) = self.device.activity_log_mut().begin(&busy) else {
                return;
            };
            evicts = !tx.evicted.is_empty();
            let mut pieces = Vec::new();
            let peers: Vec<PeerId> = self.device.peer_ids().collect();
            for extent in &tx.evicted {
                for peer in &peers {
                    pieces.push((*peer, *extent));
                }
            }
            (Purpose::ActivityLog, Some(tx.hot), pieces)
        } else if now.saturating_sub(self.bitmap_writer.last_lazy) >= LAZY_INTERVAL
            && self.device.activity_log().over_capacity()
        {
            // A large request made more extents hot than the log may keep: the idle ones
            // leave (with their bitmap pieces), so a crash does not resync all of them.
            self.bitmap_writer.last_lazy = now;
            let busy = self.busy_extents();
            let Some(tx) = self.device.activity_log_mut().begin(&busy) else {
                return;
            };
            evicts = !tx.evicted.is_empty();
            let peers: Vec<PeerId> = self.device.peer_ids().collect();
            let pieces = tx
                .evicted
                .iter()
                .flat_map(|extent| peers.iter().map(move |peer| (*peer, *extent)))
                .collect();
            (Purpose::ActivityLog, Some(tx.hot), pieces)
        } else if now.saturating_sub(self.bitmap_writer.last_lazy) >= LAZY_INTERVAL {
            self.bitmap_writer.last_lazy = now;
            let pieces = self.changed_pieces(LAZY_CHUNKS, true);
            if pieces.is_empty() {
                return;
            }
            (Purpose::Lazy, None, pieces)
        } else {
            return;
        };
        let mut chunks: Vec<BitmapChunk> = Vec::with_capacity(pieces.len());
        for (peer, extent) in &pieces {
            if let Some(bitmap) = self.device.out_of_sync_mut(*peer) {
                bitmap.take_changed(*extent);
                chunks.push(bitmap.chunk(*peer, *extent));
            }
        }
        self.bitmap_writer.version += 1;
        let version = self.bitmap_writer.version;
        self.bitmap_writer.in_flight = Some(InFlight {
            version,
            purpose,
            pieces,
        });
        let update = BitmapUpdate {
            activity_log,
            chunks,
        };
        if evicts {
            // Writes into the extents that leave may sit in the disk's volatile cache: after
            // a crash nothing would mark them out of sync, so they are made durable first.
            let token = self.next_token;
            self.next_token += 1;
            self.bitmap_writer.flush_before = Some((token, update));
            self.effects.push_back(Effect::FlushLocal { token });
            return;
        }
        self.effects
            .push_back(Effect::PersistBitmaps { version, update });
    }

    /// The local flush an evicting activity-log transaction waited for; false when `token` is
    /// not that flush.
    pub(super) fn flushed_before_eviction(
        &mut self,
        token: u64,
        result: Result<(), crate::core::device::IoFault>,
        now: Tick,
    ) -> bool {
        let Some((_, update)) = self
            .bitmap_writer
            .flush_before
            .take_if(|(t, _)| *t == token)
        else {
            return false;
        };
        let Some(version) = self.bitmap_writer.in_flight.as_ref().map(|f| f.version) else {
            return true;
        };
        match result {
            Ok(()) => self
                .effects
                .push_back(Effect::PersistBitmaps { version, update }),
            Err(fault) => self.bitmaps_persisted(
                version,
                Err(format!(
                    "flushing the data before the activity log let extents go failed: {fault}"
                )),
                now,
            ),
        }
        true
    }

    /// Changed pieces, at most `limit`; with `cold_only`, only of extents that are not hot
    /// (a hot extent counts as wholly out of sync after a crash, so its piece may wait).
    fn changed_pieces(&self, limit: usize, cold_only: bool) -> Vec<(PeerId, u64)> {
        let log = self.device.activity_log();
        let hot: std::collections::BTreeSet<u64> = log.hot_extents().collect();
        let mut pieces = Vec::new();
        for peer in self.device.peer_ids() {
            let Some(sender) = self.device.peer(peer) else {
                continue;
            };
            for extent in sender.out_of_sync.changed_extents() {
                if pieces.len() >= limit {
                    return pieces;
                }
                if !cold_only || !hot.contains(extent) {
                    pieces.push((peer, *extent));
                }
            }
        }
        pieces
    }

    pub(super) fn bitmaps_persisted(
        &mut self,
        version: u64,
        result: Result<(), String>,
        now: Tick,
    ) {
        let Some(in_flight) = self
            .bitmap_writer
            .in_flight
            .take_if(|f| f.version == version)
        else {
            return;
        };
        if let Err(error) = &result {
            tracing::error!(resource = %self.config.resource, %error, "storing the bitmaps failed");
            self.emit(format!(
                "change resource name:{} metadata-error:{error:?}",
                self.config.resource
            ));
            // What was not stored is still changed.
            for (peer, extent) in &in_flight.pieces {
                if let Some(bitmap) = self.device.out_of_sync_mut(*peer) {
                    bitmap.note_changed(*extent);
                }
            }
        }
        match in_flight.purpose {
            Purpose::ActivityLog => {
                let committed = result.is_ok();
                let effects = match result {
                    Ok(()) => self.device.activity_log_committed(),
                    Err(_) => self.device.activity_log_failed(EIO, now),
                };
                self.volume_effects(effects, now);
                self.release_resync_writes(committed, now);
                // Whatever the transaction made hot, the first waiting write asks again.
                if let Some(front) = self.peer_writes_waiting.front_mut() {
                    front.wanted = false;
                }
                self.release_peer_writes(!committed, now);
            }
            Purpose::Lazy => {}
            Purpose::All => self.all_bitmaps_stored(result),
        }
    }

    /// A clean shutdown asks for every changed piece to be stored.
    pub(super) fn store_all_bitmaps(&mut self) {
        self.bitmap_writer.write_all = true;
    }

    fn all_bitmaps_stored(&mut self, result: Result<(), String>) {
        self.initial_sync_bitmap_stored(result.is_ok());
        if let super::Change::ShuttingDown { command, step } = &self.change {
            if *step == DrainStep::StoringBitmaps {
                let command = *command;
                match result {
                    Ok(()) => self.persist_after_drain(),
                    Err(error) => {
                        self.abandon_drain();
                        self.done(command, Err(super::CommandError::Meta(error)));
                    }
                }
            }
        }
    }
}

/// A received write on its way to the store.
#[derive(Debug, Clone, Copy)]
pub(super) struct QueuedPeerWrite {
    peer: PeerId,
    conn: u64,
    write: PeerWrite,
    /// It is in the device's conflict domain.
    admitted: bool,
    /// Its extents were asked of the activity log.
    wanted: bool,
}

impl QueuedPeerWrite {
    /// A write of `peer` that has not entered the conflict domain yet (it waits for an
    /// overlapping local write).
    pub(super) fn waits_for_conflict(&self, peer: PeerId) -> bool {
        self.peer == peer && !self.admitted
    }
}

impl ResourceCore {
    /// A Secondary writes what its Primary sends through its own activity log, as the
    /// Primary does: after a crash of this node, the hot extents are out of sync for every
    /// peer, so a write its volatile cache lost is copied again, whoever is Primary by then.
    /// Received writes go to the store in arrival order; one that waits for its extents holds
    /// back those behind it.
    pub(super) fn apply_peer_write(&mut self, peer: PeerId, conn: u64, write: PeerWrite) {
        let range = ByteRange::new(write.offset, write.len);
        self.at_store.insert((peer, conn, write.seq), range);
        self.peer_writes_waiting.push_back(QueuedPeerWrite {
            peer,
            conn,
            write,
            admitted: false,
            wanted: false,
        });
        self.release_peer_writes(false, self.now);
    }

    /// Moves received writes on, in arrival order, as far as they can go: each enters the
    /// conflict domain (with two primaries it may wait for, or be answered instead of written
    /// because of, a concurrent local write), then waits for its extents to be hot. After a
    /// failed activity-log transaction (`log_failed`) they go on regardless (the peer's copy
    /// stays complete; only this node's crash protection for them is lost) rather than stall
    /// replication.
    pub(super) fn release_peer_writes(&mut self, log_failed: bool, now: Tick) {
        let mut dropped_lost = false;
        while let Some(&QueuedPeerWrite {
            peer,
            conn,
            write,
            admitted,
            wanted,
        }) = self.peer_writes_waiting.front()
        {
            let key = (peer, conn, write.seq);
            if self.current_conn(peer) != Some(conn) {
                // Its connection is gone: the Primary counts it out of sync.
                self.peer_writes_waiting.pop_front();
                self.at_store.remove(&key);
                dropped_lost = true;
                let effects = self.device.received_landed(key);
                self.volume_effects(effects, now);
                self.effects.push_back(Effect::ForgetPayload {
                    peer,
                    conn,
                    seq: write.seq,
                });
                continue;
            }
            let range = ByteRange::new(write.offset, write.len);
            if !admitted {
                let resolver = self.config.node_id < peer;
                let answer = match self.device.admit_received(key, range, write.seen, resolver) {
                    ReceivedDecision::Wait => break,
                    ReceivedDecision::Apply => None,
                    ReceivedDecision::Superseded => {
                        Some(PeerMessage::Superseded { seq: write.seq })
                    }
                    ReceivedDecision::Retry { after } => Some(PeerMessage::RetryWrite {
                        seq: write.seq,
                        after,
                    }),
                };
                if let Some(answer) = answer {
                    self.peer_writes_waiting.pop_front();
                    self.not_written(peer, conn, write, answer, now);
                    continue;
                }
            }
            if log_failed || self.device.activity_log().covers(range) {
                self.peer_writes_waiting.pop_front();
                self.device.activity_log_mut().touch(range);
                self.effects
                    .push_back(Effect::ApplyPeerWrite { peer, conn, write });
            } else {
                if !wanted {
                    self.device.activity_log_mut().want(range);
                }
                if let Some(front) = self.peer_writes_waiting.front_mut() {
                    front.admitted = true;
                    front.wanted = true;
                }
                break;
            }
        }
        // A handshake may have waited for the lost connection's writes (the others wake it
        // when they land).
        if dropped_lost {
            self.resume_deferred_hellos(now);
        }
    }

    /// The resolver does not write a received write that was concurrent with its own: it
    /// answers (before the acknowledgement that covers it) and counts it done.
    fn not_written(
        &mut self,
        peer: PeerId,
        conn: u64,
        write: PeerWrite,
        answer: PeerMessage,
        now: Tick,
    ) {
        self.at_store.remove(&(peer, conn, write.seq));
        self.effects.push_back(Effect::ForgetPayload {
            peer,
            conn,
            seq: write.seq,
        });
        let outcome = match answer {
            PeerMessage::Superseded { .. } => "superseded",
            _ => "retry",
        };
        self.emit(format!(
            "conflict name:{} peer-node-id:{peer} conn-name:{} write:{outcome} offset:{} len:{}",
            self.config.resource,
            self.peer_name(peer),
            write.offset,
            write.len
        ));
        self.effects.push_back(Effect::Send {
            peer,
            message: answer,
        });
        if let Some(link) = self.links.get_mut(&peer) {
            let effects = link.receiver.local_done(write.seq, Ok(()));
            self.receiver_effects(peer, effects, now);
        }
    }

    /// Extents that must stay hot: writes in flight (application, resync, received).
    fn busy_extents(&self) -> BTreeSet<u64> {
        let mut busy = self.device.busy_extents();
        self.resync_busy_extents(&mut busy);
        for range in self.at_store.values() {
            if let Some((first, last)) = extents_of(*range) {
                busy.extend(first..=last);
            }
        }
        busy
    }
}
