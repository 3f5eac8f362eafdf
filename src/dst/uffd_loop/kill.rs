//! Killing restored processes whose memory is incomplete, before their uffds close: closing a
//! uffd turns every missing page into a silent zero page, SIGKILL first makes it a visible crash.

use std::collections::{BTreeMap, BTreeSet};
use std::io;
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd};
use std::time::{Duration, Instant};

use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
use tracing::error;

use super::ShutdownReport;

/// A process we may have to kill, pinned by a pidfd so a reused pid is never hit.
#[derive(Debug)]
pub(crate) struct Process {
    pub pid: i32,
    pidfd: OwnedFd,
}

impl Process {
    /// Pins `pid` (a host pid, as seen from this process).
    pub fn open(pid: i32) -> io::Result<Self> {
        // SAFETY: pidfd_open takes a pid and flags and returns a new fd or -1.
        let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: the syscall returned a fresh fd that nothing else owns.
        Ok(Self {
            pid,
            pidfd: unsafe { OwnedFd::from_raw_fd(fd as i32) },
        })
    }

    /// Whether the process has exited (its pidfd is readable), without waiting.
    pub fn has_exited(&self) -> bool {
        let mut fds = [PollFd::new(self.pidfd.as_fd(), PollFlags::POLLIN)];
        matches!(poll(&mut fds, PollTimeout::ZERO), Ok(n) if n > 0)
    }

    /// Blocks until the process has exited. An error if the pidfd was closed meanwhile (by
    /// another sharer of this descriptor table) or cannot be polled.
    pub fn wait_exited(&self) -> io::Result<()> {
        loop {
            let mut fds = [PollFd::new(self.pidfd.as_fd(), PollFlags::POLLIN)];
            match poll(&mut fds, PollTimeout::NONE) {
                Ok(n) if n > 0 => {
                    let nval = fds[0]
                        .revents()
                        .is_some_and(|r| r.contains(PollFlags::POLLNVAL));
                    return if nval {
                        Err(io::Error::from_raw_os_error(libc::EBADF))
                    } else {
                        Ok(())
                    };
                }
                Ok(_) | Err(nix::errno::Errno::EINTR) => {}
                Err(e) => return Err(e.into()),
            }
        }
    }

    /// SIGKILL. ESRCH (already exited) counts as success.
    pub fn kill(&self) -> io::Result<()> {
        // SAFETY: pidfd_send_signal on our pidfd, no siginfo, no flags.
        let r = unsafe {
            libc::syscall(
                libc::SYS_pidfd_send_signal,
                self.pidfd.as_raw_fd(),
                libc::SIGKILL,
                std::ptr::null::<libc::siginfo_t>(),
                0,
            )
        };
        let err = io::Error::last_os_error();
        if r < 0 && err.raw_os_error() != Some(libc::ESRCH) {
            return Err(err);
        }
        Ok(())
    }
}

/// Who to kill if a view's memory is incomplete at shutdown.
pub(super) enum KillTarget {
    Own(Process),
    /// A fork child: its pid is unknown, so kill every descendant of this host pid.
    DescendantOf(i32),
    Unknown,
}

impl KillTarget {
    /// The target of a fork child of this one.
    pub(super) fn for_child(&self) -> KillTarget {
        match self {
            KillTarget::Own(p) => KillTarget::DescendantOf(p.pid),
            KillTarget::DescendantOf(a) => KillTarget::DescendantOf(*a),
            KillTarget::Unknown => KillTarget::Unknown,
        }
    }
}

/// SIGKILLs every incomplete process and waits (up to `wait`) for them to die.
pub(super) fn kill_all(
    incomplete: &[(u32, &KillTarget)],
    wait: Duration,
    report: &mut ShutdownReport,
) {
    // Find fork children (through their ancestors) before killing anything: a killed parent's
    // children are reparented at once and would no longer be found.
    let mut extra: Vec<Process> = Vec::new();
    let mut seen = BTreeSet::new();
    for (_, owner) in incomplete {
        if let KillTarget::Own(p) = owner {
            seen.insert(p.pid);
        }
    }
    for (_, owner) in incomplete {
        if let KillTarget::DescendantOf(root) = owner {
            for d in descendants(*root) {
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
            KillTarget::Own(p) => targets.push((Some(*pid), p)),
            KillTarget::DescendantOf(_) => {}
            KillTarget::Unknown => {
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
    let alive = wait_exited(&killed, wait);
    if !alive.is_empty() {
        error!(
            ?alive,
            "killed processes still alive; closing their uffds anyway"
        );
    }
    report.killed = killed.iter().map(|p| p.pid).collect();
    report.killed.sort();
}

/// Waits until every process has exited (its pidfd is readable), or `timeout` passes.
/// Returns the pids still alive.
pub(crate) fn wait_exited(procs: &[&Process], timeout: Duration) -> Vec<i32> {
    let deadline = Instant::now() + timeout;
    let mut alive: Vec<&Process> = procs.to_vec();
    while !alive.is_empty() {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            break;
        }
        let mut fds: Vec<PollFd> = alive
            .iter()
            .map(|p| PollFd::new(p.pidfd.as_fd(), PollFlags::POLLIN))
            .collect();
        let ms =
            PollTimeout::try_from(left.as_millis().min(60_000) as i32).unwrap_or(PollTimeout::MAX);
        if poll(&mut fds, ms).is_err() {
            break;
        }
        let done: Vec<bool> = fds
            .iter()
            .map(|f| f.revents().is_some_and(|r| !r.is_empty()))
            .collect();
        alive = alive
            .into_iter()
            .zip(done)
            .filter(|(_, d)| !d)
            .map(|(p, _)| p)
            .collect();
    }
    alive.iter().map(|p| p.pid).collect()
}

/// Every live descendant of `root` (not `root` itself), from the ppid fields in /proc.
pub fn descendants(root: i32) -> Vec<i32> {
    let mut children: BTreeMap<i32, Vec<i32>> = BTreeMap::new();
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    for entry in dir.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<i32>().ok())
        else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
            continue;
        };
        if let Some(ppid) = parse_ppid(&stat) {
            children.entry(ppid).or_default().push(pid);
        }
    }
    let mut out = Vec::new();
    let mut seen = BTreeSet::from([root]);
    let mut todo = vec![root];
    while let Some(p) = todo.pop() {
        for &c in children.get(&p).map(Vec::as_slice).unwrap_or(&[]) {
            if seen.insert(c) {
                out.push(c);
                todo.push(c);
            }
        }
    }
    out
}

/// The ppid field of /proc/PID/stat; the command name may hold spaces and parentheses, so
/// parse after the last ')'.
fn parse_ppid(stat: &str) -> Option<i32> {
    let rest = &stat[stat.rfind(')')? + 1..];
    rest.split_whitespace().nth(1)?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_ppid_after_odd_names() {
        assert_eq!(parse_ppid("12 (a b) c) S 7 12 12 0"), Some(7));
        assert_eq!(parse_ppid("12 (x"), None);
    }

    #[test]
    fn finds_and_kills_a_child() {
        let mut child = std::process::Command::new("sleep")
            .arg("30")
            .spawn()
            .unwrap();
        let me = std::process::id() as i32;
        assert!(descendants(me).contains(&(child.id() as i32)));
        let p = Process::open(child.id() as i32).unwrap();
        p.kill().unwrap();
        // The pidfd turns readable only once the child is reaped or a zombie.
        assert!(wait_exited(&[&p], Duration::from_secs(5)).is_empty());
        assert!(!child.wait().unwrap().success());
    }
}
