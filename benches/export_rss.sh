#!/usr/bin/env bash
# Resident memory of the agent during a 1 GiB S3 export (issue: peak within 32 MB of the
# idle figure, back to it afterwards). A release agent in its own network namespace
# with moto (S3) beside it exports one borg archive of incompressible data; its RSS is
# sampled every 20 ms: idle before, peak during, settled 10 s after (and how much of
# what stayed is heap, RssAnon, rather than code pages touched for the first time). `BASELINE_BIN=PATH`
# runs the same export with another build first and prints both with ratios.
# `BIN=PATH` measures that build instead of a fresh release build.
# Needs root, borg and moto_server. Usage: benches/export_rss.sh [MiB]
set -euo pipefail
cd "$(dirname "$0")/.."
MIB=${1:-1024}
TARGET_DIR=${CARGO_TARGET_DIR:-target}
if [ -z "${BIN:-}" ]; then
    cargo build --release --quiet --bin converge
    BIN="$TARGET_DIR/release/converge"
fi
NS="cvg-exp-$$"
DIR=$(mktemp -d /var/tmp/cvg-exp-XXXXXX)
PASS=bench-passphrase
MOTO=""
cleanup() {
    [ -n "$MOTO" ] && kill "$MOTO" 2>/dev/null || true
    pkill -f "$DIR/data" 2>/dev/null || true
    ip netns del "$NS" 2>/dev/null || true
    rm -rf "$DIR"
}
trap cleanup EXIT
in_ns() { nsenter --net="/run/netns/$NS" "$@"; }
ip netns add "$NS"
in_ns ip link set lo up
in_ns moto_server -H 127.0.0.1 -p 5055 >/dev/null 2>&1 &
MOTO=$!
for _ in $(seq 100); do in_ns curl -sf -o /dev/null http://127.0.0.1:5055 && break; sleep 0.2; done
in_ns curl -sf -X PUT http://127.0.0.1:5055/exports >/dev/null

mkdir -p "$DIR/src" "$DIR/secrets"
printf '%s\n' "$PASS" >"$DIR/secrets/borg-pass"
printf '{"accessKeyId": "test", "secretAccessKey": "test"}' >"$DIR/secrets/s3"
head -c "$((MIB << 20))" /dev/urandom >"$DIR/src/data"
export BORG_PASSPHRASE=$PASS BORG_BASE_DIR="$DIR/borg-base"
borg init --encryption=repokey-blake2 "$DIR/repo" >/dev/null
borg create --compression none "$DIR/repo::a1" "$DIR/src"
unset BORG_PASSPHRASE
rm -f "$DIR/src/data"

doc() { # generation, with the export or without
    local exports='[]'
    [ "$2" = yes ] && exports="[{\"id\": \"e$1\", \"repository\": \"local\", \"archive\": \"a1\",
        \"s3\": {\"endpoint\": \"http://127.0.0.1:5055\", \"bucket\": \"exports\", \"key\": \"e$1.tar\",
                 \"credentialsSecret\": \"s3\"}, \"urlTtl\": \"1h\"}]"
    cat <<EOF
{"apiVersion": "converge/v1", "node": {"id": "bench", "mode": "worker"}, "generation": $1,
 "issuedAt": "2026-12-07T10:00:00Z",
 "backups": {"repositories": [{"name": "local", "kind": "borg", "url": "$DIR/repo",
                               "passphraseSecret": "borg-pass"}],
             "exports": $exports}}
EOF
}

ended() {
    python3 -c 'import json,sys; s=json.load(open(sys.argv[1])); sys.exit(0 if s.get("exports",{}).get("e2",{}).get("status") in ("done","failed") else 1)' "$1" 2>/dev/null
}

rss_kb() { awk '/VmRSS/ {print $2}' "/proc/$1/status" 2>/dev/null || echo 0; }
anon_kb() { awk '/RssAnon/ {print $2}' "/proc/$1/status" 2>/dev/null || echo 0; }

# One run: prints "idle peak settled seconds" (RSS in kB).
run() {
    trap - EXIT # a command substitution's subshell: the cleanup is the caller's
    local bin=$1 data="$DIR/data"
    rm -rf "$data"
    # nsenter execs the agent: $! is the agent itself.
    nsenter --net="/run/netns/$NS" "$bin" --data-dir "$data" agent --node-id bench \
        --secrets-dir "$DIR/secrets" 2>"$DIR/agent.log" >/dev/null &
    local agent=$!
    for _ in $(seq 100); do [ -S "$data/converge.sock" ] && break; sleep 0.1; done
    doc 1 no >"$DIR/d1.json"
    "$bin" --data-dir "$data" push "$DIR/d1.json" >/dev/null
    sleep 5
    local idle idle_anon peak=0 r t0 t1
    idle=$(rss_kb "$agent")
    idle_anon=$(anon_kb "$agent")
    doc 2 yes >"$DIR/d2.json"
    t0=$(date +%s.%N)
    "$bin" --data-dir "$data" push "$DIR/d2.json" >/dev/null
    # The record changes only at the export's start and end: re-read it when it does.
    local seen="" now
    while :; do
        now=$(stat -c %y "$data/backups/state.json" 2>/dev/null || true)
        if [ "$now" != "$seen" ]; then
            seen=$now
            ended "$data/backups/state.json" && break
        fi
        r=$(rss_kb "$agent"); [ "$r" -gt "$peak" ] && peak=$r
        sleep 0.02
    done
    t1=$(date +%s.%N)
    python3 -c 'import json,sys; e=json.load(open(sys.argv[1]))["exports"]["e2"]; sys.exit(0 if e["status"]=="done" else "export failed: "+e.get("message",""))' "$data/backups/state.json"
    sleep 10
    local settled settled_anon
    settled=$(rss_kb "$agent")
    settled_anon=$(anon_kb "$agent")
    kill "$agent"; wait "$agent" 2>/dev/null || true
    echo "$idle $peak $settled $(printf "%.1f" "$(echo "$t1 - $t0" | bc)") $((settled_anon - idle_anon))"
}

mb() { echo "scale=1; $1 / 1024" | bc; }
row() { # label idle peak settled secs settled-heap
    printf '%-10s %8s %8s %10s %8s %11s %11s %8s %9s\n' "$1" "$(mb "$2")" "$(mb "$3")" "+$(mb $(($3 - $2)))" \
        "$(mb "$4")" "+$(mb $(($4 - $2)))" "+$(mb "$6")" "$5" "$(echo "scale=0; $MIB / $5" | bc)"
}
echo "Export of a $MIB MiB archive to moto (S3), agent RSS in MB ($BIN, $(nproc) cores, $(date -u +%F))"
printf '%-10s %8s %8s %10s %8s %11s %11s %8s %9s\n' build idle peak peak-idle settled settled-idle of-it-heap seconds MiB/s
if [ -n "${BASELINE_BIN:-}" ]; then
    # shellcheck disable=SC2046
    set -- $(run "$BASELINE_BIN"); row baseline "$@"; base_peak=$(($2 - $1))
fi
# shellcheck disable=SC2046
set -- $(run "$BIN"); row this "$@"
if [ -n "${BASELINE_BIN:-}" ]; then
    echo "peak over idle: this / baseline = $(echo "scale=2; ($2 - $1) / $base_peak" | bc)"
fi
