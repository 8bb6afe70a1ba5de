//! Any bytes as a published bundle (envelope, signatures, payload, token records), and as a
//! payload on its own: loading and validating never panic, and nothing loads unless a
//! trusted key signed exactly its payload's bytes.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tokengate_core::{Bundle, Expectation, Gate, KeySet, Target};

/// The conformance vectors' trusted key (conformance/generate.py, key A).
const TRUSTED: &str = "453d23ef7873c87035321d7828fd74e1509cd1ed13cf5476914f6435da474b7e";

fuzz_target!(|data: &[u8]| {
    let Ok(trusted) = KeySet::parse(TRUSTED) else {
        return;
    };
    let expect = Expectation {
        target: Target::Envoy,
        environment: None,
        newer_than: None,
    };
    if let Ok(gate) = Gate::load(data, &trusted, &expect) {
        // Only the unmodified fixture bundles can get here.
        assert!(gate.token_count() <= 100);
    }
    // The payload's own checks, without the signature in the way.
    if let Ok(bundle) = serde_json::from_slice::<Bundle>(data) {
        let _ = Gate::from_bundle(bundle);
    }
});
