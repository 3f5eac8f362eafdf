//! The fault loop runs on the fault lane, beside the fault stream's reader that feeds it: a
//! sender there that finds the loop's urgent queue full must wait without blocking the lane's
//! thread, or the loop it waits for could never run.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use pageserv::dst::uffd_loop::{self, Inbound, LoopError, LoopHandle, UffdStats};
use pageserv::limits::URGENT_QUEUE;

/// Starts a fault loop, runs `task` (given the loop's sender) on the lane, and returns what it
/// returned, or `None` if it did not end within 20 s (the lane is stuck). Shuts the loop down
/// once the task ended.
fn on_the_lane<T, F>(task: impl FnOnce(uffd_loop::LoopSender) -> F) -> Option<T>
where
    T: Send + 'static,
    F: Future<Output = T> + Send + 'static,
{
    let (out_tx, _out_rx) = crossbeam_channel::unbounded();
    let handle: LoopHandle =
        uffd_loop::spawn(out_tx, Arc::new(UffdStats::default())).expect("fault loop");
    let run = pageserv::fault_lane::spawn(task(handle.sender()));
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let out = rt.block_on(async { tokio::time::timeout(Duration::from_secs(20), run).await });
    let out = out.ok().map(|r| r.expect("lane task"));
    if out.is_some() {
        let report = handle.shutdown(false).expect("shutdown report");
        assert!(report.incomplete.is_empty(), "{report:?}");
    }
    out
}

#[test]
fn a_lane_task_facing_a_full_urgent_queue_does_not_block_the_loop() {
    // Four times what the urgent queue holds, sent from a task on the lane, as fast as it can:
    // the queue fills while the loop, on the same thread, has not run yet.
    let n = 4 * URGENT_QUEUE;
    let sent = on_the_lane(move |sender| async move {
        for pid in 1..=n {
            sender
                .send_async(Inbound::Zombie { pid: pid as i32 })
                .await?;
        }
        Ok::<usize, LoopError>(n)
    })
    .expect("the lane task is stuck: a full urgent queue blocked the lane the loop runs on");
    assert_eq!(sent.expect("the fault loop took every message"), n);
}

/// The blocking `send` called on the lane by mistake: a full queue is an error naming the bug,
/// not a lane stuck for good.
#[test]
fn a_blocking_send_on_the_lane_is_refused_when_it_would_block() {
    // The task never yields, so the loop cannot run between the sends: the queue fills.
    let refused_at = on_the_lane(|sender| async move {
        (1..=4 * URGENT_QUEUE)
            .map(|pid| sender.send(Inbound::Zombie { pid: pid as i32 }))
            .position(|r| matches!(r, Err(LoopError::WouldBlockLane)))
    })
    .expect("the lane is stuck: a blocking send on it waited for the loop");
    assert_eq!(refused_at, Some(URGENT_QUEUE));
}
