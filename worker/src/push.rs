//! Signed pushes: `POST /.well-known/tokengate/bundle`.
//!
//! Every request carries `Tokengate-Signature: t=<unix seconds>,<key id>=<hex Ed25519>[,…]`,
//! each signature over `tokengate.push/v2\n<t>\n<body>` by one of the admin's keys. The
//! Worker holds public keys only: `TOKENGATE_TRUSTED_KEYS` until its first push lands, then
//! the `keys` of the bundle it serves. Everything is checked before anything is written, so
//! a refused request changes nothing: the header's form and a `Content-Length` within the
//! cap (before the body is read), the request signatures and their 5-minute window, then
//! the body.
//!
//! Two kinds of request:
//! - **a bundle** (no query): a published `tokengate.bundle/v2` whose `tokens` are either the
//!   records (inline, up to 8 MiB: the Worker pages them, stores the missing pages and
//!   commits in this request) or a [`PagedTokens`] page list (any size up to 1,000,000
//!   tokens: the push becomes pending and the answer names the pages still missing). Its
//!   bundle signatures, target, environment and records are checked as on every gate; the
//!   version against the push state ([`crate::state`], strongly consistent), so a replay or
//!   a rollback is refused wherever it is sent.
//! - **a page** (`?version=<v>&page=<i>`): the text of page `i` of the pending push `v`; its
//!   SHA-256 must be the one the signed page list gives, and its records must belong there.
//!   The last missing page commits the push.
//!
//! Pages are stored in KV by digest and never rewritten: a page unchanged since an earlier
//! push is neither sent nor written again. A pending push's revoke-all cut-off is in force
//! from the moment the push is accepted, before any of its pages is stored; the rest of the
//! push takes effect all at once, at its commit.

use serde_json::value::RawValue;
use tokengate_core::access::Settings;
use tokengate_core::bundle::{BundleError, Envelope};
use tokengate_core::pages::{self, PagedTokens};
use tokengate_core::signed::{self, SignedError, PUSH_CONTEXT, SIGNATURE_HEADER};
use tokengate_core::{Bundle, Expectation, Gate, KeySet, Target, TokenRecord};
use worker::{console_error, console_log, Env, KvStore, Request, Response, Result};

use crate::served::{self, Failure, PAGE_PREFIX};
use crate::state::{self, Call, Claim, Meta, Progress, Refused, Stored, View};
use crate::{json_error, json_response, ENVIRONMENT_VAR, TRUSTED_KEYS_VAR};

/// A push body larger than this is refused (413) before it is parsed.
pub const MAX_PUSH_BYTES: usize = 8 * 1024 * 1024;
/// KV writes in flight at once while storing an inline bundle's pages.
const CONCURRENCY: usize = 32;
/// Garbage pages deleted per bundle request: Workers KV allows 1000 operations per
/// invocation, and an inline bundle of 8 MiB (~74,000 minimal records) has at most 512 pages.
const GARBAGE_PER_REQUEST: usize = 400;
/// Served pages a page request reads to find what it changes (a page of a set that shrank
/// covers several served pages); past this, its changes wait for the commit.
const MAX_OVERLAPPING_PAGES: usize = 8;

/// A refused push: status, `error` code and a description for the operator.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    /// 401, 409, 400, 413, 500 or 503.
    pub status: u16,
    /// Stable error code.
    pub error: String,
    /// What was wrong, for the person pushing.
    pub description: String,
}

fn refuse(status: u16, error: &'static str, description: impl Into<String>) -> Refusal {
    Refusal {
        status,
        error: error.to_owned(),
        description: description.into(),
    }
}

/// A push whose request signature fails.
fn signed_refusal(error: &SignedError) -> Refusal {
    Refusal {
        status: 401,
        error: error.code().to_owned(),
        description: error.describe(PUSH_CONTEXT),
    }
}

/// The status and code of a bundle the Worker will not serve.
fn bundle_refusal(error: &BundleError) -> Refusal {
    let description = error.to_string();
    match error {
        BundleError::TooLarge(_) => refuse(413, "too_large", description),
        e if e.is_signature() => refuse(401, "invalid_signature", description),
        BundleError::WrongTarget { .. } => refuse(409, "wrong_target", description),
        BundleError::WrongEnvironment { .. } => refuse(409, "wrong_environment", description),
        BundleError::NotNewer { .. } => refuse(409, "not_newer", description),
        _ => refuse(400, "invalid_bundle", description),
    }
}

impl From<Refused> for Refusal {
    fn from(refused: Refused) -> Self {
        Self {
            status: refused.status,
            error: refused.error,
            description: refused.description,
        }
    }
}

fn unavailable(failure: &Failure) -> Refusal {
    console_error!("tokengate push: {failure}");
    refuse(
        503,
        "temporarily_unavailable",
        format!("the push could not be applied now ({failure}); retry"),
    )
}

/// Handles one push request.
pub async fn handle_push(req: Request, env: &Env) -> Result<Response> {
    match push(req, env).await? {
        Ok(response) => Ok(response),
        Err(refusal) => {
            console_log!(
                "tokengate push refused: {} {}: {}",
                refusal.status,
                refusal.error,
                refusal.description
            );
            let retry = if refusal.status == 503 {
                vec![("retry-after", "1".to_owned())]
            } else {
                Vec::new()
            };
            json_error(refusal.status, &refusal.error, &refusal.description, &retry)
        }
    }
}

/// The keys this Worker trusts: those of the bundle it serves, else its configured ones.
pub fn trusted_keys(env: &Env, view: &View) -> std::result::Result<KeySet, String> {
    if view.served.is_some() {
        return KeySet::from_hex(&view.keys).map_err(|e| format!("served bundle: {e}"));
    }
    let text = env
        .var(TRUSTED_KEYS_VAR)
        .map_err(|_| format!("the variable {TRUSTED_KEYS_VAR} is not set"))?
        .to_string();
    KeySet::parse(&text).map_err(|e| format!("{TRUSTED_KEYS_VAR}: {e}"))
}

/// A page request's target: `?version=<v>&page=<i>`, nothing else.
fn page_target(query: &str) -> Option<(u64, usize)> {
    let mut version = None;
    let mut page = None;
    for pair in query.split('&') {
        let (name, value) = pair.split_once('=')?;
        let digits =
            !value.is_empty() && value.len() <= 19 && value.bytes().all(|b| b.is_ascii_digit());
        let slot = match name {
            "version" => &mut version,
            "page" => &mut page,
            _ => return None,
        };
        if slot.is_some() || !digits {
            return None;
        }
        *slot = Some(value.parse::<u64>().ok()?);
    }
    Some((version?, usize::try_from(page?).ok()?))
}

type Outcome = std::result::Result<Response, Refusal>;

async fn push(mut req: Request, env: &Env) -> Result<Outcome> {
    let Some(environment) = env.var(ENVIRONMENT_VAR).ok().map(|v| v.to_string()) else {
        return Ok(Err(refuse(
            500,
            "server_error",
            format!("the variable {ENVIRONMENT_VAR} is not set"),
        )));
    };
    let url = req.inner().url();
    let query = url
        .split_once('?')
        .map(|(_, q)| q.split('#').next().unwrap_or_default());
    let page = match query {
        None => None,
        Some(q) => match page_target(q) {
            Some(target) => Some(target),
            None => {
                return Ok(Err(refuse(
                    400,
                    "invalid_request",
                    "a page request is POST /.well-known/tokengate/bundle?version=<v>&page=<i>; a bundle takes no query",
                )))
            }
        },
    };
    // The header's form, then the declared length: both before a byte of the body is read.
    let header = req.headers().get(SIGNATURE_HEADER)?;
    let Some(signed) = header.as_deref().and_then(signed::parse_signature_header) else {
        return Ok(Err(signed_refusal(&SignedError::Malformed)));
    };
    let too_large = || {
        refuse(
            413,
            "too_large",
            format!(
                "a push request body may hold at most {MAX_PUSH_BYTES} bytes; page a larger bundle"
            ),
        )
    };
    let declared = req.headers().get("content-length")?;
    let Some(declared) = declared.and_then(|v| v.trim().parse::<u64>().ok()) else {
        return Ok(Err(refuse(
            411,
            "length_required",
            "a push must declare its Content-Length",
        )));
    };
    if declared > MAX_PUSH_BYTES as u64 {
        return Ok(Err(too_large()));
    }
    let body = req.bytes().await?;
    if body.len() > MAX_PUSH_BYTES {
        return Ok(Err(too_large()));
    }
    // The cached view: an unsigned request must not reach the push state. The push state
    // refuses the request later if another bundle (with other keys) is served by then.
    let view = match served::view(env).await {
        Ok(view) => view,
        Err(failure) => return Ok(Err(unavailable(&failure))),
    };
    let trusted = match trusted_keys(env, &view) {
        Ok(keys) => keys,
        Err(e) => return Ok(Err(refuse(500, "server_error", e))),
    };
    if let Err(e) = signed::verify(&trusted, PUSH_CONTEXT, &signed, &body, served::now_secs()) {
        return Ok(Err(signed_refusal(&e)));
    }
    let kv = match served::kv(env) {
        Ok(kv) => kv,
        Err(failure) => return Ok(Err(unavailable(&failure))),
    };
    let verified_with = view.served.as_ref().map(|s| s.sha256.clone());
    let outcome = match page {
        Some((version, index)) => store_page(env, &kv, version, index, &body, verified_with).await,
        None => {
            push_bundle(
                env,
                &kv,
                &view,
                &trusted,
                &environment,
                &body,
                verified_with,
            )
            .await
        }
    };
    // A signed request reached the push state: this isolate serves what it says from now on.
    served::forget_view();
    Ok(outcome)
}

/// A bundle request: checked as every gate checks a bundle, then begun in the push state.
async fn push_bundle(
    env: &Env,
    kv: &KvStore,
    view: &View,
    trusted: &KeySet,
    environment: &str,
    body: &[u8],
    verified_with: Option<String>,
) -> Outcome {
    let envelope = Envelope::open(body, trusted).map_err(|e| bundle_refusal(&e))?;
    let (raw, _) = envelope
        .payload::<&RawValue>()
        .map_err(|e| bundle_refusal(&e))?;
    let expect = Expectation {
        target: Target::Worker,
        environment: Some(environment),
        newer_than: view.served.as_ref().map(|s| s.version),
    };
    expect.check(&raw).map_err(|e| bundle_refusal(&e))?;
    // The payload was read once above; only its `tokens` remain to be read, in either form.
    let tokens = raw.tokens.get();
    let unreadable = |e: serde_json::Error| refuse(400, "invalid_bundle", format!("tokens: {e}"));
    let (meta, inline_pages) = if tokens.trim_start().starts_with('{') {
        let paged: PagedTokens = serde_json::from_str(tokens).map_err(unreadable)?;
        paged
            .check()
            .map_err(|e| refuse(400, "invalid_bundle", e.to_string()))?;
        let meta = Meta {
            bundle: bundle_without_tokens(&raw),
            pages: paged.pages,
            tokens: paged.tokens,
            imported_secrets: paged.imported_secrets,
        };
        validate(env, &meta.bundle)?;
        (meta, Vec::new())
    } else {
        let bundle = Bundle {
            tokens: serde_json::from_str::<Vec<TokenRecord>>(tokens).map_err(unreadable)?,
            ..bundle_without_tokens(&raw)
        };
        validate(env, &bundle)?;
        let split = pages::split(&bundle.tokens)
            .map_err(|e| refuse(400, "invalid_bundle", e.to_string()))?;
        let meta = Meta {
            pages: split.iter().map(|p| p.sha256.clone()).collect(),
            tokens: bundle.tokens.len(),
            // An inline bundle does not say whether it holds imported secrets.
            imported_secrets: true,
            bundle: Bundle {
                tokens: Vec::new(),
                ..bundle
            },
        };
        (meta, split)
    };
    let push = Stored {
        sha256: pages::digest(body),
        meta,
    };
    let progress: Progress = state::call(
        env,
        &Call::Begin {
            push: Box::new(push),
            now_ms: served::now_ms(),
            verified_with,
        },
    )
    .await
    .map_err(|f| unavailable(&f))?
    .map_err(Refusal::from)?;
    // Only an accepted push tidies up: a refused one changes nothing.
    collect_garbage(env, kv).await;
    if progress.committed || inline_pages.is_empty() {
        return answer(&progress, 0, true);
    }
    // Inline: store what is missing now, then commit.
    let mut written = 0;
    for chunk in progress.missing.chunks(CONCURRENCY) {
        let writes = chunk.iter().map(|&index| {
            let page = &inline_pages[index];
            write_page(kv, &page.sha256, &page.text)
        });
        for result in futures_util::future::join_all(writes).await {
            result.map_err(|f| unavailable(&f))?;
            written += 1;
        }
    }
    let done: Progress = state::call(
        env,
        &Call::Received {
            version: progress.version,
            indices: progress.missing.clone(),
            // Committed in this request: nothing takes effect early.
            changes: Vec::new(),
            now_ms: served::now_ms(),
        },
    )
    .await
    .map_err(|f| unavailable(&f))?
    .map_err(Refusal::from)?;
    answer(&done, written, true)
}

/// The bundle's members but its tokens.
fn bundle_without_tokens(raw: &Bundle<&RawValue>) -> Bundle {
    Bundle {
        version: raw.version,
        issued_at: raw.issued_at,
        environment: raw.environment.clone(),
        target: raw.target,
        keys: raw.keys.clone(),
        policy: raw.policy.clone(),
        credentials: raw.credentials.clone(),
        tokens: Vec::new(),
        revoke_all_at: raw.revoke_all_at,
        cloudflare_access: raw.cloudflare_access.clone(),
        issuers: raw.issuers.clone(),
        revoked_jtis: raw.revoked_jtis.clone(),
    }
}

/// Everything a gate checks in a bundle, but the version (the push state's); and that this
/// Worker has a Rate Limiting binding for each limit of the policy (409 otherwise: the bundle
/// is fine, the Worker's configuration lacks what it needs). Tokens' own limits are not
/// checked here, so that no limit ever holds back a push (a revocation with it): a request
/// whose limit has no binding is answered 503.
fn validate(env: &Env, bundle: &Bundle) -> std::result::Result<(), Refusal> {
    if let Some(access) = &bundle.cloudflare_access {
        Settings::from_config(access).map_err(|e| refuse(400, "invalid_bundle", e.to_string()))?;
    }
    Gate::from_bundle(bundle.clone()).map_err(|e| bundle_refusal(&e))?;
    if let Some(problem) = crate::limits::missing_binding(env, &bundle.policy) {
        return Err(refuse(409, "rate_limit_unavailable", problem));
    }
    Ok(())
}

/// A page request: the page must be the one the pending push's signed list names.
async fn store_page(
    env: &Env,
    kv: &KvStore,
    version: u64,
    index: usize,
    body: &[u8],
    verified_with: Option<String>,
) -> Outcome {
    let call = Call::Claim {
        version,
        index,
        verified_with,
        now_ms: served::now_ms(),
    };
    let claim: Claim = state::call(env, &call)
        .await
        .map_err(|f| unavailable(&f))?
        .map_err(Refusal::from)?;
    let sha256 = pages::digest(body);
    if sha256 != claim.sha256 {
        return Err(refuse(
            400,
            "page_mismatch",
            format!(
                "page {index} of version {version} has SHA-256 {}; this body's is {sha256}",
                claim.sha256
            ),
        ));
    }
    let incoming = pages::check_page(body, index, claim.bits)
        .map_err(|e| refuse(400, "invalid_page", e.to_string()))?;
    let mut written = 0;
    let mut changes = Vec::new();
    if !claim.stored {
        changes = served_changes(env, kv, &incoming, index, claim.bits)
            .await
            .map_err(|f| unavailable(&f))?;
        // The digest matched, and the signed list only names UTF-8 JSON pages.
        let text = std::str::from_utf8(body)
            .map_err(|_| refuse(400, "invalid_page", "a page is UTF-8 text"))?;
        write_page(kv, &sha256, text)
            .await
            .map_err(|f| unavailable(&f))?;
        written = 1;
    }
    let progress: Progress = state::call(
        env,
        &Call::Received {
            version,
            indices: vec![index],
            changes,
            now_ms: served::now_ms(),
        },
    )
    .await
    .map_err(|f| unavailable(&f))?
    .map_err(Refusal::from)?;
    answer(&progress, written, false)
}

/// The served records this page changes or drops: they take effect before the commit.
async fn served_changes(
    env: &Env,
    kv: &KvStore,
    incoming: &[TokenRecord],
    index: usize,
    bits: u32,
) -> std::result::Result<Vec<pages::Change>, Failure> {
    let Some(served) = served::current(env).await? else {
        return Ok(Vec::new());
    };
    let served_bits = served.page_bits();
    let overlapping = pages::overlapping(index, bits, served_bits);
    if overlapping.clone().count() > MAX_OVERLAPPING_PAGES {
        // The set shrank a lot (fewer, larger pages): reading every served page this one
        // covers would not fit in one request. Its changes take effect at the commit.
        return Ok(Vec::new());
    }
    let mut records = Vec::new();
    for old in overlapping {
        let digest = served
            .page_digest(old)
            .ok_or_else(|| Failure::Corrupt(format!("served page {old}")))?;
        let text = served::read_page(kv, &digest).await?;
        let page = pages::check_page(text.as_bytes(), old, served_bits)
            .map_err(|e| Failure::Corrupt(format!("served page {old}: {e}")))?;
        records.extend(page);
    }
    Ok(pages::changes(&records, incoming, index, bits))
}

/// 200 once committed, else 202 with the pages still missing.
/// A bundle request's 202 names every missing page; a page request's only counts them.
fn answer(progress: &Progress, written: usize, name_missing: bool) -> Outcome {
    let version = progress.version;
    let result = if progress.committed || progress.missing.is_empty() {
        console_log!(
            "tokengate push: serving version {version} ({} tokens, {} pages)",
            progress.tokens,
            progress.pages
        );
        let body = serde_json::json!({"version": version, "tokens": progress.tokens, "pages": progress.pages, "written": written});
        json_response(200, body, &[])
    } else {
        let mut body = serde_json::json!({"version": version, "pages": progress.pages, "remaining": progress.missing.len(), "written": written});
        if name_missing {
            body["missing"] = serde_json::json!(progress.missing);
        }
        json_response(202, body, &[("retry-after", "0".to_owned())])
    };
    result.map_err(|e| refuse(500, "server_error", e.to_string()))
}

async fn write_page(kv: &KvStore, sha256: &str, text: &str) -> std::result::Result<(), Failure> {
    // put_bytes: `put` would route a String through serde-wasm-bindgen to reach the same JS
    // string; KV stores the UTF-8 bytes either way.
    kv.put_bytes(&format!("{PAGE_PREFIX}{sha256}"), text.as_bytes())
        .map_err(|e| Failure::Kv(e.to_string()))?
        .execute()
        .await
        .map_err(|e| Failure::Kv(e.to_string()))
}

/// Deletes pages no push has used for a while; a failure leaves them (they are inert).
async fn collect_garbage(env: &Env, kv: &KvStore) {
    let call = Call::Garbage {
        max: GARBAGE_PER_REQUEST,
        now_ms: served::now_ms(),
    };
    let Ok(Ok(digests)) = state::call::<Vec<String>>(env, &call).await else {
        return;
    };
    let mut gone = Vec::new();
    for chunk in digests.chunks(CONCURRENCY) {
        let deletes = chunk
            .iter()
            .map(|d| async move { kv.delete(&format!("{PAGE_PREFIX}{d}")).await });
        for (digest, result) in chunk
            .iter()
            .zip(futures_util::future::join_all(deletes).await)
        {
            match result {
                Ok(()) => gone.push(digest.clone()),
                Err(e) => console_error!("tokengate push: deleting an unused page: {e}"),
            }
        }
    }
    // A push that needs one of these pages again may store it from now on.
    if !gone.is_empty() {
        let _ = state::call::<serde_json::Value>(env, &Call::Deleted { digests: gone }).await;
    }
}
