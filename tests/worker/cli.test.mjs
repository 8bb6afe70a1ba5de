// The real `tokengate` CLI against the Worker in workerd: `tokengate push worker` signs (with
// every published Ed25519 key) and sends what the store holds, pages large change sets,
// reports every refusal clearly, and an admin key rotation reaches the Worker by pushes
// alone. The Worker is given only what `tokengate key public` prints.
import { spawnSync } from "node:child_process";
import fs from "node:fs";
import os from "node:os";
import path from "node:path";
import {
  assert,
  assertNoPlaintext,
  assertRefused,
  CACHE_TTL_MS,
  headerValues,
  ROOT,
  sleep,
  startWorker,
} from "./lib/harness.mjs";
import { bundle, keyId, makeToken, publicKeyHex, publish, record } from "./lib/bundle.mjs";

const ENV = "staging";
const CLI = process.env.TOKENGATE_BIN ?? path.join(ROOT, "target/debug/tokengate");

/** The public keys in a TOKENGATE_TRUSTED_KEYS text (commas and/or white space). */
const keysIn = (text) => text.split(/[\s,]+/).filter(Boolean);

/**
 * A store in a temporary directory. Its private key is made by `init` into the key file (the
 * store path with ".key" for ".db") unless `signingKey` is given, as TOKENGATE_SIGNING_KEY.
 */
function operator({ environment = ENV, signingKey = null } = {}) {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), "tokengate-cli-worker-"));
  const store = path.join(dir, "tokengate.db");
  const env = { ...process.env, TOKENGATE_STORE: store, TOKENGATE_ACTOR: "worker-e2e" };
  // Only what this operator says: no key source inherited from the caller's environment.
  for (const name of ["TOKENGATE_SIGNING_KEY", "TOKENGATE_SIGNING_KEY_FILE", "TOKENGATE_KEY_COMMAND"]) delete env[name];
  if (signingKey) env.TOKENGATE_SIGNING_KEY = signingKey;
  const outputs = []; // everything the CLI printed, to check no private key ever was
  const run = (...args) => {
    const out = spawnSync(CLI, args, { env, encoding: "utf8", timeout: 120_000 });
    outputs.push(out.stdout ?? "", out.stderr ?? "");
    return out;
  };
  const ok = (...args) => {
    const out = run(...args);
    assert.equal(out.status, 0, `tokengate ${args.join(" ")}: ${out.stderr}`);
    return out;
  };
  ok("init", "--environment", environment);
  const keyFile = path.join(dir, "tokengate.key");
  return {
    dir,
    keyFile,
    outputs,
    run,
    ok,
    create: (...args) => ok("create", ...args).stdout.trim(),
    /** `tokengate key public`: the published public keys, what TOKENGATE_TRUSTED_KEYS takes. */
    publicKeys: () => ok("key", "public").stdout.trim(),
    /** `tokengate key list --json`: [{key_id, public_key, state, created_at}]. */
    keyList: () => JSON.parse(ok("key", "list", "--json").stdout),
    /** The private keys (64-hex seeds) in the key file, one per line, in file order. */
    seeds: () =>
      fs
        .readFileSync(keyFile, "utf8")
        .split("\n")
        .map((l) => l.trim())
        .filter((l) => /^[0-9a-f]{64}$/.test(l)),
  };
}

export default function (suite, { origin }) {
  if (!fs.existsSync(CLI)) {
    suite.test("the CLI is built", () => {
      throw new Error(`no CLI at ${CLI}: cargo build -p tokengate-admin`);
    });
    return;
  }
  let worker;
  let op;
  const issued = [];
  suite.before(async () => {
    op = operator();
    // Deployed as an operator would: the variable is `key public`'s output, nothing else.
    worker = await startWorker({
      origin,
      environment: ENV,
      vars: { TOKENGATE_PUSH_BATCH: "4", TOKENGATE_TRUSTED_KEYS: op.publicKeys() },
    });
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
  suite.test("create, push worker: the token passes with its identity, under the key `key public` printed", async () => {
    ci = op.create("ci-deploy", "--scopes", "orders:read");
    issued.push(ci);
    push();
    const res = await call(ci);
    assert.equal(res.status, 200);
    const seen = origin.requests.find((r) => headerValues(r.headers, "cf-ray")[0] === res.ray);
    assert.deepEqual(headerValues(seen.headers, "x-tokengate-subject"), ["ci-deploy"]);
    // The key file's key, as this file derives its public key and id, is what the CLI lists,
    // publishes and the Worker trusts; KV holds neither a token nor the private key.
    const [seed] = op.seeds();
    assert.ok(seed, "init wrote no private key into the key file");
    assert.equal(op.publicKeys(), publicKeyHex(seed));
    assert.deepEqual(
      op.keyList().map((k) => [k.key_id, k.public_key, k.state]),
      [[keyId(seed), publicKeyHex(seed), "active"]],
    );
    assert.deepEqual((await worker.status()).keys, [keyId(seed)]);
    assertNoPlaintext(await worker.snapshot(), [...issued, seed]);
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
    // The same private key, given as TOKENGATE_SIGNING_KEY, for another environment.
    const other = operator({ environment: "production", signingKey: op.seeds()[0] });
    try {
      other.create("x");
      const wrongEnv = other.run("push", "worker", "--url", url());
      assert.equal(wrongEnv.status, 2);
      assert.match(wrongEnv.stderr, /refused the push \(HTTP 409\): wrong_environment/);
    } finally {
      fs.rmSync(other.dir, { recursive: true, force: true });
    }
    // A store with its own key, never published to this Worker.
    const stranger = operator();
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

  suite.test("admin key rotation end to end: rotate, push, retire, push; the retired key then pushes nothing", async () => {
    // One operator working from its key file (no TOKENGATE_SIGNING_KEY), one Worker deployed
    // once with `key public` and never restarted or given another variable.
    const admin = operator();
    let w;
    try {
      assert.equal(fs.statSync(admin.keyFile).mode & 0o777, 0o600, "the key file is readable by its owner alone");
      // Saved now, before the rotation: the retired key a thief might later hold.
      const [oldSeed, ...more] = admin.seeds();
      assert.ok(oldSeed && more.length === 0, "init wrote exactly one private key");
      const oldKid = keyId(oldSeed);
      const published = admin.publicKeys();
      assert.equal(published, publicKeyHex(oldSeed));
      const token = admin.create("rot-svc", "--scopes", "orders:read");

      w = await startWorker({ origin, environment: ENV, vars: { TOKENGATE_TRUSTED_KEYS: published } });
      const instance = w.mf;
      const pushW = () => admin.ok("push", "worker", "--url", `http://127.0.0.1:${w.port}`);
      const callW = (t) => w.gate("GET", "/api/orders/1", { headers: [["authorization", `Bearer ${t}`]] });
      const trusted = async () => (await w.status()).keys.slice().sort();
      const states = () => admin.keyList().map((k) => [k.key_id, k.state]).sort();

      pushW();
      assert.equal((await callW(token)).status, 200);
      assert.deepEqual(await trusted(), [oldKid]);

      // Rotate: a second key appended to the key file, both published, the push signed by both.
      admin.ok("key", "rotate", "--reason", "scheduled rotation");
      const seeds = admin.seeds();
      assert.equal(seeds.length, 2, "rotate adds one key to the key file");
      assert.ok(seeds.includes(oldSeed), "rotate kept the old key");
      const newSeed = seeds.find((s) => s !== oldSeed);
      const newKid = keyId(newSeed);
      assert.deepEqual(states(), [[oldKid, "active"], [newKid, "active"]].sort());
      assert.deepEqual(keysIn(admin.publicKeys()).sort(), [publicKeyHex(oldSeed), publicKeyHex(newSeed)].sort());
      pushW();
      assert.deepEqual(await trusted(), [oldKid, newKid].sort());
      assert.equal((await callW(token)).status, 200);

      // Retire the old key: only the new one is published, the push is signed by it alone.
      admin.ok("key", "retire", oldKid, "--reason", "rotation done");
      assert.deepEqual(states(), [[oldKid, "retired"], [newKid, "active"]].sort());
      assert.deepEqual(keysIn(admin.publicKeys()), [publicKeyHex(newSeed)]);
      pushW();
      assert.deepEqual(await trusted(), [newKid]);
      assert.equal((await callW(token)).status, 200);
      await sleep(CACHE_TTL_MS + 500);
      assert.equal((await callW(token)).status, 200, "the token still passes after the cache bound");

      // The retired key, signing a newer bundle that grants a new token everything: refused.
      const served = await w.served();
      const rogue = makeToken();
      const forged = (keys) =>
        publish(bundle({ version: served.version + 1, environment: ENV, tokens: [record("rogue", rogue, ["*"])], keys }), [oldSeed]);
      const refusal = [[401, "invalid_signature"]];
      await assertRefused(w, "retired key", () => w.push(forged([publicKeyHex(oldSeed)]), { seeds: [oldSeed] }), refusal);
      await assertRefused(
        w,
        "retired key, listing the new key too",
        () => w.push(forged([publicKeyHex(oldSeed), publicKeyHex(newSeed)]), { seeds: [oldSeed] }),
        refusal,
      );
      assert.equal((await w.status()).version, served.version, "the served version moved");
      assert.equal((await callW(rogue)).status, 401);
      assert.equal((await callW(token)).status, 200);

      // Nothing was restarted: the same instance, its variable still the first `key public`.
      assert.equal(w.mf, instance);
      assert.equal(w.bindings.TOKENGATE_TRUSTED_KEYS, published);
      // And the CLI never printed a private key.
      const printed = admin.outputs.join("\n");
      for (const seed of [oldSeed, newSeed]) assert.ok(!printed.includes(seed), "the CLI printed a private key");
      assertNoPlaintext(await w.snapshot(), [token, rogue, oldSeed, newSeed]);
    } finally {
      fs.rmSync(admin.dir, { recursive: true, force: true });
      await w?.dispose();
    }
  });
}
