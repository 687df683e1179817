#!/usr/bin/env bash
# Measures an idle `converge agent` holding a live control-plane connection (NATS
# JetStream over TLS with the node's nkey, then HTTPS long poll) with a small converged
# document: resident memory (target < 20 MB) and CPU over the window (target < 0.5 %),
# heartbeats included. Runs nats-server, the reference control plane (TLS from a private
# CA the node pins at join) and the agent in one network namespace on 127.0.0.1; cleans
# up after itself. Needs root, nats-server and openssl. Each transport runs two agents
# one after the other: one that keeps its start-up code pages mapped (the baseline,
# CONVERGE_KEEP_STARTUP_PAGES=1) and one that releases them after READY (the default).
# Usage: benches/idle_control.sh [SECONDS]
set -euo pipefail
cd "$(dirname "$0")/.."
SECS=${1:-60}
TARGET_DIR=${CARGO_TARGET_DIR:-target}
[ -n "${SKIP_BUILD:-}" ] || cargo build --release --quiet --bin converge
BIN="$TARGET_DIR/release/converge"
NS="cvg-idlecp-$$"
DIR=$(mktemp -d /tmp/cvg-idlecp-XXXXXX)
PIDS=()
cleanup() {
    for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
    ip netns del "$NS" 2>/dev/null || true
    rm -rf "$DIR"
}
trap cleanup EXIT
in_ns() { nsenter --net="/run/netns/$NS" "$@"; }
ip netns add "$NS"
in_ns ip link set lo up
mkdir -p "$DIR/docs" "$DIR/cp"
# shellcheck source=benches/test_ca.sh
. benches/test_ca.sh
make_test_ca "$DIR"
cat >"$DIR/nats.conf" <<CONF
listen: 127.0.0.1:4222
jetstream { store_dir: "$DIR/js" }
pid_file: "$DIR/nats.pid"
tls { cert_file: "$DIR/tls.crt", key_file: "$DIR/tls.key" }
include ./auth.conf
CONF
# The NATS plane's own user (its nkey) before the server starts; serve keeps it current.
"$BIN" control-plane nats-auth --data "$DIR/cp-nats" --out "$DIR/auth.conf" 2>/dev/null
nsenter --net="/run/netns/$NS" /usr/sbin/nats-server -c "$DIR/nats.conf" >"$DIR/nats.log" 2>&1 &
PIDS+=($!)
sleep 1
ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }
rss_kb() { awk '/VmRSS/ {print $2}' "/proc/$1/status"; }
hz=$(getconf CLK_TCK)

plane() { # transport extra-serve-args...: starts the transport's control plane
    local name=$1; shift
    # nsenter directly (not the function): `$!` is then the program's own pid.
    nsenter --net="/run/netns/$NS" "$BIN" control-plane serve --dir "$DIR/docs" --data "$DIR/cp-$name" \
        --listen "127.0.0.1:$(port "$name")" --tls-cert "$DIR/tls.crt" --tls-key "$DIR/tls.key" "$@" 2>"$DIR/cp-$name.log" &
    PIDS+=($!)
    sleep 1
}
port() { [ "$1" = nats ] && echo 8444 || echo 8445; }

measure() { # transport pages: an agent enrolled with the transport's plane; pages=keep
    # keeps the start-up code pages mapped (CONVERGE_KEEP_STARTUP_PAGES, the baseline)
    local name=$1 pages=$2
    local node="$DIR/node-$name-$pages" id="bench-$name-$pages"
    local token
    token=$("$BIN" control-plane token --data "$DIR/cp-$name" 2>/dev/null)
    in_ns "$BIN" --data-dir "$node" join --url "https://127.0.0.1:$(port "$name")" --ca "$DIR/ca.crt" --token "$token" \
        --name "$id" >/dev/null
    printf '{"apiVersion":"converge/v1","node":{"id":"%s","mode":"worker"},"generation":1,"issuedAt":"2026-11-24T10:00:00Z","secrets":{"k":"v"}}' "$id" \
        >"$DIR/docs/$id.json"
    local keep=()
    [ "$pages" = released ] || keep=(env CONVERGE_KEEP_STARTUP_PAGES=1)
    nsenter --net="/run/netns/$NS" "${keep[@]}" "$BIN" --data-dir "$node" --secrets-dir "$DIR/none" agent --node-id "$id" 2>"$DIR/agent-$id.log" &
    local agent=$!
    PIDS+=("$agent")
    for _ in $(seq 100); do
        "$BIN" --data-dir "$node" status 2>/dev/null | grep -q "control: connected" && \
            "$BIN" --data-dir "$node" status | grep -q "accepted generation: 1" && break
        sleep 0.2
    done
    sleep 3
    if ! kill -0 "$agent" 2>/dev/null; then
        echo "the $id agent exited:" >&2
        cat "$DIR/agent-$id.log" >&2
        exit 1
    fi
    local t0 t1 rss1 hwm cpu
    t0=$(ticks "$agent")
    sleep "$SECS"
    t1=$(ticks "$agent"); rss1=$(rss_kb "$agent"); hwm=$(awk '/VmHWM/ {print $2}' "/proc/$agent/status")
    cpu=$(awk -v a="$t0" -v b="$t1" -v hz="$hz" -v s="$SECS" 'BEGIN { printf "%.3f", (b - a) / hz / s * 100 }')
    "$BIN" --data-dir "$node" status | tail -1 >&2
    # What the RSS is made of: heap and stacks (anon) and the binary's pages in use (file).
    awk -v n="$name" -v p="$pages" -v r="$rss1" -v h="$hwm" -v c="$cpu" \
        '/RssAnon/ {a=$2} /RssFile/ {f=$2}
         END { printf "| %s | %s | %.1f | %.1f | %.1f | %.1f | %.3f |\n", n, p, r/1024, a/1024, f/1024, h/1024, c }' \
        "/proc/$agent/status"
    kill "$agent"
}
plane nats --nats tls://127.0.0.1:4222 --nats-ca "$DIR/ca.crt" --nats-auth-file "$DIR/auth.conf" \
    --nats-pid-file "$DIR/nats.pid"
plane https
echo "idle $SECS s after READY and the first document (targets: RSS 20 MB, CPU 0.5 %)"
echo "| transport | start-up pages | RSS MB | RssAnon MB | RssFile MB | peak MB | CPU % |"
echo "|---|---|---|---|---|---|---|"
for t in nats https; do
    measure "$t" kept
    measure "$t" released
done
