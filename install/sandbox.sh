#!/usr/bin/env bash
# Quick start: the main job end to end on a local sandbox node.
# Installs what it needs (Debian 12, root), builds converge, starts a sandbox node (its
# own network namespace, data dir and Podman service), shows `converge diff` of
# fixtures/sandbox.json (fixtures/worker.json with a local busybox image, since there is
# no registry here), has the agent converge it, shows status, the containers and the
# DNS answers it serves, then changes one record and shows the diff of only that change. Cleans up at the end unless
# KEEP=1. Usage: install/sandbox.sh
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

ns=converge-sandbox
data=/var/tmp/converge-sandbox
agent=""
podman_cli() { nsenter --net="/run/netns/$ns" podman --root "$data/podman/root" --runroot "$data/podman/run" --tmpdir "$data/podman/tmp" "$@"; }
# Removes everything a sandbox run (this one or an earlier, interrupted one) left.
teardown() {
  set +e
  [[ -f $data/dns/dnsmasq.pid ]] && kill "$(cat "$data/dns/dnsmasq.pid")" 2>/dev/null
  [[ -e /run/netns/$ns && -d $data/podman ]] && podman_cli rm -af -t 0 >/dev/null 2>&1
  pkill -f "unix://$data/podman.sock" 2>/dev/null
  ip netns del "$ns" 2>/dev/null
  grep -o " $data/[^ ]*" /proc/mounts | sort -r | xargs -r -n1 umount -l 2>/dev/null
  rm -rf "$data"
  set -e
}
cleanup() {
  set +e
  [[ -n $agent ]] && kill "$agent" 2>/dev/null && wait "$agent" 2>/dev/null
  if [[ ${KEEP:-0} == 1 ]]; then
    echo "KEEP=1: the sandbox (netns $ns, containers, dnsmasq) is left running; data in $data"
    return
  fi
  teardown
  true
}
trap cleanup EXIT
doc=fixtures/sandbox.json

banner "starting sandbox node: network namespace $ns, data dir $data"
teardown
ip netns add "$ns"
in_ns() { nsenter --net="/run/netns/$ns" "$@"; }
in_ns ip link set lo up
# The fixture's DNS listens on the node's mesh address; give the sandbox that address.
listen=$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["dns"]["listen"][0])' "$doc")
in_ns ip addr add "$listen/32" dev lo

banner "starting a Podman API service in the sandbox and importing a busybox image"
mkdir -p "$data/podman/tmp" "$data/rootfs/bin"
chmod 755 "$data"
cp /bin/busybox "$data/rootfs/bin/"
for c in sh ls cat sleep httpd nc wget echo true; do ln -sf busybox "$data/rootfs/bin/$c"; done
tar -C "$data/rootfs" -c . | podman_cli import - localhost/busybox:test >/dev/null
nsenter --net="/run/netns/$ns" podman --root "$data/podman/root" --runroot "$data/podman/run" --tmpdir "$data/podman/tmp" \
  system service --time=0 "unix://$data/podman.sock" 2>"$data/podman.log" &
for _ in $(seq 100); do [[ -S $data/podman.sock ]] && break; sleep 0.1; done
cv() { in_ns "$bin" --data-dir "$data" --runtime podman --podman-socket "$data/podman.sock" "$@"; }

banner "converge validate $doc"
cv validate "$doc"

banner "converge diff $doc   (dry run against the sandbox's real state)"
set +e; cv diff "$doc"; code=$?; set -e
echo "(exit code $code: 2 = changes pending)"

banner "starting the agent and pushing the document"
mkdir -p "$data"
# nsenter execs the agent, so $agent is its pid (a shell function would add a subshell).
node_id=$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["node"]["id"])' "$doc")
nsenter --net="/run/netns/$ns" "$bin" --data-dir "$data" --runtime podman --podman-socket "$data/podman.sock" \
  agent --node-id "$node_id" 2>"$data/agent.log" &
agent=$!
for _ in $(seq 100); do [[ -S $data/converge.sock ]] && break; sleep 0.1; done
cv push "$doc"
for _ in $(seq 150); do
  # containers, firewall and dns
  [[ $(cv status --output json | grep -c '"state": "Converged"') -ge 3 ]] && break
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

banner "the result: published ports in converge's nftables table (container targets resolved to their addresses)"
in_ns nft list map inet converge dnat4_on

banner "one change: web.internal moves to 10.88.0.11 (generation 43)"
changed=$(mktemp /tmp/converge-worker-XXXXXX.json)
python3 - "$changed" <<'PY'
import json, sys
d = json.load(open("fixtures/sandbox.json"))
d["generation"] += 1
for r in d["dns"]["records"]:
    if r["name"] == "web.internal" and r["type"] == "A":
        r["values"] = ["10.88.0.11"]
json.dump(d, open(sys.argv[1], "w"), indent=2)
PY
set +e; cv diff "$changed" --reconciler dns; code=$?; set -e
echo "(exit code $code)"
cv push "$changed"
sleep 0.5
printf 'web.internal A -> %s\n' "$(in_ns dig +short +time=1 +tries=1 "@$listen" web.internal A)"
cv status
rm -f "$changed"
banner "done"
