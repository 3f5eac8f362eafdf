//! The async runtime a service runs on, and the one way code on it may block.
//!
//! A process that carries one migration (`pageserv src`, a `pageserv dst` that takes one at a
//! time) runs on a **current-thread** runtime ([`Flavor::OneThread`]): the push connection's
//! endpoint and connection drivers and the tasks that read and write its streams take turns on
//! one thread, so each hop between them (a datagram handed from the endpoint to its connection,
//! stream data to its reader, a write to the driver) is a function call instead of a wakeup of
//! another thread. The fault lane ([`crate::fault_lane`], with dst's fault loop), the source's
//! readers and the blocking pool keep threads of their own. Measured on this project's 2-core VM
//! (session 23, `pageserv-lab quinn-bulk`, 512 MiB, cubic, 2 runs each): 710-792 MiB/s over the
//! bare veth on one thread against 511-589 MiB/s on tokio's two workers, and at 1 Gbit/s (tbf)
//! 38-39% / 34% of a core (sender / receiver) against 43-50% / 46-53%; in the bench a 1 GiB
//! post-copy at 1 Gbit/s cost the source 12% and dst 10% less CPU, stop-and-copy 19% and 7%
//! (README, "One thread for one migration").
//!
//! A `pageserv dst` that takes several migrations at once (`--max-migrations N`, N > 1, or
//! `--keep-serving` with `--max-concurrent` above 1) runs on a **multi-thread** runtime
//! ([`Flavor::PerCore`], one worker per core), so that its connections decrypt and place in
//! parallel on a host with the cores for it.
//!
//! Invariant: nothing calls `tokio::task::block_in_place` directly (it panics on a
//! current-thread runtime); code that must block briefly goes through [`blocking`].

use tokio::runtime::{Builder, Handle, Runtime, RuntimeFlavor};

/// How many threads a service's runtime drives its tasks on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Flavor {
    /// One thread: a process that carries one migration at a time.
    OneThread,
    /// One worker per core: a dst that carries several migrations at once.
    PerCore,
}

impl Flavor {
    /// The flavor for a process that carries at most `at_once` migrations at the same time.
    pub fn for_migrations_at_once(at_once: u64) -> Self {
        if at_once <= 1 {
            Flavor::OneThread
        } else {
            Flavor::PerCore
        }
    }
}

/// Builds the runtime. Every thread it starts (multi-thread workers, the blocking pool) raises
/// itself first when the process is real-time ([`crate::sched::raise_this_thread`]); a
/// current-thread runtime runs on the caller's thread, which `--realtime` raised already.
pub fn build(flavor: Flavor) -> std::io::Result<Runtime> {
    let mut builder = match flavor {
        Flavor::OneThread => Builder::new_current_thread(),
        Flavor::PerCore => Builder::new_multi_thread(),
    };
    builder
        .enable_all()
        .on_thread_start(crate::sched::raise_this_thread)
        .build()
}

/// Runs `f`, which may block briefly (a bounded queue, a page store write, reading a task's
/// pagemap): through `block_in_place` on a multi-thread runtime, so that the worker's other tasks
/// move to another worker; directly on a current-thread runtime (the fault lane, a one-migration
/// service), where `block_in_place` is not allowed and the thread has nothing else to run in
/// the meantime that `f` does not also wait for; directly outside any runtime.
pub fn blocking<R>(f: impl FnOnce() -> R) -> R {
    match Handle::try_current().map(|h| h.runtime_flavor()) {
        Ok(RuntimeFlavor::MultiThread) => tokio::task::block_in_place(f),
        _ => f(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_migration_at_a_time_runs_on_one_thread() {
        assert_eq!(Flavor::for_migrations_at_once(0), Flavor::OneThread);
        assert_eq!(Flavor::for_migrations_at_once(1), Flavor::OneThread);
        assert_eq!(Flavor::for_migrations_at_once(2), Flavor::PerCore);
        assert_eq!(Flavor::for_migrations_at_once(16), Flavor::PerCore);
    }

    #[test]
    fn the_flavors_build_what_they_say() {
        for (flavor, want) in [
            (Flavor::OneThread, RuntimeFlavor::CurrentThread),
            (Flavor::PerCore, RuntimeFlavor::MultiThread),
        ] {
            let rt = build(flavor).expect("runtime");
            let got = rt.block_on(async { Handle::current().runtime_flavor() });
            assert_eq!(got, want, "{flavor:?}");
        }
    }

    #[test]
    fn blocking_runs_on_either_flavor_and_outside_one() {
        assert_eq!(blocking(|| 1), 1);
        for flavor in [Flavor::OneThread, Flavor::PerCore] {
            let rt = build(flavor).expect("runtime");
            // On a current-thread runtime `block_in_place` would panic here.
            assert_eq!(rt.block_on(async { blocking(|| 2) }), 2, "{flavor:?}");
        }
    }
}
