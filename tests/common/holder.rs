//! A memory-holder process for CRIU tests: the test binary re-executes itself so that one
//! `#[test]` becomes a process that maps [`HOLDER_PAGES`] pages of private anonymous memory,
//! fills them in a known layout (pattern, written zeros, read-only touched, untouched), reports
//! the address and sleeps until CRIU dumps (and kills) it.
//!
//! Use from an integration test (which must also include `common/criu.rs` as `mod criu`):
//! ```ignore
//! #[path = "common/criu.rs"] mod criu;
//! #[path = "common/holder.rs"] mod holder;
//! #[test]
//! fn memory_holder() { holder::run_if_requested(); }   // a no-op in a normal test run
//! // elsewhere: let h = holder::spawn("memory_holder", dir)?;  then dump h.proc.pid
//! ```
#![allow(dead_code)]

use std::path::Path;
use std::time::Duration;

use super::criu::{self, PidnsProcess};

/// Set to the ready-file path in the re-executed test binary to make it a holder.
pub const HOLDER_ENV: &str = "PAGESERV_TEST_HOLDER";
/// Set to N: the holder starts N more threads, each asleep, before it is ready.
pub const THREADS_ENV: &str = "PAGESERV_TEST_HOLDER_THREADS";
/// Size of the holder's mapping: 64 MiB of 4 KiB pages.
pub const HOLDER_PAGES: u64 = 16384;
pub const PAGE: u64 = 4096;

/// What the holder did to a page of its mapping.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PageKind {
    /// Filled with [`pattern_word`]s: dumped, data known.
    Pattern,
    /// Written with zero bytes: a real anonymous page, dumped, data all zero.
    Zeroed,
    /// Only read: maps the shared zero page, which CRIU does not dump.
    ReadOnly,
    /// Never touched: not dumped.
    Untouched,
}

/// The fixed layout: in the first half, runs of 3 pattern pages, 1 zeroed, 1 untouched,
/// 1 read-only, 2 untouched; then one 1 MiB pattern run; then untouched up to the last page,
/// which is a pattern page (so a run ends exactly at the VMA's end).
pub fn page_kind(i: u64) -> PageKind {
    match i {
        0..8192 => match i % 8 {
            0..=2 => PageKind::Pattern,
            3 => PageKind::Zeroed,
            5 => PageKind::ReadOnly,
            _ => PageKind::Untouched,
        },
        8192..8448 => PageKind::Pattern,
        i if i == HOLDER_PAGES - 1 => PageKind::Pattern,
        _ => PageKind::Untouched,
    }
}

/// Whether CRIU should dump page `i` (it holds a real, non-zero-pfn anonymous page).
pub fn is_dumped(i: u64) -> bool {
    matches!(page_kind(i), PageKind::Pattern | PageKind::Zeroed)
}

/// Word `w` (0..512) of pattern page `i`: never zero, different on every page and word.
pub fn pattern_word(i: u64, w: u64) -> u64 {
    0x7061_6765_0000_0000 ^ (i << 16) ^ w
}

/// The bytes page `i` holds after setup (zeros for every non-pattern page).
pub fn expected_page(i: u64) -> Vec<u8> {
    match page_kind(i) {
        PageKind::Pattern => (0..PAGE / 8)
            .flat_map(|w| pattern_word(i, w).to_ne_bytes())
            .collect(),
        _ => vec![0; PAGE as usize],
    }
}

/// In a process started by [`spawn`], becomes the holder and never returns; otherwise returns at
/// once.
pub fn run_if_requested() {
    let Some(ready) = std::env::var_os(HOLDER_ENV) else {
        return;
    };
    let len = (HOLDER_PAGES * PAGE) as usize;
    // SAFETY: a fresh anonymous mapping; we only touch it within its length.
    let base = unsafe {
        let p = libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
            -1,
            0,
        );
        assert_ne!(p, libc::MAP_FAILED, "holder mmap");
        // Transparent huge pages would make one touch populate 512 pages.
        libc::madvise(p, len, libc::MADV_NOHUGEPAGE);
        p as *mut u8
    };
    for i in 0..HOLDER_PAGES {
        // SAFETY: page i lies inside the mapping.
        unsafe {
            let page = base.add((i * PAGE) as usize);
            match page_kind(i) {
                PageKind::Pattern => {
                    let words = page as *mut u64;
                    for w in 0..PAGE / 8 {
                        std::ptr::write_volatile(words.add(w as usize), pattern_word(i, w));
                    }
                }
                PageKind::Zeroed => std::ptr::write_volatile(page, 0),
                PageKind::ReadOnly => {
                    std::ptr::read_volatile(page);
                }
                PageKind::Untouched => {}
            }
        }
    }
    // More threads, each asleep, when asked for (tests of checks that go thread by thread).
    let extra: usize = std::env::var(THREADS_ENV)
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(0);
    for _ in 0..extra {
        std::thread::spawn(|| {
            loop {
                std::thread::sleep(Duration::from_secs(3600));
            }
        });
    }
    let ready = std::path::PathBuf::from(ready);
    let tmp = ready.with_extension("tmp");
    std::fs::write(&tmp, format!("{} {}\n", base as u64, HOLDER_PAGES)).expect("holder ready file");
    std::fs::rename(&tmp, &ready).expect("holder ready file");
    if let Some(trigger) = std::env::var_os(FORK_ENV) {
        fork_when_triggered(base, std::path::Path::new(&trigger));
    }
    loop {
        std::thread::sleep(Duration::from_secs(3600));
    }
}

/// With [`FORK_ENV`] set to a path: the holder polls for that file (every 10 ms; create it once
/// the holder is restored elsewhere, so only the restored copy sees it), then forks a child that
/// waits [`FORK_READ_DELAY`] and reads every pattern page of the mapping. The child writes its
/// verdict to the trigger path with the extension `result` ("ok", or "bad PAGE" for the first
/// page whose bytes differ, e.g. a zero page) and exits 0 or 1; the holder reaps it.
pub const FORK_ENV: &str = "PAGESERV_TEST_HOLDER_FORK";
/// How long the forked child waits before it reads (time for a test to act between the fork
/// and the reads).
pub const FORK_READ_DELAY: Duration = Duration::from_millis(600);

/// Where the forked child writes its verdict, for trigger path `trigger`.
pub fn fork_result(trigger: &Path) -> std::path::PathBuf {
    trigger.with_extension("result")
}

fn fork_when_triggered(base: *mut u8, trigger: &Path) {
    use std::os::unix::ffi::OsStrExt;
    let result =
        std::ffi::CString::new(fork_result(trigger).as_os_str().as_bytes()).expect("result path");
    while !trigger.exists() {
        std::thread::sleep(Duration::from_millis(10));
    }
    // SAFETY: the child only reads the mapping, formats into a stack buffer and calls
    // async-signal-safe functions (nanosleep, open, write, _exit): nothing that allocates.
    let pid = unsafe { libc::fork() };
    assert!(pid >= 0, "holder fork");
    if pid == 0 {
        let delay = libc::timespec {
            tv_sec: 0,
            tv_nsec: FORK_READ_DELAY.as_nanos() as libc::c_long,
        };
        let mut bad = None;
        // SAFETY: see above; every page read lies inside the mapping.
        unsafe {
            libc::nanosleep(&delay, std::ptr::null_mut());
            'pages: for i in 0..HOLDER_PAGES {
                if page_kind(i) != PageKind::Pattern {
                    continue;
                }
                let words = base.add((i * PAGE) as usize) as *const u64;
                for w in 0..PAGE / 8 {
                    if std::ptr::read_volatile(words.add(w as usize)) != pattern_word(i, w) {
                        bad = Some(i);
                        break 'pages;
                    }
                }
            }
        }
        let mut line = [0u8; 32];
        let len = match bad {
            None => {
                line[..3].copy_from_slice(b"ok\n");
                3
            }
            Some(i) => {
                line[..4].copy_from_slice(b"bad ");
                let mut digits = [0u8; 20];
                let (mut n, mut k) = (i, 0);
                loop {
                    digits[k] = b'0' + (n % 10) as u8;
                    k += 1;
                    n /= 10;
                    if n == 0 {
                        break;
                    }
                }
                for j in 0..k {
                    line[4 + j] = digits[k - 1 - j];
                }
                line[4 + k] = b'\n';
                5 + k
            }
        };
        // SAFETY: plain syscalls on a buffer we own; _exit skips the parent's atexit handlers.
        unsafe {
            let fd = libc::open(
                result.as_ptr(),
                libc::O_WRONLY | libc::O_CREAT | libc::O_TRUNC,
                0o644,
            );
            if fd >= 0 {
                libc::write(fd, line.as_ptr().cast(), len);
                libc::close(fd);
            }
            libc::_exit(i32::from(bad.is_some()));
        }
    }
    let mut status = 0;
    // SAFETY: waits for our own child (once: the holder only has to keep it from lingering).
    unsafe { libc::waitpid(pid, &mut status, 0) };
}

/// A running holder: its process and the dump-time address of its mapping.
pub struct Holder {
    pub proc: PidnsProcess,
    pub addr: u64,
}

/// Re-executes the current test binary as a holder (running only `test_name`, which must call
/// [`run_if_requested`]) in its own pid namespace and waits until its memory is set up.
/// `scratch` (unique to the test) receives the ready file and is the holder's cwd.
pub fn spawn(test_name: &str, scratch: &Path) -> Result<Holder, String> {
    spawn_with(test_name, scratch, &[])
}

/// [`spawn`] with more environment for the holder (e.g. [`FORK_ENV`]).
pub fn spawn_with(
    test_name: &str,
    scratch: &Path,
    envs: &[(&str, &str)],
) -> Result<Holder, String> {
    let exe = std::env::current_exe().map_err(|e| format!("current_exe: {e}"))?;
    let ready = scratch.join(format!("holder-{test_name}.ready"));
    let _ = std::fs::remove_file(&ready);
    let ready_s = ready.to_str().ok_or("non-UTF-8 scratch path")?;
    let proc = criu::spawn_in_pidns(
        &exe,
        &["--exact", test_name, "--nocapture", "--test-threads=1"],
        &[&[(HOLDER_ENV, ready_s)][..], envs].concat(),
        scratch,
    )?;
    criu::wait_for(Duration::from_secs(30), "the holder's ready file", || {
        ready.exists() || !proc.is_alive()
    })?;
    let text = std::fs::read_to_string(&ready)
        .map_err(|e| format!("holder pid {} died before it was ready ({e})", proc.pid))?;
    let addr = text
        .split_whitespace()
        .next()
        .and_then(|a| a.parse().ok())
        .ok_or_else(|| format!("bad ready file {}: {text:?}", ready.display()))?;
    Ok(Holder { proc, addr })
}
