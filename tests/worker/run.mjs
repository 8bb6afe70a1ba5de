// The Worker's end-to-end tests in real workerd (Miniflare): every module below, in order.
// Prints one line per test and a final "N passed, M failed"; exits non-zero on any failure.
//   node tests/worker/run.mjs            (scripts/worker.sh bundles the Worker first)
//   TOKENGATE_TEST_FILTER=access node tests/worker/run.mjs   only tests whose name matches
import { Origin, Suite } from "./lib/harness.mjs";

const MODULES = [
  "conformance", // every case of conformance/vectors.json through the Worker
  "push", // the push protocol: Ed25519 signatures, window, refusals with KV unchanged, trust, forging, pages
  "lifecycle", // create, revoke, rotate with grace, expiry, revoke-all, as an operator does it
  "cache", // KV reads, the staleness bound across isolates, fail-closed 503s for bad pages, what KV holds
  "access", // Cloudflare Access assertions against a JWKS served on 127.0.0.1
  "cli", // the real tokengate CLI: push worker (--bundle), the push protocol, refusals, admin key rotation, status
  "limits", // per-token rate limits: the Rate Limiting bindings, 409/400 refusals, fail-closed 503s, the 429, the CLI's --rate
  "signed", // signed short-lived tokens (JWTs): the CLI's issuers, mint, revoke --jti and retire against the Worker, no push per token
  "usage", // per-token usage: the signed read, counts and refusals, another isolate's flush, usage pull / list / unused
  "scale", // 100,000 tokens paged; a pending revoke-all; resume, replace, replay; imported_secrets; page refusals
];
const filter = process.env.TOKENGATE_TEST_FILTER ?? "";
// A stuck runtime must not hang CI.
setTimeout(() => {
  console.log("tests timed out after 20 minutes");
  process.exit(1);
}, 20 * 60 * 1000).unref();

let passed = 0;
let failed = 0;
const origin = await new Origin().start();
try {
  for (const name of MODULES) {
    const suite = new Suite(name);
    const mod = await import(`./${name}.test.mjs`);
    await mod.default(suite, { origin });
    const tests = suite.tests.filter((t) => `${name}: ${t.name}`.includes(filter));
    if (tests.length === 0) continue;
    let setupError = null;
    try {
      for (const fn of suite.befores) await fn();
    } catch (e) {
      setupError = e;
    }
    for (const t of tests) {
      const label = `${name}: ${t.name}`;
      if (setupError) {
        failed += 1;
        console.log(`FAIL ${label}\n     setup failed: ${setupError.stack ?? setupError}`);
        continue;
      }
      const start = Date.now();
      try {
        const note = await t.fn();
        passed += 1;
        console.log(`ok   ${label} (${Date.now() - start} ms)${note ? ` — ${note}` : ""}`);
      } catch (e) {
        failed += 1;
        console.log(`FAIL ${label}\n     ${String(e.message ?? e).split("\n").join("\n     ")}`);
      }
    }
    for (const fn of suite.afters) {
      try {
        await fn();
      } catch (e) {
        console.log(`warning: ${name} teardown: ${e.message ?? e}`);
      }
    }
  }
} finally {
  await origin.close();
}
console.log(`${passed} passed, ${failed} failed`);
process.exit(failed === 0 && passed > 0 ? 0 : 1);
