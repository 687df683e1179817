#!/usr/bin/env bash
# Upgrades converge in place: installs a new binary atomically, keeps the old one as
# /usr/local/bin/converge.prev, smoke-tests the new one and restarts the agent (when systemd
# runs the host); rolls back to the previous binary if the smoke test or restart fails.
# Restarting is graceful (SIGTERM): what the agent converged stays in place.
#
# Usage: install/update.sh [--binary PATH] [--sha256 HEX]
#   --binary      the new binary; without it, build one from this repository (cargo --release)
#   --sha256      refuse to install unless the binary has this SHA-256
set -euo pipefail

BIN=/usr/local/bin/converge
PREV=$BIN.prev
# Seconds the restarted agent must stay up (same pid) to count as a successful restart.
SETTLE=${CONVERGE_UPDATE_SETTLE:-5}
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)

log() { printf 'update.sh: %s\n' "$*" >&2; }
die() { log "$*"; exit 1; }
usage() { sed -n 's/^# \{0,1\}//; 7,9p' "${BASH_SOURCE[0]}" >&2; exit 2; }

binary="" sha256=""
while (($#)); do
  case $1 in
    --binary) binary=${2:?--binary needs a path}; shift ;;
    --sha256) sha256=${2:?--sha256 needs a hex digest}; shift ;;
    -h | --help) usage ;;
    *) log "unknown argument: $1"; usage ;;
  esac
  shift
done
[[ $(id -u) -eq 0 ]] || die "must run as root"
[[ -x $BIN ]] || die "$BIN is not installed: run install/setup.sh first"

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

dir=$(dirname "$BIN")
tmp=$(mktemp "$dir/.converge.new.XXXXXX")
prev_tmp=$(mktemp "$dir/.converge.prev.XXXXXX")
trap 'rm -f "$tmp" "$prev_tmp"' EXIT
cp "$binary" "$tmp"
chmod 0755 "$tmp"
if [[ -n $sha256 ]]; then
  actual=$(sha256sum "$tmp" | cut -d' ' -f1)
  [[ $actual == "${sha256,,}" ]] || die "checksum mismatch for $binary: expected $sha256, got $actual"
fi
if cmp -s "$tmp" "$BIN"; then
  log "$BIN is already this binary; nothing to do"
  exit 0
fi

# The unit to restart, if systemd runs the host and one of ours is active.
unit=""
if [[ -d /run/systemd/system ]]; then
  for u in converge.service converge-proxy.service; do
    if systemctl is-active --quiet "$u"; then
      unit=$u
      break
    fi
  done
fi

# A proxy node installed before Caddy ran unprivileged: the user its Caddy now runs as.
if [[ -f /etc/systemd/system/converge-proxy.service ]] && ! id -u converge-caddy >/dev/null 2>&1; then
  log "creating system user converge-caddy"
  useradd --system --user-group --no-create-home --home-dir /nonexistent \
    --shell /usr/sbin/nologin converge-caddy
fi

# Restarts $unit and checks it stays up with the same pid for $SETTLE seconds.
restart_ok() {
  systemctl restart "$unit" || return 1
  local pid
  pid=$(systemctl show -p MainPID --value "$unit")
  sleep "$SETTLE"
  systemctl is-active --quiet "$unit" &&
    [[ $pid != 0 && $(systemctl show -p MainPID --value "$unit") == "$pid" ]]
}

rollback() {
  log "$1: rolling back to $PREV"
  cp -p "$PREV" "$prev_tmp"
  mv -f "$prev_tmp" "$BIN"
  if [[ -n $unit ]]; then
    systemctl restart "$unit" || log "restarting $unit with the previous binary failed too"
  fi
  exit 1
}

cp -p "$BIN" "$prev_tmp"
mv -f "$prev_tmp" "$PREV"
mv -f "$tmp" "$BIN"
log "installed new $BIN (previous kept as $PREV)"

version=$("$BIN" --version 2>&1) || rollback "smoke test '$BIN --version' failed"
log "new binary: $version"

if [[ -n $unit ]]; then
  restart_ok || rollback "$unit did not come back up"
  log "$unit restarted"
elif [[ -d /run/systemd/system ]]; then
  log "no converge unit is active; the new binary is used at the next start"
else
  log "systemd is not running here: restart 'converge agent' by hand (SIGTERM is graceful)"
fi
