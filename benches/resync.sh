#!/usr/bin/env bash
# Resync benchmark: a two-node pair (protocol C) on loopback, alpha Primary, beta Secondary.
# In one run, against baselines measured in the same run:
#   baseline  cp (and dd with O_DIRECT) of a --dirty sized file on the disk of the backing files
#   bitmap    disconnect, write --dirty bytes on alpha, connect: time until in sync again
#   full      invalidate-remote on alpha: a full sync of the --full sized image
#   latency   fio 4 KiB random writes at QD1 on alpha, without a resync, then during one
# with the daemons' CPU time per GiB moved, and the backing files compared after each resync.
#
#   benches/resync.sh [--dirty SIZE] [--full SIZE] [--runtime SECONDS] [--rate BYTES]
#                     [--extra TOML] [--al-extents N] [--no-disk-flushes] [--parts LIST] [--no-fill]
#                     [--poll SECONDS] [--timeout SECONDS] [--pin] [--binary PATH]
#                     [--no-build] [--base-dir DIR] [--keep]
#
# Needs root (losetup), fio, python3, cmp and FUSE. See benches/README.md, "Resync".
set -euo pipefail

SCRIPT_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO_DIR=$(cd "$SCRIPT_DIR/.." && pwd)
# shellcheck source-path=SCRIPTDIR source=lib.sh
source "$SCRIPT_DIR/lib.sh"

# ---- options (env vars, overridden by flags) -------------------------------------------------
DIRTY=${QRBD_RESYNC_DIRTY:-1g}          # bytes written while disconnected; also the cp file
FULL=${QRBD_RESYNC_FULL:-4g}            # image size of the pair: the full sync moves all of it
RUNTIME=${QRBD_RESYNC_RUNTIME:-20}      # seconds of each latency job
RATE=${QRBD_RESYNC_RATE:-0}             # fixed resync_rate with c_plan_ahead = 0 (0: controller)
EXTRA=${QRBD_RESYNC_EXTRA:-}            # more [[resource]] lines, e.g. c_max_rate = "200M"
AL_EXTENTS=${QRBD_RESYNC_AL_EXTENTS:-}  # [[resource]] al_extents (default: the product's)
DISK_FLUSHES=${QRBD_RESYNC_DISK_FLUSHES:-true}  # [[resource]] disk_flushes
PARTS=${QRBD_RESYNC_PARTS:-baseline,bitmap,full,latency}
FILL=${QRBD_RESYNC_FILL:-1}             # write the whole image once before measuring
POLL=${QRBD_RESYNC_POLL:-0.1}           # seconds between two `qrbd status` polls
TIMEOUT=${QRBD_RESYNC_TIMEOUT:-900}     # seconds a resync may take before the run fails
BINARY=${QRBD_RESYNC_BINARY:-}
BUILD=${QRBD_RESYNC_BUILD:-1}
BASE_DIR=${QRBD_RESYNC_BASE_DIR:-${TMPDIR:-/tmp}}
KEEP=${QRBD_RESYNC_KEEP:-0}
PIN=${QRBD_RESYNC_PIN:-0}

usage() {
    sed -n '2,15p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'
    cat <<'EOF'

Options (each also as an environment variable):
  --dirty SIZE         bytes written on alpha while disconnected, and the size of the cp
                       baseline's file (QRBD_RESYNC_DIRTY, default 1g)
  --full SIZE          size of the pair's images, all of which the full sync moves
                       (QRBD_RESYNC_FULL, default 4g; at least --dirty)
  --runtime SECONDS    length of each latency job (QRBD_RESYNC_RUNTIME, default 20)
  --rate BYTES         a fixed resync rate, e.g. 100M: c_plan_ahead = 0 (the resync
                       controller off) and resync_rate = BYTES; 0 keeps the controller
                       (QRBD_RESYNC_RATE, default 0)
  --extra TOML         more lines for the [[resource]] table, e.g. 'c_max_rate = "200M"' or
                       $'c_fill_target = "4M"\nc_min_rate = 0' (QRBD_RESYNC_EXTRA)
  --al-extents N       al_extents of the resource (QRBD_RESYNC_AL_EXTENTS, default: qrbd's)
  --no-disk-flushes    disk_flushes = false: the peer does not flush at every epoch boundary
                       (QRBD_RESYNC_DISK_FLUSHES=false)
  --parts LIST         comma list of baseline,bitmap,full,latency (QRBD_RESYNC_PARTS, all)
  --no-fill            do not write the whole image before measuring: the full sync then
                       reads mostly holes (QRBD_RESYNC_FILL=0)
  --poll SECONDS       interval of the status polls that time a resync (QRBD_RESYNC_POLL, 0.1)
  --timeout SECONDS    fail if a resync takes longer (QRBD_RESYNC_TIMEOUT, default 900)
  --pin                alpha on CPU 0, beta on CPU 1 (taskset) (QRBD_RESYNC_PIN=1)
  --binary PATH        qrbd binary to use (QRBD_RESYNC_BINARY); default the release build
                       (target/release/qrbd, or under $CARGO_TARGET_DIR)
  --no-build           do not run `cargo build --release` first (QRBD_RESYNC_BUILD=0)
  --base-dir DIR       where the temporary directory goes: the backing files and the cp
                       baseline share its disk (QRBD_RESYNC_BASE_DIR, default $TMPDIR or /tmp)
  --keep               keep the temporary directory: daemon logs, status timelines, fio JSON,
                       results/summary.json (QRBD_RESYNC_KEEP=1)
EOF
}

while [[ $# -gt 0 ]]; do
    case $1 in
        --dirty) DIRTY=$2; shift 2 ;;
        --full) FULL=$2; shift 2 ;;
        --runtime) RUNTIME=$2; shift 2 ;;
        --rate) RATE=$2; shift 2 ;;
        --extra) EXTRA=$2; shift 2 ;;
        --al-extents) AL_EXTENTS=$2; shift 2 ;;
        --no-disk-flushes) DISK_FLUSHES=false; shift ;;
        --parts) PARTS=$2; shift 2 ;;
        --no-fill) FILL=0; shift ;;
        --poll) POLL=$2; shift 2 ;;
        --timeout) TIMEOUT=$2; shift 2 ;;
        --pin) PIN=1; shift ;;
        --binary) BINARY=$2; shift 2 ;;
        --no-build) BUILD=0; shift ;;
        --base-dir) BASE_DIR=$2; shift 2 ;;
        --keep) KEEP=1; shift ;;
        -h|--help) usage; exit 0 ;;
        *) echo "unknown option: $1 (see --help)" >&2; exit 2 ;;
    esac
done

install_cleanup

MIB=$((1 << 20))
RESULTS=""
PAIR_DIR=""     # the pair's directory (start_pair)
ALPHA=""        # alpha's config (the Primary, the sync source)
BETA=""         # beta's config
CHECKS_FAILED=0

# ---- status ----------------------------------------------------------------------------------
status_fields() {
    # status_fields CONFIG FIELD...: r0's first peer's FIELDs from `qrbd status --json`, one
    # per line (a field of the resource itself with "r." in front: r.disk).
    timeout 10 "$QRBD" --config "$1" status r0 --json | python3 -c '
import json, sys
r = json.load(sys.stdin)[0]
for f in sys.argv[1:]:
    print(r[f[2:]] if f.startswith("r.") else r["peers"][0][f])' "${@:2}"
}

wait_quiet() {
    # wait_quiet: until alpha has nothing unacked or pending towards beta (60 s at most).
    local deadline=$((SECONDS + 60)) state
    while :; do
        state=$(status_fields "$ALPHA" unacked pending | tr '\n' ' ' || true)
        [[ $state == "0 0 " ]] && return 0
        ((SECONDS < deadline)) || die "alpha still has unacked/pending $state after 60 s"
        sleep 0.2
    done
}

wait_connection() {
    # wait_connection STATE: until alpha's connection to beta is STATE (30 s at most).
    local deadline=$((SECONDS + 30))
    until [[ $(peer_field "$ALPHA" connection) == "$1" ]]; do
        ((SECONDS < deadline)) || die "alpha's connection is not $1 after 30 s"
        sleep 0.1
    done
}

record() {
    # record PART KEY VALUE...: one "KEY VALUE..." line in results/PART.env, for the report.
    local part=$1
    shift
    echo "$*" >>"$RESULTS/$part.env"
}

cpu_now() { daemon_cpu_ticks pair | tr '\n' ' '; }

compare_images() {
    # compare_images PART: wait for the pair to be quiet, then compare the backing files.
    local result
    wait_quiet
    log "$1: comparing the backing files of alpha and beta"
    if cmp -s "$PAIR_DIR/alpha/state/r0.img" "$PAIR_DIR/beta/state/r0.img"; then
        result=identical
    else
        result="DIFFERENT: $(cmp "$PAIR_DIR/alpha/state/r0.img" "$PAIR_DIR/beta/state/r0.img" \
            2>&1 | head -1 || true)"
        echo "error: $1: the backing files of alpha and beta differ ($result)" >&2
        CHECKS_FAILED=1
    fi
    record "$1" images "$result"
    record "$1" beta_disk "$(status_fields "$BETA" r.disk)"
}

WATCH=()
watch_resync() {
    # watch_resync PART EXPECTED [--restart-until FILE]: sets WATCH to the command that polls
    # alpha's status every POLL s into results/PART.timeline.jsonl until a resync ran and is
    # over (connected, no sync object, nothing out of sync). With --restart-until, it starts
    # another full resync (invalidate-remote) whenever one ends, until FILE exists. T0 (when
    # the resync was asked for) and RESYNCED_BEFORE must be set. A command, not a function:
    # run in the background, the poller itself must be the process that cleanup stops.
    WATCH=(python3 "$WORK_DIR/watch.py" --qrbd "$QRBD" --config "$ALPHA" --poll "$POLL"
        --timeout "$TIMEOUT" --t0 "$T0" --resynced-before "$RESYNCED_BEFORE"
        --expect "$2" --timeline "$RESULTS/$1.timeline.jsonl" "${@:3}")
}

resync_failed() {
    # resync_failed PART: print what is known and fail.
    "$QRBD" --config "$ALPHA" status r0 >&2 || true
    "$QRBD" --config "$BETA" status r0 >&2 || true
    tail -n 30 "$PAIR_DIR/alpha/daemon.log" "$PAIR_DIR/beta/daemon.log" >&2 || true
    die "$1: the resync did not complete (timeline: $RESULTS/$1.timeline.jsonl)"
}

write_watcher() {
    cat >"$WORK_DIR/watch.py" <<'EOF'
import argparse, json, os, subprocess, sys, time

ap = argparse.ArgumentParser()
for name in ("--qrbd", "--config", "--timeline", "--restart-until"):
    ap.add_argument(name)
ap.add_argument("--t0", type=float, required=True)
ap.add_argument("--resynced-before", type=int, required=True)
ap.add_argument("--expect", type=int, default=0)
ap.add_argument("--poll", type=float, default=0.1)
ap.add_argument("--timeout", type=float, default=900)
a = ap.parse_args()

def qrbd(*args):
    return subprocess.run([a.qrbd, "--config", a.config, *args], capture_output=True,
                          text=True, timeout=10)

def peer_status():
    try:
        out = qrbd("status", "r0", "--json")
        if out.returncode != 0:
            return None, out.stderr.strip()
        return json.loads(out.stdout)[0]["peers"][0], None
    except Exception as e:  # a timeout or an unparsable answer: recorded, polled again
        return None, repr(e)

# A resync is over when it was seen running (or moved what was expected: it may start and end
# between two polls) and alpha is connected, without a sync object, with nothing out of sync.
seen, base, restarts = False, a.resynced_before, 0
with open(a.timeline, "a") as timeline:
    def note(**rec):
        timeline.write(json.dumps(rec) + "\n")
        timeline.flush()
    while True:
        now = time.time()
        peer, error = peer_status()
        if peer is None:
            note(t=now, error=error)
        else:
            sync = peer.get("sync")
            note(t=now, connection=peer["connection"], replication=peer["replication"],
                 oos=peer["out_of_sync_bytes"], resynced=peer["resynced_bytes"], sync=sync)
            seen = seen or sync is not None
            done = (peer["connection"] == "Connected" and sync is None
                    and peer["out_of_sync_bytes"] == 0
                    and (seen or peer["resynced_bytes"] - base >= a.expect))
            if done and a.restart_until and not os.path.exists(a.restart_until):
                out = qrbd("invalidate-remote", "r0")
                restarts += 1
                note(t=time.time(), restart=restarts, rc=out.returncode,
                     said=(out.stdout + out.stderr).strip())
                seen, base = False, peer["resynced_bytes"]
            elif done:
                sys.exit(0)
        if now - a.t0 > a.timeout:
            print(f"no end of the resync after {a.timeout:.0f} s; last: {peer or error}",
                  file=sys.stderr)
            sys.exit(1)
        time.sleep(a.poll)
EOF
}

# ---- parts -----------------------------------------------------------------------------------
part_baseline() {
    # A copy of DIRTY bytes on the disk of the backing files: cp then fsync of the copy, and dd
    # with O_DIRECT on both sides (what the daemons do). The source is written with O_DIRECT
    # and its cached pages, if any, dropped before each copy: every byte comes from the disk.
    local dir=$WORK_DIR/baseline t0 t1
    mkdir -p "$dir"
    log "baseline: writing a $DIRTY_BYTES-byte source file"
    run_fio --name=source --filename="$dir/src.dat" --rw=write --bs=1m --size="$DIRTY_BYTES" \
        --direct=1 --ioengine=psync --end_fsync=1
    sync
    dd if="$dir/src.dat" iflag=nocache count=0 status=none
    log "baseline: cp + fsync"
    t0=$EPOCHREALTIME
    cp "$dir/src.dat" "$dir/cp.dat"
    sync "$dir/cp.dat"
    t1=$EPOCHREALTIME
    record baseline cp "$DIRTY_BYTES $t0 $t1"
    rm -f "$dir/cp.dat"
    sync
    dd if="$dir/src.dat" iflag=nocache count=0 status=none
    log "baseline: dd bs=4M iflag=direct oflag=direct conv=fsync"
    t0=$EPOCHREALTIME
    dd if="$dir/src.dat" of="$dir/dd.dat" bs=4M iflag=direct oflag=direct conv=fsync status=none
    t1=$EPOCHREALTIME
    record baseline dd "$DIRTY_BYTES $t0 $t1"
    rm -rf "$dir"
}

part_bitmap() {
    # Disconnect, write DIRTY bytes of fresh random data from offset 0 (1 MiB direct writes,
    # exactly DIRTY_BYTES/4KiB blocks dirty), connect, and time the bitmap resync.
    local cpu_before
    wait_quiet
    log "bitmap: disconnect"
    "$QRBD" --config "$ALPHA" disconnect r0 >/dev/null
    wait_connection StandAlone
    log "bitmap: writing $DIRTY to alpha's image while disconnected"
    dd if=/dev/urandom of="$LOOP_DEV" bs=1M count=$((DIRTY_BYTES / MIB)) iflag=fullblock \
        oflag=direct conv=notrunc status=none
    record bitmap oos_before "$(peer_field "$ALPHA" out_of_sync_bytes)"
    RESYNCED_BEFORE=$(peer_field "$ALPHA" resynced_bytes)
    cpu_before=$(cpu_now)
    log "bitmap: connect; waiting for the resync to end"
    T0=$EPOCHREALTIME
    "$QRBD" --config "$ALPHA" connect r0 >/dev/null
    watch_resync bitmap "$DIRTY_BYTES"
    "${WATCH[@]}" || resync_failed bitmap
    record bitmap cpu "$cpu_before / $(cpu_now)"
    record bitmap t0 "$T0"
    record bitmap resynced_before "$RESYNCED_BEFORE"
    compare_images bitmap
}

part_full() {
    local cpu_before
    wait_quiet
    RESYNCED_BEFORE=$(peer_field "$ALPHA" resynced_bytes)
    cpu_before=$(cpu_now)
    log "full: invalidate-remote; waiting for the full sync of $FULL to end"
    T0=$EPOCHREALTIME
    "$QRBD" --config "$ALPHA" invalidate-remote r0 >/dev/null
    watch_resync full "$FULL_BYTES"
    "${WATCH[@]}" || resync_failed full
    record full cpu "$cpu_before / $(cpu_now)"
    record full t0 "$T0"
    record full resynced_before "$RESYNCED_BEFORE"
    compare_images full
}

latency_job() {
    # latency_job NAME: 4 KiB random writes at queue depth 1, O_DIRECT, on the loop device over
    # alpha's image (the loop device is itself attached with direct I/O), RUNTIME seconds; each
    # write's completion latency in results/NAME_clat.1.log (epoch ms, ns, dir, bs, offset).
    # Also records alpha's activity-log hits and misses over the job.
    local t0 al_before
    al_before=$(status_fields "$ALPHA" r.al_hits r.al_misses | tr '\n' ' ')
    t0=$EPOCHREALTIME
    run_fio --name="$1" --filename="$LOOP_DEV" --rw=randwrite --bs=4k --direct=1 \
        --ioengine=psync --iodepth=1 --time_based=1 --runtime="$RUNTIME" --randrepeat=0 \
        --norandommap=1 --output-format=json --output="$RESULTS/$1.fio.json" \
        --write_lat_log="$RESULTS/$1" --log_unix_epoch=1 --log_offset=1
    rm -f "$RESULTS/$1_lat.1.log" "$RESULTS/$1_slat.1.log"
    record latency "$1" "$t0 $EPOCHREALTIME"
    record latency "al_$1" "$al_before$(status_fields "$ALPHA" r.al_hits r.al_misses | tr '\n' ' ')"
}

part_latency() {
    # Without a resync, then during full resyncs: one is started with invalidate-remote right
    # before fio, and the watcher starts another whenever one ends while fio runs. The report
    # splits the writes of that job by whether a resync was running when they were issued
    # (alpha's log has when each resync started and ended; fio's log has each write).
    local watcher stop=$WORK_DIR/latency.stop cpu_before
    wait_quiet
    log "latency: 4K random writes QD1 for ${RUNTIME}s, no resync"
    latency_job quiet
    wait_quiet
    RESYNCED_BEFORE=$(peer_field "$ALPHA" resynced_bytes)
    cpu_before=$(cpu_now)
    log "latency: the same during a full resync (invalidate-remote, restarted until fio ends)"
    T0=$EPOCHREALTIME
    "$QRBD" --config "$ALPHA" invalidate-remote r0 >/dev/null
    watch_resync latency "$FULL_BYTES" --restart-until "$stop"
    "${WATCH[@]}" &
    watcher=$!
    BG_PIDS+=("$watcher")
    latency_job resync
    touch "$stop"
    log "latency: waiting for the last resync to end"
    wait "$watcher" || resync_failed latency
    forget BG_PIDS "$watcher"
    record latency cpu "$cpu_before / $(cpu_now)"
    record latency t0 "$T0"
    record latency resynced_before "$RESYNCED_BEFORE"
    compare_images latency
}

# ---- report ----------------------------------------------------------------------------------
report() {
    python3 - "$RESULTS" "$DIRTY_BYTES" "$FULL_BYTES" "$RUNTIME" "$PAIR_DIR/alpha/daemon.log" \
        <<'EOF'
import datetime, json, os, re, sys

results, dirty, full, runtime, alpha_log = sys.argv[1:6]
dirty, full = int(dirty), int(full)
MIB, GIB = 1 << 20, 1 << 30
TICK = os.sysconf("SC_CLK_TCK")

def env(part):
    try:
        lines = open(os.path.join(results, part + ".env")).read().splitlines()
    except OSError:
        return None
    return {k: v for k, _, v in (line.partition(" ") for line in lines)}

def timeline(part):
    with open(os.path.join(results, part + ".timeline.jsonl")) as f:
        return [json.loads(line) for line in f]

def cpu(e, moved):
    before, _, after = e["cpu"].partition(" / ")
    b = dict(x.split(":") for x in before.split())
    a = dict(x.split(":") for x in after.split())
    secs = {k: (int(a[k]) - int(b[k])) / TICK for k in a if k in b}
    per = lambda k: f" ({secs[k] / (moved / GIB):.2f} s/GiB)" if moved else ""
    return " / ".join(f"{k} {secs[k]:.1f} s{per(k)}" for k in ("alpha", "beta") if k in secs)

# The sync source logs when a resync starts and ends, to the microsecond:
#   2026-11-30T18:08:09.842120Z  INFO qrbd_actors::core::resource::resync: resync starts ...
#   ... resync finished; the peer is UpToDate resource=r0 peer=beta moved_bytes=67108864
LOG_LINE = re.compile(
    r"^(\S+Z)\s+INFO\s+\S*resync: resync (starts|finished)\b.*?(?:moved_bytes=(\d+))?$")
EVENTS = []
for line in open(alpha_log, errors="replace") if os.path.exists(alpha_log) else []:
    m = LOG_LINE.match(line.strip())
    if m:
        t = datetime.datetime.fromisoformat(m.group(1).replace("Z", "+00:00")).timestamp()
        EVENTS.append((t, m.group(2), int(m.group(3) or 0)))

def resync(part):
    """A resync (or a chain of them) from the status timeline and alpha's log."""
    e, tl = env(part), timeline(part)
    t0 = float(e["t0"])
    polls = [s for s in tl if "connection" in s]
    running = [s for s in polls if s["sync"]]
    end = polls[-1]
    r = {"t0": t0, "from_command": end["t"] - t0, "polls": len(polls),
         "moved": end["resynced"] - int(e["resynced_before"]),
         "errors": [s["error"] for s in tl if "error" in s],
         "restarts": [s for s in tl if "restart" in s],
         "stalled": sorted({s["sync"]["stalled"] for s in running if s["sync"]["stalled"]})}
    if running:
        r["own"] = running[-1]["sync"]
    # Pair each "starts" with the next "finished", within the part's window.
    spans, start = [], None
    for t, kind, moved in EVENTS:
        if not t0 <= t <= end["t"] + 1:
            continue
        if kind == "starts":
            start = t
        elif start is not None:
            spans.append((start, t, moved))
            start = None
    r["spans"] = spans
    if spans:
        r["busy"] = sum(b - a for a, b, _ in spans)
        r["log_moved"] = sum(m for _, _, m in spans)
    return e, r

rows, summary, notes = [], {}, []
def row(figure, value, vs=""):
    rows.append((figure, value, vs))

def mibs(n, secs):
    return n / MIB / secs if secs > 0 else float("nan")

def size(n):
    return f"{n / GIB:g} GiB" if n >= GIB and n % (GIB // 4) == 0 else f"{n / MIB:,.0f} MiB"

base = env("baseline")
cp_rate = None
if base:
    for key, name in (("cp", "cp, then fsync of the copy"),
                      ("dd", "dd bs=4M, O_DIRECT in and out, fsync")):
        n, t0, t1 = base[key].split()
        secs = float(t1) - float(t0)
        rate = mibs(int(n), secs)
        summary[f"baseline_{key}"] = {"bytes": int(n), "seconds": secs, "mib_s": rate}
        if key == "cp":
            cp_rate = rate
        row(f"baseline: {name}, {size(int(n))}", f"{secs:.2f} s, {rate:,.0f} MiB/s",
            "1.00x" if key == "cp" else f"{rate / cp_rate:.2f}x")

def vs_cp(rate):
    return f"{rate / cp_rate:.2f}x of cp" if cp_rate else ""

for part, name, expected in (("bitmap", f"bitmap resync, {size(dirty)} dirty", dirty),
                             ("full", f"full sync, {size(full)} image", full)):
    if not env(part):
        continue
    e, r = resync(part)
    summary[part] = r
    if part == "bitmap":
        oos = int(e["oos_before"])
        row(f"{name}: out of sync before connect", size(oos),
            "as written" if oos == dirty else f"EXPECTED {size(dirty)}")
        if oos != dirty:
            notes.append(f"{part}: out_of_sync_bytes {oos} after writing {dirty}")
    cmd = "connect" if part == "bitmap" else "invalidate-remote"
    row(f"{name}: `{cmd}` to in sync (status polls)", f"{r['from_command']:.2f} s",
        vs_cp(mibs(r["moved"], r["from_command"])))
    if len(r["spans"]) == 1:
        rate = mibs(r["moved"], r["busy"])
        summary[part]["mib_s"] = rate
        row(f"**{name}: the resync itself (log: starts to finished)**",
            f"**{r['busy']:.2f} s, {rate:,.0f} MiB/s**", f"**{vs_cp(rate)}**")
    else:
        notes.append(f"{part}: {len(r['spans'])} resyncs in alpha's log, expected 1: {r['spans']}")
    if "own" in r:
        row(f"{name}: qrbd's average rate (last poll of a running sync)",
            f"{r['own']['rate_bytes_per_sec'] / MIB:,.0f} MiB/s")
    row(f"{name}: resynced_bytes", f"{r['moved']:,}",
        "as expected" if r["moved"] == expected else f"EXPECTED {expected:,}")
    if r["moved"] != expected:
        notes.append(f"{part}: resynced_bytes grew by {r['moved']}, expected {expected}")
    row(f"{name}: daemon CPU", cpu(e, r["moved"]))
    row(f"{name}: backing files afterwards", e["images"], f"beta {e['beta_disk']}")
    for s in r["stalled"]:
        notes.append(f"{part}: stalled: {s}")
    for s in r["errors"]:
        notes.append(f"{part}: status error: {s}")

lat = env("latency")
if lat:
    def fio(name):
        text = open(os.path.join(results, name + ".fio.json")).read()
        job = json.loads(text[text.index("{"):])["jobs"][0]["write"]
        pct = job["clat_ns"]["percentile"]
        get = lambda p: next(v for k, v in pct.items() if abs(float(k) - p) < 1e-6) / 1000
        return {"p50": get(50.0), "p99": get(99.0), "mean": job["clat_ns"]["mean"] / 1000,
                "iops": job["iops"]}
    quiet, busy = fio("quiet"), fio("resync")
    for name, job in (("quiet", quiet), ("resync", busy)):
        h0, m0, h1, m1 = map(int, lat[f"al_{name}"].split())
        job["al_hits"], job["al_misses"] = h1 - h0, m1 - m0
    summary["latency"] = {"quiet": quiet, "resync": busy}
    row(f"QD1 4K random write, {runtime} s, no resync: p50 / p99 (IOPS)",
        f"{quiet['p50']:,.0f} / {quiet['p99']:,.0f} µs ({quiet['iops']:,.0f} IOPS)")
    e, r = resync("latency")
    f0, f1 = map(float, e["resync"].split())
    # Each write of the job from fio's log: (issued, latency µs), issued = completed - latency.
    writes = []
    for line in open(os.path.join(results, "resync_clat.1.log")):
        t_ms, lat_ns = (int(x) for x in line.split(",")[:2])
        writes.append((t_ms / 1000 - lat_ns / 1e9, lat_ns / 1000))
    def pct(values, p):
        values = sorted(values)
        if not values:
            return float("nan")
        return values[min(len(values) - 1, max(0, -(-len(values) * p // 100) - 1))]
    inside = [l for t, l in writes if any(a <= t <= b for a, b, _ in r["spans"])]
    outside = [l for t, l in writes if not any(a <= t <= b for a, b, _ in r["spans"])]
    busy["while_running"] = {"n": len(inside), "p50": pct(inside, 50), "p99": pct(inside, 99)}
    busy["between"] = {"n": len(outside), "p50": pct(outside, 50), "p99": pct(outside, 99)}
    row(f"**the same, writes issued while a full sync ran: p50 / p99 (writes)**",
        f"**{pct(inside, 50):,.0f} / {pct(inside, 99):,.0f} µs** ({len(inside):,})",
        f"**{pct(inside, 50) / quiet['p50']:.2f}x / {pct(inside, 99) / quiet['p99']:.2f}x**")
    row(f"  the whole {runtime} s job, full syncs back to back: p50 / p99 (IOPS)",
        f"{busy['p50']:,.0f} / {busy['p99']:,.0f} µs ({busy['iops']:,.0f} IOPS)",
        f"{busy['p50'] / quiet['p50']:.2f}x / {busy['p99'] / quiet['p99']:.2f}x")
    row("  its writes issued in the gaps between two full syncs: p50 / p99 (writes)",
        f"{pct(outside, 50):,.0f} / {pct(outside, 99):,.0f} µs ({len(outside):,})"
        if outside else "none")
    covered = sum(max(0, min(b, f1) - max(a, f0)) for a, b, _ in r["spans"]) / (f1 - f0)
    rate = mibs(r.get("log_moved", 0), r.get("busy", 0))
    summary["latency"]["resync_meanwhile"] = r | {"covered": covered, "mib_s": rate}
    row("  the resyncs meanwhile", f"{len(r['spans'])} full sync(s), {size(r['moved'])} at "
        f"{rate:,.0f} MiB/s, running {covered:.0%} of the fio job")
    row("  activity-log misses of the writes: no resync / during",
        " / ".join(f"{j['al_misses']:,} of {j['al_hits'] + j['al_misses']:,}"
                   for j in (quiet, busy)))
    row("  daemon CPU (resyncs and application writes)", cpu(e, 0))
    row("  backing files afterwards", e["images"], f"beta {e['beta_disk']}")
    for s in r["stalled"]:
        notes.append(f"latency: stalled: {s}")
    for s in r["restarts"]:
        if s["rc"] != 0:
            notes.append(f"latency: invalidate-remote failed: {s['said']}")

peaks = {}
try:
    for line in open(os.path.join(results, "rss")):
        who, _, rest = line.partition(": ")
        if rest.startswith("VmHWM"):
            peaks[who.split()[1]] = int(rest.split()[1]) / 1024
except OSError:
    pass
if peaks:
    row("peak RSS over the run", " / ".join(f"{k} {v:,.0f} MB" for k, v in peaks.items()))
json.dump(summary, open(os.path.join(results, "summary.json"), "w"), indent=1)

header = ("figure", "value", "ratio")
widths = [max(len(r[i]) for r in rows + [header]) for i in range(3)]
print("| " + " | ".join(h.ljust(w) for h, w in zip(header, widths)) + " |")
print(f"|{'-' * (widths[0] + 2)}|{'-' * (widths[1] + 1)}:|{'-' * (widths[2] + 1)}:|")
for r in rows:
    print(f"| {r[0].ljust(widths[0])} | {r[1].rjust(widths[1])} | {r[2].rjust(widths[2])} |")
for n in notes:
    print(f"\nnote: {n}")
EOF
}

# ---- main ------------------------------------------------------------------------------------
main() {
    local part load
    [[ $(id -u) -eq 0 ]] || die "run as root (losetup)"
    need fio
    need python3
    need losetup
    need cmp
    [[ $RUNTIME =~ ^[1-9][0-9]*$ ]] || die "--runtime wants a positive number of seconds"
    IFS=, read -r -a part_list <<<"$PARTS"
    for part in "${part_list[@]}"; do
        declare -F "part_$part" >/dev/null ||
            die "unknown part $part (baseline,bitmap,full,latency)"
    done
    DIRTY_BYTES=$(size_bytes "$DIRTY")
    FULL_BYTES=$(size_bytes "$FULL")
    ((DIRTY_BYTES > 0 && DIRTY_BYTES % MIB == 0)) ||
        die "--dirty must be a positive multiple of 1 MiB"
    ((FULL_BYTES % MIB == 0)) || die "--full must be a multiple of 1 MiB"
    ((FULL_BYTES >= DIRTY_BYTES)) || die "--full must be at least --dirty"
    IMAGE_SIZE="$((FULL_BYTES / MIB))MiB"
    RESOURCE_EXTRA=""
    if [[ $(size_bytes "$RATE") != 0 ]]; then
        RESOURCE_EXTRA="c_plan_ahead = 0"$'\n'"resync_rate = $(size_bytes "$RATE")"
    fi
    [[ -z $EXTRA ]] || RESOURCE_EXTRA+=$'\n'"$EXTRA"
    MODE="resync controller"
    [[ $(size_bytes "$RATE") == 0 ]] || MODE="fixed resync_rate $RATE"
    [[ -z $EXTRA ]] || MODE+=" ($(tr '\n' ';' <<<"$EXTRA" | sed 's/;$//; s/;/; /g'))"
    [[ -z $AL_EXTENTS ]] || RESOURCE_EXTRA+=$'\n'"al_extents = $AL_EXTENTS"
    find_binary "$REPO_DIR" "$BINARY" "$BUILD"

    mkdir -p "$BASE_DIR"
    WORK_DIR=$(mktemp -d "$BASE_DIR/qrbd-resync.XXXXXX")
    RESULTS=$WORK_DIR/results
    mkdir -p "$RESULTS"
    log "work dir $WORK_DIR (on $(df --output=source "$WORK_DIR" | tail -1))"
    write_watcher
    load=$(cut -d' ' -f1-3 /proc/loadavg)

    if [[ ,$PARTS, == *,baseline,* ]]; then part_baseline; fi
    if [[ ,$PARTS, =~ ,(bitmap|full|latency), ]]; then
        start_pair pair C
        ALPHA=$PAIR_DIR/alpha.toml
        BETA=$PAIR_DIR/beta.toml
        attach_loop "$PAIR_IMAGE"
        log "pair: $PAIR_IMAGE on $LOOP_DEV (alpha primary, beta connected, protocol C)"
        if ((FILL)); then
            log "pair: writing the whole image ($FULL) once, replicated"
            run_fio --name=fill --filename="$LOOP_DEV" --rw=write --bs=1m --direct=1 \
                --ioengine=libaio --iodepth=4 --size="$FULL_BYTES"
        fi
        for part in bitmap full latency; do
            if [[ ,$PARTS, == *,$part,* ]]; then "part_$part"; fi
        done
        daemon_memory pair >"$RESULTS/rss"
    fi
    teardown

    echo
    echo "resync bench: dirty $DIRTY, image $FULL$( ((FILL)) || echo ' (not filled)'), latency" \
        "jobs ${RUNTIME}s, $MODE,${AL_EXTENTS:+ al_extents $AL_EXTENTS,}" \
        "disk_flushes $DISK_FLUSHES," \
        "protocol C on 127.0.0.1, $(nproc) CPUs, kernel $(uname -r)," \
        "$(date -u +%Y-%m-%dT%H:%MZ), load average at start $load" \
        "$( ((PIN)) && echo ', alpha pinned to CPU 0, beta to CPU 1')"
    echo
    report
    ((CHECKS_FAILED == 0)) || die "a check failed (see above); $WORK_DIR is kept"
}

main
