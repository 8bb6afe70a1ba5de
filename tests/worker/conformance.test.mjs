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
//
// The sequences (rate limits) run on a real clock too, on a Worker of their own with a Rate
// Limiting binding for each limit of the fixtures (Miniflare counts in memory, in windows
// aligned to the epoch, as the vectors' `at` are). Every sequence uses its own tokens, so all
// run in one window: once the clock is 1 to 35 s into a minute, every step with `at` < 60, in
// order, sequence by sequence; then from 1 s into the next minute the steps with `at` >= 60.
// A 429's `retry-after` and `ratelimit` `t=` are recomputed for the second the request was
// sent in, or the one it was answered in (conformance/src/lib.rs `Step::reset_at`). A phase
// that straddled a minute boundary counts for nothing: the run is redone once on a fresh Worker.
import { assert, assertNoPlaintext, headerValues, perMinuteBindings, safeJson, sleep, startWorker } from "./lib/harness.mjs";
import { FIXTURE_SEEDS, VECTORS, keyIdOfPublic, nowSecs, payloadOfText, publicKeyHex, retime } from "./lib/bundle.mjs";

// Cases whose request cannot reach any Worker as written: workerd resolves "." and ".."
// segments while it parses the request line (kj::Url), before Worker code runs, as
// Cloudflare's edge does. Checked instead: the Worker decided on the resolved path, and the
// upstream, if reached, received exactly that path.
const RESOLVED_BY_THE_RUNTIME = {
  "dot-dot above root is a bad request": "/admin",
};

/** The length of the window the sequences count in (conformance/src/lib.rs SEQUENCE_WINDOW). */
export const SEQUENCE_WINDOW = 60;

/**
 * conformance/src/lib.rs `Step::reset_at`: the step as sent `second` (unix seconds) instead of
 * at `at`: a 429's expected `retry-after` and the `t=` of `ratelimit` become the seconds left
 * in that second's window.
 */
export function resetAt(step, second) {
  if (step.reset === undefined || step.reset === null) return step;
  const actual = SEQUENCE_WINDOW - (second % SEQUENCE_WINDOW);
  const headers = {};
  for (const [name, value] of Object.entries(step.expect.response_headers ?? {})) {
    if (name === "retry-after") headers[name] = String(actual);
    else if (name === "ratelimit") headers[name] = value.replaceAll(`;t=${step.reset}`, `;t=${actual}`);
    else headers[name] = value;
  }
  return { ...step, reset: actual, expect: { ...step.expect, response_headers: headers } };
}

/**
 * Every rate limit of the fixture bundles for the Worker, as requests per minute: the bindings
 * a Worker needs to serve them. A limit per second or hour has no binding (the Worker refuses
 * such a rule, and answers 503 for such a token): none is expected in a Worker fixture.
 */
export function fixtureRateLimits() {
  const counts = new Set();
  for (const [name, texts] of Object.entries(VECTORS.bundles)) {
    const payload = payloadOfText(texts.worker);
    const limits = [...payload.policy.rules.map((r) => r.rate_limit), ...payload.tokens.map((t) => t.rate_limit)];
    for (const limit of limits.filter(Boolean)) {
      if (limit.per !== "minute") throw new Error(`fixture "${name}" has a limit of ${limit.requests}/${limit.per}: not per minute`);
      counts.add(limit.requests);
    }
  }
  return [...counts].sort((a, b) => a - b);
}

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
  // A binding for every limit of the fixtures: without one, a push of the "limits" fixture is
  // refused (409 rate_limit_unavailable).
  const limits = fixtureRateLimits();
  const ratelimits = perMinuteBindings(limits);
  // Trusting exactly the suite's trusted_keys; pushes are signed by A. The HS256 issuers'
  // secrets are a Worker secret, as deployed (`wrangler secret put TOKENGATE_ISSUER_SECRETS`):
  // the suite's `issuer_secrets`, never in a bundle.
  const secrets = { TOKENGATE_ISSUER_SECRETS: VECTORS.issuer_secrets };
  const startSuiteWorker = () =>
    startWorker({ origin, keys: [seedA], trusted: VECTORS.trusted_keys, environment: VECTORS.environment, ratelimits, secrets });
  suite.before(async () => {
    worker = await startSuiteWorker();
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

  const send = (c, w = worker) =>
    w.gate(c.request.method, c.request.path, {
      headers: c.request.headers,
      host: c.request.authority,
    });

  /**
   * What a request (sent by `send`) came to: the origin's copy, found by its cf-ray (HEAD
   * answers have no body), and the Worker's decision log line. Returns { upstream, log, seen },
   * `seen` in the form `check` takes.
   */
  const observe = async (res, w = worker) => {
    const upstream = origin.requests.find((r) => headerValues(r.headers, "cf-ray")[0] === res.ray);
    const log = await w.decision(res.ray);
    const seen = {
      status: upstream ? 200 : res.status,
      reason: log?.reason,
      response_headers: res.headers,
      body: res.body,
      upstream_headers: upstream?.headers ?? null,
      upstream_path: upstream?.path ?? null,
    };
    return { upstream, log, seen };
  };

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
      const { upstream, log, seen } = await observe(res);
      const echoed = upstream !== undefined;

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
      const problems = check(c, seen);
      assert.ok(problems.length === 0, problems.join("; "));
      return c.clock_edge ? "at the exact second" : undefined;
    });
  }

  // --- the sequences: rate limits, on a real clock ------------------------------------------
  const minuteOf = (ms) => Math.floor(ms / (SEQUENCE_WINDOW * 1000));
  const secondOf = (ms) => Math.floor(ms / 1000);
  /** Sleeps until `second` seconds into the next minute. */
  const untilNextMinute = (second) => sleep((minuteOf(Date.now()) + 1) * SEQUENCE_WINDOW * 1000 + second * 1000 - Date.now());

  /**
   * Sends `steps` ({sequence, index, step}) in order; returns each with {res, sent, answered}
   * and whether the phase stayed within one minute (the first send to the last answer).
   */
  const sendAll = async (w, steps) => {
    const out = [];
    for (const s of steps) {
      const sent = Date.now();
      const res = await send(s.step, w);
      out.push({ ...s, res, sent, answered: Date.now() });
    }
    const first = out[0]?.sent ?? Date.now();
    const last = out.at(-1)?.answered ?? first;
    return { out, minute: minuteOf(first), straddled: minuteOf(first) !== minuteOf(last) ? `${new Date(first).toISOString()} to ${new Date(last).toISOString()}` : null };
  };

  /** A step's problems as `check` finds them, its 429's reset taken at either second. */
  const stepProblems = async (w, { sequence, index, step, res, sent, answered }) => {
    const name = `step ${index + 1} (+${step.at}s, ${step.request.method} ${step.request.path})`;
    const { log, seen } = await observe(res, w);
    if (!log) return [`${name}: no decision log line (HTTP ${res.status} ${res.body.slice(0, 120)})`];
    let problems = [];
    for (const second of new Set([secondOf(sent), secondOf(answered)])) {
      const expected = resetAt(step, second);
      problems = check({ name, request: step.request, expect: expected.expect }, seen);
      if (problems.length === 0) return [];
    }
    return [`${name}: ${problems.join("; ")}`];
  };

  /**
   * One run of every sequence of one bundle on a fresh Worker: pushes the bundle re-timed,
   * then the two phases. Returns { byName: sequence name → { problems, steps, refused } },
   * or { straddled } when a phase crossed a minute boundary.
   */
  const runOnce = async (bundleName, sequences) => {
    const w = await startSuiteWorker();
    try {
      const pushed = await w.push(retime(fixtureText(bundleName), nowSecs() - VECTORS.now, ++version, [seedA]));
      assert.equal(pushed.status, 200, `re-timed push of "${bundleName}": ${pushed.body}`);
      const steps = (early) =>
        sequences.flatMap((sequence) =>
          sequence.steps.map((step, index) => ({ sequence, index, step })).filter((s) => (s.step.at < SEQUENCE_WINDOW) === early),
        );
      const into = (Date.now() / 1000) % SEQUENCE_WINDOW;
      if (into < 1) await sleep((1 - into) * 1000);
      else if (into > 35) await untilNextMinute(1);
      const first = await sendAll(w, steps(true));
      if (first.straddled) return { straddled: `the first minute's steps ran from ${first.straddled}` };
      await untilNextMinute(1);
      const second = await sendAll(w, steps(false));
      if (second.straddled) return { straddled: `the next minute's steps ran from ${second.straddled}` };
      assert.ok(second.out.length === 0 || second.minute > first.minute, "the second phase ran in the first one's minute");
      const byName = new Map(sequences.map((q) => [q.name, { problems: [], steps: 0, refused: 0 }]));
      for (const s of [...first.out, ...second.out]) {
        const result = byName.get(s.sequence.name);
        result.steps += 1;
        if (s.res.status === 429) result.refused += 1;
        result.problems.push(...(await stepProblems(w, s)));
      }
      return { byName };
    } finally {
      await w.dispose();
    }
  };

  /** Every sequence, once per bundle they use; redone once on a fresh Worker if a phase straddled. */
  let sequenceRun = null;
  const runSequences = () =>
    (sequenceRun ??= (async () => {
      const started = Date.now();
      const results = new Map();
      const bundles = [...new Set(VECTORS.sequences.map((q) => q.bundle))];
      const redone = [];
      for (const name of bundles) {
        const sequences = VECTORS.sequences.filter((q) => q.bundle === name);
        let run = await runOnce(name, sequences);
        if (run.straddled) {
          redone.push(run.straddled);
          run = await runOnce(name, sequences);
          if (run.straddled) throw new Error(`redone once, and again ${run.straddled}`);
        }
        for (const [k, v] of run.byName) results.set(k, v);
      }
      return { results, redone, ms: Date.now() - started };
    })());

  suite.test(`sequences: the Worker has a Rate Limiting binding for each limit of the fixtures (${limits.join(", ")} per minute); sequences expect 429s`, () => {
    assert.ok(VECTORS.sequences.length > 0, "the vectors hold no sequences");
    const refusals = VECTORS.sequences.flatMap((q) => q.steps).filter((s) => s.expect.status === 429);
    assert.ok(refusals.length > 0, "no sequence step expects a 429");
    for (const s of refusals) assert.equal(typeof s.reset, "number", "a 429 step without its reset");
    const later = VECTORS.sequences.flatMap((q) => q.steps).filter((s) => s.at >= SEQUENCE_WINDOW);
    assert.ok(later.every((s) => s.at < 2 * SEQUENCE_WINDOW), "a step two windows later: only two minutes are run");
    assert.deepEqual(Object.keys(ratelimits).sort(), limits.map((n) => `TOKENGATE_RATE_${n}_PER_MINUTE`).sort());
    return `${Object.keys(ratelimits).join(", ")}; ${refusals.length} of the steps expect a 429`;
  });

  for (const sequence of VECTORS.sequences) {
    suite.test(`sequence: ${sequence.name}`, async () => {
      const { results, redone, ms } = await runSequences();
      const result = results.get(sequence.name);
      assert.ok(result, "the sequence did not run");
      assert.equal(result.steps, sequence.steps.length, "not every step was sent");
      assert.ok(result.problems.length === 0, `${result.problems.length} of ${result.steps} steps failed:\n${result.problems.join("\n")}`);
      const expected429 = sequence.steps.filter((s) => s.expect.status === 429).length;
      assert.equal(result.refused, expected429, "429s answered");
      return `${result.steps} steps, ${result.refused} answered 429 (all sequences: ${Math.round(ms / 1000)} s${redone.length ? `; redone once: ${redone[0]}` : ""})`;
    });
  }

  suite.test("KV holds no credential any case presented, nor an HS256 issuer's secret; neither do the Worker's logs", async () => {
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
    // A signed token's signature alone would be enough to tell it was stored or logged.
    const signatures = checked.filter((s) => s.startsWith("eyJ") && s.split(".").length >= 3).map((s) => s.split(".")[2]);
    const issuerSecrets = VECTORS.issuer_secrets.split(/[\s,]+/).filter(Boolean).map((e) => e.slice(e.indexOf("=") + 1));
    assert.ok(signatures.length > 0 && issuerSecrets.length > 0, "no signed token or issuer secret to look for");
    const everything = [...checked, ...signatures.filter((s) => s.length >= 16), ...issuerSecrets];
    assertNoPlaintext(await worker.snapshot(), everything);
    const logged = worker.logs.join("\n");
    for (const s of everything) assert.ok(!logged.includes(s), `the Worker logged a credential: ${s.slice(0, 10)}…`);
    return `${checked.length} distinct credentials (${signatures.length} signed tokens) and ${issuerSecrets.length} issuer secret checked in KV and ${worker.logs.length} log lines`;
  });
}
