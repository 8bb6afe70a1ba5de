#!/usr/bin/env bash
# The Cloudflare Worker, end to end: installs its build tools if missing, builds it with
# worker-build, bundles it with `wrangler deploy --dry-run` (offline) and prints the gzip size,
# then runs the end-to-end tests in real workerd (Miniflare). Idempotent; safe to re-run.
#
#   scripts/worker.sh           everything (tools, build, bundle, test)
#   scripts/worker.sh tools     install what is missing, nothing else
#   scripts/worker.sh build     build worker/build/ (wrangler.toml's [build] command)
#   scripts/worker.sh bundle    build, then the dry-run bundle in target/worker-dist/
#   scripts/worker.sh test      the Miniflare tests against target/worker-dist/
#
# Everything it installs goes under target/tools/ (worker-build, wasm-bindgen-cli) and
# tests/worker/node_modules/ (miniflare, wrangler, esbuild, binaryen, pinned in package-lock).
set -euo pipefail
source "$(dirname "$0")/tools.sh"
cd "$ROOT"

WORKER_BUILD_VERSION="0.8.7"
NODE_DIR="$ROOT/tests/worker"
DIST="$ROOT/target/worker-dist"
MIN_NODE_MAJOR=20

wasm_bindgen_version() {
  # The wasm-bindgen-cli must be exactly the wasm-bindgen library version in Cargo.lock.
  awk '/^name = "wasm-bindgen"$/ { getline; gsub(/"/, "", $3); print $3; exit }' "$ROOT/Cargo.lock"
}

ensure_worker_tools() {
  ensure_rust_targets
  local node_major
  node_major="$(node -p 'process.versions.node.split(".")[0]' 2>/dev/null || echo 0)"
  if [ "$node_major" -lt "$MIN_NODE_MAJOR" ]; then
    echo "Node.js >= $MIN_NODE_MAJOR is needed for Miniflare and wrangler (found: $(node --version 2>&1))" >&2
    exit 1
  fi
  if ! "$TOOLS/bin/worker-build" --version 2>/dev/null | grep -qx "$WORKER_BUILD_VERSION"; then
    say "installing worker-build $WORKER_BUILD_VERSION into $TOOLS"
    cargo install --quiet worker-build --version "$WORKER_BUILD_VERSION" --locked --root "$TOOLS"
  fi
  local wb
  wb="$(wasm_bindgen_version)"
  if ! "$TOOLS/bin/wasm-bindgen" --version 2>/dev/null | grep -q " $wb\$"; then
    say "installing wasm-bindgen-cli $wb (the version in Cargo.lock) into $TOOLS"
    # Not --locked: the CLI's own lockfile pins a webpki-roots release the registry may lack.
    cargo install --quiet wasm-bindgen-cli --version "$wb" --root "$TOOLS"
  fi
  if [ ! -f "$NODE_DIR/node_modules/.package-lock.json" ] \
     || [ "$NODE_DIR/package-lock.json" -nt "$NODE_DIR/node_modules/.package-lock.json" ]; then
    say "installing miniflare, wrangler, esbuild and binaryen (tests/worker/package-lock.json)"
    (cd "$NODE_DIR" && npm ci --no-audit --no-fund --loglevel=error)
  fi
  # worker-build uses these instead of downloading its own copies.
  export WASM_BINDGEN_BIN="$TOOLS/bin/wasm-bindgen"
  export ESBUILD_BIN="$NODE_DIR/node_modules/@esbuild/linux-x64/bin/esbuild"
  export WASM_OPT_BIN="$NODE_DIR/node_modules/.bin/wasm-opt"
  export WRANGLER_SEND_METRICS=false
}

build_worker() {
  if [ "${TOKENGATE_WORKER_BUILT:-}" = 1 ]; then
    say "worker already built in this run (worker/build/)"
    return
  fi
  say "building the Worker (worker-build --release, wasm32-unknown-unknown)"
  # wasm-bindgen warns that the (workspace-wide) strip = true removed the target_features
  # section; it then assumes rustc's defaults, which is what the build uses. Not stripping
  # would keep a names section worker-build's wasm-opt --debuginfo preserves: 100+ KB more.
  # Run from worker/, so cargo reads worker/.cargo/config.toml: opt-level "z" throughout,
  # without the speed exceptions the workspace profile makes for the filter's reload.
  (cd "$ROOT/worker" && "$TOOLS/bin/worker-build" --release)
  export TOKENGATE_WORKER_BUILT=1
}

bundle_worker() {
  say "bundling with wrangler deploy --dry-run (no network) into ${DIST#"$ROOT"/}"
  rm -rf "$DIST"
  # --cwd: wrangler runs the [build] command in its working directory, which must be the root.
  (cd "$NODE_DIR" && npx --no-install wrangler deploy --dry-run --outdir "$DIST" --cwd "$ROOT")
  local raw=0 gz=0 f
  for f in "$DIST"/*.js "$DIST"/*.wasm; do
    [ -f "$f" ] || continue
    raw=$((raw + $(stat -c %s "$f")))
    gz=$((gz + $(gzip -9 -c "$f" | wc -c)))
  done
  say "Worker bundle: $raw bytes, gzip -9: $gz bytes ($(ls "$DIST" | tr '\n' ' '))"
}

test_worker() {
  say "end-to-end tests in workerd (Miniflare): tests/worker/run.mjs"
  local before leaked
  before="$(pgrep -x workerd | sort || true)"
  TOKENGATE_WORKER_DIST="$DIST" node "$NODE_DIR/run.mjs"
  # Every workerd a test starts must be gone when the tests end (allowing 2 s to exit).
  for _ in 1 2 3 4 5 6 7 8 9 10; do
    leaked="$(comm -13 <(echo "$before") <(pgrep -x workerd | sort || true) | grep . || true)"
    [ -z "$leaked" ] && break
    sleep 0.2
  done
  if [ -n "$leaked" ]; then
    echo "the tests left workerd running (pids: $(echo $leaked)); stopping them" >&2
    kill $leaked 2>/dev/null || true
    exit 1
  fi
}

case "${1:-all}" in
  tools) ensure_worker_tools ;;
  build) ensure_worker_tools; build_worker ;;
  bundle) ensure_worker_tools; build_worker; bundle_worker ;;
  test) ensure_worker_tools; test_worker ;;
  all) ensure_worker_tools; build_worker; bundle_worker; test_worker ;;
  *) echo "usage: $0 [tools|build|bundle|test]" >&2; exit 2 ;;
esac
