//! dst's fault requests to the source, written on the fault lane ([`crate::fault_lane`]).
//!
//! The fault loop's requests reach the writer straight from its outbound bridge, in the order
//! the thread raised them, without passing through the migration's task on the busy main
//! runtime. What the writer does with a request depends on the link, which the migration's
//! post-copy loop ([`crate::dst::post_copy`]) tells it:
//!
//! - live: send it on the link's fault stream;
//! - void (the link is down, or a resume is answered but the fault loop has not yet listed what
//!   is open): drop it, since the fault loop's resume answer lists every open request;
//! - queue (the fault loop has listed what is open, the new fault connection is not there yet):
//!   keep it, and send it after that list once the new link is live.
//!
//! [`Gate`] is that rule, pure; [`spawn`] is the thin writer around it.
//!
//! A request's pages that were pushed and are already at dst, not placed yet
//! ([`crate::dst::push_queue`]), never reach this writer: the fault loop takes them itself
//! ([`crate::dst::uffd_loop::HeldPages`]) and asks only for the rest.

use std::sync::{Arc, Mutex};
use std::time::Instant;

use tokio::sync::mpsc;

use crate::dst::answer_watch::AnswerWatch;
use crate::pages::PidRange;
use crate::transport::FrameSender;
use crate::wire::Frame;

/// What the writer is told, in order.
pub(crate) enum Cmd {
    /// The fault loop asks for these pages.
    Fault(PidRange),
    /// The fault loop has listed the open requests for a resume: keep new ones until the link.
    Queue,
    /// The link is down: drop requests (the resume answer lists them).
    Void,
    /// A live link: send `again` and the queued requests on `tx`, then every new one.
    Link {
        tx: FrameSender,
        again: Vec<PidRange>,
    },
}

/// The writer's rule: where a request goes.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Gate {
    Live,
    Queue(Vec<PidRange>),
    Void,
}

impl Gate {
    /// Before the first link, requests wait for it.
    pub(crate) fn new() -> Self {
        Gate::Queue(Vec::new())
    }

    /// A request: `Some` if it is to be sent now.
    pub(crate) fn fault(&mut self, r: PidRange) -> Option<PidRange> {
        match self {
            Gate::Live => Some(r),
            Gate::Queue(q) => {
                q.push(r);
                None
            }
            Gate::Void => None,
        }
    }

    /// The open requests are listed: only a void gate starts queueing (a live one keeps
    /// sending, a queueing one keeps its queue).
    pub(crate) fn queue(&mut self) {
        if *self == Gate::Void {
            *self = Gate::Queue(Vec::new());
        }
    }

    pub(crate) fn void(&mut self) {
        *self = Gate::Void;
    }

    /// A live link: what to send on it first (`again`, then what was queued).
    pub(crate) fn link(&mut self, again: Vec<PidRange>) -> Vec<PidRange> {
        let queued = match std::mem::replace(self, Gate::Live) {
            Gate::Queue(q) => q,
            _ => Vec::new(),
        };
        again.into_iter().chain(queued).collect()
    }
}

/// Starts the writer on the fault lane; it ends when every sender is dropped. Each request sent
/// on a live link is recorded in `answers` (and forgotten there when the link goes).
pub(crate) fn spawn(answers: Arc<Mutex<AnswerWatch>>) -> mpsc::UnboundedSender<Cmd> {
    let (tx, mut rx) = mpsc::unbounded_channel::<Cmd>();
    crate::fault_lane::spawn(async move {
        let mut gate = Gate::new();
        let mut stream: Option<FrameSender> = None;
        while let Some(cmd) = rx.recv().await {
            match cmd {
                Cmd::Fault(r) => {
                    if let (Some(r), Some(s)) = (gate.fault(r), stream.as_mut()) {
                        request(s, r, &answers).await;
                    }
                }
                Cmd::Queue => gate.queue(),
                Cmd::Void => {
                    gate.void();
                    stream = None;
                    if let Ok(mut w) = answers.lock() {
                        w.link_down();
                    }
                }
                Cmd::Link { mut tx, again } => {
                    let first = gate.link(again);
                    let n = first.len();
                    if let Ok(mut w) = answers.lock() {
                        w.link_down();
                    }
                    for r in first {
                        request(&mut tx, r, &answers).await;
                    }
                    if n > 0 {
                        tracing::info!(requests = n, "fault requests sent on the new link");
                    }
                    stream = Some(tx);
                }
            }
        }
    });
    tx
}

/// Asks the source for pages. A dead link's readers report the failure, and every open request
/// is sent again after a resume, so a failed send is not an error here.
async fn request(tx: &mut FrameSender, r: PidRange, answers: &Mutex<AnswerWatch>) {
    if let Ok(mut w) = answers.lock() {
        w.sent(r.pid, r.start(), Instant::now());
    }
    // A request covers one faulting page and its read-ahead: far below u32::MAX pages.
    let req = Frame::PageRequest {
        pid: r.pid,
        vaddr: r.start(),
        nr_pages: r.wire_pages().unwrap_or(u32::MAX),
    };
    if let Err(e) = tx.send(&req).await {
        tracing::debug!("fault request not sent: {e}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn r(i: u64) -> PidRange {
        PidRange::new(1, 0x1000 * i, 1)
    }

    #[derive(Debug, Clone)]
    enum Op {
        Fault,
        Queue,
        Void,
        Link(usize),
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            4 => Just(Op::Fault),
            1 => Just(Op::Queue),
            1 => Just(Op::Void),
            1 => (0usize..3).prop_map(Op::Link),
        ]
    }

    proptest! {
        /// Every request raised while live or queueing is sent exactly once, in order, with a
        /// link's `again` list before the queued ones; a void gate drops (the resume answer
        /// lists those).
        #[test]
        fn requests_are_sent_once_in_order(ops in prop::collection::vec(op(), 0..60)) {
            let mut gate = Gate::new();
            let mut next = 0u64;
            let mut sent = Vec::new();
            // The model: what must be sent, in order, by the end.
            let mut expect = Vec::new();
            let mut model_queue: Option<Vec<PidRange>> = Some(Vec::new());
            let mut live = false;
            for o in ops {
                match o {
                    Op::Fault => {
                        next += 1;
                        if let Some(x) = gate.fault(r(next)) {
                            sent.push(x);
                        }
                        if live {
                            expect.push(r(next));
                        } else if let Some(q) = model_queue.as_mut() {
                            q.push(r(next));
                        }
                    }
                    Op::Queue => {
                        gate.queue();
                        if !live && model_queue.is_none() {
                            model_queue = Some(Vec::new());
                        }
                    }
                    Op::Void => {
                        gate.void();
                        live = false;
                        model_queue = None;
                    }
                    Op::Link(k) => {
                        let again: Vec<PidRange> =
                            (0..k as u64).map(|i| PidRange::new(2, 0x1000 * i, 1)).collect();
                        expect.extend(again.iter().copied());
                        expect.extend(model_queue.take().unwrap_or_default());
                        sent.extend(gate.link(again));
                        live = true;
                    }
                }
            }
            prop_assert_eq!(sent, expect);
        }
    }

    #[test]
    fn queue_after_live_keeps_sending() {
        let mut g = Gate::new();
        assert!(g.link(vec![]).is_empty());
        g.queue();
        assert_eq!(g.fault(r(1)), Some(r(1)));
    }
}
