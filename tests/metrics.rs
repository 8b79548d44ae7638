//! The Prometheus endpoint of a real daemon (`[node] metrics`), scraped with plain HTTP over a
//! TcpStream: metric names, labels and values, counters growing with writes through the image,
//! and the small HTTP server's answers. Needs root and /dev/fuse, like the other daemon tests.

use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{bail, ensure, Context};
use qrbd::testbed::{make_pair, skip_initial_sync, wait_until, PairSpec, ScratchDir, TestNode};

const REACT: Duration = Duration::from_secs(10);

fn binary() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_qrbd"))
}

/// A port on 127.0.0.1 that was free a moment ago.
fn free_tcp_port() -> anyhow::Result<u16> {
    let listener = TcpListener::bind("127.0.0.1:0").context("cannot bind a TCP port")?;
    Ok(listener.local_addr()?.port())
}

/// A node (fields drop in order: daemon and mount before the directory).
struct MetricsNode {
    node: TestNode,
    address: SocketAddr,
    _scratch: ScratchDir,
}

fn config_text(scratch: &ScratchDir, metrics: SocketAddr) -> String {
    let dir = scratch.path();
    format!(
        "[node]\nname = \"alpha\"\nid = 0\nstate_dir = {:?}\nmount_dir = {:?}\n\
         admin_socket = {:?}\nlisten = \"127.0.0.1:7788\"\nmetrics = \"{metrics}\"\n\n\
         [[resource]]\nname = \"r0\"\nsize = \"16MiB\"\n",
        dir.join("state"),
        dir.join("disks"),
        dir.join("qrbd.sock"),
    )
}

impl MetricsNode {
    /// A node with resource r0 (16 MiB), metrics on a free port, daemon running.
    fn start() -> anyhow::Result<Self> {
        let scratch = ScratchDir::new("qrbd-metrics")?;
        let address: SocketAddr = ([127, 0, 0, 1], free_tcp_port()?).into();
        let mut node =
            TestNode::from_config(&binary(), scratch.path(), &config_text(&scratch, address))?;
        node.qrbd_ok(&["create-md", "r0"])?;
        node.start_daemon()?;
        let image = node.image_path("r0");
        wait_until(REACT, "the image to appear", || {
            image.exists().then_some(())
        })?;
        Ok(MetricsNode {
            node,
            address,
            _scratch: scratch,
        })
    }

    fn get(&self, request_line: &str) -> anyhow::Result<Response> {
        http(self.address, request_line)
    }

    /// `GET /metrics`, parsed.
    fn scrape(&self) -> anyhow::Result<Metrics> {
        let response = self.get("GET /metrics HTTP/1.1")?;
        ensure!(
            response.status == 200,
            "scrape answered {}: {}\ndaemon log:\n{}",
            response.status,
            response.body,
            self.node.log()
        );
        Metrics::parse(&response.body)
    }
}

struct Response {
    status: u16,
    head: String,
    body: String,
}

/// One request (request line plus Host and Connection: close), read to the end.
fn http(address: SocketAddr, request_line: &str) -> anyhow::Result<Response> {
    let mut stream = TcpStream::connect_timeout(&address, REACT)
        .with_context(|| format!("cannot connect to the metrics endpoint {address}"))?;
    stream.set_read_timeout(Some(REACT))?;
    write!(
        stream,
        "{request_line}\r\nHost: {address}\r\nUser-Agent: qrbd-test\r\nConnection: close\r\n\r\n"
    )?;
    let mut raw = String::new();
    stream
        .read_to_string(&mut raw)
        .context("reading the answer")?;
    let (head, body) = raw
        .split_once("\r\n\r\n")
        .with_context(|| format!("no end of head in {raw:?}"))?;
    let status = head
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .with_context(|| format!("bad status line in {head:?}"))?;
    Ok(Response {
        status,
        head: head.to_owned(),
        body: body.to_owned(),
    })
}

/// Samples by their full name with labels, as written (`name{a="b"}`), plus the TYPE lines.
struct Metrics {
    samples: HashMap<String, f64>,
    types: HashMap<String, String>,
    text: String,
}

impl Metrics {
    fn parse(text: &str) -> anyhow::Result<Self> {
        let mut samples = HashMap::new();
        let mut types = HashMap::new();
        for line in text.lines() {
            if let Some(rest) = line.strip_prefix("# TYPE ") {
                let (name, kind) = rest.split_once(' ').context("bad TYPE line")?;
                types.insert(name.to_owned(), kind.to_owned());
                continue;
            }
            if line.starts_with('#') || line.is_empty() {
                continue;
            }
            let (series, value) = line
                .rsplit_once(' ')
                .with_context(|| format!("bad sample line {line:?}"))?;
            let value = match value {
                "+Inf" => f64::INFINITY,
                v => v
                    .parse()
                    .with_context(|| format!("bad value in {line:?}"))?,
            };
            ensure!(
                samples.insert(series.to_owned(), value).is_none(),
                "{series} appears twice"
            );
        }
        Ok(Metrics {
            samples,
            types,
            text: text.to_owned(),
        })
    }

    fn value(&self, series: &str) -> anyhow::Result<f64> {
        match self.samples.get(series) {
            Some(v) => Ok(*v),
            None => bail!("no sample {series} in:\n{}", self.text),
        }
    }
}

/// `dd` under `timeout`: 1 MiB of zeros to the start of `image`, fsynced.
fn write_mib(image: &Path) -> anyhow::Result<()> {
    let of = format!("of={}", image.display());
    run_checked(&[
        "timeout",
        "60",
        "dd",
        "if=/dev/zero",
        &of,
        "bs=64k",
        "count=16",
        "conv=notrunc,fsync",
        "status=none",
    ])
}

/// `dd` under `timeout`: the first MiB of `image`, read back (direct I/O: not from the cache).
fn read_mib(image: &Path) -> anyhow::Result<()> {
    let input = format!("if={}", image.display());
    run_checked(&[
        "timeout",
        "60",
        "dd",
        &input,
        "of=/dev/null",
        "bs=64k",
        "count=16",
        "iflag=direct",
        "status=none",
    ])
}

fn run_checked(argv: &[&str]) -> anyhow::Result<()> {
    let output = Command::new(argv[0])
        .args(&argv[1..])
        .output()
        .with_context(|| format!("cannot run {}", argv[0]))?;
    ensure!(
        output.status.success(),
        "`{}` failed ({}): {}",
        argv.join(" "),
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
    Ok(())
}

#[test]
fn metrics_follow_the_resource() -> anyhow::Result<()> {
    let node = MetricsNode::start()?;
    let before = node.scrape()?;

    for (family, kind) in [
        ("qrbd_build_info", "gauge"),
        ("qrbd_resource_role", "gauge"),
        ("qrbd_resource_disk_state", "gauge"),
        ("qrbd_resource_written_bytes_total", "counter"),
        ("qrbd_resource_read_bytes_total", "counter"),
        ("qrbd_resource_writes_total", "counter"),
        ("qrbd_resource_write_latency_seconds", "histogram"),
        ("qrbd_peer_out_of_sync_bytes", "gauge"),
        ("qrbd_peer_resync_done_ratio", "gauge"),
        ("qrbd_retry_postponed_total", "counter"),
    ] {
        ensure!(
            before.types.get(family).map(String::as_str) == Some(kind),
            "{family} is not declared a {kind}:\n{}",
            before.text
        );
    }
    let version = format!(
        "qrbd_build_info{{version=\"{}\"}}",
        env!("CARGO_PKG_VERSION")
    );
    ensure!(before.value(&version)? == 1.0, "build info");
    ensure!(before.value("qrbd_resources_up")? == 1.0, "one resource up");
    ensure!(before.value("qrbd_resource_role{resource=\"r0\",role=\"Secondary\"}")? == 1.0);
    ensure!(before.value("qrbd_resource_role{resource=\"r0\",role=\"Primary\"}")? == 0.0);
    ensure!(before.value("qrbd_resource_disk_state{resource=\"r0\",state=\"UpToDate\"}")? == 1.0);
    ensure!(before.value("qrbd_resource_disk_state{resource=\"r0\",state=\"Outdated\"}")? == 0.0);
    ensure!(before.value("qrbd_resource_size_bytes{resource=\"r0\"}")? == (16u64 << 20) as f64);
    ensure!(before.value("qrbd_resource_written_bytes_total{resource=\"r0\"}")? == 0.0);

    node.node.qrbd_ok(&["primary", "r0"])?;
    let promoted = wait_until(REACT, "the role metric to show Primary", || {
        let m = node.scrape().ok()?;
        (m.value("qrbd_resource_role{resource=\"r0\",role=\"Primary\"}")
            .ok()?
            == 1.0)
            .then_some(m)
    })?;
    ensure!(promoted.value("qrbd_resource_role{resource=\"r0\",role=\"Secondary\"}")? == 0.0);

    // 1 MiB written and read back through the image (from child processes: a thread stuck in
    // FUSE could wedge the test process).
    let size = 1u64 << 20;
    write_mib(&node.node.image_path("r0"))?;
    read_mib(&node.node.image_path("r0"))?;
    let written = "qrbd_resource_written_bytes_total{resource=\"r0\"}";
    let after = wait_until(REACT, "written bytes to reach 1 MiB", || {
        let m = node.scrape().ok()?;
        (m.value(written).ok()? >= size as f64).then_some(m)
    })
    .with_context(|| format!("daemon log:\n{}", node.node.log()))?;
    let writes = after.value("qrbd_resource_writes_total{resource=\"r0\"}")?;
    ensure!(writes >= 1.0, "writes_total {writes}");
    ensure!(
        after.value("qrbd_resource_write_latency_seconds_count{resource=\"r0\"}")? == writes,
        "the latency histogram counts every write"
    );
    ensure!(
        after.value("qrbd_resource_write_latency_seconds_bucket{resource=\"r0\",le=\"+Inf\"}")?
            == writes
    );
    ensure!(after.value("qrbd_resource_write_latency_seconds_sum{resource=\"r0\"}")? >= 0.0);
    ensure!(
        after.value("qrbd_resource_flushes_total{resource=\"r0\"}")? >= 1.0,
        "fsync"
    );
    ensure!(after.value("qrbd_resource_failed_requests_total{resource=\"r0\"}")? == 0.0);
    ensure!(after.value("qrbd_resource_read_bytes_total{resource=\"r0\"}")? >= size as f64);

    // The same numbers as `qrbd status --json` (nothing else writes meanwhile).
    let status = node.node.status("r0")?;
    ensure!(
        after.value(written)? == status.written_bytes as f64,
        "metrics say {} written, status says {}",
        after.value(written)?,
        status.written_bytes
    );
    Ok(())
}

#[test]
fn http_answers() -> anyhow::Result<()> {
    let node = MetricsNode::start()?;

    let ok = node.get("GET /metrics HTTP/1.1")?;
    ensure!(ok.status == 200, "GET /metrics: {}", ok.status);
    let head = ok.head.to_ascii_lowercase();
    ensure!(
        head.contains("content-type: text/plain; version=0.0.4"),
        "{}",
        ok.head
    );
    ensure!(
        head.contains(&format!("content-length: {}", ok.body.len())),
        "{}",
        ok.head
    );

    let query = node.get("GET /metrics?name[]=x HTTP/1.0")?;
    ensure!(query.status == 200, "a query string is ignored");

    let head_only = node.get("HEAD /metrics HTTP/1.1")?;
    ensure!(head_only.status == 200 && head_only.body.is_empty(), "HEAD");

    ensure!(node.get("GET /nothing HTTP/1.1")?.status == 404, "404");
    let post = node.get("POST /metrics HTTP/1.1")?;
    ensure!(post.status == 405, "POST: {}", post.status);
    ensure!(post.head.contains("Allow: GET, HEAD"), "{}", post.head);
    ensure!(node.get("garbage")?.status == 400, "400");

    // A client that connects and sends nothing does not block others.
    let _idle = TcpStream::connect(node.address)?;
    let scrapes: Vec<_> = (0..4)
        .map(|_| {
            std::thread::spawn({
                let address = node.address;
                move || http(address, "GET /metrics HTTP/1.1").map(|r| r.status)
            })
        })
        .collect();
    for scrape in scrapes {
        let status = scrape
            .join()
            .map_err(|_| anyhow::anyhow!("scrape thread panicked"))??;
        ensure!(status == 200, "concurrent scrape: {status}");
    }
    Ok(())
}

/// A taken metrics port is a start-up error that names the setting.
#[test]
fn taken_port_fails_the_start() -> anyhow::Result<()> {
    let scratch = ScratchDir::new("qrbd-metrics-taken")?;
    let taken = TcpListener::bind("127.0.0.1:0")?;
    let address = taken.local_addr()?;
    let mut node =
        TestNode::from_config(&binary(), scratch.path(), &config_text(&scratch, address))?;
    node.qrbd_ok(&["create-md", "r0"])?;
    let error = match node.start_daemon() {
        Ok(()) => bail!("the daemon started on a taken port"),
        Err(error) => format!("{error:#}"),
    };
    ensure!(
        error.contains("[node] metrics") && error.contains(&address.to_string()),
        "{error}"
    );
    ensure!(
        !node.mount_dir.join("r0.img").exists(),
        "nothing may be mounted"
    );
    Ok(())
}

/// With a peer: the per-peer metrics of the Primary follow the replication.
#[test]
fn peer_metrics_follow_replication() -> anyhow::Result<()> {
    let scratch = ScratchDir::new("qrbd-metrics-pair")?;
    let (mut alpha, mut beta, _) = make_pair(
        &binary(),
        scratch.path(),
        &PairSpec::new("r0", "16MiB", "C"),
    )?;
    // Metrics on alpha only.
    let address: SocketAddr = ([127, 0, 0, 1], free_tcp_port()?).into();
    let text = std::fs::read_to_string(&alpha.config_path)?;
    ensure!(
        text.starts_with("[node]\n"),
        "unexpected pair configuration:\n{text}"
    );
    let text = text.replacen("[node]\n", &format!("[node]\nmetrics = \"{address}\"\n"), 1);
    std::fs::write(&alpha.config_path, text)?;
    for node in [&alpha, &beta] {
        node.qrbd_ok(&["create-md", "r0"])?;
    }
    alpha.start_daemon()?;
    beta.start_daemon()?;
    let logs = |alpha: &TestNode, beta: &TestNode| {
        format!("alpha log:\n{}\nbeta log:\n{}", alpha.log(), beta.log())
    };
    let scrape = || -> anyhow::Result<Metrics> {
        let response = http(address, "GET /metrics HTTP/1.1")?;
        ensure!(response.status == 200, "scrape: {}", response.status);
        Metrics::parse(&response.body)
    };
    // `name{labels}` of alpha's series for its peer beta, with an extra label if not empty.
    let series = |name: &str, extra: &str| {
        let labels = r#"resource="r0",peer="beta",peer_id="1""#;
        if extra.is_empty() {
            format!("{name}{{{labels}}}")
        } else {
            format!("{name}{{{labels},{extra}}}")
        }
    };
    let connected = series("qrbd_peer_connection_state", r#"state="Connected""#);
    let standalone = series("qrbd_peer_connection_state", r#"state="StandAlone""#);
    let established = series("qrbd_peer_replication_state", r#"state="Established""#);
    let secondary = series("qrbd_peer_role", r#"role="Secondary""#);
    let sent = series("qrbd_peer_sent_bytes_total", "");
    let received = series("qrbd_peer_received_bytes_total", "");
    let out_of_sync = series("qrbd_peer_out_of_sync_bytes", "");
    let done = series("qrbd_peer_resync_done_ratio", "");

    wait_until(Duration::from_secs(30), "the pair to connect", || {
        (scrape().ok()?.value(&connected).ok()? == 1.0).then_some(())
    })
    .with_context(|| logs(&alpha, &beta))?;
    skip_initial_sync(&[&alpha, &beta], "r0").with_context(|| logs(&alpha, &beta))?;

    alpha.qrbd_ok(&["primary", "r0"])?;
    write_mib(&alpha.image_path("r0"))?;
    let m = wait_until(REACT, "sent bytes to reach 1 MiB", || {
        let m = scrape().ok()?;
        (m.value(&sent).ok()? >= (1u64 << 20) as f64).then_some(m)
    })
    .with_context(|| logs(&alpha, &beta))?;
    ensure!(m.value(&standalone)? == 0.0);
    ensure!(m.value(&established)? == 1.0);
    ensure!(m.value(&out_of_sync)? == 0.0);
    ensure!(m.value(&done)? == 1.0);
    ensure!(m.value(&received)? == 0.0);
    wait_until(REACT, "the peer role to be reported", || {
        (scrape().ok()?.value(&secondary).ok()? == 1.0).then_some(())
    })
    .with_context(|| logs(&alpha, &beta))?;

    // Disconnected: the connection state set moves, the out-of-sync bytes grow with writes.
    alpha.qrbd_ok(&["disconnect", "r0"])?;
    wait_until(REACT, "StandAlone", || {
        (scrape().ok()?.value(&standalone).ok()? == 1.0).then_some(())
    })?;
    write_mib(&alpha.image_path("r0"))?;
    let m = wait_until(REACT, "out-of-sync bytes", || {
        let m = scrape().ok()?;
        (m.value(&out_of_sync).ok()? > 0.0).then_some(m)
    })
    .with_context(|| logs(&alpha, &beta))?;
    let ratio = m.value(&done)?;
    ensure!((0.0..1.0).contains(&ratio), "resync done ratio {ratio}");
    ensure!(m.value(&connected)? == 0.0);
    for node in [&mut alpha, &mut beta] {
        // Beta is Secondary already; `secondary` is then a no-op that succeeds.
        node.qrbd_ok(&["secondary", "r0"])?;
        let exit = node.stop_daemon()?;
        ensure!(exit.success(), "daemon exited with {exit}");
    }
    Ok(())
}
