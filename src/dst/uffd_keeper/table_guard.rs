//! The table guard: a process that shares `pageserv dst`'s file descriptor table, so that a fork
//! child's uffd the kernel put into that table, but which dst had not yet handed to its uffd
//! keeper, survives dst's death and still reaches the keeper.
//!
//! Why: the kernel installs a fork child's uffd in the reader's table as the fault loop reads
//! the UFFD_EVENT_FORK (`resolve_userfault_fork()`), and the parent's fork() returns only then,
//! so the child may run at once. The fault loop hands the uffd to the keeper microseconds
//! later; a dst killed in between closed the only copy, and the child read zeros where its
//! pages were missing (`userfaultfd_release()` unregisters the ranges). No ordering inside dst
//! can close that window: SIGKILL lands on the read's return.
//!
//! How: `pageserv dst` starts the guard first, while it is still one thread, with
//! `clone(CLONE_FILES)` and no exec (exec would unshare the table). A table shared with a live
//! process is not closed when dst dies, so the guard holds every descriptor dst held. It waits
//! on a pidfd of dst; when dst is gone it decides ([`rescue_target`], pure) whether the uffds in
//! the table can be attributed, sends them to the keeper as fork children, and exits, which
//! closes the table (the keeper then sees its control connection close).
//!
//! What the guard knows comes from a page shared with dst ([`Slots`]): for each migration with
//! a keeper, the keeper's control descriptor, whether every restored task's uffd is held,
//! whether that migration's fault loop is inside a read (and the restored root the read's
//! fork children descend from), and whether a hand-over to the keeper ever failed.
//!
//! Invariants (what makes an attribution right):
//! - a fault loop marks a read before the read(2) and clears the mark only after every fork
//!   child's uffd from that read was sent to the keeper, so an unheld fork uffd exists in the
//!   table only while its thread's read is marked;
//! - a migration's slot lives as long as its keeper handle, which the fault loop holds until
//!   it ends, so a migration's uffds are never in the table without its slot;
//! - the guard attributes only if exactly one slot is registered (one migration in this dst),
//!   all its task uffds were held, nothing failed and the keeper was not released. Then every uffd
//!   in the table is either held by that keeper already (the keeper drops the duplicate: kcmp)
//!   or a fork child of the marked read. With several migrations at once it attributes nothing
//!   and says so: such a child is lost as before (zero-filled), never given to the wrong tree.

use std::os::fd::{FromRawFd, RawFd};
use std::sync::OnceLock;
use std::sync::atomic::{AtomicI32, Ordering::SeqCst};

use super::policy::{Holding, Record};
use crate::dst::uffd_loop::kill::Process;

/// Migrations one dst can guard (its `--max-concurrent` beyond this go unguarded, with a
/// warning).
pub const SLOTS: usize = 64;

/// One migration's entry in the shared page. Zero everywhere = free.
#[repr(C)]
pub struct Slot {
    registered: AtomicI32,
    keeper_fd: AtomicI32,
    tasks_held: AtomicI32,
    reading_root: AtomicI32,
    poisoned: AtomicI32,
    released: AtomicI32,
}

/// The page dst and its guard share.
#[repr(C)]
pub struct Slots([Slot; SLOTS]);

/// What the guard reads of one slot after dst died.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct SlotView {
    pub registered: bool,
    pub keeper_fd: RawFd,
    pub tasks_held: bool,
    /// The restored root whose fork children a read in progress may have produced (0: none).
    pub reading_root: i32,
    pub poisoned: bool,
    pub released: bool,
}

/// What the guard does after dst died.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rescue {
    /// No read was in progress: no unheld uffd can be in the table.
    Nothing,
    /// Send every uffd in the table to the keeper on `keeper_fd` as a fork child of `root`.
    Send { keeper_fd: RawFd, root: i32 },
    /// A read may have left an unheld uffd, but whose it is cannot be told.
    Unattributable(&'static str),
}

/// The decision (pure; see the module's invariants).
pub fn rescue_target(slots: &[SlotView]) -> Rescue {
    let live: Vec<&SlotView> = slots.iter().filter(|s| s.registered).collect();
    let reading = live.iter().any(|s| s.reading_root != 0);
    if !reading {
        return Rescue::Nothing;
    }
    match live.as_slice() {
        [s] if s.released => Rescue::Nothing,
        [s] if s.poisoned => Rescue::Unattributable("a hand-over to the keeper had failed"),
        [s] if !s.tasks_held => Rescue::Unattributable("the restore was still handing over"),
        [s] if s.reading_root < 0 => {
            Rescue::Unattributable("the task being read has no known host pid")
        }
        [s] => Rescue::Send {
            keeper_fd: s.keeper_fd,
            root: s.reading_root,
        },
        _ => Rescue::Unattributable("several migrations were running in this dst"),
    }
}

static GUARD: OnceLock<&'static Slots> = OnceLock::new();

/// Why the guard could not start.
#[derive(Debug, thiserror::Error)]
pub enum GuardError {
    #[error(
        "the table guard must start while pageserv dst is one thread ({0} threads run): a fork \
         child whose uffd is read just as dst dies would read zeros"
    )]
    Threads(usize),
    #[error("the table guard: {what}: {source}")]
    Os {
        what: &'static str,
        #[source]
        source: std::io::Error,
    },
}

fn os(what: &'static str) -> impl FnOnce(std::io::Error) -> GuardError {
    move |source| GuardError::Os { what, source }
}

fn threads() -> usize {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("Threads:"))
                .and_then(|n| n.trim().parse().ok())
        })
        .unwrap_or(usize::MAX)
}

/// Starts the guard. Call once, first thing in `pageserv dst`, before any thread starts.
/// Returns the guard's pid.
pub fn start() -> Result<i32, GuardError> {
    let n = threads();
    if n != 1 {
        return Err(GuardError::Threads(n));
    }
    let size = std::mem::size_of::<Slots>();
    // SAFETY: a fresh anonymous shared mapping; zeroed by the kernel, which is a valid `Slots`
    // (atomics of zero). It is never unmapped, so the &'static holds.
    let slots: &'static Slots = unsafe {
        let p = libc::mmap(
            std::ptr::null_mut(),
            size,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_SHARED | libc::MAP_ANONYMOUS,
            -1,
            0,
        );
        if p == libc::MAP_FAILED {
            return Err(GuardError::Os {
                what: "mapping the shared page",
                source: std::io::Error::last_os_error(),
            });
        }
        &*(p as *const Slots)
    };
    // SAFETY: getpid(2) cannot fail.
    let dst = Process::open(unsafe { libc::getpid() }).map_err(os("pidfd_open of dst"))?;
    // SAFETY: clone(2) without CLONE_VM, like fork(2) but sharing the descriptor table. The
    // process is one thread (checked above), so the child's copy of memory has no lock held by
    // a thread it lacks, and it may allocate.
    let pid = unsafe {
        libc::syscall(
            libc::SYS_clone,
            (libc::CLONE_FILES | libc::SIGCHLD) as libc::c_ulong,
            0usize,
            0usize,
            0usize,
            0usize,
        )
    };
    match pid {
        p if p < 0 => Err(os("clone(CLONE_FILES)")(std::io::Error::last_os_error())),
        0 => guard_main(&dst, slots),
        p => {
            // Open for dst's whole life: closing it would close the guard's too (one table).
            std::mem::forget(dst);
            let _ = GUARD.set(slots);
            tracing::debug!(pid = p, "table guard started");
            Ok(p as i32)
        }
    }
}

/// The guard process: waits for dst to end, then rescues. Never returns.
fn guard_main(dst: &Process, slots: &'static Slots) -> ! {
    // SAFETY: plain syscalls on this process; no memory is handed to the kernel but a static
    // name.
    unsafe {
        for sig in [
            libc::SIGINT,
            libc::SIGTERM,
            libc::SIGHUP,
            libc::SIGQUIT,
            libc::SIGPIPE,
        ] {
            libc::signal(sig, libc::SIG_IGN);
        }
        // Signals to dst's process group (a terminal's ^C) are not for the guard.
        libc::setsid();
        libc::prctl(
            libc::PR_SET_NAME,
            c"pageserv-guard".as_ptr() as libc::c_ulong,
            0,
            0,
            0,
        );
    }
    if dst.wait_exited().is_err() {
        // The pidfd was closed under us (dst closed descriptors it did not open): watch for
        // the reparenting dst's death causes instead.
        // SAFETY: getppid(2) cannot fail.
        while unsafe { libc::getppid() } == dst.pid {
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
    }
    let views: Vec<SlotView> = slots.0.iter().map(Slot::view).collect();
    match rescue_target(&views) {
        Rescue::Nothing => {}
        Rescue::Unattributable(why) => tracing::error!(
            "pageserv dst died while its fault loop was reading a uffd, and {why}: a fork \
             child whose uffd was in that read is not held and reads zeros where its pages are \
             missing"
        ),
        Rescue::Send { keeper_fd, root } => {
            let sent = send_uffds(keeper_fd, root);
            tracing::warn!(
                root_host_pid = root,
                uffds = sent,
                "pageserv dst died inside a read of its uffds: every uffd it held went to the \
                 uffd keeper (it keeps the fork children it did not have)"
            );
        }
    }
    // SAFETY: ends this process without running dst's exit handlers on its copy of memory.
    unsafe { libc::_exit(0) }
}

/// Sends every uffd in this (dst's) table to the keeper on `keeper_fd`; returns how many went.
fn send_uffds(keeper_fd: RawFd, root: i32) -> usize {
    // SAFETY: dst's keeper connection, in the shared table; ManuallyDrop: not ours to close.
    let ctl = std::mem::ManuallyDrop::new(unsafe {
        std::os::unix::net::UnixStream::from_raw_fd(keeper_fd)
    });
    let record = Record::Hold(Holding::Child {
        root_host_pid: root,
    })
    .encode();
    uffds_in_table()
        .into_iter()
        .filter(|&fd| crate::fdpass::send_fd(&ctl, &record, fd).is_ok())
        .count()
}

/// The descriptors of this process's table that are userfaultfds.
fn uffds_in_table() -> Vec<RawFd> {
    let Ok(dir) = std::fs::read_dir("/proc/self/fd") else {
        return Vec::new();
    };
    dir.flatten()
        .filter(|e| {
            std::fs::read_link(e.path()).is_ok_and(|t| t.as_os_str() == "anon_inode:[userfaultfd]")
        })
        .filter_map(|e| e.file_name().to_str()?.parse().ok())
        .collect()
}

impl Slot {
    fn view(&self) -> SlotView {
        SlotView {
            registered: self.registered.load(SeqCst) != 0,
            keeper_fd: self.keeper_fd.load(SeqCst),
            tasks_held: self.tasks_held.load(SeqCst) != 0,
            reading_root: self.reading_root.load(SeqCst),
            poisoned: self.poisoned.load(SeqCst) != 0,
            released: self.released.load(SeqCst) != 0,
        }
    }
}

/// One migration's slot, held by its keeper handle; freed on drop.
#[derive(Debug)]
pub struct SlotHandle {
    slot: &'static Slot,
}

impl std::fmt::Debug for Slot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.view().fmt(f)
    }
}

impl SlotHandle {
    /// Claims a slot for a migration whose keeper listens on `keeper_fd`. None if the guard
    /// does not run (not `pageserv dst`, or it could not start) or every slot is taken.
    pub fn claim(keeper_fd: RawFd) -> Option<SlotHandle> {
        let slots = GUARD.get()?;
        let slot = slots
            .0
            .iter()
            .find(|s| s.registered.compare_exchange(0, 1, SeqCst, SeqCst).is_ok());
        match slot {
            Some(slot) => {
                slot.keeper_fd.store(keeper_fd, SeqCst);
                Some(SlotHandle { slot })
            }
            None => {
                tracing::warn!(
                    "{SLOTS} migrations already run in this dst: this one's fork children are \
                     not guarded against dst dying inside a read"
                );
                None
            }
        }
    }

    /// Every restored task's uffd is held by the keeper.
    pub fn tasks_held(&self) {
        self.slot.tasks_held.store(1, SeqCst);
    }

    /// A read of a uffd whose fork children descend from restored task `root` starts (-1: its
    /// root is not known).
    pub fn reading(&self, root: i32) {
        self.slot.reading_root.store(root, SeqCst);
    }

    /// Every fork child's uffd from the read was sent to the keeper.
    pub fn read_done(&self) {
        self.slot.reading_root.store(0, SeqCst);
    }

    /// A hand-over to the keeper failed: the table may hold a uffd nobody keeps.
    pub fn poison(&self) {
        self.slot.poisoned.store(1, SeqCst);
    }

    /// The keeper let go (the memory is whole).
    pub fn released(&self) {
        self.slot.released.store(1, SeqCst);
    }
}

impl Drop for SlotHandle {
    fn drop(&mut self) {
        let s = self.slot;
        for f in [
            &s.keeper_fd,
            &s.tasks_held,
            &s.reading_root,
            &s.poisoned,
            &s.released,
        ] {
            f.store(0, SeqCst);
        }
        s.registered.store(0, SeqCst);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn one(reading_root: i32) -> SlotView {
        SlotView {
            registered: true,
            keeper_fd: 7,
            tasks_held: true,
            reading_root,
            ..Default::default()
        }
    }

    #[test]
    fn one_migration_inside_a_read_sends_to_its_keeper() {
        assert_eq!(
            rescue_target(&[SlotView::default(), one(42)]),
            Rescue::Send {
                keeper_fd: 7,
                root: 42
            }
        );
        assert_eq!(rescue_target(&[one(0)]), Rescue::Nothing);
        assert_eq!(rescue_target(&[]), Rescue::Nothing);
    }

    #[test]
    fn doubt_means_no_attribution() {
        let s = one(42);
        let poisoned = SlotView {
            poisoned: true,
            ..s
        };
        let restoring = SlotView {
            tasks_held: false,
            ..s
        };
        let unknown = one(-1);
        for v in [poisoned, restoring, unknown] {
            assert!(matches!(rescue_target(&[v]), Rescue::Unattributable(_)));
        }
        assert!(matches!(
            rescue_target(&[s, one(0)]),
            Rescue::Unattributable(_)
        ));
        let released = SlotView {
            released: true,
            ..s
        };
        assert_eq!(rescue_target(&[released]), Rescue::Nothing);
    }

    fn view() -> impl Strategy<Value = SlotView> {
        (
            any::<bool>(),
            any::<bool>(),
            -2i32..3,
            any::<bool>(),
            any::<bool>(),
        )
            .prop_map(
                |(registered, tasks_held, reading_root, poisoned, released)| SlotView {
                    registered,
                    keeper_fd: 9,
                    tasks_held,
                    reading_root,
                    poisoned,
                    released,
                },
            )
    }

    proptest! {
        /// A send happens only for exactly one registered migration, clean, inside a read with
        /// a known root, and goes to that migration's keeper.
        #[test]
        fn sends_only_when_unambiguous(v in proptest::collection::vec(view(), 0..5)) {
            if let Rescue::Send { keeper_fd, root } = rescue_target(&v) {
                let live: Vec<_> = v.iter().filter(|s| s.registered).collect();
                prop_assert_eq!(live.len(), 1);
                let s = live[0];
                prop_assert!(s.tasks_held && !s.poisoned && !s.released);
                prop_assert!(root > 0);
                prop_assert_eq!(root, s.reading_root);
                prop_assert_eq!(keeper_fd, s.keeper_fd);
            }
        }
    }
}
