//! What serves: a verified, validated bundle turned into a [`Gate`] that decides requests.
//!
//! Loading is all-or-nothing: [`Gate::load`] opens the envelope against the keys the gate
//! trusts ([`Envelope::open`]), checks target, environment and version, then reads every
//! token record straight into the table (checked in place, indexed by hash), so a large
//! bundle's peak memory is its text plus the table. Any failure refuses the whole bundle.

use std::borrow::Cow;
use std::collections::HashMap;
use std::hash::{BuildHasher, BuildHasherDefault, Hasher};
use std::sync::Arc;

use hashbrown::HashTable;
use serde::de::{DeserializeSeed, SeqAccess, Visitor};
use serde::Deserialize;
use serde_json::value::RawValue;

use crate::bundle::{Bundle, BundleError, Envelope, Expectation, Target, TokenRecord, MAX_TOKENS};
use crate::credentials::{self, Source};
use crate::issuer::{IssuerSecrets, Issuers};
use crate::keys::KeySet;
use crate::policy::{self, Policy};
use crate::rate::RateLimit;
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

/// Whether `grants` grant everything the scope pattern `scope` does (`x:y`, `x:*` or `*`;
/// these form a chain, so the scopes two lists both grant are those of each list the other
/// covers).
pub(crate) fn covers(grants: &[String], scope: &str) -> bool {
    grants.iter().any(|grant| {
        grant == scope
            || grant == "*"
            || (scope != "*"
                && grant
                    .strip_suffix('*')
                    .is_some_and(|stem| stem.ends_with(':') && scope.starts_with(stem)))
    })
}

/// A token record as the gate holds it, parsed and checked; kept small, since a gate may
/// hold a million (the token id is derived from the hash when needed).
#[derive(Debug, Clone)]
pub struct Record {
    pub(crate) hash: TokenHash,
    pub(crate) name: Box<str>,
    pub(crate) scopes: Arc<Scopes>,
    pub(crate) created_at: u64,
    pub(crate) not_before: Option<u64>,
    pub(crate) expires_at: Option<u64>,
    pub(crate) revoked_at: Option<u64>,
    pub(crate) grace_until: Option<u64>,
    pub(crate) rate_limit: Option<RateLimit>,
}

/// Record positions by token hash. The table holds 4-byte positions and compares the records'
/// own hashes, instead of a second copy of every 32-byte hash: 100,000 tokens take 0.7 MB
/// here instead of 4.9 MB (a `HashMap<[u8; 32], u32>`), a third of the table a gate holds.
#[derive(Debug, Clone, Default)]
pub(crate) struct Index(HashTable<u32>);

/// A SHA-256 is already uniformly distributed: its first eight bytes are the table's hash.
fn digest_key(hash: &[u8; 32]) -> u64 {
    let mut word = [0u8; 8];
    word.copy_from_slice(&hash[..8]);
    u64::from_le_bytes(word)
}

impl Index {
    fn with_capacity(capacity: usize) -> Self {
        Self(HashTable::with_capacity(capacity))
    }

    /// The record with this hash.
    pub(crate) fn get<'r>(&self, records: &'r [Record], hash: &[u8; 32]) -> Option<&'r Record> {
        let matches = |&position: &u32| {
            records
                .get(position as usize)
                .is_some_and(|r| &r.hash.0 == hash)
        };
        let position = *self.0.find(digest_key(hash), matches)?;
        records.get(position as usize)
    }

    /// Adds the record at `position` of `records`; `false` if its hash is there already.
    fn insert(&mut self, records: &[Record], position: u32) -> bool {
        let Some(hash) = records.get(position as usize).map(|r| &r.hash.0) else {
            return false;
        };
        if self.get(records, hash).is_some() {
            return false;
        }
        let key = |&p: &u32| records.get(p as usize).map_or(0, |r| digest_key(&r.hash.0));
        self.0.insert_unique(digest_key(hash), position, key);
        true
    }
}

/// The hasher of the sets a load checks uniqueness with (names, scope sets): rotate, xor and
/// multiply per 8-byte word (as rustc's FxHash), then a final mix so that the low bits, which
/// pick the bucket, depend on every byte (names share long prefixes). Several times cheaper
/// than SipHash on short keys; flooding resistance buys nothing here, since the keys come from
/// a bundle whose signature was verified before its first record is read.
#[derive(Default)]
pub(crate) struct LoadHasher(u64);

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

pub(crate) type LoadMap<K, V> = HashMap<K, V, BuildHasherDefault<LoadHasher>>;

fn load_hash(bytes: &[u8]) -> u64 {
    BuildHasherDefault::<LoadHasher>::default().hash_one(bytes)
}

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
    pub(crate) issuers: Issuers,
    /// HS256 issuers' secrets: the host's, not the bundle's ([`Gate::set_issuer_secrets`]);
    /// `Err`: the host's value could not be read, and none is used.
    pub(crate) issuer_secrets: Arc<Result<IssuerSecrets, String>>,
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
        let settings = check_settings(&head, &keys)?;
        let raw = head.tokens.get();
        let (tokens, hashes) = count_records(raw.as_bytes());
        let mut table = TokenTable::with_capacity(tokens, hashes);
        table.read(raw)?;
        Ok(Self::assemble(head, keys, served, settings, table))
    }

    /// Validates a bundle that is not published text (the CLI's own, a Worker's stored meta,
    /// whose signatures were checked when it was pushed).
    pub fn from_bundle(mut bundle: Bundle) -> Result<Self, BundleError> {
        let keys = KeySet::from_hex(&bundle.keys).map_err(BundleError::Keys)?;
        let settings = check_settings(&bundle, &keys)?;
        let table = TokenTable::of(&std::mem::take(&mut bundle.tokens))?;
        let served = Served {
            version: bundle.version,
            signatures: String::new(),
        };
        Ok(Self::assemble(bundle, keys, served, settings, table))
    }

    fn assemble<T>(
        bundle: Bundle<T>,
        keys: KeySet,
        served: Served,
        (sources, issuers): (Vec<Source>, Issuers),
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
            issuers,
            issuer_secrets: Arc::new(Ok(IssuerSecrets::default())),
        }
    }

    /// Gives the gate the HS256 issuers' secrets: the host's value of
    /// [`SECRETS_VARIABLE`](crate::issuer::SECRETS_VARIABLE) (`None`: unset), never a
    /// bundle's. Without an issuer's secret, its tokens are answered 503; a value that cannot
    /// be read gives none at all (every other token is still decided).
    pub fn set_issuer_secrets(&mut self, value: Option<&str>) {
        let secrets = value.map_or_else(|| Ok(IssuerSecrets::default()), IssuerSecrets::parse);
        self.issuer_secrets = Arc::new(secrets);
    }

    /// What a host logs once it set the secrets: a value it could not read, and the HS256
    /// issuers of the bundle it has no secret for (never a secret).
    pub fn issuer_secret_warnings(&self) -> Vec<String> {
        let variable = crate::issuer::SECRETS_VARIABLE;
        let mut warnings = Vec::new();
        let secrets = match self.issuer_secrets.as_ref() {
            Ok(secrets) => Some(secrets),
            Err(e) => {
                warnings.push(format!(
                    "{variable} cannot be read, so no HS256 issuer's tokens are accepted: {e}"
                ));
                None
            }
        };
        let missing: Vec<&str> = self
            .issuers
            .hs256_kids()
            .filter(|kid| !secrets.is_some_and(|s| s.kids().any(|k| k == *kid)))
            .collect();
        if !missing.is_empty() {
            warnings.push(format!(
                "HS256 issuer(s) {} have no secret in {variable}: their tokens are answered 503",
                missing.join(", ")
            ));
        }
        warnings
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

    /// The revoke-all cut-off in force, if any.
    pub fn revoke_all_at(&self) -> Option<u64> {
        self.revoke_all_at
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

/// The checks of everything in a bundle but its tokens and its keys (`admin_keys`, parsed
/// already); the credential sources and the issuers parsed.
fn check_settings<T>(
    bundle: &Bundle<T>,
    admin_keys: &KeySet,
) -> Result<(Vec<Source>, Issuers), BundleError> {
    if !policy::valid_name(&bundle.environment) {
        return Err(BundleError::BadEnvironment(bundle.environment.clone()));
    }
    policy::validate(&bundle.policy).map_err(BundleError::Policy)?;
    if bundle.target == Target::Worker {
        // Cloudflare's Rate Limiting binding counts over 10 or 60 seconds only.
        let unenforceable = bundle.policy.rules.iter().find(|rule| {
            rule.rate_limit
                .is_some_and(|limit| !limit.countable_on(Target::Worker))
        });
        if let Some(rule) = unenforceable {
            return Err(BundleError::WorkerRateLimit(format!(
                "rule {:?}",
                rule.name
            )));
        }
    }
    let sources =
        credentials::parse_sources(&bundle.credentials.sources).map_err(BundleError::Sources)?;
    let issuers = Issuers::new(&bundle.issuers, &bundle.revoked_jtis, admin_keys)
        .map_err(BundleError::Issuers)?;
    Ok((sources, issuers))
}

/// A token record as the bundle's text holds it, borrowed from the text: the gate's load
/// reads 100,000 of them, and keeps only what [`Record`] needs. Accepts exactly what
/// [`TokenRecord`] accepts.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RecordText<'a> {
    #[serde(borrow)]
    name: Cow<'a, str>,
    #[serde(borrow)]
    hash: Cow<'a, str>,
    /// The scopes' JSON text: the key of the scope-set cache, read on a miss only.
    #[serde(borrow)]
    scopes: &'a RawValue,
    created_at: u64,
    #[serde(default)]
    not_before: Option<u64>,
    #[serde(default)]
    expires_at: Option<u64>,
    #[serde(default)]
    revoked_at: Option<u64>,
    #[serde(default)]
    grace_until: Option<u64>,
    #[serde(default, borrow)]
    previous: Option<PreviousText<'a>>,
    #[serde(default)]
    rate_limit: Option<RateLimit>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PreviousText<'a> {
    #[serde(borrow)]
    hash: Cow<'a, str>,
    grace_until: u64,
}

/// A gate's token records, added one at a time: each checked in place and indexed by hash;
/// names and hashes must be unique.
struct TokenTable {
    index: Index,
    /// One per recognised hash (a rotated token has two).
    records: Vec<Record>,
    /// Positions in `records` of each token's own record, by name (uniqueness).
    names: HashTable<u32>,
    /// Most tokens share a handful of scope sets: one copy of each, by its JSON text (the
    /// same text always reads as the same set; two texts of one set get two copies).
    scope_sets: LoadMap<Box<str>, Arc<Scopes>>,
    /// Token records added (a rotated token counts once).
    tokens: usize,
}

impl TokenTable {
    /// Room for `tokens` records, `hashes` of them with the hash a rotation replaced.
    fn with_capacity(tokens: usize, hashes: usize) -> Self {
        Self {
            index: Index::with_capacity(hashes),
            records: Vec::with_capacity(hashes),
            names: HashTable::with_capacity(tokens),
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
            let scopes = serde_json::value::to_raw_value(&token.scopes)
                .map_err(|e| BundleError::Json(format!("tokens: {e}")))?;
            table.add(&RecordText::of(token, &scopes))?;
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

    fn add(&mut self, token: &RecordText<'_>) -> Result<(), BundleError> {
        if self.tokens == MAX_TOKENS {
            return Err(BundleError::TooManyTokens(MAX_TOKENS + 1));
        }
        let records = &self.records;
        let same_name = |&p: &u32| {
            records
                .get(p as usize)
                .is_some_and(|r| *r.name == *token.name)
        };
        let name_key = load_hash(token.name.as_bytes());
        if self.names.find(name_key, same_name).is_some() {
            return Err(BundleError::DuplicateName(token.name.to_string()));
        }
        // A scope set is checked once, when first seen: most tokens share a handful.
        let scopes = match self.scope_sets.get(token.scopes.get()) {
            Some(shared) => Arc::clone(shared),
            None => {
                let list: Vec<String> = serde_json::from_str(token.scopes.get()).map_err(|e| {
                    BundleError::Json(format!("tokens: {}: scopes: {e}", token.name))
                })?;
                check_scopes(&token.name, &list)?;
                let shared = Scopes::new(&list);
                self.scope_sets
                    .insert(token.scopes.get().into(), Arc::clone(&shared));
                shared
            }
        };
        // The record itself and, during a rotation's grace, the token it replaced.
        let own = u32::try_from(self.records.len())
            .map_err(|_| BundleError::TooManyTokens(self.records.len()))?;
        let previous = token.previous.as_ref();
        for as_previous in std::iter::once(None).chain(previous.map(Some)) {
            let record = check_record(token, as_previous, Arc::clone(&scopes))?;
            let position = u32::try_from(self.records.len())
                .map_err(|_| BundleError::TooManyTokens(self.records.len()))?;
            self.records.push(record);
            if !self.index.insert(&self.records, position) {
                let duplicate = self.records.pop().map(|r| r.hash.token_id());
                return Err(BundleError::DuplicateHash(duplicate.unwrap_or_default()));
            }
        }
        let records = &self.records;
        let name_of = |&p: &u32| {
            records
                .get(p as usize)
                .map_or(0, |r| load_hash(r.name.as_bytes()))
        };
        self.names.insert_unique(name_key, own, name_of);
        self.tokens += 1;
        Ok(())
    }
}

impl<'a> RecordText<'a> {
    /// A parsed record seen as text (the CLI's and the Worker's records), with its scopes'
    /// JSON text.
    fn of(token: &'a TokenRecord, scopes: &'a RawValue) -> Self {
        Self {
            name: Cow::Borrowed(&token.name),
            hash: Cow::Borrowed(&token.hash),
            scopes,
            created_at: token.created_at,
            not_before: token.not_before,
            expires_at: token.expires_at,
            revoked_at: token.revoked_at,
            grace_until: token.grace_until,
            previous: token.previous.as_ref().map(|p| PreviousText {
                hash: Cow::Borrowed(&p.hash),
                grace_until: p.grace_until,
            }),
            rate_limit: token.rate_limit,
        }
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
        while let Some(token) = seq.next_element::<RecordText<'de>>()? {
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
        check_scopes(&token.name, &token.scopes)?;
        // The scopes' text is only the table's cache key: a single record needs none.
        let text = RecordText::of(token, RawValue::NULL);
        check_record(&text, None, Scopes::new(&token.scopes))
    }

    /// The token's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// What this record and `other` (of the same hash) both allow: the scopes both grant,
    /// the later start, the earlier end of each kind, the earlier creation (a revoke-all
    /// cut-off catches it if it catches either); this record's name.
    pub fn meet(&self, other: &Record) -> Record {
        let mut list: Vec<String> = Vec::new();
        let both = self
            .scopes
            .list
            .iter()
            .filter(|scope| covers(&other.scopes.list, scope))
            .chain(
                other
                    .scopes
                    .list
                    .iter()
                    .filter(|scope| covers(&self.scopes.list, scope)),
            );
        for scope in both {
            if !list.contains(scope) {
                list.push(scope.clone());
            }
        }
        let earliest = |a: Option<u64>, b: Option<u64>| match (a, b) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        Record {
            hash: self.hash,
            name: self.name.clone(),
            scopes: Scopes::new(&list),
            created_at: self.created_at.min(other.created_at),
            not_before: self.not_before.max(other.not_before),
            expires_at: earliest(self.expires_at, other.expires_at),
            revoked_at: earliest(self.revoked_at, other.revoked_at),
            grace_until: earliest(self.grace_until, other.grace_until),
            rate_limit: match (self.rate_limit, other.rate_limit) {
                (Some(mine), Some(theirs)) => Some(mine.stricter(theirs)),
                (mine, theirs) => mine.or(theirs),
            },
        }
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
fn check_scopes(name: &str, scopes: &[String]) -> Result<(), BundleError> {
    let problem = |problem| BundleError::Token {
        name: name.to_owned(),
        problem,
    };
    if scopes.len() > policy::MAX_SCOPES {
        return Err(problem("too many scopes"));
    }
    if !scopes.iter().all(|s| policy::valid_grant(s)) {
        return Err(problem("a scope is malformed (use 'x:y', 'x:*' or '*')"));
    }
    Ok(())
}

/// Checks `token`, or with `as_previous` the token it replaced (its own hash and grace;
/// the name, scopes and lifetime of `token`), into the record a gate looks up.
fn check_record(
    token: &RecordText<'_>,
    as_previous: Option<&PreviousText<'_>>,
    scopes: Arc<Scopes>,
) -> Result<Record, BundleError> {
    let problem = |problem| BundleError::Token {
        name: token.name.to_string(),
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
    if let Some(reason) = token.rate_limit.and_then(|limit| limit.problem()) {
        return Err(problem(reason));
    }
    Ok(Record {
        hash,
        name: token.name.as_ref().into(),
        scopes,
        created_at: token.created_at,
        not_before: token.not_before,
        expires_at: token.expires_at,
        revoked_at: token.revoked_at,
        grace_until,
        rate_limit: token.rate_limit,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bundle::{publish, CredentialConfig, PreviousToken, SignatureEntry, Target};
    use crate::decision::{Outcome, Reason, Request, Step};
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
            rate_limit: None,
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
            issuers: Vec::new(),
            revoked_jtis: Vec::new(),
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
    fn a_host_hears_of_secrets_it_could_not_read_or_lacks_never_their_text() {
        use crate::issuer::{Algorithm, IssuerConfig};
        let (_, a) = key(1);
        let mut with_hs256 = bundle(3, &[&a]);
        with_hs256.issuers = vec![IssuerConfig {
            kid: "legacy".into(),
            alg: Algorithm::Hs256,
            public_key: None,
            audience: None,
            scopes: vec!["orders:*".into()],
            max_lifetime: 900,
        }];
        let mut gate = Gate::from_bundle(with_hs256).unwrap();
        let secret = "c2VjcmV0IG9mIHRoZSBpbi1ob3VzZSBpc3N1ZXIsIDMyIGJ5dGVzIQ";
        gate.set_issuer_secrets(Some(&format!("legacy={secret}")));
        assert_eq!(gate.issuer_secret_warnings(), Vec::<String>::new());
        gate.set_issuer_secrets(None);
        let warnings = gate.issuer_secret_warnings();
        assert_eq!(warnings.len(), 1, "{warnings:?}");
        assert!(warnings[0].contains("legacy"), "{warnings:?}");
        // Written wrong (no `kid=`): no secrets at all, and not a character of it in the log.
        gate.set_issuer_secrets(Some(secret));
        let warnings = gate.issuer_secret_warnings();
        assert_eq!(warnings.len(), 2, "{warnings:?}");
        assert!(
            warnings.iter().all(|w| !w.contains(&secret[..8])),
            "{warnings:?}"
        );
    }

    #[test]
    fn a_token_a_push_is_changing_passes_only_if_both_records_allow_it() {
        let (_, a) = key(1);
        let mut guarded = bundle(3, &[&a]);
        guarded.policy = serde_json::from_value(serde_json::json!({"rules": [{
            "name": "all", "path": {"prefix": "/"}, "methods": [], "host": null,
            "access": "token", "all_of": [], "any_of": [], "cf_access": false
        }]}))
        .unwrap();
        let gate = Gate::from_bundle(guarded.clone()).unwrap();
        let headers = [("authorization", "Bearer secret-one-secret-one")];
        let request = Request {
            method: "GET",
            path: "/orders",
            authority: "api",
            headers: &headers,
        };
        let served = Record::from_token_record(&guarded.tokens[0]).unwrap();
        let revoked = Record::from_token_record(&TokenRecord {
            revoked_at: Some(950),
            ..guarded.tokens[0].clone()
        })
        .unwrap();
        let decide = |served: Option<&Record>, incoming: &[Option<Record>]| {
            let Step::Lookup(pending) = gate.begin(&request, 0) else {
                panic!("a lookup was expected");
            };
            gate.finish_changing(pending, served, incoming, 1_000)
        };
        let scopes_sent = |d: &crate::Decision| {
            d.add_headers
                .iter()
                .find(|(name, _)| *name == crate::decision::SCOPES_HEADER)
                .map(|(_, v)| v.clone())
        };
        // Both allow: allowed, as served.
        let both = decide(Some(&served), &[Some(served.clone())]);
        assert_eq!((both.outcome, both.reason), (Outcome::Allow, Reason::Valid));
        assert_eq!(scopes_sent(&both).as_deref(), Some("orders:*"));
        // The push revokes it or drops it: refused already.
        let revoking = [Some(revoked.clone())];
        assert_eq!(decide(Some(&served), &revoking).reason, Reason::Revoked);
        assert_eq!(decide(Some(&served), &[None]).reason, Reason::Unknown);
        // Two pushes in a row (the first replaced): every one must allow.
        let twice = [Some(served.clone()), Some(revoked.clone())];
        assert_eq!(decide(Some(&served), &twice).reason, Reason::Revoked);
        // The push would grant what is refused now (un-revoke, add): not before its commit.
        assert_eq!(
            decide(Some(&revoked), &[Some(served.clone())]).reason,
            Reason::Revoked
        );
        assert_eq!(
            decide(None, &[Some(served.clone())]).reason,
            Reason::Unknown
        );
        // Fewer scopes hold at once; more wait: the upstream hears only what both grant.
        let narrowed = Record::from_token_record(&TokenRecord {
            scopes: vec!["orders:read".into(), "billing:read".into()],
            ..guarded.tokens[0].clone()
        })
        .unwrap();
        let allowed = decide(Some(&served), &[Some(narrowed.clone())]);
        assert_eq!(allowed.outcome, Outcome::Allow);
        assert_eq!(scopes_sent(&allowed).as_deref(), Some("orders:read"));
        let widened = decide(Some(&narrowed), &[Some(served.clone())]);
        assert_eq!(scopes_sent(&widened).as_deref(), Some("orders:read"));
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

    /// The streamed reader (token records borrowed from the text) and the owned one (the
    /// CLI's, the Worker's) take and refuse the same records.
    #[test]
    fn records_read_from_the_text_are_checked_as_parsed_ones() {
        let (signing, public) = key(7);
        let payload_with = |tokens: &str| {
            let mut value = serde_json::to_value(bundle(3, &[&public])).unwrap();
            value["tokens"] = serde_json::Value::Null;
            serde_json::to_string(&value)
                .unwrap()
                .replace("\"tokens\":null", &format!("\"tokens\":{tokens}"))
        };
        let hash = |secret: &[u8]| TokenHash::of(secret).to_hex();
        let (a, b) = (
            hash(b"secret-aaaa-secret-aaaa"),
            hash(b"secret-bbbb-secret-bbbb"),
        );
        let record = |name: &str, hash: &str, scopes: &str| {
            format!(r#"{{"name":"{name}","hash":"{hash}","scopes":{scopes},"created_at":900}}"#)
        };
        let taken = [
            // An escaped name is the same name; scope sets of equal lists in other texts.
            format!(
                "[{},{}]",
                record("c\\u0069", &a, r#"["x:y"]"#),
                record("d", &b, r#"[ "x:y" ]"#)
            ),
            format!(r#"[{}]"#, record("ci", &a, "[]")),
        ];
        let refused = [
            format!(r#"[{}]"#, record("ci", &a, "null")),
            format!(r#"[{}]"#, record("ci", &a, r#"["x:y"],"scopes":["*"]"#)),
            format!(r#"[{}]"#, record("ci", &a, r#"["X Y"]"#)),
            format!(r#"[{},{}]"#, record("ci", &a, "[]"), record("ci", &b, "[]")),
            format!(r#"[{},{}]"#, record("ci", &a, "[]"), record("cd", &a, "[]")),
            // A rotation's old hash equal to the token's own.
            format!(
                r#"[{{"name":"ci","hash":"{a}","scopes":[],"created_at":900,"previous":{{"hash":"{a}","grace_until":2000}}}}]"#
            ),
            format!(r#"[{{"name":"ci","hash":"{a}","scopes":[],"created_at":900,"extra":1}}]"#),
            format!(r#"[{}]"#, record("ci", &a[..63], "[]")),
        ];
        for (tokens, loads) in taken
            .iter()
            .map(|t| (t, true))
            .chain(refused.iter().map(|t| (t, false)))
        {
            let payload = payload_with(tokens);
            let streamed = Gate::load(
                sign(&payload, &[&signing]).as_bytes(),
                &trust(&[&public]),
                &EXPECT,
            );
            let parsed = serde_json::from_str::<Bundle>(&payload)
                .map_err(|e| BundleError::Json(e.to_string()))
                .and_then(Gate::from_bundle);
            assert_eq!(
                streamed.is_ok(),
                loads,
                "streamed {tokens}: {:?}",
                streamed.err()
            );
            assert_eq!(parsed.is_ok(), loads, "parsed {tokens}: {:?}", parsed.err());
        }
    }
}
