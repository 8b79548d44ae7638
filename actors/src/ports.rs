//! The ports the actor system needs from the outside world. `qrbd` implements them with real
//! I/O (an O_DIRECT backing file, a sled database); tests implement them in memory.

use std::io;

use crate::meta::{BitmapUpdate, DeviceMeta, StoredBitmaps};

/// The local backing store of one volume: a fixed-size array of bytes.
///
/// Implementations must accept any offset, length and buffer alignment; callers that pass
/// 4 KiB-aligned offsets, lengths and buffers (see [`crate::buffer`]) let an O_DIRECT store skip
/// its bounce buffer. Callers guarantee that no two overlapping writes or discards run at once.
pub trait BlockStore: Send + Sync + 'static {
    /// The usable size in bytes.
    fn size(&self) -> u64;
    /// Fills `buf` with the bytes at `offset`. The range lies within `size()`.
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> io::Result<()>;
    /// Writes `data` at `offset`. The range lies within `size()`.
    fn write_at(&self, offset: u64, data: &[u8]) -> io::Result<()>;
    /// Makes the range read back as zeros and releases its space where the medium allows it.
    fn discard(&self, offset: u64, len: u64) -> io::Result<()>;
    /// Makes every write that completed before this call durable.
    fn flush(&self) -> io::Result<()>;

    /// A descriptor on which the device may submit its own reads, writes and `fdatasync`s
    /// (through io_uring), for whole 4 KiB blocks in aligned buffers below the returned limit.
    /// `None` (the default) sends every request through the methods above.
    fn direct_access(&self) -> Option<DirectAccess> {
        None
    }
}

/// See [`BlockStore::direct_access`]. The descriptor stays open as long as the store lives.
#[derive(Debug, Clone, Copy)]
pub struct DirectAccess {
    pub fd: std::os::fd::RawFd,
    /// Requests must end at or below this byte (the store's size rounded down to 4 KiB).
    pub limit: u64,
}

/// Errors of a metadata store.
#[derive(Debug, thiserror::Error)]
pub enum MetaError {
    #[error("metadata store I/O failed: {0}")]
    Io(#[from] io::Error),
    #[error("metadata store backend failed: {0}")]
    Backend(String),
    #[error("metadata is corrupt: {0}")]
    Corrupt(String),
}

/// The durable metadata of one volume (generation identifiers, flags, size).
pub trait MetaStore: Send + 'static {
    /// The stored metadata, or `None` when `create-md` has not been run.
    fn load(&self) -> Result<Option<DeviceMeta>, MetaError>;
    /// Replaces the stored metadata. Returns only once the new value is durable (fsynced):
    /// callers acknowledge things that rely on it right after.
    fn save(&mut self, meta: &DeviceMeta) -> Result<(), MetaError>;
    /// Applies one transaction of the out-of-sync bitmaps and the activity log, atomically.
    /// Returns only once it is durable.
    fn save_bitmaps(&mut self, update: &BitmapUpdate) -> Result<(), MetaError>;
    /// The stored activity log and every stored bitmap piece that is not clean.
    fn load_bitmaps(&self) -> Result<StoredBitmaps, MetaError>;
}
