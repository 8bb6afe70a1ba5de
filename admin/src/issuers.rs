//! Signed short-lived tokens, the admin's side: the issuers every bundle trusts, their keys,
//! `mint`, and revocation by `jti`.
//!
//! An issuer key is not an admin key and cannot become one: its text is
//! `tokengate-issuer-key/v1 <kid> <EdDSA|HS256> <key>` (the Ed25519 seed in hex, or the HS256
//! secret in base64url), which the admin keyring refuses to read, and a gate refuses a bundle
//! naming an issuer whose public key is an admin key. `mint` reads only this form.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use clap::{Subcommand, ValueEnum};
use ed25519_dalek::{Signer, SigningKey};
use hmac::{Hmac, Mac};
use rusqlite::{params, OptionalExtension, Transaction};
use serde::Serialize;
use sha2::Sha256;
use tokengate_core::issuer::{
    Algorithm, IssuerConfig, RevokedJti, LEEWAY_SECONDS, MAX_ISSUERS, MAX_REVOKED, MIN_SECRET_LEN,
};
use tokengate_core::{hex, policy};
use zeroize::Zeroizing;

use crate::keys;
use crate::store::{Actor, Store};
use crate::time;

/// The variable that may hold an issuer key itself (for `mint`).
pub const ISSUER_KEY_VARIABLE: &str = "TOKENGATE_ISSUER_KEY";
const KEY_FORMAT: &str = "tokengate-issuer-key/v1";
/// The longest lifetime the CLI lets an issuer grant: signed tokens are for short-lived
/// access (a CI job, a deploy); beyond a week, a service token can be rotated and listed.
pub const MAX_TTL: u64 = 7 * 86_400;

#[derive(Subcommand)]
pub enum IssuerAction {
    /// Trust a new issuer of signed tokens. EdDSA (default): a new Ed25519 key is written to
    /// --key-out, its public key goes into every bundle. HS256: an existing in-house issuer's
    /// kid; its secret is given to each gate in TOKENGATE_ISSUER_SECRETS, never in a bundle
    /// (--key-out makes a new secret).
    Add {
        kid: String,
        #[arg(long, value_enum, default_value = "eddsa")]
        alg: AlgArg,
        /// Comma-separated scopes its tokens may carry (`deploy:*`, `orders:read`).
        #[arg(long, value_delimiter = ',', required = true)]
        scopes: Vec<String>,
        /// The longest lifetime of a token it signs (e.g. 1h; at most 7d).
        #[arg(long)]
        max_ttl: String,
        /// Its tokens must name this in `aud` (and `mint` puts it there): for an issuer that
        /// also signs JWTs meant for something else, so those are no tokengate credential.
        #[arg(long)]
        audience: Option<String>,
        /// Write the issuer's new private key here (mode 0600; must not exist).
        #[arg(long)]
        key_out: Option<PathBuf>,
        #[arg(long)]
        reason: Option<String>,
    },
    /// The issuers, retired ones included.
    List {
        #[arg(long)]
        json: bool,
    },
    /// Stop trusting an issuer: from the next push, every token it signed is refused.
    Retire {
        kid: String,
        #[arg(long)]
        reason: String,
    },
}

#[derive(Clone, Copy, ValueEnum)]
pub enum AlgArg {
    #[value(name = "eddsa", alias = "EdDSA")]
    EdDsa,
    #[value(name = "hs256", alias = "HS256")]
    Hs256,
}

impl From<AlgArg> for Algorithm {
    fn from(alg: AlgArg) -> Self {
        match alg {
            AlgArg::EdDsa => Self::EdDsa,
            AlgArg::Hs256 => Self::Hs256,
        }
    }
}

/// Where `mint` reads the issuer key: a command, [`ISSUER_KEY_VARIABLE`], or a file.
pub struct KeySource {
    pub file: Option<PathBuf>,
    pub command: Option<String>,
}

/// An issuer's private key.
pub struct IssuerKey {
    kid: String,
    secret: Secret,
}

enum Secret {
    Ed25519(SigningKey),
    Hs256(Zeroizing<Vec<u8>>),
}

impl IssuerKey {
    /// Reads the key from the command if given, else the variable if set, else the file.
    pub fn load(source: &KeySource) -> Result<Self> {
        let (text, from) = if let Some(command) = &source.command {
            (
                keys::run_command(command)?,
                "the issuer key command's output".to_owned(),
            )
        } else if let Ok(text) = std::env::var(ISSUER_KEY_VARIABLE) {
            (text, ISSUER_KEY_VARIABLE.to_owned())
        } else if let Some(path) = &source.file {
            keys::check_private(path)?;
            let text = std::fs::read_to_string(path)
                .with_context(|| format!("reading the issuer key {}", path.display()))?;
            (text, path.display().to_string())
        } else {
            bail!("no issuer key: pass --issuer-key-file or --issuer-key-command, or set {ISSUER_KEY_VARIABLE}")
        };
        Self::parse(&Zeroizing::new(text)).with_context(|| from)
    }

    fn parse(text: &str) -> Result<Self> {
        let fields: Vec<&str> = text.split_whitespace().collect();
        let [format, kid, alg, key] = fields[..] else {
            bail!("is not an issuer key ({KEY_FORMAT} <kid> <EdDSA|HS256> <key>)");
        };
        if format != KEY_FORMAT || !policy::valid_name(kid) {
            bail!("is not an issuer key ({KEY_FORMAT} <kid> <EdDSA|HS256> <key>)");
        }
        // The key itself is never echoed in an error.
        let secret = match alg {
            "EdDSA" => {
                let seed = Zeroizing::new(
                    hex::decode::<32>(key).context("the EdDSA key is not 64 lower-case hex")?,
                );
                Secret::Ed25519(SigningKey::from_bytes(&seed))
            }
            "HS256" => {
                let secret = Zeroizing::new(
                    URL_SAFE_NO_PAD
                        .decode(key)
                        .ok()
                        .context("the HS256 secret is not unpadded base64url")?,
                );
                if secret.len() < MIN_SECRET_LEN {
                    bail!("the HS256 secret is shorter than {MIN_SECRET_LEN} bytes");
                }
                Secret::Hs256(secret)
            }
            _ => bail!("the algorithm must be EdDSA or HS256"),
        };
        Ok(Self {
            kid: kid.to_owned(),
            secret,
        })
    }

    fn generate(kid: &str, alg: Algorithm) -> Result<Self> {
        let secret = match alg {
            Algorithm::EdDsa => Secret::Ed25519(keys::generate()?),
            Algorithm::Hs256 => {
                let mut bytes = Zeroizing::new(vec![0u8; 32]);
                getrandom::fill(&mut bytes)
                    .map_err(|e| anyhow::anyhow!("the OS random generator failed: {e}"))?;
                Secret::Hs256(bytes)
            }
        };
        Ok(Self {
            kid: kid.to_owned(),
            secret,
        })
    }

    fn alg(&self) -> Algorithm {
        match self.secret {
            Secret::Ed25519(_) => Algorithm::EdDsa,
            Secret::Hs256(_) => Algorithm::Hs256,
        }
    }

    fn public_key(&self) -> Option<String> {
        match &self.secret {
            Secret::Ed25519(key) => Some(keys::public_hex(key)),
            Secret::Hs256(_) => None,
        }
    }

    fn text(&self) -> Zeroizing<String> {
        let key = match &self.secret {
            Secret::Ed25519(key) => Zeroizing::new(hex::encode(key.as_bytes())),
            Secret::Hs256(secret) => Zeroizing::new(URL_SAFE_NO_PAD.encode(secret.as_slice())),
        };
        Zeroizing::new(format!(
            "{KEY_FORMAT} {} {} {}\n",
            self.kid,
            self.alg(),
            *key
        ))
    }

    fn sign(&self, input: &[u8]) -> Vec<u8> {
        match &self.secret {
            Secret::Ed25519(key) => key.sign(input).to_bytes().to_vec(),
            Secret::Hs256(secret) => {
                let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(secret)
                    .unwrap_or_else(|_| unreachable!("HMAC takes a key of any length"));
                mac.update(input);
                mac.finalize().into_bytes().to_vec()
            }
        }
    }
}

/// An issuer as the store keeps it.
#[derive(Debug, Clone, Serialize)]
pub struct Issuer {
    pub kid: String,
    pub alg: Algorithm,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub public_key: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub audience: Option<String>,
    pub scopes: Vec<String>,
    pub max_lifetime: u64,
    pub added_at: u64,
    pub retired_at: Option<u64>,
}

fn issuer_from_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<Issuer> {
    let alg: String = r.get(1)?;
    let scopes: String = r.get(4)?;
    let seconds = |v: i64| u64::try_from(v).unwrap_or_default();
    Ok(Issuer {
        kid: r.get(0)?,
        alg: if alg == "HS256" {
            Algorithm::Hs256
        } else {
            Algorithm::EdDsa
        },
        public_key: r.get(2)?,
        audience: r.get(3)?,
        scopes: serde_json::from_str(&scopes).unwrap_or_default(),
        max_lifetime: seconds(r.get(5)?),
        added_at: seconds(r.get(6)?),
        retired_at: r.get::<_, Option<i64>>(7)?.map(seconds),
    })
}

const ISSUER_COLUMNS: &str =
    "kid, alg, public_key, audience, scopes, max_lifetime, added_at, retired_at";

/// Every issuer, oldest first.
pub fn issuers(store: &Store) -> Result<Vec<Issuer>> {
    let mut statement = store.connection().prepare(&format!(
        "SELECT {ISSUER_COLUMNS} FROM issuers ORDER BY added_at, kid"
    ))?;
    let rows = statement.query_map([], issuer_from_row)?;
    Ok(rows.collect::<rusqlite::Result<_>>()?)
}

fn issuer(store: &Store, kid: &str) -> Result<Option<Issuer>> {
    Ok(store
        .connection()
        .query_row(
            &format!("SELECT {ISSUER_COLUMNS} FROM issuers WHERE kid = ?1"),
            [kid],
            issuer_from_row,
        )
        .optional()?)
}

/// What a bundle built at `now` names: the issuers not retired, and the revocations of
/// tokens that may still be valid.
pub fn bundle_members(store: &Store, now: u64) -> Result<(Vec<IssuerConfig>, Vec<RevokedJti>)> {
    let configs = issuers(store)?
        .into_iter()
        .filter(|i| i.retired_at.is_none())
        .map(|i| IssuerConfig {
            kid: i.kid,
            alg: i.alg,
            public_key: i.public_key,
            audience: i.audience,
            scopes: i.scopes,
            max_lifetime: i.max_lifetime,
        })
        .collect::<Vec<_>>();
    let mut statement = store
        .connection()
        .prepare("SELECT issuer, jti FROM revoked_jtis WHERE until > ?1 ORDER BY issuer, jti")?;
    let rows = statement.query_map([i64::try_from(now)?], |r| {
        Ok(RevokedJti {
            issuer: r.get(0)?,
            jti: r.get(1)?,
        })
    })?;
    let revoked = rows
        .collect::<rusqlite::Result<Vec<_>>>()?
        .into_iter()
        .filter(|r| configs.iter().any(|c| c.kid == r.issuer))
        .collect();
    Ok((configs, revoked))
}

fn check_scopes(scopes: &[String]) -> Result<()> {
    if scopes.is_empty() {
        bail!("give at least one scope (--scopes)");
    }
    crate::validate_scopes(scopes)
}

/// `tokengate issuer …`.
pub fn run(action: &IssuerAction, store_path: &Path, actor: Actor, now: u64) -> Result<()> {
    match action {
        IssuerAction::Add {
            kid,
            alg,
            scopes,
            max_ttl,
            audience,
            key_out,
            ..
        } => {
            let alg = Algorithm::from(*alg);
            if !policy::valid_name(kid) {
                bail!("kid {kid:?} must match [a-z0-9][a-z0-9._-]{{0,63}}");
            }
            check_scopes(scopes)?;
            let max_lifetime = time::parse_duration(max_ttl)?;
            if !(1..=MAX_TTL).contains(&max_lifetime) {
                bail!("--max-ttl must be 1s to 7d: signed tokens are short-lived");
            }
            if let Some(aud) = audience {
                if !tokengate_core::jwt::is_usable(aud) {
                    bail!("--audience must be 1 to 256 visible ASCII characters");
                }
            }
            let mut store = Store::open(store_path)?;
            if issuer(&store, kid)?.is_some() {
                bail!("an issuer {kid:?} exists already (kids are never reused)");
            }
            let trusted = issuers(&store)?
                .iter()
                .filter(|i| i.retired_at.is_none())
                .count();
            if trusted >= MAX_ISSUERS {
                bail!("{trusted} issuers are trusted already, the most a bundle holds; retire one first");
            }
            let key = match (alg, key_out) {
                (Algorithm::EdDsa, None) => {
                    bail!("an EdDSA issuer needs --key-out: where to write its new private key")
                }
                (_, Some(path)) => Some((IssuerKey::generate(kid, alg)?, path)),
                (Algorithm::Hs256, None) => None,
            };
            let public_key = key.as_ref().and_then(|(k, _)| k.public_key());
            if let Some(public) = &public_key {
                if store
                    .signing_keys()?
                    .iter()
                    .any(|k| k.public_key == *public)
                {
                    bail!("the new key is an admin key; generate again");
                }
            }
            // The key file first: an issuer in the store without its key could mint nothing.
            if let Some((key, path)) = &key {
                keys::write_new_private(path, &key.text())?;
            }
            let details = serde_json::json!({
                "alg": alg, "scopes": scopes, "max_lifetime": max_lifetime, "public_key": public_key,
                "audience": audience,
            });
            let added = store.transaction(&actor, "issuer.add", Some(kid), details, now, |tx| {
                tx.execute(
                    "INSERT INTO issuers (kid, alg, public_key, audience, scopes, max_lifetime, added_at)
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
                    params![
                        kid,
                        alg.as_str(),
                        public_key,
                        audience,
                        serde_json::to_string(scopes)?,
                        i64::try_from(max_lifetime)?,
                        i64::try_from(now)?
                    ],
                )?;
                Ok(())
            });
            if let Err(e) = added {
                if let Some((_, path)) = &key {
                    std::fs::remove_file(path).ok();
                }
                return Err(e);
            }
            match (&key, alg) {
                (Some((_, path)), Algorithm::EdDsa) => eprintln!(
                    "added issuer {kid} (EdDSA); its private key is in {} (keep it with whoever mints); push to make the gates trust it",
                    path.display()
                ),
                (Some((_, path)), Algorithm::Hs256) => eprintln!(
                    "added issuer {kid} (HS256); its new secret is in {}: give it to every gate as {kid}=<secret> in TOKENGATE_ISSUER_SECRETS; push to make the gates trust it",
                    path.display()
                ),
                (None, _) => eprintln!(
                    "added issuer {kid} (HS256); give each gate its secret as {kid}=<base64url secret> in TOKENGATE_ISSUER_SECRETS; push to make the gates trust it"
                ),
            }
            Ok(())
        }
        IssuerAction::List { json } => {
            let store = Store::open(store_path)?;
            let all = issuers(&store)?;
            if *json {
                println!("{}", serde_json::to_string_pretty(&all)?);
                return Ok(());
            }
            let mut rows = vec![["KID", "ALG", "SCOPES", "MAX TTL", "ADDED", "STATE"]
                .map(str::to_owned)
                .to_vec()];
            for i in &all {
                rows.push(vec![
                    i.kid.clone(),
                    i.alg.to_string(),
                    i.scopes.join(","),
                    format!("{}s", i.max_lifetime),
                    time::format_instant(i.added_at),
                    i.retired_at.map_or("trusted".into(), |at| {
                        format!("retired {}", time::format_instant(at))
                    }),
                ]);
            }
            crate::print_table(&rows)
        }
        IssuerAction::Retire { kid, reason: _ } => {
            let mut store = Store::open(store_path)?;
            let found = issuer(&store, kid)?.with_context(|| format!("no issuer {kid:?}"))?;
            if found.retired_at.is_some() {
                bail!("issuer {kid} is already retired; nothing was changed");
            }
            store.transaction(
                &actor,
                "issuer.retire",
                Some(kid),
                serde_json::json!({}),
                now,
                |tx| {
                    tx.execute(
                        "UPDATE issuers SET retired_at = ?2 WHERE kid = ?1",
                        params![kid, i64::try_from(now)?],
                    )?;
                    Ok(())
                },
            )?;
            eprintln!("retired issuer {kid}; push to make the gates refuse its tokens");
            Ok(())
        }
    }
}

/// The compact JWT for `subject`, signed by `key` at `now`; the mint is recorded (never the
/// token) and audited.
pub fn mint(
    store_path: &Path,
    key: &IssuerKey,
    subject: &str,
    scopes: &[String],
    ttl: &str,
    actor: &Actor,
    now: u64,
) -> Result<String> {
    crate::validate_name(subject)?;
    crate::validate_scopes(scopes)?;
    let lifetime = time::parse_duration(ttl)?;
    if lifetime == 0 {
        bail!("--ttl must be at least 1s");
    }
    let mut store = Store::open(store_path)?;
    // Issued after a revoke-all made this second, as `create` does.
    let now = crate::creation_time(&store, now)?;
    let kid = &key.kid;
    let issuer = issuer(&store, kid)?
        .with_context(|| format!("the key is issuer {kid:?}'s, which this store does not know"))?;
    if issuer.retired_at.is_some() {
        bail!("issuer {kid} is retired: no gate accepts its tokens");
    }
    // An HS256 secret cannot be compared (the store never holds it); an Ed25519 key can.
    let same_key = issuer.alg == key.alg()
        && (issuer.alg == Algorithm::Hs256 || issuer.public_key == key.public_key());
    if !same_key {
        bail!("the key is not the one issuer {kid} was added with");
    }
    if lifetime > issuer.max_lifetime {
        bail!(
            "--ttl {ttl} is longer than issuer {kid} may grant ({}s)",
            issuer.max_lifetime
        );
    }
    if let Some(beyond) = scopes
        .iter()
        .find(|s| !tokengate_core::issuer::grants(&issuer.scopes, s))
    {
        bail!(
            "issuer {kid} may not grant {beyond:?} (it grants {})",
            issuer.scopes.join(",")
        );
    }
    let mut id = [0u8; 16];
    getrandom::fill(&mut id).map_err(|e| anyhow::anyhow!("the OS random generator failed: {e}"))?;
    let jti = URL_SAFE_NO_PAD.encode(id);
    let exp = now + lifetime;
    let header = serde_json::json!({"alg": issuer.alg.as_str(), "kid": kid, "typ": "JWT"});
    let mut claims = serde_json::json!({"sub": subject, "iat": now, "exp": exp, "jti": jti});
    if !scopes.is_empty() {
        claims["scope"] = scopes.join(" ").into();
    }
    if let Some(audience) = &issuer.audience {
        claims["aud"] = audience.as_str().into();
    }
    let input = format!(
        "{}.{}",
        URL_SAFE_NO_PAD.encode(header.to_string()),
        URL_SAFE_NO_PAD.encode(claims.to_string())
    );
    let token = format!(
        "{input}.{}",
        URL_SAFE_NO_PAD.encode(key.sign(input.as_bytes()))
    );
    let details =
        serde_json::json!({"issuer": kid, "jti": jti, "scopes": scopes, "expires_at": exp});
    store.transaction(actor, "token.mint", Some(subject), details, now, |tx| {
        tx.execute(
            "INSERT INTO mints (jti, issuer, subject, scopes, issued_at, expires_at)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
            params![
                jti,
                kid,
                subject,
                serde_json::to_string(scopes)?,
                i64::try_from(now)?,
                i64::try_from(exp)?
            ],
        )?;
        Ok(())
    })?;
    eprintln!(
        "minted a token for {subject} (issuer {kid}, jti {jti}), valid until {}",
        time::format_instant(exp)
    );
    Ok(token)
}

/// Revokes a signed token by `jti`. Its issuer is the one that minted it here, or `issuer`
/// for a token minted elsewhere; the revocation travels in bundles until no token it could
/// name is valid any more.
pub fn revoke_jti(
    store_path: &Path,
    jti: &str,
    issuer_kid: Option<&str>,
    actor: &Actor,
    now: u64,
) -> Result<()> {
    if !tokengate_core::jwt::is_usable(jti) {
        bail!("a jti is 1 to 256 visible ASCII characters");
    }
    let mut store = Store::open(store_path)?;
    let minted: Option<(String, u64)> = store
        .connection()
        .query_row(
            "SELECT issuer, expires_at FROM mints WHERE jti = ?1",
            [jti],
            |r| {
                Ok((
                    r.get(0)?,
                    u64::try_from(r.get::<_, i64>(1)?).unwrap_or(u64::MAX),
                ))
            },
        )
        .optional()?;
    let kid = match (&minted, issuer_kid) {
        (Some((kid, _)), Some(given)) if kid != given => {
            bail!("jti {jti} was minted by issuer {kid}, not {given}")
        }
        (Some((kid, _)), _) => kid.clone(),
        (None, Some(given)) => given.to_owned(),
        (None, None) => {
            bail!("no token with jti {jti} was minted here: name its issuer with --issuer")
        }
    };
    let found = issuer(&store, &kid)?.with_context(|| format!("no issuer {kid:?}"))?;
    // Until every token it could name has expired, leeway included: the minted one, or any
    // token the issuer could have signed by now (an `iat` up to the leeway ahead).
    let until = match minted {
        // Twice the leeway past its expiry: a gate whose clock is behind still refuses it.
        Some((_, exp)) => exp.saturating_add(2 * LEEWAY_SECONDS),
        None => now
            .saturating_add(found.max_lifetime)
            .saturating_add(2 * LEEWAY_SECONDS),
    };
    if until <= now {
        bail!("the token with jti {jti} has expired already; nothing was changed");
    }
    let live: i64 = store.connection().query_row(
        "SELECT COUNT(*) FROM revoked_jtis WHERE until > ?1",
        [i64::try_from(now)?],
        |r| r.get(0),
    )?;
    if usize::try_from(live).unwrap_or(usize::MAX) >= MAX_REVOKED {
        bail!("{live} signed tokens are revoked and not expired yet, the most a bundle holds; retire their issuer instead");
    }
    let details = serde_json::json!({"issuer": kid, "jti": jti, "until": until});
    store.transaction(actor, "jti.revoke", Some(jti), details, now, |tx: &Transaction<'_>| {
        let added = tx.execute(
            "INSERT OR IGNORE INTO revoked_jtis (issuer, jti, revoked_at, until) VALUES (?1, ?2, ?3, ?4)",
            params![kid, jti, i64::try_from(now)?, i64::try_from(until)?],
        )?;
        if added == 0 {
            bail!("jti {jti} of issuer {kid} is already revoked; nothing was changed");
        }
        Ok(())
    })?;
    eprintln!("revoked the signed token {jti} of issuer {kid}; push to make the gates enforce it");
    Ok(())
}
