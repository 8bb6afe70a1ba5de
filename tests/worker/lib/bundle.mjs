// Bundles built in the tests themselves (the admin CLI is not needed): tokens, records and the
// canonical signing form, written a third time after core/src/bundle.rs and
// conformance/generate.py. The canonical bytes are the compact JSON of the typed model with
// fields in declaration order and without `signature`, which JSON.stringify gives for objects
// built in that order.
import crypto from "node:crypto";
import fs from "node:fs";
import path from "node:path";
import zlib from "node:zlib";
import { fileURLToPath } from "node:url";

const ROOT = path.resolve(path.dirname(fileURLToPath(import.meta.url)), "../../..");
export const VECTORS = JSON.parse(fs.readFileSync(path.join(ROOT, "conformance/vectors.json"), "utf8"));

export const nowSecs = () => Math.floor(Date.now() / 1000);
export const sha256Hex = (text) => crypto.createHash("sha256").update(text).digest("hex");
export const hmacHex = (keyHex, text) =>
  crypto.createHmac("sha256", Buffer.from(keyHex, "hex")).update(text).digest("hex");
export const randomKey = () => crypto.randomBytes(32).toString("hex");

const ALPHABET = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz";
function base62(bytes, width) {
  let n = BigInt(`0x${Buffer.from(bytes).toString("hex") || "0"}`);
  let out = "";
  for (let i = 0; i < width; i++) {
    out = ALPHABET[Number(n % 62n)] + out;
    n /= 62n;
  }
  return out;
}

/** A new token: `<prefix>_<43 base62 of 32 random bytes><6 base62 of the CRC32>`. */
export function makeToken(prefix = "sk_live") {
  const head = `${prefix}_${base62(crypto.randomBytes(32), 43)}`;
  const crc = Buffer.alloc(4);
  crc.writeUInt32BE(zlib.crc32(head) >>> 0);
  return head + base62(crc, 6);
}

/** The same token with a broken checksum. */
export function corrupt(token) {
  const last = token.at(-1);
  return token.slice(0, -1) + (last === "A" ? "B" : "A");
}

/** A token record as the CLI writes it: optional members only when set, no token id. */
export function record(name, token, scopes, opts = {}) {
  return {
    name,
    hash: sha256Hex(token),
    scopes,
    created_at: opts.created_at ?? nowSecs() - 60,
    not_before: opts.not_before,
    expires_at: opts.expires_at,
    revoked_at: opts.revoked_at,
    previous: opts.previous ? { hash: sha256Hex(opts.previous), grace_until: opts.grace_until } : undefined,
  };
}

export function rule(name, match, access = "token", opts = {}) {
  return {
    name,
    path: match,
    methods: opts.methods ?? [],
    host: opts.host ?? null,
    access,
    all_of: opts.all_of ?? [],
    any_of: opts.any_of ?? [],
    cf_access: opts.cf_access ?? false,
  };
}

/** Rebuilds a bundle with every object's fields in the model's declaration order. */
export function canonical(b) {
  // JSON.stringify leaves out members that are undefined: absent optionals are not written.
  const token = (t) => ({
    name: t.name,
    hash: t.hash,
    scopes: t.scopes,
    created_at: t.created_at,
    not_before: t.not_before ?? undefined,
    expires_at: t.expires_at ?? undefined,
    revoked_at: t.revoked_at ?? undefined,
    grace_until: t.grace_until ?? undefined,
    previous: t.previous ? { hash: t.previous.hash, grace_until: t.previous.grace_until } : undefined,
  });
  const r = (x) => rule(x.name, "exact" in x.path ? { exact: x.path.exact } : { prefix: x.path.prefix }, x.access, x);
  return {
    format: b.format ?? "tokengate.bundle/v1",
    version: b.version,
    issued_at: b.issued_at ?? nowSecs(),
    environment: b.environment,
    target: b.target ?? "worker",
    policy: { rules: b.policy.rules.map(r) },
    credentials: { sources: b.credentials.sources, forward: b.credentials.forward ?? false },
    tokens: b.tokens.map(token),
    revoke_all_at: b.revoke_all_at ?? null,
    cloudflare_access: b.cloudflare_access
      ? { certs_url: b.cloudflare_access.certs_url, audiences: b.cloudflare_access.audiences }
      : null,
  };
}

/** Signs a bundle with a hex key over its canonical bytes. */
export function sign(b, keyHex) {
  const body = canonical(b);
  return { ...body, signature: hmacHex(keyHex, JSON.stringify(body)) };
}

/** A bundle with the tests' usual policy: /healthz public, /api needs orders:read. */
export function bundle({ version, environment, tokens, rules, sources, ...rest }) {
  return {
    version,
    environment,
    policy: {
      rules: rules ?? [
        rule("health", { exact: "/healthz" }, "public"),
        rule("api", { prefix: "/api" }, "token", { all_of: ["orders:read"] }),
      ],
    },
    credentials: { sources: sources ?? ["bearer", "header:x-internal-token"] },
    tokens,
    ...rest,
  };
}

/**
 * A fixture bundle moved in time by `delta` seconds (every instant in it), given `version`
 * and signed again: how the conformance cases run at their own `now` on a real clock.
 */
export function retime(fixture, delta, version, keyHex) {
  const shift = (t) => (t === null || t === undefined ? t : t + delta);
  const moved = {
    ...fixture,
    version,
    issued_at: shift(fixture.issued_at),
    revoke_all_at: shift(fixture.revoke_all_at),
    tokens: fixture.tokens.map((t) => ({
      ...t,
      created_at: shift(t.created_at),
      not_before: shift(t.not_before),
      expires_at: shift(t.expires_at),
      revoked_at: shift(t.revoked_at),
      grace_until: shift(t.grace_until),
      previous: t.previous ? { ...t.previous, grace_until: shift(t.previous.grace_until) } : null,
    })),
  };
  return sign(moved, keyHex);
}
