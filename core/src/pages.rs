//! Paged token sets: how a Worker stores a bundle's records, and how a push of up to
//! [`crate::bundle::MAX_TOKENS`] tokens travels in requests of bounded size.
//!
//! A bundle's lookup records ([`TokenRecord::lookup_records`]: a token, and during a
//! rotation's grace the token it replaced) are split by hash into 2^bits pages: page `i` holds
//! the records whose hash starts with the `bits` bits of `i`, sorted by hash, as a compact JSON
//! array. A page is named by the SHA-256 of its text, so stored pages never change: a Worker
//! keeps them in Workers KV under `page:<sha256>`, and a push whose page is unchanged sends and
//! writes nothing for it.
//!
//! A paged bundle is an ordinary signed `tokengate.bundle/v2` whose `tokens` member is a
//! [`PagedTokens`] (the page digests) instead of the records: the signature covers every
//! digest, so each page is authenticated on its own as it arrives.

use core::fmt;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::bundle::{TokenRecord, MAX_TOKENS};
use crate::gate::Record;
use crate::token::TokenHash;

/// Lookup records a page holds on average at most (the page count grows past this).
pub const RECORDS_PER_PAGE: usize = 256;
/// At most 2^12 = 4096 pages: ~250 records (~60 KB) each at 1,000,000 tokens, and a page
/// list of 270 KB.
pub const MAX_PAGE_BITS: u32 = 12;
/// Pages a bundle may have.
pub const MAX_PAGES: usize = 1 << MAX_PAGE_BITS;
/// Bytes a page may take.
pub const MAX_PAGE_BYTES: usize = 8 * 1024 * 1024;

/// The `tokens` member of a paged bundle.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PagedTokens {
    /// Lower-case hex SHA-256 of each page's text, page 0 first; a power of two of them.
    pub pages: Vec<String>,
    /// Token records in the bundle (a rotation's replaced token is not counted).
    pub tokens: usize,
    /// Whether any record is an imported secret. `false` promises that every record is a
    /// tokengate token, so a credential without that shape cannot match one: a gate decides
    /// it without reading a page.
    pub imported_secrets: bool,
}

impl PagedTokens {
    /// Checks the list's form and returns the page bits.
    pub fn check(&self) -> Result<u32, PageError> {
        let count = self.pages.len();
        if !count.is_power_of_two() || count > MAX_PAGES {
            return Err(PageError::PageCount(count));
        }
        if self.tokens > MAX_TOKENS {
            return Err(PageError::TooManyTokens(self.tokens));
        }
        if let Some(bad) = self.pages.iter().find(|d| !is_digest(d)) {
            return Err(PageError::BadDigest(bad.chars().take(80).collect()));
        }
        Ok(count.trailing_zeros())
    }
}

/// One page: its text and the SHA-256 of that text.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Page {
    /// The compact JSON array of the page's lookup records.
    pub text: String,
    /// Lower-case hex SHA-256 of `text`.
    pub sha256: String,
}

/// Why a page or page list is refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PageError {
    /// The page count is not a power of two from 1 to [`MAX_PAGES`].
    PageCount(usize),
    /// More tokens than [`MAX_TOKENS`].
    TooManyTokens(usize),
    /// A page digest is not 64 lower-case hex characters.
    BadDigest(String),
    /// The page is larger than [`MAX_PAGE_BYTES`].
    TooLarge(usize),
    /// Not a JSON array of token records.
    Json(String),
    /// A record is invalid (its scopes, its hash, its times).
    Record(String),
    /// A record belongs to another page.
    WrongPage {
        /// The record's hash.
        hash: String,
        /// The page it was found in.
        index: usize,
    },
    /// Hashes are not strictly ascending (a duplicate, or out of order).
    Order(String),
}

impl fmt::Display for PageError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::PageCount(n) => write!(
                f,
                "a paged bundle has a power of two of pages, 1 to {MAX_PAGES}; this one has {n}"
            ),
            Self::TooManyTokens(n) => {
                write!(f, "{n} tokens; a bundle holds at most {MAX_TOKENS}")
            }
            Self::BadDigest(d) => write!(f, "page digest {d:?} is not 64 lower-case hex"),
            Self::TooLarge(n) => {
                write!(
                    f,
                    "a page of {n} bytes; at most {MAX_PAGE_BYTES} are allowed"
                )
            }
            Self::Json(e) => write!(f, "a page is a JSON array of token records: {e}"),
            Self::Record(e) => write!(f, "page record: {e}"),
            Self::WrongPage { hash, index } => {
                write!(
                    f,
                    "the record of hash {hash} does not belong in page {index}"
                )
            }
            Self::Order(hash) => write!(
                f,
                "page records must be sorted by hash, each hash once; {hash} is out of order"
            ),
        }
    }
}

impl std::error::Error for PageError {}

/// Page bits for `lookup_records` records: the fewest pages holding [`RECORDS_PER_PAGE`]
/// on average, at most [`MAX_PAGES`].
pub fn page_bits(lookup_records: usize) -> u32 {
    let pages = lookup_records.div_ceil(RECORDS_PER_PAGE).max(1);
    pages
        .next_power_of_two()
        .trailing_zeros()
        .min(MAX_PAGE_BITS)
}

/// The page of a hash: its first `bits` bits.
pub fn page_index(hash: &[u8; 32], bits: u32) -> usize {
    if bits == 0 {
        return 0;
    }
    usize::from(u16::from_be_bytes([hash[0], hash[1]]) >> (16 - bits))
}

/// Lower-case hex SHA-256 of a page's text.
pub fn digest(text: &[u8]) -> String {
    crate::hex::encode(&Sha256::digest(text))
}

fn is_digest(text: &str) -> bool {
    text.len() == 64 && text.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

/// Splits a bundle's tokens into pages (deterministic: the same records give the same
/// pages, whatever their order in the bundle).
pub fn split(tokens: &[TokenRecord]) -> Result<Vec<Page>, PageError> {
    let mut records: Vec<([u8; 32], TokenRecord)> = Vec::with_capacity(tokens.len());
    for record in tokens.iter().flat_map(TokenRecord::lookup_records) {
        let hash = TokenHash::from_hex(&record.hash)
            .ok_or_else(|| PageError::Record(format!("hash {:?} is not hex", record.hash)))?;
        records.push((hash.0, record));
    }
    records.sort_unstable_by_key(|(hash, _)| *hash);
    let bits = page_bits(records.len());
    let mut pages = Vec::with_capacity(1 << bits);
    let mut rest = records.as_slice();
    for index in 0..1usize << bits {
        let end = rest.partition_point(|(hash, _)| page_index(hash, bits) == index);
        let (page, tail) = rest.split_at(end);
        rest = tail;
        let list: Vec<&TokenRecord> = page.iter().map(|(_, r)| r).collect();
        let text = serde_json::to_string(&list).map_err(|e| PageError::Json(e.to_string()))?;
        pages.push(Page {
            sha256: digest(text.as_bytes()),
            text,
        });
    }
    Ok(pages)
}

/// Parses a page and checks that it is page `index` of `2^bits`: valid records, each in
/// this page, sorted by hash, each hash once. Returns the records.
pub fn check_page(text: &[u8], index: usize, bits: u32) -> Result<Vec<TokenRecord>, PageError> {
    if text.len() > MAX_PAGE_BYTES {
        return Err(PageError::TooLarge(text.len()));
    }
    let records: Vec<TokenRecord> =
        serde_json::from_slice(text).map_err(|e| PageError::Json(e.to_string()))?;
    let mut last: Option<[u8; 32]> = None;
    for record in &records {
        if record.previous.is_some() {
            return Err(PageError::Record(format!(
                "{}: a page holds lookup records, without `previous`",
                record.name
            )));
        }
        let parsed =
            Record::from_token_record(record).map_err(|e| PageError::Record(e.to_string()))?;
        let hash = parsed.hash.0;
        if page_index(&hash, bits) != index {
            return Err(PageError::WrongPage {
                hash: record.hash.clone(),
                index,
            });
        }
        if last.is_some_and(|previous| previous >= hash) {
            return Err(PageError::Order(record.hash.clone()));
        }
        last = Some(hash);
    }
    Ok(records)
}

/// The record of `hash` in a stored page, if it holds one.
pub fn find(text: &[u8], hash: &TokenHash) -> Result<Option<Record>, PageError> {
    let records: Vec<TokenRecord> =
        serde_json::from_slice(text).map_err(|e| PageError::Json(e.to_string()))?;
    let wanted = hash.to_hex();
    let Ok(at) = records.binary_search_by(|r| r.hash.as_str().cmp(&wanted)) else {
        return Ok(None);
    };
    Record::from_token_record(&records[at])
        .map(Some)
        .map_err(|e| PageError::Record(e.to_string()))
}

/// A served record that a pending push changes: its incoming record, or `None` when the
/// push drops the hash.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Change {
    /// The hash (lower-case hex).
    pub hash: String,
    /// The record the push brings for it, if any.
    pub record: Option<TokenRecord>,
}

/// The served records in page `index` of `2^bits` (read from any served pages: the served
/// layout may differ) that the incoming page changes or drops. A hash the push adds is not a
/// change: nothing serves it yet.
pub fn changes(
    served: &[TokenRecord],
    incoming: &[TokenRecord],
    index: usize,
    bits: u32,
) -> Vec<Change> {
    let incoming: std::collections::HashMap<&str, &TokenRecord> =
        incoming.iter().map(|r| (r.hash.as_str(), r)).collect();
    served
        .iter()
        .filter(|old| {
            TokenHash::from_hex(&old.hash).is_some_and(|h| page_index(&h.0, bits) == index)
        })
        .filter_map(|old| match incoming.get(old.hash.as_str()) {
            Some(new) if *new == old => None,
            new => Some(Change {
                hash: old.hash.clone(),
                record: new.map(|r| (*r).clone()),
            }),
        })
        .collect()
}

/// The served pages (indices of `2^served_bits`) that hold the hashes of page `index` of
/// `2^bits`.
pub fn overlapping(index: usize, bits: u32, served_bits: u32) -> core::ops::RangeInclusive<usize> {
    // Page ranges in the 16-bit prefix space.
    let first = index << (16 - bits);
    let last = ((index + 1) << (16 - bits)) - 1;
    (first >> (16 - served_bits))..=(last >> (16 - served_bits))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(name: &str, secret: &str) -> TokenRecord {
        TokenRecord {
            name: name.into(),
            hash: TokenHash::of(secret.as_bytes()).to_hex(),
            scopes: vec!["orders:read".into()],
            created_at: 1,
            not_before: None,
            expires_at: None,
            revoked_at: None,
            grace_until: None,
            previous: None,
            rate_limit: None,
        }
    }

    fn records(n: usize) -> Vec<TokenRecord> {
        (0..n)
            .map(|i| record(&format!("t{i}"), &format!("secret-{i}")))
            .collect()
    }

    #[test]
    fn page_count_follows_the_record_count() {
        assert_eq!(page_bits(0), 0);
        assert_eq!(page_bits(256), 0);
        assert_eq!(page_bits(257), 1);
        assert_eq!(page_bits(100_000), 9);
        assert_eq!(page_bits(1_000_000), 12);
        assert_eq!(page_bits(2_000_000), 12);
    }

    #[test]
    fn split_pages_are_checked_found_and_independent_of_order() {
        let tokens = records(1_000);
        let pages = split(&tokens).unwrap();
        assert_eq!(pages.len(), 4);
        let mut reversed = tokens.clone();
        reversed.reverse();
        assert_eq!(split(&reversed).unwrap(), pages);
        let mut total = 0;
        for (index, page) in pages.iter().enumerate() {
            assert_eq!(page.sha256, digest(page.text.as_bytes()));
            total += check_page(page.text.as_bytes(), index, 2).unwrap().len();
            // A page is not valid in another place.
            let other = (index + 1) % 4;
            let moved = check_page(page.text.as_bytes(), other, 2).unwrap_err();
            assert!(matches!(moved, PageError::WrongPage { .. }), "{moved}");
        }
        assert_eq!(total, 1_000);
        for (i, token) in tokens.iter().enumerate().step_by(97) {
            let hash = TokenHash::from_hex(&token.hash).unwrap();
            let page = &pages[page_index(&hash.0, 2)];
            let found = find(page.text.as_bytes(), &hash).unwrap().unwrap();
            assert_eq!(found.name(), format!("t{i}"));
        }
        let absent = TokenHash::of(b"not issued");
        let page = &pages[page_index(&absent.0, 2)];
        assert!(find(page.text.as_bytes(), &absent).unwrap().is_none());
    }

    #[test]
    fn one_changed_token_changes_one_page() {
        let tokens = records(1_000);
        let before = split(&tokens).unwrap();
        let mut changed = tokens.clone();
        changed[10].revoked_at = Some(5);
        let after = split(&changed).unwrap();
        let differing = before.iter().zip(&after).filter(|(a, b)| a != b).count();
        assert_eq!(differing, 1);
    }

    #[test]
    fn a_rotation_is_found_under_both_hashes() {
        let mut rotated = record("r", "new");
        rotated.previous = Some(crate::bundle::PreviousToken {
            hash: TokenHash::of(b"old").to_hex(),
            grace_until: 99,
        });
        let pages = split(&[rotated]).unwrap();
        assert_eq!(pages.len(), 1);
        let old = find(pages[0].text.as_bytes(), &TokenHash::of(b"old"))
            .unwrap()
            .unwrap();
        assert_eq!(old.grace_until, Some(99));
        assert!(find(pages[0].text.as_bytes(), &TokenHash::of(b"new"))
            .unwrap()
            .is_some());
    }

    #[test]
    fn bad_pages_are_refused() {
        let mut two = records(2);
        two.sort_by(|a, b| a.hash.cmp(&b.hash));
        let unsorted = serde_json::to_string(&[&two[1], &two[0]]).unwrap();
        assert!(matches!(
            check_page(unsorted.as_bytes(), 0, 0),
            Err(PageError::Order(_))
        ));
        let duplicate = serde_json::to_string(&[&two[0], &two[0]]).unwrap();
        assert!(matches!(
            check_page(duplicate.as_bytes(), 0, 0),
            Err(PageError::Order(_))
        ));
        let mut with_previous = two[0].clone();
        with_previous.previous = Some(crate::bundle::PreviousToken {
            hash: "a".repeat(64),
            grace_until: 1,
        });
        let text = serde_json::to_string(&[with_previous]).unwrap();
        assert!(matches!(
            check_page(text.as_bytes(), 0, 0),
            Err(PageError::Record(_))
        ));
        for bad in [&b"{}"[..], b"[{\"name\":\"x\"}]", b"[1]", b"not json"] {
            assert!(matches!(check_page(bad, 0, 0), Err(PageError::Json(_))));
        }
        let mut bad_scope = two[0].clone();
        bad_scope.scopes = vec!["NOT A SCOPE".into()];
        let text = serde_json::to_string(&[bad_scope]).unwrap();
        assert!(matches!(
            check_page(text.as_bytes(), 0, 0),
            Err(PageError::Record(_))
        ));
    }

    #[test]
    fn changes_are_the_served_records_a_push_alters_or_drops() {
        let tokens = records(600);
        let mut next = tokens.clone();
        next[3].revoked_at = Some(9);
        next.remove(5);
        next.push(record("new", "new-secret"));
        let before = split(&tokens).unwrap();
        let after = split(&next).unwrap();
        let bits = after.len().trailing_zeros();
        let mut found = Vec::new();
        for (index, page) in after.iter().enumerate() {
            let incoming = check_page(page.text.as_bytes(), index, bits).unwrap();
            let served_bits = before.len().trailing_zeros();
            let mut served = Vec::new();
            for old in overlapping(index, bits, served_bits) {
                served.extend(check_page(before[old].text.as_bytes(), old, served_bits).unwrap());
            }
            found.extend(changes(&served, &incoming, index, bits));
        }
        found.sort_by(|a, b| a.hash.cmp(&b.hash));
        let mut expected = vec![
            Change {
                hash: tokens[3].hash.clone(),
                record: Some(next[3].clone()),
            },
            Change {
                hash: tokens[5].hash.clone(),
                record: None,
            },
        ];
        expected.sort_by(|a, b| a.hash.cmp(&b.hash));
        assert_eq!(found, expected);
    }

    #[test]
    fn overlapping_pages_follow_both_layouts() {
        assert_eq!(overlapping(0, 0, 0), 0..=0);
        assert_eq!(overlapping(3, 2, 2), 3..=3);
        // Fewer served pages: the one that holds this page's range.
        assert_eq!(overlapping(3, 3, 1), 0..=0);
        assert_eq!(overlapping(4, 3, 1), 1..=1);
        // More served pages: every one inside this page's range.
        assert_eq!(overlapping(1, 1, 3), 4..=7);
        assert_eq!(overlapping(0, 0, 12), 0..=4095);
    }

    #[test]
    fn page_lists_are_checked() {
        let list = |pages: usize, tokens| PagedTokens {
            pages: vec!["0".repeat(64); pages],
            tokens,
            imported_secrets: false,
        };
        assert_eq!(list(1, 3).check(), Ok(0));
        assert_eq!(list(4096, 3).check(), Ok(12));
        assert_eq!(list(3, 3).check(), Err(PageError::PageCount(3)));
        assert_eq!(list(0, 0).check(), Err(PageError::PageCount(0)));
        assert_eq!(list(8192, 3).check(), Err(PageError::PageCount(8192)));
        assert!(list(1, MAX_TOKENS + 1).check().is_err());
        let mut upper = list(1, 1);
        upper.pages[0] = "A".repeat(64);
        assert!(matches!(upper.check(), Err(PageError::BadDigest(_))));
    }
}
