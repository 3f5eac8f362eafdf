//! The page-server codec against real CRIU, 4.1.x or 4.2.x in its own header layout (needs root
//! and CRIU; skips with a printed reason when CRIU is absent).
//!
//! - `dump_session_decodes`: `criu dump --page-server` sends a whole dump to our listener, which
//!   answers with the server-side encoders; every frame must decode and the pages must match what
//!   the holder process wrote.
//! - `lazy_get_*`: `criu dump --lazy-pages` serves GETs from `GetClient`, over TCP and over a
//!   socketpair (`--ps-socket`), with throughput measurements; and what happens on a GET for an
//!   address the dump does not serve.
//!
//! The holder process is this test binary re-executed (`holder_entry` with `PAGESERV_PS_HOLDER`
//! set) as init of its own pid namespace.
//!
//! By topic: `dump_session` (a whole dump into our listener) and `lazy_get` (GETs from a lazy
//! dump, through `lazy_session`'s connection to it), on what `environment` provides (CRIU found
//! and run, its pagemap image read). The holder, its process and our handle on it, is here:
//! `holder_entry` stays at the top level, where `Holder::spawn` runs it by its exact name.

use std::fs;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use pageserv::criu::page_server::Layout;
use pageserv::pages::PAGE_SIZE;

use crate::environment::find_criu;

mod dump_session;
mod environment;
mod lazy_get;
mod lazy_session;

const HOLDER_ENV: &str = "PAGESERV_PS_HOLDER";
/// Set: the holder parks its thread on a page-aligned stack pointer (see `eager_dump_is_seen`).
const ALIGNED_SP_ENV: &str = "PAGESERV_PS_HOLDER_ALIGNED_SP";
/// The holder's region: 32 MiB of private anonymous memory.
const REGION_PAGES: u64 = 8192;
/// The first 28 MiB are written completely (long runs, for clamping and throughput); in the last
/// 4 MiB every fourth page stays untouched (absent pages must not be dumped).
const FULL_PAGES: u64 = 7168;
/// The header layout of the CRIU under test (4.1's 24 bytes or 4.2's 32).
fn layout() -> Layout {
    static L: std::sync::OnceLock<Layout> = std::sync::OnceLock::new();
    *L.get_or_init(|| {
        let bin = find_criu().expect("CRIU (setup checked it)");
        pageserv::criu::binary::Criu::at(&bin)
            .expect("CRIU version")
            .layout()
    })
}
const TIMEOUT: Duration = Duration::from_secs(60);
/// fd numbers CRIU gets for `--status-fd` and `--ps-socket`.
const STATUS_FD: i32 = 100;
const PS_SOCKET_FD: i32 = 101;

/// One CRIU dump at a time: they freeze and infect processes, and the throughput numbers are
/// only meaningful without a second dump competing for the 2 cores.
static SERIAL: Mutex<()> = Mutex::new(());

fn page_written(i: u64) -> bool {
    i < FULL_PAGES || i % 4 != 3
}

fn written_pages() -> u64 {
    (0..REGION_PAGES).filter(|&i| page_written(i)).count() as u64
}

/// The holder's bytes for page `i` of its region: every 8-byte word is distinct.
fn pattern_page(i: u64) -> Vec<u8> {
    (0..PAGE_SIZE / 8)
        .flat_map(|w| (0x5053_0000_0000_0000u64 ^ (i << 16) ^ w).to_le_bytes())
        .collect()
}

/// Not a test: the holder process, run by `Holder::spawn` with `HOLDER_ENV` set.
#[test]
#[ignore = "the holder process of the other tests; Holder::spawn runs it"]
fn holder_entry() {
    let Ok(ready) = std::env::var(HOLDER_ENV) else {
        return;
    };
    let len = (REGION_PAGES * PAGE_SIZE) as usize;
    // SAFETY: a fresh private anonymous mapping, only written through `region` below.
    let addr = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
            -1,
            0,
        )
    };
    assert_ne!(addr, libc::MAP_FAILED);
    // Huge pages would make untouched pages resident; the test counts pages exactly.
    // SAFETY: advising the mapping just created.
    unsafe { libc::madvise(addr, len, libc::MADV_NOHUGEPAGE) };
    // SAFETY: the mapping is `len` bytes, readable and writable, and nothing else aliases it.
    let region = unsafe { std::slice::from_raw_parts_mut(addr as *mut u8, len) };
    for i in (0..REGION_PAGES).filter(|&i| page_written(i)) {
        let o = (i * PAGE_SIZE) as usize;
        region[o..o + PAGE_SIZE as usize].copy_from_slice(&pattern_page(i));
    }
    let tmp = format!("{ready}.tmp");
    fs::write(&tmp, format!("{:#x}\n", addr as u64)).unwrap();
    fs::rename(&tmp, &ready).unwrap();
    #[cfg(target_arch = "x86_64")]
    if std::env::var_os(ALIGNED_SP_ENV).is_some() {
        park_on_page_aligned_stack();
    }
    loop {
        std::thread::sleep(Duration::from_secs(3600));
    }
}

/// Blocks this thread in pause(2) with its stack pointer exactly on a page boundary, as the
/// freeze of a dump may find a thread by chance.
#[cfg(target_arch = "x86_64")]
fn park_on_page_aligned_stack() -> ! {
    #[repr(C, align(4096))]
    struct Stack([u8; 1 << 16]);
    static mut STACK: Stack = Stack([0; 1 << 16]);
    let top = std::ptr::addr_of_mut!(STACK) as usize + (1 << 16);
    // SAFETY: the thread never returns or touches its old stack; the new one is ours alone and
    // the loop only makes the pause syscall (34), which needs no stack.
    unsafe {
        std::arch::asm!(
            "mov rsp, {top}",
            "2:",
            "mov eax, 34",
            "syscall",
            "jmp 2b",
            top = in(reg) top,
            options(noreturn)
        )
    }
}

/// The holder: init of its own pid namespace, region written, waiting to be dumped.
struct Holder {
    unshare: Child,
    /// Host pid (for `criu dump -t`).
    pid: i32,
    /// Pid inside its namespace (what the images and GET's dst_id use).
    vpid: u32,
    region: u64,
}

impl Holder {
    fn spawn(dir: &Path) -> Holder {
        Holder::spawn_with(dir, false)
    }

    fn spawn_with(dir: &Path, aligned_sp: bool) -> Holder {
        let ready = dir.join("holder.ready");
        let exe = std::env::current_exe().unwrap();
        // No --mount-proc: a private mount namespace makes CRIU dump the mount table, which fails
        // on this host whenever some /run/netns/* nsfs mount exists ("doesn't have a proper root
        // mount"). Sharing our mount namespace keeps mounts out of the dump.
        let unshare = Command::new("unshare")
            .args(["-p", "-f", "setsid"])
            .arg(&exe)
            .args([
                "--exact",
                "holder_entry",
                "--ignored",
                "--test-threads=1",
                "--nocapture",
            ])
            .env(HOLDER_ENV, &ready)
            .envs(aligned_sp.then_some((ALIGNED_SP_ENV, "1")))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let mut holder = Holder {
            unshare,
            pid: 0,
            vpid: 0,
            region: 0,
        };
        let deadline = Instant::now() + TIMEOUT;
        while !ready.exists() {
            assert!(
                Instant::now() < deadline,
                "holder did not get ready in {TIMEOUT:?}"
            );
            if let Some(st) = holder.unshare.try_wait().unwrap() {
                panic!("holder exited early: {st}");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let text = fs::read_to_string(&ready).unwrap();
        holder.region = u64::from_str_radix(text.trim().trim_start_matches("0x"), 16).unwrap();
        let up = holder.unshare.id();
        let children = fs::read_to_string(format!("/proc/{up}/task/{up}/children")).unwrap();
        holder.pid = children.split_whitespace().next().unwrap().parse().unwrap();
        let status = fs::read_to_string(format!("/proc/{}/status", holder.pid)).unwrap();
        let nspid = status.lines().find(|l| l.starts_with("NSpid:")).unwrap();
        holder.vpid = nspid.split_whitespace().last().unwrap().parse().unwrap();
        holder
    }

    /// Resident private anonymous pages per /proc/PID/smaps: (in the region, in the process).
    fn anon_pages(&self) -> (u64, u64) {
        let smaps = fs::read_to_string(format!("/proc/{}/smaps", self.pid)).unwrap();
        let (mut in_region, mut total, mut cur_is_region) = (0, 0, false);
        for line in smaps.lines() {
            let mut f = line.split_whitespace();
            match f.next() {
                Some(range) if range.contains('-') && !range.ends_with(':') => {
                    let start = range.split('-').next().unwrap();
                    cur_is_region = u64::from_str_radix(start, 16).unwrap() == self.region;
                }
                Some("Anonymous:") => {
                    let kb: u64 = f.next().unwrap().parse().unwrap();
                    total += kb / 4;
                    if cur_is_region {
                        in_region += kb / 4;
                    }
                }
                _ => {}
            }
        }
        (in_region, total)
    }

    fn region_page(&self, vaddr: u64) -> Option<u64> {
        let i = vaddr.checked_sub(self.region)? / PAGE_SIZE;
        (i < REGION_PAGES).then_some(i)
    }
}

impl Drop for Holder {
    fn drop(&mut self) {
        if self.pid > 0 {
            // SAFETY: signalling a pid we started; it is ours even if it has exited (unshare,
            // its parent, has not reaped it until we wait below).
            unsafe { libc::kill(self.pid, libc::SIGKILL) };
        }
        let _ = self.unshare.kill();
        let _ = self.unshare.wait();
    }
}
