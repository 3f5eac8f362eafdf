//! The change detector: what dst holds of each task's memory, as one 128-bit hash per page.
//!
//! The source keeps nothing of a page but the hash of the version it sent (16 bytes per page, plus
//! a bit saying whether dst holds any). Pages are grouped in dense blocks of 512 (2 MiB of address
//! space), sorted by address per task, allocated only where memory was read: a VMA that grows,
//! moves or splits between rounds needs no bookkeeping, and a sparse reservation costs nothing.
//! Each block also counts how often its pages changed between rounds, to push hot memory first
//! after the freeze.

use super::page_hash::{PageHash, PageHasher};
use super::validate::{Verdict, verdict};
use crate::pages::{PAGE_SIZE, PageRange};

/// Pages per block.
pub const BLOCK_PAGES: u64 = 512;
const BLOCK_BYTES: u64 = BLOCK_PAGES * PAGE_SIZE;

struct Block {
    hash: [PageHash; BLOCK_PAGES as usize],
    /// Bit set: dst holds a copy of this page, whose hash is in `hash`.
    held: [u64; (BLOCK_PAGES / 64) as usize],
    /// Pages of this block that changed after dst got a copy, summed over rounds.
    changes: u32,
}

impl Block {
    fn new() -> Box<Self> {
        Box::new(Block {
            hash: [0; BLOCK_PAGES as usize],
            held: [0; (BLOCK_PAGES / 64) as usize],
            changes: 0,
        })
    }

    fn get(&self, i: usize) -> Option<PageHash> {
        (self.held[i / 64] & (1 << (i % 64)) != 0).then_some(self.hash[i])
    }
}

struct TaskHeld {
    pid: u32,
    /// (block number = vaddr / 2 MiB, block), sorted by block number.
    blocks: Vec<(u64, Box<Block>)>,
}

impl TaskHeld {
    fn block(&self, no: u64) -> Option<&Block> {
        self.blocks
            .binary_search_by_key(&no, |(n, _)| *n)
            .ok()
            .map(|i| &*self.blocks[i].1)
    }

    fn block_mut(&mut self, no: u64) -> &mut Block {
        let i = match self.blocks.binary_search_by_key(&no, |(n, _)| *n) {
            Ok(i) => i,
            Err(i) => {
                self.blocks.insert(i, (no, Block::new()));
                i
            }
        };
        &mut self.blocks[i].1
    }
}

/// What a page read during a round means for dst.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Observed {
    /// dst holds this content already.
    Same,
    /// Send it: dst holds nothing here (`changed` false) or an older version (`changed` true).
    Send { zero: bool, changed: bool },
}

/// Per-task hashes of the pages dst holds. See the module docs.
pub struct HeldMemory {
    hasher: PageHasher,
    /// Sorted by pid.
    tasks: Vec<TaskHeld>,
    pages_held: u64,
}

impl HeldMemory {
    pub fn new(hasher: PageHasher) -> Self {
        Self {
            hasher,
            tasks: Vec::new(),
            pages_held: 0,
        }
    }

    pub fn hasher(&self) -> &PageHasher {
        &self.hasher
    }

    fn task(&self, pid: u32) -> Option<&TaskHeld> {
        self.tasks
            .binary_search_by_key(&pid, |t| t.pid)
            .ok()
            .map(|i| &self.tasks[i])
    }

    fn task_mut(&mut self, pid: u32) -> &mut TaskHeld {
        let i = match self.tasks.binary_search_by_key(&pid, |t| t.pid) {
            Ok(i) => i,
            Err(i) => {
                self.tasks.insert(
                    i,
                    TaskHeld {
                        pid,
                        blocks: Vec::new(),
                    },
                );
                i
            }
        };
        &mut self.tasks[i]
    }

    /// Compares pages just read from task `pid` at `vaddr` (page aligned; `data` whole pages)
    /// with what dst holds, appending one [`Observed`] per page. A page to send is recorded as
    /// held from now on: the caller must send it.
    pub fn observe(&mut self, pid: u32, vaddr: u64, data: &[u8], out: &mut Vec<Observed>) {
        let hasher = self.hasher;
        let task = self.task_mut(pid);
        let mut new_pages = 0;
        let mut pages = data.chunks_exact(PAGE_SIZE as usize);
        let mut at = vaddr;
        while pages.len() > 0 {
            let block = task.block_mut(at / BLOCK_BYTES);
            let first = ((at % BLOCK_BYTES) / PAGE_SIZE) as usize;
            for i in first..BLOCK_PAGES as usize {
                let Some(page) = pages.next() else {
                    break;
                };
                let (hash, zero) = hasher.hash(page);
                let held = block.get(i);
                out.push(if held == Some(hash) {
                    Observed::Same
                } else {
                    block.hash[i] = hash;
                    if held.is_some() {
                        block.changes = block.changes.saturating_add(1);
                    } else {
                        block.held[i / 64] |= 1 << (i % 64);
                        new_pages += 1;
                    }
                    Observed::Send {
                        zero,
                        changed: held.is_some(),
                    }
                });
                at += PAGE_SIZE;
            }
        }
        self.pages_held += new_pages;
    }

    /// The hash of the copy dst holds of page `vaddr` of task `pid`.
    pub fn held(&self, pid: u32, vaddr: u64) -> Option<PageHash> {
        let block = self.task(pid)?.block(vaddr / BLOCK_BYTES)?;
        block.get(((vaddr % BLOCK_BYTES) / PAGE_SIZE) as usize)
    }

    /// The validation rule applied to frozen pages `data` of task `pid` at `vaddr`: one verdict
    /// per page (see [`super::validate`]).
    pub fn verdicts(&self, pid: u32, vaddr: u64, data: &[u8]) -> Vec<Verdict> {
        data.chunks_exact(PAGE_SIZE as usize)
            .enumerate()
            .map(|(i, page)| {
                let (hash, zero) = self.hasher.hash(page);
                verdict(self.held(pid, vaddr + i as u64 * PAGE_SIZE), hash, zero)
            })
            .collect()
    }

    /// How often the pages of `range` of task `pid` changed during the rounds (block grained).
    pub fn heat(&self, pid: u32, range: PageRange) -> u64 {
        let Some(task) = self.task(pid) else {
            return 0;
        };
        let (first, last) = (
            range.start / BLOCK_BYTES,
            (range.end().max(1) - 1) / BLOCK_BYTES,
        );
        let i = task.blocks.partition_point(|(n, _)| *n < first);
        task.blocks[i..]
            .iter()
            .take_while(|(n, _)| *n <= last)
            .map(|(_, b)| u64::from(b.changes))
            .sum()
    }

    /// Pages dst holds a copy of.
    pub fn pages_held(&self) -> u64 {
        self.pages_held
    }

    /// Bytes this structure occupies (its blocks dominate: ~16 bytes per page read).
    pub fn bytes(&self) -> u64 {
        let blocks: usize = self.tasks.iter().map(|t| t.blocks.len()).sum();
        (blocks * (std::mem::size_of::<Block>() + 16)) as u64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn page(v: u8) -> Vec<u8> {
        vec![v; PAGE_SIZE as usize]
    }

    fn observe(h: &mut HeldMemory, pid: u32, vaddr: u64, data: &[u8]) -> Vec<Observed> {
        let mut out = Vec::new();
        h.observe(pid, vaddr, data, &mut out);
        out
    }

    #[test]
    fn sends_new_and_changed_pages_once() {
        let mut h = HeldMemory::new(PageHasher::new(1));
        // Three pages across a block boundary.
        let at = BLOCK_BYTES - PAGE_SIZE;
        let data = [page(1), page(0), page(3)].concat();
        let o = observe(&mut h, 5, at, &data);
        assert_eq!(
            o,
            vec![
                Observed::Send {
                    zero: false,
                    changed: false
                },
                Observed::Send {
                    zero: true,
                    changed: false
                },
                Observed::Send {
                    zero: false,
                    changed: false
                },
            ]
        );
        assert_eq!(h.pages_held(), 3);
        let data2 = [page(1), page(9), page(3)].concat();
        let o = observe(&mut h, 5, at, &data2);
        assert_eq!(
            o,
            vec![
                Observed::Same,
                Observed::Send {
                    zero: false,
                    changed: true
                },
                Observed::Same
            ]
        );
        assert_eq!(h.pages_held(), 3);
        assert_eq!(h.held(5, at + PAGE_SIZE), Some(h.hasher().hash(&page(9)).0));
        assert_eq!(h.held(6, at), None, "other task");
        assert_eq!(h.held(5, at + 3 * PAGE_SIZE), None, "never read");
        assert_eq!(h.heat(5, PageRange::new(BLOCK_BYTES, 10)), 1);
        assert_eq!(h.heat(5, PageRange::new(0, 1)), 0);
    }

    #[test]
    fn verdicts_follow_the_last_version_sent() {
        let mut h = HeldMemory::new(PageHasher::new(2));
        observe(&mut h, 1, 0x10000, &[page(1), page(2), page(0)].concat());
        // Frozen: page 0 unchanged, page 1 changed after the last round, page 2 still zero,
        // page 3 never pre-copied and zero.
        let frozen = [page(1), page(7), page(0), page(0)].concat();
        assert_eq!(
            h.verdicts(1, 0x10000, &frozen),
            vec![Verdict::Valid, Verdict::Data, Verdict::Valid, Verdict::Zero]
        );
    }
}
