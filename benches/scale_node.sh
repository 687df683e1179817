#!/usr/bin/env bash
# The whole node at scale: ONE `converge agent --proxy` carrying at once 200 containers
# (busybox sleepers on a converge network), 10,000 published ports, 10,000 DNS records,
# 1,000 WireGuard peers, 2,000 routes (to the node's own containers) and 10,000 metadata
# entries (10 projects of 1,000), with the daemons it needs running in its own network
# namespace (benches/lib/node.sh: a Podman service, wireguard-go, dnsmasq, the Caddy
# pair). Prints:
#  - the time from the agent's start (document pushed at once) until each reconciler,
#    then every reconciler, is Converged at generation 1;
#  - the passes host events still start once converged, until quiet (10 s without a
#    reconciler passing twice);
#  - the no-op pass time per reconciler once quiet: the agent's own
#    `converge_pass_duration_seconds` histogram (--metrics-listen), its sum and count
#    over a window of resync passes (--resync-secs RESYNC) that repaired nothing;
#  - the agent's RSS (anonymous and file-backed apart) and peak after that window;
#  - ONE change in each section published as one new document (generation 2: a
#    container's env, a port added, a record changed, a peer added, a route added, a
#    metadata entry changed) and the time until each reconciler is Converged at it.
# Needs root, podman + runc, busybox-static, wireguard-go, dnsmasq, caddy, curl, python3.
# Cleans up after itself. SHAPE=small: the --quick sizes of benches/run-all (20
# containers, 100 peers, 1,000 ports, 1,000 records, 200 routes, 1,000 entries).
# Usage: [CONTAINERS=200] [PEERS=..] [PORTS=..] [RECORDS=..] [ROUTES=..] [ENTRIES=..]
#        [RESYNC=30] [WINDOW=120] [KEEP_LOG=FILE] [PROFILE=release] [SKIP_BUILD=1] benches/scale_node.sh
set -euo pipefail
cd "$(dirname "$0")/.."
if [ "${SHAPE:-big}" = small ]; then
    CONTAINERS=${CONTAINERS:-20} PEERS=${PEERS:-100} PORTS=${PORTS:-1000} RECORDS=${RECORDS:-1000}
    ROUTES=${ROUTES:-200} ENTRIES=${ENTRIES:-1000} WINDOW=${WINDOW:-60}
fi
CONTAINERS=${CONTAINERS:-200}
PEERS=${PEERS:-1000}
PORTS=${PORTS:-10000}
RECORDS=${RECORDS:-10000}
ROUTES=${ROUTES:-2000}
ENTRIES=${ENTRIES:-10000}
RESYNC=${RESYNC:-30}
WINDOW=${WINDOW:-120}
# shellcheck source=benches/lib/node.sh
. benches/lib/node.sh
node_binary
trap node_cleanup EXIT
node_init sc
node_podman

projects=10
[ "$ENTRIES" -ge 10 ] || projects=1
sizes=(--containers "$CONTAINERS" --peers "$PEERS" --ports "$PORTS" --records "$RECORDS"
    --routes "$ROUTES" --entries "$ENTRIES" --projects "$projects" --command sleep --no-hostname)
node_document "${sizes[@]}" >"$DIR/gen1.json"
node_document "${sizes[@]}" --change --generation 2 >"$DIR/gen2.json"
"$BIN" validate "$DIR/gen1.json" >/dev/null
"$BIN" validate "$DIR/gen2.json" >/dev/null
MPORT=9464
scrape() { in_ns curl -sf "http://127.0.0.1:$MPORT/metrics"; }
# pass_sums: "RECONCILER SUM COUNT" per reconciler, from the pass-duration histogram.
pass_sums() {
    scrape | awk '
        /^converge_pass_duration_seconds_sum/ { match($0, /reconciler="[^"]*"/); r = substr($0, RSTART + 12, RLENGTH - 13); s[r] = $2 }
        /^converge_pass_duration_seconds_count/ { match($0, /reconciler="[^"]*"/); r = substr($0, RSTART + 12, RLENGTH - 13); c[r] = $2 }
        END { for (r in s) print r, s[r], c[r] }' | sort
}
repairs() { scrape | awk '/^converge_drift_repairs_total/ { n += $2 } END { print n + 0 }'; }
load() { cut -d' ' -f1-3 /proc/loadavg; }

echo "whole node at scale, ${PROFILE:-release} build: $CONTAINERS containers, $PORTS ports, $RECORDS records, $PEERS peers, $ROUTES routes, $ENTRIES metadata entries ($projects projects); load at start $(load)"

# push_and_wait GEN START TIMEOUT: pushes gen GEN.json and waits until every reconciler
# is Converged at it (node_wait's table in convGEN.txt); else shows the agent's log and
# stops.
push_and_wait() {
    "$BIN" --data-dir "$DATA" push "$DIR/gen$1.json" >/dev/null
    if ! node_wait "$1" "$2" "$3" >"$DIR/conv$1.txt"; then
        echo "generation $1 not converged after $(($3 / 60)) min" >&2
        tail -30 "$DIR/agent.log" >&2
        exit 1
    fi
}

# 1. Start to every reconciler Converged.
start=$(date +%s.%N)
node_agent --metrics-listen "127.0.0.1:$MPORT" --resync-secs "$RESYNC"
push_and_wait 1 "$start" 1800
load1=$(load)
"$BIN" --data-dir "$DATA" status | grep -v '^  ·' >"$DIR/status.txt" || true

# 2. Settling: the passes host events still start after convergence (Podman's events
# of the creates and starts arrive after the apply), until a 10 s stretch in which no
# reconciler passed more than once.
pass_sums >"$DIR/sumsC.txt"
t0=$SECONDS
cp "$DIR/sumsC.txt" "$DIR/sums0.txt"
while :; do
    sleep 10
    pass_sums >"$DIR/sums1.txt"
    busy=$(join "$DIR/sums0.txt" "$DIR/sums1.txt" | awk '$5 - $3 > 1 { n++ } END { print n + 0 }')
    cp "$DIR/sums1.txt" "$DIR/sums0.txt"
    # What started the containers reconciler's latest pass, sampled.
    "$BIN" --data-dir "$DATA" status --output json | python3 -c '
import json, re, sys
for r in json.load(sys.stdin)["reconcilers"]:
    if r["reconciler"] == "containers":
        why = r.get("reason") or {}
        print(re.sub(r"svc-[0-9]+", "svc-N", (why.get("kind", "?") + " " + str(why.get("object", ""))).strip()))' >>"$DIR/reasons.txt" || true
    if [ "$busy" = 0 ] || [ $((SECONDS - t0)) -ge 1200 ]; then break; fi
done
settle=$((SECONDS - t0))
join "$DIR/sumsC.txt" "$DIR/sums0.txt" >"$DIR/settle.txt"

# 3. No-op passes: the histogram's sum and count over WINDOW seconds of resyncs (and
# host events) that repaired nothing, once every reconciler has had at least two.
rep0=$(repairs)
t0=$SECONDS
while :; do
    sleep 5
    pass_sums >"$DIR/sums1.txt"
    enough=$(join "$DIR/sums0.txt" "$DIR/sums1.txt" | awk '$5 - $3 < 2 { n++ } END { print n + 0 }')
    if [ $((SECONDS - t0)) -ge "$WINDOW" ] && [ "$enough" = 0 ]; then break; fi
    if [ $((SECONDS - t0)) -ge $((WINDOW * 4)) ]; then break; fi
done
window=$((SECONDS - t0))
rep1=$(repairs)
node_converged 1 || echo "warning: not every reconciler Converged at the end of the no-op window" >&2
load2=$(load)

# 4. RSS after convergence and the no-op window.
anon=$(awk '/RssAnon/ {print $2}' "/proc/$AGENT/status")
file=$(awk '/RssFile/ {print $2}' "/proc/$AGENT/status")
hwm=$(awk '/VmHWM/ {print $2}' "/proc/$AGENT/status")
rss=$(rss_kb "$AGENT")
daemons=""
declare -A drss dn
while read -r name pid; do
    drss[$name]=$(( ${drss[$name]:-0} + $(rss_kb "$pid") ))
    dn[$name]=$(( ${dn[$name]:-0} + 1 ))
done < <(node_daemons)
for name in "${!drss[@]}"; do
    daemons+=$(awk -v n="$name" -v k="${dn[$name]}" -v r="${drss[$name]}" \
        'BEGIN { printf "%s%s %.1f MB; ", n, (k > 1 ? " x" k : ""), r/1024 }')
done

# 5. One change in each section, one new document.
start=$(date +%s.%N)
push_and_wait 2 "$start" 900
load3=$(load)

cat "$DIR/status.txt"
echo
echo "| reconciler | start to Converged (gen 1) | passes from then until quiet | no-op passes in the window | no-op pass, mean | one change (gen 2) to Converged |"
echo "|---|---|---|---|---|---|"
join "$DIR/sums0.txt" "$DIR/sums1.txt" >"$DIR/noop.txt"
while read -r r secs; do
    [ "$r" != all ] || continue
    noop=$(awk -v r="$r" '$1 == r { n = $5 - $3; if (n > 0) printf "%d|%.1f ms", n, ($4 - $2) / n * 1000; else printf "0|-" }' "$DIR/noop.txt")
    change=$(awk -v r="$r" '$1 == r { print $2 }' "$DIR/conv2.txt")
    settling=$(awk -v r="$r" '$1 == r { n = $5 - $3; if (n > 0) printf "%d (%.1f ms each)", n, ($4 - $2) / n * 1000; else printf "0" }' "$DIR/settle.txt")
    echo "| $r | $secs s | ${settling:-0} | ${noop%%|*} | ${noop#*|} | ${change:--} s |"
done <"$DIR/conv1.txt"
echo "| every reconciler | $(awk '$1 == "all" { print $2 }' "$DIR/conv1.txt") s (load $load1) | quiet after ${settle} s | window ${window} s, resync ${RESYNC} s, drift repairs $((rep1 - rep0)) (load $load2) | | $(awk '$1 == "all" { print $2 }' "$DIR/conv2.txt") s (load $load3) |"
echo
echo "| agent after convergence and the no-op window (load $load2) | RSS | RssAnon | RssFile | peak (VmHWM) |"
echo "|---|---|---|---|---|"
awk -v r="$rss" -v a="$anon" -v f="$file" -v h="$hwm" \
    'BEGIN { printf "| converge agent --proxy | %.1f MB | %.1f MB | %.1f MB | %.1f MB |\n", r/1024, a/1024, f/1024, h/1024 }'
echo "daemons: $daemons"
echo "while settling, what started the containers reconciler's latest pass (sampled every 10 s): $(sort "$DIR/reasons.txt" | uniq -c | awk '{ n = $1; $1 = ""; sub(/^ /, ""); printf "%s%s x%d", (NR > 1 ? ", " : ""), $0, n }')"
[ -z "${KEEP_LOG:-}" ] || cp "$DIR/agent.log" "$KEEP_LOG"
