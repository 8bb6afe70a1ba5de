// Every case of conformance/vectors.json through the Worker in workerd, compared with the same
// rules as conformance/src/lib.rs `check` (ported below), the reason read from the Worker's
// decision log line and upstream headers and path read on the origin side.
//
// The clock: workerd has no clock to set, so cases run at their `now` by moving the fixture
// bundle in time instead. Each case pushes its fixture with every instant shifted by
// (real now - case.now), published again signed by fixture key A with a fresh version (the
// fixture seeds are sha256 of "tokengate conformance key A" / "… B"), then sends the
// request: the Worker's clock reads case.now plus the milliseconds the push took, and no
// non-edge case has a boundary within seconds after its `now`. Cases marked `clock_edge` sit
// on a one-second boundary: they are shifted to the next whole second S, sent once S has
// begun, and count only if both the send and the answer fall inside S (the Worker's clock is
// read between the two), retried up to five times otherwise.
import { assert, assertNoPlaintext, headerValues, safeJson, sleep, startWorker } from "./lib/harness.mjs";
import { FIXTURE_SEEDS, VECTORS, keyIdOfPublic, nowSecs, payloadOfText, publicKeyHex, retime } from "./lib/bundle.mjs";

// Cases whose request cannot reach any Worker as written: workerd resolves "." and ".."
// segments while it parses the request line (kj::Url), before Worker code runs, as
// Cloudflare's edge does. Checked instead: the Worker decided on the resolved path, and the
// upstream, if reached, received exactly that path.
const RESOLVED_BY_THE_RUNTIME = {
  "dot-dot above root is a bad request": "/admin",
};

/** conformance/src/lib.rs `check`, line for line. */
export function check(c, seen) {
  const e = c.expect;
  const problems = [];
  const header = (list, name) => headerValues(list, name);
  const same = (got, want) => got.length === 1 && got[0] === want;
  if (seen.status !== e.status) problems.push(`status ${seen.status} (expected ${e.status})`);
  if (seen.reason != null && seen.reason !== e.reason) {
    problems.push(`reason ${seen.reason} (expected ${e.reason})`);
  }
  for (const [name, want] of Object.entries(e.response_headers ?? {})) {
    const got = header(seen.response_headers, name);
    if (!same(got, want)) problems.push(`response header ${name}: ${JSON.stringify(got)} (expected [${JSON.stringify(want)}])`);
  }
  for (const name of e.response_absent ?? []) {
    if (header(seen.response_headers, name).length) problems.push(`response header ${name} present (expected absent)`);
  }
  if (e.error != null) {
    const body = safeJson(seen.body) ?? {};
    if (body.error !== e.error || typeof body.error_description !== "string") {
      problems.push(`body ${JSON.stringify(seen.body)} (expected error ${e.error} and a description)`);
    }
  }
  const reached = seen.upstream_headers != null;
  if (reached !== (e.status === 200)) problems.push(`upstream reached: ${reached} (expected ${e.status === 200})`);
  if (reached) {
    for (const [name, want] of Object.entries(e.upstream_headers ?? {})) {
      const got = header(seen.upstream_headers, name);
      if (!same(got, want)) problems.push(`upstream header ${name}: ${JSON.stringify(got)} (expected [${JSON.stringify(want)}])`);
    }
    for (const name of e.upstream_absent ?? []) {
      const got = header(seen.upstream_headers, name);
      if (got.length) problems.push(`upstream header ${name} reached the upstream: ${JSON.stringify(got)}`);
    }
    const wantPath = e.upstream_path ?? c.request.path;
    if (seen.upstream_path != null && seen.upstream_path !== wantPath) {
      problems.push(`upstream path ${JSON.stringify(seen.upstream_path)} (expected ${JSON.stringify(wantPath)})`);
    }
  }
  return problems;
}

export default function (suite, { origin }) {
  const seedA = FIXTURE_SEEDS.A;
  let worker;
  let version = 1000;
  suite.before(async () => {
    // Trusting exactly the suite's trusted_keys; pushes are signed by A.
    worker = await startWorker({ origin, keys: [seedA], trusted: VECTORS.trusted_keys, environment: VECTORS.environment });
  });
  suite.after(() => worker?.dispose());

  /** A fixture's published text for the Worker, and its payload. */
  const fixtureText = (name) => VECTORS.bundles[name].worker;
  const fixture = (name) => payloadOfText(fixtureText(name));

  suite.test("the fixture seed A derives the suite's trusted public key", () => {
    assert.deepEqual(VECTORS.trusted_keys, [publicKeyHex(seedA)]);
  });

  const byVersion = Object.keys(VECTORS.bundles).sort((a, b) => fixture(a).version - fixture(b).version);
  for (const name of byVersion) {
    suite.test(`fixture bundle "${name}" as generate.py published it is served`, async () => {
      const res = await worker.push(fixtureText(name));
      assert.equal(res.status, 200, res.body);
      const status = await worker.status();
      assert.equal(status.version, fixture(name).version);
      assert.deepEqual(status.keys.slice().sort(), fixture(name).keys.map(keyIdOfPublic).sort());
    });
  }

  suite.test('fixture "rotation" (signed by A and B) is served by a Worker trusting B alone', async () => {
    // Either key alone must do during a rotation; the push is signed by B, the Worker's key.
    const other = await startWorker({ origin, keys: [FIXTURE_SEEDS.B], environment: VECTORS.environment });
    try {
      const res = await other.push(fixtureText("rotation"));
      assert.equal(res.status, 200, res.body);
      assert.equal((await other.status()).version, fixture("rotation").version);
    } finally {
      await other.dispose();
    }
  });

  const pushAt = async (c, delta) => {
    const res = await worker.push(retime(fixtureText(c.bundle), delta, ++version, [seedA]));
    assert.equal(res.status, 200, `re-timed push: ${res.body}`);
  };

  const send = (c) =>
    worker.gate(c.request.method, c.request.path, {
      headers: c.request.headers,
      host: c.request.authority,
    });

  const runAtExactSecond = async (c) => {
    for (let attempt = 0; attempt < 5; attempt++) {
      const second = nowSecs() + 1;
      await pushAt(c, second - c.now);
      const wait = second * 1000 + 5 - Date.now();
      if (wait < 0) continue;
      await sleep(wait);
      const sent = Date.now();
      const res = await send(c);
      const answered = Date.now();
      if (Math.floor(sent / 1000) === second && Math.floor(answered / 1000) === second) return res;
    }
    throw new Error("could not send and answer within one clock second in 5 attempts");
  };

  for (const c of VECTORS.cases) {
    suite.test(`case: ${c.name}`, async () => {
      let res;
      if (c.clock_edge) {
        res = await runAtExactSecond(c);
      } else {
        await pushAt(c, nowSecs() - c.now);
        res = await send(c);
      }
      // What the origin received, found by the request's cf-ray (HEAD answers have no body).
      const upstream = origin.requests.find((r) => headerValues(r.headers, "cf-ray")[0] === res.ray);
      const echoed = upstream !== undefined;
      const log = await worker.decision(res.ray);

      if (c.proxy_may_reject && !log && !echoed && res.status >= 400) {
        return `refused by workerd itself (HTTP ${res.status}) before the Worker ran; nothing reached the origin`;
      }
      assert.ok(log, `no decision log line for this request (HTTP ${res.status} ${res.body.slice(0, 120)})`);
      const resolved = RESOLVED_BY_THE_RUNTIME[c.name];
      if (resolved) {
        assert.equal(log.path, resolved, "the runtime should have resolved the path");
        if (upstream) assert.equal(upstream.path, resolved, "the upstream must get the path decided on");
        return `workerd resolved ${c.request.path} to ${resolved} before the Worker (decided: ${log.status} ${log.reason})`;
      }
      const seen = {
        status: echoed ? 200 : res.status,
        reason: log.reason,
        response_headers: res.headers,
        body: res.body,
        upstream_headers: upstream?.headers ?? null,
        upstream_path: upstream?.path ?? null,
      };
      const problems = check(c, seen);
      assert.ok(problems.length === 0, problems.join("; "));
      return c.clock_edge ? "at the exact second" : undefined;
    });
  }

  suite.test("KV holds no credential any case presented", async () => {
    // Every credential value the cases send, except the case that presents a stored hash.
    const hashes = new Set(
      Object.keys(VECTORS.bundles).flatMap((name) => fixture(name).tokens.flatMap((t) => [t.hash, t.previous?.hash])),
    );
    const secrets = new Set();
    for (const c of VECTORS.cases) {
      for (const [name, value] of c.request.headers) {
        const n = name.toLowerCase();
        if (n === "authorization") value.split(",").forEach((v) => secrets.add(v.trim().replace(/^bearer\s+/i, "")));
        if (n === "x-internal-token" || n === "x-internal-api-key") secrets.add(value.trim());
      }
      const query = c.request.path.split("?")[1] ?? "";
      for (const pair of query.split("&")) if (pair.startsWith("access_token=")) secrets.add(pair.slice(13));
    }
    const checked = [...secrets].filter((s) => s.length >= 16 && !hashes.has(s));
    assertNoPlaintext(await worker.snapshot(), checked);
    return `${checked.length} distinct credentials checked`;
  });
}
