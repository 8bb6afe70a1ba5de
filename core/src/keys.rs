//! The admin's Ed25519 public keys as a gate holds them: parsed, named by key id, verified
//! with `verify_strict`. No private key ever reaches this module; signing is the admin's.

use core::fmt;

use ed25519_dalek::{Signature, VerifyingKey};
use sha2::{Digest, Sha256};

/// Keys one set may hold (a bundle's `keys`, a gate's trusted set).
pub const MAX_KEYS: usize = 8;
/// Bytes of an Ed25519 public key.
pub const PUBLIC_KEY_LEN: usize = 32;
/// Bytes of an Ed25519 signature.
pub const SIGNATURE_LEN: usize = 64;

/// One Ed25519 public key and the id derived from it.
#[derive(Clone, PartialEq, Eq)]
pub struct PublicKey {
    key: VerifyingKey,
    id: String,
}

impl PublicKey {
    /// From 64 lower-case hex characters. Small-order ("weak") keys are refused: no signature
    /// by one means anything.
    pub fn from_hex(text: &str) -> Result<Self, KeyError> {
        let bytes = crate::hex::decode::<PUBLIC_KEY_LEN>(text)
            .ok_or_else(|| KeyError::Malformed(text.chars().take(80).collect()))?;
        Self::from_bytes(&bytes)
    }

    /// From the 32 raw bytes.
    pub fn from_bytes(bytes: &[u8; PUBLIC_KEY_LEN]) -> Result<Self, KeyError> {
        let key = VerifyingKey::from_bytes(bytes)
            .map_err(|_| KeyError::Malformed(crate::hex::encode(bytes)))?;
        if key.is_weak() {
            return Err(KeyError::Weak(crate::hex::encode(bytes)));
        }
        Ok(Self {
            key,
            id: key_id(bytes),
        })
    }

    /// `kid_` + the first 16 hex digits of SHA-256 of the key's bytes.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// The 64 hex characters.
    pub fn to_hex(&self) -> String {
        crate::hex::encode(self.key.as_bytes())
    }

    /// Whether `signature` (128 hex) is this key's over exactly `message`.
    pub fn verifies(&self, message: &[u8], signature_hex: &str) -> bool {
        let Some(bytes) = crate::hex::decode::<SIGNATURE_LEN>(signature_hex) else {
            return false;
        };
        self.key
            .verify_strict(message, &Signature::from_bytes(&bytes))
            .is_ok()
    }
}

impl fmt::Debug for PublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.id)
    }
}

/// The key id of raw public-key bytes.
pub fn key_id(public_key: &[u8; PUBLIC_KEY_LEN]) -> String {
    let digest = Sha256::digest(public_key);
    format!("kid_{}", &crate::hex::encode(&digest[..8]))
}

/// A set of 1 to [`MAX_KEYS`] distinct public keys: what a gate trusts, or what a bundle
/// publishes.
#[derive(Clone, PartialEq, Eq)]
pub struct KeySet(Vec<PublicKey>);

impl KeySet {
    /// From hex public keys.
    pub fn from_hex<S: AsRef<str>>(keys: &[S]) -> Result<Self, KeyError> {
        if keys.is_empty() || keys.len() > MAX_KEYS {
            return Err(KeyError::Count(keys.len()));
        }
        let mut set: Vec<PublicKey> = Vec::with_capacity(keys.len());
        for text in keys {
            let key = PublicKey::from_hex(text.as_ref())?;
            if set.iter().any(|k| k.id == key.id) {
                return Err(KeyError::Duplicate(key.id));
            }
            set.push(key);
        }
        Ok(Self(set))
    }

    /// From text as a gate's configuration gives it: hex keys separated by commas and/or
    /// white space (`TOKENGATE_TRUSTED_KEYS`).
    pub fn parse(text: &str) -> Result<Self, KeyError> {
        let keys: Vec<&str> = text
            .split(|c: char| c == ',' || c.is_whitespace())
            .filter(|k| !k.is_empty())
            .collect();
        Self::from_hex(&keys)
    }

    /// The key with this id.
    pub fn get(&self, id: &str) -> Option<&PublicKey> {
        self.0.iter().find(|k| k.id == id)
    }

    /// The keys, in order.
    pub fn keys(&self) -> &[PublicKey] {
        &self.0
    }

    /// The key ids, comma-separated (for logs and status answers).
    pub fn ids(&self) -> String {
        self.0
            .iter()
            .map(|k| k.id.as_str())
            .collect::<Vec<_>>()
            .join(",")
    }

    /// The text form [`KeySet::parse`] reads: hex keys joined by commas.
    pub fn to_text(&self) -> String {
        self.0
            .iter()
            .map(PublicKey::to_hex)
            .collect::<Vec<_>>()
            .join(",")
    }

    /// Checks signatures `(key id, hex signature)` over `message`: at least one must be by a
    /// key of this set, and every one by a key of this set must verify. Signatures by other
    /// keys are not this set's to judge (during a rotation they are other gates' keys).
    pub fn check<'a>(
        &self,
        message: &[u8],
        signatures: impl IntoIterator<Item = (&'a str, &'a str)>,
    ) -> Result<(), SignatureError> {
        let mut verified = false;
        for (id, signature) in signatures {
            if let Some(key) = self.get(id) {
                if !key.verifies(message, signature) {
                    return Err(SignatureError::Invalid(id.to_owned()));
                }
                verified = true;
            }
        }
        if verified {
            Ok(())
        } else {
            Err(SignatureError::Untrusted(self.ids()))
        }
    }
}

impl fmt::Debug for KeySet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_list().entries(&self.0).finish()
    }
}

/// Why a public key or key set was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum KeyError {
    /// Not 64 lower-case hex characters of a valid Ed25519 point.
    Malformed(String),
    /// A small-order point: any signature "verifies" with it.
    Weak(String),
    /// Fewer than one or more than [`MAX_KEYS`] keys.
    Count(usize),
    /// The same key twice.
    Duplicate(String),
}

impl fmt::Display for KeyError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Malformed(k) => write!(
                f,
                "public key {k:?} is not 64 lower-case hex characters of an Ed25519 key"
            ),
            Self::Weak(k) => write!(f, "public key {k} is a small-order point, never trusted"),
            Self::Count(n) => write!(f, "{n} public keys; a key set holds 1 to {MAX_KEYS}"),
            Self::Duplicate(id) => write!(f, "public key {id} is listed twice"),
        }
    }
}

impl std::error::Error for KeyError {}

/// Why signatures were refused.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum SignatureError {
    /// No signature is by a trusted key (the trusted key ids).
    Untrusted(String),
    /// The signature by this trusted key does not verify.
    Invalid(String),
}

impl fmt::Display for SignatureError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Untrusted(ids) => write!(f, "no signature is by a trusted key ({ids})"),
            Self::Invalid(id) => write!(f, "the signature by {id} does not verify"),
        }
    }
}

impl std::error::Error for SignatureError {}

#[cfg(test)]
mod tests {
    use super::*;
    use ed25519_dalek::{Signer, SigningKey};

    fn pair(seed: u8) -> (SigningKey, String) {
        let signing = SigningKey::from_bytes(&[seed; 32]);
        let public = crate::hex::encode(signing.verifying_key().as_bytes());
        (signing, public)
    }

    fn sign(key: &SigningKey, message: &[u8]) -> String {
        crate::hex::encode(&key.sign(message).to_bytes())
    }

    #[test]
    fn key_ids_are_derived_and_sets_parse_commas_and_spaces() {
        let (_, a) = pair(1);
        let (_, b) = pair(2);
        let set = KeySet::parse(&format!(" {a},\n{b} ")).unwrap();
        assert_eq!(set.keys().len(), 2);
        let id = set.keys()[0].id();
        assert!(id.starts_with("kid_") && id.len() == 20);
        assert_eq!(set.to_text(), format!("{a},{b}"));
        assert_eq!(KeySet::parse(""), Err(KeyError::Count(0)));
        assert!(matches!(
            KeySet::parse(&format!("{a},{a}")),
            Err(KeyError::Duplicate(_))
        ));
        assert!(matches!(
            KeySet::parse(&a.to_uppercase()),
            Err(KeyError::Malformed(_))
        ));
        // The identity point is small-order: refused as a key.
        let identity = format!("01{}", "0".repeat(62));
        assert!(matches!(KeySet::parse(&identity), Err(KeyError::Weak(_))));
    }

    #[test]
    fn one_trusted_valid_signature_is_needed_and_every_trusted_one_must_verify() {
        let (ka, a) = pair(1);
        let (kb, b) = pair(2);
        let only_a = KeySet::parse(&a).unwrap();
        let both = KeySet::parse(&format!("{a},{b}")).unwrap();
        let id_a = both.keys()[0].id().to_owned();
        let id_b = both.keys()[1].id().to_owned();
        let msg = b"{\"version\":1}";
        let sig_a = sign(&ka, msg);
        let sig_b = sign(&kb, msg);
        assert_eq!(only_a.check(msg, [(id_a.as_str(), sig_a.as_str())]), Ok(()));
        // B's signature is ignored by a gate that trusts only A, as long as A's verifies.
        let two = [
            (id_a.as_str(), sig_a.as_str()),
            (id_b.as_str(), sig_b.as_str()),
        ];
        assert_eq!(only_a.check(msg, two), Ok(()));
        assert!(matches!(
            only_a.check(msg, [(id_b.as_str(), sig_b.as_str())]),
            Err(SignatureError::Untrusted(_))
        ));
        // A trusted key's signature that fails refuses, even beside a valid one.
        let bad = [
            (id_b.as_str(), sig_a.as_str()),
            (id_a.as_str(), sig_a.as_str()),
        ];
        assert_eq!(
            both.check(msg, bad),
            Err(SignatureError::Invalid(id_b.clone()))
        );
        // One byte of the message changed.
        assert!(only_a
            .check(b"{\"version\":2}", [(id_a.as_str(), sig_a.as_str())])
            .is_err());
    }
}
