#!/usr/bin/env bash
# Installs everything building and testing converge needs on a fresh Debian 12 host.
# Idempotent and fast when nothing is missing (no apt run at all). Run as root.
set -euo pipefail

# One list, extended by later work: build tools, then the daemons tests run for real.
APT_PACKAGES=(
  build-essential pkg-config libclang-dev
  iproute2 iputils-ping procps psmisc
  dnsmasq-base dnsutils nftables iptables
  curl ca-certificates openssl wget busybox-static
  python3 python3-venv
  podman runc docker.io
  wireguard-tools wireguard-go
  caddy borgbackup nats-server
  # tests: a private registry with TLS and htpasswd auth (distribution 2.8).
  docker-registry apache2-utils
  # tests/systemd: a Debian 12 root booting systemd (mmdebstrap, systemd-nspawn).
  systemd-container mmdebstrap shellcheck
  # tests/control.rs: the fleet page in headless Chromium.
  chromium
)
# Python tools, installed into a private venv (Debian's python is externally managed).
PIP_PACKAGES=('moto[server]')
VENV=/opt/converge-tests/venv

log() { printf 'deps.sh: %s\n' "$*" >&2; }

if [[ $(id -u) -ne 0 ]]; then
  log "must run as root"
  exit 1
fi

missing=()
for pkg in "${APT_PACKAGES[@]}"; do
  status=$(dpkg-query -W -f='${db:Status-Abbrev}' "$pkg" 2>/dev/null || true)
  [[ $status == ii* ]] || missing+=("$pkg")
done
if ((${#missing[@]})); then
  log "installing: ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -q
  apt-get install -y -q --no-install-recommends "${missing[@]}"
else
  log "all apt packages present"
fi

# Podman: crun fails on these hosts and the default ulimits need CAP_SYS_RESOURCE.
CONTAINERS_CONF=/etc/containers/containers.conf
if ! grep -qs '^runtime = "runc"' "$CONTAINERS_CONF"; then
  log "writing $CONTAINERS_CONF (runc, ulimits)"
  mkdir -p /etc/containers
  [[ -f $CONTAINERS_CONF ]] && cp "$CONTAINERS_CONF" "$CONTAINERS_CONF.converge-bak"
  cat >"$CONTAINERS_CONF" <<'EOF'
[containers]
default_ulimits = ["nofile=1024:1024", "nproc=1000:1000"]

[engine]
runtime = "runc"
EOF
fi

if [[ ! -x $VENV/bin/moto_server ]]; then
  log "installing into $VENV: ${PIP_PACKAGES[*]}"
  /usr/bin/python3 -m venv "$VENV"
  "$VENV/bin/pip" install -q --disable-pip-version-check "${PIP_PACKAGES[@]}"
fi
ln -sf "$VENV/bin/moto_server" /usr/local/bin/moto_server

# Caddy for the routes reconciler: the pinned version tests run against (Debian's caddy,
# 2.6.2, stays at /usr/bin/caddy for CONVERGE_TEST_CADDY=/usr/bin/caddy runs).
"$(dirname "${BASH_SOURCE[0]}")/caddy.sh"
# The unprivileged user converge runs Caddy as (tests/routes.rs checks Caddy's uid).
if ! id -u converge-caddy >/dev/null 2>&1; then
  log "creating system user converge-caddy"
  useradd --system --user-group --no-create-home --home-dir /nonexistent \
    --shell /usr/sbin/nologin converge-caddy
fi

# Rust comes from rustup, which this script cannot fetch (registries only).
if [[ -f $HOME/.cargo/env ]]; then
  # shellcheck source=/dev/null
  . "$HOME/.cargo/env"
fi
if ! command -v cargo >/dev/null 2>&1; then
  log "cargo not found: the Rust toolchain (rustup, stable >= 1.85) is required and must be installed beforehand"
  exit 1
fi
