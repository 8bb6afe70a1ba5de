//! Cloudflare Access signatures: the team keys from the bundle's certs URL, cached in the
//! isolate, and RS256 verification through WebCrypto. Every other check (alg, kid, iss,
//! aud, exp, nbf, subject) is the core's (`tokengate_core::access`).

use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::pin::pin;
use std::time::Duration;

use futures_util::future::{select, Either};
use js_sys::{Array, Object, Promise, Reflect, Uint8Array};
use serde::Deserialize;
use tokengate_core::access::KeyCheck;
use tokengate_core::AccessPending;
use wasm_bindgen::prelude::*;
use wasm_bindgen_futures::JsFuture;
use worker::{console_warn, Delay, Fetch, Method, Request};

use crate::served::{now_ms, Failure};

/// How long fetched team keys are used before they are fetched again. Access publishes a
/// new key well before it signs with it, so a few minutes of staleness is safe.
const KEYS_TTL_MS: f64 = 10.0 * 60.0 * 1000.0;
/// An unknown `kid` refetches the keys (a rotation), but at most this often, so a flood of
/// made-up `kid`s cannot turn into a flood of fetches.
const REFETCH_INTERVAL_MS: f64 = 30.0 * 1000.0;
/// A certs fetch that takes longer fails the request closed.
const FETCH_TIMEOUT_MS: u64 = 5_000;
const ALGORITHM: &str = "RSASSA-PKCS1-v1_5";

#[wasm_bindgen]
extern "C" {
    // `crypto.subtle.importKey` and `verify`, called on `crypto.subtle` itself.
    #[wasm_bindgen(js_namespace = ["crypto", "subtle"], js_name = importKey, catch)]
    fn import_key(
        format: &str,
        key_data: &JsValue,
        algorithm: &JsValue,
        extractable: bool,
        usages: &Array,
    ) -> Result<Promise, JsValue>;

    #[wasm_bindgen(js_namespace = ["crypto", "subtle"], js_name = verify, catch)]
    fn subtle_verify(
        algorithm: &JsValue,
        key: &JsValue,
        signature: &Uint8Array,
        data: &Uint8Array,
    ) -> Result<Promise, JsValue>;
}

/// A JWKS document as Access serves it; other members are ignored.
#[derive(Deserialize)]
struct Jwks {
    keys: Vec<Jwk>,
}

#[derive(Deserialize)]
struct Jwk {
    kid: Option<String>,
    kty: String,
    alg: Option<String>,
    n: Option<String>,
    e: Option<String>,
}

struct KeySet {
    url: String,
    keys: HashMap<String, JsValue>,
    fetched_at: f64,
}

/// After a failed certs fetch, the next waits this long, doubling per failure up to
/// [`BACKOFF_MAX_MS`]: a failing certs URL costs a fetch per interval, not one per request.
const BACKOFF_BASE_MS: f64 = 1_000.0;
const BACKOFF_MAX_MS: f64 = 60_000.0;

thread_local! {
    static KEYS: RefCell<Option<KeySet>> = const { RefCell::new(None) };
    static LAST_FETCH: Cell<f64> = const { Cell::new(f64::NEG_INFINITY) };
    /// No fetch starts before this instant: one in flight, or a backoff after failures.
    static NEXT_FETCH: Cell<f64> = const { Cell::new(f64::NEG_INFINITY) };
    static FAILURES: Cell<u32> = const { Cell::new(0) };
}

/// Finds the team key named by the assertion and verifies its RS256 signature.
pub async fn check_signature(pending: &AccessPending<'_>) -> Result<KeyCheck, Failure> {
    let url = pending.settings().certs_url();
    let Some(key) = key_for(url, pending.assertion.kid()).await? else {
        return Ok(KeyCheck::UnknownKey);
    };
    let verified = verify(
        &key,
        pending.assertion.signed_bytes(),
        pending.assertion.signature(),
    )
    .await?;
    Ok(if verified {
        KeyCheck::Verified
    } else {
        KeyCheck::BadSignature
    })
}

async fn key_for(url: &str, kid: &str) -> Result<Option<JsValue>, Failure> {
    let now = now_ms();
    let (known, fresh) = KEYS.with(|k| match k.borrow().as_ref() {
        Some(set) if set.url == url => (
            set.keys.get(kid).cloned(),
            now - set.fetched_at < KEYS_TTL_MS,
        ),
        _ => (None, false),
    });
    if known.is_some() && fresh {
        return Ok(known);
    }
    let wanted = !fresh || now - LAST_FETCH.with(Cell::get) >= REFETCH_INTERVAL_MS;
    let due = now >= NEXT_FETCH.with(Cell::get);
    if !(wanted && due) {
        // Stale keys stay genuine; with none at all the request fails closed until the
        // backoff lets the next fetch through.
        let have_keys = KEYS.with(|k| k.borrow().as_ref().is_some_and(|set| set.url == url));
        return match (&known, have_keys) {
            (None, false) => Err(Failure::Keys(format!(
                "{url}: unavailable; the next fetch is in {} ms",
                (NEXT_FETCH.with(Cell::get) - now).max(0.0) as u64
            ))),
            _ => Ok(known),
        };
    }
    LAST_FETCH.with(|t| t.set(now));
    // Requests arriving while this fetch is in flight do not start their own.
    NEXT_FETCH.with(|t| t.set(now + FETCH_TIMEOUT_MS as f64));
    let fetched = fetch_keys(url).await;
    let after = now_ms();
    match &fetched {
        Ok(_) => {
            FAILURES.with(|f| f.set(0));
            NEXT_FETCH.with(|t| t.set(after));
        }
        Err(_) => {
            let failures = FAILURES.with(|f| {
                f.set(f.get().saturating_add(1));
                f.get()
            });
            let backoff = BACKOFF_BASE_MS * 2f64.powi(failures.min(16) as i32 - 1);
            NEXT_FETCH.with(|t| t.set(after + backoff.min(BACKOFF_MAX_MS)));
        }
    }
    match fetched {
        Ok(keys) => {
            let found = keys.get(kid).cloned();
            KEYS.with(|k| {
                *k.borrow_mut() = Some(KeySet {
                    url: url.to_owned(),
                    keys,
                    fetched_at: now,
                })
            });
            Ok(found)
        }
        // Keys already fetched stay genuine when the certs endpoint hiccups; without any,
        // nothing can be verified and the request fails closed.
        Err(failure) if known.is_some() => {
            console_warn!("tokengate: {failure}; using the keys fetched before");
            Ok(known)
        }
        Err(failure) => Err(failure),
    }
}

async fn fetch_keys(url: &str) -> Result<HashMap<String, JsValue>, Failure> {
    // A plain string request: the url crate (and its IDNA tables) stays out of the module.
    let request =
        Request::new(url, Method::Get).map_err(|e| Failure::Keys(format!("{url}: {e}")))?;
    let fetch = Fetch::Request(request);
    let send = pin!(fetch.send());
    let timeout = pin!(Delay::from(Duration::from_millis(FETCH_TIMEOUT_MS)));
    let mut response = match select(send, timeout).await {
        Either::Left((result, _)) => result.map_err(|e| Failure::Keys(format!("{url}: {e}")))?,
        Either::Right(_) => return Err(Failure::Keys(format!("{url}: timed out"))),
    };
    if response.status_code() != 200 {
        return Err(Failure::Keys(format!(
            "{url}: status {}",
            response.status_code()
        )));
    }
    let text = response
        .text()
        .await
        .map_err(|e| Failure::Keys(format!("{url}: {e}")))?;
    let jwks: Jwks =
        serde_json::from_str(&text).map_err(|e| Failure::Keys(format!("{url}: {e}")))?;
    let mut keys = HashMap::new();
    for jwk in jwks.keys {
        let (Some(kid), Some(n), Some(e)) = (jwk.kid, jwk.n, jwk.e) else {
            continue;
        };
        if jwk.kty != "RSA" || jwk.alg.as_deref().is_some_and(|alg| alg != "RS256") {
            continue;
        }
        match import(&n, &e).await {
            Ok(key) => {
                keys.insert(kid, key);
            }
            Err(error) => console_warn!("tokengate: team key {kid} not usable: {error}"),
        }
    }
    Ok(keys)
}

fn algorithm() -> Result<JsValue, JsValue> {
    let algorithm = Object::new();
    Reflect::set(&algorithm, &"name".into(), &ALGORITHM.into())?;
    Reflect::set(&algorithm, &"hash".into(), &"SHA-256".into())?;
    Ok(algorithm.into())
}

async fn import(n: &str, e: &str) -> Result<JsValue, String> {
    let imported = async {
        let jwk = Object::new();
        for (name, value) in [("kty", "RSA"), ("n", n), ("e", e), ("alg", "RS256")] {
            Reflect::set(&jwk, &name.into(), &value.into())?;
        }
        let usages = Array::of1(&"verify".into());
        JsFuture::from(import_key("jwk", &jwk, &algorithm()?, false, &usages)?).await
    };
    imported.await.map_err(|e| format!("{e:?}"))
}

async fn verify(key: &JsValue, signed: &[u8], signature: &[u8]) -> Result<bool, Failure> {
    let verified = async {
        let promise = subtle_verify(
            &algorithm()?,
            key,
            &Uint8Array::from(signature),
            &Uint8Array::from(signed),
        )?;
        JsFuture::from(promise).await
    };
    verified
        .await
        .map(|v| v.as_bool() == Some(true))
        .map_err(|e| Failure::Keys(format!("verify: {e:?}")))
}
