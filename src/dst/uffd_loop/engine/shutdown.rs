//! The end: kill what is incomplete (if asked), wait for it to die, then close every uffd.

use std::collections::BTreeSet;
use std::os::fd::{FromRawFd, IntoRawFd};
use std::time::{Duration, Instant};

use tracing::{error, info, warn};
use userfaultfd::Uffd;

use super::{Engine, Owner};
use crate::dst::uffd_loop::kill::{self, Process};
use crate::dst::uffd_loop::{Inbound, ShutdownReport};

impl Engine {
    /// After a fatal error: keep every uffd open until told what to do.
    pub(super) fn wait_for_shutdown(mut self) -> ShutdownReport {
        loop {
            let msg = match self.urgent.try_recv() {
                Ok(m) => m,
                Err(_) => match self.bulk.recv_timeout(Duration::from_millis(50)) {
                    Ok(m) => m,
                    Err(crossbeam_channel::RecvTimeoutError::Timeout) => continue,
                    Err(crossbeam_channel::RecvTimeoutError::Disconnected) => {
                        return self.shutdown(true);
                    }
                },
            };
            match msg {
                Inbound::Shutdown { kill_incomplete } => return self.shutdown(kill_incomplete),
                Inbound::Task {
                    pid,
                    uffd,
                    host_pid,
                    ..
                } => {
                    // SAFETY: we own `uffd`.
                    let uffd = unsafe { Uffd::from_raw_fd(uffd.into_raw_fd()) };
                    let owner = host_pid
                        .and_then(|p| Process::open(p).ok())
                        .map_or(Owner::Unknown, Owner::Own);
                    self.broken.push((pid.max(0) as u32, uffd, owner));
                }
                _ => {}
            }
        }
    }

    /// Kills incomplete processes if asked, then closes every uffd.
    pub(super) fn shutdown(mut self, kill_incomplete: bool) -> ShutdownReport {
        // Pages the kernel refused a moment ago were sent before the Shutdown: place them first.
        let deadline = Instant::now() + Duration::from_secs(5);
        while !(self.retrying.is_empty() && self.deferred.is_empty()) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(1));
            self.retry_deferred();
            self.retry_arrivals();
        }
        let mut report = ShutdownReport::default();
        let views = std::mem::take(&mut self.views);
        let broken = std::mem::take(&mut self.broken);
        let mut incomplete: Vec<(u32, &Owner)> = views
            .values()
            .filter(|v| !v.mem.is_complete())
            .map(|v| (v.mem.pid(), &v.owner))
            .collect();
        incomplete.extend(broken.iter().map(|(pid, _, owner)| (*pid, owner)));
        report.incomplete = incomplete.iter().map(|(pid, _)| *pid).collect();
        if kill_incomplete && !incomplete.is_empty() {
            kill_all(&incomplete, self.config.kill_wait, &mut report);
        } else if !incomplete.is_empty() {
            warn!(
                pids = ?report.incomplete,
                "shutting down with lazy memory missing: those pages will read as zeros"
            );
        }
        info!(stats = ?self.stats.counters(), ?report, "fault thread done");
        // Only now do the uffds close.
        drop(views);
        drop(broken);
        report
    }
}

/// SIGKILLs every incomplete process and waits (up to `wait`) for them to die.
fn kill_all(incomplete: &[(u32, &Owner)], wait: Duration, report: &mut ShutdownReport) {
    // Find fork children (through their ancestors) before killing anything: a killed parent's
    // children are reparented at once and would no longer be found.
    let mut extra: Vec<Process> = Vec::new();
    let mut seen = BTreeSet::new();
    for (_, owner) in incomplete {
        if let Owner::Own(p) = owner {
            seen.insert(p.pid);
        }
    }
    for (_, owner) in incomplete {
        if let Owner::DescendantOf(root) = owner {
            for d in kill::descendants(*root) {
                if seen.insert(d)
                    && let Ok(p) = Process::open(d)
                {
                    extra.push(p);
                }
            }
        }
    }
    // (image pid, process); fork children found through /proc have no image pid of their own.
    let mut targets: Vec<(Option<u32>, &Process)> = Vec::new();
    for (pid, owner) in incomplete {
        match owner {
            Owner::Own(p) => targets.push((Some(*pid), p)),
            Owner::DescendantOf(_) => {}
            Owner::Unknown => {
                error!(
                    pid,
                    "incomplete process with no known host pid: it may read zero pages"
                );
                report.not_killed.push(*pid);
            }
        }
    }
    targets.extend(extra.iter().map(|p| (None, p)));
    let mut killed = Vec::new();
    for (pid, p) in targets {
        match p.kill() {
            Ok(()) => killed.push(p),
            Err(e) => {
                error!(host_pid = p.pid, "cannot kill an incomplete process: {e}");
                report.not_killed.extend(pid);
            }
        }
    }
    let alive = kill::wait_exited(&killed, wait);
    if !alive.is_empty() {
        error!(
            ?alive,
            "killed processes still alive; closing their uffds anyway"
        );
    }
    report.killed = killed.iter().map(|p| p.pid).collect();
    report.killed.sort();
}
