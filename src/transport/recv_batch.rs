//! Receive batching on a bulk endpoint's socket (pure policy; the socket that applies it is
//! [`super::batched_socket`]).
//!
//! quinn's endpoint driver reads its socket until it runs dry (`recvmmsg`, up to 32 datagrams
//! a call) and hands what it read to the connection's driver, which decrypts it, wakes the
//! stream's reader and sends the ACKs due. When datagrams arrive slower than the receiver takes
//! them, as on a 1 Gbit/s link (~85 datagrams per ms) with a receiver that could take ten times
//! that, every wakeup finds 2-3 datagrams and that chain runs once per 2-3 datagrams: measured
//! here (`pageserv-lab quinn-bulk --link 1gbit+2ms`), ~26,000 context switches and ~28,000
//! `recvmmsg` calls a second for ~84,000 datagrams. A NIC's interrupt coalescing does the same
//! for the kernel.
//!
//! The rule: after a read that found fewer than [`RecvBatching::target`] datagrams, the socket
//! is not read again until `target` more are expected at the rate measured over the last
//! window, provided that wait lies between [`RecvBatching::min_hold`] and
//! [`RecvBatching::max_hold`] and the rate is at most [`RecvBatching::max_per_ms`].
//!
//! Invariants:
//! - a flow too slow to bring `target` datagrams within `max_hold` (control messages, ACKs, a
//!   handshake, the images at the freeze) is never held: its rate is measured over a window that
//!   includes the quiet time before it, so its first datagram after a pause is never held either;
//! - a hold never exceeds `max_hold` (500 us by default), well below what a stream window (2 MiB)
//!   lasts at the rates it applies to (~9 ms at 1 Gbit/s), so flow control never stalls on it;
//! - a read that filled its batch, or a flow above `max_per_ms`, never holds (the receiver is
//!   busy: a hold would idle it). The rate counts datagrams, not buffers: with GRO one buffer
//!   holds several.
//!
//! Measured (README, "Receive batching"): quinn alone at 1 Gbit/s, receiver 29-30% -> 24-25% of
//! a core; a 1 GiB post-copy at 1 Gbit/s, dst 43-44% -> 36-37%, src 33-35% -> 30-32%; nothing
//! on the bare veth, where flows run above `max_per_ms`.

use std::time::{Duration, Instant};

/// Tuning of receive batching.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RecvBatching {
    /// Datagrams a read should find.
    pub target: u32,
    /// The longest hold: flows that need longer to bring `target` datagrams are not held.
    pub max_hold: Duration,
    /// Holds shorter than this are skipped (arming a timer would cost more than it saves).
    pub min_hold: Duration,
    /// The window the arrival rate is measured over.
    pub window: Duration,
    /// Datagrams per millisecond above which nothing is held: a receiver that takes that many is
    /// busy most of the time, and a hold would idle it while its sender waits for ACKs and flow
    /// credit (measured on the bare veth: 860-920 MiB/s with holds against 1,210-1,230 without).
    pub max_per_ms: u32,
}

impl Default for RecvBatching {
    /// 32 datagrams (one full `recvmmsg`, ~47 KB at 1,466 bytes), held at most 500 us: flows of
    /// 64 to 150 datagrams per ms (~90 to ~220 MB/s at 1,466 bytes, a 1 Gbit/s link's 85
    /// included) are batched; anything slower is read as it comes, anything faster keeps its
    /// receiver busy anyway.
    fn default() -> Self {
        RecvBatching {
            target: 32,
            max_hold: Duration::from_micros(500),
            min_hold: Duration::from_micros(40),
            window: Duration::from_millis(2),
            max_per_ms: 150,
        }
    }
}

/// The batching state of one socket.
#[derive(Debug, Clone)]
pub struct Batcher {
    cfg: RecvBatching,
    window_start: Option<Instant>,
    window_datagrams: u64,
    /// Datagrams per second over the last whole window; 0 until one has passed.
    rate: f64,
}

impl Batcher {
    pub fn new(cfg: RecvBatching) -> Self {
        Batcher {
            cfg,
            window_start: None,
            window_datagrams: 0,
            rate: 0.0,
        }
    }

    /// The arrival rate the last whole window measured, datagrams per second.
    pub fn rate(&self) -> f64 {
        self.rate
    }

    /// A read at `now` returned `n` datagrams (0: it found the socket empty, or a wakeup found
    /// nothing). Returns the instant before which the socket should not be read again, if any.
    pub fn on_read(&mut self, now: Instant, n: usize) -> Option<Instant> {
        let start = *self.window_start.get_or_insert(now);
        self.window_datagrams += n as u64;
        let elapsed = now.saturating_duration_since(start);
        if elapsed >= self.cfg.window {
            self.rate = self.window_datagrams as f64 / elapsed.as_secs_f64();
            self.window_start = Some(now);
            self.window_datagrams = 0;
        }
        let target = self.cfg.target as usize;
        if n >= target || self.rate <= 0.0 || self.rate > f64::from(self.cfg.max_per_ms) * 1e3 {
            return None;
        }
        let hold = Duration::try_from_secs_f64(target as f64 / self.rate).ok()?;
        (self.cfg.min_hold..=self.cfg.max_hold)
            .contains(&hold)
            .then(|| now + hold)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn us(n: u64) -> Duration {
        Duration::from_micros(n)
    }

    /// Feeds reads of `per_read` datagrams every `gap` for `total`, returns the holds.
    fn steady(
        b: &mut Batcher,
        t0: Instant,
        gap: Duration,
        per_read: usize,
        total: Duration,
    ) -> Vec<Duration> {
        let mut holds = Vec::new();
        let mut t = t0;
        while t < t0 + total {
            if let Some(until) = b.on_read(t, per_read) {
                holds.push(until - t);
            }
            t += gap;
        }
        holds
    }

    #[test]
    fn a_1_gbit_flow_read_in_small_batches_is_held_for_a_batch() {
        // ~85 datagrams per ms, read 3 at a time.
        let mut b = Batcher::new(RecvBatching::default());
        let holds = steady(&mut b, Instant::now(), us(35), 3, Duration::from_millis(10));
        let first_window = holds.len();
        assert!(
            first_window > 0,
            "held once the first window measured the rate"
        );
        // 32 datagrams at ~85.7 per ms: ~373 us.
        for h in holds {
            assert!((us(340)..=us(400)).contains(&h), "hold {h:?}");
        }
        assert!((b.rate() - 85_714.0).abs() < 2_000.0, "rate {}", b.rate());
    }

    #[test]
    fn control_traffic_and_acks_are_never_held() {
        // One datagram every 100 us (10 per ms): 24 would take 2.4 ms, above max_hold.
        let mut b = Batcher::new(RecvBatching::default());
        assert!(
            steady(
                &mut b,
                Instant::now(),
                us(100),
                1,
                Duration::from_millis(20)
            )
            .is_empty()
        );
    }

    #[test]
    fn a_receiver_that_is_behind_is_never_held() {
        let mut b = Batcher::new(RecvBatching::default());
        assert!(
            steady(
                &mut b,
                Instant::now(),
                us(20),
                32,
                Duration::from_millis(20)
            )
            .is_empty()
        );
    }

    #[test]
    fn the_first_datagram_after_a_pause_is_not_held() {
        let mut b = Batcher::new(RecvBatching::default());
        let t0 = Instant::now();
        let busy = steady(&mut b, t0, us(35), 3, Duration::from_millis(10));
        assert!(!busy.is_empty());
        // 50 ms of silence, then one datagram (the images at the freeze, say).
        let t = t0 + Duration::from_millis(60);
        assert_eq!(b.on_read(t, 1), None);
        // Below the 64 per ms a hold needs (32 within 500 us): the pause counts in the rate.
        assert!(b.rate() < 64_000.0, "rate {}", b.rate());
    }

    #[test]
    fn nothing_is_held_before_a_window_has_passed() {
        let mut b = Batcher::new(RecvBatching::default());
        let t0 = Instant::now();
        assert_eq!(b.on_read(t0, 3), None);
        assert_eq!(b.on_read(t0 + us(35), 3), None);
    }

    #[test]
    fn bulk_endpoints_batch_and_the_fault_connection_does_not() {
        use crate::transport::TransportOptions;
        let bulk = TransportOptions::default().with_sparse_bulk_acks();
        assert_eq!(bulk.recv_batching, Some(RecvBatching::default()));
        assert_eq!(bulk.for_faults().recv_batching, None);
    }

    proptest! {
        #[test]
        fn holds_stay_within_bounds_and_full_reads_never_hold(
            reads in proptest::collection::vec((0u64..5_000, 0usize..64), 1..400),
            target in 1u32..64,
        ) {
            let cfg = RecvBatching { target, ..RecvBatching::default() };
            let mut b = Batcher::new(cfg);
            let mut t = Instant::now();
            for (gap, n) in reads {
                t += us(gap);
                if let Some(until) = b.on_read(t, n) {
                    prop_assert!(n < target as usize);
                    let hold = until - t;
                    prop_assert!(hold >= cfg.min_hold && hold <= cfg.max_hold, "{hold:?}");
                }
            }
        }
    }
}
