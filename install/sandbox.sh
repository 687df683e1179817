#!/usr/bin/env bash
# Quick start: the main job end to end on two local sandbox nodes.
# Installs what it needs (Debian 12, root), builds converge, starts two sandbox nodes (each
# its own network namespace and data dir, joined by a veth pair; the first also runs a
# Podman service), creates each node's WireGuard key, shows `converge diff` of
# fixtures/sandbox.json (fixtures/worker.json with a local busybox image, since there is
# no registry here, and a WireGuard mesh with the second node), has the agents converge,
# shows status, the containers, the DNS answers, the published ports, a ping through the
# tunnel and the peer's last handshake in `converge status`, the second node (a proxy,
# enrolled with the reference control plane, which sends it its signed document) serving
# HTTPS over the mesh, the plane rotating its signing key (the proxy follows) and its
# signed downloads, a staged rollout of the proxy's next document and the fleet page, the
# metadata API, the metrics Prometheus scrapes, then changes one
# record and shows the diff of only that change and the events journal, and last the
# first scheduled borg backup. Cleans up at the end unless KEEP=1.
# Usage: install/sandbox.sh
set -euo pipefail

if [[ $(id -u) -ne 0 ]]; then
  if command -v sudo >/dev/null 2>&1; then
    exec sudo --preserve-env=PATH,CARGO_TARGET_DIR,CARGO_HOME,RUSTUP_HOME,KEEP "$0" "$@"
  fi
  echo "sandbox.sh: must run as root (the sandbox is a network namespace)" >&2
  exit 1
fi
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$repo"
banner() { printf '\n\033[1m==> %s\033[0m\n' "$*"; }

banner "installing dependencies"
./install/deps.sh
if [[ -f $HOME/.cargo/env ]]; then
  # shellcheck source=/dev/null
  . "$HOME/.cargo/env"
fi

banner "building converge (release)"
cargo build --release --quiet --bin converge
bin="${CARGO_TARGET_DIR:-$repo/target}/release/converge"
"$bin" --version

ns=converge-sandbox
data=/var/tmp/converge-sandbox
# The second node: only a WireGuard interface, meshed with the first.
ns_b=converge-sandbox-b
data_b=/var/tmp/converge-sandbox-b
# wireguard-go's UAPI sockets (/var/run/wireguard) are shared by all namespaces.
wg_a=wg-sandbox-a
wg_b=wg-sandbox-b
agent=""
agent_b=""
# Network definitions go to the sandbox's own directory (by default they are host-global).
podman_cli() { nsenter --net="/run/netns/$ns" podman --root "$data/podman/root" --runroot "$data/podman/run" --tmpdir "$data/podman/tmp" --network-config-dir "$data/podman/networks" "$@"; }
# Removes everything a sandbox run (this one or an earlier, interrupted one) left.
teardown() {
  set +e
  [[ -f $data/dns/dnsmasq.pid ]] && kill "$(cat "$data/dns/dnsmasq.pid")" 2>/dev/null
  [[ -e /run/netns/$ns && -d $data/podman ]] && podman_cli rm -af -t 0 >/dev/null 2>&1
  pkill -f "unix://$data/podman.sock" 2>/dev/null
  # What is left in the sandboxes (wireguard-go, which outlives its agent) goes with them.
  for n in "$ns" "$ns_b"; do
    [[ -e /run/netns/$n ]] && ip netns pids "$n" | xargs -r kill 2>/dev/null
  done
  sleep 0.2
  ip netns del "$ns" 2>/dev/null
  ip netns del "$ns_b" 2>/dev/null
  rm -f "/var/run/wireguard/$wg_a.sock" "/var/run/wireguard/$wg_b.sock"
  grep -o " $data/[^ ]*" /proc/mounts | sort -r | xargs -r -n1 umount -l 2>/dev/null
  rm -rf "$data" "$data_b"
  set -e
}
cleanup() {
  set +e
  [[ -n $agent ]] && kill "$agent" 2>/dev/null && wait "$agent" 2>/dev/null
  [[ -n $agent_b ]] && kill "$agent_b" 2>/dev/null && wait "$agent_b" 2>/dev/null
  if [[ ${KEEP:-0} == 1 ]]; then
    echo "KEEP=1: the sandboxes (netns $ns and $ns_b, containers, dnsmasq, wireguard-go) are left running; data in $data and $data_b"
    return
  fi
  teardown
  true
}
trap cleanup EXIT
fixture=fixtures/sandbox.json

banner "starting sandbox nodes: network namespaces $ns and $ns_b (10.0.3.17 and 10.0.3.18 on a veth pair)"
teardown
ip netns add "$ns"
ip netns add "$ns_b"
in_ns() { nsenter --net="/run/netns/$ns" "$@"; }
in_ns_b() { nsenter --net="/run/netns/$ns_b" "$@"; }
ip link add sbx-a netns "$ns" type veth peer name sbx-b netns "$ns_b"
in_ns ip link set lo up
in_ns ip addr add 10.0.3.17/24 dev sbx-a
in_ns ip link set sbx-a up
in_ns_b ip link set lo up
in_ns_b ip addr add 10.0.3.18/24 dev sbx-b
in_ns_b ip link set sbx-b up
# The fixture's DNS listens on the node's mesh address; the WireGuard interface gets it
# too, but DNS need not wait for the mesh: give the sandbox that address on lo as well.
listen=$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["dns"]["listen"][0])' "$fixture")
in_ns ip addr add "$listen/32" dev lo
mkdir -p "$data" "$data_b"

banner "starting a Podman API service in the sandbox and importing a busybox image"
mkdir -p "$data/podman/tmp" "$data/podman/networks" "$data/rootfs/bin"
chmod 755 "$data"
cp /bin/busybox "$data/rootfs/bin/"
for c in sh ls cat sleep httpd nc wget echo true; do ln -sf busybox "$data/rootfs/bin/$c"; done
tar -C "$data/rootfs" -c . | podman_cli import - localhost/busybox:test >/dev/null
nsenter --net="/run/netns/$ns" podman --root "$data/podman/root" --runroot "$data/podman/run" --tmpdir "$data/podman/tmp" \
  --network-config-dir "$data/podman/networks" system service --time=0 "unix://$data/podman.sock" 2>"$data/podman.log" &
for _ in $(seq 100); do [[ -S $data/podman.sock ]] && break; sleep 0.1; done
cv() { in_ns "$bin" --data-dir "$data" --runtime podman --podman-socket "$data/podman.sock" "$@"; }
cv_b() { in_ns_b "$bin" --data-dir "$data_b" "$@"; }

banner "each node's WireGuard key: converge wireguard rotate-key (the private key stays in <data-dir>/wireguard/, 0600)"
key_a=$(cv wireguard rotate-key --interface "$wg_a")
key_b=$(cv_b wireguard rotate-key --interface "$wg_b")
echo "worker-fra1-07 ($wg_a): $key_a"
echo "proxy-fra1-01 ($wg_b): $key_b"

# The documents: the fixture with its mesh reduced to the second node (with that node's
# real public key), and the second node's own document meshing it back.
doc="$data/sandbox.json"
doc_b="$data_b/proxy-fra1-01.json"
# The metadata API's bearer token for project storefront: only its SHA-256 travels in
# the document.
md_token=$(head -c 24 /dev/urandom | base64 | tr -d '/+=')
python3 - "$fixture" "$doc" "$doc_b" "$wg_a" "$wg_b" "$key_a" "$key_b" "$md_token" <<'PY'
import hashlib, json, sys
fixture, doc, doc_b, wg_a, wg_b, key_a, key_b, md_token = sys.argv[1:]
d = json.load(open(fixture))
d["metadata"]["projects"] = [{
    "id": "storefront",
    "tokenSha256": hashlib.sha256(md_token.encode()).hexdigest(),
    "entries": {"db/host": "postgres.internal", "db/port": 5432,
                "features": {"newCheckout": True}},
}]
# Backups into a local borg repository of the sandbox (no passphrase secret here): one
# schedule that archives this repository's fixtures/ every minute, and no restore or
# export of archives that do not exist yet.
import os
bk = d["backups"]
bk["repositories"] = [{"name": "local", "kind": "borg",
                       "url": os.path.join(os.path.dirname(os.path.abspath(doc)), "borg-repo")}]
bk["schedules"] = [{"name": "fixtures", "repository": "local",
                    "paths": [os.path.abspath("fixtures")], "cron": "* * * * *",
                    "retention": {"keepHourly": 3}}]
bk.pop("restores", None)
bk.pop("exports", None)
w = d["wireguard"]
w["interface"] = wg_a
w.pop("privateKeySecret", None)  # converge's generated key
w["peers"] = [{
    "name": "proxy-fra1-01", "publicKey": key_b, "endpoint": "10.0.3.18:51820",
    "allowedIps": ["10.210.0.1/32", "fd00:210::1/128"], "persistentKeepalive": 25,
}]
# The reference control plane runs in this node's namespace (10.0.3.17:8443): its input
# policy (drop) must let the proxy's connections in, or only the connection the proxy
# opened before the firewall converged would reach it.
d["firewall"]["input"]["allow"].append(
    {"from": ["10.0.3.18/32"], "protocol": "tcp", "ports": [8443]})
json.dump(d, open(doc, "w"), indent=2)
b = {
    "apiVersion": "converge/v1",
    "node": {"id": "proxy-fra1-01", "mode": "proxy"},
    "generation": 1,
    "issuedAt": d["issuedAt"],
    "wireguard": {
        "interface": wg_b, "listenPort": 51820,
        "addresses": ["10.210.0.1/24", "fd00:210::1/64"],
        "peers": [{
            "name": "worker-fra1-07", "publicKey": key_a, "endpoint": "10.0.3.17:51820",
            # worker-fra1-07's container network (fixture: networks.apps) routes through it.
            "allowedIps": ["10.210.0.7/32", "fd00:210::7/128", "10.89.7.0/24"],
            "persistentKeepalive": 25,
        }],
    },
}
# The proxy's route: HTTPS (Caddy's internal CA) to the api container's port that
# worker-fra1-07 publishes on its mesh address for the proxy only (allowFrom).
b["routes"] = {"routes": [{
    "name": "api", "hosts": ["api.storefront.test"], "tls": "internal",
    "upstreams": [{"peer": "worker-fra1-07", "port": 8081}],
}]}
json.dump(b, open(doc_b, "w"), indent=2)
PY

banner "a control plane (converge control-plane serve, HTTPS, in the first sandbox) enrolls proxy-fra1-01: converge join"
# The reference control plane signs the documents in $cp/docs (one file per node id) and
# hands them to enrolled nodes; the node pins its signing key at enrollment.
cp="$data/control-plane"
mkdir -p "$cp/docs"
# A private CA for its HTTPS, which the node pins at enrollment (join --ca).
ec=(-newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes)
openssl req -x509 "${ec[@]}" -days 1 -subj /CN=converge-sandbox-ca \
  -keyout "$cp/ca.key" -out "$cp/ca.crt" 2>/dev/null
openssl req "${ec[@]}" -subj /CN=10.0.3.17 -keyout "$cp/tls.key" -out "$cp/tls.csr" 2>/dev/null
printf 'subjectAltName=IP:10.0.3.17\nbasicConstraints=CA:FALSE\nextendedKeyUsage=serverAuth\n' >"$cp/tls.ext"
openssl x509 -req -in "$cp/tls.csr" -CA "$cp/ca.crt" -CAkey "$cp/ca.key" -CAcreateserial -days 1 \
  -extfile "$cp/tls.ext" -out "$cp/tls.crt" 2>/dev/null
in_ns "$bin" control-plane serve --dir "$cp/docs" --data "$cp/data" --listen 10.0.3.17:8443 \
  --tls-cert "$cp/tls.crt" --tls-key "$cp/tls.key" --fleet-page 2>"$cp/cp.log" &
for _ in $(seq 100); do grep -q "control plane serving" "$cp/cp.log" && break; sleep 0.1; done
# A token for exactly this node; the plane prints the join command with its key's
# fingerprint, which the node pins (any other key answering is refused).
token=$(in_ns "$bin" control-plane token --data "$cp/data" --name proxy-fra1-01 2>"$cp/token.hint")
plane_key=$(grep -o 'SHA256:[^ ]*' "$cp/token.hint")
echo "token for proxy-fra1-01; the plane's signing key: $plane_key"
cv_b join --url https://10.0.3.17:8443 --token "$token" --name proxy-fra1-01 --proxy --ca "$cp/ca.crt" \
  --plane-key "$plane_key"
printf 'another host asking for the name proxy-fra1-01 with a fresh token: '
in_ns "$bin" --data-dir "$data/intruder" join --url https://10.0.3.17:8443 --ca "$cp/ca.crt" \
  --token "$(in_ns "$bin" control-plane token --data "$cp/data" 2>/dev/null)" --name proxy-fra1-01 2>&1 |
  tail -1 || true
# Its document goes to the control plane, not to its socket.
cp "$doc_b" "$cp/docs/proxy-fra1-01.json"

banner "converge validate $doc"
cv validate "$doc"

banner "converge diff $doc   (dry run against the sandbox's real state)"
set +e; cv diff "$doc"; code=$?; set -e
echo "(exit code $code: 2 = changes pending)"

banner "starting the agents and pushing the documents"
# nsenter execs the agent, so $agent is its pid (a shell function would add a subshell).
# A short resync so that status shows the peers' handshakes within seconds (each resync
# reads the WireGuard device in full; the default is 60 s).
node_id=$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["node"]["id"])' "$doc")
nsenter --net="/run/netns/$ns" "$bin" --data-dir "$data" --runtime podman --podman-socket "$data/podman.sock" \
  agent --node-id "$node_id" --resync-secs 5 --metrics-listen 127.0.0.1:9108 2>"$data/agent.log" &
agent=$!
nsenter --net="/run/netns/$ns_b" "$bin" --data-dir "$data_b" \
  agent --proxy --node-id proxy-fra1-01 --resync-secs 5 2>"$data_b/agent.log" &
agent_b=$!
for _ in $(seq 100); do [[ -S $data/converge.sock && -S $data_b/converge.sock ]] && break; sleep 0.1; done
cv push "$doc"
# Until every reconciler with a section is Converged (containers take longest).
for _ in $(seq 300); do
  cv status --output json | python3 -c 'import json, sys
states = [r["state"] for r in json.load(sys.stdin)["reconcilers"]]
sys.exit(0 if all(s in ("Converged", "Unmanaged") for s in states) else 1)' && break
  sleep 0.2
done

banner "converge status"
cv status

banner "the result: containers running in the sandbox"
podman_cli ps --format '{{.Names}}\t{{.Status}}\t{{.Ports}}'

banner "the result: DNS answers served in the sandbox (api.internal is the api container's address)"
for q in "web.internal A" "api.internal A" "www.internal CNAME" "web.internal TXT" "_http._tcp.web.internal SRV" "db.internal AAAA"; do
  read -r name type <<<"$q"
  printf '%-28s %-6s -> %s\n' "$name" "$type" "$(in_ns dig +short +time=1 +tries=1 -p 53 "@$listen" "$name" "$type" | tr '\n' ' ')"
done

banner "containers resolve through the node: the web container's resolv.conf (written by Podman from the document) and a lookup from inside it"
podman_cli exec web cat /etc/resolv.conf
podman_cli exec web busybox nslookup -type=a api | grep -A1 '^Name:' || true

banner "the result: published ports in converge's nftables table (container targets resolved to their addresses)"
in_ns nft list map inet converge dnat4_on

banner "the mesh: worker-fra1-07 pings proxy-fra1-01 through the WireGuard tunnel (IPv4 and IPv6)"
in_ns ping -c 3 -i 0.3 10.210.0.1
in_ns ping -c 3 -i 0.3 fd00:210::1

banner "the mesh: proxy-fra1-01 reaches the web container (10.89.7.10 on converge's network apps) through the tunnel"
# proxy-fra1-01 routes 10.89.7.0/24 to the peer; worker-fra1-07's firewall forwards
# only 10.210.0.1 -> 10.89.7.10:80 into the subnet.
podman_cli network inspect apps --format 'network {{.Name}}: {{range .Subnets}}{{.Subnet}} gateway {{.Gateway}}{{end}}, labels {{.Labels}}'
in_ns_b curl -sS -m 5 -o /dev/null -w 'GET http://10.89.7.10/busybox from proxy-fra1-01: HTTP %{http_code}, %{size_download} bytes\n' http://10.89.7.10/busybox

banner "the proxy: proxy-fra1-01 serves https://api.storefront.test (Caddy, tls internal) and routes it over the mesh to the api container on worker-fra1-07"
ca="$data_b/caddy/data/caddy/pki/authorities/local/root.crt"
for _ in $(seq 100); do
  [[ -f $ca ]] && in_ns_b curl -sf -m 2 --cacert "$ca" --resolve api.storefront.test:443:127.0.0.1 \
    -o /dev/null https://api.storefront.test/busybox && break
  sleep 0.2
done
in_ns_b curl -sS -m 5 --cacert "$ca" --resolve api.storefront.test:443:127.0.0.1 -o /dev/null \
  -w 'GET https://api.storefront.test/busybox on proxy-fra1-01: HTTP %{http_code}, %{size_download} bytes, TLS verified against the proxy'"'"'s CA\n' \
  https://api.storefront.test/busybox
cv_b status | sed -n '/^routes/,/^[a-z]/p' | head -4
echo "proxy-fra1-01 runs two Caddy instances; a route change loads the standby and switches new"
echo "connections to it in one nftables transaction, so the Caddy serving is never reloaded:"
in_ns_b nft list chain inet converge_proxy prerouting | grep ipv4
echo "the whole ruleset flushed on proxy-fra1-01 (as 'systemctl restart nftables' does): converge"
echo "sees it through nftables notifications and puts the redirect back, without reloading Caddy:"
in_ns_b nft flush ruleset
flushed=$(date +%s%N)
for _ in $(seq 2000); do
  in_ns_b nft list chain inet converge_proxy prerouting >/dev/null 2>&1 && break
  sleep 0.005
done
echo "redirect back $((($(date +%s%N) - flushed) / 1000000)) ms after the flush (as seen by polling nft)"
in_ns_b curl -sS -m 5 --cacert "$ca" --resolve api.storefront.test:443:127.0.0.1 -o /dev/null \
  -w 'GET https://api.storefront.test/busybox after the flush: HTTP %{http_code}\n' \
  https://api.storefront.test/busybox

banner "the control plane's view: proxy-fra1-01 accepted its signed document and converged to it (its status as reported)"
for _ in $(seq 150); do
  in_ns "$bin" control-plane nodes --data "$cp/data" -o json | grep -Eq '"convergedGeneration": *1' && break
  sleep 0.2
done
in_ns "$bin" control-plane nodes --data "$cp/data"
cv_b status | grep '^control' || true

banner "the control plane rotates its signing key: proxy-fra1-01 follows the statement signed by the old key"
in_ns "$bin" control-plane rotate-key --data "$cp/data" 2>/dev/null
old_pin=$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["signingKey"])' "$data_b/control.json")
for _ in $(seq 100); do
  [[ $(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["signingKey"])' "$data_b/control.json") != "$old_pin" ]] && break
  sleep 0.1
done
grep -o 'signing key rotated.*' "$data_b/agent.log" | tail -1 | sed 's/\x1b\[[0-9;]*m//g'
echo "the plane also serves the install script and its signed downloads (what 'curl …/setup.sh | bash' verifies):"
in_ns curl -sS --cacert "$cp/ca.crt" https://10.0.3.17:8443/v1/artifacts.txt |
  awk '$1 == "artifact" { printf "artifact %s, %d bytes, sha256 %.16s..., signed by the plane key\n", $2, $3, $4; next } { print }'

banner "a staged rollout: proxy-fra1-01's next generation as the canary wave, gated on it reporting Converged (control-plane rollout)"
mkdir -p "$cp/candidates"
python3 -c 'import json, sys
d = json.load(open(sys.argv[1])); d["generation"] += 1
json.dump(d, open(sys.argv[2], "w"), indent=1)' "$cp/docs/proxy-fra1-01.json" "$cp/candidates/proxy-fra1-01.json"
in_ns "$bin" control-plane rollout "$cp/candidates" --data "$cp/data" --canary 1 --wait 60s --revert
echo "the fleet page (serve --fleet-page; opened with the token in <data>/fleet-page.token), as text:"
in_ns curl -sS --cacert "$cp/ca.crt" "https://10.0.3.17:8443/fleet?token=$(cat "$cp/data/fleet-page.token")" |
  python3 -c 'import html, re, sys
t = re.sub(r"<(style|title)>.*?</\1>", "", sys.stdin.read(), flags=re.S)
t = re.sub(r"<(tr|p|h1|h2|pre)(?=[ >])", lambda m: "\n<" + m.group(1), t)
for line in html.unescape(re.sub(r"<[^>]+>", " ", t)).splitlines():
    if line.strip(): print("  " + " ".join(line.split()))'

banner "the metadata API: project storefront, read with its bearer token (on 127.0.0.1:8500 and the network's gateway)"
in_ns curl -sS -m 5 -H 'Converge-Metadata: true' -H "Authorization: Bearer $md_token" \
  'http://127.0.0.1:8500/v1/metadata/?prefix=db/'; echo
echo "from inside the web container, by name (its resolver is the node's dnsmasq on the gateway of its network):"
podman_cli exec web wget -q -O- --header 'Converge-Metadata: true' --header "Authorization: Bearer $md_token" \
  http://metadata.internal:8500/v1/metadata/features; echo
printf 'without the token: HTTP %s\n' "$(in_ns curl -s -o /dev/null -w '%{http_code}' -H 'Converge-Metadata: true' http://127.0.0.1:8500/v1/metadata/db/host)"

banner "what Prometheus scrapes from worker-fra1-07 (--metrics-listen 127.0.0.1:9108)"
in_ns curl -sS -m 5 http://127.0.0.1:9108/metrics |
  grep -E '^converge_(accepted_generation|converged_generation|objects_owned|pass_duration_seconds_count)' | head -14

banner "converge status on worker-fra1-07: its public key and the peer's last handshake"
# Peer statistics in status are as of the last resync (5 s here).
for _ in $(seq 75); do
  cv status | grep -q "peer proxy-fra1-01.*last handshake" &&
    cv_b status | grep -q "peer worker-fra1-07.*last handshake" && break
  sleep 0.2
done
cv status
echo
echo "(proxy-fra1-01:)"
cv_b status | sed -n '/^wireguard/,$p'

banner "private local state: the store, its WAL, the keys and the socket are root's only (umask 077, socket checked with SO_PEERCRED)"
(cd "$data" && stat -c '%a %U %n' . state.db state.db-wal redaction.key converge.sock)
printf 'converge status as user nobody: '
setpriv --reuid=65534 --regid=65534 --clear-groups -- "$bin" --data-dir "$data" status 2>&1 | tail -1 || true

banner "one change: web.internal moves to 10.89.7.11 (generation 43)"
changed=$(mktemp /tmp/converge-worker-XXXXXX.json)
python3 - "$changed" "$doc" <<'PY'
import json, sys
d = json.load(open(sys.argv[2]))
d["generation"] += 1
for r in d["dns"]["records"]:
    if r["name"] == "web.internal" and r["type"] == "A":
        r["values"] = ["10.89.7.11"]
json.dump(d, open(sys.argv[1], "w"), indent=2)
PY
set +e; cv diff "$changed" --reconciler dns; code=$?; set -e
echo "(exit code $code)"
cv push "$changed"
sleep 0.5
printf 'web.internal A -> %s\n' "$(in_ns dig +short +time=1 +tries=1 "@$listen" web.internal A)"
cv status
echo
echo "converge events: what changed, why and when (the newest five):"
cv events | tail -5
rm -f "$changed"

banner "backups: schedule fixtures (cron * * * * *) archives fixtures/ into the sandbox's borg repository at the next minute"
for _ in $(seq 90); do
  cv status | grep -q "schedule fixtures: last run done" && break
  sleep 1
done
cv status | sed -n '/^backups/,/^[a-z]/p' | sed '$d'
BORG_UNKNOWN_UNENCRYPTED_REPO_ACCESS_IS_OK=yes BORG_BASE_DIR="$data/borg-cli" \
  borg list "$data/borg-repo" 2>/dev/null || true

banner "backups: a repository path that holds other files is never initialised over (a failed object, not a pending add)"
not_repo="$data/not-a-repo.json"
python3 - "$doc" "$not_repo" <<'PY'
import json, os, sys
d = json.load(open(sys.argv[1]))
d["backups"]["repositories"][0]["url"] = os.path.abspath("fixtures")
json.dump(d, open(sys.argv[2], "w"))
PY
set +e; cv diff "$not_repo" --reconciler backups; set -e
banner "done"
