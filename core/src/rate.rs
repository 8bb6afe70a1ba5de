//! Rate limits per token: a rule's (`rate_limit = { requests = 600, per = "minute" }`, for
//! each token on that rule) and a token's own (`tokengate create --rate 100/s`, for the token
//! wherever it is used). Both apply: a request is charged to each, the stricter first, and
//! the first that is full refuses it, so whichever is tighter binds at every moment. A
//! request refused by the second has been counted by the first.
//!
//! Counting is a fixed window aligned to the epoch (a minute window runs from :00 to :59):
//! the same windows on every Envoy and in local workerd's Rate Limiting binding, so a client
//! that waits `Retry-After` seconds finds a fresh window (Cloudflare does not document where
//! its binding's windows start: there `Retry-After` is the time to the next minute). A counter is one `u64`
//! ([`Window`]: the window's end and the count in it), so a host can keep it in one atomic
//! word or one shared-data entry and update it by compare-and-swap; the core computes every
//! step ([`admit`]), the host only stores the result.
//!
//! A [`Decision`] that passes carries the [`Limit`]s to charge and is not forwarded until the
//! host has charged them ([`enforce`], or [`Decision::within_limits`] for a host that counts
//! asynchronously): a host that skipped the count would answer 503, never pass unmetered.

use core::fmt;
use core::ops::ControlFlow;
use core::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::bundle::Target;
use crate::decision::{error_body, Decision, Denial, Outcome, Reason};

/// The most requests a limit may allow per window.
pub const MAX_REQUESTS: u32 = 1_000_000;

/// The window a limit counts over.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Period {
    /// One second.
    Second,
    /// Sixty seconds, from :00.
    Minute,
    /// 3,600 seconds, from the top of the hour.
    Hour,
}

impl Period {
    /// The window's length in seconds.
    pub fn seconds(self) -> u64 {
        match self {
            Self::Second => 1,
            Self::Minute => 60,
            Self::Hour => 3_600,
        }
    }

    fn as_str(self) -> &'static str {
        match self {
            Self::Second => "second",
            Self::Minute => "minute",
            Self::Hour => "hour",
        }
    }
}

/// `requests` per `per`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RateLimit {
    /// Requests allowed in one window, 1 to [`MAX_REQUESTS`].
    pub requests: u32,
    /// The window.
    pub per: Period,
}

impl RateLimit {
    /// Why the limit cannot be used, if it cannot.
    pub fn problem(&self) -> Option<&'static str> {
        (self.requests == 0 || self.requests > MAX_REQUESTS)
            .then_some("a rate limit allows 1 to 1000000 requests per window")
    }

    /// Whether a gate of `target` can count this limit: Envoy any; the Worker per minute only
    /// (Cloudflare's Rate Limiting binding counts over 10 or 60 s).
    pub fn countable_on(&self, target: Target) -> bool {
        match target {
            Target::Envoy => true,
            Target::Worker => self.per == Period::Minute,
        }
    }

    /// The stricter of two limits: the lower average rate; of two equal rates, the shorter
    /// window (the smaller burst); of two equal limits, `self`.
    pub fn stricter(self, other: RateLimit) -> RateLimit {
        let mine = u64::from(self.requests) * other.per.seconds();
        let theirs = u64::from(other.requests) * self.per.seconds();
        match mine.cmp(&theirs) {
            core::cmp::Ordering::Less => self,
            core::cmp::Ordering::Greater => other,
            core::cmp::Ordering::Equal if other.per.seconds() < self.per.seconds() => other,
            core::cmp::Ordering::Equal => self,
        }
    }
}

impl fmt::Display for RateLimit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.requests, self.per.as_str())
    }
}

/// Why a `N/period` text is not a limit.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParseRateError(String);

impl fmt::Display for ParseRateError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "rate {:?} must be REQUESTS/PERIOD, like 100/s, 600/minute or 5000/h (1 to {MAX_REQUESTS} requests)",
            self.0
        )
    }
}

impl std::error::Error for ParseRateError {}

impl FromStr for RateLimit {
    type Err = ParseRateError;

    /// `100/s`, `100/sec`, `100/second`, `600/m`, `600/min`, `600/minute`, `5000/h`, `5000/hour`.
    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let bad = || ParseRateError(text.to_owned());
        let (requests, per) = text.split_once('/').ok_or_else(bad)?;
        if !requests.bytes().all(|b| b.is_ascii_digit()) {
            return Err(bad());
        }
        let per = match per {
            "s" | "sec" | "second" => Period::Second,
            "m" | "min" | "minute" => Period::Minute,
            "h" | "hour" => Period::Hour,
            _ => return Err(bad()),
        };
        let limit = RateLimit {
            requests: requests.parse().map_err(|_| bad())?,
            per,
        };
        match limit.problem() {
            Some(_) => Err(bad()),
            None => Ok(limit),
        }
    }
}

/// The limit one allowed request is charged to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Limit {
    /// The counter: `r/<rule>/<token name>` for a rule's limit, `t/<token name>` for the
    /// token's own. Keyed by name, so the two secrets of a rotation share one budget.
    pub key: String,
    /// The limit.
    pub rate: RateLimit,
    /// The policy's name in `RateLimit-Policy`: the rule's name, or `token`.
    pub policy: String,
}

impl Limit {
    /// The limits that apply to `token` on `rule`: the rule's and the token's own, the
    /// stricter first (it is the likelier to refuse, and a request it refuses is counted by
    /// neither).
    pub(crate) fn of(
        rule_name: &str,
        rule: Option<RateLimit>,
        token_name: &str,
        token: Option<RateLimit>,
    ) -> Vec<Limit> {
        let by_rule = rule.map(|rate| Limit {
            key: format!("r/{rule_name}/{token_name}"),
            rate,
            policy: rule_name.to_owned(),
        });
        let by_token = token.map(|rate| Limit {
            key: format!("t/{token_name}"),
            rate,
            policy: "token".to_owned(),
        });
        match (by_rule, by_token) {
            (Some(rule), Some(token)) if token.rate.stricter(rule.rate) != rule.rate => {
                vec![token, rule]
            }
            (rule, token) => rule.into_iter().chain(token).collect(),
        }
    }
}

/// A counter's state: the end of its window (unix seconds) and the requests counted in it,
/// packed in one `u64` (end << 32 | count) for hosts that keep it in an atomic word.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Window {
    /// Unix seconds at which the window ends (exclusive).
    pub end: u64,
    /// Requests counted in it.
    pub count: u32,
}

impl Window {
    /// The packed form.
    pub fn pack(self) -> u64 {
        (self.end << 32) | u64::from(self.count)
    }

    /// From the packed form.
    pub fn unpack(word: u64) -> Self {
        Self {
            end: word >> 32,
            count: word as u32,
        }
    }

    /// Whether the window is over at `now`: the counter may be dropped.
    pub fn expired(self, now: u64) -> bool {
        self.end <= now
    }
}

/// What a host's counter said about one request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Admission {
    /// Within the limit.
    pub allowed: bool,
    /// Seconds until the window ends (1 to the window's length).
    pub reset: u64,
}

/// The end of the window `now` falls in.
pub fn window_end(rate: RateLimit, now: u64) -> u64 {
    let length = rate.per.seconds();
    (now / length + 1) * length
}

/// One request against a counter at `now`: the counter's next state and the verdict. A
/// counter from an earlier window (or of a limit whose period changed) starts over; one in
/// the next window (another thread's clock read a moment later) is counted in, not reset;
/// a full one is left as it is.
pub fn admit(state: Window, rate: RateLimit, now: u64) -> (Window, Admission) {
    let length = rate.per.seconds();
    let current = window_end(rate, now);
    let (end, count) = if state.end == current || state.end == current + length {
        (state.end, state.count)
    } else {
        (current, 0)
    };
    let admission = |allowed| Admission {
        allowed,
        reset: end - now,
    };
    if count >= rate.requests {
        (Window { end, count }, admission(false))
    } else {
        (
            Window {
                end,
                count: count + 1,
            },
            admission(true),
        )
    }
}

/// Where a host keeps its counters.
pub trait Counters {
    /// Charges one request to `limit`'s counter at `now`; `None` if the counter could not
    /// be read or written (the request is then refused with a 503).
    fn charge(&mut self, limit: &Limit, now: u64) -> Option<Admission>;
}

/// Charges a decision's limits in order and returns the decision to act on: as it was if
/// every limit admits it, a 429 from the first that does not (the rest are not charged), a
/// 503 if a counter could not be read or written.
pub fn enforce(mut decision: Decision, counters: &mut impl Counters, now: u64) -> Decision {
    for index in 0..decision.rate_limits.len() {
        let admission = counters.charge(&decision.rate_limits[index], now);
        decision = match decision.charged(index, admission) {
            ControlFlow::Continue(next) => next,
            ControlFlow::Break(answer) => return answer,
        };
    }
    decision.within_limits()
}

impl Decision {
    /// The decision once its limit `index` answered (`None`: it could not be counted):
    /// `Continue` to charge the next (after the last, [`Decision::within_limits`]), `Break`
    /// with the answer to give (the 429 of a full limit, the 503 of one not counted).
    pub fn charged(
        self,
        index: usize,
        admission: Option<Admission>,
    ) -> ControlFlow<Decision, Decision> {
        match admission {
            Some(Admission { allowed: true, .. }) => ControlFlow::Continue(self),
            Some(Admission { reset, .. }) => ControlFlow::Break(self.over_limit(index, reset)),
            None => ControlFlow::Break(self.uncounted()),
        }
    }

    /// The decision once every one of its limits admitted it: forwarded as decided.
    pub fn within_limits(mut self) -> Decision {
        self.rate_limits.clear();
        self
    }

    /// The decision refused by its limit `index`, `reset` seconds before that limit's window
    /// ends: a 429.
    fn over_limit(mut self, index: usize, reset: u64) -> Decision {
        let Some(limit) = self.rate_limits.get(index) else {
            return self.uncounted();
        };
        let denial = too_many_requests(limit, reset);
        self.rate_limits.clear();
        self.outcome = Outcome::Deny;
        self.reason = Reason::RateLimited;
        self.denial = Some(denial);
        self.add_headers.clear();
        self
    }

    /// The decision when a limit could not be counted: a 503, never a pass.
    fn uncounted(self) -> Decision {
        let mut failed = crate::decision::unavailable(Reason::Internal);
        failed.rule = self.rule;
        failed.subject = self.subject;
        failed.token_id = self.token_id;
        failed.remove_headers = self.remove_headers;
        failed
    }
}

/// The 429: `Retry-After`, and the IETF httpapi `RateLimit-Policy` / `RateLimit` fields
/// (draft-ietf-httpapi-ratelimit-headers-09: quota `q` per window `w`, remaining `r`,
/// seconds to reset `t`).
fn too_many_requests(limit: &Limit, reset: u64) -> Denial {
    Denial {
        status: 429,
        headers: vec![
            ("content-type", "application/json".to_owned()),
            ("retry-after", reset.to_string()),
            (
                "ratelimit-policy",
                format!(
                    "\"{}\";q={};w={}",
                    limit.policy,
                    limit.rate.requests,
                    limit.rate.per.seconds()
                ),
            ),
            ("ratelimit", format!("\"{}\";r=0;t={reset}", limit.policy)),
        ],
        body: error_body(
            "rate_limited",
            "the service token is over its rate limit; retry after the time Retry-After gives",
        ),
    }
}

/// Counters kept in a proxy's shared key-value store (the proxy-wasm filter): a fixed
/// number of slots, each the counters whose key hashes there, rewritten by compare-and-swap.
/// Every rewrite drops the counters whose window is over, so memory stays bounded by the
/// counters in use, and the slot count bounds the store's keys.
pub mod slots {
    use super::{admit, Admission, Limit, Window};

    /// Slots in the store.
    pub const SLOTS: u32 = 1024;
    /// The shared-data key of slot `n` is this followed by `n`.
    pub const KEY_PREFIX: &str = "tokengate.rate.v1.";

    /// The slot a counter lives in (FNV-1a: stable across VMs and builds).
    pub fn slot_of(key: &str) -> u32 {
        let hash = key.bytes().fold(0xcbf2_9ce4_8422_2325_u64, |h, b| {
            (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
        });
        (hash % u64::from(SLOTS)) as u32
    }

    /// The shared-data key of slot `slot`.
    pub fn slot_key(slot: u32) -> String {
        format!("{KEY_PREFIX}{slot}")
    }

    /// The shared-data key of the slot `key` lives in.
    pub fn store_key(key: &str) -> String {
        slot_key(slot_of(key))
    }

    /// Charges `limit` in a slot whose stored text is `current` (`None`: never written) at
    /// `now`: the slot's next text and the verdict. `None` if the stored text is not a slot
    /// (the request is refused rather than counted from nothing).
    pub fn charge(current: Option<&[u8]>, limit: &Limit, now: u64) -> Option<(Vec<u8>, Admission)> {
        let text = core::str::from_utf8(current.unwrap_or_default()).ok()?;
        let mut out = String::with_capacity(text.len() + limit.key.len() + 24);
        let mut state = Window::default();
        for line in text.lines() {
            let mut fields = line.split(' ');
            let (Some(key), Some(end), Some(count), None) =
                (fields.next(), fields.next(), fields.next(), fields.next())
            else {
                return None;
            };
            let window = Window {
                end: end.parse().ok()?,
                count: count.parse().ok()?,
            };
            if key == limit.key {
                state = window;
            } else if !window.expired(now) {
                out.push_str(line);
                out.push('\n');
            }
        }
        let (next, admission) = admit(state, limit.rate, now);
        out.push_str(&format!("{} {} {}\n", limit.key, next.end, next.count));
        Some((out.into_bytes(), admission))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rate(text: &str) -> RateLimit {
        text.parse().unwrap()
    }

    #[test]
    fn limits_parse_from_the_cli_form_and_refuse_anything_else() {
        assert_eq!(
            rate("100/s"),
            RateLimit {
                requests: 100,
                per: Period::Second
            }
        );
        assert_eq!(rate("600/minute").to_string(), "600/minute");
        assert_eq!(rate("5000/h").per, Period::Hour);
        for bad in [
            "",
            "100",
            "/s",
            "0/s",
            "-1/s",
            "+5/s",
            "1000001/s",
            "10/day",
            "10/S",
            " 10/s",
            "10 /s",
            "1e3/s",
            "99999999999999999999/s",
        ] {
            assert!(bad.parse::<RateLimit>().is_err(), "{bad:?}");
        }
    }

    #[test]
    fn the_stricter_limit_is_the_lower_rate_then_the_shorter_window() {
        assert_eq!(
            rate("100/s").stricter(rate("600/minute")),
            rate("600/minute")
        );
        assert_eq!(
            rate("600/minute").stricter(rate("100/s")),
            rate("600/minute")
        );
        assert_eq!(rate("60/minute").stricter(rate("1/s")), rate("1/s"));
        assert_eq!(rate("1/s").stricter(rate("60/minute")), rate("1/s"));
        assert_eq!(rate("1000/h").stricter(rate("20/minute")), rate("1000/h"));
    }

    #[test]
    fn a_window_counts_to_its_limit_and_starts_over_at_its_end() {
        let limit = rate("3/minute");
        let start = 1_767_225_600; // a minute boundary
        let mut state = Window::default();
        for (offset, allowed, reset) in [(0, true, 60), (10, true, 50), (59, true, 1)] {
            let (next, admission) = admit(state, limit, start + offset);
            assert_eq!(admission, Admission { allowed, reset }, "+{offset}");
            state = next;
        }
        let (full, refused) = admit(state, limit, start + 59);
        assert_eq!(
            refused,
            Admission {
                allowed: false,
                reset: 1
            }
        );
        assert_eq!(full, state, "a refusal is not counted");
        let (fresh, admission) = admit(full, limit, start + 60);
        assert!(admission.allowed);
        assert_eq!(
            fresh,
            Window {
                end: start + 120,
                count: 1
            }
        );
        assert_eq!(Window::unpack(fresh.pack()), fresh);
        // The period changed under a live counter: a new window, not the old count.
        let (other, admission) = admit(state, rate("3/h"), start + 59);
        assert!(admission.allowed);
        assert_eq!(other.count, 1);
        // A request whose clock read :59 after another's started the next window is counted
        // in that window, not made to reset it.
        let next = Window {
            end: start + 120,
            count: 3,
        };
        let (kept, late) = admit(next, limit, start + 59);
        assert_eq!((kept, late.allowed), (next, false));
    }

    #[test]
    fn both_limits_apply_the_stricter_charged_first() {
        let keys = |limits: Vec<Limit>| limits.into_iter().map(|l| l.key).collect::<Vec<_>>();
        let of = |rule: Option<&str>, token: Option<&str>| {
            keys(Limit::of("api", rule.map(rate), "ci", token.map(rate)))
        };
        assert_eq!(of(Some("600/minute"), Some("100/s")), ["r/api/ci", "t/ci"]);
        assert_eq!(of(Some("100/s"), Some("600/minute")), ["t/ci", "r/api/ci"]);
        assert_eq!(of(None, Some("1/s")), ["t/ci"]);
        assert_eq!(of(Some("1/s"), None), ["r/api/ci"]);
        assert!(of(None, None).is_empty());
    }

    #[test]
    fn a_slot_keeps_live_counters_and_drops_the_rest() {
        let now = 1_767_225_600;
        let limit = |key: &str, text: &str| Limit {
            key: key.into(),
            rate: rate(text),
            policy: "r".into(),
        };
        let a = limit("t/a", "2/s");
        let b = limit("t/b", "5/minute");
        let (text, _) = slots::charge(None, &a, now).unwrap();
        let (text, _) = slots::charge(Some(&text), &b, now).unwrap();
        let (text, _) = slots::charge(Some(&text), &a, now).unwrap();
        let (_, third) = slots::charge(Some(&text), &a, now).unwrap();
        assert!(!third.allowed, "a's third request in its second");
        let (later, admission) = slots::charge(Some(&text), &b, now + 1).unwrap();
        assert!(admission.allowed);
        let later = String::from_utf8(later).unwrap();
        assert!(!later.contains("t/a "), "a's window is over: {later}");
        assert!(later.contains(&format!("t/b {} 2\n", now + 60)), "{later}");
        assert!(slots::charge(Some(b"t/a 1"), &a, now).is_none());
        assert!(slots::charge(Some(b"t/a x 1\n"), &a, now).is_none());
        assert!(slots::slot_of("t/a") < slots::SLOTS);
    }
}
