//! The conformance vectors (`vectors.json`, made by `generate.py`) and the one comparison
//! every target's runner uses, so that the core, the filter under wasmtime, Envoy and the
//! Worker are held to exactly the same expectations.
#![warn(missing_docs)]

use std::collections::BTreeMap;
use std::path::PathBuf;

use serde::Deserialize;

/// The whole suite.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Suite {
    /// Unix seconds most cases run at.
    pub now: u64,
    /// The public keys (hex) every target trusts for the cases and refusals.
    pub trusted_keys: Vec<String>,
    /// The HS256 issuers' secrets every target's gate is given, in the
    /// `TOKENGATE_ISSUER_SECRETS` form (`kid=<base64url>` entries).
    pub issuer_secrets: String,
    /// The environment fixture bundles are signed for.
    pub environment: String,
    /// Published fixture bundles: name → target (`envoy`, `worker`) → the exact text.
    pub bundles: BTreeMap<String, BTreeMap<String, String>>,
    /// Decision cases.
    pub cases: Vec<Case>,
    /// Requests in order against one gate whose outcomes depend on the ones before (rate
    /// limits).
    pub sequences: Vec<Sequence>,
    /// Bundles every target must refuse.
    pub refusals: Vec<Refusal>,
}

/// One request and what every target must do with it.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Case {
    /// What the case checks.
    pub name: String,
    /// The fixture bundle it runs against.
    pub bundle: String,
    /// The time of the request, unix seconds.
    pub now: u64,
    /// True when the case sits on a one-second boundary and so needs a controlled clock.
    #[serde(default)]
    pub clock_edge: bool,
    /// An HTTP proxy in front of the gate may refuse this request itself with a 400 before
    /// the gate sees it (Envoy rejects a lower-case method or a relative path); a runner
    /// behind such a proxy accepts that as long as nothing reached the upstream.
    #[serde(default)]
    pub proxy_may_reject: bool,
    /// The request.
    pub request: Request,
    /// The expectation.
    pub expect: Expect,
}

/// A request of a case.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Request {
    /// The method.
    pub method: String,
    /// `:path`, query included.
    pub path: String,
    /// `:authority`.
    pub authority: String,
    /// Header pairs in order, repeats included.
    pub headers: Vec<(String, String)>,
}

/// What must be observed.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Expect {
    /// 200 when the request reaches the upstream, else the gate's status.
    pub status: u16,
    /// The internal reason (checked where the target exposes it: logs, metrics).
    pub reason: String,
    /// Response headers that must be present with exactly these values (names lower case).
    #[serde(default)]
    pub response_headers: BTreeMap<String, String>,
    /// Response headers that must be absent.
    #[serde(default)]
    pub response_absent: Vec<String>,
    /// The body's `error` member, on denials.
    #[serde(default)]
    pub error: Option<String>,
    /// Headers the upstream must receive with exactly these values.
    #[serde(default)]
    pub upstream_headers: BTreeMap<String, String>,
    /// Headers the upstream must not receive.
    #[serde(default)]
    pub upstream_absent: Vec<String>,
    /// The path the upstream must receive (when it differs from the request's).
    #[serde(default)]
    pub upstream_path: Option<String>,
}

/// Requests sent in order to one gate, at seconds into an epoch-aligned window, with
/// counters that start empty.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Sequence {
    /// What the sequence checks.
    pub name: String,
    /// The fixture bundle it runs against.
    pub bundle: String,
    /// The requests, in order.
    pub steps: Vec<Step>,
}

/// One request of a sequence.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Step {
    /// Seconds from the start of a window (the suite's `now` is one): steps at 60 or more
    /// are in a later window.
    pub at: u64,
    /// For a 429: seconds to the window's end at `at`, as `retry-after` and the `t` of
    /// `ratelimit` give it. A runner on a real clock sets it from its clock
    /// ([`Step::reset_at`]).
    #[serde(default)]
    pub reset: Option<u64>,
    /// The request.
    pub request: Request,
    /// The expectation.
    pub expect: Expect,
}

/// Window length the sequences count in (every fixture limit is per minute).
pub const SEQUENCE_WINDOW: u64 = 60;

impl Step {
    /// The step as a case at `now`, named after its sequence and position.
    pub fn case(&self, sequence: &Sequence, index: usize, now: u64) -> Case {
        Case {
            name: format!("{} (step {}, +{}s)", sequence.name, index + 1, self.at),
            bundle: sequence.bundle.clone(),
            now,
            clock_edge: false,
            proxy_may_reject: false,
            request: self.request.clone(),
            expect: self.expect.clone(),
        }
    }

    /// The step as sent at `second` seconds into its window instead of `at`: a 429's
    /// expected `retry-after` and `ratelimit` follow.
    pub fn reset_at(&self, second: u64) -> Step {
        let mut step = self.clone();
        if let Some(reset) = self.reset {
            let actual = SEQUENCE_WINDOW - second % SEQUENCE_WINDOW;
            step.reset = Some(actual);
            for (name, value) in step.expect.response_headers.iter_mut() {
                if name == "retry-after" {
                    *value = actual.to_string();
                } else if name == "ratelimit" {
                    *value = value.replace(&format!(";t={reset}"), &format!(";t={actual}"));
                }
            }
        }
        step
    }
}

/// Runs every sequence: `start` gives a runner fresh counters and the sequence's bundle,
/// `run` sends one step at the suite's `now` plus its `at`; one report of all failures.
pub fn run_sequences<G>(
    suite: &Suite,
    mut start: impl FnMut(&Sequence) -> Result<G, String>,
    mut run: impl FnMut(&mut G, &Case) -> Result<Observed, String>,
) -> Result<usize, String> {
    let mut failures = Vec::new();
    let mut steps = 0;
    for sequence in &suite.sequences {
        let mut gate = match start(sequence) {
            Ok(gate) => gate,
            Err(error) => {
                failures.push(format!("{}: runner error: {error}", sequence.name));
                continue;
            }
        };
        for (index, step) in sequence.steps.iter().enumerate() {
            steps += 1;
            let case = step.case(sequence, index, suite.now + step.at);
            match run(&mut gate, &case) {
                Ok(seen) => {
                    if let Err(problem) = check(&case, &seen) {
                        failures.push(problem);
                    }
                }
                Err(error) => failures.push(format!("{}: runner error: {error}", case.name)),
            }
        }
    }
    if failures.is_empty() {
        Ok(steps)
    } else {
        Err(format!(
            "{} of {steps} sequence steps failed:\n  {}",
            failures.len(),
            failures.join("\n  ")
        ))
    }
}

/// A bundle a target must refuse.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Refusal {
    /// What is wrong with it.
    pub name: String,
    /// The bundle text exactly as pushed, made for each target (`envoy`, `worker`), so that
    /// its defect, not the target, is what a gate refuses.
    pub bundle: BTreeMap<String, String>,
    /// The public keys (hex) the target trusts; `None`: the suite's `trusted_keys`.
    pub trusted: Option<Vec<String>>,
    /// The fixture bundle the target serves already, if any (rollback and replay cases).
    #[serde(default)]
    pub serving: Option<String>,
}

/// What a runner saw for one case.
#[derive(Debug, Clone, Default)]
pub struct Observed {
    /// The status the client got (200 when the upstream answered).
    pub status: u16,
    /// The reason, when the target exposes it to the runner.
    pub reason: Option<String>,
    /// Response headers (any case).
    pub response_headers: Vec<(String, String)>,
    /// Response body.
    pub body: String,
    /// Headers the upstream received, when it was reached.
    pub upstream_headers: Option<Vec<(String, String)>>,
    /// The path the upstream received, when it was reached.
    pub upstream_path: Option<String>,
}

/// Where the suite lives in the repository.
pub fn vectors_path() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("vectors.json")
}

/// Loads the suite.
pub fn load() -> Result<Suite, String> {
    let path = vectors_path();
    let text = std::fs::read_to_string(&path).map_err(|e| format!("{}: {e}", path.display()))?;
    serde_json::from_str(&text).map_err(|e| format!("{}: {e}", path.display()))
}

impl Suite {
    /// The public keys (hex) a target trusts for `refusal` (the suite's unless it says).
    pub fn trusted_for<'a>(&'a self, refusal: &'a Refusal) -> &'a [String] {
        refusal.trusted.as_deref().unwrap_or(&self.trusted_keys)
    }

    /// The text of a fixture bundle signed for `target`.
    pub fn bundle_text(&self, name: &str, target: &str) -> Result<String, String> {
        self.bundles
            .get(name)
            .and_then(|by_target| by_target.get(target))
            .cloned()
            .ok_or_else(|| format!("no fixture bundle {name:?} for target {target:?}"))
    }

    /// The version of a fixture bundle.
    pub fn bundle_version(&self, name: &str) -> u64 {
        self.bundles
            .get(name)
            .and_then(|t| t.values().next())
            .and_then(|text| serde_json::from_str::<serde_json::Value>(text).ok())
            .and_then(|b| {
                b.pointer("/payload/version")
                    .and_then(serde_json::Value::as_u64)
            })
            .unwrap_or_default()
    }
}

fn header<'a>(headers: &'a [(String, String)], name: &str) -> Vec<&'a str> {
    headers
        .iter()
        .filter(|(n, _)| n.eq_ignore_ascii_case(name))
        .map(|(_, v)| v.as_str())
        .collect()
}

/// Compares what a target did with what the case expects; every mismatch is listed.
pub fn check(case: &Case, seen: &Observed) -> Result<(), String> {
    let expect = &case.expect;
    let mut problems = Vec::new();
    if seen.status != expect.status {
        problems.push(format!(
            "status {} (expected {})",
            seen.status, expect.status
        ));
    }
    if let Some(reason) = &seen.reason {
        if reason != &expect.reason {
            problems.push(format!("reason {reason:?} (expected {:?})", expect.reason));
        }
    }
    for (name, want) in &expect.response_headers {
        let got = header(&seen.response_headers, name);
        if got != [want.as_str()] {
            problems.push(format!(
                "response header {name}: {got:?} (expected [{want:?}])"
            ));
        }
    }
    for name in &expect.response_absent {
        if !header(&seen.response_headers, name).is_empty() {
            problems.push(format!("response header {name} present (expected absent)"));
        }
    }
    if let Some(error) = &expect.error {
        let body: serde_json::Value = serde_json::from_str(&seen.body).unwrap_or_default();
        let got = body.get("error").and_then(|e| e.as_str());
        if got != Some(error.as_str())
            || body
                .get("error_description")
                .and_then(|d| d.as_str())
                .is_none()
        {
            problems.push(format!(
                "body {:?} (expected error {error:?} and a description)",
                seen.body
            ));
        }
    }
    let reached = seen.upstream_headers.is_some();
    if reached != (expect.status == 200) {
        problems.push(format!(
            "upstream reached: {reached} (expected {})",
            expect.status == 200
        ));
    }
    if let Some(upstream) = &seen.upstream_headers {
        for (name, want) in &expect.upstream_headers {
            let got = header(upstream, name);
            if got != [want.as_str()] {
                problems.push(format!(
                    "upstream header {name}: {got:?} (expected [{want:?}])"
                ));
            }
        }
        for name in &expect.upstream_absent {
            let got = header(upstream, name);
            if !got.is_empty() {
                problems.push(format!(
                    "upstream header {name} reached the upstream: {got:?}"
                ));
            }
        }
        let want_path = expect
            .upstream_path
            .as_deref()
            .unwrap_or(&case.request.path);
        if let Some(path) = &seen.upstream_path {
            if path != want_path {
                problems.push(format!("upstream path {path:?} (expected {want_path:?})"));
            }
        }
    }
    if problems.is_empty() {
        Ok(())
    } else {
        Err(format!("{}: {}", case.name, problems.join("; ")))
    }
}

/// Runs every case through `run` and returns one report of all failures.
pub fn run_all(
    suite: &Suite,
    mut run: impl FnMut(&Case) -> Result<Observed, String>,
) -> Result<usize, String> {
    let mut failures = Vec::new();
    for case in &suite.cases {
        match run(case) {
            Ok(seen) => {
                if let Err(problem) = check(case, &seen) {
                    failures.push(problem);
                }
            }
            Err(error) => failures.push(format!("{}: runner error: {error}", case.name)),
        }
    }
    if failures.is_empty() {
        Ok(suite.cases.len())
    } else {
        Err(format!(
            "{} of {} conformance cases failed:\n  {}",
            failures.len(),
            suite.cases.len(),
            failures.join("\n  ")
        ))
    }
}
