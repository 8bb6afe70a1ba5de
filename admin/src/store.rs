//! The embedded store: SQLite (bundled), one file, the source of truth for tokens.
//!
//! - Only hashes are written; the plaintext exists in memory until it is printed once.
//! - A schema version (`PRAGMA user_version`) with ordered migrations.
//! - Every change runs in one transaction together with its audit event.
//! - An exclusive lock file beside the database keeps two CLIs from interleaving
//!   read-modify-write cycles (SQLite's own locking covers single statements only).

use std::fs::{File, OpenOptions};
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use rusqlite::{params, Connection, OptionalExtension, Transaction};
use serde::Serialize;
use tokengate_core::bundle::{PreviousToken, TokenRecord};
use tokengate_core::rate::RateLimit;

use crate::policy_file::PolicyFile;

/// Ordered migrations; `user_version` is how many have run.
const MIGRATIONS: &[&str] = &[
    // 1: tokens, audit, settings, pushes.
    "CREATE TABLE settings (key TEXT PRIMARY KEY, value TEXT NOT NULL);
     CREATE TABLE tokens (
        name TEXT PRIMARY KEY,
        token_id TEXT NOT NULL UNIQUE,
        hash TEXT NOT NULL UNIQUE,
        scopes TEXT NOT NULL,
        created_at INTEGER NOT NULL,
        not_before INTEGER,
        expires_at INTEGER,
        revoked_at INTEGER,
        imported INTEGER NOT NULL DEFAULT 0,
        prefix TEXT,
        description TEXT NOT NULL DEFAULT '',
        previous_token_id TEXT,
        previous_hash TEXT UNIQUE,
        previous_grace_until INTEGER
     );
     CREATE TABLE audit (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        at INTEGER NOT NULL,
        actor TEXT NOT NULL,
        action TEXT NOT NULL,
        subject TEXT,
        reason TEXT,
        details TEXT NOT NULL DEFAULT '{}'
     );
     CREATE TABLE pushes (
        target TEXT PRIMARY KEY,
        version INTEGER NOT NULL,
        at INTEGER NOT NULL,
        destination TEXT NOT NULL
     );",
    // 2: the admin's Ed25519 public keys (never the private ones).
    "CREATE TABLE signing_keys (
        key_id TEXT PRIMARY KEY,
        public_key TEXT NOT NULL UNIQUE,
        created_at INTEGER NOT NULL,
        retired_at INTEGER
     );",
    // 3: usage pulled from the gates, and when a token's secret was last rotated.
    "ALTER TABLE tokens ADD COLUMN rotated_at INTEGER;
     -- Per gate instance and token id: the cumulative counts of the last pull (a pull adds
     -- only what grew since, so pulling twice counts once).
     CREATE TABLE usage_seen (
        instance TEXT NOT NULL,
        token_id TEXT NOT NULL,
        name TEXT NOT NULL,
        source TEXT NOT NULL,
        allowed INTEGER NOT NULL,
        denied_scope INTEGER NOT NULL,
        last_seen INTEGER NOT NULL,
        pulled_at INTEGER NOT NULL,
        PRIMARY KEY (instance, token_id)
     );
     -- What each pull added, per token: uses over a window are sums of these.
     CREATE TABLE usage_added (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        pulled_at INTEGER NOT NULL,
        source TEXT NOT NULL,
        instance TEXT NOT NULL,
        name TEXT NOT NULL,
        token_id TEXT NOT NULL,
        allowed INTEGER NOT NULL,
        denied_scope INTEGER NOT NULL
     );
     CREATE INDEX usage_added_by_name ON usage_added (name, pulled_at);
     -- Every secret's token id and the token it belongs to, kept after rotation: usage
     -- reported for a replaced secret is still its token's.
     CREATE TABLE token_ids (token_id TEXT PRIMARY KEY, name TEXT NOT NULL);
     INSERT INTO token_ids (token_id, name) SELECT token_id, name FROM tokens;
     INSERT OR IGNORE INTO token_ids (token_id, name)
        SELECT previous_token_id, name FROM tokens WHERE previous_token_id IS NOT NULL;",
    // 4: a token's own rate limit, as `100/second`.
    "ALTER TABLE tokens ADD COLUMN rate_limit TEXT;",
    // 5: issuers of signed tokens (public keys only), the tokens minted (never the token
    // itself) and the signed tokens revoked, kept in bundles until `until`.
    "CREATE TABLE issuers (
        kid TEXT PRIMARY KEY,
        alg TEXT NOT NULL,
        public_key TEXT UNIQUE,
        audience TEXT,
        scopes TEXT NOT NULL,
        max_lifetime INTEGER NOT NULL,
        added_at INTEGER NOT NULL,
        retired_at INTEGER
     );
     CREATE TABLE mints (
        jti TEXT PRIMARY KEY,
        issuer TEXT NOT NULL,
        subject TEXT NOT NULL,
        scopes TEXT NOT NULL,
        issued_at INTEGER NOT NULL,
        expires_at INTEGER NOT NULL
     );
     CREATE TABLE revoked_jtis (
        issuer TEXT NOT NULL,
        jti TEXT NOT NULL,
        revoked_at INTEGER NOT NULL,
        until INTEGER NOT NULL,
        PRIMARY KEY (issuer, jti)
     );",
];

/// An open store, holding the lock file for as long as it lives.
pub struct Store {
    conn: Connection,
    _lock: File,
}

/// A token as the store keeps it.
#[derive(Debug, Clone, Serialize)]
pub struct Token {
    pub name: String,
    pub token_id: String,
    #[serde(skip)]
    pub hash: String,
    pub scopes: Vec<String>,
    pub created_at: u64,
    pub not_before: Option<u64>,
    pub expires_at: Option<u64>,
    pub revoked_at: Option<u64>,
    pub imported: bool,
    /// The token prefix (not secret); none for imported secrets.
    pub prefix: Option<String>,
    pub description: String,
    pub previous_token_id: Option<String>,
    #[serde(skip)]
    pub previous_hash: Option<String>,
    pub previous_grace_until: Option<u64>,
    /// When the current secret replaced the previous one (`None`: never rotated).
    pub rotated_at: Option<u64>,
    /// The token's own rate limit.
    pub rate_limit: Option<RateLimit>,
}

impl Token {
    /// What the gate would say of this token at `now`, ignoring routes.
    pub fn status(&self, now: u64, revoke_all_at: Option<u64>) -> &'static str {
        if self.revoked_at.is_some() {
            "revoked"
        } else if revoke_all_at.is_some_and(|cut| self.created_at <= cut) {
            "revoked-all"
        } else if self.expires_at.is_some_and(|e| now >= e) {
            "expired"
        } else if self.not_before.is_some_and(|nb| now < nb) {
            "not-yet-valid"
        } else if self.previous_grace_until.is_some_and(|g| now < g) {
            "rotating"
        } else {
            "active"
        }
    }

    /// The bundle form: hashes only.
    pub fn record(&self, now: u64) -> TokenRecord {
        let previous = match (&self.previous_hash, self.previous_grace_until) {
            // A finished grace period is simply dropped from the bundle.
            (Some(hash), Some(grace_until)) if grace_until > now => Some(PreviousToken {
                hash: hash.clone(),
                grace_until,
            }),
            _ => None,
        };
        TokenRecord {
            name: self.name.clone(),
            hash: self.hash.clone(),
            scopes: self.scopes.clone(),
            created_at: self.created_at,
            not_before: self.not_before,
            expires_at: self.expires_at,
            revoked_at: self.revoked_at,
            grace_until: None,
            previous,
            // A revoked or expired token is refused before any limit: its record needs none
            // (so a limit a gate cannot count never holds back the push of a revocation).
            rate_limit: self
                .rate_limit
                .filter(|_| self.revoked_at.is_none() && self.expires_at.is_none_or(|e| e > now)),
        }
    }
}

/// One of the admin's public keys.
#[derive(Debug, Clone, Serialize)]
pub struct SigningKeyRow {
    pub key_id: String,
    pub public_key: String,
    pub created_at: u64,
    pub retired_at: Option<u64>,
}

impl SigningKeyRow {
    pub fn state(&self) -> &'static str {
        if self.retired_at.is_some() {
            "retired"
        } else {
            "active"
        }
    }
}

/// One audit event.
#[derive(Debug, Clone, Serialize)]
pub struct AuditEvent {
    pub id: i64,
    pub at: u64,
    pub actor: String,
    pub action: String,
    pub subject: Option<String>,
    pub reason: Option<String>,
    pub details: serde_json::Value,
}

/// Who did it and why, for the audit trail.
#[derive(Debug, Clone)]
pub struct Actor {
    pub who: String,
    pub why: Option<String>,
}

const LOCK_WAIT: Duration = Duration::from_secs(30);

fn lock(path: &Path) -> Result<File> {
    let lock_path = path.with_extension("lock");
    let file = OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .mode(0o600)
        .open(&lock_path)
        .with_context(|| format!("opening lock file {}", lock_path.display()))?;
    let started = Instant::now();
    let mut told = false;
    loop {
        match file.try_lock() {
            Ok(()) => return Ok(file),
            Err(std::fs::TryLockError::WouldBlock) => {
                if !told {
                    eprintln!(
                        "waiting for another tokengate command holding {}",
                        lock_path.display()
                    );
                    told = true;
                }
                if started.elapsed() > LOCK_WAIT {
                    bail!(
                        "the store is locked by another tokengate command ({}); gave up after {}s",
                        lock_path.display(),
                        LOCK_WAIT.as_secs()
                    );
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            Err(std::fs::TryLockError::Error(e)) => return Err(e).context("locking the store"),
        }
    }
}

fn scopes_from(text: String) -> rusqlite::Result<Vec<String>> {
    serde_json::from_str(&text).map_err(|e| {
        rusqlite::Error::FromSqlConversionFailure(0, rusqlite::types::Type::Text, Box::new(e))
    })
}

fn seconds(value: Option<i64>) -> Option<u64> {
    value.and_then(|v| u64::try_from(v).ok())
}

fn signed(value: Option<u64>) -> Option<i64> {
    value.and_then(|v| i64::try_from(v).ok())
}

const TOKEN_COLUMNS: &str = "name, token_id, hash, scopes, created_at, not_before, expires_at, revoked_at, imported, description, previous_token_id, previous_hash, previous_grace_until, prefix, rate_limit";

fn token_from_row(row: &rusqlite::Row<'_>) -> rusqlite::Result<Token> {
    Ok(Token {
        name: row.get(0)?,
        token_id: row.get(1)?,
        hash: row.get(2)?,
        scopes: scopes_from(row.get(3)?)?,
        created_at: seconds(row.get(4)?).unwrap_or_default(),
        not_before: seconds(row.get(5)?),
        expires_at: seconds(row.get(6)?),
        revoked_at: seconds(row.get(7)?),
        imported: row.get::<_, i64>(8)? != 0,
        description: row.get(9)?,
        previous_token_id: row.get(10)?,
        previous_hash: row.get(11)?,
        previous_grace_until: seconds(row.get(12)?),
        prefix: row.get(13)?,
        rate_limit: row
            .get::<_, Option<String>>(14)?
            .map(|text| text.parse())
            .transpose()
            .map_err(|e| {
                rusqlite::Error::FromSqlConversionFailure(
                    14,
                    rusqlite::types::Type::Text,
                    Box::new(e),
                )
            })?,
        rotated_at: seconds(row.get(15)?),
    })
}

impl Store {
    /// Creates a new store; refuses to overwrite one.
    pub fn create(path: &Path, environment: &str, now: u64, actor: &Actor) -> Result<Self> {
        if path.exists() {
            bail!(
                "{} already exists; refusing to overwrite a store",
                path.display()
            );
        }
        // Created 0600 before SQLite opens it: SQLite gives the WAL and shared-memory files
        // the database file's mode, and the store holds hashes of imported secrets (guessable
        // offline when short) and the audit trail.
        OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(path)
            .with_context(|| format!("creating {}", path.display()))?;
        let mut store = Self::open_unchecked(path)?;
        store.transaction(
            actor,
            "init",
            None,
            serde_json::json!({ "environment": environment }),
            now,
            |tx| {
                set(tx, "environment", environment)?;
                set(tx, "bundle_version", "0")?;
                Ok(())
            },
        )?;
        Ok(store)
    }

    /// Opens an existing store and brings its schema up to date.
    pub fn open(path: &Path) -> Result<Self> {
        if !path.exists() {
            bail!(
                "no store at {} (run `tokengate init` first, or pass --store)",
                path.display()
            );
        }
        Self::open_unchecked(path)
    }

    fn open_unchecked(path: &Path) -> Result<Self> {
        let lock = lock(path)?;
        let mut conn =
            Connection::open(path).with_context(|| format!("opening {}", path.display()))?;
        conn.pragma_update(None, "journal_mode", "WAL")?;
        conn.pragma_update(None, "foreign_keys", "ON")?;
        conn.busy_timeout(Duration::from_secs(10))?;
        let version: i64 = conn.pragma_query_value(None, "user_version", |r| r.get(0))?;
        let version = usize::try_from(version).context("negative schema version")?;
        if version > MIGRATIONS.len() {
            bail!(
                "{} has schema version {version}, newer than this tokengate understands ({}); upgrade tokengate",
                path.display(),
                MIGRATIONS.len()
            );
        }
        if version < MIGRATIONS.len() {
            let tx = conn.transaction()?;
            for (i, migration) in MIGRATIONS.iter().enumerate().skip(version) {
                tx.execute_batch(migration)
                    .with_context(|| format!("running migration {}", i + 1))?;
            }
            tx.pragma_update(None, "user_version", i64::try_from(MIGRATIONS.len())?)?;
            tx.commit()?;
        }
        Ok(Self { conn, _lock: lock })
    }

    /// Runs `change` and its audit event in one transaction.
    pub fn transaction<T>(
        &mut self,
        actor: &Actor,
        action: &str,
        subject: Option<&str>,
        details: serde_json::Value,
        now: u64,
        change: impl FnOnce(&Transaction<'_>) -> Result<T>,
    ) -> Result<T> {
        let tx = self.conn.transaction()?;
        let out = change(&tx)?;
        tx.execute(
            "INSERT INTO audit (at, actor, action, subject, reason, details) VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
            params![signed(Some(now)), actor.who, action, subject, actor.why, details.to_string()],
        )?;
        tx.commit()?;
        Ok(out)
    }

    /// The connection, for reads of a concern that keeps its own queries (usage).
    pub fn connection(&self) -> &Connection {
        &self.conn
    }

    /// A setting.
    pub fn setting(&self, key: &str) -> Result<Option<String>> {
        Ok(self
            .conn
            .query_row("SELECT value FROM settings WHERE key = ?1", [key], |r| {
                r.get(0)
            })
            .optional()?)
    }

    /// The environment the store issues bundles for.
    pub fn environment(&self) -> Result<String> {
        self.setting("environment")?
            .context("the store has no environment; was it made by `tokengate init`?")
    }

    /// The revoke-all cut-off, if one was set.
    pub fn revoke_all_at(&self) -> Result<Option<u64>> {
        Ok(self.setting("revoke_all_at")?.and_then(|v| v.parse().ok()))
    }

    /// The policy, if one was set.
    pub fn policy(&self) -> Result<Option<PolicyFile>> {
        self.setting("policy")?
            .map(|text| serde_json::from_str(&text).context("the stored policy is unreadable"))
            .transpose()
    }

    /// One token by name.
    pub fn token(&self, name: &str) -> Result<Option<Token>> {
        Ok(self
            .conn
            .query_row(
                &format!("SELECT {TOKEN_COLUMNS}, rotated_at FROM tokens WHERE name = ?1"),
                [name],
                token_from_row,
            )
            .optional()?)
    }

    /// Every token, by name.
    pub fn tokens(&self) -> Result<Vec<Token>> {
        let mut statement = self.conn.prepare(&format!(
            "SELECT {TOKEN_COLUMNS}, rotated_at FROM tokens ORDER BY name"
        ))?;
        let rows = statement.query_map([], token_from_row)?;
        Ok(rows.collect::<rusqlite::Result<_>>()?)
    }

    /// Audit events, newest last.
    pub fn audit(&self, limit: usize) -> Result<Vec<AuditEvent>> {
        let mut statement = self.conn.prepare(
            "SELECT id, at, actor, action, subject, reason, details FROM
               (SELECT * FROM audit ORDER BY id DESC LIMIT ?1) ORDER BY id",
        )?;
        let rows = statement.query_map([i64::try_from(limit).unwrap_or(i64::MAX)], |r| {
            let details: String = r.get(6)?;
            Ok(AuditEvent {
                id: r.get(0)?,
                at: seconds(r.get(1)?).unwrap_or_default(),
                actor: r.get(2)?,
                action: r.get(3)?,
                subject: r.get(4)?,
                reason: r.get(5)?,
                details: serde_json::from_str(&details).unwrap_or_default(),
            })
        })?;
        Ok(rows.collect::<rusqlite::Result<_>>()?)
    }

    /// Every key the admin has had, oldest first.
    pub fn signing_keys(&self) -> Result<Vec<SigningKeyRow>> {
        let mut stmt = self.conn.prepare(
            "SELECT key_id, public_key, created_at, retired_at FROM signing_keys ORDER BY created_at, rowid",
        )?;
        let rows = stmt.query_map([], |r| {
            Ok(SigningKeyRow {
                key_id: r.get(0)?,
                public_key: r.get(1)?,
                created_at: seconds(r.get(2)?).unwrap_or_default(),
                retired_at: seconds(r.get(3)?),
            })
        })?;
        Ok(rows.collect::<rusqlite::Result<_>>()?)
    }

    /// The public keys (hex) every bundle publishes: those not retired, oldest first.
    pub fn published_keys(&self) -> Result<Vec<String>> {
        Ok(self
            .signing_keys()?
            .into_iter()
            .filter(|k| k.retired_at.is_none())
            .map(|k| k.public_key)
            .collect())
    }

    /// When the last push to a target was made (unix seconds), if any.
    pub fn pushed_at(&self, target: &str) -> Result<Option<u64>> {
        Ok(self
            .conn
            .query_row("SELECT at FROM pushes WHERE target = ?1", [target], |r| {
                r.get::<_, i64>(0)
            })
            .optional()?
            .and_then(|v| u64::try_from(v).ok()))
    }

    /// The last version pushed to a target, if any.
    pub fn pushed_version(&self, target: &str) -> Result<Option<u64>> {
        Ok(self
            .conn
            .query_row(
                "SELECT version FROM pushes WHERE target = ?1",
                [target],
                |r| r.get::<_, i64>(0),
            )
            .optional()?
            .and_then(|v| u64::try_from(v).ok()))
    }
}

/// Writes a setting inside a transaction.
pub fn set(tx: &Transaction<'_>, key: &str, value: &str) -> Result<()> {
    tx.execute(
        "INSERT INTO settings (key, value) VALUES (?1, ?2) ON CONFLICT(key) DO UPDATE SET value = excluded.value",
        params![key, value],
    )?;
    Ok(())
}

/// Records a new public key inside a transaction.
pub fn add_signing_key(
    tx: &Transaction<'_>,
    key_id: &str,
    public_key: &str,
    now: u64,
) -> Result<()> {
    tx.execute(
        "INSERT INTO signing_keys (key_id, public_key, created_at) VALUES (?1, ?2, ?3)",
        params![key_id, public_key, signed(Some(now))],
    )
    .with_context(|| format!("key {key_id} is already in the store"))?;
    Ok(())
}

/// Retires a key inside a transaction; the last active key cannot be retired.
pub fn retire_signing_key(tx: &Transaction<'_>, key_id: &str, now: u64) -> Result<()> {
    let state: Option<Option<i64>> = tx
        .query_row(
            "SELECT retired_at FROM signing_keys WHERE key_id = ?1",
            [key_id],
            |r| r.get(0),
        )
        .optional()?;
    match state {
        None => bail!("no key {key_id} in the store (tokengate key list)"),
        Some(Some(_)) => bail!("key {key_id} is already retired"),
        Some(None) => {}
    }
    let active: i64 = tx.query_row(
        "SELECT COUNT(*) FROM signing_keys WHERE retired_at IS NULL",
        [],
        |r| r.get(0),
    )?;
    if active <= 1 {
        bail!("{key_id} is the only active key; rotate first (tokengate key rotate)");
    }
    tx.execute(
        "UPDATE signing_keys SET retired_at = ?2 WHERE key_id = ?1",
        params![key_id, signed(Some(now))],
    )?;
    Ok(())
}

/// Takes the next bundle version inside a transaction.
pub fn next_version(tx: &Transaction<'_>) -> Result<u64> {
    let current: u64 = tx
        .query_row(
            "SELECT value FROM settings WHERE key = 'bundle_version'",
            [],
            |r| r.get::<_, String>(0),
        )
        .optional()?
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    let next = current + 1;
    set(tx, "bundle_version", &next.to_string())?;
    Ok(next)
}

/// Records a successful push inside a transaction.
pub fn record_push(
    tx: &Transaction<'_>,
    target: &str,
    version: u64,
    now: u64,
    destination: &str,
) -> Result<()> {
    tx.execute(
        "INSERT INTO pushes (target, version, at, destination) VALUES (?1, ?2, ?3, ?4)
         ON CONFLICT(target) DO UPDATE SET version = excluded.version, at = excluded.at, destination = excluded.destination",
        params![target, signed(Some(version)), signed(Some(now)), destination],
    )?;
    Ok(())
}

/// Inserts a new token inside a transaction; names and hashes are unique.
pub fn insert_token(tx: &Transaction<'_>, token: &Token) -> Result<()> {
    let taken: bool = tx.query_row(
        "SELECT EXISTS(SELECT 1 FROM tokens WHERE hash = ?1 OR previous_hash = ?1)",
        [&token.hash],
        |r| r.get(0),
    )?;
    if taken {
        bail!("that secret is already in the store (as another token); nothing was changed");
    }
    let result = tx.execute(
        &format!("INSERT INTO tokens ({TOKEN_COLUMNS}) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15)"),
        params![
            token.name,
            token.token_id,
            token.hash,
            serde_json::to_string(&token.scopes)?,
            signed(Some(token.created_at)),
            signed(token.not_before),
            signed(token.expires_at),
            signed(token.revoked_at),
            i64::from(token.imported),
            token.description,
            token.previous_token_id,
            token.previous_hash,
            signed(token.previous_grace_until),
            token.prefix,
            token.rate_limit.map(|limit| limit.to_string()),
        ],
    );
    match result {
        Ok(_) => record_token_id(tx, &token.token_id, &token.name),
        Err(rusqlite::Error::SqliteFailure(e, _))
            if e.code == rusqlite::ErrorCode::ConstraintViolation =>
        {
            bail!(
                "a token named {:?} already exists; nothing was changed",
                token.name
            )
        }
        Err(e) => Err(e.into()),
    }
}

/// Records which token a secret's id belongs to (for usage reported under it later).
fn record_token_id(tx: &Transaction<'_>, token_id: &str, name: &str) -> Result<()> {
    tx.execute(
        "INSERT OR REPLACE INTO token_ids (token_id, name) VALUES (?1, ?2)",
        params![token_id, name],
    )?;
    Ok(())
}

/// Replaces a token's secret by rotation: the old hash stays valid until `grace_until`.
pub fn rotate_token(
    tx: &Transaction<'_>,
    old: &Token,
    new_prefix: &str,
    new_hash: &str,
    new_token_id: &str,
    grace_until: u64,
    now: u64,
) -> Result<()> {
    tx.execute(
        "UPDATE tokens SET previous_token_id = token_id, previous_hash = hash, previous_grace_until = ?1,
                           token_id = ?2, hash = ?3, imported = 0, prefix = ?5, rotated_at = ?6
         WHERE name = ?4",
        params![signed(Some(grace_until)), new_token_id, new_hash, old.name, new_prefix, signed(Some(now))],
    )?;
    record_token_id(tx, new_token_id, &old.name)?;
    Ok(())
}

/// Marks a token revoked (its previous secret, if rotating, goes with it).
pub fn revoke_token(tx: &Transaction<'_>, name: &str, now: u64) -> Result<()> {
    tx.execute(
        "UPDATE tokens SET revoked_at = ?1 WHERE name = ?2 AND revoked_at IS NULL",
        params![signed(Some(now)), name],
    )?;
    Ok(())
}

/// Sets (or, with `None`, removes) a token's own rate limit.
pub fn set_rate_limit(tx: &Transaction<'_>, name: &str, limit: Option<RateLimit>) -> Result<()> {
    tx.execute(
        "UPDATE tokens SET rate_limit = ?1 WHERE name = ?2",
        params![limit.map(|l| l.to_string()), name],
    )?;
    Ok(())
}

/// Marks every token revoked and sets the cut-off; returns how many were live.
pub fn revoke_all(tx: &Transaction<'_>, now: u64) -> Result<usize> {
    let count = tx.execute(
        "UPDATE tokens SET revoked_at = ?1 WHERE revoked_at IS NULL",
        params![signed(Some(now))],
    )?;
    set(tx, "revoke_all_at", &now.to_string())?;
    Ok(count)
}
