#!/usr/bin/env bash
# tokengate benchmark, one command: builds what it needs, measures Envoy (no auth, native
# api_key_auth, a minimal wasm filter, tokengate's dynamic module and wasm filter at 10 /
# 10,000 / 100,000 tokens) interleaved over rounds, reload time and memory (both filters, at
# --concurrency 1 and 4), core decide() with criterion (native and in wasmtime), the Worker if
# its tooling is there, and writes bench/RESULTS.md + bench/cpu_per_request.png.
#
#   bench/run.sh                  the full run (~18 minutes on 2 cores)
#   BENCH_ROUNDS=1 BENCH_DURATION=2 bench/run.sh     a quick smoke run (figures not meaningful)
#   BENCH_CONNECTIONS=32 bench/run.sh                more wrk connections (default 8)
#   BENCH_WAIT_IDLE=600 bench/run.sh                 first wait (up to 600 s) for load average < 0.5
#
# Idempotent; installs wrk (apt) if missing, Envoy, the Rust targets and the project Python
# (target/tools/py-venv, with the `cryptography` that signs the bench's v2 bundles) via
# scripts/tools.sh, and matplotlib into target/tools/bench-venv. Servers listen on 127.0.0.1
# only; every load run is bounded in time. Run it on a quiet machine: the load average goes
# into RESULTS.md.
set -euo pipefail
BENCH_DIR="$(cd "$(dirname "$0")" && pwd)"
source "$BENCH_DIR/../scripts/tools.sh"   # say, ensure_rust_targets, ensure_envoy, ensure_python; sets ROOT
cd "$ROOT"

ROUNDS="${BENCH_ROUNDS:-5}"
DURATION="${BENCH_DURATION:-5}"
CONNECTIONS="${BENCH_CONNECTIONS:-8}"
OUT="$ROOT/target/bench"
VENV="$TOOLS/bench-venv"
mkdir -p "$OUT"
loadavg() { cut -d' ' -f1-3 /proc/loadavg; }
LOAD_START="$(loadavg)"
say "tokengate bench: $ROUNDS rounds x ${DURATION}s per configuration; load average now $LOAD_START"

# --- tools ---------------------------------------------------------------------------------
if ! command -v wrk >/dev/null; then
  say "installing wrk (apt)"
  apt-get update -qq && apt-get install -y -qq wrk >/dev/null
fi
command -v taskset >/dev/null || { echo "taskset (util-linux) is needed" >&2; exit 1; }
ensure_rust_targets
ensure_envoy
ensure_python   # sets $PYTHON: the Envoy bench signs its bundles with Ed25519 (`cryptography`)
if ! "$VENV/bin/python" -c 'import matplotlib' 2>/dev/null; then
  say "installing matplotlib into $VENV"
  python3 -m venv "$VENV"
  "$VENV/bin/pip" install --quiet --disable-pip-version-check matplotlib
fi

# --- builds (all before any measurement) ---------------------------------------------------
say "building the dynamic module (target/native/libtokengate.so, profile native)"
cargo build -p tokengate-dynamic-module --profile native
MODULE="$ROOT/target/native/libtokengate.so"
say "building the tokengate filter and the minimal filter (wasm32-wasip1, release)"
cargo build -p tokengate-plugin -p tokengate-bench-floor --target wasm32-wasip1 --release
FILTER="$ROOT/target/wasm32-wasip1/release/tokengate_filter.wasm"
FLOOR="$ROOT/target/wasm32-wasip1/release/floor_filter.wasm"
say "module: $(stat -c %s "$MODULE") bytes; filter: $(stat -c %s "$FILTER") bytes; minimal filter: $(stat -c %s "$FLOOR") bytes"
# The shipped profile is opt-level z (size) but for sha2 and tokengate-core (speed, for the
# reload): measure what those two exceptions do per request against the filter built with
# every crate at z, alone and shrunk by binaryen's wasm-opt -Oz (pinned in tests/worker).
VARIANTS="$OUT/variants"
mkdir -p "$VARIANTS"
say "building the filter with every crate at opt-level z (target/bench/target-all-z) for comparison"
cargo build -p tokengate-plugin --target wasm32-wasip1 --release --target-dir "$OUT/target-all-z" \
  --config 'profile.release.package.sha2.opt-level="z"' \
  --config 'profile.release.package.tokengate-core.opt-level="z"'
cp "$OUT/target-all-z/wasm32-wasip1/release/tokengate_filter.wasm" "$VARIANTS/all-z.wasm"
VARIANT_ARGS=(--variant "all-z=$VARIANTS/all-z.wasm")
WASM_OPT="$ROOT/tests/worker/node_modules/.bin/wasm-opt"
if [ -x "$WASM_OPT" ]; then
  "$WASM_OPT" -Oz --enable-bulk-memory --enable-sign-ext --enable-nontrapping-float-to-int \
    --enable-mutable-globals "$VARIANTS/all-z.wasm" -o "$VARIANTS/all-z-wasm-opt.wasm"
  VARIANT_ARGS+=(--variant "all-z-wasm-opt=$VARIANTS/all-z-wasm-opt.wasm")
fi
say "variants: $(cd "$VARIANTS" && stat -c '%n %s bytes' *.wasm | tr '\n' ';')"
say "building the criterion benches (release)"
cargo bench -p tokengate-bench --bench decide --no-run
WORKER_OK=0
WORKER_WHY="scripts/worker.sh (the Worker's build and test tooling) does not exist yet"
if [ -x "$ROOT/scripts/worker.sh" ]; then
  say "building and bundling the Worker (scripts/worker.sh bundle)"
  if "$ROOT/scripts/worker.sh" bundle >"$OUT/worker-build.log" 2>&1; then
    WORKER_OK=1
  else
    WORKER_WHY="\`scripts/worker.sh bundle\` failed in this run ($(grep -m1 -E '^error' "$OUT/worker-build.log" || tail -1 "$OUT/worker-build.log"))"
    say "Worker build failed (see target/bench/worker-build.log): its section stays a TODO"
  fi
fi

# --- machine -------------------------------------------------------------------------------
# BENCH_WAIT_IDLE=N: wait up to N seconds for the 1-minute load average to fall below 0.5.
deadline=$(( $(date +%s) + ${BENCH_WAIT_IDLE:-0} ))
while awk -v l="$(cut -d' ' -f1 /proc/loadavg)" 'BEGIN { exit !(l >= 0.5) }' && [ "$(date +%s)" -lt "$deadline" ]; do
  say "waiting for a quiet machine: load average $(loadavg)"; sleep 15
done
LOAD_ENVOY="$(loadavg)"
say "load average before measuring: $LOAD_ENVOY"
awk -v l="${LOAD_ENVOY%% *}" 'BEGIN { exit !(l > 0.5) }' \
  && say "WARNING: load average > 0.5: something else is running; figures will be noisier"

# --- measurements --------------------------------------------------------------------------
rm -f "$OUT/envoy.json" "$OUT/worker.json" "$OUT/worker_push.json" "$OUT/worker_usage.json"
say "Envoy: CPU per request, interleaved ($ROUNDS rounds), then reload and memory"
"$PYTHON" "$BENCH_DIR/envoy_bench.py" --out "$OUT/envoy.json" --rounds "$ROUNDS" --duration "$DURATION" \
  --connections "$CONNECTIONS" "${VARIANT_ARGS[@]}"

say "criterion: decide() natively and in wasmtime; bundle load"
rm -rf "$ROOT/target/criterion"
cargo bench -p tokengate-bench --bench decide 2>&1 | grep -E '^[a-z].*/|time:' | sed 's/^/  [criterion] /'

if [ "$WORKER_OK" = 1 ]; then
  say "Worker: tokengate-worker vs a minimal JS Worker in workerd (Miniflare)"
  node "$BENCH_DIR/worker_bench.mjs" --out "$OUT/worker.json" --rounds "$ROUNDS" --duration "$DURATION" \
    || { WORKER_WHY="bench/worker_bench.mjs failed in this run"; say "$WORKER_WHY: its section stays a TODO"; }
  say "Worker: paged pushes of 100,000 and 1,000,000 tokens, from empty and then changed"
  node "$BENCH_DIR/worker_push.mjs" --sizes 100000,1000000 --out "$OUT/worker_push.json" >/dev/null \
    || say "bench/worker_push.mjs failed in this run: its section stays a TODO"
  say "Worker: usage store writes per active token"
  node "$BENCH_DIR/worker_usage.mjs" --out "$OUT/worker_usage.json" \
    || say "bench/worker_usage.mjs failed in this run: its section stays a TODO"
fi
if [ ! -s "$OUT/worker.json" ]; then
  python3 - "$OUT/worker.json" "$WORKER_WHY" <<'EOF'
import json, sys
json.dump({"todo": f"The Worker was not benchmarked because {sys.argv[2]}. Not measured: "
           "tokengate-worker vs a minimal JS Worker (SHA-256 via crypto.subtle + one KV read) in "
           "workerd via Miniflare (requests/s, p99 latency, workerd CPU and KV reads per request, "
           "for valid and garbage tokens) and the gzip size of the `wrangler deploy --dry-run` "
           "bundle. bench/worker_bench.mjs measures all of it once `scripts/worker.sh bundle` works: "
           "rerun bench/run.sh."}, open(sys.argv[1], "w"))
EOF
fi

# --- report --------------------------------------------------------------------------------
python3 - "$OUT/machine.json" "$FILTER" "$FLOOR" "$MODULE" "$LOAD_START" "$LOAD_ENVOY" "$(loadavg)" <<'EOF'
import json, os, platform, subprocess, sys, time
out, filt, floor, module, l0, l1, l2 = sys.argv[1:]
cpu = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), "?")
mem = next((l.split()[1] for l in open("/proc/meminfo") if l.startswith("MemTotal")), "0")
env = os.environ.get("ENVOY_BIN", "envoy")
envoy = subprocess.run([env, "--version"], capture_output=True, text=True).stdout.strip().split("version: ")[-1]
git = subprocess.run(["git", "describe", "--always", "--dirty"], capture_output=True, text=True).stdout.strip()
sizes = {"module_so": os.path.getsize(module), "filter_wasm": os.path.getsize(filt),
         "floor_wasm": os.path.getsize(floor)}
for name in ("all-z", "all-z-wasm-opt"):
    path = os.path.join(os.path.dirname(out), "variants", name + ".wasm")
    if os.path.exists(path):
        sizes["variant_" + name] = os.path.getsize(path)
worker = json.load(open(os.path.join(os.path.dirname(out), "worker.json")))
if worker.get("gzip_bytes"):
    sizes["worker_gzip"] = worker["gzip_bytes"]
json.dump({"date": time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime()), "cpu": cpu,
           "nproc": os.cpu_count(), "kernel": platform.release(),
           "memory": f"{int(mem) / 1048576:.1f} GiB", "envoy": envoy, "git": git,
           "load_start": l0, "load_envoy": l1, "load_end": l2, "sizes": sizes},
          open(out, "w"), indent=1)
EOF
say "writing bench/RESULTS.md and bench/cpu_per_request.png"
"$VENV/bin/python" "$BENCH_DIR/report.py" --dir "$OUT" --criterion "$ROOT/target/criterion" \
  --md "$BENCH_DIR/RESULTS.md" --png "$BENCH_DIR/cpu_per_request.png"
say "done: load average at end $(loadavg); see bench/RESULTS.md"
