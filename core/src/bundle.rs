//! The `tokengate.bundle/v1` document: what the admin signs and every target loads.
//!
//! The signature is HMAC-SHA256, by a key the target holds apart from the bundle, over the
//! bundle's canonical bytes: the compact JSON of the typed model, fields in declaration
//! order, without the `signature` field (a token record leaves out its absent optional
//! members; every other absent member is written as `null`). Loading is all-or-nothing:
//! [`Gate::load`] verifies the signature (constant time), the target, the environment and
//! the version, then validates every field; any failure rejects the whole bundle.

use core::fmt;
use std::collections::{HashMap, HashSet};
use std::hash::{BuildHasherDefault, Hasher};
use std::sync::Arc;

use hmac::{Hmac, Mac};
use serde::{Deserialize, Serialize};
use sha2::Sha256;

use crate::credentials::{self, Source, SourceError};
use crate::json::{self, required, Fields, Reader};
use crate::policy::{self, Policy, PolicyError};
use crate::token::TokenHash;

/// The `format` every v1 bundle carries.
pub const FORMAT: &str = "tokengate.bundle/v1";
/// Tokens a bundle may hold.
pub const MAX_TOKENS: usize = 1_000_000;
/// Bytes a bundle may take.
pub const MAX_BUNDLE_BYTES: usize = 256 * 1024 * 1024;
/// Bytes of the HMAC key.
pub const KEY_LEN: usize = 32;

/// Which kind of gate a bundle is signed for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Target {
    /// The proxy-wasm filter in Envoy.
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

/// The bundle as serialised.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Bundle {
    /// Always [`FORMAT`].
    pub format: String,
    /// Monotonic; a target only ever accepts a newer one.
    pub version: u64,
    /// Unix seconds at signing.
    pub issued_at: u64,
    /// The environment this bundle is for (e.g. `prod`).
    pub environment: String,
    /// The kind of gate this bundle is for.
    pub target: Target,
    /// The route policy.
    pub policy: Policy,
    /// Where credentials are read from.
    pub credentials: CredentialConfig,
    /// Token records: hashes only.
    pub tokens: Vec<TokenRecord>,
    /// Emergency cut-off: every token created at or before this instant is revoked.
    pub revoke_all_at: Option<u64>,
    /// Cloudflare Access settings, for rules with `cf_access` (the Worker only).
    #[serde(default)]
    pub cloudflare_access: Option<AccessConfig>,
    /// Lower-case hex HMAC-SHA256 of the canonical bytes; absent while signing.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub signature: Option<String>,
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

/// One token, as every target sees it: no plaintext. Absent optional members are left out
/// of the serialised form (a 100,000-token bundle is mostly records), and the public token
/// id is derived from the hash where it is needed ([`TokenHash::token_id`]).
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

impl Bundle {
    /// Reads a bundle object (as [`parse_verified`] does, without checking the signature).
    pub fn read(r: &mut Reader<'_>) -> json::Result<Self> {
        let mut tokens = Vec::new();
        let mut bundle = Self::read_with(r, &mut |token| {
            tokens.push(token);
            true
        })?;
        bundle.tokens = tokens;
        Ok(bundle)
    }

    /// Reads a bundle object, handing each token record to `on_token` instead of keeping
    /// it (`tokens` stays empty). `on_token` returning false stops the read with an error;
    /// why is the caller's to report.
    fn read_with(
        r: &mut Reader<'_>,
        on_token: &mut dyn FnMut(TokenRecord) -> bool,
    ) -> json::Result<Self> {
        let mut fields = Fields::new(&[
            "format",
            "version",
            "issued_at",
            "environment",
            "target",
            "policy",
            "credentials",
            "tokens",
            "revoke_all_at",
            "cloudflare_access",
            "signature",
        ]);
        let (mut format, mut version, mut issued_at, mut environment) = (None, None, None, None);
        let (mut target, mut policy, mut credentials) = (None, None, None);
        let (mut revoke_all_at, mut cloudflare_access, mut signature) = (None, None, None);
        r.object(|r, key| {
            match fields.index(r, key)? {
                0 => format = Some(r.string()?),
                1 => version = Some(r.u64()?),
                2 => issued_at = Some(r.u64()?),
                3 => environment = Some(r.string()?),
                4 => {
                    let choices = [("envoy", Target::Envoy), ("worker", Target::Worker)];
                    target = Some(r.choice("target", &choices)?);
                }
                5 => policy = Some(Policy::read(r)?),
                6 => credentials = Some(CredentialConfig::read(r)?),
                7 => r.array(|r| {
                    let token = TokenRecord::read(r)?;
                    if on_token(token) {
                        Ok(())
                    } else {
                        Err(r.error("token record refused"))
                    }
                })?,
                8 => revoke_all_at = r.nullable(Reader::u64)?,
                9 => cloudflare_access = r.nullable(AccessConfig::read)?,
                _ => signature = r.nullable(Reader::string)?,
            }
            Ok(())
        })?;
        Ok(Self {
            format: required(r, format, "format")?,
            version: required(r, version, "version")?,
            issued_at: required(r, issued_at, "issued_at")?,
            environment: required(r, environment, "environment")?,
            target: required(r, target, "target")?,
            policy: required(r, policy, "policy")?,
            credentials: required(r, credentials, "credentials")?,
            tokens: {
                fields.require(r, 7)?;
                Vec::new()
            },
            revoke_all_at,
            cloudflare_access,
            signature,
        })
    }
}

impl CredentialConfig {
    fn read(r: &mut Reader<'_>) -> json::Result<Self> {
        let mut fields = Fields::new(&["sources", "forward"]);
        let (mut sources, mut forward) = (None, false);
        r.object(|r, key| {
            match fields.index(r, key)? {
                0 => sources = Some(r.strings()?),
                _ => forward = r.bool()?,
            }
            Ok(())
        })?;
        Ok(Self {
            sources: required(r, sources, "sources")?,
            forward,
        })
    }
}

impl AccessConfig {
    fn read(r: &mut Reader<'_>) -> json::Result<Self> {
        let mut fields = Fields::new(&["certs_url", "audiences"]);
        let (mut certs_url, mut audiences) = (None, None);
        r.object(|r, key| {
            match fields.index(r, key)? {
                0 => certs_url = Some(r.string()?),
                _ => audiences = Some(r.strings()?),
            }
            Ok(())
        })?;
        Ok(Self {
            certs_url: required(r, certs_url, "certs_url")?,
            audiences: required(r, audiences, "audiences")?,
        })
    }
}

impl TokenRecord {
    /// Reads one token record object.
    pub fn read(r: &mut Reader<'_>) -> json::Result<Self> {
        let mut fields = Fields::new(&[
            "name",
            "hash",
            "scopes",
            "created_at",
            "not_before",
            "expires_at",
            "revoked_at",
            "grace_until",
            "previous",
            LEGACY_TOKEN_ID,
        ]);
        let (mut name, mut hash, mut scopes, mut created_at) = (None, None, None, None);
        let mut times = [None; 4];
        let (mut previous, mut token_id) = (None, None);
        r.object(|r, key| {
            match fields.index(r, key)? {
                0 => name = Some(r.string()?),
                1 => hash = Some(r.string()?),
                2 => scopes = Some(r.strings()?),
                3 => created_at = Some(r.u64()?),
                i @ 4..=7 => times[i - 4] = r.nullable(Reader::u64)?,
                8 => previous = r.nullable(PreviousToken::read)?,
                _ => token_id = Some(r.string()?),
            }
            Ok(())
        })?;
        let [not_before, expires_at, revoked_at, grace_until] = times;
        let hash = required(r, hash, "hash")?;
        check_legacy_token_id(r, token_id.as_deref(), &hash)?;
        Ok(Self {
            name: required(r, name, "name")?,
            hash,
            scopes: required(r, scopes, "scopes")?,
            created_at: required(r, created_at, "created_at")?,
            not_before,
            expires_at,
            revoked_at,
            grace_until,
            previous,
        })
    }

    /// Parses one record on its own (a Worker's KV value).
    pub fn from_json(text: &[u8]) -> json::Result<Self> {
        Reader::read_all(text, Self::read)
    }
}

/// A member that records written before 2026-12-02 carried: the public token id, which is
/// now derived from the hash where it is needed. Still read, and only if it is the id derived
/// from the record's hash, so that an ECDS file or a KV record written by an earlier release
/// keeps serving until the next push rewrites it.
const LEGACY_TOKEN_ID: &str = "token_id";

fn check_legacy_token_id(r: &Reader<'_>, token_id: Option<&str>, hash: &str) -> json::Result<()> {
    let Some(id) = token_id else {
        return Ok(());
    };
    match TokenHash::from_hex(hash) {
        Some(hash) if !hash.is_token_id(id) => {
            Err(r.error("token_id is not the one derived from the hash"))
        }
        // A malformed hash is refused, by name, when the record is checked.
        _ => Ok(()),
    }
}

impl PreviousToken {
    fn read(r: &mut Reader<'_>) -> json::Result<Self> {
        let mut fields = Fields::new(&["hash", "grace_until", LEGACY_TOKEN_ID]);
        let (mut hash, mut grace_until, mut token_id) = (None, None, None);
        r.object(|r, key| {
            match fields.index(r, key)? {
                0 => hash = Some(r.string()?),
                1 => grace_until = Some(r.u64()?),
                _ => token_id = Some(r.string()?),
            }
            Ok(())
        })?;
        let hash = required(r, hash, "hash")?;
        check_legacy_token_id(r, token_id.as_deref(), &hash)?;
        Ok(Self {
            hash,
            grace_until: required(r, grace_until, "grace_until")?,
        })
    }
}

impl TokenRecord {
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

/// The HMAC key a target holds apart from the bundle.
#[derive(Clone)]
pub struct SigningKey([u8; KEY_LEN]);

impl SigningKey {
    /// From 32 bytes the caller drew from the OS CSPRNG.
    pub fn from_bytes(bytes: [u8; KEY_LEN]) -> Self {
        Self(bytes)
    }

    /// From 64 lower-case hex characters (surrounding whitespace ignored).
    pub fn from_hex(text: &str) -> Result<Self, BundleError> {
        crate::hex::decode::<KEY_LEN>(text.trim())
            .map(Self)
            .ok_or(BundleError::BadKey)
    }

    /// The hex form, for writing the key file at `init`.
    pub fn to_hex(&self) -> String {
        crate::hex::encode(&self.0)
    }

    fn mac(&self) -> Hmac<Sha256> {
        // HMAC takes keys of any length, so this cannot fail.
        <Hmac<Sha256> as Mac>::new_from_slice(&self.0).unwrap_or_else(|_| unreachable!())
    }

    /// Hex HMAC-SHA256 of `message`.
    pub fn sign_bytes(&self, message: &[u8]) -> String {
        let mut mac = self.mac();
        mac.update(message);
        crate::hex::encode(&mac.finalize().into_bytes())
    }

    /// Checks a hex HMAC-SHA256 of `message` in constant time.
    pub fn verify_bytes(&self, message: &[u8], signature_hex: &str) -> bool {
        let Some(tag) = crate::hex::decode::<32>(signature_hex) else {
            return false;
        };
        let mut mac = self.mac();
        mac.update(message);
        mac.verify_slice(&tag).is_ok()
    }
}

impl fmt::Debug for SigningKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("SigningKey(<redacted>)")
    }
}

/// The bundle without its signature: serialises to exactly the canonical bytes, borrowing
/// every field, so a 100,000-token bundle is never cloned or re-serialised into memory.
#[derive(Serialize)]
struct Unsigned<'a> {
    format: &'a str,
    version: u64,
    issued_at: u64,
    environment: &'a str,
    target: Target,
    policy: &'a Policy,
    credentials: &'a CredentialConfig,
    tokens: &'a [TokenRecord],
    revoke_all_at: Option<u64>,
    cloudflare_access: &'a Option<AccessConfig>,
}

impl<'a> Unsigned<'a> {
    fn of(bundle: &'a Bundle) -> Self {
        Self {
            format: &bundle.format,
            version: bundle.version,
            issued_at: bundle.issued_at,
            environment: &bundle.environment,
            target: bundle.target,
            policy: &bundle.policy,
            credentials: &bundle.credentials,
            tokens: &bundle.tokens,
            revoke_all_at: bundle.revoke_all_at,
            cloudflare_access: &bundle.cloudflare_access,
        }
    }
}

/// Feeds serialised bytes straight into the MAC.
struct MacWriter<'a>(&'a mut Hmac<Sha256>);

impl std::io::Write for MacWriter<'_> {
    fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
        self.0.update(bytes);
        Ok(bytes.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Bundle {
    /// The bytes the signature covers: the compact JSON of the model, without `signature`.
    pub fn canonical_bytes(&self) -> Vec<u8> {
        // Serialising plain structs of strings, numbers and vectors cannot fail.
        serde_json::to_vec(&Unsigned::of(self)).unwrap_or_default()
    }

    fn mac(&self, key: &SigningKey) -> Hmac<Sha256> {
        let mut mac = key.mac();
        // Writing into a MAC cannot fail.
        serde_json::to_writer(MacWriter(&mut mac), &Unsigned::of(self)).ok();
        mac
    }

    /// Signs in place.
    pub fn sign(&mut self, key: &SigningKey) {
        let tag = self.mac(key).finalize().into_bytes();
        self.signature = Some(crate::hex::encode(&tag));
    }

    /// Checks the signature in constant time.
    pub fn verify(&self, key: &SigningKey) -> bool {
        let Some(tag) = self.signature.as_deref().and_then(crate::hex::decode::<32>) else {
            return false;
        };
        self.mac(key).verify_slice(&tag).is_ok()
    }

    /// Serialises a signed bundle.
    pub fn to_json(&self) -> String {
        serde_json::to_string(self).unwrap_or_default()
    }
}

/// What a target expects of a bundle before it replaces the one it serves.
#[derive(Debug, Clone)]
pub struct Expectation<'a> {
    /// The target's own kind.
    pub target: Target,
    /// The environment the target serves; `None` accepts any (the CLI's `check`).
    pub environment: Option<&'a str>,
    /// The version served now; the new bundle's must be greater.
    pub newer_than: Option<u64>,
}

/// Why a bundle was refused. Nothing of it is applied.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum BundleError {
    /// The verification key is not 64 lower-case hex characters.
    BadKey,
    /// Larger than [`MAX_BUNDLE_BYTES`].
    TooLarge(usize),
    /// Not valid JSON for the model (unknown field, wrong type, …).
    Json(String),
    /// `format` is not [`FORMAT`].
    Format(String),
    /// No signature, or it does not verify with the key.
    Signature,
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
        /// The environment the target serves.
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
    /// Two records share a hash.
    DuplicateHash(String),
}

impl fmt::Display for BundleError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::BadKey => write!(f, "the signing key must be 64 lower-case hex characters"),
            Self::TooLarge(n) => write!(f, "bundle is {n} bytes; the limit is {MAX_BUNDLE_BYTES}"),
            Self::Json(e) => write!(f, "bundle is not a valid {FORMAT} document: {e}"),
            Self::Format(found) => write!(f, "format is {found:?}, expected {FORMAT:?}"),
            Self::Signature => write!(f, "bundle signature is missing or does not verify with this key"),
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
            Self::DuplicateHash(id) => write!(f, "two tokens share one hash (token id {id})"),
        }
    }
}

impl std::error::Error for BundleError {}

/// A set of scopes as the gate holds it; records with the same scopes share one.
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct Scopes {
    pub(crate) list: Vec<String>,
    /// The scopes joined by spaces, as `x-tokengate-scopes` carries them.
    pub(crate) header: String,
}

impl Scopes {
    fn new(list: &[String]) -> Arc<Self> {
        Arc::new(Self {
            list: list.to_vec(),
            header: list.join(" "),
        })
    }
}

/// A token record as the gate holds it, parsed and checked; kept small, since a gate may
/// hold a million (the token id is derived from the hash when needed).
#[derive(Debug, Clone)]
pub struct Record {
    pub(crate) hash: TokenHash,
    pub(crate) name: Arc<str>,
    pub(crate) scopes: Arc<Scopes>,
    pub(crate) created_at: u64,
    pub(crate) not_before: Option<u64>,
    pub(crate) expires_at: Option<u64>,
    pub(crate) revoked: bool,
    pub(crate) grace_until: Option<u64>,
}

/// A SHA-256 is already uniformly distributed: its first eight bytes are the hash-map hash.
#[derive(Default)]
pub(crate) struct DigestHasher(u64);

impl Hasher for DigestHasher {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for chunk in bytes.chunks(8).take(1) {
            let mut word = [0u8; 8];
            word[..chunk.len()].copy_from_slice(chunk);
            self.0 ^= u64::from_le_bytes(word);
        }
    }
}

type Index = HashMap<[u8; 32], u32, BuildHasherDefault<DigestHasher>>;

/// The hasher of the sets a load checks uniqueness with (names, scope sets): rotate, xor and
/// multiply per 8-byte word (as rustc's FxHash), then a final mix so that the low bits, which
/// pick the bucket, depend on every byte (names share long prefixes). Several times cheaper
/// than SipHash on short keys; flooding resistance buys nothing here, since the keys come from
/// a bundle whose signature was verified before its first record is read.
#[derive(Default)]
struct LoadHasher(u64);

impl Hasher for LoadHasher {
    fn finish(&self) -> u64 {
        // MurmurHash3's 64-bit finaliser.
        let mut h = self.0;
        h ^= h >> 33;
        h = h.wrapping_mul(0xff51_afd7_ed55_8ccd);
        h ^= h >> 33;
        h = h.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
        h ^ (h >> 33)
    }
    fn write(&mut self, bytes: &[u8]) {
        for chunk in bytes.chunks(8) {
            let mut word = [0u8; 8];
            word[..chunk.len()].copy_from_slice(chunk);
            self.0 = (self.0.rotate_left(5) ^ u64::from_le_bytes(word))
                .wrapping_mul(0x517c_c1b7_2722_0a95);
        }
    }
}

type LoadSet<T> = HashSet<T, BuildHasherDefault<LoadHasher>>;
type LoadMap<K, V> = HashMap<K, V, BuildHasherDefault<LoadHasher>>;

/// A verified, validated bundle ready to decide requests. Lookups are O(1) in the number
/// of tokens.
#[derive(Debug, Clone)]
pub struct Gate {
    pub(crate) version: u64,
    pub(crate) environment: String,
    pub(crate) policy: Policy,
    pub(crate) sources: Vec<Source>,
    pub(crate) forward_credential: bool,
    pub(crate) token_count: usize,
    /// One per recognised hash (a rotated token has two).
    pub(crate) records: Vec<Record>,
    pub(crate) index: Index,
    pub(crate) revoke_all_at: Option<u64>,
}

impl Gate {
    /// Verifies and validates a signed bundle; on any failure nothing is returned.
    pub fn load(
        json: &[u8],
        key: &SigningKey,
        expect: &Expectation<'_>,
    ) -> Result<Self, BundleError> {
        let verified = load_verified(json, key)?;
        check_expectation(&verified.bundle, expect)?;
        Self::from_verified(verified)
    }

    /// Validates an already verified bundle (the CLI builds them itself).
    pub fn from_bundle(mut bundle: Bundle) -> Result<Self, BundleError> {
        let sources = check_settings(&bundle)?;
        let table = TokenTable::of(&std::mem::take(&mut bundle.tokens))?;
        Ok(Self::assemble(bundle, sources, table))
    }

    /// The gate of a bundle [`load_verified`] read (after the caller's expectation and
    /// succession checks).
    pub fn from_verified(verified: Verified) -> Result<Self, BundleError> {
        let sources = check_settings(&verified.bundle)?;
        Ok(Self::assemble(verified.bundle, sources, verified.table))
    }

    fn assemble(bundle: Bundle, sources: Vec<Source>, table: TokenTable) -> Self {
        Self {
            version: bundle.version,
            environment: bundle.environment,
            policy: bundle.policy,
            sources,
            forward_credential: bundle.credentials.forward,
            token_count: table.tokens,
            records: table.records,
            index: table.index,
            revoke_all_at: bundle.revoke_all_at,
        }
    }

    /// The version this gate serves.
    pub fn version(&self) -> u64 {
        self.version
    }

    /// The environment this gate serves.
    pub fn environment(&self) -> &str {
        &self.environment
    }

    /// How many token records it holds.
    pub fn token_count(&self) -> usize {
        self.token_count
    }

    /// The configured credential sources.
    pub fn sources(&self) -> &[Source] {
        &self.sources
    }
}

/// The checks of everything in a bundle but its tokens; the credential sources parsed.
fn check_settings(bundle: &Bundle) -> Result<Vec<Source>, BundleError> {
    if !policy::valid_name(&bundle.environment) {
        return Err(BundleError::BadEnvironment(bundle.environment.clone()));
    }
    policy::validate(&bundle.policy).map_err(BundleError::Policy)?;
    credentials::parse_sources(&bundle.credentials.sources).map_err(BundleError::Sources)
}

/// A gate's token records, added one at a time: each checked in place and indexed by hash;
/// names and hashes must be unique.
struct TokenTable {
    index: Index,
    /// One per recognised hash (a rotated token has two).
    records: Vec<Record>,
    names: LoadSet<Arc<str>>,
    /// Most tokens share a handful of scope sets: one copy of each.
    scope_sets: LoadMap<Box<[String]>, Arc<Scopes>>,
    /// Token records added (a rotated token counts once).
    tokens: usize,
}

impl TokenTable {
    /// Room for `tokens` records, `hashes` of them with the hash a rotation replaced.
    fn with_capacity(tokens: usize, hashes: usize) -> Self {
        Self {
            index: Index::with_capacity_and_hasher(hashes, Default::default()),
            records: Vec::with_capacity(hashes),
            names: LoadSet::with_capacity_and_hasher(tokens, Default::default()),
            scope_sets: LoadMap::default(),
            tokens: 0,
        }
    }

    /// The table of a list of records.
    fn of(tokens: &[TokenRecord]) -> Result<Self, BundleError> {
        if tokens.len() > MAX_TOKENS {
            return Err(BundleError::TooManyTokens(tokens.len()));
        }
        let replaced = tokens.iter().filter(|t| t.previous.is_some()).count();
        let mut table = Self::with_capacity(tokens.len(), tokens.len() + replaced);
        for token in tokens {
            table.add(token)?;
        }
        Ok(table)
    }

    fn add(&mut self, token: &TokenRecord) -> Result<(), BundleError> {
        if self.tokens == MAX_TOKENS {
            return Err(BundleError::TooManyTokens(MAX_TOKENS + 1));
        }
        let name: Arc<str> = token.name.as_str().into();
        if !self.names.insert(Arc::clone(&name)) {
            return Err(BundleError::DuplicateName(token.name.clone()));
        }
        // A scope set is checked once, when first seen: most tokens share a handful.
        let scopes = match self.scope_sets.get(token.scopes.as_slice()) {
            Some(shared) => Arc::clone(shared),
            None => {
                check_scopes(token)?;
                let shared = Scopes::new(&token.scopes);
                let key = token.scopes.clone().into_boxed_slice();
                self.scope_sets.insert(key, Arc::clone(&shared));
                shared
            }
        };
        // The record itself and, during a rotation's grace, the token it replaced.
        let previous = token.previous.as_ref();
        for as_previous in std::iter::once(None).chain(previous.map(Some)) {
            let record = check_record(token, as_previous, Arc::clone(&scopes), Arc::clone(&name))?;
            let position = u32::try_from(self.records.len())
                .map_err(|_| BundleError::TooManyTokens(self.records.len()))?;
            if self.index.insert(record.hash.0, position).is_some() {
                return Err(BundleError::DuplicateHash(record.hash.token_id()));
            }
            self.records.push(record);
        }
        self.tokens += 1;
        Ok(())
    }
}

/// A bundle whose signature and format are verified, its token records already checked
/// and indexed (`bundle.tokens` is empty): what [`Gate::from_verified`] turns into a gate.
pub struct Verified {
    /// Everything but the token records.
    pub bundle: Bundle,
    table: TokenTable,
}

/// How many token records (and replaced hashes) a bundle's text holds, to size the table
/// before the read: wasm memory never shrinks, so a table grown by doubling, or reserved
/// from a byte-size guess, would leave its largest size resident. Counts member names that
/// only token records have; it is only a size hint, the read decides.
fn count_records(json: &[u8]) -> (usize, usize) {
    let (mut tokens, mut replaced) = (0, 0);
    let mut parts = json.split(|&b| b == b'"').peekable();
    while let Some(part) = parts.next() {
        if part == b"created_at" {
            tokens += 1;
        } else if part == b"previous" && parts.peek().is_some_and(|next| next.starts_with(b":{")) {
            replaced += 1;
        }
    }
    let tokens = tokens.min(MAX_TOKENS);
    (tokens, tokens + replaced.min(tokens))
}

/// Verifies a bundle and reads its token records straight into a gate's table. When the
/// MAC over the bytes received verifies (a bundle as `Bundle::to_json` writes it), no list
/// of records is ever held: a large bundle's peak memory is its text plus the table. Any
/// other layout is parsed whole, verified on its canonical form, then indexed.
pub fn load_verified(json: &[u8], key: &SigningKey) -> Result<Verified, BundleError> {
    if json.len() > MAX_BUNDLE_BYTES {
        return Err(BundleError::TooLarge(json.len()));
    }
    if !verify_as_sent(json, key) {
        let mut bundle = parse_verified(json, key)?;
        let table = TokenTable::of(&std::mem::take(&mut bundle.tokens))?;
        return Ok(Verified { bundle, table });
    }
    let (tokens, hashes) = count_records(json);
    let mut table = TokenTable::with_capacity(tokens, hashes);
    let mut refused = None;
    let read = Reader::read_all(json, |r| {
        Bundle::read_with(r, &mut |token| match table.add(&token) {
            Ok(()) => true,
            Err(e) => {
                refused = Some(e);
                false
            }
        })
    });
    let bundle = match (read, refused) {
        (_, Some(refusal)) => return Err(refusal),
        (Err(e), None) => return Err(BundleError::Json(e.to_string())),
        (Ok(bundle), None) => bundle,
    };
    if bundle.format != FORMAT {
        return Err(BundleError::Format(bundle.format));
    }
    Ok(Verified { bundle, table })
}

/// The tail `Bundle::to_json` ends with: the signature, the last member.
const SIGNATURE_HEAD: &[u8] = b",\"signature\":\"";

/// Whether `json` is exactly what `Bundle::to_json` writes (the canonical bytes, then the
/// signature) and that signature covers it: the MAC runs over the bytes received instead of
/// a re-serialisation, which is most of the cost of loading a large bundle. Sound on its own:
/// a valid tag means a key holder signed exactly these bytes, and they are what is parsed.
/// Anything else (reformatted JSON, another member order) takes the canonical path.
fn verify_as_sent(json: &[u8], key: &SigningKey) -> bool {
    const TAIL: usize = SIGNATURE_HEAD.len() + 64 + 2;
    let Some(split) = json.len().checked_sub(TAIL) else {
        return false;
    };
    let (canonical, tail) = json.split_at(split);
    let Some(hex) = tail
        .strip_prefix(SIGNATURE_HEAD)
        .and_then(|rest| rest.strip_suffix(b"\"}"))
    else {
        return false;
    };
    let Some(tag) = std::str::from_utf8(hex)
        .ok()
        .and_then(crate::hex::decode::<32>)
    else {
        return false;
    };
    let mut mac = key.mac();
    mac.update(canonical);
    mac.update(b"}");
    mac.verify_slice(&tag).is_ok()
}

/// Parses and verifies the signature and format; no other check.
pub fn parse_verified(json: &[u8], key: &SigningKey) -> Result<Bundle, BundleError> {
    if json.len() > MAX_BUNDLE_BYTES {
        return Err(BundleError::TooLarge(json.len()));
    }
    let signed_as_sent = verify_as_sent(json, key);
    let bundle =
        Reader::read_all(json, Bundle::read).map_err(|e| BundleError::Json(e.to_string()))?;
    if !signed_as_sent && !bundle.verify(key) {
        return Err(BundleError::Signature);
    }
    if bundle.format != FORMAT {
        return Err(BundleError::Format(bundle.format));
    }
    Ok(bundle)
}

/// Checks target, environment and version against what the target expects.
pub fn check_expectation(bundle: &Bundle, expect: &Expectation<'_>) -> Result<(), BundleError> {
    if bundle.target != expect.target {
        return Err(BundleError::WrongTarget {
            bundle: bundle.target,
            expected: expect.target,
        });
    }
    if let Some(environment) = expect.environment {
        if bundle.environment != environment {
            return Err(BundleError::WrongEnvironment {
                bundle: bundle.environment.clone(),
                expected: environment.to_owned(),
            });
        }
    }
    if let Some(current) = expect.newer_than {
        if bundle.version <= current {
            return Err(BundleError::NotNewer {
                version: bundle.version,
                current,
            });
        }
    }
    Ok(())
}

impl Record {
    /// Checks one record on its own (a Worker reads them one at a time from KV).
    pub fn from_token_record(token: &TokenRecord) -> Result<Self, BundleError> {
        check_scopes(token)?;
        check_record(
            token,
            None,
            Scopes::new(&token.scopes),
            token.name.as_str().into(),
        )
    }

    /// The token's name.
    pub fn name(&self) -> &str {
        &self.name
    }
}

/// The bundle a gate serves, as far as succession is concerned.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Served {
    /// Its version.
    pub version: u64,
    /// Its signature (hex).
    pub signature: String,
}

impl Served {
    /// The mark a verified bundle leaves.
    pub fn of(bundle: &Bundle) -> Self {
        Self {
            version: bundle.version,
            signature: bundle.signature.clone().unwrap_or_default(),
        }
    }

    /// A compact text form, for hosts that share the mark between VMs.
    pub fn encode(&self) -> String {
        format!("{} {}", self.version, self.signature)
    }

    /// The inverse of [`Served::encode`].
    pub fn decode(text: &str) -> Option<Self> {
        let (version, signature) = text.split_once(' ')?;
        Some(Self {
            version: version.parse().ok()?,
            signature: signature.to_owned(),
        })
    }
}

/// Whether a verified bundle may follow the one served: it must be newer, or be the very
/// bundle served (same version and signature), which several VMs of one gate each load.
/// An older or different bundle of the same version is a rollback or a replay.
pub fn check_succession(served: Option<&Served>, bundle: &Bundle) -> Result<(), BundleError> {
    let Some(served) = served else {
        return Ok(());
    };
    let same = bundle.version == served.version
        && bundle.signature.as_deref() == Some(served.signature.as_str());
    if bundle.version > served.version || same {
        Ok(())
    } else {
        Err(BundleError::NotNewer {
            version: bundle.version,
            current: served.version,
        })
    }
}

/// The checks of a token's scope set ([`TokenTable::add`] runs them once per distinct set).
fn check_scopes(token: &TokenRecord) -> Result<(), BundleError> {
    let problem = |problem| BundleError::Token {
        name: token.name.clone(),
        problem,
    };
    if token.scopes.len() > policy::MAX_SCOPES {
        return Err(problem("too many scopes"));
    }
    if !token.scopes.iter().all(|s| policy::valid_grant(s)) {
        return Err(problem("a scope is malformed (use 'x:y', 'x:*' or '*')"));
    }
    Ok(())
}

/// Checks `token`, or with `as_previous` the token it replaced (its own hash and grace;
/// the name, scopes and lifetime of `token`), into the record a gate looks up.
fn check_record(
    token: &TokenRecord,
    as_previous: Option<&PreviousToken>,
    scopes: Arc<Scopes>,
    name: Arc<str>,
) -> Result<Record, BundleError> {
    let problem = |problem| BundleError::Token {
        name: token.name.clone(),
        problem,
    };
    let (hash, grace_until) = match as_previous {
        Some(previous) => (&previous.hash, Some(previous.grace_until)),
        None => (&token.hash, token.grace_until),
    };
    if !policy::valid_name(&token.name) {
        return Err(problem("name must match [a-z0-9][a-z0-9._-]{0,63}"));
    }
    let hash = TokenHash::from_hex(hash)
        .ok_or_else(|| problem("hash must be 64 lower-case hex characters"))?;
    if let (Some(nb), Some(exp)) = (token.not_before, token.expires_at) {
        if nb >= exp {
            return Err(problem("not_before is not before expires_at"));
        }
    }
    Ok(Record {
        hash,
        name,
        scopes,
        created_at: token.created_at,
        not_before: token.not_before,
        expires_at: token.expires_at,
        revoked: token.revoked_at.is_some(),
        grace_until,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bundle() -> Bundle {
        let hash = TokenHash::of(b"secret-one-secret-one");
        Bundle {
            format: FORMAT.into(),
            version: 3,
            issued_at: 1_000,
            environment: "prod".into(),
            target: Target::Envoy,
            policy: Policy { rules: vec![] },
            credentials: CredentialConfig {
                sources: vec!["bearer".into()],
                forward: false,
            },
            tokens: vec![TokenRecord {
                name: "ci".into(),
                hash: hash.to_hex(),
                scopes: vec!["orders:*".into()],
                created_at: 900,
                not_before: None,
                expires_at: None,
                revoked_at: None,
                grace_until: None,
                previous: None,
            }],
            revoke_all_at: None,
            cloudflare_access: None,
            signature: None,
        }
    }

    const EXPECT: Expectation<'static> = Expectation {
        target: Target::Envoy,
        environment: Some("prod"),
        newer_than: Some(2),
    };

    #[test]
    fn the_borrowed_unsigned_view_is_the_bundle_without_its_signature() {
        let mut b = bundle();
        b.sign(&SigningKey::from_bytes([1; 32]));
        let unsigned = Bundle {
            signature: None,
            ..b.clone()
        };
        assert_eq!(b.canonical_bytes(), serde_json::to_vec(&unsigned).unwrap());
    }

    #[test]
    fn signed_bundle_loads_and_any_change_breaks_it() {
        let key = SigningKey::from_bytes([9; 32]);
        let mut b = bundle();
        b.sign(&key);
        let json = b.to_json();
        assert!(Gate::load(json.as_bytes(), &key, &EXPECT).is_ok());
        let tampered = json.replace("orders:*", "orders:x");
        assert_eq!(
            Gate::load(tampered.as_bytes(), &key, &EXPECT).err(),
            Some(BundleError::Signature)
        );
        let other_key = SigningKey::from_bytes([8; 32]);
        assert_eq!(
            Gate::load(json.as_bytes(), &other_key, &EXPECT).err(),
            Some(BundleError::Signature)
        );
    }

    #[test]
    fn the_signature_is_checked_on_the_bytes_sent_or_else_on_the_canonical_form() {
        let key = SigningKey::from_bytes([9; 32]);
        let mut b = bundle();
        b.sign(&key);
        let json = b.to_json();
        assert!(
            verify_as_sent(json.as_bytes(), &key),
            "to_json is canonical + signature"
        );
        // Reformatted by a tool on the way: not the bytes signed, but the same bundle.
        let pretty = serde_json::to_string_pretty(&b).unwrap();
        assert!(!verify_as_sent(pretty.as_bytes(), &key));
        assert_eq!(parse_verified(pretty.as_bytes(), &key).unwrap(), b);
        // The signature moved to the front: the canonical path still accepts it.
        let tag = b.signature.clone().unwrap();
        let moved = json
            .replace(&format!(",\"signature\":\"{tag}\""), "")
            .replacen('{', &format!("{{\"signature\":\"{tag}\","), 1);
        assert_eq!(parse_verified(moved.as_bytes(), &key).unwrap(), b);
        // Any change to the signed bytes fails both ways, in either layout.
        for text in [&json, &pretty, &moved] {
            let tampered = text.replace("\"version\":3", "\"version\":4");
            let tampered = tampered.replace("\"version\": 3", "\"version\": 4");
            assert_ne!(&tampered, text);
            assert!(!verify_as_sent(tampered.as_bytes(), &key));
            assert_eq!(
                parse_verified(tampered.as_bytes(), &key).err(),
                Some(BundleError::Signature)
            );
        }
        let other = SigningKey::from_bytes([8; 32]);
        assert!(!verify_as_sent(json.as_bytes(), &other));
    }

    #[test]
    fn both_load_paths_build_the_same_gate_and_refuse_the_same_bundles() {
        let key = SigningKey::from_bytes([9; 32]);
        let old = TokenHash::of(b"secret-old-secret-old");
        let mut rotated = bundle();
        rotated.tokens[0].previous = Some(PreviousToken {
            hash: old.to_hex(),
            grace_until: 2_000,
        });
        let mut second = rotated.tokens[0].clone();
        second.name = "second".into();
        let other = TokenHash::of(b"secret-two-secret-two");
        (second.hash, second.previous) = (other.to_hex(), None);
        rotated.tokens.push(second.clone());
        let mut same_name = rotated.clone();
        same_name.tokens[1].name = "ci".into();
        let mut same_hash = rotated.clone();
        same_hash.tokens[1].hash = old.to_hex();
        let mut bad_hash = rotated.clone();
        bad_hash.tokens[1].hash = "AB".repeat(32);
        let mut bad_environment = rotated.clone();
        bad_environment.environment = "Prod!".into();
        for (what, mut b) in [
            ("rotated", rotated),
            ("same name", same_name),
            ("same hash", same_hash),
            ("bad hash", bad_hash),
            ("bad environment", bad_environment),
        ] {
            b.sign(&key);
            let streamed = b.to_json();
            let whole = serde_json::to_string_pretty(&b).unwrap();
            assert!(verify_as_sent(streamed.as_bytes(), &key), "{what}");
            assert!(!verify_as_sent(whole.as_bytes(), &key), "{what}");
            if what == "rotated" {
                // The size hint: two records, three hashes (one replaced by rotation).
                assert_eq!(count_records(streamed.as_bytes()), (2, 3));
            }
            let expect = Expectation {
                environment: None,
                ..EXPECT
            };
            let a = Gate::load(streamed.as_bytes(), &key, &expect);
            let b = Gate::load(whole.as_bytes(), &key, &expect);
            match (a, b) {
                (Ok(a), Ok(b)) => {
                    assert_eq!(what, "rotated");
                    assert_eq!((a.token_count(), a.records.len()), (2, 3));
                    assert_eq!((b.token_count(), b.records.len()), (2, 3));
                    for (x, y) in a.records.iter().zip(&b.records) {
                        assert_eq!(
                            (x.hash.0, &x.name, x.grace_until),
                            (y.hash.0, &y.name, y.grace_until)
                        );
                        assert_eq!(a.index.get(&x.hash.0), b.index.get(&y.hash.0));
                    }
                }
                (a, b) => {
                    assert_ne!(what, "rotated", "{:?}", a.err());
                    assert_eq!(a.err(), b.err(), "{what}");
                }
            }
        }
    }

    #[test]
    fn every_distinct_scope_set_is_checked_even_after_valid_ones() {
        let key = SigningKey::from_bytes([9; 32]);
        let token = |i: u32, scopes: &[&str]| {
            let hash = TokenHash::of(format!("secret-{i}-secret-{i}").as_bytes());
            TokenRecord {
                name: format!("t{i}"),
                hash: hash.to_hex(),
                scopes: scopes.iter().map(|s| s.to_string()).collect(),
                ..bundle().tokens[0].clone()
            }
        };
        let too_many: Vec<String> = (0..=policy::MAX_SCOPES)
            .map(|i| format!("s{i}:read"))
            .collect();
        let too_many: Vec<&str> = too_many.iter().map(String::as_str).collect();
        for (bad, problem) in [
            (
                token(3, &["orders:read", "Orders!"]),
                "a scope is malformed",
            ),
            (token(3, &too_many), "too many scopes"),
        ] {
            let mut b = bundle();
            // Two tokens with a valid set first (the second reuses the first's), then the bad one.
            b.tokens = vec![
                token(1, &["orders:read"]),
                token(2, &["orders:read"]),
                bad.clone(),
            ];
            b.sign(&key);
            let refused = Gate::load(b.to_json().as_bytes(), &key, &EXPECT).map(|_| ());
            assert!(
                matches!(&refused, Err(BundleError::Token { name, problem: p }) if name == "t3" && p.starts_with(problem)),
                "{refused:?}"
            );
            // A record read on its own (the Worker's KV value) is checked the same way.
            assert!(matches!(
                Record::from_token_record(&bad),
                Err(BundleError::Token { .. })
            ));
        }
    }

    #[test]
    fn unknown_fields_duplicates_and_rollback_are_refused() {
        let key = SigningKey::from_bytes([9; 32]);
        let mut b = bundle();
        b.sign(&key);
        let extra = b.to_json().replacen('{', "{\"extra\":1,", 1);
        assert!(matches!(
            Gate::load(extra.as_bytes(), &key, &EXPECT),
            Err(BundleError::Json(_))
        ));

        let mut dup = bundle();
        let mut second = dup.tokens[0].clone();
        second.name = "other".into();
        dup.tokens.push(second);
        dup.sign(&key);
        assert!(matches!(
            Gate::load(dup.to_json().as_bytes(), &key, &EXPECT),
            Err(BundleError::DuplicateHash(_))
        ));

        let old = Expectation {
            newer_than: Some(3),
            ..EXPECT
        };
        assert_eq!(
            Gate::load(b.to_json().as_bytes(), &key, &old).err(),
            Some(BundleError::NotNewer {
                version: 3,
                current: 3
            })
        );
        let worker = Expectation {
            target: Target::Worker,
            ..EXPECT
        };
        assert!(matches!(
            Gate::load(b.to_json().as_bytes(), &key, &worker),
            Err(BundleError::WrongTarget { .. })
        ));
    }

    #[test]
    fn records_leave_out_what_is_absent_and_an_earlier_release_s_form_still_loads() {
        let record = bundle().tokens[0].clone();
        let hash = TokenHash::from_hex(&record.hash).unwrap();
        let written = serde_json::to_string(&record).unwrap();
        assert_eq!(
            written,
            format!(
                r#"{{"name":"ci","hash":"{}","scopes":["orders:*"],"created_at":900}}"#,
                record.hash
            )
        );
        assert_eq!(TokenRecord::from_json(written.as_bytes()).unwrap(), record);

        // As releases before 2026-12 wrote records: every member, the derived id included.
        let id = hash.token_id();
        let earlier = |id: &str| {
            format!(
                r#""name":"ci","token_id":"{id}","hash":"{}","scopes":["orders:*"],"created_at":900,"not_before":null,"expires_at":null,"revoked_at":null,"grace_until":null,"previous":null"#,
                record.hash
            )
        };
        let earlier_record = format!("{{{}}}", earlier(&id));
        assert_eq!(
            TokenRecord::from_json(earlier_record.as_bytes()).unwrap(),
            record
        );
        let wrong_id = format!("{{{}}}", earlier("tid_0000000000000000"));
        assert!(TokenRecord::from_json(wrong_id.as_bytes()).is_err());
        let old = TokenHash::of(b"secret-old-secret-old");
        let replaced = |id: &str| {
            format!(
                r#"{{"name":"ci","hash":"{}","scopes":[],"created_at":9,"previous":{{"token_id":"{id}","hash":"{}","grace_until":5}}}}"#,
                record.hash,
                old.to_hex()
            )
        };
        assert!(TokenRecord::from_json(replaced(&old.token_id()).as_bytes()).is_ok());
        assert!(TokenRecord::from_json(replaced(&id).as_bytes()).is_err());

        // A whole bundle an earlier release signed (an ECDS file still on disk) loads as sent.
        let key = SigningKey::from_bytes([9; 32]);
        let canonical = String::from_utf8(bundle().canonical_bytes()).unwrap();
        let current = &written[1..written.len() - 1];
        let signed_earlier = |id: &str| {
            let canonical = canonical.replace(current, &earlier(id));
            let tag = key.sign_bytes(canonical.as_bytes());
            format!(
                "{},\"signature\":\"{tag}\"}}",
                &canonical[..canonical.len() - 1]
            )
        };
        let verified = load_verified(signed_earlier(&id).as_bytes(), &key).unwrap();
        assert_eq!(
            (verified.table.tokens, verified.table.records.len()),
            (1, 1)
        );
        assert!(load_verified(signed_earlier("tid_0000000000000000").as_bytes(), &key).is_err());
    }
}
