// The push protocol: the request signature and its window, the bundle's own checks, every
// refusal leaving KV exactly as it was, writing only what changed, and change sets larger
// than one request's KV budget applied over several requests (202 until 200).
import { assert, headerValues, startWorker } from "./lib/harness.mjs";
import {
  VECTORS,
  bundle,
  hmacHex,
  makeToken,
  nowSecs,
  randomKey,
  record,
  sign,
} from "./lib/bundle.mjs";

const ENV = "prod";

export default function (suite, { origin }) {
  const key = randomKey();
  const tokens = Array.from({ length: 5 }, (_, i) => ({ name: `svc-${i}`, token: makeToken() }));
  // One creation time, so that the same token gives the same record in every bundle.
  const created_at = nowSecs() - 60;
  const records = () => tokens.map((t) => record(t.name, t.token, ["orders:read"], { created_at }));
  let worker;
  suite.before(async () => {
    worker = await startWorker({ origin, key, environment: ENV });
  });
  suite.after(() => worker?.dispose());

  /** Pushes and asserts the refusal, and that KV and the served version did not move. */
  const refused = async (label, attempt, status, error) => {
    const before = await worker.snapshot();
    const served = (await worker.status()).version;
    const res = await attempt();
    assert.equal(res.status, status, `${label}: ${res.status} ${res.body}`);
    assert.equal(res.json?.error, error, `${label}: ${res.body}`);
    assert.equal(typeof res.json?.error_description, "string", `${label}: no description`);
    assert.deepEqual(await worker.snapshot(), before, `${label}: KV changed`);
    assert.equal((await worker.status()).version, served, `${label}: served version changed`);
  };

  suite.test("a signed push is served: 200, status reports version and token count", async () => {
    const res = await worker.push(sign(bundle({ version: 1, environment: ENV, tokens: records() }), key));
    assert.equal(res.status, 200, res.body);
    assert.deepEqual(res.json, { version: 1, applied: 5, tokens: 5 });
    const status = await worker.status();
    assert.equal(status.version, 1);
    assert.equal(status.environment, ENV);
    assert.equal(status.tokens, 5);
    const ok = await worker.gate("GET", "/api/orders", { headers: [["authorization", `Bearer ${tokens[0].token}`]] });
    assert.equal(ok.status, 200);
  });

  suite.test("refused: body changed after signing (401 invalid_signature)", async () => {
    const text = JSON.stringify(sign(bundle({ version: 2, environment: ENV, tokens: records() }), key));
    const t = nowSecs();
    const header = `t=${t},v1=${hmacHex(key, `${t}.${text}`)}`;
    const tampered = text.replace('"orders:read"', '"orders:reae"');
    await refused("tampered", () => worker.push(null, { body: tampered, headers: [["tokengate-signature", header]] }), 401, "invalid_signature");
  });

  suite.test("refused: a whole push made with another key (401)", async () => {
    const other = randomKey();
    const b = sign(bundle({ version: 2, environment: ENV, tokens: records() }), other);
    await refused("wrong key", () => worker.push(b, { key: other }), 401, "invalid_signature");
  });

  suite.test("refused: a bundle signed with another key in a correctly signed push (401)", async () => {
    const b = sign(bundle({ version: 2, environment: ENV, tokens: records() }), randomKey());
    await refused("bundle key", () => worker.push(b), 401, "invalid_signature");
  });

  suite.test("refused: missing or malformed Tokengate-Signature (401)", async () => {
    const b = sign(bundle({ version: 2, environment: ENV, tokens: records() }), key);
    await refused("missing", () => worker.push(b, { headers: [] }), 401, "invalid_signature");
    await refused("malformed", () => worker.push(b, { headers: [["tokengate-signature", "v1=abc"]] }), 401, "invalid_signature");
  });

  suite.test("refused: stale and future t, outside the 5-minute window (401)", async () => {
    const b = sign(bundle({ version: 2, environment: ENV, tokens: records() }), key);
    await refused("stale", () => worker.push(b, { t: nowSecs() - 301 }), 401, "signature_expired");
    await refused("future", () => worker.push(b, { t: nowSecs() + 301 }), 401, "signature_expired");
    const edge = await worker.push(b, { t: nowSecs() - 290 });
    assert.equal(edge.status, 200, `t 290 s old is inside the window: ${edge.body}`);
  });

  suite.test("refused: replaying the same t and body (409 not_newer)", async () => {
    const b = sign(bundle({ version: 3, environment: ENV, tokens: records() }), key);
    const t = nowSecs();
    const first = await worker.push(b, { t });
    assert.equal(first.status, 200, first.body);
    await refused("replay", () => worker.push(b, { t }), 409, "not_newer");
  });

  suite.test("refused: an older version, and the same version with other content (409)", async () => {
    const older = sign(bundle({ version: 1, environment: ENV, tokens: records() }), key);
    await refused("rollback", () => worker.push(older), 409, "not_newer");
    const same = sign(bundle({ version: 3, environment: ENV, tokens: records().slice(1) }), key);
    await refused("same version", () => worker.push(same), 409, "not_newer");
  });

  suite.test("refused: another environment, another target (409)", async () => {
    const staging = sign(bundle({ version: 9, environment: "staging", tokens: records() }), key);
    await refused("environment", () => worker.push(staging), 409, "wrong_environment");
    const envoy = sign(bundle({ version: 9, environment: ENV, target: "envoy", tokens: records() }), key);
    await refused("target", () => worker.push(envoy), 409, "wrong_target");
  });

  suite.test("refused: invalid bundles (400 invalid_bundle)", async () => {
    const base = () => bundle({ version: 9, environment: ENV, tokens: records() });
    const cases = {
      "unknown field": () => {
        const b = sign(base(), key);
        const { signature, ...rest } = b;
        const extra = { ...rest, debug: true };
        return JSON.stringify({ ...extra, signature: hmacHex(key, JSON.stringify(extra)) });
      },
      "bad scope": () => JSON.stringify(sign({ ...base(), tokens: [record("x", makeToken(), ["Orders Read"])] }, key)),
      "duplicate names": () => JSON.stringify(sign({ ...base(), tokens: [...records(), record("svc-0", makeToken(), [])] }, key)),
      "duplicate hashes": () => JSON.stringify(sign({ ...base(), tokens: [...records(), record("copy", tokens[0].token, [])] }, key)),
      "bad rule path": () => JSON.stringify(sign({ ...base(), policy: { rules: [{ name: "r", path: { prefix: "/a/../b" }, methods: [], host: null, access: "token", all_of: [], any_of: [], cf_access: false }] } }, key)),
      "no credential sources": () => JSON.stringify(sign({ ...base(), credentials: { sources: [] } }, key)),
      "wrong format": () => JSON.stringify(sign({ ...base(), format: "tokengate.bundle/v2" }, key)),
      "Access certs over plain http": () =>
        JSON.stringify(sign({ ...base(), cloudflare_access: { certs_url: "http://team.example.com/certs", audiences: ["a"] } }, key)),
      "invalid JSON": () => JSON.stringify(sign(base(), key)).slice(0, -2),
    };
    for (const [label, make] of Object.entries(cases)) {
      await refused(label, () => worker.push(null, { body: make() }), 400, "invalid_bundle");
    }
  });

  suite.test("refused: a body over 8 MiB (413), by its declared length or its actual size", async () => {
    const small = JSON.stringify(sign(bundle({ version: 30, environment: ENV, tokens: records() }), key));
    const declared = () =>
      worker.request("POST", "/.well-known/tokengate/bundle", {
        headers: [["content-length", String(8 * 1024 * 1024 + 1)]],
        body: small,
        raw: true,
      }).then((res) => ({ ...res, json: JSON.parse(res.body) }));
    await refused("declared too large", declared, 413, "too_large");
    const body = "x".repeat(8 * 1024 * 1024 + 1);
    // The Worker may answer before the whole body is sent and workerd then resets the
    // connection; a reset that loses the answer is retried.
    const sent = async () => {
      for (let i = 0; ; i++) {
        try {
          return await worker.push(null, { body });
        } catch (e) {
          if (i === 2) throw e;
        }
      }
    };
    await refused("too large", sent, 413, "too_large");
  });

  suite.test("refused: every vectors.json refusal, KV unchanged", async () => {
    // A Worker holding the fixture key and serving a fixture, as the refusals assume; each
    // push is correctly signed, so the bundle's own checks are what refuse it.
    const fixtures = await startWorker({ origin, key: VECTORS.key, environment: VECTORS.environment });
    try {
      const serving = await fixtures.push(VECTORS.bundles["revoke-all"].worker);
      assert.equal(serving.status, 200, serving.body);
      for (const r of VECTORS.refusals) {
        const before = await fixtures.snapshot();
        const res = await fixtures.push(null, { body: r.bundle });
        assert.ok([400, 401, 409].includes(res.status), `${r.name}: ${res.status} ${res.body}`);
        assert.deepEqual(await fixtures.snapshot(), before, `${r.name}: KV changed`);
      }
    } finally {
      await fixtures.dispose();
    }
  });

  suite.test("only what changed is written; a policy-only push writes no token", async () => {
    const next = records();
    next[1] = { ...next[1], revoked_at: nowSecs() };
    const revoke = await worker.push(sign(bundle({ version: 10, environment: ENV, tokens: next }), key));
    assert.deepEqual(revoke.json, { version: 10, applied: 1, tokens: 5 }, revoke.body);
    const fewer = await worker.push(sign(bundle({ version: 11, environment: ENV, tokens: next.slice(0, 4) }), key));
    assert.deepEqual(fewer.json, { version: 11, applied: 1, tokens: 4 }, fewer.body);
    const keys = Object.keys(await worker.snapshot()).filter((k) => k.startsWith("token:"));
    assert.equal(keys.length, 4, "the removed token's key is deleted");
    const policy = await worker.push(
      sign(bundle({ version: 12, environment: ENV, tokens: next.slice(0, 4), sources: ["bearer"] }), key),
    );
    assert.deepEqual(policy.json, { version: 12, applied: 0, tokens: 4 }, policy.body);
    const viaHeader = await worker.gate("GET", "/api/orders", { headers: [["x-internal-token", tokens[0].token]] });
    assert.equal(viaHeader.status, 401, "the new policy (bearer only) is served");
  });

  suite.test("a change set over the batch: 202 {applied, remaining} until 200, served version switches last", async () => {
    const small = await startWorker({ origin, key, environment: ENV, vars: { TOKENGATE_PUSH_BATCH: "5" } });
    try {
      const many = Array.from({ length: 23 }, (_, i) => ({ name: `bulk-${i}`, token: makeToken() }));
      const b = sign(bundle({ version: 1, environment: ENV, tokens: many.map((t) => record(t.name, t.token, ["orders:read"], { created_at })) }), key);
      const { final, answers } = await small.pushAll(b);
      assert.equal(final.status, 200, final.body);
      const partial = answers.slice(0, -1).map((a) => a.json);
      assert.deepEqual(partial, [
        { version: 1, applied: 5, remaining: 18 },
        { version: 1, applied: 5, remaining: 13 },
        { version: 1, applied: 5, remaining: 8 },
        { version: 1, applied: 5, remaining: 3 },
      ]);
      assert.deepEqual(headerValues(answers[0].headers, "retry-after"), ["1"]);
      assert.deepEqual(final.json, { version: 1, applied: 3, tokens: 23 });
      for (const t of [many[0], many[22]]) {
        const res = await small.gate("GET", "/api/x", { headers: [["authorization", `Bearer ${t.token}`]] });
        assert.equal(res.status, 200);
      }

      // The next push: 4 revoked, 3 removed, 2 added: 9 changes, no more.
      const next = many.slice(0, 20).map((t, i) => record(t.name, t.token, ["orders:read"], i < 4 ? { created_at, revoked_at: nowSecs() } : { created_at }));
      const added = [makeToken(), makeToken()];
      next.push(record("late-0", added[0], ["orders:read"]), record("late-1", added[1], ["orders:read"]));
      const b2 = sign(bundle({ version: 2, environment: ENV, tokens: next }), key);
      const first = await small.push(b2);
      assert.deepEqual(first.json, { version: 2, applied: 5, remaining: 4 }, first.body);
      assert.equal((await small.status()).version, 1, "still serving version 1 while partly applied");
      const older = await small.push(sign(bundle({ version: 1, environment: ENV, tokens: next }), key));
      assert.equal(older.status, 409, "an older push cannot cut in");
      const rest = await small.pushAll(b2);
      assert.deepEqual(rest.final.json, { version: 2, applied: 4, tokens: 22 }, rest.final.body);
      assert.equal((await small.status()).version, 2);
      const revoked = await small.gate("GET", "/api/x", { headers: [["authorization", `Bearer ${many[0].token}`]] });
      assert.equal(revoked.status, 401);
      const fresh = await small.gate("GET", "/api/x", { headers: [["authorization", `Bearer ${added[1]}`]] });
      assert.equal(fresh.status, 200);
    } finally {
      await small.dispose();
    }
  });

  suite.test("1200 tokens with the default batch: 202 after 900 changes, then 200", async () => {
    const big = await startWorker({ origin, key, environment: ENV });
    try {
      const many = Array.from({ length: 1200 }, (_, i) => record(`t-${i}`, makeToken(), ["orders:read"]));
      const b = sign(bundle({ version: 1, environment: ENV, tokens: many }), key);
      const { final, answers } = await big.pushAll(b);
      assert.deepEqual(answers[0].json, { version: 1, applied: 900, remaining: 300 });
      assert.deepEqual(final.json, { version: 1, applied: 300, tokens: 1200 });
      const keys = Object.keys(await big.snapshot()).filter((k) => k.startsWith("token:"));
      assert.equal(keys.length, 1200);
    } finally {
      await big.dispose();
    }
  });

  suite.test("a batch that died before it was confirmed is written again, its strays deleted", async () => {
    // As if a push request wrote its intent and one record, then died: the record is not in
    // the index, and the next bundle does not hold it. It must not survive.
    const kv = await worker.kv();
    const stray = makeToken();
    const strayRecord = record("stray", stray, ["orders:read"]);
    await kv.put(`token:${strayRecord.hash}`, JSON.stringify(strayRecord));
    await kv.put("push:intent", JSON.stringify({ id: "died", hashes: [strayRecord.hash] }));
    const res = await worker.push(sign(bundle({ version: 20, environment: ENV, tokens: records().slice(0, 4) }), key));
    assert.equal(res.status, 200, res.body);
    assert.equal(await kv.get(`token:${strayRecord.hash}`), null, "the stray record is deleted");
    const denied = await worker.gate("GET", "/api/x", { headers: [["authorization", `Bearer ${stray}`]] });
    assert.equal(denied.status, 401);
  });
}
