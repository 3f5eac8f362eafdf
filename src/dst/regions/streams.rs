//! Sequential fault streams of one view: adaptive read-ahead (sans-IO).
//!
//! A thread that walks memory in order (a scan, a checksum, a copy) faults once per page, and
//! each fault costs a round trip to the source. The kernel's page-cache read-ahead solves the
//! same problem for files: it notices a sequential reader and doubles its window. This does the
//! same for lazy memory: a fault at the page right after (or within the window after) the end of
//! a recent request continues that stream and asks for twice as many pages as its last request,
//! up to [`SEQ_MAX_PAGES`]; any other fault starts a new stream with no read-ahead, so random
//! access costs exactly one page per fault, as before.
//!
//! Several threads may walk at once (or one walks while others fault at random), so the last
//! [`STREAMS`] streams are kept, the least recently used replaced first.
//!
//! Invariants: the window of a stream only grows by continuing it, never beyond
//! [`SEQ_MAX_PAGES`]; a fault that continues no stream gets 0 extra pages.

/// Most pages one sequential stream asks for beyond its faulting page (128 KiB with it): about
/// 0.25 ms on the wire at 500 MiB/s, so a scan's fault stays well under a millisecond.
pub const SEQ_MAX_PAGES: u64 = 31;

/// Streams remembered per view.
pub const STREAMS: usize = 4;

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct Stream {
    /// The bit after the stream's last request.
    next: u64,
    /// Extra pages its last request asked for.
    window: u64,
    /// When it was last continued (a counter of faults), for LRU replacement.
    used: u64,
}

/// The recent sequential streams of one view, in bitmap bits (one bit per lazy page).
#[derive(Debug, Clone, Default)]
pub struct Streams {
    streams: [Option<Stream>; STREAMS],
    clock: u64,
}

impl Streams {
    /// A fault at bit `bit`: how many pages after it to ask for as well (before the caller's own
    /// limits: the end of the piece, the first page that is not pending).
    pub fn on_fault(&mut self, bit: u64) -> u64 {
        self.clock += 1;
        let clock = self.clock;
        let hit = self.streams.iter_mut().flatten().find(|s| {
            // The next page, or a little further when pages in between arrived by the push.
            bit >= s.next && bit <= s.next + s.window.max(1)
        });
        match hit {
            Some(s) => {
                s.window = (s.window * 2).clamp(1, SEQ_MAX_PAGES);
                s.used = clock;
                s.window
            }
            None => 0,
        }
    }

    /// A request went out for bits `[bit, end)`: remember where its stream continues (a fault
    /// that continued no stream starts one, with no window yet). Called after
    /// [`Streams::on_fault`] with the request actually made (possibly shorter).
    pub fn requested(&mut self, bit: u64, end: u64) {
        let clock = self.clock;
        if let Some(s) = self
            .streams
            .iter_mut()
            .flatten()
            .find(|s| s.used == clock && bit >= s.next)
        {
            s.next = end;
            return;
        }
        let new = Stream {
            next: end,
            window: 0,
            used: clock,
        };
        let slot = match self.streams.iter().position(Option::is_none) {
            Some(i) => i,
            None => self
                .streams
                .iter()
                .enumerate()
                .min_by_key(|(_, s)| s.map_or(0, |s| s.used))
                .map_or(0, |(i, _)| i),
        };
        self.streams[slot] = Some(new);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// Faults at `bits` in order, each request as long as asked: the extra pages per fault.
    fn run(bits: &[u64]) -> Vec<u64> {
        let mut s = Streams::default();
        bits.iter()
            .map(|&b| {
                let w = s.on_fault(b);
                s.requested(b, b + 1 + w);
                w
            })
            .collect()
    }

    #[test]
    fn a_scan_doubles_its_window_up_to_the_cap() {
        let mut bits = Vec::new();
        let mut s = Streams::default();
        let mut b = 1000;
        let mut windows = Vec::new();
        for _ in 0..10 {
            bits.push(b);
            let w = s.on_fault(b);
            s.requested(b, b + 1 + w);
            windows.push(w);
            b += 1 + w;
        }
        assert_eq!(windows, vec![0, 1, 2, 4, 8, 16, 31, 31, 31, 31]);
    }

    #[test]
    fn random_faults_get_no_read_ahead() {
        assert_eq!(run(&[50, 7, 900, 3, 12_000, 400]), vec![0; 6]);
    }

    #[test]
    fn a_scan_survives_interleaved_random_faults() {
        // A scan from 0 and random faults far away, alternating.
        let mut s = Streams::default();
        let (mut b, mut windows) = (0u64, Vec::new());
        for i in 0..8u64 {
            let w = s.on_fault(b);
            s.requested(b, b + 1 + w);
            windows.push(w);
            b += 1 + w;
            let r = 1_000_000 + i * 7919;
            assert_eq!(s.on_fault(r), 0);
            s.requested(r, r + 1);
        }
        assert_eq!(windows, vec![0, 1, 2, 4, 8, 16, 31, 31]);
    }

    #[test]
    fn a_shortened_request_continues_from_where_it_ended() {
        let mut s = Streams::default();
        assert_eq!(s.on_fault(10), 0);
        s.requested(10, 11);
        assert_eq!(s.on_fault(11), 1);
        // Only one page was pending: the stream continues at 12.
        s.requested(11, 12);
        assert_eq!(s.on_fault(12), 2);
    }

    proptest! {
        #[test]
        fn the_window_never_exceeds_the_cap(bits in proptest::collection::vec(0u64..5000, 1..400)) {
            for w in run(&bits) {
                prop_assert!(w <= SEQ_MAX_PAGES);
            }
        }

        #[test]
        fn a_fault_far_from_every_stream_gets_nothing(
            bits in proptest::collection::vec(0u64..5000, 1..100),
            far in 10_000u64..1_000_000,
        ) {
            let mut s = Streams::default();
            for &b in &bits {
                let w = s.on_fault(b);
                s.requested(b, b + 1 + w);
            }
            prop_assert_eq!(s.on_fault(far * 64), 0);
        }
    }
}
