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
/// From Envoy's own environment: only the environment name, never a key.
const HOST_ENV_KEYS: [&str; 1] = ["TOKENGATE_ENVIRONMENT"];
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
        Ok(match self {
            Filter::Module(_) => Filter::Module(path),
            Filter::Wasm(_) => Filter::Wasm(path),
        })
    }
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
pub fn module_reference(bundle: &Path, sha256: &str, trusted_keys: &str) -> String {
    serde_json::json!({
        "bundle": bundle.display().to_string(),
        "sha256": sha256,
        "trusted_keys": trusted_keys,
    })
    .to_string()
}

/// The name of the module's bundle file for `version` with digest `sha256`, in
/// [`bundle_directory`].
pub fn bundle_name(version: u64, sha256: &str) -> String {
    format!("v{version}-{sha256}.json")
}

/// The directory of the module's bundle files for `ecds_file`.
pub fn bundle_directory(ecds_file: &Path) -> PathBuf {
    ecds_file
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."))
        .join(BUNDLE_DIRECTORY)
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
                    "module": { "local": { "filename": library.display().to_string() } },
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
                        "code": { "local": { "filename": wasm.display().to_string() } },
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
            specifier: Some(data_source::Specifier::Filename(path.display().to_string())),
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

    #[test]
    fn both_encodings_say_the_same_and_read_back() {
        let dir = std::env::temp_dir().join(format!("tokengate-ecds-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let module = Filter::Module("/opt/libtokengate.so".into());
        let wasm = Filter::Wasm("/opt/tokengate_filter.wasm".into());
        let bundle = bundle_directory(&dir.join("e.json")).join(bundle_name(7, &"ab".repeat(32)));
        let reference = module_reference(&bundle, &"ab".repeat(32), "k1,k2");
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
                // The configuration is carried byte for byte.
                assert!(
                    bytes
                        .windows(configuration.len())
                        .any(|w| w == configuration.as_bytes())
                        || name.ends_with(".json"),
                    "{name}"
                );
            }
        }
        std::fs::remove_dir_all(&dir).ok();
    }
}
