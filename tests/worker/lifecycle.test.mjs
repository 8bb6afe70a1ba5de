// A token's life as an operator drives it, each step a signed push to the Worker: create,
// revoke, rotate with a grace period, expire, and the emergency revoke-all. Bundles are
// tokengate.bundle/v2, signed by the admin's Ed25519 key; the Worker holds its public key.
import { assert, assertNoPlaintext, headerValues, sleep, startWorker } from "./lib/harness.mjs";
import { bundle, makeToken, nowSecs, publish, randomKey, record } from "./lib/bundle.mjs";

const ENV = "prod";

export default function (suite, { origin }) {
  const key = randomKey();
  let worker;
  let version = 0;
  suite.before(async () => {
    worker = await startWorker({ origin, keys: [key], environment: ENV });
  });
  suite.after(() => worker?.dispose());

  const issued = []; // every plaintext made here, for the KV scan
  const push = async (tokens, extra = {}) => {
    const res = await worker.push(publish(bundle({ version: ++version, environment: ENV, tokens, ...extra }), [key]));
    assert.equal(res.status, 200, res.body);
    // After every push, not only the last: a removed token's record is gone by then.
    assertNoPlaintext(await worker.snapshot(), issued);
  };
  const newToken = () => {
    const token = makeToken();
    issued.push(token);
    return token;
  };
  const call = (token) =>
    worker.gate("GET", "/api/orders/7", { headers: [["authorization", `Bearer ${token}`]] });
  const upstreamOf = (res) =>
    origin.requests.find((r) => headerValues(r.headers, "cf-ray")[0] === res.ray);

  const ci = { token: newToken() };
  let ciRecord;

  suite.test("create, push: the new token passes with its identity headers", async () => {
    ciRecord = record("ci-deploy", ci.token, ["orders:read", "deploy:write"]);
    await push([ciRecord]);
    const res = await call(ci.token);
    assert.equal(res.status, 200);
    const seen = upstreamOf(res);
    assert.deepEqual(headerValues(seen.headers, "x-tokengate-subject"), ["ci-deploy"]);
    assert.deepEqual(headerValues(seen.headers, "x-tokengate-scopes"), ["orders:read deploy:write"]);
    assert.deepEqual(headerValues(seen.headers, "x-tokengate-token-id"), [`tid_${ciRecord.hash.slice(0, 16)}`]);
    assert.deepEqual(headerValues(seen.headers, "authorization"), [], "the credential is not forwarded");
  });

  suite.test("revoke, push: 401 at once on this isolate", async () => {
    await push([{ ...ciRecord, revoked_at: nowSecs() }]);
    const res = await call(ci.token);
    assert.equal(res.status, 401);
    assert.equal((await worker.decision(res.ray)).reason, "revoked");
  });

  suite.test("rotate with grace: old and new token pass as one name until the grace ends", async () => {
    const old = newToken();
    await push([record("billing", old, ["orders:read"])]);
    assert.equal((await call(old)).status, 200);
    const fresh = newToken();
    const graceEnd = nowSecs() + 2;
    await push([record("billing", fresh, ["orders:read"], { previous: old, grace_until: graceEnd })]);
    for (const token of [old, fresh]) {
      const res = await call(token);
      assert.equal(res.status, 200, "both pass during the grace period");
      assert.deepEqual(headerValues(upstreamOf(res).headers, "x-tokengate-subject"), ["billing"]);
    }
    await sleep(graceEnd * 1000 - Date.now() + 50);
    const late = await call(old);
    assert.equal(late.status, 401, "the old token fails once the grace has ended");
    assert.equal((await worker.decision(late.ray)).reason, "rotation_grace_over");
    assert.equal((await call(fresh)).status, 200);
  });

  suite.test("expiry: a token passes until expires_at, then 401 expired", async () => {
    const token = newToken();
    const expires = nowSecs() + 2;
    await push([record("short-lived", token, ["orders:read"], { expires_at: expires })]);
    assert.equal((await call(token)).status, 200);
    await sleep(expires * 1000 - Date.now() + 50);
    const res = await call(token);
    assert.equal(res.status, 401);
    assert.equal((await worker.decision(res.ray)).reason, "expired");
  });

  suite.test("revoke-all: every token created at or before the cut-off is refused, later ones pass", async () => {
    const cutoff = nowSecs();
    const before = newToken();
    const after = newToken();
    await push(
      [
        record("before", before, ["orders:read"], { created_at: cutoff - 10 }),
        record("after", after, ["orders:read"], { created_at: cutoff + 1 }),
      ],
      { revoke_all_at: cutoff },
    );
    const refused = await call(before);
    assert.equal(refused.status, 401);
    assert.equal((await worker.decision(refused.ray)).reason, "revoked_all");
    assert.equal((await call(after)).status, 200);
  });

  suite.test("KV holds no plaintext token (checked after every push above, and now)", async () => {
    const snapshot = await worker.snapshot();
    assertNoPlaintext(snapshot, issued);
    return `${Object.keys(snapshot).length} keys, ${issued.length} tokens checked`;
  });
}
