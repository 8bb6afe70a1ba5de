//! An embedded wasmtime host implementing the host side of the proxy-wasm ABI 0.2.1 (the
//! parts tokengate's filter imports: header maps, buffers, properties, local responses,
//! logs, metrics, time) and the WASI preview1 calls Rust's std makes (environment, random,
//! stdout/stderr, exit). It loads the built `.wasm` the way Envoy does: one VM, a root
//! context per configuration, an HTTP context per request.
//!
//! Host state lives in the `Store`, so tests run in parallel. Every guest pointer is
//! bounds-checked; a bad one traps the guest. Fuel bounds each call.

mod abi;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use wasmtime::{Config, Engine, Instance, Linker, Module, Store, TypedFunc};
pub use wasmtime::{Error, Result};

/// Where `cargo build -p tokengate-plugin --target wasm32-wasip1 --release` puts the filter.
pub fn filter_path() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../target/wasm32-wasip1/release/tokengate_filter.wasm")
}

/// Fuel for one call into the guest: generous for a decision, finite for a runaway loop.
const FUEL_PER_CALL: u64 = 20_000_000_000;

/// `proxy_on_request_headers` results.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// The request goes on.
    Continue,
    /// The filter holds the request (it sent a local response).
    Pause,
}

/// A local response the filter sent (`proxy_send_local_response`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LocalResponse {
    /// HTTP status.
    pub status: u32,
    /// Response headers.
    pub headers: Vec<(String, String)>,
    /// Response body.
    pub body: Vec<u8>,
}

/// A metric the filter defined.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Metric {
    /// Its name.
    pub name: String,
    /// 0 counter, 1 gauge, 2 histogram.
    pub kind: u32,
    /// Current value.
    pub value: u64,
}

/// Everything the host keeps for one VM.
#[derive(Default)]
pub struct HostState {
    pub(crate) environment: Vec<(String, String)>,
    pub(crate) vm_configuration: Vec<u8>,
    pub(crate) plugin_configuration: Vec<u8>,
    pub(crate) now_nanos: u64,
    /// Header maps by proxy-wasm map type.
    pub(crate) maps: HashMap<u32, Vec<(String, Vec<u8>)>>,
    /// Properties by serialised path (parts joined by NUL).
    pub(crate) properties: HashMap<Vec<u8>, Vec<u8>>,
    pub(crate) local_response: Option<LocalResponse>,
    pub(crate) logs: Vec<(u32, String)>,
    pub(crate) metrics: Vec<Metric>,
    pub(crate) random_state: u64,
    pub(crate) shared: SharedData,
}

/// proxy-wasm shared data: one key-value store for every VM of one `vm_id` in a proxy
/// process. VMs started with the same handle share it, as Envoy's canary and worker VMs do.
#[derive(Clone, Default)]
pub struct SharedData(pub(crate) Arc<Mutex<SharedMap>>);

/// Key → (value, compare-and-swap token).
pub(crate) type SharedMap = HashMap<String, (Vec<u8>, u32)>;

/// What happened to one request.
#[derive(Debug, Clone)]
pub struct Exchange {
    /// What `proxy_on_request_headers` returned.
    pub action: Action,
    /// The local response, if the filter sent one.
    pub local_response: Option<LocalResponse>,
    /// The request headers after the filter ran (what the upstream would get).
    pub forwarded: Vec<(String, Vec<u8>)>,
    /// Properties the filter set during the request, by dotted path.
    pub properties: HashMap<String, String>,
    /// Fuel the guest burnt on the request (context create through delete): wasmtime counts
    /// about one unit per wasm instruction, so this is a deterministic cost, free of timing
    /// noise, that two filters can be compared by.
    pub fuel: u64,
}

/// VMs started so far in this process (seeds each VM's random generator).
static NEXT_VM: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);

/// A compiled filter, ready to start VMs.
pub struct Host {
    engine: Engine,
    module: Module,
    linker: Linker<HostState>,
}

impl Host {
    /// Compiles the `.wasm` at `path`.
    pub fn load(path: &Path) -> Result<Self> {
        let mut config = Config::new();
        config.consume_fuel(true);
        // For profiling: `perf record` then names the guest's functions (build the filter
        // with CARGO_PROFILE_RELEASE_STRIP=false to keep them).
        if std::env::var_os("TOKENGATE_WASM_PERFMAP").is_some() {
            config.profiler(wasmtime::ProfilingStrategy::PerfMap);
        }
        let engine = Engine::new(&config)?;
        let module = Module::from_file(&engine, path).map_err(|e| {
            e.context(format!(
                "loading {}; build it first: cargo build -p tokengate-plugin --target wasm32-wasip1 --release",
                path.display()
            ))
        })?;
        let mut linker = Linker::new(&engine);
        abi::add_to_linker(&mut linker)?;
        // Imports the filter has but never calls (gRPC, shared queues, …) trap if called.
        linker.define_unknown_imports_as_traps(&module)?;
        Ok(Self {
            engine,
            module,
            linker,
        })
    }

    /// Starts a VM with these environment variables (Envoy's `vm_config.environment_variables`)
    /// and shared data of its own.
    pub fn start(&self, environment: &[(&str, &str)]) -> Result<Vm> {
        self.start_shared(environment, &SharedData::default())
    }

    /// Starts a VM that shares `shared` with the other VMs started with it.
    pub fn start_shared(&self, environment: &[(&str, &str)], shared: &SharedData) -> Result<Vm> {
        let state = HostState {
            shared: shared.clone(),
            environment: environment
                .iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                .collect(),
            // Each VM its own sequence, as each has its own draws from the OS in Envoy.
            random_state: 0x9E37_79B9_7F4A_7C15
                ^ NEXT_VM.fetch_add(1, std::sync::atomic::Ordering::Relaxed),
            ..HostState::default()
        };
        let mut store = Store::new(&self.engine, state);
        store.set_fuel(FUEL_PER_CALL)?;
        let instance = self.linker.instantiate(&mut store, &self.module)?;
        if let Ok(init) = instance.get_typed_func::<(), ()>(&mut store, "_initialize") {
            init.call(&mut store, ())?;
        }
        Ok(Vm {
            store,
            instance,
            active_root: None,
            next_context: 1,
        })
    }
}

/// One running VM of the filter.
pub struct Vm {
    store: Store<HostState>,
    instance: Instance,
    active_root: Option<u32>,
    next_context: u32,
}

impl Vm {
    fn func<P: wasmtime::WasmParams, R: wasmtime::WasmResults>(
        &mut self,
        name: &str,
    ) -> Result<TypedFunc<P, R>> {
        self.instance.get_typed_func::<P, R>(&mut self.store, name)
    }

    fn refuel(&mut self) -> Result<()> {
        self.store.set_fuel(FUEL_PER_CALL)
    }

    /// The guest's linear memory in bytes. Wasm memory only grows, so this is the high-water
    /// mark of everything the filter has held at once so far.
    pub fn memory_bytes(&mut self) -> Result<usize> {
        let memory = self
            .instance
            .get_memory(&mut self.store, "memory")
            .ok_or_else(|| Error::msg("the filter exports no memory"))?;
        Ok(memory.data_size(&self.store))
    }

    /// Creates a root context and configures it, as Envoy does for each (re)configuration.
    /// On `true` the new root serves requests; on `false` the previous one keeps serving.
    pub fn configure(&mut self, plugin_configuration: &[u8]) -> Result<bool> {
        self.refuel()?;
        let root = self.next_context;
        self.next_context += 1;
        self.store.data_mut().plugin_configuration = plugin_configuration.to_vec();
        let vm_size = u32::try_from(self.store.data().vm_configuration.len())?;
        let config_size = u32::try_from(plugin_configuration.len())?;
        self.func::<(u32, u32), ()>("proxy_on_context_create")?
            .call(&mut self.store, (root, 0))?;
        let started = self
            .func::<(u32, u32), u32>("proxy_on_vm_start")?
            .call(&mut self.store, (root, vm_size))?;
        let configured = started != 0
            && self
                .func::<(u32, u32), u32>("proxy_on_configure")?
                .call(&mut self.store, (root, config_size))?
                != 0;
        if configured {
            self.active_root = Some(root);
        }
        Ok(configured)
    }

    /// Runs one request's headers through the filter at `now_nanos`.
    pub fn request(&mut self, headers: Vec<(String, Vec<u8>)>, now_nanos: u64) -> Result<Exchange> {
        let root = self
            .active_root
            .ok_or_else(|| Error::msg("no root context is configured"))?;
        self.refuel()?;
        let context = self.next_context;
        self.next_context += 1;
        let count = u32::try_from(headers.len())?;
        {
            let state = self.store.data_mut();
            state.now_nanos = now_nanos;
            state.local_response = None;
            state.properties.clear();
            state.maps.insert(abi::REQUEST_HEADERS, headers);
        }
        self.func::<(u32, u32), ()>("proxy_on_context_create")?
            .call(&mut self.store, (context, root))?;
        let action = self
            .func::<(u32, u32, u32), u32>("proxy_on_request_headers")?
            .call(&mut self.store, (context, count, 1))?;
        let state = self.store.data_mut();
        let exchange = Exchange {
            action: if action == 0 {
                Action::Continue
            } else {
                Action::Pause
            },
            local_response: state.local_response.take(),
            forwarded: state.maps.remove(&abi::REQUEST_HEADERS).unwrap_or_default(),
            properties: state
                .properties
                .iter()
                .map(|(k, v)| {
                    let path = String::from_utf8_lossy(k).replace('\0', ".");
                    (path, String::from_utf8_lossy(v).into_owned())
                })
                .collect(),
            fuel: 0,
        };
        self.func::<u32, u32>("proxy_on_done")?
            .call(&mut self.store, context)?;
        self.func::<u32, ()>("proxy_on_log")?
            .call(&mut self.store, context)?;
        self.func::<u32, ()>("proxy_on_delete")?
            .call(&mut self.store, context)?;
        Ok(Exchange {
            fuel: FUEL_PER_CALL - self.store.get_fuel()?,
            ..exchange
        })
    }

    /// Fires the root context's timer once (Envoy calls `on_tick` every tick period the filter
    /// set).
    pub fn tick(&mut self) -> Result<()> {
        let root = self
            .active_root
            .ok_or_else(|| Error::msg("no root context is configured"))?;
        self.refuel()?;
        self.func::<u32, ()>("proxy_on_tick")?
            .call(&mut self.store, root)
    }

    /// The value of a metric by name.
    pub fn metric(&self, name: &str) -> Option<u64> {
        self.store
            .data()
            .metrics
            .iter()
            .find(|m| m.name == name)
            .map(|m| m.value)
    }

    /// Every metric defined so far.
    pub fn metrics(&self) -> &[Metric] {
        &self.store.data().metrics
    }

    /// Everything the filter logged (level, message), WASI stdout/stderr included at level 2.
    pub fn logs(&self) -> &[(u32, String)] {
        &self.store.data().logs
    }
}
