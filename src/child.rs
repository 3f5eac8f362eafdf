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
