//! Rate limits on Cloudflare: the Workers Rate Limiting binding.
//!
//! A binding's limit and period are fixed in `wrangler.toml`, and the period is 10 or 60
//! seconds, so each limit the policy or a token uses needs a binding of its own, named after
//! it: `TOKENGATE_RATE_<requests>_PER_MINUTE` with `simple = { limit = <requests>, period =
//! 60 }`. Counters are keyed by the core's counter key (the rule and the token name, or the
//! token name). Cloudflare counts per location and eventually consistently: a client spread
//! over locations, or fast enough to outrun the count, can pass more (worker/README.md).
//!
//! A push whose policy names a limit without a binding is refused; a request whose limit has
//! no binding (a token's own, or a binding removed since) is answered 503: never unmetered.
//! Counter keys start with the Worker's environment: a namespace id shared by two
//! deployments (staging, prod) does not make them share counters.

use core::ops::ControlFlow;
use tokengate_core::policy::Policy;

use tokengate_core::rate::{self, Admission, Limit, RateLimit};
use tokengate_core::{Decision, Target};
use worker::{console_error, Env};

/// The binding that counts `rate`; `None` for a period the binding cannot count.
pub fn binding_name(rate: RateLimit) -> Option<String> {
    rate.countable_on(Target::Worker)
        .then(|| format!("TOKENGATE_RATE_{}_PER_MINUTE", rate.requests))
}

/// The binding for `rate`, or what is missing.
fn binding(env: &Env, rate: RateLimit) -> Result<worker::RateLimiter, String> {
    let name = binding_name(rate)
        .ok_or_else(|| format!("a rate limit of {rate}: the Worker counts per minute only"))?;
    env.rate_limiter(&name).map_err(|e| {
        format!(
            "a rate limit of {rate} needs the Rate Limiting binding {name} (simple = {{ limit = {}, period = 60 }}) in wrangler.toml: {e}",
            rate.requests
        )
    })
}

/// The first of the policy's limits that has no binding here, described for the admin.
pub fn missing_binding(env: &Env, policy: &Policy) -> Option<String> {
    policy
        .rules
        .iter()
        .filter_map(|rule| rule.rate_limit.map(|rate| (rule, rate)))
        .find_map(|(rule, rate)| {
            binding(env, rate)
                .err()
                .map(|problem| format!("rule {:?}: {problem}", rule.name))
        })
}

/// Charges a decision's limits in order, as [`rate::enforce`] does (the core's
/// [`Decision::charged`] says what each answer makes of it), with the binding's calls
/// awaited; a limit that cannot be counted is logged as an error. `environment`: the one
/// this Worker serves, which starts every counter key.
pub async fn enforce(env: &Env, mut decision: Decision, environment: &str, now: u64) -> Decision {
    for index in 0..decision.rate_limits.len() {
        let limit = &decision.rate_limits[index];
        let admission = charge(env, limit, environment, now).await;
        if let Err(problem) = &admission {
            console_error!("tokengate: cannot count a rate limit, failing closed: {problem}");
        }
        decision = match decision.charged(index, admission.ok()) {
            ControlFlow::Continue(next) => next,
            ControlFlow::Break(answer) => return answer,
        };
    }
    decision.within_limits()
}

/// Charges one request to `limit` at `now` (unix seconds). The binding says only whether the
/// request is within the limit; the reset is the end of the minute, the window the binding
/// counts in (it runs from :00, as the core's do).
async fn charge(
    env: &Env,
    limit: &Limit,
    environment: &str,
    now: u64,
) -> Result<Admission, String> {
    let limiter = binding(env, limit.rate)?;
    let outcome = limiter
        .limit(format!("{environment}/{}", limit.key))
        .await
        .map_err(|e| format!("rate limit binding: {e}"))?;
    Ok(Admission {
        allowed: outcome.success,
        reset: rate::window_end(limit.rate, now) - now,
    })
}
