//! What `qrbd status` reports, as serialisable types (the `--json` output is this, verbatim).

use serde::{Deserialize, Serialize};

use crate::core::resource::VerifyResult;
use crate::core::{DiskState, ReplicationProtocol, Role};

/// The status of one resource on this node.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ResourceStatus {
    pub name: String,
    pub role: Role,
    pub disk: DiskState,
    pub size_bytes: u64,
    pub protocol: ReplicationProtocol,
    /// Application I/O is suspended (`suspend-io`).
    pub suspended: bool,
    /// Admitted application requests not yet completed.
    pub app_in_flight: u64,
    /// Requests waiting for admission while suspended.
    pub app_held: u64,
    pub open_writers: u32,
    pub open_readers: u32,
    pub reads: u64,
    pub writes: u64,
    pub flushes: u64,
    pub discards: u64,
    pub read_bytes: u64,
    pub written_bytes: u64,
    pub discarded_bytes: u64,
    pub failed_requests: u64,
    /// Mean write latency in microseconds since the resource came up.
    pub write_latency_avg_us: u64,
    /// Sum of all write latencies in microseconds (with `writes`, the exact mean).
    #[serde(default)]
    pub write_latency_total_us: u64,
    /// Completed writes per latency bucket, not cumulative; the bounds are
    /// `write_latency_bounds_us`, and writes slower than the last bound are not in any bucket.
    #[serde(default)]
    pub write_latency_buckets: Vec<u64>,
    #[serde(default)]
    pub write_latency_bounds_us: Vec<u64>,
    /// Writes that waited for an overlapping earlier write.
    #[serde(default)]
    pub conflicts: u64,
    /// Requests postponed and re-submitted through the retry actor.
    #[serde(default)]
    pub retries: u64,
    /// Both nodes may be Primary at once (`allow_two_primaries` in the configuration).
    #[serde(default)]
    pub allow_two_primaries: bool,
    /// Two primaries, on the node that resolves conflicts: a peer's write and a local write
    /// were issued concurrently to overlapping blocks.
    #[serde(default)]
    pub concurrent_writes: u64,
    /// Two primaries, on the resolver: peer writes not written here because a concurrent
    /// local write covers them (answered Superseded).
    #[serde(default)]
    pub superseded_writes: u64,
    /// Two primaries, on the resolver: peer writes answered RetryWrite (the peer submits them
    /// again).
    #[serde(default)]
    pub retry_writes_asked: u64,
    /// Two primaries, on the other node: local writes the peer answered Superseded.
    #[serde(default)]
    pub superseded_by_peer: u64,
    /// Postponed writes submitted again through the retry actor.
    #[serde(default)]
    pub resubmitted_writes: u64,
    /// Current data generation, as 16 hex digits.
    pub current_uuid: String,
    /// Per peer node id: the generation at which this node started writing without that
    /// peer (16 hex digits).
    #[serde(default)]
    pub bitmap_uuids: std::collections::BTreeMap<String, String>,
    /// Earlier generations, newest first.
    #[serde(default)]
    pub history_uuids: Vec<String>,
    /// Writes whose activity-log extents were hot already / had to be made hot, and the
    /// transactions that did it.
    #[serde(default)]
    pub al_hits: u64,
    #[serde(default)]
    pub al_misses: u64,
    #[serde(default)]
    pub al_transactions: u64,
    pub peers: Vec<PeerStatus>,
}

/// The status of one peer of a resource (filled in once replication lands).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PeerStatus {
    pub name: String,
    pub node_id: u8,
    pub connection: String,
    pub role: Option<Role>,
    pub disk: Option<DiskState>,
    pub replication: String,
    pub sent_bytes: u64,
    pub received_bytes: u64,
    pub pending: u64,
    pub unacked: u64,
    pub out_of_sync_bytes: u64,
    /// Why the last handshake or connection failed (a refusal's reason, a timeout, ...).
    #[serde(default)]
    pub last_error: Option<String>,
    /// The resync with this peer, while one runs.
    #[serde(default)]
    pub sync: Option<PeerSyncStatus>,
    /// Bytes resynced with this peer since the resource came up.
    #[serde(default)]
    pub resynced_bytes: u64,
    /// Bytes a checksum-based resync found identical on both sides (nothing moved).
    #[serde(default)]
    pub resync_same_bytes: u64,
    /// The running online verify against this peer, or the last one (`finished` set).
    #[serde(default)]
    pub verify: Option<VerifyResult>,
}

impl ResourceStatus {
    /// Whether any two-primaries conflict counter has counted something.
    pub fn two_primaries_counted(&self) -> bool {
        [
            self.concurrent_writes,
            self.superseded_writes,
            self.retry_writes_asked,
            self.superseded_by_peer,
            self.resubmitted_writes,
        ]
        .iter()
        .any(|&n| n != 0)
    }
}

/// A resync in progress.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PeerSyncStatus {
    /// `SyncSource` or `SyncTarget` (this node's side).
    pub role: String,
    /// Out-of-sync bytes when it started, and how many of them are written on the target.
    pub total_bytes: u64,
    pub done_bytes: u64,
    /// Bytes sent or received by this resync.
    pub moved_bytes: u64,
    /// Average since it started.
    pub rate_bytes_per_sec: u64,
    pub eta_seconds: Option<u64>,
    pub elapsed_seconds: u64,
    /// Why it is not progressing, when it is not.
    pub stalled: Option<String>,
    /// On the target: bytes requested and not yet written (0 on the source).
    #[serde(default)]
    pub in_flight_bytes: u64,
    /// On the target with the rate controller on: this step's request budget per second.
    #[serde(default)]
    pub planned_rate_bytes_per_sec: Option<u64>,
    /// On the target: yielding to application writes (one request in flight).
    #[serde(default)]
    pub yielding: bool,
}

/// A resync that moved nothing for this long says it is stalled.
pub const STALL_AFTER_SECONDS: u64 = 10;

impl PeerSyncStatus {
    /// Done, in percent of what was out of sync when it started.
    pub fn done_percent(&self) -> f64 {
        if self.total_bytes == 0 {
            return 100.0;
        }
        (self.done_bytes as f64 * 100.0 / self.total_bytes as f64).min(100.0)
    }
}
