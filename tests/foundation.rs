//! Foundation integration tests: one node, real FUSE mount, real sled metadata and backing
//! files, real loop devices and ext4. They need root, /dev/fuse, losetup, mkfs.ext4 and e2fsck.
//!
//! Every test runs in a scratch directory of its own with its own daemon; guards clean up
//! (daemon, mounts, loop devices, files) also when an assertion fails half-way. Waiting is
//! always on a condition with a deadline, never a guessed sleep.

mod common;

use std::fs::{File, OpenOptions};
use std::os::unix::fs::{FileExt, PermissionsExt};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{mpsc, Arc};
use std::time::Duration;

use anyhow::{anyhow, ensure, Context};
use common::*;
use qrbd::admin::AdminRequest;
use qrbd_actors::core::Role;

const PUNCH: libc::c_int = libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE;
const ZERO_RANGE: libc::c_int = libc::FALLOC_FL_ZERO_RANGE | libc::FALLOC_FL_KEEP_SIZE;

/// Writes `data` at `offset` both to the image and to the in-memory model.
fn write_both(file: &File, model: &mut [u8], offset: u64, data: &[u8]) -> anyhow::Result<()> {
    file.write_all_at(data, offset)
        .with_context(|| format!("writing {} bytes at {offset}", data.len()))?;
    let start = usize::try_from(offset)?;
    model[start..start + data.len()].copy_from_slice(data);
    Ok(())
}

fn zero_model(model: &mut [u8], offset: u64, len: u64) -> anyhow::Result<()> {
    let start = usize::try_from(offset)?;
    let end = start + usize::try_from(len)?;
    model[start..end].fill(0);
    Ok(())
}

fn read_whole(file: &File, size: u64) -> anyhow::Result<Vec<u8>> {
    read_at(file, 0, usize::try_from(size)?)
}

/// Foundation 1: raw reads and writes, discards, and the refusals of a fixed-size image
/// directory.
#[test]
fn raw_image_round_trip() -> anyhow::Result<()> {
    let size = 64 * MIB;
    let node = Node::start("qrbd-raw", "64MiB")?;
    node.qrbd_ok(&["primary", "r0"])?;
    let image = node.image();

    ensure!(
        list_dir(&node.mount_dir)? == ["r0.img"],
        "readdir of the mount: {:?}",
        list_dir(&node.mount_dir)?
    );
    let len = std::fs::metadata(&image)?.len();
    ensure!(len == size, "image is {len} bytes, configured {size}");

    let file = OpenOptions::new().read(true).write(true).open(&image)?;
    let mut model = vec![0u8; usize::try_from(size)?];
    ensure_same(&read_whole(&file, size)?, &model, "a fresh image")?;

    // Aligned, unaligned, block-straddling, large, and at both ends; later writes overlap
    // earlier ones, so the order of the model's updates matters as it does on the disk.
    let writes: &[(u64, usize)] = &[
        (4097, 3 * MIB as usize),
        (0, 1),
        (12_345, 1),
        (513, 511),
        (3 * 4096 + 7, 511),
        (5 * 4096 - 100, 300),
        (2 * MIB + 4095, 8193),
        (10 * MIB + 1, 511),
        (size - 4096, 4096),
        (size - 1, 1),
        (size - 511 - 3, 511),
    ];
    for (seed, (offset, len)) in writes.iter().enumerate() {
        write_both(&file, &mut model, *offset, &pattern(seed as u64 + 1, *len))?;
    }
    file.sync_data().context("fsync of the image")?;
    ensure_same(&read_whole(&file, size)?, &model, "after the writes")?;
    // Small unaligned reads see the same bytes as the whole-image read.
    for (offset, len) in [(1u64, 1usize), (4095, 2), (4097 + 3 * MIB - 5, 10)] {
        let start = usize::try_from(offset)?;
        ensure_same(
            &read_at(&file, offset, len)?,
            &model[start..start + len],
            &format!("read of {len} bytes at {offset}"),
        )?;
    }

    // Punching a hole frees backing space and reads back zeros.
    let hole = (16 * MIB, 4 * MIB);
    write_both(&file, &mut model, hole.0, &pattern(100, hole.1 as usize))?;
    file.sync_data()?;
    let backing = node.backing_path("r0");
    let before = allocated_bytes(&backing)?;
    fallocate(&file, PUNCH, hole.0, hole.1).context("punching a hole")?;
    zero_model(&mut model, hole.0, hole.1)?;
    let after = allocated_bytes(&backing)?;
    ensure!(
        after + hole.1 <= before,
        "punching {} bytes left the backing file at {after} allocated bytes (was {before})",
        hole.1
    );
    // An unaligned hole inside written data, and a zeroed range across the big write.
    fallocate(&file, PUNCH, 4097 + 100_000, 10_000).context("unaligned punch")?;
    zero_model(&mut model, 4097 + 100_000, 10_000)?;
    fallocate(&file, ZERO_RANGE, 2 * MIB + 100, 300_000).context("zero range")?;
    zero_model(&mut model, 2 * MIB + 100, 300_000)?;
    file.sync_data()?;
    ensure_same(&read_whole(&file, size)?, &model, "after the discards")?;

    // Nothing past the end: straddling or wholly beyond, the image is untouched.
    ensure_errno(
        file.write_at(&[0xAA; 20], size - 10),
        libc::ENOSPC,
        "a write straddling the end",
    )?;
    ensure_errno(
        file.write_at(&[0xAA; 1], size),
        libc::ENOSPC,
        "a write at the end",
    )?;
    ensure_errno(
        file.write_at(&[0xAA; 4096], size + MIB),
        libc::ENOSPC,
        "a write beyond the end",
    )?;
    let tail = usize::try_from(size - 8192)?;
    ensure_same(
        &read_at(&file, size - 8192, 8192)?,
        &model[tail..],
        "the last 8 KiB after the refused writes",
    )?;

    // A disk image has the size the configuration gives it.
    ensure_errno(file.set_len(size + 4096), libc::EPERM, "growing the image")?;
    ensure_errno(file.set_len(size / 2), libc::EPERM, "shrinking the image")?;
    ensure!(std::fs::metadata(&image)?.len() == size, "size changed");

    // The directory is fixed: no new files, no unlink, rename, chmod or mkdir.
    let stranger = node.mount_dir.join("new.img");
    ensure_errno(
        OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&stranger),
        libc::EPERM,
        "creating a file in the mount directory",
    )?;
    ensure_errno(std::fs::remove_file(&image), libc::EPERM, "unlink")?;
    ensure_errno(
        std::fs::rename(&image, node.mount_dir.join("moved.img")),
        libc::EPERM,
        "rename",
    )?;
    ensure_errno(
        std::fs::set_permissions(&image, std::fs::Permissions::from_mode(0o666)),
        libc::EPERM,
        "chmod",
    )?;
    ensure_errno(
        std::fs::create_dir(node.mount_dir.join("sub")),
        libc::EPERM,
        "mkdir",
    )?;
    ensure!(
        list_dir(&node.mount_dir)? == ["r0.img"],
        "the mount directory changed: {:?}",
        list_dir(&node.mount_dir)?
    );

    // A fresh handle sees the same data (nothing was served from a per-handle cache).
    drop(file);
    let reader = File::open(&image)?;
    ensure_same(&read_whole(&reader, size)?, &model, "through a new handle")?;
    Ok(())
}

/// Foundation 2: ext4 on a loop device over the image: mkfs, files, a clean fsck, contents
/// after remount.
#[test]
fn ext4_on_loop_device() -> anyhow::Result<()> {
    let node = Node::start("qrbd-ext4", "128MiB")?;
    node.qrbd_ok(&["primary", "r0"])?;
    let loop_device = LoopDevice::attach(&node.image())?;
    run("mkfs.ext4", &["-q", "-F", &loop_device.device])?;

    let target = node.dir().join("mnt");
    let mounted = Mounted::mount(&loop_device.device, &target)?;
    std::fs::create_dir(target.join("dir"))?;
    let files: Vec<(&str, usize)> = vec![
        ("a.bin", (5 * MIB + 123) as usize),
        ("b.bin", MIB as usize),
        ("dir/c.bin", (12 * MIB + 4095) as usize),
        ("dir/d.bin", 3 * MIB as usize),
        ("small.txt", 17),
    ];
    let mut sums = Vec::new();
    for (seed, (name, len)) in files.iter().enumerate() {
        let data = pattern(1000 + seed as u64, *len);
        let path = target.join(name);
        std::fs::write(&path, &data).with_context(|| format!("writing {name}"))?;
        File::open(&path)?.sync_all()?;
        sums.push(checksum(&data));
    }
    mounted.unmount()?;

    let fsck = run("e2fsck", &["-fn", &loop_device.device]).context("e2fsck -fn")?;
    ensure!(!fsck.contains("UNEXPECTED"), "e2fsck: {fsck}");

    let mounted = Mounted::mount(&loop_device.device, &target)?;
    for ((name, len), sum) in files.iter().zip(&sums) {
        let data = std::fs::read(target.join(name)).with_context(|| format!("reading {name}"))?;
        ensure!(
            data.len() == *len,
            "{name}: {} bytes, wrote {len}",
            data.len()
        );
        ensure!(
            checksum(&data) == *sum,
            "{name}: contents differ after remount"
        );
    }
    mounted.unmount()?;
    loop_device.detach()?;

    let status = node.status("r0")?;
    ensure!(
        status.written_bytes >= 21 * MIB && status.failed_requests == 0,
        "status after the ext4 run: {status:?}"
    );
    Ok(())
}

/// Foundation 3: data survives an orderly restart (SIGTERM, exit 0) and a crash (kill -9)
/// after fsync.
#[test]
fn data_survives_restart_and_crash() -> anyhow::Result<()> {
    let mut node = Node::start("qrbd-restart", "64MiB")?;
    let generation = node.status("r0")?.current_uuid;
    node.qrbd_ok(&["primary", "r0"])?;
    let image = node.image();

    let first = pattern(7, (2 * MIB + 333) as usize);
    let first_at = MIB + 17;
    {
        let file = OpenOptions::new().read(true).write(true).open(&image)?;
        file.write_all_at(&first, first_at)?;
        file.sync_data()?;
    }

    // Orderly stop: exit status 0, the mount is gone.
    let exit = node.stop_daemon()?;
    ensure!(
        exit.success(),
        "SIGTERM: daemon exited with {exit}; log:\n{}",
        node.log()
    );
    ensure!(!image.exists(), "the image is still visible after the stop");

    node.start_daemon()?;
    node.wait_for_image()?;
    let status = node.status("r0")?;
    ensure!(
        status.role == Role::Secondary,
        "after restart: role {:?}",
        status.role
    );
    ensure!(
        status.current_uuid == generation,
        "after restart: generation {} (was {generation})",
        status.current_uuid
    );
    node.qrbd_ok(&["primary", "r0"])?;
    let file = OpenOptions::new().read(true).write(true).open(&image)?;
    ensure_same(
        &read_at(&file, first_at, first.len())?,
        &first,
        "after SIGTERM",
    )?;

    // Crash: write, fsync, kill -9 with the image still open.
    let second = pattern(8, (MIB + 4095) as usize);
    let second_at = 40 * MIB + 1;
    file.write_all_at(&second, second_at)?;
    file.sync_data()?;
    node.kill_daemon()?;
    drop(file);
    // The dead mount is left behind; the next daemon must clear it itself.
    let stale = std::fs::metadata(&node.mount_dir)
        .err()
        .and_then(|e| e.raw_os_error());
    ensure!(
        stale == Some(libc::ENOTCONN),
        "expected a dead mount after kill -9, stat gave {stale:?}"
    );

    node.start_daemon()?;
    node.wait_for_image()?;
    let status = node.status("r0")?;
    ensure!(
        status.role == Role::Secondary,
        "after crash: role {:?}",
        status.role
    );
    ensure!(
        status.current_uuid == generation,
        "after crash: generation {} (was {generation})",
        status.current_uuid
    );
    node.qrbd_ok(&["primary", "r0"])?;
    let file = File::open(&image)?;
    ensure_same(
        &read_at(&file, second_at, second.len())?,
        &second,
        "after kill -9",
    )?;
    ensure_same(
        &read_at(&file, first_at, first.len())?,
        &first,
        "the older data after kill -9",
    )?;
    Ok(())
}

fn write_config(node: &Node, name: &str, text: &str) -> anyhow::Result<std::path::PathBuf> {
    let path = node.dir().join(name);
    std::fs::write(&path, text)?;
    Ok(path)
}

fn check_config_fails(path: &std::path::Path, words: &[&str]) -> anyhow::Result<()> {
    let output = std::process::Command::new(binary())
        .arg("--config")
        .arg(path)
        .arg("check-config")
        .output()?;
    let what = format!("check-config {}", path.display());
    let stderr = expect_failure(&output, &what)?;
    ensure_mentions(&stderr, words, &what)?;
    // Every message names the file it is about.
    ensure_mentions(&stderr, &[&path.to_string_lossy()], &what)
}

/// Foundation 4: configuration errors, a missing daemon, and create-md's refusal to overwrite
/// metadata.
#[test]
fn bad_config_missing_daemon_and_create_md() -> anyhow::Result<()> {
    let node = Node::configured("qrbd-config", "64MiB")?;
    let head = "[node]\nname = \"alpha\"\nid = 0\n";

    let bad_size = write_config(
        &node,
        "bad-size.toml",
        &format!("{head}[[resource]]\nname = \"r0\"\nsize = \"12345\"\n"),
    )?;
    check_config_fails(&bad_size, &["size", "12345", "multiple of 4096"])?;
    let bad_unit = write_config(
        &node,
        "bad-unit.toml",
        &format!("{head}[[resource]]\nname = \"r0\"\nsize = \"64MB\"\n"),
    )?;
    check_config_fails(&bad_unit, &["size", "unknown unit", "MB"])?;
    let unknown_key = write_config(
        &node,
        "unknown-key.toml",
        &format!("{head}[[resource]]\nname = \"r0\"\nsize = \"64MiB\"\nprotocoll = \"C\"\n"),
    )?;
    check_config_fails(&unknown_key, &["unknown key", "protocoll", "protocol"])?;
    let duplicate = write_config(
        &node,
        "duplicate.toml",
        &format!(
            "{head}[[resource]]\nname = \"r0\"\nsize = \"64MiB\"\n\
             [[resource]]\nname = \"r0\"\nsize = \"128MiB\"\n"
        ),
    )?;
    check_config_fails(&duplicate, &["r0", "defined twice"])?;
    let bad_id = write_config(
        &node,
        "bad-id.toml",
        "[node]\nname = \"alpha\"\nid = 40\n[[resource]]\nname = \"r0\"\nsize = \"64MiB\"\n",
    )?;
    check_config_fails(&bad_id, &["id 40", "out of range"])?;
    let two_primaries_a = write_config(
        &node,
        "two-primaries-a.toml",
        &format!(
            "{head}[[resource]]\nname = \"r0\"\nsize = \"64MiB\"\nprotocol = \"A\"\n\
             allow_two_primaries = true\n"
        ),
    )?;
    check_config_fails(
        &two_primaries_a,
        &[
            "resource \"r0\"",
            "allow_two_primaries",
            "protocol \"C\"",
            "write acknowledgement",
        ],
    )?;

    let summary = node.qrbd_ok(&["check-config"])?;
    ensure_mentions(&summary, &["valid", "r0"], "check-config of a good file")?;

    // No daemon: the CLI says where it looked and what is missing.
    let stderr = node.qrbd_fails(&["status"])?;
    ensure_mentions(
        &stderr,
        &[&node.socket.to_string_lossy(), "daemon"],
        "status without a daemon",
    )?;

    // create-md refuses to replace metadata without --force; --force keeps the data.
    let first = node.qrbd_ok(&["create-md", "r0"])?;
    let marker = b"data written before create-md --force";
    let backing = node.backing_path("r0");
    OpenOptions::new()
        .write(true)
        .open(&backing)?
        .write_all_at(marker, 8192)?;
    let stderr = node.qrbd_fails(&["create-md", "r0"])?;
    ensure_mentions(
        &stderr,
        &["already has metadata", "--force"],
        "second create-md",
    )?;
    let forced = node.qrbd_ok(&["create-md", "r0", "--force"])?;
    let generation = |text: &str| {
        text.split("generation ").nth(1).map(|rest| {
            rest.chars()
                .take_while(char::is_ascii_hexdigit)
                .collect::<String>()
        })
    };
    let (old, new) = (generation(&first), generation(&forced));
    ensure!(
        old.is_some() && new.is_some() && old != new,
        "create-md --force should start a new generation: {first:?} then {forced:?}"
    );
    let kept = read_at(&File::open(&backing)?, 8192, marker.len())?;
    ensure!(kept == marker, "create-md --force lost the data");
    Ok(())
}

/// Foundation 5: suspend-io holds new writes (status keeps answering) until resume-io releases
/// them.
///
/// While I/O is suspended this process holds the image open, so it spawns no process then (see
/// `PreparedCommand`): it polls status and resumes over the admin socket, and times a real
/// `qrbd status` that was started before the image was opened.
#[test]
fn suspend_io_holds_writes_until_resume() -> anyhow::Result<()> {
    let node = Node::start("qrbd-suspend", "64MiB")?;
    node.qrbd_ok(&["primary", "r0"])?;
    let image = node.image();
    let config = node.config_path.clone();
    let status_cli = PreparedCommand::new(
        &binary(),
        &[
            "--config".as_ref(),
            config.as_os_str(),
            "status".as_ref(),
            "r0".as_ref(),
            "--json".as_ref(),
        ],
    )?;

    // A background writer: 64 KiB writes in the first MiB, fsync every fourth.
    let stop = Arc::new(AtomicBool::new(false));
    let done = Arc::new(AtomicU64::new(0));
    let writer = {
        let file = OpenOptions::new().read(true).write(true).open(&image)?;
        let (stop, done) = (stop.clone(), done.clone());
        std::thread::spawn(move || -> std::io::Result<()> {
            let mut i = 0u64;
            while !stop.load(Ordering::Relaxed) {
                file.write_all_at(&pattern(i, 64 * 1024), (i % 16) * 64 * 1024)?;
                if i % 4 == 3 {
                    file.sync_data()?;
                }
                i += 1;
                done.store(i, Ordering::Relaxed);
            }
            Ok(())
        })
    };
    wait_until(REACT, "the background writer to get going", || {
        (done.load(Ordering::Relaxed) >= 8).then_some(())
    })?;

    // Spawned while nothing is suspended yet, so safe to run as a process.
    node.qrbd_ok(&["suspend-io", "r0"])?;
    let _resume = ResumeOnDrop(&node.node);
    wait_for_status(&node, "status to show suspended", |s| s.suspended)?;

    // A write issued after the suspension, from its own thread.
    let late = pattern(99, 4096);
    let late_at = 8 * MIB;
    let (tx, rx) = mpsc::channel();
    let late_writer = {
        let file = OpenOptions::new().read(true).write(true).open(&image)?;
        let late = late.clone();
        std::thread::spawn(move || {
            // Fails only if the test already failed and dropped the receiver.
            let _ = tx.send(file.write_all_at(&late, late_at));
        })
    };
    // A read from a third thread: unlike the write it cannot queue in the kernel behind an
    // fsync of the writer (which takes the inode lock), so it reaches the daemon and is held;
    // that shows the device itself is suspended.
    let (read_tx, read_rx) = mpsc::channel();
    let probe = {
        let file = File::open(&image)?;
        std::thread::spawn(move || {
            // As above.
            let _ = read_tx.send(read_at(&file, 32 * MIB, 4096));
        })
    };
    let held = wait_for_status(&node, "a request to be held", |s| s.app_held >= 1)?;
    ensure!(held.suspended, "held requests but not suspended: {held:?}");
    // From here nothing completes. The writer may still record one operation that completed
    // just before the suspension.
    let stuck_at = done.load(Ordering::Relaxed);
    ensure!(
        matches!(
            rx.recv_timeout(Duration::from_millis(300)),
            Err(mpsc::RecvTimeoutError::Timeout)
        ),
        "a write issued while suspended completed"
    );

    // `qrbd status` answers while application I/O is held.
    let (output, took) = status_cli
        .run(Duration::from_secs(30))
        .context("qrbd status while I/O is suspended")?;
    ensure!(
        output.status.success(),
        "qrbd status while suspended failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    ensure!(
        took < Duration::from_secs(5),
        "qrbd status took {took:?} while I/O is suspended"
    );
    let listed: Vec<ResourceStatus> = serde_json::from_slice(&output.stdout)?;
    ensure!(
        listed.len() == 1 && listed[0].suspended && listed[0].app_held >= 1,
        "qrbd status while suspended: {listed:?}"
    );
    ensure!(
        done.load(Ordering::Relaxed) <= stuck_at + 1,
        "the background writer made progress while suspended"
    );
    // Empty, not disconnected: a thread that died without an answer is no "still held".
    ensure!(
        matches!(rx.try_recv(), Err(mpsc::TryRecvError::Empty))
            && matches!(read_rx.try_recv(), Err(mpsc::TryRecvError::Empty)),
        "a request issued while suspended completed (or its thread died)"
    );

    socket_request(
        &node,
        AdminRequest::ResumeIo {
            resource: "r0".into(),
        },
    )?;
    let result = rx
        .recv_timeout(REACT)
        .context("the held write did not complete after resume-io")?;
    result.context("the held write failed")?;
    late_writer
        .join()
        .map_err(|_| anyhow!("the late writer panicked"))?;
    let read = read_rx
        .recv_timeout(REACT)
        .context("the held read did not complete after resume-io")?
        .context("the held read failed")?;
    ensure!(read.iter().all(|b| *b == 0), "the held read saw data");
    probe.join().map_err(|_| anyhow!("the reader panicked"))?;
    wait_until(REACT, "the background writer to continue", || {
        (done.load(Ordering::Relaxed) > stuck_at + 4).then_some(())
    })?;
    stop.store(true, Ordering::Relaxed);
    writer
        .join()
        .map_err(|_| anyhow!("the background writer panicked"))?
        .context("the background writer failed")?;

    let status = wait_for_status(&node, "the device to be idle and resumed", |s| {
        !s.suspended && s.app_held == 0 && s.app_in_flight == 0
    })?;
    ensure!(status.failed_requests == 0, "failed requests: {status:?}");
    let file = File::open(&image)?;
    ensure_same(
        &read_at(&file, late_at, late.len())?,
        &late,
        "the write held by suspend-io",
    )?;
    Ok(())
}

/// Closing a descriptor of the image must not wait for suspended I/O: close(2) promises no
/// durability, and a process that holds the image open could otherwise not even spawn a
/// child (exec closes inherited descriptors) until resume-io.
#[test]
fn close_is_not_held_by_suspend_io() -> anyhow::Result<()> {
    let node = Node::start("qrbd-close", "64MiB")?;
    node.qrbd_ok(&["primary", "r0"])?;
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .open(node.image())?;
    file.write_all_at(&pattern(1, 4096), 0)?;
    let copy = file.try_clone()?;
    socket_request(
        &node,
        AdminRequest::SuspendIo {
            resource: "r0".into(),
        },
    )?;
    let _resume = ResumeOnDrop(&node.node);
    wait_for_status(&node, "status to show suspended", |s| s.suspended)?;
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        drop(copy);
        // Fails only if the test already stopped waiting.
        let _ = tx.send(());
    });
    let closed = rx.recv_timeout(Duration::from_secs(5));
    // Release the close (if held) before judging, so nothing stays stuck.
    socket_request(
        &node,
        AdminRequest::ResumeIo {
            resource: "r0".into(),
        },
    )?;
    ensure!(
        closed.is_ok(),
        "close(2) of the image blocked while I/O was suspended"
    );
    Ok(())
}

/// Foundation 6: roles and the image. Secondary is read-only; secondary and down refuse while
/// the image is open; down removes the image and up brings it back.
#[test]
fn secondary_refuses_writes_and_down_up() -> anyhow::Result<()> {
    let node = Node::start("qrbd-roles", "64MiB")?;
    let image = node.image();
    let open_rw = || OpenOptions::new().read(true).write(true).open(&image);

    // Secondary: read-only.
    ensure_errno(
        open_rw(),
        libc::EROFS,
        "opening a Secondary's image for writing",
    )?;
    let reader = File::open(&image).context("read-only open of a Secondary's image")?;
    ensure!(
        read_at(&reader, 0, 4096)?.iter().all(|b| *b == 0),
        "fresh image is not zero"
    );
    drop(reader);

    // Primary, held open for writing: secondary is refused.
    node.qrbd_ok(&["primary", "r0"])?;
    let writer = open_rw().context("opening the Primary's image for writing")?;
    let data = pattern(5, 4096);
    writer.write_all_at(&data, 4096)?;
    let stderr = node.qrbd_fails(&["secondary", "r0"])?;
    ensure_mentions(&stderr, &["open"], "secondary while open for writing")?;
    ensure!(
        node.status("r0")?.role == Role::Primary,
        "role changed although secondary was refused"
    );
    drop(writer);

    // Closed: secondary works and writing is refused again; reading still works.
    wait_for_status(&node, "the writer to be released", |s| s.open_writers == 0)?;
    node.qrbd_ok(&["secondary", "r0"])?;
    let status = node.status("r0")?;
    ensure!(
        status.role == Role::Secondary,
        "role after secondary: {:?}",
        status.role
    );
    ensure_errno(
        open_rw(),
        libc::EROFS,
        "opening for writing after secondary",
    )?;

    // down is refused while the image is open, even read-only.
    let reader = File::open(&image)?;
    ensure_same(
        &read_at(&reader, 4096, 4096)?,
        &data,
        "data after secondary",
    )?;
    let stderr = node.qrbd_fails(&["down", "r0"])?;
    ensure_mentions(&stderr, &["open"], "down while open")?;
    ensure!(
        list_dir(&node.mount_dir)? == ["r0.img"],
        "the image went away although down was refused"
    );
    drop(reader);

    wait_for_status(&node, "the reader to be released", |s| s.open_readers == 0)?;
    node.qrbd_ok(&["down", "r0"])?;
    ensure!(
        list_dir(&node.mount_dir)?.is_empty(),
        "readdir after down: {:?}",
        list_dir(&node.mount_dir)?
    );
    // The kernel may remember the name for the attribute timeout; wait for it to lapse.
    wait_until(REACT, "the image to disappear", || {
        (!image.exists()).then_some(())
    })?;
    let stderr = node.qrbd_fails(&["status", "r0"])?;
    ensure_mentions(&stderr, &["not up"], "status of a resource that is down")?;

    node.qrbd_ok(&["up", "r0"])?;
    node.wait_for_image()?;
    let status = node.status("r0")?;
    ensure!(
        status.role == Role::Secondary,
        "role after up: {:?}",
        status.role
    );
    ensure_same(
        &read_at(&File::open(&image)?, 4096, 4096)?,
        &data,
        "data after down and up",
    )?;
    Ok(())
}

/// One resource's held I/O must not freeze another's. With r0 suspended and more writers piled
/// on it than the node's whole buffer budget holds, r1's image still serves a write and a read;
/// after resume-io every r0 writer finishes and its data is there.
///
/// The writers outnumber what the node's budget holds by more than the two FUSE session threads,
/// so a front end that took buffers from one pool for the whole node, or let a session thread
/// wait for r0's budget, would leave both session threads waiting and r1 unanswered.
#[test]
fn suspended_resource_does_not_freeze_another() -> anyhow::Result<()> {
    // One 1 MiB write is one FUSE request (max_write), holding one 1 MiB buffer.
    const CHUNK: usize = MIB as usize;
    let node = Node::start_with("qrbd-budget", &[("r0", "64MiB"), ("r1", "64MiB")], "16MiB")?;
    node.qrbd_ok(&["primary", "r0"])?;
    node.qrbd_ok(&["primary", "r1"])?;
    let config = qrbd::config::load(&node.config_path)?;
    let r0_budget_requests = usize::try_from(config.image_buffer_budget())? / CHUNK;
    let writers = usize::try_from(config.node.buffer_budget)? / CHUNK + 8;
    ensure!(
        u64::try_from(writers * CHUNK)? <= 64 * MIB,
        "{writers} writers of 1 MiB do not fit in r0"
    );

    // Every open happens before the suspension: the test spawns nothing while r0 is suspended
    // (see `PreparedCommand`). The images are direct I/O (FOPEN_DIRECT_IO), so each write goes
    // to the daemon as it is.
    let r0 = Arc::new(
        OpenOptions::new()
            .read(true)
            .write(true)
            .open(node.image_path("r0"))?,
    );
    let r1 = OpenOptions::new()
        .read(true)
        .write(true)
        .open(node.image_path("r1"))?;

    // Data no writer touches, for reads that will queue behind the writers.
    let known = pattern(600, CHUNK);
    let known_at = 63 * MIB;
    r0.write_all_at(&known, known_at)?;

    socket_request(
        &node,
        AdminRequest::SuspendIo {
            resource: "r0".into(),
        },
    )?;
    let _resume = ResumeOnDrop(&node.node);
    wait_for_status(&node, "r0 to be suspended", |s| s.suspended)?;

    let issued = Arc::new(AtomicU64::new(0));
    let (done_tx, done_rx) = mpsc::channel();
    let mut threads = Vec::with_capacity(writers);
    for i in 0..writers {
        let (file, issued, done_tx) = (r0.clone(), issued.clone(), done_tx.clone());
        threads.push(std::thread::spawn(move || {
            let data = pattern(500 + i as u64, CHUNK);
            issued.fetch_add(1, Ordering::SeqCst);
            let _ = done_tx.send((i, file.write_all_at(&data, (i * CHUNK) as u64)));
        }));
    }
    drop(done_tx);
    let all_issued = writers as u64;
    wait_until(REACT, "every r0 writer to issue its write", || {
        (issued.load(Ordering::SeqCst) == all_issued).then_some(())
    })?;
    // r0 holds as many writes as its budget has buffers for; the rest wait for buffers.
    let held = wait_for_status(&node, "r0 to hold a budget's worth of writes", |s| {
        s.suspended && s.app_held >= r0_budget_requests as u64
    })?;
    ensure!(
        done_rx.try_recv().is_err(),
        "an r0 write completed while r0 was suspended: {held:?}"
    );
    // Reads of r0 now find its budget spent too; they wait without a buffer.
    let (read_tx, read_rx) = mpsc::channel();
    for _ in 0..2 {
        let (file, read_tx) = (r0.clone(), read_tx.clone());
        std::thread::spawn(move || {
            let _ = read_tx.send(read_at(&file, known_at, CHUNK));
        });
    }
    drop(read_tx);

    // r1 serves a write and reads it back, from its own thread so that a freeze is a timeout
    // here rather than a hung test.
    let r1_data = pattern(77, CHUNK);
    let r1_at = 5 * MIB;
    let (r1_tx, r1_rx) = mpsc::channel();
    {
        let r1_data = r1_data.clone();
        std::thread::spawn(move || {
            let result = r1.write_all_at(&r1_data, r1_at).and_then(|()| {
                let mut back = vec![0u8; r1_data.len()];
                r1.read_exact_at(&mut back, r1_at).map(|()| back)
            });
            let _ = r1_tx.send(result);
        });
    }
    let back = r1_rx
        .recv_timeout(REACT)
        .map_err(|_| {
            anyhow!(
                "r1's image did not serve a write and a read within {REACT:?} while r0 was \
                 suspended with {writers} writers on it"
            )
        })?
        .context("r1 I/O while r0 is suspended")?;
    ensure_same(&back, &r1_data, "r1 read back while r0 is suspended")?;
    let still = socket_status(&node)?;
    ensure!(
        still.suspended && done_rx.try_recv().is_err() && read_rx.try_recv().is_err(),
        "r0 let a request through while suspended: {still:?}"
    );

    socket_request(
        &node,
        AdminRequest::ResumeIo {
            resource: "r0".into(),
        },
    )?;
    let mut finished = vec![false; writers];
    for _ in 0..writers {
        let (i, result) = done_rx
            .recv_timeout(REACT)
            .context("an r0 writer did not finish after resume-io")?;
        result.with_context(|| format!("r0 writer {i}"))?;
        finished[i] = true;
    }
    ensure!(
        finished.iter().all(|f| *f),
        "r0 writers missing: {finished:?}"
    );
    for _ in 0..2 {
        let read = read_rx
            .recv_timeout(REACT)
            .context("an r0 read did not finish after resume-io")??;
        ensure_same(&read, &known, "an r0 read held while suspended")?;
    }
    for thread in threads {
        thread
            .join()
            .map_err(|_| anyhow!("an r0 writer panicked"))?;
    }
    let status = wait_for_status(&node, "r0 to be resumed and idle", |s| {
        !s.suspended && s.app_held == 0 && s.app_in_flight == 0
    })?;
    ensure!(status.failed_requests == 0, "failed requests: {status:?}");
    for i in 0..writers {
        ensure_same(
            &read_at(&r0, (i * CHUNK) as u64, CHUNK)?,
            &pattern(500 + i as u64, CHUNK),
            &format!("r0 writer {i}'s data"),
        )?;
    }
    Ok(())
}
