//! `tokengate push worker`: a paged, resumable push to a Cloudflare Worker.
//!
//! The CLI signs a *paged* bundle: the `tokengate.bundle/v2` payload with `tokens` replaced
//! by the SHA-256 of each page of records (`tokengate_core::pages`). It POSTs that to
//! `<url>/.well-known/tokengate/bundle`, and the Worker answers which pages it does not
//! have yet; each is POSTed to `…/bundle?version=<v>&page=<i>`. Every request is signed:
//! `Tokengate-Signature: t=<unix seconds>,<key id>=<hex Ed25519 of
//! "tokengate.push/v2\n<t>\n<body>">[,…]`, one signature per published key. The last page
//! commits the push; the CLI then reads the Worker's status and reports what it serves.
//!
//! Resilience: 429 and 503 answers and connection failures are retried with the Worker's
//! `Retry-After` or exponential backoff. A push that stops anyway (the CLI killed, the network
//! gone) resumes: the next push is a newer version whose unchanged pages the Worker already
//! has, so only the rest is sent. A prebuilt bundle (`--bundle`) travels as it was signed,
//! inline, in one request of at most 8 MiB.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use tokengate_core::access::Settings;
use tokengate_core::bundle::{self, Bundle};
use tokengate_core::pages::{self, Page, PagedTokens};
use tokengate_core::signed::{PUSH_CONTEXT, SIGNATURE_HEADER};
use tokengate_core::Target;

use crate::keys::Keyring;
use crate::store::{self, Actor, Store};
use crate::Issued;

/// The largest request body a Worker reads.
pub const MAX_REQUEST_BYTES: usize = 8 * 1024 * 1024;
/// Attempts per request before the push gives up (retrying 429, 503 and I/O errors).
const ATTEMPTS: u32 = 8;
/// The longest a whole push may take.
const DEADLINE: Duration = Duration::from_secs(60 * 60);
/// Page requests in flight at once.
const PARALLEL: usize = 4;

/// A push's requests: where they go and what signs them.
struct Sender<'a> {
    agent: ureq::Agent,
    endpoint: String,
    ring: &'a Keyring,
    published: Vec<String>,
    started: Instant,
}

/// One answer: status and JSON body.
struct Answer {
    status: u16,
    json: serde_json::Value,
}

impl Answer {
    fn describe(&self) -> String {
        let field = |name: &str| self.json.get(name).and_then(|v| v.as_str()).unwrap_or("");
        format!(
            "(HTTP {}): {}: {}",
            self.status,
            field("error"),
            field("error_description")
        )
    }
}

impl Sender<'_> {
    /// POSTs `body` to `endpoint` + `query`, freshly signed each attempt, retrying what a
    /// retry can fix.
    fn send(&self, query: &str, body: &[u8]) -> Result<Answer> {
        let url = format!("{}{query}", self.endpoint);
        let mut backoff = Duration::from_millis(250);
        for attempt in 1..=ATTEMPTS {
            if self.started.elapsed() > DEADLINE {
                bail!(
                    "the push took longer than {} minutes",
                    DEADLINE.as_secs() / 60
                );
            }
            let signature =
                self.ring
                    .sign_request(PUSH_CONTEXT, crate::time::now(), body, &self.published)?;
            let sent = self
                .agent
                .post(&url)
                .header("content-type", "application/json")
                .header(SIGNATURE_HEADER, &signature)
                .send(body);
            let (wait, why) = match sent {
                Ok(mut response) => {
                    let status = response.status().as_u16();
                    let retry_after = crate::status::retry_after(&response);
                    let text = response.body_mut().read_to_string().unwrap_or_default();
                    let json = serde_json::from_str(&text).unwrap_or(serde_json::Value::Null);
                    let answer = Answer { status, json };
                    if status != 429 && status != 503 {
                        return Ok(answer);
                    }
                    let wait = retry_after.map_or(backoff, Duration::from_secs);
                    (wait.max(backoff), answer.describe())
                }
                Err(e) => (backoff, format!("{e}")),
            };
            if attempt == ATTEMPTS {
                bail!("{url}: gave up after {ATTEMPTS} attempts: {why}");
            }
            let wait = wait.min(Duration::from_secs(60));
            eprintln!("  {why}; retrying in {:.1} s", wait.as_secs_f64());
            std::thread::sleep(wait);
            backoff = (backoff * 2).min(Duration::from_secs(30));
        }
        unreachable!("the loop returns or bails on its last attempt")
    }
}

/// A paged bundle: the signed page list and the pages.
struct Paged {
    issued: Issued,
    pages: Vec<Page>,
    /// Per page: whether it revokes or expires a token since the last push (sent first, so
    /// that those take effect before the rest of the push arrives).
    tightens: Vec<bool>,
}

/// Signs the store's token set as a paged bundle for the Worker, after every check the
/// Worker makes (so that no push starts that it would refuse).
fn issue_paged(store: &mut Store, ring: &Keyring, now: u64, who: &Actor) -> Result<Paged> {
    let (bundle, issued) = crate::issue_checked(store, ring, Target::Worker, now, who)?;
    if let Some(access) = &bundle.cloudflare_access {
        Settings::from_config(access).map_err(|e| {
            anyhow::anyhow!("the Worker would refuse the policy's Access settings: {e}")
        })?;
    }
    let pages = pages::split(&bundle.tokens)?;
    let bits = pages.len().trailing_zeros();
    let since = store.pushed_at(&Target::Worker.to_string())?.unwrap_or(0);
    let mut tightens = vec![false; pages.len()];
    for record in bundle.tokens.iter().flat_map(|t| t.lookup_records()) {
        let ended = |at: Option<u64>| at.is_some_and(|at| at >= since && at <= now);
        let revoked = record.revoked_at.is_some_and(|at| at >= since);
        if revoked || ended(record.expires_at) || ended(record.grace_until) {
            if let Some(hash) = tokengate_core::token::TokenHash::from_hex(&record.hash) {
                tightens[pages::page_index(&hash.0, bits)] = true;
            }
        }
    }
    // A rotated token's replaced secret may be an imported one: counted as such.
    let imported_secrets = store.tokens()?.iter().any(|t| t.imported)
        || bundle.tokens.iter().any(|t| t.previous.is_some());
    let Bundle { tokens, .. } = &bundle;
    let paged = Bundle::<PagedTokens> {
        tokens: PagedTokens {
            pages: pages.iter().map(|p| p.sha256.clone()).collect(),
            tokens: tokens.len(),
            imported_secrets,
        },
        version: bundle.version,
        issued_at: bundle.issued_at,
        environment: bundle.environment.clone(),
        target: bundle.target,
        keys: bundle.keys.clone(),
        policy: bundle.policy.clone(),
        credentials: bundle.credentials.clone(),
        revoke_all_at: bundle.revoke_all_at,
        cloudflare_access: bundle.cloudflare_access.clone(),
        issuers: bundle.issuers.clone(),
        revoked_jtis: bundle.revoked_jtis.clone(),
    };
    let payload = serde_json::to_string(&paged)?;
    let signatures = ring.sign(payload.as_bytes(), &bundle.keys)?;
    let text = bundle::publish(&payload, &signatures);
    for (index, page) in pages.iter().enumerate() {
        if page.text.len() > MAX_REQUEST_BYTES {
            bail!(
                "page {index} takes {} bytes, more than a Worker request may carry ({MAX_REQUEST_BYTES})",
                page.text.len()
            );
        }
    }
    if text.len() > MAX_REQUEST_BYTES {
        bail!(
            "the page list takes {} bytes, more than a Worker request may carry",
            text.len()
        );
    }
    Ok(Paged {
        issued: Issued { text, ..issued },
        pages,
        tightens,
    })
}

/// The page indices an answer names as missing: each a page of this bundle, once.
fn missing(answer: &Answer, pages: usize) -> Result<Vec<usize>> {
    let list = answer
        .json
        .get("missing")
        .and_then(|m| m.as_array())
        .context("the Worker's 202 names no missing pages")?;
    let mut seen = vec![false; pages];
    list.iter()
        .map(|v| {
            let index = v
                .as_u64()
                .and_then(|i| usize::try_from(i).ok())
                .filter(|i| *i < pages)
                .with_context(|| format!("the Worker asks for page {v} of {pages}"))?;
            if std::mem::replace(&mut seen[index], true) {
                bail!("the Worker asks for page {index} twice");
            }
            Ok(index)
        })
        .collect()
}

/// Waits (up to the Worker's refresh bound and some) until its status shows this very
/// bundle (version and text digest) served; its status may come from an isolate that has not
/// refreshed yet.
fn serves(base: &str, version: u64, sha256: &str) -> Result<bool> {
    let deadline = Instant::now() + Duration::from_secs(8);
    loop {
        let served = crate::status::worker(base)?;
        if served.version == Some(version) && served.bundle_sha256.as_deref() == Some(sha256) {
            return Ok(true);
        }
        if Instant::now() > deadline {
            return Ok(false);
        }
        std::thread::sleep(Duration::from_millis(250));
    }
}

/// Progress on stderr: one line per 10 % when not a terminal.
struct Progress {
    total: usize,
    done: AtomicUsize,
    shown: Mutex<usize>,
    tty: bool,
}

impl Progress {
    fn step(&self, version: u64) {
        let done = self.done.fetch_add(1, Ordering::SeqCst) + 1;
        let tenth = done * 10 / self.total.max(1);
        let mut shown = self.shown.lock().unwrap_or_else(|e| e.into_inner());
        if self.tty {
            eprint!("\r  version {version}: {done}/{} pages sent", self.total);
            if done == self.total {
                eprintln!();
            }
        } else if tenth > *shown || done == self.total {
            *shown = tenth;
            eprintln!("  version {version}: {done}/{} pages sent", self.total);
        }
    }
}

/// Sends the missing pages, a few at a time; returns the committing answer.
fn send_pages(sender: &Sender<'_>, paged: &Paged, wanted: &[usize]) -> Result<Answer> {
    use std::io::IsTerminal;
    let version = paged.issued.version;
    let next = AtomicUsize::new(0);
    let progress = Progress {
        total: wanted.len(),
        done: AtomicUsize::new(0),
        shown: Mutex::new(0),
        tty: std::io::stderr().is_terminal(),
    };
    let committed: Mutex<Option<Answer>> = Mutex::new(None);
    let failure: Mutex<Option<anyhow::Error>> = Mutex::new(None);
    std::thread::scope(|scope| {
        for _ in 0..PARALLEL.min(wanted.len()) {
            scope.spawn(|| loop {
                if failure.lock().map(|f| f.is_some()).unwrap_or(true) {
                    return;
                }
                let at = next.fetch_add(1, Ordering::SeqCst);
                let Some(&index) = wanted.get(at) else {
                    return;
                };
                let query = format!("?version={version}&page={index}");
                let result = sender
                    .send(&query, paged.pages[index].text.as_bytes())
                    .and_then(|answer| match answer.status {
                        200 => {
                            *committed.lock().unwrap_or_else(|e| e.into_inner()) = Some(answer);
                            Ok(())
                        }
                        202 => Ok(()),
                        _ => bail!("the Worker refused page {index} {}", answer.describe()),
                    });
                match result {
                    Ok(()) => progress.step(version),
                    Err(e) => {
                        *failure.lock().unwrap_or_else(|e| e.into_inner()) = Some(e);
                        return;
                    }
                }
            });
        }
    });
    if let Some(e) = failure.into_inner().unwrap_or_else(|e| e.into_inner()) {
        return Err(e);
    }
    committed
        .into_inner()
        .unwrap_or_else(|e| e.into_inner())
        .context("every missing page was sent but none committed the push; push again")
}

/// What the Worker serves now, for the last line of a push that failed.
fn served_now(base: &str) -> String {
    match crate::status::worker(base) {
        Ok(s) => {
            let pending = s
                .pending
                .map(|p| {
                    format!(
                        "; version {} is pending, {} pages to go",
                        p.version, p.remaining
                    )
                })
                .unwrap_or_default();
            format!(
                "the Worker serves {} ({} tokens){pending}",
                crate::status::served(s.version),
                s.tokens
            )
        }
        Err(e) => format!("the Worker's status is unknown: {e:#}"),
    }
}

/// Signs the store's tokens for the Worker (or takes a prebuilt bundle), pushes them, and
/// records the push once the Worker serves it; returns the version.
///
/// The store is locked only to take the version and to record the push, never while the
/// bundle travels: an incident `revoke` never waits for a push.
pub fn push(
    store_path: &std::path::Path,
    ring: &Keyring,
    url: &str,
    prebuilt_bundle: Option<&std::path::Path>,
    now: u64,
    who: &Actor,
) -> Result<u64> {
    let base = crate::status::base_url(url, "--url")?;
    let (issued, paged) = {
        let mut store = Store::open(store_path)?;
        match prebuilt_bundle {
            Some(path) => {
                let issued = crate::push::prebuilt(&store, path, Target::Worker)?;
                if issued.text.len() > MAX_REQUEST_BYTES {
                    bail!(
                        "{}: {} bytes; a prebuilt bundle travels in one request of at most {MAX_REQUEST_BYTES} bytes: push without --bundle (the CLI pages it)",
                        path.display(),
                        issued.text.len()
                    );
                }
                (issued, None)
            }
            None => {
                let paged = issue_paged(&mut store, ring, now, who)?;
                (
                    Issued {
                        text: paged.issued.text.clone(),
                        keys: paged.issued.keys.clone(),
                        ..paged.issued
                    },
                    Some(paged),
                )
            }
        }
    };
    let sender = Sender {
        agent: ureq::Agent::config_builder()
            .http_status_as_error(false)
            // A redirect would carry a signed push elsewhere: the Worker never redirects.
            .max_redirects(0)
            .timeout_global(Some(Duration::from_secs(120)))
            .build()
            .into(),
        endpoint: format!("{base}/.well-known/tokengate/bundle"),
        ring,
        published: issued.keys.keys().iter().map(|k| k.to_hex()).collect(),
        started: Instant::now(),
    };
    let sha256 = pages::digest(issued.text.as_bytes());
    let result = (|| -> Result<u64> {
        let answer = sender.send("", issued.text.as_bytes())?;
        let done = match (answer.status, &paged) {
            (200, _) => answer,
            (202, Some(paged)) => {
                let mut wanted = missing(&answer, paged.pages.len())?;
                // Tightening first: pages that revoke or expire go before the rest.
                wanted.sort_by_key(|&i| (!paged.tightens.get(i).copied().unwrap_or(false), i));
                let total = paged.pages.len();
                eprintln!(
                    "  version {}: {} of {total} pages to send ({} already on the Worker)",
                    issued.version,
                    wanted.len(),
                    total - wanted.len()
                );
                send_pages(&sender, paged, &wanted)?
            }
            _ => bail!("the Worker refused the push {}", answer.describe()),
        };
        let version = done.json.get("version").and_then(|v| v.as_u64());
        if version != Some(issued.version) {
            bail!(
                "the Worker answered for version {version:?}, not {}",
                issued.version
            );
        }
        // Done only once the Worker says it serves this very bundle.
        if !serves(&base, issued.version, &sha256)? {
            bail!(
                "the Worker committed version {} but does not serve it",
                issued.version
            );
        }
        Ok(issued.version)
    })();
    let version = match result {
        Ok(version) => version,
        // A page retried after its first copy committed the push is refused as no longer
        // pending: what counts is what the Worker serves.
        Err(e) => match serves(&base, issued.version, &sha256) {
            Ok(true) => issued.version,
            _ => bail!("{e:#}; {}", served_now(&base)),
        },
    };
    let details = serde_json::json!({"version": version, "url": base, "tokens": issued.tokens, "keys": issued.keys.ids(), "pages": paged.as_ref().map(|p| p.pages.len())});
    let mut store = Store::open(store_path)?;
    store.transaction(who, "push.worker", None, details, now, |tx| {
        store::record_push(tx, "worker", version, now, &base)
    })?;
    Ok(version)
}
