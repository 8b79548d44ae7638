#!/usr/bin/env bash
# Builds the qrbd packages from the release build:
#
#   target/packages/qrbd_<version>-1_<arch>.deb    (cargo-deb)
#   target/packages/qrbd-<version>-1.<arch>.rpm    (rpmbuild, from packaging/rpm/qrbd.spec.in)
#
# The .deb contents are declared in Cargo.toml ([package.metadata.deb]); the .rpm's in
# packaging/rpm/qrbd.spec.in (the same files). rpmbuild comes with Debian's `rpm` package, so
# no packaging tool has to be compiled for it. The man pages and shell completions are generated from the
# CLI definition by the release binary (`qrbd generate-docs`) into target/packages/docs.
#
# cargo-deb is installed with `cargo install --locked` when missing (about two minutes of
# compiling, once; an installed version is used as it is).
set -euo pipefail
cd "$(dirname "$0")/.."

CARGO_DEB_VERSION=3.8.0

out=target/packages
docs=$out/docs
stage=$out/stage

step() { printf '\n== %s\n' "$*"; }

ensure_tool() { # cargo subcommand, crate, version
    if cargo "$1" --version >/dev/null 2>&1; then
        echo "using $(cargo "$1" --version)"
    else
        echo "installing $2 $3 (cargo install --locked)"
        cargo install "$2" --version "$3" --locked
    fi
}

step "packaging tools"
ensure_tool deb cargo-deb "$CARGO_DEB_VERSION"
command -v rpmbuild >/dev/null || { echo "rpmbuild is missing (Debian: apt-get install rpm)" >&2; exit 1; }

# Reproducible timestamps in both packages: the last commit's time. Given to the packaging
# tools only: the cc crate tracks SOURCE_DATE_EPOCH, so exporting it to `cargo build` would
# rebuild ring & co. whenever it differs from the last build's environment.
epoch=${SOURCE_DATE_EPOCH:-$(git log -1 --format=%ct 2>/dev/null || date +%s)}

step "release build"
cargo build --release --locked -p qrbd --bin qrbd
target_dir=$(cargo metadata --format-version 1 --no-deps | sed -n 's/.*"target_directory":"\([^"]*\)".*/\1/p')
binary=$target_dir/release/qrbd
[ -x "$binary" ] || { echo "no release binary at $binary" >&2; exit 1; }

step "man pages and completions"
rm -rf "$docs" "$stage"
mkdir -p "$stage"
"$binary" generate-docs --out-dir "$docs" >/dev/null
gzip -9n "$docs"/man8/*.8
ls "$docs"/man8 "$docs"/completions

# cargo-deb strips its own copy (--strip); the .rpm packages the stripped copy made here.
cp "$binary" "$stage/qrbd"
if command -v strip >/dev/null 2>&1; then
    strip --strip-debug "$stage/qrbd"
else
    echo "warning: no strip(1); the .rpm carries the binary with its debug information" >&2
fi

rm -f "$out"/qrbd_*.deb "$out"/qrbd-*.rpm

step "deb"
SOURCE_DATE_EPOCH=$epoch cargo deb -p qrbd --no-build --strip --output "$out/"

step "rpm"
version=$(cargo metadata --format-version 1 --no-deps |
    sed -n 's/.*"name":"qrbd","version":"\([^"]*\)".*/\1/p')
[ -n "$version" ] || { echo "cannot read the package version" >&2; exit 1; }
rpmtop=$(mktemp -d)
trap 'rm -rf "$rpmtop"' EXIT
root=$rpmtop/files
install -D -m 755 "$stage/qrbd" "$root/usr/bin/qrbd"
install -D -m 644 packaging/qrbd.toml "$root/etc/qrbd/qrbd.toml"
install -D -m 644 packaging/qrbd.service "$root/usr/lib/systemd/system/qrbd.service"
install -d "$root/usr/share/man/man8" "$root/usr/share/doc/qrbd/examples"
install -m 644 "$docs"/man8/*.8.gz "$root/usr/share/man/man8/"
install -D -m 644 "$docs/completions/qrbd.bash" "$root/usr/share/bash-completion/completions/qrbd"
install -D -m 644 "$docs/completions/_qrbd" "$root/usr/share/zsh/site-functions/_qrbd"
install -D -m 644 "$docs/completions/qrbd.fish" "$root/usr/share/fish/vendor_completions.d/qrbd.fish"
install -m 644 README.md docs/status-json.md docs/protocol.md LICENSE "$root/usr/share/doc/qrbd/"
install -m 644 config/*.toml "$root/usr/share/doc/qrbd/examples/"
sed -e "s/@VERSION@/$version/" packaging/rpm/qrbd.spec.in >"$rpmtop/qrbd.spec"
SOURCE_DATE_EPOCH=$epoch rpmbuild -bb --quiet \
    --define "_topdir $rpmtop/top" \
    --define "_rpmdir $PWD/$out" \
    --define "_build_name_fmt %%{NAME}-%%{VERSION}-%%{RELEASE}.%%{ARCH}.rpm" \
    --define "_build_id_links none" \
    --define "__os_install_post %{nil}" \
    --define "qrbd_files $root" \
    --define "qrbd_scripts $PWD/packaging/rpm" \
    "$rpmtop/qrbd.spec"

step "packages"
ls -l "$out"/qrbd_*.deb "$out"/qrbd-*.rpm
