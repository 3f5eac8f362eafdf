//! One userfaultfd's view of one restored process's lazy memory (sans-IO).
//!
//! A [`TaskMemory`] knows which lazy pages are still missing, which were requested for a fault
//! and which are settled (copied in, or dropped because the process removed or unmapped them), and
//! it translates runtime addresses (moved by mremap) to the image addresses the source knows.
//! The uffd loop feeds it events and asks it what to request and where to copy.

mod bitmap;
mod plan;
pub mod streams;
#[cfg(test)]
mod tests;
mod translate;

use bitmap::Bitmap;
pub use plan::CopyPlan;
use translate::{Seg, Translation};

use crate::pages::{PAGE_SIZE, PageRange, page_floor};

/// Most lazy pages one view tracks (1 TiB); the state costs 2 bits per page.
pub const MAX_LAZY_PAGES: u64 = 1 << 28;

/// Most pages one fault request asks for (4 MiB, CRIU's `MAX_XFER_LEN`).
pub const MAX_REQUEST_PAGES: u64 = 1024;

/// Why a lazy-range list cannot become a [`TaskMemory`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RegionsError {
    #[error(
        "lazy range {start:#x} (+{nr_pages} pages) of pid {pid} is not page-aligned or wraps the \
         address space: the pagemap image is corrupt"
    )]
    BadRange { pid: u32, start: u64, nr_pages: u64 },
    #[error(
        "lazy ranges at {first:#x} and {second:#x} of pid {pid} overlap: the pagemap image is corrupt"
    )]
    Overlap { pid: u32, first: u64, second: u64 },
    #[error(
        "pid {pid} has {pages} lazy pages, more than the {MAX_LAZY_PAGES} one daemon tracks: \
         migrate it without --lazy-pages"
    )]
    TooLarge { pid: u32, pages: u64 },
}

/// What to do about a page fault.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FaultAction {
    /// Not a missing lazy page (never lazy, already copied, or dropped): UFFDIO_ZEROPAGE one page.
    /// On a page that is in fact present the kernel answers EEXIST, which is harmless.
    Zero,
    /// The page is already requested; its arrival wakes the faulting thread.
    AlreadyRequested { img_vaddr: u64 },
    /// Ask the source for these image pages; they are now in flight.
    Request { img_vaddr: u64, nr_pages: u64 },
}

/// The state of one lazy page, for inspection and tests.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PageState {
    /// Not in any lazy range.
    NotLazy,
    /// Missing, not requested.
    Pending,
    /// Missing, requested for a fault.
    InFlight,
    /// Copied in, or dropped by REMOVE/UNMAP/ENOENT: must never be written again.
    Settled,
}

/// One run of arriving pages to copy: `nr_pages` pages from `data[offset_in_data..]` to
/// `runtime_addr`. A run never crosses a dump-time VMA.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CopyOp {
    pub img_vaddr: u64,
    pub runtime_addr: u64,
    pub offset_in_data: u64,
    pub nr_pages: u64,
}

impl CopyOp {
    /// The sub-run of `n` pages starting `skip` pages in (clamped to this run).
    pub fn sub(&self, skip: u64, n: u64) -> CopyOp {
        let skip = skip.min(self.nr_pages);
        CopyOp {
            img_vaddr: self.img_vaddr + skip * PAGE_SIZE,
            runtime_addr: self.runtime_addr + skip * PAGE_SIZE,
            offset_in_data: self.offset_in_data + skip * PAGE_SIZE,
            nr_pages: n.min(self.nr_pages - skip),
        }
    }
}

/// Event counters of one view.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RegionCounters {
    pub faults: u64,
    pub zero_faults: u64,
    pub requests: u64,
    pub pages_requested: u64,
    pub pages_placed: u64,
    pub pages_dropped: u64,
}

/// A lazy range as pieces of the state bitmaps: image `[img, img + nr_pages)` is bits
/// `[base, base + nr_pages)`.
#[derive(Debug, Clone, Copy)]
struct BitmapSpan {
    img: u64,
    nr_pages: u64,
    base: u64,
}

impl BitmapSpan {
    fn img_end(&self) -> u64 {
        self.img + self.nr_pages * PAGE_SIZE
    }
}

/// One uffd's view of one restored process's lazy memory. See the module docs.
#[derive(Debug, Clone)]
pub struct TaskMemory {
    pid: u32,
    readahead: u64,
    /// Sequential fault streams, when adaptive read-ahead is on ([`TaskMemory::with_sequential`]).
    streams: Option<streams::Streams>,
    pieces: Vec<BitmapSpan>,
    pending: Bitmap,
    in_flight: Bitmap,
    nr_pending: u64,
    nr_in_flight: u64,
    map: Translation,
    counters: RegionCounters,
}

impl TaskMemory {
    /// The view of image pid `pid` whose lazy memory is `lazy` (image addresses, each range
    /// inside one VMA). Runtime addresses start equal to image addresses.
    pub fn new(pid: u32, lazy: &[PageRange]) -> Result<Self, RegionsError> {
        let mut ranges: Vec<PageRange> = lazy.iter().copied().filter(|r| r.nr_pages > 0).collect();
        ranges.sort();
        let mut pieces: Vec<BitmapSpan> = Vec::with_capacity(ranges.len());
        let mut total: u64 = 0;
        for r in &ranges {
            let bad = RegionsError::BadRange {
                pid,
                start: r.start,
                nr_pages: r.nr_pages,
            };
            let len = r.nr_pages.checked_mul(PAGE_SIZE).ok_or(bad.clone())?;
            if !r.start.is_multiple_of(PAGE_SIZE) || r.start.checked_add(len).is_none() {
                return Err(bad);
            }
            if let Some(prev) = pieces.last().copied()
                && prev.img_end() > r.start
            {
                return Err(RegionsError::Overlap {
                    pid,
                    first: prev.img,
                    second: r.start,
                });
            }
            pieces.push(BitmapSpan {
                img: r.start,
                nr_pages: r.nr_pages,
                base: total,
            });
            total = total.saturating_add(r.nr_pages);
            if total > MAX_LAZY_PAGES {
                return Err(RegionsError::TooLarge { pid, pages: total });
            }
        }
        let mut pending = Bitmap::new(total);
        pending.set_range(0, total);
        let mut map = Translation::default();
        for p in &pieces {
            map.insert(Seg {
                rt: p.img,
                img: p.img,
                nr_pages: p.nr_pages,
            });
        }
        Ok(Self {
            pid,
            readahead: 0,
            streams: None,
            pieces,
            pending,
            in_flight: Bitmap::new(total),
            nr_pending: total,
            nr_in_flight: 0,
            map,
            counters: RegionCounters::default(),
        })
    }

    /// Also request up to `pages` pending pages that follow a faulting page in the same range
    /// (capped so that one request is at most 4 MiB, CRIU's largest transfer).
    pub fn with_readahead(mut self, pages: u64) -> Self {
        self.readahead = pages.min(MAX_REQUEST_PAGES - 1);
        self
    }

    /// Adaptive read-ahead for threads that fault in address order ([`streams`]): a fault that
    /// continues a recent request asks for up to twice as many pages as it, up to
    /// [`streams::SEQ_MAX_PAGES`]; random faults are unaffected.
    pub fn with_sequential(mut self, on: bool) -> Self {
        self.streams = on.then(streams::Streams::default);
        self
    }

    /// The image pid this memory's requests go to (a FORK child keeps its parent's).
    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// Lazy pages not yet requested.
    pub fn pending_pages(&self) -> u64 {
        self.nr_pending
    }

    /// Lazy pages requested for a fault and not yet in place.
    pub fn in_flight_pages(&self) -> u64 {
        self.nr_in_flight
    }

    /// True once no lazy page is missing: every one is copied in or was dropped.
    pub fn is_complete(&self) -> bool {
        self.nr_pending == 0 && self.nr_in_flight == 0
    }

    pub fn counters(&self) -> &RegionCounters {
        &self.counters
    }

    /// The piece holding image address `img` and the page's bit.
    fn locate(&self, img: u64) -> Option<(&BitmapSpan, u64)> {
        let i = self
            .pieces
            .partition_point(|p| p.img <= img)
            .checked_sub(1)?;
        let p = &self.pieces[i];
        (img < p.img_end()).then(|| (p, p.base + (img - p.img) / PAGE_SIZE))
    }

    /// The state of the page at image address `img`.
    pub fn state_of(&self, img: u64) -> PageState {
        match self.locate(page_floor(img)) {
            None => PageState::NotLazy,
            Some((_, b)) if self.pending.get(b) => PageState::Pending,
            Some((_, b)) if self.in_flight.get(b) => PageState::InFlight,
            Some(_) => PageState::Settled,
        }
    }

    /// The image page behind runtime address `rt`, if it is (or was) lazy and is still mapped.
    pub fn image_of(&self, rt: u64) -> Option<u64> {
        let rt = page_floor(rt);
        self.map.at_rt(rt).map(|s| s.img + (rt - s.rt))
    }

    /// The runtime page holding image address `img`, if still mapped.
    pub fn runtime_of(&self, img: u64) -> Option<u64> {
        let img = page_floor(img);
        self.map.at_img(img).map(|s| s.rt + (img - s.img))
    }

    /// A fault at runtime address `rt`.
    pub fn on_fault(&mut self, rt: u64) -> FaultAction {
        self.counters.faults += 1;
        let zero = |me: &mut Self| {
            me.counters.zero_faults += 1;
            FaultAction::Zero
        };
        let Some(img) = self.image_of(rt) else {
            return zero(self);
        };
        let Some((piece, bit)) = self.locate(img).map(|(p, b)| (*p, b)) else {
            return zero(self);
        };
        if self.in_flight.get(bit) {
            return FaultAction::AlreadyRequested { img_vaddr: img };
        }
        if !self.pending.get(bit) {
            return zero(self);
        }
        // Read-ahead stays inside the piece (one pagemap entry, one VMA) and stops at the first
        // page that is not pending, so a request is always one contiguous pending run.
        let piece_end_bit = piece.base + piece.nr_pages;
        let seq = self.streams.as_mut().map_or(0, |s| s.on_fault(bit));
        let limit = (bit + 1 + self.readahead.max(seq)).min(piece_end_bit);
        let end = self.pending.first_clear(bit, limit).unwrap_or(limit);
        if let Some(s) = &mut self.streams {
            s.requested(bit, end);
        }
        let n = end - bit;
        self.nr_pending -= self.pending.clear_range(bit, end);
        self.nr_in_flight += self.in_flight.set_range(bit, end);
        self.counters.requests += 1;
        self.counters.pages_requested += n;
        FaultAction::Request {
            img_vaddr: img,
            nr_pages: n,
        }
    }

    /// Pages `[img_vaddr, +nr_pages)` arrived from the source (data, or "these are zero").
    /// Returns the plan of copies this view still needs; it borrows the view, so nothing else
    /// can change it until the copies are reported.
    pub fn on_pages(&mut self, img_vaddr: u64, nr_pages: u64) -> CopyPlan<'_> {
        let end = nr_pages
            .checked_mul(PAGE_SIZE)
            .and_then(|len| img_vaddr.checked_add(len))
            .filter(|_| img_vaddr.is_multiple_of(PAGE_SIZE))
            .unwrap_or(img_vaddr);
        CopyPlan {
            mem: self,
            start: img_vaddr,
            cursor: img_vaddr,
            end,
        }
    }

    /// Settles `op`'s first `n` pages: marks the needed ones placed (or dropped), if `op` still
    /// matches the current translation. Returns how many pages changed state.
    fn settle(&mut self, op: &CopyOp, n: u64, placed: bool) -> u64 {
        let n = n.min(op.nr_pages);
        let Some(seg) = self.map.at_img(op.img_vaddr) else {
            return 0;
        };
        let (Some((p1, b1)), Some((p2, _))) = (
            self.locate(op.img_vaddr),
            self.locate(op.img_vaddr + n.saturating_sub(1) * PAGE_SIZE),
        ) else {
            return 0;
        };
        let end_img = op.img_vaddr + n * PAGE_SIZE;
        if n == 0
            || p1.img != p2.img
            || seg.rt + (op.img_vaddr - seg.img) != op.runtime_addr
            || end_img > seg.img_end()
        {
            return 0;
        }
        let was_pending = self.pending.clear_range(b1, b1 + n);
        let was_in_flight = self.in_flight.clear_range(b1, b1 + n);
        self.nr_pending -= was_pending;
        self.nr_in_flight -= was_in_flight;
        let changed = was_pending + was_in_flight;
        if placed {
            self.counters.pages_placed += changed;
        } else {
            self.counters.pages_dropped += changed;
        }
        changed
    }

    /// Drops runtime `[start, end)`: its lazy pages are never written afterwards.
    fn drop_rt(&mut self, start: u64, end: u64) {
        for seg in self.map.take_rt(start, end) {
            self.drop_img(seg.img, seg.nr_pages);
        }
    }

    /// Settles the lazy pages of image `[img, +nr_pages)` without placing them.
    fn drop_img(&mut self, img: u64, nr_pages: u64) {
        let end = img + nr_pages * PAGE_SIZE;
        let mut at = img;
        while at < end {
            let i = self.pieces.partition_point(|p| p.img_end() <= at);
            let Some(p) = self.pieces.get(i).copied() else {
                break;
            };
            if p.img >= end {
                break;
            }
            let from = at.max(p.img);
            let to = end.min(p.img_end());
            let (b1, b2) = (
                p.base + (from - p.img) / PAGE_SIZE,
                p.base + (to - p.img) / PAGE_SIZE,
            );
            let was_pending = self.pending.clear_range(b1, b2);
            let was_in_flight = self.in_flight.clear_range(b1, b2);
            self.nr_pending -= was_pending;
            self.nr_in_flight -= was_in_flight;
            self.counters.pages_dropped += was_pending + was_in_flight;
            at = to;
        }
    }

    /// UFFD_EVENT_REMOVE (madvise DONTNEED/REMOVE) of runtime `[start, end)`.
    pub fn on_remove(&mut self, start: u64, end: u64) {
        self.drop_rt(page_floor(start), page_ceil(end));
    }

    /// UFFD_EVENT_UNMAP of runtime `[start, end)`.
    pub fn on_unmap(&mut self, start: u64, end: u64) {
        self.drop_rt(page_floor(start), page_ceil(end));
    }

    /// UFFD_EVENT_REMAP: runtime `[from, from + len)` moved to `to`. Whatever was mapped at the
    /// destination is gone (the kernel unmapped it first).
    pub fn on_remap(&mut self, from: u64, to: u64, len: u64) {
        let (from, to, len) = (page_floor(from), page_floor(to), page_ceil(len));
        let moved = self.map.take_rt(from, from.saturating_add(len));
        self.drop_rt(to, to.saturating_add(len));
        for seg in moved {
            let rt = seg.rt - from + to;
            self.map.insert(Seg { rt, ..seg });
        }
    }

    /// The view of a child created by fork: the same mappings, and every page still missing here
    /// is missing there (in-flight ones too: the child needs them copied separately).
    pub fn fork_child(&self) -> TaskMemory {
        let mut child = self.clone();
        child.pending.absorb(&mut child.in_flight);
        child.nr_pending += child.nr_in_flight;
        child.nr_in_flight = 0;
        child.counters = RegionCounters::default();
        child
    }

    /// The image address of the pending page nearest to `img`: the first at or after it, else the
    /// last before it.
    pub fn next_pending_near(&self, img: u64) -> Option<u64> {
        let img = page_floor(img);
        let i = self.pieces.partition_point(|p| p.img_end() <= img);
        for p in &self.pieces[i..] {
            let from = p.base + (img.max(p.img) - p.img) / PAGE_SIZE;
            if let Some(b) = self.pending.first_set(from, p.base + p.nr_pages) {
                return Some(p.img + (b - p.base) * PAGE_SIZE);
            }
        }
        for p in self.pieces[..(i + 1).min(self.pieces.len())].iter().rev() {
            let to = p.base + (img.clamp(p.img, p.img_end()) - p.img) / PAGE_SIZE;
            if let Some(b) = self.pending.last_set(p.base, to) {
                return Some(p.img + (b - p.base) * PAGE_SIZE);
            }
        }
        None
    }

    /// Image ranges requested for a fault and not yet in place, in address order.
    pub fn in_flight_ranges(&self) -> Vec<PageRange> {
        let mut out = Vec::new();
        for p in &self.pieces {
            let end = p.base + p.nr_pages;
            let mut b = p.base;
            while let Some(s) = self.in_flight.first_set(b, end) {
                let e = self.in_flight.first_clear(s, end).unwrap_or(end);
                out.push(PageRange::new(p.img + (s - p.base) * PAGE_SIZE, e - s));
                b = e;
            }
        }
        out
    }

    /// Every missing (pending or in-flight) image range, in address order.
    pub fn missing_ranges(&self) -> Vec<PageRange> {
        let mut out = Vec::new();
        for p in &self.pieces {
            let end = p.base + p.nr_pages;
            let mut b = p.base;
            while let Some(s) = self.pending.first_set_either(&self.in_flight, b, end) {
                let e = self
                    .pending
                    .first_clear_both(&self.in_flight, s, end)
                    .unwrap_or(end);
                out.push(PageRange::new(p.img + (s - p.base) * PAGE_SIZE, e - s));
                b = e;
            }
        }
        out
    }
}

fn page_ceil(x: u64) -> u64 {
    x.checked_add(PAGE_SIZE - 1)
        .map_or(page_floor(u64::MAX), page_floor)
}
