// The Worker at scale, and the paged push protocol's edges (issue #15): 100,000 tokens pushed
// from empty as a paged bundle, then changed, with only the changed pages asked for and sent;
// a revoke-all enforced on every isolate while its push is still pending; an interrupted push
// resumed, and a newer version replacing a half-done one; replays; the imported_secrets
// promise (no KV read for a credential without the tokengate shape); page refusals, each
// leaving KV and the push state exactly as they were.
//
// Hash-only records (a random hash, no secret) fill the large bundles; every token a test
// sends a request with is a real one (its secret made here, its record holding its SHA-256).
import crypto from "node:crypto";
import { CACHE_TTL_MS, assert, assertRefused, headerValues, pageTarget, sleep, startWorker } from "./lib/harness.mjs";
import {
  bundle,
  hashRecord,
  makeToken,
  nowSecs,
  pageOf,
  pagesOf,
  publishPaged,
  randomHash,
  randomKey,
  record,
  sha256Hex,
} from "./lib/bundle.mjs";

const ENV = "prod";
const N = 100_000;
const BITS = 9; // 100,000 to 102,000 lookup records: 512 pages
const SAMPLE = 200; // real tokens per kind checked after the change
/** The stated bound for a pending revoke-all (5 s), and what the test allows on a slow VM. */
const REVOKE_ALL_BOUND_MS = CACHE_TTL_MS + 1500;

const bearer = (token) => [["authorization", `Bearer ${token}`]];
const ask = (w, token) => w.gate("GET", "/api/orders", { headers: bearer(token) });
const sorted = (list) => [...list].sort((a, b) => a - b);
const range = (n) => Array.from({ length: n }, (_, i) => i);

/** The indices of `next`'s pages whose digest is not in `stored` (what the Worker must ask for). */
const expectMissing = (next, stored) => {
  const have = new Set(stored);
  return range(next.digests.length).filter((i) => !have.has(next.digests[i]));
};

/** A random hash whose page (of 2^bits) is below `limit`. */
function hashBelow(bits, limit) {
  const bytes = crypto.randomBytes(32);
  bytes.writeUInt16BE((crypto.randomInt(limit) << (16 - bits)) | crypto.randomInt(2 ** (16 - bits)), 0);
  return bytes.toString("hex");
}

export default function (suite, { origin }) {
  const key = randomKey();
  const created_at = nowSecs() - 3600;
  const scopes = ["orders:read"];
  /** A real token whose record lands in a page `accept` takes (of 2^bits). */
  const realIn = (name, bits, accept = () => true) => {
    for (let i = 0; i < 100_000; i++) {
      const token = makeToken();
      if (accept(pageOf(sha256Hex(token), bits))) return { token, rec: record(name, token, scopes, { created_at }) };
    }
    throw new Error(`no token found for ${name}`);
  };
  const fill = (prefix, n, hash = randomHash) =>
    Array.from({ length: n }, (_, i) => hashRecord(`${prefix}-${i}`, hash(), scopes, { created_at }));
  const paged = (version, tokens, { extra = {}, ...opts } = {}) =>
    publishPaged(bundle({ version, environment: ENV, tokens, ...extra }), [key], opts);

  /** A fresh Worker serving version 1: `real` real tokens and hash-only ones up to `n`. */
  const fresh = async (n, real = 10) => {
    const w = await startWorker({ origin, keys: [key], environment: ENV });
    try {
      const reals = range(real).map((i) => realIn(`real-${i}`, 0));
      const tokens = [...reals.map((r) => r.rec), ...fill("fill", n - real)];
      const v1 = paged(1, tokens);
      const res = await w.pushPaged(v1.text, v1.pages);
      assert.equal(res.final.status, 200, `version 1: ${res.final.body}`);
      return { w, tokens, v1, reals };
    } catch (e) {
      await w.dispose();
      throw e;
    }
  };

  let big; // 100,000 tokens, with another isolate beside it (`big.peer`)
  const state = {}; // what the first test leaves for the second
  suite.before(async () => {
    big = await startWorker({ origin, keys: [key], environment: ENV, peer: true });
  });
  suite.after(() => big?.dispose());

  suite.test("100,000 tokens from empty as a paged bundle; then 1,000 revoked and 1,000 added: only the changed pages are asked for and sent", async () => {
    // The change lands in pages 0 to 127 of 512 (revoked and added tokens chosen there), so
    // the 384 other pages must be neither asked for nor sent.
    const CHANGED = 128;
    const unchanged = range(SAMPLE).map((i) => realIn(`real-${i}`, BITS));
    const toRevoke = range(SAMPLE).map((i) => realIn(`revoke-real-${i}`, BITS, (p) => p < CHANGED));
    const hashRevoke = fill("revoke-hash", 1000 - SAMPLE, () => hashBelow(BITS, CHANGED));
    const rest = fill("fill", N - 2 * SAMPLE - hashRevoke.length);
    const v1Tokens = [...unchanged.map((r) => r.rec), ...toRevoke.map((r) => r.rec), ...hashRevoke, ...rest];
    assert.equal(v1Tokens.length, N);
    const v1 = paged(1, v1Tokens);
    assert.equal(v1.pages.length, 512);

    let started = Date.now();
    const first = await big.pushPaged(v1.text, v1.pages);
    const firstMs = Date.now() - started;
    assert.equal(first.answers[0].status, 202, first.answers[0].body);
    assert.deepEqual(sorted(first.answers[0].json.missing), range(512), "from empty, every page is missing");
    assert.equal(first.final.status, 200, first.final.body);
    assert.deepEqual([first.final.json.version, first.final.json.tokens, first.final.json.pages], [1, N, 512]);
    assert.equal(first.sent.length, 512);
    let status = await big.status();
    assert.deepEqual([status.version, status.tokens, status.pending], [1, N, null]);
    const stored = await big.pageDigests();
    for (const d of v1.digests) assert.ok(stored.has(d), `page ${d.slice(0, 12)}… of version 1 is not in KV`);
    for (const r of [...unchanged.slice(0, 20), ...toRevoke.slice(0, 20)]) {
      assert.equal((await ask(big, r.token)).status, 200, `${r.rec.name} under version 1`);
    }

    // Version 2: 1,000 revoked (200 of them real), 1,000 added (200 real).
    const now = nowSecs();
    const revoked = new Set([...toRevoke.map((r) => r.rec.hash), ...hashRevoke.map((r) => r.hash)]);
    const added = range(SAMPLE).map((i) => realIn(`added-real-${i}`, BITS, (p) => p < CHANGED));
    const v2Tokens = [
      ...v1Tokens.map((r) => (revoked.has(r.hash) ? { ...r, revoked_at: now } : r)),
      ...added.map((r) => r.rec),
      ...fill("added-hash", 1000 - SAMPLE, () => hashBelow(BITS, CHANGED)),
    ];
    const v2 = paged(2, v2Tokens);
    assert.equal(v2.pages.length, 512);
    const expected = expectMissing(v2, v1.digests);
    assert.ok(expected.length > 100 && expected.every((i) => i < CHANGED), `changed pages: ${expected.length}`);

    const before = await big.pageDigests();
    started = Date.now();
    const second = await big.pushPaged(v2.text, v2.pages);
    const secondMs = Date.now() - started;
    assert.equal(second.answers[0].status, 202, second.answers[0].body);
    assert.deepEqual(sorted(second.answers[0].json.missing), expected, "the Worker asks for exactly the pages that changed");
    assert.equal(second.final.status, 200, second.final.body);
    assert.deepEqual([second.final.json.version, second.final.json.tokens, second.final.json.pages], [2, N + 1000, 512]);
    assert.deepEqual(sorted(second.sent), expected, "sent other pages than the changed ones");
    const after = await big.pageDigests();
    const gained = [...after].filter((d) => !before.has(d)).sort();
    assert.deepEqual(gained, expected.map((i) => v2.digests[i]).sort(), "KV gained other pages than the changed ones");
    status = await big.status();
    assert.deepEqual([status.version, status.tokens, status.pending], [2, N + 1000, null]);

    const wrong = [];
    for (const [kind, list, want] of [
      ["revoked", toRevoke, 401],
      ["added", added, 200],
      ["unchanged", unchanged, 200],
    ]) {
      for (const r of list) {
        const res = await ask(big, r.token);
        if (res.status !== want) wrong.push(`${kind} ${r.rec.name}: ${res.status}`);
      }
    }
    assert.deepEqual(wrong, [], `${wrong.length} of ${3 * SAMPLE} sampled tokens answered wrong`);
    const one = await ask(big, toRevoke[0].token);
    assert.equal((await big.decision(one.ray)).reason, "revoked");
    Object.assign(state, { v2, v2Tokens, unchanged, added });
    return `v1: 512 pages in ${(firstMs / 1000).toFixed(1)} s; v2: ${second.sent.length} of 512 pages in ${(secondMs / 1000).toFixed(1)} s`;
  });

  suite.test(`revoke-all while a large push is pending: enforced on every isolate within ${CACHE_TTL_MS} ms of the manifest's 202, before any of its pages`, async () => {
    assert.ok(state.v2, "needs the previous test's version 2");
    // Version 3: 1,000 more tokens, most pages change; its manifest and 50 pages sent.
    const v3Tokens = [...state.v2Tokens, ...fill("more", 1000)];
    const v3 = paged(3, v3Tokens);
    const partial = await big.pushPaged(v3.text, v3.pages, { stopAfter: 50 });
    assert.ok(partial.stopped && partial.final.status === 202, `version 3 stopped after 50 pages: ${partial.final.body}`);
    assert.equal(partial.sent.length, 50);

    // Before the cut-off is accepted, a token passes on both isolates (the other one's
    // cached state is then no newer than this answer).
    const target = state.unchanged[0].token;
    const late = state.added[0].token;
    for (const [name, w] of [["this", big], ["other", big.peer]]) {
      let status = null;
      for (let i = 0; status !== 200 && i < 100; i++) {
        if (i > 0) await sleep(100);
        status = (await ask(w, target)).status;
      }
      assert.equal(status, 200, `${name} isolate before the revoke-all`);
    }

    // Version 4: the same tokens (so the same pages) and revoke_all_at = now.
    const cutoff = nowSecs();
    const v4 = paged(4, v3Tokens, { extra: { revoke_all_at: cutoff, issued_at: cutoff } });
    assert.deepEqual(v4.digests, v3.digests);
    const manifest = await big.push(v4.text);
    const acceptedAt = Date.now();
    assert.equal(manifest.status, 202, manifest.body);
    const stored = [...state.v2.digests, ...partial.sent.map((i) => v3.digests[i])];
    const expected = expectMissing(v4, stored);
    assert.deepEqual(sorted(manifest.json.missing), expected, "the replacing push asks for pages already received");
    assert.ok(expected.length > 100, `a large push is pending: ${expected.length} pages missing`);

    const flipped = {};
    const isolates = [
      ["this", big],
      ["other", big.peer],
    ];
    for (let i = 0; i < 200 && Date.now() - acceptedAt < 15_000; i++) {
      for (const [name, w] of isolates) {
        if (flipped[name]) continue;
        const res = await ask(w, target);
        if (res.status === 401) flipped[name] = { ms: Date.now() - acceptedAt, ray: res.ray };
      }
      if (Object.keys(flipped).length === isolates.length) break;
      await sleep(100);
    }
    for (const [name] of isolates) {
      assert.ok(flipped[name], `the ${name} isolate still passes the token 15 s after the revoke-all was accepted`);
      assert.ok(flipped[name].ms <= REVOKE_ALL_BOUND_MS, `the ${name} isolate took ${flipped[name].ms} ms`);
    }
    assert.equal((await big.decision(flipped.this.ray)).reason, "revoked_all");
    assert.equal((await ask(big.peer, late)).status, 401, "a token of version 2, created before the cut-off");
    const status = await big.statusWhen((s) => s.pending?.version === 4, "status: version 4 pending");
    assert.equal(status.version, 2, "version 4 is not committed: none of its missing pages arrived");
    assert.deepEqual(status.pending, { version: 4, remaining: expected.length });
    assert.equal(status.revoke_all_at, cutoff);
    return `401 after ${flipped.this.ms} ms on the isolate that took the push, ${flipped.other.ms} ms on another; ${expected.length} of 512 pages still missing`;
  });

  suite.test(`tightening first, per token: while a push is pending, a token it revokes is refused on every isolate within ${CACHE_TTL_MS} ms of its page's arrival; what it grants waits for the commit`, async () => {
    const w = await startWorker({ origin, keys: [key], environment: ENV, peer: true });
    try {
      const bits = 3; // 2,000 lookup records: 8 pages
      // Three pages carry the change: a revocation (page 0), an un-revocation (page 1), a new
      // token (page 2); a fourth change in page 7 keeps the push pending.
      const kept = realIn("kept", bits, (p) => p === 3);
      const doomed = realIn("doomed", bits, (p) => p === 0);
      const pardoned = realIn("pardoned", bits, (p) => p === 1);
      const newcomer = realIn("newcomer", bits, (p) => p === 2);
      const narrowed = realIn("narrowed", bits, (p) => p === 3);
      const wide = { ...narrowed.rec, scopes: ["orders:read", "orders:write"] };
      const revokedBefore = nowSecs() - 60;
      const v1Tokens = [
        kept.rec,
        doomed.rec,
        { ...pardoned.rec, revoked_at: revokedBefore },
        wide,
        ...fill("fill", 2000 - 4, () => hashBelow(bits, 7)),
      ];
      const v1 = paged(1, v1Tokens);
      assert.equal(v1.pages.length, 8);
      assert.equal((await w.pushPaged(v1.text, v1.pages)).final.status, 200);
      const expect = async (label, want) => {
        for (const [token, status] of want) {
          for (const [name, iso] of [["this", w], ["other", w.peer]]) {
            const res = await ask(iso, token);
            assert.equal(res.status, status, `${label}, ${name} isolate: ${res.status} ${res.body.slice(0, 120)}`);
          }
        }
      };
      await expect("version 1", [
        [kept.token, 200],
        [doomed.token, 200],
        [pardoned.token, 401],
        [newcomer.token, 401],
      ]);

      const now = nowSecs();
      const v2Tokens = [
        kept.rec,
        { ...doomed.rec, revoked_at: now },
        pardoned.rec,
        newcomer.rec,
        narrowed.rec,
        ...v1Tokens.slice(4),
        hashRecord("page-seven", hashBelow(bits, 8).replace(/^..../, "ffff"), scopes, { created_at }),
      ];
      const v2 = paged(2, v2Tokens);
      assert.deepEqual(expectMissing(v2, v1.digests), [0, 1, 2, 3, 7]);
      // The four pages, not page 7: version 2 stays pending.
      const partial = await w.pushPaged(v2.text, v2.pages, { order: () => [0, 1, 2, 3, 7], stopAfter: 4 });
      assert.ok(partial.stopped && partial.final.status === 202, partial.final.body);
      const arrived = Date.now();
      // Within the bound the revocation holds everywhere; nothing granted holds yet.
      let other = null;
      for (let i = 0; i < 100 && Date.now() - arrived < 15_000; i++) {
        if ((await ask(w.peer, doomed.token)).status === 401) {
          other = Date.now() - arrived;
          break;
        }
        await sleep(100);
      }
      assert.ok(other !== null && other <= REVOKE_ALL_BOUND_MS, `the other isolate refused the revoked token after ${other} ms`);
      const refused = await ask(w, doomed.token);
      assert.equal(refused.status, 401);
      assert.equal((await w.decision(refused.ray)).reason, "revoked");
      await expect("version 2 pending", [
        [kept.token, 200],
        [doomed.token, 401],
        [pardoned.token, 401],
        [newcomer.token, 401],
      ]);
      // Fewer scopes hold too: the upstream hears only what both versions grant.
      const scopesSent = async (iso) => {
        const res = await ask(iso, narrowed.token);
        assert.equal(res.status, 200, res.body);
        return headerValues(JSON.parse(res.body).headers, "x-tokengate-scopes");
      };
      assert.deepEqual(await scopesSent(w), ["orders:read"]);
      const status = await w.status();
      assert.deepEqual([status.version, status.pending], [1, { version: 2, remaining: 1 }]);

      // The last page commits: what version 2 grants holds now.
      const rest = await w.pushPaged(v2.text, v2.pages);
      assert.equal(rest.final.status, 200, rest.final.body);
      assert.deepEqual(rest.sent, [7]);
      await w.statusWhen((s) => s.version === 2 && s.pending === null, "version 2 served");
      await sleep(CACHE_TTL_MS + 200); // the other isolate's cached state
      await expect("version 2 committed", [
        [kept.token, 200],
        [doomed.token, 401],
        [pardoned.token, 200],
        [newcomer.token, 200],
      ]);
      assert.deepEqual(await scopesSent(w.peer), ["orders:read"]);
      return `revocation in force on the other isolate ${other} ms after its page arrived, 1 of 5 pages still missing`;
    } finally {
      await w.dispose();
    }
  });

  suite.test("an interrupted push resumes: the same manifest again asks for exactly the pages not yet sent; then 200", async () => {
    const w = await startWorker({ origin, keys: [key], environment: ENV });
    try {
      const reals = range(10).map((i) => realIn(`real-${i}`, 0));
      const tokens = [...reals.map((r) => r.rec), ...fill("fill", 4990)];
      const v1 = paged(1, tokens);
      assert.equal(v1.pages.length, 32);
      const first = await w.push(v1.text);
      assert.equal(first.status, 202, first.body);
      assert.deepEqual(sorted(first.json.missing), range(32));
      const [half, other] = [first.json.missing.slice(0, 16), first.json.missing.slice(16)];
      for (const [n, i] of half.entries()) {
        const res = await w.pushPage(1, i, v1.pages[i]);
        assert.equal(res.status, 202, `page ${i}: ${res.body}`);
        assert.equal(res.json.remaining, 31 - n, `page ${i}: ${res.body}`);
      }
      // The client stops here (a crash, a lost link). Nothing is served yet.
      let status = await w.statusWhen((s) => s.pending?.remaining === 16, "status: 16 pages remaining");
      assert.equal(status.version, null);
      assert.deepEqual(status.pending, { version: 1, remaining: 16 });
      assert.deepEqual([...(await w.pageDigests())].sort(), half.map((i) => v1.digests[i]).sort());

      const again = await w.push(v1.text);
      assert.equal(again.status, 202, again.body);
      assert.deepEqual(sorted(again.json.missing), sorted(other), "the resumed push asks for other pages than the missing half");
      let last = null;
      for (const i of other) last = await w.pushPage(1, i, v1.pages[i]);
      assert.equal(last.status, 200, last.body);
      status = await w.status();
      assert.deepEqual([status.version, status.tokens, status.pending], [1, 5000, null]);
      assert.equal((await ask(w, reals[0].token)).status, 200);
    } finally {
      await w.dispose();
    }
  });

  suite.test("a newer version replacing a half-done pending push asks only for pages neither served nor received; the replaced one takes no more pages", async () => {
    const { w, tokens, v1, reals } = await fresh(5000);
    try {
      const v2Tokens = [...tokens, ...fill("v2", 64)];
      const v2 = paged(2, v2Tokens);
      const m2 = await w.push(v2.text);
      assert.equal(m2.status, 202, m2.body);
      assert.deepEqual(sorted(m2.json.missing), expectMissing(v2, v1.digests));
      const received = m2.json.missing.slice(0, Math.ceil(m2.json.missing.length / 2));
      for (const i of received) assert.equal((await w.pushPage(2, i, v2.pages[i])).status, 202);

      // Version 3: version 2 and 8 more tokens. Some pages received for version 2 are
      // unchanged in it: they must not be asked for again.
      const v3Tokens = [...v2Tokens, ...fill("v3", 8)];
      const v3 = paged(3, v3Tokens);
      const kept = received.filter((i) => v3.digests[i] === v2.digests[i]);
      assert.ok(kept.length > 0, "no page received for version 2 is unchanged in version 3");
      const expected = expectMissing(v3, [...v1.digests, ...received.map((i) => v2.digests[i])]);
      const m3 = await w.push(v3.text);
      assert.equal(m3.status, 202, m3.body);
      assert.deepEqual(sorted(m3.json.missing), expected);
      for (const i of kept) assert.ok(!m3.json.missing.includes(i), `page ${i}, received for version 2, asked for again`);
      const status = await w.statusWhen((s) => s.pending?.version === 3, "status: version 3 pending");
      assert.equal(status.version, 1);
      assert.deepEqual(status.pending, { version: 3, remaining: expected.length });

      // The replaced push takes no more pages.
      const leftover = m2.json.missing.find((i) => !received.includes(i));
      await assertRefused(w, "a page of the replaced push", () => w.pushPage(2, leftover, v2.pages[leftover]), [[409, "not_pending"]]);
      const done = await w.pushPaged(v3.text, v3.pages);
      assert.equal(done.final.status, 200, done.final.body);
      assert.deepEqual(sorted(done.sent), expected);
      assert.equal((await w.status()).version, 3);
      assert.equal((await ask(w, reals[0].token)).status, 200);
      return `version 3 asked for ${expected.length} pages; ${kept.length} pages received for version 2 were not asked for again`;
    } finally {
      await w.dispose();
    }
  });

  suite.test("replays change nothing: a served push's manifest (409 not_newer) and page (409 not_pending); an older manifest while a newer push is pending (409 push_in_progress)", async () => {
    const { w, tokens } = await fresh(1000);
    try {
      const extra = realIn("replay-added", 0);
      const v2Tokens = [...tokens, extra.rec];
      const v2 = paged(2, v2Tokens);
      // Captured: the exact requests as they went out (headers, signature and body).
      const manifestRequest = w.signed(v2.text);
      const m = await w.send(manifestRequest);
      assert.equal(m.status, 202, m.body);
      assert.deepEqual(m.json.missing, [pageOf(extra.rec.hash, v2.bits)], "one token added: its page alone");
      const i = m.json.missing[0];
      const pageRequest = w.signed(v2.pages[i], { target: pageTarget(2, i) });
      const p = await w.send(pageRequest);
      assert.equal(p.status, 200, p.body);
      assert.equal((await w.status()).version, 2);
      assert.equal((await ask(w, extra.token)).status, 200);

      await assertRefused(w, "the manifest replayed after its push was served", () => w.send(manifestRequest), [[409, "not_newer"]]);
      await assertRefused(w, "the page request replayed after the commit", () => w.send(pageRequest), [[409, "not_pending"]]);

      // Version 3 pending, then version 4 replaces it: version 3's captured manifest is refused.
      const v3 = paged(3, [...v2Tokens, ...fill("v3", 1)]);
      const v3Request = w.signed(v3.text);
      const m3 = await w.send(v3Request);
      assert.equal(m3.status, 202, m3.body);
      const v4 = paged(4, [...v2Tokens, ...fill("v4", 1)]);
      const m4 = await w.push(v4.text);
      assert.equal(m4.status, 202, m4.body);
      await assertRefused(w, "an older manifest replayed while a newer push is pending", () => w.send(v3Request), [[409, "push_in_progress"]]);
      const other = paged(4, [...v2Tokens, ...fill("v4-other", 1)]);
      await assertRefused(w, "the pending version with other content", () => w.push(other.text), [[409, "push_in_progress"]]);
      await w.statusWhen((s) => s.pending?.version === 4, "status: version 4 pending");
      const done = await w.pushPaged(v4.text, v4.pages);
      assert.equal(done.final.status, 200, done.final.body);
      assert.equal((await w.status()).version, 4);
    } finally {
      await w.dispose();
    }
  });

  suite.test("imported_secrets false: a credential without the tokengate shape is refused (401) with no KV read; true: it is looked up and an imported secret passes", async () => {
    const { w, tokens } = await fresh(1000);
    try {
      // An imported secret: any visible ASCII of 16 to 512 characters without the tokengate
      // shape; its record holds its SHA-256 as any token's does.
      const imported = crypto.randomBytes(24).toString("hex");
      const withImported = [...tokens, record("imported", imported, scopes, { created_at })];
      const strangers = range(50).map(() => crypto.randomBytes(20).toString("hex"));

      // false (a promise the signer broke here, so it shows): nothing without the shape is looked up.
      const v2 = paged(2, withImported, { importedSecrets: false });
      const r2 = await w.pushPaged(v2.text, v2.pages);
      assert.equal(r2.final.status, 200, r2.final.body);
      let before = (await w.status()).kv_reads;
      for (const [n, credential] of [imported, ...strangers].entries()) {
        const res = await ask(w, credential);
        assert.equal(res.status, 401, `credential ${n}: ${res.status}`);
        assert.equal(JSON.parse(res.body).error, "invalid_token");
        if (n < 2) assert.equal((await w.decision(res.ray)).reason, "unknown");
      }
      assert.equal((await w.status()).kv_reads - before, 0, "KV reads for 51 credentials without the tokengate shape");
      // The counter moves for a tokengate-shaped unknown token: that one is looked up.
      before = (await w.status()).kv_reads;
      assert.equal((await ask(w, makeToken())).status, 401);
      assert.equal((await w.status()).kv_reads - before, 1, "a tokengate-shaped token was not looked up");

      // true, same records: every page is stored, so the manifest commits at once.
      const v3 = paged(3, withImported, { importedSecrets: true });
      const m3 = await w.push(v3.text);
      assert.equal(m3.status, 200, m3.body);
      assert.deepEqual(m3.json, { version: 3, tokens: 1001, pages: 4, written: 0 });
      before = (await w.status()).kv_reads;
      assert.equal((await ask(w, imported)).status, 200, "the imported secret, once the bundle says there are some");
      for (const credential of strangers) assert.equal((await ask(w, credential)).status, 401);
      const reads = (await w.status()).kv_reads - before;
      assert.ok(reads >= 1, "no KV read for credentials without the shape although the bundle holds imported secrets");
      return `${reads} KV reads for 51 such credentials with imported_secrets true, 0 with false`;
    } finally {
      await w.dispose();
    }
  });

  suite.test("page refusals change nothing: another page's text (400 page_mismatch), bad pages the manifest signed (400 invalid_page), not pending (409 not_pending), bad signatures (401)", async () => {
    const { w, tokens, reals } = await fresh(2000);
    try {
      const base = pagesOf(tokens);
      assert.equal(base.texts.length, 8);
      const recordsOf = (i) => JSON.parse(base.texts[i]);
      const byHash = (a, b) => (a.hash < b.hash ? -1 : a.hash > b.hash ? 1 : 0);
      // Pages 0 to 6 crafted (and signed: their digests are in the manifest); page 7 as it is.
      const crafted = base.texts.slice();
      const bad = {
        "a record of page 7 in page 0": [0, () => [...recordsOf(0), recordsOf(7)[0]].sort(byHash)],
        "records out of order": [1, () => recordsOf(1).reverse()],
        "a hash twice": [2, () => [recordsOf(2)[0], ...recordsOf(2)]],
        "an unknown member": [3, () => [{ ...recordsOf(3)[0], debug: true }, ...recordsOf(3).slice(1)]],
        "an object, not an array": [4, () => ({ records: recordsOf(4) })],
        "a record with previous": [
          5,
          () => [{ ...recordsOf(5)[0], previous: { hash: randomHash(), grace_until: nowSecs() + 60 } }, ...recordsOf(5).slice(1)],
        ],
        "an invalid scope": [6, () => [{ ...recordsOf(6)[0], scopes: ["Not A Scope"] }, ...recordsOf(6).slice(1)]],
      };
      for (const [index, make] of Object.values(bad)) crafted[index] = JSON.stringify(make());
      const v2 = publishPaged(bundle({ version: 2, environment: ENV, tokens }), [key], { pages: crafted });
      const m = await w.push(v2.text);
      assert.equal(m.status, 202, m.body);
      assert.deepEqual(sorted(m.json.missing), range(7), "the crafted pages (and only they) are missing");

      const refused = (label, attempt, status, error) => assertRefused(w, label, attempt, [[status, error]]);
      await refused("page 7's text as page 0", () => w.pushPage(2, 0, base.texts[7]), 400, "page_mismatch");
      await refused("page 0 as the served bundle has it", () => w.pushPage(2, 0, base.texts[0]), 400, "page_mismatch");
      for (const [label, [index]] of Object.entries(bad)) {
        await refused(label, () => w.pushPage(2, index, crafted[index]), 400, "invalid_page");
      }
      await refused("a version not pending", () => w.pushPage(3, 0, crafted[0]), 409, "not_pending");
      await refused("the served version", () => w.pushPage(1, 0, base.texts[0]), 409, "not_pending");
      await refused("an index out of range", () => w.pushPage(2, 8, "[]"), 409, "not_pending");
      await refused("signed by a key the Worker does not trust", () => w.pushPage(2, 0, crafted[0], { seeds: [randomKey()] }), 401, "invalid_signature");
      await refused("signed 301 s ago", () => w.pushPage(2, 0, crafted[0], { t: nowSecs() - 301 }), 401, "signature_expired");
      await refused(
        "not signed",
        () => w.pushPage(2, 0, crafted[0], { headers: [["content-type", "application/json"]] }),
        401,
        "invalid_signature",
      );
      const status = await w.statusWhen((s) => s.pending?.version === 2, "status: version 2 pending");
      assert.equal(status.version, 1);
      assert.deepEqual(status.pending, { version: 2, remaining: 7 });

      // A good newer push replaces the stuck one.
      const late = realIn("after-refusals", 0);
      const v3 = paged(3, [...tokens, late.rec]);
      const done = await w.pushPaged(v3.text, v3.pages);
      assert.equal(done.final.status, 200, done.final.body);
      assert.equal((await w.status()).version, 3);
      assert.equal((await ask(w, late.token)).status, 200);
      assert.equal((await ask(w, reals[0].token)).status, 200);
    } finally {
      await w.dispose();
    }
  });
}
