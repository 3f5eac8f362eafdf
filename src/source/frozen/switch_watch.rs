//! Whether a frozen thread has been put on a CPU since it was watched, read from memory, with
//! no system call: the check after every read of frozen memory ([`super::tasks`]).
//!
//! A watch is a perf event on one thread (`perf_event_open(2)`, pid = the thread, any CPU):
//! the software dummy event with `context_switch` set, whose only output is a
//! `PERF_RECORD_SWITCH` record written into the event's ring buffer each time the thread is
//! switched in or out. The kernel writes the switch-in record in `finish_task_switch()`
//! (`perf_event_task_sched_in()` -> `perf_event_switch()`), before the thread returns to user
//! mode or does any work in the kernel on its own behalf. A ptrace-stopped thread is never
//! switched in until its tracer releases it or SIGKILL wakes it, so the ring buffer's
//! `data_head` (in the mapped control page, at byte 1024 of `struct perf_event_mmap_page`)
//! stays 0 exactly as long as the thread has not run since the watch was opened.
//!
//! Invariants:
//! - A watch is opened before the thread is verified stopped ([`super::tasks`] opens it first),
//!   so any run after that verification moves `data_head`.
//! - `data_head` never goes back: the buffer is mapped read-only (the kernel's overwrite mode,
//!   no reader position to keep), and a run records at least one switch, lost or not (a full
//!   buffer still counts its lost records and moves the head).
//! - Ordering (x86-64, the architecture pageserv is built and tested for): stores become
//!   visible to other CPUs in program order, and the switch-in record is stored before the
//!   thread executes anything of its own; so a reader whose process_vm_readv saw a store the
//!   thread made after it ran then loads a non-zero `data_head` ([`SwitchWatch::ran`] fences
//!   before its Acquire load, so the load is not hoisted above the read).
//!
//! Cost: one descriptor and a two-page mapping (charged to the locked-memory limit of a user
//! without CAP_IPC_LOCK) per watched thread. Where the kernel refuses the event (no
//! CONFIG_PERF_EVENTS, `perf_event_paranoid` for an unprivileged user, a seccomp filter),
//! [`SwitchWatch::open`] returns the error and the caller keeps its `/proc` checks.

use std::os::fd::{FromRawFd, OwnedFd};
use std::ptr::NonNull;
use std::sync::atomic::{AtomicU64, Ordering, fence};

/// `struct perf_event_attr` up to `PERF_ATTR_SIZE_VER5` (112 bytes); the fields this module
/// does not set are zero.
#[repr(C)]
#[derive(Default)]
struct PerfEventAttr {
    kind: u32,
    size: u32,
    config: u64,
    sample_period: u64,
    sample_type: u64,
    read_format: u64,
    flags: u64,
    wakeup_events: u32,
    bp_type: u32,
    config1: u64,
    config2: u64,
    branch_sample_type: u64,
    sample_regs_user: u64,
    sample_stack_user: u32,
    clockid: i32,
    sample_regs_intr: u64,
    aux_watermark: u32,
    sample_max_stack: u16,
    reserved: u16,
}

const PERF_TYPE_SOFTWARE: u32 = 1;
const PERF_COUNT_SW_DUMMY: u64 = 9;
/// `perf_event_attr.context_switch`, bit 26 of the flags word.
const FLAG_CONTEXT_SWITCH: u64 = 1 << 26;
const PERF_FLAG_FD_CLOEXEC: libc::c_ulong = 1 << 3;
/// Byte offset of `data_head` in `struct perf_event_mmap_page`.
const DATA_HEAD: usize = 1024;

/// One watched thread. See the module docs.
#[derive(Debug)]
pub struct SwitchWatch {
    map: NonNull<libc::c_void>,
    len: usize,
    _event: OwnedFd,
}

// SAFETY: the mapping is only read, through an atomic load, and unmapped once in Drop.
unsafe impl Send for SwitchWatch {}
// SAFETY: as above; concurrent readers only load.
unsafe impl Sync for SwitchWatch {}

impl SwitchWatch {
    /// Starts watching thread `tid` (a host tid).
    pub fn open(tid: i32) -> std::io::Result<Self> {
        let attr = PerfEventAttr {
            kind: PERF_TYPE_SOFTWARE,
            size: std::mem::size_of::<PerfEventAttr>() as u32,
            config: PERF_COUNT_SW_DUMMY,
            flags: FLAG_CONTEXT_SWITCH,
            ..PerfEventAttr::default()
        };
        // SAFETY: perf_event_open reads `attr` (size given inside it) and returns a new
        // descriptor or -1; pid = tid, cpu = -1 (any), no group.
        let fd = unsafe {
            libc::syscall(
                libc::SYS_perf_event_open,
                &attr as *const PerfEventAttr,
                tid as libc::pid_t,
                -1 as libc::c_int,
                -1 as libc::c_int,
                PERF_FLAG_FD_CLOEXEC,
            )
        };
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        // SAFETY: the kernel just returned this descriptor; nothing else owns it.
        let event = unsafe { OwnedFd::from_raw_fd(fd as i32) };
        let page = nix::unistd::sysconf(nix::unistd::SysconfVar::PAGE_SIZE)
            .ok()
            .flatten()
            .unwrap_or(4096) as usize;
        // The control page and one data page (the data part must be 2^n pages).
        let len = 2 * page;
        // SAFETY: a fresh shared read-only mapping of the event's ring buffer at offset 0.
        let map = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ,
                libc::MAP_SHARED,
                fd as i32,
                0,
            )
        };
        if map == libc::MAP_FAILED {
            return Err(std::io::Error::last_os_error());
        }
        let map = NonNull::new(map).ok_or_else(|| std::io::Error::other("mmap returned null"))?;
        Ok(SwitchWatch {
            map,
            len,
            _event: event,
        })
    }

    /// True once the thread has been switched in (or out) since [`SwitchWatch::open`].
    pub fn ran(&self) -> bool {
        fence(Ordering::SeqCst);
        // SAFETY: DATA_HEAD + 8 is inside the mapped control page, 8-byte aligned (the mapping
        // is page-aligned); the kernel updates it, so it is read as an atomic.
        let head = unsafe { &*(self.map.as_ptr().cast::<u8>().add(DATA_HEAD) as *const AtomicU64) };
        head.load(Ordering::Acquire) != 0
    }
}

impl Drop for SwitchWatch {
    fn drop(&mut self) {
        // SAFETY: the mapping made in open, unmapped once; the descriptor closes after it.
        unsafe {
            libc::munmap(self.map.as_ptr(), self.len);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::{Duration, Instant};

    #[test]
    fn attr_is_the_kernels_version_5_size() {
        assert_eq!(std::mem::size_of::<PerfEventAttr>(), 112);
    }

    /// A real child: stopped, the watch stays 0 however long it waits; released, it moves.
    #[test]
    fn a_stopped_thread_reads_not_run_until_it_runs() {
        use nix::sys::signal::{Signal, kill};
        use nix::sys::wait::{WaitPidFlag, waitpid};
        let mut child = std::process::Command::new("sleep")
            .arg("30")
            .spawn()
            .expect("spawning sleep");
        let pid = nix::unistd::Pid::from_raw(child.id() as i32);
        kill(pid, Signal::SIGSTOP).expect("SIGSTOP the child");
        waitpid(pid, Some(WaitPidFlag::WUNTRACED)).expect("child stopped");
        let watch = match SwitchWatch::open(pid.as_raw()) {
            Ok(w) => w,
            Err(e) => {
                let _ = child.kill();
                let _ = child.wait();
                // Kernels or sandboxes without perf events: the caller's /proc check covers
                // them; nothing to test here.
                eprintln!("perf events unavailable here ({e}); skipping");
                return;
            }
        };
        std::thread::sleep(Duration::from_millis(200));
        assert!(!watch.ran(), "a stopped thread does not run");
        kill(pid, Signal::SIGCONT).expect("SIGCONT the child");
        let deadline = Instant::now() + Duration::from_secs(10);
        while !watch.ran() {
            assert!(Instant::now() < deadline, "the released child never ran");
            std::thread::sleep(Duration::from_millis(5));
        }
        let _ = child.kill();
        let _ = child.wait();
        assert!(watch.ran(), "the head never goes back");
    }
}
