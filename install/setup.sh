#!/usr/bin/env bash
# Installs converge on this node: runtime packages, the binary (/usr/local/bin/converge,
# replaced atomically), the data and config directories, and the systemd unit, which is
# enabled and started when systemd runs the host. Safe to run again.
#
# Usage: install/setup.sh [--proxy] [--binary PATH] [--sha256 HEX] [--data-dir DIR]
#   --proxy       install converge-proxy.service (agent with --proxy) instead of converge.service
#   --binary      use this binary; without it, build one from this repository (cargo --release)
#   --sha256      refuse to install unless the binary has this SHA-256
#   --data-dir    agent state directory (default /var/lib/converge)
set -euo pipefail

# Packages the agent drives at run time; later features extend this list.
RUNTIME_PACKAGES=(iproute2 nftables dnsmasq-base)

BIN=/usr/local/bin/converge
CONF_DIR=/etc/converge
UNIT_DIR=/etc/systemd/system
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)

log() { printf 'setup.sh: %s\n' "$*" >&2; }
die() { log "$*"; exit 1; }
usage() { sed -n 's/^# \{0,1\}//; 6,10p' "${BASH_SOURCE[0]}" >&2; exit 2; }

proxy=0 binary="" sha256="" data_dir=/var/lib/converge
while (($#)); do
  case $1 in
    --proxy) proxy=1 ;;
    --binary) binary=${2:?--binary needs a path}; shift ;;
    --sha256) sha256=${2:?--sha256 needs a hex digest}; shift ;;
    --data-dir) data_dir=${2:?--data-dir needs a directory}; shift ;;
    -h | --help) usage ;;
    *) log "unknown argument: $1"; usage ;;
  esac
  shift
done
[[ $(id -u) -eq 0 ]] || die "must run as root"
[[ $data_dir == /* ]] || die "--data-dir must be an absolute path"

# --- runtime packages -------------------------------------------------------------------
missing=()
for pkg in "${RUNTIME_PACKAGES[@]}"; do
  status=$(dpkg-query -W -f='${db:Status-Abbrev}' "$pkg" 2>/dev/null || true)
  [[ $status == ii* ]] || missing+=("$pkg")
done
if ((${#missing[@]})); then
  log "installing packages: ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -q
  apt-get install -y -q --no-install-recommends "${missing[@]}"
fi

# --- caddy (proxy nodes) -----------------------------------------------------------------
# The routes reconciler runs the pinned Caddy that install/caddy.sh puts on PATH.
if ((proxy)); then
  for pkg in python3 python3-venv; do
    status=$(dpkg-query -W -f='${db:Status-Abbrev}' "$pkg" 2>/dev/null || true)
    if [[ $status != ii* ]]; then
      export DEBIAN_FRONTEND=noninteractive
      apt-get update -q
      apt-get install -y -q --no-install-recommends python3 python3-venv
      break
    fi
  done
  "$repo/install/caddy.sh"
  # The unprivileged user the agent runs its Caddy pair as (--caddy-user); the agent
  # refuses to start Caddy when it is missing.
  if ! id -u converge-caddy >/dev/null 2>&1; then
    log "creating system user converge-caddy"
    useradd --system --user-group --no-create-home --home-dir /nonexistent \
      --shell /usr/sbin/nologin converge-caddy
  fi
fi

# --- binary -----------------------------------------------------------------------------
if [[ -z $binary ]]; then
  if [[ -f $HOME/.cargo/env ]]; then
    # shellcheck source=/dev/null
    . "$HOME/.cargo/env"
  fi
  command -v cargo >/dev/null 2>&1 || die "no --binary given and cargo not found to build one"
  log "building converge (release) in $repo"
  (cd "$repo" && cargo build --release --locked --bin converge)
  binary=${CARGO_TARGET_DIR:-$repo/target}/release/converge
fi
[[ -f $binary ]] || die "binary not found: $binary"

# Copy next to the destination first so the final mv is an atomic rename, and check the
# copy: that is what gets installed.
tmp=$(mktemp "$(dirname "$BIN")/.converge.new.XXXXXX")
trap 'rm -f "$tmp"' EXIT
cp "$binary" "$tmp"
chmod 0755 "$tmp"
if [[ -n $sha256 ]]; then
  actual=$(sha256sum "$tmp" | cut -d' ' -f1)
  [[ $actual == "${sha256,,}" ]] || die "checksum mismatch for $binary: expected $sha256, got $actual"
fi
binary_changed=0
if cmp -s "$tmp" "$BIN"; then
  log "$BIN is already this binary"
else
  mv -f "$tmp" "$BIN"
  binary_changed=1
  log "installed $BIN"
fi
"$BIN" --version >/dev/null || die "$BIN --version failed"

# --- directories ------------------------------------------------------------------------
# 0711: daemons running as other users may traverse to their own files, not list state.
install -d -m 0711 "$data_dir"
chmod 0711 "$data_dir"
install -d -m 0750 "$CONF_DIR"

# --- systemd unit -----------------------------------------------------------------------
if ((proxy)); then
  unit=converge-proxy.service other=converge.service
else
  unit=converge.service other=converge-proxy.service
fi
install -d -m 0755 "$UNIT_DIR"
unit_tmp=$(mktemp "$UNIT_DIR/.$unit.XXXXXX")
trap 'rm -f "$tmp" "$unit_tmp"' EXIT
sed "s|--data-dir /var/lib/converge|--data-dir $data_dir|" "$repo/systemd/$unit" >"$unit_tmp"
chmod 0644 "$unit_tmp"
unit_changed=0
if cmp -s "$unit_tmp" "$UNIT_DIR/$unit"; then
  rm -f "$unit_tmp"
else
  mv -f "$unit_tmp" "$UNIT_DIR/$unit"
  unit_changed=1
  log "installed $UNIT_DIR/$unit"
fi

flags="--data-dir $data_dir"
((proxy)) && flags+=" --proxy"
if [[ -d /run/systemd/system ]]; then
  systemctl daemon-reload
  if [[ -f $UNIT_DIR/$other ]] && systemctl is-enabled --quiet "$other" 2>/dev/null; then
    log "switching from $other to $unit"
    systemctl disable --now "$other"
  fi
  if systemctl is-active --quiet "$unit" && ((binary_changed || unit_changed)); then
    # SIGTERM is graceful: what the agent converged stays in place across the restart.
    systemctl restart "$unit"
  fi
  systemctl enable --now "$unit"
  log "$unit enabled and running"
else
  log "systemd is not running here; start the agent by hand:"
  log "  $BIN agent $flags"
fi
