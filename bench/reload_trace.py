#!/usr/bin/env python3
"""Diagnostic, not part of run.sh: where one reload's time goes, VM by VM.

One gateway as in the bench's reload test (Envoy pinned to CPU 0, `--concurrency 1`), three
pushes of a 100,000-token bundle in a binary ECDS file; for each, the rename's time and each
VM's `serving bundle version N (…, loaded in X ms)` from Envoy's log, with its time and thread
id: the canary first, on the main thread, then the main thread's VM and the worker's. With
`--module`, the dynamic module instead (envoy/gateway.yaml): one such line per push, on the
main thread.

    target/tools/py-venv/bin/python bench/reload_trace.py [--tokens N] [--cpus 0] [--json] [--wasm PATH | --module]

Needs what bench/run.sh builds (the filter) and installs (Envoy, and the project venv whose
`cryptography` signs the v2 bundles, as in bench/envoy_bench.py).
"""
import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import envoy_bench as eb  # noqa: E402

harness = eb.harness


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=100_000)
    ap.add_argument("--cpus", default=eb.ENVOY_CPU, help="CPUs Envoy may use (taskset list)")
    ap.add_argument("--json", action="store_true", help="the ECDS file in JSON, not binary")
    ap.add_argument("--wasm", default=harness.WASM)
    ap.add_argument("--module", action="store_true",
                    help="trace the dynamic module (target/native/libtokengate.so) instead")
    args = ap.parse_args()
    upstream = eb.Upstream()
    tokens = eb.Tokens(args.tokens)
    ecds = "tokengate.ecds.json" if args.json else "tokengate.ecds.pb"
    cfg = eb.Config("trace", "trace", upstream.port, wasm_path=args.wasm, ecds_file=ecds,
                    cpus=args.cpus, filter="module" if args.module else "wasm")
    gw = cfg.gw
    gw.log_level = "info"
    # Not config:debug, which would also log the whole 14.6 MB configuration on every push.
    gw.extra_args = ["--log-format", "%H:%M:%S.%e thread %t: %v"]
    try:
        cfg.start()
        assert gw.push(tokens.bundle(10, 1)) == "accepted"
        time.sleep(1)
        for k in range(3):
            version, fresh = 2 + k, 10_000_000 + k
            text = tokens.bundle(args.tokens, version, [fresh])
            new = eb.make_token(fresh)
            seen = os.path.getsize(gw.envoy_log)
            (_, wall), served = eb.push_until_served(cfg, text, new, "served")
            time.sleep(1.0)  # the last VM's log line
            stamp = time.strftime("%H:%M:%S", time.localtime(wall)) + f".{int(wall % 1 * 1000):03d}"
            print(f"push v{version} ({len(text) / 1e6:.1f} MB): renamed at {stamp}, "
                  f"served after {served * 1000:.0f} ms")
            with open(gw.envoy_log) as f:
                f.seek(seen)
                for line in f:
                    if "serving bundle" in line:
                        print("   ", line.rstrip()[:150])
    finally:
        gw.close()
        upstream.close()


if __name__ == "__main__":
    main()
