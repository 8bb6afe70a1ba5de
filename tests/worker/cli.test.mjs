// The real `tokengate` CLI against the Worker in workerd: `tokengate push worker` signs (with
// every published Ed25519 key) and sends what the store holds, in either form the push
// protocol allows (an inline bundle, or a manifest and exactly the pages the Worker asks for,
// each matching its signed digest), reports every refusal clearly, and an admin key rotation
// reaches the Worker by pushes alone. The Worker is given only what `tokengate key public`
// prints. `tokengate status` tells whether the Worker serves this store's last push, `push
// worker --bundle` sends a bundle file byte for byte, a revoke never waits for a push in
// flight, and a plain-http URL whose host only looks like loopback is refused before anything
// is signed.
import { spawn, spawnSync } from "node:child_process";
import fs from "node:fs";
import os from "node:os";
import path from "node:path";
import {
  assert,
  assertNoPlaintext,
  assertRefused,
  BUNDLE_PATH,
  CACHE_TTL_MS,
  headerValues,
  Relay,
  ROOT,
  sleep,
  startWorker,
} from "./lib/harness.mjs";
import { bundle, keyId, makeToken, publicKeyHex, publish, record, sha256Hex } from "./lib/bundle.mjs";

const ENV = "staging";
export const CLI = process.env.TOKENGATE_BIN ?? path.join(ROOT, "target/debug/tokengate");

/**
 * What a client sent through a Relay, checked against the push protocol: every POST is a
 * bundle (the bundle path, no query) or a page request (`?version=V&page=I`); an inline
 * bundle goes alone; after a paged bundle's manifest, each page sent is of its version, one
 * the Worker's last answer to that manifest listed as missing, not sent twice, and its body's
 * SHA-256 is the manifest's digest for that index. Returns { form: "inline" | "paged",
 * version, posts, pages (indices sent), final (the last POST's status and answer) }.
 */
function checkProtocol(requests) {
  const posts = requests.filter((r) => r.method === "POST");
  assert.ok(posts.length >= 1, "nothing was pushed");
  let manifest = null;
  let missing = new Set();
  let form = null;
  const pages = [];
  for (const p of posts) {
    if (p.path === BUNDLE_PATH) {
      const payload = JSON.parse(p.body.toString("utf8")).payload;
      const paged = !Array.isArray(payload.tokens);
      assert.ok(form === null || form === (paged ? "paged" : "inline"), "one push mixed inline and paged bundles");
      form = paged ? "paged" : "inline";
      manifest = payload;
      const answer = JSON.parse(p.answer ?? "null");
      missing = new Set(p.status === 202 && Array.isArray(answer?.missing) ? answer.missing : []);
      continue;
    }
    const m = p.path.match(/^\/\.well-known\/tokengate\/bundle\?version=(\d+)&page=(\d+)$/);
    assert.ok(m, `a POST to ${p.path}`);
    assert.ok(manifest && form === "paged", `a page request before any paged bundle: ${p.path}`);
    const [version, index] = [Number(m[1]), Number(m[2])];
    assert.equal(version, manifest.version, `a page of version ${version} while pushing ${manifest.version}`);
    assert.ok(missing.has(index), `page ${index} was sent but not asked for`);
    missing.delete(index);
    assert.equal(sha256Hex(p.body), manifest.tokens.pages[index], `page ${index}'s body is not the page the manifest signed`);
    pages.push(index);
  }
  if (form === "inline") assert.equal(posts.length, 1, "an inline bundle took several requests");
  // The request that committed (200), else the last one. Page requests run 4 at a time: the
  // committing one is not always the last to finish.
  const committed = posts.filter((p) => p.status === 200);
  assert.ok(committed.length <= 1, `${committed.length} requests committed one push`);
  const last = committed[0] ?? posts.at(-1);
  return { form, version: manifest.version, posts: posts.length, pages, final: { status: last.status, json: JSON.parse(last.answer ?? "null") } };
}

/** The public keys in a TOKENGATE_TRUSTED_KEYS text (commas and/or white space). */
const keysIn = (text) => text.split(/[\s,]+/).filter(Boolean);

/**
 * A store in a temporary directory. Its private key is made by `init` into the key file (the
 * store path with ".key" for ".db") unless `signingKey` is given, as TOKENGATE_SIGNING_KEY,
 * or `keyFile`, an existing key file (another store's) that `init --key-file` adopts and
 * every later command is given as TOKENGATE_SIGNING_KEY_FILE.
 */
export function operator({ environment = ENV, signingKey = null, keyFile: adopted = null } = {}) {
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
  /**
   * Starts a command without waiting for it: { child, stderr() (so far), exited (a promise of
   * {status, stdout, stderr, ms}; the command is killed, status null, after `timeoutMs`) }.
   */
  const start = (args, { timeoutMs = 120_000 } = {}) => {
    const began = Date.now();
    const child = spawn(CLI, args, { env, stdio: ["ignore", "pipe", "pipe"] });
    let stdout = "";
    let stderr = "";
    child.stdout.setEncoding("utf8").on("data", (c) => (stdout += c));
    child.stderr.setEncoding("utf8").on("data", (c) => (stderr += c));
    const timer = setTimeout(() => child.kill("SIGKILL"), timeoutMs);
    const exited = new Promise((resolve, reject) => {
      child.on("error", reject);
      child.on("close", (status) => {
        clearTimeout(timer);
        outputs.push(stdout, stderr);
        resolve({ status, stdout, stderr, ms: Date.now() - began });
      });
    });
    return { child, stderr: () => stderr, exited };
  };
  ok("init", "--environment", environment, ...(adopted ? ["--key-file", adopted] : []));
  if (adopted) env.TOKENGATE_SIGNING_KEY_FILE = adopted;
  const keyFile = adopted ?? path.join(dir, "tokengate.key");
  /** `tokengate audit --json`: every event, oldest first. */
  const audit = () => JSON.parse(ok("audit", "--json", "--limit", "1000000").stdout);
  return {
    dir,
    keyFile,
    outputs,
    run,
    ok,
    start,
    audit,
    /** Bundle versions the store has taken: its `bundle.version` audit events. */
    versionsTaken: () => audit().filter((e) => e.action === "bundle.version").length,
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
      vars: { TOKENGATE_TRUSTED_KEYS: op.publicKeys() },
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

  suite.test("push worker speaks the push protocol (inline, or a manifest and only the pages asked for); a revoke then writes one page", async () => {
    const tokens = [];
    for (let i = 0; i < 10; i++) tokens.push(op.create(`bulk-${i}`));
    issued.push(...tokens);
    const through = async () => {
      const relay = await new Relay(worker.port).start();
      try {
        // Run asynchronously: the relay lives in this process's event loop.
        const out = await op.start(["push", "worker", "--url", relay.url], { timeoutMs: 60_000 }).exited;
        assert.equal(out.status, 0, `push worker: exit ${out.status}: ${out.stderr}`);
        return checkProtocol(relay.requests);
      } finally {
        await relay.close();
      }
    };
    const first = await through();
    assert.equal(first.final.status, 200, JSON.stringify(first.final));
    assert.equal((await worker.status()).version, first.version);
    await eventually(async () => (await call(tokens[9])).status === 200, CACHE_TTL_MS + 2000, "last token served");

    // One token revoked: one page changes, so the Worker stores one page and no other.
    op.ok("revoke", "bulk-3", "--reason", "e2e");
    const before = new Set(await worker.keys("page:"));
    const second = await through();
    assert.equal(second.final.status, 200, JSON.stringify(second.final));
    const added = (await worker.keys("page:")).filter((k) => !before.has(k));
    assert.equal(added.length, 1, `pages written for one revoke: ${added.length}`);
    if (second.form === "paged") assert.equal(second.pages.length, 1, `pages sent for one revoke: ${second.pages}`);
    else assert.equal(second.final.json.written, 1);
    assert.equal((await call(tokens[3])).status, 401);
    assert.equal((await call(tokens[4])).status, 200);
    assertNoPlaintext(await worker.snapshot(), issued);
    return `${first.form}: ${first.posts} and ${second.posts} requests`;
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

  /** A second operator and Worker for one test, removed afterwards whatever happens. */
  const withGate = async (fn, { vars = {} } = {}) => {
    const admin = operator();
    const stores = [admin];
    let w;
    try {
      w = await startWorker({ origin, environment: ENV, vars: { TOKENGATE_TRUSTED_KEYS: admin.publicKeys(), ...vars } });
      const another = (options) => {
        const o = operator(options);
        stores.push(o);
        return o;
      };
      return await fn({ admin, w, url: `http://127.0.0.1:${w.port}`, another });
    } finally {
      for (const o of stores) fs.rmSync(o.dir, { recursive: true, force: true });
      await w?.dispose();
    }
  };

  suite.test("status --worker-url: current (exit 0) after this store's push; behind (exit 1) once another store with the same key pushed", async () => {
    // What an operator checks after a push, and what warns them that the Worker no longer
    // serves their last push because someone pushed from another store.
    await withGate(async ({ admin, w, url: u, another }) => {
      admin.create("status-a", "--scopes", "orders:read");
      admin.ok("push", "worker", "--url", u);
      const mine = (await w.status()).version;
      assert.ok(mine > 0, "the Worker serves no version after the push");
      const current = admin.run("status", "--worker-url", u);
      assert.equal(current.status, 0, `status: ${current.stdout}${current.stderr}`);
      assert.match(current.stdout, new RegExp(`worker\\s+${u}\\s+version ${mine}\\s+version ${mine}\\s+current`));
      assert.doesNotMatch(current.stdout, /behind/);
      const currentJson = admin.run("status", "--worker-url", u, "--json");
      assert.equal(currentJson.status, 0, currentJson.stderr);
      assert.deepEqual(JSON.parse(currentJson.stdout), [
        { target: "worker", gate: u, serves: mine, last_pushed: mine, current: true },
      ]);

      // A second store adopting the first one's key file: the same published key.
      const other = another({ keyFile: admin.keyFile });
      assert.equal(other.publicKeys(), admin.publicKeys(), "init --key-file did not adopt the key");
      assert.ok(!fs.existsSync(path.join(other.dir, "tokengate.key")), "init made a key of its own");
      // Its versions count from 1: take versions until its next one is newer than the served one.
      while (other.versionsTaken() < mine) other.ok("bundle", "--target", "worker", "--out", path.join(other.dir, "skipped.json"));
      other.create("status-b");
      other.ok("push", "worker", "--url", u);
      const theirs = (await w.status()).version;
      assert.ok(theirs > mine, `the second store's push was not served (${theirs})`);

      const behind = admin.run("status", "--worker-url", u);
      assert.equal(behind.status, 1, `status when behind: exit ${behind.status}: ${behind.stdout}${behind.stderr}`);
      assert.match(behind.stdout, new RegExp(`worker\\s+${u}\\s+version ${theirs}\\s+version ${mine}\\s+behind`));
      const behindJson = admin.run("status", "--worker-url", u, "--json");
      assert.equal(behindJson.status, 1, behindJson.stderr);
      assert.deepEqual(JSON.parse(behindJson.stdout), [
        { target: "worker", gate: u, serves: theirs, last_pushed: mine, current: false },
      ]);
      // The store that pushed last is current.
      const theirStatus = other.run("status", "--worker-url", u, "--json");
      assert.equal(theirStatus.status, 0, theirStatus.stderr);
      assert.equal(JSON.parse(theirStatus.stdout)[0].current, true);
    });
  });

  suite.test("push worker --bundle: a worker bundle made earlier is sent byte for byte; an envoy bundle is refused before anything is sent", async () => {
    // The two-step release: sign a bundle (reviewed, archived), push exactly that file later.
    await withGate(async ({ admin, w }) => {
      const relay = await new Relay(w.port).start();
      try {
        const before = admin.create("bundled", "--scopes", "orders:read");
        const file = path.join(admin.dir, "release.json");
        admin.ok("bundle", "--target", "worker", "--out", file);
        const bytes = fs.readFileSync(file);
        const version = JSON.parse(bytes).payload.version;
        // Created after the bundle was signed: a push of a fresh bundle would let it pass.
        const after = admin.create("after-bundle", "--scopes", "orders:read");
        const taken = admin.versionsTaken();

        // Run asynchronously: the relay lives in this process's event loop.
        const out = await admin.start(["push", "worker", "--url", relay.url, "--bundle", file], { timeoutMs: 60_000 }).exited;
        assert.equal(out.status, 0, `push worker --bundle: exit ${out.status}: ${out.stderr}`);
        assert.match(out.stderr, new RegExp(`pushed bundle version ${version}\\b`));
        // The bundle itself (page requests aside, if the file is a paged bundle) byte for byte.
        const posts = relay.requests.filter((r) => r.method === "POST" && r.path === BUNDLE_PATH);
        assert.ok(posts.length >= 1, "nothing was pushed");
        for (const p of posts) assert.ok(p.body.equals(bytes), "the pushed body is not the bundle file's bytes");
        checkProtocol(relay.requests);
        assert.equal((await w.status()).version, version);
        assert.equal(admin.versionsTaken(), taken, "push --bundle took a new version");
        const callW = (t) => w.gate("GET", "/api/orders/1", { headers: [["authorization", `Bearer ${t}`]] });
        assert.equal((await callW(before)).status, 200);
        assert.equal((await callW(after)).status, 401, "a token not in the bundle passes");
        const status = admin.run("status", "--worker-url", `http://127.0.0.1:${w.port}`, "--json");
        assert.equal(status.status, 0, `status after push --bundle: ${status.stdout}${status.stderr}`);
        assert.deepEqual(
          JSON.parse(status.stdout).map((r) => [r.serves, r.last_pushed, r.current]),
          [[version, version, true]],
          "push --bundle is not recorded as this store's last push",
        );

        // A bundle for Envoy (newer, same keys and environment): refused by the CLI alone.
        const envoyFile = path.join(admin.dir, "envoy.json");
        admin.ok("bundle", "--target", "envoy", "--out", envoyFile);
        const sent = relay.requests.length;
        const served = await w.served();
        const kv = await w.snapshot();
        const refused = await admin.start(["push", "worker", "--url", relay.url, "--bundle", envoyFile], { timeoutMs: 60_000 })
          .exited;
        assert.equal(refused.status, 2, `push of an envoy bundle: exit ${refused.status}: ${refused.stderr}`);
        assert.match(refused.stderr, /gate would refuse/);
        assert.match(refused.stderr, /envoy/);
        assert.equal(relay.requests.length, sent, "the CLI sent a request for a bundle it should refuse");
        assert.deepEqual(await w.served(), served, "what the Worker serves changed");
        assert.deepEqual(await w.snapshot(), kv, "KV changed");
      } finally {
        await relay.close();
      }
    });
  });

  suite.test("a revoke during a long push worker exits 0 at once (the store is not locked while the bundle travels); the push finishes", async () => {
    // Incident response: a leaked token must be revoked now, even while a big push is running.
    // The push goes through a relay that holds every POST 3 s (a slow link), so it is still
    // travelling while the revoke runs.
    const TOKENS = 20;
    return withGate(async ({ admin, w, url: u }) => {
      const relay = await new Relay(w.port, { delayMs: 3000 }).start();
      try {
        const leaked = admin.create("leaked", "--scopes", "orders:read");
        let last;
        for (let i = 0; i < TOKENS; i++) last = admin.create(`load-${i}`, "--scopes", "orders:read");
        const pushing = admin.start(["push", "worker", "--url", relay.url], { timeoutMs: 60_000 });
        let ended = null;
        pushing.exited.then((r) => (ended = r));
        // Once the relay holds a first POST, the bundle is signed and on its way.
        await eventually(async () => ended !== null || relay.requests.some((r) => r.method === "POST"), 20_000, "the push's first request");
        assert.equal(ended, null, `the push ended before a revoke could overlap it: ${ended?.stderr}`);

        const revoke = await admin.start(["revoke", "leaked", "--reason", "incident"], { timeoutMs: 5_000 }).exited;
        assert.equal(revoke.status, 0, `revoke during a push: exit ${revoke.status} after ${revoke.ms} ms: ${revoke.stderr}`);
        assert.ok(revoke.ms < 5_000, `revoke took ${revoke.ms} ms`);
        assert.doesNotMatch(revoke.stderr, /waiting for another tokengate command/);
        assert.equal(ended, null, "the push was over before the revoke returned: nothing overlapped");

        const push = await pushing.exited;
        assert.equal(push.status, 0, `the push during which a revoke ran: exit ${push.status}: ${push.stderr}`);
        const sent = checkProtocol(relay.requests);
        assert.equal(sent.final.status, 200);
        const callW = (t) => w.gate("GET", "/api/orders/1", { headers: [["authorization", `Bearer ${t}`]] });
        assert.equal((await callW(last)).status, 200);
        // The push carried the bundle signed before the revoke: the leaked token still passes.
        assert.equal((await callW(leaked)).status, 200);

        // The next push carries the revocation.
        admin.ok("push", "worker", "--url", u);
        await eventually(async () => (await callW(leaked)).status === 401, CACHE_TTL_MS + 2000, "401 for the revoked token");
        return `revoke ${revoke.ms} ms during a ${push.ms} ms push of ${sent.posts} requests (${sent.form})`;
      } finally {
        await relay.close();
      }
    });
  });

  suite.test("push worker retries a busy Worker (503, 429 with Retry-After); a push killed mid-way is resumed by the next one, which sends only the pages the Worker lacks", async () => {
    const TOKENS = 600; // 600 lookup records: 4 pages
    return withGate(async ({ admin, w }) => {
      for (let i = 0; i < TOKENS; i++) admin.create(`fleet-${i}`, "--scopes", "orders:read");
      // A busy Worker first: the bundle request is answered 503, then 429, then let through.
      let busy = 0;
      const pageRequest = (seen) => seen.method === "POST" && seen.path.includes("?version=");
      let held = null;
      const relay = await new Relay(w.port, {
        answer: (seen) => {
          if (seen.method !== "POST" || pageRequest(seen) || busy >= 2) return null;
          busy += 1;
          const status = busy === 1 ? 503 : 429;
          const body = JSON.stringify({ error: "temporarily_unavailable", error_description: "busy" });
          return { status, headers: { "retry-after": "1", "content-type": "application/json" }, body };
        },
        // The link dies after the first page: every later page request hangs.
        hold: (seen) => {
          if (!pageRequest(seen)) return false;
          held ??= seen.path;
          return seen.path !== held;
        },
      }).start();
      try {
        const pushing = admin.start(["push", "worker", "--url", relay.url], { timeoutMs: 60_000 });
        await eventually(async () => (await w.served()).pending?.remaining === 3, 20_000, "one page of four stored");
        await sleep(300); // the other page requests are in flight and held
        pushing.child.kill("SIGKILL");
        const killed = await pushing.exited;
        assert.equal(killed.status, null, "the push was killed");
        assert.match(killed.stderr, /retrying in/, "the CLI did not say it retried");
        assert.equal(busy, 2);
        const first = relay.requests.filter((r) => r.method === "POST" && !pageRequest(r));
        assert.deepEqual(first.map((r) => r.status), [503, 429, 202], "the bundle request was not retried until accepted");
        const pending = (await w.served()).pending;
        assert.equal(pending.remaining, 3);
      } finally {
        await relay.close();
      }
      // The next push (a newer version, the same pages) sends only the three pages the
      // Worker lacks, and reports what it serves.
      const again = await new Relay(w.port).start();
      try {
        const out = await admin.start(["push", "worker", "--url", again.url], { timeoutMs: 60_000 }).exited;
        assert.equal(out.status, 0, `the resumed push: exit ${out.status} after ${out.ms} ms: ${out.stderr}`);
        const sent = checkProtocol(again.requests);
        assert.equal(sent.form, "paged");
        assert.equal(sent.pages.length, 3, `the resumed push sent ${sent.pages.length} pages`);
        assert.equal(sent.final.status, 200);
        assert.match(out.stderr, /3 of 4 pages to send \(1 already on the Worker\)/);
        const served = await w.served();
        assert.deepEqual([served.version, served.tokens, served.pending], [sent.version, TOKENS, null]);
        assert.match(out.stderr, new RegExp(`pushed bundle version ${sent.version}; the Worker at .* serves it`));
      } finally {
        await again.close();
      }
      return "503 and 429 retried; killed after 1 of 4 pages; the next push sent 3";
    });
  });

  suite.test("push worker to http://localhost.evil.com or http://127.0.0.1.evil.com: refused (https) before a version is taken", async () => {
    // A loopback-looking name is not loopback: plain http there would expose the push.
    const taken = op.versionsTaken();
    const lastEvent = op.audit().at(-1).id;
    const served = await worker.served();
    for (const bad of ["http://localhost.evil.com", "http://127.0.0.1.evil.com"]) {
      const out = op.run("push", "worker", "--url", bad);
      assert.equal(out.status, 2, `push worker --url ${bad}: exit ${out.status}: ${out.stderr}`);
      assert.match(out.stderr, /https/, bad);
    }
    assert.equal(op.versionsTaken(), taken, "a refused push took a bundle version");
    assert.equal(op.audit().at(-1).id, lastEvent, "a refused push left an audit event");
    assert.deepEqual(await worker.served(), served);
  });
}
