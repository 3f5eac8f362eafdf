//! dst from the restore's start to the end of the migration: forward faults to the source, feed
//! its pages to the fault loop, tell it when the memory is whole, and survive the link dying.
//!
//! The link (control, fault and push streams of one pair of QUIC connections) may die at any
//! time after the images arrived. Then the restored tasks simply wait on their faults (never a
//! zero page), and this loop waits up to the recover timeout for the source to come back with a
//! resume connection (source::recovery). On resume: the fault loop voids what the old link owed
//! and reports what is still missing ([`Inbound::Resume`]); the source gets that list and pushes
//! it again; dst re-sends every fault request still open. Past the timeout the migration fails:
//! incomplete tasks are killed, and the source (frozen) can be retried.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result, anyhow, bail};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use crate::dst::answer_watch::{AnswerWatch, Verdict};
use crate::dst::fault_requests;
pub(crate) use crate::dst::page_feed::LocalPages;
use crate::dst::page_feed::feed_pages;
use crate::dst::uffd_loop::{Inbound, LoopSender, Outbound};
use crate::pages::{PageRange, PidRange};
use crate::pb::pageserv::{Hello, Missing, ResumeReady, control::Msg};
use crate::protocol::{self, Role, link_lost, next_ctl, send_ctl};
use crate::transport::{FrameReceiver, FrameSender};

/// How long a resumed source has to open its fault connection after ResumeReady.
const FAULT_CONN_WAIT: Duration = Duration::from_secs(10);
/// Control messages (and link failures) of the source queued for the post-copy loop.
const LINK_EVENTS: usize = 64;
/// Ranges per Missing message (16 bytes each on the wire).
const MISSING_CHUNK: usize = 16 * 1024;

pub(crate) type FaultConn = (quinn::Connection, FrameSender, FrameReceiver);

/// Connections the accept loop (dst/endpoint.rs) routes to a running migration by its id.
pub(crate) enum Routed {
    Faults(FaultConn),
    /// A stop-and-copy source's further connection for its session's lanes (hello read).
    Lanes(FaultConn),
    /// A source continuing this migration on a new link; its resume hello has been read.
    Resume {
        conn: quinn::Connection,
        ctl: FrameSender,
        ctl_rx: FrameReceiver,
        hello: Hello,
    },
}

impl Routed {
    /// "fault" or "resume", for log lines.
    pub(crate) fn kind(&self) -> &'static str {
        match self {
            Routed::Faults(_) => "fault",
            Routed::Resume { .. } => "resume",
            Routed::Lanes(_) => "lanes",
        }
    }
}

/// What a link's reader tasks report, tagged with the link's generation.
enum LinkEvent {
    Ctl(Msg),
    Failed(anyhow::Error),
}

/// One live link to the source.
pub(crate) struct SourceLink {
    generation: u64,
    conn: quinn::Connection,
    fault_conn: quinn::Connection,
    ctl: FrameSender,
    readers: Vec<JoinHandle<()>>,
}

impl SourceLink {
    fn lost(&self) -> bool {
        link_lost(&self.conn) || link_lost(&self.fault_conn)
    }

    fn stop(self) -> quinn::Connection {
        for r in &self.readers {
            r.abort();
        }
        self.conn
    }

    pub(crate) fn bytes_received(&self) -> u64 {
        self.conn.stats().udp_rx.bytes + self.fault_conn.stats().udp_rx.bytes
    }
}

/// Where the link stands.
enum LinkState {
    Up(SourceLink),
    /// Lost; waiting for a resume connection.
    Down,
    /// A resume connection arrived and the fault loop was asked what is missing.
    Resuming {
        conn: quinn::Connection,
        ctl: FrameSender,
        /// Boxed: the state is moved on every transition, and a receiver is large.
        ctl_rx: Box<FrameReceiver>,
        serial: u64,
        /// Once the fault loop answered: the fault requests to send again.
        requests: Option<Vec<PidRange>>,
        fault_deadline: Option<tokio::time::Instant>,
    },
}

/// The migration's side of the fault loop and the link.
pub(crate) struct Wiring {
    pub to_loop: LoopSender,
    pub held: LocalPages,
    pub recover_timeout: Duration,
    /// Per image pid, every lazy range (for tasks not handed over yet at a resume).
    pub lazy: BTreeMap<u32, Vec<PageRange>>,
    /// The fault endpoint's port, named in the answer to a resume.
    pub fault_port: u16,
    /// The fault-request writer on the fault lane ([`fault_requests`]); the fault loop's
    /// bridge sends it the requests, this loop the state of the link.
    pub requests: mpsc::UnboundedSender<fault_requests::Cmd>,
    /// The open fault requests of the live link (the writer records them, the page readers
    /// answer them): one left unanswered too long drops the link ([`crate::dst::answer_watch`]).
    pub answers: Arc<Mutex<AnswerWatch>>,
}

/// A fresh [`AnswerWatch`] under `limits`, for [`Wiring::answers`].
pub(crate) fn answer_watch(limits: &crate::limits::DstLimits) -> Arc<Mutex<AnswerWatch>> {
    Arc::new(Mutex::new(AnswerWatch::new(
        limits.fault_answer,
        crate::limits::MAX_SILENT_LINKS,
    )))
}

/// The post-copy driver: owns the link state; the service drives the restore around it.
pub(crate) struct PostCopy {
    wiring: Wiring,
    state: LinkState,
    generation: u64,
    serial: u64,
    /// Bounded: a source flooding its control stream is held back by QUIC flow control.
    events_tx: mpsc::Sender<(u64, LinkEvent)>,
    events_rx: mpsc::Receiver<(u64, LinkEvent)>,
    /// Until when the source may come back (while the link is down).
    deadline: Option<tokio::time::Instant>,
    /// Restore finished (unix ns), for a resumed source that missed it.
    pub finished_at_ns: Option<u64>,
    /// Every lazy page is in place; and whether the source has been told on the current link.
    whole: Option<crate::pb::pageserv::MemoryWhole>,
    whole_told: bool,
    pub reconnects: u64,
    bytes_dead_links: u64,
}

/// How the post-copy ended.
pub(crate) enum End {
    /// The source released its dump.
    Released,
    /// The link died after dst told the source the memory is whole: the restored copy is whole
    /// and live; the source did not confirm its release.
    WholeNoRelease,
}

/// What the loop wants from the service.
pub(crate) enum Step {
    /// A fault-thread event the service handles (Complete, TaskGone, Error).
    Event(Outbound),
    /// The post-copy is over.
    Done(End),
    /// A poll of the restore is due (the service's tick).
    Idle,
}

impl Wiring {
    fn answers_timeout(&self) -> Duration {
        self.answers.lock().map(|w| w.timeout()).unwrap_or_default()
    }
}

impl PostCopy {
    pub(crate) fn new(
        wiring: Wiring,
        conn: quinn::Connection,
        ctl: FrameSender,
        ctl_rx: FrameReceiver,
        fault: FaultConn,
    ) -> Self {
        let (events_tx, events_rx) = mpsc::channel(LINK_EVENTS);
        let mut pc = PostCopy {
            wiring,
            state: LinkState::Down,
            generation: 0,
            serial: 0,
            events_tx,
            events_rx,
            deadline: None,
            finished_at_ns: None,
            whole: None,
            whole_told: false,
            reconnects: 0,
            bytes_dead_links: 0,
        };
        pc.state = LinkState::Up(pc.start_link(conn, ctl, ctl_rx, fault, Vec::new()));
        pc
    }

    /// A post-copy adopted from a dst that died (dst::adopt): no link yet; the source has the
    /// recover timeout to come back with a resume, which it does on its own (it was reconnecting
    /// all along) or with `pageserv src --resume DIR`.
    pub(crate) fn adopted(wiring: Wiring, finished_at_ns: u64) -> Self {
        let (events_tx, events_rx) = mpsc::channel(LINK_EVENTS);
        let deadline = Some(tokio::time::Instant::now() + wiring.recover_timeout);
        PostCopy {
            wiring,
            state: LinkState::Down,
            generation: 0,
            serial: 0,
            events_tx,
            events_rx,
            deadline,
            finished_at_ns: Some(finished_at_ns),
            whole: None,
            whole_told: false,
            reconnects: 0,
            bytes_dead_links: 0,
        }
    }

    /// UDP bytes received on every link so far.
    pub(crate) fn bytes_received(&self) -> u64 {
        self.bytes_dead_links
            + match &self.state {
                LinkState::Up(l) => l.bytes_received(),
                _ => 0,
            }
    }

    fn start_link(
        &mut self,
        conn: quinn::Connection,
        ctl: FrameSender,
        mut ctl_rx: FrameReceiver,
        (fault_conn, fault_tx, fault_rx): FaultConn,
        again: Vec<PidRange>,
    ) -> SourceLink {
        let g = self.generation;
        // The fault loop's link generation: the serial of the resume this link answers (0 for
        // the first link); it drops pages of any other.
        let link = self.serial;
        let ev = self.events_tx.clone();
        let ctl_reader = tokio::spawn(async move {
            loop {
                match next_ctl(&mut ctl_rx).await {
                    Ok(m) => {
                        if ev.send((g, LinkEvent::Ctl(m))).await.is_err() {
                            return;
                        }
                    }
                    Err(e) => {
                        let _ = ev
                            .send((
                                g,
                                LinkEvent::Failed(e.context("control stream from the source")),
                            ))
                            .await;
                        return;
                    }
                }
            }
        });
        let ev = self.events_tx.clone();
        let (to_loop, held) = (self.wiring.to_loop.clone(), self.wiring.held.clone());
        let answers = self.wiring.answers.clone();
        // Fault answers are read on the fault lane, where their connection is driven.
        let fault_reader = crate::fault_lane::spawn(async move {
            if let Err(e) = feed_pages(fault_rx, to_loop, (true, link), held, answers).await {
                let _ = ev
                    .send((
                        g,
                        LinkEvent::Failed(e.context("fault stream from the source")),
                    ))
                    .await;
            }
        });
        let ev = self.events_tx.clone();
        let (to_loop, held) = (self.wiring.to_loop.clone(), self.wiring.held.clone());
        let answers = self.wiring.answers.clone();
        let _ = self.wiring.requests.send(fault_requests::Cmd::Link {
            tx: fault_tx,
            again,
        });
        let push_conn = conn.clone();
        let push_reader = tokio::spawn(async move {
            let r = async {
                let recv = push_conn
                    .accept_uni()
                    .await
                    .context("waiting for the push stream")?;
                feed_pages(
                    FrameReceiver::new(recv),
                    to_loop,
                    (false, link),
                    held,
                    answers,
                )
                .await
            }
            .await;
            if let Err(e) = r {
                let _ = ev
                    .send((
                        g,
                        LinkEvent::Failed(e.context("push stream from the source")),
                    ))
                    .await;
            }
        });
        SourceLink {
            generation: g,
            conn,
            fault_conn,
            ctl,
            readers: vec![ctl_reader, fault_reader, push_reader],
        }
    }

    /// Sends a control message on the live link, if there is one. A failure is not an error
    /// here: the link's readers notice a dead link and report it.
    pub(crate) async fn tell(&mut self, msg: Msg) {
        if let LinkState::Up(l) = &mut self.state
            && let Err(e) = send_ctl(&mut l.ctl, msg).await
        {
            tracing::warn!("sending to the source: {e:#}");
        }
    }

    pub(crate) fn link_up(&self) -> bool {
        matches!(self.state, LinkState::Up(_))
    }

    /// The memory is whole: tell the source now, or when it comes back.
    pub(crate) async fn memory_whole(&mut self, m: crate::pb::pageserv::MemoryWhole) {
        self.whole = Some(m);
        if self.link_up() {
            self.tell(Msg::MemoryWhole(m)).await;
            self.whole_told = true;
        }
    }

    /// Waits for the next thing the service must act on, handling link events, faults and
    /// resumes itself. `ev_rx` is the fault loop's outbound queue; `routes` the accept loop's.
    pub(crate) async fn next(
        &mut self,
        ev_rx: &mut mpsc::UnboundedReceiver<Outbound>,
        routes: &mut mpsc::Receiver<Routed>,
        tick: &mut tokio::time::Interval,
    ) -> Result<Step> {
        loop {
            let fault_deadline = match &self.state {
                LinkState::Resuming { fault_deadline, .. } => *fault_deadline,
                _ => None,
            };
            tokio::select! {
                ev = ev_rx.recv() => match ev {
                    Some(Outbound::Fault(r)) => self.fault(r),
                    Some(Outbound::Resumed { serial, missing, requests }) => {
                        self.resumed(serial, missing, requests).await;
                    }
                    Some(other) => return Ok(Step::Event(other)),
                    None => bail!("the fault loop stopped unexpectedly"),
                },
                Some(r) = routes.recv() => self.routed(r).await?,
                Some((g, ev)) = self.events_rx.recv() => {
                    if let Some(end) = self.link_event(g, ev)? {
                        return Ok(Step::Done(end));
                    }
                }
                _ = tokio::time::sleep_until(self.deadline.unwrap_or_else(tokio::time::Instant::now)), if self.deadline.is_some() => {
                    let secs = self.wiring.recover_timeout.as_secs_f64();
                    if self.whole.is_some() {
                        bail!(
                            "every page is in place and the restored tree runs here, but the source \
                             did not come back within the recover timeout ({secs:.0} s) to hear it: \
                             its copy stays frozen; end it there with `pageserv frozen DIR --kill-source`"
                        );
                    }
                    bail!(
                        "the link to the source died and it did not come back within the recover \
                         timeout ({secs:.0} s)"
                    );
                }
                _ = tokio::time::sleep_until(fault_deadline.unwrap_or_else(tokio::time::Instant::now)), if fault_deadline.is_some() => {
                    tracing::warn!("the resumed source did not open its fault connection; waiting for another resume");
                    self.void_requests();
                    if let LinkState::Resuming { conn, .. } = std::mem::replace(&mut self.state, LinkState::Down) {
                        conn.close(4u32.into(), b"no fault connection");
                    }
                }
                _ = tick.tick() => {
                    self.check_answers()?;
                    return Ok(Step::Idle);
                }
            }
        }
    }

    /// The fault-answer rule ([`crate::dst::answer_watch`]) on the live link: a request left
    /// unanswered too long drops the link as if it had died (the recovery path runs); too many
    /// such links in a row fail the migration.
    fn check_answers(&mut self) -> Result<()> {
        if !matches!(self.state, LinkState::Up(_)) {
            return Ok(());
        }
        let verdict = match self.wiring.answers.lock() {
            Ok(mut w) => w.check(std::time::Instant::now()),
            Err(_) => return Ok(()),
        };
        let limit = self.wiring.answers_timeout();
        match verdict {
            Verdict::Fine => Ok(()),
            Verdict::Fail { silent, waited } => bail!(
                "the source left a fault request unanswered for {:.0} s on {silent} links in a                  row (fault-answer limit {:.0} s, --fault-answer-secs): restored tasks cannot                  wait on it forever; the migration fails (the source is faulty or hostile)",
                waited.as_secs_f64(),
                limit.as_secs_f64()
            ),
            Verdict::DropLink {
                pid,
                vaddr,
                waited,
                silent,
            } => {
                tracing::warn!(
                    pid,
                    vaddr = format_args!("{vaddr:#x}"),
                    waited_s = waited.as_secs_f64(),
                    silent,
                    "a fault request went unanswered past the fault-answer limit ({:.0} s,                      --fault-answer-secs): dropping the link; the source may resume within the                      recover timeout",
                    limit.as_secs_f64()
                );
                if self.wiring.recover_timeout.is_zero() {
                    bail!(
                        "the source left a fault request unanswered for {:.0} s                          (--fault-answer-secs) and --recover-timeout is 0",
                        waited.as_secs_f64()
                    );
                }
                self.void_requests();
                if let LinkState::Up(l) = std::mem::replace(&mut self.state, LinkState::Down) {
                    self.bytes_dead_links += l.bytes_received();
                    l.fault_conn
                        .close(6u32.into(), b"fault requests unanswered");
                    l.stop().close(6u32.into(), b"fault requests unanswered");
                }
                self.whole_told = false;
                self.deadline = Some(tokio::time::Instant::now() + self.wiring.recover_timeout);
                Ok(())
            }
        }
    }

    /// A request that reached this loop rather than the writer (the bridge sends them there).
    fn fault(&mut self, r: PidRange) {
        let _ = self.wiring.requests.send(fault_requests::Cmd::Fault(r));
    }

    /// The link is down: the writer drops requests until the fault loop lists them.
    fn void_requests(&self) {
        let _ = self.wiring.requests.send(fault_requests::Cmd::Void);
    }

    async fn routed(&mut self, r: Routed) -> Result<()> {
        match r {
            Routed::Resume {
                conn,
                mut ctl,
                ctl_rx,
                hello,
            } => {
                tracing::info!(peer = %conn.remote_address(), "the source is back: resuming the migration");
                match std::mem::replace(&mut self.state, LinkState::Down) {
                    LinkState::Up(l) => {
                        self.bytes_dead_links += l.bytes_received();
                        l.stop().close(5u32.into(), b"replaced by a resumed link");
                    }
                    LinkState::Resuming { conn, .. } => conn.close(5u32.into(), b"replaced"),
                    LinkState::Down => {}
                }
                self.whole_told = false;
                self.void_requests();
                let reply = Msg::Hello(Hello {
                    fault_port: self.wiring.fault_port.into(),
                    ..protocol::hello(
                        Role::Dst,
                        hello.criu_version.clone(),
                        hello.migration_id.clone(),
                    )
                });
                if let Err(e) = send_ctl(&mut ctl, reply).await {
                    tracing::warn!("answering the resume: {e:#}");
                    return Ok(());
                }
                self.serial += 1;
                let (to_loop, serial) = (self.wiring.to_loop.clone(), self.serial);
                // Behind every page queued before it, like a pushed frame: a full queue suspends
                // this task instead of blocking the runtime's thread.
                to_loop
                    .send_async(Inbound::Resume { serial })
                    .await
                    .context("asking the fault loop what is missing")?;
                self.state = LinkState::Resuming {
                    conn,
                    ctl,
                    ctl_rx: Box::new(ctl_rx),
                    serial,
                    requests: None,
                    fault_deadline: None,
                };
            }
            Routed::Lanes(lc) => {
                tracing::warn!(
                    "a stop-and-copy lanes connection for a post-copy migration: closed"
                );
                lc.0.close(2u32.into(), b"not a stop-and-copy migration");
            }
            Routed::Faults(fc) => {
                let ready = matches!(
                    self.state,
                    LinkState::Resuming {
                        requests: Some(_),
                        ..
                    }
                );
                if !ready {
                    tracing::warn!("a fault connection nobody waits for: closed");
                    fc.0.close(2u32.into(), b"unexpected fault connection");
                    return Ok(());
                }
                let LinkState::Resuming {
                    conn,
                    ctl,
                    ctl_rx,
                    requests,
                    ..
                } = std::mem::replace(&mut self.state, LinkState::Down)
                else {
                    return Ok(());
                };
                self.generation += 1;
                self.reconnects += 1;
                let again = requests.unwrap_or_default();
                let n = again.len();
                let link = self.start_link(conn, ctl, *ctl_rx, fc, again);
                tracing::info!(
                    generation = self.generation,
                    requests_again = n,
                    "link to the source re-established"
                );
                self.state = LinkState::Up(link);
                self.deadline = None;
                if let Some(m) = self.whole {
                    self.tell(Msg::MemoryWhole(m)).await;
                    self.whole_told = true;
                }
            }
        }
        Ok(())
    }

    async fn resumed(
        &mut self,
        serial: u64,
        mut missing: BTreeMap<u32, Vec<PageRange>>,
        again: Vec<PidRange>,
    ) {
        let LinkState::Resuming {
            ctl,
            serial: want,
            requests,
            fault_deadline,
            ..
        } = &mut self.state
        else {
            return;
        };
        if serial != *want {
            return;
        }
        // Tasks the restore has not handed over yet miss everything.
        for (pid, ranges) in &self.wiring.lazy {
            missing.entry(*pid).or_insert_with(|| ranges.clone());
        }
        let mut total = 0u64;
        let mut result = Ok(());
        'send: for (pid, ranges) in &missing {
            for chunk in ranges.chunks(MISSING_CHUNK) {
                total += chunk.iter().map(|r| r.nr_pages).sum::<u64>();
                let m = Missing {
                    pid: *pid,
                    vaddr: chunk.iter().map(|r| r.start).collect(),
                    nr_pages: chunk.iter().map(|r| r.nr_pages).collect(),
                };
                result = send_ctl(ctl, Msg::Missing(m)).await;
                if result.is_err() {
                    break 'send;
                }
            }
        }
        if result.is_ok() {
            let ready = ResumeReady {
                restore_finished: self.finished_at_ns.is_some(),
                finished_at_unix_ns: self.finished_at_ns.unwrap_or(0),
                missing_pages: total,
            };
            result = send_ctl(ctl, Msg::ResumeReady(ready)).await;
        }
        match result {
            Ok(()) => {
                tracing::info!(
                    missing_pages = total,
                    "told the resumed source what is missing"
                );
                *requests = Some(again);
                *fault_deadline = Some(tokio::time::Instant::now() + FAULT_CONN_WAIT);
            }
            Err(e) => {
                tracing::warn!("the resume handshake failed: {e:#}");
                self.void_requests();
                self.state = LinkState::Down;
            }
        }
    }

    /// A reader of link `g` reported something; `Some` ends the post-copy.
    fn link_event(&mut self, g: u64, ev: LinkEvent) -> Result<Option<End>> {
        let LinkState::Up(l) = &self.state else {
            return Ok(None);
        };
        if l.generation != g {
            return Ok(None);
        }
        match ev {
            LinkEvent::Ctl(Msg::SourceReleased(r)) => {
                if self.whole.is_none() {
                    // The source's copy is gone (or it says so) while lazy pages are still
                    // missing here: they can never arrive. Not a success; the failure rule
                    // applies (incomplete tasks are killed before their uffds close).
                    bail!(
                        "the source released its dump (dump_ok {}, {:?}) before dst had every \
                         lazy page: the missing pages can no longer arrive; the restored tasks \
                         that lack memory are killed",
                        r.dump_ok,
                        r.detail
                    );
                }
                if !r.dump_ok {
                    tracing::warn!("the source's dump did not end cleanly: {}", r.detail);
                }
                Ok(Some(End::Released))
            }
            LinkEvent::Ctl(Msg::Abort(a)) => Err(anyhow!("the source aborted: {}", a.reason)),
            LinkEvent::Ctl(other) => {
                tracing::warn!("ignoring control message {other:?} during post-copy");
                Ok(None)
            }
            LinkEvent::Failed(e) => {
                let recover = !self.wiring.recover_timeout.is_zero() && l.lost();
                if !recover {
                    if self.whole_told {
                        tracing::warn!("no release message from the source: {e:#}");
                        return Ok(Some(End::WholeNoRelease));
                    }
                    return Err(e);
                }
                tracing::warn!(
                    recover_timeout_s = self.wiring.recover_timeout.as_secs_f64(),
                    "the link to the source died ({e:#}); restored tasks wait for their pages while \
                     dst waits for the source to reconnect"
                );
                self.void_requests();
                if let LinkState::Up(l) = std::mem::replace(&mut self.state, LinkState::Down) {
                    self.bytes_dead_links += l.bytes_received();
                    l.stop();
                }
                self.whole_told = false;
                self.deadline = Some(tokio::time::Instant::now() + self.wiring.recover_timeout);
                Ok(None)
            }
        }
    }

    /// Closes the live link, if any, with `code` and `reason`; returns it to wait on.
    pub(crate) fn close(self, code: u32, reason: &[u8]) -> Option<quinn::Connection> {
        match self.state {
            LinkState::Up(l) => {
                let conn = l.stop();
                conn.close(code.into(), reason);
                Some(conn)
            }
            LinkState::Resuming { conn, .. } => {
                conn.close(code.into(), reason);
                Some(conn)
            }
            LinkState::Down => None,
        }
    }
}

/// Now as unix ns.
pub(crate) fn unix_ns() -> Result<u64> {
    Ok(SystemTime::now().duration_since(UNIX_EPOCH)?.as_nanos() as u64)
}
