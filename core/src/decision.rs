//! The decision: what the gate does with one request.
//!
//! Order: normalise the path (400), find the first matching rule (none: 403), public rules
//! pass, then the credential (400 when several, 401 when none or invalid), then scopes (403).
//! Whatever the outcome, every inbound `x-tokengate-*` header is removed, and so is the
//! credential unless the bundle says to forward it.

use core::fmt;
use std::borrow::Cow;

use crate::access::{self, Assertion, KeyCheck};
use crate::credentials::{self, Found};
use crate::gate::{Gate, Record};
use crate::issuer::{IssuerSecrets, Refusal};
use crate::jwt;
use crate::policy::{self, Access};
use crate::rate::Limit;
use crate::token::{self, Shape, TokenHash, MAX_TOKEN_LEN};

/// The identity headers the upstream receives; any inbound header with this prefix is removed.
pub const HEADER_PREFIX: &str = "x-tokengate-";

/// Whether an inbound header is one of ours, or would be read as one: the name, any case,
/// with `_` read as `-` (CGI, WSGI, PHP and Rack origins turn both into `HTTP_X_TOKENGATE_…`).
pub fn is_identity_header(name: &str) -> bool {
    name.len() >= HEADER_PREFIX.len()
        && name
            .bytes()
            .zip(HEADER_PREFIX.bytes())
            .all(|(got, want)| got.to_ascii_lowercase() == want || (got == b'_' && want == b'-'))
}
/// The token name.
pub const SUBJECT_HEADER: &str = "x-tokengate-subject";
/// The token's scopes, space separated.
pub const SCOPES_HEADER: &str = "x-tokengate-scopes";
/// The token's public id (a signed token's `jti`).
pub const TOKEN_ID_HEADER: &str = "x-tokengate-token-id";
/// The issuer (kid) of a signed token; set only for signed tokens.
pub const ISSUER_HEADER: &str = "x-tokengate-issuer";
/// How a Cloudflare Access identity was established (`email` or `service_token`); set only
/// for Access identities, which carry no token id.
pub const ACCESS_HEADER: &str = "x-tokengate-access";
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
    pub headers: &'a [(&'a str, &'a str)],
}

/// Borrows owned header pairs as a [`Request`] takes them.
pub fn header_refs(headers: &[(String, String)]) -> Vec<(&str, &str)> {
    headers
        .iter()
        .map(|(name, value)| (name.as_str(), value.as_str()))
        .collect()
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
    /// A valid Cloudflare Access assertion on a `cf_access` rule.
    Access,
    /// A Cloudflare Access assertion that failed a check (alg, kid, signature, iss, aud, exp,
    /// nbf, subject).
    AccessInvalid,
    /// A valid token over the rate limit of its rule or its own.
    RateLimited,
    /// A valid signed token (JWT) of a trusted issuer with sufficient scopes.
    Signed,
    /// A signed token that is malformed, has the wrong `alg` for its issuer, a bad signature,
    /// or a missing or unusable claim.
    JwtInvalid,
    /// A signed token whose `kid` names no issuer of the bundle.
    UnknownIssuer,
    /// A signed token with a scope or lifetime beyond its issuer's grant.
    BeyondGrant,
    /// A signed token of an HS256 issuer whose secret the gate was not given (503).
    IssuerUnavailable,
}

impl Reason {
    /// Every reason, for hosts that define one counter each up front.
    pub const ALL: [Reason; 27] = [
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
        Self::Access,
        Self::AccessInvalid,
        Self::RateLimited,
        Self::Signed,
        Self::JwtInvalid,
        Self::UnknownIssuer,
        Self::BeyondGrant,
        Self::IssuerUnavailable,
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
            Self::Access => "access",
            Self::AccessInvalid => "access_invalid",
            Self::RateLimited => "rate_limited",
            Self::Signed => "signed",
            Self::JwtInvalid => "jwt_invalid",
            Self::UnknownIssuer => "unknown_issuer",
            Self::BeyondGrant => "beyond_grant",
            Self::IssuerUnavailable => "issuer_unavailable",
        }
    }

    /// The counter a gate keeps for this reason, `allowed.<reason>` or `denied.<reason>`
    /// (each host puts its prefix before it: `tokengate.`, `wasmcustom.tokengate.`).
    pub fn counter_name(self) -> String {
        let outcome = match self.outcome() {
            Outcome::Allow => "allowed",
            Outcome::Deny => "denied",
        };
        format!("{outcome}.{}", self.as_str())
    }

    /// Its position in [`Reason::ALL`], where a host keeps its counter ids in that order.
    pub fn index(self) -> Option<usize> {
        Self::ALL.iter().position(|r| *r == self)
    }

    /// Whether requests with this reason pass.
    pub fn outcome(self) -> Outcome {
        match self {
            Self::Public | Self::Valid | Self::Access | Self::Signed => Outcome::Allow,
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
    /// The token's public id (a signed token's `jti`), when one was identified.
    pub token_id: Option<String>,
    /// The issuer's kid, when a signed token was identified.
    pub issuer: Option<String>,
    /// On deny: the response to send.
    pub denial: Option<Denial>,
    /// Request headers to remove before forwarding (lower case, every value).
    pub remove_headers: Vec<String>,
    /// Request headers to set before forwarding.
    pub add_headers: Vec<(&'static str, String)>,
    /// The `:path` to forward when it differs from the one received (normalised, query
    /// credentials removed).
    pub rewrite_path: Option<String>,
    /// On an Allow: the rate limits the host must charge, in order, before forwarding
    /// ([`crate::rate::enforce`]). Until they are charged the decision is not forwarded.
    pub rate_limits: Vec<Limit>,
}

impl Decision {
    fn deny(reason: Reason, denial: Denial, remove_headers: Vec<String>) -> Self {
        Self {
            outcome: Outcome::Deny,
            reason,
            rule: None,
            subject: None,
            token_id: None,
            issuer: None,
            denial: Some(denial),
            remove_headers,
            add_headers: Vec::new(),
            rewrite_path: None,
            rate_limits: Vec::new(),
        }
    }

    /// `reason=<reason> subject=<name> token_id=<id> rule=<rule>`, `-` for what is absent,
    /// then ` issuer=<kid>` for a signed token: what a host logs about a request (never the
    /// credential). Names, subjects, ids and kids are visible ASCII without spaces, so fields
    /// need no quoting and `reason=` always comes first.
    pub fn log_fields(&self) -> String {
        let mut fields = format!(
            "reason={} subject={} token_id={} rule={}",
            self.reason,
            self.subject.as_deref().unwrap_or("-"),
            self.token_id.as_deref().unwrap_or("-"),
            self.rule.as_deref().unwrap_or("-")
        );
        if let Some(kid) = &self.issuer {
            fields.push_str(" issuer=");
            fields.push_str(kid);
        }
        fields
    }

    /// The status the client sees: the denial's, or 200 when forwarded.
    pub fn status(&self) -> u16 {
        self.refusal().map_or(200, |d| d.status)
    }

    /// What the host answers instead of forwarding. Only an Allow whose rate limit, if any,
    /// was charged forwards (`None`); any other outcome answers its denial, or a 503 should
    /// it carry none: fail closed.
    pub fn refusal(&self) -> Option<Cow<'_, Denial>> {
        match (self.outcome, &self.denial) {
            (Outcome::Allow, None) if self.rate_limits.is_empty() => None,
            (Outcome::Deny, Some(denial)) => Some(Cow::Borrowed(denial)),
            _ => Some(Cow::Owned(internal_error())),
        }
    }
}

/// The 503 of a decision that is not what its outcome says (never made by the core).
fn internal_error() -> Denial {
    denial(
        503,
        None,
        "temporarily_unavailable",
        "the gate cannot decide right now; retry later",
    )
}

pub(crate) fn error_body(error: &str, description: &str) -> String {
    // Two string members: serialising the strings alone keeps `serde_json::Value` (and its
    // code) out of the filter.
    let quote = |text: &str| serde_json::to_string(text).unwrap_or_default();
    format!(
        "{{\"error\":{},\"error_description\":{}}}",
        quote(error),
        quote(description)
    )
}

pub(crate) fn denial(
    status: u16,
    www_authenticate: Option<String>,
    error: &str,
    description: &str,
) -> Denial {
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

fn bad_request(description: &str) -> Denial {
    denial(
        400,
        Some(format!("{REALM}, error=\"invalid_request\"")),
        "invalid_request",
        description,
    )
}

fn insufficient_scope(needed: &str, description: &str) -> Denial {
    denial(
        403,
        Some(format!(
            "{REALM}, error=\"insufficient_scope\", scope=\"{needed}\""
        )),
        "insufficient_scope",
        description,
    )
}

fn invalid_token() -> Denial {
    denial(
        401,
        Some(format!("{REALM}, error=\"invalid_token\"")),
        "invalid_token",
        INVALID_TOKEN_DESCRIPTION,
    )
}

/// What the upstream is told of an allowed token: its subject, its id and its scopes. No
/// scopes, no header: Envoy 1.40's dynamic-module `set_header` removes a header given an empty
/// value (observed), and every target must forward the same headers. A client's own copy is
/// removed regardless.
fn identity_headers(
    subject: String,
    token_id: String,
    scopes: &str,
) -> Vec<(&'static str, String)> {
    let mut headers = vec![(SUBJECT_HEADER, subject), (TOKEN_ID_HEADER, token_id)];
    if !scopes.is_empty() {
        headers.push((SCOPES_HEADER, scopes.to_owned()));
    }
    headers
}

/// The decision when no bundle is loaded or the gate failed: 503, fail closed.
pub fn unavailable(reason: Reason) -> Decision {
    Decision::deny(reason, internal_error(), Vec::new())
}

/// The first half of a decision: either final already, or waiting for the record of one
/// token hash. Hosts that keep tokens elsewhere (the Worker's KV) look the hash up
/// themselves and call [`Gate::finish`]; nothing else is decided outside the core.
#[derive(Debug)]
pub enum Step<'g> {
    /// Decided without a lookup (public route, bad request, no credential, bad checksum, …).
    Done(Decision),
    /// A well-formed credential: its record is needed.
    Lookup(Pending<'g>),
    /// No token credential but a parsed Cloudflare Access assertion on a `cf_access` rule:
    /// the host checks its signature and calls [`Gate::finish_access`].
    Access(AccessPending<'g>),
}

/// A decision waiting for the host's signature check of a Cloudflare Access assertion.
#[derive(Debug)]
pub struct AccessPending<'g> {
    /// The parsed assertion: the host needs its `kid`, signed bytes and signature.
    pub assertion: Assertion,
    settings: &'g access::Settings,
    rule: &'g policy::Rule,
    remove: Vec<String>,
    rewrite_path: Option<String>,
}

impl AccessPending<'_> {
    /// The bundle's Access settings (the host fetches team keys from their certs URL).
    pub fn settings(&self) -> &access::Settings {
        self.settings
    }
}

/// A decision waiting for the record of [`Pending::hash`].
#[derive(Debug, Clone)]
pub struct Pending<'g> {
    /// The SHA-256 of the presented credential: the lookup key.
    pub hash: TokenHash,
    rule: &'g policy::Rule,
    remove: Vec<String>,
    rewrite_path: Option<String>,
    tokengate_shaped: bool,
}

impl Pending<'_> {
    /// Whether a record can exist for this credential in a token set that holds no imported
    /// secrets: only a tokengate-shaped credential can match a tokengate token, so a host
    /// that knows the set has none may `finish` any other with no record and no lookup.
    pub fn may_match(&self, imported_secrets: bool) -> bool {
        imported_secrets || self.tokengate_shaped
    }
}

impl Gate {
    /// Decides one request at `now` (unix seconds), with the gate's own token records.
    pub fn decide(&self, request: &Request<'_>, now: u64) -> Decision {
        match self.begin(request, now) {
            Step::Done(decision) => decision,
            Step::Lookup(pending) => {
                let record = self.record(&pending.hash);
                self.finish(pending, record, now)
            }
            // `begin` passes no Access settings, so this cannot happen; if it did, no key
            // could have been checked: fail closed. (Not calling `finish_access` here keeps
            // the Access code out of hosts that never verify assertions, like the filter.)
            Step::Access(_) => unavailable(Reason::Internal),
        }
    }

    /// The record for a hash, O(1).
    pub fn record(&self, hash: &TokenHash) -> Option<&Record> {
        self.index.get(&self.records, &hash.0)
    }

    /// Everything up to the lookup at `now`: path, rule, credential, shape and checksum; a
    /// signed token is decided whole.
    pub fn begin(&self, request: &Request<'_>, now: u64) -> Step<'_> {
        self.begin_with_access(request, None, now)
    }

    /// [`Gate::begin`] for a host that can verify Cloudflare Access assertions (the Worker):
    /// with `access` set, a request on a `cf_access` rule that carries no token credential but
    /// one `Cf-Access-Jwt-Assertion` becomes [`Step::Access`].
    // Inlined so that `begin`'s `None` removes the Access branch (and its JWT parser) from
    // hosts that never verify assertions.
    #[inline(always)]
    pub fn begin_with_access<'g>(
        &'g self,
        request: &Request<'_>,
        access: Option<&'g access::Settings>,
        now: u64,
    ) -> Step<'g> {
        // Allocates only for the (rare) headers it removes: this runs on every request.
        let mut remove: Vec<String> = request
            .headers
            .iter()
            .filter(|(name, _)| is_identity_header(name))
            .map(|(name, _)| name.to_ascii_lowercase())
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
                let d = bad_request(&format!(
                    "the request path cannot be normalised safely: {problem}"
                ));
                return Step::Done(Decision::deny(Reason::BadPath, d, remove));
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
            return Step::Done(Decision::deny(Reason::NoRule, d, remove));
        };
        let rewrite_path = self.forwarded_path(request.path, &path, query);
        let done = |mut decision: Decision| {
            decision.rule = Some(rule.name.clone());
            decision.rewrite_path = rewrite_path.clone();
            Step::Done(decision)
        };

        if rule.access == Access::Public {
            return done(Decision {
                outcome: Outcome::Allow,
                reason: Reason::Public,
                rule: None,
                subject: None,
                token_id: None,
                issuer: None,
                denial: None,
                remove_headers: remove,
                add_headers: Vec::new(),
                rewrite_path: None,
                rate_limits: Vec::new(),
            });
        }

        let value = match credentials::find(&self.sources, request.headers, query) {
            Found::None => {
                if let Some(settings) = access.filter(|_| rule.cf_access) {
                    let mut assertions = request
                        .headers
                        .iter()
                        .filter(|(n, _)| n.eq_ignore_ascii_case(access::ASSERTION_HEADER));
                    if let Some((_, jwt)) = assertions.next() {
                        if assertions.next().is_some() {
                            let d =
                                bad_request("the request carries more than one Access assertion");
                            return done(Decision::deny(Reason::SeveralCredentials, d, remove));
                        }
                        return match Assertion::parse(jwt.trim_matches([' ', '\t'])) {
                            Ok(assertion) => Step::Access(AccessPending {
                                assertion,
                                settings,
                                rule,
                                remove,
                                rewrite_path,
                            }),
                            Err(_) => done(Decision::deny(
                                Reason::AccessInvalid,
                                invalid_token(),
                                remove,
                            )),
                        };
                    }
                }
                let d = denial(
                    401,
                    Some(REALM.to_owned()),
                    "missing_token",
                    "a service token is required",
                );
                return done(Decision::deny(Reason::NoCredential, d, remove));
            }
            Found::Several => {
                let d = bad_request("the request carries more than one credential");
                return done(Decision::deny(Reason::SeveralCredentials, d, remove));
            }
            Found::One { value, .. } => value,
        };
        if jwt::looks_like(value) {
            return done(self.signed_token(value, rule, remove, now));
        }
        let mut shape = Shape::Other;
        let unreadable = if value.is_empty() {
            Some(Reason::Empty)
        } else if value.len() > MAX_TOKEN_LEN {
            Some(Reason::TooLong)
        } else if !value.bytes().all(|b| b.is_ascii_graphic()) {
            Some(Reason::Malformed)
        } else {
            shape = token::shape(value);
            (shape == Shape::TokengateBadChecksum).then_some(Reason::Checksum)
        };
        if let Some(reason) = unreadable {
            return done(Decision::deny(reason, invalid_token(), remove));
        }
        Step::Lookup(Pending {
            hash: TokenHash::of(value.as_bytes()),
            rule,
            remove,
            rewrite_path,
            tokengate_shaped: shape == Shape::Tokengate,
        })
    }

    /// Completes a decision for a token whose record a pending push changes: allowed only
    /// if the record served and every record the push brings (`None`: the push drops it)
    /// allow it, and then forwarded with what all of them grant, no more. So a revocation,
    /// an earlier expiry, fewer scopes or a removal holds from the moment the push carries
    /// it, and nothing the push grants holds before it is committed.
    pub fn finish_changing(
        &self,
        pending: Pending<'_>,
        served: Option<&Record>,
        incoming: &[Option<Record>],
        now: u64,
    ) -> Decision {
        let served_decision = self.finish(pending.clone(), served, now);
        if served_decision.outcome != Outcome::Allow {
            return served_decision;
        }
        for record in incoming {
            let decision = self.finish(pending.clone(), record.as_ref(), now);
            if decision.outcome != Outcome::Allow {
                return decision;
            }
        }
        let Some(served) = served else {
            return served_decision;
        };
        let meet = incoming
            .iter()
            .flatten()
            .fold(served.clone(), |acc, record| acc.meet(record));
        self.finish(pending, Some(&meet), now)
    }

    /// Completes a decision with the record found for `pending.hash` (or `None`).
    pub fn finish(&self, pending: Pending<'_>, record: Option<&Record>, now: u64) -> Decision {
        let Pending {
            hash,
            rule,
            remove,
            rewrite_path,
            ..
        } = pending;
        let base = |outcome, reason, denial, remove_headers| Decision {
            outcome,
            reason,
            rule: Some(rule.name.clone()),
            subject: None,
            token_id: None,
            issuer: None,
            denial,
            remove_headers,
            add_headers: Vec::new(),
            rewrite_path: rewrite_path.clone(),
            rate_limits: Vec::new(),
        };
        // A record from outside the gate (KV) must be the one asked for.
        let Some(record) = record.filter(|r| r.hash == hash) else {
            return base(
                Outcome::Deny,
                Reason::Unknown,
                Some(invalid_token()),
                remove,
            );
        };
        let identified = |mut decision: Decision| {
            decision.subject = Some(record.name.to_string());
            decision.token_id = Some(record.hash.token_id());
            decision
        };
        if let Some(reason) = self.lifetime_failure(record, now) {
            return identified(base(Outcome::Deny, reason, Some(invalid_token()), remove));
        }
        if let Some(missing) = policy::missing_scopes(rule, &record.scopes.list) {
            let needed = missing.join(" ");
            let d = insufficient_scope(
                &needed,
                &format!("the service token lacks a required scope: {needed}"),
            );
            return identified(base(
                Outcome::Deny,
                Reason::InsufficientScope,
                Some(d),
                remove,
            ));
        }
        let mut decision = identified(base(Outcome::Allow, Reason::Valid, None, remove));
        decision.rate_limits =
            Limit::of(&rule.name, rule.rate_limit, &record.name, record.rate_limit);
        decision.add_headers = identity_headers(
            decision.subject.clone().unwrap_or_default(),
            decision.token_id.clone().unwrap_or_default(),
            &record.scopes.header,
        );
        decision
    }

    /// Completes a Cloudflare Access decision with the host's verdict on the key and the
    /// signature: the claims are checked here, then the rule's scopes (an Access identity
    /// holds none, so only rules without required scopes pass).
    pub fn finish_access(&self, pending: AccessPending<'_>, key: KeyCheck, now: u64) -> Decision {
        let AccessPending {
            assertion,
            settings,
            rule,
            remove,
            rewrite_path,
        } = pending;
        let base = |outcome, reason, denial| Decision {
            outcome,
            reason,
            rule: Some(rule.name.clone()),
            subject: None,
            token_id: None,
            issuer: None,
            denial,
            remove_headers: remove.clone(),
            add_headers: Vec::new(),
            rewrite_path: rewrite_path.clone(),
            rate_limits: Vec::new(),
        };
        let identity = match assertion.check(key, settings, now) {
            Ok(identity) => identity,
            Err(_) => return base(Outcome::Deny, Reason::AccessInvalid, Some(invalid_token())),
        };
        if let Some(missing) = policy::missing_scopes(rule, &[]) {
            let needed = missing.join(" ");
            let d = insufficient_scope(
                &needed,
                &format!("an Access identity holds no scopes; this route needs: {needed}"),
            );
            let mut decision = base(Outcome::Deny, Reason::InsufficientScope, Some(d));
            decision.subject = Some(identity.subject);
            return decision;
        }
        let mut decision = base(Outcome::Allow, Reason::Access, None);
        decision.add_headers = vec![
            (SUBJECT_HEADER, identity.subject.clone()),
            (ACCESS_HEADER, identity.kind.to_owned()),
        ];
        decision.subject = Some(identity.subject);
        decision
    }

    /// The whole decision for a signed token (no lookup: everything it needs is in the
    /// token and the bundle).
    fn signed_token(
        &self,
        token: &str,
        rule: &policy::Rule,
        remove: Vec<String>,
        now: u64,
    ) -> Decision {
        let none = IssuerSecrets::default();
        let secrets = self.issuer_secrets.as_ref().as_ref().unwrap_or(&none);
        let checked = self.issuers.check(token, secrets, self.revoke_all_at, now);
        let identity = match checked {
            Ok(identity) => identity,
            Err(refused) => {
                let (reason, denial) = match refused.refusal {
                    Refusal::NoSecret => (Reason::IssuerUnavailable, internal_error()),
                    Refusal::Invalid => (Reason::JwtInvalid, invalid_token()),
                    Refusal::UnknownIssuer => (Reason::UnknownIssuer, invalid_token()),
                    Refusal::BeyondGrant => (Reason::BeyondGrant, invalid_token()),
                    Refusal::Revoked => (Reason::Revoked, invalid_token()),
                    Refusal::RevokedAll => (Reason::RevokedAll, invalid_token()),
                    Refusal::NotYetValid => (Reason::NotYetValid, invalid_token()),
                    Refusal::Expired => (Reason::Expired, invalid_token()),
                };
                let mut decision = Decision::deny(reason, denial, remove);
                // A token refused after its signature verified names whom it refused, as a
                // stored token's record does; one whose kid named an issuer names that.
                decision.issuer = refused.kid;
                if let Some(identity) = refused.identity {
                    decision.subject = Some(identity.subject);
                    decision.token_id = Some(identity.jti);
                }
                return decision;
            }
        };
        let mut decision = Decision {
            outcome: Outcome::Allow,
            reason: Reason::Signed,
            rule: None,
            subject: Some(identity.subject.clone()),
            token_id: Some(identity.jti.clone()),
            issuer: Some(identity.issuer.clone()),
            denial: None,
            remove_headers: remove,
            add_headers: Vec::new(),
            rewrite_path: None,
            rate_limits: Vec::new(),
        };
        if let Some(missing) = policy::missing_scopes(rule, &identity.scopes) {
            let needed = missing.join(" ");
            decision.outcome = Outcome::Deny;
            decision.reason = Reason::InsufficientScope;
            decision.denial = Some(insufficient_scope(
                &needed,
                &format!("the signed token lacks a required scope: {needed}"),
            ));
            return decision;
        }
        // Keyed by subject: every token minted for one subject shares its budget.
        decision.rate_limits = Limit::of(&rule.name, rule.rate_limit, &identity.subject, None);
        decision.add_headers =
            identity_headers(identity.subject, identity.jti, &identity.scope_header);
        decision.add_headers.push((ISSUER_HEADER, identity.issuer));
        decision
    }

    fn lifetime_failure(&self, record: &Record, now: u64) -> Option<Reason> {
        // A revoke-all also marks every record revoked at the cut-off: those report the
        // revoke-all; a token revoked on its own before it keeps its own reason.
        let cut = self
            .revoke_all_at
            .filter(|&cutoff| record.created_at <= cutoff);
        if let Some(cutoff) = cut {
            return Some(match record.revoked_at {
                Some(at) if at < cutoff => Reason::Revoked,
                _ => Reason::RevokedAll,
            });
        }
        if record.revoked_at.is_some() {
            Some(Reason::Revoked)
        } else if record.not_before.is_some_and(|nb| now < nb) {
            Some(Reason::NotYetValid)
        } else if record.expires_at.is_some_and(|exp| now >= exp) {
            Some(Reason::Expired)
        } else if record.grace_until.is_some_and(|end| now >= end) {
            Some(Reason::RotationGraceOver)
        } else {
            None
        }
    }

    /// The path to forward: the normalised one, with query credentials removed.
    fn forwarded_path(&self, raw: &str, normalised: &str, query: Option<&str>) -> Option<String> {
        if query.is_none() && normalised == raw {
            return None;
        }
        let query = query.map(|q| credentials::strip_query_credentials(q, &self.sources));
        let mut forwarded = normalised.to_owned();
        if let Some(query) = query.filter(|q| !q.is_empty()) {
            forwarded.push('?');
            forwarded.push_str(&query);
        }
        (forwarded != raw).then_some(forwarded)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_an_allow_without_a_denial_forwards() {
        let allow = Decision {
            outcome: Outcome::Allow,
            reason: Reason::Valid,
            rule: None,
            subject: None,
            token_id: None,
            issuer: None,
            denial: None,
            remove_headers: Vec::new(),
            add_headers: Vec::new(),
            rewrite_path: None,
            rate_limits: Vec::new(),
        };
        assert!(allow.refusal().is_none());
        // An allow whose rate limit was never charged is not forwarded either.
        let uncharged = Decision {
            rate_limits: vec![Limit {
                key: "t/ci".into(),
                rate: "1/s".parse().unwrap(),
                policy: "token".into(),
            }],
            ..allow.clone()
        };
        assert_eq!(uncharged.refusal().map(|d| d.status), Some(503));
        assert_eq!(allow.status(), 200);
        // Neither a deny that lost its denial nor an allow that carries one forwards: both
        // answer, the first with the 503 of a gate that cannot decide.
        let bare_deny = Decision {
            outcome: Outcome::Deny,
            ..allow.clone()
        };
        assert_eq!(bare_deny.refusal().map(|d| d.status), Some(503));
        let contradictory = Decision {
            denial: Some(invalid_token()),
            ..allow.clone()
        };
        assert_eq!(contradictory.refusal().map(|d| d.status), Some(503));
        let deny = Decision::deny(Reason::Unknown, invalid_token(), Vec::new());
        assert_eq!(deny.refusal().map(|d| d.status), Some(401));
    }

    #[test]
    fn log_fields_name_a_signed_tokens_issuer_last() {
        let mut decision = Decision::deny(Reason::IssuerUnavailable, internal_error(), Vec::new());
        assert_eq!(
            decision.log_fields(),
            "reason=issuer_unavailable subject=- token_id=- rule=-"
        );
        decision.issuer = Some("legacy".into());
        assert_eq!(
            decision.log_fields(),
            "reason=issuer_unavailable subject=- token_id=- rule=- issuer=legacy"
        );
    }

    #[test]
    fn identity_headers_are_recognised_with_underscores_and_any_case() {
        for ours in [
            "x-tokengate-subject",
            "X_Tokengate_Scopes",
            "x-tokengate_token-id",
            "x_TOKENGATE_x",
        ] {
            assert!(is_identity_header(ours), "{ours}");
        }
        for other in [
            "x-tokengate",
            "x-tokengatesubject",
            "x.tokengate.subject",
            "y-tokengate-x",
            "authorization",
        ] {
            assert!(!is_identity_header(other), "{other}");
        }
    }
}
