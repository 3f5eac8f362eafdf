//! Runtime ↔ image address translation for one address space. mremap moves runtime addresses;
//! the source only knows image (dump-time) addresses, so every request and every arriving page
//! goes through here.

use std::collections::BTreeMap;

use crate::pages::PAGE_SIZE;

/// A linear run: runtime `[rt, rt + nr_pages pages)` holds image `[img, img + nr_pages pages)`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Seg {
    pub rt: u64,
    pub img: u64,
    pub nr_pages: u64,
}

impl Seg {
    pub fn rt_end(&self) -> u64 {
        self.rt + self.nr_pages * PAGE_SIZE
    }
    pub fn img_end(&self) -> u64 {
        self.img + self.nr_pages * PAGE_SIZE
    }
}

/// Segments that overlap neither in runtime nor in image addresses. A segment never spans two
/// lazy pieces (the caller inserts one per piece and the map only splits them), so a copy that
/// stays inside one segment stays inside one dump-time VMA.
#[derive(Debug, Clone, Default)]
pub(super) struct Translation {
    /// runtime start → segment
    by_rt: BTreeMap<u64, Seg>,
    /// image start → runtime start
    by_img: BTreeMap<u64, u64>,
}

impl Translation {
    pub fn insert(&mut self, seg: Seg) {
        if seg.nr_pages == 0 {
            return;
        }
        self.by_img.insert(seg.img, seg.rt);
        self.by_rt.insert(seg.rt, seg);
    }

    fn remove(&mut self, rt: u64) -> Option<Seg> {
        let seg = self.by_rt.remove(&rt)?;
        self.by_img.remove(&seg.img);
        Some(seg)
    }

    /// The segment holding runtime address `addr`.
    pub fn at_rt(&self, addr: u64) -> Option<Seg> {
        let (_, seg) = self.by_rt.range(..=addr).next_back()?;
        (addr < seg.rt_end()).then_some(*seg)
    }

    /// The segment holding image address `addr`.
    pub fn at_img(&self, addr: u64) -> Option<Seg> {
        let (_, rt) = self.by_img.range(..=addr).next_back()?;
        let seg = self.by_rt.get(rt)?;
        (addr < seg.img_end()).then_some(*seg)
    }

    /// Splits the segment containing runtime `addr` (page-aligned) so that `addr` starts one.
    fn split_rt(&mut self, addr: u64) {
        let Some(seg) = self.at_rt(addr) else { return };
        if seg.rt == addr {
            return;
        }
        let head = (addr - seg.rt) / PAGE_SIZE;
        self.remove(seg.rt);
        self.insert(Seg {
            nr_pages: head,
            ..seg
        });
        self.insert(Seg {
            rt: addr,
            img: seg.img + head * PAGE_SIZE,
            nr_pages: seg.nr_pages - head,
        });
    }

    /// Removes and returns every mapping inside runtime `[start, end)` (page-aligned), cutting
    /// segments that straddle the edges.
    pub fn take_rt(&mut self, start: u64, end: u64) -> Vec<Seg> {
        if start >= end {
            return Vec::new();
        }
        self.split_rt(start);
        self.split_rt(end);
        let keys: Vec<u64> = self.by_rt.range(start..end).map(|(k, _)| *k).collect();
        keys.into_iter().filter_map(|k| self.remove(k)).collect()
    }
}
