//! What the Worker serves: the push state's view, the in-isolate caches, the page lookups and
//! the KV read counter.
//!
//! The served bundle (without its tokens) comes from the `PushState` Durable Object
//! ([`crate::state`]); the token records are in Workers KV, in immutable pages
//! `page:<sha256>` ([`tokengate_core::pages`]).
//!
//! Staleness: each isolate trusts the object's small [`View`] for [`CACHE_TTL_MS`]; a push
//! committed (or a revoke-all cut-off accepted) through any isolate is served here within
//! that bound, and the isolate that handled it serves it at once. Pages never change, so a
//! record read from one is cached by (page digest, hash) with no expiry, found or not, in a
//! least-recently-used cache of [`MAX_CACHED_RECORDS`]: a new version names new pages and
//! is read afresh. A page the view names that KV does not have (yet: KV propagates between
//! locations in up to 60 s) or whose content does not match its digest fails the request
//! closed (503).
//!
//! While a push is pending, the view also counts the served records its stored pages change
//! or drop ([`changes`]); an isolate fetches that list when the count moves, and a token on
//! it passes only if both its served and its incoming record allow it.

use std::cell::{Cell, RefCell};
use std::fmt;
use std::num::NonZeroUsize;
use std::pin::pin;
use std::rc::Rc;
use std::time::Duration;

use futures_util::future::{select, Either};
use lru::LruCache;
use tokengate_core::access::Settings;
use tokengate_core::issuer::SECRETS_VARIABLE;
use tokengate_core::pages;
use tokengate_core::token::TokenHash;
use tokengate_core::{Bundle, Gate, Record};
use worker::{console_error, Delay, Env, KvStore};

use crate::state::{self, Call, ChangeList, Meta, Stored, View};
use crate::KV_BINDING;

/// The KV key prefix of pages; the rest is the lower-case hex SHA-256 of the page.
pub const PAGE_PREFIX: &str = "page:";
/// How long an isolate trusts the push state's view: the staleness bound.
pub const CACHE_TTL_MS: f64 = 5_000.0;
/// A KV read or push-state call that takes longer fails the request closed (503).
pub const KV_TIMEOUT_MS: u64 = 3_000;
/// Token records (found or not) one isolate keeps; the least recently used go first.
pub const MAX_CACHED_RECORDS: usize = 10_000;

/// A validated meta, ready to decide requests.
pub struct Served {
    /// Policy, credential sources, version, environment, revoke-all; no token records.
    pub gate: Gate,
    /// The bundle's Cloudflare Access settings, if any.
    pub access: Option<Settings>,
    /// How many token records the bundle holds.
    pub tokens: usize,
    /// Each page's SHA-256.
    pages: Vec<[u8; 32]>,
    /// log2 of the page count.
    bits: u32,
    /// Whether a record may be an imported secret.
    pub imported_secrets: bool,
    /// SHA-256 of the pushed text it was built from.
    pub sha256: String,
}

impl Served {
    /// Validates a meta the way a push validated its bundle; `revoke_all_at` is the
    /// cut-off in force (the served one, or a later one a pending push brings first).
    pub fn from_meta(
        meta: &Meta,
        revoke_all_at: Option<u64>,
        sha256: String,
    ) -> Result<Self, String> {
        let bits = pages::PagedTokens {
            pages: meta.pages.clone(),
            tokens: meta.tokens,
            imported_secrets: meta.imported_secrets,
        }
        .check()
        .map_err(|e| e.to_string())?;
        let digests = meta
            .pages
            .iter()
            .map(|d| tokengate_core::hex::decode::<32>(d).ok_or_else(|| format!("page {d}")))
            .collect::<Result<Vec<_>, _>>()?;
        let access = meta
            .bundle
            .cloudflare_access
            .as_ref()
            .map(Settings::from_config)
            .transpose()
            .map_err(|e| e.to_string())?;
        let bundle = Bundle {
            tokens: Vec::new(),
            revoke_all_at: meta.bundle.revoke_all_at.max(revoke_all_at),
            ..meta.bundle.clone()
        };
        let gate = Gate::from_bundle(bundle).map_err(|e| e.to_string())?;
        Ok(Self {
            gate,
            access,
            tokens: meta.tokens,
            pages: digests,
            bits,
            imported_secrets: meta.imported_secrets,
            sha256,
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
    /// A page the served bundle names is not in KV (yet).
    MissingPage(String),
    /// The push state (Durable Object) failed.
    State(String),
}

impl fmt::Display for Failure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Config(e) => write!(f, "configuration: {e}"),
            Self::Kv(e) => write!(f, "KV error: {e}"),
            Self::Timeout => write!(f, "KV read timed out after {KV_TIMEOUT_MS} ms"),
            Self::Corrupt(e) => write!(f, "corrupt KV value: {e}"),
            Self::Keys(e) => write!(f, "Access keys: {e}"),
            Self::MissingPage(d) => write!(f, "page {d} is not in KV (yet)"),
            Self::State(e) => write!(f, "push state: {e}"),
        }
    }
}

struct Cached<T> {
    value: T,
    at: f64,
}

/// The served bundle as built, and the cut-off it was built with.
struct Built {
    revoke_all_at: Option<u64>,
    served: Rc<Served>,
}

/// Served records a pending push changes: per hash, each record pushes since the last commit
/// brought for it (`None`: dropped it).
pub type Changes = std::collections::HashMap<[u8; 32], Vec<Option<Record>>>;

/// The changes of one pending push, keyed by (served push, pending version, change sequence).
type CachedChanges = ((String, u64, u64), Rc<Changes>);

/// Records by (page digest, token hash); `None`: the page holds no such token.
type RecordCache = LruCache<([u8; 32], [u8; 32]), Option<Record>>;

thread_local! {
    static VIEW: RefCell<Option<Cached<Rc<View>>>> = const { RefCell::new(None) };
    static BUILT: RefCell<Option<Built>> = const { RefCell::new(None) };
    static RECORDS: RefCell<RecordCache> =
        RefCell::new(LruCache::new(NonZeroUsize::new(MAX_CACHED_RECORDS).unwrap_or(NonZeroUsize::MIN)));
    static KV_READS: Cell<u64> = const { Cell::new(0) };
    static CHANGES: RefCell<Option<CachedChanges>> = const { RefCell::new(None) };
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

/// `future`, or [`Failure::Timeout`] after [`KV_TIMEOUT_MS`].
pub async fn bounded<T>(
    future: impl std::future::Future<Output = Result<T, Failure>>,
) -> Result<T, Failure> {
    let future = pin!(future);
    let timeout = pin!(Delay::from(Duration::from_millis(KV_TIMEOUT_MS)));
    match select(future, timeout).await {
        Either::Left((result, _)) => result,
        Either::Right(_) => Err(Failure::Timeout),
    }
}

/// One counted KV read, bounded by [`KV_TIMEOUT_MS`].
pub async fn kv_get(kv: &KvStore, key: &str) -> Result<Option<String>, Failure> {
    KV_READS.with(|n| n.set(n.get() + 1));
    bounded(async {
        kv.get(key)
            .text()
            .await
            .map_err(|e| Failure::Kv(e.to_string()))
    })
    .await
}

/// The push state's view, from the cache when it is younger than [`CACHE_TTL_MS`].
pub async fn view(env: &Env) -> Result<Rc<View>, Failure> {
    let now = now_ms();
    let hit = VIEW.with(|v| {
        v.borrow()
            .as_ref()
            .filter(|c| now - c.at < CACHE_TTL_MS)
            .map(|c| c.value.clone())
    });
    if let Some(view) = hit {
        return Ok(view);
    }
    let view: View = state::call(env, &Call::View)
        .await?
        .map_err(|r| Failure::State(r.description))?;
    let view = Rc::new(view);
    remember_view(view.clone(), now);
    Ok(view)
}

fn remember_view(view: Rc<View>, at: f64) {
    VIEW.with(|v| *v.borrow_mut() = Some(Cached { value: view, at }));
}

/// After a push request: this isolate serves what the push state says now.
pub fn forget_view() {
    VIEW.with(|v| *v.borrow_mut() = None);
}

/// The bundle served now (`None`: nothing pushed yet), with a pending push's revoke-all
/// cut-off already in force.
pub async fn current(env: &Env) -> Result<Option<Rc<Served>>, Failure> {
    let view = view(env).await?;
    current_from(env, &view).await
}

/// What a gated request decides with, read consistently: the served bundle and the pending
/// push's changes to it. If the push state moved between the two reads (a commit), the view
/// is read again; twice in a row fails closed.
pub async fn snapshot(env: &Env) -> Result<Option<(Rc<Served>, Rc<Changes>)>, Failure> {
    for _ in 0..2 {
        let view = view(env).await?;
        let Some(served) = current_from(env, &view).await? else {
            return Ok(None);
        };
        match changes(env, &view, &served).await? {
            Some(changes) => return Ok(Some((served, changes))),
            None => forget_view(),
        }
    }
    Err(Failure::State(
        "the push state moved twice while it was read".to_owned(),
    ))
}

async fn current_from(env: &Env, view: &View) -> Result<Option<Rc<Served>>, Failure> {
    let Some(summary) = &view.served else {
        return Ok(None);
    };
    let revoke_all_at = view.cut_off;
    let built = BUILT.with(|b| {
        b.borrow()
            .as_ref()
            .filter(|b| b.served.sha256 == summary.sha256 && b.revoke_all_at == revoke_all_at)
            .map(|b| b.served.clone())
    });
    if let Some(served) = built {
        return Ok(Some(served));
    }
    // The served push now: a commit may have landed since the view was read.
    let stored: Stored = state::call(env, &Call::Meta)
        .await?
        .map_err(|r| Failure::State(r.description))?;
    if stored.sha256 != summary.sha256 {
        forget_view();
    }
    let mut served = Served::from_meta(&stored.meta, revoke_all_at, stored.sha256)
        .map_err(|e| Failure::Corrupt(format!("served meta: {e}")))?;
    // The HS256 issuers' secrets: a Worker secret, never in a bundle or in KV.
    let value = env.secret(SECRETS_VARIABLE).ok().map(|s| s.to_string());
    served.gate.set_issuer_secrets(value.as_deref());
    for warning in served.gate.issuer_secret_warnings() {
        console_error!("tokengate: {warning}");
    }
    let served = Rc::new(served);
    BUILT.with(|b| {
        *b.borrow_mut() = Some(Built {
            revoke_all_at,
            served: served.clone(),
        })
    });
    Ok(Some(served))
}

impl Served {
    /// log2 of the page count.
    pub fn page_bits(&self) -> u32 {
        self.bits
    }

    /// The SHA-256 of page `index`.
    pub fn page_digest(&self, index: usize) -> Option<[u8; 32]> {
        self.pages.get(index).copied()
    }
}

/// The text of a stored page, checked against its digest.
pub async fn read_page(kv: &KvStore, digest: &[u8; 32]) -> Result<String, Failure> {
    let name = tokengate_core::hex::encode(digest);
    let Some(text) = kv_get(kv, &format!("{PAGE_PREFIX}{name}")).await? else {
        return Err(Failure::MissingPage(name));
    };
    if pages::digest(text.as_bytes()) != name {
        return Err(Failure::Corrupt(format!(
            "{PAGE_PREFIX}{name}: content does not match its digest"
        )));
    }
    Ok(text)
}

/// The served records the pending push changes, by hash (empty when nothing is pending),
/// for the served bundle `served`. Cached by (served push, pending version, change sequence);
/// `None` when the push state no longer matches `view` (read it again).
async fn changes(env: &Env, view: &View, served: &Served) -> Result<Option<Rc<Changes>>, Failure> {
    let Some(pending) = &view.pending else {
        return Ok(Some(Rc::default()));
    };
    let key = (served.sha256.clone(), pending.version, pending.change_seq);
    let hit = CHANGES.with(|c| {
        c.borrow()
            .as_ref()
            .filter(|(k, _)| *k == key)
            .map(|(_, v)| v.clone())
    });
    if let Some(changes) = hit {
        return Ok(Some(changes));
    }
    let call = Call::Changes {
        served_sha256: Some(served.sha256.clone()),
        pending_version: Some(pending.version),
    };
    let list: ChangeList = match state::call(env, &call).await? {
        Ok(list) => list,
        Err(refused) if refused.error == "stale_view" => return Ok(None),
        Err(refused) => return Err(Failure::State(refused.description)),
    };
    let mut changes = Changes::with_capacity(list.changes.len());
    for change in list.changes {
        let hash = TokenHash::from_hex(&change.hash)
            .ok_or_else(|| Failure::Corrupt(format!("change {}", change.hash)))?;
        let record = change
            .record
            .as_ref()
            .map(Record::from_token_record)
            .transpose()
            .map_err(|e| Failure::Corrupt(format!("change {}: {e}", change.hash)))?;
        changes.entry(hash.0).or_default().push(record);
    }
    let changes = Rc::new(changes);
    CHANGES.with(|c| *c.borrow_mut() = Some((key, changes.clone())));
    Ok(Some(changes))
}

/// The record of one token hash in the served pages (`None`: no such token).
pub async fn record(
    env: &Env,
    served: &Served,
    hash: &TokenHash,
) -> Result<Option<Record>, Failure> {
    let digest = served.pages[pages::page_index(&hash.0, served.bits)];
    let key = (digest, hash.0);
    if let Some(hit) = RECORDS.with(|r| r.borrow_mut().get(&key).cloned()) {
        return Ok(hit);
    }
    let name = tokengate_core::hex::encode(&digest);
    let text = read_page(&kv(env)?, &digest).await?;
    let record = pages::find(text.as_bytes(), hash)
        .map_err(|e| Failure::Corrupt(format!("{PAGE_PREFIX}{name}: {e}")))?;
    RECORDS.with(|r| r.borrow_mut().put(key, record.clone()));
    Ok(record)
}
