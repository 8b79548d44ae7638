#!/usr/bin/env bash
# CI check of the packages, on a Debian machine, as root:
#
#   - builds both packages (packaging/build.sh), then, for the .deb:
#   - dpkg -i; qrbd --version; the man page; completions, docs, unit, conffile;
#   - the shipped /etc/qrbd/qrbd.toml: refused until the node name is set, valid once it is;
#   - systemd-analyze verify of the unit (where systemd-analyze exists);
#   - the packaged binary runs the daemon with the shipped configuration filled in;
#   - reinstalling keeps the edited conffile; dpkg -r keeps /var/lib/qrbd (and its data);
#     dpkg --purge removes the configuration but still keeps /var/lib/qrbd;
#   - for the .rpm: rpm -qpl / -qpi / --requires / config flags / scripts.
#
# Idempotent, and it cleans up after itself (also on failure): the package is purged, the test
# resource's files are deleted, and /var/lib/qrbd is removed again if this script created it.
# It refuses to run where qrbd is installed for real (not by an earlier run of this script).
set -euo pipefail
cd "$(dirname "$0")/.."

[ "$(id -u)" -eq 0 ] || { echo "ci-check.sh: needs root (dpkg -i)" >&2; exit 1; }

MARKER=/var/tmp/qrbd-installed-by-ci-check
RESOURCE=ci-check-r0
declare -a TIMINGS=()
step_name=""
step_start=0
step() {
    finish_step
    step_name=$*
    step_start=$(date +%s)
    printf '\n== %s\n' "$step_name"
}
finish_step() {
    if [ -n "$step_name" ]; then
        TIMINGS+=("$(printf '%5ss  %s' "$(($(date +%s) - step_start))" "$step_name")")
    fi
    step_name=""
}
fail() { echo "ci-check.sh: FAILED: $*" >&2; exit 1; }
check() { # description, command...
    local what=$1
    shift
    if "$@"; then echo "ok: $what"; else fail "$what"; fi
}

installed() { dpkg-query -W -f='${Status}' qrbd 2>/dev/null | grep -q "ok installed"; }
known() { dpkg-query -W -f='${Status}' qrbd 2>/dev/null | grep -qv "not-installed"; }

daemon_pid=""
created_state_dir=false
created_run_dir=false
owns_package=false # set once this script may install and purge qrbd
cleanup() {
    local rc=$?
    finish_step
    if [ -n "$daemon_pid" ] && kill -0 "$daemon_pid" 2>/dev/null; then
        kill -TERM "$daemon_pid" 2>/dev/null || true
        for _ in $(seq 100); do kill -0 "$daemon_pid" 2>/dev/null || break; sleep 0.1; done
        kill -KILL "$daemon_pid" 2>/dev/null || true
    fi
    if mountpoint -q /run/qrbd/disks 2>/dev/null; then umount -l /run/qrbd/disks || true; fi
    if $owns_package; then
        if known; then dpkg --purge qrbd >/dev/null || true; fi
        rm -f "$MARKER"
    fi
    rm -rf "/var/lib/qrbd/$RESOURCE.img" "/var/lib/qrbd/$RESOURCE.meta"
    if $created_state_dir; then rmdir /var/lib/qrbd 2>/dev/null || true; fi
    if $created_run_dir; then rmdir /run/qrbd/disks /run/qrbd 2>/dev/null || true; fi
    rm -rf "${scratch:-}"
    if ((${#TIMINGS[@]})); then
        printf '\nci-check.sh timings:\n'
        printf '  %s\n' "${TIMINGS[@]}"
    fi
    if [ "$rc" -eq 0 ]; then echo "ci-check.sh: all package checks passed"; fi
    exit "$rc"
}
trap cleanup EXIT

step "preconditions"
if [ -S /run/qrbd/qrbd.sock ] || mountpoint -q /run/qrbd/disks 2>/dev/null; then
    fail "a qrbd daemon seems to run here (/run/qrbd); stop it first"
fi
if known; then
    if [ -e "$MARKER" ]; then
        echo "purging qrbd left by an earlier run of this script"
        dpkg --purge qrbd >/dev/null
        rm -f "$MARKER"
    else
        echo "qrbd is installed on this machine (not by ci-check.sh); refusing to touch it" >&2
        exit 1
    fi
fi
owns_package=true
if [ -e "/var/lib/qrbd/$RESOURCE.img" ] || [ -e "/var/lib/qrbd/$RESOURCE.meta" ]; then
    echo "removing the test resource left by an earlier run"
    rm -rf "/var/lib/qrbd/$RESOURCE.img" "/var/lib/qrbd/$RESOURCE.meta"
fi
[ -d /var/lib/qrbd ] || created_state_dir=true
[ -d /run/qrbd ] || created_run_dir=true
for tool in dpkg rpm gzip; do command -v "$tool" >/dev/null || fail "$tool is missing"; done
scratch=$(mktemp -d /tmp/qrbd-ci-check.XXXXXX)

step "build packages (packaging/build.sh)"
packaging/build.sh
deb=$(ls target/packages/qrbd_*.deb)
rpm=$(ls target/packages/qrbd-*.rpm)
version=$(sed -n 's/^version = "\(.*\)"/\1/p' Cargo.toml | head -1)
echo "deb: $deb"
echo "rpm: $rpm"

step "deb: metadata"
info=$(dpkg-deb --info "$deb")
check "Depends has fuse3" grep -Eq '^ Depends: .*\bfuse3\b' <<<"$info"
check "conffile /etc/qrbd/qrbd.toml" grep -qx /etc/qrbd/qrbd.toml <(dpkg-deb --ctrl-tarfile "$deb" | tar -xO ./conffiles)

step "deb: install"
touch "$MARKER"
dpkg -i "$deb"
check "package installed" installed
check "qrbd --version is $version" test "$(qrbd --version)" = "qrbd $version"
check "binary at /usr/bin/qrbd" test -x /usr/bin/qrbd
if command -v man >/dev/null && command -v mandb >/dev/null; then
    page=$(man -w qrbd 2>/dev/null || true)
    check "man -w qrbd finds qrbd(8)" test "$page" = /usr/share/man/man8/qrbd.8.gz
    check "qrbd(8) renders" bash -c 'man -P cat 8 qrbd 2>/dev/null | grep -q "SUBCOMMANDS"'
else
    check "qrbd(8) installed" test -s /usr/share/man/man8/qrbd.8.gz
fi
check "qrbd-status(8) installed" test -s /usr/share/man/man8/qrbd-status.8.gz
check "bash completion" bash -n /usr/share/bash-completion/completions/qrbd
check "bash completion registers qrbd" bash -c \
    'source /usr/share/bash-completion/completions/qrbd && complete -p qrbd >/dev/null'
check "zsh completion" test -s /usr/share/zsh/vendor-completions/_qrbd
check "fish completion" test -s /usr/share/fish/vendor_completions.d/qrbd.fish
for doc in README.md LICENSE copyright status-json.md; do
    check "/usr/share/doc/qrbd/$doc" test -s "/usr/share/doc/qrbd/$doc"
done
check "unit installed" test -s /usr/lib/systemd/system/qrbd.service
check "/var/lib/qrbd exists" test -d /var/lib/qrbd
check "service not enabled by the package" test ! -e /etc/systemd/system/multi-user.target.wants/qrbd.service

step "deb: systemd unit"
if command -v systemd-analyze >/dev/null; then
    # Offline verification: needs no running systemd. It also runs `man` for the unit's
    # Documentation=man:qrbd(8), so without man-db verify a copy without that reference.
    unit=/usr/lib/systemd/system/qrbd.service
    if ! command -v man >/dev/null; then
        sed 's/man:qrbd(8) //' "$unit" >"$scratch/qrbd.service"
        unit=$scratch/qrbd.service
    fi
    if ! out=$(systemd-analyze verify "$unit" 2>&1); then
        echo "$out"
        fail "systemd-analyze verify found problems in qrbd.service"
    fi
    echo "${out:-(no findings)}"
    echo "ok: systemd-analyze verify"
else
    echo "skipped: no systemd-analyze"
fi

step "deb: shipped configuration"
if out=$(qrbd check-config 2>&1); then
    fail "the shipped configuration passed check-config without a node name: $out"
fi
check "unset node name is named in the error" grep -q '"name"' <<<"$out"
# Fill it in as an administrator would: the node name, a resource, metrics on.
metrics_port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
sed -i -e 's/^#name = "alpha"/name = "ci-check"/' \
    -e "s/^#metrics = .*/metrics = \"127.0.0.1:$metrics_port\"/" /etc/qrbd/qrbd.toml
check "valid once the node name is set" qrbd check-config
cat >>/etc/qrbd/qrbd.toml <<EOF

[[resource]]
name = "$RESOURCE"
size = "16MiB"
EOF
check "valid with a resource" qrbd check-config
qrbd check-config

step "deb: packaged daemon with the shipped configuration"
qrbd create-md "$RESOURCE"
check "backing file in /var/lib/qrbd" test -e "/var/lib/qrbd/$RESOURCE.img"
qrbd --log-level info daemon >"$scratch/daemon.log" 2>&1 &
daemon_pid=$!
for _ in $(seq 200); do
    qrbd status >/dev/null 2>&1 && break
    kill -0 "$daemon_pid" 2>/dev/null || { cat "$scratch/daemon.log"; fail "the daemon exited"; }
    sleep 0.1
done
qrbd status || { cat "$scratch/daemon.log"; fail "the daemon does not answer"; }
check "image visible" test -e "/run/qrbd/disks/$RESOURCE.img"
check "status --json names the resource" bash -c "qrbd status --json | grep -q '\"name\": \"$RESOURCE\"'"
exec 3<>"/dev/tcp/127.0.0.1/$metrics_port"
printf 'GET /metrics HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n' >&3
scrape=$(cat <&3)
exec 3<&-
check "metrics endpoint answers 200" grep -q '^HTTP/1.1 200' <<<"$scrape"
check "metrics list the resource" grep -q "qrbd_resource_written_bytes_total{resource=\"$RESOURCE\"}" <<<"$scrape"
kill -TERM "$daemon_pid"
wait "$daemon_pid" || fail "the daemon did not exit 0 on SIGTERM"
daemon_pid=""
check "image unmounted" bash -c '! mountpoint -q /run/qrbd/disks'

step "deb: reinstall keeps the edited conffile"
dpkg -i "$deb"
check "node name still set" grep -q '^name = "ci-check"' /etc/qrbd/qrbd.toml
check "resource still there" grep -q "^name = \"$RESOURCE\"" /etc/qrbd/qrbd.toml

step "deb: remove keeps configuration and data"
dpkg -r qrbd
check "binary removed" test ! -e /usr/bin/qrbd
check "/var/lib/qrbd kept" test -d /var/lib/qrbd
check "data kept" test -e "/var/lib/qrbd/$RESOURCE.img"
check "conffile kept (remove is not purge)" test -e /etc/qrbd/qrbd.toml

step "deb: purge removes configuration, keeps data"
dpkg --purge qrbd
check "conffile removed" test ! -e /etc/qrbd/qrbd.toml
check "package purged" bash -c '! dpkg-query -W -f="\${Status}" qrbd 2>/dev/null | grep -q "ok installed"'
check "/var/lib/qrbd kept after purge" test -d /var/lib/qrbd
check "data kept after purge" test -e "/var/lib/qrbd/$RESOURCE.img"

step "rpm: inspect"
rpm -qpi "$rpm"
files=$(rpm -qpl "$rpm")
for path in /usr/bin/qrbd /etc/qrbd/qrbd.toml /usr/lib/systemd/system/qrbd.service \
    /usr/share/man/man8/qrbd.8.gz /usr/share/bash-completion/completions/qrbd \
    /usr/share/zsh/site-functions/_qrbd /usr/share/fish/vendor_completions.d/qrbd.fish \
    /usr/share/doc/qrbd/README.md /usr/share/doc/qrbd/LICENSE /usr/share/doc/qrbd/status-json.md; do
    check "rpm has $path" grep -qx "$path" <<<"$files"
done
check "rpm version $version" test "$(rpm -qp --qf '%{VERSION}' "$rpm")" = "$version"
check "rpm license Apache-2.0" test "$(rpm -qp --qf '%{LICENSE}' "$rpm")" = "Apache-2.0"
check "rpm requires fuse3" grep -qx fuse3 <(rpm -qp --requires "$rpm")
check "rpm: qrbd.toml is %config(noreplace)" grep -qx '/etc/qrbd/qrbd.toml cn' \
    <(rpm -qp --qf '[%{FILENAMES} %{FILEFLAGS:fflags}\n]' "$rpm")
scripts=$(rpm -qp --scripts "$rpm")
check "rpm %post makes /var/lib/qrbd" grep -q 'install -d -m 0700 /var/lib/qrbd' <<<"$scripts"
check "rpm scripts never delete /var/lib/qrbd" bash -c '! grep -Eq "rm .*/var/lib/qrbd" <<<"$1"' _ "$scripts"
finish_step
