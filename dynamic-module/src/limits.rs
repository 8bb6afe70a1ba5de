//! The process's rate-limit counters ([`tokengate_core::rate`]), shared by every worker
//! thread: one lock-free map (papaya) from counter key to the packed window, updated by
//! compare-and-swap, so a limit of N is N per Envoy process whatever the thread count.
//!
//! Memory stays bounded by the counters in use: once the map has doubled since its last
//! sweep (and holds at least [`SWEEP_FROM`] counters), the thread that notices drops every
//! counter whose window is over, each removal conditional on that counter still being over
//! (a request counted meanwhile keeps it).

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::LazyLock;

use papaya::{HashMap, Operation};
use tokengate_core::rate::{self, Admission, Counters, Limit, Window};

/// The map is never swept below this many counters.
pub const SWEEP_FROM: usize = 4096;

/// Counters by key, and when they were last swept.
#[derive(Default)]
pub struct CounterSet {
    map: HashMap<String, u64>,
    /// The map's size after the last sweep (the next is due at twice this).
    swept_at: AtomicUsize,
    sweeping: AtomicBool,
}

/// The process's counters.
pub static PROCESS: LazyLock<CounterSet> = LazyLock::new(CounterSet::default);

impl Counters for &CounterSet {
    fn charge(&mut self, limit: &Limit, now: u64) -> Option<Admission> {
        let admission = CounterSet::charge(self, limit, now);
        self.sweep_if_due(now);
        admission
    }
}

/// Clears the sweeping flag however the sweep ends (a panic is caught by the hook's
/// `catch_unwind`; sweeping must not stop for good).
struct Sweeping<'a>(&'a AtomicBool);

impl Drop for Sweeping<'_> {
    fn drop(&mut self) {
        self.0.store(false, Ordering::Release);
    }
}

impl CounterSet {
    /// One request against `limit`'s counter: the core's step, stored only if the counter
    /// did not change meanwhile (papaya runs the step again on the new value otherwise).
    /// `None` for a window end the packed word cannot hold (a clock past 2106): refused.
    fn charge(&self, limit: &Limit, now: u64) -> Option<Admission> {
        let map = self.map.pin();
        let mut verdict = None;
        map.compute(limit.key.clone(), |entry| {
            let state = entry.map_or_else(Window::default, |(_, word)| Window::unpack(*word));
            let (next, admission) = rate::admit(state, limit.rate, now);
            if next.end > u64::from(u32::MAX) {
                verdict = None;
                return Operation::Abort(());
            }
            verdict = Some(admission);
            if next == state {
                Operation::Abort(())
            } else {
                Operation::Insert(next.pack())
            }
        });
        verdict
    }

    /// Drops the counters whose window is over, once the map has doubled since the last
    /// sweep; one thread at a time, the others go on.
    fn sweep_if_due(&self, now: u64) {
        let len = self.map.len();
        if len < SWEEP_FROM.max(2 * self.swept_at.load(Ordering::Relaxed)) {
            return;
        }
        if self.sweeping.swap(true, Ordering::Acquire) {
            return;
        }
        let _sweeping = Sweeping(&self.sweeping);
        let pinned = self.map.pin();
        let over: Vec<String> = pinned
            .iter()
            .filter(|(_, word)| Window::unpack(**word).expired(now))
            .map(|(key, _)| key.clone())
            .collect();
        for key in &over {
            let _ = pinned.remove_if(key, |_, word| Window::unpack(*word).expired(now));
        }
        self.swept_at.store(pinned.len(), Ordering::Relaxed);
    }

    /// Counters held.
    pub fn len(&self) -> usize {
        self.map.len()
    }

    /// Whether no counter is held.
    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limit(key: &str, rate: &str) -> Limit {
        Limit {
            key: key.into(),
            rate: rate.parse().unwrap(),
            policy: "p".into(),
        }
    }

    #[test]
    fn threads_share_one_counter_per_key() {
        let set = CounterSet::default();
        let now = 1_767_225_600;
        let allowed = AtomicUsize::new(0);
        let shared = limit("t/ci", "1000/minute");
        std::thread::scope(|s| {
            for _ in 0..8 {
                s.spawn(|| {
                    for _ in 0..500 {
                        if set.charge(&shared, now).unwrap().allowed {
                            allowed.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                });
            }
        });
        assert_eq!(
            allowed.load(Ordering::Relaxed),
            1000,
            "exactly the limit, of 4000"
        );
        let other = limit("t/other", "1/minute");
        assert!(
            set.charge(&other, now).unwrap().allowed,
            "another key counts apart"
        );
        assert_eq!(
            set.charge(&other, u64::from(u32::MAX)),
            None,
            "a clock past 2106"
        );
    }

    #[test]
    fn idle_counters_are_swept_and_live_ones_kept() {
        let set = CounterSet::default();
        let now = 1_767_225_600;
        for n in 0..SWEEP_FROM {
            set.charge(&limit(&format!("t/{n}"), "5/s"), now);
        }
        let live = limit("t/live", "5/minute");
        set.charge(&live, now);
        set.sweep_if_due(now + 1);
        assert_eq!(
            set.len(),
            1,
            "only the minute counter is live a second later"
        );
        let word = *set.map.pin().get("t/live").unwrap();
        assert_eq!(
            Window::unpack(word).count,
            1,
            "the live counter kept its count"
        );
        // Below the threshold nothing is swept, however stale.
        set.charge(&limit("t/stale", "5/s"), now);
        set.sweep_if_due(now + 5);
        assert_eq!(set.len(), 2);
    }
}
