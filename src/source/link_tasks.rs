//! The writer tasks of one link to dst: the fault server (dst's requests to the pump, the
//! pump's answers back on the fault connection) and the pusher (the pump's background pages on
//! the push stream). They are replaced on a reconnect; the pump and its queues outlive them, and
//! what a dead link's tasks took from the queues and did not deliver is in dst's missing list.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

use anyhow::{Context, Result, bail};
use tokio::sync::mpsc;

use crate::limits::{LimitHit, MAX_OUTSTANDING_FAULT_PAGES};
use crate::source::pre_copy::Validator;
use crate::source::pump::{FaultReply, PumpInput, Served, Tagged, UrgentRequest};
use crate::source::push_plan::RequestRejected;
use crate::source::recovery::DstConnections;
use crate::transport::{self, FrameReceiver, FrameSender};
use crate::wire::{self, Frame};

/// What the link tasks count, across reconnects.
#[derive(Debug, Default)]
pub(super) struct Counters {
    /// Push frames, bytes and zero pages sent.
    pub(super) frames: AtomicU64,
    pub(super) bytes: AtomicU64,
    pub(super) zero_pages: AtomicU64,
    /// Fault request received to its answer handed to QUIC, before and after the first push
    /// frame: the source's share of dst's fault latency (CRIU's answer included).
    pub(super) fault_service_before_push: crate::latency::LatencyHistogram,
    pub(super) fault_service_during_push: crate::latency::LatencyHistogram,
}

/// What the per-link writer tasks share across reconnects: the pump's output queues (a writer
/// holds a queue's lock while it lives), its input, and the counters.
pub(super) struct Writers {
    pub(super) push_rx: Arc<tokio::sync::Mutex<mpsc::Receiver<Tagged<Served>>>>,
    pub(super) reply_rx: Arc<tokio::sync::Mutex<mpsc::UnboundedReceiver<Tagged<FaultReply>>>>,
    pub(super) to_pump: mpsc::UnboundedSender<PumpInput>,
    pub(super) validator: Option<Arc<Validator>>,
    pub(super) counters: Arc<Counters>,
    pub(super) bar: Option<indicatif::ProgressBar>,
}

/// The writer tasks of one link.
pub(super) struct LinkTasks {
    /// `None` once stopped.
    pusher: Option<tokio::task::JoinHandle<Result<()>>>,
    faults: Option<tokio::task::JoinHandle<Result<()>>>,
}

impl Writers {
    /// Opens the push stream on `link` and starts its pusher and fault server for `generation`.
    pub(super) async fn start(
        &self,
        link: &DstConnections,
        fault_stream: (FrameSender, FrameReceiver),
        generation: u64,
    ) -> Result<LinkTasks> {
        let push_send = link
            .conn
            .open_uni()
            .await
            .context("opening the push stream")?;
        push_send.set_priority(transport::PUSH_PRIORITY)?;
        let pusher = tokio::spawn(push_pages(
            FrameSender::new(push_send),
            self.push_rx.clone(),
            generation,
            self.bar.clone(),
            self.validator.clone(),
            self.counters.clone(),
        ));
        // On the fault lane, where the fault connection is driven (crate::fault_lane).
        let faults = crate::fault_lane::spawn(serve_faults(
            fault_stream,
            self.to_pump.clone(),
            self.reply_rx.clone(),
            generation,
            self.validator.clone(),
            self.counters.clone(),
        ));
        Ok(LinkTasks {
            pusher: Some(pusher),
            faults: Some(faults),
        })
    }
}

impl LinkTasks {
    /// The link died: stop writing to it. What was taken from the queues and not delivered is
    /// in dst's missing list when the link comes back.
    pub(super) async fn stop(&mut self) {
        for task in [self.pusher.take(), self.faults.take()]
            .into_iter()
            .flatten()
        {
            task.abort();
            let _ = task.await;
        }
    }

    /// The pump has ended: the pusher drains what is queued and finishes its stream (a stopped
    /// link has nothing to finish).
    pub(super) async fn finish(mut self) -> Result<()> {
        if let Some(f) = self.faults.take() {
            f.abort();
            let _ = f.await;
        }
        match self.pusher.take() {
            Some(p) => p.await.context("the push task panicked")?,
            None => Ok(()),
        }
    }
}

/// Reads dst's fault requests on one link, forwards them to the pump and sends the pump's
/// answers of this link's `generation` (answers fetched for a dead link are dropped: dst asks
/// again).
async fn serve_faults(
    (mut tx, mut rx): (FrameSender, FrameReceiver),
    to_pump: mpsc::UnboundedSender<PumpInput>,
    from_pump: Arc<tokio::sync::Mutex<mpsc::UnboundedReceiver<Tagged<FaultReply>>>>,
    generation: u64,
    validator: Option<Arc<Validator>>,
    counters: Arc<Counters>,
) -> Result<()> {
    // Pages dst asked for on this link and not answered yet: bounded, so a dst that asks without
    // reading the answers (or asks for whole ranges at once) cannot grow this process's memory.
    let outstanding = Arc::new(AtomicU64::new(0));
    let answered = outstanding.clone();
    let reader = async move {
        while let Some(frame) = rx.next().await? {
            match frame {
                Frame::PageRequest {
                    pid,
                    vaddr,
                    nr_pages,
                } => {
                    let open =
                        outstanding.fetch_add(u64::from(nr_pages), Relaxed) + u64::from(nr_pages);
                    if open > MAX_OUTSTANDING_FAULT_PAGES {
                        return Err(LimitHit::fixed(
                            format!(
                                "pages dst asked for on one link and not yet answered (asking \
                                 {nr_pages} pages at {vaddr:#x} of pid {pid})"
                            ),
                            format!("{MAX_OUTSTANDING_FAULT_PAGES} pages"),
                            "an honest dst asks for a faulting page and its read-ahead, once",
                        )
                        .into());
                    }
                    let req = UrgentRequest {
                        pid,
                        vaddr,
                        nr_pages,
                        at: std::time::Instant::now(),
                    };
                    if to_pump.send(PumpInput::Fault(req)).is_err() {
                        break;
                    }
                }
                other => {
                    bail!("dst sent {other:?} on the fault stream; only page requests belong there")
                }
            }
        }
        Ok::<(), anyhow::Error>(())
    };
    let writer = async move {
        let mut from_pump = from_pump.lock().await;
        while let Some((g, reply)) = from_pump.recv().await {
            if g != generation {
                continue;
            }
            let done = match &reply {
                FaultReply::Pages(s, _) => s.data.len() as u64 / crate::pages::PAGE_SIZE,
                FaultReply::Refused { request, .. } => u64::from(request.nr_pages),
            };
            let _ = answered.fetch_update(Relaxed, Relaxed, |v| Some(v.saturating_sub(done)));
            match reply {
                FaultReply::Pages(s, at) => {
                    let (head, tail) = s.split_first_page();
                    send_served(&mut tx, head, validator.as_deref()).await?;
                    let ns = u64::try_from(at.elapsed().as_nanos()).unwrap_or(u64::MAX);
                    if let Some(tail) = tail {
                        send_served(&mut tx, tail, validator.as_deref()).await?;
                    }
                    if counters.frames.load(Relaxed) == 0 {
                        counters.fault_service_before_push.record(ns);
                    } else {
                        counters.fault_service_during_push.record(ns);
                    }
                }
                FaultReply::Refused { request, why } => {
                    tracing::warn!(%why, "refused a fault request");
                    let reason = match why {
                        RequestRejected::UnknownPid(_) => wire::refuse_reason::UNKNOWN_PID,
                        RequestRejected::NotLazy { .. } => wire::refuse_reason::NOT_LAZY,
                    };
                    tx.send(&Frame::Refused {
                        pid: request.pid,
                        vaddr: request.vaddr,
                        nr_pages: request.nr_pages,
                        reason,
                    })
                    .await?;
                }
            }
        }
        Ok::<(), anyhow::Error>(())
    };
    tokio::try_join!(reader, writer)?;
    Ok(())
}

/// Writes this link's background batches to its push stream, zero pages as Zero frames; ends
/// (finishing the stream) when the pump is done.
async fn push_pages(
    mut tx: FrameSender,
    rx: Arc<tokio::sync::Mutex<mpsc::Receiver<Tagged<Served>>>>,
    generation: u64,
    bar: Option<indicatif::ProgressBar>,
    validator: Option<Arc<Validator>>,
    counters: Arc<Counters>,
) -> Result<()> {
    let mut rx = rx.lock().await;
    while let Some((g, s)) = rx.recv().await {
        if g != generation {
            continue;
        }
        let bytes = s.data.len() as u64;
        let zero = send_served(&mut tx, s, validator.as_deref()).await?;
        counters.zero_pages.fetch_add(zero, Relaxed);
        counters.frames.fetch_add(1, Relaxed);
        counters.bytes.fetch_add(bytes, Relaxed);
        if let Some(b) = &bar {
            b.inc(bytes);
        }
    }
    tracing::info!(
        frames = counters.frames.load(Relaxed),
        bytes = counters.bytes.load(Relaxed),
        "every lazy page judged and pushed: push stream finished"
    );
    tx.finish();
    Ok(())
}

/// Sends one fetched batch, splitting out zero pages; returns how many were zero. After a
/// pre-copy, the validator decides what dst's copies make unnecessary.
async fn send_served(
    tx: &mut FrameSender,
    s: Served,
    validator: Option<&Validator>,
) -> Result<u64> {
    if let Some(v) = validator {
        return v.send(tx, s).await;
    }
    let page = crate::pages::PAGE_SIZE as usize;
    let mut zero = 0;
    for (first, n, is_zero) in crate::pages::zero_runs(&s.data) {
        let vaddr = s.vaddr + (first * page) as u64;
        if is_zero {
            zero += n as u64;
            tx.send(&Frame::Zero {
                pid: s.pid,
                vaddr,
                nr_pages: n as u32,
            })
            .await?;
        } else {
            tx.send_pages(
                s.pid,
                vaddr,
                n as u32,
                s.data.slice(first * page..(first + n) * page),
            )
            .await?;
        }
    }
    Ok(zero)
}
