//! Any bytes as a request (method, path, authority, header pairs) decided by the conformance
//! bundle's gate: never a panic, and never an Allow that leaves an inbound identity header
//! (`x-tokengate-*`, `_` read as `-`) in place or forwards a credential.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tokengate_core::decision::is_identity_header;
use tokengate_core::{Bundle, Gate, Outcome, Request};

/// The conformance fixture "main" (its payload), built once.
fn gate() -> &'static Gate {
    static GATE: std::sync::OnceLock<Gate> = std::sync::OnceLock::new();
    GATE.get_or_init(|| {
        let text = include_str!("../seeds/bundle_load/main-envoy.payload.json");
        let bundle: Bundle = serde_json::from_str(text).expect("the fixture payload");
        Gate::from_bundle(bundle).expect("the fixture loads")
    })
}

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    // Lines: method, path, authority, then `name: value` headers.
    let mut lines = text.split('\n');
    let (Some(method), Some(path), Some(authority)) = (lines.next(), lines.next(), lines.next())
    else {
        return;
    };
    let headers: Vec<(&str, &str)> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(n, v)| (n, v.trim_start()))
        .collect();
    let request = Request {
        method,
        path,
        authority,
        headers: &headers,
    };
    // Far enough from every fixture lifetime edge not to matter.
    let decision = gate().decide(&request, 1_767_225_600);
    if decision.outcome == Outcome::Allow {
        for &(name, _) in &headers {
            let removed = decision.remove_headers.contains(&name.to_ascii_lowercase());
            let replaced = decision.add_headers.iter().any(|(n, _)| n.eq_ignore_ascii_case(name));
            if is_identity_header(name) {
                assert!(removed || replaced, "{name} reaches the upstream");
            }
            // The fixture's named sources (a non-Bearer Authorization is the upstream's).
            let named = ["x-internal-token", "x-internal-api-key"];
            if named.iter().any(|c| c.eq_ignore_ascii_case(name)) {
                assert!(removed, "credential header {name} reaches the upstream");
            }
        }
    }
});
