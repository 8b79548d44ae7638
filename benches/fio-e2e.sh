#!/usr/bin/env bash
# End-to-end fio benchmark: ext4 on a loop device over a plain sparse file ("plain") versus
# ext4 on a loop device over a qrbd FUSE image: single node ("qrbd"), or the primary of a
# two-node pair on loopback with protocol C ("qrbd-c") or A ("qrbd-a"). Same disk, same fio jobs.
#
#   benches/fio-e2e.sh [--quick] [--rounds N] [--image-size SIZE] [--seq-size SIZE]
#                      [--rand-size SIZE] [--runtime SECONDS] [--iodepth N] [--workloads LIST]
#                      [--cases LIST] [--binary PATH] [--no-build] [--base-dir DIR] [--keep]
#
# Needs root (losetup, mount), fio, python3, mkfs.ext4 and FUSE. See benches/README.md.
#
# Shared functions (cleanup, daemons, pairs, fio) are in benches/lib.sh.
#
# Layout, for adding cases: a case NAME is a function `setup_NAME` (a "-" in NAME becomes "_":
# case qrbd-c is setup_qrbd_c) that mounts an ext4 and sets CASE_DIR to a directory on it,
# registering what it creates in the cleanup arrays (MOUNTS, LOOPS, DAEMON_PIDS) as soon as it
# exists; an optional `finish_NAME` runs at the end while the case is still up (the qrbd ones
# record the daemons' peak RSS; the replicated ones also unmount, wait for unacked == 0 and
# compare the two backing files). All cases are set up first and stay mounted; then, for every
# round and workload, `run_suite NAME DIR ROUND WORKLOAD` runs for each case in turn, so that
# the cases of one row are measured close together in time (the disk's speed drifts on a shared
# VM). The report has one column per case, in order, and the ratio of each case to the first.
set -euo pipefail

SCRIPT_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO_DIR=$(cd "$SCRIPT_DIR/.." && pwd)
# shellcheck source-path=SCRIPTDIR source=lib.sh
source "$SCRIPT_DIR/lib.sh"

# ---- options (env vars, overridden by flags) -------------------------------------------------
IMAGE_SIZE=${QRBD_FIO_IMAGE_SIZE:-4GiB}     # size of each image (qrbd syntax: MiB, GiB, ...)
SEQ_SIZE=${QRBD_FIO_SEQ_SIZE:-1g}           # fio size of the sequential-write file
RAND_SIZE=${QRBD_FIO_RAND_SIZE:-1g}         # fio size of the random read/write file
RUNTIME=${QRBD_FIO_RUNTIME:-20}             # seconds of each time-based job
IODEPTH=${QRBD_FIO_IODEPTH:-16}
ROUNDS=${QRBD_FIO_ROUNDS:-1}
WORKLOADS=${QRBD_FIO_WORKLOADS:-seqwrite,randwrite,randread,latency}
CASES=${QRBD_FIO_CASES:-plain,qrbd}
BINARY=${QRBD_FIO_BINARY:-}
BUILD=${QRBD_FIO_BUILD:-1}
BASE_DIR=${QRBD_FIO_BASE_DIR:-${TMPDIR:-/tmp}}
KEEP=${QRBD_FIO_KEEP:-0}
PIN=${QRBD_FIO_PIN:-0}                      # pin the daemons: primary to CPU 0, peer to CPU 1

usage() {
    sed -n '2,10p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'
    cat <<'EOF'

Options (each also as an environment variable):
  --quick              smoke test: 1GiB images, 256m sequential, 128m random file, 5 s jobs
  --rounds N           run every workload N times, cases interleaved; the table shows the
                       median and each round (QRBD_FIO_ROUNDS, default 1)
  --image-size SIZE    size of each image, qrbd syntax (QRBD_FIO_IMAGE_SIZE, default 4GiB)
  --seq-size SIZE      fio size of the sequential write (QRBD_FIO_SEQ_SIZE, default 1g)
  --rand-size SIZE     fio size of the random I/O file (QRBD_FIO_RAND_SIZE, default 1g)
  --runtime SECONDS    length of the random jobs (QRBD_FIO_RUNTIME, default 20)
  --iodepth N          queue depth of the random jobs (QRBD_FIO_IODEPTH, default 16)
  --workloads LIST     comma list of seqwrite,randwrite,randread,latency (QRBD_FIO_WORKLOADS);
                       latency: 4K random writes at queue depth 1, p50 and p99
  --pin                pin the daemons (taskset): the primary (or single node) to CPU 0,
                       the peer to CPU 1, to show what sharing two CPUs costs (QRBD_FIO_PIN=1)
  --cases LIST         comma list of plain,qrbd,qrbd-c,qrbd-a (QRBD_FIO_CASES); the first is
                       the baseline. qrbd-c/qrbd-a: protocol C/A, one peer on loopback
  --binary PATH        qrbd binary to use (QRBD_FIO_BINARY); default target/release/qrbd
  --no-build           do not run `cargo build --release` first (QRBD_FIO_BUILD=0)
  --base-dir DIR       where the temporary directory goes (QRBD_FIO_BASE_DIR, default $TMPDIR
                       or /tmp); every image lives there, so all cases use the same disk
  --keep               keep the temporary directory: fio JSON, summary.json, daemon logs and
                       daemon.pid files (QRBD_FIO_KEEP=1)
EOF
}

while [[ $# -gt 0 ]]; do
    case $1 in
        --quick)
            IMAGE_SIZE=1GiB SEQ_SIZE=256m RAND_SIZE=128m RUNTIME=5
            shift ;;
        --rounds) ROUNDS=$2; shift 2 ;;
        --image-size) IMAGE_SIZE=$2; shift 2 ;;
        --seq-size) SEQ_SIZE=$2; shift 2 ;;
        --rand-size) RAND_SIZE=$2; shift 2 ;;
        --runtime) RUNTIME=$2; shift 2 ;;
        --iodepth) IODEPTH=$2; shift 2 ;;
        --workloads) WORKLOADS=$2; shift 2 ;;
        --cases) CASES=$2; shift 2 ;;
        --binary) BINARY=$2; shift 2 ;;
        --no-build) BUILD=0; shift ;;
        --base-dir) BASE_DIR=$2; shift 2 ;;
        --keep) KEEP=1; shift ;;
        --pin) PIN=1; shift ;;
        -h|--help) usage; exit 0 ;;
        *) echo "unknown option: $1 (see --help)" >&2; exit 2 ;;
    esac
done

install_cleanup

# ---- cases -----------------------------------------------------------------------------------
# setup_NAME: mount an ext4 and set CASE_DIR to a directory on it.

setup_plain() {
    local dir=$WORK_DIR/plain image
    mkdir -p "$dir"
    image=$dir/plain.img
    truncate -s "$(size_bytes "$IMAGE_SIZE")" "$image"
    attach_loop "$image"
    log "plain: sparse $image on $LOOP_DEV"
    mkfs_and_mount "$LOOP_DEV" "$dir/mnt"
    CASE_DIR=$dir/mnt
}

declare -A CASE_PAIR=()     # replicated case -> "alpha_config:alpha_dir:beta_dir:mount:loop"

setup_qrbd() {
    local dir=$WORK_DIR/qrbd config image
    mkdir -p "$dir"
    config=$dir/qrbd.toml
    cat >"$config" <<EOF
[node]
name = "bench"
id = 0
state_dir = "$dir/state"
mount_dir = "$dir/disks"
admin_socket = "$dir/qrbd.sock"
listen = "127.0.0.1:$(free_port)"

[[resource]]
name = "r0"
size = "$IMAGE_SIZE"
protocol = "C"
EOF
    start_daemon qrbd "$config" "$dir"
    CASE_PIDS[qrbd]="qrbd:$START_PID"
    image=$dir/disks/r0.img
    wait_for_image "$image" "$START_PID" "$dir/daemon.log"
    "$QRBD" --config "$config" primary r0 >/dev/null
    attach_loop "$image"
    log "qrbd: $image on $LOOP_DEV"
    mkfs_and_mount "$LOOP_DEV" "$dir/mnt"
    CASE_DIR=$dir/mnt
}

setup_pair() {
    # setup_pair CASE PROTOCOL: a pair from start_pair (lib.sh), then the loop device, ext4
    # and mount on alpha's image, the one measured.
    start_pair "$1" "$2"
    attach_loop "$PAIR_IMAGE"
    log "$1: $PAIR_IMAGE on $LOOP_DEV (alpha primary, beta connected)"
    mkfs_and_mount "$LOOP_DEV" "$PAIR_DIR/mnt"
    CASE_PAIR[$1]="$PAIR_DIR/alpha.toml:$PAIR_DIR/alpha:$PAIR_DIR/beta:$PAIR_DIR/mnt:$LOOP_DEV"
    CASE_DIR=$PAIR_DIR/mnt
}

setup_qrbd_c() { setup_pair qrbd-c C; }
setup_qrbd_a() { setup_pair qrbd-a A; }
# Protocol C with disk_flushes = false (DRBD's disk-flushes no): fsync still flushes the peer.
setup_qrbd_c_nf() { DISK_FLUSHES=false setup_pair qrbd-c-nf C; }

record_rss() {
    # record_rss CASE: peak RSS (VmHWM) of the case's daemons over the whole run, read while
    # they are still up.
    daemon_memory "$1" >>"$RESULTS/rss"
}

verify_pair() {
    # verify_pair CASE: unmount the case's ext4, detach its loop device, wait until alpha has
    # nothing unacked or pending towards beta, then compare the two backing files byte for byte.
    local case=$1 config alpha_dir beta_dir mnt loop deadline unacked pending result
    IFS=: read -r config alpha_dir beta_dir mnt loop <<<"${CASE_PAIR[$case]}"
    unmount_path "$mnt"
    forget MOUNTS "$mnt"
    losetup -d "$loop" 2>/dev/null || true
    forget LOOPS "$loop"
    deadline=$((SECONDS + 60))
    while :; do
        unacked=$(peer_field "$config" unacked)
        pending=$(peer_field "$config" pending)
        [[ $unacked == 0 && $pending == 0 ]] && break
        if ((SECONDS >= deadline)); then
            echo "$case: FAIL: after 60 s alpha still has unacked=$unacked pending=$pending" \
                >>"$RESULTS/verify"
            return 0
        fi
        sleep 0.2
    done
    log "$case: comparing the backing files of alpha and beta"
    if cmp -s "$alpha_dir/state/r0.img" "$beta_dir/state/r0.img"; then
        result="identical"
    else
        result="DIFFERENT ($(cmp "$alpha_dir/state/r0.img" "$beta_dir/state/r0.img" 2>&1 | head -1 || true))"
    fi
    echo "$case: alpha and beta backing files $result ($(peer_field "$config" connection)," \
        "unacked 0, pending 0)" >>"$RESULTS/verify"
}

finish_qrbd() { record_rss qrbd; }
finish_qrbd_c() { record_rss qrbd-c; verify_pair qrbd-c; }
finish_qrbd_a() { record_rss qrbd-a; verify_pair qrbd-a; }

# ---- fio -------------------------------------------------------------------------------------
fio_job() {
    # fio_job LABEL WORKLOAD ROUND DIR [fio args...]: also records the CPU time each of the
    # case's daemons spent during the job, for the CPU-per-operation rows of the report.
    local label=$1 workload=$2 round=$3 dir=$4 before after
    shift 4
    log "$label: $workload (round $round)"
    before=$(daemon_cpu_ticks "$label" | tr "\n" " ")
    run_fio --name="$workload" --directory="$dir" --output-format=json \
        --output="$RESULTS/$label.$workload.$round.json" "$@"
    after=$(daemon_cpu_ticks "$label" | tr "\n" " ")
    printf '%s\n%s\n' "before $before" "after $after" >"$RESULTS/$label.$workload.$round.cpu"
}

run_suite() {
    # run_suite LABEL DIR [ROUND [WORKLOADS]]: the workloads (default: all selected) against
    # files in DIR.
    local label=$1 dir=$2 round=${3:-1} list=${4:-$WORKLOADS} workload
    local rand=(--filename=rand.dat --size="$RAND_SIZE" --bs=4k --direct=1 --ioengine=libaio
        --iodepth="$IODEPTH" --time_based=1 --runtime="$RUNTIME" --randrepeat=0
        --norandommap=1)
    IFS=, read -r -a selected <<<"$list"
    for workload in "${selected[@]}"; do
        case $workload in
            seqwrite)
                # Buffered 1 MiB writes; fio's runtime includes the final fsync.
                fio_job "$label" seqwrite "$round" "$dir" --filename=seq.dat --rw=write \
                    --bs=1m --size="$SEQ_SIZE" --ioengine=psync --end_fsync=1
                rm -f "$dir/seq.dat"
                ;;
            randwrite|randread)
                # Both run on a file written in full first: overwrites of allocated blocks in
                # the guest ext4 and in the sparse image/backing file (left to itself, fio would
                # only fallocate the file for randwrite, and every write would then also
                # convert an unwritten extent and allocate a block on the host: first-write
                # cost, which drifts as the file fills).
                if [[ ! -e $dir/rand.dat ]]; then
                    log "$label: laying out rand.dat ($RAND_SIZE)"
                    run_fio --name=layout --directory="$dir" --filename=rand.dat \
                        --size="$RAND_SIZE" --rw=write --bs=1m --end_fsync=1
                fi
                fio_job "$label" "$workload" "$round" "$dir" --rw="$workload" "${rand[@]}"
                ;;
            latency)
                # What one synchronous writer waits for: 4 KiB random writes at queue depth 1.
                if [[ ! -e $dir/rand.dat ]]; then
                    log "$label: laying out rand.dat ($RAND_SIZE)"
                    run_fio --name=layout --directory="$dir" --filename=rand.dat \
                        --size="$RAND_SIZE" --rw=write --bs=1m --end_fsync=1
                fi
                fio_job "$label" latency "$round" "$dir" --rw=randwrite --filename=rand.dat \
                    --size="$RAND_SIZE" --bs=4k --direct=1 --ioengine=psync --iodepth=1 \
                    --time_based=1 --runtime="$RUNTIME" --randrepeat=0 --norandommap=1
                ;;
            *) die "unknown workload $workload (seqwrite, randwrite, randread, latency)" ;;
        esac
        sync
    done
}

# ---- report ----------------------------------------------------------------------------------
report() {
    python3 - "$RESULTS" "$CASES" "$WORKLOADS" "$ROUNDS" <<'EOF'
import json, os, statistics, sys

results, cases, workloads = sys.argv[1], sys.argv[2].split(","), sys.argv[3].split(",")
rounds = range(1, int(sys.argv[4]) + 1)
UNITS = {"seqwrite": "MiB/s", "randwrite": "IOPS", "randread": "IOPS", "latency": "IOPS"}
NAMES = {"seqwrite": "seq write 1M, end_fsync", "randwrite": "4K rand write",
         "randread": "4K rand read", "latency": "4K rand write QD1"}
TICK_US = 1e6 / os.sysconf("SC_CLK_TCK")

def job_of(case, workload, r):
    try:
        text = open(os.path.join(results, f"{case}.{workload}.{r}.json")).read()
    except OSError:
        return None, None
    data = json.loads(text[text.index("{"):])  # fio may print warnings before the JSON
    job = data["jobs"][0]
    return job, (job["read"] if workload == "randread" else job["write"])

def load(case, workload, r):
    job, side = job_of(case, workload, r)
    if job is None:
        return None
    if workload == "seqwrite":
        # Bytes over the job's runtime, which includes the final fsync.
        return side["io_bytes"] / 2**20 / (job["job_runtime"] / 1000)
    return side["iops"]

def latency_us(case, r, pct):
    job, side = job_of(case, "latency", r)
    if job is None:
        return None
    found = side.get("clat_ns", {}).get("percentile", {})
    key = next((k for k in found if abs(float(k) - pct) < 1e-6), None)
    return found[key] / 1000 if key else None

def cpu_per_op_us(case, workload, r):
    """Daemon CPU (user + system) per fio operation, per daemon label."""
    job, side = job_of(case, workload, r)
    try:
        lines = open(os.path.join(results, f"{case}.{workload}.{r}.cpu")).read().splitlines()
    except OSError:
        return {}
    if job is None or not side.get("total_ios"):
        return {}
    def parse(line):
        return dict(item.split(":") for item in line.split()[1:])
    before, after = parse(lines[0]), parse(lines[1])
    return {label: (int(after[label]) - int(before[label])) * TICK_US / side["total_ios"]
            for label in after if label in before}

def median(values):
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None

base = cases[0]
summary, rows, per_round = {}, [], []
for w in workloads:
    vals = {c: [load(c, w, r) for r in rounds] for c in cases}
    ratios = {c: [v / b if v is not None and b else None for v, b in zip(vals[c], vals[base])]
              for c in cases[1:]}
    summary[w] = {"unit": UNITS.get(w, ""), "values": vals, "ratios": ratios}
    row = [NAMES.get(w, w), UNITS.get(w, "")]
    row += ["-" if median(vals[c]) is None else f"{median(vals[c]):,.0f}" for c in cases]
    row += ["-" if median(ratios[c]) is None else f"{median(ratios[c]):.2f}x" for c in cases[1:]]
    rows.append(row)
    if w == "latency":
        for pct, name in ((50.0, "p50"), (99.0, "p99")):
            lat = {c: median([latency_us(c, r, pct) for r in rounds]) for c in cases}
            row = [f"4K write QD1 latency {name}", "us"]
            row += ["-" if lat[c] is None else f"{lat[c]:,.0f}" for c in cases]
            row += ["-" if lat[c] is None or not lat[base] else f"{lat[c] / lat[base]:.2f}x"
                    for c in cases[1:]]
            rows.append(row)
    labels = sorted({l for c in cases for r in rounds for l in cpu_per_op_us(c, w, r)})
    for label in labels:
        cpu = {c: median([cpu_per_op_us(c, w, r).get(label) for r in rounds]) for c in cases}
        if all(v is None for v in cpu.values()):
            continue
        row = [f"  daemon CPU per op ({label})", "us"]
        row += ["-" if cpu[c] is None else f"{cpu[c]:,.1f}" for c in cases]
        row += ["" for c in cases[1:]]
        rows.append(row)
    if len(rounds) > 1:
        parts = [c + " " + " ".join("-" if v is None else f"{v:,.0f}" for v in vals[c])
                 for c in cases]
        parts += [f"{c}/{base} " + " ".join("-" if v is None else f"{v:.2f}" for v in ratios[c])
                  for c in cases[1:]]
        per_round.append(f"  {NAMES.get(w, w)}: " + "; ".join(parts))
# Peak RSS of each daemon over the whole run (recorded by record_rss while the case was up).
peaks = {}
try:
    for line in open(os.path.join(results, "rss")):
        who, _, rest = line.partition(": ")
        if rest.startswith("VmHWM"):
            case, _, label = who.partition(" ")
            peaks[(case, label)] = int(rest.split()[1]) / 1024
except OSError:
    pass
for label in sorted({label for _, label in peaks}):
    row = [f"peak RSS ({label})", "MB"]
    row += [f"{peaks[(c, label)]:,.0f}" if (c, label) in peaks else "-" for c in cases]
    row += ["" for c in cases[1:]]
    rows.append(row)
json.dump(summary, open(os.path.join(results, "summary.json"), "w"), indent=1)

header = ["workload", "unit"] + cases + [f"{c}/{base}" for c in cases[1:]]
widths = [max(len(r[i]) for r in rows + [header]) for i in range(len(header))]
def line(r):
    return "| " + " | ".join(c.ljust(widths[i]) if i < 2 else c.rjust(widths[i])
                             for i, c in enumerate(r)) + " |"
print(line(header))
print("|" + "|".join(("-" * (w + 1) + ":") if i >= 2 else "-" * (w + 2)
                     for i, w in enumerate(widths)) + "|")
for r in rows:
    print(line(r))
if per_round:
    print(f"\n{len(rounds)} rounds (table: medians; ratios paired per round):")
    print("\n".join(per_round))
EOF
}

# ---- main ------------------------------------------------------------------------------------
main() {
    [[ $(id -u) -eq 0 ]] || die "run as root (losetup, mount)"
    need fio
    need python3
    need losetup
    need mkfs.ext4
    need mountpoint
    [[ $ROUNDS =~ ^[1-9][0-9]*$ ]] || die "--rounds wants a positive number"
    find_binary "$REPO_DIR" "$BINARY" "$BUILD"

    mkdir -p "$BASE_DIR"
    WORK_DIR=$(mktemp -d "$BASE_DIR/qrbd-fio.XXXXXX")
    RESULTS=$WORK_DIR/results
    mkdir -p "$RESULTS"
    log "work dir $WORK_DIR (on $(df --output=source "$WORK_DIR" | tail -1))"

    local case round workload
    declare -A case_dir=()
    IFS=, read -r -a case_list <<<"$CASES"
    IFS=, read -r -a workload_list <<<"$WORKLOADS"
    for case in "${case_list[@]}"; do
        declare -F "setup_${case//-/_}" >/dev/null || die "unknown case $case"
    done
    for case in "${case_list[@]}"; do
        CASE_DIR=""
        "setup_${case//-/_}"
        case_dir[$case]=$CASE_DIR
    done
    for ((round = 1; round <= ROUNDS; round++)); do
        for workload in "${workload_list[@]}"; do
            for case in "${case_list[@]}"; do
                run_suite "$case" "${case_dir[$case]}" "$round" "$workload"
            done
        done
    done
    for case in "${case_list[@]}"; do
        if declare -F "finish_${case//-/_}" >/dev/null; then "finish_${case//-/_}"; fi
    done
    teardown

    echo
    echo "fio e2e: image $IMAGE_SIZE, seq $SEQ_SIZE, random file $RAND_SIZE, ${RUNTIME}s," \
        "iodepth $IODEPTH, $(nproc) CPUs, kernel $(uname -r), $(date -u +%Y-%m-%dT%H:%MZ)" \
        "$( ((PIN)) && echo ', daemons pinned: primary CPU 0, peer CPU 1')"
    report
    if [[ -s $RESULTS/verify ]]; then
        echo
        echo "replicated cases, after unmounting and waiting for unacked == 0:"
        sed 's/^/  /' "$RESULTS/verify"
    fi
    if [[ -s $RESULTS/rss ]]; then
        echo
        echo "qrbd daemons at the end of the run:"
        sed 's/^/  /' "$RESULTS/rss"
    fi
}

main
