//! Getting a signed bundle to the gates.
//!
//! Envoy: the bundle travels as the filter's plugin configuration inside an ECDS resource
//! (a DiscoveryResponse holding one TypedExtensionConfig), written atomically — temp file
//! in the same directory, fsync, rename — so Envoy's file watch only ever sees whole files.
//!
//! Envoy's filter reads the admin's public keys from its VM environment; the resource carries
//! them (`key_values`) beside the bundle, so a key rotation lands in the same atomic update.
//!
//! Worker: `POST <url>/.well-known/tokengate/bundle` with `Tokengate-Signature:
//! t=<unix seconds>,<key id>=<hex Ed25519 of "tokengate.push/v2\n<t>\n<body>">[,…]`, one
//! signature per published key. A Worker applies at most a batch of KV changes per request
//! and answers 202 `{"applied","remaining"}`; the same bundle is sent again, freshly signed,
//! until it answers 200.

use std::io::Write;
use std::path::Path;

use anyhow::{Context, Result};
use tokengate_core::{Expectation, Gate, Target};

use crate::keys::Keyring;
use crate::store::{self, Actor, Store};
use crate::Issued;

/// The VM environment variable the filter reads the admin's public keys from.
pub const KEYS_VARIABLE: &str = "TOKENGATE_TRUSTED_KEYS";
/// What a push request's signatures cover, before `<t>\n<body>`.
pub const PUSH_CONTEXT: &str = "tokengate.push/v2";

/// The ECDS resource name the gateway's filter chain refers to.
pub const FILTER_NAME: &str = "tokengate";

/// Writes `bytes` to `path` atomically. `path` must be new or a regular file: a rename
/// would replace a device, a directory entry of another kind, or a symlink itself.
pub fn write_atomically(path: &Path, bytes: &[u8]) -> Result<()> {
    if let Ok(meta) = std::fs::symlink_metadata(path) {
        if !meta.file_type().is_file() {
            anyhow::bail!(
                "{} exists and is not a regular file; refusing to replace it (give a new path or a regular file)",
                path.display()
            );
        }
    }
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

/// How the ECDS file is encoded. Envoy decides by the path's ending, case-sensitively
/// (`ecds.PB` is JSON to Envoy), and so do we: the two must never disagree.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EcdsEncoding {
    /// Protobuf JSON (any path not ending in `.pb`): readable, and what the demo ships.
    Json,
    /// Binary protobuf (`*.pb`): Envoy skips its JSON parser, which for a large bundle is
    /// most of Envoy's own share of a reload (bench/README.md).
    Binary,
}

impl EcdsEncoding {
    pub fn of(path: &Path) -> Result<Self> {
        let name = path.as_os_str().as_encoded_bytes();
        if name.ends_with(b".pb_text") {
            anyhow::bail!(
                "{}: Envoy reads a .pb_text file as protobuf text, which tokengate does not write; name it .pb (binary) or .json",
                path.display()
            );
        }
        Ok(if name.ends_with(b".pb") {
            Self::Binary
        } else {
            Self::Json
        })
    }
}

/// The ECDS DiscoveryResponse carrying `bundle_json` for the filter loaded from `wasm`, which
/// trusts `trusted_keys` (hex, comma-joined). Between pushes that keep the keys, only
/// `configuration` changes, so Envoy keeps the VM.
pub fn ecds_resource(
    bundle_json: &str,
    version: u64,
    wasm: &Path,
    trusted_keys: &str,
) -> serde_json::Value {
    serde_json::json!({
        "version_info": version.to_string(),
        "resources": [{
            "@type": proto::TYPED_EXTENSION_CONFIG,
            "name": FILTER_NAME,
            "typed_config": {
                "@type": proto::WASM_FILTER,
                "config": {
                    "name": FILTER_NAME,
                    "root_id": FILTER_NAME,
                    "failure_policy": "FAIL_CLOSED",
                    "configuration": {
                        "@type": proto::STRING_VALUE,
                        "value": bundle_json,
                    },
                    "vm_config": {
                        "vm_id": FILTER_NAME,
                        "runtime": proto::V8_RUNTIME,
                        "environment_variables": {
                            "host_env_keys": proto::HOST_ENV_KEYS,
                            "key_values": { KEYS_VARIABLE: trusted_keys },
                        },
                        "code": { "local": { "filename": wasm.display().to_string() } },
                    },
                },
            },
        }],
    })
}

/// The same resource as [`ecds_resource`], in `encoding`.
pub fn ecds_file(
    bundle_json: &str,
    version: u64,
    wasm: &Path,
    trusted_keys: &str,
    encoding: EcdsEncoding,
) -> Result<Vec<u8>> {
    let resource = ecds_resource(bundle_json, version, wasm, trusted_keys);
    Ok(match encoding {
        EcdsEncoding::Json => serde_json::to_string_pretty(&resource)?.into_bytes(),
        EcdsEncoding::Binary => proto::encode(&resource, "DiscoveryResponse")?,
    })
}

/// Protobuf's binary wire format for the ECDS resource, from its JSON form and a table of
/// the few Envoy v3 messages it uses: one description of the resource, two encodings. A
/// member the table does not know is an error, never dropped. Field numbers are Envoy's; a
/// wrong one makes Envoy reject the file (tests/envoy/e2e.py pushes a `.pb` through it).
mod proto {
    use anyhow::{bail, Context, Result};
    use serde_json::Value;

    pub const TYPED_EXTENSION_CONFIG: &str =
        "type.googleapis.com/envoy.config.core.v3.TypedExtensionConfig";
    pub const WASM_FILTER: &str = "type.googleapis.com/envoy.extensions.filters.http.wasm.v3.Wasm";
    pub const STRING_VALUE: &str = "type.googleapis.com/google.protobuf.StringValue";
    pub const V8_RUNTIME: &str = "envoy.wasm.runtime.v8";
    /// From Envoy's own environment: only the environment name, never a key.
    pub const HOST_ENV_KEYS: [&str; 1] = ["TOKENGATE_ENVIRONMENT"];

    enum Kind {
        String,
        Message(&'static str),
        /// A `google.protobuf.Any`: the JSON object names its message in `@type`.
        Any,
        Enum(&'static [(&'static str, u64)]),
        /// A `map<string, string>`: a JSON object, each member an entry message with the
        /// key as field 1 and the value as field 2.
        StringMap,
    }

    /// `envoy.extensions.wasm.v3.FailurePolicy`.
    const FAILURE_POLICY: &[(&str, u64)] = &[
        ("UNSPECIFIED", 0),
        ("FAIL_RELOAD", 1),
        ("FAIL_CLOSED", 2),
        ("FAIL_OPEN", 3),
    ];

    /// (JSON name, field number, kind) of each member this resource uses.
    fn fields(message: &str) -> Result<&'static [(&'static str, u64, Kind)]> {
        use Kind::*;
        Ok(match message {
            "DiscoveryResponse" => &[("version_info", 1, String), ("resources", 2, Any)],
            "TypedExtensionConfig" => &[("name", 1, String), ("typed_config", 2, Any)],
            "Wasm" => &[("config", 1, Message("PluginConfig"))],
            "PluginConfig" => &[
                ("name", 1, String),
                ("root_id", 2, String),
                ("vm_config", 3, Message("VmConfig")),
                ("configuration", 4, Any),
                ("failure_policy", 7, Enum(FAILURE_POLICY)),
            ],
            "VmConfig" => &[
                ("vm_id", 1, String),
                ("runtime", 2, String),
                ("code", 3, Message("AsyncDataSource")),
                ("environment_variables", 7, Message("EnvironmentVariables")),
            ],
            "AsyncDataSource" => &[("local", 1, Message("DataSource"))],
            "DataSource" => &[("filename", 1, String)],
            "EnvironmentVariables" => &[("host_env_keys", 1, String), ("key_values", 2, StringMap)],
            "StringValue" => &[("value", 1, String)],
            other => bail!("no protobuf schema for {other}"),
        })
    }

    fn message_of(type_url: &str) -> Result<&'static str> {
        Ok(match type_url {
            TYPED_EXTENSION_CONFIG => "TypedExtensionConfig",
            WASM_FILTER => "Wasm",
            STRING_VALUE => "StringValue",
            other => bail!("no protobuf schema for {other}"),
        })
    }

    fn varint(out: &mut Vec<u8>, mut value: u64) {
        while value >= 0x80 {
            out.push(value as u8 | 0x80);
            value >>= 7;
        }
        out.push(value as u8);
    }

    fn length_delimited(out: &mut Vec<u8>, field: u64, payload: &[u8]) {
        varint(out, field << 3 | 2);
        varint(out, payload.len() as u64);
        out.extend_from_slice(payload);
    }

    /// `value` (a JSON object) as the binary form of `message`.
    pub fn encode(value: &Value, message: &str) -> Result<Vec<u8>> {
        let object = value
            .as_object()
            .with_context(|| format!("{message}: not an object"))?;
        let schema = fields(message)?;
        let mut out = Vec::new();
        for (name, member) in object {
            if name == "@type" {
                continue;
            }
            let (_, number, kind) = schema
                .iter()
                .find(|(known, _, _)| known == name)
                .with_context(|| format!("{message}.{name}: not in the protobuf schema"))?;
            // A repeated field is its elements, one after the other.
            let elements = match member {
                Value::Array(items) => items.as_slice(),
                single => std::slice::from_ref(single),
            };
            for element in elements {
                let context = || format!("{message}.{name}");
                match kind {
                    Kind::String => {
                        let text = element.as_str().with_context(context)?;
                        length_delimited(&mut out, *number, text.as_bytes());
                    }
                    Kind::Message(inner) => {
                        length_delimited(&mut out, *number, &encode(element, inner)?);
                    }
                    Kind::Any => {
                        let type_url = element["@type"].as_str().with_context(context)?;
                        let mut any = Vec::new();
                        length_delimited(&mut any, 1, type_url.as_bytes());
                        length_delimited(&mut any, 2, &encode(element, message_of(type_url)?)?);
                        length_delimited(&mut out, *number, &any);
                    }
                    Kind::StringMap => {
                        let map = element.as_object().with_context(context)?;
                        for (key, value) in map {
                            let value = value.as_str().with_context(context)?;
                            let mut entry = Vec::new();
                            length_delimited(&mut entry, 1, key.as_bytes());
                            length_delimited(&mut entry, 2, value.as_bytes());
                            length_delimited(&mut out, *number, &entry);
                        }
                    }
                    Kind::Enum(values) => {
                        let label = element.as_str().with_context(context)?;
                        let (_, value) = values
                            .iter()
                            .find(|(known, _)| *known == label)
                            .with_context(|| format!("{}: no value {label}", context()))?;
                        varint(&mut out, number << 3);
                        varint(&mut out, *value);
                    }
                }
            }
        }
        Ok(out)
    }

    #[cfg(test)]
    mod tests {
        use super::*;

        #[test]
        fn varints_are_little_endian_base_128() {
            let encoded = |value| {
                let mut out = Vec::new();
                varint(&mut out, value);
                out
            };
            assert_eq!(encoded(0), [0]);
            assert_eq!(encoded(127), [0x7f]);
            assert_eq!(encoded(300), [0xac, 0x02]);
            assert_eq!(encoded(1 << 21), [0x80, 0x80, 0x80, 0x01]);
            assert_eq!(
                encoded(u64::MAX)[..],
                [[0xff; 9].as_slice(), &[0x01]].concat()
            );
        }

        #[test]
        fn a_member_outside_the_schema_is_an_error_not_dropped() {
            let resource = serde_json::json!({"version_info": "1", "nonce": "x"});
            let error = encode(&resource, "DiscoveryResponse").unwrap_err();
            assert!(
                error.to_string().contains("DiscoveryResponse.nonce"),
                "{error}"
            );
            let bad_enum = serde_json::json!({"failure_policy": "FAIL_SOMETIMES"});
            assert!(encode(&bad_enum, "PluginConfig").is_err());
        }

        #[test]
        fn the_bundle_is_carried_byte_for_byte() {
            let bundle = r#"{"format":"tokengate.bundle/v2","payload":{"version":7}}"#;
            let path = std::path::Path::new("/f.wasm");
            let resource = super::super::ecds_resource(bundle, 7, path, "ab,cd");
            let file = encode(&resource, "DiscoveryResponse").unwrap();
            let at = file
                .windows(bundle.len())
                .position(|w| w == bundle.as_bytes())
                .expect("the bundle's bytes");
            // StringValue.value: field 1, length-delimited (0x0a), then the length.
            assert_eq!(file[at - 2..at], [0x0a, bundle.len() as u8]);
            let version_info = [0x0a, 1, b'7']; // field 1, length 1, "7"
            assert!(file.windows(3).any(|w| w == version_info));
            // key_values (field 2): one entry, key (field 1) then value (field 2).
            let entry = [
                &[0x12, 2 + 22 + 2 + 5][..],
                &[0x0a, 22],
                b"TOKENGATE_TRUSTED_KEYS",
                &[0x12, 5],
                b"ab,cd",
            ]
            .concat();
            assert!(file.windows(entry.len()).any(|w| w == entry.as_slice()));
        }
    }
}

/// A bundle made earlier (`tokengate bundle --out`), checked exactly as the gate will; its
/// bytes are written or sent as read.
pub fn prebuilt(store: &Store, path: &Path, target: Target) -> Result<Issued> {
    let trusted = crate::published_key_set(store)?;
    let text = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    let environment = store.environment()?;
    let expect = Expectation {
        target,
        environment: Some(&environment),
        newer_than: store.pushed_version(&target.to_string())?,
    };
    let gate = Gate::load(&text, &trusted, &expect).map_err(|e| {
        anyhow::anyhow!("{}: the gate would refuse this bundle: {e}", path.display())
    })?;
    let text = String::from_utf8(text)
        .map_err(|_| anyhow::anyhow!("{}: a bundle is UTF-8 text", path.display()))?;
    Ok(Issued {
        version: gate.version(),
        tokens: gate.token_count(),
        keys: gate.keys().clone(),
        text,
    })
}

/// The filter `.wasm` to name in the resource: `--wasm` if given, else the one the ECDS
/// file already names (a push keeps the filter Envoy loads), else the one built beside this
/// binary (`target/wasm32-wasip1/release/` from `target/debug/` or `target/release/`).
fn filter_wasm(given: Option<&Path>, file: &Path) -> Result<std::path::PathBuf> {
    let in_file = || -> Option<std::path::PathBuf> {
        let existing: serde_json::Value =
            serde_json::from_slice(&std::fs::read(file).ok()?).ok()?;
        let name = existing["resources"][0]["typed_config"]["config"]["vm_config"]["code"]["local"]
            ["filename"]
            .as_str()?;
        Some(name.into())
    };
    let beside_binary = || -> Option<std::path::PathBuf> {
        let exe = std::env::current_exe().ok()?;
        let built = exe
            .parent()?
            .parent()?
            .join("wasm32-wasip1/release/tokengate_filter.wasm");
        built.exists().then_some(built)
    };
    let wasm = given
        .map(Path::to_path_buf)
        .or_else(in_file)
        .or_else(beside_binary)
        .context("which filter should Envoy load? pass --wasm PATH (or TOKENGATE_FILTER_WASM): the tokengate_filter.wasm built with `cargo build -p tokengate-plugin --target wasm32-wasip1 --release`")?;
    std::fs::canonicalize(&wasm).with_context(|| {
        format!(
            "the filter {} does not exist (build it: cargo build -p tokengate-plugin --target wasm32-wasip1 --release)",
            wasm.display()
        )
    })
}

/// Signs a new bundle for Envoy (or takes a prebuilt one), checks it as the filter will,
/// writes the ECDS file with the published keys and, given Envoy's admin endpoint, waits
/// until Envoy serves it (restoring the previous file if Envoy refuses it); records the
/// push; returns the version.
#[allow(clippy::too_many_arguments)]
pub fn envoy(
    store: &mut Store,
    ring: &Keyring,
    file: &Path,
    wasm: Option<&Path>,
    admin: Option<&str>,
    prebuilt_bundle: Option<&Path>,
    now: u64,
    who: &Actor,
) -> Result<u64> {
    // Before anything is signed: a name Envoy would read in another encoding, an unusable
    // admin URL or a missing filter changes nothing.
    let encoding = EcdsEncoding::of(file)?;
    let admin = admin
        .map(|url| crate::status::base_url(url, "--admin"))
        .transpose()?;
    let wasm = filter_wasm(wasm, file)?;
    let before = admin.as_deref().map(crate::status::envoy).transpose()?;
    let issued = match prebuilt_bundle {
        Some(path) => prebuilt(store, path, Target::Envoy)?,
        None => crate::issue_bundle(store, ring, Target::Envoy, now, who)?,
    };
    let resource = ecds_file(
        &issued.text,
        issued.version,
        &wasm,
        &issued.keys.to_text(),
        encoding,
    )?;
    let previous = std::fs::read(file).ok();
    write_atomically(file, &resource)?;
    if let (Some(admin), Some(before)) = (&admin, &before) {
        if let Err(refused) = crate::status::confirm_envoy(admin, issued.version, before) {
            // A restart must not load what Envoy refused now: the file goes back.
            if let Some(previous) = &previous {
                write_atomically(file, previous)?;
            }
            return Err(refused);
        }
    }
    let destination = file.display().to_string();
    let details = serde_json::json!({"version": issued.version, "file": destination, "tokens": issued.tokens, "keys": issued.keys.ids(), "confirmed": admin.is_some()});
    store.transaction(who, "push.envoy", None, details, now, |tx| {
        store::record_push(tx, "envoy", issued.version, now, &destination)
    })?;
    Ok(issued.version)
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
///
/// The store is locked only to take the version and to record the push, never while the
/// bundle travels: an incident `revoke` never waits for a push.
pub fn worker(
    store_path: &Path,
    ring: &Keyring,
    url: &str,
    prebuilt_bundle: Option<&Path>,
    now: u64,
    who: &Actor,
) -> Result<u64> {
    use std::io::IsTerminal;

    let base = crate::status::base_url(url, "--url")?;
    let endpoint = format!("{base}/.well-known/tokengate/bundle");
    let bundle = {
        let mut store = Store::open(store_path)?;
        match prebuilt_bundle {
            Some(path) => prebuilt(&store, path, Target::Worker)?,
            None => crate::issue_bundle(&mut store, ring, Target::Worker, now, who)?,
        }
    };
    let published: Vec<String> = bundle.keys.keys().iter().map(|k| k.to_hex()).collect();
    let body = &bundle.text;
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
        let message = format!("{PUSH_CONTEXT}\n{t}\n{body}");
        let signatures: Vec<String> = ring
            .sign(message.as_bytes(), &published)?
            .into_iter()
            .map(|s| format!("{}={}", s.key_id, s.signature))
            .collect();
        let mut response = agent
            .post(&endpoint)
            .header("content-type", "application/json")
            .header(
                "tokengate-signature",
                &format!("t={t},{}", signatures.join(",")),
            )
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
                // Done only once the Worker says it serves this version.
                let served = crate::status::worker(&base)?;
                if served.version != Some(bundle.version) {
                    anyhow::bail!(
                        "the Worker accepted version {} but serves {}",
                        bundle.version,
                        crate::status::served(served.version)
                    );
                }
                let destination = base.clone();
                let details = serde_json::json!({"version": bundle.version, "url": destination, "tokens": bundle.tokens, "keys": bundle.keys.ids(), "requests": round});
                let mut store = Store::open(store_path)?;
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_encoding_follows_the_path_ending_exactly_as_envoy_reads_it() {
        let of = |p: &str| EcdsEncoding::of(Path::new(p)).ok();
        assert_eq!(of("run/tokengate.ecds.pb"), Some(EcdsEncoding::Binary));
        assert_eq!(of("run/.pb"), Some(EcdsEncoding::Binary));
        // Envoy compares case-sensitively: to it these are JSON (or YAML), so they get JSON.
        for json in ["run/ecds.PB", "run/ecds.json", "run/ecds.yaml", "run/ecds"] {
            assert_eq!(of(json), Some(EcdsEncoding::Json), "{json}");
        }
        // Protobuf text: Envoy would read it as such, and tokengate does not write it.
        assert_eq!(of("run/ecds.pb_text"), None);
    }
}
