//! tokengate's Cloudflare Worker: a thin adapter over `tokengate-core`.
//!
//! Every decision is the core's (`Gate::begin_with_access`, then `finish` with the token
//! record from KV or `finish_access` with the Access signature verdict). This crate brings
//! only what the platform has: Workers KV for the token records, the clock, `fetch` to the
//! origin, and WebCrypto for Cloudflare Access signatures.
//!
//! Routes (exact paths, checked before any policy):
//! - `GET /.well-known/tokengate/status`: version, environment, token count, KV reads.
//! - `POST /.well-known/tokengate/bundle`: signed bundle pushes ([`push`]).
//! - everything else: the gate ([`gate`]), then the origin at `ORIGIN_URL`.

mod access;
mod gate;
mod push;
mod served;

use worker::{event, Context, Env, Request, Response, Result};

/// The Workers KV namespace binding that holds the meta and the token records.
pub const KV_BINDING: &str = "TOKENGATE";
/// Variable: where allowed requests go, e.g. `https://orders.internal.example.com`.
pub const ORIGIN_URL_VAR: &str = "ORIGIN_URL";
/// Variable: the environment this Worker serves; pushes for another one are refused.
pub const ENVIRONMENT_VAR: &str = "TOKENGATE_ENVIRONMENT";
/// Secret: 64 hex characters; verifies push requests and the bundles they carry.
pub const PUSH_KEY_SECRET: &str = "TOKENGATE_PUSH_KEY";
/// Optional variable: token changes applied per push request (default and cap in [`push`]).
pub const PUSH_BATCH_VAR: &str = "TOKENGATE_PUSH_BATCH";

const STATUS_PATH: &str = "/.well-known/tokengate/status";
const BUNDLE_PATH: &str = "/.well-known/tokengate/bundle";
const RESERVED_PREFIX: &str = "/.well-known/tokengate/";

#[event(fetch)]
async fn fetch(req: Request, env: Env, _ctx: Context) -> Result<Response> {
    let target = gate::split_url(&req.inner().url());
    let path = target.path.split('?').next().unwrap_or_default();
    let method = req.inner().method();
    match path {
        STATUS_PATH if method == "GET" || method == "HEAD" => handle_status(&env).await,
        BUNDLE_PATH if method == "POST" => push::handle_push(req, &env).await,
        STATUS_PATH | BUNDLE_PATH => json_error(
            405,
            "method_not_allowed",
            "status takes GET, bundle takes POST",
            &[],
        ),
        _ if path.starts_with(RESERVED_PREFIX) => json_error(
            404,
            "not_found",
            "unknown tokengate endpoint (status, bundle)",
            &[],
        ),
        _ => gate::handle_gate(req, &env, target).await,
    }
}

/// `GET /.well-known/tokengate/status`: what this isolate serves. No secrets: no key, no
/// hashes, no token names.
async fn handle_status(env: &Env) -> Result<Response> {
    let configured = env.var(ENVIRONMENT_VAR).ok().map(|v| v.to_string());
    let (status, version, environment, tokens) = match served::current(env).await {
        Ok(Some(s)) => (
            200,
            Some(s.gate.version()),
            Some(s.gate.environment().to_owned()),
            s.tokens,
        ),
        Ok(None) => (200, None, configured, 0),
        Err(failure) => {
            worker::console_error!("tokengate status: {failure}");
            (503, None, configured, 0)
        }
    };
    let body = json_object(&[
        ("version", version.map_or(Json::Null, Json::Num)),
        (
            "environment",
            environment.as_deref().map_or(Json::Null, Json::Str),
        ),
        ("tokens", Json::Num(tokens as u64)),
        ("kv_reads", Json::Num(served::kv_reads())),
    ]);
    json_response(status, body, &[])
}

/// A JSON response with `cache-control: no-store` (nothing the gate says may be cached).
fn json_response(status: u16, body: String, headers: &[(&str, String)]) -> Result<Response> {
    let response_headers = worker::Headers::new();
    response_headers.set("content-type", "application/json")?;
    response_headers.set("cache-control", "no-store")?;
    for (name, value) in headers {
        response_headers.set(name, value)?;
    }
    Ok(Response::builder()
        .with_status(status)
        .with_headers(response_headers)
        .fixed(body.into_bytes()))
}

/// The error shape every tokengate response uses: `{"error", "error_description"}`.
fn json_error(
    status: u16,
    error: &str,
    description: &str,
    headers: &[(&str, String)],
) -> Result<Response> {
    let body = json_object(&[
        ("error", Json::Str(error)),
        ("error_description", Json::Str(description)),
    ]);
    json_response(status, body, headers)
}

/// A member value of the Worker's own JSON answers, which are all flat objects.
#[derive(Clone, Copy)]
enum Json<'a> {
    Str(&'a str),
    Num(u64),
    Null,
}

/// A flat JSON object, members in the order given. Written here rather than through
/// `serde_json::Value`, whose map and number code cost the bundle more than this.
fn json_object(members: &[(&str, Json<'_>)]) -> String {
    let mut out = String::from("{");
    for (i, (name, value)) in members.iter().enumerate() {
        if i > 0 {
            out.push(',');
        }
        push_json_str(&mut out, name);
        out.push(':');
        match value {
            Json::Str(text) => push_json_str(&mut out, text),
            Json::Num(n) => out.push_str(&n.to_string()),
            Json::Null => out.push_str("null"),
        }
    }
    out.push('}');
    out
}

fn push_json_str(out: &mut String, text: &str) {
    // Serialising a string cannot fail.
    out.push_str(&serde_json::to_string(text).unwrap_or_default());
}
