// Cloudflare Access: a `Cf-Access-Jwt-Assertion` on a `cf_access` rule is an identity when its
// RS256 signature verifies with a team key (fetched from the bundle's certs URL, here a JWKS
// on 127.0.0.1 made from an RSA key generated below) and its claims hold.
import crypto from "node:crypto";
import { assert, headerValues, startWorker } from "./lib/harness.mjs";
import { bundle, makeToken, nowSecs, publish, randomKey, record, rule } from "./lib/bundle.mjs";

const ENV = "prod";
const AUD = "0d5c1fd0f1a3f6b7a9c2e4d6f8a0b2c4d6e8f0a2b4c6d8e0f2a4b6c8d0e2f4a6";
const b64 = (data) => Buffer.from(data).toString("base64url");

export default function (suite, { origin }) {
  const key = randomKey();
  const team = crypto.generateKeyPairSync("rsa", { modulusLength: 2048 });
  const impostor = crypto.generateKeyPairSync("rsa", { modulusLength: 2048 });
  const jwk = (pair, kid) => ({ kid, alg: "RS256", use: "sig", ...pair.publicKey.export({ format: "jwk" }) });
  const token = makeToken();
  let worker;

  const claims = (extra = {}) => ({
    aud: [AUD],
    email: "ada@example.com",
    exp: nowSecs() + 600,
    iat: nowSecs() - 10,
    nbf: nowSecs() - 10,
    iss: origin.url,
    type: "app",
    sub: "7335d417-61da-459d-899c-0a01c76a2f94",
    ...extra,
  });
  const jwt = (payload, { kid = "k1", alg = "RS256", signer = team.privateKey, header } = {}) => {
    const head = b64(JSON.stringify(header ?? { alg, kid, typ: "JWT" }));
    const body = b64(JSON.stringify(payload));
    const input = `${head}.${body}`;
    let signature;
    if (alg === "RS256") signature = crypto.sign("sha256", Buffer.from(input), signer);
    else if (alg === "HS256") {
      // The classic confusion: an HMAC keyed with the team's public key.
      const secret = team.publicKey.export({ format: "pem", type: "spki" });
      signature = crypto.createHmac("sha256", secret).update(input).digest();
    } else signature = Buffer.alloc(0);
    return `${input}.${b64(signature)}`;
  };
  const ask = (path, headers) => worker.gate("GET", path, { headers });
  const assertion = (value) => [["cf-access-jwt-assertion", value]];
  const upstreamOf = (res) => origin.requests.find((r) => headerValues(r.headers, "cf-ray")[0] === res.ray);
  const refused = async (res, status, reason) => {
    assert.equal(res.status, status, res.body);
    assert.equal((await worker.decision(res.ray)).reason, reason);
    assert.equal(upstreamOf(res), undefined, "nothing reaches the origin");
  };

  suite.before(async () => {
    origin.jwks = { keys: [jwk(team, "k1")], public_cert: { kid: "k1", cert: "-" } };
    origin.jwksFetches = 0;
    worker = await startWorker({ origin, keys: [key], environment: ENV });
    const rules = [
      rule("app", { prefix: "/app" }, "token", { cf_access: true }),
      rule("scoped", { prefix: "/scoped" }, "token", { cf_access: true, all_of: ["orders:read"] }),
      rule("plain", { prefix: "/plain" }, "token"),
    ];
    const b = bundle({
      version: 1,
      environment: ENV,
      rules,
      tokens: [record("ci", token, ["orders:read"])],
      cloudflare_access: { certs_url: `${origin.url}/cdn-cgi/access/certs`, audiences: ["other-app", AUD] },
    });
    const res = await worker.push(publish(b, [key]));
    assert.equal(res.status, 200, res.body);
  });
  suite.after(() => worker?.dispose());

  suite.test("a valid assertion is an identity: subject = email, no scopes, no token id", async () => {
    const res = await ask("/app/reports", [...assertion(jwt(claims())), ["x-tokengate-subject", "spoofed"]]);
    assert.equal(res.status, 200, res.body);
    assert.equal((await worker.decision(res.ray)).reason, "access");
    const seen = upstreamOf(res);
    assert.deepEqual(headerValues(seen.headers, "x-tokengate-subject"), ["ada@example.com"]);
    assert.deepEqual(headerValues(seen.headers, "x-tokengate-access"), ["email"]);
    assert.deepEqual(headerValues(seen.headers, "x-tokengate-scopes"), []);
    assert.deepEqual(headerValues(seen.headers, "x-tokengate-token-id"), []);
  });

  suite.test("an Access service token: subject = common_name", async () => {
    const res = await ask("/app", assertion(jwt(claims({ email: "", common_name: "2fd7a1c8.access", type: "app" }))));
    assert.equal(res.status, 200, res.body);
    const seen = upstreamOf(res);
    assert.deepEqual(headerValues(seen.headers, "x-tokengate-subject"), ["2fd7a1c8.access"]);
    assert.deepEqual(headerValues(seen.headers, "x-tokengate-access"), ["service_token"]);
  });

  const invalid = {
    "alg HS256 keyed with the public key": () => jwt(claims(), { alg: "HS256" }),
    "alg none": () => jwt(claims(), { alg: "none" }),
    "unknown kid": () => jwt(claims(), { kid: "k9" }),
    "no kid": () => jwt(claims(), { header: { alg: "RS256", typ: "JWT" } }),
    "wrong audience": () => jwt(claims({ aud: ["someone-else"] })),
    expired: () => jwt(claims({ exp: nowSecs() - 1 })),
    "not yet valid (nbf)": () => jwt(claims({ nbf: nowSecs() + 60 })),
    "another team's issuer": () => jwt(claims({ iss: "https://evil.cloudflareaccess.com" })),
    "signed by another key under kid k1": () => jwt(claims(), { signer: impostor.privateKey }),
    "payload changed after signing": () => {
      const [h, , s] = jwt(claims()).split(".");
      return `${h}.${b64(JSON.stringify(claims({ email: "root@example.com" })))}.${s}`;
    },
    "no email and no common_name": () => jwt(claims({ email: "" })),
    "not a JWT": () => "not.a.jwt",
  };
  for (const [name, make] of Object.entries(invalid)) {
    suite.test(`refused with 401 invalid_token: ${name}`, async () => {
      const res = await ask("/app", assertion(make()));
      await refused(res, 401, "access_invalid");
      assert.equal(JSON.parse(res.body).error, "invalid_token");
      assert.deepEqual(headerValues(res.headers, "www-authenticate"), ['Bearer realm="tokengate", error="invalid_token"']);
    });
  }

  suite.test("an assertion on a rule without cf_access is no credential (401 missing_token)", async () => {
    const res = await ask("/plain", assertion(jwt(claims())));
    await refused(res, 401, "no_credential");
    assert.equal(JSON.parse(res.body).error, "missing_token");
  });

  suite.test("no token and no assertion on a cf_access rule: 401 missing_token", async () => {
    await refused(await ask("/app", []), 401, "no_credential");
  });

  suite.test("a token credential wins over an assertion", async () => {
    const res = await ask("/app", [["authorization", `Bearer ${token}`], ...assertion(jwt(claims()))]);
    assert.equal(res.status, 200);
    assert.deepEqual(headerValues(upstreamOf(res).headers, "x-tokengate-subject"), ["ci"]);
  });

  suite.test("scopes still apply: an Access identity holds none (403 insufficient_scope)", async () => {
    const res = await ask("/scoped", assertion(jwt(claims())));
    await refused(res, 403, "insufficient_scope");
  });

  suite.test("two assertions are a bad request (400)", async () => {
    const value = jwt(claims());
    await refused(await ask("/app", [...assertion(value), ...assertion(value)]), 400, "several_credentials");
  });

  suite.test("team keys are fetched once and cached", async () => {
    assert.equal(origin.jwksFetches, 1, `${origin.jwksFetches} fetches`);
  });

  /** A fresh Worker (no team key cached) serving one Access rule whose certs live at `path`. */
  async function coldWorker(path) {
    const cold = await startWorker({ origin, keys: [key], environment: ENV });
    const rules = [rule("app", { prefix: "/app" }, "token", { cf_access: true })];
    const b = bundle({
      version: 1,
      environment: ENV,
      rules,
      tokens: [],
      cloudflare_access: { certs_url: `${origin.url}${path}`, audiences: [AUD] },
    });
    assert.equal((await cold.push(publish(b, [key]))).status, 200);
    return cold;
  }

  suite.test("certs endpoint down and no key cached: 503, fail closed", async () => {
    const cold = await coldWorker("/missing/certs");
    try {
      const res = await cold.gate("GET", "/app", { headers: assertion(jwt(claims())) });
      assert.equal(res.status, 503, res.body);
      assert.deepEqual(headerValues(res.headers, "retry-after"), ["5"]);
    } finally {
      await cold.dispose();
    }
  });

  suite.test("a failing certs URL is fetched with backoff, not once per request; still 503", async () => {
    const before = origin.failingFetches;
    const cold = await coldWorker("/failing/certs");
    try {
      const requests = 20;
      for (let i = 0; i < requests; i++) {
        const res = await cold.gate("GET", "/app", { headers: assertion(jwt(claims())) });
        assert.equal(res.status, 503, res.body);
      }
      const fetches = origin.failingFetches - before;
      // The first request fetches; the rest fall inside the first backoff (1 s), bar a
      // slow machine crossing one interval.
      assert.ok(fetches >= 1 && fetches <= 2, `${fetches} certs fetches for ${requests} requests`);
      return `${fetches} certs fetches for ${requests} requests`;
    } finally {
      await cold.dispose();
    }
  });
}
