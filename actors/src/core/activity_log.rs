//! The activity log (docs/protocol.md, "The activity log and the bitmap"): the 4 MiB extents
//! a write may be landing in. An extent is made hot durably before a write into it starts, and
//! leaves the log only once nothing is in flight in it, with its bitmap pieces stored in the
//! same transaction. After a crash every hot extent counts as out of sync for every peer, so no
//! dirty bit needs storing on the write path: one transaction per cold extent, none per write.

use std::collections::{BTreeMap, BTreeSet};

use super::device::ByteRange;
use crate::meta::EXTENT_BYTES;

/// DRBD's default: 1237 extents of 4 MiB cover about 4.8 GiB of recent writes.
pub const DEFAULT_AL_EXTENTS: usize = 1237;

/// The extents (first, last) a non-empty byte range touches.
pub fn extents_of(range: ByteRange) -> Option<(u64, u64)> {
    if range.len == 0 {
        return None;
    }
    let last = range.offset.saturating_add(range.len - 1) / EXTENT_BYTES;
    Some((range.offset / EXTENT_BYTES, last))
}

/// Counters for status and the benchmark.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ActivityLogStats {
    /// Writes whose extents were all hot.
    pub hits: u64,
    /// Writes that waited for an extent to be made hot.
    pub misses: u64,
    /// Transactions that changed the hot set.
    pub transactions: u64,
    pub evictions: u64,
}

/// A transaction of the hot set handed out for storing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AlTransaction {
    /// The hot set as stored by this transaction.
    pub hot: Vec<u64>,
    /// Extents that became cold: their bitmap pieces go into the same transaction.
    pub evicted: Vec<u64>,
}

#[derive(Debug)]
pub struct ActivityLog {
    capacity: usize,
    /// Hot extent -> when it was last used (a counter, for least-recently-used eviction).
    hot: BTreeMap<u64, u64>,
    clock: u64,
    /// Cold extents that writes are waiting for.
    wanted: BTreeSet<u64>,
    /// Extents being made hot by the transaction in flight.
    committing: Option<Vec<u64>>,
    stats: ActivityLogStats,
    /// No peers: nothing to track, every extent counts as hot.
    disabled: bool,
}

impl ActivityLog {
    /// An activity log of at most `capacity` extents (more only while every hot extent is in
    /// use), starting with the stored hot set.
    pub fn new(capacity: usize, stored: &[u64]) -> Self {
        let mut log = ActivityLog {
            capacity: capacity.max(1),
            hot: BTreeMap::new(),
            clock: 0,
            wanted: BTreeSet::new(),
            committing: None,
            stats: ActivityLogStats::default(),
            disabled: false,
        };
        for extent in stored {
            log.clock += 1;
            log.hot.insert(*extent, log.clock);
        }
        log
    }

    /// An activity log for a volume without peers: no write waits, nothing is stored.
    pub fn disabled() -> Self {
        ActivityLog {
            disabled: true,
            ..ActivityLog::new(1, &[])
        }
    }

    pub fn hot_extents(&self) -> impl Iterator<Item = u64> + '_ {
        self.hot.keys().copied()
    }

    pub fn hot_len(&self) -> usize {
        self.hot.len()
    }

    pub fn capacity(&self) -> usize {
        self.capacity
    }

    pub fn stats(&self) -> ActivityLogStats {
        self.stats
    }

    pub fn covers(&self, range: ByteRange) -> bool {
        self.disabled
            || extents_of(range)
                .is_none_or(|(first, last)| (first..=last).all(|e| self.hot.contains_key(&e)))
    }

    /// A write into hot extents starts: they are the most recently used.
    pub fn touch(&mut self, range: ByteRange) {
        self.stats.hits += 1;
        if let Some((first, last)) = extents_of(range) {
            self.clock += 1;
            for extent in first..=last {
                if let Some(used) = self.hot.get_mut(&extent) {
                    *used = self.clock;
                }
            }
        }
    }

    /// A write must wait for its cold extents.
    pub fn want(&mut self, range: ByteRange) {
        self.stats.misses += 1;
        if let Some((first, last)) = extents_of(range) {
            for extent in first..=last {
                if !self.hot.contains_key(&extent) {
                    self.wanted.insert(extent);
                }
            }
        }
    }

    /// Whether a transaction should be started: extents are wanted and none is in flight.
    pub fn needs_transaction(&self) -> bool {
        self.committing.is_none() && !self.wanted.is_empty()
    }

    pub fn is_committing(&self) -> bool {
        self.committing.is_some()
    }

    /// More extents are hot than the capacity allows (a large request needed them all at
    /// once): idle ones should leave.
    pub fn over_capacity(&self) -> bool {
        !self.disabled && self.hot.len() > self.capacity
    }

    /// Starts a transaction that makes the wanted extents hot, evicting the least recently
    /// used extents that are not `busy` to stay within the capacity. Evicted extents are cold
    /// from now on; the wanted ones become hot once [`Self::committed`] is called.
    pub fn begin(&mut self, busy: &BTreeSet<u64>) -> Option<AlTransaction> {
        if self.committing.is_some() || (self.wanted.is_empty() && !self.over_capacity()) {
            return None;
        }
        let adding: Vec<u64> = std::mem::take(&mut self.wanted)
            .into_iter()
            .filter(|extent| !self.hot.contains_key(extent))
            .collect();
        let mut evicted = Vec::new();
        while self.hot.len() + adding.len() > self.capacity {
            let victim = self
                .hot
                .iter()
                .filter(|(extent, _)| !busy.contains(extent))
                .min_by_key(|(extent, used)| (**used, **extent))
                .map(|(extent, _)| *extent);
            let Some(victim) = victim else {
                // Every hot extent is in use: grow past the capacity for now.
                break;
            };
            self.hot.remove(&victim);
            evicted.push(victim);
        }
        if adding.is_empty() && evicted.is_empty() {
            // Over capacity, but every hot extent is in use: nothing to store yet.
            return None;
        }
        self.stats.transactions += 1;
        self.stats.evictions += evicted.len() as u64;
        let mut hot: Vec<u64> = self
            .hot
            .keys()
            .copied()
            .chain(adding.iter().copied())
            .collect();
        hot.sort_unstable();
        self.committing = Some(adding);
        Some(AlTransaction { hot, evicted })
    }

    /// The transaction in flight is durable: its extents are hot.
    pub fn committed(&mut self) {
        if let Some(adding) = self.committing.take() {
            self.clock += 1;
            for extent in adding {
                self.hot.insert(extent, self.clock);
            }
        }
    }

    /// The transaction in flight failed: its extents stay cold (the writes waiting for them
    /// fail).
    pub fn failed(&mut self) {
        self.committing = None;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: u64 = 1 << 20;

    fn range(offset: u64, len: u64) -> ByteRange {
        ByteRange::new(offset, len)
    }

    #[test]
    fn a_write_into_a_cold_extent_waits_for_one_transaction() {
        let mut log = ActivityLog::new(4, &[]);
        let write = range(5 * MIB, 4096);
        assert!(!log.covers(write));
        log.want(write);
        log.want(range(5 * MIB + 8192, 4096));
        let tx = log.begin(&BTreeSet::new()).expect("a transaction");
        assert_eq!(tx.hot, vec![1]);
        assert!(tx.evicted.is_empty());
        assert!(!log.covers(write), "hot only once durable");
        assert!(
            log.begin(&BTreeSet::new()).is_none(),
            "one transaction at a time"
        );
        log.committed();
        assert!(log.covers(write));
        assert_eq!(log.stats().transactions, 1);
    }

    #[test]
    fn a_write_across_an_extent_boundary_needs_both() {
        let mut log = ActivityLog::new(4, &[0]);
        let write = range(4 * MIB - 4096, 8192);
        assert!(!log.covers(write));
        log.want(write);
        let tx = log.begin(&BTreeSet::new()).expect("a transaction");
        assert_eq!(tx.hot, vec![0, 1]);
    }

    #[test]
    fn eviction_takes_the_least_recently_used_extent_that_is_not_busy() {
        let mut log = ActivityLog::new(2, &[0, 1]);
        log.touch(range(0, 4096)); // extent 0 is now the most recently used
        log.want(range(8 * MIB, 4096));
        let tx = log.begin(&BTreeSet::new()).expect("a transaction");
        assert_eq!(tx.evicted, vec![1]);
        assert_eq!(tx.hot, vec![0, 2]);
        log.committed();

        log.want(range(12 * MIB, 4096));
        let busy: BTreeSet<u64> = [0].into();
        let tx = log.begin(&busy).expect("a transaction");
        assert_eq!(tx.evicted, vec![2], "extent 0 is busy although older");
    }

    #[test]
    fn when_every_extent_is_busy_the_log_grows_past_its_capacity() {
        let mut log = ActivityLog::new(1, &[0]);
        log.want(range(4 * MIB, 4096));
        let tx = log.begin(&[0].into()).expect("a transaction");
        assert!(tx.evicted.is_empty());
        assert_eq!(tx.hot, vec![0, 1]);
    }

    #[test]
    fn an_oversized_log_shrinks_back_once_its_extents_are_idle() {
        let mut log = ActivityLog::new(2, &[]);
        // A discard of the whole device needs every extent at once.
        log.want(range(0, 16 * MIB));
        let tx = log.begin(&BTreeSet::new()).expect("a transaction");
        assert_eq!(tx.hot.len(), 4);
        log.committed();
        assert!(log.over_capacity());
        let busy: BTreeSet<u64> = (0..4).collect();
        assert!(log.begin(&busy).is_none(), "nothing idle, nothing stored");
        let tx = log.begin(&[3].into()).expect("an eviction");
        assert_eq!(tx.hot.len(), 2);
        assert!(tx.hot.contains(&3), "the busy extent stays");
        log.committed();
        assert!(!log.over_capacity());
    }

    #[test]
    fn a_failed_transaction_leaves_the_extents_cold() {
        let mut log = ActivityLog::new(4, &[]);
        log.want(range(0, 4096));
        assert!(log.begin(&BTreeSet::new()).is_some());
        log.failed();
        assert!(!log.covers(range(0, 4096)));
        assert!(!log.needs_transaction());
    }
}
