//! What a gate serves, asked of the gate itself: Envoy through its admin endpoint (the
//! filter's gauges and Envoy's ECDS counters), the Worker through its status endpoint. A
//! push is only reported done once the gate serves what was pushed.

use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use serde::Serialize;

/// The filter's gauge of the bundle version it serves: `tokengate.bundle.version` from the
/// dynamic module, `wasmcustom.tokengate.bundle.version` from the wasm filter.
const VERSION_GAUGE: &str = "tokengate.bundle.version";
const TOKENS_GAUGE: &str = "tokengate.bundle.tokens";
const REFUSED_COUNTER: &str = "tokengate.bundle.refused";
/// How Envoy prefixes a wasm filter's metrics.
const WASM_PREFIX: &str = "wasmcustom.";
/// Envoy's own count of ECDS updates it rejected (a filter that refused the bundle).
const REJECTED_COUNTER: &str = "extension_config_discovery.http_filter.tokengate.update_rejected";
/// How long a push waits for the gate to serve it.
pub const CONFIRM_TIMEOUT: Duration = Duration::from_secs(20);

pub(crate) fn agent() -> ureq::Agent {
    ureq::Agent::config_builder()
        .http_status_as_error(false)
        // A gate never redirects: a redirect would carry a signed request elsewhere.
        .max_redirects(0)
        .timeout_global(Some(Duration::from_secs(10)))
        .build()
        .into()
}

/// A gate's base URL: `https://`, or plain `http://` only to a loopback host (`localhost`,
/// `127.0.0.0/8`, `[::1]`), compared on the parsed host, never on the text.
pub fn base_url(text: &str, what: &str) -> Result<String> {
    let url = url::Url::parse(text).with_context(|| format!("{what} {text:?} is not a URL"))?;
    if !url.username().is_empty() || url.password().is_some() {
        bail!("{what} must not carry credentials");
    }
    if url.query().is_some() || url.fragment().is_some() {
        bail!("{what} must not have a query or fragment");
    }
    let loopback = match url.host() {
        Some(url::Host::Domain(name)) => name.eq_ignore_ascii_case("localhost"),
        Some(url::Host::Ipv4(ip)) => ip.is_loopback(),
        Some(url::Host::Ipv6(ip)) => ip.is_loopback(),
        None => false,
    };
    match url.scheme() {
        "https" => {}
        "http" if loopback => {}
        "http" => bail!(
            "{what} must be https:// (plain http only to localhost, 127.0.0.0/8 or [::1]); got host {:?}",
            url.host_str().unwrap_or_default()
        ),
        other => bail!("{what} must be https://, not {other}://"),
    }
    Ok(url.as_str().trim_end_matches('/').to_owned())
}

/// What an Envoy serves, from its admin endpoint.
#[derive(Debug, Clone, Serialize)]
pub struct EnvoyStatus {
    /// The bundle version the filter serves (`None`: none yet, or no tokengate filter).
    pub version: Option<u64>,
    pub tokens: Option<u64>,
    /// Bundles the filter refused, and ECDS updates Envoy rejected, since it started.
    pub refused: u64,
    pub rejected: u64,
}

/// A response's `Retry-After` in whole seconds, if it has one.
pub(crate) fn retry_after(response: &ureq::http::Response<ureq::Body>) -> Option<u64> {
    response
        .headers()
        .get("retry-after")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok())
}

/// GETs `url` and reads its JSON body; any status but 200 is an error naming `what`.
fn get_json<T: serde::de::DeserializeOwned>(url: &str, what: &str) -> Result<T> {
    let mut response = agent()
        .get(url)
        .call()
        .with_context(|| format!("asking {what} ({url})"))?;
    let status = response.status().as_u16();
    if status != 200 {
        bail!("{what} answered {status} ({url})");
    }
    let text = response
        .body_mut()
        .read_to_string()
        .with_context(|| format!("reading {url}"))?;
    serde_json::from_str(&text).with_context(|| format!("reading {url}"))
}

/// Reads the filter's gauges and Envoy's ECDS counters.
pub fn envoy(admin: &str) -> Result<EnvoyStatus> {
    let url = format!("{admin}/stats?format=json&filter=tokengate");
    let body: serde_json::Value = get_json(&url, "Envoy's admin endpoint")?;
    let stat = |name: &str| {
        body["stats"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|s| s["name"] == name)
            .and_then(|s| s["value"].as_u64())
    };
    // The module's stats, or the wasm filter's; after a switch between the two Envoy keeps
    // both, and as versions only grow, the one with the larger version is served now.
    let (version, tokens) = ["", WASM_PREFIX]
        .map(|prefix| {
            let version = stat(&format!("{prefix}{VERSION_GAUGE}"));
            (version, stat(&format!("{prefix}{TOKENS_GAUGE}")))
        })
        .into_iter()
        .max_by_key(|(version, _)| *version)
        .unwrap_or_default();
    let refused = ["", WASM_PREFIX]
        .map(|prefix| stat(&format!("{prefix}{REFUSED_COUNTER}")).unwrap_or(0))
        .iter()
        .sum();
    // A gauge is 0 until the first bundle: no version yet.
    Ok(EnvoyStatus {
        version: version.filter(|&v| v > 0),
        tokens,
        refused,
        rejected: stat(REJECTED_COUNTER).unwrap_or(0),
    })
}

/// Waits until Envoy serves `version`; fails with what Envoy did instead.
pub fn confirm_envoy(admin: &str, version: u64, before: &EnvoyStatus) -> Result<EnvoyStatus> {
    let started = Instant::now();
    loop {
        let now = envoy(admin)?;
        if now.version == Some(version) {
            return Ok(now);
        }
        if now.rejected > before.rejected || now.refused > before.refused {
            bail!(
                "Envoy refused bundle version {version} and still serves {}; its log says why (\"tokengate: bundle refused: …\"): another environment, untrusted keys, or an older version are the usual causes",
                served(now.version)
            );
        }
        if started.elapsed() > CONFIRM_TIMEOUT {
            bail!(
                "Envoy did not serve bundle version {version} within {} s (it serves {}): is it watching this file?",
                CONFIRM_TIMEOUT.as_secs(),
                served(now.version)
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// What a Worker serves, from its status endpoint.
#[derive(Debug, Clone, Serialize, serde::Deserialize)]
pub struct WorkerStatus {
    pub version: Option<u64>,
    /// SHA-256 of the pushed text it serves (which bundle of that version).
    #[serde(default)]
    pub bundle_sha256: Option<String>,
    pub environment: Option<String>,
    #[serde(default)]
    pub keys: Vec<String>,
    #[serde(default)]
    pub tokens: u64,
    /// A push the Worker is applying.
    #[serde(default)]
    pub pending: Option<PendingPush>,
}

/// A push a Worker has begun and not committed.
#[derive(Debug, Clone, Serialize, serde::Deserialize)]
pub struct PendingPush {
    pub version: u64,
    pub remaining: u64,
}

/// Asks a Worker (`base` from [`base_url`]) what it serves.
pub fn worker(base: &str) -> Result<WorkerStatus> {
    let url = format!("{base}/.well-known/tokengate/status");
    get_json(&url, "the Worker's status endpoint")
}

pub fn served(version: Option<u64>) -> String {
    version.map_or_else(|| "no bundle".to_owned(), |v| format!("version {v}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plain_http_only_to_a_loopback_host_by_its_parsed_name() {
        for ok in [
            "https://gate.example.com",
            "https://gate.example.com/",
            "http://127.0.0.1:8787",
            "http://127.9.9.9",
            "http://localhost:1",
            "http://[::1]:80",
        ] {
            assert!(base_url(ok, "--url").is_ok(), "{ok}");
        }
        for bad in [
            "http://127.0.0.1.evil.com",
            "http://localhost.evil.com",
            "http://evil.com/127.0.0.1",
            "http://10.0.0.1",
            "http://user:pw@127.0.0.1",
            "ftp://127.0.0.1",
            "https://gate.example.com/?x=1",
            "127.0.0.1:8787",
        ] {
            assert!(base_url(bad, "--url").is_err(), "{bad}");
        }
        assert_eq!(
            base_url("https://gate.example.com/", "--url").unwrap(),
            "https://gate.example.com"
        );
    }
}
