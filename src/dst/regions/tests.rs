//! TaskMemory against a naive model: a map runtime page → image page, and image page → state.

use std::collections::{BTreeMap, BTreeSet};

use proptest::prelude::*;

use super::*;

const P: u64 = PAGE_SIZE;
/// Runtime addresses the tests use (pages), wide enough for remaps away from the image.
const RT_PAGES: u64 = 160;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum St {
    Pending,
    InFlight,
    Settled,
}

#[derive(Debug, Clone)]
struct Model {
    readahead: u64,
    piece_of: BTreeMap<u64, usize>,
    rt: BTreeMap<u64, u64>,
    state: BTreeMap<u64, St>,
}

impl Model {
    fn new(pieces: &[(u64, u64)], readahead: u64) -> Self {
        let mut m = Model {
            readahead,
            piece_of: BTreeMap::new(),
            rt: BTreeMap::new(),
            state: BTreeMap::new(),
        };
        for (i, &(start, n)) in pieces.iter().enumerate() {
            for pg in start..start + n {
                m.piece_of.insert(pg, i);
                m.rt.insert(pg, pg);
                m.state.insert(pg, St::Pending);
            }
        }
        m
    }

    fn fault(&mut self, rt: u64) -> FaultAction {
        let Some(&img) = self.rt.get(&rt) else {
            return FaultAction::Zero;
        };
        match self.state[&img] {
            St::InFlight => FaultAction::AlreadyRequested { img_vaddr: img * P },
            St::Settled => FaultAction::Zero,
            St::Pending => {
                let mut n = 0;
                while n <= self.readahead
                    && self.piece_of.get(&(img + n)) == self.piece_of.get(&img)
                    && self.state.get(&(img + n)) == Some(&St::Pending)
                {
                    self.state.insert(img + n, St::InFlight);
                    n += 1;
                }
                FaultAction::Request {
                    img_vaddr: img * P,
                    nr_pages: n,
                }
            }
        }
    }

    fn needed(&self, img: u64) -> bool {
        matches!(self.state.get(&img), Some(St::Pending | St::InFlight))
    }

    fn drop_rt(&mut self, from: u64, to: u64) {
        let keys: Vec<u64> = self.rt.range(from..to).map(|(k, _)| *k).collect();
        for k in keys {
            let img = self.rt.remove(&k).unwrap();
            self.state.insert(img, St::Settled);
        }
    }

    fn remap(&mut self, from: u64, to: u64, n: u64) {
        let moved: Vec<(u64, u64)> = self
            .rt
            .range(from..from + n)
            .map(|(k, v)| (*k, *v))
            .collect();
        for (k, _) in &moved {
            self.rt.remove(k);
        }
        self.drop_rt(to, to + n);
        for (k, v) in moved {
            self.rt.insert(k - from + to, v);
        }
    }

    fn fork(&self) -> Model {
        let mut c = self.clone();
        for s in c.state.values_mut() {
            if *s == St::InFlight {
                *s = St::Pending;
            }
        }
        c
    }
}

#[derive(Debug, Clone)]
enum Op {
    Fault {
        view: usize,
        rt: u64,
    },
    Pages {
        view: usize,
        img: u64,
        n: u64,
        outcomes: Vec<u8>,
    },
    Remove {
        view: usize,
        rt: u64,
        n: u64,
    },
    Unmap {
        view: usize,
        rt: u64,
        n: u64,
    },
    Remap {
        view: usize,
        from: u64,
        to: u64,
        n: u64,
    },
    Fork {
        view: usize,
    },
}

fn op_strategy() -> impl Strategy<Value = Op> {
    let v = 0usize..4;
    prop_oneof![
        4 => (v.clone(), 0..RT_PAGES).prop_map(|(view, rt)| Op::Fault { view, rt }),
        4 => (v.clone(), 0u64..80, 1u64..40, proptest::collection::vec(0u8..12, 1..8))
            .prop_map(|(view, img, n, outcomes)| Op::Pages { view, img, n, outcomes }),
        1 => (v.clone(), 0..RT_PAGES, 1u64..12).prop_map(|(view, rt, n)| Op::Remove { view, rt, n }),
        1 => (v.clone(), 0..RT_PAGES, 1u64..12).prop_map(|(view, rt, n)| Op::Unmap { view, rt, n }),
        2 => (v.clone(), 0..RT_PAGES, 0..RT_PAGES, 1u64..20)
            .prop_map(|(view, from, to, n)| Op::Remap { view, from, to, n }),
        1 => v.prop_map(|view| Op::Fork { view }),
    ]
}

/// Non-overlapping pieces (image pages), possibly adjacent, from (gap, len) pairs.
fn pieces_strategy() -> impl Strategy<Value = Vec<(u64, u64)>> {
    proptest::collection::vec((0u64..4, 1u64..14), 1..5).prop_map(|v| {
        let mut at = 2;
        v.into_iter()
            .map(|(gap, len)| {
                at += gap;
                let p = (at, len);
                at += len;
                p
            })
            .collect()
    })
}

fn check(mem: &TaskMemory, m: &Model) -> Result<(), TestCaseError> {
    for (&img, &st) in &m.state {
        let want = match st {
            St::Pending => PageState::Pending,
            St::InFlight => PageState::InFlight,
            St::Settled => PageState::Settled,
        };
        prop_assert_eq!(mem.state_of(img * P), want, "image page {}", img);
    }
    prop_assert_eq!(mem.state_of(0), PageState::NotLazy);
    for rt in 0..RT_PAGES + 24 {
        prop_assert_eq!(
            mem.image_of(rt * P),
            m.rt.get(&rt).map(|i| i * P),
            "runtime page {}",
            rt
        );
    }
    // A missing page is always mapped somewhere: otherwise it could never be placed.
    let mapped: BTreeSet<u64> = m.rt.values().copied().collect();
    for (&img, &st) in &m.state {
        if st != St::Settled {
            prop_assert!(mapped.contains(&img));
        }
    }
    let count = |s: St| m.state.values().filter(|&&x| x == s).count() as u64;
    prop_assert_eq!(mem.pending_pages(), count(St::Pending));
    prop_assert_eq!(mem.in_flight_pages(), count(St::InFlight));
    prop_assert_eq!(
        mem.is_complete(),
        count(St::Pending) + count(St::InFlight) == 0
    );
    let missing: Vec<u64> = mem
        .missing_ranges()
        .iter()
        .flat_map(|r| (0..r.nr_pages).map(move |i| r.start / P + i))
        .collect();
    let want: Vec<u64> = m.state.keys().copied().filter(|&i| m.needed(i)).collect();
    prop_assert_eq!(missing, want);
    for x in [0u64, 5, 20, 40, 90] {
        let pend = |i: &u64| m.state[i] == St::Pending;
        let want = m
            .state
            .keys()
            .copied()
            .find(|i| *i >= x && pend(i))
            .or_else(|| m.state.keys().copied().rev().find(|i| *i < x && pend(i)));
        prop_assert_eq!(mem.next_pending_near(x * P), want.map(|i| i * P));
    }
    Ok(())
}

/// Runs one arrival of pages through the plan, with copy outcomes drawn from `outcomes`.
fn arrive(
    mem: &mut TaskMemory,
    m: &mut Model,
    copied: &mut BTreeSet<u64>,
    img: u64,
    n: u64,
    outcomes: &[u8],
) -> Result<(), TestCaseError> {
    // The plan offers exactly the missing pages, each at its current runtime address.
    let mut plan = mem.on_pages(img * P, n);
    let mut offered = Vec::new();
    while let Some(op) = plan.next_op() {
        prop_assert!(op.nr_pages > 0);
        for i in 0..op.nr_pages {
            offered.push((
                op.img_vaddr / P + i,
                op.runtime_addr / P + i,
                op.offset_in_data / P + i,
            ));
        }
    }
    let want: Vec<(u64, u64, u64)> = (img..img + n)
        .filter(|i| m.needed(*i))
        .map(|i| (i, *m.rt.iter().find(|(_, v)| **v == i).unwrap().0, i - img))
        .collect();
    prop_assert_eq!(offered, want);

    let mut plan = mem.on_pages(img * P, n);
    let settle = |op: &CopyOp, k: u64, m: &mut Model| -> Result<(), TestCaseError> {
        for i in 0..k {
            let (pi, pr) = (op.img_vaddr / P + i, op.runtime_addr / P + i);
            prop_assert!(m.needed(pi), "page {} settled twice", pi);
            prop_assert_eq!(
                m.rt.get(&pr),
                Some(&pi),
                "copy into an unmapped runtime page"
            );
            m.state.insert(pi, St::Settled);
        }
        Ok(())
    };
    for step in 0..200 {
        let Some(op) = plan.next_op() else { break };
        let o = outcomes[step % outcomes.len()];
        let n = op.nr_pages;
        match o {
            // Partial copy (EAGAIN): stop, the rest stays missing.
            8 | 9 => {
                let k = u64::from(o) % n;
                prop_assert_eq!(plan.placed(&op, k), k);
                settle(&op, k, m)?;
                for i in 0..k {
                    prop_assert!(copied.insert(op.img_vaddr / P + i), "page copied twice");
                }
                break;
            }
            // EEXIST on the first page: it counts as placed, the rest is offered again.
            10 => {
                prop_assert_eq!(plan.placed(&op, 1), 1);
                settle(&op, 1, m)?;
            }
            // ENOENT: dropped.
            11 => {
                prop_assert_eq!(plan.unplaceable(&op, n), n);
                settle(&op, n, m)?;
            }
            _ => {
                prop_assert_eq!(plan.placed(&op, n), n);
                settle(&op, n, m)?;
                for i in 0..n {
                    prop_assert!(copied.insert(op.img_vaddr / P + i), "page copied twice");
                }
            }
        }
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(400))]
    #[test]
    fn task_memory_agrees_with_model(
        pieces in pieces_strategy(),
        readahead in 0u64..4,
        ops in proptest::collection::vec(op_strategy(), 1..60),
    ) {
        let ranges: Vec<PageRange> = pieces.iter().map(|&(s, n)| PageRange::new(s * P, n)).collect();
        let mem = TaskMemory::new(7, &ranges).unwrap().with_readahead(readahead);
        let mut views = vec![(mem, Model::new(&pieces, readahead), BTreeSet::new())];
        for op in ops {
            let nviews = views.len();
            match op {
                Op::Fault { view, rt } => {
                    let (mem, m, _) = &mut views[view % nviews];
                    prop_assert_eq!(mem.on_fault(rt * P + 17), m.fault(rt));
                }
                Op::Pages { view, img, n, outcomes } => {
                    let (mem, m, copied) = &mut views[view % nviews];
                    arrive(mem, m, copied, img, n, &outcomes)?;
                }
                Op::Remove { view, rt, n } => {
                    let (mem, m, _) = &mut views[view % nviews];
                    mem.on_remove(rt * P, (rt + n) * P);
                    m.drop_rt(rt, rt + n);
                }
                Op::Unmap { view, rt, n } => {
                    let (mem, m, _) = &mut views[view % nviews];
                    mem.on_unmap(rt * P, (rt + n) * P);
                    m.drop_rt(rt, rt + n);
                }
                Op::Remap { view, from, to, n } => {
                    let (mem, m, _) = &mut views[view % nviews];
                    mem.on_remap(from * P, to * P, n * P);
                    m.remap(from, to, n);
                }
                Op::Fork { view } => {
                    if views.len() < 4 {
                        let (mem, m, _) = &views[view % views.len()];
                        let child = (mem.fork_child(), m.fork(), BTreeSet::new());
                        prop_assert_eq!(child.0.pid(), 7);
                        views.push(child);
                    }
                }
            }
            for (mem, m, _) in &views {
                check(mem, m)?;
            }
        }
    }
}

#[test]
fn rejects_bad_ranges() {
    let r = |s, n| PageRange::new(s, n);
    assert!(matches!(
        TaskMemory::new(1, &[r(4096, 2), r(8192, 1)]),
        Err(RegionsError::Overlap { .. })
    ));
    assert!(matches!(
        TaskMemory::new(1, &[r(100, 1)]),
        Err(RegionsError::BadRange { .. })
    ));
    assert!(matches!(
        TaskMemory::new(1, &[r(u64::MAX - 4095, 2)]),
        Err(RegionsError::BadRange { .. })
    ));
    assert!(matches!(
        TaskMemory::new(1, &[r(0, MAX_LAZY_PAGES + 1)]),
        Err(RegionsError::TooLarge { .. })
    ));
    let big = TaskMemory::new(1, &[r(1 << 40, 1 << 20)]).unwrap();
    assert_eq!(big.pending_pages(), 1 << 20);
}

#[test]
fn nearest_pending_looks_back_inside_the_same_range() {
    let mut mem =
        TaskMemory::new(3, &[PageRange::new(0x10000, 4), PageRange::new(0x20000, 8)]).unwrap();
    let mut plan = mem.on_pages(0x21000, 7);
    let op = plan.next_op().unwrap();
    plan.placed(&op, op.nr_pages);
    assert_eq!(mem.next_pending_near(0x25000), Some(0x20000));
    assert_eq!(mem.next_pending_near(0x30000), Some(0x20000));
    assert_eq!(mem.next_pending_near(0x0), Some(0x10000));
}

#[test]
fn complete_only_when_nothing_missing() {
    let mut mem = TaskMemory::new(3, &[PageRange::new(0x10000, 4)]).unwrap();
    assert!(!mem.is_complete());
    let mut plan = mem.on_pages(0x10000, 4);
    let op = plan.next_op().unwrap();
    assert_eq!(op.nr_pages, 4);
    assert_eq!(plan.placed(&op, 4), 4);
    assert!(plan.next_op().is_none());
    assert!(mem.is_complete());
    // The same pages again are not copied twice.
    assert!(mem.on_pages(0x10000, 4).next_op().is_none());
    assert_eq!(mem.on_fault(0x10000), FaultAction::Zero);
}

#[test]
fn in_flight_ranges_are_the_open_fault_requests() {
    let mut mem =
        TaskMemory::new(3, &[PageRange::new(0x10000, 4), PageRange::new(0x20000, 8)]).unwrap();
    for rt in [0x11000, 0x12000, 0x25000] {
        assert!(matches!(mem.on_fault(rt), FaultAction::Request { .. }));
    }
    assert_eq!(
        mem.in_flight_ranges(),
        vec![PageRange::new(0x11000, 2), PageRange::new(0x25000, 1)]
    );
    // An answer settles its pages; what is still missing includes the rest in flight.
    let mut plan = mem.on_pages(0x11000, 2);
    let op = plan.next_op().unwrap();
    plan.placed(&op, op.nr_pages);
    assert_eq!(mem.in_flight_ranges(), vec![PageRange::new(0x25000, 1)]);
    assert_eq!(
        mem.missing_ranges(),
        vec![
            PageRange::new(0x10000, 1),
            PageRange::new(0x13000, 1),
            PageRange::new(0x20000, 8)
        ]
    );
}
