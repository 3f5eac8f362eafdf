use std::collections::{BTreeMap, BTreeSet};
use std::time::Instant;

use bytes::Bytes;
use proptest::prelude::*;

use super::*;

const P: u64 = PAGE_SIZE;

fn ranges() -> Vec<(u32, Vec<PageRange>)> {
    vec![
        (
            7,
            vec![PageRange::new(0x10000, 100), PageRange::new(0x200000, 3)],
        ),
        (9, vec![PageRange::new(0x400000, 130)]),
        (11, vec![PageRange::new(0x800000, 40)]),
    ]
}

fn all_pages() -> Vec<(u32, u64)> {
    ranges()
        .into_iter()
        .flat_map(|(pid, rs)| {
            rs.into_iter()
                .flat_map(move |r| (0..r.nr_pages).map(move |i| (pid, r.start + i * P)))
        })
        .collect()
}

fn core(readable: &[u32], max_bulk: usize, batch: u64) -> Core {
    Core::new(
        PushPlan::new(ranges()),
        CoreConfig {
            batch_pages: batch,
            max_bulk,
        },
        readable.iter().copied().collect(),
    )
}

/// A driver that checks every action against the rules as it polls them.
struct Harness {
    core: Core,
    /// Reads the core asked for and that have not ended: id -> (read, generation when issued).
    open: BTreeMap<u64, (Read, u64)>,
    /// Push slots: free (held by the driver) and bound to a bulk read.
    bound: BTreeSet<u64>,
    failed_pids: BTreeSet<u32>,
    pushed: BTreeMap<u64, Vec<(u32, u64)>>,
    answered: BTreeMap<u64, BTreeSet<(u32, u64)>>,
    closes: usize,
    started_push: bool,
    /// The generation each read was first issued in.
    gen_of: BTreeMap<u64, u64>,
    max_bulk: usize,
}

impl Harness {
    fn new(core: Core, max_bulk: usize) -> Self {
        Self {
            core,
            open: BTreeMap::new(),
            bound: BTreeSet::new(),
            failed_pids: BTreeSet::new(),
            pushed: BTreeMap::new(),
            answered: BTreeMap::new(),
            closes: 0,
            started_push: false,
            gen_of: BTreeMap::new(),
            max_bulk,
        }
    }

    fn drain(&mut self) -> Result<Vec<Action>, TestCaseError> {
        let mut got = Vec::new();
        while let Some(a) = self.core.poll() {
            let g = self.core.generation();
            match &a {
                Action::Read(r) => {
                    prop_assert_eq!(self.closes, 0, "a read after CloseCriu");
                    if r.origin == Origin::Memory {
                        prop_assert!(
                            !self.failed_pids.contains(&r.pid),
                            "memory read of a task that failed over to CRIU"
                        );
                    }
                    if r.lane == Lane::Bulk {
                        prop_assert!(self.started_push, "bulk read before the push started");
                        // A new bulk read takes a slot; one failed over to CRIU keeps its own.
                        if !self.gen_of.contains_key(&r.id) {
                            prop_assert!(self.bound.insert(r.id), "bulk read without a slot");
                        }
                    }
                    if r.lane == Lane::Fault && r.origin == Origin::Criu {
                        // A fault GET waits behind at most max_bulk bulk GETs inside CRIU.
                        let ahead = self
                            .open
                            .values()
                            .filter(|(o, _)| o.lane == Lane::Bulk && o.origin == Origin::Criu)
                            .count();
                        prop_assert!(ahead <= self.max_bulk);
                    }
                    let gen_at = *self.gen_of.entry(r.id).or_insert(g);
                    self.open.insert(r.id, (*r, gen_at));
                }
                Action::Answer {
                    generation,
                    pid,
                    vaddr,
                    nr_pages,
                    data,
                    ..
                } => {
                    prop_assert_eq!(*generation, g, "answer for a dead link");
                    prop_assert_eq!(u64::from(data[0]), g, "data read for a dead link");
                    let set = self.answered.entry(g).or_default();
                    for i in 0..*nr_pages {
                        set.insert((*pid, vaddr + i * P));
                    }
                }
                Action::Push {
                    generation,
                    id,
                    pid,
                    vaddr,
                    nr_pages,
                    data,
                } => {
                    prop_assert_eq!(*generation, g, "push for a dead link");
                    prop_assert_eq!(u64::from(data[0]), g, "data read for a dead link");
                    prop_assert!(self.bound.remove(id), "push without its slot");
                    let list = self.pushed.entry(g).or_default();
                    for i in 0..*nr_pages {
                        list.push((*pid, vaddr + i * P));
                    }
                }
                Action::Release { id } => {
                    prop_assert!(self.bound.remove(id), "release of an unbound slot");
                }
                Action::Refuse { generation, .. } => prop_assert_eq!(*generation, g),
                Action::CloseCriu => {
                    prop_assert!(self.open.is_empty(), "close with reads in flight");
                    self.closes += 1;
                }
            }
            got.push(a);
        }
        prop_assert!(self.closes <= 1, "CloseCriu twice");
        Ok(got)
    }

    /// Ends read number `pick` (modulo those open): with its data, short, or failed.
    fn end_read(&mut self, pick: usize, how: u8) -> Result<(), TestCaseError> {
        if self.open.is_empty() {
            return Ok(());
        }
        let id = *self.open.keys().nth(pick % self.open.len()).unwrap();
        let (r, gen_at) = self.open[&id];
        if how == 0 && r.origin == Origin::Memory {
            self.failed_pids.insert(r.pid);
            self.core.read_failed(id).map_err(|e| fail(&e))?;
            // The same id comes back as a CRIU read (drain re-opens it), or is dropped.
            self.open.remove(&id);
            self.drain()?;
            let _ = gen_at;
            return Ok(());
        }
        let pages = if how == 1 && r.nr_pages > 1 {
            r.nr_pages / 2
        } else {
            r.nr_pages
        };
        self.open.remove(&id);
        let data = Bytes::from(vec![gen_at as u8; (pages * P) as usize]);
        self.core.read_done(id, data).map_err(|e| fail(&e))?;
        self.drain()?;
        Ok(())
    }
}

fn fail(e: &CoreError) -> TestCaseError {
    TestCaseError::fail(format!("{e}"))
}

#[derive(Debug, Clone)]
enum Op {
    Fault(usize, u32),
    Slot,
    StartPush,
    End(usize, u8),
    Replan(u64),
}

fn arb_op() -> impl Strategy<Value = Op> {
    prop_oneof![
        (0usize..273, 1u32..6).prop_map(|(i, n)| Op::Fault(i, n)),
        Just(Op::Slot),
        Just(Op::StartPush),
        (any::<usize>(), 0u8..4).prop_map(|(i, h)| Op::End(i, h)),
        any::<u64>().prop_map(Op::Replan),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(400))]

    /// Whatever the order of faults, slots, completions, failovers to CRIU and reconnects:
    /// faults are read at once on their own lane, nothing read for a dead link is delivered,
    /// no page is pushed twice in a link, every page the last link lacks is pushed or answered,
    /// and CRIU's session is closed exactly once, after the last read.
    #[test]
    fn serving_rules_hold(
        readable in prop::sample::subsequence(vec![7u32, 9, 11], 0..=3),
        max_bulk in 1usize..4,
        batch in 1u64..70,
        ops in prop::collection::vec(arb_op(), 0..150),
    ) {
        let pages = all_pages();
        let mut h = Harness::new(core(&readable, max_bulk, batch), max_bulk);
        // Pages the current link must end up with: all, or dst's missing list after a replan.
        let mut owed: BTreeSet<(u32, u64)> = pages.iter().copied().collect();
        let mut generation = 0u64;
        for op in ops {
            match op {
                Op::Fault(i, n) => {
                    let (pid, vaddr) = pages[i % pages.len()];
                    let req = FaultRequest { pid, vaddr, nr_pages: n, at: Instant::now() };
                    let valid = PushPlan::new(ranges()).check_request(pid, vaddr, u64::from(n)).is_ok()
                        || PushPlan::new(ranges()).split_request(pid, vaddr, u64::from(n)).is_ok();
                    h.core.fault(req);
                    let acts = h.drain()?;
                    if valid {
                        // The fault's reads come first, and cover the request.
                        let mut covered = 0;
                        for a in &acts {
                            match a {
                                Action::Read(r) if r.lane == Lane::Fault => covered += r.nr_pages,
                                _ => break,
                            }
                        }
                        prop_assert_eq!(covered, u64::from(n), "fault reads first, whole request");
                    } else {
                        let refused = matches!(acts.first(), Some(Action::Refuse { .. }));
                        prop_assert!(refused, "an invalid request is refused");
                    }
                }
                Op::Slot => {
                    if h.core.wants_slot() {
                        h.core.slot();
                        h.drain()?;
                    }
                }
                Op::StartPush => {
                    h.started_push = true;
                    h.core.start_push();
                    h.drain()?;
                }
                Op::End(i, how) => h.end_read(i, how)?,
                Op::Replan(seed) => {
                    // dst lacks every page whose hash with the seed is odd.
                    let mut missing: BTreeMap<u32, Vec<PageRange>> = BTreeMap::new();
                    let mut want = BTreeSet::new();
                    for &(pid, vaddr) in &pages {
                        if (vaddr / P).wrapping_mul(seed | 1).rotate_left(17) & 1 == 1 {
                            missing.entry(pid).or_default().push(PageRange::new(vaddr, 1));
                            want.insert((pid, vaddr));
                        }
                    }
                    generation += 1;
                    let left = h.core.replan(generation, missing.into_iter().collect());
                    prop_assert_eq!(left, Ok(want.len() as u64));
                    owed = want;
                    h.drain()?;
                }
            }
        }
        // Drive to the end: the push runs, every read completes.
        h.started_push = true;
        h.core.start_push();
        h.drain()?;
        for _ in 0..100_000 {
            if h.core.wants_slot() {
                h.core.slot();
                h.drain()?;
            } else if !h.open.is_empty() {
                h.end_read(0, 3)?;
            } else {
                break;
            }
        }
        prop_assert_eq!(h.core.remaining_pages(), 0);
        let pushed = h.pushed.remove(&generation).unwrap_or_default();
        let unique: BTreeSet<(u32, u64)> = pushed.iter().copied().collect();
        prop_assert_eq!(unique.len(), pushed.len(), "a page pushed twice on one link");
        let answered = h.answered.remove(&generation).unwrap_or_default();
        for p in &owed {
            prop_assert!(unique.contains(p) || answered.contains(p), "page {:?} never sent", p);
        }
        // Finishing: one close, after everything ended; faults afterwards are ignored.
        h.core.finish();
        h.drain()?;
        prop_assert_eq!(h.closes, 1);
        h.core.fault(FaultRequest { pid: 7, vaddr: 0x10000, nr_pages: 1, at: Instant::now() });
        prop_assert!(h.drain()?.is_empty());
    }
}

#[test]
fn finish_waits_for_reads_in_flight() {
    let mut c = core(&[7, 9, 11], 2, 16);
    c.fault(FaultRequest {
        pid: 7,
        vaddr: 0x10000,
        nr_pages: 1,
        at: Instant::now(),
    });
    let Some(Action::Read(r)) = c.poll() else {
        panic!("no read")
    };
    assert_eq!((r.lane, r.origin), (Lane::Fault, Origin::Memory));
    c.finish();
    assert_eq!(
        c.poll(),
        None,
        "no close while a read of frozen memory runs"
    );
    c.read_done(r.id, Bytes::from(vec![0u8; P as usize]))
        .unwrap();
    assert_eq!(c.poll(), Some(Action::CloseCriu));
}

#[test]
fn a_failed_memory_read_goes_to_criu_and_so_does_its_task() {
    let mut c = core(&[7, 9], 2, 16);
    c.fault(FaultRequest {
        pid: 7,
        vaddr: 0x10000,
        nr_pages: 2,
        at: Instant::now(),
    });
    let Some(Action::Read(r)) = c.poll() else {
        panic!()
    };
    c.read_failed(r.id).unwrap();
    let Some(Action::Read(again)) = c.poll() else {
        panic!()
    };
    assert_eq!(
        again,
        Read {
            origin: Origin::Criu,
            ..r
        }
    );
    assert_eq!(
        c.read_failed(again.id),
        Err(CoreError::CriuReadFailed(again.id))
    );
    c.fault(FaultRequest {
        pid: 7,
        vaddr: 0x10000 + 5 * P,
        nr_pages: 1,
        at: Instant::now(),
    });
    let Some(Action::Read(next)) = c.poll() else {
        panic!()
    };
    assert_eq!(next.origin, Origin::Criu);
    // Pid 11 was never readable (no host pid): CRIU from the start.
    c.fault(FaultRequest {
        pid: 11,
        vaddr: 0x800000,
        nr_pages: 1,
        at: Instant::now(),
    });
    let Some(Action::Read(r11)) = c.poll() else {
        panic!()
    };
    assert_eq!(r11.origin, Origin::Criu);
    assert_eq!(c.stats().failovers, 1);
}

#[test]
fn bulk_reads_need_slots_and_stop_at_max_bulk() {
    let mut c = core(&[7, 9, 11], 2, 1024);
    c.start_push();
    assert!(c.wants_slot());
    assert_eq!(c.poll(), None, "no slot, no read");
    c.slot();
    c.slot();
    let a = c.poll();
    let b = c.poll();
    assert!(matches!(
        a,
        Some(Action::Read(Read {
            lane: Lane::Bulk,
            ..
        }))
    ));
    assert!(matches!(
        b,
        Some(Action::Read(Read {
            lane: Lane::Bulk,
            ..
        }))
    ));
    assert!(!c.wants_slot(), "two bulk reads in flight");
    c.slot();
    assert_eq!(c.poll(), None);
}
