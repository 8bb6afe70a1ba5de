#!/usr/bin/env python3
# tokengate benchmark report: turns the raw results of one bench/run.sh run into
# bench/RESULTS.md and bench/cpu_per_request.png (matplotlib, from the bench venv).
"""Writes RESULTS.md and the chart from target/bench/*.json and target/criterion/.

    python3 bench/report.py --dir target/bench --criterion target/criterion \
        --md bench/RESULTS.md --png bench/cpu_per_request.png

Every figure is the median over rounds (or criterion samples) with min–max; every ratio is
computed per round between runs of the same round, then summarised the same way.
"""

import argparse
import glob
import json
import os
import statistics

# Issue targets.
TARGET_RATIO = 1.05        # tokengate CPU/request ÷ minimal wasm filter
TARGET_RELOAD_S = 1.0      # 100,000-token bundle served after the push
TARGET_MIB_PER_VM = 30.0   # memory growth per wasm VM
TARGET_GZIP_MIB = 1.0      # Worker bundle, gzip
TARGET_WASM_KIB = 300.0    # filter .wasm
# The dynamic module's targets.
TARGET_MODULE_RATIO = 1.05         # module CPU/request ÷ native api_key_auth (10 keys)
TARGET_MODULE_RELOAD_S = 0.3       # 100,000 tokens: bundle.version shows it, after the rename
TARGET_GROWTH_PER_BUNDLE = 1.5     # RSS growth ÷ the bundle's size on disk, at --concurrency 1 and 4
FOOTPRINT_LABELS = {"module": "dynamic module", "wasm": "wasm filter"}


def summary(values):
    values = [v for v in values if v is not None]
    if not values:
        return None
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "n": len(values)}


def fmt(s, digits=1, unit=""):
    if s is None:
        return "n/a"
    return f"{s['median']:.{digits}f}{unit} ({s['min']:.{digits}f}–{s['max']:.{digits}f})"


def load_json(path):
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def criterion_summary(root, group, bench, param):
    """Median and min–max of the per-iteration time (ns) over criterion's samples."""
    sample = load_json(os.path.join(root, group, bench, str(param), "new", "sample.json"))
    if not sample:
        return None
    return summary([t / i for t, i in zip(sample["times"], sample["iters"])])


def verdict(ok):
    return "**met**" if ok else "**missed**"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--dir", required=True)
    ap.add_argument("--criterion", required=True)
    ap.add_argument("--md", required=True)
    ap.add_argument("--png", required=True)
    args = ap.parse_args()

    machine = load_json(os.path.join(args.dir, "machine.json")) or {}
    envoy = load_json(os.path.join(args.dir, "envoy.json"))
    worker = load_json(os.path.join(args.dir, "worker.json"))
    push_bench = load_json(os.path.join(args.dir, "worker_push.json"))
    usage_bench = load_json(os.path.join(args.dir, "worker_usage.json"))
    sizes = machine.get("sizes", {})
    out = []
    w = out.append

    w("# tokengate benchmark results\n")
    w("Written by `bench/run.sh` (one command; every figure below comes from one run). "
      "Figures are **median (min–max)** over rounds; ratios are computed per round, between "
      "runs of the same round, then summarised the same way. Absolute numbers depend on the "
      "machine; the ratios are what to compare across runs.\n")
    w("## Machine and run\n")
    w("| | |\n| --- | --- |")
    for key, label in [("date", "date (UTC)"), ("cpu", "CPU"), ("nproc", "nproc"),
                       ("kernel", "kernel"), ("memory", "memory"), ("envoy", "Envoy"),
                       ("load_start", "load average at start (1/5/15 min)"),
                       ("load_envoy", "load average before the Envoy runs"),
                       ("load_end", "load average at end"), ("git", "commit (+ local changes)")]:
        if machine.get(key):
            w(f"| {label} | {machine[key]} |")
    w("")

    rows = {}
    if envoy:
        w("## Envoy: CPU per request\n")
        w(f"Each configuration is its own Envoy 1.40 (`--concurrency 1`; the dynamic module's "
          f"rows (`module-*`) the shipped `envoy/gateway.yaml`, every other row "
          f"`envoy/gateway-wasm.yaml`, with only the auth filter swapped or, in `*-noguard`, the "
          f"RBAC guard removed), all started up front and "
          f"pinned to CPU 0 (`taskset`); `{envoy['wrk']}` and a direct-response upstream Envoy "
          f"run on CPU 1. {envoy['rounds']} rounds, each running every configuration once in a "
          f"rotated order, after an unmeasured warm-up. `GET /api/orders/1` with "
          f"`Authorization: Bearer <valid token>`; every response 200. CPU = Envoy's utime+stime "
          f"(`/proc/PID/stat`) over the run ÷ requests completed.\n")
        w("| configuration | Envoy CPU µs/request | requests/s | p99 latency ms | non-2xx | Envoy RSS MiB |")
        w("| --- | --- | --- | --- | --- | --- |")
        for c in envoy["configs"]:
            runs = c["runs"]
            s = summary([r["cpu_us_per_req"] for r in runs])
            rows[c["name"]] = c
            w(f"| {c['label']} (`{c['name']}`) | {fmt(s)} | "
              f"{fmt(summary([r['rps'] for r in runs]), 0)} | "
              f"{fmt(summary([r['p99_ms'] for r in runs]), 2)} | "
              f"{sum(r['non2xx'] for r in runs)} | {c['rss_kib'] / 1024:.0f} |")
        w("")

    def ratio(num, den):
        if num not in rows or den not in rows:
            return None
        a = {r["round"]: r["cpu_us_per_req"] for r in rows[num]["runs"]}
        b = {r["round"]: r["cpu_us_per_req"] for r in rows[den]["runs"]}
        return summary([a[k] / b[k] for k in a if k in b and b[k]])

    names = [c["name"] for c in envoy["configs"]] if envoy else []
    big = max((int(n.split("-")[1]) for n in names
               if n.split("-")[0] in ("tokengate", "module") and n.split("-")[1:2] and n.split("-")[1].isdigit()),
              default=100000)
    ratios = [
        ("dynamic module (10 tokens) ÷ native api_key_auth (10 keys)", "module-10", "api_key_auth-10"),
        (f"dynamic module ({big:,} tokens) ÷ native api_key_auth (10 keys)", f"module-{big}", "api_key_auth-10"),
        ("dynamic module (10,000 tokens) ÷ native api_key_auth (10 keys)", "module-10000", "api_key_auth-10"),
        (f"dynamic module ({big:,} tokens) ÷ native api_key_auth ({big:,} keys)", f"module-{big}", f"api_key_auth-{big}"),
        (f"dynamic module {big:,} tokens ÷ dynamic module 10 tokens", f"module-{big}", "module-10"),
        ("dynamic module (10 tokens) ÷ no auth", "module-10", "none"),
        ("dynamic module (10 tokens) with RBAC guard ÷ without", "module-10", "module-10-noguard"),
        ("dynamic module (10 tokens) with usage counting ÷ without", "module-10", "module-10-nousage"),
        ("wasm filter (10 tokens) with usage counting ÷ without", "tokengate-10", "tokengate-10-nousage"),
        ("dynamic module (10 tokens): rule with a rate limit ÷ the same rule without", "module-10-limited", "module-10"),
        ("wasm filter (10 tokens): rule with a rate limit ÷ the same rule without", "tokengate-10-limited", "tokengate-10"),
        ("diagnostic: dynamic module (10 tokens) without the RBAC guard ÷ native api_key_auth (10 keys)",
         "module-10-noguard", "api_key_auth-10"),
        ("wasm filter (10 tokens) ÷ dynamic module (10 tokens)", "tokengate-10", "module-10"),
        (f"wasm filter ({big:,} tokens) ÷ dynamic module ({big:,} tokens)", f"tokengate-{big}", f"module-{big}"),
        ("wasm filter (10 tokens) ÷ minimal wasm filter", "tokengate-10", "floor-wasm"),
        (f"wasm filter ({big:,} tokens) ÷ minimal wasm filter", f"tokengate-{big}", "floor-wasm"),
        ("wasm filter (10,000 tokens) ÷ minimal wasm filter", "tokengate-10000", "floor-wasm"),
        (f"wasm filter {big:,} tokens ÷ wasm filter 10 tokens", f"tokengate-{big}", "tokengate-10"),
        ("minimal wasm filter ÷ no auth", "floor-wasm", "none"),
        ("native api_key_auth (10 keys) ÷ no auth", "api_key_auth-10", "none"),
        (f"native api_key_auth ({big:,} keys) ÷ no auth", f"api_key_auth-{big}", "none"),
        ("wasm filter (10 tokens) ÷ no auth", "tokengate-10", "none"),
        ("wasm filter (10 tokens) ÷ native api_key_auth (10 keys)", "tokengate-10", "api_key_auth-10"),
        ("wasm filter (10 tokens) with RBAC guard ÷ without", "tokengate-10", "tokengate-10-noguard"),
        ("wasm filter (10 tokens) as shipped ÷ every crate at opt-level z", "tokengate-10", "tokengate-10-all-z"),
        ("wasm filter (10 tokens) as shipped ÷ every crate at z + wasm-opt -Oz", "tokengate-10", "tokengate-10-all-z-wasm-opt"),
        ("diagnostic: minimal + tokengate's host calls ÷ minimal", "floor-abi", "floor-wasm"),
        ("wasm filter (10 tokens) ÷ (minimal + tokengate's host calls)", "tokengate-10", "floor-abi"),
        (f"diagnostic: shared-data table ({big:,} tokens, SHA-256 + 1 lookup) ÷ minimal",
         f"shared-{big}", "floor-wasm"),
        (f"wasm filter ({big:,} tokens) ÷ shared-data table ({big:,} tokens)", f"tokengate-{big}", f"shared-{big}"),
    ]
    computed = {}
    if envoy:
        w("### Ratios (Envoy CPU per request)\n")
        w("| ratio | median (min–max) over rounds |\n| --- | --- |")
        for label, a, b in ratios:
            r = ratio(a, b)
            computed[(a, b)] = r
            if r:
                w(f"| {label} | {fmt(r, 3)} |")
        w("")
        w("![Envoy CPU per request](cpu_per_request.png)\n")
        perf = envoy.get("perf")
        if perf:
            w("### Where Envoy's CPU goes (perf, by binary)\n")
            w("`perf record -F 999 -p <envoy>` over one extra wrk run per configuration, samples "
              "summed by binary, times the median CPU/request above. Envoy's binary is stripped and "
              "V8 writes no perf map, so `wasm JIT code` is the wasm filter's own compiled code, "
              "`tokengate module` the dynamic module's (`libtokengate.so`), and "
              "`Envoy native` is everything else in Envoy: HTTP, the V8 runtime, the host side "
              "of every proxy-wasm call and the dynamic module's callbacks.\n")
            kinds = ["Envoy native", "wasm JIT code", "tokengate module (.so)", "kernel", "libc and other"]
            w("| configuration | " + " | ".join(f"{k} µs/req (%)" for k in kinds) + " |")
            w("| --- |" + " --- |" * len(kinds))
            for name, shares in perf.items():
                if name not in rows:
                    continue
                cpu = summary([r["cpu_us_per_req"] for r in rows[name]["runs"]])["median"]
                total = sum(shares.values()) or 100.0
                cells = [f"{cpu * shares.get(k, 0) / total:.1f} ({shares.get(k, 0):.0f}%)" for k in kinds]
                w(f"| `{name}` | " + " | ".join(cells) + " |")
            w("")

    footprint = {}
    tests = (envoy or {}).get("footprint") or {}
    if tests:
        w("## Envoy: reload and memory, dynamic module and wasm filter\n")
        first = next(iter(tests.values()))
        size = first["pushes"][0]["bundle_bytes"] if first["pushes"] else 0
        w(f"Each filter at `--concurrency 1` and `4`, each a fresh Envoy pinned to one core (CPU "
          f"{first['cpus']}; `taskset`), the shipped gateway yaml (the dynamic module: "
          f"`envoy/gateway.yaml`, its ECDS file in JSON, a reference to the bundle file; the wasm "
          f"filter: `envoy/gateway-wasm.yaml`, the bundle inline in a binary ECDS file, as "
          f"`push envoy --file *.pb` writes it). Its RSS (`VmRSS` of the real envoy process) with no "
          f"bundle yet, then {len(first['pushes'])} pushes of signed bundles of the same "
          f"{first.get('tokens', 0):,} tokens ({size:,} bytes on disk), "
          f"versions rising, each holding a token no other has. Per push: *gauge* = from the atomic "
          f"rename of the ECDS file (the module's bundle file is written before it) to the filter's "
          f"`bundle.version` gauge showing the new version (the admin's `/stats` polled every 5 ms; "
          f"the admin answers on Envoy's main thread, which loads the bundle, so a poll sent during "
          f"a load is answered after it; the wasm filter's gauge moves with its canary VM, on that "
          f"thread too); *first 200* = to the "
          f"first 200 for the new token, asked right after; RSS once Envoy is idle again, at least "
          f"{first.get('settle_s', 2):g} s after that and when it no longer falls (the gateway "
          f"yamls' `memory_allocator_manager` gives freed memory back once a second). Growth = RSS "
          f"then − RSS with no bundle yet, also as a multiple of the bundle's size on disk.\n")
        w("| filter | `--concurrency` | wasm VMs | RSS, no bundle yet (MiB) | RSS after each push (MiB) "
          "| growth ÷ bundle size, each push | gauge shows the new version after, each push (ms) "
          "| gauge, median (ms) | first 200, median (ms) | peak RSS (MiB) |")
        w("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
        for name, t in tests.items():
            p = t["pushes"]
            if not p:
                continue
            growth = summary([x["growth_per_bundle"] for x in p])
            shown = summary([x["shown_s"] * 1000 for x in p])
            served = summary([x["served_s"] * 1000 for x in p])
            vms = p[-1].get("vms_active")
            w(f"| {FOOTPRINT_LABELS[t['filter']]} (`{name}`) | {t['concurrency']} | "
              f"{vms if vms is not None else '–'} | {t['rss_empty_kib'] / 1024:.0f} | "
              + " / ".join(f"{x['rss_kib'] / 1024:.0f}" for x in p) + " | "
              + " / ".join(f"{x['growth_per_bundle']:.2f}" for x in p) + " | "
              + " / ".join(f"{x['shown_s'] * 1000:.0f}" for x in p)
              + f" | {shown['median']:.0f} | {served['median']:.0f} | {t['vm_hwm_kib'] / 1024:.0f} |")
            footprint[name] = {"filter": t["filter"], "concurrency": t["concurrency"],
                               "growth": growth, "shown": shown, "served": served,
                               "growth_mib": summary([x["growth_kib"] / 1024 for x in p]),
                               "bundle_bytes": p[0]["bundle_bytes"],
                               "each_ms": [x["shown_s"] * 1000 for x in p]}
        w("")
        pairs = [(f, footprint.get(f"reload-{f}-c1"), footprint.get(f"reload-{f}-c4")) for f in ("module", "wasm")]
        for f, one, four in pairs:
            if one and four:
                w(f"- {FOOTPRINT_LABELS[f]}: growth {one['growth_mib']['median']:.1f} MiB at "
                  f"`--concurrency 1`, {four['growth_mib']['median']:.1f} MiB at `4` (median over "
                  f"pushes; 4 ÷ 1 = {four['growth_mib']['median'] / one['growth_mib']['median']:.2f}).")
        w("")

    reloads = {}
    for key, title in [("reload", "wasm filter (one token table per VM)"),
                       ("reload_null", "floor: a configuration as large, which the minimal filter ignores"),
                       ("reload_pb", "wasm filter, ECDS file in binary protobuf (`push envoy --file *.pb`)"),
                       ("reload_pb_2cpu", "wasm filter, binary ECDS file, Envoy on both cores"),
                       ("reload_null_pb", "floor, ECDS file in binary protobuf"),
                       ("reload_shared", "diagnostic: the shared-data table (one per Envoy process)")]:
        reload = envoy.get(key) if envoy else None
        if not reload:
            continue
        if not reloads:
            w("## Envoy: the wasm filter's reload and memory per VM\n")
            w("A fresh gateway (same pinning, unless the title says otherwise): RSS with no configuration, then with a small one (10 tokens), then "
              "ECDS pushes of a large configuration, each holding one token that no earlier one had. "
              "*Served* = from the atomic rename of the ECDS file to the first 200 for that token "
              "(polled every 5 ms); *idle again* = Envoy used no CPU for 0.5 s (every VM configured, the "
              "canary VM gone), when RSS is read. Per-VM memory = RSS growth from no configuration ÷ active wasm "
              "VMs (`wasm.envoy.wasm.runtime.v8.active`).\n")
        n = reload["tokens"]
        pushes = reload["pushes"]
        w(f"### {title}: {n:,} tokens, {pushes[0]['bundle_bytes'] / 1e6:.1f} MB configuration\n")
        w("| push | served after (ms) | Envoy idle again after (ms) | Envoy RSS then (MiB) | wasm VMs active | VMs created so far |")
        w("| --- | --- | --- | --- | --- | --- |")
        for p in pushes:
            w(f"| v{p['version']} | {p['served_s'] * 1000:.0f} | {p['settled_s'] * 1000:.0f} | "
              f"{p['rss_kib'] / 1024:.0f} | {p['vms_active']} | {p['vms_created']} |")
        vms = pushes[-1]["vms_active"] or 1
        growth = (pushes[-1]["rss_kib"] - reload["rss_empty_kib"]) / 1024
        growth_10 = (pushes[-1]["rss_kib"] - reload["rss_10_kib"]) / 1024
        served = summary([p["served_s"] * 1000 for p in pushes])
        w("")
        w(f"- RSS: {reload['rss_empty_kib'] / 1024:.0f} MiB with no configuration "
          f"({reload['vms_empty']} VMs), {reload['rss_10_kib'] / 1024:.0f} MiB with the small one, "
          f"{pushes[-1]['rss_kib'] / 1024:.0f} MiB after the last push; peak RSS (VmHWM) "
          f"{reload['vm_hwm_kib'] / 1024:.0f} MiB.")
        w(f"- Growth from no configuration: {growth:.0f} MiB = **{growth / vms:.1f} MiB per VM** "
          f"over {vms} active VMs (from the small one: {growth_10:.0f} MiB).")
        w(f"- Served after: {fmt(served, 0, ' ms')}.\n")
        reloads[key] = {"served": served, "growth": growth, "vms": vms,
                        "per_vm": growth / vms, "worst_s": max(p["served_s"] for p in pushes), "n": n}

    variants = {k: v for k, v in ((envoy or {}).get("reload_pb_variants") or {}).items() if v.get("pushes")}
    if variants and reloads.get("reload_pb"):
        w("### the same binary-ECDS reload with other builds of the filter\n")
        w("| build | served after (ms) | memory growth per VM (MB) |\n| --- | --- | --- |")
        rows = [("as shipped", envoy["reload_pb"])] + list(variants.items())
        for label, r in rows:
            p = r["pushes"]
            vms = p[-1]["vms_active"] or 1
            per_vm = (p[-1]["rss_kib"] - r["rss_empty_kib"]) / 1024 / vms * 1.048576
            w(f"| {label} | {fmt(summary([x['served_s'] * 1000 for x in p]), 0, ' ms')} | {per_vm:.1f} |")
        w("")

    smaller = [r for r in (envoy.get("reload_null_sizes") or [] if envoy else []) if r.get("pushes")]
    if smaller:
        w("### floor by configuration size: how small would the bundle have to be?\n")
        w("The same floor (the minimal filter ignores its configuration) with the configuration cut to "
          "the size a more compact encoding of the same tokens would have.\n")
        w("| configuration | served after (ms) | memory growth per VM (MB) |\n| --- | --- | --- |")
        for r in [envoy["reload_null"]] + smaller if envoy.get("reload_null") else smaller:
            p = r["pushes"]
            vms = p[-1]["vms_active"] or 1
            per_vm = (p[-1]["rss_kib"] - r["rss_empty_kib"]) / 1024 / vms * 1.048576
            w(f"| {p[0]['bundle_bytes'] / 1e6:.1f} MB | "
              f"{fmt(summary([x['served_s'] * 1000 for x in p]), 0, ' ms')} | {per_vm:.1f} |")
        w("")

    crit = args.criterion
    w("## core `decide()` per request (criterion)\n")
    w("`native`: `Gate::decide` on the host CPU. `wasmtime`: one request through the built "
      "`.wasm` in the embedded wasmtime host of host-tests (`Vm::request`: context create, "
      "`on_request_headers`, done, log, delete — so it includes the proxy-wasm ABI, the host's "
      "bookkeeping and wasmtime fuel metering, which that host switches on). Request headers as "
      "Envoy hands them over (9 pairs). Per-iteration time, median (min–max) over criterion's "
      "samples, in ns.\n")
    w("| case | 10 tokens | 100,000 tokens |\n| --- | --- | --- |")
    crit_rows = [
        ("native, valid token", "native", "valid"),
        ("native, unknown token (hash + lookup miss)", "native", "unknown"),
        ("native, bad checksum (no hash, no lookup)", "native", "checksum"),
        ("wasmtime, tokengate, valid token", "wasmtime", "tokengate-valid"),
        ("wasmtime, tokengate, unknown token", "wasmtime", "tokengate-unknown"),
        ("wasmtime, tokengate, bad checksum", "wasmtime", "tokengate-checksum"),
    ]
    for label, group, bench in crit_rows:
        a = criterion_summary(crit, group, bench, 10)
        b = criterion_summary(crit, group, bench, 100000)
        w(f"| {label} | {fmt(a, 0)} | {fmt(b, 0)} |")
    floor_valid = criterion_summary(crit, "wasmtime", "floor-valid", 1)
    floor_bad = criterion_summary(crit, "wasmtime", "floor-unknown", 1)
    w(f"| wasmtime, minimal wasm filter, valid / wrong token | {fmt(floor_valid, 0)} | {fmt(floor_bad, 0)} |")
    w("")
    tg = criterion_summary(crit, "wasmtime", "tokengate-valid", 10)
    nat = criterion_summary(crit, "native", "valid", 10)
    if tg and floor_valid and nat:
        w(f"In wasmtime, tokengate (valid, 10 tokens) ÷ minimal filter = "
          f"{tg['median'] / floor_valid['median']:.2f}; the core's own decision natively is "
          f"{nat['median']:.0f} ns of the {tg['median']:.0f} ns.\n")
    fuel = load_json(os.path.join(args.dir, "fuel.json"))
    if fuel:
        w("Wasm instructions per request (wasmtime fuel, about one unit per instruction: "
          "deterministic, no timing noise), the same request as above:\n")
        w("| filter, token | 10 tokens | 100,000 tokens |\n| --- | --- | --- |")
        for case in ("valid", "unknown", "checksum"):
            w(f"| tokengate, {case} | {fuel.get(f'tokengate-{case}-10', '–'):,} | "
              f"{fuel.get(f'tokengate-{case}-100000', '–'):,} |")
        w(f"| minimal wasm filter, valid | {fuel.get('floor-valid', '–'):,} | |")
        w(f"| diagnostic: minimal + tokengate's host calls, valid | {fuel.get('floor-abi-valid', '–'):,} | |")
        if fuel.get("floor-valid") and fuel.get("tokengate-valid-10"):
            w(f"\ntokengate (valid, 10 tokens) ÷ minimal filter = "
              f"{fuel['tokengate-valid-10'] / fuel['floor-valid']:.1f}× the instructions; "
              f"÷ minimal + host calls = {fuel['tokengate-valid-10'] / fuel['floor-abi-valid']:.1f}×.\n")
        if fuel.get("memory-load-100000"):
            w("The filter's linear memory in wasmtime (MiB; wasm memory never shrinks, so this stays "
              "resident in each VM), deterministic:\n")
            w("| tokens | after the load | after a reload (the old gate serves until the new one is built) |")
            w("| --- | --- | --- |")
            for n in (10, 10000, 100000):
                if fuel.get(f"memory-load-{n}"):
                    w(f"| {n:,} | {fuel[f'memory-load-{n}'] / 2**20:.1f} | {fuel[f'memory-reload-{n}'] / 2**20:.1f} |")
            w("")
    w("Where a valid decision's time goes (native, 100,000 tokens; each step timed on its own, ns):\n")
    w("| step | ns |\n| --- | --- |")
    for label, bench in [("the whole `decide`", "decide"),
                         ("`begin` up to the lookup (headers, path, rule, credential, shape, SHA-256)", "begin-to-lookup"),
                         ("`token::shape` (CRC32 + base62 of the checksum)", "token-shape-crc"),
                         ("SHA-256 of the token", "sha256"),
                         ("hash-index lookup", "index-lookup"),
                         ("`policy::normalize_path`", "normalize-path"),
                         ("`credentials::find` (3 sources over 9 headers)", "credentials-find")]:
        w(f"| {label} | {fmt(criterion_summary(crit, 'parts', bench, 100000), 0)} |")
    w("")
    w("Loading a 100,000-token bundle (what a reload costs each VM), native, ms:\n")
    w("| step | ms |\n| --- | --- |")
    for label, bench in [("signature check: the v2 envelope opened, Ed25519 over the payload's bytes as received", "envelope-ed25519"),
                         ("the payload read whole with serde (the CLI's way), for comparison", "payload-serde-whole"),
                         ("validate records + build the hash index", "index-build"),
                         ("total: `Gate::load` (envelope and signature, records streamed into the table)", "total")]:
        s = criterion_summary(crit, "load", bench, 100000)
        if s:
            s = {k: (v / 1e6 if k != "n" else v) for k, v in s.items()}
        w(f"| {label} | {fmt(s, 1)} |")
    for n in (10, 100000):
        s = criterion_summary(crit, "wasmtime-configure", "configure", n)
        if s:
            s = {k: (v / 1e6 if k != "n" else v) for k, v in s.items()}
        w(f"| the filter's `on_configure` in wasmtime, {n:,} tokens (fresh VM) | {fmt(s, 1)} |")
    w("")

    w("## Sizes\n")
    w("| artefact | bytes | KiB |\n| --- | --- | --- |")
    for key, label in [("module_so", "tokengate dynamic module `libtokengate.so` (profile `native`)"),
                       ("filter_wasm", "tokengate filter `.wasm` (the workspace release profile, as shipped)"),
                       ("variant_all-z", "tokengate filter with every crate at opt-level z (sha2 and tokengate-core too)"),
                       ("variant_all-z-wasm-opt", "… that build after `wasm-opt -Oz`"),
                       ("floor_wasm", "minimal wasm filter `.wasm` (the workspace release profile)"),
                       ("worker_gzip", "Worker bundle, gzip (wrangler dry-run)")]:
        if sizes.get(key):
            w(f"| {label} | {sizes[key]:,} | {sizes[key] / 1024:.1f} |")
    w("")

    w("## Worker (workerd via Miniflare)\n")
    if worker and worker.get("configs"):
        w(worker.get("description", "") + "\n")
        w("| worker, token | requests/s | p99 latency ms | workerd CPU µs/request | KV reads / requests (per request) |")
        w("| --- | --- | --- | --- | --- |")
        for c in worker["configs"]:
            rps = summary([r["rps"] for r in c["runs"]])
            p99 = summary([r["p99_ms"] for r in c["runs"]])
            cpu = summary([r.get("cpu_us_per_req") for r in c["runs"]])
            reads = sum(r["kv_reads"] for r in c["runs"])
            requests = sum(r["requests"] for r in c["runs"])
            w(f"| {c['label']} | {fmt(rps, 0)} | {fmt(p99, 2)} | {fmt(cpu, 0)} | "
              f"{reads:,} / {requests:,} ({reads / max(requests, 1):.4f}) |")
        w("")
    else:
        w("**TODO — not measured in this run.** " + (worker or {}).get(
            "todo", "bench/worker_bench did not produce results.") + "\n")

    w("## Worker: pushes at scale (workerd via Miniflare)\n")
    if push_bench and push_bench.get("rows"):
        w(f"`bench/worker_push.mjs`: for each size a fresh Worker (local KV and Durable Object) gets "
          f"a paged bundle of hash-only records from empty, then a change of 1,000 revoked + 1,000 "
          f"added (at the 1,000,000-token limit 1,000 others leave the set), "
          f"{push_bench.get('concurrency', 1)} page requests in flight as the CLI sends them. Wall time "
          f"runs from the first request to the commit; a KV write is a page stored (`page:<sha256>`); "
          f"building and signing the bundle is not in it. KV in Miniflare is local: on Cloudflare "
          f"each request also pays the network.\n")
        w("| push | tokens | pages | pages sent | requests | push time (s) | KV writes | bytes sent (MiB) |")
        w("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
        for r in push_bench["rows"]:
            w(f"| {r['push']} | {r['tokens']:,} | {r['pages']:,} | {r['pages_sent']:,} | {r['requests']:,} | "
              f"{r['wall_s']:.1f} | {r['kv_pages_stored']:,} | {r['bytes_sent'] / 2**20:.1f} |")
        w("")
    else:
        w("**TODO — not measured in this run.** bench/worker_push.mjs did not produce results.\n")

    w("## Worker: usage writes (workerd via Miniflare)\n")
    if usage_bench and usage_bench.get("flushes"):
        u = usage_bench
        w(f"`bench/worker_usage.mjs`: one Worker, {u['tokens']} tokens all active in every interval "
          f"(requests cycle over them, 4 in flight, {u['seconds']} s), flush interval "
          f"{u['flush_seconds']} s; rows as the usage store's SQLite reports them written "
          f"(`rowsWritten`, what Durable Object storage bills). Every request was counted once: "
          f"{u['requests']:,} sent, {u['counted']:,} in the signed usage read.\n")
        w("| flushes | rows written | rows per active token per flush | rows per active token per hour, "
          f"default interval ({u['default_flush_seconds']} s), per isolate |")
        w("| ---: | ---: | ---: | ---: |")
        w(f"| {u['flushes']} | {u['rows_written']:,} | {u['rows_per_active_token_per_flush']} | "
          f"{u['rows_per_active_token_per_hour_at_default']} |")
        w("")
    else:
        w("**TODO — not measured in this run.** bench/worker_usage.mjs did not produce results.\n")

    # Targets.
    w("## Targets\n")
    w("The wasm filter's and the Worker's from issue 5; the dynamic module's from its own issue.\n")
    w("| target | figure | verdict |\n| --- | --- | --- |")
    r10 = computed.get(("tokengate-10", "floor-wasm"))
    rbig = computed.get((f"tokengate-{big}", "floor-wasm"))
    m10 = computed.get(("module-10", "api_key_auth-10"))
    mbig = computed.get((f"module-{big}", "api_key_auth-10"))
    if m10 or mbig:
        for r, what in ((m10, "at 10 tokens"), (mbig, f"at {big:,} tokens")):
            if r:
                w(f"| dynamic module CPU/request ≤ {TARGET_MODULE_RATIO} × native api_key_auth "
                  f"(10 keys), {what} | {fmt(r, 3)} | {verdict(r['median'] <= TARGET_MODULE_RATIO)} |")
        scale = computed.get((f"module-{big}", "module-10"))
        if scale:
            w(f"| (dynamic module flat in the token count: {big:,} ÷ 10 tokens ≤ {TARGET_MODULE_RATIO}) "
              f"| {fmt(scale, 3)} | {verdict(scale['median'] <= TARGET_MODULE_RATIO)} |")
    if r10 and rbig:
        w(f"| wasm filter CPU/request ≤ {TARGET_RATIO} × minimal wasm filter, at 10 tokens | "
          f"{fmt(r10, 3)} | {verdict(r10['median'] <= TARGET_RATIO)} |")
        w(f"| … and at {big:,} tokens | {fmt(rbig, 3)} | {verdict(rbig['median'] <= TARGET_RATIO)} |")
        scale = computed.get((f"tokengate-{big}", "tokengate-10"))
        if scale:
            w(f"| (wasm filter flat in the token count: {big:,} ÷ 10 tokens ≤ {TARGET_RATIO}) | {fmt(scale, 3)} | "
              f"{verdict(scale['median'] <= TARGET_RATIO)} |")
    for f in ("module", "wasm"):
        one = footprint.get(f"reload-{f}-c1")
        if one:
            each = " / ".join(f"{ms:.0f}" for ms in one["each_ms"])
            what = "dynamic module" if f == "module" else "(wasm filter, for comparison)"
            w(f"| {what}: {one['bundle_bytes']:,}-byte bundle shown by `bundle.version` ≤ "
              f"{TARGET_MODULE_RELOAD_S * 1000:.0f} ms after the ECDS file's rename, one core, "
              f"`--concurrency 1` (verdict on the median) | median {one['shown']['median']:.0f} ms "
              f"(each push: {each}) | {verdict(one['shown']['median'] <= TARGET_MODULE_RELOAD_S * 1000)} |")
        for c in (1, 4):
            t = footprint.get(f"reload-{f}-c{c}")
            if not t:
                continue
            what = "dynamic module" if f == "module" else "(wasm filter, for comparison)"
            w(f"| {what}: RSS growth ≤ {TARGET_GROWTH_PER_BUNDLE} × the bundle's size on disk, "
              f"`--concurrency {c}` (verdict on the worst push) | {t['growth']['max']:.2f} × worst, "
              f"{t['growth']['median']:.2f} × median ({t['growth_mib']['median']:.1f} MiB) | "
              f"{verdict(t['growth']['max'] <= TARGET_GROWTH_PER_BUNDLE)} |")
    rl = reloads.get("reload")
    if rl:
        w(f"| wasm filter: {rl['n']:,}-token bundle served ≤ {TARGET_RELOAD_S:.0f} s after the push | "
          f"{fmt(rl['served'], 0, ' ms')} (worst {rl['worst_s'] * 1000:.0f} ms) | "
          f"{verdict(rl['worst_s'] <= TARGET_RELOAD_S)} |")
        w(f"| wasm filter: memory growth ≤ {TARGET_MIB_PER_VM:.0f} MB per VM | {rl['per_vm'] * 1.048576:.1f} MB per VM "
          f"({rl['growth']:.0f} MiB / {rl['vms']} VMs) | "
          f"{verdict(rl['per_vm'] * 1.048576 <= TARGET_MIB_PER_VM)} |")
    for key, what, with_memory in [("reload_pb", "binary ECDS file, `*.pb`", True),
                                   ("reload_pb_2cpu", "binary ECDS file, Envoy on both cores", False)]:
        r = reloads.get(key)
        if not r:
            continue
        w(f"| ({what}) served ≤ {TARGET_RELOAD_S:.0f} s | "
          f"{fmt(r['served'], 0, ' ms')} (worst {r['worst_s'] * 1000:.0f} ms) | "
          f"{verdict(r['worst_s'] <= TARGET_RELOAD_S)} |")
        if with_memory:
            w(f"| ({what}) growth ≤ {TARGET_MIB_PER_VM:.0f} MB per VM | "
              f"{r['per_vm'] * 1.048576:.1f} MB per VM | {verdict(r['per_vm'] * 1.048576 <= TARGET_MIB_PER_VM)} |")
    alt = reloads.get("reload_shared")
    if alt:
        w(f"| (alternative measured: shared-data table) served ≤ {TARGET_RELOAD_S:.0f} s | "
          f"{fmt(alt['served'], 0, ' ms')} | {verdict(alt['worst_s'] <= TARGET_RELOAD_S)} |")
        w(f"| (alternative measured: shared-data table) growth ≤ {TARGET_MIB_PER_VM:.0f} MB per VM | "
          f"{alt['per_vm'] * 1.048576:.1f} MB per VM | {verdict(alt['per_vm'] * 1.048576 <= TARGET_MIB_PER_VM)} |")
    if worker and worker.get("configs"):
        for line in worker.get("targets", []):
            w(f"| {line['target']} | {line['figure']} | {verdict(line['ok'])} |")
    else:
        w("| Worker requests/s ≥ the JS Worker's | not measured (see TODO) | — |")
        w("| zero KV reads for garbage tokens | not measured (see TODO) | — |")
    if sizes.get("worker_gzip"):
        w(f"| Worker gzip bundle ≤ {TARGET_GZIP_MIB:g} MiB | {sizes['worker_gzip'] / 1024:.1f} KiB | "
          f"{verdict(sizes['worker_gzip'] / 2**20 <= TARGET_GZIP_MIB)} |")
    else:
        w(f"| Worker gzip bundle ≤ {TARGET_GZIP_MIB:g} MiB | not measured (see TODO) | — |")
    if sizes.get("filter_wasm"):
        w(f"| filter .wasm ≤ {TARGET_WASM_KIB:.0f} KiB | {sizes['filter_wasm'] / 1024:.1f} KiB | "
          f"{verdict(sizes['filter_wasm'] / 1024 <= TARGET_WASM_KIB)} |")
    w("")
    notes = os.path.join(os.path.dirname(os.path.abspath(__file__)), "README.md")
    if os.path.exists(notes):
        w("## Analysis\n")
        w("See [README.md](README.md): what limits the missed targets, the profiles, and what to fix.\n")

    with open(args.md, "w") as f:
        f.write("\n".join(out))

    if envoy:
        try:
            import matplotlib
            matplotlib.use("Agg")
            import matplotlib.pyplot as plt
        except ImportError:
            print("matplotlib missing: no chart")
            return
        labels, med, lo, hi = [], [], [], []
        for c in envoy["configs"]:
            s = summary([r["cpu_us_per_req"] for r in c["runs"]])
            labels.append(c["label"])
            med.append(s["median"])
            lo.append(s["median"] - s["min"])
            hi.append(s["max"] - s["median"])
        colours = ["#888888" if c["name"] == "none" else "#4c72b0" if c["name"].startswith("api_key")
                   else "#55a868" if c["name"] == "floor-wasm"
                   else "#dd8452" if c["name"].startswith("module-")
                   else "#c7c7c7" if c["label"].startswith("diagnostic") else "#c44e52"
                   for c in envoy["configs"]]
        fig, ax = plt.subplots(figsize=(9, 0.55 * len(labels) + 1.5))
        y = list(range(len(labels)))[::-1]
        ax.barh(y, med, xerr=[lo, hi], color=colours, capsize=3)
        ax.set_yticks(y)
        ax.set_yticklabels(labels)
        for yi, m, h in zip(y, med, hi):
            ax.text(m + h, yi, f"  {m:.1f}", va="center", ha="left", fontsize=8)
        ax.set_xlabel("Envoy CPU µs per request (median, min–max over rounds)")
        ax.set_title(f"tokengate bench: Envoy 1.40, --concurrency 1, {envoy['wrk']}\n"
                     f"{machine.get('cpu', '')}, {machine.get('date', '')}", fontsize=9)
        ax.set_xlim(0, max(m + h for m, h in zip(med, hi)) * 1.2)
        fig.tight_layout()
        fig.savefig(args.png, dpi=110)
        print(f"wrote {args.png}")
    print(f"wrote {args.md}")


if __name__ == "__main__":
    main()
