//! The token format: `<prefix>_<body><check>`.
//!
//! `prefix` is one to three lower-case segments joined by `_` (`sk_live` by default).
//! `body` is 43 base62 characters encoding 32 random bytes (256 bits), `check` is 6 base62
//! characters of the CRC32 of everything before it. The CRC lets a gate reject a mistyped
//! or made-up token without a lookup; it is not a security boundary, the SHA-256 lookup is.
//!
//! At rest only [`TokenHash`] (SHA-256 of the token) and the public [`token_id`] exist.

use core::fmt;

use sha2::{Digest, Sha256};

/// Base62 characters encoding the 256 random bits.
pub const BODY_LEN: usize = 43;
/// Base62 characters of the CRC32 checksum.
pub const CHECK_LEN: usize = 6;
/// The longest credential a gate will hash; longer ones are rejected unread.
pub const MAX_TOKEN_LEN: usize = 512;
/// The shortest secret `import` accepts.
pub const MIN_IMPORTED_LEN: usize = 16;
/// The default prefix of new tokens.
pub const DEFAULT_PREFIX: &str = "sk_live";

/// Matches every tokengate token, for secret scanners (POSIX ERE and Rust `regex` syntax).
pub const TOKEN_REGEX: &str = r"\b[a-z][a-z0-9]{0,15}(_[a-z][a-z0-9]{0,15}){0,2}_[0-9A-Za-z]{49}\b";

const ALPHABET: &[u8; 62] = b"0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz";
const MAX_SEGMENTS: usize = 3;
const MAX_SEGMENT_LEN: usize = 16;

/// Why a prefix or a secret was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum TokenError {
    /// The prefix is not one to three `[a-z][a-z0-9]{0,15}` segments joined by `_`.
    BadPrefix,
    /// An imported secret is shorter than [`MIN_IMPORTED_LEN`] or longer than [`MAX_TOKEN_LEN`].
    BadLength {
        /// The length that was given.
        len: usize,
    },
    /// An imported secret holds a character outside visible ASCII.
    BadCharacter,
    /// An imported secret has the shape of a tokengate token but fails its checksum, so a gate
    /// would reject it before any lookup.
    LooksLikeCorruptToken,
    /// An imported secret has the shape of a JWT (`eyJ…` with a dot): gates read such a
    /// credential as a signed token, never look it up.
    LooksLikeJwt,
}

impl fmt::Display for TokenError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::BadPrefix => write!(
                f,
                "prefix must be 1 to {MAX_SEGMENTS} segments of [a-z][a-z0-9]{{0,15}} joined by '_'"
            ),
            Self::BadLength { len } => write!(
                f,
                "secret is {len} characters; it must be {MIN_IMPORTED_LEN} to {MAX_TOKEN_LEN}"
            ),
            Self::BadCharacter => write!(
                f,
                "secret may hold only visible ASCII characters other than a comma"
            ),
            Self::LooksLikeCorruptToken => write!(
                f,
                "secret looks like a tokengate token but fails its checksum; gates would reject it"
            ),
            Self::LooksLikeJwt => write!(
                f,
                "secret looks like a JWT (eyJ… with a dot); gates read it as a signed token"
            ),
        }
    }
}

impl std::error::Error for TokenError {}

/// A plaintext token. It exists only between creation and the one time it is shown;
/// `Debug` never prints it.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    /// The plaintext, for the one place allowed to show it.
    pub fn expose(&self) -> &str {
        &self.0
    }

    /// The SHA-256 of the plaintext, the only form kept at rest.
    pub fn hash(&self) -> TokenHash {
        TokenHash::of(self.0.as_bytes())
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(<redacted>)")
    }
}

/// SHA-256 of a token: what stores, bundles and KV hold.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TokenHash(pub [u8; 32]);

impl TokenHash {
    /// Hashes a presented credential.
    pub fn of(token: &[u8]) -> Self {
        Self(Sha256::digest(token).into())
    }

    /// Lower-case hex, the form used in bundles and KV keys.
    pub fn to_hex(&self) -> String {
        crate::hex::encode(&self.0)
    }

    /// Parses 64 lower-case hex characters.
    pub fn from_hex(text: &str) -> Option<Self> {
        crate::hex::decode::<32>(text).map(Self)
    }

    /// The short public identifier derived from the hash (safe to log and show).
    pub fn token_id(&self) -> String {
        let mut id = String::with_capacity(4 + 16);
        id.push_str("tid_");
        crate::hex::encode_into(&self.0[..8], &mut id);
        id
    }

    /// Whether `text` is [`TokenHash::token_id`] of this hash (checked without building it).
    pub fn is_token_id(&self, text: &str) -> bool {
        text.strip_prefix("tid_")
            .and_then(crate::hex::decode::<8>)
            .is_some_and(|id| id[..] == self.0[..8])
    }
}

impl fmt::Debug for TokenHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "TokenHash({})", self.to_hex())
    }
}

/// The public token id of a hash; see [`TokenHash::token_id`].
pub fn token_id(hash: &TokenHash) -> String {
    hash.token_id()
}

/// Checks a prefix: one to three `[a-z][a-z0-9]{0,15}` segments joined by `_`.
pub fn validate_prefix(prefix: &str) -> Result<(), TokenError> {
    // Every request with a token-shaped credential comes here: no allocation.
    let mut segments = 0;
    for segment in prefix.split('_') {
        segments += 1;
        if segments > MAX_SEGMENTS || !valid_segment(segment) {
            return Err(TokenError::BadPrefix);
        }
    }
    Ok(())
}

fn valid_segment(segment: &str) -> bool {
    let bytes = segment.as_bytes();
    matches!(bytes.first(), Some(b'a'..=b'z'))
        && bytes.len() <= MAX_SEGMENT_LEN
        && bytes
            .iter()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit())
}

/// Makes a new token from 32 bytes the caller drew from the OS CSPRNG.
pub fn generate(prefix: &str, random: [u8; 32]) -> Result<Secret, TokenError> {
    validate_prefix(prefix)?;
    let mut token = String::with_capacity(prefix.len() + 1 + BODY_LEN + CHECK_LEN);
    token.push_str(prefix);
    token.push('_');
    token.push_str(&base62_fixed(&random, BODY_LEN));
    let check = crc32(token.as_bytes());
    token.push_str(&base62_fixed(&check.to_be_bytes(), CHECK_LEN));
    Ok(Secret(token))
}

/// Accepts an existing shared secret for import: it is hashed like a token, has no checksum.
pub fn import(secret: &str) -> Result<Secret, TokenError> {
    let len = secret.chars().count();
    if !(MIN_IMPORTED_LEN..=MAX_TOKEN_LEN).contains(&len) {
        return Err(TokenError::BadLength { len });
    }
    // A ',' could never be presented: a gate reads a comma-joined header as two credentials.
    if !secret.bytes().all(|b| b.is_ascii_graphic() && b != b',') {
        return Err(TokenError::BadCharacter);
    }
    if shape(secret) == Shape::TokengateBadChecksum {
        return Err(TokenError::LooksLikeCorruptToken);
    }
    if crate::jwt::looks_like(secret) {
        return Err(TokenError::LooksLikeJwt);
    }
    Ok(Secret(secret.to_owned()))
}

/// What a presented credential looks like, before any lookup.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Shape {
    /// A tokengate token whose checksum holds.
    Tokengate,
    /// Has the tokengate shape but the checksum fails: reject without a lookup.
    TokengateBadChecksum,
    /// Anything else (an imported secret, or garbage): only the lookup can tell.
    Other,
}

/// Classifies a credential by its shape and checksum.
pub fn shape(candidate: &str) -> Shape {
    let Some(split) = candidate.rfind('_') else {
        return Shape::Other;
    };
    let (prefix, tail) = (&candidate[..split], &candidate[split + 1..]);
    if tail.len() != BODY_LEN + CHECK_LEN
        || !tail.bytes().all(|b| b.is_ascii_alphanumeric())
        || validate_prefix(prefix).is_err()
    {
        return Shape::Other;
    }
    let (signed, check) = candidate.split_at(candidate.len() - CHECK_LEN);
    // Decoding the six digits and comparing numbers is the same test as encoding the CRC
    // (a fixed-width base62 numeral is unique) without the divisions or an allocation: this
    // runs on every request.
    if base62_value(check.as_bytes()) == Some(u64::from(crc32(signed.as_bytes()))) {
        Shape::Tokengate
    } else {
        Shape::TokengateBadChecksum
    }
}

/// The number a big-endian base62 numeral stands for (`None` for a non-digit or overflow).
fn base62_value(digits: &[u8]) -> Option<u64> {
    digits.iter().try_fold(0u64, |value, &digit| {
        let d = match digit {
            b'0'..=b'9' => digit - b'0',
            b'A'..=b'Z' => digit - b'A' + 10,
            b'a'..=b'z' => digit - b'a' + 36,
            _ => return None,
        };
        value.checked_mul(62)?.checked_add(u64::from(d))
    })
}

/// Big-endian base62 of `bytes`, left-padded with '0' to exactly `width` characters.
fn base62_fixed(bytes: &[u8], width: usize) -> String {
    let mut number = bytes.to_vec();
    let mut digits = Vec::with_capacity(width);
    while digits.len() < width {
        let mut remainder = 0u32;
        for byte in number.iter_mut() {
            let value = (remainder << 8) | u32::from(*byte);
            *byte = (value / 62) as u8;
            remainder = value % 62;
        }
        digits.push(ALPHABET[remainder as usize]);
    }
    digits.reverse();
    digits.into_iter().map(char::from).collect()
}

const CRC_TABLE: [u32; 256] = crc_table();

const fn crc_table() -> [u32; 256] {
    let mut table = [0u32; 256];
    let mut i = 0;
    while i < 256 {
        let mut c = i as u32;
        let mut k = 0;
        while k < 8 {
            c = if c & 1 != 0 {
                0xEDB8_8320 ^ (c >> 1)
            } else {
                c >> 1
            };
            k += 1;
        }
        table[i] = c;
        i += 1;
    }
    table
}

/// CRC-32 (IEEE 802.3, as zlib), the token checksum.
pub fn crc32(bytes: &[u8]) -> u32 {
    let mut crc = !0u32;
    for b in bytes {
        crc = CRC_TABLE[((crc ^ u32::from(*b)) & 0xff) as usize] ^ (crc >> 8);
    }
    !crc
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crc32_matches_the_zlib_check_value() {
        assert_eq!(crc32(b"123456789"), 0xCBF4_3926);
    }

    #[test]
    fn generated_tokens_have_the_published_shape_and_checksum() {
        let token = generate("sk_live", [7u8; 32]).unwrap();
        let text = token.expose();
        assert!(text.starts_with("sk_live_"));
        assert_eq!(text.len(), "sk_live_".len() + 49);
        assert_eq!(shape(text), Shape::Tokengate);
        // Every single-character change is caught by the checksum.
        for i in 8..text.len() {
            let mut bytes = text.as_bytes().to_vec();
            bytes[i] = if bytes[i] == b'a' { b'b' } else { b'a' };
            let changed = String::from_utf8(bytes).unwrap();
            assert_eq!(shape(&changed), Shape::TokengateBadChecksum, "{i}");
        }
    }

    #[test]
    fn the_checksum_test_decodes_exactly_what_generation_encodes() {
        for value in [0u32, 1, 61, 62, 0xCBF4_3926, u32::MAX] {
            let digits = base62_fixed(&value.to_be_bytes(), CHECK_LEN);
            assert_eq!(base62_value(digits.as_bytes()), Some(u64::from(value)));
        }
        // Six digits reach past u32::MAX: such a tail can never be a checksum.
        let body = "0".repeat(BODY_LEN);
        assert_eq!(
            shape(&format!("sk_{body}zzzzzz")),
            Shape::TokengateBadChecksum
        );
        assert_eq!(base62_value(b"0-0000"), None);
    }

    #[test]
    fn body_encodes_all_256_bits() {
        let zero = generate("sk", [0u8; 32]).unwrap();
        let max = generate("sk", [0xff; 32]).unwrap();
        assert_eq!(&zero.expose()[3..3 + BODY_LEN], "0".repeat(BODY_LEN));
        // 2^256 - 1 needs all 43 base62 digits: its leading one is 60 ('y').
        assert!(max.expose()[3..].starts_with('y'));
        assert_ne!(zero.hash(), max.hash());
    }

    #[test]
    fn prefixes_are_validated() {
        for good in ["sk", "sk_live", "sk_test", "ci_prod_v2"] {
            assert_eq!(validate_prefix(good), Ok(()), "{good}");
        }
        for bad in [
            "",
            "SK",
            "sk__live",
            "a_b_c_d",
            "9sk",
            "sk-live",
            "abcdefghijklmnopq",
        ] {
            assert_eq!(validate_prefix(bad), Err(TokenError::BadPrefix), "{bad}");
        }
    }

    #[test]
    fn import_refuses_what_a_gate_could_never_accept() {
        assert!(import(&"a".repeat(64)).is_ok());
        assert_eq!(import("short"), Err(TokenError::BadLength { len: 5 }));
        assert_eq!(import(&"é".repeat(20)), Err(TokenError::BadCharacter));
        assert_eq!(import("has space in it.."), Err(TokenError::BadCharacter));
        let mut corrupt = generate("sk_live", [1; 32]).unwrap().expose().to_owned();
        corrupt.pop();
        corrupt.push('Z');
        assert_eq!(import(&corrupt), Err(TokenError::LooksLikeCorruptToken));
        assert_eq!(
            import("eyJhbGciOiJIUzI1NiJ9.e30.c2ln"),
            Err(TokenError::LooksLikeJwt)
        );
    }

    #[test]
    fn debug_never_shows_the_secret() {
        let token = generate("sk_live", [3; 32]).unwrap();
        assert_eq!(format!("{token:?}"), "Secret(<redacted>)");
    }

    #[test]
    fn token_id_is_short_and_derived_from_the_hash() {
        let hash = TokenHash::of(b"x");
        assert_eq!(hash.token_id(), format!("tid_{}", &hash.to_hex()[..16]));
        assert!(hash.is_token_id(&hash.token_id()));
        let other = TokenHash::of(b"another");
        for wrong in [
            other.token_id(),
            hash.token_id().to_uppercase(),
            hash.to_hex(),
        ] {
            assert!(!hash.is_token_id(&wrong), "{wrong}");
        }
        assert!(!hash.is_token_id(&hash.token_id().replace("tid_", "tid-")));
    }
}
