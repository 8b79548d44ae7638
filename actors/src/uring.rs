//! Local I/O through io_uring, driven from the device actor's own thread.
//!
//! Why: with one `spawn_blocking` per request, every local write cost two thread hand-offs (to
//! a pool thread and back), and on a two-core machine those wake-ups, not the I/O, were what a
//! write paid for most. Here the actor queues requests in the ring's submission queue, submits
//! everything queued in one system call per wake-up, and the tokio reactor wakes the same
//! thread when completions are posted, which it reaps in one go. No thread of ours sits between
//! the actor and the disk.
//!
//! Only whole, 4 KiB-aligned blocks in aligned buffers go through the ring (what `O_DIRECT`
//! accepts); everything else keeps using the store's own methods.

use std::cell::RefCell;
use std::collections::{BTreeMap, VecDeque};
use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::rc::Rc;

use io_uring::{opcode, squeue, types, IoUring};
use tokio::io::unix::AsyncFd;

use crate::buffer::{PooledBuf, IO_ALIGN};
use crate::io::SharedBuf;
use crate::ports::DirectAccess;

/// Submission queue entries. Requests beyond this wait in [`UringEngine::waiting`], so the
/// completion queue (twice as large) can never overflow.
const RING_ENTRIES: u32 = 256;

/// Bytes that stay at the same address while their owner lives, so the kernel may use them
/// after the owner was moved into the engine.
///
/// # Safety
/// `as_bytes` must return the same heap memory for as long as the value lives, however the
/// value itself is moved.
pub unsafe trait StableBytes: Send {
    fn as_bytes(&self) -> &[u8];
}

// SAFETY: a PooledBuf owns a heap allocation that never moves or shrinks while it lives.
unsafe impl StableBytes for PooledBuf {
    fn as_bytes(&self) -> &[u8] {
        self
    }
}

// SAFETY: the Arc keeps the PooledBuf, and so its allocation, alive and in place.
unsafe impl StableBytes for SharedBuf {
    fn as_bytes(&self) -> &[u8] {
        self
    }
}

/// What one ring operation reads into or writes from; handed back on completion.
pub enum UringBuf {
    /// A read fills the whole buffer.
    Read(PooledBuf),
    Write(Box<dyn StableBytes>),
    /// `fdatasync`.
    Flush,
}

/// One finished operation.
pub struct UringDone {
    pub token: u64,
    pub buf: UringBuf,
    /// The errno on failure.
    pub result: Result<(), i32>,
}

struct Op {
    offset: u64,
    buf: UringBuf,
    /// Bytes already transferred (a short transfer is resubmitted for the rest).
    done: usize,
}

impl Op {
    fn entry(&mut self, fd: RawFd, token: u64) -> squeue::Entry {
        let fd = types::Fd(fd);
        let offset = self.offset + self.done as u64;
        let done = self.done;
        match &mut self.buf {
            UringBuf::Read(buf) => {
                let rest = &mut buf[done..];
                opcode::Read::new(fd, rest.as_mut_ptr(), rest.len() as u32)
                    .offset(offset)
                    .build()
            }
            UringBuf::Write(data) => {
                let rest = &data.as_bytes()[done..];
                opcode::Write::new(fd, rest.as_ptr(), rest.len() as u32)
                    .offset(offset)
                    .build()
            }
            UringBuf::Flush => opcode::Fsync::new(fd)
                .flags(types::FsyncFlags::DATASYNC)
                .build(),
        }
        .user_data(token)
    }

    fn len(&self) -> usize {
        match &self.buf {
            UringBuf::Read(buf) => buf.len(),
            UringBuf::Write(data) => data.as_bytes().len(),
            UringBuf::Flush => 0,
        }
    }
}

/// The ring, owned jointly by the engine and the reactor registration that watches it, so its
/// descriptor is closed only after the registration is gone.
struct Ring(RefCell<IoUring>);

impl AsRawFd for Ring {
    fn as_raw_fd(&self) -> RawFd {
        self.0.borrow().as_raw_fd()
    }
}

/// One ring per volume. Not `Send`: it lives on the actor's thread.
pub struct UringEngine {
    ring: Rc<AsyncFd<Ring>>,
    access: DirectAccess,
    /// Operations at the kernel, by token.
    in_flight: BTreeMap<u64, Op>,
    /// Operations waiting for room in the ring.
    waiting: VecDeque<(u64, Op)>,
    /// Entries pushed since the last submit.
    unsubmitted: usize,
    /// Scratch for the completion queue's entries, kept to spare an allocation per reap.
    posted: Vec<(u64, i32)>,
}

impl UringEngine {
    /// A ring for the store behind `access`, registered with the current tokio reactor. Must be
    /// called on the thread that will use it (inside the actor's runtime).
    pub fn new(access: DirectAccess) -> io::Result<UringEngine> {
        let ring = IoUring::new(RING_ENTRIES)?;
        // SAFETY: the ring's descriptor stays open and unreplaced while the AsyncFd owns it.
        let ring = unsafe {
            AsyncFd::register_with_interest(
                Ring(RefCell::new(ring)),
                tokio::io::Interest::READABLE,
            )?
        };
        Ok(UringEngine {
            ring: Rc::new(ring),
            access,
            in_flight: BTreeMap::new(),
            waiting: VecDeque::new(),
            unsubmitted: 0,
            posted: Vec::new(),
        })
    }

    /// Whether reading into or writing from `bytes` at `offset` may go through the ring:
    /// whole 4 KiB blocks, an aligned buffer, below the store's limit.
    pub fn accepts(&self, offset: u64, bytes: &[u8]) -> bool {
        let align = IO_ALIGN as u64;
        let len = bytes.len() as u64;
        len > 0
            && offset % align == 0
            && len % align == 0
            && (bytes.as_ptr() as usize) % IO_ALIGN == 0
            && offset
                .checked_add(len)
                .is_some_and(|end| end <= self.access.limit)
    }

    /// Queues an operation; it reaches the kernel at the next [`UringEngine::submit`]. An
    /// operation the ring does not accept ([`UringEngine::accepts`]) is handed back.
    pub fn push(&mut self, token: u64, offset: u64, buf: UringBuf) -> Result<(), UringBuf> {
        let accepted = match &buf {
            UringBuf::Read(read) => self.accepts(offset, read),
            UringBuf::Write(data) => self.accepts(offset, data.as_bytes()),
            UringBuf::Flush => true,
        };
        if !accepted {
            return Err(buf);
        }
        self.waiting.push_back((
            token,
            Op {
                offset,
                buf,
                done: 0,
            },
        ));
        self.fill();
        Ok(())
    }

    /// Moves waiting operations into the submission queue while the ring has room.
    fn fill(&mut self) {
        while self.in_flight.len() < RING_ENTRIES as usize {
            let Some((token, mut op)) = self.waiting.pop_front() else {
                break;
            };
            let entry = op.entry(self.access.fd, token);
            let mut ring = self.ring.get_ref().0.borrow_mut();
            // SAFETY: the entry points into `op`'s buffer, which stays in `in_flight` (its
            // heap memory unmoved, see StableBytes) until the kernel reports completion;
            // `Drop` waits for every operation still at the kernel.
            let pushed = unsafe { ring.submission().push(&entry) };
            drop(ring);
            if pushed.is_err() {
                // The queue holds unsubmitted entries from earlier: submit them and retry.
                self.waiting.push_front((token, op));
                if self.submit_now().is_err() {
                    break;
                }
                continue;
            }
            self.unsubmitted += 1;
            self.in_flight.insert(token, op);
        }
    }

    /// Hands every queued entry to the kernel in one system call.
    pub fn submit(&mut self) {
        if let Err(error) = self.submit_now() {
            // The entries stay queued and go with the next submit.
            tracing::warn!(%error, "io_uring submit failed");
        }
    }

    fn submit_now(&mut self) -> io::Result<()> {
        if self.unsubmitted == 0 {
            return Ok(());
        }
        loop {
            match self.ring.get_ref().0.borrow().submit() {
                Ok(_) => {
                    self.unsubmitted = 0;
                    return Ok(());
                }
                Err(error) if error.raw_os_error() == Some(EINTR) => continue,
                Err(error) => return Err(error),
            }
        }
    }

    /// Whether there are entries to submit.
    pub fn has_unsubmitted(&self) -> bool {
        self.unsubmitted > 0
    }

    /// Collects every posted completion. Short transfers are resubmitted for their rest and
    /// reported only when whole.
    pub fn reap(&mut self, done: &mut Vec<UringDone>) {
        let mut finished = std::mem::take(&mut self.posted);
        {
            let mut ring = self.ring.get_ref().0.borrow_mut();
            finished.extend(ring.completion().map(|cqe| (cqe.user_data(), cqe.result())));
        }
        for (token, result) in finished.drain(..) {
            let Some(mut op) = self.in_flight.remove(&token) else {
                tracing::error!(token, "io_uring completion for an unknown operation");
                continue;
            };
            let outcome = if result < 0 {
                Err(-result)
            } else {
                op.done += result as usize;
                let whole = matches!(op.buf, UringBuf::Flush) || op.done >= op.len();
                if !whole && result > 0 {
                    self.waiting.push_front((token, op));
                    continue;
                }
                // No progress on a read means end of file: the store is shorter than its
                // size says.
                if whole {
                    Ok(())
                } else {
                    Err(EIO)
                }
            };
            done.push(UringDone {
                token,
                buf: op.buf,
                result: outcome,
            });
        }
        self.posted = finished;
        self.fill();
    }

    /// Operations at the kernel or waiting for room.
    pub fn outstanding(&self) -> usize {
        self.in_flight.len() + self.waiting.len()
    }

    /// A stream that yields each time completions may be waiting. The caller reaps them then.
    pub fn readiness(&self) -> impl futures::Stream<Item = ()> + 'static {
        let ring = Rc::clone(&self.ring);
        futures::stream::unfold(ring, |ring| async move {
            match ring.readable().await {
                Ok(mut guard) => {
                    // Cleared before the caller reaps: a completion posted after this point
                    // wakes the reactor again, so none is left behind.
                    guard.clear_ready();
                    drop(guard);
                    Some(((), ring))
                }
                Err(error) => {
                    tracing::error!(%error, "io_uring readiness failed");
                    None
                }
            }
        })
    }
}

impl Drop for UringEngine {
    fn drop(&mut self) {
        // The kernel may still be reading or writing buffers this engine owns: wait for every
        // submitted operation before they are freed.
        self.waiting.clear();
        let _ = self.submit_now();
        let mut spare = Vec::new();
        while !self.in_flight.is_empty() {
            let waited = self.ring.get_ref().0.borrow().submit_and_wait(1);
            if let Err(error) = waited {
                if error.raw_os_error() != Some(EINTR) {
                    tracing::error!(%error, pending = self.in_flight.len(),
                        "cannot wait for io_uring operations; leaking their buffers");
                    for (_, op) in std::mem::take(&mut self.in_flight) {
                        std::mem::forget(op);
                    }
                    return;
                }
            }
            self.reap(&mut spare);
            self.waiting.clear();
            spare.clear();
        }
    }
}

/// errno values (this crate does not link libc).
const EINTR: i32 = 4;
const EIO: i32 = 5;

#[cfg(test)]
mod tests {
    use super::*;
    use crate::buffer::BufferPool;
    use std::os::unix::fs::OpenOptionsExt;

    fn reap_all(engine: &mut UringEngine, want: usize) -> Vec<UringDone> {
        let mut done = Vec::new();
        while done.len() < want {
            engine.submit();
            engine
                .ring
                .get_ref()
                .0
                .borrow()
                .submit_and_wait(1)
                .expect("wait");
            engine.reap(&mut done);
        }
        done
    }

    #[tokio::test(flavor = "current_thread")]
    async fn writes_reads_and_flushes_a_direct_file() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("disk");
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .custom_flags(0o40000) // O_DIRECT on x86_64 and aarch64
            .open(&path)
            .expect("open");
        file.set_len(1 << 20).expect("size");
        let mut engine = UringEngine::new(DirectAccess {
            fd: file.as_raw_fd(),
            limit: 1 << 20,
        })
        .expect("ring");
        let pool = BufferPool::new(1 << 20);
        for block in 0..64u64 {
            let mut buf = pool.acquire(4096);
            buf.set_len(4096);
            buf.fill(block as u8 + 1);
            let buf: SharedBuf = std::sync::Arc::new(buf);
            assert!(engine
                .push(block, block * 4096, UringBuf::Write(Box::new(buf)))
                .is_ok());
        }
        let done = reap_all(&mut engine, 64);
        assert!(done.iter().all(|d| d.result.is_ok()));
        assert!(engine.push(100, 0, UringBuf::Flush).is_ok());
        assert!(reap_all(&mut engine, 1)[0].result.is_ok());

        let mut read = pool.acquire(8192);
        read.set_len(8192);
        assert!(engine.push(7, 4096 * 10, UringBuf::Read(read)).is_ok());
        let done = reap_all(&mut engine, 1);
        let UringBuf::Read(read) = &done[0].buf else {
            panic!("read came back as another kind");
        };
        assert!(read[..4096].iter().all(|&b| b == 11));
        assert!(read[4096..].iter().all(|&b| b == 12));
        drop(engine);
        let bytes = std::fs::read(&path).expect("read back");
        assert_eq!(bytes[63 * 4096], 64);
    }

    #[tokio::test(flavor = "current_thread")]
    async fn unaligned_and_out_of_limit_requests_are_handed_back() {
        let dir = tempfile::tempdir().expect("tempdir");
        let file = std::fs::File::create(dir.path().join("disk")).expect("create");
        let mut engine = UringEngine::new(DirectAccess {
            fd: file.as_raw_fd(),
            limit: 8192,
        })
        .expect("ring");
        let pool = BufferPool::new(1 << 20);
        let mut block = pool.acquire(4096);
        block.set_len(4096);
        let unaligned = engine.push(1, 512, UringBuf::Write(Box::new(block)));
        assert!(matches!(unaligned, Err(UringBuf::Write(_))));
        let mut buf = pool.acquire(4096);
        buf.set_len(4096);
        let beyond = engine.push(2, 8192, UringBuf::Read(buf));
        assert!(matches!(beyond, Err(UringBuf::Read(_))));
        assert_eq!(engine.outstanding(), 0);
    }

    #[tokio::test(flavor = "current_thread")]
    async fn errors_come_back_as_errno() {
        let dir = tempfile::tempdir().expect("tempdir");
        // Read-only descriptor: writes fail with EBADF.
        std::fs::write(dir.path().join("disk"), vec![0u8; 8192]).expect("create");
        let file = std::fs::File::open(dir.path().join("disk")).expect("open");
        let mut engine = UringEngine::new(DirectAccess {
            fd: file.as_raw_fd(),
            limit: 8192,
        })
        .expect("ring");
        let pool = BufferPool::new(1 << 20);
        let mut buf = pool.acquire(4096);
        buf.set_len(4096);
        assert!(engine.push(1, 0, UringBuf::Write(Box::new(buf))).is_ok());
        let done = reap_all(&mut engine, 1);
        assert_eq!(done[0].result, Err(9));
    }
}
