//! tokengate as an Envoy dynamic module: a native HTTP filter over `tokengate-core`.
//!
//! A thin adapter, like the proxy-wasm filter: the core decides, this crate moves headers,
//! time, metrics and the configuration between Envoy and the core.
//!
//! - [`config`]: the filter configuration (a reference to a bundle file: path, SHA-256 and
//!   the admin's public keys) and the one gate per process every worker thread shares.
//! - [`stream`]: one request, from Envoy's headers to the decision's effects.
//! - [`usage`]: the process's per-token usage tally, one table per worker thread.
//! - [`limits`]: the process's rate-limit counters, one lock-free map every thread shares.
//! - `ffi`: the C ABI of Envoy 1.40's dynamic modules; the only `unsafe` code.
//!
//! Fail closed: no bundle yet → 503; a refused configuration is rejected (Envoy keeps the
//! previous one); a panic in any hook is caught and answered 503.

// The hooks catch panics to answer 503 instead of taking Envoy down; with `panic = "abort"`
// (the workspace's release profile) there would be nothing to catch.
#[cfg(all(not(test), panic = "abort"))]
compile_error!("build the module with `--profile native` (panic = \"unwind\"), not --release");

pub mod config;
pub mod limits;
pub mod stream;
pub mod usage;

#[cfg(not(test))]
#[allow(unsafe_code)]
mod ffi;
