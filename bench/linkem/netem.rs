//! Probe for the kernel's own emulator: if `tc qdisc ... netem` works, a bench may prefer it.

use std::process::{Command, Stdio};

use anyhow::{Context, Result, bail};
use nix::sched::{CloneFlags, unshare};

/// Whether `tc qdisc add dev lo root netem` succeeds, tried in a scratch network namespace that
/// vanishes afterwards (so the host's loopback is never touched).
pub fn netem_available() -> Result<bool> {
    let probe = std::thread::Builder::new()
        .name("netem-probe".into())
        .spawn(|| -> Result<bool> {
            // The thread gets a fresh namespace of its own; `tc`, spawned from this thread,
            // inherits it, and both go away when they end.
            unshare(CloneFlags::CLONE_NEWNET)
                .context("creating a scratch network namespace (needs root)")?;
            let status = Command::new("tc")
                .args(["qdisc", "add", "dev", "lo", "root", "netem", "delay", "1ms"])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
                .context("running `tc` (install iproute2)")?;
            Ok(status.success())
        })
        .context("spawning the netem probe thread")?;
    match probe.join() {
        Ok(result) => result,
        Err(_) => bail!("the netem probe thread panicked"),
    }
}
