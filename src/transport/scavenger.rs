//! A scavenger congestion controller for the background page push, in the spirit of LEDBAT
//! (RFC 6817): it keeps the queueing delay it adds at the bottleneck near a small target, so the
//! page-fault replies that cross the same link on the fault connection wait behind at most about
//! that much pushed data, while the push still fills the link whenever nobody else needs it.
//!
//! Loss-based controllers (Cubic, NewReno) and quinn's BBR fill the bottleneck queue: behind a
//! 20 ms tbf queue at 1 Gbit/s, fault replies waited 5 ms at p99 and up to 70 ms. Here:
//! - queueing delay = the latest round trip minus the base delay, the smallest round trip in the
//!   last `base_buckets` x `base_bucket` (a windowed minimum, so a route that gets longer is
//!   adopted once the old minimum ages out);
//! - below the target the window grows additively, by `gain` packets per round trip scaled by how
//!   far below the target the delay is; above it the window shrinks by a fraction of itself per
//!   round trip proportional to the excess (capped at `max_decrease`);
//! - a loss halves the window once per recovery period (NewReno); the window never drops below
//!   `min_window_packets` packets;
//! - it starts in slow start, left when the delay reaches half the target;
//! - every `slowdown_interval` it drops to the minimum window until a packet sent into the drained
//!   queue is acknowledged, then returns to its old window (LEDBAT++'s periodic slowdown):
//!   a push that always keeps its own standing queue would otherwise never see the true base delay
//!   again once the old minimum ages out, and ratchet its queue up by a target per window.
//!
//! The logic is sans-IO ([`Scavenger::ack`], [`Scavenger::congestion`] take the times quinn gives);
//! the quinn [`Controller`] impl only forwards to it.

use std::any::Any;
use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{Duration, Instant};

use quinn::congestion::{Controller, ControllerFactory, ControllerMetrics};
use quinn_proto::RttEstimator;

/// The window grows in slow start until the queueing delay reaches this fraction of the target.
const SLOW_START_EXIT: f64 = 0.5;
/// Base-delay buckets kept at most.
const MAX_BUCKETS: usize = 64;

/// Tuning of [`Scavenger`]; `Default` is pageserv's measured choice.
#[derive(Debug, Clone)]
pub struct ScavengerConfig {
    /// Queueing delay the push may add at the bottleneck: what a fault reply waits behind it.
    pub target: Duration,
    /// How much of the distance to the equilibrium window (queue = target) is covered per round
    /// trip; growth is at most slow start's (doubling per round trip).
    pub gain: f64,
    /// At most this fraction of the window is given up per round trip for delay.
    pub max_decrease: f64,
    /// Fraction of the window kept after a loss.
    pub loss_reduction: f64,
    /// Window of a fresh connection, in bytes.
    pub initial_window: u64,
    /// The window never allows fewer packets in flight than this.
    pub min_window_packets: u64,
    /// The base delay is the smallest round trip in the last `base_buckets` of this length.
    pub base_bucket: Duration,
    pub base_buckets: usize,
    /// The current delay is the smallest round trip over the last half base delay, and at least
    /// over this long: neither a late acknowledgement (a delayed ACK, a descheduled receiver) nor
    /// the queue our own pacing bursts (2 ms of data each in quinn) build and drain is a standing
    /// queue.
    pub current_filter: Duration,
    /// How often to drain the queue to re-measure the base delay; `None`: never.
    pub slowdown_interval: Option<Duration>,
}

impl Default for ScavengerConfig {
    fn default() -> Self {
        ScavengerConfig {
            target: Duration::from_millis(1),
            gain: 0.5,
            max_decrease: 0.5,
            loss_reduction: 0.5,
            initial_window: 12_000,
            min_window_packets: 2,
            base_bucket: Duration::from_secs(10),
            base_buckets: 6,
            current_filter: Duration::from_micros(250),
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

/// The smallest round trip over a sliding window of buckets.
#[derive(Debug, Clone)]
struct BaseDelay {
    /// (bucket start, smallest sample in it), oldest first.
    buckets: VecDeque<(Instant, Duration)>,
    bucket: Duration,
    keep: usize,
}

impl BaseDelay {
    fn update(&mut self, now: Instant, sample: Duration) {
        let span = self.bucket.saturating_mul(self.keep as u32);
        while let Some(&(start, _)) = self.buckets.front() {
            if now.saturating_duration_since(start) < span {
                break;
            }
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

    fn get(&self) -> Option<Duration> {
        self.buckets.iter().map(|&(_, d)| d).min()
    }
}

/// The smallest round trip over the last `span`: a sliding-window minimum (a deque of samples
/// with increasing delays, so both ends are O(1) amortized per sample).
#[derive(Debug, Clone, Default)]
struct CurrentDelay {
    samples: VecDeque<(Instant, Duration)>,
}

impl CurrentDelay {
    fn push(&mut self, now: Instant, sample: Duration, span: Duration) {
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

    fn get(&self) -> Option<Duration> {
        self.samples.front().map(|&(_, d)| d)
    }
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
    slowdown: Slowdown,
}

impl Scavenger {
    /// A controller for a connection created at `now` whose path MTU is `mtu`.
    pub fn new(config: Arc<ScavengerConfig>, now: Instant, mtu: u16) -> Self {
        let base = BaseDelay {
            buckets: VecDeque::new(),
            bucket: config.base_bucket.max(Duration::from_millis(1)),
            keep: config.base_buckets.clamp(1, MAX_BUCKETS),
        };
        let mut s = Scavenger {
            window: config.initial_window as f64,
            config,
            mtu: mtu.into(),
            ssthresh: f64::INFINITY,
            recovery_start: now,
            base,
            current: CurrentDelay::default(),
            slowdown: Slowdown::Due(None),
        };
        s.window = s.window.max(s.min_window());
        s
    }

    fn min_window(&self) -> f64 {
        (self.config.min_window_packets.max(1) * self.mtu) as f64
    }

    /// The queueing delay currently measured: latest round trips over the base delay.
    pub fn queueing_delay(&self) -> Duration {
        match (self.current.get(), self.base.get()) {
            (Some(c), Some(b)) => c.saturating_sub(b),
            _ => Duration::ZERO,
        }
    }

    /// Bytes that may be in flight.
    pub fn window_bytes(&self) -> u64 {
        self.window.max(self.min_window()) as u64
    }

    /// A packet of `bytes` sent at `sent` was acknowledged at `now`. `app_limited`: the sender
    /// had nothing more to send, so the window was not what limited it (no growth).
    pub fn ack(&mut self, now: Instant, sent: Instant, bytes: u64, app_limited: bool) {
        let sample = now.saturating_duration_since(sent);
        self.base.update(now, sample);
        let span = (self.base.get().unwrap_or(sample) / 2).max(self.config.current_filter);
        self.current.push(now, sample, span);
        if let Slowdown::Draining { since, saved } = self.slowdown {
            if sent > since {
                // Sent with (almost) nothing of ours queued: the base delay is fresh again. Back to
                // the old window at once (quinn's pacer spreads it) rather than LEDBAT++'s slow
                // start, which would leave the link half idle for log2(window) round trips.
                self.window = saved.max(self.min_window());
                self.slowdown = Slowdown::Due(self.config.slowdown_interval.map(|i| now + i));
            }
            return;
        }
        if sent <= self.recovery_start {
            return;
        }
        let bytes = bytes as f64;
        let target = self.config.target.as_secs_f64().max(1e-6);
        let queue = self.queueing_delay().as_secs_f64();
        if self.window < self.ssthresh {
            if queue >= SLOW_START_EXIT * target {
                self.ssthresh = self.window;
                self.schedule_first_slowdown(now);
            } else if !app_limited {
                self.window = (self.window + bytes).min(self.ssthresh);
            }
        } else {
            // FAST TCP's update, per acknowledged byte: per round trip the window moves by
            // `gain` x (target - queue) / (base + queue) of itself, so at the equilibrium queue =
            // target the errors shrink geometrically on a LAN and a long fat path alike.
            let base = self.base.get().unwrap_or_default().as_secs_f64();
            let error = (target - queue) / (base + queue).max(1e-6);
            let change = (self.config.gain * error).clamp(-self.config.max_decrease, 1.0);
            if change < 0.0 || !app_limited {
                self.window += change * bytes;
            }
            self.schedule_first_slowdown(now);
        }
        self.window = self.window.max(self.min_window());
        if let Slowdown::Due(Some(due)) = self.slowdown
            && now >= due
            && self.window >= self.ssthresh
        {
            self.slowdown = Slowdown::Draining {
                since: now,
                saved: self.window,
            };
            self.window = self.min_window();
        }
    }

    fn schedule_first_slowdown(&mut self, now: Instant) {
        if self.slowdown == Slowdown::Due(None) {
            self.slowdown = Slowdown::Due(self.config.slowdown_interval.map(|i| now + i));
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
mod tests;
