//! The engine's accounting of what it placed: page counters, and the fault latency of every
//! thread a placement woke (split by whether the fault asked the source itself, and by whether
//! the push had begun).

use std::sync::atomic::Ordering::Relaxed;

use super::{Engine, Kernel, ViewId};
use crate::dst::uffd_loop::place::Tally;
use crate::pages::PAGE_SIZE;

impl Engine {
    /// Stats for what was placed, and the fault latency of every thread it woke.
    pub(super) fn account<K: Kernel>(
        &mut self,
        k: &K,
        id: ViewId,
        tally: &Tally,
        data: bool,
        urgent: bool,
    ) {
        let s = &self.stats;
        let counter = match (data, urgent) {
            (false, _) => &s.lazy_zero_pages,
            (true, true) => &s.pages_copied_urgent,
            (true, false) => &s.pages_copied_pushed,
        };
        counter.fetch_add(tally.pages, Relaxed);
        s.copy_retries.fetch_add(tally.retries, Relaxed);
        s.pages_dropped.fetch_add(tally.dropped, Relaxed);
        if self.waiting.is_empty() {
            return;
        }
        let now = k.now();
        for &(img, n) in &tally.runs {
            let keys: Vec<(ViewId, u64)> = self
                .waiting
                .range((id, img)..(id, img + n * PAGE_SIZE))
                .map(|(k, _)| *k)
                .collect();
            for key in keys {
                for (t, asked) in self.waiting.remove(&key).unwrap_or_default() {
                    let ns = u64::try_from(now.saturating_duration_since(t).as_nanos())
                        .unwrap_or(u64::MAX);
                    s.fault_latency.record(ns);
                    if asked {
                        s.fault_latency_asked.record(ns);
                    } else {
                        s.fault_latency_already_asked.record(ns);
                    }
                    if s.pages_copied_pushed.load(Relaxed) == 0 {
                        s.fault_latency_before_push.record(ns);
                    } else {
                        s.fault_latency_during_push.record(ns);
                    }
                    s.blocktime_ns.fetch_add(ns, Relaxed);
                }
            }
        }
    }
}
