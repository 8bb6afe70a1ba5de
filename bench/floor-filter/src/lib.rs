//! The floor of any proxy-wasm filter, for `bench/run.sh`: same SDK (proxy-wasm 0.2.5),
//! same runtime and release profile as tokengate's filter, but the least work a filter that
//! authenticates can do. The plugin configuration picks the mode:
//!
//! - `<token>` — **the floor**: read ONE header with one host call and compare it with
//!   `Bearer <token>`. Equal: continue; anything else: a bare 401. No hashing, no policy, no
//!   metrics, no properties. tokengate's CPU per request ÷ this one's is tokengate's own cost.
//!   Lines after the first are ignored: padded to a bundle's size, this is the reload floor
//!   (what Envoy itself costs to deliver a configuration that large to every VM).
//! - `abi <token>` — diagnostic: the floor plus the host calls tokengate's filter makes per
//!   request (all headers copied in as `String`, the clock, one counter, one
//!   `set_property`, the credential removed and three identity headers set), but no
//!   decision. Separates the proxy-wasm ABI cost from the core's.
//! - `shared <version>` then lines `<sha256 hex> <record>` — diagnostic: the token table the
//!   issue suggests, ONE per Envoy process in proxy-wasm shared data instead of one per VM.
//!   The first VM to see a version stores every line (`set_shared_data`), the others skip;
//!   per request: SHA-256 of the Bearer token and one `get_shared_data`. (A prototype: keys
//!   of an older version are not removed.)

use std::rc::Rc;
use std::time::UNIX_EPOCH;

use proxy_wasm::traits::{Context, HttpContext, RootContext};
use proxy_wasm::types::{Action, ContextType, LogLevel, MetricType};
use sha2::{Digest, Sha256};

proxy_wasm::main! {{
    proxy_wasm::set_log_level(LogLevel::Warn);
    proxy_wasm::set_root_context(|_| Box::new(FloorRoot { mode: Rc::new(Mode::Floor(Vec::new())) }));
}}

enum Mode {
    /// `Bearer <token>`, the only value that passes.
    Floor(Vec<u8>),
    /// As `Floor`, plus tokengate's per-request host calls; the counter id.
    Abi(Vec<u8>, u32),
    /// Tokens are looked up by hash in shared data.
    Shared,
}

struct FloorRoot {
    mode: Rc<Mode>,
}

const VERSION_KEY: &str = "bench.shared.version";
const HEX: &[u8; 16] = b"0123456789abcdef";

fn bearer(token: &[u8]) -> Vec<u8> {
    let mut expected = b"Bearer ".to_vec();
    expected.extend_from_slice(token.trim_ascii());
    expected
}

impl Context for FloorRoot {}

impl RootContext for FloorRoot {
    fn on_configure(&mut self, _: usize) -> bool {
        let config = self.get_plugin_configuration().unwrap_or_default();
        self.mode = Rc::new(if let Some(token) = config.strip_prefix(b"abi ") {
            let counter =
                proxy_wasm::hostcalls::define_metric(MetricType::Counter, "bench.abi.allowed");
            Mode::Abi(bearer(token), counter.unwrap_or_default())
        } else if let Some(table) = config.strip_prefix(b"shared ") {
            let mut lines = table.split(|b| *b == b'\n');
            let version = lines.next().unwrap_or_default();
            let (stored, _) = self.get_shared_data(VERSION_KEY);
            if stored.as_deref() != Some(version) {
                for line in lines.filter(|l| l.len() > 65) {
                    let key = String::from_utf8_lossy(&line[..64]);
                    self.set_shared_data(&key, Some(&line[65..]), None).ok();
                }
                self.set_shared_data(VERSION_KEY, Some(version), None).ok();
            }
            Mode::Shared
        } else {
            // Only the first line: a reload test pads the configuration to a bundle's size.
            Mode::Floor(bearer(
                config.split(|b| *b == b'\n').next().unwrap_or_default(),
            ))
        });
        true
    }

    fn create_http_context(&self, _: u32) -> Option<Box<dyn HttpContext>> {
        Some(Box::new(FloorStream {
            mode: Rc::clone(&self.mode),
        }))
    }

    fn get_type(&self) -> Option<ContextType> {
        Some(ContextType::HttpContext)
    }
}

struct FloorStream {
    mode: Rc<Mode>,
}

impl Context for FloorStream {}

impl FloorStream {
    fn deny(&self) -> Action {
        self.send_http_response(401, vec![("www-authenticate", "Bearer")], None);
        Action::Pause
    }

    /// tokengate's per-request host calls, with fixed values.
    fn tokengate_abi(&self, counter: u32) {
        let headers: Vec<(String, String)> = self
            .get_http_request_headers_bytes()
            .into_iter()
            .map(|(name, value)| (name, String::from_utf8(value).unwrap_or_default()))
            .collect();
        let now = self
            .get_current_time()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        std::hint::black_box((&headers, now));
        proxy_wasm::hostcalls::increment_metric(counter, 1).ok();
        let logged =
            "reason=valid subject=svc-0000007 token_id=tid_0123456789abcdef rule=orders-read";
        self.set_property(vec!["tokengate"], Some(logged.as_bytes()));
        self.set_http_request_header("authorization", None);
        for (name, value) in [
            ("x-tokengate-subject", "svc-0000007"),
            ("x-tokengate-scopes", "orders:read"),
            ("x-tokengate-token-id", "tid_0123456789abcdef"),
        ] {
            self.set_http_request_header(name, Some(value));
        }
    }
}

impl HttpContext for FloorStream {
    fn on_http_request_headers(&mut self, _: usize, _: bool) -> Action {
        let value = self.get_http_request_header_bytes("authorization");
        match (&*self.mode, value) {
            (Mode::Floor(expected), Some(value)) if value[..] == expected[..] => Action::Continue,
            (Mode::Abi(expected, counter), Some(value)) if value[..] == expected[..] => {
                self.tokengate_abi(*counter);
                Action::Continue
            }
            (Mode::Shared, Some(value)) => {
                let Some(token) = value.strip_prefix(b"Bearer ") else {
                    return self.deny();
                };
                let mut key = String::with_capacity(64);
                for byte in Sha256::digest(token) {
                    key.push(char::from(HEX[usize::from(byte >> 4)]));
                    key.push(char::from(HEX[usize::from(byte & 15)]));
                }
                match self.get_shared_data(&key) {
                    (Some(_record), _) => Action::Continue,
                    _ => self.deny(),
                }
            }
            _ => self.deny(),
        }
    }
}
