//! The gate route: hand the request to the core, carry its decision out.
//!
//! Allowed requests go to `ORIGIN_URL` + the (possibly rewritten) path, with the core's
//! header removals and identity headers applied; denied ones get the core's `Denial` as is.
//! Anything that keeps the Worker from deciding (no meta yet, KV error or timeout, missing
//! configuration) is the core's 503 `unavailable`: fail closed, never a pass-through.

use tokengate_core::decision::{self, Decision, Denial, Reason, Request as CoreRequest};
use tokengate_core::Step;
use worker::{console_error, console_log, web_sys, Env, Fetch, Request, Response, Result};

use crate::served::{self, Failure};
use crate::{access, json_error, limits, ORIGIN_URL_VAR};

/// The request target as the Worker received it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    /// `host[:port]` from the request URL.
    pub authority: String,
    /// The path and query, exactly as in the URL (the core normalises).
    pub path: String,
}

impl Target {
    /// The request as the core takes it: this target, `method` and `headers`.
    pub fn request<'a>(
        &'a self,
        method: &'a str,
        headers: &'a [(&'a str, &'a str)],
    ) -> CoreRequest<'a> {
        CoreRequest {
            method,
            path: &self.path,
            authority: &self.authority,
            headers,
        }
    }
}

/// Splits the request URL into authority and path-with-query (the fragment never counts).
pub fn split_url(url: &str) -> Target {
    let rest = url.split_once("://").map_or(url, |(_, rest)| rest);
    let end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    let (authority, tail) = rest.split_at(end);
    let tail = tail.split('#').next().unwrap_or_default();
    let path = if tail.starts_with('/') {
        tail.to_owned()
    } else {
        format!("/{tail}")
    };
    Target {
        authority: authority.to_owned(),
        path,
    }
}

/// The request's header pairs as the core must see them. The Fetch API joins repeated fields
/// into one value with ", "; no valid credential holds a space, so splitting on ", " gives
/// every pair back and a repeated credential header is still a 400, as on Envoy.
pub fn header_pairs(entries: impl Iterator<Item = (String, String)>) -> Vec<(String, String)> {
    let mut pairs = Vec::new();
    for (name, value) in entries {
        for part in value.split(", ") {
            pairs.push((name.clone(), part.to_owned()));
        }
    }
    pairs
}

/// Decides one request and carries the decision out.
pub async fn handle_gate(req: Request, env: &Env, target: Target) -> Result<Response> {
    let method = req.inner().method();
    let headers = header_pairs(req.headers().entries());
    let unavailable =
        |reason, failure| respond_unavailable(reason, &method, &target, &headers, failure);
    // Without an origin nothing could be forwarded: fail closed before deciding anything.
    let Some(origin) = env.var(ORIGIN_URL_VAR).ok().map(|v| v.to_string()) else {
        let problem = format!("variable {ORIGIN_URL_VAR} is not set");
        return unavailable(Reason::Internal, Some(Failure::Config(problem)));
    };
    let (served, changes) = match served::snapshot(env).await {
        Ok(Some(snapshot)) => snapshot,
        Ok(None) => return unavailable(Reason::NoBundle, None),
        Err(failure) => return unavailable(Reason::Internal, Some(failure)),
    };
    let header_refs = tokengate_core::decision::header_refs(&headers);
    let request = target.request(&method, &header_refs);
    let decision =
        match served
            .gate
            .begin_with_access(&request, served.access.as_ref(), served::now_secs())
        {
            Step::Done(decision) => decision,
            // A set without imported secrets holds only tokengate tokens: a credential of
            // another shape cannot match one, and costs no KV read.
            Step::Lookup(pending) if !pending.may_match(served.imported_secrets) => {
                served.gate.finish(pending, None, served::now_secs())
            }
            Step::Lookup(pending) => {
                let record = match served::record(env, &served, &pending.hash).await {
                    Ok(record) => record,
                    Err(failure) => return unavailable(Reason::Internal, Some(failure)),
                };
                let now = served::now_secs();
                match changes.get(&pending.hash.0) {
                    // A push in progress changes this token: its tightening holds already.
                    Some(incoming) => {
                        served
                            .gate
                            .finish_changing(pending, record.as_ref(), incoming, now)
                    }
                    None => served.gate.finish(pending, record.as_ref(), now),
                }
            }
            Step::Access(pending) => match access::check_signature(&pending).await {
                Ok(verdict) => served
                    .gate
                    .finish_access(pending, verdict, served::now_secs()),
                Err(failure) => return unavailable(Reason::Internal, Some(failure)),
            },
        };
    let environment = served.gate.environment();
    let decision = limits::enforce(env, decision, environment, served::now_secs()).await;
    log_decision(&method, &target, &decision, &headers);
    crate::usage::count(&decision, served::now_secs());
    // Forward only on Allow: any other decision answers (the core's own rule).
    match decision.refusal() {
        None => forward(req, &origin, &decision, &target).await,
        Some(denial) => denial_response(&denial),
    }
}

fn respond_unavailable(
    reason: Reason,
    method: &str,
    target: &Target,
    headers: &[(String, String)],
    failure: Option<Failure>,
) -> Result<Response> {
    if let Some(failure) = failure {
        console_error!("tokengate: cannot decide, failing closed: {failure}");
    }
    let decision = decision::unavailable(reason);
    log_decision(method, target, &decision, headers);
    // An unavailable decision is a deny: it never forwards.
    match decision.refusal() {
        Some(denial) => denial_response(&denial),
        None => json_error(
            503,
            "temporarily_unavailable",
            "the gate cannot decide",
            &[],
        ),
    }
}

/// One line per decision: the precise reason lives here (and only here), never a credential
/// (the query is left out, it may hold one).
fn log_decision(method: &str, target: &Target, decision: &Decision, headers: &[(String, String)]) {
    let path = target.path.split('?').next().unwrap_or_default();
    // Cloudflare sets cf-ray on every request: the key to find this line again.
    let ray = headers
        .iter()
        .find(|(n, _)| n.eq_ignore_ascii_case("cf-ray"))
        .map(|(_, v)| v.as_str())
        .filter(|v| v.len() <= 64 && v.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-'))
        .unwrap_or("-");
    let issuer = decision
        .issuer
        .as_deref()
        .map(|kid| format!(" issuer={kid}"))
        .unwrap_or_default();
    // `ray=` stays last: it is what a line is found by.
    console_log!(
        "tokengate status={} reason={} rule={} subject={} token_id={}{} method={} path={} ray={}",
        decision.status(),
        decision.reason,
        decision.rule.as_deref().unwrap_or("-"),
        decision.subject.as_deref().unwrap_or("-"),
        decision.token_id.as_deref().unwrap_or("-"),
        issuer,
        method.escape_debug(),
        path.escape_debug(),
        ray,
    );
}

pub fn denial_response(denial: &Denial) -> Result<Response> {
    let headers = worker::Headers::new();
    for (name, value) in &denial.headers {
        headers.set(name, value)?;
    }
    headers.set("cache-control", "no-store")?;
    Ok(Response::builder()
        .with_status(denial.status)
        .with_headers(headers)
        .fixed(denial.body.clone().into_bytes()))
}

/// Sends an allowed request on to the origin: the core's path, its header removals (spoofed
/// `x-tokengate-*`, the credential) and identity headers; the body streams through.
async fn forward(
    req: Request,
    origin: &str,
    decision: &Decision,
    target: &Target,
) -> Result<Response> {
    let path = decision.rewrite_path.as_deref().unwrap_or(&target.path);
    let url = format!("{}{path}", origin.trim_end_matches('/'));
    let inner = req.inner();
    let upstream_headers = web_sys::Headers::new_with_headers(&inner.headers())?;
    for name in &decision.remove_headers {
        upstream_headers.delete(name)?;
    }
    for (name, value) in &decision.add_headers {
        upstream_headers.set(name, value)?;
    }
    let init = web_sys::RequestInit::new();
    init.set_method(&inner.method());
    init.set_headers(&upstream_headers);
    if let Some(body) = inner.body() {
        init.set_body(&body);
    }
    // The origin's redirects go back to the client as they are; following them here would
    // carry the identity headers to wherever they point.
    init.set_redirect(web_sys::RequestRedirect::Manual);
    let upstream = web_sys::Request::new_with_str_and_init(&url, &init)?;
    match Fetch::Request(upstream.into()).send().await {
        Ok(response) => Ok(response),
        Err(e) => {
            console_error!("tokengate: origin fetch failed: {e}");
            json_error(502, "bad_gateway", "the origin could not be reached", &[])
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_split_into_authority_and_path() {
        let t = split_url("https://api.internal:8443/a/b?x=1#frag");
        assert_eq!(t.authority, "api.internal:8443");
        assert_eq!(t.path, "/a/b?x=1");
        assert_eq!(split_url("http://h").path, "/");
        assert_eq!(split_url("http://h?q=1").path, "/?q=1");
        assert_eq!(split_url("http://h/%2e%2e/x").path, "/%2e%2e/x");
    }

    #[test]
    fn joined_header_values_are_split_back_into_pairs() {
        let joined = vec![
            ("authorization".to_owned(), "Bearer a, Bearer b".to_owned()),
            ("x-internal-token".to_owned(), "abc".to_owned()),
        ];
        let pairs = header_pairs(joined.into_iter());
        assert_eq!(
            pairs,
            vec![
                ("authorization".to_owned(), "Bearer a".to_owned()),
                ("authorization".to_owned(), "Bearer b".to_owned()),
                ("x-internal-token".to_owned(), "abc".to_owned()),
            ]
        );
    }
}
