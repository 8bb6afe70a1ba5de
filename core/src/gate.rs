//! What serves: a verified, validated bundle turned into a [`Gate`] that decides requests.
//!
//! Loading is all-or-nothing: [`Gate::load`] opens the envelope against the keys the gate
//! trusts ([`Envelope::open`]), checks target, environment and version, then reads every
//! token record straight into the table (checked in place, indexed by hash), so a large
//! bundle's peak memory is its text plus the table. Any failure refuses the whole bundle.

use std::collections::{HashMap, HashSet};
use std::hash::{BuildHasherDefault, Hasher};
use std::sync::Arc;

use serde::de::{DeserializeSeed, SeqAccess, Visitor};
use serde_json::value::RawValue;

use crate::bundle::{
    Bundle, BundleError, Envelope, Expectation, PreviousToken, TokenRecord, MAX_TOKENS,
};
use crate::credentials::{self, Source};
use crate::keys::KeySet;
use crate::policy::{self, Policy};
use crate::token::TokenHash;

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
    pub(crate) revoked_at: Option<u64>,
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
    pub(crate) keys: KeySet,
    pub(crate) served: Served,
    pub(crate) policy: Policy,
    pub(crate) sources: Vec<Source>,
    pub(crate) forward_credential: bool,
    pub(crate) token_count: usize,
    /// One per recognised hash (a rotated token has two).
    pub(crate) records: Vec<Record>,
    pub(crate) index: Index,
    pub(crate) revoke_all_at: Option<u64>,
}

/// A bundle's payload with its token list still as text: what is checked before any
/// record is read.
pub type Head<'a> = Bundle<&'a RawValue>;

impl Gate {
    /// Opens a published bundle with the keys the gate trusts, checks it against `expect`
    /// and validates every part; on any failure nothing is returned.
    pub fn load(
        text: &[u8],
        trusted: &KeySet,
        expect: &Expectation<'_>,
    ) -> Result<Self, BundleError> {
        Self::load_checked(text, trusted, |head, _| expect.check(head))
    }

    /// As [`Gate::load`], with the caller's own check of the payload (target, environment,
    /// succession against [`Served`]), run once the signatures verified and before any token
    /// record is read.
    pub fn load_checked(
        text: &[u8],
        trusted: &KeySet,
        check: impl FnOnce(&Head<'_>, &Served) -> Result<(), BundleError>,
    ) -> Result<Self, BundleError> {
        let envelope = Envelope::open(text, trusted)?;
        let (head, keys): (Head<'_>, KeySet) = envelope.payload()?;
        let served = Served::of(head.version, &envelope);
        check(&head, &served)?;
        let sources = check_settings(&head)?;
        let raw = head.tokens.get();
        let (tokens, hashes) = count_records(raw.as_bytes());
        let mut table = TokenTable::with_capacity(tokens, hashes);
        table.read(raw)?;
        Ok(Self::assemble(head, keys, served, sources, table))
    }

    /// Validates a bundle that is not published text (the CLI's own, a Worker's stored meta,
    /// whose signatures were checked when it was pushed).
    pub fn from_bundle(mut bundle: Bundle) -> Result<Self, BundleError> {
        let keys = KeySet::from_hex(&bundle.keys).map_err(BundleError::Keys)?;
        let sources = check_settings(&bundle)?;
        let table = TokenTable::of(&std::mem::take(&mut bundle.tokens))?;
        let served = Served {
            version: bundle.version,
            signatures: String::new(),
        };
        Ok(Self::assemble(bundle, keys, served, sources, table))
    }

    fn assemble<T>(
        bundle: Bundle<T>,
        keys: KeySet,
        served: Served,
        sources: Vec<Source>,
        table: TokenTable,
    ) -> Self {
        Self {
            version: bundle.version,
            environment: bundle.environment,
            keys,
            served,
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

    /// The keys the bundle publishes: what a gate that chains trust trusts next.
    pub fn keys(&self) -> &KeySet {
        &self.keys
    }

    /// The mark of the bundle served, for succession checks.
    pub fn served(&self) -> &Served {
        &self.served
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
fn check_settings<T>(bundle: &Bundle<T>) -> Result<Vec<Source>, BundleError> {
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

    /// Reads a JSON array of token records into the table one at a time: no list of records
    /// is ever held.
    fn read(&mut self, json: &str) -> Result<(), BundleError> {
        let mut refused = None;
        let mut reader = serde_json::Deserializer::from_str(json);
        let read = RecordsInto {
            table: self,
            refused: &mut refused,
        }
        .deserialize(&mut reader)
        .and_then(|()| reader.end());
        match (read, refused) {
            (_, Some(refusal)) => Err(refusal),
            (Err(e), None) => Err(BundleError::Json(format!("tokens: {e}"))),
            (Ok(()), None) => Ok(()),
        }
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

/// The token array's reader: each record goes into the table as it is read; a refusal is
/// kept in `refused` and stops the read.
struct RecordsInto<'t> {
    table: &'t mut TokenTable,
    refused: &'t mut Option<BundleError>,
}

impl<'de> DeserializeSeed<'de> for RecordsInto<'_> {
    type Value = ();

    fn deserialize<D: serde::Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        d.deserialize_seq(self)
    }
}

impl<'de> Visitor<'de> for RecordsInto<'_> {
    type Value = ();

    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("an array of token records")
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
        while let Some(token) = seq.next_element::<TokenRecord>()? {
            if let Err(refusal) = self.table.add(&token) {
                *self.refused = Some(refusal);
                return Err(serde::de::Error::custom("token record refused"));
            }
        }
        Ok(())
    }
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

/// The bundle a gate serves, as far as succession is concerned: its version and its
/// signatures (different content of one version has other signatures).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Served {
    /// Its version.
    pub version: u64,
    /// Its signatures' hex, comma-joined.
    pub signatures: String,
}

impl Served {
    /// The mark of a bundle opened from `envelope`.
    pub fn of(version: u64, envelope: &Envelope<'_>) -> Self {
        let signatures: Vec<&str> = envelope
            .signatures()
            .iter()
            .map(|e| e.signature.as_str())
            .collect();
        Self {
            version,
            signatures: signatures.join(","),
        }
    }

    /// A compact text form, for hosts that share the mark between VMs.
    pub fn encode(&self) -> String {
        format!("{} {}", self.version, self.signatures)
    }

    /// The inverse of [`Served::encode`].
    pub fn decode(text: &str) -> Option<Self> {
        let (version, signatures) = text.split_once(' ')?;
        Some(Self {
            version: version.parse().ok()?,
            signatures: signatures.to_owned(),
        })
    }

    /// Whether the bundle marked `next` may follow this one: it must be newer, or be this
    /// very bundle (same version and signatures), which several VMs of one gate each load.
    /// An older or different bundle of the same version is a rollback or a replay.
    pub fn check_successor(&self, next: &Served) -> Result<(), BundleError> {
        if next.version > self.version || next == self {
            Ok(())
        } else {
            Err(BundleError::NotNewer {
                version: next.version,
                current: self.version,
            })
        }
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
        revoked_at: token.revoked_at,
        grace_until,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bundle::{publish, CredentialConfig, SignatureEntry, Target};
    use ed25519_dalek::{Signer, SigningKey};

    fn key(seed: u8) -> (SigningKey, String) {
        let signing = SigningKey::from_bytes(&[seed; 32]);
        let public = crate::hex::encode(signing.verifying_key().as_bytes());
        (signing, public)
    }

    fn bundle(version: u64, keys: &[&str]) -> Bundle {
        let record = |name: &str, secret: &[u8], scopes: &[&str]| TokenRecord {
            name: name.into(),
            hash: TokenHash::of(secret).to_hex(),
            scopes: scopes.iter().map(|s| (*s).to_owned()).collect(),
            created_at: 900,
            not_before: None,
            expires_at: None,
            revoked_at: None,
            grace_until: None,
            previous: None,
        };
        Bundle {
            version,
            issued_at: 1_000,
            environment: "prod".into(),
            target: Target::Envoy,
            keys: keys.iter().map(|k| (*k).to_owned()).collect(),
            policy: Policy { rules: vec![] },
            credentials: CredentialConfig {
                sources: vec!["bearer".into()],
                forward: false,
            },
            tokens: vec![
                record("ci", b"secret-one-secret-one", &["orders:*"]),
                TokenRecord {
                    previous: Some(PreviousToken {
                        hash: TokenHash::of(b"old-secret-old-secret").to_hex(),
                        grace_until: 2_000,
                    }),
                    ..record("probe", b"secret-two-secret-two", &["health:read"])
                },
            ],
            revoke_all_at: None,
            cloudflare_access: None,
        }
    }

    fn sign(payload: &str, signers: &[&SigningKey]) -> String {
        let signatures: Vec<SignatureEntry> = signers
            .iter()
            .map(|k| SignatureEntry {
                key_id: crate::keys::key_id(k.verifying_key().as_bytes()),
                signature: crate::hex::encode(&k.sign(payload.as_bytes()).to_bytes()),
            })
            .collect();
        publish(payload, &signatures)
    }

    const EXPECT: Expectation<'static> = Expectation {
        target: Target::Envoy,
        environment: Some("prod"),
        newer_than: Some(2),
    };

    fn trust(keys: &[&str]) -> KeySet {
        KeySet::from_hex(keys).unwrap()
    }

    #[test]
    fn a_published_bundle_loads_and_builds_the_gate_the_model_builds() {
        let (ka, a) = key(1);
        let model = bundle(3, &[&a]);
        let text = sign(&serde_json::to_string(&model).unwrap(), &[&ka]);
        let loaded = Gate::load(text.as_bytes(), &trust(&[&a]), &EXPECT).unwrap();
        let built = Gate::from_bundle(model).unwrap();
        assert_eq!((loaded.version(), loaded.token_count()), (3, 2));
        assert_eq!(
            loaded.records.len(),
            3,
            "the rotated token's old hash is indexed too"
        );
        assert_eq!(
            format!("{:?}", loaded.records),
            format!("{:?}", built.records)
        );
        assert_eq!(loaded.keys(), built.keys());
    }

    #[test]
    fn any_change_to_the_signed_bytes_or_the_signer_refuses() {
        let (ka, a) = key(1);
        let (kb, b) = key(2);
        let payload = serde_json::to_string(&bundle(3, &[&a])).unwrap();
        let text = sign(&payload, &[&ka]);
        let tampered = text.replace("orders:*", "orders:x");
        assert!(matches!(
            Gate::load(tampered.as_bytes(), &trust(&[&a]), &EXPECT),
            Err(BundleError::Signature(_))
        ));
        // Pretty-printed on the way: the payload's bytes are no longer those signed.
        let value: serde_json::Value = serde_json::from_str(&text).unwrap();
        let pretty = serde_json::to_string_pretty(&value).unwrap();
        assert!(Gate::load(pretty.as_bytes(), &trust(&[&a]), &EXPECT).is_err());
        // A key the gate does not trust.
        assert!(matches!(
            Gate::load(text.as_bytes(), &trust(&[&b]), &EXPECT),
            Err(BundleError::Signature(_))
        ));
        // Signed by a key the payload does not publish.
        let unlisted = sign(&payload, &[&ka, &kb]);
        assert_eq!(
            Gate::load(unlisted.as_bytes(), &trust(&[&a]), &EXPECT).unwrap_err(),
            BundleError::SignerNotPublished(crate::keys::key_id(kb.verifying_key().as_bytes()))
        );
    }

    #[test]
    fn unknown_members_duplicates_and_rollback_are_refused() {
        let (ka, a) = key(1);
        let publish_value = |value: serde_json::Value| sign(&value.to_string(), &[&ka]);
        let base = serde_json::to_value(bundle(3, &[&a])).unwrap();
        let refuse = |value: serde_json::Value| {
            Gate::load(publish_value(value).as_bytes(), &trust(&[&a]), &EXPECT).unwrap_err()
        };
        let mut extra = base.clone();
        extra["debug"] = true.into();
        assert!(matches!(refuse(extra), BundleError::Json(_)));
        let mut extra_record = base.clone();
        extra_record["tokens"][0]["token_id"] = "tid_0".into();
        assert!(matches!(refuse(extra_record), BundleError::Json(_)));
        let mut twice = base.clone();
        let first = twice["tokens"][0].clone();
        twice["tokens"].as_array_mut().unwrap().push(first);
        assert_eq!(refuse(twice), BundleError::DuplicateName("ci".into()));
        let mut old = base.clone();
        old["version"] = 2.into();
        assert!(matches!(refuse(old), BundleError::NotNewer { .. }));
        let mut bad_scope = base;
        bad_scope["tokens"][1]["scopes"] = serde_json::json!(["Orders Read"]);
        assert!(matches!(refuse(bad_scope), BundleError::Token { .. }));
    }

    #[test]
    fn every_distinct_scope_set_is_checked_even_after_valid_ones() {
        let mut model = bundle(3, &[&key(1).1]);
        for (i, scopes) in [vec!["a:b"], vec!["a:b"], vec!["no spaces"]]
            .into_iter()
            .enumerate()
        {
            let mut t = model.tokens[0].clone();
            t.name = format!("t{i}");
            t.hash = TokenHash::of(format!("secret-{i}-secret-{i}").as_bytes()).to_hex();
            t.scopes = scopes.into_iter().map(str::to_owned).collect();
            model.tokens.push(t);
        }
        assert!(matches!(
            Gate::from_bundle(model),
            Err(BundleError::Token { name, .. }) if name == "t2"
        ));
    }

    #[test]
    fn the_same_bundle_may_load_again_but_no_other_of_its_version() {
        let (ka, a) = key(1);
        let first = sign(&serde_json::to_string(&bundle(3, &[&a])).unwrap(), &[&ka]);
        let gate = Gate::load(first.as_bytes(), &trust(&[&a]), &EXPECT).unwrap();
        let served = gate.served().clone();
        let again = |text: &str| {
            Gate::load_checked(text.as_bytes(), &trust(&[&a]), |_, next| {
                served.check_successor(next)
            })
        };
        assert!(
            again(&first).is_ok(),
            "another VM of one gate loads the very bundle"
        );
        let mut other = bundle(3, &[&a]);
        other.revoke_all_at = Some(950);
        let other = sign(&serde_json::to_string(&other).unwrap(), &[&ka]);
        assert!(matches!(again(&other), Err(BundleError::NotNewer { .. })));
        let newer = sign(&serde_json::to_string(&bundle(4, &[&a])).unwrap(), &[&ka]);
        assert!(again(&newer).is_ok());
        assert_eq!(Served::decode(&served.encode()), Some(served));
    }
}
