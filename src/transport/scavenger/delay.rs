//! The two delay filters of the scavenger: the base delay (the path's round trip with empty
//! queues) and the current delay (the round trip the latest packets saw).

use std::collections::VecDeque;
use std::time::{Duration, Instant};

/// The smallest round trip over a sliding window of `keep` buckets of length `bucket`. Old
/// buckets age out, so a route that got longer is adopted after `keep` x `bucket`.
#[derive(Debug, Clone)]
pub(super) struct BaseDelay {
    /// (bucket start, smallest sample in it), oldest first; at most `keep`.
    buckets: VecDeque<(Instant, Duration)>,
    bucket: Duration,
    keep: usize,
}

impl BaseDelay {
    pub(super) fn new(bucket: Duration, keep: usize) -> Self {
        BaseDelay {
            buckets: VecDeque::with_capacity(keep + 1),
            bucket,
            keep: keep.max(1),
        }
    }

    pub(super) fn update(&mut self, now: Instant, sample: Duration) {
        let span = self.bucket.saturating_mul(self.keep as u32);
        while self
            .buckets
            .front()
            .is_some_and(|&(start, _)| now.saturating_duration_since(start) >= span)
        {
            self.buckets.pop_front();
        }
        match self.buckets.back_mut() {
            Some((start, min)) if now.saturating_duration_since(*start) < self.bucket => {
                *min = (*min).min(sample);
            }
            _ => {
                self.buckets.push_back((now, sample));
                if self.buckets.len() > self.keep {
                    self.buckets.pop_front();
                }
            }
        }
    }

    pub(super) fn get(&self) -> Option<Duration> {
        self.buckets.iter().map(|&(_, d)| d).min()
    }
}

/// The smallest round trip over a sliding span of time: a deque whose delays increase from front
/// to back, so each sample is pushed and popped once (O(1) amortized).
#[derive(Debug, Clone, Default)]
pub(super) struct CurrentDelay {
    samples: VecDeque<(Instant, Duration)>,
}

impl CurrentDelay {
    /// Adds a sample taken at `now`, dropping those older than `span`.
    pub(super) fn push(&mut self, now: Instant, sample: Duration, span: Duration) {
        while self.samples.back().is_some_and(|&(_, d)| d >= sample) {
            self.samples.pop_back();
        }
        self.samples.push_back((now, sample));
        while self
            .samples
            .front()
            .is_some_and(|&(t, _)| now.saturating_duration_since(t) > span)
        {
            self.samples.pop_front();
        }
    }

    /// The smallest sample of the last `span` before `now`; none if there is none that recent.
    pub(super) fn get(&self, now: Instant, span: Duration) -> Option<Duration> {
        self.samples
            .iter()
            .find(|&&(t, _)| now.saturating_duration_since(t) <= span)
            .map(|&(_, d)| d)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn current_delay_is_the_minimum_of_the_span(
            samples in prop::collection::vec((0u64..500, 1u64..10_000), 1..200),
            span_us in 1u64..3_000,
        ) {
            let t0 = Instant::now();
            let span = Duration::from_micros(span_us);
            let mut c = CurrentDelay::default();
            let mut now = t0;
            let mut all = Vec::new();
            for (gap, d) in samples {
                now += Duration::from_micros(gap);
                c.push(now, Duration::from_micros(d), span);
                all.push((now, Duration::from_micros(d)));
                let expect = all
                    .iter()
                    .filter(|&&(t, _)| now - t <= span)
                    .map(|&(_, d)| d)
                    .min();
                prop_assert_eq!(c.get(now, span), expect);
            }
        }

        #[test]
        fn base_delay_is_the_minimum_of_the_live_buckets(
            samples in prop::collection::vec((0u64..400, 1u64..10_000), 1..300),
        ) {
            let t0 = Instant::now();
            let (bucket, keep) = (Duration::from_millis(1), 3);
            let mut b = BaseDelay::new(bucket, keep);
            let mut now = t0;
            let mut all = Vec::new();
            for (gap, d) in samples {
                now += Duration::from_micros(gap);
                b.update(now, Duration::from_micros(d));
                all.push((now, Duration::from_micros(d)));
                let got = b.get().unwrap();
                // Never more than the minimum of the last bucket's worth, never less than that
                // of the last `keep` + 1 buckets' worth.
                let min_since = |ago: Duration| {
                    all.iter().filter(|&&(t, _)| now - t < ago).map(|&(_, d)| d).min().unwrap()
                };
                prop_assert!(got <= min_since(bucket));
                prop_assert!(got >= min_since(bucket * (keep as u32 + 1)));
            }
        }
    }

    #[test]
    fn a_longer_route_is_adopted_once_the_old_buckets_age_out() {
        let t0 = Instant::now();
        let mut b = BaseDelay::new(Duration::from_secs(1), 3);
        b.update(t0, Duration::from_micros(100));
        b.update(t0 + Duration::from_millis(2500), Duration::from_millis(5));
        assert_eq!(b.get(), Some(Duration::from_micros(100)));
        b.update(t0 + Duration::from_millis(3500), Duration::from_millis(5));
        assert_eq!(b.get(), Some(Duration::from_millis(5)));
    }
}
