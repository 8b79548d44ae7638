//! The packaging inputs, checked without building packages (packaging/ci-check.sh builds and
//! installs them): the shipped configuration, the systemd unit and its readiness protocol,
//! the package metadata in Cargo.toml, the maintainer scripts, and `qrbd generate-docs`.

use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use anyhow::{bail, ensure, Context};
use qrbd::config::{self, load_from_str};
use qrbd::testbed::{wait_until, ScratchDir, TestNode, TestResource};
use qrbd_actors::core::split_brain::{AfterSb0Pri, AfterSb1Pri, AfterSb2Pri, SplitBrainPolicy};

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn binary() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_qrbd"))
}

fn read(relative: &str) -> anyhow::Result<String> {
    std::fs::read_to_string(root().join(relative))
        .with_context(|| format!("cannot read {relative}"))
}

fn shipped_config() -> anyhow::Result<String> {
    read("packaging/qrbd.toml")
}

/// The shipped configuration with the node name set, as the comments tell the administrator.
fn with_name_set(text: &str) -> anyhow::Result<String> {
    ensure!(
        text.lines().filter(|l| l.starts_with("#name = ")).count() == 2,
        "expected the commented node name and the commented resource name"
    );
    Ok(text.replacen("\n#name = \"alpha\"", "\nname = \"alpha\"", 1))
}

fn run_check_config(text: &str) -> anyhow::Result<std::process::Output> {
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("qrbd.toml");
    std::fs::write(&path, text)?;
    Command::new(binary())
        .arg("--config")
        .arg(&path)
        .arg("check-config")
        .env_remove("QRBD_NODE__NAME")
        .output()
        .context("cannot run qrbd check-config")
}

#[test]
fn shipped_config_is_valid_once_the_node_name_is_set() -> anyhow::Result<()> {
    let text = shipped_config()?;

    // As shipped: refused, and the message says what is missing.
    let error = match load_from_str(&text, &[]) {
        Ok(config) => bail!("the shipped configuration loads without a node name: {config:?}"),
        Err(error) => error.to_string(),
    };
    ensure!(error.contains("missing required key \"name\""), "{error}");
    let output = run_check_config(&text)?;
    ensure!(
        !output.status.success(),
        "check-config accepted it as shipped"
    );
    ensure!(String::from_utf8_lossy(&output.stderr).contains("\"name\""));

    // The name set: valid, with the documented defaults, no resources, metrics off.
    let named = with_name_set(&text)?;
    let config = load_from_str(&named, &[]).map_err(|e| anyhow::anyhow!("{e}"))?;
    ensure!(config.node.name == "alpha" && config.node.id == 0);
    ensure!(config.node.state_dir == Path::new(config::DEFAULT_STATE_DIR));
    ensure!(config.node.mount_dir == Path::new(config::DEFAULT_MOUNT_DIR));
    ensure!(config.node.admin_socket == Path::new(config::DEFAULT_ADMIN_SOCKET));
    ensure!(config.node.listen == config::DEFAULT_LISTEN);
    ensure!(config.node.buffer_budget == config::DEFAULT_BUFFER_BUDGET);
    ensure!(
        config.node.metrics.is_none(),
        "metrics must be off by default"
    );
    ensure!(config.tls.is_none() && config.resources.is_empty());
    let output = run_check_config(&named)?;
    ensure!(
        output.status.success(),
        "check-config: {}",
        String::from_utf8_lossy(&output.stderr)
    );

    // Or the name from the environment, the file untouched (systemctl edit + Environment=).
    let env = [("QRBD_NODE__NAME".to_owned(), "beta".to_owned())];
    let config = load_from_str(&text, &env).map_err(|e| anyhow::anyhow!("{e}"))?;
    ensure!(config.node.name == "beta");
    Ok(())
}

/// Every commented example in the shipped file is valid when uncommented.
#[test]
fn shipped_config_examples_are_valid() -> anyhow::Result<()> {
    let text = with_name_set(&shipped_config()?)?;
    let uncommented: String = text
        .lines()
        .map(|line| {
            let body = line.strip_prefix('#').unwrap_or(line);
            let key = body.trim_start();
            let is_setting = key.starts_with('[')
                || [
                    "name =",
                    "id =",
                    "address =",
                    "size =",
                    "protocol =",
                    "al_extents =",
                    "resync_rate =",
                    "c_plan_ahead =",
                    "c_fill_target =",
                    "c_delay_target =",
                    "c_max_rate =",
                    "c_min_rate =",
                    "csums =",
                    "after_sb_0pri =",
                    "after_sb_1pri =",
                    "after_sb_2pri =",
                    "allow_two_primaries =",
                    "metrics =",
                    "ca =",
                    "cert =",
                    "key =",
                ]
                .iter()
                .any(|k| key.starts_with(k));
            if line.starts_with('#') && is_setting {
                format!("{}\n", body.trim_start())
            } else {
                format!("{line}\n")
            }
        })
        .collect();
    let config =
        load_from_str(&uncommented, &[]).map_err(|e| anyhow::anyhow!("{e}\n{uncommented}"))?;
    ensure!(config.node.metrics.is_some());
    ensure!(config.tls.is_some());
    let resource = config.resource("r0").map_err(|e| anyhow::anyhow!("{e}"))?;
    ensure!(resource.size_bytes == 1 << 30 && resource.peers.len() == 1);
    ensure!(resource.al_extents == config::DEFAULT_AL_EXTENTS);
    ensure!(resource.resync_rate == 100 << 20);
    ensure!(
        resource.resync_control
            == config::ResyncControl {
                max_rate: 500 << 20,
                ..config::ResyncControl::default()
            }
    );
    ensure!(resource.csums);
    ensure!(resource.allow_two_primaries);
    ensure!(
        resource.split_brain
            == SplitBrainPolicy {
                after_sb_0pri: AfterSb0Pri::DiscardZeroChanges,
                after_sb_1pri: AfterSb1Pri::DiscardSecondary,
                after_sb_2pri: AfterSb2Pri::Disconnect,
            }
    );
    Ok(())
}

#[test]
fn unit_file() -> anyhow::Result<()> {
    let unit = read("packaging/qrbd.service")?;
    for line in [
        "ExecStart=/usr/bin/qrbd daemon",
        "Type=notify",
        "Restart=on-failure",
        "After=network-online.target",
        "Wants=network-online.target",
        "RuntimeDirectory=qrbd",
        "StateDirectory=qrbd",
        "WantedBy=multi-user.target",
    ] {
        ensure!(
            unit.lines().any(|l| l == line),
            "qrbd.service lacks {line:?}"
        );
    }
    // A mount namespace would hide the FUSE mount from the host.
    for option in [
        "ProtectSystem=",
        "PrivateTmp=",
        "ProtectHome=",
        "PrivateDevices=",
        "MountFlags=",
    ] {
        ensure!(
            !unit.lines().any(|l| l.starts_with(option)),
            "qrbd.service must not set {option}"
        );
    }

    // systemd's own check, where it exists, on a copy that runs this build's binary (and
    // without the man page reference: the page is not installed here).
    if Command::new("systemd-analyze")
        .arg("--version")
        .output()
        .is_err()
    {
        eprintln!("skipped systemd-analyze verify: not installed");
        return Ok(());
    }
    let dir = tempfile::tempdir()?;
    let copy = dir.path().join("qrbd.service");
    std::fs::write(
        &copy,
        unit.replace("/usr/bin/qrbd", &binary().display().to_string())
            .replace("man:qrbd(8) ", ""),
    )?;
    let output = Command::new("systemd-analyze")
        .arg("verify")
        .arg(&copy)
        .output()?;
    let findings = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    ensure!(
        output.status.success(),
        "systemd-analyze verify: {findings}"
    );
    Ok(())
}

/// The daemon started with $NOTIFY_SOCKET (as by `Type=notify`) reports READY=1 once it
/// answers admin requests, and STOPPING=1 when told to stop.
#[test]
fn daemon_notifies_systemd() -> anyhow::Result<()> {
    notify_round(false)
}

/// The same with an abstract socket name (`@name`), as systemd passes in some set-ups.
#[test]
fn daemon_notifies_an_abstract_socket() -> anyhow::Result<()> {
    notify_round(true)
}

fn notify_round(abstract_name: bool) -> anyhow::Result<()> {
    use std::os::linux::net::SocketAddrExt;
    let scratch = ScratchDir::new("qrbd-notify")?;
    let node = TestNode::new(
        &binary(),
        scratch.path(),
        &[TestResource {
            name: "r0".into(),
            size: "16MiB".into(),
        }],
    )?;
    node.qrbd_ok(&["create-md", "r0"])?;
    let (socket, notify_socket) = if abstract_name {
        let name = format!("qrbd-test-notify-{:016x}", rand::random::<u64>());
        let address = std::os::unix::net::SocketAddr::from_abstract_name(name.as_bytes())?;
        (UnixDatagram::bind_addr(&address)?, format!("@{name}"))
    } else {
        let path = scratch.path().join("notify.sock");
        (UnixDatagram::bind(&path)?, path.display().to_string())
    };
    socket.set_read_timeout(Some(Duration::from_secs(20)))?;
    let mut daemon = Daemon(Some(
        Command::new(binary())
            .arg("--config")
            .arg(&node.config_path)
            .arg("daemon")
            .env("NOTIFY_SOCKET", &notify_socket)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()?,
    ));

    let mut buffer = [0u8; 256];
    let n = socket.recv(&mut buffer).context("no READY=1 within 20 s")?;
    ensure!(
        &buffer[..n] == b"READY=1",
        "got {:?}",
        String::from_utf8_lossy(&buffer[..n])
    );
    // Ready means usable: the admin socket answers and the image is there, without waiting.
    node.qrbd_ok(&["status", "r0"])?;
    ensure!(
        node.image_path("r0").exists(),
        "ready before the image is served"
    );

    let pid = daemon.pid()?;
    // SAFETY: kill has no memory-safety preconditions.
    if unsafe { libc::kill(pid, libc::SIGTERM) } != 0 {
        return Err(std::io::Error::last_os_error()).context("cannot send SIGTERM to the daemon");
    }
    let n = socket.recv(&mut buffer).context("no STOPPING=1")?;
    ensure!(
        &buffer[..n] == b"STOPPING=1",
        "got {:?}",
        String::from_utf8_lossy(&buffer[..n])
    );
    let status = wait_until(Duration::from_secs(60), "the daemon to exit", || {
        daemon.try_wait().transpose()
    })??;
    ensure!(status.success(), "daemon exited with {status}");
    drop(node);
    Ok(())
}

/// Kills the daemon on drop if a test fails half-way.
struct Daemon(Option<Child>);

impl Daemon {
    fn pid(&self) -> anyhow::Result<libc::pid_t> {
        let child = self.0.as_ref().context("daemon gone")?;
        Ok(libc::pid_t::try_from(child.id())?)
    }

    /// The exit status once the daemon has exited (and is reaped), `None` while it runs.
    fn try_wait(&mut self) -> anyhow::Result<Option<std::process::ExitStatus>> {
        let child = self.0.as_mut().context("daemon already reaped")?;
        let status = child.try_wait().context("cannot wait for the daemon")?;
        if status.is_some() {
            self.0 = None;
        }
        Ok(status)
    }
}

impl Drop for Daemon {
    /// Best effort: nobody is left to report a failure to kill the daemon to.
    fn drop(&mut self) {
        if let Some(mut child) = self.0.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

fn manifest() -> anyhow::Result<toml::Table> {
    Ok(read("Cargo.toml")?.parse::<toml::Table>()?)
}

fn table<'a>(value: &'a toml::Value, key: &str) -> anyhow::Result<&'a toml::Value> {
    value.get(key).with_context(|| format!("no {key:?}"))
}

/// Sources of package assets exist, or are generated by packaging/build.sh.
fn check_source(source: &str) -> anyhow::Result<()> {
    const GENERATED: [&str; 3] = [
        "target/release/",
        "target/packages/docs/",
        "target/packages/stage/",
    ];
    if GENERATED.iter().any(|prefix| source.starts_with(prefix)) {
        return Ok(());
    }
    let pattern = root().join(source);
    if source.contains('*') {
        let dir = pattern.parent().context("glob without a directory")?;
        let suffix = source.rsplit('*').next().unwrap_or_default();
        let found = std::fs::read_dir(dir)?
            .filter_map(Result::ok)
            .any(|e| e.file_name().to_string_lossy().ends_with(suffix));
        ensure!(found, "{source} matches nothing");
    } else {
        ensure!(pattern.is_file(), "{source} does not exist");
    }
    Ok(())
}

#[test]
fn package_metadata() -> anyhow::Result<()> {
    let manifest = toml::Value::Table(manifest()?);
    let metadata = table(table(&manifest, "package")?, "metadata")?;

    let deb = table(metadata, "deb")?;
    let depends = table(deb, "depends")?.as_str().context("depends")?;
    ensure!(
        depends.split(',').any(|d| d.trim() == "fuse3"),
        "deb depends: {depends}"
    );
    let scripts = root().join(table(deb, "maintainer-scripts")?.as_str().context("path")?);
    for script in ["postinst", "prerm", "postrm"] {
        ensure!(scripts.join(script).is_file(), "no {script}");
    }
    let mut deb_dests = Vec::new();
    for asset in table(deb, "assets")?.as_array().context("deb assets")? {
        let asset = asset.as_array().context("deb asset")?;
        let source = asset[0].as_str().context("source")?;
        check_source(source)?;
        deb_dests.push(format!("/{}", asset[1].as_str().context("dest")?));
    }

    // The .rpm is built by rpmbuild from packaging/rpm/qrbd.spec.in (packaging/ci-check.sh
    // inspects the built package's file list).
    let spec = read("packaging/rpm/qrbd.spec.in")?;
    ensure!(
        spec.lines()
            .any(|l| l.starts_with("Requires:") && l.contains("fuse3")),
        "the rpm must require fuse3"
    );
    ensure!(
        spec.contains("%config(noreplace) /etc/qrbd/qrbd.toml"),
        "the rpm must keep an edited qrbd.toml on upgrade"
    );
    for script in ["post.sh", "preun.sh", "postun.sh"] {
        ensure!(
            spec.contains(&format!("%{{qrbd_scripts}}/{script}")),
            "the spec does not run {script}"
        );
        ensure!(
            root().join("packaging/rpm").join(script).is_file(),
            "no {script}"
        );
    }
    for needed in [
        "/usr/bin/qrbd",
        "/etc/qrbd/qrbd.toml",
        "/usr/lib/systemd/system/qrbd.service",
        "/usr/share/man/man8/",
        "/usr/share/bash-completion/completions/qrbd",
        "/usr/share/doc/qrbd/README.md",
        "/usr/share/doc/qrbd/LICENSE",
        "/usr/share/doc/qrbd/status-json.md",
    ] {
        ensure!(
            deb_dests.iter().any(|d| d.starts_with(needed)),
            "no deb asset for {needed}"
        );
        let in_spec = spec.lines().any(|l| {
            let path = l.split_whitespace().last().unwrap_or_default();
            let path = path.trim_end_matches('*');
            !path.is_empty() && path.starts_with('/') && needed.starts_with(path)
        });
        ensure!(in_spec, "the rpm spec lists nothing for {needed}");
    }
    let license = read("LICENSE")?;
    ensure!(license.contains("Apache License") && license.contains("Version 2.0"));
    Ok(())
}

#[test]
fn maintainer_scripts() -> anyhow::Result<()> {
    for script in [
        "packaging/debian/postinst",
        "packaging/debian/prerm",
        "packaging/debian/postrm",
        "packaging/rpm/post.sh",
        "packaging/rpm/preun.sh",
        "packaging/rpm/postun.sh",
    ] {
        // POSIX sh: dpkg and rpm run them with /bin/sh.
        let output = Command::new("sh")
            .arg("-n")
            .arg(root().join(script))
            .output()?;
        ensure!(
            output.status.success(),
            "{script}: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        let commands = read(script)?;
        for line in commands.lines().map(str::trim_start) {
            if line.starts_with('#') {
                continue;
            }
            ensure!(
                !(line.contains("rm ") && line.contains("/var/lib/qrbd")),
                "{script} deletes the data directory: {line}"
            );
            ensure!(
                !(line.starts_with("systemctl")
                    && [" enable", " start", " restart"]
                        .iter()
                        .any(|verb| line.contains(verb))),
                "{script} must not enable, start or restart the service: {line}"
            );
        }
    }
    for script in ["packaging/build.sh", "packaging/ci-check.sh"] {
        let output = Command::new("bash")
            .arg("-n")
            .arg(root().join(script))
            .output()?;
        ensure!(
            output.status.success(),
            "{script}: {}",
            String::from_utf8_lossy(&output.stderr)
        );
    }
    Ok(())
}

#[test]
fn generate_docs_is_hidden_and_complete() -> anyhow::Result<()> {
    let help = Command::new(binary()).arg("--help").output()?;
    let help = String::from_utf8_lossy(&help.stdout);
    ensure!(help.contains("check-config"), "{help}");
    ensure!(
        !help.contains("generate-docs"),
        "generate-docs must stay hidden: {help}"
    );

    let dir = tempfile::tempdir()?;
    let output = Command::new(binary())
        .arg("generate-docs")
        .arg("--out-dir")
        .arg(dir.path())
        .output()?;
    ensure!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let page = std::fs::read_to_string(dir.path().join("man8/qrbd.8"))?;
    for subcommand in [
        "check\\-config",
        "create\\-md",
        "daemon",
        "primary",
        "secondary",
        "status",
        "suspend\\-io",
        "gen\\-cert",
    ] {
        ensure!(
            page.contains(&format!("qrbd\\-{subcommand}(8)")),
            "qrbd(8) lacks {subcommand}"
        );
        let file = format!("man8/qrbd-{}.8", subcommand.replace('\\', ""));
        ensure!(dir.path().join(&file).is_file(), "no {file}");
    }
    for completion in [
        "completions/qrbd.bash",
        "completions/_qrbd",
        "completions/qrbd.fish",
    ] {
        ensure!(dir.path().join(completion).is_file(), "no {completion}");
    }
    // The bash completion is valid bash.
    let bash = Command::new("bash")
        .arg("-n")
        .arg(dir.path().join("completions/qrbd.bash"))
        .output()?;
    ensure!(
        bash.status.success(),
        "{}",
        String::from_utf8_lossy(&bash.stderr)
    );
    Ok(())
}
