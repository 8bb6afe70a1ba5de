//! tokengate-core: every decision tokengate makes, written once.
//!
//! The core is pure: it does no I/O, reads no clock and draws no randomness. Callers (the
//! Envoy filter, the Cloudflare Worker, the admin CLI) pass the current time and any random
//! bytes in, and translate the [`Decision`] into their host's terms.
//!
//! - [`token`]: the token format (generate, parse, checksum, hash, public id).
//! - [`bundle`]: the signed `tokengate.bundle/v1` document and its validation into a [`Gate`].
//! - [`policy`]: ordered rules, path normalisation, scope grants.
//! - [`credentials`]: where a request's credential is read from.
//! - [`decision`]: `Gate::decide(request, now)`.
//! - [`json`]: the strict JSON reader every document is loaded with.
//! - [`access`]: Cloudflare Access assertions (parsing and claims; the host checks signatures).
#![warn(missing_docs)]

pub mod access;
pub mod bundle;
pub mod credentials;
pub mod decision;
mod hex;
pub mod json;
pub mod policy;
pub mod token;

pub use bundle::{Bundle, BundleError, Expectation, Gate, Record, SigningKey, Target, TokenRecord};
pub use decision::{AccessPending, Decision, Denial, Outcome, Pending, Reason, Request, Step};
