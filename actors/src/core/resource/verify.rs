//! Online verify (docs/protocol.md, "Online verify"): the node that runs `qrbd verify` asks its
//! peer for digests of every block in linear order, digests its own, compares them block by
//! block, and marks each differing block out of sync for the peer (the next resync repairs
//! it). The shells compute the digests; the core only compares them.

use std::collections::BTreeMap;

use super::{CommandError, CommandId, DigestPurpose, Effect, ResourceCore};
use crate::core::device::ByteRange;
use crate::core::messages::PeerMessage;
use crate::core::replication::PeerId;
use crate::core::{DiskState, Tick, BLOCK_SIZE};

/// One 4 KiB block's digest (SHA-256 in the shells).
pub type BlockDigest = [u8; 32];

/// Bytes per verify request, and requested at a time.
const VERIFY_REQUEST: u64 = 256 << 10;
const VERIFY_WINDOW: u64 = 8 << 20;
/// Differing ranges a result keeps (the count covers all of them).
const MAX_RANGES: usize = 64;

#[derive(Debug, Default)]
struct Pending {
    len: u64,
    local: Option<Result<Vec<BlockDigest>, i32>>,
    remote: Option<Result<Vec<BlockDigest>, i32>>,
}

/// A verify this node runs against one peer.
#[derive(Debug)]
pub struct Verify {
    cursor: u64,
    pending: BTreeMap<u64, Pending>,
    pending_bytes: u64,
    result: VerifyResult,
}

/// What a verify found (in status while it runs, and after it finished).
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct VerifyResult {
    pub total_bytes: u64,
    pub checked_bytes: u64,
    pub differing_blocks: u64,
    /// The first differing ranges, as (offset, length) in bytes, adjacent blocks merged.
    pub differing_ranges: Vec<(u64, u64)>,
    /// Blocks that could not be read on either side (counted as differing).
    pub unreadable_blocks: u64,
    pub started: Tick,
    pub finished: Option<Tick>,
    /// Why it ended early (the connection was lost).
    pub interrupted: Option<String>,
}

impl VerifyResult {
    fn note_difference(&mut self, offset: u64) {
        self.differing_blocks += 1;
        let room = self.differing_ranges.len() < MAX_RANGES;
        match self.differing_ranges.last_mut() {
            Some((start, len)) if *start + *len == offset => *len += BLOCK_SIZE,
            _ if room => self.differing_ranges.push((offset, BLOCK_SIZE)),
            _ => {}
        }
    }
}

impl ResourceCore {
    /// `qrbd verify`: starts comparing every block with the (one) connected peer.
    pub(super) fn start_verify(&mut self, id: CommandId, now: Tick) {
        let refuse = |why: String| Err(CommandError::Refused(why));
        let Some(peer) = self.links.keys().next().copied() else {
            return self.done(
                id,
                refuse("the resource has no peer to verify against".into()),
            );
        };
        let link = &self.links[&peer];
        let name = link.name.clone();
        if !link.is_connected() {
            return self.done(id, refuse(format!("{name} is not connected")));
        }
        if link.resync.is_some() {
            return self.done(id, Err(CommandError::Resyncing(name)));
        }
        if link.verify.is_some() {
            return self.done(
                id,
                refuse(format!("a verify against {name} is already running")),
            );
        }
        // Inconsistent data is known to differ, and nothing could repair what a verify found.
        let inconsistent = if self.disk == DiskState::Inconsistent {
            Some(self.config.node_name.clone())
        } else if link.disk == Some(DiskState::Inconsistent) {
            Some(name.clone())
        } else {
            None
        };
        if let Some(who) = inconsistent {
            return self.done(
                id,
                refuse(format!(
                    "{who} is Inconsistent: verify compares consistent replicas (let the resync \
                     or the initial sync finish first)"
                )),
            );
        }
        tracing::info!(resource = %self.config.resource, peer = %name, "online verify starts");
        let result = VerifyResult {
            total_bytes: self.config.size_bytes,
            started: now,
            ..VerifyResult::default()
        };
        if let Some(link) = self.links.get_mut(&peer) {
            link.verify = Some(Verify {
                cursor: 0,
                pending: BTreeMap::new(),
                pending_bytes: 0,
                result,
            });
        }
        self.emit(format!(
            "change peer-device name:{} peer-node-id:{peer} conn-name:{name} replication:VerifyS",
            self.config.resource
        ));
        self.verify_more(peer, now);
        self.done(id, Ok(format!("verifying against {name}")));
    }

    /// Keeps the window of verify requests full, in linear order.
    fn verify_more(&mut self, peer: PeerId, now: Tick) {
        let Some(conn) = self.current_conn(peer) else {
            return;
        };
        let size = self.config.size_bytes;
        let mut asks = Vec::new();
        let finished = {
            let Some(verify) = self.links.get_mut(&peer).and_then(|l| l.verify.as_mut()) else {
                return;
            };
            while verify.pending_bytes < VERIFY_WINDOW && verify.cursor < size {
                let offset = verify.cursor;
                let len = VERIFY_REQUEST.min(size - offset);
                verify.cursor += len;
                verify.pending.insert(
                    offset,
                    Pending {
                        len,
                        ..Pending::default()
                    },
                );
                verify.pending_bytes += len;
                asks.push((offset, len));
            }
            verify.pending.is_empty() && verify.cursor >= size
        };
        for (offset, len) in asks {
            self.effects.push_back(Effect::Send {
                peer,
                message: PeerMessage::VerifyRequest { offset, len },
            });
            self.effects.push_back(Effect::Digest {
                peer,
                conn,
                offset,
                len,
                purpose: DigestPurpose::Verify,
            });
        }
        if finished {
            self.finish_verify(peer, None, now);
        }
    }

    /// The peer asks for digests of its blocks' counterparts here.
    pub(super) fn verify_requested(&mut self, peer: PeerId, offset: u64, len: u64, now: Tick) {
        let valid = len > 0
            && len <= super::resync::MAX_RESYNC_REQUEST
            && offset % BLOCK_SIZE == 0
            && len % BLOCK_SIZE == 0
            && offset
                .checked_add(len)
                .is_some_and(|end| end <= self.config.size_bytes);
        let Some(conn) = self.current_conn(peer).filter(|_| valid) else {
            return self.protocol_error(
                peer,
                format!("VerifyRequest of {len} bytes at {offset} is not valid here"),
                now,
            );
        };
        self.effects.push_back(Effect::Digest {
            peer,
            conn,
            offset,
            len,
            purpose: DigestPurpose::VerifyForPeer,
        });
    }

    /// A shell finished a [`Effect::Digest`].
    pub(super) fn digested(
        &mut self,
        peer: PeerId,
        conn: u64,
        blocks: ByteRange,
        purpose: DigestPurpose,
        result: Result<Vec<BlockDigest>, i32>,
        now: Tick,
    ) {
        let ByteRange { offset, len } = blocks;
        if self.current_conn(peer) != Some(conn) {
            return;
        }
        match purpose {
            DigestPurpose::VerifyForPeer => {
                let (digests, errno) = match result {
                    Ok(digests) => (digests, 0),
                    Err(errno) => (Vec::new(), errno),
                };
                self.effects.push_back(Effect::Send {
                    peer,
                    message: PeerMessage::VerifyReply {
                        offset,
                        len,
                        digests,
                        errno,
                    },
                });
            }
            DigestPurpose::Verify => {
                self.verify_part(peer, offset, len, |p| p.local = Some(result), now)
            }
            DigestPurpose::ResyncTarget => self.target_digested(peer, offset, len, result),
            DigestPurpose::ResyncSource => self.source_digested(peer, conn, offset, len, result),
        }
    }

    /// The peer's digests arrived.
    pub(super) fn verify_replied(
        &mut self,
        peer: PeerId,
        offset: u64,
        len: u64,
        digests: Vec<BlockDigest>,
        errno: i32,
        now: Tick,
    ) {
        let expected = self
            .links
            .get(&peer)
            .and_then(|l| l.verify.as_ref())
            .and_then(|v| v.pending.get(&offset))
            .is_some_and(|p| p.len == len && p.remote.is_none());
        let complete = errno != 0 || digests.len() as u64 == len / BLOCK_SIZE;
        if !expected || !complete {
            return self.protocol_error(
                peer,
                format!("VerifyReply for {len} bytes at {offset} was not asked for"),
                now,
            );
        }
        let remote = if errno == 0 { Ok(digests) } else { Err(errno) };
        self.verify_part(peer, offset, len, |p| p.remote = Some(remote), now);
    }

    fn verify_part(
        &mut self,
        peer: PeerId,
        offset: u64,
        len: u64,
        fill: impl FnOnce(&mut Pending),
        now: Tick,
    ) {
        let Some(verify) = self.links.get_mut(&peer).and_then(|l| l.verify.as_mut()) else {
            return;
        };
        let Some(pending) = verify.pending.get_mut(&offset) else {
            return;
        };
        fill(pending);
        if pending.local.is_none() || pending.remote.is_none() {
            return;
        }
        let Some(pending) = verify.pending.remove(&offset) else {
            return;
        };
        verify.pending_bytes -= pending.len;
        let blocks = len / BLOCK_SIZE;
        let mut differing = Vec::new();
        match (pending.local, pending.remote) {
            (Some(Ok(local)), Some(Ok(remote))) if local.len() as u64 == blocks => {
                for (i, (a, b)) in local.iter().zip(&remote).enumerate() {
                    if a != b {
                        differing.push(offset + i as u64 * BLOCK_SIZE);
                    }
                }
            }
            _ => {
                verify.result.unreadable_blocks += blocks;
                differing.extend((0..blocks).map(|i| offset + i * BLOCK_SIZE));
            }
        }
        verify.result.checked_bytes += len;
        for block in &differing {
            verify.result.note_difference(*block);
        }
        for block in differing {
            self.device
                .mark_out_of_sync(peer, ByteRange::new(block, BLOCK_SIZE));
        }
        self.verify_more(peer, now);
    }

    fn finish_verify(&mut self, peer: PeerId, interrupted: Option<String>, now: Tick) {
        let Some(link) = self.links.get_mut(&peer) else {
            return;
        };
        let Some(verify) = link.verify.take() else {
            return;
        };
        let name = link.name.clone();
        let mut result = verify.result;
        result.finished = Some(now);
        result.interrupted = interrupted;
        let ranges: Vec<String> = result
            .differing_ranges
            .iter()
            .map(|(offset, len)| format!("{offset}+{len}"))
            .collect();
        if result.differing_blocks > 0 {
            tracing::warn!(resource = %self.config.resource, peer = %name, differing_blocks = result.differing_blocks,
                ranges = %ranges.join(","), "online verify found blocks that differ; they are out of sync now and the next resync repairs them (disconnect and connect)");
        } else {
            tracing::info!(resource = %self.config.resource, peer = %name, checked_bytes = result.checked_bytes, interrupted = ?result.interrupted, "online verify finished");
        }
        self.emit(format!(
            "change peer-device name:{} peer-node-id:{peer} conn-name:{name} replication:Established verify-differing-blocks:{} verify-ranges:[{}]",
            self.config.resource,
            result.differing_blocks,
            ranges.join(",")
        ));
        let differing = result.differing_blocks > 0 && result.interrupted.is_none();
        if let Some(link) = self.links.get_mut(&peer) {
            link.last_verify = Some(result);
        }
        if differing {
            self.resync_marked_blocks(peer, now);
        }
    }

    /// Blocks marked out of sync while connected (a verify's differing blocks, or marks that
    /// came too late for the resync that just ended): a resync repairs them at once, in the
    /// direction the same-generation rule gives (a Primary's data wins; else this node's).
    pub(super) fn resync_marked_blocks(&mut self, peer: PeerId, now: Tick) {
        let Some(link) = self.links.get(&peer) else {
            return;
        };
        if !link.is_connected() || link.resync.is_some() || !self.resync_possible() {
            return;
        }
        let (Some(peer_role), Some(peer_disk)) = (link.role, link.disk) else {
            return;
        };
        let local = super::SideFacts {
            role: self.role,
            disk: self.disk,
            bits_for_other: self.missing_for(peer),
        };
        let remote = super::SideFacts {
            role: peer_role,
            disk: peer_disk,
            bits_for_other: 0,
        };
        if let Some(role) = super::resync_direction(local, self.config.node_id, remote, peer) {
            if role == super::SyncRole::Target && self.role == crate::core::Role::Primary {
                return;
            }
            self.start_resync(peer, role, now);
        }
    }

    /// The connection is gone: the verify ends where it was.
    pub(super) fn abandon_verify(&mut self, peer: PeerId, now: Tick) {
        if self.links.get(&peer).is_some_and(|l| l.verify.is_some()) {
            self.finish_verify(peer, Some("the connection was lost".into()), now);
        }
    }

    /// The status of the running verify, or of the last one.
    pub(super) fn verify_status(link: &super::Link) -> Option<&VerifyResult> {
        link.verify
            .as_ref()
            .map(|v| &v.result)
            .or(link.last_verify.as_ref())
    }
}
