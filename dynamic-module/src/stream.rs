//! One request: Envoy's headers in, the decision's effects out. Nothing is decided here.

use std::time::{SystemTime, UNIX_EPOCH};

use tokengate_core::decision::{self, Reason};
use tokengate_core::{Decision, Gate, Request};

/// The filter state key holding [`Decision::log_fields`] (`%FILTER_STATE(tokengate:PLAIN)%`
/// in the access log; the RBAC guard reads it too).
pub const FILTER_STATE_KEY: &str = "tokengate";

/// What a request's filter can ask of Envoy.
pub trait Host {
    /// Every request header pair, pseudo-headers included, repeats in order.
    fn request_headers(&self) -> Vec<(String, String)>;
    /// Sets (`Some`) or removes (`None`) a request header.
    fn set_request_header(&mut self, name: &str, value: Option<&str>);
    /// Answers the request instead of forwarding it.
    fn send_response(&mut self, status: u16, headers: &[(&str, &str)], body: &str);
    /// Counts one decision for `reason`.
    fn count(&mut self, reason: Reason);
    /// Records `fields` where the access log and the RBAC guard read them.
    fn record(&mut self, fields: &str);
}

/// Whether Envoy should pass the request on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Headers adjusted; continue to the next filter.
    Forward,
    /// A response was sent; stop.
    Answered,
}

/// Decides the request on `gate` (503 without one) and applies the decision through `host`.
pub fn on_request_headers(gate: Option<&Gate>, host: &mut impl Host) -> Verdict {
    let decision = decide(gate, host);
    host.count(decision.reason);
    host.record(&decision.log_fields());
    // Forward only on Allow: any other decision answers (a deny without its denial, 503).
    if let Some(denial) = decision.refusal() {
        let headers: Vec<(&str, &str)> = denial
            .headers
            .iter()
            .map(|(n, v)| (*n, v.as_str()))
            .collect();
        host.send_response(denial.status, &headers, &denial.body);
        return Verdict::Answered;
    }
    for name in &decision.remove_headers {
        host.set_request_header(name, None);
    }
    for (name, value) in &decision.add_headers {
        host.set_request_header(name, Some(value));
    }
    if let Some(path) = &decision.rewrite_path {
        host.set_request_header(":path", Some(path));
    }
    Verdict::Forward
}

fn decide(gate: Option<&Gate>, host: &impl Host) -> Decision {
    let Some(gate) = gate else {
        return decision::unavailable(Reason::NoBundle);
    };
    let headers = host.request_headers();
    let pseudo = |name: &str| {
        headers
            .iter()
            .find(|(n, _)| n == name)
            .map_or("", |(_, v)| v.as_str())
    };
    let request = Request {
        method: pseudo(":method"),
        path: pseudo(":path"),
        authority: pseudo(":authority"),
        headers: &headers,
    };
    gate.decide(&request, now())
}

/// Unix seconds. (Envoy offers a module no clock; the OS clock is what its own time reads.)
fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// The 503 a hook answers when it could not run (a panic caught at the boundary).
pub fn internal_error() -> Decision {
    decision::unavailable(Reason::Internal)
}
