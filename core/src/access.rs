//! Cloudflare Access assertions (`Cf-Access-Jwt-Assertion`): parsing and every claims check.
//!
//! On rules with `cf_access: true`, a request that carries no token credential but an Access
//! assertion is an identity too. The core parses the JWT and decides on every claim; the
//! host does only what needs its platform: it finds the team key named by the assertion's
//! `kid` and verifies the RS256 signature (WebCrypto in the Worker), then hands the verdict
//! back as a [`KeyCheck`]. Like the rest of the core this module does no I/O and reads no
//! clock.
//!
//! Checks, in order: the JWT is three base64url parts of JSON, `alg` is `RS256` (nothing
//! else, so `none` and HMAC confusion are impossible), `kid` is present; the host's
//! [`KeyCheck`]; then `iss` is the origin of the configured certs URL, `aud` holds one of the
//! configured audiences, `exp` is in the future, `nbf` (if any) is not, and the subject is
//! the `email` claim or, for Access service tokens, `common_name`.

use core::fmt;

use crate::bundle::AccessConfig;
use serde::Deserialize;

use crate::jwt::{self, audiences, present_seconds, seconds_or_absent, string_or_absent};

/// The header Cloudflare Access puts on requests it let through (compared case-insensitively).
pub const ASSERTION_HEADER: &str = "cf-access-jwt-assertion";
/// The longest assertion the gate parses; Access assertions are about 1 KB.
pub const MAX_ASSERTION_LEN: usize = 16 * 1024;
/// The only signature algorithm Access uses, and so the only one accepted.
pub const ALGORITHM: &str = "RS256";
const MAX_AUDIENCES: usize = 64;
const MAX_SUBJECT_LEN: usize = 256;

/// The Access settings of a bundle, checked once when the bundle is loaded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Settings {
    certs_url: String,
    issuer: String,
    audiences: Vec<String>,
}

/// Why a bundle's `cloudflare_access` section was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum ConfigError {
    /// The certs URL is not `https://host/...` (or `http://` to a loopback host, for tests).
    CertsUrl(String),
    /// No audience, too many, or one that is empty or not visible ASCII.
    Audiences,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::CertsUrl(url) => write!(
                f,
                "cloudflare_access.certs_url {url:?} must be an https:// URL (http:// only to 127.0.0.1 or localhost)"
            ),
            Self::Audiences => write!(
                f,
                "cloudflare_access.audiences must hold 1 to {MAX_AUDIENCES} non-empty audience tags of visible ASCII"
            ),
        }
    }
}

impl std::error::Error for ConfigError {}

impl Settings {
    /// Checks the bundle's section and derives the expected issuer (the certs URL's origin).
    pub fn from_config(config: &AccessConfig) -> Result<Self, ConfigError> {
        let url = config.certs_url.as_str();
        let bad_url = || ConfigError::CertsUrl(url.to_owned());
        let (scheme, rest) = url.split_once("://").ok_or_else(bad_url)?;
        let authority = rest.split(['/', '?', '#']).next().unwrap_or_default();
        let host = crate::policy::host_of(authority);
        let loopback = matches!(&*host, "127.0.0.1" | "localhost" | "[::1]");
        let scheme_ok = scheme == "https" || (scheme == "http" && loopback);
        let authority_ok = !authority.is_empty()
            && authority
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b".-:[]".contains(&b));
        if !scheme_ok || !authority_ok || !url.bytes().all(|b| b.is_ascii_graphic()) {
            return Err(bad_url());
        }
        let audiences_ok = !config.audiences.is_empty()
            && config.audiences.len() <= MAX_AUDIENCES
            && config.audiences.iter().all(|a| {
                !a.is_empty()
                    && a.len() <= MAX_SUBJECT_LEN
                    && a.bytes().all(|b| b.is_ascii_graphic())
            });
        if !audiences_ok {
            return Err(ConfigError::Audiences);
        }
        Ok(Self {
            certs_url: url.to_owned(),
            issuer: format!("{scheme}://{}", authority.to_ascii_lowercase()),
            audiences: config.audiences.clone(),
        })
    }

    /// Where the host fetches the team's signing keys (a JWKS document).
    pub fn certs_url(&self) -> &str {
        &self.certs_url
    }

    /// The `iss` an assertion must carry: the certs URL's `scheme://host[:port]`.
    pub fn issuer(&self) -> &str {
        &self.issuer
    }
}

/// Why an assertion is not an identity. Clients see one generic 401; this is for logs.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum AccessError {
    /// Not three base64url parts of JSON objects, or longer than [`MAX_ASSERTION_LEN`].
    Malformed,
    /// `alg` is not `RS256`.
    Algorithm(String),
    /// No `kid` in the header.
    NoKeyId,
    /// The host knows no team key with this `kid`.
    UnknownKey,
    /// The RS256 signature does not verify with the team key.
    Signature,
    /// `iss` is not the team's origin.
    Issuer,
    /// `aud` holds none of the configured audiences.
    Audience,
    /// No `exp`, or `now` is at or after it.
    Expired,
    /// `now` is before `nbf`.
    NotYetValid,
    /// Neither a usable `email` nor `common_name` claim.
    NoSubject,
}

impl fmt::Display for AccessError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Malformed => f.write_str("the assertion is not a well-formed JWT"),
            Self::Algorithm(alg) => write!(f, "alg {alg:?} is not {ALGORITHM}"),
            Self::NoKeyId => f.write_str("the assertion names no kid"),
            Self::UnknownKey => f.write_str("no team key has the assertion's kid"),
            Self::Signature => f.write_str("the signature does not verify"),
            Self::Issuer => f.write_str("iss is not the team domain"),
            Self::Audience => f.write_str("aud holds no configured audience"),
            Self::Expired => f.write_str("the assertion has expired (or has no exp)"),
            Self::NotYetValid => f.write_str("the assertion is not valid yet (nbf)"),
            Self::NoSubject => f.write_str("the assertion has no usable email or common_name"),
        }
    }
}

impl std::error::Error for AccessError {}

/// Who an accepted assertion identifies.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    /// The `email` claim, or `common_name` for service tokens.
    pub subject: String,
    /// `email` for people, `service_token` for Access service tokens.
    pub kind: &'static str,
}

/// What the host found when it checked the signature.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyCheck {
    /// No team key has the assertion's `kid` (after refreshing the keys, if the host does).
    UnknownKey,
    /// The key exists and the signature does not verify.
    BadSignature,
    /// The key exists and the signature verifies.
    Verified,
}

/// A parsed assertion whose signature has not been checked yet.
#[derive(Clone)]
pub struct Assertion {
    kid: String,
    signed: Vec<u8>,
    signature: Vec<u8>,
    claims: Claims,
}

/// The claims the checks read; every other claim is skipped. A claim of the wrong type
/// reads as absent (`nbf` as present but unusable), and a repeated one makes the
/// assertion malformed: a JWT whose claims could be read two ways is refused.
#[derive(Clone, Default, Deserialize)]
struct Claims {
    #[serde(default, deserialize_with = "string_or_absent")]
    iss: Option<String>,
    /// `aud` as a string, or the strings of an `aud` array.
    #[serde(default, deserialize_with = "audiences")]
    aud: Vec<String>,
    #[serde(default, deserialize_with = "seconds_or_absent")]
    exp: Option<u64>,
    /// `Some(None)`: present, but not a usable NumericDate.
    #[serde(default, deserialize_with = "present_seconds")]
    nbf: Option<Option<u64>>,
    #[serde(default, deserialize_with = "string_or_absent")]
    email: Option<String>,
    #[serde(default, deserialize_with = "string_or_absent")]
    common_name: Option<String>,
}

impl fmt::Debug for Assertion {
    // The claims hold a person's email: keep them out of debug output.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Assertion")
            .field("kid", &self.kid)
            .finish_non_exhaustive()
    }
}

impl Assertion {
    /// Parses the JWT and checks its header: `alg` must be `RS256` and `kid` present.
    pub fn parse(jwt: &str) -> Result<Self, AccessError> {
        let jws = jwt::split(jwt, MAX_ASSERTION_LEN).ok_or(AccessError::Malformed)?;
        let claims: Claims =
            serde_json::from_slice(&jws.payload).map_err(|_| AccessError::Malformed)?;
        match jws.header.alg.as_deref() {
            Some(ALGORITHM) => {}
            Some(other) => return Err(AccessError::Algorithm(other.to_owned())),
            None => return Err(AccessError::Algorithm(String::new())),
        }
        let kid = jws
            .header
            .kid
            .filter(|kid| !kid.is_empty())
            .ok_or(AccessError::NoKeyId)?;
        Ok(Self {
            kid,
            signed: jws.signed.to_vec(),
            signature: jws.signature,
            claims,
        })
    }

    /// The `kid` the host looks the team key up by.
    pub fn kid(&self) -> &str {
        &self.kid
    }

    /// The bytes the RS256 signature covers (`<header>.<payload>`, as sent).
    pub fn signed_bytes(&self) -> &[u8] {
        &self.signed
    }

    /// The raw signature.
    pub fn signature(&self) -> &[u8] {
        &self.signature
    }

    /// Every check after the parse: the host's key verdict, then `iss`, `aud`, `exp`, `nbf`
    /// and the subject.
    pub fn check(
        &self,
        key: KeyCheck,
        settings: &Settings,
        now: u64,
    ) -> Result<Identity, AccessError> {
        match key {
            KeyCheck::UnknownKey => return Err(AccessError::UnknownKey),
            KeyCheck::BadSignature => return Err(AccessError::Signature),
            KeyCheck::Verified => {}
        }
        let claims = &self.claims;
        if claims.iss.as_deref() != Some(settings.issuer()) {
            return Err(AccessError::Issuer);
        }
        if !claims
            .aud
            .iter()
            .any(|aud| settings.audiences.contains(aud))
        {
            return Err(AccessError::Audience);
        }
        // Same boundaries as token lifetimes: invalid at exp, valid from nbf on.
        match claims.exp {
            Some(exp) if now < exp => {}
            _ => return Err(AccessError::Expired),
        }
        if let Some(nbf) = claims.nbf {
            match nbf {
                Some(nbf) if now >= nbf => {}
                _ => return Err(AccessError::NotYetValid),
            }
        }
        if let Some(email) = jwt::usable(&claims.email) {
            return Ok(Identity {
                subject: email,
                kind: "email",
            });
        }
        if let Some(name) = jwt::usable(&claims.common_name) {
            return Ok(Identity {
                subject: name,
                kind: "service_token",
            });
        }
        Err(AccessError::NoSubject)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::Value;

    use crate::jwt::tests::b64;

    fn jwt(header: Value, claims: Value) -> String {
        format!(
            "{}.{}.{}",
            b64(header.to_string().as_bytes()),
            b64(claims.to_string().as_bytes()),
            b64(b"not checked here")
        )
    }

    fn settings() -> Settings {
        Settings::from_config(&AccessConfig {
            certs_url: "https://team.cloudflareaccess.com/cdn-cgi/access/certs".into(),
            audiences: vec!["aud-1".into(), "aud-2".into()],
        })
        .unwrap()
    }

    fn claims() -> Value {
        serde_json::json!({
            "iss": "https://team.cloudflareaccess.com",
            "aud": ["aud-2"],
            "email": "ada@example.com",
            "exp": 2_000,
            "nbf": 1_000,
        })
    }

    const RS256: fn() -> Value = || serde_json::json!({"alg": "RS256", "kid": "k1"});

    #[test]
    fn header_must_be_rs256_with_a_kid() {
        let ok = Assertion::parse(&jwt(RS256(), claims())).unwrap();
        assert_eq!(ok.kid(), "k1");
        assert_eq!(ok.signature(), b"not checked here");
        let text = jwt(RS256(), claims());
        let dot = text.rfind('.').unwrap();
        assert_eq!(ok.signed_bytes(), &text.as_bytes()[..dot]);
        for alg in ["HS256", "none", "RS512", "ES256"] {
            let header = serde_json::json!({"alg": alg, "kid": "k1"});
            assert_eq!(
                Assertion::parse(&jwt(header, claims())).err(),
                Some(AccessError::Algorithm(alg.into()))
            );
        }
        let no_kid = serde_json::json!({"alg": "RS256"});
        assert_eq!(
            Assertion::parse(&jwt(no_kid, claims())).err(),
            Some(AccessError::NoKeyId)
        );
        for garbage in [
            "",
            "a.b",
            "a.b.c.d",
            "!!.!!.!!",
            &format!("{}.e30.", b64(b"{}")),
        ] {
            assert!(Assertion::parse(garbage).is_err(), "{garbage:?}");
        }
    }

    #[test]
    fn claims_are_checked_after_the_key() {
        let s = settings();
        let parse = |c: Value| Assertion::parse(&jwt(RS256(), c)).unwrap();
        let good = parse(claims());
        assert_eq!(
            good.check(KeyCheck::Verified, &s, 1_500),
            Ok(Identity {
                subject: "ada@example.com".into(),
                kind: "email"
            })
        );
        assert_eq!(
            good.check(KeyCheck::UnknownKey, &s, 1_500),
            Err(AccessError::UnknownKey)
        );
        assert_eq!(
            good.check(KeyCheck::BadSignature, &s, 1_500),
            Err(AccessError::Signature)
        );
        assert_eq!(
            good.check(KeyCheck::Verified, &s, 2_000),
            Err(AccessError::Expired)
        );
        assert!(good.check(KeyCheck::Verified, &s, 1_999).is_ok());
        assert_eq!(
            good.check(KeyCheck::Verified, &s, 999),
            Err(AccessError::NotYetValid)
        );
        assert!(good.check(KeyCheck::Verified, &s, 1_000).is_ok());

        let mut c = claims();
        c["aud"] = "aud-3".into();
        assert_eq!(
            parse(c).check(KeyCheck::Verified, &s, 1_500),
            Err(AccessError::Audience)
        );
        let mut c = claims();
        c["aud"] = "aud-1".into();
        assert!(parse(c).check(KeyCheck::Verified, &s, 1_500).is_ok());
        let mut c = claims();
        c["iss"] = "https://evil.cloudflareaccess.com".into();
        assert_eq!(
            parse(c).check(KeyCheck::Verified, &s, 1_500),
            Err(AccessError::Issuer)
        );
        let mut c = claims();
        c.as_object_mut().unwrap().remove("exp");
        assert_eq!(
            parse(c).check(KeyCheck::Verified, &s, 1_500),
            Err(AccessError::Expired)
        );
        let mut c = claims();
        c["email"] = "".into();
        c["common_name"] = "abc123.access".into();
        assert_eq!(
            parse(c)
                .check(KeyCheck::Verified, &s, 1_500)
                .map(|i| (i.subject, i.kind)),
            Ok(("abc123.access".into(), "service_token"))
        );
        let mut c = claims();
        c["email"] = "ada@example.com\r\nx-evil: 1".into();
        assert_eq!(
            parse(c).check(KeyCheck::Verified, &s, 1_500),
            Err(AccessError::NoSubject)
        );
    }

    #[test]
    fn claims_are_read_one_way_only() {
        let s = settings();
        let with = |claims: &str| {
            let text = format!(
                "{}.{}.{}",
                b64(br#"{"alg":"RS256","kid":"k1"}"#),
                b64(claims.as_bytes()),
                b64(b"sig")
            );
            Assertion::parse(&text).and_then(|a| a.check(KeyCheck::Verified, &s, 1_500))
        };
        let base = r#""iss":"https://team.cloudflareaccess.com","aud":["aud-2"],"nbf":1000,"email":"ada@example.com""#;
        assert!(with(&format!("{{{base},\"exp\":2000}}")).is_ok());
        // A claim given twice could be read either way: the assertion is malformed, even
        // when the copies agree, and even when one is spelled with an escape.
        for repeated in [r#""exp":2000,"exp":9999"#, r#""exp":2000,"\u0065xp":2000"#] {
            assert_eq!(
                with(&format!("{{{base},{repeated}}}")),
                Err(AccessError::Malformed)
            );
        }
        let header = format!(
            "{}.{}.{}",
            b64(br#"{"alg":"RS256","alg":"none","kid":"k1"}"#),
            b64(b"{}"),
            b64(b"sig")
        );
        assert_eq!(
            Assertion::parse(&header).err(),
            Some(AccessError::Malformed)
        );
        // NumericDate: a fraction is dropped; negative, exponent or non-number exp is unusable.
        assert!(with(&format!("{{{base},\"exp\":1500.9}}")).is_err());
        assert!(with(&format!("{{{base},\"exp\":1501.2}}")).is_ok());
        for exp in ["-1", "2e3", "\"2000\"", "null", "[2000]"] {
            assert_eq!(
                with(&format!("{{{base},\"exp\":{exp}}}")),
                Err(AccessError::Expired),
                "{exp}"
            );
        }
        // An nbf that is present but unusable is not "no nbf".
        let no_nbf = base.replace(r#","nbf":1000"#, "");
        assert!(with(&format!("{{{no_nbf},\"exp\":2000}}")).is_ok());
        assert_eq!(
            with(&format!("{{{no_nbf},\"nbf\":\"x\",\"exp\":2000}}")),
            Err(AccessError::NotYetValid)
        );
        // Other claims of any shape are skipped; a non-string aud entry is not an audience.
        assert!(with(&format!(
            "{{{base},\"exp\":2000,\"custom\":{{\"a\":[1,2.5,null]}}}}"
        ))
        .is_ok());
        let aud = base.replace(r#"["aud-2"]"#, r#"[2,{"x":"aud-2"}]"#);
        assert_eq!(
            with(&format!("{{{aud},\"exp\":2000}}")),
            Err(AccessError::Audience)
        );
    }

    /// The decision around an assertion: only on `cf_access` rules, only without a token,
    /// scopes still apply, identity headers for the upstream.
    #[test]
    fn gate_turns_an_assertion_into_an_identity() {
        use crate::decision::{Outcome, Reason, Request, Step, ACCESS_HEADER, SUBJECT_HEADER};
        use crate::{Bundle, Gate};
        let bundle: Bundle = serde_json::from_value(serde_json::json!({
            "version": 1, "issued_at": 0, "environment": "prod", "target": "worker",
            "keys": ["d75a980182b10ab7d54bfed3c964073a0ee172f3daa62325af021a68f707511a"],
            "policy": {"rules": [
                {"name": "app", "path": {"prefix": "/app"}, "access": "token", "cf_access": true},
                {"name": "scoped", "path": {"prefix": "/scoped"}, "access": "token",
                 "all_of": ["orders:read"], "cf_access": true},
                {"name": "plain", "path": {"prefix": "/plain"}, "access": "token"}
            ]},
            "credentials": {"sources": ["bearer"]},
            "tokens": [], "revoke_all_at": null,
            "cloudflare_access": {
                "certs_url": "https://team.cloudflareaccess.com/cdn-cgi/access/certs",
                "audiences": ["aud-1"]
            }
        }))
        .unwrap();
        let access = Settings::from_config(bundle.cloudflare_access.as_ref().unwrap()).unwrap();
        let gate = Gate::from_bundle(bundle).unwrap();
        let mut c = claims();
        c["aud"] = "aud-1".into();
        let assertion = jwt(RS256(), c);
        fn headers<'a>(pairs: &[(&'a str, &'a str)]) -> Vec<(&'a str, &'a str)> {
            pairs.to_vec()
        }
        let with_jwt = headers(&[
            ("Cf-Access-Jwt-Assertion", &assertion),
            ("x-tokengate-subject", "x"),
        ]);
        fn request<'a>(path: &'a str, headers: &'a [(&'a str, &'a str)]) -> Request<'a> {
            Request {
                method: "GET",
                path,
                authority: "a",
                headers,
            }
        }
        let with_jwt = with_jwt.as_slice();

        let Step::Access(pending) =
            gate.begin_with_access(&request("/app/x", with_jwt), Some(&access), 1_500)
        else {
            panic!("expected an Access step")
        };
        assert_eq!(pending.assertion.kid(), "k1");
        let allowed = gate.finish_access(pending, KeyCheck::Verified, 1_500);
        assert_eq!(
            (allowed.outcome, allowed.reason),
            (Outcome::Allow, Reason::Access)
        );
        assert!(allowed
            .add_headers
            .contains(&(SUBJECT_HEADER, "ada@example.com".into())));
        assert!(allowed
            .add_headers
            .contains(&(ACCESS_HEADER, "email".into())));
        assert!(allowed
            .remove_headers
            .contains(&"x-tokengate-subject".to_owned()));

        let Step::Access(pending) =
            gate.begin_with_access(&request("/app/x", with_jwt), Some(&access), 1_500)
        else {
            panic!("expected an Access step")
        };
        let bad = gate.finish_access(pending, KeyCheck::BadSignature, 1_500);
        assert_eq!((bad.status(), bad.reason), (401, Reason::AccessInvalid));

        let Step::Access(pending) =
            gate.begin_with_access(&request("/scoped", with_jwt), Some(&access), 1_500)
        else {
            panic!("expected an Access step")
        };
        let scoped = gate.finish_access(pending, KeyCheck::Verified, 1_500);
        assert_eq!(
            (scoped.status(), scoped.reason),
            (403, Reason::InsufficientScope)
        );

        // Not a cf_access rule, or a host that cannot verify: no identity, no credential.
        for (path, settings) in [("/plain", Some(&access)), ("/app", None)] {
            let Step::Done(d) = gate.begin_with_access(&request(path, with_jwt), settings, 1_500)
            else {
                panic!("expected a final decision")
            };
            assert_eq!((d.status(), d.reason), (401, Reason::NoCredential));
        }
        // A token credential wins over an assertion.
        let both = headers(&[
            ("authorization", "Bearer some-opaque-secret-value"),
            ("cf-access-jwt-assertion", &assertion),
        ]);
        assert!(matches!(
            gate.begin_with_access(&request("/app", &both), Some(&access), 1_500),
            Step::Lookup(_)
        ));
        let twice = headers(&[
            ("cf-access-jwt-assertion", &assertion),
            ("cf-access-jwt-assertion", &assertion),
        ]);
        let Step::Done(d) = gate.begin_with_access(&request("/app", &twice), Some(&access), 1_500)
        else {
            panic!("expected a final decision")
        };
        assert_eq!(d.status(), 400);
        let garbage = headers(&[("cf-access-jwt-assertion", "not.a.jwt")]);
        let Step::Done(d) =
            gate.begin_with_access(&request("/app", &garbage), Some(&access), 1_500)
        else {
            panic!("expected a final decision")
        };
        assert_eq!((d.status(), d.reason), (401, Reason::AccessInvalid));
    }

    #[test]
    fn settings_are_validated() {
        let config = |url: &str, auds: &[&str]| AccessConfig {
            certs_url: url.into(),
            audiences: auds.iter().map(|a| (*a).to_owned()).collect(),
        };
        let local = Settings::from_config(&config("http://127.0.0.1:8787/certs", &["a"])).unwrap();
        assert_eq!(local.issuer(), "http://127.0.0.1:8787");
        for bad in [
            "http://team.example.com/certs",
            "ftp://x/y",
            "https:///x",
            "team/certs",
        ] {
            assert!(
                matches!(
                    Settings::from_config(&config(bad, &["a"])),
                    Err(ConfigError::CertsUrl(_))
                ),
                "{bad}"
            );
        }
        assert_eq!(
            Settings::from_config(&config("https://t.example.com/c", &[])),
            Err(ConfigError::Audiences)
        );
        assert_eq!(
            Settings::from_config(&config("https://t.example.com/c", &[""])),
            Err(ConfigError::Audiences)
        );
    }
}
