//! `pageserv src --lazy`: the source side of one migration.
//!
//! Order of events: connect to dst (mutual TLS) → hello → start or join the lazy dump and wait
//! for its status byte (the tasks are frozen from here on) → ship the images → dst restores →
//! serve faults and push every remaining page → dst says the memory is whole → end the dump
//! cleanly (CRIU kills the source tasks only now) → tell dst the source copy is gone.
//! Any failure before dst reports the restore finished makes the dump fail instead, so CRIU
//! resumes the source tasks.

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result, anyhow};
use tokio::sync::{mpsc, watch};

use crate::criu::images::ImageDir;
use crate::keys::Identity;
use crate::outcome::{self, SourceAction, SourceKnows};
use crate::pb::pageserv::{ResumeReady, SourceReleased, control::Msg};
use crate::preflight;
use crate::protocol::images::ship_images;
use crate::protocol::{self, next_ctl, send_ctl};
use crate::source::dump::{PageServerConn, ReadyDump, fail_dump};
use crate::source::frozen;
use crate::source::keeper::KeeperLink;
use crate::source::link_tasks::{Counters, Writers};
use crate::source::open_dump::open_dump;
use crate::source::pre_copy::held::HeldMemory;
use crate::source::pre_copy::{PreCopyReport, Validator};
use crate::source::pump::{FaultReply, PumpControl, PumpInput, Served, Tagged};
use crate::source::push_plan::PushPlan;
use crate::source::recovery::{self, DstConnections, MissingList, Reconnect};
use crate::source::report::{DumpPhases, SourceReport};
use crate::source::serving::{Serving, spawn_serving};
use crate::transport::{FrameReceiver, FrameSender};

/// Fetched batches waiting for the push stream.
const PUSH_SLOTS: usize = 4;

pub use crate::source::open_dump::DumpSource;
pub use crate::source::options::SourceOptions;
pub use crate::source::start::{CARRIED_OPTS_FILE, MIGRATION_ID_FILE, write_private};
use crate::source::start::{
    Start, dump_work_dir, read_carried_opts, rejoin, start_fresh, warn_rollback,
};

/// Runs one migration out of this host.
pub async fn run(mut opts: SourceOptions) -> Result<SourceReport> {
    let started = Instant::now();
    let id = Identity::load(&opts.certs)?;
    if let DumpSource::Pid { pid, extra } = &mut opts.dump {
        // Before anything freezes or crosses: refuse a dump that would fail, naming the option.
        let (pid, criu) = (*pid, opts.criu.clone());
        let given = extra.clone();
        let added =
            tokio::task::spawn_blocking(move || preflight::scan::prepare(pid, &given, &criu))
                .await??;
        extra.extend(added);
        std::fs::create_dir_all(&opts.work_dir)
            .and_then(|()| {
                use std::os::unix::fs::PermissionsExt;
                // The dump's images (the tree's non-lazy memory) and its keeper live here.
                std::fs::set_permissions(&opts.work_dir, std::fs::Permissions::from_mode(0o700))
            })
            .with_context(|| format!("creating {}", opts.work_dir.display()))?;
        let carried = crate::criu::opts::for_restore(extra);
        std::fs::write(opts.work_dir.join(CARRIED_OPTS_FILE), carried.join("\n"))
            .with_context(|| format!("writing {}", opts.work_dir.display()))?;
    }
    if let DumpSource::Resume { work } = &opts.dump
        && let Ok(old) = std::fs::read_to_string(work.join(MIGRATION_ID_FILE))
    {
        if let Some(start) = rejoin(&opts, &id, old.trim()).await {
            return drive(&opts, &id, start, started).await;
        }
        warn_rollback(old.trim());
    }
    let start = start_fresh(&opts, &id).await?;
    drive(&opts, &id, start, started).await
}

/// Resolves when the dump process pageserv started has exited (never for one it did not start).
async fn dump_exit(dump: &mut ReadyDump) -> std::process::ExitStatus {
    loop {
        if let Some(status) = dump
            .child
            .as_mut()
            .and_then(|c| c.try_wait().ok().flatten())
        {
            return status;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// `criu dump` died mid post-copy: what that means, plainly.
fn dump_died_error(dump: &ReadyDump, status: &std::process::ExitStatus) -> anyhow::Error {
    let pid = dump.child.as_ref().map_or(0, |c| c.id());
    if let Some(f) = &dump.freezer {
        return anyhow!(
            "the dump (pid {pid}, runc checkpoint) died in the middle of the post-copy \
             ({status}): the container's tasks stayed frozen in {}, but no more pages can be \
             served from them and the restored copy at dst can never be completed: pageserv \
             tells dst to kill it, then thaws the source container, which is the live copy; \
             migrate it again once the cause is fixed{}",
            f.dir().display(),
            dump.log
                .as_ref()
                .map(|l| format!(" (CRIU's log: {})", l.display()))
                .unwrap_or_default()
        );
    }
    anyhow!(
        "criu dump (pid {pid}) died in the middle of the post-copy ({status}): the kernel released \
         the source tasks it held frozen and they RUN AGAIN at the source, from the state they \
         were frozen in. Their memory is changing, so no more pages can be served from them and \
         the restored copy at dst can never be completed: pageserv tells dst to kill it (what it \
         did since the restore is lost; files it wrote keep their changes). The source copy is \
         the live one; migrate it again once the cause is fixed{}",
        dump.log
            .as_ref()
            .map(|l| format!(" (dump log: {})", l.display()))
            .unwrap_or_default()
    )
}

/// From the freeze to the end: opens (or takes over) the dump and runs the migration.
async fn drive(
    opts: &SourceOptions,
    id: &Identity,
    start: Start,
    started: Instant,
) -> Result<SourceReport> {
    // From here on the tasks are frozen: every failure path must resume or keep them.
    let (mut dump, mut keeper) = open_dump(&opts.criu, &opts.dump, &opts.work_dir).await?;
    let earlier_attempt = matches!(opts.dump, DumpSource::Resume { .. });
    // The downtime is counted from the freeze when it was seen, else from the dump's start.
    let frozen_at = dump.frozen_seen_at.unwrap_or(dump.started_at);
    let dump_phases = dump_phases(&dump);
    tracing::info!(
        elapsed_ms = started.elapsed().as_millis() as u64,
        criu_freeze_ms = dump_phases.map(|p| p.criu_freeze_ms),
        "dump ready, tasks frozen"
    );
    tracing::info!(
        migration = %protocol::id_tag(&start.migration_id),
        "migration under way (dst logs it by this tag)"
    );
    if let Some(dir) = dump_work_dir(opts)
        && let Err(e) = write_private(&dir.join(MIGRATION_ID_FILE), &start.migration_id)
    {
        tracing::warn!(dir = %dir.display(), "cannot record the migration id (a --resume will start over): {e}");
    }

    let Start {
        mut link,
        fault_stream,
        migration_id,
        pre,
        rejoin,
        wire_at_freeze,
    } = start;
    let reconnect = Reconnect {
        id,
        to: opts.to,
        dst_name: &opts.dst_name,
        migration_id: &migration_id,
        criu_version: opts.criu.version.to_string(),
        push_transport: &opts.push_transport,
        fault_transport: &opts.fault_transport(),
    };
    // Bytes sent on links that died before the current one.
    let mut wire_dead_links = 0u64;
    let result = migrate(
        opts,
        &mut link,
        &reconnect,
        &mut wire_dead_links,
        fault_stream,
        &mut dump,
        frozen_at,
        &mut keeper,
        earlier_attempt,
        pre,
        rejoin,
    )
    .await;
    let link_tx_bytes = link.tx_bytes();
    let path = link.conn.stats().path;
    let wire_after_freeze = (wire_dead_links + link_tx_bytes).saturating_sub(wire_at_freeze);
    let DstConnections {
        conn, fault_conn, ..
    } = link;
    fault_conn.close(0u32.into(), b"done");
    match result {
        Ok(mut report) => {
            report.total_ms = started.elapsed().as_secs_f64() * 1e3;
            report.redumps = dump.redumps;
            report.eager_dump = dump.eager;
            report.dump_phases = dump_phases;
            report.wire_bytes_after_freeze = wire_after_freeze;
            report.path_mtu = path.current_mtu;
            report.path_black_holes = path.black_holes_detected;
            report.peak_rss_bytes = peak_rss_bytes();
            report.usage = crate::usage::ServiceUsage::measure(
                report.total_ms,
                wire_dead_links + link_tx_bytes,
            );
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

/// How the dump's time up to its ready byte split, if its freeze was seen.
fn dump_phases(dump: &ReadyDump) -> Option<DumpPhases> {
    let (seen, ready_at) = (dump.frozen_seen_at?, dump.ready_at);
    let ms = |d: std::time::Duration| d.as_secs_f64() * 1e3;
    Some(DumpPhases {
        before_freeze_ms: ms(seen.duration_since(dump.started_at).unwrap_or_default()),
        criu_freeze_ms: ms(ready_at.duration_since(seen).unwrap_or_default()),
    })
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

#[allow(clippy::too_many_arguments)]
async fn migrate(
    opts: &SourceOptions,
    link: &mut DstConnections,
    reconnect: &Reconnect<'_>,
    wire_dead_links: &mut u64,
    fault_stream: (FrameSender, FrameReceiver),
    dump: &mut ReadyDump,
    frozen_at: SystemTime,
    keeper: &mut Option<KeeperLink>,
    earlier_attempt: bool,
    pre: Option<(HeldMemory, PreCopyReport)>,
    rejoin: Option<(MissingList, ResumeReady)>,
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
        // A zombie has no memory (and no pagemap image).
        if !images.has_memory(t.pid)? {
            tasks.push((t.pid, Vec::new()));
            continue;
        }
        let entries = images.pagemap(t.pid)?.entries;
        let lazy = entries
            .iter()
            .filter(|e| e.flags.is_lazy() && !e.flags.is_present())
            .map(|e| crate::pages::PageRange::new(e.vaddr, e.nr_pages))
            .collect();
        tasks.push((t.pid, lazy));
    }
    let make_plan = || {
        let mut plan = PushPlan::new(tasks.clone());
        if let Some(v) = &validator {
            // Memory that kept changing during the rounds most likely changed after them too.
            plan.prioritize(|pid, range| v.held().heat(pid, range));
        }
        plan
    };
    let plan = make_plan();
    report.lazy_pages = plan.total_pages();
    // From the images on dst may restore: a container's tasks are held by its freezer too.
    hold_in_freezer(dump);
    let shipped = if rejoin.is_some() {
        // dst restored from the images the dead src shipped.
        knows.images_shipped = true;
        Ok(0)
    } else {
        let carried = dump_work_dir(opts)
            .map(|d| read_carried_opts(&d))
            .unwrap_or_default();
        ship_images(&mut link.ctl, &dump.images_dir, frozen_at, carried, || {
            // Before ImagesDone leaves: from then on dst may restore, and the keeper must know
            // it even if this process dies the next instant.
            knows.images_shipped = true;
            if let Some(k) = keeper.as_mut() {
                k.images_shipped();
            }
        })
        .await
    };
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

    // The pump owns the dump's socket from here; the control flow below only steers it. It
    // outlives any one link to dst: a reconnect only replaces the tasks that write to QUIC.
    let (pump_tx, pump_rx) = mpsc::unbounded_channel::<PumpInput>();
    let (reply_tx, reply_rx) = mpsc::unbounded_channel::<Tagged<FaultReply>>();
    // Each slot holds one fetched batch (at most 4 MiB): this bounds what the source buffers
    // when QUIC is slower than CRIU.
    let (push_tx, push_rx) = mpsc::channel::<Tagged<Served>>(PUSH_SLOTS);
    let (control_tx, control_rx) = watch::channel(None);
    let layout = opts.criu.layout();
    let conn_taken = std::mem::replace(
        &mut dump.conn,
        PageServerConn::Unix(std::os::unix::net::UnixStream::pair()?.0),
    );
    // After the freeze the lazy pages are read from the frozen tasks when pageserv started the
    // dump (it knows the tree and the tracer to verify); else through CRIU's connection.
    let frozen = match (&opts.dump, dump.child.as_ref()) {
        (DumpSource::Pid { pid, .. }, Some(child)) if opts.pump.read_frozen => {
            // Tasks with lazy memory (a zombie has none, and is not ptrace-stopped).
            let image_pids: Vec<u32> = tasks
                .iter()
                .filter(|(_, lazy)| !lazy.is_empty())
                .map(|(p, _)| *p)
                .collect();
            match frozen::prepare(*pid, child.id(), &image_pids, plan, opts.pump.batch_pages) {
                Ok(f) => Some(f),
                Err(e) => {
                    tracing::warn!(
                        "cannot serve from the frozen tasks ({e}): every page comes through \
                         CRIU's page-server connection"
                    );
                    None
                }
            }
        }
        _ => {
            tracing::info!(
                "serving lazy pages through the dump's page-server connection (external dump, \
                 --resume, or reading frozen memory turned off)"
            );
            None
        }
    };
    let serving = match frozen {
        Some((core, ftasks)) => Serving::Frozen(Box::new(core), ftasks, tasks),
        None => Serving::PageServer(make_plan()),
    };
    let channels = (pump_rx, reply_tx, push_tx, control_rx);
    let pump_task = match conn_taken {
        PageServerConn::Unix(s) => {
            s.set_nonblocking(true)?;
            let s = tokio::net::UnixStream::from_std(s)?;
            spawn_serving(s, layout, true, serving, opts.pump, channels)
        }
        PageServerConn::Tcp(s) => {
            s.set_nonblocking(true)?;
            let s = tokio::net::TcpStream::from_std(s)?;
            spawn_serving(s, layout, false, serving, opts.pump, channels)
        }
    };

    let writers = Writers {
        push_rx: Arc::new(tokio::sync::Mutex::new(push_rx)),
        reply_rx: Arc::new(tokio::sync::Mutex::new(reply_rx)),
        to_pump: pump_tx.clone(),
        validator: validator.clone(),
        counters: Arc::new(Counters::default()),
        bar: opts.progress.then(|| {
            crate::stats::progress_bar(report.lazy_pages * crate::pages::PAGE_SIZE, "pushing")
        }),
    };
    let mut generation = 0u64;
    if let Some((missing, ready)) = rejoin {
        generation = 1;
        let left = match replan(&pump_tx, generation, missing).await {
            Ok(n) => n,
            Err(e) => {
                let _ = control_tx.send(Some(PumpControl::Detach));
                let _ = pump_task.await;
                return Err(settle(e, &mut knows, keeper, dump));
            }
        };
        tracing::info!(missing_pages = left, "pushing what dst still lacks");
        if ready.restore_finished {
            restore_finished(
                &mut knows,
                &mut report,
                &control_tx,
                frozen_at,
                ready.finished_at_unix_ns,
            )?;
        }
    }
    let mut tasks = writers.start(link, fault_stream, generation).await?;

    // Wait for the restore to finish and the memory to become whole, across reconnects.
    let mut dump_died = None;
    let outcome: Result<()> = loop {
        let msg = tokio::select! {
            m = next_ctl(&mut link.ctl_rx) => m,
            status = dump_exit(dump) => {
                let e = dump_died_error(dump, &status);
                dump_died = Some(status);
                break Err(e);
            }
        };
        match msg {
            Ok(Msg::RestoreStarted(_)) => tracing::info!(
                ms_after_dump_ready = SystemTime::now()
                    .duration_since(dump.ready_at)
                    .map_or(0.0, |d| d.as_secs_f64() * 1e3),
                "dst started the restore"
            ),
            Ok(Msg::RestoreFinished(f)) => {
                restore_finished(
                    &mut knows,
                    &mut report,
                    &control_tx,
                    frozen_at,
                    f.finished_at_unix_ns,
                )?;
            }
            Ok(Msg::RestoreFailed(f)) => {
                knows.dst_reported_restore_failed = true;
                // dst sends no log tail any more (its log keeps it); an older dst may.
                let tail = if f.log_tail.is_empty() {
                    String::new()
                } else {
                    format!("\n{}", f.log_tail)
                };
                break Err(anyhow!("the restore failed at dst: {}{tail}", f.reason));
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
            Err(e) => {
                let recoverable = knows.images_shipped
                    && !opts.recover_timeout.is_zero()
                    && recovery::link_lost(&link.conn);
                if !recoverable {
                    break Err(e.context("control stream from dst"));
                }
                tracing::warn!(
                    recover_timeout_s = opts.recover_timeout.as_secs_f64(),
                    "the link to dst died mid post-copy ({e:#}); the source stays frozen while \
                     pageserv reconnects"
                );
                tasks.stop().await;
                *wire_dead_links += link.tx_bytes();
                let deadline = tokio::time::Instant::now() + opts.recover_timeout;
                let resumed = match recovery::reconnect(reconnect, deadline).await {
                    Ok(r) => r,
                    Err(re) => break Err(re.context(format!("the link to dst died ({e:#})"))),
                };
                generation += 1;
                report.reconnects += 1;
                let left = match replan(&pump_tx, generation, resumed.missing).await {
                    Ok(n) => n,
                    Err(e) => break Err(e),
                };
                tracing::info!(
                    generation,
                    missing_pages = left,
                    "pushing what dst still lacks"
                );
                *link = resumed.link;
                if resumed.ready.restore_finished && !knows.restore_finished {
                    restore_finished(
                        &mut knows,
                        &mut report,
                        &control_tx,
                        frozen_at,
                        resumed.ready.finished_at_unix_ns,
                    )?;
                }
                tasks = writers
                    .start(link, resumed.fault_stream, generation)
                    .await?;
            }
        }
    };

    if let (Some(_), Err(e)) = (&dump_died, &outcome) {
        // The kernel let the source tasks go: nothing can be served from them any more, and
        // the restored copy can never be completed. dst kills it (the Abort) before any missing
        // page reads as zero; the source copy keeps running.
        let reason = format!("{e:#}");
        let told = send_ctl(
            &mut link.ctl,
            Msg::Abort(crate::pb::pageserv::Abort { reason }),
        )
        .await;
        let _ = control_tx.send(Some(PumpControl::Detach));
        let _ = tokio::time::timeout(Duration::from_secs(5), pump_task).await;
        tasks.stop().await;
        if let Some(k) = keeper.take() {
            k.release();
        }
        let _ = tokio::time::timeout(Duration::from_secs(5), link.conn.closed()).await;
        // A container's tasks waited in the freezer: the source copy is the live one now that
        // dst was told to kill its copy; if it could not be told, they stay frozen.
        return match (told, outcome) {
            (Ok(()), o) => {
                release_freezer(dump, "the dump died; dst was told to kill its copy");
                o.map(|_| report)
            }
            (Err(t), Err(e)) if dump.freezer.is_some() => Err(e.context(format!(
                "dst could not be told to kill its copy ({t:#}), so the source container stays \
                 frozen (runc shows it paused): `runc resume` it only once no restored copy \
                 runs at dst"
            ))),
            (Err(_), o) => o.map(|_| report),
        };
    }
    let action = outcome::source_action(knows);
    let decision = match action {
        SourceAction::End => PumpControl::Finish,
        SourceAction::Resume => PumpControl::Abort,
        SourceAction::KeepFrozen => PumpControl::Detach,
    };
    let _ = control_tx.send(Some(decision));
    let pump_stats = pump_task.await.context("the pump task panicked")?;
    // CRIU acknowledged the close (it kills the tasks next) or was made to fail (it resumes
    // them): either way it still holds them, and a frozen cgroup would only stall it.
    if action != SourceAction::KeepFrozen {
        release_freezer(dump, "the dump ends");
    }
    let push_result = tasks.finish().await;
    if let Some(b) = &writers.bar {
        b.finish_and_clear();
    }
    if let Err(e) = outcome {
        return Err(settle(e, &mut knows, keeper, dump));
    }
    let pump_stats = pump_stats?;
    push_result?;
    report.pump = pump_stats;
    report.push_frames = writers.counters.frames.load(Relaxed);
    report.push_bytes = writers.counters.bytes.load(Relaxed);
    report.zero_pages = writers.counters.zero_pages.load(Relaxed);
    report.fault_service_before_push = writers.counters.fault_service_before_push.summary(0);
    report.fault_service_during_push = writers.counters.fault_service_during_push.summary(0);
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
        &mut link.ctl,
        Msg::SourceReleased(SourceReleased {
            dump_ok,
            detail: String::new(),
        }),
    )
    .await?;
    link.ctl.finish();
    Ok(report)
}

/// Hands the pump dst's missing list for link `generation`; returns the pages to push.
async fn replan(
    pump_tx: &mpsc::UnboundedSender<PumpInput>,
    generation: u64,
    missing: MissingList,
) -> Result<u64> {
    let (reply, answer) = tokio::sync::oneshot::channel();
    pump_tx
        .send(PumpInput::Replan {
            generation,
            missing,
            reply,
        })
        .map_err(|_| anyhow!("the pump stopped during the reconnect"))?;
    match answer.await {
        Ok(Ok(n)) => Ok(n),
        Ok(Err(why)) => Err(anyhow!(
            "dst's list of missing pages does not match the dump ({why}): is it the same migration?"
        )),
        Err(_) => Err(anyhow!("the pump stopped during the reconnect")),
    }
}

/// dst reported the restore finished (restored tasks run): start the push.
fn restore_finished(
    knows: &mut SourceKnows,
    report: &mut SourceReport,
    control_tx: &watch::Sender<Option<PumpControl>>,
    frozen_at: SystemTime,
    finished_at_unix_ns: u64,
) -> Result<()> {
    knows.restore_finished = true;
    let _ = control_tx.send(Some(PumpControl::StartPush));
    let frozen = frozen_at.duration_since(UNIX_EPOCH)?.as_nanos() as u64;
    report.downtime_ms = finished_at_unix_ns.saturating_sub(frozen) as f64 / 1e6;
    tracing::info!(downtime_ms = report.downtime_ms, "restore finished at dst");
    Ok(())
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
                     --resume {w}` (it continues the migration if dst still runs it or adopted \
                     it after a restart on the same --work; otherwise it rolls the process back \
                     to its freeze point); or settle it: `pageserv frozen {w} --kill-source` (or \
                     --resume-source, only if no restored copy runs anywhere)",
                    w = work.display()
                ))
            } else if let Some(f) = &dump.freezer {
                e.context(format!(
                    "a restored copy may have run at dst, so the source container stays frozen \
                     in {} (runc shows it paused): `runc resume` it only once no restored copy \
                     runs at dst, else `runc delete --force` it",
                    f.dir().display()
                ))
            } else {
                e.context("the source dump has no keeper (external dump): what CRIU does next depends on how it ends")
            }
        }
        SourceAction::Resume | SourceAction::End => {
            if let Some(k) = keeper.take() {
                k.release();
            }
            release_freezer(dump, "the migration failed before dst ran its copy");
            e
        }
    }
}

/// A container dump: freezes its cgroup (see [`crate::freezer`]), so that a dump dying from
/// here on leaves its tasks stopped. A cgroup that cannot be frozen is named, and the
/// migration goes on unprotected, as without a freezer.
fn hold_in_freezer(dump: &ReadyDump) {
    let Some(f) = &dump.freezer else { return };
    match f.freeze_and_wait(Duration::from_secs(2)) {
        Ok(()) => tracing::info!(
            cgroup = %f.dir().display(),
            "froze the container's cgroup: a dump dying from here on leaves its tasks stopped"
        ),
        Err(e) => tracing::warn!(
            "could not freeze the container's cgroup ({e}): a dump dying mid post-copy would \
             let the source container run again"
        ),
    }
}

/// Thaws a container's cgroup frozen by [`hold_in_freezer`] (CRIU holds or releases its
/// tasks from here).
fn release_freezer(dump: &ReadyDump, why: &str) {
    let Some(f) = &dump.freezer else { return };
    match f.thaw() {
        Ok(()) => {
            tracing::info!(cgroup = %f.dir().display(), "thawed the container's cgroup: {why}")
        }
        Err(e) => tracing::error!("{why}, but {e}"),
    }
}
