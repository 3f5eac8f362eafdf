//! Heartbeat thread: one `hb <tag> <seq> <unix_ns> <writes_total>` line per period. The bench
//! takes downtime as the largest gap between heartbeats and the write rate from writes_total.
//! With `writes_per_beat > 0` the thread first rewrites that many random pages each period, so a
//! beat is late by every fault those writes wait on (the felt downtime of a thread that touches
//! migrated memory, not just of one that only wakes up).

use crate::log::unix_ns;
use crate::logline;
use crate::page::mix64;
use crate::shared::{Shared, next_deadline};
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

pub fn run(sh: &Shared, period: Duration, writes_per_beat: u64, seed: u64) {
    let mut seq: u64 = 0;
    let mut deadline = Instant::now();
    let mut rng = mix64(seed) | 1;
    while sh.sleep_until(deadline) {
        let mut written = 0;
        // A locked page (checker, churn, a writer) is skipped for another random one; give up
        // on a beat's remaining writes after a bounded number of tries.
        let mut tries = writes_per_beat * 4;
        while written < writes_per_beat && tries > 0 && !sh.stopping() {
            tries -= 1;
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            if let Some(g) = sh.mem.try_lock((rng % sh.mem.pages as u64) as usize) {
                g.rewrite();
                written += 1;
            }
        }
        sh.hb_writes.0.fetch_add(written, Ordering::Relaxed);
        logline!(
            sh.log,
            "hb {} {} {} {}",
            sh.tag,
            seq,
            unix_ns(),
            sh.writes_total()
        );
        seq += 1;
        deadline = next_deadline(deadline, period, Instant::now());
    }
}
