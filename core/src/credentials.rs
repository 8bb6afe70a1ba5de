//! Where a request's credential comes from, and the rules that make a request malformed.
//!
//! Sources are ordered and configured per bundle: `bearer` (the `Authorization: Bearer`
//! scheme, case-insensitive), `header:<name>`, `query:<name>`. Every header pair is read,
//! so a repeated header or a credential in two places is caught, never silently picked.

use core::fmt;

/// One configured source.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Source {
    /// `Authorization: Bearer <token>`.
    Bearer,
    /// A named header (stored lower case), e.g. `x-internal-token`.
    Header(String),
    /// A query parameter. Off unless configured; never logged.
    Query(String),
}

impl Source {
    /// Parses `bearer`, `header:<name>` or `query:<name>`.
    pub fn parse(text: &str) -> Result<Self, SourceError> {
        if text == "bearer" {
            return Ok(Self::Bearer);
        }
        if let Some(name) = text.strip_prefix("header:") {
            let valid = !name.is_empty()
                && name.len() <= 64
                && name
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-');
            if !valid {
                return Err(SourceError::BadHeaderName(name.to_owned()));
            }
            if name == "authorization" || name.starts_with("x-tokengate-") {
                return Err(SourceError::ReservedHeader(name.to_owned()));
            }
            return Ok(Self::Header(name.to_owned()));
        }
        if let Some(name) = text.strip_prefix("query:") {
            let valid = !name.is_empty()
                && name.len() <= 64
                && name
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
            if !valid {
                return Err(SourceError::BadQueryName(name.to_owned()));
            }
            return Ok(Self::Query(name.to_owned()));
        }
        Err(SourceError::Unknown(text.to_owned()))
    }

    /// The header the credential travels in, if any (stripped before going upstream).
    pub fn header_name(&self) -> Option<&str> {
        match self {
            Self::Bearer => Some("authorization"),
            Self::Header(name) => Some(name),
            Self::Query(_) => None,
        }
    }
}

/// Why a credential source was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum SourceError {
    /// Not `bearer`, `header:<name>` or `query:<name>`.
    Unknown(String),
    /// A header name that is not lower-case `[a-z0-9-]{1,64}`.
    BadHeaderName(String),
    /// `authorization` (use `bearer`) or an `x-tokengate-*` header.
    ReservedHeader(String),
    /// A query name that is not `[A-Za-z0-9_-]{1,64}`.
    BadQueryName(String),
    /// No sources at all, so no request could ever be authenticated.
    Empty,
    /// The same source twice.
    Duplicate(String),
}

impl fmt::Display for SourceError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Unknown(s) => write!(
                f,
                "credential source {s:?} must be 'bearer', 'header:<name>' or 'query:<name>'"
            ),
            Self::BadHeaderName(s) => write!(f, "header name {s:?} must be lower-case [a-z0-9-]{{1,64}}"),
            Self::ReservedHeader(s) => write!(
                f,
                "header {s:?} cannot be a named source (use 'bearer' for authorization; x-tokengate-* is reserved)"
            ),
            Self::BadQueryName(s) => write!(f, "query parameter {s:?} must be [A-Za-z0-9_-]{{1,64}}"),
            Self::Empty => write!(f, "at least one credential source is needed"),
            Self::Duplicate(s) => write!(f, "credential source {s:?} is listed twice"),
        }
    }
}

impl std::error::Error for SourceError {}

/// Parses and checks an ordered list of sources.
pub fn parse_sources(texts: &[String]) -> Result<Vec<Source>, SourceError> {
    if texts.is_empty() {
        return Err(SourceError::Empty);
    }
    let mut sources = Vec::with_capacity(texts.len());
    for text in texts {
        let source = Source::parse(text)?;
        if sources.contains(&source) {
            return Err(SourceError::Duplicate(text.clone()));
        }
        sources.push(source);
    }
    Ok(sources)
}

/// What the request carried.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Found<'a> {
    /// No credential in any source.
    None,
    /// Exactly one credential (possibly empty or malformed; the token check decides).
    One {
        /// The credential's text.
        value: &'a str,
        /// The source it came from.
        source: &'a Source,
    },
    /// More than one credential, the same or different: the request is malformed.
    Several,
}

/// Reads every configured source. A non-Bearer `Authorization` header is not a credential.
pub fn find<'a>(
    sources: &'a [Source],
    headers: &'a [(&'a str, &'a str)],
    query: Option<&'a str>,
) -> Found<'a> {
    let mut found = Found::None;
    let mut note = |value: &'a str, source: &'a Source| {
        found = match found {
            Found::None => Found::One { value, source },
            _ => Found::Several,
        };
    };
    for source in sources {
        match source {
            Source::Bearer => {
                let authorizations = headers
                    .iter()
                    .filter(|(name, _)| name.eq_ignore_ascii_case("authorization"));
                // A proxy may join repeated headers with ',' (Envoy does); a token68 never
                // holds one, so each part is a credential of its own.
                for part in authorizations.flat_map(|(_, value)| value.split(',')) {
                    if let Some(token) = bearer_token(part) {
                        note(token, source);
                    }
                }
            }
            Source::Header(wanted) => {
                // A proxy joins repeated headers with ','; no credential holds one, so each
                // part counts on its own and two of them are a conflict.
                let values = headers
                    .iter()
                    .filter(|(n, _)| n.eq_ignore_ascii_case(wanted))
                    .flat_map(|(_, value)| value.split(','));
                for value in values {
                    note(value.trim_matches([' ', '\t']), source);
                }
            }
            Source::Query(wanted) => {
                for pair in query.unwrap_or_default().split('&') {
                    let (name, value) = pair.split_once('=').unwrap_or((pair, ""));
                    if query_name_is(name, wanted) {
                        note(value, source);
                    }
                }
            }
        }
    }
    found
}

/// Whether an `Authorization` value uses the Bearer scheme (and so is ours to strip).
pub fn is_bearer(value: &str) -> bool {
    value.split(',').any(|part| bearer_token(part).is_some())
}

/// The token of a `Bearer` credential: the scheme is case-insensitive and followed by one or
/// more spaces; surrounding optional whitespace is dropped. Returns `None` for other schemes.
fn bearer_token(value: &str) -> Option<&str> {
    let value = value.trim_matches([' ', '\t']);
    let scheme = value.get(..6)?;
    if !scheme.eq_ignore_ascii_case("bearer") {
        return None;
    }
    let rest = &value[6..];
    if rest.is_empty() {
        return Some(rest);
    }
    let token = rest.strip_prefix(' ')?;
    Some(token.trim_start_matches(' '))
}

/// Whether a query parameter's name, as sent, is `wanted`: upstreams percent-decode names,
/// so `%61ccess_token` is `access_token` and must be read (and stripped) as such.
fn query_name_is(raw: &str, wanted: &str) -> bool {
    let mut raw = raw.bytes();
    let mut wanted = wanted.bytes();
    loop {
        let got = match raw.next() {
            Some(b'%') => {
                let high = raw.next().and_then(|c| (c as char).to_digit(16));
                let low = raw.next().and_then(|c| (c as char).to_digit(16));
                match (high, low) {
                    (Some(h), Some(l)) => Some((h * 16 + l) as u8),
                    _ => return false,
                }
            }
            other => other,
        };
        match (got, wanted.next()) {
            (None, None) => return true,
            (Some(g), Some(w)) if g == w => {}
            _ => return false,
        }
    }
}

/// The query string with every configured query credential removed, for the upstream.
pub fn strip_query_credentials(query: &str, sources: &[Source]) -> String {
    query
        .split('&')
        .filter(|pair| {
            let name = pair.split_once('=').map_or(*pair, |(n, _)| n);
            !sources
                .iter()
                .any(|s| matches!(s, Source::Query(q) if query_name_is(name, q)))
        })
        .collect::<Vec<_>>()
        .join("&")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn h<'a>(pairs: &[(&'a str, &'a str)]) -> Vec<(&'a str, &'a str)> {
        pairs.to_vec()
    }

    #[test]
    fn bearer_scheme_parsing() {
        assert_eq!(bearer_token("Bearer abc"), Some("abc"));
        assert_eq!(bearer_token("bEaReR   abc "), Some("abc"));
        assert_eq!(bearer_token("Bearer"), Some(""));
        assert_eq!(bearer_token("Bearerabc"), None);
        assert_eq!(bearer_token("Basic abc"), None);
        assert_eq!(bearer_token("Bearer\tabc"), None);
    }

    #[test]
    fn every_pair_is_read() {
        let sources = parse_sources(&["bearer".into(), "header:x-internal-token".into()]).unwrap();
        let one = h(&[("authorization", "Bearer a")]);
        assert!(matches!(
            find(&sources, &one, None),
            Found::One { value: "a", .. }
        ));
        let twice = h(&[("authorization", "Bearer a"), ("Authorization", "Bearer a")]);
        assert_eq!(find(&sources, &twice, None), Found::Several);
        let two_sources = h(&[("authorization", "Bearer a"), ("x-internal-token", "a")]);
        assert_eq!(find(&sources, &two_sources, None), Found::Several);
        let joined = h(&[("authorization", "Bearer a,Bearer b")]);
        assert_eq!(find(&sources, &joined, None), Found::Several);
        let basic = h(&[("authorization", "Basic a")]);
        assert_eq!(find(&sources, &basic, None), Found::None);
    }

    #[test]
    fn sources_are_validated() {
        assert_eq!(parse_sources(&[]), Err(SourceError::Empty));
        assert!(matches!(
            parse_sources(&["header:authorization".into()]),
            Err(SourceError::ReservedHeader(_))
        ));
        assert!(matches!(
            parse_sources(&["header:X-Token".into()]),
            Err(SourceError::BadHeaderName(_))
        ));
        assert!(matches!(
            parse_sources(&["bearer".into(), "bearer".into()]),
            Err(SourceError::Duplicate(_))
        ));
        assert!(matches!(
            parse_sources(&["cookie:x".into()]),
            Err(SourceError::Unknown(_))
        ));
    }

    #[test]
    fn query_names_are_compared_percent_decoded() {
        assert!(query_name_is("access_token", "access_token"));
        assert!(query_name_is("%61ccess%5Ftoken", "access_token"));
        assert!(query_name_is("%61ccess%5ftoken", "access_token"));
        assert!(!query_name_is("%61ccess_toke", "access_token"));
        assert!(!query_name_is("access_token%", "access_token"));
        assert!(!query_name_is("%6", "a"));
        assert!(!query_name_is("Access_token", "access_token"));
    }

    #[test]
    fn query_credentials_are_stripped() {
        let sources = parse_sources(&["query:access_token".into()]).unwrap();
        assert_eq!(
            strip_query_credentials("a=1&access_token=x&b=2", &sources),
            "a=1&b=2"
        );
    }
}
