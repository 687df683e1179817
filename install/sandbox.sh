#!/usr/bin/env bash
# Quick start: the main job end to end on a local sandbox node.
# Installs what it needs (Debian 12, root), builds converge, starts a sandbox node (its
# own network namespace and data dir), shows `converge diff` of fixtures/worker.json,
# has the agent converge it, shows status and the DNS answers it serves, then changes
# one record and shows the diff of only that change. Cleans up at the end unless
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
cleanup() {
  [[ -n $agent ]] && kill "$agent" 2>/dev/null && wait "$agent" 2>/dev/null
  if [[ ${KEEP:-0} == 1 ]]; then
    echo "KEEP=1: dnsmasq left serving in netns $ns; data and agent log in $data"
    return
  fi
  [[ -f $data/dns/dnsmasq.pid ]] && kill "$(cat "$data/dns/dnsmasq.pid")" 2>/dev/null
  ip netns del "$ns" 2>/dev/null
  rm -rf "$data"
  true
}
trap cleanup EXIT

banner "starting sandbox node: network namespace $ns, data dir $data"
[[ -f $data/dns/dnsmasq.pid ]] && kill "$(cat "$data/dns/dnsmasq.pid")" 2>/dev/null || true
ip netns del "$ns" 2>/dev/null || true
rm -rf "$data"
ip netns add "$ns"
in_ns() { nsenter --net="/run/netns/$ns" "$@"; }
in_ns ip link set lo up
# The fixture's DNS listens on the node's mesh address; give the sandbox that address.
listen=$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["dns"]["listen"][0])' fixtures/worker.json)
in_ns ip addr add "$listen/32" dev lo
cv() { in_ns "$bin" --data-dir "$data" "$@"; }

banner "converge validate fixtures/worker.json"
cv validate fixtures/worker.json

banner "converge diff fixtures/worker.json   (dry run against the sandbox's real state)"
set +e; cv diff fixtures/worker.json; code=$?; set -e
echo "(exit code $code: 2 = changes pending)"

banner "starting the agent and pushing the document"
mkdir -p "$data"
# nsenter execs the agent, so $agent is its pid (a shell function would add a subshell).
node_id=$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["node"]["id"])' fixtures/worker.json)
nsenter --net="/run/netns/$ns" "$bin" --data-dir "$data" agent --node-id "$node_id" 2>"$data/agent.log" &
agent=$!
for _ in $(seq 100); do [[ -S $data/converge.sock ]] && break; sleep 0.1; done
cv push fixtures/worker.json
for _ in $(seq 50); do
  cv status --output json | grep -q '"Converged"' && break
  sleep 0.2
done

banner "converge status"
cv status

banner "the result: DNS answers served in the sandbox"
for q in "web.internal A" "www.internal CNAME" "web.internal TXT" "_http._tcp.web.internal SRV" "db.internal AAAA"; do
  read -r name type <<<"$q"
  printf '%-28s %-6s -> %s\n' "$name" "$type" "$(in_ns dig +short +time=1 +tries=1 -p 53 "@$listen" "$name" "$type" | tr '\n' ' ')"
done

banner "one change: web.internal moves to 10.88.0.11 (generation 43)"
changed=$(mktemp /tmp/converge-worker-XXXXXX.json)
python3 - "$changed" <<'PY'
import json, sys
d = json.load(open("fixtures/worker.json"))
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
