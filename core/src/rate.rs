//! Rate limits per token: a rule's (`rate_limit = { requests = 600, per = "minute" }`) and a
//! token's own (`tokengate create --rate 100/s`); the stricter one applies.
//!
//! Counting is a fixed window aligned to the epoch (a minute window runs from :00 to :59):
//! the same windows on every Envoy and in local workerd's Rate Limiting binding, so a client
//! that waits `Retry-After` seconds finds a fresh window (Cloudflare does not document where
//! its binding's windows start: there `Retry-After` is the time to the next minute). A counter is one `u64`
//! ([`Window`]: the window's end and the count in it), so a host can keep it in one atomic
//! word or one shared-data entry and update it by compare-and-swap; the core computes every
//! step ([`admit`]), the host only stores the result.
//!
//! A [`Decision`] that passes a limited rule carries the [`Limit`] to charge and is not
//! forwarded until the host has charged it ([`Decision::admitted`]): a host that skipped the
//! count would answer 503, never pass unmetered.

use core::fmt;
use core::str::FromStr;

use serde::{Deserialize, Serialize};

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
    /// The limit that applies to `token` on `rule`: the stricter of the two, if any.
    pub(crate) fn of(
        rule_name: &str,
        rule: Option<RateLimit>,
        token_name: &str,
        token: Option<RateLimit>,
    ) -> Option<Box<Limit>> {
        let by_rule = |rate| Limit {
            key: format!("r/{rule_name}/{token_name}"),
            rate,
            policy: rule_name.to_owned(),
        };
        let by_token = |rate| Limit {
            key: format!("t/{token_name}"),
            rate,
            policy: "token".to_owned(),
        };
        let limit = match (rule, token) {
            (None, None) => return None,
            (Some(rule), None) => by_rule(rule),
            (None, Some(token)) => by_token(token),
            (Some(rule), Some(token)) if rule.stricter(token) == rule => by_rule(rule),
            (Some(_), Some(token)) => by_token(token),
        };
        Some(Box::new(limit))
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
/// counter from another window (an earlier one, or a limit whose period changed) starts
/// over; a full one is left as it is.
pub fn admit(state: Window, rate: RateLimit, now: u64) -> (Window, Admission) {
    let end = window_end(rate, now);
    let count = if state.end == end { state.count } else { 0 };
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

/// Charges a decision's limit, if it carries one, and returns the decision to act on.
pub fn enforce(decision: Decision, counters: &mut impl Counters, now: u64) -> Decision {
    match &decision.rate_limit {
        Some(limit) => {
            let admission = counters.charge(limit, now);
            decision.admitted(admission)
        }
        None => decision,
    }
}

impl Decision {
    /// The decision once its limit was charged: passes on as it was when `admission` allows
    /// it, becomes a 429 when it does not, a 503 when the host could not count (`None`).
    pub fn admitted(mut self, admission: Option<Admission>) -> Decision {
        let Some(limit) = self.rate_limit.take() else {
            return self;
        };
        match admission {
            Some(Admission { allowed: true, .. }) => self,
            Some(Admission { reset, .. }) => {
                self.outcome = Outcome::Deny;
                self.reason = Reason::RateLimited;
                self.denial = Some(too_many_requests(&limit, reset));
                self.add_headers.clear();
                self
            }
            None => {
                let mut failed = crate::decision::unavailable(Reason::Internal);
                failed.rule = self.rule;
                failed.subject = self.subject;
                failed.token_id = self.token_id;
                failed.remove_headers = self.remove_headers;
                failed
            }
        }
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

    /// The shared-data key of the slot `key` lives in.
    pub fn store_key(key: &str) -> String {
        format!("{KEY_PREFIX}{}", slot_of(key))
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
