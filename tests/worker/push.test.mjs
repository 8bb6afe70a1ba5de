// The push protocol: the Ed25519-signed request and its window, the bundle's own signatures
// and checks, every refusal leaving KV and the push state exactly as they were, trust
// following the served bundle's keys, nothing the Worker holds being enough to forge, and
// storage as content-addressed pages (KV holds only page:<sha256>): an inline bundle commits
// in one request, a paged one as a manifest then its missing pages (202 until 200), and only
// pages that changed are written.
import { BUNDLE_PATH, assert, assertRefused, headerValues, heldBy, safeJson, startWorker } from "./lib/harness.mjs";
import {
  FORMAT,
  VECTORS,
  bundle,
  bundleMessage,
  bundleSignature,
  envelope,
  fixtureSeedsFor,
  hashRecord,
  hmacHex,
  keyId,
  makeToken,
  nowSecs,
  pageBits,
  pageOf,
  pagesOf,
  payloadOf,
  publicKeyHex,
  publish,
  publishPaged,
  pushMessage,
  pushSignature,
  randomHash,
  randomKey,
  record,
  sha256Hex,
  signHex,
} from "./lib/bundle.mjs";

const ENV = "prod";
const MiB = 1024 * 1024;
const withJson = (res) => ({ ...res, json: safeJson(res.body) });

/** The set difference a - b of two iterables, as a sorted array. */
const minus = (a, b) => {
  const drop = new Set(b);
  return [...new Set(a)].filter((x) => !drop.has(x)).sort();
};

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

  suite.test("a signed push is served in one request: 200, KV holds its one page, status reports version, tokens, the trusted key id", async () => {
    const res = await worker.push(signed(bundle({ version: 1, environment: ENV, tokens: records() })));
    assert.equal(res.status, 200, res.body);
    assert.deepEqual(res.json, { version: 1, tokens: 5, pages: 1, written: 1 });
    // KV holds the one page, named by its digest, exactly as the paging rule makes it here.
    const [page] = pagesOf(records()).texts;
    assert.deepEqual(await worker.snapshot(), { [`page:${sha256Hex(page)}`]: page });
    const status = await worker.status();
    assert.equal(status.version, 1);
    assert.equal(status.environment, ENV);
    assert.equal(status.tokens, 5);
    assert.deepEqual(status.keys, [keyId(key)]);
    assert.equal(status.pending, null);
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

  /** A bundle of the suite's five tokens and `fill` hash-only records, all created at once. */
  const filled = (fill, prefix = "fill") => [
    ...records(),
    ...Array.from({ length: fill }, (_, i) => hashRecord(`${prefix}-${i}`, randomHash(), ["orders:read"], { created_at })),
  ];
  const bearer = (token) => [["authorization", `Bearer ${token}`]];

  suite.test("only what changed is written: one page per page that changed, none for a policy-only push", async () => {
    // 1000 records: 4 pages. Each push answers how many pages it wrote, and KV gains exactly
    // those pages (new keys: the pushed bundle's pages the served one did not have).
    const next = filled(995);
    assert.equal(pageBits(next.length), 2);
    // What is served when this test starts: the suite's five tokens (versions 1 to 3).
    let current = records();
    const pushAndCheck = async (version, tokensNow, extra = {}) => {
      const before = await worker.pageDigests();
      const servedBefore = pagesOf(current).digests;
      const res = await worker.push(signed(bundle({ version, environment: ENV, tokens: tokensNow, ...extra })));
      assert.equal(res.status, 200, res.body);
      const { digests } = pagesOf(tokensNow);
      const changed = minus(digests, servedBefore);
      assert.deepEqual(res.json, { version, tokens: tokensNow.length, pages: 4, written: changed.length }, res.body);
      const after = await worker.pageDigests();
      assert.deepEqual(minus(after, before), changed, `v${version}: KV gained other pages than the changed ones`);
      for (const d of digests) assert.ok(after.has(d), `v${version}: page ${d.slice(0, 12)}… is not in KV`);
      current = tokensNow;
      return changed.length;
    };
    assert.equal(await pushAndCheck(10, next), 4);
    // Revoke one token: its page alone changes.
    const revoked = next.map((r, i) => (i === 1 ? { ...r, revoked_at: nowSecs() } : r));
    assert.equal(await pushAndCheck(11, revoked), 1);
    // Remove one record from another page than the revoked one's.
    const bits = 2;
    const gone = revoked.findIndex((r, i) => i >= 5 && pageOf(r.hash, bits) !== pageOf(revoked[1].hash, bits));
    const fewer = revoked.filter((_, i) => i !== gone);
    assert.equal(await pushAndCheck(12, fewer), 1);
    // Policy only (credentials from the bearer header alone): no page changes, none written.
    assert.equal(await pushAndCheck(13, fewer, { sources: ["bearer"] }), 0);
    const viaHeader = await worker.gate("GET", "/api/orders", { headers: [["x-internal-token", tokens[0].token]] });
    assert.equal(viaHeader.status, 401, "the new policy (bearer only) is served");
    assert.equal((await worker.gate("GET", "/api/orders", { headers: bearer(tokens[0].token) })).status, 200);
    assert.equal((await worker.gate("GET", "/api/orders", { headers: bearer(tokens[1].token) })).status, 401, "revoked");
  });

  suite.test("a paged push: manifest 202 {missing} (Retry-After: 0), 202 {remaining} per page, 200 on the last; nothing changes before it", async () => {
    const paged = await startWorker({ origin, keys: [key], environment: ENV });
    try {
      const real = Array.from({ length: 20 }, (_, i) => ({ name: `real-${i}`, token: makeToken() }));
      const realRecords = real.map((t) => record(t.name, t.token, ["orders:read"], { created_at }));
      const fill = Array.from({ length: 580 }, (_, i) => hashRecord(`fill-${i}`, randomHash(), ["orders:read"], { created_at }));
      const v1 = publishPaged(bundle({ version: 1, environment: ENV, tokens: [...realRecords, ...fill] }), [key]);
      assert.equal(v1.pages.length, 4, "600 records: 4 pages");

      const manifest = await paged.push(v1.text);
      assert.equal(manifest.status, 202, manifest.body);
      assert.deepEqual([manifest.json.version, manifest.json.pages, manifest.json.missing], [1, 4, [0, 1, 2, 3]], manifest.body);
      assert.deepEqual(headerValues(manifest.headers, "retry-after"), ["0"]);
      assert.deepEqual(await paged.keys(), [], "a manifest writes nothing to KV");
      const pending = await paged.statusWhen((s) => s.pending !== null, "status: version 1 pending");
      assert.equal(pending.version, null, "nothing is served before the last page");
      assert.deepEqual(pending.pending, { version: 1, remaining: 4 });
      const first = realRecords.findIndex((r) => pageOf(r.hash, 2) === 0);
      assert.ok(first >= 0, "no real token in page 0");
      for (const i of [0, 1, 2]) {
        const res = await paged.pushPage(1, i, v1.pages[i]);
        assert.equal(res.status, 202, `page ${i}: ${res.body}`);
        assert.deepEqual([res.json.version, res.json.remaining], [1, 3 - i], `page ${i}: ${res.body}`);
        assert.deepEqual(headerValues(res.headers, "retry-after"), ["0"]);
        assert.ok((await paged.pageDigests()).has(v1.digests[i]), `page ${i} is not in KV`);
        assert.equal((await paged.status()).version, null);
        const early = await paged.gate("GET", "/api/x", { headers: bearer(real[first].token) });
        assert.equal(early.status, 503, `page ${i} stored, version 1 not committed: ${early.status}`);
      }
      const last = await paged.pushPage(1, 3, v1.pages[3]);
      assert.equal(last.status, 200, last.body);
      assert.equal(last.json.version, 1);
      assert.equal(last.json.tokens, 600);
      assert.equal(last.json.pages, 4);
      assert.equal(typeof last.json.written, "number");
      const status = await paged.status();
      assert.equal(status.version, 1);
      assert.equal(status.tokens, 600);
      assert.equal(status.pending, null);
      assert.deepEqual([...(await paged.pageDigests())].sort(), [...v1.digests].sort());
      for (const t of [real[0], real[19]]) {
        assert.equal((await paged.gate("GET", "/api/x", { headers: bearer(t.token) })).status, 200);
      }

      // The next push: 4 revoked, 3 removed, 2 added. While it is pending the Worker serves
      // version 1 as it was: a revoked token still passes; an older push cannot cut in.
      const added = [makeToken(), makeToken()];
      const nextRecords = [
        ...realRecords.slice(0, 17).map((r, i) => (i < 4 ? { ...r, revoked_at: nowSecs() } : r)),
        ...fill,
        record("late-0", added[0], ["orders:read"], { created_at }),
        record("late-1", added[1], ["orders:read"], { created_at }),
      ];
      const v2 = publishPaged(bundle({ version: 2, environment: ENV, tokens: nextRecords }), [key]);
      const changed = v2.digests.map((d, i) => (v1.digests.includes(d) ? null : i)).filter((i) => i !== null);
      const m2 = await paged.push(v2.text);
      assert.equal(m2.status, 202, m2.body);
      assert.deepEqual(m2.json.missing, changed, "the Worker asks for exactly the pages that changed");
      const stillServed = await paged.gate("GET", "/api/x", { headers: bearer(real[0].token) });
      assert.equal(stillServed.status, 200, "a revocation takes effect at the commit, not before");
      await assertRefused(paged, "an older push while one is pending", () => paged.push(v1.text), [[409, "not_newer"]]);
      const rest = await paged.pushPaged(v2.text, v2.pages);
      assert.equal(rest.final.status, 200, rest.final.body);
      assert.deepEqual(rest.sent.slice().sort((a, b) => a - b), changed);
      assert.equal((await paged.status()).version, 2);
      assert.equal((await paged.status()).tokens, 599);
      assert.equal((await paged.gate("GET", "/api/x", { headers: bearer(real[0].token) })).status, 401);
      assert.equal((await paged.gate("GET", "/api/x", { headers: bearer(real[18].token) })).status, 401, "removed");
      assert.equal((await paged.gate("GET", "/api/x", { headers: bearer(added[1]) })).status, 200);
      return `${changed.length} of 4 pages sent for 9 changes`;
    } finally {
      await paged.dispose();
    }
  });

  suite.test("1200 tokens inline: one request, 200, its 8 pages written; KV holds exactly those pages", async () => {
    const big = await startWorker({ origin, keys: [key], environment: ENV });
    try {
      const many = Array.from({ length: 1200 }, (_, i) => record(`t-${i}`, makeToken(), ["orders:read"]));
      const res = await big.push(signed(bundle({ version: 1, environment: ENV, tokens: many })));
      assert.equal(res.status, 200, res.body);
      assert.deepEqual(res.json, { version: 1, tokens: 1200, pages: 8, written: 8 });
      const { texts, digests } = pagesOf(many);
      assert.deepEqual(await big.snapshot(), Object.fromEntries(digests.map((d, i) => [`page:${d}`, texts[i]])));
    } finally {
      await big.dispose();
    }
  });

  suite.test("an inline and a paged push of the same records name the same pages: the paged one commits at once, written 0", async () => {
    // The Worker's paging (inline) and this file's (paged) agree byte for byte, so a client
    // may send either form and no page is stored twice.
    const tokensNow = filled(995, "same");
    const inline = await worker.push(signed(bundle({ version: 14, environment: ENV, tokens: tokensNow })));
    assert.equal(inline.status, 200, inline.body);
    const kv = await worker.keys();
    const paged = publishPaged(bundle({ version: 15, environment: ENV, tokens: tokensNow }), [key]);
    const res = await worker.push(paged.text);
    assert.equal(res.status, 200, `every page is stored already: ${res.body}`);
    assert.deepEqual(res.json, { version: 15, tokens: 1000, pages: 4, written: 0 });
    assert.deepEqual(await worker.keys(), kv, "KV changed");
    assert.equal((await worker.status()).version, 15);
    assert.equal((await worker.gate("GET", "/api/orders", { headers: bearer(tokens[0].token) })).status, 200);
  });

  suite.test("refused: paged bundles out of shape (400 invalid_bundle), nothing pending", async () => {
    const base = bundle({ version: 40, environment: ENV, tokens: records() });
    const digest = sha256Hex("[]");
    const withTokens = (tokensMember) => envelope(JSON.stringify({ ...payloadOf(base, [key]), tokens: tokensMember }), [key]);
    const cases = {
      "3 pages (not a power of two)": { pages: [digest, digest, digest], tokens: 5, imported_secrets: false },
      "no pages": { pages: [], tokens: 5, imported_secrets: false },
      "8192 pages": { pages: Array(8192).fill(digest), tokens: 5, imported_secrets: false },
      "a digest of 63 hex": { pages: [digest.slice(1)], tokens: 5, imported_secrets: false },
      "an upper-case digest": { pages: [digest.toUpperCase()], tokens: 5, imported_secrets: false },
      "an unknown member": { pages: [digest], tokens: 5, imported_secrets: false, records: 5 },
      "tokens not a number": { pages: [digest], tokens: "5", imported_secrets: false },
      "more than 1,000,000 tokens": { pages: [digest], tokens: 1_000_001, imported_secrets: false },
    };
    for (const [label, member] of Object.entries(cases)) {
      await assertRefused(worker, label, () => worker.push(withTokens(member)), [[400, "invalid_bundle"]]);
    }
  });

  suite.test("a page in KV that the served bundle does not name is never read: a stray page grants nothing", async () => {
    // As if a push died after writing a page, or anyone wrote KV: content-addressed, but no
    // signed page list names it.
    const kv = await worker.kv();
    const stray = makeToken();
    const [strayPage] = pagesOf([record("stray", stray, ["*"])]).texts;
    await kv.put(`page:${sha256Hex(strayPage)}`, strayPage);
    const res = await worker.push(signed(bundle({ version: 20, environment: ENV, tokens: records().slice(0, 4) })));
    assert.equal(res.status, 200, res.body);
    const denied = await worker.gate("GET", "/api/x", { headers: bearer(stray) });
    assert.equal(denied.status, 401);
    assert.equal((await worker.gate("GET", "/api/x", { headers: bearer(tokens[0].token) })).status, 200);
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
