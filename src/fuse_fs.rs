//! The FUSE front end: a flat directory with one `<resource>.img` per resource that is up.
//!
//! Each session thread turns a kernel request into a [`SubmitIo`] for the image's DeviceActor,
//! with the reply object inside, and goes back to reading requests: many requests are in flight
//! at once. Write data is copied once, into a buffer from the image's own [`BufferPool`]; the
//! pool's budget bounds what the image has in flight, which bounds the daemon's memory and
//! throttles writers when the disk (or a peer) is slow.
//!
//! Every image has a budget of its own, and the session thread never waits for one: it serves
//! every image, so waiting for the buffers of an image whose
//! requests are held (`suspend-io`, a stuck disk) would stall every other image too. A request
//! that finds its image's budget spent is queued instead, and a thread of that image takes
//! buffers for the queue, in order, as the image's requests complete (see [`ImageBuffers`]).

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::ffi::OsStr;
use std::io;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, RwLock};
use std::time::{Duration, Instant, SystemTime};

use actix::Addr;
use fuser::{
    Errno, FileAttr, FileHandle, FileType, Filesystem, FopenFlags, Generation, INodeNo, InitFlags,
    KernelConfig, LockOwner, OpenAccMode, OpenFlags, ReplyAttr, ReplyCreate, ReplyData,
    ReplyDirectory, ReplyEmpty, ReplyEntry, ReplyOpen, ReplyStatfs, ReplyWrite, Request, TimeOrNow,
    WriteFlags,
};
use qrbd_actors::buffer::{BufferPool, PooledBuf};
use qrbd_actors::core::IoFault;
use qrbd_actors::device::{DeviceActor, IoDone, IoOp, IoReply, SubmitIo};
use qrbd_actors::gate::{ImageGate, OpenRefused};

/// Largest write the kernel sends in one request.
pub const MAX_WRITE: u32 = 1 << 20;
/// The kernel may keep this many background requests (async direct I/O) in flight. The limit is
/// the mount's, not an image's: an image holding this many (suspend-io under a loop device or
/// aio) makes the kernel queue the other images' async requests too, before they reach us.
const MAX_BACKGROUND: u16 = 128;
const ATTR_TTL: Duration = Duration::from_secs(1);
const FALLOC_FL_KEEP_SIZE: i32 = 0x01;
const FALLOC_FL_PUNCH_HOLE: i32 = 0x02;
const FALLOC_FL_ZERO_RANGE: i32 = 0x10;

/// One image in the directory.
pub struct ImageEntry {
    pub resource: String,
    pub ino: u64,
    pub size: u64,
    pub device: Addr<DeviceActor>,
    pub gate: Arc<ImageGate>,
    buffers: ImageBuffers,
}

impl ImageEntry {
    fn file_name(&self) -> String {
        image_file_name(&self.resource)
    }
}

/// The buffers of one image: a budget of its own, so that the requests one image holds cannot
/// spend the buffers of another, and the requests that found that budget spent.
///
/// Queued requests keep no pool buffer, but a queued write keeps a copy of its data: the
/// kernel's copy lives in the session thread's receive buffer, which the next request
/// overwrites. Those copies are bounded by what the kernel has outstanding: at most
/// `MAX_BACKGROUND` asynchronous requests (loop devices, aio) for the whole mount, plus one per
/// thread blocked in a synchronous write, which holds a buffer of that size itself.
struct ImageBuffers {
    pool: BufferPool,
    waiting: Mutex<Waiting>,
}

#[derive(Default)]
struct Waiting {
    queue: VecDeque<WaitingIo>,
    /// A thread is taking buffers for the queue. While it runs, new requests join the queue
    /// rather than overtake it with `try_acquire`, so a large request is not starved by a
    /// stream of small ones. Always true while the queue is not empty.
    draining: bool,
}

/// A request waiting for a buffer of its image.
enum WaitingIo {
    Read {
        offset: u64,
        len: usize,
        reply: ReplyData,
    },
    Write {
        offset: u64,
        data: Vec<u8>,
        reply: ReplyWrite,
    },
}

impl WaitingIo {
    fn fail(self, errno: Errno) {
        match self {
            WaitingIo::Read { reply, .. } => reply.error(errno),
            WaitingIo::Write { reply, .. } => reply.error(errno),
        }
    }
}

impl ImageBuffers {
    fn new(budget_bytes: usize) -> Self {
        ImageBuffers {
            pool: BufferPool::new(budget_bytes),
            waiting: Mutex::new(Waiting::default()),
        }
    }

    fn waiting(&self) -> MutexGuard<'_, Waiting> {
        // The queue stays consistent whatever panicked while holding the lock; keep going.
        self.waiting.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A buffer if the budget allows one now and nothing is queued before it; never waits.
    fn try_take(&self, len: usize) -> Option<PooledBuf> {
        let waiting = self.waiting();
        if waiting.draining {
            return None;
        }
        self.pool.try_acquire(len)
    }
}

/// Queues a request that found its image's budget spent, and starts the image's thread that
/// takes buffers for the queue if it is not running.
fn queue_for_buffer(entry: &Arc<ImageEntry>, io: WaitingIo) {
    let mut waiting = entry.buffers.waiting();
    waiting.queue.push_back(io);
    if waiting.draining {
        return;
    }
    tracing::debug!(image = %entry.file_name(), "buffer budget spent; requests wait for buffers");
    let drainer = entry.clone();
    let started = std::thread::Builder::new()
        .name("qrbd-budget".to_owned())
        .spawn(move || take_buffers_for_queue(drainer));
    match started {
        Ok(_) => waiting.draining = true,
        Err(error) => {
            // No thread to wait on: answer now rather than leave the requests unanswered.
            tracing::error!(image = %entry.file_name(), %error, "cannot start a thread to wait for buffers; failing the waiting requests");
            let refused: Vec<WaitingIo> = waiting.queue.drain(..).collect();
            drop(waiting);
            for io in refused {
                io.fail(Errno::ENOMEM);
            }
        }
    }
}

/// The body of an image's waiting thread: takes a buffer for each queued request in order,
/// waiting for the image's budget (and only that image's), and submits it. Ends when the
/// queue is empty.
fn take_buffers_for_queue(entry: Arc<ImageEntry>) {
    loop {
        let io = {
            let mut waiting = entry.buffers.waiting();
            match waiting.queue.pop_front() {
                Some(io) => io,
                None => {
                    waiting.draining = false;
                    return;
                }
            }
        };
        match io {
            WaitingIo::Read { offset, len, reply } => {
                let buf = entry.buffers.pool.acquire(len);
                submit_read(&entry, offset, buf, reply);
            }
            WaitingIo::Write {
                offset,
                data,
                reply,
            } => {
                let mut buf = entry.buffers.pool.acquire(data.len());
                buf.copy_from_slice(&data);
                drop(data);
                submit_write(&entry, offset, buf, reply);
            }
        }
    }
}

fn submit_read(entry: &ImageEntry, offset: u64, buf: PooledBuf, reply: ReplyData) {
    let reply_fn: IoReply = Box::new(move |outcome| match outcome {
        Ok(IoDone::Read(buf)) => reply.data(&buf),
        Ok(_) => reply.error(unexpected_outcome("read")),
        Err(fault) => reply.error(fault_errno(fault)),
    });
    DiskFs::submit(entry, IoOp::Read { offset, buf }, reply_fn);
}

fn submit_write(entry: &ImageEntry, offset: u64, buf: PooledBuf, reply: ReplyWrite) {
    let reply_fn: IoReply = Box::new(move |outcome| match outcome {
        Ok(IoDone::Written(len)) => reply.written(len),
        Ok(_) => reply.error(unexpected_outcome("write")),
        Err(fault) => reply.error(fault_errno(fault)),
    });
    DiskFs::submit(
        entry,
        IoOp::Write {
            offset,
            data: Arc::new(buf),
        },
        reply_fn,
    );
}

pub fn image_file_name(resource: &str) -> String {
    format!("{resource}.img")
}

/// The images currently exposed, shared between the node (which adds and removes them as
/// resources go up and down) and the session threads.
pub struct ImageTable {
    by_ino: BTreeMap<u64, Arc<ImageEntry>>,
    next_ino: u64,
    /// The buffer budget each image gets.
    image_budget: usize,
}

pub type SharedImageTable = Arc<RwLock<ImageTable>>;

impl ImageTable {
    /// An empty table whose images get `image_budget` bytes of buffers each.
    pub fn shared(image_budget: usize) -> SharedImageTable {
        Arc::new(RwLock::new(ImageTable {
            by_ino: BTreeMap::new(),
            // Inode 1 is the root directory.
            next_ino: 2,
            image_budget,
        }))
    }

    pub fn insert(
        &mut self,
        resource: &str,
        size: u64,
        device: Addr<DeviceActor>,
        gate: Arc<ImageGate>,
    ) {
        self.remove(resource);
        let ino = self.next_ino;
        self.next_ino += 1;
        self.by_ino.insert(
            ino,
            Arc::new(ImageEntry {
                resource: resource.to_owned(),
                ino,
                size,
                device,
                gate,
                buffers: ImageBuffers::new(self.image_budget),
            }),
        );
    }

    pub fn remove(&mut self, resource: &str) {
        self.by_ino.retain(|_, entry| entry.resource != resource);
    }

    fn by_name(&self, file_name: &OsStr) -> Option<Arc<ImageEntry>> {
        self.by_ino
            .values()
            .find(|entry| OsStr::new(&entry.file_name()) == file_name)
            .cloned()
    }
}

struct OpenHandle {
    entry: Arc<ImageEntry>,
    writable: bool,
}

/// The mounted filesystem.
pub struct DiskFs {
    images: SharedImageTable,
    handles: Mutex<HashMap<u64, OpenHandle>>,
    next_handle: AtomicU64,
    mounted_at: SystemTime,
}

impl DiskFs {
    pub fn new(images: SharedImageTable) -> Self {
        DiskFs {
            images,
            handles: Mutex::new(HashMap::new()),
            next_handle: AtomicU64::new(1),
            mounted_at: SystemTime::now(),
        }
    }

    fn image(&self, ino: INodeNo) -> Option<Arc<ImageEntry>> {
        let images = self.images.read().unwrap_or_else(|e| e.into_inner());
        images.by_ino.get(&ino.0).cloned()
    }

    /// The image of a handle opened for writing; EBADF for unknown or read-only handles.
    fn writable_handle(&self, fh: FileHandle) -> Result<Arc<ImageEntry>, Errno> {
        match self.handle(fh) {
            Some((entry, true)) => Ok(entry),
            _ => Err(Errno::EBADF),
        }
    }

    fn handle(&self, fh: FileHandle) -> Option<(Arc<ImageEntry>, bool)> {
        let handles = self.handles.lock().unwrap_or_else(|e| e.into_inner());
        handles
            .get(&fh.0)
            .map(|handle| (handle.entry.clone(), handle.writable))
    }

    fn root_attr(&self) -> FileAttr {
        FileAttr {
            ino: INodeNo::ROOT,
            size: 0,
            blocks: 0,
            atime: self.mounted_at,
            mtime: self.mounted_at,
            ctime: self.mounted_at,
            crtime: self.mounted_at,
            kind: FileType::Directory,
            perm: 0o755,
            nlink: 2,
            uid: 0,
            gid: 0,
            rdev: 0,
            blksize: 4096,
            flags: 0,
        }
    }

    fn image_attr(&self, entry: &ImageEntry) -> FileAttr {
        FileAttr {
            ino: INodeNo(entry.ino),
            size: entry.size,
            blocks: entry.size / 512,
            atime: self.mounted_at,
            mtime: self.mounted_at,
            ctime: self.mounted_at,
            crtime: self.mounted_at,
            kind: FileType::RegularFile,
            perm: 0o660,
            nlink: 1,
            uid: 0,
            gid: 0,
            rdev: 0,
            blksize: 4096,
            flags: 0,
        }
    }

    fn submit(entry: &ImageEntry, op: IoOp, reply: IoReply) {
        // do_send skips the mailbox bound; the image's buffer pool bounds what is in flight
        // instead, and a session thread must never wait on the actor (it would stall every
        // image).
        entry.device.do_send(SubmitIo {
            op,
            reply,
            issued: Instant::now(),
        });
    }
}

/// The errno an application sees for each failure.
pub fn fault_errno(fault: IoFault) -> Errno {
    match fault {
        IoFault::BeyondEnd => Errno::ENOSPC,
        IoFault::ReadOnly => Errno::EROFS,
        IoFault::Closed => Errno::ENODEV,
        IoFault::LocalIo(errno) => Errno::from_i32(errno),
    }
}

fn unexpected_outcome(what: &str) -> Errno {
    tracing::error!(what, "device answered with the wrong kind of result");
    Errno::EIO
}

impl Filesystem for DiskFs {
    fn init(&mut self, _req: &Request, config: &mut KernelConfig) -> io::Result<()> {
        if let Err(nearest) = config.set_max_write(MAX_WRITE) {
            tracing::warn!(nearest, "kernel refused max_write of 1 MiB");
        }
        if let Err(nearest) = config.set_max_readahead(MAX_WRITE) {
            tracing::debug!(nearest, "kernel limited max_readahead");
        }
        if let Err(unsupported) = config.add_capabilities(InitFlags::FUSE_ASYNC_DIO) {
            tracing::warn!(?unsupported, "kernel lacks asynchronous direct I/O");
        }
        if let Err(nearest) = config.set_max_background(MAX_BACKGROUND) {
            tracing::debug!(nearest, "kernel limited max_background");
        }
        let _ = config.set_congestion_threshold(MAX_BACKGROUND / 4 * 3);
        Ok(())
    }

    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        if parent != INodeNo::ROOT {
            return reply.error(Errno::ENOENT);
        }
        let found = self
            .images
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .by_name(name);
        match found {
            Some(entry) => reply.entry(&ATTR_TTL, &self.image_attr(&entry), Generation(0)),
            None => reply.error(Errno::ENOENT),
        }
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        if ino == INodeNo::ROOT {
            return reply.attr(&ATTR_TTL, &self.root_attr());
        }
        match self.image(ino) {
            Some(entry) => reply.attr(&ATTR_TTL, &self.image_attr(&entry)),
            None => reply.error(Errno::ENOENT),
        }
    }

    fn setattr(
        &self,
        _req: &Request,
        ino: INodeNo,
        mode: Option<u32>,
        uid: Option<u32>,
        gid: Option<u32>,
        size: Option<u64>,
        _atime: Option<TimeOrNow>,
        _mtime: Option<TimeOrNow>,
        _ctime: Option<SystemTime>,
        _fh: Option<FileHandle>,
        _crtime: Option<SystemTime>,
        _chgtime: Option<SystemTime>,
        _bkuptime: Option<SystemTime>,
        _flags: Option<fuser::BsdFileFlags>,
        reply: ReplyAttr,
    ) {
        let Some(entry) = self.image(ino) else {
            return reply.error(Errno::ENOENT);
        };
        if let Some(size) = size.filter(|size| *size != entry.size) {
            tracing::warn!(
                image = %entry.file_name(),
                requested = size,
                size = entry.size,
                "refusing to resize a disk image; its size is fixed by the configuration"
            );
            return reply.error(Errno::EPERM);
        }
        if mode.is_some() || uid.is_some() || gid.is_some() {
            tracing::warn!(image = %entry.file_name(), "refusing to change mode or owner of a disk image");
            return reply.error(Errno::EPERM);
        }
        // Timestamps are accepted and ignored: tools like touch should not fail.
        reply.attr(&ATTR_TTL, &self.image_attr(&entry));
    }

    fn open(&self, _req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        let Some(entry) = self.image(ino) else {
            return reply.error(Errno::ENOENT);
        };
        let writable = flags.acc_mode() != OpenAccMode::O_RDONLY;
        if let Err(refused) = entry.gate.open(writable) {
            tracing::warn!(image = %entry.file_name(), %refused, "refusing to open");
            return reply.error(match refused {
                OpenRefused::NotPrimary => Errno::EROFS,
                OpenRefused::GoingDown => Errno::ENODEV,
            });
        }
        let fh = self.next_handle.fetch_add(1, Ordering::Relaxed);
        self.handles
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(fh, OpenHandle { entry, writable });
        reply.opened(
            FileHandle(fh),
            // No flush on close: with direct I/O nothing is cached to write back, and a close
            // must not be held by suspend-io (the kernel waits for it uninterruptibly, and so
            // does every exec of a process holding the image). fsync still flushes.
            FopenFlags::FOPEN_DIRECT_IO
                | FopenFlags::FOPEN_PARALLEL_DIRECT_WRITES
                | FopenFlags::FOPEN_NOFLUSH,
        );
    }

    fn read(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        let Some((entry, _)) = self.handle(fh) else {
            return reply.error(Errno::EBADF);
        };
        // Reads at or past the end see end-of-file, as with any regular file.
        let len = entry.size.saturating_sub(offset).min(u64::from(size));
        if len == 0 {
            return reply.data(&[]);
        }
        // At most `size`, a u32.
        let len = len as usize;
        match entry.buffers.try_take(len) {
            Some(buf) => submit_read(&entry, offset, buf, reply),
            None => queue_for_buffer(&entry, WaitingIo::Read { offset, len, reply }),
        }
    }

    fn write(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        data: &[u8],
        _write_flags: WriteFlags,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyWrite,
    ) {
        let entry = match self.writable_handle(fh) {
            Ok(entry) => entry,
            Err(errno) => return reply.error(errno),
        };
        let fits = offset
            .checked_add(data.len() as u64)
            .is_some_and(|end| end <= entry.size);
        if !fits {
            tracing::debug!(image = %entry.file_name(), offset, len = data.len(), "write beyond the end");
            return reply.error(Errno::ENOSPC);
        }
        match entry.buffers.try_take(data.len()) {
            Some(mut buf) => {
                buf.copy_from_slice(data);
                submit_write(&entry, offset, buf, reply);
            }
            None => queue_for_buffer(
                &entry,
                WaitingIo::Write {
                    offset,
                    data: data.to_vec(),
                    reply,
                },
            ),
        }
    }

    fn flush(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        _lock_owner: LockOwner,
        reply: ReplyEmpty,
    ) {
        self.flush_handle(fh, reply);
    }

    fn fsync(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        _datasync: bool,
        reply: ReplyEmpty,
    ) {
        self.flush_handle(fh, reply);
    }

    fn release(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        _flush: bool,
        reply: ReplyEmpty,
    ) {
        let handle = self
            .handles
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&fh.0);
        if let Some(handle) = handle {
            handle.entry.gate.release(handle.writable);
        }
        reply.ok();
    }

    fn fallocate(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        length: u64,
        mode: i32,
        reply: ReplyEmpty,
    ) {
        let entry = match self.writable_handle(fh) {
            Ok(entry) => entry,
            Err(errno) => return reply.error(errno),
        };
        let Some(end) = offset.checked_add(length) else {
            return reply.error(Errno::EINVAL);
        };
        let discards = mode & (FALLOC_FL_PUNCH_HOLE | FALLOC_FL_ZERO_RANGE) != 0;
        let known = FALLOC_FL_KEEP_SIZE | FALLOC_FL_PUNCH_HOLE | FALLOC_FL_ZERO_RANGE;
        if mode & !known != 0
            || (mode & FALLOC_FL_PUNCH_HOLE != 0 && mode & FALLOC_FL_KEEP_SIZE == 0)
        {
            tracing::debug!(mode, "unsupported fallocate mode");
            return reply.error(Errno::EOPNOTSUPP);
        }
        if end > entry.size {
            // A disk image cannot grow; discarding past its end is a caller's mistake.
            return reply.error(if discards {
                Errno::EINVAL
            } else {
                Errno::ENOSPC
            });
        }
        if !discards || length == 0 {
            // Plain preallocation inside the image: the image is fixed-size, nothing to do.
            return reply.ok();
        }
        let reply_fn: IoReply = Box::new(move |outcome| match outcome {
            Ok(IoDone::Discarded) => reply.ok(),
            Ok(_) => reply.error(unexpected_outcome("discard")),
            Err(fault) => reply.error(fault_errno(fault)),
        });
        DiskFs::submit(
            &entry,
            IoOp::Discard {
                offset,
                len: length,
            },
            reply_fn,
        );
    }

    fn readdir(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectory,
    ) {
        if ino != INodeNo::ROOT {
            return reply.error(Errno::ENOTDIR);
        }
        let mut entries = vec![
            (INodeNo::ROOT, FileType::Directory, ".".to_owned()),
            (INodeNo::ROOT, FileType::Directory, "..".to_owned()),
        ];
        {
            let images = self.images.read().unwrap_or_else(|e| e.into_inner());
            entries.extend(
                images
                    .by_ino
                    .values()
                    .map(|entry| (INodeNo(entry.ino), FileType::RegularFile, entry.file_name())),
            );
        }
        for (index, (ino, kind, name)) in entries.into_iter().enumerate().skip(offset as usize) {
            if reply.add(ino, index as u64 + 1, kind, name) {
                break;
            }
        }
        reply.ok();
    }

    fn statfs(&self, _req: &Request, _ino: INodeNo, reply: ReplyStatfs) {
        let images = self.images.read().unwrap_or_else(|e| e.into_inner());
        let blocks: u64 = images.by_ino.values().map(|entry| entry.size / 4096).sum();
        let files = images.by_ino.len() as u64;
        reply.statfs(blocks, 0, 0, files, 0, 4096, 255, 4096);
    }

    fn create(
        &self,
        _req: &Request,
        _parent: INodeNo,
        name: &OsStr,
        _mode: u32,
        _umask: u32,
        _flags: i32,
        reply: ReplyCreate,
    ) {
        tracing::warn!(
            ?name,
            "refusing to create a file: images come from the configuration"
        );
        reply.error(Errno::EPERM);
    }

    fn mknod(
        &self,
        _req: &Request,
        _parent: INodeNo,
        name: &OsStr,
        _mode: u32,
        _umask: u32,
        _rdev: u32,
        reply: ReplyEntry,
    ) {
        tracing::warn!(
            ?name,
            "refusing to create a file: images come from the configuration"
        );
        reply.error(Errno::EPERM);
    }

    fn mkdir(
        &self,
        _req: &Request,
        _parent: INodeNo,
        _name: &OsStr,
        _mode: u32,
        _umask: u32,
        reply: ReplyEntry,
    ) {
        reply.error(Errno::EPERM);
    }

    fn unlink(&self, _req: &Request, _parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        tracing::warn!(
            ?name,
            "refusing to delete an image: use `qrbd down` instead"
        );
        reply.error(Errno::EPERM);
    }

    fn rmdir(&self, _req: &Request, _parent: INodeNo, _name: &OsStr, reply: ReplyEmpty) {
        reply.error(Errno::EPERM);
    }

    fn rename(
        &self,
        _req: &Request,
        _parent: INodeNo,
        name: &OsStr,
        _newparent: INodeNo,
        _newname: &OsStr,
        _flags: fuser::RenameFlags,
        reply: ReplyEmpty,
    ) {
        tracing::warn!(
            ?name,
            "refusing to rename an image: names come from the configuration"
        );
        reply.error(Errno::EPERM);
    }
}

impl DiskFs {
    fn flush_handle(&self, fh: FileHandle, reply: ReplyEmpty) {
        let Some((entry, writable)) = self.handle(fh) else {
            return reply.error(Errno::EBADF);
        };
        if !writable {
            // Nothing this handle wrote can be pending.
            return reply.ok();
        }
        let reply_fn: IoReply = Box::new(move |outcome| match outcome {
            Ok(IoDone::Flushed) => reply.ok(),
            Ok(_) => reply.error(unexpected_outcome("flush")),
            Err(fault) => reply.error(fault_errno(fault)),
        });
        DiskFs::submit(&entry, IoOp::Flush, reply_fn);
    }
}

/// Mounts the filesystem with one session thread.
///
/// Why one: a session thread only copies a request's data into a pooled buffer and hands it to
/// the device actor, and it never waits (see the module docs), so one keeps up with the whole
/// pipeline. A second one mostly added wake-ups: with two, replicated 4 KiB random writes cost
/// the Primary about 17 % more CPU per write in three back-to-back comparisons, with no gain
/// elsewhere beyond the noise (benches/README.md).
const SESSION_THREADS: usize = 1;

pub fn mount(fs: DiskFs, mount_dir: &Path) -> io::Result<fuser::BackgroundSession> {
    let mut config = fuser::Config::default();
    config.mount_options = vec![
        fuser::MountOption::FSName("qrbd".to_owned()),
        fuser::MountOption::Subtype("qrbd".to_owned()),
        fuser::MountOption::NoAtime,
        fuser::MountOption::NoExec,
        fuser::MountOption::NoSuid,
        fuser::MountOption::NoDev,
    ];
    config.n_threads = Some(SESSION_THREADS);
    fuser::Session::new(fs, mount_dir, &config)?.spawn()
}
