//! The decision: what the gate does with one request.
//!
//! Order: normalise the path (400), find the first matching rule (none: 403), public rules
//! pass, then the credential (400 when several, 401 when none or invalid), then scopes (403).
//! Whatever the outcome, every inbound `x-tokengate-*` header is removed, and so is the
//! credential unless the bundle says to forward it.

use core::fmt;

use crate::bundle::Gate;
use crate::credentials::{self, Found};
use crate::policy::{self, Access};
use crate::token::{self, Shape, TokenHash, MAX_TOKEN_LEN};

/// The identity headers the upstream receives; any inbound header with this prefix is removed.
pub const HEADER_PREFIX: &str = "x-tokengate-";
/// The token name.
pub const SUBJECT_HEADER: &str = "x-tokengate-subject";
/// The token's scopes, space separated.
pub const SCOPES_HEADER: &str = "x-tokengate-scopes";
/// The token's public id.
pub const TOKEN_ID_HEADER: &str = "x-tokengate-token-id";
/// Seconds a client should wait after a 503.
pub const RETRY_AFTER_SECONDS: u32 = 5;

const REALM: &str = "Bearer realm=\"tokengate\"";
const INVALID_TOKEN_DESCRIPTION: &str = "the service token is not valid";

/// One request, as the host hands it over. Header names are compared case-insensitively.
#[derive(Debug, Clone, Copy)]
pub struct Request<'a> {
    /// The method, as sent (methods are case-sensitive).
    pub method: &'a str,
    /// The raw path including any query (`:path`).
    pub path: &'a str,
    /// The `:authority` / `Host`.
    pub authority: &'a str,
    /// Every header pair, repeats included.
    pub headers: &'a [(String, String)],
}

/// Pass or not.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// The request goes on to the upstream.
    Allow,
    /// The gate answers itself.
    Deny,
}

/// The precise reason, for logs and metrics only: clients see only the generic response.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Reason {
    /// A public rule matched.
    Public,
    /// A valid token with sufficient scopes.
    Valid,
    /// No rule matched: fail closed.
    NoRule,
    /// No credential on a protected route.
    NoCredential,
    /// More than one credential.
    SeveralCredentials,
    /// The path cannot be normalised safely.
    BadPath,
    /// The credential is empty.
    Empty,
    /// The credential exceeds the length limit (not hashed).
    TooLong,
    /// The credential holds whitespace, control or non-ASCII characters.
    Malformed,
    /// Tokengate shape, failing checksum (no lookup).
    Checksum,
    /// No record has this hash.
    Unknown,
    /// The record is revoked.
    Revoked,
    /// Created at or before the revoke-all cut-off.
    RevokedAll,
    /// Before `not_before`.
    NotYetValid,
    /// At or after `expires_at`.
    Expired,
    /// Replaced by rotation and past its grace.
    RotationGraceOver,
    /// Valid token, scopes missing.
    InsufficientScope,
    /// No bundle loaded yet.
    NoBundle,
    /// The gate itself failed.
    Internal,
}

impl Reason {
    /// Every reason, for hosts that define one counter each up front.
    pub const ALL: [Reason; 19] = [
        Self::Public,
        Self::Valid,
        Self::NoRule,
        Self::NoCredential,
        Self::SeveralCredentials,
        Self::BadPath,
        Self::Empty,
        Self::TooLong,
        Self::Malformed,
        Self::Checksum,
        Self::Unknown,
        Self::Revoked,
        Self::RevokedAll,
        Self::NotYetValid,
        Self::Expired,
        Self::RotationGraceOver,
        Self::InsufficientScope,
        Self::NoBundle,
        Self::Internal,
    ];

    /// A stable snake_case name, used in metrics, logs and the conformance vectors.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Public => "public",
            Self::Valid => "valid",
            Self::NoRule => "no_rule",
            Self::NoCredential => "no_credential",
            Self::SeveralCredentials => "several_credentials",
            Self::BadPath => "bad_path",
            Self::Empty => "empty",
            Self::TooLong => "too_long",
            Self::Malformed => "malformed",
            Self::Checksum => "checksum",
            Self::Unknown => "unknown",
            Self::Revoked => "revoked",
            Self::RevokedAll => "revoked_all",
            Self::NotYetValid => "not_yet_valid",
            Self::Expired => "expired",
            Self::RotationGraceOver => "rotation_grace_over",
            Self::InsufficientScope => "insufficient_scope",
            Self::NoBundle => "no_bundle",
            Self::Internal => "internal",
        }
    }

    /// Whether requests with this reason pass.
    pub fn outcome(self) -> Outcome {
        match self {
            Self::Public | Self::Valid => Outcome::Allow,
            _ => Outcome::Deny,
        }
    }
}

impl fmt::Display for Reason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The response the gate sends instead of forwarding.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Denial {
    /// HTTP status.
    pub status: u16,
    /// Response headers (`www-authenticate`, `retry-after`, `content-type`).
    pub headers: Vec<(&'static str, String)>,
    /// The JSON error body.
    pub body: String,
}

/// Everything a host needs to act on one request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decision {
    /// Pass or deny.
    pub outcome: Outcome,
    /// The precise reason (logs and metrics only).
    pub reason: Reason,
    /// The rule that matched, if any.
    pub rule: Option<String>,
    /// The token's name, when one was identified (also on denials after identification).
    pub subject: Option<String>,
    /// The token's public id, when one was identified.
    pub token_id: Option<String>,
    /// On deny: the response to send.
    pub denial: Option<Denial>,
    /// Request headers to remove before forwarding (lower case, every value).
    pub remove_headers: Vec<String>,
    /// Request headers to set before forwarding.
    pub add_headers: Vec<(&'static str, String)>,
    /// The `:path` to forward when it differs from the one received (normalised, query
    /// credentials removed).
    pub rewrite_path: Option<String>,
}

impl Decision {
    fn deny(reason: Reason, denial: Denial, remove_headers: Vec<String>) -> Self {
        Self {
            outcome: Outcome::Deny,
            reason,
            rule: None,
            subject: None,
            token_id: None,
            denial: Some(denial),
            remove_headers,
            add_headers: Vec::new(),
            rewrite_path: None,
        }
    }

    /// The status the client sees: the denial's, or 200 when forwarded.
    pub fn status(&self) -> u16 {
        self.denial.as_ref().map_or(200, |d| d.status)
    }
}

fn error_body(error: &str, description: &str) -> String {
    serde_json::json!({ "error": error, "error_description": description }).to_string()
}

fn denial(status: u16, www_authenticate: Option<String>, error: &str, description: &str) -> Denial {
    let mut headers = vec![("content-type", "application/json".to_owned())];
    if let Some(value) = www_authenticate {
        headers.push(("www-authenticate", value));
    }
    if status == 503 {
        headers.push(("retry-after", RETRY_AFTER_SECONDS.to_string()));
    }
    Denial {
        status,
        headers,
        body: error_body(error, description),
    }
}

fn invalid_token() -> Denial {
    denial(
        401,
        Some(format!("{REALM}, error=\"invalid_token\"")),
        "invalid_token",
        INVALID_TOKEN_DESCRIPTION,
    )
}

/// The decision when no bundle is loaded or the gate failed: 503, fail closed.
pub fn unavailable(reason: Reason) -> Decision {
    Decision::deny(
        reason,
        denial(
            503,
            None,
            "temporarily_unavailable",
            "the gate cannot decide right now; retry later",
        ),
        Vec::new(),
    )
}

impl Gate {
    /// Decides one request at `now` (unix seconds).
    pub fn decide(&self, request: &Request<'_>, now: u64) -> Decision {
        let mut remove: Vec<String> = request
            .headers
            .iter()
            .map(|(name, _)| name.to_ascii_lowercase())
            .filter(|name| name.starts_with(HEADER_PREFIX))
            .collect();
        if !self.forward_credential {
            for source in &self.sources {
                if let Some(name) = source.header_name() {
                    let carried = request.headers.iter().any(|(n, v)| {
                        n.eq_ignore_ascii_case(name)
                            && (name != "authorization" || credentials::is_bearer(v))
                    });
                    if carried {
                        remove.push(name.to_owned());
                    }
                }
            }
        }
        remove.sort();
        remove.dedup();

        let (raw_path, query) = match request.path.split_once('?') {
            Some((path, query)) => (path, Some(query.split('#').next().unwrap_or_default())),
            None => (request.path, None),
        };
        let path = match policy::normalize_path(raw_path) {
            Ok(path) => path,
            Err(problem) => {
                let d = denial(
                    400,
                    Some(format!("{REALM}, error=\"invalid_request\"")),
                    "invalid_request",
                    &format!("the request path cannot be normalised safely: {problem}"),
                );
                return Decision::deny(Reason::BadPath, d, remove);
            }
        };
        let host = policy::host_of(request.authority);
        let Some(rule) = self
            .policy
            .rules
            .iter()
            .find(|rule| rule.matches(request.method, &host, &path))
        else {
            let d = denial(
                403,
                None,
                "access_denied",
                "no route policy allows this request",
            );
            return Decision::deny(Reason::NoRule, d, remove);
        };
        let rewrite_path = self.forwarded_path(request.path, &path, query);
        let with_rule = |mut decision: Decision| {
            decision.rule = Some(rule.name.clone());
            decision.rewrite_path = rewrite_path.clone();
            decision
        };

        if rule.access == Access::Public {
            return with_rule(Decision {
                outcome: Outcome::Allow,
                reason: Reason::Public,
                rule: None,
                subject: None,
                token_id: None,
                denial: None,
                remove_headers: remove,
                add_headers: Vec::new(),
                rewrite_path: None,
            });
        }

        let value = match credentials::find(&self.sources, request.headers, query) {
            Found::None => {
                let d = denial(
                    401,
                    Some(REALM.to_owned()),
                    "missing_token",
                    "a service token is required",
                );
                return with_rule(Decision::deny(Reason::NoCredential, d, remove));
            }
            Found::Several => {
                let d = denial(
                    400,
                    Some(format!("{REALM}, error=\"invalid_request\"")),
                    "invalid_request",
                    "the request carries more than one credential",
                );
                return with_rule(Decision::deny(Reason::SeveralCredentials, d, remove));
            }
            Found::One { value, .. } => value,
        };

        let (index, reason) = match self.identify(value, now) {
            Ok(index) => (index, None),
            Err((index, reason)) => (index.unwrap_or(u32::MAX), Some(reason)),
        };
        let record = self.records.get(index as usize);
        if let Some(reason) = reason {
            let mut decision = with_rule(Decision::deny(reason, invalid_token(), remove));
            decision.subject = record.map(|r| r.name.clone());
            decision.token_id = record.map(|r| r.token_id.clone());
            return decision;
        }
        let Some(record) = record else {
            return unavailable(Reason::Internal);
        };
        if let Some(missing) = policy::missing_scopes(rule, &record.scopes) {
            let needed = missing.join(" ");
            let d = denial(
                403,
                Some(format!(
                    "{REALM}, error=\"insufficient_scope\", scope=\"{needed}\""
                )),
                "insufficient_scope",
                &format!("the service token lacks a required scope: {needed}"),
            );
            let mut decision = with_rule(Decision::deny(Reason::InsufficientScope, d, remove));
            decision.subject = Some(record.name.clone());
            decision.token_id = Some(record.token_id.clone());
            return decision;
        }
        with_rule(Decision {
            outcome: Outcome::Allow,
            reason: Reason::Valid,
            rule: None,
            subject: Some(record.name.clone()),
            token_id: Some(record.token_id.clone()),
            denial: None,
            remove_headers: remove,
            add_headers: vec![
                (SUBJECT_HEADER, record.name.clone()),
                (SCOPES_HEADER, record.scopes_header.clone()),
                (TOKEN_ID_HEADER, record.token_id.clone()),
            ],
            rewrite_path: None,
        })
    }

    /// Finds the record for a credential and checks its lifetime. On failure, the record's
    /// index when one was found, for logs.
    fn identify(&self, value: &str, now: u64) -> Result<u32, (Option<u32>, Reason)> {
        if value.is_empty() {
            return Err((None, Reason::Empty));
        }
        if value.len() > MAX_TOKEN_LEN {
            return Err((None, Reason::TooLong));
        }
        if !value.bytes().all(|b| b.is_ascii_graphic()) {
            return Err((None, Reason::Malformed));
        }
        if token::shape(value) == Shape::TokengateBadChecksum {
            return Err((None, Reason::Checksum));
        }
        let hash = TokenHash::of(value.as_bytes());
        let index = *self.index.get(&hash.0).ok_or((None, Reason::Unknown))?;
        let record = self
            .records
            .get(index as usize)
            .ok_or((None, Reason::Unknown))?;
        let fail = |reason| Err((Some(index), reason));
        if record.revoked {
            return fail(Reason::Revoked);
        }
        if self
            .revoke_all_at
            .is_some_and(|cutoff| record.created_at <= cutoff)
        {
            return fail(Reason::RevokedAll);
        }
        if record.not_before.is_some_and(|nb| now < nb) {
            return fail(Reason::NotYetValid);
        }
        if record.expires_at.is_some_and(|exp| now >= exp) {
            return fail(Reason::Expired);
        }
        if record.grace_until.is_some_and(|end| now >= end) {
            return fail(Reason::RotationGraceOver);
        }
        Ok(index)
    }

    /// The path to forward: the normalised one, with query credentials removed.
    fn forwarded_path(&self, raw: &str, normalised: &str, query: Option<&str>) -> Option<String> {
        let query = query.map(|q| credentials::strip_query_credentials(q, &self.sources));
        let mut forwarded = normalised.to_owned();
        if let Some(query) = query.filter(|q| !q.is_empty()) {
            forwarded.push('?');
            forwarded.push_str(&query);
        }
        (forwarded != raw).then_some(forwarded)
    }
}
