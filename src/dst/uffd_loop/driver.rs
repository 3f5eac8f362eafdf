//! The fault loop's IO: epoll over the uffds and a wake-up eventfd, the inbound channels, and
//! the real [`Kernel`] the [`Engine`] drives. One round: read the uffds that are ready, retry
//! what the kernel refused, take control messages and fault answers, then a bounded amount of
//! background pages. Rounds run as a task on the fault lane, which yields between them and,
//! when there is nothing to do, waits for the epoll instance to become readable in the lane's
//! reactor. Every decision is the core's.

use std::collections::{BTreeMap, VecDeque};
use std::os::fd::{AsFd, AsRawFd, FromRawFd, IntoRawFd};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::io::Interest;
use tokio::io::unix::AsyncFd;

use crossbeam_channel::{Receiver, RecvTimeoutError, TryRecvError};
use nix::errno::Errno;
use nix::fcntl::{FcntlArg, OFlag, fcntl};
use nix::sys::epoll::{Epoll, EpollCreateFlags, EpollEvent, EpollFlags, EpollTimeout};
use nix::sys::eventfd::EventFd;
use tracing::{error, info, warn};
use userfaultfd::{Event, EventBuffer, Uffd};

use super::engine::{Arrived, Engine, Input};
use super::ioctl::{self, Fill};
use super::kernel::{Kernel, Owner, UffdEvent, ViewId};
use super::kill::{self, KillTarget, Process};
use super::{Inbound, LoopConfig, Outbound, OutboundSink, ShutdownReport, UffdStats};
use crate::pages::PAGE_SIZE;

const WAKE_TOKEN: u64 = u64::MAX;
/// Background bytes placed per round before the uffds and the urgent queue are looked at again.
/// One UFFDIO_COPY of a whole 4 MiB push batch takes ~1.1 ms here, and a fault read or answered
/// behind it waits that long; background batches are therefore placed in pieces of this size
/// (~70 us each), with a new round (epoll, fault answers) between pieces.
const BULK_BUDGET: u64 = 256 << 10;
/// And at most this long: where placing a page costs ~16 us (memory the host backs on first
/// touch, see `piece_size`), 256 KiB would hold a fault ~1 ms.
const BULK_ROUND_TIME: Duration = Duration::from_micros(150);
/// Control messages and fault answers handled per round.
const URGENT_BUDGET: usize = 256;

/// One uffd and whom to kill if its memory is incomplete at shutdown.
struct WatchedUffd {
    uffd: Uffd,
    target: KillTarget,
}

/// The real kernel: the uffds by view, and the epoll instance that watches them.
struct UffdKernel {
    epoll: Epoll,
    evbuf: EventBuffer,
    uffds: BTreeMap<ViewId, WatchedUffd>,
    fork_holder: Option<Arc<dyn super::ForkHolder>>,
}

fn set_nonblocking(fd: &impl AsFd) -> nix::Result<()> {
    let flags = OFlag::from_bits_retain(fcntl(fd, FcntlArg::F_GETFL)?);
    fcntl(fd, FcntlArg::F_SETFL(flags | OFlag::O_NONBLOCK)).map(|_| ())
}

impl UffdKernel {
    fn fd(&self, id: ViewId) -> Result<i32, Errno> {
        // A view the core knows always has its uffd here; EBADF only if that broke.
        self.uffds
            .get(&id)
            .map(|h| h.uffd.as_raw_fd())
            .ok_or(Errno::EBADF)
    }
}

impl Kernel for UffdKernel {
    type Uffd = Uffd;

    fn now(&self) -> Instant {
        Instant::now()
    }

    fn attach(&mut self, id: ViewId, uffd: Uffd, owner: Owner, poll: bool) -> Result<(), String> {
        if let Err(e) = set_nonblocking(&uffd) {
            warn!(view = id, "cannot make the uffd non-blocking: {e}");
        }
        let target = match owner {
            Owner::Host(Some(pid)) => match Process::open(pid) {
                Ok(p) => KillTarget::Own(p),
                Err(e) => {
                    warn!(
                        host_pid = pid,
                        "cannot pin the process with a pidfd, it cannot be killed: {e}"
                    );
                    KillTarget::Unknown
                }
            },
            Owner::Host(None) => KillTarget::Unknown,
            Owner::DescendantOf(root) => KillTarget::DescendantOf(root),
            // Its uffd went to the keeper as the fork event was read (`read_events`).
            Owner::ChildOf(parent) => self
                .uffds
                .get(&parent)
                .map_or(KillTarget::Unknown, |h| h.target.for_child()),
        };
        let res = if poll {
            self.epoll
                .add(uffd.as_fd(), EpollEvent::new(EpollFlags::EPOLLIN, id))
                .map_err(|e| e.to_string())
        } else {
            Ok(())
        };
        self.uffds.insert(id, WatchedUffd { uffd, target });
        res
    }

    fn unwatch(&mut self, id: ViewId) {
        if let Some(h) = self.uffds.get(&id) {
            let _ = self.epoll.delete(h.uffd.as_fd());
        }
    }

    fn close(&mut self, id: ViewId) {
        if let Some(h) = self.uffds.remove(&id) {
            let _ = self.epoll.delete(h.uffd.as_fd());
        }
    }

    fn read_events(&mut self, id: ViewId) -> Result<Vec<UffdEvent<Uffd>>, String> {
        let Some(h) = self.uffds.get(&id) else {
            return Ok(Vec::new());
        };
        let root = match h.target.for_child() {
            KillTarget::DescendantOf(root) => Some(root),
            _ => None,
        };
        // Marked before the read: a fork child's uffd lands in this process's table inside
        // read(2), and until the keeper has it only the table guard can save it.
        let holder = self.fork_holder.as_deref();
        if let Some(holder) = holder {
            holder.reading(root);
        }
        let out = h
            .uffd
            .read_events(&mut self.evbuf)
            .map(|events| convert(holder, id, root, events))
            .map_err(|e| e.to_string());
        if let Some(holder) = holder {
            holder.read_done();
        }
        out
    }

    fn copy(&mut self, id: ViewId, addr: u64, data: &[u8]) -> Result<Fill, Errno> {
        ioctl::copy(self.fd(id)?, addr, data)
    }

    fn zeropage(&mut self, id: ViewId, addr: u64, pages: u64) -> Result<Fill, Errno> {
        ioctl::zeropage(self.fd(id)?, addr, pages)
    }

    fn unregister(&mut self, id: ViewId, start: u64, len: u64) -> Result<(), Errno> {
        ioctl::unregister(self.fd(id)?, start, len)
    }
}

/// The events of one read as the core sees them; each fork child's uffd is handed to the keeper
/// first (from here on a dying dst cannot zero-fill the child).
fn convert(
    holder: Option<&dyn super::ForkHolder>,
    id: ViewId,
    root: Option<i32>,
    events: impl Iterator<Item = userfaultfd::Result<Event>>,
) -> Vec<UffdEvent<Uffd>> {
    let mut out = Vec::new();
    for ev in events {
        match ev {
            Ok(Event::Pagefault { addr, .. }) => out.push(UffdEvent::Fault { addr: addr as u64 }),
            Ok(Event::Fork { uffd }) => {
                lab_fork_handover_pause();
                match (holder, root) {
                    (Some(holder), Some(root)) => {
                        if let Err(e) = holder.hold_child(root, uffd.as_fd()) {
                            warn!(
                                view = id,
                                "cannot hand a fork child's uffd to the keeper: {e}"
                            );
                        }
                    }
                    (Some(_), None) => warn!(
                        view = id,
                        "a fork child of a task with no known host pid: the keeper cannot \
                             hold it"
                    ),
                    (None, _) => {}
                }
                out.push(UffdEvent::Fork { uffd })
            }
            Ok(Event::Remap { from, to, len }) => out.push(UffdEvent::Remap {
                from: from as u64,
                to: to as u64,
                len: len as u64,
            }),
            Ok(Event::Remove { start, end }) => out.push(UffdEvent::Remove {
                start: start as u64,
                end: end as u64,
            }),
            Ok(Event::Unmap { start, end }) => out.push(UffdEvent::Unmap {
                start: start as u64,
                end: end as u64,
            }),
            Err(e) => warn!("unreadable uffd event: {e}"),
        }
    }
    out
}

/// A test's hook (only with `pageserv::child::LAB_ENV` set): for each fork event read, wait
/// `PAGESERV_LAB_FORK_HANDOVER_PAUSE_MS` before the child's uffd goes to the keeper, so a test
/// can kill dst inside that window on purpose.
fn lab_fork_handover_pause() {
    static PAUSE: std::sync::OnceLock<Option<Duration>> = std::sync::OnceLock::new();
    let pause = PAUSE.get_or_init(|| {
        if !crate::child::started_by_lab() {
            return None;
        }
        let ms = std::env::var(FORK_HANDOVER_PAUSE_ENV).ok()?.parse().ok()?;
        Some(Duration::from_millis(ms))
    });
    if let Some(pause) = pause {
        std::thread::sleep(*pause);
    }
}

/// See [`lab_fork_handover_pause`].
pub const FORK_HANDOVER_PAUSE_ENV: &str = "PAGESERV_LAB_FORK_HANDOVER_PAUSE_MS";

/// The fault loop's inbound queues.
pub(super) struct Queues {
    pub(super) urgent: Receiver<Inbound>,
    pub(super) bulk: Receiver<Inbound>,
    /// Notified after each message taken off `bulk` (see `LoopSender::send_async`).
    pub(super) room: Arc<tokio::sync::Notify>,
}

/// The fault loop: the core, the real kernel and the channels.
pub(super) struct Driver {
    engine: Engine,
    kernel: UffdKernel,
    config: LoopConfig,
    stats: Arc<UffdStats>,
    out: Box<dyn OutboundSink>,
    out_closed: bool,
    urgent: Receiver<Inbound>,
    bulk: Receiver<Inbound>,
    /// The rest of an [`Inbound::Arrivals`] taken off `bulk`, one arrival per message, handled
    /// before the next message of `bulk`.
    unpacked: VecDeque<Inbound>,
    room: Arc<tokio::sync::Notify>,
    wake: Arc<EventFd>,
}

/// What a round leaves to do.
enum Step {
    /// More work is queued or a uffd was ready: another round after the lane's other tasks.
    Again,
    /// Nothing to do: wait for a uffd or the eventfd, at most this long (none: no limit).
    Wait(Option<Duration>),
    Shutdown {
        kill_incomplete: bool,
    },
    /// The uffds cannot be polled: keep them open until told what to do.
    Fatal,
}

/// Runs `f` on the lane's blocking pool: a shutdown may wait seconds for killed processes.
async fn blocking(f: impl FnOnce() -> ShutdownReport + Send + 'static) -> ShutdownReport {
    match tokio::task::spawn_blocking(f).await {
        Ok(report) => report,
        Err(e) => {
            error!("the fault loop's shutdown did not finish: {e}");
            ShutdownReport::default()
        }
    }
}

/// What one inbound message asks of the driver.
enum Next {
    Go,
    Shutdown { kill_incomplete: bool },
}

impl Driver {
    pub(super) fn new(
        config: LoopConfig,
        out: Box<dyn OutboundSink>,
        stats: Arc<UffdStats>,
        Queues { urgent, bulk, room }: Queues,
        wake: Arc<EventFd>,
    ) -> nix::Result<Self> {
        let epoll = Epoll::new(EpollCreateFlags::EPOLL_CLOEXEC)?;
        epoll.add(
            wake.as_fd(),
            EpollEvent::new(EpollFlags::EPOLLIN, WAKE_TOKEN),
        )?;
        Ok(Self {
            engine: Engine::new(config.clone(), stats.clone()),
            kernel: UffdKernel {
                epoll,
                evbuf: EventBuffer::new(64),
                uffds: BTreeMap::new(),
                fork_holder: config.fork_holder.clone(),
            },
            config,
            stats,
            out,
            out_closed: false,
            urgent,
            bulk,
            unpacked: VecDeque::new(),
            room,
            wake,
        })
    }

    /// Runs the loop on the fault lane until a shutdown: rounds while there is work, yielding
    /// to the lane's other tasks (the fault connection, its reader and writer) between rounds,
    /// and waits on the epoll instance (which watches the uffds and the wake eventfd) when idle.
    /// What may block for long (a shutdown's kills and waits) runs on a blocking thread.
    pub(super) async fn run(mut self) -> ShutdownReport {
        // The lane's reactor watches a duplicate of the epoll descriptor, which it owns.
        let watched = self.kernel.epoll.0.try_clone().and_then(|fd| {
            // SAFETY: `fd` is an open descriptor the AsyncFd owns, so it stays open and the same
            // for the AsyncFd's whole life.
            unsafe { AsyncFd::register_with_interest(fd, Interest::READABLE) }
                .map_err(std::io::Error::other)
        });
        let watched = match watched {
            Ok(w) => w,
            Err(e) => {
                self.engine.error(format!(
                    "the fault loop cannot watch its uffds on the fault lane: {e}"
                ));
                return blocking(move || self.wait_for_shutdown()).await;
            }
        };
        let mut ready = vec![EpollEvent::empty(); 64];
        loop {
            let wait = match self.round(&mut ready) {
                Step::Again => {
                    tokio::task::yield_now().await;
                    continue;
                }
                Step::Wait(wait) => wait,
                Step::Shutdown { kill_incomplete } => {
                    drop(watched);
                    return blocking(move || self.shutdown(kill_incomplete)).await;
                }
                Step::Fatal => {
                    drop(watched);
                    return blocking(move || self.wait_for_shutdown()).await;
                }
            };
            // The epoll instance is readable once any uffd or the eventfd is: tokio's
            // registration is edge-triggered, and each event queued on the instance is an
            // edge. Readiness is cleared before the next round's epoll_wait, so an event after
            // that wait wakes the next one.
            let readable = watched.readable();
            let guard = match wait {
                Some(t) => tokio::time::timeout(t, readable).await.ok(),
                None => Some(readable.await),
            };
            match guard {
                Some(Ok(mut g)) => g.clear_ready(),
                Some(Err(e)) => {
                    self.engine.error(format!(
                        "the fault loop cannot wait on its uffds on the fault lane: {e}"
                    ));
                    drop(watched);
                    return blocking(move || self.wait_for_shutdown()).await;
                }
                None => {}
            }
        }
    }

    /// One round: read the uffds that are ready, retry what the kernel refused, take control
    /// messages and fault answers, then a bounded amount of background pages. Never blocks.
    fn round(&mut self, ready: &mut [EpollEvent]) -> Step {
        let n = match self.kernel.epoll.wait(ready, EpollTimeout::ZERO) {
            Ok(n) => n,
            Err(Errno::EINTR) => 0,
            Err(e) => {
                self.engine.error(format!(
                    "the fault loop cannot poll its uffds: epoll_wait: {e}"
                ));
                return Step::Fatal;
            }
        };
        for ev in &ready[..n] {
            match ev.data() {
                WAKE_TOKEN => {
                    let _ = self.wake.read();
                }
                id => {
                    self.engine.read_events(&mut self.kernel, id);
                    self.flush();
                }
            }
        }
        self.engine.retry(&mut self.kernel);
        self.flush();
        let mut took_urgent = false;
        for _ in 0..URGENT_BUDGET {
            let Ok(msg) = self.urgent.try_recv() else {
                break;
            };
            took_urgent = true;
            if let Next::Shutdown { kill_incomplete } = self.handle(msg) {
                return Step::Shutdown { kill_incomplete };
            }
        }
        if took_urgent {
            self.room.notify_waiters();
        }
        let mut budget = BULK_BUDGET;
        let round = Instant::now();
        while budget > 0 && round.elapsed() < BULK_ROUND_TIME {
            // A message's pieces go before the next message: Shutdown and Resume stay behind
            // every page queued before them.
            if let Some(bytes) = self.engine.place_next_piece(&mut self.kernel) {
                self.flush();
                budget = budget.saturating_sub(bytes.max(PAGE_SIZE));
                continue;
            }
            if let Some(msg) = self.unpacked.pop_front() {
                budget = budget.saturating_sub(msg_bytes(&msg).max(PAGE_SIZE));
                if let Next::Shutdown { kill_incomplete } = self.handle(msg) {
                    return Step::Shutdown { kill_incomplete };
                }
                continue;
            }
            match self.bulk.try_recv() {
                Ok(msg) => {
                    self.room.notify_waiters();
                    budget = budget.saturating_sub(msg_bytes(&msg).max(PAGE_SIZE));
                    if let Next::Shutdown { kill_incomplete } = self.handle(msg) {
                        return Step::Shutdown { kill_incomplete };
                    }
                }
                Err(TryRecvError::Empty) => break,
                Err(TryRecvError::Disconnected) => {
                    if self.urgent.is_empty() {
                        error!("every sender to the fault loop is gone without a Shutdown");
                        return Step::Shutdown {
                            kill_incomplete: true,
                        };
                    }
                    break;
                }
            }
        }
        self.engine.check_complete();
        self.flush();
        // A ready uffd is reported again only by the next epoll_wait (level-triggered inside),
        // not as a new edge to the lane: a round that saw events is followed by another.
        if n > 0
            || !self.urgent.is_empty()
            || !self.bulk.is_empty()
            || !self.unpacked.is_empty()
            || self.engine.has_pieces()
        {
            Step::Again
        } else if self.engine.wants_retry() {
            // Refused copies are retried every millisecond: the event that blocks them is
            // usually readable by then.
            Step::Wait(Some(Duration::from_millis(1)))
        } else {
            Step::Wait(None)
        }
    }

    /// Hands one message to the core.
    fn handle(&mut self, msg: Inbound) -> Next {
        let input = match msg {
            Inbound::Task {
                pid,
                uffd,
                lazy,
                host_pid,
            } => Input::Task {
                pid,
                // SAFETY: we own `uffd`; Uffd takes over closing it.
                uffd: unsafe { Uffd::from_raw_fd(uffd.into_raw_fd()) },
                lazy,
                host_pid,
            },
            Inbound::Zombie { pid } => Input::Zombie { pid },
            Inbound::Child {
                pid,
                uffd,
                lazy,
                root_host_pid,
            } => Input::Child {
                pid,
                // SAFETY: we own `uffd`; Uffd takes over closing it.
                uffd: unsafe { Uffd::from_raw_fd(uffd.into_raw_fd()) },
                lazy,
                root_host_pid,
            },
            Inbound::Pages {
                at,
                data,
                urgent,
                link,
            } => Input::Arrived(Arrived {
                at,
                data: Some(data),
                urgent,
                link,
            }),
            Inbound::Zero { at, urgent, link } => Input::Arrived(Arrived {
                at,
                data: None,
                urgent,
                link,
            }),
            // Unpacked, to be handled one arrival per message before the next bulk message.
            Inbound::Arrivals { runs, link } => {
                let arrivals = runs
                    .into_iter()
                    .map(|(at, data)| Inbound::arrived(at, data, false, link));
                self.unpacked.extend(arrivals);
                return Next::Go;
            }
            Inbound::RestoreFinished => Input::RestoreFinished,
            Inbound::Resume { serial } => {
                // Fault answers of the old link still queued go first: after the reset they
                // would answer requests that only the new link may answer.
                while let Ok(msg) = self.urgent.try_recv() {
                    if let Next::Shutdown { .. } = self.handle(msg) {
                        warn!("a shutdown on the urgent queue during a resume is ignored");
                    }
                }
                // A sender on the lane may wait for room in the queue just emptied.
                self.room.notify_waiters();
                Input::Resume { serial }
            }
            Inbound::Shutdown { kill_incomplete } => return Next::Shutdown { kill_incomplete },
        };
        self.engine.handle(&mut self.kernel, input);
        self.flush();
        Next::Go
    }

    /// Sends what the core produced to the service. A fault request's pages already held here
    /// ([`LoopConfig::held`]) answer it at once, on this thread; only the rest is sent.
    fn flush(&mut self) {
        loop {
            let out = self.engine.take_output();
            if out.is_empty() {
                return;
            }
            let mut found = Vec::new();
            for msg in out {
                match (msg, &self.config.held) {
                    (Outbound::Fault(r), Some(held)) => {
                        let answer = held.take(self.engine.link(), r);
                        found.extend(answer.found);
                        for r in answer.rest {
                            self.deliver(Outbound::Fault(r));
                        }
                    }
                    (msg, _) => self.deliver(msg),
                }
            }
            // Placing may raise more output (completion, further requests): loop until none.
            let link = self.engine.link();
            for (at, data) in found {
                let arrived = Arrived {
                    at,
                    data,
                    urgent: true,
                    link,
                };
                self.engine
                    .handle(&mut self.kernel, Input::Arrived(arrived));
            }
        }
    }

    fn deliver(&mut self, msg: Outbound) {
        if !self.out.deliver(msg) && !self.out_closed {
            self.out_closed = true;
            warn!("nobody listens to the fault loop any more: faults cannot be requested");
        }
    }

    /// After a fatal error: keep every uffd open until told what to do.
    fn wait_for_shutdown(mut self) -> ShutdownReport {
        self.flush();
        loop {
            let msg = match self.urgent.try_recv() {
                Ok(m) => {
                    self.room.notify_waiters();
                    m
                }
                Err(_) => match self.bulk.recv_timeout(Duration::from_millis(50)) {
                    Ok(m) => {
                        self.room.notify_waiters();
                        m
                    }
                    Err(RecvTimeoutError::Timeout) => continue,
                    Err(RecvTimeoutError::Disconnected) => return self.shutdown(true),
                },
            };
            match msg {
                Inbound::Shutdown { kill_incomplete } => return self.shutdown(kill_incomplete),
                Inbound::Task {
                    pid,
                    uffd,
                    host_pid,
                    ..
                } => {
                    // SAFETY: we own `uffd`.
                    let uffd = unsafe { Uffd::from_raw_fd(uffd.into_raw_fd()) };
                    self.engine
                        .keep_broken(&mut self.kernel, pid, uffd, Owner::Host(host_pid));
                }
                Inbound::Child {
                    pid,
                    uffd,
                    root_host_pid,
                    ..
                } => {
                    // SAFETY: we own `uffd`.
                    let uffd = unsafe { Uffd::from_raw_fd(uffd.into_raw_fd()) };
                    let owner = Owner::DescendantOf(root_host_pid);
                    self.engine.keep_broken(&mut self.kernel, pid, uffd, owner);
                }
                _ => {}
            }
        }
    }

    /// Kills incomplete processes if asked, then closes every uffd.
    fn shutdown(mut self, kill_incomplete: bool) -> ShutdownReport {
        // Pages the kernel refused a moment ago were sent before the Shutdown: place them first.
        let deadline = Instant::now() + Duration::from_secs(5);
        while self.engine.wants_retry() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(1));
            self.engine.retry(&mut self.kernel);
        }
        self.flush();
        let mut report = ShutdownReport::default();
        let incomplete: Vec<(u32, &KillTarget)> = self
            .engine
            .incomplete()
            .into_iter()
            .filter_map(|(pid, id)| self.kernel.uffds.get(&id).map(|h| (pid, &h.target)))
            .collect();
        report.incomplete = incomplete.iter().map(|(pid, _)| *pid).collect();
        if kill_incomplete && !incomplete.is_empty() {
            kill::kill_all(&incomplete, self.config.kill_wait, &mut report);
        } else if !incomplete.is_empty() {
            warn!(
                pids = ?report.incomplete,
                "shutting down with lazy memory missing: those pages will read as zeros"
            );
        }
        info!(stats = ?self.stats.counters(), ?report, "fault loop done");
        // Only now do the uffds close.
        drop(self.kernel);
        report
    }
}

fn msg_bytes(msg: &Inbound) -> u64 {
    match msg {
        Inbound::Pages { data, .. } => data.len() as u64,
        _ => 0,
    }
}
