//! What a migration reports: the final report of each side (printed and `--stats-json`), the
//! latency histogram behind the fault-latency figures, and the terminal progress bar.

use serde::Serialize;

use crate::source::pump::PumpStats;

/// Log-linear latency histogram in nanoseconds: fixed memory, about 3% resolution,
/// O(1) recording (the fault thread records every fault).
#[derive(Debug, Clone)]
pub struct Histogram {
    buckets: Vec<u64>,
    count: u64,
    sum_ns: u128,
    max_ns: u64,
}

const SUB_BUCKETS: u32 = 32;

impl Default for Histogram {
    fn default() -> Self {
        Self {
            buckets: vec![0; (64 * SUB_BUCKETS) as usize],
            count: 0,
            sum_ns: 0,
            max_ns: 0,
        }
    }
}

impl Histogram {
    fn index(ns: u64) -> usize {
        if ns < u64::from(SUB_BUCKETS) {
            return ns as usize;
        }
        let exp = 63 - ns.leading_zeros();
        let shift = exp - SUB_BUCKETS.trailing_zeros();
        let sub = (ns >> shift) as u32 - SUB_BUCKETS;
        ((exp - SUB_BUCKETS.trailing_zeros() + 1) * SUB_BUCKETS + sub) as usize
    }

    /// The smallest value that falls in bucket `i` (the reported value for it).
    fn value(i: usize) -> u64 {
        let i = i as u32;
        if i < SUB_BUCKETS {
            return u64::from(i);
        }
        let group = i / SUB_BUCKETS - 1;
        let sub = i % SUB_BUCKETS;
        u64::from(SUB_BUCKETS + sub) << group
    }

    pub fn record(&mut self, ns: u64) {
        let i = Self::index(ns).min(self.buckets.len() - 1);
        self.buckets[i] += 1;
        self.count += 1;
        self.sum_ns += u128::from(ns);
        self.max_ns = self.max_ns.max(ns);
    }

    pub fn merge(&mut self, other: &Histogram) {
        for (a, b) in self.buckets.iter_mut().zip(&other.buckets) {
            *a += b;
        }
        self.count += other.count;
        self.sum_ns += other.sum_ns;
        self.max_ns = self.max_ns.max(other.max_ns);
    }

    pub fn count(&self) -> u64 {
        self.count
    }

    /// The value at quantile `q` (0..=1), in ns; 0 when empty.
    pub fn quantile(&self, q: f64) -> u64 {
        if self.count == 0 {
            return 0;
        }
        let rank = ((q.clamp(0.0, 1.0) * self.count as f64).ceil() as u64).max(1);
        if rank >= self.count {
            return self.max_ns;
        }
        let mut seen = 0;
        for (i, &n) in self.buckets.iter().enumerate() {
            seen += n;
            if seen >= rank {
                return Self::value(i).min(self.max_ns);
            }
        }
        self.max_ns
    }

    pub fn summary(&self) -> LatencySummary {
        LatencySummary {
            count: self.count,
            p50_us: self.quantile(0.5) as f64 / 1e3,
            p99_us: self.quantile(0.99) as f64 / 1e3,
            max_us: self.max_ns as f64 / 1e3,
            total_ms: self.sum_ns as f64 / 1e6,
        }
    }
}

#[derive(Debug, Clone, Copy, Default, Serialize, PartialEq)]
pub struct LatencySummary {
    pub count: u64,
    pub p50_us: f64,
    pub p99_us: f64,
    pub max_us: f64,
    /// Sum of all samples: for fault latency, the time tasks spent blocked on faults.
    pub total_ms: f64,
}

/// The source's final report.
#[derive(Debug, Clone, Default, Serialize)]
pub struct SourceReport {
    /// Dump start to restore finished at dst (an upper bound of the freeze).
    pub downtime_ms: f64,
    pub total_ms: f64,
    pub lazy_pages: u64,
    pub images_bytes: u64,
    pub push_frames: u64,
    pub push_bytes: u64,
    pub zero_pages: u64,
    pub dst_pages_on_demand: u64,
    pub dst_pages_pushed: u64,
    pub pump: PumpStats,
}

/// The destination's final report.
#[derive(Debug, Clone, Default, Serialize)]
pub struct DstReport {
    /// Freeze at the source to restore finished here.
    pub downtime_ms: f64,
    /// Images received to restore finished.
    pub restore_ms: f64,
    /// Restore finished to memory whole.
    pub post_copy_ms: f64,
    pub total_ms: f64,
    pub tasks: u64,
    pub lazy_pages: u64,
    pub pages_on_demand: u64,
    pub pages_pushed: u64,
    pub pages_zero: u64,
    pub faults: u64,
    pub fault_latency: LatencySummary,
    pub bytes_received: u64,
    pub images_bytes: u64,
}

impl DstReport {
    /// Post-copy goodput in MiB/s (lazy bytes over the post-copy time).
    pub fn goodput_mib_s(&self) -> f64 {
        if self.post_copy_ms <= 0.0 {
            return 0.0;
        }
        (self.lazy_pages * crate::pages::PAGE_SIZE) as f64
            / (1 << 20) as f64
            / (self.post_copy_ms / 1e3)
    }

    pub fn render(&self) -> String {
        format!(
            "pageserv dst report\n\
             \x20 downtime (freeze → restore finished)  {:>10.1} ms\n\
             \x20 restore                               {:>10.1} ms\n\
             \x20 post-copy                             {:>10.1} ms   ({:.0} MiB/s)\n\
             \x20 total                                 {:>10.1} ms\n\
             \x20 tasks {}, lazy pages {} ({:.1} MiB)\n\
             \x20 pages on demand {}, pushed {}, zero {}\n\
             \x20 faults {}: latency p50 {:.0} us, p99 {:.0} us, max {:.0} us, blocked {:.1} ms\n\
             \x20 bytes received {} (images {})\n",
            self.downtime_ms,
            self.restore_ms,
            self.post_copy_ms,
            self.goodput_mib_s(),
            self.total_ms,
            self.tasks,
            self.lazy_pages,
            (self.lazy_pages * crate::pages::PAGE_SIZE) as f64 / (1 << 20) as f64,
            self.pages_on_demand,
            self.pages_pushed,
            self.pages_zero,
            self.faults,
            self.fault_latency.p50_us,
            self.fault_latency.p99_us,
            self.fault_latency.max_us,
            self.fault_latency.total_ms,
            self.bytes_received,
            self.images_bytes,
        )
    }
}

impl SourceReport {
    pub fn render(&self) -> String {
        format!(
            "pageserv src report\n\
             \x20 downtime (dump start → restore finished)  {:>10.1} ms\n\
             \x20 total                                     {:>10.1} ms\n\
             \x20 lazy pages {}, images {} bytes\n\
             \x20 fault pages served {}, pages pushed {}, zero pages {}, refused {}\n\
             \x20 GETs to the dump {}, bytes from the dump {}, push bytes {}\n",
            self.downtime_ms,
            self.total_ms,
            self.lazy_pages,
            self.images_bytes,
            self.pump.fault_pages,
            self.pump.pushed_pages,
            self.zero_pages,
            self.pump.refused,
            self.pump.gets,
            self.pump.bytes_from_dump,
            self.push_bytes,
        )
    }
}

/// A byte-count progress bar on stderr, hidden when stderr is not a terminal.
pub fn progress_bar(total_bytes: u64, what: &'static str) -> indicatif::ProgressBar {
    use std::io::IsTerminal;
    if !std::io::stderr().is_terminal() {
        return indicatif::ProgressBar::hidden();
    }
    let bar = indicatif::ProgressBar::new(total_bytes);
    let style = indicatif::ProgressStyle::with_template(
        "{msg:>8} [{bar:40}] {bytes}/{total_bytes} {bytes_per_sec} eta {eta}",
    )
    .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar())
    .progress_chars("=> ");
    bar.set_style(style);
    bar.set_message(what);
    bar
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn quantiles_of_known_samples() {
        let mut h = Histogram::default();
        for us in 1..=1000u64 {
            h.record(us * 1000);
        }
        let p50 = h.quantile(0.5) as f64;
        let p99 = h.quantile(0.99) as f64;
        assert!((p50 - 500_000.0).abs() / 500_000.0 < 0.04, "{p50}");
        assert!((p99 - 990_000.0).abs() / 990_000.0 < 0.04, "{p99}");
        assert_eq!(h.quantile(1.0), 1_000_000);
        assert_eq!(Histogram::default().quantile(0.5), 0);
    }

    proptest! {
        /// Every bucket's reported value is within 1/32 below the recorded value.
        #[test]
        fn bucket_error_is_bounded(ns in 0u64..(1u64 << 50)) {
            let v = Histogram::value(Histogram::index(ns));
            prop_assert!(v <= ns);
            prop_assert!((ns - v) as f64 <= ns as f64 / 32.0 + 1.0);
        }
    }
}
