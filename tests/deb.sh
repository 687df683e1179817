#!/usr/bin/env bash
# The Debian package in a throwaway Debian 12 root (chroot; no systemd needed for
# install and purge): install, conffile and data directory, the agent not started,
# man pages and completions, an upgrade that keeps an edited conffile, `converge`
# reading the packaged configuration, and a purge that removes the configuration but
# leaves the data directory (host state is `converge reset`'s to remove).
#
# Usage: tests/deb.sh [--binary PATH] [--root DIR]   (root; builds the root with
# mmdebstrap on first use: about 90 s from the Debian mirror)
# dpkg-query formats below are literal ${Field}s, not shell expansions.
# shellcheck disable=SC2016
set -euo pipefail

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
root=/var/tmp/converge-ops-root
binary=${CARGO_TARGET_DIR:-$repo/target}/release/converge
while [[ $# -gt 0 ]]; do
  case $1 in
    --binary) binary=$2; shift 2 ;;
    --root) root=$2; shift 2 ;;
    *) echo "deb.sh: unknown argument $1" >&2; exit 2 ;;
  esac
done

fail() { echo "FAIL: $*" >&2; exit 1; }
ok() { echo "ok: $*"; }
in_root() { chroot "$root" "$@"; }
query() { in_root dpkg-query -W -f="$1" converge; }

if [[ ! -x $root/usr/bin/dpkg ]]; then
  command -v mmdebstrap >/dev/null || apt-get install -y mmdebstrap
  mmdebstrap --variant=minbase --include=iproute2,nftables bookworm "$root"
fi

work=$(mktemp -d)
trap 'rm -rf "$work"; rm -f "$root"/tmp/converge_*.deb' EXIT
"$repo/install/deb.sh" --binary "$binary" --version 0.1.0 --out "$work/v1" >/dev/null
"$repo/install/deb.sh" --binary "$binary" --version 0.1.1 --out "$work/v2" >/dev/null
v1=$(ls "$work"/v1/converge_0.1.0_*.deb)
v2=$(ls "$work"/v2/converge_0.1.1_*.deb)
echo "package: $(basename "$v1"), $(du -k "$v1" | cut -f1) KiB"
dpkg-deb --info "$v1" | sed -n '/Package:/,/Description:/p'
cp "$v1" "$v2" "$root/tmp/"

# A clean start, whatever an earlier run left.
in_root dpkg --purge converge >/dev/null 2>&1 || true
rm -rf "$root/var/lib/converge" "$root/etc/converge"

# Install.
in_root dpkg -i "/tmp/$(basename "$v1")" >"$work/install.log" 2>&1 || { cat "$work/install.log"; fail "dpkg -i"; }
grep -q "installed, not started" "$work/install.log" || fail "install message"
[[ $(query '${Status} ${Version}') == "install ok installed 0.1.0" ]] || fail "status"
in_root converge --version >/dev/null || fail "binary runs"
[[ $(stat -c %a "$root/var/lib/converge") == 700 ]] || fail "data dir mode"
[[ -f $root/etc/converge/converge.toml ]] || fail "default config"
query '${Conffiles}' | grep -q /etc/converge/converge.toml || fail "conffile"
grep -q '^ExecStart=/usr/bin/converge agent' "$root/lib/systemd/system/converge.service" || fail "unit path"
grep -q -- '--proxy' "$root/lib/systemd/system/converge-proxy.service" || fail "proxy unit"
[[ ! -e $root/etc/systemd/system/multi-user.target.wants/converge.service ]] || fail "enabled at install"
for f in usr/share/man/man1/converge.1.gz usr/share/man/man1/converge-agent.1.gz \
  usr/share/man/man1/converge-reset.1.gz usr/share/bash-completion/completions/converge \
  usr/share/zsh/vendor-completions/_converge usr/share/fish/vendor_completions.d/converge.fish; do
  [[ -s $root/$f ]] || fail "missing /$f"
done
zcat "$root/usr/share/man/man1/converge-agent.1.gz" | grep -q 'metrics\\-listen' || fail "man page content"
ok "install: binary, units (not enabled), conffile, data dir 0700, man pages, completions"

# The packaged configuration is read (a bad key would fail every command).
in_root converge schema >/dev/null || fail "converge with the default config"
echo 'resync-secs = 15' >>"$root/etc/converge/converge.toml"
in_root converge schema >/dev/null || fail "converge with an edited config"
echo 'no-such-key = 1' >>"$root/etc/converge/converge.toml"
if in_root converge schema >/dev/null 2>"$work/err"; then fail "unknown key accepted"; fi
grep -q "converge.toml:.*unknown key \"no-such-key\"" "$work/err" || { cat "$work/err"; fail "unknown key message"; }
sed -i '/no-such-key/d' "$root/etc/converge/converge.toml"
ok "configuration: packaged file read, unknown key refused with its line"

# Upgrade: the operator's edit of the conffile stays.
echo stored >"$root/var/lib/converge/marker"
in_root dpkg -i --force-confold "/tmp/$(basename "$v2")" >"$work/upgrade.log" 2>&1 || { cat "$work/upgrade.log"; fail "upgrade"; }
[[ $(query '${Version}') == 0.1.1 ]] || fail "upgraded version"
grep -q '^resync-secs = 15' "$root/etc/converge/converge.toml" || fail "conffile edit lost"
[[ -f $root/var/lib/converge/marker ]] || fail "data dir touched by upgrade"
ok "upgrade 0.1.0 -> 0.1.1: edited conffile and data dir kept"

# Purge: configuration gone, data directory (keys, store) and host state left.
in_root dpkg --purge converge >"$work/purge.log" 2>&1 || { cat "$work/purge.log"; fail "purge"; }
[[ ! -e $root/usr/bin/converge ]] || fail "binary left"
[[ ! -e $root/etc/converge/converge.toml ]] || fail "conffile left after purge"
[[ ! -e $root/lib/systemd/system/converge.service ]] || fail "unit left"
[[ -f $root/var/lib/converge/marker ]] || fail "purge removed the data dir"
grep -q "converge reset" "$work/purge.log" || fail "purge note"
rm -rf "$root/var/lib/converge"
ok "purge: configuration removed, data dir left with a note pointing to converge reset"
echo "PASS"
