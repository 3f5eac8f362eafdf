//! What a migration reports: the final report of each side (printed and `--stats-json`) and the
//! terminal progress bar. Latencies are recorded by [`crate::latency::LatencyHistogram`].

use serde::Serialize;

use crate::source::pre_copy::PreCopyReport;
use crate::source::pump::PumpStats;

#[derive(Debug, Clone, Copy, Default, Serialize, PartialEq)]
pub struct LatencySummary {
    pub count: u64,
    pub p50_us: f64,
    pub p99_us: f64,
    pub max_us: f64,
    /// Sum of all samples: for fault latency, the time tasks spent blocked on faults.
    pub total_ms: f64,
}

/// The source's final report.
#[derive(Debug, Clone, Default, Serialize)]
pub struct SourceReport {
    /// Dump start to restore finished at dst (an upper bound of the freeze).
    pub downtime_ms: f64,
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
}

/// The destination's final report.
#[derive(Debug, Clone, Default, Serialize)]
pub struct DstReport {
    /// Freeze at the source to restore finished here.
    pub downtime_ms: f64,
    /// Images received to restore finished.
    pub restore_ms: f64,
    /// Restore finished to memory whole.
    pub post_copy_ms: f64,
    pub total_ms: f64,
    pub tasks: u64,
    pub lazy_pages: u64,
    pub pages_on_demand: u64,
    pub pages_pushed: u64,
    /// Faults outside the lazy set, answered with a zero page.
    pub pages_zero: u64,
    /// Lazy pages that were all-zero: sent as a few bytes, placed with UFFDIO_ZEROPAGE.
    pub pages_zero_lazy: u64,
    pub faults: u64,
    pub fault_latency: LatencySummary,
    /// Faults answered before any background page arrived (an idle link).
    pub fault_latency_before_push: LatencySummary,
    /// Faults answered after the first background page arrived (the push sharing the link).
    pub fault_latency_during_push: LatencySummary,
    pub bytes_received: u64,
    /// Times the source came back after the link died mid post-copy.
    pub reconnects: u64,
    pub images_bytes: u64,
    /// Stop-and-copy: pages received in the page-server session.
    pub stop_and_copy_pages: u64,
    /// Pre-copied pages in the page store at the freeze (data and zero).
    pub precopy_pages_held: u64,
    /// Of those, pages the source confirmed after the freeze, placed from the store (no page
    /// data crossed the network for them after the freeze).
    pub pages_local: u64,
}

impl DstReport {
    /// Post-copy goodput in MiB/s (lazy bytes over the post-copy time).
    pub fn goodput_mib_s(&self) -> f64 {
        if self.post_copy_ms <= 0.0 {
            return 0.0;
        }
        (self.lazy_pages * crate::pages::PAGE_SIZE) as f64
            / (1 << 20) as f64
            / (self.post_copy_ms / 1e3)
    }

    /// Fault latency before and during the push, when the migration had faults in both (a
    /// delayed push: `pageserv src --push-after-ms`).
    fn push_split(&self) -> String {
        let (b, d) = (
            &self.fault_latency_before_push,
            &self.fault_latency_during_push,
        );
        if b.count == 0 || d.count == 0 {
            return String::new();
        }
        format!(
            "  before the push {}: p50 {:.0} us, p99 {:.0} us; during it {}: p50 {:.0} us, p99 {:.0} us\n",
            b.count, b.p50_us, b.p99_us, d.count, d.p50_us, d.p99_us
        )
    }

    pub fn render(&self) -> String {
        format!(
            "pageserv dst report\n\
             \x20 downtime (freeze → restore finished)  {:>10.1} ms\n\
             \x20 restore                               {:>10.1} ms\n\
             \x20 post-copy                             {:>10.1} ms   ({:.0} MiB/s)\n\
             \x20 total                                 {:>10.1} ms\n\
             \x20 tasks {}, lazy pages {} ({:.1} MiB)\n\
             \x20 pages on demand {}, pushed {}, zero (lazy) {}, zero (not lazy) {}\n\
             \x20 faults {}: latency p50 {:.0} us, p99 {:.0} us, max {:.0} us, blocked {:.1} ms\n\
             {}\
             \x20 bytes received {} (images {})\n\
             \x20 pre-copied pages held {}, placed from the page store {}\n",
            self.downtime_ms,
            self.restore_ms,
            self.post_copy_ms,
            self.goodput_mib_s(),
            self.total_ms,
            self.tasks,
            self.lazy_pages,
            (self.lazy_pages * crate::pages::PAGE_SIZE) as f64 / (1 << 20) as f64,
            self.pages_on_demand,
            self.pages_pushed,
            self.pages_zero_lazy,
            self.pages_zero,
            self.faults,
            self.fault_latency.p50_us,
            self.fault_latency.p99_us,
            self.fault_latency.max_us,
            self.fault_latency.total_ms,
            self.push_split(),
            self.bytes_received,
            self.images_bytes,
            self.precopy_pages_held,
            self.pages_local,
        )
    }
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
        format!(
            "pageserv src report\n\
             \x20 downtime (dump start → restore finished)  {:>10.1} ms\n\
             \x20 total                                     {:>10.1} ms\n\
             \x20 lazy pages {}, images {} bytes\n\
             \x20 fault pages served {}, pages pushed {}, zero pages {}, refused {}\n\
             \x20 GETs to the dump {}, bytes from the dump {}, push bytes {}\n\
             {}{}",
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
            self.serving(),
            self.fault_service(),
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

/// A byte-count progress bar on stderr, hidden when stderr is not a terminal.
pub fn progress_bar(total_bytes: u64, what: &'static str) -> indicatif::ProgressBar {
    use std::io::IsTerminal;
    if !std::io::stderr().is_terminal() {
        return indicatif::ProgressBar::hidden();
    }
    let bar = indicatif::ProgressBar::new(total_bytes);
    let style = indicatif::ProgressStyle::with_template(
        "{msg:>8} [{bar:40}] {bytes}/{total_bytes} {bytes_per_sec} eta {eta}",
    )
    .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar())
    .progress_chars("=> ");
    bar.set_style(style);
    bar.set_message(what);
    bar
}
