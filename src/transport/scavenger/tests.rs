//! The controller against a simulated bottleneck: a FIFO link of fixed rate with a drop-tail
//! buffer, a fixed base round trip and optional jitter on the acknowledgement path.

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use proptest::prelude::*;

use super::{Scavenger, ScavengerConfig};

const MTU: u16 = 1200;

/// A packet's fate, ordered by when the sender learns it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
struct Event {
    at: Duration,
    sent: Duration,
    lost: bool,
}

#[derive(Debug, Clone)]
struct Link {
    /// Bytes per second.
    rate: f64,
    base_rtt: Duration,
    /// Packets that would wait longer than this are dropped.
    buffer: Duration,
    /// Acknowledgements arrive up to this much late (uniform, deterministic pseudo-random).
    jitter: Duration,
}

/// What the sender saw over the measured part of a run.
#[derive(Debug)]
struct Outcome {
    /// Delivered bytes over what the link could carry.
    utilization: f64,
    /// Queueing delay the sent packets met, median and 99th percentile.
    queue_p50: Duration,
    queue_p99: Duration,
    losses: u64,
    min_window: u64,
}

struct Sim {
    t0: Instant,
    now: Duration,
    link_free: Duration,
    events: BinaryHeap<Reverse<Event>>,
    in_flight: u64,
    rng: u64,
    /// quinn's pacer: a token bucket refilled at 1.25 windows per smoothed round trip, holding
    /// 2 ms of that (at least 10, at most 256 packets).
    tokens: f64,
    refilled: Duration,
    srtt: Duration,
}

impl Sim {
    fn new() -> Self {
        Sim {
            t0: Instant::now(),
            now: Duration::ZERO,
            link_free: Duration::ZERO,
            events: BinaryHeap::new(),
            in_flight: 0,
            rng: 0x9e37_79b9_7f4a_7c15,
            tokens: 10.0 * f64::from(MTU),
            refilled: Duration::ZERO,
            srtt: Duration::from_millis(1),
        }
    }

    fn refill(&mut self, window: u64) {
        let mtu = f64::from(MTU);
        let srtt = self.srtt.as_secs_f64().max(1e-6);
        let capacity = (window as f64 * 0.002 / srtt).clamp(10.0 * mtu, 256.0 * mtu);
        let elapsed = (self.now - self.refilled).as_secs_f64();
        self.tokens = (self.tokens + 1.25 * window as f64 * elapsed / srtt).min(capacity);
        self.refilled = self.now;
    }

    fn jitter(&mut self, max: Duration) -> Duration {
        self.rng ^= self.rng << 13;
        self.rng ^= self.rng >> 7;
        self.rng ^= self.rng << 17;
        max.mul_f64((self.rng % 1000) as f64 / 1000.0)
    }

    /// Runs `c` over `link` until `until`, measuring from `from`; `link_at` may change the link
    /// over time (a route change).
    fn run(
        &mut self,
        c: &mut Scavenger,
        from: Duration,
        until: Duration,
        link_at: impl Fn(Duration) -> Link,
    ) -> Outcome {
        let size = u64::from(MTU);
        let (mut delivered, mut losses, mut min_window) = (0u64, 0u64, u64::MAX);
        let mut queue = Vec::new();
        while self.now < until {
            let link = link_at(self.now);
            self.refill(c.window_bytes());
            while self.in_flight + size <= c.window_bytes() && self.tokens >= size as f64 {
                self.tokens -= size as f64;
                let tx = Duration::from_secs_f64(size as f64 / link.rate);
                let start = self.link_free.max(self.now);
                let wait = start - self.now;
                let event = if wait > link.buffer {
                    Event {
                        at: self.now + link.base_rtt + link.buffer,
                        sent: self.now,
                        lost: true,
                    }
                } else {
                    self.link_free = start + tx;
                    if self.now >= from {
                        queue.push(wait);
                    }
                    Event {
                        at: self.link_free + link.base_rtt + self.jitter(link.jitter),
                        sent: self.now,
                        lost: false,
                    }
                };
                self.events.push(Reverse(event));
                self.in_flight += size;
            }
            // Blocked by the pacer: wake when it has a packet's worth of tokens again.
            let paced = (self.in_flight + size <= c.window_bytes()).then(|| {
                let missing = size as f64 - self.tokens;
                let wait = self.srtt.mul_f64(missing / (1.25 * c.window_bytes() as f64));
                self.now + wait.max(Duration::from_nanos(100))
            });
            let next_ack = self.events.peek().map(|Reverse(e)| e.at);
            match (paced, next_ack) {
                (Some(p), Some(a)) if p < a => {
                    self.now = p.max(self.now + Duration::from_nanos(1));
                    continue;
                }
                (Some(p), None) => {
                    self.now = p.max(self.now + Duration::from_nanos(1));
                    continue;
                }
                (_, None) => break,
                _ => {}
            }
            let Some(Reverse(e)) = self.events.pop() else {
                break;
            };
            self.now = self.now.max(e.at);
            self.in_flight -= size;
            if e.lost {
                losses += 1;
                c.congestion(self.t0 + self.now, self.t0 + e.sent, false);
            } else {
                let rtt = self.now - e.sent;
                self.srtt = (self.srtt * 7 + rtt) / 8;
                c.ack(self.t0 + self.now, self.t0 + e.sent, size, false);
                if self.now >= from {
                    delivered += size;
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

fn controller(config: ScavengerConfig) -> Scavenger {
    Scavenger::new(Arc::new(config), Instant::now(), MTU)
}

fn gigabit_lan() -> Link {
    Link {
        rate: 125e6,
        base_rtt: Duration::from_micros(300),
        buffer: Duration::from_millis(20),
        jitter: Duration::ZERO,
    }
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

#[test]
fn keeps_the_queue_near_target_on_a_gigabit_lan() {
    let mut c = controller(ScavengerConfig::default());
    let o = Sim::new().run(&mut c, secs(1.0), secs(3.0), |_| gigabit_lan());
    assert!(o.utilization > 0.97, "{o:?}");
    assert!((0.5..1.5).contains(&ms(o.queue_p50)), "{o:?}");
    assert!(ms(o.queue_p99) < 2.0, "{o:?}");
    assert_eq!(o.losses, 0, "{o:?}");
}

#[test]
fn fills_a_long_fat_link_without_filling_its_buffer() {
    let link = Link {
        rate: 12.5e6,
        base_rtt: Duration::from_millis(40),
        buffer: Duration::from_millis(100),
        jitter: Duration::ZERO,
    };
    let mut c = controller(ScavengerConfig::default());
    let o = Sim::new().run(&mut c, secs(5.0), secs(15.0), |_| link.clone());
    assert!(o.utilization > 0.97, "{o:?}");
    assert!(ms(o.queue_p99) < 2.0, "{o:?}");
}

#[test]
fn ack_jitter_costs_little_throughput() {
    let link = Link {
        jitter: Duration::from_micros(500),
        ..gigabit_lan()
    };
    let mut c = controller(ScavengerConfig::default());
    let o = Sim::new().run(&mut c, secs(1.0), secs(3.0), |_| link.clone());
    assert!(o.utilization > 0.97, "{o:?}");
    assert!(ms(o.queue_p99) < 2.5, "{o:?}");
}

#[test]
fn adopts_a_longer_route_once_the_old_base_ages_out() {
    let config = ScavengerConfig {
        base_bucket: Duration::from_millis(500),
        base_buckets: 2,
        slowdown_interval: Some(Duration::from_millis(400)),
        ..ScavengerConfig::default()
    };
    let link = |t: Duration| Link {
        base_rtt: if t < secs(1.0) {
            Duration::from_micros(300)
        } else {
            Duration::from_millis(5)
        },
        ..gigabit_lan()
    };
    let mut c = controller(config);
    let mut sim = Sim::new();
    // Right after the change the longer route looks like 4.7 ms of queue: the scavenger yields.
    let during = sim.run(&mut c, secs(1.1), secs(1.5), link);
    assert!(during.utilization < 0.5, "{during:?}");
    let after = sim.run(&mut c, secs(4.0), secs(6.0), link);
    assert!(after.utilization > 0.97, "{after:?}");
    // A slowdown every 400 ms (to keep up with these short base windows) adds 2 ms pacing bursts.
    assert!(ms(after.queue_p50) < 1.5, "{after:?}");
    assert!(ms(after.queue_p99) < 2.5, "{after:?}");
}

#[test]
fn without_slowdowns_the_base_delay_ratchets_up() {
    let config = ScavengerConfig {
        base_bucket: Duration::from_millis(200),
        base_buckets: 2,
        slowdown_interval: None,
        ..ScavengerConfig::default()
    };
    let mut c = controller(config);
    let o = Sim::new().run(&mut c, secs(5.0), secs(8.0), |_| gigabit_lan());
    assert!(ms(o.queue_p50) > 3.0, "{o:?}");
}

#[test]
fn periodic_slowdowns_keep_the_base_delay_true() {
    // Short base windows: without a drained queue now and then, the base delay would creep up.
    let config = ScavengerConfig {
        base_bucket: Duration::from_millis(200),
        base_buckets: 2,
        slowdown_interval: Some(Duration::from_millis(300)),
        ..ScavengerConfig::default()
    };
    let mut c = controller(config);
    let o = Sim::new().run(&mut c, secs(5.0), secs(8.0), |_| gigabit_lan());
    assert!(ms(o.queue_p50) < 1.5, "{o:?}");
    assert!(o.utilization > 0.97, "{o:?}");
}

#[test]
fn a_loss_halves_the_window_once_per_episode() {
    let t0 = Instant::now();
    let mut c = controller(ScavengerConfig::default());
    let ms_ = |n: u64| t0 + Duration::from_millis(n);
    // Grow a while in slow start (no queueing: every sample equals the base).
    for i in 1..=100 {
        c.ack(ms_(i + 1), ms_(i), 1200, false);
    }
    let before = c.window_bytes();
    assert!(before > 100_000, "{before}");
    c.congestion(ms_(200), ms_(150), false);
    let halved = c.window_bytes();
    assert!(halved.abs_diff(before / 2) <= 1, "{before} -> {halved}");
    // Another loss of a packet sent before the reduction belongs to the same episode.
    c.congestion(ms_(201), ms_(199), false);
    assert_eq!(c.window_bytes(), halved);
    // Acks of packets sent before the reduction don't regrow it.
    c.ack(ms_(202), ms_(199), 1200, false);
    assert_eq!(c.window_bytes(), halved);
    c.congestion(ms_(300), ms_(250), true);
    assert_eq!(c.window_bytes(), 2 * u64::from(MTU));
}

#[test]
fn yields_to_a_standing_queue_it_did_not_build() {
    // Someone else keeps the queue at 5 ms: the scavenger shrinks to its minimum.
    let t0 = Instant::now();
    let mut c = controller(ScavengerConfig::default());
    let at = |us: u64| t0 + Duration::from_micros(us);
    for i in 0..50 {
        c.ack(at(i * 1000 + 300), at(i * 1000), 1200, false);
    }
    for i in 50..5000 {
        c.ack(at(i * 1000 + 5300), at(i * 1000), 1200, false);
    }
    assert_eq!(c.window_bytes(), 2 * u64::from(MTU));
}

fn secs(s: f64) -> Duration {
    Duration::from_secs_f64(s)
}

#[derive(Debug, Clone)]
enum Step {
    Ack { rtt_us: u64, gap_us: u64, app_limited: bool },
    Loss { persistent: bool },
    Mtu(u16),
}

fn step() -> impl Strategy<Value = Step> {
    prop_oneof![
        8 => (1u64..200_000, 0u64..5_000, any::<bool>())
            .prop_map(|(rtt_us, gap_us, app_limited)| Step::Ack { rtt_us, gap_us, app_limited }),
        1 => any::<bool>().prop_map(|persistent| Step::Loss { persistent }),
        1 => (1200u16..9000).prop_map(Step::Mtu),
    ]
}

proptest! {
    #[test]
    fn the_window_never_drops_below_its_minimum(steps in prop::collection::vec(step(), 1..400)) {
        let t0 = Instant::now();
        let mut c = controller(ScavengerConfig {
            slowdown_interval: Some(Duration::from_millis(50)),
            ..ScavengerConfig::default()
        });
        let (mut now, mut mtu) = (Duration::from_secs(1), MTU);
        for s in steps {
            match s {
                Step::Ack { rtt_us, gap_us, app_limited } => {
                    now += Duration::from_micros(gap_us);
                    let sent = now.saturating_sub(Duration::from_micros(rtt_us));
                    c.ack(t0 + now, t0 + sent, u64::from(mtu), app_limited);
                }
                Step::Loss { persistent } => {
                    let before = c.window_bytes();
                    now += Duration::from_micros(100);
                    c.congestion(t0 + now, t0 + now - Duration::from_micros(50), persistent);
                    prop_assert!(c.window_bytes() <= before.max(2 * u64::from(mtu)));
                }
                Step::Mtu(m) => {
                    mtu = m;
                    c.mtu_changed(m);
                }
            }
            prop_assert!(c.window_bytes() >= 2 * u64::from(mtu));
            prop_assert!(c.window.is_finite());
        }
    }

    #[test]
    fn converges_to_the_target_on_any_link(
        mbit in 20.0f64..2000.0,
        base_us in 100u64..30_000,
        target_us in 500u64..5_000,
    ) {
        let link = Link {
            rate: mbit * 1e6 / 8.0,
            base_rtt: Duration::from_micros(base_us),
            buffer: Duration::from_millis(50),
            jitter: Duration::ZERO,
        };
        let target = Duration::from_micros(target_us);
        let mut c = controller(ScavengerConfig { target, ..ScavengerConfig::default() });
        let o = Sim::new().run(&mut c, secs(3.0), secs(4.0), |_| link.clone());
        prop_assert!(o.utilization > 0.95, "{:?}", o);
        prop_assert!(o.queue_p50 < target.mul_f64(1.5), "{:?}", o);
        prop_assert!(o.queue_p99 < target * 2 + Duration::from_micros(100), "{:?}", o);
        prop_assert!(o.min_window >= 2 * u64::from(MTU));
    }
}
