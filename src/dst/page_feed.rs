//! Page frames from one stream of the source (fault answers or the push) into the fault thread:
//! pre-copied pages the source confirmed (Valid) are taken from the page store, Pages and Zero
//! frames go as they are, and every arrival answers the fault requests waiting for it
//! ([`crate::dst::answer_watch`]). The fault thread's queues are bounded, so a fast source is held
//! back by QUIC flow control, not by dst's memory.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};

use anyhow::{Result, bail};

use crate::dst::answer_watch::AnswerWatch;
use crate::dst::page_store::PageStore;
use crate::dst::uffd_loop::{Inbound, LoopSender};
use crate::pages::PidRange;
use crate::transport::FrameReceiver;
use crate::wire::Frame;

/// The pre-copied pages dst holds, and how many of them were confirmed and placed.
#[derive(Clone)]
pub(crate) struct PreCopied {
    pub store: Option<Arc<PageStore>>,
    pub placed: Arc<AtomicU64>,
}

/// Runs `f`, which may block briefly: through `block_in_place` on the main runtime; directly on
/// the fault lane (current-thread, where `block_in_place` is not allowed and only fault answers
/// run).
fn blocking<R>(f: impl FnOnce() -> R) -> R {
    match tokio::runtime::Handle::try_current().map(|h| h.runtime_flavor()) {
        Ok(tokio::runtime::RuntimeFlavor::MultiThread) => tokio::task::block_in_place(f),
        _ => f(),
    }
}

/// Feeds page frames from one stream of link generation `link` into the fault thread.
pub(crate) async fn feed_pages(
    mut rx: FrameReceiver,
    to_loop: LoopSender,
    (urgent, link): (bool, u64),
    held: PreCopied,
    answers: Arc<Mutex<AnswerWatch>>,
) -> Result<()> {
    // Pages that arrive answer the fault requests waiting for them (dst::answer_watch).
    let answered = |pid: u32, vaddr: u64, nr_pages: u64| {
        if let Ok(mut w) = answers.lock() {
            w.arrived(pid, vaddr, nr_pages);
        }
    };
    // Page data (or a zero run) for image pages `[vaddr, +nr_pages)` of `pid`.
    let arrival = |pid: u32, vaddr: u64, nr_pages: u32, data: Option<bytes::Bytes>| {
        answered(pid, vaddr, nr_pages.into());
        Inbound::arrived(
            PidRange::new(pid, vaddr, nr_pages.into()),
            data,
            urgent,
            link,
        )
    };
    while let Some(frame) = rx.next().await? {
        let inbound = match frame {
            // The source confirmed these pre-copied pages equal the frozen ones: only now may
            // they be placed.
            Frame::Valid {
                pid,
                vaddr,
                nr_pages,
                bitmap,
            } => {
                let Some(store) = &held.store else {
                    bail!("the source confirmed pre-copied pages, but it pre-copied none");
                };
                let runs = blocking(|| store.take_valid(pid, vaddr, nr_pages.into(), &bitmap))?;
                for r in runs {
                    answered(pid, r.vaddr, r.nr_pages);
                    held.placed.fetch_add(r.nr_pages, Relaxed);
                    let at = PidRange::new(pid, r.vaddr, r.nr_pages);
                    let msg = Inbound::arrived(at, r.data, urgent, link);
                    to_loop.send_async(msg).await?;
                }
                continue;
            }
            Frame::Pages {
                pid,
                vaddr,
                nr_pages,
                data,
            } => arrival(pid, vaddr, nr_pages, Some(data)),
            Frame::Zero {
                pid,
                vaddr,
                nr_pages,
            } => arrival(pid, vaddr, nr_pages, None),
            Frame::Refused {
                pid,
                vaddr,
                nr_pages,
                reason,
            } => bail!(
                "the source refused pages 0x{vaddr:x}+{nr_pages} of pid {pid} (reason {reason}): \
                 the images and the dump disagree"
            ),
            other => bail!("unexpected frame on a page stream: {other:?}"),
        };
        // The loop's queues are bounded, so a fast source is held back by QUIC flow control,
        // not by memory: pushed pages suspend this task (no runtime worker blocked), fault
        // answers block the fault lane, which carries nothing else, briefly.
        to_loop.send_async(inbound).await?;
    }
    Ok(())
}
