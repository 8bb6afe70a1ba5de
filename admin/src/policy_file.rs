//! The policy file: the route rules and credential sources, in TOML, validated by the core
//! before the store takes it. Errors name the file and line.

use anyhow::{anyhow, Result};
use serde::{Deserialize, Serialize};
use tokengate_core::bundle::{AccessConfig, CredentialConfig};
use tokengate_core::credentials;
use tokengate_core::policy::{self, Policy, PolicyError, Rule};

/// What `tokengate policy set FILE` reads.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PolicyFile {
    /// Where credentials are read from, in order.
    pub credentials: CredentialConfig,
    /// Cloudflare Access (Worker only).
    #[serde(default)]
    pub cloudflare_access: Option<AccessConfig>,
    /// Ordered rules; the first match decides.
    #[serde(default)]
    pub rules: Vec<Rule>,
}

impl PolicyFile {
    /// The core's policy model.
    pub fn policy(&self) -> Policy {
        Policy {
            rules: self.rules.clone(),
        }
    }
}

/// The rule a policy error is about, to find its line.
fn rule_of(error: &PolicyError) -> Option<&str> {
    match error {
        PolicyError::BadRuleName(rule)
        | PolicyError::DuplicateRuleName(rule)
        | PolicyError::ScopesOnPublicRule(rule)
        | PolicyError::RateLimitOnPublicRule(rule)
        | PolicyError::BadRateLimit(rule) => Some(rule),
        PolicyError::BadPath { rule, .. }
        | PolicyError::BadMethod { rule, .. }
        | PolicyError::BadHost { rule }
        | PolicyError::BadScope { rule, .. } => Some(rule),
        _ => None,
    }
}

fn line_of(text: &str, needle: &str) -> Option<usize> {
    text.lines()
        .position(|line| line.contains(needle))
        .map(|i| i + 1)
}

/// Parses and validates a policy file's text.
pub fn parse(path: &str, text: &str) -> Result<PolicyFile> {
    let file: PolicyFile = toml::from_str(text).map_err(|e| {
        let line = e
            .span()
            .map(|span| text[..span.start.min(text.len())].matches('\n').count() + 1);
        let message = e.message().to_owned();
        match line {
            Some(line) => anyhow!("{path}:{line}: {message}"),
            None => anyhow!("{path}: {message}"),
        }
    })?;
    if let Err(error) = policy::validate(&file.policy()) {
        let rule_line = rule_of(&error).and_then(|rule| line_of(text, &format!("\"{rule}\"")));
        // A limit's error points at the rule's `rate_limit` line.
        let limit_line = rule_line
            .filter(|_| {
                matches!(
                    error,
                    PolicyError::RateLimitOnPublicRule(_) | PolicyError::BadRateLimit(_)
                )
            })
            .and_then(|after| {
                text.lines()
                    .enumerate()
                    .skip(after)
                    .find(|(_, line)| line.trim_start().starts_with("rate_limit"))
                    .map(|(i, _)| i + 1)
            });
        let line = limit_line
            .or(rule_line)
            .map_or(String::new(), |l| format!(":{l}"));
        return Err(anyhow!("{path}{line}: {error}"));
    }
    if let Err(error) = credentials::parse_sources(&file.credentials.sources) {
        let line = line_of(text, "sources").map_or(String::new(), |l| format!(":{l}"));
        return Err(anyhow!("{path}{line}: credentials: {error}"));
    }
    if let Some(access) = &file.cloudflare_access {
        // What the Worker would refuse at the first push is refused here, with its line.
        if let Err(error) = tokengate_core::access::Settings::from_config(access) {
            let line = line_of(text, "certs_url").map_or(String::new(), |l| format!(":{l}"));
            return Err(anyhow!("{path}{line}: {error}"));
        }
    }
    if file.rules.iter().any(|r| r.cf_access) && file.cloudflare_access.is_none() {
        return Err(anyhow!(
            "{path}: a rule sets cf_access but there is no [cloudflare_access] section"
        ));
    }
    Ok(file)
}

/// The policy a new store starts with: bearer and the usual internal headers; health public;
/// everything else needs a valid token.
pub const DEFAULT_POLICY: &str = r#"# tokengate policy: ordered rules, the first match decides; no match is denied.
[credentials]
sources = ["bearer", "header:x-internal-token", "header:x-internal-api-key"]
forward = false

[[rules]]
name = "health"
path = { exact = "/healthz" }
methods = ["GET", "HEAD"]
access = "public"

[[rules]]
name = "everything-else"
path = { prefix = "/" }
access = "token"
"#;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_policy_is_valid() {
        let file = parse("default", DEFAULT_POLICY).unwrap();
        assert_eq!(file.rules.len(), 2);
    }

    #[test]
    fn errors_point_at_the_line() {
        let bad_path = DEFAULT_POLICY.replace("prefix = \"/\"", "prefix = \"/api/../x\"");
        let error = parse("p.toml", &bad_path).unwrap_err().to_string();
        assert!(error.starts_with("p.toml:13:"), "{error}");
        let unknown = DEFAULT_POLICY.replace("forward = false", "forward = false\nfoo = 1");
        let error = parse("p.toml", &unknown).unwrap_err().to_string();
        assert!(
            error.starts_with("p.toml:5:") && error.contains("foo"),
            "{error}"
        );
        let bad_access = format!(
            "{DEFAULT_POLICY}\n[cloudflare_access]\ncerts_url = \"http://team.example.com/certs\"\naudiences = [\"aud\"]\n"
        );
        let error = parse("p.toml", &bad_access).unwrap_err().to_string();
        assert!(
            error.starts_with("p.toml:18:") && error.contains("certs_url"),
            "{error}"
        );
        let limited = DEFAULT_POLICY.replace(
            "access = \"token\"",
            "access = \"token\"\nrate_limit = { requests = 600, per = \"minute\" }",
        );
        let file = parse("p.toml", &limited).unwrap();
        assert_eq!(
            file.rules[1].rate_limit.map(|l| l.to_string()).as_deref(),
            Some("600/minute")
        );
        let zero = limited.replace("requests = 600", "requests = 0");
        let error = parse("p.toml", &zero).unwrap_err().to_string();
        assert!(error.starts_with("p.toml:16:"), "{error}");
        let per_day = limited.replace("\"minute\"", "\"day\"");
        let error = parse("p.toml", &per_day).unwrap_err().to_string();
        assert!(
            error.starts_with("p.toml:16:") && error.contains("day"),
            "{error}"
        );
        let public = DEFAULT_POLICY.replace(
            "access = \"public\"",
            "access = \"public\"\nrate_limit = { requests = 5, per = \"second\" }",
        );
        let error = parse("p.toml", &public).unwrap_err().to_string();
        assert!(
            error.starts_with("p.toml:11:") && error.contains("public"),
            "{error}"
        );
        let bad_source = DEFAULT_POLICY.replace("\"bearer\",", "\"cookie:x\",");
        let error = parse("p.toml", &bad_source).unwrap_err().to_string();
        assert!(error.starts_with("p.toml:3:"), "{error}");
    }
}
