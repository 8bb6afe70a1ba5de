//! Signed pushes: `POST /.well-known/tokengate/bundle`.
//!
//! The body is a signed `tokengate.bundle/v1` document; the request carries
//! `Tokengate-Signature: t=<unix seconds>,v1=<hex HMAC-SHA256 of "<t>.<body>">` made with
//! `TOKENGATE_PUSH_KEY`, which also verifies the bundle's own signature. Everything is checked
//! before the first KV write, so a refused push changes nothing: the request signature
//! (constant time) and its 5-minute window, the bundle signature, target, environment and
//! version (newer than the one served: no rollback, no replay), then the whole bundle.
//!
//! Then only what changed is written: deletes of removed tokens, changed records, new
//! records, and the meta last. Workers KV allows 1000 operations per invocation, so a
//! larger change set is applied over several requests: each applies up to a batch, answers
//! 202 `{"applied", "remaining"}`, and the client POSTs the same bundle again (freshly signed)
//! until it gets 200. The served version switches only with the final meta write.
//!
//! Bookkeeping, so that every KV token key that may exist is known without listing KV:
//! `push:index` maps each hash written to the digest of its record; `push:intent` names the
//! hashes of a batch before it is applied. A request that dies mid-batch leaves an
//! unconfirmed intent, and the next push treats those records as unknown and writes them
//! again. Each key is written at most once per request (KV allows one write per key per
//! second; 202 answers say `Retry-After: 1`).

use std::collections::BTreeMap;

use futures_util::future::join_all;
use serde::Serialize;
use sha2::{Digest, Sha256};
use tokengate_core::access::Settings;
use tokengate_core::bundle::{check_expectation, parse_verified, BundleError};
use tokengate_core::json::{self, required, Fields, Reader};
use tokengate_core::{Bundle, Expectation, Gate, SigningKey, Target, TokenRecord};
use worker::{console_error, console_log, Env, KvStore, Request, Response, Result};

use crate::served::{self, Failure, Meta, Served, META_KEY, TOKEN_PREFIX};
use crate::{
    json_error, json_object, json_response, Json, ENVIRONMENT_VAR, PUSH_BATCH_VAR, PUSH_KEY_SECRET,
};

/// The request header carrying `t=<unix seconds>,v1=<hex HMAC-SHA256 of "<t>.<body>">`.
pub const SIGNATURE_HEADER: &str = "tokengate-signature";
/// A push body larger than this is refused (413) before it is parsed.
pub const MAX_PUSH_BYTES: usize = 8 * 1024 * 1024;
/// How far `t` may be from the Worker's clock, either way.
pub const WINDOW_SECONDS: u64 = 300;
/// Workers KV operations one invocation may make.
pub const KV_OPERATIONS_LIMIT: usize = 1000;
/// Operations a push request makes besides token changes: read meta, index and intent;
/// write intent, index and meta.
const FIXED_OPERATIONS: usize = 6;
/// The most token changes one request may apply.
pub const MAX_BATCH: usize = KV_OPERATIONS_LIMIT - FIXED_OPERATIONS;
/// Token changes per request unless `TOKENGATE_PUSH_BATCH` says fewer; below
/// [`MAX_BATCH`] to leave room under the limit.
pub const DEFAULT_BATCH: usize = 900;
const INDEX_KEY: &str = "push:index";
const INTENT_KEY: &str = "push:intent";
/// KV writes in flight at once while applying a batch.
const CONCURRENCY: usize = 32;
/// The digest of a record whose KV content is not known (an unconfirmed intent).
const UNKNOWN: &str = "?";

/// Every token key pushes have written, with the digest of the record written.
#[derive(Debug, Default, Serialize)]
struct Index {
    tokens: BTreeMap<String, String>,
    /// The push that is partly applied, if any.
    pending: Option<PendingPush>,
    /// The id of the last intent whose batch is recorded in `tokens`.
    confirmed_intent: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
struct PendingPush {
    version: u64,
    signature: String,
}

/// The hashes a batch is about to touch, written before it is applied.
#[derive(Debug, Default, Serialize)]
struct Intent {
    id: String,
    hashes: Vec<String>,
}

impl Index {
    fn read(r: &mut Reader<'_>) -> json::Result<Self> {
        let mut fields = Fields::new(&["tokens", "pending", "confirmed_intent"]);
        let mut index = Self::default();
        r.object(|r, key| {
            match fields.index(r, key)? {
                0 => r.object(|r, hash| {
                    index.tokens.insert(hash.to_owned(), r.string()?);
                    Ok(())
                })?,
                1 => index.pending = r.nullable(PendingPush::read)?,
                _ => index.confirmed_intent = r.nullable(Reader::string)?,
            }
            Ok(())
        })?;
        fields.require(r, 0)?;
        Ok(index)
    }
}

impl PendingPush {
    fn read(r: &mut Reader<'_>) -> json::Result<Self> {
        let mut fields = Fields::new(&["version", "signature"]);
        let (mut version, mut signature) = (None, None);
        r.object(|r, key| {
            match fields.index(r, key)? {
                0 => version = Some(r.u64()?),
                _ => signature = Some(r.string()?),
            }
            Ok(())
        })?;
        Ok(Self {
            version: required(r, version, "version")?,
            signature: required(r, signature, "signature")?,
        })
    }
}

impl Intent {
    fn read(r: &mut Reader<'_>) -> json::Result<Self> {
        let mut fields = Fields::new(&["id", "hashes"]);
        let (mut id, mut hashes) = (None, None);
        r.object(|r, key| {
            match fields.index(r, key)? {
                0 => id = Some(r.string()?),
                _ => hashes = Some(r.strings()?),
            }
            Ok(())
        })?;
        Ok(Self {
            id: required(r, id, "id")?,
            hashes: required(r, hashes, "hashes")?,
        })
    }
}

/// One KV change.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Op {
    /// The token left the bundle.
    Delete {
        /// Its hash.
        hash: String,
    },
    /// A new or changed record.
    Put {
        /// Its hash.
        hash: String,
        /// The record's JSON.
        value: String,
        /// [`digest`] of `value`.
        digest: String,
    },
}

impl Op {
    fn hash(&self) -> &str {
        match self {
            Self::Delete { hash } | Self::Put { hash, .. } => hash,
        }
    }
}

/// A refused push: status, `error` code and a description for the operator.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    /// 401, 409, 400, 413, 500 or 503.
    pub status: u16,
    /// Stable error code.
    pub error: &'static str,
    /// What was wrong, for the person pushing.
    pub description: String,
}

fn refuse(status: u16, error: &'static str, description: impl Into<String>) -> Refusal {
    Refusal {
        status,
        error,
        description: description.into(),
    }
}

/// The first 16 hex characters of the SHA-256 of a record's JSON: enough to tell versions
/// of one record apart.
pub fn digest(value: &str) -> String {
    let hash = Sha256::digest(value.as_bytes());
    hash.iter().take(8).map(|b| format!("{b:02x}")).collect()
}

/// Parses `t=<digits>,v1=<64 hex>` (spaces after commas allowed, other members ignored).
pub fn parse_signature_header(value: &str) -> Option<(u64, &str)> {
    let mut t = None;
    let mut v1 = None;
    for member in value.split(',') {
        let (name, val) = member.trim().split_once('=')?;
        match name {
            "t" if t.is_none() && !val.is_empty() && val.len() <= 19 => {
                if !val.bytes().all(|b| b.is_ascii_digit()) {
                    return None;
                }
                t = Some(val.parse().ok()?);
            }
            "v1" if v1.is_none() => {
                if val.len() != 64
                    || !val
                        .bytes()
                        .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
                {
                    return None;
                }
                v1 = Some(val);
            }
            "t" | "v1" => return None,
            _ => {}
        }
    }
    Some((t?, v1?))
}

/// Checks the request signature (constant time) and then its window.
pub fn verify_request(
    key: &SigningKey,
    header: Option<&str>,
    body: &[u8],
    now: u64,
) -> std::result::Result<(), Refusal> {
    let header = header.ok_or_else(|| {
        refuse(
            401,
            "invalid_signature",
            "the Tokengate-Signature header is missing",
        )
    })?;
    let (t, v1) = parse_signature_header(header).ok_or_else(|| {
        refuse(
            401,
            "invalid_signature",
            "Tokengate-Signature must be t=<unix seconds>,v1=<hex HMAC-SHA256 of \"<t>.<body>\">",
        )
    })?;
    let mut message = format!("{t}.").into_bytes();
    message.extend_from_slice(body);
    if !key.verify_bytes(&message, v1) {
        return Err(refuse(
            401,
            "invalid_signature",
            "the push signature does not verify with TOKENGATE_PUSH_KEY",
        ));
    }
    let skew = now.abs_diff(t);
    if skew > WINDOW_SECONDS {
        return Err(refuse(
            401,
            "signature_expired",
            format!(
                "the push was signed {skew} s away from the Worker's clock; at most {WINDOW_SECONDS} s are allowed: sign it again"
            ),
        ));
    }
    Ok(())
}

/// The status and code of a bundle the Worker will not serve.
fn bundle_refusal(error: &BundleError) -> Refusal {
    let description = error.to_string();
    match error {
        BundleError::TooLarge(_) => refuse(413, "too_large", description),
        BundleError::Signature => refuse(401, "invalid_signature", description),
        BundleError::WrongTarget { .. } => refuse(409, "wrong_target", description),
        BundleError::WrongEnvironment { .. } => refuse(409, "wrong_environment", description),
        BundleError::NotNewer { .. } => refuse(409, "not_newer", description),
        _ => refuse(400, "invalid_bundle", description),
    }
}

/// The changes that turn `known` (hash → digest of what KV holds) into `tokens`: deletes
/// first, then changed records, then new ones, so that removals and revocations land before
/// anything is added when a push spans several requests.
pub fn plan(known: &BTreeMap<String, String>, tokens: &[TokenRecord]) -> Vec<Op> {
    // KV holds one record per hash a gate recognises: a token, and during a rotation's
    // grace also the token it replaced.
    let mut desired = BTreeMap::new();
    for lookup in tokens.iter().flat_map(TokenRecord::lookup_records) {
        let value = serde_json::to_string(&lookup).unwrap_or_default();
        desired.insert(lookup.hash.clone(), value);
    }
    let mut ops: Vec<Op> = known
        .keys()
        .filter(|hash| !desired.contains_key(*hash))
        .map(|hash| Op::Delete { hash: hash.clone() })
        .collect();
    let mut added = Vec::new();
    for (hash, value) in desired {
        let digest = digest(&value);
        let op = Op::Put {
            hash: hash.clone(),
            value,
            digest: digest.clone(),
        };
        match known.get(&hash) {
            Some(old) if *old == digest => {}
            Some(_) => ops.push(op),
            None => added.push(op),
        }
    }
    ops.extend(added);
    ops
}

fn batch_size(env: &Env) -> usize {
    env.var(PUSH_BATCH_VAR)
        .ok()
        .and_then(|v| v.to_string().trim().parse::<usize>().ok())
        .map_or(DEFAULT_BATCH, |n| n.clamp(1, MAX_BATCH))
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
            json_error(refusal.status, refusal.error, &refusal.description, &retry)
        }
    }
}

async fn push(mut req: Request, env: &Env) -> Result<std::result::Result<Response, Refusal>> {
    let Some(key) = env
        .secret(PUSH_KEY_SECRET)
        .ok()
        .and_then(|s| SigningKey::from_hex(&s.to_string()).ok())
    else {
        return Ok(Err(refuse(
            500,
            "server_error",
            format!("the secret {PUSH_KEY_SECRET} is not set to 64 hex characters"),
        )));
    };
    let Some(environment) = env.var(ENVIRONMENT_VAR).ok().map(|v| v.to_string()) else {
        return Ok(Err(refuse(
            500,
            "server_error",
            format!("the variable {ENVIRONMENT_VAR} is not set"),
        )));
    };
    let too_large = || {
        refuse(
            413,
            "too_large",
            format!("a push body may hold at most {MAX_PUSH_BYTES} bytes"),
        )
    };
    let declared = req
        .headers()
        .get("content-length")?
        .and_then(|v| v.trim().parse::<u64>().ok());
    if declared.is_some_and(|n| n > MAX_PUSH_BYTES as u64) {
        return Ok(Err(too_large()));
    }
    let header = req.headers().get(SIGNATURE_HEADER)?;
    let body = req.bytes().await?;
    if body.len() > MAX_PUSH_BYTES {
        return Ok(Err(too_large()));
    }
    if let Err(refusal) = verify_request(&key, header.as_deref(), &body, served::now_secs()) {
        return Ok(Err(refusal));
    }
    let bundle = match parse_verified(&body, &key) {
        Ok(bundle) => bundle,
        Err(e) => return Ok(Err(bundle_refusal(&e))),
    };
    let kv = match served::kv(env) {
        Ok(kv) => kv,
        Err(failure) => return Ok(Err(unavailable(&failure))),
    };
    let serving = match served::read_meta(&kv).await {
        Ok(meta) => meta.map(|m| m.bundle.version),
        Err(failure) => return Ok(Err(unavailable(&failure))),
    };
    let expect = Expectation {
        target: Target::Worker,
        environment: Some(&environment),
        newer_than: serving,
    };
    if let Err(e) = check_expectation(&bundle, &expect) {
        return Ok(Err(bundle_refusal(&e)));
    }
    let access = match bundle
        .cloudflare_access
        .as_ref()
        .map(Settings::from_config)
        .transpose()
    {
        Ok(access) => access,
        Err(e) => return Ok(Err(refuse(400, "invalid_bundle", e.to_string()))),
    };
    let gate = match Gate::from_bundle(bundle.clone()) {
        Ok(gate) => gate,
        Err(e) => return Ok(Err(bundle_refusal(&e))),
    };
    match apply(&kv, env, bundle, gate, access).await {
        Ok(outcome) => Ok(Ok(outcome?)),
        Err(refusal) => Ok(Err(refusal)),
    }
}

async fn read_json<T: Default>(
    kv: &KvStore,
    key: &str,
    read: impl FnOnce(&mut Reader<'_>) -> json::Result<T>,
) -> std::result::Result<T, Refusal> {
    match served::kv_get(kv, key).await {
        Ok(None) => Ok(T::default()),
        Ok(Some(text)) => Reader::read_all(text.as_bytes(), read)
            .map_err(|e| unavailable(&Failure::Corrupt(format!("{key}: {e}")))),
        Err(failure) => Err(unavailable(&failure)),
    }
}

async fn write(kv: &KvStore, key: &str, value: &str) -> std::result::Result<(), Failure> {
    // put_bytes: `put` would route a String through serde-wasm-bindgen (and float
    // formatting) to reach the same JS string; KV stores the UTF-8 bytes either way.
    kv.put_bytes(key, value.as_bytes())
        .map_err(|e| Failure::Kv(e.to_string()))?
        .execute()
        .await
        .map_err(|e| Failure::Kv(e.to_string()))
}

async fn apply_op(kv: &KvStore, op: &Op) -> std::result::Result<(), Failure> {
    let key = format!("{TOKEN_PREFIX}{}", op.hash());
    match op {
        Op::Delete { .. } => kv
            .delete(&key)
            .await
            .map_err(|e| Failure::Kv(e.to_string())),
        Op::Put { value, .. } => write(kv, &key, value).await,
    }
}

/// Everything after validation: the only part that writes to KV.
async fn apply(
    kv: &KvStore,
    env: &Env,
    bundle: Bundle,
    gate: Gate,
    access: Option<Settings>,
) -> std::result::Result<Result<Response>, Refusal> {
    let this_push = PendingPush {
        version: bundle.version,
        signature: bundle.signature.clone().unwrap_or_default(),
    };
    let mut index = read_json(kv, INDEX_KEY, Index::read).await?;
    let intent = read_json(kv, INTENT_KEY, Intent::read).await?;
    if let Some(pending) = &index.pending {
        if this_push.version < pending.version
            || (this_push.version == pending.version && this_push != *pending)
        {
            return Err(refuse(
                409,
                "push_in_progress",
                format!(
                    "version {} is partly applied; push it again (or a newer version) to go on",
                    pending.version
                ),
            ));
        }
    }
    // A batch that was started but never confirmed may or may not have landed.
    if !intent.id.is_empty() && index.confirmed_intent.as_deref() != Some(&intent.id) {
        for hash in &intent.hashes {
            index.tokens.insert(hash.clone(), UNKNOWN.to_owned());
        }
    }
    let ops = plan(&index.tokens, &bundle.tokens);
    let batch = &ops[..ops.len().min(batch_size(env))];
    let mut applied = 0;
    let mut failed = 0;
    if !batch.is_empty() {
        let id = format!(
            "{}-{}-{:x}",
            this_push.version,
            served::now_ms() as u64,
            (js_sys::Math::random() * 4_294_967_296.0) as u64
        );
        let intent = Intent {
            id: id.clone(),
            hashes: batch.iter().map(|op| op.hash().to_owned()).collect(),
        };
        let text = serde_json::to_string(&intent).unwrap_or_default();
        write(kv, INTENT_KEY, &text)
            .await
            .map_err(|f| unavailable(&f))?;
        for chunk in batch.chunks(CONCURRENCY) {
            let results = join_all(chunk.iter().map(|op| apply_op(kv, op))).await;
            for (op, result) in chunk.iter().zip(results) {
                match (op, result) {
                    (Op::Delete { hash }, Ok(())) => {
                        index.tokens.remove(hash);
                        applied += 1;
                    }
                    (Op::Put { hash, digest, .. }, Ok(())) => {
                        index.tokens.insert(hash.clone(), digest.clone());
                        applied += 1;
                    }
                    (op, Err(failure)) => {
                        console_error!("tokengate push: {}: {failure}", op.hash());
                        index
                            .tokens
                            .insert(op.hash().to_owned(), UNKNOWN.to_owned());
                        failed += 1;
                    }
                }
            }
        }
        index.confirmed_intent = Some(id);
        served::forget_tokens();
    }
    let remaining = ops.len() - applied;
    index.pending = (remaining > 0).then(|| this_push.clone());
    let text = serde_json::to_string(&index).unwrap_or_default();
    write(kv, INDEX_KEY, &text)
        .await
        .map_err(|f| unavailable(&f))?;
    let version = bundle.version;
    let retry = [("retry-after", "1".to_owned())];
    if failed > 0 {
        let description = format!("{failed} KV writes failed; push again to go on");
        let body = json_object(&[
            ("error", Json::Str("temporarily_unavailable")),
            ("error_description", Json::Str(&description)),
            ("applied", Json::Num(applied as u64)),
            ("remaining", Json::Num(remaining as u64)),
        ]);
        return Ok(json_response(503, body, &retry));
    }
    if remaining > 0 {
        console_log!("tokengate push: version {version}: applied {applied}, {remaining} to go");
        let body = json_object(&[
            ("version", Json::Num(version)),
            ("applied", Json::Num(applied as u64)),
            ("remaining", Json::Num(remaining as u64)),
        ]);
        return Ok(json_response(202, body, &retry));
    }
    let tokens = bundle.tokens.len();
    let meta = Meta {
        bundle: Bundle {
            tokens: Vec::new(),
            signature: None,
            ..bundle
        },
        tokens,
    };
    let text = serde_json::to_string(&meta).unwrap_or_default();
    write(kv, META_KEY, &text)
        .await
        .map_err(|f| unavailable(&f))?;
    served::install(Served {
        gate,
        access,
        tokens,
    });
    console_log!("tokengate push: serving version {version} ({tokens} tokens, {applied} changes)");
    let body = json_object(&[
        ("version", Json::Num(version)),
        ("applied", Json::Num(applied as u64)),
        ("tokens", Json::Num(tokens as u64)),
    ]);
    Ok(json_response(200, body, &[]))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(name: &str, hash: char, revoked: Option<u64>) -> TokenRecord {
        let hash: String = std::iter::repeat_n(hash, 64).collect();
        TokenRecord {
            name: name.into(),
            hash,
            scopes: vec![],
            created_at: 1,
            not_before: None,
            expires_at: None,
            revoked_at: revoked,
            grace_until: None,
            previous: None,
        }
    }

    #[test]
    fn signature_header_parsing() {
        let v1 = "ab".repeat(32);
        assert_eq!(
            parse_signature_header(&format!("t=17,v1={v1}")),
            Some((17, v1.as_str()))
        );
        assert_eq!(
            parse_signature_header(&format!("t=17, v1={v1}, v0=zz")),
            Some((17, v1.as_str()))
        );
        for bad in [
            "".to_owned(),
            "t=17".to_owned(),
            format!("v1={v1}"),
            format!("t=-1,v1={v1}"),
            format!("t=1,t=2,v1={v1}"),
            format!("t=1,v1={}", "AB".repeat(32)),
            format!("t=1,v1={}", "ab".repeat(31)),
            format!("t=1;v1={v1}"),
        ] {
            assert_eq!(parse_signature_header(&bad), None, "{bad}");
        }
    }

    #[test]
    fn requests_are_verified_then_windowed() {
        let key = SigningKey::from_bytes([7; 32]);
        let body = br#"{"x":1}"#;
        let sign = |t: u64| {
            format!(
                "t={t},v1={}",
                key.sign_bytes(format!("{t}.{{\"x\":1}}").as_bytes())
            )
        };
        assert_eq!(verify_request(&key, Some(&sign(1000)), body, 1000), Ok(()));
        assert_eq!(verify_request(&key, Some(&sign(1000)), body, 1300), Ok(()));
        assert_eq!(verify_request(&key, Some(&sign(1000)), body, 700), Ok(()));
        let stale = verify_request(&key, Some(&sign(1000)), body, 1301).unwrap_err();
        assert_eq!((stale.status, stale.error), (401, "signature_expired"));
        let future = verify_request(&key, Some(&sign(1000)), body, 699).unwrap_err();
        assert_eq!(future.error, "signature_expired");
        let tampered = verify_request(&key, Some(&sign(1000)), br#"{"x":2}"#, 1000).unwrap_err();
        assert_eq!(
            (tampered.status, tampered.error),
            (401, "invalid_signature")
        );
        let other = SigningKey::from_bytes([8; 32]);
        assert_eq!(
            verify_request(&other, Some(&sign(1000)), body, 1000)
                .unwrap_err()
                .error,
            "invalid_signature"
        );
        assert_eq!(
            verify_request(&key, None, body, 1000).unwrap_err().status,
            401
        );
    }

    #[test]
    fn plans_only_what_changed_removals_first() {
        let a = record("a", 'a', None);
        let b = record("b", 'b', None);
        let c = record("c", 'c', None);
        let known: BTreeMap<String, String> = [&a, &b]
            .iter()
            .map(|r| (r.hash.clone(), digest(&serde_json::to_string(r).unwrap())))
            .collect();
        assert_eq!(plan(&known, &[a.clone(), b.clone()]), vec![]);

        let b_revoked = record("b", 'b', Some(5));
        let ops = plan(&known, &[b_revoked.clone(), c.clone()]);
        let kinds: Vec<(&str, &str)> = ops
            .iter()
            .map(|op| match op {
                Op::Delete { hash } => ("delete", &hash[..1]),
                Op::Put { hash, .. } => ("put", &hash[..1]),
            })
            .collect();
        assert_eq!(kinds, vec![("delete", "a"), ("put", "b"), ("put", "c")]);

        // A record in an unconfirmed batch is written again even if unchanged.
        let mut unsure = known.clone();
        unsure.insert(a.hash.clone(), UNKNOWN.to_owned());
        assert_eq!(plan(&unsure, &[a, b]).len(), 1);

        // A rotated token is found under both hashes during its grace.
        let mut rotated = record("r", 'd', None);
        rotated.previous = Some(tokengate_core::bundle::PreviousToken {
            hash: "e".repeat(64),
            grace_until: 99,
        });
        let ops = plan(&BTreeMap::new(), &[rotated]);
        let puts: Vec<(&str, &str)> = ops
            .iter()
            .filter_map(|op| match op {
                Op::Put { hash, value, .. } => Some((&hash[..1], value.as_str())),
                Op::Delete { .. } => None,
            })
            .collect();
        assert_eq!(puts.len(), 2);
        assert!(puts[0].0 == "d" && !puts[0].1.contains("grace_until"));
        assert!(puts[1].0 == "e" && puts[1].1.contains("\"grace_until\":99"));
    }
}
