// Usage at the Worker, as an operator sees it: every gate counts per token id the requests
// it let through (`allowed`), the ones it refused 403 for a missing scope (`denied_scope`)
// and when it last saw the token (`last_seen`); other refusals are no use of a token. Each
// isolate counts in memory and adds its counts to the usage store (the Durable Object
// `usage`) once per TOKENGATE_USAGE_FLUSH_SECONDS; `GET /.well-known/tokengate/usage`, signed
// by an admin key for this environment within five minutes, answers the store's counts (the
// reading isolate's flushed first). `tokengate usage pull` merges them into the store, once
// per request however often it pulls; `list`, `show` and `unused` read them back.
import { spawn } from "node:child_process";
import fs from "node:fs";
import os from "node:os";
import path from "node:path";
import { assert, headerValues, ROOT, safeJson, sleep, startWorker } from "./lib/harness.mjs";
import {
  bundle,
  makeToken,
  nowSecs,
  publish,
  pushSignature,
  randomKey,
  record,
  rule,
  sha256Hex,
  usageSignature,
} from "./lib/bundle.mjs";

const ENV = "prod";
const USAGE_PATH = "/.well-known/tokengate/usage";
const FORMAT = "tokengate.usage/v1";
/** The flush interval the Workers here are given (seconds). */
const FLUSH_SECONDS = 1;
const CLI = process.env.TOKENGATE_BIN ?? path.join(ROOT, "target/debug/tokengate");

const tokenId = (token) => `tid_${sha256Hex(token).slice(0, 16)}`;
/** A report's line for a token (by its plaintext), or undefined. */
const line = (report, token) => report.tokens.find((t) => t.token_id === tokenId(token));
/** [allowed, denied_scope] of a token in a report ([0, 0] when absent). */
const counts = (report, token) => {
  const l = line(report, token);
  return l ? [l.allowed, l.denied_scope] : [0, 0];
};
/** A report's lines keyed by token id, without the instant it was taken. */
const byId = (report) => Object.fromEntries(report.tokens.map((t) => [t.token_id, t]));

/** A signed usage read of `worker` ({status, headers, body, json}). */
async function readUsage(worker, { seeds = worker.seeds, t = nowSecs(), environment = ENV, method = "GET", signature } = {}) {
  const value = signature === undefined ? usageSignature(seeds, t, environment) : signature;
  const headers = value === null ? [] : [["tokengate-signature", value]];
  const res = await worker.request(method, USAGE_PATH, { headers });
  res.json = safeJson(res.body);
  return res;
}

/**
 * The report of a signed read, asserting a 200. A gate checks at most 10 reads a second and
 * answers 429 (Retry-After: 1) past that: this waits and reads again, as the CLI does.
 */
async function report(worker) {
  let res = await readUsage(worker);
  for (let i = 0; i < 3 && res.status === 429; i++) {
    assert.equal(res.headers.find(([n]) => n.toLowerCase() === "retry-after")?.[1], "1");
    await sleep(1000);
    res = await readUsage(worker);
  }
  assert.equal(res.status, 200, `usage read: ${res.status} ${res.body.slice(0, 300)}`);
  return res.json;
}

/**
 * A store in a temporary directory with its own key (the key file next to it), for the real
 * CLI; commands run asynchronously (`run` resolves {status, stdout, stderr}).
 */
function operator() {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), "tokengate-usage-"));
  const env = { ...process.env, TOKENGATE_STORE: path.join(dir, "tokengate.db"), TOKENGATE_ACTOR: "usage-e2e" };
  // Only what this operator says: no key source and no gate inherited from the caller.
  for (const name of [
    "TOKENGATE_SIGNING_KEY",
    "TOKENGATE_SIGNING_KEY_FILE",
    "TOKENGATE_KEY_COMMAND",
    "TOKENGATE_WORKER_URL",
    "TOKENGATE_ENVOY_URL",
  ]) {
    delete env[name];
  }
  const run = (...args) =>
    new Promise((resolve, reject) => {
      const child = spawn(CLI, args, { env, stdio: ["ignore", "pipe", "pipe"] });
      let stdout = "";
      let stderr = "";
      child.stdout.setEncoding("utf8").on("data", (c) => (stdout += c));
      child.stderr.setEncoding("utf8").on("data", (c) => (stderr += c));
      const timer = setTimeout(() => child.kill("SIGKILL"), 60_000);
      child.on("error", reject);
      child.on("close", (status) => {
        clearTimeout(timer);
        resolve({ status, stdout, stderr });
      });
    });
  const ok = async (...args) => {
    const out = await run(...args);
    assert.equal(out.status, 0, `tokengate ${args[0]} ${args[1] ?? ""}: exit ${out.status}: ${out.stderr}`);
    return out;
  };
  return { dir, run, ok };
}

export default function (suite, { origin }) {
  const key = randomKey();
  let worker;
  suite.before(async () => {
    // A second Worker in the same workerd, sharing KV and the Durable Objects: another
    // location, with isolates of its own.
    worker = await startWorker({
      origin,
      keys: [key],
      environment: ENV,
      vars: { TOKENGATE_USAGE_FLUSH_SECONDS: String(FLUSH_SECONDS) },
      peer: true,
    });
  });
  suite.after(() => worker?.dispose());

  // One bundle for the tests on this Worker: /api needs orders:read, /admin admin:write.
  const tokens = {
    a: makeToken(), // orders:read: passes /api
    b: makeToken(), // orders:read only: passes /api, 403 at /admin
    r: makeToken(), // revoked
    p1: makeToken(), // used at the peer only
    p2: makeToken(), // used at the peer only, at /admin
    x: makeToken(), // used once, before the checks of the first test
  };
  const records = [
    record("a", tokens.a, ["orders:read"]),
    record("b", tokens.b, ["orders:read"]),
    record("r", tokens.r, ["orders:read", "admin:write"], { revoked_at: nowSecs() - 5 }),
    record("p1", tokens.p1, ["orders:read"]),
    record("p2", tokens.p2, ["orders:read"]),
    record("x", tokens.x, ["orders:read"]),
  ];
  const unknown = makeToken(); // in no bundle
  let pushed = false;
  const ensurePushed = async () => {
    if (pushed) return;
    const rules = [
      rule("health", { exact: "/healthz" }, "public"),
      rule("api", { prefix: "/api" }, "token", { all_of: ["orders:read"] }),
      rule("admin", { prefix: "/admin" }, "token", { all_of: ["admin:write"] }),
    ];
    const res = await worker.push(publish(bundle({ version: 1, environment: ENV, tokens: records, rules }), [key]));
    assert.equal(res.status, 200, `push: ${res.status} ${res.body}`);
    pushed = true;
  };
  const call = (w, token, target = "/api/orders/1") =>
    w.gate("GET", target, { headers: [["authorization", `Bearer ${token}`]] });

  suite.test("a usage read must be signed by an admin key, for this environment, within five minutes", async () => {
    // Before any push the Worker trusts TOKENGATE_TRUSTED_KEYS: a signed read is answered.
    const early = await readUsage(worker);
    assert.equal(early.status, 200, `a signed read before any push: ${early.status} ${early.body}`);
    assert.equal(early.json?.format, FORMAT);
    assert.deepEqual(early.json?.tokens, [], "counts before any request");

    await ensurePushed();
    for (let i = 0; i < 2; i++) assert.equal((await call(worker, tokens.x)).status, 200);

    const refusals = [
      ["no signature", { signature: null }, 401, "invalid_signature"],
      ["a malformed signature", { signature: `t=${nowSecs()},kid_nothex=zz` }, 401, "invalid_signature"],
      ["a key the Worker does not trust", { seeds: [randomKey()] }, 401, "invalid_signature"],
      ["signed for another environment", { environment: "staging" }, 401, "invalid_signature"],
      ["a push signature, not a usage read's", { signature: pushSignature([key], nowSecs(), ENV) }, 401, "invalid_signature"],
      ["t 400 s ago", { t: nowSecs() - 400 }, 401, "signature_expired"],
      ["t 400 s ahead", { t: nowSecs() + 400 }, 401, "signature_expired"],
      ["POST, signed", { method: "POST" }, 405, null],
    ];
    for (const [what, opts, status, error] of refusals) {
      const res = await readUsage(worker, opts);
      assert.equal(res.status, status, `${what}: ${res.status} ${res.body.slice(0, 300)}`);
      if (error) assert.equal(res.json?.error, error, `${what}: ${res.body.slice(0, 300)}`);
      assert.ok(!res.body.includes("tid_"), `${what}: the refusal carries counts`);
    }

    const res = await readUsage(worker);
    assert.equal(res.status, 200, `a correctly signed read: ${res.status} ${res.body.slice(0, 300)}`);
    assert.deepEqual(headerValues(res.headers, "cache-control"), ["no-store"]);
    assert.match(headerValues(res.headers, "content-type")[0] ?? "", /^application\/json/);
    const body = res.json;
    assert.equal(body.format, FORMAT);
    assert.equal(body.environment, ENV);
    assert.match(body.instance, /^worker-/);
    assert.ok(Math.abs(body.taken_at - nowSecs()) <= 2, `taken_at ${body.taken_at}`);
    assert.deepEqual(counts(body, tokens.x), [2, 0], `x: ${JSON.stringify(line(body, tokens.x))}`);
    // Token ids and counts only: no hash, no secret, no name.
    for (const r of records) assert.ok(!res.body.includes(r.hash), `the report holds the hash of ${r.name}`);
    for (const t of [...Object.values(tokens), unknown]) {
      assert.ok(!res.body.includes(t), "the report holds a plaintext token");
      assert.ok(!res.body.includes(t.slice(-49, -6)), "the report holds a token body");
    }
    assert.ok(!/"name"|"hash"/.test(res.body), "the report names a name or hash member");
    return `${refusals.length} refusals`;
  });

  suite.test("counts per token: allowed, denied for scope, last seen; refusals do not count", async () => {
    await ensurePushed();
    const from = nowSecs();
    const expect = async (token, target, status, what) => {
      const res = await call(worker, token, target);
      assert.equal(res.status, status, `${what}: ${res.status} ${res.body.slice(0, 200)}`);
      return res;
    };
    for (let i = 0; i < 3; i++) await expect(tokens.a, "/api/orders/1", 200, "a at /api");
    await expect(tokens.b, "/api/orders/2", 200, "b at /api");
    for (let i = 0; i < 2; i++) {
      const res = await expect(tokens.b, "/admin/users", 403, "b at /admin");
      assert.equal((await worker.decision(res.ray))?.reason, "insufficient_scope");
    }
    for (let i = 0; i < 2; i++) {
      const res = await expect(tokens.r, "/api/orders/3", 401, "revoked r");
      assert.equal((await worker.decision(res.ray))?.reason, "revoked");
    }
    await expect(unknown, "/api/orders/4", 401, "an unknown token");
    // A public route: no token decided it.
    await expect(tokens.a, "/healthz", 200, "a at the public /healthz");
    const to = nowSecs() + 1;

    const body = await report(worker);
    const a = line(body, tokens.a);
    const b = line(body, tokens.b);
    assert.ok(a, `a is not in the report: ${JSON.stringify(body.tokens)}`);
    assert.ok(b, `b is not in the report: ${JSON.stringify(body.tokens)}`);
    assert.deepEqual([a.allowed, a.denied_scope], [3, 0], `a: ${JSON.stringify(a)}`);
    assert.deepEqual([b.allowed, b.denied_scope], [1, 2], `b: ${JSON.stringify(b)}`);
    for (const [name, l] of [["a", a], ["b", b]]) {
      assert.ok(l.last_seen >= from && l.last_seen <= to, `${name}: last_seen ${l.last_seen} not in [${from}, ${to}]`);
    }
    assert.equal(line(body, tokens.r), undefined, "a revoked token's refusals were counted");
    assert.equal(line(body, unknown), undefined, "an unknown token was counted");
    // Exactly the tokens used: x (the first test), a, b.
    const ids = body.tokens.map((t) => t.token_id).sort();
    assert.deepEqual(ids, [tokenId(tokens.a), tokenId(tokens.b), tokenId(tokens.x)].sort());
    const usage = await worker.usageStore();
    assert.ok(usage.flushes >= 1 && usage.rows_written >= 1, `usage store: ${JSON.stringify(usage)}`);
    assert.equal((await worker.status()).usage, undefined, "the public status shows usage figures");
  });

  suite.test("another isolate's counts arrive after its flush interval, once", async () => {
    await ensurePushed();
    const peer = worker.peer;
    const before = await worker.usageStore();
    const began = Date.now();
    for (let i = 0; i < 2; i++) assert.equal((await call(peer, tokens.p1)).status, 200, "p1 at the peer");
    assert.equal((await call(peer, tokens.p2, "/admin/x")).status, 403, "p2 at the peer's /admin");
    // Within the peer's interval nothing of it is in the store: no write per request.
    const early = await report(worker);
    const within = Date.now() - began < FLUSH_SECONDS * 1000 - 100;
    if (within) {
      assert.equal(line(early, tokens.p1), undefined, "the peer's counts reached the store before its flush interval");
      assert.equal(line(early, tokens.p2), undefined, "the peer's counts reached the store before its flush interval");
    }

    await sleep(FLUSH_SECONDS * 1000 + 500);
    // A request after the interval: the peer flushes (after answering it).
    assert.equal((await call(peer, tokens.p1)).status, 200, "p1 at the peer, after the interval");
    const deadline = Date.now() + 5000;
    let arrived = null;
    // Polled 4 times a second: a gate checks at most 10 usage reads a second.
    for (let i = 0; i < 100 && Date.now() < deadline; i++) {
      const body = await report(worker);
      if (line(body, tokens.p1)) {
        arrived = body;
        break;
      }
      await sleep(250);
    }
    assert.ok(arrived, "the peer's counts did not reach the first Worker's reads within 5 s of its flush");
    const waited = Date.now() - began;
    assert.deepEqual(counts(arrived, tokens.p1), [3, 0], `p1: ${JSON.stringify(line(arrived, tokens.p1))}`);
    assert.deepEqual(counts(arrived, tokens.p2), [0, 1], `p2: ${JSON.stringify(line(arrived, tokens.p2))}`);

    // Read again, twice, on both Workers: the same counts (each request counted once).
    for (const [who, w] of [["first", worker], ["first", worker], ["peer", peer]]) {
      await sleep(200);
      const again = await report(w);
      assert.equal(again.instance, arrived.instance, `${who}: another instance`);
      assert.deepEqual(byId(again), byId(arrived), `${who}: the counts moved without requests`);
    }
    const after = await worker.usageStore();
    assert.ok(after.flushes >= before.flushes + 1, `flushes ${before.flushes} -> ${after.flushes}`);
    assert.ok(after.rows_written >= before.rows_written + 1, `rows_written ${before.rows_written} -> ${after.rows_written}`);
    assert.ok(after.flushes >= 1 && after.rows_written >= 1);
    return `${within ? "absent before the interval, " : ""}arrived after ${waited} ms; flushes ${before.flushes} -> ${after.flushes}, rows ${before.rows_written} -> ${after.rows_written}`;
  });

  suite.test("tokengate usage pull, list, unused, a second pull", async () => {
    if (!fs.existsSync(CLI)) throw new Error(`no CLI at ${CLI}: cargo build -p tokengate-admin`);
    const op = operator();
    let w;
    try {
      await op.ok("init", "--environment", ENV);
      const published = (await op.ok("key", "public")).stdout.trim();
      w = await startWorker({
        origin,
        environment: ENV,
        vars: { TOKENGATE_TRUSTED_KEYS: published, TOKENGATE_USAGE_FLUSH_SECONDS: String(FLUSH_SECONDS) },
      });
      const url = `http://127.0.0.1:${w.port}`;
      const names = ["svc-1", "svc-2", "svc-3", "idle-1", "idle-2"];
      const secret = {};
      for (const n of names) secret[n] = (await op.ok("create", n, "--scopes", "orders:read")).stdout.trim();
      await sleep(3500);
      await op.ok("push", "worker", "--url", url);

      // svc-1 once, svc-2 twice, svc-3 three times; the idle ones never.
      const plan = { "svc-1": 1, "svc-2": 2, "svc-3": 3 };
      const window = {}; // each token's last request: [start s, end s]
      const use = async (extra) => {
        for (const [n, times] of Object.entries(extra)) {
          for (let i = 0; i < times; i++) {
            const start = Date.now() / 1000;
            const res = await call(w, secret[n], `/orders/${i}`);
            assert.equal(res.status, 200, `${n}: ${res.status} ${res.body.slice(0, 200)}`);
            window[n] = [start, Date.now() / 1000];
          }
        }
      };
      await use(plan);

      const pull = async () => {
        const out = await op.run("usage", "pull", "--worker-url", url);
        assert.equal(out.status, 0, `usage pull: exit ${out.status}: ${out.stderr}`);
        return out;
      };
      const list = async () => {
        const rows = JSON.parse((await op.ok("list", "--json")).stdout);
        return Object.fromEntries(rows.map((r) => [r.name, r]));
      };
      const first = await pull();
      const summary = first.stderr.match(/^worker (\S+) \((worker-[^)]+)\): (\d+) tokens, (\d+) changed, (\d+) new uses/m);
      assert.ok(summary, `usage pull said: ${first.stderr}`);
      assert.equal(summary[1], url);
      assert.deepEqual(summary.slice(3).map(Number), [3, 3, 6], `usage pull said: ${summary[0]}`);
      const instance = summary[2];

      const rows = await list();
      for (const [n, times] of Object.entries(plan)) {
        const r = rows[n];
        assert.deepEqual([r.uses, r.uses_30d, r.denied_scope], [times, times, 0], `${n}: ${JSON.stringify(r)}`);
        assert.ok(r.last_used, `${n}: no last_used`);
        const last = Date.parse(r.last_used) / 1000;
        const [start, end] = window[n];
        assert.ok(
          last >= Math.floor(start) - FLUSH_SECONDS && last <= Math.ceil(end) + FLUSH_SECONDS,
          `${n}: last_used ${r.last_used} is not the time of its last request (${new Date(start * 1000).toISOString()})`,
        );
      }
      for (const n of ["idle-1", "idle-2"]) {
        const r = rows[n];
        assert.deepEqual([r.uses, r.uses_30d, r.denied_scope, r.last_used], [0, 0, 0, null], `${n}: ${JSON.stringify(r)}`);
      }

      // The table has the columns, and svc-3's row its uses.
      const table = (await op.ok("list")).stdout;
      assert.match(table.split("\n")[0], /LAST USED\s+USES\s+USES 30D/);
      const svc3 = table.split("\n").find((l) => l.startsWith("svc-3 "));
      assert.match(svc3 ?? "", /\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ\s+3\s+3$/, `svc-3's row: ${svc3}`);
      const idle = table.split("\n").find((l) => l.startsWith("idle-1 "));
      assert.match(idle ?? "", /never\s+never\s+0\s+0$/, `idle-1's row: ${idle}`);

      // show: each gate's counts, with where they came from.
      const shown = JSON.parse((await op.ok("show", "svc-2", "--json")).stdout);
      assert.equal(shown.uses, 2);
      assert.equal(shown.usage_sources?.length, 1, JSON.stringify(shown.usage_sources));
      const source = shown.usage_sources[0];
      assert.deepEqual(
        [source.source, source.instance, source.token_id, source.allowed, source.denied_scope],
        [`worker ${url}`, instance, shown.token_id, 2, 0],
      );
      assert.equal(source.last_seen, shown.last_used);
      assert.ok(Math.abs(Date.parse(source.pulled_at) / 1000 - nowSecs()) <= 5, `pulled_at ${source.pulled_at}`);

      // unused --for 3s: exactly the two idle ones, exit 1.
      const unused = await op.run("unused", "--for", "3s", "--json");
      assert.equal(unused.status, 1, `unused: exit ${unused.status}: ${unused.stderr}`);
      assert.deepEqual(JSON.parse(unused.stdout).map((r) => r.name).sort(), ["idle-1", "idle-2"]);

      // A second pull with no requests between: nothing changes.
      const second = await pull();
      assert.match(second.stderr, new RegExp(`\\(${instance}\\): 3 tokens, 0 changed, 0 new uses`), second.stderr);
      assert.deepEqual(await list(), rows, "a second pull changed list --json");

      // More requests, then a pull: the counts grow by exactly those.
      const more = { "svc-1": 2, "idle-1": 1 };
      await use(more);
      const third = await pull();
      assert.match(third.stderr, new RegExp(`\\(${instance}\\): 4 tokens, 2 changed, 3 new uses`), third.stderr);
      const grown = await list();
      for (const n of names) {
        const expected = (plan[n] ?? 0) + (more[n] ?? 0);
        assert.equal(grown[n].uses, expected, `${n}: uses ${grown[n].uses}, expected ${expected}`);
        assert.equal(grown[n].uses_30d, expected, `${n}: uses_30d`);
      }
      assert.ok(grown["idle-1"].last_used, "idle-1 used but no last_used");
      assert.equal(grown["idle-2"].last_used, null);
      const stillUnused = await op.run("unused", "--for", "3s", "--json");
      assert.equal(stillUnused.status, 1, stillUnused.stderr);
      const unusedNames = JSON.parse(stillUnused.stdout).map((r) => r.name);
      assert.ok(unusedNames.includes("idle-2") && !unusedNames.includes("idle-1"), `unused: ${unusedNames}`);
      return `pulls: 6, 0, 3 new uses; instance ${instance}`;
    } finally {
      fs.rmSync(op.dir, { recursive: true, force: true });
      await w?.dispose();
    }
  });
}
