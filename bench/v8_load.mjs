#!/usr/bin/env node
// Diagnostic, not part of run.sh: the filter's on_configure of a large bundle under Node's V8,
// outside Envoy, to time and profile what a reload costs each VM. Envoy runs V8 with Liftoff
// off (TurboFan only), so run this with --no-liftoff; add --cpu-prof for a profile (needs an
// unstripped build: CARGO_PROFILE_RELEASE_STRIP=false cargo build -p tokengate-plugin
// --target wasm32-wasip1 --release --target-dir target/prof).
//
//   node --no-liftoff bench/v8_load.mjs [--wasm PATH] [--tokens 100000] [--runs 5]
//
// Each run is a fresh instance, as Envoy's canary is. The host side is stubs: only what
// on_configure calls (the configuration buffer, the environment, shared data, metrics, logs).
import fs from "node:fs";
import path from "node:path";
import { fileURLToPath, pathToFileURL } from "node:url";

const ROOT = path.resolve(path.dirname(fileURLToPath(import.meta.url)), "..");
const { makeToken, record, bundle, publish, publicKeyHex, randomKey } = await import(
  pathToFileURL(path.join(ROOT, "tests/worker/lib/bundle.mjs"))
);
const args = Object.fromEntries(
  process.argv.slice(2).reduce((acc, a, i, all) => (a.startsWith("--") ? [...acc, [a.slice(2), all[i + 1]]] : acc), []),
);
const wasmPath = args.wasm ?? path.join(ROOT, "target/wasm32-wasip1/release/tokengate_filter.wasm");
const tokens = Number(args.tokens ?? 100_000);
const runs = Number(args.runs ?? 5);

const key = randomKey();
const environment = "bench";
const records = [];
for (let i = 0; i < tokens; i++) records.push(record(`svc-${i}`, makeToken(), ["orders:read"]));
// The published tokengate.bundle/v2 text, signed with `key`; the VM holds its public key only.
const config = Buffer.from(publish(bundle({ version: 1, environment, tokens: records, target: "envoy" }), [key]));
const module = new WebAssembly.Module(fs.readFileSync(wasmPath));
const environ = [`TOKENGATE_TRUSTED_KEYS=${publicKeyHex(key)}\0`, `TOKENGATE_ENVIRONMENT=${environment}\0`].map((e) => Buffer.from(e));

function start() {
  let exports;
  const bytes = () => new Uint8Array(exports.memory.buffer);
  const view = () => new DataView(exports.memory.buffer);
  const imports = { env: {}, wasi_snapshot_preview1: {} };
  for (const i of WebAssembly.Module.imports(module)) imports[i.module][i.name] = () => 0; // Ok
  Object.assign(imports.env, {
    proxy_get_buffer_bytes: (_type, start, max, ptrOut, sizeOut) => {
      const chunk = config.subarray(start >>> 0, (start >>> 0) + (max >>> 0));
      const at = exports.proxy_on_memory_allocate(chunk.length);
      bytes().set(chunk, at);
      view().setUint32(ptrOut, at, true);
      view().setUint32(sizeOut, chunk.length, true);
      return 0;
    },
    proxy_get_shared_data: () => 1, // NotFound: nothing served yet
    proxy_define_metric: (_type, _name, _len, idOut) => (view().setUint32(idOut, 1, true), 0),
    proxy_log: (_level, at, len) => (console.log(`  filter: ${Buffer.from(bytes().subarray(at, at + len))}`), 0),
  });
  Object.assign(imports.wasi_snapshot_preview1, {
    environ_sizes_get: (countOut, sizeOut) => {
      view().setUint32(countOut, environ.length, true);
      view().setUint32(sizeOut, environ.reduce((n, e) => n + e.length, 0), true);
      return 0;
    },
    environ_get: (pointers, buffer) => {
      for (const [i, e] of environ.entries()) {
        view().setUint32(pointers + 4 * i, buffer, true);
        bytes().set(e, buffer);
        buffer += e.length;
      }
      return 0;
    },
    random_get: (at, len) => (bytes().fill(7, at, at + len), 0),
  });
  exports = new WebAssembly.Instance(module, imports).exports;
  exports._initialize();
  return exports;
}

console.log(`${path.relative(ROOT, wasmPath)} (${fs.statSync(wasmPath).size} bytes), ${tokens} tokens, ${(config.length / 1e6).toFixed(1)} MB`);
for (let r = 0; r < runs; r++) {
  const vm = start();
  vm.proxy_on_context_create(1, 0);
  vm.proxy_on_vm_start(1, 0);
  const t0 = process.hrtime.bigint();
  const ok = vm.proxy_on_configure(1, config.length);
  const ms = Number(process.hrtime.bigint() - t0) / 1e6;
  console.log(`run ${r + 1}: on_configure ${ok ? "accepted" : "REFUSED"} in ${ms.toFixed(0)} ms; linear memory ${(vm.memory.buffer.byteLength / 2 ** 20).toFixed(1)} MiB`);
  if (!ok) process.exit(1);
}
