#!/usr/bin/env node
// tokengate benchmark, Worker push at scale (issue #15): what pushing a large token set costs.
// For each size, a fresh Worker in real workerd (Miniflare, local KV and Durable Object) gets a
// paged bundle of that many tokens from empty, then a change of 1,000 revoked + 1,000 added;
// each push is sent as a client does it (tests/worker/lib/harness.mjs `pushPaged`: the
// manifest, then the pages the Worker lists as missing). Records are hash-only (a random
// hash, no secret): the push does not need secrets. Not part of the test suite.
//
//   node bench/worker_push.mjs [--sizes 100000,1000000] [--concurrency 4] [--out FILE.json]
//
// Needs the bundled Worker in target/worker-dist (scripts/worker.sh bundle) and the pinned
// Node tools of tests/worker (npm ci there). Prints a JSON document and a markdown table:
// tokens, pages, pages sent, requests, push wall time (first request to the commit), pages
// stored in KV (the page:* keys the push added), bytes sent (request bodies), and the time
// this process took to build and sign the bundle (not in the wall time).
import crypto from "node:crypto";
import fs from "node:fs";
import path from "node:path";
import { Origin, startWorker } from "../tests/worker/lib/harness.mjs";
import { bundle, hashRecord, publishPaged, randomKey } from "../tests/worker/lib/bundle.mjs";

const args = Object.fromEntries(
  process.argv.slice(2).reduce((acc, a, i, all) => (a.startsWith("--") ? [...acc, [a.slice(2), all[i + 1]]] : acc), []),
);
const SIZES = String(args.sizes ?? "100000,1000000")
  .split(",")
  .map((s) => Number(s.trim()));
const CONCURRENCY = Number(args.concurrency ?? 4); // page requests in flight, as the CLI sends them
const CHANGE = 1000; // revoked, and as many added
const OUT = args.out ?? null;
if (!SIZES.every((n) => Number.isInteger(n) && n > CHANGE && n <= 1_000_000)) {
  console.error(`--sizes: whole numbers from ${CHANGE + 1} to 1000000, comma-separated`);
  process.exit(2);
}
if (!Number.isInteger(CONCURRENCY) || CONCURRENCY < 1 || CONCURRENCY > 64) {
  console.error("--concurrency: 1 to 64 page requests in flight");
  process.exit(2);
}
// Bounded: the whole run stops itself.
setTimeout(() => {
  console.error("worker push bench timed out after 60 minutes");
  process.exit(1);
}, 60 * 60 * 1000).unref();
const say = (m) => console.error(`  [worker push] ${m}`);

const key = randomKey();
const environment = "bench";
const created_at = Math.floor(Date.now() / 1000) - 3600;
const scopes = ["orders:read"];
const hashOnly = (name) => hashRecord(name, crypto.randomBytes(32).toString("hex"), scopes, { created_at });

/** One push of `tokens` as `version`: built, signed, sent; its figures. */
async function pushOnce(worker, version, tokens, label) {
  let t = Date.now();
  const paged = publishPaged(bundle({ version, environment, tokens }), [key]);
  const buildS = (Date.now() - t) / 1000;
  const keysBefore = await worker.countKeys("page:");
  t = Date.now();
  const res = await worker.pushPaged(paged.text, paged.pages, { concurrency: CONCURRENCY });
  const wallS = (Date.now() - t) / 1000;
  if (res.final.status !== 200) throw new Error(`${label}: ${res.final.status} ${res.final.body}`);
  const keysAfter = await worker.countKeys("page:");
  const status = await worker.status();
  if (status.version !== version || status.tokens !== tokens.length) {
    throw new Error(`${label}: the Worker serves version ${status.version} with ${status.tokens} tokens`);
  }
  const written = res.answers.reduce((sum, a) => sum + (Number.isInteger(a.json?.written) ? a.json.written : 0), 0);
  const row = {
    push: label,
    tokens: tokens.length,
    pages: paged.pages.length,
    pages_sent: res.sent.length,
    requests: res.requests,
    wall_s: Number(wallS.toFixed(2)),
    kv_pages_stored: keysAfter - keysBefore,
    written_reported: written,
    bytes_sent: res.bytes,
    build_s: Number(buildS.toFixed(2)),
  };
  say(`${label}: ${JSON.stringify(row)}`);
  return row;
}

const origin = await new Origin().start();
const rows = [];
try {
  for (const n of SIZES) {
    const worker = await startWorker({ origin, keys: [key], environment });
    try {
      say(`${n} tokens: building`);
      const tokens = Array.from({ length: n }, (_, i) => hashOnly(`svc-${i}`));
      rows.push(await pushOnce(worker, 1, tokens, `${n} from empty`));
      // The change: 1,000 distinct tokens revoked, 1,000 added.
      const revoked = new Set();
      for (let i = 0; revoked.size < CHANGE && i < 100 * CHANGE; i++) revoked.add(crypto.randomInt(n));
      const now = Math.floor(Date.now() / 1000);
      let next = tokens.map((r, i) => (revoked.has(i) ? { ...r, revoked_at: now } : r));
      // At the 1,000,000-token limit, 1,000 other tokens leave the set to make room.
      const room = 1_000_000 - n;
      let label = `${n}: ${CHANGE} revoked + ${CHANGE} added`;
      if (room < CHANGE) {
        const drop = new Set();
        for (let i = 0; drop.size < CHANGE - room && i < 100 * CHANGE; i++) {
          const j = crypto.randomInt(n);
          if (!revoked.has(j)) drop.add(j);
        }
        next = next.filter((_, i) => !drop.has(i));
        label += ` + ${drop.size} removed`;
      }
      for (let i = 0; i < CHANGE; i++) next.push(hashOnly(`added-${i}`));
      rows.push(await pushOnce(worker, 2, next, label));
    } finally {
      await worker.dispose();
    }
  }
} finally {
  await origin.close();
}

const doc = {
  what: "tokengate Worker push at scale: paged bundles from empty, then 1,000 revoked + 1,000 added",
  runtime: "workerd via Miniflare (local KV and Durable Object), one process on this machine",
  concurrency: CONCURRENCY,
  node: process.version,
  rows,
};
if (OUT) {
  fs.mkdirSync(path.dirname(path.resolve(OUT)), { recursive: true });
  fs.writeFileSync(path.resolve(OUT), `${JSON.stringify(doc, null, 2)}\n`);
}
console.log(JSON.stringify(doc, null, 2));
const mb = (b) => (b / 1024 / 1024).toFixed(1);
console.log("");
console.log("| push | tokens | pages | pages sent | requests | push wall time (s) | KV pages stored | bytes sent (MiB) | build + sign (s) |");
console.log("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |");
for (const r of rows) {
  console.log(
    `| ${r.push} | ${r.tokens.toLocaleString("en-US")} | ${r.pages} | ${r.pages_sent} | ${r.requests} | ${r.wall_s} | ${r.kv_pages_stored} | ${mb(r.bytes_sent)} | ${r.build_s} |`,
  );
}
