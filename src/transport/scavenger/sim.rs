//! A simulated bottleneck for the controller's tests: a FIFO link of fixed rate with a drop-tail
//! buffer, a fixed base round trip (half each way), optional jitter on the acknowledgement path,
//! a receiver that acknowledges every second packet or after its 25 ms delayed-ACK timer (as
//! quinn's does), and a sender that follows quinn's rules: a packet goes out only while
//! `in_flight + size < window`, paced by quinn's token bucket.

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::time::{Duration, Instant};

use super::Scavenger;

/// The packet size of the simulated path.
pub const MTU: u16 = 1200;
/// The receiver's delayed-ACK timer (quinn's default max_ack_delay).
const MAX_ACK_DELAY: Duration = Duration::from_millis(25);

/// The simulated path's bottleneck: its rate, base round trip, buffer and ACK jitter.
#[derive(Debug, Clone)]
pub struct Bottleneck {
    /// Bytes per second.
    pub rate: f64,
    pub base_rtt: Duration,
    /// Packets that would wait longer than this are dropped.
    pub buffer: Duration,
    /// Acknowledgements arrive up to this much late (uniform, deterministic pseudo-random).
    pub jitter: Duration,
}

/// What the sender saw over the measured part of a run.
#[derive(Debug)]
pub struct Outcome {
    /// Delivered bytes over what the link could carry.
    pub utilization: f64,
    /// Queueing delay the sent packets met, median and 99th percentile.
    pub queue_p50: Duration,
    pub queue_p99: Duration,
    pub losses: u64,
    pub min_window: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
enum Kind {
    /// A packet sent at this time reaches the receiver.
    Arrive(Duration),
    /// The receiver's delayed-ACK timer of this generation fires.
    AckTimer(u64),
    /// An ACK of the packets sent at these times reaches the sender.
    Ack(Vec<Duration>),
    /// The sender learns that the packet sent then was dropped.
    Lost(Duration),
}

pub struct Sim {
    t0: Instant,
    now: Duration,
    seq: u64,
    link_free: Duration,
    events: BinaryHeap<Reverse<(Duration, u64, Kind)>>,
    in_flight: u64,
    rng: u64,
    /// Packets the receiver holds unacknowledged, and its timer generation.
    pending: Vec<Duration>,
    timer_gen: u64,
    /// quinn's pacer: a token bucket refilled at 1.25 windows per smoothed round trip, holding
    /// 2 ms of that (at least 10, at most 256 packets).
    tokens: f64,
    refilled: Duration,
    srtt: Duration,
}

impl Sim {
    pub fn new() -> Self {
        Sim {
            t0: Instant::now(),
            now: Duration::ZERO,
            seq: 0,
            link_free: Duration::ZERO,
            events: BinaryHeap::new(),
            in_flight: 0,
            rng: 0x9e37_79b9_7f4a_7c15,
            pending: Vec::new(),
            timer_gen: 0,
            tokens: 10.0 * f64::from(MTU),
            refilled: Duration::ZERO,
            srtt: Duration::from_millis(1),
        }
    }

    /// The simulated clock.
    pub fn now(&self) -> Instant {
        self.t0 + self.now
    }

    fn at(&mut self, at: Duration, kind: Kind) {
        self.seq += 1;
        self.events.push(Reverse((at, self.seq, kind)));
    }

    fn jitter(&mut self, max: Duration) -> Duration {
        self.rng ^= self.rng << 13;
        self.rng ^= self.rng >> 7;
        self.rng ^= self.rng << 17;
        max.mul_f64((self.rng % 1000) as f64 / 1000.0)
    }

    fn refill(&mut self, window: u64) {
        let mtu = f64::from(MTU);
        let srtt = self.srtt.as_secs_f64().max(1e-6);
        let capacity = (window as f64 * 0.002 / srtt).clamp(10.0 * mtu, 256.0 * mtu);
        let elapsed = (self.now - self.refilled).as_secs_f64();
        self.tokens = (self.tokens + 1.25 * window as f64 * elapsed / srtt).min(capacity);
        self.refilled = self.now;
    }

    /// Sends what the window and the pacer allow; returns when the pacer allows more.
    fn send(
        &mut self,
        c: &Scavenger,
        link: &Bottleneck,
        from: Duration,
        queue: &mut Vec<Duration>,
    ) {
        let size = u64::from(MTU);
        self.refill(c.window_bytes());
        while self.in_flight + size < c.window_bytes() && self.tokens >= size as f64 {
            self.tokens -= size as f64;
            self.in_flight += size;
            let start = self.link_free.max(self.now);
            let wait = start - self.now;
            if wait > link.buffer {
                self.at(self.now + link.base_rtt + link.buffer, Kind::Lost(self.now));
                continue;
            }
            self.link_free = start + Duration::from_secs_f64(size as f64 / link.rate);
            if self.now >= from {
                queue.push(wait);
            }
            self.at(self.link_free + link.base_rtt / 2, Kind::Arrive(self.now));
        }
    }

    /// The pacer's next wake-up, if it is what blocks the sender.
    fn paced(&self, c: &Scavenger) -> Option<Duration> {
        let size = u64::from(MTU);
        (self.in_flight + size < c.window_bytes()).then(|| {
            let missing = size as f64 - self.tokens;
            let wait = self
                .srtt
                .mul_f64(missing / (1.25 * c.window_bytes() as f64));
            self.now + wait.max(Duration::from_nanos(100))
        })
    }

    /// Runs `c` until `until`, measuring from `from`; `link_at` may change the link over time (a
    /// route change).
    pub fn run(
        &mut self,
        c: &mut Scavenger,
        from: Duration,
        until: Duration,
        link_at: impl Fn(Duration) -> Bottleneck,
    ) -> Outcome {
        let size = u64::from(MTU);
        let (mut delivered, mut losses, mut min_window) = (0u64, 0u64, u64::MAX);
        let mut queue = Vec::new();
        while self.now < until {
            let link = link_at(self.now);
            self.send(c, &link, from, &mut queue);
            let next_event = self.events.peek().map(|Reverse((at, _, _))| *at);
            match (self.paced(c), next_event) {
                (Some(p), Some(e)) if p < e => {
                    self.now = p;
                    continue;
                }
                (Some(p), None) => {
                    self.now = p;
                    continue;
                }
                (_, None) => break,
                _ => {}
            }
            let Some(Reverse((at, _, kind))) = self.events.pop() else {
                break;
            };
            self.now = self.now.max(at);
            let back = link.base_rtt / 2;
            match kind {
                Kind::Arrive(sent) => {
                    self.pending.push(sent);
                    self.timer_gen += 1;
                    if self.pending.len() >= 2 {
                        let acked = std::mem::take(&mut self.pending);
                        let at = self.now + back + self.jitter(link.jitter);
                        self.at(at, Kind::Ack(acked));
                    } else {
                        self.at(self.now + MAX_ACK_DELAY, Kind::AckTimer(self.timer_gen));
                    }
                }
                Kind::AckTimer(generation) => {
                    if generation == self.timer_gen && !self.pending.is_empty() {
                        let acked = std::mem::take(&mut self.pending);
                        let at = self.now + back + self.jitter(link.jitter);
                        self.at(at, Kind::Ack(acked));
                    }
                }
                Kind::Ack(sents) => {
                    self.in_flight -= size * sents.len() as u64;
                    for &sent in &sents {
                        let rtt = self.now - sent;
                        self.srtt = (self.srtt * 7 + rtt) / 8;
                        c.ack(self.t0 + self.now, self.t0 + sent, size, false);
                    }
                    c.end_acks(self.t0 + self.now);
                    if self.now >= from {
                        delivered += size * sents.len() as u64;
                    }
                }
                Kind::Lost(sent) => {
                    self.in_flight -= size;
                    losses += 1;
                    c.congestion(self.t0 + self.now, self.t0 + sent, false);
                }
            }
            if self.now >= from {
                min_window = min_window.min(c.window_bytes());
            }
        }
        queue.sort();
        let pct = |p: f64| {
            queue
                .get(((queue.len() as f64 * p) as usize).min(queue.len().saturating_sub(1)))
                .copied()
                .unwrap_or_default()
        };
        let capacity = link_at(until).rate * (until - from).as_secs_f64();
        Outcome {
            utilization: delivered as f64 / capacity,
            queue_p50: pct(0.5),
            queue_p99: pct(0.99),
            losses,
            min_window,
        }
    }
}
