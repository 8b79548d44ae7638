//! `qrbd demo`: the whole single-node flow on a temporary node, cleaned up afterwards.

use std::time::Duration;

use anyhow::{ensure, Context};

use crate::status_text;
use crate::testbed::{run, wait_until, LoopDevice, Mounted, ScratchDir, TestNode, TestResource};

fn step(text: &str) {
    println!("==> {text}");
}

pub fn run_demo(size: &str) -> anyhow::Result<()> {
    let binary = std::env::current_exe().context("cannot find the qrbd binary")?;
    let scratch = ScratchDir::new("qrbd-demo")?;
    step(&format!("temporary node in {}", scratch.path().display()));
    let mut node = TestNode::new(
        &binary,
        scratch.path(),
        &[TestResource {
            name: "r0".into(),
            size: size.into(),
        }],
    )?;
    step("qrbd create-md r0");
    print!("{}", node.qrbd_ok(&["create-md", "r0"])?);
    step("qrbd daemon (FUSE mount, resource r0 up)");
    node.start_daemon()?;
    let image = node.image_path("r0");
    wait_until(Duration::from_secs(10), "the image to appear", || {
        image.exists().then_some(())
    })?;
    step("qrbd primary r0");
    node.qrbd_ok(&["primary", "r0"])?;

    step(&format!("losetup --direct-io=on {}", image.display()));
    let loop_device = LoopDevice::attach(&image)?;
    println!("    {}", loop_device.device);
    step("mkfs.ext4 on the loop device");
    run("mkfs.ext4", &["-q", "-F", &loop_device.device])?;
    let mount_point = scratch.path().join("mnt");
    let mounted = Mounted::mount(&loop_device.device, &mount_point)?;
    let file = mount_point.join("hello.txt");
    let content: String = (0..2000)
        .map(|i| format!("line {i}: replicated disks without a kernel module\n"))
        .collect();
    step(&format!(
        "write {} bytes to {}",
        content.len(),
        file.display()
    ));
    std::fs::write(&file, &content).context("cannot write the demo file")?;
    run("sync", &[])?;
    let back = std::fs::read_to_string(&file).context("cannot read the demo file back")?;
    ensure!(
        back == content,
        "the file read back differs from what was written"
    );
    println!("    read back: identical");

    step("qrbd status");
    let status = node.status("r0")?;
    print!("{}", status_text::render(std::slice::from_ref(&status)));

    step("cleanup: umount, losetup -d, qrbd secondary, stop the daemon");
    mounted.unmount()?;
    loop_device.detach()?;
    node.qrbd_ok(&["secondary", "r0"])?;
    let exit = node.stop_daemon()?;
    ensure!(exit.success(), "daemon exited with {exit}");
    run(
        "e2fsck",
        &["-fn", &node.backing_path("r0").to_string_lossy()],
    )
    .context("e2fsck of the backing file")?;
    println!("    e2fsck -fn on the backing file: clean");
    step("demo finished");
    Ok(())
}
