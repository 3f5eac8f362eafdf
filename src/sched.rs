//! CPU scheduling of pageserv's own threads: `--realtime` runs them under SCHED_FIFO.
//!
//! A task that faults on a lazy page is blocked until pageserv has fetched and placed it; for
//! that task pageserv stands in for the kernel's own page-fault path, which never waits for the
//! CPU. Under the normal policy every hop of a fault (uffd loop, QUIC task, CRIU's page
//! server, the reply) may wait behind ordinary tasks on a busy core: with both hosts on one
//! 2-core VM that run-queue wait, not the link, was most of the fault p99's growth under a full
//! push (README, "Sharing the bottleneck"). Two things were in the way: the hops crossed the busy
//! multi-thread runtime (fixed by [`crate::fault_lane`]), and under EEVDF a running thread is
//! not preempted at a wakeup until its slice ends, whatever the nice values (a nice value alone
//! measured no better). By default the threads on a fault's path therefore ask for a short slice
//! at nice -10 ([`favour_this_thread`]); `--realtime` puts every pageserv thread under a
//! real-time policy, which preempts ordinary tasks at wakeup.
//!
//! The policy is set with SCHED_RESET_ON_FORK, so every process pageserv starts (`criu restore`
//! and the tasks it restores, keepers, a runc restore) begins at the normal policy. The kernel
//! resets new threads too, so each of pageserv's threads raises itself at start
//! ([`raise_this_thread`]): the tokio runtime's threads and the fault lane (where dst's uffd loop
//! runs). A thread that does not (the pre-copy reader, which competes with the still running
//! workload) stays normal. `criu dump` is raised only once it is ready to serve pages (its
//! status byte): the dump itself (freeze, parasite, images) runs as it would without
//! `--realtime`. pageserv's threads block whenever they wait, and the kernel keeps 5% of each
//! second for ordinary tasks (sched_rt_runtime_us), so a fault in pageserv cannot lock a host up.

use std::sync::atomic::{AtomicBool, Ordering};

/// SCHED_FIFO priority: the lowest band, below the kernel's own real-time threads.
pub const PRIORITY: i32 = 10;

static REALTIME: AtomicBool = AtomicBool::new(false);

#[derive(Debug, thiserror::Error)]
#[error(
    "could not give {what} the real-time policy (SCHED_FIFO {PRIORITY}): {source}; it needs \
     CAP_SYS_NICE or an RLIMIT_RTPRIO of at least {PRIORITY} (run without --realtime to stay \
     at the normal policy)"
)]
pub struct SchedError {
    what: String,
    #[source]
    source: std::io::Error,
}

/// Whether this process asked for the real-time policy and got it.
pub fn realtime() -> bool {
    REALTIME.load(Ordering::Relaxed)
}

/// Puts the calling thread under SCHED_FIFO and records that every later thread should follow.
/// On failure nothing changes and the process stays at the normal policy.
pub fn enable_realtime() -> Result<(), SchedError> {
    set_fifo(0, "this process")?;
    REALTIME.store(true, Ordering::Relaxed);
    Ok(())
}

/// Called first in every thread pageserv starts: raises it if the process is real-time. A thread
/// that cannot be raised (the limit changed underneath) runs normally: logged, not fatal.
pub fn raise_this_thread() {
    raise_if_realtime(0, || "a new thread".into());
}

/// The nice value of the threads on a fault's path at the normal policy ([`favour_this_thread`]).
pub const FAULT_PATH_NICE: i32 = -10;

/// Called first in a thread on a fault's path (the fault lane, with dst's uffd loop; the
/// source's fault reader): under `--realtime` it is raised like every thread; otherwise it gets
/// [`FAULT_PATH_NICE`], so at a wakeup it preempts the bulk threads (the push) that otherwise
/// share its core as equals. Those threads block whenever they wait (no
/// busy polling), so this costs the bulk work only the CPU the faults really use. Failing to
/// change the nice value (no CAP_SYS_NICE) is logged and harmless.
pub fn favour_this_thread() {
    if realtime() {
        raise_this_thread();
        return;
    }
    if let Err(e) = set_short_slice() {
        tracing::debug!("no short slice for a fault-path thread ({e}); nice only");
        // SAFETY: setpriority with PRIO_PROCESS and who 0 changes the calling thread's nice
        // value (Linux keeps it per thread) and touches no memory.
        let rc = unsafe { libc::setpriority(libc::PRIO_PROCESS, 0, FAULT_PATH_NICE) };
        if rc != 0 {
            tracing::debug!(
                "cannot give a fault-path thread nice {FAULT_PATH_NICE}: {}",
                std::io::Error::last_os_error()
            );
        }
    }
}

/// The time slice a fault-path thread asks the scheduler for ([`favour_this_thread`]).
pub const FAULT_PATH_SLICE_NS: u64 = 100_000;

/// The kernel's `struct sched_attr` (include/uapi/linux/sched/types.h, SCHED_ATTR_SIZE_VER1).
#[repr(C)]
struct SchedAttr {
    size: u32,
    sched_policy: u32,
    sched_flags: u64,
    sched_nice: i32,
    sched_priority: u32,
    sched_runtime: u64,
    sched_deadline: u64,
    sched_period: u64,
    sched_util_min: u32,
    sched_util_max: u32,
}

/// SCHED_OTHER at [`FAULT_PATH_NICE`] with a custom slice of [`FAULT_PATH_SLICE_NS`]. Under
/// EEVDF (Linux >= 6.6) a running task is not preempted at another's wakeup until its slice
/// (about 3 ms on 2 CPUs) is used up, whatever the nice values, unless the woken task asked for
/// a shorter slice (Linux >= 6.12): that is what a thread on a fault's path does here, so it runs
/// at once when its page or request arrives instead of after the bulk thread's slice.
fn set_short_slice() -> std::io::Result<()> {
    let attr = SchedAttr {
        size: std::mem::size_of::<SchedAttr>() as u32,
        sched_policy: libc::SCHED_OTHER as u32,
        sched_flags: 0,
        sched_nice: FAULT_PATH_NICE,
        sched_priority: 0,
        sched_runtime: FAULT_PATH_SLICE_NS,
        sched_deadline: 0,
        sched_period: 0,
        sched_util_min: 0,
        sched_util_max: 0,
    };
    // SAFETY: sched_setattr reads `attr` (its size field says how much) for the calling thread.
    let rc = unsafe { libc::syscall(libc::SYS_sched_setattr, 0, &attr as *const SchedAttr, 0) };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// Raises a process pageserv started whose speed is on the fault path (`criu dump`'s page
/// server) if this process is real-time. Its own children start at the normal policy.
pub fn raise_child(pid: u32) {
    raise_if_realtime(pid as libc::pid_t, || format!("process {pid}"));
}

fn raise_if_realtime(pid: libc::pid_t, what: impl FnOnce() -> String) {
    if !realtime() {
        return;
    }
    if let Err(e) = set_fifo(pid, &what()) {
        tracing::warn!("{e}");
    }
}

fn set_fifo(pid: libc::pid_t, what: &str) -> Result<(), SchedError> {
    let param = libc::sched_param {
        sched_priority: PRIORITY,
    };
    // SAFETY: sched_setscheduler reads `param` and touches no memory of ours otherwise.
    let rc = unsafe {
        libc::sched_setscheduler(pid, libc::SCHED_FIFO | libc::SCHED_RESET_ON_FORK, &param)
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(SchedError {
            what: what.to_string(),
            source: std::io::Error::last_os_error(),
        })
    }
}

/// The calling thread's policy, without the reset-on-fork flag.
pub fn this_thread_policy() -> i32 {
    // SAFETY: no arguments but the calling thread's id.
    unsafe { libc::sched_getscheduler(0) & !libc::SCHED_RESET_ON_FORK }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The kernel takes the short slice (Linux >= 6.12, as root) and shows it in the thread's
    /// sched file.
    #[test]
    fn a_fault_path_thread_gets_its_short_slice() {
        let got = std::thread::spawn(|| {
            set_short_slice()
                .map(|()| std::fs::read_to_string("/proc/thread-self/sched").unwrap_or_default())
        })
        .join()
        .expect("thread");
        match got {
            Ok(text) => {
                let slice = text
                    .lines()
                    .find(|l| l.starts_with("se.slice"))
                    .and_then(|l| l.split(':').nth(1))
                    .map(|v| v.trim().to_string());
                assert_eq!(slice.as_deref(), Some("100000"), "{text}");
            }
            Err(e) => eprintln!("skipped: sched_setattr refused here: {e}"),
        }
    }

    /// Needs CAP_SYS_NICE (CI runs as root); skipped where the policy is not allowed.
    #[test]
    fn threads_follow_and_children_start_normal() {
        if enable_realtime().is_err() {
            eprintln!("skipped: SCHED_FIFO not permitted here");
            return;
        }
        assert_eq!(this_thread_policy(), libc::SCHED_FIFO);
        // The kernel resets a new thread; raise_this_thread brings it back.
        let plain = std::thread::spawn(this_thread_policy).join().ok();
        assert_eq!(plain, Some(libc::SCHED_OTHER));
        let raised = std::thread::spawn(|| {
            raise_this_thread();
            this_thread_policy()
        })
        .join()
        .ok();
        assert_eq!(raised, Some(libc::SCHED_FIFO));
        // A child process starts at the normal policy.
        let child = std::process::Command::new("sh")
            .args(["-c", "chrt -p $$"])
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).into_owned());
        assert!(
            matches!(&child, Ok(t) if t.contains("SCHED_OTHER")),
            "child: {child:?}"
        );
        // Back to normal, so other tests in this process are not affected.
        let param = libc::sched_param { sched_priority: 0 };
        // SAFETY: as in set_fifo.
        unsafe { libc::sched_setscheduler(0, libc::SCHED_OTHER, &param) };
        REALTIME.store(false, Ordering::Relaxed);
    }
}
