//! The fault lane: one thread per process, at a raised priority, running a current-thread tokio
//! runtime that carries everything on a fault's path and nothing else: the fault connection's
//! QUIC endpoint and connection drivers (through [`LaneRuntime`]), the fault stream's reader and
//! writer, the source's serving core.
//!
//! Why a lane of its own: the bulk push keeps the main runtime busy, decrypting, encrypting and
//! copying. A task there that another thread wakes (the uffd thread, as it was then, asking for
//! a page, a reader thread that read one) goes to the runtime's injection queue, which a busy
//! thread looks at only every few dozen task polls: that wait, one per hop, was most of a fault's
//! p99 during the push (measured on the multi-thread runtime; a one-migration service's main
//! runtime is now current-thread, [`crate::async_runtime`], which polls its injection queue the
//! same way).
//! The lane is idle between faults, so its thread sleeps in epoll and a wakeup runs at once; its
//! priority lets it preempt the bulk threads on a full core ([`crate::sched::favour_this_thread`]).
//!
//! At dst the fault loop ([`crate::dst::uffd_loop`]) runs here too, as a task: a fault's request
//! and its answer then cross no thread at dst. It places the push's pages as well, but in
//! rounds of at most 256 KiB or 150 us with a yield between them, so a fault answer or a
//! datagram waits at most one such piece (as it did on the loop's own thread).
//!
//! Invariants: the lane never reads bulk data (a push stream, image files, CRIU's in-order page
//! server queue), and places it only in the fault loop's bounded pieces; nothing on it blocks
//! (no `block_in_place`: the runtime is current-thread; what waits long, such as the fault
//! loop's shutdown, goes to the lane's blocking pool).

use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, OnceLock};
use std::time::Instant;

use tokio::runtime::Handle;

/// The process's fault lane, started on first use.
pub fn handle() -> &'static Handle {
    &lane().0
}

/// Whether the lane runs on a thread of its own (false only if that thread could not start,
/// when its work shares the caller's runtime). dst's fault loop needs it: on a shared runtime a
/// blocking sender to the loop could wait for a loop that cannot run.
pub fn has_thread() -> bool {
    lane().1
}

thread_local! {
    static ON_LANE: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Whether the calling thread is the fault lane's: code that may block checks it.
pub fn on_lane() -> bool {
    ON_LANE.get()
}

fn lane() -> &'static (Handle, bool) {
    static LANE: OnceLock<(Handle, bool)> = OnceLock::new();
    LANE.get_or_init(|| match start() {
        Ok(h) => (h, true),
        // Without a thread of its own the lane's work runs on the main runtime: slower faults
        // under load, nothing wrong (dst refuses to start its fault loop there).
        Err(e) => {
            tracing::warn!(
                "cannot start the fault lane thread ({e}); faults share the main runtime"
            );
            (Handle::current(), false)
        }
    })
}

/// Runs `fut` on the fault lane.
pub fn spawn<F>(fut: F) -> tokio::task::JoinHandle<F::Output>
where
    F: Future + Send + 'static,
    F::Output: Send + 'static,
{
    handle().spawn(fut)
}

fn start() -> std::io::Result<Handle> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let handle = rt.handle().clone();
    std::thread::Builder::new()
        .name("ps-fault-lane".into())
        .spawn(move || {
            crate::sched::favour_this_thread();
            ON_LANE.set(true);
            // Runs until the process exits.
            rt.block_on(std::future::pending::<()>());
        })?;
    Ok(handle)
}

/// A quinn runtime whose endpoint and connection drivers, timers and socket live on the fault
/// lane, whoever creates the endpoint or accepts a connection on it.
#[derive(Debug)]
pub struct LaneRuntime;

impl quinn::Runtime for LaneRuntime {
    fn new_timer(&self, t: Instant) -> Pin<Box<dyn quinn::AsyncTimer>> {
        let _in_lane = handle().enter();
        Box::pin(tokio::time::sleep_until(t.into()))
    }

    fn spawn(&self, future: Pin<Box<dyn Future<Output = ()> + Send>>) {
        handle().spawn(future);
    }

    fn wrap_udp_socket(
        &self,
        sock: std::net::UdpSocket,
    ) -> std::io::Result<Arc<dyn quinn::AsyncUdpSocket>> {
        let _in_lane = handle().enter();
        quinn::TokioRuntime.wrap_udp_socket(sock)
    }

    fn now(&self) -> Instant {
        Instant::now()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lane_tasks_run_on_the_lane_thread() {
        let rt = tokio::runtime::Runtime::new().expect("runtime");
        let name = rt.block_on(async {
            spawn(async { std::thread::current().name().map(String::from) })
                .await
                .expect("lane task")
        });
        assert_eq!(name.as_deref(), Some("ps-fault-lane"));
        let on = rt.block_on(async { spawn(async { on_lane() }).await.expect("lane task") });
        assert!(on, "the lane thread knows it is the lane");
        assert!(!on_lane(), "a test thread is not the lane");
    }
}
