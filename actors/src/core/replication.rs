//! Replication bookkeeping, deterministic like the rest of the core: the sending side per peer
//! (sequence numbers, epochs and barriers, what each peer has yet to acknowledge, the
//! out-of-sync blocks) and the receiving side per connection (applying writes in epoch order
//! and acknowledging as the protocol says). Rules: docs/protocol.md, "Completion", "Epochs and barriers" and "Out of sync".

use std::collections::{BTreeMap, BTreeSet, VecDeque};

use super::device::{ByteRange, RequestId};
use super::messages::{Epoch, PeerMessage, PeerRequestId};
use super::ReplicationProtocol;
use super::BLOCK_SIZE;
use crate::meta::{BitmapChunk, EXTENT_BYTES, WORDS_PER_EXTENT};

/// Peers are named by node id.
pub type PeerId = u8;

/// An epoch is closed after this many writes even if none completed.
pub const MAX_WRITES_PER_EPOCH: u32 = 256;

const BLOCK: u64 = BLOCK_SIZE;

/// A violation of the replication protocol by the peer: the connection must be dropped.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("protocol error from peer: {0}")]
pub struct ProtocolError(pub String);

/// The out-of-sync blocks (4 KiB each) of one peer: blocks where the peer's data may differ
/// from this node's. It remembers which 4 MiB extents changed since they were last stored
/// (docs/protocol.md, "The activity log and the bitmap").
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutOfSync {
    words: Vec<u64>,
    blocks: u64,
    dirty: u64,
    /// Extents whose bits changed since they were last handed out for storing.
    changed: BTreeSet<u64>,
}

impl OutOfSync {
    pub fn new(size_bytes: u64) -> Self {
        let blocks = size_bytes.div_ceil(BLOCK);
        OutOfSync {
            words: vec![0; blocks.div_ceil(64) as usize],
            blocks,
            dirty: 0,
            changed: BTreeSet::new(),
        }
    }

    /// The blocks a byte range touches, clipped to the volume: (first, end).
    fn blocks_of(&self, range: ByteRange) -> (u64, u64) {
        if range.len == 0 {
            return (0, 0);
        }
        let first = range.offset / BLOCK;
        let end = range.offset.saturating_add(range.len).div_ceil(BLOCK);
        (first.min(self.blocks), end.min(self.blocks))
    }

    pub fn mark(&mut self, range: ByteRange) {
        let (first, end) = self.blocks_of(range);
        self.set_blocks(first, end, true);
    }

    /// Clears the blocks a byte range touches (they are known to be in sync now).
    pub fn clear(&mut self, range: ByteRange) {
        let (first, end) = self.blocks_of(range);
        self.set_blocks(first, end, false);
    }

    /// Marks every block of the volume.
    pub fn mark_all(&mut self) {
        self.set_blocks(0, self.blocks, true);
    }

    /// Marks every block of a 4 MiB extent.
    pub fn mark_extent(&mut self, extent: u64) {
        let first = extent.saturating_mul(BLOCKS_PER_EXTENT).min(self.blocks);
        let end = first.saturating_add(BLOCKS_PER_EXTENT).min(self.blocks);
        self.set_blocks(first, end, true);
    }

    pub fn mark_blocks(&mut self, first: u64, count: u64) {
        let first = first.min(self.blocks);
        let end = first.saturating_add(count).min(self.blocks);
        self.set_blocks(first, end, true);
    }

    fn set_blocks(&mut self, first: u64, end: u64, dirty: bool) {
        let mut block = first;
        while block < end {
            let (word, bit) = ((block / 64) as usize, block % 64);
            // Whole words at a time where the range covers them.
            let span = (64 - bit).min(end - block);
            let mask = if span == 64 {
                u64::MAX
            } else {
                ((1u64 << span) - 1) << bit
            };
            let before = self.words[word];
            let after = if dirty { before | mask } else { before & !mask };
            if after != before {
                self.words[word] = after;
                let (was, is) = (before.count_ones() as u64, after.count_ones() as u64);
                self.dirty = self.dirty + is - was;
                self.changed.insert(block / BLOCKS_PER_EXTENT);
            }
            block += span;
        }
    }

    pub fn dirty_blocks(&self) -> u64 {
        self.dirty
    }

    pub fn dirty_bytes(&self) -> u64 {
        self.dirty * BLOCK
    }

    pub fn is_dirty(&self, block: u64) -> bool {
        self.words
            .get((block / 64) as usize)
            .is_some_and(|word| word & (1 << (block % 64)) != 0)
    }

    /// The volume's size in blocks.
    pub fn blocks(&self) -> u64 {
        self.blocks
    }

    /// The first run of dirty blocks at or after `from`, at most `max` long: (first, count).
    pub fn next_dirty_run(&self, from: u64, max: u64) -> Option<(u64, u64)> {
        let mut block = from;
        let first = loop {
            if block >= self.blocks {
                return None;
            }
            let word = self.words[(block / 64) as usize] >> (block % 64);
            if word == 0 {
                block = (block / 64 + 1) * 64;
                continue;
            }
            block += u64::from(word.trailing_zeros());
            break block;
        };
        let mut end = first;
        while end < self.blocks && end - first < max && self.is_dirty(end) {
            end += 1;
        }
        Some((first, end - first))
    }

    /// Every run of dirty blocks, in order: (first, count).
    pub fn runs(&self) -> Vec<(u64, u64)> {
        let mut runs = Vec::new();
        let mut from = 0;
        while let Some((first, count)) = self.next_dirty_run(from, u64::MAX) {
            runs.push((first, count));
            from = first + count;
        }
        runs
    }

    /// This peer's piece of the bitmap for one extent, as stored.
    pub fn chunk(&self, peer: PeerId, extent: u64) -> BitmapChunk {
        let mut words = [0u64; WORDS_PER_EXTENT];
        let start = extent as usize * WORDS_PER_EXTENT;
        for (i, word) in words.iter_mut().enumerate() {
            *word = self.words.get(start + i).copied().unwrap_or(0);
        }
        BitmapChunk {
            peer,
            extent,
            words,
        }
    }

    /// Adds a stored piece's dirty blocks (bits beyond the volume's end are ignored).
    pub fn load(&mut self, chunk: &BitmapChunk) {
        let start = chunk.extent.saturating_mul(WORDS_PER_EXTENT as u64);
        for (i, stored) in chunk.words.iter().enumerate() {
            let index = start.saturating_add(i as u64);
            let Some(word) = usize::try_from(index)
                .ok()
                .and_then(|i| self.words.get_mut(i))
            else {
                break;
            };
            let first_block = index * 64;
            let valid = self.blocks.saturating_sub(first_block).min(64);
            let mask = if valid == 64 {
                u64::MAX
            } else {
                (1u64 << valid) - 1
            };
            let after = *word | (stored & mask);
            self.dirty += u64::from(after.count_ones() - word.count_ones());
            *word = after;
        }
    }

    /// Extents changed since they were last handed out by [`Self::take_changed`].
    pub fn changed_extents(&self) -> &BTreeSet<u64> {
        &self.changed
    }

    /// Remembers that `extent` changed (storing its piece failed).
    pub fn note_changed(&mut self, extent: u64) {
        self.changed.insert(extent);
    }

    /// Forgets that `extent` changed (its piece is being stored).
    pub fn take_changed(&mut self, extent: u64) -> bool {
        self.changed.remove(&extent)
    }
}

/// 4 KiB blocks per 4 MiB extent.
pub const BLOCKS_PER_EXTENT: u64 = EXTENT_BYTES / BLOCK;

/// What a replicated request still needs from one peer before it may complete.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PeerNeed {
    /// Protocol A: handed to the transport.
    Sent,
    /// Protocol B.
    RecvAck,
    /// Protocol C.
    WriteAck,
    /// A flush: the barrier ack of this epoch (the peer flushed everything before it).
    BarrierAck(Epoch),
    /// Two primaries, a write the peer answered RetryWrite: the peer's own writes up to this
    /// sequence number of its data stream must be applied here before the write is issued
    /// again (docs/protocol.md, "Two primaries").
    PeerApplied(u64),
}

/// A message the shell must send on the peer's data stream. Data and discards carry the
/// request's bytes, which the shell holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outgoing {
    Data {
        request: RequestId,
        seq: u64,
        epoch: Epoch,
        /// See [`crate::core::messages::PeerMessage::Data`].
        seen: u64,
    },
    Discard {
        request: RequestId,
        seq: u64,
        epoch: Epoch,
        seen: u64,
    },
    Barrier {
        seq: u64,
        epoch: Epoch,
        writes: u32,
        flush: bool,
    },
}

/// The sending side for one peer.
#[derive(Debug)]
pub struct PeerSender {
    pub protocol: ReplicationProtocol,
    connected: bool,
    epoch: Epoch,
    writes_in_epoch: u32,
    close_before_next_write: bool,
    seq: u64,
    /// Writes sent and not yet covered by a barrier ack, by epoch.
    unacked: BTreeMap<Epoch, Vec<ByteRange>>,
    /// The number of ranges in `unacked`, kept so status need not count them per request.
    unacked_count: u64,
    /// Protocols B and C: the writes not yet covered by a (cumulative) RecvAck/WriteAck, as
    /// (sequence number, request), in sequence order.
    awaiting_ack: VecDeque<(u64, RequestId)>,
    pub out_of_sync: OutOfSync,
    pub sent_bytes: u64,
}

impl PeerSender {
    pub fn new(protocol: ReplicationProtocol, size_bytes: u64) -> Self {
        PeerSender {
            protocol,
            connected: false,
            epoch: 1,
            writes_in_epoch: 0,
            close_before_next_write: false,
            seq: 0,
            unacked: BTreeMap::new(),
            unacked_count: 0,
            awaiting_ack: VecDeque::new(),
            out_of_sync: OutOfSync::new(size_bytes),
            sent_bytes: 0,
        }
    }

    pub fn is_connected(&self) -> bool {
        self.connected
    }

    /// A fresh connection: numbering starts over.
    pub fn connect(&mut self) {
        self.connected = true;
        self.epoch = 1;
        self.writes_in_epoch = 0;
        self.close_before_next_write = false;
        self.seq = 0;
        self.unacked.clear();
        self.unacked_count = 0;
        self.awaiting_ack.clear();
    }

    /// The connection is gone: whatever the peer did not barrier-ack may be missing there.
    pub fn disconnect(&mut self) {
        self.connected = false;
        self.unacked_count = 0;
        self.awaiting_ack.clear();
        for ranges in std::mem::take(&mut self.unacked).into_values() {
            for range in ranges {
                self.out_of_sync.mark(range);
            }
        }
    }

    /// The ranges of the writes not yet barrier-acked.
    pub fn unacked_ranges(&self) -> impl Iterator<Item = ByteRange> + '_ {
        self.unacked.values().flatten().copied()
    }

    /// Pending writes not yet barrier-acked.
    pub fn unacked_writes(&self) -> u64 {
        self.unacked_count
    }

    fn next_seq(&mut self) -> u64 {
        self.seq += 1;
        self.seq
    }

    fn close_epoch(&mut self, flush: bool, out: &mut Vec<Outgoing>) -> Epoch {
        let closed = self.epoch;
        out.push(Outgoing::Barrier {
            seq: self.next_seq(),
            epoch: closed,
            writes: self.writes_in_epoch,
            flush,
        });
        // An epoch with no writes still gets its (empty) ack; keep an entry to check the count.
        self.unacked.entry(closed).or_default();
        self.epoch += 1;
        self.writes_in_epoch = 0;
        self.close_before_next_write = false;
        closed
    }

    /// Replicates a write or discard: returns the messages to send and what to wait for.
    /// `seen`: the newest of the peer's own writes applied here that overlap this one (see
    /// [`crate::core::messages::PeerMessage::Data`]).
    pub fn replicate(
        &mut self,
        request: RequestId,
        range: ByteRange,
        is_discard: bool,
        seen: u64,
        out: &mut Vec<Outgoing>,
    ) -> PeerNeed {
        if self.close_before_next_write && self.writes_in_epoch > 0 {
            self.close_epoch(false, out);
        }
        let seq = self.next_seq();
        let epoch = self.epoch;
        out.push(if is_discard {
            Outgoing::Discard {
                request,
                seq,
                epoch,
                seen,
            }
        } else {
            Outgoing::Data {
                request,
                seq,
                epoch,
                seen,
            }
        });
        self.writes_in_epoch += 1;
        if self.protocol != ReplicationProtocol::A {
            self.awaiting_ack.push_back((seq, request));
        }
        self.unacked.entry(epoch).or_default().push(range);
        self.unacked_count += 1;
        self.sent_bytes += if is_discard { 0 } else { range.len };
        if self.writes_in_epoch >= MAX_WRITES_PER_EPOCH {
            self.close_before_next_write = true;
        }
        match self.protocol {
            ReplicationProtocol::A => PeerNeed::Sent,
            ReplicationProtocol::B => PeerNeed::RecvAck,
            ReplicationProtocol::C => PeerNeed::WriteAck,
        }
    }

    /// A flush: closes the current epoch with a flushing barrier.
    pub fn flush(&mut self, out: &mut Vec<Outgoing>) -> PeerNeed {
        PeerNeed::BarrierAck(self.close_epoch(true, out))
    }

    /// Nothing is being written: close the open epoch now, so that the peer acknowledges (and
    /// flushes) it without waiting for the next write.
    pub fn close_idle_epoch(&mut self, out: &mut Vec<Outgoing>) {
        if self.connected && self.writes_in_epoch > 0 {
            self.close_epoch(false, out);
        }
    }

    /// A write completed upward: the next write goes into a new epoch.
    pub fn note_completion(&mut self) {
        self.close_before_next_write = true;
    }

    /// A cumulative RecvAck/WriteAck up to `up_to`: the requests it covers, oldest first. An
    /// acknowledgement of a number not sent yet is a protocol error; one that covers nothing
    /// new is not.
    pub fn acked_up_to(&mut self, up_to: u64) -> Result<Vec<RequestId>, ProtocolError> {
        if up_to > self.seq {
            return Err(ProtocolError(format!(
                "acknowledgement up to sequence number {up_to}, only {} were sent",
                self.seq
            )));
        }
        let mut acked = Vec::new();
        while let Some(&(seq, request)) = self.awaiting_ack.front() {
            if seq > up_to {
                break;
            }
            self.awaiting_ack.pop_front();
            acked.push(request);
        }
        Ok(acked)
    }

    /// The request sent as `seq` whose acknowledgement is still awaited, if any.
    pub fn awaiting(&self, seq: u64) -> Option<RequestId> {
        let index = self
            .awaiting_ack
            .binary_search_by_key(&seq, |(s, _)| *s)
            .ok()?;
        self.awaiting_ack.get(index).map(|(_, request)| *request)
    }

    /// The sequence number under which `request` was sent, while its acknowledgement is still
    /// awaited.
    pub fn awaiting_seq_of(&self, request: RequestId) -> Option<u64> {
        self.awaiting_ack
            .iter()
            .find(|(_, awaited)| *awaited == request)
            .map(|(seq, _)| *seq)
    }

    /// The peer answered `seq` otherwise (Superseded, RetryWrite): the acknowledgement that
    /// later covers it must not complete the request, whose id a re-submission reuses.
    pub fn answered(&mut self, seq: u64) {
        if let Ok(index) = self.awaiting_ack.binary_search_by_key(&seq, |(s, _)| *s) {
            self.awaiting_ack.remove(index);
        }
    }

    /// Checks and applies a barrier ack; epochs are acked in order.
    pub fn barrier_acked(&mut self, epoch: Epoch, writes: u32) -> Result<(), ProtocolError> {
        let Some(ranges) = self.unacked.get(&epoch) else {
            return Err(ProtocolError(format!(
                "barrier ack for unknown epoch {epoch}"
            )));
        };
        if ranges.len() as u64 != u64::from(writes) {
            return Err(ProtocolError(format!(
                "barrier ack for epoch {epoch} counts {writes} writes, {} were sent",
                ranges.len()
            )));
        }
        self.unacked.retain(|e, _| *e > epoch);
        self.unacked_count = self
            .unacked
            .values()
            .map(|ranges| ranges.len() as u64)
            .sum();
        Ok(())
    }
}

/// What the receiving side asks the shell to do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReceiverEffect {
    /// Write (or discard) the received request `local` to the local store, then report
    /// `local_done`.
    Apply(u64),
    /// Make every applied write durable, then report `flush_done(epoch)`.
    Flush(Epoch),
    /// The epoch is written and needs no flush (disk flushes are off and the barrier did not
    /// ask for one): report `flush_done(epoch)` right away.
    EpochWritten(Epoch),
    /// Send this acknowledgement on the ack stream.
    Ack(PeerMessage),
}

#[derive(Debug, Clone, Copy)]
struct Received {
    request: PeerRequestId,
    epoch: Epoch,
}

#[derive(Debug, Clone, Copy)]
struct Closing {
    writes: u32,
    flush: bool,
}

/// The receiving side of one connection: writes of one epoch may be applied in any order, but
/// epoch N+1 starts only once epoch N is written and flushed, and then BarrierAck(N) goes out.
#[derive(Debug)]
pub struct PeerReceiver {
    protocol: ReplicationProtocol,
    expected_seq: u64,
    epoch: Epoch,
    started_in_epoch: u32,
    done_in_epoch: u32,
    closing: Option<Closing>,
    flushing: bool,
    /// Flush the disk at every epoch boundary (DRBD's `disk-flushes`), not only when the
    /// sender's barrier asks for it.
    disk_flushes: bool,
    /// Received for a later epoch, waiting for the current one to finish: local id, or a
    /// barrier (epoch, writes).
    queued: VecDeque<Queued>,
    active: BTreeMap<u64, Received>,
    /// Protocol C: the highest sequence number a WriteAck covered so far.
    write_acked: u64,
    pub received_bytes: u64,
}

#[derive(Debug, Clone, Copy)]
enum Queued {
    Write(u64),
    Barrier {
        epoch: Epoch,
        writes: u32,
        flush: bool,
    },
}

impl PeerReceiver {
    pub fn new(protocol: ReplicationProtocol) -> Self {
        PeerReceiver {
            protocol,
            expected_seq: 1,
            epoch: 1,
            started_in_epoch: 0,
            done_in_epoch: 0,
            closing: None,
            flushing: false,
            disk_flushes: true,
            queued: VecDeque::new(),
            active: BTreeMap::new(),
            write_acked: 0,
            received_bytes: 0,
        }
    }

    /// Flush only for barriers that ask for it (an fsync on the sender), for storage whose
    /// write cache survives power loss.
    pub fn without_disk_flushes(mut self) -> Self {
        self.disk_flushes = false;
        self
    }

    /// Requests received and not yet written.
    pub fn pending(&self) -> u64 {
        self.active.len() as u64
    }

    fn check_seq(&mut self, seq: u64) -> Result<(), ProtocolError> {
        if seq != self.expected_seq {
            return Err(ProtocolError(format!(
                "sequence number {seq}, expected {}",
                self.expected_seq
            )));
        }
        self.expected_seq += 1;
        Ok(())
    }

    /// A data or discard message arrived. Returns the local id under which the shell keeps
    /// its payload: the message's sequence number, unique on a connection.
    pub fn on_write(
        &mut self,
        seq: u64,
        epoch: Epoch,
        request: PeerRequestId,
        len: u64,
    ) -> Result<(u64, Vec<ReceiverEffect>), ProtocolError> {
        self.check_seq(seq)?;
        // While the current epoch is closing, only the next one may arrive (it must wait).
        let expected = if self.closing.is_some() || !self.queued.is_empty() {
            self.last_queued_epoch() + 1
        } else {
            self.epoch
        };
        if epoch != expected {
            return Err(ProtocolError(format!(
                "write in epoch {epoch}, expected epoch {expected}"
            )));
        }
        let local = seq;
        self.received_bytes += len;
        self.active.insert(local, Received { request, epoch });
        let mut effects = Vec::new();
        if self.protocol == ReplicationProtocol::B {
            // Sequence numbers arrive in order, so everything up to this one was received.
            effects.push(ReceiverEffect::Ack(PeerMessage::RecvAck { up_to: seq }));
        }
        if epoch == self.epoch && self.closing.is_none() {
            self.started_in_epoch += 1;
            effects.push(ReceiverEffect::Apply(local));
        } else {
            self.queued.push_back(Queued::Write(local));
        }
        Ok((local, effects))
    }

    fn last_queued_epoch(&self) -> Epoch {
        self.queued
            .iter()
            .rev()
            .find_map(|queued| match queued {
                Queued::Barrier { epoch, .. } => Some(*epoch),
                Queued::Write(_) => None,
            })
            .unwrap_or(self.epoch)
    }

    /// A barrier arrived.
    pub fn on_barrier(
        &mut self,
        seq: u64,
        epoch: Epoch,
        writes: u32,
        flush: bool,
    ) -> Result<Vec<ReceiverEffect>, ProtocolError> {
        self.check_seq(seq)?;
        let mut effects = Vec::new();
        if self.closing.is_some() || !self.queued.is_empty() {
            let expected = self.last_queued_epoch() + 1;
            if epoch != expected {
                return Err(ProtocolError(format!(
                    "barrier for epoch {epoch}, expected {expected}"
                )));
            }
            self.queued.push_back(Queued::Barrier {
                epoch,
                writes,
                flush,
            });
            return Ok(effects);
        }
        if epoch != self.epoch {
            return Err(ProtocolError(format!(
                "barrier for epoch {epoch}, expected {}",
                self.epoch
            )));
        }
        self.close(writes, flush, &mut effects)?;
        Ok(effects)
    }

    fn close(
        &mut self,
        writes: u32,
        flush: bool,
        effects: &mut Vec<ReceiverEffect>,
    ) -> Result<(), ProtocolError> {
        if writes != self.started_in_epoch {
            return Err(ProtocolError(format!(
                "barrier for epoch {} counts {writes} writes, {} arrived",
                self.epoch, self.started_in_epoch
            )));
        }
        self.closing = Some(Closing { writes, flush });
        self.maybe_flush(effects);
        Ok(())
    }

    fn maybe_flush(&mut self, effects: &mut Vec<ReceiverEffect>) {
        let Some(closing) = self.closing else {
            return;
        };
        if !self.flushing && self.done_in_epoch == self.started_in_epoch {
            self.flushing = true;
            effects.push(if self.disk_flushes || closing.flush {
                ReceiverEffect::Flush(self.epoch)
            } else {
                ReceiverEffect::EpochWritten(self.epoch)
            });
        }
    }

    /// The local write of `local` finished.
    pub fn local_done(&mut self, local: u64, result: Result<(), i32>) -> Vec<ReceiverEffect> {
        let mut effects = Vec::new();
        let Some(received) = self.active.remove(&local) else {
            return effects;
        };
        if received.epoch == self.epoch {
            self.done_in_epoch += 1;
        }
        if let Err(errno) = result {
            // Before any WriteAck that covers it: the sender must learn that the write is
            // missing here before it counts it as written.
            effects.push(ReceiverEffect::Ack(PeerMessage::NegAck {
                request: received.request,
                errno,
            }));
        }
        if self.protocol == ReplicationProtocol::C {
            self.ack_written_prefix(&mut effects);
        }
        self.maybe_flush(&mut effects);
        effects
    }

    /// Acknowledges the longest run of sequence numbers from the start of the connection that
    /// holds no write still being received or written (barriers count as done), if it grew.
    /// Writes of one epoch finish in any order, so one WriteAck may cover several.
    fn ack_written_prefix(&mut self, effects: &mut Vec<ReceiverEffect>) {
        let prefix = match self.active.keys().next() {
            Some(&oldest) => oldest - 1,
            None => self.expected_seq - 1,
        };
        if prefix > self.write_acked {
            self.write_acked = prefix;
            effects.push(ReceiverEffect::Ack(PeerMessage::WriteAck { up_to: prefix }));
        }
    }

    /// The flush for `epoch` finished: ack it and start the next epoch's queued work.
    pub fn flush_done(&mut self, epoch: Epoch) -> Result<Vec<ReceiverEffect>, ProtocolError> {
        let mut effects = Vec::new();
        let Some(closing) = self
            .closing
            .take()
            .filter(|_| self.flushing && epoch == self.epoch)
        else {
            return Ok(effects);
        };
        self.flushing = false;
        effects.push(ReceiverEffect::Ack(PeerMessage::BarrierAck {
            epoch,
            writes: closing.writes,
        }));
        self.epoch += 1;
        self.started_in_epoch = 0;
        self.done_in_epoch = 0;
        while let Some(queued) = self.queued.pop_front() {
            match queued {
                Queued::Write(local) => {
                    self.started_in_epoch += 1;
                    effects.push(ReceiverEffect::Apply(local));
                }
                Queued::Barrier {
                    epoch,
                    writes,
                    flush,
                } => {
                    if epoch != self.epoch {
                        return Err(ProtocolError(format!(
                            "barrier for epoch {epoch} out of order"
                        )));
                    }
                    self.close(writes, flush, &mut effects)?;
                    break;
                }
            }
        }
        Ok(effects)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn out_of_sync_counts_each_block_once() {
        let mut oos = OutOfSync::new(1 << 20);
        oos.mark(ByteRange::new(100, 10));
        oos.mark(ByteRange::new(4000, 200));
        assert_eq!(oos.dirty_blocks(), 2);
        assert!(oos.is_dirty(0) && oos.is_dirty(1) && !oos.is_dirty(2));
        assert_eq!(oos.dirty_bytes(), 8192);
    }

    #[test]
    fn sender_closes_epochs_after_completion_and_checks_barrier_counts() {
        let mut sender = PeerSender::new(ReplicationProtocol::C, 1 << 20);
        sender.connect();
        let mut out = Vec::new();
        assert_eq!(
            sender.replicate(1, ByteRange::new(0, 4096), false, 0, &mut out),
            PeerNeed::WriteAck
        );
        sender.replicate(2, ByteRange::new(4096, 4096), false, 0, &mut out);
        sender.note_completion();
        sender.replicate(3, ByteRange::new(8192, 4096), true, 0, &mut out);
        assert_eq!(
            out,
            vec![
                Outgoing::Data {
                    request: 1,
                    seq: 1,
                    epoch: 1,
                    seen: 0
                },
                Outgoing::Data {
                    request: 2,
                    seq: 2,
                    epoch: 1,
                    seen: 0
                },
                Outgoing::Barrier {
                    seq: 3,
                    epoch: 1,
                    writes: 2,
                    flush: false
                },
                Outgoing::Discard {
                    request: 3,
                    seq: 4,
                    epoch: 2,
                    seen: 0
                },
            ]
        );
        assert!(sender.barrier_acked(1, 1).is_err());
        assert!(sender.barrier_acked(1, 2).is_ok());
        assert_eq!(sender.unacked_writes(), 1);
        sender.disconnect();
        assert_eq!(
            sender.out_of_sync.dirty_blocks(),
            1,
            "the unacked discard is out of sync"
        );
    }

    #[test]
    fn receiver_applies_epochs_in_order_and_acks_after_flush() {
        let mut receiver = PeerReceiver::new(ReplicationProtocol::C);
        let (a, effects) = receiver
            .on_write(1, 1, 10, 4096)
            .expect("the call under test succeeds");
        assert_eq!(effects, vec![ReceiverEffect::Apply(a)]);
        assert!(receiver
            .on_barrier(2, 1, 1, false)
            .expect("the call under test succeeds")
            .is_empty());
        // Epoch 2 arrives while epoch 1 is still being written: it must wait.
        let (b, effects) = receiver
            .on_write(3, 2, 11, 4096)
            .expect("the call under test succeeds");
        assert!(effects.is_empty());
        // Up to the barrier (2): the write of epoch 2 (3) is received but not written.
        let effects = receiver.local_done(a, Ok(()));
        assert_eq!(
            effects,
            vec![
                ReceiverEffect::Ack(PeerMessage::WriteAck { up_to: 2 }),
                ReceiverEffect::Flush(1)
            ]
        );
        let effects = receiver
            .flush_done(1)
            .expect("the call under test succeeds");
        assert_eq!(
            effects,
            vec![
                ReceiverEffect::Ack(PeerMessage::BarrierAck {
                    epoch: 1,
                    writes: 1
                }),
                ReceiverEffect::Apply(b)
            ]
        );
    }

    #[test]
    fn write_acks_cover_the_written_prefix_and_follow_neg_acks() {
        let mut receiver = PeerReceiver::new(ReplicationProtocol::C);
        let mut locals = Vec::new();
        for seq in 1..=4 {
            let (local, _) = receiver
                .on_write(seq, 1, 100 + seq, 4096)
                .expect("in order");
            locals.push(local);
        }
        // Out of order: nothing is acknowledged while an earlier write is still pending.
        assert!(receiver.local_done(locals[2], Ok(())).is_empty());
        assert!(receiver
            .local_done(locals[1], Err(5))
            .iter()
            .all(|effect| !matches!(effect, ReceiverEffect::Ack(PeerMessage::WriteAck { .. }))));
        // The first write finishes: one ack covers the first three, after the NegAck.
        assert_eq!(
            receiver.local_done(locals[0], Ok(())),
            vec![ReceiverEffect::Ack(PeerMessage::WriteAck { up_to: 3 })]
        );
        // A barrier's number counts as done; a failed write at the front still acks after
        // its NegAck.
        assert!(receiver
            .on_barrier(5, 1, 4, false)
            .expect("count")
            .is_empty());
        assert_eq!(
            receiver.local_done(locals[3], Err(5)),
            vec![
                ReceiverEffect::Ack(PeerMessage::NegAck {
                    request: 104,
                    errno: 5
                }),
                ReceiverEffect::Ack(PeerMessage::WriteAck { up_to: 5 }),
                ReceiverEffect::Flush(1),
            ]
        );
    }

    #[test]
    fn a_cumulative_ack_completes_every_request_it_covers_once() {
        let mut sender = PeerSender::new(ReplicationProtocol::C, 1 << 20);
        sender.connect();
        let mut out = Vec::new();
        for request in 1..=3 {
            sender.replicate(
                request,
                ByteRange::new(request * 4096, 4096),
                false,
                0,
                &mut out,
            );
        }
        sender.flush(&mut out);
        sender.replicate(9, ByteRange::new(0, 4096), true, 0, &mut out);
        assert_eq!(sender.acked_up_to(2), Ok(vec![1, 2]));
        assert_eq!(sender.acked_up_to(2), Ok(vec![]), "already covered");
        // Up to the barrier (4) covers no further write; 5 is the discard.
        assert_eq!(sender.acked_up_to(4), Ok(vec![3]));
        assert!(sender.acked_up_to(6).is_err(), "never sent");
        assert_eq!(sender.acked_up_to(5), Ok(vec![9]));
        // Protocol A waits for no acknowledgement.
        let mut sender = PeerSender::new(ReplicationProtocol::A, 1 << 20);
        sender.connect();
        sender.replicate(1, ByteRange::new(0, 4096), false, 0, &mut out);
        assert_eq!(sender.acked_up_to(1), Ok(vec![]));
    }

    #[test]
    fn receiver_rejects_count_mismatch_and_bad_sequence() {
        let mut receiver = PeerReceiver::new(ReplicationProtocol::A);
        assert!(receiver.on_write(1, 1, 1, 10).is_ok());
        assert!(receiver.on_barrier(2, 1, 2, false).is_err());
        let mut receiver = PeerReceiver::new(ReplicationProtocol::A);
        assert!(receiver.on_write(2, 1, 1, 10).is_err());
    }

    #[test]
    fn protocol_b_acks_on_receipt() {
        let mut receiver = PeerReceiver::new(ReplicationProtocol::B);
        let (local, effects) = receiver
            .on_write(1, 1, 7, 10)
            .expect("the call under test succeeds");
        assert_eq!(
            effects,
            vec![
                ReceiverEffect::Ack(PeerMessage::RecvAck { up_to: 1 }),
                ReceiverEffect::Apply(local)
            ]
        );
        assert!(receiver.local_done(local, Ok(())).is_empty());
    }

    #[test]
    fn without_disk_flushes_only_flushing_barriers_flush() {
        let mut receiver = PeerReceiver::new(ReplicationProtocol::C).without_disk_flushes();
        let (a, _) = receiver
            .on_write(1, 1, 10, 4096)
            .expect("the call under test succeeds");
        assert!(receiver
            .on_barrier(2, 1, 1, false)
            .expect("the call under test succeeds")
            .is_empty());
        let effects = receiver.local_done(a, Ok(()));
        assert_eq!(effects.last(), Some(&ReceiverEffect::EpochWritten(1)));
        let effects = receiver
            .flush_done(1)
            .expect("the call under test succeeds");
        assert_eq!(
            effects,
            vec![ReceiverEffect::Ack(PeerMessage::BarrierAck {
                epoch: 1,
                writes: 1
            })]
        );
        // An fsync on the sender still makes the peer flush.
        assert_eq!(
            receiver
                .on_barrier(3, 2, 0, true)
                .expect("the call under test succeeds"),
            vec![ReceiverEffect::Flush(2)]
        );
    }
}
