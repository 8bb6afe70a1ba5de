// The push protocol: the Ed25519-signed request and its window, the bundle's own signatures
// and checks, every refusal leaving KV exactly as it was, trust following the served
// bundle's keys, nothing the Worker holds being enough to forge, writing only what changed,
// and change sets larger than one request's KV budget applied over several requests (202
// until 200).
import { BUNDLE_PATH, assert, assertRefused, headerValues, heldBy, safeJson, startWorker } from "./lib/harness.mjs";
import {
  FORMAT,
  VECTORS,
  bundle,
  bundleMessage,
  bundleSignature,
  envelope,
  fixtureSeedsFor,
  hmacHex,
  keyId,
  makeToken,
  nowSecs,
  payloadOf,
  publicKeyHex,
  publish,
  pushMessage,
  pushSignature,
  randomKey,
  record,
  signHex,
} from "./lib/bundle.mjs";

const ENV = "prod";
const MiB = 1024 * 1024;
const withJson = (res) => ({ ...res, json: safeJson(res.body) });

/** Every 64-hex substring of `text` (lower-cased), at any offset of any longer hex run. */
function hex64Strings(text) {
  const found = new Set();
  for (const m of text.matchAll(/[0-9a-fA-F]{64,}/g)) {
    const run = m[0].toLowerCase();
    for (let i = 0; i + 64 <= run.length; i++) found.add(run.slice(i, i + 64));
  }
  return found;
}

export default function (suite, { origin }) {
  const key = randomKey();
  const tokens = Array.from({ length: 5 }, (_, i) => ({ name: `svc-${i}`, token: makeToken() }));
  // One creation time, so that the same token gives the same record in every bundle.
  const created_at = nowSecs() - 60;
  const records = () => tokens.map((t) => record(t.name, t.token, ["orders:read"], { created_at }));
  /** The suite's bundles: published by the trusted key, listing it alone. */
  const signed = (b) => publish(b, [key]);
  let worker;
  suite.before(async () => {
    worker = await startWorker({ origin, keys: [key], environment: ENV });
  });
  suite.after(() => worker?.dispose());

  /** Pushes and asserts the refusal, and that KV and what is served did not move. */
  const refused = (label, attempt, status, error) => assertRefused(worker, label, attempt, [[status, error]]);

  suite.test("a signed push is served: 200, status reports version, token count and the trusted key id", async () => {
    const res = await worker.push(signed(bundle({ version: 1, environment: ENV, tokens: records() })));
    assert.equal(res.status, 200, res.body);
    assert.deepEqual(res.json, { version: 1, applied: 5, tokens: 5 });
    const status = await worker.status();
    assert.equal(status.version, 1);
    assert.equal(status.environment, ENV);
    assert.equal(status.tokens, 5);
    assert.deepEqual(status.keys, [keyId(key)]);
    const ok = await worker.gate("GET", "/api/orders", { headers: [["authorization", `Bearer ${tokens[0].token}`]] });
    assert.equal(ok.status, 200);
  });

  suite.test("refused: body changed after signing (401 invalid_signature), even with the push signed again", async () => {
    const text = signed(bundle({ version: 2, environment: ENV, tokens: records() }));
    const header = pushSignature([key], nowSecs(), text);
    const tampered = text.replace('"orders:read"', '"orders:reae"');
    await refused("tampered", () => worker.push(tampered, { signature: header }), 401, "invalid_signature");
    // A push signature over the changed body: the bundle's own signature still does not cover it.
    await refused("tampered, push signed again", () => worker.push(tampered), 401, "invalid_signature");
  });

  suite.test("refused: a bundle reformatted after signing (401): the signatures cover its exact bytes", async () => {
    const text = signed(bundle({ version: 2, environment: ENV, tokens: records() }));
    const pretty = JSON.stringify(JSON.parse(text), null, 2);
    await refused("reformatted", () => worker.push(pretty), 401, "invalid_signature");
  });

  suite.test("refused: a push signed only by a key the Worker does not trust (401), KV unchanged", async () => {
    const other = randomKey();
    const own = publish(bundle({ version: 2, environment: ENV, tokens: records() }), [other]);
    await refused("bundle and push by another key", () => worker.push(own, { seeds: [other] }), 401, "invalid_signature");
    // Listing the trusted public key is no help without its signature.
    const listing = publish(
      bundle({ version: 2, environment: ENV, tokens: records(), keys: [publicKeyHex(key), publicKeyHex(other)] }),
      [other],
    );
    await refused("listing the trusted key", () => worker.push(listing, { seeds: [other] }), 401, "invalid_signature");
    // A good bundle, its push signed by another key alone.
    const good = signed(bundle({ version: 2, environment: ENV, tokens: records() }));
    await refused("push header by another key", () => worker.push(good, { seeds: [other] }), 401, "invalid_signature");
  });

  suite.test("refused: a bundle signed with another key in a correctly signed push (401)", async () => {
    const b = publish(bundle({ version: 2, environment: ENV, tokens: records() }), [randomKey()]);
    await refused("bundle key", () => worker.push(b), 401, "invalid_signature");
  });

  suite.test("refused: a trusted key's signature that does not verify, whatever else verifies (401)", async () => {
    const other = randomKey();
    const keys = [publicKeyHex(key), publicKeyHex(other)];
    const payload = JSON.stringify(payloadOf(bundle({ version: 2, environment: ENV, tokens: records(), keys })));
    const elsewhere = JSON.stringify(payloadOf(bundle({ version: 99, environment: ENV, tokens: records(), keys })));
    // In the bundle: the trusted key's signature is over other bytes, the unknown key's is valid.
    const b = envelope(payload, [], { signatures: [bundleSignature(other, payload), bundleSignature(key, elsewhere)] });
    await refused("bundle", () => worker.push(b), 401, "invalid_signature");
    // In the push header: the same, around a bundle that is itself good.
    const good = envelope(payload, [key, other]);
    const t = nowSecs();
    const valid = pushSignature([other], t, good).split(",")[1];
    const wrong = pushSignature([key], t, `${good} `).split(",")[1];
    await refused("push header", () => worker.push(good, { signature: `t=${t},${valid},${wrong}` }), 401, "invalid_signature");
  });

  suite.test("refused: missing or malformed Tokengate-Signature (401)", async () => {
    const b = signed(bundle({ version: 2, environment: ENV, tokens: records() }));
    const t = nowSecs();
    const [, entry] = pushSignature([key], t, b).split(",");
    await refused("missing", () => worker.push(b, { headers: [["content-type", "application/json"]] }), 401, "invalid_signature");
    const malformed = {
      empty: "",
      garbage: "v1=abc",
      "no t": entry,
      "no signature": `t=${t}`,
      "t not a number": `t=${t}x,${entry}`,
      "a signature cut short": `t=${t},${entry.slice(0, -2)}`,
      "not a key id": `t=${t},kid_${"0".repeat(15)}=${entry.split("=")[1]}`,
      "the v1 form (HMAC under the key as a secret)": `t=${t},v1=${hmacHex(key, `${t}.${b}`)}`,
    };
    for (const [label, value] of Object.entries(malformed)) {
      await refused(label, () => worker.push(b, { signature: value }), 401, "invalid_signature");
    }
  });

  suite.test("refused: stale and future t, outside the 5-minute window (401)", async () => {
    const b = signed(bundle({ version: 2, environment: ENV, tokens: records() }));
    await refused("stale", () => worker.push(b, { t: nowSecs() - 301 }), 401, "signature_expired");
    await refused("future", () => worker.push(b, { t: nowSecs() + 301 }), 401, "signature_expired");
    const edge = await worker.push(b, { t: nowSecs() - 290 });
    assert.equal(edge.status, 200, `t 290 s old is inside the window: ${edge.body}`);
  });

  suite.test("refused: replaying an applied push byte for byte inside the window (409 not_newer), nothing changes", async () => {
    const text = signed(bundle({ version: 3, environment: ENV, tokens: records() }));
    // One request, sent twice: same t, same body, same header.
    const request = {
      headers: [
        ["content-type", "application/json"],
        ["tokengate-signature", pushSignature([key], nowSecs(), text)],
      ],
      body: text,
    };
    const send = async () => withJson(await worker.request("POST", BUNDLE_PATH, request));
    const first = await send();
    assert.equal(first.status, 200, first.body);
    await refused("replay", send, 409, "not_newer");
    assert.equal((await worker.status()).version, 3);
  });

  suite.test("refused: an older version, and the same version with other content (409)", async () => {
    const older = signed(bundle({ version: 1, environment: ENV, tokens: records() }));
    await refused("rollback", () => worker.push(older), 409, "not_newer");
    const same = signed(bundle({ version: 3, environment: ENV, tokens: records().slice(1) }));
    await refused("same version", () => worker.push(same), 409, "not_newer");
  });

  suite.test("refused: another environment, another target (409)", async () => {
    const staging = signed(bundle({ version: 9, environment: "staging", tokens: records() }));
    await refused("environment", () => worker.push(staging), 409, "wrong_environment");
    const envoy = signed(bundle({ version: 9, environment: ENV, target: "envoy", tokens: records() }));
    await refused("target", () => worker.push(envoy), 409, "wrong_target");
  });

  suite.test("refused: invalid bundles (400 invalid_bundle)", async () => {
    const base = () => bundle({ version: 9, environment: ENV, tokens: records() });
    const text = (payload) => JSON.stringify(payloadOf(payload, [key]));
    const cases = {
      "unknown payload member": () => envelope(JSON.stringify({ ...payloadOf(base(), [key]), debug: true }), [key]),
      "a v1 payload member (format)": () =>
        envelope(JSON.stringify({ format: "tokengate.bundle/v1", ...payloadOf(base(), [key]) }), [key]),
      "unknown envelope member after the payload": () => envelope(text(base()), [key], { extra: ',"comment":"x"' }),
      "wrong format": () => envelope(text(base()), [key], { format: "tokengate.bundle/v1" }),
      "no payload": () => {
        const sig = bundleSignature(key, "");
        return `{"format":"${FORMAT}","signatures":${JSON.stringify([sig])}}`;
      },
      "bad scope": () => signed({ ...base(), tokens: [record("x", makeToken(), ["Orders Read"])] }),
      "duplicate names": () => signed({ ...base(), tokens: [...records(), record("svc-0", makeToken(), [])] }),
      "duplicate hashes": () => signed({ ...base(), tokens: [...records(), record("copy", tokens[0].token, [])] }),
      "bad rule path": () =>
        signed({ ...base(), policy: { rules: [{ name: "r", path: { prefix: "/a/../b" }, methods: [], host: null, access: "token", all_of: [], any_of: [], cf_access: false }] } }),
      "no credential sources": () => signed({ ...base(), credentials: { sources: [] } }),
      "Access certs over plain http": () =>
        signed({ ...base(), cloudflare_access: { certs_url: "http://team.example.com/certs", audiences: ["a"] } }),
      "invalid JSON": () => signed(base()).slice(0, -2),
    };
    for (const [label, make] of Object.entries(cases)) {
      await refused(label, () => worker.push(make()), 400, "invalid_bundle");
    }
  });

  suite.test("refused: envelopes and key lists out of shape (400 invalid_bundle or 401 invalid_signature)", async () => {
    // Which of the two is the Worker's to say; that they are refused and change nothing is not.
    const either = [[400, "invalid_bundle"], [401, "invalid_signature"]];
    const base = (extra = {}) => bundle({ version: 9, environment: ENV, tokens: records(), ...extra });
    const payload = JSON.stringify(payloadOf(base(), [key]));
    const eight = Array.from({ length: 8 }, randomKey);
    const v1 = (() => {
      const body = { format: "tokengate.bundle/v1", ...payloadOf(base(), []), revoke_all_at: null, cloudflare_access: null };
      delete body.keys;
      return JSON.stringify({ ...body, signature: hmacHex(key, JSON.stringify(body)) });
    })();
    const cases = {
      "no signatures": () => envelope(payload, []),
      "the same key's signature twice": () => envelope(payload, [key, key]),
      "a signature by a key not in the payload's keys": () => publish(base({ keys: [publicKeyHex(randomKey())] }), [key]),
      "nine signatures and keys (at most 8)": () => publish(base(), [key, ...eight]),
      "a key listed twice": () => publish(base({ keys: [publicKeyHex(key), publicKeyHex(key)] }), [key]),
      "a listed key that is not 64 hex": () => publish(base({ keys: [publicKeyHex(key), "abc"] }), [key]),
      "no keys member": () => {
        const { keys, ...rest } = payloadOf(base(), [key]);
        return envelope(JSON.stringify(rest), [key]);
      },
      "a signature that is not 128 hex": () =>
        envelope(payload, [], { signatures: [{ key_id: keyId(key), signature: bundleSignature(key, payload).signature.slice(0, 64) }] }),
      "a v1 (HMAC) bundle": () => v1,
    };
    for (const [label, make] of Object.entries(cases)) {
      await assertRefused(worker, label, () => worker.push(make()), either);
    }
  });

  suite.test("refused: no Content-Length (411), or one over 8 MiB (413) before the body is read", async () => {
    const text = signed(bundle({ version: 30, environment: ENV, tokens: records() }));
    const signature = pushSignature([key], nowSecs(), text);
    const headers = [
      ["content-type", "application/json"],
      ["tokengate-signature", signature],
    ];
    // Chunked: the length is not known up front, so the Worker cannot bound it before reading.
    const chunked = async () =>
      withJson(
        await worker.request("POST", BUNDLE_PATH, {
          headers: [...headers, ["transfer-encoding", "chunked"]],
          body: `${Buffer.byteLength(text).toString(16)}\r\n${text}\r\n0\r\n\r\n`,
          raw: true,
        }),
      );
    await refused("chunked", chunked, 411, "length_required");
    // Declared over 8 MiB, a few KB sent: the body never completes, so an answer at all (and
    // not the request's timeout) shows the Worker refused on the header alone.
    const declared = async () =>
      withJson(
        await worker.request("POST", BUNDLE_PATH, {
          headers: [...headers, ["content-length", String(8 * MiB + 1)]],
          body: text,
          raw: true,
        }),
      );
    const start = Date.now();
    await refused("declared too large", declared, 413, "too_large");
    assert.ok(Date.now() - start < 10_000, "the refusal waited for the body");
    const body = "x".repeat(8 * MiB + 1);
    // The Worker may answer before the whole body is sent and workerd then resets the
    // connection; a reset that loses the answer is retried.
    const sent = async () => {
      for (let i = 0; ; i++) {
        try {
          return await worker.push(body);
        } catch (e) {
          if (i === 2) throw e;
        }
      }
    };
    await refused("too large", sent, 413, "too_large");
  });

  suite.test("refused: every vectors.json refusal, KV unchanged", async () => {
    // A Worker trusting the refusal's keys (trusted_keys unless it names others), serving its
    // fixture when it names one; each push is signed by the fixture keys that Worker trusts,
    // so the bundle's own checks are what refuse it.
    const workers = new Map();
    try {
      for (const r of VECTORS.refusals) {
        const trusted = r.trusted ?? VECTORS.trusted_keys;
        const seeds = fixtureSeedsFor(trusted);
        assert.ok(seeds.length > 0, `${r.name}: trusts no key the tests can sign with`);
        const label = `${trusted.join(",")}|${r.serving ?? ""}`;
        let w = workers.get(label);
        if (!w) {
          w = await startWorker({ origin, keys: seeds, trusted, environment: VECTORS.environment });
          workers.set(label, w);
          if (r.serving) {
            const serving = await w.push(VECTORS.bundles[r.serving].worker);
            assert.equal(serving.status, 200, `${r.name}: serving ${r.serving}: ${serving.body}`);
          }
        }
        const before = await w.snapshot();
        const served = await w.served();
        const res = await w.push(r.bundle.worker);
        assert.ok([400, 401, 409].includes(res.status), `${r.name}: ${res.status} ${res.body}`);
        assert.deepEqual(await w.snapshot(), before, `${r.name}: KV changed`);
        assert.deepEqual(await w.served(), served, `${r.name}: what is served changed`);
      }
    } finally {
      for (const w of workers.values()) await w.dispose();
    }
    return `${VECTORS.refusals.length} refusals on ${workers.size} Workers`;
  });

  suite.test("only what changed is written; a policy-only push writes no token", async () => {
    const next = records();
    next[1] = { ...next[1], revoked_at: nowSecs() };
    const revoke = await worker.push(signed(bundle({ version: 10, environment: ENV, tokens: next })));
    assert.deepEqual(revoke.json, { version: 10, applied: 1, tokens: 5 }, revoke.body);
    const fewer = await worker.push(signed(bundle({ version: 11, environment: ENV, tokens: next.slice(0, 4) })));
    assert.deepEqual(fewer.json, { version: 11, applied: 1, tokens: 4 }, fewer.body);
    const keys = Object.keys(await worker.snapshot()).filter((k) => k.startsWith("token:"));
    assert.equal(keys.length, 4, "the removed token's key is deleted");
    const policy = await worker.push(
      signed(bundle({ version: 12, environment: ENV, tokens: next.slice(0, 4), sources: ["bearer"] })),
    );
    assert.deepEqual(policy.json, { version: 12, applied: 0, tokens: 4 }, policy.body);
    const viaHeader = await worker.gate("GET", "/api/orders", { headers: [["x-internal-token", tokens[0].token]] });
    assert.equal(viaHeader.status, 401, "the new policy (bearer only) is served");
  });

  suite.test("a change set over the batch: 202 {applied, remaining} until 200, served version switches last", async () => {
    const small = await startWorker({ origin, keys: [key], environment: ENV, vars: { TOKENGATE_PUSH_BATCH: "5" } });
    try {
      const many = Array.from({ length: 23 }, (_, i) => ({ name: `bulk-${i}`, token: makeToken() }));
      const b = signed(bundle({ version: 1, environment: ENV, tokens: many.map((t) => record(t.name, t.token, ["orders:read"], { created_at })) }));
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
      const b2 = signed(bundle({ version: 2, environment: ENV, tokens: next }));
      const first = await small.push(b2);
      assert.deepEqual(first.json, { version: 2, applied: 5, remaining: 4 }, first.body);
      assert.equal((await small.status()).version, 1, "still serving version 1 while partly applied");
      const older = await small.push(signed(bundle({ version: 1, environment: ENV, tokens: next })));
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
    const big = await startWorker({ origin, keys: [key], environment: ENV });
    try {
      const many = Array.from({ length: 1200 }, (_, i) => record(`t-${i}`, makeToken(), ["orders:read"]));
      const b = signed(bundle({ version: 1, environment: ENV, tokens: many }));
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
    const res = await worker.push(signed(bundle({ version: 20, environment: ENV, tokens: records().slice(0, 4) })));
    assert.equal(res.status, 200, res.body);
    assert.equal(await kv.get(`token:${strayRecord.hash}`), null, "the stray record is deleted");
    const denied = await worker.gate("GET", "/api/x", { headers: [["authorization", `Bearer ${stray}`]] });
    assert.equal(denied.status, 401);
  });

  suite.test("trust follows the served bundle: A, then [A, B], then B alone; A alone is then refused, no restart", async () => {
    // An admin key rotation as the Worker sees it: its variable names A, and never changes.
    const A = randomKey();
    const B = randomKey();
    const chain = await startWorker({ origin, keys: [A], environment: ENV });
    try {
      const instance = chain.mf;
      const call = (token) => chain.gate("GET", "/api/orders", { headers: [["authorization", `Bearer ${token}`]] });
      const first = makeToken();
      const second = makeToken();
      const one = [record("first", first, ["orders:read"], { created_at })];
      const two = [...one, record("second", second, ["orders:read"], { created_at })];

      // v1 lists A and B and is signed by both: A is trusted, B's signature is not yet known.
      const v1 = await chain.push(publish(bundle({ version: 1, environment: ENV, tokens: one }), [A, B]), { seeds: [A, B] });
      assert.equal(v1.status, 200, v1.body);
      assert.deepEqual((await chain.status()).keys.slice().sort(), [keyId(A), keyId(B)].sort());
      const readsAfterFirst = (await chain.status()).kv_reads;

      // v2 lists B alone and is signed by B alone: B came with v1.
      const v2 = await chain.push(publish(bundle({ version: 2, environment: ENV, tokens: two }), [B]), { seeds: [B] });
      assert.equal(v2.status, 200, v2.body);
      assert.deepEqual((await chain.status()).keys, [keyId(B)]);
      assert.equal((await call(second)).status, 200);

      // v3 by A alone: A is no longer trusted, whatever the variable still says.
      const rogue = makeToken();
      const three = [...two, record("rogue", rogue, ["*"])];
      await assertRefused(
        chain,
        "A alone, listing A",
        () => chain.push(publish(bundle({ version: 3, environment: ENV, tokens: three }), [A]), { seeds: [A] }),
        [[401, "invalid_signature"]],
      );
      const listingB = bundle({ version: 3, environment: ENV, tokens: three, keys: [publicKeyHex(A), publicKeyHex(B)] });
      await assertRefused(
        chain,
        "A alone, listing A and B",
        () => chain.push(publish(listingB, [A]), { seeds: [A] }),
        [[401, "invalid_signature"]],
      );
      const status = await chain.status();
      assert.equal(status.version, 2, "still serving v2");
      assert.deepEqual(status.keys, [keyId(B)]);
      assert.equal((await call(rogue)).status, 401);
      assert.equal((await call(first)).status, 200);

      // Nothing was restarted or redeployed: the same instance, its variable still A alone, and
      // the isolate's read counter never went back to zero.
      assert.equal(chain.mf, instance);
      assert.equal(chain.bindings.TOKENGATE_TRUSTED_KEYS, publicKeyHex(A));
      assert.ok(status.kv_reads >= readsAfterFirst, "the isolate's counters were reset");
    } finally {
      await chain.dispose();
    }
  });

  suite.test("nothing a Worker holds can forge: no private key in it, and every 64-hex string in it fails to sign (401)", async () => {
    const admin = randomKey();
    const held = await startWorker({ origin, keys: [admin], environment: ENV });
    try {
      // Serving a bundle with a rotation in it, so KV holds current and previous hashes.
      const live = makeToken();
      const old = makeToken();
      const fresh = makeToken();
      const served = [
        record("live", live, ["orders:read"], { created_at }),
        record("rotated", fresh, ["orders:read"], { created_at, previous: old, grace_until: nowSecs() + 3600 }),
      ];
      const res = await held.push(publish(bundle({ version: 1, environment: ENV, tokens: served }), [admin]));
      assert.equal(res.status, 200, res.body);

      // Everything it holds: what it was started with, its env as the runtime gives it, all of
      // KV, and what it tells anyone who asks.
      const material = JSON.stringify({ ...(await heldBy(held)), status: await held.status() });
      for (const seed of [admin, key]) {
        assert.ok(!material.includes(seed), "a Worker holds an admin private key");
      }
      const found = hex64Strings(material);
      assert.ok(found.has(publicKeyHex(admin)), "the trusted public key was not among what was read");
      assert.ok(found.has(served[0].hash), "a token hash was not among what was read");

      const before = await held.snapshot();
      const state = await held.served();
      const rogue = makeToken();
      const trustedPublic = publicKeyHex(admin);
      const grant = (keys) => bundle({ version: 2, environment: ENV, tokens: [...served, record("rogue", rogue, ["*"])], keys });
      let attempts = 0;
      for (const seed of found) {
        const own = publicKeyHex(seed);
        const tries = {
          "as its own key": () => held.push(publish(grant([own]), [seed]), { seeds: [seed] }),
          "listing the trusted key too": () => held.push(publish(grant([trustedPublic, own]), [seed]), { seeds: [seed] }),
          "filed under the trusted key's id": () => {
            const payload = JSON.stringify(payloadOf(grant([trustedPublic])));
            const text = envelope(payload, [], {
              signatures: [{ key_id: keyId(admin), signature: signHex(seed, bundleMessage(payload)) }],
            });
            const t = nowSecs();
            const header = `t=${t},${keyId(admin)}=${signHex(seed, pushMessage(t, text))}`;
            return held.push(text, { signature: header });
          },
          "as a v1 shared push key (HMAC)": () => {
            const text = publish(grant([own]), [seed]);
            const t = nowSecs();
            return held.push(text, { signature: `t=${t},v1=${hmacHex(seed, `${t}.${text}`)}` });
          },
        };
        for (const [how, attempt] of Object.entries(tries)) {
          const answer = await attempt();
          attempts += 1;
          assert.equal(answer.status, 401, `${seed.slice(0, 8)}… ${how}: ${answer.status} ${answer.body}`);
          assert.equal(answer.json?.error, "invalid_signature", `${seed.slice(0, 8)}… ${how}: ${answer.body}`);
        }
      }
      assert.deepEqual(await held.snapshot(), before, "a forged push changed KV");
      assert.deepEqual(await held.served(), state, "a forged push changed what is served");
      const denied = await held.gate("GET", "/api/orders", { headers: [["authorization", `Bearer ${rogue}`]] });
      assert.equal(denied.status, 401);
      return `${found.size} hex strings read, ${attempts} forged pushes refused`;
    } finally {
      await held.dispose();
    }
  });

  suite.test("a Worker whose TOKENGATE_TRUSTED_KEYS is unusable says so on its status (500), before any push", async () => {
    for (const value of ["", "not-a-key", "0".repeat(64)]) {
      const broken = await startWorker({ origin, keys: [], environment: ENV, vars: { TOKENGATE_TRUSTED_KEYS: value } });
      try {
        const res = await broken.request("GET", "/.well-known/tokengate/status");
        const body = JSON.parse(res.body);
        assert.equal(res.status, 500, `${JSON.stringify(value)}: ${res.body}`);
        assert.equal(body.error, "server_error", res.body);
        assert.ok(body.error_description.includes("TOKENGATE_TRUSTED_KEYS"), res.body);
      } finally {
        await broken.dispose();
      }
    }
  });
}
