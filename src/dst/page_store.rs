//! dst's page store: the pre-copied pages, kept until the source confirms them after the freeze.
//!
//! Page data lives in one memfd arena ([`crate::dst::store_arena`]), one 4 KiB slot per page,
//! written in large runs; a page that changes between rounds overwrites its slot. A confirmed run
//! is read back as a view of the arena's mapping, not copied. The index maps (pid, 2 MiB block)
//! to 512 slot numbers (2 KiB per 2 MiB of memory, no allocation per page); all-zero pages take
//! no slot.
//! Nothing here is ever placed into a process unless a Valid frame names it: see
//! [`PageStore::take_valid`].
//!
//! After the freeze the store only shrinks: once the fault loop has put a page into every
//! process of its pid (from here, as data or as a zero run), its slot is punched out of the arena
//! ([`PageStore::release`], fed by `dst::store_release`), so dst does not hold a 1 GiB store and
//! the 1 GiB it placed at once. A released slot is never read again: `take_valid` skips it (that
//! page is in place already, so nothing waits for it); a read that raced a release reads zeros
//! for a page already in place, which the fault loop never places over (see `take_valid`).

use std::collections::BTreeMap;
use std::sync::Mutex;

use bytes::Bytes;

use crate::dst::store_arena::Arena;
use crate::pages::PAGE_SIZE;

const BLOCK_PAGES: u64 = 512;
const BLOCK_BYTES: u64 = BLOCK_PAGES * PAGE_SIZE;
const EMPTY: u32 = u32::MAX;
const ZERO: u32 = u32::MAX - 1;
/// Most pages [`PageStore::release`] marks under one hold of its lock and then punches (256 KiB):
/// 512 measured fault p50 180-311 us against 27-45 us (README, "Pre-copy").
const PUNCH_PAGES: usize = 64;
/// Most data slots the store can address (1 TiB); [`PageStore::with_limit`] sets the real bound.
pub const MAX_SLOTS: u32 = 1 << 28;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error(
        "cannot create the pre-copy page store (a memfd of {mib} MiB, sized but not filled, \
         mapped read-only): {source}; an address-space limit (ulimit -v) counts the mapping, or \
         lower --max-page-store-mib"
    )]
    Create { mib: u64, source: std::io::Error },
    #[error(
        "writing {pages} pre-copied pages at {vaddr:#x} of pid {pid} into the page store: {source}"
    )]
    Write {
        pid: u32,
        vaddr: u64,
        pages: u64,
        source: std::io::Error,
    },
    #[error("reading stored page slots {slot}.. for pid {pid}: {source}")]
    Read {
        pid: u32,
        slot: u32,
        source: std::io::Error,
    },
    #[error("giving back page store slots {slot}.. of pid {pid} to the host: {source}")]
    Punch {
        pid: u32,
        slot: u32,
        source: std::io::Error,
    },
    #[error("refusing more pre-copied pages: {0}")]
    Full(crate::limits::LimitHit),
    #[error(
        "the source confirmed page {vaddr:#x} of pid {pid} as valid, but dst holds no copy of it: \
         the two sides disagree about the pre-copy; aborting rather than guess"
    )]
    NotHeld { pid: u32, vaddr: u64 },
    #[error("pre-copied pages at {vaddr:#x} (+{pages} pages) of pid {pid}: {why}")]
    BadRange {
        pid: u32,
        vaddr: u64,
        pages: u64,
        why: &'static str,
    },
}

/// A run of confirmed pages read back from the store: data, or all zero (`data` None).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Stored {
    pub vaddr: u64,
    pub nr_pages: u64,
    pub data: Option<Bytes>,
}

/// (pid, block number) -> slot of each page of the block.
type Index = BTreeMap<(u32, u64), Box<[u32; BLOCK_PAGES as usize]>>;

/// See the module docs.
pub struct PageStore {
    arena: Arena,
    index: Index,
    next_slot: u32,
    pages_zero: u64,
    /// Slots overwritten by a zero page (the arena does not reuse them).
    slots_dropped: u64,
    /// Bytes the arena and the index may use (`pageserv dst --max-page-store-mib`).
    max_bytes: u64,
    /// Data slots given back after their page was placed (see the module docs).
    released: Mutex<Released>,
}

/// Which data slots are punched out: one bit per slot, grown on the first release.
#[derive(Debug, Default)]
struct Released {
    bits: Vec<u64>,
}

impl Released {
    fn has(&self, slot: u32) -> bool {
        self.bits
            .get(slot as usize / 64)
            .is_some_and(|w| w & (1 << (slot % 64)) != 0)
    }

    /// Marks `slot`; false if it was marked already.
    fn mark(&mut self, slot: u32, slots: u32) -> bool {
        if self.bits.is_empty() {
            self.bits = vec![0; (slots as usize).div_ceil(64)];
        }
        let Some(w) = self.bits.get_mut(slot as usize / 64) else {
            return false;
        };
        let bit = 1u64 << (slot % 64);
        let new = *w & bit == 0;
        *w |= bit;
        new
    }

    fn count(&self) -> u64 {
        self.bits.iter().map(|w| u64::from(w.count_ones())).sum()
    }
}

impl PageStore {
    /// A store as large as it can address ([`MAX_SLOTS`]).
    pub fn new() -> Result<Self, StoreError> {
        Self::with_limit(crate::limits::page_store_bytes(u64::from(MAX_SLOTS), 0))
    }

    /// A store of at most `max_bytes` (arena and index: [`crate::limits::page_store_bytes`]).
    /// The arena is sized (not filled) for that many pages at once.
    pub fn with_limit(max_bytes: u64) -> Result<Self, StoreError> {
        let slots = (max_bytes / PAGE_SIZE).min(u64::from(MAX_SLOTS)) as u32;
        Ok(Self {
            arena: Arena::new(slots).map_err(|source| StoreError::Create {
                mib: crate::limits::mib(u64::from(slots) * PAGE_SIZE),
                source,
            })?,
            index: BTreeMap::new(),
            next_slot: 0,
            pages_zero: 0,
            slots_dropped: 0,
            max_bytes,
            released: Mutex::new(Released::default()),
        })
    }

    /// Memory the store uses: its arena and its index.
    pub fn bytes(&self) -> u64 {
        crate::limits::page_store_bytes(u64::from(self.next_slot), self.index.len() as u64)
    }

    /// Fails if `data_slots` slots and `blocks` index blocks would be over the limit.
    fn room(&self, data_slots: u32, blocks: usize, pid: u32, vaddr: u64) -> Result<(), StoreError> {
        let want = crate::limits::page_store_bytes(u64::from(data_slots), blocks as u64);
        if data_slots >= MAX_SLOTS || want > self.max_bytes {
            return Err(StoreError::Full(crate::limits::LimitHit::flag(
                format!(
                    "the pre-copy page store (page data and index; at page {vaddr:#x} of pid {pid})"
                ),
                format!("{} MiB", crate::limits::mib(self.max_bytes)),
                crate::limits::flag::MAX_PAGE_STORE,
            )));
        }
        Ok(())
    }

    /// Room for a page at `vaddr` of `pid`: its index block, if new.
    fn room_for_block(&self, pid: u32, vaddr: u64) -> Result<(), StoreError> {
        if self.index.contains_key(&(pid, vaddr / BLOCK_BYTES)) {
            return Ok(());
        }
        self.room(self.next_slot, self.index.len() + 1, pid, vaddr)
    }

    /// Pages held as data.
    pub fn pages_data(&self) -> u64 {
        u64::from(self.next_slot) - self.slots_dropped
    }

    /// Pages held as zero.
    pub fn pages_zero(&self) -> u64 {
        self.pages_zero
    }

    fn check(pid: u32, vaddr: u64, pages: u64) -> Result<(), StoreError> {
        let bad = |why| StoreError::BadRange {
            pid,
            vaddr,
            pages,
            why,
        };
        if !vaddr.is_multiple_of(PAGE_SIZE) {
            return Err(bad("not page aligned"));
        }
        pages
            .checked_mul(PAGE_SIZE)
            .and_then(|l| vaddr.checked_add(l))
            .ok_or(bad("runs past the address space"))?;
        Ok(())
    }

    fn slot_mut(index: &mut Index, pid: u32, vaddr: u64) -> &mut u32 {
        let block = index
            .entry((pid, vaddr / BLOCK_BYTES))
            .or_insert_with(|| Box::new([EMPTY; BLOCK_PAGES as usize]));
        &mut block[((vaddr % BLOCK_BYTES) / PAGE_SIZE) as usize]
    }

    fn slot(&self, pid: u32, vaddr: u64) -> u32 {
        self.index
            .get(&(pid, vaddr / BLOCK_BYTES))
            .map_or(EMPTY, |b| b[((vaddr % BLOCK_BYTES) / PAGE_SIZE) as usize])
    }

    /// Stores pre-copied pages `data` (whole pages) of `pid` at `vaddr`, replacing older copies.
    pub fn put(&mut self, pid: u32, vaddr: u64, data: &[u8]) -> Result<(), StoreError> {
        let pages = (data.len() as u64) / PAGE_SIZE;
        Self::check(pid, vaddr, pages)?;
        // Runs of pages whose slots are consecutive go to the arena in one write.
        let mut run: Option<(u32, usize, usize)> = None; // (first slot, data from, data to)
        for i in 0..pages {
            let at = vaddr + i * PAGE_SIZE;
            let next = self.next_slot;
            self.room_for_block(pid, at)?;
            let blocks = self.index.len();
            let slot = Self::slot_mut(&mut self.index, pid, at);
            let s = if *slot == EMPTY || *slot == ZERO {
                let want = crate::limits::page_store_bytes(u64::from(next) + 1, blocks as u64);
                if next >= MAX_SLOTS || want > self.max_bytes {
                    let max = self.max_bytes;
                    return Err(StoreError::Full(crate::limits::LimitHit::flag(
                        format!(
                            "the pre-copy page store (page data and index; at page {at:#x} of \
                             pid {pid})"
                        ),
                        format!("{} MiB", crate::limits::mib(max)),
                        crate::limits::flag::MAX_PAGE_STORE,
                    )));
                }
                if *slot == ZERO {
                    self.pages_zero -= 1;
                }
                *slot = next;
                self.next_slot += 1;
                next
            } else {
                *slot
            };
            let from = (i * PAGE_SIZE) as usize;
            let to = from + PAGE_SIZE as usize;
            run = match run {
                Some((first, f, t))
                    if first as u64 + ((t - f) as u64 / PAGE_SIZE) == u64::from(s) =>
                {
                    Some((first, f, to))
                }
                Some((first, f, t)) => {
                    self.write(pid, vaddr, first, &data[f..t])?;
                    Some((s, from, to))
                }
                None => Some((s, from, to)),
            };
        }
        if let Some((first, f, t)) = run {
            self.write(pid, vaddr, first, &data[f..t])?;
        }
        Ok(())
    }

    fn write(&self, pid: u32, vaddr: u64, slot: u32, bytes: &[u8]) -> Result<(), StoreError> {
        self.arena
            .write(slot, bytes)
            .map_err(|source| StoreError::Write {
                pid,
                vaddr,
                pages: bytes.len() as u64 / PAGE_SIZE,
                source,
            })
    }

    /// Records `nr_pages` all-zero pre-copied pages of `pid` at `vaddr`.
    pub fn put_zero(&mut self, pid: u32, vaddr: u64, nr_pages: u64) -> Result<(), StoreError> {
        Self::check(pid, vaddr, nr_pages)?;
        for i in 0..nr_pages {
            self.room_for_block(pid, vaddr + i * PAGE_SIZE)?;
            let slot = Self::slot_mut(&mut self.index, pid, vaddr + i * PAGE_SIZE);
            match *slot {
                ZERO => continue,
                EMPTY => {}
                _ => self.slots_dropped += 1,
            }
            *slot = ZERO;
            self.pages_zero += 1;
        }
        Ok(())
    }

    /// Checks, without reading any data, that every page a Valid frame names is held (what
    /// [`PageStore::take_valid`] would refuse), so a confirmation can be queued and read later.
    pub fn check_valid(
        &self,
        pid: u32,
        vaddr: u64,
        nr_pages: u64,
        bitmap: &[u8],
    ) -> Result<(), StoreError> {
        Self::check(pid, vaddr, nr_pages)?;
        for i in 0..nr_pages {
            let set = bitmap
                .get((i / 8) as usize)
                .is_some_and(|b| b & (1 << (i % 8)) != 0);
            let at = vaddr + i * PAGE_SIZE;
            if set && self.slot(pid, at) == EMPTY {
                return Err(StoreError::NotHeld { pid, vaddr: at });
            }
        }
        Ok(())
    }

    /// Reads back the pages of `[vaddr, +nr_pages)` whose bit is set in `bitmap` (a Valid frame:
    /// bit `i` LSB first is page `i`), as runs of data or zero pages. Every named page must be
    /// held: a confirmation of a page dst never got is an error, never a guess.
    pub fn take_valid(
        &self,
        pid: u32,
        vaddr: u64,
        nr_pages: u64,
        bitmap: &[u8],
    ) -> Result<Vec<Stored>, StoreError> {
        Self::check(pid, vaddr, nr_pages)?;
        let bit = |i: u64| {
            bitmap
                .get((i / 8) as usize)
                .is_some_and(|b| b & (1 << (i % 8)) != 0)
        };
        // The runs are cut under the lock (a release marks its slots under it). A slot released
        // after that reads as zeros through its view, for a page already in every process of its
        // pid: the fault loop never places over a page in place (UFFDIO_COPY: EEXIST).
        let runs = {
            let released = self.released.lock().unwrap_or_else(|e| e.into_inner());
            self.valid_runs(pid, vaddr, nr_pages, &bit, |s| s != ZERO && released.has(s))?
        };
        runs.into_iter()
            .map(|(at, n, first)| {
                let data = match first {
                    None => None,
                    Some(slot) => Some(
                        self.arena
                            .view(slot, n)
                            .map_err(|source| StoreError::Read { pid, slot, source })?,
                    ),
                };
                Ok(Stored {
                    vaddr: at,
                    nr_pages: n,
                    data,
                })
            })
            .collect()
    }

    /// The runs (address, pages, first data slot or None for zero pages) of held pages named in
    /// `bitmap`, released ones (`gone`) left out; an error for a named page not held.
    fn valid_runs(
        &self,
        pid: u32,
        vaddr: u64,
        nr_pages: u64,
        bit: &impl Fn(u64) -> bool,
        gone: impl Fn(u32) -> bool,
    ) -> Result<Vec<(u64, u64, Option<u32>)>, StoreError> {
        let mut out = Vec::new();
        let mut i = 0;
        while i < nr_pages {
            if !bit(i) {
                i += 1;
                continue;
            }
            let at = vaddr + i * PAGE_SIZE;
            let first = self.slot(pid, at);
            if first == EMPTY {
                return Err(StoreError::NotHeld { pid, vaddr: at });
            }
            if gone(first) {
                // Placed already: nothing waits for it.
                i += 1;
                continue;
            }
            let zero = first == ZERO;
            // The run: consecutive set bits of the same kind, data in consecutive slots (one
            // view of the arena).
            let mut n = 1;
            while i + n < nr_pages && bit(i + n) {
                let s = self.slot(pid, at + n * PAGE_SIZE);
                if s == EMPTY || (s == ZERO) != zero || gone(s) {
                    break;
                }
                if !zero && u64::from(s) != u64::from(first) + n {
                    break;
                }
                n += 1;
            }
            out.push((at, n, (!zero).then_some(first)));
            i += n;
        }
        Ok(out)
    }

    /// Pages of `pid` held (data or zero).
    #[cfg(test)]
    pub fn pages_of(&self, pid: u32) -> u64 {
        self.index
            .range((pid, 0)..=(pid, u64::MAX))
            .flat_map(|(_, b)| b.iter())
            .filter(|&&s| s != EMPTY)
            .count() as u64
    }

    /// Gives back the data slots of `[vaddr, +nr_pages)` of `pid`: the fault loop has put those
    /// pages into every process of `pid`, so no copy here is needed again. Pages not held, zero
    /// pages and slots released before are skipped; returns how many slots this call released.
    pub fn release(&self, pid: u32, vaddr: u64, nr_pages: u64) -> Result<u64, StoreError> {
        Self::check(pid, vaddr, nr_pages)?;
        // Marked under the lock, under which readers cut their runs: no read that starts after
        // this reaches these slots. The punch (freeing the pages) runs without it. A piece of at
        // most PUNCH_PAGES pages at a time, so a fault's read of the store never waits behind
        // the marking of a whole round (thousands of index lookups) nor a punch of many pages.
        let mut newly = 0;
        let mut i = 0;
        while i < nr_pages {
            let n = (nr_pages - i).min(PUNCH_PAGES as u64);
            let mut slots: Vec<u32> = {
                let mut released = self.released.lock().unwrap_or_else(|e| e.into_inner());
                (i..i + n)
                    .map(|k| self.slot(pid, vaddr + k * PAGE_SIZE))
                    .filter(|&s| s != EMPTY && s != ZERO)
                    .filter(|&s| released.mark(s, self.next_slot))
                    .collect()
            };
            slots.sort_unstable();
            newly += slots.len() as u64;
            self.punch(pid, &slots)?;
            i += n;
        }
        Ok(newly)
    }

    /// Data slots given back with [`PageStore::release`].
    pub fn released_pages(&self) -> u64 {
        self.released
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .count()
    }

    /// Punches sorted data slots out of the arena, consecutive ones at once.
    fn punch(&self, pid: u32, slots: &[u32]) -> Result<(), StoreError> {
        let mut i = 0;
        while i < slots.len() {
            let first = slots[i];
            let mut n = 1;
            while i + n < slots.len() && slots[i + n] == first + n as u32 {
                n += 1;
            }
            self.arena
                .punch(first, n as u64)
                .map_err(|source| StoreError::Punch {
                    pid,
                    slot: first,
                    source,
                })?;
            i += n;
        }
        Ok(())
    }

    /// Drops every page held for `pid` and gives its data back to the host (the arena's slots are
    /// punched out); returns how many pages were dropped. For a task whose memory came whole in
    /// the images (an eager dump): none of its pages can be confirmed, so none is kept.
    pub fn forget(&mut self, pid: u32) -> Result<u64, StoreError> {
        let keys: Vec<_> = self
            .index
            .range((pid, 0)..=(pid, u64::MAX))
            .map(|(k, _)| *k)
            .collect();
        let mut dropped = 0;
        let mut data_slots = Vec::new();
        for key in keys {
            let Some(block) = self.index.remove(&key) else {
                continue;
            };
            for &slot in block.iter().filter(|&&s| s != EMPTY) {
                dropped += 1;
                if slot == ZERO {
                    self.pages_zero -= 1;
                } else {
                    data_slots.push(slot);
                }
            }
        }
        self.slots_dropped += data_slots.len() as u64;
        data_slots.sort_unstable();
        self.punch(pid, &data_slots)?;
        Ok(dropped)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::HashMap;

    fn page(v: u8) -> Vec<u8> {
        vec![v; PAGE_SIZE as usize]
    }

    const P: u64 = PAGE_SIZE;

    /// Bytes of the arena the kernel holds (st_blocks, 512-byte units).
    fn arena_held(s: &PageStore) -> u64 {
        s.arena.held_bytes().unwrap()
    }

    /// A released page's slot is punched out of the arena (the memory goes back), counted once,
    /// and never read again: take_valid skips it and still reads its neighbours.
    #[test]
    fn a_released_page_gives_its_slot_back_and_is_never_read_again() {
        let mut s = PageStore::new().unwrap();
        let base = 0x7f00_0000_0000;
        let pages: Vec<u8> = (1..=8).flat_map(page).collect();
        s.put(1, base, &pages).unwrap();
        s.put_zero(1, base + 8 * P, 1).unwrap();
        let held = arena_held(&s);
        assert!(held >= 8 * P, "the arena holds the 8 pages: {held}");
        // Pages 2..5 and the zero page 8 were placed.
        assert_eq!(s.release(1, base + 2 * P, 4).unwrap(), 4);
        assert_eq!(
            s.release(1, base + 8 * P, 1).unwrap(),
            0,
            "a zero page has no slot"
        );
        assert_eq!(s.release(1, base + 3 * P, 2).unwrap(), 0, "released twice");
        assert_eq!(s.release(2, base, 4).unwrap(), 0, "nothing held for pid 2");
        assert_eq!(s.released_pages(), 4);
        assert_eq!(arena_held(&s), held - 4 * P, "4 slots punched out");
        let got = s.take_valid(1, base, 9, &[0xff, 0x01]).unwrap();
        let runs: Vec<(u64, u64, Option<u8>)> = got
            .iter()
            .map(|r| {
                let first = r.data.as_ref().map(|d| d[0]);
                ((r.vaddr - base) / P, r.nr_pages, first)
            })
            .collect();
        assert_eq!(
            runs,
            vec![(0, 2, Some(1)), (6, 2, Some(7)), (8, 1, None)],
            "released pages 2..5 skipped, the rest read as stored"
        );
        assert_eq!(got[1].data.as_ref().unwrap()[P as usize], 8);
    }

    #[test]
    fn the_limit_counts_data_and_the_index_of_zero_pages() {
        // Room for one index block and 3 data pages.
        let mut s = PageStore::with_limit(2048 + 3 * P).unwrap();
        s.put(1, 0, &[page(1), page(2), page(3)].concat()).unwrap();
        let e = s.put(1, 3 * P, &page(4)).unwrap_err().to_string();
        assert!(e.contains("--max-page-store-mib"), "{e}");
        // Sparse zero pages cost no data slot but an index block each: bounded as well.
        let mut s = PageStore::with_limit(4 * 2048).unwrap();
        let mut stored = 0;
        let err = loop {
            match s.put_zero(1, stored * BLOCK_BYTES, 1) {
                Ok(()) => stored += 1,
                Err(e) => break e,
            }
            assert!(stored < 100, "sparse zero pages stored without limit");
        };
        assert_eq!(stored, 4);
        assert!(err.to_string().contains("--max-page-store-mib"), "{err}");
        assert!(s.bytes() <= 4 * 2048);
    }

    #[test]
    fn keeps_the_last_copy_and_reads_confirmed_runs() {
        let mut s = PageStore::new().unwrap();
        let base = BLOCK_BYTES - 2 * P; // across a block boundary
        s.put(1, base, &[page(1), page(2), page(3), page(4)].concat())
            .unwrap();
        s.put(1, base + P, &page(9)).unwrap();
        s.put_zero(1, base + 2 * P, 1).unwrap();
        assert_eq!((s.pages_data(), s.pages_zero()), (3, 1));
        // Pages 0, 1, 2 valid; page 3 not confirmed.
        let got = s.take_valid(1, base, 4, &[0b0111]).unwrap();
        assert_eq!(got.len(), 2);
        assert_eq!(got[0].vaddr, base);
        assert_eq!(got[0].nr_pages, 2);
        let d = got[0].data.as_ref().unwrap();
        assert_eq!(d[0], 1);
        assert_eq!(d[P as usize], 9, "the newer copy");
        assert_eq!(
            got[1],
            Stored {
                vaddr: base + 2 * P,
                nr_pages: 1,
                data: None
            }
        );
        assert!(matches!(
            s.take_valid(2, base, 1, &[1]),
            Err(StoreError::NotHeld { pid: 2, .. })
        ));
        assert!(s.take_valid(1, 0x1001, 1, &[1]).is_err(), "unaligned");
        assert!(s.take_valid(1, base, 4, &[0]).unwrap().is_empty());
        // The same verdicts without reading: a confirmation may be queued only if all is held.
        assert!(s.check_valid(1, base, 4, &[0b0111]).is_ok());
        assert!(
            s.check_valid(1, base, 5, &[0b1_0000]).is_err(),
            "page 4 never held"
        );
        assert!(s.check_valid(1, base, 5, &[0b0_1111]).is_ok());
        assert!(matches!(
            s.check_valid(2, base, 1, &[1]),
            Err(StoreError::NotHeld { pid: 2, .. })
        ));
        assert!(s.check_valid(1, 0x1001, 1, &[1]).is_err(), "unaligned");
    }

    proptest! {
        /// Whatever was put last is what a confirmation reads back, page by page.
        #[test]
        fn reads_back_the_last_put(ops in prop::collection::vec((0u64..40, 1u64..6, any::<u8>(), any::<bool>()), 1..60)) {
            let mut s = PageStore::new().unwrap();
            let mut model: HashMap<u64, u8> = HashMap::new(); // page index -> byte (0 = zero page)
            for (first, n, v, zero) in ops {
                let vaddr = 0x7000_0000 + first * P;
                if zero || v == 0 {
                    s.put_zero(3, vaddr, n).unwrap();
                    for i in 0..n { model.insert(first + i, 0); }
                } else {
                    let data: Vec<u8> = (0..n).flat_map(|i| page(v.wrapping_add(i as u8) | 1)).collect();
                    s.put(3, vaddr, &data).unwrap();
                    for i in 0..n { model.insert(first + i, v.wrapping_add(i as u8) | 1); }
                }
            }
            let all = vec![0xffu8; 6];
            let got = s.take_valid(3, 0x7000_0000, 46, &all);
            let held_all = (0..46).all(|i| model.contains_key(&i));
            prop_assert_eq!(got.is_ok(), held_all);
            for i in 0..46u64 {
                if !model.contains_key(&i) { continue; }
                let mut bm = vec![0u8; 6];
                bm[(i / 8) as usize] = 1 << (i % 8);
                let got = s.take_valid(3, 0x7000_0000, 46, &bm).unwrap();
                prop_assert_eq!(got.len(), 1);
                let want = model[&i];
                match &got[0].data {
                    None => prop_assert_eq!(want, 0),
                    Some(d) => { prop_assert_eq!(d.len(), P as usize); prop_assert!(d.iter().all(|b| *b == want)); }
                }
            }
        }

        /// Forgetting one task drops all of its pages and gives their data back, and leaves every
        /// page of another task as it was.
        #[test]
        fn forgetting_a_task_keeps_the_others(ops in prop::collection::vec((1u32..3, 0u64..600, 1u64..6, any::<u8>()), 1..60)) {
            let mut s = PageStore::new().unwrap();
            let mut model: HashMap<(u32, u64), u8> = HashMap::new();
            for (pid, first, n, v) in ops {
                let vaddr = first * P;
                if v % 4 == 0 {
                    s.put_zero(pid, vaddr, n).unwrap();
                    for i in 0..n { model.insert((pid, first + i), 0); }
                } else {
                    s.put(pid, vaddr, &(0..n).flat_map(|_| page(v)).collect::<Vec<_>>()).unwrap();
                    for i in 0..n { model.insert((pid, first + i), v); }
                }
            }
            let held = |pid| model.keys().filter(|k| k.0 == pid).count() as u64;
            prop_assert_eq!(s.pages_of(1), held(1));
            prop_assert_eq!(s.forget(1).unwrap(), held(1));
            prop_assert_eq!(s.pages_of(1), 0);
            prop_assert_eq!(s.pages_data() + s.pages_zero(), held(2));
            for (&(pid, page_no), &want) in &model {
                let got = s.take_valid(pid, page_no * P, 1, &[1]);
                if pid == 1 {
                    let not_held = matches!(got, Err(StoreError::NotHeld { .. }));
                    prop_assert!(not_held);
                    continue;
                }
                let got = got.unwrap();
                match &got[0].data {
                    None => prop_assert_eq!(want, 0),
                    Some(d) => prop_assert!(d.iter().all(|b| *b == want)),
                }
            }
        }
    }
}
