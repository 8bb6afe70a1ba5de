// Bundles built in the tests themselves (the admin CLI is not needed): tokens, records, keys
// and the published tokengate.bundle/v2 text, written a third time after core/src/bundle.rs
// and conformance/generate.py from docs/trust.md. The signatures cover the payload's exact
// bytes, so the published text is built by concatenation around JSON.stringify of a payload
// whose objects are built in the documented member order.
import crypto from "node:crypto";
import fs from "node:fs";
import path from "node:path";
import zlib from "node:zlib";
import { fileURLToPath } from "node:url";

const ROOT = path.resolve(path.dirname(fileURLToPath(import.meta.url)), "../../..");
export const VECTORS = JSON.parse(fs.readFileSync(path.join(ROOT, "conformance/vectors.json"), "utf8"));

export const FORMAT = "tokengate.bundle/v2";
export const PUSH_CONTEXT = "tokengate.push/v2";

export const nowSecs = () => Math.floor(Date.now() / 1000);
export const sha256Hex = (text) => crypto.createHash("sha256").update(text).digest("hex");
/** HMAC-SHA256, hex: only for what release v1 did (a v1 bundle, a v1 push header). */
export const hmacHex = (keyHex, text) =>
  crypto.createHmac("sha256", Buffer.from(keyHex, "hex")).update(text).digest("hex");

// --- keys ------------------------------------------------------------------------------
/** The fixed PKCS#8 DER header of an Ed25519 private key; the 32-byte seed follows it. */
const PKCS8_ED25519 = Buffer.from("302e020100300506032b657004220420", "hex");
const privateKeys = new Map();

function privateKey(seedHex) {
  if (!/^[0-9a-f]{64}$/.test(seedHex)) throw new Error(`not a 64-hex Ed25519 seed: ${String(seedHex).slice(0, 12)}…`);
  let key = privateKeys.get(seedHex);
  if (!key) {
    key = crypto.createPrivateKey({
      key: Buffer.concat([PKCS8_ED25519, Buffer.from(seedHex, "hex")]),
      format: "der",
      type: "pkcs8",
    });
    privateKeys.set(seedHex, key);
  }
  return key;
}

/** A new admin private key: a 32-byte Ed25519 seed as 64 lower-case hex. */
export const randomKey = () => crypto.randomBytes(32).toString("hex");

/** The public key of a seed: the 32 raw bytes (the end of the SPKI DER), as 64 hex. */
export function publicKeyHex(seedHex) {
  const spki = crypto.createPublicKey(privateKey(seedHex)).export({ format: "der", type: "spki" });
  return spki.subarray(-32).toString("hex");
}

/** The key id of a public key: "kid_" + the first 16 hex of SHA-256 of its 32 bytes. */
export const keyIdOfPublic = (publicHex) =>
  `kid_${crypto.createHash("sha256").update(Buffer.from(publicHex, "hex")).digest("hex").slice(0, 16)}`;

/** The key id of a seed's public key. */
export const keyId = (seedHex) => keyIdOfPublic(publicKeyHex(seedHex));

/** Ed25519 over the UTF-8 bytes of `text`, as 128 hex. */
export const signHex = (seedHex, text) =>
  crypto.sign(null, Buffer.from(text, "utf8"), privateKey(seedHex)).toString("hex");

/** The conformance fixtures' private keys: sha256("tokengate conformance key A"), … B. */
export const FIXTURE_SEEDS = {
  A: sha256Hex("tokengate conformance key A"),
  B: sha256Hex("tokengate conformance key B"),
};

/** The fixture seeds whose public keys are in `publicKeys` (the ones a test can sign with). */
export function fixtureSeedsFor(publicKeys) {
  return Object.values(FIXTURE_SEEDS).filter((s) => publicKeys.includes(publicKeyHex(s)));
}

// --- tokens ----------------------------------------------------------------------------
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

/**
 * A token record as the CLI writes it: optional members only when set, no token id.
 * `opts.rate_limit`: the token's own limit, {requests, per: "second" | "minute" | "hour"}.
 */
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
    rate_limit: opts.rate_limit,
  };
}

/** A policy rule; `opts.rate_limit` ({requests, per}) is written only when set, last. */
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
    ...(opts.rate_limit ? { rate_limit: rateLimit(opts.rate_limit) } : {}),
  };
}

/** A rate limit with its members in order: requests, per. */
const rateLimit = (r) => (r ? { requests: r.requests, per: r.per } : undefined);

// --- the payload and the published text ------------------------------------------------
/**
 * A payload with every object's members in the documented order: version, issued_at,
 * environment, target, keys, policy, credentials, tokens, then revoke_all_at,
 * cloudflare_access, issuers and revoked_jtis only when set (a rule's and a token's
 * `rate_limit` last, when set). `keys` defaults to the public keys of `seeds`. `tokens` is
 * an array of token records (an inline bundle) or a paged bundle's
 * {pages, tokens, imported_secrets} (see `publishPaged`).
 */
export function payloadOf(b, seeds = []) {
  // JSON.stringify leaves out members that are undefined: absent optionals are not written.
  const token = (t) => ({
    name: t.name,
    hash: t.hash,
    scopes: t.scopes,
    created_at: t.created_at,
    not_before: t.not_before ?? undefined,
    expires_at: t.expires_at ?? undefined,
    revoked_at: t.revoked_at ?? undefined,
    previous: t.previous ? { hash: t.previous.hash, grace_until: t.previous.grace_until } : undefined,
    rate_limit: rateLimit(t.rate_limit),
  });
  const r = (x) => rule(x.name, "exact" in x.path ? { exact: x.path.exact } : { prefix: x.path.prefix }, x.access, x);
  const out = {
    version: b.version,
    issued_at: b.issued_at ?? nowSecs(),
    environment: b.environment,
    target: b.target ?? "worker",
    keys: b.keys ?? seeds.map(publicKeyHex),
    policy: { rules: b.policy.rules.map(r) },
    credentials: { sources: b.credentials.sources, forward: b.credentials.forward ?? false },
    tokens: Array.isArray(b.tokens) ? b.tokens.map(token) : pagedTokens(b.tokens),
  };
  if (b.revoke_all_at !== null && b.revoke_all_at !== undefined) out.revoke_all_at = b.revoke_all_at;
  if (b.cloudflare_access) {
    out.cloudflare_access = { certs_url: b.cloudflare_access.certs_url, audiences: b.cloudflare_access.audiences };
  }
  // Issuers of signed tokens and their revoked ids: written only when there are any.
  if (b.issuers?.length) out.issuers = b.issuers.map(issuer);
  if (b.revoked_jtis?.length) out.revoked_jtis = b.revoked_jtis.map((r) => ({ issuer: r.issuer, jti: r.jti }));
  return out;
}

/**
 * An issuer with its members in order: kid, alg, public_key (EdDSA only), audience (if any),
 * scopes, max_lifetime. A member this does not know is an error, never dropped: a re-signed
 * bundle must say what the fixture says.
 */
const ISSUER_MEMBERS = ["kid", "alg", "public_key", "audience", "scopes", "max_lifetime"];
const issuer = (i) => {
  const unknown = Object.keys(i).filter((k) => !ISSUER_MEMBERS.includes(k));
  if (unknown.length) throw new Error(`issuer ${i.kid}: members this re-signer does not know: ${unknown}`);
  return Object.fromEntries(ISSUER_MEMBERS.filter((k) => i[k] !== undefined).map((k) => [k, i[k]]));
};

/** A paged bundle's `tokens`, members in order: pages, tokens, imported_secrets. */
const pagedTokens = (t) => ({ pages: t.pages, tokens: t.tokens, imported_secrets: t.imported_secrets });

/** What a bundle signature covers (docs/trust.md): exactly the payload text. */
export const bundleMessage = (payloadText) => payloadText;

/** What a push signature covers: "tokengate.push/v2\n<t>\n" + the body. */
export const pushMessage = (t, bodyText) => `${PUSH_CONTEXT}\n${t}\n${bodyText}`;

/** One envelope signature: a key's Ed25519 over the bundle message. */
export const bundleSignature = (seedHex, payloadText) => ({
  key_id: keyId(seedHex),
  signature: signHex(seedHex, bundleMessage(payloadText)),
});

/**
 * The published text around a payload text taken verbatim, signed by `seeds` (or carrying
 * the given `signatures`). `format` and `extra` (text after the payload) make broken ones.
 */
export function envelope(payloadText, seeds, { signatures, format = FORMAT, extra = "" } = {}) {
  const sigs = signatures ?? seeds.map((s) => bundleSignature(s, payloadText));
  return `{"format":${JSON.stringify(format)},"signatures":${JSON.stringify(sigs)},"payload":${payloadText}${extra}}`;
}

/** The published bundle text: the payload in its member order, signed by every seed. */
export function publish(payload, seeds) {
  return envelope(JSON.stringify(payloadOf(payload, seeds)), seeds);
}

/** The payload object of a published text. */
export const payloadOfText = (text) => JSON.parse(text).payload;

/**
 * The Tokengate-Signature header value of a push: `t=<t>,<kid>=<hex>,…`, each key's
 * Ed25519 over "tokengate.push/v2\n<t>\n" + the body.
 */
export function pushSignature(seeds, t, bodyText) {
  const signed = pushMessage(t, bodyText);
  return [`t=${t}`, ...seeds.map((s) => `${keyId(s)}=${signHex(s, signed)}`)].join(",");
}

/** What a usage read's signature covers (core/src/signed.rs): context, t, environment. */
export const USAGE_CONTEXT = "tokengate.usage/v1";
export const usageMessage = (t, environment) => `${USAGE_CONTEXT}\n${t}\n${environment}`;

/**
 * The Tokengate-Signature header value of a usage read: `t=<t>,<kid>=<hex>,…`, each key's
 * Ed25519 over "tokengate.usage/v1\n<t>\n" + the environment.
 */
export function usageSignature(seeds, t, environment) {
  const signed = usageMessage(t, environment);
  return [`t=${t}`, ...seeds.map((s) => `${keyId(s)}=${signHex(s, signed)}`)].join(",");
}

/** A payload with the tests' usual policy: /healthz public, /api needs orders:read. */
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
 * A fixture bundle (published text) moved in time by `delta` seconds (every instant in its
 * payload), given `version` and published again signed by `seeds` (its `keys` kept): how
 * the conformance cases run at their own `now` on a real clock. Its issuers and revoked
 * token ids are kept as they are: a signed token's instants are its own, not the bundle's.
 */
export function retime(fixtureText, delta, version, seeds) {
  const fixture = payloadOfText(fixtureText);
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
      previous: t.previous ? { ...t.previous, grace_until: shift(t.previous.grace_until) } : null,
    })),
  };
  return publish(moved, seeds);
}

// --- pages (core/src/pages.rs, the push protocol of issue #15) ---------------------------
// A bundle's lookup records split by hash into 2^bits pages; each page is the compact JSON
// array of its records, sorted by hash, stored in KV as page:<sha256 of the text>. A paged
// bundle's payload names the pages by digest instead of carrying the records.

/** Records per page the split aims at, and the most bits (4096 pages). */
export const PAGE_RECORDS = 256;
export const MAX_PAGE_BITS = 12;

/** The smallest b in 0..=12 with ceil(n / 256) <= 2^b (12 at most), n lookup records. */
export function pageBits(n) {
  const need = Math.ceil(n / PAGE_RECORDS);
  for (let b = 0; b < MAX_PAGE_BITS; b++) if (need <= 2 ** b) return b;
  return MAX_PAGE_BITS;
}

/** The page a hash belongs in: the first `bits` bits of its first two bytes, big-endian. */
export const pageOf = (hash, bits) => (bits === 0 ? 0 : parseInt(hash.slice(0, 4), 16) >> (16 - bits));

/** A lookup record with the TokenRecord members in order, absent optional ones left out. */
const lookupRecord = (r, hash, grace_until) => ({
  name: r.name,
  hash,
  scopes: r.scopes,
  created_at: r.created_at,
  not_before: r.not_before ?? undefined,
  expires_at: r.expires_at ?? undefined,
  revoked_at: r.revoked_at ?? undefined,
  grace_until: grace_until ?? undefined,
  rate_limit: rateLimit(r.rate_limit),
});

/**
 * The records a gate looks up (TokenRecord::lookup_records): each token as it is (without
 * `previous`) and, for a rotated one, its previous hash as a second record with the same
 * name, scopes and instants and `grace_until` set.
 */
export function lookupRecords(tokens) {
  const out = [];
  for (const t of tokens) {
    out.push(lookupRecord(t, t.hash, t.grace_until));
    if (t.previous) out.push(lookupRecord(t, t.previous.hash, t.previous.grace_until));
  }
  return out;
}

const byHash = (a, b) => (a.hash < b.hash ? -1 : a.hash > b.hash ? 1 : 0);

/** The page texts of lookup records split into 2^bits pages (`[]` for an empty one). */
export function pageTexts(records, bits = pageBits(records.length)) {
  const buckets = Array.from({ length: 2 ** bits }, () => []);
  for (const r of records) buckets[pageOf(r.hash, bits)].push(r);
  return buckets.map((b) => JSON.stringify(b.sort(byHash)));
}

/**
 * A bundle's pages: { bits, texts (by index), digests (lower-case hex SHA-256 of each text),
 * records (the lookup records' count) } of its token records. `bits` overrides the split.
 */
export function pagesOf(tokens, { bits } = {}) {
  const records = lookupRecords(tokens);
  const b = bits ?? pageBits(records.length);
  const texts = pageTexts(records, b);
  return { bits: b, texts, digests: texts.map(sha256Hex), records: records.length };
}

/**
 * A paged bundle: the published text of `payload` (as `publish` makes it, signed by `seeds`)
 * whose `tokens` is {"pages": [digests], "tokens": N, "imported_secrets": bool}, N the number
 * of token records in `payload.tokens`. Returns { text, pages (the page texts by index),
 * digests, bits, version }. `pages` replaces the page texts (crafted ones, for refusals).
 */
export function publishPaged(payload, seeds, { importedSecrets = false, pages = null, bits } = {}) {
  const split = pages ? null : pagesOf(payload.tokens, { bits });
  const texts = pages ?? split.texts;
  const digests = texts.map(sha256Hex);
  const tokens = { pages: digests, tokens: payload.tokens.length, imported_secrets: importedSecrets };
  const text = publish({ ...payload, tokens }, seeds);
  return { text, pages: texts, digests, bits: split?.bits ?? Math.log2(texts.length), version: payload.version };
}

/** A token record for a hash alone (no secret exists): enough to fill a large bundle. */
export function hashRecord(name, hash, scopes, opts = {}) {
  return { name, hash, scopes, created_at: opts.created_at ?? nowSecs() - 60, revoked_at: opts.revoked_at };
}

/** 32 random bytes as 64 lower-case hex: a token hash nobody holds a secret for. */
export const randomHash = () => crypto.randomBytes(32).toString("hex");
