//! The engine against a simulated kernel and a simulated source, in random orders of faults,
//! fault answers, pushes, refused copies (EAGAIN), link replacements and late deliveries of a
//! replaced link. The rules checked (see the engine's module docs):
//! - every lazy page is placed, exactly once, with the source's data, and the engine reports
//!   the memory complete;
//! - a thread is counted as waiting for a page only once that page was asked of the source on
//!   the current link;
//! - nothing a replaced link delivers is placed.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use nix::errno::Errno;
use proptest::prelude::*;

use super::{Arrived, Engine, Input, Kernel, Owner, UffdEvent, ViewId};
use crate::dst::uffd_loop::ioctl::Fill;
use crate::dst::uffd_loop::{HeldAnswer, HeldPages, LoopConfig, Outbound, UffdStats};
use crate::pages::{PAGE_SIZE, PageRange, PidRange};

const P: u64 = PAGE_SIZE;
/// What a replaced link's data holds: never a page's real content.
const STALE: u8 = 0xEE;

/// The first image address of task `t`.
fn base(t: usize) -> u64 {
    0x4000_0000 + (t as u64) * 0x100_0000
}

fn pid(t: usize) -> u32 {
    100 + t as u32
}

/// Whether the source finds this page all-zero (sent as a Zero run).
fn is_zero(page: u64) -> bool {
    (page / P) % 7 == 3
}

/// A page's content (its first byte; the rest of the page is the same).
fn content(pid: u32, page: u64) -> u8 {
    if is_zero(page) {
        0
    } else {
        ((pid as u64 + page / P) % 0x7F) as u8 + 1
    }
}

/// One simulated process behind a uffd: its present pages and queued events.
#[derive(Default)]
struct SimView {
    registered: Vec<PageRange>,
    present: BTreeMap<u64, u8>,
    events: VecDeque<UffdEvent<u32>>,
    /// COPY/ZEROPAGE answer EAGAIN until this many event reads have happened.
    blocked: u32,
}

/// The simulated kernel: uffds by view, and every fill attempt per page.
#[derive(Default)]
struct Sim {
    now: Option<Instant>,
    /// The lazy ranges of each pid, handed over with its uffd (the uffd handle is the pid).
    lazy: BTreeMap<u32, Vec<PageRange>>,
    views: BTreeMap<ViewId, SimView>,
    view_of: BTreeMap<u32, ViewId>,
    attempts: BTreeMap<(ViewId, u64), u32>,
}

impl Sim {
    fn fill(&mut self, id: ViewId, addr: u64, pages: u64, data: Option<&[u8]>) -> Fill {
        let Some(v) = self.views.get_mut(&id) else {
            return Fill::Gone;
        };
        if v.blocked > 0 {
            return Fill::Again;
        }
        for i in 0..pages {
            let page = addr + i * P;
            if !v.registered.iter().any(|r| r.contains(page)) {
                return if i == 0 {
                    Fill::NotRegistered
                } else {
                    Fill::Partial { pages: i }
                };
            }
            *self.attempts.entry((id, page)).or_default() += 1;
            if v.present.contains_key(&page) {
                return if i == 0 {
                    Fill::Exists
                } else {
                    Fill::Partial { pages: i }
                };
            }
            let byte = data.map_or(0, |d| d[(i * P) as usize]);
            v.present.insert(page, byte);
        }
        Fill::Done
    }
}

impl Kernel for Sim {
    type Uffd = u32;

    fn now(&self) -> Instant {
        self.now.expect("the test sets the clock")
    }

    fn attach(&mut self, id: ViewId, pid: u32, _: Owner, _: bool) -> Result<(), String> {
        let registered = self.lazy.get(&pid).cloned().unwrap_or_default();
        self.views.insert(
            id,
            SimView {
                registered,
                ..SimView::default()
            },
        );
        self.view_of.insert(pid, id);
        Ok(())
    }

    fn unwatch(&mut self, _: ViewId) {}

    fn close(&mut self, id: ViewId) {
        self.views.remove(&id);
    }

    fn read_events(&mut self, id: ViewId) -> Result<Vec<UffdEvent<u32>>, String> {
        let v = self.views.get_mut(&id).ok_or("no such view")?;
        v.blocked = v.blocked.saturating_sub(1);
        Ok(v.events.drain(..).collect())
    }

    fn copy(&mut self, id: ViewId, addr: u64, data: &[u8]) -> Result<Fill, Errno> {
        Ok(self.fill(id, addr, data.len() as u64 / P, Some(data)))
    }

    fn zeropage(&mut self, id: ViewId, addr: u64, pages: u64) -> Result<Fill, Errno> {
        Ok(self.fill(id, addr, pages, None))
    }

    fn unregister(&mut self, _: ViewId, _: u64, _: u64) -> Result<(), Errno> {
        Ok(())
    }
}

/// The source as the engine sees it: what it was asked on the current link, what it pushed.
#[derive(Default)]
struct Source {
    link: u64,
    /// Requests of the current link not answered yet.
    open: Vec<PidRange>,
    /// Every request of the current link.
    asked: Vec<PidRange>,
    pushed: BTreeSet<(u32, u64)>,
    /// After a resume: only what dst reported missing is pushed.
    missing: Option<BTreeSet<(u32, u64)>>,
    /// What replaced links had on their way: (pages, urgent, link).
    stale: Vec<(PidRange, bool, u64)>,
    errors: Vec<String>,
    complete: bool,
}

/// Pages of `r` as the source sends them: one message per run of zero / non-zero pages.
fn messages(r: PidRange, urgent: bool, link: u64, stale: bool) -> Vec<Input<u32>> {
    let mut out = Vec::new();
    let mut at = 0;
    while at < r.nr_pages() {
        let first = r.start() + at * P;
        let zero = is_zero(first) && !stale;
        let mut n = 1;
        while at + n < r.nr_pages() && (is_zero(first + n * P) && !stale) == zero {
            n += 1;
        }
        let range = PidRange::new(r.pid, first, n);
        let data = (!zero).then(|| {
            let mut d = Vec::with_capacity((n * P) as usize);
            for i in 0..n {
                let b = if stale {
                    STALE
                } else {
                    content(r.pid, first + i * P)
                };
                d.extend(std::iter::repeat_n(b, P as usize));
            }
            Bytes::from(d)
        });
        out.push(Input::Arrived(Arrived {
            at: range,
            data,
            urgent,
            link,
        }));
        at += n;
    }
    out
}

#[derive(Debug, Clone)]
enum Op {
    Fault { task: usize, page: u64 },
    Answer { pick: usize },
    Push { task: usize, page: u64, n: u64 },
    Block { task: usize, rounds: u32 },
    Round,
    RestoreFinished,
    Resume,
    Stale { pick: usize },
}

fn op(tasks: usize) -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => (0..tasks, 0..48u64).prop_map(|(task, page)| Op::Fault { task, page }),
        3 => any::<usize>().prop_map(|pick| Op::Answer { pick }),
        3 => (0..tasks, 0..48u64, 1..100u64).prop_map(|(task, page, n)| Op::Push { task, page, n }),
        1 => (0..tasks, 1..40u32).prop_map(|(task, rounds)| Op::Block { task, rounds }),
        2 => Just(Op::Round),
        1 => Just(Op::RestoreFinished),
        1 => Just(Op::Resume),
        2 => any::<usize>().prop_map(|pick| Op::Stale { pick }),
    ]
}

/// Records what the engine reports placed ([`HeldPages::placed`], on which dst gives its page
/// store's copies back); holds no pages itself.
#[derive(Debug, Default)]
struct PlacedLog(std::sync::Mutex<Vec<PidRange>>);

impl HeldPages for PlacedLog {
    fn take(&self, _: u64, r: PidRange) -> HeldAnswer {
        HeldAnswer {
            found: Vec::new(),
            rest: vec![r],
        }
    }

    fn placed(&self, at: PidRange) {
        self.0.lock().expect("placed log").push(at);
    }
}

struct World {
    engine: Engine,
    placed: Arc<PlacedLog>,
    sim: Sim,
    src: Source,
    /// Task t's lazy pages: `[base(t), +sizes[t])`.
    sizes: Vec<u64>,
    serial: u64,
}

impl World {
    fn new(sizes: Vec<u64>, readahead: u64) -> World {
        let placed = Arc::new(PlacedLog::default());
        let config = LoopConfig {
            readahead_pages: readahead,
            // The invariants must hold with adaptive read-ahead too (`--sequential-readahead`).
            sequential_readahead: true,
            held: Some(placed.clone()),
            ..Default::default()
        };
        let mut w = World {
            engine: Engine::new(config, Arc::new(UffdStats::default())),
            placed,
            sim: Sim {
                now: Some(Instant::now()),
                ..Sim::default()
            },
            src: Source::default(),
            sizes,
            serial: 0,
        };
        for t in 0..w.sizes.len() {
            let lazy = vec![PageRange::new(base(t), w.sizes[t])];
            w.sim.lazy.insert(pid(t), lazy.clone());
            w.input(Input::Task {
                pid: pid(t) as i32,
                uffd: pid(t),
                lazy,
                host_pid: None,
            });
        }
        w
    }

    fn input(&mut self, i: Input<u32>) {
        self.engine.handle(&mut self.sim, i);
        self.output();
    }

    /// The engine's messages, as the service and the source take them.
    fn output(&mut self) {
        for m in self.engine.take_output() {
            match m {
                Outbound::Fault(r) => {
                    self.src.open.push(r);
                    self.src.asked.push(r);
                }
                Outbound::Resumed {
                    serial,
                    missing,
                    requests,
                } => {
                    let old = self.src.link;
                    let stale: Vec<_> = self.src.open.drain(..).map(|r| (r, true, old)).collect();
                    self.src.stale.extend(stale);
                    self.src.link = serial;
                    self.src.open = requests.clone();
                    self.src.asked = requests;
                    self.src.pushed.clear();
                    self.src.missing = Some(
                        missing
                            .iter()
                            .flat_map(|(pid, rs)| {
                                rs.iter().flat_map(move |r| {
                                    (0..r.nr_pages).map(move |i| (*pid, r.start + i * P))
                                })
                            })
                            .collect(),
                    );
                }
                Outbound::Error(e) => self.src.errors.push(e),
                Outbound::Complete => self.src.complete = true,
                Outbound::TaskGone { .. } => {}
            }
        }
    }

    fn view(&self, t: usize) -> Option<ViewId> {
        self.sim.view_of.get(&pid(t)).copied()
    }

    /// Pushes the pages of `[page, +n)` of task `t` the source has not pushed on this link.
    fn push(&mut self, t: usize, page: u64, n: u64) {
        let end = (page + n).min(self.sizes[t]);
        let mut run: Option<PidRange> = None;
        let mut runs = Vec::new();
        for i in page..end {
            let key = (pid(t), base(t) + i * P);
            let wanted = self.src.missing.as_ref().is_none_or(|m| m.contains(&key));
            if wanted && self.src.pushed.insert(key) {
                if let Some(r) = run.as_mut().filter(|r| r.range.end() == key.1) {
                    r.range.nr_pages += 1;
                } else {
                    runs.extend(run.replace(PidRange::new(key.0, key.1, 1)));
                }
            }
        }
        runs.extend(run);
        for r in runs {
            for m in messages(r, false, self.src.link, false) {
                self.input(m);
            }
            // A replaced link may still deliver what it pushed.
            self.src.stale.push((r, false, self.src.link));
        }
    }

    fn answer(&mut self, pick: usize) {
        if self.src.open.is_empty() {
            return;
        }
        let r = self.src.open.remove(pick % self.src.open.len());
        for m in messages(r, true, self.src.link, false) {
            self.input(m);
        }
    }

    fn round(&mut self) {
        self.engine.retry(&mut self.sim);
        self.engine.place_next_piece(&mut self.sim);
        self.engine.check_complete();
        self.output();
    }

    fn step(&mut self, op: &Op) {
        let now = self.sim.now() + Duration::from_millis(1);
        self.sim.now = Some(now);
        match *op {
            Op::Fault { task, page } => {
                let addr = base(task) + (page % self.sizes[task]) * P;
                let Some(id) = self.view(task) else { return };
                let v = self.sim.views.get_mut(&id).expect("view");
                // Only a missing page faults.
                if !v.present.contains_key(&addr) {
                    v.events.push_back(UffdEvent::Fault { addr: addr + 17 });
                    self.engine.read_events(&mut self.sim, id);
                    self.output();
                }
            }
            Op::Answer { pick } => self.answer(pick),
            Op::Push { task, page, n } => self.push(task, page % self.sizes[task], n),
            Op::Block { task, rounds } => {
                if let Some(v) = self.view(task).and_then(|id| self.sim.views.get_mut(&id)) {
                    v.blocked = rounds;
                }
            }
            Op::Round => self.round(),
            Op::RestoreFinished => self.input(Input::RestoreFinished),
            Op::Resume => {
                self.serial += 1;
                self.input(Input::Resume {
                    serial: self.serial,
                });
            }
            Op::Stale { pick } => {
                let old: Vec<_> = self
                    .src
                    .stale
                    .iter()
                    .filter(|(_, _, link)| *link != self.src.link)
                    .copied()
                    .collect();
                if old.is_empty() {
                    return;
                }
                let (r, urgent, link) = old[pick % old.len()];
                for m in messages(r, urgent, link, true) {
                    self.input(m);
                }
            }
        }
    }

    /// The source finishes: the restore ends, every open request is answered, every page it
    /// still has to push is pushed, and the kernel stops refusing.
    fn finish(&mut self) {
        self.input(Input::RestoreFinished);
        for v in self.sim.views.values_mut() {
            v.blocked = 0;
        }
        for _ in 0..10_000 {
            while !self.src.open.is_empty() {
                self.answer(0);
            }
            for t in 0..self.sizes.len() {
                self.push(t, 0, self.sizes[t]);
            }
            self.round();
            if self.src.complete && !self.engine.wants_retry() && !self.engine.has_pieces() {
                break;
            }
        }
    }

    /// Every waiting thread's page was asked of the source on the current link.
    fn asked_before_waiting(&self) -> Result<(), TestCaseError> {
        for (pid, img) in self.engine.waiting_pages() {
            prop_assert!(
                self.src
                    .asked
                    .iter()
                    .any(|r| r.pid == pid && r.range.contains(img)),
                "a thread waits for page {img:#x} of pid {pid}, never asked on link {}",
                self.src.link
            );
        }
        Ok(())
    }

    /// No page holds what a replaced link sent.
    fn nothing_stale(&self) -> Result<(), TestCaseError> {
        for (id, v) in &self.sim.views {
            for (page, byte) in &v.present {
                prop_assert_ne!(
                    *byte,
                    STALE,
                    "view {} page {:#x}: a replaced link's data",
                    id,
                    page
                );
            }
        }
        Ok(())
    }

    /// Every range reported placed is in its process with the source's data (so a copy dst holds
    /// of it may go); with `whole`, every lazy page was reported.
    fn reported_placed_only_in_place(&self, whole: bool) -> Result<(), TestCaseError> {
        let log = self.placed.0.lock().expect("placed log");
        let mut reported = BTreeSet::new();
        for r in log.iter() {
            let t = (r.pid - 100) as usize;
            let id = self.view(t).expect("view");
            let v = &self.sim.views[&id];
            for i in 0..r.nr_pages() {
                let page = r.start() + i * P;
                prop_assert_eq!(
                    v.present.get(&page).copied(),
                    Some(content(r.pid, page)),
                    "page {:#x} of pid {} reported placed, but not in place with its data",
                    page,
                    r.pid
                );
                reported.insert((r.pid, page));
            }
        }
        if whole {
            for t in 0..self.sizes.len() {
                for i in 0..self.sizes[t] {
                    let page = base(t) + i * P;
                    prop_assert!(
                        reported.contains(&(pid(t), page)),
                        "task {} page {:#x} placed but never reported",
                        t,
                        page
                    );
                }
            }
        }
        Ok(())
    }

    /// Every lazy page is present with its content, filled exactly once; the engine said so.
    fn all_placed_once(&self) -> Result<(), TestCaseError> {
        prop_assert!(
            self.src.errors.is_empty(),
            "engine errors: {:?}",
            self.src.errors
        );
        for t in 0..self.sizes.len() {
            let id = self.view(t).expect("view");
            let v = &self.sim.views[&id];
            for i in 0..self.sizes[t] {
                let page = base(t) + i * P;
                prop_assert_eq!(
                    v.present.get(&page).copied(),
                    Some(content(pid(t), page)),
                    "task {} page {:#x}",
                    t,
                    page
                );
                prop_assert_eq!(
                    self.sim.attempts.get(&(id, page)).copied(),
                    Some(1),
                    "task {} page {:#x} filled more than once",
                    t,
                    page
                );
            }
        }
        prop_assert!(
            self.src.complete,
            "the engine never reported the memory complete"
        );
        Ok(())
    }
}

fn scenario() -> impl Strategy<Value = (Vec<u64>, u64, Vec<Op>)> {
    (prop::collection::vec(1..150u64, 1..3), 0..8u64).prop_flat_map(|(sizes, readahead)| {
        let ops = prop::collection::vec(op(sizes.len()), 0..120);
        (Just(sizes), Just(readahead), ops)
    })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(400))]

    /// Every lazy page is placed exactly once, whatever the order of events.
    #[test]
    fn every_lazy_page_is_placed_exactly_once((sizes, readahead, ops) in scenario()) {
        let mut w = World::new(sizes, readahead);
        for op in &ops {
            w.step(op);
        }
        w.finish();
        w.all_placed_once()?;
    }

    /// A faulting thread waits only on a page the source was asked for on the current link.
    #[test]
    fn a_fault_is_asked_before_it_waits((sizes, readahead, ops) in scenario()) {
        let mut w = World::new(sizes, readahead);
        for op in &ops {
            w.step(op);
            w.asked_before_waiting()?;
        }
    }

    /// What the engine reports placed is in place with the source's data, and in the end
    /// every lazy page is reported: dst's page store gives back exactly what is no longer needed.
    #[test]
    fn only_pages_in_place_are_reported_placed((sizes, readahead, ops) in scenario()) {
        let mut w = World::new(sizes, readahead);
        for op in &ops {
            w.step(op);
            w.reported_placed_only_in_place(false)?;
        }
        w.finish();
        w.reported_placed_only_in_place(true)?;
    }

    /// Pages a replaced link delivers late never reach a process.
    #[test]
    fn nothing_from_a_dead_link_is_placed((sizes, readahead, ops) in scenario()) {
        let mut w = World::new(sizes, readahead);
        for op in &ops {
            w.step(op);
            w.nothing_stale()?;
        }
        w.finish();
        w.nothing_stale()?;
    }
}

/// A fault that asks the source and a fault on a page it already asked for (its read-ahead)
/// are counted apart, and both in the overall latency.
#[test]
fn fault_latency_splits_asked_from_already_asked() {
    let mut w = World::new(vec![16], 3);
    w.step(&Op::Fault { task: 0, page: 0 });
    w.step(&Op::Fault { task: 0, page: 1 });
    w.step(&Op::Fault { task: 0, page: 2 });
    assert_eq!(
        w.src.open.len(),
        1,
        "one request: page 0 and its read-ahead"
    );
    w.step(&Op::Answer { pick: 0 });
    let s = &w.engine.stats;
    let count = |h: &crate::latency::LatencyHistogram| h.summary(0).count;
    assert_eq!(count(&s.fault_latency), 3);
    assert_eq!(count(&s.fault_latency_asked), 1);
    assert_eq!(count(&s.fault_latency_already_asked), 2);
}
