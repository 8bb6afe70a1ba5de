//! What the Worker serves: the KV layout, the in-isolate caches and the KV read counter.
//!
//! KV layout (binding `TOKENGATE`):
//! - `meta`: the last fully applied bundle without its tokens ([`Meta`]);
//! - `token:<sha256 hex>`: one `TokenRecord` per token (hashes only, never a plaintext);
//! - `push:index`, `push:intent`: the push bookkeeping (see `push`).
//!
//! Both caches live in the isolate and are trusted for [`CACHE_TTL_MS`]: a change written by
//! a push through another isolate is seen here within that bound (plus Workers KV's own
//! propagation between locations, which Cloudflare documents as up to 60 s). The isolate
//! that applies a push replaces its caches at once. Negative lookups are cached too, so a
//! flood of one unknown token costs one KV read per isolate per bound.

use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::fmt;
use std::pin::pin;
use std::rc::Rc;
use std::time::Duration;

use futures_util::future::{select, Either};
use serde::{Deserialize, Serialize};
use tokengate_core::access::Settings;
use tokengate_core::token::TokenHash;
use tokengate_core::{Bundle, Gate, Record, TokenRecord};
use worker::{Delay, Env, KvStore};

use crate::KV_BINDING;

/// The KV key of the served bundle's meta.
pub const META_KEY: &str = "meta";
/// The KV key prefix of token records; the rest is the lower-case hex SHA-256.
pub const TOKEN_PREFIX: &str = "token:";
/// How long a cached meta or token record (found or not) is trusted: the staleness bound.
pub const CACHE_TTL_MS: f64 = 5_000.0;
/// A KV read that takes longer fails the request closed (503) instead of hanging it.
pub const KV_TIMEOUT_MS: u64 = 3_000;
/// Token records one isolate keeps; past this the cache starts over (memory stays bounded).
const MAX_CACHED_TOKENS: usize = 10_000;

/// The bundle as served, stored under [`META_KEY`] once every token change is applied.
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Meta {
    /// The pushed payload with `tokens` emptied (its signatures were checked at the push);
    /// its `keys` are what this Worker trusts from then on.
    pub bundle: Bundle,
    /// How many token records the bundle held.
    pub tokens: usize,
}

impl Meta {
    /// Parses a stored meta: `{"bundle": {...}, "tokens": n}`, nothing else.
    pub fn from_json(text: &str) -> Result<Self, serde_json::Error> {
        serde_json::from_str(text)
    }
}

/// A validated meta, ready to decide requests.
pub struct Served {
    /// Policy, credential sources, version, environment, revoke-all; no token records.
    pub gate: Gate,
    /// The bundle's Cloudflare Access settings, if any.
    pub access: Option<Settings>,
    /// How many token records the bundle held.
    pub tokens: usize,
}

impl Served {
    /// Validates a meta the same way a push validated its bundle.
    pub fn from_meta(meta: Meta) -> Result<Self, String> {
        let access = meta
            .bundle
            .cloudflare_access
            .as_ref()
            .map(Settings::from_config)
            .transpose()
            .map_err(|e| e.to_string())?;
        let gate = Gate::from_bundle(meta.bundle).map_err(|e| e.to_string())?;
        Ok(Self {
            gate,
            access,
            tokens: meta.tokens,
        })
    }
}

/// Why the Worker cannot decide: every one of these is a 503 (fail closed).
#[derive(Debug)]
pub enum Failure {
    /// The KV binding or a variable is missing.
    Config(String),
    /// Workers KV answered with an error.
    Kv(String),
    /// Workers KV did not answer within [`KV_TIMEOUT_MS`].
    Timeout,
    /// A value in KV does not parse or validate.
    Corrupt(String),
    /// Fetching or using the Access team keys failed.
    Keys(String),
}

impl fmt::Display for Failure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Config(e) => write!(f, "configuration: {e}"),
            Self::Kv(e) => write!(f, "KV error: {e}"),
            Self::Timeout => write!(f, "KV read timed out after {KV_TIMEOUT_MS} ms"),
            Self::Corrupt(e) => write!(f, "corrupt KV value: {e}"),
            Self::Keys(e) => write!(f, "Access keys: {e}"),
        }
    }
}

struct Cached<T> {
    value: T,
    at: f64,
}

thread_local! {
    // `None`: nothing cached; `Some(value: None)`: KV holds no meta yet (also cached).
    static META: RefCell<Option<Cached<Option<Rc<Served>>>>> = const { RefCell::new(None) };
    static TOKENS: RefCell<HashMap<[u8; 32], Cached<Option<Record>>>> = RefCell::new(HashMap::new());
    static KV_READS: Cell<u64> = const { Cell::new(0) };
}

/// Milliseconds since the epoch (Workers advance the clock at I/O, which is enough here).
pub fn now_ms() -> f64 {
    js_sys::Date::now()
}

/// Whole seconds since the epoch, the unit of every time in a bundle.
pub fn now_secs() -> u64 {
    (now_ms() / 1000.0).floor().max(0.0) as u64
}

/// KV reads this isolate has made (reported by the status endpoint).
pub fn kv_reads() -> u64 {
    KV_READS.with(Cell::get)
}

/// The KV namespace, or a configuration failure.
pub fn kv(env: &Env) -> Result<KvStore, Failure> {
    env.kv(KV_BINDING)
        .map_err(|e| Failure::Config(format!("KV binding {KV_BINDING}: {e}")))
}

/// One counted KV read, bounded by [`KV_TIMEOUT_MS`].
pub async fn kv_get(kv: &KvStore, key: &str) -> Result<Option<String>, Failure> {
    KV_READS.with(|n| n.set(n.get() + 1));
    let get = pin!(kv.get(key).text());
    let timeout = pin!(Delay::from(Duration::from_millis(KV_TIMEOUT_MS)));
    match select(get, timeout).await {
        Either::Left((result, _)) => result.map_err(|e| Failure::Kv(e.to_string())),
        Either::Right(_) => Err(Failure::Timeout),
    }
}

/// Reads the meta straight from KV (pushes must not trust a cache).
pub async fn read_meta(kv: &KvStore) -> Result<Option<Meta>, Failure> {
    match kv_get(kv, META_KEY).await? {
        None => Ok(None),
        Some(text) => Meta::from_json(&text)
            .map(Some)
            .map_err(|e| Failure::Corrupt(format!("{META_KEY}: {e}"))),
    }
}

/// The bundle served now, from the cache when it is younger than [`CACHE_TTL_MS`].
pub async fn current(env: &Env) -> Result<Option<Rc<Served>>, Failure> {
    let now = now_ms();
    let hit = META.with(|m| {
        m.borrow()
            .as_ref()
            .filter(|c| now - c.at < CACHE_TTL_MS)
            .map(|c| c.value.clone())
    });
    if let Some(served) = hit {
        return Ok(served);
    }
    let served = match read_meta(&kv(env)?).await? {
        None => None,
        Some(meta) => Some(Rc::new(
            Served::from_meta(meta).map_err(|e| Failure::Corrupt(format!("{META_KEY}: {e}")))?,
        )),
    };
    META.with(|m| {
        *m.borrow_mut() = Some(Cached {
            value: served.clone(),
            at: now,
        })
    });
    Ok(served)
}

/// The record of one token hash (`None`: no such token), cached like the meta.
pub async fn record(env: &Env, hash: &TokenHash) -> Result<Option<Record>, Failure> {
    let now = now_ms();
    let hit = TOKENS.with(|t| {
        t.borrow()
            .get(&hash.0)
            .filter(|c| now - c.at < CACHE_TTL_MS)
            .map(|c| c.value.clone())
    });
    if let Some(record) = hit {
        return Ok(record);
    }
    let key = format!("{TOKEN_PREFIX}{}", hash.to_hex());
    let record = match kv_get(&kv(env)?, &key).await? {
        None => None,
        Some(text) => {
            let raw = TokenRecord::from_json(text.as_bytes())
                .map_err(|e| Failure::Corrupt(format!("{key}: {e}")))?;
            Some(
                Record::from_token_record(&raw)
                    .map_err(|e| Failure::Corrupt(format!("{key}: {e}")))?,
            )
        }
    };
    TOKENS.with(|t| {
        let mut tokens = t.borrow_mut();
        if tokens.len() >= MAX_CACHED_TOKENS {
            tokens.clear();
        }
        tokens.insert(
            hash.0,
            Cached {
                value: record.clone(),
                at: now,
            },
        );
    });
    Ok(record)
}

/// After a completed push: serve the new bundle in this isolate at once.
pub fn install(served: Served) {
    let now = now_ms();
    META.with(|m| {
        *m.borrow_mut() = Some(Cached {
            value: Some(Rc::new(served)),
            at: now,
        })
    });
    forget_tokens();
}

/// After a push changed token records: this isolate reads them again.
pub fn forget_tokens() {
    TOKENS.with(|t| t.borrow_mut().clear());
}
