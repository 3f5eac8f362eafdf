//! The controller's rules, and its behavior against the simulated bottleneck of [`super::sim`].

use std::sync::Arc;
use std::time::{Duration, Instant};

use proptest::prelude::*;

use super::sim::{Bottleneck, MTU, Sim};
use super::{Scavenger, ScavengerConfig};

/// One ACK frame for two packets sent together at `sent`, arriving at `now`.
fn ack_pair(c: &mut Scavenger, now: Instant, sent: Instant) {
    c.ack(now, sent, 1200, false);
    c.ack(now, sent, 1200, false);
    c.end_acks(now);
}

fn controller(config: ScavengerConfig) -> Scavenger {
    Scavenger::new(Arc::new(config), Instant::now(), MTU)
}

fn gigabit_lan() -> Bottleneck {
    Bottleneck {
        rate: 125e6,
        base_rtt: Duration::from_micros(300),
        buffer: Duration::from_millis(20),
        jitter: Duration::ZERO,
    }
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// The queue the controller aims at on `link`: its target, or three packets' time if longer.
fn effective_target(config: &ScavengerConfig, link: &Bottleneck) -> Duration {
    let packet = Duration::from_secs_f64(f64::from(MTU) / link.rate);
    config.target.max(packet.mul_f64(config.target_packets))
}

#[test]
fn keeps_the_queue_near_target_on_a_gigabit_lan() {
    let config = ScavengerConfig::default();
    let target = effective_target(&config, &gigabit_lan());
    let mut c = controller(config);
    let o = Sim::new().run(&mut c, secs(1.0), secs(3.0), |_| gigabit_lan());
    assert!(o.utilization > 0.97, "{o:?}");
    assert!(
        o.queue_p50 > target / 2 && o.queue_p50 < target * 3 / 2,
        "{o:?}"
    );
    assert!(o.queue_p99 < target * 2, "{o:?}");
    assert_eq!(o.losses, 0, "{o:?}");
}

#[test]
fn keeps_a_few_packets_queued_on_a_slow_link() {
    let link = Bottleneck {
        rate: 1.25e6,
        ..gigabit_lan()
    };
    let config = ScavengerConfig::default();
    let target = effective_target(&config, &link);
    assert!(target > config.target * 10);
    let mut c = controller(config);
    let o = Sim::new().run(&mut c, secs(2.0), secs(6.0), |_| link.clone());
    assert!(o.utilization > 0.97, "{o:?}");
    // The controller holds the smallest queue of its filter span at the target: the typical
    // packet sees a little more.
    assert!(
        o.queue_p50 > target / 2 && o.queue_p50 < target * 2,
        "{o:?}"
    );
}

#[test]
fn fills_a_long_fat_link_without_filling_its_buffer() {
    let link = Bottleneck {
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
fn ack_jitter_on_a_slow_link_costs_little_throughput() {
    // Two ACKs per 250 µs at 100 Mbit/s: a minimum over so few jittered samples is mostly
    // jitter, and the push would starve itself.
    let link = Bottleneck {
        rate: 12.5e6,
        jitter: Duration::from_micros(500),
        ..gigabit_lan()
    };
    let mut c = controller(ScavengerConfig::default());
    let o = Sim::new().run(&mut c, secs(2.0), secs(6.0), |_| link.clone());
    assert!(o.utilization > 0.95, "{o:?}");
    assert!(ms(o.queue_p99) < 1.0, "{o:?}");
}

#[test]
fn ack_jitter_costs_little_throughput() {
    let link = Bottleneck {
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
    let link = |t: Duration| Bottleneck {
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
        ack_pair(&mut c, ms_(i + 1), ms_(i));
    }
    let before = c.window_bytes();
    assert!(before > 100_000, "{before}");
    c.congestion(ms_(200), ms_(150), false);
    let halved = c.window_bytes();
    assert!(halved.abs_diff(before / 2) <= 1, "{before} -> {halved}");
    assert_eq!(c.window_bytes(), halved);
    // Another loss of a packet sent before the reduction belongs to the same episode.
    c.congestion(ms_(201), ms_(199), false);
    assert_eq!(c.window_bytes(), halved);
    // Acks of packets sent before the reduction don't regrow it.
    ack_pair(&mut c, ms_(202), ms_(199));
    assert_eq!(c.window_bytes(), halved);
    // Later ones do.
    ack_pair(&mut c, ms_(203), ms_(202));
    assert!(c.window_bytes() > halved);
    c.congestion(ms_(300), ms_(250), true);
    assert_eq!(c.window_bytes(), 4 * u64::from(MTU));
}

#[test]
fn yields_to_a_standing_queue_it_did_not_build() {
    // Someone else keeps the queue at 5 ms: the scavenger shrinks to its minimum.
    let t0 = Instant::now();
    let mut c = controller(ScavengerConfig::default());
    let at = |us: u64| t0 + Duration::from_micros(us);
    for i in 0..50 {
        ack_pair(&mut c, at(i * 1000 + 300), at(i * 1000));
    }
    assert!(c.window_bytes() > 50_000);
    for i in 50..5000 {
        ack_pair(&mut c, at(i * 1000 + 5300), at(i * 1000));
    }
    assert_eq!(c.window_bytes(), 4 * u64::from(MTU));
}

#[test]
fn regrows_from_the_minimum_window() {
    // At two packets quinn would send one at a time (it needs in_flight + packet < window), and
    // each would wait out the receiver's delayed-ACK timer: the minimum is four.
    let mut c = controller(ScavengerConfig::default());
    let mut sim = Sim::new();
    sim.run(&mut c, secs(0.5), secs(1.0), |_| gigabit_lan());
    let now = sim.now();
    c.congestion(now, now - Duration::from_micros(1), true);
    assert_eq!(c.window_bytes(), 4 * u64::from(MTU));
    let o = sim.run(&mut c, secs(1.5), secs(2.5), |_| gigabit_lan());
    assert!(o.utilization > 0.97, "{o:?}");
}

#[test]
fn a_lone_packets_delayed_ack_is_not_queueing() {
    // The push runs dry now and then (or a pacing burst ends on an odd packet): the last packet
    // alone waits for the receiver's delayed-ACK timer (25 ms). That is no queue.
    let t0 = Instant::now();
    let mut c = controller(ScavengerConfig::default());
    let at = |us: u64| t0 + Duration::from_micros(us);
    let mut t = 0;
    for _ in 0..200 {
        for _ in 0..10 {
            ack_pair(&mut c, at(t + 300), at(t));
            t += 100;
        }
        c.ack(at(t + 25_300), at(t), 1200, false);
        c.end_acks(at(t + 25_300));
        assert_eq!(c.queueing_delay(at(t + 25_300)), None);
        t += 26_000;
    }
    assert!(c.window_bytes() > 100_000, "{}", c.window_bytes());
    // Two packets acknowledged 25 ms late are a queue.
    ack_pair(&mut c, at(t + 25_300), at(t));
    assert!(c.queueing_delay(at(t + 25_300)).unwrap() > Duration::from_millis(20));
}

fn secs(s: f64) -> Duration {
    Duration::from_secs_f64(s)
}

#[derive(Debug, Clone)]
enum Step {
    Ack {
        packets: u8,
        rtt_us: u64,
        gap_us: u64,
        app_limited: bool,
    },
    Loss {
        persistent: bool,
    },
    Mtu(u16),
}

fn step() -> impl Strategy<Value = Step> {
    prop_oneof![
        8 => (1u8..4, 1u64..200_000, 0u64..5_000, any::<bool>()).prop_map(
            |(packets, rtt_us, gap_us, app_limited)| Step::Ack { packets, rtt_us, gap_us, app_limited }
        ),
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
                Step::Ack { packets, rtt_us, gap_us, app_limited } => {
                    now += Duration::from_micros(gap_us);
                    let sent = now.saturating_sub(Duration::from_micros(rtt_us));
                    for _ in 0..packets {
                        c.ack(t0 + now, t0 + sent, u64::from(mtu), app_limited);
                    }
                    c.end_acks(t0 + now);
                }
                Step::Loss { persistent } => {
                    let before = c.window_bytes();
                    now += Duration::from_micros(100);
                    c.congestion(t0 + now, t0 + now - Duration::from_micros(50), persistent);
                    prop_assert!(c.window_bytes() <= before.max(4 * u64::from(mtu)));
                }
                Step::Mtu(m) => {
                    mtu = m;
                    c.mtu_changed(m);
                }
            }
            prop_assert!(c.window_bytes() >= 4 * u64::from(mtu));
            prop_assert!(c.window.is_finite());
        }
    }

    #[test]
    fn converges_to_the_target_on_any_link(
        mbit in 20.0f64..2000.0,
        base_us in 100u64..30_000,
        target_us in 100u64..5_000,
    ) {
        let link = Bottleneck {
            rate: mbit * 1e6 / 8.0,
            base_rtt: Duration::from_micros(base_us),
            buffer: Duration::from_millis(50),
            jitter: Duration::ZERO,
        };
        let config = ScavengerConfig {
            target: Duration::from_micros(target_us),
            ..ScavengerConfig::default()
        };
        let target = effective_target(&config, &link);
        let mut c = controller(config);
        let o = Sim::new().run(&mut c, secs(3.0), secs(4.0), |_| link.clone());
        prop_assert!(o.utilization > 0.95, "{:?}", o);
        // The queue moves in whole packets: allow a few beyond the target.
        let packet = Duration::from_secs_f64(f64::from(MTU) / link.rate);
        prop_assert!(o.queue_p50 < target.mul_f64(1.5) + packet * 2, "{:?} {:?}", o, target);
        prop_assert!(o.queue_p99 < target * 2 + packet * 3, "{:?} {:?}", o, target);
        prop_assert!(o.min_window >= 4 * u64::from(MTU));
    }
}
