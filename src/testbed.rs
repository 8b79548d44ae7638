//! Real processes, loop devices and mounts for the demo and the integration tests, each behind
//! a guard that cleans up on drop, also when a test fails half-way.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use qrbd_actors::status::ResourceStatus;

use crate::admin::{self, AdminRequest, AdminResponse};

/// Polls `probe` until it yields a value or `limit` passes. Polling a condition with a deadline,
/// not sleeping for a guessed time, is how tests wait.
pub fn wait_until<T>(
    limit: Duration,
    what: &str,
    mut probe: impl FnMut() -> Option<T>,
) -> anyhow::Result<T> {
    let deadline = Instant::now() + limit;
    let mut pause = Duration::from_millis(5);
    loop {
        if let Some(value) = probe() {
            return Ok(value);
        }
        if Instant::now() >= deadline {
            bail!("timed out after {limit:?} waiting for {what}");
        }
        std::thread::sleep(pause);
        pause = (pause * 2).min(Duration::from_millis(100));
    }
}

/// Fresh replicas are blank (Inconsistent, in the fresh generation) until the initial sync.
/// Tests whose disks are new declare them identical, as an operator with new disks does:
/// `new-current-uuid --clear-bitmap` on the first node, then every node UpToDate. Does nothing
/// (and returns false) when the first node is not blank. The nodes must be connected.
pub fn skip_initial_sync(nodes: &[&TestNode], resource: &str) -> anyhow::Result<bool> {
    let Some(first) = nodes.first() else {
        return Ok(false);
    };
    let fresh = format!("{:016X}", qrbd_actors::core::generation::JUST_CREATED_UUID);
    let status = first.status(resource)?;
    if status.disk != qrbd_actors::core::DiskState::Inconsistent || status.current_uuid != fresh {
        return Ok(false);
    }
    first.qrbd_ok(&["new-current-uuid", "--clear-bitmap", resource])?;
    for node in nodes {
        wait_until(Duration::from_secs(20), "every replica UpToDate", || {
            node.status(resource)
                .ok()
                .filter(|s| s.disk == qrbd_actors::core::DiskState::UpToDate)
        })?;
    }
    Ok(true)
}

/// Runs a command, failing with its output when it fails.
pub fn run(program: &str, args: &[&str]) -> anyhow::Result<String> {
    let output = Command::new(program)
        .args(args)
        .output()
        .with_context(|| format!("cannot run {program} (is it installed?)"))?;
    if !output.status.success() {
        bail!(
            "`{program} {}` failed ({}): {}{}",
            args.join(" "),
            output.status,
            String::from_utf8_lossy(&output.stderr),
            String::from_utf8_lossy(&output.stdout)
        );
    }
    Ok(String::from_utf8_lossy(&output.stdout).into_owned())
}

/// A directory removed (with everything in it) on drop.
pub struct ScratchDir {
    path: PathBuf,
}

impl ScratchDir {
    pub fn new(prefix: &str) -> anyhow::Result<Self> {
        let path = std::env::temp_dir().join(format!("{prefix}-{:016x}", rand::random::<u64>()));
        std::fs::create_dir_all(&path)
            .with_context(|| format!("cannot create {}", path.display()))?;
        Ok(ScratchDir { path })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for ScratchDir {
    fn drop(&mut self) {
        // For a post-mortem of a failed test: its daemon logs stay where they were.
        if std::env::var_os("QRBD_TEST_KEEP").is_some() {
            eprintln!("keeping {}", self.path.display());
            return;
        }
        let _ = std::fs::remove_dir_all(&self.path);
    }
}

/// One resource of a test node.
#[derive(Debug, Clone)]
pub struct TestResource {
    pub name: String,
    pub size: String,
}

/// A qrbd node in a directory of its own: config, state, mount point, admin socket, daemon.
pub struct TestNode {
    pub binary: PathBuf,
    pub dir: PathBuf,
    pub config_path: PathBuf,
    pub mount_dir: PathBuf,
    pub socket: PathBuf,
    pub state_dir: PathBuf,
    daemon: Option<Child>,
    log_path: PathBuf,
    /// Start the daemon with `QRBD_TEST_HOOKS=1` (see `AdminRequest::TestSendData`).
    pub test_hooks: bool,
}

impl TestNode {
    /// Writes the configuration of a single node under `dir`.
    pub fn new(binary: &Path, dir: &Path, resources: &[TestResource]) -> anyhow::Result<Self> {
        let state_dir = dir.join("state");
        let mount_dir = dir.join("disks");
        let socket = dir.join("qrbd.sock");
        let mut text = String::new();
        let _ = writeln!(
            text,
            "[node]\nname = \"alpha\"\nid = 0\nstate_dir = {:?}\nmount_dir = {:?}\n\
             admin_socket = {:?}\nlisten = \"127.0.0.1:7788\"\n",
            state_dir, mount_dir, socket
        );
        for resource in resources {
            let _ = writeln!(
                text,
                "[[resource]]\nname = {:?}\nsize = {:?}\nprotocol = \"C\"\n",
                resource.name, resource.size
            );
        }
        let config_path = dir.join("qrbd.toml");
        std::fs::write(&config_path, text)
            .with_context(|| format!("cannot write {}", config_path.display()))?;
        Ok(TestNode {
            test_hooks: false,
            binary: binary.to_owned(),
            dir: dir.to_owned(),
            config_path,
            mount_dir,
            socket,
            state_dir,
            daemon: None,
            log_path: dir.join("daemon.log"),
        })
    }

    /// A node with a configuration written by the caller (`config_text`), e.g. by
    /// [`pair_configs`].
    pub fn from_config(binary: &Path, dir: &Path, config_text: &str) -> anyhow::Result<Self> {
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
        let config_path = dir.join("qrbd.toml");
        std::fs::write(&config_path, config_text)
            .with_context(|| format!("cannot write {}", config_path.display()))?;
        Ok(TestNode {
            test_hooks: false,
            binary: binary.to_owned(),
            dir: dir.to_owned(),
            config_path,
            mount_dir: dir.join("disks"),
            socket: dir.join("qrbd.sock"),
            state_dir: dir.join("state"),
            daemon: None,
            log_path: dir.join("daemon.log"),
        })
    }

    /// Runs `qrbd --config <this node> ARGS`.
    pub fn qrbd(&self, args: &[&str]) -> anyhow::Result<Output> {
        Command::new(&self.binary)
            .arg("--config")
            .arg(&self.config_path)
            .args(args)
            .output()
            .with_context(|| format!("cannot run {}", self.binary.display()))
    }

    /// Runs a qrbd command that must succeed; returns its standard output.
    pub fn qrbd_ok(&self, args: &[&str]) -> anyhow::Result<String> {
        let output = self.qrbd(args)?;
        if !output.status.success() {
            bail!(
                "`qrbd {}` failed ({}): {}",
                args.join(" "),
                output.status,
                String::from_utf8_lossy(&output.stderr)
            );
        }
        Ok(String::from_utf8_lossy(&output.stdout).into_owned())
    }

    /// Runs a qrbd command that must fail; returns its standard error.
    pub fn qrbd_fails(&self, args: &[&str]) -> anyhow::Result<String> {
        let output = self.qrbd(args)?;
        if output.status.success() {
            bail!(
                "`qrbd {}` succeeded but should have failed; stdout: {}",
                args.join(" "),
                String::from_utf8_lossy(&output.stdout)
            );
        }
        Ok(String::from_utf8_lossy(&output.stderr).into_owned())
    }

    pub fn image_path(&self, resource: &str) -> PathBuf {
        self.mount_dir.join(format!("{resource}.img"))
    }

    pub fn backing_path(&self, resource: &str) -> PathBuf {
        self.state_dir.join(format!("{resource}.img"))
    }

    /// Starts the daemon and waits until it answers on its socket.
    pub fn start_daemon(&mut self) -> anyhow::Result<()> {
        if self.daemon.is_some() {
            bail!("daemon already running");
        }
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log_path)
            .with_context(|| format!("cannot open {}", self.log_path.display()))?;
        let mut command = Command::new(&self.binary);
        if self.test_hooks {
            command.env(crate::admin::TEST_HOOKS_ENV, "1");
        }
        let child = command
            .arg("--config")
            .arg(&self.config_path)
            .args(["--log-level", "info", "daemon"])
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .with_context(|| format!("cannot start {}", self.binary.display()))?;
        self.daemon = Some(child);
        let socket = self.socket.clone();
        let started = wait_until(Duration::from_secs(20), "the daemon to answer", || {
            if let Some(status) = self.daemon_exit() {
                return Some(Err(status));
            }
            let answer = admin::request(&socket, &AdminRequest::Status { resource: None });
            answer.ok().map(Ok)
        });
        match started {
            Ok(Ok(_)) => Ok(()),
            Ok(Err(status)) => bail!("daemon exited early ({status}); log:\n{}", self.log()),
            Err(error) => bail!("{error}; log:\n{}", self.log()),
        }
    }

    fn daemon_exit(&mut self) -> Option<ExitStatus> {
        let child = self.daemon.as_mut()?;
        match child.try_wait() {
            Ok(Some(status)) => {
                self.daemon = None;
                Some(status)
            }
            _ => None,
        }
    }

    pub fn daemon_pid(&self) -> Option<u32> {
        self.daemon.as_ref().map(Child::id)
    }

    /// The daemon's log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log_path).unwrap_or_default()
    }

    /// SIGTERM, then waits for the exit.
    pub fn stop_daemon(&mut self) -> anyhow::Result<ExitStatus> {
        let Some(pid) = self.daemon_pid() else {
            bail!("daemon not running");
        };
        signal(pid, libc::SIGTERM);
        let status = wait_until(Duration::from_secs(60), "the daemon to exit", || {
            self.daemon_exit()
        })?;
        Ok(status)
    }

    /// SIGKILL, as a crash would. The dead mount it leaves is cleared by the next daemon start
    /// (or by dropping the node).
    pub fn kill_daemon(&mut self) -> anyhow::Result<()> {
        let Some(mut child) = self.daemon.take() else {
            bail!("daemon not running");
        };
        child.kill().context("cannot kill the daemon")?;
        child.wait().context("cannot reap the daemon")?;
        Ok(())
    }

    pub fn request(&self, request: &AdminRequest) -> anyhow::Result<AdminResponse> {
        Ok(admin::request(&self.socket, request)?)
    }

    pub fn status(&self, resource: &str) -> anyhow::Result<ResourceStatus> {
        let output = self.qrbd_ok(&["status", resource, "--json"])?;
        let mut list: Vec<ResourceStatus> =
            serde_json::from_str(&output).with_context(|| format!("bad status JSON: {output}"))?;
        list.pop().context("status listed no resource")
    }
}

fn signal(pid: u32, signal: libc::c_int) {
    if let Ok(pid) = libc::pid_t::try_from(pid) {
        // SAFETY: kill has no memory-safety preconditions.
        unsafe { libc::kill(pid, signal) };
    }
}

impl Drop for TestNode {
    fn drop(&mut self) {
        if let Some(mut child) = self.daemon.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        let _ = Command::new("umount")
            .arg("-l")
            .arg(&self.mount_dir)
            .output();
    }
}

/// A loop device over a file, detached on drop.
pub struct LoopDevice {
    pub device: String,
}

impl LoopDevice {
    /// `losetup --direct-io=on`, as the README tells users to do.
    pub fn attach(file: &Path) -> anyhow::Result<Self> {
        let file = file.to_string_lossy();
        let device = run("losetup", &["--direct-io=on", "--find", "--show", &file])?;
        Ok(LoopDevice {
            device: device.trim().to_owned(),
        })
    }

    pub fn detach(mut self) -> anyhow::Result<()> {
        let device = std::mem::take(&mut self.device);
        run("losetup", &["-d", &device]).map(|_| ())
    }
}

impl Drop for LoopDevice {
    fn drop(&mut self) {
        if !self.device.is_empty() {
            let _ = Command::new("losetup").args(["-d", &self.device]).output();
        }
    }
}

/// A mounted file system, unmounted on drop.
pub struct Mounted {
    pub target: PathBuf,
    active: bool,
}

impl Mounted {
    pub fn mount(device: &str, target: &Path) -> anyhow::Result<Self> {
        std::fs::create_dir_all(target)
            .with_context(|| format!("cannot create {}", target.display()))?;
        run("mount", &[device, &target.to_string_lossy()])?;
        Ok(Mounted {
            target: target.to_owned(),
            active: true,
        })
    }

    pub fn unmount(mut self) -> anyhow::Result<()> {
        self.active = false;
        run("umount", &[&self.target.to_string_lossy()]).map(|_| ())
    }
}

impl Drop for Mounted {
    fn drop(&mut self) {
        if self.active {
            let target = self.target.to_string_lossy().into_owned();
            let ok = Command::new("umount")
                .arg(&target)
                .output()
                .map(|o| o.status.success());
            if !matches!(ok, Ok(true)) {
                let _ = Command::new("umount").args(["-l", &target]).output();
            }
        }
    }
}

/// A free UDP port on 127.0.0.1 (QUIC listens on UDP).
pub fn free_udp_port() -> anyhow::Result<u16> {
    let socket = std::net::UdpSocket::bind("127.0.0.1:0").context("cannot bind a UDP port")?;
    Ok(socket.local_addr()?.port())
}

/// How to build a two-node test pair.
#[derive(Debug, Clone)]
pub struct PairSpec {
    pub resource: String,
    pub size: String,
    pub protocol: String,
    /// Where alpha (id 0, the side that dials) reaches beta; defaults to beta's listen address.
    /// Point it at a fault proxy to put one between them.
    pub beta_address_for_alpha: Option<std::net::SocketAddr>,
    /// Writes `allow_two_primaries = true` into the resource on both nodes (default false).
    /// The config refuses it unless `protocol` is C. For a pair that disagrees, edit that line
    /// in one node's file before starting it.
    pub allow_two_primaries: bool,
}

impl PairSpec {
    pub fn new(resource: &str, size: &str, protocol: &str) -> Self {
        PairSpec {
            resource: resource.to_owned(),
            size: size.to_owned(),
            protocol: protocol.to_owned(),
            beta_address_for_alpha: None,
            allow_two_primaries: false,
        }
    }

    /// The same pair with `allow_two_primaries = true` on both nodes.
    pub fn with_two_primaries(mut self) -> Self {
        self.allow_two_primaries = true;
        self
    }
}

/// Two nodes, alpha (id 0) and beta (id 1), on 127.0.0.1 with certificates from one CA made by
/// `qrbd gen-cert`, under `dir/alpha`, `dir/beta` and `dir/tls`. Returns them and beta's
/// listen address.
pub fn make_pair(
    binary: &Path,
    dir: &Path,
    spec: &PairSpec,
) -> anyhow::Result<(TestNode, TestNode, std::net::SocketAddr)> {
    let tls = dir.join("tls");
    for name in ["alpha", "beta"] {
        let output = Command::new(binary)
            .args(["gen-cert", "--ca-dir"])
            .arg(&tls)
            .args(["--node", name])
            .output()
            .context("cannot run qrbd gen-cert")?;
        if !output.status.success() {
            bail!(
                "gen-cert failed: {}",
                String::from_utf8_lossy(&output.stderr)
            );
        }
    }
    let alpha_port = free_udp_port()?;
    let beta_port = free_udp_port()?;
    let beta_listen: std::net::SocketAddr = ([127, 0, 0, 1], beta_port).into();
    let alpha_listen: std::net::SocketAddr = ([127, 0, 0, 1], alpha_port).into();
    let beta_for_alpha = spec.beta_address_for_alpha.unwrap_or(beta_listen);
    let alpha = TestNode::from_config(
        binary,
        &dir.join("alpha"),
        &pair_config(
            dir,
            "alpha",
            0,
            alpha_listen,
            "beta",
            1,
            beta_for_alpha,
            spec,
        ),
    )?;
    let beta = TestNode::from_config(
        binary,
        &dir.join("beta"),
        &pair_config(dir, "beta", 1, beta_listen, "alpha", 0, alpha_listen, spec),
    )?;
    Ok((alpha, beta, beta_listen))
}

#[allow(clippy::too_many_arguments)]
fn pair_config(
    dir: &Path,
    name: &str,
    id: u8,
    listen: std::net::SocketAddr,
    peer: &str,
    peer_id: u8,
    peer_address: std::net::SocketAddr,
    spec: &PairSpec,
) -> String {
    let node_dir = dir.join(name);
    let tls = dir.join("tls");
    format!(
        "[node]\nname = \"{name}\"\nid = {id}\nstate_dir = {:?}\nmount_dir = {:?}\n\
         admin_socket = {:?}\nlisten = \"{listen}\"\n\n\
         [tls]\nca = {:?}\ncert = {:?}\nkey = {:?}\n\n\
         [[resource]]\nname = {:?}\nsize = {:?}\nprotocol = {:?}\n{}\n\
         [[resource.peer]]\nname = \"{peer}\"\nid = {peer_id}\naddress = \"{peer_address}\"\n",
        node_dir.join("state"),
        node_dir.join("disks"),
        node_dir.join("qrbd.sock"),
        tls.join("ca.crt"),
        tls.join(format!("{name}.crt")),
        tls.join(format!("{name}.key")),
        spec.resource,
        spec.size,
        spec.protocol,
        if spec.allow_two_primaries {
            "allow_two_primaries = true\n"
        } else {
            ""
        },
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The pair's files are valid configurations, and two primaries are off unless asked for.
    #[test]
    fn pair_config_two_primaries() {
        let config = |spec: &PairSpec| {
            let listen = "127.0.0.1:7788".parse().expect("address");
            let peer = "127.0.0.1:7789".parse().expect("address");
            let text = pair_config(
                Path::new("/tmp/pair"),
                "alpha",
                0,
                listen,
                "beta",
                1,
                peer,
                spec,
            );
            match crate::config::load_from_str(&text, &[]) {
                Ok(config) => config,
                Err(e) => panic!("{e}\n{text}"),
            }
        };
        let plain = PairSpec::new("r0", "16MiB", "C");
        let resource = &config(&plain).resources[0];
        assert!(!resource.allow_two_primaries);
        assert_eq!(resource.peers.len(), 1);
        let two = config(&plain.clone().with_two_primaries());
        assert!(two.resources[0].allow_two_primaries);
        assert_eq!(two.resources[0].peers.len(), 1);
    }
}
