//! The source's only connection to CRIU's page server: fetches fault pages first and background
//! pages when the push stream has room.
//!
//! CRIU's lazy dump serves one GET at a time, strictly in request order; `GetClient` keeps that
//! invariant and this task only decides *what* to ask next. Faults always go before background
//! fetches, and at most `max_background` background GETs are queued inside CRIU at once, so a fault
//! waits behind at most that many batches. Background batches need a free slot in the bounded
//! push channel before they are requested: when QUIC is slower than CRIU, the source stops
//! fetching instead of buffering memory.

use std::collections::VecDeque;

use bytes::{Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::{mpsc, watch};

use crate::criu::page_server::{ClientEvent, GetClient, Layout, PsError};
use crate::source::push_plan::{PushPlan, RequestRejected};

/// A fault request from dst.
#[derive(Debug, Clone, Copy)]
pub struct UrgentRequest {
    pub pid: u32,
    pub vaddr: u64,
    pub nr_pages: u32,
    /// When the request reached the source: its answer's time here is measured from it.
    pub at: std::time::Instant,
}

/// Pages fetched from the dump.
#[derive(Debug, Clone)]
pub struct Served {
    pub pid: u32,
    pub vaddr: u64,
    pub nr_pages: u64,
    pub data: Bytes,
}

impl Served {
    /// The first page apart from the rest (if there is a rest; data is not copied). A fault's
    /// answer is its faulting page followed by read-ahead: sent as two frames, dst places the
    /// faulting page, and wakes the thread that waits on it, while the rest is still on the
    /// wire.
    pub fn split_first_page(self) -> (Served, Option<Served>) {
        let page = crate::pages::PAGE_SIZE;
        if self.nr_pages <= 1 || self.data.len() as u64 != self.nr_pages * page {
            return (self, None);
        }
        let head = Served {
            pid: self.pid,
            vaddr: self.vaddr,
            nr_pages: 1,
            data: self.data.slice(..page as usize),
        };
        let tail = Served {
            pid: self.pid,
            vaddr: self.vaddr + page,
            nr_pages: self.nr_pages - 1,
            data: self.data.slice(page as usize..),
        };
        (head, Some(tail))
    }
}

/// What the service hands the pump besides control: dst's fault requests, and after a reconnect
/// the new plan.
#[derive(Debug)]
pub enum PumpInput {
    Fault(UrgentRequest),
    /// The link was re-established (generation `generation`): push exactly `missing` from now on
    /// and drop every answer fetched for an earlier generation (dst re-asks what it still lacks).
    /// The reply says how many pages are left, or why dst's list is refused.
    Replan {
        generation: u64,
        missing: Vec<(u32, Vec<crate::pages::PageRange>)>,
        reply: tokio::sync::oneshot::Sender<Result<u64, RequestRejected>>,
    },
}

/// Pump output tagged with the link generation it was fetched for: a writer of a later
/// generation drops it (see [`PumpInput::Replan`]).
pub type Tagged<T> = (u64, T);

/// The answer to one fault request.
#[derive(Debug)]
pub enum FaultReply {
    /// The pages, and when the request reached the source.
    Pages(Served, std::time::Instant),
    Refused {
        request: UrgentRequest,
        why: RequestRejected,
    },
}

/// What the service tells the pump to do at the end.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PumpControl {
    /// The restore finished at dst: start the background push. (Before it, the restorer may not
    /// have registered the lazy ranges yet, and CRIU's own daemon waits the same way.)
    StartPush,
    /// dst has every page: end the session cleanly, so the dump finishes (and kills the source).
    Finish,
    /// The migration failed before any restored task ran: make the dump fail, so CRIU resumes the
    /// source tasks.
    Abort,
    /// Leave the dump as it is (tasks frozen; the dump keeper holds its socket): return at once.
    Detach,
}

#[derive(Debug, Clone, Copy)]
pub struct PumpConfig {
    /// Pages per background GET.
    pub batch_pages: u64,
    /// Background GETs queued inside CRIU at once.
    pub max_background: usize,
    /// Push in the background at all. Off only to measure: then pages arrive on demand only.
    pub push: bool,
    /// Start the push this long after the restore finished (0: at once). For measuring fault
    /// latency on an idle link against a busy one within one migration.
    pub push_delay: std::time::Duration,
    /// After the freeze, read lazy pages from the frozen tasks (`source::frozen`) when pageserv
    /// started the dump and can verify the tasks are frozen by it; else (and always for external
    /// dumps) every page comes through the dump's page-server connection (this module).
    pub read_frozen: bool,
    /// Before ending the dump, fetch every lazy page from CRIU and compare it with what was
    /// served, page by page (a test of the frozen-memory path; costs a second pass).
    pub verify_served: bool,
}

impl Default for PumpConfig {
    fn default() -> Self {
        Self {
            // A lazy pagemap entry is one CRIU page-pipe buffer of at most 1024 pages, and a GET
            // costs CRIU in proportion to its offset inside that buffer: whole entries from their
            // start are the cheap shape.
            batch_pages: 1024,
            max_background: 2,
            push: true,
            push_delay: std::time::Duration::ZERO,
            read_frozen: true,
            verify_served: false,
        }
    }
}

#[derive(Debug, Default, Clone, Copy, serde::Serialize)]
pub struct PumpStats {
    /// Where lazy pages were read from: "frozen-memory" (`source::frozen`, CRIU only for tasks
    /// that cannot be read) or "page-server" (every page through CRIU's connection).
    pub serving: &'static str,
    pub gets: u64,
    pub bytes_from_dump: u64,
    pub fault_pages: u64,
    pub pushed_pages: u64,
    pub refused: u64,
    /// Pages read from the frozen tasks' memory, and from CRIU (frozen-memory serving).
    pub memory_pages: u64,
    pub criu_pages: u64,
    /// Memory reads that failed over to CRIU (a task died, left its stop, or was unreadable).
    pub failovers: u64,
    /// `verify_served`: whether the comparison ran, and lazy pages whose served bytes equal
    /// CRIU's, differ, were never served, or were served twice with different bytes.
    pub verified: bool,
    pub verify_equal: u64,
    pub verify_differ: u64,
    pub verify_unserved: u64,
    pub verify_conflicts: u64,
    /// Tasks with a differing page, and the (lowest) image pid of one. A page can differ only
    /// where CRIU's copy changed after it was served: the kernel writes a task's memory as it
    /// dies (clear_child_tid, robust futexes), and CRIU's pipes share those pages.
    pub verify_differ_tasks: u64,
    pub verify_differ_pid: u32,
}

#[derive(Debug, thiserror::Error)]
pub enum PumpError {
    #[error("talking to the dump's page server: {0}")]
    Io(#[from] std::io::Error),
    #[error("the dump's page server sent something pageserv cannot accept: {0}")]
    Protocol(#[from] PsError),
    #[error(
        "the dump's page server closed the connection with {0} requests unanswered; the dump has \
         probably failed (see dump.log)"
    )]
    Eof(usize),
    #[error("the service stopped listening for pages")]
    ServiceGone,
    #[error("the serving state machine refused an event (a bug in pageserv src): {0}")]
    Core(String),
}

/// What a GET queued inside CRIU was for, and for which link generation.
enum Tag {
    /// Generation, and when the fault request reached the source.
    Fault(u64, std::time::Instant),
    Background(mpsc::OwnedPermit<Tagged<Served>>, u64, u64),
}

/// Runs the pump until `control` says Finish (returns after CRIU acknowledged the close) or
/// Abort (returns after the dump was told to fail).
#[allow(clippy::too_many_arguments)]
pub async fn run<S: AsyncRead + AsyncWrite + Unpin>(
    stream: S,
    layout: Layout,
    force_close: bool,
    mut plan: PushPlan,
    cfg: PumpConfig,
    mut faults: mpsc::UnboundedReceiver<PumpInput>,
    replies: mpsc::UnboundedSender<Tagged<FaultReply>>,
    push: mpsc::Sender<Tagged<Served>>,
    mut control: watch::Receiver<Option<PumpControl>>,
) -> Result<PumpStats, PumpError> {
    let (mut rd, mut wr) = tokio::io::split(stream);
    let mut client = GetClient::new(layout);
    let mut tags: VecDeque<Tag> = VecDeque::new();
    let mut waiting: VecDeque<UrgentRequest> = VecDeque::new();
    let mut permits: Vec<mpsc::OwnedPermit<Tagged<Served>>> = Vec::new();
    let mut generation = 0u64;
    let mut stats = PumpStats {
        serving: "page-server",
        ..PumpStats::default()
    };
    let mut out = BytesMut::with_capacity(4096);
    let mut finishing = false;
    let mut pushing = false;
    let mut push_at: Option<tokio::time::Instant> = None;
    let mut closing = false;
    let mut faults_open = true;

    loop {
        // Decide what CRIU serves next: faults first, then background while the push has room.
        while let Some(req) = waiting.pop_front() {
            client.request(req.pid, req.vaddr, u64::from(req.nr_pages), &mut out)?;
            tags.push_back(Tag::Fault(generation, req.at));
            stats.gets += 1;
        }
        let background_queued = tags
            .iter()
            .filter(|t| matches!(t, Tag::Background(..)))
            .count();
        if pushing
            && !finishing
            && background_queued < cfg.max_background
            && let Some(permit) = permits.pop()
        {
            match plan.next_batch(cfg.batch_pages) {
                Some(b) => {
                    client.request(b.pid, b.vaddr, b.nr_pages, &mut out)?;
                    tags.push_back(Tag::Background(permit, b.nr_pages, generation));
                    stats.gets += 1;
                }
                None => permits.push(permit),
            }
        }
        if finishing && tags.is_empty() && !closing {
            client.close(force_close, &mut out)?;
            closing = true;
        }
        if !out.is_empty() {
            wr.write_all(&out).await?;
            out.clear();
        }
        let want_permit = pushing
            && !finishing
            && plan.remaining_pages() > 0
            && permits.is_empty()
            && background_queued < cfg.max_background;

        tokio::select! {
            biased;
            changed = control.changed() => {
                let what = if changed.is_ok() { *control.borrow() } else { Some(PumpControl::Abort) };
                match what {
                    Some(PumpControl::StartPush) if cfg.push_delay.is_zero() => pushing = cfg.push,
                    Some(PumpControl::StartPush) => {
                        push_at = Some(tokio::time::Instant::now() + cfg.push_delay);
                    }
                    Some(PumpControl::Finish) => finishing = true,
                    Some(PumpControl::Abort) => {
                        abort_session(&mut wr, layout).await;
                        return Ok(stats);
                    }
                    Some(PumpControl::Detach) => return Ok(stats),
                    None => {}
                }
            }
            _ = tokio::time::sleep_until(push_at.unwrap_or_else(tokio::time::Instant::now)), if push_at.is_some() => {
                push_at = None;
                pushing = cfg.push;
            }
            input = faults.recv(), if faults_open => match input {
                Some(PumpInput::Replan { generation: g, missing, reply }) => {
                    let r = plan.replan(missing);
                    if r.is_ok() {
                        generation = g;
                        // Requests of the dead link not yet sent to CRIU: dst asks again.
                        waiting.clear();
                    }
                    let _ = reply.send(r);
                }
                // dst reported its memory whole: a request still on its way (the fault
                // connection is not ordered with the control stream) needs no answer, and the
                // session may already be closing.
                Some(PumpInput::Fault(req)) if finishing => {
                    tracing::debug!(pid = req.pid, vaddr = req.vaddr, "fault request after memory whole: ignored");
                }
                Some(PumpInput::Fault(req)) => match plan.split_request(req.pid, req.vaddr, u64::from(req.nr_pages)) {
                    Ok(pieces) => {
                        plan.note_fault(req.pid, req.vaddr, u64::from(req.nr_pages));
                        for (vaddr, n) in pieces {
                            plan.mark_sent(req.pid, vaddr, n);
                            waiting.push_back(UrgentRequest { pid: req.pid, vaddr, nr_pages: n as u32, at: req.at });
                        }
                    }
                    Err(why) => {
                        stats.refused += 1;
                        tracing::warn!(%why, "refusing a page request from dst");
                        replies.send((generation, FaultReply::Refused { request: req, why })).map_err(|_| PumpError::ServiceGone)?;
                    }
                },
                None => faults_open = false,
            },
            n = rd.read_buf(client.read_buf()) => {
                if n? == 0 {
                    client.on_eof()?;
                    return Err(PumpError::Eof(client.outstanding()));
                }
                while let Some(event) = client.poll()? {
                    match event {
                        ClientEvent::Closed => return Ok(stats),
                        ClientEvent::Pages(reply) => {
                            stats.bytes_from_dump += reply.data.len() as u64;
                            let served = Served { pid: reply.pid, vaddr: reply.vaddr, nr_pages: reply.nr_pages, data: reply.data };
                            match tags.pop_front() {
                                // Fetched for a dead link: dst's missing list already has these
                                // pages, and the plan was rebuilt from it.
                                Some(Tag::Fault(g, _) | Tag::Background(_, _, g)) if g != generation => {}
                                Some(Tag::Fault(_, at)) => {
                                    stats.fault_pages += served.nr_pages;
                                    replies.send((generation, FaultReply::Pages(served, at))).map_err(|_| PumpError::ServiceGone)?;
                                }
                                Some(Tag::Background(permit, asked, _)) => {
                                    if served.nr_pages < asked {
                                        // CRIU clamps at its pipe-buffer end; the rest goes back to the plan.
                                        let rest = served.vaddr + served.nr_pages * crate::pages::PAGE_SIZE;
                                        plan.mark_unsent(served.pid, rest, asked - served.nr_pages);
                                    }
                                    stats.pushed_pages += served.nr_pages;
                                    permit.send((generation, served));
                                }
                                // GetClient refuses replies nobody asked for, so this cannot happen.
                                None => return Err(PumpError::Eof(0)),
                            }
                        }
                    }
                }
            }
            permit = push.clone().reserve_owned(), if want_permit => match permit {
                Ok(p) => permits.push(p),
                Err(_) => return Err(PumpError::ServiceGone),
            },
        }
    }
}

/// Makes CRIU's page server fail the session: it ends on an unknown command, and a failed lazy
/// session makes `criu dump` resume the source tasks. (A clean EOF would count as success and
/// kill them.)
async fn abort_session<W: AsyncWrite + Unpin>(wr: &mut W, layout: Layout) {
    let mut header = vec![0u8; layout.header_len()];
    header[..4].copy_from_slice(&0xBAD0u32.to_ne_bytes());
    if let Err(e) = wr.write_all(&header).await {
        tracing::warn!("could not tell the dump to fail: {e}");
    }
    let _ = wr.flush().await;
}

#[cfg(test)]
mod tests {
    use super::Served;
    use crate::pages::PAGE_SIZE;

    fn served(nr_pages: u64) -> Served {
        let data: Vec<u8> = (0..nr_pages * PAGE_SIZE)
            .map(|i| (i / PAGE_SIZE) as u8)
            .collect();
        Served {
            pid: 7,
            vaddr: 0x10000,
            nr_pages,
            data: data.into(),
        }
    }

    #[test]
    fn a_fault_answer_splits_into_its_page_and_the_read_ahead() {
        let (head, tail) = served(5).split_first_page();
        assert_eq!((head.pid, head.vaddr, head.nr_pages), (7, 0x10000, 1));
        assert!(head.data.iter().all(|&b| b == 0));
        let tail = tail.expect("four read-ahead pages");
        assert_eq!((tail.vaddr, tail.nr_pages), (0x10000 + PAGE_SIZE, 4));
        assert_eq!(tail.data.len() as u64, 4 * PAGE_SIZE);
        assert_eq!(tail.data[0], 1);
        assert_eq!(tail.data[tail.data.len() - 1], 4);
    }

    #[test]
    fn one_page_or_a_malformed_answer_stays_whole() {
        assert!(served(1).split_first_page().1.is_none());
        let mut bad = served(3);
        bad.nr_pages = 4;
        let (head, tail) = bad.split_first_page();
        assert!(tail.is_none());
        assert_eq!(head.nr_pages, 4);
    }
}
