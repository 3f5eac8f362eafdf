//! A lying source against the real fault loop and a real userfaultfd (needs root): page data
//! for an unknown pid, outside the lazy ranges, for a fault nobody had, or pushed twice is
//! refused with an error naming the rule, and none of it reaches the process's memory.
//! The rule itself is `pageserv::dst::arrival_guard` (unit tests there).

use std::os::fd::{FromRawFd, OwnedFd, RawFd};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use crossbeam_channel::Receiver;
use pageserv::dst::uffd_loop::{self, Inbound, LoopConfig, LoopHandle, Outbound, UffdStats};
use pageserv::pages::{PAGE_SIZE, PageRange, PidRange};

const P: u64 = PAGE_SIZE;
/// The task's image pid.
const PID: u32 = 41;
/// The region's pages; the first `LAZY` are lazy, the rest were "restored from the images".
const PAGES: u64 = 64;
const LAZY: u64 = 32;

macro_rules! require_root {
    () => {
        if unsafe { libc::geteuid() } != 0 {
            eprintln!("SKIP: needs root (userfaultfd)");
            return;
        }
    };
}

#[repr(C)]
struct UffdioApi {
    api: u64,
    features: u64,
    ioctls: u64,
}
#[repr(C)]
struct UffdioRegister {
    start: u64,
    len: u64,
    mode: u64,
    ioctls: u64,
}
nix::ioctl_readwrite!(uffdio_api, 0xAA, 0x3F, UffdioApi);
nix::ioctl_readwrite!(uffdio_register, 0xAA, 0x00, UffdioRegister);

/// userfaultfd(O_CLOEXEC|O_NONBLOCK), UFFDIO_API with CRIU's features, and MISSING mode on
/// `[addr, +len)`: what a restored task does before it hands the fd to the lazy-pages daemon.
fn new_uffd(addr: u64, len: u64) -> OwnedFd {
    let fd = unsafe { libc::syscall(libc::SYS_userfaultfd, libc::O_CLOEXEC | libc::O_NONBLOCK) }
        as RawFd;
    assert!(fd >= 0, "userfaultfd: {}", std::io::Error::last_os_error());
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    let raw = std::os::fd::AsRawFd::as_raw_fd(&fd);
    let mut api = UffdioApi {
        api: 0xAA,
        features: 0x4E,
        ioctls: 0,
    };
    unsafe { uffdio_api(raw, &mut api) }.expect("UFFDIO_API");
    let mut reg = UffdioRegister {
        start: addr,
        len,
        mode: 1,
        ioctls: 0,
    };
    unsafe { uffdio_register(raw, &mut reg) }.expect("UFFDIO_REGISTER");
    fd
}

/// An anonymous private mapping registered with a fresh uffd, as a restored task's lazy VMA.
/// The non-lazy half is written before registration: it holds the "eager" image content.
struct Task {
    addr: u64,
    uffd: Option<OwnedFd>,
}

impl Task {
    fn new() -> Task {
        let len = (PAGES * P) as usize;
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        assert_ne!(p, libc::MAP_FAILED);
        let addr = p as u64;
        for pg in LAZY..PAGES {
            unsafe { std::ptr::write_bytes((addr + pg * P) as *mut u8, 0xEE, P as usize) };
        }
        let uffd = new_uffd(addr, len as u64);
        Task {
            addr,
            uffd: Some(uffd),
        }
    }

    fn lazy(&self) -> Vec<PageRange> {
        vec![PageRange::new(self.addr, LAZY)]
    }

    /// Which pages are populated, without touching (faulting) any of them.
    fn resident(&self) -> Vec<bool> {
        let mut v = vec![0u8; PAGES as usize];
        let r = unsafe {
            libc::mincore(
                self.addr as *mut libc::c_void,
                (PAGES * P) as usize,
                v.as_mut_ptr(),
            )
        };
        assert_eq!(r, 0, "mincore: {}", std::io::Error::last_os_error());
        v.into_iter().map(|b| b & 1 != 0).collect()
    }

    fn page(&self, pg: u64) -> &[u8] {
        unsafe { std::slice::from_raw_parts((self.addr + pg * P) as *const u8, P as usize) }
    }
}

impl Drop for Task {
    fn drop(&mut self) {
        unsafe { libc::munmap(self.addr as *mut libc::c_void, (PAGES * P) as usize) };
    }
}

struct Loop {
    handle: LoopHandle,
    out: Receiver<Outbound>,
    stats: Arc<UffdStats>,
}

fn start(task: &mut Task) -> Loop {
    let stats = Arc::new(UffdStats::default());
    let (tx, out) = crossbeam_channel::unbounded();
    let handle = uffd_loop::spawn_with(LoopConfig::default(), tx, stats.clone()).unwrap();
    handle
        .send(Inbound::Task {
            pid: PID as i32,
            uffd: task.uffd.take().unwrap(),
            lazy: task.lazy(),
            host_pid: None,
        })
        .unwrap();
    handle.send(Inbound::RestoreFinished).unwrap();
    Loop { handle, out, stats }
}

fn fill(byte: u8, pages: u64) -> Bytes {
    Bytes::from(vec![byte; (pages * P) as usize])
}

fn pages(pid: u32, img_vaddr: u64, nr_pages: u64, byte: u8, urgent: bool) -> Inbound {
    Inbound::Pages {
        at: PidRange::new(pid, img_vaddr, nr_pages),
        data: fill(byte, nr_pages),
        urgent,
        link: 0,
    }
}

/// The next error the loop reports, within a few seconds.
fn next_error(out: &Receiver<Outbound>) -> String {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        match out.recv_deadline(deadline) {
            Ok(Outbound::Error(e)) => return e,
            Ok(other) => eprintln!("event: {other:?}"),
            Err(_) => panic!("the loop reported no error for a lying frame"),
        }
    }
}

/// Sends `msg`, expects an error containing every one of `words`, and checks that no page
/// became resident and the eager half is untouched.
fn refused(l: &Loop, task: &Task, msg: Inbound, words: &[&str]) {
    let before = task.resident();
    l.handle.send(msg).unwrap();
    let e = next_error(&l.out);
    for w in words {
        assert!(e.contains(w), "error {e:?} lacks {w:?}");
    }
    assert_eq!(
        task.resident(),
        before,
        "a refused frame changed the memory"
    );
    for pg in LAZY..PAGES {
        assert!(
            task.page(pg).iter().all(|b| *b == 0xEE),
            "eager page {pg} overwritten"
        );
    }
}

#[test]
fn lying_frames_are_refused_and_never_written() {
    require_root!();
    let mut task = Task::new();
    let l = start(&mut task);
    let base = task.addr;
    assert!(task.resident()[..LAZY as usize].iter().all(|r| !r));

    // Unknown pid, on either stream.
    refused(
        &l,
        &task,
        pages(PID + 1, base, 1, 0x11, false),
        &["pid 42", "no task"],
    );
    refused(
        &l,
        &task,
        pages(PID + 1, base, 1, 0x11, true),
        &["pid 42", "no task"],
    );
    // Outside the lazy range: eager memory, and a run straddling the end of the lazy range.
    refused(
        &l,
        &task,
        pages(PID, base + LAZY * P, 2, 0x22, false),
        &["not in a lazy range", &format!("{:#x}", base + LAZY * P)],
    );
    refused(
        &l,
        &task,
        pages(PID, base + (LAZY - 1) * P, 2, 0x22, false),
        &["not in a lazy range"],
    );
    refused(
        &l,
        &task,
        Inbound::Zero {
            at: PidRange::new(PID, base + (LAZY + 3) * P, 1),
            urgent: false,
            link: 0,
        },
        &["not in a lazy range"],
    );
    // A fault answer nobody asked for (no thread faulted).
    refused(
        &l,
        &task,
        pages(PID, base + 5 * P, 1, 0x33, true),
        &["not asked for", &format!("{:#x}", base + 5 * P)],
    );

    // Honest pushes still land; pushing the same page again is refused and changes nothing.
    l.handle.send(pages(PID, base, 4, 0x44, false)).unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    while !task.resident()[..4].iter().all(|r| *r) {
        assert!(Instant::now() < deadline, "honest push not placed");
        std::thread::sleep(Duration::from_millis(5));
    }
    refused(
        &l,
        &task,
        pages(PID, base + 2 * P, 4, 0x55, false),
        &["already pushed", &format!("{:#x}", base + 2 * P)],
    );
    for pg in 0..4 {
        assert!(
            task.page(pg).iter().all(|b| *b == 0x44),
            "page {pg} rewritten"
        );
    }
    // Page 5, refused as an unasked fault answer above, was not settled: a push fills it.
    l.handle
        .send(pages(PID, base + 5 * P, 1, 0x66, false))
        .unwrap();
    while !task.resident()[5] {
        assert!(Instant::now() < deadline, "push of page 5 not placed");
        std::thread::sleep(Duration::from_millis(5));
    }
    assert!(task.page(5).iter().all(|b| *b == 0x66));

    let c = l.stats.counters();
    assert_eq!(c.pages_copied_pushed, 5, "{c:?}");
    assert_eq!(c.pages_copied_urgent, 0, "{c:?}");
    l.handle.shutdown(false).unwrap();
}

#[test]
fn requested_pages_are_accepted_once() {
    require_root!();
    let mut task = Task::new();
    let l = start(&mut task);
    let base = task.addr;
    // A thread faults on page 7; the loop asks the source, which answers twice.
    let reader = std::thread::spawn(move || unsafe { *((base + 7 * P) as *const u8) });
    let deadline = Instant::now() + Duration::from_secs(5);
    let (img, nr) = loop {
        match l.out.recv_deadline(deadline) {
            Ok(Outbound::Fault(at)) => {
                assert_eq!(at.pid, PID);
                break (at.start(), at.nr_pages());
            }
            Ok(other) => eprintln!("event: {other:?}"),
            Err(_) => panic!("no fault request"),
        }
    };
    assert_eq!((img, nr), (base + 7 * P, 1));
    l.handle.send(pages(PID, img, nr, 0x77, true)).unwrap();
    assert_eq!(reader.join().unwrap(), 0x77);
    refused(
        &l,
        &task,
        pages(PID, img, nr, 0x78, true),
        &["not asked for"],
    );
    assert!(task.page(7).iter().all(|b| *b == 0x77));
    assert_eq!(l.stats.counters().pages_copied_urgent, 1);
    l.handle.shutdown(false).unwrap();
}

/// A loop whose task is handed over but whose restore has not finished (as while `criu restore`
/// runs), with `config`.
fn start_restoring(task: &mut Task, config: LoopConfig) -> Loop {
    let stats = Arc::new(UffdStats::default());
    let (tx, out) = crossbeam_channel::unbounded();
    let handle = uffd_loop::spawn_with(config, tx, stats.clone()).unwrap();
    handle
        .send(Inbound::Task {
            pid: PID as i32,
            uffd: task.uffd.take().unwrap(),
            lazy: task.lazy(),
            host_pid: None,
        })
        .unwrap();
    Loop { handle, out, stats }
}

/// Sends `max` messages made by `msg`, then a resume, which the loop answers only after every
/// message before it, and counts the errors: each message the loop did not hold was refused
/// with one. Returns the first error and how many messages the loop held, whatever the
/// scheduling (the sender may run far ahead of the loop on a busy machine). Panics if nothing
/// was refused: the loop held everything.
fn flood(l: &Loop, max: u64, msg: impl Fn(u64) -> Inbound) -> (String, u64) {
    let mut first: Option<String> = None;
    let mut refused = 0u64;
    let mut take = |o: Outbound| {
        if let Outbound::Error(e) = o {
            refused += 1;
            first.get_or_insert(e);
        }
    };
    for i in 0..max {
        l.handle.send(msg(i)).unwrap();
        while let Ok(o) = l.out.try_recv() {
            take(o);
        }
    }
    l.handle.send(Inbound::Resume { serial: 1 }).unwrap();
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        match l.out.recv_deadline(deadline) {
            Ok(Outbound::Resumed { .. }) => break,
            Ok(o) => take(o),
            Err(_) => panic!("the loop did not answer a resume after {max} messages"),
        }
    }
    let first = first.unwrap_or_else(|| panic!("{max} messages held without a limit"));
    (first, max - refused)
}

#[test]
fn endless_zero_runs_before_the_restore_finished_hit_the_held_limit() {
    require_root!();
    let mut task = Task::new();
    let l = start_restoring(&mut task, LoopConfig::default());
    let base = task.addr;
    let limit = pageserv::limits::MAX_EARLY_HELD_BYTES / pageserv::limits::HELD_MESSAGE_COST;
    // Pushed zero runs carry no data: before the limit counted messages, they were held forever.
    let (e, held) = flood(&l, 4 * limit, |_| Inbound::Zero {
        at: PidRange::new(PID, base, 1),
        urgent: false,
        link: 0,
    });
    assert!(
        e.contains("64 MiB") && e.contains("before the restore finished"),
        "{e}"
    );
    assert!(held <= limit, "held {held} messages, the limit is {limit}");
    assert!(task.resident().iter().take(LAZY as usize).all(|r| !r));
    l.handle.shutdown(false).unwrap();
}

#[test]
fn an_unknown_pid_s_pages_are_not_stashed_without_limit() {
    require_root!();
    let mut task = Task::new();
    // Without the images' pids (as in a bare fault loop), pages of a pid not handed over yet
    // are held for it, but only up to the limit.
    let l = start_restoring(&mut task, LoopConfig::default());
    let per = 1024 * 1024 / P; // 1 MiB a message
    let (e, held) = flood(&l, 1024, |i| {
        pages(PID + 1, 0x10_0000_0000 + i * per * P, per, 0x11, true)
    });
    assert!(e.contains("64 MiB") && e.contains("pid 42"), "{e}");
    assert!(held <= 64, "held {held} MiB");
    l.handle.shutdown(false).unwrap();

    // With the images' pids, such pages are refused at once, and never held.
    let mut task = Task::new();
    let config = LoopConfig {
        image_pids: Some([PID].into_iter().collect()),
        ..LoopConfig::default()
    };
    let l = start_restoring(&mut task, config);
    refused(
        &l,
        &task,
        pages(PID + 1, task.addr, 1, 0x11, true),
        &["pid 42", "not in the images"],
    );
    l.handle.shutdown(false).unwrap();
}

#[test]
fn a_restored_task_whose_pid_is_not_in_the_images_is_refused() {
    require_root!();
    let mut task = Task::new();
    let config = LoopConfig {
        image_pids: Some([PID + 7].into_iter().collect()),
        ..LoopConfig::default()
    };
    // The task (pid 41) is handed over, but the images have only pid 48: served, its faults
    // would all be zero-filled.
    let l = start_restoring(&mut task, config);
    let e = next_error(&l.out);
    assert!(
        e.contains("pid 41") && e.contains("not in the images"),
        "{e}"
    );
    l.handle.send(Inbound::RestoreFinished).unwrap();
    // Its uffd is kept (not served), and an incomplete shutdown counts it as incomplete.
    let report = l.handle.shutdown(true).unwrap();
    eprintln!("shutdown: {report:?}");
}
