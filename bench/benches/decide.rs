//! Criterion benchmarks of one decision, run by `bench/run.sh` (or `cargo bench -p tokengate-bench`):
//!
//! - `native/<case>/<tokens>`: `Gate::decide` on the host CPU, for a valid token, a well-formed
//!   unknown one (hash + lookup miss) and one failing its checksum (no hash, no lookup),
//!   with 10 and 100,000 tokens in the gate;
//! - `wasmtime/<filter>-<case>/<tokens>`: one request through the built `.wasm` under the
//!   embedded wasmtime host (host-tests): context create, `on_request_headers`, done, log,
//!   delete; so it includes the proxy-wasm ABI (header copies, properties, metrics) and
//!   the host's own bookkeeping, and fuel metering (on in that host). `floor` is the minimal
//!   filter of bench/floor-filter, the floor of any wasm filter.
//! - `parts/<step>/100000`: the steps of a valid decision on their own (where the time goes);
//! - `load/<step>/100000`: what a reload costs, natively: the envelope opened and its Ed25519
//!   signature checked over the payload's bytes as received, the payload read whole with serde,
//!   the index build, and the whole streamed load; and `wasmtime/configure/<tokens>` in the VM.
//!
//! Needs both `.wasm` files built (bench/run.sh builds them).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // a failed setup is the report

use std::hint::black_box;
use std::path::Path;
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, BatchSize, BenchmarkId, Criterion};
use tokengate_bench::{
    bad_checksum_token, bundle_json, envoy_headers, public_key_hex, token, unknown_token,
    ENVIRONMENT, NOW,
};
use tokengate_core::bundle::Envelope;
use tokengate_core::decision::header_refs;
use tokengate_core::token::{shape, TokenHash};
use tokengate_core::{
    credentials, policy, Bundle, Expectation, Gate, KeySet, Request, Step, Target,
};
use tokengate_host_tests::{filter_path, Host, Vm};

const SIZES: [u64; 2] = [10, 100_000];

fn cases() -> [(&'static str, String); 3] {
    [
        ("valid", token(7)),
        ("unknown", unknown_token()),
        ("checksum", bad_checksum_token()),
    ]
}

fn trusted() -> KeySet {
    KeySet::parse(&public_key_hex()).unwrap()
}

fn gate(json: &str) -> Gate {
    let key = trusted();
    let expect = Expectation {
        target: Target::Envoy,
        environment: Some(ENVIRONMENT),
        newer_than: None,
    };
    Gate::load(json.as_bytes(), &key, &expect).unwrap()
}

/// The benchmarked request: `GET /api/orders/1` on `api.internal` with these headers.
fn orders_request<'a>(headers: &'a [(&'a str, &'a str)]) -> Request<'a> {
    Request {
        method: "GET",
        path: "/api/orders/1",
        authority: "api.internal",
        headers,
    }
}

fn native(c: &mut Criterion) {
    let mut group = c.benchmark_group("native");
    for n in SIZES {
        let gate = gate(&bundle_json(n, 1));
        for (case, credential) in cases() {
            let headers = envoy_headers(&credential);
            let headers = header_refs(&headers);
            let request = orders_request(&headers);
            // Sanity: the case is what its name says.
            let reason = gate.decide(&request, NOW).reason.as_str();
            assert_eq!(reason, case, "{case} with {n} tokens");
            group.bench_with_input(BenchmarkId::new(case, n), &request, |b, request| {
                b.iter(|| gate.decide(black_box(request), NOW))
            });
        }
    }
    group.finish();
}

/// Where a valid decision's time goes, natively: each step `decide` takes, on its own.
fn parts(c: &mut Criterion) {
    let n = 100_000;
    let gate = gate(&bundle_json(n, 1));
    let valid = token(7);
    let headers = envoy_headers(&valid);
    let headers = header_refs(&headers);
    let request = orders_request(&headers);
    let hash = TokenHash::of(valid.as_bytes());
    let mut group = c.benchmark_group("parts");
    group.bench_function(BenchmarkId::new("decide", n), |b| {
        b.iter(|| gate.decide(black_box(&request), NOW))
    });
    group.bench_function(BenchmarkId::new("begin-to-lookup", n), |b| {
        b.iter(|| matches!(gate.begin(black_box(&request), NOW), Step::Lookup(_)))
    });
    group.bench_function(BenchmarkId::new("token-shape-crc", n), |b| {
        b.iter(|| shape(black_box(&valid)))
    });
    group.bench_function(BenchmarkId::new("sha256", n), |b| {
        b.iter(|| TokenHash::of(black_box(valid.as_bytes())))
    });
    group.bench_function(BenchmarkId::new("index-lookup", n), |b| {
        b.iter(|| gate.record(black_box(&hash)).is_some())
    });
    group.bench_function(BenchmarkId::new("normalize-path", n), |b| {
        b.iter(|| policy::normalize_path(black_box("/api/orders/1")))
    });
    group.bench_function(BenchmarkId::new("credentials-find", n), |b| {
        b.iter(|| credentials::find(gate.sources(), black_box(&headers), None))
    });
    group.finish();
}

fn wasm_headers(credential: &str) -> Vec<(String, Vec<u8>)> {
    envoy_headers(credential)
        .into_iter()
        .map(|(n, v)| (n, v.into_bytes()))
        .collect()
}

fn floor_path() -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/wasm32-wasip1/release/floor_filter.wasm")
}

fn tokengate_vm(host: &Host, config: &str) -> Vm {
    let key = public_key_hex();
    let mut vm = host
        .start(&[
            ("TOKENGATE_TRUSTED_KEYS", key.as_str()),
            ("TOKENGATE_ENVIRONMENT", ENVIRONMENT),
        ])
        .unwrap();
    assert!(vm.configure(config.as_bytes()).unwrap(), "{:?}", vm.logs());
    vm
}

/// Wasm instructions per request (wasmtime fuel): deterministic, so the ratios between the
/// filters hold on any machine. Written to target/bench/fuel.json for bench/report.py.
fn record_fuel(host: &Host, floor: &Host, now_nanos: u64) {
    let mut fuel = serde_json::Map::new();
    for n in SIZES {
        let mut vm = tokengate_vm(host, &bundle_json(n, 1));
        // The guest's linear memory after the load, and after a reload (the old gate serves
        // until the new one is built): wasm memory never shrinks, so these stay resident.
        let loaded = vm.memory_bytes().unwrap();
        assert!(vm.configure(bundle_json(n, 2).as_bytes()).unwrap());
        fuel.insert(format!("memory-load-{n}"), loaded.into());
        fuel.insert(
            format!("memory-reload-{n}"),
            vm.memory_bytes().unwrap().into(),
        );
        for (case, credential) in cases() {
            let spent = vm
                .request(wasm_headers(&credential), now_nanos)
                .unwrap()
                .fuel;
            fuel.insert(format!("tokengate-{case}-{n}"), spent.into());
        }
    }
    let valid = token(7);
    for (mode, config) in [
        ("floor", valid.clone()),
        ("floor-abi", format!("abi {valid}")),
    ] {
        let mut vm = floor.start(&[]).unwrap();
        assert!(vm.configure(config.as_bytes()).unwrap());
        let exchange = vm.request(wasm_headers(&valid), now_nanos).unwrap();
        assert!(
            exchange.local_response.is_none(),
            "{mode}: the valid token passes"
        );
        fuel.insert(format!("{mode}-valid"), exchange.fuel.into());
    }
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/bench");
    std::fs::create_dir_all(&dir).unwrap();
    let text = serde_json::to_string_pretty(&fuel).unwrap();
    std::fs::write(dir.join("fuel.json"), text).unwrap();
}

fn wasmtime(c: &mut Criterion) {
    let host = Host::load(&filter_path()).unwrap();
    let floor = Host::load(&floor_path()).unwrap();
    let now_nanos = NOW * 1_000_000_000;
    record_fuel(&host, &floor, now_nanos);
    let mut group = c.benchmark_group("wasmtime");
    for n in SIZES {
        let json = bundle_json(n, 1);
        let mut vm = tokengate_vm(&host, &json);
        for (case, credential) in cases() {
            let headers = wasm_headers(&credential);
            let status = vm.request(headers.clone(), now_nanos).unwrap();
            let passed = status.local_response.is_none();
            assert_eq!(passed, case == "valid", "{case} with {n} tokens");
            group.bench_with_input(
                BenchmarkId::new(format!("tokengate-{case}"), n),
                &headers,
                |b, headers| {
                    b.iter_batched(
                        || headers.clone(),
                        |h| vm.request(h, now_nanos).unwrap(),
                        BatchSize::SmallInput,
                    )
                },
            );
        }
    }
    let mut vm = floor.start(&[]).unwrap();
    let valid = token(7);
    assert!(vm.configure(valid.as_bytes()).unwrap());
    for (case, credential) in [("valid", valid.clone()), ("unknown", unknown_token())] {
        let headers = wasm_headers(&credential);
        let passed = vm
            .request(headers.clone(), now_nanos)
            .unwrap()
            .local_response
            .is_none();
        assert_eq!(passed, case == "valid");
        group.bench_with_input(
            BenchmarkId::new(format!("floor-{case}"), 1),
            &headers,
            |b, headers| {
                b.iter_batched(
                    || headers.clone(),
                    |h| vm.request(h, now_nanos).unwrap(),
                    BatchSize::SmallInput,
                )
            },
        );
    }
    group.finish();
}

fn load(c: &mut Criterion) {
    let n = 100_000;
    let json = bundle_json(n, 1);
    let key = trusted();
    let expect = Expectation {
        target: Target::Envoy,
        environment: Some(ENVIRONMENT),
        newer_than: None,
    };
    let mut group = c.benchmark_group("load");
    group.sample_size(10);
    // The parts of a load: the Ed25519 check over the payload's bytes as received, the
    // payload read whole with serde (the CLI's way), and the whole load (records streamed
    // into the table).
    group.bench_function(BenchmarkId::new("envelope-ed25519", n), |b| {
        b.iter(|| Envelope::open(json.as_bytes(), &key).unwrap())
    });
    let envelope = Envelope::open(json.as_bytes(), &key).unwrap();
    group.bench_function(BenchmarkId::new("payload-serde-whole", n), |b| {
        b.iter(|| {
            envelope
                .payload::<Vec<tokengate_core::TokenRecord>>()
                .unwrap()
        })
    });
    let (parsed, _) = envelope
        .payload::<Vec<tokengate_core::TokenRecord>>()
        .unwrap();
    group.bench_function(BenchmarkId::new("index-build", n), |b| {
        b.iter_batched(
            || parsed.clone(),
            |bundle: Bundle| Gate::from_bundle(bundle).unwrap(),
            BatchSize::LargeInput,
        )
    });
    group.bench_function(BenchmarkId::new("total", n), |b| {
        b.iter(|| Gate::load(json.as_bytes(), &key, &expect).unwrap())
    });
    group.finish();

    // The same load inside the filter, under wasmtime: a fresh VM each time (not timed).
    let host = Host::load(&filter_path()).unwrap();
    let mut group = c.benchmark_group("wasmtime-configure");
    group.sample_size(10);
    for n in SIZES {
        let json = bundle_json(n, 1);
        let key = public_key_hex();
        let env = [
            ("TOKENGATE_TRUSTED_KEYS", key.as_str()),
            ("TOKENGATE_ENVIRONMENT", ENVIRONMENT),
        ];
        group.bench_function(BenchmarkId::new("configure", n), |b| {
            b.iter_custom(|iterations| {
                let mut total = Duration::ZERO;
                for _ in 0..iterations {
                    let mut vm = host.start(&env).unwrap();
                    let start = Instant::now();
                    assert!(vm.configure(json.as_bytes()).unwrap());
                    total += start.elapsed();
                }
                total
            })
        });
    }
    group.finish();
}

fn config() -> Criterion {
    Criterion::default()
        .sample_size(30)
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(2))
        .without_plots()
}

/// Signed tokens (JWTs) against an opaque token, natively: an EdDSA token the gate has not
/// seen (a clone of the gate starts with nothing remembered, so each iteration verifies the
/// Ed25519 signature), the same token again (its signature remembered), and HS256.
fn signed(c: &mut Criterion) {
    use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
    use base64::Engine as _;
    use ed25519_dalek::{Signer, SigningKey};
    use hmac::Mac;
    let issuer = SigningKey::from_bytes(&[0x1e; 32]);
    let secret = [0x2d; 32];
    let opaque = token(7);
    let bundle: Bundle = serde_json::from_value(serde_json::json!({
        "version": 1, "issued_at": NOW, "environment": ENVIRONMENT, "target": "envoy",
        "keys": [public_key_hex()],
        "policy": {"rules": [{"name": "api", "path": {"prefix": "/api"}, "access": "token",
                               "all_of": ["orders:read"]}]},
        "credentials": {"sources": ["bearer"]},
        "tokens": [{"name": "svc", "hash": TokenHash::of(opaque.as_bytes()).to_hex(),
                    "scopes": ["orders:read"], "created_at": NOW - 60}],
        "issuers": [
            {"kid": "ci", "alg": "EdDSA", "scopes": ["orders:*"], "max_lifetime": 3600,
             "public_key": tokengate_core::hex::encode(issuer.verifying_key().as_bytes())},
            {"kid": "legacy", "alg": "HS256", "scopes": ["orders:*"], "max_lifetime": 3600}]
    }))
    .unwrap();
    let mut gate = Gate::from_bundle(bundle).unwrap();
    let secrets = format!("legacy={}", B64.encode(secret));
    gate.set_issuer_secrets(Some(&secrets));
    assert_eq!(gate.issuer_secret_warnings(), Vec::<String>::new());
    let claims = serde_json::json!({"sub": "deploy-job", "jti": "AAAAAAAAAAAAAAAAAAAAAA",
        "scope": "orders:read", "iat": NOW, "exp": NOW + 1800});
    let jwt = |alg: &str, kid: &str| {
        let header = serde_json::json!({"alg": alg, "kid": kid, "typ": "JWT"});
        let input = format!(
            "{}.{}",
            B64.encode(header.to_string()),
            B64.encode(claims.to_string())
        );
        let signature = match alg {
            "EdDSA" => issuer.sign(input.as_bytes()).to_bytes().to_vec(),
            _ => {
                let mut mac = hmac::Hmac::<sha2::Sha256>::new_from_slice(&secret).unwrap();
                mac.update(input.as_bytes());
                mac.finalize().into_bytes().to_vec()
            }
        };
        format!("{input}.{}", B64.encode(signature))
    };
    let mut group = c.benchmark_group("signed");
    for (case, credential) in [
        ("opaque", opaque.clone()),
        ("eddsa-remembered", jwt("EdDSA", "ci")),
        ("hs256", jwt("HS256", "legacy")),
    ] {
        let headers = envoy_headers(&credential);
        let headers = header_refs(&headers);
        let request = orders_request(&headers);
        assert_eq!(gate.decide(&request, NOW).status(), 200, "{case}");
        group.bench_function(case, |b| b.iter(|| gate.decide(black_box(&request), NOW)));
    }
    let eddsa = jwt("EdDSA", "ci");
    let headers = envoy_headers(&eddsa);
    let headers = header_refs(&headers);
    let request = orders_request(&headers);
    group.bench_function("eddsa-first", |b| {
        b.iter_batched(
            || gate.clone(),
            |fresh| fresh.decide(black_box(&request), NOW),
            BatchSize::SmallInput,
        )
    });
    group.finish();
}

criterion_group! {
    name = benches;
    config = config();
    targets = native, parts, signed, wasmtime, load
}
criterion_main!(benches);
