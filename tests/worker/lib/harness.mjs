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
 * unchanged and records it ({method, path, body: the exact bytes}), so a test sees what a
 * client sent, byte for byte, or that it sent nothing at all.
 */
export class Relay {
  requests = [];

  constructor(port) {
    this.port = port;
  }

  async start() {
    this.server = http.createServer((req, res) => {
      const chunks = [];
      req.on("data", (c) => chunks.push(c));
      req.on("end", () => {
        const body = Buffer.concat(chunks);
        this.requests.push({ method: req.method, path: req.url, body });
        const upstream = http.request(
          { host: "127.0.0.1", port: this.port, method: req.method, path: req.url, headers: req.headers, agent: false },
          (answer) => {
            res.writeHead(answer.statusCode, answer.headers);
            answer.pipe(res);
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
/**
 * Starts the bundled Worker in workerd with a fresh, empty KV namespace. Requests go to
 * workerd's own socket for the Worker (Miniflare's `unsafeDirectSockets`), not through
 * Miniflare's JavaScript entry worker, whose `new URL()` would normalise paths first.
 *
 * `keys`: the admin's private seeds (64 hex) the tests sign with; the Worker is given only
 * their public keys, as the plain variable TOKENGATE_TRUSTED_KEYS (or `trusted`, public keys
 * given directly, when the test does not hold the seeds; `vars` overrides either).
 */
export async function startWorker({ origin, keys = [], trusted, environment, vars = {} }) {
  const script = path.join(DIST, "index.js");
  if (!fs.existsSync(script)) {
    throw new Error(`no bundled Worker at ${script}: build it first: scripts/worker.sh bundle`);
  }
  const logs = [];
  const bindings = {
    ORIGIN_URL: origin.url,
    TOKENGATE_ENVIRONMENT: environment,
    TOKENGATE_TRUSTED_KEYS: (trusted ?? keys.map(publicKeyHex)).join(","),
    ...vars,
  };
  const mf = new Miniflare({
    modules: true,
    modulesRoot: DIST,
    scriptPath: script,
    modulesRules: [{ type: "CompiledWasm", include: ["**/*.wasm"] }],
    compatibilityDate: compatibilityDate(),
    kvNamespaces: ["TOKENGATE"],
    bindings,
    structuredWorkerdLogs: true,
    handleStructuredLogs: ({ message }) => {
      logs.push(message);
    },
    unsafeDirectSockets: [{ host: "127.0.0.1", port: 0 }],
  });
  await mf.ready;
  const direct = await mf.unsafeGetDirectURL();
  return new Worker(mf, Number(direct.port), logs, keys, bindings);
}

let rays = 0;

export class Worker {
  /** `seeds`: the private keys pushes are signed with by default; `bindings`: what it was given. */
  constructor(mf, port, logs, seeds, bindings) {
    Object.assign(this, { mf, port, logs, seeds, bindings });
  }

  dispose() {
    return this.mf.dispose();
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

  async status() {
    const res = await this.request("GET", STATUS_PATH);
    assert.equal(res.status, 200, `status endpoint: ${res.status} ${res.body}`);
    return JSON.parse(res.body);
  }

  /**
   * Pushes a body (a published bundle text, or anything) with a Tokengate-Signature made at
   * `t` by every seed in `seeds`; `signature` replaces that header's value, `headers` all
   * the request's headers (e.g. none).
   */
  async push(text, { seeds = this.seeds, t = nowSecs(), signature = null, headers = null } = {}) {
    const value = signature ?? pushSignature(seeds, t, text);
    const res = await this.request("POST", BUNDLE_PATH, {
      headers: headers ?? [
        ["content-type", "application/json"],
        ["tokengate-signature", value],
      ],
      body: text,
    });
    res.json = safeJson(res.body);
    return res;
  }

  /** Pushes until 200 (re-signing each round with a fresh t, as a client must). */
  async pushAll(text, { seeds = this.seeds, rounds = 100, honourRetryAfter = true } = {}) {
    const answers = [];
    for (let i = 0; i < rounds; i++) {
      const res = await this.push(text, { seeds });
      answers.push(res);
      if (res.status !== 202) return { final: res, answers };
      const retry = Number(headerValues(res.headers, "retry-after")[0] ?? 0);
      if (honourRetryAfter && retry > 0) await sleep(retry * 1000);
    }
    throw new Error(`push did not finish in ${rounds} rounds`);
  }

  /** What it serves and trusts: the status without its read counter (which any request moves). */
  async served() {
    const { kv_reads, ...rest } = await this.status();
    return rest;
  }

  kv() {
    return this.mf.getKVNamespace("TOKENGATE");
  }

  /** Every KV key and value, for before/after comparisons and scans. */
  async snapshot() {
    const kv = await this.kv();
    const out = {};
    let cursor;
    do {
      const page = await kv.list({ cursor });
      for (const { name } of page.keys) out[name] = await kv.get(name);
      cursor = page.list_complete ? undefined : page.cursor;
    } while (cursor);
    return out;
  }
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
