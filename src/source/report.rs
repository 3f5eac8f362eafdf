//! The source's final report (printed and `--stats-json`). It lives with the source because it
//! carries the pump's and the pre-copy's own reports; [`crate::stats`] holds what both sides
//! share.

use serde::Serialize;

use crate::source::pre_copy::PreCopyReport;
use crate::source::pump::PumpStats;
use crate::stats::LatencySummary;

/// The source's final report.
#[derive(Debug, Clone, Default, Serialize)]
pub struct SourceReport {
    /// The freeze (the root seen in its ptrace stop; else the dump's start, an upper bound) to
    /// restore finished at dst.
    pub downtime_ms: f64,
    /// How the dump's time before the restore split, when the freeze was seen
    /// ([`crate::source::freeze_watch`]).
    pub dump_phases: Option<DumpPhases>,
    pub total_ms: f64,
    pub lazy_pages: u64,
    pub images_bytes: u64,
    pub push_frames: u64,
    pub push_bytes: u64,
    pub zero_pages: u64,
    pub dst_pages_on_demand: u64,
    pub dst_pages_pushed: u64,
    /// Pre-copied pages dst placed from its page store once confirmed.
    pub dst_pages_local: u64,
    /// Bytes both QUIC connections sent from the freeze on (UDP payload: images, pages,
    /// validity frames, QUIC overhead).
    pub wire_bytes_after_freeze: u64,
    /// Largest UDP payload the push connection's MTU discovery settled on: 1,472 on a
    /// 1,500-byte path, up to [`crate::transport::MAX_DATAGRAM`] on a jumbo one.
    pub path_mtu: u16,
    /// Times the push connection fell back to 1,200-byte datagrams (quinn's suspected black
    /// holes; see [`crate::transport::BLACK_HOLE_COOLDOWN`]).
    pub path_black_holes: u64,
    /// The source's peak resident memory (VmHWM).
    pub peak_rss_bytes: u64,
    /// Times the link to dst died mid post-copy and came back (see source::recovery).
    pub reconnects: u64,
    /// Fault request received to its answer handed to QUIC, before the push started and while
    /// it ran: the source's share of dst's fault latency (CRIU's answer included).
    pub fault_service_before_push: LatencySummary,
    pub fault_service_during_push: LatencySummary,
    pub pump: PumpStats,
    pub pre_copy: Option<PreCopyReport>,
    /// Dumps made fail and repeated because CRIU wrote a lazy dump eagerly
    /// (`source::eager_dump`), and whether the dump used still was eager.
    pub redumps: u32,
    pub eager_dump: bool,
    /// The service's CPU time and peak RSS (its own and its reaped children's, CRIU's dump
    /// among them, apart).
    pub usage: crate::usage::ServiceUsage,
}

/// A lazy dump's time up to its page server being ready.
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct DumpPhases {
    /// `criu dump` started to the root seen frozen: CRIU's start-up, the tasks still running.
    pub before_freeze_ms: f64,
    /// Frozen to the dump ready (status-fd): CRIU's freeze (parasite, memory into its pipes,
    /// images), inside the downtime.
    pub criu_freeze_ms: f64,
}

impl SourceReport {
    pub fn render(&self) -> String {
        let mut s = self.render_post_copy();
        if self.redumps > 0 || self.eager_dump {
            s += &format!(
                "  dumps repeated because CRIU wrote the lazy memory eagerly: {}{}\n",
                self.redumps,
                if self.eager_dump {
                    " (the dump used was still eager)"
                } else {
                    ""
                }
            );
        }
        if let Some(p) = &self.pre_copy {
            s += &p.render();
            s += &format!(
                "  dst placed {} pages from its page store; wire bytes after the freeze {} (images {}); \
                 src peak RSS {:.1} MiB\n",
                self.dst_pages_local,
                self.wire_bytes_after_freeze,
                self.images_bytes,
                self.peak_rss_bytes as f64 / (1 << 20) as f64
            );
        }
        s
    }

    fn render_post_copy(&self) -> String {
        let (from, phases) = match &self.dump_phases {
            Some(p) => (
                "freeze",
                format!(
                    "  criu dump: {:.1} ms before the freeze, {:.1} ms frozen until ready\n",
                    p.before_freeze_ms, p.criu_freeze_ms
                ),
            ),
            None => ("dump start", String::new()),
        };
        let downtime = format!("downtime ({from} → restore finished)");
        format!(
            "pageserv src report\n\
             \x20 {downtime:<42}{:>10.1} ms\n\
             {phases}\
             \x20 total                                     {:>10.1} ms\n\
             \x20 lazy pages {}, images {} bytes\n\
             \x20 fault pages served {}, pages pushed {}, zero pages {}, refused {}\n\
             \x20 GETs to the dump {}, bytes from the dump {}, push bytes {}, QUIC datagrams up to {} bytes{}\n\
             {}{}{}",
            self.downtime_ms,
            self.total_ms,
            self.lazy_pages,
            self.images_bytes,
            self.pump.fault_pages,
            self.pump.pushed_pages,
            self.zero_pages,
            self.pump.refused,
            self.pump.gets,
            self.pump.bytes_from_dump,
            self.push_bytes,
            self.path_mtu,
            crate::transport::black_hole_note(self.path_black_holes),
            self.serving(),
            self.fault_service(),
            self.usage.render(),
        )
    }

    /// Where the lazy pages were read from, and the served-vs-CRIU comparison if it ran.
    fn serving(&self) -> String {
        let p = &self.pump;
        let mut s = format!(
            "  served from {}: {} pages from frozen memory, {} from CRIU, {} failovers to CRIU\n",
            p.serving, p.memory_pages, p.criu_pages, p.failovers
        );
        if p.verified {
            s += &format!(
                "  served vs CRIU's copies, page by page: {} equal, {} differ, {} never served, \
                 {} served twice differently\n",
                p.verify_equal, p.verify_differ, p.verify_unserved, p.verify_conflicts
            );
        }
        s
    }

    /// The source's share of the fault latency, before and during the push.
    fn fault_service(&self) -> String {
        let mut s = String::new();
        for (when, l) in [
            ("before the push", &self.fault_service_before_push),
            ("during the push", &self.fault_service_during_push),
        ] {
            if l.count > 0 {
                s += &format!(
                    "  fault request to answer sent, {when} ({}): p50 {:.0} us, p99 {:.0} us, max {:.0} us\n",
                    l.count, l.p50_us, l.p99_us, l.max_us
                );
            }
        }
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_report_says_how_large_the_datagrams_grew() {
        let r = SourceReport {
            path_mtu: 6_500,
            push_bytes: 42,
            ..SourceReport::default()
        };
        let text = r.render();
        assert!(
            text.contains("push bytes 42, QUIC datagrams up to 6500 bytes\n"),
            "{text}"
        );
        let fell_back = SourceReport {
            path_mtu: 1_472,
            path_black_holes: 2,
            ..SourceReport::default()
        };
        let text = fell_back.render();
        assert!(
            text.contains(
                "QUIC datagrams up to 1472 bytes (fell back to 1200 bytes 2 times: suspected black holes)"
            ),
            "{text}"
        );
    }
}
