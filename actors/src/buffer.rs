//! Page-aligned I/O buffers and a pool that bounds the bytes held by in-flight requests.
//!
//! Loop-over-FUSE can deadlock under memory reclaim if the daemon allocates without bound while
//! the kernel waits for it to finish writeback, so every request's data lives in a buffer taken
//! from a [`BufferPool`] with a fixed byte budget. Taking a buffer blocks while the budget is
//! spent: that is how a slow disk (or, later, a slow peer) throttles the writer.

use std::alloc::{alloc, dealloc, Layout};
use std::ops::{Deref, DerefMut};
use std::ptr::NonNull;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};

/// Alignment (and size granularity) of every buffer: enough for O_DIRECT on any common device.
pub const IO_ALIGN: usize = crate::core::BLOCK_SIZE as usize;

/// A heap buffer whose start and capacity are multiples of [`IO_ALIGN`].
pub struct AlignedBuf {
    ptr: NonNull<u8>,
    capacity: usize,
    len: usize,
}

// SAFETY: AlignedBuf owns its allocation exclusively, like a Vec<u8>.
unsafe impl Send for AlignedBuf {}
// SAFETY: shared access only hands out &[u8].
unsafe impl Sync for AlignedBuf {}

impl AlignedBuf {
    /// A zero-filled buffer of at least `len` bytes (rounded up to [`IO_ALIGN`]), of length `len`.
    pub fn zeroed(len: usize) -> Self {
        let capacity = round_up(len.max(1), IO_ALIGN);
        let layout = Self::layout(capacity);
        // SAFETY: layout has a non-zero size.
        let raw = unsafe { std::alloc::alloc_zeroed(layout) };
        let Some(ptr) = NonNull::new(raw) else {
            std::alloc::handle_alloc_error(layout)
        };
        AlignedBuf { ptr, capacity, len }
    }

    fn uninit_zeroless(capacity: usize) -> Self {
        let layout = Self::layout(capacity);
        // SAFETY: layout has a non-zero size. The bytes are initialised below before use.
        let raw = unsafe { alloc(layout) };
        let Some(ptr) = NonNull::new(raw) else {
            std::alloc::handle_alloc_error(layout)
        };
        // Fresh pages are cheap to zero and it keeps every byte initialised for safe slicing.
        // SAFETY: ptr is valid for capacity bytes.
        unsafe { std::ptr::write_bytes(ptr.as_ptr(), 0, capacity) };
        AlignedBuf {
            ptr,
            capacity,
            len: 0,
        }
    }

    fn layout(capacity: usize) -> Layout {
        match Layout::from_size_align(capacity, IO_ALIGN) {
            Ok(layout) => layout,
            Err(_) => panic!("buffer capacity {capacity} overflows a layout"),
        }
    }

    pub fn capacity(&self) -> usize {
        self.capacity
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Sets the length; the bytes up to the capacity are always initialised.
    pub fn set_len(&mut self, len: usize) {
        assert!(
            len <= self.capacity,
            "length {len} beyond capacity {}",
            self.capacity
        );
        self.len = len;
    }

    /// The whole capacity, for filling by a read.
    pub fn spare_capacity(&mut self) -> &mut [u8] {
        // SAFETY: all capacity bytes are initialised and exclusively ours.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.capacity) }
    }
}

impl Drop for AlignedBuf {
    fn drop(&mut self) {
        // SAFETY: allocated in this module with exactly this layout.
        unsafe { dealloc(self.ptr.as_ptr(), Self::layout(self.capacity)) };
    }
}

impl Deref for AlignedBuf {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        // SAFETY: len <= capacity and all bytes are initialised.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len) }
    }
}

impl DerefMut for AlignedBuf {
    fn deref_mut(&mut self) -> &mut [u8] {
        // SAFETY: len <= capacity, all bytes initialised, and we hold &mut self.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.len) }
    }
}

impl std::fmt::Debug for AlignedBuf {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AlignedBuf")
            .field("len", &self.len)
            .field("capacity", &self.capacity)
            .finish()
    }
}

pub fn round_up(value: usize, to: usize) -> usize {
    value.div_ceil(to) * to
}

/// Buffers are cached per power-of-two size class from 4 KiB up to this many classes (16 MiB).
const SIZE_CLASSES: usize = 13;
/// At most this many idle buffers are kept per class.
const MAX_IDLE_PER_CLASS: usize = 64;

struct PoolState {
    bytes_in_use: usize,
    /// Threads blocked in `acquire`; releases wake them only when there are some, which
    /// saves a futex call per request in the common case.
    waiters: usize,
    idle: [Vec<AlignedBuf>; SIZE_CLASSES],
}

struct PoolInner {
    budget_bytes: usize,
    state: Mutex<PoolState>,
    freed: Condvar,
}

/// A pool of aligned buffers with a budget on the bytes handed out and not yet returned.
#[derive(Clone)]
pub struct BufferPool {
    inner: Arc<PoolInner>,
}

/// Counters of a pool, for status and tests.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PoolUsage {
    pub budget_bytes: usize,
    pub bytes_in_use: usize,
}

impl BufferPool {
    pub fn new(budget_bytes: usize) -> Self {
        BufferPool {
            inner: Arc::new(PoolInner {
                budget_bytes,
                state: Mutex::new(PoolState {
                    bytes_in_use: 0,
                    waiters: 0,
                    idle: Default::default(),
                }),
                freed: Condvar::new(),
            }),
        }
    }

    fn lock(&self) -> MutexGuard<'_, PoolState> {
        // A panic while holding this lock leaves only counters behind; keep going.
        self.inner.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Takes a buffer of length `len`, blocking while the budget is spent. A request larger than
    /// the whole budget is let through once nothing else is in use, so it cannot wait forever.
    pub fn acquire(&self, len: usize) -> PooledBuf {
        let capacity = class_capacity(len);
        let mut state = self.lock();
        while state.bytes_in_use > 0 && state.bytes_in_use + capacity > self.inner.budget_bytes {
            state.waiters += 1;
            state = self
                .inner
                .freed
                .wait(state)
                .unwrap_or_else(|e| e.into_inner());
            state.waiters -= 1;
        }
        self.take_locked(&mut state, len, capacity)
    }

    /// Takes a buffer only if the budget allows it now.
    pub fn try_acquire(&self, len: usize) -> Option<PooledBuf> {
        let capacity = class_capacity(len);
        let mut state = self.lock();
        if state.bytes_in_use > 0 && state.bytes_in_use + capacity > self.inner.budget_bytes {
            return None;
        }
        Some(self.take_locked(&mut state, len, capacity))
    }

    fn take_locked(&self, state: &mut PoolState, len: usize, capacity: usize) -> PooledBuf {
        state.bytes_in_use += capacity;
        let cached = class_index(capacity).and_then(|class| state.idle[class].pop());
        let mut buf = cached.unwrap_or_else(|| AlignedBuf::uninit_zeroless(capacity));
        buf.set_len(len);
        PooledBuf {
            buf: Some(buf),
            pool: self.inner.clone(),
        }
    }

    pub fn usage(&self) -> PoolUsage {
        PoolUsage {
            budget_bytes: self.inner.budget_bytes,
            bytes_in_use: self.lock().bytes_in_use,
        }
    }
}

/// The capacity, hence the share of a pool's budget, of a pooled buffer of `len` bytes.
pub fn pooled_capacity(len: usize) -> usize {
    class_capacity(len)
}

fn class_capacity(len: usize) -> usize {
    round_up(len.max(1), IO_ALIGN).next_power_of_two()
}

fn class_index(capacity: usize) -> Option<usize> {
    let index = (capacity / IO_ALIGN).trailing_zeros() as usize;
    (index < SIZE_CLASSES).then_some(index)
}

/// A buffer on loan from a [`BufferPool`]; returned to it on drop.
pub struct PooledBuf {
    buf: Option<AlignedBuf>,
    pool: Arc<PoolInner>,
}

impl PooledBuf {
    pub fn set_len(&mut self, len: usize) {
        if let Some(buf) = self.buf.as_mut() {
            buf.set_len(len);
        }
    }

    pub fn spare_capacity(&mut self) -> &mut [u8] {
        match self.buf.as_mut() {
            Some(buf) => buf.spare_capacity(),
            None => &mut [],
        }
    }
}

impl Deref for PooledBuf {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        self.buf.as_deref().unwrap_or(&[])
    }
}

impl DerefMut for PooledBuf {
    fn deref_mut(&mut self) -> &mut [u8] {
        match self.buf.as_mut() {
            Some(buf) => buf,
            None => &mut [],
        }
    }
}

impl AsRef<[u8]> for PooledBuf {
    fn as_ref(&self) -> &[u8] {
        self
    }
}

impl AsMut<[u8]> for PooledBuf {
    fn as_mut(&mut self) -> &mut [u8] {
        self
    }
}

impl std::fmt::Debug for PooledBuf {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PooledBuf")
            .field("len", &self.len())
            .finish()
    }
}

impl Drop for PooledBuf {
    fn drop(&mut self) {
        let Some(buf) = self.buf.take() else { return };
        let capacity = buf.capacity();
        let mut state = self.pool.state.lock().unwrap_or_else(|e| e.into_inner());
        state.bytes_in_use -= capacity;
        if let Some(class) = class_index(capacity) {
            if state.idle[class].len() < MAX_IDLE_PER_CLASS {
                state.idle[class].push(buf);
            }
        }
        let wake = state.waiters > 0;
        drop(state);
        if wake {
            self.pool.freed.notify_all();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buffers_are_aligned_and_sized() {
        let pool = BufferPool::new(1 << 20);
        let buf = pool.acquire(5000);
        assert_eq!(buf.len(), 5000);
        assert_eq!(buf.as_ptr() as usize % IO_ALIGN, 0);
        assert_eq!(pool.usage().bytes_in_use, 8192);
        drop(buf);
        assert_eq!(pool.usage().bytes_in_use, 0);
    }

    #[test]
    fn budget_is_enforced_and_released() {
        let pool = BufferPool::new(16384);
        let a = pool.acquire(8192);
        let b = pool.acquire(8192);
        assert!(pool.try_acquire(4096).is_none());
        drop(a);
        assert!(pool.try_acquire(4096).is_some());
        drop(b);
    }

    #[test]
    fn oversize_request_passes_when_pool_is_idle() {
        let pool = BufferPool::new(4096);
        let big = pool.acquire(1 << 20);
        assert_eq!(big.len(), 1 << 20);
        assert!(pool.try_acquire(4096).is_none());
    }

    #[test]
    fn blocked_acquire_wakes_on_release() {
        let pool = BufferPool::new(8192);
        let held = pool.acquire(8192);
        let waiter = {
            let pool = pool.clone();
            std::thread::spawn(move || pool.acquire(4096).len())
        };
        drop(held);
        assert_eq!(waiter.join().expect("the waiter panicked"), 4096);
    }
}
