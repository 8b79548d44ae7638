//! Node configuration: loading `/etc/qrbd/qrbd.toml` (plus `QRBD_` environment overrides)
//! with the `config` crate, and validating it into plain typed structs.
//!
//! ```toml
//! [node]
//! name = "alpha"                  # required
//! id = 0                          # required, 0..=31
//! state_dir = "/var/lib/qrbd"     # default
//! mount_dir = "/run/qrbd/disks"   # default
//! admin_socket = "/run/qrbd/qrbd.sock"  # default
//! listen = "0.0.0.0:7788"         # default
//! metrics = "127.0.0.1:9942"      # optional, off when absent (or empty)
//! buffer_budget = "64MiB"         # default 64MiB, at least 4MiB; split between the resources
//!
//! [tls]                           # optional; all three keys required when present
//! ca = "/etc/qrbd/tls/ca.crt"
//! cert = "/etc/qrbd/tls/alpha.crt"
//! key = "/etc/qrbd/tls/alpha.key"
//!
//! [[resource]]
//! name = "r0"
//! size = "1GiB"
//! protocol = "C"                  # default C
//! al_extents = 1237               # default 1237, 7..=65534
//! c_plan_ahead = "2s"             # resync controller horizon; default 2s, "0" turns it off
//! c_fill_target = "8MiB"          # resync bytes kept in flight; default 8MiB
//! c_delay_target = "1s"           # with c_fill_target = 0: the target's queueing delay
//! c_max_rate = "1GiB"             # resync bound, bytes per second; default 0 (none)
//! c_min_rate = "4MiB"             # yield to application writes only above this; default 4MiB
//! resync_rate = "100MiB"          # fixed resync rate when c_plan_ahead = "0"; 0: unlimited
//! after_sb_0pri = "discard-zero-changes"  # split brain, no Primary; default "disconnect"
//! after_sb_1pri = "discard-secondary"     # split brain, one Primary; default "disconnect"
//! after_sb_2pri = "disconnect"            # split brain, two Primaries; only "disconnect"
//! allow_two_primaries = false     # both nodes Primary at once; protocol C only; default false
//!
//!   [[resource.peer]]
//!   name = "beta"
//!   id = 1
//!   address = "192.0.2.2:7788"
//! ```
//!
//! Environment variables `QRBD_NODE__<KEY>` and `QRBD_TLS__<KEY>` override the `[node]` and
//! `[tls]` keys (e.g. `QRBD_NODE__NAME=beta`, `QRBD_NODE__ID=1`). Other `QRBD_*` variables
//! (such as the CLI's own) are ignored here. Values from the environment are always taken as
//! text, so a numeric-looking name such as `QRBD_NODE__NAME=007` stays `"007"`.
//!
//! Every error message starts with the file it is about and says where in it the problem is.

use std::collections::HashMap;
use std::fmt;
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::path::{Path, PathBuf};
use std::time::Duration;

use config::{Config, Environment, File, FileFormat, Map, Value, ValueKind};
use qrbd_actors::core::split_brain::{AfterSb0Pri, AfterSb1Pri, AfterSb2Pri, SplitBrainPolicy};
use qrbd_actors::core::ReplicationProtocol;
use serde::de::{self, Deserializer, Unexpected, Visitor};
use serde::Deserialize;

/// Where the CLI looks for the configuration unless told otherwise (`--config`).
pub const DEFAULT_CONFIG_PATH: &str = "/etc/qrbd/qrbd.toml";
/// Default `[node] state_dir`.
pub const DEFAULT_STATE_DIR: &str = "/var/lib/qrbd";
/// Default `[node] mount_dir`.
pub const DEFAULT_MOUNT_DIR: &str = "/run/qrbd/disks";
/// Default `[node] admin_socket`.
pub const DEFAULT_ADMIN_SOCKET: &str = "/run/qrbd/qrbd.sock";
/// Default `[node] listen`: all IPv4 addresses, port 7788.
pub const DEFAULT_LISTEN: SocketAddr =
    SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, 7788));
/// Default `[node] buffer_budget` (64 MiB).
pub const DEFAULT_BUFFER_BUDGET: u64 = 64 * MIB;
/// Smallest accepted `[node] buffer_budget` (4 MiB).
pub const MIN_BUFFER_BUDGET: u64 = 4 * MIB;
/// Largest node id; ids are `0..=MAX_NODE_ID`.
pub const MAX_NODE_ID: u8 = 31;
/// Every size in the configuration must be a multiple of this.
pub const SIZE_ALIGNMENT: u64 = 4096;
/// Default `[[resource]] al_extents` (DRBD's default `al-extents`).
pub const DEFAULT_AL_EXTENTS: usize = 1237;
/// Smallest accepted `[[resource]] al_extents`.
pub const MIN_AL_EXTENTS: usize = 7;
/// Largest accepted `[[resource]] al_extents`.
pub const MAX_AL_EXTENTS: usize = 65534;
/// Default `[[resource]] resync_rate`: 0, unlimited.
pub const DEFAULT_RESYNC_RATE: u64 = 0;
/// Smallest accepted `[[resource]] resync_rate` other than 0 (4 KiB per second: one block),
/// also of `c_max_rate` and `c_min_rate`.
pub const MIN_RESYNC_RATE: u64 = 4 * KIB;
/// Default `[[resource]] c_plan_ahead`: 2 s (DRBD's default).
pub const DEFAULT_C_PLAN_AHEAD: Duration = Duration::from_secs(2);
/// Largest accepted `[[resource]] c_plan_ahead`.
pub const MAX_C_PLAN_AHEAD: Duration = Duration::from_secs(30);
/// The resync controller's step: `c_plan_ahead` is a whole number of them.
pub const C_STEP: Duration = Duration::from_millis(100);
/// Default `[[resource]] c_fill_target`: 8 MiB.
pub const DEFAULT_C_FILL_TARGET: u64 = 8 * MIB;
/// Smallest accepted `[[resource]] c_fill_target` other than 0 (one block).
pub const MIN_C_FILL_TARGET: u64 = 4 * KIB;
/// Largest accepted `[[resource]] c_fill_target`.
pub const MAX_C_FILL_TARGET: u64 = 64 * MIB;
/// Default `[[resource]] c_delay_target`: 1 s (DRBD's default).
pub const DEFAULT_C_DELAY_TARGET: Duration = Duration::from_secs(1);
/// Accepted `[[resource]] c_delay_target`s.
pub const MIN_C_DELAY_TARGET: Duration = Duration::from_millis(100);
pub const MAX_C_DELAY_TARGET: Duration = Duration::from_secs(10);
/// Default `[[resource]] c_max_rate`: 0, no bound.
pub const DEFAULT_C_MAX_RATE: u64 = 0;
/// Default `[[resource]] c_min_rate`: 4 MiB per second.
pub const DEFAULT_C_MIN_RATE: u64 = 4 * MIB;
/// Resource, node and peer names are at most this many characters long.
pub const MAX_NAME_LEN: usize = 64;
/// Prefix of the environment variables that override configuration keys.
pub const ENV_PREFIX: &str = "QRBD_";
/// `QrbdConfig::source` for configurations given as text.
pub const INLINE_SOURCE: &str = "<inline>";

const KIB: u64 = 1 << 10;
const MIB: u64 = 1 << 20;
const GIB: u64 = 1 << 30;
const TIB: u64 = 1 << 40;

const TOP_KEYS: &[&str] = &["node", "tls", "resource"];
const NODE_KEYS: &[&str] = &[
    "name",
    "id",
    "state_dir",
    "mount_dir",
    "admin_socket",
    "listen",
    "metrics",
    "buffer_budget",
];
const TLS_KEYS: &[&str] = &["ca", "cert", "key"];
const RESOURCE_KEYS: &[&str] = &[
    "name",
    "size",
    "protocol",
    "disk_flushes",
    "al_extents",
    "resync_rate",
    "c_plan_ahead",
    "c_fill_target",
    "c_delay_target",
    "c_max_rate",
    "c_min_rate",
    "after_sb_0pri",
    "after_sb_1pri",
    "after_sb_2pri",
    "csums",
    "allow_two_primaries",
    "peer",
];
const PEER_KEYS: &[&str] = &["name", "id", "address"];
/// Sections whose keys may be overridden from the environment, with their keys.
const ENV_SECTIONS: &[(&str, &[&str])] = &[("node", NODE_KEYS), ("tls", TLS_KEYS)];

// ---------------------------------------------------------------------------------------------
// Public types
// ---------------------------------------------------------------------------------------------

/// The validated configuration of this node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QrbdConfig {
    /// The file it came from, or `<inline>`.
    pub source: PathBuf,
    pub node: NodeConfig,
    pub tls: Option<TlsConfig>,
    pub resources: Vec<ResourceConfig>,
}

/// `[node]`: this host.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeConfig {
    pub name: String,
    /// `0..=MAX_NODE_ID`.
    pub id: u8,
    /// Backing images and metadata live here.
    pub state_dir: PathBuf,
    /// FUSE mount point.
    pub mount_dir: PathBuf,
    pub admin_socket: PathBuf,
    pub listen: SocketAddr,
    /// Metrics endpoint; `None` means off.
    pub metrics: Option<SocketAddr>,
    /// Bound on bytes held by in-flight requests, split between the resources (see
    /// [`QrbdConfig::image_buffer_budget`]).
    pub buffer_budget: u64,
}

/// `[tls]`: certificate files used by replication.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsConfig {
    pub ca: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// One `[[resource]]`: a replicated disk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResourceConfig {
    pub name: String,
    /// Positive multiple of `SIZE_ALIGNMENT`.
    pub size_bytes: u64,
    pub protocol: ReplicationProtocol,
    /// Like DRBD's `disk-flushes`: a peer flushes its disk at every epoch boundary before
    /// acknowledging it (default). Turn off only for storage with a non-volatile write cache;
    /// fsync on the image still flushes the peers.
    pub disk_flushes: bool,
    /// Like DRBD's `csums-alg`: resync compares SHA-256 digests of each block first and moves
    /// data only where they differ (less traffic, more reading; default off).
    pub csums: bool,
    /// Like DRBD's `al-extents`: how many 4 MiB extents the activity log keeps hot
    /// (`MIN_AL_EXTENTS..=MAX_AL_EXTENTS`, default `DEFAULT_AL_EXTENTS`). As in DRBD, a write
    /// to a cold extent waits for a metadata transaction that makes it hot, and after a Primary
    /// crash every hot extent must be resynced: more extents mean fewer metadata writes under
    /// scattered writes, fewer mean less to resync after a crash.
    pub al_extents: usize,
    /// Like DRBD's `resync-rate`: the fixed rate of resync traffic in bytes per second when the
    /// resync controller is off (`c_plan_ahead = 0`); ignored otherwise. 0 (the default)
    /// means unlimited; otherwise at least `MIN_RESYNC_RATE`.
    pub resync_rate: u64,
    /// The resync controller (`c_plan_ahead` and friends, like DRBD's).
    pub resync_control: ResyncControl,
    /// Automatic split-brain recovery, like DRBD's `after-sb-0pri`, `after-sb-1pri` and
    /// `after-sb-2pri` (keys `after_sb_0pri`, `after_sb_1pri`, `after_sb_2pri`, by how many of
    /// the two nodes are Primary): which node, if any, discards what it wrote since the split
    /// and resyncs from the other. All three default to `disconnect`: both nodes stay
    /// StandAlone until `qrbd connect --discard-my-data` on the victim. A
    /// `discard-node-NAME` names this node or one of the resource's peers.
    pub split_brain: SplitBrainPolicy,
    /// Like DRBD's `allow-two-primaries`: this node may be Primary while a peer is (default
    /// off). Only with protocol C, and only useful with a cluster filesystem or an application
    /// that coordinates its own writes; every node of the resource must set it.
    pub allow_two_primaries: bool,
    pub peers: Vec<PeerConfig>,
}

/// The resync controller of a resource: how fast the sync target asks for blocks. Like DRBD's
/// dynamic resync controller, with DRBD's names (`c-plan-ahead` is `c_plan_ahead`, ...). See
/// docs/protocol.md, "Resync".
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResyncControl {
    /// How far ahead the controller plans its corrections; 0 turns it off, and `resync_rate`
    /// is the fixed rate (`0` or `C_STEP..=MAX_C_PLAN_AHEAD`, in whole steps).
    pub plan_ahead: Duration,
    /// Bytes the target keeps requested and not yet written; 0: derive them from
    /// `delay_target` (`0` or `MIN_C_FILL_TARGET..=MAX_C_FILL_TARGET`). With the controller
    /// off, the fixed window (8 MiB when 0).
    pub fill_target: u64,
    /// With `fill_target` 0: keep the measured rate with this much delay in flight.
    pub delay_target: Duration,
    /// Upper bound of the controller's rate in bytes per second; 0: none.
    pub max_rate: u64,
    /// While application writes replicate, the resync yields (one request in flight) only
    /// while it is faster than this, in bytes per second; 0: it never yields.
    pub min_rate: u64,
}

impl Default for ResyncControl {
    fn default() -> Self {
        ResyncControl {
            plan_ahead: DEFAULT_C_PLAN_AHEAD,
            fill_target: DEFAULT_C_FILL_TARGET,
            delay_target: DEFAULT_C_DELAY_TARGET,
            max_rate: DEFAULT_C_MAX_RATE,
            min_rate: DEFAULT_C_MIN_RATE,
        }
    }
}

/// One `[[resource.peer]]`: another node holding a replica.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerConfig {
    pub name: String,
    pub id: u8,
    pub address: SocketAddr,
}

/// Why the configuration could not be loaded. The messages are meant for people.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error(
        "{}: no such configuration file; pass the right one with --config <FILE> (the default is {DEFAULT_CONFIG_PATH})",
        path.display()
    )]
    FileNotFound { path: PathBuf },

    #[error("{}: cannot read the configuration file: {source}", path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    #[error("{file}: TOML syntax error: {message}")]
    Syntax { file: String, message: String },

    #[error("{file}: {place}: unknown key {key:?}{}; expected one of: {}", did_you_mean(suggestion), expected.join(", "))]
    UnknownKey {
        file: String,
        place: String,
        key: String,
        suggestion: Option<String>,
        expected: Vec<String>,
    },

    #[error("{file}: {place}: missing required key {key:?}")]
    MissingKey {
        file: String,
        place: String,
        key: String,
    },

    #[error("{file}: {place}: {message}")]
    Invalid {
        file: String,
        place: String,
        message: String,
    },

    #[error("environment variable {var}: {message}")]
    Environment { var: String, message: String },

    #[error("size {text:?}: {reason}")]
    BadSize { text: String, reason: String },

    #[error("no resource named {name:?} in {file}; configured: {configured}")]
    NoSuchResource {
        name: String,
        file: String,
        configured: String,
    },
}

fn did_you_mean(suggestion: &Option<String>) -> String {
    match suggestion {
        Some(s) => format!(" (did you mean {s:?}?)"),
        None => String::new(),
    }
}

impl QrbdConfig {
    /// The resource called `name`, or an error listing the configured ones.
    pub fn resource(&self, name: &str) -> Result<&ResourceConfig, ConfigError> {
        self.resources
            .iter()
            .find(|r| r.name == name)
            .ok_or_else(|| ConfigError::NoSuchResource {
                name: name.to_owned(),
                file: self.source.display().to_string(),
                configured: if self.resources.is_empty() {
                    "none".to_owned()
                } else {
                    self.resources
                        .iter()
                        .map(|r| r.name.as_str())
                        .collect::<Vec<_>>()
                        .join(", ")
                },
            })
    }

    /// The backing image of `resource`: `<state_dir>/<resource>.img`.
    pub fn backing_path(&self, resource: &str) -> PathBuf {
        self.node.state_dir.join(format!("{resource}.img"))
    }

    /// The metadata store (a sled directory) of `resource`: `<state_dir>/<resource>.meta`.
    pub fn meta_path(&self, resource: &str) -> PathBuf {
        self.node.state_dir.join(format!("{resource}.meta"))
    }

    /// The buffer budget of each image: `[node] buffer_budget` split evenly between the
    /// configured resources, but at least [`MIN_BUFFER_BUDGET`].
    ///
    /// Each image has a budget of its own so that the requests one resource holds (suspend-io,
    /// a slow disk) cannot take the buffers another needs. Splitting the node's budget, rather
    /// than giving every image the whole of it, keeps the node's total where the operator set
    /// it; only the floor (many resources, a small budget) can take the total beyond it.
    pub fn image_buffer_budget(&self) -> u64 {
        let images = u64::try_from(self.resources.len().max(1)).unwrap_or(u64::MAX);
        (self.node.buffer_budget / images).max(MIN_BUFFER_BUDGET)
    }
}

// ---------------------------------------------------------------------------------------------
// Loading
// ---------------------------------------------------------------------------------------------

/// Loads `path` and applies `QRBD_NODE__*` / `QRBD_TLS__*` overrides from the process
/// environment.
pub fn load(path: &Path) -> Result<QrbdConfig, ConfigError> {
    let text = match std::fs::read_to_string(path) {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(ConfigError::FileNotFound {
                path: path.to_path_buf(),
            })
        }
        Err(source) => {
            return Err(ConfigError::Read {
                path: path.to_path_buf(),
                source,
            })
        }
    };
    let mut env = Vec::new();
    for (key, value) in std::env::vars_os() {
        let Ok(key) = key.into_string() else {
            continue;
        };
        if env_target(&key).is_none() {
            continue;
        }
        match value.into_string() {
            Ok(value) => env.push((key, value)),
            Err(_) => {
                return Err(ConfigError::Environment {
                    var: key,
                    message: "the value is not valid UTF-8".to_owned(),
                })
            }
        }
    }
    load_text(&text, path.to_path_buf(), &env)
}

/// Parses a configuration given as text (its `source` is `<inline>`), with `env` standing in
/// for the process environment (pairs like `("QRBD_NODE__NAME", "beta")`).
pub fn load_from_str(toml_text: &str, env: &[(String, String)]) -> Result<QrbdConfig, ConfigError> {
    load_text(toml_text, PathBuf::from(INLINE_SOURCE), env)
}

/// For `QRBD_NODE__NAME` returns `Some(("node", "name"))`; `None` for variables that do not
/// address a `[node]` or `[tls]` key (the key itself is not checked here).
fn env_target(var: &str) -> Option<(&'static str, String)> {
    let upper = var.to_ascii_uppercase();
    let rest = upper.strip_prefix(ENV_PREFIX)?;
    ENV_SECTIONS.iter().find_map(|(section, _)| {
        let key = rest.strip_prefix(&format!("{}__", section.to_ascii_uppercase()))?;
        Some((*section, key.to_ascii_lowercase()))
    })
}

/// Context for messages: which file, and which keys came from the environment.
struct Ctx {
    file: String,
    /// "node.id" -> "QRBD_NODE__ID"
    env_vars: HashMap<String, String>,
}

impl Ctx {
    fn invalid(&self, place: impl Into<String>, message: impl Into<String>) -> ConfigError {
        ConfigError::Invalid {
            file: self.file.clone(),
            place: place.into(),
            message: message.into(),
        }
    }

    fn missing(&self, place: impl Into<String>, key: &str) -> ConfigError {
        ConfigError::MissingKey {
            file: self.file.clone(),
            place: place.into(),
            key: key.to_owned(),
        }
    }

    /// A problem with `[<section>] <key>`, noting the environment variable if it set the value.
    fn section_invalid(&self, section: &str, key: &str, message: impl Into<String>) -> ConfigError {
        let mut message = message.into();
        if let Some(var) = self.env_vars.get(&format!("{section}.{key}")) {
            message.push_str(&format!(" (set by environment variable {var})"));
        }
        self.invalid(format!("[{section}]"), message)
    }
}

fn load_text(
    text: &str,
    source: PathBuf,
    env: &[(String, String)],
) -> Result<QrbdConfig, ConfigError> {
    let mut ctx = Ctx {
        file: source.display().to_string(),
        env_vars: HashMap::new(),
    };

    // Only QRBD_NODE__* and QRBD_TLS__* reach the config crate; their keys are checked here so a
    // typo in a variable name is reported as such rather than as a problem in the file.
    let mut env_map = HashMap::new();
    for (var, value) in env {
        let Some((section, key)) = env_target(var) else {
            continue;
        };
        let keys = ENV_SECTIONS
            .iter()
            .find(|(s, _)| *s == section)
            .map(|(_, keys)| *keys)
            .unwrap_or_default();
        if !keys.contains(&key.as_str()) {
            return Err(ConfigError::Environment {
                var: var.clone(),
                message: format!(
                    "unknown key {key:?} for [{section}]{}; expected one of: {}",
                    did_you_mean(&suggest(&key, keys)),
                    keys.join(", ")
                ),
            });
        }
        tracing::debug!(var = %var, "configuration key overridden from the environment");
        ctx.env_vars.insert(format!("{section}.{key}"), var.clone());
        env_map.insert(var.clone(), value.clone());
    }

    let built = Config::builder()
        .add_source(File::from_str(text, FileFormat::Toml))
        .add_source(
            Environment::with_prefix("QRBD")
                .prefix_separator("_")
                .separator("__")
                .source(Some(env_map)),
        )
        .build()
        .map_err(|e| match e {
            config::ConfigError::FileParse { cause, .. } => ConfigError::Syntax {
                file: ctx.file.clone(),
                message: cause
                    .to_string()
                    .trim_start_matches("TOML parse error ")
                    .trim_end()
                    .to_owned(),
            },
            other => ctx.invalid("the top level", other.to_string()),
        })?;

    // Structure and key names first, on the untyped tree: this gives messages naming resources
    // and peers, and suggestions for misspelled keys.
    let tree: Map<String, Value> = built
        .clone()
        .try_deserialize()
        .map_err(|e| ctx.invalid("the top level", format!("not a table of settings ({e})")))?;
    check_structure(&tree, &ctx)?;

    let raw: RawConfig = built
        .try_deserialize()
        .map_err(|e| translate_deserialize_error(&e, &tree, &ctx))?;
    let config = validate(raw, source, &ctx)?;
    tracing::debug!(
        file = %ctx.file,
        node = %config.node.name,
        resources = config.resources.len(),
        "configuration loaded"
    );
    Ok(config)
}

// ---------------------------------------------------------------------------------------------
// Structure check on the untyped tree
// ---------------------------------------------------------------------------------------------

fn check_structure(tree: &Map<String, Value>, ctx: &Ctx) -> Result<(), ConfigError> {
    check_keys(tree, TOP_KEYS, "the top level", ctx)?;
    for (section, keys) in [("node", NODE_KEYS), ("tls", TLS_KEYS)] {
        if let Some(value) = tree.get(section) {
            let ValueKind::Table(table) = &value.kind else {
                return Err(ctx.invalid(
                    "the top level",
                    format!("{section:?} must be a table: write a [{section}] section"),
                ));
            };
            check_keys(table, keys, &format!("[{section}]"), ctx)?;
        }
    }
    let Some(resources) = tree.get("resource") else {
        return Ok(());
    };
    let resources = list_of_tables(resources, "the top level", "resource", "[[resource]]", ctx)?;
    for (i, resource) in resources.iter().enumerate() {
        let place = resource_place(resource_name_in(resource), i);
        check_keys(resource, RESOURCE_KEYS, &place, ctx)?;
        if let Some(peers) = resource.get("peer") {
            let peers = list_of_tables(peers, &place, "peer", "[[resource.peer]]", ctx)?;
            for (j, peer) in peers.iter().enumerate() {
                let peer_place = format!("{place}: {}", peer_place(resource_name_in(peer), j));
                check_keys(peer, PEER_KEYS, &peer_place, ctx)?;
            }
        }
    }
    Ok(())
}

/// `value` must be an array of tables (`[[header]]` in TOML).
fn list_of_tables<'a>(
    value: &'a Value,
    place: &str,
    key: &str,
    header: &str,
    ctx: &Ctx,
) -> Result<Vec<&'a Map<String, Value>>, ConfigError> {
    let hint =
        format!("{key:?} must be a list of tables: write {header} (double brackets) for each one");
    let ValueKind::Array(items) = &value.kind else {
        return Err(ctx.invalid(place, hint));
    };
    items
        .iter()
        .map(|item| match &item.kind {
            ValueKind::Table(table) => Ok(table),
            _ => Err(ctx.invalid(place, hint.clone())),
        })
        .collect()
}

fn check_keys(
    table: &Map<String, Value>,
    expected: &[&str],
    place: &str,
    ctx: &Ctx,
) -> Result<(), ConfigError> {
    let mut keys: Vec<&String> = table.keys().collect();
    keys.sort();
    match keys.into_iter().find(|k| !expected.contains(&k.as_str())) {
        None => Ok(()),
        Some(key) => Err(ConfigError::UnknownKey {
            file: ctx.file.clone(),
            place: place.to_owned(),
            key: key.clone(),
            suggestion: suggest(key, expected),
            expected: expected.iter().map(|s| (*s).to_owned()).collect(),
        }),
    }
}

/// The expected key closest to `key`, if it is close enough to be a likely typo.
fn suggest(key: &str, expected: &[&str]) -> Option<String> {
    let key = key.to_ascii_lowercase();
    expected
        .iter()
        .map(|candidate| (edit_distance(&key, candidate), *candidate))
        .filter(|(distance, candidate)| *distance <= 2.max(candidate.len() / 3))
        .min_by_key(|(distance, _)| *distance)
        .map(|(_, candidate)| candidate.to_owned())
}

fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut previous: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut current = vec![i + 1; b.len() + 1];
        for (j, cb) in b.iter().enumerate() {
            let substitute = previous[j] + usize::from(ca != *cb);
            current[j + 1] = substitute.min(previous[j + 1] + 1).min(current[j] + 1);
        }
        previous = current;
    }
    previous[b.len()]
}

fn resource_name_in(table: &Map<String, Value>) -> Option<&str> {
    match table.get("name").map(|v| &v.kind) {
        Some(ValueKind::String(name)) => Some(name),
        _ => None,
    }
}

/// `resource "r0"`, or `resource #2` when it has no name.
fn resource_place(name: Option<&str>, index: usize) -> String {
    match name {
        Some(name) => format!("resource {name:?}"),
        None => format!("resource #{}", index + 1),
    }
}

/// `peer "beta"`, or `peer #2` when it has no name.
fn peer_place(name: Option<&str>, index: usize) -> String {
    match name {
        Some(name) => format!("peer {name:?}"),
        None => format!("peer #{}", index + 1),
    }
}

// ---------------------------------------------------------------------------------------------
// Typed deserialization
// ---------------------------------------------------------------------------------------------

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    node: Option<RawNode>,
    tls: Option<RawTls>,
    #[serde(default)]
    resource: Vec<RawResource>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawNode {
    name: Option<Text>,
    id: Option<Int>,
    state_dir: Option<Text>,
    mount_dir: Option<Text>,
    admin_socket: Option<Text>,
    listen: Option<Text>,
    metrics: Option<Text>,
    buffer_budget: Option<SizeText>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTls {
    ca: Option<Text>,
    cert: Option<Text>,
    key: Option<Text>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawResource {
    name: Option<Text>,
    size: Option<SizeText>,
    protocol: Option<Text>,
    disk_flushes: Option<bool>,
    csums: Option<bool>,
    al_extents: Option<Scalar>,
    resync_rate: Option<Scalar>,
    c_plan_ahead: Option<Scalar>,
    c_fill_target: Option<Scalar>,
    c_delay_target: Option<Scalar>,
    c_max_rate: Option<Scalar>,
    c_min_rate: Option<Scalar>,
    after_sb_0pri: Option<Scalar>,
    after_sb_1pri: Option<Scalar>,
    after_sb_2pri: Option<Scalar>,
    allow_two_primaries: Option<bool>,
    #[serde(default)]
    peer: Vec<RawPeer>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPeer {
    name: Option<Text>,
    id: Option<Int>,
    address: Option<Text>,
}

/// A string value; numbers and booleans are refused rather than silently turned into text.
#[derive(Debug)]
struct Text(String);

impl<'de> Deserialize<'de> for Text {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = Text;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a string (in quotes)")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Text, E> {
                Ok(Text(v.to_owned()))
            }
            fn visit_string<E: de::Error>(self, v: String) -> Result<Text, E> {
                Ok(Text(v))
            }
        }
        deserializer.deserialize_any(V)
    }
}

/// An integer; from the environment it arrives as text, which must be a plain integer.
#[derive(Debug, Clone, Copy)]
struct Int(i64);

impl<'de> Deserialize<'de> for Int {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = Int;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("an integer")
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<Int, E> {
                Ok(Int(v))
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<Int, E> {
                i64::try_from(v)
                    .map(Int)
                    .map_err(|_| E::invalid_value(Unexpected::Unsigned(v), &self))
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Int, E> {
                v.trim()
                    .parse()
                    .map(Int)
                    .map_err(|_| E::invalid_value(Unexpected::Str(v), &self))
            }
        }
        deserializer.deserialize_any(V)
    }
}

/// A size: text such as `"1GiB"` or a bare number of bytes. Parsed later by `parse_size`.
#[derive(Debug)]
struct SizeText(String);

impl<'de> Deserialize<'de> for SizeText {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = SizeText;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a size such as \"1GiB\" or a number of bytes")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<SizeText, E> {
                Ok(SizeText(v.to_owned()))
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<SizeText, E> {
                Ok(SizeText(v.to_string()))
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<SizeText, E> {
                Ok(SizeText(v.to_string()))
            }
        }
        deserializer.deserialize_any(V)
    }
}

/// Any single value, kept as written: for keys whose wrong values (of any type) should all get
/// one message from validation, saying what is valid, rather than the deserializer's
/// "invalid type".
#[derive(Debug)]
enum Scalar {
    Int(i128),
    Text(String),
    /// Anything else: how to show it, and what it is (e.g. "a floating-point number").
    Other {
        shown: String,
        what: &'static str,
    },
}

impl Scalar {
    fn other(shown: impl Into<String>, what: &'static str) -> Self {
        Self::Other {
            shown: shown.into(),
            what,
        }
    }
}

impl<'de> Deserialize<'de> for Scalar {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Scalar;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a single value")
            }
            fn visit_bool<E: de::Error>(self, v: bool) -> Result<Scalar, E> {
                Ok(Scalar::other(v.to_string(), "a boolean"))
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<Scalar, E> {
                Ok(Scalar::Int(v.into()))
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<Scalar, E> {
                Ok(Scalar::Int(v.into()))
            }
            fn visit_i128<E: de::Error>(self, v: i128) -> Result<Scalar, E> {
                Ok(Scalar::Int(v))
            }
            fn visit_u128<E: de::Error>(self, v: u128) -> Result<Scalar, E> {
                Ok(i128::try_from(v).map_or_else(
                    |_| Scalar::other(v.to_string(), "too large an integer"),
                    Scalar::Int,
                ))
            }
            fn visit_f64<E: de::Error>(self, v: f64) -> Result<Scalar, E> {
                Ok(Scalar::other(format!("{v:?}"), "a floating-point number"))
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Scalar, E> {
                Ok(Scalar::Text(v.to_owned()))
            }
            fn visit_string<E: de::Error>(self, v: String) -> Result<Scalar, E> {
                Ok(Scalar::Text(v))
            }
            fn visit_unit<E: de::Error>(self) -> Result<Scalar, E> {
                Ok(Scalar::other("(nothing)", "empty"))
            }
            fn visit_seq<A: de::SeqAccess<'de>>(self, mut seq: A) -> Result<Scalar, A::Error> {
                while seq.next_element::<de::IgnoredAny>()?.is_some() {}
                Ok(Scalar::other("[...]", "a list"))
            }
            fn visit_map<A: de::MapAccess<'de>>(self, mut map: A) -> Result<Scalar, A::Error> {
                while map
                    .next_entry::<de::IgnoredAny, de::IgnoredAny>()?
                    .is_some()
                {}
                Ok(Scalar::other("{...}", "a table"))
            }
        }
        deserializer.deserialize_any(V)
    }
}

/// Turns an error from the config crate's deserializer (which knows the key path, e.g.
/// `resource[0].peer[1].id`) into one that names the resource and peer.
fn translate_deserialize_error(
    error: &config::ConfigError,
    tree: &Map<String, Value>,
    ctx: &Ctx,
) -> ConfigError {
    let (key, message) = split_config_error(error);
    let Some(key) = key else {
        return ctx.invalid("the top level", message);
    };
    let (place, field) = describe_key(tree, &key);
    let mut message = if field.is_empty() {
        message
    } else {
        format!("{field}: {message}")
    };
    if let Some(var) = ctx.env_vars.get(&key) {
        message.push_str(&format!(" (set by environment variable {var})"));
    }
    ctx.invalid(place, message)
}

fn split_config_error(error: &config::ConfigError) -> (Option<String>, String) {
    match error {
        config::ConfigError::Type {
            unexpected,
            expected,
            key,
            ..
        } => (
            key.clone(),
            format!("invalid type: {unexpected}, expected {expected}"),
        ),
        config::ConfigError::At { error, key, .. } => {
            let (inner_key, message) = split_config_error(error);
            (key.clone().or(inner_key), message)
        }
        config::ConfigError::NotFound(key) => (Some(key.clone()), "missing".to_owned()),
        other => (None, other.to_string()),
    }
}

/// `resource[0].peer[1].id` -> (`resource "r0": peer "beta"`, `id`). The config crate leaves
/// out the dot after an index (`resource[0]peer[1]id`); both spellings are understood.
fn describe_key(tree: &Map<String, Value>, key: &str) -> (String, String) {
    let segments = key_segments(key);
    let names = |segments: &[KeySegment]| {
        segments
            .iter()
            .map(|s| match s {
                KeySegment::Name(name) => name.clone(),
                KeySegment::Index(i) => format!("[{i}]"),
            })
            .collect::<Vec<_>>()
            .join(".")
    };
    match segments.as_slice() {
        [KeySegment::Name(section), rest @ ..] if section == "node" || section == "tls" => {
            (format!("[{section}]"), names(rest))
        }
        [KeySegment::Name(section), KeySegment::Index(i), rest @ ..] if section == "resource" => {
            let resource = table_at(tree.get("resource"), *i);
            let place = resource_place(resource.and_then(resource_name_in), *i);
            match rest {
                [KeySegment::Name(peer), KeySegment::Index(j), rest @ ..] if peer == "peer" => {
                    let peer = table_at(resource.and_then(|r| r.get("peer")), *j);
                    let place = format!(
                        "{place}: {}",
                        peer_place(peer.and_then(resource_name_in), *j)
                    );
                    (place, names(rest))
                }
                _ => (place, names(rest)),
            }
        }
        _ => ("the top level".to_owned(), key.to_owned()),
    }
}

#[derive(Debug, PartialEq)]
enum KeySegment {
    Name(String),
    Index(usize),
}

/// `resource[0]peer[1]id` or `resource[0].peer[1].id` -> resource, 0, peer, 1, id.
fn key_segments(key: &str) -> Vec<KeySegment> {
    let mut segments = Vec::new();
    let mut name = String::new();
    let mut chars = key.chars();
    while let Some(c) = chars.next() {
        match c {
            '.' | '[' => {
                if !name.is_empty() {
                    segments.push(KeySegment::Name(std::mem::take(&mut name)));
                }
                if c == '[' {
                    let index: String = chars.by_ref().take_while(|c| *c != ']').collect();
                    match index.parse() {
                        Ok(i) => segments.push(KeySegment::Index(i)),
                        Err(_) => segments.push(KeySegment::Name(format!("[{index}]"))),
                    }
                }
            }
            c => name.push(c),
        }
    }
    if !name.is_empty() {
        segments.push(KeySegment::Name(name));
    }
    segments
}

fn table_at(list: Option<&Value>, index: usize) -> Option<&Map<String, Value>> {
    match &list?.kind {
        ValueKind::Array(items) => match &items.get(index)?.kind {
            ValueKind::Table(table) => Some(table),
            _ => None,
        },
        _ => None,
    }
}

// ---------------------------------------------------------------------------------------------
// Validation
// ---------------------------------------------------------------------------------------------

fn validate(raw: RawConfig, source: PathBuf, ctx: &Ctx) -> Result<QrbdConfig, ConfigError> {
    let node = validate_node(raw.node, ctx)?;
    let tls = raw.tls.map(|tls| validate_tls(tls, ctx)).transpose()?;

    let mut resources: Vec<ResourceConfig> = Vec::with_capacity(raw.resource.len());
    // Peer identity across resources: name -> (id, resource), id -> (name, resource).
    let mut peer_ids: HashMap<String, (u8, String)> = HashMap::new();
    let mut peer_names: HashMap<u8, (String, String)> = HashMap::new();
    for (i, raw_resource) in raw.resource.into_iter().enumerate() {
        let resource = validate_resource(raw_resource, i, &node, ctx)?;
        let place = resource_place(Some(&resource.name), i);
        if let Some(first) = resources.iter().position(|r| r.name == resource.name) {
            return Err(ctx.invalid(
                place,
                format!(
                    "defined twice (resources #{} and #{}); resource names must be unique",
                    first + 1,
                    i + 1
                ),
            ));
        }
        for peer in &resource.peers {
            let peer_place = format!("{place}: {}", peer_place(Some(&peer.name), 0));
            match peer_ids.get(&peer.name) {
                Some((id, other)) if *id != peer.id => {
                    return Err(ctx.invalid(
                        peer_place,
                        format!(
                            "id {} differs from resource {other:?}, where peer {:?} has id {id}; a node has the same id in every resource",
                            peer.id, peer.name
                        ),
                    ))
                }
                Some(_) => {}
                None => {
                    peer_ids.insert(peer.name.clone(), (peer.id, resource.name.clone()));
                }
            }
            match peer_names.get(&peer.id) {
                Some((name, other)) if *name != peer.name => {
                    return Err(ctx.invalid(
                        peer_place,
                        format!(
                            "id {} is already the id of peer {name:?} in resource {other:?}; a node has the same id in every resource",
                            peer.id
                        ),
                    ))
                }
                Some(_) => {}
                None => {
                    peer_names.insert(peer.id, (peer.name.clone(), resource.name.clone()));
                }
            }
        }
        resources.push(resource);
    }

    Ok(QrbdConfig {
        source,
        node,
        tls,
        resources,
    })
}

fn validate_node(raw: Option<RawNode>, ctx: &Ctx) -> Result<NodeConfig, ConfigError> {
    let Some(raw) = raw else {
        return Err(ctx.invalid(
            "the top level",
            "missing [node] section; it needs at least `name` and `id`",
        ));
    };
    let err = |key: &str, message: String| ctx.section_invalid("node", key, message);

    let name = raw.name.ok_or_else(|| ctx.missing("[node]", "name"))?.0;
    check_name(&name).map_err(|reason| err("name", format!("name {name:?} {reason}")))?;

    let id = raw.id.ok_or_else(|| ctx.missing("[node]", "id"))?.0;
    let id = check_id(id).map_err(|reason| err("id", format!("id {id} {reason}")))?;

    let path = |value: Option<Text>, key: &str, default: &str| -> Result<PathBuf, ConfigError> {
        match value {
            None => Ok(PathBuf::from(default)),
            Some(Text(text)) if text.trim().is_empty() => {
                Err(err(key, format!("{key} must not be empty")))
            }
            Some(Text(text)) => Ok(PathBuf::from(text)),
        }
    };
    let state_dir = path(raw.state_dir, "state_dir", DEFAULT_STATE_DIR)?;
    let mount_dir = path(raw.mount_dir, "mount_dir", DEFAULT_MOUNT_DIR)?;
    let admin_socket = path(raw.admin_socket, "admin_socket", DEFAULT_ADMIN_SOCKET)?;

    let listen = match raw.listen {
        None => DEFAULT_LISTEN,
        Some(Text(text)) => parse_socket_addr(&text)
            .map_err(|reason| err("listen", format!("listen {text:?}: {reason}")))?,
    };
    let metrics = match raw.metrics {
        None => None,
        Some(Text(text)) if text.trim().is_empty() => None,
        Some(Text(text)) => Some(
            parse_socket_addr(&text)
                .map_err(|reason| err("metrics", format!("metrics {text:?}: {reason}")))?,
        ),
    };
    let buffer_budget = match raw.buffer_budget {
        None => DEFAULT_BUFFER_BUDGET,
        Some(SizeText(text)) => {
            let bytes = parse_size(&text)
                .map_err(|e| err("buffer_budget", format!("buffer_budget: {e}")))?;
            if bytes < MIN_BUFFER_BUDGET {
                return Err(err(
                    "buffer_budget",
                    format!("buffer_budget {text:?} is too small (the minimum is 4MiB)"),
                ));
            }
            bytes
        }
    };

    Ok(NodeConfig {
        name,
        id,
        state_dir,
        mount_dir,
        admin_socket,
        listen,
        metrics,
        buffer_budget,
    })
}

fn validate_tls(raw: RawTls, ctx: &Ctx) -> Result<TlsConfig, ConfigError> {
    let path = |value: Option<Text>, key: &str| -> Result<PathBuf, ConfigError> {
        match value {
            None => Err(ctx.missing("[tls]", key)),
            Some(Text(text)) if text.trim().is_empty() => {
                Err(ctx.section_invalid("tls", key, format!("{key} must not be empty")))
            }
            Some(Text(text)) => Ok(PathBuf::from(text)),
        }
    };
    Ok(TlsConfig {
        ca: path(raw.ca, "ca")?,
        cert: path(raw.cert, "cert")?,
        key: path(raw.key, "key")?,
    })
}

fn validate_resource(
    raw: RawResource,
    index: usize,
    node: &NodeConfig,
    ctx: &Ctx,
) -> Result<ResourceConfig, ConfigError> {
    let place = resource_place(raw.name.as_ref().map(|n| n.0.as_str()), index);
    let name = raw.name.ok_or_else(|| ctx.missing(&place, "name"))?.0;
    check_name(&name).map_err(|reason| ctx.invalid(&place, format!("name {reason}")))?;

    let size = raw.size.ok_or_else(|| ctx.missing(&place, "size"))?.0;
    let size_bytes = parse_size(&size).map_err(|e| ctx.invalid(&place, e.to_string()))?;

    let protocol = match raw.protocol {
        None => ReplicationProtocol::C,
        Some(Text(text)) => text
            .parse()
            .map_err(|e| ctx.invalid(&place, format!("protocol: {e}")))?,
    };
    let allow_two_primaries = raw.allow_two_primaries.unwrap_or(false);
    // With two Primaries, a write that overlaps one of the peer's is settled by the peer's
    // answer to it (written, superseded or to be retried); protocols A and B complete a write
    // before that answer exists, so the conflict could not be resolved.
    if allow_two_primaries && protocol != ReplicationProtocol::C {
        return Err(ctx.invalid(
            &place,
            format!(
                "allow_two_primaries = true needs protocol \"C\" (this resource has protocol \"{protocol}\"): \
                 conflicting writes of two Primaries are resolved through the peer's write \
                 acknowledgement, which protocols A and B do not wait for"
            ),
        ));
    }
    let al_extents = match raw.al_extents {
        None => DEFAULT_AL_EXTENTS,
        Some(value) => check_al_extents(&value).map_err(|reason| ctx.invalid(&place, reason))?,
    };
    let resync_rate = match raw.resync_rate {
        None => DEFAULT_RESYNC_RATE,
        Some(value) => parse_resync_rate(&value).map_err(|reason| ctx.invalid(&place, reason))?,
    };
    let resync_control = validate_resync_control(
        [
            raw.c_plan_ahead.as_ref(),
            raw.c_fill_target.as_ref(),
            raw.c_delay_target.as_ref(),
            raw.c_max_rate.as_ref(),
            raw.c_min_rate.as_ref(),
        ],
        &place,
        ctx,
    )?;

    let mut peers: Vec<PeerConfig> = Vec::with_capacity(raw.peer.len());
    for (j, raw_peer) in raw.peer.into_iter().enumerate() {
        let peer_place = format!(
            "{place}: {}",
            peer_place(raw_peer.name.as_ref().map(|n| n.0.as_str()), j)
        );
        let peer = validate_peer(raw_peer, &peer_place, ctx)?;
        if peer.name == node.name {
            return Err(ctx.invalid(
                peer_place,
                "that is this node's own name ([node] name); list only the other nodes as peers",
            ));
        }
        if peer.id == node.id {
            return Err(ctx.invalid(
                peer_place,
                format!(
                    "id {} is this node's own id ([node] id); every node needs a different id",
                    peer.id
                ),
            ));
        }
        if let Some(other) = peers.iter().find(|p| p.name == peer.name) {
            return Err(ctx.invalid(
                peer_place,
                format!("listed twice (duplicate peer name {:?})", other.name),
            ));
        }
        if let Some(other) = peers.iter().find(|p| p.id == peer.id) {
            return Err(ctx.invalid(
                peer_place,
                format!(
                    "duplicate peer id {}: already used by peer {:?}",
                    peer.id, other.name
                ),
            ));
        }
        peers.push(peer);
    }

    // After the peers: `discard-node-NAME` must name this node or one of them.
    let mut node_names = vec![node.name.as_str()];
    node_names.extend(peers.iter().map(|p| p.name.as_str()));
    let invalid = |reason: String| ctx.invalid(&place, reason);
    let split_brain = SplitBrainPolicy {
        after_sb_0pri: match raw.after_sb_0pri {
            None => AfterSb0Pri::default(),
            Some(value) => parse_after_sb_0pri(&value, &node_names).map_err(invalid)?,
        },
        after_sb_1pri: match raw.after_sb_1pri {
            None => AfterSb1Pri::default(),
            Some(value) => parse_after_sb_1pri(&value).map_err(invalid)?,
        },
        after_sb_2pri: match raw.after_sb_2pri {
            None => AfterSb2Pri::default(),
            Some(value) => parse_after_sb_2pri(&value).map_err(invalid)?,
        },
    };

    Ok(ResourceConfig {
        name,
        size_bytes,
        protocol,
        disk_flushes: raw.disk_flushes.unwrap_or(true),
        csums: raw.csums.unwrap_or(false),
        al_extents,
        resync_rate,
        resync_control,
        split_brain,
        allow_two_primaries,
        peers,
    })
}

/// The `c_*` keys of a resource (the resync controller), in the order `c_plan_ahead`,
/// `c_fill_target`, `c_delay_target`, `c_max_rate`, `c_min_rate`; defaults for those not given.
fn validate_resync_control(
    [plan_ahead, fill_target, delay_target, max_rate, min_rate]: [Option<&Scalar>; 5],
    place: &str,
    ctx: &Ctx,
) -> Result<ResyncControl, ConfigError> {
    let invalid = |reason: String| ctx.invalid(place, reason);
    let defaults = ResyncControl::default();
    let plan_ahead = match plan_ahead {
        None => defaults.plan_ahead,
        Some(value) => parse_plan_ahead(value).map_err(invalid)?,
    };
    let fill_target = match fill_target {
        None => defaults.fill_target,
        Some(value) => parse_fill_target(value).map_err(invalid)?,
    };
    let delay_target = match delay_target {
        None => defaults.delay_target,
        Some(value) => parse_delay_target(value).map_err(invalid)?,
    };
    let max_rate = match max_rate {
        None => defaults.max_rate,
        Some(value) => parse_rate("c_max_rate", value, "0 means no bound").map_err(invalid)?,
    };
    let min_rate = match min_rate {
        None => defaults.min_rate,
        Some(value) => parse_rate(
            "c_min_rate",
            value,
            "0 means the resync never yields to application writes",
        )
        .map_err(invalid)?,
    };
    Ok(ResyncControl {
        plan_ahead,
        fill_target,
        delay_target,
        max_rate,
        min_rate,
    })
}

fn validate_peer(raw: RawPeer, place: &str, ctx: &Ctx) -> Result<PeerConfig, ConfigError> {
    let name = raw.name.ok_or_else(|| ctx.missing(place, "name"))?.0;
    check_name(&name).map_err(|reason| ctx.invalid(place, format!("name {reason}")))?;
    let id = raw.id.ok_or_else(|| ctx.missing(place, "id"))?.0;
    let id = check_id(id).map_err(|reason| ctx.invalid(place, format!("id {id} {reason}")))?;
    let address = raw.address.ok_or_else(|| ctx.missing(place, "address"))?.0;
    let bad_address = |reason: &str| ctx.invalid(place, format!("address {address:?}: {reason}"));
    let parsed = parse_socket_addr(&address).map_err(|reason| bad_address(&reason))?;
    if parsed.ip().is_unspecified() {
        return Err(bad_address(
            "an unspecified address cannot be connected to; give the peer's own IP address",
        ));
    }
    if parsed.port() == 0 {
        return Err(bad_address("port 0 cannot be connected to"));
    }
    Ok(PeerConfig {
        name,
        id,
        address: parsed,
    })
}

/// Names (of resources, nodes and peers): 1..=64 characters of `[A-Za-z0-9_.-]`, not starting
/// with `.` or `-`. Returns the reason on failure.
fn check_name(name: &str) -> Result<(), String> {
    if name.is_empty() {
        return Err("must not be empty".to_owned());
    }
    let len = name.chars().count();
    if len > MAX_NAME_LEN {
        return Err(format!(
            "is {len} characters long; at most {MAX_NAME_LEN} are allowed"
        ));
    }
    if name.starts_with('.') || name.starts_with('-') {
        return Err(format!("{name:?} must not start with '.' or '-'"));
    }
    if let Some(bad) = name
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-')))
    {
        return Err(format!(
            "{name:?} contains invalid character {bad:?}; only letters, digits, '_', '.' and '-' are allowed"
        ));
    }
    Ok(())
}

/// Node and peer ids: `0..=MAX_NODE_ID`. Returns the reason on failure.
fn check_id(id: i64) -> Result<u8, String> {
    u8::try_from(id)
        .ok()
        .filter(|id| *id <= MAX_NODE_ID)
        .ok_or_else(|| format!("is out of range (node ids are 0..={MAX_NODE_ID})"))
}

/// `[[resource]] al_extents`: an integer in `MIN_AL_EXTENTS..=MAX_AL_EXTENTS`. Returns the
/// message on failure.
fn check_al_extents(value: &Scalar) -> Result<usize, String> {
    let valid = format!(
        "give a whole number in {MIN_AL_EXTENTS}..={MAX_AL_EXTENTS} (default {DEFAULT_AL_EXTENTS})"
    );
    match value {
        Scalar::Int(n) => usize::try_from(*n)
            .ok()
            .filter(|n| (MIN_AL_EXTENTS..=MAX_AL_EXTENTS).contains(n))
            .ok_or_else(|| format!("al_extents {n} is out of range; {valid}")),
        Scalar::Text(text) => Err(format!(
            "al_extents {text:?} is a string; {valid}, without quotes"
        )),
        Scalar::Other { shown, what } => Err(format!("al_extents {shown} is {what}; {valid}")),
    }
}

/// `[[resource]] resync_rate`: bytes per second written like a size (`"100MiB"`, `"1G"`, or a
/// bare number of bytes), 0 for unlimited, otherwise at least `MIN_RESYNC_RATE`. Unlike a size
/// it need not be a multiple of 4096. Returns the message on failure.
fn parse_resync_rate(value: &Scalar) -> Result<u64, String> {
    parse_rate("resync_rate", value, "0 means unlimited")
}

/// A rate in bytes per second for `key`, as [`parse_resync_rate`] reads it; `zero` says what 0
/// means. Returns the message on failure.
fn parse_rate(key: &str, value: &Scalar, zero: &str) -> Result<u64, String> {
    let units = format!("{key} is in bytes per second, such as \"100MiB\" or \"512K\"; {zero}");
    let text = match value {
        Scalar::Int(n) => n.to_string(),
        Scalar::Text(text) => text.clone(),
        Scalar::Other { shown, what } => return Err(format!("{key} {shown} is {what} ({units})")),
    };
    let bytes =
        parse_byte_count(&text).map_err(|reason| format!("{key} {text:?}: {reason} ({units})"))?;
    if bytes != 0 && bytes < MIN_RESYNC_RATE {
        return Err(format!(
            "{key} {text:?} is too small: the minimum is 4KiB per second (one block); {zero}"
        ));
    }
    Ok(bytes)
}

/// `[[resource]] c_fill_target`: bytes written like a size, 0 or
/// `MIN_C_FILL_TARGET..=MAX_C_FILL_TARGET`. Returns the message on failure.
fn parse_fill_target(value: &Scalar) -> Result<u64, String> {
    const KEY: &str = "c_fill_target";
    const UNITS: &str = "c_fill_target is in bytes, such as \"8MiB\" or \"512K\", 4KiB..=64MiB; \
         0 means c_delay_target decides";
    let text = match value {
        Scalar::Int(n) => n.to_string(),
        Scalar::Text(text) => text.clone(),
        Scalar::Other { shown, what } => return Err(format!("{KEY} {shown} is {what} ({UNITS})")),
    };
    let bytes =
        parse_byte_count(&text).map_err(|reason| format!("{KEY} {text:?}: {reason} ({UNITS})"))?;
    if bytes != 0 && !(MIN_C_FILL_TARGET..=MAX_C_FILL_TARGET).contains(&bytes) {
        return Err(format!("{KEY} {text:?} is out of range ({UNITS})"));
    }
    Ok(bytes)
}

/// `[[resource]] c_plan_ahead`: a duration, 0 (the controller off) or a whole number of
/// `C_STEP`s up to `MAX_C_PLAN_AHEAD`. Returns the message on failure.
fn parse_plan_ahead(value: &Scalar) -> Result<Duration, String> {
    const KEY: &str = "c_plan_ahead";
    const VALID: &str = "c_plan_ahead is a duration such as \"2s\" or \"500ms\", \
         in whole 100ms steps up to 30s; 0 turns the resync controller off (resync_rate applies)";
    let duration = parse_duration(KEY, value).map_err(|reason| format!("{reason} ({VALID})"))?;
    let step = C_STEP.as_nanos();
    if duration > MAX_C_PLAN_AHEAD || duration.as_nanos() % step != 0 {
        return Err(format!("{KEY} {} is out of range ({VALID})", shown(value)));
    }
    Ok(duration)
}

/// `[[resource]] c_delay_target`: a duration in `MIN_C_DELAY_TARGET..=MAX_C_DELAY_TARGET`.
/// Returns the message on failure.
fn parse_delay_target(value: &Scalar) -> Result<Duration, String> {
    const KEY: &str = "c_delay_target";
    const VALID: &str = "c_delay_target is a duration such as \"1s\" or \"500ms\", 100ms..=10s";
    let duration = parse_duration(KEY, value).map_err(|reason| format!("{reason} ({VALID})"))?;
    if !(MIN_C_DELAY_TARGET..=MAX_C_DELAY_TARGET).contains(&duration) {
        return Err(format!("{KEY} {} is out of range ({VALID})", shown(value)));
    }
    Ok(duration)
}

/// How a scalar was written, for messages.
fn shown(value: &Scalar) -> String {
    match value {
        Scalar::Int(n) => n.to_string(),
        Scalar::Text(text) => format!("{text:?}"),
        Scalar::Other { shown, .. } => shown.clone(),
    }
}

/// A duration for `key`: a whole number with the unit `s` or `ms` (`"2s"`, `"500ms"`; a space
/// before the unit is allowed), or 0 without a unit. Returns the reason on failure.
fn parse_duration(key: &str, value: &Scalar) -> Result<Duration, String> {
    let text = match value {
        Scalar::Int(0) => return Ok(Duration::ZERO),
        Scalar::Int(n) => {
            return Err(format!(
                "{key} {n} has no unit; write \"{n}s\" or \"{n}ms\" in quotes"
            ))
        }
        Scalar::Text(text) => text,
        Scalar::Other { shown, what } => return Err(format!("{key} {shown} is {what}")),
    };
    let trimmed = text.trim();
    let fail = |reason: &str| Err(format!("{key} {text:?}: {reason}"));
    if trimmed.is_empty() {
        return fail("empty");
    }
    if trimmed.starts_with('-') {
        return fail("negative values are not allowed");
    }
    let digits_end = trimmed
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(trimmed.len());
    let (number, unit) = trimmed.split_at(digits_end);
    if number.is_empty() {
        return fail("does not start with a number");
    }
    let unit = unit.trim_start();
    if unit.starts_with('.') || unit.starts_with(',') {
        return fail("must be a whole number; use ms instead of a fraction (1500ms, not 1.5s)");
    }
    let Ok(number) = number.parse::<u64>() else {
        return fail("too large");
    };
    match unit.to_ascii_lowercase().as_str() {
        "" if number == 0 => Ok(Duration::ZERO),
        "" => fail("has no unit (use s or ms)"),
        "s" => Ok(Duration::from_secs(number)),
        "ms" => Ok(Duration::from_millis(number)),
        _ => fail(&format!("unknown unit {unit:?} (use s or ms)")),
    }
}

/// The `after_sb_0pri` values qrbd implements, besides `discard-node-NAME`; the default first.
const AFTER_SB_0PRI_VALUES: &[&str] = &[
    "disconnect",
    "discard-younger-primary",
    "discard-older-primary",
    "discard-zero-changes",
    "discard-least-changes",
];
/// The `after_sb_1pri` values qrbd implements; the default first.
const AFTER_SB_1PRI_VALUES: &[&str] = &["disconnect", "consensus", "discard-secondary"];
/// `after_sb_1pri` values of DRBD's that qrbd does not implement.
const AFTER_SB_1PRI_NOT_YET: &[&str] = &["call-pri-lost-after-sb", "violently-as0p"];
/// `after_sb_2pri` values of DRBD's besides `disconnect`.
const AFTER_SB_2PRI_DRBD: &[&str] = &["call-pri-lost-after-sb", "violently-as0p"];
/// Prefix of `after_sb_0pri = "discard-node-NAME"`.
const DISCARD_NODE: &str = "discard-node-";

/// `"a" (the default), "b", "c"`: the first value is the default.
fn quoted_list(values: &[&str]) -> String {
    values
        .iter()
        .enumerate()
        .map(|(i, v)| {
            if i == 0 {
                format!("{v:?} (the default)")
            } else {
                format!("{v:?}")
            }
        })
        .collect::<Vec<_>>()
        .join(", ")
}

/// The text of a split-brain policy key, or the message for a value that is not a string.
fn policy_text<'a>(key: &str, value: &'a Scalar, supported: &str) -> Result<&'a str, String> {
    match value {
        Scalar::Text(text) => Ok(text),
        Scalar::Int(n) => Err(format!(
            "{key} {n} is a number; give a string in quotes; {supported}"
        )),
        Scalar::Other { shown, what } => Err(format!(
            "{key} {shown} is {what}; give a string in quotes; {supported}"
        )),
    }
}

/// `[[resource]] after_sb_0pri` (DRBD's `after-sb-0pri`): what to do after a split brain when
/// neither node is Primary. `node_names` are this node's name, then the resource's peers'.
/// Returns the message on failure.
fn parse_after_sb_0pri(value: &Scalar, node_names: &[&str]) -> Result<AfterSb0Pri, String> {
    const KEY: &str = "after_sb_0pri";
    let names = match node_names.split_first() {
        Some((me, peers)) => std::iter::once(format!("{me} (this node)"))
            .chain(peers.iter().map(|p| (*p).to_owned()))
            .collect::<Vec<_>>()
            .join(", "),
        None => String::new(),
    };
    let supported = format!(
        "supported: {}, \"discard-node-NAME\" where NAME is one of: {names}",
        quoted_list(AFTER_SB_0PRI_VALUES)
    );
    let text = policy_text(KEY, value, &supported)?;
    match text {
        "disconnect" => return Ok(AfterSb0Pri::Disconnect),
        "discard-zero-changes" => return Ok(AfterSb0Pri::DiscardZeroChanges),
        "discard-least-changes" => return Ok(AfterSb0Pri::DiscardLeastChanges),
        "discard-younger-primary" => return Ok(AfterSb0Pri::DiscardYoungerPrimary),
        "discard-older-primary" => return Ok(AfterSb0Pri::DiscardOlderPrimary),
        _ => {}
    }
    if let Some(name) = text.strip_prefix(DISCARD_NODE) {
        if node_names.contains(&name) {
            return Ok(AfterSb0Pri::DiscardNode(name.to_owned()));
        }
        // A suggestion only for a name one edit (case aside) from a known one: "delta" is not
        // a typo of "beta".
        let lower = name.to_ascii_lowercase();
        let close = node_names
            .iter()
            .map(|n| (edit_distance(&lower, &n.to_ascii_lowercase()), n))
            .filter(|(distance, _)| *distance <= 1)
            .min_by_key(|(distance, _)| *distance)
            .map(|(_, n)| format!("{DISCARD_NODE}{n}"));
        return Err(format!(
            "{KEY} {text:?}: {name:?} is neither this node nor a peer of this resource{}; NAME in \"discard-node-NAME\" must be one of: {names}",
            did_you_mean(&close)
        ));
    }
    if ["consensus", "discard-secondary"].contains(&text) || AFTER_SB_1PRI_NOT_YET.contains(&text) {
        return Err(format!(
            "{KEY} {text:?} is a policy for after_sb_1pri (one node Primary), not for after_sb_0pri; {supported}"
        ));
    }
    Err(format!(
        "{KEY} {text:?} is not a split-brain policy{}; {supported}",
        did_you_mean(&suggest(text, AFTER_SB_0PRI_VALUES))
    ))
}

/// `[[resource]] after_sb_1pri` (DRBD's `after-sb-1pri`): what to do after a split brain when
/// one node is Primary. Returns the message on failure.
fn parse_after_sb_1pri(value: &Scalar) -> Result<AfterSb1Pri, String> {
    const KEY: &str = "after_sb_1pri";
    let supported = format!("supported: {}", quoted_list(AFTER_SB_1PRI_VALUES));
    let text = policy_text(KEY, value, &supported)?;
    match text {
        "disconnect" => return Ok(AfterSb1Pri::Disconnect),
        "consensus" => return Ok(AfterSb1Pri::Consensus),
        "discard-secondary" => return Ok(AfterSb1Pri::DiscardSecondary),
        _ => {}
    }
    if AFTER_SB_1PRI_NOT_YET.contains(&text) {
        return Err(format!(
            "{KEY} {text:?} is a DRBD policy qrbd does not implement; {supported}"
        ));
    }
    if text.starts_with(DISCARD_NODE) || AFTER_SB_0PRI_VALUES[1..].contains(&text) {
        return Err(format!(
            "{KEY} {text:?} is a policy for after_sb_0pri (neither node Primary), not for after_sb_1pri; \"consensus\" applies after_sb_0pri when it picks the Secondary; {supported}"
        ));
    }
    Err(format!(
        "{KEY} {text:?} is not a split-brain policy{}; {supported}",
        did_you_mean(&suggest(text, AFTER_SB_1PRI_VALUES))
    ))
}

/// `[[resource]] after_sb_2pri` (DRBD's `after-sb-2pri`): what to do after a split brain when
/// both nodes are Primary. Only `disconnect`. Returns the message on failure.
fn parse_after_sb_2pri(value: &Scalar) -> Result<AfterSb2Pri, String> {
    const KEY: &str = "after_sb_2pri";
    let supported =
        "with two Primaries only disconnect is safe: the only supported value is \"disconnect\" (the default)";
    let text = policy_text(KEY, value, supported)?;
    if text == "disconnect" {
        return Ok(AfterSb2Pri::Disconnect);
    }
    let what = if AFTER_SB_2PRI_DRBD.contains(&text) {
        " is a DRBD policy qrbd refuses".to_owned()
    } else {
        format!(
            " is not accepted{}",
            did_you_mean(&suggest(text, &["disconnect"]))
        )
    };
    Err(format!("{KEY} {text:?}{what}; {supported}"))
}

fn parse_socket_addr(text: &str) -> Result<SocketAddr, String> {
    text.trim().parse().map_err(|_| {
        "not a valid socket address; expected IP:PORT such as 192.0.2.2:7788 or [2001:db8::2]:7788 (host names are not resolved)".to_owned()
    })
}

/// Parses a size: a whole number with an optional unit `B`, `KiB`, `MiB`, `GiB`, `TiB` (or `K`,
/// `M`, `G`, `T`, also binary; units are case-insensitive, a space before the unit is allowed).
/// The result must be greater than zero and a multiple of 4096 (`SIZE_ALIGNMENT`).
pub fn parse_size(text: &str) -> Result<u64, ConfigError> {
    let fail = |reason: String| ConfigError::BadSize {
        text: text.to_owned(),
        reason,
    };
    let bytes = parse_byte_count(text).map_err(fail)?;
    if bytes == 0 {
        return Err(fail("must be greater than zero".to_owned()));
    }
    if bytes % SIZE_ALIGNMENT != 0 {
        return Err(fail(format!(
            "{bytes} bytes is not a multiple of {SIZE_ALIGNMENT}"
        )));
    }
    Ok(bytes)
}

/// A whole number of bytes with an optional unit, as [`parse_size`] reads it, but 0 and any
/// multiple are allowed. Returns the reason on failure.
fn parse_byte_count(text: &str) -> Result<u64, String> {
    let trimmed = text.trim();
    if trimmed.is_empty() {
        return Err(
            "empty; give a whole number of bytes with an optional unit, such as 1GiB".to_owned(),
        );
    }
    if trimmed.starts_with('-') {
        return Err("negative values are not allowed".to_owned());
    }
    let digits_end = trimmed
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(trimmed.len());
    let (number, unit) = trimmed.split_at(digits_end);
    if number.is_empty() {
        return Err("does not start with a number; write e.g. 1GiB or 4096".to_owned());
    }
    let unit = unit.trim_start();
    if unit.starts_with('.') || unit.starts_with(',') {
        return Err(
            "must be a whole number; use a smaller unit instead of a fraction (e.g. 1536MiB, not 1.5GiB)"
                .to_owned(),
        );
    }
    let multiplier = match unit.to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kib" => KIB,
        "m" | "mib" => MIB,
        "g" | "gib" => GIB,
        "t" | "tib" => TIB,
        _ => return Err(format!("unknown unit {unit:?} (use KiB, MiB, GiB or TiB)")),
    };
    let too_large = || "too large (it does not fit in 64 bits)".to_owned();
    number
        .parse::<u64>()
        .map_err(|_| too_large())?
        .checked_mul(multiplier)
        .ok_or_else(too_large)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect()
    }

    fn load_ok(text: &str) -> QrbdConfig {
        match load_from_str(text, &[]) {
            Ok(config) => config,
            Err(e) => panic!("expected to load, got: {e}"),
        }
    }

    /// Loads `text`, expects an error and checks its message contains every word in `words`.
    fn load_err(text: &str, words: &[&str]) -> String {
        load_err_env(text, &[], words)
    }

    fn load_err_env(text: &str, vars: &[(&str, &str)], words: &[&str]) -> String {
        match load_from_str(text, &env(vars)) {
            Ok(config) => panic!("expected an error containing {words:?}, loaded {config:?}"),
            Err(e) => {
                let message = e.to_string();
                for word in words {
                    assert!(
                        message.contains(word),
                        "message {message:?} does not contain {word:?}"
                    );
                }
                message
            }
        }
    }

    const MINIMAL: &str = "[node]\nname = \"alpha\"\nid = 0\n";

    fn with_node(rest: &str) -> String {
        format!("{MINIMAL}{rest}")
    }

    const FULL: &str = r#"
        [node]
        name = "alpha"
        id = 3
        state_dir = "/srv/qrbd"
        mount_dir = "/mnt/qrbd"
        admin_socket = "/tmp/qrbd.sock"
        listen = "127.0.0.1:7000"
        metrics = "127.0.0.1:9942"
        buffer_budget = "128MiB"

        [tls]
        ca = "/etc/qrbd/tls/ca.crt"
        cert = "/etc/qrbd/tls/alpha.crt"
        key = "/etc/qrbd/tls/alpha.key"

        [[resource]]
        name = "r0"
        size = "1GiB"
        protocol = "A"
        disk_flushes = false
        csums = true
        al_extents = 3001
        resync_rate = "100M"
        c_plan_ahead = "500ms"
        c_fill_target = 0
        c_delay_target = "300ms"
        c_max_rate = "1G"
        c_min_rate = 0
        after_sb_0pri = "discard-node-gamma"
        after_sb_1pri = "consensus"
        after_sb_2pri = "disconnect"

          [[resource.peer]]
          name = "beta"
          id = 1
          address = "192.0.2.2:7788"

          [[resource.peer]]
          name = "gamma"
          id = 2
          address = "[2001:db8::3]:7788"

        [[resource]]
        name = "r1"
        size = 8192
        allow_two_primaries = true
    "#;

    // --- sizes -------------------------------------------------------------------------------

    #[test]
    fn size_suffixes() {
        let cases: &[(&str, u64)] = &[
            ("4096", 4096),
            ("4096B", 4096),
            ("8192 B", 8192),
            ("4K", 4096),
            ("4KiB", 4096),
            ("4kib", 4096),
            ("1M", MIB),
            ("64MiB", 64 * MIB),
            ("1G", GIB),
            ("1GiB", GIB),
            (" 2 GiB ", 2 * GIB),
            ("1T", TIB),
            ("3TiB", 3 * TIB),
            ("16777215TiB", 16_777_215 * TIB),
        ];
        for (text, bytes) in cases {
            match parse_size(text) {
                Ok(parsed) => assert_eq!(parsed, *bytes, "{text:?}"),
                Err(e) => panic!("{text:?}: {e}"),
            }
        }
    }

    #[test]
    fn size_errors() {
        let cases: &[(&str, &[&str])] = &[
            ("", &["empty"]),
            ("   ", &["empty"]),
            ("-1GiB", &["negative"]),
            (
                "12XB",
                &["\"12XB\"", "unknown unit \"XB\"", "KiB, MiB, GiB or TiB"],
            ),
            ("1KB", &["unknown unit \"KB\""]),
            ("GiB", &["number"]),
            ("1.5GiB", &["whole number"]),
            ("0", &["greater than zero"]),
            ("0GiB", &["greater than zero"]),
            ("4097", &["not a multiple of 4096"]),
            ("1K1", &["unknown unit"]),
            ("99999999999999999999999", &["too large"]),
            ("16777216TiB", &["too large"]),
        ];
        for (text, words) in cases {
            match parse_size(text) {
                Ok(bytes) => panic!("{text:?} parsed as {bytes}"),
                Err(e) => {
                    let message = e.to_string();
                    for word in *words {
                        assert!(
                            message.contains(word),
                            "{text:?}: {message:?} lacks {word:?}"
                        );
                    }
                }
            }
        }
    }

    // --- loading and defaults ----------------------------------------------------------------

    #[test]
    fn defaults_applied() {
        let config = load_ok(MINIMAL);
        assert_eq!(config.source, PathBuf::from("<inline>"));
        assert_eq!(config.node.name, "alpha");
        assert_eq!(config.node.id, 0);
        assert_eq!(config.node.state_dir, PathBuf::from("/var/lib/qrbd"));
        assert_eq!(config.node.mount_dir, PathBuf::from("/run/qrbd/disks"));
        assert_eq!(
            config.node.admin_socket,
            PathBuf::from("/run/qrbd/qrbd.sock")
        );
        assert_eq!(
            config.node.listen,
            "0.0.0.0:7788".parse::<SocketAddr>().unwrap()
        );
        assert_eq!(config.node.metrics, None);
        assert_eq!(config.node.buffer_budget, 64 * MIB);
        assert_eq!(config.image_buffer_budget(), 64 * MIB);
        assert_eq!(config.tls, None);
        assert!(config.resources.is_empty());

        let config = load_ok(&with_node("[[resource]]\nname = \"r0\"\nsize = \"1GiB\"\n"));
        assert_eq!(config.resources[0].protocol, ReplicationProtocol::C);
        assert!(config.resources[0].disk_flushes);
        assert_eq!(config.resources[0].al_extents, 1237);
        assert_eq!(config.resources[0].al_extents, DEFAULT_AL_EXTENTS);
        assert_eq!(config.resources[0].resync_rate, 0, "unlimited");
        assert_eq!(config.resources[0].resync_rate, DEFAULT_RESYNC_RATE);
        let control = &config.resources[0].resync_control;
        assert_eq!(control.plan_ahead, Duration::from_secs(2));
        assert_eq!(control.fill_target, 8 * MIB);
        assert_eq!(control.delay_target, Duration::from_secs(1));
        assert_eq!(control.max_rate, 0, "no bound");
        assert_eq!(control.min_rate, 4 * MIB);
        assert_eq!(*control, ResyncControl::default());
        let split_brain = &config.resources[0].split_brain;
        assert_eq!(*split_brain, SplitBrainPolicy::default());
        assert_eq!(split_brain.after_sb_0pri, AfterSb0Pri::Disconnect);
        assert_eq!(split_brain.after_sb_1pri, AfterSb1Pri::Disconnect);
        assert_eq!(split_brain.after_sb_2pri, AfterSb2Pri::Disconnect);
        assert!(!config.resources[0].allow_two_primaries);
        assert!(config.resources[0].peers.is_empty());
    }

    #[test]
    fn buffer_budget_is_split_between_images() {
        let resources = |count: usize| -> String {
            (0..count)
                .map(|i| format!("[[resource]]\nname = \"r{i}\"\nsize = \"1GiB\"\n"))
                .collect()
        };
        assert_eq!(
            load_ok(&with_node(&resources(1))).image_buffer_budget(),
            64 * MIB
        );
        assert_eq!(
            load_ok(&with_node(&resources(2))).image_buffer_budget(),
            32 * MIB
        );
        assert_eq!(
            load_ok(&with_node(&resources(3))).image_buffer_budget(),
            64 * MIB / 3
        );
        // Never below the smallest budget a node may have.
        assert_eq!(
            load_ok(&with_node(&resources(40))).image_buffer_budget(),
            4 * MIB
        );
    }

    #[test]
    fn full_config_loads_every_key() {
        let config = load_ok(FULL);
        let expected = QrbdConfig {
            source: PathBuf::from("<inline>"),
            node: NodeConfig {
                name: "alpha".into(),
                id: 3,
                state_dir: "/srv/qrbd".into(),
                mount_dir: "/mnt/qrbd".into(),
                admin_socket: "/tmp/qrbd.sock".into(),
                listen: "127.0.0.1:7000".parse().unwrap(),
                metrics: Some("127.0.0.1:9942".parse().unwrap()),
                buffer_budget: 128 * MIB,
            },
            tls: Some(TlsConfig {
                ca: "/etc/qrbd/tls/ca.crt".into(),
                cert: "/etc/qrbd/tls/alpha.crt".into(),
                key: "/etc/qrbd/tls/alpha.key".into(),
            }),
            resources: vec![
                ResourceConfig {
                    name: "r0".into(),
                    size_bytes: GIB,
                    protocol: ReplicationProtocol::A,
                    disk_flushes: false,
                    csums: true,
                    al_extents: 3001,
                    resync_rate: 100 * MIB,
                    resync_control: ResyncControl {
                        plan_ahead: Duration::from_millis(500),
                        fill_target: 0,
                        delay_target: Duration::from_millis(300),
                        max_rate: GIB,
                        min_rate: 0,
                    },
                    split_brain: SplitBrainPolicy {
                        after_sb_0pri: AfterSb0Pri::DiscardNode("gamma".into()),
                        after_sb_1pri: AfterSb1Pri::Consensus,
                        after_sb_2pri: AfterSb2Pri::Disconnect,
                    },
                    allow_two_primaries: false,
                    peers: vec![
                        PeerConfig {
                            name: "beta".into(),
                            id: 1,
                            address: "192.0.2.2:7788".parse().unwrap(),
                        },
                        PeerConfig {
                            name: "gamma".into(),
                            id: 2,
                            address: "[2001:db8::3]:7788".parse().unwrap(),
                        },
                    ],
                },
                ResourceConfig {
                    name: "r1".into(),
                    size_bytes: 8192,
                    protocol: ReplicationProtocol::C,
                    disk_flushes: true,
                    csums: false,
                    al_extents: 1237,
                    resync_rate: 0,
                    resync_control: ResyncControl::default(),
                    split_brain: SplitBrainPolicy::default(),
                    allow_two_primaries: true,
                    peers: vec![],
                },
            ],
        };
        assert_eq!(config, expected);
    }

    #[test]
    fn resource_lookup_and_paths() {
        let config = load_ok(FULL);
        assert_eq!(config.resource("r1").map(|r| r.size_bytes).ok(), Some(8192));
        let message = match config.resource("r9") {
            Ok(_) => panic!("r9 should not exist"),
            Err(e) => e.to_string(),
        };
        assert_eq!(
            message,
            "no resource named \"r9\" in <inline>; configured: r0, r1"
        );
        let empty = load_ok(MINIMAL);
        assert!(empty
            .resource("r0")
            .is_err_and(|e| e.to_string().contains("configured: none")));
        assert_eq!(config.backing_path("r0"), PathBuf::from("/srv/qrbd/r0.img"));
        assert_eq!(config.meta_path("r0"), PathBuf::from("/srv/qrbd/r0.meta"));
    }

    #[test]
    fn protocol_case_and_integer_size() {
        let config = load_ok(&with_node(
            "[[resource]]\nname = \"r0\"\nsize = 1073741824\nprotocol = \"b\"\n",
        ));
        assert_eq!(config.resources[0].size_bytes, GIB);
        assert_eq!(config.resources[0].protocol, ReplicationProtocol::B);
    }

    #[test]
    fn empty_metrics_means_off() {
        let config = load_ok(&format!("{MINIMAL}metrics = \"\"\n"));
        assert_eq!(config.node.metrics, None);
    }

    // --- environment overrides ---------------------------------------------------------------

    #[test]
    fn env_overrides_node_name_and_id() {
        let config = match load_from_str(
            FULL,
            &env(&[
                ("QRBD_NODE__NAME", "delta"),
                ("QRBD_NODE__ID", "7"),
                ("QRBD_NODE__STATE_DIR", "/tmp/x"),
                ("QRBD_NODE__BUFFER_BUDGET", "32MiB"),
                ("QRBD_TLS__KEY", "/tmp/delta.key"),
                // Not ours: ignored.
                ("QRBD_CONFIG", "/elsewhere.toml"),
                ("QRBD_LOG", "debug"),
                ("PATH", "/bin"),
            ]),
        ) {
            Ok(config) => config,
            Err(e) => panic!("{e}"),
        };
        assert_eq!(config.node.name, "delta");
        assert_eq!(config.node.id, 7);
        assert_eq!(config.node.state_dir, PathBuf::from("/tmp/x"));
        assert_eq!(config.node.buffer_budget, 32 * MIB);
        assert_eq!(config.backing_path("r0"), PathBuf::from("/tmp/x/r0.img"));
        assert_eq!(
            config.tls.as_ref().map(|t| t.key.clone()),
            Some("/tmp/delta.key".into())
        );
        // Untouched keys keep the file's values.
        assert_eq!(config.node.mount_dir, PathBuf::from("/mnt/qrbd"));
    }

    #[test]
    fn env_supplies_required_keys_and_keeps_names_as_text() {
        let config = match load_from_str(
            "",
            &env(&[("QRBD_NODE__NAME", "007"), ("qrbd_node__id", "31")]),
        ) {
            Ok(config) => config,
            Err(e) => panic!("{e}"),
        };
        assert_eq!(config.node.name, "007");
        assert_eq!(config.node.id, 31);
    }

    #[test]
    fn env_errors_name_the_variable() {
        load_err_env(
            MINIMAL,
            &[("QRBD_NODE__NMAE", "beta")],
            &[
                "QRBD_NODE__NMAE",
                "unknown key \"nmae\"",
                "did you mean \"name\"",
                "state_dir",
            ],
        );
        load_err_env(
            MINIMAL,
            &[("QRBD_NODE__ID", "40")],
            &["[node]", "id 40", "out of range", "0..=31", "QRBD_NODE__ID"],
        );
        load_err_env(
            MINIMAL,
            &[("QRBD_NODE__ID", "one")],
            &["[node]", "id", "\"one\"", "integer", "QRBD_NODE__ID"],
        );
        load_err_env(
            MINIMAL,
            &[("QRBD_NODE__LISTEN", "localhost:7788")],
            &[
                "listen \"localhost:7788\"",
                "socket address",
                "QRBD_NODE__LISTEN",
            ],
        );
    }

    // --- validation messages -----------------------------------------------------------------

    #[test]
    fn unknown_keys_are_reported_with_expected_keys() {
        load_err(
            "[node]\nnmae = \"alpha\"\nid = 0\n",
            &[
                "<inline>",
                "[node]",
                "unknown key \"nmae\"",
                "did you mean \"name\"",
                "name, id, state_dir",
            ],
        );
        load_err(
            &with_node("[[resource]]\nname = \"r0\"\nsize = \"1GiB\"\nsise = 1\n"),
            &[
                "resource \"r0\"",
                "unknown key \"sise\"",
                "name, size, protocol, disk_flushes, al_extents, resync_rate, c_plan_ahead, c_fill_target, c_delay_target, c_max_rate, c_min_rate, after_sb_0pri, after_sb_1pri, after_sb_2pri, csums, allow_two_primaries, peer",
            ],
        );
        // DRBD's spellings and near misses of the new keys get a suggestion.
        for (typo, key) in [
            ("al-extents", "al_extents"),
            ("al_extent", "al_extents"),
            ("resync-rate", "resync_rate"),
            ("resync_rat", "resync_rate"),
            ("c-plan-ahead", "c_plan_ahead"),
            ("c-fill-target", "c_fill_target"),
            ("c-delay-target", "c_delay_target"),
            ("c-max-rate", "c_max_rate"),
            ("c-min-rate", "c_min_rate"),
            ("plan_ahead", "c_plan_ahead"),
            ("after-sb-0pri", "after_sb_0pri"),
            ("after-sb-1pri", "after_sb_1pri"),
            ("after-sb-2pri", "after_sb_2pri"),
            ("after_sb_0_pri", "after_sb_0pri"),
            ("aftersb_1pri", "after_sb_1pri"),
            ("allow-two-primaries", "allow_two_primaries"),
            ("allow_two_primary", "allow_two_primaries"),
        ] {
            load_err(
                &with_node(&format!(
                    "[[resource]]\nname = \"r0\"\nsize = \"1GiB\"\n{typo} = 1\n"
                )),
                &[
                    "resource \"r0\"",
                    &format!("unknown key \"{typo}\""),
                    &format!("did you mean \"{key}\""),
                ],
            );
        }
        // Keys that exist elsewhere are still unknown in a resource.
        load_err(
            &with_node("[[resource]]\nname = \"r0\"\nsize = \"1GiB\"\nbuffer_budget = \"8MiB\"\n"),
            &[
                "resource \"r0\"",
                "unknown key \"buffer_budget\"",
                "al_extents",
            ],
        );
        load_err(
            &with_node(
                "[[resource]]\nname = \"r0\"\nsize = \"1GiB\"\n[[resource.peer]]\nname = \"beta\"\nid = 1\naddr = \"192.0.2.2:7788\"\n",
            ),
            &["resource \"r0\": peer \"beta\"", "unknown key \"addr\"", "name, id, address"],
        );
        load_err(
            &with_node("[tls]\nca = \"a\"\ncert = \"b\"\nkey = \"c\"\nkey_password = \"x\"\n"),
            &["[tls]", "unknown key \"key_password\"", "ca, cert, key"],
        );
        load_err(
            &with_node("[[resources]]\nname = \"r0\"\n"),
            &[
                "top level",
                "unknown key \"resources\"",
                "did you mean \"resource\"",
            ],
        );
    }

    /// The `deny_unknown_fields` backstop, reached without the structure check: the config
    /// crate's message must still name the key, the expected keys and the place.
    #[test]
    fn deny_unknown_fields_through_config_crate() {
        let ctx = Ctx {
            file: "test.toml".into(),
            env_vars: HashMap::new(),
        };
        let cases: &[(&str, &[&str])] = &[
            (
                "[node]\nnmae = \"alpha\"\n",
                &["test.toml: [node]", "nmae", "`name`", "`id`"],
            ),
            (
                "[[resource]]\nname = \"r0\"\n[[resource.peer]]\nname = \"b\"\nadress = \"x\"\n",
                &["resource \"r0\": peer \"b\"", "adress", "`address`"],
            ),
            ("extra = 1\n", &["extra", "`node`", "`resource`"]),
        ];
        for (text, words) in cases {
            let built = Config::builder()
                .add_source(File::from_str(text, FileFormat::Toml))
                .build()
                .expect("valid TOML");
            let tree: Map<String, Value> = built.clone().try_deserialize().expect("a table");
            let error = match built.try_deserialize::<RawConfig>() {
                Ok(raw) => panic!("{text:?} deserialized: {raw:?}"),
                Err(e) => translate_deserialize_error(&e, &tree, &ctx).to_string(),
            };
            for word in *words {
                assert!(error.contains(word), "{error:?} lacks {word:?}");
            }
        }
    }

    #[test]
    fn key_paths_from_the_config_crate() {
        let built = Config::builder()
            .add_source(File::from_str(FULL, FileFormat::Toml))
            .build()
            .expect("valid TOML");
        let tree: Map<String, Value> = built.try_deserialize().expect("a table");
        for key in ["resource[0]peer[1]id", "resource[0].peer[1].id"] {
            assert_eq!(
                describe_key(&tree, key),
                (
                    "resource \"r0\": peer \"gamma\"".to_owned(),
                    "id".to_owned()
                )
            );
        }
        assert_eq!(
            describe_key(&tree, "resource[1]size"),
            ("resource \"r1\"".to_owned(), "size".to_owned())
        );
        assert_eq!(
            describe_key(&tree, "resource[7]"),
            ("resource #8".to_owned(), String::new())
        );
        assert_eq!(
            describe_key(&tree, "node.id"),
            ("[node]".to_owned(), "id".to_owned())
        );
    }

    #[test]
    fn missing_required_keys() {
        load_err("", &["missing [node] section", "name", "id"]);
        load_err(
            "[node]\nid = 0\n",
            &["[node]", "missing required key \"name\""],
        );
        load_err(
            "[node]\nname = \"alpha\"\n",
            &["[node]", "missing required key \"id\""],
        );
        load_err(
            &with_node("[[resource]]\nsize = \"1GiB\"\n"),
            &["resource #1", "missing required key \"name\""],
        );
        load_err(
            &with_node("[[resource]]\nname = \"r0\"\n"),
            &["resource \"r0\"", "missing required key \"size\""],
        );
        let peer = |body: &str| {
            with_node(&format!(
                "[[resource]]\nname = \"r0\"\nsize = \"1GiB\"\n[[resource.peer]]\n{body}"
            ))
        };
        load_err(
            &peer("id = 1\naddress = \"192.0.2.2:7788\"\n"),
            &["resource \"r0\": peer #1", "missing required key \"name\""],
        );
        load_err(
            &peer("name = \"beta\"\naddress = \"192.0.2.2:7788\"\n"),
            &["peer \"beta\"", "missing required key \"id\""],
        );
        load_err(
            &peer("name = \"beta\"\nid = 1\n"),
            &["peer \"beta\"", "missing required key \"address\""],
        );
        load_err(
            &with_node("[tls]\nca = \"a\"\ncert = \"b\"\n"),
            &["[tls]", "missing required key \"key\""],
        );
    }

    #[test]
    fn missing_file_and_syntax_errors() {
        let path = Path::new("/nonexistent/qrbd-test/qrbd.toml");
        let message = match load(path) {
            Ok(_) => panic!("loaded a missing file"),
            Err(e) => e.to_string(),
        };
        assert!(
            message.contains("/nonexistent/qrbd-test/qrbd.toml"),
            "{message}"
        );
        assert!(message.contains("--config"), "{message}");

        load_err(
            "[node\nname = \"alpha\"\n",
            &["<inline>", "TOML syntax error", "line 1"],
        );
        load_err("[node]\nname = alpha\n", &["TOML syntax error", "line 2"]);
        load_err(
            "[node]\nname = \"a\"\nname = \"b\"\nid = 0\n",
            &["TOML syntax error", "duplicate"],
        );
    }

    #[test]
    fn load_reads_a_file() {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("qrbd.toml");
        std::fs::write(
            &path,
            "[node]\nname = \"alpha\"\nid = 0\nstate_dir = \"/tmp/s\"\n",
        )
        .expect("write");
        let config = match load(&path) {
            Ok(config) => config,
            Err(e) => panic!("{e}"),
        };
        assert_eq!(config.source, path);
        std::fs::write(&path, "[node]\nname = \"alpha\"\nid = 99\n").expect("write");
        let message = load(&path)
            .map(|_| ())
            .expect_err("node id 99 is out of range")
            .to_string();
        assert!(
            message.starts_with(&path.display().to_string()),
            "{message}"
        );
        assert!(message.contains("out of range"), "{message}");
    }

    #[test]
    fn bad_sizes_in_resources_and_budget() {
        let resource =
            |size: &str| with_node(&format!("[[resource]]\nname = \"r0\"\nsize = {size}\n"));
        let message = load_err(&resource("\"12XB\""), &[]);
        assert_eq!(
            message,
            "<inline>: resource \"r0\": size \"12XB\": unknown unit \"XB\" (use KiB, MiB, GiB or TiB)"
        );
        load_err(&resource("\"\""), &["resource \"r0\"", "empty"]);
        load_err(&resource("\"-4KiB\""), &["resource \"r0\"", "negative"]);
        load_err(&resource("-4096"), &["resource \"r0\"", "negative"]);
        load_err(&resource("0"), &["resource \"r0\"", "greater than zero"]);
        load_err(
            &resource("\"1000\""),
            &["resource \"r0\"", "not a multiple of 4096"],
        );
        load_err(
            &resource("\"99999999TiB\""),
            &["resource \"r0\"", "too large"],
        );
        load_err(&resource("true"), &["resource \"r0\"", "size", "boolean"]);
        load_err(
            &format!("{MINIMAL}buffer_budget = \"1MiB\"\n"),
            &["[node]", "buffer_budget", "too small", "4MiB"],
        );
        load_err(
            &format!("{MINIMAL}buffer_budget = \"lots\"\n"),
            &["[node]", "buffer_budget", "\"lots\""],
        );
    }

    #[test]
    fn duplicates_and_self_references() {
        let r = |name: &str| format!("[[resource]]\nname = \"{name}\"\nsize = \"1GiB\"\n");
        let p = |name: &str, id: u8| {
            format!("[[resource.peer]]\nname = \"{name}\"\nid = {id}\naddress = \"192.0.2.{id}:7788\"\n")
        };
        load_err(
            &with_node(&format!("{}{}", r("r0"), r("r0"))),
            &["resource \"r0\"", "defined twice", "unique"],
        );
        load_err(
            &with_node(&format!("{}{}{}", r("r0"), p("beta", 1), p("gamma", 1))),
            &[
                "resource \"r0\": peer \"gamma\"",
                "duplicate peer id 1",
                "\"beta\"",
            ],
        );
        load_err(
            &with_node(&format!("{}{}{}", r("r0"), p("beta", 1), p("beta", 2))),
            &["peer \"beta\"", "listed twice", "duplicate peer name"],
        );
        load_err(
            &with_node(&format!("{}{}", r("r0"), p("gamma", 0))),
            &["peer \"gamma\"", "id 0", "this node's own id"],
        );
        load_err(
            &with_node(&format!("{}{}", r("r0"), p("alpha", 4))),
            &["peer \"alpha\"", "this node's own name"],
        );
        load_err(
            &with_node(&format!(
                "{}{}{}{}",
                r("r0"),
                p("beta", 1),
                r("r1"),
                p("beta", 2)
            )),
            &[
                "resource \"r1\": peer \"beta\"",
                "id 2",
                "same id in every resource",
            ],
        );
        load_err(
            &with_node(&format!(
                "{}{}{}{}",
                r("r0"),
                p("beta", 1),
                r("r1"),
                p("gamma", 1)
            )),
            &[
                "resource \"r1\": peer \"gamma\"",
                "already the id of peer \"beta\"",
            ],
        );
        // The same peer in several resources is fine.
        load_ok(&with_node(&format!(
            "{}{}{}{}",
            r("r0"),
            p("beta", 1),
            r("r1"),
            p("beta", 1)
        )));
    }

    #[test]
    fn ids_out_of_range() {
        load_err(
            "[node]\nname = \"alpha\"\nid = 32\n",
            &["[node]", "id 32", "out of range", "0..=31"],
        );
        load_err(
            "[node]\nname = \"alpha\"\nid = -1\n",
            &["[node]", "id -1", "out of range"],
        );
        load_err(
            "[node]\nname = \"alpha\"\nid = \"x\"\n",
            &["[node]", "id", "integer"],
        );
        load_err(
            &with_node("[[resource]]\nname = \"r0\"\nsize = \"1GiB\"\n[[resource.peer]]\nname = \"beta\"\nid = 200\naddress = \"192.0.2.2:7788\"\n"),
            &["resource \"r0\": peer \"beta\"", "id 200", "out of range"],
        );
    }

    #[test]
    fn bad_socket_addresses() {
        load_err(
            &format!("{MINIMAL}listen = \"0.0.0.0\"\n"),
            &[
                "[node]",
                "listen \"0.0.0.0\"",
                "not a valid socket address",
                "IP:PORT",
            ],
        );
        load_err(
            &format!("{MINIMAL}metrics = \"127.0.0.1:99999\"\n"),
            &[
                "[node]",
                "metrics \"127.0.0.1:99999\"",
                "not a valid socket address",
            ],
        );
        let peer = |address: &str| {
            with_node(&format!(
                "[[resource]]\nname = \"r0\"\nsize = \"1GiB\"\n[[resource.peer]]\nname = \"beta\"\nid = 1\naddress = \"{address}\"\n"
            ))
        };
        load_err(
            &peer("beta:7788"),
            &["peer \"beta\"", "address \"beta:7788\"", "host names"],
        );
        load_err(&peer("0.0.0.0:7788"), &["peer \"beta\"", "unspecified"]);
        load_err(&peer("192.0.2.2:0"), &["peer \"beta\"", "port 0"]);
    }

    #[test]
    fn invalid_names() {
        let resource = |name: &str| {
            with_node(&format!(
                "[[resource]]\nname = \"{name}\"\nsize = \"1GiB\"\n"
            ))
        };
        load_err(
            &resource("r 0"),
            &["resource \"r 0\"", "invalid character ' '"],
        );
        load_err(&resource("r/0"), &["invalid character '/'"]);
        load_err(&resource(".hidden"), &["must not start with '.' or '-'"]);
        load_err(&resource("-r0"), &["must not start with '.' or '-'"]);
        load_err(&resource(""), &["resource \"\"", "must not be empty"]);
        load_err(&resource(&"a".repeat(65)), &["65 characters", "at most 64"]);
        load_ok(&resource(&"a".repeat(64)));
        load_ok(&resource("r0_data.v2-x"));
        load_err(
            "[node]\nname = \"al/pha\"\nid = 0\n",
            &["[node]", "name \"al/pha\"", "invalid character"],
        );
        load_err("[node]\nname = 5\nid = 0\n", &["[node]", "name", "string"]);
    }

    #[test]
    fn bad_protocol() {
        load_err(
            &with_node("[[resource]]\nname = \"r0\"\nsize = \"1GiB\"\nprotocol = \"D\"\n"),
            &["resource \"r0\"", "protocol", "\"D\"", "A, B or C"],
        );
    }

    #[test]
    fn allow_two_primaries_with_protocol_c() {
        let two_primaries = |protocol: &str, value: &str| {
            let config = load_ok(&with_node(&format!(
                "[[resource]]\nname = \"r0\"\nsize = \"1GiB\"\n{protocol}allow_two_primaries = {value}\n"
            )));
            config.resources[0].allow_two_primaries
        };
        assert!(two_primaries("protocol = \"C\"\n", "true"));
        assert!(two_primaries("protocol = \"c\"\n", "true"));
        // C is the default protocol.
        assert!(two_primaries("", "true"));
        assert!(!two_primaries("protocol = \"C\"\n", "false"));
        // Off is always fine, whatever the protocol.
        assert!(!two_primaries("protocol = \"A\"\n", "false"));
        assert!(!two_primaries("protocol = \"B\"\n", "false"));
        // The default is off, in every resource.
        let config = load_ok(&with_node(
            "[[resource]]\nname = \"r0\"\nsize = \"1GiB\"\nallow_two_primaries = true\n\
             [[resource]]\nname = \"r1\"\nsize = \"1GiB\"\n",
        ));
        assert!(config.resources[0].allow_two_primaries);
        assert!(!config.resources[1].allow_two_primaries);
    }

    #[test]
    fn allow_two_primaries_refused_without_protocol_c() {
        for protocol in ["A", "B"] {
            let message = load_err(
                &with_node(&format!(
                    "[[resource]]\nname = \"r0\"\nsize = \"1GiB\"\nprotocol = \"{protocol}\"\nallow_two_primaries = true\n"
                )),
                &[],
            );
            assert_eq!(
                message,
                format!(
                    "<inline>: resource \"r0\": allow_two_primaries = true needs protocol \"C\" \
                     (this resource has protocol \"{protocol}\"): conflicting writes of two \
                     Primaries are resolved through the peer's write acknowledgement, which \
                     protocols A and B do not wait for"
                )
            );
        }
        // The resource named is the one at fault.
        load_err(
            &with_node(
                "[[resource]]\nname = \"r0\"\nsize = \"1GiB\"\nallow_two_primaries = true\n\
                 [[resource]]\nname = \"r1\"\nsize = \"1GiB\"\nprotocol = \"b\"\nallow_two_primaries = true\n",
            ),
            &["resource \"r1\"", "allow_two_primaries", "protocol \"B\""],
        );
        // Not a boolean.
        load_err(
            &resource_with("allow_two_primaries", "\"maybe\""),
            &["resource \"r0\"", "allow_two_primaries", "boolean"],
        );
    }

    /// A resource `r0` with `key = value` added.
    fn resource_with(key: &str, value: &str) -> String {
        with_node(&format!(
            "[[resource]]\nname = \"r0\"\nsize = \"1GiB\"\n{key} = {value}\n"
        ))
    }

    #[test]
    fn al_extents_values() {
        for (value, expected) in [
            ("7", 7),
            ("8", 8),
            ("1237", 1237),
            ("3833", 3833),
            ("65534", 65534),
            ("+100", 100),
            ("1_000", 1000),
        ] {
            let config = load_ok(&resource_with("al_extents", value));
            assert_eq!(config.resources[0].al_extents, expected, "{value}");
        }
    }

    #[test]
    fn bad_al_extents() {
        let range = "7..=65534";
        let cases: &[(&str, &[&str])] = &[
            ("0", &["al_extents 0 is out of range"]),
            ("6", &["al_extents 6 is out of range"]),
            ("-1", &["al_extents -1 is out of range"]),
            ("-1237", &["al_extents -1237 is out of range"]),
            ("65535", &["al_extents 65535 is out of range"]),
            ("9223372036854775807", &["out of range"]),
            (
                "\"1237\"",
                &["al_extents \"1237\" is a string", "without quotes"],
            ),
            ("\"many\"", &["al_extents \"many\" is a string"]),
            ("\"\"", &["al_extents \"\" is a string"]),
            ("1237.5", &["al_extents 1237.5 is a floating-point number"]),
            ("1237.0", &["al_extents 1237.0 is a floating-point number"]),
            ("1e3", &["floating-point number"]),
            ("true", &["al_extents true is a boolean"]),
            ("[1237]", &["is a list"]),
            ("{ n = 1237 }", &["is a table"]),
        ];
        for (value, words) in cases {
            let message = load_err(
                &resource_with("al_extents", value),
                &[
                    "<inline>: resource \"r0\": al_extents",
                    range,
                    "default 1237",
                ],
            );
            for word in *words {
                assert!(
                    message.contains(word),
                    "{value}: {message:?} lacks {word:?}"
                );
            }
        }
        // Exactly, once:
        assert_eq!(
            load_err(&resource_with("al_extents", "0"), &[]),
            "<inline>: resource \"r0\": al_extents 0 is out of range; give a whole number in 7..=65534 (default 1237)"
        );
        // The message names the resource at fault, here the second one.
        load_err(
            &with_node("[[resource]]\nname = \"r0\"\nsize = \"1GiB\"\n[[resource]]\nname = \"r1\"\nsize = \"1GiB\"\nal_extents = 70000\n"),
            &["resource \"r1\": al_extents 70000 is out of range", range],
        );
    }

    #[test]
    fn resync_rate_values() {
        for (value, expected) in [
            ("\"0\"", 0),
            ("0", 0),
            ("\"0M\"", 0),
            ("\"512K\"", 512 * KIB),
            ("\"100M\"", 100 * MIB),
            ("\"100MiB\"", 100 * MIB),
            ("\"100 mib\"", 100 * MIB),
            ("\"1G\"", GIB),
            ("\"1GiB\"", GIB),
            ("\"2T\"", 2 * TIB),
            ("\"4K\"", 4 * KIB),
            ("4096", 4096),
            ("\"1000000\"", 1_000_000),
            ("125000000", 125_000_000),
        ] {
            let config = load_ok(&resource_with("resync_rate", value));
            assert_eq!(config.resources[0].resync_rate, expected, "{value}");
        }
    }

    #[test]
    fn bad_resync_rate() {
        let cases: &[(&str, &[&str])] = &[
            (
                "\"fast\"",
                &["resync_rate \"fast\"", "does not start with a number"],
            ),
            ("\"\"", &["resync_rate \"\"", "empty"]),
            ("\"-1M\"", &["resync_rate \"-1M\"", "negative"]),
            ("-1", &["resync_rate \"-1\"", "negative"]),
            ("\"1.5G\"", &["resync_rate \"1.5G\"", "whole number"]),
            (
                "\"100MB/s\"",
                &["resync_rate \"100MB/s\"", "unknown unit \"MB/s\""],
            ),
            ("\"10XB\"", &["unknown unit \"XB\""]),
            ("\"99999999999T\"", &["too large"]),
            ("99999999999999999999", &["TOML syntax error"]),
            ("1.5", &["resync_rate 1.5 is a floating-point number"]),
            ("true", &["resync_rate true is a boolean"]),
            ("[\"100M\"]", &["resync_rate [...] is a list"]),
            (
                "\"100\"",
                &[
                    "resync_rate \"100\" is too small",
                    "4KiB",
                    "0 means unlimited",
                ],
            ),
            ("4095", &["resync_rate \"4095\" is too small"]),
        ];
        for (value, words) in cases {
            let message = load_err(&resource_with("resync_rate", value), words);
            if !message.contains("TOML syntax error") {
                for word in [
                    "<inline>: resource \"r0\": resync_rate",
                    "0 means unlimited",
                ] {
                    assert!(
                        message.contains(word),
                        "{value}: {message:?} lacks {word:?}"
                    );
                }
            }
        }
        assert_eq!(
            load_err(&resource_with("resync_rate", "\"fast\""), &[]),
            "<inline>: resource \"r0\": resync_rate \"fast\": does not start with a number; write e.g. 1GiB or 4096 (resync_rate is in bytes per second, such as \"100MiB\" or \"512K\"; 0 means unlimited)"
        );
    }

    #[test]
    fn resync_controller_values() {
        let control = |key: &str, value: &str| {
            load_ok(&resource_with(key, value)).resources[0]
                .resync_control
                .clone()
        };
        let ms = Duration::from_millis;
        for (value, expected) in [
            ("0", Duration::ZERO),
            ("\"0\"", Duration::ZERO),
            ("\"0s\"", Duration::ZERO),
            ("\"100ms\"", ms(100)),
            ("\"500ms\"", ms(500)),
            ("\"2s\"", ms(2000)),
            ("\"2 S\"", ms(2000)),
            ("\"2500MS\"", ms(2500)),
            ("\"30s\"", ms(30_000)),
        ] {
            assert_eq!(
                control("c_plan_ahead", value).plan_ahead,
                expected,
                "{value}"
            );
        }
        for (value, expected) in [
            ("0", 0),
            ("\"4K\"", 4 * KIB),
            ("4096", 4096),
            ("\"8MiB\"", 8 * MIB),
            ("\"64M\"", 64 * MIB),
        ] {
            assert_eq!(
                control("c_fill_target", value).fill_target,
                expected,
                "{value}"
            );
        }
        for (value, expected) in [
            ("\"100ms\"", ms(100)),
            ("\"1s\"", ms(1000)),
            ("\"10s\"", ms(10_000)),
        ] {
            assert_eq!(
                control("c_delay_target", value).delay_target,
                expected,
                "{value}"
            );
        }
        for (value, expected) in [("0", 0), ("\"4K\"", 4 * KIB), ("\"10G\"", 10 * GIB)] {
            assert_eq!(control("c_max_rate", value).max_rate, expected, "{value}");
            assert_eq!(control("c_min_rate", value).min_rate, expected, "{value}");
        }
        // Each key leaves the others at their defaults.
        let only_fill = control("c_fill_target", "0");
        assert_eq!(
            only_fill,
            ResyncControl {
                fill_target: 0,
                ..ResyncControl::default()
            }
        );
    }

    #[test]
    fn bad_resync_controller_values() {
        let cases: &[(&str, &str, &[&str])] = &[
            (
                "c_plan_ahead",
                "20",
                &["c_plan_ahead 20 has no unit", "\"20s\""],
            ),
            (
                "c_plan_ahead",
                "\"2\"",
                &["c_plan_ahead \"2\": has no unit (use s or ms)"],
            ),
            ("c_plan_ahead", "\"1.5s\"", &["whole number", "1500ms"]),
            ("c_plan_ahead", "\"2min\"", &["unknown unit \"min\""]),
            ("c_plan_ahead", "\"-1s\"", &["negative"]),
            ("c_plan_ahead", "\"\"", &["empty"]),
            (
                "c_plan_ahead",
                "\"fast\"",
                &["does not start with a number"],
            ),
            (
                "c_plan_ahead",
                "\"31s\"",
                &["c_plan_ahead \"31s\" is out of range", "up to 30s"],
            ),
            (
                "c_plan_ahead",
                "\"150ms\"",
                &["out of range", "whole 100ms steps"],
            ),
            ("c_plan_ahead", "\"99999999999999999999s\"", &["too large"]),
            (
                "c_plan_ahead",
                "1.5",
                &["c_plan_ahead 1.5 is a floating-point number"],
            ),
            ("c_plan_ahead", "true", &["is a boolean"]),
            (
                "c_delay_target",
                "0",
                &["c_delay_target 0 is out of range", "100ms..=10s"],
            ),
            (
                "c_delay_target",
                "\"50ms\"",
                &["out of range", "100ms..=10s"],
            ),
            ("c_delay_target", "\"11s\"", &["out of range"]),
            (
                "c_fill_target",
                "\"2K\"",
                &["c_fill_target \"2K\" is out of range", "4KiB..=64MiB"],
            ),
            (
                "c_fill_target",
                "\"65M\"",
                &["out of range", "0 means c_delay_target decides"],
            ),
            ("c_fill_target", "\"8MB\"", &["unknown unit \"MB\""]),
            ("c_fill_target", "[1]", &["c_fill_target [...] is a list"]),
            (
                "c_max_rate",
                "\"100\"",
                &["c_max_rate \"100\" is too small", "0 means no bound"],
            ),
            ("c_max_rate", "\"1.5G\"", &["whole number"]),
            (
                "c_min_rate",
                "\"fast\"",
                &["c_min_rate \"fast\"", "0 means the resync never yields"],
            ),
        ];
        for (key, value, words) in cases {
            let message = load_err(&resource_with(key, value), words);
            assert!(
                message.starts_with(&format!("<inline>: resource \"r0\": {key}")),
                "{key} = {value}: {message:?}"
            );
        }
        assert_eq!(
            load_err(&resource_with("c_plan_ahead", "\"45s\""), &[]),
            "<inline>: resource \"r0\": c_plan_ahead \"45s\" is out of range (c_plan_ahead is a duration such as \"2s\" or \"500ms\", in whole 100ms steps up to 30s; 0 turns the resync controller off (resync_rate applies))"
        );
    }

    /// A resource `r0` with peers `beta` and `gamma` (this node is `alpha`) and `key = value`.
    fn resource_with_peers(key: &str, value: &str) -> String {
        with_node(&format!(
            "[[resource]]\nname = \"r0\"\nsize = \"1GiB\"\n{key} = {value}\n\
             [[resource.peer]]\nname = \"beta\"\nid = 1\naddress = \"192.0.2.2:7788\"\n\
             [[resource.peer]]\nname = \"gamma\"\nid = 2\naddress = \"192.0.2.3:7788\"\n"
        ))
    }

    #[test]
    fn after_sb_values() {
        let policy = |text: &str| load_ok(text).resources[0].split_brain.clone();
        for (value, expected) in [
            ("\"disconnect\"", AfterSb0Pri::Disconnect),
            ("\"discard-zero-changes\"", AfterSb0Pri::DiscardZeroChanges),
            (
                "\"discard-least-changes\"",
                AfterSb0Pri::DiscardLeastChanges,
            ),
            (
                "\"discard-node-alpha\"",
                AfterSb0Pri::DiscardNode("alpha".into()),
            ),
            (
                "\"discard-younger-primary\"",
                AfterSb0Pri::DiscardYoungerPrimary,
            ),
            (
                "\"discard-older-primary\"",
                AfterSb0Pri::DiscardOlderPrimary,
            ),
            (
                "\"discard-node-beta\"",
                AfterSb0Pri::DiscardNode("beta".into()),
            ),
            (
                "\"discard-node-gamma\"",
                AfterSb0Pri::DiscardNode("gamma".into()),
            ),
        ] {
            let got = policy(&resource_with_peers("after_sb_0pri", value));
            assert_eq!(
                got,
                SplitBrainPolicy {
                    after_sb_0pri: expected,
                    ..SplitBrainPolicy::default()
                },
                "{value}"
            );
        }
        // Without peers, this node's own name is still a name.
        assert_eq!(
            policy(&resource_with("after_sb_0pri", "\"discard-node-alpha\"")).after_sb_0pri,
            AfterSb0Pri::DiscardNode("alpha".into())
        );
        for (value, expected) in [
            ("\"disconnect\"", AfterSb1Pri::Disconnect),
            ("\"consensus\"", AfterSb1Pri::Consensus),
            ("\"discard-secondary\"", AfterSb1Pri::DiscardSecondary),
        ] {
            let got = policy(&resource_with_peers("after_sb_1pri", value));
            assert_eq!(
                got,
                SplitBrainPolicy {
                    after_sb_1pri: expected,
                    ..SplitBrainPolicy::default()
                },
                "{value}"
            );
        }
        assert_eq!(
            policy(&resource_with_peers("after_sb_2pri", "\"disconnect\"")),
            SplitBrainPolicy::default()
        );
        // All three together, each in its own resource.
        let config = load_ok(&with_node(
            "[[resource]]\nname = \"r0\"\nsize = \"1GiB\"\nafter_sb_0pri = \"discard-least-changes\"\nafter_sb_1pri = \"discard-secondary\"\nafter_sb_2pri = \"disconnect\"\n\
             [[resource]]\nname = \"r1\"\nsize = \"1GiB\"\n",
        ));
        assert_eq!(
            config.resources[0].split_brain,
            SplitBrainPolicy {
                after_sb_0pri: AfterSb0Pri::DiscardLeastChanges,
                after_sb_1pri: AfterSb1Pri::DiscardSecondary,
                after_sb_2pri: AfterSb2Pri::Disconnect,
            }
        );
        assert_eq!(config.resources[1].split_brain, SplitBrainPolicy::default());
    }

    #[test]
    fn bad_after_sb_0pri() {
        let supported = [
            "supported: \"disconnect\" (the default), \"discard-younger-primary\", \"discard-older-primary\", \"discard-zero-changes\", \"discard-least-changes\", \"discard-node-NAME\"",
            "where NAME is one of: alpha (this node), beta, gamma",
        ];
        let cases: &[(&str, &[&str])] = &[
            // Unknown strings, with a suggestion when close.
            (
                "\"retry\"",
                &["after_sb_0pri \"retry\" is not a split-brain policy;"],
            ),
            ("\"\"", &["after_sb_0pri \"\" is not a split-brain policy"]),
            (
                "\"discard_zero_changes\"",
                &["did you mean \"discard-zero-changes\"?"],
            ),
            ("\"Disconnect\"", &["did you mean \"disconnect\"?"]),
            ("\"discard-node\"", &["policy; supported"]),
            // Not strings.
            ("0", &["after_sb_0pri 0 is a number", "string in quotes"]),
            ("true", &["after_sb_0pri true is a boolean"]),
            ("1.5", &["after_sb_0pri 1.5 is a floating-point number"]),
            ("[\"disconnect\"]", &["after_sb_0pri [...] is a list"]),
            ("{ a = 1 }", &["after_sb_0pri {...} is a table"]),
            // after_sb_1pri's values.
            ("\"consensus\"", &["is a policy for after_sb_1pri"]),
            ("\"discard-secondary\"", &["is a policy for after_sb_1pri"]),
            ("\"violently-as0p\"", &["is a policy for after_sb_1pri"]),
        ];
        for (value, words) in cases {
            let message = load_err(
                &resource_with_peers("after_sb_0pri", value),
                &["<inline>: resource \"r0\": after_sb_0pri"],
            );
            for word in words.iter().chain(&supported) {
                assert!(
                    message.contains(word),
                    "{value}: {message:?} lacks {word:?}"
                );
            }
        }
        // discard-node with a name that is neither this node nor a peer of the resource.
        for (value, words) in [
            (
                "\"discard-node-delta\"",
                &["\"delta\" is neither this node nor a peer of this resource"][..],
            ),
            (
                "\"discard-node-\"",
                &["\"\" is neither this node nor a peer"],
            ),
            (
                "\"discard-node-Beta\"",
                &["did you mean \"discard-node-beta\"?"],
            ),
            (
                "\"discard-node-gama\"",
                &["did you mean \"discard-node-gamma\"?"],
            ),
            ("\"discard-node-delta\"", &["resource; NAME"]),
        ] {
            let message = load_err(
                &resource_with_peers("after_sb_0pri", value),
                &[
                    "<inline>: resource \"r0\": after_sb_0pri",
                    "must be one of: alpha (this node), beta, gamma",
                ],
            );
            for word in words {
                assert!(
                    message.contains(word),
                    "{value}: {message:?} lacks {word:?}"
                );
            }
        }
        // Exactly, once:
        assert_eq!(
            load_err(&resource_with_peers("after_sb_0pri", "\"discard-node-delta\""), &[]),
            "<inline>: resource \"r0\": after_sb_0pri \"discard-node-delta\": \"delta\" is neither this node nor a peer of this resource; NAME in \"discard-node-NAME\" must be one of: alpha (this node), beta, gamma"
        );
        assert_eq!(
            load_err(&resource_with("after_sb_0pri", "\"discard-yonger-primary\""), &[]),
            "<inline>: resource \"r0\": after_sb_0pri \"discard-yonger-primary\" is not a split-brain policy (did you mean \"discard-younger-primary\"?); supported: \"disconnect\" (the default), \"discard-younger-primary\", \"discard-older-primary\", \"discard-zero-changes\", \"discard-least-changes\", \"discard-node-NAME\" where NAME is one of: alpha (this node)"
        );
        // A peer of another resource is not a name here.
        load_err(
            &with_node(
                "[[resource]]\nname = \"r0\"\nsize = \"1GiB\"\n\
                 [[resource.peer]]\nname = \"beta\"\nid = 1\naddress = \"192.0.2.2:7788\"\n\
                 [[resource]]\nname = \"r1\"\nsize = \"1GiB\"\nafter_sb_0pri = \"discard-node-beta\"\n",
            ),
            &[
                "<inline>: resource \"r1\": after_sb_0pri \"discard-node-beta\"",
                "\"beta\" is neither this node nor a peer of this resource",
                "must be one of: alpha (this node)",
            ],
        );
    }

    #[test]
    fn bad_after_sb_1pri() {
        let supported =
            "supported: \"disconnect\" (the default), \"consensus\", \"discard-secondary\"";
        let cases: &[(&str, &[&str])] = &[
            (
                "\"retry\"",
                &["after_sb_1pri \"retry\" is not a split-brain policy;"],
            ),
            ("\"consensys\"", &["did you mean \"consensus\"?"]),
            (
                "\"discard_secondary\"",
                &["did you mean \"discard-secondary\"?"],
            ),
            ("1", &["after_sb_1pri 1 is a number", "string in quotes"]),
            ("false", &["after_sb_1pri false is a boolean"]),
            ("[]", &["after_sb_1pri [...] is a list"]),
            (
                "\"call-pri-lost-after-sb\"",
                &["\"call-pri-lost-after-sb\" is a DRBD policy qrbd does not implement"],
            ),
            (
                "\"violently-as0p\"",
                &["\"violently-as0p\" is a DRBD policy qrbd does not implement"],
            ),
            (
                "\"discard-younger-primary\"",
                &[
                    "is a policy for after_sb_0pri",
                    "\"consensus\" applies after_sb_0pri",
                ],
            ),
            (
                "\"discard-zero-changes\"",
                &["is a policy for after_sb_0pri"],
            ),
            ("\"discard-node-beta\"", &["is a policy for after_sb_0pri"]),
        ];
        for (value, words) in cases {
            let message = load_err(
                &resource_with_peers("after_sb_1pri", value),
                &["<inline>: resource \"r0\": after_sb_1pri", supported],
            );
            for word in *words {
                assert!(
                    message.contains(word),
                    "{value}: {message:?} lacks {word:?}"
                );
            }
        }
        assert_eq!(
            load_err(&resource_with("after_sb_1pri", "\"call-pri-lost-after-sb\""), &[]),
            format!("<inline>: resource \"r0\": after_sb_1pri \"call-pri-lost-after-sb\" is a DRBD policy qrbd does not implement; {supported}")
        );
    }

    #[test]
    fn bad_after_sb_2pri() {
        let safe = "with two Primaries only disconnect is safe: the only supported value is \"disconnect\" (the default)";
        let cases: &[(&str, &[&str])] = &[
            (
                "\"violently-as0p\"",
                &["after_sb_2pri \"violently-as0p\" is a DRBD policy qrbd refuses"],
            ),
            (
                "\"call-pri-lost-after-sb\"",
                &["after_sb_2pri \"call-pri-lost-after-sb\" is a DRBD policy qrbd refuses"],
            ),
            (
                "\"discard-secondary\"",
                &["after_sb_2pri \"discard-secondary\" is not accepted"],
            ),
            ("\"discard-node-beta\"", &["is not accepted"]),
            ("\"disconect\"", &["did you mean \"disconnect\"?"]),
            ("\"\"", &["after_sb_2pri \"\" is not accepted"]),
            ("2", &["after_sb_2pri 2 is a number", "string in quotes"]),
            ("true", &["after_sb_2pri true is a boolean"]),
        ];
        for (value, words) in cases {
            let message = load_err(
                &resource_with_peers("after_sb_2pri", value),
                &["<inline>: resource \"r0\": after_sb_2pri", safe],
            );
            for word in *words {
                assert!(
                    message.contains(word),
                    "{value}: {message:?} lacks {word:?}"
                );
            }
        }
        assert_eq!(
            load_err(&resource_with("after_sb_2pri", "\"violently-as0p\""), &[]),
            format!("<inline>: resource \"r0\": after_sb_2pri \"violently-as0p\" is a DRBD policy qrbd refuses; {safe}")
        );
    }

    #[test]
    fn wrong_shapes() {
        load_err(
            &with_node("[resource]\nname = \"r0\"\nsize = \"1GiB\"\n"),
            &["\"resource\" must be a list of tables", "[[resource]]"],
        );
        load_err(
            &with_node(
                "[[resource]]\nname = \"r0\"\nsize = \"1GiB\"\n[resource.peer]\nname = \"b\"\n",
            ),
            &["resource \"r0\"", "[[resource.peer]]"],
        );
        load_err("node = 5\n", &["\"node\" must be a table"]);
    }

    #[test]
    fn example_configs_load() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("config");
        let mut seen = 0;
        for entry in std::fs::read_dir(&dir).expect("config/ exists") {
            let path = entry.expect("dir entry").path();
            if path.extension().and_then(|e| e.to_str()) != Some("toml") {
                continue;
            }
            let text = std::fs::read_to_string(&path).expect("readable");
            if let Err(e) = load_from_str(&text, &[]) {
                panic!("{}: {e}", path.display());
            }
            seen += 1;
        }
        assert!(
            seen >= 3,
            "expected the example configs in {}",
            dir.display()
        );
    }

    #[test]
    fn two_node_examples_are_a_pair() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("config");
        let read = |name: &str| {
            let text = std::fs::read_to_string(dir.join(name)).expect("readable");
            match load_from_str(&text, &[]) {
                Ok(config) => config,
                Err(e) => panic!("{name}: {e}"),
            }
        };
        let alpha = read("two-node-alpha.toml");
        let beta = read("two-node-beta.toml");
        for (me, other) in [(&alpha, &beta), (&beta, &alpha)] {
            assert!(me.tls.is_some());
            for resource in &me.resources {
                let theirs = other.resource(&resource.name).expect("both define it");
                assert_eq!(resource.size_bytes, theirs.size_bytes);
                assert_eq!(resource.protocol, theirs.protocol);
                let peer = &resource.peers[0];
                assert_eq!(peer.name, other.node.name);
                assert_eq!(peer.id, other.node.id);
                assert_eq!(peer.address, other.node.listen);
            }
        }
    }
}
