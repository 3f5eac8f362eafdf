//! The uffd keeper's decisions, sans-IO: what it holds, when it kills, what an adopter gets.
//!
//! The keeper is *attached* while a `pageserv dst` holds its control connection, and takes
//! every uffd that dst hands it (restored tasks, then fork children as they appear). If that
//! connection closes without a release, the keeper is *orphaned*: it keeps every uffd (faulting
//! tasks simply wait: nothing reads their faults, nothing zero-fills) until the recover
//! deadline, and listens for an adopter: a restarted `pageserv dst` running as the same user.
//! An adopter gets every held uffd whose process is not known to have exited, and its
//! connection becomes the keeper's control connection (attached again). Past the deadline the
//! keeper kills every held task and its descendants before its copies of the uffds close
//! (expired). A recover timeout of zero kills at once, as before adoption existed.
//!
//! Time is passed in; the shell (`uffd_keeper.rs`) does the sockets, pidfds and signals.

use std::time::{Duration, Instant};

/// What one held uffd belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Holding {
    /// A restored task: its image pid, host pid and start time (/proc/PID/stat field 22, clock
    /// ticks since boot), which together name it even if the pid is reused later.
    Task {
        image_pid: i32,
        host_pid: i32,
        start_time: u64,
    },
    /// A fork child of a restored task (UFFD_EVENT_FORK): its own pid is not known when its uffd
    /// appears, only the host pid of the restored task it descends from.
    Child { root_host_pid: i32 },
}

impl Holding {
    /// The host pid whose tree this uffd's process belongs to.
    pub fn root_host_pid(&self) -> i32 {
        match *self {
            Holding::Task { host_pid, .. } => host_pid,
            Holding::Child { root_host_pid } => root_host_pid,
        }
    }
}

/// Where the keeper stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// A dst holds the control connection.
    Attached,
    /// dst is gone; an adopter may come until `deadline`.
    Orphaned { deadline: Instant },
    /// Every lazy page was in place: the keeper lets go (exit, kill nothing).
    Released,
    /// The recover deadline passed (or there was none): the held tasks are killed.
    Expired,
}

/// Who asks to adopt (from SO_PEERCRED).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Peer {
    pub pid: i32,
    pub uid: u32,
}

/// Why an adoption is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    #[error(
        "process {pid} runs as uid {uid}, not as the keeper's uid {ours}: run the restarted \
         pageserv dst as the same user"
    )]
    Foreign { pid: i32, uid: u32, ours: u32 },
    #[error("a pageserv dst still holds these tasks (the keeper is not orphaned)")]
    NotOrphaned,
    #[error("the recover timeout passed: the restored tasks were killed")]
    Expired,
}

/// What the shell must do after an event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Nothing.
    None,
    /// dst is gone: listen for an adopter; wake up at the deadline at the latest.
    Listen { deadline: Instant },
    /// Kill every held task and its descendants, wait for them to die, then exit.
    KillAll,
    /// Let go: exit without killing.
    Exit,
}

/// The keeper's state: its phase and what it holds, in the order handed over.
#[derive(Debug)]
pub struct Policy {
    phase: Phase,
    recover: Duration,
    our_uid: u32,
    held: Vec<(Holding, bool)>,
}

impl Policy {
    pub fn new(recover: Duration, our_uid: u32) -> Self {
        Policy {
            phase: Phase::Attached,
            recover,
            our_uid,
            held: Vec::new(),
        }
    }

    pub fn phase(&self) -> Phase {
        self.phase
    }

    /// Everything held, with whether its process is known to have exited.
    pub fn held(&self) -> impl Iterator<Item = (usize, &Holding)> {
        self.held
            .iter()
            .enumerate()
            .filter(|(_, (_, gone))| !gone)
            .map(|(i, (h, _))| (i, h))
    }

    /// dst hands over one more uffd; returns its index. Refused (None) unless attached: an
    /// orphaned keeper has no dst to take from.
    pub fn hold(&mut self, h: Holding) -> Option<usize> {
        if self.phase != Phase::Attached {
            return None;
        }
        self.held.push((h, false));
        Some(self.held.len() - 1)
    }

    /// The process behind entry `i` exited (its pidfd turned readable): its uffd needs no keeping.
    pub fn exited(&mut self, i: usize) {
        if let Some(e) = self.held.get_mut(i) {
            e.1 = true;
        }
    }

    /// The memory is whole: let go.
    pub fn release(&mut self) -> Action {
        self.phase = Phase::Released;
        Action::Exit
    }

    /// The control connection closed without a release, at `now`.
    pub fn ctl_closed(&mut self, now: Instant) -> Action {
        if matches!(self.phase, Phase::Released | Phase::Expired) {
            return Action::None;
        }
        if self.held().next().is_none() {
            self.phase = Phase::Released;
            return Action::Exit;
        }
        if self.recover.is_zero() {
            self.phase = Phase::Expired;
            return Action::KillAll;
        }
        let deadline = now + self.recover;
        self.phase = Phase::Orphaned { deadline };
        Action::Listen { deadline }
    }

    /// Time passes.
    pub fn tick(&mut self, now: Instant) -> Action {
        match self.phase {
            Phase::Orphaned { deadline } if now >= deadline => {
                self.phase = Phase::Expired;
                Action::KillAll
            }
            _ => Action::None,
        }
    }

    /// A restarted dst asks to adopt, at `now`: on success, the indices of what it gets (every
    /// held uffd whose process is not known to be gone), and the keeper is attached to it.
    pub fn adopt(&mut self, peer: Peer, now: Instant) -> Result<Vec<usize>, Refusal> {
        if peer.uid != self.our_uid {
            return Err(Refusal::Foreign {
                pid: peer.pid,
                uid: peer.uid,
                ours: self.our_uid,
            });
        }
        match self.phase {
            Phase::Orphaned { deadline } if now < deadline => {}
            Phase::Orphaned { .. } | Phase::Expired => return Err(Refusal::Expired),
            Phase::Attached | Phase::Released => return Err(Refusal::NotOrphaned),
        }
        self.phase = Phase::Attached;
        Ok(self.held().map(|(i, _)| i).collect())
    }
}

/// One record on the keeper's sockets: 24 bytes, native byte order. `kind` 0 release, 1 task,
/// 2 fork child, 3 end of a handover (`a` = entries sent). A task or child record carries its
/// uffd as SCM_RIGHTS.
pub const RECORD_LEN: usize = 24;

/// A decoded record.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Record {
    Release,
    Hold(Holding),
    End { count: u32 },
}

impl Record {
    pub fn encode(&self) -> [u8; RECORD_LEN] {
        let (kind, a, b, t): (u32, i32, i32, u64) = match *self {
            Record::Release => (0, 0, 0, 0),
            Record::Hold(Holding::Task {
                image_pid,
                host_pid,
                start_time,
            }) => (1, image_pid, host_pid, start_time),
            Record::Hold(Holding::Child { root_host_pid }) => (2, 0, root_host_pid, 0),
            Record::End { count } => (3, count as i32, 0, 0),
        };
        let mut out = [0u8; RECORD_LEN];
        out[0..4].copy_from_slice(&kind.to_ne_bytes());
        out[4..8].copy_from_slice(&a.to_ne_bytes());
        out[8..12].copy_from_slice(&b.to_ne_bytes());
        out[16..24].copy_from_slice(&t.to_ne_bytes());
        out
    }

    pub fn decode(b: &[u8; RECORD_LEN]) -> Result<Record, String> {
        let word = |i: usize| [b[i], b[i + 1], b[i + 2], b[i + 3]];
        let kind = u32::from_ne_bytes(word(0));
        let a = i32::from_ne_bytes(word(4));
        let host = i32::from_ne_bytes(word(8));
        let mut t = [0u8; 8];
        t.copy_from_slice(&b[16..24]);
        let start_time = u64::from_ne_bytes(t);
        match kind {
            0 => Ok(Record::Release),
            1 if a > 0 && host > 0 => Ok(Record::Hold(Holding::Task {
                image_pid: a,
                host_pid: host,
                start_time,
            })),
            2 if host > 0 => Ok(Record::Hold(Holding::Child {
                root_host_pid: host,
            })),
            3 if a >= 0 => Ok(Record::End { count: a as u32 }),
            _ => Err(format!(
                "bad keeper record: kind {kind}, pid {a}, host pid {host}"
            )),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn task(p: i32) -> Holding {
        Holding::Task {
            image_pid: p,
            host_pid: 1000 + p,
            start_time: 77,
        }
    }

    const ROOT: Peer = Peer { pid: 5, uid: 0 };

    #[test]
    fn orphaned_keeper_holds_until_the_deadline_then_kills() {
        let t0 = Instant::now();
        let mut p = Policy::new(Duration::from_secs(10), 0);
        p.hold(task(1));
        let deadline = t0 + Duration::from_secs(10);
        assert_eq!(p.ctl_closed(t0), Action::Listen { deadline });
        assert_eq!(p.tick(t0 + Duration::from_secs(9)), Action::None);
        assert_eq!(p.tick(deadline), Action::KillAll);
        assert_eq!(p.phase(), Phase::Expired);
        assert_eq!(p.adopt(ROOT, deadline), Err(Refusal::Expired));
    }

    #[test]
    fn adopter_gets_every_live_uffd_including_fork_children() {
        let t0 = Instant::now();
        let mut p = Policy::new(Duration::from_secs(10), 0);
        p.hold(task(1));
        p.hold(Holding::Child {
            root_host_pid: 1001,
        });
        p.hold(task(2));
        p.exited(2);
        p.ctl_closed(t0);
        assert_eq!(p.adopt(ROOT, t0 + Duration::from_secs(1)), Ok(vec![0, 1]));
        assert_eq!(p.phase(), Phase::Attached);
        // The adopter hands over a new fork child; if it dies too, the wait starts again.
        assert_eq!(
            p.hold(Holding::Child {
                root_host_pid: 1001
            }),
            Some(3)
        );
        let t1 = t0 + Duration::from_secs(5);
        assert_eq!(
            p.ctl_closed(t1),
            Action::Listen {
                deadline: t1 + Duration::from_secs(10)
            }
        );
    }

    #[test]
    fn refuses_other_users_and_a_second_adopter() {
        let t0 = Instant::now();
        let mut p = Policy::new(Duration::from_secs(10), 0);
        p.hold(task(1));
        assert_eq!(p.adopt(ROOT, t0), Err(Refusal::NotOrphaned));
        p.ctl_closed(t0);
        let stranger = Peer { pid: 9, uid: 1000 };
        assert!(matches!(
            p.adopt(stranger, t0),
            Err(Refusal::Foreign { uid: 1000, .. })
        ));
        assert!(p.adopt(ROOT, t0).is_ok());
        assert_eq!(p.adopt(ROOT, t0), Err(Refusal::NotOrphaned));
    }

    #[test]
    fn zero_timeout_kills_at_once_and_nothing_held_just_exits() {
        let mut p = Policy::new(Duration::ZERO, 0);
        p.hold(task(1));
        assert_eq!(p.ctl_closed(Instant::now()), Action::KillAll);
        let mut q = Policy::new(Duration::from_secs(5), 0);
        assert_eq!(q.ctl_closed(Instant::now()), Action::Exit);
        let mut r = Policy::new(Duration::from_secs(5), 0);
        r.hold(task(1));
        assert_eq!(r.release(), Action::Exit);
        assert_eq!(r.ctl_closed(Instant::now()), Action::None);
        assert_eq!(r.hold(task(2)), None);
    }

    #[derive(Debug, Clone)]
    enum Ev {
        Hold(bool),
        Exited(usize),
        Closed,
        Adopt(bool),
        Tick(u64),
        Release,
    }

    fn ev() -> impl Strategy<Value = Ev> {
        prop_oneof![
            any::<bool>().prop_map(Ev::Hold),
            (0usize..8).prop_map(Ev::Exited),
            Just(Ev::Closed),
            any::<bool>().prop_map(Ev::Adopt),
            (0u64..20).prop_map(Ev::Tick),
            Just(Ev::Release),
        ]
    }

    proptest! {
        /// Whatever happens: a kill comes only from an orphaned keeper past its deadline (or a
        /// zero timeout), never after a release, at most once; an adopter is always root and
        /// gets only live entries; nothing is held while orphaned.
        #[test]
        fn kills_only_past_the_deadline(evs in proptest::collection::vec(ev(), 0..40),
                                        secs in 0u64..6) {
            let t0 = Instant::now();
            let mut now = t0;
            let mut p = Policy::new(Duration::from_secs(secs), 0);
            let mut killed = false;
            for e in evs {
                let before = p.phase();
                let action = match e {
                    Ev::Hold(child) => {
                        let h = if child { Holding::Child { root_host_pid: 3 } } else { task(1) };
                        let r = p.hold(h);
                        prop_assert_eq!(r.is_some(), before == Phase::Attached);
                        Action::None
                    }
                    Ev::Exited(i) => { p.exited(i); Action::None }
                    Ev::Closed => p.ctl_closed(now),
                    Ev::Adopt(root) => {
                        let peer = Peer { pid: 2, uid: if root { 0 } else { 7 } };
                        if let Ok(got) = p.adopt(peer, now) {
                            prop_assert!(root);
                            let was_open = matches!(before, Phase::Orphaned { deadline } if now < deadline);
                            prop_assert!(was_open);
                            let live: Vec<usize> = p.held().map(|(i, _)| i).collect();
                            prop_assert_eq!(got, live);
                        }
                        Action::None
                    }
                    Ev::Tick(s) => { now += Duration::from_secs(s); p.tick(now) }
                    Ev::Release => p.release(),
                };
                if action == Action::KillAll {
                    prop_assert!(!killed);
                    killed = true;
                    let zero = secs == 0 && before == Phase::Attached;
                    let late = matches!(before, Phase::Orphaned { deadline } if now >= deadline);
                    let ok = zero || late;
                    prop_assert!(ok);
                }
                if killed {
                    prop_assert!(matches!(p.phase(), Phase::Expired | Phase::Released));
                }
            }
        }

        #[test]
        fn records_round_trip(kind in 0u8..4, a in 1i32..i32::MAX, h in 1i32..i32::MAX, t: u64) {
            let r = match kind {
                0 => Record::Release,
                1 => Record::Hold(Holding::Task { image_pid: a, host_pid: h, start_time: t }),
                2 => Record::Hold(Holding::Child { root_host_pid: h }),
                _ => Record::End { count: a as u32 },
            };
            prop_assert_eq!(Record::decode(&r.encode()), Ok(r));
        }
    }
}
