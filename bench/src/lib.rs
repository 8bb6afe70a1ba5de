//! The fixture `benches/decide.rs` measures against: a signed bundle of N tokens with the
//! conformance policy (8 rules, 3 credential sources), and requests shaped as Envoy hands
//! them to the filter (pseudo-headers, `x-forwarded-*`, `x-request-id`, the credential).
//!
//! Tokens are made from fixed bytes (token `i` from `i`), so every run measures the same set.

use ed25519_dalek::{Signer, SigningKey};
use tokengate_core::bundle::{publish, SignatureEntry};
use tokengate_core::keys::key_id;
use tokengate_core::{hex, token, Bundle};

/// The environment the fixture bundles are signed for.
pub const ENVIRONMENT: &str = "bench";
/// Unix seconds the fixture is valid at.
pub const NOW: u64 = 1_767_225_600;

/// The fixture's signing key (the admin's, in a real deployment).
fn signing_key() -> SigningKey {
    SigningKey::from_bytes(&[0xb3; 32])
}

/// The fixture's public key (hex), as the filter reads it from `TOKENGATE_TRUSTED_KEYS`.
pub fn public_key_hex() -> String {
    hex::encode(signing_key().verifying_key().as_bytes())
}

/// The plaintext of fixture token `i` (`sk_live_…`, valid checksum).
pub fn token(i: u64) -> String {
    let mut random = [0x5au8; 32];
    random[..8].copy_from_slice(&i.to_le_bytes());
    match token::generate("sk_live", random) {
        Ok(secret) => secret.expose().to_owned(),
        Err(e) => unreachable!("the fixed prefix is valid: {e}"),
    }
}

/// A token of the right shape that is in no bundle (a lookup that misses).
pub fn unknown_token() -> String {
    token(u64::MAX)
}

/// A token whose checksum fails: rejected before any hashing or lookup.
pub fn bad_checksum_token() -> String {
    let mut t = token(0);
    let last = if t.ends_with('A') { 'B' } else { 'A' };
    t.pop();
    t.push(last);
    t
}

/// The published bundle (text) holding tokens `0..n`, every one with `orders:read`.
pub fn bundle_json(n: u64, version: u64) -> String {
    let rule = |name: &str,
                path: serde_json::Value,
                access: &str,
                methods: &[&str],
                all_of: &[&str],
                any_of: &[&str]| {
        serde_json::json!({"name": name, "path": path, "methods": methods, "host": null,
            "access": access, "all_of": all_of, "any_of": any_of, "cf_access": false})
    };
    let policy = vec![
        rule(
            "health",
            serde_json::json!({"exact": "/healthz"}),
            "public",
            &["GET", "HEAD"],
            &[],
            &[],
        ),
        rule(
            "docs",
            serde_json::json!({"prefix": "/docs"}),
            "public",
            &[],
            &[],
            &[],
        ),
        rule(
            "admin",
            serde_json::json!({"prefix": "/admin"}),
            "token",
            &[],
            &["admin"],
            &[],
        ),
        rule(
            "orders-write",
            serde_json::json!({"prefix": "/api/orders"}),
            "token",
            &["POST", "PUT", "DELETE"],
            &["orders:write"],
            &[],
        ),
        rule(
            "orders-read",
            serde_json::json!({"prefix": "/api/orders"}),
            "token",
            &["GET", "HEAD"],
            &["orders:read"],
            &[],
        ),
        rule(
            "metrics",
            serde_json::json!({"exact": "/metrics"}),
            "token",
            &[],
            &[],
            &["health:read", "metrics:read"],
        ),
        rule(
            "api",
            serde_json::json!({"prefix": "/api"}),
            "token",
            &[],
            &[],
            &[],
        ),
    ];
    let tokens: Vec<serde_json::Value> = (0..n)
        .map(|i| {
            let hash = token::TokenHash::of(token(i).as_bytes());
            serde_json::json!({"name": format!("svc-{i:07}"), "hash": hash.to_hex(),
                "scopes": ["orders:read"], "created_at": NOW - 86_400})
        })
        .collect();
    let document = serde_json::json!({"version": version,
        "issued_at": NOW - 60, "environment": ENVIRONMENT, "target": "envoy",
        "keys": [public_key_hex()],
        "policy": {"rules": policy},
        "credentials": {"sources": ["bearer", "header:x-internal-token", "header:x-internal-api-key"], "forward": false},
        "tokens": tokens});
    let bundle: Bundle = match serde_json::from_value(document) {
        Ok(bundle) => bundle,
        Err(e) => unreachable!("the fixture matches the bundle model: {e}"),
    };
    let payload = serde_json::to_string(&bundle).unwrap_or_default();
    let key = signing_key();
    let signature = SignatureEntry {
        key_id: key_id(key.verifying_key().as_bytes()),
        signature: hex::encode(&key.sign(payload.as_bytes()).to_bytes()),
    };
    publish(&payload, &[signature])
}

/// The request headers Envoy passes to the filter for `GET /api/orders/1` with `credential`
/// as a Bearer token (names lower case, pseudo-headers first).
pub fn envoy_headers(credential: &str) -> Vec<(String, String)> {
    [
        (":authority", "api.internal"),
        (":path", "/api/orders/1"),
        (":method", "GET"),
        (":scheme", "http"),
        ("user-agent", "wrk"),
        ("authorization", &format!("Bearer {credential}")),
        ("x-forwarded-for", "127.0.0.1"),
        ("x-forwarded-proto", "http"),
        ("x-request-id", "6b1a0c52-5d1e-4d3c-9d0e-1f2a3b4c5d6e"),
    ]
    .iter()
    .map(|(n, v)| ((*n).to_owned(), (*v).to_owned()))
    .collect()
}
