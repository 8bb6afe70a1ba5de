#!/usr/bin/env node
// tokengate benchmark, Worker part: tokengate-worker vs a minimal JS Worker doing the same
// lookup, both in real workerd (Miniflare), under wrk, interleaved. Run by bench/run.sh.
//
//   node bench/worker_bench.mjs --out target/bench/worker.json [--rounds 5 --duration 5]
//
// Needs the bundled Worker in target/worker-dist (scripts/worker.sh bundle) and the pinned
// Node tools of tests/worker (Miniflare). Both Workers run in their own workerd, pinned to
// CPU 0; wrk, this process and the origin (a Node "ok" server) share CPU 1. Each round runs
// every (Worker, token) pair once: a valid token, and a garbage one (right shape, failing
// checksum). Figures: requests/s and p99 from wrk, workerd CPU per request, KV reads per
// request (tokengate: its status endpoint's `kv_reads`; the JS Worker counts its own).
import { execFile, execFileSync } from "node:child_process";
import { promisify } from "node:util";
import fs from "node:fs";
import http from "node:http";
import { createRequire } from "node:module";
import path from "node:path";
import { fileURLToPath, pathToFileURL } from "node:url";
import zlib from "node:zlib";

const ROOT = path.resolve(path.dirname(fileURLToPath(import.meta.url)), "..");
const TESTS = path.join(ROOT, "tests/worker");
const { startWorker, DIST } = await import(pathToFileURL(path.join(TESTS, "lib/harness.mjs")));
const { makeToken, corrupt, record, bundle, publish, randomKey } = await import(
  pathToFileURL(path.join(TESTS, "lib/bundle.mjs"))
);
const require = createRequire(path.join(TESTS, "package.json"));
const { Miniflare } = await import(pathToFileURL(require.resolve("miniflare")));

const args = Object.fromEntries(
  process.argv.slice(2).reduce((acc, a, i, all) => (a.startsWith("--") ? [...acc, [a.slice(2), all[i + 1]]] : acc), []),
);
const ROUNDS = Number(args.rounds ?? 5);
const DURATION = Number(args.duration ?? 5);
const OUT = args.out ?? path.join(ROOT, "target/bench/worker.json");
const TOKENS = 100;
const ENVOY_CPU = "0"; // workerd under test
const LOAD_CPU = "1"; // wrk, this process, the origin
const say = (m) => console.log(`  [worker] ${m}`);
// Bounded: the whole run stops itself.
setTimeout(() => {
  console.error("worker bench timed out");
  process.exit(1);
}, 10 * 60 * 1000).unref();

// The minimal JS Worker: SHA-256 of the Bearer token (crypto.subtle), one KV read, forward.
// With `log`, also one console.log line per request, as tokengate-worker writes (a diagnostic:
// is its longer latency tail the logging, which Miniflare drains through this process?).
const jsWorker = (log) => `
let kvReads = 0;
export default {
  async fetch(request, env) {
    const response = await decide(request, env);
    ${log ? "console.log(`bench status=${response.status} reason=- rule=- subject=- token_id=- method=${request.method} path=${new URL(request.url).pathname} ray=-`);" : ""}
    return response;
  },
};
async function decide(request, env) {
    const url = new URL(request.url);
    if (url.pathname === "/.well-known/bench/kv_reads") return Response.json({ kv_reads: kvReads });
    const auth = request.headers.get("authorization") ?? "";
    if (!auth.startsWith("Bearer ")) return new Response("unauthorized", { status: 401 });
    const digest = await crypto.subtle.digest("SHA-256", new TextEncoder().encode(auth.slice(7)));
    const hex = Array.from(new Uint8Array(digest), (b) => b.toString(16).padStart(2, "0")).join("");
    kvReads += 1;
    const record = await env.TOKENGATE.get("token:" + hex);
    if (record === null) return new Response("unauthorized", { status: 401 });
    const headers = new Headers(request.headers);
    headers.delete("authorization");
    headers.set("x-tokengate-subject", JSON.parse(record).name);
    return fetch(env.ORIGIN_URL + url.pathname, { headers });
}`;

function children() {
  return new Set(
    fs.readdirSync("/proc").filter((p) => /^\d+$/.test(p)).filter((p) => {
      try {
        return fs.readFileSync(`/proc/${p}/comm`, "utf8").trim() === "workerd";
      } catch {
        return false;
      }
    }),
  );
}

function cpuTicks(pid) {
  const rest = fs.readFileSync(`/proc/${pid}/stat`, "utf8").split(") ")[1].split(" ");
  return Number(rest[11]) + Number(rest[12]);
}

const CLK_TCK = Number(execFileSync("getconf", ["CLK_TCK"]).toString().trim());
const UNITS = { us: 1e-3, ms: 1, s: 1e3 };

// Asynchronous: this process's event loop serves the origin and drains workerd's logs meanwhile.
async function wrk(port, token, duration) {
  // token null: the control run, no credential on the public /healthz (meta reads only).
  const auth = token === null ? [] : ["-H", `Authorization: Bearer ${token}`];
  const target = `http://127.0.0.1:${port}${token === null ? "/healthz" : "/api/orders/1"}`;
  const { stdout: out } = await promisify(execFile)("taskset", ["-c", LOAD_CPU, "wrk", "-t1", "-c8",
    `-d${duration}s`, "--latency", "--timeout", "2s", "-H", "Host: api.internal", ...auth, target],
    { timeout: (duration + 30) * 1000 });
  const n = out.match(/(\d+) requests in/);
  const p99 = out.match(/99%\s+([\d.]+)(us|ms|s)\b/);
  const rps = out.match(/Requests\/sec:\s+([\d.]+)/);
  const non2xx = out.match(/Non-2xx or 3xx responses: (\d+)/);
  if (!n || !p99 || !rps) throw new Error(`cannot parse wrk output:\n${out}`);
  return { requests: Number(n[1]), rps: Number(rps[1]), p99_ms: Number(p99[1]) * UNITS[p99[2]],
    non2xx: non2xx ? Number(non2xx[1]) : 0 };
}

async function getJson(port, p) {
  return new Promise((resolve, reject) => {
    http.get({ host: "127.0.0.1", port, path: p, headers: { host: "api.internal" } }, (res) => {
      let body = "";
      res.on("data", (c) => (body += c));
      res.on("end", () => resolve(JSON.parse(body)));
    }).on("error", reject);
  });
}

function bundleSize() {
  const files = fs.readdirSync(DIST).filter((f) => /\.(js|mjs|wasm)$/.test(f));
  let raw = 0, gz = 0, gz9 = 0;
  for (const f of files) {
    const data = fs.readFileSync(path.join(DIST, f));
    raw += data.length;
    gz += zlib.gzipSync(data).length;
    gz9 += zlib.gzipSync(data, { level: 9 }).length;
  }
  return { files, raw, gz, gz9 };
}

// --- start -------------------------------------------------------------------------------
const size = bundleSize(); // now: the files this run loads (DIST may be rebuilt meanwhile)
execFileSync("taskset", ["-apc", LOAD_CPU, String(process.pid)]);
const origin = http.createServer((req, res) => {
  req.resume();
  req.on("end", () => res.end("ok"));
});
await new Promise((r) => origin.listen(0, "127.0.0.1", r));
const originUrl = `http://127.0.0.1:${origin.address().port}`;

// The admin's private key stays in this process: the Worker is given its public key only
// (TOKENGATE_TRUSTED_KEYS), and pushes and the bundle are signed with it (tokengate.bundle/v2).
const key = randomKey();
const environment = "bench";
const valid = makeToken();
const tokens = [record("svc-valid", valid, ["orders:read"])];
for (let i = 1; i < TOKENS; i++) tokens.push(record(`svc-${i}`, makeToken(), ["orders:read"]));
const garbage = corrupt(valid);

const before = children();
const tg = await startWorker({ origin: { url: originUrl }, keys: [key], environment });
const tgPid = [...children()].find((p) => !before.has(p));
const pushed = await tg.pushAll(publish(bundle({ version: 1, environment, tokens }), [key]));
if (pushed.final.status !== 200) throw new Error(`push failed: ${pushed.final.status} ${pushed.final.body}`);

async function startJsWorker(log) {
  const before = children();
  // Log lines reach this process as tokengate-worker's do (tests/worker/lib/harness.mjs):
  // structured, each kept in memory.
  const logs = [];
  const mf = new Miniflare({
    modules: true, script: jsWorker(log), compatibilityDate: "2026-04-01", kvNamespaces: ["TOKENGATE"],
    bindings: { ORIGIN_URL: originUrl }, unsafeDirectSockets: [{ host: "127.0.0.1", port: 0 }],
    structuredWorkerdLogs: true, handleStructuredLogs: ({ message }) => { logs.push(message); },
  });
  await mf.ready;
  const port = Number((await mf.unsafeGetDirectURL()).port);
  const pid = [...children()].find((p) => !before.has(p));
  const kv = await mf.getKVNamespace("TOKENGATE");
  for (const t of tokens) await kv.put(`token:${t.hash}`, JSON.stringify(t));
  execFileSync("taskset", ["-apc", ENVOY_CPU, pid]);
  return { mf, port, pid };
}
const js = await startJsWorker(false);
const jsLog = await startJsWorker(true);
const [jsPort, jsPid] = [js.port, js.pid];
execFileSync("taskset", ["-apc", ENVOY_CPU, tgPid]);
say(`tokengate-worker workerd pid ${tgPid} port ${tg.port}; JS Worker workerd pid ${jsPid} port ${jsPort}; ` +
  `JS Worker + log pid ${jsLog.pid} port ${jsLog.port}`);

const kvReads = {
  "tokengate-worker": async () => (await tg.status()).kv_reads,
  "js-worker": async () => (await getJson(jsPort, "/.well-known/bench/kv_reads")).kv_reads,
  "js-worker-log": async () => (await getJson(jsLog.port, "/.well-known/bench/kv_reads")).kv_reads,
};
const configs = [];
for (const [worker, port, label] of [["tokengate-worker", tg.port, "tokengate-worker"], ["js-worker", jsPort, "minimal JS Worker"]]) {
  for (const [kind, token] of [["valid", valid], ["garbage", garbage]]) {
    configs.push({ name: `${worker}-${kind}`, worker, kind, label: `${label}, ${kind} token`, port, token,
      pid: worker === "js-worker" ? jsPid : tgPid, runs: [] });
  }
}
// Control: no credential on a public route. KV holds only token pages, so it reads none: the
// served state comes from the push-state Durable Object (once per 5 s per isolate).
configs.push({ name: "tokengate-worker-public", worker: "tokengate-worker", kind: "public",
  label: "tokengate-worker, control: public route, no credential", port: tg.port, token: null,
  pid: tgPid, runs: [] });
configs.push({ name: "js-worker-log-valid", worker: "js-worker-log", kind: "valid",
  label: "diagnostic: minimal JS Worker + one console.log per request, valid token", port: jsLog.port,
  token: valid, pid: jsLog.pid, runs: [] });
try {
  for (const c of configs) {
    say(`warm-up ${c.name}`);
    await wrk(c.port, c.token, 2);
  }
  for (let r = 0; r < ROUNDS; r++) {
    const order = [...configs.slice(r % configs.length), ...configs.slice(0, r % configs.length)];
    for (const c of order) {
      const kv0 = await kvReads[c.worker]();
      const t0 = cpuTicks(c.pid);
      const m = await wrk(c.port, c.token, DURATION);
      m.cpu_us_per_req = ((cpuTicks(c.pid) - t0) / CLK_TCK) * 1e6 / Math.max(m.requests, 1);
      m.kv_reads = (await kvReads[c.worker]()) - kv0;
      m.round = r;
      c.runs.push(m);
      say(`round ${r + 1}/${ROUNDS} ${c.name.padEnd(26)} ${m.rps.toFixed(0).padStart(7)} req/s  p99 ${m.p99_ms.toFixed(2)} ms  ` +
        `${m.cpu_us_per_req.toFixed(1)} µs CPU/req  KV reads ${m.kv_reads} (${(m.kv_reads / m.requests).toFixed(4)}/req)` +
        (m.non2xx && c.kind === "valid" ? `  NON-2XX ${m.non2xx}` : ""));
    }
  }
} finally {
  await tg.dispose();
  await js.mf.dispose();
  await jsLog.mf.dispose();
  origin.close();
}

const median = (xs) => [...xs].sort((a, b) => a - b)[Math.floor((xs.length - 1) / 2)];
const perReq = (c) => c.runs.reduce((s, r) => s + r.kv_reads, 0) / c.runs.reduce((s, r) => s + r.requests, 0);
const byName = Object.fromEntries(configs.map((c) => [c.name, c]));
const sum = (name, field) => byName[name].runs.reduce((s, r) => s + r[field], 0);
for (const c of configs) c.kv_reads_per_request = perReq(c);
const ratio = (a, b) => median(byName[a].runs.map((r, i) => r.rps / byName[b].runs[i].rps));
const rv = ratio("tokengate-worker-valid", "js-worker-valid");
const rg = ratio("tokengate-worker-garbage", "js-worker-garbage");
const out = {
  description:
    `Both in workerd via Miniflare (${path.relative(ROOT, DIST)}: the wrangler dry-run bundle), ` +
    `each its own workerd pinned to CPU 0; wrk -t1 -c8 -d${DURATION}s on CPU 1 with the Node ` +
    `origin ("ok"). ${TOKENS} tokens (tokengate: pushed; JS: put in KV as token:<sha256>). ` +
    `Valid = a token in the set; garbage = the same with a failing checksum; control = no ` +
    `credential on the public /healthz. ${ROUNDS} rounds, ` +
    `interleaved. KV in Miniflare is local (no network), so a KV read costs far less than on ` +
    `Cloudflare. Requests/s ratio tokengate ÷ JS (per round, median): valid ${rv.toFixed(2)}, ` +
    `garbage ${rg.toFixed(2)}. Bundle: ${size.files.join(", ")}, ${size.raw} bytes raw, ` +
    `${size.gz} gzip (default level), ${size.gz9} gzip -9.`,
  configs: configs.map(({ pid, port, token, ...c }) => c),
  gzip_bytes: size.gz,
  gzip9_bytes: size.gz9,
  raw_bytes: size.raw,
  targets: [
    { target: "Worker requests/s ≥ the JS Worker's (valid token)", figure: `ratio ${rv.toFixed(2)}`, ok: rv >= 1 },
    { target: "… (garbage token)", figure: `ratio ${rg.toFixed(2)}`, ok: rg >= 1 },
    { target: "zero KV reads for garbage tokens",
      figure: `${sum("tokengate-worker-garbage", "kv_reads")} reads in ${sum("tokengate-worker-garbage", "requests")} ` +
        `garbage requests (and ${sum("tokengate-worker-public", "kv_reads")} in ` +
        `${sum("tokengate-worker-public", "requests")} no-credential requests)`,
      // KV holds only token pages: a garbage token is decided before any lookup.
      ok: byName["tokengate-worker-garbage"].runs.every((r) => r.kv_reads === 0) },
  ],
};
fs.mkdirSync(path.dirname(OUT), { recursive: true });
fs.writeFileSync(OUT, JSON.stringify(out, null, 1));
say(`wrote ${OUT}`);
process.exit(0);
