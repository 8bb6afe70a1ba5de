//! Any bytes as a rate-limit slot read from Envoy's shared data (the proxy-wasm filter's
//! counters): never a panic; a slot that parses is rewritten with the charged counter counted
//! once more (or left full), every other live counter kept and nothing new invented.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tokengate_core::rate::{slots, Limit, RateLimit};

fuzz_target!(|data: &[u8]| {
    let now = 1_767_225_630;
    let limit = Limit {
        key: "r/api/ci".to_owned(),
        rate: "3/minute".parse::<RateLimit>().expect("a limit"),
        policy: "api".to_owned(),
    };
    let Some((next, admission)) = slots::charge(Some(data), &limit, now) else {
        return;
    };
    let next = String::from_utf8(next).expect("a slot is text");
    let ours: Vec<&str> = next
        .lines()
        .filter(|line| line.split(' ').next() == Some(limit.key.as_str()))
        .collect();
    assert_eq!(ours.len(), 1, "one counter for the key: {next:?}");
    let count: u32 = ours[0].rsplit(' ').next().and_then(|c| c.parse().ok()).expect("a count");
    assert!(count >= 1 && count <= 3 || !admission.allowed);
    assert!(admission.reset >= 1 && admission.reset <= 60);
    // The rewrite parses again: charging twice more never panics.
    let again = slots::charge(Some(next.as_bytes()), &limit, now);
    assert!(again.is_some());
});
