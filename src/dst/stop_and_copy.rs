//! `pageserv dst` for a stop-and-copy source: writes the forwarded page-server session and the
//! dump's other images into a standard CRIU image directory, then runs a plain `criu restore`
//! (no lazy pages: every page is in the images), or with `--runc-bundle` a plain `runc restore`
//! (a failed one leaves no container behind).

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result, bail};
use tokio::sync::mpsc;

use crate::criu::binary::log_tail;
use crate::criu::images::ImageDir;
use crate::dst::image_sink::ImageSink;
use crate::dst::options::DstOptions;
use crate::dst::post_copy::Routed;
use crate::dst::receive_clock::ReceiveClock;
use crate::dst::restore::{delete_failed_runc, restore_command, runc_log_tail};
use crate::dst::session_writer::SessionWriter;
use crate::limits::{DstLimits, LimitHit, flag};
use crate::pb::pageserv::PsLanes;
use crate::pb::pageserv::{
    Abort, Control, PsSessionWritten, RestoreFailed, RestoreFinished, RestoreStarted, control::Msg,
};
use crate::protocol::lanes::{Merger, Next, Spread};
use crate::protocol::{next_ctl, send_ctl};
use crate::stats::DstReport;
use crate::transport::{FrameReceiver, FrameSender};
use crate::wire::Frame;

/// How long `criu restore -d` may take.
const RESTORE_TIMEOUT: Duration = Duration::from_secs(300);

/// Runs the rest of a stop-and-copy migration after the hellos; `dir` is this migration's
/// fresh directory, `tag` its name in logs and in what the source is told of failures (short:
/// the details stay in this host's log).
pub(crate) async fn migrate_in(
    opts: &DstOptions,
    ctl: &mut FrameSender,
    ctl_rx: &mut FrameReceiver,
    (conn, mut routes): (&quinn::Connection, mpsc::Receiver<Routed>),
    dir: &Path,
    tag: &str,
) -> Result<DstReport> {
    let short = |what: &str| format!("{what}; details in its log, migration {tag}");
    let started = Instant::now();
    let mut report = DstReport::default();
    let images = dir.join("images");
    let work = dir.join("work");
    for d in [&images, &work] {
        std::fs::create_dir_all(d).with_context(|| format!("creating {}", d.display()))?;
    }
    let clock = ReceiveClock::start(&opts.limits);
    let r = receive_session(
        (conn, &mut routes),
        ctl_rx,
        &images,
        &mut report,
        &opts.limits,
        &clock,
    )
    .await;
    let written = match r {
        Ok(w) => w,
        Err(e) => {
            tracing::error!(migration = %tag, "writing the session failed: {e:#}");
            send_ctl(
                ctl,
                Msg::Abort(Abort {
                    reason: short("writing the session failed at the destination"),
                }),
            )
            .await
            .ok();
            return Err(e);
        }
    };
    send_ctl(
        ctl,
        Msg::PsSessionWritten(PsSessionWritten {
            page_bytes: written,
        }),
    )
    .await?;

    // The dump's own images, as in a lazy migration (announced first, bounded the same way).
    let mut sink = ImageSink::new(&images, opts.limits.max_images_bytes);
    let mut planned = false;
    let (frozen_at_ns, carried) = loop {
        let msg = match clock.next(ctl_rx, "the images").await? {
            Some(Frame::Control(Control { msg: Some(m) })) => m,
            Some(other) => bail!("expected images, got {other:?}"),
            None => bail!("the source closed the control stream before the images were done"),
        };
        match msg {
            Msg::ImagesPlan(p) if !planned => {
                let r = sink.plan(p.files.into(), p.bytes, opts.limits.min_free_disk_bytes);
                if let Err(e) = r {
                    let reason = format!("{e}");
                    send_ctl(ctl, Msg::Abort(Abort { reason })).await.ok();
                    return Err(e.into());
                }
                planned = true;
            }
            Msg::ImageChunk(_) if !planned => bail!(
                "the source sent images without announcing them first (ImagesPlan): is it an \
                 older pageserv src? Update it to this version"
            ),
            Msg::ImageChunk(c) => sink.chunk(&c.name, c.offset, &c.data, c.last)?,
            Msg::ImagesDone(d) => {
                sink.finish(d.files, d.bytes)?;
                report.images_bytes += d.bytes;
                break (
                    d.frozen_at_unix_ns,
                    crate::criu::opts::accept(&d.restore_criu_opts)?,
                );
            }
            Msg::Abort(a) => bail!("the source aborted: {}", a.reason),
            other => bail!("expected images, got {other:?}"),
        }
    };
    report.tasks = ImageDir::open(&images)?.pstree()?.len() as u64;

    let images_at = Instant::now();
    send_ctl(ctl, Msg::RestoreStarted(RestoreStarted { root_pid: 0 })).await?;
    let restored = {
        let options = opts.restore.with_carried(&carried);
        let cmd = restore_command(&opts.criu, &images, &work, &options, false);
        let log = work.join("restore.log");
        tokio::task::spawn_blocking(move || restore(cmd, &log)).await?
    };
    if let Err(mut e) = restored {
        if opts.restore.runc.is_some() {
            delete_failed_runc(opts.restore.runc.as_ref());
            e = e.context(format!(
                "runc restore failed{}",
                runc_log_tail(&work.join("restore.log"))
            ));
        }
        tracing::error!(
            migration = %tag,
            "restore failed: {e:#}\nlast lines of restore.log:\n{}",
            log_tail(&work.join("restore.log"), 20)
        );
        send_ctl(
            ctl,
            Msg::RestoreFailed(RestoreFailed {
                reason: short("restore failed at the destination"),
                log_tail: String::new(),
            }),
        )
        .await
        .ok();
        return Err(e);
    }
    let finished_ns = SystemTime::now().duration_since(UNIX_EPOCH)?.as_nanos() as u64;
    report.downtime_ms = finished_ns.saturating_sub(frozen_at_ns) as f64 / 1e6;
    report.restore_ms = images_at.elapsed().as_secs_f64() * 1e3;
    send_ctl(
        ctl,
        Msg::RestoreFinished(RestoreFinished {
            finished_at_unix_ns: finished_ns,
        }),
    )
    .await?;
    tracing::info!(
        downtime_ms = report.downtime_ms,
        "restore finished; tasks running"
    );
    match next(ctl_rx).await {
        Ok(Msg::SourceReleased(r)) if !r.dump_ok => {
            tracing::warn!("the source's dump did not end cleanly: {}", r.detail)
        }
        Ok(_) => {}
        Err(e) => tracing::warn!("no release message from the source: {e:#}"),
    }
    // Plus the lane connections' bytes, counted when the session ended.
    report.bytes_received += conn.stats().udp_rx.bytes;
    report.total_ms = started.elapsed().as_secs_f64() * 1e3;
    Ok(report)
}

/// Writes the forwarded session until the source's PsSessionDone; returns the page bytes. The
/// session's frames arrive dealt over the lanes the source announces first (see
/// [`crate::protocol::lanes`]); a writer thread puts the pages in the files.
async fn receive_session(
    (conn, routes): (&quinn::Connection, &mut mpsc::Receiver<Routed>),
    ctl_rx: &mut FrameReceiver,
    images: &Path,
    report: &mut DstReport,
    limits: &DstLimits,
    clock: &ReceiveClock,
) -> Result<u64> {
    const WHAT: &str = "the page-server session";
    let announced = match clock.next(ctl_rx, WHAT).await? {
        Some(Frame::Control(Control {
            msg: Some(Msg::PsLanes(l)),
        })) => l,
        Some(Frame::Control(Control {
            msg: Some(Msg::Abort(a)),
        })) => bail!("the source aborted: {}", a.reason),
        Some(other) => bail!(
            "expected the session's lanes (PsLanes) from the source, got {other:?}: is it an \
             older pageserv src? Update it to this version"
        ),
        None => bail!("the source closed the control stream before the page-server session"),
    };
    let spread = Spread::new(announced.lanes, announced.connections.max(1))?;
    if announced.index != 0 {
        bail!(
            "the source's control connection claims to be lane connection {}",
            announced.index
        );
    }
    let conns = lane_connections(conn, routes, &announced, spread, clock).await?;
    let mut merger = Merger::new(spread.lanes())?;
    // Per connection, its lanes' streams accepted so far (in stream order).
    let mut rx: Vec<Vec<FrameReceiver>> = conns.iter().map(|_| Vec::new()).collect();
    let mut writer = SessionWriter::start(images, limits.max_session_bytes)?;
    // Pagemap files come as image chunks; a sink of their own keeps their count apart.
    let mut pagemaps = ImageSink::new(images, limits.max_images_bytes);
    let mut pagemaps_bytes = 0u64;
    // The session's size is not known ahead: the free space is checked as it is written.
    let mut checked_at = 0u64;
    while let Next::Read(lane) = merger.next() {
        // Lanes are accepted in stream order, each when its first frame (or end) is due.
        let (c, index) = spread.place(lane);
        while rx[c].len() as u64 <= index {
            let recv = clock
                .within(conns[c].0.accept_uni(), WHAT)
                .await?
                .with_context(|| format!("waiting for lane {lane} of the session"))?;
            if recv.id().index() != rx[c].len() as u64 {
                bail!(
                    "the source opened stream {} as stream {} of its lane connection {c}: lanes \
                     must be its first unidirectional streams, in order",
                    recv.id(),
                    rx[c].len()
                );
            }
            rx[c].push(FrameReceiver::new(recv));
        }
        let Some(frame) = clock.next(&mut rx[c][index as usize], WHAT).await? else {
            merger.on_end(lane)?;
            continue;
        };
        merger.on_frame(lane)?;
        match frame {
            Frame::Pages {
                pid: pages_id,
                vaddr,
                nr_pages,
                data,
            } => {
                writer.append_pages(pages_id, vaddr, data).await?;
                report.stop_and_copy_pages += u64::from(nr_pages);
                if writer.queued_bytes() - checked_at >= DISK_CHECK_EVERY {
                    checked_at = writer.queued_bytes();
                    check_free(images, limits.min_free_disk_bytes)?;
                }
            }
            Frame::Control(Control { msg: Some(m) }) => match m {
                Msg::PsCreatePages(c) => writer.create_pages(c.pages_id).await?,
                Msg::ImageChunk(c) if c.name.starts_with("pagemap-") => {
                    pagemaps_bytes += c.data.len() as u64;
                    pagemaps.chunk(&c.name, c.offset, &c.data, c.last)?;
                }
                other => bail!("unexpected {other:?} on a lane of the page-server session"),
            },
            other => bail!("unexpected frame {other:?} during the page-server session"),
        }
    }
    let w = writer.finish().await?;
    report.bytes_received += conns[1..]
        .iter()
        .map(|(c, _)| c.stats().udp_rx.bytes)
        .sum::<u64>();
    match clock.next(ctl_rx, WHAT).await? {
        Some(Frame::Control(Control { msg: Some(m) })) => match m {
            Msg::PsSessionDone(d) => {
                pagemaps.finish(d.pagemap_files, d.pagemap_bytes)?;
                if w.page_bytes != d.page_bytes || w.pages_files != u64::from(d.pages_files) {
                    bail!(
                        "the session's totals disagree: source sent {} page bytes in {} \
                         files, {} bytes in {} files arrived",
                        d.page_bytes,
                        d.pages_files,
                        w.page_bytes,
                        w.pages_files
                    );
                }
                report.images_bytes += pagemaps_bytes;
                Ok(w.page_bytes)
            }
            Msg::Abort(a) => bail!("the source aborted: {}", a.reason),
            other => bail!("expected PsSessionDone after the session's lanes, got {other:?}"),
        },
        Some(other) => bail!("expected PsSessionDone after the session's lanes, got {other:?}"),
        None => bail!("the source closed the control stream during the page-server session"),
    }
}

/// The connections the session's lanes span: the control connection first, then each further
/// one the source opened (routed here by the accept loop, its certificate already checked
/// against the control connection's), in the order of their `index`. Their control streams are
/// kept open with them.
async fn lane_connections(
    conn: &quinn::Connection,
    routes: &mut mpsc::Receiver<Routed>,
    announced: &PsLanes,
    spread: Spread,
    clock: &ReceiveClock,
) -> Result<Vec<LaneConn>> {
    let n = spread.connections() as usize;
    let mut more: Vec<Option<crate::dst::post_copy::FaultConn>> = (1..n).map(|_| None).collect();
    while more.iter().any(Option::is_none) {
        let what = "the session's lane connections";
        let Some(routed) = clock.within(routes.recv(), what).await? else {
            bail!("the accept loop stopped before the source's lane connections arrived");
        };
        let (c, tx, mut crx) = match routed {
            Routed::Lanes(lc) => lc,
            other => {
                bail!(
                    "the stop-and-copy source opened a {} connection",
                    other.kind()
                )
            }
        };
        let l = match clock.next(&mut crx, what).await? {
            Some(Frame::Control(Control {
                msg: Some(Msg::PsLanes(l)),
            })) => l,
            other => bail!("a lane connection opened with {other:?} instead of PsLanes"),
        };
        let slot = (l.index as usize)
            .checked_sub(1)
            .and_then(|i| more.get_mut(i))
            .filter(|s| s.is_none());
        match slot {
            Some(s) if l.lanes == announced.lanes && l.connections == announced.connections => {
                *s = Some((c, tx, crx));
            }
            _ => bail!(
                "a lane connection announced index {} of {} connections, {} lanes (the control \
                 connection: {} connections, {} lanes, indices 1.. each once)",
                l.index,
                l.connections,
                l.lanes,
                announced.connections,
                announced.lanes
            ),
        }
    }
    let mut all: Vec<LaneConn> = Vec::with_capacity(n);
    all.push((conn.clone(), None));
    all.extend(
        more.into_iter()
            .flatten()
            .map(|(c, tx, rx)| (c, Some((tx, rx)))),
    );
    Ok(all)
}

/// A connection carrying lanes, with its control stream (none for the control connection).
type LaneConn = (quinn::Connection, Option<(FrameSender, FrameReceiver)>);

/// Page bytes of a stop-and-copy session written between two free-space checks.
const DISK_CHECK_EVERY: u64 = 64 << 20;

/// Fails if the file system of `dir` has less than `min_free` bytes free.
fn check_free(dir: &Path, min_free: u64) -> Result<()> {
    let free = crate::limits::free_disk_bytes(dir)
        .with_context(|| format!("reading the free space of {} (statvfs)", dir.display()))?;
    if free < min_free {
        return Err(LimitHit::flag(
            format!(
                "free space on the file system of {} while writing the session ({} MiB left; \
                 free disk space, or lower it)",
                dir.display(),
                crate::limits::mib(free)
            ),
            format!("{} MiB left free", crate::limits::mib(min_free)),
            flag::MIN_FREE_DISK,
        )
        .into());
    }
    Ok(())
}

/// Runs the restore command (`criu restore -d` or the user's template) and waits for it.
fn restore(mut cmd: Command, log: &Path) -> Result<()> {
    let mut child = cmd
        .spawn()
        .with_context(|| format!("starting the restore {cmd:?}"))?;
    let deadline = Instant::now() + RESTORE_TIMEOUT;
    loop {
        if let Some(status) = child.try_wait()? {
            if status.success() {
                return Ok(());
            }
            bail!(
                "the restore failed ({status}). Last lines of {}:\n{}",
                log.display(),
                log_tail(log, 20)
            );
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            bail!("the restore did not finish within {RESTORE_TIMEOUT:?}");
        }
        std::thread::sleep(Duration::from_millis(2));
    }
}

async fn next(rx: &mut FrameReceiver) -> Result<Msg> {
    next_ctl(rx).await
}
