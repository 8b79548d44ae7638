# Shell functions shared by the end-to-end benchmarks (fio-e2e.sh, resync.sh). Sourced, not
# run: the script that sources it sets `set -euo pipefail` first, calls `install_cleanup` once,
# then sets KEEP and PIN (its options) and QRBD (`find_binary`) and WORK_DIR before it starts
# anything.
#
# Cleanup: everything created is registered as soon as it exists (MOUNTS, LOOPS, DAEMON_PIDS,
# BG_PIDS, FIO_PID); `teardown` undoes it in reverse order: background helpers, fio, mounts,
# loop devices, then the daemons (latest started first). `cleanup` (the EXIT trap) runs it
# once, after a failure, Ctrl-C and SIGTERM too, and removes WORK_DIR unless KEEP=1 or the
# script failed.
#
# Variables the functions read: IMAGE_SIZE (the resource size, qrbd syntax), PIN (1: pin the
# daemons with taskset), DISK_FLUSHES, RESOURCE_EXTRA (more `[[resource]]` lines for
# pair_config, e.g. "resync_rate = 0").
# shellcheck shell=bash

log() { printf '==> %s\n' "$*" >&2; }
die() { printf 'error: %s\n' "$*" >&2; exit 1; }
need() { command -v "$1" >/dev/null 2>&1 || die "$1 is needed but not installed"; }

# ---- cleanup ---------------------------------------------------------------------------------
WORK_DIR=""
QRBD=""
KEEP=0
PIN=0
MOUNTS=()        # ext4 mount points
LOOPS=()         # loop devices
DAEMON_PIDS=()   # qrbd daemons, as "pid:config:mount_dir"
BG_PIDS=()       # other background helpers of the script (killed first)
FIO_PID=""
CLEANING=0

unmount_path() {
    local target=$1
    mountpoint -q "$target" 2>/dev/null || return 0
    umount "$target" 2>/dev/null || umount -l "$target" 2>/dev/null || true
}

stop_daemon() {
    # stop_daemon "pid:config:mount_dir": secondary, SIGTERM, wait up to 30 s, then SIGKILL.
    local pid config mount_dir deadline
    IFS=: read -r pid config mount_dir <<<"$1"
    if kill -0 "$pid" 2>/dev/null; then
        timeout 30 "$QRBD" --config "$config" secondary r0 >/dev/null 2>&1 || true
        kill -TERM "$pid" 2>/dev/null || true
        deadline=$((SECONDS + 30))
        while kill -0 "$pid" 2>/dev/null && ((SECONDS < deadline)); do sleep 0.1; done
        if kill -0 "$pid" 2>/dev/null; then
            echo "warning: daemon $pid did not exit in 30 s; killing it" >&2
            kill -KILL "$pid" 2>/dev/null || true
        fi
        wait "$pid" 2>/dev/null || true
    fi
    # A killed daemon leaves its FUSE mount behind.
    if mountpoint -q "$mount_dir" 2>/dev/null; then
        fusermount3 -u "$mount_dir" 2>/dev/null || umount -l "$mount_dir" 2>/dev/null || true
    fi
}

stop_fio() {
    local deadline
    [[ -n $FIO_PID ]] || return 0
    kill -INT "$FIO_PID" 2>/dev/null || true
    deadline=$((SECONDS + 15))
    while kill -0 "$FIO_PID" 2>/dev/null && ((SECONDS < deadline)); do sleep 0.1; done
    kill -KILL "$FIO_PID" 2>/dev/null || true
    wait "$FIO_PID" 2>/dev/null || true
    FIO_PID=""
}

stop_bg() {
    local pid
    for pid in "${BG_PIDS[@]}"; do
        kill -TERM "$pid" 2>/dev/null || true
        wait "$pid" 2>/dev/null || true
    done
    BG_PIDS=()
}

teardown() {
    local i
    stop_bg
    stop_fio
    for ((i = ${#MOUNTS[@]} - 1; i >= 0; i--)); do unmount_path "${MOUNTS[i]}"; done
    MOUNTS=()
    for ((i = ${#LOOPS[@]} - 1; i >= 0; i--)); do
        losetup -d "${LOOPS[i]}" 2>/dev/null || true
    done
    LOOPS=()
    for ((i = ${#DAEMON_PIDS[@]} - 1; i >= 0; i--)); do stop_daemon "${DAEMON_PIDS[i]}"; done
    DAEMON_PIDS=()
}

cleanup() {
    local status=$?
    ((CLEANING)) && return
    CLEANING=1
    trap '' INT TERM
    teardown
    if [[ -n $WORK_DIR && -d $WORK_DIR ]]; then
        if ((KEEP)) || ((status != 0)); then
            echo "kept $WORK_DIR (fio JSON, daemon logs)" >&2
        else
            rm -rf "$WORK_DIR"
        fi
    fi
    return "$status"
}

install_cleanup() {
    trap cleanup EXIT
    trap 'echo "interrupted" >&2; exit 130' INT
    trap 'exit 143' TERM
}

forget() {
    # forget ARRAY VALUE: drop VALUE from the cleanup array ARRAY.
    local -n arr=$1
    local kept=() v
    for v in "${arr[@]}"; do [[ $v == "$2" ]] || kept+=("$v"); done
    arr=("${kept[@]}")
}

# ---- helpers ---------------------------------------------------------------------------------
find_binary() {
    # find_binary REPO_DIR BINARY BUILD: sets QRBD. Without BINARY, the release build of the
    # repository (CARGO_TARGET_DIR is honoured), built first when BUILD is 1.
    local repo=$1 binary=$2 build=$3 target=${CARGO_TARGET_DIR:-target}
    if [[ -z $binary ]]; then
        [[ $target == /* ]] || target=$repo/$target
        binary=$target/release/qrbd
        if ((build)); then
            log "cargo build --release"
            (cd "$repo" && cargo build --release --quiet)
        fi
    fi
    [[ -x $binary ]] || die "no qrbd binary at $binary (build it or pass --binary)"
    QRBD=$binary
}

LOOP_DEV=""
attach_loop() {
    # attach_loop FILE: sets LOOP_DEV. Not a $(...) function: the registration for cleanup
    # would be lost in the subshell.
    LOOP_DEV=$(losetup --direct-io=on --find --show "$1")
    LOOPS+=("$LOOP_DEV")
}

mkfs_and_mount() {
    # mkfs_and_mount DEVICE MOUNTPOINT. Inode tables and journal are initialised now, not by a
    # background thread during the measurements.
    mkfs.ext4 -q -F -E lazy_itable_init=0,lazy_journal_init=0 "$1"
    mkdir -p "$2"
    mount "$1" "$2"
    MOUNTS+=("$2")
}

free_port() {
    python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

free_udp_port() {
    python3 -c 'import socket; s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

size_bytes() {
    # The qrbd size syntax (4GiB, 512MiB, 1G, 4096) in bytes.
    python3 - "$1" <<'EOF'
import re, sys
m = re.fullmatch(r"\s*(\d+)\s*([KMGT]?)(i?B)?\s*", sys.argv[1], re.I)
if not m:
    sys.exit(f"bad size {sys.argv[1]!r}")
print(int(m.group(1)) << (10 * " KMGT".index((m.group(2) or " ").upper())))
EOF
}

# ---- daemons ---------------------------------------------------------------------------------
declare -A CASE_PIDS=()     # case -> "label:pid label:pid", for RSS and CPU figures

wait_for_image() {
    # wait_for_image IMAGE PID LOG: until the daemon's FUSE image exists (20 s at most).
    local image=$1 pid=$2 logfile=$3 deadline=$((SECONDS + 20))
    until [[ -e $image ]]; do
        kill -0 "$pid" 2>/dev/null || { cat "$logfile" >&2; die "the daemon exited early"; }
        ((SECONDS < deadline)) ||
            { cat "$logfile" >&2; die "timed out after 20 s waiting for $image"; }
        sleep 0.1
    done
}

START_PID=""
start_daemon() {
    # start_daemon LABEL CONFIG DIR: create-md r0 and start the daemon of CONFIG (state in DIR),
    # registered for cleanup; sets START_PID. In a session of its own: Ctrl-C must not reach
    # the daemon (it shuts down on SIGINT) while the loop device and the ext4 on its image are
    # still up; cleanup stops it in order.
    local label=$1 config=$2 dir=$3 cpu=${4:-0} pin=()
    log "$label: create-md r0 ($IMAGE_SIZE)"
    "$QRBD" --config "$config" create-md r0 >"$dir/create-md.out"
    ((PIN)) && pin=(taskset -c "$cpu")
    log "$label: daemon (log: $dir/daemon.log)${pin:+ on CPU $cpu}"
    setsid "${pin[@]}" "$QRBD" --config "$config" --log-level info daemon </dev/null \
        >"$dir/daemon.log" 2>&1 &
    START_PID=$!
    DAEMON_PIDS+=("$START_PID:$config:$dir/disks")
    echo "$START_PID" >"$dir/daemon.pid"
}

pair_config() {
    # pair_config DIR NAME ID LISTEN_PORT PEER PEER_ID PEER_PORT PROTOCOL [DISK_FLUSHES]: the
    # config of one node of a two-node pair on 127.0.0.1 (certificates in DIR/tls), on stdout.
    # RESOURCE_EXTRA, if set, is added to the [[resource]] table.
    local dir=$1 name=$2 id=$3 port=$4 peer=$5 peer_id=$6 peer_port=$7 protocol=$8
    local disk_flushes=${9:-true}
    cat <<EOF
[node]
name = "$name"
id = $id
state_dir = "$dir/$name/state"
mount_dir = "$dir/$name/disks"
admin_socket = "$dir/$name/qrbd.sock"
listen = "127.0.0.1:$port"

[tls]
ca = "$dir/tls/ca.crt"
cert = "$dir/tls/$name.crt"
key = "$dir/tls/$name.key"

[[resource]]
name = "r0"
size = "$IMAGE_SIZE"
protocol = "$protocol"
disk_flushes = $disk_flushes
${RESOURCE_EXTRA:-}

[[resource.peer]]
name = "$peer"
id = $peer_id
address = "127.0.0.1:$peer_port"
EOF
}

peer_field() {
    # peer_field CONFIG FIELD: r0's first peer's FIELD from `qrbd status --json` ("" on error).
    timeout 10 "$QRBD" --config "$1" status --json 2>/dev/null | python3 -c '
import json, sys
try:
    r = [r for r in json.load(sys.stdin) if r["name"] == "r0"][0]
    print(r["peers"][0][sys.argv[1]])
except Exception:
    pass' "$2" || true
}

start_pair() {
    # start_pair CASE PROTOCOL: in WORK_DIR/CASE, alpha (id 0) dials beta (id 1), both on
    # 127.0.0.1 with free UDP ports and certificates from `qrbd gen-cert`; waits until they
    # are connected and makes alpha Primary. Sets PAIR_DIR, PAIR_IMAGE (alpha's image) and
    # CASE_PIDS[CASE] ("alpha:PID beta:PID").
    local name=$1 protocol=$2 dir=$WORK_DIR/$1 alpha_port beta_port node deadline
    local alpha_pid beta_pid
    mkdir -p "$dir/alpha" "$dir/beta"
    for node in alpha beta; do
        "$QRBD" gen-cert --ca-dir "$dir/tls" --node "$node" >>"$dir/gen-cert.out"
    done
    alpha_port=$(free_udp_port)
    beta_port=$(free_udp_port)
    while [[ $beta_port == "$alpha_port" ]]; do beta_port=$(free_udp_port); done
    pair_config "$dir" alpha 0 "$alpha_port" beta 1 "$beta_port" "$protocol" "${DISK_FLUSHES:-true}" >"$dir/alpha.toml"
    pair_config "$dir" beta 1 "$beta_port" alpha 0 "$alpha_port" "$protocol" "${DISK_FLUSHES:-true}" >"$dir/beta.toml"
    # beta first, so that the reverse-order teardown stops the primary (alpha) first.
    start_daemon "$name/beta" "$dir/beta.toml" "$dir/beta" 1
    beta_pid=$START_PID
    start_daemon "$name/alpha" "$dir/alpha.toml" "$dir/alpha" 0
    alpha_pid=$START_PID
    CASE_PIDS[$name]="alpha:$alpha_pid beta:$beta_pid"
    # shellcheck disable=SC2034  # for the caller
    PAIR_DIR=$dir
    PAIR_IMAGE=$dir/alpha/disks/r0.img
    wait_for_image "$PAIR_IMAGE" "$alpha_pid" "$dir/alpha/daemon.log"
    log "$name: waiting for alpha and beta to connect (protocol $protocol)"
    deadline=$((SECONDS + 30))
    until [[ $(peer_field "$dir/alpha.toml" connection) == Connected ]]; do
        kill -0 "$alpha_pid" 2>/dev/null ||
            { cat "$dir/alpha/daemon.log" >&2; die "$name: alpha exited early"; }
        kill -0 "$beta_pid" 2>/dev/null ||
            { cat "$dir/beta/daemon.log" >&2; die "$name: beta exited early"; }
        if ((SECONDS >= deadline)); then
            "$QRBD" --config "$dir/alpha.toml" status >&2 || true
            tail -20 "$dir/alpha/daemon.log" "$dir/beta/daemon.log" >&2
            die "$name: alpha and beta did not connect within 30 s"
        fi
        sleep 0.2
    done
    # Two new, blank disks: no initial sync (docs/protocol.md, "The initial sync").
    "$QRBD" --config "$dir/alpha.toml" new-current-uuid --clear-bitmap r0 >/dev/null
    "$QRBD" --config "$dir/alpha.toml" primary r0 >/dev/null
}

daemon_cpu_ticks() {
    # daemon_cpu_ticks CASE: "label:ticks" of user+system time for each of the case's daemons
    # (fields 14 and 15 of /proc/PID/stat; the command name in field 2 has no spaces here).
    local entry label pid
    for entry in ${CASE_PIDS[$1]:-}; do
        label=${entry%%:*} pid=${entry##*:}
        [[ -r /proc/$pid/stat ]] || continue
        awk -v who="$label" '{ print who ":" $14 + $15 }' "/proc/$pid/stat"
    done
}

daemon_memory() {
    # daemon_memory CASE: VmHWM (peak RSS), VmRSS and Threads of the case's daemons, one
    # "CASE LABEL: FIELD VALUE" line each.
    local entry label pid
    for entry in ${CASE_PIDS[$1]:-}; do
        label=${entry%%:*} pid=${entry##*:}
        [[ -r /proc/$pid/status ]] || continue
        awk -v who="$1 $label" '/^VmHWM|^VmRSS|^Threads/ { print who ": " $0 }' \
            "/proc/$pid/status"
    done
}

# ---- fio -------------------------------------------------------------------------------------
run_fio() {
    # fio in the background and `wait` for it: fio catches SIGINT and exits 0, and bash does
    # not run the INT trap for a foreground child that handled the signal itself, so Ctrl-C
    # would only cut the current job short. `wait` is interrupted by the trap at once.
    fio "$@" >/dev/null &
    FIO_PID=$!
    wait "$FIO_PID"
    FIO_PID=""
}
