//! Shared pieces of the integration tests: a node with one resource and a running daemon,
//! deterministic data patterns, and small I/O helpers.
//!
//! Everything that touches the system (daemon, FUSE mount, loop devices, mounts, scratch
//! directories) sits behind the guards of `qrbd::testbed`, so a failing test still cleans up.

#![allow(dead_code)]

use std::ffi::{OsStr, OsString};
use std::fs::File;
use std::io::{self, Write as _};
use std::ops::{Deref, DerefMut};
use std::os::unix::fs::{FileExt, MetadataExt};
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context};
use qrbd::admin::{AdminRequest, AdminResponse};
pub use qrbd::testbed::{run, wait_until, LoopDevice, Mounted, ScratchDir, TestNode, TestResource};
pub use qrbd_actors::status::ResourceStatus;

pub const KIB: u64 = 1 << 10;
pub const MIB: u64 = 1 << 20;

/// How long a test waits for the daemon to react to something.
pub const REACT: Duration = Duration::from_secs(10);

/// The qrbd binary cargo built for these tests.
pub fn binary() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_qrbd"))
}

/// A node in a scratch directory of its own. Fields drop in order: the node (daemon killed,
/// mount cleared) before the directory it lives in.
pub struct Node {
    pub node: TestNode,
    scratch: ScratchDir,
}

impl Node {
    /// A node with resource `r0` of `size`; nothing run yet.
    pub fn configured(prefix: &str, size: &str) -> anyhow::Result<Node> {
        let scratch = ScratchDir::new(prefix)?;
        let node = TestNode::new(
            &binary(),
            scratch.path(),
            &[TestResource {
                name: "r0".into(),
                size: size.into(),
            }],
        )?;
        Ok(Node { node, scratch })
    }

    /// A node with `r0` of `size`: metadata created, daemon running, image visible.
    pub fn start(prefix: &str, size: &str) -> anyhow::Result<Node> {
        let mut node = Node::configured(prefix, size)?;
        node.qrbd_ok(&["create-md", "r0"])?;
        node.start_daemon()?;
        node.wait_for_image()?;
        Ok(node)
    }

    /// A node with the given `(name, size)` resources and `[node] buffer_budget`, every
    /// resource with metadata, daemon running, every image visible; nothing promoted.
    pub fn start_with(
        prefix: &str,
        resources: &[(&str, &str)],
        buffer_budget: &str,
    ) -> anyhow::Result<Node> {
        let scratch = ScratchDir::new(prefix)?;
        let list: Vec<TestResource> = resources
            .iter()
            .map(|(name, size)| TestResource {
                name: (*name).into(),
                size: (*size).into(),
            })
            .collect();
        let mut node = Node {
            node: TestNode::new(&binary(), scratch.path(), &list)?,
            scratch,
        };
        // TestNode writes `[node]` first; the key belongs right under it.
        let text = std::fs::read_to_string(&node.config_path)?;
        ensure!(
            text.starts_with("[node]\n"),
            "unexpected config layout:\n{text}"
        );
        let text = text.replacen(
            "[node]\n",
            &format!("[node]\nbuffer_budget = {buffer_budget:?}\n"),
            1,
        );
        std::fs::write(&node.config_path, text)?;
        for (name, _) in resources {
            node.qrbd_ok(&["create-md", name])?;
        }
        node.start_daemon()?;
        for (name, _) in resources {
            let image = node.image_path(name);
            wait_until(REACT, "the images to appear", || {
                image.exists().then_some(())
            })
            .with_context(|| format!("daemon log:\n{}", node.log()))?;
        }
        Ok(node)
    }

    pub fn dir(&self) -> &Path {
        self.scratch.path()
    }

    pub fn image(&self) -> PathBuf {
        self.node.image_path("r0")
    }

    /// Waits until `r0.img` shows up in the mount directory.
    pub fn wait_for_image(&self) -> anyhow::Result<()> {
        let image = self.image();
        wait_until(REACT, "the image to appear", || {
            image.exists().then_some(())
        })
        .with_context(|| format!("daemon log:\n{}", self.log()))
    }
}

impl Deref for Node {
    type Target = TestNode;
    fn deref(&self) -> &TestNode {
        &self.node
    }
}

impl DerefMut for Node {
    fn deref_mut(&mut self) -> &mut TestNode {
        &mut self.node
    }
}

/// Checks that a command failed and returns its standard error.
pub fn expect_failure(output: &Output, what: &str) -> anyhow::Result<String> {
    let stderr = String::from_utf8_lossy(&output.stderr).into_owned();
    ensure!(
        !output.status.success(),
        "`{what}` succeeded but should have failed; stdout: {}",
        String::from_utf8_lossy(&output.stdout)
    );
    Ok(stderr)
}

/// Checks that `text` contains every one of `words` (case-insensitively).
pub fn ensure_mentions(text: &str, words: &[&str], what: &str) -> anyhow::Result<()> {
    let lower = text.to_lowercase();
    for word in words {
        ensure!(
            lower.contains(&word.to_lowercase()),
            "{what}: expected the message to mention {word:?}; got: {text}"
        );
    }
    Ok(())
}

/// Deterministic pseudo-random bytes (xorshift64*), different for each seed.
pub fn pattern(seed: u64, len: usize) -> Vec<u8> {
    let mut state = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        state ^= state >> 12;
        state ^= state << 25;
        state ^= state >> 27;
        out.extend_from_slice(&state.wrapping_mul(0x2545_F491_4F6C_DD1D).to_le_bytes());
    }
    out.truncate(len);
    out
}

/// FNV-1a, enough to tell file contents apart.
pub fn checksum(data: &[u8]) -> u64 {
    data.iter().fold(0xcbf2_9ce4_8422_2325, |hash, byte| {
        (hash ^ u64::from(*byte)).wrapping_mul(0x0100_0000_01b3)
    })
}

/// Fails with the first differing offset (not a dump of megabytes).
pub fn ensure_same(actual: &[u8], expected: &[u8], what: &str) -> anyhow::Result<()> {
    ensure!(
        actual.len() == expected.len(),
        "{what}: length {} differs from expected {}",
        actual.len(),
        expected.len()
    );
    if actual == expected {
        // memcmp; the search below is only for the message (slow in a debug build).
        return Ok(());
    }
    if let Some(at) = actual.iter().zip(expected).position(|(a, b)| a != b) {
        let end = (at + 16).min(actual.len());
        bail!(
            "{what}: first difference at byte {at}: read {:02x?}, expected {:02x?}",
            &actual[at..end],
            &expected[at..end]
        );
    }
    Ok(())
}

/// Reads `len` bytes at `offset`.
pub fn read_at(file: &File, offset: u64, len: usize) -> anyhow::Result<Vec<u8>> {
    let mut buf = vec![0u8; len];
    file.read_exact_at(&mut buf, offset)
        .with_context(|| format!("reading {len} bytes at {offset}"))?;
    Ok(buf)
}

/// The errno of a failed call, or a description of its unexpected success.
pub fn errno_of<T>(result: io::Result<T>, what: &str) -> anyhow::Result<i32> {
    match result {
        Ok(_) => bail!("{what} succeeded but should have failed"),
        Err(error) => error
            .raw_os_error()
            .with_context(|| format!("{what} failed without an errno: {error}")),
    }
}

/// Checks that a call failed with `expected` (an errno).
pub fn ensure_errno<T>(result: io::Result<T>, expected: i32, what: &str) -> anyhow::Result<()> {
    let errno = errno_of(result, what)?;
    ensure!(
        errno == expected,
        "{what} failed with {} but should fail with {}",
        io::Error::from_raw_os_error(errno),
        io::Error::from_raw_os_error(expected)
    );
    Ok(())
}

/// `fallocate(2)` on an open file.
pub fn fallocate(file: &File, mode: libc::c_int, offset: u64, len: u64) -> io::Result<()> {
    let (Ok(offset), Ok(len)) = (libc::off_t::try_from(offset), libc::off_t::try_from(len)) else {
        return Err(io::Error::from_raw_os_error(libc::EINVAL));
    };
    // SAFETY: a plain syscall on a descriptor that stays open for the call; no memory passed.
    let rc = unsafe { libc::fallocate(file.as_raw_fd(), mode, offset, len) };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Bytes of disk actually allocated to a file (st_blocks).
pub fn allocated_bytes(path: &Path) -> anyhow::Result<u64> {
    Ok(std::fs::metadata(path)
        .with_context(|| format!("stat {}", path.display()))?
        .blocks()
        * 512)
}

/// The names in a directory, sorted.
pub fn list_dir(dir: &Path) -> anyhow::Result<Vec<OsString>> {
    let mut names = std::fs::read_dir(dir)
        .with_context(|| format!("readdir {}", dir.display()))?
        .map(|entry| entry.map(|entry| entry.file_name()))
        .collect::<io::Result<Vec<_>>>()
        .with_context(|| format!("readdir {}", dir.display()))?;
    names.sort();
    Ok(names)
}

/// The status of `r0` asked over the admin socket from this process. Unlike `qrbd status`,
/// this spawns no process, so it cannot be held up by this process's own open image handles
/// while I/O is suspended (see `PreparedCommand`).
pub fn socket_status(node: &TestNode) -> anyhow::Result<ResourceStatus> {
    match node.request(&AdminRequest::Status {
        resource: Some("r0".into()),
    })? {
        AdminResponse::Status { mut resources } => resources.pop().context("no resource listed"),
        other => bail!("status answered {other:?}"),
    }
}

/// Sends an admin request that must succeed, over the socket (no process spawned).
pub fn socket_request(node: &TestNode, request: AdminRequest) -> anyhow::Result<String> {
    match node.request(&request)? {
        AdminResponse::Done { message } => Ok(message),
        other => bail!("{request:?} answered {other:?}"),
    }
}

/// Waits until the status of `r0` satisfies `accept` (asked over the socket); on timeout the
/// error shows the last status (or the last failure to get one) and the daemon's log.
pub fn wait_for_status(
    node: &TestNode,
    what: &str,
    accept: impl Fn(&ResourceStatus) -> bool,
) -> anyhow::Result<ResourceStatus> {
    let mut last = String::from("no answer yet");
    let found = wait_until(REACT, what, || match socket_status(node) {
        Ok(status) if accept(&status) => Some(status),
        Ok(status) => {
            last = format!("{status:?}");
            None
        }
        Err(error) => {
            last = format!("{error:#}");
            None
        }
    });
    found.with_context(|| format!("last status: {last}\ndaemon log:\n{}", node.log()))
}

/// A command started now but held back (by `sh`, waiting for a line on stdin) until `run`.
///
/// Every close of a descriptor of a FUSE image sends FLUSH to the daemon, and `exec` closes
/// the close-on-exec descriptors a child inherited. So a child spawned while this process has
/// the image open, and the image's I/O is suspended, blocks in `exec` (unkillably) until the
/// I/O resumes. Starting the child before the image is opened avoids that: it inherits nothing.
pub struct PreparedCommand {
    child: Option<Child>,
}

impl PreparedCommand {
    pub fn new(program: &Path, args: &[&OsStr]) -> anyhow::Result<Self> {
        let child = Command::new("sh")
            .arg("-c")
            .arg("read line && exec \"$0\" \"$@\"")
            .arg(program)
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .context("cannot start sh")?;
        Ok(PreparedCommand { child: Some(child) })
    }

    /// Lets the command run; returns its output and how long it took, or fails after `limit`.
    pub fn run(mut self, limit: Duration) -> anyhow::Result<(Output, Duration)> {
        let mut child = self.child.take().context("already run")?;
        let started = Instant::now();
        let mut stdin = child.stdin.take().context("no stdin")?;
        stdin
            .write_all(b"go\n")
            .context("cannot release the command")?;
        drop(stdin);
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            // Fails only once `run` gave up waiting (and returned its own error).
            let _ = tx.send(child.wait_with_output());
        });
        match rx.recv_timeout(limit) {
            Ok(output) => Ok((output?, started.elapsed())),
            Err(_) => bail!("the command did not finish within {limit:?}"),
        }
    }
}

impl Drop for PreparedCommand {
    /// Best effort: the command was never run (the test failed first); nobody is left to report
    /// a failure to kill it to.
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// Resumes the I/O of `r0` on drop (over the socket), so that a test failing while I/O is
/// suspended does not leave its own threads and children stuck.
pub struct ResumeOnDrop<'a>(pub &'a TestNode);

impl Drop for ResumeOnDrop<'_> {
    /// Best effort: usually the test resumed I/O itself already, or the daemon is gone; a
    /// failure here must not panic while a failing test unwinds.
    fn drop(&mut self) {
        let _ = self.0.request(&AdminRequest::ResumeIo {
            resource: "r0".into(),
        });
    }
}
