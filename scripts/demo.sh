#!/usr/bin/env bash
# The demo (README): builds what is missing, then a real Envoy and a real workerd gate requests
# with tokens the CLI just issued. Runs until Ctrl-C (or pass --no-wait to stop right after the table).
set -euo pipefail
source "$(dirname "$0")/tools.sh"
cd "$ROOT"

ensure_rust_targets
ensure_python
ensure_envoy
say "building the Envoy dynamic module (native) and the tokengate CLI"
cargo build -p tokengate-dynamic-module --profile native --locked
cargo build -p tokengate-admin --locked
say "building the Worker (worker-build, wrangler --dry-run bundle)"
./scripts/worker.sh bundle
"$PYTHON" scripts/demo.py "$@"
