//! The push state: one Durable Object (`GateState`, binding `TOKENGATE_STATE`, instance
//! `tokengate`) that decides, strongly consistently, which bundle is served.
//!
//! Workers KV is eventually consistent: a version check against a `meta` read from KV can be
//! fooled by a location that still shows an older value, and a replayed push could undo a
//! revocation there. The served version, the pending push, which of its pages are stored and
//! the commit therefore live here; one object, whose requests run one at a time, so every
//! check and its write are one step. KV keeps only the immutable pages.
//!
//! The object's documents (SQLite table `doc`, one row each, JSON):
//! - `served`: the committed push ([`Stored`]);
//! - `pending`: the push being applied, and `received`: one `0`/`1` per page;
//! - `garbage`: pages no push needs any more, with the time they were left, for deletion.
//!
//! The transitions are plain functions over [`Machine`] (tested natively); the object only
//! loads and saves the documents around them.

use std::collections::HashSet;

use serde::{Deserialize, Serialize};
use tokengate_core::pages::Change;
use tokengate_core::Bundle;

use crate::served::{bounded, Failure};

/// The Durable Object namespace binding.
pub const STATE_BINDING: &str = "TOKENGATE_STATE";
/// The one object's name.
pub const STATE_NAME: &str = "tokengate";
/// A page left by a push is deleted from KV no sooner than this after it stopped being
/// served: isolates may still read it until their next refresh (5 s).
pub const GARBAGE_AFTER_MS: f64 = 60_000.0;
/// How long a page handed out for deletion is refused to a push that needs it again, unless
/// its deletion is confirmed sooner: a re-upload must not land before the delete does.
pub const DELETING_MS: f64 = 30_000.0;

/// What a push serves, without its token records: stored in the object, sent to isolates.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Meta {
    /// The pushed payload with `tokens` emptied (its signatures were checked at the push).
    pub bundle: Bundle,
    /// The SHA-256 of each page, page 0 first (a power of two of them).
    pub pages: Vec<String>,
    /// Token records the bundle holds.
    pub tokens: usize,
    /// Whether a record may be an imported secret (see `PagedTokens`).
    pub imported_secrets: bool,
}

/// A push as the object keeps it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Stored {
    /// SHA-256 (hex) of the pushed bundle's text: the same version with other text is another push.
    pub sha256: String,
    /// What it serves.
    pub meta: Meta,
}

impl Stored {
    fn version(&self) -> u64 {
        self.meta.bundle.version
    }
}

/// The small view every isolate refreshes (no page list).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct View {
    /// The served push: its version, text digest and revoke-all cut-off.
    pub served: Option<Summary>,
    /// The pending push, if any.
    pub pending: Option<PendingView>,
    /// The public keys the served bundle publishes (what a push must be signed by).
    pub keys: Vec<String>,
    /// The latest revoke-all cut-off of the pushes accepted since the last commit: in force
    /// from the moment its push is accepted, and not moved back by a push that replaces it
    /// before the commit (the committed bundle's own cut-off rules from then on).
    pub cut_off: Option<u64>,
}

/// A served push in brief.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Summary {
    /// The bundle version.
    pub version: u64,
    /// SHA-256 of its text: the key an isolate fetches the meta by.
    pub sha256: String,
}

/// The pending push in brief: its cut-off applies before any of its pages is stored.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PendingView {
    /// Its version.
    pub version: u64,
    /// Pages still to arrive.
    pub remaining: usize,
    /// Moves whenever the served records its stored pages change are added to (see
    /// [`Call::Changes`]).
    #[serde(default)]
    pub change_seq: u64,
}

/// A request the object refuses.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Refused {
    /// HTTP status for the pusher.
    pub status: u16,
    /// Stable error code.
    pub error: String,
    /// What was wrong.
    pub description: String,
}

fn refused(status: u16, error: &str, description: String) -> Refused {
    Refused {
        status,
        error: error.to_owned(),
        description,
    }
}

/// Where a push stands after a request.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Progress {
    /// The push's version.
    pub version: u64,
    /// Its page count.
    pub pages: usize,
    /// Indices of the pages not stored yet (empty once committed).
    pub missing: Vec<usize>,
    /// Whether this request committed it: it is served now.
    pub committed: bool,
    /// Token records it holds.
    pub tokens: usize,
}

/// What the object holds, loaded.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Machine {
    /// The committed push.
    pub served: Option<Stored>,
    /// The push being applied and, per page, whether it is stored.
    pub pending: Option<(Stored, Vec<bool>)>,
    /// Page digests no push needs, with the time (ms) they were left.
    pub garbage: Vec<(String, f64)>,
    /// The latest revoke-all cut-off of the pushes accepted since the last commit.
    pub cut_off: Option<u64>,
    /// Page digests handed out for deletion from KV, with the time (ms).
    pub deleting: Vec<(String, f64)>,
}

/// What a page request must match.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Claim {
    /// The digest the manifest gives the page.
    pub sha256: String,
    /// The page bits (log2 of the page count).
    pub bits: u32,
    /// Whether it is stored already (nothing to write).
    pub stored: bool,
}

impl Machine {
    /// The view isolates refresh.
    pub fn view(&self) -> View {
        View {
            served: self.served.as_ref().map(|s| Summary {
                version: s.version(),
                sha256: s.sha256.clone(),
            }),
            pending: self.pending.as_ref().map(|(p, received)| PendingView {
                version: p.version(),
                remaining: received.iter().filter(|r| !**r).count(),
                change_seq: 0,
            }),
            keys: self
                .served
                .as_ref()
                .map(|s| s.meta.bundle.keys.clone())
                .unwrap_or_default(),
            cut_off: self.cut_off,
        }
    }

    /// A new push (or the pending one again: a resume). Pages some push already stored are
    /// not asked for again; a push with nothing missing is committed at once.
    pub fn begin(&mut self, push: Stored, now_ms: f64) -> Result<Progress, Refused> {
        let version = push.version();
        if let Some(served) = &self.served {
            if version <= served.version() {
                return Err(refused(
                    409,
                    "not_newer",
                    format!(
                        "version {version} is not newer than the served version {}",
                        served.version()
                    ),
                ));
            }
        }
        if let Some((pending, _)) = &self.pending {
            let same = pending.version() == version;
            if pending.version() > version || (same && pending.sha256 != push.sha256) {
                return Err(refused(
                    409,
                    "push_in_progress",
                    format!(
                        "version {} is being pushed; push it again to resume, or push a newer version",
                        pending.version()
                    ),
                ));
            }
            if same {
                return Ok(self.progress(false));
            }
        }
        let stored = self.stored_pages();
        let received: Vec<bool> = push
            .meta
            .pages
            .iter()
            .map(|d| stored.contains(d.as_str()))
            .collect();
        let wanted: HashSet<&str> = push.meta.pages.iter().map(String::as_str).collect();
        let served: HashSet<&str> = self
            .served
            .iter()
            .flat_map(|s| s.meta.pages.iter().map(String::as_str))
            .collect();
        // The replaced push's pages that neither the new push nor the served one uses.
        let left: Vec<String> = match &self.pending {
            Some((old, got)) => old
                .meta
                .pages
                .iter()
                .zip(got)
                .filter(|(d, got)| {
                    **got && !wanted.contains(d.as_str()) && !served.contains(d.as_str())
                })
                .map(|(d, _)| d.clone())
                .collect(),
            None => Vec::new(),
        };
        // A page this push needs again is no longer garbage: nothing may delete it now.
        self.garbage.retain(|(d, _)| !wanted.contains(d.as_str()));
        self.leave(left, now_ms);
        self.cut_off = self.cut_off.max(push.meta.bundle.revoke_all_at);
        self.pending = Some((push, received));
        Ok(self.finish_if_complete(now_ms))
    }

    /// What a page request for `version`, page `index`, must match, at `now_ms`.
    pub fn claim(&self, version: u64, index: usize, now_ms: f64) -> Result<Claim, Refused> {
        let not_pending = || {
            refused(
                409,
                "not_pending",
                format!("version {version} is not being pushed (served or replaced); push its bundle first"),
            )
        };
        let (pending, received) = self.pending.as_ref().ok_or_else(not_pending)?;
        if pending.version() != version {
            return Err(not_pending());
        }
        let sha256 = pending.meta.pages.get(index).ok_or_else(|| {
            refused(
                409,
                "not_pending",
                format!(
                    "version {version} has {} pages; there is no page {index}",
                    pending.meta.pages.len()
                ),
            )
        })?;
        let deleting = self
            .deleting
            .iter()
            .any(|(d, at)| d == sha256 && now_ms - at < DELETING_MS);
        if deleting && !received[index] {
            return Err(refused(
                503,
                "temporarily_unavailable",
                format!("page {index} is being deleted from KV as unused; send it again in a few seconds"),
            ));
        }
        Ok(Claim {
            sha256: sha256.clone(),
            bits: pending.meta.pages.len().trailing_zeros(),
            stored: received[index],
        })
    }

    /// Page `index` of `version` is in KV now; the last one commits the push.
    pub fn received(
        &mut self,
        version: u64,
        indices: &[usize],
        now_ms: f64,
    ) -> Result<Progress, Refused> {
        for &index in indices {
            self.claim(version, index, now_ms)?;
        }
        if let Some((_, received)) = &mut self.pending {
            for &index in indices {
                received[index] = true;
            }
        }
        Ok(self.finish_if_complete(now_ms))
    }

    /// Up to `max` garbage digests older than [`GARBAGE_AFTER_MS`], moved from the list to
    /// those being deleted: until [`Self::deleted`] (or [`DELETING_MS`]), a push that needs
    /// one of them again cannot store it.
    pub fn take_garbage(&mut self, max: usize, now_ms: f64) -> Vec<String> {
        let mut taken = Vec::new();
        self.garbage.retain(|(digest, since)| {
            let ripe = now_ms - since >= GARBAGE_AFTER_MS && taken.len() < max;
            if ripe {
                taken.push(digest.clone());
            }
            !ripe
        });
        self.deleting.retain(|(_, at)| now_ms - at < DELETING_MS);
        self.deleting
            .extend(taken.iter().map(|d| (d.clone(), now_ms)));
        taken
    }

    /// These pages are gone from KV: a push may store them again.
    pub fn deleted(&mut self, digests: &[String]) {
        self.deleting.retain(|(d, _)| !digests.contains(d));
    }

    fn stored_pages(&self) -> HashSet<&str> {
        let mut stored: HashSet<&str> = self
            .served
            .iter()
            .flat_map(|s| s.meta.pages.iter().map(String::as_str))
            .collect();
        if let Some((pending, received)) = &self.pending {
            stored.extend(
                pending
                    .meta
                    .pages
                    .iter()
                    .zip(received)
                    .filter(|(_, got)| **got)
                    .map(|(d, _)| d.as_str()),
            );
        }
        stored
    }

    fn leave(&mut self, digests: Vec<String>, now_ms: f64) {
        let known: HashSet<String> = self.garbage.iter().map(|(d, _)| d.clone()).collect();
        for digest in digests {
            if !known.contains(&digest) {
                self.garbage.push((digest, now_ms));
            }
        }
    }

    fn progress(&self, committed: bool) -> Progress {
        match &self.pending {
            Some((pending, received)) => Progress {
                version: pending.version(),
                pages: received.len(),
                missing: (0..received.len()).filter(|i| !received[*i]).collect(),
                committed,
                tokens: pending.meta.tokens,
            },
            None => {
                let served = self.served.as_ref();
                Progress {
                    version: served.map_or(0, Stored::version),
                    pages: served.map_or(0, |s| s.meta.pages.len()),
                    missing: Vec::new(),
                    committed,
                    tokens: served.map_or(0, |s| s.meta.tokens),
                }
            }
        }
    }

    fn finish_if_complete(&mut self, now_ms: f64) -> Progress {
        let complete = self
            .pending
            .as_ref()
            .is_some_and(|(_, received)| received.iter().all(|r| *r));
        if !complete {
            return self.progress(false);
        }
        let Some((push, _)) = self.pending.take() else {
            return self.progress(false);
        };
        let kept: HashSet<&str> = push.meta.pages.iter().map(String::as_str).collect();
        let left: Vec<String> = self
            .served
            .as_ref()
            .map(|old| {
                old.meta
                    .pages
                    .iter()
                    .filter(|d| !kept.contains(d.as_str()))
                    .cloned()
                    .collect()
            })
            .unwrap_or_default();
        self.leave(left, now_ms);
        self.cut_off = None;
        self.served = Some(push);
        self.progress(true)
    }
}

/// The requests the object answers (POST `https://state/<op>`, JSON in and out).
#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Call {
    /// → [`View`].
    View,
    /// → the served push ([`Stored`]: its text digest and [`Meta`]), whatever a view said.
    Meta,
    /// → [`Progress`].
    Begin {
        /// The push.
        push: Box<Stored>,
        /// The Worker's clock (ms).
        now_ms: f64,
        /// The served push (text digest) whose keys verified the request: refused as
        /// `stale_view` if another is served now.
        verified_with: Option<String>,
    },
    /// → [`Claim`].
    Claim {
        /// The push's version.
        version: u64,
        /// The page.
        index: usize,
        /// As for `Begin`.
        verified_with: Option<String>,
        /// The Worker's clock (ms).
        now_ms: f64,
    },
    /// → [`Progress`].
    Received {
        /// The push's version.
        version: u64,
        /// The pages now in KV.
        indices: Vec<usize>,
        /// The served records those pages change.
        changes: Vec<Change>,
        /// The Worker's clock (ms).
        now_ms: f64,
    },
    /// → [`ChangeList`]: the served records the pending push changes so far, if the served
    /// push and the pending version are still those given (else `stale_view`).
    Changes {
        /// The served push's text digest the caller decides with.
        served_sha256: Option<String>,
        /// The pending version the caller's view shows.
        pending_version: Option<u64>,
    },
    /// → up to `max` page digests to delete from KV.
    Garbage {
        /// At most this many.
        max: usize,
        /// The Worker's clock (ms).
        now_ms: f64,
    },
    /// These pages handed out by `Garbage` are deleted from KV now.
    Deleted {
        /// Their digests.
        digests: Vec<String>,
    },
    /// Usage store: add an isolate's flushes ([`crate::usage`]).
    UsageAdd {
        /// The isolate's id.
        isolate: String,
        /// Its flushes not yet confirmed, in order.
        batches: Vec<crate::usage::Batch>,
    },
    /// Usage store: its write counts, and every count if `counts`.
    UsageRead {
        /// Whether to read every token's counts (else only the store's own figures).
        counts: bool,
    },
}

/// One call to the push state, bounded like a KV read: `Ok(Err(_))` is the object's refusal.
pub async fn call<R: serde::de::DeserializeOwned>(
    env: &worker::Env,
    call: &Call,
) -> Result<Result<R, Refused>, Failure> {
    call_object(env, STATE_NAME, call).await
}

/// One call to the object `name` of the state class (the push state, or the usage store).
pub async fn call_object<R: serde::de::DeserializeOwned>(
    env: &worker::Env,
    name: &str,
    call: &Call,
) -> Result<Result<R, Refused>, Failure> {
    let state = |e: worker::Error| Failure::State(e.to_string());
    bounded(async {
        let namespace = env
            .durable_object(STATE_BINDING)
            .map_err(|e| Failure::Config(format!("Durable Object binding {STATE_BINDING}: {e}")))?;
        let stub = namespace.get_by_name(name).map_err(state)?;
        let mut init = worker::RequestInit::new();
        init.with_method(worker::Method::Post)
            .with_body(Some(json(call).into()));
        let request =
            worker::Request::new_with_init("https://push-state/", &init).map_err(state)?;
        let mut response = stub.fetch_with_request(request).await.map_err(state)?;
        let status = response.status_code();
        let text = response.text().await.map_err(state)?;
        if status == 200 {
            return serde_json::from_str(&text)
                .map(Ok)
                .map_err(|e| Failure::State(format!("answer: {e}")));
        }
        serde_json::from_str::<Refused>(&text)
            .map(Err)
            .map_err(|_| {
                Failure::State(format!(
                    "HTTP {status}: {}",
                    text.chars().take(200).collect::<String>()
                ))
            })
    })
    .await
}

/// The Durable Object. Requests run one at a time between awaits, and every transition is
/// synchronous (the SQL API is), so each check and its write are one atomic step.
#[worker::durable_object(fetch)]
pub struct GateState {
    state: worker::State,
    machine: std::cell::RefCell<Option<Machine>>,
}

impl worker::DurableObject for GateState {
    fn new(state: worker::State, _env: worker::Env) -> Self {
        Self {
            state,
            machine: std::cell::RefCell::new(None),
        }
    }

    async fn fetch(&self, mut req: worker::Request) -> worker::Result<worker::Response> {
        let call: Call = req.json().await?;
        // Nothing below awaits: the call is one step.
        let sql = self.state.storage().sql();
        // The usage store is another object of this class: it never loads a push state.
        match &call {
            Call::UsageAdd { isolate, batches } => {
                let added = crate::usage::store::add(&sql, isolate, batches, js_sys::Date::now())?;
                return respond(
                    added
                        .map(serde_json::Value::from)
                        .map_err(|problem| refused(400, "invalid_usage", problem)),
                );
            }
            Call::UsageRead { counts } => {
                return worker::Response::from_json(&crate::usage::store::read(&sql, *counts)?)
            }
            _ => {}
        }
        let mut slot = self.machine.borrow_mut();
        if slot.is_none() {
            *slot = Some(load(&sql)?);
        }
        let Some(machine) = slot.as_mut() else {
            return worker::Response::error("push state unavailable", 500);
        };
        let served_sha = machine.served.as_ref().map(|s| s.sha256.clone());
        let unchanged = |checked: &Option<String>| {
            if *checked == served_sha {
                Ok(())
            } else {
                Err(refused(
                    503,
                    "stale_view",
                    "the served bundle changed while this request was checked; retry".to_owned(),
                ))
            }
        };
        // Calls that only read: nothing is cloned or written.
        let read = match &call {
            Call::View => {
                let mut view = machine.view();
                if let Some(pending) = &mut view.pending {
                    pending.change_seq = change_seq(&sql)?;
                }
                Some(Ok(serde_json::to_value(view)?))
            }
            Call::Meta => Some(match &machine.served {
                Some(served) => Ok(serde_json::to_value(served)?),
                None => Err(refused(409, "not_served", "nothing is served".to_owned())),
            }),
            Call::Changes {
                served_sha256,
                pending_version,
            } => {
                let pending = machine.pending.as_ref().map(|(p, _)| p.meta.bundle.version);
                Some(
                    if *served_sha256 == served_sha && *pending_version == pending {
                        let changes = ChangeList {
                            change_seq: change_seq(&sql)?,
                            changes: read_changes(&sql)?,
                        };
                        Ok(serde_json::to_value(changes)?)
                    } else {
                        Err(refused(
                            409,
                            "stale_view",
                            "the push state moved; read it again".to_owned(),
                        ))
                    },
                )
            }
            Call::Claim {
                version,
                index,
                verified_with,
                now_ms,
            } => Some(
                unchanged(verified_with)
                    .and_then(|()| machine.claim(*version, *index, *now_ms))
                    .map(|c| serde_json::to_value(c).unwrap_or_default()),
            ),
            _ => None,
        };
        if let Some(answer) = read {
            return respond(answer);
        }
        let before = machine.clone();
        let mut incoming_changes = Vec::new();
        let answer = match call {
            Call::Begin {
                push,
                now_ms,
                verified_with,
            } => unchanged(&verified_with)
                .and_then(|()| machine.begin(*push, now_ms))
                .map(|p| serde_json::to_value(p).unwrap_or_default()),
            Call::Received {
                version,
                indices,
                changes,
                now_ms,
            } => {
                incoming_changes = changes;
                machine
                    .received(version, &indices, now_ms)
                    .map(|p| serde_json::to_value(p).unwrap_or_default())
            }
            Call::Garbage { max, now_ms } => {
                Ok(serde_json::to_value(machine.take_garbage(max, now_ms))?)
            }
            Call::Deleted { digests } => {
                machine.deleted(&digests);
                Ok(serde_json::Value::Null)
            }
            Call::View
            | Call::Meta
            | Call::Changes { .. }
            | Call::Claim { .. }
            | Call::UsageAdd { .. }
            | Call::UsageRead { .. } => {
                return worker::Response::error("answered above", 500);
            }
        };
        // The changes before the flags that say their page arrived: a failure in between
        // leaves the page missing (sent again), never stored without its changes.
        let saved = (|| {
            if answer.is_ok() && machine.pending.is_some() {
                record_changes(&sql, &incoming_changes)?;
            }
            save(&sql, &before, machine)?;
            if machine.pending.is_none() {
                // Committed (or nothing pending): the served records are the truth again.
                sql.exec("DELETE FROM change", None)?;
            }
            Ok(())
        })();
        if let Err(e) = saved {
            // What is in memory may now differ from storage: reload on the next call.
            *slot = None;
            return Err(e);
        }
        respond(answer)
    }
}

fn respond(answer: Result<serde_json::Value, Refused>) -> worker::Result<worker::Response> {
    match answer {
        Ok(value) => worker::Response::from_json(&value),
        Err(refusal) => Ok(worker::Response::from_json(&refusal)?.with_status(refusal.status)),
    }
}

/// The pending push's changes, and the sequence number they are current at.
#[derive(Debug, Serialize, Deserialize)]
pub struct ChangeList {
    /// Bumped by every page whose changes were recorded.
    pub change_seq: u64,
    /// Every change recorded since the last commit (a hash may appear more than once: each
    /// push that replaced another brought its own).
    pub changes: Vec<Change>,
}

#[derive(Deserialize)]
struct Row {
    name: String,
    body: String,
}

/// Served records a pending push may change early, at most: a push that changes more
/// (a mass revocation: use revoke-all) applies the rest at its commit.
pub const MAX_CHANGES: usize = 20_000;

#[derive(Deserialize)]
struct Count {
    n: f64,
}

fn count_changes(sql: &worker::SqlStorage) -> worker::Result<usize> {
    let count: Count = sql.exec("SELECT COUNT(*) AS n FROM change", None)?.one()?;
    Ok(count.n as usize)
}

#[derive(Deserialize)]
struct Body {
    body: String,
}

/// The change sequence number: never reset, so a cached list is never mistaken for a newer one.
fn change_seq(sql: &worker::SqlStorage) -> worker::Result<u64> {
    let rows: Vec<Body> = sql
        .exec("SELECT body FROM doc WHERE name = 'change_seq'", None)?
        .to_array()?;
    Ok(rows
        .first()
        .and_then(|r| r.body.parse().ok())
        .unwrap_or_default())
}

#[derive(Deserialize)]
struct ChangeRow {
    hash: String,
    record: String,
}

fn read_changes(sql: &worker::SqlStorage) -> worker::Result<Vec<Change>> {
    let rows: Vec<ChangeRow> = sql
        .exec("SELECT hash, record FROM change", None)?
        .to_array()?;
    rows.into_iter()
        .map(|row| {
            let record = serde_json::from_str(&row.record)
                .map_err(|e| worker::Error::RustError(format!("push state change: {e}")))?;
            Ok(Change {
                hash: row.hash,
                record,
            })
        })
        .collect()
}

fn record_changes(sql: &worker::SqlStorage, changes: &[Change]) -> worker::Result<()> {
    if changes.is_empty() {
        return Ok(());
    }
    let room = MAX_CHANGES.saturating_sub(count_changes(sql)?);
    if changes.len() > room {
        worker::console_error!(
            "tokengate push: more than {MAX_CHANGES} served records change; {} take effect at the commit",
            changes.len() - room
        );
    }
    for change in changes.iter().take(room) {
        sql.exec(
            "INSERT INTO change (hash, record) VALUES (?, ?)",
            vec![change.hash.as_str().into(), json(&change.record).into()],
        )?;
    }
    let next = (change_seq(sql)? + 1).to_string();
    put(sql, "change_seq", Some(next))
}

fn load(sql: &worker::SqlStorage) -> worker::Result<Machine> {
    sql.exec(
        "CREATE TABLE IF NOT EXISTS doc (name TEXT PRIMARY KEY, body TEXT NOT NULL)",
        None,
    )?;
    sql.exec(
        "CREATE TABLE IF NOT EXISTS change (hash TEXT NOT NULL, record TEXT NOT NULL)",
        None,
    )?;
    let rows: Vec<Row> = sql.exec("SELECT name, body FROM doc", None)?.to_array()?;
    let get = |name: &str| {
        rows.iter()
            .find(|r| r.name == name)
            .map(|r| r.body.as_str())
    };
    let parse = |name: &str| -> worker::Result<Option<serde_json::Value>> {
        get(name)
            .map(serde_json::from_str)
            .transpose()
            .map_err(|e| worker::Error::RustError(format!("push state {name}: {e}")))
    };
    let from = |value: Option<serde_json::Value>| -> worker::Result<Option<Stored>> {
        value
            .map(serde_json::from_value)
            .transpose()
            .map_err(|e| worker::Error::RustError(format!("push state: {e}")))
    };
    let served = from(parse("served")?)?;
    let pending = from(parse("pending")?)?.map(|p| {
        let received: Vec<bool> = get("received")
            .unwrap_or_default()
            .bytes()
            .map(|b| b == b'1')
            .collect();
        let mut received = received;
        received.resize(p.meta.pages.len(), false);
        (p, received)
    });
    let garbage = parse("garbage")?
        .map(serde_json::from_value)
        .transpose()
        .map_err(|e| worker::Error::RustError(format!("push state garbage: {e}")))?
        .unwrap_or_default();
    let cut_off = parse("cut_off")?.and_then(|v| v.as_u64());
    let deleting = parse("deleting")?
        .map(serde_json::from_value)
        .transpose()
        .map_err(|e| worker::Error::RustError(format!("push state deleting: {e}")))?
        .unwrap_or_default();
    Ok(Machine {
        served,
        pending,
        garbage,
        cut_off,
        deleting,
    })
}

fn put(sql: &worker::SqlStorage, name: &str, body: Option<String>) -> worker::Result<()> {
    match body {
        Some(body) => sql.exec(
            "INSERT OR REPLACE INTO doc (name, body) VALUES (?, ?)",
            vec![name.into(), body.into()],
        )?,
        None => sql.exec("DELETE FROM doc WHERE name = ?", vec![name.into()])?,
    };
    Ok(())
}

/// Writes the documents that changed.
fn save(sql: &worker::SqlStorage, before: &Machine, after: &Machine) -> worker::Result<()> {
    if before.served != after.served {
        put(sql, "served", after.served.as_ref().map(json))?;
    }
    let (old, new) = (before.pending.as_ref(), after.pending.as_ref());
    if old.map(|p| &p.0) != new.map(|p| &p.0) {
        put(sql, "pending", new.map(|p| json(&p.0)))?;
    }
    if old.map(|p| &p.1) != new.map(|p| &p.1) {
        let flags = new.map(|p| p.1.iter().map(|r| if *r { '1' } else { '0' }).collect());
        put(sql, "received", flags)?;
    }
    if before.cut_off != after.cut_off {
        put(sql, "cut_off", Some(json(&after.cut_off)))?;
    }
    if before.deleting != after.deleting {
        put(sql, "deleting", Some(json(&after.deleting)))?;
    }
    if before.garbage != after.garbage {
        put(sql, "garbage", Some(json(&after.garbage)))?;
    }
    Ok(())
}

/// These types always serialise (strings, numbers, lists).
fn json<T: Serialize>(value: &T) -> String {
    serde_json::to_string(value).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn push(version: u64, pages: &[&str], revoke_all_at: Option<u64>) -> Stored {
        let bundle: Bundle = serde_json::from_value(serde_json::json!({
            "version": version, "issued_at": 1, "environment": "prod", "target": "worker",
            "keys": [], "policy": {"rules": []}, "credentials": {"sources": ["bearer"]},
            "tokens": [],
        }))
        .unwrap();
        Stored {
            sha256: format!("text-{version}-{}", pages.join("")),
            meta: Meta {
                bundle: Bundle {
                    revoke_all_at,
                    ..bundle
                },
                pages: pages.iter().map(|p| p.to_string()).collect(),
                tokens: pages.len(),
                imported_secrets: false,
            },
        }
    }

    #[test]
    fn a_push_commits_when_its_last_page_arrives() {
        let mut m = Machine::default();
        let p = m.begin(push(1, &["a", "b"], None), 0.0).unwrap();
        assert_eq!((p.missing, p.committed), (vec![0, 1], false));
        assert_eq!(m.view().served, None);
        assert_eq!(m.claim(1, 1, 0.0).unwrap().sha256, "b");
        assert!(m.claim(2, 0, 0.0).is_err() && m.claim(1, 2, 0.0).is_err());
        assert!(!m.received(1, &[0], 0.0).unwrap().committed);
        assert!(m.received(1, &[1], 0.0).unwrap().committed);
        assert_eq!(m.view().served.unwrap().version, 1);
        assert_eq!(m.view().pending, None);
        // Replays change nothing: the manifest is not newer, a page is not pending.
        assert_eq!(
            m.begin(push(1, &["a", "b"], None), 0.0).unwrap_err().error,
            "not_newer"
        );
        assert_eq!(m.received(1, &[0], 0.0).unwrap_err().error, "not_pending");
    }

    #[test]
    fn unchanged_pages_are_not_asked_for_and_resumes_ask_for_the_rest() {
        let mut m = Machine::default();
        m.begin(push(1, &["a", "b"], None), 0.0).unwrap();
        m.received(1, &[0, 1], 0.0).unwrap();
        let p = m.begin(push(2, &["a", "c", "d", "e"], None), 0.0).unwrap();
        assert_eq!(p.missing, vec![1, 2, 3]);
        m.received(2, &[2], 0.0).unwrap();
        // The same push again: the rest.
        let again = m.begin(push(2, &["a", "c", "d", "e"], None), 0.0).unwrap();
        assert_eq!(again.missing, vec![1, 3]);
        // The same version with another text is another push.
        let other = m.begin(push(2, &["x"], None), 0.0).unwrap_err();
        assert_eq!(other.error, "push_in_progress");
        // An older one while it is pending too.
        let mut older = push(2, &["a"], None);
        older.meta.bundle.version = 1;
        assert_eq!(m.begin(older, 0.0).unwrap_err().error, "not_newer");
        // A newer push replaces it and keeps what was stored ("d").
        let p = m.begin(push(3, &["a", "d", "f", "g"], None), 0.0).unwrap();
        assert_eq!(p.missing, vec![2, 3]);
        assert_eq!(m.view().pending.unwrap().version, 3);
    }

    #[test]
    fn a_pending_cut_off_is_visible_before_any_page() {
        let mut m = Machine::default();
        m.begin(push(1, &["a"], None), 0.0).unwrap();
        m.received(1, &[0], 0.0).unwrap();
        m.begin(push(2, &["b", "c"], Some(77)), 0.0).unwrap();
        let view = m.view();
        assert_eq!(view.served.unwrap().version, 1);
        assert_eq!(view.cut_off, Some(77));
        // A newer push without the cut-off replaces it, and the cut-off stays.
        m.begin(push(3, &["b", "d"], None), 0.0).unwrap();
        assert_eq!(m.view().cut_off, Some(77));
        // Once a push commits, its own (signed) cut-off rules.
        m.received(3, &[0, 1], 0.0).unwrap();
        assert_eq!(m.view().cut_off, None);
    }

    #[test]
    fn pages_nobody_serves_become_garbage_after_a_delay() {
        let mut m = Machine::default();
        m.begin(push(1, &["a", "b"], None), 0.0).unwrap();
        m.received(1, &[0, 1], 0.0).unwrap();
        m.begin(push(2, &["a", "c"], None), 1_000.0).unwrap();
        m.received(2, &[1], 1_000.0).unwrap();
        assert!(m.take_garbage(10, 30_000.0).is_empty());
        assert_eq!(m.take_garbage(10, 61_000.0), vec!["b".to_owned()]);
        assert!(m.take_garbage(10, 200_000.0).is_empty());
        // A replaced push's stored page that nothing uses is garbage too.
        m.begin(push(3, &["a", "x", "y", "z"], None), 100_000.0)
            .unwrap();
        m.received(3, &[2], 100_000.0).unwrap();
        let p = m
            .begin(push(4, &["a", "x", "w", "v"], None), 100_000.0)
            .unwrap();
        assert_eq!(p.missing, vec![1, 2, 3]);
        assert_eq!(m.take_garbage(10, 170_000.0), vec!["y".to_owned()]);
        // A push that needs "y" again cannot store it while its deletion may still land.
        let p = m.begin(push(5, &["a", "y"], None), 170_000.0).unwrap();
        assert_eq!(p.missing, vec![1]);
        let refused = m.claim(5, 1, 171_000.0).unwrap_err();
        assert_eq!(refused.status, 503);
        assert!(m.received(5, &[1], 171_000.0).is_err());
        // Once deleted (or after the window), it can.
        m.deleted(&["y".to_owned()]);
        assert_eq!(m.claim(5, 1, 171_000.0).unwrap().sha256, "y");
        // A deletion never confirmed stops holding the page back after the window.
        let mut fresh = Machine {
            garbage: vec![("q".to_owned(), 0.0)],
            ..Machine::default()
        };
        assert_eq!(
            fresh.take_garbage(10, GARBAGE_AFTER_MS),
            vec!["q".to_owned()]
        );
        assert_eq!(
            fresh
                .begin(push(1, &["q"], None), GARBAGE_AFTER_MS)
                .unwrap()
                .missing,
            vec![0]
        );
        assert!(fresh.claim(1, 0, GARBAGE_AFTER_MS + 1.0).is_err());
        assert!(fresh.claim(1, 0, GARBAGE_AFTER_MS + DELETING_MS).is_ok());
    }
}
