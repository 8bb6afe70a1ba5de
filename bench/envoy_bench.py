#!/usr/bin/env python3
# tokengate benchmark, Envoy part: CPU per request of each auth configuration (both tokengate
# filters: the native dynamic module and the wasm filter), interleaved over rounds, then reload
# time and memory of a 100,000-token bundle. Run by bench/run.sh.
"""Envoy CPU per request, interleaved, plus reload time and memory. Stdlib + `cryptography`.

    target/tools/py-venv/bin/python bench/envoy_bench.py --out target/bench/envoy.json \
        [--rounds 5 --duration 5] [--only module]

(The project venv with the pinned `cryptography`, which scripts/tools.sh `ensure_python` makes.)

Every configuration is its own Envoy (`--concurrency 1`, rendered by envoy/harness.py: the
dynamic module's rows (`module-*`) from the shipped envoy/gateway.yaml, every other row from
envoy/gateway-wasm.yaml, with only the auth filter swapped or, in `*-noguard`, the RBAC guard
removed), all running at once, pinned to CPU 0; wrk (`-t1 -c8`) and a direct-response
upstream Envoy share CPU 1. Each round runs every
configuration once for `--duration` seconds, in a rotated order, so slow drifts of the
machine hit every configuration alike. Per run: Envoy utime+stime (from /proc/PID/stat)
divided by the requests wrk completed, requests/s and p99 latency from wrk.

Then the reload and memory tests, each a fresh Envoy: the wasm filter's (`reload*`, RSS per
VM), and the footprint tests of both filters at `--concurrency 1` and `4`
(`reload-module-c1`, `reload-module-c4`, `reload-wasm-c1`, `reload-wasm-c4`): RSS with no
bundle yet, then pushes of 100,000-token bundles, each timed from the rename of the ECDS file
to the filter's `bundle.version` gauge showing it (polled on the admin endpoint) and to the
first 200 for a token only that bundle holds, and RSS once Envoy is idle and has given freed
memory back (gateway yaml: `memory_allocator_manager`, once a second).

`--only NAME,…` measures only the configurations and reload tests named (`module`: the
dynamic module's rows, with `none` and `api_key_auth-10` for its ratios).

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
import urllib.parse
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

# POLICY with a rate limit on the rule the request matches, one the load never reaches (a
# million per second): every request is counted, none refused.
LIMITED_POLICY = [dict(r, rate_limit={"requests": 1_000_000, "per": "second"})
                  if r["name"] == "orders-read" else r for r in POLICY]


class Tokens:
    """Tokens 0..n-1, made once and shared by every bundle."""

    def __init__(self, n):
        t0 = time.monotonic()
        self.tokens = [make_token(i) for i in range(n)]
        self.records = [record(i, t) for i, t in enumerate(self.tokens)]
        say(f"made {n} tokens in {time.monotonic() - t0:.1f} s")

    def bundle(self, n, version, extra=(), policy=None):
        """Signed bundle text of tokens 0..n-1 plus `extra` token numbers: the v2 envelope
        around the compact payload, whose exact bytes the bench key signs (the optional
        payload members are left out, as the admin writes them when unset)."""
        records = self.records[:n] + [record(i, make_token(i)) for i in extra]
        payload = {"version": version, "issued_at": NOW - 60, "environment": ENVIRONMENT,
                   "target": "envoy", "keys": [PUBLIC_KEY], "policy": {"rules": policy or POLICY},
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
    """One Envoy configuration under test: the wasm gateway (envoy/gateway-wasm.yaml, whose
    filters `filters` may replace) unless `filter="module"` (envoy/gateway.yaml, the module)."""

    def __init__(self, name, label, upstream_port, filters=None, start=TOKENGATE_START,
                 bundle=None, token=None, wasm_path=harness.WASM, ecds_file="tokengate.ecds.json",
                 cpus=ENVOY_CPU, filter="wasm", module_path=harness.MODULE, concurrency=1,
                 usage=True):
        self.name, self.label, self.token, self.bundle = name, label, token, bundle
        self.cpus = cpus
        # Envoy's environment names the environment; the trusted (public) key travels in the
        # ECDS resource, with every bundle pushed (harness.Gateway's trusted_keys): the
        # module's in its bundle reference, the wasm filter's in the VM's key_values.
        env = {"TOKENGATE_ENVIRONMENT": ENVIRONMENT}
        if not usage:
            env["TOKENGATE_USAGE"] = "off"  # per-token usage counting off (both filters)
        code = {"module_path": module_path} if filter == "module" else {"wasm_path": wasm_path}
        gw = harness.Gateway(env=env, concurrency=concurrency, log_level="warning", filter=filter,
                             ecds_file=ecds_file, trusted_keys=[PUBLIC_KEY], **code)

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


def rss_parts_kib(pid):
    """VmRSS and its parts (RssAnon: heap; RssFile: mapped files, Envoy's binary and the
    .so / .wasm; RssShmem), KiB, from /proc/PID/status."""
    parts = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            key = line.split(":", 1)[0]
            if key in ("VmRSS", "RssAnon", "RssFile", "RssShmem"):
                parts[key] = int(line.split()[1])
    return parts


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
    `envoy` = Envoy's own code (HTTP, V8 runtime, the proxy-wasm host calls and the dynamic
    module's callbacks), `libtokengate.so` = the dynamic module's own code, kernel, libc."""
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
                   else "tokengate module (.so)" if dso.startswith("libtokengate")
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


def push_until_served(cfg, text, token, what, gauge_version=None):
    """Writes `text` as cfg's ECDS file (for the module: the bundle file, then the ECDS file
    naming it) and waits until `token` is served. Returns the time of the rename as
    (monotonic, wall clock), and the seconds from it to served: the clock starts at the
    ECDS file's rename, since encoding and writing the files are not Envoy's work. With
    `gauge_version`, first waits until the filter's `bundle.version` gauge shows it and
    returns a third value, the seconds from the rename to that."""
    renamed = []
    cfg.gw.write(text, cfg.gw.trusted_keys,
                 before_rename=lambda: renamed.append((time.monotonic(), time.time())))
    shown = None
    if gauge_version is not None:
        name = cfg.gw.stat_name("bundle.version")
        harness.wait_for(lambda: stat_value(cfg.gw, name) == gauge_version, timeout=120,
                         interval=0.005, what=f"{what}: {name} = {gauge_version}")
        shown = time.monotonic() - renamed[0][0]
    harness.wait_for(lambda: cfg.status(token) == 200, timeout=120, interval=0.005, what=what)
    served = time.monotonic() - renamed[0][0]
    return (renamed[0], served) if gauge_version is None else (renamed[0], served, shown)


def stat_value(gw, name):
    """One stat's value from Envoy's admin, asking for that stat alone: polled every 5 ms,
    a whole /stats dump would cost Envoy's main thread (the one loading the bundle) more."""
    query = urllib.parse.quote("^" + re.escape(name) + "$")
    _, body = gw.admin(f"/stats?format=json&filter={query}")
    found = [s["value"] for s in json.loads(body)["stats"] if s.get("name") == name]
    return found[0] if found else None


def settled_rss(pid, since, settle):
    """Envoy's RSS parts once memory has settled: Envoy idle (wait_idle), at least `settle`
    seconds after `since` (monotonic), then read every second until VmRSS stops falling (by
    ≤ 1 MiB in a second; at most 8 more seconds): the gateway yaml's
    memory_allocator_manager gives freed memory back once a second, up to 64 MiB at a time."""
    wait_idle(pid)
    time.sleep(max(0.0, since + settle - time.monotonic()))
    last = rss_parts_kib(pid)
    for _ in range(8):
        time.sleep(1.0)
        now = rss_parts_kib(pid)
        if last["VmRSS"] - now["VmRSS"] <= 1024:
            return now
        last = now
    return last


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
        (t0, _), took = push_until_served(cfg, text, new, f"{name} v{version} served")
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


def footprint_test(name, upstream_port, filter, concurrency, n, bundles, ecds_file, cpus=ENVOY_CPU,
                   settle=2.0):
    """Reload time and memory of one filter (`filter`: "module" | "wasm") at `concurrency`, a
    fresh gateway pinned to `cpus`: RSS with no bundle yet, then one push per element of
    `bundles`: (version, bundle text of `n` tokens plus a fresh one, the fresh token's number),
    versions rising. Per push: from the rename of the ECDS file to the filter's
    `bundle.version` gauge showing the version (`shown_s`; admin polled every 5 ms) and to
    the first 200 for the fresh token (`served_s`), then RSS once settled (settled_rss)."""
    label = {"module": "dynamic module", "wasm": "wasm filter"}[filter]
    cfg = Config(name, name, upstream_port, filter=filter, ecds_file=ecds_file, cpus=cpus,
                 concurrency=concurrency)
    cfg.start()
    gw, pid = cfg.gw, cfg.gw.pid
    vms = lambda: gw.stat("wasm.envoy.wasm.runtime.v8.active")  # noqa: E731 (None: the module)
    empty = settled_rss(pid, time.monotonic(), settle)
    out = {"filter": filter, "concurrency": concurrency, "cpus": cpus, "ecds_file": ecds_file, "tokens": n,
           "settle_s": settle, "rss_empty_kib": empty["VmRSS"], "rss_empty": empty,
           "vms_empty": vms(), "pushes": []}
    say(f"{name}: {label}, --concurrency {concurrency}, CPU {cpus}: RSS "
        f"{empty['VmRSS'] / 1024:.0f} MiB with no bundle yet")
    for version, text, fresh in bundles:
        (t0, _), served, shown = push_until_served(
            cfg, text, make_token(fresh), f"{name} v{version} served", gauge_version=version)
        idle = wait_idle(pid) - t0
        rss = settled_rss(pid, t0 + served, settle)
        size = len(text.encode())
        push = {"version": version, "bundle_bytes": size, "shown_s": shown, "served_s": served,
                "settled_s": idle, "rss_kib": rss["VmRSS"], "rss": rss,
                "rss_read_s": time.monotonic() - t0, "vms_active": vms(),
                "growth_kib": rss["VmRSS"] - empty["VmRSS"]}
        push["growth_per_bundle"] = push["growth_kib"] * 1024 / size
        out["pushes"].append(push)
        say(f"{name} v{version} ({size / 1e6:.1f} MB bundle): gauge after {shown * 1000:.0f} ms, "
            f"served after {served * 1000:.0f} ms, idle after {idle * 1000:.0f} ms; RSS "
            f"{rss['VmRSS'] / 1024:.0f} MiB, growth {push['growth_kib'] / 1024:.1f} MiB = "
            f"{push['growth_per_bundle']:.2f} × the bundle")
    with open(f"/proc/{pid}/status") as f:
        out["vm_hwm_kib"] = int(next(l for l in f if l.startswith("VmHWM:")).split()[1])
    cfg.gw.close()
    return out


# --- main ------------------------------------------------------------------------------

# The footprint tests' Envoy --concurrency (each a test of both filters).
FOOTPRINT_CONCURRENCY = (1, 4)


def only_names(only, sizes):
    """The names `--only` selects, its groups expanded (an empty set: everything)."""
    groups = {
        # The dynamic module's rows, with what its ratios are taken against.
        "module": ["none", "api_key_auth-10"] + [f"module-{n}" for n in sizes]
                  + ["module-10-noguard", "module-10-nousage", "module-10-limited"]
                  + [f"reload-module-c{c}" for c in FOOTPRINT_CONCURRENCY],
    }
    names = set()
    for item in (i.strip() for i in only.split(",")):
        if item:
            names.update(groups.get(item, [item]))
    return names


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--duration", type=int, default=5, help="seconds per wrk run")
    ap.add_argument("--connections", type=int, default=8)
    ap.add_argument("--warmup", type=int, default=2, help="seconds of unmeasured load per config")
    ap.add_argument("--reload-pushes", type=int, default=3, help="0: no reload or footprint test")
    ap.add_argument("--footprint-pushes", type=int, default=5,
                    help="pushes per footprint test (reload-module-c1 …; 0: none)")
    ap.add_argument("--sizes", default="10,10000,100000")
    ap.add_argument("--null-mb", default="7", metavar="MB,…",
                    help="also measure the reload floor with configurations of these sizes "
                         "(what a more compact bundle encoding would cost Envoy)")
    ap.add_argument("--perf", type=int, default=1, help="1: profile some configs with perf")
    ap.add_argument("--skip-load", action="store_true", help="only the reload and memory tests")
    ap.add_argument("--only", default="", metavar="NAME,…",
                    help="measure only these configurations and reload tests (e.g. "
                         "floor-wasm,tokengate-10,reload-wasm-c1); `module` = the dynamic "
                         "module's rows: none, api_key_auth-10, module-<size>, module-10-noguard, module-10-nousage, module-10-limited, "
                         "reload-module-c1/c4")
    ap.add_argument("--variant", action="append", default=[], metavar="LABEL=WASM",
                    help="also measure this build of the tokengate filter (10 tokens)")
    args = ap.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    largest = max(sizes)
    only = only_names(args.only, sizes)
    wanted = lambda name: not only or name in only  # noqa: E731

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
        configs.append(Config(f"tokengate-{n}", f"tokengate wasm filter, {n:,} tokens", up,
                              bundle=tokens.bundle(n, 1)))
    # The dynamic module (envoy/gateway.yaml as shipped, the RBAC guard included).
    for n in sizes:
        configs.append(Config(f"module-{n}", f"tokengate dynamic module, {n:,} tokens", up,
                              bundle=tokens.bundle(n, 1), filter="module"))
    configs.append(Config("tokengate-10-noguard", "tokengate wasm filter, 10 tokens, no RBAC guard",
                          up, filters="", start=GUARD_START, bundle=tokens.bundle(10, 1)))
    # The module's rows carry the shipped RBAC guard; api_key_auth's have none.
    configs.append(Config("module-10-noguard", "tokengate dynamic module, 10 tokens, no RBAC guard",
                          up, filters="", start=GUARD_START, bundle=tokens.bundle(10, 1),
                          filter="module"))
    # Usage counting off: what counting each request's token costs, side by side.
    configs.append(Config("module-10-nousage", "tokengate dynamic module, 10 tokens, usage counting off",
                          up, bundle=tokens.bundle(10, 1), filter="module", usage=False))
    configs.append(Config("tokengate-10-nousage", "tokengate wasm filter, 10 tokens, usage counting off",
                          up, bundle=tokens.bundle(10, 1), usage=False))
    # The same rule with a rate limit: what counting each request against its limit costs.
    configs.append(Config("module-10-limited", "tokengate dynamic module, 10 tokens, rule with a rate limit",
                          up, bundle=tokens.bundle(10, 1, policy=LIMITED_POLICY), filter="module"))
    configs.append(Config("tokengate-10-limited", "tokengate wasm filter, 10 tokens, rule with a rate limit",
                          up, bundle=tokens.bundle(10, 1, policy=LIMITED_POLICY)))
    for variant in args.variant:  # other builds of the same filter (bench/run.sh makes them)
        label, path = variant.split("=", 1)
        configs.append(Config(f"tokengate-10-{label}", f"tokengate wasm filter, 10 tokens, built {label}",
                              up, bundle=tokens.bundle(10, 1), wasm_path=path))
    for c in configs:
        c.token = valid

    results = {"configs": [], "rounds": args.rounds, "duration_s": args.duration,
               "connections": args.connections, "wrk": f"wrk -t1 -c{args.connections} -d{args.duration}s --latency"}
    # The reload and memory tests, in the order run: (name, where its result goes, test).
    reload_tests = []
    pushes = args.reload_pushes

    def keep(key):
        return lambda result: results.__setitem__(key, result)

    # Footprint, both filters at --concurrency 1 and 4, Envoy on one core: the module's ECDS
    # file in JSON (a small reference), the wasm filter's in binary protobuf (the bundle is
    # inline; `push envoy --file *.pb`, as recommended for large bundles). The same bundles,
    # made once, for every test (each a fresh Envoy).
    footprint_bundles = []

    def bundles():
        if not footprint_bundles:
            say(f"making {args.footprint_pushes} signed {largest:,}-token bundles for the footprint tests")
            footprint_bundles.extend((1 + k, tokens.bundle(largest, 1 + k, [20_000_000 + k]), 20_000_000 + k)
                                     for k in range(args.footprint_pushes))
        return footprint_bundles

    if args.footprint_pushes > 0:
        for filter, ecds in (("module", "tokengate.ecds.json"), ("wasm", "tokengate.ecds.pb")):
            for c in FOOTPRINT_CONCURRENCY:
                name = f"reload-{filter}-c{c}"
                reload_tests.append((name, lambda r, name=name: results.setdefault("footprint", {}).__setitem__(name, r),
                                     lambda name=name, filter=filter, c=c, ecds=ecds:
                                     footprint_test(name, up, filter, c, largest, bundles(), ecds)))
    # The wasm filter, as before: pushes of the largest bundle. The floor of any design that
    # ships tokens in the plugin configuration: a configuration as large as the bundle,
    # which the minimal filter copies in and ignores.
    big = tokens.bundle(largest, 1)
    gate = dict(make=lambda v, extra: tokens.bundle(largest, v, extra),
                first=tokens.bundle(10, 1))
    floor = dict(make=lambda v, extra: make_token(extra[0]) + "\n" + big, first=valid,
                 wasm_path=FLOOR_WASM, filters="", start=GUARD_START)
    binary = dict(ecds_file="tokengate.ecds.pb")  # `push envoy --file *.pb`
    reload_tests += [
        ("reload", keep("reload"), lambda: reload_test("reload", up, largest, pushes, **gate)),
        ("reload-null", keep("reload_null"),
         lambda: reload_test("reload-null", up, largest, pushes, **floor)),
        # The same two with the ECDS file in binary protobuf: Envoy skips its JSON parser.
        ("reload-pb", keep("reload_pb"),
         lambda: reload_test("reload-pb", up, largest, pushes, **gate, **binary)),
        # The same, with Envoy's threads free to use both cores (nothing else runs during a
        # reload test): the main thread's VM and the worker's then configure side by side.
        ("reload-pb-2cpu", keep("reload_pb_2cpu"),
         lambda: reload_test("reload-pb-2cpu", up, largest, pushes, **gate, **binary,
                             cpus=f"{ENVOY_CPU},{LOAD_CPU}")),
    ]
    # Other builds of the filter (bench/run.sh makes them), same reload.
    results["reload_pb_variants"] = {}
    for variant in args.variant:
        label, path = variant.split("=", 1)
        reload_tests.append((
            f"reload-pb-{label}",
            lambda r, label=label: results["reload_pb_variants"].__setitem__(label, r),
            lambda label=label, path=path: reload_test(f"reload-pb-{label}", up, largest, pushes,
                                                       **gate, **binary, wasm_path=path)))
    reload_tests.append(("reload-null-pb", keep("reload_null_pb"),
                         lambda: reload_test("reload-null-pb", up, largest, pushes, **floor, **binary)))
    # The same floor at the sizes a more compact encoding of the same tokens would have:
    # does any JSON encoding of them fit the targets?
    results["reload_null_sizes"] = []
    for mb in [float(m) for m in args.null_mb.split(",") if m]:
        filler = big[: int(mb * 1e6)]
        reload_tests.append((
            f"reload-null-{mb:g}mb", results["reload_null_sizes"].append,
            lambda mb=mb, filler=filler: reload_test(
                f"reload-null-{mb:g}mb", up, largest, pushes,
                make=lambda v, extra: make_token(extra[0]) + "\n" + filler,
                first=valid, wasm_path=FLOOR_WASM, filters="", start=GUARD_START)))
    reload_tests.append(("reload-shared", keep("reload_shared"), lambda: reload_test(
        "reload-shared", up, largest, pushes,
        make=lambda v, extra: tokens.shared_table(largest, v, extra),
        first=tokens.shared_table(10, 1), wasm_path=FLOOR_WASM, filters="", start=GUARD_START)))
    if pushes <= 0:
        reload_tests = []

    unknown = only - {c.name for c in configs} - {name for name, _, _ in reload_tests}
    if unknown:
        upstream.close()
        sys.exit(f"--only: no configuration or reload test named {', '.join(sorted(unknown))} "
                 f"(with these --sizes, --variant, --reload-pushes and --footprint-pushes)")
    configs = [c for c in configs if wanted(c.name)]
    reload_tests = [t for t in reload_tests if wanted(t[0])]
    if args.skip_load:
        configs = []
    say("measuring: " + ", ".join([c.name for c in configs] + [t[0] for t in reload_tests]))
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
                              "tokengate-10", f"tokengate-{largest}", "module-10", f"module-{largest}"):
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
        if reload_tests:
            say("reload and memory")
        for name, store, test in reload_tests:
            store(test())
    finally:
        upstream.close()
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(results, f, indent=1)
    say(f"wrote {args.out}")


if __name__ == "__main__":
    main()
