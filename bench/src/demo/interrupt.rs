//! Ctrl-C during the demo: end what the demo started, remove its namespace, then exit.
//!
//! The signal handler only sets a flag (all it may safely do); a watcher thread does the
//! cleanup. Signal masks stay as they are, so the services the demo started still see Ctrl-C
//! themselves.

use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

static INTERRUPTED: AtomicBool = AtomicBool::new(false);
static STARTED: Mutex<Vec<i32>> = Mutex::new(Vec::new());
static TESTBED: Mutex<Option<(String, String)>> = Mutex::new(None);

extern "C" fn on_signal(_: libc::c_int) {
    INTERRUPTED.store(true, Ordering::SeqCst);
}

/// Installs the handlers and the watcher thread.
pub fn install() {
    use nix::sys::signal::{SaFlags, SigAction, SigHandler, SigSet, Signal, sigaction};
    let action = SigAction::new(
        SigHandler::Handler(on_signal),
        SaFlags::empty(),
        SigSet::empty(),
    );
    for sig in [Signal::SIGINT, Signal::SIGTERM] {
        // SAFETY: the handler only stores to an atomic, which is async-signal-safe.
        if let Err(e) = unsafe { sigaction(sig, &action) } {
            tracing::warn!("cannot catch {sig}: Ctrl-C will not clean up ({e})");
        }
    }
    let _ = std::thread::Builder::new()
        .name("demo-interrupt".into())
        .spawn(|| {
            while !INTERRUPTED.load(Ordering::SeqCst) {
                std::thread::sleep(Duration::from_millis(100));
            }
            eprintln!("\ninterrupted: ending the demo's processes and removing its namespace");
            cleanup();
            std::process::exit(130);
        });
}

/// Records a process the demo started (ended on interrupt).
pub fn started(pid: i32) {
    if let Ok(mut v) = STARTED.lock() {
        v.push(pid);
    }
}

/// Records the testbed's namespace and host interface (removed on interrupt).
pub fn testbed(netns: &str, host_if: &str) {
    if let Ok(mut t) = TESTBED.lock() {
        *t = Some((netns.to_string(), host_if.to_string()));
    }
}

fn cleanup() {
    use nix::sys::signal::{Signal, kill};
    use nix::unistd::Pid;
    let pids = STARTED.lock().map(|v| v.clone()).unwrap_or_default();
    for &pid in pids.iter().rev() {
        let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
    }
    if let Ok(Some((netns, host_if))) = TESTBED.lock().map(|t| t.clone()) {
        let _ = std::process::Command::new("ip")
            .args(["link", "del", &host_if])
            .status();
        let _ = std::process::Command::new("ip")
            .args(["netns", "del", &netns])
            .status();
    }
}
