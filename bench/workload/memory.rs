//! The workload's memory: N MiB of private anonymous pages in several chunks (each its own mmap,
//! so the churn can mremap one), and a version table (its own mapping) with one entry per page.
//!
//! A table entry is `version << 2 | ZERO | BUSY`. BUSY is a per-page spin lock: writers, the
//! checker and the churn set it (CAS) before touching the page and clear it with the new entry
//! (Release). Whoever holds a page's lock reads its chunk's address after taking it, and the churn
//! moves a chunk only while holding every lock of that chunk, so the address a holder sees is the
//! one the page is at. Nobody ever waits on a lock while holding another except the churn, so
//! there is no deadlock.

use crate::page::{self, Fault, PAGE_BYTES, PAGE_WORDS};
use std::io;
use std::ptr;
use std::sync::atomic::{AtomicPtr, AtomicU64, Ordering};

const BUSY: u64 = 1;
const ZERO: u64 = 2;
const VERSION_SHIFT: u32 = 2;
/// At most this many chunks; fewer when the memory has fewer pages.
pub const MAX_CHUNKS: usize = 16;

/// One mmap of consecutive pages.
pub struct Chunk {
    addr: AtomicPtr<u8>,
    /// Global index of the chunk's first page.
    pub first: usize,
    pub pages: usize,
}

impl Chunk {
    /// Current address (it changes when the churn moves the chunk).
    pub fn addr(&self) -> usize {
        self.addr.load(Ordering::Acquire) as usize
    }
}

/// The pages, their chunks and the version table.
pub struct Memory {
    /// Mixed into every page's payload so that two workloads' pages differ.
    pub salt: u64,
    pub pages: usize,
    chunk_pages: usize,
    pub chunks: Vec<Chunk>,
    table: &'static [AtomicU64],
}

fn map_anon(bytes: usize, prot: libc::c_int) -> io::Result<*mut u8> {
    // SAFETY: a fresh private anonymous mapping; no existing memory is affected.
    let p = unsafe {
        libc::mmap(
            ptr::null_mut(),
            bytes,
            prot,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
            -1,
            0,
        )
    };
    if p == libc::MAP_FAILED {
        return Err(io::Error::last_os_error());
    }
    Ok(p.cast())
}

/// The table's decoded entry for one page.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Entry {
    pub version: u64,
    pub zero: bool,
}

impl Entry {
    fn encode(self) -> u64 {
        (self.version << VERSION_SHIFT) | if self.zero { ZERO } else { 0 }
    }
    fn decode(raw: u64) -> Self {
        Entry {
            version: raw >> VERSION_SHIFT,
            zero: raw & ZERO != 0,
        }
    }
}

/// Exclusive access to one page; dropping it releases the page unchanged.
pub struct PageGuard<'a> {
    mem: &'a Memory,
    pub index: usize,
    pub entry: Entry,
}

impl PageGuard<'_> {
    /// The page's words.
    pub fn words(&mut self) -> &mut [u64; PAGE_WORDS] {
        // SAFETY: we hold the page's lock, so nobody else reads or writes it and its chunk
        // cannot move; the address is inside a live mapping of the chunk.
        unsafe { &mut *(self.mem.page_addr(self.index) as *mut [u64; PAGE_WORDS]) }
    }

    /// Checks the page against the table.
    pub fn verify(&mut self) -> Result<(), Fault> {
        let (salt, index, e) = (self.mem.salt, self.index as u64, self.entry);
        page::verify(self.words(), salt, index, e.version, e.zero)
    }

    /// Reads the page's header and word `word` and checks them against the table (see
    /// [`page::spot_check`]): a read of the page, not a write. The loads feed the comparison,
    /// so the compiler cannot drop them; on a page not yet at the destination they fault.
    pub fn spot_check(&mut self, word: usize) -> Result<(), Fault> {
        let (salt, index, e) = (self.mem.salt, self.index as u64, self.entry);
        let words: &[u64; PAGE_WORDS] = self.words();
        page::spot_check(
            std::hint::black_box(words),
            salt,
            index,
            e.version,
            e.zero,
            word,
        )
    }

    /// Writes version `entry.version + 1` (zero or not as the content function decides) and
    /// releases the page with it.
    pub fn rewrite(mut self) {
        self.write_version(self.entry.version + 1);
    }

    /// Writes version `version`'s content; the table gets it when the guard drops.
    fn write_version(&mut self, version: u64) {
        let (salt, index) = (self.mem.salt, self.index as u64);
        let zero = page::is_zero_version(salt, index, version);
        if zero {
            self.words().fill(0);
        } else {
            page::fill(self.words(), salt, index, version);
        }
        self.entry = Entry { version, zero };
    }

    /// Records that the page now reads zero (after MADV_DONTNEED), with a new version.
    pub fn mark_zero(&mut self) {
        self.entry = Entry {
            version: self.entry.version + 1,
            zero: true,
        };
    }
}

impl Drop for PageGuard<'_> {
    fn drop(&mut self) {
        self.mem.table[self.index].store(self.entry.encode(), Ordering::Release);
    }
}

impl Memory {
    /// Maps `mib` MiB in up to [`MAX_CHUNKS`] chunks plus the table, and initialises every page
    /// (version 0; every 16th page zero, but written, so no page is left untouched).
    pub fn new(mib: usize, salt: u64) -> io::Result<Self> {
        let pages = match mib.checked_mul((1 << 20) / PAGE_BYTES) {
            Some(p) if p > 0 => p,
            _ => {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidInput,
                    format!("--mib {mib}: must be >= 1 and fit the address space"),
                ));
            }
        };
        let chunk_pages = pages.div_ceil(MAX_CHUNKS);
        let mut chunks = Vec::new();
        let mut first = 0;
        while first < pages {
            let n = chunk_pages.min(pages - first);
            let addr = map_anon(n * PAGE_BYTES, libc::PROT_READ | libc::PROT_WRITE)?;
            chunks.push(Chunk {
                addr: AtomicPtr::new(addr),
                first,
                pages: n,
            });
            first += n;
        }
        let table_bytes = (pages * 8).next_multiple_of(PAGE_BYTES);
        let table_addr = map_anon(table_bytes, libc::PROT_READ | libc::PROT_WRITE)?;
        // SAFETY: the mapping is page-aligned, zero-filled (a valid AtomicU64 array), never
        // unmapped, and only ever accessed through this slice.
        let table = unsafe { std::slice::from_raw_parts(table_addr as *const AtomicU64, pages) };
        let mem = Memory {
            salt,
            pages,
            chunk_pages,
            chunks,
            table,
        };
        for index in 0..pages {
            mem.lock(index).write_version(0);
        }
        Ok(mem)
    }

    /// The chunk holding page `index`.
    pub fn chunk_of(&self, index: usize) -> usize {
        index / self.chunk_pages
    }

    fn page_addr(&self, index: usize) -> usize {
        let c = &self.chunks[self.chunk_of(index)];
        c.addr() + (index - c.first) * PAGE_BYTES
    }

    /// Takes page `index`'s lock if it is free.
    pub fn try_lock(&self, index: usize) -> Option<PageGuard<'_>> {
        let slot = &self.table[index];
        let raw = slot.load(Ordering::Relaxed);
        if raw & BUSY != 0 {
            return None;
        }
        slot.compare_exchange(raw, raw | BUSY, Ordering::Acquire, Ordering::Relaxed)
            .ok()?;
        Some(PageGuard {
            mem: self,
            index,
            entry: Entry::decode(raw),
        })
    }

    /// Takes page `index`'s lock, trying up to `attempts` times (yielding between tries).
    pub fn lock_within(&self, index: usize, attempts: u32) -> Option<PageGuard<'_>> {
        for attempt in 0..attempts {
            if let Some(g) = self.try_lock(index) {
                return Some(g);
            }
            if attempt < 16 {
                std::hint::spin_loop();
            } else {
                std::thread::yield_now();
            }
        }
        None
    }

    /// Takes page `index`'s lock, waiting as long as it takes. Holders never wait on other
    /// locks (except the churn, which calls this), so the wait is short.
    pub fn lock(&self, index: usize) -> PageGuard<'_> {
        loop {
            if let Some(g) = self.lock_within(index, 1 << 20) {
                return g;
            }
        }
    }

    /// Verifies the pages of chunk `chunk` without locks, skipping pages that were locked. Only
    /// for a forked child: it is single-threaded, so nothing changes under it, and a lock held
    /// at fork time belongs to a thread that no longer exists. Allocation-free.
    pub fn verify_chunk_unlocked(&self, chunk: usize) -> Result<usize, (usize, Fault)> {
        let c = &self.chunks[chunk];
        let mut verified = 0;
        for index in c.first..c.first + c.pages {
            let raw = self.table[index].load(Ordering::Acquire);
            if raw & BUSY != 0 {
                continue;
            }
            let e = Entry::decode(raw);
            // SAFETY: single-threaded forked child; the address is inside the chunk.
            let words = unsafe { &*(self.page_addr(index) as *const [u64; PAGE_WORDS]) };
            page::verify(words, self.salt, index as u64, e.version, e.zero)
                .map_err(|f| (index, f))?;
            verified += 1;
        }
        Ok(verified)
    }

    /// MADV_DONTNEED on pages `first..first + count` (inside one chunk) and marks them zero:
    /// private anonymous pages read zero after it.
    pub fn dontneed(&self, first: usize, count: usize) -> io::Result<()> {
        let mut guards: Vec<PageGuard<'_>> = (first..first + count).map(|i| self.lock(i)).collect();
        let addr = self.page_addr(first);
        // SAFETY: the range is inside one chunk and we hold every page's lock.
        let r = unsafe { libc::madvise(addr as *mut _, count * PAGE_BYTES, libc::MADV_DONTNEED) };
        if r != 0 {
            return Err(io::Error::last_os_error());
        }
        guards.iter_mut().for_each(PageGuard::mark_zero);
        Ok(())
    }

    /// Rewrites pages `first..first + count` with their next version.
    pub fn reinit(&self, first: usize, count: usize) {
        for index in first..first + count {
            self.lock(index).rewrite();
        }
    }

    /// Moves chunk `chunk` to a new address with mremap; returns (old, new) addresses.
    pub fn move_chunk(&self, chunk: usize) -> io::Result<(usize, usize)> {
        let c = &self.chunks[chunk];
        let bytes = c.pages * PAGE_BYTES;
        let _guards: Vec<PageGuard<'_>> =
            (c.first..c.first + c.pages).map(|i| self.lock(i)).collect();
        let old = c.addr.load(Ordering::Acquire);
        // Reserve a fresh range so MREMAP_FIXED really moves the chunk somewhere else.
        let target = map_anon(bytes, libc::PROT_NONE)?;
        // SAFETY: `old..old+bytes` is exactly the chunk's mapping and `target` our reservation;
        // every page of the chunk is locked, so nobody accesses it during the move.
        let new = unsafe {
            libc::mremap(
                old.cast(),
                bytes,
                bytes,
                libc::MREMAP_MAYMOVE | libc::MREMAP_FIXED,
                target.cast::<libc::c_void>(),
            )
        };
        if new == libc::MAP_FAILED {
            let err = io::Error::last_os_error();
            // SAFETY: our own reservation, untouched by the failed mremap.
            unsafe { libc::munmap(target.cast(), bytes) };
            return Err(err);
        }
        // Published before the guards drop (Release), so the next holder sees it.
        c.addr.store(new.cast(), Ordering::Release);
        Ok((old as usize, new as usize))
    }
}
