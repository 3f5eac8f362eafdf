//! How many pages one background piece carries, from what placing pages has been costing.
//!
//! The fault loop places pushed pages a piece per round, so a fault read or answered in
//! between waits for at most one piece (driver's `BULK_BUDGET`). What a page costs to place is
//! not fixed: UFFDIO_COPY allocates the destination page, and on a VM whose memory the host
//! backs on first touch (this testbed beyond ~3 GiB of recently used memory, or after free-page
//! reporting gave memory back) the first write to it takes ~16 us instead of under 1 us. A fixed
//! 64-page piece then holds the thread ~1 ms, which every fault behind it waits (measured: fault
//! p50 0.8-0.95 ms, p99 3.3-5 ms in a 4 GiB post-copy whose fault loop spent 88% of its time in
//! that first write). So the piece is sized by time: [`PIECE_TARGET`] at the cost measured so far
//! (an exponential average of time per page over data pieces), between 1 and [`MAX_PIECE_PAGES`].
//!
//! Pure: the caller passes the measured durations (the engine's `Kernel::now`).

use std::time::Duration;

/// What one piece should take to place.
pub(super) const PIECE_TARGET: Duration = Duration::from_micros(100);
/// The largest piece: 64 pages, ~70 us on memory the host has backed.
pub(super) const MAX_PIECE_PAGES: u64 = 64;
/// Weight of the newest measurement in the average (1/4: a few pieces follow a change).
const NEW_WEIGHT: f64 = 0.25;

/// The piece size policy: see the module docs.
#[derive(Debug, Clone, Default)]
pub(super) struct PieceSize {
    /// Average nanoseconds per placed data page; `None` before the first measurement.
    ns_per_page: Option<f64>,
}

impl PieceSize {
    /// Pages the next piece should carry.
    pub(super) fn pages(&self) -> u64 {
        match self.ns_per_page {
            Some(ns) if ns > 0.0 => {
                let fit = PIECE_TARGET.as_nanos() as f64 / ns;
                (fit as u64).clamp(1, MAX_PIECE_PAGES)
            }
            _ => MAX_PIECE_PAGES,
        }
    }

    /// Placing `pages` data pages took `took`.
    pub(super) fn observe(&mut self, pages: u64, took: Duration) {
        if pages == 0 {
            return;
        }
        let ns = took.as_nanos() as f64 / pages as f64;
        self.ns_per_page = Some(match self.ns_per_page {
            Some(avg) => avg + NEW_WEIGHT * (ns - avg),
            None => ns,
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn fast_memory_keeps_the_largest_piece_and_slow_memory_shrinks_it() {
        let mut p = PieceSize::default();
        assert_eq!(p.pages(), MAX_PIECE_PAGES, "before any measurement");
        p.observe(64, Duration::from_micros(70));
        assert_eq!(p.pages(), MAX_PIECE_PAGES);
        for _ in 0..20 {
            p.observe(p.pages(), Duration::from_micros(16) * p.pages() as u32);
        }
        assert_eq!(p.pages(), 6, "100 us at 16 us a page");
        for _ in 0..20 {
            p.observe(p.pages(), Duration::from_nanos(800) * p.pages() as u32);
        }
        assert_eq!(p.pages(), MAX_PIECE_PAGES, "back once memory is fast again");
        p.observe(0, Duration::from_secs(1));
        assert_eq!(p.pages(), MAX_PIECE_PAGES, "an empty piece says nothing");
    }

    proptest! {
        /// Whatever was measured, a piece has 1 to 64 pages, and once the average settles on a
        /// cost per page, a piece fits the target unless even one page does not.
        #[test]
        fn pieces_stay_in_bounds_and_fit_the_target(
            history in proptest::collection::vec((0u64..200, 0u64..50_000_000), 0..40),
            settle_ns in 1u64..200_000,
        ) {
            let mut p = PieceSize::default();
            for (pages, ns) in history {
                p.observe(pages, Duration::from_nanos(ns));
                prop_assert!((1..=MAX_PIECE_PAGES).contains(&p.pages()));
            }
            for _ in 0..200 {
                let n = p.pages();
                p.observe(n, Duration::from_nanos(settle_ns * n));
            }
            let n = p.pages();
            prop_assert!((1..=MAX_PIECE_PAGES).contains(&n));
            let took = Duration::from_nanos(settle_ns * n);
            prop_assert!(took <= PIECE_TARGET + PIECE_TARGET / 10 || n == 1, "{n} pages take {took:?}");
        }
    }
}
