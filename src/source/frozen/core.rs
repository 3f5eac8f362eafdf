//! The source's serving logic after the freeze (sans-IO): what to read next, from where, and what
//! to do with what was read.
//!
//! Every lazy page is read either straight from the frozen tasks' memory ([`Origin::Memory`]) or,
//! for a task that cannot be read (it died, is not verifiably frozen, or has no host pid), from
//! the dump's page server ([`Origin::Criu`]). Reads run on two lanes: fault reads
//! ([`Lane::Fault`]) are emitted the moment a request arrives and never queue behind bulk reads
//! (the driver runs each lane on its own thread; only CRIU's one in-order connection is shared,
//! and only by tasks that must come from it, with at most `max_bulk` bulk GETs ahead of a fault).
//! Bulk reads ([`Lane::Bulk`]) follow the [`PushPlan`] and each needs a push slot, so the source
//! never reads further ahead than the push can take.
//!
//! Link generations: after a reconnect the plan becomes dst's missing list and everything read
//! for an earlier generation is dropped, never delivered. Finishing: no new reads; once every
//! read in flight has ended (so no read of frozen memory can overlap CRIU ending the dump), the
//! core asks once to close CRIU's session.
//!
//! Time is passed in (a fault's arrival instant travels with it); nothing here does IO.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::time::Instant;

use bytes::Bytes;

use crate::pages::{PAGE_SIZE, PageRange};
use crate::source::push_plan::{PushPlan, RequestRejected};

/// Which queue a read waits in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Lane {
    /// A fault's pages: its own queue and thread.
    Fault,
    /// The background push.
    Bulk,
}

/// Where a read's bytes come from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Origin {
    /// The frozen task's memory (process_vm_readv).
    Memory,
    /// A GET on the dump's page-server connection, answered in request order.
    Criu,
}

/// One read to perform. `id` names it in [`Core::read_done`] / [`Core::read_failed`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Read {
    pub id: u64,
    pub lane: Lane,
    pub origin: Origin,
    pub pid: u32,
    pub vaddr: u64,
    pub nr_pages: u64,
}

/// A fault request from dst.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FaultRequest {
    pub pid: u32,
    pub vaddr: u64,
    pub nr_pages: u32,
    /// When it reached the source.
    pub at: Instant,
}

/// What the driver must do next.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Perform this read: on the lane's thread from memory, or as a GET to CRIU (in emission
    /// order).
    Read(Read),
    /// Send these pages to dst on the fault connection of link `generation`.
    Answer {
        generation: u64,
        pid: u32,
        vaddr: u64,
        nr_pages: u64,
        data: Bytes,
        at: Instant,
    },
    /// Send these pages on the push stream of link `generation`, using bulk read `id`'s slot.
    Push {
        generation: u64,
        id: u64,
        pid: u32,
        vaddr: u64,
        nr_pages: u64,
        data: Bytes,
    },
    /// Tell dst that this request names no lazy page of the dump.
    Refuse {
        generation: u64,
        request: FaultRequest,
        why: RequestRejected,
    },
    /// Bulk read `id` will never be pushed (it was for a dead link): free its slot.
    Release { id: u64 },
    /// Every read has ended after [`Core::finish`]: end CRIU's session as it expects.
    CloseCriu,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum CoreError {
    #[error("read {0} was never asked for, or already ended")]
    UnknownRead(u64),
    #[error("read {id} came back with {got} bytes for {asked} pages")]
    BadLength { id: u64, got: usize, asked: u64 },
    #[error("a GET to CRIU (read {0}) cannot fail over to anything")]
    CriuReadFailed(u64),
}

#[derive(Debug, Clone, Copy)]
pub struct CoreConfig {
    /// Pages per bulk read (at most one lazy range).
    pub batch_pages: u64,
    /// Bulk reads in flight at once (from memory or CRIU), each holding a push slot.
    pub max_bulk: usize,
}

impl Default for CoreConfig {
    fn default() -> Self {
        Self {
            batch_pages: 1024,
            max_bulk: 2,
        }
    }
}

#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct CoreStats {
    /// Pages read from the frozen tasks' memory, and from CRIU.
    pub memory_pages: u64,
    pub criu_pages: u64,
    /// Memory reads that failed over to CRIU (task dead, not frozen, unreadable mapping).
    pub failovers: u64,
    pub fault_pages: u64,
    pub pushed_pages: u64,
    pub refused: u64,
    /// Reads whose result was dropped because the link they were for had died.
    pub dropped_stale: u64,
}

#[derive(Debug, Clone, Copy)]
struct InFlight {
    read: Read,
    generation: u64,
    at: Option<Instant>,
}

/// The serving state machine. See the module docs.
#[derive(Debug)]
pub struct Core {
    plan: PushPlan,
    cfg: CoreConfig,
    /// Image pids whose memory may be read; every other pid comes from CRIU.
    readable: BTreeSet<u32>,
    generation: u64,
    next_id: u64,
    in_flight: BTreeMap<u64, InFlight>,
    bulk_in_flight: usize,
    /// Push slots the driver holds and no bulk read uses yet.
    free_slots: usize,
    pushing: bool,
    finishing: bool,
    close_emitted: bool,
    out: VecDeque<Action>,
    stats: CoreStats,
}

impl Core {
    pub fn new(plan: PushPlan, cfg: CoreConfig, readable: BTreeSet<u32>) -> Self {
        Self {
            plan,
            cfg,
            readable,
            generation: 0,
            next_id: 0,
            in_flight: BTreeMap::new(),
            bulk_in_flight: 0,
            free_slots: 0,
            pushing: false,
            finishing: false,
            close_emitted: false,
            out: VecDeque::new(),
            stats: CoreStats::default(),
        }
    }

    pub fn stats(&self) -> CoreStats {
        self.stats
    }

    pub fn generation(&self) -> u64 {
        self.generation
    }

    pub fn remaining_pages(&self) -> u64 {
        self.plan.remaining_pages()
    }

    /// Whether `pid`'s pages are read from memory.
    pub fn is_readable(&self, pid: u32) -> bool {
        self.readable.contains(&pid)
    }

    /// Reads started and not yet ended.
    pub fn in_flight(&self) -> usize {
        self.in_flight.len()
    }

    /// The next thing to do, in order.
    pub fn poll(&mut self) -> Option<Action> {
        self.out.pop_front()
    }

    /// Whether the driver should obtain one more push slot (then call [`Core::slot`]).
    pub fn wants_slot(&self) -> bool {
        self.pushing
            && !self.finishing
            && self.free_slots == 0
            && self.bulk_in_flight < self.cfg.max_bulk
            && self.plan.remaining_pages() > 0
    }

    /// The driver obtained a push slot.
    pub fn slot(&mut self) {
        self.free_slots += 1;
        self.fill_bulk();
    }

    /// The restore finished at dst: start the background push.
    pub fn start_push(&mut self) {
        self.pushing = true;
        self.fill_bulk();
    }

    /// A fault request from dst: its reads are emitted at once, ahead of any bulk read.
    pub fn fault(&mut self, req: FaultRequest) {
        if self.finishing {
            return;
        }
        match self
            .plan
            .split_request(req.pid, req.vaddr, u64::from(req.nr_pages))
        {
            Ok(pieces) => {
                self.plan
                    .note_fault(req.pid, req.vaddr, u64::from(req.nr_pages));
                for (vaddr, n) in pieces {
                    self.plan.mark_sent(req.pid, vaddr, n);
                    self.start(Lane::Fault, req.pid, vaddr, n, Some(req.at));
                }
            }
            Err(why) => {
                self.stats.refused += 1;
                self.out.push_back(Action::Refuse {
                    generation: self.generation,
                    request: req,
                    why,
                });
            }
        }
        self.fill_bulk();
    }

    /// A new link (`generation`): push exactly `missing` from now on; everything read for an
    /// earlier generation is dropped. Refused (nothing changes) if `missing` names pages that
    /// are not lazy pages of the dump.
    pub fn replan(
        &mut self,
        generation: u64,
        missing: Vec<(u32, Vec<PageRange>)>,
    ) -> Result<u64, RequestRejected> {
        let left = self.plan.replan(missing)?;
        self.generation = generation;
        self.fill_bulk();
        Ok(left)
    }

    /// dst has every page: read nothing more, and close CRIU's session once every read ended.
    pub fn finish(&mut self) {
        self.finishing = true;
        self.maybe_close();
    }

    /// Read `id` returned `data` (whole pages from its start; CRIU may return fewer than asked).
    pub fn read_done(&mut self, id: u64, data: Bytes) -> Result<(), CoreError> {
        let f = self
            .in_flight
            .remove(&id)
            .ok_or(CoreError::UnknownRead(id))?;
        let r = f.read;
        let got = data.len() as u64 / PAGE_SIZE;
        if !(data.len() as u64).is_multiple_of(PAGE_SIZE) || got == 0 || got > r.nr_pages {
            return Err(CoreError::BadLength {
                id,
                got: data.len(),
                asked: r.nr_pages,
            });
        }
        if r.lane == Lane::Bulk {
            self.bulk_in_flight -= 1;
        }
        match r.origin {
            Origin::Memory => self.stats.memory_pages += got,
            Origin::Criu => self.stats.criu_pages += got,
        }
        if f.generation != self.generation || self.finishing {
            self.stats.dropped_stale += 1;
            if r.lane == Lane::Bulk {
                self.out.push_back(Action::Release { id });
            }
        } else {
            match r.lane {
                Lane::Fault => {
                    if got < r.nr_pages {
                        // The rest of a fault request: read it on the same lane, at once.
                        self.start(
                            Lane::Fault,
                            r.pid,
                            r.vaddr + got * PAGE_SIZE,
                            r.nr_pages - got,
                            f.at,
                        );
                    }
                    self.stats.fault_pages += got;
                    self.out.push_back(Action::Answer {
                        generation: self.generation,
                        pid: r.pid,
                        vaddr: r.vaddr,
                        nr_pages: got,
                        data,
                        at: f.at.unwrap_or_else(Instant::now),
                    });
                }
                Lane::Bulk => {
                    if got < r.nr_pages {
                        self.plan
                            .mark_unsent(r.pid, r.vaddr + got * PAGE_SIZE, r.nr_pages - got);
                    }
                    self.stats.pushed_pages += got;
                    self.out.push_back(Action::Push {
                        generation: self.generation,
                        id,
                        pid: r.pid,
                        vaddr: r.vaddr,
                        nr_pages: got,
                        data,
                    });
                }
            }
        }
        self.maybe_close();
        self.fill_bulk();
        Ok(())
    }

    /// A memory read could not be trusted or done (the task died, left its ptrace stop, or the
    /// mapping is unreadable): the task is served from CRIU from now on, starting with this read.
    pub fn read_failed(&mut self, id: u64) -> Result<(), CoreError> {
        let f = self
            .in_flight
            .get_mut(&id)
            .ok_or(CoreError::UnknownRead(id))?;
        if f.read.origin == Origin::Criu {
            return Err(CoreError::CriuReadFailed(id));
        }
        self.stats.failovers += 1;
        self.readable.remove(&f.read.pid);
        if f.generation != self.generation || self.finishing {
            // Nobody needs it any more.
            let r = f.read;
            self.in_flight.remove(&id);
            self.stats.dropped_stale += 1;
            if r.lane == Lane::Bulk {
                self.bulk_in_flight -= 1;
                self.out.push_back(Action::Release { id });
            }
            self.maybe_close();
            self.fill_bulk();
            return Ok(());
        }
        f.read.origin = Origin::Criu;
        let read = f.read;
        self.out.push_back(Action::Read(read));
        Ok(())
    }

    fn start(&mut self, lane: Lane, pid: u32, vaddr: u64, nr_pages: u64, at: Option<Instant>) {
        let origin = if self.readable.contains(&pid) {
            Origin::Memory
        } else {
            Origin::Criu
        };
        let read = Read {
            id: self.next_id,
            lane,
            origin,
            pid,
            vaddr,
            nr_pages,
        };
        self.next_id += 1;
        self.in_flight.insert(
            read.id,
            InFlight {
                read,
                generation: self.generation,
                at,
            },
        );
        if lane == Lane::Bulk {
            self.bulk_in_flight += 1;
        }
        self.out.push_back(Action::Read(read));
    }

    fn fill_bulk(&mut self) {
        while self.pushing
            && !self.finishing
            && self.free_slots > 0
            && self.bulk_in_flight < self.cfg.max_bulk
        {
            let Some(b) = self.plan.next_batch(self.cfg.batch_pages) else {
                return;
            };
            self.free_slots -= 1;
            self.start(Lane::Bulk, b.pid, b.vaddr, b.nr_pages, None);
        }
    }

    fn maybe_close(&mut self) {
        if self.finishing && !self.close_emitted && self.in_flight.is_empty() {
            self.close_emitted = true;
            self.out.push_back(Action::CloseCriu);
        }
    }
}

#[cfg(test)]
#[path = "core_tests.rs"]
mod tests;
