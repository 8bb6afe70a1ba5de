// Serves the bundled Worker in workerd (Miniflare, local KV) on 127.0.0.1 until SIGTERM, for
// the demo: prints {"port": N} once it is ready. TRUSTED_KEYS is what the Worker's
// TOKENGATE_TRUSTED_KEYS takes: the admin's PUBLIC keys, as `tokengate key public` prints them
// (64 hex each, comma-separated). A Worker is never given a private key.
//   node tests/worker/serve.mjs ORIGIN_URL TRUSTED_KEYS ENVIRONMENT
import { startWorker } from "./lib/harness.mjs";

const [originUrl, trustedKeys, environment] = process.argv.slice(2);
if (!originUrl || !trustedKeys || !environment) {
  console.error("usage: node tests/worker/serve.mjs ORIGIN_URL TRUSTED_KEYS ENVIRONMENT");
  process.exit(2);
}
const trusted = trustedKeys.split(/[\s,]+/).filter(Boolean);
if (!trusted.every((k) => /^[0-9a-f]{64}$/.test(k))) {
  console.error("TRUSTED_KEYS: public keys of 64 lower-case hex, separated by commas");
  process.exit(2);
}
const worker = await startWorker({ origin: { url: originUrl }, trusted, environment });
console.log(JSON.stringify({ port: worker.port }));
const stop = async () => {
  await worker.dispose();
  process.exit(0);
};
process.on("SIGTERM", stop);
process.on("SIGINT", stop);
