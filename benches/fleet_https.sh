#!/usr/bin/env bash
# Simulated fleet over the HTTPS transport (examples/fleet_plane.rs): for each N, a fresh
# reference control plane (`converge control-plane serve`, TLS with a private CA made
# here with openssl, as install/sandbox.sh does) on 127.0.0.1, and N node clients in one
# process that enroll, long-poll and acknowledge; one new generation for all of them.
# Prints one table row per N. Needs openssl and jq; no root. Cleans up after itself.
# Usage: [FLEET_SIZES="500 1000 2000"] [HEARTBEAT_SECS=15] benches/fleet_https.sh
set -euo pipefail
cd "$(dirname "$0")/.."
SIZES=${FLEET_SIZES:-500 1000 2000}
HEARTBEAT=${HEARTBEAT_SECS:-15}
TARGET_DIR=${CARGO_TARGET_DIR:-target}
[ -n "${SKIP_BUILD:-}" ] || cargo build --release --quiet --example fleet_plane --bin converge
BIN="$TARGET_DIR/release/converge"
FLEET="$TARGET_DIR/release/examples/fleet_plane"
DIR=$(mktemp -d /tmp/cvg-fleet-https-XXXXXX)
PLANE=""
cleanup() {
    [ -z "$PLANE" ] || kill "$PLANE" 2>/dev/null || true
    rm -rf "$DIR"
}
trap cleanup EXIT
# Two sockets per node on each side (long poll + status), both in this machine.
ulimit -n "$(ulimit -Hn)"
echo "open files: $(ulimit -n); ephemeral ports: $(tr '\t' - </proc/sys/net/ipv4/ip_local_port_range); cores: $(nproc)"

# shellcheck source=benches/test_ca.sh
. benches/test_ca.sh
make_test_ca "$DIR"

ROWS=()
port=18443
for n in $SIZES; do
    run="$DIR/run-$n"
    mkdir -p "$run/docs" "$run/data"
    port=$((port + 1))
    RUST_LOG=warn "$BIN" control-plane serve --dir "$run/docs" --data "$run/data" \
        --listen "127.0.0.1:$port" --tls-cert "$DIR/tls.crt" --tls-key "$DIR/tls.key" 2>"$run/plane.log" &
    PLANE=$!
    for _ in $(seq 100); do
        (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null && break
        sleep 0.1
    done
    echo "== $n nodes"
    if out=$("$FLEET" "https://127.0.0.1:$port" "$DIR/ca.crt" "$run/docs" "$run/data" "$PLANE" "$n" "$HEARTBEAT" 2>"$run/fleet.log"); then
        grep -v '^ROW' <<<"$out"
        ROWS+=("$(grep '^ROW' <<<"$out" | sed 's/^ROW //')")
    else
        echo "$out"
        grep -m3 -A1 '^Error' "$run/fleet.log" || tail -3 "$run/fleet.log"
        ROWS+=("| $n | failed (see above) |")
    fi
    # The plane's own view, as an operator sees it.
    echo "  control-plane nodes: $("$BIN" control-plane nodes --data "$run/data" -o json |
        jq '[.[] | select(.acceptedGeneration == 2)] | length') of $n nodes at acceptedGeneration 2"
    warnings=$(grep -c -i 'warn\|error' "$run/plane.log" || true)
    echo "  control-plane log: $warnings warnings/errors"
    kill "$PLANE" 2>/dev/null || true
    wait "$PLANE" 2>/dev/null || true
    PLANE=""
done

echo
echo "| N | received p50 | p99 | max | received | recorded p50 | p99 | recorded (plane store) | client RSS/node | client idle CPU | plane RSS | plane idle CPU | plane CPU for the update |"
echo "|---|---|---|---|---|---|---|---|---|---|---|---|---|"
printf '%s\n' "${ROWS[@]}"
echo "(heartbeat every ${HEARTBEAT} s per node; 15 s polling: 7.5 s mean, 15 s worst latency)"
