//! When the dump froze the tree: the moment the root task entered its ptrace stop.
//!
//! `criu dump` spends its first tens of milliseconds probing the kernel and collecting the tree
//! (`kerndat_init()`, `collect_pstree()`) while the tasks still run; it seizes them only then
//! (`seize_catch_task()`, state `t`). The downtime the workload feels starts there, not at the
//! dump's start. A thread reads the root's `/proc/PID/stat` every millisecond from the dump's
//! start until it sees the stop (or is told the dump is ready), so reports can give CRIU's freeze
//! (stop -> ready) and a downtime measured from the freeze, to a millisecond.
//!
//! Invariant: the instant is taken after a read that showed `t`, so it is never earlier than the
//! freeze (at most one poll interval plus a read later); without one, callers fall back to the
//! dump's start, an upper bound of the downtime.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crate::source::frozen::tasks::parse_state;

const POLL: Duration = Duration::from_millis(1);

/// Watches one task for its ptrace stop until [`FreezeWatch::finish`]. The thread ends by
/// itself at the stop, or at the next poll after `finish`; `finish` never waits for it (the
/// dump's ready moment is on the downtime's path).
pub struct FreezeWatch {
    stop: Arc<AtomicBool>,
    /// Unix ns when the stop was seen; 0 until then.
    seen_ns: Arc<AtomicU64>,
}

impl FreezeWatch {
    /// Starts watching host pid `pid` (if no thread can be started there is no figure, no harm).
    pub fn start(pid: i32) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let seen_ns = Arc::new(AtomicU64::new(0));
        let (flag, seen) = (stop.clone(), seen_ns.clone());
        let path = format!("/proc/{pid}/stat");
        let _ = std::thread::Builder::new()
            .name("freeze-watch".into())
            .spawn(move || {
                while !flag.load(Relaxed) {
                    let Ok(text) = std::fs::read_to_string(&path) else {
                        return;
                    };
                    if parse_state(&text) == Some('t') {
                        let now = SystemTime::now().duration_since(UNIX_EPOCH);
                        seen.store(now.map_or(0, |d| d.as_nanos() as u64), Relaxed);
                        return;
                    }
                    std::thread::sleep(POLL);
                }
            });
        Self { stop, seen_ns }
    }

    /// Stops watching; the moment the stop was seen, if it was.
    pub fn finish(self) -> Option<SystemTime> {
        self.stop.store(true, Relaxed);
        match self.seen_ns.load(Relaxed) {
            0 => None,
            ns => Some(UNIX_EPOCH + Duration::from_nanos(ns)),
        }
    }
}

impl Drop for FreezeWatch {
    fn drop(&mut self) {
        self.stop.store(true, Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sees_a_ptrace_stop_and_nothing_before_it() {
        use nix::sys::ptrace;
        use nix::unistd::Pid;
        // A child that sleeps, then is seized and interrupted as CRIU does.
        let mut child = std::process::Command::new("sleep")
            .arg("5")
            .spawn()
            .expect("spawning sleep");
        let pid = Pid::from_raw(child.id() as i32);
        let watch = FreezeWatch::start(pid.as_raw());
        std::thread::sleep(Duration::from_millis(20));
        let before = SystemTime::now();
        let seized =
            ptrace::seize(pid, ptrace::Options::empty()).is_ok() && ptrace::interrupt(pid).is_ok();
        let seen = if seized {
            let deadline = std::time::Instant::now() + Duration::from_secs(2);
            while std::time::Instant::now() < deadline
                && std::fs::read_to_string(format!("/proc/{pid}/stat"))
                    .ok()
                    .and_then(|t| parse_state(&t))
                    != Some('t')
            {
                std::thread::sleep(Duration::from_millis(1));
            }
            std::thread::sleep(Duration::from_millis(10));
            watch.finish()
        } else {
            // Not allowed to ptrace here (no CAP_SYS_PTRACE): only the no-stop half is checked.
            assert!(watch.finish().is_none(), "a running task is not frozen");
            None
        };
        let _ = child.kill();
        let _ = child.wait();
        if seized {
            let seen = seen.expect("the ptrace stop was seen");
            assert!(seen >= before, "seen no earlier than the stop");
        }
    }
}
