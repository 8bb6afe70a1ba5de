// Serves the bundled Worker in workerd (Miniflare, local KV) on 127.0.0.1 until SIGTERM, for
// the demo: prints {"port": N} once it is ready. TRUSTED_KEYS is what the Worker's
// TOKENGATE_TRUSTED_KEYS takes: the admin's PUBLIC keys, as `tokengate key public` prints them
// (64 hex each, comma-separated). A Worker is never given a private key. RATE_LIMITS: the
// per-minute limits (requests, comma-separated) to give a Rate Limiting binding each, as
// wrangler.toml would (TOKENGATE_RATE_<n>_PER_MINUTE).
//   node tests/worker/serve.mjs ORIGIN_URL TRUSTED_KEYS ENVIRONMENT [RATE_LIMITS]
import { perMinuteBindings, startWorker } from "./lib/harness.mjs";

const [originUrl, trustedKeys, environment, rateLimits = ""] = process.argv.slice(2);
if (!originUrl || !trustedKeys || !environment) {
  console.error("usage: node tests/worker/serve.mjs ORIGIN_URL TRUSTED_KEYS ENVIRONMENT");
  process.exit(2);
}
const trusted = trustedKeys.split(/[\s,]+/).filter(Boolean);
if (!trusted.every((k) => /^[0-9a-f]{64}$/.test(k))) {
  console.error("TRUSTED_KEYS: public keys of 64 lower-case hex, separated by commas");
  process.exit(2);
}
const limits = rateLimits.split(",").filter(Boolean).map(Number);
if (!limits.every((n) => Number.isInteger(n) && n > 0)) {
  console.error("RATE_LIMITS: requests per minute, positive integers separated by commas");
  process.exit(2);
}
const worker = await startWorker({
  origin: { url: originUrl },
  trusted,
  environment,
  ratelimits: perMinuteBindings(limits),
});
console.log(JSON.stringify({ port: worker.port }));
const stop = async () => {
  await worker.dispose();
  process.exit(0);
};
process.on("SIGTERM", stop);
process.on("SIGINT", stop);
