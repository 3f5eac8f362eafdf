//! Child processes the services start (CRIU, keepers): waiting for one with a deadline, and
//! the mark of pageserv's own helper processes.

use std::process::{Child, ExitStatus};
use std::time::{Duration, Instant};

/// Waits up to `timeout` for `child` to exit; past it, kills and reaps it and returns `None`.
pub fn wait_timeout(child: &mut Child, timeout: Duration) -> std::io::Result<Option<ExitStatus>> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(s) = child.try_wait()? {
            return Ok(Some(s));
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            return Ok(None);
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// [`wait_timeout`] that also returns the child's resource usage (`wait4(2)`: its CPU time and
/// peak RSS, with those of the children it waited for). `child` must not have been waited for.
/// After `Some`, the child is reaped: `child` must not be waited for or killed again.
pub fn wait_timeout_usage(
    child: &mut Child,
    timeout: Duration,
) -> std::io::Result<Option<(ExitStatus, crate::usage::Rusage)>> {
    use std::os::unix::process::ExitStatusExt;
    let pid = libc::pid_t::try_from(child.id())
        .map_err(|_| std::io::Error::other(format!("child pid {} out of range", child.id())))?;
    let deadline = Instant::now() + timeout;
    loop {
        let mut status: libc::c_int = 0;
        let mut ru = std::mem::MaybeUninit::<libc::rusage>::zeroed();
        // SAFETY: wait4 writes an int and a whole `struct rusage` into the pointers given.
        let rc = unsafe { libc::wait4(pid, &mut status, libc::WNOHANG, ru.as_mut_ptr()) };
        if rc == pid {
            // SAFETY: zero-initialised, then filled by the kernel.
            let usage = crate::usage::Rusage::from_raw(unsafe { ru.assume_init_ref() });
            return Ok(Some((ExitStatus::from_raw(status), usage)));
        }
        if rc < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() != std::io::ErrorKind::Interrupted {
                return Err(std::io::Error::new(
                    e.kind(),
                    format!("waiting for child {pid}: {e}"),
                ));
            }
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            return Ok(None);
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Set (to "1") in the environment of the helper processes pageserv starts itself (`keep-dump`,
/// `keep-uffds`); those subcommands refuse to run without it, so they are not a user surface.
pub const INTERNAL_ENV: &str = "PAGESERV_INTERNAL_HELPER";

/// Whether this process was started by pageserv as one of its helpers.
pub fn started_as_helper() -> bool {
    std::env::var_os(INTERNAL_ENV).is_some_and(|v| v == "1")
}

/// Set (to "1") by pageserv's lab (`pageserv demo`, `pageserv bench`, the tests) for the
/// `pageserv` it runs: only then does `pageserv src` take its measurement knobs (`--no-push`,
/// `--push-after`, `--verify-served`), which are not for operating a migration.
pub const LAB_ENV: &str = "PAGESERV_LAB";

/// Whether this process was started by pageserv's lab.
pub fn started_by_lab() -> bool {
    std::env::var_os(LAB_ENV).is_some_and(|v| v == "1")
}
