#!/usr/bin/env bash
# An honest idle figure: `converge agent --proxy` holding a large document CONVERGED,
# with every daemon it needs running in its own network namespace: a Podman API service
# (its own storage) running the containers on a converge network, wireguard-go with
# 1,000 peers, dnsmasq with 5,000 records, the Caddy pair with 2,000 routes, 10,000
# published ports in nftables, a metadata project. The window starts only once every
# reconciler reports Converged at the document's generation. Measured over SECS: the
# agent's RSS split into anonymous (heap, stacks) and file-backed (the binary's pages)
# memory, its peak and CPU; the daemons' RSS and CPU beside it.
# Three agents, one after the other, on the same node: the first converges the bare
# node (measured, start-up pages released, the default); then, with everything already
# in place, one that keeps its start-up code pages mapped (CONVERGE_KEEP_STARTUP_PAGES=1,
# the baseline) and one that releases them (src/memory.rs).
# Needs root, podman + runc (containers.conf selecting runc, see install/deps.sh),
# busybox-static, wireguard-go, dnsmasq, caddy and python3. Cleans up after itself.
# SHAPE=small: a Techulus-shaped proxy instead (10 containers, 3 peers, 20 ports, 50
# records, 50 routes); CONTAINERS, PEERS, PORTS, RECORDS, ROUTES set the counts one by one.
# Usage: [SHAPE=big|small] [CONTAINERS=50] [PROFILE=release] [SKIP_BUILD=1] benches/idle_agent.sh [SECONDS]
set -euo pipefail
cd "$(dirname "$0")/.."
SECS=${1:-60}
if [ "${SHAPE:-big}" = small ]; then
    CONTAINERS=${CONTAINERS:-10} PEERS=${PEERS:-3} PORTS=${PORTS:-20} RECORDS=${RECORDS:-50} ROUTES=${ROUTES:-50}
fi
CONTAINERS=${CONTAINERS:-50}
PEERS=${PEERS:-1000}
PORTS=${PORTS:-10000}
RECORDS=${RECORDS:-5000}
ROUTES=${ROUTES:-2000}
# shellcheck source=benches/lib/node.sh
. benches/lib/node.sh
node_binary
trap node_cleanup EXIT
node_init idle
node_podman

# The document: the large benchmark shape (or SHAPE=small), with containers that can run here.
node_document --containers "$CONTAINERS" --peers "$PEERS" --ports "$PORTS" --records "$RECORDS" \
    --routes "$ROUTES" >"$DIR/big.json"
"$BIN" validate "$DIR/big.json" >/dev/null

hz=$(getconf CLK_TCK)

ROWS=()
measure() { # label pages(kept|released)
    local label=$1 pages=$2
    local started=$SECONDS
    if [ "$pages" = kept ]; then ENV="env CONVERGE_KEEP_STARTUP_PAGES=1" node_agent; else node_agent; fi
    [ "$label" != first ] || "$BIN" --data-dir "$DATA" push "$DIR/big.json" >/dev/null
    local ok=""
    for _ in $(seq 1200); do
        if node_converged 1; then ok=1; break; fi
        sleep 0.5
    done
    if [ -z "$ok" ]; then
        echo "not converged after 10 min:" >&2
        "$BIN" --data-dir "$DATA" status >&2
        tail -20 "$DIR/agent.log" >&2
        exit 1
    fi
    local took=$((SECONDS - started))
    sleep 5
    local t0 rss0 t1 rss1 anon file hwm cpu exe bin
    t0=$(ticks "$AGENT"); rss0=$(rss_kb "$AGENT")
    declare -A d0
    while read -r name pid; do d0[$pid]=$(ticks "$pid"); done < <(node_daemons)
    sleep "$SECS"
    node_converged 1 || echo "warning: not every reconciler Converged at the end of the window" >&2
    [ "$label" != first ] || "$BIN" --data-dir "$DATA" status >"$DIR/status.txt"
    t1=$(ticks "$AGENT"); rss1=$(rss_kb "$AGENT")
    anon=$(awk '/RssAnon/ {print $2}' "/proc/$AGENT/status")
    file=$(awk '/RssFile/ {print $2}' "/proc/$AGENT/status")
    hwm=$(awk '/VmHWM/ {print $2}' "/proc/$AGENT/status")
    # Of the file-backed pages, those of the converge binary itself (the rest: libc & co).
    exe=$(readlink "/proc/$AGENT/exe")
    bin=$(awk -v exe="$exe" '/^[0-9a-f]+-[0-9a-f]+ / {cur = $6} /^Rss:/ && cur == exe {s += $2} END {print s + 0}' "/proc/$AGENT/smaps")
    cpu=$(awk -v a="$t0" -v b="$t1" -v hz="$hz" -v s="$SECS" 'BEGIN { printf "%.3f", (b - a) / hz / s * 100 }')
    ROWS+=("$(awk -v l="$label" -v p="$pages" -v t="$took" -v r0="$rss0" -v r="$rss1" -v a="$anon" -v f="$file" -v b="$bin" -v h="$hwm" -v c="$cpu" \
        'BEGIN { printf "| %s | %s | %d s | %.1f MB | %.1f MB | %.1f MB | %.1f MB | %.1f MB | %.1f MB | %.3f %% |", l, p, t, r0/1024, r/1024, a/1024, f/1024, b/1024, h/1024, c }')")
    # The daemons over the same window (summed by kind).
    local line=""
    declare -A drss dcpu dn
    while read -r name pid; do
        drss[$name]=$(( ${drss[$name]:-0} + $(rss_kb "$pid") ))
        dcpu[$name]=$(( ${dcpu[$name]:-0} + $(ticks "$pid") - ${d0[$pid]:-$(ticks "$pid")} ))
        dn[$name]=$(( ${dn[$name]:-0} + 1 ))
    done < <(node_daemons)
    for name in "${!drss[@]}"; do
        line+=$(awk -v n="$name" -v k="${dn[$name]}" -v r="${drss[$name]}" -v c="${dcpu[$name]}" -v hz="$hz" -v s="$SECS" \
            'BEGIN { printf "%s%s %.1f MB %.3f %%; ", n, (k > 1 ? " x" k : ""), r/1024, c/hz/s*100 }')
    done
    echo "  $label agent ($pages start-up pages): converged after ${took} s; daemons over the window: $line"
    node_agent_stop
}

echo "idle agent, $SECS s window after every reconciler Converged; ${PROFILE:-release} build; $CONTAINERS containers, $PEERS peers, $PORTS ports, $RECORDS records, $ROUTES routes; load $(cut -d' ' -f1-3 /proc/loadavg)"
measure first released
measure restarted kept
measure restarted released
grep -v '^  ·' "$DIR/status.txt"
echo
echo "| agent | start-up pages | time to Converged | RSS at window start | RSS at end | RssAnon | RssFile | of it the binary | peak (VmHWM) | CPU |"
echo "|---|---|---|---|---|---|---|---|---|---|"
printf '%s\n' "${ROWS[@]}"
echo "(targets: RSS 20 MB, CPU 0.5 %)"
