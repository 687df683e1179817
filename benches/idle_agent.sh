#!/usr/bin/env bash
# Measures an idle `converge agent` holding the large benchmark document (1,000
# containers, 1,000 peers, 10,000 ports, 5,000 DNS records, 2,000 routes) converged:
# resident memory (target < 20 MB) and CPU over 60 s (target < 0.5 %).
# Runs in its own network namespace; cleans up after itself. Needs root and dnsmasq.
# Usage: benches/idle_agent.sh [SECONDS]
set -euo pipefail
cd "$(dirname "$0")/.."
SECS=${1:-60}
TARGET_DIR=${CARGO_TARGET_DIR:-target}
cargo build --release --quiet --bin converge
BIN="$TARGET_DIR/release/converge"
NS="cvg-idle-$$"
DIR=$(mktemp -d /tmp/cvg-idle-XXXXXX)
chmod 755 "$DIR"
AGENT=""
cleanup() {
    [ -n "$AGENT" ] && kill "$AGENT" 2>/dev/null || true
    if [ -f "$DIR/data/dns/dnsmasq.pid" ]; then kill "$(cat "$DIR/data/dns/dnsmasq.pid")" 2>/dev/null || true; fi
    ip netns del "$NS" 2>/dev/null || true
    rm -rf "$DIR"
}
trap cleanup EXIT
cargo bench --quiet --bench document -- --write-doc "$DIR/big.json" --listen 127.0.0.1 >/dev/null
ip netns add "$NS"
nsenter --net="/run/netns/$NS" ip link set lo up
nsenter --net="/run/netns/$NS" "$BIN" --data-dir "$DIR/data" agent --proxy --node-id bench-node 2>"$DIR/agent.log" &
AGENT=$!
for _ in $(seq 100); do [ -S "$DIR/data/converge.sock" ] && break; sleep 0.1; done
"$BIN" --data-dir "$DIR/data" push "$DIR/big.json"
for _ in $(seq 100); do
    "$BIN" --data-dir "$DIR/data" status --output json | grep -q '"Converged"' && break
    sleep 0.2
done
"$BIN" --data-dir "$DIR/data" status
sleep 2
ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }
rss_kb() { awk '/VmRSS/ {print $2}' "/proc/$1/status"; }
hz=$(getconf CLK_TCK)
t0=$(ticks "$AGENT"); rss0=$(rss_kb "$AGENT")
sleep "$SECS"
t1=$(ticks "$AGENT"); rss1=$(rss_kb "$AGENT"); hwm=$(awk '/VmHWM/ {print $2}' "/proc/$AGENT/status")
dnsmasq_rss=$(rss_kb "$(cat "$DIR/data/dns/dnsmasq.pid")")
cpu=$(awk -v a="$t0" -v b="$t1" -v hz="$hz" -v s="$SECS" 'BEGIN { printf "%.3f", (b - a) / hz / s * 100 }')
printf '\n%-40s %12s %12s %8s\n' "idle agent, ${SECS} s, big document" "measured" "target" "ratio"
awk -v r="$rss1" 'BEGIN { printf "%-40s %9.1f MB %9s MB %8.2f\n", "agent RSS (end of window)", r/1024, "20", r/1024/20 }'
awk -v r="$hwm" 'BEGIN { printf "%-40s %9.1f MB %12s %8s\n", "agent peak RSS (incl. push + first pass)", r/1024, "-", "-" }'
awk -v c="$cpu" 'BEGIN { printf "%-40s %10.3f %% %10s %% %8.2f\n", "agent CPU", c, "0.5", c/0.5 }'
awk -v r="$dnsmasq_rss" 'BEGIN { printf "%-40s %9.1f MB %12s %8s\n", "dnsmasq RSS (for reference)", r/1024, "-", "-" }'
echo "(RSS at window start: $((rss0 / 1024)) MB; $(grep -E 'RssAnon|RssFile' "/proc/$AGENT/status" | tr -s ' \t' ' ' | tr '\n' ' '))"
