//! A lock-free log-linear latency histogram: one side records (dst's fault loop, src's fault
//! server), anyone reads.
//!
//! Values are nanoseconds. Buckets are powers of two split into 16 linear steps, so any
//! quantile is exact to within 1/16 (6.25%) of its value, over the whole u64 range, in 8 KiB.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

const SUB_BITS: u32 = 4;
const SUB: u64 = 1 << SUB_BITS;
const BUCKETS: usize = ((64 - SUB_BITS as usize) + 1) * SUB as usize;

fn bucket_of(v: u64) -> usize {
    if v < SUB {
        return v as usize;
    }
    let exp = 63 - v.leading_zeros();
    let sub = (v >> (exp - SUB_BITS)) & (SUB - 1);
    ((exp - SUB_BITS + 1) as u64 * SUB + sub) as usize
}

/// The smallest value that falls in bucket `i`.
fn bucket_low(i: usize) -> u64 {
    let i = i as u64;
    if i < SUB {
        return i;
    }
    let exp = i / SUB + u64::from(SUB_BITS) - 1;
    (1 << exp) | ((i % SUB) << (exp - u64::from(SUB_BITS)))
}

/// The largest value that falls in bucket `i`.
fn bucket_high(i: usize) -> u64 {
    if i + 1 >= BUCKETS {
        u64::MAX
    } else {
        bucket_low(i + 1) - 1
    }
}

/// Concurrent histogram of nanosecond samples.
#[derive(Debug)]
pub struct LatencyHistogram {
    buckets: Box<[AtomicU64]>,
    count: AtomicU64,
    sum: AtomicU64,
    max: AtomicU64,
}

impl Default for LatencyHistogram {
    fn default() -> Self {
        Self {
            buckets: (0..BUCKETS).map(|_| AtomicU64::new(0)).collect(),
            count: AtomicU64::new(0),
            sum: AtomicU64::new(0),
            max: AtomicU64::new(0),
        }
    }
}

impl LatencyHistogram {
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds one sample.
    pub fn record(&self, ns: u64) {
        self.buckets[bucket_of(ns)].fetch_add(1, Relaxed);
        self.count.fetch_add(1, Relaxed);
        self.sum.fetch_add(ns, Relaxed);
        self.max.fetch_max(ns, Relaxed);
    }

    /// A consistent-enough copy for reporting (samples recorded meanwhile may be half-counted).
    /// Count, p50, p99 and max in µs; `total_ns` is reported as the total (the blocktime, for
    /// faults).
    pub fn summary(&self, total_ns: u64) -> crate::stats::LatencySummary {
        let snap = self.snapshot();
        let us = |q: f64| snap.quantile(q).unwrap_or(0) as f64 / 1e3;
        crate::stats::LatencySummary {
            count: snap.count,
            p50_us: us(0.5),
            p99_us: us(0.99),
            max_us: us(1.0),
            total_ms: total_ns as f64 / 1e6,
        }
    }

    pub fn snapshot(&self) -> LatencySnapshot {
        LatencySnapshot {
            buckets: self.buckets.iter().map(|b| b.load(Relaxed)).collect(),
            count: self.count.load(Relaxed),
            sum_ns: self.sum.load(Relaxed),
            max_ns: self.max.load(Relaxed),
        }
    }
}

/// A point-in-time copy of a [`LatencyHistogram`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LatencySnapshot {
    buckets: Vec<u64>,
    pub count: u64,
    pub sum_ns: u64,
    pub max_ns: u64,
}

impl LatencySnapshot {
    /// The value at quantile `q` (0.0..=1.0): the upper edge of the bucket holding it, capped
    /// at the largest sample. None without samples.
    pub fn quantile(&self, q: f64) -> Option<u64> {
        let total: u64 = self.buckets.iter().sum();
        if total == 0 {
            return None;
        }
        let rank = ((q.clamp(0.0, 1.0) * total as f64).ceil() as u64).max(1);
        let mut seen = 0;
        for (i, &n) in self.buckets.iter().enumerate() {
            seen += n;
            if seen >= rank {
                return Some(bucket_high(i).min(self.max_ns));
            }
        }
        Some(self.max_ns)
    }

    /// Mean in nanoseconds. None without samples.
    pub fn mean(&self) -> Option<u64> {
        self.sum_ns.checked_div(self.count)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn buckets_tile_the_range() {
        for i in 0..BUCKETS - 1 {
            assert_eq!(bucket_of(bucket_low(i)), i);
            assert_eq!(bucket_of(bucket_high(i)), i);
            assert_eq!(bucket_high(i) + 1, bucket_low(i + 1));
        }
        assert_eq!(bucket_of(u64::MAX), BUCKETS - 1);
    }

    proptest! {
        #[test]
        fn quantiles_within_a_sixteenth(mut v in proptest::collection::vec(0u64..1 << 40, 1..300), q in 0.0f64..=1.0) {
            let h = LatencyHistogram::new();
            v.iter().for_each(|&x| h.record(x));
            v.sort();
            let rank = ((q * v.len() as f64).ceil() as usize).max(1);
            let exact = v[rank - 1];
            let got = h.snapshot().quantile(q).unwrap();
            prop_assert!(got >= exact && got - exact <= exact / 16 + 1, "exact {} got {}", exact, got);
        }
    }
}
