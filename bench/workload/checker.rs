//! Self-check: every period, verify every page against the version table (header index,
//! version, payload; zero pages all zero) and log `check <tag> ok|FAIL ...`.

use crate::log::unix_ns;
use crate::logline;
use crate::memory::Memory;
use crate::page::Fault;
use crate::shared::{Shared, next_deadline};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

/// How many times the checker retries a page some writer or the churn holds before skipping it.
const LOCK_ATTEMPTS: u32 = 64;

/// Result of one full pass.
#[derive(Debug, Default)]
pub struct Report {
    pub verified: usize,
    /// Pages held by someone else for the whole retry budget.
    pub skipped: usize,
    pub zero: usize,
    pub bad: usize,
    pub first_fault: Option<(usize, Fault)>,
}

/// Verifies every page once; None if `stop` was raised meanwhile.
pub fn check_all(mem: &Memory, stop: &AtomicBool) -> Option<Report> {
    let mut r = Report::default();
    for chunk in &mem.chunks {
        if stop.load(Ordering::Relaxed) {
            return None;
        }
        for index in chunk.first..chunk.first + chunk.pages {
            let Some(mut g) = mem.lock_within(index, LOCK_ATTEMPTS) else {
                r.skipped += 1;
                continue;
            };
            r.verified += 1;
            r.zero += usize::from(g.entry.zero);
            if let Err(fault) = g.verify() {
                r.bad += 1;
                r.first_fault.get_or_insert((index, fault));
            }
        }
    }
    Some(r)
}

/// CPU time this thread has used, in ms.
fn thread_cpu_ms() -> f64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: valid out-pointer; CLOCK_THREAD_CPUTIME_ID always exists on Linux.
    unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    ts.tv_sec as f64 * 1e3 + ts.tv_nsec as f64 / 1e6
}

pub fn run(sh: &Shared, period: Duration) {
    let mut deadline = Instant::now() + period;
    while sh.sleep_until(deadline) {
        let (t0, cpu0) = (Instant::now(), thread_cpu_ms());
        let Some(r) = check_all(&sh.mem, &sh.stop) else {
            break;
        };
        let ms = t0.elapsed().as_secs_f64() * 1e3;
        // Wall time includes preemption on a busy host; CPU time is the check's real cost.
        let cpu_ms = (thread_cpu_ms() - cpu0).max(0.0);
        match r.first_fault {
            None => {
                sh.checks_ok.fetch_add(1, Ordering::Relaxed);
                logline!(
                    sh.log,
                    "check {} ok pages={} ms={ms:.3} cpu_ms={cpu_ms:.3} skipped={} zero={} unix_ns={}",
                    sh.tag,
                    r.verified,
                    r.skipped,
                    r.zero,
                    unix_ns()
                );
            }
            Some((page, fault)) => {
                sh.checks_failed.fetch_add(1, Ordering::Relaxed);
                logline!(
                    sh.log,
                    "check {} FAIL page={page} {fault} bad={} pages={} ms={ms:.3} cpu_ms={cpu_ms:.3} unix_ns={}",
                    sh.tag,
                    r.bad,
                    r.verified,
                    unix_ns()
                );
            }
        }
        deadline = next_deadline(deadline, period, Instant::now());
    }
}
