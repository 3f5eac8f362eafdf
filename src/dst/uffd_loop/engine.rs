//! The fault engine's core, sans-IO: every decision of the fault loop, and no file descriptor.
//!
//! It takes the thread's inputs (tasks handed over, pages and zero runs from the source, the
//! restore finishing, a new link) and the uffd events of its views, and answers with
//! [`Outbound`] messages and with the uffd operations it asks of a [`Kernel`]: COPY, ZEROPAGE,
//! UNREGISTER, reading a view's events, closing it (the port, `kernel.rs`). Time comes from
//! [`Kernel::now`]. The driver (`driver.rs`) is the real kernel, epoll and the channels; the
//! tests drive the same engine against a simulated kernel and source (`engine/tests.rs`).
//!
//! The rules it keeps:
//! - a fault on a lazy page not yet in place is asked of the source before its thread is
//!   counted as waiting, and an open request is asked again on every new link;
//! - the source's data reaches a process only if the [`ArrivalGuard`] admits it, only when the
//!   restore may have registered its ranges (background pages wait for `RestoreFinished`), and
//!   only from the current link: pages a dead link delivered are dropped (its requests are
//!   void, and the new link sends what is missing);
//! - each lazy page is placed once: [`TaskMemory`] plans every copy and hears every result.

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;
use std::time::{Duration, Instant};

use bytes::Bytes;
use nix::errno::Errno;
use tracing::{debug, error, info, warn};

use super::ioctl::Fill;
use super::kernel::ViewFills;
pub(super) use super::kernel::{Kernel, Owner, UffdEvent, ViewId};
use super::piece_size::PieceSize;
use super::place::{self, PageBytes, Placement, Tally};
use super::{LoopConfig, Outbound, UffdStats};
use crate::dst::arrival_guard::ArrivalGuard;
use crate::dst::regions::{FaultAction, PageState, TaskMemory};
use crate::pages::{PAGE_SIZE, PageRange, PidRange, merge_ranges, page_floor};

mod accounting;
#[cfg(test)]
mod tests;

/// EAGAIN rounds (read events, copy again) before an arrival waits for the next loop round, so
/// one process in a long fork cannot stall the others' faults.
const INLINE_RETRIES: u32 = 16;
/// An arrival still refused after this long is given up (pages stay missing) with an error.
const GIVE_UP: Duration = Duration::from_secs(60);
use crate::limits::{HELD_MESSAGE_COST, LimitHit, MAX_EARLY_HELD_BYTES};

/// Pages (`data`) or a zero run (`None`) from the source, and how they came: as a fault's
/// answer (`urgent`) or pushed, on link generation `link` (0 the first link, then the serial of
/// each [`Input::Resume`]).
#[derive(Debug, Clone)]
pub(super) struct Arrived {
    pub at: PidRange,
    pub data: Option<Bytes>,
    pub urgent: bool,
    pub link: u64,
}

impl Arrived {
    /// Data bytes it carries (0 for a zero run).
    pub(super) fn bytes(&self) -> u64 {
        self.data.as_ref().map_or(0, |d| d.len() as u64)
    }
}

/// The core's inputs besides uffd events.
#[derive(Debug)]
pub(super) enum Input<U> {
    /// A restored process's uffd and its lazy ranges (image addresses).
    Task {
        pid: i32,
        uffd: U,
        lazy: Vec<PageRange>,
        host_pid: Option<i32>,
    },
    Zombie {
        pid: i32,
    },
    /// A fork child's uffd adopted from a dead dst's keeper: image pid `pid` (its restored
    /// ancestor's), what it still lacks, and the host pid of that ancestor.
    Child {
        pid: i32,
        uffd: U,
        lazy: Vec<PageRange>,
        root_host_pid: i32,
    },
    Arrived(Arrived),
    /// Every task is restored: background pages may land, completion can be judged.
    RestoreFinished,
    /// A new link to the source, generation `serial`: the old link's requests and pages are void.
    Resume {
        serial: u64,
    },
}

/// Where the migration stands, as far as the fault engine sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// The restore runs: its ranges may not be registered yet, so background pages wait.
    Restoring,
    /// Every task is restored; pages land as they come.
    Serving,
    /// Every lazy page is in place and [`Outbound::Complete`] went out.
    Complete,
}

/// An admitted arrival (or one piece of it) on its way into every view of its pid.
struct Placing {
    at: PidRange,
    data: Option<Bytes>,
    urgent: bool,
    /// Views done with it; fork children created meanwhile are not, and get it too.
    finished: BTreeSet<ViewId>,
    since: Instant,
    /// Some view could not take it (a failed copy, or EAGAIN past [`GIVE_UP`]).
    failed: bool,
}

impl Placing {
    /// A piece no view has taken yet.
    fn new(at: PidRange, data: Option<Bytes>, urgent: bool, since: Instant) -> Placing {
        Placing {
            at,
            data,
            urgent,
            finished: BTreeSet::new(),
            since,
            failed: false,
        }
    }

    fn bytes(&self) -> u64 {
        self.data.as_ref().map_or(0, |d| d.len() as u64)
    }
}

/// Source data that may not be placed yet.
#[derive(Default)]
struct Deferred {
    /// Background pages that arrived before the restore finished. Until then the restorer may
    /// not have registered (or even mremapped) the ranges, and a copy would fail with ENOENT and
    /// lose the pages. Faults need no such wait: a fault comes from a registered range.
    early: Vec<Arrived>,
    /// Pages that arrived before their task did.
    stash: HashMap<u32, Vec<Arrived>>,
    /// What `early` and `stash` cost: data plus [`HELD_MESSAGE_COST`] a message (zero runs
    /// count), bounded by [`MAX_EARLY_HELD_BYTES`].
    bytes: u64,
}

/// Work the core still owes the kernel.
#[derive(Default)]
struct Backlog {
    /// Zero-page answers the kernel refused with EAGAIN: (view, runtime address, fault time).
    zero_again: Vec<(ViewId, u64, Instant)>,
    /// Arrivals the kernel refused with EAGAIN.
    refused: Vec<Placing>,
    /// Background arrivals not placed yet, cut into pieces as they are placed, one piece per
    /// driver round ([`Engine::place_next_piece`]).
    pieces: VecDeque<Placing>,
    /// How many pages a piece carries ([`PieceSize`]).
    piece_size: PieceSize,
}

/// The fault engine's state; see the module docs.
pub(super) struct Engine {
    config: LoopConfig,
    stats: Arc<UffdStats>,
    phase: Phase,
    /// The current link generation.
    link: u64,
    views: BTreeMap<ViewId, TaskMemory>,
    next_id: ViewId,
    /// Uffds that cannot be served (unusable lazy ranges): kept open, killed at shutdown.
    broken: Vec<(u32, ViewId)>,
    /// Image pids that ever had a task.
    known_pids: BTreeSet<u32>,
    /// Which source data may be placed at all.
    guard: ArrivalGuard,
    held: Deferred,
    /// Faulting threads waiting for (view, image page): since when, and whether the fault sent
    /// the request itself (false: it found the page already requested, e.g. read-ahead).
    waiting: BTreeMap<(ViewId, u64), Vec<(Instant, bool)>>,
    backlog: Backlog,
    out: Vec<Outbound>,
}

impl Engine {
    pub(super) fn new(config: LoopConfig, stats: Arc<UffdStats>) -> Self {
        Engine {
            config,
            stats,
            phase: Phase::Restoring,
            link: 0,
            views: BTreeMap::new(),
            next_id: 1,
            broken: Vec::new(),
            known_pids: BTreeSet::new(),
            guard: ArrivalGuard::new(),
            held: Deferred::default(),
            waiting: BTreeMap::new(),
            backlog: Backlog::default(),
            out: Vec::new(),
        }
    }

    /// The messages for the service produced so far, oldest first.
    pub(super) fn take_output(&mut self) -> Vec<Outbound> {
        std::mem::take(&mut self.out)
    }

    /// The current link generation: only pages of this link are placed.
    pub(super) fn link(&self) -> u64 {
        self.link
    }

    /// Refused work waits for a retry ([`Engine::retry`] in about a millisecond).
    pub(super) fn wants_retry(&self) -> bool {
        !self.backlog.zero_again.is_empty() || !self.backlog.refused.is_empty()
    }

    /// Background pieces wait to be placed ([`Engine::place_next_piece`]).
    pub(super) fn has_pieces(&self) -> bool {
        !self.backlog.pieces.is_empty()
    }

    /// One input.
    pub(super) fn handle<K: Kernel>(&mut self, k: &mut K, input: Input<K::Uffd>) {
        match input {
            Input::Task {
                pid,
                uffd,
                lazy,
                host_pid,
            } => self.add_task(k, pid, uffd, &lazy, Owner::Host(host_pid)),
            Input::Child {
                pid,
                uffd,
                lazy,
                root_host_pid,
            } => self.add_task(k, pid, uffd, &lazy, Owner::DescendantOf(root_host_pid)),
            Input::Zombie { pid } => debug!(pid, "zombie: no memory to serve"),
            Input::Arrived(a) => self.arrive(k, a),
            Input::RestoreFinished => {
                if self.phase == Phase::Restoring {
                    self.phase = Phase::Serving;
                }
                // The restorer has registered every lazy range by now: held pushes can land.
                let held = std::mem::take(&mut self.held);
                for a in held.early {
                    self.arrive(k, a);
                }
                // Pages for a pid the restore never sent: the guard refuses them.
                for a in held.stash.into_values().flatten() {
                    self.arrive(k, a);
                }
            }
            Input::Resume { serial } => self.resume(serial),
        }
    }

    /// A uffd handed over while the engine cannot serve (after a fatal error): kept open until
    /// shutdown, then treated as incomplete.
    pub(super) fn keep_broken<K: Kernel>(
        &mut self,
        k: &mut K,
        pid: i32,
        uffd: K::Uffd,
        owner: Owner,
    ) {
        let id = self.new_id();
        // Kept open only; a failure to poll it does not matter.
        let _ = k.attach(id, uffd, owner, false);
        self.broken.push((pid.max(0) as u32, id));
    }

    /// Image pids (with their views) whose lazy memory is not all in place, broken uffds
    /// included: what an incomplete shutdown kills.
    pub(super) fn incomplete(&self) -> Vec<(u32, ViewId)> {
        let mut v: Vec<(u32, ViewId)> = self
            .views
            .iter()
            .filter(|(_, m)| !m.is_complete())
            .map(|(id, m)| (m.pid(), *id))
            .collect();
        v.extend(self.broken.iter().copied());
        v
    }

    fn new_id(&mut self) -> ViewId {
        let id = self.next_id;
        self.next_id += 1;
        id
    }

    /// A new link to the source: void what the old one owed, report what is still missing and
    /// register the open fault requests again (the service re-sends them).
    fn resume(&mut self, serial: u64) {
        self.link = serial;
        self.guard.reset_link();
        let mut missing: BTreeMap<u32, Vec<PageRange>> =
            self.known_pids.iter().map(|&p| (p, Vec::new())).collect();
        let mut requests = Vec::new();
        for mem in self.views.values() {
            let pid = mem.pid();
            missing.entry(pid).or_default().extend(mem.missing_ranges());
            requests.extend(
                mem.in_flight_ranges()
                    .into_iter()
                    .map(|range| PidRange { pid, range }),
            );
        }
        for ranges in missing.values_mut() {
            *ranges = merge_ranges(std::mem::take(ranges));
        }
        for r in &requests {
            self.guard.requested(r.pid, r.start(), r.nr_pages());
        }
        info!(
            missing_pages = missing.values().flatten().map(|r| r.nr_pages).sum::<u64>(),
            open_requests = requests.len(),
            link = serial,
            "link to the source replaced"
        );
        self.out.push(Outbound::Resumed {
            serial,
            missing,
            requests,
        });
    }

    fn add_task<K: Kernel>(
        &mut self,
        k: &mut K,
        pid: i32,
        uffd: K::Uffd,
        lazy: &[PageRange],
        owner: Owner,
    ) {
        let mem = match u32::try_from(pid)
            .ok()
            .filter(|p| *p > 0)
            .map(|p| TaskMemory::new(p, lazy))
        {
            Some(Ok(mem)) => mem
                .with_readahead(self.config.readahead_pages)
                .with_sequential(self.config.sequential_readahead),
            Some(Err(e)) => {
                self.error(format!("task {pid}: {e}; its lazy memory cannot be served"));
                let id = self.new_id();
                let _ = k.attach(id, uffd, owner, false);
                self.broken.push((pid as u32, id));
                return;
            }
            None => {
                self.error(format!(
                    "task pid {pid} is not a valid pid; its uffd is kept but not served"
                ));
                let id = self.new_id();
                let _ = k.attach(id, uffd, owner, false);
                self.broken.push((0, id));
                return;
            }
        };
        let pid = mem.pid();
        if let Some(images) = &self.config.image_pids
            && !images.contains(&pid)
        {
            // Served, it would have no lazy ranges: every fault would be zero-filled.
            self.error(format!(
                "the restore handed over task pid {pid}, which is not in the images (pids \
                 {images:?}): its memory has no lazy ranges here and would be zero-filled; \
                 refusing (is the restore using other images?)"
            ));
            let id = self.new_id();
            let _ = k.attach(id, uffd, owner, false);
            self.broken.push((pid, id));
            return;
        }
        info!(pid, lazy_pages = mem.pending_pages(), "serving task");
        self.known_pids.insert(pid);
        self.guard.add_task(pid, lazy);
        self.add_view(k, uffd, mem, owner);
        for a in self.held.stash.remove(&pid).unwrap_or_default() {
            self.arrive(k, a);
        }
    }

    fn add_view<K: Kernel>(&mut self, k: &mut K, uffd: K::Uffd, mem: TaskMemory, owner: Owner) {
        let id = self.new_id();
        let pid = mem.pid();
        self.stats.tasks.fetch_add(1, Relaxed);
        self.views.insert(id, mem);
        if let Err(e) = k.attach(id, uffd, owner, true) {
            self.error(format!("cannot poll the uffd of pid {pid}: {e}"));
        }
    }

    /// The process behind view `id` is gone: its memory no longer exists, so closing is safe.
    fn drop_view<K: Kernel>(&mut self, k: &mut K, id: ViewId, why: &str) {
        let Some(mem) = self.views.remove(&id) else {
            return;
        };
        k.close(id);
        self.waiting.retain(|(v, _), _| *v != id);
        self.stats.tasks.fetch_sub(1, Relaxed);
        let pid = mem.pid();
        debug!(
            pid,
            missing = mem.pending_pages() + mem.in_flight_pages(),
            "{why}"
        );
        if !self.views.values().any(|v| v.pid() == pid) {
            info!(pid, "task gone: {why}");
            self.out.push(Outbound::TaskGone { pid: pid as i32 });
        }
    }

    /// Reads every queued event of view `id` (the driver calls this when the uffd is readable).
    pub(super) fn read_events<K: Kernel>(&mut self, k: &mut K, id: ViewId) {
        while let Some(pid) = self.views.get(&id).map(|m| m.pid()) {
            let events = match k.read_events(id) {
                Ok(evs) => evs,
                Err(e) => {
                    k.unwatch(id);
                    self.error(format!(
                        "cannot read the uffd of pid {pid}: {e}; it is no longer served"
                    ));
                    break;
                }
            };
            if events.is_empty() {
                break;
            }
            let now = k.now();
            for ev in events {
                self.on_event(k, id, ev, now);
            }
        }
    }

    fn on_event<K: Kernel>(&mut self, k: &mut K, id: ViewId, ev: UffdEvent<K::Uffd>, now: Instant) {
        let Some(mem) = self.views.get_mut(&id) else {
            return;
        };
        let dropped_before = mem.counters().pages_dropped;
        match ev {
            UffdEvent::Fault { addr } => {
                self.stats.faults.fetch_add(1, Relaxed);
                self.fault(k, id, addr, now);
            }
            UffdEvent::Fork { uffd } => {
                let child = mem.fork_child();
                debug!(
                    pid = child.pid(),
                    missing = child.pending_pages(),
                    "fork child"
                );
                self.add_view(k, uffd, child, Owner::ChildOf(id));
            }
            UffdEvent::Remap { from, to, len } => mem.on_remap(from, to, len),
            UffdEvent::Remove { start, end } => {
                let res = k.unregister(id, start, end.saturating_sub(start));
                mem.on_remove(start, end);
                self.settle_dropped(id, dropped_before);
                match res {
                    Ok(()) => {}
                    Err(Errno::ENOMEM) => self.drop_view(k, id, "exited (unregister: ENOMEM)"),
                    Err(e) => warn!(start, end, "UFFDIO_UNREGISTER after madvise failed: {e}"),
                }
                return;
            }
            UffdEvent::Unmap { start, end } => mem.on_unmap(start, end),
        }
        self.settle_dropped(id, dropped_before);
    }

    /// Accounts pages dropped by an event and forgets waiters on them.
    fn settle_dropped(&mut self, id: ViewId, before: u64) {
        let Some(mem) = self.views.get(&id) else {
            return;
        };
        let dropped = mem.counters().pages_dropped - before;
        if dropped > 0 {
            self.stats.pages_dropped.fetch_add(dropped, Relaxed);
            self.waiting
                .retain(|(v, img), _| *v != id || mem.state_of(*img) == PageState::InFlight);
        }
    }

    fn fault<K: Kernel>(&mut self, k: &mut K, id: ViewId, addr: u64, at: Instant) {
        let Some(mem) = self.views.get_mut(&id) else {
            return;
        };
        let pid = mem.pid();
        match mem.on_fault(addr) {
            FaultAction::Zero => match k.zeropage(id, page_floor(addr), 1) {
                Ok(Fill::Done) => {
                    self.stats.zero_pages.fetch_add(1, Relaxed);
                }
                Ok(Fill::Exists | Fill::NotRegistered) => {}
                Ok(Fill::Again | Fill::Partial { .. }) => {
                    self.backlog.zero_again.push((id, addr, at))
                }
                Ok(Fill::Gone) => self.drop_view(k, id, "exited (zeropage: ESRCH)"),
                Err(e) => self.error(format!(
                    "UFFDIO_ZEROPAGE at {addr:#x} of pid {pid} failed: {e}"
                )),
            },
            FaultAction::AlreadyRequested { img_vaddr } => {
                self.waiting
                    .entry((id, img_vaddr))
                    .or_default()
                    .push((at, false));
            }
            FaultAction::Request {
                img_vaddr,
                nr_pages,
            } => {
                // Asked first, then waited on: a waiting thread always has its request out.
                let request = PidRange::new(pid, img_vaddr, nr_pages);
                self.stats.requests.fetch_add(1, Relaxed);
                self.stats.pages_requested.fetch_add(nr_pages, Relaxed);
                self.guard.requested(pid, img_vaddr, nr_pages);
                self.out.push(Outbound::Fault(request));
                self.waiting
                    .entry((id, img_vaddr))
                    .or_default()
                    .push((at, true));
            }
        }
    }

    /// Work the kernel refused with EAGAIN: zero-page answers (read the events first, then
    /// decide again: an mremap may have moved lazy memory to that address) and arrivals.
    pub(super) fn retry<K: Kernel>(&mut self, k: &mut K) {
        for (id, addr, at) in std::mem::take(&mut self.backlog.zero_again) {
            self.read_events(k, id);
            self.fault(k, id, addr, at);
        }
        for a in std::mem::take(&mut self.backlog.refused) {
            if let Some(left) = self.place(k, a) {
                self.backlog.refused.push(left);
            }
        }
    }

    /// Places the next background piece, if any (the front of the oldest arrival waiting, sized
    /// by [`PieceSize`]; the rest of it stays first in line); returns its data bytes.
    pub(super) fn place_next_piece<K: Kernel>(&mut self, k: &mut K) -> Option<u64> {
        let mut piece = self.backlog.pieces.pop_front()?;
        let (nr, size) = (piece.at.nr_pages(), self.backlog.piece_size.pages());
        if nr > size {
            // Each piece is an arrival of its own: a fork between two pieces gets the later ones.
            let rest = Placing::new(
                PidRange::new(piece.at.pid, piece.at.start() + size * PAGE_SIZE, nr - size),
                piece
                    .data
                    .as_ref()
                    .map(|d| d.slice((size * PAGE_SIZE) as usize..)),
                false,
                piece.since,
            );
            piece.at = PidRange::new(piece.at.pid, piece.at.start(), size);
            piece.data = piece.data.map(|d| d.slice(..(size * PAGE_SIZE) as usize));
            self.backlog.pieces.push_front(rest);
        }
        let bytes = piece.bytes();
        let started = k.now();
        self.place_or_keep(k, piece);
        if bytes > 0 {
            let took = k.now().saturating_duration_since(started);
            self.backlog.piece_size.observe(bytes / PAGE_SIZE, took);
        }
        Some(bytes)
    }

    /// Sends [`Outbound::Complete`] once the restore finished and every view's lazy memory is in
    /// place.
    pub(super) fn check_complete(&mut self) {
        if self.phase != Phase::Serving || !self.broken.is_empty() {
            return;
        }
        if self.views.values().all(|m| m.is_complete()) {
            self.phase = Phase::Complete;
            info!(stats = ?self.stats.counters(), "every task's lazy memory is in place");
            self.out.push(Outbound::Complete);
        }
    }

    /// Reports a failure that needs the service's decision.
    pub(super) fn error(&mut self, msg: String) {
        error!("{msg}");
        self.out.push(Outbound::Error(msg));
    }

    /// Pages (or a zero run) from the source.
    fn arrive<K: Kernel>(&mut self, k: &mut K, a: Arrived) {
        let (pid, img, nr) = (a.at.pid, a.at.start(), a.at.nr_pages());
        if !img.is_multiple_of(PAGE_SIZE)
            || a.data
                .as_ref()
                .is_some_and(|d| Some(d.len() as u64) != nr.checked_mul(PAGE_SIZE))
        {
            let len = a.data.as_ref().map(|d| d.len());
            self.error(format!(
                "bad page message for pid {pid} at {img:#x}: {nr} pages but {len:?} bytes, or \
                 unaligned; dropped"
            ));
            return;
        }
        if a.link != self.link {
            // A dead link's data: its requests are void and the new link sends what is missing.
            debug!(
                pid,
                img,
                nr,
                link = a.link,
                current = self.link,
                "pages of a replaced link: dropped"
            );
            return;
        }
        if let Some(images) = &self.config.image_pids
            && !images.contains(&pid)
        {
            // Never held: no task of the restore can ever take these.
            self.error(format!(
                "the source sent {nr} pages at {img:#x} for pid {pid}, which is not in the images \
                 (no task of this restore has it); dropped"
            ));
            return;
        }
        let has_view = self.views.values().any(|m| m.pid() == pid);
        let early = !a.urgent && self.phase == Phase::Restoring;
        let unknown =
            !has_view && !self.known_pids.contains(&pid) && self.phase == Phase::Restoring;
        if early || unknown {
            self.held.bytes += a.bytes() + HELD_MESSAGE_COST;
            if self.held.bytes > MAX_EARLY_HELD_BYTES {
                let hit = LimitHit::fixed(
                    format!(
                        "source data held before the restore finished (pushed pages, zero runs and \
                         pages of tasks not handed over yet; last: {nr} pages at {img:#x} of pid {pid})"
                    ),
                    format!("{} MiB", MAX_EARLY_HELD_BYTES >> 20),
                    "pageserv src pushes only after the restore finished; a source that does not is misbehaving",
                );
                self.error(format!("{hit}; dropped"));
                return;
            }
            if early {
                self.held.early.push(a);
            } else {
                self.held.stash.entry(pid).or_default().push(a);
            }
            return;
        }
        // The one admission rule for source data (dst/arrival_guard.rs): nothing it refuses
        // reaches a process.
        if let Err(refusal) = self.guard.admit(pid, img, nr, a.urgent) {
            self.error(refusal.to_string());
            return;
        }
        if !has_view {
            debug!(pid, img, nr, "pages for a task that is gone: dropped");
            return;
        }
        let since = k.now();
        if !a.urgent && nr > self.backlog.piece_size.pages() {
            // Placed a piece per driver round, so faults are not kept waiting (see BULK_BUDGET).
            self.backlog
                .pieces
                .push_back(Placing::new(a.at, a.data, false, since));
            return;
        }
        self.place_or_keep(k, Placing::new(a.at, a.data, a.urgent, since));
    }

    /// Places an admitted arrival (or one piece of it), keeping what the kernel refused.
    fn place_or_keep<K: Kernel>(&mut self, k: &mut K, p: Placing) {
        if let Some(left) = self.place(k, p) {
            self.backlog.refused.push(left);
        }
    }

    /// Places `p` into every view of its pid; returns it if some view must be retried later.
    fn place<K: Kernel>(&mut self, k: &mut K, mut p: Placing) -> Option<Placing> {
        let mut again = 0;
        // Re-scan after every step: reading events may add fork children that need these pages.
        while let Some(id) = self
            .views
            .iter()
            .find(|(id, m)| m.pid() == p.at.pid && !p.finished.contains(*id))
            .map(|(id, _)| *id)
        {
            let Some(mem) = self.views.get_mut(&id) else {
                break;
            };
            let src = match &p.data {
                Some(d) => PageBytes::Data(d),
                None => PageBytes::Zero,
            };
            let mut tally = Tally::default();
            let res = place::place(
                &mut ViewFills::new(&mut *k, id),
                mem,
                p.at.start(),
                p.at.nr_pages(),
                src,
                &mut tally,
            );
            self.account(k, id, &tally, p.data.is_some(), p.urgent);
            match res {
                Placement::Finished => {
                    p.finished.insert(id);
                }
                Placement::ReadEvents => {
                    self.read_events(k, id);
                    again += 1;
                    if again >= INLINE_RETRIES {
                        if k.now().saturating_duration_since(p.since) < GIVE_UP {
                            return Some(p);
                        }
                        self.error(format!(
                            "pid {}: the kernel refused copies at {:#x} (EAGAIN) for {GIVE_UP:?}; \
                             those pages stay missing",
                            p.at.pid,
                            p.at.start()
                        ));
                        p.failed = true;
                        p.finished.insert(id);
                    }
                }
                Placement::Gone => self.drop_view(k, id, "exited (copy: ESRCH)"),
                Placement::Failed(e) => {
                    self.error(format!(
                        "copying {} pages at {:#x} into pid {} failed: {e}",
                        p.at.nr_pages(),
                        p.at.start(),
                        p.at.pid
                    ));
                    p.failed = true;
                    p.finished.insert(id);
                }
            }
        }
        // Every view took it whole (or no longer needs it): a copy held at dst may go.
        if !p.failed
            && let Some(h) = &self.config.held
        {
            h.placed(p.at);
        }
        None
    }

    /// (pid, image page) of every thread waiting for a page (for tests).
    #[cfg(test)]
    fn waiting_pages(&self) -> Vec<(u32, u64)> {
        self.waiting
            .keys()
            .filter_map(|(v, img)| self.views.get(v).map(|m| (m.pid(), *img)))
            .collect()
    }
}
