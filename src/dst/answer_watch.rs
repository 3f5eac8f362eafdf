//! Fault requests a source never answers (sans-IO; time passed in).
//!
//! A certified source can accept dst's fault requests and never answer them: the restored
//! threads waiting on those pages would wait forever on a link that looks alive (QUIC's idle
//! timeout only catches a silent link, and such a source may keep it busy). The rule:
//!
//! - a request is answered once its faulting page (its first) arrives, on any stream (a fault
//!   answer, a pushed page, a confirmed pre-copied page): the waiting thread then runs;
//! - a request unanswered for the fault-answer timeout on a live link ([`DstLimits::fault_answer`],
//!   `pageserv dst --fault-answer-secs`, default 60 s; an honest source answers in milliseconds)
//!   makes dst treat that link as lost: it closes it, and the recovery path runs as for a dead
//!   link (the source may resume within `--recover-timeout`; every open request is asked again
//!   on the new link, with a fresh clock);
//! - [`MAX_SILENT_LINKS`] links in a row lost this way, with no request answered in between,
//!   fail the migration: the failure rule applies (incomplete restored tasks are killed before
//!   their uffds close; never a zero page), and a source that keeps resuming without answering
//!   cannot keep the restored tasks waiting forever.
//!
//! [`DstLimits::fault_answer`]: crate::limits::DstLimits::fault_answer
//! [`MAX_SILENT_LINKS`]: crate::limits::MAX_SILENT_LINKS

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use crate::pages::PAGE_SIZE;

/// What [`AnswerWatch::check`] says about the live link.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// Every open request is younger than the timeout.
    Fine,
    /// The request for page `vaddr` of image pid `pid` has waited `waited`: drop the link (its
    /// `silent`-th in a row) and let the recovery path run.
    DropLink {
        pid: u32,
        vaddr: u64,
        waited: Duration,
        silent: u32,
    },
    /// `silent` links in a row were dropped with nothing answered: fail the migration.
    Fail { silent: u32, waited: Duration },
}

/// The open fault requests of the live link and when each was sent on it.
#[derive(Debug)]
pub struct AnswerWatch {
    timeout: Duration,
    max_silent: u32,
    /// (image pid, faulting page) -> when it was sent on the live link.
    open: BTreeMap<(u32, u64), Instant>,
    /// Links dropped in a row for an unanswered request, with no request answered since.
    silent: u32,
}

impl AnswerWatch {
    /// `timeout`: how long a request may wait on a live link; `max_silent`: links dropped in a
    /// row before the migration fails (at least 1).
    pub fn new(timeout: Duration, max_silent: u32) -> Self {
        AnswerWatch {
            timeout,
            max_silent: max_silent.max(1),
            open: BTreeMap::new(),
            silent: 0,
        }
    }

    /// A request for `nr_pages` at `vaddr` (the faulting page first) of image pid `pid` was
    /// sent on the live link at `now`. A page asked again keeps its first time.
    pub fn sent(&mut self, pid: u32, vaddr: u64, now: Instant) {
        self.open.entry((pid, vaddr)).or_insert(now);
    }

    /// Pages `[vaddr, +nr_pages)` of image pid `pid` arrived: the requests they answer are done.
    pub fn arrived(&mut self, pid: u32, vaddr: u64, nr_pages: u64) {
        let end = vaddr.saturating_add(nr_pages.saturating_mul(PAGE_SIZE));
        let done: Vec<(u32, u64)> = self
            .open
            .range((pid, vaddr)..(pid, end))
            .map(|(k, _)| *k)
            .collect();
        if !done.is_empty() {
            self.silent = 0;
        }
        for k in done {
            self.open.remove(&k);
        }
    }

    /// The link is down: its requests are asked again on the next one (each a fresh [`sent`]).
    ///
    /// [`sent`]: AnswerWatch::sent
    pub fn link_down(&mut self) {
        self.open.clear();
    }

    /// How long a request may wait on a live link.
    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    /// Requests open on the live link.
    pub fn open(&self) -> usize {
        self.open.len()
    }

    /// The rule at `now` (see the module docs). A verdict other than [`Verdict::Fine`] forgets
    /// the open requests (the link they were sent on is to be dropped).
    pub fn check(&mut self, now: Instant) -> Verdict {
        let Some((&(pid, vaddr), &at)) = self.open.iter().min_by_key(|(_, t)| **t) else {
            return Verdict::Fine;
        };
        let waited = now.saturating_duration_since(at);
        if waited < self.timeout {
            return Verdict::Fine;
        }
        self.open.clear();
        self.silent += 1;
        if self.silent >= self.max_silent {
            return Verdict::Fail {
                silent: self.silent,
                waited,
            };
        }
        Verdict::DropLink {
            pid,
            vaddr,
            waited,
            silent: self.silent,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const T: Duration = Duration::from_secs(60);

    #[test]
    fn an_answered_request_never_trips_the_rule() {
        let t0 = Instant::now();
        let mut w = AnswerWatch::new(T, 3);
        w.sent(1, 0x1000, t0);
        w.sent(1, 0x5000, t0);
        // One answer covering both faulting pages (read-ahead included).
        w.arrived(1, 0x1000, 5);
        assert_eq!(w.open(), 0);
        assert_eq!(w.check(t0 + T * 10), Verdict::Fine);
    }

    #[test]
    fn another_pid_or_a_later_page_does_not_answer() {
        let t0 = Instant::now();
        let mut w = AnswerWatch::new(T, 3);
        w.sent(1, 0x2000, t0);
        w.arrived(2, 0x2000, 1);
        w.arrived(1, 0x3000, 4);
        w.arrived(1, 0x1000, 1);
        assert_eq!(w.open(), 1);
        assert_eq!(w.check(t0 + T - Duration::from_millis(1)), Verdict::Fine);
        assert!(matches!(
            w.check(t0 + T),
            Verdict::DropLink {
                pid: 1,
                vaddr: 0x2000,
                silent: 1,
                ..
            }
        ));
    }

    #[test]
    fn silent_links_in_a_row_fail_and_an_answer_forgives() {
        let t0 = Instant::now();
        let mut w = AnswerWatch::new(T, 3);
        let mut now = t0;
        for silent in 1..=2 {
            w.link_down();
            w.sent(1, 0x1000, now);
            now += T;
            assert!(matches!(w.check(now), Verdict::DropLink { silent: s, .. } if s == silent));
        }
        // An answer on the third link resets the count.
        w.sent(1, 0x1000, now);
        w.arrived(1, 0x1000, 1);
        for silent in 1..=2 {
            w.sent(1, 0x9000, now);
            now += T;
            assert!(matches!(w.check(now), Verdict::DropLink { silent: s, .. } if s == silent));
        }
        w.sent(1, 0x9000, now);
        now += T;
        assert!(matches!(w.check(now), Verdict::Fail { silent: 3, .. }));
    }

    #[derive(Debug, Clone)]
    enum Op {
        Send(u32, u64),
        Arrive(u32, u64, u64),
        Down,
        Wait(u64),
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            3 => (1u32..3, 0u64..16).prop_map(|(p, i)| Op::Send(p, i)),
            3 => (1u32..3, 0u64..16, 1u64..4).prop_map(|(p, i, n)| Op::Arrive(p, i, n)),
            1 => Just(Op::Down),
            2 => (0u64..90).prop_map(Op::Wait),
        ]
    }

    proptest! {
        /// Against a model: the link is dropped exactly when some request sent on it (and not
        /// answered since, nor forgotten by a link change) is at least the timeout old; the
        /// migration fails exactly at the max-th such drop in a row.
        #[test]
        fn drops_exactly_when_a_request_outlives_the_timeout(ops in prop::collection::vec(op(), 0..80)) {
            let t0 = Instant::now();
            let mut now = t0;
            let mut w = AnswerWatch::new(T, 3);
            let mut model: BTreeMap<(u32, u64), Instant> = BTreeMap::new();
            let mut silent = 0u32;
            for o in ops {
                match o {
                    Op::Send(p, i) => {
                        w.sent(p, i * PAGE_SIZE, now);
                        model.entry((p, i * PAGE_SIZE)).or_insert(now);
                    }
                    Op::Arrive(p, i, n) => {
                        w.arrived(p, i * PAGE_SIZE, n);
                        let before = model.len();
                        model.retain(|(mp, mv), _| !(*mp == p && *mv >= i * PAGE_SIZE && *mv < (i + n) * PAGE_SIZE));
                        if model.len() != before {
                            silent = 0;
                        }
                    }
                    Op::Down => {
                        w.link_down();
                        model.clear();
                    }
                    Op::Wait(s) => now += Duration::from_secs(s),
                }
                let overdue = model.values().any(|t| now.duration_since(*t) >= T);
                let v = w.check(now);
                if overdue {
                    model.clear();
                    silent += 1;
                    if silent >= 3 {
                        prop_assert!(matches!(v, Verdict::Fail { .. }), "{:?}", v);
                    } else {
                        prop_assert!(matches!(v, Verdict::DropLink { .. }), "{:?}", v);
                    }
                } else {
                    prop_assert_eq!(v, Verdict::Fine);
                }
                prop_assert_eq!(w.open(), model.len());
            }
        }
    }
}
