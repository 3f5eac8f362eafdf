//! The uffd keeper: a small process holding a copy of every restored task's userfaultfd, so a
//! `pageserv dst` that dies (SIGKILL, OOM, crash) cannot turn missing pages into silent zero
//! pages.
//!
//! When the last reference to a uffd closes, the kernel unregisters its ranges and later faults
//! read zeros (criu-protocols.md §2.9). With the keeper's copy the uffds outlive dst: faulting
//! tasks stay blocked, and the keeper, seeing dst's end of their shared socket close without a
//! release, SIGKILLs every restored task (pinned by pidfd) and waits for them to die before its
//! own copies close. dst releases it only once every lazy page is in place.
//!
//! Messages on the socket (fd 3 in the keeper): a 4-byte host pid (native order) with the task's
//! uffd attached; pid 0 means "the memory is whole: let go".

use std::io::Write;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use crate::criu::binary::pass_fds;
use crate::dst::uffd_loop::kill::{Process, wait_exited};
use crate::fdpass;

const CTL_FD: i32 = 3;

/// dst's handle on its keeper.
#[derive(Debug)]
pub struct UffdKeeper {
    ctl: UnixStream,
    child: Child,
}

impl UffdKeeper {
    /// Starts `exe keep-uffds`, in its own session so signals to dst's group do not reach it.
    pub fn spawn(exe: &Path) -> std::io::Result<Self> {
        let (ours, theirs) = UnixStream::pair()?;
        let theirs = OwnedFd::from(theirs);
        let mut cmd = Command::new(exe);
        cmd.arg("keep-uffds")
            .env(crate::child::INTERNAL_ENV, "1")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            // Holding dst's stderr would keep a caller's pipe open after dst exits.
            .stderr(Stdio::null());
        pass_fds(&mut cmd, &[(&theirs, CTL_FD)]);
        // SAFETY: setsid is async-signal-safe.
        unsafe {
            std::os::unix::process::CommandExt::pre_exec(&mut cmd, || {
                libc::setsid();
                Ok(())
            });
        }
        let child = cmd.spawn()?;
        tracing::info!(pid = child.id(), "uffd keeper started");
        Ok(UffdKeeper { ctl: ours, child })
    }

    /// Hands the keeper a copy of `uffd`, owned by host process `host_pid`. Call it before the
    /// task can run.
    pub fn hold(&self, host_pid: i32, uffd: BorrowedFd<'_>) -> std::io::Result<()> {
        fdpass::send_fd(&self.ctl, &host_pid.to_ne_bytes(), uffd.as_raw_fd())
    }

    /// Every lazy page is in place: the keeper drops its copies and exits (waited for, so no
    /// stale uffd copy outlives this call and leaves a later fault unanswered).
    pub fn release(mut self) {
        if let Err(e) = (&self.ctl).write_all(&0i32.to_ne_bytes()) {
            tracing::warn!("cannot release the uffd keeper: {e}");
        }
        let _ = crate::child::wait_timeout(&mut self.child, Duration::from_secs(10));
    }
}

struct KeptUffd {
    task: Process,
    _uffd: OwnedFd,
}

/// The keeper process (`pageserv keep-uffds`).
pub fn keeper_main() -> std::io::Result<()> {
    // SAFETY: dst passed this descriptor to us; nothing else in this process owns it.
    let ctl = unsafe { UnixStream::from_raw_fd(CTL_FD) };
    let mut held: Vec<KeptUffd> = Vec::new();
    loop {
        let mut b = [0u8; 4];
        let (n, fd) = match fdpass::recv_fd(&ctl, &mut b) {
            Ok(x) => x,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(_) => (0, None),
        };
        if n < 4 {
            break;
        }
        let pid = i32::from_ne_bytes(b);
        if pid == 0 {
            return Ok(());
        }
        let Some(uffd) = fd else { continue };
        let task = match Process::open(pid) {
            Ok(t) => t,
            Err(e) => {
                tracing::warn!(pid, "cannot pin restored task: {e}");
                continue;
            }
        };
        held.push(KeptUffd { task, _uffd: uffd });
    }
    if held.is_empty() {
        return Ok(());
    }
    tracing::warn!(
        tasks = held.len(),
        "pageserv dst ended before the memory was whole: killing the restored tasks"
    );
    for h in &held {
        if let Err(e) = h.task.kill() {
            tracing::error!(pid = h.task.pid, "cannot kill restored task: {e}");
        }
    }
    // A pidfd turns readable when its process has exited; only then may the uffds close.
    let tasks: Vec<&Process> = held.iter().map(|h| &h.task).collect();
    for pid in wait_exited(&tasks, Duration::from_secs(10)) {
        tracing::error!(pid, "restored task did not die within 10 s");
    }
    Ok(())
}
