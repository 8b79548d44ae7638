//! A child process of an integration test (`dd`, `fio`, `qrbd events`, the test binary run again
//! as a writer), in a process group of its own and killed with it on drop, so that a test that
//! fails half-way leaves nothing running.
//!
//! Included with `#[path]` by `replication.rs` and `two_primaries.rs`, so that it needs no line in
//! `tests/common/mod.rs`.

#![allow(dead_code)]

use std::fs::File;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::Duration;

use anyhow::{ensure, Context};
use qrbd::testbed::wait_until;

/// A child process in a process group of its own, killed (the whole group) on drop.
pub struct Background {
    child: Option<Child>,
    what: String,
    /// Where the standard output goes.
    pub stdout_path: PathBuf,
    stderr_path: PathBuf,
}

impl Background {
    pub fn spawn(
        what: &str,
        command: &mut Command,
        stdout: &Path,
        stderr: &Path,
    ) -> anyhow::Result<Self> {
        let child = command
            .stdin(Stdio::null())
            .stdout(File::create(stdout)?)
            .stderr(File::create(stderr)?)
            .process_group(0)
            .spawn()
            .with_context(|| format!("cannot start {what}"))?;
        Ok(Background {
            child: Some(child),
            what: what.to_owned(),
            stdout_path: stdout.to_owned(),
            stderr_path: stderr.to_owned(),
        })
    }

    /// [`Self::spawn`] with the standard output in `dir/name.out` and the error in
    /// `dir/name.err`.
    pub fn spawn_in(
        what: &str,
        command: &mut Command,
        dir: &Path,
        name: &str,
    ) -> anyhow::Result<Self> {
        Self::spawn(
            what,
            command,
            &dir.join(format!("{name}.out")),
            &dir.join(format!("{name}.err")),
        )
    }

    pub fn pid(&self) -> anyhow::Result<libc::pid_t> {
        let child = self.child.as_ref().context("already reaped")?;
        Ok(libc::pid_t::try_from(child.id())?)
    }

    pub fn signal(&self, signal: libc::c_int) -> anyhow::Result<()> {
        let pid = self.pid()?;
        // SAFETY: kill has no memory-safety preconditions.
        if unsafe { libc::kill(pid, signal) } != 0 {
            return Err(std::io::Error::last_os_error())
                .with_context(|| format!("cannot signal {}", self.what));
        }
        Ok(())
    }

    pub fn running(&mut self) -> bool {
        matches!(self.child.as_mut().map(Child::try_wait), Some(Ok(None)))
    }

    /// Waits for the exit, at most `limit`.
    pub fn wait(&mut self, limit: Duration) -> anyhow::Result<ExitStatus> {
        let what = format!("{} to exit", self.what);
        let child = self.child.as_mut().context("already reaped")?;
        // A failing try_wait ends the wait with its error rather than looking like "running".
        let status = wait_until(limit, &what, || child.try_wait().transpose())?
            .with_context(|| format!("cannot wait for {}", self.what))?;
        self.child = None;
        Ok(status)
    }

    /// Waits until `probe` yields a value, at most `limit`; fails early (with the standard
    /// error) if the process exits first.
    pub fn wait_while_running<T>(
        &mut self,
        limit: Duration,
        what: &str,
        mut probe: impl FnMut() -> Option<T>,
    ) -> anyhow::Result<T> {
        let found = wait_until(limit, what, || {
            if let Some(value) = probe() {
                return Some(Some(value));
            }
            (!self.running()).then_some(None)
        })
        .with_context(|| format!("{} so far: {}", self.what, self.stderr()))?;
        found.with_context(|| format!("{} exited before {what}: {}", self.what, self.stderr()))
    }

    /// Waits for a successful exit and returns the standard output.
    pub fn finish(&mut self, limit: Duration) -> anyhow::Result<String> {
        let status = self.wait(limit)?;
        ensure!(
            status.success(),
            "{} failed ({status}): {}\n{}",
            self.what,
            self.stderr(),
            std::fs::read_to_string(&self.stdout_path).unwrap_or_default()
        );
        Ok(std::fs::read_to_string(&self.stdout_path)?)
    }

    /// The standard error so far, for failure messages.
    pub fn stderr(&self) -> String {
        std::fs::read_to_string(&self.stderr_path).unwrap_or_else(|error| {
            format!("(cannot read {}: {error})", self.stderr_path.display())
        })
    }
}

impl Drop for Background {
    /// Best effort: a test that failed half-way must not leave the child running, and there is
    /// nobody left to report a failure to kill it to (a panic in drop could abort the run).
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            if let Ok(pid) = libc::pid_t::try_from(child.id()) {
                // SAFETY: kill has no memory-safety preconditions; -pid is the process group.
                unsafe { libc::kill(-pid, libc::SIGKILL) };
            }
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}
