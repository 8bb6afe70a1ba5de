#!/usr/bin/env bash
# Runs every fuzz target (fuzz/) for a bounded time from its kept seeds, so a parser change
# that crashes or breaks an invariant fails the test command. Called by scripts/test.sh;
# FUZZ_SECONDS (default 12) is the time per target. A finding is left in fuzz/artifacts/<target>/:
# reproduce it with `cargo +nightly fuzz run <target> <file>` (in fuzz/), then make it a regression test.
set -euo pipefail
source "$(dirname "$0")/tools.sh"
cd "$ROOT"

TARGETS=(bundle_load access_assertion signed_token path_normalisation credentials page_check usage_input rate_slot)
SECONDS_EACH="${FUZZ_SECONDS:-12}"

ensure_fuzz_tools() {
  if ! rustup toolchain list | grep -q '^nightly'; then
    say "installing the nightly toolchain (cargo fuzz needs it)"
    rustup toolchain install nightly --profile minimal
  fi
  if ! "$TOOLS/bin/cargo-fuzz" --version >/dev/null 2>&1; then
    say "installing cargo-fuzz into $TOOLS"
    cargo install --quiet cargo-fuzz --locked --root "$TOOLS"
  fi
}

ensure_fuzz_tools
export PATH="$TOOLS/bin:$PATH"
cd fuzz
say "building the fuzz targets (nightly, libFuzzer + ASan)"
cargo +nightly fuzz build -O
for target in "${TARGETS[@]}"; do
  corpus="$ROOT/target/fuzz-corpus/$target"
  mkdir -p "$corpus"
  say "fuzzing $target for ${SECONDS_EACH}s (kept seeds: fuzz/seeds/$target)"
  log="$ROOT/target/fuzz-$target.log"
  if ! cargo +nightly fuzz run -O "$target" "$corpus" "seeds/$target" -- \
      -max_total_time="$SECONDS_EACH" -timeout=10 -rss_limit_mb=2048 >"$log" 2>&1; then
    grep -E 'ERROR|panicked|SUMMARY|Test unit written' "$log" >&2 || tail -20 "$log" >&2
    echo "fuzz target $target failed; the input is in fuzz/artifacts/$target/ (full log: $log)" >&2
    exit 1
  fi
  grep -E '^Done' "$log" || true
done
