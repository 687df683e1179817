#!/usr/bin/env bash
# Builds (once) a Debian 12 root that boots systemd 252 under systemd-nspawn, with the
# packages the systemd tests need put in at build time (a root booted on a private network
# cannot reach the mirror). Cached under /var/tmp, keyed by the package list: a rerun
# prints the path at once. Prints the root's path on stdout.
# Usage: tests/systemd/root.sh
set -euo pipefail

# What setup.sh installs on a worker with Podman (it finds them present), and what the
# tests use inside (curl, openssl, xxd for setup.sh's download checks).
PACKAGES=systemd,systemd-sysv,dbus,iproute2,nftables,dnsmasq-base,procps,wireguard-go,wireguard-tools,ca-certificates,curl,openssl,xxd,podman,borgbackup
key=$(printf '%s' "$PACKAGES" | sha256sum | cut -c1-12)
root=/var/tmp/converge-sysd-root-$key

log() { printf 'root.sh: %s\n' "$*" >&2; }

if [[ -f $root/.complete ]]; then
  printf '%s\n' "$root"
  exit 0
fi
command -v mmdebstrap >/dev/null || { log "mmdebstrap missing (install/deps.sh installs it)"; exit 1; }
# Other package lists' roots are stale: drop them (they are ~300 MB each).
for old in /var/tmp/converge-sysd-root-*; do
  [[ -e $old && $old != "$root" ]] && rm -rf --one-file-system "$old"
done
rm -rf --one-file-system "$root" "$root.tmp"
# The host's apt sources (the mirror CI can reach), handed to mmdebstrap as is.
sources=(/etc/apt/sources.list /etc/apt/sources.list.d/*.sources /etc/apt/sources.list.d/*.list)
mirrors=()
for s in "${sources[@]}"; do
  [[ -s $s ]] && mirrors+=("$s")
done
((${#mirrors[@]})) || mirrors=(http://deb.debian.org/debian)
log "building $root ($PACKAGES)"
start=$SECONDS
mmdebstrap --quiet --variant=minbase --include="$PACKAGES" bookworm "$root.tmp" "${mirrors[@]}" >&2
# A fixed machine id and no getty: boots quietly; the tests use nsenter, not a console.
echo converge-sysd >"$root.tmp/etc/hostname"
ln -sf /dev/null "$root.tmp/etc/systemd/system/console-getty.service"
touch "$root.tmp/.complete"
mv "$root.tmp" "$root"
log "built in $((SECONDS - start)) s"
printf '%s\n' "$root"
