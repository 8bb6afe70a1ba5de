//! The one JWT path: a compact JWS (RFC 7515) split into what its checks read. Cloudflare
//! Access assertions ([`crate::access`]) and signed tokens ([`crate::issuer`]) both arrive
//! this way and are read by the same code: three unpadded base64url parts, a JSON header
//! whose `alg` and `kid` are strings, a JSON payload, a non-empty signature.
//!
//! Written here instead of taken from a JWT crate, for size: one verify of an EdDSA or HS256
//! JWT into serde claims, `opt-level = "s"`, LTO, stripped, wasm32-wasip1, measured
//! 2026-12-06: `jsonwebtoken` 12 (`rust_crypto`, which pulls rsa, p256, p384 and rand)
//! 659,212 B; `jwt-simple` 0.15 (`pure-rust`) 244,568 B; this module over the primitives the
//! core has anyway (ed25519-dalek, sha2, serde_json) plus `hmac`: 109,315 B. The first alone
//! is 1.5 times the wasm filter's whole size budget.

use serde::{Deserialize, Deserializer};
use serde_json::value::RawValue;

/// The JOSE header members the gates read: `alg` and `kid` (strings, else absent).
#[derive(Debug, Default, Deserialize)]
pub struct Header {
    /// The algorithm the token claims. Never trusted alone: each reader has its own.
    #[serde(default, deserialize_with = "string_or_absent")]
    pub alg: Option<String>,
    /// Which key signed it.
    #[serde(default, deserialize_with = "string_or_absent")]
    pub kid: Option<String>,
    /// Extensions the token says a reader must understand (RFC 7515 §4.1.11): the gates
    /// understand none, so a token that names any is refused.
    #[serde(default)]
    crit: Option<Box<RawValue>>,
}

/// A compact JWS split and decoded, its signature not checked yet.
#[derive(Debug)]
pub struct Compact<'a> {
    /// The decoded header.
    pub header: Header,
    /// The decoded payload (the claims' JSON).
    pub payload: Vec<u8>,
    /// What the signature covers: `<header>.<payload>` exactly as sent.
    pub signed: &'a [u8],
    /// The decoded signature (never empty).
    pub signature: Vec<u8>,
}

/// Splits `jwt` (at most `max_len` bytes) into its parts; `None` unless it is three
/// base64url parts, a header that is a JSON object read one way only, and a signature.
pub fn split(jwt: &str, max_len: usize) -> Option<Compact<'_>> {
    if jwt.len() > max_len {
        return None;
    }
    let mut parts = jwt.split('.');
    let (Some(header), Some(payload), Some(signature), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return None;
    };
    // JSON objects only (serde would read a struct from an array too).
    let object = |bytes: Vec<u8>| {
        let first = bytes.iter().find(|b| !b.is_ascii_whitespace());
        (first == Some(&b'{')).then_some(bytes)
    };
    let header: Header = serde_json::from_slice(&object(base64url_decode(header)?)?).ok()?;
    if header.crit.is_some() {
        return None;
    }
    let payload = object(base64url_decode(payload)?)?;
    let signature = base64url_decode(signature).filter(|s| !s.is_empty())?;
    let signed_len = jwt.len() - jwt.rsplit('.').next().map_or(0, str::len) - 1;
    Some(Compact {
        header,
        payload,
        signed: &jwt.as_bytes()[..signed_len],
        signature,
    })
}

/// Whether a credential is meant as a JWT: it starts with `eyJ` (base64url of `{"`, how
/// every JSON header starts) and holds a dot. A tokengate token holds no dot and `import` refuses secrets of this shape, so no
/// credential is read both ways.
pub fn looks_like(credential: &str) -> bool {
    credential.starts_with("eyJ") && credential.contains('.')
}

/// Decodes unpadded base64url (RFC 7515 §2); padding, other alphabets and stray bits are
/// refused, so every JWT has exactly one accepted encoding.
pub fn base64url_decode(text: &str) -> Option<Vec<u8>> {
    fn value(c: u8) -> Option<u32> {
        match c {
            b'A'..=b'Z' => Some(u32::from(c - b'A')),
            b'a'..=b'z' => Some(u32::from(c - b'a') + 26),
            b'0'..=b'9' => Some(u32::from(c - b'0') + 52),
            b'-' => Some(62),
            b'_' => Some(63),
            _ => None,
        }
    }
    let bytes = text.as_bytes();
    if bytes.len() % 4 == 1 {
        return None;
    }
    let mut out = Vec::with_capacity(bytes.len() * 3 / 4);
    for chunk in bytes.chunks(4) {
        let mut acc = 0u32;
        for (i, &c) in chunk.iter().enumerate() {
            acc |= value(c)? << (18 - 6 * i);
        }
        // n characters carry 6n bits: n - 1 whole bytes and 8 - 2n spare bits, which must be
        // zero so that every byte string has exactly one encoding.
        let n = chunk.len();
        let produced = n - 1;
        let spare = 8 - 2 * n as u32;
        if (acc >> (24 - 6 * n as u32)) & ((1 << spare) - 1) != 0 {
            return None;
        }
        let be = acc.to_be_bytes();
        out.extend_from_slice(&be[1..1 + produced]);
    }
    Some(out)
}

// Claim readers: a claim is typed by the checks, not by serde, so a value of the wrong type
// reads as absent (or present but unusable) instead of failing the whole token. A repeated
// claim still fails it (serde's derive refuses duplicate fields): a JWT whose claims could be
// read two ways is refused.

type Raw = Box<RawValue>;

pub(crate) fn as_string(raw: &RawValue) -> Option<String> {
    serde_json::from_str(raw.get()).ok()
}

pub(crate) fn string_or_absent<'de, D: Deserializer<'de>>(
    d: D,
) -> Result<Option<String>, D::Error> {
    Ok(as_string(&Raw::deserialize(d)?))
}

/// `Some(None)`: present, but not a string.
pub(crate) fn present_string<'de, D: Deserializer<'de>>(
    d: D,
) -> Result<Option<Option<String>>, D::Error> {
    Ok(Some(as_string(&Raw::deserialize(d)?)))
}

/// `aud` as a string, or the strings of an `aud` array.
pub(crate) fn audiences<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<String>, D::Error> {
    let raw = Raw::deserialize(d)?;
    Ok(match serde_json::from_str::<Vec<Raw>>(raw.get()) {
        Ok(items) => items.iter().filter_map(|item| as_string(item)).collect(),
        Err(_) => as_string(&raw).into_iter().collect(),
    })
}

/// A NumericDate: whole seconds (a fractional part is dropped; negatives, exponents and
/// non-numbers are unusable).
fn numeric_date(raw: &RawValue) -> Option<u64> {
    let text = raw.get();
    let (whole, fraction) = text.split_once('.').unwrap_or((text, "0"));
    let digits = |part: &str| !part.is_empty() && part.bytes().all(|b| b.is_ascii_digit());
    if digits(whole) && digits(fraction) {
        whole.parse().ok()
    } else {
        None
    }
}

pub(crate) fn seconds_or_absent<'de, D: Deserializer<'de>>(d: D) -> Result<Option<u64>, D::Error> {
    Ok(numeric_date(&Raw::deserialize(d)?))
}

/// `Some(None)`: present, but not a usable NumericDate.
pub(crate) fn present_seconds<'de, D: Deserializer<'de>>(
    d: D,
) -> Result<Option<Option<u64>>, D::Error> {
    Ok(Some(numeric_date(&Raw::deserialize(d)?)))
}

/// The longest subject (or `jti`) a JWT may carry.
pub const MAX_SUBJECT_LEN: usize = 256;

/// Whether a subject, id or audience is fit for a header and a log field: 1 to
/// [`MAX_SUBJECT_LEN`] visible ASCII characters.
pub fn is_usable(text: &str) -> bool {
    !text.is_empty() && text.len() <= MAX_SUBJECT_LEN && text.bytes().all(|b| b.is_ascii_graphic())
}

/// A claim's value if it [`is_usable`].
pub(crate) fn usable(claim: &Option<String>) -> Option<String> {
    claim.as_ref().filter(|s| is_usable(s)).cloned()
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// Unpadded base64url, for tests (the core never encodes).
    pub(crate) fn b64(bytes: &[u8]) -> String {
        const ALPHABET: &[u8; 64] =
            b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
        let mut out = String::new();
        for chunk in bytes.chunks(3) {
            let mut word = [0u8; 3];
            word[..chunk.len()].copy_from_slice(chunk);
            let n = u32::from(word[0]) << 16 | u32::from(word[1]) << 8 | u32::from(word[2]);
            for i in 0..=chunk.len() {
                out.push(ALPHABET[(n >> (18 - 6 * i) & 63) as usize] as char);
            }
        }
        out
    }

    #[test]
    fn base64url_round_trips_and_is_strict() {
        for len in 0..40 {
            let data: Vec<u8> = (0..len).map(|i| (i * 37 + 11) as u8).collect();
            assert_eq!(base64url_decode(&b64(&data)).as_deref(), Some(&data[..]));
        }
        assert_eq!(base64url_decode("QQ=="), None, "padding");
        assert_eq!(base64url_decode("QQ+/"), None, "standard alphabet");
        assert_eq!(base64url_decode("Q"), None, "impossible length");
        assert_eq!(base64url_decode("QR"), None, "non-zero trailing bits");
        assert_eq!(base64url_decode("QQ"), Some(b"A".to_vec()));
    }

    #[test]
    fn split_takes_three_parts_and_a_signature() {
        let header = b64(br#"{"alg":"EdDSA","kid":"ci"}"#);
        let text = format!("{header}.{}.{}", b64(b"{}"), b64(b"sig"));
        let jws = split(&text, 1024).unwrap();
        assert_eq!(jws.header.alg.as_deref(), Some("EdDSA"));
        assert_eq!(jws.header.kid.as_deref(), Some("ci"));
        assert_eq!(jws.signature, b"sig");
        assert_eq!(jws.signed, format!("{header}.{}", b64(b"{}")).as_bytes());
        assert!(
            split(&text, text.len() - 1).is_none(),
            "longer than allowed"
        );
        for bad in [
            format!("{text}.{}", b64(b"x")),
            format!("{header}.{}.", b64(b"{}")),
            format!("{header}.{}", b64(b"{}")),
            format!("{header}.e30=.{}", b64(b"sig")),
            format!("{}.e30.{}", b64(br#"{"alg":"a","alg":"b"}"#), b64(b"s")),
            format!("{}.e30.{}", b64(b"[]x"), b64(b"s")),
            format!("{}.e30.{}", b64(br#"["EdDSA","ci"]"#), b64(b"s")),
            format!("{header}.{}.{}", b64(b"[1,2]"), b64(b"s")),
            format!(
                "{}.e30.{}",
                b64(br#"{"alg":"EdDSA","crit":["exp"]}"#),
                b64(b"s")
            ),
        ] {
            assert!(split(&bad, 1024).is_none(), "{bad}");
        }
        assert!(looks_like(&text));
        assert!(!looks_like("sk_live_abc"));
        assert!(!looks_like("eyJhbGciOiJIUzI1NiJ9"));
    }
}
