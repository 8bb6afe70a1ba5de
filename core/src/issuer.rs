//! Signed short-lived tokens: the issuers a bundle trusts, and the check of one token.
//!
//! A signed token is a JWT (compact JWS, read by [`crate::jwt`]) that a trusted issuer
//! signed: tokengate's own with Ed25519 (`EdDSA`, RFC 8037, public key in the bundle), an
//! existing in-house issuer with HMAC-SHA256 (`HS256`, its secret given to each gate beside
//! the bundle, [`IssuerSecrets`]). Every gate accepts one at once, no push needed, until it
//! expires. Checks, in order:
//! 1. three base64url parts of JSON, at most [`MAX_JWT_LEN`] bytes;
//! 2. `kid` names an issuer of the bundle (else `unknown_issuer`);
//! 3. `alg` is exactly that issuer's algorithm (`none`, a swap to `HS256` with a public key as
//!    the secret, anything else: `jwt_invalid`), and the signature verifies;
//! 4. `sub` and `jti` are 1 to 256 visible ASCII characters, `exp` and `iat` are NumericDates,
//!    `nbf` if present too, `scope` if present a string of valid scopes, `aud` names the
//!    issuer's audience if it has one (else `jwt_invalid`);
//! 5. within the issuer's grant: every scope covered by its patterns, `exp - iat` at most
//!    its maximum lifetime (else `beyond_grant`, whatever the signature says);
//! 6. not revoked: its `(kid, jti)` is not in the bundle's revoked list, its `iat` is after a
//!    revoke-all cut-off;
//! 7. the clock, with [`LEEWAY_SECONDS`] either way and no more: `iat` and `nbf` not later
//!    than now + leeway, now earlier than `exp` + leeway.

use core::fmt;
use std::collections::HashSet;

use ed25519_dalek::{Signature, VerifyingKey};
use hmac::{Hmac, Mac};
use serde::{Deserialize, Serialize};
use sha2::Sha256;

use crate::jwt::{
    self, audiences, present_seconds, present_string, seconds_or_absent, string_or_absent,
};
use crate::keys::{KeySet, PUBLIC_KEY_LEN};
use crate::policy;
use crate::verified::Verified;

/// The longest signed token a gate reads.
pub const MAX_JWT_LEN: usize = 4096;
/// Clock skew tolerated on `exp`, `nbf` and `iat`, either way: hosts keep NTP time, and a
/// token lives minutes to hours, so half a minute covers a runner's drift without
/// stretching anyone's lifetime much.
pub const LEEWAY_SECONDS: u64 = 30;
/// The longest maximum lifetime a bundle may give an issuer (ten years: a format bound; the
/// CLI holds issuers to far less).
pub const MAX_LIFETIME_BOUND: u64 = 10 * 365 * 24 * 3600;
/// Issuers one bundle may name.
pub const MAX_ISSUERS: usize = 64;
/// Revoked token ids one bundle may carry: they last only as long as the tokens they name
/// (a week at most, with the CLI), and a Worker keeps them in one Durable Object value.
pub const MAX_REVOKED: usize = 10_000;
/// The shortest HS256 secret a gate takes (RFC 7518 §3.2: at least the hash's size).
pub const MIN_SECRET_LEN: usize = 32;

/// Whether an issuer's scope patterns grant `scope` (itself a scope or a pattern).
pub fn grants(patterns: &[String], scope: &str) -> bool {
    crate::gate::covers(patterns, scope)
}

/// The one algorithm an issuer signs with.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Algorithm {
    /// Ed25519 (RFC 8037): tokengate's own issuers; the public key travels in the bundle.
    #[serde(rename = "EdDSA")]
    EdDsa,
    /// HMAC-SHA256: an existing in-house issuer; its secret is a gate secret.
    #[serde(rename = "HS256")]
    Hs256,
}

impl Algorithm {
    /// The `alg` a token of this issuer carries.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::EdDsa => "EdDSA",
            Self::Hs256 => "HS256",
        }
    }
}

impl fmt::Display for Algorithm {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A trusted issuer as the bundle names it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IssuerConfig {
    /// The key id tokens name in their header (`[a-z0-9][a-z0-9._-]{0,63}`).
    pub kid: String,
    /// The only algorithm its tokens may use.
    pub alg: Algorithm,
    /// EdDSA: the issuer's Ed25519 public key, 64 hex. HS256: absent (a gate secret).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub public_key: Option<String>,
    /// When set, its tokens must name it in `aud`: an issuer that also signs JWTs for other
    /// purposes (sessions, other services) gets no tokengate access with those.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub audience: Option<String>,
    /// The scopes it may grant (`x:y`, `x:*`, `*`).
    pub scopes: Vec<String>,
    /// The longest lifetime (`exp - iat`, seconds) of a token it signs.
    pub max_lifetime: u64,
}

/// A signed token revoked before its expiry.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RevokedJti {
    /// The issuer's key id.
    pub issuer: String,
    /// The token's `jti`.
    pub jti: String,
}

/// Why a bundle's issuers or revoked ids were refused.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum IssuerError {
    /// More than [`MAX_ISSUERS`] issuers, or more than [`MAX_REVOKED`] revoked ids.
    TooMany,
    /// Something about one issuer, named by its kid.
    Issuer {
        /// The issuer's kid.
        kid: String,
        /// What is wrong.
        problem: &'static str,
    },
    /// Two issuers share a kid.
    DuplicateKid(String),
    /// A revoked id is empty, too long or not visible ASCII, or given twice.
    BadRevocation(String),
}

impl fmt::Display for IssuerError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::TooMany => write!(
                f,
                "at most {MAX_ISSUERS} issuers and {MAX_REVOKED} revoked token ids"
            ),
            Self::Issuer { kid, problem } => write!(f, "issuer {kid:?}: {problem}"),
            Self::DuplicateKid(kid) => write!(f, "two issuers have kid {kid:?}"),
            Self::BadRevocation(jti) => write!(f, "revoked jti {jti:?} is malformed or repeated"),
        }
    }
}

impl std::error::Error for IssuerError {}

/// How a gate verifies one issuer's signatures.
#[derive(Debug, Clone)]
enum Verifier {
    Ed25519(VerifyingKey),
    Hs256,
}

impl Verifier {
    /// The algorithm it verifies: the only one its issuer's tokens may name.
    fn alg(&self) -> Algorithm {
        match self {
            Self::Ed25519(_) => Algorithm::EdDsa,
            Self::Hs256 => Algorithm::Hs256,
        }
    }
}

#[derive(Debug, Clone)]
struct Issuer {
    kid: String,
    audience: Option<String>,
    verifier: Verifier,
    scopes: Vec<String>,
    max_lifetime: u64,
}

/// A bundle's issuers and revoked ids, checked.
#[derive(Debug, Clone, Default)]
pub struct Issuers {
    issuers: Vec<Issuer>,
    revoked: HashSet<RevokedJti>,
    /// Tokens whose Ed25519 signature verified already (HS256 is cheap enough to redo).
    verified: Verified,
}

/// The variable (Envoy's environment, a Worker secret) that gives a gate its HS256 secrets.
pub const SECRETS_VARIABLE: &str = "TOKENGATE_ISSUER_SECRETS";

/// HS256 secrets by issuer kid: given to a gate beside its bundle (a Worker secret, Envoy's
/// environment), never in it.
#[derive(Clone, Default)]
pub struct IssuerSecrets(Vec<(String, Vec<u8>)>);

impl fmt::Debug for IssuerSecrets {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let kids: Vec<&str> = self.0.iter().map(|(kid, _)| kid.as_str()).collect();
        write!(f, "IssuerSecrets({kids:?})")
    }
}

impl IssuerSecrets {
    /// From `kid=<base64url secret>` entries separated by commas or white space (the
    /// `TOKENGATE_ISSUER_SECRETS` variable). The error never holds a secret.
    pub fn parse(text: &str) -> Result<Self, String> {
        let mut out: Vec<(String, Vec<u8>)> = Vec::new();
        let entries = text
            .split(|c: char| c == ',' || c.is_whitespace())
            .filter(|e| !e.is_empty());
        for (n, entry) in entries.enumerate() {
            // An entry is named by its position, never by any of its text: in a value
            // written wrong, what looks like a kid may be a secret.
            let position = n + 1;
            let (kid, secret) = entry
                .split_once('=')
                .filter(|(kid, _)| policy::valid_name(kid))
                .ok_or_else(|| format!("entry {position} is not kid=<base64url secret>"))?;
            let secret = jwt::base64url_decode(secret)
                .ok_or_else(|| format!("entry {position}: the secret is not unpadded base64url"))?;
            if secret.len() < MIN_SECRET_LEN {
                return Err(format!(
                    "entry {position}: the secret must be at least {MIN_SECRET_LEN} bytes"
                ));
            }
            if out.iter().any(|(k, _)| k == kid) {
                return Err(format!("entry {position}: its kid is given twice"));
            }
            out.push((kid.to_owned(), secret));
        }
        Ok(Self(out))
    }

    fn get(&self, kid: &str) -> Option<&[u8]> {
        self.0
            .iter()
            .find(|(k, _)| k == kid)
            .map(|(_, s)| s.as_slice())
    }

    /// The kids it holds a secret for.
    pub fn kids(&self) -> impl Iterator<Item = &str> {
        self.0.iter().map(|(kid, _)| kid.as_str())
    }
}

/// Who a valid signed token identifies.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    /// `sub`.
    pub subject: String,
    /// `jti`.
    pub jti: String,
    /// The issuer's kid.
    pub issuer: String,
    /// `scope`, split.
    pub scopes: Vec<String>,
    /// `scope` as sent, for `x-tokengate-scopes`.
    pub scope_header: String,
}

/// Why a signed token was refused; each is one [`crate::Reason`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// Malformed, wrong `alg`, bad signature, a missing or unusable claim.
    Invalid,
    /// `kid` names no issuer of the bundle.
    UnknownIssuer,
    /// An HS256 issuer whose secret this gate was not given: it cannot check (503).
    NoSecret,
    /// A scope or lifetime beyond the issuer's grant.
    BeyondGrant,
    /// Its `jti` is revoked.
    Revoked,
    /// Issued at or before the revoke-all cut-off.
    RevokedAll,
    /// `iat` or `nbf` later than now + leeway.
    NotYetValid,
    /// now at or after `exp` + leeway.
    Expired,
}

/// A refused signed token: why, its issuer once its `kid` named one, and whom it names once
/// its signature verified (for logs).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refused {
    /// Why.
    pub refusal: Refusal,
    /// The issuer its `kid` named (one of the bundle's).
    pub kid: Option<String>,
    /// The token's identity, when its signature verified and its claims could be read.
    pub identity: Option<Box<Identity>>,
}

impl From<Refusal> for Refused {
    fn from(refusal: Refusal) -> Self {
        Self {
            refusal,
            kid: None,
            identity: None,
        }
    }
}

/// The claims the checks read; others are skipped.
#[derive(Deserialize)]
struct Claims {
    #[serde(default, deserialize_with = "string_or_absent")]
    sub: Option<String>,
    #[serde(default, deserialize_with = "string_or_absent")]
    jti: Option<String>,
    /// `Some(None)`: present, but not a string.
    #[serde(default, deserialize_with = "present_string")]
    scope: Option<Option<String>>,
    #[serde(default, deserialize_with = "seconds_or_absent")]
    exp: Option<u64>,
    #[serde(default, deserialize_with = "seconds_or_absent")]
    iat: Option<u64>,
    #[serde(default, deserialize_with = "present_seconds")]
    nbf: Option<Option<u64>>,
    #[serde(default, deserialize_with = "audiences")]
    aud: Vec<String>,
}

impl Issuers {
    /// Checks a bundle's issuers and revoked ids. An issuer's public key may not be one of the
    /// admin's (`keys`): a key signs bundles or tokens, never both.
    pub fn new(
        configs: &[IssuerConfig],
        revoked: &[RevokedJti],
        admin_keys: &KeySet,
    ) -> Result<Self, IssuerError> {
        if configs.len() > MAX_ISSUERS || revoked.len() > MAX_REVOKED {
            return Err(IssuerError::TooMany);
        }
        let mut issuers: Vec<Issuer> = Vec::with_capacity(configs.len());
        for config in configs {
            let problem = |problem| IssuerError::Issuer {
                kid: config.kid.clone(),
                problem,
            };
            if !policy::valid_name(&config.kid) {
                return Err(problem("kid must match [a-z0-9][a-z0-9._-]{0,63}"));
            }
            if issuers.iter().any(|i| i.kid == config.kid) {
                return Err(IssuerError::DuplicateKid(config.kid.clone()));
            }
            if config.scopes.is_empty()
                || config.scopes.len() > policy::MAX_SCOPES
                || !config.scopes.iter().all(|s| policy::valid_grant(s))
            {
                return Err(problem(
                    "scopes must be 1 to 64 grants of 'x:y', 'x:*' or '*'",
                ));
            }
            if !(1..=MAX_LIFETIME_BOUND).contains(&config.max_lifetime) {
                return Err(problem("max_lifetime must be 1 second to 10 years"));
            }
            let verifier = match (config.alg, &config.public_key) {
                (Algorithm::EdDsa, Some(hex)) => {
                    let bytes = crate::hex::decode::<PUBLIC_KEY_LEN>(hex)
                        .ok_or_else(|| problem("public_key must be 64 lower-case hex"))?;
                    let key = VerifyingKey::from_bytes(&bytes)
                        .ok()
                        .filter(|k| !k.is_weak())
                        .ok_or_else(|| problem("public_key is not a usable Ed25519 key"))?;
                    if admin_keys.keys().iter().any(|k| k.to_hex() == *hex) {
                        return Err(problem(
                            "public_key is an admin key; a key signs bundles or tokens, never both",
                        ));
                    }
                    Verifier::Ed25519(key)
                }
                (Algorithm::EdDsa, None) => {
                    return Err(problem("an EdDSA issuer needs public_key"))
                }
                (Algorithm::Hs256, None) => Verifier::Hs256,
                (Algorithm::Hs256, Some(_)) => {
                    return Err(problem(
                        "an HS256 issuer has no public_key: its secret is a gate secret",
                    ))
                }
            };
            if config
                .audience
                .as_deref()
                .is_some_and(|aud| !jwt::is_usable(aud))
            {
                return Err(problem(
                    "audience must be 1 to 256 visible ASCII characters",
                ));
            }
            issuers.push(Issuer {
                kid: config.kid.clone(),
                audience: config.audience.clone(),
                verifier,
                scopes: config.scopes.clone(),
                max_lifetime: config.max_lifetime,
            });
        }
        let mut set = HashSet::with_capacity(revoked.len());
        for entry in revoked {
            if !jwt::is_usable(&entry.jti)
                || !policy::valid_name(&entry.issuer)
                || !set.insert(entry.clone())
            {
                return Err(IssuerError::BadRevocation(entry.jti.clone()));
            }
        }
        Ok(Self {
            issuers,
            revoked: set,
            verified: Verified::default(),
        })
    }

    /// The kids of its HS256 issuers.
    pub fn hs256_kids(&self) -> impl Iterator<Item = &str> {
        self.issuers
            .iter()
            .filter(|i| i.verifier.alg() == Algorithm::Hs256)
            .map(|i| i.kid.as_str())
    }

    /// Every check of a signed token at `now` (see the module's list).
    pub fn check(
        &self,
        token: &str,
        secrets: &IssuerSecrets,
        revoke_all_at: Option<u64>,
        now: u64,
    ) -> Result<Identity, Refused> {
        let jws = jwt::split(token, MAX_JWT_LEN).ok_or(Refusal::Invalid)?;
        let kid = jws.header.kid.as_deref().ok_or(Refusal::UnknownIssuer)?;
        let issuer = self
            .issuers
            .iter()
            .find(|i| i.kid == kid)
            .ok_or(Refusal::UnknownIssuer)?;
        // From here a refusal names the issuer (one of the bundle's kids, for the logs).
        self.check_issued(issuer, token, &jws, secrets, revoke_all_at, now)
            .map_err(|refused| Refused {
                kid: Some(issuer.kid.clone()),
                ..refused
            })
    }

    /// The checks of a token whose `kid` named `issuer`.
    fn check_issued(
        &self,
        issuer: &Issuer,
        token: &str,
        jws: &jwt::Compact<'_>,
        secrets: &IssuerSecrets,
        revoke_all_at: Option<u64>,
        now: u64,
    ) -> Result<Identity, Refused> {
        let kid = issuer.kid.as_str();
        // The issuer fixes the algorithm; the token's `alg` only has to agree with it.
        if jws.header.alg.as_deref() != Some(issuer.verifier.alg().as_str()) {
            return Err(Refusal::Invalid.into());
        }
        let verified = match &issuer.verifier {
            Verifier::Ed25519(key) => {
                let remembered = Verified::key(token);
                self.verified.contains(&remembered) || {
                    let good = Signature::from_slice(&jws.signature)
                        .is_ok_and(|sig| key.verify_strict(jws.signed, &sig).is_ok());
                    if good {
                        self.verified.insert(remembered);
                    }
                    good
                }
            }
            Verifier::Hs256 => {
                let secret = secrets.get(kid).ok_or(Refusal::NoSecret)?;
                Hmac::<Sha256>::new_from_slice(secret).is_ok_and(|mut mac| {
                    mac.update(jws.signed);
                    // Constant-time comparison.
                    mac.verify_slice(&jws.signature).is_ok()
                })
            }
        };
        if !verified {
            return Err(Refusal::Invalid.into());
        }
        let claims: Claims = serde_json::from_slice(&jws.payload).map_err(|_| Refusal::Invalid)?;
        let (Some(subject), Some(jti), Some(exp), Some(iat)) = (
            jwt::usable(&claims.sub),
            jwt::usable(&claims.jti),
            claims.exp,
            claims.iat,
        ) else {
            return Err(Refusal::Invalid.into());
        };
        let nbf = match claims.nbf {
            None => None,
            Some(Some(nbf)) => Some(nbf),
            Some(None) => return Err(Refusal::Invalid.into()),
        };
        let scope_header = match claims.scope {
            None => String::new(),
            Some(Some(scope)) => scope,
            Some(None) => return Err(Refusal::Invalid.into()),
        };
        let scopes: Vec<String> = match scope_header.as_str() {
            "" => Vec::new(),
            listed => listed.split(' ').map(str::to_owned).collect(),
        };
        if scopes.len() > policy::MAX_SCOPES || !scopes.iter().all(|s| policy::valid_grant(s)) {
            return Err(Refusal::Invalid.into());
        }
        let audience_ok = issuer
            .audience
            .as_ref()
            .is_none_or(|audience| claims.aud.contains(audience));
        if exp <= iat || !audience_ok {
            return Err(Refusal::Invalid.into());
        }
        let within_grant =
            exp - iat <= issuer.max_lifetime && scopes.iter().all(|s| grants(&issuer.scopes, s));
        let revoked = RevokedJti {
            issuer: issuer.kid.clone(),
            jti,
        };
        let latest_start = now.saturating_add(LEEWAY_SECONDS);
        // From here the token is the issuer's: a refusal names whom it refused.
        let refusal = if !within_grant {
            Some(Refusal::BeyondGrant)
        } else if self.revoked.contains(&revoked) {
            Some(Refusal::Revoked)
        } else if revoke_all_at.is_some_and(|cutoff| iat <= cutoff) {
            Some(Refusal::RevokedAll)
        } else if iat > latest_start || nbf.is_some_and(|nbf| nbf > latest_start) {
            Some(Refusal::NotYetValid)
        } else if now >= exp.saturating_add(LEEWAY_SECONDS) {
            Some(Refusal::Expired)
        } else {
            None
        };
        let identity = Identity {
            subject,
            jti: revoked.jti,
            issuer: revoked.issuer,
            scopes,
            scope_header,
        };
        match refusal {
            None => Ok(identity),
            Some(refusal) => Err(Refused {
                refusal,
                kid: None,
                identity: Some(Box::new(identity)),
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::jwt::tests::b64;
    use ed25519_dalek::{Signer, SigningKey};

    const ADMIN: &str = "d75a980182b10ab7d54bfed3c964073a0ee172f3daa62325af021a68f707511a";
    const SECRET: &[u8; 32] = b"an in-house issuer's 32B secret!";
    const NOW: u64 = 1_000_000;

    fn ci_key() -> SigningKey {
        SigningKey::from_bytes(&[7; 32])
    }

    fn configs() -> Vec<IssuerConfig> {
        vec![
            IssuerConfig {
                kid: "ci".into(),
                alg: Algorithm::EdDsa,
                public_key: Some(crate::hex::encode(ci_key().verifying_key().as_bytes())),
                audience: None,
                scopes: vec!["deploy:*".into(), "orders:read".into()],
                max_lifetime: 3600,
            },
            IssuerConfig {
                kid: "legacy".into(),
                alg: Algorithm::Hs256,
                public_key: None,
                audience: None,
                scopes: vec!["orders:*".into()],
                max_lifetime: 900,
            },
        ]
    }

    fn issuers() -> Issuers {
        let revoked = [RevokedJti {
            issuer: "ci".into(),
            jti: "gone".into(),
        }];
        Issuers::new(&configs(), &revoked, &KeySet::from_hex(&[ADMIN]).unwrap()).unwrap()
    }

    fn secrets() -> IssuerSecrets {
        IssuerSecrets::parse(&format!("legacy={}", b64(SECRET))).unwrap()
    }

    /// A token with `header` and `claims`, signed as `alg` says: EdDSA by the ci key, HS256
    /// with `hmac_key`.
    fn token(header: serde_json::Value, claims: serde_json::Value, hmac_key: &[u8]) -> String {
        let signed = format!(
            "{}.{}",
            b64(header.to_string().as_bytes()),
            b64(claims.to_string().as_bytes())
        );
        let signature = match header["alg"].as_str() {
            Some("EdDSA") => ci_key().sign(signed.as_bytes()).to_bytes().to_vec(),
            Some("HS256") => {
                let mut mac = Hmac::<Sha256>::new_from_slice(hmac_key).unwrap();
                mac.update(signed.as_bytes());
                mac.finalize().into_bytes().to_vec()
            }
            _ => Vec::new(),
        };
        format!("{signed}.{}", b64(&signature))
    }

    fn claims() -> serde_json::Value {
        serde_json::json!({"sub": "deploy-job", "jti": "j1", "scope": "deploy:prod orders:read",
                           "iat": NOW - 60, "exp": NOW + 600})
    }

    fn ed(claims: serde_json::Value) -> String {
        token(
            serde_json::json!({"alg": "EdDSA", "kid": "ci", "typ": "JWT"}),
            claims,
            &[],
        )
    }

    fn check(token: &str, now: u64) -> Result<Identity, Refusal> {
        issuers()
            .check(token, &secrets(), None, now)
            .map_err(|refused| refused.refusal)
    }

    #[test]
    fn valid_tokens_of_either_algorithm_identify_their_subject() {
        let identity = check(&ed(claims()), NOW).unwrap();
        assert_eq!(
            (
                identity.subject.as_str(),
                identity.jti.as_str(),
                identity.issuer.as_str()
            ),
            ("deploy-job", "j1", "ci")
        );
        assert_eq!(identity.scopes, ["deploy:prod", "orders:read"]);
        assert_eq!(identity.scope_header, "deploy:prod orders:read");
        let hs = token(
            serde_json::json!({"alg": "HS256", "kid": "legacy"}),
            serde_json::json!({"sub": "old", "jti": "h1", "scope": "orders:write",
                               "iat": NOW, "exp": NOW + 900}),
            SECRET,
        );
        assert_eq!(check(&hs, NOW).unwrap().subject, "old");
        // Without the gate secret, an HS256 token cannot be checked: the gate says so (503),
        // naming the issuer for its log.
        let refused = issuers()
            .check(&hs, &IssuerSecrets::default(), None, NOW)
            .unwrap_err();
        assert_eq!(
            (refused.refusal, refused.kid.as_deref()),
            (Refusal::NoSecret, Some("legacy"))
        );
        let wrong = token(
            serde_json::json!({"alg": "HS256", "kid": "legacy"}),
            serde_json::json!({"sub": "old", "jti": "h1", "iat": NOW, "exp": NOW + 900}),
            b"another secret of thirty-two b!!",
        );
        assert_eq!(check(&wrong, NOW), Err(Refusal::Invalid));
    }

    #[test]
    fn the_issuer_fixes_the_algorithm() {
        // HS256 keyed with the EdDSA issuer's public key (the classic confusion), and alg none.
        let public = ci_key().verifying_key().to_bytes();
        let swapped = token(
            serde_json::json!({"alg": "HS256", "kid": "ci"}),
            claims(),
            &public,
        );
        assert_eq!(check(&swapped, NOW), Err(Refusal::Invalid));
        let hex_key = crate::hex::encode(&public);
        let swapped = token(
            serde_json::json!({"alg": "HS256", "kid": "ci"}),
            claims(),
            hex_key.as_bytes(),
        );
        assert_eq!(check(&swapped, NOW), Err(Refusal::Invalid));
        let none = token(
            serde_json::json!({"alg": "none", "kid": "ci"}),
            claims(),
            &[],
        );
        assert_eq!(check(&none, NOW), Err(Refusal::Invalid));
        let none = format!("{}x", none);
        assert_eq!(check(&none, NOW), Err(Refusal::Invalid));
        // An EdDSA token presented under the HS256 issuer's kid.
        let mut header = serde_json::json!({"alg": "EdDSA", "kid": "legacy"});
        assert_eq!(
            check(&token(header.clone(), claims(), &[]), NOW),
            Err(Refusal::Invalid)
        );
        header["kid"] = "nobody".into();
        assert_eq!(
            check(&token(header, claims(), &[]), NOW),
            Err(Refusal::UnknownIssuer)
        );
        let no_kid = token(serde_json::json!({"alg": "EdDSA"}), claims(), &[]);
        assert_eq!(check(&no_kid, NOW), Err(Refusal::UnknownIssuer));
        // A valid token with one changed byte of payload.
        let good = ed(claims());
        let parts: Vec<&str> = good.split('.').collect();
        let mut other = claims();
        other["sub"] = "root".into();
        let forged = format!(
            "{}.{}.{}",
            parts[0],
            b64(other.to_string().as_bytes()),
            parts[2]
        );
        assert_eq!(check(&forged, NOW), Err(Refusal::Invalid));
    }

    #[test]
    fn the_grant_bounds_scopes_and_lifetime_whatever_the_signature() {
        let mut c = claims();
        c["scope"] = "admin".into();
        assert_eq!(check(&ed(c), NOW), Err(Refusal::BeyondGrant));
        let mut c = claims();
        c["scope"] = "deploy:*".into();
        assert!(check(&ed(c), NOW).is_ok(), "a pattern within a pattern");
        let mut c = claims();
        c["scope"] = "*".into();
        assert_eq!(check(&ed(c), NOW), Err(Refusal::BeyondGrant));
        let mut c = claims();
        c["exp"] = (NOW - 60 + 3600).into();
        assert!(check(&ed(c), NOW).is_ok(), "exactly the maximum lifetime");
        let mut c = claims();
        c["exp"] = (NOW - 60 + 3601).into();
        assert_eq!(check(&ed(c), NOW), Err(Refusal::BeyondGrant));
        for (scope, why) in [
            ("a  b", "double space"),
            ("orders:read ", "trailing space"),
            ("Orders", "not a scope"),
        ] {
            let mut c = claims();
            c["scope"] = scope.into();
            assert_eq!(check(&ed(c), NOW), Err(Refusal::Invalid), "{why}");
        }
        let mut c = claims();
        c.as_object_mut().unwrap().remove("scope");
        assert_eq!(check(&ed(c), NOW).unwrap().scopes, Vec::<String>::new());
    }

    #[test]
    fn every_claim_is_required_and_read_one_way() {
        for claim in ["sub", "jti", "exp", "iat"] {
            let mut c = claims();
            c.as_object_mut().unwrap().remove(claim);
            assert_eq!(check(&ed(c), NOW), Err(Refusal::Invalid), "no {claim}");
        }
        for (claim, value) in [
            ("sub", serde_json::json!("")),
            ("sub", serde_json::json!("a b")),
            ("jti", serde_json::json!(7)),
            ("exp", serde_json::json!("soon")),
            ("nbf", serde_json::json!("x")),
            ("scope", serde_json::json!(["orders:read"])),
            ("iat", serde_json::json!(NOW + 600)),
        ] {
            let mut c = claims();
            c[claim] = value;
            assert_eq!(check(&ed(c), NOW), Err(Refusal::Invalid), "{claim}");
        }
        let header = b64(br#"{"alg":"EdDSA","kid":"ci"}"#);
        let payload = format!(
            r#"{{"sub":"deploy-job","sub":"root","jti":"j","iat":{},"exp":{}}}"#,
            NOW,
            NOW + 60
        );
        let signed = format!("{header}.{}", b64(payload.as_bytes()));
        let jwt = format!(
            "{signed}.{}",
            b64(&ci_key().sign(signed.as_bytes()).to_bytes())
        );
        assert_eq!(check(&jwt, NOW), Err(Refusal::Invalid), "a repeated claim");
    }

    #[test]
    fn revocations_and_the_clock() {
        let mut c = claims();
        c["jti"] = "gone".into();
        let revoked = ed(c);
        assert_eq!(check(&revoked, NOW), Err(Refusal::Revoked));
        // Once its signature verified, a refusal names whom it refused (for the logs); a
        // token whose signature fails names nobody.
        let refused = issuers()
            .check(&revoked, &secrets(), None, NOW)
            .unwrap_err();
        let named = refused.identity.map(|i| (i.subject, i.jti));
        assert_eq!(named, Some(("deploy-job".into(), "gone".into())));
        let forged = format!("{}x", &revoked[..revoked.len() - 1]);
        let refused = issuers().check(&forged, &secrets(), None, NOW).unwrap_err();
        assert_eq!(
            (refused.refusal, refused.identity),
            (Refusal::Invalid, None)
        );
        let token = ed(claims());
        let cut = issuers()
            .check(&token, &secrets(), Some(NOW - 60), NOW)
            .map_err(|r| r.refusal);
        assert_eq!(cut, Err(Refusal::RevokedAll), "issued at the cut-off");
        assert!(issuers()
            .check(&token, &secrets(), Some(NOW - 61), NOW)
            .map_err(|r| r.refusal)
            .is_ok());
        // Leeway: 30 seconds either way, no more.
        let exp = NOW + 600;
        assert!(check(&token, exp + LEEWAY_SECONDS - 1).is_ok());
        assert_eq!(check(&token, exp + LEEWAY_SECONDS), Err(Refusal::Expired));
        let iat = NOW - 60;
        assert!(check(&token, iat - LEEWAY_SECONDS).is_ok());
        assert_eq!(
            check(&token, iat - LEEWAY_SECONDS - 1),
            Err(Refusal::NotYetValid)
        );
        let mut c = claims();
        c["nbf"] = (NOW + 100).into();
        let later = ed(c);
        assert_eq!(check(&later, NOW + 69), Err(Refusal::NotYetValid));
        assert!(check(&later, NOW + 70).is_ok());
    }

    #[test]
    fn a_remembered_signature_vouches_for_its_own_token_only() {
        let issuers = issuers();
        let secrets = secrets();
        let good = ed(claims());
        for _ in 0..2 {
            assert!(issuers
                .check(&good, &secrets, None, NOW)
                .map_err(|r| r.refusal)
                .is_ok());
        }
        let parts: Vec<&str> = good.split('.').collect();
        let mut other = claims();
        other["scope"] = "deploy:*".into();
        let forged = format!(
            "{}.{}.{}",
            parts[0],
            b64(other.to_string().as_bytes()),
            parts[2]
        );
        assert_eq!(
            issuers
                .check(&forged, &secrets, None, NOW)
                .map_err(|r| r.refusal),
            Err(Refusal::Invalid)
        );
        let mut signature = crate::jwt::base64url_decode(parts[2]).unwrap();
        signature[0] ^= 1;
        let flipped = format!("{}.{}.{}", parts[0], parts[1], b64(&signature));
        assert_eq!(
            issuers
                .check(&flipped, &secrets, None, NOW)
                .map_err(|r| r.refusal),
            Err(Refusal::Invalid)
        );
        // Remembered, and still held to the clock and to a cut-off.
        let late = NOW + 600 + LEEWAY_SECONDS;
        assert_eq!(
            issuers
                .check(&good, &secrets, None, late)
                .map_err(|r| r.refusal),
            Err(Refusal::Expired)
        );
        let cut = issuers
            .check(&good, &secrets, Some(NOW), NOW)
            .map_err(|r| r.refusal);
        assert_eq!(cut, Err(Refusal::RevokedAll));
    }

    #[test]
    fn an_audience_binds_an_issuers_tokens_to_tokengate() {
        let mut configs = configs();
        configs[1].audience = Some("tokengate".into());
        let admin = KeySet::from_hex(&[ADMIN]).unwrap();
        let issuers = Issuers::new(&configs, &[], &admin).unwrap();
        let with_aud = |aud: Option<serde_json::Value>| {
            let mut claims = serde_json::json!({"sub": "batch", "jti": "h1", "iat": NOW,
                                                "exp": NOW + 600});
            if let Some(aud) = aud {
                claims["aud"] = aud;
            }
            let header = serde_json::json!({"alg": "HS256", "kid": "legacy"});
            let token = token(header, claims, SECRET);
            issuers
                .check(&token, &secrets(), None, NOW)
                .map(|i| i.subject)
                .map_err(|r| r.refusal)
        };
        assert_eq!(with_aud(Some("tokengate".into())), Ok("batch".into()));
        assert_eq!(
            with_aud(Some(serde_json::json!(["web", "tokengate"]))),
            Ok("batch".into())
        );
        for other in [None, Some("web".into()), Some(serde_json::json!(["web"]))] {
            assert_eq!(with_aud(other.clone()), Err(Refusal::Invalid), "{other:?}");
        }
        configs[1].audience = Some(String::new());
        assert!(
            Issuers::new(&configs, &[], &admin).is_err(),
            "an empty audience"
        );
    }

    #[test]
    fn bundles_name_issuers_exactly() {
        let admin = KeySet::from_hex(&[ADMIN]).unwrap();
        let refused = |change: &dyn Fn(&mut Vec<IssuerConfig>)| {
            let mut configs = configs();
            change(&mut configs);
            Issuers::new(&configs, &[], &admin).unwrap_err()
        };
        assert!(matches!(
            refused(&|c| c[0].public_key = Some(ADMIN.into())),
            IssuerError::Issuer { .. }
        ));
        assert!(matches!(
            refused(&|c| c[0].public_key = None),
            IssuerError::Issuer { .. }
        ));
        assert!(matches!(
            refused(&|c| c[1].public_key = Some(ADMIN.into())),
            IssuerError::Issuer { .. }
        ));
        assert!(matches!(
            refused(&|c| c[1].max_lifetime = 0),
            IssuerError::Issuer { .. }
        ));
        assert!(matches!(
            refused(&|c| c[1].scopes.clear()),
            IssuerError::Issuer { .. }
        ));
        assert!(matches!(
            refused(&|c| c[1].kid = "Bad Kid".into()),
            IssuerError::Issuer { .. }
        ));
        assert_eq!(
            refused(&|c| c[1].kid = "ci".into()),
            IssuerError::DuplicateKid("ci".into())
        );
        let twice = [
            RevokedJti {
                issuer: "ci".into(),
                jti: "x".into(),
            },
            RevokedJti {
                issuer: "ci".into(),
                jti: "x".into(),
            },
        ];
        assert!(Issuers::new(&configs(), &twice, &admin).is_err());
    }

    #[test]
    fn gate_secrets_are_parsed_strictly_and_never_shown() {
        let text = format!("legacy={} other={}", b64(SECRET), b64(&[1; 40]));
        let secrets = IssuerSecrets::parse(&text).unwrap();
        assert_eq!(secrets.kids().collect::<Vec<_>>(), ["legacy", "other"]);
        assert!(!format!("{secrets:?}").contains(&b64(SECRET)));
        // `openssl rand -base64 32` alone (no `kid=`): its `=` must not make a "kid" to echo.
        let bare = "q7Nn0bEa4f6tT0lC5lYkV1gJ2t2bR0m5Yw7sP8xQ3aU=";
        let error = IssuerSecrets::parse(bare).unwrap_err();
        assert!(!error.contains("q7Nn0"), "{error}");
        for bad in [
            "legacy".to_owned(),
            format!("legacy={}", b64(&[1; 31])),
            format!("legacy={}=", b64(SECRET)),
            format!("Legacy={}", b64(SECRET)),
            format!("legacy={0} legacy={0}", b64(SECRET)),
        ] {
            let error = IssuerSecrets::parse(&bad).unwrap_err();
            assert!(!error.contains(&b64(SECRET)), "{error}");
        }
        assert_eq!(IssuerSecrets::parse("").unwrap().kids().count(), 0);
    }
}
