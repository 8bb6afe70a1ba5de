//! Signed pushes: `POST /.well-known/tokengate/bundle`.
//!
//! The body is a published `tokengate.bundle/v2` document; the request carries
//! `Tokengate-Signature: t=<unix seconds>,<key id>=<hex Ed25519>[,…]`, each signature over
//! `tokengate.push/v2\n<t>\n<body>` by one of the admin's keys. The Worker holds public keys
//! only: `TOKENGATE_TRUSTED_KEYS` until its first push lands, then the `keys` of the bundle it
//! serves. Everything is checked before the first KV write, so a refused push changes
//! nothing: the header's form and a `Content-Length` within the cap (before the body is
//! read), the request signatures and their 5-minute window, the bundle's signatures, target,
//! environment and version (newer than the one served: a replayed push changes nothing),
//! then the whole bundle.
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
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use tokengate_core::access::Settings;
use tokengate_core::bundle::{BundleError, Envelope};
use tokengate_core::keys::MAX_KEYS;
use tokengate_core::{Bundle, Expectation, Gate, KeySet, Target, TokenRecord};
use worker::{console_error, console_log, Env, KvStore, Request, Response, Result};

use crate::served::{self, Failure, Meta, Served, META_KEY, TOKEN_PREFIX};
use crate::{json_error, json_response, ENVIRONMENT_VAR, PUSH_BATCH_VAR, TRUSTED_KEYS_VAR};

/// The request header carrying `t=<unix seconds>,<key id>=<hex Ed25519>[,…]`.
pub const SIGNATURE_HEADER: &str = "tokengate-signature";
/// What a push request's signatures cover, before `<t>\n<body>`.
pub const PUSH_CONTEXT: &str = "tokengate.push/v2";
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
#[derive(Debug, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Index {
    tokens: BTreeMap<String, String>,
    /// The push that is partly applied, if any.
    #[serde(default)]
    pending: Option<PendingPush>,
    /// The id of the last intent whose batch is recorded in `tokens`.
    #[serde(default)]
    confirmed_intent: Option<String>,
}

/// A push by its version and signatures (the bundle's, comma-joined).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct PendingPush {
    version: u64,
    signature: String,
}

/// The hashes a batch is about to touch, written before it is applied.
#[derive(Debug, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Intent {
    id: String,
    hashes: Vec<String>,
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
    tokengate_core::hex::encode(&hash[..8])
}

/// A parsed `Tokengate-Signature` header: the time and each `(key id, signature)`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RequestSignatures {
    /// Unix seconds at signing.
    pub t: u64,
    /// `(kid_<16 hex>, <128 hex>)`, distinct key ids.
    pub signatures: Vec<(String, String)>,
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

/// Checks the request signatures against the trusted keys, then their window.
pub fn verify_request(
    trusted: &KeySet,
    signed: &RequestSignatures,
    body: &[u8],
    now: u64,
) -> std::result::Result<(), Refusal> {
    let mut message = format!("{PUSH_CONTEXT}\n{}\n", signed.t).into_bytes();
    message.extend_from_slice(body);
    let pairs = signed
        .signatures
        .iter()
        .map(|(id, signature)| (id.as_str(), signature.as_str()));
    trusted
        .check(&message, pairs)
        .map_err(|e| refuse(401, "invalid_signature", format!("push signature: {e}")))?;
    let skew = now.abs_diff(signed.t);
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
        e if e.is_signature() => refuse(401, "invalid_signature", description),
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

/// The keys this Worker trusts: those of the bundle it serves, else its configured ones.
pub fn trusted_keys(env: &Env, serving: Option<&Meta>) -> std::result::Result<KeySet, String> {
    if let Some(meta) = serving {
        return KeySet::from_hex(&meta.bundle.keys).map_err(|e| format!("{META_KEY}: {e}"));
    }
    let text = env
        .var(TRUSTED_KEYS_VAR)
        .map_err(|_| format!("the variable {TRUSTED_KEYS_VAR} is not set"))?
        .to_string();
    KeySet::parse(&text).map_err(|e| format!("{TRUSTED_KEYS_VAR}: {e}"))
}

async fn push(mut req: Request, env: &Env) -> Result<std::result::Result<Response, Refusal>> {
    let Some(environment) = env.var(ENVIRONMENT_VAR).ok().map(|v| v.to_string()) else {
        return Ok(Err(refuse(
            500,
            "server_error",
            format!("the variable {ENVIRONMENT_VAR} is not set"),
        )));
    };
    // The header's form, then the declared length: both before a byte of the body is read.
    let header = req.headers().get(SIGNATURE_HEADER)?;
    let Some(signed) = header.as_deref().and_then(parse_signature_header) else {
        return Ok(Err(refuse(
            401,
            "invalid_signature",
            format!("{SIGNATURE_HEADER} must be t=<unix seconds>,<key id>=<hex Ed25519 of \"{PUSH_CONTEXT}\\n<t>\\n<body>\">[,…]"),
        )));
    };
    let too_large = || {
        refuse(
            413,
            "too_large",
            format!("a push body may hold at most {MAX_PUSH_BYTES} bytes"),
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
    let kv = match served::kv(env) {
        Ok(kv) => kv,
        Err(failure) => return Ok(Err(unavailable(&failure))),
    };
    let serving = match served::read_meta(&kv).await {
        Ok(meta) => meta,
        Err(failure) => return Ok(Err(unavailable(&failure))),
    };
    let trusted = match trusted_keys(env, serving.as_ref()) {
        Ok(keys) => keys,
        Err(e) => return Ok(Err(refuse(500, "server_error", e))),
    };
    if let Err(refusal) = verify_request(&trusted, &signed, &body, served::now_secs()) {
        return Ok(Err(refusal));
    }
    let opened = Envelope::open(&body, &trusted).and_then(|envelope| {
        let (bundle, _) = envelope.payload::<Vec<TokenRecord>>()?;
        let mark = tokengate_core::Served::of(bundle.version, &envelope);
        Ok((bundle, mark.signatures))
    });
    let (bundle, signatures) = match opened {
        Ok(opened) => opened,
        Err(e) => return Ok(Err(bundle_refusal(&e))),
    };
    let expect = Expectation {
        target: Target::Worker,
        environment: Some(&environment),
        newer_than: serving.map(|m| m.bundle.version),
    };
    if let Err(e) = expect.check(&bundle) {
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
    let this_push = PendingPush {
        version: bundle.version,
        signature: signatures,
    };
    match apply(&kv, env, bundle, this_push, gate, access).await {
        Ok(outcome) => Ok(Ok(outcome?)),
        Err(refusal) => Ok(Err(refusal)),
    }
}

async fn read_json<T: Default + for<'de> Deserialize<'de>>(
    kv: &KvStore,
    key: &str,
) -> std::result::Result<T, Refusal> {
    match served::kv_get(kv, key).await {
        Ok(None) => Ok(T::default()),
        Ok(Some(text)) => serde_json::from_str(&text)
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
    this_push: PendingPush,
    gate: Gate,
    access: Option<Settings>,
) -> std::result::Result<Result<Response>, Refusal> {
    let mut index: Index = read_json(kv, INDEX_KEY).await?;
    let intent: Intent = read_json(kv, INTENT_KEY).await?;
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
        let body = serde_json::json!({
            "error": "temporarily_unavailable",
            "error_description": description,
            "applied": applied,
            "remaining": remaining,
        });
        return Ok(json_response(503, body, &retry));
    }
    if remaining > 0 {
        console_log!("tokengate push: version {version}: applied {applied}, {remaining} to go");
        let body =
            serde_json::json!({"version": version, "applied": applied, "remaining": remaining});
        return Ok(json_response(202, body, &retry));
    }
    let tokens = bundle.tokens.len();
    let meta = Meta {
        bundle: Bundle {
            tokens: Vec::new(),
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
    let body = serde_json::json!({"version": version, "applied": applied, "tokens": tokens});
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

    fn key(seed: u8) -> (ed25519_dalek::SigningKey, String, String) {
        let signing = ed25519_dalek::SigningKey::from_bytes(&[seed; 32]);
        let public = tokengate_core::hex::encode(signing.verifying_key().as_bytes());
        let id = tokengate_core::keys::key_id(signing.verifying_key().as_bytes());
        (signing, public, id)
    }

    fn header(signing: &ed25519_dalek::SigningKey, id: &str, t: u64, body: &str) -> String {
        use ed25519_dalek::Signer;
        let message = format!("{PUSH_CONTEXT}\n{t}\n{body}");
        let signature = tokengate_core::hex::encode(&signing.sign(message.as_bytes()).to_bytes());
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
        let signed = |k, id: &str, t| parse_signature_header(&header(k, id, t, body)).unwrap();
        let check = |s: &RequestSignatures, body: &str, now| {
            verify_request(&trusted, s, body.as_bytes(), now)
        };
        assert_eq!(check(&signed(&ka, &id_a, 1000), body, 1000), Ok(()));
        assert_eq!(check(&signed(&ka, &id_a, 1000), body, 1300), Ok(()));
        assert_eq!(check(&signed(&ka, &id_a, 1000), body, 700), Ok(()));
        let stale = check(&signed(&ka, &id_a, 1000), body, 1301).unwrap_err();
        assert_eq!((stale.status, stale.error), (401, "signature_expired"));
        let future = check(&signed(&ka, &id_a, 1000), body, 699).unwrap_err();
        assert_eq!(future.error, "signature_expired");
        let tampered = check(&signed(&ka, &id_a, 1000), r#"{"x":2}"#, 1000).unwrap_err();
        assert_eq!(
            (tampered.status, tampered.error),
            (401, "invalid_signature")
        );
        // Another key, and another key under the trusted key's id.
        let other = check(&signed(&kb, &id_b, 1000), body, 1000).unwrap_err();
        assert_eq!(other.error, "invalid_signature");
        let relabelled = check(&signed(&kb, &id_a, 1000), body, 1000).unwrap_err();
        assert_eq!(relabelled.error, "invalid_signature");
        // A bundle signature is no push signature: the context differs.
        use ed25519_dalek::Signer;
        let bare = tokengate_core::hex::encode(&ka.sign(body.as_bytes()).to_bytes());
        let bare = parse_signature_header(&format!("t=1000,{id_a}={bare}")).unwrap();
        assert!(check(&bare, body, 1000).is_err());
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
