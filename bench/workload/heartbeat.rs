//! Heartbeat thread: one `hb <tag> <seq> <unix_ns> <writes_total> reads=<reads_total>` line per
//! period. The bench takes downtime as the largest gap between heartbeats, and the workload's
//! speed from the beat rate (or the write rate from writes_total).
//! With `writes_per_beat > 0` the thread first rewrites that many random pages each period, and
//! with `reads_per_beat > 0` it reads (spot-checks) that many random pages, so a beat is late by
//! every fault those accesses wait on (the felt downtime of a thread that touches migrated
//! memory, not just of one that only wakes up). Reads fault at a post-copy destination exactly
//! like writes (userfaultfd MISSING), so a workload with no writes still feels the post-copy.

use crate::log::unix_ns;
use crate::logline;
use crate::memory::Memory;
use crate::page::{Fault, mix64};
use crate::shared::{Shared, next_deadline};
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

/// Pages the thread touches before each beat.
#[derive(Debug, Clone, Copy)]
pub struct PerBeat {
    pub writes: u64,
    pub reads: u64,
}

/// xorshift64: the thread's page choice.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

/// Rewrites up to `n` random pages; returns how many it wrote.
fn write_pages(mem: &Memory, n: u64, rng: &mut Rng, sh: &Shared) -> u64 {
    let mut written = 0;
    // A locked page (checker, churn, a writer) is skipped for another random one; give up on a
    // beat's remaining writes after a bounded number of tries.
    let mut tries = n * 4;
    while written < n && tries > 0 && !sh.stopping() {
        tries -= 1;
        if let Some(g) = mem.try_lock((rng.next() % mem.pages as u64) as usize) {
            g.rewrite();
            written += 1;
        }
    }
    written
}

/// What one beat's reads found.
struct Reads {
    done: u64,
    bad: u64,
    first_fault: Option<(usize, Fault)>,
}

/// Spot-checks up to `n` random pages (a random word of each, plus its header), locked like a
/// write so no writer changes the page meanwhile.
fn read_pages(mem: &Memory, n: u64, rng: &mut Rng, sh: &Shared) -> Reads {
    let mut r = Reads {
        done: 0,
        bad: 0,
        first_fault: None,
    };
    let mut tries = n * 4;
    while r.done < n && tries > 0 && !sh.stopping() {
        tries -= 1;
        let x = rng.next();
        let Some(mut g) = mem.try_lock((x % mem.pages as u64) as usize) else {
            continue;
        };
        r.done += 1;
        if let Err(f) = g.spot_check((x >> 40) as usize) {
            r.bad += 1;
            r.first_fault.get_or_insert((g.index, f));
        }
    }
    r
}

pub fn run(sh: &Shared, period: Duration, per_beat: PerBeat, seed: u64) {
    let mut seq: u64 = 0;
    let mut deadline = Instant::now();
    let mut rng = Rng(mix64(seed) | 1);
    while sh.sleep_until(deadline) {
        let written = write_pages(&sh.mem, per_beat.writes, &mut rng, sh);
        sh.hb_writes.0.fetch_add(written, Ordering::Relaxed);
        if per_beat.reads > 0 {
            let t0 = Instant::now();
            let r = read_pages(&sh.mem, per_beat.reads, &mut rng, sh);
            sh.hb_reads.0.fetch_add(r.done, Ordering::Relaxed);
            if let Some((page, fault)) = r.first_fault {
                // Reported as a failed check (the bench's verification counts those); `by=hb`
                // says which reader saw it.
                sh.checks_failed.fetch_add(1, Ordering::Relaxed);
                logline!(
                    sh.log,
                    "check {} FAIL page={page} {fault} bad={} pages={} ms={:.3} by=hb unix_ns={}",
                    sh.tag,
                    r.bad,
                    r.done,
                    t0.elapsed().as_secs_f64() * 1e3,
                    unix_ns()
                );
            }
        }
        logline!(
            sh.log,
            "hb {} {} {} {} reads={}",
            sh.tag,
            seq,
            unix_ns(),
            sh.writes_total(),
            sh.hb_reads.0.load(Ordering::Relaxed)
        );
        seq += 1;
        deadline = next_deadline(deadline, period, Instant::now());
    }
}
