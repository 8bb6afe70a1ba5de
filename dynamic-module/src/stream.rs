//! One request: Envoy's headers in, the decision's effects out. Nothing is decided here;
//! what a decision does to a request is `tokengate_core::host`, shared with the wasm filter.

use std::borrow::Cow;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::time::{SystemTime, UNIX_EPOCH};

use tokengate_core::decision::{self, Reason};
pub use tokengate_core::host::{Effects, Verdict};
use tokengate_core::{host, rate, usage, Decision, Denial, Gate, Request};

/// The filter state key holding [`Decision::log_fields`] (`%FILTER_STATE(tokengate:PLAIN)%`
/// in the access log; the RBAC guard reads it too).
pub const FILTER_STATE_KEY: &str = "tokengate";

/// What a request's filter can ask of Envoy: the effects every Envoy filter has, and the
/// request's headers.
pub trait Host: Effects {
    /// Every request header pair, pseudo-headers included, repeats in order: borrowed from
    /// the host (valid UTF-8, as every well-formed request is) or converted (lossy: a
    /// replaced byte can only make a token invalid). `None`: the host could not give them.
    fn request_headers(&self) -> Option<Vec<(Cow<'_, str>, Cow<'_, str>)>>;
}

/// Decides the request on `gate` (503 without one) at `now` (unix seconds; `None`, a clock
/// that cannot be read: 503) and applies the decision through `host` ([`host::apply`]: a
/// header change the host refuses turns it into a 503). An allowed request on a limited
/// rule or token is charged to `limits` first ([`rate::enforce`]: over the limit, 429). A
/// usage read is answered from `counts` (see [`tokengate_core::usage`]). A panic on the way is caught here: the request
/// is answered 503 (unless it was answered already), never unwinding into Envoy.
pub fn on_request_headers(
    gate: Option<&Gate>,
    host: &mut impl Host,
    now: Option<u64>,
    counts: &mut impl usage::Counter,
    limits: &mut impl rate::Counters,
) -> Verdict {
    let mut answering = Answering {
        host,
        answered: false,
    };
    let decided = catch_unwind(AssertUnwindSafe(|| {
        match decide(gate, &answering, now, counts, limits) {
            Step::Decided(decision) => host::apply(decision, &mut answering),
            Step::Usage(answer) => {
                host::respond(&mut answering, &answer);
                Verdict::Answered
            }
        }
    }));
    match decided {
        Ok(verdict) => verdict,
        Err(_) => {
            if !answering.answered {
                let _ = catch_unwind(AssertUnwindSafe(|| {
                    let decision = decision::unavailable(Reason::Internal);
                    answering.count(decision.reason);
                    host::send(&mut answering, &decision);
                }));
            }
            Verdict::Answered
        }
    }
}

/// A host that remembers whether the request was answered.
struct Answering<'h, H> {
    host: &'h mut H,
    answered: bool,
}

impl<H: Host> Effects for Answering<'_, H> {
    fn set_request_header(&mut self, name: &str, value: Option<&str>) -> bool {
        self.host.set_request_header(name, value)
    }
    fn send_response(&mut self, status: u16, headers: &[(&str, &str)], body: &str) {
        self.answered = true;
        self.host.send_response(status, headers, body)
    }
    fn count(&mut self, reason: Reason) {
        self.host.count(reason)
    }
    fn record(&mut self, fields: &str) {
        self.host.record(fields)
    }
    fn tally(&mut self, decision: &Decision) {
        self.host.tally(decision)
    }
}

/// What a request gets: a decision, or the gate's answer to a usage read.
enum Step {
    Decided(Decision),
    Usage(Denial),
}

fn decide<H: Host>(
    gate: Option<&Gate>,
    host: &Answering<'_, H>,
    now: Option<u64>,
    counts: &mut impl usage::Counter,
    limits: &mut impl rate::Counters,
) -> Step {
    let Some(gate) = gate else {
        return Step::Decided(decision::unavailable(Reason::NoBundle));
    };
    let (Some(owned), Some(now)) = (host.host.request_headers(), now) else {
        return Step::Decided(decision::unavailable(Reason::Internal));
    };
    let headers: Vec<(&str, &str)> = owned.iter().map(|(n, v)| (&**n, &**v)).collect();
    let request = Request::from_pairs(&headers);
    if usage::is_usage_read(&request) {
        let trusted = Some((gate.keys(), gate.environment()));
        return Step::Usage(usage::answer(&request, trusted, now, counts));
    }
    Step::Decided(rate::enforce(gate.decide(&request, now), limits, now))
}

/// Unix seconds (Envoy offers a module no clock; the OS clock is what its own time reads);
/// `None` before 1970, which no expiry check may take as a time.
pub fn now() -> Option<u64> {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .ok()
        .map(|d| d.as_secs())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::limits;
    use tokengate_conformance::{self as conformance, Observed};
    use tokengate_core::{Expectation, KeySet, Target};

    /// A local reply: status, headers, body.
    type Response = (u16, Vec<(String, String)>, String);

    /// Envoy as the module sees it: the request's headers (changed as the filter asks), the
    /// response it sent, the counters and the filter state.
    #[derive(Default)]
    struct FakeEnvoy {
        headers: Vec<(String, String)>,
        response: Option<Response>,
        counted: Vec<Reason>,
        tallied: Vec<Option<String>>,
        recorded: Option<String>,
        panic_on_read: bool,
        refuse_edits: bool,
    }

    impl Host for FakeEnvoy {
        fn request_headers(&self) -> Option<Vec<(Cow<'_, str>, Cow<'_, str>)>> {
            assert!(!self.panic_on_read, "a host failure");
            Some(
                self.headers
                    .iter()
                    .map(|(n, v)| (Cow::Borrowed(n.as_str()), Cow::Borrowed(v.as_str())))
                    .collect(),
            )
        }
    }

    impl Effects for FakeEnvoy {
        fn set_request_header(&mut self, name: &str, value: Option<&str>) -> bool {
            if self.refuse_edits {
                return false;
            }
            self.headers.retain(|(n, _)| n != name);
            if let Some(value) = value {
                self.headers.push((name.to_owned(), value.to_owned()));
            }
            true
        }
        fn send_response(&mut self, status: u16, headers: &[(&str, &str)], body: &str) {
            assert!(self.response.is_none(), "answered twice");
            let headers = headers
                .iter()
                .map(|(n, v)| ((*n).to_owned(), (*v).to_owned()))
                .collect();
            self.response = Some((status, headers, body.to_owned()));
        }
        fn count(&mut self, reason: Reason) {
            self.counted.push(reason);
        }
        fn record(&mut self, fields: &str) {
            self.recorded = Some(fields.to_owned());
        }
        fn tally(&mut self, decision: &Decision) {
            self.tallied.push(decision.token_id.clone());
        }
    }

    /// A host's usage side: reads admitted and reports made.
    #[derive(Default)]
    struct FakeCounts {
        reports: usize,
        refuse_reads: bool,
    }

    impl usage::Counter for FakeCounts {
        fn admit(&mut self, _: u64) -> bool {
            !self.refuse_reads
        }
        fn report(
            &mut self,
            environment: &str,
            now: u64,
        ) -> Result<usage::Report, usage::Unreported> {
            self.reports += 1;
            Ok(usage::Tally::default().report("envoy-test", environment, now))
        }
    }

    /// A vector's request as Envoy hands it over: pseudo-headers, then its headers (names in
    /// lower case).
    fn headers_of(r: &conformance::Request) -> Vec<(String, String)> {
        [
            (":method", &r.method),
            (":path", &r.path),
            (":authority", &r.authority),
        ]
        .into_iter()
        .map(|(n, v)| (n.to_owned(), v.clone()))
        .chain(
            r.headers
                .iter()
                .map(|(n, v)| (n.to_ascii_lowercase(), v.clone())),
        )
        .collect()
    }

    fn fixture(suite: &conformance::Suite, name: &str) -> Gate {
        let trusted = KeySet::from_hex(&suite.trusted_keys).unwrap();
        let text = suite.bundle_text(name, "envoy").unwrap();
        let expect = Expectation {
            target: Target::Envoy,
            environment: Some(&suite.environment),
            newer_than: None,
        };
        let mut gate = Gate::load(text.as_bytes(), &trusted, &expect).unwrap();
        gate.set_issuer_secrets(Some(&suite.issuer_secrets));
        assert_eq!(gate.issuer_secret_warnings(), Vec::<String>::new());
        gate
    }

    /// One request through the adapter, as the client and the upstream see it.
    fn observe(
        gate: &Gate,
        case: &conformance::Case,
        limits: &mut impl rate::Counters,
    ) -> Result<Observed, String> {
        let mut envoy = FakeEnvoy {
            headers: headers_of(&case.request),
            ..FakeEnvoy::default()
        };
        let verdict = on_request_headers(
            Some(gate),
            &mut envoy,
            Some(case.now),
            &mut FakeCounts::default(),
            limits,
        );
        let reason = envoy.counted.first().map(|r| r.as_str().to_owned());
        assert_eq!(envoy.counted.len(), 1, "{}: counted once", case.name);
        let recorded = envoy.recorded.clone().unwrap_or_default();
        assert!(recorded.starts_with(&format!("reason={} ", reason.clone().unwrap_or_default())));
        Ok(match (verdict, envoy.response) {
            (Verdict::Answered, Some((status, response_headers, body))) => Observed {
                status,
                reason,
                response_headers,
                body,
                ..Observed::default()
            },
            (Verdict::Forward, None) => {
                let path = envoy.headers.iter().find(|(n, _)| n == ":path");
                Observed {
                    status: 200,
                    reason,
                    upstream_path: path.map(|(_, v)| v.clone()),
                    upstream_headers: Some(
                        envoy
                            .headers
                            .into_iter()
                            .filter(|(n, _)| !n.starts_with(':'))
                            .collect(),
                    ),
                    ..Observed::default()
                }
            }
            (verdict, response) => {
                return Err(format!("{verdict:?} with a response: {response:?}"))
            }
        })
    }

    #[test]
    fn every_conformance_vector_through_the_module_adapter() {
        let suite = conformance::load().unwrap();
        let counters = limits::CounterSet::default();
        let count = conformance::run_all(&suite, |case| {
            observe(&fixture(&suite, &case.bundle), case, &mut &counters)
        })
        .unwrap_or_else(|report| panic!("{report}"));
        assert_eq!(count, suite.cases.len());
        assert!(counters.is_empty(), "no case has a limit to count");
    }

    #[test]
    fn every_conformance_sequence_through_the_module_adapter() {
        let suite = conformance::load().unwrap();
        let count = conformance::run_sequences(
            &suite,
            |sequence| {
                Ok((
                    fixture(&suite, &sequence.bundle),
                    limits::CounterSet::default(),
                ))
            },
            |(gate, counters), case| observe(gate, case, &mut &*counters),
        )
        .unwrap_or_else(|report| panic!("{report}"));
        assert!(count > 0);
    }

    /// Counters that cannot be read: an allowed request on a limited route is refused.
    struct Broken;

    impl rate::Counters for Broken {
        fn charge(&mut self, _: &rate::Limit, _: u64) -> Option<rate::Admission> {
            None
        }
    }

    #[test]
    fn a_limited_request_the_host_cannot_count_is_503() {
        let suite = conformance::load().unwrap();
        let step = &suite.sequences[0].steps[0];
        let case = step.case(&suite.sequences[0], 0, suite.now);
        let seen = observe(&fixture(&suite, "limits"), &case, &mut Broken).unwrap();
        assert_eq!(
            (seen.status, seen.reason.as_deref()),
            (503, Some("internal"))
        );
    }

    #[test]
    fn no_gate_answers_503() {
        let mut envoy = FakeEnvoy::default();
        assert_eq!(
            on_request_headers(
                None,
                &mut envoy,
                Some(0),
                &mut FakeCounts::default(),
                &mut Broken
            ),
            Verdict::Answered
        );
        assert_eq!(envoy.response.map(|r| r.0), Some(503));
        assert_eq!(envoy.counted, [Reason::NoBundle]);
    }

    #[test]
    fn a_panic_in_the_hook_is_answered_503_and_never_unwinds() {
        let suite = conformance::load().unwrap();
        let gate = fixture(&suite, "main");
        let mut envoy = FakeEnvoy {
            panic_on_read: true,
            ..FakeEnvoy::default()
        };
        assert_eq!(
            on_request_headers(
                Some(&gate),
                &mut envoy,
                Some(suite.now),
                &mut FakeCounts::default(),
                &mut Broken,
            ),
            Verdict::Answered
        );
        let (status, headers, body) = envoy.response.unwrap();
        assert_eq!(status, 503);
        assert!(headers.iter().any(|(n, v)| n == "retry-after" && v == "5"));
        assert!(body.contains("temporarily_unavailable"));
        assert_eq!(envoy.counted, [Reason::Internal]);
    }

    /// A valid request whose headers cannot be changed (the credential would reach the
    /// upstream, the identity would be missing) and a clock that cannot be read: 503.
    #[test]
    fn a_refused_header_change_or_an_unreadable_clock_answers_503() {
        let suite = conformance::load().unwrap();
        let gate = fixture(&suite, "main");
        let valid = suite
            .cases
            .iter()
            .find(|c| c.expect.reason == "valid" && c.bundle == "main")
            .unwrap();
        let headers = headers_of(&valid.request);
        for (refuse_edits, now) in [(true, Some(valid.now)), (false, None)] {
            let mut envoy = FakeEnvoy {
                headers: headers.clone(),
                refuse_edits,
                ..FakeEnvoy::default()
            };
            assert_eq!(
                on_request_headers(
                    Some(&gate),
                    &mut envoy,
                    now,
                    &mut FakeCounts::default(),
                    &mut Broken
                ),
                Verdict::Answered
            );
            assert_eq!(envoy.response.map(|r| r.0), Some(503));
            assert_eq!(envoy.counted, [Reason::Internal]);
            assert!(envoy.recorded.unwrap().starts_with("reason=internal "));
        }
        // The same request with a working host passes (so the 503s above are the failures').
        let mut envoy = FakeEnvoy {
            headers,
            ..FakeEnvoy::default()
        };
        assert_eq!(
            on_request_headers(
                Some(&gate),
                &mut envoy,
                Some(valid.now),
                &mut FakeCounts::default(),
                &mut Broken,
            ),
            Verdict::Forward
        );
    }

    /// A usage read signed with the fixtures' key A for `environment` at `t`.
    fn usage_read(t: u64, environment: &str) -> Vec<(String, String)> {
        use ed25519_dalek::Signer;
        use sha2::Digest;
        let seed: [u8; 32] = sha2::Sha256::digest(b"tokengate conformance key A").into();
        let key = ed25519_dalek::SigningKey::from_bytes(&seed);
        let message = format!("tokengate.usage/v1\n{t}\n{environment}");
        let signature = tokengate_core::hex::encode(&key.sign(message.as_bytes()).to_bytes());
        let id = tokengate_core::keys::key_id(key.verifying_key().as_bytes());
        vec![
            (":method".to_owned(), "GET".to_owned()),
            (":path".to_owned(), usage::USAGE_PATH.to_owned()),
            (":authority".to_owned(), "gate".to_owned()),
            (
                "tokengate-signature".to_owned(),
                format!("t={t},{id}={signature}"),
            ),
        ]
    }

    /// A signed usage read is answered with the process's report, before any policy, and
    /// counts as no decision; an unsigned one is refused without the report being made.
    #[test]
    fn a_usage_read_is_answered_by_the_gate_only_when_signed() {
        let suite = conformance::load().unwrap();
        let gate = fixture(&suite, "main");
        let mut counts = FakeCounts::default();
        let mut envoy = FakeEnvoy {
            headers: usage_read(suite.now, &suite.environment),
            ..FakeEnvoy::default()
        };
        let verdict = on_request_headers(
            Some(&gate),
            &mut envoy,
            Some(suite.now),
            &mut counts,
            &mut Broken,
        );
        assert_eq!(verdict, Verdict::Answered);
        let (status, _, body) = envoy.response.unwrap();
        assert_eq!(status, 200, "{body}");
        assert!(body.contains("\"instance\":\"envoy-test\""));
        assert!(envoy.counted.is_empty() && envoy.tallied.is_empty());
        let mut unsigned = FakeEnvoy {
            headers: usage_read(suite.now, &suite.environment),
            ..FakeEnvoy::default()
        };
        unsigned.headers.pop();
        on_request_headers(
            Some(&gate),
            &mut unsigned,
            Some(suite.now),
            &mut counts,
            &mut Broken,
        );
        assert_eq!(unsigned.response.map(|r| r.0), Some(401));
        assert_eq!(counts.reports, 1);
        let mut limited = FakeEnvoy {
            headers: usage_read(suite.now, &suite.environment),
            ..FakeEnvoy::default()
        };
        let mut busy = FakeCounts {
            refuse_reads: true,
            ..FakeCounts::default()
        };
        on_request_headers(
            Some(&gate),
            &mut limited,
            Some(suite.now),
            &mut busy,
            &mut Broken,
        );
        assert_eq!(limited.response.map(|r| r.0), Some(429));
        assert_eq!(busy.reports, 0);
    }

    /// Every decision is offered to the usage tally, with the token it identified.
    #[test]
    fn each_decision_is_tallied_once() {
        let suite = conformance::load().unwrap();
        let valid = suite
            .cases
            .iter()
            .find(|c| c.expect.reason == "valid" && c.bundle == "main")
            .unwrap();
        let gate = fixture(&suite, "main");
        let mut envoy = FakeEnvoy {
            headers: headers_of(&valid.request),
            ..FakeEnvoy::default()
        };
        on_request_headers(
            Some(&gate),
            &mut envoy,
            Some(valid.now),
            &mut FakeCounts::default(),
            &mut Broken,
        );
        let token_id = valid
            .expect
            .upstream_headers
            .get("x-tokengate-token-id")
            .cloned();
        assert_eq!(envoy.tallied, vec![token_id]);
    }
}
