//! `pageserv dst`: the destination side of one post-copy migration, once
//! [`crate::dst::endpoint`] has accepted it and answered its hello.
//!
//! Order of events: the source's fault connection → start `criu restore --stream`, which waits
//! for its images (unless `--late-restore`; [`crate::dst::early_restore`]) → receive the images →
//! listen on `lazy-pages.socket` → send the restore on (or start it) → take each restored task's
//! userfaultfd → the restore finishes (the tasks run from here) → serve faults and take the
//! pushed pages until every lazy page is in place → tell the source → it ends the dump → close
//! the uffds and exit.
//! From the restore on, dst::post_copy drives the link (and its recovery).

use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};
use tokio::sync::mpsc;

use crate::criu::binary::log_tail;
use crate::dst::answer_watch::AnswerWatch;
use crate::dst::early_restore::EarlyRestore;
use crate::dst::fault_requests;
use crate::dst::image_sink::ImageSink;
use crate::dst::options::DstOptions;
use crate::dst::page_store::PageStore;
use crate::dst::post_copy::{End, LocalPages, PostCopy, Routed, Step, Wiring, unix_ns};
use crate::dst::receive_clock::ReceiveClock;
use crate::dst::restore_start::{
    FaultThreadIo, PreCopyMismatch, Started, check_images, start_restore,
};
use crate::dst::uffd_loop::{Inbound, Outbound, UffdStats};
use crate::limits::DstLimits;
use crate::pb::pageserv::{
    Abort, Control, Hello, MemoryWhole, RestoreFailed, RestoreFinished, RestoreStarted,
    control::Msg,
};
use crate::protocol::{peer_error, send_ctl};
use crate::stats::DstReport;
use crate::transport::{FrameReceiver, FrameSender};
use crate::wire::Frame;

/// Runs one post-copy migration whose control stream and hello `ctl` were accepted on `conn`
/// (the hellos are exchanged: see [`crate::dst::endpoint`]), which took it at `started`.
pub(crate) async fn migrate_in(
    opts: &DstOptions,
    conn: &quinn::Connection,
    ctl: (FrameSender, FrameReceiver, Hello),
    routes: mpsc::Receiver<Routed>,
    started: Instant,
    fault_port: u16,
) -> Result<DstReport> {
    let clock = ReceiveClock::start(&opts.limits);
    let (ctl, ctl_rx, hello) = ctl;
    let mut routes = routes;
    // The source's second connection carries only faults (see source::service); it must exist
    // before the restore starts, since restored tasks fault from their first instruction.
    let wait = Duration::from_secs(30).min(opts.limits.receive_idle);
    let fault = match tokio::time::timeout(wait, routes.recv()).await {
        Ok(Some(Routed::Faults(f))) => f,
        Ok(Some(Routed::Resume { .. })) => {
            bail!("the source tried to resume a migration that has not started")
        }
        Ok(Some(Routed::Lanes(_))) => {
            bail!("the source opened a stop-and-copy lanes connection for a post-copy migration")
        }
        Ok(None) => bail!("the accept loop stopped before the fault connection arrived"),
        Err(_) => bail!(
            "the source did not open its fault connection within {} s",
            wait.as_secs()
        ),
    };
    let dir = crate::dst::options::fresh_dir(
        &opts.work_base,
        &crate::protocol::id_tag(&hello.migration_id),
    )?;
    let r = run_in(
        opts,
        conn,
        (ctl, ctl_rx, hello),
        routes,
        started,
        (fault, fault_port),
        clock,
        &dir,
    )
    .await;
    crate::dst::options::leave_dir(&dir, r, opts.keep_work)
}

/// `criu restore` started now, before the source freezes, when dst's options allow it
/// ([`crate::dst::early_restore`]), with the restore options the source's `hello` announced.
/// `None` (the restore starts once the images are in) if they do not, or if it cannot start.
fn start_early(opts: &DstOptions, dir: &Path, work: &Path, hello: &Hello) -> Option<EarlyRestore> {
    if !opts.restore.starts_early() {
        return None;
    }
    if let Some(why) = crate::criu::stream_restore::option_blocker(&opts.restore.extra) {
        tracing::info!("not starting the restore early: {why}");
        return None;
    }
    let carried = match crate::criu::opts::accept(&hello.restore_criu_opts) {
        Ok(c) => c,
        Err(e) => {
            tracing::warn!("not starting the restore early: {e}");
            return None;
        }
    };
    match EarlyRestore::start(
        &opts.criu,
        &dir.join("stream"),
        work,
        &opts.restore,
        carried,
    ) {
        Ok(e) => e,
        Err(e) => {
            tracing::warn!(
                "not starting the restore early (it starts once the images are in): {e}"
            );
            None
        }
    }
}

/// [`migrate_in`] once the fault connection arrived, in the migration's directory `dir`.
#[allow(clippy::too_many_arguments)]
async fn run_in(
    opts: &DstOptions,
    conn: &quinn::Connection,
    ctl: (FrameSender, FrameReceiver, Hello),
    mut routes: mpsc::Receiver<Routed>,
    started: Instant,
    (fault, fault_port): (crate::dst::post_copy::FaultConn, u16),
    clock: ReceiveClock,
    dir: &Path,
) -> Result<DstReport> {
    let mut report = DstReport::default();
    let (mut ctl, mut ctl_rx, hello) = ctl;
    // 0600: the id (with the source's certificate) joins the migration; the certificate is
    // recorded too, for a restarted dst that adopts it.
    let opener = crate::transport::peer_identity(conn)
        .context("the control connection has no verified peer certificate")?;
    crate::dst::options::record_opener(
        dir,
        &hello.migration_id,
        &opener.fingerprint,
        &opener.all_names().join(","),
    )?;
    let images_dir = dir.join("images");
    let work = dir.join("work");
    for d in [&images_dir, &work] {
        std::fs::create_dir_all(d).with_context(|| format!("creating {}", d.display()))?;
    }
    // Dropped on every early return below, which kills it: nothing was restored.
    let early = start_early(opts, dir, &work, &hello);
    let mut store = None;
    let received = receive_images(&mut ctl_rx, &images_dir, &mut store, &opts.limits, &clock).await;
    let (frozen_at_ns, images_bytes, carried) = match received {
        Ok(r) => r,
        Err(e) => {
            let reason = format!("{e:#}");
            return Err(abort_before_restore(&mut ctl, conn, reason, e).await);
        }
    };
    if !carried.is_empty() {
        tracing::info!(options = ?carried, "the source's dump calls for these restore options");
    }
    report.images_bytes = images_bytes;
    if let Some(s) = &store {
        report.precopy_pages_held = s.pages_data() + s.pages_zero();
        report.page_store_bytes = s.bytes();
        tracing::info!(
            data = s.pages_data(),
            zero = s.pages_zero(),
            "pre-copied pages held in the page store"
        );
    }
    let (lazy, nr_tasks) = match check_images(&images_dir, &mut store, &mut report) {
        Ok(r) => r,
        Err(e) => {
            // The source resumes its tree. It learns why if its own data disagrees; image errors
            // name this host's paths, which stay in its log.
            tracing::error!("checking the received images: {e:#}");
            let reason = match e.downcast_ref::<PreCopyMismatch>() {
                Some(m) => m.to_string(),
                None => peer_error("the destination refused the images", &hello.migration_id),
            };
            return Err(abort_before_restore(&mut ctl, conn, reason, e).await);
        }
    };
    let lazy_all = lazy.clone();
    let store = store.map(Arc::new);
    let pages_local = Arc::new(AtomicU64::new(0));
    let images_at = Instant::now();

    let held = LocalPages::new(store.clone(), pages_local.clone());
    let answers = crate::dst::post_copy::answer_watch(&opts.limits);
    let (sink, mut ev_rx, requests) = bridge(answers.clone());
    let started_restore = start_restore(
        opts,
        dir,
        &images_dir,
        &work,
        &carried,
        &lazy,
        FaultThreadIo {
            held: Arc::new(held.clone()),
            sink,
        },
        early,
    );
    let Started {
        keeper,
        handle,
        stats,
        socket,
        mut restore,
        early,
    } = match started_restore {
        Ok(s) => s,
        Err(e) => {
            // This host's paths and state stay in its log; the source learns only that it failed.
            tracing::error!("could not start the restore: {e:#}");
            let reason = peer_error(
                "the destination could not start the restore",
                &hello.migration_id,
            );
            return Err(abort_before_restore(&mut ctl, conn, reason, e).await);
        }
    };
    report.restore_early = early;
    let keeper_copy = keeper.clone();
    let mut keeper = Some(keeper);
    send_ctl(
        &mut ctl,
        Msg::RestoreStarted(RestoreStarted { root_pid: 0 }),
    )
    .await?;

    // Hand the restore's uffds to the fault loop as they arrive.
    let to_loop = handle.sender();
    let mut restore_side = tokio::task::spawn_blocking(move || -> Result<()> {
        let mut rc = socket.accept_restore_within(nr_tasks, Duration::from_secs(120))?;
        for _ in 0..nr_tasks {
            let t = rc.next_task()?;
            match t.uffd {
                Some(uffd) => {
                    // The keeper needs the host pid to kill the task; without it, no protection.
                    let host = t
                        .sender_pid
                        .context("the restore sent a uffd without credentials")?;
                    keeper_copy
                        .hold(t.pid, host, std::os::fd::AsFd::as_fd(&uffd))
                        .context("handing a uffd to the keeper")?;
                    // A task the images do not have would get no lazy ranges: every fault
                    // zero-filled. Never serve it (the failure rule kills what was restored).
                    let Some(ranges) = u32::try_from(t.pid)
                        .ok()
                        .and_then(|p| lazy.get(&p))
                        .cloned()
                    else {
                        bail!(
                            "the restore handed over the userfaultfd of pid {}, which is not in \
                             the images (pids {:?}): refusing to serve it, its memory would be \
                             zero-filled",
                            t.pid,
                            lazy.keys().collect::<Vec<_>>()
                        );
                    };
                    to_loop.send(Inbound::Task {
                        pid: t.pid,
                        uffd,
                        lazy: ranges,
                        host_pid: t.sender_pid,
                    })?;
                }
                None => to_loop.send(Inbound::Zombie { pid: t.pid })?,
            }
        }
        // The tasks run only once the restore has handed over every uffd.
        keeper_copy.tasks_held();
        rc.wait_restore_finished()?;
        to_loop.send(Inbound::RestoreFinished)?;
        Ok(())
    });

    let wiring = Wiring {
        to_loop: handle.sender(),
        held: held.clone(),
        recover_timeout: opts.recover_timeout,
        lazy: lazy_all,
        fault_port,
        requests,
        answers,
    };
    let mut post = PostCopy::new(wiring, conn.clone(), ctl, ctl_rx, fault);

    // One loop for the whole post-copy: the restore may fault before it finishes, so faults are
    // forwarded from the first task on.
    let mut restored = false;
    let mut post_copy_start = Instant::now();
    let mut tick = tokio::time::interval(Duration::from_millis(50));
    let outcome: Result<End> = loop {
        let step = tokio::select! {
            s = post.next(&mut ev_rx, &mut routes, &mut tick) => s,
            r = &mut restore_side, if !restored => {
                if let Err(e) = r.context("restore-side thread panicked").and_then(|r| r) {
                    break Err(e.context("taking the restored tasks' userfaultfds"));
                }
                restored = true;
                post_copy_start = Instant::now();
                restore_finished(&mut post, &mut report, frozen_at_ns, images_at, dir).await?;
                continue;
            }
        };
        match step {
            Err(e) => break Err(e),
            Ok(Step::Done(end)) => break Ok(end),
            Ok(Step::Idle) => {
                if !restored
                    && let Some(status) = restore.try_wait()?
                    && let Err(e) = restore.check(status)
                {
                    break Err(e.into());
                }
            }
            // The fault loop judges completion only after the restore finished, but the
            // restore side may not have been polled yet: join it first.
            Ok(Step::Event(Outbound::Complete)) => {
                if !restored {
                    if let Err(e) = (&mut restore_side)
                        .await
                        .context("restore-side thread panicked")
                        .and_then(|r| r)
                    {
                        break Err(e);
                    }
                    restored = true;
                    restore_finished(&mut post, &mut report, frozen_at_ns, images_at, dir).await?;
                }
                // Every lazy page is in place: the restored copy is the live one from now on.
                if let Some(k) = keeper.take() {
                    k.release();
                }
                report.post_copy_ms = post_copy_start.elapsed().as_secs_f64() * 1e3;
                report.pages_local = pages_local.load(Relaxed);
                report.pages_taken_at_fault = held.taken_at_fault.load(Relaxed);
                memory_whole(&mut post, &mut report, &stats).await;
                // After the source knows: giving the rest of the store back (and waiting for a
                // release round under way) must not hold up the end of its dump.
                report.page_store_released_bytes = held.release_now() * crate::pages::PAGE_SIZE;
            }
            Ok(Step::Event(Outbound::TaskGone { pid })) => {
                tracing::info!(pid, "restored task exited")
            }
            Ok(Step::Event(Outbound::Error(e))) => break Err(anyhow!("fault loop: {e}")),
            Ok(Step::Event(other)) => tracing::debug!("fault loop: {other:?}"),
        }
    };
    report.reconnects = post.reconnects;
    report.bytes_received = post.bytes_received();
    let end = match outcome {
        Ok(end) => end,
        Err(e) => {
            // Never let the kernel zero-fill what has not arrived: kill incomplete tasks first.
            let shut = tokio::task::spawn_blocking(move || handle.shutdown(true)).await;
            tracing::warn!(?shut, "stopped the fault loop after a failure");
            let e = if restored {
                restore.delete_stopped_container();
                e
            } else {
                with_criu_errors(e, &restore.log)
            };
            if !restored {
                // The source learns that it failed, not why: CRIU's log and the error chain
                // name this host's paths and state; they stay in its log.
                tracing::error!(
                    "restore failed: {e:#}\nlast lines of {}:\n{}",
                    restore.log.display(),
                    log_tail(&restore.log, 20)
                );
                let link_up = post.link_up();
                post.tell(Msg::RestoreFailed(RestoreFailed {
                    reason: peer_error("restore failed at the destination", &hello.migration_id),
                    log_tail: String::new(),
                }))
                .await;
                restore.kill();
                // src may resume the source only if it reads this report (see outcome): closing
                // now could drop it in flight, so wait for src to close first (it does once it
                // read it).
                if link_up {
                    let _ = tokio::time::timeout(Duration::from_secs(5), conn.closed()).await;
                }
            }
            post.close(
                1,
                peer_error(
                    "the migration failed at the destination",
                    &hello.migration_id,
                )
                .as_bytes(),
            );
            return Err(e);
        }
    };
    if matches!(end, End::WholeNoRelease) {
        tracing::warn!("the source did not confirm it ended its dump; check it is gone there");
    }
    post.close(0, b"done");
    handle
        .send(Inbound::Shutdown {
            kill_incomplete: false,
        })
        .ok();
    drop(store);
    // `criu restore -d` exits once the tree is released; reap it.
    for _ in 0..100 {
        if restore.try_wait()?.is_some() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    report.restored_pid = restore.root_pid();
    report.total_ms = started.elapsed().as_secs_f64() * 1e3;
    Ok(report)
}

/// Tells the source that the migration failed before any restore started (it resumes its tree:
/// nothing was restored), waits briefly for it to close, and returns `e`.
async fn abort_before_restore(
    ctl: &mut FrameSender,
    conn: &quinn::Connection,
    reason: String,
    e: anyhow::Error,
) -> anyhow::Error {
    send_ctl(ctl, Msg::Abort(Abort { reason })).await.ok();
    let _ = tokio::time::timeout(Duration::from_secs(2), conn.closed()).await;
    e
}

/// The fault loop's outbound events, handed into async from the fault loop itself (no
/// thread in between: each hop through one cost a context switch per fault, and crossbeam's
/// blocking receive spins and yields before it parks). Fault requests go straight to their
/// writer on the fault lane, in the order the fault loop raised them relative to its resume
/// answers (see dst::fault_requests); everything else to the migration's event receiver.
pub(crate) struct Bridge {
    requests: mpsc::UnboundedSender<fault_requests::Cmd>,
    events: mpsc::UnboundedSender<Outbound>,
}

impl crate::dst::uffd_loop::OutboundSink for Bridge {
    fn deliver(&mut self, ev: Outbound) -> bool {
        match ev {
            Outbound::Fault(r) => self.requests.send(fault_requests::Cmd::Fault(r)).is_ok(),
            Outbound::Resumed { .. } => {
                let _ = self.requests.send(fault_requests::Cmd::Queue);
                self.events.send(ev).is_ok()
            }
            ev => self.events.send(ev).is_ok(),
        }
    }
}

/// The fault loop's sink ([`Bridge`]), the migration's receiver of its other events, and the
/// fault requests' command channel.
pub(crate) fn bridge(
    answers: Arc<Mutex<AnswerWatch>>,
) -> (
    Bridge,
    mpsc::UnboundedReceiver<Outbound>,
    mpsc::UnboundedSender<fault_requests::Cmd>,
) {
    let (events, ev_rx) = mpsc::unbounded_channel::<Outbound>();
    let requests = fault_requests::spawn(answers);
    let sink = Bridge {
        requests: requests.clone(),
        events,
    };
    (sink, ev_rx, requests)
}

/// A failed restore's error with CRIU's own last `Error` lines (the cause is usually there,
/// e.g. a file whose size changed since the dump).
fn with_criu_errors(e: anyhow::Error, log: &Path) -> anyhow::Error {
    let errors = crate::criu::binary::log_errors(log, 3);
    let text = format!("{e:#}");
    if errors.is_empty() || errors.iter().all(|l| text.contains(l.as_str())) {
        return e;
    }
    e.context(format!(
        "the restore failed; CRIU's last errors (full log: {}):\n  {}",
        log.display(),
        errors.join("\n  ")
    ))
}

/// Every lazy page is in place: the report's counters from the fault loop's, and the source
/// is told (now, or when it comes back).
pub(crate) async fn memory_whole(post: &mut PostCopy, report: &mut DstReport, stats: &UffdStats) {
    let c = stats.counters();
    report.pages_on_demand = c.pages_copied_urgent;
    report.pages_pushed = c.pages_copied_pushed;
    report.pages_zero = c.zero_pages;
    report.pages_zero_lazy = c.lazy_zero_pages;
    report.faults = c.faults;
    report.fault_latency = stats.fault_latency.summary(c.blocktime_ns);
    report.fault_latency_before_push = stats.fault_latency_before_push.summary(0);
    report.fault_latency_during_push = stats.fault_latency_during_push.summary(0);
    report.fault_latency_asked = stats.fault_latency_asked.summary(0);
    report.fault_latency_already_asked = stats.fault_latency_already_asked.summary(0);
    post.memory_whole(MemoryWhole {
        pages_on_demand: report.pages_on_demand,
        pages_pushed: report.pages_pushed,
        pages_zero: report.pages_zero,
        pages_local: report.pages_local,
    })
    .await;
}

/// The restore finished: the tasks run. Tells the source (or a resumed source learns it from
/// ResumeReady).
async fn restore_finished(
    post: &mut PostCopy,
    report: &mut DstReport,
    frozen_at_ns: u64,
    images_at: Instant,
    dir: &Path,
) -> Result<()> {
    let finished_ns = unix_ns()?;
    post.finished_at_ns = Some(finished_ns);
    // A dst restarted after this one died adopts the restored tasks only if they are whole
    // restores (dst::adopt): record it.
    let marker = dir.join(crate::dst::options::RESTORE_FINISHED_FILE);
    if let Err(e) = std::fs::write(&marker, format!("{finished_ns} {frozen_at_ns}\n")) {
        tracing::warn!(
            "cannot write {}: a restarted dst could not adopt this migration: {e}",
            marker.display()
        );
    }
    report.downtime_ms = finished_ns.saturating_sub(frozen_at_ns) as f64 / 1e6;
    report.restore_ms = images_at.elapsed().as_secs_f64() * 1e3;
    post.tell(Msg::RestoreFinished(RestoreFinished {
        finished_at_unix_ns: finished_ns,
    }))
    .await;
    tracing::info!(
        downtime_ms = report.downtime_ms,
        "restore finished; tasks running"
    );
    Ok(())
}

/// Receives the images; pre-copied pages may come first on the same stream, into `store`. The
/// images must be announced first (ImagesPlan), and everything is bounded by `limits` and
/// `clock` (see [`crate::limits`]).
async fn receive_images(
    rx: &mut FrameReceiver,
    dir: &Path,
    store: &mut Option<PageStore>,
    limits: &DstLimits,
    clock: &ReceiveClock,
) -> Result<(u64, u64, Vec<String>)> {
    let mut sink = ImageSink::new(dir, limits.max_images_bytes);
    let mut planned = false;
    loop {
        let msg = match clock.next(rx, "the pre-copy and the images").await? {
            Some(Frame::Control(Control { msg: Some(m) })) => m,
            Some(Frame::PreCopyPages {
                pid, vaddr, data, ..
            }) => {
                let s = open_store(store, limits)?;
                crate::async_runtime::blocking(|| s.put(pid, vaddr, &data))?;
                continue;
            }
            Some(Frame::PreCopyZero {
                pid,
                vaddr,
                nr_pages,
            }) => {
                open_store(store, limits)?.put_zero(pid, vaddr, nr_pages.into())?;
                continue;
            }
            Some(other) => bail!("expected images or pre-copied pages, got {other:?}"),
            None => bail!("the source closed the control stream before the images were done"),
        };
        match msg {
            Msg::ImagesPlan(p) => {
                if planned {
                    bail!("the source announced its images twice");
                }
                sink.plan(p.files.into(), p.bytes, limits.min_free_disk_bytes)?;
                planned = true;
            }
            Msg::ImageChunk(_) if !planned => bail!(
                "the source sent images without announcing them first (ImagesPlan): is it an \
                 older pageserv src? Update it to this version"
            ),
            Msg::ImageChunk(c) => sink.chunk(&c.name, c.offset, &c.data, c.last)?,
            Msg::ImagesDone(d) => {
                sink.finish(d.files, d.bytes)?;
                let carried = crate::criu::opts::accept(&d.restore_criu_opts)?;
                return Ok((d.frozen_at_unix_ns, d.bytes, carried));
            }
            Msg::Abort(a) => bail!("the source aborted while sending images: {}", a.reason),
            other => bail!("expected images, got {other:?}"),
        }
    }
}

fn open_store<'a>(
    store: &'a mut Option<PageStore>,
    limits: &DstLimits,
) -> Result<&'a mut PageStore> {
    if store.is_none() {
        *store = Some(PageStore::with_limit(limits.max_page_store_bytes)?);
    }
    store
        .as_mut()
        .ok_or_else(|| anyhow!("the page store could not be opened"))
}
