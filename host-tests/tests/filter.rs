//! The built filter under the embedded host: every conformance vector, every refusal, and
//! the fail-closed paths. Build the filter first:
//! `cargo build -p tokengate-plugin --target wasm32-wasip1 --release`.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // test helpers: a failure is the report

use std::collections::HashMap;
use std::sync::OnceLock;

use tokengate_conformance::{self as conformance, Case, Observed, Suite};
use tokengate_host_tests::{filter_path, Action, Exchange, Host, SharedData, Vm};

fn host() -> &'static Host {
    static HOST: OnceLock<Host> = OnceLock::new();
    HOST.get_or_init(|| Host::load(&filter_path()).unwrap_or_else(|e| panic!("{e:#}")))
}

fn suite() -> &'static Suite {
    static SUITE: OnceLock<Suite> = OnceLock::new();
    SUITE.get_or_init(|| conformance::load().unwrap())
}

/// The VM environment as `push envoy` writes it: the trusted public keys, comma-joined.
fn trusted() -> String {
    suite().trusted_keys.join(",")
}

/// The VM environment of the conformance runs: the keys, the environment and the HS256
/// issuers' secrets, as `host_env_keys` carries them from Envoy's environment.
fn vm(keys: &str) -> Vm {
    host()
        .start(&[
            ("TOKENGATE_TRUSTED_KEYS", keys),
            ("TOKENGATE_ENVIRONMENT", &suite().environment),
            ("TOKENGATE_ISSUER_SECRETS", &suite().issuer_secrets),
        ])
        .unwrap()
}

fn configured(bundle: &str) -> Vm {
    let mut vm = vm(&trusted());
    let text = suite().bundle_text(bundle, "envoy").unwrap();
    assert!(
        vm.configure(text.as_bytes()).unwrap(),
        "fixture {bundle} refused: {:?}",
        vm.logs()
    );
    vm
}

const SECOND: u64 = 1_000_000_000;

fn headers(case: &Case) -> Vec<(String, Vec<u8>)> {
    let r = &case.request;
    let mut headers = vec![
        (":method".to_owned(), r.method.as_bytes().to_vec()),
        (":path".to_owned(), r.path.as_bytes().to_vec()),
        (":authority".to_owned(), r.authority.as_bytes().to_vec()),
    ];
    headers.extend(
        r.headers
            .iter()
            .map(|(n, v)| (n.to_ascii_lowercase(), v.as_bytes().to_vec())),
    );
    headers
}

fn observe(exchange: &Exchange) -> Observed {
    let text = |v: &[u8]| String::from_utf8_lossy(v).into_owned();
    // The one property the access log and the RBAC guard read: `reason=… subject=… …`.
    let logged = exchange
        .properties
        .get("tokengate")
        .cloned()
        .unwrap_or_default();
    let field = |name: &str| {
        logged
            .split(' ')
            .find_map(|f| f.strip_prefix(name)?.strip_prefix('='))
            .map(str::to_owned)
    };
    assert!(logged.starts_with("reason="), "property: {logged:?}");
    let reason = field("reason");
    match &exchange.local_response {
        Some(response) => {
            assert_eq!(
                exchange.action,
                Action::Pause,
                "a local response must stop the request"
            );
            Observed {
                status: u16::try_from(response.status).unwrap(),
                reason,
                response_headers: response.headers.clone(),
                body: text(&response.body),
                upstream_headers: None,
                upstream_path: None,
            }
        }
        None => {
            assert_eq!(exchange.action, Action::Continue);
            let upstream: Vec<(String, String)> = exchange
                .forwarded
                .iter()
                .filter(|(n, _)| !n.starts_with(':'))
                .map(|(n, v)| (n.clone(), text(v)))
                .collect();
            // The access log names whom the upstream was told about, and only them.
            let told = |header: &str| {
                upstream
                    .iter()
                    .find(|(n, _)| n == header)
                    .map_or("-".to_owned(), |(_, v)| v.clone())
            };
            assert_eq!(
                field("subject"),
                Some(told("x-tokengate-subject")),
                "{logged}"
            );
            assert_eq!(
                field("token_id"),
                Some(told("x-tokengate-token-id")),
                "{logged}"
            );
            let path = exchange
                .forwarded
                .iter()
                .find(|(n, _)| n == ":path")
                .map(|(_, v)| text(v));
            Observed {
                status: 200,
                reason,
                response_headers: Vec::new(),
                body: String::new(),
                upstream_headers: Some(upstream),
                upstream_path: path,
            }
        }
    }
}

#[test]
fn every_vector_passes_in_the_built_filter() {
    let suite = suite();
    let mut vms: HashMap<String, Vm> = HashMap::new();
    let count = conformance::run_all(suite, |case| {
        let vm = vms
            .entry(case.bundle.clone())
            .or_insert_with(|| configured(&case.bundle));
        let counter = |vm: &Vm| {
            let outcome = if case.expect.status == 200 {
                "allowed"
            } else {
                "denied"
            };
            vm.metric(&format!("tokengate.{outcome}.{}", case.expect.reason))
                .unwrap_or(0)
        };
        let before = counter(vm);
        let exchange = vm
            .request(headers(case), case.now * SECOND + SECOND / 2)
            .map_err(|e| format!("{e:#}"))?;
        if counter(vm) != before + 1 {
            return Err(format!("counter for {} did not move", case.expect.reason));
        }
        Ok(observe(&exchange))
    })
    .unwrap_or_else(|report| panic!("{report}"));
    println!("{count} conformance cases passed in the built filter");

    // No token, and no credential of any case, ever reaches a log.
    for vm in vms.values() {
        for (_, line) in vm.logs() {
            for case in &suite.cases {
                for (_, value) in &case.request.headers {
                    let secret = value.trim_start_matches("Bearer ").trim();
                    assert!(
                        secret.len() < 16 || !line.contains(secret),
                        "a credential was logged: {line}"
                    );
                }
            }
        }
    }
}

/// Envoy applies an update only if a fresh "canary" VM accepts it; the worker VMs then keep
/// or replace what they serve. Every refusal must be refused by the canary; a worker VM that
/// already serves a bundle keeps serving it.
#[test]
fn every_refusal_is_refused_and_the_previous_bundle_keeps_serving() {
    let suite = suite();
    let valid = suite
        .cases
        .iter()
        .find(|c| c.name == "valid bearer token passes with identity headers")
        .unwrap();
    for refusal in &suite.refusals {
        let keys = suite.trusted_for(refusal).join(",");
        let env = [
            ("TOKENGATE_TRUSTED_KEYS", keys.as_str()),
            ("TOKENGATE_ENVIRONMENT", suite.environment.as_str()),
        ];
        let shared = SharedData::default();
        let mut worker = host().start_shared(&env, &shared).unwrap();
        if let Some(serving) = &refusal.serving {
            let text = suite.bundle_text(serving, "envoy").unwrap();
            assert!(worker.configure(text.as_bytes()).unwrap());
        }
        let mut canary = host().start_shared(&env, &shared).unwrap();
        assert!(
            !canary
                .configure(refusal.bundle["envoy"].as_bytes())
                .unwrap(),
            "{} was accepted",
            refusal.name
        );
        assert_eq!(
            canary.metric("tokengate.bundle.refused"),
            Some(1),
            "{}",
            refusal.name
        );
        let logged = canary
            .logs()
            .iter()
            .any(|(level, l)| *level >= 4 && l.contains("bundle refused"));
        assert!(
            logged,
            "{}: the refusal was not logged: {:?}",
            refusal.name,
            canary.logs()
        );
        if let Some(serving) = &refusal.serving {
            // Forced onto a worker VM anyway, it keeps the bundle it serves.
            worker
                .configure(refusal.bundle["envoy"].as_bytes())
                .unwrap();
            let exchange = worker.request(headers(valid), valid.now * SECOND).unwrap();
            let status = exchange.local_response.map_or(200, |r| r.status);
            // The revoke-all bundle keeps serving: the main bundle's token is unknown there.
            assert_eq!(status, 401, "{}: the bundle served changed", refusal.name);
            assert_eq!(
                worker.metric("tokengate.bundle.version"),
                Some(suite.bundle_version(serving))
            );
        }
    }
}

#[test]
fn a_newer_bundle_replaces_the_old_one_and_the_gauge_follows() {
    let suite = suite();
    let mut vm = configured("main");
    assert_eq!(
        vm.metric("tokengate.bundle.version"),
        Some(suite.bundle_version("main"))
    );
    let newer = suite.bundle_text("revoke-all", "envoy").unwrap();
    assert!(vm.configure(newer.as_bytes()).unwrap());
    assert_eq!(
        vm.metric("tokengate.bundle.version"),
        Some(suite.bundle_version("revoke-all"))
    );
    // Replaying the older bundle is a rollback: refused, and the newer one keeps serving.
    let main = suite.bundle_text("main", "envoy").unwrap();
    vm.configure(main.as_bytes()).unwrap();
    assert_eq!(vm.metric("tokengate.bundle.refused"), Some(1));
    assert_eq!(
        vm.metric("tokengate.bundle.version"),
        Some(suite.bundle_version("revoke-all"))
    );
}

/// Envoy configures every update first in a fresh "canary" VM, then in each worker's VM.
/// The canary must refuse a rollback exactly as the workers do, or Envoy would commit an
/// update the workers refuse and drop the filter.
#[test]
fn a_fresh_vm_sharing_data_refuses_a_rollback_and_accepts_the_bundle_served() {
    let suite = suite();
    let keys = trusted();
    let env = [
        ("TOKENGATE_TRUSTED_KEYS", keys.as_str()),
        ("TOKENGATE_ENVIRONMENT", suite.environment.as_str()),
    ];
    let shared = SharedData::default();
    let newer = suite.bundle_text("revoke-all", "envoy").unwrap();
    let older = suite.bundle_text("main", "envoy").unwrap();
    let mut worker = host().start_shared(&env, &shared).unwrap();
    assert!(worker.configure(newer.as_bytes()).unwrap());
    let mut canary = host().start_shared(&env, &shared).unwrap();
    assert!(
        !canary.configure(older.as_bytes()).unwrap(),
        "the canary accepted a rollback"
    );
    assert!(
        !canary.configure(b"").unwrap(),
        "an empty configuration replaced a bundle"
    );
    let mut second_worker = host().start_shared(&env, &shared).unwrap();
    assert!(
        second_worker.configure(newer.as_bytes()).unwrap(),
        "a worker VM must load the bundle served"
    );
}

#[test]
fn no_bundle_yet_fails_closed_with_503() {
    let mut vm = vm(&trusted());
    assert!(
        vm.configure(b"").unwrap(),
        "an empty configuration is the pre-push default"
    );
    let case = &suite().cases[0];
    let exchange = vm.request(headers(case), case.now * SECOND).unwrap();
    let response = exchange.local_response.expect("must not pass through");
    assert_eq!(response.status, 503);
    assert!(response.headers.iter().any(|(n, _)| n == "retry-after"));
    assert_eq!(vm.metric("tokengate.denied.no_bundle"), Some(1));
}

#[test]
fn missing_or_malformed_trusted_keys_refuse_every_bundle() {
    let main = suite().bundle_text("main", "envoy").unwrap();
    let mut no_key = host()
        .start(&[("TOKENGATE_ENVIRONMENT", "conformance")])
        .unwrap();
    assert!(!no_key.configure(main.as_bytes()).unwrap());
    let mut bad_key = vm("not-hex");
    assert!(!bad_key.configure(main.as_bytes()).unwrap());
    let mut no_env = host()
        .start(&[("TOKENGATE_TRUSTED_KEYS", &trusted())])
        .unwrap();
    assert!(!no_env.configure(main.as_bytes()).unwrap());
}

#[test]
fn invalid_utf8_in_a_header_is_a_denial_not_a_crash() {
    let mut vm = configured("main");
    let case = &suite().cases[0];
    let mut headers = headers(case);
    headers[1].1 = b"/api/orders/1".to_vec();
    headers.push(("x-internal-token".to_owned(), vec![0xff, 0xfe, b'a', 0x80]));
    let exchange = vm.request(headers, case.now * SECOND).unwrap();
    assert_eq!(exchange.local_response.map(|r| r.status), Some(401));
}

/// A usage read of `environment` at `t`, signed with the conformance fixtures' key A (the
/// key their bundles publish) unless `signed` is false.
fn usage_read(t: u64, environment: &str, signed: bool) -> Vec<(String, Vec<u8>)> {
    use ed25519_dalek::Signer;
    use sha2::Digest;
    let seed: [u8; 32] = sha2::Sha256::digest(b"tokengate conformance key A").into();
    let key = ed25519_dalek::SigningKey::from_bytes(&seed);
    let message = format!("tokengate.usage/v1\n{t}\n{environment}");
    let signature: String = key
        .sign(message.as_bytes())
        .to_bytes()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    let id: String = sha2::Sha256::digest(key.verifying_key().as_bytes())[..8]
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    let mut headers = vec![
        (":method".to_owned(), b"GET".to_vec()),
        (":path".to_owned(), b"/.well-known/tokengate/usage".to_vec()),
        (":authority".to_owned(), b"gate".to_vec()),
    ];
    if signed {
        let value = format!("t={t},kid_{id}={signature}");
        headers.push(("tokengate-signature".to_owned(), value.into_bytes()));
    }
    headers
}

/// Two VMs of one Envoy process (shared data in common): what one VM counted reaches a read
/// served by the other after its tick; a read counts once however often it is made; an
/// unsigned or stale read is refused.
#[test]
fn usage_counted_by_every_vm_reaches_a_signed_read_on_any_of_them() {
    let shared = SharedData::default();
    let environment = [
        ("TOKENGATE_TRUSTED_KEYS", trusted()),
        ("TOKENGATE_ENVIRONMENT", suite().environment.clone()),
    ];
    let environment: Vec<(&str, &str)> =
        environment.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let bundle = suite().bundle_text("main", "envoy").unwrap();
    let mut vms: Vec<Vm> = (0..2)
        .map(|_| {
            let mut vm = host().start_shared(&environment, &shared).unwrap();
            assert!(vm.configure(bundle.as_bytes()).unwrap());
            vm
        })
        .collect();
    let valid = suite()
        .cases
        .iter()
        .find(|c| c.bundle == "main" && c.expect.reason == "valid")
        .unwrap();
    let token_id = valid.expect.upstream_headers["x-tokengate-token-id"].clone();
    let now = valid.now;
    for _ in 0..3 {
        let exchange = vms[0].request(headers(valid), now * SECOND).unwrap();
        assert_eq!(exchange.action, Action::Continue);
    }
    vms[1].request(headers(valid), now * SECOND).unwrap();
    let read = |vm: &mut Vm| {
        let exchange = vm
            .request(usage_read(now, &suite().environment, true), now * SECOND)
            .unwrap();
        let response = exchange
            .local_response
            .expect("a usage read is answered by the gate");
        let body = String::from_utf8_lossy(&response.body).into_owned();
        assert_eq!(response.status, 200, "{body}");
        let report: serde_json::Value = serde_json::from_str(&body).unwrap();
        assert_eq!(report["environment"], suite().environment.as_str());
        report["tokens"]
            .as_array()
            .unwrap()
            .iter()
            .find(|t| t["token_id"] == token_id.as_str())
            .map_or(0, |t| t["allowed"].as_u64().unwrap())
    };
    // VM 0 has not flushed: a read on VM 1 sees VM 1's own request only.
    assert_eq!(read(&mut vms[1]), 1);
    vms[0].tick().unwrap();
    assert_eq!(read(&mut vms[1]), 4);
    assert_eq!(read(&mut vms[0]), 4, "reading again counts nothing twice");
    for (t, signed, status) in [(now, false, 401), (now - 301, true, 401), (now, true, 200)] {
        let exchange = vms[0]
            .request(usage_read(t, &suite().environment, signed), now * SECOND)
            .unwrap();
        assert_eq!(
            exchange.local_response.map(|r| r.status),
            Some(status),
            "t={t} signed={signed}"
        );
    }
    let other = vms[0]
        .request(usage_read(now, "elsewhere", true), now * SECOND)
        .unwrap();
    assert_eq!(other.local_response.map(|r| r.status), Some(401));
}

/// Anyone can send a usage read, and checking its signature is costly: past 10 a second a VM
/// answers 429 without checking; the next second it checks again.
#[test]
fn usage_reads_past_ten_a_second_are_refused_unchecked() {
    let mut vm = configured("main");
    let now = suite().cases[0].now;
    let statuses: Vec<u32> = (0..12)
        .map(|_| {
            let read = usage_read(now, &suite().environment, true);
            let exchange = vm.request(read, now * SECOND).unwrap();
            exchange.local_response.map_or(0, |r| r.status)
        })
        .collect();
    assert_eq!(statuses[..10], [200; 10]);
    assert_eq!(statuses[10..], [429, 429]);
    let later = vm.request(
        usage_read(now + 1, &suite().environment, true),
        (now + 1) * SECOND,
    );
    assert_eq!(later.unwrap().local_response.map(|r| r.status), Some(200));
}

/// Every rate-limit sequence, its steps sent in turn to two VMs that share data, as Envoy's
/// worker threads do: a limit is counted once per process, not per VM.
#[test]
fn every_sequence_passes_across_two_vms_of_one_process() {
    let suite = suite();
    let count = conformance::run_sequences(
        suite,
        |sequence| {
            let shared = SharedData::default();
            let text = suite.bundle_text(&sequence.bundle, "envoy")?;
            let mut vms = Vec::new();
            for _ in 0..2 {
                let mut vm = host()
                    .start_shared(
                        &[
                            ("TOKENGATE_TRUSTED_KEYS", trusted().as_str()),
                            ("TOKENGATE_ENVIRONMENT", suite.environment.as_str()),
                            ("TOKENGATE_ISSUER_SECRETS", suite.issuer_secrets.as_str()),
                        ],
                        &shared,
                    )
                    .map_err(|e| format!("{e:#}"))?;
                if !vm
                    .configure(text.as_bytes())
                    .map_err(|e| format!("{e:#}"))?
                {
                    return Err(format!("fixture {} refused", sequence.bundle));
                }
                vms.push(vm);
            }
            Ok((vms, 0usize))
        },
        |(vms, turn), case| {
            let vm = &mut vms[*turn % 2];
            *turn += 1;
            let limited = vm.metric("tokengate.denied.rate_limited").unwrap_or(0);
            let exchange = vm
                .request(headers(case), case.now * SECOND + SECOND / 2)
                .map_err(|e| format!("{e:#}"))?;
            let moved = vm.metric("tokengate.denied.rate_limited").unwrap_or(0) - limited;
            if moved != u64::from(case.expect.status == 429) {
                return Err(format!("tokengate.denied.rate_limited moved {moved}"));
            }
            Ok(observe(&exchange))
        },
    )
    .unwrap_or_else(|report| panic!("{report}"));
    let limited = suite
        .sequences
        .iter()
        .flat_map(|s| &s.steps)
        .filter(|step| step.expect.status == 429)
        .count();
    assert!(
        count > 0 && limited > 0,
        "{count} steps, {limited} of them 429"
    );
    println!("{count} sequence steps ({limited} refused 429) passed across two VMs");
}
