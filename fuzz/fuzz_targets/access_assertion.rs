//! Any text as a `Cf-Access-Jwt-Assertion`: parsing and checking never panic.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tokengate_core::access::{Assertion, KeyCheck, Settings};
use tokengate_core::bundle::AccessConfig;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let Ok(settings) = Settings::from_config(&AccessConfig {
        certs_url: "https://team.cloudflareaccess.com/cdn-cgi/access/certs".into(),
        audiences: vec!["aud".into()],
    }) else {
        return;
    };
    if let Ok(assertion) = Assertion::parse(text) {
        let _ = assertion.check(KeyCheck::Verified, &settings, 1_700_000_000);
    }
});
