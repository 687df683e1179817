# shellcheck shell=bash
# A benchmark node, sourced by benches/idle_agent.sh, benches/scale_node.sh and
# benches/headline.sh: its own network namespace with a per-run Podman service (its own
# storage, the busybox image imported: no registry here), the document generator
# (benches/lib/node_doc.py), the agent started the way the benches start it, the
# "every reconciler Converged" test, and a cleanup that removes everything the node
# started (the agent, the Podman service and its containers, and the daemons that outlive
# the agent by design: dnsmasq, wireguard-go, the Caddy pair).
# The caller calls node_binary (BIN: the converge binary, built unless SKIP_BUILD, in
# PROFILE, default release, below CARGO_TARGET_DIR) and node_init first; names carry
# the caller's pid ($$) so that concurrent runs on one machine never collide.

NODE_LIB=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
NS="" WG="" NET="" DIR="" DATA="" PODMAN="" AGENT="" BIN=""

node_binary() {
    local target=${CARGO_TARGET_DIR:-target} profile=${PROFILE:-release} flag=()
    if [ -z "${SKIP_BUILD:-}" ]; then
        [ "$profile" = debug ] || flag=(--release)
        cargo build "${flag[@]}" --quiet --bin converge
    fi
    BIN="$target/$profile/converge"
}

# node_init TAG: the namespace cvg-TAG-PID, the WireGuard interface wgTAGPID (at most 15
# characters: keep TAG short), the containers' network apps-TAG-PID (Podman's CNI keeps
# its address reservations per network name, machine-wide: a name shared with another
# run would hand out the same addresses twice) and a fresh directory /tmp/cvg-TAG-XXXXXX.
node_init() {
    NS="cvg-$1-$$"
    WG="wg$1$$"
    NET="apps-$1-$$"
    DIR=$(mktemp -d "/tmp/cvg-$1-XXXXXX")
    # Caddy runs as converge-caddy and must reach its directory below the data dir.
    chmod 755 "$DIR"
    DATA="$DIR/data"
    ip netns add "$NS"
    in_ns ip link set lo up
}

in_ns() { nsenter --net="/run/netns/$NS" "$@"; }

podman_cli() {
    in_ns podman --root "$DIR/podman/root" --runroot "$DIR/podman/run" --tmpdir "$DIR/podman/tmp" \
        --network-config-dir "$DIR/podman/networks" "$@"
}

# node_podman: the busybox image (with /www/index.html for httpd) and the Podman service
# on $DIR/podman.sock, in the namespace.
node_podman() {
    mkdir -p "$DIR/podman/tmp" "$DIR/podman/networks" "$DIR/rootfs/bin" "$DIR/rootfs/www"
    cp /bin/busybox "$DIR/rootfs/bin/"
    for c in sh ls cat sleep httpd nc wget echo true; do ln -sf busybox "$DIR/rootfs/bin/$c"; done
    echo ok >"$DIR/rootfs/www/index.html"
    tar -C "$DIR/rootfs" -c . | podman_cli import - localhost/busybox:test >/dev/null 2>&1
    # nsenter execs podman: $! is the service itself.
    nsenter --net="/run/netns/$NS" podman --root "$DIR/podman/root" --runroot "$DIR/podman/run" \
        --tmpdir "$DIR/podman/tmp" --network-config-dir "$DIR/podman/networks" \
        system service --time=0 "unix://$DIR/podman.sock" 2>"$DIR/podman.log" &
    PODMAN=$!
    for _ in $(seq 100); do [ -S "$DIR/podman.sock" ] && break; sleep 0.1; done
}

# node_document ARGS...: the document on stdout (see node_doc.py --help).
node_document() { python3 "$NODE_LIB/node_doc.py" --wg "$WG" --network "$NET" "$@"; }

# node_agent [AGENT-ARGS...]: starts `converge agent --proxy` in the namespace (its log in
# $DIR/agent.log) and waits until its socket answers. ENV may hold `env VAR=...` words.
# shellcheck disable=SC2120 # the arguments are optional
node_agent() {
    # shellcheck disable=SC2086
    nsenter --net="/run/netns/$NS" ${ENV:-} "$BIN" --data-dir "$DATA" --runtime podman \
        --podman-socket "$DIR/podman.sock" --secrets-dir "$DIR/secrets" agent --proxy --node-id bench-node \
        "$@" 2>>"$DIR/agent.log" &
    AGENT=$!
    for _ in $(seq 100); do
        [ -S "$DATA/converge.sock" ] && "$BIN" --data-dir "$DATA" status >/dev/null 2>&1 && break
        sleep 0.1
    done
}

node_agent_stop() {
    [ -n "$AGENT" ] || return 0
    kill "$AGENT" 2>/dev/null
    wait "$AGENT" 2>/dev/null || true
    AGENT=""
    rm -f "$DATA/converge.sock"
}

# node_converged [GEN]: every reconciler Converged at generation GEN (default 1), or
# Unmanaged (no section).
# shellcheck disable=SC2120 # the generation is optional
node_converged() {
    "$BIN" --data-dir "$DATA" status --output json 2>/dev/null | python3 -c '
import json, sys
gen = int(sys.argv[1])
s = json.load(sys.stdin)
r = s.get("reconcilers", [])
sys.exit(0 if r and all(x["state"] in ("Converged", "Unmanaged") and x.get("observedGeneration") == gen for x in r) else 1)' "${1:-1}"
}

ticks() { awk '{print $14 + $15}' "/proc/$1/stat" 2>/dev/null || echo 0; }
rss_kb() { awk '/VmRSS/ {print $2}' "/proc/$1/status" 2>/dev/null || echo 0; }

# The daemons the node runs (not the agent): pid list by what they are.
node_daemons() {
    echo "podman-service $PODMAN"
    for p in $(pgrep -f "wireguard-go $WG"); do echo "wireguard-go $p"; done
    for p in $(pgrep -f "dnsmasq.*$DIR"); do echo "dnsmasq $p"; done
    for p in $(pgrep -f "caddy.*$DIR"); do echo "caddy $p"; done
    for p in $(pgrep -f "conmon.*$DIR"); do echo "conmon $p"; done
}

# node_cleanup: everything node_init and what followed started; safe to call twice.
node_cleanup() {
    [ -n "$DIR" ] || return 0
    set +e
    [ -n "$AGENT" ] && kill "$AGENT" 2>/dev/null && wait "$AGENT" 2>/dev/null
    AGENT=""
    podman_cli rm -af -t 0 >/dev/null 2>&1
    [ -n "$PODMAN" ] && kill "$PODMAN" 2>/dev/null && wait "$PODMAN" 2>/dev/null
    PODMAN=""
    # dnsmasq, wireguard-go and the Caddy pair outlive the agent by design: found by
    # their command lines naming this run's directory or interface.
    for p in $(pgrep -f "$DIR|wireguard-go $WG"); do kill "$p" 2>/dev/null; done
    sleep 0.5
    ip netns del "$NS" 2>/dev/null
    # The network's CNI address reservations (the name is this run's own).
    [ -z "$NET" ] || rm -rf "/var/lib/cni/networks/$NET"
    # Podman leaves overlay and shm mounts below its root.
    grep -o " ${DIR}[^ ]*" /proc/mounts | sort -r | while read -r m; do umount -l "$m" 2>/dev/null; done
    rm -rf "$DIR"
    DIR="" NET=""
    set -e
}

# node_wait GEN START TIMEOUT: polls the status every 0.2 s until every reconciler is
# Converged (or Unmanaged) at generation GEN with no object waiting (a reconciler whose
# objects wait on another's facts, say routes on a container's address, reports
# Converged "N objects waiting"); prints "RECONCILER SECONDS" for each, the seconds
# since START (epoch, fractional) from which it stayed so, then "all SECONDS".
# Returns 1 (the status on stderr) after TIMEOUT seconds.
node_wait() {
    python3 - "$BIN" "$DATA" "$1" "$2" "$3" <<'PY'
import json, subprocess, sys, time
bin_, data, gen, start, timeout = sys.argv[1], sys.argv[2], int(sys.argv[3]), float(sys.argv[4]), float(sys.argv[5])
first = {}
while True:
    now = time.time()
    out = subprocess.run([bin_, "--data-dir", data, "status", "--output", "json"],
                         capture_output=True, text=True).stdout
    try:
        rs = json.loads(out).get("reconcilers", [])
    except ValueError:
        rs = []
    ok = lambda r: (r["state"] in ("Converged", "Unmanaged") and r.get("observedGeneration") == gen
                    and not r.get("waiting"))
    for r in rs:
        if ok(r):
            first.setdefault(r["reconciler"], now - start)
        else:
            first.pop(r["reconciler"], None)
    done = [r for r in rs if ok(r)]
    if rs and len(done) == len(rs):
        for r in rs:
            if r["state"] != "Unmanaged":
                print(r["reconciler"], "%.1f" % first[r["reconciler"]])
        print("all", "%.1f" % (now - start))
        sys.exit(0)
    if now - start > timeout:
        print(json.dumps(rs, indent=1)[:4000], file=sys.stderr)
        sys.exit(1)
    time.sleep(0.2)
PY
}
