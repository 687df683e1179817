#!/usr/bin/env bash
# Runs the whole test suite: installs test dependencies, then every test of the workspace
# (unit, integration and end-to-end tests in network namespaces). Needs root.
# Usage: tests/run.sh [extra cargo test args, e.g. a test name filter]
set -euo pipefail

if [[ $(id -u) -ne 0 ]]; then
  if command -v sudo >/dev/null 2>&1; then
    # Keep the caller's toolchain and target dir visible to root.
    exec sudo --preserve-env=PATH,CARGO_TARGET_DIR,CARGO_HOME,RUSTUP_HOME,RUST_LOG,RUST_BACKTRACE "$0" "$@"
  fi
  echo "tests/run.sh: must run as root (tests create network namespaces) and sudo is missing" >&2
  exit 1
fi

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$repo"

./install/deps.sh
if [[ -f $HOME/.cargo/env ]]; then
  # shellcheck source=/dev/null
  . "$HOME/.cargo/env"
fi

# CARGO_TARGET_DIR, if set, is honoured by cargo itself. Test parallelism stays cargo's
# default: tests that must not overlap serialise themselves.
cargo test --workspace --all-targets "$@"

# The unit under a real systemd (a booted Debian 12 root, cached under /var/tmp): the
# debug binary the tests above built.
./tests/systemd/run.sh "${CARGO_TARGET_DIR:-$repo/target}/debug/converge"

# The Debian package: install, upgrade, purge in a throwaway Debian 12 root (the debug
# binary, uncompressed: what is tested is the package's layout and scripts).
CONVERGE_DEB_COMPRESS=none ./tests/deb.sh --binary "${CARGO_TARGET_DIR:-$repo/target}/debug/converge"

# --all-targets leaves out doc tests; run them only if some crate has any.
if grep -rqs --include='*.rs' -E '^\s*//[/!].*```' src reconcilers; then
  cargo test --workspace --doc "$@"
fi
