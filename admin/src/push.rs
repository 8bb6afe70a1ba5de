//! Getting a signed bundle to the gates.
//!
//! Envoy: the bundle travels as the filter's plugin configuration inside an ECDS resource
//! (a DiscoveryResponse holding one TypedExtensionConfig), written atomically — temp file
//! in the same directory, fsync, rename — so Envoy's file watch only ever sees whole files.
//!
//! Worker: `POST <url>/.well-known/tokengate/bundle` with `Tokengate-Signature:
//! t=<unix seconds>,v1=<hex HMAC-SHA256 of "t.body">`. A Worker applies at most a batch of KV
//! changes per request and answers 202 `{"applied","remaining"}`; the same bundle is sent
//! again, freshly signed, until it answers 200.

use std::io::Write;
use std::path::Path;

use anyhow::{Context, Result};
use tokengate_core::bundle::{self, Bundle};
use tokengate_core::{Expectation, Gate, SigningKey, Target};

use crate::store::{self, Actor, Store};

/// The ECDS resource name the gateway's filter chain refers to.
pub const FILTER_NAME: &str = "tokengate";

/// Writes `bytes` to `path` atomically.
pub fn write_atomically(path: &Path, bytes: &[u8]) -> Result<()> {
    let dir = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let name = path
        .file_name()
        .with_context(|| format!("{} is not a file path", path.display()))?
        .to_string_lossy();
    let temp = dir.join(format!(".{name}.tmp-{}", std::process::id()));
    let result = (|| -> Result<()> {
        let mut file =
            std::fs::File::create(&temp).with_context(|| format!("creating {}", temp.display()))?;
        file.write_all(bytes)?;
        file.sync_all()?;
        std::fs::rename(&temp, path)
            .with_context(|| format!("renaming onto {}", path.display()))?;
        Ok(())
    })();
    if result.is_err() {
        std::fs::remove_file(&temp).ok();
    }
    result
}

/// The ECDS DiscoveryResponse carrying `bundle_json` for the filter loaded from `wasm`.
/// Everything but `configuration` stays identical between pushes, so Envoy keeps the VM.
pub fn ecds_resource(bundle_json: &str, version: u64, wasm: &Path) -> serde_json::Value {
    serde_json::json!({
        "version_info": version.to_string(),
        "resources": [{
            "@type": "type.googleapis.com/envoy.config.core.v3.TypedExtensionConfig",
            "name": FILTER_NAME,
            "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.filters.http.wasm.v3.Wasm",
                "config": {
                    "name": FILTER_NAME,
                    "root_id": FILTER_NAME,
                    "failure_policy": "FAIL_CLOSED",
                    "configuration": {
                        "@type": "type.googleapis.com/google.protobuf.StringValue",
                        "value": bundle_json,
                    },
                    "vm_config": {
                        "vm_id": FILTER_NAME,
                        "runtime": "envoy.wasm.runtime.v8",
                        "environment_variables": {
                            "host_env_keys": ["TOKENGATE_SIGNING_KEY", "TOKENGATE_ENVIRONMENT"],
                        },
                        "code": { "local": { "filename": wasm.display().to_string() } },
                    },
                },
            },
        }],
    })
}

/// A bundle made earlier (`tokengate bundle --out`), checked exactly as the filter will.
pub fn prebuilt(store: &Store, key: &SigningKey, path: &Path) -> Result<Bundle> {
    let text = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    let environment = store.environment()?;
    let expect = Expectation {
        target: Target::Envoy,
        environment: Some(&environment),
        newer_than: store.pushed_version("envoy")?,
    };
    Gate::load(&text, key, &expect).map_err(|e| {
        anyhow::anyhow!(
            "{}: the filter would refuse this bundle: {e}",
            path.display()
        )
    })?;
    bundle::parse_verified(&text, key).map_err(|e| anyhow::anyhow!("{e}"))
}

/// Signs a new bundle for Envoy (or takes a prebuilt one), checks it as the filter will,
/// writes the ECDS file, and records the push; returns the version.
pub fn envoy(
    store: &mut Store,
    key: &SigningKey,
    file: &Path,
    wasm: &Path,
    prebuilt_bundle: Option<&Path>,
    now: u64,
    who: &Actor,
) -> Result<u64> {
    let wasm = std::fs::canonicalize(wasm).with_context(|| {
        format!(
            "the filter {} does not exist (build it: cargo build -p tokengate-plugin --target wasm32-wasip1 --release)",
            wasm.display()
        )
    })?;
    let bundle = match prebuilt_bundle {
        Some(path) => prebuilt(store, key, path)?,
        None => crate::issue_bundle(store, key, Target::Envoy, now, who)?,
    };
    let resource = ecds_resource(&bundle.to_json(), bundle.version, &wasm);
    let destination = file.display().to_string();
    let details = serde_json::json!({"version": bundle.version, "file": destination, "tokens": bundle.tokens.len()});
    store.transaction(who, "push.envoy", None, details, now, |tx| {
        write_atomically(file, serde_json::to_string_pretty(&resource)?.as_bytes())?;
        store::record_push(tx, "envoy", bundle.version, now, &destination)
    })?;
    Ok(bundle.version)
}

/// Requests one worker push may take before giving up (each applies up to ~900 changes).
const MAX_WORKER_ROUNDS: usize = 2_000;
/// The longest a worker push may take.
const WORKER_PUSH_DEADLINE: std::time::Duration = std::time::Duration::from_secs(30 * 60);

/// What a Worker answered.
#[derive(serde::Deserialize, Default)]
struct WorkerReply {
    #[serde(default)]
    applied: u64,
    #[serde(default)]
    remaining: u64,
    #[serde(default)]
    error: String,
    #[serde(default)]
    error_description: String,
}

/// Signs a new bundle for the Worker, checks it as the Worker will, sends it (again and
/// again while the Worker applies it in batches), and records the push; returns the version.
pub fn worker(
    store: &mut Store,
    key: &SigningKey,
    url: &str,
    now: u64,
    who: &Actor,
) -> Result<u64> {
    use std::io::IsTerminal;

    let endpoint = format!("{}/.well-known/tokengate/bundle", url.trim_end_matches('/'));
    if !(endpoint.starts_with("https://")
        || endpoint.starts_with("http://127.")
        || endpoint.starts_with("http://localhost"))
    {
        anyhow::bail!("--url must be https:// (plain http only to 127.0.0.1 or localhost)");
    }
    let bundle = crate::issue_bundle(store, key, Target::Worker, now, who)?;
    let body = bundle.to_json();
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .http_status_as_error(false)
        .timeout_global(Some(std::time::Duration::from_secs(120)))
        .build()
        .into();
    let tty = std::io::stderr().is_terminal();
    let started = std::time::Instant::now();
    for round in 1..=MAX_WORKER_ROUNDS {
        if started.elapsed() > WORKER_PUSH_DEADLINE {
            break;
        }
        let t = crate::time::now();
        let signature = key.sign_bytes(format!("{t}.{body}").as_bytes());
        let mut response = agent
            .post(&endpoint)
            .header("content-type", "application/json")
            .header("tokengate-signature", &format!("t={t},v1={signature}"))
            .send(body.as_bytes())
            .with_context(|| format!("sending the bundle to {endpoint}"))?;
        let status = response.status().as_u16();
        let retry_after = response
            .headers()
            .get("retry-after")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(1);
        let text = response.body_mut().read_to_string().unwrap_or_default();
        let reply: WorkerReply = serde_json::from_str(&text).unwrap_or_default();
        match status {
            200 => {
                if tty {
                    eprintln!();
                }
                let destination = url.to_owned();
                let details = serde_json::json!({"version": bundle.version, "url": destination, "tokens": bundle.tokens.len(), "requests": round});
                store.transaction(who, "push.worker", None, details, now, |tx| {
                    store::record_push(tx, "worker", bundle.version, now, &destination)
                })?;
                return Ok(bundle.version);
            }
            202 => {
                let total = reply.applied + reply.remaining;
                let done = total - reply.remaining;
                let width = 30usize;
                let filled = if total == 0 {
                    width
                } else {
                    (done as usize * width) / total.max(1) as usize
                };
                let bar = format!(
                    "[{}{}] {done}/{total} changes applied",
                    "#".repeat(filled),
                    ".".repeat(width - filled)
                );
                if tty {
                    eprint!("\r{bar}");
                } else {
                    eprintln!("{bar}");
                }
                std::thread::sleep(std::time::Duration::from_secs(retry_after.min(10)));
            }
            _ => {
                let what = if reply.error.is_empty() {
                    text.chars().take(200).collect::<String>()
                } else {
                    format!("{}: {}", reply.error, reply.error_description)
                };
                anyhow::bail!("the Worker refused the push (HTTP {status}): {what}");
            }
        }
    }
    anyhow::bail!("the Worker had not applied version {} after {MAX_WORKER_ROUNDS} requests or {} minutes; run the push again", bundle.version, WORKER_PUSH_DEADLINE.as_secs() / 60)
}
