//! `pageserv src --lazy`: the source side of one migration.
//!
//! Order of events: connect to dst (mutual TLS) → hello → start or join the lazy dump and wait
//! for its status byte (the tasks are frozen from here on) → ship the images → dst restores →
//! serve faults and push every remaining page → dst says the memory is whole → end the dump
//! cleanly (CRIU kills the source tasks only now) → tell dst the source copy is gone.
//! Any failure before dst reports the restore finished makes the dump fail instead, so CRIU
//! resumes the source tasks.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result, anyhow, bail};
use bytes::Bytes;
use tokio::sync::{mpsc, watch};

use crate::criu::binary::Criu;
use crate::criu::images::ImageDir;
use crate::keys::Identity;
use crate::outcome::{self, SourceAction, SourceKnows};
use crate::pb::pageserv::{Control, Hello, ImageChunk, ImagesDone, SourceReleased, control::Msg};
use crate::source::dump::{
    DumpOptions, PageServerConn, ReadyDump, join_external_dump, start_lazy_dump,
};
use crate::source::keeper::KeeperLink;
use crate::source::pre_copy::held::HeldMemory;
use crate::source::pre_copy::{self, PreCopyConfig, PreCopyReport, Validator};
use crate::source::pump::{self, FaultReply, PumpConfig, PumpControl, Served, UrgentRequest};
use crate::source::push_plan::{PushPlan, RequestRejected};
use crate::stats::SourceReport;
use crate::transport::{self, FrameReceiver, FrameSender};
use crate::wire::{self, Frame};

pub const PROTOCOL_VERSION: u32 = 1;
/// The hello role of the second connection, which carries only faults.
pub const ROLE_FAULTS: &str = "src-faults";
const IMAGE_CHUNK: usize = 1 << 20;
/// Fetched batches waiting for the push stream.
const PUSH_SLOTS: usize = 4;

/// Where the dump comes from.
#[derive(Debug, Clone)]
pub enum DumpSource {
    /// pageserv runs `criu dump --lazy-pages` on this pid.
    Pid { pid: i32, extra: Vec<String> },
    /// A dump started elsewhere (runc style).
    External {
        page_server: SocketAddr,
        status_fifo: PathBuf,
        images_dir: PathBuf,
    },
    /// Retry a migration whose source was left frozen in this work directory (its dump keeper
    /// hands the dump's socket over).
    Resume { work: PathBuf },
}

#[derive(Debug, Clone)]
pub struct SourceOptions {
    pub to: SocketAddr,
    pub certs: PathBuf,
    pub work_dir: PathBuf,
    pub criu: Criu,
    pub dump: DumpSource,
    pub pump: PumpConfig,
    /// Transport settings of the push connection (the fault connection keeps the defaults).
    pub push_transport: transport::TransportOptions,
    pub progress: bool,
    /// Pre-copy rounds before the freeze (needs [`DumpSource::Pid`]).
    pub pre_copy: Option<PreCopyConfig>,
}

/// The wildcard local address of `to`'s family, port chosen by the kernel.
fn any_addr(to: SocketAddr) -> SocketAddr {
    let ip: std::net::IpAddr = if to.is_ipv4() {
        std::net::Ipv4Addr::UNSPECIFIED.into()
    } else {
        std::net::Ipv6Addr::UNSPECIFIED.into()
    };
    SocketAddr::new(ip, 0)
}

/// Connects to `pageserv dst` at `to` (mutual TLS) and opens the control stream.
pub(crate) async fn connect_control(
    id: &Identity,
    to: SocketAddr,
    options: &transport::TransportOptions,
) -> Result<(quinn::Connection, FrameSender, FrameReceiver)> {
    let conn = transport::connect_with(any_addr(to), to, id, options)
        .await
        .with_context(|| format!("connecting to pageserv dst at {to}"))?;
    let (send, recv) = conn.open_bi().await.context("opening the control stream")?;
    Ok((conn, FrameSender::new(send), FrameReceiver::new(recv)))
}

/// Runs one migration out of this host.
pub async fn run(opts: SourceOptions) -> Result<SourceReport> {
    let started = Instant::now();
    let id = Identity::load(&opts.certs)?;
    let (conn, mut ctl, mut ctl_rx) = connect_control(&id, opts.to, &opts.push_transport).await?;

    let migration_id = format!(
        "m{}-{}",
        SystemTime::now().duration_since(UNIX_EPOCH)?.as_secs(),
        std::process::id()
    );
    send_ctl(
        &mut ctl,
        Msg::Hello(Hello {
            protocol_version: PROTOCOL_VERSION,
            role: "src".into(),
            page_size: crate::pages::PAGE_SIZE as u32,
            criu_version: opts.criu.version.to_string(),
            migration_id: migration_id.clone(),
        }),
    )
    .await?;
    match next_ctl(&mut ctl_rx).await? {
        Msg::Hello(h) if h.role == "dst" && h.protocol_version == PROTOCOL_VERSION => {
            if h.criu_version != opts.criu.version.to_string() {
                tracing::warn!(
                    src = %opts.criu.version, dst = %h.criu_version,
                    "CRIU versions differ between the hosts; images may not restore"
                );
            }
        }
        Msg::Abort(a) => bail!("dst refused the migration: {}", a.reason),
        other => bail!(
            "dst answered the hello with {other:?}; is it a pageserv dst of the same version?"
        ),
    }

    // Faults get a connection of their own: on the push connection a fault reply would queue
    // behind every pushed byte already in flight, which no stream priority can overtake.
    let fault_conn = transport::connect(any_addr(opts.to), opts.to, &id)
        .await
        .with_context(|| format!("opening the fault connection to {}", opts.to))?;
    let (fault_send, fault_recv) = fault_conn
        .open_bi()
        .await
        .context("opening the fault stream")?;
    let mut fault_tx = FrameSender::new(fault_send);
    send_ctl(
        &mut fault_tx,
        Msg::Hello(Hello {
            protocol_version: PROTOCOL_VERSION,
            role: ROLE_FAULTS.into(),
            page_size: crate::pages::PAGE_SIZE as u32,
            criu_version: opts.criu.version.to_string(),
            migration_id: migration_id.clone(),
        }),
    )
    .await?;
    let fault_stream = (fault_tx, FrameReceiver::new(fault_recv));

    // Pre-copy rounds go on the control stream, ahead of the images: dst holds every pre-copied
    // page before it restores.
    let pre = match (&opts.pre_copy, &opts.dump) {
        (Some(cfg), DumpSource::Pid { pid, .. }) => Some(
            pre_copy::rounds::run(*pid, *cfg, &mut ctl)
                .await
                .context("pre-copy rounds (the tasks were never frozen)")?,
        ),
        (Some(_), DumpSource::External { .. }) => {
            bail!("--pre-copy needs --pid: pageserv reads the tree's memory before it dumps it")
        }
        (Some(_), DumpSource::Resume { .. }) => bail!(
            "--pre-copy cannot be combined with --resume: the source is already frozen, so the \
             retry is a plain post-copy; drop --pre-copy"
        ),
        (None, _) => None,
    };
    let wire_at_freeze = conn.stats().udp_tx.bytes + fault_conn.stats().udp_tx.bytes;

    // From here on the tasks are frozen: every failure path must resume or keep them.
    let (mut dump, mut keeper) = open_dump(&opts).await?;
    let earlier_attempt = matches!(opts.dump, DumpSource::Resume { .. });
    let frozen_at = dump.started_at;
    tracing::info!(
        elapsed_ms = started.elapsed().as_millis() as u64,
        "dump ready, tasks frozen"
    );

    let result = migrate(
        &opts,
        &conn,
        fault_stream,
        &mut ctl,
        &mut ctl_rx,
        &mut dump,
        frozen_at,
        &mut keeper,
        earlier_attempt,
        pre,
    )
    .await;
    let wire_after_freeze = (conn.stats().udp_tx.bytes + fault_conn.stats().udp_tx.bytes)
        .saturating_sub(wire_at_freeze);
    fault_conn.close(0u32.into(), b"done");
    match result {
        Ok(mut report) => {
            report.total_ms = started.elapsed().as_secs_f64() * 1e3;
            report.wire_bytes_after_freeze = wire_after_freeze;
            report.peak_rss_bytes = peak_rss_bytes();
            // dst closes the connection once it has read SourceReleased; closing first would
            // discard that message.
            if tokio::time::timeout(Duration::from_secs(10), conn.closed())
                .await
                .is_err()
            {
                conn.close(0u32.into(), b"done");
            }
            Ok(report)
        }
        Err(e) => {
            conn.close(1u32.into(), b"source failed");
            Err(e)
        }
    }
}

/// This process's peak resident memory (VmHWM), 0 if unknown.
fn peak_rss_bytes() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            let line = s.lines().find(|l| l.starts_with("VmHWM:"))?;
            line.split_whitespace().nth(1)?.parse::<u64>().ok()
        })
        .map_or(0, |kib| kib * 1024)
}

async fn open_dump(opts: &SourceOptions) -> Result<(ReadyDump, Option<KeeperLink>)> {
    let criu = opts.criu.clone();
    let d = opts.dump.clone();
    let work = opts.work_dir.clone();
    let header_len = opts.criu.layout().header_len();
    tokio::task::spawn_blocking(move || {
        let dump = open_dump_blocking(&criu, d, &work)?;
        if let Some(r) = dump.1 {
            return Ok((dump.0, Some(r)));
        }
        let mut dump = dump.0;
        // A dump pageserv started gets a keeper at once: from here on, src dying must neither
        // kill nor resume the source behind the rule's back (see source::keeper).
        let keeper = match (&dump.conn, dump.child.as_ref()) {
            (PageServerConn::Unix(s), Some(child)) => {
                let exe = std::env::current_exe().context("locating the pageserv binary")?;
                match KeeperLink::spawn(&exe, &work, s, child.id(), header_len) {
                    Ok(k) => Some(k),
                    Err(e) => {
                        // Without a keeper the migration must not start: resume the source.
                        drop(std::mem::replace(
                            &mut dump.conn,
                            PageServerConn::Unix(std::os::unix::net::UnixStream::pair()?.0),
                        ));
                        return Err(anyhow::Error::from(e));
                    }
                }
            }
            _ => None,
        };
        Ok((dump, keeper))
    })
    .await?
}

fn open_dump_blocking(
    criu: &Criu,
    d: DumpSource,
    work: &Path,
) -> Result<(ReadyDump, Option<KeeperLink>)> {
    let work = work.to_path_buf();
    let fresh = |r: Result<ReadyDump, _>| r.map(|d| (d, None)).map_err(anyhow::Error::from);
    match d {
        DumpSource::Pid { pid, extra } => fresh(start_lazy_dump(
            criu,
            &DumpOptions {
                pid,
                images_dir: work.join("images"),
                work_dir: work.clone(),
                extra,
            },
        )),
        DumpSource::External {
            page_server,
            status_fifo,
            images_dir,
        } => fresh(join_external_dump(&images_dir, page_server, &status_fifo)),
        DumpSource::Resume { work } => {
            let (link, sock) = KeeperLink::take(&work)?;
            tracing::info!(dir = %work.display(), "took over the frozen dump");
            Ok((
                ReadyDump {
                    images_dir: work.join("images"),
                    conn: PageServerConn::Unix(sock),
                    child: None,
                    log: Some(work.join("dump.log")),
                    started_at: SystemTime::now(),
                },
                Some(link),
            ))
        }
    }
}

#[allow(clippy::too_many_arguments)]
async fn migrate(
    opts: &SourceOptions,
    conn: &quinn::Connection,
    fault_stream: (FrameSender, FrameReceiver),
    ctl: &mut FrameSender,
    ctl_rx: &mut FrameReceiver,
    dump: &mut ReadyDump,
    frozen_at: SystemTime,
    keeper: &mut Option<KeeperLink>,
    earlier_attempt: bool,
    pre: Option<(HeldMemory, PreCopyReport)>,
) -> Result<SourceReport> {
    let mut knows = SourceKnows {
        earlier_attempt,
        ..Default::default()
    };
    let mut report = SourceReport::default();
    let (validator, mut pre_report) = match pre {
        Some((held, r)) => (Some(Arc::new(Validator::new(held))), Some(r)),
        None => (None, None),
    };
    let images = ImageDir::open(&dump.images_dir)?;
    // The plan's units are CRIU's lazy pagemap entries: each is one page-pipe buffer inside the
    // dump, and GETs that start at an entry's first page are the cheap ones.
    let mut tasks = Vec::new();
    for t in images.pstree()? {
        let entries = images.pagemap(t.pid)?.entries;
        let lazy = entries
            .iter()
            .filter(|e| e.flags.is_lazy() && !e.flags.is_present())
            .map(|e| crate::pages::PageRange::new(e.vaddr, e.nr_pages))
            .collect();
        tasks.push((t.pid, lazy));
    }
    let mut plan = PushPlan::new(tasks);
    if let Some(v) = &validator {
        // Memory that kept changing during the rounds most likely changed after them too.
        plan.prioritize(|pid, range| v.held().heat(pid, range));
    }
    report.lazy_pages = plan.total_pages();
    let shipped = ship_images(ctl, &dump.images_dir, frozen_at, || {
        // Before ImagesDone leaves: from then on dst may restore, and the keeper must know it
        // even if this process dies the next instant.
        knows.images_shipped = true;
        if let Some(k) = keeper.as_mut() {
            k.images_shipped();
        }
    })
    .await;
    let shipped = match shipped {
        Ok(bytes) => bytes,
        Err(e) => {
            if outcome::source_action(knows) == SourceAction::Resume {
                // The pump has not started: make the dump fail here, or our socket closing would
                // look like a successful end to CRIU, which then kills the source.
                fail_dump(&dump.conn, opts.criu.layout().header_len());
            }
            return Err(settle(e, &mut knows, keeper, dump));
        }
    };
    report.images_bytes = shipped;

    // The pump owns the dump's socket from here; the control flow below only steers it.
    let (fault_tx, fault_rx) = mpsc::unbounded_channel::<UrgentRequest>();
    let (reply_tx, reply_rx) = mpsc::unbounded_channel::<FaultReply>();
    // Each slot holds one fetched batch (at most 4 MiB): this bounds what the source buffers
    // when QUIC is slower than CRIU.
    let (push_tx, push_rx) = mpsc::channel::<Served>(PUSH_SLOTS);
    let (control_tx, control_rx) = watch::channel(None);
    let layout = opts.criu.layout();
    let conn_taken = std::mem::replace(
        &mut dump.conn,
        PageServerConn::Unix(std::os::unix::net::UnixStream::pair()?.0),
    );
    let pump_task = match conn_taken {
        PageServerConn::Unix(s) => {
            s.set_nonblocking(true)?;
            let s = tokio::net::UnixStream::from_std(s)?;
            tokio::spawn(pump::run(
                s, layout, true, plan, opts.pump, fault_rx, reply_tx, push_tx, control_rx,
            ))
        }
        PageServerConn::Tcp(s) => {
            s.set_nonblocking(true)?;
            let s = tokio::net::TcpStream::from_std(s)?;
            tokio::spawn(pump::run(
                s, layout, false, plan, opts.pump, fault_rx, reply_tx, push_tx, control_rx,
            ))
        }
    };

    let push_send = conn.open_uni().await.context("opening the push stream")?;
    push_send.set_priority(transport::PUSH_PRIORITY)?;
    let pusher = tokio::spawn(push_pages(
        FrameSender::new(push_send),
        push_rx,
        report.lazy_pages,
        opts.progress,
        validator.clone(),
    ));
    let faults = tokio::spawn(serve_faults(
        fault_stream,
        fault_tx,
        reply_rx,
        validator.clone(),
    ));

    // Wait for the restore to finish and the memory to become whole.
    let mut restored = false;
    let outcome: Result<()> = loop {
        match next_ctl(ctl_rx).await {
            Ok(Msg::RestoreStarted(_)) => tracing::info!("dst started the restore"),
            Ok(Msg::RestoreFinished(f)) => {
                restored = true;
                knows.restore_finished = true;
                let _ = control_tx.send(Some(PumpControl::StartPush));
                let frozen = frozen_at.duration_since(UNIX_EPOCH)?.as_nanos() as u64;
                report.downtime_ms = f.finished_at_unix_ns.saturating_sub(frozen) as f64 / 1e6;
                tracing::info!(downtime_ms = report.downtime_ms, "restore finished at dst");
            }
            Ok(Msg::RestoreFailed(f)) => {
                knows.dst_reported_restore_failed = true;
                break Err(anyhow!(
                    "the restore failed at dst: {}\n{}",
                    f.reason,
                    f.log_tail
                ));
            }
            Ok(Msg::MemoryWhole(w)) => {
                knows.memory_whole = true;
                report.dst_pages_on_demand = w.pages_on_demand;
                report.dst_pages_pushed = w.pages_pushed;
                report.dst_pages_local = w.pages_local;
                break Ok(());
            }
            Ok(Msg::Abort(a)) => break Err(anyhow!("dst aborted the migration: {}", a.reason)),
            Ok(other) => tracing::warn!("ignoring unexpected control message {other:?}"),
            Err(e) => break Err(e.context("control stream from dst")),
        }
    };

    let _ = restored;
    let action = outcome::source_action(knows);
    let decision = match action {
        SourceAction::End => PumpControl::Finish,
        SourceAction::Resume => PumpControl::Abort,
        SourceAction::KeepFrozen => PumpControl::Detach,
    };
    let _ = control_tx.send(Some(decision));
    let pump_stats = pump_task.await.context("the pump task panicked")?;
    faults.abort();
    let push_stats = pusher.await.context("the push task panicked")?;
    if let Err(e) = outcome {
        return Err(settle(e, &mut knows, keeper, dump));
    }
    let pump_stats = pump_stats?;
    let push_stats = push_stats?;
    report.pump = pump_stats;
    report.push_frames = push_stats.frames;
    report.push_bytes = push_stats.bytes;
    report.zero_pages = push_stats.zero_pages;
    if let (Some(r), Some(v)) = (&mut pre_report, &validator) {
        r.sweep = v.stats();
    }
    report.pre_copy = pre_report;

    // The session ended cleanly: CRIU kills the source tasks and exits.
    let dump_ok = match dump.wait(Duration::from_secs(30)) {
        Some((status, tail)) if !status.success() => {
            tracing::warn!("criu dump exited with {status}:\n{tail}");
            false
        }
        _ => true,
    };
    if let Some(k) = keeper.take() {
        k.release();
    }
    send_ctl(
        ctl,
        Msg::SourceReleased(SourceReleased {
            dump_ok,
            detail: String::new(),
        }),
    )
    .await?;
    ctl.finish();
    Ok(report)
}

/// Sends CRIU a command it does not know: the lazy session fails and CRIU resumes the source.
fn fail_dump(conn: &PageServerConn, header_len: usize) {
    use std::io::Write;
    let mut header = vec![0u8; header_len];
    header[..4].copy_from_slice(&0xBAD0u32.to_ne_bytes());
    let r = match conn {
        PageServerConn::Unix(s) => (&*s).write_all(&header),
        PageServerConn::Tcp(s) => (&*s).write_all(&header),
    };
    if let Err(e) = r {
        tracing::warn!("could not tell the dump to fail: {e}");
    }
}

/// Applies the split-brain rule to a failure the pump has not acted on yet (or has: then the
/// pump already wrote what the rule chose, and this only settles the keeper).
fn settle(
    e: anyhow::Error,
    knows: &mut SourceKnows,
    keeper: &mut Option<KeeperLink>,
    dump: &ReadyDump,
) -> anyhow::Error {
    match outcome::source_action(*knows) {
        SourceAction::KeepFrozen => {
            let work = dump
                .images_dir
                .parent()
                .map(Path::to_path_buf)
                .unwrap_or_default();
            if let Some(k) = keeper.take() {
                k.leave();
                e.context(format!(
                    "the source stays FROZEN: a restored copy may have run at dst, so it must not \
                     be resumed. Retry with a running pageserv dst: `pageserv src --lazy --to ADDR \
                     --resume {w}`; or settle it: `pageserv frozen {w} --kill-source` (or \
                     --resume-source, only if no restored copy runs anywhere)",
                    w = work.display()
                ))
            } else {
                e.context("the source dump has no keeper (external dump): what CRIU does next depends on how it ends")
            }
        }
        SourceAction::Resume | SourceAction::End => {
            if let Some(k) = keeper.take() {
                k.release();
            }
            e
        }
    }
}

/// Sends one image file to dst in chunks of at most [`IMAGE_CHUNK`] (an empty file is one empty
/// last chunk).
pub(crate) async fn send_image(ctl: &mut FrameSender, name: &str, data: Bytes) -> Result<()> {
    let mut offset = 0usize;
    loop {
        let end = (offset + IMAGE_CHUNK).min(data.len());
        let last = end == data.len();
        send_ctl(
            ctl,
            Msg::ImageChunk(ImageChunk {
                name: name.to_string(),
                offset: offset as u64,
                data: data.slice(offset..end),
                last,
                mode: 0o600,
            }),
        )
        .await?;
        offset = end;
        if last {
            return Ok(());
        }
    }
}

/// Sends every image file except the lazy memory (which CRIU never wrote to disk);
/// `before_done` runs just before the closing ImagesDone.
pub(crate) async fn ship_images(
    ctl: &mut FrameSender,
    dir: &Path,
    frozen_at: SystemTime,
    before_done: impl FnOnce(),
) -> Result<u64> {
    let mut names: Vec<String> = Vec::new();
    for entry in std::fs::read_dir(dir).with_context(|| format!("reading {}", dir.display()))? {
        let entry = entry?;
        let name = entry.file_name().to_string_lossy().into_owned();
        // CRIU's own logs may sit in the image directory (an external dump's -o); they are not images.
        if entry.file_type()?.is_file() && !name.ends_with(".log") {
            names.push(name);
        }
    }
    names.sort();
    let mut total = 0u64;
    for name in &names {
        let data = tokio::fs::read(dir.join(name))
            .await
            .with_context(|| format!("reading image {name}"))?;
        total += data.len() as u64;
        send_image(ctl, name, Bytes::from(data)).await?;
    }
    before_done();
    send_ctl(
        ctl,
        Msg::ImagesDone(ImagesDone {
            files: names.len() as u32,
            bytes: total,
            frozen_at_unix_ns: frozen_at.duration_since(UNIX_EPOCH)?.as_nanos() as u64,
        }),
    )
    .await?;
    Ok(total)
}

/// Reads dst's fault requests, forwards its requests to the pump and sends the pump's answers.
async fn serve_faults(
    (mut tx, mut rx): (FrameSender, FrameReceiver),
    to_pump: mpsc::UnboundedSender<UrgentRequest>,
    mut from_pump: mpsc::UnboundedReceiver<FaultReply>,
    validator: Option<Arc<Validator>>,
) -> Result<()> {
    let reader = async move {
        while let Some(frame) = rx.next().await? {
            match frame {
                Frame::PageRequest {
                    pid,
                    vaddr,
                    nr_pages,
                } => {
                    if to_pump
                        .send(UrgentRequest {
                            pid,
                            vaddr,
                            nr_pages,
                        })
                        .is_err()
                    {
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
        while let Some(reply) = from_pump.recv().await {
            match reply {
                FaultReply::Pages(s) => {
                    send_served(&mut tx, s, validator.as_deref()).await?;
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

#[derive(Debug, Default)]
struct PushStats {
    frames: u64,
    bytes: u64,
    zero_pages: u64,
}

/// Writes background batches to the push stream, zero pages as Zero frames.
async fn push_pages(
    mut tx: FrameSender,
    mut rx: mpsc::Receiver<Served>,
    total_pages: u64,
    progress: bool,
    validator: Option<Arc<Validator>>,
) -> Result<PushStats> {
    let bar = progress
        .then(|| crate::stats::progress_bar(total_pages * crate::pages::PAGE_SIZE, "pushing"));
    let mut stats = PushStats::default();
    while let Some(s) = rx.recv().await {
        let bytes = s.data.len() as u64;
        stats.zero_pages += send_served(&mut tx, s, validator.as_deref()).await?;
        stats.frames += 1;
        stats.bytes += bytes;
        if let Some(b) = &bar {
            b.inc(bytes);
        }
    }
    if let Some(b) = bar {
        b.finish_and_clear();
    }
    tx.finish();
    Ok(stats)
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

async fn send_ctl(ctl: &mut FrameSender, msg: Msg) -> Result<()> {
    ctl.send(&Frame::Control(Control { msg: Some(msg) }))
        .await
        .context("sending on the control stream")
}

/// The next control message; the stream ending is an error (the peer is gone).
pub async fn next_ctl(rx: &mut FrameReceiver) -> Result<Msg> {
    match rx.next().await? {
        Some(Frame::Control(Control { msg: Some(m) })) => Ok(m),
        Some(other) => bail!("expected a control message, got {other:?}"),
        None => bail!("the peer closed the control stream"),
    }
}
