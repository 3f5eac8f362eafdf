//! The fault loop runs on the fault lane, beside the fault stream's reader that feeds it: a
//! sender there that finds the loop's urgent queue full must wait without blocking the lane's
//! thread, or the loop it waits for could never run.

use std::sync::Arc;
use std::time::Duration;

use pageserv::dst::uffd_loop::{self, Inbound, LoopError, UffdStats};

#[test]
fn a_lane_task_facing_a_full_urgent_queue_does_not_block_the_loop() {
    let (out_tx, _out_rx) = crossbeam_channel::unbounded();
    let handle = uffd_loop::spawn(out_tx, Arc::new(UffdStats::default())).expect("fault loop");
    let sender = handle.sender();
    // Four times what the urgent queue holds, sent from a task on the lane, as fast as it can:
    // the queue fills while the loop, on the same thread, has not run yet.
    let n = 4 * pageserv::limits::URGENT_QUEUE;
    let sent = pageserv::fault_lane::spawn(async move {
        for pid in 1..=n {
            sender
                .send_async(Inbound::Zombie { pid: pid as i32 })
                .await?;
        }
        Ok::<usize, LoopError>(n)
    });
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let done = rt.block_on(async { tokio::time::timeout(Duration::from_secs(20), sent).await });
    let sent = done
        .expect("the lane task is stuck: a full urgent queue blocked the lane the loop runs on")
        .expect("lane task")
        .expect("the fault loop took every message");
    assert_eq!(sent, n);
    let report = handle.shutdown(false).expect("shutdown report");
    assert!(report.incomplete.is_empty(), "{report:?}");
}
