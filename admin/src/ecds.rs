//! The ECDS resource `tokengate push envoy` writes: a DiscoveryResponse holding one
//! TypedExtensionConfig for either of tokengate's Envoy filters.
//!
//! - **Dynamic module** (the default): the configuration is a small reference —
//!   `{"bundle": <path>, "sha256": <hex>, "trusted_keys": <hex,…>}` — to a bundle file written
//!   beside the ECDS file (`tokengate-bundles/v<version>-<sha256>.json`), which the module
//!   reads and verifies. Envoy keeps copies of an inline configuration (bench/README.md).
//! - **Wasm filter**: the bundle inline as the plugin configuration; the public keys in the
//!   VM environment (`key_values`), so a key rotation lands in the same atomic update.
//!
//! Binary (`*.pb`) files are encoded with Envoy's own protobuf types (`envoy-types`), JSON
//! ones with serde_json from the same [`Resource`].

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use envoy_types::pb::envoy::config::core::v3::{
    async_data_source, data_source, AsyncDataSource, DataSource, TypedExtensionConfig,
};
use envoy_types::pb::envoy::extensions::dynamic_modules::v3::DynamicModuleConfig;
use envoy_types::pb::envoy::extensions::filters::http::dynamic_modules::v3::DynamicModuleFilter;
use envoy_types::pb::envoy::extensions::filters::http::wasm::v3::Wasm;
use envoy_types::pb::envoy::extensions::wasm::v3::{
    plugin_config, EnvironmentVariables, FailurePolicy, PluginConfig, VmConfig,
};
use envoy_types::pb::envoy::service::discovery::v3::DiscoveryResponse;
use envoy_types::pb::google::protobuf::{Any, StringValue};
use prost::{Message, Name};

/// The ECDS resource name the gateway's filter chain refers to.
pub const FILTER_NAME: &str = "tokengate";
/// The wasm filter's VM environment variable holding the admin's public keys.
pub const KEYS_VARIABLE: &str = "TOKENGATE_TRUSTED_KEYS";
/// From Envoy's own environment: the environment name and the usage switch, never a key.
const HOST_ENV_KEYS: [&str; 3] = [
    "TOKENGATE_ENVIRONMENT",
    "TOKENGATE_USAGE",
    "TOKENGATE_ISSUER_SECRETS",
];
const V8_RUNTIME: &str = "envoy.wasm.runtime.v8";
/// The module's stats are `tokengate.<name>` (the wasm filter's `wasmcustom.tokengate.<name>`).
const METRICS_NAMESPACE: &str = "tokengate";
/// Where the module's bundle files live, beside the ECDS file. A subdirectory: writing
/// there does not wake Envoy's watch of the ECDS file's own directory.
const BUNDLE_DIRECTORY: &str = "tokengate-bundles";

/// Which filter Envoy runs, and its code.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Filter {
    /// The native dynamic module (`libtokengate.so`).
    Module(PathBuf),
    /// The proxy-wasm filter (`tokengate_filter.wasm`).
    Wasm(PathBuf),
}

impl Filter {
    /// The code file's absolute path (it must exist).
    pub fn canonical(self) -> Result<Self> {
        let (path, build) = match &self {
            Filter::Module(p) => (
                p,
                "cargo build -p tokengate-dynamic-module --profile native",
            ),
            Filter::Wasm(p) => (
                p,
                "cargo build -p tokengate-plugin --target wasm32-wasip1 --release",
            ),
        };
        let path = std::fs::canonicalize(path).with_context(|| {
            format!(
                "the filter {} does not exist (build it: {build})",
                path.display()
            )
        })?;
        utf8(&path)?;
        Ok(match self {
            Filter::Module(_) => Filter::Module(path),
            Filter::Wasm(_) => Filter::Wasm(path),
        })
    }
}

impl Filter {
    /// The code file's path.
    pub fn path(&self) -> &Path {
        match self {
            Filter::Module(p) | Filter::Wasm(p) => p,
        }
    }
}

/// A path as the resource carries it: UTF-8 exactly (a lossy form would name another file).
fn utf8(path: &Path) -> Result<&str> {
    path.to_str().with_context(|| {
        format!(
            "{} is not UTF-8; Envoy's configuration cannot name it",
            path.display()
        )
    })
}

/// How the ECDS file is encoded. Envoy decides by the path's ending, case-sensitively
/// (`ecds.PB` is JSON to Envoy), and so do we: the two must never disagree.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Encoding {
    /// Protobuf JSON (any path not ending in `.pb`): readable, and what the demo ships.
    Json,
    /// Binary protobuf (`*.pb`): Envoy skips its JSON parser, which for the wasm filter's
    /// inline bundle is most of Envoy's own share of a reload (bench/README.md).
    Binary,
}

impl Encoding {
    pub fn of(path: &Path) -> Result<Self> {
        let name = path.as_os_str().as_encoded_bytes();
        if name.ends_with(b".pb_text") {
            bail!(
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

/// One ECDS resource: the filter, the bundle's version, and what the filter is configured
/// with (the module: a reference to the bundle file; the wasm filter: the bundle itself).
pub struct Resource<'a> {
    pub filter: &'a Filter,
    pub version: u64,
    pub configuration: &'a str,
    /// The admin's public keys, hex, comma-joined (the wasm filter's VM environment).
    pub trusted_keys: &'a str,
}

/// The module's configuration: where the bundle file is, its SHA-256, the keys to trust.
pub fn module_reference(bundle: &Path, sha256: &str, trusted_keys: &str) -> Result<String> {
    Ok(serde_json::json!({
        "bundle": utf8(bundle)?,
        "sha256": sha256,
        "trusted_keys": trusted_keys,
    })
    .to_string())
}

/// The name of the module's bundle file for `version` with digest `sha256`, in
/// [`bundle_directory`].
pub fn bundle_name(version: u64, sha256: &str) -> String {
    format!("v{version}-{sha256}.json")
}

/// Whether `name` is one [`bundle_name`] makes (`v<version>-<64 hex>.json`).
pub fn is_bundle_name(name: &str) -> bool {
    let Some((version, digest)) = name
        .strip_suffix(".json")
        .and_then(|n| n.strip_prefix('v'))
        .and_then(|n| n.split_once('-'))
    else {
        return false;
    };
    !version.is_empty()
        && version.bytes().all(|b| b.is_ascii_digit())
        && digest.len() == 64
        && digest
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

/// The directory of the module's bundle files for `ecds_file`:
/// `tokengate-bundles/<ECDS file name>/` beside it, one per ECDS file, so that pruning one
/// gateway's files never touches another's.
pub fn bundle_directory(ecds_file: &Path) -> Result<PathBuf> {
    let name = ecds_file
        .file_name()
        .with_context(|| format!("{} is not a file path", ecds_file.display()))?;
    utf8(Path::new(name))?;
    Ok(ecds_file
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."))
        .join(BUNDLE_DIRECTORY)
        .join(name))
}

impl Resource<'_> {
    /// The file's bytes in `encoding`.
    pub fn encode(&self, encoding: Encoding) -> Result<Vec<u8>> {
        Ok(match encoding {
            Encoding::Json => serde_json::to_string_pretty(&self.json())?.into_bytes(),
            Encoding::Binary => self.message().encode_to_vec(),
        })
    }

    fn string_value(&self) -> Any {
        any(&StringValue {
            value: self.configuration.to_owned(),
        })
    }

    fn message(&self) -> DiscoveryResponse {
        let typed_config = match self.filter {
            Filter::Module(library) => any(&DynamicModuleFilter {
                dynamic_module_config: Some(DynamicModuleConfig {
                    module: Some(local_file(library)),
                    do_not_close: true,
                    metrics_namespace: METRICS_NAMESPACE.to_owned(),
                    ..Default::default()
                }),
                filter_name: FILTER_NAME.to_owned(),
                filter_config: Some(self.string_value()),
                ..Default::default()
            }),
            Filter::Wasm(wasm) => any(&Wasm {
                config: Some(PluginConfig {
                    name: FILTER_NAME.to_owned(),
                    root_id: FILTER_NAME.to_owned(),
                    configuration: Some(self.string_value()),
                    failure_policy: FailurePolicy::FailClosed as i32,
                    vm: Some(plugin_config::Vm::VmConfig(VmConfig {
                        vm_id: FILTER_NAME.to_owned(),
                        runtime: V8_RUNTIME.to_owned(),
                        code: Some(local_file(wasm)),
                        environment_variables: Some(EnvironmentVariables {
                            host_env_keys: HOST_ENV_KEYS.map(str::to_owned).to_vec(),
                            key_values: [(KEYS_VARIABLE.to_owned(), self.trusted_keys.to_owned())]
                                .into(),
                        }),
                        ..Default::default()
                    })),
                    ..Default::default()
                }),
            }),
        };
        DiscoveryResponse {
            version_info: self.version.to_string(),
            resources: vec![any(&TypedExtensionConfig {
                name: FILTER_NAME.to_owned(),
                typed_config: Some(typed_config),
            })],
            ..Default::default()
        }
    }

    /// The same resource in protobuf JSON.
    fn json(&self) -> serde_json::Value {
        let string_value = serde_json::json!({
            "@type": StringValue::type_url(),
            "value": self.configuration,
        });
        let typed_config = match self.filter {
            Filter::Module(library) => serde_json::json!({
                "@type": DynamicModuleFilter::type_url(),
                "dynamic_module_config": {
                    "module": { "local": { "filename": library.to_string_lossy() } },
                    "do_not_close": true,
                    "metrics_namespace": METRICS_NAMESPACE,
                },
                "filter_name": FILTER_NAME,
                "filter_config": string_value,
            }),
            Filter::Wasm(wasm) => serde_json::json!({
                "@type": Wasm::type_url(),
                "config": {
                    "name": FILTER_NAME,
                    "root_id": FILTER_NAME,
                    "failure_policy": FailurePolicy::FailClosed.as_str_name(),
                    "configuration": string_value,
                    "vm_config": {
                        "vm_id": FILTER_NAME,
                        "runtime": V8_RUNTIME,
                        "environment_variables": {
                            "host_env_keys": HOST_ENV_KEYS,
                            "key_values": { KEYS_VARIABLE: self.trusted_keys },
                        },
                        "code": { "local": { "filename": wasm.to_string_lossy() } },
                    },
                },
            }),
        };
        serde_json::json!({
            "version_info": self.version.to_string(),
            "resources": [{
                "@type": TypedExtensionConfig::type_url(),
                "name": FILTER_NAME,
                "typed_config": typed_config,
            }],
        })
    }
}

fn any<M: Message + Name>(message: &M) -> Any {
    Any {
        type_url: M::type_url(),
        value: message.encode_to_vec(),
    }
}

fn local_file(path: &Path) -> AsyncDataSource {
    AsyncDataSource {
        specifier: Some(async_data_source::Specifier::Local(DataSource {
            specifier: Some(data_source::Specifier::Filename(
                path.to_string_lossy().into_owned(),
            )),
            ..Default::default()
        })),
    }
}

/// What an existing ECDS file configures: its filter, and for the module the bundle file it
/// names. `None` when there is no file or it is not one of ours.
pub fn existing(file: &Path) -> Option<(Filter, Option<PathBuf>)> {
    let bytes = std::fs::read(file).ok()?;
    match Encoding::of(file).ok()? {
        Encoding::Json => existing_json(&serde_json::from_slice(&bytes).ok()?),
        Encoding::Binary => existing_binary(&bytes),
    }
}

fn existing_json(value: &serde_json::Value) -> Option<(Filter, Option<PathBuf>)> {
    let typed = &value["resources"][0]["typed_config"];
    let type_url = typed["@type"].as_str()?;
    if type_url == DynamicModuleFilter::type_url() {
        let library = typed["dynamic_module_config"]["module"]["local"]["filename"].as_str()?;
        let reference = typed["filter_config"]["value"].as_str();
        Some((
            Filter::Module(library.into()),
            reference.and_then(referenced_bundle),
        ))
    } else if type_url == Wasm::type_url() {
        let wasm = typed["config"]["vm_config"]["code"]["local"]["filename"].as_str()?;
        Some((Filter::Wasm(wasm.into()), None))
    } else {
        None
    }
}

fn existing_binary(bytes: &[u8]) -> Option<(Filter, Option<PathBuf>)> {
    let response = DiscoveryResponse::decode(bytes).ok()?;
    let resource =
        TypedExtensionConfig::decode(response.resources.first()?.value.as_slice()).ok()?;
    let typed = resource.typed_config?;
    let filename = |source: Option<AsyncDataSource>| match source?.specifier? {
        async_data_source::Specifier::Local(DataSource {
            specifier: Some(data_source::Specifier::Filename(name)),
            ..
        }) => Some(PathBuf::from(name)),
        _ => None,
    };
    if typed.type_url == DynamicModuleFilter::type_url() {
        let filter = DynamicModuleFilter::decode(typed.value.as_slice()).ok()?;
        let library = filename(filter.dynamic_module_config?.module)?;
        let reference = filter
            .filter_config
            .and_then(|c| StringValue::decode(c.value.as_slice()).ok())
            .and_then(|s| referenced_bundle(&s.value));
        Some((Filter::Module(library), reference))
    } else if typed.type_url == Wasm::type_url() {
        let plugin_config::Vm::VmConfig(vm) =
            Wasm::decode(typed.value.as_slice()).ok()?.config?.vm?;
        Some((Filter::Wasm(filename(vm.code)?), None))
    } else {
        None
    }
}

fn referenced_bundle(reference: &str) -> Option<PathBuf> {
    let value: serde_json::Value = serde_json::from_str(reference).ok()?;
    value["bundle"].as_str().map(PathBuf::from)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_encoding_follows_the_path_ending_exactly_as_envoy_reads_it() {
        let of = |p: &str| Encoding::of(Path::new(p)).ok();
        assert_eq!(of("run/tokengate.ecds.pb"), Some(Encoding::Binary));
        assert_eq!(of("run/.pb"), Some(Encoding::Binary));
        // Envoy compares case-sensitively: to it these are JSON (or YAML), so they get JSON.
        for json in ["run/ecds.PB", "run/ecds.json", "run/ecds.yaml", "run/ecds"] {
            assert_eq!(of(json), Some(Encoding::Json), "{json}");
        }
        // Protobuf text: Envoy would read it as such, and tokengate does not write it.
        assert_eq!(of("run/ecds.pb_text"), None);
    }

    /// The StringValue a binary resource configures its filter with.
    fn configuration_of(bytes: &[u8]) -> String {
        let response = DiscoveryResponse::decode(bytes).unwrap();
        let resource =
            TypedExtensionConfig::decode(response.resources[0].value.as_slice()).unwrap();
        let typed = resource.typed_config.unwrap();
        let any = if typed.type_url == DynamicModuleFilter::type_url() {
            DynamicModuleFilter::decode(typed.value.as_slice())
                .unwrap()
                .filter_config
        } else {
            Wasm::decode(typed.value.as_slice())
                .unwrap()
                .config
                .unwrap()
                .configuration
        };
        StringValue::decode(any.unwrap().value.as_slice())
            .unwrap()
            .value
    }

    #[test]
    fn bundle_files_are_only_the_names_the_cli_writes() {
        assert!(is_bundle_name(&bundle_name(12, &"0f".repeat(32))));
        for other in [
            "vendor.json".to_owned(),
            format!("v-{}.json", "0f".repeat(32)),
            format!("v12-{}.json", "0F".repeat(32)),
            format!("v12-{}.json.tmp", "0f".repeat(32)),
            format!("v1x-{}.json", "0f".repeat(32)),
        ] {
            assert!(!is_bundle_name(&other), "{other}");
        }
        // One directory per ECDS file.
        let a = bundle_directory(Path::new("/run/a.json")).unwrap();
        let b = bundle_directory(Path::new("/run/b.pb")).unwrap();
        assert_ne!(a, b);
        assert_eq!(a, Path::new("/run/tokengate-bundles/a.json"));
    }

    #[test]
    fn both_encodings_say_the_same_and_read_back() {
        let dir = std::env::temp_dir().join(format!("tokengate-ecds-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let module = Filter::Module("/opt/libtokengate.so".into());
        let wasm = Filter::Wasm("/opt/tokengate_filter.wasm".into());
        let bundle = bundle_directory(&dir.join("e.json"))
            .unwrap()
            .join(bundle_name(7, &"ab".repeat(32)));
        let reference = module_reference(&bundle, &"ab".repeat(32), "k1,k2").unwrap();
        for (filter, configuration, names_bundle) in [
            (&module, reference.as_str(), Some(bundle.clone())),
            (&wasm, r#"{"format":"tokengate.bundle/v2"}"#, None),
        ] {
            let resource = Resource {
                filter,
                version: 7,
                configuration,
                trusted_keys: "k1,k2",
            };
            for name in ["e.json", "e.pb"] {
                let path = dir.join(name);
                let bytes = resource.encode(Encoding::of(&path).unwrap()).unwrap();
                std::fs::write(&path, &bytes).unwrap();
                assert_eq!(
                    existing(&path),
                    Some((filter.clone(), names_bundle.clone())),
                    "{name}"
                );
                // The configuration is carried byte for byte, in both encodings.
                let carried = match Encoding::of(&path).unwrap() {
                    Encoding::Json => {
                        let json: serde_json::Value = serde_json::from_slice(&bytes).unwrap();
                        let typed = &json["resources"][0]["typed_config"];
                        let value = typed["filter_config"]["value"]
                            .as_str()
                            .or(typed["config"]["configuration"]["value"].as_str());
                        value.unwrap().to_owned()
                    }
                    Encoding::Binary => configuration_of(&bytes),
                };
                assert_eq!(carried, configuration, "{name}");
            }
            // And both say the same of everything else Envoy reads.
            let json: serde_json::Value =
                serde_json::from_slice(&resource.encode(Encoding::Json).unwrap()).unwrap();
            let binary =
                DiscoveryResponse::decode(resource.encode(Encoding::Binary).unwrap().as_slice())
                    .unwrap();
            assert_eq!(json["version_info"], binary.version_info.as_str());
            let typed = TypedExtensionConfig::decode(binary.resources[0].value.as_slice())
                .unwrap()
                .typed_config
                .unwrap();
            assert_eq!(
                json["resources"][0]["typed_config"]["@type"],
                typed.type_url.as_str()
            );
            let json = &json["resources"][0]["typed_config"];
            match filter {
                Filter::Module(_) => {
                    let m = DynamicModuleFilter::decode(typed.value.as_slice()).unwrap();
                    let config = m.dynamic_module_config.unwrap();
                    assert_eq!(json["filter_name"], m.filter_name.as_str());
                    assert_eq!(
                        json["dynamic_module_config"]["do_not_close"],
                        config.do_not_close
                    );
                    assert_eq!(
                        json["dynamic_module_config"]["metrics_namespace"],
                        config.metrics_namespace.as_str()
                    );
                }
                Filter::Wasm(_) => {
                    let w = Wasm::decode(typed.value.as_slice())
                        .unwrap()
                        .config
                        .unwrap();
                    let plugin_config::Vm::VmConfig(vm) = w.vm.unwrap();
                    let env = vm.environment_variables.unwrap();
                    assert_eq!(json["config"]["failure_policy"], "FAIL_CLOSED");
                    assert_eq!(w.failure_policy, FailurePolicy::FailClosed as i32);
                    assert_eq!(
                        json["config"]["vm_config"]["environment_variables"]["key_values"]
                            [KEYS_VARIABLE],
                        env.key_values[KEYS_VARIABLE].as_str()
                    );
                    assert_eq!(env.key_values[KEYS_VARIABLE], "k1,k2");
                    assert_eq!(json["config"]["vm_config"]["runtime"], vm.runtime.as_str());
                }
            }
        }
        std::fs::remove_dir_all(&dir).ok();
    }
}
