//! Opening a resource's real ports (backing file, sled metadata) and `create-md`.

use std::path::Path;
use std::sync::Arc;

use anyhow::{bail, Context};
use qrbd_actors::core::generation::JUST_CREATED_UUID;
use qrbd_actors::core::resource::{RateControl, SyncConfig, Timing};
use qrbd_actors::meta::DeviceMeta;
use qrbd_actors::ports::MetaStore;
use qrbd_actors::supervisor::{PeerSetup, ResourceSetup};
use tokio::sync::broadcast;

use crate::config::{QrbdConfig, ResourceConfig};
use crate::meta_store::SledMetaStore;
use crate::store::FileBlockStore;

/// A fresh, non-zero generation identifier.
pub fn new_generation_uuid() -> u64 {
    loop {
        let uuid: u64 = rand::random();
        // Zero means "no generation"; the low bit is kept clear for flags, as DRBD does.
        let uuid = uuid & !1;
        if uuid != 0 && uuid != JUST_CREATED_UUID {
            return uuid;
        }
    }
}

/// `qrbd create-md RES`: creates the sparse backing file (if absent) and fresh metadata.
/// Refuses to replace existing metadata unless `force`. Returns what it did, for the user.
pub fn create_metadata(
    config: &QrbdConfig,
    resource: &ResourceConfig,
    force: bool,
) -> anyhow::Result<String> {
    let state_dir = &config.node.state_dir;
    std::fs::create_dir_all(state_dir)
        .with_context(|| format!("cannot create the state directory {}", state_dir.display()))?;
    let meta_dir = config.meta_path(&resource.name);
    let backing = config.backing_path(&resource.name);
    let had_meta = SledMetaStore::try_exists(&meta_dir).with_context(|| {
        format!(
            "cannot inspect the metadata at {} (is the daemon running with this resource up?)",
            meta_dir.display()
        )
    })?;
    if had_meta && !force {
        bail!(
            "resource {:?} already has metadata at {}; refusing to overwrite it (use --force to \
             start a new data generation; the data in {} is kept)",
            resource.name,
            meta_dir.display(),
            backing.display()
        );
    }
    let mut report = Vec::new();
    let kept_backing = backing.exists();
    if kept_backing {
        // Opening checks the size against the configuration.
        FileBlockStore::open(&backing, resource.size_bytes).with_context(|| {
            format!(
                "the existing backing file {} does not fit resource {:?}",
                backing.display(),
                resource.name
            )
        })?;
        report.push(format!(
            "kept the existing backing file {}",
            backing.display()
        ));
    } else {
        FileBlockStore::create(&backing, resource.size_bytes)
            .with_context(|| format!("cannot create the backing file {}", backing.display()))?;
        report.push(format!(
            "created the sparse backing file {} ({} bytes)",
            backing.display(),
            resource.size_bytes
        ));
    }
    let mut store = SledMetaStore::open(&meta_dir)
        .with_context(|| format!("cannot open the metadata store {}", meta_dir.display()))?;
    let mut advice = None;
    let meta = if resource.peers.is_empty() {
        // Alone, the data is current by definition. A blank volume starts in the fresh
        // generation; kept data is a generation of its own.
        let generation = if kept_backing {
            new_generation_uuid()
        } else {
            JUST_CREATED_UUID
        };
        DeviceMeta::new(
            &resource.name,
            config.node.id,
            resource.size_bytes,
            generation,
        )
    } else {
        // Replicated, no replica is current until `primary --force` picks one (the initial
        // sync copies it to the others) or `new-current-uuid --clear-bitmap` declares blank
        // replicas identical (docs/protocol.md, "The initial sync").
        advice = Some(
            "the data is Inconsistent until the initial sync: run `qrbd primary --force` on the \
             node whose data counts, or `qrbd new-current-uuid --clear-bitmap` on one node once \
             all are connected if every replica is blank"
                .to_owned(),
        );
        DeviceMeta::blank(&resource.name, config.node.id, resource.size_bytes)
    };
    store
        .save(&meta)
        .with_context(|| format!("cannot write metadata to {}", meta_dir.display()))?;
    report.push(format!(
        "wrote metadata to {} (node id {}, generation {:016X})",
        meta_dir.display(),
        meta.node_id,
        meta.current_uuid
    ));
    report.extend(advice);
    Ok(report.join("\n"))
}

/// Whether `create-md` has been run for a resource.
pub fn has_metadata(config: &QrbdConfig, resource: &str) -> bool {
    SledMetaStore::exists(&config.meta_path(resource))
}

/// Opens the backing file and metadata of a resource for `up`.
pub fn open_resource(
    config: &QrbdConfig,
    resource: &ResourceConfig,
    events: Option<broadcast::Sender<String>>,
) -> anyhow::Result<ResourceSetup> {
    let meta_dir = config.meta_path(&resource.name);
    let backing = config.backing_path(&resource.name);
    if !Path::new(&meta_dir).exists() {
        bail!(
            "resource {:?} has no metadata at {}; run `qrbd create-md {}` first",
            resource.name,
            meta_dir.display(),
            resource.name
        );
    }
    let meta_store = SledMetaStore::open(&meta_dir)
        .with_context(|| format!("cannot open the metadata store {}", meta_dir.display()))?;
    let meta = meta_store
        .load()
        .with_context(|| format!("cannot read metadata from {}", meta_dir.display()))?
        .with_context(|| {
            format!(
                "resource {:?} has no metadata in {}; run `qrbd create-md {}` first",
                resource.name,
                meta_dir.display(),
                resource.name
            )
        })?;
    let bitmaps = meta_store.load_bitmaps().with_context(|| {
        format!(
            "resource {:?}: cannot read the out-of-sync bitmaps and activity log from {}",
            resource.name,
            meta_dir.display()
        )
    })?;
    if meta.size_bytes != resource.size_bytes {
        bail!(
            "resource {:?}: the configuration says {} bytes but the metadata says {} bytes; \
             resizing is not supported",
            resource.name,
            resource.size_bytes,
            meta.size_bytes
        );
    }
    if meta.node_id != config.node.id {
        bail!(
            "resource {:?}: the metadata belongs to node id {} but this node is id {}",
            resource.name,
            meta.node_id,
            config.node.id
        );
    }
    let store = FileBlockStore::open(&backing, resource.size_bytes)
        .with_context(|| format!("cannot open the backing file {}", backing.display()))?;
    if !store.is_direct() {
        tracing::warn!(resource = %resource.name, "backing file is not on an O_DIRECT-capable filesystem; using buffered I/O");
    }
    Ok(ResourceSetup {
        name: resource.name.clone(),
        node_id: config.node.id,
        node_name: config.node.name.clone(),
        timing: Timing::default(),
        seed: rand::random(),
        protocol: resource.protocol,
        store: Arc::new(store),
        meta_store: Box::new(meta_store),
        meta,
        bitmaps,
        peers: resource
            .peers
            .iter()
            .map(|peer| PeerSetup {
                id: peer.id,
                name: peer.name.clone(),
            })
            .collect(),
        events,
        disk_flushes: resource.disk_flushes,
        sync: SyncConfig {
            al_extents: resource.al_extents,
            rate: rate_control(resource),
            split_brain: resource.split_brain.clone(),
            csums: resource.csums,
            ..SyncConfig::default()
        },
        allow_two_primaries: resource.allow_two_primaries,
    })
}

/// The resync controller's settings of a resource, in the core's terms (nanoseconds).
fn rate_control(resource: &ResourceConfig) -> RateControl {
    let nanos = |d: std::time::Duration| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX);
    let control = &resource.resync_control;
    RateControl {
        plan_ahead: nanos(control.plan_ahead),
        fill_target: control.fill_target,
        delay_target: nanos(control.delay_target),
        max_rate: control.max_rate,
        min_rate: control.min_rate,
        fixed_rate: resource.resync_rate,
    }
}

#[cfg(test)]
mod tests {
    use qrbd_actors::meta::{BitmapChunk, BitmapUpdate, WORDS_PER_EXTENT};

    use super::*;
    use crate::config::load_from_str;

    /// A configuration of one resource, `r0`, kept in `state_dir`, with its metadata created.
    fn created(state_dir: &Path) -> QrbdConfig {
        let text = format!(
            "[node]\nname = \"alpha\"\nid = 0\nstate_dir = {:?}\n\n\
             [[resource]]\nname = \"r0\"\nsize = \"8MiB\"\n",
            state_dir.display().to_string()
        );
        let config = load_from_str(&text, &[]).expect("config");
        create_metadata(&config, &config.resources[0], false).expect("create-md");
        config
    }

    #[test]
    fn up_reads_the_stored_bitmaps() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let config = created(tmp.path());
        let chunk = BitmapChunk {
            peer: 1,
            extent: 1,
            words: [0x0F; WORDS_PER_EXTENT],
        };
        {
            let mut store = SledMetaStore::open(&config.meta_path("r0")).expect("open");
            store
                .save_bitmaps(&BitmapUpdate {
                    activity_log: Some(vec![1]),
                    chunks: vec![chunk.clone()],
                })
                .expect("save bitmaps");
        }
        let setup = open_resource(&config, &config.resources[0], None).expect("open_resource");
        assert_eq!(setup.bitmaps.activity_log, [1]);
        assert_eq!(setup.bitmaps.chunks, [chunk]);
    }

    #[test]
    fn up_fails_on_damaged_bitmaps_and_says_where() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let config = created(tmp.path());
        let meta_dir = config.meta_path("r0");
        {
            let mut store = SledMetaStore::open(&meta_dir).expect("open");
            store
                .insert_raw_for_test(&SledMetaStore::bitmap_key_for_test(1, 0), b"short")
                .expect("plant a damaged piece");
        }
        let Err(error) = open_resource(&config, &config.resources[0], None) else {
            panic!("open_resource accepted a damaged bitmap piece");
        };
        let message = format!("{error:#}");
        for word in [
            "\"r0\"",
            "bitmaps",
            &meta_dir.display().to_string(),
            "corrupt",
        ] {
            assert!(message.contains(word), "{message:?} lacks {word:?}");
        }
    }
}
