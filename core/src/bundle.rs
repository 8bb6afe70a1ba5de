//! The `tokengate.bundle/v2` document: what the admin signs and every gate loads.
//!
//! As published, a bundle is an envelope around its payload:
//! `{"format":"tokengate.bundle/v2","signatures":[{"key_id","signature"}],"payload":{…}}`.
//! Each Ed25519 signature covers the exact bytes of the `payload` value as they stand in the
//! text, so no gate re-derives a canonical form and none copies the payload to verify it.
//! [`Envelope::open`] checks the envelope and the signatures against the keys a gate trusts;
//! what the payload says is checked when the gate is built ([`crate::gate`]).

use core::fmt;

use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;

use crate::credentials::SourceError;
use crate::issuer::{IssuerConfig, IssuerError, RevokedJti};
use crate::keys::{self, KeyError, KeySet, SignatureError};
use crate::policy::{Policy, PolicyError};
use crate::rate::RateLimit;

/// The `format` of every v2 envelope.
pub const FORMAT: &str = "tokengate.bundle/v2";
/// Tokens a bundle may hold.
pub const MAX_TOKENS: usize = 1_000_000;
/// Bytes a bundle may take.
pub const MAX_BUNDLE_BYTES: usize = 256 * 1024 * 1024;

/// Which kind of gate a bundle is signed for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Target {
    /// Envoy: the dynamic module or the proxy-wasm filter.
    Envoy,
    /// The Cloudflare Worker.
    Worker,
}

impl fmt::Display for Target {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Envoy => "envoy",
            Self::Worker => "worker",
        })
    }
}

/// The payload: everything the signatures cover. `Tokens` is the token list as read: owned
/// records where the whole bundle is held (the CLI, the Worker's push), the raw text where a
/// gate streams them into its table.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Bundle<Tokens = Vec<TokenRecord>> {
    /// Monotonic; a gate only ever accepts a newer one.
    pub version: u64,
    /// Unix seconds at signing.
    pub issued_at: u64,
    /// The environment this bundle is for (e.g. `prod`).
    pub environment: String,
    /// The kind of gate this bundle is for.
    pub target: Target,
    /// The admin's published public keys (hex): what a gate trusts after this bundle.
    pub keys: Vec<String>,
    /// The route policy.
    pub policy: Policy,
    /// Where credentials are read from.
    pub credentials: CredentialConfig,
    /// Token records: hashes only.
    pub tokens: Tokens,
    /// Emergency cut-off: every token created at or before this instant is revoked.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub revoke_all_at: Option<u64>,
    /// Cloudflare Access settings, for rules with `cf_access` (the Worker only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cloudflare_access: Option<AccessConfig>,
    /// The issuers whose signed tokens every gate accepts.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub issuers: Vec<IssuerConfig>,
    /// Signed tokens revoked before their expiry, by issuer and `jti`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub revoked_jtis: Vec<RevokedJti>,
}

/// Credential configuration.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CredentialConfig {
    /// Ordered sources: `bearer`, `header:<name>`, `query:<name>`.
    pub sources: Vec<String>,
    /// Whether the credential itself goes on to the upstream (default: no).
    #[serde(default)]
    pub forward: bool,
}

/// Where a Worker finds the Access team's signing keys and which audiences it accepts.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AccessConfig {
    /// The team's certs URL (`https://<team>.cloudflareaccess.com/cdn-cgi/access/certs`).
    pub certs_url: String,
    /// Accepted `aud` values (the applications' audience tags).
    pub audiences: Vec<String>,
}

/// One token, as every gate sees it: no plaintext. Absent optional members are left out of
/// the serialised form (a large bundle is mostly records); the public token id is derived
/// from the hash where it is needed ([`crate::token::TokenHash::token_id`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TokenRecord {
    /// Unique name; becomes `x-tokengate-subject`.
    pub name: String,
    /// Lower-case hex SHA-256 of the token.
    pub hash: String,
    /// Granted scopes (`x:y`, `x:*`, `*`).
    pub scopes: Vec<String>,
    /// Unix seconds of creation.
    pub created_at: u64,
    /// Not valid before this instant.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub not_before: Option<u64>,
    /// Not valid at or after this instant.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires_at: Option<u64>,
    /// Revoked at this instant (any value revokes).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub revoked_at: Option<u64>,
    /// This hash stops being valid at this instant. The CLI never writes it in a bundle (a
    /// rotation rides on `previous`); it is set on the lookup record of a replaced token
    /// (see [`TokenRecord::lookup_records`]), and honoured wherever it is set.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub grace_until: Option<u64>,
    /// The token this one replaced by rotation, valid until the end of its grace period.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub previous: Option<PreviousToken>,
    /// The token's own rate limit, across every rule it is used on (a rule's limit applies
    /// too).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate_limit: Option<RateLimit>,
}

/// The token a rotation replaced. It keeps the name and scopes of the record it hangs off,
/// so the upstream sees the same subject during the grace period.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PreviousToken {
    /// Lower-case hex SHA-256 of the old token.
    pub hash: String,
    /// The old token is valid until this instant (exclusive).
    pub grace_until: u64,
}

impl TokenRecord {
    /// Parses one record on its own (a Worker's KV value).
    pub fn from_json(text: &[u8]) -> Result<Self, serde_json::Error> {
        serde_json::from_slice(text)
    }

    /// One record per hash a gate recognises: this token and, during a rotation's grace,
    /// the token it replaced (same name and scopes, its own hash, `grace_until` set).
    /// This is the form a Worker stores in KV, keyed by hash.
    pub fn lookup_records(&self) -> Vec<TokenRecord> {
        let current = TokenRecord {
            previous: None,
            ..self.clone()
        };
        let mut out = vec![current];
        if let Some(previous) = &self.previous {
            out.push(TokenRecord {
                hash: previous.hash.clone(),
                grace_until: Some(previous.grace_until),
                previous: None,
                ..self.clone()
            });
        }
        out
    }
}

/// One signature of an envelope.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SignatureEntry {
    /// The signing key's id (`kid_…`).
    pub key_id: String,
    /// 128 hex characters: Ed25519 over the payload's bytes.
    pub signature: String,
}

/// A published bundle, borrowed from its text: the payload is still the bytes that were
/// signed.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Envelope<'a> {
    format: String,
    signatures: Vec<SignatureEntry>,
    #[serde(borrow)]
    payload: &'a RawValue,
}

/// Only the format, to name it when a text is not a v2 envelope at all.
#[derive(Deserialize)]
struct FormatOnly {
    format: Option<String>,
}

impl<'a> Envelope<'a> {
    /// Parses the envelope and checks its format, its signatures' shape, and that at least
    /// one signature is by a key of `trusted` and every such signature verifies. Nothing of
    /// the payload is read yet.
    pub fn open(text: &'a [u8], trusted: &KeySet) -> Result<Self, BundleError> {
        if text.len() > MAX_BUNDLE_BYTES {
            return Err(BundleError::TooLarge(text.len()));
        }
        let envelope: Envelope<'a> = serde_json::from_slice(text).map_err(|e| {
            match serde_json::from_slice::<FormatOnly>(text) {
                Ok(FormatOnly {
                    format: Some(format),
                }) if format != FORMAT => BundleError::Format(format),
                _ => BundleError::Json(e.to_string()),
            }
        })?;
        if envelope.format != FORMAT {
            return Err(BundleError::Format(envelope.format));
        }
        let count = envelope.signatures.len();
        if count == 0 || count > keys::MAX_KEYS {
            return Err(BundleError::SignatureCount(count));
        }
        for (i, entry) in envelope.signatures.iter().enumerate() {
            if envelope.signatures[..i]
                .iter()
                .any(|e| e.key_id == entry.key_id)
            {
                return Err(BundleError::DuplicateSigner(entry.key_id.clone()));
            }
        }
        let signatures = envelope
            .signatures
            .iter()
            .map(|e| (e.key_id.as_str(), e.signature.as_str()));
        trusted
            .check(envelope.payload.get().as_bytes(), signatures)
            .map_err(BundleError::Signature)?;
        Ok(envelope)
    }

    /// The payload's text, exactly as signed.
    pub fn payload_text(&self) -> &'a str {
        self.payload.get()
    }

    /// The signatures.
    pub fn signatures(&self) -> &[SignatureEntry] {
        &self.signatures
    }

    /// Reads the payload; its `keys` must include every signer, so that what a gate trusts
    /// next always holds the key it trusted this bundle by.
    pub fn payload<'de, T: Deserialize<'de>>(&self) -> Result<(Bundle<T>, KeySet), BundleError>
    where
        'a: 'de,
    {
        let bundle: Bundle<T> = serde_json::from_str(self.payload.get())
            .map_err(|e| BundleError::Json(format!("payload: {e}")))?;
        let published = KeySet::from_hex(&bundle.keys).map_err(BundleError::Keys)?;
        if let Some(entry) = self
            .signatures
            .iter()
            .find(|e| published.get(&e.key_id).is_none())
        {
            return Err(BundleError::SignerNotPublished(entry.key_id.clone()));
        }
        Ok((bundle, published))
    }
}

/// Publishes a payload: the envelope around `payload_text`, with `signatures` over exactly
/// those bytes. The signing itself is the admin's (it alone holds private keys).
pub fn publish(payload_text: &str, signatures: &[SignatureEntry]) -> String {
    // Serialising strings cannot fail.
    let signatures = serde_json::to_string(signatures).unwrap_or_default();
    format!("{{\"format\":\"{FORMAT}\",\"signatures\":{signatures},\"payload\":{payload_text}}}")
}

/// What a gate expects of a bundle before it replaces the one it serves.
#[derive(Debug, Clone)]
pub struct Expectation<'a> {
    /// The gate's own kind.
    pub target: Target,
    /// The environment the gate serves; `None` accepts any (the CLI's `check`).
    pub environment: Option<&'a str>,
    /// The version served now; the new bundle's must be greater.
    pub newer_than: Option<u64>,
}

impl Expectation<'_> {
    /// Checks target, environment and version.
    pub fn check<T>(&self, bundle: &Bundle<T>) -> Result<(), BundleError> {
        if bundle.target != self.target {
            return Err(BundleError::WrongTarget {
                bundle: bundle.target,
                expected: self.target,
            });
        }
        if let Some(environment) = self.environment {
            if bundle.environment != environment {
                return Err(BundleError::WrongEnvironment {
                    bundle: bundle.environment.clone(),
                    expected: environment.to_owned(),
                });
            }
        }
        if let Some(current) = self.newer_than {
            if bundle.version <= current {
                return Err(BundleError::NotNewer {
                    version: bundle.version,
                    current,
                });
            }
        }
        Ok(())
    }
}

/// Why a bundle was refused. Nothing of it is applied.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum BundleError {
    /// Larger than [`MAX_BUNDLE_BYTES`].
    TooLarge(usize),
    /// Not valid JSON for the model (unknown field, wrong type, …).
    Json(String),
    /// `format` is not [`FORMAT`].
    Format(String),
    /// No signatures, or more than [`keys::MAX_KEYS`].
    SignatureCount(usize),
    /// Two signatures name one key.
    DuplicateSigner(String),
    /// No trusted signature, or a trusted one that fails.
    Signature(SignatureError),
    /// The payload's `keys` are not a valid key set.
    Keys(KeyError),
    /// A signature is by a key the payload does not publish.
    SignerNotPublished(String),
    /// Signed for the other kind of gate.
    WrongTarget {
        /// The target it was signed for.
        bundle: Target,
        /// The target that loaded it.
        expected: Target,
    },
    /// Signed for another environment.
    WrongEnvironment {
        /// The environment it was signed for.
        bundle: String,
        /// The environment the gate serves.
        expected: String,
    },
    /// Not newer than the version served (rollback or replay).
    NotNewer {
        /// The bundle's version.
        version: u64,
        /// The version served now.
        current: u64,
    },
    /// The environment name is not `[a-z0-9][a-z0-9._-]{0,63}`.
    BadEnvironment(String),
    /// The policy is invalid.
    Policy(PolicyError),
    /// A credential source is invalid.
    Sources(SourceError),
    /// More than [`MAX_TOKENS`] tokens.
    TooManyTokens(usize),
    /// A token record is invalid.
    Token {
        /// The record's name.
        name: String,
        /// What is wrong with it.
        problem: &'static str,
    },
    /// Two records share a name.
    DuplicateName(String),
    /// The issuers or revoked token ids are invalid.
    Issuers(IssuerError),
    /// Two records share a hash.
    DuplicateHash(String),
    /// A Worker bundle's rule has a rate limit per second or per hour (the rule is named),
    /// which Cloudflare's Rate Limiting binding cannot count. (A token's own limit is checked
    /// by the Worker against its bindings, as its records arrive.)
    WorkerRateLimit(String),
}

impl BundleError {
    /// Whether the refusal is about trust (signatures, keys) rather than content.
    pub fn is_signature(&self) -> bool {
        matches!(
            self,
            Self::SignatureCount(_)
                | Self::DuplicateSigner(_)
                | Self::Signature(_)
                | Self::SignerNotPublished(_)
        )
    }
}

impl fmt::Display for BundleError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::TooLarge(n) => write!(f, "bundle is {n} bytes; the limit is {MAX_BUNDLE_BYTES}"),
            Self::Json(e) => write!(f, "bundle is not a valid {FORMAT} document: {e}"),
            Self::Format(found) => write!(f, "format is {found:?}, expected {FORMAT:?}"),
            Self::SignatureCount(n) => write!(
                f,
                "bundle has {n} signatures; 1 to {} are allowed",
                keys::MAX_KEYS
            ),
            Self::DuplicateSigner(id) => write!(f, "two signatures name key {id}"),
            Self::Signature(e) => write!(f, "bundle signature: {e}"),
            Self::Keys(e) => write!(f, "bundle keys: {e}"),
            Self::SignerNotPublished(id) => {
                write!(f, "bundle is signed by {id}, which its keys do not list")
            }
            Self::WrongTarget { bundle, expected } => {
                write!(f, "bundle is signed for target {bundle}, this is {expected}")
            }
            Self::WrongEnvironment { bundle, expected } => write!(
                f,
                "bundle is signed for environment {bundle:?}, this serves {expected:?}"
            ),
            Self::NotNewer { version, current } => write!(
                f,
                "bundle version {version} is not newer than the version served ({current}): rollback refused"
            ),
            Self::BadEnvironment(e) => {
                write!(f, "environment {e:?} must match [a-z0-9][a-z0-9._-]{{0,63}}")
            }
            Self::Policy(e) => write!(f, "policy: {e}"),
            Self::Sources(e) => write!(f, "credentials: {e}"),
            Self::TooManyTokens(n) => write!(f, "{n} tokens; at most {MAX_TOKENS} are allowed"),
            Self::Token { name, problem } => write!(f, "token {name:?}: {problem}"),
            Self::DuplicateName(n) => write!(f, "two tokens are named {n:?}"),
            Self::Issuers(e) => write!(f, "issuers: {e}"),
            Self::DuplicateHash(id) => write!(f, "two tokens share one hash (token id {id})"),
            Self::WorkerRateLimit(what) => write!(
                f,
                "{what}: the Worker enforces rate limits per minute only (Cloudflare's Rate Limiting binding counts over 60 s)"
            ),
        }
    }
}

impl std::error::Error for BundleError {}
