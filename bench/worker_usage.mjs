#!/usr/bin/env node
// tokengate benchmark, Worker usage part: what usage counting writes to the usage store (the
// Durable Object's SQLite), per active token. Run by bench/run.sh.
//
//   node bench/worker_usage.mjs --out target/bench/worker_usage.json [--tokens 100 --seconds 20 --flush 2]
//
// One Worker in real workerd (Miniflare), flush interval --flush seconds (production default:
// 60); requests cycle over --tokens tokens for --seconds seconds, so every token is active in
// every interval (the worst case per token). The store's own counts (rows_written, flushes,
// read from the Durable Object through Miniflare) give the rows written per active token per flush; at one flush per
// interval per isolate, that times 3600 / 60 is the hourly write cost at the default interval.
// A signed usage read at the end checks that every request was counted, once.
import fs from "node:fs";
import path from "node:path";
import { fileURLToPath, pathToFileURL } from "node:url";

const ROOT = path.resolve(path.dirname(fileURLToPath(import.meta.url)), "..");
const TESTS = path.join(ROOT, "tests/worker");
const { startWorker, Origin } = await import(pathToFileURL(path.join(TESTS, "lib/harness.mjs")));
const { makeToken, record, bundle, publish, randomKey, keyId, signHex, nowSecs } = await import(
  pathToFileURL(path.join(TESTS, "lib/bundle.mjs"))
);

const args = Object.fromEntries(
  process.argv.slice(2).reduce((acc, a, i, all) => (a.startsWith("--") ? [...acc, [a.slice(2), all[i + 1]]] : acc), []),
);
const TOKENS = Number(args.tokens ?? 100);
const SECONDS = Number(args.seconds ?? 20);
const FLUSH = Number(args.flush ?? 2);
const DEFAULT_FLUSH = 60;
const OUT = args.out ?? path.join(ROOT, "target/bench/worker_usage.json");
const say = (m) => console.log(`  [worker usage] ${m}`);
setTimeout(() => {
  console.error("worker usage bench timed out");
  process.exit(1);
}, 5 * 60 * 1000).unref();

const origin = await new Origin().start();
const key = randomKey();
const environment = "bench";
const secrets = Array.from({ length: TOKENS }, () => makeToken());
const records = secrets.map((s, i) => record(`svc-${i}`, s, ["orders:read"]));
const worker = await startWorker({
  origin,
  keys: [key],
  environment,
  vars: { TOKENGATE_USAGE_FLUSH_SECONDS: String(FLUSH) },
});
try {
  const pushed = await worker.pushAll(publish(bundle({ version: 1, environment, tokens: records }), [key]));
  if (pushed.final.status !== 200) throw new Error(`push failed: ${pushed.final.status} ${pushed.final.body}`);
  say(`${TOKENS} tokens, flush every ${FLUSH} s, requests for ${SECONDS} s`);
  const started = Date.now();
  let sent = 0;
  // Four requests in flight, cycling over the tokens; bounded by time.
  const lane = async (offset) => {
    for (let i = offset; Date.now() - started < SECONDS * 1000; i += 4) {
      const res = await worker.request("GET", "/api/orders/1", {
        headers: [["authorization", `Bearer ${secrets[i % TOKENS]}`]],
      });
      if (res.status !== 200) throw new Error(`request refused: ${res.status} ${res.body}`);
      sent += 1;
    }
  };
  await Promise.all([0, 1, 2, 3].map(lane));
  const elapsed = (Date.now() - started) / 1000;
  // A signed read flushes the reading isolate's counts (Miniflare runs one isolate).
  const t = nowSecs();
  const signature = signHex(key, `tokengate.usage/v1\n${t}\n${environment}`);
  const read = await worker.request("GET", "/.well-known/tokengate/usage", {
    headers: [["tokengate-signature", `t=${t},${keyId(key)}=${signature}`]],
  });
  if (read.status !== 200) throw new Error(`usage read: ${read.status} ${read.body}`);
  const counted = JSON.parse(read.body).tokens.reduce((n, u) => n + u.allowed, 0);
  const usage = await worker.usageStore();
  const perFlushPerToken = usage.rows_written / usage.flushes / TOKENS;
  const result = {
    tokens: TOKENS,
    seconds: Number(elapsed.toFixed(1)),
    flush_seconds: FLUSH,
    requests: sent,
    counted,
    flushes: usage.flushes,
    rows_written: usage.rows_written,
    rows_per_active_token_per_flush: Number(perFlushPerToken.toFixed(3)),
    default_flush_seconds: DEFAULT_FLUSH,
    rows_per_active_token_per_hour_at_default: Number(((perFlushPerToken * 3600) / DEFAULT_FLUSH).toFixed(1)),
    rows_per_active_token_per_hour_measured: Number((usage.rows_written / TOKENS / (elapsed / 3600)).toFixed(1)),
  };
  say(JSON.stringify(result));
  if (counted !== sent) throw new Error(`${sent} requests sent, ${counted} counted`);
  fs.mkdirSync(path.dirname(OUT), { recursive: true });
  fs.writeFileSync(OUT, JSON.stringify(result, null, 1));
} finally {
  await worker.dispose();
  origin.close();
}
