//! The background push order at the source (sans-IO).
//!
//! The plan knows every lazy range of every task (from the dump's pagemap images) and which pages
//! have not been sent yet, one bit per page. It answers two questions: is a request from dst a
//! real lazy range (CRIU's page server ends the whole session on a GET it cannot serve, so nothing
//! unchecked may reach it), and what to push next. Pages near recent faults go first: a task that
//! faulted at X will most likely touch X+1.. soon, so the push jumps there and sweeps forward for a
//! window before it returns to the sequential sweep.

use std::collections::VecDeque;

use crate::pages::{PAGE_SIZE, PageRange};

/// How far past a fault the push keeps following that fault's neighbourhood.
const HINT_WINDOW_PAGES: u64 = 2048;
/// How many recent faults the plan remembers.
const MAX_HINTS: usize = 16;

/// Where a page lives in the plan: task index, range index, page index in the range.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Pos {
    task: usize,
    range: usize,
    page: u64,
}

#[derive(Debug, Clone, Copy)]
struct Hint {
    pos: Pos,
    /// The page index the window is measured from.
    origin: u64,
}

#[derive(Debug)]
struct RangePlan {
    range: PageRange,
    /// Bit set = not yet sent.
    unsent: Vec<u64>,
}

impl RangePlan {
    fn new(range: PageRange) -> Self {
        let words = range.nr_pages.div_ceil(64) as usize;
        let mut unsent = vec![u64::MAX; words];
        let tail = range.nr_pages % 64;
        if tail != 0
            && let Some(last) = unsent.last_mut()
        {
            *last = (1u64 << tail) - 1;
        }
        Self { range, unsent }
    }

    fn is_unsent(&self, page: u64) -> bool {
        self.unsent[(page / 64) as usize] & (1 << (page % 64)) != 0
    }

    /// First unsent page in `[from, to)`.
    fn next_unsent(&self, from: u64, to: u64) -> Option<u64> {
        let to = to.min(self.range.nr_pages);
        let mut page = from;
        while page < to {
            let word = self.unsent[(page / 64) as usize] >> (page % 64);
            if word != 0 {
                let found = page + word.trailing_zeros() as u64;
                return (found < to).then_some(found);
            }
            page = (page / 64 + 1) * 64;
        }
        None
    }

    /// Length of the unsent run starting at `from`, at most `max`.
    fn run_len(&self, from: u64, max: u64) -> u64 {
        let mut n = 0;
        while n < max && from + n < self.range.nr_pages && self.is_unsent(from + n) {
            n += 1;
        }
        n
    }

    /// Sets (`unsent = true`) or clears the bits of `[from, from + n)`; returns how many changed.
    fn set(&mut self, from: u64, n: u64, unsent: bool) -> u64 {
        let mut changed = 0;
        for page in from..(from + n).min(self.range.nr_pages) {
            let (w, b) = ((page / 64) as usize, 1u64 << (page % 64));
            if (self.unsent[w] & b != 0) != unsent {
                self.unsent[w] ^= b;
                changed += 1;
            }
        }
        changed
    }
}

#[derive(Debug)]
struct TaskPlan {
    pid: u32,
    ranges: Vec<RangePlan>,
}

/// A batch the source should fetch from the dump and push.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Batch {
    pub pid: u32,
    pub vaddr: u64,
    pub nr_pages: u64,
}

/// Why a page request cannot be forwarded to CRIU.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum RequestRejected {
    #[error("pid {0} is not a task of this dump")]
    UnknownPid(u32),
    #[error("range 0x{vaddr:x}+{nr_pages} pages of pid {pid} is not inside one lazy range")]
    NotLazy { pid: u32, vaddr: u64, nr_pages: u64 },
}

/// The source's record of what is still to send.
#[derive(Debug)]
pub struct PushPlan {
    tasks: Vec<TaskPlan>,
    hints: VecDeque<Hint>,
    /// The sequential sweep visits ranges in this order: (task, range) indices.
    order: Vec<(usize, usize)>,
    /// Position of the sweep: index into `order`, page inside that range.
    cursor: (usize, u64),
    remaining: u64,
    total: u64,
}

impl PushPlan {
    /// `tasks`: per pid, its lazy ranges in image addresses, sorted and non-overlapping.
    pub fn new(tasks: impl IntoIterator<Item = (u32, Vec<PageRange>)>) -> Self {
        let mut tasks: Vec<TaskPlan> = tasks
            .into_iter()
            .map(|(pid, mut ranges)| {
                ranges.retain(|r| r.nr_pages > 0);
                ranges.sort();
                TaskPlan {
                    pid,
                    ranges: ranges.into_iter().map(RangePlan::new).collect(),
                }
            })
            .collect();
        tasks.sort_by_key(|t| t.pid);
        let total = tasks
            .iter()
            .flat_map(|t| &t.ranges)
            .map(|r| r.range.nr_pages)
            .sum();
        let order = tasks
            .iter()
            .enumerate()
            .flat_map(|(t, task)| (0..task.ranges.len()).map(move |r| (t, r)))
            .collect();
        Self {
            tasks,
            hints: VecDeque::new(),
            order,
            cursor: (0, 0),
            remaining: total,
            total,
        }
    }

    /// Sweeps ranges with a higher `priority` first (ties keep address order); pages near
    /// faults still go before the sweep. Pre-copy ranks ranges by how often their pages changed.
    pub fn prioritize(&mut self, priority: impl Fn(u32, PageRange) -> u64) {
        let tasks = &self.tasks;
        self.order.sort_by_cached_key(|&(t, r)| {
            std::cmp::Reverse(priority(tasks[t].pid, tasks[t].ranges[r].range))
        });
        self.cursor = (0, 0);
    }

    /// Lazy pages in the plan.
    pub fn total_pages(&self) -> u64 {
        self.total
    }

    /// Lazy pages not yet sent.
    pub fn remaining_pages(&self) -> u64 {
        self.remaining
    }

    /// Checks that `[vaddr, vaddr + nr_pages)` of `pid` lies inside one lazy range.
    pub fn check_request(
        &self,
        pid: u32,
        vaddr: u64,
        nr_pages: u64,
    ) -> Result<(), RequestRejected> {
        self.locate(pid, vaddr, nr_pages).map(|_| ())
    }

    /// Splits a request into pieces that each lie inside one range (one CRIU page-pipe buffer:
    /// a GET never crosses one). Every page must be lazy, else the whole request is rejected.
    pub fn split_request(
        &self,
        pid: u32,
        vaddr: u64,
        nr_pages: u64,
    ) -> Result<Vec<(u64, u64)>, RequestRejected> {
        let reject = RequestRejected::NotLazy {
            pid,
            vaddr,
            nr_pages,
        };
        if nr_pages == 0 || nr_pages > (1 << 20) {
            return Err(reject);
        }
        let mut pieces = Vec::new();
        let (mut at, mut left) = (vaddr, nr_pages);
        while left > 0 {
            let pos = self.locate(pid, at, 1).map_err(|e| match e {
                RequestRejected::UnknownPid(p) => RequestRejected::UnknownPid(p),
                RequestRejected::NotLazy { .. } => reject,
            })?;
            let r = &self.tasks[pos.task].ranges[pos.range].range;
            let n = left.min(r.nr_pages - pos.page);
            pieces.push((at, n));
            at += n * PAGE_SIZE;
            left -= n;
        }
        Ok(pieces)
    }

    fn locate(&self, pid: u32, vaddr: u64, nr_pages: u64) -> Result<Pos, RequestRejected> {
        let task = self
            .tasks
            .binary_search_by_key(&pid, |t| t.pid)
            .map_err(|_| RequestRejected::UnknownPid(pid))?;
        let not_lazy = RequestRejected::NotLazy {
            pid,
            vaddr,
            nr_pages,
        };
        let ranges = &self.tasks[task].ranges;
        let idx = ranges.partition_point(|r| r.range.end() <= vaddr);
        let r = ranges.get(idx).ok_or(not_lazy)?;
        let end = nr_pages
            .checked_mul(PAGE_SIZE)
            .and_then(|len| vaddr.checked_add(len))
            .ok_or(not_lazy)?;
        if nr_pages == 0
            || !vaddr.is_multiple_of(PAGE_SIZE)
            || vaddr < r.range.start
            || end > r.range.end()
        {
            return Err(not_lazy);
        }
        Ok(Pos {
            task,
            range: idx,
            page: (vaddr - r.range.start) / PAGE_SIZE,
        })
    }

    /// Records a fault request for `nr_pages` from `vaddr` of `pid`.
    ///
    /// A one-page request (a fault with no read-ahead) turns the push to the fault's
    /// neighbourhood next. A longer one is dst's read-ahead for a thread it saw faulting in
    /// address order (`dst::regions::streams`): that thread's own requests fetch the pages ahead
    /// of it, twice as many each time, so the push leaves that stretch to them. It adds no hint
    /// and drops the hints whose window reaches into the request (the stream's first, one-page
    /// faults left them): a push following the stream would race its requests for the same
    /// pages, and every page dst then asks for that is already on the push stream (queued behind
    /// megabytes at the source, not yet at dst) is sent twice. Measured before this rule, 1 GiB
    /// with the bench workload's sequential check: 70k of 262k pages sent twice.
    pub fn note_fault(&mut self, pid: u32, vaddr: u64, nr_pages: u64) {
        let Ok(pos) = self.locate(pid, vaddr & !(PAGE_SIZE - 1), 1) else {
            return;
        };
        if nr_pages > 1 {
            let end = pos.page + nr_pages;
            self.hints.retain(|h| {
                h.pos.task != pos.task
                    || h.pos.range != pos.range
                    || h.origin >= end
                    || h.origin + HINT_WINDOW_PAGES <= pos.page
            });
            return;
        }
        self.hints.push_front(Hint {
            pos,
            origin: pos.page,
        });
        self.hints.truncate(MAX_HINTS);
    }

    /// Marks pages as sent (whether by a fault reply or the push). Pages outside the plan are ignored.
    pub fn mark_sent(&mut self, pid: u32, vaddr: u64, nr_pages: u64) {
        if let Ok(pos) = self.locate(pid, vaddr, nr_pages) {
            let r = &mut self.tasks[pos.task].ranges[pos.range];
            self.remaining -= r.set(pos.page, nr_pages, false);
        }
    }

    /// Returns pages to the unsent set (a fetch came back short or failed).
    pub fn mark_unsent(&mut self, pid: u32, vaddr: u64, nr_pages: u64) {
        if let Ok(pos) = self.locate(pid, vaddr, nr_pages) {
            let r = &mut self.tasks[pos.task].ranges[pos.range];
            self.remaining += r.set(pos.page, nr_pages, true);
        }
    }

    /// After a reconnect: the unsent set becomes exactly `missing` (what dst reports it still
    /// lacks), whatever the plan believed was sent before; the push starts over from the first
    /// range. Returns the pages now unsent. A missing range that is no lazy range of the dump is
    /// refused: dst and the dump disagree, and nothing unchecked may reach CRIU.
    pub fn replan(
        &mut self,
        missing: impl IntoIterator<Item = (u32, Vec<PageRange>)>,
    ) -> Result<u64, RequestRejected> {
        let mut pieces = Vec::new();
        for (pid, ranges) in missing {
            for r in ranges {
                for (vaddr, n) in self.split_request(pid, r.start, r.nr_pages)? {
                    pieces.push((pid, vaddr, n));
                }
            }
        }
        for task in &mut self.tasks {
            for r in &mut task.ranges {
                r.unsent.fill(0);
            }
        }
        self.remaining = 0;
        for (pid, vaddr, n) in pieces {
            self.mark_unsent(pid, vaddr, n);
        }
        self.hints.clear();
        self.cursor = (0, 0);
        Ok(self.remaining)
    }

    /// The next batch to push, at most `max_pages` long and inside one lazy range, already
    /// marked as sent. `None` once every page is sent.
    pub fn next_batch(&mut self, max_pages: u64) -> Option<Batch> {
        if self.remaining == 0 || max_pages == 0 {
            return None;
        }
        while let Some(hint) = self.hints.front().copied() {
            let r = &self.tasks[hint.pos.task].ranges[hint.pos.range];
            match r.next_unsent(hint.pos.page, hint.origin + HINT_WINDOW_PAGES) {
                Some(page) => {
                    let pos = Pos { page, ..hint.pos };
                    let batch = self.take(pos, max_pages);
                    if let Some(front) = self.hints.front_mut() {
                        front.pos.page = page + batch.nr_pages;
                    }
                    return Some(batch);
                }
                None => {
                    self.hints.pop_front();
                }
            }
        }
        // Sequential sweep over `order`. Pages returned by `mark_unsent` may lie behind the
        // cursor, so the sweep wraps around once before it gives up.
        let mut wrapped = false;
        loop {
            let (at, page) = self.cursor;
            let Some(&(task, range)) = self.order.get(at) else {
                if wrapped {
                    return None;
                }
                wrapped = true;
                self.cursor = (0, 0);
                continue;
            };
            let r = &self.tasks[task].ranges[range];
            match r.next_unsent(page, r.range.nr_pages) {
                Some(found) => {
                    let pos = Pos {
                        task,
                        range,
                        page: found,
                    };
                    let batch = self.take(pos, max_pages);
                    self.cursor.1 = found + batch.nr_pages;
                    return Some(batch);
                }
                None => self.cursor = (at + 1, 0),
            }
        }
    }

    fn take(&mut self, pos: Pos, max_pages: u64) -> Batch {
        let pid = self.tasks[pos.task].pid;
        let r = &mut self.tasks[pos.task].ranges[pos.range];
        let n = r.run_len(pos.page, max_pages);
        self.remaining -= r.set(pos.page, n, false);
        Batch {
            pid,
            vaddr: r.range.start + pos.page * PAGE_SIZE,
            nr_pages: n,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::BTreeSet;

    const P: u64 = PAGE_SIZE;

    fn plan() -> PushPlan {
        PushPlan::new([
            (
                7,
                vec![PageRange::new(0x10000, 100), PageRange::new(0x200000, 3)],
            ),
            (9, vec![PageRange::new(0x400000, 130)]),
        ])
    }

    #[test]
    fn sweeps_everything_once_in_bounded_batches() {
        let mut p = plan();
        let mut seen = BTreeSet::new();
        while let Some(b) = p.next_batch(16) {
            assert!(b.nr_pages >= 1 && b.nr_pages <= 16);
            for i in 0..b.nr_pages {
                assert!(seen.insert((b.pid, b.vaddr + i * P)), "page sent twice");
            }
        }
        assert_eq!(seen.len() as u64, p.total_pages());
        assert_eq!(p.remaining_pages(), 0);
    }

    #[test]
    fn replan_pushes_exactly_the_missing_pages() {
        let mut p = plan();
        while p.next_batch(64).is_some() {}
        let missing = vec![
            (7, vec![PageRange::new(0x10000 + 10 * P, 5)]),
            (
                9,
                vec![
                    PageRange::new(0x400000, 2),
                    PageRange::new(0x400000 + 129 * P, 1),
                ],
            ),
        ];
        assert_eq!(p.replan(missing), Ok(8));
        let mut seen = BTreeSet::new();
        while let Some(b) = p.next_batch(64) {
            for i in 0..b.nr_pages {
                assert!(seen.insert((b.pid, b.vaddr + i * P)), "page pushed twice");
            }
        }
        let want: BTreeSet<(u32, u64)> = (10..15)
            .map(|i| (7, 0x10000 + i * P))
            .chain([(9, 0x400000), (9, 0x400000 + P), (9, 0x400000 + 129 * P)])
            .collect();
        assert_eq!(seen, want);
        // A range dst calls missing that the dump never had lazy is refused, plan untouched.
        assert!(
            p.replan(vec![(7, vec![PageRange::new(0x90000, 1)])])
                .is_err()
        );
        assert_eq!(p.remaining_pages(), 0);
    }

    #[test]
    fn turns_to_a_fault_neighbourhood() {
        let mut p = plan();
        p.note_fault(9, 0x400000 + 50 * P + 123, 1);
        let b = p.next_batch(8).unwrap();
        assert_eq!((b.pid, b.vaddr, b.nr_pages), (9, 0x400000 + 50 * P, 8));
        let b = p.next_batch(8).unwrap();
        assert_eq!(b.vaddr, 0x400000 + 58 * P);
    }

    #[test]
    fn leaves_a_read_ahead_stream_to_its_own_requests() {
        let mut p = plan();
        // A random fault elsewhere, then a stream's first one-page fault and its read-ahead.
        p.note_fault(7, 0x10000 + 90 * P, 1);
        p.note_fault(9, 0x400000 + 10 * P, 1);
        p.note_fault(9, 0x400000 + 11 * P, 2);
        // The stream's hint is gone and no new one was added: the push turns to the random
        // fault, then sweeps from the start.
        let b = p.next_batch(10).unwrap();
        assert_eq!((b.pid, b.vaddr, b.nr_pages), (7, 0x10000 + 90 * P, 10));
        let b = p.next_batch(10).unwrap();
        assert_eq!(
            (b.pid, b.vaddr),
            (7, 0x10000),
            "the sweep, not the stream's neighbourhood"
        );
        // A read-ahead request in another range leaves a hint elsewhere alone.
        let mut p = plan();
        p.note_fault(9, 0x400000 + 100 * P, 1);
        p.note_fault(7, 0x10000, 8);
        let b = p.next_batch(4).unwrap();
        assert_eq!((b.pid, b.vaddr), (9, 0x400000 + 100 * P));
    }

    #[test]
    fn rejects_requests_outside_lazy_ranges() {
        let p = plan();
        assert!(p.check_request(7, 0x10000, 100).is_ok());
        assert_eq!(
            p.check_request(8, 0x10000, 1),
            Err(RequestRejected::UnknownPid(8))
        );
        assert!(
            p.check_request(7, 0x10000, 101).is_err(),
            "crosses the range end"
        );
        assert!(p.check_request(7, 0x10000 + 1, 1).is_err(), "unaligned");
        assert!(p.check_request(7, 0xf000, 1).is_err(), "before the range");
        assert!(p.check_request(7, 0x10000, 0).is_err(), "empty");
        assert!(
            p.check_request(7, u64::MAX - P + 1, u64::MAX).is_err(),
            "overflow"
        );
    }

    #[test]
    fn splits_requests_at_range_ends() {
        let p = PushPlan::new([(
            1,
            vec![PageRange::new(0x1000, 2), PageRange::new(0x3000, 4)],
        )]);
        assert_eq!(
            p.split_request(1, 0x2000, 3).unwrap(),
            vec![(0x2000, 1), (0x3000, 2)]
        );
        assert!(
            p.split_request(1, 0x6000, 2).is_err(),
            "runs past the last range"
        );
        assert_eq!(
            p.split_request(2, 0x1000, 1),
            Err(RequestRejected::UnknownPid(2))
        );
        let gap = PushPlan::new([(
            1,
            vec![PageRange::new(0x1000, 1), PageRange::new(0x3000, 1)],
        )]);
        assert!(
            gap.split_request(1, 0x1000, 3).is_err(),
            "a hole in the middle"
        );
    }

    #[test]
    fn fault_replies_are_not_pushed_again_and_short_fetches_return() {
        let mut p = plan();
        p.mark_sent(7, 0x10000, 10);
        let b = p.next_batch(5).unwrap();
        assert_eq!(b.vaddr, 0x10000 + 10 * P);
        p.mark_unsent(b.pid, b.vaddr + 2 * P, 3);
        assert_eq!(p.remaining_pages(), p.total_pages() - 12);
    }

    #[test]
    fn prioritized_ranges_go_first() {
        let mut p = plan();
        p.prioritize(|pid, r| {
            if pid == 9 {
                5
            } else if r.start == 0x200000 {
                3
            } else {
                0
            }
        });
        let b = p.next_batch(200).unwrap();
        assert_eq!((b.pid, b.vaddr, b.nr_pages), (9, 0x400000, 130));
        let b = p.next_batch(200).unwrap();
        assert_eq!((b.pid, b.vaddr, b.nr_pages), (7, 0x200000, 3));
        let b = p.next_batch(200).unwrap();
        assert_eq!((b.pid, b.vaddr, b.nr_pages), (7, 0x10000, 100));
        assert_eq!(p.next_batch(200), None);
    }

    proptest! {
        /// Whatever the mix of faults, fault replies and short fetches, every page is pushed or
        /// served, none is lost, and `remaining` stays exact.
        #[test]
        fn accounting_is_exact(ops in proptest::collection::vec((0u8..4, 0u64..233, 1u64..40), 0..200)) {
            let mut p = plan();
            let pages: Vec<(u32, u64)> = [(7u32, 0x10000u64, 100u64), (7, 0x200000, 3), (9, 0x400000, 130)]
                .iter()
                .flat_map(|&(pid, start, n)| (0..n).map(move |i| (pid, start + i * P)))
                .collect();
            let mut sent: BTreeSet<(u32, u64)> = BTreeSet::new();
            for (op, idx, n) in ops {
                let (pid, vaddr) = pages[idx as usize];
                match op {
                    0 => p.note_fault(pid, vaddr, n),
                    1 => if p.check_request(pid, vaddr, 1).is_ok() {
                        p.mark_sent(pid, vaddr, 1);
                        sent.insert((pid, vaddr));
                    },
                    2 => if let Some(b) = p.next_batch(n) {
                        for i in 0..b.nr_pages {
                            prop_assert!(sent.insert((b.pid, b.vaddr + i * P)), "batch re-sent a page");
                        }
                    },
                    _ => if let Some(b) = p.next_batch(n) {
                        // The fetch came back with only the first page; the rest returns.
                        sent.insert((b.pid, b.vaddr));
                        if b.nr_pages > 1 {
                            p.mark_unsent(b.pid, b.vaddr + P, b.nr_pages - 1);
                        }
                    },
                }
                prop_assert_eq!(p.remaining_pages(), p.total_pages() - sent.len() as u64);
            }
            while let Some(b) = p.next_batch(64) {
                for i in 0..b.nr_pages {
                    prop_assert!(sent.insert((b.pid, b.vaddr + i * P)));
                }
            }
            prop_assert_eq!(sent.len(), pages.len());
        }
    }
}
