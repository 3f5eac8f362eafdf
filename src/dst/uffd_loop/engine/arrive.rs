//! Pages from the source reaching every view that still needs them, and what that costs.

use std::collections::BTreeSet;
use std::os::fd::AsRawFd;
use std::sync::atomic::Ordering::Relaxed;
use std::time::{Duration, Instant};

use bytes::Bytes;
use tracing::debug;

use super::Engine;
use crate::dst::uffd_loop::Inbound;
use crate::dst::uffd_loop::place::{self, Placement, Source, Tally};
use crate::pages::PAGE_SIZE;

/// EAGAIN rounds (read events, copy again) before an arrival waits for the next loop round, so
/// one process in a long fork cannot stall the others' faults.
const INLINE_RETRIES: u32 = 16;
/// An arrival still refused after this long is given up (pages stay missing) with an error.
const GIVE_UP: Duration = Duration::from_secs(60);
/// Background data held until the restore finishes. pageserv src pushes only after it, so this
/// bounds what a misbehaving source can make dst hold.
const MAX_EARLY_BYTES: u64 = 64 << 20;
/// Pages of one background piece (see the engine's BULK_BUDGET).
const PIECE_PAGES: u64 = 64;

/// Pages on their way into the views of one image pid.
pub(super) struct Arrival {
    pid: u32,
    img: u64,
    nr: u64,
    data: Option<Bytes>,
    urgent: bool,
    /// Views done with it; fork children created meanwhile are not, and get it too.
    finished: BTreeSet<u64>,
    since: Instant,
}

impl Arrival {
    fn new(pid: u32, img: u64, nr: u64, data: Option<Bytes>, urgent: bool) -> Self {
        Arrival {
            pid,
            img,
            nr,
            data,
            urgent,
            finished: BTreeSet::new(),
            since: Instant::now(),
        }
    }

    /// Data bytes it carries (0 for a zero run).
    pub(super) fn bytes(&self) -> u64 {
        self.data.as_ref().map_or(0, |d| d.len() as u64)
    }
}

impl Engine {
    /// Pages (or a zero run, `data` None) from the source.
    pub(super) fn arrive(
        &mut self,
        pid: u32,
        img: u64,
        nr_pages: u32,
        data: Option<Bytes>,
        urgent: bool,
    ) {
        let nr = u64::from(nr_pages);
        if !img.is_multiple_of(PAGE_SIZE)
            || data
                .as_ref()
                .is_some_and(|d| d.len() as u64 != nr * PAGE_SIZE)
        {
            let len = data.as_ref().map(|d| d.len());
            self.error(format!(
                "bad page message for pid {pid} at {img:#x}: {nr} pages but {len:?} bytes, or \
                 unaligned; dropped"
            ));
            return;
        }
        if !urgent && !self.restore_finished {
            self.early_bytes += data.as_ref().map_or(0, |d| d.len() as u64);
            if self.early_bytes > MAX_EARLY_BYTES {
                self.error(format!(
                    "the source pushed more than {} MiB before the restore finished; pages dropped",
                    MAX_EARLY_BYTES >> 20
                ));
                return;
            }
            let msg = as_message(pid, img, nr_pages, data, urgent);
            self.early.push(msg);
            return;
        }
        let has_view = self.views.values().any(|v| v.mem.pid() == pid);
        if !has_view && !self.known_pids.contains(&pid) && !self.restore_finished {
            let msg = as_message(pid, img, nr_pages, data, urgent);
            self.stash.entry(pid).or_default().push(msg);
            return;
        }
        // The one admission rule for source data (dst/arrival_guard.rs): nothing it refuses
        // reaches a process.
        if let Err(refusal) = self.guard.admit(pid, img, nr, urgent) {
            self.error(refusal.to_string());
            return;
        }
        if !has_view {
            debug!(pid, img, nr, "pages for a task that is gone: dropped");
            return;
        }
        if !urgent && nr > PIECE_PAGES {
            // Placed a piece per loop round, so faults are not kept waiting (see BULK_BUDGET).
            // Each piece is an arrival of its own: a fork between two pieces gets the later ones.
            let mut at = 0;
            while at < nr {
                let n = PIECE_PAGES.min(nr - at);
                let piece_data = data
                    .as_ref()
                    .map(|d| d.slice((at * PAGE_SIZE) as usize..((at + n) * PAGE_SIZE) as usize));
                self.pieces.push_back(Arrival::new(
                    pid,
                    img + at * PAGE_SIZE,
                    n,
                    piece_data,
                    false,
                ));
                at += n;
            }
            return;
        }
        self.place_piece(Arrival::new(pid, img, nr, data, urgent));
    }

    /// Places an admitted arrival (or one piece of it), keeping what the kernel refused.
    pub(super) fn place_piece(&mut self, a: Arrival) {
        if let Some(left) = self.place_arrival(a) {
            self.retrying.push(left);
        }
    }

    /// Arrivals the kernel refused last round.
    pub(super) fn retry_arrivals(&mut self) {
        for a in std::mem::take(&mut self.retrying) {
            if let Some(left) = self.place_arrival(a) {
                self.retrying.push(left);
            }
        }
    }

    /// Places `a` into every view of its pid; returns it if some view must be retried later.
    fn place_arrival(&mut self, mut a: Arrival) -> Option<Arrival> {
        let mut again = 0;
        // Re-scan after every step: reading events may add fork children that need these pages.
        while let Some(id) = self
            .views
            .iter()
            .find(|(id, v)| v.mem.pid() == a.pid && !a.finished.contains(*id))
            .map(|(id, _)| *id)
        {
            let Some(view) = self.views.get_mut(&id) else {
                break;
            };
            let src = match &a.data {
                Some(d) => Source::Data(d),
                None => Source::Zero,
            };
            let mut tally = Tally::default();
            let res = place::place(
                view.uffd.as_raw_fd(),
                &mut view.mem,
                a.img,
                a.nr,
                src,
                &mut tally,
            );
            self.account(id, &tally, a.data.is_some(), a.urgent);
            match res {
                Placement::Finished => {
                    a.finished.insert(id);
                }
                Placement::ReadEvents => {
                    self.read_events(id);
                    again += 1;
                    if again >= INLINE_RETRIES {
                        if a.since.elapsed() < GIVE_UP {
                            return Some(a);
                        }
                        self.error(format!(
                            "pid {}: the kernel refused copies at {:#x} (EAGAIN) for {GIVE_UP:?}; \
                             those pages stay missing",
                            a.pid, a.img
                        ));
                        a.finished.insert(id);
                    }
                }
                Placement::Gone => self.drop_view(id, "exited (copy: ESRCH)"),
                Placement::Failed(e) => {
                    self.error(format!(
                        "copying {} pages at {:#x} into pid {} failed: {e}",
                        a.nr, a.img, a.pid
                    ));
                    a.finished.insert(id);
                }
            }
        }
        None
    }

    /// Stats for what was placed, and the fault latency of every thread it woke.
    fn account(&mut self, id: u64, tally: &Tally, data: bool, urgent: bool) {
        let s = &self.stats;
        let counter = match (data, urgent) {
            (false, _) => &s.lazy_zero_pages,
            (true, true) => &s.pages_copied_urgent,
            (true, false) => &s.pages_copied_pushed,
        };
        counter.fetch_add(tally.pages, Relaxed);
        s.copy_retries.fetch_add(tally.retries, Relaxed);
        s.pages_dropped.fetch_add(tally.dropped, Relaxed);
        if self.waiting.is_empty() {
            return;
        }
        let now = Instant::now();
        for &(img, n) in &tally.runs {
            let keys: Vec<(u64, u64)> = self
                .waiting
                .range((id, img)..(id, img + n * PAGE_SIZE))
                .map(|(k, _)| *k)
                .collect();
            for k in keys {
                for t in self.waiting.remove(&k).unwrap_or_default() {
                    let ns = u64::try_from(now.duration_since(t).as_nanos()).unwrap_or(u64::MAX);
                    s.fault_latency.record(ns);
                    if s.pages_copied_pushed.load(Relaxed) == 0 {
                        s.fault_latency_before_push.record(ns);
                    } else {
                        s.fault_latency_during_push.record(ns);
                    }
                    s.blocktime_ns.fetch_add(ns, Relaxed);
                }
            }
        }
    }
}

/// The message an arrival came as, for holding it until it can be placed.
fn as_message(pid: u32, img: u64, nr_pages: u32, data: Option<Bytes>, urgent: bool) -> Inbound {
    match data {
        Some(data) => Inbound::Pages {
            pid,
            img_vaddr: img,
            nr_pages,
            data,
            urgent,
        },
        None => Inbound::Zero {
            pid,
            img_vaddr: img,
            nr_pages,
            urgent,
        },
    }
}
