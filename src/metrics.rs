//! The Prometheus endpoint: with `[node] metrics = "IP:PORT"` the daemon serves `GET /metrics`
//! in the text exposition format (0.0.4), built from the same status `qrbd status --json`
//! reports (one `GetStatus` per resource supervisor, through the node actor) plus the
//! RetryActor's counters. The HTTP/1.1 server is a few lines on tokio: one request per
//! connection, `Connection: close`, GET and HEAD only.
//!
//! The metric names, labels and their meaning are listed in `docs/status-json.md`.

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use actix::prelude::*;
use anyhow::Context as _;
use qrbd_actors::core::{ConnectionState, DiskState, Role};
use qrbd_actors::retry::{GetRetryStats, RetryActor, RetryStats};
use qrbd_actors::status::{PeerStatus, ResourceStatus};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;

use crate::admin::{AdminRequest, AdminResponse};
use crate::node::{Admin, NodeActor};

/// `Content-Type` of the text exposition format.
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";
/// Largest request head accepted (request line and headers).
const MAX_HEAD: usize = 8 * 1024;
/// A client gets this long to send its request, and the daemon this long to answer.
const IO_TIMEOUT: Duration = Duration::from_secs(10);
/// Connections served at once; more wait in the listen backlog.
const MAX_CONNECTIONS: usize = 16;

const ROLES: &[Role] = &[Role::Primary, Role::Secondary];
const DISK_STATES: &[DiskState] = &[
    DiskState::Diskless,
    DiskState::Attaching,
    DiskState::Inconsistent,
    DiskState::Outdated,
    DiskState::DUnknown,
    DiskState::Consistent,
    DiskState::UpToDate,
];
const CONNECTION_STATES: &[ConnectionState] = &[
    ConnectionState::StandAlone,
    ConnectionState::Connecting,
    ConnectionState::Connected,
    ConnectionState::Disconnecting,
    ConnectionState::Timeout,
    ConnectionState::NetworkFailure,
    ConnectionState::ProtocolError,
];
/// Values of `PeerStatus::replication` (a string in the status).
const REPLICATION_STATES: &[&str] = &["Off", "Established", "SyncSource", "SyncTarget"];

/// Binds the metrics listener (before the daemon mounts anything, so a taken port is a clean
/// startup error).
pub async fn bind(address: SocketAddr) -> anyhow::Result<TcpListener> {
    TcpListener::bind(address)
        .await
        .with_context(|| format!("cannot listen for metrics on {address} ([node] metrics)"))
}

/// Serves scrapes until the task is dropped. Runs on the daemon's actix runtime.
pub async fn serve(listener: TcpListener, node: Addr<NodeActor>) {
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    loop {
        let Ok(slot) = slots.clone().acquire_owned().await else {
            return;
        };
        match listener.accept().await {
            Ok((stream, peer)) => {
                let node = node.clone();
                actix_rt::spawn(async move {
                    if let Err(error) = serve_connection(stream, &node).await {
                        tracing::debug!(%peer, %error, "metrics connection failed");
                    }
                    drop(slot);
                });
            }
            Err(error) => {
                tracing::warn!(%error, "metrics accept failed");
                // E.g. out of descriptors: do not spin.
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

async fn serve_connection(mut stream: TcpStream, node: &Addr<NodeActor>) -> anyhow::Result<()> {
    let head = match tokio::time::timeout(IO_TIMEOUT, read_head(&mut stream)).await {
        Ok(head) => head?,
        Err(_) => Err(Reply::error(408, "Request Timeout")),
    };
    let reply = match head {
        Err(reply) => reply,
        Ok(request) => {
            let reply = route(&request, node).await;
            if request.method == "HEAD" {
                reply.without_body()
            } else {
                reply
            }
        }
    };
    tokio::time::timeout(IO_TIMEOUT, async {
        stream.write_all(&reply.to_bytes()).await?;
        stream.shutdown().await
    })
    .await
    .context("timed out writing the answer")??;
    Ok(())
}

/// The parts of a request this server looks at.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    pub method: String,
    /// The path without the query string.
    pub path: String,
}

/// An answer, with its body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reply {
    pub status: u16,
    pub reason: &'static str,
    pub content_type: &'static str,
    pub body: String,
    /// The length of the body a GET would get (a HEAD answer has no body but this length).
    content_length: usize,
    allow: bool,
}

impl Reply {
    fn new(status: u16, reason: &'static str, content_type: &'static str, body: String) -> Self {
        Reply {
            status,
            reason,
            content_type,
            content_length: body.len(),
            body,
            allow: false,
        }
    }

    fn error(status: u16, reason: &'static str) -> Self {
        Reply::new(
            status,
            reason,
            "text/plain; charset=utf-8",
            format!("{status} {reason}\n"),
        )
    }

    fn without_body(mut self) -> Self {
        self.body.clear();
        self
    }

    pub fn to_bytes(&self) -> Vec<u8> {
        let mut head = format!(
            "HTTP/1.1 {} {}\r\nContent-Type: {}\r\nContent-Length: {}\r\nConnection: close\r\n",
            self.status, self.reason, self.content_type, self.content_length
        );
        if self.allow {
            head.push_str("Allow: GET, HEAD\r\n");
        }
        head.push_str("\r\n");
        let mut bytes = head.into_bytes();
        bytes.extend_from_slice(self.body.as_bytes());
        bytes
    }
}

/// Reads the request head (up to the empty line). A malformed or oversized head is answered
/// with the matching error.
async fn read_head(stream: &mut TcpStream) -> std::io::Result<Result<Request, Reply>> {
    let mut buffer = Vec::with_capacity(1024);
    let mut chunk = [0u8; 1024];
    loop {
        if let Some(end) = head_end(&buffer) {
            return Ok(parse_head(&buffer[..end]));
        }
        if buffer.len() > MAX_HEAD {
            return Ok(Err(Reply::error(431, "Request Header Fields Too Large")));
        }
        let n = stream.read(&mut chunk).await?;
        if n == 0 {
            return Err(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                "connection closed before the end of the request head",
            ));
        }
        buffer.extend_from_slice(&chunk[..n]);
    }
}

/// Where the head ends (after `\r\n\r\n`, or `\n\n` from lenient clients).
fn head_end(buffer: &[u8]) -> Option<usize> {
    let crlf = buffer.windows(4).position(|w| w == b"\r\n\r\n");
    let lf = buffer.windows(2).position(|w| w == b"\n\n");
    match (crlf, lf) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    }
}

/// Parses the request line of a head: `METHOD TARGET HTTP/1.x`.
pub fn parse_head(head: &[u8]) -> Result<Request, Reply> {
    let bad = || Reply::error(400, "Bad Request");
    let text = std::str::from_utf8(head).map_err(|_| bad())?;
    let line = text.lines().next().ok_or_else(bad)?;
    let mut parts = line.split_ascii_whitespace();
    let (Some(method), Some(target), Some(version), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(bad());
    };
    if !version.starts_with("HTTP/1.") {
        return Err(Reply::error(505, "HTTP Version Not Supported"));
    }
    let path = target.split(['?', '#']).next().unwrap_or_default();
    Ok(Request {
        method: method.to_owned(),
        path: path.to_owned(),
    })
}

async fn route(request: &Request, node: &Addr<NodeActor>) -> Reply {
    if request.method != "GET" && request.method != "HEAD" {
        let mut reply = Reply::error(405, "Method Not Allowed");
        reply.allow = true;
        return reply;
    }
    match request.path.as_str() {
        "/metrics" => match gather(node).await {
            Ok(text) => Reply::new(200, "OK", CONTENT_TYPE, text),
            Err(message) => {
                tracing::warn!(%message, "metrics scrape failed");
                Reply::new(
                    503,
                    "Service Unavailable",
                    "text/plain; charset=utf-8",
                    format!("{message}\n"),
                )
            }
        },
        "/" => Reply::new(
            200,
            "OK",
            "text/plain; charset=utf-8",
            "qrbd: metrics are at /metrics\n".to_owned(),
        ),
        _ => Reply::error(404, "Not Found"),
    }
}

/// Status of every resource that is up, and the retry counters, rendered.
async fn gather(node: &Addr<NodeActor>) -> Result<String, String> {
    let request = Admin(AdminRequest::Status { resource: None });
    let resources = match node.send(request).await {
        Ok(AdminResponse::Status { resources }) => resources,
        Ok(AdminResponse::Failed { message }) => return Err(message),
        Ok(AdminResponse::Done { message }) => {
            return Err(format!("unexpected answer to a status request: {message}"))
        }
        Err(error) => return Err(format!("node unavailable: {error}")),
    };
    let retry = RetryActor::from_registry().send(GetRetryStats).await.ok();
    Ok(render(&resources, retry.as_ref()))
}

// ---------------------------------------------------------------------------------------------
// Rendering
// ---------------------------------------------------------------------------------------------

/// The ratio `qrbd_peer_resync_done_ratio` reports: the part of the disk not marked out of sync
/// for the peer: 1.0 whenever nothing is out of sync; it falls as out-of-sync bytes accumulate
/// and rises again as a resync clears them.
pub fn resync_done_ratio(size_bytes: u64, out_of_sync_bytes: u64) -> f64 {
    if size_bytes == 0 || out_of_sync_bytes == 0 {
        return 1.0;
    }
    let ratio = 1.0 - out_of_sync_bytes as f64 / size_bytes as f64;
    ratio.clamp(0.0, 1.0)
}

/// Writer of the text format: one family (HELP, TYPE, samples) at a time.
struct Exposition {
    out: String,
}

type Labels<'a> = &'a [(&'a str, &'a str)];

impl Exposition {
    fn family(&mut self, name: &str, kind: &str, help: &str) {
        let _ = writeln!(self.out, "# HELP {name} {}", escape_help(help));
        let _ = writeln!(self.out, "# TYPE {name} {kind}");
    }

    fn sample(&mut self, name: &str, labels: Labels<'_>, value: impl Into<Value>) {
        self.out.push_str(name);
        if !labels.is_empty() {
            self.out.push('{');
            for (i, (key, value)) in labels.iter().enumerate() {
                if i > 0 {
                    self.out.push(',');
                }
                let _ = write!(self.out, "{key}=\"{}\"", escape_label(value));
            }
            self.out.push('}');
        }
        let _ = writeln!(self.out, " {}", value.into());
    }

    /// A state set: one sample per possible state, 1 for the current one, 0 for the others. A
    /// current state missing from `states` is added.
    fn state_set(
        &mut self,
        name: &str,
        labels: Labels<'_>,
        key: &str,
        states: &[String],
        current: &str,
    ) {
        for state in states {
            let mut all = labels.to_vec();
            all.push((key, state));
            self.sample(name, &all, u64::from(state == current));
        }
        if !states.iter().any(|s| s == current) {
            let mut all = labels.to_vec();
            all.push((key, current));
            self.sample(name, &all, 1u64);
        }
    }
}

/// A sample value: counters and gauges are integers here, ratios and seconds floats.
enum Value {
    Int(u64),
    Float(f64),
}

impl From<u64> for Value {
    fn from(v: u64) -> Self {
        Value::Int(v)
    }
}

impl From<u32> for Value {
    fn from(v: u32) -> Self {
        Value::Int(u64::from(v))
    }
}

impl From<f64> for Value {
    fn from(v: f64) -> Self {
        Value::Float(v)
    }
}

impl std::fmt::Display for Value {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Value::Int(v) => write!(f, "{v}"),
            Value::Float(v) if v.is_nan() => f.write_str("NaN"),
            Value::Float(v) if v.is_infinite() && *v > 0.0 => f.write_str("+Inf"),
            Value::Float(v) if v.is_infinite() => f.write_str("-Inf"),
            Value::Float(v) => write!(f, "{v}"),
        }
    }
}

fn escape_label(value: &str) -> String {
    value
        .replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

fn escape_help(text: &str) -> String {
    text.replace('\\', "\\\\").replace('\n', "\\n")
}

fn names<T: ToString>(values: &[T]) -> Vec<String> {
    values.iter().map(ToString::to_string).collect()
}

/// Every `DiskState`, `Role` and `ConnectionState` must be in the lists above; adding a variant
/// breaks this match, and so the build, until the list is updated.
#[allow(dead_code)]
fn state_lists_are_complete(role: Role, disk: DiskState, connection: ConnectionState) {
    match role {
        Role::Primary | Role::Secondary => {}
    }
    match disk {
        DiskState::Diskless
        | DiskState::Attaching
        | DiskState::Inconsistent
        | DiskState::Outdated
        | DiskState::DUnknown
        | DiskState::Consistent
        | DiskState::UpToDate => {}
    }
    match connection {
        ConnectionState::StandAlone
        | ConnectionState::Connecting
        | ConnectionState::Connected
        | ConnectionState::Disconnecting
        | ConnectionState::Timeout
        | ConnectionState::NetworkFailure
        | ConnectionState::ProtocolError => {}
    }
}

/// A per-resource numeric field: metric name, type, help, and how to read it.
type ResourceField = (
    &'static str,
    &'static str,
    &'static str,
    fn(&ResourceStatus) -> u64,
);

const RESOURCE_FIELDS: &[ResourceField] = &[
    (
        "qrbd_resource_al_hits_total",
        "counter",
        "Writes whose activity-log extents were all hot already.",
        |r| r.al_hits,
    ),
    (
        "qrbd_resource_al_misses_total",
        "counter",
        "Writes that waited for an activity-log extent to be made hot.",
        |r| r.al_misses,
    ),
    (
        "qrbd_resource_al_transactions_total",
        "counter",
        "Activity-log transactions stored (at most one per cold extent).",
        |r| r.al_transactions,
    ),
    (
        "qrbd_resource_conflicts_total",
        "counter",
        "Writes that waited for an overlapping earlier write.",
        |r| r.conflicts,
    ),
    (
        "qrbd_resource_retries_total",
        "counter",
        "Requests postponed (a peer asked for a retry) and re-submitted.",
        |r| r.retries,
    ),
    (
        "qrbd_resource_allow_two_primaries",
        "gauge",
        "1 when the resource allows two Primaries (allow_two_primaries), else 0.",
        |r| u64::from(r.allow_two_primaries),
    ),
    (
        "qrbd_resource_concurrent_writes_total",
        "counter",
        "Two primaries, on the node resolving conflicts: peer writes issued concurrently with \
         an overlapping local write.",
        |r| r.concurrent_writes,
    ),
    (
        "qrbd_resource_superseded_writes_total",
        "counter",
        "Two primaries, on the node resolving conflicts: peer writes not written here because \
         a concurrent local write covers them (answered Superseded).",
        |r| r.superseded_writes,
    ),
    (
        "qrbd_resource_retry_writes_asked_total",
        "counter",
        "Two primaries, on the node resolving conflicts: peer writes answered RetryWrite, to be \
         submitted again by the peer.",
        |r| r.retry_writes_asked,
    ),
    (
        "qrbd_resource_superseded_by_peer_total",
        "counter",
        "Two primaries: local writes the peer answered Superseded (its concurrent write covers \
         them).",
        |r| r.superseded_by_peer,
    ),
    (
        "qrbd_resource_resubmitted_writes_total",
        "counter",
        "Postponed writes submitted again through the retry service.",
        |r| r.resubmitted_writes,
    ),
    (
        "qrbd_resource_size_bytes",
        "gauge",
        "Size of the resource's disk image in bytes.",
        |r| r.size_bytes,
    ),
    (
        "qrbd_resource_suspended",
        "gauge",
        "1 while application I/O is suspended (suspend-io), else 0.",
        |r| u64::from(r.suspended),
    ),
    (
        "qrbd_resource_app_in_flight",
        "gauge",
        "Admitted application requests not yet completed.",
        |r| r.app_in_flight,
    ),
    (
        "qrbd_resource_app_held",
        "gauge",
        "Application requests held for admission while I/O is suspended.",
        |r| r.app_held,
    ),
    (
        "qrbd_resource_open_writers",
        "gauge",
        "Open handles of the image with write access.",
        |r| u64::from(r.open_writers),
    ),
    (
        "qrbd_resource_open_readers",
        "gauge",
        "Open read-only handles of the image.",
        |r| u64::from(r.open_readers),
    ),
    (
        "qrbd_resource_reads_total",
        "counter",
        "Read requests completed since the resource came up.",
        |r| r.reads,
    ),
    (
        "qrbd_resource_writes_total",
        "counter",
        "Write requests completed since the resource came up.",
        |r| r.writes,
    ),
    (
        "qrbd_resource_flushes_total",
        "counter",
        "Flush requests completed since the resource came up.",
        |r| r.flushes,
    ),
    (
        "qrbd_resource_discards_total",
        "counter",
        "Discard requests completed since the resource came up.",
        |r| r.discards,
    ),
    (
        "qrbd_resource_read_bytes_total",
        "counter",
        "Bytes read through the image since the resource came up.",
        |r| r.read_bytes,
    ),
    (
        "qrbd_resource_written_bytes_total",
        "counter",
        "Bytes written through the image since the resource came up.",
        |r| r.written_bytes,
    ),
    (
        "qrbd_resource_discarded_bytes_total",
        "counter",
        "Bytes discarded through the image since the resource came up.",
        |r| r.discarded_bytes,
    ),
    (
        "qrbd_resource_failed_requests_total",
        "counter",
        "Requests that completed with an error since the resource came up.",
        |r| r.failed_requests,
    ),
];

/// A per-peer numeric field.
type PeerField = (
    &'static str,
    &'static str,
    &'static str,
    fn(&PeerStatus) -> u64,
);

const PEER_FIELDS: &[PeerField] = &[
    (
        "qrbd_peer_resynced_bytes_total",
        "counter",
        "Bytes resynced with the peer since the resource came up (sent as source or written \
         as target).",
        |p| p.resynced_bytes,
    ),
    (
        "qrbd_peer_sent_bytes_total",
        "counter",
        "Bytes of replicated writes sent to the peer since the resource came up.",
        |p| p.sent_bytes,
    ),
    (
        "qrbd_peer_received_bytes_total",
        "counter",
        "Bytes of replicated writes received from the peer since the resource came up.",
        |p| p.received_bytes,
    ),
    (
        "qrbd_peer_pending_writes",
        "gauge",
        "Writes received from the peer and not yet written here.",
        |p| p.pending,
    ),
    (
        "qrbd_peer_unacked_writes",
        "gauge",
        "Writes sent to the peer and not yet acknowledged by a barrier ack.",
        |p| p.unacked,
    ),
    (
        "qrbd_peer_out_of_sync_bytes",
        "gauge",
        "Bytes of the disk marked out of sync with the peer.",
        |p| p.out_of_sync_bytes,
    ),
];

/// A per-peer state set: metric name, help, label key, the possible states, the current one.
struct PeerStateSet {
    name: &'static str,
    help: &'static str,
    key: &'static str,
    states: Vec<String>,
    current: fn(&PeerStatus) -> String,
}

/// Renders the text exposition of `resources` (and the node-wide retry counters when known).
pub fn render(resources: &[ResourceStatus], retry: Option<&RetryStats>) -> String {
    let mut e = Exposition { out: String::new() };

    e.family(
        "qrbd_build_info",
        "gauge",
        "Always 1; the version label is the qrbd version.",
    );
    e.sample(
        "qrbd_build_info",
        &[("version", env!("CARGO_PKG_VERSION"))],
        1u64,
    );
    e.family(
        "qrbd_resources_up",
        "gauge",
        "Resources that are up on this node.",
    );
    e.sample("qrbd_resources_up", &[], resources.len() as u64);

    let roles = names(ROLES);
    e.family(
        "qrbd_resource_role",
        "gauge",
        "Role of this node for the resource: 1 for the current role, 0 for the others.",
    );
    for r in resources {
        e.state_set(
            "qrbd_resource_role",
            &[("resource", &r.name)],
            "role",
            &roles,
            &r.role.to_string(),
        );
    }
    let disk_states = names(DISK_STATES);
    e.family(
        "qrbd_resource_disk_state",
        "gauge",
        "State of the local data: 1 for the current state, 0 for the others.",
    );
    for r in resources {
        e.state_set(
            "qrbd_resource_disk_state",
            &[("resource", &r.name)],
            "state",
            &disk_states,
            &r.disk.to_string(),
        );
    }
    for (name, kind, help, get) in RESOURCE_FIELDS {
        e.family(name, kind, help);
        for r in resources {
            e.sample(name, &[("resource", &r.name)], get(r));
        }
    }

    let name = "qrbd_resource_write_latency_seconds";
    e.family(
        name,
        "histogram",
        "Write latency, submission by the application to completion.",
    );
    for r in resources {
        let labels = [("resource", r.name.as_str())];
        let mut cumulative = 0;
        for (bound_us, count) in r
            .write_latency_bounds_us
            .iter()
            .zip(&r.write_latency_buckets)
        {
            cumulative += count;
            let le = format!("{}", *bound_us as f64 / 1e6);
            let bucket = [("resource", r.name.as_str()), ("le", le.as_str())];
            e.sample(&format!("{name}_bucket"), &bucket, cumulative);
        }
        let bucket = [("resource", r.name.as_str()), ("le", "+Inf")];
        e.sample(&format!("{name}_bucket"), &bucket, r.writes);
        e.sample(
            &format!("{name}_sum"),
            &labels,
            r.write_latency_total_us as f64 / 1e6,
        );
        e.sample(&format!("{name}_count"), &labels, r.writes);
    }

    let peers: Vec<(&ResourceStatus, &PeerStatus, String)> = resources
        .iter()
        .flat_map(|r| r.peers.iter().map(move |p| (r, p, p.node_id.to_string())))
        .collect();
    let peer_roles: Vec<String> = names(ROLES)
        .into_iter()
        .chain(["Unknown".to_owned()])
        .collect();
    let state_sets = [
        PeerStateSet {
            name: "qrbd_peer_connection_state",
            help: "Connection to the peer: 1 for the current state, 0 for the others.",
            key: "state",
            states: names(CONNECTION_STATES),
            current: |p| p.connection.clone(),
        },
        PeerStateSet {
            name: "qrbd_peer_replication_state",
            help: "Replication with the peer (Off, Established, SyncSource or SyncTarget): 1 for the current state, \
                   0 for the others.",
            key: "state",
            states: names(REPLICATION_STATES),
            current: |p| p.replication.clone(),
        },
        PeerStateSet {
            name: "qrbd_peer_role",
            help: "The peer's role as last reported (Unknown when not known): 1 for the current \
                   role, 0 for the others.",
            key: "role",
            states: peer_roles,
            current: |p| {
                p.role
                    .map_or_else(|| "Unknown".to_owned(), |r| r.to_string())
            },
        },
        PeerStateSet {
            name: "qrbd_peer_disk_state",
            help: "The peer's disk state as last reported (DUnknown when not known): 1 for the \
                   current state, 0 for the others.",
            key: "state",
            states: disk_states,
            current: |p| p.disk.unwrap_or(DiskState::DUnknown).to_string(),
        },
    ];
    for set in state_sets {
        e.family(set.name, "gauge", set.help);
        for (r, p, id) in &peers {
            let labels = [
                ("resource", r.name.as_str()),
                ("peer", p.name.as_str()),
                ("peer_id", id.as_str()),
            ];
            e.state_set(set.name, &labels, set.key, &set.states, &(set.current)(p));
        }
    }
    for (name, kind, help, get) in PEER_FIELDS {
        e.family(name, kind, help);
        for (r, p, id) in &peers {
            let labels = [
                ("resource", r.name.as_str()),
                ("peer", p.name.as_str()),
                ("peer_id", id.as_str()),
            ];
            e.sample(name, &labels, get(p));
        }
    }
    let name = "qrbd_peer_resync_done_ratio";
    e.family(
        name,
        "gauge",
        "Part of the disk in sync with the peer, 0..1: 1 - out_of_sync_bytes / size_bytes \
         (1 when nothing is out of sync).",
    );
    for (r, p, id) in &peers {
        let labels = [
            ("resource", r.name.as_str()),
            ("peer", p.name.as_str()),
            ("peer_id", id.as_str()),
        ];
        e.sample(
            name,
            &labels,
            resync_done_ratio(r.size_bytes, p.out_of_sync_bytes),
        );
    }

    if let Some(retry) = retry {
        let retry_fields: [(&str, &str, &str, u64); 4] = [
            (
                "qrbd_retry_postponed_total",
                "counter",
                "Requests a peer answered with RetryWrite, handed to the retry service \
                 (all resources).",
                retry.postponed,
            ),
            (
                "qrbd_retry_resubmitted_total",
                "counter",
                "Postponed requests submitted again (all resources).",
                retry.resubmitted,
            ),
            (
                "qrbd_retry_failed_total",
                "counter",
                "Postponed requests whose device was gone (all resources).",
                retry.failed,
            ),
            (
                "qrbd_retry_queued",
                "gauge",
                "Postponed requests waiting to be submitted again (all resources).",
                retry.queued,
            ),
        ];
        for (name, kind, help, value) in retry_fields {
            e.family(name, kind, help);
            e.sample(name, &[], value);
        }
    }
    e.out
}

#[cfg(test)]
mod tests {
    use super::*;
    use qrbd_actors::core::ReplicationProtocol;

    fn resource(name: &str) -> ResourceStatus {
        ResourceStatus {
            name: name.to_owned(),
            role: Role::Primary,
            disk: DiskState::UpToDate,
            size_bytes: 1 << 20,
            protocol: ReplicationProtocol::C,
            suspended: false,
            app_in_flight: 2,
            app_held: 0,
            open_writers: 1,
            open_readers: 0,
            reads: 3,
            writes: 4,
            flushes: 5,
            discards: 6,
            read_bytes: 7,
            written_bytes: 16384,
            discarded_bytes: 9,
            failed_requests: 0,
            write_latency_avg_us: 250,
            write_latency_total_us: 1000,
            write_latency_buckets: vec![1, 2, 1],
            write_latency_bounds_us: vec![100, 250, 1000],
            conflicts: 3,
            retries: 1,
            allow_two_primaries: true,
            concurrent_writes: 11,
            superseded_writes: 12,
            retry_writes_asked: 13,
            superseded_by_peer: 14,
            resubmitted_writes: 15,
            current_uuid: "0123456789ABCDEF".to_owned(),
            bitmap_uuids: Default::default(),
            history_uuids: Vec::new(),
            al_hits: 0,
            al_misses: 0,
            al_transactions: 0,
            peers: vec![PeerStatus {
                name: "beta".to_owned(),
                node_id: 1,
                connection: "Connected".to_owned(),
                role: Some(Role::Secondary),
                disk: None,
                replication: "Established".to_owned(),
                sent_bytes: 16384,
                received_bytes: 0,
                pending: 0,
                unacked: 1,
                out_of_sync_bytes: 1 << 18,
                sync: None,
                resynced_bytes: 0,
                resync_same_bytes: 0,
                verify: None,
                last_error: None,
            }],
        }
    }

    #[test]
    fn renders_families_and_samples() {
        let stats = RetryStats {
            postponed: 1,
            ..RetryStats::default()
        };
        let text = render(&[resource("r0")], Some(&stats));
        for line in [
            "# TYPE qrbd_resource_written_bytes_total counter",
            "qrbd_resource_written_bytes_total{resource=\"r0\"} 16384",
            "qrbd_resource_role{resource=\"r0\",role=\"Primary\"} 1",
            "qrbd_resource_role{resource=\"r0\",role=\"Secondary\"} 0",
            "qrbd_resource_disk_state{resource=\"r0\",state=\"UpToDate\"} 1",
            "qrbd_resource_disk_state{resource=\"r0\",state=\"Inconsistent\"} 0",
            "qrbd_resource_write_latency_seconds_bucket{resource=\"r0\",le=\"0.00025\"} 3",
            "qrbd_resource_write_latency_seconds_bucket{resource=\"r0\",le=\"0.001\"} 4",
            "qrbd_resource_conflicts_total{resource=\"r0\"} 3",
            "# TYPE qrbd_resource_concurrent_writes_total counter",
            "qrbd_resource_allow_two_primaries{resource=\"r0\"} 1",
            "qrbd_resource_concurrent_writes_total{resource=\"r0\"} 11",
            "qrbd_resource_superseded_writes_total{resource=\"r0\"} 12",
            "qrbd_resource_retry_writes_asked_total{resource=\"r0\"} 13",
            "qrbd_resource_superseded_by_peer_total{resource=\"r0\"} 14",
            "qrbd_resource_resubmitted_writes_total{resource=\"r0\"} 15",
            "qrbd_resource_write_latency_seconds_bucket{resource=\"r0\",le=\"+Inf\"} 4",
            "qrbd_resource_write_latency_seconds_sum{resource=\"r0\"} 0.001",
            "qrbd_resource_write_latency_seconds_count{resource=\"r0\"} 4",
            "qrbd_peer_connection_state{resource=\"r0\",peer=\"beta\",peer_id=\"1\",state=\"Connected\"} 1",
            "qrbd_peer_connection_state{resource=\"r0\",peer=\"beta\",peer_id=\"1\",state=\"StandAlone\"} 0",
            "qrbd_peer_role{resource=\"r0\",peer=\"beta\",peer_id=\"1\",role=\"Secondary\"} 1",
            "qrbd_peer_disk_state{resource=\"r0\",peer=\"beta\",peer_id=\"1\",state=\"DUnknown\"} 1",
            "qrbd_peer_sent_bytes_total{resource=\"r0\",peer=\"beta\",peer_id=\"1\"} 16384",
            "qrbd_peer_out_of_sync_bytes{resource=\"r0\",peer=\"beta\",peer_id=\"1\"} 262144",
            "qrbd_peer_resync_done_ratio{resource=\"r0\",peer=\"beta\",peer_id=\"1\"} 0.75",
            "qrbd_retry_postponed_total 1",
            "qrbd_resources_up 1",
        ] {
            assert!(text.lines().any(|l| l == line), "missing {line:?} in:\n{text}");
        }
    }

    /// The format's rules: HELP and TYPE once per family, before its samples, and every sample
    /// belongs to the family declared last.
    #[test]
    fn families_are_contiguous() {
        let text = render(
            &[resource("r0"), resource("r1")],
            Some(&RetryStats::default()),
        );
        let mut declared = std::collections::HashSet::new();
        let mut current = String::new();
        for line in text.lines() {
            if let Some(rest) = line.strip_prefix("# TYPE ") {
                let name = rest.split(' ').next().unwrap_or_default().to_owned();
                assert!(declared.insert(name.clone()), "{name} declared twice");
                current = name;
            } else if !line.starts_with('#') {
                let sample = line.split(['{', ' ']).next().unwrap_or_default();
                let family = ["_bucket", "_sum", "_count"]
                    .iter()
                    .find_map(|s| sample.strip_suffix(s).filter(|f| *f == current))
                    .unwrap_or(sample);
                assert_eq!(family, current, "{line:?} outside its family");
                let value = line.rsplit(' ').next().unwrap_or_default();
                assert!(
                    value == "+Inf" || value.parse::<f64>().is_ok(),
                    "bad value in {line:?}"
                );
            }
        }
    }

    #[test]
    fn labels_are_escaped() {
        let mut r = resource("r0");
        r.peers[0].name = "a\"b\\c\nd".to_owned();
        let text = render(&[r], None);
        assert!(text.contains("peer=\"a\\\"b\\\\c\\nd\""), "{text}");
        assert!(!text.contains("qrbd_retry_"), "no retry stats given");
    }

    #[test]
    fn resync_ratio() {
        assert_eq!(resync_done_ratio(1 << 20, 0), 1.0);
        assert_eq!(resync_done_ratio(0, 0), 1.0);
        assert_eq!(resync_done_ratio(1 << 20, 1 << 19), 0.5);
        assert_eq!(resync_done_ratio(1 << 20, 1 << 21), 0.0);
    }

    #[test]
    fn request_heads() {
        let parsed = parse_head(b"GET /metrics?x=1 HTTP/1.1\r\nHost: a\r\n");
        assert_eq!(
            parsed,
            Ok(Request {
                method: "GET".into(),
                path: "/metrics".into()
            })
        );
        assert_eq!(
            parse_head(b"GET /metrics\r\n").map_err(|r| r.status),
            Err(400)
        );
        assert_eq!(
            parse_head(b"GET / HTTP/2\r\n").map_err(|r| r.status),
            Err(505)
        );
        assert_eq!(parse_head(b"\xff\xfe").map_err(|r| r.status), Err(400));
        assert_eq!(head_end(b"GET / HTTP/1.1\r\n\r\nrest"), Some(14));
        assert_eq!(head_end(b"GET / HTTP/1.0\n\n"), Some(14));
        assert_eq!(head_end(b"GET / HTTP/1.1\r\nHost"), None);
    }

    #[test]
    fn head_answers_carry_the_length_without_the_body() {
        let reply = Reply::new(200, "OK", CONTENT_TYPE, "abc".to_owned()).without_body();
        let text = String::from_utf8(reply.to_bytes()).expect("utf-8");
        assert!(text.contains("Content-Length: 3\r\n"), "{text}");
        assert!(text.ends_with("\r\n\r\n"), "{text}");
    }
}
