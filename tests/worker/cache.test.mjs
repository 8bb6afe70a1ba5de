// What the Worker reads and keeps: KV reads per request (none for a token that fails its
// checksum), the in-isolate cache and its staleness bound against KV changes made behind its
// back (as a push through another isolate would), fail-closed 503s, the status endpoint,
// and what KV holds (hashes only, never a plaintext token).
import { CACHE_TTL_MS, assert, assertNoPlaintext, headerValues, sleep, startWorker } from "./lib/harness.mjs";
import { bundle, corrupt, keyId, makeToken, nowSecs, publish, randomKey, record } from "./lib/bundle.mjs";

const ENV = "prod";

export default function (suite, { origin }) {
  const key = randomKey();
  const live = makeToken();
  const other = makeToken("sk_test");
  const plaintexts = [live, other];
  let liveRecord;
  let worker;
  suite.before(async () => {
    worker = await startWorker({ origin, keys: [key], environment: ENV });
  });
  suite.after(() => worker?.dispose());

  const call = (headers, path = "/api/orders") => worker.gate("GET", path, { headers });
  const bearer = (token) => [["authorization", `Bearer ${token}`]];

  suite.test("no bundle yet: 503 with Retry-After, fail closed (reason no_bundle)", async () => {
    const res = await call(bearer(live));
    assert.equal(res.status, 503);
    assert.deepEqual(headerValues(res.headers, "retry-after"), ["5"]);
    assert.equal(JSON.parse(res.body).error, "temporarily_unavailable");
    assert.equal((await worker.decision(res.ray)).reason, "no_bundle");
    assert.equal(origin.requests.some((r) => headerValues(r.headers, "cf-ray")[0] === res.ray), false);
    // Nothing served yet: the status says so, and trusts the key TOKENGATE_TRUSTED_KEYS names.
    const status = await worker.status();
    assert.equal(status.version, null);
    assert.deepEqual(status.keys, [keyId(key)]);
  });

  suite.test("status: version, environment, tokens, the trusted key ids, kv_reads, and nothing else", async () => {
    liveRecord = record("live", live, ["orders:read"]);
    const res = await worker.push(publish(bundle({ version: 1, environment: ENV, tokens: [liveRecord, record("other", other, [])] }), [key]));
    assert.equal(res.status, 200, res.body);
    const status = await worker.status();
    assert.deepEqual(Object.keys(status).sort(), ["environment", "keys", "kv_reads", "tokens", "version"]);
    assert.equal(status.version, 1);
    assert.equal(status.tokens, 2);
    assert.deepEqual(status.keys, [keyId(key)]);
    const text = JSON.stringify(status);
    assert.ok(!text.includes(liveRecord.hash) && !text.includes(key), "no hash, no private key");
  });

  suite.test("kv_reads: a checksum-failing or unreadable token costs no KV read", async () => {
    const before = (await worker.status()).kv_reads;
    const garbage = [
      bearer(corrupt(live)),
      bearer(corrupt(other)),
      bearer(live.slice(0, 20) + (live[20] === "x" ? "y" : "x") + live.slice(21)),
      bearer("a".repeat(600)),
      bearer(""),
      [["x-internal-token", "has space"]],
    ];
    for (let i = 0; i < 5; i++) {
      for (const headers of garbage) assert.equal((await call(headers)).status, 401);
    }
    assert.equal((await call([], "/healthz")).status, 200);
    const after = (await worker.status()).kv_reads;
    assert.equal(after - before, 0, "no KV read for 31 requests");
  });

  suite.test("kv_reads: an unknown well-formed token costs one read, then the negative cache answers", async () => {
    const unknown = makeToken();
    const before = (await worker.status()).kv_reads;
    for (let i = 0; i < 3; i++) assert.equal((await call(bearer(unknown))).status, 401);
    assert.equal((await worker.status()).kv_reads - before, 1);
  });

  suite.test(`staleness bound: a revocation written to KV elsewhere is seen within ${CACHE_TTL_MS} ms`, async () => {
    const cached = await call(bearer(live));
    assert.equal(cached.status, 200);
    const cachedAt = Date.now();
    const kv = await worker.kv();
    await kv.put(`token:${liveRecord.hash}`, JSON.stringify({ ...liveRecord, revoked_at: nowSecs() }));
    assert.equal((await call(bearer(live))).status, 200, "the cached record still answers right after the write");
    let flippedAfter = null;
    while (Date.now() - cachedAt < CACHE_TTL_MS + 1000) {
      if ((await call(bearer(live))).status === 401) {
        flippedAfter = Date.now() - cachedAt;
        break;
      }
      await sleep(100);
    }
    assert.ok(flippedAfter !== null, "still passing after the bound");
    // The bound is measured from the read that filled the cache, which came before cachedAt.
    assert.ok(flippedAfter <= CACHE_TTL_MS + 200, `took ${flippedAfter} ms`);
    await kv.put(`token:${liveRecord.hash}`, JSON.stringify(liveRecord));
    return `revocation seen after ${flippedAfter} ms`;
  });

  suite.test(`staleness bound: a new meta in KV is served within ${CACHE_TTL_MS} ms`, async () => {
    const kv = await worker.kv();
    const meta = JSON.parse(await kv.get("meta"));
    meta.bundle.version = 50;
    const start = Date.now();
    await kv.put("meta", JSON.stringify(meta));
    let seenAfter = null;
    while (Date.now() - start < CACHE_TTL_MS + 1000) {
      if ((await worker.status()).version === 50) {
        seenAfter = Date.now() - start;
        break;
      }
      await sleep(100);
    }
    assert.ok(seenAfter !== null && seenAfter <= CACHE_TTL_MS + 200, `took ${seenAfter} ms`);
    return `new version seen after ${seenAfter} ms`;
  });

  suite.test("a corrupt token record or meta in KV fails closed (503), never open", async () => {
    const kv = await worker.kv();
    const broken = makeToken();
    const hash = record("x", broken, []).hash;
    await kv.put(`token:${hash}`, "{not json");
    const res = await call(bearer(broken));
    assert.equal(res.status, 503);
    assert.equal((await worker.decision(res.ray)).reason, "internal");
    await kv.delete(`token:${hash}`);

    const good = await kv.get("meta");
    await kv.put("meta", '{"bundle": 1}');
    await sleep(CACHE_TTL_MS + 100);
    const down = await call(bearer(live));
    assert.equal(down.status, 503);
    await kv.put("meta", good);
    await sleep(CACHE_TTL_MS + 100);
    assert.equal((await call(bearer(live))).status, 200, "recovers once the meta is good again");
  });

  suite.test("KV holds hashes only: no key or value contains a plaintext token or the private key", async () => {
    const snapshot = await worker.snapshot();
    const keys = Object.keys(snapshot);
    for (const k of keys) {
      assert.ok(/^(meta|push:index|push:intent|token:[0-9a-f]{64})$/.test(k), `unexpected key ${k}`);
    }
    assert.ok(keys.includes(`token:${liveRecord.hash}`));
    assertNoPlaintext(snapshot, [...plaintexts, key]);
    return `${keys.length} keys scanned`;
  });
}
