//! `tokengate`: the admin CLI. Issues tokens (shown once), keeps hashes, scopes, expiry,
//! rotation and revocation in an embedded store, and signs and pushes bundles to the gates.
//!
//! `create` and `rotate` print the new token alone on stdout; everything else goes to
//! stderr, or to stdout as a listing (`--json` on every listing).

mod ecds;
mod issuers;
mod key_command;
mod keys;
mod policy_file;
mod push;
mod status;
mod store;
mod time;
mod usage;
mod worker_push;

use std::io::{BufRead, IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand, ValueEnum};
use tokengate_core::bundle::{self, Bundle, CredentialConfig};
use tokengate_core::issuer;
use tokengate_core::rate::RateLimit;
use tokengate_core::{token, Expectation, Gate, KeySet, Outcome, Request, Target};

use crate::store::{Actor, Store, Token};

/// Writes a line to stdout; a failed write (a full disk while saving a token) is an error.
macro_rules! out {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        writeln!(std::io::stdout().lock(), $($arg)*)?
    }};
}

#[derive(Parser)]
#[command(
    name = "tokengate",
    version,
    about = "Service tokens at the edge: issue, rotate, revoke, push"
)]
struct Cli {
    /// The store (SQLite file).
    #[arg(
        long,
        global = true,
        env = "TOKENGATE_STORE",
        default_value = "tokengate.db"
    )]
    store: PathBuf,
    /// The private key file (one 64-hex Ed25519 key per line, mode 0600); default: the
    /// store's path with `.key`. TOKENGATE_SIGNING_KEY (the keys themselves) and
    /// --key-command take precedence.
    #[arg(long, global = true, env = "TOKENGATE_SIGNING_KEY_FILE")]
    key_file: Option<PathBuf>,
    /// A command whose standard output is the private key(s), e.g. a secret manager's CLI;
    /// run with `sh -c`.
    #[arg(long, global = true, env = "TOKENGATE_KEY_COMMAND")]
    key_command: Option<String>,
    /// Who is acting, for the audit trail (default: $USER).
    #[arg(long, global = true, env = "TOKENGATE_ACTOR")]
    actor: Option<String>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Create a store and its signing key (or adopt the key from the key file, the
    /// environment or --key-command).
    Init {
        /// The environment bundles are signed for (e.g. prod).
        #[arg(long)]
        environment: String,
    },
    /// Issue a token; prints it once, alone, on stdout.
    Create {
        name: String,
        /// Comma-separated scopes (`orders:read`, `orders:*`, `*`).
        #[arg(long, value_delimiter = ',')]
        scopes: Vec<String>,
        /// Token prefix.
        #[arg(long, default_value = token::DEFAULT_PREFIX)]
        prefix: String,
        #[command(flatten)]
        lifetime: Lifetime,
        /// The token's own rate limit, across every rule it is used on: `100/s`, `600/min`,
        /// `5000/h` (a rule's limit applies too).
        #[arg(long)]
        rate: Option<RateLimit>,
        #[arg(long, default_value = "")]
        description: String,
        /// Why, for the audit trail.
        #[arg(long)]
        reason: Option<String>,
    },
    /// Import an existing shared secret, read from stdin or an environment variable (never argv).
    Import {
        name: String,
        #[arg(long, value_delimiter = ',')]
        scopes: Vec<String>,
        /// Read the secret from this environment variable instead of stdin.
        #[arg(long)]
        from_env: Option<String>,
        #[command(flatten)]
        lifetime: Lifetime,
        /// The token's own rate limit: `100/s`, `600/min`, `5000/h`.
        #[arg(long)]
        rate: Option<RateLimit>,
        #[arg(long, default_value = "")]
        description: String,
        #[arg(long)]
        reason: Option<String>,
    },
    /// List tokens.
    List {
        #[arg(long)]
        json: bool,
    },
    /// Show one token.
    Show {
        name: String,
        #[arg(long)]
        json: bool,
    },
    /// Set or remove a token's own rate limit (push to make the gates enforce it).
    Limit {
        name: String,
        /// The limit: `100/s`, `600/min`, `5000/h`.
        #[arg(long, required_unless_present = "none", conflicts_with = "none")]
        rate: Option<RateLimit>,
        /// Remove the token's own limit (a rule's still applies).
        #[arg(long)]
        none: bool,
        #[arg(long)]
        reason: Option<String>,
    },
    /// Revoke a token (and its previous secret, if rotating), or a signed token by --jti.
    Revoke {
        #[arg(required_unless_present = "jti")]
        name: Option<String>,
        /// Revoke the signed token with this `jti` instead (push to make the gates refuse it).
        #[arg(long, conflicts_with = "name")]
        jti: Option<String>,
        /// With --jti: the issuer of a token minted elsewhere (one minted here is known).
        #[arg(long, requires = "jti")]
        issuer: Option<String>,
        #[arg(long)]
        reason: String,
    },
    /// Replace a token's secret; the old one keeps working for the grace period.
    Rotate {
        name: String,
        /// How long the old secret stays valid (e.g. 24h; 0s ends it now).
        #[arg(long)]
        grace: String,
        #[arg(long)]
        reason: Option<String>,
    },
    /// Emergency: revoke every token issued so far.
    RevokeAll {
        #[arg(long)]
        reason: String,
        /// Required: this cannot be undone.
        #[arg(long)]
        yes: bool,
    },
    /// What the gate would decide for a token (read from stdin or --token-env), method and path.
    Check {
        #[arg(long, default_value = "GET")]
        method: String,
        #[arg(long)]
        path: String,
        #[arg(long, default_value = "localhost")]
        host: String,
        /// Read the token from this environment variable instead of stdin.
        #[arg(long)]
        token_env: Option<String>,
        /// Check without any credential.
        #[arg(long)]
        no_token: bool,
        #[arg(long)]
        json: bool,
    },
    /// Issuers of signed short-lived tokens: add, list, retire.
    Issuer {
        #[command(subcommand)]
        action: issuers::IssuerAction,
    },
    /// Sign a short-lived token (JWT) for NAME with an issuer's key; prints it alone on
    /// stdout. Every gate accepts it at once, no push, until it expires.
    Mint {
        name: String,
        /// Comma-separated scopes, within the issuer's.
        #[arg(long, value_delimiter = ',')]
        scopes: Vec<String>,
        /// How long it is valid (e.g. 30m), at most the issuer's maximum.
        #[arg(long)]
        ttl: String,
        /// The issuer's key file (mode 0600, from `issuer add --key-out`).
        #[arg(long, env = "TOKENGATE_ISSUER_KEY_FILE")]
        issuer_key_file: Option<PathBuf>,
        /// A command whose standard output is the issuer's key (a secret manager); run
        /// with `sh -c`. TOKENGATE_ISSUER_KEY may hold the key itself.
        #[arg(long, env = "TOKENGATE_ISSUER_KEY_COMMAND")]
        issuer_key_command: Option<String>,
        #[arg(long)]
        reason: Option<String>,
    },
    /// Route policy and credential sources.
    Policy {
        #[command(subcommand)]
        action: PolicyAction,
    },
    /// The admin's signing keys: list, publish, rotate, retire.
    Key {
        #[command(subcommand)]
        action: key_command::KeyAction,
    },
    /// Write a signed bundle (stdout, or --out).
    Bundle {
        #[arg(long, value_enum)]
        target: TargetArg,
        #[arg(long)]
        out: Option<PathBuf>,
    },
    /// Sign and push the token set to a gate.
    Push {
        #[command(subcommand)]
        target: PushTarget,
    },
    /// What each gate serves, asked of the gate; exits 1 when one does not serve the
    /// version last pushed to it.
    Status {
        /// Envoy's admin endpoint (repeatable).
        #[arg(
            long = "envoy-admin",
            env = "TOKENGATE_ENVOY_ADMIN",
            value_delimiter = ','
        )]
        envoy_admin: Vec<String>,
        /// A Worker's base URL (repeatable).
        #[arg(
            long = "worker-url",
            env = "TOKENGATE_WORKER_URL",
            value_delimiter = ','
        )]
        worker_url: Vec<String>,
        #[arg(long)]
        json: bool,
    },
    /// The audit trail.
    Audit {
        #[arg(long, default_value_t = 50)]
        limit: usize,
        #[arg(long)]
        json: bool,
    },
    /// Who still uses which token: collect the gates' counts (`usage pull`).
    Usage {
        #[command(subcommand)]
        action: UsageAction,
    },
    /// Active tokens no gate has seen for a while (by the last `usage pull`); exits 1 when
    /// there are any (for cron and CI).
    Unused {
        /// How long unused (e.g. 30d); a token created since counts from its creation.
        #[arg(long = "for")]
        unused_for: String,
        #[arg(long)]
        json: bool,
    },
    /// Tokens expiring within a window; exits 1 when there are any (for cron and CI).
    Expiring {
        #[arg(long)]
        within: String,
        #[arg(long)]
        json: bool,
    },
}

#[derive(clap::Args)]
struct Lifetime {
    /// Expire after this long (e.g. 90d).
    #[arg(long, conflicts_with = "expires_at")]
    expires_in: Option<String>,
    /// Expire at this instant (2027-01-31T00:00:00Z or Unix seconds).
    #[arg(long)]
    expires_at: Option<String>,
    /// Not valid before this instant.
    #[arg(long)]
    not_before: Option<String>,
}

#[derive(Subcommand)]
enum PolicyAction {
    /// Validate a policy file (TOML) and store it.
    Set { file: PathBuf },
    /// Print the stored policy (JSON).
    Show,
    /// Print the default policy file, a starting point.
    Example,
}

#[derive(Subcommand)]
enum UsageAction {
    /// Signed tokens' use by subject (the NAME they were minted for), as pulled.
    Subjects {
        #[arg(long)]
        json: bool,
    },
    /// Ask each gate for its per-token counts (a request signed by the admin key) and merge
    /// them into the store; pulling twice counts once.
    Pull {
        /// An Envoy gate's listener URL, e.g. http://127.0.0.1:10000 (repeatable). Each
        /// Envoy process counts on its own: name every one.
        #[arg(long = "envoy-url", env = "TOKENGATE_ENVOY_URL", value_delimiter = ',')]
        envoy_url: Vec<String>,
        /// A Worker's base URL (repeatable).
        #[arg(
            long = "worker-url",
            env = "TOKENGATE_WORKER_URL",
            value_delimiter = ','
        )]
        worker_url: Vec<String>,
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand)]
enum PushTarget {
    /// Write the filter's ECDS resource atomically; Envoy reloads it without a restart.
    Envoy {
        /// The ECDS file Envoy watches; a name ending in `.pb` gets binary protobuf (Envoy
        /// parses it several times faster than JSON: for large bundles), any other JSON.
        #[arg(long, env = "TOKENGATE_ENVOY_ECDS")]
        file: PathBuf,
        /// Run the native dynamic module at this path (libtokengate.so; its absolute path goes
        /// into the resource). Default: the filter the ECDS file names already, else the
        /// module built beside this binary.
        #[arg(long, env = "TOKENGATE_FILTER_MODULE")]
        module: Option<PathBuf>,
        /// Run the proxy-wasm filter at this path instead (tokengate_filter.wasm), for
        /// platforms that only load wasm.
        #[arg(long, env = "TOKENGATE_FILTER_WASM")]
        wasm: Option<PathBuf>,
        /// Envoy's admin endpoint (e.g. http://127.0.0.1:9901): the push then waits until
        /// Envoy serves the new version, and fails (restoring the file) if Envoy refuses it.
        #[arg(long, env = "TOKENGATE_ENVOY_ADMIN")]
        admin: Option<String>,
        /// Push this bundle (from `tokengate bundle --out`) instead of signing a new one.
        #[arg(long)]
        bundle: Option<PathBuf>,
    },
    /// Sign and send the bundle to the Worker (it trusts `tokengate key public`); done once
    /// the Worker serves it.
    Worker {
        /// The Worker's base URL (https://, or http:// to a loopback host).
        #[arg(long, env = "TOKENGATE_WORKER_URL")]
        url: String,
        /// Push this bundle (from `tokengate bundle --target worker --out`) instead.
        #[arg(long)]
        bundle: Option<PathBuf>,
    },
}

#[derive(Clone, Copy, ValueEnum)]
enum TargetArg {
    Envoy,
    Worker,
}

impl From<TargetArg> for Target {
    fn from(t: TargetArg) -> Self {
        match t {
            TargetArg::Envoy => Target::Envoy,
            TargetArg::Worker => Target::Worker,
        }
    }
}

/// Signals "the answer is no" (a denied check, something expiring) apart from errors.
struct Negative;

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli) {
        Ok(None) => ExitCode::SUCCESS,
        Ok(Some(Negative)) => ExitCode::from(1),
        Err(error) => {
            eprintln!("tokengate: {error:#}");
            ExitCode::from(2)
        }
    }
}

fn actor(cli_actor: Option<String>, why: Option<String>) -> Actor {
    let who = cli_actor
        .or_else(|| std::env::var("USER").ok())
        .or_else(|| std::env::var("LOGNAME").ok())
        .unwrap_or_else(|| "unknown".to_owned());
    Actor { who, why }
}

fn key_path(cli: &Cli) -> PathBuf {
    cli.key_file
        .clone()
        .unwrap_or_else(|| cli.store.with_extension("key"))
}

fn key_source(cli: &Cli) -> keys::Source {
    keys::Source::resolve(cli.key_command.clone(), key_path(cli))
}

fn random_32() -> Result<[u8; 32]> {
    let mut bytes = [0u8; 32];
    getrandom::fill(&mut bytes)
        .map_err(|e| anyhow::anyhow!("the OS random generator failed: {e}"))?;
    Ok(bytes)
}

fn validate_name(name: &str) -> Result<()> {
    // Short enough to stay a readable subject header.
    if !tokengate_core::policy::valid_name(name) || name.len() > 48 {
        bail!("token name {name:?} must match [a-z0-9][a-z0-9._-]{{0,47}}");
    }
    Ok(())
}

fn validate_scopes(scopes: &[String]) -> Result<()> {
    if let Some(bad) = scopes
        .iter()
        .find(|s| !tokengate_core::policy::valid_grant(s))
    {
        bail!("scope {bad:?} must be like 'orders:read', 'orders:*' or '*'");
    }
    if scopes.len() > tokengate_core::policy::MAX_SCOPES {
        bail!("at most {} scopes", tokengate_core::policy::MAX_SCOPES);
    }
    Ok(())
}

fn lifetime(l: &Lifetime, now: u64) -> Result<(Option<u64>, Option<u64>)> {
    let expires = match (&l.expires_in, &l.expires_at) {
        (Some(d), _) => Some(time::after(now, d)?),
        (None, Some(at)) => Some(time::parse_instant(at)?),
        (None, None) => None,
    };
    let not_before = l
        .not_before
        .as_deref()
        .map(time::parse_instant)
        .transpose()?;
    if let Some(exp) = expires {
        if exp <= now {
            bail!(
                "the expiry {} is not in the future",
                time::format_instant(exp)
            );
        }
        if not_before.is_some_and(|nb| nb >= exp) {
            bail!("--not-before must be before the expiry");
        }
    }
    Ok((not_before, expires))
}

/// Tokens created after a revoke-all must not fall under its cut-off, even in the same second.
fn creation_time(store: &Store, now: u64) -> Result<u64> {
    Ok(store.revoke_all_at()?.map_or(now, |cut| now.max(cut + 1)))
}

/// The store's record of a new secret; `prefix` is `None` for an imported one.
#[allow(clippy::too_many_arguments)] // each is one field an operator set
fn new_token(
    store: &Store,
    name: &str,
    secret: &token::Secret,
    scopes: &[String],
    (not_before, expires_at): (Option<u64>, Option<u64>),
    prefix: Option<&str>,
    rate_limit: Option<RateLimit>,
    description: &str,
    now: u64,
) -> Result<Token> {
    let hash = secret.hash();
    Ok(Token {
        name: name.to_owned(),
        token_id: hash.token_id(),
        hash: hash.to_hex(),
        scopes: scopes.to_vec(),
        created_at: creation_time(store, now)?,
        not_before,
        expires_at,
        revoked_at: None,
        imported: prefix.is_none(),
        prefix: prefix.map(str::to_owned),
        description: description.to_owned(),
        previous_token_id: None,
        previous_hash: None,
        previous_grace_until: None,
        rotated_at: None,
        rate_limit,
    })
}

fn read_secret(from_env: Option<&str>) -> Result<String> {
    if let Some(var) = from_env {
        return std::env::var(var)
            .with_context(|| format!("environment variable {var} is not set"));
    }
    let stdin = std::io::stdin();
    if stdin.is_terminal() {
        // From the terminal with echo off: the secret never shows on screen or in scrollback.
        return rpassword::prompt_password("secret (not echoed): ")
            .context("reading the secret from the terminal");
    }
    let mut line = String::new();
    stdin
        .lock()
        .read_line(&mut line)
        .context("reading the secret from stdin")?;
    Ok(line.trim_end_matches(['\r', '\n']).to_owned())
}

fn run(cli: Cli) -> Result<Option<Negative>> {
    let now = time::now();
    match cli.command {
        Command::Init { ref environment } => {
            if !tokengate_core::policy::valid_name(environment) {
                bail!("environment {environment:?} must match [a-z0-9][a-z0-9._-]{{0,63}}");
            }
            let who = actor(cli.actor.clone(), None);
            // An existing key (file, variable or command) is adopted; otherwise one is made.
            let source = key_source(&cli);
            let adopt = !matches!(&source, keys::Source::File(path) if !path.exists());
            let ring = if adopt { Some(source.load()?) } else { None };
            let default = policy_file::parse("default", policy_file::DEFAULT_POLICY)?;
            let new_key = match ring {
                Some(_) => None,
                None => Some(keys::generate()?),
            };
            let public_keys = match (&ring, &new_key) {
                (Some(ring), _) => ring.public_keys(),
                (None, Some(key)) => vec![keys::public_hex(key)],
                (None, None) => unreachable!("one of the two is set"),
            };
            let published = KeySet::from_hex(&public_keys).map_err(|e| anyhow::anyhow!("{e}"))?;
            let mut store = Store::create(&cli.store, environment, now, &who)?;
            store.transaction(
                &who,
                "policy.set",
                None,
                serde_json::json!({"source": "default"}),
                now,
                |tx| store::set(tx, "policy", &serde_json::to_string(&default)?),
            )?;
            store.transaction(
                &who,
                "key.add",
                None,
                serde_json::json!({"keys": published.ids(), "source": source.to_string()}),
                now,
                |tx| {
                    for key in published.keys() {
                        store::add_signing_key(tx, key.id(), &key.to_hex(), now)?;
                    }
                    Ok(())
                },
            )?;
            match (&new_key, &source) {
                (Some(key), keys::Source::File(path)) => {
                    keys::create_file(path, key)?;
                    eprintln!(
                        "signing key {} written to {} (mode 0600); it is never printed",
                        keys::id_of(key),
                        path.display()
                    );
                }
                _ => eprintln!("signing key(s) {} adopted from {source}", published.ids()),
            }
            eprintln!(
                "store created at {} for environment {environment}",
                cli.store.display()
            );
            Ok(None)
        }
        Command::Create {
            ref name,
            ref scopes,
            ref prefix,
            ref lifetime,
            rate,
            ref description,
            ref reason,
        } => {
            validate_name(name)?;
            validate_scopes(scopes)?;
            let (not_before, expires_at) = self::lifetime(lifetime, now)?;
            let secret = token::generate(prefix, random_32()?)
                .map_err(|e| anyhow::anyhow!("--prefix: {e}"))?;
            let mut store = Store::open(&cli.store)?;
            let record = new_token(
                &store,
                name,
                &secret,
                scopes,
                (not_before, expires_at),
                Some(prefix),
                rate,
                description,
                now,
            )?;
            let details = serde_json::json!({"token_id": record.token_id, "scopes": scopes, "expires_at": expires_at, "rate_limit": rate.map(|r| r.to_string())});
            store.transaction(
                &actor(cli.actor.clone(), reason.clone()),
                "token.create",
                Some(name),
                details,
                now,
                |tx| store::insert_token(tx, &record),
            )?;
            eprintln!(
                "created {name} ({}); the token is shown once, below:",
                record.token_id
            );
            out!("{}", secret.expose());
            Ok(None)
        }
        Command::Import {
            ref name,
            ref scopes,
            ref from_env,
            ref lifetime,
            rate,
            ref description,
            ref reason,
        } => {
            validate_name(name)?;
            validate_scopes(scopes)?;
            let (not_before, expires_at) = self::lifetime(lifetime, now)?;
            let secret = token::import(&read_secret(from_env.as_deref())?)
                .map_err(|e| anyhow::anyhow!("{e}"))?;
            let mut store = Store::open(&cli.store)?;
            let record = new_token(
                &store,
                name,
                &secret,
                scopes,
                (not_before, expires_at),
                None,
                rate,
                description,
                now,
            )?;
            let details = serde_json::json!({"token_id": record.token_id, "scopes": scopes, "imported": true, "rate_limit": rate.map(|r| r.to_string())});
            store.transaction(
                &actor(cli.actor.clone(), reason.clone()),
                "token.import",
                Some(name),
                details,
                now,
                |tx| store::insert_token(tx, &record),
            )?;
            eprintln!(
                "imported {name} ({}); only its hash is stored",
                record.token_id
            );
            Ok(None)
        }
        Command::List { json } => {
            let store = Store::open(&cli.store)?;
            let cut = store.revoke_all_at()?;
            let tokens = store.tokens()?;
            let usage = usage::summaries(&store, now)?;
            let of = |t: &Token| usage.get(&t.name).cloned().unwrap_or_default();
            if json {
                let rows: Vec<_> = tokens
                    .iter()
                    .map(|t| token_json(t, now, cut, &of(t)))
                    .collect();
                out!("{}", serde_json::to_string_pretty(&rows)?);
            } else {
                let mut rows = vec![[
                    "NAME",
                    "TOKEN ID",
                    "STATUS",
                    "SCOPES",
                    "EXPIRES",
                    "LAST USED",
                    "USES",
                    "USES 30D",
                ]
                .map(str::to_owned)
                .to_vec()];
                for t in &tokens {
                    let used = of(t);
                    rows.push(vec![
                        t.name.clone(),
                        t.token_id.clone(),
                        t.status(now, cut).to_owned(),
                        t.scopes.join(","),
                        t.expires_at
                            .map_or("never".to_owned(), time::format_instant),
                        used.last_used
                            .map_or("never".to_owned(), time::format_instant),
                        used.uses.to_string(),
                        used.uses_30d.to_string(),
                    ]);
                }
                print_table(&rows)?;
            }
            Ok(None)
        }
        Command::Show { ref name, json } => {
            let store = Store::open(&cli.store)?;
            let t = store
                .token(name)?
                .with_context(|| format!("no token named {name:?}"))?;
            let used = usage::summaries(&store, now)?
                .remove(name)
                .unwrap_or_default();
            let mut value = token_json(&t, now, store.revoke_all_at()?, &used);
            let sources = usage::sources(&store, name)?;
            if json {
                value["usage_sources"] = sources
                    .iter()
                    .map(|s| {
                        serde_json::json!({
                            "source": s.source,
                            "instance": s.instance,
                            "token_id": s.token_id,
                            "allowed": s.allowed,
                            "denied_scope": s.denied_scope,
                            "last_seen": time::format_instant(s.last_seen),
                            "pulled_at": time::format_instant(s.pulled_at),
                        })
                    })
                    .collect();
                out!("{}", serde_json::to_string_pretty(&value)?);
            } else if let Some(map) = value.as_object() {
                for (k, v) in map {
                    out!(
                        "{k:>22}: {}",
                        v.as_str().map_or_else(|| v.to_string(), str::to_owned)
                    );
                }
                for s in &sources {
                    out!(
                        "{:>22}: {} ({}, {}): {} allowed, {} denied for scope, last {}, pulled {}",
                        "seen by",
                        s.source,
                        s.instance,
                        s.token_id,
                        s.allowed,
                        s.denied_scope,
                        time::format_instant(s.last_seen),
                        time::format_instant(s.pulled_at)
                    );
                }
            }
            Ok(None)
        }
        Command::Limit {
            ref name,
            rate,
            none: _,
            ref reason,
        } => {
            let mut store = Store::open(&cli.store)?;
            let t = store
                .token(name)?
                .with_context(|| format!("no token named {name:?}"))?;
            if t.rate_limit == rate {
                bail!("{name} already has that limit; nothing was changed");
            }
            let text = rate.map(|r| r.to_string());
            let details = serde_json::json!({"token_id": t.token_id, "rate_limit": text, "was": t.rate_limit.map(|r| r.to_string())});
            store.transaction(
                &actor(cli.actor.clone(), reason.clone()),
                "token.limit",
                Some(name),
                details,
                now,
                |tx| store::set_rate_limit(tx, name, rate),
            )?;
            eprintln!(
                "{name}: rate limit {}; push to make the gates enforce it",
                text.as_deref().unwrap_or("removed")
            );
            Ok(None)
        }
        Command::Revoke {
            ref jti,
            ref issuer,
            ref reason,
            ..
        } if jti.is_some() => {
            let jti = jti.as_deref().unwrap_or_default();
            let who = actor(cli.actor.clone(), Some(reason.clone()));
            issuers::revoke_jti(&cli.store, jti, issuer.as_deref(), &who, now)?;
            Ok(None)
        }
        Command::Revoke {
            ref name,
            ref reason,
            ..
        } => {
            let name = name
                .as_deref()
                .context("name the token to revoke, or give --jti")?;
            let mut store = Store::open(&cli.store)?;
            let t = store
                .token(name)?
                .with_context(|| format!("no token named {name:?}"))?;
            if t.revoked_at.is_some() {
                bail!("{name} is already revoked; nothing was changed");
            }
            let details = serde_json::json!({"token_id": t.token_id});
            store.transaction(
                &actor(cli.actor.clone(), Some(reason.clone())),
                "token.revoke",
                Some(name),
                details,
                now,
                |tx| store::revoke_token(tx, name, now),
            )?;
            eprintln!(
                "revoked {name} ({}); push to make the gates enforce it",
                t.token_id
            );
            Ok(None)
        }
        Command::Rotate {
            ref name,
            ref grace,
            ref reason,
        } => {
            let grace_until = time::after(now, grace)?;
            let mut store = Store::open(&cli.store)?;
            let old = store
                .token(name)?
                .with_context(|| format!("no token named {name:?}"))?;
            if old.revoked_at.is_some()
                || store.revoke_all_at()?.is_some_and(|c| old.created_at <= c)
            {
                bail!("{name} is revoked; create a new token instead");
            }
            if old.imported && old.previous_hash.is_none() {
                eprintln!("note: {name} was imported; its replacement is a tokengate token");
            }
            // This rotation ends the grace of the secret the last one replaced: say so if a
            // gate still saw it after its replacement was issued.
            if let (Some(previous), Some(grace), Some(rotated_at)) = (
                &old.previous_token_id,
                old.previous_grace_until,
                old.rotated_at,
            ) {
                let used = usage::last_used_by_id(&store, previous)?;
                if let Some(used) = used.filter(|&u| grace > now && u >= rotated_at) {
                    eprintln!(
                        "warning: {name}'s previous secret {previous} was still used at {} (its replacement {} was issued at {}); this rotation ends its grace, due at {}: whatever still sends it will be refused after the push",
                        time::format_instant(used),
                        old.token_id,
                        time::format_instant(rotated_at),
                        time::format_instant(grace)
                    );
                }
            }
            let prefix = old
                .prefix
                .clone()
                .unwrap_or_else(|| token::DEFAULT_PREFIX.to_owned());
            let secret =
                token::generate(&prefix, random_32()?).map_err(|e| anyhow::anyhow!("{e}"))?;
            let hash = secret.hash();
            let details = serde_json::json!({"old_token_id": old.token_id, "new_token_id": hash.token_id(), "grace_until": grace_until});
            store.transaction(
                &actor(cli.actor.clone(), reason.clone()),
                "token.rotate",
                Some(name),
                details,
                now,
                |tx| {
                    store::rotate_token(
                        tx,
                        &old,
                        &prefix,
                        &hash.to_hex(),
                        &hash.token_id(),
                        grace_until,
                        now,
                    )
                },
            )?;
            eprintln!(
                "rotated {name}: {} replaces {}, which stays valid until {}; the new token is shown once, below:",
                hash.token_id(),
                old.token_id,
                time::format_instant(grace_until)
            );
            out!("{}", secret.expose());
            Ok(None)
        }
        Command::Issuer { ref action } => {
            let why = match action {
                issuers::IssuerAction::Add { reason, .. } => reason.clone(),
                issuers::IssuerAction::Retire { reason, .. } => Some(reason.clone()),
                issuers::IssuerAction::List { .. } => None,
            };
            issuers::run(action, &cli.store, actor(cli.actor.clone(), why), now)?;
            Ok(None)
        }
        Command::Mint {
            ref name,
            ref scopes,
            ref ttl,
            ref issuer_key_file,
            ref issuer_key_command,
            ref reason,
        } => {
            let key = issuers::IssuerKey::load(&issuers::KeySource {
                file: issuer_key_file.clone(),
                command: issuer_key_command.clone(),
            })?;
            let who = actor(cli.actor.clone(), reason.clone());
            let token = issuers::mint(&cli.store, &key, name, scopes, ttl, &who, now)?;
            out!("{token}");
            Ok(None)
        }
        Command::RevokeAll { ref reason, yes } => {
            if !yes {
                bail!(
                    "revoke-all revokes every token issued so far and cannot be undone; add --yes"
                );
            }
            let mut store = Store::open(&cli.store)?;
            let count = store.transaction(
                &actor(cli.actor.clone(), Some(reason.clone())),
                "token.revoke_all",
                None,
                serde_json::json!({"cutoff": now}),
                now,
                |tx| store::revoke_all(tx, now),
            )?;
            eprintln!(
                "revoked all {count} live tokens (cut-off {}); push now to every gate",
                time::format_instant(now)
            );
            Ok(None)
        }
        Command::Check {
            ref method,
            ref path,
            ref host,
            ref token_env,
            no_token,
            json,
        } => {
            let store = Store::open(&cli.store)?;
            let bundle = build_bundle(
                &store,
                Target::Envoy,
                store
                    .pushed_version(&Target::Envoy.to_string())?
                    .unwrap_or(0),
                now,
            )?;
            let mut gate = Gate::from_bundle(bundle).map_err(|e| anyhow::anyhow!("{e}"))?;
            // HS256 issuers' secrets as a gate reads them, from TOKENGATE_ISSUER_SECRETS.
            gate.set_issuer_secrets(std::env::var(issuer::SECRETS_VARIABLE).ok().as_deref());
            for warning in gate.issuer_secret_warnings() {
                eprintln!("warning: {warning}");
            }
            let authorization = match no_token {
                true => None,
                false => Some(format!("Bearer {}", read_secret(token_env.as_deref())?)),
            };
            let headers: Vec<(&str, &str)> = authorization
                .as_deref()
                .map(|value| ("authorization", value))
                .into_iter()
                .collect();
            let request = Request {
                method,
                path,
                authority: host,
                headers: &headers,
            };
            let decision = gate.decide(&request, now);
            // The request as the first of its windows: within its limits, which are shown.
            let limits = decision.rate_limits.clone();
            let decision = decision.within_limits();
            let limit_text = (!limits.is_empty()).then(|| {
                limits
                    .iter()
                    .map(|l| format!("{} ({:?})", l.rate, l.policy))
                    .collect::<Vec<_>>()
                    .join(" and ")
            });
            let value = serde_json::json!({
                "status": decision.status(),
                "outcome": if decision.outcome == Outcome::Allow { "allow" } else { "deny" },
                "reason": decision.reason.as_str(),
                "rule": decision.rule,
                "subject": decision.subject,
                "token_id": decision.token_id,
                "rate_limits": limits.iter().map(|l| serde_json::json!({
                    "limit": l.rate.to_string(),
                    "policy": l.policy,
                })).collect::<Vec<_>>(),
            });
            if json {
                out!("{}", serde_json::to_string_pretty(&value)?);
            } else {
                out!(
                    "{} {} -> {} {} (reason: {}; rule: {}; subject: {}{})",
                    method,
                    path,
                    decision.status(),
                    if decision.outcome == Outcome::Allow {
                        "allow"
                    } else {
                        "deny"
                    },
                    decision.reason,
                    decision.rule.as_deref().unwrap_or("none"),
                    decision.subject.as_deref().unwrap_or("none"),
                    limit_text.map_or(String::new(), |t| format!("; rate limits: {t}")),
                );
            }
            Ok((decision.outcome == Outcome::Deny).then_some(Negative))
        }
        Command::Policy { ref action } => match action {
            PolicyAction::Example => {
                write!(std::io::stdout().lock(), "{}", policy_file::DEFAULT_POLICY)?;
                Ok(None)
            }
            PolicyAction::Show => {
                let store = Store::open(&cli.store)?;
                let policy = store.policy()?.context("no policy is set")?;
                out!("{}", serde_json::to_string_pretty(&policy)?);
                Ok(None)
            }
            PolicyAction::Set { file } => {
                let text = std::fs::read_to_string(file)
                    .with_context(|| format!("reading {}", file.display()))?;
                let parsed = policy_file::parse(&file.display().to_string(), &text)?;
                let mut store = Store::open(&cli.store)?;
                let details = serde_json::json!({"file": file.display().to_string(), "rules": parsed.rules.len()});
                store.transaction(
                    &actor(cli.actor.clone(), None),
                    "policy.set",
                    None,
                    details,
                    now,
                    |tx| store::set(tx, "policy", &serde_json::to_string(&parsed)?),
                )?;
                eprintln!("policy set: {} rules; push to apply it", parsed.rules.len());
                Ok(None)
            }
        },
        Command::Bundle { target, ref out } => {
            let ring = key_source(&cli).load()?;
            let mut store = Store::open(&cli.store)?;
            let target: Target = target.into();
            let bundle = issue_bundle(
                &mut store,
                &ring,
                target,
                now,
                &actor(cli.actor.clone(), None),
            )?;
            let text = &bundle.text;
            match out {
                Some(path) => {
                    push::write_atomically(path, text.as_bytes())?;
                    eprintln!(
                        "bundle version {} for {target} written to {}",
                        bundle.version,
                        path.display()
                    );
                }
                None => out!("{text}"),
            }
            Ok(None)
        }
        Command::Push { ref target } => match target {
            PushTarget::Worker { url, bundle } => {
                // A bad URL is refused before any key is read (a key command never runs).
                status::base_url(url, "--url")?;
                let ring = key_source(&cli).load()?;
                let who = actor(cli.actor.clone(), None);
                let version =
                    worker_push::push(&cli.store, &ring, url, bundle.as_deref(), now, &who)?;
                eprintln!("pushed bundle version {version}; the Worker at {url} serves it");
                Ok(None)
            }
            PushTarget::Envoy {
                file,
                module,
                wasm,
                admin,
                bundle,
            } => {
                ecds::Encoding::of(file)?;
                if let Some(admin) = admin {
                    status::base_url(admin, "--admin")?;
                }
                let ring = key_source(&cli).load()?;
                let mut store = Store::open(&cli.store)?;
                let who = actor(cli.actor.clone(), None);
                let version = push::envoy(
                    &mut store,
                    &ring,
                    file,
                    (module.as_deref(), wasm.as_deref()),
                    admin.as_deref(),
                    bundle.as_deref(),
                    now,
                    &who,
                )?;
                match admin {
                    Some(admin) => eprintln!(
                        "pushed bundle version {version} via {}; Envoy ({admin}) serves it",
                        file.display()
                    ),
                    None => eprintln!(
                        "pushed bundle version {version} via {} (not confirmed: pass --admin URL to wait until Envoy serves it)",
                        file.display()
                    ),
                }
                Ok(None)
            }
        },
        Command::Status {
            ref envoy_admin,
            ref worker_url,
            json,
        } => gate_status(&cli.store, envoy_admin, worker_url, json),
        Command::Key { ref action } => {
            key_command::run(action, &cli.store, &key_source(&cli), &cli.actor, now)
        }
        Command::Audit { limit, json } => {
            let store = Store::open(&cli.store)?;
            let events = store.audit(limit)?;
            if json {
                out!("{}", serde_json::to_string_pretty(&events)?);
            } else {
                let mut rows = vec![["WHEN", "WHO", "WHAT", "SUBJECT", "WHY"]
                    .map(str::to_owned)
                    .to_vec()];
                for e in &events {
                    rows.push(vec![
                        time::format_instant(e.at),
                        e.actor.clone(),
                        e.action.clone(),
                        e.subject.clone().unwrap_or_default(),
                        e.reason.clone().unwrap_or_default(),
                    ]);
                }
                print_table(&rows)?;
            }
            Ok(None)
        }
        Command::Usage {
            action: UsageAction::Subjects { json },
        } => {
            let store = Store::open(&cli.store)?;
            let mut rows: Vec<(String, usage::Summary)> = usage::summaries(&store, now)?
                .into_iter()
                .filter_map(|(id, summary)| {
                    let subject = id.strip_prefix(usage::SUBJECT_PREFIX)?.to_owned();
                    Some((subject, summary))
                })
                .collect();
            rows.sort_by(|a, b| a.0.cmp(&b.0));
            if json {
                let list: Vec<serde_json::Value> = rows
                    .iter()
                    .map(|(subject, s)| {
                        serde_json::json!({"subject": subject, "last_used": s.last_used, "uses": s.uses,
                                           "uses_30d": s.uses_30d, "denied_scope": s.denied_scope})
                    })
                    .collect();
                out!("{}", serde_json::to_string_pretty(&list)?);
            } else {
                let mut table = vec![["SUBJECT", "LAST USED", "USES", "USES 30D", "DENIED SCOPE"]
                    .map(str::to_owned)
                    .to_vec()];
                for (subject, s) in &rows {
                    table.push(vec![
                        subject.clone(),
                        s.last_used.map_or("never".into(), time::format_instant),
                        s.uses.to_string(),
                        s.uses_30d.to_string(),
                        s.denied_scope.to_string(),
                    ]);
                }
                print_table(&table)?;
            }
            Ok(None)
        }
        Command::Usage {
            action:
                UsageAction::Pull {
                    ref envoy_url,
                    ref worker_url,
                    json,
                },
        } => {
            let mut sources = Vec::new();
            for (kind, urls, flag) in [
                ("envoy", envoy_url, "--envoy-url"),
                ("worker", worker_url, "--worker-url"),
            ] {
                for url in urls {
                    let url = status::base_url(url, flag)?;
                    sources.push(usage::Source { kind, url });
                }
            }
            if sources.is_empty() {
                bail!("name the gates to pull from: --envoy-url URL and/or --worker-url URL");
            }
            let ring = key_source(&cli).load()?;
            let who = actor(cli.actor.clone(), None);
            let (pulled, error) = usage::pull(&cli.store, &ring, &sources, now, &who)?;
            for p in &pulled {
                eprintln!(
                    "{} ({}): {} tokens, {} changed, {} new uses{}",
                    p.source,
                    p.instance,
                    p.tokens,
                    p.changed,
                    p.new_uses,
                    match p.unknown {
                        0 => String::new(),
                        n => format!(", {n} token ids this store does not know (not recorded)"),
                    }
                );
            }
            if json {
                out!("{}", serde_json::to_string_pretty(&pulled)?);
            }
            match error {
                Some(error) => Err(error.context(format!(
                    "{} of {} gates answered",
                    pulled.len(),
                    sources.len()
                ))),
                None => Ok(None),
            }
        }
        Command::Unused {
            ref unused_for,
            json,
        } => {
            let window = time::parse_duration(unused_for)?;
            let store = Store::open(&cli.store)?;
            let since = now.saturating_sub(window);
            // "Unused for D" needs usage pulled within D: older figures would call tokens
            // used since then unused.
            match usage::last_pull(&store)? {
                Some(at) if at >= since => {}
                Some(at) => bail!(
                    "the last usage pull was at {}, more than {unused_for} ago: run `tokengate usage pull` first",
                    time::format_instant(at)
                ),
                None => bail!("no usage was ever pulled: run `tokengate usage pull` first"),
            }
            let cut = store.revoke_all_at()?;
            let usage = usage::summaries(&store, now)?;
            let idle: Vec<(Token, usage::Summary)> = store
                .tokens()?
                .into_iter()
                .filter(|t| matches!(t.status(now, cut), "active" | "rotating"))
                .map(|t| {
                    let used = usage.get(&t.name).cloned().unwrap_or_default();
                    (t, used)
                })
                .filter(|(t, used)| used.last_used.unwrap_or(0).max(t.created_at) <= since)
                .collect();
            if json {
                let rows: Vec<_> = idle
                    .iter()
                    .map(|(t, used)| token_json(t, now, cut, used))
                    .collect();
                out!("{}", serde_json::to_string_pretty(&rows)?);
            } else if idle.is_empty() {
                eprintln!("every active token was used within {unused_for}");
            } else {
                let mut rows = vec![["NAME", "TOKEN ID", "LAST USED", "CREATED"]
                    .map(str::to_owned)
                    .to_vec()];
                for (t, used) in &idle {
                    rows.push(vec![
                        t.name.clone(),
                        t.token_id.clone(),
                        used.last_used
                            .map_or("never".to_owned(), time::format_instant),
                        time::format_instant(t.created_at),
                    ]);
                }
                print_table(&rows)?;
            }
            Ok((!idle.is_empty()).then_some(Negative))
        }
        Command::Expiring { ref within, json } => {
            let window = time::parse_duration(within)?;
            let store = Store::open(&cli.store)?;
            let cut = store.revoke_all_at()?;
            let soon: Vec<Token> = store
                .tokens()?
                .into_iter()
                .filter(|t| matches!(t.status(now, cut), "active" | "rotating" | "not-yet-valid"))
                .filter(|t| {
                    t.expires_at
                        .is_some_and(|e| e <= now.saturating_add(window))
                })
                .collect();
            if json {
                let usage = usage::summaries(&store, now)?;
                let rows: Vec<_> = soon
                    .iter()
                    .map(|t| {
                        token_json(
                            t,
                            now,
                            cut,
                            &usage.get(&t.name).cloned().unwrap_or_default(),
                        )
                    })
                    .collect();
                out!("{}", serde_json::to_string_pretty(&rows)?);
            } else if soon.is_empty() {
                eprintln!("nothing expires within {within}");
            } else {
                let mut rows = vec![["NAME", "TOKEN ID", "EXPIRES"].map(str::to_owned).to_vec()];
                for t in &soon {
                    rows.push(vec![
                        t.name.clone(),
                        t.token_id.clone(),
                        t.expires_at.map(time::format_instant).unwrap_or_default(),
                    ]);
                }
                print_table(&rows)?;
            }
            Ok((!soon.is_empty()).then_some(Negative))
        }
    }
}

fn token_json(t: &Token, now: u64, cut: Option<u64>, used: &usage::Summary) -> serde_json::Value {
    let at = |v: Option<u64>| v.map(time::format_instant);
    serde_json::json!({
        "name": t.name,
        "token_id": t.token_id,
        "status": t.status(now, cut),
        "scopes": t.scopes,
        "created_at": time::format_instant(t.created_at),
        "not_before": at(t.not_before),
        "expires_at": at(t.expires_at),
        "revoked_at": at(t.revoked_at),
        "imported": t.imported,
        "prefix": t.prefix,
        "description": t.description,
        "previous_token_id": t.previous_token_id,
        "previous_grace_until": at(t.previous_grace_until),
        "rate_limit": t.rate_limit.map(|limit| limit.to_string()),
        "last_used": at(used.last_used),
        "uses": used.uses,
        "uses_30d": used.uses_30d,
        "denied_scope": used.denied_scope,
    })
}

fn print_table(rows: &[Vec<String>]) -> Result<()> {
    let columns = rows.first().map_or(0, Vec::len);
    let widths: Vec<usize> = (0..columns)
        .map(|c| rows.iter().map(|r| r[c].chars().count()).max().unwrap_or(0))
        .collect();
    for row in rows {
        let line: Vec<String> = row
            .iter()
            .zip(&widths)
            .map(|(cell, w)| format!("{cell:<w$}"))
            .collect();
        out!("{}", line.join("  ").trim_end());
    }
    Ok(())
}

/// `tokengate status`: each gate's answer beside the version last pushed to it.
fn gate_status(
    store: &Path,
    envoy_admin: &[String],
    worker_url: &[String],
    json: bool,
) -> Result<Option<Negative>> {
    if envoy_admin.is_empty() && worker_url.is_empty() {
        bail!("name the gates to ask: --envoy-admin URL and/or --worker-url URL");
    }
    let store = Store::open(store)?;
    let mut rows = Vec::new();
    for admin in envoy_admin {
        let base = status::base_url(admin, "--envoy-admin")?;
        let served = status::envoy(&base)?;
        rows.push((
            "envoy",
            base,
            served.version,
            store.pushed_version("envoy")?,
        ));
    }
    for url in worker_url {
        let base = status::base_url(url, "--worker-url")?;
        let served = status::worker(&base)?;
        rows.push((
            "worker",
            base,
            served.version,
            store.pushed_version("worker")?,
        ));
    }
    // A gate serving nothing answers 503 to everything: never "current".
    let current = |serves: &Option<u64>, pushed: &Option<u64>| serves.is_some() && serves == pushed;
    let behind = rows
        .iter()
        .any(|(_, _, serves, pushed)| !current(serves, pushed));
    if json {
        let list: Vec<serde_json::Value> = rows
            .iter()
            .map(|(target, gate, serves, pushed)| {
                serde_json::json!({"target": target, "gate": gate, "serves": serves,
                    "last_pushed": pushed, "current": current(serves, pushed)})
            })
            .collect();
        out!("{}", serde_json::to_string_pretty(&list)?);
    } else {
        let mut table = vec![["TARGET", "GATE", "SERVES", "LAST PUSHED", "STATE"]
            .map(str::to_owned)
            .to_vec()];
        for (target, gate, serves, pushed) in &rows {
            table.push(vec![
                (*target).to_owned(),
                gate.clone(),
                status::served(*serves),
                status::served(*pushed),
                if serves == pushed {
                    "current"
                } else {
                    "behind"
                }
                .to_owned(),
            ]);
        }
        print_table(&table)?;
    }
    Ok(behind.then_some(Negative))
}

/// The bundle for the store's current state (unsigned).
pub(crate) fn build_bundle(
    store: &Store,
    target: Target,
    version: u64,
    now: u64,
) -> Result<Bundle> {
    let policy = store
        .policy()?
        .context("no policy is set (tokengate policy set FILE)")?;
    let tokens = store.tokens()?.iter().map(|t| t.record(now)).collect();
    let (issuers, revoked_jtis) = issuers::bundle_members(store, now)?;
    Ok(Bundle {
        version,
        issued_at: now,
        environment: store.environment()?,
        target,
        keys: store.published_keys()?,
        policy: policy.policy(),
        credentials: CredentialConfig {
            sources: policy.credentials.sources.clone(),
            forward: policy.credentials.forward,
        },
        tokens,
        revoke_all_at: store.revoke_all_at()?,
        cloudflare_access: policy.cloudflare_access.clone(),
        issuers,
        revoked_jtis,
    })
}

/// Refuses a bundle whose limits its target could not count (the Worker: per minute only),
/// naming the rule or token. A revoked or expired token's record carries no limit.
fn refuse_uncountable_limits(bundle: &Bundle) -> Result<()> {
    // Only the Worker's limits can be uncountable (Envoy counts any): the message names it.
    let target = bundle.target;
    let rules = bundle
        .policy
        .rules
        .iter()
        .map(|r| ("rule", &r.name, r.rate_limit));
    let tokens = bundle
        .tokens
        .iter()
        .map(|t| ("token", &t.name, t.rate_limit));
    let uncountable = rules.chain(tokens).find_map(|(kind, name, limit)| {
        limit
            .filter(|l| !l.countable_on(target))
            .map(|l| (kind, name, l))
    });
    match uncountable {
        Some((kind, name, limit)) => anyhow::bail!(
            "{kind} {name:?} has a rate limit of {limit}: the Worker enforces limits per minute only (Cloudflare's Rate Limiting binding{}); nothing was pushed",
            if kind == "token" {
                format!("; `tokengate limit {name} --rate N/min` or `--none`")
            } else {
                String::new()
            }
        ),
        None => Ok(()),
    }
}

/// A published bundle, ready to write or send.
pub(crate) struct Issued {
    pub version: u64,
    pub tokens: usize,
    /// The keys it publishes (what the gates trust after it).
    pub keys: KeySet,
    /// The exact text, envelope and signatures included.
    pub text: String,
}

/// The keys the store publishes, as a gate would trust them.
pub(crate) fn published_key_set(store: &Store) -> Result<KeySet> {
    KeySet::from_hex(&store.published_keys()?)
        .map_err(|e| anyhow::anyhow!("the store's published keys: {e} (tokengate key list)"))
}

/// Takes a new version, signs with every published key the admin holds, and checks the
/// bundle exactly as a gate that trusts the published keys will: a bundle a gate would
/// refuse is never written or sent.
pub(crate) fn issue_bundle(
    store: &mut Store,
    ring: &keys::Keyring,
    target: Target,
    now: u64,
    who: &Actor,
) -> Result<Issued> {
    issue_checked(store, ring, target, now, who).map(|(_, issued)| issued)
}

/// [`issue_bundle`], with the bundle it signed.
pub(crate) fn issue_checked(
    store: &mut Store,
    ring: &keys::Keyring,
    target: Target,
    now: u64,
    who: &Actor,
) -> Result<(Bundle, Issued)> {
    // Built before a version is taken: a bundle refused here uses none up.
    let mut bundle = build_bundle(store, target, 0, now)?;
    refuse_uncountable_limits(&bundle)?;
    let published = published_key_set(store)?;
    let version = store.transaction(
        who,
        "bundle.version",
        None,
        serde_json::json!({"target": target.to_string()}),
        now,
        store::next_version,
    )?;
    bundle.version = version;
    let payload = serde_json::to_string(&bundle)?;
    let signatures = ring.sign(payload.as_bytes(), &bundle.keys)?;
    let text = bundle::publish(&payload, &signatures);
    let environment = store.environment()?;
    let expect = Expectation {
        target,
        environment: Some(&environment),
        newer_than: store.pushed_version(&target.to_string())?,
    };
    let gate = Gate::load(text.as_bytes(), &published, &expect)
        .map_err(|e| anyhow::anyhow!("the bundle would be refused by the gate: {e}"))?;
    let issued = Issued {
        version,
        tokens: gate.token_count(),
        keys: published,
        text,
    };
    Ok((bundle, issued))
}
