//! In-memory implementations of the ports, for tests (this crate's and `qrbd`'s).
//!
//! [`MemStore`] is a [`BlockStore`] over a `Vec<u8>` with two controls that let a test decide
//! the timing of local I/O without sleeping:
//!
//! * a *gate*: while it is held, every operation that reaches the store parks at its entry until
//!   the test releases the gate (or lets a given number of operations through). Holding it
//!   returns a [`GateGuard`] that opens the gate when dropped, so a test that fails (panics)
//!   with the gate held does not leave operations parked forever on blocking-pool threads,
//!   which would hang the runtime's shutdown instead of failing the test;
//! * fault injection: the next N operations fail with a chosen errno.
//!
//! Its counters are published through a [`tokio::sync::watch`] channel, so an async test can
//! wait for "one operation is parked at the gate" or "two writes have finished" with
//! [`MemStore::wait_for`]. It also checks the port's contract that no two overlapping writes or
//! discards run at once, and counts violations.
//!
//! [`MemMetaStore`] is a [`MetaStore`] that keeps every saved value, in order.

use std::collections::BTreeMap;
use std::io;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::Duration;

use tokio::sync::{oneshot, watch};

use crate::buffer::{BufferPool, PooledBuf};
use crate::core::IoFault;
use crate::device::{IoDone, IoReply};
use crate::meta::{BitmapChunk, BitmapUpdate, DeviceMeta, StoredBitmaps};
use crate::ports::{BlockStore, MetaError, MetaStore};

/// What kind of operation reached a [`MemStore`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum StoreOpKind {
    Read,
    Write,
    Discard,
    Flush,
}

/// One finished operation of a [`MemStore`], in the order the operations finished.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StoreOp {
    pub kind: StoreOpKind,
    pub offset: u64,
    pub len: u64,
    /// False when the operation failed by injection.
    pub ok: bool,
}

/// Counters of a [`MemStore`]; every field only grows except `parked` and `active`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct StoreCounters {
    /// Operations that reached the store (including those parked at the gate).
    pub arrived: u64,
    /// Operations parked at the gate right now.
    pub parked: u64,
    /// Operations past the gate and not yet finished, right now.
    pub active: u64,
    /// Operations that finished (successfully or by injected failure).
    pub finished: u64,
    pub reads: u64,
    pub writes: u64,
    pub discards: u64,
    pub flushes: u64,
    pub failed: u64,
    /// Times two overlapping writes/discards were at the store at once (must stay 0).
    pub overlap_violations: u64,
}

#[derive(Debug, Default)]
struct StoreState {
    data: Vec<u8>,
    gate_held: bool,
    /// Operations the test let through a held gate and that have not used their pass yet.
    passes: u64,
    fail_next: u64,
    fail_errno: i32,
    /// Writes and discards at the store right now (past the gate): (id, start, end).
    active_modifications: Vec<(u64, u64, u64)>,
    next_op: u64,
    log: Vec<StoreOp>,
}

/// An in-memory [`BlockStore`] with a gate and fault injection.
pub struct MemStore {
    size: u64,
    state: Mutex<StoreState>,
    gate_opened: Condvar,
    counters: watch::Sender<StoreCounters>,
}

impl std::fmt::Debug for MemStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MemStore")
            .field("size", &self.size)
            .field("counters", &self.counters())
            .finish()
    }
}

impl MemStore {
    /// A zero-filled store of `size` bytes.
    pub fn new(size: u64) -> Arc<Self> {
        let len = usize::try_from(size).expect("MemStore size fits in memory");
        Arc::new(MemStore {
            size,
            state: Mutex::new(StoreState {
                data: vec![0; len],
                ..StoreState::default()
            }),
            gate_opened: Condvar::new(),
            counters: watch::channel(StoreCounters::default()).0,
        })
    }

    fn lock(&self) -> MutexGuard<'_, StoreState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// From now on, operations park at the store's entry until the gate is released (by
    /// [`GateGuard::release`], by dropping the guard, or by [`Self::release_gate`]) or
    /// operations are let through ([`GateGuard::let_through`], [`Self::let_through`]).
    ///
    /// Keep the guard in a named variable for as long as the gate must stay held: dropping it
    /// (also when the test panics) opens the gate, so parked operations never outlive the test.
    pub fn hold_gate(&self) -> GateGuard<'_> {
        self.lock().gate_held = true;
        GateGuard { store: self }
    }

    /// Opens the gate: parked and future operations run. Idempotent.
    pub fn release_gate(&self) {
        let mut state = self.lock();
        state.gate_held = false;
        state.passes = 0;
        drop(state);
        self.gate_opened.notify_all();
    }

    /// Lets `n` operations (parked now or arriving later) through a held gate, which stays held
    /// for the ones after them.
    pub fn let_through(&self, n: u64) {
        self.lock().passes += n;
        self.gate_opened.notify_all();
    }

    /// The next `n` operations (after the gate) fail with `errno`.
    pub fn fail_next(&self, n: u64, errno: i32) {
        let mut state = self.lock();
        state.fail_next = n;
        state.fail_errno = errno;
    }

    pub fn counters(&self) -> StoreCounters {
        *self.counters.borrow()
    }

    /// Subscribes to the counters (see [`Self::wait_for`]).
    pub fn watch(&self) -> watch::Receiver<StoreCounters> {
        self.counters.subscribe()
    }

    /// Waits until `condition` holds for the counters, or panics after `deadline`.
    pub async fn wait_for(
        &self,
        what: &str,
        deadline: Duration,
        condition: impl FnMut(&StoreCounters) -> bool,
    ) -> StoreCounters {
        let mut receiver = self.watch();
        let outcome = match tokio::time::timeout(deadline, receiver.wait_for(condition)).await {
            Ok(Ok(counters)) => Some(*counters),
            Ok(Err(_)) => panic!("MemStore dropped while waiting for {what}"),
            Err(_) => None,
        };
        outcome.unwrap_or_else(|| {
            panic!(
                "timed out after {deadline:?} waiting for {what}; store counters: {:?}",
                self.counters()
            )
        })
    }

    /// A copy of the whole content.
    pub fn contents(&self) -> Vec<u8> {
        self.lock().data.clone()
    }

    /// A copy of `len` bytes at `offset`.
    pub fn read_range(&self, offset: u64, len: u64) -> Vec<u8> {
        let (start, end) = (offset as usize, (offset + len) as usize);
        self.lock().data[start..end].to_vec()
    }

    /// The finished operations, in finishing order.
    pub fn log(&self) -> Vec<StoreOp> {
        self.lock().log.clone()
    }

    fn update(&self, change: impl FnOnce(&mut StoreCounters)) {
        self.counters.send_modify(change);
    }

    /// Runs one operation: park at the gate, check overlap, inject failure or `apply`.
    fn run(
        &self,
        kind: StoreOpKind,
        offset: u64,
        len: u64,
        apply: impl FnOnce(&mut Vec<u8>),
    ) -> io::Result<()> {
        self.update(|c| c.arrived += 1);
        let mut state = self.lock();
        if state.gate_held && state.passes == 0 {
            self.update(|c| c.parked += 1);
            while state.gate_held && state.passes == 0 {
                state = self
                    .gate_opened
                    .wait(state)
                    .unwrap_or_else(|e| e.into_inner());
            }
            self.update(|c| c.parked -= 1);
        }
        if state.gate_held {
            state.passes -= 1;
        }
        let op_id = state.next_op;
        state.next_op += 1;
        let modifies = matches!(kind, StoreOpKind::Write | StoreOpKind::Discard);
        let end = offset + len;
        let mut violation = false;
        if modifies && len > 0 {
            violation = state
                .active_modifications
                .iter()
                .any(|(_, s, e)| offset < *e && *s < end);
            state.active_modifications.push((op_id, offset, end));
        }
        self.update(|c| {
            c.active += 1;
            if violation {
                c.overlap_violations += 1;
            }
        });
        // Let another thread run between entering and finishing, so that overlapping
        // operations that should not run together have a chance to be caught doing so.
        drop(state);
        std::thread::yield_now();
        let mut state = self.lock();
        let failure = if state.fail_next > 0 {
            state.fail_next -= 1;
            Some(state.fail_errno)
        } else {
            None
        };
        if failure.is_none() {
            apply(&mut state.data);
        }
        state.active_modifications.retain(|(id, _, _)| *id != op_id);
        state.log.push(StoreOp {
            kind,
            offset,
            len,
            ok: failure.is_none(),
        });
        drop(state);
        self.update(|c| {
            c.active -= 1;
            c.finished += 1;
            match kind {
                StoreOpKind::Read => c.reads += 1,
                StoreOpKind::Write => c.writes += 1,
                StoreOpKind::Discard => c.discards += 1,
                StoreOpKind::Flush => c.flushes += 1,
            }
            if failure.is_some() {
                c.failed += 1;
            }
        });
        match failure {
            Some(errno) => Err(io::Error::from_raw_os_error(errno)),
            None => Ok(()),
        }
    }

    fn check_range(&self, offset: u64, len: u64) -> io::Result<()> {
        match offset.checked_add(len) {
            Some(end) if end <= self.size => Ok(()),
            _ => Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!(
                    "range {offset}+{len} beyond the store's {} bytes",
                    self.size
                ),
            )),
        }
    }
}

impl BlockStore for MemStore {
    fn size(&self) -> u64 {
        self.size
    }

    fn read_at(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        let len = buf.len() as u64;
        self.check_range(offset, len)?;
        let mut copy = vec![0; buf.len()];
        let (start, end) = (offset as usize, (offset + len) as usize);
        self.run(StoreOpKind::Read, offset, len, |data| {
            copy.copy_from_slice(&data[start..end]);
        })?;
        buf.copy_from_slice(&copy);
        Ok(())
    }

    fn write_at(&self, offset: u64, data: &[u8]) -> io::Result<()> {
        self.check_range(offset, data.len() as u64)?;
        let start = offset as usize;
        self.run(StoreOpKind::Write, offset, data.len() as u64, |bytes| {
            bytes[start..start + data.len()].copy_from_slice(data);
        })
    }

    fn discard(&self, offset: u64, len: u64) -> io::Result<()> {
        self.check_range(offset, len)?;
        let (start, end) = (offset as usize, (offset + len) as usize);
        self.run(StoreOpKind::Discard, offset, len, |bytes| {
            bytes[start..end].fill(0);
        })
    }

    fn flush(&self) -> io::Result<()> {
        self.run(StoreOpKind::Flush, 0, 0, |_| {})
    }
}

/// A held [`MemStore`] gate (see [`MemStore::hold_gate`]). Dropping it opens the gate, so
/// operations parked at it are released even when the test holding it fails half-way.
///
/// The guard, not the store, does this: the store is shared (the device actor and the parked
/// operation's own thread hold it too), so it cannot be dropped while anything is parked.
#[must_use = "dropping the guard opens the gate at once: bind it to a named variable"]
pub struct GateGuard<'a> {
    store: &'a MemStore,
}

impl GateGuard<'_> {
    /// Lets `n` operations (parked now or arriving later) through; the gate stays held for the
    /// ones after them.
    pub fn let_through(&self, n: u64) {
        self.store.let_through(n);
    }

    /// Opens the gate: parked and future operations run.
    pub fn release(self) {
        // Dropping does it.
    }
}

impl std::fmt::Debug for GateGuard<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GateGuard").finish_non_exhaustive()
    }
}

impl Drop for GateGuard<'_> {
    fn drop(&mut self) {
        self.store.release_gate();
    }
}

#[derive(Debug, Default)]
struct MetaState {
    stored: Option<DeviceMeta>,
    saves: Vec<DeviceMeta>,
    fail_next: u64,
    activity_log: Vec<u64>,
    chunks: BTreeMap<(u8, u64), BitmapChunk>,
}

/// An in-memory [`MetaStore`] that records every save. Clones share the same state, so a test
/// keeps one clone and hands another to the code under test.
#[derive(Debug, Clone, Default)]
pub struct MemMetaStore {
    state: Arc<Mutex<MetaState>>,
}

impl MemMetaStore {
    pub fn new(initial: Option<DeviceMeta>) -> Self {
        MemMetaStore {
            state: Arc::new(Mutex::new(MetaState {
                stored: initial,
                ..MetaState::default()
            })),
        }
    }

    fn lock(&self) -> MutexGuard<'_, MetaState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Every saved value, oldest first.
    pub fn saves(&self) -> Vec<DeviceMeta> {
        self.lock().saves.clone()
    }

    /// The current stored value.
    pub fn stored(&self) -> Option<DeviceMeta> {
        self.lock().stored.clone()
    }

    /// The next `n` saves fail (and are not recorded).
    pub fn fail_next(&self, n: u64) {
        self.lock().fail_next = n;
    }
}

impl MetaStore for MemMetaStore {
    fn load(&self) -> Result<Option<DeviceMeta>, MetaError> {
        Ok(self.lock().stored.clone())
    }

    fn save(&mut self, meta: &DeviceMeta) -> Result<(), MetaError> {
        let mut state = self.lock();
        if state.fail_next > 0 {
            state.fail_next -= 1;
            return Err(MetaError::Backend("injected save failure".into()));
        }
        state.stored = Some(meta.clone());
        state.saves.push(meta.clone());
        Ok(())
    }

    fn save_bitmaps(&mut self, update: &BitmapUpdate) -> Result<(), MetaError> {
        let mut state = self.lock();
        if let Some(hot) = &update.activity_log {
            state.activity_log = hot.clone();
        }
        for chunk in &update.chunks {
            if chunk.is_clean() {
                state.chunks.remove(&(chunk.peer, chunk.extent));
            } else {
                state
                    .chunks
                    .insert((chunk.peer, chunk.extent), chunk.clone());
            }
        }
        Ok(())
    }

    fn load_bitmaps(&self) -> Result<StoredBitmaps, MetaError> {
        let state = self.lock();
        Ok(StoredBitmaps {
            activity_log: state.activity_log.clone(),
            chunks: state.chunks.values().cloned().collect(),
        })
    }
}

/// A pooled buffer holding a copy of `bytes`.
pub fn buf_from(pool: &BufferPool, bytes: &[u8]) -> PooledBuf {
    let mut buf = pool.acquire(bytes.len());
    buf.copy_from_slice(bytes);
    buf
}

/// The outcome of one request as its reply delivers it.
pub type IoOutcome = Result<IoDone, IoFault>;

/// A reply that forwards the outcome to the returned receiver.
pub fn reply_channel() -> (IoReply, oneshot::Receiver<IoOutcome>) {
    let (sender, receiver) = oneshot::channel();
    let reply: IoReply = Box::new(move |outcome| {
        // Fails only if the test dropped the receiver: it no longer wants the outcome.
        let _ = sender.send(outcome);
    });
    (reply, receiver)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::mpsc;
    use std::time::Instant;

    const DEADLINE: Duration = Duration::from_secs(20);

    /// Polls the counters (no runtime here) until `condition` holds, or panics.
    fn wait_counters(store: &MemStore, what: &str, condition: impl Fn(&StoreCounters) -> bool) {
        let deadline = Instant::now() + DEADLINE;
        while !condition(&store.counters()) {
            assert!(
                Instant::now() < deadline,
                "timed out waiting for {what}: {:?}",
                store.counters()
            );
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    /// Starts a write of one byte at `offset` on a thread of its own; its result arrives on the
    /// returned channel.
    fn write_in_background(store: &Arc<MemStore>, offset: u64) -> mpsc::Receiver<io::Result<()>> {
        let (sender, receiver) = mpsc::channel();
        let store = Arc::clone(store);
        std::thread::spawn(move || {
            // Fails only if the test already gave up on the result.
            let _ = sender.send(store.write_at(offset, &[1]));
        });
        receiver
    }

    #[test]
    fn the_guard_lets_operations_through_and_releases_the_gate() {
        let store = MemStore::new(4096);
        let gate = store.hold_gate();
        let first = write_in_background(&store, 0);
        let second = write_in_background(&store, 1);
        wait_counters(&store, "two writes parked", |c| c.parked == 2);
        gate.let_through(1);
        wait_counters(&store, "one write through", |c| {
            c.finished == 1 && c.parked == 1
        });
        gate.release();
        for result in [first, second] {
            result
                .recv_timeout(DEADLINE)
                .expect("the write finishes once the gate is released")
                .expect("the write succeeds");
        }
        assert_eq!(store.counters().writes, 2);
        // Released: operations no longer park.
        store.write_at(2, &[1]).expect("write through an open gate");
    }

    #[test]
    fn a_panic_while_the_gate_is_held_releases_parked_operations() {
        let store = MemStore::new(4096);
        let mut parked = None;
        let failed = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            let _gate = store.hold_gate();
            parked = Some(write_in_background(&store, 0));
            wait_counters(&store, "the write parked", |c| c.parked == 1);
            panic!("a test failing with the gate held");
        }));
        assert!(failed.is_err());
        parked
            .expect("the write was started")
            .recv_timeout(DEADLINE)
            .expect("the parked write is released when the failing test unwinds")
            .expect("the write succeeds");
        assert_eq!(store.counters().parked, 0);
    }
}
