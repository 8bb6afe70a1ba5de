//! tokengate's Cloudflare Worker: a thin adapter over `tokengate-core`.
//!
//! Every decision is the core's (`Gate::begin_with_access`, then `finish` with the token
//! record from KV or `finish_access` with the Access signature verdict). This crate brings
//! only what the platform has: Workers KV for the token records, the clock, `fetch` to the
//! origin, WebCrypto for Cloudflare Access signatures, and the Rate Limiting binding for
//! rate limits ([`limits`]).
//!
//! Routes (exact paths, checked before any policy):
//! - `GET /.well-known/tokengate/status`: version, environment, token count, KV reads.
//! - `POST /.well-known/tokengate/bundle`: signed bundle pushes ([`push`]).
//! - `GET /.well-known/tokengate/usage`: per-token usage, for a read signed by an admin key
//!   ([`usage`]).
//! - everything else: the gate ([`gate`]), then the origin at `ORIGIN_URL`.

mod access;
mod gate;
mod limits;
mod push;
mod served;
mod state;
mod usage;

use worker::{event, Context, Env, Request, Response, Result};

/// The Workers KV namespace binding that holds the token pages.
pub const KV_BINDING: &str = "TOKENGATE";
/// Variable: where allowed requests go, e.g. `https://orders.internal.example.com`.
pub const ORIGIN_URL_VAR: &str = "ORIGIN_URL";
/// Variable: the environment this Worker serves; pushes for another one are refused.
pub const ENVIRONMENT_VAR: &str = "TOKENGATE_ENVIRONMENT";
/// Variable: the admin's public keys (hex, comma-separated) this Worker trusts until its
/// first push lands; from then on it trusts the keys of the bundle it serves. Public keys
/// only: no Worker secret can sign anything.
pub const TRUSTED_KEYS_VAR: &str = "TOKENGATE_TRUSTED_KEYS";

const STATUS_PATH: &str = "/.well-known/tokengate/status";
const BUNDLE_PATH: &str = "/.well-known/tokengate/bundle";
const RESERVED_PREFIX: &str = "/.well-known/tokengate/";

#[event(fetch)]
async fn fetch(req: Request, env: Env, ctx: Context) -> Result<Response> {
    let target = gate::split_url(&req.inner().url());
    let path = target.path.split('?').next().unwrap_or_default();
    let method = req.inner().method();
    match path {
        STATUS_PATH if method == "GET" || method == "HEAD" => handle_status(&env).await,
        BUNDLE_PATH if method == "POST" => push::handle_push(req, &env).await,
        usage::USAGE_PATH => usage::handle_read(&req, &env, &target).await,
        STATUS_PATH | BUNDLE_PATH => json_error(
            405,
            "method_not_allowed",
            "status takes GET, bundle takes POST",
            &[],
        ),
        _ if path.starts_with(RESERVED_PREFIX) => json_error(
            404,
            "not_found",
            "unknown tokengate endpoint (status, bundle, usage)",
            &[],
        ),
        _ => {
            let response = gate::handle_gate(req, &env, target).await;
            if usage::due(&env) {
                let env = env.clone();
                ctx.wait_until(async move {
                    if let Err(failure) = usage::flush(&env).await {
                        worker::console_error!(
                            "tokengate usage: flush failed, kept for the next: {failure}"
                        );
                    }
                });
            }
            response
        }
    }
}

/// `GET /.well-known/tokengate/status`: what this isolate serves, the key ids it trusts and
/// the push in progress. No secrets: no hashes, no token names.
async fn handle_status(env: &Env) -> Result<Response> {
    let configured = env.var(ENVIRONMENT_VAR).ok().map(|v| v.to_string());
    let unavailable = |failure: served::Failure| {
        worker::console_error!("tokengate status: {failure}");
        let body = serde_json::json!({
            "version": null, "bundle_sha256": null, "environment": configured, "keys": [], "tokens": 0,
            "kv_reads": served::kv_reads(), "pending": null, "revoke_all_at": null,
        });
        json_response(503, body, &[])
    };
    let view = match served::view(env).await {
        Ok(view) => view,
        Err(failure) => return unavailable(failure),
    };
    let (version, environment, tokens, keys, revoke_all_at) = match served::current(env).await {
        Ok(Some(s)) => (
            Some(s.gate.version()),
            Some(s.gate.environment().to_owned()),
            s.tokens,
            key_ids(s.gate.keys()),
            s.gate.revoke_all_at(),
        ),
        Ok(None) => match push::trusted_keys(env, &view) {
            Ok(keys) => (None, configured.clone(), 0, key_ids(&keys), None),
            // No push could ever land: say so here, not only on the first push.
            Err(problem) => return json_error(500, "server_error", &problem, &[]),
        },
        Err(failure) => return unavailable(failure),
    };
    let pending = view
        .pending
        .as_ref()
        .map(|p| serde_json::json!({"version": p.version, "remaining": p.remaining}));
    let body = serde_json::json!({
        "version": version,
        "bundle_sha256": view.served.as_ref().map(|s| s.sha256.clone()),
        "environment": environment,
        "keys": keys,
        "tokens": tokens,
        "kv_reads": served::kv_reads(),
        "pending": pending,
        "revoke_all_at": revoke_all_at,
    });
    json_response(200, body, &[])
}

fn key_ids(keys: &tokengate_core::KeySet) -> Vec<String> {
    keys.keys().iter().map(|k| k.id().to_owned()).collect()
}

/// A JSON response with `cache-control: no-store` (nothing the gate says may be cached).
fn json_response(
    status: u16,
    body: serde_json::Value,
    headers: &[(&str, String)],
) -> Result<Response> {
    let response_headers = worker::Headers::new();
    response_headers.set("content-type", "application/json")?;
    response_headers.set("cache-control", "no-store")?;
    for (name, value) in headers {
        response_headers.set(name, value)?;
    }
    Ok(Response::builder()
        .with_status(status)
        .with_headers(response_headers)
        .fixed(body.to_string().into_bytes()))
}

/// The error shape every tokengate response uses: `{"error", "error_description"}`.
fn json_error(
    status: u16,
    error: &str,
    description: &str,
    headers: &[(&str, String)],
) -> Result<Response> {
    let body = serde_json::json!({"error": error, "error_description": description});
    json_response(status, body, headers)
}
