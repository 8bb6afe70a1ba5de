//! Any bytes as a rate-limit slot read from Envoy's shared data (the proxy-wasm filter's
//! counters): never a panic; a slot that parses is rewritten with exactly one counter for the
//! charged key (counted once more if allowed, unchanged if refused), every other counter whose
//! window is live kept as it was, and nothing else.
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
    let input = std::str::from_utf8(data).expect("a slot that parsed is text");
    let next = String::from_utf8(next).expect("a slot is text");
    let fields = |line: &str| -> (String, u64, u32) {
        let mut f = line.split(' ');
        let key = f.next().expect("key").to_owned();
        let end = f.next().and_then(|v| v.parse().ok()).expect("end");
        let count = f.next().and_then(|v| v.parse().ok()).expect("count");
        (key, end, count)
    };
    let before: Vec<_> = input.lines().map(fields).collect();
    let after: Vec<_> = next.lines().map(fields).collect();
    // Ours: one counter, in the current window, or in the next if another clock started it.
    let ours: Vec<_> = after.iter().filter(|(k, _, _)| *k == limit.key).collect();
    assert_eq!(ours.len(), 1, "one counter for the key: {next:?}");
    let (_, end, count) = ours[0];
    let current = 1_767_225_660;
    let (expected_end, previous) = match before.iter().rev().find(|(k, _, _)| *k == limit.key) {
        Some((_, e, c)) if *e == current || *e == current + 60 => (*e, *c),
        _ => (current, 0),
    };
    assert_eq!(*end, expected_end, "{input:?} -> {next:?}");
    if admission.allowed {
        assert!(previous < 3 && *count == previous + 1, "{input:?} -> {next:?}");
    } else {
        assert!(previous >= 3 && *count == previous, "{input:?} -> {next:?}");
    }
    // Every other live counter is kept as it was; no other counter appears.
    let others_after: Vec<_> = after.iter().filter(|(k, _, _)| *k != limit.key).collect();
    let others_live: Vec<_> = before
        .iter()
        .filter(|(k, e, _)| *k != limit.key && *e > now)
        .collect();
    assert_eq!(others_after, others_live, "{input:?} -> {next:?}");
    assert!(admission.reset >= 1 && admission.reset <= 120);
});
