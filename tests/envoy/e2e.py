#!/usr/bin/env python3
# End-to-end tests of tokengate in a real Envoy: the conformance vectors, the CLI lifecycle,
# bad pushes, hot reload under load, the access log and the stats. Stdlib only.
"""Run: python3 tests/envoy/e2e.py   (needs: the built filter, target/debug/tokengate, Envoy
from scripts/tools.sh). Prints one line per test and a closing `N passed, M failed`."""

import base64
import hashlib
import hmac
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
import traceback

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.join(ROOT, "envoy"))
from harness import WASM, Gateway, ecds_resource, write_ecds  # noqa: E402

CLI = os.environ.get("TOKENGATE_BIN", os.path.join(ROOT, "target", "debug", "tokengate"))
VECTORS = json.load(open(os.path.join(ROOT, "conformance", "vectors.json")))
ECDS = "extension_config_discovery.http_filter.tokengate."


# --- the conformance comparison, as conformance/src/lib.rs `check` -----------------------

def header_values(pairs, name):
    return [v for n, v in pairs if n.lower() == name]


def check_case(case, status, response_headers, body, upstream):
    expect, problems = case["expect"], []
    if status != expect["status"]:
        problems.append(f"status {status} (expected {expect['status']})")
    for name, want in expect.get("response_headers", {}).items():
        got = header_values(response_headers, name)
        if got != [want]:
            problems.append(f"response header {name}: {got} (expected [{want!r}])")
    for name in expect.get("response_absent", []):
        if header_values(response_headers, name):
            problems.append(f"response header {name} present")
    if expect.get("error"):
        try:
            parsed = json.loads(body)
        except ValueError:
            parsed = {}
        if parsed.get("error") != expect["error"] or "error_description" not in parsed:
            problems.append(f"body {body[:200]!r} (expected error {expect['error']!r})")
    if (upstream is not None) != (expect["status"] == 200):
        problems.append(f"upstream reached: {upstream is not None}")
    if upstream is not None:
        for name, want in expect.get("upstream_headers", {}).items():
            got = header_values(upstream["headers"], name)
            if got != [want]:
                problems.append(f"upstream header {name}: {got} (expected [{want!r}])")
        for name in expect.get("upstream_absent", []):
            if header_values(upstream["headers"], name):
                problems.append(f"upstream header {name} reached the upstream")
        want_path = expect.get("upstream_path") or case["request"]["path"]
        if upstream["path"] != want_path:
            problems.append(f"upstream path {upstream['path']!r} (expected {want_path!r})")
    return problems


def retime(bundle, offset, version):
    """The fixture bundle moved by `offset` seconds, with a new version, re-signed with the
    fixture key (canonical bytes: compact JSON in field order, without the signature)."""
    b = json.loads(json.dumps(bundle))
    b.pop("signature")
    b["version"] = version
    b["issued_at"] += offset
    if b["revoke_all_at"] is not None:
        b["revoke_all_at"] += offset
    for t in b["tokens"]:
        for field in ("created_at", "not_before", "expires_at", "revoked_at", "grace_until"):
            if t.get(field) is not None:
                t[field] += offset
        if t.get("previous"):
            t["previous"]["grace_until"] += offset
    canonical = json.dumps(b, separators=(",", ":"), ensure_ascii=False).encode()
    b["signature"] = hmac.new(bytes.fromhex(VECTORS["key"]), canonical, hashlib.sha256).hexdigest()
    return json.dumps(b, separators=(",", ":"), ensure_ascii=False)


def send(gw, case):
    r = case["request"]
    status, headers, body = gw.request(r["method"], r["path"], [tuple(h) for h in r["headers"]],
                                       host=r["authority"])
    # The echo upstream puts what it received in `x-echo`; the gate never sets that header.
    echoed = header_values(headers, "x-echo")
    upstream = json.loads(base64.b64decode(echoed[0])) if echoed else None
    return status, headers, body.decode(errors="replace"), upstream


def counter(case):
    outcome = "allowed" if case["expect"]["status"] == 200 else "denied"
    return f"wasmcustom.tokengate.{outcome}.{case['expect']['reason']}"


def run_case(gw, case):
    name = counter(case)
    before = gw.stat(name, 0)
    status, headers, body, upstream = send(gw, case)
    if case.get("proxy_may_reject") and status == 400 and upstream is None:
        return []  # Envoy's own HTTP layer refused it before the gate; nothing passed
    problems = check_case(case, status, headers, body, upstream)
    after = gw.stat(name, 0)
    if after != before + 1:
        problems.append(f"counter {name} moved {after - before} (expected 1)")
    return problems


# --- the tests ---------------------------------------------------------------------------

def test_every_conformance_vector_through_envoy():
    env = {"TOKENGATE_SIGNING_KEY": VECTORS["key"], "TOKENGATE_ENVIRONMENT": VECTORS["environment"]}
    failures, version = [], 1000
    with Gateway(env=env) as gw:
        groups = {}
        for case in VECTORS["cases"]:
            if not case["clock_edge"]:
                groups.setdefault((case["bundle"], case["now"]), []).append(case)
        # Cases away from a time boundary: the bundle is moved so `now` is the real clock.
        for (bundle, now), cases in groups.items():
            version += 1
            text = retime(VECTORS["bundles"][bundle]["envoy"], int(time.time()) - now, version)
            assert gw.push(text) == "accepted", gw.tail_log()
            for case in cases:
                failures += [f"{case['name']}: {p}" for p in run_case(gw, case)]
        # Cases on a one-second boundary: start early in a second, move the bundle so `now`
        # is this second, and retry if the request crossed into the next one.
        for case in (c for c in VECTORS["cases"] if c["clock_edge"]):
            for _attempt in range(5):
                while time.time() % 1 > 0.3:
                    time.sleep(0.01)
                second = int(time.time())
                version += 1
                text = retime(VECTORS["bundles"][case["bundle"]]["envoy"], second - case["now"], version)
                assert gw.push(text) == "accepted", gw.tail_log()
                problems = run_case(gw, case)
                if int(time.time()) == second:
                    break
            failures += [f"{case['name']}: {p}" for p in problems]
    assert not failures, f"{len(failures)} of {len(VECTORS['cases'])} cases failed:\n  " + "\n  ".join(failures)
    return f"{len(VECTORS['cases'])} cases"


class Operator:
    """A tokengate store in a temporary directory, driven through the real CLI."""

    def __init__(self, environment="e2e"):
        self.dir = tempfile.mkdtemp(prefix="tokengate-e2e-")
        self.env = dict(os.environ, TOKENGATE_STORE=os.path.join(self.dir, "tokengate.db"),
                        TOKENGATE_ACTOR="e2e")
        self.env.pop("TOKENGATE_SIGNING_KEY", None)
        self.run("init", "--environment", environment)
        self.key = open(os.path.join(self.dir, "tokengate.key")).read().strip()
        self.environment = environment

    def run(self, *args, stdin="", check=True, env=None):
        proc = subprocess.run([CLI, *args], input=stdin, capture_output=True, text=True,
                              env=env or self.env, timeout=60)
        if check and proc.returncode != 0:
            raise AssertionError(f"tokengate {' '.join(args)} failed: {proc.stderr}")
        return proc

    def create(self, name, *args):
        return self.run("create", name, *args).stdout.strip()

    def push(self, gw, *args, check=True):
        return self.run("push", "envoy", "--file", gw.ecds_path, "--wasm", WASM, *args, check=check)

    def gateway(self, **kw):
        return Gateway(env={"TOKENGATE_SIGNING_KEY": self.key, "TOKENGATE_ENVIRONMENT": self.environment}, **kw)


def bearer(token):
    return [("authorization", f"Bearer {token}")]


def status_of(gw, token, path="/api/x"):
    return gw.request("GET", path, bearer(token))[0]


def eventually(predicate, within, what):
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        if predicate():
            return time.monotonic() - (deadline - within)
        time.sleep(0.02)
    raise AssertionError(f"{what} did not happen within {within}s")


def test_create_push_200_then_revoke_push_401_within_2s_same_pid():
    op = Operator()
    with op.gateway() as gw:
        assert status_of(gw, "anything") == 503, "before the first push the gate must fail closed"
        token = op.create("ci-deploy", "--scopes", "deploy:write")
        pid = gw.pid
        op.push(gw)
        took_allow = eventually(lambda: status_of(gw, token) == 200, 2.0, "200 after push")
        op.run("revoke", "ci-deploy", "--reason", "e2e")
        op.push(gw)
        took_deny = eventually(lambda: status_of(gw, token) == 401, 2.0, "401 after revoke")
        assert gw.pid == pid and gw.envoy.poll() is None, "Envoy restarted"
    return f"served after {took_allow * 1000:.0f} ms, revoked after {took_deny * 1000:.0f} ms"


def test_rotate_with_grace_both_pass_then_only_the_new_one():
    op = Operator()
    with op.gateway() as gw:
        old = op.create("svc")
        op.push(gw)
        eventually(lambda: status_of(gw, old) == 200, 2.0, "old token served")
        new = op.run("rotate", "svc", "--grace", "3s").stdout.strip()
        op.push(gw)
        eventually(lambda: status_of(gw, new) == 200, 2.0, "new token served")
        assert status_of(gw, old) == 200, "the old token must pass during grace"
        echoed = json.loads(gw.request("GET", "/api/x", bearer(old))[2])
        assert header_values(echoed["headers"], "x-tokengate-subject") == ["svc"]
        eventually(lambda: status_of(gw, old) == 401, 6.0, "old token refused after grace")
        assert status_of(gw, new) == 200


def test_revoke_all_fails_every_token():
    op = Operator()
    with op.gateway() as gw:
        tokens = [op.create(f"svc-{i}") for i in range(3)]
        op.push(gw)
        eventually(lambda: all(status_of(gw, t) == 200 for t in tokens), 2.0, "tokens served")
        op.run("revoke-all", "--reason", "incident", "--yes")
        op.push(gw)
        eventually(lambda: all(status_of(gw, t) == 401 for t in tokens), 2.0, "all revoked")
        fresh = op.create("after-incident")
        op.push(gw)
        eventually(lambda: status_of(gw, fresh) == 200, 2.0, "new token after revoke-all")


def test_bad_pushes_are_refused_by_the_cli_and_by_envoy():
    op = Operator()
    with op.gateway() as gw:
        token = op.create("svc")
        old_bundle = os.path.join(op.dir, "old.json")
        op.run("bundle", "--target", "envoy", "--out", old_bundle)
        op.push(gw)
        eventually(lambda: status_of(gw, token) == 200, 2.0, "served")
        op.run("revoke", "svc", "--reason", "e2e")
        op.push(gw)
        eventually(lambda: status_of(gw, token) == 401, 2.0, "revoked")
        served = open(gw.ecds_path).read()
        good = json.loads(open(old_bundle).read())

        tampered = os.path.join(op.dir, "tampered.json")
        open(tampered, "w").write(json.dumps({**good, "version": good["version"] + 100}))
        other_key = os.path.join(op.dir, "other-key.json")
        op.run("bundle", "--target", "envoy", "--out", other_key,
               env=dict(op.env, TOKENGATE_SIGNING_KEY=hashlib.sha256(b"x").hexdigest()))
        garbage = os.path.join(op.dir, "garbage.json")
        open(garbage, "w").write("{not json")
        for path, why in [(tampered, "signature"), (other_key, "signature"),
                          (old_bundle, "not newer"), (garbage, "not a valid")]:
            proc = op.push(gw, "--bundle", path, check=False)
            assert proc.returncode == 2 and why in proc.stderr, (path, proc.stderr)
            assert open(gw.ecds_path).read() == served, "a refused push changed the ECDS file"

        # Forced onto disk anyway: Envoy (the filter's canary VM) refuses; v-current serves.
        s = gw.stats()
        rejected, refused = s.get(ECDS + "update_rejected", 0), s.get("wasmcustom.tokengate.bundle.refused", 0)
        for text in [json.dumps({**good, "version": good["version"] + 100}), open(other_key).read(),
                     open(old_bundle).read(), "{not json"]:
            before = gw.stat(ECDS + "update_rejected", 0) + gw.stat(ECDS + "update_success", 0)
            write_ecds(gw.ecds_path, text, wasm_path=WASM)
            eventually(lambda: gw.stat(ECDS + "update_rejected", 0) + gw.stat(ECDS + "update_success", 0) > before,
                       3.0, "Envoy saw the file")
            assert status_of(gw, token) == 401, "the revoked token passed after a bad forced push"
            assert gw.request("GET", "/healthz")[0] == 200, "the previous bundle stopped serving"
        s = gw.stats()
        assert s[ECDS + "update_rejected"] >= rejected + 4, s
        assert s["wasmcustom.tokengate.bundle.refused"] >= refused + 4, s
        assert "tokengate_bundle_refused" in gw.prometheus()


def test_binary_ecds_file_reloads_like_json():
    """`push envoy --file X.pb` writes binary protobuf (Envoy skips its JSON parser); Envoy's
    own config dump must show exactly the resource the JSON file would hold. The harness's
    encoder (the bench's) must write what Envoy reads too."""
    op = Operator()
    wasm = os.path.realpath(WASM)  # the CLI writes the canonical path
    with op.gateway(ecds_file="tokengate.ecds.pb") as gw:
        assert status_of(gw, "anything") == 503, "the harness's empty .pb: fail closed"
        token = op.create("svc")
        op.push(gw)
        eventually(lambda: status_of(gw, token) == 200, 2.0, "served from the CLI's .pb")
        assert open(gw.ecds_path, "rb").read(1) != b"{", "the CLI wrote JSON into a .pb"
        dumped = json.loads(gw.admin("/config_dump?resource=ecds_filters")[1])["configs"]
        assert len(dumped) == 1, dumped
        served = dumped[0]["ecds_filter"]["typed_config"]["config"]["configuration"]["value"]
        expected = ecds_resource(served, wasm_path=wasm)
        assert dumped[0]["ecds_filter"] == expected["resources"][0]
        assert dumped[0]["version_info"] == expected["version_info"] == "1"

        # A newer bundle through the harness's encoder: the token revoked, another one issued.
        op.run("revoke", "svc", "--reason", "e2e")
        fresh = op.create("svc-2")
        signed = os.path.join(op.dir, "next.json")
        op.run("bundle", "--target", "envoy", "--out", signed)
        write_ecds(gw.ecds_path, open(signed).read(), wasm_path=wasm)
        eventually(lambda: status_of(gw, fresh) == 200, 2.0, "served from the harness's .pb")
        assert status_of(gw, token) == 401, "revoked through a .pb"

        # Tampered, in a well-formed .pb: the filter (not Envoy's parser) refuses it.
        refused = gw.stat("wasmcustom.tokengate.bundle.refused", 0)
        tampered = json.loads(open(signed).read())
        tampered["version"] += 100
        write_ecds(gw.ecds_path, json.dumps(tampered), wasm_path=wasm)
        eventually(lambda: gw.stat("wasmcustom.tokengate.bundle.refused", 0) > refused, 3.0,
                   "the filter refused the tampered bundle")
        assert status_of(gw, token) == 401 and status_of(gw, fresh) == 200, "the previous bundle stopped serving"


def test_hot_reload_under_load_drops_nothing():
    op = Operator()
    with op.gateway() as gw:
        token = op.create("load")
        op.push(gw)
        eventually(lambda: status_of(gw, token) == 200, 2.0, "served")
        stop, results, lock = threading.Event(), {}, threading.Lock()
        deadline = time.monotonic() + 60  # bounded in time ...
        max_requests = 50_000  # ... and in count

        def load():
            import http.client
            conn = http.client.HTTPConnection("127.0.0.1", gw.listen_port, timeout=5)
            while not stop.is_set() and time.monotonic() < deadline:
                with lock:
                    if sum(results.values()) >= max_requests:
                        return
                try:
                    conn.request("GET", "/api/load", headers={"authorization": f"Bearer {token}"})
                    resp = conn.getresponse()
                    resp.read()
                    status = resp.status
                except OSError as e:
                    status = f"error {type(e).__name__}"
                    conn = http.client.HTTPConnection("127.0.0.1", gw.listen_port, timeout=5)
                with lock:
                    results[status] = results.get(status, 0) + 1

        threads = [threading.Thread(target=load) for _ in range(4)]
        for t in threads:
            t.start()
        pid = gw.pid
        for i in range(20):
            op.create(f"extra-{i}")
            pushed = op.push(gw).stderr
            time.sleep(0.05)
        last_version = int(pushed.split("pushed bundle version ")[1].split()[0])
        time.sleep(0.5)
        stop.set()
        for t in threads:
            t.join()
        assert gw.pid == pid
        total = sum(results.values())
        assert results.get(200, 0) == total and total > 100, f"statuses during 20 pushes: {results}"
        assert gw.stat("wasmcustom.tokengate.bundle.version") == last_version
    return f"{total} requests, all 200, over 20 pushes"


def test_access_log_and_stats_for_allowed_and_denied():
    op = Operator()
    with op.gateway() as gw:
        token = op.create("observed", "--scopes", "orders:read")
        op.push(gw)
        eventually(lambda: status_of(gw, token) == 200, 2.0, "served")
        before = gw.stats()
        assert gw.request("GET", "/api/orders", bearer(token))[0] == 200
        assert gw.request("GET", f"/api/orders?access_token={token}", bearer(token[:-1] + "x"))[0] == 401
        after = gw.stats()
        for name in ("wasmcustom.tokengate.allowed.valid", "wasmcustom.tokengate.denied.checksum"):
            assert after.get(name, 0) == before.get(name, 0) + 1, name
        eventually(lambda: len(gw.access_log_lines()) >= 3, 3.0, "access log lines")
        lines = gw.access_log_lines()
        allowed = [l for l in lines if "reason=valid" in l and "subject=observed" in l]
        denied = [l for l in lines if "reason=checksum" in l and " 401 " in l]
        assert allowed and denied, lines
        assert not any(token in l or token[:-1] in l for l in lines), "a token reached the access log"
        prometheus = gw.prometheus()
        assert "tokengate_allowed_valid" in prometheus and "tokengate_bundle_version" in prometheus
    return allowed[-1].split('"', 1)[-1].strip()


def test_every_shipped_envoy_config_validates():
    from harness import envoy_binary
    env = dict(os.environ, TOKENGATE_SIGNING_KEY="0" * 64, TOKENGATE_ENVIRONMENT="demo")
    proc = subprocess.run([envoy_binary(), "--mode", "validate", "-c", "envoy/gateway.yaml"],
                          cwd=ROOT, capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr


TESTS = [v for k, v in list(globals().items()) if k.startswith("test_")]

if __name__ == "__main__":
    wanted = sys.argv[1:]
    passed = failed = 0
    for test in TESTS:
        if wanted and not any(w in test.__name__ for w in wanted):
            continue
        started = time.monotonic()
        try:
            note = test()
            passed += 1
            print(f"ok    {test.__name__} ({time.monotonic() - started:.1f}s){': ' + note if note else ''}", flush=True)
        except Exception:  # noqa: BLE001 - every failure is reported, then the next test runs
            failed += 1
            print(f"FAIL  {test.__name__}\n{traceback.format_exc()}", flush=True)
    print(f"envoy e2e: {passed} passed, {failed} failed")
    sys.exit(1 if failed else 0)
