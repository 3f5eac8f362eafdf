//! What a migration reports: latency summaries, dst's final report (printed and `--stats-json`;
//! the source's is [`crate::source::report`]) and the terminal progress bar. Latencies are recorded by [`crate::latency::LatencyHistogram`].

use serde::Serialize;

#[derive(Debug, Clone, Copy, Default, Serialize, PartialEq)]
pub struct LatencySummary {
    pub count: u64,
    pub p50_us: f64,
    pub p99_us: f64,
    pub max_us: f64,
    /// Sum of all samples: for fault latency, the time tasks spent blocked on faults.
    pub total_ms: f64,
}

/// The destination's final report.
#[derive(Debug, Clone, Default, Serialize)]
pub struct DstReport {
    /// Freeze at the source to restore finished here.
    pub downtime_ms: f64,
    /// Images received to restore finished.
    pub restore_ms: f64,
    /// The restore was started with the migration and waited for the images
    /// (dst::early_restore), so `restore_ms` holds no CRIU start-up.
    pub restore_early: bool,
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
    /// Faults that sent their own request to the source: the round trip.
    pub fault_latency_asked: LatencySummary,
    /// Faults on a page already asked for by another fault (read-ahead on its way).
    pub fault_latency_already_asked: LatencySummary,
    pub bytes_received: u64,
    /// Times the source came back after the link died mid post-copy.
    pub reconnects: u64,
    pub images_bytes: u64,
    /// Stop-and-copy: pages received in the page-server session.
    pub stop_and_copy_pages: u64,
    /// Pre-copied pages in the page store at the freeze (data and zero).
    pub precopy_pages_held: u64,
    /// Of those, pages dropped unused: their task's memory came whole in the images (an eager
    /// dump, see source::eager_dump).
    pub precopy_pages_unused: u64,
    /// Of those, pages the source confirmed after the freeze, placed from the store (no page
    /// data crossed the network for them after the freeze).
    pub pages_local: u64,
    /// Pushed pages a fault found already at dst, not placed yet, and took as its answer
    /// instead of asking the source (dst::push_queue; confirmed pre-copied pages among them).
    pub pages_taken_at_fault: u64,
    /// The restored tree's root pid as this host sees it (from the restore's pidfile), so that
    /// it is known after the migration's directory is removed.
    pub restored_pid: Option<i32>,
    /// This dst adopted the migration's restored tasks from a dst that died (dst::adopt).
    pub adopted: bool,
    /// Adopted: lazy pages already in place in the restored tasks (their /proc/PID/pagemap), so
    /// placed by the dst that died; with the pages placed here they make up `lazy_pages`.
    pub pages_adopted: u64,
    /// Peak memory of the pre-copy page store (arena and index), 0 without a pre-copy: dst's
    /// memory bound is 64 MiB plus this.
    pub page_store_bytes: u64,
    /// Of the store, page data given back to the host as those pages were placed
    /// (`dst::store_release`): at the end, about the store's data less what never got placed.
    pub page_store_released_bytes: u64,
    /// The service's CPU time and peak RSS (its own and its reaped children's, apart).
    pub usage: crate::usage::ServiceUsage,
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

    /// One report line setting two parts of the fault latency side by side, when the
    /// migration had faults in both (else empty): before and during the push (a delayed push:
    /// the hidden `pageserv src --push-after`), and faults that asked the source against faults
    /// on a page already asked for (read-ahead on).
    fn split_line(a: (&str, &LatencySummary), b: (&str, &LatencySummary)) -> String {
        let ((na, a), (nb, b)) = (a, b);
        if a.count == 0 || b.count == 0 {
            return String::new();
        }
        format!(
            "  {na} {}: p50 {:.0} us, p99 {:.0} us; {nb} {}: p50 {:.0} us, p99 {:.0} us\n",
            a.count, a.p50_us, a.p99_us, b.count, b.p50_us, b.p99_us
        )
    }

    pub fn render(&self) -> String {
        format!(
            "pageserv dst report\n\
             \x20 downtime (freeze → restore finished)  {:>10.1} ms\n\
             \x20 restore                               {:>10.1} ms{}\n\
             \x20 post-copy                             {:>10.1} ms   ({:.0} MiB/s)\n\
             \x20 total                                 {:>10.1} ms\n\
             \x20 tasks {}, lazy pages {} ({:.1} MiB)\n\
             \x20 pages on demand {}, pushed {}, zero (lazy) {}, zero (not lazy) {}\n\
             \x20 faults {}: latency p50 {:.0} us, p99 {:.0} us, max {:.0} us, blocked {:.1} ms\n\
             {}\
             {}\
             \x20 bytes received {} (images {})\n\
             \x20 pre-copied pages held {}, placed from the page store {}, unused {} (store {:.1} MiB, \
             {:.1} MiB of it given back as placed)\n\
             \x20 pushed pages a fault took before they were placed {}\n\
             {}",
            self.downtime_ms,
            self.restore_ms,
            if self.restore_early {
                "   (criu restore started with the migration)"
            } else {
                ""
            },
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
            Self::split_line(
                ("before the push", &self.fault_latency_before_push),
                ("during it", &self.fault_latency_during_push),
            ),
            Self::split_line(
                ("asked the source", &self.fault_latency_asked),
                (
                    "waited on a request already out",
                    &self.fault_latency_already_asked
                ),
            ),
            self.bytes_received,
            self.images_bytes,
            self.precopy_pages_held,
            self.pages_local,
            self.precopy_pages_unused,
            self.page_store_bytes as f64 / (1 << 20) as f64,
            self.page_store_released_bytes as f64 / (1 << 20) as f64,
            self.pages_taken_at_fault,
            self.usage.render(),
        )
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
