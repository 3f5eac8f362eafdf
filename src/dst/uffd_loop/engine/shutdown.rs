//! The end: kill what is incomplete (if asked), wait for it to die, then close every uffd.

use std::collections::BTreeSet;
use std::os::fd::{FromRawFd, IntoRawFd};
use std::time::Duration;

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
        let mut report = ShutdownReport::default();
        let views = std::mem::take(&mut self.views);
        let mut incomplete: Vec<(u32, &Owner)> = views
            .values()
            .filter(|v| !v.mem.is_complete())
            .map(|v| (v.mem.pid(), &v.owner))
            .collect();
        incomplete.extend(self.broken.iter().map(|(pid, _, owner)| (*pid, owner)));
        report.incomplete = incomplete.iter().map(|(pid, _)| *pid).collect();
        if kill_incomplete && !incomplete.is_empty() {
            let mut extra = Vec::new();
            let mut killed = BTreeSet::new();
            for (pid, owner) in &incomplete {
                match owner {
                    Owner::Own(p) => match p.kill() {
                        Ok(()) => {
                            killed.insert(p.pid);
                        }
                        Err(e) => {
                            error!(
                                pid,
                                host_pid = p.pid,
                                "cannot kill an incomplete process: {e}"
                            );
                            report.not_killed.push(*pid);
                        }
                    },
                    // A fork child's own pid is unknown: kill the whole subtree it lives in.
                    Owner::DescendantOf(root) => {
                        for d in kill::descendants(*root) {
                            if killed.contains(&d) {
                                continue;
                            }
                            if let Ok(p) = Process::open(d)
                                && p.kill().is_ok()
                            {
                                killed.insert(d);
                                extra.push(p);
                            }
                        }
                    }
                    Owner::Unknown => {
                        error!(
                            pid,
                            "incomplete process with no known host pid: it may read zero pages"
                        );
                        report.not_killed.push(*pid);
                    }
                }
            }
            let mut procs: Vec<&Process> = incomplete
                .iter()
                .filter_map(|(_, o)| match o {
                    Owner::Own(p) if killed.contains(&p.pid) => Some(p),
                    _ => None,
                })
                .collect();
            procs.extend(extra.iter());
            let alive = kill::wait_exited(&procs, self.config.kill_wait);
            if !alive.is_empty() {
                error!(
                    ?alive,
                    "killed processes still alive; closing their uffds anyway"
                );
            }
            report.killed = killed.into_iter().collect();
        } else if !incomplete.is_empty() {
            warn!(pids = ?report.incomplete, "shutting down with lazy memory missing: those pages will read as zeros");
        }
        info!(stats = ?self.stats.counters(), ?report, "fault thread done");
        drop(views);
        report
    }
}
