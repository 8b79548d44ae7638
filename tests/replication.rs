//! Replication integration tests: two real daemons on 127.0.0.1 (FUSE images, QUIC with mutual
//! TLS), real loop devices, ext4 and fault injection. They need root, /dev/fuse, losetup,
//! mkfs.ext4, e2fsck, dd, fio and timeout.
//!
//! Every test has a scratch directory and ports of its own (`make_pair`); guards clean up
//! (daemons, mounts, loop devices, child processes, files) also when an assertion fails
//! half-way. Waiting is on a condition with a deadline, never a guessed sleep.
//!
//! Blocking I/O to a FUSE image (which a suspended or dead daemon can hold forever) is only done
//! from child processes (`dd`, `cp`, `cmp`, `fio`) under `timeout`, never from a thread of the
//! test process: a thread stuck in FUSE can wedge the whole test process.

#[path = "common/background.rs"]
mod background;
#[path = "common/fault_proxy.rs"]
mod fault_proxy;
#[path = "common/pair.rs"]
mod pair;

use std::collections::BTreeSet;
use std::fs::File;
use std::net::{SocketAddr, UdpSocket};
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context};
use background::Background;
use fault_proxy::FaultProxy;
use pair::{binary, connection, log, peer, tail, Pair, CONNECT, R};
use qrbd::demo::files_identical;
use qrbd::testbed::{run, wait_until, LoopDevice, Mounted, PairSpec, TestNode};
use rand::RngCore;

const SIZE: &str = "64MiB";
const MIB: u64 = 1 << 20;
/// The block size the background writers use (one `dd` per block).
const BLOCK: u64 = 64 << 10;
/// How long a daemon may take to react to something (a lost peer, a refusal, a command).
const REACT: Duration = Duration::from_secs(20);
/// A few ping intervals (1 s each): how long a refused pair is watched for a connection.
const WATCH: Duration = Duration::from_millis(3500);

// ---------------------------------------------------------------------------------------------
// A pair of nodes
// ---------------------------------------------------------------------------------------------

/// What only these tests do with a pair.
impl Pair {
    /// Waits until everything alpha wrote is acknowledged and beta has applied it all.
    fn wait_quiet(&self) -> anyhow::Result<()> {
        wait_until(REACT, "replication to go quiet", || {
            let a = peer(&self.alpha).ok()?;
            let b = peer(&self.beta).ok()?;
            (a.connection == "Connected" && a.unacked == 0 && a.pending == 0 && b.pending == 0)
                .then_some(())
        })
        .with_context(|| {
            format!(
                "alpha peer: {:?}\nbeta peer: {:?}\n{}",
                peer(&self.alpha).ok(),
                peer(&self.beta).ok(),
                self.logs()
            )
        })
    }

    fn backings_identical(&self) -> anyhow::Result<bool> {
        files_identical(&self.alpha.backing_path(R), &self.beta.backing_path(R))
    }

    /// The end of a test whose alpha is Primary: replication goes quiet, the backing files
    /// are identical, alpha steps down and both daemons stop cleanly.
    fn end_in_sync(&mut self) -> anyhow::Result<()> {
        self.wait_quiet()?;
        ensure!(self.backings_identical()?, "the backing images differ");
        self.alpha.qrbd_ok(&["secondary", R])?;
        self.stop()
    }

    /// Stops both daemons cleanly (SIGTERM) and checks they exit with success.
    fn stop(&mut self) -> anyhow::Result<()> {
        for node in [&mut self.alpha, &mut self.beta] {
            let exit = node.stop_daemon()?;
            ensure!(exit.success(), "daemon exited with {exit}");
        }
        Ok(())
    }
}

/// Watches `nodes` for `window` (polling their status) and fails if any of them connects.
fn ensure_never_connected(nodes: &[&TestNode], window: Duration) -> anyhow::Result<()> {
    let deadline = Instant::now() + window;
    let mut polls = 0;
    while Instant::now() < deadline {
        for node in nodes {
            let peer = peer(node)?;
            ensure!(
                peer.connection != "Connected",
                "{} connected to {} although it must be refused",
                node.dir.display(),
                peer.name
            );
        }
        polls += 1;
        // A polling interval, not a synchronisation: the property is "for the whole window".
        std::thread::sleep(Duration::from_millis(100));
    }
    ensure!(polls > 3, "the window was too short to observe anything");
    Ok(())
}

/// Rewrites `node`'s configuration file: every `from` becomes `to` (which must occur).
fn edit_config(node: &TestNode, from: &str, to: &str) -> anyhow::Result<()> {
    let text = std::fs::read_to_string(&node.config_path)?;
    ensure!(
        text.contains(from),
        "{} does not contain {from:?}:\n{text}",
        node.config_path.display()
    );
    std::fs::write(&node.config_path, text.replace(from, to))?;
    Ok(())
}

/// The `listen` address in `node`'s configuration.
fn listen_address(node: &TestNode) -> anyhow::Result<SocketAddr> {
    let text = std::fs::read_to_string(&node.config_path)?;
    let line = text
        .lines()
        .find_map(|line| line.trim().strip_prefix("listen = "))
        .context("no listen address in the configuration")?;
    Ok(line.trim_matches('"').parse()?)
}

// ---------------------------------------------------------------------------------------------
// Data and child processes
// ---------------------------------------------------------------------------------------------

fn random_bytes(len: u64) -> Vec<u8> {
    let mut data = vec![0u8; usize::try_from(len).expect("small")];
    rand::rng().fill_bytes(&mut data);
    data
}

/// Writes `len` random bytes to `path` and returns them.
fn random_file(path: &Path, len: u64) -> anyhow::Result<Vec<u8>> {
    let data = random_bytes(len);
    std::fs::write(path, &data).with_context(|| format!("cannot write {}", path.display()))?;
    Ok(data)
}

fn text(path: &Path) -> String {
    path.to_string_lossy().into_owned()
}

/// `dd` in a child process under `timeout`: blocks `block`.. of `bs` bytes from `src` to the
/// same blocks of `dst`, with O_DIRECT and an fsync at the end.
fn dd_blocks(src: &Path, dst: &Path, bs: u64, block: u64, count: u64) -> anyhow::Result<()> {
    run(
        "timeout",
        &[
            "30",
            "dd",
            &format!("if={}", text(src)),
            &format!("of={}", text(dst)),
            &format!("bs={bs}"),
            &format!("skip={block}"),
            &format!("seek={block}"),
            &format!("count={count}"),
            "oflag=direct",
            "conv=notrunc,fsync",
            "status=none",
        ],
    )
    .map(|_| ())
}

/// Reads `len` bytes at `offset` of a plain file (a backing file, never a FUSE image).
fn read_at(path: &Path, offset: u64, len: u64) -> anyhow::Result<Vec<u8>> {
    let file = File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
    let mut buf = vec![0u8; usize::try_from(len)?];
    file.read_exact_at(&mut buf, offset)
        .with_context(|| format!("reading {len} bytes at {offset} of {}", path.display()))?;
    Ok(buf)
}

/// Fails with the first differing offset (not a dump of megabytes).
fn ensure_same(actual: &[u8], expected: &[u8], what: &str) -> anyhow::Result<()> {
    ensure!(
        actual.len() == expected.len(),
        "{what}: length {} differs from {}",
        actual.len(),
        expected.len()
    );
    if let Some(at) = actual.iter().zip(expected).position(|(a, b)| a != b) {
        let end = (at + 16).min(actual.len());
        bail!(
            "{what}: first difference at byte {at}: {:02x?}, expected {:02x?}",
            &actual[at..end],
            &expected[at..end]
        );
    }
    Ok(())
}

/// A shell loop writing blocks of `BLOCK` bytes from a pattern file to an image, one `dd` with
/// O_DIRECT and fsync per block (so each `dd` returns only once its block is durable), cycling
/// through `blocks` blocks starting at block `first`, until a stop file appears. After each
/// `dd` returns it appends the block number to a progress file.
struct Writer {
    process: Background,
    stop: PathBuf,
    progress: PathBuf,
}

const WRITER_SCRIPT: &str = r#"
img=$1; src=$2; first=$3; blocks=$4; stop=$5; progress=$6
i=0
while [ ! -e "$stop" ]; do
    b=$((first + i % blocks))
    timeout --foreground 60 dd if="$src" of="$img" bs=65536 skip="$b" seek="$b" count=1 \
        oflag=direct conv=notrunc,fsync status=none || { echo "dd of block $b failed" >&2; exit 1; }
    echo "$b" >> "$progress"
    i=$((i + 1))
done
"#;

impl Writer {
    fn start(
        dir: &Path,
        name: &str,
        image: &Path,
        pattern: &Path,
        first: u64,
        blocks: u64,
    ) -> anyhow::Result<Writer> {
        let stop = dir.join(format!("{name}.stop"));
        let progress = dir.join(format!("{name}.progress"));
        File::create(&progress)?;
        let process = Background::spawn(
            name,
            Command::new("sh")
                .arg("-c")
                .arg(WRITER_SCRIPT)
                .arg("writer")
                .arg(image)
                .arg(pattern)
                .arg(first.to_string())
                .arg(blocks.to_string())
                .arg(&stop)
                .arg(&progress),
            &dir.join(format!("{name}.out")),
            &dir.join(format!("{name}.err")),
        )?;
        Ok(Writer {
            process,
            stop,
            progress,
        })
    }

    /// The blocks written (fsync returned) so far, in order.
    fn done(&self) -> anyhow::Result<Vec<u64>> {
        let text = std::fs::read_to_string(&self.progress)
            .with_context(|| format!("cannot read {}", self.progress.display()))?;
        // Only complete lines: the writer may be appending the last one right now.
        let complete = &text[..text.rfind('\n').map_or(0, |end| end + 1)];
        complete
            .lines()
            .map(|line| {
                line.trim()
                    .parse()
                    .with_context(|| format!("bad progress line {line:?}"))
            })
            .collect()
    }

    fn count(&self) -> anyhow::Result<usize> {
        Ok(self.done()?.len())
    }

    /// The number of writes done, for failure messages.
    fn count_text(&self) -> String {
        self.count()
            .map_or_else(|error| format!("? ({error:#})"), |n| n.to_string())
    }

    /// Waits until at least `n` writes are done, failing early if the writer died.
    fn wait_for(&mut self, n: usize, limit: Duration) -> anyhow::Result<()> {
        let result = wait_until(limit, &format!("{n} writes to complete"), || {
            match self.count() {
                Ok(count) if count >= n => return Some(Ok(true)),
                Ok(_) => {}
                Err(error) => return Some(Err(error)),
            }
            if !self.process.running() {
                return Some(Ok(false));
            }
            None
        });
        match result {
            Ok(Ok(true)) => Ok(()),
            Ok(Ok(false)) => bail!(
                "the writer stopped after {} writes: {}",
                self.count_text(),
                self.process.stderr()
            ),
            Ok(Err(error)) => Err(error),
            Err(error) => Err(error.context(format!("{} writes done", self.count_text()))),
        }
    }

    /// Asks the loop to stop after its current `dd` and checks that it ended well.
    fn finish(&mut self) -> anyhow::Result<()> {
        File::create(&self.stop)?;
        let status = self.process.wait(Duration::from_secs(60))?;
        ensure!(
            status.success(),
            "the writer failed ({status}): {}",
            self.process.stderr()
        );
        Ok(())
    }
}

/// `qrbd events` on `node` as a child process, its output in a file.
struct Events {
    process: Background,
    output: PathBuf,
}

impl Events {
    fn start(node: &TestNode, dir: &Path, name: &str) -> anyhow::Result<Events> {
        let output = dir.join(format!("{name}.events"));
        let process = Background::spawn(
            &format!("qrbd events ({name})"),
            Command::new(&node.binary)
                .arg("--config")
                .arg(&node.config_path)
                .arg("events"),
            &output,
            &dir.join(format!("{name}.events.err")),
        )?;
        let events = Events { process, output };
        // The daemon first lists the current state ("exists ..."): then the stream is live.
        wait_until(
            REACT,
            "qrbd events to list the current state",
            || match events.lines() {
                Ok(lines) => lines
                    .iter()
                    .any(|l| l.starts_with("exists"))
                    .then_some(Ok(())),
                Err(error) => Some(Err(error)),
            },
        )
        .with_context(|| format!("stderr: {}", events.process.stderr()))??;
        Ok(events)
    }

    fn lines(&self) -> anyhow::Result<Vec<String>> {
        let text = std::fs::read_to_string(&self.output)
            .with_context(|| format!("cannot read {}", self.output.display()))?;
        Ok(text.lines().map(str::to_owned).collect())
    }

    /// Connection state changes streamed so far (the value after `connection:`).
    fn connection_changes(&self) -> anyhow::Result<Vec<String>> {
        self.lines()?
            .iter()
            .filter(|l| l.starts_with("change connection"))
            .map(|l| {
                l.split_whitespace()
                    .find_map(|word| word.strip_prefix("connection:"))
                    .map(str::to_owned)
                    .with_context(|| format!("no connection state in {l:?}"))
            })
            .collect()
    }
}

// ---------------------------------------------------------------------------------------------
// 1. Failover
// ---------------------------------------------------------------------------------------------

/// ext4 written on alpha through a loop device, then a failover: beta's replica is identical,
/// clean, and holds the files.
#[test]
fn failover_keeps_the_file_system() -> anyhow::Result<()> {
    let mut pair = Pair::up("qrbd-failover", &PairSpec::new(R, SIZE, "C"))?;
    pair.alpha.qrbd_ok(&["primary", R])?;

    let sources = pair.dir().join("src");
    std::fs::create_dir_all(&sources)?;
    let sizes = [4 << 10, 300 << 10, MIB, 1536 << 10, 3 * MIB];
    let mut files = Vec::new();
    for (i, size) in sizes.iter().enumerate() {
        let path = sources.join(format!("file{i}.bin"));
        random_file(&path, *size)?;
        files.push(path);
    }

    let alpha_loop = LoopDevice::attach(&pair.alpha.image_path(R))?;
    run("mkfs.ext4", &["-q", "-F", &alpha_loop.device])?;
    let alpha_mount = Mounted::mount(&alpha_loop.device, &pair.dir().join("mnt-alpha"))?;
    let target = alpha_mount.target.join("data");
    run("mkdir", &[&text(&target)])?;
    let mut cp_args = vec!["60".to_owned(), "cp".to_owned()];
    cp_args.extend(files.iter().map(|f| text(f)));
    cp_args.push(text(&target));
    let cp_args: Vec<&str> = cp_args.iter().map(String::as_str).collect();
    run("timeout", &cp_args)?;
    run("timeout", &["60", "sync"])?;

    let alpha_peer = peer(&pair.alpha)?;
    ensure!(
        alpha_peer.connection == "Connected" && alpha_peer.out_of_sync_bytes == 0,
        "alpha's peer after the writes: {alpha_peer:?}"
    );
    ensure!(
        alpha_peer.sent_bytes >= 6 * MIB,
        "alpha sent only {} bytes",
        alpha_peer.sent_bytes
    );

    alpha_mount.unmount()?;
    alpha_loop.detach()?;
    pair.alpha.qrbd_ok(&["secondary", R])?;
    pair.beta.qrbd_ok(&["primary", R])?;
    ensure!(
        pair.backings_identical()?,
        "the backing images differ after the failover\n{}",
        pair.logs()
    );

    let beta_loop = LoopDevice::attach(&pair.beta.image_path(R))?;
    run("timeout", &["60", "e2fsck", "-fn", &beta_loop.device]).context("e2fsck on beta")?;
    let beta_mount = Mounted::mount(&beta_loop.device, &pair.dir().join("mnt-beta"))?;
    for file in &files {
        let name = file.file_name().context("file name")?;
        let replica = beta_mount.target.join("data").join(name);
        run("timeout", &["30", "cmp", &text(file), &text(&replica)])
            .with_context(|| format!("{} on beta", replica.display()))?;
    }
    beta_mount.unmount()?;
    beta_loop.detach()?;
    pair.beta.qrbd_ok(&["secondary", R])?;
    pair.stop()
}

// ---------------------------------------------------------------------------------------------
// 2. Durability of fsynced writes (protocol C) when the primary crashes
// ---------------------------------------------------------------------------------------------

/// Blocks whose fsync returned on alpha are on beta when alpha is killed with SIGKILL right
/// after an fsync returns; beta is promoted with --force and serves them.
#[test]
fn fsynced_writes_survive_a_primary_crash() -> anyhow::Result<()> {
    const BLOCKS: u64 = 256;
    let mut pair = Pair::up("qrbd-durable", &PairSpec::new(R, SIZE, "C"))?;
    pair.alpha.qrbd_ok(&["primary", R])?;
    let pattern_path = pair.dir().join("pattern.bin");
    let pattern = random_file(&pattern_path, BLOCKS * BLOCK)?;
    let dir = pair.dir().to_owned();
    let mut writer = Writer::start(
        &dir,
        "writer",
        &pair.alpha.image_path(R),
        &pattern_path,
        0,
        BLOCKS,
    )?;
    writer.wait_for(24, REACT).with_context(|| pair.logs())?;
    // Right after an fsync returned: poll the progress file tightly and kill at the next one.
    let seen = writer.count()?;
    let deadline = Instant::now() + REACT;
    while writer.count()? == seen {
        ensure!(Instant::now() < deadline, "no write completed");
        std::thread::sleep(Duration::from_millis(1));
    }
    pair.alpha.kill_daemon()?;
    // The dd in flight fails (the FUSE connection is gone), which ends the loop: the writer's
    // exit status is that expected failure, only waiting for it can fail here.
    let _ = writer.process.wait(Duration::from_secs(30))?;
    let done: BTreeSet<u64> = writer.done()?.into_iter().collect();
    ensure!(done.len() > 24, "only {} writes done", done.len());
    ensure!(
        done.iter().all(|b| *b < BLOCKS),
        "the writer wrapped around"
    );

    // Beta notices that alpha is gone (ping timeout), then refuses a plain promotion.
    wait_until(REACT, "beta to lose alpha", || {
        connection(&pair.beta).filter(|c| c != "Connected")
    })
    .with_context(|| pair.logs())?;
    let refused = pair.beta.qrbd(&["primary", R])?;
    let message = String::from_utf8_lossy(&refused.stderr).into_owned();
    ensure!(
        !refused.status.success(),
        "plain `primary` succeeded with no peer connected"
    );
    ensure!(
        message.contains("--force"),
        "the refusal does not mention --force: {message}"
    );
    pair.beta.qrbd_ok(&["primary", R, "--force"])?;

    // Every fsynced block is in beta's backing file...
    let backing = read_at(&pair.beta.backing_path(R), 0, BLOCKS * BLOCK)?;
    // ...and beta serves it through its image (read by a child process).
    let read_back = pair.dir().join("beta-read.bin");
    run(
        "timeout",
        &[
            "30",
            "dd",
            &format!("if={}", text(&pair.beta.image_path(R))),
            &format!("of={}", text(&read_back)),
            &format!("bs={BLOCK}"),
            &format!("count={BLOCKS}"),
            "iflag=direct",
            "status=none",
        ],
    )?;
    let served = std::fs::read(&read_back)?;
    for &block in &done {
        let range = usize::try_from(block * BLOCK)?..usize::try_from((block + 1) * BLOCK)?;
        ensure_same(
            &backing[range.clone()],
            &pattern[range.clone()],
            &format!("block {block} in beta's backing file"),
        )?;
        ensure_same(
            &served[range.clone()],
            &pattern[range],
            &format!("block {block} read from beta's image"),
        )?;
    }
    eprintln!("{} fsynced blocks verified on beta", done.len());
    pair.beta.qrbd_ok(&["secondary", R])?;
    let exit = pair.beta.stop_daemon()?;
    ensure!(exit.success(), "beta exited with {exit}");
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// 3. Protocols A and B
// ---------------------------------------------------------------------------------------------

fn replicates_fully_once_quiet(protocol: &str) -> anyhow::Result<()> {
    let mut pair = Pair::up(
        &format!("qrbd-proto{protocol}"),
        &PairSpec::new(R, SIZE, protocol),
    )?;
    let status = pair.alpha.status(R)?;
    ensure!(
        status.protocol.to_string() == protocol,
        "alpha runs protocol {}",
        status.protocol
    );
    pair.alpha.qrbd_ok(&["primary", R])?;
    let data_path = pair.dir().join("data.bin");
    let data = random_file(&data_path, 8 * MIB)?;
    // 8 MiB in 256 KiB writes from offset 8 MiB, without waiting for the peer between them
    // (only one fsync at the end), then a few scattered 64 KiB blocks.
    run(
        "timeout",
        &[
            "30",
            "dd",
            &format!("if={}", text(&data_path)),
            &format!("of={}", text(&pair.alpha.image_path(R))),
            "bs=256K",
            "seek=32",
            "oflag=direct",
            "conv=notrunc,fsync",
            "status=none",
        ],
    )?;
    for block in [0, 7, 300, 1000, 1023] {
        dd_blocks(&data_path, &pair.alpha.image_path(R), BLOCK, block, 1)?;
    }
    pair.wait_quiet()?;
    let alpha_peer = peer(&pair.alpha)?;
    ensure!(
        alpha_peer.out_of_sync_bytes == 0,
        "alpha's peer: {alpha_peer:?}"
    );
    ensure!(
        pair.backings_identical()?,
        "protocol {protocol}: the backing images differ once quiet\n{}",
        pair.logs()
    );
    let replica = read_at(&pair.beta.backing_path(R), 8 * MIB, 8 * MIB)?;
    ensure_same(&replica, &data, "the 8 MiB on beta")?;
    pair.alpha.qrbd_ok(&["secondary", R])?;
    pair.stop()
}

#[test]
fn protocol_a_replicates_fully_once_quiet() -> anyhow::Result<()> {
    replicates_fully_once_quiet("A")
}

#[test]
fn protocol_b_replicates_fully_once_quiet() -> anyhow::Result<()> {
    replicates_fully_once_quiet("B")
}

// ---------------------------------------------------------------------------------------------
// 4. Certificates
// ---------------------------------------------------------------------------------------------

/// Starts a pair whose beta was reconfigured by `tamper`, waits until a log says `expect`,
/// then checks for a few ping intervals that the pair never connects. Returns the pair.
fn refused_pair(
    prefix: &str,
    spec: &PairSpec,
    tamper: impl FnOnce(&Pair) -> anyhow::Result<()>,
    expect: &[&str],
) -> anyhow::Result<Pair> {
    let mut pair = Pair::configure(prefix, spec)?;
    tamper(&pair)?;
    pair.create_md()?;
    pair.start()?;
    let found = wait_until(REACT, &format!("a daemon log to say {expect:?}"), || {
        let logs = format!("{}\n{}", log(&pair.alpha), log(&pair.beta));
        expect.iter().all(|word| logs.contains(word)).then_some(())
    });
    found.with_context(|| pair.logs())?;
    ensure_never_connected(&[&pair.alpha, &pair.beta], WATCH).with_context(|| pair.logs())?;
    for node in [&pair.alpha, &pair.beta] {
        ensure!(
            !log(node).contains("core::resource: connected"),
            "a daemon logged a connection\n{}",
            pair.logs()
        );
    }
    Ok(pair)
}

/// Beta presents a certificate from a CA alpha does not trust (and trusts only that CA).
#[test]
fn peer_with_a_certificate_from_another_ca_is_refused() -> anyhow::Result<()> {
    let pair = refused_pair(
        "qrbd-otherca",
        &PairSpec::new(R, SIZE, "C"),
        |pair| {
            let other = pair.dir().join("other");
            let output = Command::new(binary())
                .args(["gen-cert", "--ca-dir"])
                .arg(&other)
                .args(["--node", "beta"])
                .output()?;
            ensure!(output.status.success(), "gen-cert failed: {output:?}");
            let tls = pair.dir().join("tls");
            for file in ["ca.crt", "beta.crt", "beta.key"] {
                edit_config(&pair.beta, &text(&tls.join(file)), &text(&other.join(file)))?;
            }
            Ok(())
        },
        &["connecting failed"],
    )?;
    let alpha_log = log(&pair.alpha);
    let refusal = alpha_log
        .lines()
        .find(|l| l.contains("connecting failed"))
        .unwrap_or_default()
        .to_owned();
    eprintln!("alpha: {refusal}");
    let lower = refusal.to_lowercase();
    ensure!(
        lower.contains("certificate") && (lower.contains("issuer") || lower.contains("trust")),
        "alpha's log does not say why: {refusal}"
    );
    Ok(())
}

/// Beta presents a certificate from the right CA, but issued to "mallory".
#[test]
fn peer_with_a_certificate_for_another_name_is_refused() -> anyhow::Result<()> {
    let pair = refused_pair(
        "qrbd-mallory",
        &PairSpec::new(R, SIZE, "C"),
        |pair| {
            let tls = pair.dir().join("tls");
            let output = Command::new(binary())
                .args(["gen-cert", "--ca-dir"])
                .arg(&tls)
                .args(["--node", "mallory"])
                .output()?;
            ensure!(output.status.success(), "gen-cert failed: {output:?}");
            for (from, to) in [("beta.crt", "mallory.crt"), ("beta.key", "mallory.key")] {
                edit_config(&pair.beta, &text(&tls.join(from)), &text(&tls.join(to)))?;
            }
            Ok(())
        },
        &["connecting failed", "mallory"],
    )?;
    let refusal = format!("{}\n{}", log(&pair.alpha), log(&pair.beta))
        .lines()
        .find(|l| l.contains("mallory") && l.contains("beta") && !l.contains("daemon ready"))
        .map(str::to_owned);
    eprintln!("refusal: {refusal:?}");
    ensure!(
        refusal.is_some(),
        "no log line names both \"beta\" and \"mallory\"\n{}",
        pair.logs()
    );
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// 5. Garbage datagrams
// ---------------------------------------------------------------------------------------------

/// Thousands of random datagrams to both listen ports during replication: the connection never
/// drops, writes keep completing, and a new write replicates.
#[test]
fn garbage_datagrams_do_not_disturb_replication() -> anyhow::Result<()> {
    const BLOCKS: u64 = 64;
    let mut pair = Pair::up("qrbd-garbage", &PairSpec::new(R, SIZE, "C"))?;
    pair.alpha.qrbd_ok(&["primary", R])?;
    let dir = pair.dir().to_owned();
    let alpha_events = Events::start(&pair.alpha, &dir, "alpha")?;
    let beta_events = Events::start(&pair.beta, &dir, "beta")?;
    let pattern_path = dir.join("pattern.bin");
    random_file(&pattern_path, BLOCKS * BLOCK)?;
    let mut writer = Writer::start(
        &dir,
        "writer",
        &pair.alpha.image_path(R),
        &pattern_path,
        0,
        BLOCKS,
    )?;
    writer.wait_for(5, REACT).with_context(|| pair.logs())?;

    let targets = [listen_address(&pair.alpha)?, pair.beta_listen];
    let socket = UdpSocket::bind("127.0.0.1:0")?;
    let mut rng = rand::rng();
    let mut sent = 0u32;
    for round in 0..4u8 {
        for i in 0..1000u32 {
            let len = 1 + usize::try_from(rng.next_u32() % 1400)?;
            let mut datagram = random_bytes(u64::try_from(len)?);
            // Some look like QUIC headers: long header (Initial, version 1) or short header.
            match i % 4 {
                0 => {
                    datagram[0] = 0xc0 | (datagram[0] & 0x0f);
                    if len >= 5 {
                        datagram[1..5].copy_from_slice(&1u32.to_be_bytes());
                    }
                }
                1 => datagram[0] = 0x40 | (datagram[0] & 0x3f),
                _ => {}
            }
            for target in targets {
                socket.send_to(&datagram, target)?;
                sent += 1;
            }
        }
        // Writes keep completing between the bursts.
        let before = writer.count()?;
        writer
            .wait_for(before + 2, REACT)
            .with_context(|| format!("after garbage round {round}\n{}", pair.logs()))?;
    }
    eprintln!("sent {sent} garbage datagrams");
    writer.finish()?;

    for (name, events) in [("alpha", &alpha_events), ("beta", &beta_events)] {
        let changes = events.connection_changes()?;
        ensure!(
            changes.iter().all(|c| c == "Connected"),
            "{name}'s connection changed during the garbage: {changes:?}\n{}",
            pair.logs()
        );
    }
    for node in [&pair.alpha, &pair.beta] {
        let peer = peer(node)?;
        ensure!(
            peer.connection == "Connected",
            "after the garbage: {peer:?}"
        );
    }
    // A new write replicates.
    let fresh = dir.join("fresh.bin");
    let data = random_file(&fresh, MIB)?;
    run(
        "timeout",
        &[
            "30",
            "dd",
            &format!("if={}", text(&fresh)),
            &format!("of={}", text(&pair.alpha.image_path(R))),
            "bs=1M",
            "seek=32",
            "oflag=direct",
            "conv=notrunc,fsync",
            "status=none",
        ],
    )?;
    pair.wait_quiet()?;
    ensure_same(
        &read_at(&pair.beta.backing_path(R), 32 * MIB, MIB)?,
        &data,
        "the new write on beta",
    )?;
    ensure!(
        pair.backings_identical()?,
        "the backing images differ\n{}",
        pair.logs()
    );
    pair.alpha.qrbd_ok(&["secondary", R])?;
    pair.stop()
}

// ---------------------------------------------------------------------------------------------
// 6. A cut link (fault proxy)
// ---------------------------------------------------------------------------------------------

/// The blocks the writer of a cut-link test cycles through; one more block follows them for a
/// write after the reconnect.
const CUT_BLOCKS: u64 = 256;

/// A pair whose link was cut during writes and restored. Fields drop in order: the writer,
/// then the daemons, then the proxy between them.
struct CutLink {
    writer: Writer,
    pair: Pair,
    proxy: FaultProxy,
    pattern_path: PathBuf,
    pattern: Vec<u8>,
}

/// A connected pair where alpha reaches beta through a fault proxy, alpha Primary; `extra`
/// is added to both nodes' resource configuration.
fn primary_behind_proxy(
    prefix: &str,
    size: &str,
    extra: &str,
) -> anyhow::Result<(Pair, FaultProxy)> {
    let proxy = FaultProxy::bind()?;
    let mut spec = PairSpec::new(R, size, "C");
    spec.beta_address_for_alpha = Some(proxy.address());
    let mut pair = Pair::configure(prefix, &spec)?;
    if !extra.is_empty() {
        for node in [&pair.alpha, &pair.beta] {
            edit_config(
                node,
                "protocol = \"C\"",
                &format!("protocol = \"C\"\n{extra}"),
            )?;
        }
    }
    proxy.set_upstream(pair.beta_listen);
    pair.create_md()?;
    pair.start()?;
    pair.wait_connected(CONNECT)?;
    ensure!(
        proxy.forwarded() > 0,
        "the pair did not go through the proxy"
    );
    pair.alpha.qrbd_ok(&["primary", R])?;
    Ok((pair, proxy))
}

/// Alpha reaches beta through a fault proxy; alpha is Primary and a writer runs (one fsynced
/// 64 KiB `dd` after the other). The link is cut: alpha must keep serving (a write made and
/// fsynced entirely while cut completes), show the peer as lost and count what beta misses as
/// out of sync; beta must notice too. Then the link is restored and both must reconnect.
fn cut_and_restore(prefix: &str) -> anyhow::Result<CutLink> {
    let (pair, proxy) = primary_behind_proxy(prefix, SIZE, "")?;
    let dir = pair.dir().to_owned();
    let pattern_path = dir.join("pattern.bin");
    let pattern = random_file(&pattern_path, (CUT_BLOCKS + 1) * BLOCK)?;
    let mut writer = Writer::start(
        &dir,
        "writer",
        &pair.alpha.image_path(R),
        &pattern_path,
        0,
        CUT_BLOCKS,
    )?;
    writer.wait_for(5, REACT).with_context(|| pair.logs())?;

    proxy.cut();
    let cut_at = Instant::now();
    let before = writer.count()?;
    // The write in flight waits for the peer until it is declared dead; the one after it
    // (written and fsynced entirely while cut) completes locally.
    writer
        .wait_for(before + 2, Duration::from_secs(30))
        .with_context(|| pair.logs())?;
    let served_after = cut_at.elapsed();
    let alpha_peer = peer(&pair.alpha)?;
    ensure!(
        ["Timeout", "NetworkFailure", "Connecting"].contains(&alpha_peer.connection.as_str()),
        "alpha's peer while cut: {alpha_peer:?}"
    );
    // At least the write in flight at the cut and the one after it are out of sync.
    wait_until(
        REACT,
        "alpha to count the writes beta missed as out of sync",
        || {
            peer(&pair.alpha)
                .ok()
                .filter(|p| p.out_of_sync_bytes >= 2 * BLOCK)
        },
    )
    .with_context(|| pair.logs())?;
    wait_until(REACT, "beta to notice the cut", || {
        connection(&pair.beta).filter(|c| c != "Connected")
    })
    .with_context(|| pair.logs())?;
    let writes_while_cut = writer.count()? - before;
    eprintln!(
        "while cut: first writes done {served_after:?} after the cut, {writes_while_cut} in all, {} datagrams dropped",
        proxy.dropped()
    );

    proxy.restore();
    let restored_at = Instant::now();
    pair.wait_connected(Duration::from_secs(40))?;
    eprintln!(
        "reconnected {:?} after the restore; alpha's peer: {:?}",
        restored_at.elapsed(),
        peer(&pair.alpha)?
    );
    Ok(CutLink {
        writer,
        pair,
        proxy,
        pattern_path,
        pattern,
    })
}

/// A cut link: alpha keeps serving, marks what beta misses out of sync, the pair reconnects
/// once the link is back, and new writes replicate again.
#[test]
fn cut_link_keeps_the_primary_serving_and_reconnects() -> anyhow::Result<()> {
    let mut cut = cut_and_restore("qrbd-cut")?;
    cut.writer.finish()?;
    // After reconnecting, a new write replicates again.
    let image = cut.pair.alpha.image_path(R);
    dd_blocks(&cut.pattern_path, &image, BLOCK, CUT_BLOCKS, 1)?;
    let range = usize::try_from(CUT_BLOCKS * BLOCK)?..usize::try_from((CUT_BLOCKS + 1) * BLOCK)?;
    ensure_same(
        &read_at(&cut.pair.beta.backing_path(R), CUT_BLOCKS * BLOCK, BLOCK)?,
        &cut.pattern[range],
        "a write after the reconnect, on beta",
    )
    .with_context(|| cut.pair.logs())?;
    ensure!(cut.proxy.dropped() > 0, "the proxy dropped nothing");
    cut.pair.alpha.qrbd_ok(&["secondary", R])?;
    cut.pair.stop()
}

/// A reconnect after a cut resyncs what beta missed, and only that: beta becomes UpToDate
/// again without `--force`, both sides count the same resynced bytes (far less than the
/// image), and the replicas converge.
#[test]
fn reconnect_after_a_cut_resyncs_what_beta_missed() -> anyhow::Result<()> {
    let mut cut = cut_and_restore("qrbd-resync")?;
    cut.writer.finish()?;
    wait_for_resync(&cut.pair)?;
    cut.pair.wait_quiet()?;
    ensure!(
        cut.pair.backings_identical()?,
        "the backing images differ after the resync"
    );
    let (alpha, beta) = (peer(&cut.pair.alpha)?, peer(&cut.pair.beta)?);
    ensure!(
        alpha.resynced_bytes > 0 && alpha.resynced_bytes == beta.resynced_bytes,
        "resynced bytes: alpha {} beta {}",
        alpha.resynced_bytes,
        beta.resynced_bytes
    );
    ensure!(
        alpha.resynced_bytes <= (CUT_BLOCKS + 1) * BLOCK,
        "resynced {} bytes, more than the writer ever wrote",
        alpha.resynced_bytes
    );
    cut.pair.alpha.qrbd_ok(&["secondary", R])?;
    cut.pair.stop()
}

/// Waits until neither side reports a resync or out-of-sync blocks and beta is UpToDate.
fn wait_for_resync(pair: &Pair) -> anyhow::Result<()> {
    wait_until(Duration::from_secs(60), "the resync to finish", || {
        let (a, b) = (peer(&pair.alpha).ok()?, peer(&pair.beta).ok()?);
        let beta_disk = pair.beta.status(R).ok()?.disk;
        (a.sync.is_none()
            && b.sync.is_none()
            && a.out_of_sync_bytes == 0
            && b.out_of_sync_bytes == 0
            && beta_disk == qrbd_actors::core::DiskState::UpToDate)
            .then_some(())
    })
    .with_context(|| {
        format!(
            "alpha's peer: {:?}\nbeta's peer: {:?}\n{}",
            peer(&pair.alpha).ok(),
            peer(&pair.beta).ok(),
            pair.logs()
        )
    })
}

/// Writes `count` 4 KiB blocks of random data at scattered 4 KiB-aligned offsets (seeded, no
/// two the same) through alpha's image, O_DIRECT; returns the offsets.
fn write_scattered(
    node: &TestNode,
    count: u64,
    image_bytes: u64,
    seed: u64,
) -> anyhow::Result<Vec<u64>> {
    use rand::{Rng, SeedableRng};
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let blocks = image_bytes / 4096;
    let mut chosen = BTreeSet::new();
    while (chosen.len() as u64) < count {
        chosen.insert(rng.random_range(0..blocks));
    }
    let file = std::fs::OpenOptions::new()
        .write(true)
        .custom_flags(libc::O_DIRECT)
        .open(node.image_path(R))
        .context("opening the image O_DIRECT")?;
    // O_DIRECT wants an aligned buffer: a page-aligned slice of a larger allocation.
    let mut raw = vec![0u8; 8192];
    let start = raw.as_ptr().align_offset(4096);
    let buf = &mut raw[start..start + 4096];
    for block in &chosen {
        rng.fill_bytes(buf);
        file.write_all_at(buf, block * 4096)
            .with_context(|| format!("writing block {block}"))?;
    }
    file.sync_all()?;
    Ok(chosen.into_iter().map(|b| b * 4096).collect())
}

/// The issue's quick resync: cut the link, write 16 MiB scattered on the Primary, restore.
/// The resync moves exactly the dirty blocks (status says how much), and the images end
/// byte-identical.
/// A fresh pair whose disks held different data before `create-md`: both are Inconsistent,
/// neither may be promoted without `--force`, and `primary --force` on alpha copies every block
/// to beta (the initial sync), which ends UpToDate with alpha's bytes.
#[test]
fn the_initial_sync_after_a_forced_promotion_copies_every_block() -> anyhow::Result<()> {
    let mut pair = Pair::configure("qrbd-initial-sync", &PairSpec::new(R, SIZE, "C"))?;
    let created = pair.alpha.qrbd_ok(&["create-md", R])?;
    ensure!(
        created.contains("Inconsistent until the initial sync"),
        "create-md should say how the initial sync works: {created}"
    );
    pair.beta.qrbd_ok(&["create-md", R])?;
    // Old contents, different on each disk.
    for (node, seed) in [(&pair.alpha, 1u8), (&pair.beta, 2u8)] {
        let file = std::fs::OpenOptions::new()
            .write(true)
            .open(node.backing_path(R))?;
        for mib in (0..64).step_by(7) {
            file.write_all_at(
                &vec![seed.wrapping_mul(mib as u8 + 1); MIB as usize],
                mib * MIB,
            )?;
        }
    }
    pair.start()?;
    pair.wait_connected_blank(CONNECT)?;
    for node in [&pair.alpha, &pair.beta] {
        let status = node.status(R)?;
        ensure!(
            status.disk == qrbd_actors::core::DiskState::Inconsistent,
            "fresh metadata should be Inconsistent, not {}",
            status.disk
        );
    }
    let refused = pair.alpha.qrbd_fails(&["primary", R])?;
    ensure!(
        refused.contains("never synced") && refused.contains("--force"),
        "a blank node's promotion should be refused and say why: {refused}"
    );
    pair.alpha.qrbd_ok(&["primary", "--force", R])?;
    wait_for_resync(&pair)?;
    let moved = peer(&pair.beta)?.resynced_bytes;
    ensure!(
        moved == 64 * MIB,
        "the initial sync moved {moved} bytes; expected the whole image"
    );
    pair.end_in_sync()
}

/// The initial sync survives a restart of its target: beta's daemon is stopped (SIGTERM) a
/// quarter of the way through, restarts blank, and resumes from its stored bitmap instead of
/// starting over. (After a crash instead, beta's hot activity-log extents, which the resync
/// wrote, move again as well: see docs/protocol.md, "The initial sync".)
#[test]
fn an_initial_sync_resumes_after_the_target_restarts() -> anyhow::Result<()> {
    let mut pair = Pair::configure("qrbd-initial-resume", &PairSpec::new(R, SIZE, "C"))?;
    for node in [&pair.alpha, &pair.beta] {
        // Slow enough to kill beta in the middle (64 MiB: 4 s).
        edit_config(
            node,
            "protocol = \"C\"",
            "protocol = \"C\"\nresync_rate = \"16M\"",
        )?;
    }
    pair.create_md()?;
    pair.start()?;
    pair.wait_connected_blank(CONNECT)?;
    pair.alpha.qrbd_ok(&["primary", "--force", R])?;
    wait_until(
        Duration::from_secs(40),
        "a quarter of the initial sync",
        || {
            let sync = peer(&pair.beta).ok()?.sync?;
            (sync.done_bytes >= 16 * MIB).then_some(())
        },
    )
    .with_context(|| pair.logs())?;
    let exit = pair.beta.stop_daemon()?;
    ensure!(exit.success(), "beta's daemon exited with {exit}");
    wait_until(REACT, "alpha to lose beta", || {
        (connection(&pair.alpha)? != "Connected").then_some(())
    })
    .with_context(|| pair.logs())?;
    let before_kill = peer(&pair.alpha)?.resynced_bytes;
    ensure!(
        before_kill < 64 * MIB,
        "the initial sync finished before the restart ({before_kill} bytes)"
    );
    pair.beta.start_daemon()?;
    pair.wait_connected_blank(CONNECT)?;
    wait_for_resync(&pair)?;
    let total = peer(&pair.alpha)?.resynced_bytes;
    eprintln!("initial sync: {before_kill} bytes before the restart, {total} in all");
    ensure!(
        log(&pair.beta).contains("resumes from the bitmaps"),
        "beta does not say the initial sync resumed:\n{}",
        tail(&log(&pair.beta), 30)
    );
    // Requests in flight at the stop move twice; starting over would move everything again.
    ensure!(
        total >= 64 * MIB && total < 64 * MIB + before_kill / 2,
        "the initial sync started over: {total} bytes moved in all ({before_kill} before the restart)"
    );
    pair.end_in_sync()
}

/// Two blank disks: `new-current-uuid --clear-bitmap` makes both UpToDate in one new
/// generation without copying; it is refused once the data is no longer blank, and the command
/// without the flag says what it is for.
#[test]
fn clear_bitmap_skips_the_initial_sync_of_blank_disks() -> anyhow::Result<()> {
    let mut pair = Pair::configure("qrbd-clear-bitmap", &PairSpec::new(R, SIZE, "C"))?;
    pair.create_md()?;
    pair.start()?;
    pair.wait_connected_blank(CONNECT)?;
    let without = pair.alpha.qrbd_fails(&["new-current-uuid", R])?;
    ensure!(
        without.contains("--clear-bitmap"),
        "new-current-uuid without --clear-bitmap should explain itself: {without}"
    );
    pair.alpha
        .qrbd_ok(&["new-current-uuid", "--clear-bitmap", R])?;
    let (mut alpha, mut beta) = (pair.alpha.status(R)?, pair.beta.status(R)?);
    wait_until(REACT, "both UpToDate in one generation", || {
        alpha = pair.alpha.status(R).ok()?;
        beta = pair.beta.status(R).ok()?;
        (alpha.disk == qrbd_actors::core::DiskState::UpToDate
            && beta.disk == qrbd_actors::core::DiskState::UpToDate
            && alpha.current_uuid == beta.current_uuid)
            .then_some(())
    })
    .with_context(|| format!("alpha {alpha:?}\nbeta {beta:?}\n{}", pair.logs()))?;
    ensure!(
        alpha.current_uuid != "0000000000000004",
        "the generation should be new"
    );
    ensure!(
        peer(&pair.alpha)?.resynced_bytes == 0 && peer(&pair.beta)?.resynced_bytes == 0,
        "nothing should be copied"
    );
    let again = pair
        .beta
        .qrbd_fails(&["new-current-uuid", "--clear-bitmap", R])?;
    ensure!(
        again.contains("not blank"),
        "a second --clear-bitmap should be refused: {again}"
    );
    pair.alpha.qrbd_ok(&["primary", R])?;
    write_scattered(&pair.alpha, 64, 64 * MIB, 5)?;
    pair.end_in_sync()
}

#[test]
fn quick_resync_moves_only_the_dirty_blocks() -> anyhow::Result<()> {
    let (mut pair, proxy) = primary_behind_proxy("qrbd-quick-resync", "256MiB", "")?;

    proxy.cut();
    wait_until(REACT, "both to notice the cut", || {
        (connection(&pair.alpha)? != "Connected" && connection(&pair.beta)? != "Connected")
            .then_some(())
    })
    .with_context(|| pair.logs())?;
    let dirty_blocks = 4096; // 16 MiB
    write_scattered(&pair.alpha, dirty_blocks, 256 * MIB, 9)?;
    let counted = peer(&pair.alpha)?.out_of_sync_bytes;
    ensure!(
        counted == dirty_blocks * 4096,
        "alpha counts {counted} bytes out of sync, wrote {}",
        dirty_blocks * 4096
    );

    proxy.restore();
    pair.wait_connected(Duration::from_secs(40))?;
    wait_for_resync(&pair)?;
    let (alpha, beta) = (peer(&pair.alpha)?, peer(&pair.beta)?);
    eprintln!(
        "resynced: alpha {} beta {} (dirty {counted})",
        alpha.resynced_bytes, beta.resynced_bytes
    );
    ensure!(
        alpha.resynced_bytes == counted && beta.resynced_bytes == counted,
        "the resync moved alpha {} / beta {} bytes; exactly the {counted} dirty bytes were due",
        alpha.resynced_bytes,
        beta.resynced_bytes
    );
    pair.wait_quiet()?;
    ensure!(
        pair.backings_identical()?,
        "the backing images differ after the resync"
    );
    pair.alpha.qrbd_ok(&["secondary", R])?;
    pair.stop()
}

/// A resync cut halfway resumes where it stopped: the bytes moved over both connections add
/// up to about the dirty amount, not the dirty amount plus what the first attempt moved.
#[test]
fn a_resync_cut_halfway_resumes_without_starting_over() -> anyhow::Result<()> {
    // Slow enough to cut it in the middle: the controller off, a fixed rate.
    let (mut pair, proxy) = primary_behind_proxy(
        "qrbd-resync-resume",
        SIZE,
        "c_plan_ahead = 0\nresync_rate = \"2M\"",
    )?;
    proxy.cut();
    wait_until(REACT, "alpha to notice the cut", || {
        (connection(&pair.alpha)? != "Connected").then_some(())
    })
    .with_context(|| pair.logs())?;
    let dirty = 2048 * 4096; // 8 MiB: about 4 s at 2 MiB/s
    write_scattered(&pair.alpha, 2048, 64 * MIB, 11)?;
    proxy.restore();
    let halfway = wait_until(Duration::from_secs(40), "the resync to be halfway", || {
        let sync = peer(&pair.beta).ok()?.sync?;
        (sync.done_bytes >= dirty / 3).then_some(sync)
    })
    .with_context(|| pair.logs())?;
    proxy.cut();
    wait_until(REACT, "beta to lose the link mid-resync", || {
        (connection(&pair.beta)? != "Connected").then_some(())
    })
    .with_context(|| pair.logs())?;
    let before_cut = peer(&pair.beta)?.resynced_bytes;
    ensure!(
        before_cut < dirty,
        "the resync finished before the cut ({before_cut} of {dirty} bytes)"
    );
    ensure!(
        pair.beta.status(R)?.disk == qrbd_actors::core::DiskState::Inconsistent,
        "a half-synced target must say Inconsistent"
    );
    proxy.restore();
    pair.wait_connected(Duration::from_secs(40))?;
    // `status --watch` follows the rest of it with plain lines (not a terminal here) and
    // exits once it is done.
    let watch = Command::new(&pair.beta.binary)
        .args(["--config"])
        .arg(&pair.beta.config_path)
        .args(["status", "--watch", R])
        .output()
        .context("running qrbd status --watch")?;
    let watched = String::from_utf8_lossy(&watch.stdout);
    eprintln!("status --watch:\n{watched}");
    ensure!(
        watch.status.success() && watched.contains("SyncTarget done:") && watched.contains("eta:"),
        "status --watch did not follow the resync: {watch:?}"
    );
    wait_for_resync(&pair)?;
    let total = peer(&pair.beta)?.resynced_bytes;
    eprintln!("halfway: {halfway:?}; before the cut {before_cut}, in all {total}, dirty {dirty}");
    // Blocks in flight at the cut may move twice; a restart from scratch would move `dirty`
    // again on top of what moved before.
    ensure!(
        total < dirty + before_cut / 2,
        "the resync started over: {total} bytes moved in all for {dirty} dirty bytes ({before_cut} before the cut)"
    );
    pair.end_in_sync()
}

/// `invalidate` on the Secondary, then `invalidate-remote` on the Primary: each is a full
/// resync (every block moves), the Secondary is Inconsistent meanwhile and UpToDate after,
/// and the images end identical.
#[test]
fn invalidate_and_invalidate_remote_resync_everything() -> anyhow::Result<()> {
    let mut pair = Pair::up("qrbd-invalidate", &PairSpec::new(R, SIZE, "C"))?;
    pair.alpha.qrbd_ok(&["primary", R])?;
    write_scattered(&pair.alpha, 64, 64 * MIB, 5)?;
    pair.wait_quiet()?;
    let refused = pair.alpha.qrbd(&["invalidate", R])?;
    ensure!(
        !refused.status.success() && String::from_utf8_lossy(&refused.stderr).contains("Primary"),
        "a Primary invalidated its own data: {}",
        String::from_utf8_lossy(&refused.stderr)
    );
    let image = 64 * MIB;
    let mut expected = 0;
    for (node, args) in [
        (&pair.beta, ["invalidate", R]),
        (&pair.alpha, ["invalidate-remote", R]),
    ] {
        let said = node.qrbd_ok(&args)?;
        eprintln!("{args:?}: {said}");
        expected += image;
        wait_for_resync(&pair)?;
        let moved = peer(&pair.beta)?.resynced_bytes;
        ensure!(
            moved == expected,
            "after {args:?} beta resynced {moved} bytes in all; {expected} were due"
        );
    }
    pair.wait_quiet()?;
    ensure!(
        pair.backings_identical()?,
        "the images differ after the full resyncs"
    );
    pair.alpha.qrbd_ok(&["secondary", R])?;
    pair.stop()
}

/// Online verify finds a block changed behind qrbd's back in one backing file, reports its
/// count and range, and the resync that follows repairs it.
#[test]
fn verify_finds_a_changed_block_and_the_resync_repairs_it() -> anyhow::Result<()> {
    let mut pair = Pair::up("qrbd-verify", &PairSpec::new(R, SIZE, "C"))?;
    pair.alpha.qrbd_ok(&["primary", R])?;
    write_scattered(&pair.alpha, 128, 64 * MIB, 21)?;
    pair.wait_quiet()?;
    ensure!(
        pair.backings_identical()?,
        "the images differ before the test"
    );
    // Flip one block of beta's backing file directly.
    let changed = 10 * MIB + 8192;
    {
        let file = std::fs::OpenOptions::new()
            .write(true)
            .open(pair.beta.backing_path(R))?;
        file.write_all_at(&[0xA5; 4096], changed)?;
        file.sync_all()?;
    }
    ensure!(
        !pair.backings_identical()?,
        "the change did not reach beta's backing file"
    );
    pair.alpha.qrbd_ok(&["verify", R])?;
    let verify = wait_until(Duration::from_secs(60), "the verify to finish", || {
        peer(&pair.alpha)
            .ok()?
            .verify
            .filter(|v| v.finished.is_some())
    })
    .with_context(|| pair.logs())?;
    eprintln!("verify: {verify:?}");
    ensure!(
        verify.interrupted.is_none() && verify.checked_bytes == 64 * MIB,
        "the verify did not check everything: {verify:?}"
    );
    ensure!(
        verify.differing_blocks == 1 && verify.differing_ranges == vec![(changed, 4096)],
        "the verify should find exactly block {changed}+4096: {verify:?}"
    );
    let text = pair.alpha.qrbd_ok(&["status", R])?;
    ensure!(
        text.contains("differing-blocks:1"),
        "status does not show the verify's result:\n{text}"
    );
    wait_for_resync(&pair)?;
    pair.wait_quiet()?;
    ensure!(
        pair.backings_identical()?,
        "the resync after the verify did not repair beta's block"
    );
    pair.alpha.qrbd_ok(&["secondary", R])?;
    pair.stop()
}

/// Checksum-based resync (`csums = true`): a full resync of two images that differ in one
/// block moves only the request holding that block; everything else is found the same.
#[test]
fn checksum_based_resync_moves_only_what_differs() -> anyhow::Result<()> {
    let mut pair = Pair::configure("qrbd-csums", &PairSpec::new(R, SIZE, "C"))?;
    for node in [&pair.alpha, &pair.beta] {
        edit_config(node, "protocol = \"C\"", "protocol = \"C\"\ncsums = true")?;
    }
    pair.create_md()?;
    pair.start()?;
    pair.wait_connected(CONNECT)?;
    pair.alpha.qrbd_ok(&["primary", R])?;
    write_scattered(&pair.alpha, 256, 64 * MIB, 8)?;
    pair.wait_quiet()?;
    let changed = 20 * MIB + 4096;
    {
        let file = std::fs::OpenOptions::new()
            .write(true)
            .open(pair.beta.backing_path(R))?;
        file.write_all_at(&[0x5A; 4096], changed)?;
        file.sync_all()?;
    }
    pair.alpha.qrbd_ok(&["invalidate-remote", R])?;
    wait_for_resync(&pair)?;
    let (alpha, beta) = (peer(&pair.alpha)?, peer(&pair.beta)?);
    eprintln!(
        "moved: alpha {} beta {}; found the same: alpha {} beta {}",
        alpha.resynced_bytes, beta.resynced_bytes, alpha.resync_same_bytes, beta.resync_same_bytes
    );
    ensure!(
        beta.resynced_bytes > 0 && beta.resynced_bytes <= 256 << 10,
        "a checksum-based full resync moved {} bytes; one request's worth was due",
        beta.resynced_bytes
    );
    ensure!(
        beta.resync_same_bytes + beta.resynced_bytes == 64 * MIB
            && alpha.resync_same_bytes == beta.resync_same_bytes,
        "the rest was not found the same: alpha {alpha:?} beta {beta:?}"
    );
    pair.wait_quiet()?;
    ensure!(
        pair.backings_identical()?,
        "the images differ after the resync"
    );
    pair.alpha.qrbd_ok(&["secondary", R])?;
    pair.stop()
}

/// The region of the image fio writes and verifies: the first half.
const FIO_REGION: u64 = 32 * MIB;

/// fio's job on `image`: random O_DIRECT writes of 4 KiB and 64 KiB (4 in flight) that cover
/// `FIO_REGION` once, each block with a crc32c header, then a verify phase that reads every
/// block back and checks it. The same arguments with `--verify_only` (and the same seed) only
/// verify what an earlier run wrote. The result goes to `output` as JSON.
fn fio_job(image: &Path, output: &Path, verify_only: bool) -> Vec<String> {
    let mut args: Vec<String> = [
        "--name=kill-secondary",
        "--direct=1",
        "--rw=randwrite",
        "--bssplit=4k/75:64k/25",
        "--ioengine=libaio",
        "--iodepth=4",
        "--offset=0",
        "--time_based=0",
        "--verify=crc32c",
        "--verify_fatal=1",
        "--randseed=4242",
        // The image exists and has its size: nothing to lay out or preallocate.
        "--fallocate=none",
        "--output-format=json",
    ]
    .into_iter()
    .map(String::from)
    .collect();
    args.push(format!("--filename={}", text(image)));
    args.push(format!("--size={FIO_REGION}"));
    args.push(format!("--output={}", text(output)));
    if verify_only {
        args.push("--verify_only".to_owned());
    }
    args
}

/// Bytes a finished fio job wrote and read (the verify phase reads), from its JSON output.
fn fio_io_bytes(output: &Path) -> anyhow::Result<(u64, u64)> {
    let raw = std::fs::read_to_string(output)
        .with_context(|| format!("cannot read {}", output.display()))?;
    // fio may put a note before the JSON document.
    let json = &raw[raw.find('{').context("no JSON in fio's output")?..];
    let report: serde_json::Value =
        serde_json::from_str(json).with_context(|| format!("bad fio JSON: {raw}"))?;
    let job = &report["jobs"][0];
    let bytes = |direction: &str| {
        job[direction]["io_bytes"]
            .as_u64()
            .with_context(|| format!("no {direction} io_bytes in fio's output: {raw}"))
    };
    Ok((bytes("write")?, bytes("read")?))
}

/// A Secondary killed (SIGKILL) while fio writes with verification on the Primary comes back
/// during or after the run and catches up from the bitmaps (what it missed, and its own hot
/// extents: its cache may have lost writes it had acknowledged), fio's
/// verify phase finds every block it wrote intact through the Primary's image (the kill, the
/// reconnect and the resync never made it return bad data), the backing files end identical,
/// and after a switchover fio `--verify_only` finds every block intact through the former
/// Secondary's image.
#[test]
fn a_secondary_killed_during_fio_verify_catches_up() -> anyhow::Result<()> {
    let mut pair = Pair::up("qrbd-kill-secondary", &PairSpec::new(R, SIZE, "C"))?;
    pair.alpha.qrbd_ok(&["primary", R])?;
    let dir = pair.dir().to_owned();
    let output = dir.join("fio.json");
    let written_before = pair.alpha.status(R)?.written_bytes;
    let mut fio = Background::spawn(
        "fio",
        Command::new("timeout")
            .args(["--kill-after=5", "90", "fio"])
            .args(fio_job(&pair.alpha.image_path(R), &output, false)),
        &dir.join("fio.out"),
        &dir.join("fio.err"),
    )?;

    // A quarter of the region is written (and, protocol C, on beta too): kill beta.
    let at_kill = fio
        .wait_while_running(REACT, "fio to write a quarter of its region", || {
            let written = pair.alpha.status(R).ok()?.written_bytes;
            let written = written.saturating_sub(written_before);
            (written >= FIO_REGION / 4).then_some(written)
        })
        .with_context(|| pair.logs())?;
    pair.beta.kill_daemon()?;
    // Alpha goes on without beta and counts what beta misses.
    let missed = fio
        .wait_while_running(REACT, "alpha to count 4 MiB out of sync for beta", || {
            let p = peer(&pair.alpha).ok()?;
            (p.connection != "Connected" && p.out_of_sync_bytes >= 4 * MIB)
                .then_some(p.out_of_sync_bytes)
        })
        .with_context(|| pair.logs())?;

    pair.beta.start_daemon()?;
    pair.wait_connected(CONNECT)?;
    let fio_running_at_reconnect = fio.running();
    wait_for_resync(&pair)?;
    let moved = peer(&pair.beta)?.resynced_bytes;

    let status = fio.wait(Duration::from_secs(60))?;
    ensure!(
        status.success(),
        "fio failed ({status}): {}\n{}",
        fio.stderr(),
        std::fs::read_to_string(&output).unwrap_or_default()
    );
    let (fio_written, fio_verified) = fio_io_bytes(&output)?;
    eprintln!(
        "fio wrote {fio_written} bytes and verified {fio_verified}; beta was killed after \
         {at_kill}, alpha counted {missed} out of sync before beta restarted, beta resynced \
         {moved}; fio still running at the reconnect: {fio_running_at_reconnect}"
    );
    ensure!(
        fio_written == FIO_REGION && fio_verified == FIO_REGION,
        "fio wrote {fio_written} and verified {fio_verified} bytes; {FIO_REGION} each expected"
    );
    // Beta crashed, so every extent hot in its own activity log is resynced besides what it
    // missed (a write its cache lost may be in any of them): never more than the extents fio
    // wrote in, which all lie in its region.
    ensure!(
        moved > 0 && moved <= FIO_REGION,
        "beta resynced {moved} bytes of the {fio_written} fio wrote ({at_kill} before the kill); \
         expected at most the {FIO_REGION} bytes of fio's region"
    );
    pair.wait_quiet()?;
    ensure!(
        pair.backings_identical()?,
        "the backing images differ\n{}",
        pair.logs()
    );

    // Beta takes over and serves every block fio wrote, intact.
    pair.alpha.qrbd_ok(&["secondary", R])?;
    pair.beta.qrbd_ok(&["primary", R])?;
    let verify_output = dir.join("fio-verify-only.json");
    let mut args = vec![
        "--kill-after=5".to_owned(),
        "60".to_owned(),
        "fio".to_owned(),
    ];
    args.extend(fio_job(&pair.beta.image_path(R), &verify_output, true));
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    run("timeout", &args).context("fio --verify_only on beta's image")?;
    let (_, beta_verified) = fio_io_bytes(&verify_output)?;
    ensure!(
        beta_verified == FIO_REGION,
        "fio --verify_only checked {beta_verified} bytes on beta; {FIO_REGION} expected"
    );
    pair.beta.qrbd_ok(&["secondary", R])?;
    pair.stop()
}

// ---------------------------------------------------------------------------------------------
// 7. Incompatible peers
// ---------------------------------------------------------------------------------------------

/// Beta's resource differs from alpha's (`from` → `to` in beta's configuration): they never
/// connect and both logs say why (`word`).
fn incompatible_peer_is_refused(
    prefix: &str,
    from: &str,
    to: &str,
    word: &str,
) -> anyhow::Result<()> {
    let pair = refused_pair(
        prefix,
        &PairSpec::new(R, SIZE, "C"),
        |pair| edit_config(&pair.beta, from, to),
        &[word],
    )?;
    for (name, node) in [("alpha", &pair.alpha), ("beta", &pair.beta)] {
        let daemon_log = log(node);
        let why = daemon_log
            .lines()
            .find(|l| l.contains(word) && (l.contains("refused") || l.contains("failed")));
        eprintln!("{name}: {why:?}");
        ensure!(
            why.is_some(),
            "{name}'s log does not say why ({word}):\n{}",
            tail(&daemon_log, 40)
        );
        // Status says why too, not just "Connecting".
        let status = peer(node)?;
        ensure!(
            status
                .last_error
                .as_deref()
                .is_some_and(|reason| reason.contains(word)),
            "{name}'s status does not say why ({word}): {status:?}"
        );
    }
    // The dialer backs off after a refusal instead of redialling at full speed.
    let attempts = log(&pair.alpha).matches("refused the peer").count();
    ensure!(
        (1..=3).contains(&attempts),
        "alpha tried {attempts} handshakes within the test; a refused peer must be retried slowly"
    );
    Ok(())
}

#[test]
fn peer_with_another_size_is_refused() -> anyhow::Result<()> {
    incompatible_peer_is_refused("qrbd-size", "size = \"64MiB\"", "size = \"128MiB\"", "size")
}

#[test]
fn peer_with_another_protocol_is_refused() -> anyhow::Result<()> {
    incompatible_peer_is_refused(
        "qrbd-protocol",
        "protocol = \"C\"",
        "protocol = \"B\"",
        "protocol",
    )
}

// ---------------------------------------------------------------------------------------------
// 8. qrbd events
// ---------------------------------------------------------------------------------------------

/// `qrbd events` streams the connection coming up and ends cleanly (status 0) on SIGINT.
#[test]
fn events_stream_the_connection_and_end_on_sigint() -> anyhow::Result<()> {
    let mut pair = Pair::configure("qrbd-events", &PairSpec::new(R, SIZE, "C"))?;
    pair.create_md()?;
    pair.alpha.start_daemon()?;
    let dir = pair.dir().to_owned();
    let mut events = Events::start(&pair.alpha, &dir, "alpha")?;
    pair.beta.start_daemon()?;
    wait_until(
        CONNECT,
        "a `change connection ... connection:Connected` line",
        || {
            let lines = match events.lines() {
                Ok(lines) => lines,
                Err(error) => return Some(Err(error)),
            };
            lines
                .into_iter()
                .find(|l| {
                    l.starts_with("change connection")
                        && l.contains("name:r0")
                        && l.contains("conn-name:beta")
                        && l.ends_with("connection:Connected")
                })
                .map(Ok)
        },
    )
    .with_context(|| format!("events so far: {:?}\n{}", events.lines(), pair.logs()))??;
    ensure!(
        events.process.running(),
        "qrbd events ended by itself: {}",
        events.process.stderr()
    );
    events.process.signal(libc::SIGINT)?;
    let status = events.process.wait(Duration::from_secs(10))?;
    ensure!(
        status.success(),
        "qrbd events ended with {status} (signal {:?}) on SIGINT: {}",
        status.signal(),
        events.process.stderr()
    );
    pair.stop()
}

// ---------------------------------------------------------------------------------------------
// Roles across the pair (the resource core's cluster-wide state changes and its rules)
// ---------------------------------------------------------------------------------------------

/// Writes `count` random 64 KiB blocks at block `seek` of a node's image, with O_DIRECT, from a
/// child process.
fn write_random(node: &TestNode, count: u64, seek: u64) -> anyhow::Result<()> {
    run(
        "timeout",
        &[
            "30",
            "dd",
            "if=/dev/urandom",
            &format!("of={}", text(&node.image_path(R))),
            "bs=64k",
            &format!("count={count}"),
            &format!("seek={seek}"),
            "oflag=direct",
            "conv=notrunc",
        ],
    )?;
    Ok(())
}

/// Runs `qrbd primary r0` on both nodes at the same instant.
fn promote_both_at_once(pair: &Pair) -> anyhow::Result<[(bool, String); 2]> {
    let spawn = |node: &TestNode| -> anyhow::Result<Child> {
        Ok(Command::new(binary())
            .arg("--config")
            .arg(&node.config_path)
            .args(["primary", R])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()?)
    };
    let alpha = spawn(&pair.alpha)?;
    let beta = spawn(&pair.beta)?;
    let finish = |child: Child| -> anyhow::Result<(bool, String)> {
        let output = child.wait_with_output()?;
        Ok((
            output.status.success(),
            format!(
                "{}{}",
                String::from_utf8_lossy(&output.stdout),
                String::from_utf8_lossy(&output.stderr)
            ),
        ))
    };
    Ok([finish(alpha)?, finish(beta)?])
}

/// Both nodes Secondary, and each sees the other Secondary.
fn wait_both_secondary(pair: &Pair) -> anyhow::Result<()> {
    wait_until(REACT, "both nodes Secondary and connected", || {
        let a = pair.alpha.status(R).ok()?;
        let b = pair.beta.status(R).ok()?;
        let secondary = |s: &qrbd_actors::status::ResourceStatus| {
            s.role == qrbd_actors::core::Role::Secondary
                && s.peers.first().is_some_and(|p| {
                    p.connection == "Connected"
                        && p.role == Some(qrbd_actors::core::Role::Secondary)
                })
        };
        (secondary(&a) && secondary(&b)).then_some(())
    })
    .with_context(|| pair.logs())
}

#[test]
fn racing_promotions_never_make_two_primaries() -> anyhow::Result<()> {
    let pair = Pair::up("qrbd-race", &PairSpec::new(R, SIZE, "C"))?;
    let mut winners = [0u32; 2];
    for round in 0..20 {
        wait_both_secondary(&pair)?;
        let outcomes = promote_both_at_once(&pair)?;
        let names = ["alpha", "beta"];
        let succeeded = outcomes.iter().filter(|(ok, _)| *ok).count();
        ensure!(
            succeeded <= 1,
            "round {round}: both promotions succeeded: {outcomes:?}\n{}",
            pair.logs()
        );
        for (i, (ok, output)) in outcomes.iter().enumerate() {
            let other = names[1 - i];
            ensure!(
                *ok || output.contains(other),
                "round {round}: {}'s refusal does not name {other}: {output}",
                names[i]
            );
            if *ok {
                winners[i] += 1;
            }
        }
        let roles = [pair.alpha.status(R)?.role, pair.beta.status(R)?.role];
        let primaries = roles
            .iter()
            .filter(|r| **r == qrbd_actors::core::Role::Primary)
            .count();
        ensure!(
            primaries == succeeded,
            "round {round}: roles {roles:?} after {outcomes:?}"
        );
        for (i, node) in [&pair.alpha, &pair.beta].into_iter().enumerate() {
            if outcomes[i].0 {
                node.qrbd_ok(&["secondary", R])?;
            }
        }
    }
    eprintln!("promotions won: alpha {}, beta {}", winners[0], winners[1]);
    ensure!(
        winners[0] + winners[1] >= 10,
        "most rounds should have a winner: {winners:?}\n{}",
        pair.logs()
    );
    Ok(())
}

#[test]
fn a_primary_refuses_data_from_its_peer() -> anyhow::Result<()> {
    let mut pair = Pair::configure("qrbd-refusedata", &PairSpec::new(R, SIZE, "C"))?;
    pair.beta.test_hooks = true;
    pair.create_md()?;
    pair.start()?;
    pair.wait_connected(CONNECT)?;
    pair.alpha.qrbd_ok(&["primary", R])?;
    let offset = 8 * MIB;
    let before = read_at(&pair.alpha.backing_path(R), offset, 64 << 10)?;
    let answer = pair
        .beta
        .request(&qrbd::admin::AdminRequest::TestSendData {
            resource: R.into(),
            offset,
            len: 64 << 10,
            byte: 0xAB,
        })?;
    ensure!(
        matches!(answer, qrbd::admin::AdminResponse::Done { .. }),
        "the test hook failed: {answer:?}"
    );
    // Alpha drops the link with a protocol error that says why, and writes nothing.
    let reason = wait_until(REACT, "alpha to refuse beta's data", || {
        log(&pair.alpha)
            .lines()
            .find(|l| l.contains("protocol error") && l.contains("not Primary"))
            .map(str::to_owned)
    })
    .with_context(|| pair.logs())?;
    eprintln!("alpha: {reason}");
    // The images are only read from child processes (a stuck FUSE read must not wedge the
    // test); the backing file shows what reached alpha's store.
    let after = read_at(&pair.alpha.backing_path(R), offset, 64 << 10)?;
    ensure!(
        after == before && !after.contains(&0xAB),
        "beta's data reached alpha's store"
    );
    // The link comes back (the refusal is not a reason to stay apart).
    pair.wait_connected(CONNECT)?;
    Ok(())
}

#[test]
fn forced_promotion_alone_starts_a_new_generation_and_split_brain_is_refused() -> anyhow::Result<()>
{
    let mut pair = Pair::up("qrbd-generation", &PairSpec::new(R, SIZE, "C"))?;
    let first = pair.alpha.status(R)?;
    ensure!(
        first.current_uuid == pair.beta.status(R)?.current_uuid,
        "a fresh pair shares its generation"
    );
    // Apart: alpha is promoted with --force and writes.
    pair.alpha.qrbd_ok(&["disconnect", R])?;
    pair.beta.qrbd_ok(&["disconnect", R])?;
    pair.alpha.qrbd_ok(&["primary", "--force", R])?;
    let forced = pair.alpha.status(R)?;
    ensure!(
        forced.current_uuid != first.current_uuid,
        "primary --force while disconnected kept generation {}",
        first.current_uuid
    );
    ensure!(
        forced.bitmap_uuids.get("1") == Some(&first.current_uuid),
        "beta's bitmap generation should be the old one: {forced:?}"
    );
    write_random(&pair.alpha, 4, 0)?;
    // The new generation survives a restart.
    pair.alpha.qrbd_ok(&["secondary", R])?;
    let exit = pair.alpha.stop_daemon()?;
    ensure!(exit.success(), "alpha exited with {exit}");
    pair.alpha.start_daemon()?;
    let restarted = pair.alpha.status(R)?;
    ensure!(
        restarted.current_uuid == forced.current_uuid,
        "the generation after a restart is {}, before it was {}",
        restarted.current_uuid,
        forced.current_uuid
    );
    // Beta, also apart, is promoted and writes: both wrote since the shared generation.
    pair.beta.qrbd_ok(&["primary", "--force", R])?;
    write_random(&pair.beta, 4, 8)?;
    pair.beta.qrbd_ok(&["secondary", R])?;
    pair.alpha.qrbd_ok(&["connect", R])?;
    pair.beta.qrbd_ok(&["connect", R])?;
    // Both sides detect the split brain, say so, and stay StandAlone.
    for (name, node) in [("alpha", &pair.alpha), ("beta", &pair.beta)] {
        let status = wait_until(REACT, &format!("{name} to report the split brain"), || {
            peer(node).ok().filter(|p| {
                p.connection == "StandAlone"
                    && p.last_error
                        .as_deref()
                        .is_some_and(|e| e.contains("split brain"))
            })
        })
        .with_context(|| pair.logs())?;
        eprintln!("{name}: {:?}", status.last_error);
    }
    ensure_never_connected(&[&pair.alpha, &pair.beta], WATCH).with_context(|| pair.logs())?;

    // Manual recovery: beta is the victim. Its writes since the split are replaced by alpha's
    // data (a resync of the blocks either side changed), and the images converge.
    let alpha_before = pair.dir().join("alpha-before.img");
    std::fs::copy(pair.alpha.backing_path(R), &alpha_before)?;
    pair.beta.qrbd_ok(&["connect", "--discard-my-data", R])?;
    pair.alpha.qrbd_ok(&["connect", R])?;
    pair.wait_connected(CONNECT)?;
    wait_for_convergence(&pair)?;
    let moved = peer(&pair.beta)?.resynced_bytes;
    ensure!(
        moved > 0 && moved <= 16 * 64 * 1024,
        "the recovery moved {moved} bytes; only the blocks both sides changed were due"
    );
    ensure!(
        pair.backings_identical()?,
        "the images differ after the recovery"
    );
    ensure!(
        files_identical(&alpha_before, &pair.beta.backing_path(R))?,
        "beta does not hold alpha's data after discarding its own"
    );
    pair.stop()
}

/// Waits until both nodes are connected, no resync runs, neither counts anything out of sync,
/// and neither disk is Inconsistent.
fn wait_for_convergence(pair: &Pair) -> anyhow::Result<()> {
    wait_until(Duration::from_secs(60), "the nodes to converge", || {
        let (a, b) = (peer(&pair.alpha).ok()?, peer(&pair.beta).ok()?);
        let disks = [
            pair.alpha.status(R).ok()?.disk,
            pair.beta.status(R).ok()?.disk,
        ];
        (a.connection == "Connected"
            && b.connection == "Connected"
            && a.sync.is_none()
            && b.sync.is_none()
            && a.out_of_sync_bytes == 0
            && b.out_of_sync_bytes == 0
            && !disks.contains(&qrbd_actors::core::DiskState::Inconsistent))
        .then_some(())
    })
    .with_context(|| {
        format!(
            "alpha's peer: {:?}\nbeta's peer: {:?}\n{}",
            peer(&pair.alpha).ok(),
            peer(&pair.beta).ok(),
            pair.logs()
        )
    })
}

/// Which node's data survives an automatic split-brain recovery.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Survivor {
    Alpha,
    Beta,
}

/// Both nodes are promoted while apart and write `alpha_writes` / `beta_writes` 64 KiB
/// blocks (at different places); `policy` is added to both configurations. Alpha stays Primary
/// at the reconnect when `alpha_primary`. The policy must resolve it: the images converge on
/// `survivor`'s data.
fn automatic_split_brain_recovery(
    prefix: &str,
    policy: &str,
    alpha_writes: u64,
    beta_writes: u64,
    alpha_primary: bool,
    survivor: Survivor,
) -> anyhow::Result<()> {
    split_brain_recovery(
        prefix,
        policy,
        alpha_writes,
        beta_writes,
        alpha_primary,
        false,
        survivor,
    )
}

/// As [`automatic_split_brain_recovery`]; with `alpha_primary_before_split`, alpha is promoted
/// while connected and keeps writing after the split (the older Primary), and only beta is
/// promoted with `--force` during it (the younger).
fn split_brain_recovery(
    prefix: &str,
    policy: &str,
    alpha_writes: u64,
    beta_writes: u64,
    alpha_primary: bool,
    alpha_primary_before_split: bool,
    survivor: Survivor,
) -> anyhow::Result<()> {
    let mut pair = Pair::configure(prefix, &PairSpec::new(R, SIZE, "C"))?;
    for node in [&pair.alpha, &pair.beta] {
        edit_config(
            node,
            "protocol = \"C\"",
            &format!("protocol = \"C\"\n{policy}"),
        )?;
    }
    pair.create_md()?;
    pair.start()?;
    pair.wait_connected(CONNECT)?;
    if alpha_primary_before_split {
        pair.alpha.qrbd_ok(&["primary", R])?;
    }
    pair.alpha.qrbd_ok(&["disconnect", R])?;
    pair.beta.qrbd_ok(&["disconnect", R])?;
    for (node, writes, seek) in [
        (&pair.alpha, alpha_writes, 0),
        (&pair.beta, beta_writes, 32),
    ] {
        if !(alpha_primary_before_split && std::ptr::eq(node, &pair.alpha)) {
            node.qrbd_ok(&["primary", "--force", R])?;
        }
        if writes > 0 {
            write_random(node, writes, seek)?;
        }
    }
    pair.beta.qrbd_ok(&["secondary", R])?;
    if !alpha_primary {
        pair.alpha.qrbd_ok(&["secondary", R])?;
    }
    let expected = pair.dir().join("survivor-before.img");
    let survivor_node = match survivor {
        Survivor::Alpha => &pair.alpha,
        Survivor::Beta => &pair.beta,
    };
    std::fs::copy(survivor_node.backing_path(R), &expected)?;
    pair.alpha.qrbd_ok(&["connect", R])?;
    pair.beta.qrbd_ok(&["connect", R])?;
    pair.wait_connected(CONNECT)?;
    wait_for_convergence(&pair)?;
    for node in [&pair.alpha, &pair.beta] {
        ensure!(
            log(node).contains("split brain"),
            "{} does not log the split brain:\n{}",
            node.dir.display(),
            tail(&log(node), 30)
        );
    }
    ensure!(
        pair.backings_identical()?,
        "the images differ after the recovery"
    );
    ensure!(
        files_identical(&expected, &pair.alpha.backing_path(R))?,
        "the images do not hold {survivor:?}'s data"
    );
    if alpha_primary {
        pair.alpha.qrbd_ok(&["secondary", R])?;
    }
    pair.stop()
}

/// Beta's metadata is recreated (`create-md --force`) and beta is forced Primary alone and
/// writes: its data no longer descends from alpha's (they share only the fresh generation).
/// When alpha connects again, both refuse, say "unrelated data" and stay StandAlone.
#[test]
fn unrelated_data_is_refused() -> anyhow::Result<()> {
    let mut pair = Pair::up("qrbd-unrelated", &PairSpec::new(R, SIZE, "C"))?;
    pair.alpha.qrbd_ok(&["disconnect", R])?;
    let exit = pair.beta.stop_daemon()?;
    ensure!(exit.success(), "beta's daemon exited with {exit}");
    pair.beta.qrbd_ok(&["create-md", "--force", R])?;
    pair.beta.start_daemon()?;
    wait_until(REACT, "beta's image", || {
        pair.beta.image_path(R).exists().then_some(())
    })?;
    pair.beta.qrbd_ok(&["primary", "--force", R])?;
    write_random(&pair.beta, 4, 0)?;
    pair.beta.qrbd_ok(&["secondary", R])?;
    pair.alpha.qrbd_ok(&["connect", R])?;
    for node in [&pair.alpha, &pair.beta] {
        wait_until(REACT, "the refusal to be logged", || {
            log(node).contains("unrelated data").then_some(())
        })
        .with_context(|| pair.logs())?;
    }
    ensure_never_connected(&[&pair.alpha, &pair.beta], WATCH)?;
    for node in [&pair.alpha, &pair.beta] {
        let peer = peer(node)?;
        ensure!(
            peer.connection == "StandAlone",
            "{} should stay StandAlone after the refusal, not {}",
            node.dir.display(),
            peer.connection
        );
    }
    pair.stop()
}

/// Alpha was Primary before the split and beta became Primary during it: beta, the younger
/// Primary, loses, though it changed more.
#[test]
fn split_brain_discard_younger_primary() -> anyhow::Result<()> {
    split_brain_recovery(
        "qrbd-sb-younger",
        "after_sb_0pri = \"discard-younger-primary\"",
        2,
        6,
        false,
        true,
        Survivor::Alpha,
    )
}

/// The same split: alpha, the older Primary, loses, though it changed more.
#[test]
fn split_brain_discard_older_primary() -> anyhow::Result<()> {
    split_brain_recovery(
        "qrbd-sb-older",
        "after_sb_0pri = \"discard-older-primary\"",
        6,
        2,
        false,
        true,
        Survivor::Beta,
    )
}

#[test]
fn split_brain_discard_zero_changes() -> anyhow::Result<()> {
    automatic_split_brain_recovery(
        "qrbd-sb-zero",
        "after_sb_0pri = \"discard-zero-changes\"",
        4,
        0,
        false,
        Survivor::Alpha,
    )
}

#[test]
fn split_brain_discard_least_changes() -> anyhow::Result<()> {
    automatic_split_brain_recovery(
        "qrbd-sb-least",
        "after_sb_0pri = \"discard-least-changes\"",
        2,
        6,
        false,
        Survivor::Beta,
    )
}

#[test]
fn split_brain_discard_node() -> anyhow::Result<()> {
    automatic_split_brain_recovery(
        "qrbd-sb-node",
        "after_sb_0pri = \"discard-node-alpha\"",
        6,
        2,
        false,
        Survivor::Beta,
    )
}

#[test]
fn split_brain_one_primary_discard_secondary() -> anyhow::Result<()> {
    automatic_split_brain_recovery(
        "qrbd-sb-secondary",
        "after_sb_1pri = \"discard-secondary\"",
        2,
        6,
        true,
        Survivor::Alpha,
    )
}

#[test]
fn split_brain_one_primary_consensus() -> anyhow::Result<()> {
    automatic_split_brain_recovery(
        "qrbd-sb-consensus",
        "after_sb_0pri = \"discard-least-changes\"\nafter_sb_1pri = \"consensus\"",
        6,
        2,
        true,
        Survivor::Alpha,
    )
}

/// The disk states tell the truth while a node catches up and after a crash of both nodes:
/// a sync target is Inconsistent, refuses promotion (even with `--force`, its resync writes
/// would land under the application's), and neither node comes back from the crash claiming
/// UpToDate data or promotes without `--force`.
#[test]
fn a_sync_target_refuses_promotion_and_the_states_survive_crashes() -> anyhow::Result<()> {
    let mut pair = Pair::configure("qrbd-outdate", &PairSpec::new(R, SIZE, "C"))?;
    // Slow, so that the resync is still running while we look: the controller off, a fixed
    // rate.
    for node in [&pair.alpha, &pair.beta] {
        edit_config(
            node,
            "protocol = \"C\"",
            "protocol = \"C\"\nc_plan_ahead = 0\nresync_rate = \"64K\"",
        )?;
    }
    pair.create_md()?;
    pair.start()?;
    pair.wait_connected(CONNECT)?;
    // Beta writes while alpha is away: alpha is behind.
    pair.alpha.qrbd_ok(&["disconnect", R])?;
    pair.beta.qrbd_ok(&["primary", "--force", R])?;
    write_random(&pair.beta, 16, 0)?;
    pair.beta.qrbd_ok(&["secondary", R])?;
    pair.alpha.qrbd_ok(&["connect", R])?;
    pair.wait_connected(CONNECT)?;
    let disk_of = |node: &TestNode| node.status(R).map(|s| s.disk);
    wait_until(REACT, "alpha to become a sync target", || {
        let sync = peer(&pair.alpha).ok()?.sync?;
        (sync.role == "SyncTarget"
            && disk_of(&pair.alpha).ok()? == qrbd_actors::core::DiskState::Inconsistent)
            .then_some(())
    })
    .with_context(|| pair.logs())?;
    let refused = pair.alpha.qrbd(&["primary", R])?;
    ensure!(
        !refused.status.success(),
        "an Inconsistent node was promoted without --force"
    );
    let forced = pair.alpha.qrbd(&["primary", "--force", R])?;
    let message = String::from_utf8_lossy(&forced.stderr);
    ensure!(
        !forced.status.success() && message.contains("SyncTarget"),
        "a sync target was promoted with --force: {message}"
    );
    // Both crash. Neither comes back claiming UpToDate data, neither promotes without --force.
    pair.alpha.kill_daemon()?;
    pair.beta.kill_daemon()?;
    pair.alpha.start_daemon()?;
    pair.beta.start_daemon()?;
    pair.wait_connected(CONNECT)?;
    for (name, node) in [("alpha", &pair.alpha), ("beta", &pair.beta)] {
        let disk = disk_of(node)?;
        ensure!(
            disk != qrbd_actors::core::DiskState::UpToDate,
            "{name} came back UpToDate after the crash\n{}",
            pair.logs()
        );
        let attempt = node.qrbd(&["primary", R])?;
        ensure!(
            !attempt.status.success(),
            "{name} ({disk}) was promoted without --force after the crash"
        );
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// 8. A Primary killed during writes
// ---------------------------------------------------------------------------------------------

/// The files the writer of `a_killed_primary_resyncs_its_hot_extents` cycles through.
const CRASH_FILES: u64 = 64;
/// The 64 KiB blocks of its pattern file: file write `i` copies `1 + i % 8` of them, starting
/// at block `i % 13`.
const CRASH_PATTERN_BLOCKS: u64 = 13 + 8;

/// A shell loop in a mounted file system: write `i` replaces file `f(i % 64)` with `1 + i % 8`
/// blocks of 64 KiB from a pattern file (from block `i % 13`) and fsyncs it, until a stop file
/// appears. After each `dd` returns it appends `i` to a progress file.
const FILE_WRITER_SCRIPT: &str = r#"
dir=$1; src=$2; stop=$3; progress=$4
i=0
while [ ! -e "$stop" ]; do
    timeout --foreground 60 dd if="$src" of="$dir/f$((i % 64))" bs=65536 skip=$((i % 13)) \
        count=$((1 + i % 8)) conv=fsync status=none || { echo "dd of write $i failed" >&2; exit 1; }
    echo "$i" >> "$progress"
    i=$((i + 1))
done
"#;

/// The bytes file write `index` of `FILE_WRITER_SCRIPT` left in its file.
fn crash_file_content(pattern: &[u8], index: u64) -> anyhow::Result<&[u8]> {
    let first = usize::try_from((index % 13) * BLOCK)?;
    let len = usize::try_from((1 + index % 8) * BLOCK)?;
    pattern
        .get(first..first + len)
        .context("the pattern is too short")
}

/// Waits until the kernel released a loop device detached while still in use (its file system
/// was unmounted lazily): `losetup -d` only marks such a device for release.
fn wait_loop_released(device: &str) -> anyhow::Result<()> {
    let name = device.trim_start_matches("/dev/");
    let backing = PathBuf::from(format!("/sys/block/{name}/loop/backing_file"));
    wait_until(REACT, &format!("{device} to be released"), || {
        (!backing.exists()).then_some(())
    })
}

/// The issue: "Primary kill -9 during writes, restart: the activity log marks its hot extents,
/// resync runs, `e2fsck -fn` clean, images identical." Alpha is Primary with ext4 on its image
/// (loop device, direct I/O) and a writer replacing files with fsync; alpha's daemon is killed
/// with SIGKILL in the middle. Beta stays Secondary. Alpha's stored metadata shows the unclean
/// stop and its hot extents; alpha comes back, the pair resyncs at most those extents (a small
/// activity log: far less than the image) and the images end identical. Then beta is promoted:
/// the file system mounts (replaying its journal), every file whose fsync returned before the
/// kill holds what was written, and `e2fsck -fn` finds it clean.
#[test]
fn a_killed_primary_resyncs_its_hot_extents() -> anyhow::Result<()> {
    use qrbd_actors::core::{DiskState, Role};
    use qrbd_actors::meta::EXTENT_BYTES;
    use qrbd_actors::ports::MetaStore as _;

    const AL_EXTENTS: u64 = 7;
    const IMAGE: u64 = 256 * MIB;
    let mut pair = Pair::configure("qrbd-kill-primary", &PairSpec::new(R, "256MiB", "C"))?;
    for node in [&pair.alpha, &pair.beta] {
        edit_config(
            node,
            "protocol = \"C\"",
            &format!("protocol = \"C\"\nal_extents = {AL_EXTENTS}"),
        )?;
    }
    pair.create_md()?;
    pair.start()?;
    pair.wait_connected(CONNECT)?;
    pair.alpha.qrbd_ok(&["primary", R])?;

    let dir = pair.dir().to_owned();
    let pattern_path = dir.join("pattern.bin");
    let pattern = random_file(&pattern_path, CRASH_PATTERN_BLOCKS * BLOCK)?;
    let alpha_loop = LoopDevice::attach(&pair.alpha.image_path(R))?;
    run("mkfs.ext4", &["-q", "-F", &alpha_loop.device])?;
    let alpha_mount = Mounted::mount(&alpha_loop.device, &dir.join("mnt-alpha"))?;
    let files = alpha_mount.target.join("files");
    run("timeout", &["30", "mkdir", &text(&files)])?;
    let progress = dir.join("files.progress");
    File::create(&progress)?;
    let stop = dir.join("files.stop");
    let mut writer = Writer {
        process: Background::spawn(
            "the file writer",
            Command::new("sh")
                .arg("-c")
                .arg(FILE_WRITER_SCRIPT)
                .arg("file-writer")
                .arg(&files)
                .arg(&pattern_path)
                .arg(&stop)
                .arg(&progress),
            &dir.join("files.out"),
            &dir.join("files.err"),
        )?,
        stop,
        progress,
    };
    // More writes than files: every file has been replaced at least once.
    writer
        .wait_for(usize::try_from(CRASH_FILES)? + 16, Duration::from_secs(30))
        .with_context(|| pair.logs())?;
    let before_kill = pair.alpha.status(R)?;
    pair.alpha.kill_daemon()?;

    // The dd in flight fails (its I/O reaches a dead FUSE connection), which ends the loop: its
    // exit status is that expected failure, only waiting for it can fail here.
    let writer_exit = writer.process.wait(REACT)?;
    let done = writer.done()?;
    eprintln!(
        "the writer ended ({writer_exit}) after {} fsynced file writes: {}",
        done.len(),
        writer.process.stderr().trim()
    );
    // The file system lost its device: detach it lazily (a plain umount would try to write it
    // back), then the loop device (released by the kernel once the file system lets go).
    run("umount", &["-l", &text(&alpha_mount.target)])?;
    drop(alpha_mount);
    let alpha_device = alpha_loop.device.clone();
    alpha_loop.detach()?;
    wait_loop_released(&alpha_device)?;

    // Alpha's stored metadata: an unclean stop while Primary, and the hot extents.
    let (meta, stored) = {
        let store = qrbd::meta_store::SledMetaStore::open(&pair.alpha.state_dir.join("r0.meta"))?;
        let meta = store.load()?.context("alpha has no metadata")?;
        (meta, store.load_bitmaps()?)
    };
    ensure!(
        !meta.flags.clean_shutdown && meta.flags.was_primary,
        "alpha's metadata after the kill: {:?}",
        meta.flags
    );
    let hot: BTreeSet<u64> = stored.activity_log.iter().copied().collect();
    // Dirty blocks for beta stored outside the hot extents also count as out of sync.
    let stored_elsewhere: u64 = stored
        .chunks
        .iter()
        .filter(|chunk| chunk.peer == 1 && !hot.contains(&chunk.extent))
        .map(|chunk| {
            chunk
                .words
                .iter()
                .map(|w| u64::from(w.count_ones()))
                .sum::<u64>()
        })
        .sum::<u64>()
        * 4096;
    // Beta, a Secondary, counts nothing out of sync for alpha; what it does count is due too.
    let beta_counted = peer(&pair.beta)?.out_of_sync_bytes;
    let due = u64::try_from(hot.len())? * EXTENT_BYTES + stored_elsewhere + beta_counted;
    eprintln!(
        "before the kill: alpha al_hits {} al_misses {} al_transactions {}; after it: {} hot \
         extents {hot:?} (of {AL_EXTENTS}), {stored_elsewhere} bytes out of sync stored outside \
         them, beta counts {beta_counted}",
        before_kill.al_hits,
        before_kill.al_misses,
        before_kill.al_transactions,
        hot.len()
    );
    ensure!(
        !hot.is_empty(),
        "alpha's activity log is empty after a kill during writes"
    );
    // The log holds `al_extents` extents, more only while all of them are in use
    // (docs/protocol.md, "The activity log and the bitmap"); at the kill, one writer had a file
    // write and its journal commit in flight, which touch a few extents at most. Checked at the
    // end, so that a failure here still shows how the rest went.
    let hot_limit = 2 * AL_EXTENTS;
    let hot_within_limit = u64::try_from(hot.len())? <= hot_limit;

    // Alpha comes back; beta stays Secondary. The pair resyncs and both end UpToDate.
    pair.alpha.start_daemon()?;
    pair.wait_connected(CONNECT)?;
    let mut sync_roles = BTreeSet::new();
    wait_until(
        Duration::from_secs(60),
        "the pair to resync and converge",
        || {
            let (a, b) = (pair.alpha.status(R).ok()?, pair.beta.status(R).ok()?);
            let (ap, bp) = (a.peers.first()?, b.peers.first()?);
            for (name, p) in [("alpha", ap), ("beta", bp)] {
                if let Some(sync) = &p.sync {
                    sync_roles.insert(format!("{name} {}", sync.role));
                }
            }
            (ap.connection == "Connected"
                && bp.connection == "Connected"
                && ap.sync.is_none()
                && bp.sync.is_none()
                && ap.out_of_sync_bytes == 0
                && bp.out_of_sync_bytes == 0
                && a.disk == DiskState::UpToDate
                && b.disk == DiskState::UpToDate)
                .then_some(())
        },
    )
    .with_context(|| {
        format!(
            "alpha: {:?}\nbeta: {:?}\n{}",
            pair.alpha.status(R).ok(),
            pair.beta.status(R).ok(),
            pair.logs()
        )
    })?;
    let (alpha_peer, beta_peer) = (peer(&pair.alpha)?, peer(&pair.beta)?);
    let target = if log(&pair.alpha).contains("resync finished; this node is UpToDate") {
        "alpha"
    } else if log(&pair.beta).contains("resync finished; this node is UpToDate") {
        "beta"
    } else {
        "neither (no resync finished)"
    };
    eprintln!(
        "resynced: alpha {} beta {} bytes; due at most {due} ({} MiB of {} MiB); sync target: \
         {target}; seen while polling: {sync_roles:?}",
        alpha_peer.resynced_bytes,
        beta_peer.resynced_bytes,
        due / MIB,
        IMAGE / MIB
    );
    for (name, moved) in [
        ("alpha", alpha_peer.resynced_bytes),
        ("beta", beta_peer.resynced_bytes),
    ] {
        ensure!(
            moved > 0 && moved <= due,
            "{name} resynced {moved} bytes; due were the {} hot extents and {} more bytes, \
             {due} bytes in all\n{}",
            hot.len(),
            stored_elsewhere + beta_counted,
            pair.logs()
        );
    }
    ensure!(
        pair.backings_identical()?,
        "the backing images differ after the resync\n{}",
        pair.logs()
    );

    // Beta takes over: the journal replays, the fsynced files are there, e2fsck finds nothing.
    pair.beta.qrbd_ok(&["primary", R])?;
    let beta_loop = LoopDevice::attach(&pair.beta.image_path(R))?;
    let beta_mount = Mounted::mount(&beta_loop.device, &dir.join("mnt-beta"))?;
    let last = *done.last().context("no file write completed")?;
    let expected = dir.join("expected.bin");
    let mut checked = 0;
    for file in 0..CRASH_FILES {
        // The file the writer was replacing at the kill may hold anything; every other one
        // holds its last fsynced write.
        if file == (last + 1) % CRASH_FILES {
            continue;
        }
        let index = done
            .iter()
            .rev()
            .find(|i| *i % CRASH_FILES == file)
            .with_context(|| format!("file f{file} was never written"))?;
        std::fs::write(&expected, crash_file_content(&pattern, *index)?)?;
        let replica = beta_mount.target.join("files").join(format!("f{file}"));
        run("timeout", &["30", "cmp", &text(&expected), &text(&replica)])
            .with_context(|| format!("f{file} (write {index}) on beta"))?;
        checked += 1;
    }
    beta_mount.unmount()?;
    let fsck = run("timeout", &["60", "e2fsck", "-fn", &beta_loop.device])
        .with_context(|| format!("e2fsck on beta\n{}", pair.logs()))?;
    eprintln!(
        "{checked} fsynced files verified on beta; e2fsck: {}",
        fsck.lines().last().unwrap_or_default()
    );
    beta_loop.detach()?;
    pair.beta.qrbd_ok(&["secondary", R])?;
    ensure!(
        pair.alpha.status(R)?.role == Role::Secondary,
        "alpha came back Primary"
    );
    ensure!(
        pair.backings_identical()?,
        "the backing images differ after beta mounted the file system\n{}",
        pair.logs()
    );
    pair.stop()?;
    ensure!(
        hot_within_limit,
        "alpha's activity log held {} hot extents at the kill, with al_extents = {AL_EXTENTS} \
         and one writer (at most {hot_limit} expected): the crash resynced {due} bytes of the \
         {IMAGE}-byte image. (mkfs.ext4 discards the whole image at once, which makes every \
         extent hot; the log only shrinks when a write needs a cold extent.)",
        hot.len()
    );
    ensure!(
        due <= IMAGE / 4,
        "{due} bytes were due, not far less than the {IMAGE}-byte image"
    );
    Ok(())
}
