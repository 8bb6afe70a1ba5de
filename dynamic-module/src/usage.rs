//! The process's usage tally ([`tokengate_core::usage`]), shared by every worker thread.
//!
//! Each thread counts into its own table, behind a mutex only a usage read ever contends
//! (an uncontended lock and one map update per request, whatever the traffic or the number
//! of tokens); each table is registered once, in a process-wide list, and a usage read
//! merges them. A thread's table outlives the thread, so no count is lost.
//!
//! `TOKENGATE_USAGE=off` in Envoy's environment turns counting off (read once per process);
//! usage reads are then answered 404 `usage_off`.

use std::sync::{Arc, Mutex, MutexGuard, OnceLock, PoisonError};

use tokengate_core::usage::{Counter, ReadLimiter, Report, Tally, Unreported};
use tokengate_core::Decision;

/// The environment variable that turns usage counting off (`off`).
pub const USAGE_VARIABLE: &str = "TOKENGATE_USAGE";

type Table = Arc<Mutex<Tally>>;

/// Every thread's table, in the order the threads first counted.
static TABLES: Mutex<Vec<Table>> = Mutex::new(Vec::new());

thread_local! {
    static LOCAL: Table = {
        let table = Table::default();
        lock(&TABLES).push(Arc::clone(&table));
        table
    };
}

/// A lock that a panic elsewhere did not make unusable: a tally is valid at every step.
fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Whether this process counts usage.
pub fn enabled() -> bool {
    static ENABLED: OnceLock<bool> = OnceLock::new();
    *ENABLED.get_or_init(|| std::env::var(USAGE_VARIABLE).map_or(true, |v| v != "off"))
}

/// Counts `decision` at `now` on this thread's table.
pub fn count(decision: &Decision, now: u64) {
    if enabled() {
        LOCAL.with(|table| lock(table).count(decision, now));
    }
}

/// This process's counter set: random, drawn once (a restarted Envoy counts from zero under
/// a new one).
fn instance() -> &'static str {
    static INSTANCE: OnceLock<String> = OnceLock::new();
    INSTANCE.get_or_init(|| {
        let mut bytes = [0u8; 12];
        // Without the OS generator, the process id and start time still name this process.
        if getrandom::fill(&mut bytes).is_err() {
            let nanos = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_nanos());
            bytes[..4].copy_from_slice(&std::process::id().to_le_bytes());
            bytes[4..].copy_from_slice(&(nanos as u64).to_le_bytes());
        }
        format!("envoy-{}", tokengate_core::hex::encode(&bytes))
    })
}

/// Every thread's counts, merged, as this process reports them; `None` when counting is off.
pub fn report(environment: &str, now: u64) -> Option<Report> {
    if !enabled() {
        return None;
    }
    let mut all = Tally::default();
    for table in lock(&TABLES).iter() {
        all.merge(&lock(table));
    }
    Some(all.report(instance(), environment, now))
}

/// The process's usage reads this second (one limiter for every worker thread).
static READS: Mutex<ReadLimiter> = Mutex::new(ReadLimiter::new());

/// This process's counts and read limiter, as a usage read asks for them.
pub struct Process;

impl Counter for Process {
    fn admit(&mut self, now: u64) -> bool {
        lock(&READS).admit(now)
    }

    fn report(&mut self, environment: &str, now: u64) -> Result<Report, Unreported> {
        report(environment, now).ok_or(Unreported::Off)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokengate_core::decision::{Outcome, Reason};

    fn valid(token_id: &str) -> Decision {
        Decision {
            outcome: Outcome::Allow,
            reason: Reason::Valid,
            rule: None,
            subject: None,
            token_id: Some(token_id.to_owned()),
            issuer: None,
            denial: None,
            remove_headers: Vec::new(),
            add_headers: Vec::new(),
            rewrite_path: None,
            rate_limits: Vec::new(),
        }
    }

    /// Worker threads count on their own tables; a read merges them all, threads gone or not.
    #[test]
    fn counts_of_every_thread_are_merged_in_one_report() {
        let threads: Vec<_> = (0..4u64)
            .map(|i| {
                std::thread::spawn(move || {
                    for _ in 0..250 {
                        count(&valid("tid_threads"), 100 + i);
                    }
                })
            })
            .collect();
        for thread in threads {
            thread
                .join()
                .unwrap_or_else(|_| unreachable!("a counting thread panicked"));
        }
        let report = report("prod", 200).unwrap_or_else(|| unreachable!("counting is on"));
        let line = report.tokens.iter().find(|t| t.token_id == "tid_threads");
        assert_eq!(line.map(|t| (t.allowed, t.last_seen)), Some((1000, 103)));
        assert!(report.instance.starts_with("envoy-"));
    }
}
