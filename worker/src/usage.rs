//! Usage at the Worker: each isolate counts in memory, and adds its counts to the usage
//! store (the object `usage` of the `TOKENGATE_STATE` Durable Object class, SQLite) once per
//! flush interval (`TOKENGATE_USAGE_FLUSH_SECONDS`, default 60), from a request that finds
//! the interval over (`waitUntil`, after the response). No request waits for a write.
//!
//! Write cost: each flush upserts one row per token the isolate saw since its last flush,
//! plus one row naming the flush: at most `3600 / interval` row writes per active token per
//! hour per isolate (60 at the default).
//!
//! Exactly once: an isolate numbers its flushes; the store applies a flush only if its number
//! is above the last it applied for that isolate, so a flush retried after a lost answer
//! counts once. A failed flush is kept (at most [`MAX_OUTBOX`] of them) and sent again, in
//! order, with the next. Counts an isolate holds when Cloudflare evicts it (at most one
//! interval's) are lost.
//!
//! Reads: `GET /.well-known/tokengate/usage`, signed by an admin key
//! ([`tokengate_core::usage`]); the isolate that takes it flushes its own counts first.

use std::cell::{Cell, RefCell};

use serde::{Deserialize, Serialize};
use tokengate_core::decision::Decision;
pub use tokengate_core::usage::USAGE_PATH;
use tokengate_core::usage::{self, Tally};
use worker::{console_error, Env, Request, Response, Result};

use crate::served::{self, Failure};
use crate::state::{self, Call};
use crate::{gate, push, ENVIRONMENT_VAR};

/// Variable: seconds between an isolate's flushes to the usage store.
pub const FLUSH_VAR: &str = "TOKENGATE_USAGE_FLUSH_SECONDS";
/// The flush interval when [`FLUSH_VAR`] is not set.
pub const DEFAULT_FLUSH_SECONDS: u64 = 60;
/// The longest flush interval: [`MAX_OUTBOX`] intervals (10 hours) stay well within the time
/// the store remembers an isolate's flush numbers, so a retried flush is never applied twice.
pub const MAX_FLUSH_SECONDS: u64 = 600;
/// The usage store's object name (in the state class, apart from the push state's object).
pub const USAGE_OBJECT: &str = "usage";
/// Failed flushes an isolate keeps to send again; past this the oldest is dropped (logged).
pub const MAX_OUTBOX: usize = 60;
/// Flushes sent in one call to the store (the rest go in the next calls).
const BATCHES_PER_CALL: usize = 10;
/// Isolates the store remembers flush numbers of for this long after their last flush; an
/// isolate's outbox spans at most [`MAX_OUTBOX`] intervals, far less.
const FORGET_ISOLATE_MS: f64 = 86_400_000.0;

/// A kept flush older than this is dropped, not sent (logged): the store forgets an isolate's
/// flush numbers a day after its last flush, and an isolate idle that long could otherwise
/// have a flush applied twice.
const MAX_BATCH_AGE_MS: f64 = 12.0 * 3_600_000.0;

/// One flush: the isolate's counts since its previous one.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Batch {
    /// The isolate's flush number (from 1, increasing).
    pub seq: u64,
    /// [`Tally::encode`].
    pub tally: String,
    /// When the isolate made it (ms; not sent).
    #[serde(skip)]
    pub made_ms: f64,
}

thread_local! {
    static UNFLUSHED: RefCell<Tally> = RefCell::new(Tally::default());
    static OUTBOX: RefCell<Vec<Batch>> = const { RefCell::new(Vec::new()) };
    static NEXT_SEQ: Cell<u64> = const { Cell::new(1) };
    /// When this isolate last started a flush (ms); 0 before its first count.
    static LAST_FLUSH_MS: Cell<f64> = const { Cell::new(0.0) };
    static FLUSHING: Cell<bool> = const { Cell::new(false) };
    static FLUSH_INTERVAL_MS: Cell<Option<f64>> = const { Cell::new(None) };
    /// This isolate's usage reads this second.
    static READS: RefCell<usage::ReadLimiter> = const { RefCell::new(usage::ReadLimiter::new()) };
    static ISOLATE: String = random_id("isolate");
}

/// A name no other isolate or store draws: uniqueness is all it needs (it guards no secret).
fn random_id(kind: &str) -> String {
    let word = || (js_sys::Math::random() * 4_294_967_296.0) as u64;
    format!("{kind}-{:08x}{:08x}{:08x}", word(), word(), word())
}

/// The flush interval, read from the environment once per isolate.
fn flush_interval_ms(env: &Env) -> f64 {
    if let Some(ms) = FLUSH_INTERVAL_MS.get() {
        return ms;
    }
    let seconds = env
        .var(FLUSH_VAR)
        .ok()
        .and_then(|v| v.to_string().trim().parse::<u64>().ok())
        .filter(|&s| s > 0)
        .unwrap_or(DEFAULT_FLUSH_SECONDS)
        .min(MAX_FLUSH_SECONDS);
    let ms = seconds as f64 * 1000.0;
    FLUSH_INTERVAL_MS.set(Some(ms));
    ms
}

/// Counts `decision` at `now` in this isolate.
pub fn count(decision: &Decision, now: u64) {
    if UNFLUSHED.with(|u| u.borrow_mut().count(decision, now)) && LAST_FLUSH_MS.get() == 0.0 {
        LAST_FLUSH_MS.set(served::now_ms());
    }
}

/// Whether this isolate should flush now (its interval is over and it has counts to send);
/// if so, the flush has started being due and the caller runs [`flush`] after the response.
pub fn due(env: &Env) -> bool {
    let pending =
        !UNFLUSHED.with(|u| u.borrow().is_empty()) || OUTBOX.with(|o| !o.borrow().is_empty());
    let started = LAST_FLUSH_MS.get();
    let due = pending
        && !FLUSHING.get()
        && started > 0.0
        && served::now_ms() - started >= flush_interval_ms(env);
    if due {
        LAST_FLUSH_MS.set(served::now_ms());
    }
    due
}

/// Sends this isolate's counts (and any flush that failed before) to the usage store, at
/// most [`BATCHES_PER_CALL`] flushes per call, in order.
pub async fn flush(env: &Env) -> std::result::Result<(), Failure> {
    if FLUSHING.replace(true) {
        return Ok(());
    }
    let counts = UNFLUSHED.with(|u| u.borrow_mut().take());
    OUTBOX.with(|o| {
        let mut outbox = o.borrow_mut();
        if !counts.is_empty() {
            let seq = NEXT_SEQ.get();
            NEXT_SEQ.set(seq + 1);
            outbox.push(Batch {
                seq,
                tally: counts.encode(),
                made_ms: served::now_ms(),
            });
        }
        let cutoff = served::now_ms() - MAX_BATCH_AGE_MS;
        let kept = outbox.len();
        outbox.retain(|batch| batch.made_ms >= cutoff);
        if outbox.len() < kept {
            console_error!("tokengate usage: {} flushes kept longer than 12 hours were dropped; their counts are lost", kept - outbox.len());
        }
        if outbox.len() > MAX_OUTBOX {
            let dropped = outbox.len() - MAX_OUTBOX;
            console_error!("tokengate usage: the usage store was unreachable for {dropped} flushes too many; their counts are lost");
            outbox.drain(..dropped);
        }
    });
    let result = send_outbox(env).await;
    FLUSHING.set(false);
    result
}

async fn send_outbox(env: &Env) -> std::result::Result<(), Failure> {
    let isolate = ISOLATE.with(Clone::clone);
    loop {
        let batches: Vec<Batch> =
            OUTBOX.with(|o| o.borrow().iter().take(BATCHES_PER_CALL).cloned().collect());
        if batches.is_empty() {
            return Ok(());
        }
        let call = Call::UsageAdd {
            isolate: isolate.clone(),
            batches,
        };
        // The store answers the last flush number it has applied for this isolate.
        let last = match state::call_object::<u64>(env, USAGE_OBJECT, &call).await {
            Ok(Ok(last)) => last,
            Ok(Err(refused)) => return Err(Failure::State(refused.description)),
            Err(failure) => return Err(failure),
        };
        let before = OUTBOX.with(|o| o.borrow().len());
        OUTBOX.with(|o| o.borrow_mut().retain(|b| b.seq > last));
        if OUTBOX.with(|o| o.borrow().len()) == before {
            return Err(Failure::State(format!(
                "the usage store applied up to flush {last}, none of those sent"
            )));
        }
    }
}

/// What the usage store answers a read.
#[derive(Debug, Serialize, Deserialize)]
pub struct Stored {
    /// The store's counter set (drawn when it was created).
    pub instance: String,
    /// [`Tally::encode`] of every count.
    pub tally: String,
    /// Rows the store has written for flushes (the write cost the bench reports).
    pub rows_written: u64,
    /// Flushes applied.
    pub flushes: u64,
}

/// `GET /.well-known/tokengate/usage`: signed by an admin key for this environment, within
/// five minutes; the report of every flushed count (this isolate's flushed first).
pub async fn handle_read(req: &Request, env: &Env, target: &gate::Target) -> Result<Response> {
    let method = req.inner().method();
    // The fields as the Fetch API gives them (repeats joined by ", "): a repeated signature
    // header then reads as one that does not parse, and is refused.
    let headers: Vec<(String, String)> = req.headers().entries().collect();
    let header_refs = tokengate_core::decision::header_refs(&headers);
    let request = target.request(&method, &header_refs);
    let environment = env.var(ENVIRONMENT_VAR).ok().map(|v| v.to_string());
    let keys = match served::view(env).await {
        Ok(view) => push::trusted_keys(env, &view).ok(),
        Err(failure) => {
            console_error!("tokengate usage: {failure}");
            None
        }
    };
    let trusted = keys.as_ref().zip(environment.as_deref());
    let now = served::now_secs();
    let admit = |now| READS.with(|reads| reads.borrow_mut().admit(now));
    if let Err(refusal) = usage::authorize(&request, trusted, now, admit) {
        return gate::denial_response(&refusal);
    }
    let environment = environment.unwrap_or_default();
    // A flush already on its way (waitUntil) holds counts this read must see: let it land
    // first (bounded: a flush call gives up after 3 s).
    for _ in 0..80 {
        if !FLUSHING.get() {
            break;
        }
        worker::Delay::from(std::time::Duration::from_millis(50)).await;
    }
    let stored = match flush(env).await {
        Ok(()) => read(env).await,
        Err(failure) => Err(failure),
    };
    match stored.and_then(|s| {
        Tally::decode(&s.tally)
            .map(|tally| (s.instance, tally))
            .ok_or_else(|| Failure::Corrupt("the usage store's counts".to_owned()))
    }) {
        Ok((instance, tally)) => {
            gate::denial_response(&tally.report(&instance, &environment, now).answer())
        }
        Err(failure) => {
            console_error!("tokengate usage: {failure}");
            crate::json_error(
                503,
                "temporarily_unavailable",
                "the usage store cannot be read right now; retry",
                &[("retry-after", "1".to_owned())],
            )
        }
    }
}

/// The usage store's counts and figures.
pub async fn read(env: &Env) -> std::result::Result<Stored, Failure> {
    let call = Call::UsageRead { counts: true };
    match state::call_object::<Stored>(env, USAGE_OBJECT, &call).await {
        Ok(Ok(stored)) => Ok(stored),
        Ok(Err(refused)) => Err(Failure::State(refused.description)),
        Err(failure) => Err(failure),
    }
}

/// The usage store's side, in the Durable Object: SQLite tables `usage` (per token),
/// `usage_flush` (last flush number per isolate) and `usage_meta` (instance, write counts).
pub mod store {
    use super::*;

    fn setup(sql: &worker::SqlStorage) -> worker::Result<()> {
        for statement in [
            "CREATE TABLE IF NOT EXISTS usage (token_id TEXT PRIMARY KEY, allowed INTEGER NOT NULL, denied_scope INTEGER NOT NULL, last_seen INTEGER NOT NULL)",
            "CREATE TABLE IF NOT EXISTS usage_flush (isolate TEXT PRIMARY KEY, seq INTEGER NOT NULL, at REAL NOT NULL)",
            "CREATE TABLE IF NOT EXISTS usage_meta (name TEXT PRIMARY KEY, value INTEGER, text TEXT)",
        ] {
            sql.exec(statement, None)?;
        }
        Ok(())
    }

    #[derive(Deserialize)]
    struct Seq {
        seq: f64,
    }

    #[derive(Deserialize)]
    struct CountRow {
        token_id: String,
        allowed: f64,
        denied_scope: f64,
        last_seen: f64,
    }

    #[derive(Deserialize)]
    struct Meta {
        name: String,
        value: Option<f64>,
        text: Option<String>,
    }

    /// Adds `by` to a figure; the rows it wrote.
    fn bump(sql: &worker::SqlStorage, name: &str, by: usize) -> worker::Result<usize> {
        let cursor = sql.exec(
            "INSERT INTO usage_meta (name, value) VALUES (?, ?) ON CONFLICT(name) DO UPDATE SET value = value + excluded.value",
            vec![name.into(), (by as i64).into()],
        )?;
        Ok(cursor.rows_written())
    }

    /// Applies `batches` of `isolate` (each once: a number at or below the last applied is
    /// skipped), all in this one synchronous step (the object's writes between awaits commit
    /// together); `Err` text for a batch that does not parse (nothing of it is applied).
    pub fn add(
        sql: &worker::SqlStorage,
        isolate: &str,
        batches: &[Batch],
        now_ms: f64,
    ) -> worker::Result<std::result::Result<u64, String>> {
        // Returns the last flush number applied for the isolate (this call's or an earlier).
        setup(sql)?;
        let rows: Vec<Seq> = sql
            .exec(
                "SELECT seq FROM usage_flush WHERE isolate = ?",
                vec![isolate.into()],
            )?
            .to_array()?;
        let mut last = rows.first().map_or(0, |r| r.seq as u64);
        for batch in batches {
            if batch.seq <= last {
                continue;
            }
            let Some(tally) = Tally::decode(&batch.tally) else {
                return Ok(Err(format!(
                    "flush {} of {isolate} does not parse",
                    batch.seq
                )));
            };
            let mut written = 0;
            for (token_id, counts) in tally.iter() {
                let cursor = sql.exec(
                    "INSERT INTO usage (token_id, allowed, denied_scope, last_seen) VALUES (?, ?, ?, ?) \
                     ON CONFLICT(token_id) DO UPDATE SET allowed = allowed + excluded.allowed, \
                     denied_scope = denied_scope + excluded.denied_scope, \
                     last_seen = max(last_seen, excluded.last_seen)",
                    vec![
                        token_id.into(),
                        (counts.allowed as i64).into(),
                        (counts.denied_scope as i64).into(),
                        (counts.last_seen as i64).into(),
                    ],
                )?;
                written += cursor.rows_written();
            }
            let cursor = sql.exec(
                "INSERT INTO usage_flush (isolate, seq, at) VALUES (?, ?, ?) ON CONFLICT(isolate) DO UPDATE SET seq = excluded.seq, at = excluded.at",
                vec![isolate.into(), (batch.seq as i64).into(), now_ms.into()],
            )?;
            written += cursor.rows_written();
            written += bump(sql, "flushes", 1)?;
            // This figure's own row counts as the one row its update writes.
            bump(sql, "rows_written", written + 1)?;
            last = batch.seq;
        }
        sql.exec(
            "DELETE FROM usage_flush WHERE at < ?",
            vec![(now_ms - FORGET_ISOLATE_MS).into()],
        )?;
        Ok(Ok(last))
    }

    /// The store's instance (drawn on the first read) and figures, with every count if
    /// `counts`.
    pub fn read(sql: &worker::SqlStorage, counts: bool) -> worker::Result<Stored> {
        setup(sql)?;
        let meta: Vec<Meta> = sql
            .exec("SELECT name, value, text FROM usage_meta", None)?
            .to_array()?;
        let value = |name: &str| {
            meta.iter()
                .find(|m| m.name == name)
                .and_then(|m| m.value)
                .map_or(0, |v| v as u64)
        };
        let instance = match meta
            .iter()
            .find(|m| m.name == "instance")
            .and_then(|m| m.text.clone())
        {
            Some(instance) => instance,
            // Only a read of the counts names the instance.
            None if !counts => String::new(),
            None => {
                let instance = random_id("worker");
                sql.exec(
                    "INSERT INTO usage_meta (name, text) VALUES ('instance', ?)",
                    vec![instance.as_str().into()],
                )?;
                instance
            }
        };
        let rows: Vec<CountRow> = match counts {
            true => sql
                .exec(
                    "SELECT token_id, allowed, denied_scope, last_seen FROM usage",
                    None,
                )?
                .to_array()?,
            false => Vec::new(),
        };
        let mut tally = Tally::default();
        for row in rows {
            let counts = usage::Counts {
                allowed: row.allowed as u64,
                denied_scope: row.denied_scope as u64,
                last_seen: row.last_seen as u64,
            };
            tally.add(&row.token_id, &counts);
        }
        Ok(Stored {
            instance,
            tally: tally.encode(),
            rows_written: value("rows_written"),
            flushes: value("flushes"),
        })
    }
}
