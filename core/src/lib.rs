//! tokengate-core: every decision tokengate makes, written once.
//!
//! The core is pure: it does no I/O, reads no clock and draws no randomness. Callers (the
//! Envoy filter, the Cloudflare Worker, the admin CLI) pass the current time in, and
//! translate the [`Decision`] into their host's terms. It verifies signatures and never
//! makes one: private keys are the admin's alone.
//!
//! - [`token`]: the token format (generate, parse, checksum, hash, public id).
//! - [`keys`]: the admin's Ed25519 public keys, key ids and trusted key sets.
//! - [`bundle`]: the signed `tokengate.bundle/v2` document.
//! - [`gate`]: a verified bundle loaded into a [`Gate`].
//! - [`policy`]: ordered rules, path normalisation, scope grants.
//! - [`rate`]: rate limits per token (which applies, the fixed-window count, the 429).
//! - [`credentials`]: where a request's credential is read from.
//! - [`decision`]: `Gate::decide(request, now)`.
//! - [`access`]: Cloudflare Access assertions (parsing and claims; the host checks signatures).
//! - [`jwt`]: the one JWT reader, for Access assertions and signed tokens.
//! - [`issuer`]: signed short-lived tokens: trusted issuers and every check of one token.
//! - [`host`]: what an Envoy filter does with a decision (headers, response, counters).
//! - [`pages`]: token sets split into content-addressed pages (the Worker's storage and pushes).
//! - [`signed`]: signed admin requests (pushes, usage reads).
//! - [`usage`]: per-token usage counts, the signed read that collects them, the report.
//! - [`verified`]: signed tokens whose Ed25519 signature a gate verified already.
#![warn(missing_docs)]

pub mod access;
pub mod bundle;
pub mod credentials;
pub mod decision;
pub mod gate;
pub mod hex;
pub mod host;
pub mod issuer;
pub mod jwt;
pub mod keys;
pub mod pages;
pub mod policy;
pub mod rate;
pub mod signed;
pub mod token;
pub mod usage;
pub mod verified;

pub use bundle::{Bundle, BundleError, Expectation, Target, TokenRecord};
pub use decision::{AccessPending, Decision, Denial, Outcome, Pending, Reason, Request, Step};
pub use gate::{Gate, Record, Served};
pub use keys::{KeySet, PublicKey};
