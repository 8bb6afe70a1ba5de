#!/usr/bin/env python3
# The demo: the real CLI issues tokens, a real Envoy gates requests with them (stdlib only).
"""Called by scripts/demo.sh once the filter (the native dynamic module), the CLI and Envoy
are built and installed."""

import base64
import json
import os
import shutil
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "envoy"))
from harness import MODULE, Gateway  # noqa: E402

CLI = os.path.join(ROOT, "target", "debug", "tokengate")
DEMO = os.path.join(ROOT, "target", "demo")


def step(text):
    print(f"\033[1m==> {text}\033[0m", flush=True)


def cli(*args, stdin="", env=None):
    proc = subprocess.run([CLI, *args], input=stdin, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        sys.exit(f"tokengate {' '.join(args)}: {proc.stderr}")
    return proc.stdout.strip()


def main():
    # A fresh start: the previous demo's store, key and Envoy run directory go.
    shutil.rmtree(os.path.join(DEMO, "envoy"), ignore_errors=True)
    os.makedirs(DEMO, exist_ok=True)
    for name in os.listdir(DEMO):
        if name.startswith("tokengate."):
            os.remove(os.path.join(DEMO, name))
    os.environ["TOKENGATE_STORE"] = os.path.join(DEMO, "tokengate.db")
    os.environ["TOKENGATE_ACTOR"] = "demo"
    for name in ("TOKENGATE_SIGNING_KEY", "TOKENGATE_SIGNING_KEY_FILE", "TOKENGATE_KEY_COMMAND"):
        os.environ.pop(name, None)  # the demo's key is the key file init makes, nothing else

    step("tokengate init: a new store and Ed25519 signing key (the admin's alone) in target/demo/")
    cli("init", "--environment", "demo")
    cli("policy", "set", os.path.join(ROOT, "scripts", "demo-policy.toml"))
    step("issuing tokens (each is printed once, by `tokengate create`)")
    ci = cli("create", "ci-deploy", "--scopes", "deploy:write,orders:read", "--expires-in", "90d")
    probe = cli("create", "uptime-probe", "--prefix", "sk_test", "--scopes", "health:read")
    leaked = cli("create", "old-cron", "--scopes", "orders:read")
    export = cli("create", "nightly-export", "--scopes", "orders:read", "--rate", "2/min")
    cli("revoke", "old-cron", "--reason", "leaked in a build log")
    legacy = "7f3d9c1e5b2a48d6a0c4e8f1b3d5a7c9e1f3a5b7c9d1e3f5a7b9c1d3e5f7a9b1"
    cli("import", "billing-legacy", "--scopes", "orders:read", stdin=legacy + "\n")
    print(cli("list"))
    step("tokengate issuer add: an issuer of signed short-lived tokens (its Ed25519 public key "
         "goes into every bundle; its private key to target/demo/, for whoever mints)")
    issuer_key = os.path.join(DEMO, "tokengate.ci-jobs.key")
    cli("issuer", "add", "ci-jobs", "--scopes", "deploy:*,orders:read", "--max-ttl", "1h",
        "--key-out", issuer_key)
    print(cli("issuer", "list"))

    step("tokengate key public: all the gates get (public keys only; the private key stays with the admin)")
    trusted = cli("key", "public")
    print("  " + trusted)
    step("starting the echo upstream and Envoy 1.40 with the tokengate dynamic module (loopback only)")
    gw = Gateway(env={"TOKENGATE_ENVIRONMENT": "demo"}, run_dir=os.path.join(DEMO, "envoy"),
                 filter="module")
    gw.start()
    step("starting the Worker in workerd (Miniflare, local KV) in front of the same upstream")
    worker = subprocess.Popen(
        ["node", os.path.join(ROOT, "tests", "worker", "serve.mjs"),
         f"http://127.0.0.1:{gw.upstream_port}", trusted, "demo",
         "600,2"],  # a Rate Limiting binding per per-minute limit in use (wrangler.toml)
        stdout=subprocess.PIPE, text=True)
    worker_port = json.loads(worker.stdout.readline())["port"]
    admin = f"http://127.0.0.1:{gw.admin_port}"
    worker_url = f"http://127.0.0.1:{worker_port}"
    step("tokengate push envoy: signed bundle -> bundle file; its path, SHA-256 and the trusted public "
         "keys -> ECDS file -> Envoy reloads it, no restart; done once Envoy's admin endpoint shows it served")
    cli("push", "envoy", "--file", gw.ecds_path, "--module", MODULE, "--admin", admin)
    step("tokengate push worker: signed bundle -> the Worker checks it, writes only token hashes to KV; "
         "done once its status endpoint shows it served")
    cli("push", "worker", "--url", worker_url)
    step("tokengate status: what each gate serves, asked of the gate")
    print(cli("status", "--envoy-admin", admin, "--worker-url", worker_url))

    step("tokengate mint: a 30-minute token for a release job, signed by the issuer's key; every "
         "gate accepts it at once (no push) and refuses it once it expires")
    minted = cli("mint", "release-job", "--scopes", "deploy:write", "--ttl", "30m",
                 "--issuer-key-file", issuer_key)
    print(f"  {minted[:48]}… ({len(minted)} characters)")

    def bearer(t):
        return [("authorization", f"Bearer {t}")]

    requests = [
        ("public health check", "GET", "/healthz", []),
        ("no token", "GET", "/api/orders/42", []),
        ("ci-deploy reads orders", "GET", "/api/orders/42", bearer(ci)),
        ("ci-deploy deploys", "POST", "/deploy/web", bearer(ci)),
        ("probe deploys (scope missing)", "POST", "/deploy/web", bearer(probe)),
        ("probe reads /metrics (any-of)", "GET", "/metrics", bearer(probe)),
        ("legacy secret, X-Internal-Token", "GET", "/api/orders/7", [("x-internal-token", legacy)]),
        ("revoked token", "GET", "/api/orders/42", bearer(leaked)),
        ("mistyped token (checksum)", "GET", "/api/orders/42", bearer(ci[:-1] + ("A" if ci[-1] != "A" else "B"))),
        ("spoofed identity header", "GET", "/api/orders/42", [("x-tokengate-subject", "root")]),
        ("two credentials", "GET", "/api/orders/42", bearer(ci) + [("x-internal-token", ci)]),
        ("path traversal to /deploy", "POST", "/healthz/../deploy/web", []),
        ("no rule matches", "GET", "/admin", bearer(ci)),
        ("minted token (30 min, no push) deploys", "POST", "/deploy/web", bearer(minted)),
        ("minted token reads orders (scope missing)", "GET", "/api/orders/9", bearer(minted)),
        ("nightly-export (--rate 2/min), 1st", "GET", "/api/orders/1", bearer(export)),
        ("nightly-export, 2nd", "GET", "/api/orders/2", bearer(export)),
        ("nightly-export, 3rd in the minute", "GET", "/api/orders/3", bearer(export)),
    ]
    def outcome(status, resp_headers, body):
        echoed = [v for n, v in resp_headers if n.lower() == "x-echo"]
        if echoed:
            seen = json.loads(base64.b64decode(echoed[0]))
            subject = [v for n, v in seen["headers"] if n.lower() == "x-tokengate-subject"]
            return f"{status} {subject[0] if subject else 'passed'}"
        try:
            error = json.loads(body).get("error", "")
        except ValueError:
            error = body.decode(errors="replace")[:30]
        policy = [v for n, v in resp_headers if n.lower() == "ratelimit-policy"]
        if policy:
            retry = [v for n, v in resp_headers if n.lower() == "retry-after"]
            error += f" ({policy[0]}, retry after {retry[0] if retry else '?'} s)"
        return f"{status} {error}"

    rows = [("request", "Envoy: status, upstream subject or error", "Worker: status, origin subject or error")]
    for label, method, path, headers in requests:
        via_envoy = outcome(*gw.request(method, path, headers))
        via_worker = outcome(*gw.request(method, path, headers, port=worker_port))
        rows.append((label, via_envoy, via_worker))
    widths = [max(len(r[i]) for r in rows) for i in range(3)]
    step(f"the same requests through Envoy (127.0.0.1:{gw.listen_port}) and the Worker (127.0.0.1:{worker_port})")
    for i, row in enumerate(rows):
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths)))
        if i == 0:
            print("  ".join("-" * w for w in widths))

    step("tokengate usage pull: who used which token, asked of both gates (a read signed by the "
         "admin key; the gates answer token ids and counts only)")
    pulled = subprocess.run([CLI, "usage", "pull", "--envoy-url", f"http://127.0.0.1:{gw.listen_port}",
                             "--worker-url", worker_url], capture_output=True, text=True)
    if pulled.returncode != 0:
        sys.exit(f"tokengate usage pull: {pulled.stderr}")
    for line in pulled.stderr.strip().splitlines():
        print("  " + line)
    print(cli("list"))
    print(cli("usage", "subjects"))  # signed tokens, by the subject they were minted for

    step("what Envoy recorded (access log: the token name, never the token)")
    time.sleep(0.3)
    for line in gw.access_log_lines()[-4:]:
        print("  " + line)
    prefix = gw.stat_name("")  # "tokengate."
    print("  " + ", ".join(f"{k}={v}" for k, v in sorted(gw.stats().items())
                          if k.startswith(prefix) and v))

    print(f"""
Try it yourself (Envoy pid {gw.pid}, admin on 127.0.0.1:{gw.admin_port}):
  curl -i http://127.0.0.1:{gw.listen_port}/api/orders/1 -H 'Authorization: Bearer {ci}'
  curl -i http://127.0.0.1:{gw.listen_port}/api/orders/1
  curl -i http://127.0.0.1:{worker_port}/api/orders/1 -H 'X-Internal-Token: {legacy}'
  curl -s http://127.0.0.1:{worker_port}/.well-known/tokengate/status
  export TOKENGATE_STORE={os.environ['TOKENGATE_STORE']}
  {CLI} usage pull --envoy-url http://127.0.0.1:{gw.listen_port} --worker-url {worker_url} && {CLI} unused --for 1m
  {CLI} revoke ci-deploy --reason demo && {CLI} push envoy --file {gw.ecds_path} --admin http://127.0.0.1:{gw.admin_port}
  curl -s http://127.0.0.1:{gw.admin_port}/stats/prometheus | grep tokengate_
""")
    if sys.stdin.isatty() and "--no-wait" not in sys.argv:
        print("Envoy and the Worker keep running: press Ctrl-C to stop them.", flush=True)
        try:
            while gw.envoy.poll() is None:
                time.sleep(1)
        except KeyboardInterrupt:
            pass
    worker.terminate()
    worker.wait(10)
    gw.close()
    print("stopped Envoy, the Worker and the upstream.")


if __name__ == "__main__":
    main()
