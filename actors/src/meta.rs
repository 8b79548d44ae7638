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
            },
        }
    }
}
