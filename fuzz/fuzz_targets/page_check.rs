//! Any bytes as page `index` of a paged push (the Worker's page request body): never a
//! panic; a page that passes holds only records of that page, sorted, each found again by
//! `find` under its own hash, and the same text is refused in any other page.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tokengate_core::pages::{check_page, find};
use tokengate_core::token::TokenHash;

fuzz_target!(|data: &[u8]| {
    // The first byte picks the layout: bits 0..=12 and an index inside it.
    let Some((&pick, text)) = data.split_first() else {
        return;
    };
    let bits = u32::from(pick % 13);
    let index = usize::from(pick / 13) % (1 << bits);
    let Ok(records) = check_page(text, index, bits) else {
        return;
    };
    for record in &records {
        let hash = TokenHash::from_hex(&record.hash).expect("a checked record has a hex hash");
        let found = find(text, &hash).expect("a checked page parses");
        assert!(found.is_some(), "a record of a checked page is not found");
    }
    if bits > 0 && !records.is_empty() {
        let other = (index + 1) % (1 << bits);
        assert!(check_page(text, other, bits).is_err(), "a page checks in two places");
    }
});
