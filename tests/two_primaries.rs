//! Two primaries, end to end: two real daemons on 127.0.0.1 (FUSE images, QUIC with mutual TLS)
//! with `allow_two_primaries = true` and protocol C, both promoted, both writing.
//!
//! Blocking I/O to a FUSE image is only done from child processes under `timeout` (as in
//! `replication.rs`): a thread stuck in FUSE could wedge the test process. The writers are this
//! test binary run again as a child (`child_io`, an ignored test that does nothing unless
//! `QRBD_TP_CHILD` says what to do), reads are `dd iflag=direct`.
//!
//! Every test has a scratch directory and ports of its own; guards clean up (daemons, mounts,
//! child processes, files) also when an assertion fails half-way. Waiting is on a condition
//! with a deadline, never a guessed sleep.

#[path = "common/background.rs"]
mod background;
#[path = "common/pair.rs"]
mod pair;

use std::fs::File;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context};
use background::Background;
use pair::{peer, Pair, R};
use qrbd::testbed::{run, wait_until, PairSpec, TestNode};
use qrbd_actors::status::ResourceStatus;
use rand::{Rng, RngCore, SeedableRng};

const SIZE: &str = "64MiB";
const BLOCK: usize = 4096;
/// The hot region both writers share: its first `HOT_BLOCKS` blocks.
const HOT_BLOCKS: u64 = 64;
/// Writes per node and round of the hammer.
const WRITES_PER_ROUND: u64 = 2000;
/// How long the hammer may go on looking for a conflict.
const CONFLICT_DEADLINE: Duration = Duration::from_secs(30);
const REACT: Duration = Duration::from_secs(20);
/// How long one writer child may run.
const CHILD_LIMIT: Duration = Duration::from_secs(60);
/// The writer tags in the patterns: alpha's and beta's.
const ALPHA_TAG: u64 = 0xA1;
const BETA_TAG: u64 = 0xB2;
const RECORD_MAGIC: u64 = u64::from_le_bytes(*b"QRBDREC1");

// ---------------------------------------------------------------------------------------------
// A pair of nodes
// ---------------------------------------------------------------------------------------------

/// What only these tests do with a pair.
impl Pair {
    /// Two primaries allowed, both daemons running, connected, the blank disks declared
    /// identical, and both nodes promoted.
    fn both_primary(prefix: &str) -> anyhow::Result<Pair> {
        let pair = Pair::up(prefix, &PairSpec::new(R, SIZE, "C").with_two_primaries())?;
        pair.alpha
            .qrbd_ok(&["primary", R])
            .with_context(|| pair.logs())?;
        pair.beta
            .qrbd_ok(&["primary", R])
            .context("beta's promotion while alpha is Primary")
            .with_context(|| pair.logs())?;
        for node in [&pair.alpha, &pair.beta] {
            let status = node.status(R)?;
            ensure!(
                status.allow_two_primaries,
                "status does not show allow_two_primaries"
            );
            ensure!(
                format!("{:?}", status.role) == "Primary",
                "{} is {:?} after its promotion",
                node.dir.display(),
                status.role
            );
        }
        Ok(pair)
    }

    /// Waits until both nodes are connected with nothing in flight: no application request,
    /// nothing unacknowledged or pending towards the peer, nothing out of sync.
    fn wait_quiet(&self) -> anyhow::Result<()> {
        wait_until(REACT, "both nodes to go quiet", || {
            [&self.alpha, &self.beta]
                .iter()
                .all(|node| match (node.status(R), peer(node)) {
                    (Ok(s), Ok(p)) => {
                        s.app_in_flight == 0
                            && s.app_held == 0
                            && !s.suspended
                            && p.connection == "Connected"
                            && p.unacked == 0
                            && p.pending == 0
                            && p.out_of_sync_bytes == 0
                    }
                    _ => false,
                })
                .then_some(())
        })
        .with_context(|| {
            format!(
                "alpha: {:?}\nbeta: {:?}\n{}",
                self.alpha.status(R).ok(),
                self.beta.status(R).ok(),
                self.logs()
            )
        })
    }

    /// Both must still be Connected (no conflict timed out, nobody dropped the link).
    fn ensure_connected(&self) -> anyhow::Result<()> {
        for node in [&self.alpha, &self.beta] {
            let p = peer(node)?;
            ensure!(
                p.connection == "Connected",
                "{} is {} (last error {:?})\n{}",
                node.dir.display(),
                p.connection,
                p.last_error,
                self.logs()
            );
        }
        Ok(())
    }

    /// `len` bytes at `offset` of a node's image, read through FUSE with O_DIRECT by `dd`.
    fn read_image(
        &self,
        node: &TestNode,
        name: &str,
        offset: u64,
        len: u64,
    ) -> anyhow::Result<Vec<u8>> {
        let out = self.dir().join(format!("{name}.read"));
        let bs = BLOCK as u64;
        ensure!(offset % bs == 0 && len % bs == 0, "unaligned read");
        run(
            "timeout",
            &[
                "30",
                "dd",
                &format!("if={}", node.image_path(R).display()),
                &format!("of={}", out.display()),
                &format!("bs={bs}"),
                &format!("skip={}", offset / bs),
                &format!("count={}", len / bs),
                "iflag=direct",
                "status=none",
            ],
        )
        .with_context(|| format!("reading {name}'s image"))?;
        let data = std::fs::read(&out)?;
        ensure!(data.len() as u64 == len, "short read of {name}'s image");
        Ok(data)
    }
}

/// `r0` in `qrbd status --json r0` through the CLI (a list of resources), parsed.
fn status_json(node: &TestNode) -> anyhow::Result<serde_json::Value> {
    let text = node.qrbd_ok(&["status", "--json", R])?;
    let all: serde_json::Value = serde_json::from_str(&text)
        .with_context(|| format!("status --json is not JSON: {text}"))?;
    all.as_array()
        .and_then(|all| all.iter().find(|r| r["name"] == R))
        .cloned()
        .with_context(|| format!("status --json lists no {R}: {text}"))
}

const COUNTERS: [&str; 8] = [
    "concurrent_writes",
    "superseded_writes",
    "retry_writes_asked",
    "superseded_by_peer",
    "resubmitted_writes",
    "conflicts",
    "retries",
    "failed_requests",
];

fn counters(status: &ResourceStatus) -> String {
    format!(
        "concurrent_writes={} superseded_writes={} retry_writes_asked={} superseded_by_peer={} \
         resubmitted_writes={} conflicts={} retries={} failed_requests={}",
        status.concurrent_writes,
        status.superseded_writes,
        status.retry_writes_asked,
        status.superseded_by_peer,
        status.resubmitted_writes,
        status.conflicts,
        status.retries,
        status.failed_requests
    )
}

// ---------------------------------------------------------------------------------------------
// Child processes
// ---------------------------------------------------------------------------------------------

/// This test binary again, as a child under `timeout`, running `child_io` with `args`.
fn spawn_child_io(
    dir: &Path,
    name: &str,
    mode: &str,
    args: &[String],
) -> anyhow::Result<Background> {
    let exe = std::env::current_exe().context("cannot find the test binary")?;
    Background::spawn_in(
        &format!("{name} ({mode})"),
        Command::new("timeout")
            .arg("--foreground")
            .arg(CHILD_LIMIT.as_secs().to_string())
            .arg(exe)
            .args([
                "--exact",
                "child_io",
                "--ignored",
                "--nocapture",
                "--test-threads=1",
            ])
            .env("QRBD_TP_CHILD", mode)
            .env("QRBD_TP_ARGS", args.join(" ")),
        dir,
        name,
    )
}

/// A page-aligned 4 KiB-multiple buffer for O_DIRECT.
struct Aligned {
    raw: Vec<u8>,
    start: usize,
    len: usize,
}

impl Aligned {
    fn new(len: usize) -> Aligned {
        let raw = vec![0u8; len + BLOCK];
        let start = raw.as_ptr().align_offset(BLOCK);
        Aligned { raw, start, len }
    }
    fn buf(&mut self) -> &mut [u8] {
        &mut self.raw[self.start..self.start + self.len]
    }
}

fn open_direct(path: &str, write: bool) -> anyhow::Result<File> {
    std::fs::OpenOptions::new()
        .read(true)
        .write(write)
        .custom_flags(libc::O_DIRECT)
        .open(path)
        .with_context(|| format!("opening {path} O_DIRECT"))
}

/// The pattern of one block: the writer's tag, the write's sequence number and the block's
/// index in the write, the same u64 over the whole block.
fn pattern(tag: u64, write: u64, index: u64) -> u64 {
    (tag << 56) | (write << 8) | index
}

/// hammer IMAGE TAG SEED WRITES FIRST_WRITE: random writes of 1 to 4 blocks into the hot region,
/// O_DIRECT, each block a pattern; then fsync.
fn child_hammer(args: &[&str]) -> anyhow::Result<()> {
    let [image, tag, seed, writes, first] = args else {
        bail!("hammer wants 5 arguments, got {args:?}");
    };
    let (tag, seed, writes, first): (u64, u64, u64, u64) =
        (tag.parse()?, seed.parse()?, writes.parse()?, first.parse()?);
    let file = open_direct(image, true)?;
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut buffer = Aligned::new(4 * BLOCK);
    for write in first..first + writes {
        let start = rng.random_range(0..HOT_BLOCKS);
        let count = rng.random_range(1..=4u64).min(HOT_BLOCKS - start);
        let len = usize::try_from(count)? * BLOCK;
        let buf = &mut buffer.buf()[..len];
        for (index, block) in buf.chunks_mut(BLOCK).enumerate() {
            let value = pattern(tag, write, index as u64).to_le_bytes();
            for word in block.chunks_mut(8) {
                word.copy_from_slice(&value);
            }
        }
        file.write_all_at(buf, start * BLOCK as u64)
            .with_context(|| format!("write {write} of {count} blocks at block {start}"))?;
    }
    file.sync_all().context("fsync")?;
    println!("wrote {writes}");
    Ok(())
}

/// FNV-1a, 64 bits: the records' checksum.
fn checksum(data: &[u8]) -> u64 {
    data.iter().fold(0xcbf2_9ce4_8422_2325, |hash, &byte| {
        (hash ^ u64::from(byte)).wrapping_mul(0x0100_0000_01b3)
    })
}

/// A record: magic, sequence number, writer tag, checksum of the payload, then the payload.
fn make_record(block: &mut [u8], seq: u64, tag: u64, seed: u64) {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed ^ seq.wrapping_mul(0x9e37_79b9_7f4a_7c15));
    rng.fill_bytes(&mut block[32..]);
    let sum = checksum(&block[32..]);
    block[0..8].copy_from_slice(&RECORD_MAGIC.to_le_bytes());
    block[8..16].copy_from_slice(&seq.to_le_bytes());
    block[16..24].copy_from_slice(&tag.to_le_bytes());
    block[24..32].copy_from_slice(&sum.to_le_bytes());
}

/// The record's (sequence number, tag) when it is one and its checksum is valid.
fn parse_record(block: &[u8]) -> Result<(u64, u64), String> {
    let word = |i: usize| u64::from_le_bytes(block[i * 8..i * 8 + 8].try_into().expect("8 bytes"));
    if word(0) != RECORD_MAGIC {
        return Err(format!("no magic (first word {:#018x})", word(0)));
    }
    let sum = checksum(&block[32..]);
    if word(3) != sum {
        return Err(format!(
            "record {} of tag {:#x}: checksum {:#018x}, payload sums to {sum:#018x}",
            word(1),
            word(2),
            word(3)
        ));
    }
    Ok((word(1), word(2)))
}

/// append IMAGE TAG SEED COUNT: finds the end of the log (the first block that is not a valid
/// record, read O_DIRECT from the image), appends `COUNT` records there one O_DIRECT write each,
/// fsyncs, and prints the first and last sequence numbers written.
fn child_append(args: &[&str]) -> anyhow::Result<()> {
    let [image, tag, seed, count] = args else {
        bail!("append wants 4 arguments, got {args:?}");
    };
    let (tag, seed, count): (u64, u64, u64) = (tag.parse()?, seed.parse()?, count.parse()?);
    let file = open_direct(image, true)?;
    let mut buffer = Aligned::new(BLOCK);
    let mut next = 0u64;
    loop {
        file.read_exact_at(buffer.buf(), next * BLOCK as u64)
            .with_context(|| format!("reading block {next}"))?;
        match parse_record(buffer.buf()) {
            Ok((seq, _)) if seq == next => next += 1,
            Ok((seq, _)) => bail!("block {next} holds record {seq}"),
            Err(_) if buffer.buf().iter().all(|&b| b == 0) => break,
            Err(error) => bail!("block {next} is neither a record nor blank: {error}"),
        }
    }
    let first = next;
    for seq in first..first + count {
        make_record(buffer.buf(), seq, tag, seed);
        file.write_all_at(buffer.buf(), seq * BLOCK as u64)
            .with_context(|| format!("writing record {seq}"))?;
    }
    file.sync_all().context("fsync")?;
    // A line of its own: the test harness prints around it.
    println!("\nRANGE {first} {}", first + count - 1);
    Ok(())
}

/// Not a test: the writer child the tests run (see the module comment). Does nothing unless
/// `QRBD_TP_CHILD` is set.
#[test]
#[ignore = "the tests' writer child, run by them"]
fn child_io() -> anyhow::Result<()> {
    let Ok(mode) = std::env::var("QRBD_TP_CHILD") else {
        return Ok(());
    };
    let args = std::env::var("QRBD_TP_ARGS").unwrap_or_default();
    let args: Vec<&str> = args.split_whitespace().collect();
    match mode.as_str() {
        "hammer" => child_hammer(&args),
        "append" => child_append(&args),
        other => bail!("unknown child mode {other}"),
    }
}

// ---------------------------------------------------------------------------------------------
// The hammer: both nodes write the same blocks
// ---------------------------------------------------------------------------------------------

struct Hammered {
    rounds: u64,
    alpha: ResourceStatus,
    beta: ResourceStatus,
}

/// Rounds of `WRITES_PER_ROUND` writes per node, alpha's and beta's at the same time, into the
/// first `HOT_BLOCKS` blocks of their images, until `done` says so (given alpha's status after
/// a round) or `CONFLICT_DEADLINE` passes. Then checks that both images hold the same, intact
/// blocks and that both nodes are still connected.
fn hammer(
    pair: &Pair,
    seed: u64,
    mut done: impl FnMut(&ResourceStatus) -> anyhow::Result<bool>,
) -> anyhow::Result<Hammered> {
    let deadline = Instant::now() + CONFLICT_DEADLINE;
    let mut rounds = 0u64;
    loop {
        let first = rounds * WRITES_PER_ROUND;
        let mut writers = Vec::new();
        for (name, node, tag) in [
            ("alpha", &pair.alpha, ALPHA_TAG),
            ("beta", &pair.beta, BETA_TAG),
        ] {
            let args = [
                node.image_path(R).display().to_string(),
                tag.to_string(),
                (seed ^ tag ^ rounds.wrapping_mul(0x1000_0001)).to_string(),
                WRITES_PER_ROUND.to_string(),
                first.to_string(),
            ];
            writers.push((
                name,
                spawn_child_io(
                    pair.dir(),
                    &format!("{name}-hammer-{rounds}"),
                    "hammer",
                    &args,
                )?,
            ));
        }
        for (name, writer) in &mut writers {
            writer
                .finish(CHILD_LIMIT + REACT)
                .with_context(|| format!("{name}'s writer, round {rounds}, seed {seed}"))
                .with_context(|| pair.logs())?;
        }
        rounds += 1;
        let alpha = pair.alpha.status(R)?;
        if done(&alpha)? {
            break;
        }
        ensure!(
            Instant::now() < deadline,
            "no conflict after {rounds} rounds of {WRITES_PER_ROUND} writes per node to the same \
             {HOT_BLOCKS} blocks (seed {seed}); alpha: {}; beta: {}",
            counters(&alpha),
            counters(&pair.beta.status(R)?)
        );
    }

    pair.wait_quiet()?;
    pair.ensure_connected()?;
    let len = HOT_BLOCKS * BLOCK as u64;
    let a = pair.read_image(&pair.alpha, "alpha", 0, len)?;
    let b = pair.read_image(&pair.beta, "beta", 0, len)?;
    let writes = rounds * WRITES_PER_ROUND;
    let mut differing = Vec::new();
    for (block, (ab, bb)) in a.chunks(BLOCK).zip(b.chunks(BLOCK)).enumerate() {
        if ab != bb {
            differing.push(format!(
                "block {block}: alpha {}, beta {}",
                describe(ab),
                describe(bb)
            ));
        }
    }
    ensure!(
        differing.is_empty(),
        "the images differ after the writers stopped (seed {seed}, {rounds} rounds), {} of \
         {HOT_BLOCKS} blocks:\n{}\n{}",
        differing.len(),
        differing.join("\n"),
        pair.logs()
    );
    for (block, data) in a.chunks(BLOCK).enumerate() {
        check_block(data, writes).with_context(|| format!("block {block} (seed {seed})"))?;
    }
    let alpha = pair.alpha.status(R)?;
    let beta = pair.beta.status(R)?;
    ensure!(
        alpha.failed_requests == 0 && beta.failed_requests == 0,
        "failed requests: alpha {}, beta {}",
        alpha.failed_requests,
        beta.failed_requests
    );
    Ok(Hammered {
        rounds,
        alpha,
        beta,
    })
}

/// A short description of a block: its pattern, or that it is torn.
fn describe(block: &[u8]) -> String {
    let words: Vec<u64> = block
        .chunks(8)
        .map(|w| u64::from_le_bytes(w.try_into().expect("8 bytes")))
        .collect();
    if words.iter().all(|&w| w == words[0]) {
        format!("{:#018x}", words[0])
    } else {
        let mixed: std::collections::BTreeSet<u64> = words.iter().copied().collect();
        format!(
            "torn ({} patterns: {:x?})",
            mixed.len(),
            mixed.iter().take(4).collect::<Vec<_>>()
        )
    }
}

/// A block is blank or holds one writer's complete pattern of a write that was issued.
fn check_block(block: &[u8], writes: u64) -> anyhow::Result<()> {
    let first = u64::from_le_bytes(block[..8].try_into()?);
    ensure!(
        block
            .chunks(8)
            .all(|w| u64::from_le_bytes(w.try_into().expect("8 bytes")) == first),
        "the block is torn: {}",
        describe(block)
    );
    if first == 0 {
        return Ok(());
    }
    let tag = first >> 56;
    let write = (first >> 8) & ((1 << 48) - 1);
    let index = first & 0xff;
    ensure!(
        (tag == ALPHA_TAG || tag == BETA_TAG) && write < writes && index < 4,
        "the block holds {first:#018x}, which no writer wrote"
    );
    Ok(())
}

fn seed() -> u64 {
    let seed = std::env::var("QRBD_TP_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(rand::random::<u64>);
    eprintln!("seed {seed} (QRBD_TP_SEED={seed} repeats it)");
    seed
}

// ---------------------------------------------------------------------------------------------
// Tests
// ---------------------------------------------------------------------------------------------

/// Both primaries write the same 64 blocks at the same time, O_DIRECT. Conflicts happen (alpha,
/// the resolver, counts concurrent writes), nothing fails, nobody disconnects, and afterwards
/// both images are byte-identical, every block one complete write of one writer.
#[test]
fn both_primaries_write_the_same_blocks_and_the_images_end_identical() -> anyhow::Result<()> {
    let pair = Pair::both_primary("qrbd-2p-same-blocks")?;
    let seed = seed();
    let result = hammer(&pair, seed, |alpha| Ok(alpha.concurrent_writes > 0))?;
    eprintln!(
        "{} rounds of {WRITES_PER_ROUND} writes per node",
        result.rounds
    );
    eprintln!("alpha: {}", counters(&result.alpha));
    eprintln!("beta:  {}", counters(&result.beta));
    ensure!(
        result.alpha.concurrent_writes + result.beta.concurrent_writes > 0,
        "no concurrent writes counted"
    );
    // The CLI's JSON carries the same counters.
    for (name, node) in [("alpha", &pair.alpha), ("beta", &pair.beta)] {
        let resource = status_json(node)?;
        ensure!(
            resource["allow_two_primaries"] == true,
            "{name}: status --json lacks allow_two_primaries = true: {resource}"
        );
        for key in COUNTERS {
            ensure!(
                resource[key].is_u64(),
                "{name}: status --json lacks {key}: {resource}"
            );
        }
        eprintln!(
            "{name} status --json: {}",
            COUNTERS
                .iter()
                .map(|k| format!("{k}={}", resource[k]))
                .collect::<Vec<_>>()
                .join(" ")
        );
    }
    ensure!(
        status_json(&pair.alpha)?["concurrent_writes"]
            .as_u64()
            .is_some_and(|n| n > 0),
        "alpha's status --json shows no concurrent writes"
    );
    pair.ensure_connected()
}

/// A log of checksummed 4 KiB records: alpha appends, fsyncs and stops; beta (also Primary the
/// whole time) finds the end of the log in its own image and appends after it. Every record of
/// both is intact, in order, on both images.
#[test]
fn a_writer_hands_over_from_alpha_to_beta_while_both_are_primary() -> anyhow::Result<()> {
    let pair = Pair::both_primary("qrbd-2p-handover")?;
    let seed = seed();
    const ALPHA_RECORDS: u64 = 300;
    const BETA_RECORDS: u64 = 200;
    let mut ranges = Vec::new();
    for (name, node, tag, count) in [
        ("alpha", &pair.alpha, ALPHA_TAG, ALPHA_RECORDS),
        ("beta", &pair.beta, BETA_TAG, BETA_RECORDS),
    ] {
        let args = [
            node.image_path(R).display().to_string(),
            tag.to_string(),
            seed.to_string(),
            count.to_string(),
        ];
        let out = spawn_child_io(pair.dir(), &format!("{name}-append"), "append", &args)?
            .finish(CHILD_LIMIT + REACT)
            .with_context(|| format!("{name}'s appender (seed {seed})"))
            .with_context(|| pair.logs())?;
        let range: Vec<u64> = out
            .lines()
            .rev()
            .find_map(|l| {
                let r: Result<Vec<u64>, _> = l
                    .trim()
                    .strip_prefix("RANGE ")?
                    .split_whitespace()
                    .map(str::parse)
                    .collect();
                r.ok().filter(|r| r.len() == 2)
            })
            .with_context(|| format!("{name}'s appender printed no range: {out}"))?;
        ranges.push((name, range[0], range[1]));
    }
    ensure!(
        ranges
            == [
                ("alpha", 0, ALPHA_RECORDS - 1),
                ("beta", ALPHA_RECORDS, ALPHA_RECORDS + BETA_RECORDS - 1)
            ],
        "beta did not continue right after alpha's last record: {ranges:?}"
    );

    pair.wait_quiet()?;
    let total = ALPHA_RECORDS + BETA_RECORDS;
    // One block more than the log: it must be blank (the log ends there on both).
    let len = (total + 1) * BLOCK as u64;
    let images = [
        ("alpha", pair.read_image(&pair.alpha, "alpha", 0, len)?),
        ("beta", pair.read_image(&pair.beta, "beta", 0, len)?),
    ];
    for (name, image) in &images {
        for (seq, block) in image.chunks(BLOCK).enumerate() {
            let seq = seq as u64;
            if seq == total {
                ensure!(
                    block.iter().all(|&b| b == 0),
                    "{name}: the block after the log is not blank"
                );
                continue;
            }
            let (found, tag) = parse_record(block)
                .map_err(|e| anyhow::anyhow!("{name}: record {seq}: {e} (seed {seed})"))?;
            let expected_tag = if seq < ALPHA_RECORDS {
                ALPHA_TAG
            } else {
                BETA_TAG
            };
            ensure!(
                found == seq && tag == expected_tag,
                "{name}: block {seq} holds record {found} of tag {tag:#x}, expected tag {expected_tag:#x}"
            );
            let mut expected = vec![0u8; BLOCK];
            make_record(&mut expected, seq, tag, seed);
            ensure!(
                block == expected,
                "{name}: record {seq} is not the one written"
            );
        }
    }
    ensure!(images[0].1 == images[1].1, "the images differ");
    pair.ensure_connected()
}

/// While both primaries write the same blocks, `qrbd events` on alpha (the resolver) streams
/// `conflict` lines naming the resource, the peer and the outcome.
#[test]
fn status_and_events_show_conflicts() -> anyhow::Result<()> {
    let pair = Pair::both_primary("qrbd-2p-events")?;
    let seed = seed();
    let mut events = Background::spawn_in(
        "qrbd events (alpha)",
        Command::new(&pair.alpha.binary)
            .arg("--config")
            .arg(&pair.alpha.config_path)
            .arg("events"),
        pair.dir(),
        "alpha-events",
    )?;
    let lines = |events: &Background| -> Vec<String> {
        std::fs::read_to_string(&events.stdout_path)
            .unwrap_or_default()
            .lines()
            .map(str::to_owned)
            .collect()
    };
    wait_until(REACT, "qrbd events to list the current state", || {
        lines(&events)
            .iter()
            .any(|l| l.starts_with("exists"))
            .then_some(())
    })
    .with_context(|| events.stderr())?;

    let conflict_lines = |events: &Background| -> Vec<String> {
        lines(events)
            .into_iter()
            .filter(|l| l.starts_with("conflict "))
            .collect()
    };
    // A conflict counted by alpha must also reach the stream; wait for it after each round.
    let result = hammer(&pair, seed, |alpha| {
        if alpha.concurrent_writes == 0 {
            return Ok(false);
        }
        wait_until(REACT, "a conflict line in alpha's events", || {
            (!conflict_lines(&events).is_empty()).then_some(())
        })
        .with_context(|| format!("alpha: {}; events: {:?}", counters(alpha), lines(&events)))?;
        Ok(true)
    })?;
    let conflicts = conflict_lines(&events);
    eprintln!(
        "{} conflict lines, alpha: {}; first: {:?}",
        conflicts.len(),
        counters(&result.alpha),
        conflicts.first()
    );
    for line in &conflicts {
        ensure!(
            line.contains("name:r0")
                && line.contains("peer-node-id:1")
                && line.contains("conn-name:beta")
                && (line.contains("write:superseded") || line.contains("write:retry")),
            "unexpected conflict line {line:?}"
        );
    }
    ensure!(events.running(), "qrbd events ended: {}", events.stderr());
    pair.ensure_connected()
}
