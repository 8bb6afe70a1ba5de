// Signed short-lived tokens (JWTs) end to end, with the real CLI against the Worker in workerd:
// an operator adds an EdDSA issuer and an HS256 one (its secret given to the Worker as the
// secret TOKENGATE_ISSUER_SECRETS), pushes once, and from then on every token `tokengate mint`
// prints passes at once, with no further push: its subject, jti, issuer and scopes reach the
// origin. A minted token is refused a route beyond its scopes (403); `revoke --jti` and
// `issuer retire`, each followed by a push, refuse exactly the tokens they name (401); a token
// minted with --ttl 1s passes now and is refused once its expiry and the 30 s leeway passed.
// A Worker deployed without the HS256 secret answers that issuer's tokens 503 and logs an
// error naming it, while EdDSA tokens pass. No minted token is ever in KV or the Worker's logs.
import fs from "node:fs";
import path from "node:path";
import { assert, assertNoPlaintext, CACHE_TTL_MS, headerValues, heldBy, safeJson, sleep, startWorker } from "./lib/harness.mjs";
import { CLI, operator } from "./cli.test.mjs";

const ENV = "staging";
/** The gate's clock leeway on `exp` (core/src/issuer.rs LEEWAY_SECONDS). */
const LEEWAY_SECONDS = 30;

const POLICY = `[credentials]
sources = ["bearer", "header:x-internal-token"]
forward = false

[[rules]]
name = "health"
path = { exact = "/healthz" }
methods = ["GET"]
access = "public"

[[rules]]
name = "deploy"
path = { prefix = "/deploy" }
access = "token"
all_of = ["deploy:write"]

[[rules]]
name = "orders"
path = { prefix = "/api/orders" }
access = "token"
all_of = ["orders:read"]
`;

/** A compact JWT's header and claims, decoded as any client would (base64url JSON). */
function decode(jwt) {
  const parts = jwt.split(".");
  assert.equal(parts.length, 3, `not a compact JWT: ${jwt.slice(0, 20)}…`);
  const json = (p) => JSON.parse(Buffer.from(p, "base64url").toString("utf8"));
  return { header: json(parts[0]), claims: json(parts[1]), signature: parts[2] };
}

export default function (suite, { origin }) {
  if (!fs.existsSync(CLI)) {
    suite.test("the CLI is built", () => {
      throw new Error(`no CLI at ${CLI}: cargo build -p tokengate-admin`);
    });
    return;
  }
  let op;
  let worker;
  let hsSecret; // the HS256 issuer's secret, as `issuer add --key-out` wrote it
  let edKeyFile;
  let hsKeyFile;
  let pushes = 0;
  let served; // the version the one push made
  const minted = []; // every token minted, to look for in KV and the logs
  let shortLived; // { token, exp }: minted with --ttl 1s before the other checks

  suite.before(async () => {
    op = operator({ environment: ENV });
    const policy = path.join(op.dir, "policy.toml");
    fs.writeFileSync(policy, POLICY);
    op.ok("policy", "set", policy);
    edKeyFile = path.join(op.dir, "ci.issuer-key");
    hsKeyFile = path.join(op.dir, "legacy.issuer-key");
    op.ok("issuer", "add", "ci", "--scopes", "deploy:*,orders:read", "--max-ttl", "1h", "--key-out", edKeyFile);
    op.ok("issuer", "add", "legacy", "--alg", "hs256", "--scopes", "orders:*", "--max-ttl", "15m", "--key-out", hsKeyFile);
    const hsText = fs.readFileSync(hsKeyFile, "utf8").trim().split(/\s+/);
    assert.deepEqual(hsText.slice(0, 3), ["tokengate-issuer-key/v1", "legacy", "HS256"], "the HS256 key file's form");
    hsSecret = hsText[3];
    // Deployed as the operator was told: `key public`, and the secret as legacy=<secret>.
    worker = await startWorker({
      origin,
      environment: ENV,
      vars: { TOKENGATE_TRUSTED_KEYS: op.publicKeys() },
      secrets: { TOKENGATE_ISSUER_SECRETS: `legacy=${hsSecret}` },
    });
  });
  suite.after(async () => {
    if (op) fs.rmSync(op.dir, { recursive: true, force: true });
    await worker?.dispose();
  });

  const url = (w = worker) => `http://127.0.0.1:${w.port}`;
  const push = (w = worker) => {
    op.ok("push", "worker", "--url", url(w));
    if (w === worker) pushes += 1;
  };
  /** `tokengate mint` (10 minutes: within both issuers' maximum): stdout is the JWT alone. */
  const mint = (name, { scopes, ttl = "10m", keyFile = edKeyFile } = {}) => {
    const out = op.ok("mint", name, ...(scopes ? ["--scopes", scopes] : []), "--ttl", ttl, "--issuer-key-file", keyFile);
    const token = out.stdout.trim();
    assert.equal(out.stdout, `${token}\n`, "mint printed more than the token");
    assert.match(token, /^eyJ[\w-]*\.[\w-]+\.[\w-]+$/, "not a compact JWT");
    assert.ok(!out.stderr.includes(token), "mint printed the token on stderr");
    minted.push(token);
    return token;
  };
  const call = (token, target = "/api/orders/1", w = worker) =>
    w.gate("GET", target, { headers: [["authorization", `Bearer ${token}`]] });
  const upstreamOf = (res) => origin.requests.find((r) => headerValues(r.headers, "cf-ray")[0] === res.ray);
  /** A refusal as a client and an operator see it: status, error, nothing at the origin, the logged reason. */
  const assertRefused = async (res, status, error, reason, w = worker) => {
    assert.equal(res.status, status, `${res.status} ${res.body}`);
    assert.equal(safeJson(res.body)?.error, error, res.body);
    assert.equal(upstreamOf(res), undefined, "a refused request reached the origin");
    const log = await w.decision(res.ray);
    assert.equal(log?.reason, reason, `the logged decision: ${JSON.stringify(log)}`);
    return log;
  };
  /** The origin's identity headers for a request that passed (one value each). */
  const identityAt = async (res) => {
    assert.equal(res.status, 200, `${res.status} ${res.body}`);
    const seen = upstreamOf(res);
    assert.ok(seen, "the request did not reach the origin");
    const one = (name) => {
      const values = headerValues(seen.headers, name);
      assert.equal(values.length, 1, `${name} at the origin: ${JSON.stringify(values)}`);
      return values[0];
    };
    const log = await worker.decision(res.ray);
    return {
      subject: one("x-tokengate-subject"),
      tokenId: one("x-tokengate-token-id"),
      issuer: one("x-tokengate-issuer"),
      scopes: one("x-tokengate-scopes"),
      authorization: headerValues(seen.headers, "authorization"),
      reason: log?.reason,
      logged: [log?.subject, log?.token_id],
    };
  };
  const eventually = async (predicate, withinMs, what) => {
    const deadline = Date.now() + withinMs;
    for (let i = 0; i < 1000; i++) {
      if (await predicate()) return;
      if (Date.now() > deadline) break;
      await sleep(100);
    }
    throw new Error(`${what} did not happen within ${withinMs} ms`);
  };

  suite.test("issuer add (EdDSA, and HS256 --key-out), push worker once: key files 0600 in their form; the Worker serves both issuers and logs no error", async () => {
    for (const file of [edKeyFile, hsKeyFile]) {
      assert.equal(fs.statSync(file).mode & 0o777, 0o600, `${path.basename(file)} is readable by others`);
    }
    assert.match(fs.readFileSync(edKeyFile, "utf8"), /^tokengate-issuer-key\/v1 ci EdDSA [0-9a-f]{64}\n?$/);
    assert.match(hsSecret, /^[A-Za-z0-9_-]{43,}$/, "the HS256 secret is not base64url");
    const listed = JSON.parse(op.ok("issuer", "list", "--json").stdout);
    assert.deepEqual(
      listed.map((i) => [i.kid, i.alg, i.scopes, i.max_lifetime, i.retired_at]),
      [
        ["ci", "EdDSA", ["deploy:*", "orders:read"], 3600, null],
        ["legacy", "HS256", ["orders:*"], 900, null],
      ],
    );
    push();
    served = (await worker.status()).version;
    assert.ok(served > 0, "the push is not served");
    // Minted now, checked at the end: it expires while the other checks run. By the HS256
    // issuer, which stays trusted throughout: its refusal at the end is expiry alone.
    const token = mint("short-lived", { scopes: "orders:read", ttl: "1s", keyFile: hsKeyFile });
    shortLived = { token, exp: decode(token).claims.exp };
    const first = await identityAt(await call(token));
    assert.equal(first.subject, "short-lived");
    // A Worker that has the secret of every HS256 issuer says nothing about secrets.
    assert.deepEqual(worker.errors.filter((l) => l.includes("TOKENGATE_ISSUER_SECRETS")), []);
    return `served version ${served}; the --ttl 1s token passes (exp ${shortLived.exp})`;
  });

  suite.test("mint (EdDSA), no push: 200; the origin gets subject, token id (the jti), issuer and scopes; reason signed", async () => {
    const token = mint("deploy-bot", { scopes: "orders:read,deploy:write" });
    const { header, claims } = decode(token);
    assert.deepEqual([header.alg, header.kid], ["EdDSA", "ci"]);
    const seen = await identityAt(await call(token));
    assert.deepEqual(
      [seen.subject, seen.tokenId, seen.issuer, seen.reason],
      ["deploy-bot", claims.jti, "ci", "signed"],
    );
    assert.deepEqual(seen.logged, ["deploy-bot", claims.jti], "the decision log line's subject and token id");
    assert.deepEqual(seen.scopes.split(" ").sort(), ["deploy:write", "orders:read"]);
    assert.deepEqual(seen.authorization, [], "the credential went on to the origin");
    // The same token on its other routes, and in the configured header.
    assert.equal((await call(token, "/deploy/now")).status, 200);
    const inHeader = await worker.gate("GET", "/api/orders/2", { headers: [["x-internal-token", token]] });
    assert.equal((await identityAt(inHeader)).subject, "deploy-bot");
    // Nothing was pushed since the one push.
    assert.equal(pushes, 1);
    assert.equal((await worker.status()).version, served);
    return `x-tokengate-scopes: ${JSON.stringify(seen.scopes)}`;
  });

  suite.test("mint (HS256, the secret the Worker was given), no push: 200 with issuer legacy", async () => {
    const token = mint("billing-job", { scopes: "orders:read", keyFile: hsKeyFile });
    const { header, claims } = decode(token);
    assert.deepEqual([header.alg, header.kid], ["HS256", "legacy"]);
    const seen = await identityAt(await call(token));
    assert.deepEqual(
      [seen.subject, seen.tokenId, seen.issuer, seen.scopes, seen.reason],
      ["billing-job", claims.jti, "legacy", "orders:read", "signed"],
    );
    assert.equal((await worker.status()).version, served);
  });

  suite.test("a minted token lacking the route's scope: 403 insufficient_scope; the CLI mints nothing beyond the issuer's grant", async () => {
    const token = mint("reader", { scopes: "orders:read" });
    assert.equal((await call(token)).status, 200);
    const log = await assertRefused(await call(token, "/deploy/now"), 403, "insufficient_scope", "insufficient_scope");
    assert.equal(log.subject, "reader");
    // orders:write is beyond ci's grant (deploy:*, orders:read); 2h beyond its 1h.
    for (const args of [["--scopes", "orders:write", "--ttl", "5m"], ["--scopes", "orders:read", "--ttl", "2h"]]) {
      const out = op.run("mint", "greedy", ...args, "--issuer-key-file", edKeyFile);
      assert.notEqual(out.status, 0, `mint ${args.join(" ")} succeeded`);
      assert.equal(out.stdout, "", "a refused mint printed a token");
    }
  });

  let revokedToken;
  let sibling;
  suite.test("revoke --jti, push worker: that token 401 (reason revoked); another token of the same subject still passes", async () => {
    revokedToken = mint("leaky-job", { scopes: "orders:read" });
    sibling = mint("leaky-job", { scopes: "orders:read" });
    for (const t of [revokedToken, sibling]) assert.equal((await call(t)).status, 200);
    const { jti } = decode(revokedToken).claims;
    op.ok("revoke", "--jti", jti, "--reason", "leaked in a CI log");
    push();
    await eventually(async () => (await call(revokedToken)).status === 401, CACHE_TTL_MS + 2000, "401 for the revoked jti");
    const log = await assertRefused(await call(revokedToken), 401, "invalid_token", "revoked");
    // Refused after its signature verified: the line names whom, and by which issuer.
    assert.deepEqual([log.subject, log.token_id, log.issuer], ["leaky-job", jti, "ci"]);
    const other = await identityAt(await call(sibling));
    assert.deepEqual([other.subject, other.tokenId], ["leaky-job", decode(sibling).claims.jti]);
    return `revoked ${jti}; logged subject=${log.subject} token_id=${log.token_id}`;
  });

  suite.test("a Worker without the HS256 issuer's secret: its tokens 503 issuer_unavailable (never at the origin), an error naming the kid; EdDSA tokens pass", async () => {
    // Another location, deployed with `key public` but without the secret.
    const bare = await startWorker({ origin, environment: ENV, vars: { TOKENGATE_TRUSTED_KEYS: op.publicKeys() } });
    try {
      push(bare);
      const hs = mint("billing-job", { scopes: "orders:read", keyFile: hsKeyFile });
      const ed = mint("deploy-bot", { scopes: "orders:read" });
      const res = await call(hs, "/api/orders/1", bare);
      await assertRefused(res, 503, "temporarily_unavailable", "issuer_unavailable", bare);
      const named = bare.errors.filter((l) => l.includes("legacy") && l.includes("TOKENGATE_ISSUER_SECRETS"));
      assert.ok(named.length > 0, `no error names the issuer: ${JSON.stringify(bare.errors)}`);
      const passed = await call(ed, "/api/orders/1", bare);
      assert.equal(passed.status, 200, passed.body);
      assert.deepEqual(headerValues(upstreamOf(passed).headers, "x-tokengate-issuer"), ["ci"]);
      // The Worker that has the secret still takes the same HS256 token.
      assert.equal((await call(hs)).status, 200);
      return `${res.status} ${safeJson(res.body)?.error}; logged: ${named[0]}`;
    } finally {
      await bare.dispose();
    }
  });

  let hsToken;
  suite.test("issuer retire ci, push worker: its tokens 401 (unknown_issuer); HS256 tokens pass; the CLI mints no more with its key", async () => {
    const ed = mint("deploy-bot", { scopes: "orders:read" });
    hsToken = mint("billing-job", { scopes: "orders:read", keyFile: hsKeyFile });
    assert.equal((await call(ed)).status, 200);
    op.ok("issuer", "retire", "ci", "--reason", "key rotation");
    push();
    await eventually(async () => (await call(ed)).status === 401, CACHE_TTL_MS + 2000, "401 for the retired issuer's token");
    await assertRefused(await call(ed), 401, "invalid_token", "unknown_issuer");
    await assertRefused(await call(sibling), 401, "invalid_token", "unknown_issuer");
    assert.equal((await identityAt(await call(hsToken))).issuer, "legacy");
    const refused = op.run("mint", "deploy-bot", "--scopes", "orders:read", "--ttl", "5m", "--issuer-key-file", edKeyFile);
    assert.notEqual(refused.status, 0, "mint with a retired issuer's key succeeded");
    assert.equal(refused.stdout, "");
    const listed = JSON.parse(op.ok("issuer", "list", "--json").stdout);
    assert.deepEqual(listed.map((i) => [i.kid, i.retired_at === null]), [["ci", false], ["legacy", true]]);
  });

  suite.test("the token minted with --ttl 1s first: past its exp but within the 30 s leeway 200, then 401 expired (waiting only the remainder)", async () => {
    assert.ok(shortLived, "the short-lived token was not minted");
    const { token, exp } = shortLived;
    // Past its exp, within the leeway: the gate tolerates a skewed clock, no more.
    await sleep(Math.max(0, (exp + 1) * 1000 + 100 - Date.now()));
    const now = Date.now();
    let within = "not checked (too close to the end of the leeway)";
    if (now < (exp + LEEWAY_SECONDS - 3) * 1000) {
      const res = await call(token);
      assert.equal(res.status, 200, `refused ${(now / 1000 - exp).toFixed(1)} s after exp, within the leeway: ${res.body}`);
      within = `200 at exp + ${(now / 1000 - exp).toFixed(1)} s`;
    }
    const wait = (exp + LEEWAY_SECONDS) * 1000 + 300 - Date.now();
    assert.ok(wait <= (LEEWAY_SECONDS + 2) * 1000, `would wait ${wait} ms`);
    await sleep(Math.max(0, wait));
    await assertRefused(await call(token), 401, "invalid_token", "expired");
    return `${within}; waited ${(Math.max(0, wait) / 1000).toFixed(1)} s more for the 401`;
  });

  suite.test("no minted token is in KV or the Worker's logs; the Worker holds no EdDSA issuer key; the CLI printed no issuer key", async () => {
    assert.ok(minted.length >= 10, `only ${minted.length} tokens minted`);
    const signatures = minted.map((t) => decode(t).signature);
    const edSeed = fs.readFileSync(edKeyFile, "utf8").trim().split(/\s+/)[3];
    assertNoPlaintext(await worker.snapshot(), [...minted, ...signatures, hsSecret, edSeed]);
    const logged = worker.logs.join("\n");
    for (const s of [...minted, ...signatures, hsSecret, edSeed]) {
      assert.ok(!logged.includes(s), `the Worker logged a credential: ${s.slice(0, 10)}…`);
    }
    // The HS256 secret is the Worker's by design (a secret binding); the EdDSA seed never is.
    const held = JSON.stringify(await heldBy(worker));
    assert.ok(!held.includes(edSeed), "the Worker holds the EdDSA issuer's private key");
    const printed = op.outputs.join("\n");
    for (const s of [edSeed, hsSecret]) assert.ok(!printed.includes(s), "the CLI printed an issuer key");
    return `${minted.length} tokens checked in KV and ${worker.logs.length} log lines`;
  });
}
