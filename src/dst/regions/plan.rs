//! Copy plans: which runs of arrived pages one view still needs, and their outcomes.

use super::CopyOp;
use super::TaskMemory;
use crate::pages::PAGE_SIZE;

/// The copies one view needs for one arrival of pages. Take runs with [`CopyPlan::next_op`],
/// copy them, and report each with [`CopyPlan::placed`] (or [`CopyPlan::unplaceable`]).
/// A run reported short is offered again by the next `next_op`: stop first if the copy must wait
/// (EAGAIN: read the uffd's events, then make a new plan).
pub struct CopyPlan<'a> {
    pub(super) mem: &'a mut TaskMemory,
    pub(super) start: u64,
    pub(super) cursor: u64,
    pub(super) end: u64,
}

impl CopyPlan<'_> {
    /// The next run of pages this view still needs, in image address order.
    pub fn next_op(&mut self) -> Option<CopyOp> {
        let mem = &*self.mem;
        while self.cursor < self.end {
            let i = mem.pieces.partition_point(|p| p.img_end() <= self.cursor);
            let p = *mem.pieces.get(i)?;
            if p.img >= self.end {
                self.cursor = self.end;
                return None;
            }
            let from = self.cursor.max(p.img);
            let to = self.end.min(p.img_end());
            let bit = |a: u64| p.base + (a - p.img) / PAGE_SIZE;
            let Some(b) = mem
                .pending
                .first_set_either(&mem.in_flight, bit(from), bit(to))
            else {
                self.cursor = to;
                continue;
            };
            let img = p.img + (b - p.base) * PAGE_SIZE;
            let Some(seg) = mem.map.at_img(img) else {
                // A missing page is always mapped (dropping unmaps it); skip rather than guess.
                debug_assert!(false, "missing page {img:#x} has no runtime address");
                self.cursor = img + PAGE_SIZE;
                continue;
            };
            let lim = bit(to.min(seg.img_end()));
            let e = mem
                .pending
                .first_clear_both(&mem.in_flight, b, lim)
                .unwrap_or(lim);
            let op = CopyOp {
                img_vaddr: img,
                runtime_addr: seg.rt + (img - seg.img),
                offset_in_data: img - self.start,
                nr_pages: e - b,
            };
            self.cursor = img + op.nr_pages * PAGE_SIZE;
            return Some(op);
        }
        None
    }

    /// The first `n` pages of `op` (a run from this plan, or a [`CopyOp::sub`] of one) are in
    /// place (copied, or found already present: EEXIST). Returns how many changed state.
    pub fn placed(&mut self, op: &CopyOp, n: u64) -> u64 {
        self.rewind(op, n);
        self.mem.settle(op, n, true)
    }

    /// The first `n` pages of `op` cannot be placed (ENOENT: no longer registered there); they
    /// are dropped.
    pub fn unplaceable(&mut self, op: &CopyOp, n: u64) -> u64 {
        self.rewind(op, n);
        self.mem.settle(op, n, false)
    }

    fn rewind(&mut self, op: &CopyOp, n: u64) {
        if n < op.nr_pages {
            self.cursor = self.cursor.min(op.img_vaddr + n * PAGE_SIZE);
        }
    }
}
