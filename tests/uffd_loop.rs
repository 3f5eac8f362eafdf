//! The fault thread and lazy-pages.socket against the real kernel (needs root: uffds with
//! EVENT_FORK need CAP_SYS_PTRACE). Run `cargo test --release --test uffd_loop -- --nocapture`
//! for the throughput and latency numbers.

use std::io::Read;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use bytes::Bytes;
use crossbeam_channel::{Receiver, Sender};
use pageserv::dst::lazy_socket::{LazySocket, LazySocketError, RESTORE_FINISHED};
use pageserv::dst::uffd_loop::{
    self, HeldAnswer, HeldPages, Inbound, LoopConfig, LoopHandle, LoopSender, Outbound, UffdStats,
};
use pageserv::pages::{PAGE_SIZE, PageRange, PidRange};

const P: u64 = PAGE_SIZE;
const MIB: u64 = 1 << 20;

/// One test at a time: a fork in one test would hand its uffd events to another's loop.
static SERIAL: Mutex<()> = Mutex::new(());

fn serial() -> MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

macro_rules! require_root {
    () => {
        if unsafe { libc::geteuid() } != 0 {
            eprintln!("SKIP: needs root (userfaultfd with EVENT_FORK needs CAP_SYS_PTRACE)");
            return;
        }
    };
}

// ---- raw userfaultfd setup (what a restored process does itself) ----

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
#[repr(C)]
struct UffdioCopy {
    dst: u64,
    src: u64,
    len: u64,
    mode: u64,
    copy: i64,
}
nix::ioctl_readwrite!(uffdio_api, 0xAA, 0x3F, UffdioApi);
nix::ioctl_readwrite!(uffdio_register, 0xAA, 0x00, UffdioRegister);
nix::ioctl_readwrite!(uffdio_copy, 0xAA, 0x03, UffdioCopy);

/// userfaultfd(O_CLOEXEC|O_NONBLOCK) + UFFDIO_API{FORK|REMAP|REMOVE|UNMAP}, as CRIU's
/// setup_uffd() does. Async-signal-safe (used in forked children): returns -1 on failure.
fn raw_uffd() -> RawFd {
    let fd = unsafe { libc::syscall(libc::SYS_userfaultfd, libc::O_CLOEXEC | libc::O_NONBLOCK) }
        as RawFd;
    if fd < 0 {
        return -1;
    }
    let mut api = UffdioApi {
        api: 0xAA,
        features: 0x4E,
        ioctls: 0,
    };
    if unsafe { uffdio_api(fd, &mut api) }.is_err() {
        return -1;
    }
    fd
}

fn raw_register(fd: RawFd, addr: u64, len: u64) -> bool {
    let mut reg = UffdioRegister {
        start: addr,
        len,
        mode: 1,
        ioctls: 0,
    };
    unsafe { uffdio_register(fd, &mut reg) }.is_ok()
}

fn new_uffd(addr: u64, len: u64) -> OwnedFd {
    let fd = raw_uffd();
    assert!(
        fd >= 0,
        "userfaultfd + UFFDIO_API: {}",
        std::io::Error::last_os_error()
    );
    assert!(
        raw_register(fd, addr, len),
        "UFFDIO_REGISTER: {}",
        std::io::Error::last_os_error()
    );
    unsafe { OwnedFd::from_raw_fd(fd) }
}

/// An anonymous private mapping, unmapped on drop.
struct Region {
    addr: u64,
    len: u64,
}

impl Region {
    fn new(len: u64) -> Region {
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len as usize,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        assert_ne!(p, libc::MAP_FAILED);
        Region {
            addr: p as u64,
            len,
        }
    }
    fn pages(&self) -> u64 {
        self.len / P
    }
    fn lazy(&self) -> Vec<PageRange> {
        vec![PageRange::new(self.addr, self.pages())]
    }
}

impl Drop for Region {
    fn drop(&mut self) {
        unsafe { libc::munmap(self.addr as *mut libc::c_void, self.len as usize) };
    }
}

/// Reads one page of our own memory (faulting it in if missing).
fn read_page(addr: u64) -> &'static [u8] {
    unsafe { std::slice::from_raw_parts(addr as *const u8, P as usize) }
}

// ---- page content: every page's words depend on its image address ----

fn word(img_page: u64, i: u64) -> u64 {
    (img_page ^ 0x9E37_79B9_7F4A_7C15)
        .wrapping_mul(2 * i + 1)
        .rotate_left(17)
        | 1
}

/// The "image": content of `pages` pages starting at image address `base`.
fn image(base: u64, pages: u64) -> Bytes {
    let mut v = Vec::with_capacity((pages * P) as usize);
    for pg in 0..pages {
        for i in 0..P / 8 {
            v.extend_from_slice(&word(base + pg * P, i).to_ne_bytes());
        }
    }
    Bytes::from(v)
}

fn expect_page(rt_addr: u64, img_addr: u64) {
    let got = read_page(rt_addr);
    for i in [0, 1, P / 16, P / 8 - 1] {
        let w = u64::from_ne_bytes(
            got[(i * 8) as usize..(i * 8 + 8) as usize]
                .try_into()
                .unwrap(),
        );
        assert_eq!(
            w,
            word(img_addr, i),
            "page {rt_addr:#x} (image {img_addr:#x}) word {i}"
        );
    }
}

fn is_zero_page(addr: u64) -> bool {
    read_page(addr).iter().all(|b| *b == 0)
}

// ---- a fake source and the loop around it ----

struct Harness {
    handle: LoopHandle,
    /// The loop's input.
    tx: LoopSender,
    stats: Arc<UffdStats>,
    /// Every outbound message except faults.
    events: Receiver<Outbound>,
    /// The requests the fake source answered, in order.
    source: JoinHandle<Vec<PidRange>>,
}

/// Starts the loop and a source thread that answers every fault of `pid` from `img` (based at
/// image address `base`) unless `refuse(img_vaddr)`.
fn start(
    config: LoopConfig,
    pid: u32,
    base: u64,
    img: Bytes,
    refuse: fn(u64, u64) -> bool,
) -> Harness {
    let stats = Arc::new(UffdStats::default());
    let (out_tx, out_rx) = crossbeam_channel::unbounded();
    let handle = uffd_loop::spawn_with(config, out_tx, stats.clone()).unwrap();
    let (ev_tx, events) = crossbeam_channel::unbounded();
    let tx = handle.sender();
    let source = {
        let tx = tx.clone();
        std::thread::spawn(move || fake_source(out_rx, tx, ev_tx, pid, base, img, refuse))
    };
    Harness {
        handle,
        tx,
        stats,
        events,
        source,
    }
}

impl Harness {
    /// Hands the loop task `pid` with its uffd and lazy ranges, then says the restore finished,
    /// as the lazy-pages socket does for a one-task restore.
    fn restored(&self, pid: i32, uffd: OwnedFd, lazy: Vec<PageRange>, host_pid: Option<i32>) {
        self.tx
            .send(Inbound::Task {
                pid,
                uffd,
                lazy,
                host_pid,
            })
            .unwrap();
        self.tx.send(Inbound::RestoreFinished).unwrap();
    }

    /// Shuts the loop down (nothing killed) and joins the fake source.
    fn finish(self) {
        self.handle.shutdown(false).unwrap();
        drop(self.tx);
        self.source.join().unwrap();
    }
}

/// A region of `len` bytes, all lazy, restored as task `pid`: the loop serves its faults from
/// the region's image (returned) through a fake source that answers every fault.
fn serve_region(len: u64, config: LoopConfig, pid: u32) -> (Region, Bytes, Harness) {
    let region = Region::new(len);
    let img = image(region.addr, region.pages());
    let uffd = new_uffd(region.addr, region.len);
    let h = start(config, pid, region.addr, img.clone(), never);
    h.restored(i32::try_from(pid).unwrap(), uffd, region.lazy(), None);
    (region, img, h)
}

/// Asserts that every byte of `region` equals the image.
fn assert_whole(region: &Region, img: &Bytes) {
    let all = unsafe { std::slice::from_raw_parts(region.addr as *const u8, region.len as usize) };
    assert!(all == &img[..], "region content differs from the image");
}

fn fake_source(
    out: Receiver<Outbound>,
    tx: LoopSender,
    events: Sender<Outbound>,
    pid: u32,
    base: u64,
    img: Bytes,
    refuse: fn(u64, u64) -> bool,
) -> Vec<PidRange> {
    let mut answered = Vec::new();
    for msg in out {
        match msg {
            Outbound::Fault(at) => {
                let (p, img_vaddr, nr_pages) = (at.pid, at.start(), at.nr_pages());
                assert_eq!(p, pid, "faults use the image pid");
                if refuse(base, img_vaddr) {
                    continue;
                }
                let off = (img_vaddr - base) as usize;
                let data = img.slice(off..off + nr_pages as usize * P as usize);
                let _ = tx.send(Inbound::Pages {
                    at,
                    data,
                    urgent: true,
                    link: 0,
                });
                answered.push(at);
            }
            other => {
                let _ = events.send(other);
            }
        }
    }
    answered
}

fn never(_: u64, _: u64) -> bool {
    false
}

/// Pushes every page of `[base, base + pages)` in `chunk`-page messages, as background pages.
fn push_all(tx: &LoopSender, pid: u32, base: u64, img: &Bytes, pages: u64, chunk: u64) {
    let mut pg = 0;
    while pg < pages {
        let n = chunk.min(pages - pg);
        let data = img.slice((pg * P) as usize..((pg + n) * P) as usize);
        tx.send(Inbound::Pages {
            at: PidRange::new(pid, base + pg * P, n),
            data,
            urgent: false,
            link: 0,
        })
        .unwrap();
        pg += n;
    }
}

fn wait_complete(events: &Receiver<Outbound>, within: Duration) {
    let deadline = Instant::now() + within;
    loop {
        match events.recv_deadline(deadline) {
            Ok(Outbound::Complete) => return,
            Ok(Outbound::Error(e)) => panic!("loop error: {e}"),
            Ok(other) => eprintln!("event: {other:?}"),
            Err(_) => panic!("no Complete within {within:?}"),
        }
    }
}

struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn shuffle<T>(&mut self, v: &mut [T]) {
        for i in (1..v.len()).rev() {
            v.swap(i, (self.next() % (i as u64 + 1)) as usize);
        }
    }
}

// ---- (a) faults and background pushes on 64 MiB ----

#[test]
fn serves_faults_and_pushes_until_complete() {
    require_root!();
    let _g = serial();
    let config = LoopConfig {
        readahead_pages: 3,
        ..LoopConfig::default()
    };
    let (region, img, h) = serve_region(64 * MIB, config, 1000);
    let (base, pages) = (region.addr, region.pages());

    let readers: Vec<_> = (0..4u64)
        .map(|r| {
            std::thread::spawn(move || {
                let mut order: Vec<u64> = (0..pages).filter(|p| p % 4 == r).collect();
                Rng(r + 7).shuffle(&mut order);
                for pg in order.into_iter().take(600) {
                    expect_page(base + pg * P, base + pg * P);
                }
            })
        })
        .collect();
    // The background push starts while the readers fault.
    std::thread::sleep(Duration::from_millis(20));
    push_all(&h.tx, 1000, base, &img, pages, 1024);
    for r in readers {
        r.join().unwrap();
    }
    wait_complete(&h.events, Duration::from_secs(60));
    // Every page holds its data (nothing zero), compared in full.
    assert_whole(&region, &img);
    let c = h.stats.counters();
    eprintln!("(a) {c:?}");
    assert_eq!(
        c.pages_copied_urgent + c.pages_copied_pushed,
        pages,
        "each page copied exactly once"
    );
    assert!(c.faults > 0 && c.requests > 0 && c.pages_copied_urgent > 0);
    assert_eq!(c.zero_pages, 0);
    let lat = h.stats.fault_latency.snapshot();
    assert!(lat.count > 0);
    let report = h.handle.shutdown(false).unwrap();
    assert!(report.incomplete.is_empty() && report.killed.is_empty());
    drop(h.tx);
    assert!(!h.source.join().unwrap().is_empty());
}

// ---- (a2) pages already held here answer faults on the fault thread ----

/// Holds the image pages of `[base, base + held_pages)`, each handed out once.
#[derive(Debug)]
struct Held {
    base: u64,
    img: Bytes,
    left: Mutex<std::collections::BTreeSet<u64>>,
}

impl HeldPages for Held {
    fn take(&self, link: u64, r: PidRange) -> HeldAnswer {
        assert_eq!(link, 0, "the fault thread's only link");
        let mut left = self.left.lock().unwrap();
        let mut answer = HeldAnswer::default();
        for pg in 0..r.nr_pages() {
            let at = PidRange::new(r.pid, r.start() + pg * P, 1);
            if left.remove(&at.start()) {
                let off = (at.start() - self.base) as usize;
                let data = self.img.slice(off..off + P as usize);
                answer.found.push((at, Some(data)));
            } else {
                answer.rest.push(at);
            }
        }
        answer
    }
}

#[test]
fn held_pages_answer_faults_without_asking_the_source() {
    require_root!();
    let _g = serial();
    let region = Region::new(16 * MIB);
    let (base, pages) = (region.addr, region.pages());
    let held_pages = pages / 2;
    let img = image(base, pages);
    let held = Arc::new(Held {
        base,
        img: img.clone(),
        left: Mutex::new((0..held_pages).map(|pg| base + pg * P).collect()),
    });
    let config = LoopConfig {
        readahead_pages: 3,
        held: Some(held.clone()),
        ..LoopConfig::default()
    };
    let h = start(config, 1000, base, img, never);
    h.restored(1000, new_uffd(base, region.len), region.lazy(), None);
    let mut order: Vec<u64> = (0..pages).collect();
    Rng(11).shuffle(&mut order);
    for pg in order {
        expect_page(base + pg * P, base + pg * P);
    }
    let c = h.stats.counters();
    eprintln!("(a2) {c:?}");
    let report = h.handle.shutdown(false).unwrap();
    assert!(report.incomplete.is_empty());
    drop(h.tx);
    let asked = h.source.join().unwrap();
    // Every held page was taken here, and the source was asked only for the others.
    assert!(
        held.left.lock().unwrap().is_empty(),
        "every held page taken"
    );
    assert!(!asked.is_empty(), "the pages not held were asked for");
    for at in &asked {
        assert!(
            at.start() >= base + held_pages * P,
            "the source was asked for held page(s) {at:?}"
        );
    }
    let asked_pages: u64 = asked.iter().map(|a| a.nr_pages()).sum();
    assert_eq!(asked_pages + held_pages, pages, "each page came once");
    assert_eq!(c.pages_copied_urgent, pages, "every page answered a fault");
}

// ---- (b) madvise(DONTNEED) while pending ----

#[test]
fn removed_pages_are_never_copied() {
    require_root!();
    let _g = serial();
    let (region, img, h) = serve_region(8 * MIB, LoopConfig::default(), 7);
    let (base, pages) = (region.addr, region.pages());

    expect_page(base, base);
    let (rm_start, rm_len) = (base + MIB, MIB);
    // Blocks until the loop has read the REMOVE event.
    assert_eq!(
        unsafe {
            libc::madvise(
                rm_start as *mut libc::c_void,
                rm_len as usize,
                libc::MADV_DONTNEED,
            )
        },
        0
    );
    for pg in (0..rm_len / P).step_by(17) {
        assert!(is_zero_page(rm_start + pg * P), "removed page reads zero");
    }
    push_all(&h.tx, 7, base, &img, pages, 1024);
    wait_complete(&h.events, Duration::from_secs(30));
    for pg in 0..pages {
        let a = base + pg * P;
        if (rm_start..rm_start + rm_len).contains(&a) {
            assert!(
                is_zero_page(a),
                "page {a:#x} in the removed range was written"
            );
        } else {
            expect_page(a, a);
        }
    }
    let c = h.stats.counters();
    eprintln!("(b) {c:?}");
    assert_eq!(c.pages_dropped, rm_len / P);
    assert_eq!(
        c.pages_copied_urgent + c.pages_copied_pushed,
        pages - rm_len / P
    );
    h.finish();
}

// ---- (c) mremap while pending ----

#[test]
fn remapped_pages_get_their_image_data() {
    require_root!();
    let _g = serial();
    let (region, img, h) = serve_region(8 * MIB, LoopConfig::default(), 9);
    let (base, pages) = (region.addr, region.pages());

    // Move image [base+2M, base+3M) to a fresh place (a placeholder we own).
    let target = Region::new(MIB);
    let (from, len) = (base + 2 * MIB, MIB);
    let moved = unsafe {
        libc::mremap(
            from as *mut libc::c_void,
            len as usize,
            len as usize,
            libc::MREMAP_MAYMOVE | libc::MREMAP_FIXED,
            target.addr as *mut libc::c_void,
        )
    };
    assert_eq!(
        moved as u64,
        target.addr,
        "mremap: {}",
        std::io::Error::last_os_error()
    );
    // Faults at the new address are served with the old (image) address's data.
    for pg in [0, 5, 255, 100] {
        expect_page(target.addr + pg * P, from + pg * P);
    }
    push_all(&h.tx, 9, base, &img, pages, 1024);
    wait_complete(&h.events, Duration::from_secs(30));
    for pg in 0..pages {
        let a = base + pg * P;
        if (from..from + len).contains(&a) {
            expect_page(target.addr + (a - from), a);
        } else {
            expect_page(a, a);
        }
    }
    let c = h.stats.counters();
    eprintln!("(c) {c:?}");
    assert_eq!(c.pages_copied_urgent + c.pages_copied_pushed, pages);
    h.finish();
    // Region's munmap covers the hole; target unmaps the moved part.
    drop(target);
}

// ---- (d) fork while pending ----

fn checksum(addr: u64, pages: u64) -> u64 {
    let mut sum = 0u64;
    for pg in 0..pages {
        for i in 0..P / 8 {
            let w = unsafe { std::ptr::read_volatile((addr + pg * P + i * 8) as *const u64) };
            sum = sum.wrapping_add(w.wrapping_mul(i + 1));
        }
    }
    sum
}

fn expected_checksum(base: u64, first: u64, pages: u64) -> u64 {
    let mut sum = 0u64;
    for pg in first..first + pages {
        for i in 0..P / 8 {
            sum = sum.wrapping_add(word(base + pg * P, i).wrapping_mul(i + 1));
        }
    }
    sum
}

#[test]
fn fork_child_gets_its_pages() {
    require_root!();
    let _g = serial();
    let (region, img, h) = serve_region(8 * MIB, LoopConfig::default(), 11);
    let (base, pages) = (region.addr, region.pages());
    expect_page(base + 1000 * P, base + 1000 * P);

    let (first, n) = (100u64, 64u64);
    let mut fds = [0; 2];
    assert_eq!(unsafe { libc::pipe(fds.as_mut_ptr()) }, 0);
    // The fork blocks until the loop has read the FORK event. That loop runs in this process,
    // so fork with the bare syscall: glibc's fork() holds every malloc arena lock across the
    // syscall (its atfork handlers), and the loop allocating while it handles the event would
    // then deadlock (measured: 4 hangs in 40 runs). A restored task is another process than
    // dst, so this only concerns the test.
    let child = unsafe { libc::syscall(libc::SYS_clone, libc::SIGCHLD as libc::c_long, 0, 0, 0, 0) }
        as libc::pid_t;
    if child == 0 {
        // Child: async-signal-safe only. Reads pages nobody has copied yet.
        let sum = checksum(base + first * P, n);
        unsafe {
            libc::write(fds[1], (&sum as *const u64).cast(), 8);
            libc::_exit(0);
        }
    }
    assert!(child > 0);
    unsafe { libc::close(fds[1]) };
    let mut pipe = unsafe { std::fs::File::from_raw_fd(fds[0]) };
    let mut buf = [0u8; 8];
    pipe.read_exact(&mut buf).unwrap();
    assert_eq!(
        u64::from_ne_bytes(buf),
        expected_checksum(base, first, n),
        "child read wrong data"
    );
    let mut status = 0;
    assert_eq!(unsafe { libc::waitpid(child, &mut status, 0) }, child);
    assert!(libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0);

    push_all(&h.tx, 11, base, &img, pages, 1024);
    wait_complete(&h.events, Duration::from_secs(30));
    assert_whole(&region, &img);
    let c = h.stats.counters();
    eprintln!("(d) {c:?}");
    assert!(
        c.pages_copied_urgent >= 2 * n,
        "the child's pages go to parent and child"
    );
    h.finish();
}

// ---- (e) lazy-pages.socket with a fake restore ----

fn send_fd(sock: &UnixStream, fd: RawFd) {
    use nix::sys::socket::{ControlMessage, MsgFlags, sendmsg};
    let iov = [std::io::IoSlice::new(&[0u8])];
    let fds = [fd];
    sendmsg::<()>(
        sock.as_raw_fd(),
        &iov,
        &[ControlMessage::ScmRights(&fds)],
        MsgFlags::empty(),
        None,
    )
    .unwrap();
}

fn temp_dir(tag: &str) -> std::path::PathBuf {
    let d = std::env::temp_dir().join(format!("pageserv-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

#[test]
fn lazy_socket_receives_tasks_and_finish() {
    require_root!();
    let _g = serial();
    let dir = temp_dir("lazysock");
    // A stale socket file is replaced.
    std::fs::write(dir.join("lazy-pages.socket"), b"stale").unwrap();
    let sock = LazySocket::bind(&dir).unwrap();
    let path = sock.path().to_owned();
    let region = Region::new(MIB);
    let uffd = new_uffd(region.addr, region.len);
    let uffd_raw = uffd.as_raw_fd();
    let restore = std::thread::spawn(move || {
        use std::io::Write;
        let mut s = UnixStream::connect(&path).unwrap();
        s.write_all(&100i32.to_ne_bytes()).unwrap();
        send_fd(&s, uffd_raw);
        s.write_all(&(-101i32).to_ne_bytes()).unwrap();
        // A pid split over two writes.
        let w = 102i32.to_ne_bytes();
        s.write_all(&w[..2]).unwrap();
        std::thread::sleep(Duration::from_millis(20));
        s.write_all(&w[2..]).unwrap();
        send_fd(&s, uffd_raw);
        std::thread::sleep(Duration::from_millis(20));
        s.write_all(&RESTORE_FINISHED.to_ne_bytes()).unwrap();
        s
    });
    let mut conn = sock
        .accept_restore_within(3, Duration::from_secs(10))
        .unwrap();
    conn.set_timeout(Some(Duration::from_secs(10)));
    let me = std::process::id() as i32;
    let t1 = conn.next_task().unwrap();
    assert_eq!((t1.pid, t1.sender_pid), (100, Some(me)));
    let fd = t1.uffd.expect("a live task's uffd");
    let link = std::fs::read_link(format!("/proc/self/fd/{}", fd.as_raw_fd())).unwrap();
    assert_eq!(link.to_str().unwrap(), "anon_inode:[userfaultfd]");
    let t2 = conn.next_task().unwrap();
    assert!(t2.is_zombie() && t2.pid == 101);
    let t3 = conn.next_task().unwrap();
    assert_eq!(t3.pid, 102);
    assert!(t3.uffd.is_some());
    assert_eq!(conn.tasks_remaining(), 0);
    assert!(conn.next_task().is_err(), "no fourth record");
    conn.wait_restore_finished().unwrap();
    drop(restore.join().unwrap());
    drop(uffd);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn lazy_socket_reports_an_early_hangup() {
    let _g = serial();
    let dir = temp_dir("lazyhup");
    let sock = LazySocket::bind(&dir).unwrap();
    let path = sock.path().to_owned();
    let restore = std::thread::spawn(move || {
        use std::io::Write;
        let mut s = UnixStream::connect(&path).unwrap();
        s.write_all(&(-5i32).to_ne_bytes()).unwrap();
    });
    let mut conn = sock.accept_restore(1).unwrap();
    assert!(conn.next_task().unwrap().is_zombie());
    restore.join().unwrap();
    let err = conn.wait_restore_finished().unwrap_err();
    assert!(matches!(err, LazySocketError::Hangup { .. }), "{err}");
    assert!(
        err.to_string()
            .contains("restore ended before it finished: see restore log")
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn lazy_socket_binds_in_a_long_work_dir() {
    let _g = serial();
    let dir = temp_dir(&"d".repeat(120));
    let sock = LazySocket::bind(&dir).unwrap();
    assert!(dir.join("lazy-pages.socket").exists());
    let d = std::fs::File::open(&dir).unwrap();
    let short = format!("/proc/self/fd/{}/lazy-pages.socket", d.as_raw_fd());
    let client = std::thread::spawn(move || {
        use std::io::Write;
        let mut s = UnixStream::connect(short).unwrap();
        s.write_all(&RESTORE_FINISHED.to_ne_bytes()).unwrap();
    });
    let mut conn = sock
        .accept_restore_within(0, Duration::from_secs(10))
        .unwrap();
    conn.wait_restore_finished().unwrap();
    client.join().unwrap();
    assert!(
        !dir.join("lazy-pages.socket").exists(),
        "unlinked after accept"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn accept_times_out_without_a_restore() {
    let _g = serial();
    let dir = temp_dir("lazyto");
    let sock = LazySocket::bind(&dir).unwrap();
    let err = sock
        .accept_restore_within(1, Duration::from_millis(100))
        .err()
        .unwrap();
    assert!(matches!(err, LazySocketError::Timeout { .. }), "{err}");
    let _ = std::fs::remove_dir_all(&dir);
}

// ---- (f) a separate process whose memory is incomplete at shutdown is killed ----

/// What a restored child does first: creates its own uffd, registers `[addr, addr + len)`,
/// sends the uffd over `sock` and closes its copy. Async-signal-safe; exits 10 or 11 on failure.
fn uffd_handed_over(sock: RawFd, addr: u64, len: u64) {
    unsafe {
        let fd = raw_uffd();
        if fd < 0 || !raw_register(fd, addr, len) {
            libc::_exit(10);
        }
        let mut byte = 0u8;
        let mut iov = libc::iovec {
            iov_base: (&mut byte as *mut u8).cast(),
            iov_len: 1,
        };
        let mut cbuf = [0u64; 4];
        let mut msg: libc::msghdr = std::mem::zeroed();
        msg.msg_iov = &mut iov;
        msg.msg_iovlen = 1;
        msg.msg_control = cbuf.as_mut_ptr().cast();
        msg.msg_controllen = libc::CMSG_SPACE(4) as usize;
        let c = libc::CMSG_FIRSTHDR(&msg);
        (*c).cmsg_level = libc::SOL_SOCKET;
        (*c).cmsg_type = libc::SCM_RIGHTS;
        (*c).cmsg_len = libc::CMSG_LEN(4) as usize;
        std::ptr::write_unaligned(libc::CMSG_DATA(c).cast::<RawFd>(), fd);
        if libc::sendmsg(sock, &msg, 0) != 1 {
            libc::_exit(11);
        }
        libc::close(fd);
    }
}

/// Child side of a "restored process": creates its own uffd, registers `addr`, sends it over
/// `sock`, closes it, reads page 0 (served), reports a checksum, then reads page 100 (never
/// served). Async-signal-safe only.
fn restored_child(sock: RawFd, pipe: RawFd, addr: u64, len: u64) -> ! {
    unsafe {
        uffd_handed_over(sock, addr, len);
        let sum = checksum(addr, 1);
        libc::write(pipe, (&sum as *const u64).cast(), 8);
        let _ = std::ptr::read_volatile((addr + 100 * P) as *const u8);
        libc::_exit(12);
    }
}

fn recv_fd(sock: &UnixStream) -> OwnedFd {
    use nix::sys::socket::{ControlMessageOwned, MsgFlags, recvmsg};
    let mut b = [0u8; 1];
    let mut iov = [std::io::IoSliceMut::new(&mut b)];
    let mut cmsg = nix::cmsg_space!([RawFd; 1]);
    let msg = recvmsg::<()>(
        sock.as_raw_fd(),
        &mut iov,
        Some(&mut cmsg),
        MsgFlags::empty(),
    )
    .unwrap();
    for c in msg.cmsgs().unwrap() {
        if let ControlMessageOwned::ScmRights(fds) = c {
            return unsafe { OwnedFd::from_raw_fd(fds[0]) };
        }
    }
    panic!("no fd from the child");
}

/// Forks a "restored process" running `child` on `region`; returns its pid, the read end of
/// its report pipe and the uffd it handed over.
fn restored_process(
    region: &Region,
    child: fn(RawFd, RawFd, u64, u64) -> !,
) -> (libc::pid_t, std::fs::File, OwnedFd) {
    let (parent_sock, child_sock) = UnixStream::pair().unwrap();
    let mut fds = [0; 2];
    assert_eq!(unsafe { libc::pipe(fds.as_mut_ptr()) }, 0);
    let pid = unsafe { libc::fork() };
    if pid == 0 {
        child(child_sock.as_raw_fd(), fds[1], region.addr, region.len);
    }
    assert!(pid > 0, "fork: {}", std::io::Error::last_os_error());
    unsafe { libc::close(fds[1]) };
    let pipe = unsafe { std::fs::File::from_raw_fd(fds[0]) };
    (pid, pipe, recv_fd(&parent_sock))
}

fn refuse_beyond_first_page(base: u64, img: u64) -> bool {
    img != base
}

#[test]
fn incomplete_processes_are_killed_at_shutdown() {
    require_root!();
    let _g = serial();
    let region = Region::new(MIB);
    let (base, pages) = (region.addr, region.pages());
    let img = image(base, pages);
    let (child, mut pipe, uffd) = restored_process(&region, restored_child);
    let h = start(
        LoopConfig::default(),
        2000,
        base,
        img,
        refuse_beyond_first_page,
    );
    h.restored(2000, uffd, region.lazy(), Some(child));
    // Cross-process copy: the child saw page 0's image data.
    let mut buf = [0u8; 8];
    pipe.read_exact(&mut buf).unwrap();
    assert_eq!(u64::from_ne_bytes(buf), expected_checksum(base, 0, 1));
    // Let it block on page 100, which the source never answers.
    let deadline = Instant::now() + Duration::from_secs(10);
    while h.stats.counters().faults < 2 {
        assert!(
            Instant::now() < deadline,
            "the child never faulted on page 100"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    let report = h.handle.shutdown(true).unwrap();
    assert_eq!(report.incomplete, vec![2000]);
    assert_eq!(report.killed, vec![child]);
    let mut status = 0;
    assert_eq!(unsafe { libc::waitpid(child, &mut status, 0) }, child);
    assert!(
        libc::WIFSIGNALED(status) && libc::WTERMSIG(status) == libc::SIGKILL,
        "status {status:#x}"
    );
    h.source.join().unwrap();
}

// ---- measurements ----

fn raw_copy(fd: RawFd, dst: u64, src: &[u8]) {
    let mut c = UffdioCopy {
        dst,
        src: src.as_ptr() as u64,
        len: src.len() as u64,
        mode: 0,
        copy: 0,
    };
    unsafe { uffdio_copy(fd, &mut c) }.unwrap();
    assert_eq!(c.copy as usize, src.len());
}

#[test]
fn measure_copy_throughput() {
    require_root!();
    let _g = serial();
    let batch = 4 * MIB;
    let region = Region::new(256 * MIB);
    let uffd = new_uffd(region.addr, region.len);
    let src = image(0, batch / P);
    let t = Instant::now();
    for off in (0..region.len).step_by(batch as usize) {
        raw_copy(uffd.as_raw_fd(), region.addr + off, &src);
    }
    let raw = region.len as f64 / t.elapsed().as_secs_f64() / (1u64 << 30) as f64;
    expect_page(region.addr + 5 * P, 5 * P);
    drop(uffd);
    drop(region);

    // The same through the loop: 4 MiB background pushes until Complete.
    let (region, img, h) = serve_region(256 * MIB, LoopConfig::default(), 3);
    let t = Instant::now();
    push_all(&h.tx, 3, region.addr, &img, region.pages(), batch / P);
    wait_complete(&h.events, Duration::from_secs(60));
    let through_loop = region.len as f64 / t.elapsed().as_secs_f64() / (1u64 << 30) as f64;
    assert_eq!(h.stats.counters().pages_copied_pushed, region.pages());
    expect_page(region.addr + 12345 * P, region.addr + 12345 * P);
    eprintln!(
        "MEASURE UFFDIO_COPY 4 MiB batches: raw {raw:.2} GiB/s, through the loop {through_loop:.2} GiB/s"
    );
    h.finish();
}

#[test]
fn measure_fault_round_trip() {
    require_root!();
    let _g = serial();
    let (region, _img, h) = serve_region(16 * MIB, LoopConfig::default(), 4);
    let (base, pages) = (region.addr, region.pages());
    let mut order: Vec<u64> = (0..pages).collect();
    Rng(99).shuffle(&mut order);
    let mut samples = Vec::with_capacity(pages as usize);
    for pg in order {
        let a = base + pg * P;
        let t = Instant::now();
        let v = unsafe { std::ptr::read_volatile(a as *const u64) };
        samples.push(t.elapsed().as_nanos() as u64);
        assert_eq!(v, word(a, 0));
    }
    wait_complete(&h.events, Duration::from_secs(30));
    samples.sort();
    let q = |f: f64| samples[((samples.len() - 1) as f64 * f) as usize] as f64 / 1000.0;
    let lat = h.stats.fault_latency.snapshot();
    let lq = |f| lat.quantile(f).unwrap() as f64 / 1000.0;
    eprintln!(
        "MEASURE fault round trip ({} faults, instant source): touch p50 {:.1} us p99 {:.1} us; \
         loop fault->copy p50 {:.1} us p99 {:.1} us",
        samples.len(),
        q(0.5),
        q(0.99),
        lq(0.5),
        lq(0.99)
    );
    assert_eq!(lat.count, pages);
    assert_eq!(h.stats.counters().pages_copied_urgent, pages);
    h.finish();
}

// ---- zero pages: faults outside the lazy set, `Inbound::Zero`, and pages before their task ----

#[test]
fn zero_runs_non_lazy_faults_and_early_pages() {
    require_root!();
    let _g = serial();
    let region = Region::new(2 * MIB);
    let base = region.addr;
    let lazy_pages = 256;
    let img = image(base, lazy_pages);
    let uffd = new_uffd(base, region.len);
    let h = start(LoopConfig::default(), 21, base, img.clone(), never);
    // Pages before the task: kept until it arrives.
    push_all(
        &h.tx,
        21,
        base + 16 * P,
        &img.slice((16 * P) as usize..),
        lazy_pages - 16,
        100,
    );
    h.tx.send(Inbound::Zero {
        at: PidRange::new(21, base, 16),
        urgent: false,
        link: 0,
    })
    .unwrap();
    h.restored(21, uffd, vec![PageRange::new(base, lazy_pages)], None);
    wait_complete(&h.events, Duration::from_secs(30));
    for pg in 0..16 {
        assert!(is_zero_page(base + pg * P));
    }
    for pg in 16..lazy_pages {
        expect_page(base + pg * P, base + pg * P);
    }
    // Registered but not lazy: answered with a zero page, no request.
    assert!(is_zero_page(base + 300 * P));
    // The loop counts the zero page just after the ioctl that woke us.
    let deadline = Instant::now() + Duration::from_secs(5);
    while h.stats.counters().zero_pages < 1 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(1));
    }
    let c = h.stats.counters();
    eprintln!("(zero) {c:?}");
    assert_eq!((c.lazy_zero_pages, c.zero_pages), (16, 1));
    assert_eq!((c.requests, c.pages_copied_pushed), (0, lazy_pages - 16));
    h.finish();
}

// ---- several arrivals in one message (the push placer's batches) ----

/// `Inbound::Arrivals` places its runs as separate messages would: every 16th page a zero run
/// between data runs (the bench workload's layout), while threads fault; a Shutdown sent right
/// behind the last batch finds every page placed.
#[test]
fn arrivals_in_one_message_place_data_and_zero_runs() {
    require_root!();
    let _g = serial();
    let (region, img, h) = serve_region(8 * MIB, LoopConfig::default(), 41);
    let (base, pages) = (region.addr, region.pages());
    let is_zero = |pg: u64| pg % 16 == 15;
    let readers: Vec<_> = (0..2u64)
        .map(|r| {
            std::thread::spawn(move || {
                // Data pages only: the fake source answers a fault with the image's data.
                let mut order: Vec<u64> =
                    (0..pages).filter(|p| p % 2 == r && !is_zero(*p)).collect();
                Rng(r + 11).shuffle(&mut order);
                for pg in order.into_iter().take(300) {
                    expect_page(base + pg * P, base + pg * P);
                }
            })
        })
        .collect();
    // Batches of 64 pages: 4 data runs of 15 pages and 4 zero pages each.
    for batch in 0..pages / 64 {
        let mut runs = Vec::new();
        for k in 0..4 {
            let first = batch * 64 + k * 16;
            let data = img.slice((first * P) as usize..((first + 15) * P) as usize);
            runs.push((PidRange::new(41, base + first * P, 15), Some(data)));
            runs.push((PidRange::new(41, base + (first + 15) * P, 1), None));
        }
        h.tx.send(Inbound::Arrivals { runs, link: 0 }).unwrap();
    }
    // Right behind the last batch, before anything said Complete: every run of every batch is
    // placed before the Shutdown is handled.
    let report = h.handle.shutdown(false).unwrap();
    assert!(report.incomplete.is_empty() && report.killed.is_empty());
    for r in readers {
        r.join().unwrap();
    }
    for pg in 0..pages {
        if is_zero(pg) {
            assert!(is_zero_page(base + pg * P), "page {pg} should read zero");
        } else {
            expect_page(base + pg * P, base + pg * P);
        }
    }
    let c = h.stats.counters();
    eprintln!("(arrivals) {c:?}");
    assert_eq!(c.lazy_zero_pages, pages / 16, "every zero run placed");
    assert_eq!(
        c.pages_copied_urgent + c.pages_copied_pushed + c.lazy_zero_pages,
        pages,
        "each page placed exactly once"
    );
    assert!(c.faults > 0 && c.pages_copied_pushed > 0);
    h.source.join().unwrap();
}

// ---- EAGAIN: copies racing with mremap events ----

#[test]
fn copies_survive_concurrent_remaps() {
    require_root!();
    let _g = serial();
    let (region, img, h) = serve_region(32 * MIB, LoopConfig::default(), 31);
    let (base, pages) = (region.addr, region.pages());
    // One page goes back and forth while every page is pushed; each mremap holds the
    // process's uffd "changing" until the loop reads the event, so copies meet EAGAIN.
    let parking = Region::new(P);
    let (x, y) = (base + 5 * MIB, parking.addr);
    let mover = std::thread::spawn(move || {
        for _ in 0..1000 {
            for (from, to) in [(x, y), (y, x)] {
                let r = unsafe {
                    libc::mremap(
                        from as *mut libc::c_void,
                        P as usize,
                        P as usize,
                        libc::MREMAP_MAYMOVE | libc::MREMAP_FIXED,
                        to as *mut libc::c_void,
                    )
                };
                assert_eq!(r as u64, to);
            }
        }
    });
    std::thread::sleep(Duration::from_millis(2));
    push_all(&h.tx, 31, base, &img, pages, 1024);
    mover.join().unwrap();
    wait_complete(&h.events, Duration::from_secs(60));
    assert_whole(&region, &img);
    let c = h.stats.counters();
    eprintln!("(eagain) {c:?}");
    assert_eq!(c.pages_copied_pushed, pages);
    h.finish();
}

// ---- ENOENT: a VMA split after the dump (mprotect, no event) inside one pushed run ----

#[test]
fn runs_across_a_vma_split_are_placed_page_by_page() {
    require_root!();
    let _g = serial();
    let region = Region::new(8 * MIB);
    let (base, pages) = (region.addr, region.pages());
    let img = image(base, pages);
    let uffd = new_uffd(base, region.len);
    let split = base + MIB + 3 * P;
    assert_eq!(
        unsafe { libc::mprotect(split as *mut libc::c_void, P as usize, libc::PROT_READ) },
        0
    );
    let h = start(LoopConfig::default(), 33, base, img.clone(), never);
    h.restored(33, uffd, region.lazy(), None);
    push_all(&h.tx, 33, base, &img, pages, 1024);
    wait_complete(&h.events, Duration::from_secs(30));
    assert_whole(&region, &img);
    let c = h.stats.counters();
    eprintln!("(enoent) {c:?}");
    assert_eq!((c.pages_copied_pushed, c.pages_dropped), (pages, 0));
    h.finish();
}

// ---- a restored process's fork child is killed too ----

/// Like `restored_child`, but forks first: the grandchild reports its pid, then both block on
/// pages the source never sends.
fn forking_child(sock: RawFd, pipe: RawFd, addr: u64, len: u64) -> ! {
    unsafe {
        uffd_handed_over(sock, addr, len);
        let g = libc::fork();
        if g == 0 {
            let _ = std::ptr::read_volatile((addr + 100 * P) as *const u8);
            libc::_exit(13);
        }
        libc::write(pipe, (&g as *const i32).cast(), 4);
        let _ = std::ptr::read_volatile((addr + 101 * P) as *const u8);
        libc::_exit(12);
    }
}

#[test]
fn fork_children_of_incomplete_processes_are_killed() {
    require_root!();
    let _g = serial();
    let region = Region::new(MIB);
    let (base, pages) = (region.addr, region.pages());
    let img = image(base, pages);
    let (child, mut pipe, uffd) = restored_process(&region, forking_child);
    let h = start(LoopConfig::default(), 2100, base, img, |_, _| true);
    h.restored(2100, uffd, region.lazy(), Some(child));
    let mut buf = [0u8; 4];
    pipe.read_exact(&mut buf).unwrap();
    let grandchild = i32::from_ne_bytes(buf);
    let deadline = Instant::now() + Duration::from_secs(10);
    while h.stats.counters().faults < 2 {
        assert!(
            Instant::now() < deadline,
            "child and grandchild never faulted"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    assert_eq!(
        h.stats.counters().tasks,
        2,
        "the fork child has its own view"
    );
    let report = h.handle.shutdown(true).unwrap();
    assert_eq!(report.incomplete, vec![2100, 2100]);
    let mut want = vec![child, grandchild];
    want.sort();
    assert_eq!(report.killed, want);
    let mut status = 0;
    assert_eq!(unsafe { libc::waitpid(child, &mut status, 0) }, child);
    assert!(libc::WIFSIGNALED(status) && libc::WTERMSIG(status) == libc::SIGKILL);
    // The grandchild is not ours to reap: it is dead once /proc shows it gone or a zombie.
    let stat = std::fs::read_to_string(format!("/proc/{grandchild}/stat")).unwrap_or_default();
    let state = stat
        .rsplit(')')
        .next()
        .and_then(|r| r.split_whitespace().next());
    assert!(
        matches!(state, None | Some("Z") | Some("X")),
        "grandchild state {state:?}"
    );
    h.source.join().unwrap();
}

// ---- pushes that arrive before the restorer registered the ranges ----

/// CRIU hands over each task's uffd before its restorer mremaps and registers the lazy ranges.
/// Background pages that arrive in between must wait for the restore to finish: copied at once
/// they fail with ENOENT, and a loop that dropped them then would answer the later faults with
/// zero pages (seen for real as a restored workload dying on a zeroed TLS page).
#[test]
fn pushes_before_the_ranges_are_registered_wait_for_the_restore() {
    require_root!();
    let _g = serial();
    let region = Region::new(2 * MIB);
    let base = region.addr;
    let lazy_pages = 256;
    let img = image(base, lazy_pages);
    let fd = raw_uffd();
    assert!(fd >= 0, "userfaultfd: {}", std::io::Error::last_os_error());
    // The uffd exists but nothing is registered yet, as right after CRIU's handover.
    let uffd = unsafe { OwnedFd::from_raw_fd(fd) };
    let h = start(LoopConfig::default(), 22, base, img.clone(), never);
    h.tx.send(Inbound::Task {
        pid: 22,
        uffd,
        lazy: vec![PageRange::new(base, lazy_pages)],
        host_pid: None,
    })
    .unwrap();
    push_all(&h.tx, 22, base, &img, lazy_pages, 64);
    std::thread::sleep(Duration::from_millis(100));
    // Now the "restorer" registers the range, and the restore finishes.
    assert!(
        raw_register(fd, base, region.len),
        "UFFDIO_REGISTER: {}",
        std::io::Error::last_os_error()
    );
    h.tx.send(Inbound::RestoreFinished).unwrap();
    wait_complete(&h.events, Duration::from_secs(30));
    for pg in 0..lazy_pages {
        expect_page(base + pg * P, base + pg * P);
    }
    let c = h.stats.counters();
    assert_eq!(
        (c.pages_copied_pushed, c.pages_dropped),
        (lazy_pages, 0),
        "{c:?}"
    );
    h.finish();
}
