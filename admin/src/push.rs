//! Getting a signed bundle to the gates.
//!
//! Envoy: the bundle travels as the filter's plugin configuration inside an ECDS resource
//! (a DiscoveryResponse holding one TypedExtensionConfig), written atomically — temp file
//! in the same directory, fsync, rename — so Envoy's file watch only ever sees whole files.

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
