#!/usr/bin/env bash
# Upgrades converge in place, with automatic rollback. Stages:
#   [1/5] verify   the new binary's SHA-256 (required for --binary)
#   [2/5] check    the new binary runs: `--version`, and `validate` of a small document
#   [3/5] install  atomic swap into /usr/local/bin/converge (the old one kept aside)
#   [4/5] restart  the active unit (converge or converge-proxy), then wait for READY
#                  and for `converge status` from the new version with every first pass done
#   [5/5] commit   the old binary becomes /usr/local/bin/converge.prev
# A failure in stages 1-2 changes nothing and restarts nothing. A failure in stage 4
# puts the old binary back, restarts it and says why; converge.prev is then left as it
# was (a failed update never overwrites the last good binary). The daemons converge
# started (dnsmasq, wireguard-go, Caddy, containers) keep running throughout.
#
# Usage: install/update.sh [--binary PATH --sha256 HEX | --binary PATH --local-build]
#   --binary       the new binary; without it, build one from this repository (cargo --release)
#   --sha256       its expected SHA-256 (required with --binary)
#   --local-build  --binary is a build of your own: skip the checksum
#   --timeout S    seconds to wait for the restarted agent (default 300, or CONVERGE_UPDATE_TIMEOUT)
#   --report FILE  write the outcome there as JSON ({"sha256", "exit", "message"}): the
#                  agent's self-update reads it after the restart or the rollback
# Exit codes: 0 updated (or already this binary); 2 usage; 10 verify; 11 check;
#   12 install; 13 restart failed and rolled back; 14 rollback failed too.
set -euo pipefail

BIN=${CONVERGE_BIN:-/usr/local/bin/converge}
PREV=$BIN.prev
DATA_DIR=${CONVERGE_DATA_DIR:-/var/lib/converge}
timeout=${CONVERGE_UPDATE_TIMEOUT:-300}
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." 2>/dev/null && pwd) || repo=""

message=""
log() {
  message=$*
  printf 'update.sh: %s\n' "$*" >&2
}
# fail CODE STAGE MESSAGE
fail() {
  log "FAILED at $2: $3"
  exit "$1"
}
usage() {
  sed -n '/^# Usage:/,/^# Exit codes/p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//' >&2
  exit 2
}
now() { date +%s.%N; }
since() { awk -v a="$1" -v b="$(now)" 'BEGIN { printf "%.1f", b - a }'; }

binary="" sha256="" local_build=false report="" actual="" cleanup=()
# On every exit: temporary files go, and the outcome is reported if asked.
# shellcheck disable=SC2317  # called by the EXIT trap
finish() {
  local rc=$?
  ((${#cleanup[@]})) && rm -rf "${cleanup[@]}"
  if [[ -n $report ]]; then
    local msg
    msg=$(printf '%s' "$message" | sed 's/\\/\\\\/g; s/"/\\"/g' | tr -d '\000-\037')
    printf '{"sha256": "%s", "exit": %d, "message": "%s"}\n' "${sha256:-$actual}" "$rc" "$msg" >"$report.tmp" &&
      mv -f "$report.tmp" "$report"
  fi
}
trap finish EXIT
while (($#)); do
  case $1 in
    --binary) binary=${2:-}; [[ -n $binary ]] || usage; shift ;;
    --sha256) sha256=${2:-}; [[ -n $sha256 ]] || usage; shift ;;
    --local-build) local_build=true ;;
    --timeout) timeout=${2:-}; [[ $timeout =~ ^[0-9]+$ ]] || usage; shift ;;
    --report) report=${2:-}; [[ -n $report ]] || usage; shift ;;
    -h | --help) usage ;;
    *) log "unknown argument: $1"; usage ;;
  esac
  shift
done
[[ $(id -u) -eq 0 ]] || fail 2 preflight "must run as root"
[[ -x $BIN ]] || fail 2 preflight "$BIN is not installed: run install/setup.sh first"
if [[ -n $binary && -z $sha256 ]] && ! $local_build; then
  log "--binary needs --sha256 HEX (or --local-build for a binary you built yourself)"
  exit 2
fi

if [[ -z $binary ]]; then
  if [[ -f $HOME/.cargo/env ]]; then
    # shellcheck source=/dev/null
    . "$HOME/.cargo/env"
  fi
  command -v cargo >/dev/null 2>&1 || fail 2 preflight "no --binary given and cargo not found to build one"
  [[ -f $repo/Cargo.toml ]] || fail 2 preflight "no --binary given and no repository at $repo to build from"
  log "building converge (release) in $repo"
  (cd "$repo" && cargo build --release --locked --bin converge)
  binary=${CARGO_TARGET_DIR:-$repo/target}/release/converge
fi
[[ -f $binary ]] || fail 10 verify "binary not found: $binary"

started=$(now)
dir=$(dirname "$BIN")
new=$(mktemp "$dir/.converge.new.XXXXXX")
old=$(mktemp "$dir/.converge.old.XXXXXX")
check_dir=$(mktemp -d)
cleanup=("$new" "$old" "$check_dir")

log "[1/5] verify: $binary"
# Copied first, then checked: what is verified is what gets installed.
cp "$binary" "$new"
chmod 0755 "$new"
actual=$(sha256sum "$new" | cut -d' ' -f1)
sha256=${sha256,,}
if [[ -n $sha256 ]]; then
  [[ $actual == "$sha256" ]] ||
    fail 10 verify "checksum mismatch for $binary: expected $sha256, got $actual; nothing changed"
else
  log "  --local-build: not verified (sha256 $actual)"
fi
if cmp -s "$new" "$BIN"; then
  log "$BIN is already this binary; nothing to do"
  exit 0
fi

log "[2/5] check: the new binary runs"
version=$("$new" --version 2>&1) || fail 11 check "'converge --version' failed: $version; nothing changed"
[[ $version =~ ^converge\ [0-9] ]] || fail 11 check "'converge --version' printed '$version'; nothing changed"
cat >"$check_dir/check.json" <<'EOF'
{"apiVersion": "converge/v1", "node": {"id": "update-check", "mode": "worker"},
 "generation": 1, "issuedAt": "2025-01-01T00:00:00Z"}
EOF
out=$(cd "$check_dir" && "$new" --data-dir "$check_dir/data" validate "$check_dir/check.json" 2>&1) ||
  fail 11 check "'converge validate' of a minimal document failed: $out; nothing changed"
want=${version#converge }
log "  new: $version (running: $("$BIN" --version 2>/dev/null || echo unknown))"

# The unit to restart: the one that is active (or restarting) now.
unit=""
if [[ -d /run/systemd/system ]]; then
  for u in converge.service converge-proxy.service; do
    state=$(systemctl show -p ActiveState --value "$u" 2>/dev/null || true)
    if [[ $state == active || $state == activating || $state == reloading ]]; then
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

log "[3/5] install: $BIN"
cp -p "$BIN" "$old" || fail 12 install "cannot keep the running binary aside; nothing changed"
mv -f "$new" "$BIN" || fail 12 install "cannot move the new binary into place; nothing changed"
sync -f "$BIN" 2>/dev/null || true

# Restarts $unit and waits until it is ready and its agent reports version $1 with every
# first pass done (with $1 empty: until the agent answers at all, for a rollback to a
# release older than these reports); prints why not on failure.
restart_ready() {
  local want=$1 deadline=$((SECONDS + timeout)) state sub restarts json
  restarts=$(systemctl show -p NRestarts --value "$unit")
  # --no-block: this script keeps the timeout, not systemctl (TimeoutStartSec is longer).
  systemctl restart --no-block "$unit" || { echo "systemctl restart $unit failed"; return 1; }
  sleep 0.2
  while ((SECONDS < deadline)); do
    state=$(systemctl show -p ActiveState --value "$unit")
    sub=$(systemctl show -p SubState --value "$unit")
    if [[ $state == failed || $sub == auto-restart || $state == inactive ]] ||
      (($(systemctl show -p NRestarts --value "$unit") > restarts)); then
      echo "$unit did not start ($state/$sub): $(journalctl -u "$unit" -n 3 -o cat --no-pager 2>/dev/null | tr '\n' ' ')"
      return 1
    fi
    if [[ $state == active ]]; then
      # READY=1 came; the status over the socket must agree.
      json=$("$BIN" --data-dir "$DATA_DIR" status --output json 2>/dev/null || true)
      if [[ -z $want ]] && grep -q '"agent": "running"' <<<"$json"; then
        return 0
      fi
      if grep -q '"ready": true' <<<"$json" && grep -qF "\"version\": \"$want\"" <<<"$json"; then
        return 0
      fi
    fi
    sleep 0.2
  done
  echo "$unit not ready after ${timeout}s ($state/$sub)"
  return 1
}

if [[ -z $unit ]]; then
  mv -f "$old" "$PREV"
  if [[ -d /run/systemd/system ]]; then
    log "no converge unit is active; the new binary is used at the next start (previous kept as $PREV)"
  else
    log "systemd is not running here: restart 'converge agent' by hand (SIGTERM is graceful); previous kept as $PREV"
  fi
  exit 0
fi

log "[4/5] restart: $unit, waiting up to ${timeout}s for READY and every first pass"
if why=$(restart_ready "$want"); then
  mv -f "$old" "$PREV"
  log "[5/5] commit: updated to $version in $(since "$started") s (previous kept as $PREV)"
  exit 0
fi

log "FAILED at restart: $why"
rolled=$(now)
log "rolling back to the binary that ran before"
mv -f "$old" "$BIN" || fail 14 rollback "cannot put the previous binary back in place"
back=$("$BIN" --version 2>/dev/null || echo "converge (unknown)")
if why=$(restart_ready ""); then
  log "rolled back to $back in $(since "$rolled") s: the update failed ($PREV unchanged)"
  exit 13
fi
fail 14 rollback "the previous binary did not come back either: $why"
