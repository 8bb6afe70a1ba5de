#!/usr/bin/env node
// Diagnostic, not part of run.sh: one Worker in workerd (Miniflare) under sustained wrk load,
// six 5-s runs back to back, printing latency percentiles and workerd's RSS after each. Asks
// whether a latency tail is the Worker's or the local runtime's.
//
//   node bench/worker_tail.mjs public|valid|js|js-log
//
// public / valid: tokengate-worker (target/worker-dist) on /healthz, or with a valid token.
// js: a JS Worker that only forwards to the origin; js-log: the same plus one log line per
// request, its lines handled as tokengate-worker's are (structured, kept in memory).
import { execFile, execFileSync } from "node:child_process";
import { promisify } from "node:util";
import fs from "node:fs";
import http from "node:http";
import path from "node:path";
import { fileURLToPath, pathToFileURL } from "node:url";
const ROOT = path.resolve(path.dirname(fileURLToPath(import.meta.url)), "..");
const TESTS = path.join(ROOT, "tests/worker");
const { startWorker } = await import(pathToFileURL(path.join(TESTS, "lib/harness.mjs")));
const { makeToken, record, bundle, publish, randomKey } = await import(pathToFileURL(path.join(TESTS, "lib/bundle.mjs")));
const children = () => new Set(fs.readdirSync("/proc").filter((p) => /^\d+$/.test(p)).filter((p) => { try { return fs.readFileSync(`/proc/${p}/comm`, "utf8").trim() === "workerd"; } catch { return false; } }));
execFileSync("taskset", ["-apc", "1", String(process.pid)]);
const origin = http.createServer((req, res) => { req.resume(); req.on("end", () => res.end("ok")); });
await new Promise((r) => origin.listen(0, "127.0.0.1", r));
const key = randomKey();
const mode = process.argv[2] ?? "public";
if (!["public", "valid", "js", "js-log"].includes(mode)) throw new Error(`unknown mode ${mode}`);
setTimeout(() => { console.error("timed out"); process.exit(1); }, 5 * 60 * 1000).unref();
const { createRequire } = await import("node:module");
const require = createRequire(path.join(TESTS, "package.json"));
const { Miniflare } = await import(pathToFileURL(require.resolve("miniflare")));
const before = children();
let tg;
if (mode.startsWith("js")) {
  const logs = [];
  const mf = new Miniflare({ modules: true, compatibilityDate: "2026-04-01", kvNamespaces: ["TOKENGATE"],
    script: `export default { async fetch(req, env) { const r = await fetch(env.O + "/x"); ${mode === "js-log" ? 'console.log("tokengate status=200 reason=public rule=health subject=- token_id=- method=GET path=/healthz ray=-");' : ""} return new Response(await r.text()); } };`,
    bindings: { O: `http://127.0.0.1:${origin.address().port}` }, unsafeDirectSockets: [{ host: "127.0.0.1", port: 0 }],
    structuredWorkerdLogs: true, handleStructuredLogs: ({ message }) => { logs.push(message); } });
  await mf.ready;
  tg = { port: Number((await mf.unsafeGetDirectURL()).port), logs, dispose: () => mf.dispose(), pushAll: async () => {} };
} else tg = await startWorker({ origin: { url: `http://127.0.0.1:${origin.address().port}` }, keys: [key], environment: "bench" });
const pid = [...children()].find((p) => !before.has(p));
execFileSync("taskset", ["-apc", "0", pid]);
const valid = makeToken();
await tg.pushAll(publish(bundle({ version: 1, environment: "bench", tokens: [record("svc", valid, ["orders:read"])] }), [key]));
const rss = () => Number(fs.readFileSync(`/proc/${pid}/status`, "utf8").match(/VmRSS:\s+(\d+)/)[1]) / 1024;
const target = mode !== "valid" ? `http://127.0.0.1:${tg.port}/healthz` : `http://127.0.0.1:${tg.port}/api/orders/1`;
const auth = mode !== "valid" ? [] : ["-H", `Authorization: Bearer ${valid}`];
for (let i = 0; i < 6; i++) {
  const { stdout } = await promisify(execFile)("taskset", ["-c", "1", "wrk", "-t1", "-c8", "-d5s", "--latency", "-H", "Host: api.internal", ...auth, target]);
  const p = (q) => stdout.match(new RegExp(`${q}%\\s+([\\d.]+\\w+)`))[1];
  console.log(`run ${i}: ${stdout.match(/Requests\/sec:\s+([\d.]+)/)[1]} req/s p50 ${p(50)} p90 ${p(90)} p99 ${p(99)}; workerd RSS ${rss().toFixed(0)} MiB; logs kept ${tg.logs.length}`);
}
await tg.dispose(); origin.close(); process.exit(0);
