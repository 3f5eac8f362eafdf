use proptest::prelude::*;

use super::*;

const P: u64 = PAGE_SIZE;

fn guard() -> ArrivalGuard {
    let mut g = ArrivalGuard::new();
    // pid 7: lazy [0x10000, +16 pages) and [0x40000, +4 pages).
    g.add_task(
        7,
        &[PageRange::new(0x10000, 16), PageRange::new(0x40000, 4)],
    );
    g
}

#[test]
fn unknown_pid_and_bad_ranges_are_refused() {
    let mut g = guard();
    assert_eq!(
        g.admit(8, 0x10000, 1, false),
        Err(Refusal::UnknownPid { pid: 8 })
    );
    for (vaddr, nr) in [(0x10001, 1), (0x10000, 0), (!(P - 1), 2)] {
        assert!(matches!(
            g.admit(7, vaddr, nr, false),
            Err(Refusal::BadRange { .. })
        ));
    }
    let msg = g.admit(8, 0, 1, true).unwrap_err().to_string();
    assert!(
        msg.contains("pid 8") && msg.contains("no task of this restore"),
        "{msg}"
    );
}

#[test]
fn pages_outside_lazy_ranges_are_refused() {
    let mut g = guard();
    // Straddles the end of the first range.
    assert_eq!(
        g.admit(7, 0x10000 + 15 * P, 2, false),
        Err(Refusal::NotLazy {
            pid: 7,
            start: 0x1f000,
            end: 0x21000,
            page: 0x20000
        })
    );
    // Between the ranges, even when requested.
    g.requested(7, 0x30000, 1);
    assert!(matches!(
        g.admit(7, 0x30000, 1, true),
        Err(Refusal::NotLazy { page: 0x30000, .. })
    ));
    // Nothing was recorded by the refusals: the pages can still be pushed.
    assert_eq!(g.admit(7, 0x1f000, 1, false), Ok(()));
}

#[test]
fn fault_answers_must_be_asked_for_once() {
    let mut g = guard();
    assert_eq!(
        g.admit(7, 0x10000, 1, true),
        Err(Refusal::NotRequested {
            pid: 7,
            start: 0x10000,
            end: 0x11000,
            page: 0x10000
        })
    );
    g.requested(7, 0x10000, 4);
    // Answered in two pieces (CRIU may answer short; the source splits at ranges).
    assert_eq!(g.admit(7, 0x10000, 2, true), Ok(()));
    assert_eq!(g.outstanding_pages(7), 2);
    assert_eq!(g.admit(7, 0x12000, 2, true), Ok(()));
    assert_eq!(g.outstanding_pages(7), 0);
    // A second answer to the same request.
    assert!(matches!(
        g.admit(7, 0x10000, 1, true),
        Err(Refusal::NotRequested { .. })
    ));
    // More than was asked for.
    g.requested(7, 0x14000, 1);
    assert!(matches!(
        g.admit(7, 0x14000, 2, true),
        Err(Refusal::NotRequested { page: 0x15000, .. })
    ));
    assert_eq!(
        g.outstanding_pages(7),
        1,
        "a refused answer uses up nothing"
    );
}

#[test]
fn two_requests_for_one_page_get_two_answers() {
    // A fork child's view asks again for a page its parent asked for.
    let mut g = guard();
    g.requested(7, 0x10000, 2);
    g.requested(7, 0x11000, 1);
    assert_eq!(g.admit(7, 0x10000, 2, true), Ok(()));
    assert_eq!(g.admit(7, 0x11000, 1, true), Ok(()));
    assert!(g.admit(7, 0x11000, 1, true).is_err());
}

#[test]
fn an_answer_may_span_requests() {
    let mut g = guard();
    g.requested(7, 0x11000, 1);
    g.requested(7, 0x10000, 4);
    assert_eq!(g.admit(7, 0x10000, 4, true), Ok(()));
    assert_eq!(g.outstanding_pages(7), 1);
}

#[test]
fn pushes_are_once_per_page_and_may_race_faults() {
    let mut g = guard();
    assert_eq!(g.admit(7, 0x10000, 4, false), Ok(()));
    assert!(matches!(
        g.admit(7, 0x13000, 2, false),
        Err(Refusal::AlreadyPushed { page: 0x13000, .. })
    ));
    // A fault raced the push: the answer to the request is still welcome.
    g.requested(7, 0x11000, 1);
    assert_eq!(g.admit(7, 0x11000, 1, true), Ok(()));
    // And the other order: answered first, pushed after (sent before the request).
    g.requested(7, 0x18000, 1);
    assert_eq!(g.admit(7, 0x18000, 1, true), Ok(()));
    assert_eq!(g.admit(7, 0x18000, 1, false), Ok(()));
}

/// Per-page model of the rule.
#[derive(Default)]
struct Model {
    lazy: std::collections::BTreeSet<u64>,
    pushed: std::collections::BTreeSet<u64>,
    requests: Vec<std::collections::BTreeSet<u64>>,
}

impl Model {
    fn admit(&mut self, start: u64, n: u64, urgent: bool) -> bool {
        let pages: Vec<u64> = (0..n).map(|i| start + i * P).collect();
        if !pages.iter().all(|p| self.lazy.contains(p)) {
            return false;
        }
        if urgent {
            let mut reqs = self.requests.clone();
            for p in &pages {
                match reqs.iter_mut().find(|r| r.contains(p)) {
                    Some(r) => {
                        r.remove(p);
                    }
                    None => return false,
                }
            }
            self.requests = reqs;
        } else {
            if pages.iter().any(|p| self.pushed.contains(p)) {
                return false;
            }
            self.pushed.extend(pages);
        }
        true
    }
}

proptest! {
    #[test]
    fn matches_a_per_page_model(
        lazy in proptest::collection::vec((0u64..64, 1u64..8), 1..5),
        ops in proptest::collection::vec((0u8..3, 0u64..72, 1u64..6), 1..60),
    ) {
        let mut g = ArrivalGuard::new();
        let mut m = Model::default();
        let ranges: Vec<PageRange> = lazy.iter().map(|&(s, n)| PageRange::new(s * P, n)).collect();
        g.add_task(1, &ranges);
        for r in &ranges {
            m.lazy.extend((0..r.nr_pages).map(|i| r.start + i * P));
        }
        for (op, page, n) in ops {
            let start = page * P;
            match op {
                0 => {
                    g.requested(1, start, n);
                    m.requests.push((0..n).map(|i| start + i * P).collect());
                }
                _ => {
                    let urgent = op == 1;
                    let got = g.admit(1, start, n, urgent).is_ok();
                    prop_assert_eq!(got, m.admit(start, n, urgent), "op {} at {:#x} +{}", op, start, n);
                }
            }
        }
    }
}

#[test]
fn a_new_link_voids_what_the_old_one_owed() {
    let mut g = guard();
    g.requested(7, 0x10000, 2);
    assert_eq!(g.admit(7, 0x12000, 4, false), Ok(()));
    g.reset_link();
    // The old link's answer is void; the new link may push what the old one pushed.
    assert!(matches!(
        g.admit(7, 0x10000, 2, true),
        Err(Refusal::NotRequested { .. })
    ));
    assert_eq!(g.admit(7, 0x12000, 4, false), Ok(()));
    // A request registered again after the reset is answered once, on the new link.
    g.requested(7, 0x10000, 2);
    assert_eq!(g.admit(7, 0x10000, 2, true), Ok(()));
    assert!(g.admit(7, 0x10000, 2, true).is_err());
}
