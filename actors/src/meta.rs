//! The metadata a node keeps per volume, as stored by a [`crate::ports::MetaStore`].

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// Bumped when the stored layout changes incompatibly.
pub const META_FORMAT_VERSION: u32 = 1;

/// A data-generation identifier (docs/protocol.md, "Data generations"). Zero means "none".
pub type GenerationUuid = u64;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeviceMeta {
    pub format_version: u32,
    pub resource: String,
    pub node_id: u8,
    pub size_bytes: u64,
    pub current_uuid: GenerationUuid,
    /// Per peer node id: the generation at which that peer's out-of-sync tracking started.
    #[serde(default)]
    pub bitmap_uuids: BTreeMap<u8, GenerationUuid>,
    #[serde(default)]
    pub history_uuids: Vec<GenerationUuid>,
    pub flags: MetaFlags,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct MetaFlags {
    /// The data is a consistent image (not in the middle of a resync as target).
    pub consistent: bool,
    /// The data was known to be up to date when last written.
    pub up_to_date: bool,
    /// This node was Primary when the flags were last written.
    pub was_primary: bool,
    /// Cleared while the volume is up; set again by an orderly `down`. Finding it cleared at
    /// `up` means the previous run crashed.
    pub clean_shutdown: bool,
    /// The data survived a crash and is Consistent: it stays so, across restarts, until a
    /// connected UpToDate peer or `primary --force` confirms it.
    #[serde(default)]
    pub unconfirmed: bool,
    /// The crash hit this node while it was Primary: writes in flight then may be on this
    /// disk only, so a peer's UpToDate data wins until a resync.
    #[serde(default)]
    pub crashed_primary: bool,
    /// This node was Primary already when it began writing without a peer (the generation
    /// that started then was started by a write, not by a promotion during the split). Only
    /// `after_sb_0pri = discard-younger-primary` / `discard-older-primary` read it.
    #[serde(default)]
    pub primary_before_split: bool,
    /// A blank node's initial sync has begun and its full bitmap is durable: an interrupted
    /// initial sync resumes from the bitmap instead of starting over.
    #[serde(default)]
    pub initial_sync_bitmap_stored: bool,
}

impl DeviceMeta {
    /// Fresh metadata for `create-md`: a new generation, consistent and up to date (a new,
    /// all-zero disk is trivially so on a single node).
    pub fn new(resource: &str, node_id: u8, size_bytes: u64, current_uuid: GenerationUuid) -> Self {
        DeviceMeta {
            format_version: META_FORMAT_VERSION,
            resource: resource.to_owned(),
            node_id,
            size_bytes,
            current_uuid,
            bitmap_uuids: BTreeMap::new(),
            history_uuids: Vec::new(),
            flags: MetaFlags {
                consistent: true,
                up_to_date: true,
                was_primary: false,
                clean_shutdown: true,
                unconfirmed: false,
                crashed_primary: false,
                primary_before_split: false,
                initial_sync_bitmap_stored: false,
            },
        }
    }
}

impl DeviceMeta {
    /// Fresh metadata of a replicated volume: Inconsistent, in the fresh generation, until the
    /// initial sync or `new-current-uuid --clear-bitmap`.
    pub fn blank(resource: &str, node_id: u8, size_bytes: u64) -> Self {
        let mut meta = DeviceMeta::new(
            resource,
            node_id,
            size_bytes,
            crate::core::generation::JUST_CREATED_UUID,
        );
        meta.flags.consistent = false;
        meta.flags.up_to_date = false;
        meta
    }
}

/// The activity log's unit (4 MiB), and the unit in which the out-of-sync bitmaps are stored.
pub const EXTENT_BYTES: u64 = 4 << 20;
/// Bitmap words (64 blocks of 4 KiB each) per extent.
pub const WORDS_PER_EXTENT: usize = (EXTENT_BYTES / 4096 / 64) as usize;

/// One extent's piece of one peer's out-of-sync bitmap: bit `b` of word `w` stands for the
/// 4 KiB block `extent * 1024 + w * 64 + b`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BitmapChunk {
    pub peer: u8,
    pub extent: u64,
    pub words: [u64; WORDS_PER_EXTENT],
}

impl BitmapChunk {
    pub fn is_clean(&self) -> bool {
        self.words.iter().all(|word| *word == 0)
    }
}

/// One durable transaction of the bitmaps and the activity log (docs/protocol.md, "The
/// activity log and the bitmap"). Stored atomically: after a crash either all of it is there or
/// none of it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct BitmapUpdate {
    /// The activity log's hot extents after this transaction, when it changed them.
    pub activity_log: Option<Vec<u64>>,
    /// Bitmap pieces to store, replacing what was stored for the same peer and extent. A clean
    /// piece may be stored as "nothing".
    pub chunks: Vec<BitmapChunk>,
}

impl BitmapUpdate {
    pub fn is_empty(&self) -> bool {
        self.activity_log.is_none() && self.chunks.is_empty()
    }
}

/// What [`crate::ports::MetaStore::load_bitmaps`] finds: the hot extents and every stored
/// bitmap piece that is not clean.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct StoredBitmaps {
    pub activity_log: Vec<u64>,
    pub chunks: Vec<BitmapChunk>,
}
