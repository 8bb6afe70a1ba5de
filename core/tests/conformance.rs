//! The core's conformance runner: every vector through `Gate::decide`, and every refusal
//! through `Gate::load`.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // test helpers: a failure is the report

use std::collections::HashMap;
use tokengate_conformance::{self as conformance, Observed};

use tokengate_core::{rate, Expectation, Gate, KeySet, Request, Target};

fn gate(suite: &conformance::Suite, name: &str) -> Gate {
    let trusted = KeySet::from_hex(&suite.trusted_keys).unwrap();
    let text = suite.bundle_text(name, "envoy").unwrap();
    let expect = Expectation {
        target: Target::Envoy,
        environment: Some(&suite.environment),
        newer_than: None,
    };
    let mut gate = Gate::load(text.as_bytes(), &trusted, &expect)
        .unwrap_or_else(|e| panic!("fixture {name}: {e}"));
    gate.set_issuer_secrets(Some(&suite.issuer_secrets));
    assert_eq!(
        gate.issuer_secret_warnings(),
        Vec::<String>::new(),
        "fixture {name}"
    );
    gate
}

/// What the upstream would receive: the request's headers, less the removed, plus the added.
fn forwarded(
    decision: &tokengate_core::Decision,
    headers: &[(String, String)],
) -> Vec<(String, String)> {
    let mut out: Vec<(String, String)> = headers
        .iter()
        .filter(|(n, _)| !decision.remove_headers.contains(&n.to_ascii_lowercase()))
        .cloned()
        .collect();
    for (name, value) in &decision.add_headers {
        out.retain(|(n, _)| !n.eq_ignore_ascii_case(name));
        out.push(((*name).to_owned(), value.clone()));
    }
    out
}

#[test]
fn every_vector_passes_in_the_core() {
    let suite = conformance::load().unwrap();
    assert!(
        suite.cases.len() >= 80,
        "the suite must hold at least 80 cases"
    );
    let count = conformance::run_all(&suite, |case| {
        let gate = gate(&suite, &case.bundle);
        Ok(observe(&gate, case, &mut Unlimited))
    })
    .unwrap_or_else(|report| panic!("{report}"));
    println!("{count} conformance cases passed in the core");
}

/// Counters for cases, whose bundles have no limits: any charge is a failure to count.
struct Unlimited;

impl rate::Counters for Unlimited {
    fn charge(&mut self, _: &rate::Limit, _: u64) -> Option<rate::Admission> {
        None
    }
}

/// Counters as a host keeps them: one window per key.
#[derive(Default)]
struct Windows(HashMap<String, rate::Window>);

impl rate::Counters for Windows {
    fn charge(&mut self, limit: &rate::Limit, now: u64) -> Option<rate::Admission> {
        let state = self.0.entry(limit.key.clone()).or_default();
        let (next, admission) = rate::admit(*state, limit.rate, now);
        *state = next;
        Some(admission)
    }
}

#[test]
fn every_sequence_passes_in_the_core() {
    let suite = conformance::load().unwrap();
    assert!(!suite.sequences.is_empty());
    let count = conformance::run_sequences(
        &suite,
        |sequence| Ok((gate(&suite, &sequence.bundle), Windows::default())),
        |(gate, counters), case| Ok(observe(gate, case, counters)),
    )
    .unwrap_or_else(|report| panic!("{report}"));
    println!("{count} sequence steps passed in the core");
}

/// What the client and the upstream see of the core's decision on `case`.
fn observe(gate: &Gate, case: &conformance::Case, counters: &mut impl rate::Counters) -> Observed {
    let r = &case.request;
    let decision = gate.decide(
        &Request {
            method: &r.method,
            path: &r.path,
            authority: &r.authority,
            headers: &tokengate_core::decision::header_refs(&r.headers),
        },
        case.now,
    );
    let decision = rate::enforce(decision, counters, case.now);
    let allowed = decision.refusal().is_none();
    let denial = decision
        .denial
        .clone()
        .unwrap_or_else(|| tokengate_core::Denial {
            status: 200,
            headers: vec![],
            body: String::new(),
        });
    Observed {
        status: decision.status(),
        reason: Some(decision.reason.as_str().to_owned()),
        response_headers: denial
            .headers
            .iter()
            .map(|(n, v)| ((*n).to_owned(), v.clone()))
            .collect(),
        body: denial.body,
        upstream_headers: allowed.then(|| forwarded(&decision, &r.headers)),
        upstream_path: allowed.then(|| {
            decision
                .rewrite_path
                .clone()
                .unwrap_or_else(|| r.path.clone())
        }),
    }
}

#[test]
fn every_refusal_is_refused_by_the_core() {
    let suite = conformance::load().unwrap();
    for refusal in &suite.refusals {
        let trusted = KeySet::from_hex(suite.trusted_for(refusal)).unwrap();
        let expect = Expectation {
            target: Target::Envoy,
            environment: Some(&suite.environment),
            newer_than: refusal
                .serving
                .as_deref()
                .map(|name| suite.bundle_version(name)),
        };
        let result = Gate::load(refusal.bundle["envoy"].as_bytes(), &trusted, &expect);
        assert!(result.is_err(), "{} was accepted", refusal.name);
    }
}

#[test]
fn a_401_never_says_why() {
    let suite = conformance::load().unwrap();
    let bodies: std::collections::BTreeSet<String> = suite
        .cases
        .iter()
        .filter(|c| c.expect.status == 401 && c.expect.error.as_deref() == Some("invalid_token"))
        .map(|case| {
            let gate = gate(&suite, &case.bundle);
            let r = &case.request;
            let request = Request {
                method: &r.method,
                path: &r.path,
                authority: &r.authority,
                headers: &tokengate_core::decision::header_refs(&r.headers),
            };
            gate.decide(&request, case.now).denial.unwrap().body
        })
        .collect();
    assert_eq!(bodies.len(), 1, "401 bodies differ by reason: {bodies:?}");
}

/// The Worker's path: policy without tokens, records looked up one hash at a time, as from
/// KV. Every case must decide exactly as with the in-memory gate.
#[test]
fn split_lookup_decides_exactly_like_the_in_memory_gate() {
    use std::collections::HashMap;
    use tokengate_core::{Bundle, Record, Step};

    let suite = conformance::load().unwrap();
    for case in &suite.cases {
        let text = suite.bundle_text(&case.bundle, "envoy").unwrap();
        let envelope: serde_json::Value = serde_json::from_str(&text).unwrap();
        let full: Bundle = serde_json::from_value(envelope["payload"].clone()).unwrap();
        let kv: HashMap<String, tokengate_core::TokenRecord> = full
            .tokens
            .iter()
            .flat_map(|t| t.lookup_records())
            .map(|r| (r.hash.clone(), r))
            .collect();
        let mut meta = Gate::from_bundle(Bundle {
            tokens: vec![],
            ..full
        })
        .unwrap();
        meta.set_issuer_secrets(Some(&suite.issuer_secrets));
        let r = &case.request;
        let request = Request {
            method: &r.method,
            path: &r.path,
            authority: &r.authority,
            headers: &tokengate_core::decision::header_refs(&r.headers),
        };
        let split = match meta.begin(&request, case.now) {
            Step::Done(decision) => decision,
            Step::Lookup(pending) => {
                let record = kv
                    .get(&pending.hash.to_hex())
                    .map(|t| Record::from_token_record(t).unwrap());
                meta.finish(pending, record.as_ref(), case.now)
            }
            other => panic!("{}: unexpected step {other:?}", case.name),
        };
        let whole = gate(&suite, &case.bundle).decide(&request, case.now);
        assert_eq!(split, whole, "{}", case.name);
    }
}

/// A bundle signed by two keys loads on a gate that trusts either one: during an admin key
/// rotation no gate refuses a valid bundle, whichever set it trusts.
#[test]
fn a_bundle_signed_by_two_keys_loads_with_either_trusted() {
    let suite = conformance::load().unwrap();
    let text = suite.bundle_text("rotation", "envoy").unwrap();
    let envelope: serde_json::Value = serde_json::from_str(&text).unwrap();
    let published: Vec<String> =
        serde_json::from_value(envelope["payload"]["keys"].clone()).unwrap();
    assert_eq!(published.len(), 2);
    let expect = Expectation {
        target: Target::Envoy,
        environment: Some(&suite.environment),
        newer_than: None,
    };
    for key in &published {
        let trusted = KeySet::from_hex(std::slice::from_ref(key)).unwrap();
        let gate = Gate::load(text.as_bytes(), &trusted, &expect).unwrap();
        assert_eq!(
            gate.keys().keys().len(),
            2,
            "the gate trusts both keys next"
        );
    }
}
