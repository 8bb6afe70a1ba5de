//! Any bytes as what a gate reads of usage from outside its own memory: a usage read's
//! signature header (never a panic; never answered without the trusted key's signature) and a
//! tally's text form (Envoy shared data, the Worker's usage store: never a panic, and what
//! parses encodes back to the same tally).
#![no_main]

use libfuzzer_sys::fuzz_target;
use tokengate_core::usage::{self, Tally};
use tokengate_core::{KeySet, Request};

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    if let Some(tally) = Tally::decode(&text) {
        assert_eq!(Tally::decode(&tally.encode()), Some(tally));
    }
    // The conformance fixtures' key A (public): no fuzz input holds its private key, so no
    // read may pass.
    let keys = KeySet::parse("453d23ef7873c87035321d7828fd74e1509cd1ed13cf5476914f6435da474b7e")
        .expect("the fixture key");
    let headers = [("tokengate-signature", &*text)];
    let request = Request {
        method: "GET",
        path: usage::USAGE_PATH,
        authority: "gate",
        headers: &headers,
    };
    let admit_all = |_| true;
    assert!(usage::authorize(&request, Some((&keys, "prod")), 1_700_000_000, admit_all).is_err());
});
