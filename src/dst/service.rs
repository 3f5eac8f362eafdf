//! `pageserv dst`: the destination side of one migration.
//!
//! Order of events: accept the source (mutual TLS) → hello → receive the images → listen on
//! `lazy-pages.socket` → start the restore → take each restored task's userfaultfd → the restore
//! finishes (the tasks run from here) → serve faults and take the pushed pages until every lazy
//! page is in place → tell the source → it ends the dump → close the uffds and exit.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result, anyhow, bail};
use tokio::sync::mpsc;

use crate::criu::binary::{Criu, log_tail};
use crate::criu::images::ImageDir;
use crate::dst::image_sink::ImageSink;
use crate::dst::lazy_socket::LazySocket;
use crate::dst::page_store::PageStore;
use crate::dst::restore::{Restore, RestoreOptions};
use crate::dst::uffd_keeper::UffdKeeper;
use crate::dst::uffd_loop::{self, Inbound, LoopSender, Outbound, UffdStats};
use crate::keys::Identity;
use crate::pages::PageRange;
use crate::pb::pageserv::{
    Abort, Control, Hello, MemoryWhole, RestoreFailed, RestoreFinished, RestoreStarted,
    control::Msg,
};
use crate::source::service::{PROTOCOL_VERSION, ROLE_FAULTS, next_ctl};
use crate::stats::DstReport;
use crate::stats::LatencySummary;
use crate::transport::{self, FrameReceiver, FrameSender};
use crate::wire::Frame;

#[derive(Debug, Clone)]
pub struct DstOptions {
    pub listen: SocketAddr,
    pub certs: PathBuf,
    /// Each migration gets a fresh directory below this one.
    pub work_base: PathBuf,
    pub criu: Criu,
    pub restore: RestoreOptions,
    /// Pages after a faulting page requested with it.
    pub readahead_pages: u64,
}

/// Accepts one migration and runs it to the end.
pub async fn run(opts: DstOptions) -> Result<DstReport> {
    let id = Identity::load(&opts.certs)?;
    let endpoint = transport::server(opts.listen, &id)
        .with_context(|| format!("listening on {}", opts.listen))?;
    tracing::info!(listen = %endpoint.local_addr()?, "pageserv dst ready");
    let (conn, _peer) = transport::accept(&endpoint, &id).await?;
    let result = async {
        let (ctl, ctl_rx, hello) = accept_control(&conn).await?;
        let faults = FaultConns::Accept {
            endpoint: &endpoint,
            id: &id,
        };
        migrate_in(&opts, &conn, (ctl, ctl_rx, hello), faults).await
    }
    .await;
    // Closing the endpoint closes the fault connection too; the peer learns why.
    match &result {
        Ok(_) => endpoint.close(0u32.into(), b"done"),
        Err(e) => endpoint.close(1u32.into(), format!("{e:#}").as_bytes()),
    }
    let _ = tokio::time::timeout(Duration::from_secs(3), endpoint.wait_idle()).await;
    result
}

/// Accepts a connection's first stream and reads its hello: a migration's control stream
/// (role "src") or a fault connection (role [`ROLE_FAULTS`]).
pub(crate) async fn accept_control(
    conn: &quinn::Connection,
) -> Result<(FrameSender, FrameReceiver, Hello)> {
    let (ctl_send, ctl_recv) = conn
        .accept_bi()
        .await
        .context("waiting for the control stream")?;
    let ctl = FrameSender::new(ctl_send);
    let mut ctl_rx = FrameReceiver::new(ctl_recv);
    let hello = match next_ctl(&mut ctl_rx).await? {
        Msg::Hello(h) => h,
        other => bail!("the source opened with {other:?} instead of a hello"),
    };
    Ok((ctl, ctl_rx, hello))
}

/// Where a migration's fault connection comes from.
pub(crate) enum FaultConns<'a> {
    /// The next connection on the endpoint (one migration at a time).
    Accept {
        endpoint: &'a quinn::Endpoint,
        id: &'a Identity,
    },
    /// Handed over by the accept loop (dst/server.rs), which read its hello and matched the
    /// migration id.
    Routed(tokio::sync::oneshot::Receiver<(quinn::Connection, FrameSender, FrameReceiver)>),
}

impl FaultConns<'_> {
    async fn next(
        self,
        migration_id: &str,
    ) -> Result<(quinn::Connection, FrameSender, FrameReceiver)> {
        match self {
            FaultConns::Accept { endpoint, id } => {
                let (conn, _) = transport::accept(endpoint, id).await?;
                let (tx, rx, hello) = accept_control(&conn)
                    .await
                    .context("accepting the fault stream")?;
                if hello.role != ROLE_FAULTS || hello.migration_id != migration_id {
                    bail!(
                        "expected the source's fault connection for {migration_id}, got {hello:?}"
                    );
                }
                Ok((conn, tx, rx))
            }
            FaultConns::Routed(rx) => rx.await.map_err(|_| {
                anyhow!("the accept loop stopped before the fault connection arrived")
            }),
        }
    }
}

/// Runs one migration whose control stream and hello `ctl` were accepted on `conn`.
pub(crate) async fn migrate_in(
    opts: &DstOptions,
    conn: &quinn::Connection,
    ctl: (FrameSender, FrameReceiver, Hello),
    faults: FaultConns<'_>,
) -> Result<DstReport> {
    let started = Instant::now();
    let mut report = DstReport::default();
    let (mut ctl, mut ctl_rx, hello) = ctl;
    if hello.protocol_version != PROTOCOL_VERSION
        || hello.page_size != crate::pages::PAGE_SIZE as u32
    {
        let reason = format!(
            "protocol {} / page size {} not supported (this dst speaks protocol {PROTOCOL_VERSION}, 4 KiB pages)",
            hello.protocol_version, hello.page_size
        );
        send_ctl(
            &mut ctl,
            Msg::Abort(Abort {
                reason: reason.clone(),
            }),
        )
        .await
        .ok();
        bail!(reason);
    }
    send_ctl(
        &mut ctl,
        Msg::Hello(Hello {
            protocol_version: PROTOCOL_VERSION,
            role: "dst".into(),
            page_size: crate::pages::PAGE_SIZE as u32,
            criu_version: opts.criu.version.to_string(),
            migration_id: hello.migration_id.clone(),
        }),
    )
    .await?;

    if hello.role == crate::stopcopy::source::ROLE_STOP_AND_COPY {
        let dir = fresh_dir(&opts.work_base, &hello.migration_id)?;
        return crate::stopcopy::dst::migrate_in(opts, &mut ctl, &mut ctl_rx, conn, &dir).await;
    }

    // The source's second connection carries only faults (see source::service); it must exist
    // before the restore starts, since restored tasks fault from their first instruction.
    let (_fault_conn, mut fault_tx, fault_rx) =
        tokio::time::timeout(Duration::from_secs(30), faults.next(&hello.migration_id))
            .await
            .context("the source did not open its fault connection within 30 s")??;

    let dir = fresh_dir(&opts.work_base, &hello.migration_id)?;
    let images_dir = dir.join("images");
    let work = dir.join("work");
    for d in [&images_dir, &work] {
        std::fs::create_dir_all(d).with_context(|| format!("creating {}", d.display()))?;
    }
    let mut store = None;
    let (frozen_at_ns, images_bytes) = receive_images(&mut ctl_rx, &images_dir, &mut store).await?;
    report.images_bytes = images_bytes;
    if let Some(s) = &store {
        report.precopy_pages_held = s.pages_data() + s.pages_zero();
        tracing::info!(
            data = s.pages_data(),
            zero = s.pages_zero(),
            "pre-copied pages held in the page store"
        );
    }
    let store = store.map(Arc::new);
    let pages_local = Arc::new(AtomicU64::new(0));
    let images_at = Instant::now();

    let images = ImageDir::open(&images_dir)?;
    let mut lazy: BTreeMap<u32, Vec<PageRange>> = BTreeMap::new();
    let tasks = images.pstree()?;
    for t in &tasks {
        let ranges = images.lazy_ranges(t.pid)?;
        report.lazy_pages += ranges.iter().map(|r| r.nr_pages).sum::<u64>();
        lazy.insert(t.pid, ranges);
    }
    report.tasks = tasks.len() as u64;

    let (out_tx, out_rx) = crossbeam_channel::unbounded::<Outbound>();
    let stats = Arc::new(UffdStats::default());
    let config = uffd_loop::LoopConfig {
        readahead_pages: opts.readahead_pages,
        ..Default::default()
    };
    let handle = uffd_loop::spawn_with(config, out_tx, stats.clone())
        .context("starting the fault thread")?;
    // A copy of every uffd lives in the keeper, so even this process dying cannot zero-fill.
    let keeper = Arc::new(
        UffdKeeper::spawn(&std::env::current_exe().context("locating the pageserv binary")?)
            .context("starting the uffd keeper")?,
    );
    let socket = LazySocket::bind(&work).context("listening on lazy-pages.socket")?;
    let mut restore = Restore::start(&opts.criu, &images_dir, &work, &opts.restore)?;
    send_ctl(
        &mut ctl,
        Msg::RestoreStarted(RestoreStarted { root_pid: 0 }),
    )
    .await?;

    // Hand the restore's uffds to the fault thread as they arrive.
    let nr_tasks = tasks.len();
    let to_loop = handle.sender();
    let held = keeper.clone();
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
                    held.hold(host, std::os::fd::AsFd::as_fd(&uffd))
                        .context("handing a uffd to the keeper")?;
                    let ranges = lazy.get(&(t.pid as u32)).cloned().unwrap_or_default();
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
        rc.wait_restore_finished()?;
        to_loop.send(Inbound::RestoreFinished)?;
        Ok(())
    });

    // Outbound events of the fault thread, bridged into async.
    let (ev_tx, mut ev_rx) = mpsc::unbounded_channel::<Outbound>();
    std::thread::Builder::new()
        .name("uffd-outbound".into())
        .spawn(move || {
            while let Ok(ev) = out_rx.recv() {
                if ev_tx.send(ev).is_err() {
                    break;
                }
            }
        })?;

    let held = Held {
        store: store.clone(),
        placed: pages_local.clone(),
    };
    let fault_reader = tokio::spawn(feed_pages(fault_rx, handle.sender(), true, held.clone()));
    let push_conn = conn.clone();
    let push_sender = handle.sender();
    let push_reader = tokio::spawn(async move {
        let recv = push_conn
            .accept_uni()
            .await
            .context("waiting for the push stream")?;
        feed_pages(FrameReceiver::new(recv), push_sender, false, held).await
    });

    // One loop for the whole post-copy: the restore may fault before it finishes, so faults are
    // forwarded from the first task on.
    let mut restored = false;
    let mut post_copy_start = Instant::now();
    let mut tick = tokio::time::interval(Duration::from_millis(50));
    let outcome: Result<()> = loop {
        tokio::select! {
            ev = ev_rx.recv() => match ev {
                Some(Outbound::Fault { pid, img_vaddr, nr_pages }) => {
                    fault_tx.send(&Frame::PageRequest { pid, vaddr: img_vaddr, nr_pages }).await?;
                }
                // The fault thread judges completion only after the restore finished, but the
                // restore side may not have been polled yet: join it first.
                Some(Outbound::Complete) if !restored => {
                    if let Err(e) = (&mut restore_side).await.context("restore-side thread panicked").and_then(|r| r) {
                        break Err(e);
                    }
                    restored = true;
                    let finished_ns = SystemTime::now().duration_since(UNIX_EPOCH)?.as_nanos() as u64;
                    report.downtime_ms = finished_ns.saturating_sub(frozen_at_ns) as f64 / 1e6;
                    report.restore_ms = images_at.elapsed().as_secs_f64() * 1e3;
                    send_ctl(&mut ctl, Msg::RestoreFinished(RestoreFinished { finished_at_unix_ns: finished_ns })).await?;
                    break Ok(());
                }
                Some(Outbound::Complete) => break Ok(()),
                Some(Outbound::TaskGone { pid }) => tracing::info!(pid, "restored task exited"),
                Some(Outbound::Error(e)) => break Err(anyhow!("fault thread: {e}")),
                None => break Err(anyhow!("the fault thread stopped unexpectedly")),
            },
            r = &mut restore_side, if !restored => {
                if let Err(e) = r.context("restore-side thread panicked").and_then(|r| r) {
                    break Err(e.context("taking the restored tasks' userfaultfds"));
                }
                restored = true;
                let finished_ns = SystemTime::now().duration_since(UNIX_EPOCH)?.as_nanos() as u64;
                report.downtime_ms = finished_ns.saturating_sub(frozen_at_ns) as f64 / 1e6;
                report.restore_ms = images_at.elapsed().as_secs_f64() * 1e3;
                post_copy_start = Instant::now();
                send_ctl(&mut ctl, Msg::RestoreFinished(RestoreFinished { finished_at_unix_ns: finished_ns })).await?;
                tracing::info!(downtime_ms = report.downtime_ms, "restore finished; tasks running");
            },
            _ = tick.tick(), if !restored => {
                if let Some(status) = restore.try_wait()?
                    && let Err(e) = restore.check(status)
                {
                    break Err(e.into());
                }
            },
            r = next_ctl(&mut ctl_rx) => match r {
                Ok(Msg::Abort(a)) => break Err(anyhow!("the source aborted: {}", a.reason)),
                Ok(other) => tracing::warn!("ignoring control message {other:?} during post-copy"),
                Err(e) => break Err(e.context("control stream from the source")),
            },
        }
    };
    if let Err(e) = outcome {
        // Never let the kernel zero-fill what has not arrived: kill incomplete tasks first.
        let shut = tokio::task::spawn_blocking(move || handle.shutdown(true)).await;
        tracing::warn!(?shut, "stopped the fault thread after a failure");
        if !restored {
            let reason = format!("{e:#}");
            let tail = log_tail(&restore.log, 20);
            send_ctl(
                &mut ctl,
                Msg::RestoreFailed(RestoreFailed {
                    reason,
                    log_tail: tail,
                }),
            )
            .await
            .ok();
            restore.kill();
            // src may resume the source only if it reads this report (see outcome): closing now
            // could drop it in flight, so wait for src to close first (it does once it read it).
            let _ = tokio::time::timeout(Duration::from_secs(5), conn.closed()).await;
        }
        fault_reader.abort();
        push_reader.abort();
        return Err(e);
    }
    // Every lazy page is in place: the restored copy is the live one from now on.
    match Arc::try_unwrap(keeper) {
        Ok(k) => k.release(),
        Err(_) => tracing::warn!("the uffd keeper is still shared; it stays until dst exits"),
    }
    report.post_copy_ms = post_copy_start.elapsed().as_secs_f64() * 1e3;
    let c = stats.counters();
    report.pages_on_demand = c.pages_copied_urgent;
    report.pages_pushed = c.pages_copied_pushed;
    report.pages_zero = c.zero_pages;
    report.pages_zero_lazy = c.lazy_zero_pages;
    report.faults = c.faults;
    report.pages_local = pages_local.load(Relaxed);
    report.fault_latency = latency_summary(&stats.fault_latency, c.blocktime_ns);
    report.fault_latency_before_push = latency_summary(&stats.fault_latency_before_push, 0);
    report.fault_latency_during_push = latency_summary(&stats.fault_latency_during_push, 0);
    send_ctl(
        &mut ctl,
        Msg::MemoryWhole(MemoryWhole {
            pages_on_demand: report.pages_on_demand,
            pages_pushed: report.pages_pushed,
            pages_zero: report.pages_zero,
            pages_local: report.pages_local,
        }),
    )
    .await?;
    match next_ctl(&mut ctl_rx).await {
        Ok(Msg::SourceReleased(r)) if !r.dump_ok => {
            tracing::warn!("the source's dump did not end cleanly: {}", r.detail)
        }
        Ok(_) => {}
        Err(e) => tracing::warn!("no release message from the source: {e:#}"),
    }
    handle
        .send(Inbound::Shutdown {
            kill_incomplete: false,
        })
        .ok();
    fault_reader.abort();
    push_reader.abort();
    drop(store);
    // `criu restore -d` exits once the tree is released; reap it.
    for _ in 0..100 {
        if restore.try_wait()?.is_some() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    report.bytes_received = conn.stats().udp_rx.bytes;
    report.total_ms = started.elapsed().as_secs_f64() * 1e3;
    Ok(report)
}

/// The pre-copied pages dst holds, and how many of them were confirmed and placed.
#[derive(Clone)]
struct Held {
    store: Option<Arc<PageStore>>,
    placed: Arc<AtomicU64>,
}

/// Feeds page frames from one stream into the fault thread.
async fn feed_pages(
    mut rx: FrameReceiver,
    to_loop: LoopSender,
    urgent: bool,
    held: Held,
) -> Result<()> {
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
                let runs = tokio::task::block_in_place(|| {
                    store.take_valid(pid, vaddr, nr_pages.into(), &bitmap)
                })?;
                for r in runs {
                    held.placed.fetch_add(r.nr_pages, Relaxed);
                    // Runs are within one frame: at most MAX_FRAME_PAGES pages.
                    let nr_pages = r.nr_pages as u32;
                    let msg = match r.data {
                        Some(data) => Inbound::Pages {
                            pid,
                            img_vaddr: r.vaddr,
                            nr_pages,
                            data,
                            urgent,
                        },
                        None => Inbound::Zero {
                            pid,
                            img_vaddr: r.vaddr,
                            nr_pages,
                            urgent,
                        },
                    };
                    tokio::task::block_in_place(|| to_loop.send(msg))?;
                }
                continue;
            }
            Frame::Pages {
                pid,
                vaddr,
                nr_pages,
                data,
            } => Inbound::Pages {
                pid,
                img_vaddr: vaddr,
                nr_pages,
                data,
                urgent,
            },
            Frame::Zero {
                pid,
                vaddr,
                nr_pages,
            } => Inbound::Zero {
                pid,
                img_vaddr: vaddr,
                nr_pages,
                urgent,
            },
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
        // The loop's background queue is bounded: block this worker rather than buffer memory.
        tokio::task::block_in_place(|| to_loop.send(inbound))?;
    }
    Ok(())
}

/// Receives the images; pre-copied pages may come first on the same stream, into `store`.
async fn receive_images(
    rx: &mut FrameReceiver,
    dir: &Path,
    store: &mut Option<PageStore>,
) -> Result<(u64, u64)> {
    let mut sink = ImageSink::new(dir);
    loop {
        let msg = match rx.next().await? {
            Some(Frame::Control(Control { msg: Some(m) })) => m,
            Some(Frame::PreCopyPages {
                pid, vaddr, data, ..
            }) => {
                let s = open_store(store)?;
                tokio::task::block_in_place(|| s.put(pid, vaddr, &data))?;
                continue;
            }
            Some(Frame::PreCopyZero {
                pid,
                vaddr,
                nr_pages,
            }) => {
                open_store(store)?.put_zero(pid, vaddr, nr_pages.into())?;
                continue;
            }
            Some(other) => bail!("expected images or pre-copied pages, got {other:?}"),
            None => bail!("the source closed the control stream before the images were done"),
        };
        match msg {
            Msg::ImageChunk(c) => sink.chunk(&c.name, c.offset, &c.data, c.last)?,
            Msg::ImagesDone(d) => {
                sink.finish(d.files, d.bytes)?;
                return Ok((d.frozen_at_unix_ns, d.bytes));
            }
            Msg::Abort(a) => bail!("the source aborted while sending images: {}", a.reason),
            other => bail!("expected images, got {other:?}"),
        }
    }
}

fn open_store(store: &mut Option<PageStore>) -> Result<&mut PageStore> {
    if store.is_none() {
        *store = Some(PageStore::new()?);
    }
    store
        .as_mut()
        .ok_or_else(|| anyhow!("the page store could not be opened"))
}

fn fresh_dir(base: &Path, migration_id: &str) -> Result<PathBuf> {
    let clean: String = migration_id
        .chars()
        .filter(|c| c.is_ascii_alphanumeric() || *c == '-')
        .take(64)
        .collect();
    let clean = if clean.is_empty() {
        "migration".to_string()
    } else {
        clean
    };
    for n in 0..1000 {
        let d = base.join(if n == 0 {
            clean.clone()
        } else {
            format!("{clean}.{n}")
        });
        match std::fs::create_dir_all(base).and_then(|_| std::fs::create_dir(&d)) {
            Ok(()) => return Ok(d),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
            Err(e) => return Err(e).with_context(|| format!("creating {}", d.display())),
        }
    }
    bail!("no free migration directory under {}", base.display())
}

async fn send_ctl(ctl: &mut FrameSender, msg: Msg) -> Result<()> {
    ctl.send(&Frame::Control(Control { msg: Some(msg) }))
        .await
        .context("sending on the control stream")
}

fn latency_summary(h: &crate::dst::latency::LatencyHistogram, blocktime_ns: u64) -> LatencySummary {
    let snap = h.snapshot();
    let us = |q: f64| snap.quantile(q).unwrap_or(0) as f64 / 1e3;
    LatencySummary {
        count: snap.count,
        p50_us: us(0.5),
        p99_us: us(0.99),
        max_us: us(1.0),
        total_ms: blocktime_ns as f64 / 1e6,
    }
}
