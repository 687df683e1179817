#!/usr/bin/env bash
# Installs converge on this node and, given a token, enrolls it and starts it: packages for
# the node's mode, the verified binary, the configuration, the systemd unit. From a control
# plane (nothing else needs to be reachable):
#   curl -fsSL https://PLANE/setup.sh | sudo bash -s -- --url https://PLANE --token T [--proxy]
# or from a clone: install/setup.sh [--binary PATH --sha256 HEX] [--url URL --token T] ...
# Every stage is numbered; a second run changes nothing and says so.
#
# Options (each also from the environment, e.g. CONVERGE_TOKEN):
#   --url URL           control plane: downloads (binary, units, Caddy) and enrollment  CONVERGE_URL
#   --token T           one-time registration token: enroll (`converge join`)           CONVERGE_TOKEN
#   --name N            node name to enroll as (default: the host name)                 CONVERGE_NAME
#   --plane-key SHA256:…  the plane's signing-key fingerprint: downloads and enrollment
#                       are refused under any other key                                 CONVERGE_PLANE_KEY
#   --ca FILE           PEM to trust for the plane's HTTPS (private CA)                  CONVERGE_CA
#   --insecure-http     allow an http:// plane (then only the fingerprint protects)     CONVERGE_INSECURE_HTTP=1
#   --proxy             a proxy node (TLS + public routes; installs Caddy)              CONVERGE_PROXY=1
#   --runtime R         podman (default) or docker                                       CONVERGE_RUNTIME
#   --binary PATH       install this binary (from a clone; default: the plane's, else build)
#   --sha256 HEX        refuse the binary unless it has this SHA-256
#   --data-dir DIR      agent state (default /var/lib/converge)                          CONVERGE_DATA_DIR
#   --timeout SECS      how long to wait for a healthy agent (default 600)
set -euo pipefail

BIN=/usr/local/bin/converge
CONF_DIR=/etc/converge
CONF=$CONF_DIR/converge.toml
UNIT_DIR=/etc/systemd/system
STAGES=9
repo=""
if [[ -n ${BASH_SOURCE[0]:-} && -f ${BASH_SOURCE[0]} ]]; then
  candidate=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
  [[ -f $candidate/systemd/converge.service ]] && repo=$candidate
fi

stage_no=0 stage_name="starting" stage_started=$SECONDS stage_times=""
stage() {
  ((stage_no)) && stage_times+=" $stage_no:$((SECONDS - stage_started))s"
  stage_no=$((stage_no + 1)) stage_name=$1 stage_started=$SECONDS
  printf '[%d/%d] %s\n' "$stage_no" "$STAGES" "$1" >&2
}
say() { printf '      %s\n' "$*" >&2; }
die() {
  printf 'setup.sh: FAILED at [%d/%d] %s: %s\n' "$stage_no" "$STAGES" "$stage_name" "$*" >&2
  printf 'setup.sh: fix the cause, then retry (safe to repeat): %s\n' "$(retry_command)" >&2
  exit 1
}
# The command that ran this, to retry (the token shown as <TOKEN>: it is a secret).
args=("$@")
retry_command() {
  local a shown=() hide=0
  for a in "${args[@]}"; do
    if ((hide)); then shown+=("<TOKEN>"); hide=0; else shown+=("$(printf '%q' "$a")"); fi
    [[ $a == --token ]] && hide=1
  done
  if [[ -n $repo ]]; then
    printf '%s %s' "$repo/install/setup.sh" "${shown[*]}"
  else
    printf 'curl -fsSL %s/setup.sh | sudo bash -s -- %s' "${url:-https://PLANE}" "${shown[*]}"
  fi
}
on_error() { die "command failed (exit $1): $2"; }
trap 'on_error $? "$BASH_COMMAND"' ERR
usage() { sed -n 's/^# \{0,1\}//; 2,22p' "${BASH_SOURCE[0]:-/dev/null}" >&2; exit 2; }

url=${CONVERGE_URL:-} token=${CONVERGE_TOKEN:-} name=${CONVERGE_NAME:-}
plane_key=${CONVERGE_PLANE_KEY:-} ca=${CONVERGE_CA:-}
insecure_http=${CONVERGE_INSECURE_HTTP:-0} proxy=${CONVERGE_PROXY:-0}
runtime=${CONVERGE_RUNTIME:-podman} data_dir=${CONVERGE_DATA_DIR:-/var/lib/converge}
binary="" sha256="" timeout=600
case ${proxy,,} in 1 | yes | true | on) proxy=1 ;; *) proxy=0 ;; esac
case ${insecure_http,,} in 1 | yes | true | on) insecure_http=1 ;; *) insecure_http=0 ;; esac
while (($#)); do
  case $1 in
    --url) url=${2:?--url needs a URL}; shift ;;
    --token) token=${2:?--token needs a token}; shift ;;
    --name) name=${2:?--name needs a name}; shift ;;
    --plane-key) plane_key=${2:?--plane-key needs SHA256:…}; shift ;;
    --ca) ca=${2:?--ca needs a PEM file}; shift ;;
    --insecure-http) insecure_http=1 ;;
    --proxy) proxy=1 ;;
    --runtime) runtime=${2:?--runtime needs podman or docker}; shift ;;
    --binary) binary=${2:?--binary needs a path}; shift ;;
    --sha256) sha256=${2:?--sha256 needs a hex digest}; shift ;;
    --data-dir) data_dir=${2:?--data-dir needs a directory}; shift ;;
    --timeout) timeout=${2:?--timeout needs seconds}; shift ;;
    -h | --help) usage ;;
    *) printf 'setup.sh: unknown argument: %s\n' "$1" >&2; usage ;;
  esac
  shift
done
url=${url%/}
work=$(mktemp -d /tmp/converge-setup.XXXXXX)
trap 'rm -rf "$work"' EXIT

# GET from the plane: TLS verified against the system roots and --ca.
fetch() {
  local args=(-fsS --retry 3 --connect-timeout 10 -o "$2")
  [[ -n $ca ]] && args+=(--cacert "$ca")
  curl "${args[@]}" "$url$1" || die "cannot download $url$1"
}

# --- 1. the host ----------------------------------------------------------------------
stage "checking this host"
[[ $(id -u) -eq 0 ]] || die "must run as root"
[[ $data_dir == /* ]] || die "--data-dir must be an absolute path"
[[ $runtime == podman || $runtime == docker ]] || die "--runtime must be podman or docker, not $runtime"
if [[ -n $url ]]; then
  case $url in
    https://*) ;;
    http://*) ((insecure_http)) || die "$url is plain HTTP: the binary and the plane's key would be unauthenticated (use https://, or --insecure-http with --plane-key)" ;;
    *) die "--url must be an https:// URL, not $url" ;;
  esac
fi
[[ -z $token || -n $url ]] || die "--token needs --url (the control plane to enroll with)"
# shellcheck source=/dev/null
. /etc/os-release 2>/dev/null || true
[[ ${ID:-} == debian && ${VERSION_ID:-} == 12 ]] || say "warning: tested on Debian 12; this is ${PRETTY_NAME:-unknown}"
arch=$(uname -m)
systemd=0
[[ -d /run/systemd/system ]] && systemd=1
say "$(uname -n): ${PRETTY_NAME:-linux} $arch, $( ((proxy)) && echo proxy || echo worker) node, runtime $runtime, systemd $( ((systemd)) && echo yes || echo no)"

# --- 2. packages ----------------------------------------------------------------------
stage "installing packages"
packages=(iproute2 nftables dnsmasq-base wireguard-tools borgbackup ca-certificates curl openssl)
if [[ $runtime == podman ]]; then packages+=(podman); else packages+=(docker.io); fi
# Userspace WireGuard only where the kernel has no module.
if ! ip link add dev cvg-wgprobe type wireguard 2>/dev/null; then
  packages+=(wireguard-go)
else
  ip link del dev cvg-wgprobe
fi
# Caddy for proxies comes from the plane; from a clone, from PyPI (install/caddy.sh).
((proxy)) && [[ -z $url ]] && packages+=(python3 python3-venv)
missing=()
for pkg in "${packages[@]}"; do
  status=$(dpkg-query -W -f='${db:Status-Abbrev}' "$pkg" 2>/dev/null || true)
  [[ $status == ii* ]] || missing+=("$pkg")
done
if ((${#missing[@]})); then
  say "installing: ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -q >&2 || die "apt-get update failed"
  apt-get install -y -q --no-install-recommends "${missing[@]}" >&2 || die "apt-get install ${missing[*]} failed"
else
  say "unchanged: ${packages[*]} present"
fi

# --- 3. the binary --------------------------------------------------------------------
stage "fetching converge"
# Verifies "$1" (a downloaded file) against the index line of artifact "$2".
plane_pem=$work/plane.pem
verify_artifact() {
  local file=$1 art=$2 line sum sig
  line=$(grep "^artifact $art " "$work/index") || die "the plane has no artifact $art"
  read -r _ _ _ sum sig <<<"$line"
  [[ $(sha256sum "$file" | cut -d' ' -f1) == "$sum" ]] || die "$art: SHA-256 mismatch (expected $sum)"
  printf 'converge/artifact/v1\n%s\n%s' "$art" "$sum" >"$work/msg"
  base64 -d <<<"$sig" >"$work/sig" 2>/dev/null || die "$art: malformed signature"
  openssl pkeyutl -verify -pubin -inkey "$plane_pem" -rawin -in "$work/msg" -sigfile "$work/sig" >/dev/null 2>&1 ||
    die "$art: bad signature (not signed by the plane's key)"
}
if [[ -n $url ]]; then
  fetch /v1/artifacts.txt "$work/index"
  key_b64=$(awk '$1 == "signing-key" { print $2 }' "$work/index")
  [[ -n $key_b64 ]] || die "no signing key in $url/v1/artifacts.txt"
  fingerprint="SHA256:$(base64 -d <<<"$key_b64" | openssl dgst -sha256 -binary | base64 | tr -d '=')"
  if [[ -n $plane_key ]]; then
    [[ $fingerprint == "$plane_key" ]] || die "the plane's key is $fingerprint, not the pinned $plane_key"
  elif [[ $url == http://* ]]; then
    say "warning: trusting the plane key $fingerprint from plain HTTP (pin it with --plane-key)"
  fi
  # The raw Ed25519 key as a PEM public key (the fixed SubjectPublicKeyInfo prefix).
  { printf -- '-----BEGIN PUBLIC KEY-----\n'
    { printf '302a300506032b6570032100' | xxd -r -p; base64 -d <<<"$key_b64"; } | base64
    printf -- '-----END PUBLIC KEY-----\n'; } >"$plane_pem"
  agent=$(awk '$1 == "agent" { print $2 }' "$work/index")
  [[ $agent == *-"$arch" ]] || die "the plane serves $agent, this host is $arch"
  if [[ -z $binary ]]; then
    fetch "/v1/artifacts/$agent" "$work/converge"
    verify_artifact "$work/converge" "$agent"
    binary=$work/converge
    say "$agent: SHA-256 and signature verified (plane key $fingerprint)"
  fi
fi
if [[ -z $binary ]]; then
  [[ -n $repo ]] || die "no --url, no --binary, and not run from a clone to build one"
  # shellcheck source=/dev/null
  [[ -f $HOME/.cargo/env ]] && . "$HOME/.cargo/env"
  command -v cargo >/dev/null 2>&1 || die "no --binary given and cargo not found to build one"
  say "building converge (release) in $repo"
  (cd "$repo" && cargo build --release --locked --bin converge >&2)
  binary=${CARGO_TARGET_DIR:-$repo/target}/release/converge
fi
[[ -f $binary ]] || die "binary not found: $binary"
if [[ -n $sha256 ]]; then
  actual=$(sha256sum "$binary" | cut -d' ' -f1)
  [[ $actual == "${sha256,,}" ]] || die "checksum mismatch for $binary: expected $sha256, got $actual"
fi

# --- 4. install it --------------------------------------------------------------------
stage "installing the binary"
# Copied next to the destination first so the final mv is an atomic rename.
tmp=$(mktemp "$(dirname "$BIN")/.converge.new.XXXXXX")
cp "$binary" "$tmp"
chmod 0755 "$tmp"
"$tmp" --version >/dev/null 2>&1 || { rm -f "$tmp"; die "the new binary does not run ($binary --version)"; }
binary_changed=0
if cmp -s "$tmp" "$BIN"; then
  rm -f "$tmp"
  say "unchanged: $BIN is $("$BIN" --version)"
else
  mv -f "$tmp" "$BIN"
  binary_changed=1
  say "installed $BIN: $("$BIN" --version)"
fi

# --- 5. Caddy (proxies) ---------------------------------------------------------------
stage "Caddy"
if ((!proxy)); then
  say "not needed on a worker"
else
  if [[ -n $url ]]; then
    caddy=$(awk -v a="$arch" '$1 == "artifact" && $2 ~ "^caddy-.*-" a "$" { print $2 }' "$work/index" | sort -V | tail -1)
    [[ -n $caddy ]] || die "the plane serves no caddy-<version>-$arch (control-plane serve --artifacts DIR)"
    want=$(grep "^artifact $caddy " "$work/index" | cut -d' ' -f4)
    if [[ -x /opt/converge/caddy/bin/caddy && $(sha256sum /opt/converge/caddy/bin/caddy | cut -d' ' -f1) == "$want" ]]; then
      say "unchanged: $caddy"
    else
      fetch "/v1/artifacts/$caddy" "$work/caddy"
      verify_artifact "$work/caddy" "$caddy"
      install -d -m 0755 /opt/converge/caddy/bin
      install -m 0755 "$work/caddy" /opt/converge/caddy/bin/.caddy.new
      mv -f /opt/converge/caddy/bin/.caddy.new /opt/converge/caddy/bin/caddy
      say "installed $caddy (SHA-256 and signature verified)"
    fi
    ln -sf /opt/converge/caddy/bin/caddy /usr/local/bin/caddy
  else
    "$repo/install/caddy.sh"
    say "$(caddy version | cut -d' ' -f1) from PyPI"
  fi
  # The unprivileged user the agent runs its Caddy pair as (--caddy-user).
  if ! id -u converge-caddy >/dev/null 2>&1; then
    useradd --system --user-group --no-create-home --home-dir /nonexistent \
      --shell /usr/sbin/nologin converge-caddy
    say "created system user converge-caddy"
  fi
fi

# --- 6. configuration -----------------------------------------------------------------
stage "writing the configuration"
# 0711: daemons running as other users may traverse to their own files, not list state.
install -d -m 0711 "$data_dir"
chmod 0711 "$data_dir"
install -d -m 0750 "$CONF_DIR"
{
  echo "# converge agent configuration: one key per \`converge agent\` flag (see converge-agent(1))."
  echo "# Written by setup.sh; CONVERGE_* variables and the command line override it."
  echo "data-dir = \"$data_dir\""
  echo "runtime = \"$runtime\""
  echo "proxy = $( ((proxy)) && echo true || echo false)"
} >"$work/converge.toml"
config_changed=0
if [[ -f $CONF ]] && cmp -s "$work/converge.toml" "$CONF"; then
  say "unchanged: $CONF"
else
  [[ -f $CONF ]] && cp -p "$CONF" "$CONF.prev"
  install -m 0640 "$work/converge.toml" "$CONF"
  config_changed=1
  say "wrote $CONF"
fi

# --- 7. enrollment --------------------------------------------------------------------
stage "enrolling"
if [[ -f $data_dir/control.json ]]; then
  say "unchanged: already enrolled ($data_dir/control.json; \`converge join --force\` to re-enroll)"
elif [[ -n $token ]]; then
  join=("$BIN" --data-dir "$data_dir" join --url "$url" --token "$token")
  [[ -n $name ]] && join+=(--name "$name")
  [[ -n $plane_key ]] && join+=(--plane-key "$plane_key")
  [[ -n $ca ]] && join+=(--ca "$ca")
  ((insecure_http)) && join+=(--insecure-http)
  ((proxy)) && join+=(--proxy)
  "${join[@]}" >&2 || die "converge join failed (a token is good once: ask the plane for a new one if it was spent)"
  config_changed=1
else
  say "no --token: not enrolled (the agent converges documents pushed locally)"
fi

# --- 8. the service -------------------------------------------------------------------
stage "starting the service"
if ((proxy)); then
  unit=converge-proxy.service other=converge.service
else
  unit=converge.service other=converge-proxy.service
fi
if [[ -n $repo ]]; then
  cp "$repo/systemd/$unit" "$work/$unit"
else
  fetch "/units/$unit" "$work/$unit"
fi
sed -i "s|--data-dir /var/lib/converge|--data-dir $data_dir|" "$work/$unit"
unit_changed=0
if ((systemd)); then
  if cmp -s "$work/$unit" "$UNIT_DIR/$unit"; then
    say "unchanged: $UNIT_DIR/$unit"
  else
    install -m 0644 "$work/$unit" "$UNIT_DIR/$unit"
    unit_changed=1
    say "installed $UNIT_DIR/$unit"
  fi
  systemctl daemon-reload
  if systemctl is-enabled --quiet "$other" 2>/dev/null; then
    say "switching from $other to $unit"
    systemctl disable --now "$other"
  fi
  systemctl enable --quiet "$unit"
  # Type=notify: start and restart return once the agent is ready (every first pass).
  # A restart is graceful: what the agent converged stays in place.
  if ! systemctl is-active --quiet "$unit"; then
    systemctl start "$unit" || die "$unit did not start: $(systemctl status --no-pager -n 5 "$unit" 2>&1 | tail -5)"
    say "$unit started"
  elif ((binary_changed || unit_changed || config_changed)); then
    systemctl restart "$unit" || die "$unit did not restart: $(systemctl status --no-pager -n 5 "$unit" 2>&1 | tail -5)"
    say "$unit restarted (new binary, unit or configuration)"
  else
    say "unchanged: $unit running"
  fi
else
  say "systemd is not running here: start the agent by hand: $BIN agent"
fi

# --- 9. health ------------------------------------------------------------------------
stage "checking health"
if ((systemd)); then
  # Healthy: the agent answers and every reconciler finished its first pass.
  deadline=$((SECONDS + timeout))
  until out=$("$BIN" --data-dir "$data_dir" status 2>&1) && [[ $out == *", ready"* ]]; do
    ((SECONDS < deadline)) || die "not healthy after ${timeout} s: $out"
    sleep 1
  done
  say "healthy: $(head -1 <<<"$out")"
  degraded=$(grep -i 'degraded' <<<"$out" || true)
  [[ -z $degraded ]] || say "warning: $degraded"
else
  say "skipped (no systemd)"
fi
stage_times+=" $stage_no:$((SECONDS - stage_started))s"
printf 'setup.sh: done in %d s; stage times:%s\n' "$SECONDS" "$stage_times" >&2
