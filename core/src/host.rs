//! What an Envoy filter does with a decision, written once for both of them (the dynamic
//! module and the proxy-wasm filter): each implements [`Effects`] for its host and calls
//! [`apply`]. Nothing is decided here; a host that cannot make a change fails closed.

use crate::decision::{self, Decision, Denial, Reason, Request};

/// What a filter can ask of its proxy for one request.
pub trait Effects {
    /// Sets (`Some`) or removes (`None`) a request header; `false` if the proxy did not.
    fn set_request_header(&mut self, name: &str, value: Option<&str>) -> bool;
    /// Answers the request instead of forwarding it.
    fn send_response(&mut self, status: u16, headers: &[(&str, &str)], body: &str);
    /// Counts one decision for `reason` (the `tokengate.allowed.*` / `denied.*` counters).
    fn count(&mut self, reason: Reason);
    /// Records [`Decision::log_fields`] where the access log and the RBAC guard read them.
    fn record(&mut self, fields: &str);
    /// Adds the decision to the gate's usage tally ([`crate::usage::Tally::count`]).
    fn tally(&mut self, decision: &Decision);
}

/// Whether the proxy should pass the request on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Headers changed as decided; continue to the next filter.
    Forward,
    /// A response was sent; stop.
    Answered,
}

/// Applies `decision` through `host`: forwards only an Allow whose every header change was
/// made (a change the proxy refuses turns it into a 503, reason `internal`); anything else
/// is answered with its denial (a deny without one: 503). Counts, tallies and records what
/// was done.
pub fn apply(mut decision: Decision, host: &mut impl Effects) -> Verdict {
    if decision.refusal().is_none() && !edit_headers(host, &decision) {
        decision = decision::unavailable(Reason::Internal);
    }
    host.count(decision.reason);
    host.tally(&decision);
    host.record(&decision.log_fields());
    match send(host, &decision) {
        true => Verdict::Answered,
        false => Verdict::Forward,
    }
}

/// Sends `decision`'s refusal; `false` if it forwards.
pub fn send(host: &mut impl Effects, decision: &Decision) -> bool {
    let Some(denial) = decision.refusal() else {
        return false;
    };
    respond(host, &denial);
    true
}

/// Sends `response` (a refusal, or the gate's own answer such as a usage report).
pub fn respond(host: &mut impl Effects, response: &Denial) {
    let headers: Vec<(&str, &str)> = response
        .headers
        .iter()
        .map(|(n, v)| (*n, v.as_str()))
        .collect();
    host.send_response(response.status, &headers, &response.body);
}

/// Makes the decision's header changes; `false` as soon as the proxy refuses one.
fn edit_headers(host: &mut impl Effects, decision: &Decision) -> bool {
    let removals = decision
        .remove_headers
        .iter()
        .map(|name| (name.as_str(), None));
    let additions = decision
        .add_headers
        .iter()
        .map(|(name, value)| (*name, Some(value.as_str())));
    let path = decision.rewrite_path.as_deref().map(|p| (":path", Some(p)));
    removals
        .chain(additions)
        .chain(path)
        .all(|(name, value)| host.set_request_header(name, value))
}

impl<'a> Request<'a> {
    /// The request a proxy hands over as header pairs, pseudo-headers (`:method`, `:path`,
    /// `:authority`) among them; a missing one reads as empty (and is refused as such).
    pub fn from_pairs(headers: &'a [(&'a str, &'a str)]) -> Self {
        let pseudo = |name: &str| {
            headers
                .iter()
                .find(|(n, _)| *n == name)
                .map_or("", |(_, v)| *v)
        };
        Request {
            method: pseudo(":method"),
            path: pseudo(":path"),
            authority: pseudo(":authority"),
            headers,
        }
    }
}
