//! Writer threads: together they rewrite W random pages per millisecond (token bucket per
//! thread), each write bumping the page's version in the table. The write count is the
//! workload's "speed" (the heartbeat logs it).

use crate::memory::Memory;
use crate::page::mix64;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// Total write rate over all writer threads.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum WriteRate {
    /// As fast as possible.
    Max,
    /// Pages per millisecond (0 = no writes).
    PerMs(f64),
}

impl std::str::FromStr for WriteRate {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        if s == "max" {
            return Ok(WriteRate::Max);
        }
        match s.parse::<f64>() {
            Ok(r) if r.is_finite() && r >= 0.0 => Ok(WriteRate::PerMs(r)),
            _ => Err(format!(
                "write rate {s:?} is neither \"max\" nor a number of pages per ms >= 0"
            )),
        }
    }
}

/// A write counter on its own cache line, one per writer thread (the heartbeat sums them).
#[repr(align(64))]
#[derive(Default)]
pub struct Counter(pub AtomicU64);

/// Token bucket: `rate` tokens per ns, at most `burst` saved. The cap matters after a CRIU
/// restore: the monotonic clock jumped by the downtime, and without it the writers would try to
/// catch up on every write they "missed" while frozen.
pub struct Bucket {
    per_ns: f64,
    burst: f64,
    tokens: f64,
    last: Instant,
}

impl Bucket {
    /// `per_ms` tokens per millisecond, burst of 2 ms worth (at least 1 unless the rate is 0).
    pub fn new(per_ms: f64, now: Instant) -> Self {
        Bucket {
            per_ns: per_ms / 1e6,
            burst: if per_ms > 0.0 {
                (per_ms * 2.0).max(1.0)
            } else {
                0.0
            },
            tokens: 0.0,
            last: now,
        }
    }

    /// Takes one token if there is one; otherwise returns how long until the next.
    pub fn take(&mut self, now: Instant) -> Result<(), Duration> {
        // saturating: the monotonic clock may differ after a restore on another host.
        let dt = now.saturating_duration_since(self.last).as_nanos() as f64;
        self.last = now.max(self.last);
        self.tokens = (self.tokens + dt * self.per_ns).min(self.burst);
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            return Ok(());
        }
        if self.per_ns <= 0.0 {
            return Err(Duration::from_millis(50));
        }
        Err(Duration::from_nanos(
            ((1.0 - self.tokens) / self.per_ns) as u64,
        ))
    }
}

/// One writer thread's loop: rewrite random unlocked pages at `rate` pages/ms (None = max) until
/// `stop`.
pub fn run(mem: &Memory, rate: Option<f64>, seed: u64, count: &Counter, stop: &AtomicBool) {
    let mut rng = mix64(seed) | 1;
    let mut bucket = rate.map(|r| Bucket::new(r, Instant::now()));
    while !stop.load(Ordering::Relaxed) {
        if let Some(Err(wait)) = bucket.as_mut().map(|b| b.take(Instant::now())) {
            // Short sleeps keep the rate smooth and the thread responsive to stop.
            std::thread::sleep(wait.clamp(Duration::from_micros(50), Duration::from_millis(50)));
            continue;
        }
        // A locked page (checker, churn, another writer) is skipped for another random one.
        while !stop.load(Ordering::Relaxed) {
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            if let Some(g) = mem.try_lock((rng % mem.pages as u64) as usize) {
                g.rewrite();
                count.0.fetch_add(1, Ordering::Relaxed);
                break;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bucket_gives_the_rate_and_caps_the_burst() {
        let t0 = Instant::now();
        let mut b = Bucket::new(4.0, t0);
        let mut got = 0;
        for us in (0..10_000).step_by(10) {
            while b.take(t0 + Duration::from_micros(us)).is_ok() {
                got += 1;
            }
        }
        assert!((38..=41).contains(&got), "{got}");
        // 10 s later (a restore): at most the burst, not 40 000 writes.
        let later = t0 + Duration::from_secs(10);
        let mut burst = 0;
        while b.take(later).is_ok() {
            burst += 1;
        }
        assert_eq!(burst, 8);
        assert!(b.take(later).unwrap_err() <= Duration::from_micros(250));
    }

    #[test]
    fn zero_rate_never_writes() {
        let t0 = Instant::now();
        let mut b = Bucket::new(0.0, t0);
        assert!(b.take(t0 + Duration::from_secs(5)).is_err());
        assert!(b.take(t0 + Duration::from_secs(50)).is_err());
    }

    #[test]
    fn write_rate_parses() {
        assert_eq!("max".parse(), Ok(WriteRate::Max));
        assert_eq!("2.5".parse(), Ok(WriteRate::PerMs(2.5)));
        assert!("-1".parse::<WriteRate>().is_err());
        assert!("fast".parse::<WriteRate>().is_err());
    }
}
