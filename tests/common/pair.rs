//! The pair of test daemons the two-node integration tests share (`replication.rs`,
//! `two_primaries.rs`): alpha and beta as `make_pair` configures them, in a scratch directory of
//! their own, brought up and connected; their status and logs for the tests' checks and failure
//! messages.
//!
//! Included with `#[path]`, so that it needs no line in `tests/common/mod.rs`. What only one test
//! needs of a pair (two primaries, the waits for its own idea of quiet, ...) it adds in an
//! `impl Pair` block of its own.

#![allow(dead_code)]

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context;
use qrbd::testbed::{make_pair, skip_initial_sync, wait_until, PairSpec, ScratchDir, TestNode};
use qrbd_actors::status::PeerStatus;

/// The one resource of every pair.
pub const R: &str = "r0";
/// How long the pair may take to connect (first dial, handshake).
pub const CONNECT: Duration = Duration::from_secs(30);

pub fn binary() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_qrbd"))
}

/// Two nodes (alpha, id 0, dials and resolves conflicts; beta, id 1, accepts) in a scratch
/// directory of their own. Fields drop in order: both daemons (killed, mounts cleared) before the
/// directory they live in.
pub struct Pair {
    pub alpha: TestNode,
    pub beta: TestNode,
    pub beta_listen: SocketAddr,
    scratch: ScratchDir,
}

impl Pair {
    /// Configuration and certificates only; nothing run yet.
    pub fn configure(prefix: &str, spec: &PairSpec) -> anyhow::Result<Pair> {
        let scratch = ScratchDir::new(prefix)?;
        let (alpha, beta, beta_listen) = make_pair(&binary(), scratch.path(), spec)?;
        Ok(Pair {
            alpha,
            beta,
            beta_listen,
            scratch,
        })
    }

    pub fn create_md(&self) -> anyhow::Result<()> {
        for node in [&self.alpha, &self.beta] {
            node.qrbd_ok(&["create-md", R])?;
        }
        Ok(())
    }

    pub fn start(&mut self) -> anyhow::Result<()> {
        self.alpha.start_daemon()?;
        self.beta.start_daemon()?;
        Ok(())
    }

    /// Configured, metadata created, both daemons running and connected.
    pub fn up(prefix: &str, spec: &PairSpec) -> anyhow::Result<Pair> {
        let mut pair = Pair::configure(prefix, spec)?;
        pair.create_md()?;
        pair.start()?;
        pair.wait_connected(CONNECT)?;
        Ok(pair)
    }

    pub fn dir(&self) -> &Path {
        self.scratch.path()
    }

    /// Waits until both are connected; a fresh pair's blank disks are then declared
    /// identical (`new-current-uuid --clear-bitmap`).
    pub fn wait_connected(&self, limit: Duration) -> anyhow::Result<()> {
        self.wait_connected_blank(limit)?;
        skip_initial_sync(&[&self.alpha, &self.beta], R).with_context(|| self.logs())?;
        Ok(())
    }

    /// Waits until both are connected, and nothing else.
    pub fn wait_connected_blank(&self, limit: Duration) -> anyhow::Result<()> {
        for node in [&self.alpha, &self.beta] {
            wait_until(limit, "the pair to connect", || {
                connection(node).filter(|c| c == "Connected")
            })
            .with_context(|| self.logs())?;
        }
        Ok(())
    }

    /// Both daemon logs, for failure messages.
    pub fn logs(&self) -> String {
        format!(
            "--- alpha daemon log ---\n{}\n--- beta daemon log ---\n{}",
            tail(&log(&self.alpha), 60),
            tail(&log(&self.beta), 60)
        )
    }
}

/// A daemon's log without the terminal colour codes the daemon writes even to a file.
pub fn log(node: &TestNode) -> String {
    let raw = node.log();
    let mut plain = String::with_capacity(raw.len());
    let mut chars = raw.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            // CSI ... final byte in '@'..='~' (colours end with 'm').
            for c in chars.by_ref() {
                if ('@'..='~').contains(&c) && c != '[' {
                    break;
                }
            }
        } else {
            plain.push(c);
        }
    }
    plain
}

pub fn tail(text: &str, lines: usize) -> String {
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// The one peer of `r0` on `node`.
pub fn peer(node: &TestNode) -> anyhow::Result<PeerStatus> {
    let status = node.status(R)?;
    status
        .peers
        .into_iter()
        .next()
        .context("status lists no peer")
}

pub fn connection(node: &TestNode) -> Option<String> {
    peer(node).ok().map(|p| p.connection)
}
