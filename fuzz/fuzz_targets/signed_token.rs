//! Any text as a signed token (JWT) against an EdDSA and an HS256 issuer: checking never
//! panics, and nothing the fuzzer makes is accepted (it holds neither issuer's key).
#![no_main]

use libfuzzer_sys::fuzz_target;
use tokengate_core::issuer::{Algorithm, IssuerConfig, IssuerSecrets, Issuers};
use tokengate_core::KeySet;

const ADMIN: &str = "d75a980182b10ab7d54bfed3c964073a0ee172f3daa62325af021a68f707511a";
const ISSUER: &str = "3d4017c3e843895a92b70aa74d1b7ebc9c982ccf2ec4968cc0cd55f12af4660c";

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let issuer = |kid: &str, alg, public_key: Option<&str>| IssuerConfig {
        kid: kid.into(),
        alg,
        public_key: public_key.map(str::to_owned),
        audience: None,
        scopes: vec!["*".into()],
        max_lifetime: 3600,
    };
    let configs = [
        issuer("ci", Algorithm::EdDsa, Some(ISSUER)),
        issuer("legacy", Algorithm::Hs256, None),
    ];
    let (Ok(admin), Ok(secrets)) = (
        KeySet::from_hex(&[ADMIN]),
        IssuerSecrets::parse("legacy=c2VjcmV0IG9mIHRoZSBmdXp6IHRhcmdldCwgMzIgYnl0ZXMh"),
    ) else {
        return;
    };
    let Ok(issuers) = Issuers::new(&configs, &[], &admin) else {
        return;
    };
    assert!(
        issuers.check(text, &secrets, None, 1_700_000_000).is_err(),
        "a token nobody signed was accepted"
    );
});
