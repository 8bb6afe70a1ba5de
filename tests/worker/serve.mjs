// Serves the bundled Worker in workerd (Miniflare, local KV) on 127.0.0.1 until SIGTERM, for
// the demo: prints {"port": N} once it is ready.
//   node tests/worker/serve.mjs ORIGIN_URL PUSH_KEY_HEX ENVIRONMENT
import { startWorker } from "./lib/harness.mjs";

const [originUrl, key, environment] = process.argv.slice(2);
if (!originUrl || !key || !environment) {
  console.error("usage: node tests/worker/serve.mjs ORIGIN_URL PUSH_KEY_HEX ENVIRONMENT");
  process.exit(2);
}
const worker = await startWorker({ origin: { url: originUrl }, key, environment });
console.log(JSON.stringify({ port: worker.port }));
const stop = async () => {
  await worker.dispose();
  process.exit(0);
};
process.on("SIGTERM", stop);
process.on("SIGINT", stop);
