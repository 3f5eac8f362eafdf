//! One direction of the link: read packets from one TUN device, ask the [`LinkModel`] what
//! happens to them, hold them in a [`PacketRing`] and write them to the other TUN device at
//! their release time.
//!
//! A single thread does both ends so no packet crosses threads. It reads in batches, sends
//! whatever is due, and waits in `ppoll` (readable input or the next release, whichever comes
//! first), spinning only for the last few microseconds before a release since a timer wake-up
//! can be late by that much.

use std::fs::File;
use std::io::{ErrorKind, Read, Write};
use std::os::fd::AsFd;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use nix::poll::{PollFd, PollFlags, ppoll};
use nix::sys::time::TimeSpec;

use crate::model::{LinkModel, Verdict};
use crate::ring::PacketRing;
use crate::rng::Xoshiro256;

/// Packets read before sending what is due, bounding how late a release can be under load.
const READ_BATCH: usize = 64;
/// Longest sleep, so a stop request is noticed promptly.
const MAX_WAIT: Duration = Duration::from_millis(50);
/// Busy-waiting is limited to this much per [`SPIN_WINDOW_NS`]: precise at low packet rates,
/// where it is cheap, and sleeping when the link is busy and would otherwise spin all the time
/// (at 1 Gbit/s, releases are 12 us apart).
const SPIN_BUDGET_NS: u64 = 10_000_000;
const SPIN_WINDOW_NS: u64 = 100_000_000;

/// Counters of one direction, readable while it runs.
#[derive(Debug, Default)]
pub struct DirStats {
    pub rx_packets: AtomicU64,
    pub rx_bytes: AtomicU64,
    pub tx_packets: AtomicU64,
    pub tx_bytes: AtomicU64,
    pub dropped_loss: AtomicU64,
    /// Drop-tail of the emulated queue.
    pub dropped_queue: AtomicU64,
    /// Packets that found linkem's own buffer full because it fell behind its release times.
    pub dropped_behind: AtomicU64,
    /// Sum and maximum of how late packets were written after their release time, in ns.
    pub late_ns_sum: AtomicU64,
    pub late_ns_max: AtomicU64,
    pub write_errors: AtomicU64,
}

/// Everything one forwarding thread owns.
pub struct Direction {
    pub name: String,
    pub input: File,
    pub output: File,
    pub model: LinkModel,
    pub rng: Xoshiro256,
    pub ring: PacketRing,
    /// Largest packet the input can deliver (its MTU).
    pub max_packet: usize,
    /// How long before a release to stop sleeping and busy-wait, in ns.
    pub spin_ns: u64,
    /// With more than one packet waiting, how late a release may be so that one wake-up sends
    /// several packets, in ns.
    pub coalesce_ns: u64,
    pub stats: Arc<DirStats>,
    pub stop: Arc<AtomicBool>,
    /// Zero of the model's clock, shared by both directions.
    pub epoch: Instant,
    /// SCHED_FIFO priority for this thread (1..=99), or `None` for the normal scheduler.
    pub rt_priority: Option<i32>,
}

/// How much busy-waiting the current window has used.
#[derive(Debug, Default)]
struct SpinBudget {
    window_start: u64,
    used: u64,
}

impl SpinBudget {
    fn allows(&mut self, now: u64) -> bool {
        if now - self.window_start >= SPIN_WINDOW_NS {
            self.window_start = now;
            self.used = 0;
        }
        self.used < SPIN_BUDGET_NS
    }
}

impl Direction {
    fn now(&self) -> u64 {
        self.epoch.elapsed().as_nanos() as u64
    }

    /// Forwards until `stop` is set or the input fails.
    pub fn run(mut self) -> Result<()> {
        if let Some(prio) = self.rt_priority {
            // A link that pauses whenever a build preempts it loses capacity for good: the
            // packets pile up in the TUN queue, then arrive as one burst the queue cannot
            // take. Real-time priority keeps the forwarding on time; spinning is budgeted,
            // so it cannot monopolise a core.
            if let Err(e) = set_fifo_priority(prio) {
                tracing::warn!(
                    "{}: cannot get real-time priority {prio} ({e}); forwarding may stall \
                     under CPU load",
                    self.name
                );
            }
        }
        // The default 50 us slack would make every timed wake-up late by that much.
        if let Err(e) = nix::sys::prctl::set_timerslack(1) {
            tracing::warn!(
                "{}: cannot reduce timer slack, releases may be late: {e}",
                self.name
            );
        }
        let mut scratch = vec![0u8; self.max_packet];
        let mut spin = SpinBudget::default();
        while !self.stop.load(Relaxed) {
            self.send_due(self.now());
            let got = self.read_batch(&mut scratch)?;
            if got > 0 {
                continue;
            }
            let now = self.now();
            let wait = match self.ring.next_release() {
                None => MAX_WAIT,
                Some(t) => {
                    // Several packets waiting means a busy link: wake once per `coalesce_ns`
                    // and send all that is due, like a NIC's interrupt moderation, instead of
                    // paying a wake-up (ours and the receiver's) per packet.
                    let coalesce = self.coalesce_ns > 0 && self.ring.len() > 1;
                    let target = if coalesce { t + self.coalesce_ns } else { t };
                    if target <= now {
                        continue;
                    }
                    let may_spin = !coalesce && spin.allows(now);
                    if may_spin && target - now <= self.spin_ns {
                        // Arrivals wait in the TUN queue meanwhile; at most spin_ns.
                        let mut after = now;
                        while after < target {
                            std::hint::spin_loop();
                            after = self.now();
                        }
                        spin.used += after - now;
                        continue;
                    }
                    let early = if may_spin { self.spin_ns } else { 0 };
                    Duration::from_nanos((target - now).saturating_sub(early)).min(MAX_WAIT)
                }
            };
            let mut fds = [PollFd::new(self.input.as_fd(), PollFlags::POLLIN)];
            match ppoll(&mut fds, Some(TimeSpec::from_duration(wait)), None) {
                Ok(_) | Err(nix::errno::Errno::EINTR) => {}
                Err(e) => {
                    return Err(e).with_context(|| format!("{}: waiting for packets", self.name));
                }
            }
        }
        Ok(())
    }

    fn send_due(&mut self, now: u64) {
        while let Some((pkt, release)) = self.ring.due(now) {
            match (&self.output).write(pkt) {
                Ok(n) => {
                    self.stats.tx_packets.fetch_add(1, Relaxed);
                    self.stats.tx_bytes.fetch_add(n as u64, Relaxed);
                    let late = now - release;
                    self.stats.late_ns_sum.fetch_add(late, Relaxed);
                    self.stats.late_ns_max.fetch_max(late, Relaxed);
                }
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                Err(e) => {
                    // The far side refused this packet (device down, malformed): it is lost,
                    // the link goes on.
                    if self.stats.write_errors.fetch_add(1, Relaxed) == 0 {
                        tracing::warn!("{}: writing a packet failed: {e}", self.name);
                    }
                }
            }
            self.ring.pop();
        }
    }

    /// Reads up to [`READ_BATCH`] packets; returns how many.
    fn read_batch(&mut self, scratch: &mut [u8]) -> Result<usize> {
        let max = self.max_packet;
        let mut got = 0;
        while got < READ_BATCH {
            let (len, in_ring) = {
                let (buf, in_ring) = match self.ring.reserve(max) {
                    Some(buf) => (buf, true),
                    None => (&mut scratch[..], false),
                };
                match (&self.input).read(buf) {
                    Ok(len) => (len, in_ring),
                    Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                    Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                    Err(e) => {
                        return Err(e).with_context(|| format!("{}: reading a packet", self.name));
                    }
                }
            };
            got += 1;
            let arrival = self.now();
            self.stats.rx_packets.fetch_add(1, Relaxed);
            self.stats.rx_bytes.fetch_add(len as u64, Relaxed);
            match self.model.offer(arrival, len, &mut self.rng) {
                Verdict::Release(at) if in_ring => self.ring.commit(max, len, at),
                Verdict::Release(_) => {
                    self.stats.dropped_behind.fetch_add(1, Relaxed);
                }
                Verdict::DropQueue => {
                    self.stats.dropped_queue.fetch_add(1, Relaxed);
                }
                Verdict::DropLoss => {
                    self.stats.dropped_loss.fetch_add(1, Relaxed);
                }
            }
        }
        Ok(got)
    }
}

/// Puts the calling thread under SCHED_FIFO with `prio`.
fn set_fifo_priority(prio: i32) -> std::io::Result<()> {
    let param = libc::sched_param {
        sched_priority: prio,
    };
    // SAFETY: pid 0 is the calling thread; param is read during the call only.
    if unsafe { libc::sched_setscheduler(0, libc::SCHED_FIFO, &param) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// Bytes of packet storage one direction needs: the queue, plus whatever is on the wire during
/// the delay (at the link rate, or an assumed 10 Gbit/s when unlimited), plus slack for
/// wrap-around; between 4 MiB and 1 GiB.
pub fn ring_capacity(
    rate_bps: Option<u64>,
    delay_ns: u64,
    jitter_ns: u64,
    queue: u64,
    mtu: usize,
) -> usize {
    let rate = rate_bps.unwrap_or(10_000_000_000) as u128;
    let in_flight = rate * (delay_ns + jitter_ns) as u128 / 8 / 1_000_000_000;
    let want = queue as u128 + in_flight * 5 / 4 + 8 * mtu as u128;
    want.clamp(4 << 20, 1 << 30) as usize
}

#[cfg(test)]
mod tests {
    use super::ring_capacity;

    #[test]
    fn ring_holds_queue_plus_bytes_in_flight() {
        // 1 Gbit/s for 20 ms is 2.5 MB in flight, plus the 2 MiB queue.
        let cap = ring_capacity(Some(1_000_000_000), 20_000_000, 0, 2 << 20, 1500);
        assert!(cap >= 2_500_000 + (2 << 20), "{cap}");
        assert!(cap < 8 << 20, "{cap}");
        assert_eq!(ring_capacity(Some(1_000_000), 0, 0, 1 << 20, 1500), 4 << 20);
        assert_eq!(
            ring_capacity(None, 10_000_000_000, 0, 1 << 20, 65535),
            1 << 30
        );
    }
}
