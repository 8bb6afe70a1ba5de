//! tokengate's proxy-wasm HTTP filter for Envoy.
//!
//! A thin adapter: the plugin configuration is the published bundle, the admin's public keys
//! and the environment come from the VM's environment variables (`TOKENGATE_TRUSTED_KEYS`,
//! `TOKENGATE_ENVIRONMENT`), and every request is decided by `tokengate_core`. This file
//! only moves headers, time and metrics between Envoy and the core.
//!
//! Fail closed: a refused configuration keeps the previous one (Envoy rejects the update);
//! with no bundle at all (an empty configuration) every request gets 503; a panic traps the VM and Envoy's
//! `failure_policy: FAIL_CLOSED` answers 503.

use std::cell::RefCell;
use std::rc::Rc;
use std::time::{Duration, UNIX_EPOCH};

use proxy_wasm::traits::{Context, HttpContext, RootContext};
use proxy_wasm::types::{Action, ContextType, LogLevel, MetricType};
use tokengate_core::decision::{self, Reason};
use tokengate_core::host::{self, Effects, Verdict};
use tokengate_core::issuer::SECRETS_VARIABLE;
use tokengate_core::rate::{self, slots, Admission, Limit};
use tokengate_core::usage::{self, ReadLimiter, Report, Tally, Unreported};
use tokengate_core::{Decision, Denial, Expectation, Gate, KeySet, Request, Served, Target};

/// The VM environment variable holding the admin's public keys (hex, comma-separated): the
/// ECDS resource carries it in `vm_config.environment_variables.key_values`, so a key
/// rotation arrives with the bundle it signs. Public keys only: nothing here can sign.
pub const KEYS_VARIABLE: &str = "TOKENGATE_TRUSTED_KEYS";
/// The VM environment variable naming the environment this gate serves.
pub const ENVIRONMENT_VARIABLE: &str = "TOKENGATE_ENVIRONMENT";

/// Shared-data key of the bundle served (version and signature). Shared data is common to
/// every VM with our `vm_id` in the Envoy process, including the throw-away "canary" VM
/// Envoy configures first: so the canary refuses a rollback exactly as the worker VMs
/// would, and Envoy rejects the update as a whole instead of dropping the filter.
const SERVED_KEY: &str = "tokengate.served";

/// The VM environment variable that turns usage counting off (`off`; from Envoy's
/// environment through `host_env_keys`).
pub const USAGE_VARIABLE: &str = "TOKENGATE_USAGE";

/// Shared-data key of the process's usage registry: `<instance>\n<vm id>\n<vm id>…`, the
/// process's counter set and every VM that has counts. Each VM keeps its counts since it
/// started in [`USAGE_SHARDS`] parts, by token id, and writes the parts that changed under
/// `<USAGE_KEY>.<vm id>.<part>` every [`FLUSH_PERIOD`]: keys only it writes, so no
/// compare-and-swap, and a flush costs what changed, not the process's whole table. A usage
/// read, served by any VM, merges every VM's parts: other VMs' counts up to one period old,
/// its own up to now. `v1`: another encoding gets another key.
const USAGE_KEY: &str = "tokengate.usage.v1";
/// Parts of a VM's counts (by token id).
const USAGE_SHARDS: usize = 16;
/// How often a VM writes its changed counts.
const FLUSH_PERIOD: Duration = Duration::from_secs(1);
/// Compare-and-swap attempts to join the registry; a VM not in it tries again next flush.
const REGISTER_ATTEMPTS: usize = 4;

/// Compare-and-swap attempts to charge a rate-limit counter before the request is refused
/// (503): each failed attempt means another VM counted in the same slot meanwhile.
const CHARGE_ATTEMPTS: usize = 32;

/// The property (Envoy filter state `wasm.tokengate`) holding [`Decision::log_fields`].
pub const PROPERTY: &str = "tokengate";

proxy_wasm::main! {{
    proxy_wasm::set_log_level(LogLevel::Info);
    std::panic::set_hook(Box::new(|info| {
        // The message never holds a token: the core does not put secrets in panics.
        proxy_wasm::hostcalls::log(LogLevel::Critical, &format!("tokengate: panic: {info}")).ok();
    }));
    proxy_wasm::set_root_context(|_| Box::new(GateRoot::default()));
}}

/// Counter ids, one per reason, plus the bundle gauges.
#[derive(Default, Clone)]
struct Metrics {
    /// Counter ids in the order of `Reason::ALL`.
    by_reason: Vec<Option<u32>>,
    bundle_version: Option<u32>,
    bundle_tokens: Option<u32>,
    bundle_refused: Option<u32>,
}

impl Metrics {
    fn define() -> Self {
        let by_reason = Reason::ALL
            .iter()
            .map(|reason| {
                let name = format!("tokengate.{}", reason.counter_name());
                proxy_wasm::hostcalls::define_metric(MetricType::Counter, &name).ok()
            })
            .collect();
        let gauge = |name| proxy_wasm::hostcalls::define_metric(MetricType::Gauge, name).ok();
        Self {
            by_reason,
            bundle_version: gauge("tokengate.bundle.version"),
            bundle_tokens: gauge("tokengate.bundle.tokens"),
            bundle_refused: proxy_wasm::hostcalls::define_metric(
                MetricType::Counter,
                "tokengate.bundle.refused",
            )
            .ok(),
        }
    }

    fn count(&self, reason: Reason) {
        if let Some(id) = reason
            .index()
            .and_then(|p| self.by_reason.get(p).copied().flatten())
        {
            proxy_wasm::hostcalls::increment_metric(id, 1).ok();
        }
    }
}

#[derive(Default)]
struct GateRoot {
    gate: Option<Rc<Gate>>,
    metrics: Option<Rc<Metrics>>,
}

thread_local! {
    /// The gate this VM serves, across root contexts: a configuration Envoy applies without
    /// asking the canary first (it caches verdicts for configurations it has seen) but that
    /// is stale here keeps this gate instead of failing and dropping the filter.
    static SERVING: RefCell<Option<Rc<Gate>>> = const { RefCell::new(None) };
}

/// This VM's usage counts since it started, in parts, and which parts changed since its
/// last flush.
struct VmUsage {
    id: String,
    parts: Vec<Tally>,
    changed: u32,
}

thread_local! {
    static VM_USAGE: RefCell<VmUsage> = RefCell::new(VmUsage {
        id: random_hex(),
        parts: vec![Tally::default(); USAGE_SHARDS],
        changed: 0,
    });
    /// This VM's usage reads this second.
    static READS: RefCell<ReadLimiter> = const { RefCell::new(ReadLimiter::new()) };
}

/// Whether this VM counts usage (its environment is read once, not per request).
fn usage_enabled() -> bool {
    static ENABLED: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ENABLED.get_or_init(|| std::env::var(USAGE_VARIABLE).map_or(true, |v| v != "off"))
}

/// 12 random bytes in hex (WASI's generator; without it, Envoy's clock in nanoseconds).
fn random_hex() -> String {
    let mut bytes = [0u8; 12];
    if getrandom::fill(&mut bytes).is_err() {
        let nanos = proxy_wasm::hostcalls::get_current_time()
            .ok()
            .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
            .map_or(0, |d| d.as_nanos() as u64);
        bytes[4..].copy_from_slice(&nanos.to_le_bytes());
    }
    tokengate_core::hex::encode(&bytes)
}

/// Which part of a VM's counts holds this token id.
fn part_of(token_id: &str) -> usize {
    let hash = token_id
        .bytes()
        .fold(0u32, |h, b| h.wrapping_mul(31).wrapping_add(u32::from(b)));
    hash as usize % USAGE_SHARDS
}

fn part_key(vm: &str, part: usize) -> String {
    format!("{USAGE_KEY}.{vm}.{part}")
}

/// The registry: (instance, VM ids, compare-and-swap token); `None` before any VM made it.
fn registry() -> Option<(String, Vec<String>, Option<u32>)> {
    let (value, cas) = proxy_wasm::hostcalls::get_shared_data(USAGE_KEY).ok()?;
    let text = String::from_utf8(value?).ok()?;
    let mut lines = text.lines();
    let instance = lines.next()?.to_owned();
    Some((instance, lines.map(str::to_owned).collect(), cas))
}

/// Puts this VM in the registry (making the registry if no VM has yet); `false` if it could
/// not. Envoy's shared data has no create-if-absent: two VMs making it at once may lose one
/// entry, which the next flush's check puts back.
fn register(vm: &str) -> bool {
    for _ in 0..REGISTER_ATTEMPTS {
        let (instance, mut vms, cas) =
            registry().unwrap_or_else(|| (format!("envoy-{}", random_hex()), Vec::new(), None));
        if vms.iter().any(|v| v == vm) {
            return true;
        }
        vms.push(vm.to_owned());
        let value = format!("{instance}\n{}", vms.join("\n"));
        if proxy_wasm::hostcalls::set_shared_data(USAGE_KEY, Some(value.as_bytes()), cas).is_ok() {
            return true;
        }
    }
    false
}

/// Writes this VM's changed parts, and makes sure the registry names it (an entry lost to a
/// concurrent creation of the registry is put back at the next flush).
fn flush_usage() {
    VM_USAGE.with(|usage| {
        let mut usage = usage.borrow_mut();
        let counted = usage.parts.iter().any(|part| !part.is_empty());
        if !counted || !register(&usage.id) {
            return;
        }
        for part in 0..USAGE_SHARDS {
            if usage.changed & (1 << part) == 0 {
                continue;
            }
            let value = usage.parts[part].encode();
            let key = part_key(&usage.id, part);
            if proxy_wasm::hostcalls::set_shared_data(&key, Some(value.as_bytes()), None).is_ok() {
                usage.changed &= !(1 << part);
            }
        }
    });
}

/// This VM's side of usage reads.
struct VmCounts;

impl usage::Counter for VmCounts {
    fn admit(&mut self, now: u64) -> bool {
        READS.with(|reads| reads.borrow_mut().admit(now))
    }

    /// Every VM's counts, this VM's flushed first.
    fn report(&mut self, environment: &str, now: u64) -> Result<Report, Unreported> {
        if !usage_enabled() {
            return Err(Unreported::Off);
        }
        flush_usage();
        let unreadable = |what: &str| Unreported::Unavailable(format!("usage shared data: {what}"));
        let Some((instance, vms, _)) = registry() else {
            // No VM has counted anything yet.
            let instance = register_empty()?;
            return Ok(Tally::default().report(&instance, environment, now));
        };
        let mut all = Tally::default();
        for vm in &vms {
            for part in 0..USAGE_SHARDS {
                let key = part_key(vm, part);
                let Ok((value, _)) = proxy_wasm::hostcalls::get_shared_data(&key) else {
                    return Err(unreadable(&key));
                };
                let Some(value) = value else { continue };
                let text = String::from_utf8(value).map_err(|_| unreadable(&key))?;
                all.merge(&Tally::decode(&text).ok_or_else(|| unreadable(&key))?);
            }
        }
        Ok(all.report(&instance, environment, now))
    }
}

/// The registry with no VM in it yet, so the instance a read reports stays the process's.
fn register_empty() -> Result<String, Unreported> {
    if registry().is_none() {
        let value = format!("envoy-{}", random_hex());
        proxy_wasm::hostcalls::set_shared_data(USAGE_KEY, Some(value.as_bytes()), None).ok();
    }
    registry()
        .map(|(instance, _, _)| instance)
        .ok_or_else(|| Unreported::Unavailable("usage shared data: no registry".to_owned()))
}

fn served() -> Option<Served> {
    let (value, _) = proxy_wasm::hostcalls::get_shared_data(SERVED_KEY).ok()?;
    Served::decode(&String::from_utf8_lossy(&value?))
}

/// Why a configuration was not taken.
enum Refusal {
    /// Valid, but older than (or a replay of another bundle of) the version served.
    Stale(String),
    /// Not a bundle this gate may load at all.
    Invalid(String),
}

impl GateRoot {
    /// Opens the bundle with the trusted keys, checks it and its succession against the
    /// bundle served, and validates it.
    fn load(config: &[u8], served: Option<&Served>) -> Result<Gate, Refusal> {
        let invalid = |e: String| Refusal::Invalid(e);
        let keys = std::env::var(KEYS_VARIABLE)
            .map_err(|_| invalid(format!("{KEYS_VARIABLE} is not set in the VM environment")))?;
        let trusted = KeySet::parse(&keys).map_err(|e| invalid(format!("{KEYS_VARIABLE}: {e}")))?;
        let environment = std::env::var(ENVIRONMENT_VARIABLE).map_err(|_| {
            invalid(format!(
                "{ENVIRONMENT_VARIABLE} is not set in the VM environment"
            ))
        })?;
        let expect = Expectation {
            target: Target::Envoy,
            environment: Some(&environment),
            newer_than: None,
        };
        let mut stale = false;
        // The token records go straight into the gate's table as the text is read: the
        // VM's memory never shrinks, so a large bundle's peak is the text plus the table.
        let mut gate = Gate::load_checked(config, &trusted, |head, mark| {
            expect.check(head)?;
            match served {
                Some(served) => served.check_successor(mark).inspect_err(|_| stale = true),
                None => Ok(()),
            }
        })
        .map_err(|e| match stale {
            true => Refusal::Stale(e.to_string()),
            false => invalid(e.to_string()),
        })?;
        // The HS256 issuers' secrets: the VM's environment (`host_env_keys`), never a bundle.
        gate.set_issuer_secrets(std::env::var(SECRETS_VARIABLE).ok().as_deref());
        for warning in gate.issuer_secret_warnings() {
            log(LogLevel::Warn, &format!("tokengate: {warning}"));
        }
        Ok(gate)
    }

    fn serve(&mut self, gate: Rc<Gate>, metrics: &Metrics) {
        for (id, value) in [
            (metrics.bundle_version, gate.version()),
            (metrics.bundle_tokens, gate.token_count() as u64),
        ] {
            if let Some(id) = id {
                proxy_wasm::hostcalls::record_metric(id, value).ok();
            }
        }
        SERVING.with(|s| *s.borrow_mut() = Some(Rc::clone(&gate)));
        self.gate = Some(gate);
    }
}

fn log(level: LogLevel, message: &str) {
    proxy_wasm::hostcalls::log(level, message).ok();
}

impl Context for GateRoot {
    fn on_done(&mut self) -> bool {
        flush_usage();
        true
    }
}

impl RootContext for GateRoot {
    fn on_vm_start(&mut self, _: usize) -> bool {
        true
    }

    fn on_tick(&mut self) {
        flush_usage();
    }

    fn on_configure(&mut self, _: usize) -> bool {
        let started = self.get_current_time();
        create_rate_slots();
        if usage_enabled() {
            self.set_tick_period(FLUSH_PERIOD);
        }
        let metrics = Rc::new(Metrics::define());
        self.metrics = Some(Rc::clone(&metrics));
        let config = self.get_plugin_configuration().unwrap_or_default();
        let served = served();
        let loaded = match (&served, config.is_empty()) {
            // Envoy's ECDS default before the first push: serve, and answer 503 until a
            // bundle arrives (fail closed, never pass-through).
            (None, true) => {
                log(LogLevel::Warn, "tokengate: no bundle yet; answering 503");
                return true;
            }
            (Some(s), true) => Err(Refusal::Stale(format!(
                "an empty configuration cannot replace bundle version {}",
                s.version
            ))),
            (_, false) => Self::load(&config, served.as_ref()),
        };
        let refused = |reason: &str| {
            if let Some(id) = metrics.bundle_refused {
                proxy_wasm::hostcalls::increment_metric(id, 1).ok();
            }
            log(
                LogLevel::Error,
                &format!("tokengate: bundle refused: {reason}"),
            );
        };
        match loaded {
            Ok(gate) => {
                let mark = gate.served();
                if served.as_ref() != Some(mark) {
                    proxy_wasm::hostcalls::set_shared_data(
                        SERVED_KEY,
                        Some(mark.encode().as_bytes()),
                        None,
                    )
                    .ok();
                }
                log(
                    LogLevel::Info,
                    &format!(
                        "tokengate: serving bundle version {} for {} ({} tokens, loaded in {} ms)",
                        gate.version(),
                        gate.environment(),
                        gate.token_count(),
                        self.get_current_time()
                            .duration_since(started)
                            .unwrap_or_default()
                            .as_millis()
                    ),
                );
                self.serve(Rc::new(gate), &metrics);
                true
            }
            Err(Refusal::Stale(reason)) => match SERVING.with(|s| s.borrow().clone()) {
                // A VM that serves a newer bundle keeps it: failing here would make Envoy
                // drop the filter. A fresh VM (Envoy's canary) has none and refuses, so
                // Envoy rejects the update.
                Some(current) => {
                    refused(&format!(
                        "{reason}; still serving version {}",
                        current.version()
                    ));
                    self.serve(current, &metrics);
                    true
                }
                None => {
                    refused(&reason);
                    false
                }
            },
            Err(Refusal::Invalid(reason)) => {
                refused(&reason);
                false
            }
        }
    }

    fn create_http_context(&self, _: u32) -> Option<Box<dyn HttpContext>> {
        Some(Box::new(GateStream {
            gate: self.gate.clone(),
            metrics: self.metrics.clone().unwrap_or_default(),
            now: 0,
        }))
    }

    fn get_type(&self) -> Option<ContextType> {
        Some(ContextType::HttpContext)
    }
}

struct GateStream {
    gate: Option<Rc<Gate>>,
    metrics: Rc<Metrics>,
    /// Unix seconds when the request was decided.
    now: u64,
}

impl Context for GateStream {}

/// What a request gets: a decision, or the gate's answer to a usage read.
enum Step {
    Decided(Decision),
    Usage(Denial),
}

impl GateStream {
    fn decide(&mut self) -> Step {
        let Some(gate) = &self.gate else {
            return Step::Decided(decision::unavailable(Reason::NoBundle));
        };
        // A clock before 1970 is no time an expiry may be checked against: fail closed.
        let Ok(now) = self.get_current_time().duration_since(UNIX_EPOCH) else {
            return Step::Decided(decision::unavailable(Reason::Internal));
        };
        self.now = now.as_secs();
        // Header values may hold any byte; a lossy conversion can only make a token invalid.
        // Valid UTF-8 (every well-formed request) keeps its buffer: no copy per header.
        let headers: Vec<(String, String)> = self
            .get_http_request_headers_bytes()
            .into_iter()
            .map(|(name, value)| {
                let value = String::from_utf8(value)
                    .unwrap_or_else(|e| String::from_utf8_lossy(e.as_bytes()).into_owned());
                (name, value)
            })
            .collect();
        let headers = decision::header_refs(&headers);
        let request = Request::from_pairs(&headers);
        let now = now.as_secs();
        if usage::is_usage_read(&request) {
            let trusted = Some((gate.keys(), gate.environment()));
            return Step::Usage(usage::answer(&request, trusted, now, &mut VmCounts));
        }
        Step::Decided(rate::enforce(
            gate.decide(&request, now),
            &mut SharedCounters,
            now,
        ))
    }
}

/// The process's rate-limit counters, in Envoy's shared data (common to every VM with our
/// `vm_id`, so a limit of N is N per Envoy process): [`slots::SLOTS`] keys, each holding the
/// counters whose key hashes there, rewritten by compare-and-swap ([`slots`]).
struct SharedCounters;

impl rate::Counters for SharedCounters {
    fn charge(&mut self, limit: &Limit, now: u64) -> Option<Admission> {
        let key = slots::store_key(&limit.key);
        for _ in 0..CHARGE_ATTEMPTS {
            let (value, cas) = proxy_wasm::hostcalls::get_shared_data(&key).ok()?;
            if cas.is_none() {
                // Slots are made when a VM is configured; one missing is made empty here,
                // and the charge starts over with its compare-and-swap version.
                proxy_wasm::hostcalls::set_shared_data(&key, Some(b""), None).ok()?;
                continue;
            }
            let Some((next, admission)) = slots::charge(value.as_deref(), limit, now) else {
                // Only a writer other than tokengate (a filter sharing our vm_id) can leave a
                // slot this filter cannot read: its counters fail closed.
                proxy_wasm::hostcalls::log(
                    LogLevel::Error,
                    &format!(
                        "tokengate: rate-limit slot {key} is unreadable; its limits answer 503"
                    ),
                )
                .ok();
                return None;
            };
            if value.as_deref() == Some(next.as_slice()) {
                return Some(admission);
            }
            match proxy_wasm::hostcalls::set_shared_data(&key, Some(&next), cas) {
                Ok(()) => return Some(admission),
                Err(proxy_wasm::types::Status::CasMismatch) => continue,
                Err(_) => return None,
            }
        }
        None
    }
}

/// Makes every rate-limit slot that does not exist yet, empty. The first VM Envoy configures
/// (the canary, before any worker VM decides a request) makes them all, so requests always
/// update a slot by compare-and-swap: shared data cannot create a key only if absent.
fn create_rate_slots() {
    for slot in 0..slots::SLOTS {
        let key = slots::slot_key(slot);
        if let Ok((_, None)) = proxy_wasm::hostcalls::get_shared_data(&key) {
            proxy_wasm::hostcalls::set_shared_data(&key, Some(b""), None).ok();
        }
    }
}

/// The effects of a decision, through proxy-wasm (a host call that fails traps the VM, and
/// `failure_policy: FAIL_CLOSED` answers 503).
impl Effects for GateStream {
    fn set_request_header(&mut self, name: &str, value: Option<&str>) -> bool {
        self.set_http_request_header(name, value);
        true
    }

    fn send_response(&mut self, status: u16, headers: &[(&str, &str)], body: &str) {
        self.send_http_response(u32::from(status), headers.to_vec(), Some(body.as_bytes()));
    }

    fn count(&mut self, reason: Reason) {
        self.metrics.count(reason);
    }

    /// Puts the reason and identity where Envoy's access log and the RBAC guard read them:
    /// one property (one host call), `%FILTER_STATE(wasm.tokengate:PLAIN)%` =
    /// `reason=valid subject=ci-deploy token_id=tid_… rule=orders-read`.
    fn record(&mut self, fields: &str) {
        self.set_property(vec![PROPERTY], Some(fields.as_bytes()));
    }

    fn tally(&mut self, decision: &Decision) {
        // The part by what is counted (a signed token's subject, not its jti): one line each.
        let Some(key) = Tally::key_of(decision) else {
            return;
        };
        if usage_enabled() {
            VM_USAGE.with(|usage| {
                let mut usage = usage.borrow_mut();
                let part = part_of(&key);
                if usage.parts[part].count(decision, self.now) {
                    usage.changed |= 1 << part;
                }
            });
        }
    }
}

impl HttpContext for GateStream {
    fn on_http_request_headers(&mut self, _: usize, _: bool) -> Action {
        let verdict = match self.decide() {
            Step::Decided(decision) => host::apply(decision, self),
            Step::Usage(answer) => {
                host::respond(self, &answer);
                Verdict::Answered
            }
        };
        match verdict {
            Verdict::Forward => Action::Continue,
            Verdict::Answered => Action::Pause,
        }
    }
}
