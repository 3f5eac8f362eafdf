//! The thin shell around [`Core`], on the fault lane ([`crate::fault_lane`]): fault reads done
//! inline (a page and its read-ahead), bulk reads on a reader thread of their own (so a fault
//! read never waits behind a bulk read), CRIU's page-server connection for what must come from CRIU, and the
//! channels to the link tasks in `source::service` (the same ones `source::pump` feeds).

use std::collections::{BTreeMap, VecDeque};
use std::sync::Arc;

use bytes::{Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::{mpsc, watch};

use super::core::{Action, Core, FaultRequest, Lane, Origin, Read};
use super::tasks::{FrozenTasks, NotReadable};
use crate::criu::page_server::{ClientEvent, GetClient, Layout};
use crate::pages::{PAGE_SIZE, PageRange};
use crate::source::pre_copy::page_hash::PageHasher;
use crate::source::pump::{
    FaultReply, PumpConfig, PumpControl, PumpError, PumpInput, PumpStats, Served, Tagged,
    UrgentRequest,
};

type Done = (u64, Result<Bytes, NotReadable>);

/// A reader thread: performs memory reads of one lane in order.
fn spawn_reader(
    name: &str,
    tasks: Arc<FrozenTasks>,
    done: mpsc::UnboundedSender<Done>,
) -> std::io::Result<std::sync::mpsc::Sender<Read>> {
    let (tx, rx) = std::sync::mpsc::channel::<Read>();
    std::thread::Builder::new()
        .name(name.into())
        .spawn(move || {
            while let Ok(r) = rx.recv() {
                let result = tasks.read(r.pid, r.vaddr, r.nr_pages);
                if done.send((r.id, result)).is_err() {
                    break;
                }
            }
        })?;
    Ok(tx)
}

/// Every page handed to the link tasks, by hash, to compare with CRIU's copy at the end
/// (`PumpConfig::verify_served`).
struct ServedLog {
    hasher: PageHasher,
    pages: BTreeMap<(u32, u64), u128>,
    /// A page delivered twice with different bytes.
    conflicts: u64,
}

impl ServedLog {
    fn record(&mut self, pid: u32, vaddr: u64, data: &[u8]) {
        for (i, page) in data.chunks_exact(PAGE_SIZE as usize).enumerate() {
            let h = self.hasher.hash(page).0;
            let key = (pid, vaddr + i as u64 * PAGE_SIZE);
            if let Some(old) = self.pages.insert(key, h)
                && old != h
            {
                self.conflicts += 1;
            }
        }
    }
}

/// Runs the serving core until `control` says Finish (returns after CRIU acknowledged the close),
/// Abort (the dump is told to fail) or Detach. Same contract as [`crate::source::pump::run`].
#[allow(clippy::too_many_arguments)]
pub async fn run<S: AsyncRead + AsyncWrite + Unpin>(
    stream: S,
    layout: Layout,
    force_close: bool,
    mut core: Core,
    tasks: Arc<FrozenTasks>,
    lazy: Vec<(u32, Vec<PageRange>)>,
    cfg: PumpConfig,
    mut faults: mpsc::UnboundedReceiver<PumpInput>,
    replies: mpsc::UnboundedSender<Tagged<FaultReply>>,
    push: mpsc::Sender<Tagged<Served>>,
    mut control: watch::Receiver<Option<PumpControl>>,
) -> Result<PumpStats, PumpError> {
    let (mut rd, mut wr) = tokio::io::split(stream);
    let (bulk_done_tx, mut bulk_done) = mpsc::unbounded_channel::<Done>();
    let bulk_reader = spawn_reader("ps-bulk-read", tasks.clone(), bulk_done_tx)?;
    let mut client = GetClient::new(layout);
    // Ids of GETs inside CRIU, in request order.
    let mut criu_ids: VecDeque<u64> = VecDeque::new();
    let mut free_permits: Vec<mpsc::OwnedPermit<Tagged<Served>>> = Vec::new();
    let mut bound: BTreeMap<u64, mpsc::OwnedPermit<Tagged<Served>>> = BTreeMap::new();
    let mut stats = PumpStats {
        serving: "frozen-memory",
        ..PumpStats::default()
    };
    let mut served = cfg.verify_served.then(|| ServedLog {
        hasher: PageHasher::new(0x5eed),
        pages: BTreeMap::new(),
        conflicts: 0,
    });
    let mut out = BytesMut::with_capacity(4096);
    let mut push_at: Option<tokio::time::Instant> = None;
    let mut faults_open = true;
    let mut closing = false;

    loop {
        while let Some(action) = core.poll() {
            match action {
                Action::Read(r) => match (r.origin, r.lane) {
                    // A fault's read (a page and its read-ahead: microseconds) is done right
                    // here, on the fault lane: no thread hop on the fault's path.
                    (Origin::Memory, Lane::Fault) => {
                        let result = tasks.read(r.pid, r.vaddr, r.nr_pages);
                        on_done(&mut core, r.id, result)?;
                    }
                    (Origin::Memory, Lane::Bulk) => {
                        if !bound.contains_key(&r.id) {
                            bind(&mut free_permits, &mut bound, r.id)?;
                        }
                        bulk_reader.send(r).map_err(|_| PumpError::ServiceGone)?;
                    }
                    (Origin::Criu, lane) => {
                        if lane == Lane::Bulk && !bound.contains_key(&r.id) {
                            bind(&mut free_permits, &mut bound, r.id)?;
                        }
                        client.request(r.pid, r.vaddr, r.nr_pages, &mut out)?;
                        criu_ids.push_back(r.id);
                        stats.gets += 1;
                    }
                },
                Action::Answer {
                    generation,
                    pid,
                    vaddr,
                    nr_pages,
                    data,
                    at,
                } => {
                    if let Some(s) = &mut served {
                        s.record(pid, vaddr, &data);
                    }
                    let s = Served {
                        pid,
                        vaddr,
                        nr_pages,
                        data,
                    };
                    replies
                        .send((generation, FaultReply::Pages(s, at)))
                        .map_err(|_| PumpError::ServiceGone)?;
                }
                Action::Push {
                    generation,
                    id,
                    pid,
                    vaddr,
                    nr_pages,
                    data,
                } => {
                    if let Some(s) = &mut served {
                        s.record(pid, vaddr, &data);
                    }
                    let permit = bound.remove(&id).ok_or(PumpError::ServiceGone)?;
                    permit.send((
                        generation,
                        Served {
                            pid,
                            vaddr,
                            nr_pages,
                            data,
                        },
                    ));
                }
                Action::Refuse {
                    generation,
                    request,
                    why,
                } => {
                    tracing::warn!(%why, "refusing a page request from dst");
                    let request = UrgentRequest {
                        pid: request.pid,
                        vaddr: request.vaddr,
                        nr_pages: request.nr_pages,
                        at: request.at,
                    };
                    replies
                        .send((generation, FaultReply::Refused { request, why }))
                        .map_err(|_| PumpError::ServiceGone)?;
                }
                Action::Release { id } => {
                    bound.remove(&id);
                }
                Action::CloseCriu => {
                    if let Some(s) = served.take() {
                        verify(&mut rd, &mut wr, &mut client, &lazy, &s, &mut stats).await?;
                    }
                    client.close(force_close, &mut out)?;
                    closing = true;
                }
            }
        }
        if !out.is_empty() {
            wr.write_all(&out).await?;
            out.clear();
        }
        let want_permit = core.wants_slot() && free_permits.is_empty();

        tokio::select! {
            biased;
            changed = control.changed() => {
                let what = if changed.is_ok() { *control.borrow() } else { Some(PumpControl::Abort) };
                match what {
                    Some(PumpControl::StartPush) if cfg.push_delay.is_zero() && cfg.push => {
                        core.start_push()
                    }
                    Some(PumpControl::StartPush) if cfg.push_delay.is_zero() => {}
                    Some(PumpControl::StartPush) => {
                        push_at = Some(tokio::time::Instant::now() + cfg.push_delay);
                    }
                    Some(PumpControl::Finish) => core.finish(),
                    Some(PumpControl::Abort) => {
                        // Tell CRIU to fail (it resumes the tasks) only after no read can still
                        // deliver: this function returns right away and drops the channels.
                        abort_session(&mut wr, layout).await;
                        return Ok(finish_stats(stats, &core));
                    }
                    Some(PumpControl::Detach) => return Ok(finish_stats(stats, &core)),
                    None => {}
                }
            }
            input = faults.recv(), if faults_open => match input {
                Some(PumpInput::Replan { generation, missing, reply }) => {
                    let _ = reply.send(core.replan(generation, missing));
                }
                Some(PumpInput::Fault(req)) => core.fault(FaultRequest {
                    pid: req.pid,
                    vaddr: req.vaddr,
                    nr_pages: req.nr_pages,
                    at: req.at,
                }),
                None => faults_open = false,
            },
            Some((id, result)) = bulk_done.recv() => on_done(&mut core, id, result)?,
            n = rd.read_buf(client.read_buf()) => {
                if n? == 0 {
                    client.on_eof()?;
                    return Err(PumpError::Eof(client.outstanding()));
                }
                while let Some(event) = client.poll()? {
                    match event {
                        ClientEvent::Closed if closing => return Ok(finish_stats(stats, &core)),
                        ClientEvent::Closed => return Err(PumpError::Eof(0)),
                        ClientEvent::Pages(reply) => {
                            stats.bytes_from_dump += reply.data.len() as u64;
                            let id = criu_ids.pop_front().ok_or(PumpError::Eof(0))?;
                            core.read_done(id, reply.data).map_err(|e| PumpError::Core(e.to_string()))?;
                        }
                    }
                }
            }
            _ = tokio::time::sleep_until(push_at.unwrap_or_else(tokio::time::Instant::now)), if push_at.is_some() => {
                push_at = None;
                if cfg.push { core.start_push() }
            }
            permit = push.clone().reserve_owned(), if want_permit => match permit {
                Ok(p) => {
                    free_permits.push(p);
                    core.slot();
                }
                Err(_) => return Err(PumpError::ServiceGone),
            },
        }
    }
}

fn bind(
    free: &mut Vec<mpsc::OwnedPermit<Tagged<Served>>>,
    bound: &mut BTreeMap<u64, mpsc::OwnedPermit<Tagged<Served>>>,
    id: u64,
) -> Result<(), PumpError> {
    // The core issues a bulk read only for a slot it was given: a permit is there.
    let p = free
        .pop()
        .ok_or_else(|| PumpError::Core(format!("bulk read {id} without a push slot")))?;
    bound.insert(id, p);
    Ok(())
}

fn on_done(core: &mut Core, id: u64, result: Result<Bytes, NotReadable>) -> Result<(), PumpError> {
    let r = match result {
        Ok(data) => core.read_done(id, data),
        Err(why) => {
            tracing::warn!(%why, "reading a frozen task failed: serving that task from CRIU");
            core.read_failed(id)
        }
    };
    r.map_err(|e| PumpError::Core(e.to_string()))
}

fn finish_stats(mut stats: PumpStats, core: &Core) -> PumpStats {
    let c = core.stats();
    stats.fault_pages = c.fault_pages;
    stats.pushed_pages = c.pushed_pages;
    stats.refused = c.refused;
    stats.memory_pages = c.memory_pages;
    stats.criu_pages = c.criu_pages;
    stats.failovers = c.failovers;
    stats
}

/// Before the close: fetches every lazy page from CRIU (whole pagemap entries) and compares it
/// with what was served, page by page. The tasks are still frozen: nothing is closed yet.
async fn verify<R: AsyncRead + Unpin, W: AsyncWrite + Unpin>(
    rd: &mut R,
    wr: &mut W,
    client: &mut GetClient,
    lazy: &[(u32, Vec<PageRange>)],
    served: &ServedLog,
    stats: &mut PumpStats,
) -> Result<(), PumpError> {
    let mut out = BytesMut::new();
    let mut v = VerifyStats {
        conflicts: served.conflicts,
        ..VerifyStats::default()
    };
    for (pid, ranges) in lazy {
        for r in ranges {
            let mut at = r.start;
            while at < r.end() {
                let n = (r.end() - at) / PAGE_SIZE;
                client.request(*pid, at, n, &mut out)?;
                wr.write_all(&out).await?;
                out.clear();
                let reply = loop {
                    if let Some(ClientEvent::Pages(p)) = client.poll()? {
                        break p;
                    }
                    if rd.read_buf(client.read_buf()).await? == 0 {
                        client.on_eof()?;
                        return Err(PumpError::Eof(client.outstanding()));
                    }
                };
                for (i, page) in reply.data.chunks_exact(PAGE_SIZE as usize).enumerate() {
                    let key = (*pid, at + i as u64 * PAGE_SIZE);
                    match served.pages.get(&key) {
                        None => v.unserved += 1,
                        Some(h) if *h == served.hasher.hash(page).0 => v.equal += 1,
                        Some(_) => {
                            v.differ += 1;
                            v.differ_pids.insert(*pid);
                            tracing::error!(
                                pid,
                                vaddr = key.1,
                                "served page differs from CRIU's copy"
                            );
                        }
                    }
                }
                at += reply.nr_pages * PAGE_SIZE;
            }
        }
    }
    tracing::info!(?v, "served pages compared with CRIU's copies");
    stats.verified = true;
    stats.verify_equal = v.equal;
    stats.verify_differ = v.differ;
    stats.verify_unserved = v.unserved;
    stats.verify_conflicts = v.conflicts;
    stats.verify_differ_tasks = v.differ_pids.len() as u64;
    stats.verify_differ_pid = v.differ_pids.first().copied().unwrap_or(0);
    Ok(())
}

/// The page-by-page comparison of served pages with CRIU's copies (`--verify-served`).
#[derive(Debug, Default, Clone)]
struct VerifyStats {
    differ_pids: std::collections::BTreeSet<u32>,
    equal: u64,
    differ: u64,
    unserved: u64,
    conflicts: u64,
}

/// Makes CRIU's page server fail the session (see `source::pump`).
async fn abort_session<W: AsyncWrite + Unpin>(wr: &mut W, layout: Layout) {
    let mut header = vec![0u8; layout.header_len()];
    header[..4].copy_from_slice(&0xBAD0u32.to_ne_bytes());
    if let Err(e) = wr.write_all(&header).await {
        tracing::warn!("could not tell the dump to fail: {e}");
    }
    let _ = wr.flush().await;
}
