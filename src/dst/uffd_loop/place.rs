//! Putting arrived pages into one view: the copy plan from [`TaskMemory`] driven through the
//! COPY/ZEROPAGE ioctls ([`Fills`]: the real uffd, or a simulated one), with
//! every kernel outcome mapped to what the plan must be told.

use nix::errno::Errno;

use super::ioctl::Fill;
use crate::dst::regions::{CopyOp, CopyPlan, TaskMemory};
use crate::pages::PAGE_SIZE;

/// What the arriving pages are.
#[derive(Clone, Copy)]
pub(super) enum PageBytes<'a> {
    /// Page data, `nr_pages * PAGE_SIZE` bytes, the first byte at the request's image address.
    Data(&'a [u8]),
    /// The source says these pages are all zero.
    Zero,
}

/// How placing into one view ended.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Placement {
    /// Everything this view needed from the arrival is settled.
    Finished,
    /// The kernel refused for now (EAGAIN): read this uffd's events, then place again.
    ReadEvents,
    /// The process exited.
    Gone,
    /// An ioctl failed in a way that is not a known race: a bug or a hostile environment.
    Failed(Errno),
}

/// What was placed, for stats and fault latency.
#[derive(Debug, Default)]
pub(super) struct Tally {
    /// Placed image runs `(img_vaddr, nr_pages)`.
    pub runs: Vec<(u64, u64)>,
    pub pages: u64,
    /// Retries after EAGAIN.
    pub retries: u64,
    pub dropped: u64,
}

/// The kernel operations that fill one view: UFFDIO_COPY and UFFDIO_ZEROPAGE at runtime
/// addresses (the real uffd, or a simulated one).
pub(super) trait Fills {
    fn copy(&mut self, addr: u64, data: &[u8]) -> Result<Fill, Errno>;
    fn zeropage(&mut self, addr: u64, pages: u64) -> Result<Fill, Errno>;
}

fn fill(uffd: &mut impl Fills, op: &CopyOp, src: PageBytes<'_>) -> Result<Fill, Errno> {
    match src {
        PageBytes::Data(data) => {
            let from = op.offset_in_data as usize;
            let to = from + (op.nr_pages * PAGE_SIZE) as usize;
            // on_pages only offers pages inside the arrival, so this slice is in bounds; a short
            // buffer is refused before planning.
            let Some(bytes) = data.get(from..to) else {
                return Err(Errno::EINVAL);
            };
            uffd.copy(op.runtime_addr, bytes)
        }
        PageBytes::Zero => uffd.zeropage(op.runtime_addr, op.nr_pages),
    }
}

/// Places image pages `[img_vaddr, +nr_pages)` into `mem` through `uffd`.
pub(super) fn place(
    uffd: &mut impl Fills,
    mem: &mut TaskMemory,
    img_vaddr: u64,
    nr_pages: u64,
    src: PageBytes<'_>,
    tally: &mut Tally,
) -> Placement {
    let mut plan = mem.on_pages(img_vaddr, nr_pages);
    while let Some(op) = plan.next_op() {
        match fill(uffd, &op, src) {
            Ok(Fill::Done) => {
                let n = plan.placed(&op, op.nr_pages);
                tally.note(op.img_vaddr, op.nr_pages, n);
            }
            Ok(Fill::Partial { pages }) => {
                let n = plan.placed(&op, pages);
                tally.note(op.img_vaddr, pages, n);
                tally.retries += 1;
                return Placement::ReadEvents;
            }
            Ok(Fill::Again) => {
                tally.retries += 1;
                return Placement::ReadEvents;
            }
            // Already present: someone placed it (a stale duplicate); the rest is offered again.
            Ok(Fill::Exists) => {
                plan.placed(&op, 1);
            }
            Ok(Fill::NotRegistered) => match page_by_page(uffd, &mut plan, &op, src, tally) {
                Placement::Finished => {}
                other => return other,
            },
            Ok(Fill::Gone) => return Placement::Gone,
            Err(e) => return Placement::Failed(e),
        }
    }
    Placement::Finished
}

/// ENOENT on a run: the run crosses a VMA boundary made after the dump (mprotect splits VMAs
/// without an event), or part of it is no longer registered. Page by page finds out which.
fn page_by_page(
    uffd: &mut impl Fills,
    plan: &mut CopyPlan<'_>,
    op: &CopyOp,
    src: PageBytes<'_>,
    tally: &mut Tally,
) -> Placement {
    for i in 0..op.nr_pages {
        let one = op.sub(i, 1);
        match fill(uffd, &one, src) {
            Ok(Fill::Done) => {
                let n = plan.placed(&one, 1);
                tally.note(one.img_vaddr, 1, n);
            }
            Ok(Fill::Exists) => {
                plan.placed(&one, 1);
            }
            Ok(Fill::NotRegistered) => tally.dropped += plan.unplaceable(&one, 1),
            Ok(Fill::Partial { .. } | Fill::Again) => {
                tally.retries += 1;
                return Placement::ReadEvents;
            }
            Ok(Fill::Gone) => return Placement::Gone,
            Err(e) => return Placement::Failed(e),
        }
    }
    Placement::Finished
}

impl Tally {
    fn note(&mut self, img: u64, nr_pages: u64, changed: u64) {
        if nr_pages > 0 {
            self.runs.push((img, nr_pages));
        }
        self.pages += changed;
    }
}
