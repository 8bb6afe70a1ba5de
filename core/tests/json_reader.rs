//! The bundle reader (`tokengate_core::json`) against serde's derived deserialiser as the
//! oracle: on every conformance bundle and on thousands of damaged ones, both accept the
//! same documents and read them to the same `Bundle`. The reader is what every target
//! runs; the derive stays for the admin's own files and for this comparison.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // test helpers: a failure is the report

use tokengate_conformance as conformance;
use tokengate_core::json::Reader;
use tokengate_core::{Bundle, TokenRecord};

fn ours(text: &[u8]) -> Option<Bundle> {
    Reader::read_all(text, Bundle::read).ok()
}

fn oracle(text: &[u8]) -> Option<Bundle> {
    serde_json::from_slice(text).ok()
}

/// A bundle using every member, rotation and Access included.
fn rich_bundle() -> String {
    let suite = conformance::load().unwrap();
    let mut bundle: serde_json::Value =
        serde_json::from_str(&suite.bundle_text("main", "worker").unwrap()).unwrap();
    bundle["revoke_all_at"] = 1_700_000_000u64.into();
    bundle["cloudflare_access"] = serde_json::json!({
        "certs_url": "https://team.cloudflareaccess.com/cdn-cgi/access/certs",
        "audiences": ["aud1", "a\"u\\d\u{e9}"],
    });
    let tokens = bundle["tokens"].as_array_mut().unwrap();
    tokens[0]["previous"] = serde_json::json!({
        "hash": "ab", "grace_until": 5,
    });
    tokens[1]["expires_at"] = 7u64.into();
    // Absent members as earlier releases wrote them (null), and a lookup record's grace.
    for member in ["not_before", "revoked_at", "previous"] {
        tokens[2][member] = serde_json::Value::Null;
    }
    tokens[3]["grace_until"] = 9u64.into();
    serde_json::to_string_pretty(&bundle).unwrap()
}

/// Where the reader is stricter than serde on purpose; nothing else may differ. (It also
/// reads the `token_id` member earlier releases wrote, which serde refuses; no bundle here
/// has one, and `bundle.rs` tests it.)
fn stricter_on_purpose(text: &[u8]) -> bool {
    let text = String::from_utf8_lossy(text);
    // serde reads `-0` as an unsigned 0; a bundle never writes a sign.
    text.contains(":-0") || text.contains(": -0")
}

#[test]
fn every_conformance_bundle_reads_the_same() {
    let suite = conformance::load().unwrap();
    let mut read = 0;
    for (name, targets) in &suite.bundles {
        for target in targets.keys() {
            let text = suite.bundle_text(name, target).unwrap();
            let bundle = ours(text.as_bytes()).expect("the reader accepts it");
            assert_eq!(Some(bundle), oracle(text.as_bytes()), "{name}/{target}");
            read += 1;
        }
    }
    assert!(read >= 8, "only {read} bundles");
    let rich = rich_bundle();
    assert!(ours(rich.as_bytes()).is_some());
    assert_eq!(ours(rich.as_bytes()), oracle(rich.as_bytes()));
}

fn agree(text: &[u8], what: &str) {
    let (a, b) = (ours(text), oracle(text));
    if a != b && !(a.is_none() && stricter_on_purpose(text)) {
        panic!(
            "{what}: reader {} but serde {}:\n{}",
            if a.is_some() { "accepts" } else { "refuses" },
            if b.is_some() { "accepts" } else { "refuses" },
            String::from_utf8_lossy(text)
        );
    }
}

#[test]
fn damaged_bundles_are_refused_exactly_when_serde_refuses_them() {
    let text = rich_bundle().into_bytes();
    // Every truncation, every single deleted byte, and a set of replacements at every byte.
    for at in 0..text.len() {
        agree(&text[..at], "truncated");
        let mut deleted = text.clone();
        deleted.remove(at);
        agree(&deleted, "byte deleted");
        for replacement in *b"\"\\{}[]:,0-9en .x\x01\xff" {
            let mut replaced = text.clone();
            replaced[at] = replacement;
            agree(&replaced, "byte replaced");
        }
    }
}

#[test]
fn member_level_damage_is_refused_exactly_when_serde_refuses_it() {
    let text = rich_bundle();
    let values = [
        "null",
        "true",
        "0",
        "-1",
        "1.5",
        "1e3",
        "18446744073709551616",
        "\"\"",
        "\"x\"",
        "[]",
        "[\"a\"]",
        "[1]",
        "{}",
        "{\"exact\":\"/a\"}",
        "{\"prefix\":\"/a\",\"exact\":\"/b\"}",
        "\"public\"",
        "\"token\"",
        "\"worker\"",
        "\"\\u0074oken\"",
    ];
    // Each member in turn: its value replaced, the member repeated, an unknown one added.
    let keys: Vec<usize> = text.match_indices("\": ").map(|(at, _)| at + 3).collect();
    for &start in &keys {
        let end = value_end(text.as_bytes(), start);
        for value in values {
            let damaged = format!("{}{value}{}", &text[..start], &text[end..]);
            agree(damaged.as_bytes(), "value replaced");
        }
        let key_start = text[..start - 3].rfind('"').unwrap();
        let member = &text[key_start..end];
        let repeated = format!("{}, {member}{}", &text[..end], &text[end..]);
        agree(repeated.as_bytes(), "member repeated");
        let removed = format!("{}\"zz_unknown\": 1{}", &text[..key_start], &text[end..]);
        agree(removed.as_bytes(), "member replaced by an unknown one");
        let without = strip_member(&text, key_start, end);
        agree(without.as_bytes(), "member removed");
    }
}

/// The end of the JSON value starting at `start` (strings, nesting and escapes aware).
fn value_end(text: &[u8], start: usize) -> usize {
    let (mut depth, mut at, mut in_string) = (0i32, start, false);
    while at < text.len() {
        let b = text[at];
        if in_string {
            match b {
                b'\\' => at += 1,
                b'"' => {
                    in_string = false;
                    if depth == 0 {
                        return at + 1;
                    }
                }
                _ => {}
            }
        } else {
            match b {
                b'"' => in_string = true,
                b'{' | b'[' => depth += 1,
                b'}' | b']' if depth == 0 => return at,
                b'}' | b']' => {
                    depth -= 1;
                    if depth == 0 {
                        return at + 1;
                    }
                }
                b',' | b'\n' if depth == 0 => return at,
                _ => {}
            }
        }
        at += 1;
    }
    at
}

/// `text` without the member at `key_start..end` and its separating comma.
fn strip_member(text: &str, key_start: usize, end: usize) -> String {
    let after = text[end..].trim_start();
    if let Some(rest) = after.strip_prefix(',') {
        format!("{}{}", &text[..key_start], rest)
    } else {
        let before = text[..key_start].trim_end();
        let before = before.strip_suffix(',').unwrap_or(before);
        format!("{before}{}", &text[end..])
    }
}

#[test]
fn token_records_read_alone_like_in_a_bundle() {
    let suite = conformance::load().unwrap();
    let bundle = ours(suite.bundle_text("main", "worker").unwrap().as_bytes()).unwrap();
    for record in bundle.tokens.iter().flat_map(TokenRecord::lookup_records) {
        let text = serde_json::to_string(&record).unwrap();
        assert_eq!(TokenRecord::from_json(text.as_bytes()), Ok(record));
    }
    let error = TokenRecord::from_json(br#"{"name":"a","name":"b"}"#).unwrap_err();
    assert_eq!(error.to_string(), "duplicate field `name` at byte 12");
}
