//! `qrbd daemon`: the long-running node process.

use std::ffi::CString;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;
use std::sync::Arc;

use actix::prelude::*;
use anyhow::{bail, Context};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};

use crate::admin::{parse_request, AdminRequest, AdminResponse};
use crate::config::QrbdConfig;
use crate::fuse_fs::{self, DiskFs, ImageTable};
use crate::node::{Admin, DownAll, NodeActor, SubscribeEvents, UpAll};
use crate::transport;

const PR_SET_IO_FLUSHER: libc::c_int = 57;

/// Loop-over-FUSE can deadlock under memory reclaim: writeback to the loop device waits for
/// this daemon, and this daemon's allocations would wait for writeback. Marking the process as
/// an I/O flusher lets the kernel keep reclaim from recursing into filesystem I/O on our behalf.
/// Must run before any thread starts, as threads inherit it.
pub fn mark_as_io_flusher() {
    // SAFETY: prctl with integer arguments has no memory-safety preconditions.
    let rc = unsafe { libc::prctl(PR_SET_IO_FLUSHER, 1, 0, 0, 0) };
    if rc != 0 {
        tracing::warn!(
            error = %std::io::Error::last_os_error(),
            "cannot mark the daemon as an I/O flusher (needs CAP_SYS_RESOURCE); \
             loop devices on the images may deadlock under memory pressure"
        );
    }
}

/// Runs the daemon until SIGTERM or SIGINT.
pub fn run(config: QrbdConfig) -> anyhow::Result<()> {
    mark_as_io_flusher();
    let config = Arc::new(config);
    prepare_mount_dir(&config.node.mount_dir)?;
    let system = actix_rt::System::new();
    let result = system.block_on(serve(config));
    // Stop the arbiters (and the metadata threads) before returning to main.
    drop(system);
    result
}

async fn serve(config: Arc<QrbdConfig>) -> anyhow::Result<()> {
    let listener = bind_admin_socket(&config.node.admin_socket)?;
    let metrics_listener = match config.node.metrics {
        Some(address) => Some(crate::metrics::bind(address).await?),
        None => None,
    };
    let image_budget = usize::try_from(config.image_buffer_budget()).unwrap_or(usize::MAX);
    let images = ImageTable::shared(image_budget);
    let mount_dir = config.node.mount_dir.clone();
    let session = fuse_fs::mount(DiskFs::new(images.clone()), &mount_dir).with_context(|| {
        format!(
            "cannot mount the FUSE filesystem at {}",
            mount_dir.display()
        )
    })?;
    tracing::info!(mount = %mount_dir.display(), image_budget, "images are served");

    let endpoint = replication_endpoint(&config)?;
    let (events, _) = tokio::sync::broadcast::channel(1024);
    let node = NodeActor::new(config.clone(), images, endpoint.clone(), events).start();
    node.send(UpAll).await.context("node actor failed")?;
    if let Some(endpoint) = &endpoint {
        actix_rt::spawn(crate::peer::accept_loop(
            endpoint.clone(),
            config.clone(),
            node.clone().recipient(),
        ));
        tracing::info!(listen = %config.node.listen, "accepting peer connections (QUIC, mutual TLS)");
    }

    let admin = actix_rt::spawn(accept_admin(listener, node.clone()));
    let metrics = metrics_listener.map(|listener| {
        tracing::info!(address = ?listener.local_addr().ok(), "serving metrics at /metrics");
        actix_rt::spawn(crate::metrics::serve(listener, node.clone()))
    });
    tracing::info!(socket = %config.node.admin_socket.display(), node = %config.node.name, "daemon ready");
    notify_systemd("READY=1");

    wait_for_termination().await?;
    tracing::info!("shutting down: finishing in-flight I/O");
    notify_systemd("STOPPING=1");
    admin.abort();
    if let Some(metrics) = metrics {
        metrics.abort();
    }
    if let Err(error) = node.send(DownAll).await {
        tracing::error!(%error, "taking resources down failed");
    }
    let _ = std::fs::remove_file(&config.node.admin_socket);
    if let Some(endpoint) = endpoint {
        endpoint.close(0u32.into(), b"node shutting down");
        // Let the close frames leave before the process ends.
        let _ = tokio::time::timeout(std::time::Duration::from_secs(1), endpoint.wait_idle()).await;
    }
    unmount(&mount_dir, session);
    tracing::info!("daemon stopped");
    Ok(())
}

/// The QUIC endpoint, if any resource has peers. Replication is always encrypted: peers
/// without a `[tls]` section are a configuration error.
fn replication_endpoint(config: &QrbdConfig) -> anyhow::Result<Option<quinn::Endpoint>> {
    let with_peers: Vec<&str> = config
        .resources
        .iter()
        .filter(|r| !r.peers.is_empty())
        .map(|r| r.name.as_str())
        .collect();
    if with_peers.is_empty() {
        return Ok(None);
    }
    let Some(tls) = &config.tls else {
        bail!(
            "{}: resource(s) {} have peers but there is no [tls] section; replication is always \
             encrypted (create certificates with `qrbd gen-cert`)",
            config.source.display(),
            with_peers.join(", ")
        );
    };
    let identity = transport::load_identity(tls).context("cannot load the TLS identity")?;
    // On the actor thread: quinn drives its connections and the UDP socket on the runtime that
    // creates the endpoint. Sharing the thread with the DeviceActors means a write crosses no
    // thread between the request pipeline and the wire; a transport runtime of its own cost
    // more in wake-ups and lock contention than it gained in parallelism on two cores
    // (benches/README.md).
    let endpoint = transport::make_endpoint(config.node.listen, &identity);
    let endpoint =
        endpoint.with_context(|| format!("cannot listen for peers on {}", config.node.listen))?;
    Ok(Some(endpoint))
}

/// Tells systemd (`Type=notify` in qrbd.service) about the daemon's state: one datagram to the
/// socket named by `$NOTIFY_SOCKET` (a path, or an abstract name starting with '@'). Does
/// nothing when the variable is unset (not started by systemd).
fn notify_systemd(state: &str) {
    use std::os::linux::net::SocketAddrExt;
    use std::os::unix::net::{SocketAddr, UnixDatagram};
    let Some(target) = std::env::var_os("NOTIFY_SOCKET") else {
        return;
    };
    let bytes = target.as_bytes();
    let address = match bytes.strip_prefix(b"@") {
        Some(name) => SocketAddr::from_abstract_name(name),
        None => SocketAddr::from_pathname(Path::new(&target)),
    };
    let sent = address
        .and_then(|address| UnixDatagram::unbound()?.send_to_addr(state.as_bytes(), &address));
    if let Err(error) = sent {
        tracing::warn!(%error, socket = ?target, state, "cannot notify systemd");
    }
}

async fn wait_for_termination() -> anyhow::Result<()> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).context("cannot watch SIGTERM")?;
    let mut int = signal(SignalKind::interrupt()).context("cannot watch SIGINT")?;
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM received"),
        _ = int.recv() => tracing::info!("SIGINT received"),
    }
    Ok(())
}

/// Creates the mount point, clearing a dead mount left by a daemon that was killed.
fn prepare_mount_dir(mount_dir: &Path) -> anyhow::Result<()> {
    // A killed daemon leaves a mount whose every access fails with ENOTCONN.
    if let Err(error) = std::fs::metadata(mount_dir) {
        if error.raw_os_error() == Some(libc::ENOTCONN) {
            tracing::warn!(mount = %mount_dir.display(), "clearing a stale mount left by a previous daemon");
            detach(mount_dir);
        }
    }
    std::fs::create_dir_all(mount_dir)
        .with_context(|| format!("cannot create the mount directory {}", mount_dir.display()))?;
    Ok(())
}

fn path_cstring(path: &Path) -> Option<CString> {
    CString::new(path.as_os_str().as_bytes()).ok()
}

fn detach(path: &Path) {
    if let Some(cpath) = path_cstring(path) {
        // SAFETY: cpath is a valid NUL-terminated string for the duration of the call.
        unsafe { libc::umount2(cpath.as_ptr(), libc::MNT_DETACH) };
    }
}

/// Unmounts the images. If something (a loop device) still holds an image open, the mount is
/// detached lazily instead and the session threads are left to end with the process.
fn unmount(mount_dir: &Path, session: fuser::BackgroundSession) {
    // The session unmounts through its own handle (unmounting behind its back made it try
    // again and log a spurious EINVAL); once unmounted, its threads end and are joined.
    match session.umount_and_join() {
        Ok(()) => {}
        Err(error) => {
            tracing::warn!(%error, mount = %mount_dir.display(), "images still in use (a loop device?); detaching the mount lazily");
            detach(mount_dir);
        }
    }
}

fn bind_admin_socket(path: &Path) -> anyhow::Result<UnixListener> {
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent).with_context(|| {
            format!(
                "cannot create the directory of the admin socket {}",
                path.display()
            )
        })?;
    }
    if path.exists() {
        if std::os::unix::net::UnixStream::connect(path).is_ok() {
            bail!(
                "another qrbd daemon is already listening on {}; stop it first",
                path.display()
            );
        }
        std::fs::remove_file(path)
            .with_context(|| format!("cannot remove the stale admin socket {}", path.display()))?;
    }
    UnixListener::bind(path)
        .with_context(|| format!("cannot listen on the admin socket {}", path.display()))
}

async fn accept_admin(listener: UnixListener, node: Addr<NodeActor>) {
    loop {
        match listener.accept().await {
            Ok((stream, _)) => {
                actix_rt::spawn(serve_admin_connection(stream, node.clone()));
            }
            Err(error) => tracing::warn!(%error, "admin socket accept failed"),
        }
    }
}

async fn serve_admin_connection(stream: UnixStream, node: Addr<NodeActor>) {
    let (reader, mut writer) = stream.into_split();
    let mut lines = BufReader::new(reader).lines();
    loop {
        let line = match lines.next_line().await {
            Ok(Some(line)) => line,
            Ok(None) => return,
            Err(error) => {
                tracing::debug!(%error, "admin connection read failed");
                return;
            }
        };
        let response = match parse_request(&line) {
            Ok(AdminRequest::Events) => return stream_events(writer, &node).await,
            Ok(request) => {
                tracing::debug!(?request, "admin request");
                node.send(Admin(request)).await.unwrap_or_else(|error| {
                    AdminResponse::failed(format!("node unavailable: {error}"))
                })
            }
            Err(message) => AdminResponse::failed(message),
        };
        let mut answer = serde_json::to_string(&response)
            .unwrap_or_else(|error| format!("{{\"outcome\":\"failed\",\"message\":\"{error}\"}}"));
        answer.push('\n');
        if writer.write_all(answer.as_bytes()).await.is_err() {
            return;
        }
    }
}

/// Streams state changes to an `events` client until it goes away.
async fn stream_events(mut writer: tokio::net::unix::OwnedWriteHalf, node: &Addr<NodeActor>) {
    let Ok((current, mut changes)) = node.send(SubscribeEvents).await else {
        return;
    };
    for line in current {
        if writer
            .write_all(format!("{line}\n").as_bytes())
            .await
            .is_err()
        {
            return;
        }
    }
    loop {
        match changes.recv().await {
            Ok(line) => {
                if writer
                    .write_all(format!("{line}\n").as_bytes())
                    .await
                    .is_err()
                {
                    return;
                }
            }
            Err(tokio::sync::broadcast::error::RecvError::Lagged(missed)) => {
                let note = format!("lagged {missed} events were dropped\n");
                if writer.write_all(note.as_bytes()).await.is_err() {
                    return;
                }
            }
            Err(tokio::sync::broadcast::error::RecvError::Closed) => return,
        }
    }
}
