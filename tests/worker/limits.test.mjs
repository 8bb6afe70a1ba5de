// Per-token rate limits on the Worker (issue #17): a rule's `rate_limit` and a token's own,
// the stricter applying, counted by the Workers Rate Limiting binding named after the limit
// (TOKENGATE_RATE_<requests>_PER_MINUTE, simple = { limit, period = 60 }), which Miniflare
// runs in memory in windows aligned to the epoch. A push whose policy names a limit without a
// binding is refused (409 rate_limit_unavailable) and a rule limit per second or hour is
// refused (400), both changing nothing; a token whose own limit has no binding is answered 503
// (fail closed, an error logged), never served unmetered; two tokens under one rule count
// apart, and the 429 says when to retry. The real CLI refuses, before sending anything, a
// store the Worker could not enforce, and a store with a rule limit and a token's own `--rate`
// is enforced end to end. wrangler.toml's bindings, read by wrangler itself, are named as the
// Worker looks them up.
//
// Counts live in one clock minute: what must be counted together is sent within one minute
// (from 1 to 45 s into it), and tried once more in a later minute, whose counts start afresh,
// if it crossed a boundary.
import fs from "node:fs";
import path from "node:path";
import {
  assert,
  assertRefused,
  headerValues,
  perMinuteBindings,
  rateBindingName,
  Relay,
  ROOT,
  safeJson,
  sleep,
  startWorker,
} from "./lib/harness.mjs";
import { bundle, makeToken, publish, publishPaged, randomKey, record, rule } from "./lib/bundle.mjs";
import { CLI, operator } from "./cli.test.mjs";

const ENV = "prod";
const MINUTE_MS = 60_000;
const minuteOf = (ms) => Math.floor(ms / MINUTE_MS);
const perMinute = (requests) => ({ requests, per: "minute" });

/**
 * Runs `fn` within one clock minute: starts it 1 to 45 s into a minute (waiting at most 16 s)
 * and, should it have crossed into the next minute (failing or not), runs it once more from
 * 1 s into a later one. Returns what `fn` returned.
 */
async function inOneMinute(fn) {
  for (let attempt = 0; attempt < 2; attempt++) {
    const into = (Date.now() % MINUTE_MS) / 1000;
    if (into < 1) await sleep((1 - into) * 1000);
    else if (into > 45) await sleep((61 - into) * 1000);
    const minute = minuteOf(Date.now());
    let out;
    let error = null;
    try {
      out = await fn();
    } catch (e) {
      error = e;
    }
    if (minuteOf(Date.now()) === minute) {
      if (error) throw error;
      return out;
    }
  }
  throw new Error("crossed a minute boundary twice");
}

/** The body a 429 carries: exactly an error and its description. */
function assertRateLimitedBody(res) {
  const json = safeJson(res.body);
  assert.deepEqual(Object.keys(json ?? {}).sort(), ["error", "error_description"], `429 body: ${res.body}`);
  assert.equal(json.error, "rate_limited");
  assert.ok(json.error_description.length > 0, "an empty description");
}

export default function (suite, { origin }) {
  const key = randomKey();
  let worker;
  let version = 0;
  // Bindings for 2, 3 and 5 requests per minute; none for 4 or 7.
  const BOUND = [2, 3, 5];
  suite.before(async () => {
    worker = await startWorker({ origin, keys: [key], environment: ENV, ratelimits: perMinuteBindings(BOUND) });
  });
  suite.after(() => worker?.dispose());

  const upstreamOf = (res) => origin.requests.find((r) => headerValues(r.headers, "cf-ray")[0] === res.ray);
  const call = (w, token, target = "/api/orders/1") =>
    w.gate("GET", target, { headers: [["authorization", `Bearer ${token}`]] });
  const issue = (name, opts = {}) => {
    const token = makeToken();
    return { name, token, record: record(name, token, ["orders:read"], opts) };
  };
  /** The suite's policy: /healthz public, /metered 2/min, /limited 3/min, /api unlimited. */
  const RULES = [
    rule("health", { exact: "/healthz" }, "public"),
    rule("metered", { prefix: "/metered" }, "token", { all_of: ["orders:read"], rate_limit: perMinute(2) }),
    rule("limited", { prefix: "/limited" }, "token", { all_of: ["orders:read"], rate_limit: perMinute(3) }),
    rule("api", { prefix: "/api" }, "token", { all_of: ["orders:read"] }),
  ];
  const published = (tokens, rules = RULES, v = ++version) =>
    publish(bundle({ version: v, environment: ENV, tokens, rules }), [key]);
  const pushOk = async (tokens, rules = RULES) => {
    const res = await worker.push(published(tokens, rules));
    assert.equal(res.status, 200, res.body);
    return res;
  };

  suite.test("a push whose rule has a limit with no binding: 409 rate_limit_unavailable naming the binding, inline or paged; nothing changes", async () => {
    const base = issue("base");
    await pushOk([base.record]);
    const served = await worker.status();
    // The control: a limit of 5/min has its binding, so the same push with 5 is taken below.
    const rules = (requests) => [...RULES, rule("unbound", { prefix: "/unbound" }, "token", { rate_limit: perMinute(requests) })];
    const missing = rateBindingName(7);
    const refusal = await assertRefused(worker, "inline", () => worker.push(published([base.record], rules(7))), [
      [409, "rate_limit_unavailable"],
    ]);
    const description = refusal.json.error_description;
    assert.ok(description.includes(missing), `the description does not name ${missing}: ${description}`);
    assert.ok(description.includes('"unbound"'), `the description does not name the rule: ${description}`);
    const paged = publishPaged(bundle({ version: ++version, environment: ENV, tokens: [base.record], rules: rules(7) }), [key]);
    const pagedRefusal = await assertRefused(worker, "paged manifest", () => worker.push(paged.text), [[409, "rate_limit_unavailable"]]);
    assert.ok(pagedRefusal.json.error_description.includes(missing), pagedRefusal.body);
    assert.equal((await worker.status()).version, served.version, "the served version moved");
    // The gate still serves the bundle it had.
    assert.equal((await call(worker, base.token)).status, 200);

    const bound = await worker.push(published([base.record], rules(5)));
    assert.equal(bound.status, 200, `the same push with a bound limit: ${bound.body}`);
    return `${refusal.status}: ${description}`;
  });

  suite.test("a rule's limit per second or per hour: 400 invalid_bundle (the Worker counts per minute only); nothing changes", async () => {
    const base = issue("base-2");
    await pushOk([base.record]);
    const served = await worker.status();
    const notes = [];
    for (const per of ["second", "hour"]) {
      // 5 has a binding: the period alone is refused.
      const rules = [...RULES, rule("fast", { prefix: "/fast" }, "token", { rate_limit: { requests: 5, per } })];
      const res = await assertRefused(worker, `5/${per}`, () => worker.push(published([base.record], rules)), [
        [400, "invalid_bundle"],
      ]);
      assert.match(res.json.error_description, /"fast"/);
      assert.match(res.json.error_description, /per minute/);
      notes.push(`${per}: ${res.status} ${res.json.error}`);
    }
    assert.equal((await worker.status()).version, served.version, "the served version moved");
    assert.equal((await call(worker, base.token)).status, 200);
    return notes.join("; ");
  });

  suite.test("a token whose own limit has no binding where its request arrives: 503 (fail closed, never reaches the origin, an error logged); other tokens are served", async () => {
    // Two locations sharing KV and the push state: the second was deployed without the
    // binding for 4/min (or it was removed since). The push lands where the binding is.
    const w = await startWorker({
      origin,
      keys: [key],
      environment: ENV,
      peer: true,
      ratelimits: perMinuteBindings([3, 4]),
      peerRatelimits: perMinuteBindings([3]),
    });
    try {
      const unbound = issue("own-4", { rate_limit: perMinute(4) });
      const plain = issue("plain");
      const rules = RULES.filter((r) => r.name !== "metered"); // /limited 3/min, /api unlimited
      const pushed = await w.push(published([unbound.record, plain.record], rules, 1));
      assert.equal(pushed.status, 200, pushed.body);
      const there = await call(w, unbound.token);
      assert.equal(there.status, 200, `where its binding is: ${there.body}`);

      const errorsBefore = w.errors.length;
      const res = await call(w.peer, unbound.token);
      assert.equal(res.status, 503, `${res.status} ${res.body}`);
      assert.equal(safeJson(res.body)?.error, "temporarily_unavailable", res.body);
      assert.equal(upstreamOf(res), undefined, "the request reached the origin");
      const log = await w.decision(res.ray);
      assert.ok(log, "no decision log line");
      assert.deepEqual([log.status, log.reason, log.subject], ["503", "internal", "own-4"]);
      const errors = w.errors.slice(errorsBefore);
      assert.ok(
        errors.some((l) => l.includes("failing closed") && l.includes(rateBindingName(4))),
        `no error names the missing binding: ${JSON.stringify(errors)}`,
      );
      // Another token is served there. This one is not, even where a stricter rule limit with
      // a binding applies (3/min on /limited): its own 4/min applies there too, and cannot be
      // counted.
      const ok = await call(w.peer, plain.token);
      assert.equal(ok.status, 200, ok.body);
      assert.deepEqual(headerValues(upstreamOf(ok).headers, "x-tokengate-subject"), ["plain"]);
      const stricter = await call(w.peer, unbound.token, "/limited/x");
      assert.equal(stricter.status, 503, `under the rule's limit too: ${stricter.body}`);
      assert.equal(upstreamOf(stricter), undefined, "the request reached the origin");
      assert.equal(w.errors.length, errorsBefore + 2, `errors logged: ${JSON.stringify(w.errors.slice(errorsBefore))}`);
      return `${res.status} ${log.reason}: ${errors[0]}`;
    } finally {
      await w.dispose();
    }
  });

  suite.test("a token's own limit per second (a bundle the CLI would not make) is pushed, so it never holds back the push, and its requests are 503: never served unmetered", async () => {
    const fast = issue("own-per-second", { rate_limit: { requests: 5, per: "second" } });
    const plain = issue("plain-2");
    const text = published([fast.record, plain.record]);
    const res = await worker.push(text);
    assert.equal(res.status, 200, res.body);
    const errorsBefore = worker.errors.length;
    const refused = await call(worker, fast.token);
    assert.equal(refused.status, 503, `${refused.status} ${refused.body}`);
    assert.equal(upstreamOf(refused), undefined, "the request reached the origin");
    assert.deepEqual([(await worker.decision(refused.ray))?.reason], ["internal"]);
    const errors = worker.errors.slice(errorsBefore);
    assert.ok(
      errors.some((l) => l.includes("failing closed") && l.includes("per minute only")),
      `no error for the limit per second: ${JSON.stringify(errors)}`,
    );
    assert.equal((await call(worker, plain.token)).status, 200);
    return `pushed; its requests are 503: ${errors[0]}`;
  });

  suite.test("two tokens under one limited rule count apart; the 429 (body, Retry-After, RateLimit-Policy, RateLimit) never reaches the origin", async () => {
    const a = issue("pair-a");
    const b = issue("pair-b");
    await pushOk([a.record, b.record]);
    const summary = await inOneMinute(async () => {
      const reached = origin.requests.length;
      const seen = [];
      const send = async (t) => {
        const sent = Date.now();
        const res = await call(worker, t.token, "/metered/orders");
        seen.push({ t, res, sent, answered: Date.now() });
        return res;
      };
      // 2 per minute each: a's third is refused, b's first two still pass, then its third.
      const plan = [
        [a, 200],
        [a, 200],
        [a, 429],
        [b, 200],
        [b, 200],
        [b, 429],
        [a, 429],
      ];
      for (const [t, want] of plan) {
        const res = await send(t);
        assert.equal(res.status, want, `${t.name}: ${res.status} ${res.body}`);
      }
      let refused = 0;
      for (const { t, res, sent, answered } of seen) {
        const log = await worker.decision(res.ray);
        assert.ok(log, "no decision log line");
        if (res.status === 200) {
          assert.deepEqual(headerValues(upstreamOf(res).headers, "x-tokengate-subject"), [t.name]);
          assert.deepEqual([log.reason, log.rule], ["valid", "metered"]);
          continue;
        }
        refused += 1;
        assert.equal(upstreamOf(res), undefined, "a refused request reached the origin");
        assert.deepEqual([log.status, log.reason, log.rule, log.subject], ["429", "rate_limited", "metered", t.name]);
        assertRateLimitedBody(res);
        const one = (name) => {
          const values = headerValues(res.headers, name);
          assert.equal(values.length, 1, `${name}: ${JSON.stringify(values)}`);
          return values[0];
        };
        // The seconds to the end of the minute, at the second it was sent or answered in.
        const resets = [sent, answered].map((ms) => String(60 - (Math.floor(ms / 1000) % 60)));
        const retry = one("retry-after");
        assert.ok(resets.includes(retry), `retry-after ${retry} (expected one of ${resets})`);
        assert.equal(one("ratelimit-policy"), '"metered";q=2;w=60');
        assert.equal(one("ratelimit"), `"metered";r=0;t=${retry}`);
        assert.equal(one("content-type"), "application/json");
        assert.equal(one("cache-control"), "no-store");
        for (const absent of ["www-authenticate", "x-origin-echo"]) {
          assert.deepEqual(headerValues(res.headers, absent), [], `${absent} on a 429`);
        }
      }
      assert.equal(refused, 3, "429s answered");
      // Exactly the four allowed requests reached the origin.
      assert.equal(origin.requests.length - reached, 4, "requests that reached the origin");
      return `${seen.length} requests: 4 passed, ${refused} answered 429 (retry-after ${headerValues(seen[2].res.headers, "retry-after")[0]})`;
    });
    return summary;
  });

  suite.test("wrangler.toml's Rate Limiting bindings, as wrangler reads them, are named as the Worker looks them up, and serve a limit of that size", async () => {
    const { unstable_readConfig } = await import("wrangler");
    const config = unstable_readConfig({ config: path.join(ROOT, "wrangler.toml") }, { hideWarnings: true });
    const limits = config.ratelimits ?? [];
    assert.ok(limits.length > 0, "wrangler.toml declares no [[ratelimits]] binding");
    const ids = new Set();
    for (const r of limits) {
      assert.equal(r.simple.period, 60, `${r.name}: the Worker counts per minute`);
      assert.equal(r.name, rateBindingName(r.simple.limit), "a binding the Worker would never look up");
      assert.match(r.namespace_id, /^[1-9][0-9]*$/, `${r.name}: namespace_id`);
      assert.ok(!ids.has(r.namespace_id), `${r.name}: a namespace_id used twice`);
      ids.add(r.namespace_id);
    }
    // A Worker given exactly those bindings takes a rule of that limit.
    const w = await startWorker({
      origin,
      keys: [key],
      environment: ENV,
      ratelimits: Object.fromEntries(limits.map((r) => [r.name, { limit: r.simple.limit, period: r.simple.period }])),
    });
    try {
      const t = issue("toml");
      const rules = [rule("api", { prefix: "/api" }, "token", { all_of: ["orders:read"], rate_limit: perMinute(limits[0].simple.limit) })];
      const res = await w.push(published([t.record], rules, 1));
      assert.equal(res.status, 200, res.body);
      assert.equal((await call(w, t.token)).status, 200);
    } finally {
      await w.dispose();
    }
    return limits.map((r) => `${r.name} (namespace ${r.namespace_id})`).join(", ");
  });

  if (!fs.existsSync(CLI)) {
    suite.test("the CLI is built", () => {
      throw new Error(`no CLI at ${CLI}: cargo build -p tokengate-admin`);
    });
    return;
  }

  /** An operator and a Worker trusting its key, removed afterwards whatever happens. */
  const withGate = async (ratelimits, fn) => {
    const admin = operator({ environment: ENV });
    let w;
    try {
      w = await startWorker({ origin, environment: ENV, vars: { TOKENGATE_TRUSTED_KEYS: admin.publicKeys() }, ratelimits });
      return await fn({ admin, w, url: `http://127.0.0.1:${w.port}` });
    } finally {
      fs.rmSync(admin.dir, { recursive: true, force: true });
      await w?.dispose();
    }
  };

  suite.test("CLI: create x --rate 5/s, push worker: refused before anything is sent, naming the token; the Worker's version is unchanged", async () => {
    return withGate(perMinuteBindings([5]), async ({ admin, w, url }) => {
      admin.create("base", "--scopes", "orders:read");
      admin.ok("push", "worker", "--url", url);
      const served = await w.served();
      assert.ok(served.version > 0, "the first push is not served");
      // The store takes it (an Envoy gate counts per second); a push to the Worker does not.
      admin.create("x", "--rate", "5/s");
      const relay = await new Relay(w.port).start();
      try {
        const out = await admin.start(["push", "worker", "--url", relay.url], { timeoutMs: 60_000 }).exited;
        assert.equal(out.status, 2, `push worker: exit ${out.status}: ${out.stderr}`);
        assert.match(out.stderr, /token "x"/, "the error does not name the token");
        assert.match(out.stderr, /per minute/);
        assert.doesNotMatch(out.stderr, /pushed bundle/);
        assert.deepEqual(relay.requests.map((r) => `${r.method} ${r.path}`), [], "the CLI sent requests");
        assert.deepEqual(await w.served(), served, "what the Worker serves changed");
        return out.stderr.trim().split("\n").at(-1);
      } finally {
        await relay.close();
      }
    });
  });

  suite.test("CLI: a policy with a per-minute rule limit and a token made with --rate 2/min: refused by a Worker without the bindings (409), enforced by one with them (third request in the minute 429, \"token\";q=2;w=60)", async () => {
    const policy = `[credentials]
sources = ["bearer"]
forward = false

[[rules]]
name = "health"
path = { exact = "/healthz" }
methods = ["GET"]
access = "public"

[[rules]]
name = "metered"
path = { prefix = "/api" }
access = "token"
all_of = ["orders:read"]
rate_limit = { requests = 10, per = "minute" }
`;
    const store = (admin) => {
      const file = path.join(admin.dir, "policy.toml");
      fs.writeFileSync(file, policy);
      admin.ok("policy", "set", file);
      return {
        capped: admin.create("capped", "--scopes", "orders:read", "--rate", "2/min"),
        free: admin.create("free", "--scopes", "orders:read"),
      };
    };
    // A Worker without the rule's binding refuses the push, and says which binding it lacks.
    const refusedNote = await withGate({}, async ({ admin, w, url }) => {
      store(admin);
      const before = await w.served();
      const out = admin.run("push", "worker", "--url", url);
      assert.equal(out.status, 2, `push worker: exit ${out.status}: ${out.stderr}`);
      assert.match(out.stderr, /refused the push \(HTTP 409\): rate_limit_unavailable/);
      assert.match(out.stderr, new RegExp(rateBindingName(10)));
      assert.deepEqual(await w.served(), before, "what the Worker serves changed");
      return "409 without the bindings";
    });
    const enforcedNote = await withGate(perMinuteBindings([10, 2]), async ({ admin, w, url }) => {
      const { capped, free } = store(admin);
      admin.ok("push", "worker", "--url", url);
      return inOneMinute(async () => {
        const reached = origin.requests.length;
        const statuses = [];
        let refusal = null;
        for (let i = 0; i < 3; i++) {
          const res = await call(w, capped);
          statuses.push(res.status);
          if (res.status === 429) refusal = res;
        }
        assert.deepEqual(statuses, [200, 200, 429], "capped (2/min of its own)");
        assert.deepEqual(headerValues(refusal.headers, "ratelimit-policy"), ['"token";q=2;w=60']);
        const retry = headerValues(refusal.headers, "retry-after");
        assert.equal(retry.length, 1);
        assert.ok(Number(retry[0]) >= 1 && Number(retry[0]) <= 60, `retry-after ${retry}`);
        assert.deepEqual(headerValues(refusal.headers, "ratelimit"), [`"token";r=0;t=${retry[0]}`]);
        assertRateLimitedBody(refusal);
        const log = await w.decision(refusal.ray);
        assert.deepEqual([log?.reason, log?.subject], ["rate_limited", "capped"]);
        assert.equal(upstreamOf(refusal), undefined, "the 429 reached the origin");
        // The rule's 10/min for a token without its own limit: three pass.
        for (let i = 0; i < 3; i++) assert.equal((await call(w, free)).status, 200, "free (the rule's 10/min)");
        assert.equal(origin.requests.length - reached, 5, "requests that reached the origin");
        return `capped: ${statuses.join(", ")} (retry-after ${retry[0]}); free: 3 × 200`;
      });
    });
    return `${refusedNote}; ${enforcedNote}`;
  });
}
