#!/usr/bin/env bash
# Simulated fleet over NATS JetStream (examples/fleet.rs): for each run, a fresh
# nats-server on 127.0.0.1 and N node clients in one process, each watching its own key
# and acknowledging on its status subject; one new generation for all of them. Each run
# twice: plain with one shared bench user, then as the agent connects (TLS verified
# against a private CA, each node its own nkey and per-node permissions), so the cost
# of TLS + nkeys is side by side. Repeats RUNS times so that one noisy run does not
# decide the figure. No root. Cleans up after itself.
# Usage: [FLEET_SIZE=2000] [RUNS=3] benches/fleet_nats.sh
set -euo pipefail
cd "$(dirname "$0")/.."
N=${FLEET_SIZE:-2000}
RUNS=${RUNS:-3}
TARGET_DIR=${CARGO_TARGET_DIR:-target}
[ -n "${SKIP_BUILD:-}" ] || cargo build --release --quiet --example fleet
FLEET="$TARGET_DIR/release/examples/fleet"
DIR=$(mktemp -d /tmp/cvg-fleet-nats-XXXXXX)
SERVER=""
cleanup() {
    [ -z "$SERVER" ] || kill "$SERVER" 2>/dev/null || true
    rm -rf "$DIR"
}
trap cleanup EXIT
ulimit -n "$(ulimit -Hn)"
# shellcheck source=benches/test_ca.sh
. benches/test_ca.sh
make_test_ca "$DIR"
"$FLEET" users "$N" bench bench >"$DIR/users.conf"
echo "nats-server $(nats-server --version | awk '{print $2}'); open files: $(ulimit -n); cores: $(nproc); load: $(cut -d' ' -f1-3 /proc/loadavg)"
for run in $(seq "$RUNS"); do
  for mode in plain tls-nkeys; do
    port=$((14222 + run * 2))
    [ "$mode" = plain ] || port=$((port + 1))
    mkdir -p "$DIR/js-$run-$mode"
    if [ "$mode" = plain ]; then
        auth='authorization { users = [ { user: bench, password: bench } ] }'
        url="nats://127.0.0.1:$port"; ca=()
    else
        auth="tls { cert_file: \"$DIR/tls.crt\", key_file: \"$DIR/tls.key\" }
include ./users.conf"
        url="tls://127.0.0.1:$port"; ca=("$DIR/ca.crt")
    fi
    cat >"$DIR/nats-$run-$mode.conf" <<CONF
listen: 127.0.0.1:$port
max_connections: 100000
jetstream { store_dir: "$DIR/js-$run-$mode" }
$auth
CONF
    nats-server -c "$DIR/nats-$run-$mode.conf" 2>"$DIR/nats-$run-$mode.log" &
    SERVER=$!
    for _ in $(seq 100); do
        (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null && break
        sleep 0.1
    done
    echo "== run $run, $mode: $N nodes (load $(cut -d' ' -f1 /proc/loadavg))"
    "$FLEET" "$url" bench bench "$N" "${ca[@]}" 2>"$DIR/fleet-$run-$mode.log" || tail -3 "$DIR/fleet-$run-$mode.log"
    echo "  nats-server RSS: $(awk '/VmRSS/ {printf "%.0f MB", $2/1024}' "/proc/$SERVER/status")"
    kill "$SERVER" 2>/dev/null || true
    wait "$SERVER" 2>/dev/null || true
    SERVER=""
  done
done
echo "(target p99 < 1 s for 2,000 nodes; 15 s polling: 7.5 s mean, 15 s worst latency)"
