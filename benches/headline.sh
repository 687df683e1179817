#!/usr/bin/env bash
# The headline an operator asks first: bare host (the image already present, the Podman
# service running) to fully converged, for a Techulus-shaped node: 10 containers on a
# network, 3 WireGuard peers, 50 DNS records, 20 published ports, metadata (20 entries),
# a borg backup schedule, and 50 Caddy routes to the containers (one `--proxy` node
# carrying the worker's sections and the proxy's routes, as benches/idle_agent.sh
# SHAPE=small does).
#
# converge: from the agent's start (the command line the systemd unit runs, `converge
# agent --data-dir D --proxy`, plus this harness's runtime, secrets and node-id flags; no
# systemd as PID 1 here: tests/systemd/run.sh measures systemctl start to READY at 0.02 s),
# the document pushed as soon as the socket answers.
# by hand: the same node scripted the way an operator would, one step after another
# (benches/headline.sh writes the script and its files before the clock starts): podman
# network create + 10 podman run; wireguard-go + wg genkey + wg set + ip addr/link; nft -f;
# dnsmasq with a hosts file; caddy run + one /load of 50 routes; borg init (the schedule
# as a note, no timer); metadata as files.
# Both timed the same way: wall clock from the start until the last piece answers, one
# probe for both (containers running per the Podman API, every published port in the nft
# ruleset, the 50 names resolving at 127.0.0.1:53, the 50 routes answering 200 through
# Caddy on :80, the 3 peers and the address on the interface, the metadata's last entry
# readable, the borg repository initialised). For converge also: until every reconciler
# reports Converged (the latest lastTransition). RUNS runs each (default 5), a fresh
# namespace each; medians and the ratio.
# Needs root, podman + runc, busybox-static, wireguard-go, wg, nft, dnsmasq, caddy, borg,
# dig, curl, python3. Cleans up after itself.
# Usage: [RUNS=5] [PROFILE=release] [SKIP_BUILD=1] benches/headline.sh
set -euo pipefail
cd "$(dirname "$0")/.."
RUNS=${RUNS:-5}
# shellcheck source=benches/lib/node.sh
. benches/lib/node.sh
node_binary
trap node_cleanup EXIT
N_CONTAINERS=10 N_PEERS=3 N_PORTS=20 N_RECORDS=50 N_ROUTES=50 N_ENTRIES=20
PASS=bench-borg-passphrase
now() { date +%s.%N; }
since() { awk -v a="$1" -v b="$(now)" 'BEGIN { printf "%.2f", b - a }'; }
load() { cut -d' ' -f1-3 /proc/loadavg; }

# probe START: waits until every piece answers (at most 180 s); prints "PIECE SECONDS"
# for each, then "all SECONDS". The same checks whoever set the node up.
probe() {
    local start=$1 names=() urls=() want_ports
    declare -A at=()
    for i in $(seq 0 $((N_RECORDS - 1))); do names+=("svc-$i.internal"); done
    for i in $(seq 0 $((N_ROUTES - 1))); do
        urls+=(--resolve "app-$i.example.com:80:127.0.0.1" "http://app-$i.example.com/")
    done
    want_ports=$(seq 10000 $((10000 + N_PORTS - 1)) | tr '\n' ' ')
    while :; do
        if [ -z "${at[containers]:-}" ] && [ "$(curl -sf --unix-socket "$DIR/podman.sock" \
            'http://d/v4.0.0/libpod/containers/json?filters=%7B%22status%22%3A%5B%22running%22%5D%7D' |
            grep -o '"svc-[0-9]*"' | sort -u | wc -l)" = "$N_CONTAINERS" ]; then
            at[containers]=$(since "$start")
        fi
        if [ -z "${at[ports]:-}" ]; then
            local ruleset missing=0
            ruleset=$(in_ns nft list ruleset 2>/dev/null | grep -oE '\b1[0-9]{4}\b' | sort -u | tr '\n' ' ')
            for p in $want_ports; do [[ " $ruleset" == *" $p "* ]] || { missing=1; break; }; done
            [ "$missing" = 1 ] || at[ports]=$(since "$start")
        fi
        if [ -z "${at[dns]:-}" ] && [ "$(in_ns dig @127.0.0.1 +short +time=1 +tries=1 "${names[@]}" 2>/dev/null |
            grep -c '^10\.88\.')" = "$N_RECORDS" ]; then
            at[dns]=$(since "$start")
        fi
        if [ -z "${at[routes]:-}" ] && [ "$(in_ns curl -s -o /dev/null -w '%{http_code}\n' --max-time 2 "${urls[@]}" 2>/dev/null |
            grep -c '^200$')" = "$N_ROUTES" ]; then
            at[routes]=$(since "$start")
        fi
        if [ -z "${at[wireguard]:-}" ] && [ "$(in_ns wg show "$WG" peers 2>/dev/null | wc -l)" = "$N_PEERS" ] &&
            in_ns ip -o addr show dev "$WG" 2>/dev/null | grep -q '10\.200\.255\.1/16' &&
            in_ns ip -o link show dev "$WG" 2>/dev/null | grep -qE '[<,]UP[,>]'; then
            at[wireguard]=$(since "$start")
        fi
        if [ -z "${at[metadata]:-}" ]; then
            local last="config/key-$((N_ENTRIES - 1))"
            if [ -f "$DIR/metadata/bench/$last" ] ||
                in_ns curl -sf --max-time 1 -H 'Authorization: Bearer bench-token' -H 'Converge-Metadata: true' \
                    "http://127.0.0.1:8500/v1/metadata/$last" 2>/dev/null | grep -q "value-$((N_ENTRIES - 1))"; then
                at[metadata]=$(since "$start")
            fi
        fi
        if [ -z "${at[backups]:-}" ] && grep -q '^key = ' "$DIR/borg/config" 2>/dev/null; then
            at[backups]=$(since "$start")
        fi
        if [ "${#at[@]}" = 7 ]; then break; fi
        if awk -v s="$(since "$start")" 'BEGIN { exit !(s > 180) }'; then
            echo "probe: not every piece answered after 180 s (${!at[*]} did)" >&2
            return 1
        fi
        sleep 0.1
    done
    for k in containers ports dns routes wireguard metadata backups; do echo "$k ${at[$k]}"; done
    echo "all $(since "$start")"
}

failed() { # keeps the agent's log and says where
    local keep; keep="/var/tmp/cvg-headline-$$-agent.log"
    cp "$DIR/agent.log" "$keep"
    "$BIN" --data-dir "$DATA" status >&2 || true
    echo "the agent's log: $keep" >&2
}

# The converge run: a fresh node, the agent started, the document pushed at once.
run_converge() {
    node_init "hc$1"
    node_podman
    mkdir -p "$DIR/secrets"
    (umask 077 && printf '%s' "$PASS" >"$DIR/secrets/borg-passphrase")
    node_document --containers $N_CONTAINERS --peers $N_PEERS --ports $N_PORTS --records $N_RECORDS \
        --routes $N_ROUTES --entries $N_ENTRIES --www /www --borg "$DIR/borg" --no-hostname >"$DIR/doc.json"
    "$BIN" validate "$DIR/doc.json" >/dev/null
    local start; start=$(now)
    node_agent
    "$BIN" --data-dir "$DATA" push "$DIR/doc.json" >/dev/null
    probe "$start" >"$DIR/probe.txt" || { failed; return 1; }
    node_wait 1 "$start" 300 >/dev/null || { failed; return 1; }
    # When the last reconciler turned Converged, from its own record.
    local conv
    conv=$("$BIN" --data-dir "$DATA" status --output json | python3 -c '
import datetime, json, sys
start = float(sys.argv[1])
rs = [r for r in json.load(sys.stdin)["reconcilers"] if r["state"] == "Converged"]
t = max(datetime.datetime.fromisoformat(r["lastTransition"].replace("Z", "+00:00")).timestamp() for r in rs)
print("%.2f" % (t - start))' "$start")
    echo "converge $1: answers $(awk '$1 == "all" { print $2 }' "$DIR/probe.txt") s, every reconciler Converged $conv s; $(grep -v '^all' "$DIR/probe.txt" | tr '\n' ' ')" >&2
    C_ALL+=("$(awk '$1 == "all" { print $2 }' "$DIR/probe.txt")")
    C_CONV+=("$conv")
    cat "$DIR/probe.txt" >>"$RESULTS/converge.txt"
    node_cleanup
}

# The operator's script and its files, written before the clock starts.
hand_files() {
    local h="$DIR/hand"
    mkdir -p "$h"
    {
        echo "table ip hand {"
        for chain in "prerouting { type nat hook prerouting priority dstnat; policy accept;" \
            "output { type nat hook output priority -100; policy accept;"; do
            echo "  chain $chain"
            for i in $(seq 0 $((N_PORTS - 1))); do
                echo "    tcp dport $((10000 + i)) dnat to 10.89.0.$((i % N_CONTAINERS + 2)):8000"
            done
            echo "  }"
        done
        echo "}"
    } >"$h/ports.nft"
    for i in $(seq 0 $((N_RECORDS - 1))); do echo "10.88.$((i / 250)).$((i % 250 + 1)) svc-$i.internal"; done >"$h/hosts"
    python3 - "$N_ROUTES" "$N_CONTAINERS" >"$h/caddy.json" <<'PY'
import json, sys
nroutes, n = int(sys.argv[1]), int(sys.argv[2])
routes = [{"match": [{"host": [f"app-{i}.example.com"]}],
           "handle": [{"handler": "reverse_proxy", "upstreams": [{"dial": f"10.89.0.{i % n + 2}:8000"}]}],
           "terminal": True} for i in range(nroutes)]
print(json.dumps({"apps": {"http": {"servers": {"hand": {
    "listen": [":80"], "routes": routes, "automatic_https": {"disable": True}}}}}}))
PY
    python3 - "$N_PEERS" >"$h/peers" <<'PY'
import base64, hashlib, sys
for i in range(int(sys.argv[1])):
    k = base64.b64encode(hashlib.sha256(b"peer-%d" % i).digest()).decode()
    print(f"peer {k} endpoint 192.0.2.{i % 250 + 1}:51820 allowed-ips 10.200.{i // 250}.{i % 250 + 1}/32 persistent-keepalive 25")
PY
    cat >"$h/setup.sh" <<EOF
#!/bin/bash
# The node by hand, one step after another.
set -euo pipefail
podman() { command podman --root "$DIR/podman/root" --runroot "$DIR/podman/run" --tmpdir "$DIR/podman/tmp" --network-config-dir "$DIR/podman/networks" "\$@"; }
podman network create --subnet 10.89.0.0/16 $NET >/dev/null
for i in \$(seq 0 $((N_CONTAINERS - 1))); do
  podman run -d --name svc-\$i --network $NET --ip 10.89.0.\$((i + 2)) --cpus 0.5 --memory 64m --pids-limit 64 \\
    --label team=core -e RUST_LOG=info -e PORT=8000 --stop-timeout 1 localhost/busybox:test httpd -f -p 8000 -h /www >/dev/null
done
wireguard-go $WG
(umask 077 && wg genkey >"$h/wg.key")
wg set $WG private-key "$h/wg.key" listen-port 51820 \$(cat "$h/peers")
ip addr add 10.200.255.1/16 dev $WG
ip link set $WG up
nft -f "$h/ports.nft"
dnsmasq --conf-file=/dev/null --no-resolv --no-hosts --addn-hosts="$h/hosts" --listen-address=127.0.0.1 \\
  --bind-interfaces --pid-file="$h/dnsmasq.pid"
XDG_DATA_HOME="$h/xdg" XDG_CONFIG_HOME="$h/xdg" caddy run --pidfile "$h/caddy.pid" >"$h/caddy.log" 2>&1 &
until curl -sf -o /dev/null http://localhost:2019/config/; do sleep 0.05; done
curl -sf -X POST -H 'Content-Type: application/json' --data-binary @"$h/caddy.json" http://localhost:2019/load
BORG_PASSPHRASE=$PASS borg init --encryption=repokey-blake2 "$DIR/borg"
echo "30 2 * * * BORG_PASSPHRASE=... borg create $DIR/borg::www-{now} /etc/hostname && borg prune --keep-daily 7 $DIR/borg" >"$h/backup-schedule.txt"
for i in \$(seq 0 $((N_ENTRIES - 1))); do
  mkdir -p "$DIR/metadata/bench/config"
  printf 'value-%d' \$i >"$DIR/metadata/bench/config/key-\$i"
done
EOF
    chmod 700 "$h/setup.sh"
}

run_hand() {
    node_init "hh$1"
    node_podman
    hand_files
    local start; start=$(now)
    in_ns "$DIR/hand/setup.sh" >"$DIR/hand/setup.log" 2>&1 &
    local script=$!
    probe "$start" >"$DIR/probe.txt" || { cat "$DIR/hand/setup.log" >&2; return 1; }
    wait "$script" || { echo "the hand script failed:" >&2; cat "$DIR/hand/setup.log" >&2; return 1; }
    echo "by hand $1: answers $(awk '$1 == "all" { print $2 }' "$DIR/probe.txt") s; $(grep -v '^all' "$DIR/probe.txt" | tr '\n' ' ')" >&2
    H_ALL+=("$(awk '$1 == "all" { print $2 }' "$DIR/probe.txt")")
    cat "$DIR/probe.txt" >>"$RESULTS/hand.txt"
    node_cleanup
}

median() { printf '%s\n' "$@" | sort -g | awk '{ v[NR] = $1 } END { if (NR % 2) print v[(NR + 1) / 2]; else printf "%.2f\n", (v[NR / 2] + v[NR / 2 + 1]) / 2 }'; }
# The median per piece from RESULTS/WHO.txt.
piece_median() { awk -v k="$2" '$1 == k { print $2 }' "$RESULTS/$1.txt" | sort -g |
    awk '{ v[NR] = $1 } END { if (NR % 2) print v[(NR + 1) / 2]; else printf "%.2f\n", (v[NR / 2] + v[NR / 2 + 1]) / 2 }'; }

RESULTS=$(mktemp -d "/tmp/cvg-headline-$$-XXXXXX")
trap 'node_cleanup; rm -rf "$RESULTS"' EXIT
C_ALL=() C_CONV=() H_ALL=()
load0=$(load)
echo "bare host to converged: $N_CONTAINERS containers, $N_PEERS peers, $N_RECORDS records, $N_PORTS ports, $N_ENTRIES metadata entries, a backup schedule, $N_ROUTES routes; ${PROFILE:-release} build; $RUNS runs each, alternating; load at start $load0" >&2
for r in $(seq "$RUNS"); do
    run_converge "$r"
    run_hand "$r"
done
load1=$(load)
c=$(median "${C_ALL[@]}") cc=$(median "${C_CONV[@]}") h=$(median "${H_ALL[@]}")
echo "| bare host to converged, median of $RUNS (load $load0 at start, $load1 at end) | converge agent | by hand (podman, wg, nft, dnsmasq, caddy, borg) | converge / by hand |"
echo "|---|---|---|---|"
for k in containers ports dns routes wireguard metadata backups; do
    echo "| $k answering | $(piece_median converge "$k") s | $(piece_median hand "$k") s | |"
done
echo "| every piece answering | $c s (runs: ${C_ALL[*]}) | $h s (runs: ${H_ALL[*]}) | $(awk -v a="$c" -v b="$h" 'BEGIN { printf "%.2fx", a / b }') |"
echo "| every reconciler Converged | $cc s (runs: ${C_CONV[*]}) | | $(awk -v a="$cc" -v b="$h" 'BEGIN { printf "%.2fx", a / b }') |"
