#!/usr/bin/env python3
# tokengate benchmark, Envoy part: CPU per request of each auth configuration, interleaved
# over rounds, then reload time and memory of a 100,000-token bundle. Run by bench/run.sh.
"""Envoy CPU per request, interleaved, plus reload time and memory. Stdlib + `cryptography`.

    target/tools/py-venv/bin/python bench/envoy_bench.py --out target/bench/envoy.json \
        [--rounds 5 --duration 5]

(The project venv with the pinned `cryptography`, which scripts/tools.sh `ensure_python` makes.)

Every configuration is its own Envoy (`--concurrency 1`, the shipped envoy/gateway.yaml via
envoy/harness.py, only the auth filter swapped), all running at once, pinned to CPU 0; wrk
(`-t1 -c8`) and a direct-response upstream Envoy share CPU 1. Each round runs every
configuration once for `--duration` seconds, in a rotated order, so slow drifts of the
machine hit every configuration alike. Per run: Envoy utime+stime (from /proc/PID/stat)
divided by the requests wrk completed, requests/s and p99 latency from wrk.

Bundles are made here, the way conformance/generate.py makes fixtures (fixed bytes, so every
run has the same tokens): tokengate.bundle/v2 (docs/trust.md), the payload signed with
Ed25519 by the bench key (the seed of bench/src/lib.rs's fixture, 32 bytes of 0xb3). Envoy
holds its public key only, in the ECDS resource with the bundle (TOKENGATE_TRUSTED_KEYS).
"""

import argparse
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import zlib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "envoy"))
import harness  # noqa: E402
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey  # noqa: E402
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat  # noqa: E402

FLOOR_WASM = os.path.join(ROOT, "target/wasm32-wasip1/release/floor_filter.wasm")
# The admin's private key (held by this script alone) and what a gate holds: its public key.
SIGNING_KEY = Ed25519PrivateKey.from_private_bytes(bytes([0xB3]) * 32)
PUBLIC_KEY = SIGNING_KEY.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw).hex()
KEY_ID = "kid_" + hashlib.sha256(bytes.fromhex(PUBLIC_KEY)).hexdigest()[:16]
FORMAT = "tokengate.bundle/v2"
ENVIRONMENT = "bench"
NOW = int(time.time())
DAY = 86_400
PATH = "/api/orders/1"
HOST = "api.internal"
CLK_TCK = os.sysconf("SC_CLK_TCK")
ENVOY_CPU, LOAD_CPU = "0", "1"  # Envoy under test on CPU 0; wrk and the upstream on CPU 1

ALPHABET = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"


def say(message):
    print(f"  [envoy] {message}", flush=True)


# --- tokens and bundles (token format: core/src/token.rs; bundle v2: docs/trust.md) --------

def base62(data, width):
    n, out = int.from_bytes(data, "big"), []
    for _ in range(width):
        n, r = divmod(n, 62)
        out.append(ALPHABET[r])
    return "".join(reversed(out))


def make_token(i):
    """Token number i: `sk_live_` + 43 base62 of 32 fixed bytes + 6 base62 of the CRC32."""
    head = "sk_live_" + base62(hashlib.sha256(b"tokengate bench %d" % i).digest(), 43)
    return head + base62(zlib.crc32(head.encode()).to_bytes(4, "big"), 6)


def bad_checksum(token):
    return token[:-1] + ("A" if token[-1] != "A" else "B")


def record(i, token):
    h = hashlib.sha256(token.encode()).hexdigest()
    return {"name": f"svc-{i:07d}", "hash": h, "scopes": ["orders:read"],
            "created_at": NOW - 30 * DAY}


def rule(name, path, access="token", methods=(), all_of=(), any_of=()):
    return {"name": name, "path": path, "methods": list(methods), "host": None,
            "access": access, "all_of": list(all_of), "any_of": list(any_of), "cf_access": False}


# The conformance policy (conformance/generate.py): the request matches the 5th rule.
POLICY = [
    rule("health", {"exact": "/healthz"}, "public", methods=["GET", "HEAD"]),
    rule("docs", {"prefix": "/docs"}, "public"),
    rule("admin", {"prefix": "/admin"}, all_of=["admin"]),
    rule("orders-write", {"prefix": "/api/orders"}, methods=["POST", "PUT", "DELETE"],
         all_of=["orders:write"]),
    rule("orders-read", {"prefix": "/api/orders"}, methods=["GET", "HEAD"], all_of=["orders:read"]),
    rule("metrics", {"exact": "/metrics"}, any_of=["health:read", "metrics:read"]),
    rule("api", {"prefix": "/api"}),
]


class Tokens:
    """Tokens 0..n-1, made once and shared by every bundle."""

    def __init__(self, n):
        t0 = time.monotonic()
        self.tokens = [make_token(i) for i in range(n)]
        self.records = [record(i, t) for i, t in enumerate(self.tokens)]
        say(f"made {n} tokens in {time.monotonic() - t0:.1f} s")

    def bundle(self, n, version, extra=()):
        """Signed bundle text of tokens 0..n-1 plus `extra` token numbers: the v2 envelope
        around the compact payload, whose exact bytes the bench key signs (the optional
        payload members are left out, as the admin writes them when unset)."""
        records = self.records[:n] + [record(i, make_token(i)) for i in extra]
        payload = {"version": version, "issued_at": NOW - 60, "environment": ENVIRONMENT,
                   "target": "envoy", "keys": [PUBLIC_KEY], "policy": {"rules": POLICY},
                   "credentials": {"sources": ["bearer", "header:x-internal-token",
                                               "header:x-internal-api-key"], "forward": False},
                   "tokens": records}
        text = json.dumps(payload, separators=(",", ":"), ensure_ascii=False)
        signatures = json.dumps([{"key_id": KEY_ID, "signature": SIGNING_KEY.sign(text.encode()).hex()}],
                                separators=(",", ":"))
        return f'{{"format":"{FORMAT}","signatures":{signatures},"payload":{text}}}'

    def shared_table(self, n, version, extra=()):
        """Configuration of the floor filter's `shared` mode: one line per token,
        `<sha256 hex> <record JSON>` (the alternative design: one table per Envoy process)."""
        records = self.records[:n] + [record(i, make_token(i)) for i in extra]
        lines = [f"shared {version}"] + [f"{r['hash']} {json.dumps(r, separators=(',', ':'))}"
                                         for r in records]
        return "\n".join(lines)


# --- gateway.yaml variants (a transform of the rendered file, see harness.Gateway) ---------

TOKENGATE_START = "          - name: tokengate   #"
GUARD_START = "          - name: tokengate.guard"
ROUTER_START = "          - name: envoy.filters.http.router"


def swap_filters(text, replacement, start=TOKENGATE_START):
    """Replaces the http_filters from `start` up to the router with `replacement`."""
    i, j = text.index(start), text.index(ROUTER_START)
    return text[:i] + replacement + text[j:]


def api_key_auth_yaml(tokens):
    creds = "".join(f'              - {{ key: "{t}", client: "svc-{i:07d}" }}\n'
                    for i, t in enumerate(tokens))
    return ("          - name: envoy.filters.http.api_key_auth\n"
            "            typed_config:\n"
            '              "@type": type.googleapis.com/envoy.extensions.filters.http.api_key_auth.v3.ApiKeyAuth\n'
            "              credentials:\n" + creds +
            "              key_sources: [{ header: authorization }]   # strips `Bearer `\n"
            "              forwarding: { header: x-client-id, hide_credentials: true }\n")


def floor_yaml(token):
    return ("          - name: bench.floor\n"
            "            typed_config:\n"
            '              "@type": type.googleapis.com/envoy.extensions.filters.http.wasm.v3.Wasm\n'
            "              config:\n"
            "                name: floor\n"
            "                root_id: floor\n"
            "                failure_policy: FAIL_CLOSED\n"
            "                vm_config:\n"
            "                  vm_id: floor\n"
            "                  runtime: envoy.wasm.runtime.v8\n"
            f"                  code: {{ local: {{ filename: {FLOOR_WASM} }} }}\n"
            "                configuration:\n"
            '                  "@type": type.googleapis.com/google.protobuf.StringValue\n'
            f'                  value: "{token}"\n')


# --- processes -------------------------------------------------------------------------

def pin(pid, cpus):
    subprocess.run(["taskset", "-apc", cpus, str(pid)], check=True, stdout=subprocess.DEVNULL)


class Upstream:
    """A second Envoy answering 200 "ok" itself: a fast upstream (the stdlib echo server of
    the harness would be the bottleneck). Pinned with wrk to CPU 1."""

    def __init__(self):
        self.dir = tempfile.mkdtemp(prefix="tokengate-bench-upstream-")
        self.port, self.admin = harness.free_port(), harness.free_port()
        config = f"""
admin: {{ address: {{ socket_address: {{ address: 127.0.0.1, port_value: {self.admin} }} }} }}
static_resources:
  listeners:
  - name: upstream
    address: {{ socket_address: {{ address: 127.0.0.1, port_value: {self.port} }} }}
    filter_chains:
    - filters:
      - name: envoy.filters.network.http_connection_manager
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
          stat_prefix: upstream
          route_config:
            virtual_hosts:
            - name: all
              domains: ["*"]
              routes:
              - match: {{ prefix: "/" }}
                direct_response: {{ status: 200, body: {{ inline_string: "ok" }} }}
          http_filters:
          - name: envoy.filters.http.router
            typed_config:
              "@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router
"""
        path = os.path.join(self.dir, "upstream.yaml")
        with open(path, "w") as f:
            f.write(config)
        self.proc = subprocess.Popen(
            ["taskset", "-c", LOAD_CPU, harness.envoy_binary(), "-c", path, "--concurrency", "1",
             "--disable-hot-restart", "--log-level", "warning"],
            stdout=subprocess.DEVNULL, stderr=open(os.path.join(self.dir, "envoy.log"), "w"))
        harness._LIVE.append(self.proc)
        harness.wait_for(lambda: self._ready(), timeout=30, what="upstream Envoy")

    def _ready(self):
        import urllib.request
        with urllib.request.urlopen(f"http://127.0.0.1:{self.admin}/ready", timeout=2) as r:
            return r.status == 200

    def close(self):
        harness._stop(self.proc)
        shutil.rmtree(self.dir, ignore_errors=True)


class Config:
    """One Envoy configuration under test."""

    def __init__(self, name, label, upstream_port, filters=None, start=TOKENGATE_START,
                 bundle=None, token=None, wasm_path=harness.WASM, ecds_file="tokengate.ecds.json",
                 cpus=ENVOY_CPU):
        self.name, self.label, self.token, self.bundle = name, label, token, bundle
        self.cpus = cpus
        # Envoy's environment names the environment; the trusted (public) key travels in the
        # ECDS resource, with every bundle pushed (harness.Gateway's trusted_keys).
        env = {"TOKENGATE_ENVIRONMENT": ENVIRONMENT}
        gw = harness.Gateway(env=env, concurrency=1, log_level="warning", wasm_path=wasm_path,
                             ecds_file=ecds_file, trusted_keys=[PUBLIC_KEY])

        def transform(text):
            text = text.replace(f"port_value: {gw.upstream_port}", f"port_value: {upstream_port}")
            if filters is not None:
                text = swap_filters(text, filters, start)
            return text

        gw.transform = transform
        self.gw = gw

    def start(self):
        t0 = time.monotonic()
        self.gw.start()
        if self.bundle is not None:
            outcome = self.gw.push(self.bundle, timeout=120)
            assert outcome == "accepted", self.gw.tail_log()
            harness.wait_for(lambda: self.status(self.token) == 200, timeout=120,
                             what=f"{self.name} serving")
        pin(self.gw.pid, self.cpus)
        say(f"{self.name}: Envoy pid {self.gw.pid} ready in {time.monotonic() - t0:.1f} s")

    def status(self, token):
        return self.gw.request("GET", PATH, [("authorization", f"Bearer {token}")], host=HOST)[0]

    def url(self):
        return f"http://127.0.0.1:{self.gw.listen_port}{PATH}"


def cpu_ticks(pid):
    with open(f"/proc/{pid}/stat") as f:
        rest = f.read().rsplit(")", 1)[1].split()
    return int(rest[11]) + int(rest[12])  # utime + stime (fields 14, 15)


def rss_kib(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


UNITS = {"us": 1e-3, "ms": 1.0, "s": 1e3}


def wrk(url, token, duration, connections):
    cmd = ["taskset", "-c", LOAD_CPU, "wrk", "-t1", f"-c{connections}", f"-d{duration}s",
           "--latency", "--timeout", "2s", "-H", f"Host: {HOST}",
           "-H", f"Authorization: Bearer {token}", url]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=duration + 30).stdout
    m = re.search(r"(\d+) requests in", out)
    p99 = re.search(r"99%\s+([\d.]+)(us|ms|s)\b", out)
    rps = re.search(r"Requests/sec:\s+([\d.]+)", out)
    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    errors = re.search(r"Socket errors: (.*)", out)
    if not (m and p99 and rps):
        raise RuntimeError(f"cannot parse wrk output:\n{out}")
    return {"requests": int(m.group(1)), "rps": float(rps.group(1)),
            "p99_ms": float(p99.group(1)) * UNITS[p99.group(2)],
            "non2xx": int(non2xx.group(1)) if non2xx else 0,
            "socket_errors": errors.group(1) if errors else None}


def measure(config, duration, connections):
    pid = config.gw.pid
    before = cpu_ticks(pid)
    result = wrk(config.url(), config.token, duration, connections)
    ticks = cpu_ticks(pid) - before
    result["cpu_s"] = ticks / CLK_TCK
    result["cpu_us_per_req"] = ticks / CLK_TCK * 1e6 / max(result["requests"], 1)
    return result


# --- where the CPU goes (perf, by binary) ----------------------------------------------

def profile(config, duration, connections, path):
    """perf samples of Envoy during one wrk run, summed by binary. Envoy's binary is stripped
    and V8 writes no perf map, so the split is: `[JIT]` = the filter's compiled wasm code,
    `envoy` = Envoy's own code (HTTP, V8 runtime, the proxy-wasm host calls), kernel, libc."""
    rec = subprocess.Popen(["perf", "record", "-q", "-F", "999", "-p", str(config.gw.pid), "-o", path,
                            "--", "sleep", str(duration)],
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(0.2)
    wrk(config.url(), config.token, duration, connections)
    rec.wait(timeout=duration + 30)
    report = subprocess.run(["perf", "report", "-i", path, "--no-children", "--sort", "dso",
                             "--stdio", "-g", "none"], capture_output=True, text=True).stdout
    shares = {}
    for line in report.splitlines():
        m = re.match(r"\s*([\d.]+)%\s+(.+?)\s*$", line)
        if m and not line.startswith("#"):
            dso = m.group(2)
            key = ("wasm JIT code" if dso.startswith("[JIT]") else "Envoy native" if dso == "envoy"
                   else "kernel" if dso.startswith("[kernel") else "libc and other")
            shares[key] = shares.get(key, 0.0) + float(m.group(1))
    os.unlink(path)
    return shares


# --- reload and memory -----------------------------------------------------------------

def wait_idle(pid, timeout=60.0):
    """Waits until Envoy has used no CPU for two 250 ms periods; returns that moment."""
    quiet, last, deadline = 0, cpu_ticks(pid), time.monotonic() + timeout
    while quiet < 2 and time.monotonic() < deadline:
        time.sleep(0.25)
        now = cpu_ticks(pid)
        quiet, last = (quiet + 1 if now == last else 0), now
    return time.monotonic() - 0.5


def push_until_served(cfg, text, token, wasm_path, what):
    """Writes `text` as cfg's ECDS file and waits until `token` is served. Returns the time of
    the rename as (monotonic, wall clock), and the seconds from it to served: the clock starts
    at the rename, since encoding and writing the file are not Envoy's work."""
    renamed = []
    harness.write_ecds(cfg.gw.ecds_path, text, wasm_path=wasm_path, trusted_keys=cfg.gw.trusted_keys,
                       before_rename=lambda: renamed.append((time.monotonic(), time.time())))
    harness.wait_for(lambda: cfg.status(token) == 200, timeout=120, interval=0.005, what=what)
    return renamed[0], time.monotonic() - renamed[0][0]


def reload_test(name, upstream_port, n, pushes, make, first, wasm_path=harness.WASM, filters=None,
                start=TOKENGATE_START, ecds_file="tokengate.ecds.json", cpus=ENVOY_CPU):
    """A fresh gateway: RSS with no configuration, with a 10-token one (`first`), then `pushes`
    ECDS pushes of n tokens (`make(version, extra)`), each holding a token no earlier one had;
    time from the push (atomic rename) to that token being served."""
    cfg = Config(name, name, upstream_port, wasm_path=wasm_path, filters=filters, start=start,
                 ecds_file=ecds_file, cpus=cpus)
    cfg.start()
    gw, pid = cfg.gw, cfg.gw.pid
    vms = lambda: gw.stat("wasm.envoy.wasm.runtime.v8.active", 0)  # noqa: E731
    time.sleep(1)
    out = {"tokens": n, "rss_empty_kib": rss_kib(pid), "vms_empty": vms()}
    assert gw.push(first) == "accepted"
    time.sleep(1)
    out["rss_10_kib"] = rss_kib(pid)
    out["pushes"] = []
    for k in range(pushes):
        version, fresh = 2 + k, 10_000_000 + k  # token `fresh` is only in this bundle
        text = make(version, [fresh])
        new = make_token(fresh)
        (t0, _), took = push_until_served(cfg, text, new, wasm_path, f"{name} v{version} served")
        settled = wait_idle(pid) - t0  # every VM configured, the canary gone
        push = {"version": version, "served_s": took, "settled_s": settled, "rss_kib": rss_kib(pid),
                "vms_active": vms(), "vms_created": gw.stat("wasm.envoy.wasm.runtime.v8.created", 0),
                "bundle_bytes": len(text)}
        out["pushes"].append(push)
        say(f"{name} v{version} ({n} tokens, {len(text) / 1e6:.1f} MB): served after "
            f"{took * 1000:.0f} ms, Envoy idle after {settled * 1000:.0f} ms; RSS {push['rss_kib'] / 1024:.0f} MiB, {push['vms_active']} VMs")
    with open(f"/proc/{pid}/status") as f:
        out["vm_hwm_kib"] = int(next(l for l in f if l.startswith("VmHWM:")).split()[1])
    cfg.gw.close()
    return out


# --- main ------------------------------------------------------------------------------

def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--duration", type=int, default=5, help="seconds per wrk run")
    ap.add_argument("--connections", type=int, default=8)
    ap.add_argument("--warmup", type=int, default=2, help="seconds of unmeasured load per config")
    ap.add_argument("--reload-pushes", type=int, default=3, help="0: no reload test")
    ap.add_argument("--sizes", default="10,10000,100000")
    ap.add_argument("--null-mb", default="7", metavar="MB,…",
                    help="also measure the reload floor with configurations of these sizes "
                         "(what a more compact bundle encoding would cost Envoy)")
    ap.add_argument("--perf", type=int, default=1, help="1: profile some configs with perf")
    ap.add_argument("--skip-load", action="store_true", help="only the reload and memory tests")
    ap.add_argument("--only", default="", metavar="NAME,…",
                    help="measure only these configurations (e.g. floor-wasm,tokengate-10)")
    ap.add_argument("--variant", action="append", default=[], metavar="LABEL=WASM",
                    help="also measure this build of the tokengate filter (10 tokens)")
    args = ap.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    largest = max(sizes)

    tokens = Tokens(largest)
    valid = tokens.tokens[7]
    upstream = Upstream()
    say(f"upstream Envoy (direct response) on 127.0.0.1:{upstream.port}, CPU {LOAD_CPU}")
    up = upstream.port
    configs = [
        Config("none", "no auth filter", up, filters=""),
        Config("api_key_auth-10", "native api_key_auth, 10 keys", up,
               filters=api_key_auth_yaml(tokens.tokens[:10])),
        Config(f"api_key_auth-{largest}", f"native api_key_auth, {largest:,} keys", up,
               filters=api_key_auth_yaml(tokens.tokens[:largest])),
        Config("floor-wasm", "minimal wasm filter (one header)", up, filters=floor_yaml(valid)),
        Config("floor-abi", "diagnostic: minimal + tokengate's host calls", up,
               filters=floor_yaml("abi " + valid)),
        # The alternative design, via ECDS (its configuration is too big for inline YAML).
        Config(f"shared-{largest}", f"diagnostic: shared-data table, {largest:,} tokens", up,
               filters="", start=GUARD_START, wasm_path=FLOOR_WASM,
               bundle=tokens.shared_table(largest, 1)),
    ]
    for n in sizes:
        configs.append(Config(f"tokengate-{n}", f"tokengate, {n:,} tokens", up,
                              bundle=tokens.bundle(n, 1)))
    configs.append(Config("tokengate-10-noguard", "tokengate, 10 tokens, no RBAC guard", up,
                          filters="", start=GUARD_START, bundle=tokens.bundle(10, 1)))
    for variant in args.variant:  # other builds of the same filter (bench/run.sh makes them)
        label, path = variant.split("=", 1)
        configs.append(Config(f"tokengate-10-{label}", f"tokengate, 10 tokens, built {label}", up,
                              bundle=tokens.bundle(10, 1), wasm_path=path))
    for c in configs:
        c.token = valid
    results = {"configs": [], "rounds": args.rounds, "duration_s": args.duration,
               "connections": args.connections, "wrk": f"wrk -t1 -c{args.connections} -d{args.duration}s --latency"}
    if args.only:
        configs = [c for c in configs if c.name in args.only.split(",")]
    if args.skip_load:
        configs = []
    try:
        for c in configs:
            c.start()
            # Sanity: the valid token passes, a wrong one does not.
            assert c.status(valid) == 200, f"{c.name}: valid token refused"
            if c.name != "none":
                assert c.status(bad_checksum(valid)) == 401, f"{c.name}: bad token passed"
        for c in configs:
            say(f"warm-up {c.name} ({args.warmup} s)")
            wrk(c.url(), valid, args.warmup, args.connections)
        runs = {c.name: [] for c in configs}
        for r in range(args.rounds if configs else 0):
            order = configs[r % len(configs):] + configs[:r % len(configs)]
            for c in order:
                m = measure(c, args.duration, args.connections)
                m["round"] = r
                runs[c.name].append(m)
                say(f"round {r + 1}/{args.rounds} {c.name:24s} {m['cpu_us_per_req']:7.1f} µs CPU/req "
                    f"{m['rps']:8.0f} req/s  p99 {m['p99_ms']:.2f} ms"
                    + (f"  NON-2XX {m['non2xx']}" if m["non2xx"] else ""))
        if shutil.which("perf") and args.perf:
            for c in configs:
                if c.name in ("none", "floor-wasm", "floor-abi", f"shared-{largest}",
                              "tokengate-10", f"tokengate-{largest}"):
                    shares = profile(c, args.duration, args.connections,
                                     os.path.join(tempfile.gettempdir(), f"bench-{c.name}.perf"))
                    results.setdefault("perf", {})[c.name] = shares
                    say(f"perf {c.name}: " + ", ".join(f"{k} {v:.1f}%" for k, v in sorted(shares.items())))
        for c in configs:
            s = c.gw.stats()
            results["configs"].append({
                "name": c.name, "label": c.label, "runs": runs[c.name],
                "rss_kib": rss_kib(c.gw.pid),
                "wasm_vms_active": s.get("wasm.envoy.wasm.runtime.v8.active"),
                "guard_denied": s.get("http.gateway.rbac.tokengate_guard.denied"),
            })
    finally:
        for c in configs:
            c.gw.close()
    try:
        if args.reload_pushes > 0:
            say("reload and memory")
            # tokengate: pushes of the largest bundle. The floor of any design that ships
            # tokens in the plugin configuration: a configuration as large as the bundle,
            # which the minimal filter copies in and ignores.
            big = tokens.bundle(largest, 1)
            gate = dict(make=lambda v, extra: tokens.bundle(largest, v, extra),
                        first=tokens.bundle(10, 1))
            floor = dict(make=lambda v, extra: make_token(extra[0]) + "\n" + big, first=valid,
                         wasm_path=FLOOR_WASM, filters="", start=GUARD_START)
            binary = dict(ecds_file="tokengate.ecds.pb")  # `push envoy --file *.pb`
            results["reload"] = reload_test("reload", up, largest, args.reload_pushes, **gate)
            results["reload_null"] = reload_test("reload-null", up, largest, args.reload_pushes,
                                                 **floor)
            # The same two with the ECDS file in binary protobuf: Envoy skips its JSON parser.
            results["reload_pb"] = reload_test("reload-pb", up, largest, args.reload_pushes,
                                               **gate, **binary)
            # The same, with Envoy's threads free to use both cores (nothing else runs during
            # a reload test): the main thread's VM and the worker's then configure side by side.
            results["reload_pb_2cpu"] = reload_test(
                "reload-pb-2cpu", up, largest, args.reload_pushes, **gate, **binary,
                cpus=f"{ENVOY_CPU},{LOAD_CPU}")
            # Other builds of the filter (bench/run.sh makes them), same reload.
            results["reload_pb_variants"] = {}
            for variant in args.variant:
                label, path = variant.split("=", 1)
                results["reload_pb_variants"][label] = reload_test(
                    f"reload-pb-{label}", up, largest, args.reload_pushes, **gate, **binary,
                    wasm_path=path)
            results["reload_null_pb"] = reload_test(
                "reload-null-pb", up, largest, args.reload_pushes, **floor, **binary)
            # The same floor at the sizes a more compact encoding of the same tokens would
            # have: does any JSON encoding of them fit the targets?
            results["reload_null_sizes"] = []
            for mb in [float(m) for m in args.null_mb.split(",") if m]:
                filler = big[: int(mb * 1e6)]
                results["reload_null_sizes"].append(reload_test(
                    f"reload-null-{mb:g}mb", up, largest, args.reload_pushes,
                    make=lambda v, extra, filler=filler: make_token(extra[0]) + "\n" + filler,
                    first=valid, wasm_path=FLOOR_WASM, filters="", start=GUARD_START))
            results["reload_shared"] = reload_test(
                "reload-shared", up, largest, args.reload_pushes,
                make=lambda v, extra: tokens.shared_table(largest, v, extra),
                first=tokens.shared_table(10, 1), wasm_path=FLOOR_WASM, filters="", start=GUARD_START)
    finally:
        upstream.close()
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(results, f, indent=1)
    say(f"wrote {args.out}")


if __name__ == "__main__":
    main()
