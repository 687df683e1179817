#!/usr/bin/env bash
# Simulated fleet over NATS JetStream (examples/fleet.rs): for each run, a fresh
# nats-server (JetStream, one bench user) on 127.0.0.1 and N node clients in one process,
# each watching its own key and acknowledging on its status subject; one new generation
# for all of them. Repeats RUNS times so that one noisy run does not decide the figure.
# No root. Cleans up after itself.
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
echo "nats-server $(nats-server --version | awk '{print $2}'); open files: $(ulimit -n); cores: $(nproc); load: $(cut -d' ' -f1-3 /proc/loadavg)"
for run in $(seq "$RUNS"); do
    port=$((14222 + run))
    mkdir -p "$DIR/js-$run"
    cat >"$DIR/nats-$run.conf" <<CONF
listen: 127.0.0.1:$port
max_connections: 100000
jetstream { store_dir: "$DIR/js-$run" }
authorization { users = [ { user: bench, password: bench } ] }
CONF
    nats-server -c "$DIR/nats-$run.conf" 2>"$DIR/nats-$run.log" &
    SERVER=$!
    for _ in $(seq 100); do
        (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null && break
        sleep 0.1
    done
    echo "== run $run: $N nodes (load $(cut -d' ' -f1 /proc/loadavg))"
    "$FLEET" "nats://127.0.0.1:$port" bench bench "$N" 2>"$DIR/fleet-$run.log" || tail -3 "$DIR/fleet-$run.log"
    echo "  nats-server RSS: $(awk '/VmRSS/ {printf "%.0f MB", $2/1024}' "/proc/$SERVER/status")"
    kill "$SERVER" 2>/dev/null || true
    wait "$SERVER" 2>/dev/null || true
    SERVER=""
done
echo "(target p99 < 1 s for 2,000 nodes; 15 s polling: 7.5 s mean, 15 s worst latency)"
