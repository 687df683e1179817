#!/usr/bin/env bash
# Soak: one `converge agent --proxy` carrying every section (containers on a converge
# network through a Podman service, a WireGuard interface with peers, published ports and
# input/forward rules, DNS records, metadata, a borg backup schedule, Caddy routes) for a
# long time under churn, sampled every minute:
#   - a new document every DOC_SECS (generation+1; records, ports, metadata change each
#     time, the routes every tenth generation),
#   - a container killed by hand (podman kill) every KILL_SECS,
#   - drift every DRIFT_SECS, in turn: `nft delete table inet converge`, a WireGuard peer
#     removed (wg set ... remove), dnsmasq killed; each one's repair is waited for and timed.
# Samples (agent RSS anonymous and file-backed apart, open fds, the SQLite store state.db
# + its WAL, CPU % over the minute) go to OUT/samples.csv; churn events to OUT/events.csv;
# OUT/summary.txt has the counts and the first- vs last-10-minute medians. Plot with
#   cargo bench --bench soak_plot -- OUT/samples.csv OUT/soak.svg
# Runs in its own network namespace, own data dir and Podman storage; cleans up (the output
# dir stays). Needs root, podman, wireguard-go, wg, nft, dnsmasq, caddy, borg, python3.
# Usage: benches/soak.sh [MINUTES [OUT]]   (MINUTES also from SOAK_MINUTES; default 120)
# BIN=path picks the converge binary (default: a release build of this tree).
set -euo pipefail
# All in one function: bash reads it whole before running it, so editing this file during a
# long run cannot change the run.
main() {
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$repo"
MINUTES=${1:-${SOAK_MINUTES:-120}}
OUT=${2:-/var/tmp/soak-run}
SAMPLE_SECS=${SAMPLE_SECS:-60}
DOC_SECS=${DOC_SECS:-5}
KILL_SECS=${KILL_SECS:-137}
DRIFT_SECS=${DRIFT_SECS:-181}
RESYNC_SECS=${RESYNC_SECS:-30}
if [[ -z ${BIN:-} ]]; then
  cargo build --release --quiet --bin converge
  BIN="${CARGO_TARGET_DIR:-$repo/target}/release/converge"
fi
BIN=$(realpath "$BIN")

ns="cvg-soak-$$"
wg_if="wg-soak"
mkdir -p "$OUT"
OUT=$(realpath "$OUT")
data="$OUT/data"
agent=""
podman_svc=""
loops=()

in_ns() { nsenter --net="/run/netns/$ns" "$@"; }
podman_cli() { in_ns podman --root "$data/podman/root" --runroot "$data/podman/run" --tmpdir "$data/podman/tmp" --network-config-dir "$data/podman/networks" "$@"; }
cv() { in_ns "$BIN" --data-dir "$data" --runtime podman --podman-socket "$data/podman.sock" "$@"; }
now() { date +%s; }
now_ms() { date +%s%3N; }
# Seconds since T0_MS, to a tenth.
since() { awk -v a="$1" -v b="$(now_ms)" 'BEGIN { printf "%.1f", (b - a) / 1000 }'; }
log() { printf '%s %s\n' "$(date -u +%H:%M:%S)" "$*"; }
# event WHAT ACTION [DETAIL [SECONDS]]: one row of events.csv.
event() { printf '%s,%s,%s,%s,%s\n' "$(now)" "$1" "$2" "${3:-}" "${4:-}" >>"$OUT/events.csv"; }

cleanup() {
  set +e
  for p in "${loops[@]}"; do kill "$p" 2>/dev/null; done
  for p in "${loops[@]}"; do wait "$p" 2>/dev/null; done
  [[ -n $agent ]] && kill "$agent" 2>/dev/null && wait "$agent" 2>/dev/null
  [[ -f $data/dns/dnsmasq.pid ]] && kill "$(cat "$data/dns/dnsmasq.pid")" 2>/dev/null
  [[ -e /run/netns/$ns && -S $data/podman.sock ]] && podman_cli rm -af -t 0 >/dev/null 2>&1
  [[ -n $podman_svc ]] && kill "$podman_svc" 2>/dev/null && wait "$podman_svc" 2>/dev/null
  # What the agent started and outlives it (wireguard-go, Caddy, conmon) goes with the namespace.
  [[ -e /run/netns/$ns ]] && ip netns pids "$ns" | xargs -r kill 2>/dev/null
  sleep 0.5
  [[ -e /run/netns/$ns ]] && ip netns pids "$ns" | xargs -r kill -9 2>/dev/null
  ip netns del "$ns" 2>/dev/null
  rm -f "/var/run/wireguard/$wg_if.sock"
  grep -o " $data/[^ ]*" /proc/mounts | sort -r | xargs -r -n1 umount -l 2>/dev/null
  rm -rf "$data"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

log "soak: $MINUTES minutes, binary $BIN ($("$BIN" --version)), output $OUT"
rm -rf "$data" "$OUT/samples.csv" "$OUT/events.csv" "$OUT/summary.txt" "$OUT/src"
ip netns add "$ns"
in_ns ip link set lo up
# The node's mesh address, where DNS listens, is on lo too so DNS need not wait for the mesh.
in_ns ip addr add 10.210.0.7/32 dev lo
mkdir -p "$data/podman/tmp" "$data/podman/networks" "$data/rootfs/bin" "$OUT/src"
chmod 755 "$data"
# The backup schedule's small source dir, touched by the document loop.
for i in $(seq 20); do head -c 4096 /dev/urandom >"$OUT/src/file-$i"; done

log "Podman service in the namespace, busybox image imported"
cp /bin/busybox "$data/rootfs/bin/"
for c in sh ls cat sleep httpd nc wget echo true; do ln -sf busybox "$data/rootfs/bin/$c"; done
tar -C "$data/rootfs" -c . | podman_cli import - localhost/busybox:test >/dev/null
# nsenter execs podman, so $! is the service's pid (a shell function would add a subshell).
nsenter --net="/run/netns/$ns" podman --root "$data/podman/root" --runroot "$data/podman/run" --tmpdir "$data/podman/tmp" \
  --network-config-dir "$data/podman/networks" system service --time=0 "unix://$data/podman.sock" 2>"$OUT/podman.log" &
podman_svc=$!
for _ in $(seq 100); do [[ -S $data/podman.sock ]] && break; sleep 0.1; done

key=$(cv wireguard rotate-key --interface "$wg_if")
log "WireGuard key of $wg_if: $key"

# doc.py GEN OUT: the soak document of generation GEN (fixtures/sandbox.json as a proxy).
cat >"$OUT/doc.py" <<'PY'
import base64, datetime, hashlib, json, os, sys
gen, out, fixture, data, src = int(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4], sys.argv[5]
d = json.load(open(fixture))
d["node"] = {"id": "soak-node", "mode": "proxy"}
d["generation"] = gen
d["issuedAt"] = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
for c in d["containers"]:
    # Fewer health-check runs on a shared 2-core machine.
    if "healthCheck" in c:
        c["healthCheck"]["interval"] = "30s"
w = d["wireguard"]
w["interface"] = "wg-soak"
w.pop("privateKeySecret", None)
def key(i):
    return base64.b64encode(hashlib.sha256(b"soak-peer-%d" % i).digest()).decode()
# Peers with loopback endpoints and no keepalive: nothing is sent (the namespace has only lo).
w["peers"] = [{"name": "peer-%d" % i, "publicKey": key(i), "endpoint": "127.0.0.1:%d" % (52000 + i),
               "allowedIps": ["10.210.0.%d/32" % (20 + i)]} for i in range(8)]
fw = d["firewall"]
# Ten published ports that move each generation (the web container's port 80).
fw["publishedPorts"] += [{"protocol": "tcp", "hostPort": 20000 + (gen + i) % 40,
                          "target": {"container": "web", "port": 80}} for i in range(10)]
recs = d["dns"]["records"]
recs += [{"name": "svc-%d.internal" % i, "type": "A",
          "values": ["10.77.%d.%d" % (gen % 250, i + 1)]} for i in range(30)]
recs.append({"name": "generation.internal", "type": "TXT", "values": ["gen=%d" % gen]})
bk = d["backups"]
bk["repositories"] = [{"name": "local", "kind": "borg", "url": os.path.join(data, "borg-repo")}]
bk["schedules"] = [{"name": "src", "repository": "local", "paths": [src], "cron": "*/3 * * * *",
                    "retention": {"keepHourly": 3}}]
bk.pop("restores", None)
bk.pop("exports", None)
md = d["metadata"]
# hostname and motd would change the host's /etc/hostname and /etc/motd (no UTS or mount
# namespace here).
md.pop("hostname", None)
md.pop("motd", None)
md["annotations"]["generation"] = str(gen)
md["projects"] = [{"id": "storefront", "tokenSha256": hashlib.sha256(b"soak-token").hexdigest(),
                   "entries": {"db/host": "postgres.internal", "generation": gen,
                               "features": {"flag-%d" % (gen % 7): True}}}]
hdr = "v%d" % (gen // 10)
d["routes"] = {"routes": [
    {"name": "web-%d" % i, "hosts": ["web%d.soak.test" % i], "tls": "internal",
     "upstreams": [{"container": "web", "port": 80}],
     "responseHeaders": {"set": {"X-Soak": hdr}}} for i in range(3)]}
tmp = out + ".tmp"
json.dump(d, open(tmp, "w"), indent=1)
os.replace(tmp, out)
PY
mkdoc() { python3 "$OUT/doc.py" "$1" "$2" "$repo/fixtures/sandbox.json" "$data" "$OUT/src"; }
mkdoc 1 "$OUT/doc.json"
cv validate "$OUT/doc.json" >/dev/null

log "agent (--proxy, resync ${RESYNC_SECS}s)"
nsenter --net="/run/netns/$ns" "$BIN" --data-dir "$data" --runtime podman --podman-socket "$data/podman.sock" \
  agent --proxy --node-id soak-node --resync-secs "$RESYNC_SECS" 2>"$OUT/agent.log" &
agent=$!
for _ in $(seq 100); do [[ -S $data/converge.sock ]] && break; sleep 0.1; done
cv push "$OUT/doc.json" >/dev/null
converged() { [[ $(cv status --output json | grep -c '"state": "Converged"') -ge 7 ]]; }
for _ in $(seq 300); do converged && break; sleep 1; done
cv status | tee "$OUT/status-start.txt"

# The churn loops; each logs what it did to events.csv.
# The loops go on after a failed step (set +e): a soak counts failures, it does not stop.
doc_loop() {
  set +e
  local gen=1
  while true; do
    sleep "$DOC_SECS"
    gen=$((gen + 1))
    mkdoc "$gen" "$OUT/next.json"
    if cv push "$OUT/next.json" >/dev/null 2>>"$OUT/push-errors.log"; then
      event doc pushed "$gen"
    else
      event doc refused "$gen"
    fi
    # Something new for the next backup run.
    head -c 4096 /dev/urandom >"$OUT/src/file-$((gen % 20 + 1))"
  done
}
kill_loop() {
  set +e
  local names=(web api worker postgres redis node-exporter) i=0 name t0
  while true; do
    sleep "$KILL_SECS"
    name=${names[$((i % ${#names[@]}))]}
    i=$((i + 1))
    t0=$(now_ms)
    podman_cli kill "$name" >/dev/null 2>&1 || { event kill failed "$name"; continue; }
    event kill injected "$name"
    for _ in $(seq 120); do
      [[ $(podman_cli inspect -f '{{.State.Running}}' "$name" 2>/dev/null) == true ]] && {
        event kill repaired "$name" "$(since "$t0")"
        break
      }
      sleep 1
    done
  done
}
drift_loop() {
  set +e
  local i=0 kind t0 peer pid ok
  peer=$(python3 -c 'import base64,hashlib; print(base64.b64encode(hashlib.sha256(b"soak-peer-3").digest()).decode())')
  while true; do
    sleep "$DRIFT_SECS"
    kind=$((i % 3))
    i=$((i + 1))
    t0=$(now_ms)
    case $kind in
      0) in_ns nft delete table inet converge && event drift injected nft-table ;;
      1) in_ns wg set "$wg_if" peer "$peer" remove && event drift injected wg-peer ;;
      2)
        pid=$(cat "$data/dns/dnsmasq.pid")
        kill "$pid" && event drift injected dnsmasq
        ;;
    esac
    for _ in $(seq 180); do
      ok=false
      case $kind in
        0) in_ns nft list table inet converge >/dev/null 2>&1 && ok=true ;;
        1) in_ns wg show "$wg_if" peers 2>/dev/null | grep -qF "$peer" && ok=true ;;
        2)
          [[ -f $data/dns/dnsmasq.pid && $(cat "$data/dns/dnsmasq.pid") != "$pid" ]] &&
            kill -0 "$(cat "$data/dns/dnsmasq.pid")" 2>/dev/null && ok=true
          ;;
      esac
      if $ok; then
        event drift repaired "$(printf 'nft-table wg-peer dnsmasq' | cut -d' ' -f$((kind + 1)))" "$(since "$t0")"
        break
      fi
      sleep 1
    done
  done
}
echo "time,what,action,detail,secs" >"$OUT/events.csv"
doc_loop >>"$OUT/loops.log" 2>&1 &
loops+=($!)
kill_loop >>"$OUT/loops.log" 2>&1 &
loops+=($!)
drift_loop >>"$OUT/loops.log" 2>&1 &
loops+=($!)

# The sampler: one row a minute.
hz=$(getconf CLK_TCK)
ticks() { awk '{print $14 + $15}' "/proc/$agent/stat"; }
field() { awk -v k="$1:" '$1 == k {print $2}' "/proc/$agent/status"; }
size() { stat -c %s "$1" 2>/dev/null || echo 0; }
echo "minute,rss_anon_kb,rss_file_kb,fds,threads,store_bytes,wal_bytes,cpu_pct,generation,observed_min,degraded,docs,kills,drifts,repairs" >"$OUT/samples.csv"
start=$(now)
t_prev=$(ticks)
s_prev=$start
end=$((start + MINUTES * 60))
n=0
count() { grep -c "$1" "$OUT/events.csv" || true; }
while true; do
  kill -0 "$agent" 2>/dev/null || { log "the agent died"; exit 1; }
  t=$(ticks)
  s=$(now)
  # Empty in the first row: no interval yet.
  cpu=$(awk -v a="$t_prev" -v b="$t" -v hz="$hz" -v s="$((s - s_prev))" 'BEGIN { if (s > 0) printf "%.2f", (b - a) / hz / s * 100 }')
  t_prev=$t
  s_prev=$s
  # The accepted generation, the oldest one a managing reconciler has converged to, and how
  # many reconcilers are Degraded.
  gens=$(cv status --output json 2>/dev/null | python3 -c '
import json, sys
s = json.load(sys.stdin)
r = [x for x in s.get("reconcilers", []) if x.get("state") != "Unmanaged"]
print("%s,%s,%d" % (s.get("generation") or 0, min((x.get("observedGeneration") or 0 for x in r), default=0),
                    sum(1 for x in r if x.get("state") == "Degraded")))' 2>/dev/null || echo 0,0,0)
  db=$(size "$data/state.db")
  wal=$(size "$data/state.db-wal")
  printf '%s,%s,%s,%s,%s,%s,%s,%s,%s,%s,%s,%s,%s\n' "$(awk -v d="$((s - start))" 'BEGIN { printf "%.2f", d / 60 }')" \
    "$(field RssAnon)" "$(field RssFile)" "$(find "/proc/$agent/fd" -mindepth 1 -maxdepth 1 | wc -l)" "$(field Threads)" \
    "$((db + wal))" "$wal" "$cpu" "$gens" "$(count ',doc,pushed,')" "$(count ',kill,injected,')" \
    "$(count ',drift,injected,')" "$(count ',drift,repaired,')" >>"$OUT/samples.csv"
  tail -1 "$OUT/samples.csv"
  [[ $s -ge $end ]] && break
  n=$((n + 1))
  next=$((start + n * SAMPLE_SECS))
  [[ $next -gt $end ]] && next=$end
  sleep $((next > $(now) ? next - $(now) : 0))
done
for p in "${loops[@]}"; do kill "$p" 2>/dev/null; done
cv status | tee "$OUT/status-end.txt"

# Summary: churn counts and the first- vs last-10-minute medians.
python3 - "$OUT" <<'PY' | tee "$OUT/summary.txt"
import csv, statistics, sys
out = sys.argv[1]
rows = list(csv.DictReader(open(out + "/samples.csv")))
ev = list(csv.DictReader(open(out + "/events.csv")))
def count(what, action):
    return sum(1 for e in ev if e["what"] == what and e["action"] == action)
print("duration: %s minutes, %d samples" % (rows[-1]["minute"], len(rows)))
print("documents pushed: %d (refused %d), last accepted generation %s"
      % (count("doc", "pushed"), count("doc", "refused"), rows[-1]["generation"]))
print("containers killed: %d, back running: %d" % (count("kill", "injected"), count("kill", "repaired")))
for kind in ("nft-table", "wg-peer", "dnsmasq"):
    inj = sum(1 for e in ev if e["what"] == "drift" and e["action"] == "injected" and e["detail"] == kind)
    rep = [float(e["secs"]) for e in ev if e["what"] == "drift" and e["action"] == "repaired" and e["detail"] == kind]
    print("drift %-9s injected %3d, repaired %3d, repair s median %s max %s"
          % (kind, inj, len(rep), statistics.median(rep) if rep else "-", max(rep) if rep else "-"))
w = 10 if len(rows) >= 20 else max(1, len(rows) // 2)
first, last = rows[:w], rows[-w:]
print("%-14s %12s %12s %8s" % ("series", "first %d min" % w, "last %d min" % w, "ratio"))
for k in ("rss_anon_kb", "rss_file_kb", "fds", "threads", "store_bytes", "wal_bytes", "cpu_pct"):
    a = statistics.median([float(r[k]) for r in first if r[k]] or [0])
    b = statistics.median([float(r[k]) for r in last if r[k]] or [0])
    print("%-14s %12.1f %12.1f %8.2f" % (k, a, b, b / a if a else float("nan")))
PY
log "done: $OUT/samples.csv, $OUT/events.csv, $OUT/summary.txt"
}
main "$@"
