#!/usr/bin/env bash
# Builds converge_<version>_<arch>.deb with dpkg-deb from a staged tree: the release
# binary, both systemd units, the default /etc/converge/converge.toml (a conffile), man
# pages and shell completions generated from the binary's own command line
# (`converge generate man|completions`), and maintainer scripts that create the data
# directory but never enable or start the agent (enroll and configure first), restart a
# running agent on upgrade, and leave converged host state and the data directory alone
# on removal and purge (decommission with `converge reset --purge-state` before).
#
# Usage: install/deb.sh [--binary PATH] [--version V] [--out DIR]
#   --binary   the converge binary to package (default: $CARGO_TARGET_DIR or target,
#              release/converge; built with `cargo build --release` if missing)
#   --version  package version (default: the workspace version from Cargo.toml)
#   --out      where the .deb is written (default: the current directory)
# CONVERGE_DEB_COMPRESS: dpkg-deb's compressor (default xz; the tests use none, since a
# debug binary is large and its package is thrown away).
set -euo pipefail

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
target=${CARGO_TARGET_DIR:-$repo/target}
binary=$target/release/converge
version=
out=$PWD

while [[ $# -gt 0 ]]; do
  case $1 in
    --binary) binary=$2; shift 2 ;;
    --version) version=$2; shift 2 ;;
    --out) out=$2; shift 2 ;;
    -h|--help) sed -n '2,15p' "$0"; exit 0 ;;
    *) echo "deb.sh: unknown argument $1" >&2; exit 2 ;;
  esac
done

if [[ -z $version ]]; then
  version=$(sed -n '/^\[workspace.package\]/,/^\[/s/^version = "\(.*\)"/\1/p' "$repo/Cargo.toml")
fi
if [[ ! -x $binary ]]; then
  (cd "$repo" && cargo build --release --bin converge)
fi
arch=$(dpkg --print-architecture)
deb=$out/converge_${version}_${arch}.deb

stage=$(mktemp -d)
trap 'rm -rf "$stage"' EXIT
root=$stage/root
install -d -m 0755 "$root/DEBIAN" "$root/usr/bin" "$root/lib/systemd/system" \
  "$root/etc/converge" "$root/usr/share/man/man1" "$root/usr/share/doc/converge" \
  "$root/usr/share/bash-completion/completions" "$root/usr/share/zsh/vendor-completions" \
  "$root/usr/share/fish/vendor_completions.d"

install -m 0755 "$binary" "$root/usr/bin/converge"
# The units in systemd/ are written for install/setup.sh (/usr/local/bin); the package
# puts the binary in /usr/bin.
for unit in converge.service converge-proxy.service; do
  sed 's#/usr/local/bin/converge#/usr/bin/converge#g' "$repo/systemd/$unit" >"$root/lib/systemd/system/$unit"
  chmod 0644 "$root/lib/systemd/system/$unit"
done
install -m 0644 "$repo/install/converge.toml" "$root/etc/converge/converge.toml"

"$binary" generate man "$stage/man" >/dev/null
for page in "$stage"/man/*.1; do
  name=$(basename "$page")
  gzip -9n <"$page" >"$root/usr/share/man/man1/$name.gz"
done
"$binary" generate completions "$stage/completions" >/dev/null
install -m 0644 "$stage/completions/converge.bash" "$root/usr/share/bash-completion/completions/converge"
install -m 0644 "$stage/completions/_converge" "$root/usr/share/zsh/vendor-completions/_converge"
install -m 0644 "$stage/completions/converge.fish" "$root/usr/share/fish/vendor_completions.d/converge.fish"

cat >"$root/usr/share/doc/converge/copyright" <<'EOF'
Format: https://www.debian.org/doc/packaging-manuals/copyright-format/1.0/
Upstream-Name: converge

Files: *
License: GPL-3.0-or-later
 On Debian systems, the full text of the GNU General Public License version 3 can be
 found in /usr/share/common-licenses/GPL-3.
EOF

echo /etc/converge/converge.toml >"$root/DEBIAN/conffiles"

cat >"$root/DEBIAN/postinst" <<'EOF'
#!/bin/sh
# converge postinst: the data directory (0700; the agent opens it to 0711 when it
# starts, so the daemons it runs can reach their own subdirectories). The agent is not
# enabled or started here: enroll (`converge join`) or configure it first, then
# `systemctl enable --now converge` (or converge-proxy). On upgrade a running agent is
# restarted on the new binary; converged state stays in place through the restart.
set -e
case "$1" in
  configure)
    if [ ! -d /var/lib/converge ]; then
      install -d -m 0700 /var/lib/converge
    fi
    if [ -d /run/systemd/system ]; then
      systemctl daemon-reload >/dev/null 2>&1 || true
      if [ -n "$2" ]; then
        systemctl try-restart converge.service converge-proxy.service >/dev/null 2>&1 || true
      fi
    fi
    if [ -z "$2" ]; then
      echo "converge: installed, not started. Enroll with 'converge join --url URL --token T'" \
        "(or edit /etc/converge/converge.toml), then 'systemctl enable --now converge'."
    fi
    ;;
esac
exit 0
EOF

cat >"$root/DEBIAN/prerm" <<'EOF'
#!/bin/sh
# converge prerm: on removal the agent stops (gracefully: what it converged stays in
# place). Containers, tables, tunnels, DNS and routes keep running: `converge reset`
# before removing the package decommissions the node.
set -e
case "$1" in
  remove)
    if [ -d /run/systemd/system ]; then
      systemctl disable --now converge.service converge-proxy.service >/dev/null 2>&1 || true
    fi
    ;;
esac
exit 0
EOF

cat >"$root/DEBIAN/postrm" <<'EOF'
#!/bin/sh
# converge postrm: purge removes the configuration (dpkg) but keeps /var/lib/converge
# (the node's keys, enrollment and store) and everything converge set up on the host:
# run `converge reset --purge-state` before purging to decommission the node.
set -e
case "$1" in
  purge)
    if [ -d /var/lib/converge ]; then
      echo "converge: /var/lib/converge and converged host state were left in place" \
        "(decommission with 'converge reset --purge-state' before purging)."
    fi
    rmdir /etc/converge 2>/dev/null || true
    ;;
  remove)
    if [ -d /run/systemd/system ]; then
      systemctl daemon-reload >/dev/null 2>&1 || true
    fi
    ;;
esac
exit 0
EOF
chmod 0755 "$root/DEBIAN/postinst" "$root/DEBIAN/prerm" "$root/DEBIAN/postrm"

installed_size=$(du -sk --exclude=DEBIAN "$root" | cut -f1)
cat >"$root/DEBIAN/control" <<EOF
Package: converge
Version: $version
Architecture: $arch
Maintainer: converge developers <converge@example.invalid>
Installed-Size: $installed_size
Depends: libc6, iproute2, nftables
Recommends: dnsmasq-base, wireguard-tools, podman | docker.io, borgbackup
Suggests: wireguard-go, caddy
Section: admin
Priority: optional
Homepage: https://example.invalid/converge
Description: node agent converging a host to a signed desired-state document
 converge makes one Linux host match a desired-state document pushed by a control
 plane: containers (Podman or Docker), a WireGuard mesh, nftables, DNS (dnsmasq),
 Caddy routes on proxy nodes, borg backups and node metadata, each reconciled
 independently with drift repair. The agent is not started at installation.
EOF

mkdir -p "$out"
dpkg-deb --root-owner-group -Z"${CONVERGE_DEB_COMPRESS:-xz}" --build "$root" "$deb" >/dev/null
echo "$deb"
