//! `qrbd status --watch`: follows resyncs until none of the selected resources has one running.
//! On a terminal each resync gets a progress bar (indicatif); otherwise one plain line is
//! printed whenever a resync moved on by a percent or changed state, so logs stay readable.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::Path;
use std::time::Duration;

use anyhow::Context;
use indicatif::{MultiProgress, ProgressBar, ProgressStyle};
use qrbd_actors::status::ResourceStatus;

use crate::admin::{self, AdminRequest, AdminResponse};
use crate::status_text;

/// How often the daemon is asked.
const POLL: Duration = Duration::from_millis(500);

/// One resync as the watcher shows it, keyed by (resource, peer).
type Key = (String, String);

/// Follows the resyncs of `resource` (or of every resource) until none runs, then prints the
/// final status.
pub fn watch(socket: &Path, resource: Option<String>, out: &mut impl Write) -> anyhow::Result<()> {
    let terminal = std::io::IsTerminal::is_terminal(&std::io::stdout());
    let bars = MultiProgress::new();
    let mut shown: BTreeMap<Key, ProgressBar> = BTreeMap::new();
    let mut last_line: BTreeMap<Key, (String, u64)> = BTreeMap::new();
    loop {
        let resources = fetch(socket, &resource)?;
        let mut running = false;
        for status in &resources {
            for peer in &status.peers {
                let key = (status.name.clone(), peer.name.clone());
                let Some(sync) = &peer.sync else {
                    if let Some(bar) = shown.remove(&key) {
                        bar.finish_with_message("done");
                    }
                    if last_line.remove(&key).is_some() {
                        writeln!(out, "{} {}: resync finished", key.0, key.1)?;
                    }
                    continue;
                };
                running = true;
                let detail = format!(
                    "rate:{}/s eta:{}{}",
                    status_text::human_bytes(sync.rate_bytes_per_sec),
                    sync.eta_seconds
                        .map(|s| format!("{}:{:02}:{:02}", s / 3600, s / 60 % 60, s % 60))
                        .unwrap_or_else(|| "unknown".into()),
                    sync.stalled
                        .as_deref()
                        .map(|why| format!(" STALLED: {why}"))
                        .unwrap_or_default()
                );
                if terminal {
                    let bar = shown.entry(key.clone()).or_insert_with(|| {
                        let bar = bars.add(ProgressBar::new(sync.total_bytes.max(1)));
                        bar.set_style(
                            ProgressStyle::with_template(
                                "{prefix} [{bar:40}] {percent:>3}% {bytes}/{total_bytes} {msg}",
                            )
                            .unwrap_or_else(|_| ProgressStyle::default_bar())
                            .progress_chars("=> "),
                        );
                        bar.set_prefix(format!("{} {}", key.0, key.1));
                        bar
                    });
                    bar.set_length(sync.total_bytes.max(1));
                    bar.set_position(sync.done_bytes);
                    bar.set_message(detail);
                } else {
                    let percent = (sync.done_percent() as u64).min(100);
                    let changed = last_line.get(&key).is_none_or(|(role, shown)| {
                        *role != detail_state(&sync.role, &detail) || *shown != percent
                    });
                    if changed {
                        writeln!(
                            out,
                            "{} {}: {} done:{:.2}% ({} of {}) {detail}",
                            key.0,
                            key.1,
                            sync.role,
                            sync.done_percent(),
                            status_text::human_bytes(sync.done_bytes),
                            status_text::human_bytes(sync.total_bytes),
                        )?;
                        out.flush()?;
                        last_line.insert(key, (detail_state(&sync.role, &detail), percent));
                    }
                }
            }
        }
        if !running {
            for bar in shown.values() {
                bar.finish_with_message("done");
            }
            write!(out, "{}", status_text::render(&resources))?;
            return Ok(());
        }
        std::thread::sleep(POLL);
    }
}

/// The part of a line that, when it changes, is worth a new line (role and stall).
fn detail_state(role: &str, detail: &str) -> String {
    format!("{role}{}", detail.contains("STALLED"))
}

fn fetch(socket: &Path, resource: &Option<String>) -> anyhow::Result<Vec<ResourceStatus>> {
    let request = AdminRequest::Status {
        resource: resource.clone(),
    };
    match admin::request(socket, &request).context("asking the daemon for status")? {
        AdminResponse::Status { resources } => Ok(resources),
        other => anyhow::bail!("the daemon did not answer with a status: {other:?}"),
    }
}
