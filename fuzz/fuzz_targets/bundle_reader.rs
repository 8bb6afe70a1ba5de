//! Any bytes: the reader and serde's derive accept the same bundles and read them alike
//! (except a `-0` unsigned, which only serde reads), and the reader never panics.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tokengate_core::json::Reader;
use tokengate_core::{Bundle, TokenRecord};

fuzz_target!(|data: &[u8]| {
    let ours = Reader::read_all(data, Bundle::read).ok();
    let oracle: Option<Bundle> = serde_json::from_slice(data).ok();
    if ours != oracle {
        let text = String::from_utf8_lossy(data);
        let signed_zero = text.contains("-0");
        assert!(
            ours.is_none() && signed_zero,
            "reader {:?} vs serde {:?}",
            ours.is_some(),
            oracle.is_some()
        );
    }
    let ours = TokenRecord::from_json(data).ok();
    let oracle: Option<TokenRecord> = serde_json::from_slice(data).ok();
    if ours != oracle {
        assert!(ours.is_none() && String::from_utf8_lossy(data).contains("-0"));
    }
});
