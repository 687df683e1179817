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
TARGET_DIR=${CARGO_TARGET_DIR:-target}
PROFILE=${PROFILE:-release}
if [ -z "${SKIP_BUILD:-}" ]; then
    flag=(); [ "$PROFILE" = debug ] || flag=(--release)
    cargo build "${flag[@]}" --quiet --bin converge
fi
BIN="$TARGET_DIR/$PROFILE/converge"
NS="cvg-idle-$$"
WG="wgidle$$"
DIR=$(mktemp -d /tmp/cvg-idle-XXXXXX)
# Caddy runs as converge-caddy and must reach its directory below the data dir.
chmod 755 "$DIR"
DATA="$DIR/data"
PODMAN=""
AGENT=""
in_ns() { nsenter --net="/run/netns/$NS" "$@"; }
podman_cli() {
    in_ns podman --root "$DIR/podman/root" --runroot "$DIR/podman/run" --tmpdir "$DIR/podman/tmp" \
        --network-config-dir "$DIR/podman/networks" "$@"
}
cleanup() {
    set +e
    [ -n "$AGENT" ] && kill "$AGENT" 2>/dev/null && wait "$AGENT" 2>/dev/null
    podman_cli rm -af -t 0 >/dev/null 2>&1
    [ -n "$PODMAN" ] && kill "$PODMAN" 2>/dev/null
    # dnsmasq, wireguard-go and the Caddy pair outlive the agent by design: found by
    # their command lines naming this run's directory or interface.
    for p in $(pgrep -f "$DIR|wireguard-go $WG"); do kill "$p" 2>/dev/null; done
    sleep 0.5
    ip netns del "$NS" 2>/dev/null
    # Podman leaves overlay and shm mounts below its root.
    grep -o " $DIR[^ ]*" /proc/mounts | sort -r | while read -r m; do umount -l "$m" 2>/dev/null; done
    rm -rf "$DIR"
}
trap cleanup EXIT

ip netns add "$NS"
in_ns ip link set lo up

# The Podman service, its own storage, the busybox image (no registry here).
mkdir -p "$DIR/podman/tmp" "$DIR/podman/networks" "$DIR/rootfs/bin"
cp /bin/busybox "$DIR/rootfs/bin/"
for c in sh ls cat sleep httpd nc wget echo true; do ln -sf busybox "$DIR/rootfs/bin/$c"; done
tar -C "$DIR/rootfs" -c . | podman_cli import - localhost/busybox:test >/dev/null 2>&1
# nsenter execs podman: $! is the service itself.
nsenter --net="/run/netns/$NS" podman --root "$DIR/podman/root" --runroot "$DIR/podman/run" \
    --tmpdir "$DIR/podman/tmp" --network-config-dir "$DIR/podman/networks" \
    system service --time=0 "unix://$DIR/podman.sock" 2>"$DIR/podman.log" &
PODMAN=$!
for _ in $(seq 100); do [ -S "$DIR/podman.sock" ] && break; sleep 0.1; done

# The document: the large benchmark shape (or SHAPE=small), with containers that can run here.
python3 - "$WG" "$CONTAINERS" "$PEERS" "$PORTS" "$RECORDS" "$ROUTES" >"$DIR/big.json" <<'PY'
import base64, hashlib, json, sys
wg = sys.argv[1]
n, npeers, nports, nrecords, nroutes = (int(a) for a in sys.argv[2:7])
def key(i):
    return base64.b64encode(hashlib.sha256(b"peer-%d" % i).digest()).decode()
containers = [{
    "name": f"svc-{i}", "image": "localhost/busybox:test",
    "command": ["httpd", "-f", "-p", "8000", "-h", "/bin"],
    "env": {"RUST_LOG": "info", "PORT": "8000"},
    "ports": [{"containerPort": 8000}],
    "resources": {"cpus": 0.5, "memory": "64Mi", "pids": 64},
    "labels": {"team": "core"},
    "network": "apps", "ip": f"10.89.{i // 250}.{i % 250 + 2}",
    "stopGracePeriod": "1s",
} for i in range(n)]
peers = [{
    "name": f"peer-{i}", "publicKey": key(i),
    "endpoint": f"192.0.2.{i % 250 + 1}:51820",
    "allowedIps": [f"10.200.{i // 250}.{i % 250 + 1}/32"],
    "persistentKeepalive": 25,
} for i in range(npeers)]
ports = [{"protocol": "tcp", "hostPort": 10000 + i,
          "target": {"container": f"svc-{i % n}", "port": 8000}} for i in range(nports)]
records = [{"name": f"svc-{i}.internal", "type": "A",
            "values": [f"10.88.{i // 250}.{i % 250 + 1}"]} for i in range(nrecords)]
routes = [{"name": f"route-{i}", "hosts": [f"app-{i}.example.com"], "tls": "off",
           "upstreams": [{"container": f"svc-{i % n}", "port": 8000}]} for i in range(nroutes)]
entries = {f"config/key-{i}": f"value-{i}" for i in range(100)}
print(json.dumps({
    "apiVersion": "converge/v1",
    "node": {"id": "bench-node", "mode": "proxy"},
    "generation": 1,
    "issuedAt": "2026-11-24T10:00:00Z",
    "networks": [{"name": "apps", "subnets": [{"subnet": "10.89.0.0/16"}]}],
    "containers": containers,
    "wireguard": {"interface": wg, "listenPort": 51820, "addresses": ["10.200.255.1/16"], "peers": peers},
    "firewall": {"publishedPorts": ports},
    "dns": {"zone": "internal", "listen": ["127.0.0.1"], "port": 53, "records": records},
    "routes": {"routes": routes},
    "metadata": {"labels": {"role": "proxy"}, "hostname": "bench-node",
                 "projects": [{"id": "bench", "tokenSha256": hashlib.sha256(b"bench-token").hexdigest(),
                               "entries": entries}]},
}))
PY
"$BIN" validate "$DIR/big.json" >/dev/null

ticks() { awk '{print $14 + $15}' "/proc/$1/stat" 2>/dev/null || echo 0; }
rss_kb() { awk '/VmRSS/ {print $2}' "/proc/$1/status" 2>/dev/null || echo 0; }
hz=$(getconf CLK_TCK)
converged() { # every reconciler Converged at generation 1 (or Unmanaged: no section)
    "$BIN" --data-dir "$DATA" status --output json 2>/dev/null | python3 -c '
import json, sys
s = json.load(sys.stdin)
r = s.get("reconcilers", [])
sys.exit(0 if r and all(x["state"] in ("Converged", "Unmanaged") and x.get("observedGeneration") == 1 for x in r) else 1)'
}
# The daemons the node runs (not the agent): pid list by what they are.
daemons() {
    echo "podman-service $PODMAN"
    for p in $(pgrep -f "wireguard-go $WG"); do echo "wireguard-go $p"; done
    for p in $(pgrep -f "dnsmasq.*$DIR"); do echo "dnsmasq $p"; done
    for p in $(pgrep -f "caddy.*$DIR"); do echo "caddy $p"; done
    for p in $(pgrep -f "conmon.*$DIR"); do echo "conmon $p"; done
}

ROWS=()
measure() { # label pages(kept|released)
    local label=$1 pages=$2 env=()
    [ "$pages" = kept ] && env=(env CONVERGE_KEEP_STARTUP_PAGES=1)
    local started=$SECONDS
    nsenter --net="/run/netns/$NS" "${env[@]}" "$BIN" --data-dir "$DATA" --runtime podman \
        --podman-socket "$DIR/podman.sock" --secrets-dir "$DIR/secrets" agent --proxy --node-id bench-node \
        2>>"$DIR/agent.log" &
    AGENT=$!
    for _ in $(seq 100); do [ -S "$DATA/converge.sock" ] && "$BIN" --data-dir "$DATA" status >/dev/null 2>&1 && break; sleep 0.1; done
    [ "$label" != first ] || "$BIN" --data-dir "$DATA" push "$DIR/big.json" >/dev/null
    local ok=""
    for _ in $(seq 1200); do
        if converged; then ok=1; break; fi
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
    while read -r name pid; do d0[$pid]=$(ticks "$pid"); done < <(daemons)
    sleep "$SECS"
    converged || echo "warning: not every reconciler Converged at the end of the window" >&2
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
    done < <(daemons)
    for name in "${!drss[@]}"; do
        line+=$(awk -v n="$name" -v k="${dn[$name]}" -v r="${drss[$name]}" -v c="${dcpu[$name]}" -v hz="$hz" -v s="$SECS" \
            'BEGIN { printf "%s%s %.1f MB %.3f %%; ", n, (k > 1 ? " x" k : ""), r/1024, c/hz/s*100 }')
    done
    echo "  $label agent ($pages start-up pages): converged after ${took} s; daemons over the window: $line"
    kill "$AGENT"; wait "$AGENT" 2>/dev/null || true
    AGENT=""
    rm -f "$DATA/converge.sock"
}

echo "idle agent, $SECS s window after every reconciler Converged; $PROFILE build; $CONTAINERS containers, $PEERS peers, $PORTS ports, $RECORDS records, $ROUTES routes; load $(cut -d' ' -f1-3 /proc/loadavg)"
measure first released
measure restarted kept
measure restarted released
grep -v '^  ·' "$DIR/status.txt"
echo
echo "| agent | start-up pages | time to Converged | RSS at window start | RSS at end | RssAnon | RssFile | of it the binary | peak (VmHWM) | CPU |"
echo "|---|---|---|---|---|---|---|---|---|---|"
printf '%s\n' "${ROWS[@]}"
echo "(targets: RSS 20 MB, CPU 0.5 %)"
