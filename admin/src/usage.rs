//! Who still uses which token: `tokengate usage pull` reads each gate's counts and merges them
//! into the store; `list`, `show`, `unused` and `rotate` read them back.
//!
//! A gate answers `GET /.well-known/tokengate/usage` only to a request signed by an admin
//! key for its environment (`Tokengate-Signature` over `tokengate.usage/v1\n<t>\n<env>`).
//! Its report is cumulative, per counter set (`instance`: an Envoy process, the Worker's
//! usage store); the store keeps the last counts seen per (instance, token id) and adds only
//! what grew since, so pulling twice counts once. Every figure keeps its source (the gate's
//! URL and instance) and the pull that brought it.

use std::collections::{HashMap, HashSet};
use std::path::Path;

use anyhow::{bail, Context, Result};
use rusqlite::{params, OptionalExtension, Transaction};
use serde::Serialize;
use tokengate_core::signed::{SIGNATURE_HEADER, USAGE_CONTEXT};
pub use tokengate_core::usage::SUBJECT_PREFIX;
use tokengate_core::usage::{Report, REPORT_FORMAT, USAGE_PATH};

use crate::keys::Keyring;
use crate::status;
use crate::store::{Actor, Store};

/// Uses over this window are shown beside the total.
pub const RECENT_WINDOW: u64 = 30 * 86_400;

/// A gate to pull from.
#[derive(Debug, Clone)]
pub struct Source {
    /// `envoy` or `worker`.
    pub kind: &'static str,
    /// Its base URL (checked by [`status::base_url`]).
    pub url: String,
}

impl Source {
    fn label(&self) -> String {
        format!("{} {}", self.kind, self.url)
    }
}

/// What one pull from one gate did.
#[derive(Debug, Serialize)]
pub struct Pulled {
    pub source: String,
    pub instance: String,
    /// Tokens the gate reported.
    pub tokens: usize,
    /// Allowed requests counted for the first time by this pull.
    pub new_uses: u64,
    /// Tokens whose counts grew.
    pub changed: usize,
    /// Token ids the store does not know (another store's tokens): not recorded.
    pub unknown: usize,
}

/// A token's usage, over every gate and every secret it has had.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Summary {
    /// Unix seconds of the last use any gate reported.
    pub last_used: Option<u64>,
    /// Allowed requests, all time (as pulled).
    pub uses: u64,
    /// Allowed requests brought by pulls of the last 30 days.
    pub uses_30d: u64,
    /// Requests refused for a missing scope, all time.
    pub denied_scope: u64,
}

/// One gate's latest counts for one token (`show`).
#[derive(Debug, Serialize)]
pub struct SourceCounts {
    pub source: String,
    pub instance: String,
    pub token_id: String,
    pub allowed: u64,
    pub denied_scope: u64,
    pub last_seen: u64,
    pub pulled_at: u64,
}

fn unsigned(value: i64) -> u64 {
    u64::try_from(value).unwrap_or_default()
}

fn stored(value: u64) -> Result<i64> {
    i64::try_from(value).context("a count beyond what the store holds")
}

/// Every token's usage, by name.
pub fn summaries(store: &Store, now: u64) -> Result<HashMap<String, Summary>> {
    let conn = store.connection();
    let mut all: HashMap<String, Summary> = HashMap::new();
    let since = stored(now.saturating_sub(RECENT_WINDOW))?;
    let mut added = conn.prepare(
        "SELECT name, SUM(allowed), SUM(CASE WHEN pulled_at >= ?1 THEN allowed ELSE 0 END), SUM(denied_scope)
         FROM usage_added GROUP BY name",
    )?;
    let rows = added.query_map([since], |r| {
        Ok((
            r.get::<_, String>(0)?,
            r.get::<_, i64>(1)?,
            r.get::<_, i64>(2)?,
            r.get::<_, i64>(3)?,
        ))
    })?;
    for row in rows {
        let (name, uses, recent, denied) = row?;
        let summary = all.entry(name).or_default();
        summary.uses = unsigned(uses);
        summary.uses_30d = unsigned(recent);
        summary.denied_scope = unsigned(denied);
    }
    let mut seen = conn
        .prepare("SELECT name, MAX(last_seen) FROM usage_seen WHERE last_seen > 0 GROUP BY name")?;
    let rows = seen.query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)?)))?;
    for row in rows {
        let (name, last) = row?;
        all.entry(name).or_default().last_used = Some(unsigned(last));
    }
    Ok(all)
}

/// The last use of one secret (by token id), over every gate.
pub fn last_used_by_id(store: &Store, token_id: &str) -> Result<Option<u64>> {
    let last: Option<i64> = store.connection().query_row(
        "SELECT MAX(last_seen) FROM usage_seen WHERE token_id = ?1 AND last_seen > 0",
        [token_id],
        |r| r.get(0),
    )?;
    Ok(last.map(unsigned))
}

/// Each gate's latest counts for the token `name`.
pub fn sources(store: &Store, name: &str) -> Result<Vec<SourceCounts>> {
    let mut statement = store.connection().prepare(
        "SELECT source, instance, token_id, allowed, denied_scope, last_seen, pulled_at
         FROM usage_seen WHERE name = ?1 ORDER BY last_seen DESC",
    )?;
    let rows = statement.query_map([name], |r| {
        Ok(SourceCounts {
            source: r.get(0)?,
            instance: r.get(1)?,
            token_id: r.get(2)?,
            allowed: unsigned(r.get(3)?),
            denied_scope: unsigned(r.get(4)?),
            last_seen: unsigned(r.get(5)?),
            pulled_at: unsigned(r.get(6)?),
        })
    })?;
    Ok(rows.collect::<rusqlite::Result<_>>()?)
}

/// The largest report read: a line per token, up to the 1,000,000 tokens a bundle holds.
const MAX_REPORT_BYTES: u64 = 256 * 1024 * 1024;
/// Attempts per gate while it answers 429 (it checks at most 10 reads a second).
const ATTEMPTS: usize = 3;

/// Reads one gate's report: a GET signed (at the time it is sent) by every published key the
/// ring holds.
fn fetch(
    source: &Source,
    environment: &str,
    ring: &Keyring,
    published: &[String],
) -> Result<Report> {
    let url = format!("{}{USAGE_PATH}", source.url);
    let mut attempt = 0;
    let (code, text) = loop {
        attempt += 1;
        let t = crate::time::now();
        let signature = ring.sign_request(USAGE_CONTEXT, t, environment.as_bytes(), published)?;
        let mut response = status::agent()
            .get(&url)
            .header(SIGNATURE_HEADER, &signature)
            .call()
            .with_context(|| format!("asking {} for its usage", source.label()))?;
        let code = response.status().as_u16();
        let retry_after = status::retry_after(&response);
        let text = response
            .body_mut()
            .with_config()
            .limit(MAX_REPORT_BYTES)
            .read_to_string()
            .with_context(|| format!("reading {url}"))?;
        match (code, retry_after) {
            (429, Some(wait)) if attempt < ATTEMPTS => {
                std::thread::sleep(std::time::Duration::from_secs(wait.clamp(1, 5)));
            }
            _ => break (code, text),
        }
    };
    if code != 200 {
        let json: serde_json::Value = serde_json::from_str(&text).unwrap_or_default();
        bail!(
            "{} answered {code}: {}: {}",
            source.label(),
            json["error"].as_str().unwrap_or("?"),
            json["error_description"].as_str().unwrap_or(text.trim())
        );
    }
    let report: Report = serde_json::from_str(&text)
        .with_context(|| format!("{} did not answer a usage report", source.label()))?;
    if report.format != REPORT_FORMAT {
        bail!(
            "{} answered format {:?}, not {REPORT_FORMAT}",
            source.label(),
            report.format
        );
    }
    if report.environment != environment {
        bail!(
            "{} serves environment {:?}, this store {environment:?}",
            source.label(),
            report.environment
        );
    }
    let plausible = |text: &str| {
        !text.is_empty()
            && text.len() <= tokengate_core::usage::MAX_ID_LEN
            && text.bytes().all(|b| b.is_ascii_graphic())
    };
    if !plausible(&report.instance) || report.tokens.iter().any(|t| !plausible(&t.token_id)) {
        bail!(
            "{} answered an instance or token id that is not one",
            source.label()
        );
    }
    let mut ids = HashSet::new();
    if !report
        .tokens
        .iter()
        .all(|t| ids.insert(t.token_id.as_str()))
    {
        bail!("{} named a token twice in one report", source.label());
    }
    Ok(report)
}

/// Which name each token id belongs to: every secret a token has had (the store records each
/// id at creation and rotation, so a secret replaced twice between pulls keeps its name).
fn names(tx: &Transaction<'_>) -> Result<HashMap<String, String>> {
    let mut ids = tx.prepare("SELECT token_id, name FROM token_ids")?;
    let rows = ids.query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?)))?;
    Ok(rows.collect::<rusqlite::Result<_>>()?)
}

/// When usage was last pulled from any gate (`None`: never).
pub fn last_pull(store: &Store) -> Result<Option<u64>> {
    let at: Option<i64> = store.connection().query_row(
        "SELECT MAX(at) FROM audit WHERE action = 'usage.pull'",
        [],
        |r| r.get(0),
    )?;
    Ok(at.map(unsigned))
}

/// Adds what grew since the last pull of this instance.
fn merge(tx: &Transaction<'_>, source: &str, report: &Report, now: u64) -> Result<Pulled> {
    let names = names(tx)?;
    let mut pulled = Pulled {
        source: source.to_owned(),
        instance: report.instance.clone(),
        tokens: report.tokens.len(),
        new_uses: 0,
        changed: 0,
        unknown: 0,
    };
    for usage in &report.tokens {
        // Signed tokens are reported by subject (`sub:<subject>`, which no token name can
        // be): recorded under that id, so `usage subjects` can list them.
        let name = match names.get(&usage.token_id) {
            Some(name) => name,
            None if usage.token_id.starts_with(SUBJECT_PREFIX) => &usage.token_id,
            None => {
                pulled.unknown += 1;
                continue;
            }
        };
        let before: Option<(i64, i64, i64)> = tx
            .query_row(
                "SELECT allowed, denied_scope, last_seen FROM usage_seen WHERE instance = ?1 AND token_id = ?2",
                params![report.instance, usage.token_id],
                |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
            )
            .optional()?;
        let (allowed, denied, last) = before.map_or((0, 0, 0), |(a, d, l)| {
            (unsigned(a), unsigned(d), unsigned(l))
        });
        // Counts of one instance only grow: a smaller one is an older answer, not news.
        if usage.allowed < allowed || usage.denied_scope < denied {
            continue;
        }
        let (more_allowed, more_denied) = (usage.allowed - allowed, usage.denied_scope - denied);
        if more_allowed == 0 && more_denied == 0 && usage.last_seen <= last {
            continue;
        }
        tx.execute(
            "INSERT INTO usage_seen (instance, token_id, name, source, allowed, denied_scope, last_seen, pulled_at)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)
             ON CONFLICT (instance, token_id) DO UPDATE SET source = ?4, allowed = ?5, denied_scope = ?6,
               last_seen = MAX(last_seen, ?7), pulled_at = ?8",
            params![
                report.instance,
                usage.token_id,
                name,
                source,
                stored(usage.allowed)?,
                stored(usage.denied_scope)?,
                stored(usage.last_seen)?,
                stored(now)?
            ],
        )?;
        if more_allowed > 0 || more_denied > 0 {
            tx.execute(
                "INSERT INTO usage_added (pulled_at, source, instance, name, token_id, allowed, denied_scope)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
                params![
                    stored(now)?,
                    source,
                    report.instance,
                    name,
                    usage.token_id,
                    stored(more_allowed)?,
                    stored(more_denied)?
                ],
            )?;
        }
        pulled.new_uses += more_allowed;
        pulled.changed += 1;
    }
    Ok(pulled)
}

/// Pulls every gate, then merges what each answered in its own transaction with its audit
/// event. The store is not held (locked) while the gates are asked. Returns what each pull
/// did, and the first error after trying them all.
pub fn pull(
    store_path: &Path,
    ring: &Keyring,
    sources: &[Source],
    now: u64,
    actor: &Actor,
) -> Result<(Vec<Pulled>, Option<anyhow::Error>)> {
    let (environment, published) = {
        let store = Store::open(store_path)?;
        (store.environment()?, store.published_keys()?)
    };
    let mut first_error = None;
    let mut reports = Vec::new();
    for source in sources {
        match fetch(source, &environment, ring, &published) {
            Ok(report) => reports.push((source.label(), report)),
            Err(error) => {
                eprintln!("tokengate: {}: {error:#}", source.label());
                first_error.get_or_insert(error);
            }
        }
    }
    let mut done = Vec::new();
    if reports.is_empty() {
        return Ok((done, first_error));
    }
    let mut store = Store::open(store_path)?;
    for (label, report) in reports {
        let details = serde_json::json!({"source": label, "instance": report.instance, "tokens": report.tokens.len()});
        let merged = store.transaction(actor, "usage.pull", None, details, now, |tx| {
            merge(tx, &label, &report, now)
        })?;
        done.push(merged);
    }
    Ok((done, first_error))
}
