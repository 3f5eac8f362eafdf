//! The frozen tasks of a lazy dump, and reading their memory safely.
//!
//! After `criu dump --lazy-pages` is ready, every task of the tree is ptrace-stopped by the dump
//! (state `t`, TracerPid = the dump) and stays so until the page-server session ends: CRIU
//! resumes or kills the tasks only after that, or when it dies. Private anonymous memory of a
//! stopped task cannot change, so its bytes are the bytes CRIU's page pipes hold for the lazy
//! pages (the pipes reference the very same pages).
//!
//! A read is trusted only when, *after* it, (1) the dump process is still alive and (2) every
//! thread the task had at the freeze is still in its ptrace stop. A ptrace-stopped thread leaves
//! the stop only by its tracer (the dump, which does so only after the session ends or when it
//! dies: (1)) or by SIGKILL, after which it never re-enters it (2); so both holding after the read
//! means they held during it. The thread checks re-read files of `/proc/PID/task/TID/` through
//! descriptors opened at the freeze, which refer to those threads and not to a reused pid.
//!
//! (2) is checked first by a perf event per thread ([`super::switch_watch`]): the kernel
//! writes a context-switch record into the event's mapped ring buffer before a thread that is
//! put on a CPU executes anything, so a thread has not run since the freeze exactly while that
//! buffer's head is still 0. The check is a load from memory per thread, no system call; the
//! `/proc` reads below are one `pread` per thread after every read: 9% of the source's fault
//! lane CPU for the bench's 3-thread workload (session 30's profile), and a whole check costs
//! 1.2 us against 4.2 us with 2 threads, 2.1 us against 218 us with 129
//! (`measure_check_cost_by_thread_count` in `tests/frozen_real.rs`).
//!
//! Where the kernel refuses the perf event, (2) is checked by the thread's run count
//! (`schedstat`'s third field, `pcount`: the kernel adds one each time it puts the thread on a
//! CPU, in `sched_info_arrive()`). The count is read before the freeze check (state `t`,
//! TracerPid = the dump) and must be the same after each read: then the thread has not executed an instruction since it was seen stopped, in user or
//! kernel mode (leaving a stop, even to die, means running), so it is still in that stop. This
//! is at least as strong as re-reading the state letter (it also catches a thread that ran and
//! stopped again) and cheaper: a `schedstat` read costs ~0.6 us against ~3 us for `stat`, which
//! formats 52 fields, and those `stat` reads were 13% of the source's CPU in a bare-veth
//! post-copy (session 25's profile: a check per fault and per bulk read). Where the kernel
//! keeps no run count (no `CONFIG_SCHED_INFO`: no `schedstat`, or it reads 0) the state letter
//! is re-read instead. A read that fails either check, or process_vm_readv itself (ESRCH, a
//! mapping without PROT_READ: process_vm_readv does not force like ptrace), is not used: the
//! core fails that task over to CRIU, whose pipes still hold its pages.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::IoSliceMut;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::fs::FileExt;

use bytes::Bytes;
use nix::sys::uio::{RemoteIoVec, process_vm_readv};
use nix::unistd::Pid;

use super::switch_watch::SwitchWatch;
use crate::pages::PAGE_SIZE;
use crate::source::pre_copy::tree;

/// Why a task's memory cannot be read (it is served from CRIU instead).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NotReadable {
    #[error("image pid {0} has no host pid in the tree (or shares its pid with another task)")]
    NoHostPid(u32),
    #[error("thread {tid} of pid {pid} is not ptrace-stopped by the dump ({why})")]
    NotFrozen { pid: i32, tid: i32, why: String },
    #[error("the dump process {0} has ended: its tasks may run again")]
    DumpGone(u32),
    #[error("process_vm_readv of pid {pid} at {vaddr:#x}: {why}")]
    Read { pid: i32, vaddr: u64, why: String },
}

/// One thread of a frozen task, as found at the freeze.
#[derive(Debug)]
struct FrozenThread {
    tid: i32,
    /// How it is checked after each read; set up before its stop was verified.
    check: ThreadCheck,
}

/// The one check a frozen thread gets, the cheapest the kernel gives.
#[derive(Debug)]
enum ThreadCheck {
    /// Its context switches ([`SwitchWatch`]): no record since the freeze.
    Watch(SwitchWatch),
    /// Its `schedstat` and the run count read there before its stop was verified: an unchanged
    /// count means it has not been on a CPU since.
    RunCount(File, u64),
    /// Its `stat`, whose state letter must stay `t` (no run count kept by this kernel).
    State(File),
}

/// One task: its host pid and its threads, opened at the freeze.
#[derive(Debug)]
struct FrozenTask {
    host_pid: i32,
    threads: Vec<FrozenThread>,
}

/// Every readable task of the dump, by image pid.
#[derive(Debug)]
pub struct FrozenTasks {
    dump_pid: u32,
    dump_pidfd: OwnedFd,
    tasks: BTreeMap<u32, FrozenTask>,
    /// Tasks that could not be verified at the freeze, and why.
    unreadable: Vec<(u32, NotReadable)>,
}

/// How [`FrozenTasks`] checks that a thread has not run since the freeze.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Checks {
    /// A perf switch watch per thread where the kernel gives one, else `/proc` (the default).
    SwitchWatch,
    /// `/proc` only: the run count in `schedstat`, else the state letter in `stat`.
    Proc,
}

/// The state letter and the tracer of a thread, from its stat and status texts.
pub fn parse_state(stat: &str) -> Option<char> {
    // "pid (comm) S ...": comm may contain spaces and parentheses; the state follows the last ')'.
    let rest = &stat[stat.rfind(')')? + 1..];
    rest.split_whitespace().next()?.chars().next()
}

pub fn parse_tracer(status: &str) -> Option<u32> {
    let line = status.lines().find(|l| l.starts_with("TracerPid:"))?;
    line["TracerPid:".len()..].trim().parse().ok()
}

/// The run count (`pcount`, times the thread was put on a CPU) from a `schedstat` text:
/// `sum_exec_runtime run_delay pcount`.
pub fn parse_run_count(schedstat: &str) -> Option<u64> {
    schedstat.split_whitespace().nth(2)?.parse().ok()
}

/// A thread's run count through its open `schedstat` file.
fn run_count(schedstat: &File) -> Result<u64, String> {
    let mut buf = [0u8; 96];
    let n = schedstat.read_at(&mut buf, 0).map_err(|e| e.to_string())?;
    std::str::from_utf8(&buf[..n])
        .ok()
        .and_then(parse_run_count)
        .ok_or_else(|| "unreadable schedstat".into())
}

/// Checks that a thread, through its open stat file, is in a ptrace stop.
fn stopped(stat: &File) -> Result<(), String> {
    let mut buf = [0u8; 512];
    let n = stat.read_at(&mut buf, 0).map_err(|e| e.to_string())?;
    let text = String::from_utf8_lossy(&buf[..n]);
    match parse_state(&text) {
        Some('t') => Ok(()),
        Some(s) => Err(format!("state {s}")),
        None => Err("unreadable stat".into()),
    }
}

/// A pidfd for `pid`: a process, or (kernel >= 6.9, PIDFD_THREAD) a thread that is not a
/// process leader, since TracerPid names the tracing thread.
fn pidfd_open(pid: u32) -> std::io::Result<OwnedFd> {
    let open = |flags: libc::c_int| {
        // SAFETY: pidfd_open takes a pid and flags and returns a new descriptor or -1.
        unsafe { libc::syscall(libc::SYS_pidfd_open, pid as libc::pid_t, flags) }
    };
    let mut fd = open(0);
    if fd < 0
        && matches!(
            std::io::Error::last_os_error().raw_os_error(),
            Some(libc::EINVAL | libc::ENOENT)
        )
    {
        // PIDFD_THREAD is O_EXCL.
        fd = open(libc::O_EXCL);
    }
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: the kernel just returned this descriptor to us; nothing else owns it.
    Ok(unsafe { <OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd as i32) })
}

/// True once the process behind `pidfd` has exited (the pidfd polls readable).
fn exited(pidfd: &OwnedFd) -> bool {
    let mut fds = [nix::poll::PollFd::new(
        pidfd.as_fd(),
        nix::poll::PollFlags::POLLIN,
    )];
    matches!(nix::poll::poll(&mut fds, nix::poll::PollTimeout::ZERO), Ok(n) if n > 0)
}

impl FrozenTasks {
    /// The tree under `root` (host pid), as the dump `dump_pid` froze it; `image_pids` are the
    /// pids the dump's pstree records. A task that cannot be verified frozen by that dump is left
    /// out (and listed in [`FrozenTasks::unreadable`]).
    pub fn discover(root: i32, dump_pid: u32, image_pids: &[u32]) -> std::io::Result<Self> {
        Self::discover_checked(root, dump_pid, image_pids, Checks::SwitchWatch)
    }

    /// [`FrozenTasks::discover`] with the checks given: `Checks::Proc` never opens perf events
    /// (the fallback, for tests of it).
    pub fn discover_checked(
        root: i32,
        dump_pid: u32,
        image_pids: &[u32],
        checks: Checks,
    ) -> std::io::Result<Self> {
        let dump_pidfd = pidfd_open(dump_pid)?;
        let walked = tree::walk(root).map_err(std::io::Error::other)?;
        let mut by_ns: BTreeMap<u32, Vec<i32>> = BTreeMap::new();
        for t in &walked {
            by_ns.entry(t.ns_pid).or_default().push(t.host_pid);
        }
        let mut tasks = BTreeMap::new();
        let mut unreadable = Vec::new();
        for &pid in image_pids {
            let host_pid = match by_ns.get(&pid).map(Vec::as_slice) {
                Some(&[h]) => h,
                _ => {
                    unreadable.push((pid, NotReadable::NoHostPid(pid)));
                    continue;
                }
            };
            match Self::open_task(host_pid, dump_pid, checks) {
                Ok(task) => {
                    tasks.insert(pid, task);
                }
                Err(why) => unreadable.push((pid, why)),
            }
        }
        Ok(Self {
            dump_pid,
            dump_pidfd,
            tasks,
            unreadable,
        })
    }

    /// Opens every thread's stat file and checks it is ptrace-stopped by `dump_pid`.
    fn open_task(host_pid: i32, dump_pid: u32, checks: Checks) -> Result<FrozenTask, NotReadable> {
        let not = |tid: i32, why: String| NotReadable::NotFrozen {
            pid: host_pid,
            tid,
            why,
        };
        let dir = std::fs::read_dir(format!("/proc/{host_pid}/task"))
            .map_err(|e| not(host_pid, e.to_string()))?;
        let mut threads = Vec::new();
        for entry in dir {
            let entry = entry.map_err(|e| not(host_pid, e.to_string()))?;
            let Some(tid) = entry
                .file_name()
                .to_str()
                .and_then(|s| s.parse::<i32>().ok())
            else {
                continue;
            };
            // The watch (or else the run count) first: unchanged later, it proves the thread
            // has not run since before the checks below found it stopped.
            let watch = match checks {
                Checks::SwitchWatch => SwitchWatch::open(tid)
                    .inspect_err(|e| {
                        tracing::debug!(tid, "no perf switch watch ({e}); checking /proc")
                    })
                    .ok(),
                Checks::Proc => None,
            };
            let ran = match watch {
                Some(_) => None,
                None => File::open(entry.path().join("schedstat"))
                    .ok()
                    .and_then(|f| run_count(&f).ok().filter(|n| *n > 0).map(|n| (f, n))),
            };
            let stat =
                File::open(entry.path().join("stat")).map_err(|e| not(tid, e.to_string()))?;
            let status = std::fs::read_to_string(entry.path().join("status"))
                .map_err(|e| not(tid, e.to_string()))?;
            match parse_tracer(&status) {
                Some(t) if t == dump_pid => {}
                other => {
                    return Err(not(
                        tid,
                        format!("traced by {other:?}, not the dump {dump_pid}"),
                    ));
                }
            }
            stopped(&stat).map_err(|why| not(tid, why))?;
            // `stat` is kept only where it is the check.
            let check = match (watch, ran) {
                (Some(w), _) => ThreadCheck::Watch(w),
                (None, Some((f, n))) => ThreadCheck::RunCount(f, n),
                (None, None) => ThreadCheck::State(stat),
            };
            threads.push(FrozenThread { tid, check });
        }
        if threads.is_empty() {
            return Err(not(host_pid, "no threads".into()));
        }
        Ok(FrozenTask { host_pid, threads })
    }

    /// Image pids whose memory may be read.
    pub fn readable(&self) -> impl Iterator<Item = u32> + '_ {
        self.tasks.keys().copied()
    }

    pub fn unreadable(&self) -> &[(u32, NotReadable)] {
        &self.unreadable
    }

    pub fn host_pid(&self, pid: u32) -> Option<i32> {
        self.tasks.get(&pid).map(|t| t.host_pid)
    }

    /// True when every thread of `pid` is checked by its run count (not its state letter).
    pub fn checked_by_run_count(&self, pid: u32) -> bool {
        self.tasks.get(&pid).is_some_and(|t| {
            t.threads
                .iter()
                .all(|th| matches!(th.check, ThreadCheck::RunCount(..)))
        })
    }

    /// True when every thread of `pid` is checked by its perf switch watch (no `/proc` read).
    pub fn checked_by_switch_watch(&self, pid: u32) -> bool {
        self.tasks.get(&pid).is_some_and(|t| {
            t.threads
                .iter()
                .all(|th| matches!(th.check, ThreadCheck::Watch(_)))
        })
    }

    /// Checks, now, that the dump is alive and every thread of `pid` is still in its ptrace stop:
    /// has not run since the freeze (its switch watch, else its run count), or, where the kernel
    /// gives neither, is in state `t`.
    pub fn check_frozen(&self, pid: u32) -> Result<(), NotReadable> {
        let task = self.tasks.get(&pid).ok_or(NotReadable::NoHostPid(pid))?;
        for t in &task.threads {
            let still = match &t.check {
                ThreadCheck::Watch(w) if w.ran() => {
                    Err("it was put on a CPU since the freeze (perf switch record)".into())
                }
                ThreadCheck::Watch(_) => Ok(()),
                ThreadCheck::RunCount(schedstat, at_freeze) => {
                    run_count(schedstat).and_then(|now| {
                        if now == *at_freeze {
                            Ok(())
                        } else {
                            Err(format!(
                                "it ran since the freeze (run count {at_freeze} -> {now})"
                            ))
                        }
                    })
                }
                ThreadCheck::State(stat) => stopped(stat),
            };
            still.map_err(|why| NotReadable::NotFrozen {
                pid: task.host_pid,
                tid: t.tid,
                why,
            })?;
        }
        // Last: a dump that ended before the thread checks may have released them.
        if exited(&self.dump_pidfd) {
            return Err(NotReadable::DumpGone(self.dump_pid));
        }
        Ok(())
    }

    /// Reads `nr_pages` pages of image pid `pid` at `vaddr` from the frozen task; the bytes are
    /// returned only if the task was frozen throughout (see the module docs).
    pub fn read(&self, pid: u32, vaddr: u64, nr_pages: u64) -> Result<Bytes, NotReadable> {
        let task = self.tasks.get(&pid).ok_or(NotReadable::NoHostPid(pid))?;
        let len = (nr_pages * PAGE_SIZE) as usize;
        let mut buf = vec![0u8; len];
        let remote = [RemoteIoVec {
            base: vaddr as usize,
            len,
        }];
        let got = process_vm_readv(
            Pid::from_raw(task.host_pid),
            &mut [IoSliceMut::new(&mut buf)],
            &remote,
        )
        .map_err(|e| NotReadable::Read {
            pid: task.host_pid,
            vaddr,
            why: e.to_string(),
        })?;
        if got != len {
            return Err(NotReadable::Read {
                pid: task.host_pid,
                vaddr,
                why: format!("short read: {got} of {len} bytes"),
            });
        }
        self.check_frozen(pid)?;
        Ok(Bytes::from(buf))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_run_count() {
        assert_eq!(parse_run_count("256805776 23965620 1297\n"), Some(1297));
        assert_eq!(parse_run_count("0 0 0\n"), Some(0));
        assert_eq!(parse_run_count("12 34"), None);
        assert_eq!(parse_run_count("a b c"), None);
    }

    #[test]
    fn parses_state_and_tracer() {
        assert_eq!(parse_state("12 (a b) c) t 1 2 3"), Some('t'));
        assert_eq!(parse_state("12 (sleep) S 1"), Some('S'));
        assert_eq!(parse_state("garbage"), None);
        assert_eq!(parse_tracer("Name:\tx\nTracerPid:\t4242\n"), Some(4242));
        assert_eq!(parse_tracer("TracerPid:\t0\n"), Some(0));
        assert_eq!(parse_tracer("Name:\tx\n"), None);
    }
}
