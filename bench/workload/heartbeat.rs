//! Heartbeat thread: one `hb <tag> <seq> <unix_ns> <writes_total>` line per period. The bench
//! takes downtime as the largest gap between heartbeats and the write rate from writes_total.

use crate::log::unix_ns;
use crate::logline;
use crate::shared::{Shared, next_deadline};
use std::time::{Duration, Instant};

pub fn run(sh: &Shared, period: Duration) {
    let mut seq: u64 = 0;
    let mut deadline = Instant::now();
    while sh.sleep_until(deadline) {
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
