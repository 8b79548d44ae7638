//! `qrbd demo`: the main job on two temporary nodes on 127.0.0.1: a file system written on one,
//! replicated, and found on the other after a failover. Everything is cleaned up afterwards.

use std::time::Duration;

use anyhow::{ensure, Context};

use crate::status_text;
use crate::testbed::{
    make_pair, run, wait_until, LoopDevice, Mounted, PairSpec, ScratchDir, TestNode,
};

fn step(text: &str) {
    println!("==> {text}");
}

fn wait_connected(node: &TestNode, resource: &str) -> anyhow::Result<()> {
    wait_until(Duration::from_secs(30), "the peers to connect", || {
        node.status(resource)
            .ok()
            .filter(|s| s.peers.iter().all(|p| p.connection == "Connected"))
    })
    .map(|_| ())
}

/// The SHA-256-free way to compare two files: byte by byte, in chunks.
pub fn files_identical(a: &std::path::Path, b: &std::path::Path) -> anyhow::Result<bool> {
    use std::io::Read;
    let mut fa = std::fs::File::open(a).with_context(|| format!("open {}", a.display()))?;
    let mut fb = std::fs::File::open(b).with_context(|| format!("open {}", b.display()))?;
    let (mut ba, mut bb) = (vec![0u8; 1 << 20], vec![0u8; 1 << 20]);
    loop {
        let na = fa.read(&mut ba)?;
        let mut filled = 0;
        while filled < na {
            let n = fb.read(&mut bb[filled..na])?;
            if n == 0 {
                return Ok(false);
            }
            filled += n;
        }
        if na == 0 {
            return Ok(fb.read(&mut bb[..1])? == 0);
        }
        if ba[..na] != bb[..na] {
            return Ok(false);
        }
    }
}

pub fn run_demo(size: &str) -> anyhow::Result<()> {
    let binary = std::env::current_exe().context("cannot find the qrbd binary")?;
    let scratch = ScratchDir::new("qrbd-demo")?;
    step(&format!(
        "two nodes on 127.0.0.1 in {}",
        scratch.path().display()
    ));
    let (mut alpha, mut beta, _) =
        make_pair(&binary, scratch.path(), &PairSpec::new("r0", size, "C"))?;
    println!(
        "    certificates from `qrbd gen-cert` in {}",
        scratch.path().join("tls").display()
    );
    for node in [&alpha, &beta] {
        node.qrbd_ok(&["create-md", "r0"])?;
    }
    step("qrbd daemon on alpha and beta (FUSE mounts, QUIC with mutual TLS)");
    alpha.start_daemon()?;
    beta.start_daemon()?;
    wait_connected(&alpha, "r0")?;
    step("alpha: qrbd new-current-uuid --clear-bitmap r0 (two new, blank disks: no initial sync)");
    crate::testbed::skip_initial_sync(&[&alpha, &beta], "r0")?;
    step("alpha: qrbd primary r0");
    alpha.qrbd_ok(&["primary", "r0"])?;

    let image = alpha.image_path("r0");
    step(&format!(
        "alpha: losetup --direct-io=on {}; mkfs.ext4; mount",
        image.display()
    ));
    let loop_device = LoopDevice::attach(&image)?;
    run("mkfs.ext4", &["-q", "-F", &loop_device.device])?;
    let mount_point = scratch.path().join("mnt-alpha");
    let mounted = Mounted::mount(&loop_device.device, &mount_point)?;
    let content: String = (0..20_000)
        .map(|i| format!("line {i}: replicated disks without a kernel module\n"))
        .collect();
    step(&format!(
        "alpha: write {} bytes to hello.txt and sync",
        content.len()
    ));
    std::fs::write(mount_point.join("hello.txt"), &content)
        .context("cannot write the demo file")?;
    run("sync", &[])?;

    step("qrbd status on alpha");
    print!("{}", status_text::render(&[alpha.status("r0")?]));

    step("failover: umount and losetup -d on alpha, alpha secondary, beta primary");
    mounted.unmount()?;
    loop_device.detach()?;
    alpha.qrbd_ok(&["secondary", "r0"])?;
    beta.qrbd_ok(&["primary", "r0"])?;
    let identical = files_identical(&alpha.backing_path("r0"), &beta.backing_path("r0"))?;
    ensure!(identical, "the two backing images differ after failover");
    println!("    the two backing images are byte-identical");

    let beta_image = beta.image_path("r0");
    let beta_loop = LoopDevice::attach(&beta_image)?;
    run("e2fsck", &["-fn", &beta_loop.device]).context("e2fsck on beta")?;
    println!("    e2fsck -fn on beta: clean");
    let beta_mount = Mounted::mount(&beta_loop.device, &scratch.path().join("mnt-beta"))?;
    let back = std::fs::read_to_string(beta_mount.target.join("hello.txt"))
        .context("cannot read the demo file on beta")?;
    ensure!(
        back == content,
        "the file on beta differs from what alpha wrote"
    );
    step("beta: hello.txt is there, identical");

    step("qrbd status on beta");
    print!("{}", status_text::render(&[beta.status("r0")?]));

    step("cleanup: umount, losetup -d, secondary, stop both daemons");
    beta_mount.unmount()?;
    beta_loop.detach()?;
    beta.qrbd_ok(&["secondary", "r0"])?;
    for node in [&mut alpha, &mut beta] {
        let exit = node.stop_daemon()?;
        ensure!(exit.success(), "daemon exited with {exit}");
    }
    step("demo finished");
    Ok(())
}
