#!/usr/bin/env bash
# The one test command (README): installs what it lacks, then runs every check and test.
# Safe to re-run; everything it installs goes under target/ or the Rust toolchain.
set -euo pipefail
source "$(dirname "$0")/tools.sh"
cd "$ROOT"

ensure_rust_targets

say "format and lints (native and wasm32-wasip1)"
cargo fmt --all -- --check
cargo clippy --workspace --all-targets --locked -- -D warnings
cargo clippy -p tokengate-plugin --target wasm32-wasip1 --release --locked -- -D warnings

say "conformance vectors are up to date"
python3 conformance/generate.py --check

say "building the filter (wasm32-wasip1, release)"
cargo build -p tokengate-plugin --target wasm32-wasip1 --release --locked
wasm="target/wasm32-wasip1/release/tokengate_filter.wasm"
size=$(stat -c %s "$wasm")
say "filter size: $size bytes ($wasm); budget 307200 (300 KiB)"
[ "$size" -le 307200 ] || echo "warning: the filter is over its 300 KiB budget" >&2

say "unit tests, core conformance, and the built filter under the wasmtime host"
cargo test --workspace --locked

say "end-to-end: the CLI and a real Envoy (conformance vectors, lifecycle, bad pushes, hot reload)"
ensure_envoy
cargo build -p tokengate-admin --locked
python3 tests/envoy/e2e.py

say "end-to-end: the Worker in a real workerd (conformance vectors, pushes, KV, Access, the CLI)"
./scripts/worker.sh
