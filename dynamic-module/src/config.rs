//! The filter configuration and the gate it loads: one per process.
//!
//! Envoy keeps its own copies of an inline `filter_config` (a 15 MB bundle inline cost
//! ~100 MB of RSS), so the configuration is a small reference that `tokengate push envoy`
//! writes beside the bundle file:
//!
//! ```json
//! {"bundle":"/etc/envoy/tokengate-bundles/tokengate.ecds.json/v12-<sha256>.json","sha256":"<64 hex>","trusted_keys":"<hex>,<hex>"}
//! ```
//!
//! The module reads the file, checks its SHA-256 against the reference (the file cannot
//! change under a configuration), opens it with the trusted keys and checks the bundle as
//! the wasm filter does: target `envoy`, the environment in `TOKENGATE_ENVIRONMENT`, and
//! succession (newer than the bundle served, or that very bundle). Envoy creates filter
//! configurations on its main thread (one per update); the gate is one per process, shared
//! by every configuration naming the same file and keys and by every worker thread.
//!
//! The no-rollback mark lives in this library's memory: a restarted Envoy (or another copy of
//! the library) starts without one and takes the bundle its ECDS file names.

use std::path::PathBuf;
use std::sync::{Arc, Mutex, PoisonError};

use serde::Deserialize;
use sha2::{Digest, Sha256};
use tokengate_core::issuer::SECRETS_VARIABLE;
use tokengate_core::{Expectation, Gate, KeySet, Target};

/// The environment variable naming the environment this gate serves (Envoy's own
/// environment, as the wasm filter's `host_env_keys`).
pub const ENVIRONMENT_VARIABLE: &str = "TOKENGATE_ENVIRONMENT";

/// The filter configuration `tokengate push envoy` writes (a `StringValue`'s bytes).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Reference {
    /// The bundle file (absolute path).
    pub bundle: PathBuf,
    /// Lower-case hex SHA-256 of the file's bytes.
    pub sha256: String,
    /// The admin's public keys, hex, comma-separated: public only, nothing here can sign.
    pub trusted_keys: String,
}

impl Reference {
    /// Reads a configuration's bytes.
    pub fn parse(config: &[u8]) -> Result<Self, String> {
        let reference: Self = serde_json::from_slice(config).map_err(|e| {
            format!("the filter configuration is not a tokengate bundle reference: {e}")
        })?;
        let hex_digest = reference.sha256.len() == 64
            && reference
                .sha256
                .bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b));
        if !hex_digest {
            return Err("sha256: 64 lower-case hex digits expected".to_owned());
        }
        if !reference.bundle.is_absolute() {
            return Err(format!(
                "bundle: {} is not an absolute path",
                reference.bundle.display()
            ));
        }
        Ok(reference)
    }
}

/// The gate served, with what it was loaded from: a configuration naming the same file
/// and keys again (a listener update, a second filter chain) shares it instead of loading.
struct Serving {
    sha256: String,
    trusted_keys: String,
    gate: Arc<Gate>,
}

/// The one gate of this process. Configurations are created on Envoy's main thread only, so
/// the lock is never contended; streams hold their own `Arc` and never take it.
static SERVING: Mutex<Option<Serving>> = Mutex::new(None);

/// What a configuration became.
#[derive(Debug)]
pub enum Configured {
    /// The bundle it names, loaded (or shared with the configuration that loaded it).
    Serving(Arc<Gate>),
    /// No configuration before the first push (Envoy's ECDS default): 503 to every request.
    NoBundle,
}

/// Turns a filter configuration into the gate it serves, or says why it is refused (Envoy
/// then rejects the configuration and keeps the previous one).
pub fn configure(config: &[u8]) -> Result<Configured, String> {
    let mut serving = SERVING.lock().unwrap_or_else(PoisonError::into_inner);
    if config.is_empty() {
        return match &*serving {
            None => Ok(Configured::NoBundle),
            Some(current) => Err(format!(
                "an empty configuration cannot replace bundle version {}",
                current.gate.version()
            )),
        };
    }
    let reference = Reference::parse(config)?;
    if let Some(current) = &*serving {
        if current.sha256 == reference.sha256 && current.trusted_keys == reference.trusted_keys {
            return Ok(Configured::Serving(Arc::clone(&current.gate)));
        }
    }
    let gate = Arc::new(load(&reference, serving.as_ref().map(|s| &*s.gate))?);
    *serving = Some(Serving {
        sha256: reference.sha256,
        trusted_keys: reference.trusted_keys,
        gate: Arc::clone(&gate),
    });
    Ok(Configured::Serving(gate))
}

/// The gate this process serves, if any (for the log line of a refusal).
pub fn serving_version() -> Option<u64> {
    let serving = SERVING.lock().unwrap_or_else(PoisonError::into_inner);
    serving.as_ref().map(|s| s.gate.version())
}

/// The largest bundle file read: a million tokens (the core's limit) take ~150 MB.
const MAX_BUNDLE_BYTES: u64 = 512 << 20;

/// Reads a bundle file: a regular file (a FIFO or a device would hang or flood Envoy's main
/// thread), of at most [`MAX_BUNDLE_BYTES`].
fn read_bundle_file(path: &std::path::Path) -> Result<Vec<u8>, String> {
    use std::io::Read;
    let file = std::fs::File::open(path).map_err(|e| format!("reading {}: {e}", path.display()))?;
    let meta = file
        .metadata()
        .map_err(|e| format!("reading {}: {e}", path.display()))?;
    if !meta.is_file() {
        return Err(format!("{} is not a regular file", path.display()));
    }
    if meta.len() > MAX_BUNDLE_BYTES {
        return Err(format!(
            "{} is {} bytes, over the {MAX_BUNDLE_BYTES}-byte limit",
            path.display(),
            meta.len()
        ));
    }
    let mut text = Vec::with_capacity(meta.len() as usize);
    file.take(MAX_BUNDLE_BYTES + 1)
        .read_to_end(&mut text)
        .map_err(|e| format!("reading {}: {e}", path.display()))?;
    if text.len() as u64 > MAX_BUNDLE_BYTES {
        return Err(format!(
            "{} grew over the size limit while read",
            path.display()
        ));
    }
    Ok(text)
}

/// Reads, checks and loads the bundle `reference` names.
fn load(reference: &Reference, current: Option<&Gate>) -> Result<Gate, String> {
    let trusted =
        KeySet::parse(&reference.trusted_keys).map_err(|e| format!("trusted_keys: {e}"))?;
    let environment = std::env::var(ENVIRONMENT_VARIABLE)
        .map_err(|_| format!("{ENVIRONMENT_VARIABLE} is not set in Envoy's environment"))?;
    let text = read_bundle_file(&reference.bundle)?;
    let digest = tokengate_core::hex::encode(&Sha256::digest(&text));
    if digest != reference.sha256 {
        return Err(format!(
            "{} does not have the SHA-256 the configuration names (it has {digest})",
            reference.bundle.display()
        ));
    }
    let expect = Expectation {
        target: Target::Envoy,
        environment: Some(&environment),
        newer_than: None,
    };
    let mut gate = Gate::load_checked(&text, &trusted, |head, next| {
        expect.check(head)?;
        match current {
            Some(current) => current.served().check_successor(next),
            None => Ok(()),
        }
    })
    .map_err(|e| e.to_string())?;
    // The HS256 issuers' secrets: Envoy's environment, never a bundle.
    gate.set_issuer_secrets(std::env::var(SECRETS_VARIABLE).ok().as_deref());
    Ok(gate)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_reference_is_exactly_its_three_fields() {
        let good = format!(
            r#"{{"bundle":"/b.json","sha256":"{}","trusted_keys":"ab"}}"#,
            "0".repeat(64)
        );
        assert!(Reference::parse(good.as_bytes()).is_ok());
        for bad in [
            good.replace("}", r#","extra":1}"#),
            good.replace("/b.json", "b.json"),
            good.replace(&"0".repeat(64), &"A".repeat(64)),
            good.replace(&"0".repeat(64), &"0".repeat(63)),
            r#"{"format":"tokengate.bundle/v2"}"#.to_owned(),
        ] {
            assert!(Reference::parse(bad.as_bytes()).is_err(), "{bad}");
        }
    }
}

#[cfg(test)]
mod configure_tests {
    use super::*;
    use tokengate_conformance as conformance;

    /// One test, in order: the served gate is process-wide state.
    #[test]
    fn configurations_load_share_and_refuse_like_a_gate() {
        let suite = conformance::load().unwrap();
        std::env::set_var(ENVIRONMENT_VARIABLE, &suite.environment);
        let dir = std::env::temp_dir().join(format!("tokengate-module-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let keys = suite.trusted_keys.join(",");
        // A valid public key that signed none of the fixtures.
        let stranger = ed25519_dalek::SigningKey::from_bytes(&[7; 32]).verifying_key();
        let stranger = tokengate_core::hex::encode(stranger.as_bytes());
        let write = |name: &str| {
            let text = suite.bundle_text(name, "envoy").unwrap();
            let path = dir.join(format!("{name}.json"));
            std::fs::write(&path, &text).unwrap();
            (
                path,
                tokengate_core::hex::encode(&Sha256::digest(text.as_bytes())),
            )
        };
        let reference = |path: &std::path::Path, sha256: &str, keys: &str| {
            serde_json::json!({"bundle": path, "sha256": sha256, "trusted_keys": keys})
                .to_string()
                .into_bytes()
        };
        let served = |c: Result<Configured, String>| match c {
            Ok(Configured::Serving(gate)) => gate,
            other => panic!("not serving: {other:?}"),
        };

        assert!(matches!(configure(b""), Ok(Configured::NoBundle)));
        let (main, main_sha) = write("main"); // version 10
        let (rotation, rotation_sha) = write("rotation"); // version 14

        // Refused, and nothing changes: another file's digest, a missing file, unknown keys,
        // an inline bundle instead of a reference.
        let refusals = [
            (
                reference(&main, &rotation_sha, &keys),
                "does not have the SHA-256",
            ),
            (
                reference(&dir.join("absent.json"), &main_sha, &keys),
                "reading",
            ),
            (reference(&dir, &main_sha, &keys), "not a regular file"),
            (
                reference(&main, &main_sha, &stranger),
                "no signature is by a trusted key",
            ),
            (
                suite.bundle_text("main", "envoy").unwrap().into_bytes(),
                "not a tokengate bundle reference",
            ),
        ];
        for (config, why) in &refusals {
            let refusal = configure(config).unwrap_err();
            assert!(refusal.contains(why), "{why}: {refusal}");
            assert_eq!(serving_version(), None);
        }

        let first = served(configure(&reference(&main, &main_sha, &keys)));
        assert_eq!(first.version(), 10);
        // The same file and keys again (another filter chain, a listener update): one gate.
        let again = served(configure(&reference(&main, &main_sha, &keys)));
        assert!(Arc::ptr_eq(&first, &again));
        // Once a bundle is served, no configuration goes back to "no bundle".
        assert!(configure(b"").is_err());

        // The same file under keys that do not sign it is not the gate served.
        let unsigned = configure(&reference(&main, &main_sha, &stranger)).unwrap_err();
        assert!(
            unsigned.contains("no signature is by a trusted key"),
            "{unsigned}"
        );

        let newer = served(configure(&reference(&rotation, &rotation_sha, &keys)));
        assert_eq!(newer.version(), 14);
        // No rollback: the older bundle, valid as it is, is refused now.
        let rollback = configure(&reference(&main, &main_sha, &keys)).unwrap_err();
        assert!(rollback.contains("not newer"), "{rollback}");
        assert_eq!(serving_version(), Some(14));
        std::fs::remove_dir_all(&dir).ok();
    }
}
