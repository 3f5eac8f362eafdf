//! The sans-IO link model: given a packet's arrival time and length, decide whether the link
//! drops it (queue overflow or random loss) or when it leaves the far end.
//!
//! The link is a drop-tail FIFO in front of a serialiser of `rate` bit/s, followed by a wire of
//! one-way `delay` (± uniform `jitter`). A packet of L bytes occupies the serialiser L*8/rate
//! seconds; the queue holds the bytes that have arrived but not finished serialising. Random loss
//! happens on the wire, so a lost packet has used its share of the rate, as on a real link.

use crate::rng::Random;

const NS_PER_S: u128 = 1_000_000_000;

/// Settings of one direction of the emulated link.
#[derive(Debug, Clone, PartialEq)]
pub struct LinkConfig {
    /// Serialisation rate in bit/s; `None` is infinitely fast.
    pub rate_bps: Option<u64>,
    /// One-way propagation delay in ns.
    pub delay_ns: u64,
    /// Half-width of the uniform jitter added to `delay_ns`, in ns.
    pub jitter_ns: u64,
    /// Probability that a packet is lost on the wire.
    pub loss: f64,
    /// Capacity of the drop-tail queue in front of the serialiser, in bytes.
    pub queue_bytes: u64,
    /// Let jitter reorder packets; otherwise a packet never leaves before its predecessor.
    pub allow_reorder: bool,
}

impl LinkConfig {
    /// The default queue: one bandwidth-delay product of the one-way delay, at least 1 MiB.
    pub fn default_queue_bytes(rate_bps: Option<u64>, delay_ns: u64) -> u64 {
        let bdp = rate_bps.map_or(0, |r| (r as u128 * delay_ns as u128 / NS_PER_S / 8) as u64);
        bdp.max(1 << 20)
    }
}

/// What the link does with one offered packet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Deliver at this time (ns, same clock as the arrival times).
    Release(u64),
    /// Lost on the wire.
    DropLoss,
    /// The queue in front of the serialiser was full.
    DropQueue,
}

/// One direction of the link; feed it packets in arrival order.
#[derive(Debug, Clone)]
pub struct LinkModel {
    cfg: LinkConfig,
    /// When the serialiser finishes the last admitted packet.
    link_free_at: u64,
    /// Sub-nanosecond remainder of serialisation times (in units of 1/rate ns), so rounding
    /// never drifts the long-run rate.
    rem: u128,
    /// Latest release time handed out, to keep FIFO order under jitter.
    last_release: u64,
}

impl LinkModel {
    /// A link with an empty queue.
    pub fn new(cfg: LinkConfig) -> Self {
        Self {
            cfg,
            link_free_at: 0,
            rem: 0,
            last_release: 0,
        }
    }

    /// Bytes waiting in the queue or being serialised at time `now`.
    pub fn backlog_bytes(&self, now: u64) -> u64 {
        match self.cfg.rate_bps {
            Some(rate) if self.link_free_at > now => {
                ((self.link_free_at - now) as u128 * rate as u128).div_ceil(NS_PER_S * 8) as u64
            }
            _ => 0,
        }
    }

    /// Offers a packet of `len` bytes arriving at `arrival` (ns; non-decreasing across calls).
    pub fn offer(&mut self, arrival: u64, len: usize, rng: &mut impl Random) -> Verdict {
        let len = len as u64;
        let finish = match self.cfg.rate_bps {
            None => arrival,
            Some(rate) => {
                let backlog = self.backlog_bytes(arrival);
                // An empty queue always takes a packet, so a queue smaller than the MTU still
                // passes traffic instead of blackholing it.
                if backlog > 0 && backlog + len > self.cfg.queue_bytes {
                    return Verdict::DropQueue;
                }
                let start = self.link_free_at.max(arrival);
                let scaled = len as u128 * 8 * NS_PER_S + self.rem;
                let rate = rate as u128;
                self.rem = scaled % rate;
                self.link_free_at = start + (scaled / rate) as u64;
                self.link_free_at
            }
        };
        if self.cfg.loss > 0.0 && rng.next_f64() < self.cfg.loss {
            return Verdict::DropLoss;
        }
        let mut release = finish + self.cfg.delay_ns;
        if self.cfg.jitter_ns > 0 {
            let span = 2 * self.cfg.jitter_ns + 1;
            let offset = (rng.next_f64() * span as f64) as u64;
            // Never before the packet has left the serialiser: the wire has no negative delay.
            release = (release + offset)
                .saturating_sub(self.cfg.jitter_ns)
                .max(finish);
        }
        if !self.cfg.allow_reorder {
            release = release.max(self.last_release);
        }
        self.last_release = self.last_release.max(release);
        Verdict::Release(release)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rng::Xoshiro256;
    use proptest::prelude::*;

    fn cfg(rate: Option<u64>, delay: u64, jitter: u64, loss: f64, queue: u64) -> LinkConfig {
        LinkConfig {
            rate_bps: rate,
            delay_ns: delay,
            jitter_ns: jitter,
            loss,
            queue_bytes: queue,
            allow_reorder: false,
        }
    }

    /// Arrivals as (gap since previous ns, length).
    fn arrivals() -> impl Strategy<Value = Vec<(u64, usize)>> {
        prop::collection::vec((0u64..200_000, 40usize..9000), 1..400)
    }

    proptest! {
        #[test]
        fn fifo_rate_and_delay_respected(
            rate in prop::option::of(1_000_000u64..20_000_000_000),
            delay in 0u64..50_000_000,
            jitter in 0u64..2_000_000,
            queue in 1_000u64..4_000_000,
            seed: u64,
            pkts in arrivals(),
        ) {
            let mut m = LinkModel::new(cfg(rate, delay, jitter, 0.0, queue));
            let mut rng = Xoshiro256::seed_from_u64(seed);
            let mut now = 1_000_000_000u64;
            // An empty queue takes any packet, so the backlog may reach the largest one.
            let mut largest = 0u64;
            let mut prev_release = 0u64;
            // Earliest moment the serialiser could have finished the admitted packets so far.
            let mut serial_done = 0u128;
            for (gap, len) in pkts {
                now += gap;
                largest = largest.max(len as u64);
                match m.offer(now, len, &mut rng) {
                    Verdict::Release(t) => {
                        prop_assert!(t >= prev_release, "FIFO order broken");
                        prev_release = t;
                        let ser = rate.map_or(0, |r| len as u128 * 8 * NS_PER_S / r as u128);
                        serial_done = serial_done.max(now as u128) + ser;
                        // Rate: no packet leaves before the serialiser could have sent it and
                        // everything admitted before it (allowing 1 ns rounding per packet).
                        let earliest = (serial_done + delay as u128).saturating_sub(jitter as u128 + 400);
                        prop_assert!(t as u128 >= earliest, "released {t} before {earliest}");
                        prop_assert!(t >= now + delay.saturating_sub(jitter));
                        if jitter == 0 && rate.is_none() {
                            prop_assert_eq!(t, now + delay);
                        }
                    }
                    Verdict::DropQueue => {
                        prop_assert!(rate.is_some());
                        prop_assert!(m.backlog_bytes(now) + len as u64 > queue);
                    }
                    Verdict::DropLoss => prop_assert!(false, "loss with p=0"),
                }
                // Rounding to whole ns (carried forward) and whole bytes: under 1 ns of bytes.
                let slack = 2 + rate.map_or(0, |r| r.div_ceil(8_000_000_000));
                prop_assert!(m.backlog_bytes(now) <= queue.max(largest) + slack);
            }
        }

        #[test]
        fn loss_fraction_matches(p in 0.0f64..0.3, seed: u64) {
            let mut m = LinkModel::new(cfg(None, 0, 0, p, 1 << 20));
            let mut rng = Xoshiro256::seed_from_u64(seed);
            let n = 40_000u32;
            let lost = (0..n)
                .filter(|&i| m.offer(i as u64 * 1000, 1500, &mut rng) == Verdict::DropLoss)
                .count() as f64;
            let expected = p * n as f64;
            let sigma = (n as f64 * p * (1.0 - p)).sqrt();
            // 5 sigma: a correct model essentially never fails, a biased one does.
            prop_assert!((lost - expected).abs() <= 5.0 * sigma + 1.0,
                "lost {lost}, expected {expected} (sigma {sigma})");
        }
    }

    #[test]
    fn saturated_link_delivers_exactly_the_rate() {
        // 1 Gbit/s link offered 2 Gbit/s of 1500-byte packets for one second.
        let rate = 1_000_000_000u64;
        let mut m = LinkModel::new(cfg(Some(rate), 5_000_000, 0, 0.0, 1 << 20));
        let mut rng = Xoshiro256::seed_from_u64(1);
        let (mut first, mut last, mut bytes, mut qdrops) = (None, 0, 0u64, 0);
        for i in 0..166_667u64 {
            match m.offer(i * 6_000, 1500, &mut rng) {
                Verdict::Release(t) => {
                    first.get_or_insert(t);
                    last = t;
                    bytes += 1500;
                }
                Verdict::DropQueue => qdrops += 1,
                Verdict::DropLoss => unreachable!(),
            }
        }
        let first = first.unwrap();
        // Bytes after the first packet, over the time they took.
        let measured = (bytes - 1500) as f64 * 8.0 / ((last - first) as f64 / 1e9);
        assert!((measured / rate as f64 - 1.0).abs() < 1e-6, "{measured}");
        assert!(qdrops > 80_000, "{qdrops}");
    }

    #[test]
    fn odd_rate_does_not_drift() {
        // 7 bytes at 3 bit/s-scaled rates produce fractional ns; the remainder must carry.
        let rate = 333_333_333u64;
        let mut m = LinkModel::new(cfg(Some(rate), 0, 0, 0.0, u64::MAX / 4));
        let mut rng = Xoshiro256::seed_from_u64(1);
        let mut last = 0;
        for _ in 0..1_000_000 {
            if let Verdict::Release(t) = m.offer(0, 7, &mut rng) {
                last = t;
            }
        }
        let exact = 1_000_000u128 * 7 * 8 * NS_PER_S / rate as u128;
        assert!(
            (last as i128 - exact as i128).abs() <= 1,
            "{last} vs {exact}"
        );
    }

    #[test]
    fn reorder_only_when_allowed() {
        let mut c = cfg(None, 10_000_000, 5_000_000, 0.0, 1 << 20);
        c.allow_reorder = true;
        let mut m = LinkModel::new(c);
        let mut rng = Xoshiro256::seed_from_u64(3);
        let rel: Vec<u64> = (0..1000)
            .map(|i| match m.offer(i * 1000, 100, &mut rng) {
                Verdict::Release(t) => t,
                _ => unreachable!(),
            })
            .collect();
        assert!(
            rel.windows(2).any(|w| w[1] < w[0]),
            "jitter never reordered"
        );
    }

    #[test]
    fn default_queue_is_bdp_or_1mib() {
        assert_eq!(LinkConfig::default_queue_bytes(None, 0), 1 << 20);
        assert_eq!(
            LinkConfig::default_queue_bytes(Some(1_000_000_000), 1_000_000),
            1 << 20
        );
        assert_eq!(
            LinkConfig::default_queue_bytes(Some(1_000_000_000), 20_000_000),
            2_500_000
        );
    }
}
