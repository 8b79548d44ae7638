//! The initial sync (docs/protocol.md, "The initial sync"). Fresh metadata of a replicated
//! volume is Inconsistent in the fresh generation ([`JUST_CREATED_UUID`]): no replica holds
//! data anyone agreed on. `primary --force` makes one node's data the truth, and every blank
//! peer then takes every block from it. `new-current-uuid --clear-bitmap` instead declares
//! blank replicas identical (two new, all-zero disks): all of them take one new generation and
//! become UpToDate without a copy.

use super::{CommandError, CommandId, Effect, MetaWaiter, ResourceCore};
use crate::core::device::ByteRange;
use crate::core::generation::{Generations, JUST_CREATED_UUID};
use crate::core::messages::PeerMessage;
use crate::core::replication::PeerId;
use crate::core::{DiskState, Role};

impl ResourceCore {
    /// This node's data was never synced with anyone: Inconsistent, in the fresh generation.
    pub(super) fn is_blank(&self) -> bool {
        self.meta.current_uuid == JUST_CREATED_UUID && self.disk == DiskState::Inconsistent
    }

    /// This node is blank and its initial sync had begun with its full bitmap durable.
    pub(super) fn resuming_initial_sync(&self) -> bool {
        self.is_blank() && self.meta.flags.initial_sync_bitmap_stored
    }

    /// A blank target's initial sync begins: its full bitmap is stored first (in one atomic
    /// transaction), then the mark that says so, together with the Inconsistent mark; only then
    /// does the transfer start. A restart in between finds no mark and starts over, which
    /// loses nothing: no block moved yet. Returns false when the target is not blank, or
    /// already has the mark (a resumed initial sync).
    pub(super) fn store_initial_sync_bitmap(&mut self, peer: PeerId) -> bool {
        if !self.is_blank() || self.meta.flags.initial_sync_bitmap_stored {
            return false;
        }
        self.bitmap_writer.initial_sync_for = Some(peer);
        self.store_all_bitmaps();
        true
    }

    /// The full bitmap of a blank target is durable (or could not be stored).
    pub(super) fn initial_sync_bitmap_stored(&mut self, ok: bool) {
        let Some(peer) = self.bitmap_writer.initial_sync_for.take() else {
            return;
        };
        if !ok {
            // Tried again; the transfer waits.
            self.bitmap_writer.initial_sync_for = Some(peer);
            self.store_all_bitmaps();
            return;
        }
        self.meta.flags.initial_sync_bitmap_stored = true;
        self.persist(Some(MetaWaiter::ResyncTarget(peer)));
    }

    fn counts_out_of_sync_blocks(&self) -> bool {
        self.links.keys().any(|peer| self.missing_for(*peer) > 0)
    }

    /// `new-current-uuid --clear-bitmap`: every replica is blank and connected; all of them
    /// take a new generation, UpToDate, and nothing is copied.
    pub(super) fn skip_initial_sync(&mut self, id: CommandId) {
        let refuse = |why: String| Err(CommandError::Refused(why));
        if self.is_changing() {
            return self.done(id, Err(CommandError::Busy));
        }
        if self.links.is_empty() {
            return self.done(
                id,
                refuse("the resource has no peer: there is no initial sync to skip".into()),
            );
        }
        if !self.is_blank() || self.role != Role::Secondary || self.counts_out_of_sync_blocks() {
            return self.done(
                id,
                refuse(format!(
                    "this node's data is not blank (disk {}, generation {:016X}): \
                     --clear-bitmap only skips the initial sync of fresh replicas",
                    self.disk, self.meta.current_uuid
                )),
            );
        }
        for link in self.links.values() {
            let blank_peer = link.is_connected()
                && link.role == Some(Role::Secondary)
                && link.disk == Some(DiskState::Inconsistent)
                && link.current_uuid == JUST_CREATED_UUID
                && link.resync.is_none();
            if !blank_peer {
                return self.done(
                    id,
                    refuse(format!(
                        "peer {} is not a connected, blank Secondary; every replica must be \
                         connected and fresh (Inconsistent, generation {JUST_CREATED_UUID:016X})",
                        link.name
                    )),
                );
            }
        }
        let uuid = self.uuids.next_uuid();
        self.take_first_generation(uuid);
        let peers: Vec<PeerId> = self.links.keys().copied().collect();
        for peer in peers {
            self.effects.push_back(Effect::Send {
                peer,
                message: PeerMessage::SkipInitialSync { uuid },
            });
        }
        self.persist(Some(MetaWaiter::CommandDone(id)));
        self.announce_state();
    }

    /// A peer skipped the initial sync. A blank node follows; one that ran the same command
    /// at the same moment (it took a first generation of its own and nothing since) follows
    /// the lower node id, so that both end in one generation. Anything else is left to the
    /// next handshake, where a blank node takes every block.
    pub(super) fn skip_initial_sync_received(&mut self, peer: PeerId, uuid: u64) {
        let raced = self.meta.current_uuid != uuid
            && self.meta.history_uuids == [JUST_CREATED_UUID]
            && self.disk == DiskState::UpToDate
            && peer < self.config.node_id;
        let follows = (self.is_blank() || raced)
            && self.role == Role::Secondary
            && !self.counts_out_of_sync_blocks()
            && self.links.values().all(|l| l.resync.is_none());
        if !follows {
            if self.meta.current_uuid != uuid {
                tracing::warn!(resource = %self.config.resource, peer = %self.peer_name(peer), "the peer skipped the initial sync, but this node's data is not blank; the next handshake decides");
            }
            return;
        }
        self.take_first_generation(uuid);
        self.persist(None);
        self.announce_state();
    }

    fn take_first_generation(&mut self, uuid: u64) {
        let mut generations = Generations {
            current: JUST_CREATED_UUID,
            ..Generations::default()
        };
        generations.start_new(uuid, []);
        super::set_generations(&mut self.meta, &generations);
        tracing::info!(resource = %self.config.resource, generation = %format!("{uuid:016X}"), "initial sync skipped: the blank replicas are identical; UpToDate");
        self.emit(format!(
            "change resource name:{} current-uuid:{uuid:016X} initial-sync:skipped",
            self.config.resource
        ));
        self.set_disk(DiskState::UpToDate, false);
    }

    /// A peer was promoted with `--force` while this node is connected. A blank node has no
    /// bitmap that says what differs: every block comes from the new Primary.
    pub(super) fn forced_over_blank(&mut self, peer: PeerId) {
        if self.is_blank() {
            tracing::warn!(resource = %self.config.resource, peer = %self.peer_name(peer), "the peer was promoted with --force over blank data: the initial sync copies every block");
            self.device
                .mark_out_of_sync(peer, ByteRange::new(0, self.config.size_bytes));
        }
    }
}
