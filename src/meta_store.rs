//! Durable per-volume metadata in a sled database.

use std::collections::HashSet;
use std::ffi::OsString;
use std::fs::File;
use std::io;
use std::path::{Path, PathBuf};

use qrbd_actors::meta::{
    BitmapChunk, BitmapUpdate, DeviceMeta, StoredBitmaps, META_FORMAT_VERSION, WORDS_PER_EXTENT,
};
use qrbd_actors::ports::{MetaError, MetaStore};

const DEVICE_META_KEY: &str = "device-meta";
/// Prefix of the keys written by [`SledMetaStore::put_blob`], so that a blob can never clobber
/// the device metadata.
const BLOB_PREFIX: &str = "blob/";

/// sled 0.34's file names inside its directory (see `sled::Config::{db_path, config_path,
/// blob_path}`).
const DB_FILE: &str = "db";
const CONF_FILE: &str = "conf";
const BLOBS_DIR: &str = "blobs";

/// A [`MetaStore`] backed by a sled database in a directory of its own.
pub struct SledMetaStore {
    db: ClosingDb,
    dir: PathBuf,
    /// Handles kept for the fsyncs that make writes durable (see [`SledMetaStore::sync`]).
    db_file: File,
    conf_file: File,
    dir_file: File,
    /// Blob files already fsynced. sled writes each blob once under a fresh name and never
    /// modifies it, so one fsync per blob is enough.
    synced_blobs: HashSet<OsString>,
}

impl std::fmt::Debug for SledMetaStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SledMetaStore")
            .field("dir", &self.dir)
            .finish_non_exhaustive()
    }
}

impl SledMetaStore {
    /// Opens the metadata database in `dir`, creating the directory and an empty database if
    /// needed.
    pub fn open(dir: &Path) -> Result<SledMetaStore, MetaError> {
        let db = ClosingDb::open(dir)?;
        let open = |name: &str| {
            let path = dir.join(name);
            File::open(&path).map_err(|e| io_context(e, &path, "opening for fsync"))
        };
        let mut store = SledMetaStore {
            db_file: open(DB_FILE)?,
            conf_file: open(CONF_FILE)?,
            dir_file: File::open(dir).map_err(|e| io_context(e, dir, "opening for fsync"))?,
            db,
            dir: dir.to_owned(),
            synced_blobs: HashSet::new(),
        };
        // sled may just have created the directory and its files without syncing them; make the
        // empty database durable so a later save never depends on unsynced directory entries.
        store.sync()?;
        if let Some(parent) = dir.parent().filter(|p| !p.as_os_str().is_empty()) {
            File::open(parent)
                .and_then(|p| p.sync_all())
                .map_err(|e| io_context(e, parent, "fsync"))?;
        }
        Ok(store)
    }

    /// Whether `dir` holds a metadata database with device metadata in it. Never creates
    /// anything when it does not; errors (e.g. the database is open elsewhere) count as absent
    /// and are logged: use [`SledMetaStore::try_exists`] to see them.
    pub fn exists(dir: &Path) -> bool {
        match Self::try_exists(dir) {
            Ok(found) => found,
            Err(e) => {
                tracing::warn!(dir = %dir.display(), error = %e, "cannot check for metadata");
                false
            }
        }
    }

    /// Like [`SledMetaStore::exists`] but reports why the check could not be made.
    pub fn try_exists(dir: &Path) -> Result<bool, MetaError> {
        // sled creates its directory and files on open, so only open what is already there.
        if !dir.join(DB_FILE).is_file() {
            return Ok(false);
        }
        let db = ClosingDb::open(dir)?;
        db.contains_key(DEVICE_META_KEY)
            .map_err(|e| sled_error(e, dir, "reading device metadata"))
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Stores `value` under `key`, durably: returns once it would survive a crash.
    pub fn put_blob(&mut self, key: &str, value: &[u8]) -> Result<(), MetaError> {
        self.put_durable(&blob_key(key), value, "writing blob")
    }

    /// The value last stored under `key` with [`SledMetaStore::put_blob`].
    pub fn get_blob(&self, key: &str) -> Result<Option<Vec<u8>>, MetaError> {
        let value = self
            .db
            .get(blob_key(key))
            .map_err(|e| sled_error(e, &self.dir, "reading blob"))?;
        Ok(value.map(|v| v.to_vec()))
    }

    /// Stores `value` under the raw `key`, bypassing every encoding: lets tests elsewhere in
    /// the crate plant damaged metadata.
    #[cfg(test)]
    pub(crate) fn insert_raw_for_test(&mut self, key: &str, value: &[u8]) -> Result<(), MetaError> {
        self.put_durable(key, value, "writing a raw test value")
    }

    /// The raw key of one stored bitmap piece, for tests that damage it.
    #[cfg(test)]
    pub(crate) fn bitmap_key_for_test(peer: u8, extent: u64) -> String {
        bitmap_key(peer, extent)
    }

    fn put_durable(&mut self, key: &str, value: &[u8], what: &str) -> Result<(), MetaError> {
        self.db
            .insert(key, value)
            .map_err(|e| sled_error(e, &self.dir, what))?;
        self.db
            .flush()
            .map_err(|e| sled_error(e, &self.dir, "flushing metadata database"))?;
        self.sync()
    }

    /// fsyncs sled's files and directories.
    ///
    /// Why: sled 0.34's `Db::flush` only calls `sync_file_range` on its log (sled issue #1452).
    /// That starts and waits for writeback of the data pages, but flushes neither the drive's
    /// volatile write cache nor the file's metadata (e.g. its size after the log grew), and
    /// blob files and new directory entries are not synced at all. A power loss could then lose
    /// metadata that `save` already reported durable, such as a new generation UUID.
    fn sync(&mut self) -> Result<(), MetaError> {
        let blobs_dir = self.dir.join(BLOBS_DIR);
        if self.sync_new_blobs(&blobs_dir)? {
            File::open(&blobs_dir)
                .and_then(|d| d.sync_all())
                .map_err(|e| io_context(e, &blobs_dir, "fsync"))?;
        }
        self.db_file
            .sync_all()
            .map_err(|e| io_context(e, &self.dir.join(DB_FILE), "fsync"))?;
        self.conf_file
            .sync_all()
            .map_err(|e| io_context(e, &self.dir.join(CONF_FILE), "fsync"))?;
        self.dir_file
            .sync_all()
            .map_err(|e| io_context(e, &self.dir, "fsync"))?;
        Ok(())
    }

    /// fsyncs the blob files not synced yet; returns whether the blob directory changed.
    fn sync_new_blobs(&mut self, blobs_dir: &Path) -> Result<bool, MetaError> {
        let entries = match std::fs::read_dir(blobs_dir) {
            Ok(entries) => entries,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(false),
            Err(e) => return Err(io_context(e, blobs_dir, "listing").into()),
        };
        let mut present = HashSet::new();
        let mut changed = false;
        for entry in entries {
            let entry = entry.map_err(|e| io_context(e, blobs_dir, "listing"))?;
            let name = entry.file_name();
            if !self.synced_blobs.contains(&name) {
                let path = entry.path();
                match File::open(&path).and_then(|f| f.sync_all()) {
                    Ok(()) => changed = true,
                    // sled garbage-collects blobs concurrently; a vanished one needs no sync.
                    Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                    Err(e) => return Err(io_context(e, &path, "fsync").into()),
                }
            }
            present.insert(name);
        }
        changed |= present.len() != self.synced_blobs.len();
        self.synced_blobs = present;
        Ok(changed)
    }
}

impl MetaStore for SledMetaStore {
    fn load(&self) -> Result<Option<DeviceMeta>, MetaError> {
        let Some(raw) = self
            .db
            .get(DEVICE_META_KEY)
            .map_err(|e| sled_error(e, &self.dir, "reading device metadata"))?
        else {
            return Ok(None);
        };
        let meta: DeviceMeta = serde_json::from_slice(&raw).map_err(|e| {
            MetaError::Corrupt(format!(
                "device metadata in {} is not valid: {e}",
                self.dir.display()
            ))
        })?;
        if meta.format_version != META_FORMAT_VERSION {
            return Err(MetaError::Corrupt(format!(
                "device metadata in {} has format version {}, this build reads version {}",
                self.dir.display(),
                meta.format_version,
                META_FORMAT_VERSION
            )));
        }
        Ok(Some(meta))
    }

    fn save(&mut self, meta: &DeviceMeta) -> Result<(), MetaError> {
        let json = serde_json::to_vec(meta)
            .map_err(|e| MetaError::Backend(format!("encoding device metadata: {e}")))?;
        self.put_durable(DEVICE_META_KEY, &json, "writing device metadata")
    }

    fn save_bitmaps(&mut self, update: &BitmapUpdate) -> Result<(), MetaError> {
        // One sled batch: after a crash the activity log and the pieces it went with are
        // either all there or all not.
        let mut batch = sled::Batch::default();
        if let Some(hot) = &update.activity_log {
            let bytes: Vec<u8> = hot.iter().flat_map(|extent| extent.to_le_bytes()).collect();
            batch.insert(ACTIVITY_LOG_KEY, bytes);
        }
        for chunk in &update.chunks {
            let key = bitmap_key(chunk.peer, chunk.extent);
            if chunk.is_clean() {
                batch.remove(key.as_bytes());
            } else {
                let bytes: Vec<u8> = chunk.words.iter().flat_map(|w| w.to_le_bytes()).collect();
                batch.insert(key.as_bytes(), bytes);
            }
        }
        self.db
            .apply_batch(batch)
            .map_err(|e| sled_error(e, &self.dir, "writing bitmaps"))?;
        self.db
            .flush()
            .map_err(|e| sled_error(e, &self.dir, "flushing metadata database"))?;
        self.sync()
    }

    fn load_bitmaps(&self) -> Result<StoredBitmaps, MetaError> {
        let corrupt =
            |what: String| MetaError::Corrupt(format!("{what} in {}", self.dir.display()));
        let mut stored = StoredBitmaps::default();
        if let Some(raw) = self
            .db
            .get(ACTIVITY_LOG_KEY)
            .map_err(|e| sled_error(e, &self.dir, "reading the activity log"))?
        {
            if raw.len() % 8 != 0 {
                return Err(corrupt(format!("activity log of {} bytes", raw.len())));
            }
            stored.activity_log = raw
                .chunks_exact(8)
                .map(|b| u64::from_le_bytes(b.try_into().unwrap_or_default()))
                .collect();
        }
        for entry in self.db.scan_prefix(BITMAP_PREFIX) {
            let (key, value) = entry.map_err(|e| sled_error(e, &self.dir, "reading bitmaps"))?;
            let key = String::from_utf8_lossy(&key).into_owned();
            let (peer, extent) =
                parse_bitmap_key(&key).ok_or_else(|| corrupt(format!("bitmap key {key:?}")))?;
            if value.len() != WORDS_PER_EXTENT * 8 {
                return Err(corrupt(format!(
                    "bitmap piece {key:?} of {} bytes",
                    value.len()
                )));
            }
            let mut words = [0u64; WORDS_PER_EXTENT];
            for (word, bytes) in words.iter_mut().zip(value.chunks_exact(8)) {
                *word = u64::from_le_bytes(bytes.try_into().unwrap_or_default());
            }
            stored.chunks.push(BitmapChunk {
                peer,
                extent,
                words,
            });
        }
        Ok(stored)
    }
}

const ACTIVITY_LOG_KEY: &str = "activity-log";
const BITMAP_PREFIX: &str = "bitmap/";

fn bitmap_key(peer: u8, extent: u64) -> String {
    format!("{BITMAP_PREFIX}{peer:03}/{extent:016x}")
}

fn parse_bitmap_key(key: &str) -> Option<(u8, u64)> {
    let (peer, extent) = key.strip_prefix(BITMAP_PREFIX)?.split_once('/')?;
    Some((peer.parse().ok()?, u64::from_str_radix(extent, 16).ok()?))
}

fn blob_key(key: &str) -> String {
    format!("{BLOB_PREFIX}{key}")
}

fn io_context(e: io::Error, path: &Path, op: &str) -> io::Error {
    io::Error::new(e.kind(), format!("{op} {}: {e}", path.display()))
}

/// A sled database that is closed, file lock included, once this handle is dropped.
///
/// Why: sled 0.34 finishes in-flight log writes on its own thread pool, and those tasks keep
/// the locked database file open for a moment after the `Db` is dropped. Without the wait, a
/// `down` then `up` of the same resource, or any reopen in this process, could fail with
/// "could not acquire lock".
struct ClosingDb {
    db: Option<sled::Db>,
    db_path: PathBuf,
}

/// How long dropping a [`ClosingDb`] waits for sled's threads to let go of the file.
const LOCK_RELEASE_WAIT: std::time::Duration = std::time::Duration::from_secs(5);

impl ClosingDb {
    fn open(dir: &Path) -> Result<ClosingDb, MetaError> {
        let db = sled::Config::new()
            .path(dir)
            .open()
            .map_err(|e| sled_error(e, dir, "opening metadata database"))?;
        Ok(ClosingDb {
            db: Some(db),
            db_path: dir.join(DB_FILE),
        })
    }
}

impl std::ops::Deref for ClosingDb {
    type Target = sled::Db;

    fn deref(&self) -> &sled::Db {
        self.db
            .as_ref()
            .expect("the database is only taken on drop")
    }
}

impl Drop for ClosingDb {
    fn drop(&mut self) {
        drop(self.db.take());
        let Ok(file) = File::open(&self.db_path) else {
            return;
        };
        let deadline = std::time::Instant::now() + LOCK_RELEASE_WAIT;
        let mut pause = std::time::Duration::from_millis(1);
        loop {
            // The same kind of lock sled takes (flock), on our own open file description, so it
            // conflicts with sled's until the last of sled's handles is closed.
            use std::os::fd::AsRawFd;
            // SAFETY: flock on a descriptor owned by `file`, which outlives the call.
            let locked = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
            if locked == 0 {
                // Closing `file` releases the probe lock.
                return;
            }
            if std::time::Instant::now() >= deadline {
                tracing::warn!(path = %self.db_path.display(),
                    "sled still holds its database lock after close");
                return;
            }
            std::thread::sleep(pause);
            pause = (pause * 2).min(std::time::Duration::from_millis(50));
        }
    }
}

fn sled_error(e: sled::Error, dir: &Path, op: &str) -> MetaError {
    match e {
        sled::Error::Io(io) => MetaError::Io(io_context(io, dir, op)),
        sled::Error::Corruption { .. } => {
            MetaError::Corrupt(format!("{op} in {}: {e}", dir.display()))
        }
        other => MetaError::Backend(format!("{op} in {}: {other}", dir.display())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> DeviceMeta {
        let mut meta = DeviceMeta::new("r0", 2, 1 << 30, 0xdead_beef);
        meta.bitmap_uuids.insert(1, 42);
        meta.history_uuids = vec![7, 8];
        meta.flags.was_primary = true;
        meta
    }

    #[test]
    fn round_trip_and_overwrite() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let mut store = SledMetaStore::open(&tmp.path().join("md")).expect("open");
        assert_eq!(store.load().expect("load"), None);
        let mut meta = sample();
        store.save(&meta).expect("save");
        assert_eq!(store.load().expect("load"), Some(meta.clone()));
        meta.current_uuid = 99;
        meta.flags.clean_shutdown = false;
        store.save(&meta).expect("save again");
        assert_eq!(store.load().expect("load"), Some(meta));
    }

    #[test]
    fn survives_drop_and_reopen() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let dir = tmp.path().join("md");
        {
            let mut store = SledMetaStore::open(&dir).expect("open");
            store.save(&sample()).expect("save");
            store.put_blob("bitmap/1", b"\x01\x02\x03").expect("put");
        }
        let store = SledMetaStore::open(&dir).expect("reopen");
        assert_eq!(store.load().expect("load"), Some(sample()));
        assert_eq!(
            store.get_blob("bitmap/1").expect("get"),
            Some(vec![1, 2, 3])
        );
    }

    #[test]
    fn corrupt_json_and_wrong_version_are_corrupt() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let mut store = SledMetaStore::open(tmp.path()).expect("open");
        store
            .db
            .insert(DEVICE_META_KEY, &b"{\"format_version\": 1, \"resou"[..])
            .expect("insert");
        match store.load() {
            Err(MetaError::Corrupt(msg)) => assert!(msg.contains("EOF"), "{msg}"),
            other => panic!("expected Corrupt, got {other:?}"),
        }
        let mut meta = sample();
        meta.format_version = META_FORMAT_VERSION + 1;
        store.save(&meta).expect("save");
        match store.load() {
            Err(MetaError::Corrupt(msg)) => assert!(msg.contains("format version"), "{msg}"),
            other => panic!("expected Corrupt, got {other:?}"),
        }
    }

    #[test]
    fn exists_does_not_create_and_sees_saved_meta() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let dir = tmp.path().join("md");
        assert!(!SledMetaStore::exists(&dir));
        assert!(!dir.exists(), "exists() created {}", dir.display());
        std::fs::create_dir(&dir).expect("mkdir");
        assert!(!SledMetaStore::exists(&dir));
        assert_eq!(std::fs::read_dir(&dir).expect("ls").count(), 0);
        {
            let store = SledMetaStore::open(&dir).expect("open");
            // The database exists but holds no metadata yet.
            drop(store);
            assert!(!SledMetaStore::exists(&dir));
        }
        {
            let mut store = SledMetaStore::open(&dir).expect("open");
            store.save(&sample()).expect("save");
            // Open elsewhere: the check cannot be made, and says so.
            assert!(SledMetaStore::try_exists(&dir).is_err());
        }
        assert!(SledMetaStore::exists(&dir));
    }

    #[test]
    fn blobs_are_separate_from_meta_and_large_ones_are_synced() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let dir = tmp.path().join("md");
        let mut store = SledMetaStore::open(&dir).expect("open");
        assert_eq!(store.get_blob("x").expect("get"), None);
        store.put_blob(DEVICE_META_KEY, b"not json").expect("put");
        assert_eq!(store.load().expect("load"), None);
        // Large enough for sled to store it as a separate blob file.
        let big: Vec<u8> = (0..2_000_000u32).map(|i| (i * 7 % 256) as u8).collect();
        store.put_blob("bitmap/big", &big).expect("put big");
        let names: Vec<_> = std::fs::read_dir(&dir)
            .expect("ls")
            .map(|e| e.expect("entry").file_name())
            .collect();
        eprintln!("sled dir after flush: {names:?}");
        assert!(names.iter().any(|n| n == DB_FILE) && names.iter().any(|n| n == CONF_FILE));
        let blobs = std::fs::read_dir(dir.join(BLOBS_DIR))
            .expect("ls blobs")
            .count();
        eprintln!("blob files: {blobs}, synced: {}", store.synced_blobs.len());
        assert_eq!(store.synced_blobs.len(), blobs);
        drop(store);
        let store = SledMetaStore::open(&dir).expect("reopen");
        assert_eq!(store.get_blob("bitmap/big").expect("get"), Some(big));
    }

    /// A piece with bits set in every word, distinct for each `seed`.
    fn dirty_chunk(peer: u8, extent: u64, seed: u64) -> BitmapChunk {
        let mut words = [0u64; WORDS_PER_EXTENT];
        for (i, word) in words.iter_mut().enumerate() {
            *word = seed.rotate_left(i as u32) | 1;
        }
        BitmapChunk {
            peer,
            extent,
            words,
        }
    }

    fn clean_chunk(peer: u8, extent: u64) -> BitmapChunk {
        BitmapChunk {
            peer,
            extent,
            words: [0; WORDS_PER_EXTENT],
        }
    }

    /// The stored bitmaps with their pieces in (peer, extent) order, so that comparisons do not
    /// depend on the order the store lists them in.
    fn sorted(mut stored: StoredBitmaps) -> StoredBitmaps {
        stored
            .chunks
            .sort_by_key(|chunk| (chunk.peer, chunk.extent));
        stored
    }

    fn expect_corrupt(result: Result<StoredBitmaps, MetaError>, words: &[&str]) {
        match result {
            Err(MetaError::Corrupt(msg)) => {
                for word in words {
                    assert!(msg.contains(word), "{msg:?} lacks {word:?}");
                }
            }
            other => panic!("expected Corrupt, got {other:?}"),
        }
    }

    #[test]
    fn bitmaps_round_trip_and_clean_pieces_are_removed() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let mut store = SledMetaStore::open(&tmp.path().join("md")).expect("open");
        assert_eq!(
            store.load_bitmaps().expect("load empty"),
            StoredBitmaps::default()
        );

        let hot = vec![3, 9, 0x1_0000_0000, u64::MAX];
        let first = vec![
            dirty_chunk(1, 0, 0xA5),
            dirty_chunk(1, 5, 0x5A),
            dirty_chunk(2, 0, 0x77),
            // The largest extent and peer still get keys of their own.
            dirty_chunk(u8::MAX, u64::MAX, 0x1234_5678_9ABC_DEF0),
        ];
        store
            .save_bitmaps(&BitmapUpdate {
                activity_log: Some(hot.clone()),
                chunks: first.clone(),
            })
            .expect("save");
        assert_eq!(
            sorted(store.load_bitmaps().expect("load")),
            StoredBitmaps {
                activity_log: hot.clone(),
                chunks: first.clone(),
            }
        );

        // No activity log: the stored one stays. A clean piece removes the stored one, a dirty
        // one replaces it, and a clean piece never stored is no error.
        store
            .save_bitmaps(&BitmapUpdate {
                activity_log: None,
                chunks: vec![
                    clean_chunk(1, 5),
                    dirty_chunk(1, 0, 0xFF00),
                    clean_chunk(3, 42),
                ],
            })
            .expect("save again");
        assert_eq!(
            sorted(store.load_bitmaps().expect("load")),
            StoredBitmaps {
                activity_log: hot,
                chunks: vec![
                    dirty_chunk(1, 0, 0xFF00),
                    first[2].clone(),
                    first[3].clone(),
                ],
            }
        );

        // An empty activity log is stored as such, not skipped.
        store
            .save_bitmaps(&BitmapUpdate {
                activity_log: Some(Vec::new()),
                chunks: Vec::new(),
            })
            .expect("clear the activity log");
        assert!(store.load_bitmaps().expect("load").activity_log.is_empty());
    }

    #[test]
    fn bitmaps_survive_drop_and_reopen() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let dir = tmp.path().join("md");
        let saved = StoredBitmaps {
            activity_log: vec![7, 1, 4],
            chunks: vec![dirty_chunk(0, 2, 0xBEEF), dirty_chunk(1, 2, 0xCAFE)],
        };
        {
            let mut store = SledMetaStore::open(&dir).expect("open");
            store
                .save_bitmaps(&BitmapUpdate {
                    activity_log: Some(saved.activity_log.clone()),
                    chunks: saved.chunks.clone(),
                })
                .expect("save");
        }
        let store = SledMetaStore::open(&dir).expect("reopen");
        assert_eq!(sorted(store.load_bitmaps().expect("load")), saved);
        // Also in the order the activity log was given: it is a list, not a set.
        assert_eq!(store.load_bitmaps().expect("load").activity_log, [7, 1, 4]);
    }

    #[test]
    fn bitmaps_are_separate_from_meta_and_blobs() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let dir = tmp.path().join("md");
        let mut store = SledMetaStore::open(&dir).expect("open");
        store.save(&sample()).expect("save meta");
        // Blobs named like the bitmap keys: the blob prefix keeps them apart.
        let piece_key = bitmap_key(1, 0);
        store.put_blob(&piece_key, b"blob").expect("put blob");
        store
            .put_blob(ACTIVITY_LOG_KEY, b"blob too")
            .expect("put blob");
        assert_eq!(
            store.load_bitmaps().expect("load bitmaps"),
            StoredBitmaps::default()
        );

        let saved = StoredBitmaps {
            activity_log: vec![5],
            chunks: vec![dirty_chunk(1, 0, 0xD00D)],
        };
        store
            .save_bitmaps(&BitmapUpdate {
                activity_log: Some(saved.activity_log.clone()),
                chunks: saved.chunks.clone(),
            })
            .expect("save bitmaps");
        drop(store);

        let store = SledMetaStore::open(&dir).expect("reopen");
        assert_eq!(store.load().expect("load meta"), Some(sample()));
        assert_eq!(
            store.get_blob(&piece_key).expect("get"),
            Some(b"blob".to_vec())
        );
        assert_eq!(
            store.get_blob(ACTIVITY_LOG_KEY).expect("get"),
            Some(b"blob too".to_vec())
        );
        assert_eq!(store.load_bitmaps().expect("load bitmaps"), saved);
    }

    #[test]
    fn damaged_bitmap_pieces_are_corrupt() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let mut store = SledMetaStore::open(tmp.path()).expect("open");
        store.save(&sample()).expect("save meta");

        let piece_key = bitmap_key(1, 2);
        store
            .insert_raw_for_test(&piece_key, &[0; WORDS_PER_EXTENT * 8 - 1])
            .expect("insert short piece");
        expect_corrupt(store.load_bitmaps(), &[&piece_key, "127 bytes"]);
        store
            .insert_raw_for_test(&piece_key, &[0; WORDS_PER_EXTENT * 8 + 8])
            .expect("insert long piece");
        expect_corrupt(store.load_bitmaps(), &[&piece_key, "136 bytes"]);
        store.db.remove(&piece_key).expect("remove");

        store
            .insert_raw_for_test("bitmap/one/0000000000000002", &[0; WORDS_PER_EXTENT * 8])
            .expect("insert bad key");
        expect_corrupt(store.load_bitmaps(), &["bitmap key", "bitmap/one"]);
        store
            .db
            .remove("bitmap/one/0000000000000002")
            .expect("remove");

        store
            .insert_raw_for_test(ACTIVITY_LOG_KEY, &[1; 12])
            .expect("insert activity log");
        expect_corrupt(store.load_bitmaps(), &["activity log of 12 bytes"]);

        // The device metadata is not affected by damaged bitmaps.
        assert_eq!(store.load().expect("load meta"), Some(sample()));
    }
}
