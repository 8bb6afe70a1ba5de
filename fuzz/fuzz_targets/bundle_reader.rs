//! Any bytes: the reader and serde's derive accept the same bundles and read them alike,
//! and the reader never panics. Two differences are on purpose: a `-0` unsigned, which only
//! serde reads, and the `token_id` member records carried before 2026-12-02, which only the
//! reader reads (checked against the hash, then dropped): for those, serde judges the same
//! text with every `token_id` member taken out.
#![no_main]

use libfuzzer_sys::fuzz_target;
use serde_json::Value;
use tokengate_core::json::Reader;
use tokengate_core::{Bundle, TokenRecord};

/// `data` as a JSON value with the earlier releases' `token_id` members taken out of its
/// token records (and of the tokens they replaced).
fn without_token_ids(data: &[u8], records: fn(&mut Value) -> Vec<&mut Value>) -> Option<Value> {
    let mut value: Value = serde_json::from_slice(data).ok()?;
    for record in records(&mut value) {
        if let Some(record) = record.as_object_mut() {
            record.remove("token_id");
            if let Some(Value::Object(previous)) = record.get_mut("previous") {
                previous.remove("token_id");
            }
        }
    }
    Some(value)
}

fn bundle_records(bundle: &mut Value) -> Vec<&mut Value> {
    match bundle.get_mut("tokens") {
        Some(Value::Array(tokens)) => tokens.iter_mut().collect(),
        _ => Vec::new(),
    }
}

fn record_itself(record: &mut Value) -> Vec<&mut Value> {
    vec![record]
}

fn agree<T: PartialEq + std::fmt::Debug>(data: &[u8], ours: Option<T>, theirs: Option<T>) {
    if ours != theirs {
        let signed_zero = String::from_utf8_lossy(data).contains("-0");
        assert!(
            ours.is_none() && signed_zero,
            "reader {:?} vs serde {:?}",
            ours.is_some(),
            theirs.is_some()
        );
    }
}

fuzz_target!(|data: &[u8]| {
    let ours = Reader::read_all(data, Bundle::read).ok();
    let mut theirs: Option<Bundle> = serde_json::from_slice(data).ok();
    if ours.is_some() && theirs.is_none() {
        theirs =
            without_token_ids(data, bundle_records).and_then(|v| serde_json::from_value(v).ok());
    }
    agree(data, ours, theirs);
    let ours = TokenRecord::from_json(data).ok();
    let mut theirs: Option<TokenRecord> = serde_json::from_slice(data).ok();
    if ours.is_some() && theirs.is_none() {
        theirs =
            without_token_ids(data, record_itself).and_then(|v| serde_json::from_value(v).ok());
    }
    agree(data, ours, theirs);
});
