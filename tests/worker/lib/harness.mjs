// The test harness: a tiny runner, the echo origin (with a JWKS route), and the Worker under
// real workerd through Miniflare, reached over raw HTTP so requests arrive byte for byte.
import assert from "node:assert/strict";
import fs from "node:fs";
import http from "node:http";
import net from "node:net";
import path from "node:path";
import { fileURLToPath } from "node:url";
import { Miniflare } from "miniflare";
import { nowSecs, publicKeyHex, pushSignature } from "./bundle.mjs";

export { assert };
export const ROOT = path.resolve(path.dirname(fileURLToPath(import.meta.url)), "../../..");
/** The `wrangler deploy --dry-run` output: exactly what would be uploaded. */
export const DIST = process.env.TOKENGATE_WORKER_DIST ?? path.join(ROOT, "target/worker-dist");
export const BUNDLE_PATH = "/.well-known/tokengate/bundle";
export const STATUS_PATH = "/.well-known/tokengate/status";
/** The Worker's in-isolate cache bound (worker/src/served.rs CACHE_TTL_MS). */
export const CACHE_TTL_MS = 5000;

// --- the runner ------------------------------------------------------------------------
/** One test module: tests run in order, between its `before` and `after` hooks. */
export class Suite {
  constructor(name) {
    Object.assign(this, { name, tests: [], befores: [], afters: [] });
  }
  /** Registers a test; `fn` throws (an AssertionError or anything) to fail. */
  test(name, fn) {
    this.tests.push({ name, fn });
  }
  before(fn) {
    this.befores.push(fn);
  }
  after(fn) {
    this.afters.push(fn);
  }
}
export const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

// --- the origin ------------------------------------------------------------------------
/**
 * Echoes what reached it as JSON; serves a JWKS at /cdn-cgi/access/certs, and answers 500 at
 * /failing/certs (counted in `failingFetches`). 127.0.0.1 only.
 */
export class Origin {
  requests = [];
  jwks = { keys: [] };
  jwksFetches = 0;
  failingFetches = 0;

  async start() {
    this.server = http.createServer((req, res) => {
      if (req.url === "/failing/certs") {
        this.failingFetches += 1;
        res.statusCode = 500;
        res.end("certs are down");
        return;
      }
      if (req.url === "/cdn-cgi/access/certs") {
        this.jwksFetches += 1;
        res.setHeader("content-type", "application/json");
        res.end(JSON.stringify(this.jwks));
        return;
      }
      const seen = { method: req.method, path: req.url, headers: pairs(req.rawHeaders) };
      this.requests.push(seen);
      req.resume();
      req.on("end", () => {
        res.setHeader("content-type", "application/json");
        res.setHeader("x-origin-echo", "1");
        res.end(JSON.stringify(seen));
      });
    });
    await new Promise((resolve) => this.server.listen(0, "127.0.0.1", resolve));
    this.url = `http://127.0.0.1:${this.server.address().port}`;
    return this;
  }

  close() {
    return new Promise((resolve) => this.server.close(resolve));
  }
}

/**
 * A plain HTTP relay on 127.0.0.1 in front of a Worker (`port`): passes every request on
 * unchanged and records it ({method, path, body: the exact bytes, then status and answer: the
 * Worker's status code and body text once it answered}), so a test sees what a client sent,
 * byte for byte, what it was told, or that it sent nothing at all. `delayMs` holds every POST
 * that long before passing it on (a slow network: a push stays in flight).
 */
export class Relay {
  requests = [];

  /**
   * `hold(seen)`: true keeps that request unanswered until the relay closes (a link that
   * died mid-push); `answer(seen)`: an {status, headers, body} to answer instead of passing
   * the request on (a Worker that is busy), or null.
   */
  constructor(port, { delayMs = 0, hold = () => false, answer = () => null } = {}) {
    this.port = port;
    this.delayMs = delayMs;
    this.hold = hold;
    this.answer = answer;
  }

  async start() {
    this.server = http.createServer((req, res) => {
      const chunks = [];
      req.on("data", (c) => chunks.push(c));
      req.on("end", async () => {
        const body = Buffer.concat(chunks);
        const seen = { method: req.method, path: req.url, body, status: null, answer: null };
        this.requests.push(seen);
        if (this.hold(seen)) return;
        const instead = this.answer(seen);
        if (instead) {
          seen.status = instead.status;
          seen.answer = instead.body ?? "";
          res.writeHead(instead.status, instead.headers ?? {});
          res.end(instead.body ?? "");
          return;
        }
        if (this.delayMs > 0 && req.method === "POST") await sleep(this.delayMs);
        const upstream = http.request(
          { host: "127.0.0.1", port: this.port, method: req.method, path: req.url, headers: req.headers, agent: false },
          (answer) => {
            const parts = [];
            answer.on("data", (c) => parts.push(c));
            answer.on("end", () => {
              const bytes = Buffer.concat(parts);
              seen.status = answer.statusCode;
              seen.answer = bytes.toString("utf8");
              res.writeHead(answer.statusCode, answer.headers);
              res.end(bytes);
            });
          },
        );
        upstream.on("error", (e) => {
          res.statusCode = 502;
          res.end(`relay: ${e.message}`);
        });
        upstream.end(body);
      });
    });
    await new Promise((resolve) => this.server.listen(0, "127.0.0.1", resolve));
    this.url = `http://127.0.0.1:${this.server.address().port}`;
    return this;
  }

  close() {
    this.server.closeAllConnections();
    return new Promise((resolve) => this.server.close(resolve));
  }
}

function pairs(flat) {
  const out = [];
  for (let i = 0; i < flat.length; i += 2) out.push([flat[i], flat[i + 1]]);
  return out;
}

/** All values of a header (any case) in a list of pairs. */
export function headerValues(list, name) {
  return list.filter(([n]) => n.toLowerCase() === name.toLowerCase()).map(([, v]) => v);
}

function compatibilityDate() {
  const toml = fs.readFileSync(path.join(ROOT, "wrangler.toml"), "utf8");
  const m = toml.match(/^compatibility_date\s*=\s*"([^"]+)"/m);
  if (!m) throw new Error("wrangler.toml has no compatibility_date");
  return m[1];
}

// --- the Worker ------------------------------------------------------------------------
/** The Worker's Durable Object binding and class (wrangler.toml): the push state. */
export const STATE_BINDING = "TOKENGATE_STATE";
export const STATE_CLASS = "GateState";

/**
 * The Rate Limiting binding the Worker counts `requests` per minute with (worker/src/limits.rs):
 * one binding per limit, its limit and period fixed in wrangler.toml.
 */
export const rateBindingName = (requests) => `TOKENGATE_RATE_${requests}_PER_MINUTE`;

/**
 * The `ratelimits` option of `startWorker` for limits of these many requests per minute:
 * { TOKENGATE_RATE_<n>_PER_MINUTE: { limit: n, period: 60 } } for each n.
 */
export const perMinuteBindings = (counts) =>
  Object.fromEntries([...new Set(counts)].map((n) => [rateBindingName(n), { limit: n, period: 60 }]));

/** The path of a page request: the pending push `version`'s page `index`. */
export const pageTarget = (version, index) => `${BUNDLE_PATH}?version=${version}&page=${index}`;

/**
 * Starts the bundled Worker in workerd with a fresh, empty KV namespace and a fresh Durable
 * Object (SQLite-backed, in memory) for its push state. Requests go to workerd's own socket
 * for the Worker (Miniflare's `unsafeDirectSockets`), not through Miniflare's JavaScript entry
 * worker, whose `new URL()` would normalise paths first.
 *
 * `keys`: the admin's private seeds (64 hex) the tests sign with; the Worker is given only
 * their public keys, as the plain variable TOKENGATE_TRUSTED_KEYS (or `trusted`, public keys
 * given directly, when the test does not hold the seeds; `vars` overrides either).
 *
 * `peer`: also start the same script a second time as another Worker in the same workerd (its
 * own isolate, so its own in-isolate caches), bound to the same KV namespace and the same
 * Durable Object: what a second Cloudflare location sees. It is `worker.peer`, a Worker of its
 * own (same seeds) whose KV and Durable Object are the first one's.
 *
 * `ratelimits`: Workers Rate Limiting bindings, binding name → { limit, period } (period 10
 * or 60 s, as on Cloudflare; `perMinuteBindings` makes the ones the Worker looks for).
 * Miniflare counts in memory, per binding and per Worker (a peer counts on its own, as
 * another Cloudflare location does), in windows aligned to the epoch, and forgets every
 * count of a binding when its window changes. The peer has the same bindings, or
 * `peerRatelimits` (a location deployed with other bindings, or one removed since).
 *
 * `secrets`: Worker secrets, name → text (what `wrangler secret put` gives, e.g.
 * TOKENGATE_ISSUER_SECRETS): in Miniflare plain string bindings, which `env.secret()` reads.
 * They are in `worker.bindings` too, so `heldBy` counts them as held.
 */
export async function startWorker({
  origin,
  keys = [],
  trusted,
  environment,
  vars = {},
  peer = false,
  ratelimits = {},
  peerRatelimits = ratelimits,
  secrets = {},
}) {
  const script = path.join(DIST, "index.js");
  if (!fs.existsSync(script)) {
    throw new Error(`no bundled Worker at ${script}: build it first: scripts/worker.sh bundle`);
  }
  const logs = [];
  const errors = []; // the lines logged at level "error" (console.error), also in `logs`
  const bindings = {
    ORIGIN_URL: origin.url,
    TOKENGATE_ENVIRONMENT: environment,
    TOKENGATE_TRUSTED_KEYS: (trusted ?? keys.map(publicKeyHex)).join(","),
    ...vars,
    ...secrets,
  };
  const names = ["tokengate", "tokengate-peer"];
  const one = (name) => ({
    name,
    modules: true,
    modulesRoot: DIST,
    scriptPath: script,
    modulesRules: [{ type: "CompiledWasm", include: ["**/*.wasm"] }],
    compatibilityDate: compatibilityDate(),
    // One namespace id for both Workers: the peer reads what the first one wrote.
    kvNamespaces: { TOKENGATE: "TOKENGATE" },
    // The class lives in the first Worker; the peer's binding names that Worker's class, so
    // both talk to the one object named "tokengate".
    durableObjects: {
      [STATE_BINDING]: { className: STATE_CLASS, useSQLite: true, ...(name === names[0] ? {} : { scriptName: names[0] }) },
    },
    bindings,
    ...rateLimiting(name === names[0] ? ratelimits : peerRatelimits),
    unsafeDirectSockets: [{ host: "127.0.0.1", port: 0 }],
  });
  const shared = {
    structuredWorkerdLogs: true,
    handleStructuredLogs: ({ message, level }) => {
      logs.push(message);
      if (level === "error") errors.push(message);
    },
  };
  const mf = new Miniflare(peer ? { ...shared, workers: names.map(one) } : { ...shared, ...one(names[0]) });
  await mf.ready;
  const direct = await mf.unsafeGetDirectURL(names[0]);
  const worker = new Worker(mf, Number(direct.port), logs, keys, bindings);
  Object.assign(worker, { errors, ratelimits });
  if (peer) {
    const second = await mf.unsafeGetDirectURL(names[1]);
    worker.peer = new Worker(mf, Number(second.port), logs, keys, bindings, { shared: true });
    Object.assign(worker.peer, { errors, ratelimits: peerRatelimits });
  }
  return worker;
}

/** Miniflare's `ratelimits` option, { NAME: { simple: { limit, period } } }, if any binding. */
function rateLimiting(ratelimits) {
  if (Object.keys(ratelimits).length === 0) return {};
  const out = {};
  for (const [name, { limit, period }] of Object.entries(ratelimits)) {
    // Miniflare's binding has no default period: without one every call would throw.
    if (!Number.isInteger(limit) || limit < 1 || ![10, 60].includes(period)) {
      throw new Error(`rate limit binding ${name}: limit ${limit}, period ${period} (a period of 10 or 60 s)`);
    }
    out[name] = { simple: { limit, period } };
  }
  return { ratelimits: out };
}

let rays = 0;

export class Worker {
  /**
   * `seeds`: the private keys pushes are signed with by default; `bindings`: what it was
   * given; `shared`: a peer, whose Miniflare instance (and so KV) is another Worker's.
   */
  constructor(mf, port, logs, seeds, bindings, { shared = false } = {}) {
    Object.assign(this, { mf, port, logs, seeds, bindings, shared });
  }

  dispose() {
    // A peer lives and dies with the Worker that started it.
    return this.shared ? Promise.resolve() : this.mf.dispose();
  }

  /**
   * One raw HTTP/1.1 request: the method, path and header pairs go out exactly as given
   * (repeats and case included). Returns { status, headers: [[n, v]], body }.
   */
  request(method, target, { headers = [], body = null, host = "api.internal", raw = false } = {}) {
    const payload = body === null ? null : Buffer.from(body);
    let head = `${method} ${target} HTTP/1.1\r\nHost: ${host}\r\n`;
    for (const [n, v] of headers) head += `${n}: ${v}\r\n`;
    // `raw`: the caller's headers frame the body (e.g. a Content-Length that lies).
    if (payload && !raw) head += `Content-Length: ${payload.length}\r\n`;
    head += "Connection: close\r\n\r\n";
    return new Promise((resolve, reject) => {
      const chunks = [];
      let done = false;
      const finish = (error, value) => {
        if (done) return;
        done = true;
        socket.destroy();
        if (error) reject(error);
        else resolve(value);
      };
      const socket = net.connect(this.port, "127.0.0.1", () => {
        socket.write(Buffer.from(head, "latin1"));
        if (payload) socket.write(payload);
      });
      socket.setTimeout(30_000, () => finish(new Error(`${method} ${target}: timed out`)));
      // workerd keeps the connection open despite "Connection: close": answer as soon as
      // the response is complete instead of waiting for its idle timeout.
      socket.on("data", (c) => {
        chunks.push(c);
        const complete = completeResponse(Buffer.concat(chunks), method);
        if (complete) finish(null, complete);
      });
      // A server may answer early (a 413) and reset the connection while the body is still
      // being written: the answer, if it arrived whole, is what counts.
      socket.on("error", (e) => {
        const answered = completeResponse(Buffer.concat(chunks), method);
        finish(answered ? null : e, answered);
      });
      socket.on("end", () => {
        try {
          finish(null, parseResponse(Buffer.concat(chunks)));
        } catch (e) {
          finish(e);
        }
      });
    });
  }

  /** A gate request tagged with a fresh cf-ray, so its log line (and reason) can be found. */
  async gate(method, target, { headers = [], host = "api.internal" } = {}) {
    const ray = `t${process.pid}x${++rays}`;
    const res = await this.request(method, target, { headers: [...headers, ["cf-ray", ray]], host });
    res.ray = ray;
    return res;
  }

  /** The Worker's decision log line for a ray, parsed into fields (waits up to 2 s). */
  async decision(ray) {
    for (let i = 0; i < 100; i++) {
      const line = this.logs.find((l) => l.startsWith("tokengate status=") && l.endsWith(`ray=${ray}`));
      if (line) {
        return Object.fromEntries(
          [...line.matchAll(/(\w+)=(\S*)/g)].map((m) => [m[1], m[2]]),
        );
      }
      await sleep(20);
    }
    return null;
  }

  /**
   * The usage store's own figures ({instance, rows_written, flushes}), asked of the Durable
   * Object directly (as an operator could in the dashboard): no route of the Worker exposes them.
   */
  async usageStore() {
    const namespace = await this.mf.getDurableObjectNamespace(STATE_BINDING, "tokengate");
    const stub = namespace.get(namespace.idFromName("usage"));
    const res = await stub.fetch("https://state/", {
      method: "POST",
      body: JSON.stringify({ op: "usage_read", counts: false }),
    });
    const text = await res.text();
    assert.equal(res.status, 200, `usage store: ${res.status} ${text}`);
    return JSON.parse(text);
  }

  async status() {
    const res = await this.request("GET", STATUS_PATH);
    assert.equal(res.status, 200, `status endpoint: ${res.status} ${res.body}`);
    return JSON.parse(res.body);
  }

  /**
   * A signed push request, not sent: { target, headers, body }, the exact bytes a client would
   * send (so a test can send it, then replay it byte for byte with `send`). `target` is the
   * bundle path, or a page request's (`pageTarget`); the Tokengate-Signature is made at `t` by
   * every seed in `seeds`, or is `signature`; `headers` replaces all the request's headers.
   */
  signed(text, { target = BUNDLE_PATH, seeds = this.seeds, t = nowSecs(), signature = null, headers = null } = {}) {
    const value = signature ?? pushSignature(seeds, t, text);
    return {
      target,
      headers: headers ?? [
        ["content-type", "application/json"],
        ["tokengate-signature", value],
      ],
      body: text,
    };
  }

  /** Sends a request made by `signed` (again, for a replay); the answer gets `json`. */
  async send({ target, headers, body }) {
    const res = await this.request("POST", target, { headers, body });
    res.json = safeJson(res.body);
    return res;
  }

  /**
   * Pushes a body (a published bundle text, or anything) with a Tokengate-Signature made at
   * `t` by every seed in `seeds`; `signature` replaces that header's value, `headers` all
   * the request's headers (e.g. none).
   */
  push(text, opts = {}) {
    return this.send(this.signed(text, { ...opts, target: BUNDLE_PATH }));
  }

  /** Sends one page of the pending push `version`: a page request, signed as `push` signs. */
  pushPage(version, index, pageText, opts = {}) {
    return this.send(this.signed(pageText, { ...opts, target: pageTarget(version, index) }));
  }

  /**
   * Pushes until 200 (re-signing each round with a fresh t, as a client must). A paged
   * bundle (one the Worker answers 202 with `missing` pages) needs `pages`, its page texts by
   * index: they go as `pushPaged` sends them. Returns { final, answers }.
   */
  async pushAll(text, { seeds = this.seeds, rounds = 100, honourRetryAfter = true, pages = null } = {}) {
    if (pages) return this.pushPaged(text, pages, { seeds });
    const answers = [];
    for (let i = 0; i < rounds; i++) {
      const res = await this.push(text, { seeds });
      answers.push(res);
      if (res.status !== 202) return { final: res, answers };
      if (Array.isArray(res.json?.missing)) {
        throw new Error(`the Worker asks for pages ${JSON.stringify(res.json.missing).slice(0, 80)}: pass { pages }`);
      }
      if (honourRetryAfter) await retryAfter(res);
    }
    throw new Error(`push did not finish in ${rounds} rounds`);
  }

  /**
   * A paged push as a client does it: the manifest (the published bundle text), then each page
   * the answer lists as missing, from `pages` (the page texts by index), in `order` ("asc",
   * "desc", "random", or a function from the missing indices to the ones to send, in order),
   * honouring every answer: a 200 ends it (committed), any answer but 202 ends it (a refusal),
   * and when every page asked for went out without a commit the manifest is sent again (a
   * resume) for at most `rounds` rounds. `stopAfter`: stop once that many pages went out
   * (0: the manifest alone), leaving the push pending. `concurrency`: pages in flight at once.
   *
   * Returns { final (the last answer that counts: the commit, a refusal, or where it stopped),
   * answers (every response, a page's with `page` set), sent (page indices, in order),
   * requests, bytes (bodies sent), stopped }.
   */
  async pushPaged(
    manifestText,
    pages,
    { order = "asc", stopAfter = Infinity, seeds = this.seeds, rounds = 5, concurrency = 1 } = {},
  ) {
    const version = JSON.parse(manifestText).payload.version;
    const out = { final: null, answers: [], sent: [], requests: 0, bytes: 0, stopped: false };
    for (let round = 0; round < rounds; round++) {
      const manifest = await this.push(manifestText, { seeds });
      out.requests += 1;
      out.bytes += Buffer.byteLength(manifestText);
      out.answers.push(manifest);
      out.final = manifest;
      if (manifest.status !== 202 || !Array.isArray(manifest.json?.missing)) return out;
      if (out.sent.length >= stopAfter) {
        out.stopped = true;
        return out;
      }
      await retryAfter(manifest);
      const todo = ordered(manifest.json.missing, order).slice(0, stopAfter - out.sent.length);
      for (const i of todo) {
        if (typeof pages[i] !== "string") throw new Error(`the Worker asks for page ${i} of ${pages.length}: not supplied`);
      }
      let next = 0;
      let ended = null; // the answer that ends the push: a commit or a refusal
      const lane = async () => {
        while (ended === null && next < todo.length) {
          const i = todo[next++];
          const res = await this.pushPage(version, i, pages[i], { seeds });
          res.page = i;
          out.sent.push(i);
          out.requests += 1;
          out.bytes += Buffer.byteLength(pages[i]);
          out.answers.push(res);
          if (res.status === 200) ended = res;
          else if (res.status !== 202) ended ??= res;
          else await retryAfter(res);
        }
      };
      await Promise.all(Array.from({ length: Math.max(1, Math.min(concurrency, todo.length)) }, lane));
      if (ended) {
        out.final = ended;
        return out;
      }
      out.final = out.answers.at(-1);
      if (out.sent.length >= stopAfter) {
        out.stopped = true;
        return out;
      }
    }
    throw new Error(`paged push of version ${version} did not finish in ${rounds} rounds`);
  }

  /**
   * The status once `check(status)` holds, polled every 100 ms for at most `withinMs` (an
   * isolate answers from its cached push state, which may be up to CACHE_TTL_MS old); fails
   * with the last status otherwise.
   */
  async statusWhen(check, what, withinMs = CACHE_TTL_MS + 1500) {
    const deadline = Date.now() + withinMs;
    let status;
    for (let i = 0; i < 1000; i++) {
      status = await this.status();
      if (check(status)) return status;
      if (Date.now() > deadline) break;
      await sleep(100);
    }
    throw new Error(`${what}: not within ${withinMs} ms; the status says ${JSON.stringify(status)}`);
  }

  /** What it serves and trusts: the status without its read counter (which any request moves). */
  async served() {
    const { kv_reads, ...rest } = await this.status();
    return rest;
  }

  kv() {
    return this.mf.getKVNamespace("TOKENGATE");
  }

  /** The KV key names starting with `prefix` (no values: cheap on a large namespace). */
  async keys(prefix = "") {
    const kv = await this.kv();
    const out = [];
    let cursor;
    for (let round = 0; round < 100_000; round++) {
      const page = await kv.list({ prefix, cursor });
      for (const { name } of page.keys) out.push(name);
      cursor = page.list_complete ? undefined : page.cursor;
      if (!cursor) return out;
    }
    throw new Error("KV list did not end");
  }

  /** How many KV keys start with `prefix`. */
  async countKeys(prefix = "") {
    return (await this.keys(prefix)).length;
  }

  /** The page digests KV holds (its `page:<sha256>` keys). */
  async pageDigests() {
    return new Set((await this.keys("page:")).map((k) => k.slice("page:".length)));
  }

  /** Every KV key and value, for before/after comparisons and scans. */
  async snapshot() {
    const kv = await this.kv();
    const out = {};
    for (const name of await this.keys()) out[name] = await kv.get(name);
    return out;
  }
}

/** Waits what a 202's Retry-After asks (seconds, at most 10), if anything. */
async function retryAfter(res) {
  const retry = Number(headerValues(res.headers, "retry-after")[0] ?? 0);
  if (retry > 0) await sleep(Math.min(retry, 10) * 1000);
}

/** The page indices to send, in `order`, from the missing ones. */
function ordered(missing, order) {
  if (typeof order === "function") return order([...missing]);
  const list = [...missing];
  if (order === "asc") return list.sort((a, b) => a - b);
  if (order === "desc") return list.sort((a, b) => b - a);
  if (order === "random") {
    for (let i = list.length - 1; i > 0; i--) {
      const j = Math.floor(Math.random() * (i + 1));
      [list[i], list[j]] = [list[j], list[i]];
    }
    return list;
  }
  throw new Error(`unknown page order ${order}`);
}

/**
 * Everything a Worker holds, as text, what an attacker who read all of it would have: the
 * bindings and variables it was started with, the ones its runtime env exposes
 * (Miniflare's getBindings: the plain values; the KV binding is a proxy, read through
 * `snapshot` instead), and every KV key and value.
 */
export async function heldBy(worker) {
  const env = {};
  for (const [name, value] of Object.entries(await worker.mf.getBindings())) {
    if (["string", "number", "boolean"].includes(typeof value)) env[name] = value;
  }
  return { given: worker.bindings, env, kv: await worker.snapshot() };
}

/**
 * Runs `attempt` (a push) and asserts it was refused with one of the `allowed` [status, error]
 * pairs and an error_description, and that neither KV nor what the Worker serves and trusts
 * (its status, but the read counter) moved. Returns the response.
 */
export async function assertRefused(worker, label, attempt, allowed) {
  const before = await worker.snapshot();
  const served = await worker.served();
  const res = await attempt();
  const json = res.json ?? safeJson(res.body);
  const expected = allowed.map(([s, e]) => `${s} ${e}`).join(" or ");
  assert.ok(
    allowed.some(([s, e]) => s === res.status && e === json?.error),
    `${label}: ${res.status} ${res.body.slice(0, 300)} (expected ${expected})`,
  );
  assert.equal(typeof json?.error_description, "string", `${label}: no description`);
  assert.deepEqual(await worker.snapshot(), before, `${label}: KV changed`);
  assert.deepEqual(await worker.served(), served, `${label}: what the Worker serves changed`);
  return res;
}

/** Fails if any secret (or its 43-character random body) appears in any KV key or value. */
export function assertNoPlaintext(snapshot, secrets) {
  const everything = Object.entries(snapshot).flat().join("\n");
  for (const secret of secrets) {
    assert.ok(!everything.includes(secret), `a plaintext credential is in KV: ${secret.slice(0, 10)}…`);
    if (/_[0-9A-Za-z]{49}$/.test(secret)) {
      assert.ok(!everything.includes(secret.slice(-49, -6)), "a token body is in KV");
    }
  }
}

export function safeJson(text) {
  try {
    return JSON.parse(text);
  } catch {
    return null;
  }
}

/** The parsed response once `buf` holds all of it (by Content-Length or chunked end), else null. */
function completeResponse(buf, method) {
  const split = buf.indexOf("\r\n\r\n");
  if (split < 0) return null;
  const head = buf.subarray(0, split).toString("latin1").toLowerCase();
  const body = buf.subarray(split + 4);
  const length = head.match(/\r\ncontent-length:\s*(\d+)/);
  const status = Number(head.split(" ")[1]);
  if (method === "HEAD" || status === 204 || status === 304) return parseResponse(buf);
  if (length) return body.length >= Number(length[1]) ? parseResponse(buf) : null;
  if (/\r\ntransfer-encoding:[^\r]*chunked/.test(head)) {
    return body.includes("0\r\n\r\n") && body.subarray(-5).toString() === "0\r\n\r\n"
      ? parseResponse(buf)
      : null;
  }
  return null;
}

function parseResponse(buf) {
  const split = buf.indexOf("\r\n\r\n");
  if (split < 0) throw new Error(`malformed response: ${buf.toString("latin1").slice(0, 200)}`);
  const [statusLine, ...lines] = buf.subarray(0, split).toString("latin1").split("\r\n");
  const status = Number(statusLine.split(" ")[1]);
  const headers = lines.map((l) => {
    const i = l.indexOf(":");
    return [l.slice(0, i).trim().toLowerCase(), l.slice(i + 1).trim()];
  });
  let body = buf.subarray(split + 4);
  if (headerValues(headers, "transfer-encoding").some((v) => v.toLowerCase().includes("chunked"))) {
    const parts = [];
    let at = 0;
    for (;;) {
      const eol = body.indexOf("\r\n", at);
      const size = parseInt(body.subarray(at, eol).toString("latin1"), 16);
      if (!size) break;
      parts.push(body.subarray(eol + 2, eol + 2 + size));
      at = eol + 2 + size + 2;
    }
    body = Buffer.concat(parts);
  }
  return { status, headers, body: body.toString("utf8") };
}
