//! State shared by one workload process's threads.

use crate::log::LogFile;
use crate::memory::Memory;
use crate::writers::Counter;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// One workload process (root or child): its memory, log and counters.
pub struct Shared {
    /// `r` for the root, `c1`, `c2`, ... for children: distinguishes lines in the common log.
    pub tag: String,
    pub mem: Memory,
    pub log: LogFile,
    pub stop: AtomicBool,
    /// One per writer thread.
    pub writes: Vec<Counter>,
    /// Pages the heartbeat thread rewrote (`--hb-writes`).
    pub hb_writes: Counter,
    /// Pages the heartbeat thread read and spot-checked (`--hb-reads`).
    pub hb_reads: Counter,
    pub checks_ok: AtomicU64,
    pub checks_failed: AtomicU64,
    pub churn_failed: AtomicU64,
}

impl Shared {
    pub fn new(tag: String, mem: Memory, log: LogFile, writers: usize) -> Self {
        Shared {
            tag,
            mem,
            log,
            stop: AtomicBool::new(false),
            writes: (0..writers).map(|_| Counter::default()).collect(),
            hb_writes: Counter::default(),
            hb_reads: Counter::default(),
            checks_ok: AtomicU64::new(0),
            checks_failed: AtomicU64::new(0),
            churn_failed: AtomicU64::new(0),
        }
    }

    /// Writes so far, all writer threads and the heartbeat thread together.
    pub fn writes_total(&self) -> u64 {
        self.writes
            .iter()
            .chain(std::iter::once(&self.hb_writes))
            .map(|c| c.0.load(Ordering::Relaxed))
            .sum()
    }

    pub fn stopping(&self) -> bool {
        self.stop.load(Ordering::Relaxed)
    }

    /// Sleeps until `deadline` in short steps; false if asked to stop meanwhile.
    pub fn sleep_until(&self, deadline: Instant) -> bool {
        loop {
            if self.stopping() {
                return false;
            }
            let now = Instant::now();
            if now >= deadline {
                return true;
            }
            std::thread::sleep((deadline - now).min(Duration::from_millis(50)));
        }
    }
}

/// The next deadline of a periodic task: one period after `prev`, or one period from now if
/// that is already past (after a stall or a restore: no burst of catch-up iterations).
pub fn next_deadline(prev: Instant, period: Duration, now: Instant) -> Instant {
    let next = prev + period;
    if next + period < now {
        now + period
    } else {
        next
    }
}
