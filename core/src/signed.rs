//! Signed admin requests: a push to the Worker, a usage read from any gate.
//!
//! Each carries `Tokengate-Signature: t=<unix seconds>,<key id>=<hex Ed25519>[,…]`, each
//! signature over `<context>\n<t>\n<body>` by one of the admin's keys. The context names what
//! the request is for, so a signature made for one kind of request is no signature for
//! another; `t` must be within [`WINDOW_SECONDS`] of the gate's clock either way.

use crate::keys::{KeySet, MAX_KEYS};

/// The request header carrying `t=<unix seconds>,<key id>=<hex Ed25519>[,…]`.
pub const SIGNATURE_HEADER: &str = "tokengate-signature";
/// What a push request's signatures cover, before `<t>\n<body>`.
pub const PUSH_CONTEXT: &str = "tokengate.push/v2";
/// What a usage read's signatures cover, before `<t>\n<environment>`.
pub const USAGE_CONTEXT: &str = "tokengate.usage/v1";
/// How far `t` may be from the gate's clock, either way.
pub const WINDOW_SECONDS: u64 = 300;

/// A parsed `Tokengate-Signature` header: the time and each `(key id, signature)`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RequestSignatures {
    /// Unix seconds at signing.
    pub t: u64,
    /// `(kid_<16 hex>, <128 hex>)`, distinct key ids.
    pub signatures: Vec<(String, String)>,
}

/// Why a signed request was refused (every case answers 401).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SignedError {
    /// No header, or one that does not parse: `invalid_signature`.
    Malformed,
    /// Not signed by a trusted key, or a signature that fails: `invalid_signature`.
    Invalid(String),
    /// Signed further than [`WINDOW_SECONDS`] from now: `signature_expired`.
    Expired {
        /// Seconds between `t` and the gate's clock.
        skew: u64,
    },
}

impl SignedError {
    /// The stable `error` code of the refusal.
    pub fn code(&self) -> &'static str {
        match self {
            Self::Malformed | Self::Invalid(_) => "invalid_signature",
            Self::Expired { .. } => "signature_expired",
        }
    }

    /// What was wrong, for the operator, given the request's `context`.
    pub fn describe(&self, context: &str) -> String {
        match self {
            Self::Malformed => format!(
                "{SIGNATURE_HEADER} must be t=<unix seconds>,<key id>=<hex Ed25519 of \"{context}\\n<t>\\n<body>\">[,…]"
            ),
            Self::Invalid(why) => format!("request signature: {why}"),
            Self::Expired { skew } => format!(
                "the request was signed {skew} s away from the gate's clock; at most {WINDOW_SECONDS} s are allowed: sign it again"
            ),
        }
    }
}

/// Parses `t=<digits>,<kid_16 hex>=<128 hex>[,…]` (spaces after commas allowed). Anything
/// else (a member it does not know, a repeat, no signature, more than the key limit) is
/// `None`: a header that could be read two ways is refused.
pub fn parse_signature_header(value: &str) -> Option<RequestSignatures> {
    let lower_hex = |text: &str, len: usize| {
        text.len() == len && text.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
    };
    let mut t = None;
    let mut signatures: Vec<(String, String)> = Vec::new();
    for member in value.split(',') {
        let (name, val) = member.trim().split_once('=')?;
        if name == "t" {
            let digits =
                !val.is_empty() && val.len() <= 19 && val.bytes().all(|b| b.is_ascii_digit());
            if t.is_some() || !digits {
                return None;
            }
            t = Some(val.parse().ok()?);
        } else {
            let id = name.strip_prefix("kid_")?;
            if !lower_hex(id, 16)
                || !lower_hex(val, 128)
                || signatures.iter().any(|(k, _)| k == name)
            {
                return None;
            }
            signatures.push((name.to_owned(), val.to_owned()));
        }
    }
    if signatures.is_empty() || signatures.len() > MAX_KEYS {
        return None;
    }
    Some(RequestSignatures { t: t?, signatures })
}

/// Checks the request signatures over `<context>\n<t>\n<body>` against the trusted keys,
/// then their window around `now`.
pub fn verify(
    trusted: &KeySet,
    context: &str,
    signed: &RequestSignatures,
    body: &[u8],
    now: u64,
) -> Result<(), SignedError> {
    let mut message = format!("{context}\n{}\n", signed.t).into_bytes();
    message.extend_from_slice(body);
    let pairs = signed
        .signatures
        .iter()
        .map(|(id, signature)| (id.as_str(), signature.as_str()));
    trusted
        .check(&message, pairs)
        .map_err(|e| SignedError::Invalid(e.to_string()))?;
    let skew = now.abs_diff(signed.t);
    if skew > WINDOW_SECONDS {
        return Err(SignedError::Expired { skew });
    }
    Ok(())
}

/// Parses the header (`None`: absent) and verifies it: [`parse_signature_header`], then
/// [`verify`].
pub fn check(
    trusted: &KeySet,
    context: &str,
    header: Option<&str>,
    body: &[u8],
    now: u64,
) -> Result<(), SignedError> {
    let signed = header
        .and_then(parse_signature_header)
        .ok_or(SignedError::Malformed)?;
    verify(trusted, context, &signed, body, now)
}

#[cfg(test)]
mod tests {
    use super::*;
    use ed25519_dalek::Signer;

    const CONTEXT: &str = PUSH_CONTEXT;

    fn key(seed: u8) -> (ed25519_dalek::SigningKey, String, String) {
        let signing = ed25519_dalek::SigningKey::from_bytes(&[seed; 32]);
        let public = crate::hex::encode(signing.verifying_key().as_bytes());
        let id = crate::keys::key_id(signing.verifying_key().as_bytes());
        (signing, public, id)
    }

    fn header(signing: &ed25519_dalek::SigningKey, id: &str, t: u64, body: &str) -> String {
        let message = format!("{CONTEXT}\n{t}\n{body}");
        let signature = crate::hex::encode(&signing.sign(message.as_bytes()).to_bytes());
        format!("t={t},{id}={signature}")
    }

    #[test]
    fn signature_header_parsing() {
        let sig = "ab".repeat(64);
        let id = "kid_0123456789abcdef";
        let parsed = parse_signature_header(&format!("t=17, {id}={sig}")).unwrap();
        assert_eq!(parsed.t, 17);
        assert_eq!(parsed.signatures, vec![(id.to_owned(), sig.clone())]);
        let two = format!("t=17,{id}={sig},kid_fedcba9876543210={sig}");
        assert_eq!(parse_signature_header(&two).unwrap().signatures.len(), 2);
        for bad in [
            String::new(),
            "t=17".to_owned(),
            format!("{id}={sig}"),
            format!("t=-1,{id}={sig}"),
            format!("t=1,t=2,{id}={sig}"),
            format!("t=1,{id}={}", "AB".repeat(64)),
            format!("t=1,{id}={}", "ab".repeat(63)),
            format!("t=1,{id}={sig},{id}={sig}"),
            format!("t=1,kid_0123={sig}"),
            format!("t=1,v1={}", "ab".repeat(32)),
            format!("t=1;{id}={sig}"),
        ] {
            assert_eq!(parse_signature_header(&bad), None, "{bad}");
        }
    }

    #[test]
    fn requests_are_verified_against_trusted_keys_then_windowed() {
        let (ka, a, id_a) = key(7);
        let (kb, _, id_b) = key(8);
        let trusted = KeySet::parse(&a).unwrap();
        let body = r#"{"x":1}"#;
        let signed = |k, id: &str, t| header(k, id, t, body);
        let run = |header: &str, body: &str, now| {
            check(&trusted, CONTEXT, Some(header), body.as_bytes(), now).map_err(|e| e.code())
        };
        assert_eq!(run(&signed(&ka, &id_a, 1000), body, 1000), Ok(()));
        assert_eq!(run(&signed(&ka, &id_a, 1000), body, 1300), Ok(()));
        assert_eq!(run(&signed(&ka, &id_a, 1000), body, 700), Ok(()));
        for now in [1301, 699] {
            assert_eq!(
                run(&signed(&ka, &id_a, 1000), body, now),
                Err("signature_expired")
            );
        }
        let tampered = run(&signed(&ka, &id_a, 1000), r#"{"x":2}"#, 1000);
        assert_eq!(tampered, Err("invalid_signature"));
        // Another key, and another key under the trusted key's id.
        assert_eq!(
            run(&signed(&kb, &id_b, 1000), body, 1000),
            Err("invalid_signature")
        );
        assert_eq!(
            run(&signed(&kb, &id_a, 1000), body, 1000),
            Err("invalid_signature")
        );
        // A bundle signature is no request signature, and a push's is no usage read's.
        let bare = crate::hex::encode(&ka.sign(body.as_bytes()).to_bytes());
        assert!(run(&format!("t=1000,{id_a}={bare}"), body, 1000).is_err());
        let push = signed(&ka, &id_a, 1000);
        assert_eq!(
            check(&trusted, USAGE_CONTEXT, Some(&push), body.as_bytes(), 1000)
                .map_err(|e| e.code()),
            Err("invalid_signature")
        );
        assert_eq!(
            check(&trusted, CONTEXT, None, b"", 1000),
            Err(SignedError::Malformed)
        );
    }
}
