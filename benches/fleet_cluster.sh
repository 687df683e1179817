#!/usr/bin/env bash
# The simulated NATS fleet (examples/fleet.rs) at 10,000 nodes on three topologies, each
# run on fresh servers on 127.0.0.1: one nats-server with the bucket R1 (the baseline);
# a 3-server cluster with the bucket R3, the node clients spread over its members; the
# same cluster as a hub with 2 leaf nodes (no JetStream of their own: the hub's stream
# and consumers are reached through the leaf connections), the node clients spread over
# the leaves. For each: setup, one generation for every node (p50, p99, max until each
# node's acknowledgement arrived, 256 puts in flight as the plane does), and what one put
# costs sequentially (R3 waits for the stream's quorum). Plain auth, one bench user: the
# TLS + nkeys cost is measured by fleet_nats.sh. No root. Cleans up after itself.
# NATS_SERVERS lists nats-server binaries to run each topology on, side by side (default
# Debian's `nats-server`); FLEET_SHARDS splits the bucket over streams (examples/fleet.rs);
# CONSUMER_STORAGE lists where the node consumers keep their state ("memory", as the plane
# makes them, and "file", the baseline before it did).
# Usage: [FLEET_SIZE=10000] [RUNS=1] [TOPOLOGIES="single cluster leaf"] [FLEET_SHARDS=K]
#        [NATS_SERVERS="nats-server /path/to/newer/nats-server"]
#        [CONSUMER_STORAGE="memory file"] benches/fleet_cluster.sh
set -euo pipefail
cd "$(dirname "$0")/.."
N=${FLEET_SIZE:-10000}
RUNS=${RUNS:-1}
TOPOLOGIES=${TOPOLOGIES:-single cluster leaf}
NATS_SERVERS=${NATS_SERVERS:-nats-server}
CONSUMER_STORAGE=${CONSUMER_STORAGE:-memory}
NATS_BIN=nats-server
TARGET_DIR=${CARGO_TARGET_DIR:-target}
[ -n "${SKIP_BUILD:-}" ] || cargo build --release --quiet --example fleet
FLEET="$TARGET_DIR/release/examples/fleet"
DIR=$(mktemp -d /tmp/cvg-fleet-cluster-XXXXXX)
PIDS=()
stop_servers() {
    for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
    for p in "${PIDS[@]}"; do wait "$p" 2>/dev/null || true; done
    PIDS=()
}
cleanup() {
    [ -z "${KEEP:-}" ] || echo "kept $DIR" >&2
    stop_servers
    [ -n "${KEEP:-}" ] || rm -rf "$DIR"
}
trap cleanup EXIT
ulimit -n "$(ulimit -Hn)"
AUTH='authorization { users = [ { user: bench, password: bench } ] }'
BASE=16400 # client ports BASE+k, cluster routes BASE+10+k, leaf listeners BASE+20+k

wait_port() {
    for _ in $(seq 200); do
        (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null && return 0
        sleep 0.1
    done
    echo "nats-server on port $1 did not start" >&2
    return 1
}

# server NAME PORT EXTRA-CONFIG: starts one nats-server with its own store.
server() {
    local name=$1 port=$2 extra=$3
    mkdir -p "$DIR/$name"
    cat >"$DIR/$name.conf" <<CONF
server_name: $name
listen: 127.0.0.1:$port
max_connections: 100000
$AUTH
$extra
CONF
    "$NATS_BIN" -c "$DIR/$name.conf" 2>"$DIR/$name.log" &
    PIDS+=($!)
}

hub() {
    local routes="" k
    for k in 0 1 2; do routes+="nats-route://127.0.0.1:$((BASE + 10 + k)),"; done
    for k in 0 1 2; do
        server "hub$k" $((BASE + k)) "jetstream { store_dir: \"$DIR/hub$k\" }
cluster { name: bench, listen: 127.0.0.1:$((BASE + 10 + k)), routes: [ ${routes%,} ] }
leafnodes { listen: 127.0.0.1:$((BASE + 20 + k)), authorization { user: leaf, password: leaf } }"
    done
    for k in 0 1 2; do wait_port $((BASE + k)); done
}

echo "$N nodes in one client process, bucket over ${FLEET_SHARDS:-1} stream(s); cores: $(nproc); load: $(cut -d' ' -f1-3 /proc/loadavg)"
for run in $(seq "$RUNS"); do
  for NATS_BIN in $NATS_SERVERS; do
    version=$("$NATS_BIN" --version | awk '{print $2}')
    for storage in $CONSUMER_STORAGE; do
      for topo in $TOPOLOGIES; do
        rm -rf "${DIR:?}"/hub* "${DIR:?}"/one* "${DIR:?}"/leaf*
        case $topo in
            single)
                server one "$BASE" "jetstream { store_dir: \"$DIR/one\" }"
                wait_port "$BASE"
                url="nats://127.0.0.1:$BASE"; nodes=$url; replicas=1 ;;
            cluster)
                hub
                url="nats://127.0.0.1:$BASE"; replicas=3
                nodes="nats://127.0.0.1:$BASE,nats://127.0.0.1:$((BASE + 1)),nats://127.0.0.1:$((BASE + 2))" ;;
            leaf)
                hub
                for k in 0 1; do
                    server "leaf$k" $((BASE + 30 + k)) "leafnodes { remotes = [ { urls: [ \"nats://leaf:leaf@127.0.0.1:$((BASE + 20 + k))\" ] } ] }"
                done
                for k in 0 1; do wait_port $((BASE + 30 + k)); done
                # The leaf connections come up after the client port opens.
                for k in 0 1; do
                    for _ in $(seq 100); do
                        grep -q "Leafnode connection created" "$DIR/leaf$k.log" && break
                        sleep 0.1
                    done
                done
                url="nats://127.0.0.1:$BASE"; replicas=3
                nodes="nats://127.0.0.1:$((BASE + 30)),nats://127.0.0.1:$((BASE + 31))" ;;
            *) echo "unknown topology $topo" >&2; exit 2 ;;
        esac
        echo "== run $run, nats-server $version, consumers in $storage, $topo: bucket R$replicas, nodes on $nodes (load $(cut -d' ' -f1 /proc/loadavg))"
        FLEET_CONSUMERS=$storage FLEET_NODE_URLS=$nodes FLEET_REPLICAS=$replicas FLEET_SERVER_PIDS="${PIDS[*]}" "$FLEET" "$url" bench bench "$N" \
            2>"$DIR/fleet-$run-$topo.log" || tail -3 "$DIR/fleet-$run-$topo.log"
        rss=0
        for p in "${PIDS[@]}"; do
            rss=$((rss + $(awk '/VmRSS/ {print $2}' "/proc/$p/status" 2>/dev/null || echo 0)))
        done
        echo "  nats-server RSS, all ${#PIDS[@]} servers: $((rss / 1024)) MB"
        stop_servers
      done
    done
  done
done
echo "(target: one generation to 10,000 nodes, p99 < 1 s)"
