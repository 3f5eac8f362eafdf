//! The one rule for page data the source sends to dst (sans-IO): which Pages/Zero frames may
//! be written into a restored process at all. A source that breaks it is lying or broken, and
//! its frame is refused with a [`Refusal`] before anything reaches the process.
//!
//! A frame for image pid `pid` covering image pages `[vaddr, +nr_pages)` is admitted only if
//! - `pid` is a task of this restore (the restore handed dst its uffd and lazy ranges),
//! - every page lies in one of that task's lazy ranges (never-lazy memory was restored from the
//!   images and must not be overwritten),
//! - on the fault stream (`urgent`): every page was asked for by a request still outstanding;
//!   the frame uses up that part of the request, so a second answer to one request is refused,
//! - on the push stream: no page was pushed before (the source pushes each page once; a page
//!   may still arrive both pushed and as a fault answer, since a fault can race a push).
//!
//! The guard only decides; the uffd engine asks it before placing pages (see
//! `uffd_loop/engine.rs`) and tells it about every request it sends.

use std::collections::{BTreeMap, HashMap};

use crate::pages::{PAGE_SIZE, PageRange};

/// Why a Pages/Zero frame from the source was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    #[error(
        "the source sent pages for pid {pid}, which is no task of this restore; refusing them \
         (the source is faulty or serves another migration)"
    )]
    UnknownPid { pid: u32 },
    #[error(
        "the source sent pages [{start:#x}, {end:#x}) of pid {pid}, but page {page:#x} is not in a \
         lazy range of that task; refusing them (memory outside lazy ranges came with the images \
         and must not be overwritten: the source is faulty or its images differ)"
    )]
    NotLazy {
        pid: u32,
        start: u64,
        end: u64,
        page: u64,
    },
    #[error(
        "the source answered a fault with pages [{start:#x}, {end:#x}) of pid {pid}, but page \
         {page:#x} was not asked for by an outstanding request; refusing them (the source is \
         faulty)"
    )]
    NotRequested {
        pid: u32,
        start: u64,
        end: u64,
        page: u64,
    },
    #[error(
        "the source pushed pages [{start:#x}, {end:#x}) of pid {pid}, but page {page:#x} was \
         already pushed; refusing them (a source pushes each page once: it is faulty)"
    )]
    AlreadyPushed {
        pid: u32,
        start: u64,
        end: u64,
        page: u64,
    },
    #[error(
        "the source sent {nr_pages} pages at {vaddr:#x} for pid {pid}: empty, unaligned or past \
         the end of the address space; refusing them"
    )]
    BadRange { pid: u32, vaddr: u64, nr_pages: u64 },
}

/// Disjoint half-open intervals `[start, end)`, keyed by start.
#[derive(Debug, Clone, Default)]
struct Intervals(BTreeMap<u64, u64>);

impl Intervals {
    /// The first address of `[start, end)` not covered, if any.
    fn first_gap(&self, start: u64, end: u64) -> Option<u64> {
        let mut at = start;
        if let Some((_, &e)) = self.0.range(..=at).next_back()
            && e > at
        {
            at = e;
        }
        for (&s, &e) in self.0.range(at..) {
            if at >= end || s > at {
                break;
            }
            at = at.max(e);
        }
        (at < end).then_some(at)
    }

    /// The first address of `[start, end)` that is covered, if any.
    fn first_hit(&self, start: u64, end: u64) -> Option<u64> {
        if let Some((_, &e)) = self.0.range(..=start).next_back()
            && e > start
        {
            return Some(start);
        }
        self.0.range(start..end).next().map(|(&s, _)| s)
    }

    /// Adds `[start, end)`, merging neighbours.
    fn insert(&mut self, mut start: u64, mut end: u64) {
        if let Some((&s, &e)) = self.0.range(..=start).next_back()
            && e >= start
        {
            start = s;
            end = end.max(e);
        }
        let inside: Vec<u64> = self.0.range(start..=end).map(|(&s, _)| s).collect();
        for s in inside {
            if let Some(e) = self.0.remove(&s) {
                end = end.max(e);
            }
        }
        self.0.insert(start, end);
    }
}

/// What dst knows about one task's pages.
#[derive(Debug, Default)]
struct AdmittedTask {
    lazy: Intervals,
    pushed: Intervals,
    /// Outstanding fault requests, one entry per request (two views of one pid may ask for the
    /// same page twice, and each request gets its own answer).
    requested: Vec<(u64, u64)>,
}

/// The admission rule for page data from the source; see the module docs.
#[derive(Debug, Default)]
pub struct ArrivalGuard {
    tasks: HashMap<u32, AdmittedTask>,
}

impl ArrivalGuard {
    pub fn new() -> Self {
        Self::default()
    }

    /// Task `pid` of the restore, with its lazy ranges (image addresses). Ranges of a pid seen
    /// again are added to what it had.
    pub fn add_task(&mut self, pid: u32, lazy: &[PageRange]) {
        let task = self.tasks.entry(pid).or_default();
        for r in lazy {
            if let Some(end) = range_end(r.start, r.nr_pages) {
                task.lazy.insert(r.start, end);
            }
        }
    }

    /// Whether `pid` is a task of the restore.
    /// The link to the source was replaced: nothing sent on the old one counts any more. The
    /// new link pushes what dst reported missing (each page once again) and answers only the
    /// requests registered after this.
    pub fn reset_link(&mut self) {
        for t in self.tasks.values_mut() {
            t.pushed = Intervals::default();
            t.requested.clear();
        }
    }

    pub fn knows(&self, pid: u32) -> bool {
        self.tasks.contains_key(&pid)
    }

    /// dst asked the source for `[vaddr, +nr_pages)` of `pid`.
    pub fn requested(&mut self, pid: u32, vaddr: u64, nr_pages: u64) {
        if let (Some(task), Some(end)) = (self.tasks.get_mut(&pid), range_end(vaddr, nr_pages)) {
            task.requested.push((vaddr, end));
        }
    }

    /// Pages currently asked for and not yet answered, in requests (for tests and logs).
    pub fn outstanding_pages(&self, pid: u32) -> u64 {
        self.tasks.get(&pid).map_or(0, |t| {
            t.requested.iter().map(|(s, e)| (e - s) / PAGE_SIZE).sum()
        })
    }

    /// Decides on a Pages/Zero frame; on `Ok` the frame is recorded (its request used up, or its
    /// pages marked pushed) and may be written into the process.
    pub fn admit(
        &mut self,
        pid: u32,
        vaddr: u64,
        nr_pages: u64,
        urgent: bool,
    ) -> Result<(), Refusal> {
        let end = range_end(vaddr, nr_pages).ok_or(Refusal::BadRange {
            pid,
            vaddr,
            nr_pages,
        })?;
        let task = self
            .tasks
            .get_mut(&pid)
            .ok_or(Refusal::UnknownPid { pid })?;
        if let Some(page) = task.lazy.first_gap(vaddr, end) {
            return Err(Refusal::NotLazy {
                pid,
                start: vaddr,
                end,
                page,
            });
        }
        if urgent {
            let left = take_requested(&task.requested, vaddr, end).map_err(|page| {
                Refusal::NotRequested {
                    pid,
                    start: vaddr,
                    end,
                    page,
                }
            })?;
            task.requested = left;
        } else {
            if let Some(page) = task.pushed.first_hit(vaddr, end) {
                return Err(Refusal::AlreadyPushed {
                    pid,
                    start: vaddr,
                    end,
                    page,
                });
            }
            task.pushed.insert(vaddr, end);
        }
        Ok(())
    }
}

/// `[start, end)` of a page run, if it is non-empty, aligned and inside the address space.
fn range_end(start: u64, nr_pages: u64) -> Option<u64> {
    if nr_pages == 0 || !start.is_multiple_of(PAGE_SIZE) {
        return None;
    }
    nr_pages
        .checked_mul(PAGE_SIZE)
        .and_then(|len| start.checked_add(len))
}

/// The outstanding requests after answering `[start, end)`: each page is taken from one request
/// only. `Err(page)` names the first page no outstanding request covers.
fn take_requested(requests: &[(u64, u64)], start: u64, end: u64) -> Result<Vec<(u64, u64)>, u64> {
    let mut want = vec![(start, end)];
    let mut left = Vec::with_capacity(requests.len() + 1);
    for &request in requests {
        // The parts of this request that answer still-unanswered pieces are used up; a request
        // can span several pieces (an earlier request took the gap between them).
        let mut parts = vec![request];
        while let Some((p, w)) = parts.iter().enumerate().find_map(|(p, &(rs, re))| {
            want.iter()
                .position(|&(ws, we)| ws < re && rs < we)
                .map(|w| (p, w))
        }) {
            let (rs, re) = parts.swap_remove(p);
            let (ws, we) = want.swap_remove(w);
            let (os, oe) = (ws.max(rs), we.min(re));
            want.extend([(ws, os), (oe, we)].into_iter().filter(|(a, b)| a < b));
            parts.extend([(rs, os), (oe, re)].into_iter().filter(|(a, b)| a < b));
        }
        left.extend(parts);
    }
    match want.iter().map(|&(s, _)| s).min() {
        Some(page) => Err(page),
        None => Ok(left),
    }
}

#[cfg(test)]
mod tests;
