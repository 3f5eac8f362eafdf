//! What the tests share: one test at a time, a process's raw userfaultfd setup, memory regions,
//! page content that depends on the image address, and the loop run around a fake source.

use std::os::fd::{FromRawFd, OwnedFd, RawFd};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use bytes::Bytes;
use crossbeam_channel::{Receiver, Sender};
use pageserv::dst::uffd_loop::{
    self, Inbound, LoopConfig, LoopHandle, LoopSender, Outbound, UffdStats,
};
use pageserv::pages::{PAGE_SIZE, PageRange, PidRange};

pub(crate) const P: u64 = PAGE_SIZE;
pub(crate) const MIB: u64 = 1 << 20;

/// One test at a time: a fork in one test would hand its uffd events to another's loop.
static SERIAL: Mutex<()> = Mutex::new(());

pub(crate) fn serial() -> MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

// ---- raw userfaultfd setup (what a restored process does itself) ----

#[repr(C)]
pub(crate) struct UffdioApi {
    api: u64,
    features: u64,
    ioctls: u64,
}
#[repr(C)]
pub(crate) struct UffdioRegister {
    start: u64,
    len: u64,
    mode: u64,
    ioctls: u64,
}
#[repr(C)]
pub(crate) struct UffdioCopy {
    pub(crate) dst: u64,
    pub(crate) src: u64,
    pub(crate) len: u64,
    pub(crate) mode: u64,
    pub(crate) copy: i64,
}
nix::ioctl_readwrite!(uffdio_api, 0xAA, 0x3F, UffdioApi);
nix::ioctl_readwrite!(uffdio_register, 0xAA, 0x00, UffdioRegister);
nix::ioctl_readwrite!(uffdio_copy, 0xAA, 0x03, UffdioCopy);

/// userfaultfd(O_CLOEXEC|O_NONBLOCK) + UFFDIO_API{FORK|REMAP|REMOVE|UNMAP}, as CRIU's
/// setup_uffd() does. Async-signal-safe (used in forked children): returns -1 on failure.
pub(crate) fn raw_uffd() -> RawFd {
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

pub(crate) fn raw_register(fd: RawFd, addr: u64, len: u64) -> bool {
    let mut reg = UffdioRegister {
        start: addr,
        len,
        mode: 1,
        ioctls: 0,
    };
    unsafe { uffdio_register(fd, &mut reg) }.is_ok()
}

pub(crate) fn new_uffd(addr: u64, len: u64) -> OwnedFd {
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
pub(crate) struct Region {
    pub(crate) addr: u64,
    pub(crate) len: u64,
}

impl Region {
    pub(crate) fn new(len: u64) -> Region {
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
    pub(crate) fn pages(&self) -> u64 {
        self.len / P
    }
    pub(crate) fn lazy(&self) -> Vec<PageRange> {
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

pub(crate) fn word(img_page: u64, i: u64) -> u64 {
    (img_page ^ 0x9E37_79B9_7F4A_7C15)
        .wrapping_mul(2 * i + 1)
        .rotate_left(17)
        | 1
}

/// The "image": content of `pages` pages starting at image address `base`.
pub(crate) fn image(base: u64, pages: u64) -> Bytes {
    let mut v = Vec::with_capacity((pages * P) as usize);
    for pg in 0..pages {
        for i in 0..P / 8 {
            v.extend_from_slice(&word(base + pg * P, i).to_ne_bytes());
        }
    }
    Bytes::from(v)
}

pub(crate) fn expect_page(rt_addr: u64, img_addr: u64) {
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

pub(crate) fn is_zero_page(addr: u64) -> bool {
    read_page(addr).iter().all(|b| *b == 0)
}

pub(crate) fn checksum(addr: u64, pages: u64) -> u64 {
    let mut sum = 0u64;
    for pg in 0..pages {
        for i in 0..P / 8 {
            let w = unsafe { std::ptr::read_volatile((addr + pg * P + i * 8) as *const u64) };
            sum = sum.wrapping_add(w.wrapping_mul(i + 1));
        }
    }
    sum
}

pub(crate) fn expected_checksum(base: u64, first: u64, pages: u64) -> u64 {
    let mut sum = 0u64;
    for pg in first..first + pages {
        for i in 0..P / 8 {
            sum = sum.wrapping_add(word(base + pg * P, i).wrapping_mul(i + 1));
        }
    }
    sum
}

// ---- a fake source and the loop around it ----

pub(crate) struct Harness {
    pub(crate) handle: LoopHandle,
    /// The loop's input.
    pub(crate) tx: LoopSender,
    pub(crate) stats: Arc<UffdStats>,
    /// Every outbound message except faults.
    pub(crate) events: Receiver<Outbound>,
    /// The requests the fake source answered, in order.
    pub(crate) source: JoinHandle<Vec<PidRange>>,
}

/// Starts the loop and a source thread that answers every fault of `pid` from `img` (based at
/// image address `base`) unless `refuse(img_vaddr)`.
pub(crate) fn start(
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
    pub(crate) fn restored(
        &self,
        pid: i32,
        uffd: OwnedFd,
        lazy: Vec<PageRange>,
        host_pid: Option<i32>,
    ) {
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
    pub(crate) fn finish(self) {
        self.handle.shutdown(false).unwrap();
        drop(self.tx);
        self.source.join().unwrap();
    }
}

/// A region of `len` bytes, all lazy, restored as task `pid`: the loop serves its faults from
/// the region's image (returned) through a fake source that answers every fault.
pub(crate) fn serve_region(len: u64, config: LoopConfig, pid: u32) -> (Region, Bytes, Harness) {
    let region = Region::new(len);
    let img = image(region.addr, region.pages());
    let uffd = new_uffd(region.addr, region.len);
    let h = start(config, pid, region.addr, img.clone(), never);
    h.restored(i32::try_from(pid).unwrap(), uffd, region.lazy(), None);
    (region, img, h)
}

/// Asserts that every byte of `region` equals the image.
pub(crate) fn assert_whole(region: &Region, img: &Bytes) {
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

pub(crate) fn never(_: u64, _: u64) -> bool {
    false
}

/// Pushes every page of `[base, base + pages)` in `chunk`-page messages, as background pages.
pub(crate) fn push_all(tx: &LoopSender, pid: u32, base: u64, img: &Bytes, pages: u64, chunk: u64) {
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

pub(crate) fn wait_complete(events: &Receiver<Outbound>, within: Duration) {
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

pub(crate) struct Rng(pub(crate) u64);
impl Rng {
    pub(crate) fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    pub(crate) fn shuffle<T>(&mut self, v: &mut [T]) {
        for i in (1..v.len()).rev() {
            v.swap(i, (self.next() % (i as u64 + 1)) as usize);
        }
    }
}
