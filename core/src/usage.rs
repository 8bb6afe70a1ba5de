//! Usage: what a gate counts per token, the signed read that collects it, and the report.
//!
//! A gate counts, per token id, the requests it allowed, the requests it denied for missing
//! scopes, and when it last saw the token ([`Tally::count`]: one map update, in memory; no
//! remote write per request). Counts only grow while the gate runs: a report is cumulative,
//! named by the gate's `instance` (fresh for every process or store), so whoever collects
//! them can merge any number of reports of one instance and count each request once.
//!
//! Reading them takes `GET /.well-known/tokengate/usage` with `Tokengate-Signature` by an
//! admin key over `tokengate.usage/v1\n<t>\n<environment>` ([`authorize`]): nobody else can
//! read usage, a read signed for another environment is refused, and so is one signed more
//! than five minutes away from the gate's clock. A report holds token ids and counts only:
//! no hash, no name, no secret.

use std::borrow::Cow;

use serde::{Deserialize, Serialize};

use crate::bundle::MAX_TOKENS;
use crate::decision::{denial, error_body, Decision, Denial, Reason, Request};
use crate::gate::LoadMap;
use crate::keys::KeySet;
use crate::signed::{self, SIGNATURE_HEADER, USAGE_CONTEXT};

/// Where a gate answers usage reads (exact path, before any policy).
pub const USAGE_PATH: &str = "/.well-known/tokengate/usage";
/// The `format` of a usage report.
pub const REPORT_FORMAT: &str = "tokengate.usage/v1";

/// The longest id a report holds: a token id, or `sub:` and the longest subject.
pub const MAX_ID_LEN: usize = 4 + crate::jwt::MAX_SUBJECT_LEN;

/// The id a report counts a signed token's subject under: `sub:<subject>` (no token id has
/// a colon).
pub fn subject_key(subject: &str) -> String {
    format!("{SUBJECT_PREFIX}{subject}")
}

/// What every [`subject_key`] starts with.
pub const SUBJECT_PREFIX: &str = "sub:";

/// One token's counts at one gate.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Counts {
    /// Requests allowed with the token.
    pub allowed: u64,
    /// Requests with the valid token denied for a missing scope.
    pub denied_scope: u64,
    /// Unix seconds of the last allowed or scope-denied request (0: never).
    pub last_seen: u64,
}

impl Counts {
    /// Adds `other` (counts sum, the later sighting wins).
    pub fn add(&mut self, other: &Counts) {
        self.allowed = self.allowed.saturating_add(other.allowed);
        self.denied_scope = self.denied_scope.saturating_add(other.denied_scope);
        self.last_seen = self.last_seen.max(other.last_seen);
    }
}

/// Per-token counts, by token id. Holds at most [`MAX_TOKENS`] tokens (every id counted is
/// one a bundle named): past that, a new id is not counted, so memory stays bounded.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Tally {
    /// Keyed by ids of tokens a signed bundle named, or subjects a trusted issuer signed
    /// (nobody else's choosing), so the gate's fast load hasher serves here too.
    tokens: LoadMap<Box<str>, Counts>,
    /// How many of them are subjects (`sub:…`).
    subjects: usize,
}

/// Signed-token subjects one tally holds: an issuer chooses its subjects, so their number is
/// bounded apart from the bundle's tokens (a new subject past it is not counted).
pub const MAX_SUBJECTS: usize = 10_000;

impl Tally {
    /// Counts `decision` at `now` if it identified a token and passed, or was denied only
    /// for its scopes; `true` if it counted. Any other decision is not a use of a token.
    /// Signed tokens are counted by subject ([`subject_key`]): each has its own `jti`.
    pub fn count(&mut self, decision: &Decision, now: u64) -> bool {
        let Some(key) = Self::key_of(decision) else {
            return false;
        };
        let counts = match decision.reason {
            Reason::Valid | Reason::Signed => Counts {
                allowed: 1,
                denied_scope: 0,
                last_seen: now,
            },
            Reason::InsufficientScope => Counts {
                allowed: 0,
                denied_scope: 1,
                last_seen: now,
            },
            _ => return false,
        };
        self.add(&key, &counts)
    }

    /// The id a decision is counted under: its token id, or for a signed token
    /// [`subject_key`] of its subject.
    pub fn key_of(decision: &Decision) -> Option<Cow<'_, str>> {
        match (&decision.issuer, &decision.subject, &decision.token_id) {
            (Some(_), Some(subject), _) => Some(Cow::Owned(subject_key(subject))),
            (None, _, Some(token_id)) => Some(Cow::Borrowed(token_id.as_str())),
            _ => None,
        }
    }

    /// Adds `counts` to the token's; `false` if the tally is full and the token new to it.
    pub fn add(&mut self, token_id: &str, counts: &Counts) -> bool {
        if let Some(current) = self.tokens.get_mut(token_id) {
            current.add(counts);
            return true;
        }
        let subject = token_id.starts_with(SUBJECT_PREFIX);
        if self.tokens.len() >= MAX_TOKENS || (subject && self.subjects >= MAX_SUBJECTS) {
            return false;
        }
        self.subjects += usize::from(subject);
        self.tokens.insert(token_id.into(), *counts);
        true
    }

    /// Adds every count of `other`.
    pub fn merge(&mut self, other: &Tally) {
        for (token_id, counts) in &other.tokens {
            self.add(token_id, counts);
        }
    }

    /// The counts so far, leaving this tally empty.
    pub fn take(&mut self) -> Tally {
        std::mem::take(self)
    }

    /// Tokens counted.
    pub fn len(&self) -> usize {
        self.tokens.len()
    }

    /// Whether nothing was counted.
    pub fn is_empty(&self) -> bool {
        self.tokens.is_empty()
    }

    /// The counts of one token.
    pub fn get(&self, token_id: &str) -> Option<&Counts> {
        self.tokens.get(token_id)
    }

    /// Every token's counts, by token id (in no particular order).
    pub fn iter(&self) -> impl Iterator<Item = (&str, &Counts)> {
        self.tokens.iter().map(|(id, counts)| (&**id, counts))
    }

    /// A compact text form, for a host to move a tally between its own parts (Envoy shared
    /// data, a Worker isolate to its store): a line `<token id> <allowed> <denied_scope>
    /// <last_seen>` per token. Lines, not JSON: the wasm filter then carries no JSON writer
    /// (16 KB of its 400 KiB budget).
    pub fn encode(&self) -> String {
        let mut text = String::with_capacity(self.tokens.len() * 48);
        for (id, c) in self.iter() {
            let line = format!("{id} {} {} {}\n", c.allowed, c.denied_scope, c.last_seen);
            text.push_str(&line);
        }
        text
    }

    /// Reads [`Tally::encode`]'s form; `None` if it is not that (a token id with a space or
    /// a control character, a count that is not a number, a repeated id).
    pub fn decode(text: &str) -> Option<Tally> {
        let mut tally = Tally::default();
        for line in text.lines() {
            let mut fields = line.split(' ');
            let id = fields.next().filter(|id| {
                !id.is_empty() && id.len() <= MAX_ID_LEN && id.bytes().all(|b| b.is_ascii_graphic())
            })?;
            let mut number = || fields.next()?.parse::<u64>().ok();
            let counts = Counts {
                allowed: number()?,
                denied_scope: number()?,
                last_seen: number()?,
            };
            if fields.next().is_some() || tally.get(id).is_some() || !tally.add(id, &counts) {
                return None;
            }
        }
        Some(tally)
    }

    /// The report of this tally, as the gate `instance` of `environment` answers it at `now`.
    pub fn report(&self, instance: &str, environment: &str, now: u64) -> Report {
        // In no particular order: a sort would cost the wasm filter 5 KB.
        let tokens: Vec<TokenUsage> = self
            .iter()
            .map(|(token_id, c)| TokenUsage {
                token_id: token_id.to_owned(),
                allowed: c.allowed,
                denied_scope: c.denied_scope,
                last_seen: c.last_seen,
            })
            .collect();
        Report {
            format: REPORT_FORMAT.to_owned(),
            instance: instance.to_owned(),
            environment: environment.to_owned(),
            taken_at: now,
            tokens,
        }
    }
}

/// What a gate answers a usage read: cumulative counts since `instance` started.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Report {
    /// [`REPORT_FORMAT`].
    pub format: String,
    /// Which counter set this is: counts of one instance only grow.
    pub instance: String,
    /// The environment the gate serves.
    pub environment: String,
    /// Unix seconds at which the gate answered.
    pub taken_at: u64,
    /// Every token seen (in no particular order).
    pub tokens: Vec<TokenUsage>,
}

/// One token's line of a [`Report`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TokenUsage {
    /// The public token id (`tid_…`).
    pub token_id: String,
    /// Requests allowed.
    pub allowed: u64,
    /// Requests denied for a missing scope.
    pub denied_scope: u64,
    /// Unix seconds of the last use.
    pub last_seen: u64,
}

impl Report {
    /// The 200 answer carrying this report (JSON, never cached).
    pub fn answer(&self) -> Denial {
        Denial {
            status: 200,
            headers: vec![
                ("content-type", "application/json".to_owned()),
                ("cache-control", "no-store".to_owned()),
            ],
            body: serde_json::to_string(self).unwrap_or_default(),
        }
    }
}

/// Usage reads a gate checks per second at most (an Envoy process, a wasm VM, a Worker
/// isolate): anyone can send one, and verifying its Ed25519 signature costs ~50 µs natively,
/// a hundred times the decision of a request. Past it: 429, with no signature checked.
pub const MAX_READS_PER_SECOND: u32 = 10;

/// Counts the usage reads of the current second (see [`MAX_READS_PER_SECOND`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ReadLimiter {
    second: u64,
    reads: u32,
}

impl ReadLimiter {
    /// No read yet.
    pub const fn new() -> Self {
        Self {
            second: 0,
            reads: 0,
        }
    }

    /// Whether one more read may be checked at `now` (unix seconds); counts it if so.
    pub fn admit(&mut self, now: u64) -> bool {
        if now != self.second {
            *self = Self {
                second: now,
                reads: 0,
            };
        }
        self.reads += 1;
        self.reads <= MAX_READS_PER_SECOND
    }
}

/// Why a gate that authorized a read has no report to give.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Unreported {
    /// Counting is off at this gate (`TOKENGATE_USAGE=off`): 404 `usage_off`.
    Off,
    /// The counts cannot be read right now (what, for the gate's log): 503.
    Unavailable(String),
}

/// What a host keeps for usage reads: its limiter and its counts.
pub trait Counter {
    /// [`ReadLimiter::admit`] on the host's limiter.
    fn admit(&mut self, now: u64) -> bool;
    /// The host's report, as the gate of `environment` answers it at `now`.
    fn report(&mut self, environment: &str, now: u64) -> Result<Report, Unreported>;
}

/// The answer to a usage read ([`is_usage_read`]): the host's report if [`authorize`] lets
/// the read through, else the refusal.
pub fn answer(
    request: &Request<'_>,
    trusted: Option<(&KeySet, &str)>,
    now: u64,
    host: &mut impl Counter,
) -> Denial {
    if let Err(refusal) = authorize(request, trusted, now, |now| host.admit(now)) {
        return refusal;
    }
    let environment = trusted.map_or("", |(_, environment)| environment);
    match host.report(environment, now) {
        Ok(report) => report.answer(),
        Err(Unreported::Off) => denial(
            404,
            None,
            "usage_off",
            "this gate does not count usage (TOKENGATE_USAGE=off)",
        ),
        Err(Unreported::Unavailable(_)) => denial(
            503,
            None,
            "temporarily_unavailable",
            "the gate's usage counts cannot be read right now; retry",
        ),
    }
}

/// Whether `request` is a usage read (its path, query aside, is [`USAGE_PATH`]).
pub fn is_usage_read(request: &Request<'_>) -> bool {
    request.path.split('?').next() == Some(USAGE_PATH)
}

/// Checks a usage read against the admin's keys `trusted` and the gate's `environment` at
/// `now`: `Ok` when the gate should answer with its report, else the refusal to send (405
/// for a method other than GET, 429 when `admit` (the host's [`ReadLimiter`]) says no, 401
/// for a missing, malformed, untrusted, failing or stale signature, 503 with no keys or
/// environment to check it against). Only for requests [`is_usage_read`] accepts.
pub fn authorize(
    request: &Request<'_>,
    trusted: Option<(&KeySet, &str)>,
    now: u64,
    admit: impl FnOnce(u64) -> bool,
) -> Result<(), Denial> {
    if request.method != "GET" {
        let mut refusal = denial(
            405,
            None,
            "method_not_allowed",
            "a usage read is GET /.well-known/tokengate/usage",
        );
        refusal.headers.push(("allow", "GET".to_owned()));
        return Err(refusal);
    }
    let Some((keys, environment)) = trusted else {
        return Err(denial(
            503,
            None,
            "temporarily_unavailable",
            "the gate has no trusted keys or environment to check a usage read against yet",
        ));
    };
    if !admit(now) {
        let mut refusal = denial(
            429,
            None,
            "too_many_requests",
            "too many usage reads this second; retry",
        );
        refusal.headers.push(("retry-after", "1".to_owned()));
        return Err(refusal);
    }
    // A repeated signature header could be read two ways: refused like a malformed one.
    let mut headers = request
        .headers
        .iter()
        .filter(|(name, _)| name.eq_ignore_ascii_case(SIGNATURE_HEADER));
    let header = match (headers.next(), headers.next()) {
        (Some((_, value)), None) => Some(*value),
        _ => None,
    };
    signed::check(keys, USAGE_CONTEXT, header, environment.as_bytes(), now).map_err(|e| Denial {
        status: 401,
        headers: vec![("content-type", "application/json".to_owned())],
        body: error_body(e.code(), &e.describe(USAGE_CONTEXT)),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::decision::Outcome;
    use ed25519_dalek::Signer;

    fn decision(reason: Reason, token_id: Option<&str>) -> Decision {
        Decision {
            outcome: reason.outcome(),
            reason,
            rule: None,
            subject: None,
            token_id: token_id.map(str::to_owned),
            issuer: None,
            denial: None,
            remove_headers: Vec::new(),
            add_headers: Vec::new(),
            rewrite_path: None,
            rate_limits: Vec::new(),
        }
    }

    #[test]
    fn only_a_passing_or_scope_denied_token_counts() {
        let mut tally = Tally::default();
        assert!(tally.count(&decision(Reason::Valid, Some("tid_a")), 10));
        assert!(tally.count(&decision(Reason::Valid, Some("tid_a")), 30));
        assert!(tally.count(&decision(Reason::InsufficientScope, Some("tid_a")), 20));
        assert!(tally.count(&decision(Reason::InsufficientScope, Some("tid_b")), 5));
        for (reason, id) in [
            (Reason::Revoked, Some("tid_c")),
            (Reason::Expired, Some("tid_c")),
            (Reason::RotationGraceOver, Some("tid_c")),
            (Reason::Public, None),
            (Reason::Access, None),
            (Reason::Unknown, None),
        ] {
            assert!(!tally.count(&decision(reason, id), 40), "{reason}");
        }
        let a = Counts {
            allowed: 2,
            denied_scope: 1,
            last_seen: 30,
        };
        assert_eq!(tally.get("tid_a"), Some(&a));
        assert_eq!(tally.get("tid_b").map(|c| c.allowed), Some(0));
        assert_eq!(tally.get("tid_c"), None);
        assert_eq!(tally.len(), 2);
        assert_eq!(decision(Reason::Valid, None).outcome, Outcome::Allow);
    }

    #[test]
    fn signed_tokens_count_by_subject() {
        let mut tally = Tally::default();
        let signed = |reason, jti: &str| Decision {
            subject: Some("deploy-job".into()),
            issuer: Some("ci".into()),
            ..decision(reason, Some(jti))
        };
        assert!(tally.count(&signed(Reason::Signed, "j1"), 10));
        assert!(tally.count(&signed(Reason::Signed, "j2"), 20));
        assert!(tally.count(&signed(Reason::InsufficientScope, "j3"), 15));
        assert!(!tally.count(&signed(Reason::Expired, "j4"), 30));
        assert_eq!(tally.len(), 1, "one subject, whatever its jtis");
        // The longest subject a signed token may carry still travels in a report.
        let long = "s".repeat(crate::jwt::MAX_SUBJECT_LEN);
        let long_subject = Decision {
            subject: Some(long.clone()),
            ..signed(Reason::Signed, "j5")
        };
        assert!(tally.count(&long_subject, 40));
        let decoded = Tally::decode(&tally.encode()).unwrap();
        assert_eq!(decoded.get(&subject_key(&long)).map(|c| c.allowed), Some(1));
        let counts = tally.get(&subject_key("deploy-job")).copied();
        assert_eq!(
            counts.map(|c| (c.allowed, c.denied_scope, c.last_seen)),
            Some((2, 1, 20))
        );
        // An issuer chooses its subjects: past MAX_SUBJECTS a new one is not counted, while
        // tokens and the subjects already there still are.
        for i in 0..MAX_SUBJECTS {
            tally.add(&subject_key(&i.to_string()), &Counts::default());
        }
        let new_subject = Decision {
            subject: Some("one-more".into()),
            ..signed(Reason::Signed, "j6")
        };
        assert!(!tally.count(&new_subject, 50));
        assert!(
            tally.count(&signed(Reason::Signed, "j7"), 50),
            "a known subject"
        );
        assert!(
            tally.count(&decision(Reason::Valid, Some("tid_a")), 50),
            "a token"
        );
    }

    #[test]
    fn tallies_merge_and_travel_as_text() {
        let mut one = Tally::default();
        one.count(&decision(Reason::Valid, Some("tid_a")), 10);
        let mut two = Tally::default();
        two.count(&decision(Reason::Valid, Some("tid_a")), 50);
        two.count(&decision(Reason::Valid, Some("tid_b")), 40);
        let decoded = Tally::decode(&two.encode()).unwrap();
        assert_eq!(decoded, two);
        one.merge(&decoded);
        assert_eq!(
            one.get("tid_a").map(|c| (c.allowed, c.last_seen)),
            Some((2, 50))
        );
        let taken = one.take();
        assert!(one.is_empty());
        assert_eq!(taken.len(), 2);
        assert_eq!(Tally::decode(""), Some(Tally::default()));
        for bad in [
            "tid_a 1 2",
            "tid_a -1 0 0",
            "tid_a 1 2 3 4",
            "tid_a 1 2 3\ntid_a 1 2 3",
            " 1 2 3",
        ] {
            assert_eq!(Tally::decode(bad), None, "{bad}");
        }
        let report = taken.report("inst", "prod", 99);
        assert_eq!(report.tokens.len(), 2);
        let text = report.answer().body;
        assert!(!text.contains("hash"));
        assert_eq!(serde_json::from_str::<Report>(&text).unwrap(), report);
    }

    fn signed_read(key: &ed25519_dalek::SigningKey, t: u64, environment: &str) -> (String, String) {
        let id = crate::keys::key_id(key.verifying_key().as_bytes());
        let message = format!("{USAGE_CONTEXT}\n{t}\n{environment}");
        let signature = crate::hex::encode(&key.sign(message.as_bytes()).to_bytes());
        (
            SIGNATURE_HEADER.to_owned(),
            format!("t={t},{id}={signature}"),
        )
    }

    fn read<'a>(method: &'a str, headers: &'a [(&'a str, &'a str)]) -> Request<'a> {
        Request {
            method,
            path: "/.well-known/tokengate/usage",
            authority: "gate",
            headers,
        }
    }

    #[test]
    fn only_a_fresh_read_signed_by_an_admin_key_for_this_environment_is_answered() {
        let admin = ed25519_dalek::SigningKey::from_bytes(&[3; 32]);
        let other = ed25519_dalek::SigningKey::from_bytes(&[4; 32]);
        let keys = KeySet::parse(&crate::hex::encode(admin.verifying_key().as_bytes())).unwrap();
        let trusted = Some((&keys, "prod"));
        let status = |headers: &[(String, String)], method: &str, now| {
            let pairs: Vec<(&str, &str)> = headers
                .iter()
                .map(|(n, v)| (n.as_str(), v.as_str()))
                .collect();
            authorize(&read(method, &pairs), trusted, now, |_| true).map_err(|d| {
                let error: serde_json::Value = serde_json::from_str(&d.body).unwrap();
                (d.status, error["error"].as_str().unwrap().to_owned())
            })
        };
        let good = signed_read(&admin, 1000, "prod");
        assert_eq!(status(std::slice::from_ref(&good), "GET", 1100), Ok(()));
        let expired = Err((401, "signature_expired".to_owned()));
        assert_eq!(status(std::slice::from_ref(&good), "GET", 1301), expired);
        let invalid = Err((401, "invalid_signature".to_owned()));
        assert_eq!(status(&[], "GET", 1000), invalid);
        assert_eq!(status(&[good.clone(), good.clone()], "GET", 1000), invalid);
        assert_eq!(
            status(&[signed_read(&admin, 1000, "staging")], "GET", 1000),
            invalid
        );
        assert_eq!(
            status(&[signed_read(&other, 1000, "prod")], "GET", 1000),
            invalid
        );
        assert_eq!(
            status(std::slice::from_ref(&good), "POST", 1000).map_err(|e| e.0),
            Err(405)
        );
        let no_keys = authorize(&read("GET", &[]), None, 1000, |_| true).unwrap_err();
        assert_eq!(no_keys.status, 503);
        assert!(is_usage_read(&read("GET", &[])));
        let mut elsewhere = read("GET", &[]);
        elsewhere.path = "/.well-known/tokengate/usage/x";
        assert!(!is_usage_read(&elsewhere));
    }

    #[test]
    fn reads_past_the_limit_are_refused_before_any_signature_is_checked() {
        let mut limiter = ReadLimiter::default();
        let admitted = (0..15).filter(|_| limiter.admit(100)).count();
        assert_eq!(admitted, MAX_READS_PER_SECOND as usize);
        assert!(limiter.admit(101), "a new second, a new allowance");
        let key = ed25519_dalek::SigningKey::from_bytes(&[5; 32]);
        let keys = KeySet::parse(&crate::hex::encode(key.verifying_key().as_bytes())).unwrap();
        let refused = authorize(&read("GET", &[]), Some((&keys, "prod")), 100, |_| false);
        let refused = refused.unwrap_err();
        assert_eq!(refused.status, 429);
        assert!(refused
            .headers
            .iter()
            .any(|(n, v)| *n == "retry-after" && v == "1"));
    }
}
