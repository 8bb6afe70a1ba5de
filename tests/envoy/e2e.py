#!/usr/bin/env python3
# End-to-end tests of tokengate in a real Envoy, with each of its two filters (the native
# dynamic module, the shipped default, then the proxy-wasm filter): the conformance vectors,
# the CLI lifecycle, admin key rotation, that no gate holds a private key, bad pushes, the
# module's bundle files, hot reload under load, the access log and the stats, underscore and
# comma-joined headers, push confirmation and `tokengate status`, usage, rate limits, signed
# tokens (issuers, mint, revoke by jti, a missing HS256 secret), secrets typed in a
# terminal. Stdlib + `cryptography` (Ed25519, to re-sign fixtures and to forge bundles the
# way an attacker would).
"""Run: python3 tests/envoy/e2e.py [--filter module|wasm] [NAME...]

Needs the built filters (target/native/libtokengate.so, the .wasm), target/debug/tokengate
and Envoy from scripts/tools.sh. Every test runs once per filter, module first, unless it
is about one filter only (`@only`) or runs no filter at all (`@once`). Pick one filter with
--filter or TOKENGATE_ENVOY_FILTER=module|wasm, tests by any part of their names (NAME).
Prints one line per test run, `[filter]` first, and a closing `N passed, M failed`."""

import argparse
import base64
import calendar
import hashlib
import http.client
import json
import os
import pty
import re
import select
import signal
import subprocess
import sys
import tempfile
import termios
import threading
import time
import traceback

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.join(ROOT, "envoy"))
from harness import (FILTERS, GATEWAY_YAMLS, MODULE, MODULE_REL, TRUSTED_KEYS_VARIABLE,  # noqa: E402
                     WASM, Gateway, ecds_resource, envoy_binary, module_reference, sha256_hex,
                     write_atomic, write_bundle_file, write_ecds, write_resource)

CLI = os.environ.get("TOKENGATE_BIN", os.path.join(ROOT, "target", "debug", "tokengate"))
VECTORS = json.load(open(os.path.join(ROOT, "conformance", "vectors.json")))
SHIPPED_ECDS = os.path.join(ROOT, "envoy", "run", "tokengate.ecds.json")
ECDS = "extension_config_discovery.http_filter.tokengate."
# The filter's own stats (gw.stat_name() gives each filter's full name).
VERSION = "bundle.version"  # gauge: the bundle it serves
REFUSED = "bundle.refused"  # counter: bundles it refused
# The filter the running test's gateways run and pushes name; main() sets it per pass.
FILTER = FILTERS[0]
CODE = {"module": MODULE, "wasm": WASM}  # each filter's code, as pushes name it


def only(*filters):
    """Marks a test that is about these filters alone (it runs in their passes only)."""
    def mark(test):
        test.filters = filters
        return test
    return mark


def once(test):
    """Marks a test that runs no filter (or checks every filter at once): it runs once."""
    test.filters = ()
    return test


def gateway(**kw):
    """A Gateway running this pass's filter."""
    return Gateway(filter=FILTER, **kw)


# --- Ed25519 and bundle v2, as docs/trust.md defines them --------------------------------

FORMAT = "tokengate.bundle/v2"
PAYLOAD_ORDER = ("version", "issued_at", "environment", "target", "keys", "policy",
                 "credentials", "tokens", "revoke_all_at", "cloudflare_access", "issuers",
                 "revoked_jtis")
# The conformance fixture keys (conformance/generate.py): A is the one gates trust, B the new
# key of its rotation bundle. Known here so a re-timed fixture is signed by the same keys.
FIXTURE_SEEDS = [hashlib.sha256(b"tokengate conformance key A").digest(),
                 hashlib.sha256(b"tokengate conformance key B").digest()]
HEX64 = re.compile(r"[0-9a-f]{64}")
KEY_ID = re.compile(r"kid_[0-9a-f]{16}")


def seed_bytes(seed):
    return bytes.fromhex(seed) if isinstance(seed, str) else seed


def public_key(seed):
    """The public key (64 hex) of a 32-byte seed (bytes or 64 hex)."""
    return Ed25519PrivateKey.from_private_bytes(seed_bytes(seed)).public_key().public_bytes(
        Encoding.Raw, PublicFormat.Raw).hex()


def key_id(public_hex):
    return "kid_" + hashlib.sha256(bytes.fromhex(public_hex)).hexdigest()[:16]


def compact(value):
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False)


def publish(payload, seeds):
    """The published bundle text: `payload` in the admin's member order, compact, signed by
    each seed over the payload's exact bytes (nothing else), which go in verbatim."""
    unknown = set(payload) - set(PAYLOAD_ORDER)
    assert not unknown, f"payload members a gate would refuse: {unknown}"
    text = compact({k: payload[k] for k in PAYLOAD_ORDER if payload.get(k) is not None})
    signatures = [{"key_id": key_id(public_key(seed)), "signature":
                   Ed25519PrivateKey.from_private_bytes(seed_bytes(seed)).sign(text.encode()).hex()}
                  for seed in seeds]
    return f'{{"format":"{FORMAT}","signatures":{compact(signatures)},"payload":{text}}}'


def split_keys(text):
    """A key set as text (commas and/or white space) as a list."""
    return [k for k in re.split(r"[\s,]+", text or "") if k]


def signers(bundle_text):
    return {s["key_id"] for s in json.loads(bundle_text)["signatures"]}


def forged_bundle(served_text, seed, token, version):
    """What an attacker holding `seed` would publish: the served payload one version on, with
    `seed`'s public key as the admin's keys and a record granting `token` every scope."""
    payload = json.loads(served_text)["payload"]
    now = int(time.time())
    payload.update(version=version, issued_at=now, keys=[public_key(seed)])
    payload["tokens"] = payload["tokens"] + [{
        "name": "intruder", "hash": hashlib.sha256(token.encode()).hexdigest(),
        "scopes": ["*"], "created_at": now - 1}]
    return publish(payload, [seed])


def hex_strings(text):
    """Every 64-character window of every run of at least 64 hex digits (lower-cased): a
    32-byte key could hide inside a longer run, a signature for one."""
    found = set()
    for run in re.findall(r"[0-9a-fA-F]{64,}", text):
        run = run.lower()
        found.update(run[i:i + 64] for i in range(len(run) - 63))
    return found


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


def retime(bundle_text, offset, version):
    """The fixture bundle moved by `offset` seconds, with a new version, published again and
    signed by the fixture keys that signed it (the published text is never re-serialised:
    the payload is rebuilt and signed anew)."""
    by_id = {key_id(public_key(seed)): seed for seed in FIXTURE_SEEDS}
    envelope = json.loads(bundle_text)
    payload = envelope["payload"]
    payload["version"] = version
    payload["issued_at"] += offset
    if payload.get("revoke_all_at") is not None:
        payload["revoke_all_at"] += offset
    for t in payload["tokens"]:
        for field in ("created_at", "not_before", "expires_at", "revoked_at", "grace_until"):
            if t.get(field) is not None:
                t[field] += offset
        if t.get("previous"):
            t["previous"]["grace_until"] += offset
    return publish(payload, [by_id[s["key_id"]] for s in envelope["signatures"]])


def send(gw, case):
    r = case["request"]
    status, headers, body = gw.request(r["method"], r["path"], [tuple(h) for h in r["headers"]],
                                       host=r["authority"])
    # The echo upstream puts what it received in `x-echo`; the gate never sets that header.
    echoed = header_values(headers, "x-echo")
    upstream = json.loads(base64.b64decode(echoed[0])) if echoed else None
    return status, headers, body.decode(errors="replace"), upstream


def counter(gw, case):
    outcome = "allowed" if case["expect"]["status"] == 200 else "denied"
    return gw.stat_name(f"{outcome}.{case['expect']['reason']}")


def vector_env():
    """Envoy's environment for the vectors: their environment's name, and the HS256 issuers'
    secrets as a deployment gives them (a gate secret, never in a bundle)."""
    return {"TOKENGATE_ENVIRONMENT": VECTORS["environment"],
            "TOKENGATE_ISSUER_SECRETS": VECTORS["issuer_secrets"]}


def run_case(gw, case):
    name = counter(gw, case)
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
    # This file publishes bundles as conformance/generate.py does, to the byte: re-timed
    # fixtures and the forgeries below are signed the way a gate checks.
    assert public_key(FIXTURE_SEEDS[0]) in VECTORS["trusted_keys"], "fixture key A changed"
    for name, texts in VECTORS["bundles"].items():
        text = texts["envoy"]
        assert retime(text, 0, json.loads(text)["payload"]["version"]) == text, f"{name}: published differently"
    env = vector_env()
    failures, version = [], 1000
    with gateway(env=env, trusted_keys=VECTORS["trusted_keys"]) as gw:
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


def test_every_conformance_refusal_through_envoy():
    """Each refusal vector, exactly as published, with the keys it says the gate trusts, in
    one ECDS resource: Envoy rejects the update and keeps serving what it served (nothing,
    then the `serving` fixture for the rollback cases)."""
    env = vector_env()
    failures, serving = [], None
    # Refusals against an empty gate first: a refusal changes nothing, so one Envoy does.
    refusals = sorted(VECTORS["refusals"], key=lambda r: r["serving"] is not None)
    with gateway(env=env, trusted_keys=VECTORS["trusted_keys"]) as gw:
        for refusal in refusals:
            if refusal["serving"] != serving:
                serving = refusal["serving"]
                fixture = VECTORS["bundles"][serving]["envoy"]
                assert gw.push(fixture) == "accepted", gw.tail_log()
                served = json.loads(fixture)["payload"]["version"]
            trusted = refusal["trusted"] if refusal["trusted"] is not None else VECTORS["trusted_keys"]
            outcome = gw.push(refusal["bundle"]["envoy"], trusted_keys=trusted)
            health = gw.request("GET", "/healthz")[0]
            if outcome != "rejected":
                failures.append(f"{refusal['name']}: the ECDS update was {outcome}")
            elif serving is None and health != 503:
                failures.append(f"{refusal['name']}: /healthz {health} with no bundle (expected 503)")
            elif serving is not None and (health != 200 or gw.gate_stat(VERSION) != served):
                failures.append(f"{refusal['name']}: /healthz {health}, version {gw.gate_stat(VERSION)} "
                                f"(expected 200 from {serving}, version {served})")
    assert not failures, f"{len(failures)} of {len(refusals)} refusals failed:\n  " + "\n  ".join(failures)
    return f"{len(refusals)} refusals"


class Operator:
    """A tokengate store and its Ed25519 key file in a temporary directory, driven through
    the real CLI. No key source but the key file `init` made (nothing inherited)."""

    def __init__(self, environment="e2e", key_file=None):
        self.dir = tempfile.mkdtemp(prefix="tokengate-e2e-")
        # The store's path with .key; or another store's key file, given with --key-file to
        # every command (so both stores sign with, and publish, the same keys).
        self.key_file = key_file or os.path.join(self.dir, "tokengate.key")
        self.global_args = ["--key-file", key_file] if key_file else []
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("TOKENGATE_")}
        self.env.update(TOKENGATE_STORE=os.path.join(self.dir, "tokengate.db"), TOKENGATE_ACTOR="e2e")
        self.run("init", "--environment", environment)
        self.environment = environment

    def command(self, *args):
        return [CLI, *self.global_args, *args]

    def run(self, *args, stdin="", check=True, env=None):
        proc = subprocess.run(self.command(*args), input=stdin, capture_output=True, text=True,
                              env=env or self.env, timeout=60)
        if check and proc.returncode != 0:
            raise AssertionError(f"tokengate {' '.join(args)} failed: {proc.stderr}")
        return proc

    def create(self, name, *args):
        return self.run("create", name, *args).stdout.strip()

    def push(self, gw, *args, check=True, name_filter=True):
        """`push envoy` to gw's ECDS file, naming gw's filter (--module / --wasm) unless
        told not to (the CLI then keeps the filter the file names)."""
        code = [f"--{gw.filter}", CODE[gw.filter]] if name_filter else []
        return self.run("push", "envoy", "--file", gw.ecds_path, *code, *args, check=check)

    def bundle(self):
        """A new signed bundle for Envoy (`tokengate bundle`), as text: not pushed."""
        path = os.path.join(self.dir, "bundle.json")
        self.run("bundle", "--target", "envoy", "--out", path)
        return open(path).read()

    def gateway(self, env=None, **kw):
        # Envoy gets the environment's name (and any gate secret in `env`, e.g. HS256
        # issuers' TOKENGATE_ISSUER_SECRETS); its keys come with each push.
        return gateway(env={"TOKENGATE_ENVIRONMENT": self.environment, **(env or {})}, **kw)

    def seeds(self):
        """The private keys in the key file: one 64-hex seed per line."""
        lines = [l.strip() for l in open(self.key_file).read().splitlines() if l.strip()]
        assert lines and all(HEX64.fullmatch(l) for l in lines), f"key file: {len(lines)} lines, not all 64 hex"
        return lines

    def trusted_text(self):
        """`key public`: the published public keys, as TOKENGATE_TRUSTED_KEYS takes them."""
        return self.run("key", "public").stdout.strip()

    def public_keys(self):
        return split_keys(self.trusted_text())

    def key_states(self):
        """`key list --json` as {key id: "active" | "retired"}, whatever the listing's shape:
        every object naming one key id, with its state as a member ("active" / "retired") or
        else as `retired_at` (null: active)."""
        states = {}

        def walk(value):
            if isinstance(value, dict):
                strings = [v for v in value.values() if isinstance(v, str)]
                ids = [v for v in strings if KEY_ID.fullmatch(v)]
                state = [v for v in strings if v in ("active", "retired")]
                if len(ids) == 1 and len(state) == 1:
                    states[ids[0]] = state[0]
                elif len(ids) == 1 and "retired_at" in value:
                    states[ids[0]] = "active" if value["retired_at"] is None else "retired"
                value = list(value.values())
            if isinstance(value, list):
                for v in value:
                    walk(v)

        walk(json.loads(self.run("key", "list", "--json").stdout))
        return states


def pushed_version(proc):
    """The version a `push envoy` reported on stderr."""
    found = re.search(r"pushed bundle version (\d+)", proc.stderr)
    assert found, f"no version in: {proc.stderr!r}"
    return int(found.group(1))


def served_resource(gw):
    """The bundle text and the trusted keys the (JSON) ECDS file on disk gives the filter:
    for the module, the bundle file its reference names and the reference's keys (the file
    checked against the reference's SHA-256); for the wasm filter, the inline bundle and
    TOKENGATE_TRUSTED_KEYS."""
    typed = json.load(open(gw.ecds_path))["resources"][0]["typed_config"]
    if gw.filter == "module":
        reference = json.loads(typed["filter_config"]["value"])
        text = open(reference["bundle"]).read()
        assert sha256_hex(text) == reference["sha256"], "the bundle file is not the one referenced"
        return text, reference["trusted_keys"]
    config = typed["config"]
    variables = config["vm_config"]["environment_variables"].get("key_values", {})
    return config["configuration"]["value"], variables.get(TRUSTED_KEYS_VARIABLE)


def bundle_files(gw):
    """The module's bundle files (name -> bytes) in gw's bundle directory."""
    if not os.path.isdir(gw.bundle_dir):
        return {}
    return {name: open(os.path.join(gw.bundle_dir, name), "rb").read()
            for name in sorted(os.listdir(gw.bundle_dir))}


def mistyped(token):
    """The token with its last character changed (its checksum then fails)."""
    return token[:-1] + ("x" if token[-1] != "x" else "y")


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


def test_admin_key_rotation_end_to_end():
    """init -> push (key 1) -> key rotate -> push (keys 1 and 2) -> key retire 1 -> push
    (key 2): every step served, same Envoy. Then a newer bundle signed by the retired key,
    sent with the current key set, is refused and the last bundle keeps serving."""
    op = Operator()
    with op.gateway() as gw:
        pid = gw.pid
        token = op.create("svc")
        first = pushed_version(op.push(gw))
        eventually(lambda: status_of(gw, token) == 200, 2.0, "served with the first key")
        [old_seed] = op.seeds()
        old_public = public_key(old_seed)
        old_kid = key_id(old_public)
        assert op.key_states() == {old_kid: "active"}, op.key_states()
        assert op.public_keys() == [old_public]
        text, trusted = served_resource(gw)
        assert signers(text) == {old_kid}, signers(text)
        assert split_keys(trusted) == [old_public], trusted

        op.run("key", "rotate", "--reason", "e2e")
        assert os.stat(op.key_file).st_mode & 0o077 == 0, "the key file is readable by others"
        seeds = op.seeds()
        assert len(seeds) == 2 and old_seed in seeds, "rotate must keep the old key and add one"
        new_public = public_key(next(s for s in seeds if s != old_seed))
        new_kid = key_id(new_public)
        assert set(op.public_keys()) == {old_public, new_public}
        assert op.key_states() == {old_kid: "active", new_kid: "active"}, op.key_states()
        both = pushed_version(op.push(gw))
        assert both > first
        eventually(lambda: gw.gate_stat(VERSION) == both, 2.0, "the bundle signed by both keys served")
        text, trusted = served_resource(gw)
        assert signers(text) == {old_kid, new_kid}, signers(text)
        assert set(split_keys(trusted)) == {old_public, new_public}, trusted
        assert status_of(gw, token) == 200

        op.run("key", "retire", old_kid, "--reason", "e2e")
        current = op.trusted_text()
        assert split_keys(current) == [new_public], current
        assert op.key_states() == {old_kid: "retired", new_kid: "active"}, op.key_states()
        last = pushed_version(op.push(gw))
        eventually(lambda: gw.gate_stat(VERSION) == last, 2.0, "the bundle signed by the new key served")
        text, trusted = served_resource(gw)
        assert signers(text) == {new_kid}, signers(text)
        assert split_keys(trusted) == [new_public], trusted
        assert status_of(gw, token) == 200

        # The retired key, leaked: a newer bundle granting a token that was never pushed.
        intruder = op.create("intruder", "--scopes", "*")
        refused = gw.gate_stat(REFUSED, 0)
        forged = forged_bundle(text, old_seed, intruder, last + 1)
        assert gw.push(forged, trusted_keys=current) == "rejected", "Envoy took a bundle signed by a retired key"
        eventually(lambda: gw.gate_stat(REFUSED, 0) > refused, 2.0, "the filter counted the refusal")
        assert gw.gate_stat(VERSION) == last, "the served version changed"
        assert status_of(gw, token) == 200 and status_of(gw, intruder) == 401
        # Control: the same bundle signed by the active key is taken, so the retired key's
        # was refused for its key alone.
        genuine = forged_bundle(text, next(s for s in seeds if s != old_seed), intruder, last + 1)
        assert gw.push(genuine, trusted_keys=current) == "accepted", gw.tail_log()
        assert status_of(gw, intruder) == 200 and gw.gate_stat(VERSION) == last + 1
        assert gw.pid == pid and gw.envoy.poll() is None, "Envoy restarted"
    return f"versions {first} -> {both} -> {last}; retired key's version {last + 1} refused"


def test_no_gate_holds_a_private_key():
    """Everything Envoy is given or holds (its bootstrap as shipped and as deployed, the ECDS
    file, the module's bundle files, its /config_dump, environment, command line and log)
    contains no private key of the admin, and no 64-hex string in it, used as a private key,
    makes a bundle Envoy takes."""
    op = Operator()
    op.run("key", "rotate", "--reason", "e2e")  # two private keys, both published
    seeds = op.seeds()
    with op.gateway() as gw:
        token = op.create("svc")
        version = pushed_version(op.push(gw))
        eventually(lambda: gw.gate_stat(VERSION) == version and status_of(gw, token) == 200, 2.0, "served")
        served_text, trusted = served_resource(gw)
        assert set(split_keys(trusted)) == set(op.public_keys()) and len(split_keys(trusted)) == 2, trusted

        def read(path, mode="r"):
            with open(path, mode) as f:
                data = f.read()
            return data.decode(errors="replace").replace("\0", "\n") if mode == "rb" else data

        shipped = os.path.basename(gw.gateway_yaml)
        material = {
            f"{shipped} as shipped": read(gw.gateway_yaml),
            f"{shipped} as deployed": read(gw.config_path),
            "the ECDS file as shipped": read(SHIPPED_ECDS),
            "the ECDS file as deployed": read(gw.ecds_path),
            "Envoy's /config_dump": gw.admin("/config_dump?include_eds")[1],
            "Envoy's environment": read(f"/proc/{gw.pid}/environ", "rb"),
            "Envoy's command line": read(f"/proc/{gw.pid}/cmdline", "rb"),
            "Envoy's log": read(gw.envoy_log),
        }
        files = bundle_files(gw)
        assert bool(files) == (gw.filter == "module"), f"bundle files: {sorted(files)}"
        material.update({f"the bundle file {name}": data.decode(errors="replace")
                         for name, data in files.items()})
        # The dump shows what Envoy holds, keys included: else the search below proves nothing.
        for public in split_keys(trusted):
            assert public in material["Envoy's /config_dump"], "the trusted keys are not in /config_dump"
        for what, text in material.items():
            for seed in seeds:
                assert seed not in text.lower(), f"{what} holds the admin's private key"

        candidates = sorted(set().union(*(hex_strings(text) for text in material.values())))
        intruder = op.create("intruder", "--scopes", "*")  # never pushed
        failures = []
        for candidate in candidates:
            outcome = gw.push(forged_bundle(served_text, candidate, intruder, version + 1),
                              trusted_keys=trusted)
            status, now_serving = status_of(gw, intruder), gw.gate_stat(VERSION)
            if outcome != "rejected" or status != 401 or now_serving != version:
                failures.append(f"{candidate}: update {outcome}, intruder {status}, version {now_serving}")
        assert not failures, "bundles signed with what Envoy holds were taken:\n  " + "\n  ".join(failures)
        assert status_of(gw, token) == 200, "the served bundle stopped serving"
        # Control: the same forgery signed by the admin's keys is taken, so the ones above
        # were refused for their keys alone.
        genuine = forged_bundle(served_text, seeds[0], intruder, version + 1)
        genuine = publish({**json.loads(genuine)["payload"], "keys": split_keys(trusted)}, seeds)
        assert gw.push(genuine, trusted_keys=trusted) == "accepted", gw.tail_log()
        assert status_of(gw, intruder) == 200 and gw.gate_stat(VERSION) == version + 1
    return f"{len(candidates)} hex strings tried as private keys, every bundle refused"


def test_restarted_envoy_takes_its_keys_from_the_ecds_file():
    """The key set is in the ECDS file, not in Envoy's environment: an Envoy restarted on the
    same file serves the pushed bundle again."""
    op = Operator()
    with op.gateway() as gw:
        token = op.create("svc")
        version = pushed_version(op.push(gw))
        eventually(lambda: status_of(gw, token) == 200, 2.0, "served")
        gw.stop_envoy()
        gw.start_envoy()
        took = eventually(lambda: status_of(gw, token) == 200, 5.0, "served after the restart")
        assert gw.gate_stat(VERSION) == version
    return f"served {took * 1000:.0f} ms after /ready"


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
        served_files = bundle_files(gw)
        trusted = op.trusted_text()
        good_text = open(old_bundle).read()
        good_version = json.loads(good_text)["payload"]["version"]

        # One signed byte changed (a newer version), the rest exactly as published.
        tampered_text = good_text.replace(f'"version":{good_version},', f'"version":{good_version + 100},', 1)
        assert tampered_text != good_text
        tampered = os.path.join(op.dir, "tampered.json")
        open(tampered, "w").write(tampered_text)
        # A well-formed, newer bundle signed by a key the admin never published (a 64-hex
        # Ed25519 seed): the CLI's own, or, if it will not sign with an unpublished key, ours.
        other_seed = hashlib.sha256(b"x").hexdigest()
        other_key = os.path.join(op.dir, "other-key.json")
        made = op.run("bundle", "--target", "envoy", "--out", other_key, check=False,
                      env=dict(op.env, TOKENGATE_SIGNING_KEY=other_seed))
        if made.returncode != 0:
            payload = json.loads(good_text)["payload"]
            payload.update(version=good_version + 50, keys=[public_key(other_seed)])
            open(other_key, "w").write(publish(payload, [other_seed]))
        garbage = os.path.join(op.dir, "garbage.json")
        open(garbage, "w").write("{not json")
        for path, why in [(tampered, ("signature",)), (other_key, ("signature", "key")),
                          (old_bundle, ("not newer",)), (garbage, ("not a valid", "json"))]:
            proc = op.push(gw, "--bundle", path, check=False)
            assert proc.returncode == 2 and any(w in proc.stderr.lower() for w in why), (path, proc.stderr)
            assert open(gw.ecds_path).read() == served, "a refused push changed the ECDS file"
            assert bundle_files(gw) == served_files, "a refused push changed the bundle files"

        # Forced onto disk anyway, with the admin's keys (for the module: each in its bundle
        # file, named by a correct reference): the filter refuses (the module when Envoy
        # creates the configuration, the wasm filter in its canary VM), Envoy rejects the
        # update; v-current serves.
        s = gw.stats()
        rejected, refused = s.get(ECDS + "update_rejected", 0), s.get(gw.stat_name(REFUSED), 0)
        for text in [tampered_text, open(other_key).read(), good_text, "{not json"]:
            before = gw.stat(ECDS + "update_rejected", 0) + gw.stat(ECDS + "update_success", 0)
            gw.write(text, trusted)
            eventually(lambda: gw.stat(ECDS + "update_rejected", 0) + gw.stat(ECDS + "update_success", 0) > before,
                       3.0, "Envoy saw the file")
            assert status_of(gw, token) == 401, "the revoked token passed after a bad forced push"
            assert gw.request("GET", "/healthz")[0] == 200, "the previous bundle stopped serving"
        s = gw.stats()
        assert s[ECDS + "update_rejected"] >= rejected + 4, s
        assert s[gw.stat_name(REFUSED)] >= refused + 4, s
        assert "tokengate_bundle_refused" in gw.prometheus()


def test_binary_ecds_file_reloads_like_json():
    """`push envoy --file X.pb` writes binary protobuf (Envoy skips its JSON parser); Envoy's
    own config dump must show exactly the resource the JSON file would hold, the trusted keys
    included (the module: in its reference, byte for byte as module_reference() writes it;
    the wasm filter: a map on the wire). The harness's encoder (the bench's) must write what
    Envoy reads too."""
    op = Operator()
    code = os.path.realpath(CODE[FILTER])  # the CLI writes the canonical path
    with op.gateway(ecds_file="tokengate.ecds.pb") as gw:
        assert status_of(gw, "anything") == 503, "the harness's empty .pb: fail closed"
        token = op.create("svc")
        version = pushed_version(op.push(gw))
        eventually(lambda: status_of(gw, token) == 200, 2.0, "served from the CLI's .pb")
        assert open(gw.ecds_path, "rb").read(1) != b"{", "the CLI wrote JSON into a .pb"
        dumped = json.loads(gw.admin("/config_dump?resource=ecds_filters")[1])["configs"]
        assert len(dumped) == 1, dumped
        typed = dumped[0]["ecds_filter"]["typed_config"]
        if gw.filter == "module":
            reference = json.loads(typed["filter_config"]["value"])
            trusted = reference["trusted_keys"]
            [name] = bundle_files(gw)  # the one bundle file, named for its version and digest
            bundle_file = os.path.join(gw.bundle_dir, name)
            digest = sha256_hex(open(bundle_file, "rb").read())
            assert name == f"v{version}-{digest}.json", name
            expected = ecds_resource(module_reference(bundle_file, digest, trusted),
                                     filter="module", module_path=code)
        else:
            served = typed["config"]["configuration"]["value"]
            trusted = typed["config"]["vm_config"]["environment_variables"]["key_values"][TRUSTED_KEYS_VARIABLE]
            expected = ecds_resource(served, wasm_path=code, trusted_keys=trusted)
        assert set(split_keys(trusted)) == set(op.public_keys()), trusted
        assert dumped[0]["ecds_filter"] == expected["resources"][0], dumped[0]["ecds_filter"]
        assert dumped[0]["version_info"] == expected["version_info"] == str(version)

        # A newer bundle through the harness's encoder: the token revoked, another one issued.
        op.run("revoke", "svc", "--reason", "e2e")
        fresh = op.create("svc-2")
        signed_text = op.bundle()
        gw.write(signed_text, trusted)
        eventually(lambda: status_of(gw, fresh) == 200, 2.0, "served from the harness's .pb")
        assert status_of(gw, token) == 401, "revoked through a .pb"

        # Tampered, in a well-formed .pb: the filter (not Envoy's parser) refuses it.
        refused = gw.gate_stat(REFUSED, 0)
        v = json.loads(signed_text)["payload"]["version"]
        tampered = signed_text.replace(f'"version":{v},', f'"version":{v + 100},', 1)
        assert tampered != signed_text
        gw.write(tampered, trusted)
        eventually(lambda: gw.gate_stat(REFUSED, 0) > refused, 3.0, "the filter refused the tampered bundle")
        assert status_of(gw, token) == 401 and status_of(gw, fresh) == 200, "the previous bundle stopped serving"


def refusal_lines(gw):
    """The filter's "bundle refused: ..." log lines so far."""
    return [l for l in open(gw.envoy_log, errors="replace").read().splitlines() if "tokengate: bundle refused:" in l]


def push_reference(gw, bundle_path, sha256, trusted_keys):
    """Writes a module reference as given (no check that the file is there or matches) and
    waits as gw.push() does: "accepted" or "rejected"."""
    resource = ecds_resource(module_reference(bundle_path, sha256, trusted_keys), filter="module",
                             module_path=gw.module_path)
    return gw.push_written(lambda: write_resource(gw.ecds_path, resource))


@only("module")
def test_module_refuses_a_bundle_file_changed_after_its_reference_was_written():
    """The module's reference names its bundle file's SHA-256, so the file cannot change under
    it: a bundle file rewritten after its reference was made (here with another well-signed,
    newer bundle) is refused, Envoy rejects the update, the previous bundle keeps serving
    and the token only the new file grants is refused. Control: the same file under a
    reference with its true SHA-256 is taken."""
    op = Operator()
    with op.gateway() as gw:
        token = op.create("svc")
        served = pushed_version(op.push(gw))
        eventually(lambda: status_of(gw, token) == 200, 2.0, "served")
        trusted = op.trusted_text()
        meant = op.bundle()
        newcomer = op.create("newcomer")
        swapped = op.bundle()
        path, digest = write_bundle_file(gw.ecds_path, meant)
        write_atomic(path, swapped)  # the file changes; the digest taken before does not
        refused, lines = gw.gate_stat(REFUSED, 0), len(refusal_lines(gw))
        assert push_reference(gw, path, digest, trusted) == "rejected", gw.tail_log()
        assert gw.gate_stat(REFUSED, 0) == refused + 1
        [line] = refusal_lines(gw)[lines:]
        assert "SHA-256" in line and path in line and f"still serving version {served}" in line, line
        assert gw.gate_stat(VERSION) == served and status_of(gw, token) == 200, "the previous bundle stopped serving"
        assert status_of(gw, newcomer) == 401, "the changed file's token passed"

        assert push_reference(gw, path, sha256_hex(swapped), trusted) == "accepted", gw.tail_log()
        assert status_of(gw, newcomer) == 200
        assert gw.gate_stat(VERSION) == json.loads(swapped)["payload"]["version"]
    return f"version {served} kept serving; the changed file refused, then taken with its own SHA-256"


@only("module")
def test_module_refuses_a_reference_to_a_missing_bundle_file():
    """An ECDS update naming a bundle file that is not there (e.g. the reference copied without
    its file) is refused; the previous bundle keeps serving. Control: once the file is
    written, an Envoy started on the same ECDS file serves it. (Not the same running Envoy:
    it skips a resource equal to the last one it tried, refused or not, so the cure for a
    refused update is a new push, never the same file again.)"""
    op = Operator()
    with op.gateway() as gw:
        token = op.create("svc")
        served = pushed_version(op.push(gw))
        eventually(lambda: status_of(gw, token) == 200, 2.0, "served")
        newcomer = op.create("newcomer")
        text = op.bundle()
        version, digest = json.loads(text)["payload"]["version"], sha256_hex(text)
        missing = os.path.join(gw.bundle_dir, f"v{version}-{digest}.json")  # as a push names it
        assert not os.path.exists(missing)
        refused, lines = gw.gate_stat(REFUSED, 0), len(refusal_lines(gw))
        assert push_reference(gw, missing, digest, op.trusted_text()) == "rejected", gw.tail_log()
        assert gw.gate_stat(REFUSED, 0) == refused + 1
        [line] = refusal_lines(gw)[lines:]
        assert missing in line and f"still serving version {served}" in line, line
        assert gw.gate_stat(VERSION) == served and status_of(gw, token) == 200, "the previous bundle stopped serving"
        assert status_of(gw, newcomer) == 401

        write_atomic(missing, text)
        gw.stop_envoy()
        gw.start_envoy()
        eventually(lambda: gw.gate_stat(VERSION) == version and status_of(gw, newcomer) == 200, 5.0,
                   "the new bundle served by an Envoy started on the same reference")
    return f"version {served} kept serving; version {version} served once its file was there"


class Load:
    """GET /api/load with `token` from `threads` threads until stop(), each on a connection it
    replaces every `per_connection` requests (None: keeps it, unless it fails). Bounded: 60 s
    and 50,000 requests. Counts the statuses (a failed request by its error's name)."""

    def __init__(self, gw, token, threads=4, per_connection=None):
        self.gw, self.token, self.per_connection = gw, token, per_connection
        self.stopping, self.results, self.lock = threading.Event(), {}, threading.Lock()
        self.deadline = time.monotonic() + 60
        self.max_requests = 50_000
        self.threads = [threading.Thread(target=self.run) for _ in range(threads)]
        for t in self.threads:
            t.start()

    def connect(self):
        return http.client.HTTPConnection("127.0.0.1", self.gw.listen_port, timeout=5)

    def run(self):
        conn, sent = self.connect(), 0
        while not self.stopping.is_set() and time.monotonic() < self.deadline:
            with self.lock:
                if sum(self.results.values()) >= self.max_requests:
                    break
            if self.per_connection and sent == self.per_connection:
                conn.close()
                conn, sent = self.connect(), 0
            try:
                conn.request("GET", "/api/load", headers={"authorization": f"Bearer {self.token}"})
                resp = conn.getresponse()
                resp.read()
                status = resp.status
                sent += 1
            except (OSError, http.client.HTTPException) as e:
                status = f"error {type(e).__name__}"
                conn.close()
                conn, sent = self.connect(), 0
            with self.lock:
                self.results[status] = self.results.get(status, 0) + 1
        conn.close()

    def stop(self):
        """Stops every thread; returns {status: count}."""
        self.stopping.set()
        for t in self.threads:
            t.join()
        return dict(self.results)


def test_hot_reload_under_load_drops_nothing():
    op = Operator()
    with op.gateway() as gw:
        token = op.create("load")
        op.push(gw)
        eventually(lambda: status_of(gw, token) == 200, 2.0, "served")
        load = Load(gw, token, threads=4)
        pid = gw.pid
        for i in range(20):
            op.create(f"extra-{i}")
            last_version = pushed_version(op.push(gw))
            time.sleep(0.05)
        time.sleep(0.5)
        results = load.stop()
        assert gw.pid == pid
        total = sum(results.values())
        assert results.get(200, 0) == total and total > 100, f"statuses during 20 pushes: {results}"
        assert gw.gate_stat(VERSION) == last_version
    return f"{total} requests, all 200, over 20 pushes"


@only("module")
def test_module_loads_one_gate_per_process_with_four_workers():
    """The module keeps one gate per Envoy process, shared by every worker thread: with
    `--concurrency 4` each push logs exactly one "serving bundle version N" line (the wasm
    filter logs one per VM: its canary, the main thread and each worker), while requests on
    many connections, which Envoy spreads over all four workers, all pass."""
    op = Operator()
    with op.gateway(concurrency=4) as gw:
        admin = f"http://127.0.0.1:{gw.admin_port}"
        token = op.create("load")
        first = pushed_version(op.push(gw, "--admin", admin))
        eventually(lambda: status_of(gw, token) == 200, 2.0, "served")
        # 16 threads, a new connection every 5 requests: hundreds of connections.
        load = Load(gw, token, threads=16, per_connection=5)
        versions = [first]
        for i in range(5):
            op.create(f"extra-{i}")
            versions.append(pushed_version(op.push(gw, "--admin", admin)))  # served when it returns
            time.sleep(0.1)
        time.sleep(0.5)
        results = load.stop()
        total = sum(results.values())
        assert results.get(200, 0) == total and total > 100, f"statuses during {len(versions) - 1} pushes: {results}"
        connections = {k: v for k, v in gw.stats().items()
                       if re.fullmatch(rf"listener\.127\.0\.0\.1_{gw.listen_port}\.worker_\d+\.downstream_cx_total", k)}
        assert len(connections) == 4 and all(connections.values()), f"connections per worker: {connections}"
        log = open(gw.envoy_log, errors="replace").read()
        for version in versions:
            lines = re.findall(rf"tokengate: serving bundle version {version} for ", log)
            assert len(lines) == 1, f"version {version} logged {len(lines)} times:\n{gw.tail_log()}"
        assert gw.gate_stat(VERSION) == versions[-1]
    return (f"{len(versions)} pushes, one log line each; {total} requests, all 200, on "
            f"{sum(connections.values())} connections over 4 workers")


def test_access_log_and_stats_for_allowed_and_denied():
    op = Operator()
    with op.gateway() as gw:
        token = op.create("observed", "--scopes", "orders:read")
        op.push(gw)
        eventually(lambda: status_of(gw, token) == 200, 2.0, "served")
        before = gw.stats()
        assert gw.request("GET", "/api/orders", bearer(token))[0] == 200
        assert gw.request("GET", f"/api/orders?access_token={token}", bearer(mistyped(token)))[0] == 401
        after = gw.stats()
        for name in (gw.stat_name("allowed.valid"), gw.stat_name("denied.checksum")):
            assert after.get(name, 0) == before.get(name, 0) + 1, name
        eventually(lambda: len(gw.access_log_lines()) >= 3, 3.0, "access log lines")
        lines = gw.access_log_lines()
        allowed = [l for l in lines if "reason=valid" in l and "subject=observed" in l]
        denied = [l for l in lines if "reason=checksum" in l and " 401 " in l]
        assert allowed and denied, lines
        assert not any(token in l or token[:-1] in l for l in lines), "a token reached the access log"
        # The decision reached the log through the filter's own filter state key.
        assert f"%FILTER_STATE({gw.filter_state_key}:PLAIN)%" in open(gw.config_path).read()
        prometheus = gw.prometheus().splitlines()
        for name in ("allowed.valid", "bundle.version"):
            assert any(l.startswith(gw.prometheus_name(name)) for l in prometheus), gw.prometheus_name(name)
        # The guard read the same key: it let the allowed request through, stopped nothing.
        # (the stat must exist: a wrong name would read as 0 and prove nothing)
        assert gw.stat("http.gateway.rbac.tokengate_guard.denied") == 0
        assert gw.stat("http.gateway.rbac.tokengate_guard.allowed") >= 1
    return allowed[-1].split('"', 1)[-1].strip()


def echoed(response_headers):
    """What the echo upstream received (its `x-echo` header), or None if nothing passed."""
    values = header_values(response_headers, "x-echo")
    return json.loads(base64.b64decode(values[0])) if values else None


def reads_as_identity(name):
    """Whether an upstream would read `name` as one of the gate's identity headers: any case,
    `_` as `-` (CGI, WSGI, PHP and Rack origins turn both into HTTP_X_TOKENGATE_...)."""
    return name.lower().replace("_", "-").startswith("x-tokengate-")


def test_underscore_identity_headers_never_reach_the_upstream_even_when_envoy_allows_underscores():
    """Review item "underscore x_tokengate_* headers removed in the core": behind an Envoy
    set to `headers_with_underscores_action: ALLOW` (Istio's default), a client sending
    `x_tokengate_subject: root`, `X_Tokengate_Scopes: *` or `x-tokengate_token-id` must not
    reach the upstream with them, on a public route nor beside the real identity on a token
    route. An unrelated `x_other` header does reach it: Envoy really forwards underscores,
    so it is the filter that removed ours."""
    op = Operator()
    with op.gateway(underscore_headers="ALLOW") as gw:
        assert "headers_with_underscores_action: ALLOW" in open(gw.config_path).read()
        token = op.create("svc", "--scopes", "orders:read")
        op.push(gw)
        eventually(lambda: status_of(gw, token) == 200, 2.0, "served")
        token_id = "tid_" + hashlib.sha256(token.encode()).hexdigest()[:16]
        spoofed = [("x_tokengate_subject", "root"), ("X_Tokengate_Scopes", "*"),
                   ("x-tokengate_token-id", "x"), ("x_other", "1")]
        routes = [("public /healthz", "/healthz", [], []),
                  ("token /api/orders", "/api/orders", bearer(token),
                   [("x-tokengate-scopes", "orders:read"), ("x-tokengate-subject", "svc"),
                    ("x-tokengate-token-id", token_id)])]
        for route, path, credential, identity in routes:
            status, headers, body = gw.request("GET", path, spoofed + credential)
            upstream = echoed(headers)
            assert status == 200 and upstream is not None, f"{route}: {status} {body[:200]!r}"
            received = upstream["headers"]
            assert header_values(received, "x_other") == ["1"], \
                f"{route}: Envoy did not forward x_other, so ALLOW is not in effect: {received}"
            leaked = [(n, v) for n, v in received if reads_as_identity(n) and "_" in n]
            assert not leaked, f"{route}: underscore identity headers reached the upstream: {leaked}"
            got = sorted((n.lower(), v) for n, v in received if reads_as_identity(n))
            assert got == identity, f"{route}: identity headers {got} (expected {identity})"
    return "x_other forwarded; x_tokengate_* removed on public and token routes"


def test_comma_joined_credential_is_a_400_through_envoy():
    """Review item "comma-joined named credentials are a 400": two valid tokens in one
    `X-Internal-Token` (`A, B` and `A,B`, as a proxy joins repeats) or in two such headers
    are a 400 invalid_request through Envoy, never one of them let through nor a 401: the
    conformance vectors cover the core, this pins what Envoy hands the filter."""
    op = Operator()
    with op.gateway() as gw:
        a, b = op.create("svc-a"), op.create("svc-b")
        op.push(gw)
        one = lambda t: gw.request("GET", "/api/x", [("X-Internal-Token", t)])[0]  # noqa: E731
        eventually(lambda: one(a) == 200 and one(b) == 200, 2.0, "each token alone served")
        counter = gw.stat_name("denied.several_credentials")
        cases = [("comma and space", [("X-Internal-Token", f"{a}, {b}")]),
                 ("comma", [("X-Internal-Token", f"{a},{b}")]),
                 ("two headers", [("X-Internal-Token", a), ("X-Internal-Token", b)])]
        for what, headers in cases:
            before = gw.stat(counter, 0)
            status, response_headers, body = gw.request("GET", "/api/x", headers)
            assert status == 400, f"{what}: {status} {body[:200]!r}"
            assert json.loads(body).get("error") == "invalid_request", f"{what}: {body[:200]!r}"
            assert header_values(response_headers, "www-authenticate") == \
                ['Bearer realm="tokengate", error="invalid_request"'], f"{what}: {response_headers}"
            assert echoed(response_headers) is None, f"{what}: reached the upstream"
            assert gw.stat(counter, 0) == before + 1, f"{what}: {counter} did not move by 1"
    return f"{len(cases)} forms, each 400 several_credentials"


def other_environment(op, environment="other", ahead_of=0):
    """A second store for another environment that signs with `op`'s key file, so a gate
    trusting `op`'s keys trusts its bundles' signatures and refuses them for the environment
    alone; its versions are moved past `ahead_of`, so no bundle of it is refused as older."""
    other = Operator(environment, key_file=op.key_file)
    assert other.public_keys() == op.public_keys(), "the second store publishes other keys"
    scratch = os.path.join(other.dir, "scratch.json")
    for _ in range(ahead_of + 1):
        other.run("bundle", "--target", "envoy", "--out", scratch)
    return other


def test_push_envoy_admin_confirms_what_envoy_serves():
    """Review item "push envoy --admin confirms what the gate serves (a refused ECDS file is
    restored)": with --admin the push exits 0 only once Envoy serves the new version; a
    bundle Envoy refuses (signed by trusted keys, for another environment) exits 2 naming the
    refusal, and the ECDS file is put back byte for byte, so a restarted Envoy never loads
    it (restarted here: it serves the old bundle, whose file, for the module, is still
    there); the old bundle keeps serving. Without --admin the push says it is not confirmed;
    without --module / --wasm it keeps the filter the ECDS file names."""
    op = Operator()
    with op.gateway() as gw:
        admin = f"http://127.0.0.1:{gw.admin_port}"
        token = op.create("svc")
        proc = op.push(gw, "--admin", admin)
        first = pushed_version(proc)
        assert "serves it" in proc.stderr and "not confirmed" not in proc.stderr, proc.stderr
        assert gw.gate_stat(VERSION) == first, "the push returned before Envoy served it"
        eventually(lambda: status_of(gw, token) == 200, 2.0, "served")

        other = other_environment(op, ahead_of=first)
        served_bytes = open(gw.ecds_path, "rb").read()
        refused = other.push(gw, "--admin", admin, check=False)
        assert refused.returncode == 2, (refused.returncode, refused.stderr)
        assert "refused" in refused.stderr.lower(), refused.stderr
        assert "serves it" not in refused.stderr, refused.stderr
        assert open(gw.ecds_path, "rb").read() == served_bytes, "the refused ECDS file was not restored"
        log = open(gw.envoy_log, errors="replace").read()
        assert 'bundle refused: bundle is signed for environment "other"' in log, \
            "Envoy refused it for another reason than the environment:\n" + gw.tail_log()
        # Envoy sees the restored file too (it names the bundle served); nothing changes.
        time.sleep(0.5)
        assert open(gw.ecds_path, "rb").read() == served_bytes
        assert gw.gate_stat(VERSION) == first and status_of(gw, token) == 200, "the old bundle stopped serving"
        gw.stop_envoy()
        gw.start_envoy()
        eventually(lambda: gw.gate_stat(VERSION) == first and status_of(gw, token) == 200, 5.0,
                   "the restarted Envoy serving the restored file")

        filter_type = json.load(open(gw.ecds_path))["resources"][0]["typed_config"]["@type"]
        proc = op.push(gw, name_filter=False)
        second = pushed_version(proc)
        assert proc.returncode == 0 and "not confirmed" in proc.stderr, proc.stderr
        eventually(lambda: gw.gate_stat(VERSION) == second, 2.0, "the unconfirmed push served")
        assert json.load(open(gw.ecds_path))["resources"][0]["typed_config"]["@type"] == filter_type, \
            "a push without --module / --wasm changed the filter"
    return f"version {first} confirmed; other environment's refused (exit 2, file restored)"


def test_status_shows_current_and_behind():
    """Review item "tokengate status": after a confirmed push, `status --envoy-admin URL`
    exits 0 and says current; a store whose last push Envoy refused (another environment,
    pushed without --admin, so recorded) gets exit 1 and "behind"; --json gives the list
    target/gate/serves/last_pushed/current."""
    op = Operator()
    with op.gateway() as gw:
        admin = f"http://127.0.0.1:{gw.admin_port}"
        op.create("svc")
        version = pushed_version(op.push(gw, "--admin", admin))
        shown = op.run("status", "--envoy-admin", admin, check=False)
        assert shown.returncode == 0, (shown.returncode, shown.stdout, shown.stderr)
        assert "current" in shown.stdout and "behind" not in shown.stdout, shown.stdout
        listed = json.loads(op.run("status", "--envoy-admin", admin, "--json").stdout)
        assert listed == [{"target": "envoy", "gate": admin, "serves": version,
                           "last_pushed": version, "current": True}], listed

        other = other_environment(op, ahead_of=version)
        refused = gw.gate_stat(REFUSED, 0)
        proc = other.push(gw)  # not confirmed: recorded, though Envoy refuses it
        pushed = pushed_version(proc)
        assert "not confirmed" in proc.stderr, proc.stderr
        eventually(lambda: gw.gate_stat(REFUSED, 0) > refused, 3.0, "Envoy refused the other environment's bundle")
        assert gw.gate_stat(VERSION) == version
        shown = other.run("status", "--envoy-admin", admin, check=False)
        assert shown.returncode == 1, (shown.returncode, shown.stdout, shown.stderr)
        assert "behind" in shown.stdout and f"version {pushed}" in shown.stdout, shown.stdout
        listed = other.run("status", "--envoy-admin", admin, "--json", check=False)
        assert listed.returncode == 1, (listed.returncode, listed.stderr)
        assert json.loads(listed.stdout) == [{"target": "envoy", "gate": admin, "serves": version,
                                              "last_pushed": pushed, "current": False}], listed.stdout
        # The first store's push is the one Envoy serves: still current.
        assert op.run("status", "--envoy-admin", admin, check=False).returncode == 0
    return f"serves {version}: current for its store, behind for the store that pushed {pushed}"


# --- usage: the gates' per-token counts, `usage pull`, list / show / unused / rotate ------

USAGE_PATH = "/.well-known/tokengate/usage"
USAGE_CONTEXT = "tokengate.usage/v1"
# A read of every worker's counts: the wasm filter's VMs add theirs to Envoy's shared data
# every second (the reading VM flushes first, so one worker needs no wait).
WASM_FLUSH_WAIT = 1.5
# The policy of the usage tests: one route needs a scope, so a valid token can be refused
# 403 insufficient_scope (counted as denied_scope).
USAGE_POLICY = """\
[credentials]
sources = ["bearer"]
forward = false

[[rules]]
name = "health"
path = { exact = "/healthz" }
methods = ["GET", "HEAD"]
access = "public"

[[rules]]
name = "orders-read"
path = { prefix = "/api/orders" }
access = "token"
all_of = ["orders:read"]

[[rules]]
name = "everything-else"
path = { prefix = "/" }
access = "token"
"""


def token_id_of(token):
    return "tid_" + hashlib.sha256(token.encode()).hexdigest()[:16]


def usage_signature(seed, environment, t=None, context=USAGE_CONTEXT):
    """`Tokengate-Signature` of a usage read signed by `seed` at `t` (default now) for
    `environment`: `t=<t>,<key id>=<hex Ed25519 of "<context>\\n<t>\\n<environment>">`."""
    t = int(time.time()) if t is None else t
    message = f"{context}\n{t}\n{environment}".encode()
    signature = Ed25519PrivateKey.from_private_bytes(seed_bytes(seed)).sign(message).hex()
    return f"t={t},{key_id(public_key(seed))}={signature}"


def read_usage(gw, signature=None, method="GET"):
    """A raw usage read on the listener: (status, headers, body text)."""
    headers = [("tokengate-signature", signature)] if signature is not None else []
    status, response_headers, body = gw.request(method, USAGE_PATH, headers)
    return status, response_headers, body.decode(errors="replace")


def error_of(body):
    try:
        return json.loads(body).get("error")
    except ValueError:
        return None


def listener_url(gw):
    return f"http://127.0.0.1:{gw.listen_port}"


def usage_pull(op, *gateways, check=True):
    """`usage pull --envoy-url <each listener>`; exit 0 required unless check=False."""
    urls = [a for gw in gateways for a in ("--envoy-url", listener_url(gw))]
    proc = op.run("usage", "pull", *urls, check=False)
    if check:
        assert proc.returncode == 0, f"usage pull exited {proc.returncode}: {proc.stderr}"
    return proc


def pulled_line(proc, gw):
    """(tokens, changed, new uses) from a pull's stderr line for gw's listener."""
    found = re.search(rf"envoy {re.escape(listener_url(gw))}/? \((envoy-[^)]+)\): (\d+) tokens, "
                      rf"(\d+) changed, (\d+) new uses", proc.stderr)
    assert found, f"no pull line for {listener_url(gw)} in: {proc.stderr!r}"
    return int(found.group(2)), int(found.group(3)), int(found.group(4))


def listed(op):
    """`list --json` by name."""
    return {row["name"]: row for row in json.loads(op.run("list", "--json").stdout)}


def instant(text):
    """Unix seconds of an ISO instant `YYYY-MM-DDTHH:MM:SSZ`."""
    return calendar.timegm(time.strptime(text, "%Y-%m-%dT%H:%M:%SZ"))


def settle(gw):
    """Waits until a read sees every worker's counts: the wasm filter's other VMs flush every
    second; the module's thread tables are merged at the read."""
    if gw.filter == "wasm" and gw.concurrency > 1:
        time.sleep(WASM_FLUSH_WAIT)


def usage_operator():
    op = Operator()
    path = os.path.join(op.dir, "policy.toml")
    with open(path, "w") as f:
        f.write(USAGE_POLICY)
    op.run("policy", "set", path)
    return op


def test_usage_pull_list_unused_and_a_second_pull_changes_nothing():
    """The issue's "done when": 5 tokens, 3 used (1, 2 and 3 requests, the third also refused
    once for a scope), one `usage pull`: `list --json` has the exact uses, `last_used` for the
    three (within the requests and the pull), none for the two others; `unused --for 3s`
    exits 1 naming exactly the two; a second pull changes nothing; two more uses are two more."""
    op = usage_operator()
    with op.gateway() as gw:
        tokens = {"used-1": op.create("used-1", "--scopes", "orders:read"),
                  "used-2": op.create("used-2"),
                  "used-3": op.create("used-3"),
                  "idle-a": op.create("idle-a"),
                  "idle-b": op.create("idle-b", "--scopes", "orders:read")}
        time.sleep(3.5)  # every token older than `unused --for 3s`
        op.push(gw)
        eventually(lambda: gw.request("GET", "/healthz")[0] == 200, 2.0, "bundle served")
        first = time.time()
        plan = [("used-1", "/api/orders", 200), ("used-2", "/api/x", 200), ("used-2", "/api/x", 200),
                ("used-3", "/api/x", 200), ("used-3", "/api/y", 200), ("used-3", "/api/x", 200),
                ("used-3", "/api/orders", 403)]
        for name, path, want in plan:
            status, headers, body = gw.request("GET", path, bearer(tokens[name]))
            assert status == want, f"{name} {path}: {status} {body[:200]!r} (expected {want})"
            if want == 403:
                assert error_of(body) == "insufficient_scope", body[:200]
        # Refusals that are no use of a token: not counted.
        assert status_of(gw, mistyped(tokens["idle-a"])) == 401
        settle(gw)
        pulled = usage_pull(op, gw)
        pulled_at = time.time()
        assert pulled_line(pulled, gw) == (3, 3, 6), pulled.stderr
        unused = op.run("unused", "--for", "3s", "--json", check=False)
        assert unused.returncode == 1, (unused.returncode, unused.stdout, unused.stderr)
        assert sorted(r["name"] for r in json.loads(unused.stdout)) == ["idle-a", "idle-b"], unused.stdout

        rows = listed(op)
        expected = {"used-1": (1, 0), "used-2": (2, 0), "used-3": (3, 1), "idle-a": (0, 0), "idle-b": (0, 0)}
        for name, (uses, denied) in expected.items():
            row = rows[name]
            got = (row["uses"], row["uses_30d"], row["denied_scope"])
            assert got == (uses, uses, denied), f"{name}: uses, uses_30d, denied_scope {got} (expected {(uses, uses, denied)})"
            if uses:
                assert row["last_used"] is not None, f"{name}: no last_used"
                assert int(first) - 1 <= instant(row["last_used"]) <= pulled_at, \
                    f"{name}: last_used {row['last_used']} not within the requests ({first:.0f}..{pulled_at:.0f})"
            else:
                assert row["last_used"] is None, f"{name}: last_used {row['last_used']} (never used)"
        shown = json.loads(op.run("show", "used-3", "--json").stdout)
        [source] = shown["usage_sources"]
        assert source["source"] == f"envoy {listener_url(gw)}" and source["instance"].startswith("envoy-"), source
        assert (source["token_id"], source["allowed"], source["denied_scope"]) == \
            (token_id_of(tokens["used-3"]), 3, 1), source

        again = usage_pull(op, gw)
        assert pulled_line(again, gw) == (3, 0, 0), again.stderr
        assert listed(op) == rows, "a second pull changed the counts"

        for _ in range(2):
            assert status_of(gw, tokens["used-2"]) == 200
        settle(gw)
        third = usage_pull(op, gw)
        assert pulled_line(third, gw) == (3, 1, 2), third.stderr
        now_rows = listed(op)
        assert now_rows["used-2"]["uses"] == 4, now_rows["used-2"]
        assert {n: r["uses"] for n, r in now_rows.items() if n != "used-2"} == \
            {n: r["uses"] for n, r in rows.items() if n != "used-2"}, now_rows
        unused = op.run("unused", "--for", "1h", "--json", check=False)
        assert unused.returncode == 0 and json.loads(unused.stdout) == [], (unused.returncode, unused.stdout)
    return "uses 1/2/3 (+1 denied_scope), 2 unused; second pull 0 new uses; +2 -> 4"


def test_usage_read_is_refused_unless_signed_by_the_admin_for_this_environment():
    """`GET /.well-known/tokengate/usage` on the listener: only a fresh read signed by an
    admin key for this gate's environment is answered (200, no-store, token ids and counts,
    no hash, no secret); unsigned, unknown key, another environment, a push signature: 401
    invalid_signature; signed 400 s ago or ahead: 401 signature_expired; POST: 405. None
    reaches the upstream, and none is a use of a token."""
    op = usage_operator()
    with op.gateway() as gw:
        token = op.create("svc", "--scopes", "orders:read")
        scoped_out = op.create("narrow")
        op.push(gw)
        eventually(lambda: status_of(gw, token) == 200, 2.0, "served")  # one use of svc
        assert status_of(gw, token) == 200
        assert status_of(gw, scoped_out, "/api/orders") == 403
        [seed] = op.seeds()
        env = op.environment
        stranger = hashlib.sha256(b"not the admin").hexdigest()
        now = int(time.time())
        refusals = [
            ("unsigned", None, "GET", 401, "invalid_signature"),
            ("empty header", "", "GET", 401, "invalid_signature"),
            ("malformed", f"t={now}", "GET", 401, "invalid_signature"),
            ("a key the bundle does not publish", usage_signature(stranger, env), "GET", 401, "invalid_signature"),
            ("another environment", usage_signature(seed, "other"), "GET", 401, "invalid_signature"),
            ("a push signature", usage_signature(seed, env, context="tokengate.push/v2"), "GET", 401,
             "invalid_signature"),
            ("signed 400 s ago", usage_signature(seed, env, now - 400), "GET", 401, "signature_expired"),
            ("signed 400 s ahead", usage_signature(seed, env, now + 400), "GET", 401, "signature_expired"),
            ("POST", usage_signature(seed, env), "POST", 405, None),
        ]
        failures = []
        for what, signature, method, want, error in refusals:
            status, headers, body = read_usage(gw, signature, method)
            if status != want or (error and error_of(body) != error):
                failures.append(f"{what}: {status} {body[:200]!r} (expected {want} {error})")
            if echoed(headers) is not None:
                failures.append(f"{what}: reached the upstream")
        assert not failures, "\n  ".join(failures)

        # A gate checks at most 10 reads a second (429 past that): a new second for these.
        time.sleep(1.0)
        status, headers, body = read_usage(gw, usage_signature(seed, env))
        assert status == 200, f"{status} {body[:300]!r}"
        assert echoed(headers) is None, "the usage read reached the upstream"
        assert header_values(headers, "cache-control") == ["no-store"], headers
        report = json.loads(body)
        assert set(report) == {"format", "instance", "environment", "taken_at", "tokens"}, report
        assert report["format"] == USAGE_CONTEXT and report["environment"] == env, report
        assert re.fullmatch(r"envoy-[0-9a-f]+", report["instance"]), report["instance"]
        assert abs(report["taken_at"] - time.time()) <= 2, report["taken_at"]
        by_id = {t["token_id"]: t for t in report["tokens"]}
        assert set(by_id) == {token_id_of(token), token_id_of(scoped_out)}, report["tokens"]
        for t in report["tokens"]:
            assert set(t) == {"token_id", "allowed", "denied_scope", "last_seen"}, t
        mine, narrow = by_id[token_id_of(token)], by_id[token_id_of(scoped_out)]
        assert (mine["allowed"], mine["denied_scope"]) == (2, 0), mine
        assert (narrow["allowed"], narrow["denied_scope"]) == (0, 1), narrow
        assert now - 10 <= mine["last_seen"] <= time.time() + 1, mine
        for secret in (token, scoped_out):
            digest = hashlib.sha256(secret.encode()).hexdigest()
            assert digest not in body.lower() and secret not in body, "the report holds a hash or a secret"
        assert not hex_strings(body), f"a 64-hex string in the report: {hex_strings(body)}"
        # The reads were no use of a token.
        again = json.loads(read_usage(gw, usage_signature(seed, env))[2])
        assert {t["token_id"]: t["allowed"] for t in again["tokens"]} == \
            {token_id_of(token): 2, token_id_of(scoped_out): 0}, again
        assert again["instance"] == report["instance"]
    return f"{len(refusals)} refusals; the signed read answered {len(report['tokens'])} tokens"


def test_usage_rotate_warns_when_the_previous_secret_is_still_used():
    """`rotate` ends the grace of the secret the last rotation replaced: when a pull showed
    that secret used after its replacement was issued, it warns on stderr naming it (and
    still rotates); when the previous secret was not used since its replacement, no warning."""
    op = usage_operator()
    with op.gateway() as gw:
        s0 = op.create("svc")
        op.push(gw)
        eventually(lambda: status_of(gw, s0) == 200, 2.0, "served")
        s1 = op.run("rotate", "svc", "--grace", "1h").stdout.strip()
        op.push(gw)
        eventually(lambda: status_of(gw, s1) == 200, 2.0, "the new secret served")
        assert status_of(gw, s0) == 200, "the old secret must pass during its grace"
        settle(gw)
        usage_pull(op, gw)
        time.sleep(1.1)  # s1's uses end a second before its own replacement is issued
        second = op.run("rotate", "svc", "--grace", "1h")
        s2 = second.stdout.strip()
        assert "warning" in second.stderr.lower() and token_id_of(s0) in second.stderr, \
            f"no warning naming {token_id_of(s0)}: {second.stderr!r}"
        assert s2 and s2 not in (s0, s1), "the rotation did not happen"
        op.push(gw)
        eventually(lambda: status_of(gw, s2) == 200, 2.0, "the third secret served")
        assert status_of(gw, s0) == 401, "a secret two rotations old passed"
        # s1 (now the previous secret) is not sent again: its last use predates s2.
        settle(gw)
        usage_pull(op, gw)
        third = op.run("rotate", "svc", "--grace", "1h")
        assert third.stdout.strip() and "warning" not in third.stderr.lower(), \
            f"a warning though {token_id_of(s1)} was not used after its replacement: {third.stderr!r}"
    return second.stderr.strip().splitlines()[0][:160]


def test_usage_off_answers_404_and_requests_still_pass():
    """TOKENGATE_USAGE=off in Envoy's environment: requests pass as ever, a signed usage read
    answers 404 usage_off (an unsigned one still 401), and `usage pull` fails (exit 2)."""
    op = usage_operator()
    with gateway(env={"TOKENGATE_ENVIRONMENT": op.environment, "TOKENGATE_USAGE": "off"}) as gw:
        token = op.create("svc")
        op.push(gw)
        eventually(lambda: status_of(gw, token) == 200, 2.0, "served with usage off")
        [seed] = op.seeds()
        assert read_usage(gw)[0] == 401
        status, headers, body = read_usage(gw, usage_signature(seed, op.environment))
        assert status == 404 and error_of(body) == "usage_off", f"{status} {body[:200]!r}"
        assert echoed(headers) is None
        pulled = usage_pull(op, gw, check=False)
        assert pulled.returncode == 2 and "usage_off" in pulled.stderr, (pulled.returncode, pulled.stderr)
        assert listed(op)["svc"]["uses"] == 0
        assert status_of(gw, token) == 200
    return "404 usage_off; requests 200"


def test_usage_counts_every_worker_thread():
    """With `--concurrency 4` requests on many connections land on every worker: one pull
    (after the wasm filter's flush period) counts every one of them exactly once."""
    op = usage_operator()
    with op.gateway(concurrency=4) as gw:
        a, b = op.create("svc-a"), op.create("svc-b")
        op.push(gw)
        eventually(lambda: status_of(gw, a) == 200 and status_of(gw, b) == 200, 2.0, "served")
        sent = {"svc-a": 1, "svc-b": 1}
        statuses, lock = {}, threading.Lock()
        deadline = time.monotonic() + 30

        def client(i):
            for j in range(20):  # a new connection per request: spread over the workers
                if time.monotonic() > deadline:
                    return
                name, token = ("svc-a", a) if (i + j) % 3 else ("svc-b", b)
                try:
                    status = status_of(gw, token)
                except (OSError, http.client.HTTPException) as e:
                    status = type(e).__name__
                with lock:
                    statuses[status] = statuses.get(status, 0) + 1
                    if status == 200:
                        sent[name] += 1

        threads = [threading.Thread(target=client, args=(i,)) for i in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert set(statuses) == {200}, statuses
        workers = {k: v for k, v in gw.stats().items()
                   if re.fullmatch(rf"listener\.127\.0\.0\.1_{gw.listen_port}\.worker_\d+\.downstream_cx_total", k)}
        assert sum(1 for v in workers.values() if v) >= 2, f"connections per worker: {workers}"
        settle(gw)
        pulled = usage_pull(op, gw)
        assert pulled_line(pulled, gw) == (2, 2, sum(sent.values())), (pulled.stderr, sent)
        rows = listed(op)
        assert {n: rows[n]["uses"] for n in sent} == sent, ({n: rows[n]["uses"] for n in sent}, sent)
    return f"{sum(sent.values())} requests over {sum(1 for v in workers.values() if v)} workers, all counted"


# --- rate limits: a rule's and a token's own, fixed windows on the wall clock ------------

def wait_for_window(period, lo, hi, after=None):
    """Sleeps until the wall clock is `lo` to `hi` seconds into an epoch-aligned window of
    `period` seconds (a minute: :00-:59; a second), in a window later than the one `after`
    (unix seconds) falls in, if given; returns that window's number (start // period)."""
    while True:
        now = time.time()
        window = int(now // period)
        if after is not None:
            window = max(window, int(after // period) + 1)
        into = now - window * period
        if lo <= into <= hi:
            return window
        if into > hi:
            window += 1
        time.sleep(max(0.0, window * period + lo - time.time()))


def sequence_case(sequence, index, step, second):
    """The step as a case sent in the unix second `second`: for a 429, `retry-after` and the
    `t` of `ratelimit` are the seconds from `second` to its minute's end, as the vector's
    `reset` is from `at` (conformance/src/lib.rs `Step::reset_at`)."""
    expect = json.loads(json.dumps(step["expect"]))
    reset = step.get("reset")
    if reset is not None:
        headers = expect["response_headers"]
        assert headers["retry-after"] == str(reset) and f";t={reset}" in headers["ratelimit"], \
            f"{sequence['name']}: a 429 step whose headers do not give its reset {reset}: {headers}"
        actual = 60 - second % 60
        headers["retry-after"] = str(actual)
        headers["ratelimit"] = headers["ratelimit"].replace(f";t={reset}", f";t={actual}")
    return {"name": f"{sequence['name']} (step {index + 1}, +{step['at']}s)",
            "request": step["request"], "expect": expect}


def run_sequence_step(gw, sequence, index, step):
    """Sends one step; its problems (check_case with the reset of the second it was sent in
    or of the one its answer came in, and the counter of its reason moved by 1) and status."""
    case = sequence_case(sequence, index, step, int(time.time()))
    name = counter(gw, case)
    before = gw.stat(name, 0)
    sent = int(time.time())
    status, headers, body, upstream = send(gw, case)
    received = int(time.time())
    for second in sorted({sent, received}):
        case = sequence_case(sequence, index, step, second)
        problems = check_case(case, status, headers, body, upstream)
        if not problems:
            break
    after = gw.stat(name, 0)
    if after != before + 1:
        problems.append(f"counter {name} moved {after - before} (expected 1)")
    return [f"{case['name']}: {p}" for p in problems], status


def sequences_in_one_envoy():
    """Every sequence's steps before +60 s in one minute (from 1 s to ~35 s into it), then
    the later ones in the next minute, in one fresh Envoy. None if a phase's requests
    straddled a minute boundary; else (failures, steps, 429s seen, 429s expected)."""
    env = vector_env()
    sequences = VECTORS["sequences"]
    failures, steps, refused = [], 0, 0
    expected = sum(1 for s in sequences for step in s["steps"] if step["expect"]["status"] == 429)
    with gateway(env=env, trusted_keys=VECTORS["trusted_keys"]) as gw:
        text = retime(VECTORS["bundles"]["limits"]["envoy"], int(time.time()) - VECTORS["now"], 2000)
        assert gw.push(text) == "accepted", gw.tail_log()
        minute, ended = wait_for_window(60, 1, 35), None
        for later in (False, True):  # the steps at +60 s or more: in the next minute
            if later:
                minute = wait_for_window(60, 1, 59, after=ended)
            started = time.time()
            for sequence in sequences:
                for index, step in enumerate(sequence["steps"]):
                    if (step["at"] >= 60) == later:
                        problems, status = run_sequence_step(gw, sequence, index, step)
                        failures += problems
                        steps += 1
                        refused += status == 429
            ended = time.time()
            if not int(started // 60) == int(ended // 60) == minute:
                return None
    return failures, steps, refused, expected


def test_every_conformance_sequence_through_envoy():
    """conformance/vectors.json `sequences` (the `limits` fixture: a rule's 3/min, tokens' own
    limits) on the real clock: the steps before +60 s in one minute, the rest in the next,
    each 429's Retry-After and RateLimit `t` recomputed from the second it was sent in."""
    total = sum(len(s["steps"]) for s in VECTORS["sequences"])
    assert VECTORS["sequences"] and all(s["bundle"] == "limits" for s in VECTORS["sequences"])
    for attempt in range(2):  # a phase across a minute boundary: once more, in a new Envoy
        outcome = sequences_in_one_envoy()
        if outcome is not None:
            break
    else:
        raise AssertionError("both attempts straddled a minute boundary")
    failures, steps, refused, expected = outcome
    assert not failures, f"{len(failures)} of {steps} sequence steps failed:\n  " + "\n  ".join(failures)
    assert steps == total, f"{steps} steps run of {total}"
    assert refused == expected and refused > 0, f"{refused} 429s (expected {expected})"
    return (f"{len(VECTORS['sequences'])} sequences, {steps} steps ({refused} of them 429) over two minutes"
            + (" (second attempt)" if attempt else ""))


RATE_POLICY = """\
[credentials]
sources = ["bearer"]
forward = false

[[rules]]
name = "limited"
path = { prefix = "/limited" }
access = "token"
rate_limit = { requests = 3, per = "second" }

[[rules]]
name = "everything-else"
path = { prefix = "/" }
access = "token"
"""


def rate_operator(policy=RATE_POLICY):
    op = Operator()
    path = os.path.join(op.dir, "policy.toml")
    with open(path, "w") as f:
        f.write(policy)
    op.run("policy", "set", path)
    return op


def too_many_problems(what, response, policy, quota, window, reset):
    """What is wrong with `response` (status, headers, body) as the 429 of `policy`."""
    status, headers, body = response
    problems = []
    if status != 429:
        problems.append(f"status {status} {body[:200]!r} (expected 429)")
    for name, want in [("retry-after", str(reset)),
                       ("ratelimit-policy", f'"{policy}";q={quota};w={window}'),
                       ("ratelimit", f'"{policy}";r=0;t={reset}')]:
        if header_values(headers, name) != [want]:
            problems.append(f"{name}: {header_values(headers, name)} (expected [{want!r}])")
    if header_values(headers, "www-authenticate"):
        problems.append(f"www-authenticate {header_values(headers, 'www-authenticate')}")
    try:
        parsed = json.loads(body)
    except ValueError:
        parsed = {}
    if parsed.get("error") != "rate_limited" or "error_description" not in parsed:
        problems.append(f"body {body[:200]!r} (expected error rate_limited)")
    if echoed(headers) is not None:
        problems.append("reached the upstream")
    return [f"{what}: {p}" for p in problems]


def passed_problems(what, response, subject):
    """What is wrong with `response` as a request forwarded for `subject`, unlimited."""
    status, headers, body = response
    upstream = echoed(headers)
    if status != 200 or upstream is None:
        return [f"{what}: {status} {body[:200]!r}, upstream reached {upstream is not None} (expected 200)"]
    problems = [f"{what}: {name} on a 200" for name in ("retry-after", "ratelimit", "ratelimit-policy")
                if header_values(headers, name)]
    if header_values(upstream["headers"], "x-tokengate-subject") != [subject]:
        problems.append(f"{what}: subject {header_values(upstream['headers'], 'x-tokengate-subject')}")
    return problems


def test_rate_limits_set_with_the_cli_429_per_rule_and_per_token_then_a_new_second():
    """`policy set` with a rule `limited` at 3/s, tokens a and b with no limit of their own
    and c with `create --rate 1/s`, `push envoy`; in one wall-clock second: a passes 3 times
    on /limited then is refused 429 (Retry-After 1, RateLimit-Policy "limited";q=3;w=1);
    b, on the same rule, still passes; c passes once on /limited and is refused on the
    catch-all rule ("token";q=1;w=1: its own limit, stricter, counted across rules). In
    the next second a passes again. The access log and denied.rate_limited count them."""
    op = rate_operator()
    with op.gateway() as gw:
        admin = f"http://127.0.0.1:{gw.admin_port}"
        a, b, c = op.create("a"), op.create("b"), op.create("c", "--rate", "1/s")
        op.push(gw, "--admin", admin)
        eventually(lambda: status_of(gw, b, "/api/x") == 200, 2.0, "served")  # no limit there
        limited = gw.stat_name("denied.rate_limited")
        get = lambda token, path: (lambda r: (r[0], r[1], r[2].decode(errors="replace")))(  # noqa: E731
            gw.request("GET", path, bearer(token)))
        ended, refused_before = None, None
        for attempt in range(3):  # each in a second after the last one's: fresh windows
            refused_before = gw.stat(limited, 0)
            second = wait_for_window(1, 0, 0.2, after=ended)
            started = time.time()
            responses = [("a 1st on /limited", get(a, "/limited/x")),
                         ("a 2nd on /limited", get(a, "/limited/x")),
                         ("a 3rd on /limited", get(a, "/limited/x")),
                         ("a 4th on /limited", get(a, "/limited/x")),
                         ("b on /limited", get(b, "/limited/x")),
                         ("c on /limited", get(c, "/limited/x")),
                         ("c on the catch-all", get(c, "/api/x"))]
            ended = time.time()
            if int(started) == int(ended) == second:
                break
        else:
            raise AssertionError("three attempts each straddled a second boundary")
        took = ended - started
        problems = []
        for what, response in responses[:3]:
            problems += passed_problems(what, response, "a")
        problems += too_many_problems(*responses[3], "limited", 3, 1, 1)
        problems += passed_problems(*responses[4], "b")
        problems += passed_problems(*responses[5], "c")
        problems += too_many_problems(*responses[6], "token", 1, 1, 1)
        assert not problems, "\n  ".join(problems)
        assert gw.stat(limited, 0) == refused_before + 2, f"{limited} moved {gw.stat(limited, 0) - refused_before}"

        wait_for_window(1, 0, 0.5, after=ended)
        problems = passed_problems("a in the next second", get(a, "/limited/x"), "a")
        assert not problems, "\n  ".join(problems)

        eventually(lambda: any("reason=rate_limited subject=c " in l for l in gw.access_log_lines()), 3.0,
                   "the access log's rate_limited lines")
        lines = gw.access_log_lines()
        refused_a = [l for l in lines if "reason=rate_limited subject=a " in l]
        refused_c = [l for l in lines if "reason=rate_limited subject=c " in l]
        assert refused_a and all('"GET /limited/x" 429 ' in l and "rule=limited" in l for l in refused_a), lines
        assert refused_c and all('"GET /api/x" 429 ' in l and "rule=everything-else" in l for l in refused_c), lines
        assert len(refused_a) + len(refused_c) == gw.stat(limited, 0), (gw.stat(limited, 0), lines)
        assert not any(t in l for t in (a, b, c) for l in lines), "a token reached the access log"
    return (f"7 requests in {took * 1000:.0f} ms: a 3x200 then 429, b 200, c 200 then 429 (its own 1/s), "
            f"a 200 the next second" + (f" (attempt {attempt + 1})" if attempt else ""))


def test_rate_limit_is_exact_per_envoy_process_across_four_worker_threads():
    """A token created with `--rate 20/min`, behind an Envoy with `--concurrency 4`: 80
    requests at once from 8 threads on 80 connections (spread over the workers), within one
    minute: exactly 20 pass and 60 are refused 429, counted once each. One counter for the
    process (the module's map, the wasm filter's shared data), exact under concurrency."""
    op = Operator()
    with op.gateway(concurrency=4) as gw:
        admin = f"http://127.0.0.1:{gw.admin_port}"
        probe = op.create("probe")
        token = op.create("burst", "--rate", "20/min")
        op.push(gw, "--admin", admin)
        eventually(lambda: status_of(gw, probe) == 200, 2.0, "served")  # burst's budget untouched
        limited, valid = gw.stat_name("denied.rate_limited"), gw.stat_name("allowed.valid")
        workers = re.compile(rf"listener\.127\.0\.0\.1_{gw.listen_port}\.worker_\d+\.downstream_cx_total")
        ended = None
        for attempt in range(2):  # across a minute boundary: once more, in a later minute
            wait_for_window(60, 1, 40, after=ended)
            stats = gw.stats()
            connections = {k: v for k, v in stats.items() if workers.fullmatch(k)}
            results, lock = [], threading.Lock()
            start = threading.Barrier(8)
            deadline = time.monotonic() + 30

            def client():
                start.wait(timeout=10)
                for _ in range(10):
                    if time.monotonic() > deadline:
                        return
                    try:
                        status, headers, _ = gw.request("GET", "/api/burst", bearer(token), timeout=5)
                        seen = (status, tuple(header_values(headers, "ratelimit-policy")),
                                echoed(headers) is not None)
                    except (OSError, http.client.HTTPException) as e:
                        seen = (type(e).__name__, (), False)
                    with lock:
                        results.append(seen)

            threads = [threading.Thread(target=client) for _ in range(8)]
            started = time.time()
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            ended = time.time()
            if int(started // 60) == int(ended // 60):
                break
        else:
            raise AssertionError("both attempts straddled a minute boundary")
        after = gw.stats()
        statuses = {}
        for status, _, _ in results:
            statuses[status] = statuses.get(status, 0) + 1
        assert statuses == {200: 20, 429: 60}, f"statuses of {len(results)} requests: {statuses}"
        assert all(reached == (status == 200) for status, _, reached in results), "a 429 reached the upstream"
        policies = {p for status, p, _ in results if status == 429}
        assert policies == {('"token";q=20;w=60',)}, policies
        for name, moved in ((limited, 60), (valid, 20)):
            assert after.get(name, 0) - stats.get(name, 0) == moved, \
                f"{name}: {stats.get(name)} -> {after.get(name)} (expected +{moved})"
        used = {k: after[k] - connections.get(k, 0) for k in after if workers.fullmatch(k)}
        busy = sum(1 for v in used.values() if v)
        assert sum(used.values()) == 80 and busy >= 2, f"new connections per worker: {used}"
    return (f"80 requests from 8 threads in {(ended - started) * 1000:.0f} ms over {busy} workers: "
            f"20 x 200, 60 x 429" + (" (second attempt)" if attempt else ""))


# --- signed short-lived tokens (JWTs): issuer add, mint, revoke --jti, issuer retire ------

LEEWAY = 30  # seconds a gate tolerates past `exp` (core/src/issuer.rs LEEWAY_SECONDS)
ISSUER_KEY = re.compile(r"tokengate-issuer-key/v1 ([a-z0-9][a-z0-9._-]*) (EdDSA|HS256) (\S+)\n?")


def signed_operator():
    """A store with the usage tests' policy (/api/orders needs orders:read, the rest any
    token) and two issuers: `ci` (EdDSA, deploy:* and orders:read, up to 1h) and `legacy`
    (HS256, orders:*, up to 15m), each key written by `issuer add --key-out`. Returns
    (operator, {kid: key file})."""
    op = rate_operator(USAGE_POLICY)
    keys = {kid: os.path.join(op.dir, f"{kid}.issuer-key") for kid in ("ci", "legacy")}
    op.run("issuer", "add", "ci", "--scopes", "deploy:*,orders:read", "--max-ttl", "1h",
           "--key-out", keys["ci"])
    op.run("issuer", "add", "legacy", "--alg", "hs256", "--scopes", "orders:*", "--max-ttl", "15m",
           "--key-out", keys["legacy"])
    for kid, path in keys.items():
        assert os.stat(path).st_mode & 0o077 == 0, f"{kid}'s key file is readable by others"
    return op, keys


def issuer_secret(key_file):
    """The `kid=<secret>` entry of TOKENGATE_ISSUER_SECRETS for an HS256 issuer's key file,
    as an operator copies it from the file `issuer add --key-out` wrote."""
    found = ISSUER_KEY.fullmatch(open(key_file).read())
    assert found and found.group(2) == "HS256", f"{key_file}: not an HS256 issuer key"
    return f"{found.group(1)}={found.group(3)}"


def mint(op, key_file, name, *args):
    """`tokengate mint NAME ... --issuer-key-file`: the compact JWT, alone on stdout."""
    token = op.run("mint", name, "--issuer-key-file", key_file, *args).stdout
    assert token.endswith("\n") and token.count("\n") == 1, f"mint printed more than a token: {token!r}"
    token = token.strip()
    assert token.startswith("eyJ") and token.count(".") == 2, f"not a compact JWT: {token!r}"
    return token


def claims(token):
    """The payload of a compact JWT (its middle part, base64url without padding)."""
    middle = token.split(".")[1]
    return json.loads(base64.urlsafe_b64decode(middle + "=" * (-len(middle) % 4)))


def passes(gw, token, path="/api/orders"):
    """Sends `token` to `path`, which must reach the upstream (200); returns the gate's
    identity headers the upstream received, {name: [values]}. A refusal says what the access
    log has for it: the gate's decision, and who answered (the gate, or the guard after it)."""
    status, headers, body = gw.request("GET", path, bearer(token))
    upstream = echoed(headers)
    if status != 200 or upstream is None:
        time.sleep(0.3)  # the access log is flushed every 100 ms
        raise AssertionError(f"{status} {body[:200]!r}; logged: {gw.access_log_lines()[-1:]}")
    names = ("x-tokengate-subject", "x-tokengate-token-id", "x-tokengate-issuer", "x-tokengate-scopes")
    return {n: header_values(upstream["headers"], n) for n in names}


def refused_for(gw, token, path, status, reason):
    """Sends `token` to `path`; what is wrong if it is not refused `status` with `reason`
    (the filter's denied.<reason> counter moved by exactly 1, nothing reached the upstream)."""
    counted = gw.stat_name(f"denied.{reason}")
    before = gw.stat(counted, 0)
    got, headers, body = gw.request("GET", path, bearer(token))
    problems = []
    if got != status or echoed(headers) is not None:
        problems.append(f"{got} {body[:200]!r}, upstream reached {echoed(headers) is not None} (expected {status})")
    if gw.stat(counted, 0) != before + 1:
        problems.append(f"{counted} moved {gw.stat(counted, 0) - before} (expected 1)")
    return problems


def test_signed_tokens_pass_at_once_without_a_push_then_revoke_retire_and_expiry_refuse_them():
    """The issue's "done when", with the real CLI: `issuer add` an EdDSA issuer and an HS256
    one (its secret, from the key file, in Envoy's TOKENGATE_ISSUER_SECRETS before Envoy
    starts), one `push envoy`. Then, with no push: a minted EdDSA token is 200 with its
    subject, jti, issuer and scopes at the upstream, the served version unchanged; an HS256
    one is 200; one minted without the route's scope is 403. `revoke --jti` + push: that
    token 401 revoked, a second token of the same subject still 200. `issuer retire` + push:
    its tokens 401 unknown_issuer. A `--ttl 1s` token is 200 until exp + 30 s leeway, then
    401 expired. No minted token ever reaches Envoy's log or access log."""
    op, keys = signed_operator()
    # Minted before Envoy starts (a mint needs no gate), so its 31 s run out while the rest
    # is checked.
    short = mint(op, keys["ci"], "blink", "--scopes", "orders:read", "--ttl", "1s")
    refused_from = claims(short)["exp"] + LEEWAY
    assert claims(short)["exp"] - claims(short)["iat"] == 1, claims(short)
    secrets = {"TOKENGATE_ISSUER_SECRETS": issuer_secret(keys["legacy"])}
    with op.gateway(env=secrets) as gw:
        admin = f"http://127.0.0.1:{gw.admin_port}"
        version = pushed_version(op.push(gw, "--admin", admin))  # served when it returns
        reloads = gw.stat(ECDS + "update_success")
        passes(gw, short)  # the 1 s token, at once

        first = mint(op, keys["ci"], "deploy-bot", "--scopes", "deploy:write,orders:read", "--ttl", "30m")
        second = mint(op, keys["ci"], "deploy-bot", "--scopes", "orders:read", "--ttl", "30m")
        legacy = mint(op, keys["legacy"], "legacy-job", "--scopes", "orders:read,orders:write", "--ttl", "10m")
        narrow = mint(op, keys["ci"], "deployer", "--scopes", "deploy:write", "--ttl", "5m")
        signed = gw.stat_name("allowed.signed")
        before = gw.stat(signed, 0)
        got = passes(gw, first)
        assert got == {"x-tokengate-subject": ["deploy-bot"], "x-tokengate-token-id": [claims(first)["jti"]],
                       "x-tokengate-issuer": ["ci"], "x-tokengate-scopes": ["deploy:write orders:read"]}, got
        got = passes(gw, legacy)  # HS256, checked with the secret from Envoy's environment
        assert got["x-tokengate-issuer"] == ["legacy"] and got["x-tokengate-subject"] == ["legacy-job"], got
        assert gw.stat(signed, 0) == before + 2, f"{signed} moved {gw.stat(signed, 0) - before}"
        problems = refused_for(gw, narrow, "/api/orders", 403, "insufficient_scope")
        assert not problems, "a token without orders:read: " + "; ".join(problems)
        # Every answer above came from the bundle of the one push: no reload since.
        assert gw.gate_stat(VERSION) == version and gw.stat(ECDS + "update_success") == reloads, \
            f"version {gw.gate_stat(VERSION)} (pushed {version}), ECDS updates {reloads} -> " \
            f"{gw.stat(ECDS + 'update_success')}"

        op.run("revoke", "--jti", claims(first)["jti"], "--reason", "e2e")
        revoked = pushed_version(op.push(gw, "--admin", admin))
        problems = refused_for(gw, first, "/api/orders", 401, "revoked")
        assert not problems, "the revoked token: " + "; ".join(problems)
        passes(gw, second)  # the subject's other token

        op.run("issuer", "retire", "legacy", "--reason", "e2e")
        retired = pushed_version(op.push(gw, "--admin", admin))
        problems = refused_for(gw, legacy, "/api/orders", 401, "unknown_issuer")
        assert not problems, "a retired issuer's token: " + "; ".join(problems)
        passes(gw, second)  # the other issuer's tokens

        # The 1 s token: still 200 a second before its leeway ends (unless the checks above
        # took that long), then 401 expired from exp + 30 s on.
        exp = claims(short)["exp"]
        time.sleep(max(0.0, min(refused_from - 1.3 - time.time(), LEEWAY)))
        last_pass = time.time() - exp
        if last_pass < LEEWAY - 1:
            passes(gw, short)
        time.sleep(max(0.0, min(refused_from - time.time(), 2)))
        deadline = time.monotonic() + 2
        while True:  # the gate's clock is whole seconds: it may count one more
            problems = refused_for(gw, short, "/api/orders", 401, "expired")
            if not problems or time.monotonic() > deadline:
                break
            time.sleep(0.1)
        expired_at = time.time() - exp
        assert not problems, f"the 1 s token at exp + {expired_at:.1f}s: " + "; ".join(problems)

        eventually(lambda: any("reason=expired" in l for l in gw.access_log_lines()), 3.0, "the access log's lines")
        lines = gw.access_log_lines()
        for reason in ("signed", "insufficient_scope", "revoked", "unknown_issuer", "expired"):
            assert any(f"reason={reason}" in l for l in lines), \
                f"no reason={reason} in the access log:\n" + "\n".join(lines)
        # Each line of a signed token names its issuer last, a refusal after verification its
        # subject and jti too; a kid that names no issuer of the bundle names none.
        revoked_line = next(l for l in lines if "reason=revoked" in l)
        assert f"token_id={claims(first)['jti']} " in revoked_line and " issuer=ci " in revoked_line, revoked_line
        assert all(" issuer=" not in l for l in lines if "reason=unknown_issuer" in l), lines
        log = open(gw.envoy_log, errors="replace").read()
        for token in (short, first, second, legacy, narrow):
            signature = token.rsplit(".", 1)[1]
            assert not any(token in l or signature in l for l in lines), "a signed token reached the access log"
            assert token not in log and signature not in log, "a signed token reached Envoy's log"
    return (f"version {version} served every mint; revoke -> {revoked}, retire -> {retired}; "
            f"the 1 s token 200 at exp + {last_pass:.1f}s, 401 expired at exp + {expired_at:.1f}s")


def test_hs256_issuer_without_its_secret_is_503_while_eddsa_tokens_pass():
    """An HS256 issuer named in the bundle whose secret Envoy's environment lacks: its tokens
    are 503 issuer_unavailable (the gate cannot check them: not the client's fault), Envoy's
    log warns naming the kid when the bundle loads, and the EdDSA issuer's tokens pass."""
    op, keys = signed_operator()
    with op.gateway() as gw:  # no TOKENGATE_ISSUER_SECRETS
        op.push(gw, "--admin", f"http://127.0.0.1:{gw.admin_port}")
        legacy = mint(op, keys["legacy"], "legacy-job", "--scopes", "orders:read", "--ttl", "10m")
        eddsa = mint(op, keys["ci"], "deploy-bot", "--scopes", "orders:read", "--ttl", "10m")
        problems = refused_for(gw, legacy, "/api/orders", 503, "issuer_unavailable")
        assert not problems, "HS256 without its secret: " + "; ".join(problems)
        assert passes(gw, eddsa)["x-tokengate-issuer"] == ["ci"]
        warnings = [l for l in open(gw.envoy_log, errors="replace").read().splitlines()
                    if "TOKENGATE_ISSUER_SECRETS" in l and "legacy" in l]
        assert warnings and all("][warning][" in l for l in warnings), "no warning naming legacy:\n" + gw.tail_log()
    return warnings[0].rsplit("tokengate: ", 1)[-1]


def in_terminal(argv, env, secret, timeout=20.0):
    """Runs argv on a new pseudo-terminal (its controlling terminal: stdin, stdout, stderr),
    waits for the prompt ("not echoed") and for the terminal's echo to be off, types `secret`
    and a newline, and reads everything the terminal shows until the command exits. Returns
    (exit code, what the terminal showed). Every wait is bounded by `timeout`."""
    deadline = time.monotonic() + timeout
    pid, fd = pty.fork()
    if pid == 0:  # the child: exec, or leave at once
        try:
            os.execve(argv[0], argv, env)
        finally:
            os._exit(127)
    shown = bytearray()

    def read_some():
        """Reads what is there within 50 ms; False at the end of the output."""
        ready, _, _ = select.select([fd], [], [], 0.05)
        if not ready:
            return True
        try:
            chunk = os.read(fd, 4096)
        except OSError:  # EIO: the child closed the terminal
            return False
        shown.extend(chunk)
        return bool(chunk)

    def until(done, what):
        while not done():
            if time.monotonic() > deadline:
                raise AssertionError(f"{what} within {timeout}s; the terminal showed {bytes(shown)!r}")
            if not read_some() and not done():
                raise AssertionError(f"{what}: the command ended; the terminal showed {bytes(shown)!r}")

    try:
        until(lambda: b"not echoed" in shown, "no prompt")
        # The prompt is printed before echo goes off: typing earlier would be echoed.
        until(lambda: not termios.tcgetattr(fd)[3] & termios.ECHO, "echo never went off")
        os.write(fd, secret.encode() + b"\n")
        while read_some():
            if time.monotonic() > deadline:
                raise AssertionError(f"the command did not end within {timeout}s; "
                                     f"the terminal showed {bytes(shown)!r}")
        _, status = os.waitpid(pid, 0)
        pid = None
        return os.waitstatus_to_exitcode(status), bytes(shown).decode(errors="replace")
    finally:
        if pid is not None:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
        os.close(fd)


@once  # the CLI alone: no Envoy
def test_import_and_check_read_a_secret_from_a_terminal_with_echo_off():
    """Review item "secrets read with echo off": `tokengate import` and `tokengate check` run
    in a terminal prompt for the secret and turn echo off, so the secret typed never shows on
    screen (or in scrollback); `check` then finds the imported token, so what was read is
    the secret typed."""
    op = Operator()
    secret = "legacy-" + hashlib.sha256(os.urandom(32)).hexdigest()[:57]
    assert len(secret) == 64
    code, shown = in_terminal(op.command("import", "legacy-tty", "--scopes", "orders:read"), op.env, secret)
    assert code == 0, f"import exited {code}: {shown!r}"
    assert secret not in shown and secret[:16] not in shown, f"the terminal showed the secret: {shown!r}"
    assert "legacy-tty" in op.run("list").stdout

    code, shown = in_terminal(op.command("check", "--path", "/api/x"), op.env, secret)
    assert code == 0, f"check exited {code}: {shown!r}"
    assert secret not in shown and secret[:16] not in shown, f"the terminal showed the secret: {shown!r}"
    assert "200 allow" in shown and "subject: legacy-tty" in shown, shown
    return shown.strip().splitlines()[-1]


@once  # both gateways at once
def test_every_shipped_envoy_config_validates():
    """Both shipped gateways (the module's gateway.yaml, gateway-wasm.yaml) pass Envoy's own
    validation as shipped; the shipped pre-push ECDS file is the harness's "no bundle yet"
    resource for the module (the twin of gateway.yaml's default_config); no shipped file
    asks Envoy for a signing key."""
    # Envoy as deployed: the environment's name and nothing else of tokengate's.
    env = {k: v for k, v in os.environ.items() if not k.startswith("TOKENGATE_")}
    env["TOKENGATE_ENVIRONMENT"] = "demo"
    for filter in FILTERS:
        relative = os.path.relpath(GATEWAY_YAMLS[filter], ROOT)
        proc = subprocess.run([envoy_binary(), "--mode", "validate", "-c", relative],
                              cwd=ROOT, capture_output=True, text=True, env=env, timeout=120)
        assert proc.returncode == 0, f"{relative}:\n" + proc.stdout + proc.stderr
    with tempfile.TemporaryDirectory() as d:
        fresh = os.path.join(d, "tokengate.ecds.json")
        write_ecds(fresh, module_path=MODULE_REL)
        assert open(fresh).read() == open(SHIPPED_ECDS).read(), \
            "stale: python3 envoy/harness.py empty-ecds envoy/run/tokengate.ecds.json"
    for path in (*GATEWAY_YAMLS.values(), SHIPPED_ECDS):
        assert "TOKENGATE_SIGNING_KEY" not in open(path).read(), path
    return ", ".join(os.path.basename(p) for p in GATEWAY_YAMLS.values()) + " valid"


TESTS = [v for k, v in list(globals().items()) if k.startswith("test_")]


def run(test, label):
    """Runs one test, prints its line; True if it passed."""
    started = time.monotonic()
    try:
        note = test()
        print(f"ok    [{label}] {test.__name__} ({time.monotonic() - started:.1f}s){': ' + note if note else ''}",
              flush=True)
        return True
    except Exception:  # noqa: BLE001 - every failure is reported, then the next test runs
        print(f"FAIL  [{label}] {test.__name__}\n{traceback.format_exc()}", flush=True)
        return False


def main(argv):
    global FILTER
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--filter", choices=FILTERS, default=os.environ.get("TOKENGATE_ENVOY_FILTER") or None,
                        help="run one filter's pass only (default: TOKENGATE_ENVOY_FILTER, else both)")
    parser.add_argument("names", nargs="*", metavar="NAME", help="run the tests whose names contain one")
    args = parser.parse_args(argv[1:])
    if args.filter not in (None, *FILTERS):
        parser.error(f"TOKENGATE_ENVOY_FILTER: one of {', '.join(FILTERS)}")
    chosen = [t for t in TESTS if not args.names or any(n in t.__name__ for n in args.names)]
    started, tally = time.monotonic(), {}
    # Tests that run no filter first, once; then a pass per filter, the shipped default first.
    passes = [("once", [t for t in chosen if getattr(t, "filters", None) == ()])]
    passes += [(f, [t for t in chosen if f in getattr(t, "filters", FILTERS)])
               for f in FILTERS if args.filter in (None, f)]
    for label, tests in passes:
        if label != "once":
            FILTER = label
        for test in tests:
            passed, failed = tally.get(label, (0, 0))
            tally[label] = (passed + 1, failed) if run(test, label) else (passed, failed + 1)
    passed = sum(p for p, _ in tally.values())
    failed = sum(f for _, f in tally.values())
    minutes, seconds = divmod(time.monotonic() - started, 60)
    per_pass = ", ".join(f"{label} {p}/{p + f}" for label, (p, f) in tally.items())
    print(f"envoy e2e: {passed} passed, {failed} failed ({per_pass}) in {int(minutes)}m{seconds:02.0f}s")
    return 1 if failed or not passed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
