//! Page frames from one stream of the source (fault answers or the push) into the fault loop:
//! pre-copied pages the source confirmed (Valid) are taken from the page store, Pages and Zero
//! frames go as they are, and every arrival answers the fault requests waiting for it
//! ([`crate::dst::answer_watch`]). The fault loop's queues are bounded, so a fast source is held
//! back by QUIC flow control, not by dst's memory.
//!
//! The push stream's frames are read off the stream as they arrive into
//! [`crate::dst::push_queue`] and handed to the fault loop from there by a placer beside the
//! reader, so a fault on a page that is already at dst is answered at once by the fault loop
//! itself ([`LocalPages`] is its [`HeldPages`]) instead of being asked of the source again.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed, Ordering::SeqCst};
use std::sync::{Arc, Mutex};

use anyhow::{Result, bail};

use crate::dst::answer_watch::AnswerWatch;
use crate::dst::page_store::{PageStore, Stored};
use crate::dst::push_queue::{Origin, Queued, SharedPushQueue};
use crate::dst::store_release::StoreRelease;
use crate::dst::uffd_loop::{HeldAnswer, HeldPages, Inbound, LoopSender};
use crate::pages::{PAGE_SIZE, PidRange};
use crate::transport::FrameReceiver;
use crate::wire::Frame;

/// The pages dst holds before they are placed: the pre-copy store (and how many of its pages were
/// confirmed and placed), and the pushed frames read and not placed yet.
#[derive(Clone)]
pub(crate) struct LocalPages {
    pub store: Option<Arc<PageStore>>,
    pub placed: Arc<AtomicU64>,
    /// Pushed frames read off the push stream and not placed yet.
    pub queue: Arc<SharedPushQueue>,
    /// Pushed pages a fault took out of `queue` before the placer got to them.
    pub taken_at_fault: Arc<AtomicU64>,
    /// Gives the store's slots back as their pages are placed (with a store only).
    release: Option<Arc<StoreRelease>>,
}

impl LocalPages {
    pub(crate) fn new(store: Option<Arc<PageStore>>, placed: Arc<AtomicU64>) -> Self {
        // Without the releaser the store keeps its pages until dst ends, as it did before it.
        let release = store.clone().and_then(|s| {
            StoreRelease::start(s)
                .inspect_err(|e| {
                    tracing::warn!(
                        "cannot start the page store's releaser thread ({e}): the store keeps \
                         its memory until this migration ends"
                    )
                })
                .ok()
        });
        Self {
            store,
            placed,
            queue: Arc::new(SharedPushQueue::default()),
            taken_at_fault: Arc::new(AtomicU64::new(0)),
            release,
        }
    }

    /// Releases what the fault loop reported placed so far, here and now (without waiting
    /// for the releaser's next round); returns the store's pages released in all.
    pub(crate) fn release_now(&self) -> u64 {
        match (&self.store, &self.release) {
            (Some(s), Some(r)) => {
                r.release_pending(s);
                s.released_pages()
            }
            _ => 0,
        }
    }

    /// The page runs of a queued frame (or a fault's share of one) as the fault loop takes
    /// them: data, zero runs, or confirmed pre-copied pages read from the store.
    pub(crate) fn read_out(&self, q: &Queued) -> Result<Vec<Stored>> {
        if q.origin == Origin::Store {
            let Some(store) = &self.store else {
                bail!("the source confirmed pre-copied pages, but it pre-copied none");
            };
            let runs = crate::async_runtime::blocking(|| {
                store.take_valid(q.pid, q.vaddr, q.nr_pages.into(), &q.bitmap)
            })?;
            self.placed
                .fetch_add(runs.iter().map(|r| r.nr_pages).sum(), Relaxed);
            return Ok(runs);
        }
        let runs = q.runs().into_iter().map(|(first, n)| Stored {
            vaddr: q.vaddr + first * PAGE_SIZE,
            nr_pages: n,
            data: match q.slice(first, n) {
                Origin::Data(d) => Some(d),
                _ => None,
            },
        });
        Ok(runs.collect())
    }
}

impl std::fmt::Debug for LocalPages {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LocalPages")
            .field("store", &self.store.is_some())
            .field("taken_at_fault", &self.taken_at_fault.load(Relaxed))
            .finish()
    }
}

/// A fault's pages that were pushed and are still queued here (page data, zero runs, confirmed
/// pre-copied pages read from the store) answer it on the fault loop.
impl HeldPages for LocalPages {
    fn take(&self, link: u64, r: PidRange) -> HeldAnswer {
        let mut answer = HeldAnswer::default();
        let mut at = r.start();
        for q in self.queue.take(link, r.pid, r.start(), r.nr_pages()) {
            if q.vaddr > at {
                answer
                    .rest
                    .push(PidRange::new(r.pid, at, (q.vaddr - at) / PAGE_SIZE));
            }
            let n = u64::from(q.nr_pages);
            at = q.vaddr + n * PAGE_SIZE;
            match self.read_out(&q) {
                Ok(runs) => {
                    self.taken_at_fault.fetch_add(n, Relaxed);
                    answer.found.extend(
                        runs.into_iter()
                            .map(|s| (PidRange::new(r.pid, s.vaddr, s.nr_pages), s.data)),
                    );
                }
                Err(e) => {
                    // Checked when the frame was queued; if the store cannot be read now, the
                    // source is asked instead.
                    tracing::warn!("queued pages could not be read out: {e:#}");
                    answer.rest.push(PidRange::new(r.pid, q.vaddr, n));
                }
            }
        }
        let end = r.start() + r.nr_pages() * PAGE_SIZE;
        if at < end {
            answer
                .rest
                .push(PidRange::new(r.pid, at, (end - at) / PAGE_SIZE));
        }
        answer
    }

    fn placed(&self, at: PidRange) {
        if let Some(r) = &self.release {
            r.placed(at);
        }
    }
}

/// Where one stream's frames go, and what they answer.
struct Feed<'a> {
    to_loop: &'a LoopSender,
    urgent: bool,
    link: u64,
    held: &'a LocalPages,
    answers: &'a Mutex<AnswerWatch>,
}

impl Feed<'_> {
    /// Pages that arrive answer the fault requests waiting for them (dst::answer_watch).
    fn answered(&self, pid: u32, vaddr: u64, nr_pages: u64) {
        if let Ok(mut w) = self.answers.lock() {
            w.arrived(pid, vaddr, nr_pages);
        }
    }

    /// Page data (or a zero run) for image pages `[vaddr, +nr_pages)` of `pid`.
    async fn arrival(
        &self,
        pid: u32,
        vaddr: u64,
        nr_pages: u64,
        data: Option<bytes::Bytes>,
    ) -> Result<()> {
        self.answered(pid, vaddr, nr_pages);
        let at = PidRange::new(pid, vaddr, nr_pages);
        // The loop's queues are bounded, so a fast source is held back by QUIC flow control,
        // not by memory: pushed pages suspend this task (no runtime worker blocked), fault
        // answers block the fault lane, which carries nothing else, briefly.
        let msg = Inbound::arrived(at, data, self.urgent, self.link);
        self.to_loop.send_async(msg).await?;
        Ok(())
    }

    /// Reads the stream to its end. With `queue` (the push stream), frames are queued for the
    /// placer (confirmations checked against the store first) instead of handed to the fault
    /// thread here.
    async fn read(&self, mut rx: FrameReceiver, queue: Option<&SharedPushQueue>) -> Result<()> {
        while let Some(frame) = rx.next().await? {
            let q = match frame {
                // The source confirmed these pre-copied pages equal the frozen ones: only now may
                // they be placed.
                Frame::Valid {
                    pid,
                    vaddr,
                    nr_pages,
                    bitmap,
                } => Queued {
                    link: self.link,
                    pid,
                    vaddr,
                    nr_pages,
                    bitmap: bitmap.to_vec(),
                    origin: Origin::Store,
                },
                Frame::Pages {
                    pid,
                    vaddr,
                    nr_pages,
                    data,
                } => Queued::whole(self.link, pid, vaddr, nr_pages, Origin::Data(data)),
                Frame::Zero {
                    pid,
                    vaddr,
                    nr_pages,
                } => Queued::whole(self.link, pid, vaddr, nr_pages, Origin::Zero),
                Frame::Refused {
                    pid,
                    vaddr,
                    nr_pages,
                    reason,
                } => bail!(
                    "the source refused pages 0x{vaddr:x}+{nr_pages} of pid {pid} (reason \
                     {reason}): the images and the dump disagree"
                ),
                other => bail!("unexpected frame on a page stream: {other:?}"),
            };
            let Some(queue) = queue else {
                self.place(q).await?;
                continue;
            };
            if q.origin == Origin::Store {
                let Some(store) = &self.held.store else {
                    bail!("the source confirmed pre-copied pages, but it pre-copied none");
                };
                store.check_valid(q.pid, q.vaddr, q.nr_pages.into(), &q.bitmap)?;
            }
            // Answered now: the placer places these pages, or a fault takes them first.
            self.answered(q.pid, q.vaddr, q.nr_pages.into());
            queue.push(q).await;
        }
        Ok(())
    }

    /// Hands one frame's remaining pages to the fault loop.
    async fn place(&self, q: Queued) -> Result<()> {
        for r in self.held.read_out(&q)? {
            self.arrival(q.pid, r.vaddr, r.nr_pages, r.data).await?;
        }
        Ok(())
    }

    /// Hands `first` and the frames queued right behind it (up to [`ARRIVALS_MAX_PAGES`] in all,
    /// never waiting for more) to the fault loop as one message: one wakeup of that thread
    /// for what one read of the push stream brought, instead of one per run.
    async fn place_queued(&self, first: Queued, queue: &SharedPushQueue) -> Result<()> {
        let mut pages = u64::from(first.nr_pages);
        let mut runs = Vec::new();
        let mut next = Some(first);
        while let Some(q) = next.take() {
            // Already answered when the reader queued it (`Feed::read`).
            for r in self.held.read_out(&q)? {
                runs.push((PidRange::new(q.pid, r.vaddr, r.nr_pages), r.data));
            }
            next = queue.try_pop_within(self.link, ARRIVALS_MAX_PAGES.saturating_sub(pages));
            pages += next.as_ref().map_or(0, |q| u64::from(q.nr_pages));
        }
        let msg = match runs.len() {
            0 => return Ok(()),
            1 => {
                let (at, data) = runs.remove(0);
                Inbound::arrived(at, data, false, self.link)
            }
            _ => Inbound::Arrivals {
                runs,
                link: self.link,
            },
        };
        self.to_loop.send_async(msg).await?;
        Ok(())
    }
}

/// The most pages one message to the fault loop carries from the push queue (4 MiB of data,
/// the bound of one message on its bulk queue).
const ARRIVALS_MAX_PAGES: u64 = 1024;

/// Feeds page frames from one stream of link generation `link` into the fault loop.
pub(crate) async fn feed_pages(
    rx: FrameReceiver,
    to_loop: LoopSender,
    (urgent, link): (bool, u64),
    held: LocalPages,
    answers: Arc<Mutex<AnswerWatch>>,
) -> Result<()> {
    let feed = Feed {
        to_loop: &to_loop,
        urgent,
        link,
        held: &held,
        answers: &answers,
    };
    if urgent {
        return feed.read(rx, None).await;
    }
    // The push stream: the reader queues frames, the placer hands them to the fault loop.
    let queue = &held.queue;
    let read_all = AtomicBool::new(false);
    let reader = async {
        let r = feed.read(rx, Some(queue)).await;
        read_all.store(true, SeqCst);
        queue.queued.notify_waiters();
        r
    };
    let placer = async {
        while let Some(q) = queue.pop(link, || read_all.load(SeqCst)).await {
            feed.place_queued(q, queue).await?;
        }
        Ok::<(), anyhow::Error>(())
    };
    tokio::try_join!(reader, placer)?;
    Ok(())
}
