//! A scavenger congestion controller for the background page push, in the spirit of LEDBAT
//! (RFC 6817): it keeps the queueing delay it adds at the bottleneck near a small target, so the
//! page-fault replies crossing the same link on the fault connection wait behind little pushed
//! data, while the push still fills the link whenever nobody else needs it.
//!
//! Loss-based controllers (Cubic, NewReno) and quinn's BBR fill the bottleneck's queue, up to what
//! flow control lets into flight: behind a 100 Mbit/s tbf with a 20 ms queue, fault replies wait
//! 11 ms at the median under Cubic; behind 1 Gbit/s the 2 MiB stream window caps the queue near
//! 2 ms (measured: at most 240 KB backlog in tbf).
//!
//! - Queueing delay = the current delay (the smallest round trip of the last few hundred µs) minus
//!   the base delay (the smallest round trip of the last minute: a windowed minimum, so a route
//!   that gets longer is adopted once the old minimum ages out).
//! - The target is `target`, or `target_packets` packets' transmission time at the bottleneck if
//!   longer (a slow link needs a few packets queued to stay busy).
//! - Per round trip the window moves by `gain` x (target - queue) / (base + queue) of itself:
//!   FAST TCP's law, which converges as fast on a long fat path as on a LAN, where RFC 6817's
//!   one packet per round trip takes minutes to fill a path of thousands of packets. Growth is at
//!   most slow start's, shrinking at most `max_decrease` of the window per round trip.
//! - It starts in slow start, left when the queue reaches half the target.
//! - A loss cuts the window to `loss_reduction` of itself once per recovery period (NewReno).
//! - The window never drops below `min_window_packets` packets.
//! - Every `slowdown_interval` it drops to the minimum window until a packet sent into the
//!   drained queue is acknowledged, then returns to its old window (LEDBAT++'s periodic
//!   slowdown): a push that always keeps its own standing queue would otherwise never see the
//!   true base delay again once the old minimum ages out, and ratchet its queue up by a target
//!   per base window.
//!
//! The logic is sans-IO ([`Scavenger::ack`], [`Scavenger::end_acks`], [`Scavenger::congestion`]
//! take the times quinn gives); the quinn [`Controller`] impl only forwards to it.

mod delay;

use std::any::Any;
use std::sync::Arc;
use std::time::{Duration, Instant};

use quinn::congestion::{Controller, ControllerFactory, ControllerMetrics};
use quinn_proto::RttEstimator;

use delay::{BaseDelay, CurrentDelay};

/// The window grows in slow start until the queueing delay reaches this fraction of the target.
const SLOW_START_EXIT: f64 = 0.5;
/// Base-delay buckets kept at most.
const MAX_BUCKETS: usize = 64;

/// Tuning of [`Scavenger`]; `Default` is pageserv's measured choice.
#[derive(Debug, Clone)]
pub struct ScavengerConfig {
    /// Queueing delay the push may add at the bottleneck: what a fault reply waits behind it...
    /// Measured on a 1 Gbit/s tbf beside page faults (2-core host): 200 µs took about 0.8 ms off
    /// the fault p50 against Cubic but about 10% of the goodput; 1 ms kept Cubic's goodput.
    pub target: Duration,
    /// ...or this many packets' transmission time at the bottleneck, if longer.
    pub target_packets: f64,
    /// How much of the distance to the equilibrium window (queue = target) is covered per round
    /// trip.
    pub gain: f64,
    /// At most this fraction of the window is given up per round trip for delay.
    pub max_decrease: f64,
    /// Fraction of the window kept after a loss.
    pub loss_reduction: f64,
    /// Window of a fresh connection, in bytes.
    pub initial_window: u64,
    /// The window never drops below this many packets. At least 3: quinn sends only while
    /// `in_flight + packet < window`, so a two-packet window carries one packet at a time, and
    /// the receiver acknowledges a lone packet only when its delayed-ACK timer fires (25 ms).
    pub min_window_packets: u64,
    /// The base delay is the smallest round trip in the last `base_buckets` of this length.
    pub base_bucket: Duration,
    pub base_buckets: usize,
    /// The current delay is the smallest round trip over the last half base delay, and at least
    /// over this long...
    pub current_filter: Duration,
    /// ...and at least over this many packets' transmission time: a slow link acknowledges
    /// rarely, and a minimum over one or two samples is as noisy as they are. A longer filter
    /// ignores more jitter on the acknowledgement path; a shorter one backs off sooner when the
    /// receiver falls behind, which measurably helped fault latency on a 2-core host.
    pub current_packets: f64,
    /// How often to drain the queue to re-measure the base delay; `None`: never. Keep it below
    /// half of `base_buckets` x `base_bucket`.
    pub slowdown_interval: Option<Duration>,
}

impl Default for ScavengerConfig {
    fn default() -> Self {
        ScavengerConfig {
            target: Duration::from_micros(200),
            target_packets: 3.0,
            gain: 0.5,
            max_decrease: 0.5,
            loss_reduction: 0.5,
            initial_window: 12_000,
            min_window_packets: 4,
            base_bucket: Duration::from_secs(10),
            base_buckets: 6,
            current_filter: Duration::from_micros(250),
            current_packets: 16.0,
            slowdown_interval: Some(Duration::from_secs(20)),
        }
    }
}

impl ControllerFactory for ScavengerConfig {
    fn build(self: Arc<Self>, now: Instant, current_mtu: u16) -> Box<dyn Controller> {
        Box::new(Scavenger::new(self, now, current_mtu))
    }
}

/// Where the periodic slowdown stands.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Slowdown {
    /// The next one is due then (none before the first slow start ended).
    Due(Option<Instant>),
    /// At the minimum window since `since`, until a packet sent after it is acknowledged; then
    /// back to `saved`.
    Draining { since: Instant, saved: f64 },
}

/// What one ACK frame acknowledged: quinn reports each packet, then the end of the frame.
#[derive(Debug, Clone, Copy, Default)]
struct Batch {
    packets: u64,
    /// The round trip of the newest packet acknowledged: the freshest view of the queue.
    freshest: Option<Duration>,
    newest_sent: Option<Instant>,
    /// Acknowledged bytes sent after the last loss, and whether the sender was app-limited.
    counted: u64,
    app_limited: bool,
}

/// The controller state of one connection (see the module doc).
#[derive(Debug, Clone)]
pub struct Scavenger {
    config: Arc<ScavengerConfig>,
    mtu: u64,
    /// Bytes that may be in flight; a float so sub-packet growth per ack accumulates.
    window: f64,
    /// Slow start below this.
    ssthresh: f64,
    /// Acks of packets sent before this (the last loss) change nothing: one reduction per loss
    /// episode.
    recovery_start: Instant,
    base: BaseDelay,
    current: CurrentDelay,
    /// The latest round-trip sample taken.
    latest_rtt: Option<Duration>,
    slowdown: Slowdown,
    batch: Batch,
}

impl Scavenger {
    /// A controller for a connection created at `now` whose path MTU is `mtu`.
    pub fn new(config: Arc<ScavengerConfig>, now: Instant, mtu: u16) -> Self {
        let base = BaseDelay::new(
            config.base_bucket.max(Duration::from_millis(1)),
            config.base_buckets.clamp(1, MAX_BUCKETS),
        );
        let mut s = Scavenger {
            window: config.initial_window as f64,
            config,
            mtu: mtu.into(),
            ssthresh: f64::INFINITY,
            recovery_start: now,
            base,
            current: CurrentDelay::default(),
            latest_rtt: None,
            slowdown: Slowdown::Due(None),
            batch: Batch::default(),
        };
        s.window = s.window.max(s.min_window());
        s
    }

    fn min_window(&self) -> f64 {
        (self.config.min_window_packets.max(1) * self.mtu) as f64
    }

    /// How long one packet occupies the bottleneck, in seconds: a window-limited sender
    /// delivers a window per round trip.
    fn packet_time(&self) -> f64 {
        let rtt = self.latest_rtt.unwrap_or_default().as_secs_f64();
        self.mtu as f64 * rtt / self.window.max(1.0)
    }

    /// How far back the current delay looks.
    fn current_span(&self) -> Duration {
        let packets = Duration::from_secs_f64(self.config.current_packets * self.packet_time());
        (self.base.get().unwrap_or_default() / 2)
            .max(self.config.current_filter)
            .max(packets)
    }

    /// The queueing delay measured at `now`: the latest round trips over the base delay; none
    /// without a recent enough sample.
    pub fn queueing_delay(&self, now: Instant) -> Option<Duration> {
        let current = self.current.get(now, self.current_span())?;
        Some(current.saturating_sub(self.base.get()?))
    }

    /// The queueing delay aimed at, in seconds.
    fn target(&self) -> f64 {
        let packets = self.config.target_packets * self.packet_time();
        self.config.target.as_secs_f64().max(packets).max(1e-6)
    }

    /// Bytes that may be in flight.
    pub fn window_bytes(&self) -> u64 {
        self.window.max(self.min_window()) as u64
    }

    /// A packet of `bytes` sent at `sent` was acknowledged at `now`. `app_limited`: the sender
    /// had nothing more to send, so the window was not what limited it (no growth). Takes effect
    /// at [`Scavenger::end_acks`], once per ACK frame.
    pub fn ack(&mut self, now: Instant, sent: Instant, bytes: u64, app_limited: bool) {
        let b = &mut self.batch;
        b.packets += 1;
        let sample = now.saturating_duration_since(sent);
        b.freshest = Some(b.freshest.map_or(sample, |f| f.min(sample)));
        b.newest_sent = Some(b.newest_sent.map_or(sent, |n| n.max(sent)));
        if sent > self.recovery_start {
            b.counted += bytes;
            b.app_limited |= app_limited;
        }
    }

    /// The ACK frame whose packets [`Scavenger::ack`] reported is done.
    pub fn end_acks(&mut self, now: Instant) {
        let batch = std::mem::take(&mut self.batch);
        let (Some(sample), Some(newest_sent)) = (batch.freshest, batch.newest_sent) else {
            return;
        };
        // A receiver acknowledges every second packet at once, but holds a lone one until its
        // delayed-ACK timer fires (25 ms in quinn): an ACK of one packet measures that timer, not
        // a queue. Seen at every pause of the push and at the tail of pacing bursts; counted as
        // queueing it ended slow start at once and pinned the window at its minimum.
        if batch.packets >= 2 {
            self.latest_rtt = Some(sample);
            self.base.update(now, sample);
            self.current.push(now, sample, self.current_span());
        }
        if let Slowdown::Draining { since, saved } = self.slowdown {
            if newest_sent > since {
                // Sent with (almost) nothing of ours queued: the base delay is fresh again. Back
                // to the old window at once (quinn's pacer spreads it) rather than LEDBAT++'s
                // slow start, which would leave the link half idle for log2(window) round trips.
                self.window = saved.max(self.min_window());
                self.slowdown = Slowdown::Due(self.config.slowdown_interval.map(|i| now + i));
            }
            return;
        }
        // Nothing to learn without bytes sent after the last loss or a recent delay sample (the
        // push ran dry): hold the window.
        let Some(queue) = self.queueing_delay(now).filter(|_| batch.counted > 0) else {
            return;
        };
        let (queue, target) = (queue.as_secs_f64(), self.target());
        let bytes = batch.counted as f64;
        if self.window < self.ssthresh {
            if queue >= SLOW_START_EXIT * target {
                self.ssthresh = self.window;
            } else if !batch.app_limited {
                self.window = (self.window + bytes).min(self.ssthresh);
            }
        } else {
            let base = self.base.get().unwrap_or_default().as_secs_f64();
            let error = (target - queue) / (base + queue).max(1e-6);
            let change = (self.config.gain * error).clamp(-self.config.max_decrease, 1.0);
            if change < 0.0 || !batch.app_limited {
                self.window += change * bytes;
            }
        }
        self.window = self.window.max(self.min_window());
        if self.window >= self.ssthresh {
            self.maybe_slow_down(now);
        }
    }

    /// Out of slow start: schedules the first slowdown, or starts a due one.
    fn maybe_slow_down(&mut self, now: Instant) {
        match self.slowdown {
            Slowdown::Due(None) => {
                self.slowdown = Slowdown::Due(self.config.slowdown_interval.map(|i| now + i));
            }
            Slowdown::Due(Some(due)) if now >= due => {
                self.slowdown = Slowdown::Draining {
                    since: now,
                    saved: self.window,
                };
                self.window = self.min_window();
            }
            _ => {}
        }
    }

    /// Packets sent at `sent` were lost (or ECN-marked), detected at `now`. `persistent`: every
    /// packet over the persistent-congestion period was lost.
    pub fn congestion(&mut self, now: Instant, sent: Instant, persistent: bool) {
        if sent <= self.recovery_start {
            return;
        }
        self.recovery_start = now;
        let keep = self.config.loss_reduction.clamp(0.0, 1.0);
        if let Slowdown::Draining { since, saved } = self.slowdown {
            self.slowdown = Slowdown::Draining {
                since,
                saved: saved * keep,
            };
        }
        self.window = (self.window * keep).max(self.min_window());
        self.ssthresh = self.window;
        if persistent {
            self.window = self.min_window();
        }
    }

    /// The path MTU changed.
    pub fn mtu_changed(&mut self, mtu: u16) {
        self.mtu = mtu.into();
        self.window = self.window.max(self.min_window());
    }
}

impl Controller for Scavenger {
    fn on_ack(
        &mut self,
        now: Instant,
        sent: Instant,
        bytes: u64,
        app_limited: bool,
        _rtt: &RttEstimator,
    ) {
        self.ack(now, sent, bytes, app_limited);
    }

    fn on_end_acks(
        &mut self,
        now: Instant,
        _in_flight: u64,
        _app_limited: bool,
        _largest_packet_num_acked: Option<u64>,
    ) {
        self.end_acks(now);
    }

    fn on_congestion_event(
        &mut self,
        now: Instant,
        sent: Instant,
        is_persistent_congestion: bool,
        _lost_bytes: u64,
    ) {
        self.congestion(now, sent, is_persistent_congestion);
    }

    fn on_mtu_update(&mut self, new_mtu: u16) {
        self.mtu_changed(new_mtu);
    }

    fn window(&self) -> u64 {
        self.window_bytes()
    }

    fn metrics(&self) -> ControllerMetrics {
        let mut m = ControllerMetrics::default();
        m.congestion_window = self.window_bytes();
        m.ssthresh = self.ssthresh.is_finite().then_some(self.ssthresh as u64);
        m
    }

    fn clone_box(&self) -> Box<dyn Controller> {
        Box::new(self.clone())
    }

    fn initial_window(&self) -> u64 {
        self.config.initial_window
    }

    fn into_any(self: Box<Self>) -> Box<dyn Any> {
        self
    }
}

#[cfg(test)]
mod sim;
#[cfg(test)]
mod tests;
