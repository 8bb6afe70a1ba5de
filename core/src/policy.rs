//! The route policy: ordered rules, the first whose match fits decides.
//!
//! Paths are matched after [`normalize_path`]; prefixes are segment-aware (`/api` matches
//! `/api` and `/api/x`, never `/apix`). A request no rule matches is denied.

use core::fmt;
use std::borrow::Cow;

use serde::{Deserialize, Serialize};

use crate::rate::RateLimit;

/// Rules a bundle may hold.
pub const MAX_RULES: usize = 512;
/// Scopes one token or rule may hold.
pub const MAX_SCOPES: usize = 64;
const MAX_SCOPE_LEN: usize = 128;
const MAX_NAME_LEN: usize = 64;

/// The policy as written in a bundle.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Policy {
    /// Ordered rules; the first that matches decides.
    pub rules: Vec<Rule>,
}

/// One rule: a match and what it requires.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Rule {
    /// Unique name, reported in logs and by `tokengate check`.
    pub name: String,
    /// The path match.
    pub path: PathMatch,
    /// Methods the rule applies to (upper case, matched exactly); empty means any.
    #[serde(default)]
    pub methods: Vec<String>,
    /// The host (`:authority` without port, lower case) the rule applies to; none means any.
    #[serde(default)]
    pub host: Option<String>,
    /// Whether the route is public or needs a token.
    pub access: Access,
    /// Scopes a token must all hold.
    #[serde(default)]
    pub all_of: Vec<String>,
    /// If not empty, a token must also hold at least one of these.
    #[serde(default)]
    pub any_of: Vec<String>,
    /// Whether a valid Cloudflare Access assertion is an identity here too (Worker only).
    #[serde(default)]
    pub cf_access: bool,
    /// Requests each token may make here per window (the token's own limit applies too).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate_limit: Option<RateLimit>,
}

/// How a rule matches the normalised path.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum PathMatch {
    /// The whole path equals this.
    Exact(String),
    /// The path is this or lies below it, segment-aware.
    Prefix(String),
}

/// What a matching rule requires.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Access {
    /// No credential needed.
    Public,
    /// A valid token holding the rule's scopes.
    Token,
}

/// Why a policy was refused. Every variant names the rule it is about.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum PolicyError {
    /// More than [`MAX_RULES`] rules.
    TooManyRules(usize),
    /// A rule name is empty, too long, or not `[a-z0-9][a-z0-9._-]*`.
    BadRuleName(String),
    /// Two rules share a name.
    DuplicateRuleName(String),
    /// A rule path is not a normalised absolute path (or a prefix ends in `/`).
    BadPath {
        /// The rule.
        rule: String,
        /// The path it gave.
        path: String,
    },
    /// A method is not an upper-case HTTP token.
    BadMethod {
        /// The rule.
        rule: String,
        /// The method it gave.
        method: String,
    },
    /// A host is not a lower-case host name.
    BadHost {
        /// The rule.
        rule: String,
    },
    /// A required scope is malformed (or is a wildcard, which only tokens may hold).
    BadScope {
        /// The rule.
        rule: String,
        /// The scope it gave.
        scope: String,
    },
    /// A public rule lists scopes.
    ScopesOnPublicRule(String),
    /// A public rule has a rate limit (limits are per token; a public route has none).
    RateLimitOnPublicRule(String),
    /// A rate limit allows no request, or more than [`crate::rate::MAX_REQUESTS`].
    BadRateLimit(String),
}

impl fmt::Display for PolicyError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::TooManyRules(n) => write!(f, "{n} rules; at most {MAX_RULES} are allowed"),
            Self::BadRuleName(name) => {
                write!(f, "rule name {name:?} must match [a-z0-9][a-z0-9._-]{{0,63}}")
            }
            Self::DuplicateRuleName(name) => write!(f, "two rules are named {name:?}"),
            Self::BadPath { rule, path } => write!(
                f,
                "rule {rule:?}: path {path:?} must be a normalised absolute path (no '//', '.', '..', '%2F', trailing '/' on a prefix)"
            ),
            Self::BadMethod { rule, method } => {
                write!(f, "rule {rule:?}: method {method:?} must be upper case, like GET")
            }
            Self::BadHost { rule } => write!(f, "rule {rule:?}: host must be a lower-case host name"),
            Self::BadScope { rule, scope } => write!(
                f,
                "rule {rule:?}: required scope {scope:?} must be like 'orders:read' (wildcards are for tokens only)"
            ),
            Self::ScopesOnPublicRule(rule) => write!(f, "rule {rule:?} is public but lists scopes"),
            Self::RateLimitOnPublicRule(rule) => write!(
                f,
                "rule {rule:?} is public but has a rate limit (limits are per token)"
            ),
            Self::BadRateLimit(rule) => write!(
                f,
                "rule {rule:?}: rate_limit requests must be 1 to {}",
                crate::rate::MAX_REQUESTS
            ),
        }
    }
}

impl std::error::Error for PolicyError {}

/// Checks a whole policy; the first problem found is returned.
pub fn validate(policy: &Policy) -> Result<(), PolicyError> {
    if policy.rules.len() > MAX_RULES {
        return Err(PolicyError::TooManyRules(policy.rules.len()));
    }
    let mut names = std::collections::HashSet::new();
    for rule in &policy.rules {
        if !valid_name(&rule.name) {
            return Err(PolicyError::BadRuleName(rule.name.clone()));
        }
        if !names.insert(rule.name.as_str()) {
            return Err(PolicyError::DuplicateRuleName(rule.name.clone()));
        }
        let (path, is_prefix) = match &rule.path {
            PathMatch::Exact(p) => (p, false),
            PathMatch::Prefix(p) => (p, true),
        };
        let normalised = normalize_path(path).ok();
        if normalised.as_deref() != Some(path.as_str())
            || path.contains('?')
            || (is_prefix && path.len() > 1 && path.ends_with('/'))
        {
            return Err(PolicyError::BadPath {
                rule: rule.name.clone(),
                path: path.clone(),
            });
        }
        if let Some(method) = rule.methods.iter().find(|m| !valid_method(m)) {
            return Err(PolicyError::BadMethod {
                rule: rule.name.clone(),
                method: method.clone(),
            });
        }
        if let Some(host) = &rule.host {
            if !valid_host(host) {
                return Err(PolicyError::BadHost {
                    rule: rule.name.clone(),
                });
            }
        }
        if rule.access == Access::Public && !(rule.all_of.is_empty() && rule.any_of.is_empty()) {
            return Err(PolicyError::ScopesOnPublicRule(rule.name.clone()));
        }
        if let Some(limit) = rule.rate_limit {
            if rule.access == Access::Public {
                return Err(PolicyError::RateLimitOnPublicRule(rule.name.clone()));
            }
            if limit.problem().is_some() {
                return Err(PolicyError::BadRateLimit(rule.name.clone()));
            }
        }
        let scopes = rule.all_of.iter().chain(&rule.any_of);
        if rule.all_of.len() + rule.any_of.len() > MAX_SCOPES {
            return Err(PolicyError::BadScope {
                rule: rule.name.clone(),
                scope: format!("({} scopes)", rule.all_of.len() + rule.any_of.len()),
            });
        }
        for scope in scopes {
            if !valid_scope(scope) {
                return Err(PolicyError::BadScope {
                    rule: rule.name.clone(),
                    scope: scope.clone(),
                });
            }
        }
    }
    Ok(())
}

/// Names of rules and tokens: `[a-z0-9][a-z0-9._-]{0,63}`.
pub fn valid_name(name: &str) -> bool {
    let bytes = name.as_bytes();
    !bytes.is_empty()
        && bytes.len() <= MAX_NAME_LEN
        && (bytes[0].is_ascii_lowercase() || bytes[0].is_ascii_digit())
        && bytes
            .iter()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"._-".contains(b))
}

fn valid_method(method: &str) -> bool {
    !method.is_empty() && method.len() <= 32 && method.bytes().all(|b| b.is_ascii_uppercase())
}

fn valid_host(host: &str) -> bool {
    !host.is_empty()
        && host.len() <= 253
        && host
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b".-".contains(&b))
}

/// A required scope: `segment(:segment)*`, segments of `[a-z0-9_.-]`. No wildcards.
pub fn valid_scope(scope: &str) -> bool {
    scope.len() <= MAX_SCOPE_LEN
        && scope.split(':').all(|segment| {
            !segment.is_empty()
                && segment
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"_.-".contains(&b))
        })
}

/// A scope a token may hold: a required scope, `*`, or `something:*`.
pub fn valid_grant(grant: &str) -> bool {
    grant == "*"
        || grant
            .strip_suffix(":*")
            .map_or_else(|| valid_scope(grant), valid_scope)
}

/// Whether `grants` (a token's scopes) cover `needed`: exactly, by `prefix:*`, or by `*`.
pub fn grants(grants: &[String], needed: &str) -> bool {
    grants.iter().any(|grant| {
        grant == needed
            || grant == "*"
            || grant.strip_suffix('*').is_some_and(|stem| {
                stem.ends_with(':') && needed.len() > stem.len() && needed.starts_with(stem)
            })
    })
}

/// The scopes a token lacks for a rule, or `None` when it may pass. When `all_of` is
/// covered but `any_of` is not, the `any_of` list is what is missing.
pub fn missing_scopes(rule: &Rule, token_scopes: &[String]) -> Option<Vec<String>> {
    let missing: Vec<String> = rule
        .all_of
        .iter()
        .filter(|s| !grants(token_scopes, s))
        .cloned()
        .collect();
    if !missing.is_empty() {
        return Some(missing);
    }
    if !rule.any_of.is_empty() && !rule.any_of.iter().any(|s| grants(token_scopes, s)) {
        return Some(rule.any_of.clone());
    }
    None
}

impl Rule {
    /// Whether the rule applies to this method, host and normalised path.
    pub fn matches(&self, method: &str, host: &str, path: &str) -> bool {
        let path_fits = match &self.path {
            PathMatch::Exact(p) => path == p,
            PathMatch::Prefix(p) => {
                p == "/"
                    || path
                        .strip_prefix(p.as_str())
                        .is_some_and(|rest| rest.is_empty() || rest.starts_with('/'))
            }
        };
        path_fits
            && (self.methods.is_empty() || self.methods.iter().any(|m| m == method))
            && self.host.as_deref().is_none_or(|h| h == host)
    }
}

/// The `:authority` as rules see it: lower case, without the port.
pub fn host_of(authority: &str) -> Cow<'_, str> {
    let host = match authority.strip_prefix('[').and_then(|rest| rest.find(']')) {
        Some(end) => &authority[..end + 2],
        None => authority
            .rsplit_once(':')
            .filter(|(_, port)| port.bytes().all(|b| b.is_ascii_digit()))
            .map_or(authority, |(host, _)| host),
    };
    // `ops.internal.` is `ops.internal` (a fully qualified name): one trailing dot goes.
    let host = host.strip_suffix('.').unwrap_or(host);
    if host.bytes().any(|b| b.is_ascii_uppercase()) {
        Cow::Owned(host.to_ascii_lowercase())
    } else {
        Cow::Borrowed(host)
    }
}

/// Why a path cannot be normalised safely: the request gets a 400.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum PathError {
    /// Does not start with `/`.
    NotAbsolute,
    /// An encoded `/` or `\`, which would let the gate and the upstream disagree on segments.
    EncodedSeparator,
    /// A NUL byte, raw or encoded.
    Nul,
    /// A raw `\`, control character, space or non-ASCII byte.
    BadCharacter,
    /// A `%` not followed by two hex digits.
    BadPercentEncoding,
    /// `..` would climb above the root.
    AboveRoot,
    /// A `;` path parameter, raw or encoded: Tomcat and Jetty read `/a/..;/b` as `/b`.
    PathParameter,
}

impl fmt::Display for PathError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::NotAbsolute => "path does not start with '/'",
            Self::EncodedSeparator => "path holds an encoded '/' or '\\'",
            Self::Nul => "path holds a NUL byte",
            Self::BadCharacter => "path holds a character that must be percent-encoded",
            Self::BadPercentEncoding => "path holds a malformed percent-encoding",
            Self::AboveRoot => "path climbs above the root with '..'",
            Self::PathParameter => "path holds a ';' path parameter",
        })
    }
}

/// Normalises a request path (the query and fragment are dropped): percent-encoded unreserved
/// characters are decoded, other escapes upper-cased, `//` collapsed, `.` and `..` resolved.
/// A trailing `/` is kept.
pub fn normalize_path(raw: &str) -> Result<Cow<'_, str>, PathError> {
    let path = raw.split(['?', '#']).next().unwrap_or_default();
    if !path.starts_with('/') {
        return Err(PathError::NotAbsolute);
    }
    if path.contains(';') {
        return Err(PathError::PathParameter);
    }
    if is_normal(path) {
        return Ok(Cow::Borrowed(path));
    }
    rebuild(path).map(Cow::Owned)
}

/// The normal form of an absolute path with something to decode, reject or resolve.
fn rebuild(path: &str) -> Result<String, PathError> {
    let decoded = decode_unreserved(path)?;
    let mut segments: Vec<&str> = Vec::new();
    let mut parts = decoded.split('/').skip(1).peekable();
    let mut trailing_slash = false;
    while let Some(segment) = parts.next() {
        let last = parts.peek().is_none();
        match segment {
            "" | "." => trailing_slash = last,
            ".." => {
                if segments.pop().is_none() {
                    return Err(PathError::AboveRoot);
                }
                trailing_slash = last;
            }
            other => {
                segments.push(other);
                trailing_slash = false;
            }
        }
    }
    let mut out = String::with_capacity(decoded.len());
    for segment in &segments {
        out.push('/');
        out.push_str(segment);
    }
    if out.is_empty() || trailing_slash {
        out.push('/');
    }
    Ok(out)
}

/// Whether `path` (absolute, no query) is its own normal form: nothing to decode, reject or
/// resolve. Most requests are; they skip the rebuild.
fn is_normal(path: &str) -> bool {
    let mut segments = path.split('/').skip(1).peekable();
    path.bytes()
        .all(|b| b.is_ascii_graphic() && b != b'%' && b != b'\\')
        && std::iter::from_fn(|| {
            let segment = segments.next()?;
            Some((segment, segments.peek().is_none()))
        })
        .all(|(segment, last)| match segment {
            "" => last,
            "." | ".." => false,
            _ => true,
        })
}

fn decode_unreserved(path: &str) -> Result<String, PathError> {
    let bytes = path.as_bytes();
    let mut out = String::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let b = bytes[i];
        match b {
            b'%' => {
                let value = bytes
                    .get(i + 1..i + 3)
                    .and_then(|h| Some(hex_value(h[0])? << 4 | hex_value(h[1])?))
                    .ok_or(PathError::BadPercentEncoding)?;
                match value {
                    b'/' | b'\\' => return Err(PathError::EncodedSeparator),
                    b';' => return Err(PathError::PathParameter),
                    0 => return Err(PathError::Nul),
                    v if v.is_ascii_alphanumeric() || b"-._~".contains(&v) => {
                        out.push(char::from(v))
                    }
                    v => {
                        out.push('%');
                        out.push_str(&format!("{v:02X}"));
                    }
                }
                i += 3;
            }
            0 => return Err(PathError::Nul),
            b'\\' => return Err(PathError::BadCharacter),
            b if b.is_ascii_graphic() => {
                out.push(char::from(b));
                i += 1;
            }
            _ => return Err(PathError::BadCharacter),
        }
    }
    Ok(out)
}

fn hex_value(c: u8) -> Option<u8> {
    match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        b'A'..=b'F' => Some(c - b'A' + 10),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_path_taken_as_normal_is_what_the_rebuild_makes_of_it() {
        // Every path up to six characters over the characters that matter.
        let alphabet = ['/', 'a', '.', '%', '2', 'e', '\\', '?'];
        let mut paths = vec![String::from("/")];
        let mut frontier = paths.clone();
        for _ in 1..6 {
            frontier = frontier
                .iter()
                .flat_map(|p| alphabet.iter().map(move |c| format!("{p}{c}")))
                .collect();
            paths.extend(frontier.iter().cloned());
        }
        let mut fast = 0;
        for path in &paths {
            let path = path.split(['?', '#']).next().unwrap_or_default();
            if is_normal(path) {
                fast += 1;
                assert_eq!(rebuild(path).as_deref(), Ok(path), "{path}");
            }
        }
        assert!(
            fast > 1000,
            "the fast path is taken for plain paths ({fast})"
        );
    }

    #[test]
    fn normalisation() {
        let ok = [
            ("/", "/"),
            ("/api/x?q=1", "/api/x"),
            ("//api///x", "/api/x"),
            ("/api/./x/", "/api/x/"),
            ("/api/x/..", "/api/"),
            ("/api/%2e%2e/admin", "/admin"),
            ("/%61pi", "/api"),
            ("/a%20b", "/a%20b"),
            ("/a%3fb", "/a%3Fb"),
            ("/api/x#frag", "/api/x"),
        ];
        for (raw, want) in ok {
            assert_eq!(normalize_path(raw).as_deref(), Ok(want), "{raw}");
        }
        let bad = [
            ("api", PathError::NotAbsolute),
            ("", PathError::NotAbsolute),
            ("/a%2Fb", PathError::EncodedSeparator),
            ("/a%2fb", PathError::EncodedSeparator),
            ("/a%5cb", PathError::EncodedSeparator),
            ("/a\\b", PathError::BadCharacter),
            ("/a%00", PathError::Nul),
            ("/a\0", PathError::Nul),
            ("/..", PathError::AboveRoot),
            ("/a/../../b", PathError::AboveRoot),
            ("/%2e%2e/x", PathError::AboveRoot),
            ("/a%zz", PathError::BadPercentEncoding),
            ("/a%4", PathError::BadPercentEncoding),
            ("/é", PathError::BadCharacter),
            ("/a b", PathError::BadCharacter),
        ];
        for (raw, want) in bad {
            assert_eq!(normalize_path(raw), Err(want), "{raw:?}");
        }
    }

    #[test]
    fn scope_grants() {
        let token = vec!["orders:*".to_owned(), "billing:read".to_owned()];
        assert!(grants(&token, "orders:read"));
        assert!(grants(&token, "orders:write:bulk"));
        assert!(!grants(&token, "orders"));
        assert!(!grants(&token, "ordersx:read"));
        assert!(grants(&token, "billing:read"));
        assert!(!grants(&token, "billing:write"));
        assert!(grants(&["*".to_owned()], "anything:at:all"));
    }

    #[test]
    fn hosts_lose_their_port_and_case() {
        assert_eq!(host_of("API.internal:8080"), "api.internal");
        assert_eq!(host_of("api.internal"), "api.internal");
        assert_eq!(host_of("[::1]:80"), "[::1]");
        assert_eq!(host_of("[::1]"), "[::1]");
    }
}
