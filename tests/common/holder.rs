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
    let ready = std::path::PathBuf::from(ready);
    let tmp = ready.with_extension("tmp");
    std::fs::write(&tmp, format!("{} {}\n", base as u64, HOLDER_PAGES)).expect("holder ready file");
    std::fs::rename(&tmp, &ready).expect("holder ready file");
    loop {
        std::thread::sleep(Duration::from_secs(3600));
    }
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
    let exe = std::env::current_exe().map_err(|e| format!("current_exe: {e}"))?;
    let ready = scratch.join(format!("holder-{test_name}.ready"));
    let _ = std::fs::remove_file(&ready);
    let ready_s = ready.to_str().ok_or("non-UTF-8 scratch path")?;
    let proc = criu::spawn_in_pidns(
        &exe,
        &["--exact", test_name, "--nocapture", "--test-threads=1"],
        &[(HOLDER_ENV, ready_s)],
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
