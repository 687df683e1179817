#!/usr/bin/env bash
# Fleet-wide dry run at N simulated nodes (examples/fleet_plane.rs): for each transport,
# a fresh reference control plane (`converge control-plane serve`, HTTPS with a private
# CA for enrollment; for NATS also `--nats` on a fresh nats-server with TLS, the plane's
# per-node nkey users included and reloaded on each enrollment, as install/ and the docs
# set it up) on 127.0.0.1, and N node clients in one process that enroll over the real
# protocol, take the transport the plane hands out, acknowledge generations and answer
# dry runs (verified, candidate validated, a synthetic plan). Measured: one new
# generation for all (the baseline: publish to acknowledgement through the same plane),
# then `converge control-plane plan` PLANS times, each from its start to the aggregate
# printed. The transport `nats-shared` is `nats` with `serve --state nats` (enrollment,
# status and rollouts in JetStream KV, SQLite as the cache): what shared state costs;
# `nats-shards` is `nats` with the documents bucket over SHARDS streams (default 8).
# Needs openssl and nats-server; no root. Cleans up after itself.
# KEEP=1 keeps the plane's and nats-server's logs.
# Usage: [FLEET_SIZE=2000] [PLANS=20] [TRANSPORTS="nats nats-shared https"] [HEARTBEAT_SECS=15] benches/fleet_plan.sh
set -euo pipefail
cd "$(dirname "$0")/.."
N=${FLEET_SIZE:-2000}
PLANS=${PLANS:-20}
TRANSPORTS=${TRANSPORTS:-nats nats-shared https}
HEARTBEAT=${HEARTBEAT_SECS:-15}
TARGET_DIR=${CARGO_TARGET_DIR:-target}
PROFILE=${PROFILE:-release}
if [ -z "${SKIP_BUILD:-}" ]; then
    flag=(); [ "$PROFILE" = debug ] || flag=(--release)
    cargo build "${flag[@]}" --quiet --example fleet_plane --bin converge
fi
BIN="$TARGET_DIR/$PROFILE/converge"
FLEET="$TARGET_DIR/$PROFILE/examples/fleet_plane"
DIR=$(mktemp -d /tmp/cvg-fleet-plan-XXXXXX)
PIDS=()
cleanup() {
    for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
    if [ -n "${KEEP:-}" ]; then echo "logs kept in $DIR"; else rm -rf "$DIR"; fi
}
trap cleanup EXIT
ulimit -n "$(ulimit -Hn)"
echo "nats-server $(nats-server --version | awk '{print $2}'); $PROFILE build; open files: $(ulimit -n); cores: $(nproc); load: $(cut -d' ' -f1-3 /proc/loadavg)"
# shellcheck source=benches/test_ca.sh
. benches/test_ca.sh
make_test_ca "$DIR"
wait_port() { for _ in $(seq 100); do (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null && return; sleep 0.1; done; }

ROWS=()
GENROWS=()
for t in $TRANSPORTS; do
    run="$DIR/$t"
    mkdir -p "$run/docs" "$run/data"
    serve=()
    if [ "$t" != https ]; then
        cat >"$run/nats.conf" <<CONF
listen: 127.0.0.1:14300
max_connections: 100000
jetstream { store_dir: "$run/js" }
pid_file: "$run/nats.pid"
tls { cert_file: "$DIR/tls.crt", key_file: "$DIR/tls.key" }
include ./auth.conf
CONF
        # The plane's own NATS user before the server starts; serve keeps the file current.
        "$BIN" control-plane nats-auth --data "$run/data" --out "$run/auth.conf" 2>/dev/null
        nats-server -c "$run/nats.conf" 2>"$run/nats.log" &
        PIDS+=($!)
        wait_port 14300
        serve=(--nats tls://127.0.0.1:14300 --nats-ca "$DIR/ca.crt" --nats-auth-file "$run/auth.conf"
            --nats-pid-file "$run/nats.pid")
        [ "$t" = nats-shared ] && serve+=(--state nats)
        [ "$t" = nats-shards ] && serve+=(--nats-shards "${SHARDS:-8}")
    fi
    case $t in nats) port=18501 ;; nats-shared) port=18503 ;; nats-shards) port=18504 ;; *) port=18502 ;; esac
    RUST_LOG=warn,converge::control::plane=info "$BIN" control-plane serve --dir "$run/docs" --data "$run/data" \
        --listen "127.0.0.1:$port" --tls-cert "$DIR/tls.crt" --tls-key "$DIR/tls.key" "${serve[@]}" 2>"$run/plane.log" &
    plane=$!
    PIDS+=("$plane")
    wait_port "$port"
    echo "== $t: $N nodes, $PLANS dry runs (load $(cut -d' ' -f1 /proc/loadavg))"
    if out=$(PLANS=$PLANS CONVERGE="$BIN" IDLE_SECS=${IDLE_SECS:-10} "$FLEET" "https://127.0.0.1:$port" "$DIR/ca.crt" \
        "$run/docs" "$run/data" "$plane" "$N" "$HEARTBEAT" 2>"$run/fleet.log"); then
        grep -v 'ROW' <<<"$out"
        ROWS+=("$(grep '^PLANROW' <<<"$out" | sed 's/^PLANROW //')")
        GENROWS+=("| $t $(grep '^ROW' <<<"$out" | sed 's/^ROW //')")
    else
        echo "$out"
        grep -m3 -A1 '^Error' "$run/fleet.log" || tail -3 "$run/fleet.log"
        ROWS+=("| $t | $N | failed (see above) |")
    fi
    # The plane's own account of each dry run: requests built (sealed, signed), sent,
    # answers gathered.
    grep 'dry run answers gathered' "$run/plane.log" | grep -o 'answered=[0-9]* asked=[0-9]* build_ms=[0-9]* send_ms=[0-9]* answers_ms=[0-9]*' |
        sed 's/^/  plane: /' || true
    warnings=$(grep -c -i 'warn\|error' "$run/plane.log" || true)
    echo "  control-plane log: $warnings warnings/errors"
    grep -i 'warn\|error' "$run/plane.log" | sort | uniq -c | sort -rn | head -3 || true
    for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; wait "$p" 2>/dev/null || true; done
    PIDS=()
done

echo
echo "| transport | N | runs | dry run p50 | p99 | max | answered (worst run) | one generation: status sent p50 | p99 | dry-run p99 / generation p99 | plane CPU per dry run | nodes CPU per dry run |"
echo "|---|---|---|---|---|---|---|---|---|---|---|---|"
printf '%s\n' "${ROWS[@]}"
echo
echo "| transport | N | received p50 | p99 | max | received | sent p50 | p99 | recorded (plane store) | client RSS/node | client idle CPU | plane RSS | plane idle CPU | plane CPU for the update |"
echo "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"
printf '%s\n' "${GENROWS[@]}"
echo "(target: dry run across 2,000 nodes < 5 s p99; heartbeat every ${HEARTBEAT} s per node)"
