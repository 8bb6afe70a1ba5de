// The real `tokengate` CLI against the Worker in workerd: `tokengate push worker` signs and
// sends what the store holds, pages large change sets, and reports every refusal clearly.
import { execFileSync, spawnSync } from "node:child_process";
import fs from "node:fs";
import os from "node:os";
import path from "node:path";
import { assert, assertNoPlaintext, CACHE_TTL_MS, headerValues, ROOT, sleep, startWorker } from "./lib/harness.mjs";
import { randomKey } from "./lib/bundle.mjs";

const ENV = "staging";
const CLI = process.env.TOKENGATE_BIN ?? path.join(ROOT, "target/debug/tokengate");

/** A store in a temporary directory whose signing key is the Worker's push key. */
function operator(key, environment = ENV) {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), "tokengate-cli-worker-"));
  const env = {
    ...process.env,
    TOKENGATE_STORE: path.join(dir, "tokengate.db"),
    TOKENGATE_SIGNING_KEY: key,
    TOKENGATE_ACTOR: "worker-e2e",
  };
  const run = (...args) => spawnSync(CLI, args, { env, encoding: "utf8", timeout: 120_000 });
  const ok = (...args) => {
    const out = run(...args);
    assert.equal(out.status, 0, `tokengate ${args.join(" ")}: ${out.stderr}`);
    return out;
  };
  ok("init", "--environment", environment);
  return { dir, run, ok, create: (...args) => ok("create", ...args).stdout.trim() };
}

export default function (suite, { origin }) {
  if (!fs.existsSync(CLI)) {
    suite.test("the CLI is built", () => {
      throw new Error(`no CLI at ${CLI}: cargo build -p tokengate-admin`);
    });
    return;
  }
  const key = randomKey();
  let worker;
  let op;
  const issued = [];
  suite.before(async () => {
    worker = await startWorker({ origin, key, environment: ENV, vars: { TOKENGATE_PUSH_BATCH: "4" } });
    op = operator(key);
  });
  suite.after(async () => {
    if (op) fs.rmSync(op.dir, { recursive: true, force: true });
    // Awaited: the runner exits right after, which would orphan workerd mid-dispose.
    await worker?.dispose();
  });
  const url = () => `http://127.0.0.1:${worker.port}`;
  const push = () => op.ok("push", "worker", "--url", url());
  const call = (token) => worker.gate("GET", "/api/orders/1", { headers: [["authorization", `Bearer ${token}`]] });
  const eventually = async (predicate, withinMs, what) => {
    const deadline = Date.now() + withinMs;
    for (;;) {
      if (await predicate()) return;
      if (Date.now() > deadline) throw new Error(`${what} did not happen within ${withinMs} ms`);
      await sleep(100);
    }
  };

  let ci;
  suite.test("create, push worker: the token passes with its identity", async () => {
    ci = op.create("ci-deploy", "--scopes", "orders:read");
    issued.push(ci);
    push();
    const res = await call(ci);
    assert.equal(res.status, 200);
    const seen = origin.requests.find((r) => headerValues(r.headers, "cf-ray")[0] === res.ray);
    assert.deepEqual(headerValues(seen.headers, "x-tokengate-subject"), ["ci-deploy"]);
    assertNoPlaintext(await worker.snapshot(), issued);
  });

  suite.test("revoke, push worker: 401 within the cache bound", async () => {
    op.ok("revoke", "ci-deploy", "--reason", "e2e");
    push();
    await eventually(async () => (await call(ci)).status === 401, CACHE_TTL_MS + 2000, "401 after revoke");
  });

  suite.test("rotate with grace: both pass, then only the new one", async () => {
    const old = op.create("svc");
    issued.push(old);
    push();
    assert.equal((await call(old)).status, 200);
    const fresh = op.ok("rotate", "svc", "--grace", "3s").stdout.trim();
    issued.push(fresh);
    push();
    await eventually(async () => (await call(fresh)).status === 200, CACHE_TTL_MS + 2000, "new token served");
    assert.equal((await call(old)).status, 200, "the old token passes during grace");
    await eventually(async () => (await call(old)).status === 401, 8000, "old token refused after grace");
  });

  suite.test("a large change set is pushed in pages, with progress", async () => {
    const tokens = [];
    for (let i = 0; i < 10; i++) tokens.push(op.create(`bulk-${i}`));
    issued.push(...tokens);
    const out = push();
    const pages = out.stderr.split("\n").filter((l) => l.includes("changes applied"));
    assert.ok(pages.length >= 2, `expected paged progress, got: ${out.stderr}`);
    await eventually(async () => (await call(tokens[9])).status === 200, CACHE_TTL_MS + 2000, "last token served");
    assertNoPlaintext(await worker.snapshot(), issued);
    return `${pages.length} pages`;
  });

  suite.test("revoke-all, push worker: every token fails", async () => {
    const live = op.create("live");
    issued.push(live);
    push();
    assert.equal((await call(live)).status, 200);
    op.ok("revoke-all", "--reason", "incident", "--yes");
    push();
    await eventually(async () => (await call(live)).status === 401, CACHE_TTL_MS + 2000, "revoked");
  });

  suite.test("refusals are reported clearly and change nothing", async () => {
    const before = await worker.snapshot();
    const other = operator(key, "production");
    try {
      other.create("x");
      const wrongEnv = other.run("push", "worker", "--url", url());
      assert.equal(wrongEnv.status, 2);
      assert.match(wrongEnv.stderr, /refused the push \(HTTP 409\): wrong_environment/);
    } finally {
      fs.rmSync(other.dir, { recursive: true, force: true });
    }
    const stranger = operator(randomKey());
    try {
      stranger.create("y");
      const wrongKey = stranger.run("push", "worker", "--url", url());
      assert.equal(wrongKey.status, 2);
      assert.match(wrongKey.stderr, /refused the push \(HTTP 401\)/);
    } finally {
      fs.rmSync(stranger.dir, { recursive: true, force: true });
    }
    assert.deepEqual(await worker.snapshot(), before, "a refused push changed KV");
    const plain = op.run("push", "worker", "--url", "http://example.com");
    assert.equal(plain.status, 2);
    assert.match(plain.stderr, /https/);
  });
}
