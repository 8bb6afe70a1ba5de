#!/usr/bin/env python3
"""Writes conformance/vectors.json: fixture bundles and the cases every target must pass.

The token format, checksum and hashing (README.md), the signed tokengate.bundle/v2
bundle (docs/trust.md: envelope, payload, key ids, Ed25519 signatures) and signed
short-lived tokens (compact JWS, EdDSA or HS256) are implemented here a second time,
independently of the Rust code: the targets loading these bundles is itself a check.
Fixture tokens and signing keys come from fixed bytes and Ed25519 and HMAC signing are
deterministic, so the file is reproducible:

    python3 conformance/generate.py        # rewrite vectors.json
    python3 conformance/generate.py --check  # fail if vectors.json is stale
"""
import base64, hashlib, hmac, json, sys, zlib
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

ALPHABET = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
NOW = 1_767_225_600  # 2026-01-01T00:00:00Z
DAY = 86_400
ENVIRONMENT = "conformance"
FORMAT = "tokengate.bundle/v2"
# Fixture private keys: 32-byte Ed25519 seeds. B is the new key of a rotation; the retired
# key is one a gate no longer trusts; OTHER is never trusted by any gate.
KEY_A = hashlib.sha256(b"tokengate conformance key A").digest()
KEY_B = hashlib.sha256(b"tokengate conformance key B").digest()
KEY_RETIRED = hashlib.sha256(b"tokengate conformance key retired").digest()
KEY_OTHER = hashlib.sha256(b"tokengate conformance key other").digest()
# Signed-token issuers: keys of their own, never a bundle signer's (a key signs bundles or
# tokens, never both). FORGER is no issuer's key; HS_WRONG is not legacy-hs's secret.
ISSUER_CI = hashlib.sha256(b"tokengate conformance issuer ci").digest()
ISSUER_SHORT = hashlib.sha256(b"tokengate conformance issuer short").digest()
ISSUER_FORGER = hashlib.sha256(b"tokengate conformance issuer forger").digest()
ISSUER_AUD = hashlib.sha256(b"tokengate conformance issuer aud").digest()
HS_SECRET = hashlib.sha256(b"tokengate conformance issuer legacy-hs").digest()  # 32 bytes
HS_WRONG = hashlib.sha256(b"tokengate conformance issuer wrong secret").digest()
TEN_YEARS = 315_360_000  # the longest max_lifetime a bundle may give an issuer


def base62(data: bytes, width: int) -> str:
    n = int.from_bytes(data, "big")
    out = ""
    for _ in range(width):
        n, r = divmod(n, 62)
        out = ALPHABET[r] + out
    assert n == 0
    return out


def make_token(prefix: str, seed: str) -> str:
    body = base62(hashlib.sha256(b"tokengate fixture " + seed.encode()).digest(), 43)
    head = f"{prefix}_{body}"
    return head + base62(zlib.crc32(head.encode()).to_bytes(4, "big"), 6)


def sha(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def record(name, token, scopes, created=NOW - 30 * DAY, not_before=None, expires=None,
           revoked=None, previous=None, grace=None, rate=None):
    """A token record as the CLI writes it: optional members only when set; the token id
    is not in it (targets derive it from the hash)."""
    out = {"name": name, "hash": sha(token), "scopes": scopes, "created_at": created}
    for member, value in [("not_before", not_before), ("expires_at", expires),
                          ("revoked_at", revoked)]:
        if value is not None:
            out[member] = value
    if previous is not None:
        out["previous"] = {"hash": sha(previous), "grace_until": grace}
    if rate is not None:
        out["rate_limit"] = rate
    return out


def rule(name, path, access="token", methods=(), host=None, all_of=(), any_of=(), cf_access=False,
         rate=None):
    out = {"name": name, "path": path, "methods": list(methods), "host": host,
           "access": access, "all_of": list(all_of), "any_of": list(any_of), "cf_access": cf_access}
    if rate is not None:
        out["rate_limit"] = rate
    return out


def per_minute(requests):
    return {"requests": requests, "per": "minute"}


def compact(value) -> str:
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False)


def pub(seed: bytes) -> str:
    raw = Ed25519PrivateKey.from_private_bytes(seed).public_key().public_bytes(
        Encoding.Raw, PublicFormat.Raw)
    return raw.hex()


def kid(seed: bytes) -> str:
    return "kid_" + hashlib.sha256(bytes.fromhex(pub(seed))).hexdigest()[:16]


def sign(seed: bytes, payload_text: str) -> dict:
    """One signature entry: the key covers the payload's exact bytes, nothing else."""
    signature = Ed25519PrivateKey.from_private_bytes(seed).sign(payload_text.encode())
    return {"key_id": kid(seed), "signature": signature.hex()}


def envelope(payload_text: str, signatures: list, fmt=FORMAT, extra="") -> str:
    """The bundle text, by concatenation: the payload goes in verbatim, so the bytes signed
    are exactly the bytes a gate reads between the payload's braces."""
    return (f'{{"format":{compact(fmt)},"signatures":{compact(signatures)},'
            f'"payload":{payload_text}{extra}}}')


def publish(payload: dict, signers: list) -> str:
    text = compact(payload)
    return envelope(text, [sign(seed, text) for seed in signers])


def bundle(version, tokens, policy, sources, forward=False, revoke_all_at=None, target="envoy",
           keys=None, cloudflare_access=None, issuers=None, revoked_jtis=None):
    """A payload as the admin writes it: the optional members only when set, never null."""
    out = {"version": version, "issued_at": NOW - 60, "environment": ENVIRONMENT,
           "target": target, "keys": keys or [pub(KEY_A)], "policy": {"rules": policy},
           "credentials": {"sources": sources, "forward": forward}, "tokens": tokens}
    for member, value in [("revoke_all_at", revoke_all_at), ("cloudflare_access", cloudflare_access),
                          ("issuers", issuers), ("revoked_jtis", revoked_jtis)]:
        if value is not None:
            out[member] = value
    return out


T = {name: make_token(prefix, name) for name, prefix in [
    ("ci-deploy", "sk_live"), ("monitor", "sk_test"), ("orders-admin", "sk_live"),
    ("root", "sk_live"), ("revoked", "sk_live"), ("expiring", "sk_live"),
    ("future", "sk_live"), ("rotated-old", "sk_live"), ("rotated-new", "sk_live"),
    ("no-scopes", "sk_live"), ("at-cutoff", "sk_live"), ("after-cutoff", "sk_live"),
    ("never-issued", "sk_live"), ("query-user", "sk_live"), ("revoked-by-all", "sk_live"),
    ("revoked-before-all", "sk_live"), ("limit-a", "sk_live"), ("pair-1", "sk_live"),
    ("pair-2", "sk_live"), ("capped", "sk_live"), ("roomy", "sk_live"),
    ("capped-public", "sk_live"), ("spread", "sk_live")]}
LEGACY = hashlib.sha256(b"legacy INTERNAL_SERVICE_TOKEN").hexdigest()  # 64 hex chars

POLICY = [
    rule("health", {"exact": "/healthz"}, "public", methods=["GET", "HEAD"]),
    rule("docs", {"prefix": "/docs"}, "public"),
    rule("admin", {"prefix": "/admin"}, all_of=["admin"]),
    rule("orders-write", {"prefix": "/api/orders"}, methods=["POST", "PUT", "DELETE"],
         all_of=["orders:write"]),
    rule("orders-read", {"prefix": "/api/orders"}, methods=["GET", "HEAD"], all_of=["orders:read"]),
    rule("deploy", {"prefix": "/deploy"}, host="ci.internal", all_of=["deploy:write"]),
    rule("metrics", {"exact": "/metrics"}, any_of=["health:read", "metrics:read"]),
    rule("api", {"prefix": "/api"}),
]
SOURCES = ["bearer", "header:x-internal-token", "header:x-internal-api-key"]

MAIN_TOKENS = [
    record("ci-deploy", T["ci-deploy"], ["deploy:write", "orders:read"]),
    record("monitor", T["monitor"], ["health:read"]),
    record("orders-admin", T["orders-admin"], ["orders:*"]),
    record("root", T["root"], ["*"]),
    record("revoked", T["revoked"], ["orders:read"], revoked=NOW - DAY),
    record("expiring", T["expiring"], ["orders:read"], expires=NOW + 3600),
    record("future", T["future"], ["orders:read"], not_before=NOW + 600),
    record("rotated", T["rotated-new"], ["orders:read"], created=NOW - 100,
           previous=T["rotated-old"], grace=NOW + 300),
    record("no-scopes", T["no-scopes"], []),
    record("legacy-service", LEGACY, ["orders:read"]),
]
CUTOFF = NOW - 3600
REVOKE_ALL_TOKENS = [
    record("at-cutoff", T["at-cutoff"], ["*"], created=CUTOFF),
    record("after-cutoff", T["after-cutoff"], ["*"], created=CUTOFF + 1),
    record("root", T["root"], ["*"]),
    # As `tokengate revoke-all` leaves them: every record revoked at the cut-off itself, or
    # earlier for a token revoked on its own before.
    record("revoked-by-all", T["revoked-by-all"], ["*"], created=CUTOFF - 10, revoked=CUTOFF),
    record("revoked-before-all", T["revoked-before-all"], ["*"], created=CUTOFF - 10,
           revoked=CUTOFF - 5),
]

# Rate limits: per minute, the one period every target counts (the Worker's Cloudflare
# binding has 10 s and 60 s windows only). Each sequence has tokens of its own, so a target
# on a real clock can run them all in one window.
LIMITS_POLICY = [
    rule("health", {"exact": "/healthz"}, "public", methods=["GET"]),
    rule("limited", {"prefix": "/limited"}, rate=per_minute(3)),
    rule("metered", {"prefix": "/metered"}, rate=per_minute(3)),
    rule("api", {"prefix": "/api"}),
]
LIMITS_TOKENS = [
    record("limit-a", T["limit-a"], ["orders:read"]),
    record("pair-1", T["pair-1"], ["orders:read"]),
    record("pair-2", T["pair-2"], ["orders:read"]),
    record("capped", T["capped"], [], rate=per_minute(2)),  # stricter than the rule's 3
    record("roomy", T["roomy"], [], rate=per_minute(100)),  # the rule's 3 is stricter
    record("capped-public", T["capped-public"], [], rate=per_minute(1)),
    record("spread", T["spread"], [], rate=per_minute(4)),  # more than either rule's 3
]



def issuer(kid, alg, scopes, max_lifetime, public_key=None, audience=None):
    """An issuer as the bundle lists it, members in the gate's order; an HS256 issuer has no
    public key: its secret is given to each gate beside the bundle, never in it. With an
    audience, its tokens must name it in `aud`."""
    out = {"kid": kid, "alg": alg}
    if public_key is not None:
        out["public_key"] = public_key
    if audience is not None:
        out["audience"] = audience
    return {**out, "scopes": scopes, "max_lifetime": max_lifetime}


ISSUERS = [
    issuer("ci", "EdDSA", ["deploy:*", "orders:read"], TEN_YEARS, pub(ISSUER_CI)),
    issuer("legacy-hs", "HS256", ["orders:*"], TEN_YEARS),
    issuer("short", "EdDSA", ["orders:read"], 3600, pub(ISSUER_SHORT)),
    issuer("aud", "EdDSA", ["orders:read"], TEN_YEARS, pub(ISSUER_AUD),
           audience="tokengate-conformance"),
]
REVOKED_JTIS = [{"issuer": "ci", "jti": "revoked-jti-1"}]
# An ordinary record too, so that `signed` is a normal bundle that also names issuers.
SIGNED_TOKENS = [record("ci-deploy", T["ci-deploy"], ["deploy:write", "orders:read"])]

BUNDLES = {
    "main": lambda t: bundle(10, MAIN_TOKENS, POLICY, SOURCES, target=t),
    "revoke-all": lambda t: bundle(11, REVOKE_ALL_TOKENS, POLICY, SOURCES,
                                   revoke_all_at=CUTOFF, target=t),
    "query": lambda t: bundle(12, [record("query-user", T["query-user"], ["orders:read"])],
                              POLICY, ["bearer", "query:access_token"], target=t),
    "forward": lambda t: bundle(13, [record("ci-deploy", T["ci-deploy"], ["*"])],
                                POLICY, SOURCES, forward=True, target=t),
    # Mid-rotation: both keys published and signing, so a gate trusting either one loads it.
    "rotation": lambda t: bundle(14, MAIN_TOKENS, POLICY, SOURCES, target=t,
                                 keys=[pub(KEY_A), pub(KEY_B)]),
    "limits": lambda t: bundle(15, LIMITS_TOKENS, LIMITS_POLICY, SOURCES, target=t,
                               issuers=ISSUERS),
    "signed": lambda t: bundle(16, SIGNED_TOKENS, POLICY, SOURCES, target=t, issuers=ISSUERS,
                               revoked_jtis=REVOKED_JTIS),
}
SIGNED_BY = {"rotation": [KEY_A, KEY_B]}  # every other fixture: KEY_A alone

REALM = 'Bearer realm="tokengate"'
INVALID = f'{REALM}, error="invalid_token"'
BAD_REQUEST = f'{REALM}, error="invalid_request"'
SPOOF = [("x-tokengate-subject", "root"), ("X-Tokengate-Scopes", "*"),
         ("x-tokengate-token-id", "tid_0000000000000000"), ("x-tokengate-extra", "1")]
SPOOF_NAMES = ["x-tokengate-extra"]
# CGI, WSGI, PHP and Rack origins read `x_tokengate_subject` as HTTP_X_TOKENGATE_SUBJECT.
UNDERSCORE_SPOOF = [("x_tokengate_subject", "root"), ("X_Tokengate_Scopes", "*"),
                    ("x-tokengate_token-id", "tid_0000000000000000")]
UNDERSCORE_NAMES = [name for name, _ in UNDERSCORE_SPOOF]

cases = []


def case(name, path="/api/orders/1", method="GET", headers=(), bundle="main", now=NOW,
         authority="api.internal", clock_edge=False, proxy_may_reject=False, **expect):
    cases.append({"name": name, "bundle": bundle, "now": now, "clock_edge": clock_edge,
                  "proxy_may_reject": proxy_may_reject,
                  "request": {"method": method, "path": path, "authority": authority,
                              "headers": [list(h) for h in headers]},
                  "expect": expect})


def bearer(token):
    return [("authorization", f"Bearer {token}")]


def allow(name, token_name, scopes, headers, upstream_absent=("authorization",), **kw):
    token_id = "tid_" + sha(T.get(token_name, LEGACY))[:16]
    subject = {"rotated-old": "rotated", "rotated-new": "rotated"}.get(token_name, token_name)
    upstream = {"x-tokengate-subject": subject, "x-tokengate-token-id": token_id}
    absent = list(upstream_absent) + SPOOF_NAMES
    # A token without scopes gets no x-tokengate-scopes header (never an empty one).
    if scopes:
        upstream["x-tokengate-scopes"] = scopes
    elif "x-tokengate-scopes" not in absent:
        absent.append("x-tokengate-scopes")
    case(name, headers=headers, status=200, reason="valid", upstream_headers=upstream,
         upstream_absent=absent, **kw)


def deny401(name, headers, reason, **kw):
    case(name, headers=headers, status=401, reason=reason, error="invalid_token",
         response_headers={"www-authenticate": INVALID}, **kw)


def deny400(name, headers, reason, **kw):
    case(name, headers=headers, status=400, reason=reason, error="invalid_request",
         response_headers={"www-authenticate": BAD_REQUEST}, **kw)


def forbid(name, headers, needed, **kw):
    case(name, headers=headers, status=403, reason="insufficient_scope",
         error="insufficient_scope",
         response_headers={"www-authenticate":
                           f'{REALM}, error="insufficient_scope", scope="{needed}"'}, **kw)


CI = "deploy:write orders:read"
# --- the decision table: passes -------------------------------------------------------
case("public exact route passes without credential", path="/healthz", status=200, reason="public")
case("public prefix route passes", path="/docs/getting-started", status=200, reason="public")
case("public route with HEAD passes", path="/healthz", method="HEAD", status=200, reason="public")
allow("valid bearer token passes with identity headers", "ci-deploy", CI, bearer(T["ci-deploy"]))
allow("valid token in x-internal-token", "ci-deploy", CI, [("x-internal-token", T["ci-deploy"])],
      upstream_absent=("x-internal-token",))
allow("valid token in x-internal-api-key", "ci-deploy", CI,
      [("x-internal-api-key", T["ci-deploy"])], upstream_absent=("x-internal-api-key",))
allow("imported legacy secret passes", "legacy-service", "orders:read",
      [("x-internal-token", LEGACY)], upstream_absent=("x-internal-token",))
allow("sk_test prefix token passes on any-of rule", "monitor", "health:read",
      bearer(T["monitor"]), path="/metrics")
allow("x:* grant covers orders:write", "orders-admin", "orders:*", bearer(T["orders-admin"]),
      method="POST", path="/api/orders")
allow("x:* grant covers orders:read", "orders-admin", "orders:*", bearer(T["orders-admin"]))
allow("* grant covers admin", "root", "*", bearer(T["root"]), path="/admin/users")
allow("* grant covers any-of", "root", "*", bearer(T["root"]), path="/metrics")
allow("token-only rule needs no scope", "no-scopes", "", bearer(T["no-scopes"]), path="/api/misc")
allow("host rule matches its host", "ci-deploy", CI, bearer(T["ci-deploy"]), path="/deploy/x",
      authority="ci.internal")
allow("host rule matches its host with a trailing dot", "ci-deploy", CI, bearer(T["ci-deploy"]),
      path="/deploy/x", authority="ci.internal.")
forbid("host rule binds its host with a trailing dot and a port", bearer(T["monitor"]),
       "deploy:write", path="/deploy/x", authority="CI.internal.:443")
allow("host match ignores port and case", "ci-deploy", CI, bearer(T["ci-deploy"]),
      path="/deploy/x", authority="CI.Internal:8443")
allow("bearer scheme is case-insensitive", "ci-deploy", CI,
      [("authorization", f"bEaReR {T['ci-deploy']}")])
allow("BEARER upper case", "ci-deploy", CI, [("Authorization", f"BEARER {T['ci-deploy']}")])
allow("several spaces after Bearer", "ci-deploy", CI,
      [("authorization", f"Bearer    {T['ci-deploy']}")])
allow("trailing whitespace is dropped", "ci-deploy", CI,
      [("authorization", f"Bearer {T['ci-deploy']}  ")])
allow("header names are case-insensitive", "ci-deploy", CI,
      [("X-Internal-Token", T["ci-deploy"])], upstream_absent=("x-internal-token",))
allow("non-bearer authorization is left for the upstream", "ci-deploy", CI,
      [("x-internal-token", T["ci-deploy"]), ("authorization", "Basic dXNlcjpwYXNz")],
      upstream_absent=("x-internal-token",))
# --- 401 without credential ------------------------------------------------------------
for name, headers in [("no credential", []),
                      ("basic authorization is not a credential", [("authorization", "Basic abc")]),
                      ("Bearer without separator is another scheme",
                       [("authorization", "Bearer" + T["ci-deploy"])]),
                      ("unconfigured header is not a credential", [("x-api-key", T["ci-deploy"])])]:
    case(name, headers=headers, status=401, reason="no_credential", error="missing_token",
         response_headers={"www-authenticate": REALM})
# --- 401 invalid token -----------------------------------------------------------------
bad_check = T["ci-deploy"][:-1] + ("A" if T["ci-deploy"][-1] != "A" else "B")
deny401("checksum-failing token", bearer(bad_check), "checksum")
flipped = T["ci-deploy"][:20] + ("x" if T["ci-deploy"][20] != "x" else "y") + T["ci-deploy"][21:]
deny401("one flipped body character fails the checksum", bearer(flipped), "checksum")
deny401("well-formed but never issued", bearer(T["never-issued"]), "unknown")
deny401("unknown opaque secret", [("x-internal-token", "not-a-real-secret-value-123")], "unknown")
deny401("revoked token", bearer(T["revoked"]), "revoked")
deny401("expired token, one second after", bearer(T["expiring"]), "expired", now=NOW + 3601)
deny401("expired exactly at expiry", bearer(T["expiring"]), "expired", now=NOW + 3600, clock_edge=True)
allow("valid one second before expiry", "expiring", "orders:read", bearer(T["expiring"]),
      now=NOW + 3599, clock_edge=True)
deny401("not yet valid", bearer(T["future"]), "not_yet_valid")
deny401("not yet valid one second before not-before", bearer(T["future"]), "not_yet_valid",
        now=NOW + 599, clock_edge=True)
allow("valid exactly at not-before", "future", "orders:read", bearer(T["future"]),
      now=NOW + 600, clock_edge=True)
allow("rotated token passes during grace", "rotated-old", "orders:read", bearer(T["rotated-old"]))
allow("new token passes during grace", "rotated-new", "orders:read", bearer(T["rotated-new"]))
allow("rotated token passes one second before grace ends", "rotated-old", "orders:read",
      bearer(T["rotated-old"]), now=NOW + 299, clock_edge=True)
deny401("rotated token fails exactly at grace end", bearer(T["rotated-old"]),
        "rotation_grace_over", now=NOW + 300, clock_edge=True)
deny401("rotated token fails after grace", bearer(T["rotated-old"]), "rotation_grace_over",
        now=NOW + 3600)
allow("new token passes after grace", "rotated-new", "orders:read", bearer(T["rotated-new"]),
      now=NOW + 3600)
deny401("empty bearer token", [("authorization", "Bearer")], "empty")
deny401("empty bearer token with space", [("authorization", "Bearer ")], "empty")
deny401("empty named header", [("x-internal-token", "")], "empty")
deny401("10 KB token is rejected before hashing", bearer("a" * 10240), "too_long")
deny401("token one over the limit", bearer("b" * 513), "too_long")
deny401("token with internal space", [("authorization", f"Bearer {T['ci-deploy'][:10]} x")],
        "malformed")
deny401("non-ASCII bytes in token", [("x-internal-token", "sk_live_\u00e9\u00e9\u00e9\u00e9")],
        "malformed")
case("tab after Bearer is not the Bearer scheme", headers=[("authorization", f"Bearer\t{T['ci-deploy']}")],
     status=401, reason="no_credential", error="missing_token", response_headers={"www-authenticate": REALM})
deny401("token case changed fails the checksum", bearer(T["ci-deploy"].upper().replace("SK_LIVE", "sk_live")),
        "checksum")
deny401("prefix swapped fails the checksum", bearer("sk_test" + T["ci-deploy"][7:]), "checksum")
deny401("hash of a token is not a token", bearer(sha(T["ci-deploy"])), "unknown")
# --- revoke-all cut-off ----------------------------------------------------------------
deny401("revoke-all revokes tokens created before", bearer(T["root"]), "revoked_all",
        bundle="revoke-all")
deny401("revoke-all revokes tokens created exactly at the cut-off", bearer(T["at-cutoff"]),
        "revoked_all", bundle="revoke-all")
deny401("a record revoke-all marked revoked reports revoke-all", bearer(T["revoked-by-all"]),
        "revoked_all", bundle="revoke-all")
deny401("a record revoked before the revoke-all reports its own revocation",
        bearer(T["revoked-before-all"]), "revoked", bundle="revoke-all")
case("token created after the cut-off passes", bundle="revoke-all", headers=bearer(T["after-cutoff"]),
     status=200, reason="valid", upstream_headers={"x-tokengate-subject": "after-cutoff"})
# --- 403 scopes ------------------------------------------------------------------------
forbid("read-only token cannot write", bearer(T["ci-deploy"]), "orders:write", method="POST",
       path="/api/orders")
forbid("token lacks admin", bearer(T["ci-deploy"]), "admin", path="/admin")
forbid("any-of unsatisfied names the any-of list", bearer(T["ci-deploy"]),
       "health:read metrics:read", path="/metrics")
forbid("x:* does not cover another namespace", bearer(T["orders-admin"]), "admin", path="/admin/x")
forbid("no-scope token on scoped route", bearer(T["no-scopes"]), "orders:read")
# --- rule matching ---------------------------------------------------------------------
case("no rule matches: fail closed", path="/elsewhere", headers=bearer(T["root"]), status=403,
     reason="no_rule", error="access_denied", response_absent=["www-authenticate"])
case("/apix is not under /api", path="/apix", headers=bearer(T["root"]), status=403,
     reason="no_rule", error="access_denied")
allow("/api itself is under /api", "no-scopes", "", bearer(T["no-scopes"]), path="/api")
case("/healthz/x is not the exact route", path="/healthz/x", status=403, reason="no_rule",
     error="access_denied")
case("public rule is method-bound: POST /healthz", path="/healthz", method="POST", status=403,
     reason="no_rule", error="access_denied")
case("lower-case method does not match GET", path="/healthz", method="get", status=403,
     reason="no_rule", error="access_denied", proxy_may_reject=True)
allow("lower-case method falls through to the catch-all api rule", "no-scopes", "",
      bearer(T["no-scopes"]), method="get", path="/api/orders", proxy_may_reject=True)
case("host-bound rule does not match another host", path="/deploy/x", authority="evil.internal",
     headers=bearer(T["ci-deploy"]), status=403, reason="no_rule", error="access_denied")
# --- paths -----------------------------------------------------------------------------
for name, path in [("dot-dot into public", "/docs/../admin"),
                   ("encoded dot-dot", "/docs/%2e%2e/admin"),
                   ("upper-case encoded dot-dot", "/docs/%2E%2E/admin"),
                   ("double slash", "//admin")]:
    case(f"{name} resolves before matching", path=path, status=401, reason="no_credential",
         error="missing_token")
allow("dot-dot is resolved and the normalised path forwarded", "root", "*", bearer(T["root"]),
      path="/docs/../admin/x", upstream_path="/admin/x")
allow("encoded unreserved characters are decoded for the upstream", "root", "*", bearer(T["root"]),
      path="/%61dmin?x=1", upstream_path="/admin?x=1")
for name, path in [("encoded slash", "/api%2Forders"), ("encoded lower-case slash", "/docs%2f..%2fadmin"),
                   ("encoded backslash", "/docs/%5c../admin"), ("raw backslash", "/docs\\..\\admin"),
                   ("dot-dot above root", "/../admin"), ("encoded NUL", "/api/%00"),
                   ("bad percent-encoding", "/api/%zz"), ("relative path", "api/orders")]:
    deny400(f"{name} is a bad request", bearer(T["root"]), "bad_path", path=path,
            proxy_may_reject=path == "api/orders")
deny400("bad path is refused even on public prefixes", [], "bad_path", path="/docs/%2F")
# Tomcat and Jetty read `/docs/..;/admin` as `/admin`: a `;` is a 400, raw or encoded.
deny400("a ; path parameter climbing out of a public prefix is a bad path", [], "bad_path",
        path="/docs/..;/admin")
deny400("a ; path parameter on a protected route is a bad path", bearer(T["root"]), "bad_path",
        path="/admin;x")
deny400("an encoded ; is a bad path", [], "bad_path", path="/docs/x%3Bjsessionid=1")
# --- duplicate / conflicting credentials -----------------------------------------------
deny400("two authorization headers", bearer(T["ci-deploy"]) + bearer(T["ci-deploy"]),
        "several_credentials")
deny400("repeated authorization joined by a proxy", [("authorization", f"Bearer {T['ci-deploy']},Bearer {T['root']}")],
        "several_credentials")
deny400("a bearer token after a basic one in a joined header",
        [("authorization", f"Basic dXNlcjpwYXNz,Bearer {T['root']}"), ("x-internal-token", T["root"])],
        "several_credentials")
deny400("two different bearer tokens", bearer(T["ci-deploy"]) + bearer(T["root"]),
        "several_credentials")
deny400("same token in two sources", bearer(T["ci-deploy"]) + [("x-internal-token", T["ci-deploy"])],
        "several_credentials")
deny400("different tokens in two headers",
        [("x-internal-token", T["ci-deploy"]), ("x-internal-api-key", T["root"])],
        "several_credentials")
deny400("repeated named header", [("x-internal-token", T["root"]), ("X-Internal-Token", T["root"])],
        "several_credentials")
deny400("comma-joined named header values conflict",
        [("x-internal-token", f"{T['ci-deploy']},{T['root']}")], "several_credentials")
deny400("comma-and-space-joined named header values conflict",
        [("x-internal-token", f"{T['ci-deploy']}, {T['root']}")], "several_credentials")
deny400("the same token joined twice in a named header conflicts",
        [("x-internal-api-key", f"{T['ci-deploy']},{T['ci-deploy']}")], "several_credentials")
deny400("an invalid second credential still conflicts",
        bearer(T["root"]) + [("x-internal-api-key", "garbage")], "several_credentials")
# --- anti-spoofing ---------------------------------------------------------------------
case("spoofed identity headers are removed on public routes", path="/healthz", headers=SPOOF,
     status=200, reason="public",
     upstream_absent=["x-tokengate-subject", "x-tokengate-scopes", "x-tokengate-token-id",
                      "x-tokengate-extra"])
allow("spoofed identity headers are replaced on protected routes", "ci-deploy", CI,
      SPOOF + bearer(T["ci-deploy"]))
case("spoofed headers do not authenticate", headers=SPOOF, status=401, reason="no_credential",
     error="missing_token")
case("underscore identity headers are removed on public routes", path="/healthz",
     headers=UNDERSCORE_SPOOF, status=200, reason="public", upstream_absent=UNDERSCORE_NAMES)
allow("underscore identity headers never ride beside the real ones", "ci-deploy", CI,
      UNDERSCORE_SPOOF + bearer(T["ci-deploy"]),
      upstream_absent=["authorization"] + UNDERSCORE_NAMES)
case("credential is stripped on public routes too", path="/healthz", headers=bearer(T["root"]),
     status=200, reason="public", upstream_absent=["authorization"])
# --- query credentials and forwarding --------------------------------------------------
case("query credential passes when configured and is stripped", bundle="query",
     path=f"/api/orders/1?a=1&access_token={T['query-user']}&b=2", status=200, reason="valid",
     upstream_headers={"x-tokengate-subject": "query-user"}, upstream_path="/api/orders/1?a=1&b=2")
case("a percent-encoded query credential name is read and stripped", bundle="query",
     path=f"/api/orders/1?%61ccess_token={T['query-user']}&b=2", status=200, reason="valid",
     upstream_headers={"x-tokengate-subject": "query-user"}, upstream_path="/api/orders/1?b=2")
case("a percent-encoded query credential never reaches the upstream of a public route",
     bundle="query", path=f"/healthz?a=1&access%5Ftoken={T['query-user']}", status=200,
     reason="public", upstream_path="/healthz?a=1")
case("query credential is ignored when not configured",
     path=f"/api/orders/1?access_token={T['ci-deploy']}", status=401, reason="no_credential",
     error="missing_token")
deny400("query and bearer credential conflict", bearer(T["query-user"]), "several_credentials",
        bundle="query", path=f"/api/orders?access_token={T['query-user']}")
case("credential forwarded when configured", bundle="forward", headers=bearer(T["ci-deploy"]),
     status=200, reason="valid",
     upstream_headers={"authorization": f"Bearer {T['ci-deploy']}", "x-tokengate-subject": "ci-deploy"})

# --- signed short-lived tokens (JWTs) ---------------------------------------------------
# Times: a runner on a real clock (Envoy, workerd) moves a fixture bundle's times to its
# clock by re-signing the bundle, but cannot move a JWT's: the signature is the issuer's. So
# every JWT case has one outcome at any real time from NOW (2026) to about 2034: valid tokens
# start a minute before NOW and live nine years (their issuers allow ten); an expired one
# ended an hour before NOW; "not yet" ones start eight years after NOW; a lifetime beyond its
# issuer's maximum is refused before the clock is read. No JWT case is a clock_edge.
JWT_IAT = NOW - 60
JWT_EXP = JWT_IAT + 9 * 365 * DAY
EIGHT_YEARS = 8 * 365 * DAY


def b64url(data: bytes) -> str:
    """Unpadded base64url (RFC 7515): the one encoding of a JWT part a gate takes."""
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def unb64url(part: str) -> bytes:
    return base64.urlsafe_b64decode(part + "=" * (-len(part) % 4))


def ed25519(seed: bytes):
    return lambda data: Ed25519PrivateKey.from_private_bytes(seed).sign(data)


def hs256(secret: bytes):
    return lambda data: hmac.new(secret, data, hashlib.sha256).digest()


# Each issuer's own algorithm and signer, as its operator signs.
SIGNERS = {"ci": ("EdDSA", ed25519(ISSUER_CI)), "legacy-hs": ("HS256", hs256(HS_SECRET)),
           "short": ("EdDSA", ed25519(ISSUER_SHORT)), "aud": ("EdDSA", ed25519(ISSUER_AUD))}
# The gate-secret form every runner gives its gate: `kid=<unpadded base64url>`, space separated.
ISSUER_SECRETS = f"legacy-hs={b64url(HS_SECRET)}"


def jws(signing_input: str, signer) -> str:
    """A compact JWS: the signature covers the exact ASCII of `<header>.<payload>` as sent."""
    return f"{signing_input}.{b64url(signer(signing_input.encode()))}"


def jwt(kid="ci", sub="deploy-bot", jti="jti-valid", scope="deploy:write orders:read",
        iat=JWT_IAT, exp=JWT_EXP, nbf=None, alg=None, signer=None, **extra):
    """A signed token; a claim or the kid given as None is left out. By default the issuer's
    own alg and key sign it; `alg`/`signer` forge it."""
    header = {"alg": alg or SIGNERS[kid][0], "kid": kid, "typ": "JWT"}
    claims = {"sub": sub, "jti": jti, "scope": scope, "iat": iat, "exp": exp, "nbf": nbf, **extra}
    parts = [{k: v for k, v in d.items() if v is not None} for d in (header, claims)]
    return jws(".".join(b64url(compact(d).encode()) for d in parts), signer or SIGNERS[kid][1])


def signed_upstream(token):
    """What the upstream is told of a signed token: its claims as sent and its issuer, and no
    x-tokengate-scopes when it has no scope (never an empty one)."""
    header, claims = (json.loads(unb64url(part)) for part in token.split(".")[:2])
    upstream = {"x-tokengate-subject": claims["sub"], "x-tokengate-token-id": claims["jti"],
                "x-tokengate-issuer": header["kid"]}
    if claims.get("scope"):
        upstream["x-tokengate-scopes"] = claims["scope"]
    return upstream, ([] if claims.get("scope") else ["x-tokengate-scopes"])


def allow_signed(name, token, headers=None, upstream_absent=("authorization",), **kw):
    upstream, absent = signed_upstream(token)
    case(name, headers=bearer(token) if headers is None else headers, bundle="signed",
         status=200, reason="signed", upstream_headers=upstream,
         upstream_absent=list(upstream_absent) + SPOOF_NAMES + absent, **kw)


def deny_signed(name, token, reason, **kw):
    deny401(name, bearer(token), reason, bundle="signed", **kw)


GOOD = jwt()
allow_signed("signed EdDSA token passes with identity headers", GOOD)
allow_signed("signed token in x-internal-token", GOOD, [("x-internal-token", GOOD)],
             upstream_absent=("x-internal-token",))
allow_signed("signed HS256 token passes", jwt("legacy-hs", sub="legacy-batch", jti="jti-hs",
                                              scope="orders:write"),
             method="POST", path="/api/orders")
allow_signed("signed token without scope passes a token-only rule",
             jwt(jti="jti-no-scope", scope=None), path="/api/misc")
allow_signed("spoofed identity headers are replaced for a signed token", GOOD,
             SPOOF + [("X-Tokengate-Issuer", "legacy-hs")] + bearer(GOOD))
allow("an ordinary token passes beside issuers", "ci-deploy", CI, bearer(T["ci-deploy"]),
      bundle="signed")
forbid("signed token lacks the route's scope", bearer(jwt(jti="jti-read", scope="orders:read")),
       "deploy:write", bundle="signed", path="/deploy/x", authority="ci.internal")
deny_signed("expired signed token", jwt(jti="jti-expired", iat=NOW - 4200, exp=NOW - 3600),
            "expired")
deny_signed("signed token before its nbf", jwt(jti="jti-nbf", nbf=NOW + EIGHT_YEARS),
            "not_yet_valid")
deny_signed("signed token issued in the future",
            jwt(jti="jti-iat", iat=NOW + EIGHT_YEARS, exp=NOW + EIGHT_YEARS + DAY), "not_yet_valid")
deny_signed("signed token of an unknown kid", jwt("nobody", alg="EdDSA", signer=ed25519(ISSUER_CI)),
            "unknown_issuer")
deny_signed("signed token without kid", jwt(None, alg="EdDSA", signer=ed25519(ISSUER_CI)),
            "unknown_issuer")
# The classic swap: HMAC keyed with the EdDSA issuer's public key, which anyone can read.
deny_signed("alg swapped to HS256 with the public key as secret",
            jwt(alg="HS256", signer=hs256(bytes.fromhex(pub(ISSUER_CI)))), "jwt_invalid")
deny_signed("alg none with an empty signature", jwt(alg="none", signer=lambda _: b""),
            "jwt_invalid")
deny_signed("EdDSA token under the HS256 issuer's kid",
            jwt("legacy-hs", jti="jti-swap", scope="orders:read", alg="EdDSA",
                signer=ed25519(ISSUER_CI)), "jwt_invalid")
deny_signed("HS256 token with a wrong secret", jwt("legacy-hs", scope="orders:read",
                                                   signer=hs256(HS_WRONG)), "jwt_invalid")
deny_signed("EdDSA token signed by another key", jwt(signer=ed25519(ISSUER_FORGER)), "jwt_invalid")
deny_signed("signed token with a scope beyond its issuer's grant", jwt(scope="admin"),
            "beyond_grant", path="/admin/x")
deny_signed("signed token living longer than its issuer allows",
            jwt("short", jti="jti-long", scope="orders:read", exp=JWT_IAT + 7200), "beyond_grant")
deny_signed("revoked signed token", jwt(jti="revoked-jti-1"), "revoked")
deny_signed("signed token with an extra part", GOOD + "." + GOOD.split(".")[2], "jwt_invalid")
deny_signed("signed token without sub", jwt(sub=None), "jwt_invalid")
deny_signed("signed token over 4096 bytes", jwt(pad="x" * 4096), "jwt_invalid")
# An issuer with an audience: its tokens must name it in `aud` (a string, or an array holding
# it), so its other JWTs (sessions, other services') are no tokengate credential.
allow_signed("signed token naming its issuer's audience passes",
             jwt("aud", jti="jti-aud", scope="orders:read", aud="tokengate-conformance"))
allow_signed("signed token with its issuer's audience among others passes",
             jwt("aud", jti="jti-auds", scope="orders:read",
                 aud=["another-service", "tokengate-conformance"]))
deny_signed("signed token without the audience its issuer requires",
            jwt("aud", jti="jti-no-aud", scope="orders:read"), "jwt_invalid")
deny_signed("signed token for another audience",
            jwt("aud", jti="jti-other-aud", scope="orders:read", aud="another-service"),
            "jwt_invalid")
# Padding and the standard alphabet, each signed as sent: a lenient decoder would accept it.
header_b64, payload_b64, signature_b64 = GOOD.split(".")
padding = "=" * (-len(payload_b64) % 4)
assert padding, "the payload's encoding must have room for padding"
deny_signed("signed token with a padded payload",
            jws(f"{header_b64}.{payload_b64}{padding}", ed25519(ISSUER_CI)), "jwt_invalid")
standard = signature_b64.translate(str.maketrans("-_", "+/"))
assert "+" in standard, "the signature's base64url must hold a - to become a +"
deny_signed("signed token with a standard base64 signature",
            f"{header_b64}.{payload_b64}.{standard}", "jwt_invalid")

names = [c["name"] for c in cases]
assert len(names) == len(set(names)), "case names must be unique"

# --- sequences: requests in order against one gate, at seconds into a window ---------------
# `at` counts from the start of an epoch-aligned minute (NOW is one). Counters start empty;
# `reset` is the seconds to the window's end at `at`, which a runner on a real clock
# recomputes from the second it sent the request in. A sequence's tokens, and the subjects of
# its signed tokens (counted per subject), are its own.
sequences = []
# Signed tokens for sequences, by name: two of one subject, whose limits share one budget.
JWTS = {"job-7-a": jwt(sub="job-7", jti="job-7-a", scope="orders:read"),
        "job-7-b": jwt(sub="job-7", jti="job-7-b", scope="orders:read")}
assert not JWTS.keys() & T.keys()


def credential(token):
    return JWTS[token] if token in JWTS else T[token]


def seq(name, steps):
    sequences.append({"name": name, "bundle": "limits", "steps": steps})


def ok(token, path="/limited/x", at=0):
    headers = bearer(credential(token)) if token else []
    reason = "signed" if token in JWTS else "valid" if token else "public"
    expect = {"status": 200, "reason": reason,
              "response_absent": ["retry-after", "ratelimit", "ratelimit-policy"]}
    if token in JWTS:
        expect["upstream_headers"], absent = signed_upstream(JWTS[token])
        if absent:
            expect["upstream_absent"] = absent
    elif token:
        expect["upstream_headers"] = {"x-tokengate-subject": token}
    return {"at": at, "request": {"method": "GET", "path": path, "authority": "api.internal",
                                  "headers": [list(h) for h in headers]}, "expect": expect}


def limited(token, policy, quota, path="/limited/x", at=1):
    reset = 60 - at % 60
    return {"at": at, "reset": reset,
            "request": {"method": "GET", "path": path, "authority": "api.internal",
                        "headers": [list(h) for h in bearer(credential(token))]},
            "expect": {"status": 429, "reason": "rate_limited", "error": "rate_limited",
                       "response_headers": {
                           "retry-after": str(reset),
                           "ratelimit-policy": f'"{policy}";q={quota};w=60',
                           "ratelimit": f'"{policy}";r=0;t={reset}'},
                       "response_absent": ["www-authenticate"],
                       "upstream_absent": ["x-tokengate-subject"]}}


seq("a rule's limit: three pass, the fourth in the minute is 429, the next minute passes again",
    [ok("limit-a"), ok("limit-a"), ok("limit-a"), limited("limit-a", "limited", 3),
     limited("limit-a", "limited", 3, at=30), ok("limit-a", at=61), ok("limit-a", at=62),
     ok("limit-a", at=62), limited("limit-a", "limited", 3, at=63)])
seq("two tokens under one rule have independent limits",
    [ok("pair-1"), ok("pair-1"), ok("pair-1"), ok("pair-2"), limited("pair-1", "limited", 3),
     ok("pair-2", at=1), ok("pair-2", at=1), limited("pair-2", "limited", 3, at=2)])
seq("a token's own limit applies where it is stricter, counted across rules",
    [ok("capped"), ok("capped", path="/api/orders"),
     limited("capped", "token", 2, path="/api/orders"), limited("capped", "token", 2)])
seq("a rule's limit applies where it is stricter than the token's own",
    [ok("roomy"), ok("roomy"), ok("roomy"), limited("roomy", "limited", 3),
     ok("roomy", path="/api/orders", at=1), ok("roomy", path="/api/orders", at=1)])
seq("a token's own limit caps it across rules even where each rule's own limit is stricter",
    [ok("spread"), ok("spread"), ok("spread"), ok("spread", path="/metered/x"),
     limited("spread", "token", 4, path="/metered/x"), limited("spread", "limited", 3)])
seq("public routes are not limited, with or without a limited token",
    [ok(None, path="/healthz"), ok(None, path="/healthz"),
     {**ok(None, path="/healthz"), "request": {**ok(None, path="/healthz")["request"],
                                              "headers": [list(h) for h in bearer(T["capped-public"])]}},
     {**ok(None, path="/healthz"), "request": {**ok(None, path="/healthz")["request"],
                                              "headers": [list(h) for h in bearer(T["capped-public"])]}},
     ok("capped-public", path="/api/orders", at=1),
     limited("capped-public", "token", 1, path="/api/orders", at=2)])
seq("signed tokens of one subject share a limit",
    [ok("job-7-a"), ok("job-7-b"), ok("job-7-a"), limited("job-7-b", "limited", 3)])
seq_names = [q["name"] for q in sequences]
assert len(seq_names) == len(set(seq_names)), "sequence names must be unique"


def counted_as(value):
    """What a credential's counts are kept under: a signed token's are its subject's (every
    token of one subject shares them), any other credential's its own."""
    token = value.removeprefix("Bearer ")
    if token.startswith("eyJ") and "." in token:
        return "subject " + json.loads(unb64url(token.split(".")[1]))["sub"]
    return value


seq_tokens = [{counted_as(h[1]) for step in q["steps"] for h in step["request"]["headers"]}
              for q in sequences]
assert all(not a & b for i, a in enumerate(seq_tokens) for b in seq_tokens[i + 1:]), \
    "each sequence has tokens and signed-token subjects of its own"

# --- bundles every target must refuse ----------------------------------------------------
TRUSTED = [pub(KEY_A)]


def refusal(name, text, trusted=None, serving=None):
    """trusted: the keys the gate trusts when it is not TRUSTED (null in the file)."""
    return {"name": name, "text": text, "trusted": trusted, "serving": serving}


def signed(payload: dict) -> str:
    return publish(payload, [KEY_A])


def v1_bundle(target) -> str:
    """The main bundle as release v1 wrote it: one object, HMAC-SHA256 over its compact form
    under a shared secret. A v2 gate has no secret and must not fall back to it."""
    secret = hashlib.sha256(b"tokengate conformance key").hexdigest()
    body = {"format": "tokengate.bundle/v1", "version": 10, "issued_at": NOW - 60,
            "environment": ENVIRONMENT, "target": target, "policy": {"rules": POLICY},
            "credentials": {"sources": SOURCES, "forward": False}, "tokens": MAIN_TOKENS,
            "revoke_all_at": None, "cloudflare_access": None}
    mac = hmac.new(bytes.fromhex(secret), compact(body).encode(), hashlib.sha256).hexdigest()
    return compact({**body, "signature": mac})


OTHER_TARGET = {"envoy": "worker", "worker": "envoy"}


def refusals(target):
    """The refusals as a gate of `target` sees them: each bundle is made for that target, so
    that what refuses it is its defect, not the target."""
    main = BUNDLES["main"](target)
    main_text = compact(main)
    good_text = signed(main)
    with_other = compact({**main, "keys": [pub(KEY_A), pub(KEY_OTHER)]})
    with_b = compact({**main, "keys": [pub(KEY_A), pub(KEY_B)]})
    # A's signature over another payload: well-formed, by the right key, for the wrong bytes.
    a_elsewhere = sign(KEY_A, compact({**main, "version": 99}))
    ci, hs, short, aud = ISSUERS

    def with_issuers(issuers, revoked=REVOKED_JTIS):
        """The `signed` fixture with one defect in its issuers or revoked token ids."""
        return signed(bundle(20, SIGNED_TOKENS, POLICY, SOURCES, target=target, issuers=issuers,
                             revoked_jtis=revoked))
    return [
        refusal("tampered byte", good_text.replace('"orders:read"', '"orders:reae"', 1)),
        # The version digit: the changed payload would be a valid, newer bundle (a replay as new).
        refusal("valid signature over a payload with one byte changed",
                good_text.replace('"version":10,', '"version":19,', 1)),
        refusal("wrong key", good_text, trusted=[pub(KEY_B)]),
        refusal("no signature", envelope(main_text, [])),
        refusal("signed by an untrusted key", publish({**main, "keys": [pub(KEY_OTHER)]}, [KEY_OTHER])),
        refusal("signed by a retired key",
                publish({**main, "keys": [pub(KEY_RETIRED)]}, [KEY_RETIRED]), trusted=[pub(KEY_B)]),
        # A valid signature by A, filed under OTHER's id: a gate finds keys by id, not by trying.
        refusal("signature under a key id the gate lacks", envelope(
            with_other, [{**sign(KEY_A, with_other), "key_id": kid(KEY_OTHER)}])),
        # OTHER's valid signature must not make up for A's failing one: unknown keys are ignored.
        refusal("a trusted key's signature does not verify",
                envelope(with_other, [sign(KEY_OTHER, with_other), a_elsewhere])),
        # Both keys trusted and B's signature verifies: A's failing one still refuses the bundle.
        refusal("one of two trusted keys' signatures does not verify",
                envelope(with_b, [a_elsewhere, sign(KEY_B, with_b)]), trusted=[pub(KEY_A), pub(KEY_B)]),
        refusal("a signature's key is not in the payload's keys",
                publish({**main, "keys": [pub(KEY_B)]}, [KEY_A])),
        refusal("a v1 (HMAC) bundle", v1_bundle(target)),
        refusal("envelope member after the payload is unknown",
                envelope(main_text, [sign(KEY_A, main_text)], extra=',"comment":"x"')),
        refusal("reformatted after signing",
                json.dumps(json.loads(good_text), indent=1, ensure_ascii=False)),
        refusal("signed for the other target", signed(BUNDLES["main"](OTHER_TARGET[target]))),
        refusal("signed for another environment", signed({**main, "environment": "prod"})),
        refusal("older version than served", good_text, serving="revoke-all"),
        refusal("same version as served, other content",
                signed(bundle(11, REVOKE_ALL_TOKENS, POLICY, SOURCES, target=target)), serving="revoke-all"),
        refusal("invalid JSON", good_text[:-2]),
        refusal("unknown field", signed({**main, "debug": True})),
        refusal("duplicate token names", signed(bundle(
            20, MAIN_TOKENS + [record("root", T["never-issued"], [])], POLICY, SOURCES, target=target))),
        refusal("duplicate token hashes", signed(bundle(
            20, MAIN_TOKENS + [record("root-copy", T["root"], [])], POLICY, SOURCES, target=target))),
        refusal("rotation's previous hash is another token's hash", signed(bundle(
            20, MAIN_TOKENS + [record("rot", T["never-issued"], [], previous=T["root"], grace=NOW)],
            POLICY, SOURCES, target=target))),
        refusal("bad scope", signed(bundle(20, [record("x", T["root"], ["Orders Read"])], POLICY, SOURCES,
                                          target=target))),
        refusal("bad rule path", signed(bundle(20, [], [rule("r", {"prefix": "/api/../x"})], SOURCES,
                                              target=target))),
        refusal("no credential sources", signed(bundle(20, [], POLICY, [], target=target))),
        refusal("a rule's rate limit of zero requests", signed(bundle(
            20, [], [rule("r", {"prefix": "/api"}, rate=per_minute(0))], SOURCES, target=target))),
        refusal("a rate limit on a public rule", signed(bundle(
            20, [], [rule("r", {"prefix": "/api"}, "public", rate=per_minute(5))], SOURCES,
            target=target))),
        refusal("a rate limit per day", signed(bundle(
            20, [], [rule("r", {"prefix": "/api"}, rate={"requests": 5, "per": "day"})], SOURCES,
            target=target))),
        refusal("a token's rate limit over a million requests", signed(bundle(
            20, [record("x", T["root"], [], rate=per_minute(1_000_001))], POLICY, SOURCES,
            target=target))),
        refusal("an HS256 issuer with a public key", with_issuers(
            [ci, issuer("legacy-hs", "HS256", ["orders:*"], TEN_YEARS, pub(ISSUER_FORGER)), short])),
        refusal("an EdDSA issuer without a public key", with_issuers(
            [issuer("ci", "EdDSA", ["deploy:*", "orders:read"], TEN_YEARS), hs, short])),
        # A key signs bundles or tokens, never both.
        refusal("an issuer's public key is an admin key", with_issuers(
            [issuer("ci", "EdDSA", ["deploy:*", "orders:read"], TEN_YEARS, pub(KEY_A)), hs, short])),
        refusal("two issuers with one kid", with_issuers(
            ISSUERS + [issuer("ci", "EdDSA", ["orders:read"], 3600, pub(ISSUER_FORGER))])),
        refusal("an issuer's max_lifetime of zero", with_issuers(
            [ci, hs, issuer("short", "EdDSA", ["orders:read"], 0, pub(ISSUER_SHORT))])),
        refusal("a revoked token id given twice", with_issuers(ISSUERS, REVOKED_JTIS * 2)),
        refusal("an issuer's empty audience", with_issuers(
            [ci, hs, short, issuer("aud", "EdDSA", ["orders:read"], TEN_YEARS, pub(ISSUER_AUD),
                                   audience="")])),
        # Signed as v2 signs, so the envelope's format is the only thing wrong.
        refusal("wrong format", envelope(main_text, [sign(KEY_A, main_text)], fmt="tokengate.bundle/v3")),
    ]


BY_TARGET = {t: refusals(t) for t in ("envoy", "worker")}
REFUSALS = [{"name": r["name"], "bundle": {t: BY_TARGET[t][i]["text"] for t in BY_TARGET},
             "trusted": r["trusted"], "serving": r["serving"]}
            for i, r in enumerate(BY_TARGET["envoy"])]
assert len({r["name"] for r in REFUSALS}) == len(REFUSALS), "refusal names must be unique"

suite = {
    "now": NOW,
    "trusted_keys": TRUSTED,
    "issuer_secrets": ISSUER_SECRETS,
    "environment": ENVIRONMENT,
    "bundles": {name: {t: publish(make(t), SIGNED_BY.get(name, [KEY_A])) for t in ("envoy", "worker")}
                for name, make in BUNDLES.items()},
    "cases": cases,
    "sequences": sequences,
    "refusals": REFUSALS,
}
text = json.dumps(suite, indent=1, ensure_ascii=False) + "\n"
out = Path(__file__).with_name("vectors.json")
if "--check" in sys.argv:
    if out.read_text() != text:
        sys.exit("conformance/vectors.json is stale: run python3 conformance/generate.py")
else:
    out.write_text(text)
print(f"{len(cases)} cases, {len(sequences)} sequences, {len(REFUSALS)} refusals", file=sys.stderr)
