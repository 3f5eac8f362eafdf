//! The fault loop: owns every userfaultfd of the restored tree and is the only code that touches
//! them. It runs as one task on the fault lane ([`crate::fault_lane`]), the thread that also
//! drives the fault connection, reads the source's fault answers and writes dst's requests, so a
//! fault's request and its answer cross no thread: the loop raises the request, the lane's writer
//! sends it, the lane's reader queues the answer and the loop places it, all on one thread (two
//! cross-thread wakeups fewer per fault than with a thread of its own; session 31 measured ~40%
//! less of dst's CPU per fault and ~1.9x the faults served per second). Its decisions are a
//! sans-IO core (`engine.rs`, property-tested against a simulated kernel); `driver.rs` does the
//! IO around it: epoll over the uffds and an eventfd, that epoll instance watched by the lane's
//! reactor; everything else talks to it through channels.
//!
//! On the lane the loop never blocks: a round reads the uffds that are ready, takes fault answers
//! and control, places background pages for at most 256 KiB or 150 us, and yields to the lane's
//! other tasks before the next. A sender on the lane that finds a queue full waits as a task
//! ([`LoopSender::send_async`]), never blocking the thread the loop needs. A shutdown (kills,
//! waits of seconds) runs on the lane's blocking pool.
//!
//! Inbound: tasks (a uffd and its lazy ranges) as the restore hands them over, pages from the
//! source, and control. Outbound: page requests for faults, task exits, completion, errors.
//!
//! Two rules shape it (criu-protocols.md §2.6, §2.9): uffds are read promptly, because the
//! kernel blocks a process on fork/mremap/madvise/munmap until its event is read; and no uffd of
//! a live process is closed before [`Inbound::Shutdown`], because closing it turns every missing
//! page into a silent zero page.

mod driver;
mod engine;
mod ioctl;
mod kernel;
pub mod kill;
mod piece_size;
mod place;

pub use driver::FORK_HANDOVER_PAUSE_ENV;

use std::os::fd::OwnedFd;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::Duration;

use crossbeam_channel::{Receiver, Sender};
use nix::sys::eventfd::{EfdFlags, EventFd};

use crate::latency::LatencyHistogram;
use crate::pages::{PageRange, PidRange};

/// Background page messages queued for the fault loop (each at most 4 MiB).
const BULK_QUEUE: usize = 8;

/// Messages to the fault loop.
#[derive(Debug)]
pub enum Inbound {
    /// A restored process's uffd (from lazy-pages.socket) and its lazy ranges in image addresses,
    /// split at VMA ends. `host_pid` is the process as this host sees it (the sender's
    /// SCM_CREDENTIALS), needed only to kill it on an incomplete shutdown.
    Task {
        pid: i32,
        uffd: OwnedFd,
        lazy: Vec<PageRange>,
        host_pid: Option<i32>,
    },
    /// A zombie: no memory, nothing to serve.
    Zombie { pid: i32 },
    /// A fork child's uffd adopted from a dead dst's keeper (dst::adopt): image pid `pid` (its
    /// restored ancestor's), the lazy ranges it still lacks, and that ancestor's host pid (its
    /// own is unknown: an incomplete shutdown kills the ancestor's descendants).
    Child {
        pid: i32,
        uffd: OwnedFd,
        lazy: Vec<PageRange>,
        root_host_pid: i32,
    },
    /// Page data for the image pages `at`, `at.nr_pages() * PAGE_SIZE` bytes. `urgent` marks a
    /// fault's answer: it skips ahead of queued background pushes. `link`: the link generation
    /// that delivered it (0, then the serial of each [`Inbound::Resume`]); pages of a replaced
    /// link are dropped.
    Pages {
        at: PidRange,
        data: bytes::Bytes,
        urgent: bool,
        link: u64,
    },
    /// These image pages are zero (they never cross the network as data). `urgent` and `link`
    /// as for `Pages`.
    Zero {
        at: PidRange,
        urgent: bool,
        link: u64,
    },
    /// Several background arrivals (page data, or `None` for a zero run) of link `link` in one
    /// message, handled as that many `Pages`/`Zero` messages in order: one queue slot and one
    /// wakeup of the fault loop for what one read of the push stream delivered (a frame of
    /// data and the zero run after it, say), instead of one per run.
    Arrivals {
        runs: Vec<(PidRange, Option<bytes::Bytes>)>,
        link: u64,
    },
    /// Every task is restored (the restore sent 0x52535446): completion can now be judged.
    RestoreFinished,
    /// The link to the source was re-established as generation `serial`: from here on only
    /// pages of that link are placed. Answered with [`Outbound::Resumed`]; fault requests sent
    /// before it are void (the answer lists every request still open).
    Resume { serial: u64 },
    /// Stop after everything sent before this. With `kill_incomplete`, processes whose lazy
    /// memory is not all in place are SIGKILLed (and reaped or 5 s passed) before their uffds
    /// close, so none of them ever reads a zero page instead of its data.
    Shutdown { kill_incomplete: bool },
}

impl Inbound {
    /// Pages (`data`) or a zero run (`None`) from the source, as `Pages` or `Zero`.
    pub fn arrived(at: PidRange, data: Option<bytes::Bytes>, urgent: bool, link: u64) -> Self {
        match data {
            Some(data) => Inbound::Pages {
                at,
                data,
                urgent,
                link,
            },
            None => Inbound::Zero { at, urgent, link },
        }
    }
}

/// Messages from the fault loop.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outbound {
    /// A thread waits for these image pages; answer with `Inbound::Pages` (urgent) or
    /// `Inbound::Zero`.
    Fault(PidRange),
    /// Every process of image pid `pid` (including its fork children) exited: stop sending.
    TaskGone { pid: i32 },
    /// The restore finished and every task's lazy memory is in place. Sent once.
    Complete,
    /// Something failed that needs a decision (usually Shutdown{kill_incomplete: true}).
    Error(String),
    /// The answer to [`Inbound::Resume`]: per image pid of a task handed over so far, its lazy
    /// ranges not yet in place (merged over the pid's processes; empty if they all exited), and
    /// the fault requests still open, to send again on the new link.
    Resumed {
        serial: u64,
        missing: std::collections::BTreeMap<u32, Vec<PageRange>>,
        requests: Vec<PidRange>,
    },
}

/// Keeps a copy of each fork child's uffd outside the fault loop (dst::uffd_keeper), so a
/// dying dst cannot leave a child reading zeros where its pages are missing.
pub trait ForkHolder: Send + Sync + std::fmt::Debug {
    /// A process of the tree rooted at restored task `root_host_pid` forked; `uffd` serves the
    /// child's memory. Called as the fork event is read, before the child's faults are.
    fn hold_child(
        &self,
        root_host_pid: i32,
        uffd: std::os::fd::BorrowedFd<'_>,
    ) -> std::io::Result<()>;

    /// A read of a uffd starts; its fork children descend from restored task `root_host_pid`
    /// (none: not known). Until [`ForkHolder::read_done`], a fork child's uffd may be in this
    /// process and not yet held (dst::uffd_keeper::table_guard).
    fn reading(&self, _root_host_pid: Option<i32>) {}

    /// Every fork child's uffd from the read was passed to [`ForkHolder::hold_child`].
    fn read_done(&self) {}
}

/// Pages already at this host and not placed yet (dst: pushed frames read off the push stream,
/// confirmed pre-copied pages in the page store), which the fault loop takes for a fault itself
/// instead of asking the source: no thread hop, no round trip.
///
/// Called on the fault loop, so it may block only briefly (a lock, a pread of the page store),
/// never on the network. Each page is handed out at most once (to a fault here, or to the
/// placer), so a taken page is never also pushed.
pub trait HeldPages: Send + Sync + std::fmt::Debug {
    /// Takes the held pages of `r` that link `link` delivered (the fault loop's current link,
    /// so the answer is not dropped as another link's).
    fn take(&self, link: u64, r: PidRange) -> HeldAnswer;

    /// The pages of `at` are in place in every process of its pid (from any source: pushed,
    /// answered or taken here): a copy held for them is not needed again. Called on the fault
    /// loop for each such arrival, never for pages of a replaced link or a failed copy.
    fn placed(&self, _at: PidRange) {}
}

/// What [`HeldPages::take`] found for one request.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct HeldAnswer {
    /// Pages found here: their data, or `None` for a zero run.
    pub found: Vec<(PidRange, Option<bytes::Bytes>)>,
    /// The parts of the request not held here: still to ask the source for.
    pub rest: Vec<PidRange>,
}

/// Tuning of the fault loop.
#[derive(Debug, Clone)]
pub struct LoopConfig {
    /// Pending pages after a faulting page (same lazy range) requested along with it.
    pub readahead_pages: u64,
    /// Adaptive read-ahead for faults in address order (`dst::regions::streams`); off by default.
    pub sequential_readahead: bool,
    /// How long an incomplete shutdown waits for killed processes to die before closing uffds.
    pub kill_wait: Duration,
    /// The image pids of the dump (pstree.img), when known: a task the restore hands over with
    /// another pid is refused (it has no lazy ranges, so every fault would be zero-filled), and
    /// so is source data for another pid, at once rather than held until the restore finishes.
    pub image_pids: Option<std::collections::BTreeSet<u32>>,
    /// Where fork children's uffds are copied to as they appear (none: nowhere).
    pub fork_holder: Option<Arc<dyn ForkHolder>>,
    /// Pages already here that a fault takes before asking the source (none: always ask).
    pub held: Option<Arc<dyn HeldPages>>,
}

impl Default for LoopConfig {
    fn default() -> Self {
        Self {
            readahead_pages: 0,
            sequential_readahead: false,
            kill_wait: Duration::from_secs(5),
            image_pids: None,
            fork_holder: None,
            held: None,
        }
    }
}

/// Counters the fault loop updates; read them from anywhere.
#[derive(Debug, Default)]
pub struct UffdStats {
    /// Page-fault messages read.
    pub faults: AtomicU64,
    /// Requests sent for faults, and the pages they asked for (read-ahead included).
    pub requests: AtomicU64,
    pub pages_requested: AtomicU64,
    /// Pages copied that answered a request / that the source pushed.
    pub pages_copied_urgent: AtomicU64,
    pub pages_copied_pushed: AtomicU64,
    /// Faults outside the lazy set, answered with UFFDIO_ZEROPAGE.
    pub zero_pages: AtomicU64,
    /// Lazy pages the source found all-zero (`Inbound::Zero`), placed with UFFDIO_ZEROPAGE.
    pub lazy_zero_pages: AtomicU64,
    /// Lazy pages dropped (madvise, munmap, unregistered) and never copied.
    pub pages_dropped: AtomicU64,
    /// COPY/ZEROPAGE retried after EAGAIN.
    pub copy_retries: AtomicU64,
    /// Uffds being served (restored processes and fork children).
    pub tasks: AtomicU64,
    /// Fault read → its page copied, per faulting thread, in ns.
    pub fault_latency: LatencyHistogram,
    /// The same, for faults answered before the first background page was placed: the fault
    /// latency of an idle link, measured in the same migration.
    pub fault_latency_before_push: LatencyHistogram,
    /// The same, for faults answered after the first background page was placed: the fault
    /// latency while the push competes for the link.
    pub fault_latency_during_push: LatencyHistogram,
    /// The same, for faults that sent their own request to the source (a round trip).
    pub fault_latency_asked: LatencyHistogram,
    /// The same, for faults on a page another fault had already asked for (its read-ahead, or
    /// two threads on one page): they wait for an answer already on its way.
    pub fault_latency_already_asked: LatencyHistogram,
    /// Sum of those latencies: thread-time spent blocked on missing pages.
    pub blocktime_ns: AtomicU64,
}

/// A plain copy of [`UffdStats`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct UffdCounters {
    pub faults: u64,
    pub requests: u64,
    pub pages_requested: u64,
    pub pages_copied_urgent: u64,
    pub pages_copied_pushed: u64,
    pub zero_pages: u64,
    pub lazy_zero_pages: u64,
    pub pages_dropped: u64,
    pub copy_retries: u64,
    pub tasks: u64,
    pub blocktime_ns: u64,
}

impl UffdStats {
    pub fn counters(&self) -> UffdCounters {
        UffdCounters {
            faults: self.faults.load(Relaxed),
            requests: self.requests.load(Relaxed),
            pages_requested: self.pages_requested.load(Relaxed),
            pages_copied_urgent: self.pages_copied_urgent.load(Relaxed),
            pages_copied_pushed: self.pages_copied_pushed.load(Relaxed),
            zero_pages: self.zero_pages.load(Relaxed),
            lazy_zero_pages: self.lazy_zero_pages.load(Relaxed),
            pages_dropped: self.pages_dropped.load(Relaxed),
            copy_retries: self.copy_retries.load(Relaxed),
            tasks: self.tasks.load(Relaxed),
            blocktime_ns: self.blocktime_ns.load(Relaxed),
        }
    }
}

/// Why the fault loop could not start or ended badly.
#[derive(Debug, thiserror::Error)]
pub enum LoopError {
    #[error("cannot create the fault loop's {what}: {source}")]
    Setup {
        what: &'static str,
        source: std::io::Error,
    },
    #[error(
        "the fault loop is gone (it panicked or already shut down); restored memory may be incomplete"
    )]
    Gone,
    #[error(
        "the fault loop's queue is full and the sender is on the fault lane, where blocking would \
         stop the loop it waits for (a bug in pageserv: that sender must use send_async)"
    )]
    WouldBlockLane,
}

/// What a shutdown did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ShutdownReport {
    /// Image pids whose lazy memory was incomplete at shutdown (fork children included).
    pub incomplete: Vec<u32>,
    /// Host pids SIGKILLed.
    pub killed: Vec<i32>,
    /// Incomplete processes that could not be killed (no host pid known, or kill failed): they
    /// may read zero pages.
    pub not_killed: Vec<u32>,
}

/// A cloneable way to talk to the fault loop.
#[derive(Clone)]
pub struct LoopSender {
    urgent: Sender<Inbound>,
    bulk: Sender<Inbound>,
    wake: Arc<EventFd>,
    /// Signalled by the fault loop after it takes messages off either queue: an async
    /// sender waiting for room ([`LoopSender::send_async`]) tries again.
    room: Arc<tokio::sync::Notify>,
}

impl LoopSender {
    /// Whether `msg` goes ahead of queued background pages.
    fn is_urgent(msg: &Inbound) -> bool {
        match msg {
            Inbound::Pages { urgent, .. } => *urgent,
            // Behind every page the old link queued.
            Inbound::Shutdown { .. } | Inbound::Resume { .. } | Inbound::Arrivals { .. } => false,
            _ => true,
        }
    }

    /// Queues `msg` and wakes the loop, blocking while its queue is full. Fault answers, tasks
    /// and zero runs go ahead of queued background pages; `Shutdown` goes behind everything sent
    /// before it. Not for the fault lane, where the loop runs (use [`LoopSender::send_async`]):
    /// there a full queue is [`LoopError::WouldBlockLane`], since blocking would wait for a loop
    /// that cannot run.
    pub fn send(&self, msg: Inbound) -> Result<(), LoopError> {
        let tx = if Self::is_urgent(&msg) {
            &self.urgent
        } else {
            &self.bulk
        };
        match tx.try_send(msg) {
            Ok(()) => {}
            Err(crossbeam_channel::TrySendError::Full(_)) if crate::fault_lane::on_lane() => {
                return Err(LoopError::WouldBlockLane);
            }
            Err(crossbeam_channel::TrySendError::Full(msg)) => {
                tx.send(msg).map_err(|_| LoopError::Gone)?;
            }
            Err(crossbeam_channel::TrySendError::Disconnected(_)) => return Err(LoopError::Gone),
        }
        self.wake.write(1).map_err(|_| LoopError::Gone)?;
        Ok(())
    }

    /// As [`LoopSender::send`], but a full queue suspends the calling task instead of blocking
    /// its thread: the push stream's reader waits here without taking its runtime's thread away,
    /// and the fault stream's reader, on the fault lane with the loop, without stopping the loop
    /// it waits for.
    pub async fn send_async(&self, msg: Inbound) -> Result<(), LoopError> {
        let tx = if Self::is_urgent(&msg) {
            &self.urgent
        } else {
            &self.bulk
        };
        let mut msg = msg;
        loop {
            // Registered before the attempt, so a slot freed in between is not missed.
            let room = self.room.notified();
            tokio::pin!(room);
            room.as_mut().enable();
            match tx.try_send(msg) {
                Ok(()) => break,
                Err(crossbeam_channel::TrySendError::Full(m)) => {
                    msg = m;
                    room.await;
                }
                Err(crossbeam_channel::TrySendError::Disconnected(_)) => {
                    return Err(LoopError::Gone);
                }
            }
        }
        self.wake.write(1).map_err(|_| LoopError::Gone)?;
        Ok(())
    }
}

/// The running fault loop.
pub struct LoopHandle {
    sender: LoopSender,
    /// The loop's report when it ends (disconnected if it panicked).
    done: std::sync::mpsc::Receiver<ShutdownReport>,
}

impl LoopHandle {
    pub fn send(&self, msg: Inbound) -> Result<(), LoopError> {
        self.sender.send(msg)
    }

    pub fn sender(&self) -> LoopSender {
        self.sender.clone()
    }

    /// Sends `Shutdown` and waits for the loop to end (blocking: not on the fault lane).
    pub fn shutdown(self, kill_incomplete: bool) -> Result<ShutdownReport, LoopError> {
        // If the loop already ended, joining still reports what it did.
        let _ = self.sender.send(Inbound::Shutdown { kill_incomplete });
        self.join()
    }

    /// Waits for the loop to end (after a Shutdown, or after every sender is dropped, which
    /// counts as Shutdown{kill_incomplete: true}). Blocking: not on the fault lane.
    pub fn join(self) -> Result<ShutdownReport, LoopError> {
        let LoopHandle { sender, done } = self;
        drop(sender);
        done.recv().map_err(|_| LoopError::Gone)
    }
}

/// Where the fault loop's outbound events go. `deliver` runs on the fault loop, so it must
/// not block: a channel's non-blocking send (a crossbeam `Sender`, as the tests use, or tokio's
/// unbounded channels, as dst does: [`crate::dst::migration::bridge`]).
pub trait OutboundSink: Send + 'static {
    /// Hands `ev` on; false when nobody listens any more.
    fn deliver(&mut self, ev: Outbound) -> bool;
}

impl OutboundSink for Sender<Outbound> {
    fn deliver(&mut self, ev: Outbound) -> bool {
        self.send(ev).is_ok()
    }
}

/// Starts the fault loop with the default [`LoopConfig`].
pub fn spawn(out: impl OutboundSink, stats: Arc<UffdStats>) -> Result<LoopHandle, LoopError> {
    spawn_with(LoopConfig::default(), out, stats)
}

/// Starts the fault loop.
pub fn spawn_with(
    config: LoopConfig,
    out: impl OutboundSink,
    stats: Arc<UffdStats>,
) -> Result<LoopHandle, LoopError> {
    let setup = |what| {
        move |e: nix::Error| LoopError::Setup {
            what,
            source: e.into(),
        }
    };
    let wake = Arc::new(
        EventFd::from_value_and_flags(0, EfdFlags::EFD_CLOEXEC | EfdFlags::EFD_NONBLOCK)
            .map_err(setup("eventfd"))?,
    );
    // Fault answers and zero runs: bounded too (see limits::URGENT_QUEUE), so a source flooding
    // its fault stream is held back by QUIC flow control, not by dst's memory.
    let (urgent_tx, urgent_rx): (Sender<Inbound>, Receiver<Inbound>) =
        crossbeam_channel::bounded(crate::limits::URGENT_QUEUE);
    // Background pages wait here only briefly: a full queue blocks the sender, which stops
    // reading its QUIC stream, so flow control (not memory) absorbs a fast source.
    let (bulk_tx, bulk_rx) = crossbeam_channel::bounded(BULK_QUEUE);
    let room = Arc::new(tokio::sync::Notify::new());
    let queues = driver::Queues {
        urgent: urgent_rx,
        bulk: bulk_rx,
        room: room.clone(),
    };
    let engine = driver::Driver::new(config, Box::new(out), stats, queues, wake.clone())
        .map_err(setup("epoll instance"))?;
    if !crate::fault_lane::has_thread() {
        return Err(LoopError::Setup {
            what: "fault lane",
            source: std::io::Error::other(
                "the fault lane thread could not start (see the warning before this); free a \
                 thread (RLIMIT_NPROC, memory) and start dst again",
            ),
        });
    }
    let (report_tx, done) = std::sync::mpsc::sync_channel(1);
    crate::fault_lane::spawn(async move {
        let report = engine.run().await;
        let _ = report_tx.send(report);
    });
    Ok(LoopHandle {
        sender: LoopSender {
            urgent: urgent_tx,
            bulk: bulk_tx,
            wake,
            room,
        },
        done,
    })
}
