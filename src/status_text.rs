//! The text form of `qrbd status`, in the spirit of `drbdadm status`.

use std::fmt::Write;

use qrbd_actors::status::ResourceStatus;

/// Bytes as a short human-readable amount.
pub fn human_bytes(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut value = bytes as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit + 1 < UNITS.len() {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{bytes} B")
    } else {
        format!("{value:.1} {}", UNITS[unit])
    }
}

pub fn render(resources: &[ResourceStatus]) -> String {
    if resources.is_empty() {
        return "no resources are up\n".to_owned();
    }
    let mut out = String::new();
    for status in resources {
        let _ = writeln!(
            out,
            "{} role:{} suspended:{}",
            status.name,
            status.role,
            if status.suspended { "user" } else { "no" }
        );
        let _ = writeln!(
            out,
            "  disk:{} size:{} protocol:{} generation:{}",
            status.disk,
            human_bytes(status.size_bytes),
            status.protocol,
            status.current_uuid
        );
        let _ = writeln!(
            out,
            "  read:{} ({} requests) written:{} ({} requests) discarded:{} flushes:{}",
            human_bytes(status.read_bytes),
            status.reads,
            human_bytes(status.written_bytes),
            status.writes,
            human_bytes(status.discarded_bytes),
            status.flushes
        );
        let _ = writeln!(
            out,
            "  in-flight:{} held:{} failed:{} open:{}w/{}r write-latency-avg:{}us",
            status.app_in_flight,
            status.app_held,
            status.failed_requests,
            status.open_writers,
            status.open_readers,
            status.write_latency_avg_us
        );
        // Most resources never have two Primaries: the line would be noise there.
        if status.allow_two_primaries || status.two_primaries_counted() {
            let _ = writeln!(
                out,
                "  two-primaries:{} concurrent-writes:{} superseded:{} retries-asked:{} \
                 superseded-by-peer:{} resubmitted:{}",
                if status.allow_two_primaries {
                    "allowed"
                } else {
                    "no"
                },
                status.concurrent_writes,
                status.superseded_writes,
                status.retry_writes_asked,
                status.superseded_by_peer,
                status.resubmitted_writes
            );
        }
        if !status.bitmap_uuids.is_empty() || !status.history_uuids.is_empty() {
            let bitmaps: Vec<String> = status
                .bitmap_uuids
                .iter()
                .map(|(node, uuid)| format!("node{node}:{uuid}"))
                .collect();
            let _ = writeln!(
                out,
                "  bitmap-generations:[{}] history:[{}]",
                bitmaps.join(" "),
                status.history_uuids.join(" ")
            );
        }
        for peer in &status.peers {
            let _ = writeln!(
                out,
                "  {} connection:{} role:{} disk:{} replication:{} out-of-sync:{}",
                peer.name,
                peer.connection,
                peer.role
                    .map(|r| r.to_string())
                    .unwrap_or_else(|| "Unknown".into()),
                peer.disk
                    .map(|d| d.to_string())
                    .unwrap_or_else(|| "DUnknown".into()),
                peer.replication,
                human_bytes(peer.out_of_sync_bytes)
            );
            if let Some(sync) = &peer.sync {
                let eta = sync
                    .eta_seconds
                    .map(|s| format!("{}:{:02}:{:02}", s / 3600, s / 60 % 60, s % 60))
                    .unwrap_or_else(|| "unknown".into());
                let _ = writeln!(
                    out,
                    "    {} done:{:.2}% ({} of {}) rate:{}/s eta:{eta}",
                    sync.role,
                    sync.done_percent(),
                    human_bytes(sync.done_bytes),
                    human_bytes(sync.total_bytes),
                    human_bytes(sync.rate_bytes_per_sec),
                );
                if let Some(why) = &sync.stalled {
                    let _ = writeln!(out, "    resync stalled: {why}");
                }
            }
            if let Some(verify) = &peer.verify {
                let state = match (verify.finished, &verify.interrupted) {
                    (None, _) => "running",
                    (Some(_), Some(_)) => "interrupted",
                    (Some(_), None) => "done",
                };
                let ranges: Vec<String> = verify
                    .differing_ranges
                    .iter()
                    .map(|(offset, len)| format!("{offset}+{len}"))
                    .collect();
                let _ = writeln!(
                    out,
                    "    verify:{state} checked:{} of {} differing-blocks:{} ranges:[{}]",
                    human_bytes(verify.checked_bytes),
                    human_bytes(verify.total_bytes),
                    verify.differing_blocks,
                    ranges.join(" ")
                );
            }
            if let Some(reason) = &peer.last_error {
                if peer.connection != "Connected" {
                    let _ = writeln!(out, "    last-error: {reason}");
                }
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use qrbd_actors::core::{DiskState, ReplicationProtocol, Role};

    fn resource(name: &str) -> ResourceStatus {
        ResourceStatus {
            name: name.to_owned(),
            role: Role::Primary,
            disk: DiskState::UpToDate,
            size_bytes: 1 << 20,
            protocol: ReplicationProtocol::C,
            suspended: false,
            app_in_flight: 0,
            app_held: 0,
            open_writers: 0,
            open_readers: 0,
            reads: 0,
            writes: 0,
            flushes: 0,
            discards: 0,
            read_bytes: 0,
            written_bytes: 0,
            discarded_bytes: 0,
            failed_requests: 0,
            write_latency_avg_us: 0,
            write_latency_total_us: 0,
            write_latency_buckets: Vec::new(),
            write_latency_bounds_us: Vec::new(),
            conflicts: 0,
            retries: 0,
            allow_two_primaries: false,
            concurrent_writes: 0,
            superseded_writes: 0,
            retry_writes_asked: 0,
            superseded_by_peer: 0,
            resubmitted_writes: 0,
            current_uuid: "0123456789ABCDEF".to_owned(),
            bitmap_uuids: Default::default(),
            history_uuids: Vec::new(),
            al_hits: 0,
            al_misses: 0,
            al_transactions: 0,
            peers: Vec::new(),
        }
    }

    #[test]
    fn two_primaries_line_only_when_relevant() {
        let plain = render(&[resource("r0")]);
        assert!(!plain.contains("two-primaries"), "{plain}");

        let mut allowed = resource("r0");
        allowed.allow_two_primaries = true;
        let text = render(&[allowed.clone()]);
        assert!(
            text.lines().any(|l| l
                == "  two-primaries:allowed concurrent-writes:0 superseded:0 retries-asked:0 \
                    superseded-by-peer:0 resubmitted:0"),
            "{text}"
        );

        allowed.concurrent_writes = 1;
        allowed.superseded_writes = 2;
        allowed.retry_writes_asked = 3;
        allowed.superseded_by_peer = 4;
        allowed.resubmitted_writes = 5;
        let text = render(&[allowed]);
        assert!(
            text.lines().any(|l| l
                == "  two-primaries:allowed concurrent-writes:1 superseded:2 retries-asked:3 \
                    superseded-by-peer:4 resubmitted:5"),
            "{text}"
        );

        // Anything counted shows, whatever the setting.
        let mut counted = resource("r0");
        counted.resubmitted_writes = 7;
        let text = render(&[counted]);
        assert!(
            text.contains("  two-primaries:no concurrent-writes:0")
                && text.contains("resubmitted:7"),
            "{text}"
        );
    }

    #[test]
    fn human_bytes_picks_a_unit() {
        assert_eq!(human_bytes(512), "512 B");
        assert_eq!(human_bytes(1536), "1.5 KiB");
        assert_eq!(human_bytes(1 << 30), "1.0 GiB");
    }
}
