#!/usr/bin/env bash
# ok() and bad() never fail, so `test && ok || bad` is an if-then-else here.
# shellcheck disable=SC2015
# converge under a real systemd 252: boots the cached Debian 12 root (tests/systemd/root.sh)
# with systemd-nspawn on a private network (an overlay keeps the cache clean), installs the
# debug binary and systemd/converge.service, and checks: start returns once READY; the
# status of a stopped agent (exit 3, never "Converged"); dnsmasq in its own scope survives
# `systemctl kill -s KILL` and `systemctl stop` with no left-over-process warning; the
# watchdog restarts a stalled engine (debug fault); install/update.sh to a good build, to
# a broken one (rolled back, converge.prev kept), and with a wrong checksum (refused,
# nothing restarted). Containers are left out (no podman in the root). Needs root.
# Usage: tests/systemd/run.sh [BINARY]   (default: $CARGO_TARGET_DIR/debug/converge)
set -euo pipefail

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
bin=${1:-${CARGO_TARGET_DIR:-$repo/target}/debug/converge}
[[ -x $bin ]] || { echo "systemd test: no binary at $bin (cargo build first)" >&2; exit 1; }
root=$("$repo/tests/systemd/root.sh")
work=$(mktemp -d /var/tmp/converge-sysd-work.XXXXXX)
nspawn_pid="" pid1=""
failures=0

log() { printf 'systemd test: %s\n' "$*" >&2; }
ok() { log "ok: $*"; }
bad() { log "FAIL: $*"; failures=$((failures + 1)); }
now() { date +%s.%N; }
since() { awk -v a="$1" -v b="$(now)" 'BEGIN { printf "%.2f", b - a }'; }
wait_for() { # SECONDS COMMAND...
  local deadline=$((SECONDS + $1))
  shift
  until "$@"; do
    ((SECONDS < deadline)) || return 1
    sleep 0.2
  done
}

# Runs a command inside the booted root.
inside() { nsenter -t "$pid1" -a -- "$@"; }

cleanup() {
  if [[ -n $pid1 ]]; then
    inside systemctl poweroff >/dev/null 2>&1 || true
  fi
  if [[ -n $nspawn_pid ]]; then
    for _ in $(seq 100); do kill -0 "$nspawn_pid" 2>/dev/null || break; sleep 0.1; done
    kill "$nspawn_pid" 2>/dev/null || true
    wait "$nspawn_pid" 2>/dev/null || true
  fi
  if ((failures)); then
    log "console log kept: $work/console.log"
  else
    rm -rf "$work"
  fi
}
trap cleanup EXIT

# What the root sees under /t.
cp "$bin" "$work/converge"
# A different build that runs the same (update target): the same binary plus a byte.
cp "$bin" "$work/converge-new" && printf '\n' >>"$work/converge-new"
cp "$repo/systemd/converge.service" "$repo/install/update.sh" "$work/"
cat >"$work/broken" <<'EOF'
#!/bin/sh
# A broken build: a valid --version and validate, but the agent exits at once.
case " $* " in
  *" --version "*) echo "converge 9.9.9 (broken)" ;;
  *" validate "*) echo "valid" ;;
  *) echo "broken build" >&2; exit 1 ;;
esac
EOF
chmod 0755 "$work/broken"
cat >"$work/dns.json" <<'EOF'
{"apiVersion": "converge/v1", "node": {"id": "converge-sysd", "mode": "worker"},
 "generation": 1, "issuedAt": "2025-01-01T00:00:00Z",
 "dns": {"zone": "internal", "listen": ["127.0.0.1"], "port": 53, "upstreams": ["10.99.0.1"],
         "ttl": 60, "records": [{"name": "web.internal", "type": "A", "values": ["10.89.7.10"]}]}}
EOF

# Boots a fresh copy of the root (an overlay: every boot starts from the cached root).
boot() {
  log "booting $root"
  booted=$(now)
  systemd-nspawn --quiet --register=no --keep-unit --private-network --volatile=overlay \
    --hostname=converge-sysd --bind-ro="$work:/t" -D "$root" --boot \
    </dev/null >>"$work/console.log" 2>&1 &
  nspawn_pid=$!
  pid1=""
  for _ in $(seq 200); do
    pid1=$(pgrep -P "$nspawn_pid" -x systemd || true)
    [[ -n $pid1 ]] && break
    sleep 0.1
  done
  [[ -n $pid1 ]] || { bad "no systemd started"; exit 1; }
  # `--wait` returns at once while the manager does not answer yet: ask until it does.
  booted_up() { [[ $(inside systemctl is-system-running 2>/dev/null) =~ ^(running|degraded)$ ]]; }
  wait_for 60 booted_up || { bad "the root did not finish booting"; exit 1; }
  log "booted in $(since "$booted") s (systemd $(inside systemctl --version | head -1 | cut -d' ' -f2))"
}

poweroff() {
  inside systemctl poweroff >/dev/null 2>&1 || true
  for _ in $(seq 100); do kill -0 "$nspawn_pid" 2>/dev/null || break; sleep 0.1; done
  wait "$nspawn_pid" 2>/dev/null || true
  pid1="" nspawn_pid=""
}

# A control plane inside the root (HTTPS with a private CA, the debug binary as the
# agent artifact, the host's pinned Caddy as caddy-<version>-<arch>) and a token;
# sets plane_key and token.
start_plane() {
  inside mkdir -p /var/lib/cp-docs
  inside systemd-run --quiet --unit=cp /t/converge control-plane serve --dir /var/lib/cp-docs \
    --data /var/lib/cp --listen 127.0.0.1:8443 --tls-cert /t/tls.crt --tls-key /t/tls.key \
    --artifacts /t/artifacts
  plane_up() { inside curl -fsS --cacert /t/ca.crt -o /dev/null https://127.0.0.1:8443/v1/artifacts.txt 2>/dev/null; }
  wait_for 60 plane_up ||
    bad "the plane does not answer"
  token=$(inside /t/converge control-plane token --data /var/lib/cp --name converge-sysd 2>"$work/hint")
  plane_key=$(grep -o 'SHA256:[^ ]*' "$work/hint")
}

# setup.sh as an operator runs it: fetched from the plane, piped to bash.
setup_from_plane() { # OUTPUT-FILE ARGS...
  local out=$1
  shift
  inside bash -c "curl -fsSL --cacert /t/ca.crt https://127.0.0.1:8443/setup.sh | bash -s -- --url https://127.0.0.1:8443 --ca /t/ca.crt $*" >"$out" 2>&1
}

# shellcheck source=/dev/null
. "$repo/benches/test_ca.sh"
make_test_ca "$work"
chmod 0644 "$work/tls.key"
mkdir -p "$work/artifacts"
# Builds the document's `agent` section names: another good build, and a broken one.
arch=$(uname -m)
good2=converge-0.1.0+two-$arch broken2=converge-9.9.9-$arch
cp "$bin" "$work/artifacts/$good2" && printf '\n\n' >>"$work/artifacts/$good2"
cp "$work/broken" "$work/artifacts/$broken2"
if [[ -x /opt/converge/caddy/bin/caddy ]]; then
  caddy_version=$(/opt/converge/caddy/bin/caddy version | cut -d' ' -f1 | tr -d v)
  cp /opt/converge/caddy/bin/caddy "$work/artifacts/caddy-$caddy_version-$(uname -m)"
fi

boot

# 0. A fresh worker: setup.sh served by the plane installs, enrolls, starts, checks health;
# a second run changes nothing; a wrong plane key is refused before anything is installed.
start_plane
set +e
setup_from_plane "$work/setup-bad-key.log" --token "$token" --plane-key SHA256:AAAA
rc=$?
set -e
if [[ $rc != 0 ]] && grep -q 'FAILED at \[3/9\] fetching converge' "$work/setup-bad-key.log" &&
  ! inside test -e /usr/local/bin/converge; then
  ok "setup.sh refused a plane key other than the pinned one, nothing installed"
else
  bad "setup.sh with a wrong plane key: exit $rc: $(cat "$work/setup-bad-key.log")"
fi
t=$(now)
set +e
setup_from_plane "$work/setup.log" --token "$token" --plane-key "$plane_key"
rc=$?
set -e
setup_s=$(since "$t")
if [[ $rc == 0 ]] && grep -q '^\[9/9\] checking health' "$work/setup.log" && grep -q 'healthy' "$work/setup.log" &&
  inside test -f /var/lib/converge/control.json && inside systemctl is-active --quiet converge &&
  [[ $(inside /t/converge control-plane nodes --data /var/lib/cp) == *converge-sysd*"0.1.0 ("* ]]; then
  ok "setup.sh from the plane: installed, enrolled, started, healthy in ${setup_s} s ($(grep -o 'stage times:.*' "$work/setup.log"))"
else
  bad "setup.sh from the plane: exit $rc: $(cat "$work/setup.log")"
fi
main_pid=$(inside systemctl show -p MainPID --value converge)
set +e
setup_from_plane "$work/setup-again.log" --token "$token" --plane-key "$plane_key"
rc=$?
set -e
changed=$(grep -E '^      (installed|wrote|created|switching|converge.service (started|restarted))' "$work/setup-again.log" || true)
if [[ $rc == 0 && -z $changed && $(inside systemctl show -p MainPID --value converge) == "$main_pid" ]]; then
  ok "setup.sh again: nothing changed ($(grep -c 'unchanged' "$work/setup-again.log") stages said unchanged)"
else
  bad "setup.sh again: exit $rc, changed: $changed: $(cat "$work/setup-again.log")"
fi

inside install -m 0755 /t/converge /usr/local/bin/converge
inside install -m 0644 /t/converge.service /etc/systemd/system/converge.service
inside systemctl daemon-reload

agent_json() { inside converge status --output json 2>/dev/null || true; }
ready() { agent_json | grep -q '"ready": true'; }
dnsmasq_pid() { inside pgrep -x dnsmasq | head -1; }

# 1. start returns only once READY (no document: nothing to wait for).
t=$(now)
inside systemctl start converge
start_s=$(since "$t")
if ready; then ok "start returned after READY (${start_s} s, no document)"; else bad "start returned before READY"; fi

# 2. A document with a dns section; dnsmasq runs in its own scope.
inside converge push /t/dns.json >/dev/null
dns_converged() { agent_json | tr -d ' \n' | grep -q '"reconciler":"dns","state":"Converged"'; }
wait_for 30 dns_converged || bad "dns did not converge: $(agent_json)"
dpid=$(dnsmasq_pid)
cgroup=$(inside cat "/proc/$dpid/cgroup")
if [[ $cgroup == *converge-dnsmasq-*.scope* ]]; then ok "dnsmasq $dpid in its own scope (${cgroup##*/})"; else bad "dnsmasq cgroup: $cgroup"; fi

# 3. A restart with a document: start returns once every first pass is done.
t=$(now)
inside systemctl restart converge
restart_s=$(since "$t")
if ready; then ok "restart returned after READY with every first pass done (${restart_s} s)"; else bad "restart returned before READY: $(agent_json)"; fi
status_line=$(inside systemctl show -p StatusText --value converge)
[[ $status_line == "generation 1:"* ]] && ok "STATUS=$status_line" || bad "STATUS=$status_line"
[[ $(dnsmasq_pid) == "$dpid" ]] && ok "dnsmasq kept its pid through the restart" || bad "dnsmasq restarted"

# 4. SIGKILL of the whole unit leaves dnsmasq serving.
inside systemctl kill -s KILL converge
sleep 0.5
if inside kill -0 "$dpid" 2>/dev/null; then ok "systemctl kill -s KILL left dnsmasq $dpid running"; else bad "dnsmasq died with the agent"; fi
wait_for 30 ready || bad "agent not back after kill"

# 5. stop: dnsmasq stays; status says the agent is not running (exit 3), never "Converged".
inside systemctl stop converge
inside kill -0 "$dpid" 2>/dev/null && ok "systemctl stop left dnsmasq running" || bad "dnsmasq stopped with the agent"
set +e
out=$(inside converge status 2>&1)
rc=$?
set -e
if [[ $rc == 3 && $out == *"not running"* && $out != *Converged* ]]; then ok "status of a stopped agent: exit 3, no 'Converged'"; else bad "status of a stopped agent: exit $rc: $out"; fi
leftover=$(inside journalctl -u converge -o cat --no-pager | grep -c "left-over process" || true)
[[ $leftover == 0 ]] && ok "no left-over process warning" || bad "$leftover left-over process warnings"
inside systemctl start converge

# 6. Watchdog: a stalled engine gets the agent restarted.
inside mkdir -p /run/systemd/system/converge.service.d
inside sh -c 'printf "[Service]\nEnvironment=CONVERGE_DEBUG_STALL_ENGINE=1\nWatchdogSec=3s\n" >/run/systemd/system/converge.service.d/stall.conf'
inside systemctl daemon-reload
restarts=$(inside systemctl show -p NRestarts --value converge)
t=$(now)
inside systemctl restart converge
restarted() { (($(inside systemctl show -p NRestarts --value converge) > restarts)); }
if wait_for 30 restarted; then
  ok "watchdog restarted the stalled agent ($(since "$t") s after start; $(inside journalctl -u converge -o cat --no-pager | grep -c 'Watchdog timeout') watchdog timeouts logged)"
else
  bad "the stalled agent was not restarted"
fi
inside rm -rf /run/systemd/system/converge.service.d
inside systemctl daemon-reload
inside systemctl restart converge
inside kill -0 "$dpid" 2>/dev/null || bad "dnsmasq died during the watchdog test"

# 7. update.sh to a good build.
orig=$(inside sha256sum /usr/local/bin/converge | cut -d' ' -f1)
new=$(sha256sum "$work/converge-new" | cut -d' ' -f1)
t=$(now)
set +e
inside /t/update.sh --binary /t/converge-new --sha256 "$new" --timeout 60 2>"$work/update.log"
rc=$?
set -e
update_s=$(since "$t")
if [[ $rc == 0 && $(inside sha256sum /usr/local/bin/converge | cut -d' ' -f1) == "$new" &&
  $(inside sha256sum /usr/local/bin/converge.prev | cut -d' ' -f1) == "$orig" ]] && ready; then
  ok "update to a good build in ${update_s} s (converge.prev = the previous binary)"
else
  bad "update to a good build: exit $rc: $(cat "$work/update.log")"
fi
[[ $(dnsmasq_pid) == "$dpid" ]] || bad "dnsmasq changed during the update"

# 8. update.sh to a broken build: rolled back, converge.prev untouched.
t=$(now)
set +e
inside /t/update.sh --binary /t/broken --local-build --timeout 60 2>"$work/rollback.log"
rc=$?
set -e
rollback_s=$(since "$t")
if [[ $rc == 13 && $(inside sha256sum /usr/local/bin/converge | cut -d' ' -f1) == "$new" &&
  $(inside sha256sum /usr/local/bin/converge.prev | cut -d' ' -f1) == "$orig" ]] && ready; then
  ok "broken build rolled back in ${rollback_s} s: $(grep -o 'FAILED at restart.*' "$work/rollback.log" | cut -c1-100)"
else
  bad "broken build: exit $rc: $(cat "$work/rollback.log")"
fi
[[ $(dnsmasq_pid) == "$dpid" ]] || bad "dnsmasq changed during the rollback"

# 9. Checksum mismatch: refused, nothing changed, nothing restarted.
main_pid=$(inside systemctl show -p MainPID --value converge)
set +e
inside /t/update.sh --binary /t/converge --sha256 "$(printf '0%.0s' {1..64})" 2>"$work/refused.log"
rc=$?
set -e
if [[ $rc == 10 && $(inside sha256sum /usr/local/bin/converge | cut -d' ' -f1) == "$new" &&
  $(inside systemctl show -p MainPID --value converge) == "$main_pid" ]]; then
  ok "checksum mismatch refused (exit 10), binary and agent unchanged"
else
  bad "checksum mismatch: exit $rc: $(cat "$work/refused.log")"
fi

# 10. Self-update through the signed document (the agent is enrolled with the plane in
# the root): a new build installed with verification and a restart; then a broken build,
# rolled back, reported in status and never tried again.
publish() { # GENERATION AGENT-SECTION
  inside sh -c 'cat >/var/lib/cp-docs/.next && mv /var/lib/cp-docs/.next /var/lib/cp-docs/converge-sysd.json' <<EOF
{"apiVersion": "converge/v1", "node": {"id": "converge-sysd", "mode": "worker"},
 "generation": $1, "issuedAt": "2025-01-01T00:00:00Z", "agent": $2,
 "dns": {"zone": "internal", "listen": ["127.0.0.1"], "port": 53, "upstreams": ["10.99.0.1"],
         "ttl": 60, "records": [{"name": "web.internal", "type": "A", "values": ["10.89.7.10"]}]}}
EOF
}
agent_section() { # VERSION ARTIFACT
  printf '{"version": "%s", "url": "https://127.0.0.1:8443/v1/artifacts/%s", "sha256": "%s", "timeoutSecs": 60}' \
    "$1" "$2" "$(sha256sum "$work/artifacts/$2" | cut -d' ' -f1)"
}
running_sha() { inside sha256sum /usr/local/bin/converge | cut -d' ' -f1; }
before=$(running_sha)
want=$(sha256sum "$work/artifacts/$good2" | cut -d' ' -f1)
t=$(now)
publish 2 "$(agent_section 0.1.0 "$good2")"
self_updated() { [[ $(running_sha) == "$want" ]] && ready && agent_json | tr -d ' \n' | grep -q '"reconciler":"agent","state":"Converged"'; }
if wait_for 120 self_updated; then
  selfupdate_s=$(since "$t")
  # update.sh commits (old binary -> converge.prev) after the new agent is READY and
  # converged: the commit may land a moment after what self_updated sees.
  prev_is_before() { [[ $(inside sha256sum /usr/local/bin/converge.prev | cut -d' ' -f1) == "$before" ]]; }
  wait_for 30 prev_is_before || bad "converge.prev is not the build before the self-update"
  ok "self-update to $good2 from the document in ${selfupdate_s} s (download, verify, swap, restart, READY)"
else
  bad "self-update did not happen: $(inside converge status 2>&1 | head -20)"
fi
[[ $(dnsmasq_pid) == "$dpid" ]] || bad "dnsmasq changed during the self-update"
t=$(now)
publish 3 "$(agent_section 9.9.9 "$broken2")"
refused() { [[ $(inside converge status 2>/dev/null) == *'update to 9.9.9 failed (update.sh exit 13'* ]]; }
if wait_for 120 refused && [[ $(running_sha) == "$want" ]] && ready; then
  selfrollback_s=$(since "$t")
  stamp=$(inside stat -c %Y /var/lib/converge/selfupdate/result.json)
  sleep 8
  if [[ $(inside stat -c %Y /var/lib/converge/selfupdate/result.json) == "$stamp" ]] && [[ $(running_sha) == "$want" ]]; then
    ok "broken build from the document rolled back and reported in ${selfrollback_s} s, not tried again"
  else
    bad "the broken build was tried again"
  fi
else
  bad "broken self-update: $(inside converge status 2>&1 | head -20)"
fi
[[ $(dnsmasq_pid) == "$dpid" ]] || bad "dnsmasq changed during the self-update rollback"

# 11. A fresh proxy through setup.sh --proxy: Caddy from the plane, verified; the proxy unit.
poweroff
boot
start_plane
t=$(now)
set +e
setup_from_plane "$work/setup-proxy.log" --proxy --token "$token" --plane-key "$plane_key"
rc=$?
set -e
proxy_s=$(since "$t")
if [[ $rc == 0 ]] && grep -q 'caddy-.*(SHA-256 and signature verified)' "$work/setup-proxy.log" &&
  inside systemctl is-active --quiet converge-proxy && inside id -u converge-caddy >/dev/null &&
  [[ $(inside converge status 2>&1) == *ready* ]]; then
  ok "setup.sh --proxy from the plane in ${proxy_s} s ($(grep -o 'stage times:.*' "$work/setup-proxy.log"))"
else
  bad "setup.sh --proxy: exit $rc: $(cat "$work/setup-proxy.log")"
fi

# 12. The proxy's Caddy pair runs unprivileged in its own scopes: a route keeps being
# served through `systemctl kill -s KILL` and `systemctl stop` of the agent.
inside sh -c 'cat >/var/lib/cp-docs/.next && mv /var/lib/cp-docs/.next /var/lib/cp-docs/converge-sysd.json' <<'EOF'
{"apiVersion": "converge/v1", "node": {"id": "converge-sysd", "mode": "proxy"},
 "generation": 1, "issuedAt": "2025-01-01T00:00:00Z",
 "routes": {"routes": [{"name": "r", "hosts": ["r.test"], "tls": "off",
                        "redirect": {"to": "https://example.org{uri}", "status": 301}}]}}
EOF
served() { [[ $(inside curl -s -m 2 -o /dev/null -w '%{http_code}' -H 'Host: r.test' http://127.0.0.1/x) == 301 ]]; }
caddy_pids() { inside pgrep -x caddy | sort | tr '\n' ' '; }
if wait_for 60 served; then
  pids=$(caddy_pids)
  first=${pids%% *}
  cg=$(inside cat "/proc/$first/cgroup")
  user=$(inside ps -o user= -p "$first")
  [[ $cg == *converge-caddy-*.scope* && $user == converge-caddy ]] &&
    ok "Caddy pair ($pids) in its own scopes (${cg##*/}), as $user" || bad "Caddy: cgroup $cg, user $user"
  inside systemctl kill -s KILL converge-proxy
  sleep 0.5
  served && ok "route served after systemctl kill -s KILL of the agent" || bad "route down after kill"
  inside systemctl stop converge-proxy
  served && [[ $(caddy_pids) == "$pids" ]] && ok "route served by the same Caddy pair after systemctl stop" ||
    bad "route or Caddy changed after stop: $(caddy_pids)"
  inside systemctl start converge-proxy
  served && [[ $(caddy_pids) == "$pids" ]] && ok "the agent started again adopted the running pair" ||
    bad "Caddy changed at the agent's start: $(caddy_pids)"
else
  bad "the route is not served: $(inside converge status 2>&1 | head -30)"
fi

# 13. The Debian package under systemd: installed (not enabled, not started), started by
# the operator, upgraded while running (the agent restarted, dnsmasq untouched), purged
# (the agent stopped; the data directory and dnsmasq left: host state is reset's).
poweroff
for v in 0.1.0 0.1.1; do
  CONVERGE_DEB_COMPRESS=none "$repo/install/deb.sh" --binary "$bin" --version "$v" --out "$work/deb-$v" >/dev/null
done
boot
inside sh -c 'dpkg -i /t/deb-0.1.0/converge_0.1.0_*.deb' >"$work/deb.log" 2>&1 || bad "dpkg -i: $(cat "$work/deb.log")"
[[ $(inside systemctl is-enabled converge 2>/dev/null) != enabled ]] && ! inside systemctl is-active --quiet converge &&
  ok "package installed: unit neither enabled nor started" || bad "the package enabled or started the agent"
inside systemctl start converge
inside converge push /t/dns.json >/dev/null
wait_for 30 dns_converged || bad "dns did not converge from the packaged agent"
dpid=$(dnsmasq_pid)
before_pid=$(inside systemctl show -p MainPID --value converge)
inside sh -c 'dpkg -i /t/deb-0.1.1/converge_0.1.1_*.deb' >>"$work/deb.log" 2>&1 || bad "upgrade: $(cat "$work/deb.log")"
after_pid=$(inside systemctl show -p MainPID --value converge)
if [[ $after_pid != "$before_pid" && $after_pid != 0 ]] && wait_for 30 ready && [[ $(dnsmasq_pid) == "$dpid" ]]; then
  ok "package upgraded while running: agent restarted ($before_pid -> $after_pid) and ready, dnsmasq $dpid untouched"
else
  bad "package upgrade: agent $before_pid -> $after_pid, dnsmasq $(dnsmasq_pid): $(cat "$work/deb.log")"
fi
inside dpkg --purge converge >>"$work/deb.log" 2>&1 || bad "purge: $(cat "$work/deb.log")"
if ! inside systemctl is-active --quiet converge && inside test -f /var/lib/converge/state.db &&
  [[ $(dnsmasq_pid) == "$dpid" ]]; then
  ok "package purged: agent stopped, data directory and dnsmasq left (converge reset removes host state)"
else
  bad "purge: $(cat "$work/deb.log")"
fi

log "timings: setup (worker) ${setup_s} s, setup (proxy) ${proxy_s} s, start ${start_s} s, restart with a document ${restart_s} s, update ${update_s} s, rollback ${rollback_s} s, self-update ${selfupdate_s:-?} s, self-update rollback ${selfrollback_s:-?} s"
if ((failures)); then
  log "$failures check(s) failed"
  exit 1
fi
log "all checks passed"
