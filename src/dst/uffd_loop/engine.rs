//! The fault thread's state and its one loop: read uffd events, then control and fault
//! answers, then a bounded amount of background pages, and again.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::os::fd::{AsFd, AsRawFd, FromRawFd, IntoRawFd, OwnedFd};
use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;
use std::time::Instant;

use crossbeam_channel::{Receiver, Sender, TryRecvError};
use nix::errno::Errno;
use nix::fcntl::{FcntlArg, OFlag, fcntl};
use nix::sys::epoll::{Epoll, EpollCreateFlags, EpollEvent, EpollFlags, EpollTimeout};
use nix::sys::eventfd::EventFd;
use tracing::{debug, error, info, warn};
use userfaultfd::{Event, EventBuffer, Uffd};

use super::ioctl::{self, Fill};
use super::kill::Process;
use super::{Inbound, LoopConfig, Outbound, ShutdownReport, UffdStats};
use crate::dst::arrival_guard::ArrivalGuard;
use crate::dst::regions::{FaultAction, TaskMemory};
use crate::pages::{PAGE_SIZE, PageRange, page_floor};

mod arrive;
mod shutdown;

const WAKE_TOKEN: u64 = u64::MAX;
/// Background bytes placed per round before the uffds and the urgent queue are looked at again.
/// One UFFDIO_COPY of a whole 4 MiB push batch takes ~1.1 ms here, and a fault read or answered
/// behind it waits that long; background batches are therefore placed in pieces of this size
/// (~70 us each), with a new round (epoll, fault answers) between pieces.
const BULK_BUDGET: u64 = 256 << 10;
/// Control messages and fault answers handled per round.
const URGENT_BUDGET: usize = 256;

/// Who to kill if this view's memory is incomplete at shutdown.
enum Owner {
    Own(Process),
    /// A fork child: its pid is unknown, so kill every descendant of this host pid.
    DescendantOf(i32),
    Unknown,
}

impl Owner {
    fn for_child(&self) -> Owner {
        match self {
            Owner::Own(p) => Owner::DescendantOf(p.pid),
            Owner::DescendantOf(a) => Owner::DescendantOf(*a),
            Owner::Unknown => Owner::Unknown,
        }
    }
}

struct View {
    uffd: Uffd,
    mem: TaskMemory,
    owner: Owner,
}

pub(super) struct Engine {
    config: LoopConfig,
    out: Sender<Outbound>,
    stats: Arc<UffdStats>,
    urgent: Receiver<Inbound>,
    bulk: Receiver<Inbound>,
    wake: Arc<EventFd>,
    epoll: Epoll,
    evbuf: EventBuffer,
    views: BTreeMap<u64, View>,
    next_id: u64,
    /// Uffds we cannot serve (unusable lazy ranges): kept open, killed at shutdown.
    broken: Vec<(u32, Uffd, Owner)>,
    /// Image pids that ever had a task.
    known_pids: BTreeSet<u32>,
    /// Which source data may be placed at all.
    guard: ArrivalGuard,
    /// Pages that arrived before their task did.
    stash: HashMap<u32, Vec<Inbound>>,
    /// Background pages that arrived before the restore finished. Until then the restorer may
    /// not have registered (or even mremapped) the ranges, and a copy would fail with ENOENT and
    /// lose the pages. Faults need no such wait: a fault comes from a registered range.
    early: Vec<Inbound>,
    early_bytes: u64,
    /// Faulting threads waiting for (view, image page), since when.
    waiting: BTreeMap<(u64, u64), Vec<Instant>>,
    /// Zero-page answers the kernel refused with EAGAIN: (view, runtime address, fault time).
    deferred: Vec<(u64, u64, Instant)>,
    /// Arrivals the kernel refused with EAGAIN.
    retrying: Vec<arrive::Arrival>,
    /// Pieces of a background arrival not placed yet, one per round (see [`BULK_BUDGET`]).
    pieces: std::collections::VecDeque<arrive::Arrival>,
    restore_finished: bool,
    complete_sent: bool,
    out_closed: bool,
}

fn set_nonblocking(fd: &impl AsFd) -> nix::Result<()> {
    let flags = OFlag::from_bits_retain(fcntl(fd, FcntlArg::F_GETFL)?);
    fcntl(fd, FcntlArg::F_SETFL(flags | OFlag::O_NONBLOCK)).map(|_| ())
}

impl Engine {
    pub(super) fn new(
        config: LoopConfig,
        out: Sender<Outbound>,
        stats: Arc<UffdStats>,
        urgent: Receiver<Inbound>,
        bulk: Receiver<Inbound>,
        wake: Arc<EventFd>,
    ) -> nix::Result<Self> {
        let epoll = Epoll::new(EpollCreateFlags::EPOLL_CLOEXEC)?;
        epoll.add(
            wake.as_fd(),
            EpollEvent::new(EpollFlags::EPOLLIN, WAKE_TOKEN),
        )?;
        Ok(Self {
            config,
            out,
            stats,
            urgent,
            bulk,
            wake,
            epoll,
            evbuf: EventBuffer::new(64),
            views: BTreeMap::new(),
            next_id: 1,
            broken: Vec::new(),
            known_pids: BTreeSet::new(),
            guard: ArrivalGuard::new(),
            stash: HashMap::new(),
            early: Vec::new(),
            early_bytes: 0,
            waiting: BTreeMap::new(),
            deferred: Vec::new(),
            retrying: Vec::new(),
            pieces: std::collections::VecDeque::new(),
            restore_finished: false,
            complete_sent: false,
            out_closed: false,
        })
    }

    pub(super) fn run(mut self) -> ShutdownReport {
        let mut ready = vec![EpollEvent::empty(); 64];
        loop {
            // Refused copies are retried every millisecond: the event that blocks them is
            // usually readable by then.
            let timeout =
                if !self.urgent.is_empty() || !self.bulk.is_empty() || !self.pieces.is_empty() {
                    EpollTimeout::ZERO
                } else if !self.deferred.is_empty() || !self.retrying.is_empty() {
                    EpollTimeout::from(1u8)
                } else {
                    EpollTimeout::NONE
                };
            let n = match self.epoll.wait(&mut ready, timeout) {
                Ok(n) => n,
                Err(Errno::EINTR) => 0,
                Err(e) => {
                    self.error(format!(
                        "the fault thread cannot wait on its uffds: epoll_wait: {e}"
                    ));
                    return self.wait_for_shutdown();
                }
            };
            for ev in &ready[..n] {
                match ev.data() {
                    WAKE_TOKEN => {
                        let _ = self.wake.read();
                    }
                    id => self.read_events(id),
                }
            }
            self.retry_deferred();
            self.retry_arrivals();
            for _ in 0..URGENT_BUDGET {
                let Ok(msg) = self.urgent.try_recv() else {
                    break;
                };
                if let Some(kill) = self.handle(msg) {
                    return self.shutdown(kill);
                }
            }
            let mut budget = BULK_BUDGET;
            while budget > 0 {
                // A message's pieces go before the next message: Shutdown and Resume stay behind
                // every page queued before them.
                if let Some(piece) = self.pieces.pop_front() {
                    budget = budget.saturating_sub(piece.bytes().max(PAGE_SIZE));
                    self.place_piece(piece);
                    continue;
                }
                match self.bulk.try_recv() {
                    Ok(msg) => {
                        budget = budget.saturating_sub(msg_bytes(&msg).max(PAGE_SIZE));
                        if let Some(kill) = self.handle(msg) {
                            return self.shutdown(kill);
                        }
                    }
                    Err(TryRecvError::Empty) => break,
                    Err(TryRecvError::Disconnected) => {
                        if self.urgent.is_empty() {
                            error!("every sender to the fault thread is gone without a Shutdown");
                            return self.shutdown(true);
                        }
                        break;
                    }
                }
            }
            self.check_complete();
        }
    }

    /// Handles one message; `Some(kill_incomplete)` means shut down now.
    fn handle(&mut self, msg: Inbound) -> Option<bool> {
        match msg {
            Inbound::Task {
                pid,
                uffd,
                lazy,
                host_pid,
            } => self.add_task(pid, uffd, &lazy, host_pid),
            Inbound::Zombie { pid } => debug!(pid, "zombie: no memory to serve"),
            Inbound::Pages {
                pid,
                img_vaddr,
                nr_pages,
                data,
                urgent,
            } => self.arrive(pid, img_vaddr, nr_pages, Some(data), urgent),
            Inbound::Zero {
                pid,
                img_vaddr,
                nr_pages,
                urgent,
            } => self.arrive(pid, img_vaddr, nr_pages, None, urgent),
            Inbound::RestoreFinished => {
                self.restore_finished = true;
                // The restorer has registered every lazy range by now: held pushes can land.
                self.early_bytes = 0;
                for msg in std::mem::take(&mut self.early) {
                    self.handle(msg);
                }
                // Pages for a pid the restore never sent: the guard refuses them.
                let stashed: Vec<Inbound> = self.stash.drain().flat_map(|(_, m)| m).collect();
                for msg in stashed {
                    self.handle(msg);
                }
            }
            Inbound::Resume { serial } => self.resume(serial),
            Inbound::Shutdown { kill_incomplete } => return Some(kill_incomplete),
        }
        None
    }

    /// A new link to the source: void what the old one owed, report what is still missing and
    /// register the open fault requests again (the service re-sends them).
    fn resume(&mut self, serial: u64) {
        // Fault answers of the old link still queued go first: after the reset they would
        // answer requests that only the new link may answer.
        while let Ok(msg) = self.urgent.try_recv() {
            if self.handle(msg).is_some() {
                warn!("a shutdown on the urgent queue during a resume is ignored");
            }
        }
        self.guard.reset_link();
        let mut missing: BTreeMap<u32, Vec<PageRange>> =
            self.known_pids.iter().map(|&p| (p, Vec::new())).collect();
        let mut requests = Vec::new();
        for view in self.views.values() {
            let pid = view.mem.pid();
            missing
                .entry(pid)
                .or_default()
                .extend(view.mem.missing_ranges());
            requests.extend(view.mem.in_flight_ranges().into_iter().map(|r| (pid, r)));
        }
        for ranges in missing.values_mut() {
            *ranges = merge_ranges(std::mem::take(ranges));
        }
        for &(pid, r) in &requests {
            self.guard.requested(pid, r.start, r.nr_pages);
        }
        info!(
            missing_pages = missing.values().flatten().map(|r| r.nr_pages).sum::<u64>(),
            open_requests = requests.len(),
            "link to the source replaced"
        );
        self.send(Outbound::Resumed {
            serial,
            missing,
            requests,
        });
    }

    fn add_task(&mut self, pid: i32, uffd: OwnedFd, lazy: &[PageRange], host_pid: Option<i32>) {
        // SAFETY: we own `uffd`; Uffd takes over closing it.
        let uffd = unsafe { Uffd::from_raw_fd(uffd.into_raw_fd()) };
        if let Err(e) = set_nonblocking(&uffd) {
            warn!(pid, "cannot make the uffd non-blocking: {e}");
        }
        let owner = match host_pid.map(Process::open) {
            Some(Ok(p)) => Owner::Own(p),
            Some(Err(e)) => {
                warn!(
                    pid,
                    ?host_pid,
                    "cannot pin the process with a pidfd, it cannot be killed: {e}"
                );
                Owner::Unknown
            }
            None => Owner::Unknown,
        };
        let mem = match u32::try_from(pid)
            .ok()
            .filter(|p| *p > 0)
            .map(|p| TaskMemory::new(p, lazy))
        {
            Some(Ok(mem)) => mem.with_readahead(self.config.readahead_pages),
            Some(Err(e)) => {
                self.error(format!("task {pid}: {e}; its lazy memory cannot be served"));
                self.broken.push((pid as u32, uffd, owner));
                return;
            }
            None => {
                self.error(format!(
                    "task pid {pid} is not a valid pid; its uffd is kept but not served"
                ));
                self.broken.push((0, uffd, owner));
                return;
            }
        };
        let pid = mem.pid();
        info!(pid, lazy_pages = mem.pending_pages(), "serving task");
        self.known_pids.insert(pid);
        self.guard.add_task(pid, lazy);
        self.add_view(uffd, mem, owner);
        for msg in self.stash.remove(&pid).unwrap_or_default() {
            self.handle(msg);
        }
    }

    fn add_view(&mut self, uffd: Uffd, mem: TaskMemory, owner: Owner) -> u64 {
        let id = self.next_id;
        self.next_id += 1;
        if let Err(e) = self
            .epoll
            .add(uffd.as_fd(), EpollEvent::new(EpollFlags::EPOLLIN, id))
        {
            self.error(format!("cannot poll the uffd of pid {}: {e}", mem.pid()));
        }
        self.stats.tasks.fetch_add(1, Relaxed);
        self.views.insert(id, View { uffd, mem, owner });
        id
    }

    /// The process behind view `id` is gone: its memory no longer exists, so closing is safe.
    fn drop_view(&mut self, id: u64, why: &str) {
        let Some(view) = self.views.remove(&id) else {
            return;
        };
        let _ = self.epoll.delete(view.uffd.as_fd());
        self.waiting.retain(|(v, _), _| *v != id);
        self.stats.tasks.fetch_sub(1, Relaxed);
        let pid = view.mem.pid();
        debug!(
            pid,
            missing = view.mem.pending_pages() + view.mem.in_flight_pages(),
            "{why}"
        );
        if !self.views.values().any(|v| v.mem.pid() == pid) {
            info!(pid, "task gone: {why}");
            self.send(Outbound::TaskGone { pid: pid as i32 });
        }
    }

    /// Reads every queued event of view `id`.
    fn read_events(&mut self, id: u64) {
        let mut buf = std::mem::replace(&mut self.evbuf, EventBuffer::new(0));
        while let Some(view) = self.views.get(&id) {
            let events: Vec<_> = match view.uffd.read_events(&mut buf) {
                Ok(evs) => evs.collect(),
                Err(e) => {
                    let pid = view.mem.pid();
                    let _ = self.epoll.delete(view.uffd.as_fd());
                    self.error(format!(
                        "cannot read the uffd of pid {pid}: {e}; it is no longer served"
                    ));
                    break;
                }
            };
            if events.is_empty() {
                break;
            }
            let now = Instant::now();
            for ev in events {
                match ev {
                    Ok(ev) => self.on_event(id, ev, now),
                    Err(e) => warn!("unreadable uffd event: {e}"),
                }
            }
        }
        self.evbuf = buf;
    }

    fn on_event(&mut self, id: u64, ev: Event, now: Instant) {
        let Some(view) = self.views.get_mut(&id) else {
            return;
        };
        let dropped_before = view.mem.counters().pages_dropped;
        match ev {
            Event::Pagefault { addr, .. } => {
                self.stats.faults.fetch_add(1, Relaxed);
                self.fault(id, addr as u64, now);
            }
            Event::Fork { uffd } => {
                if let Err(e) = set_nonblocking(&uffd) {
                    warn!("cannot make a fork child's uffd non-blocking: {e}");
                }
                let (mem, owner) = (view.mem.fork_child(), view.owner.for_child());
                debug!(pid = mem.pid(), missing = mem.pending_pages(), "fork child");
                self.add_view(uffd, mem, owner);
            }
            Event::Remap { from, to, len } => view.mem.on_remap(from as u64, to as u64, len as u64),
            Event::Remove { start, end } => {
                let (start, end) = (start as u64, end as u64);
                let res =
                    ioctl::unregister(view.uffd.as_raw_fd(), start, end.saturating_sub(start));
                view.mem.on_remove(start, end);
                self.settle_dropped(id, dropped_before);
                match res {
                    Ok(()) => {}
                    Err(Errno::ENOMEM) => self.drop_view(id, "exited (unregister: ENOMEM)"),
                    Err(e) => warn!(start, end, "UFFDIO_UNREGISTER after madvise failed: {e}"),
                }
                return;
            }
            Event::Unmap { start, end } => view.mem.on_unmap(start as u64, end as u64),
        }
        self.settle_dropped(id, dropped_before);
    }

    /// Accounts pages dropped by an event and forgets waiters on them.
    fn settle_dropped(&mut self, id: u64, before: u64) {
        let Some(view) = self.views.get(&id) else {
            return;
        };
        let dropped = view.mem.counters().pages_dropped - before;
        if dropped > 0 {
            self.stats.pages_dropped.fetch_add(dropped, Relaxed);
            let mem = &view.mem;
            self.waiting.retain(|(v, img), _| {
                *v != id || mem.state_of(*img) == crate::dst::regions::PageState::InFlight
            });
        }
    }

    fn fault(&mut self, id: u64, addr: u64, at: Instant) {
        let Some(view) = self.views.get_mut(&id) else {
            return;
        };
        let pid = view.mem.pid();
        match view.mem.on_fault(addr) {
            FaultAction::Zero => {
                match ioctl::zeropage(view.uffd.as_raw_fd(), page_floor(addr), 1) {
                    Ok(Fill::Done) => {
                        self.stats.zero_pages.fetch_add(1, Relaxed);
                    }
                    Ok(Fill::Exists | Fill::NotRegistered) => {}
                    Ok(Fill::Again | Fill::Partial { .. }) => self.deferred.push((id, addr, at)),
                    Ok(Fill::Gone) => self.drop_view(id, "exited (zeropage: ESRCH)"),
                    Err(e) => self.error(format!(
                        "UFFDIO_ZEROPAGE at {addr:#x} of pid {pid} failed: {e}"
                    )),
                }
            }
            FaultAction::AlreadyRequested { img_vaddr } => {
                self.waiting.entry((id, img_vaddr)).or_default().push(at);
            }
            FaultAction::Request {
                img_vaddr,
                nr_pages,
            } => {
                self.waiting.entry((id, img_vaddr)).or_default().push(at);
                self.stats.requests.fetch_add(1, Relaxed);
                self.stats.pages_requested.fetch_add(nr_pages, Relaxed);
                self.guard.requested(pid, img_vaddr, nr_pages);
                // nr_pages <= 1 + readahead, far below u32::MAX for any sane config.
                let nr_pages = u32::try_from(nr_pages).unwrap_or(u32::MAX);
                self.send(Outbound::Fault {
                    pid,
                    img_vaddr,
                    nr_pages,
                });
            }
        }
    }

    /// Zero-page answers refused with EAGAIN: read the events first, then decide again (an
    /// mremap may have moved lazy memory to that address).
    fn retry_deferred(&mut self) {
        for (id, addr, at) in std::mem::take(&mut self.deferred) {
            self.read_events(id);
            self.fault(id, addr, at);
        }
    }

    fn check_complete(&mut self) {
        if self.complete_sent || !self.restore_finished || !self.broken.is_empty() {
            return;
        }
        if self.views.values().all(|v| v.mem.is_complete()) {
            self.complete_sent = true;
            info!(stats = ?self.stats.counters(), "every task's lazy memory is in place");
            self.send(Outbound::Complete);
        }
    }

    fn send(&mut self, msg: Outbound) {
        if self.out.send(msg).is_err() && !self.out_closed {
            self.out_closed = true;
            warn!("nobody listens to the fault thread any more: faults cannot be requested");
        }
    }

    fn error(&mut self, msg: String) {
        error!("{msg}");
        self.send(Outbound::Error(msg));
    }
}

/// Sorted, overlapping or touching ranges joined.
fn merge_ranges(mut ranges: Vec<PageRange>) -> Vec<PageRange> {
    ranges.sort();
    let mut out: Vec<PageRange> = Vec::with_capacity(ranges.len());
    for r in ranges {
        match out.last_mut() {
            Some(last) if r.start <= last.end() => {
                let end = last.end().max(r.end());
                last.nr_pages = (end - last.start) / PAGE_SIZE;
            }
            _ => out.push(r),
        }
    }
    out
}

fn msg_bytes(msg: &Inbound) -> u64 {
    match msg {
        Inbound::Pages { data, .. } => data.len() as u64,
        _ => 0,
    }
}
