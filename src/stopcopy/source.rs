//! `pageserv src --stop-and-copy`: the page server of a `criu dump --page-server`, forwarding
//! the session to dst as it arrives.
//!
//! Order of events: connect to dst (mutual TLS) → hello → start `criu dump --page-server` (or
//! accept an external dump's connection) → serve the session: replies to the dump at once, every
//! pages file and pagemap to dst as it is produced → at CLOSE, wait until dst has written the
//! session, then answer CLOSE → the dump writes its other images and runs its post-dump hook →
//! ship those images → dst runs `criu restore` → on success tell the hook "ok" (CRIU kills the
//! source tasks), on any failure "fail" (CRIU resumes them). A runc container is paused and
//! checkpointed with `--leave-running` instead, then deleted or resumed ([`runc_dump`]).

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result, anyhow, bail};
use serde::Serialize;

use crate::criu::binary::Criu;
use crate::criu::page_server::{Layout, ParentSet};
use crate::keys::Identity;
use crate::pb::pageserv::{PsLanes, SourceReleased, control::Msg};
use crate::protocol::images::ship_images;
use crate::protocol::lanes::Spread;
use crate::protocol::{self, Role, is_dst_answer, next_ctl, send_ctl};
use crate::runc::Runc;
use crate::stopcopy::dump::{self, StopCopyDump};
use crate::stopcopy::runc_dump::{self, RuncCheckpoint};
use crate::stopcopy::session::{LaneSpec, Served, serve_session};
use crate::transport::{self, FrameReceiver, FrameSender};

/// Where the dump comes from.
#[derive(Debug, Clone)]
pub enum StopCopySource {
    /// pageserv runs `criu dump --page-server --ps-socket` on this pid.
    Pid { pid: i32, extra: Vec<String> },
    /// An external `criu dump --page-server --address H --port P` connects to `listen`; its
    /// `-D` is `images_dir`. pageserv cannot resume or kill those tasks: the dump's own flags
    /// decide (use `--leave-stopped` to keep them until the restore succeeded).
    Listen {
        listen: SocketAddr,
        /// The only address the dump may connect from (see [`page_server_peer`]).
        peer: IpAddr,
        images_dir: PathBuf,
    },
    /// pageserv pauses runc container `name` and runs `runc checkpoint --leave-running
    /// --page-server` into its own loopback listener (see [`runc_dump`]).
    Runc { runc: Runc, name: String },
}

/// How long a container's checkpoint may take to connect, and to end after its last page.
const RUNC_STEP_TIMEOUT: Duration = Duration::from_secs(300);

/// Who may connect to `--listen-page-server ADDR`: `given` (`--page-server-peer`), else a dump
/// on this host: a loopback listen address takes the loopback address of its family, and any
/// other listen address needs `--page-server-peer`, since the first TCP connection from anyone
/// would otherwise become the migrated memory.
pub fn page_server_peer(listen: SocketAddr, given: Option<IpAddr>) -> Result<IpAddr> {
    match given {
        Some(p) => Ok(p),
        None if listen.ip().is_loopback() => Ok(listen.ip()),
        None => bail!(
            "--listen-page-server {listen} is not a loopback address: say which address the \
             dump connects from with --page-server-peer IP (any other peer is refused), or \
             listen on 127.0.0.1"
        ),
    }
}

/// True if a connection from `from` may be the dump's page-server connection.
pub fn page_server_peer_ok(from: IpAddr, peer: IpAddr) -> bool {
    from == peer || (peer.is_loopback() && from.is_loopback())
}

#[derive(Debug, Clone)]
pub struct StopCopyOptions {
    pub to: SocketAddr,
    /// The name dst's certificate must carry (see [`crate::keys::trust::dst_name`]).
    pub dst_name: String,
    pub certs: PathBuf,
    pub work_dir: PathBuf,
    pub criu: Criu,
    pub source: StopCopySource,
    pub transport: transport::TransportOptions,
    /// Streams the session's frames are dealt over (see [`crate::protocol::lanes`]).
    pub lanes: u32,
    /// QUIC connections the lanes span (the control connection and `connections - 1` more).
    pub connections: u32,
}

/// The source's report of a stop-and-copy migration.
#[derive(Debug, Clone, Default, Serialize)]
pub struct StopCopyReport {
    /// Dump start (upper bound of the freeze) to restore finished at dst.
    pub downtime_ms: f64,
    /// Dump start to the dump's CLOSE (the memory transfer, tasks frozen).
    pub session_ms: f64,
    pub total_ms: f64,
    pub pages_present: u64,
    pub pages_parent: u64,
    pub pages_lazy_only: u64,
    pub pagemaps: u64,
    /// Page bytes forwarded to dst.
    pub page_bytes: u64,
    /// The other image files (pagemaps included).
    pub images_bytes: u64,
    /// UDP bytes sent on the QUIC connection.
    pub wire_bytes: u64,
    /// Largest UDP payload the control connection's MTU discovery settled on: 1,472 on
    /// a 1,500-byte path, up to [`crate::transport::MAX_DATAGRAM`] on a jumbo one.
    pub path_mtu: u16,
    /// Times the control connection fell back to 1,200-byte datagrams (quinn's suspected black
    /// holes; see [`crate::transport::BLACK_HOLE_COOLDOWN`]).
    pub path_black_holes: u64,
    pub dump_ok: bool,
    /// The service's CPU time and peak RSS (its own and its reaped children's, CRIU's dump
    /// among them, apart).
    pub usage: crate::usage::ServiceUsage,
}

impl StopCopyReport {
    pub fn render(&self) -> String {
        format!(
            "pageserv src report (stop-and-copy)\n\
             \x20 downtime (dump start → restore finished)  {:>10.1} ms\n\
             \x20 memory session (dump start → CLOSE)       {:>10.1} ms\n\
             \x20 total                                     {:>10.1} ms\n\
             \x20 pagemaps {}, pages present {} ({:.1} MiB), in parent {}, lazy-only {}\n\
             \x20 images {} bytes, wire {} bytes, QUIC datagrams up to {} bytes{}\n\
             {}",
            self.downtime_ms,
            self.session_ms,
            self.total_ms,
            self.pagemaps,
            self.pages_present,
            self.page_bytes as f64 / (1 << 20) as f64,
            self.pages_parent,
            self.pages_lazy_only,
            self.images_bytes,
            self.wire_bytes,
            self.path_mtu,
            crate::transport::black_hole_note(self.path_black_holes),
            self.usage.render(),
        )
    }
}

/// Runs one stop-and-copy migration out of this host.
pub async fn run(opts: StopCopyOptions) -> Result<StopCopyReport> {
    let started = Instant::now();
    let id = Identity::load(&opts.certs)?;
    let (conn, mut ctl, mut ctl_rx) =
        protocol::connect_control(&id, opts.to, &opts.dst_name, &opts.transport).await?;
    let migration_id = format!(
        "s{}-{}",
        SystemTime::now().duration_since(UNIX_EPOCH)?.as_secs(),
        std::process::id()
    );
    send_ctl(
        &mut ctl,
        Msg::Hello(protocol::hello(
            Role::SrcStopAndCopy,
            opts.criu.version.to_string(),
            migration_id.clone(),
        )),
    )
    .await?;
    match next_ctl(&mut ctl_rx).await? {
        Msg::Hello(h) if is_dst_answer(&h) => {}
        Msg::Abort(a) => bail!("dst refused the migration: {}", a.reason),
        other => bail!("dst answered the hello with {other:?}; is it a pageserv dst?"),
    }
    std::fs::create_dir_all(&opts.work_dir)
        .with_context(|| format!("creating {}", opts.work_dir.display()))?;
    // The lane connections are set up before anything freezes.
    let spread = Spread::new(opts.lanes, opts.connections)?;
    let mut conns = vec![conn.clone()];
    let mut lane_ctls = Vec::new();
    for index in 1..spread.connections() {
        let (c, mut c_ctl, c_rx) =
            protocol::connect_control(&id, opts.to, &opts.dst_name, &opts.transport)
                .await
                .with_context(|| format!("opening lane connection {index}"))?;
        let hello = protocol::hello(
            Role::SrcLanes,
            opts.criu.version.to_string(),
            migration_id.clone(),
        );
        send_ctl(&mut c_ctl, Msg::Hello(hello)).await?;
        let lanes = PsLanes {
            lanes: spread.lanes(),
            connections: spread.connections(),
            index,
        };
        send_ctl(&mut c_ctl, Msg::PsLanes(lanes)).await?;
        conns.push(c);
        lane_ctls.push((c_ctl, c_rx));
    }

    let layout = opts.criu.layout();
    let result = match &opts.source {
        StopCopySource::Pid { pid, extra } => {
            // Refuse a dump that would fail before anything freezes (see preflight).
            let (p, criu, given) = (*pid, opts.criu.clone(), extra.clone());
            let added = tokio::task::spawn_blocking(move || {
                crate::preflight::scan::prepare(p, &given, &criu)
            })
            .await??;
            let extra: Vec<String> = extra.iter().cloned().chain(added).collect();
            let carried = crate::criu::opts::for_restore(&extra);
            let (dump, sock) = dump::start(&opts.criu, *pid, &opts.work_dir, &extra)?;
            sock.set_nonblocking(true)?;
            let sock = tokio::net::UnixStream::from_std(sock)?;
            let (r, dump) = migrate_own(
                &mut ctl,
                &mut ctl_rx,
                (&conns, spread),
                sock,
                layout,
                dump,
                carried,
            )
            .await;
            // Whatever happened, the hook hears a verdict and the dump is reaped: "ok" only
            // after dst restored, so CRIU kills the source only then.
            let restored = r.is_ok();
            let status = match dump {
                Some(mut dump) => Some(
                    tokio::task::spawn_blocking(move || (dump.finish(restored), dump.log_tail()))
                        .await?,
                ),
                None => None,
            };
            match (r, status) {
                (Ok(mut rep), Some((Ok(st), tail))) => {
                    rep.dump_ok = st.success();
                    if !st.success() {
                        tracing::warn!("criu dump exited with {st} after the restore:\n{tail}");
                    }
                    Ok(rep)
                }
                (Ok(_), Some((Err(e), _))) => Err(e.into()),
                (Ok(_), None) => Err(anyhow!("lost track of the dump")),
                (Err(e), Some((st, tail))) => Err(e.context(format!(
                    "the dump was told to fail, so CRIU resumes the source tasks (criu dump: {}); \
                     dump log:\n{tail}",
                    match st {
                        Ok(s) => s.to_string(),
                        Err(e) => e.to_string(),
                    }
                ))),
                (Err(e), None) => Err(e),
            }
        }
        StopCopySource::Listen {
            listen,
            peer: allowed,
            images_dir,
        } => {
            let listener = tokio::net::TcpListener::bind(listen)
                .await
                .with_context(|| format!("listening for the dump on {listen}"))?;
            tracing::info!(%listen, %allowed, "waiting for criu dump --page-server to connect");
            let (sock, peer) = loop {
                let (sock, peer) = listener.accept().await.context("accepting the dump")?;
                if page_server_peer_ok(peer.ip(), *allowed) {
                    break (sock, peer);
                }
                tracing::warn!(%peer, %allowed, "refused a page-server connection from another address");
            };
            drop(listener);
            let _ = sock.set_nodelay(true);
            tracing::info!(%peer, "criu dump connected");
            let frozen_at = SystemTime::now();
            let lanes = (&conns[..], spread);
            migrate_external(
                &mut ctl,
                &mut ctl_rx,
                lanes,
                sock,
                layout,
                images_dir,
                frozen_at,
            )
            .await
        }
        StopCopySource::Runc { runc, name } => {
            let lanes = (&conns[..], spread);
            migrate_runc(&mut ctl, &mut ctl_rx, lanes, layout, &opts, runc, name).await
        }
    };
    let mut report = match result {
        Ok(r) => r,
        Err(e) => {
            let _ = send_ctl(
                &mut ctl,
                Msg::Abort(crate::pb::pageserv::Abort {
                    reason: "the source failed; see its log".into(),
                }),
            )
            .await;
            conn.close(1u32.into(), b"source failed");
            return Err(e);
        }
    };
    send_ctl(
        &mut ctl,
        Msg::SourceReleased(SourceReleased {
            dump_ok: report.dump_ok,
            detail: String::new(),
        }),
    )
    .await?;
    ctl.finish();
    report.wire_bytes = conns.iter().map(|c| c.stats().udp_tx.bytes).sum();
    let path = conn.stats().path;
    report.path_mtu = path.current_mtu;
    report.path_black_holes = path.black_holes_detected;
    for (i, c) in conns.iter().enumerate() {
        let s = c.stats();
        tracing::info!(
            connection = i,
            datagrams = s.udp_tx.datagrams,
            transmits = s.udp_tx.ios,
            lost_packets = s.path.lost_packets,
            congestion_events = s.path.congestion_events,
            cwnd = s.path.cwnd,
            rtt_us = s.path.rtt.as_micros() as u64,
            mtu = s.path.current_mtu,
            black_holes = s.path.black_holes_detected,
            "QUIC path of the session"
        );
    }
    for (c, (mut c_ctl, _)) in conns.iter().skip(1).zip(lane_ctls) {
        c_ctl.finish();
        c.close(0u32.into(), b"done");
    }
    if tokio::time::timeout(Duration::from_secs(10), conn.closed())
        .await
        .is_err()
    {
        conn.close(0u32.into(), b"done");
    }
    report.total_ms = started.elapsed().as_secs_f64() * 1e3;
    report.usage = crate::usage::ServiceUsage::measure(report.total_ms, report.wire_bytes);
    Ok(report)
}

/// Serves the session of a dump pageserv started, then waits for its images. Hands the dump
/// back whatever happens, so the caller can always give its hook a verdict.
async fn migrate_own(
    ctl: &mut FrameSender,
    ctl_rx: &mut FrameReceiver,
    lanes: LaneSpec<'_>,
    mut sock: tokio::net::UnixStream,
    layout: Layout,
    mut dump: StopCopyDump,
    carried: Vec<String>,
) -> (Result<StopCopyReport>, Option<StopCopyDump>) {
    let frozen_at = dump.started_at;
    let mut report = StopCopyReport::default();
    let t0 = Instant::now();
    let served = serve_session(ctl, ctl_rx, lanes, &mut sock, layout, ParentSet::none()).await;
    drop(sock);
    let served = match served {
        Ok(s) => s,
        Err(e) => {
            return (
                Err(e.context("serving the dump's page-server session")),
                Some(dump),
            );
        }
    };
    report.session_ms = t0.elapsed().as_secs_f64() * 1e3;
    fill(&mut report, &served);
    // The images are complete once the dump runs its post-dump hook.
    let waited = tokio::task::spawn_blocking(move || {
        let r = dump.wait_images_ready(Duration::from_secs(300));
        (r, dump)
    })
    .await;
    let (ready, dump) = match waited {
        Ok(x) => x,
        Err(e) => return (Err(anyhow!("the dump watcher failed: {e}")), None),
    };
    if let Err(e) = ready {
        return (Err(e.into()), Some(dump));
    }
    let images_dir = dump.images_dir.clone();
    (
        finish_migration(ctl, ctl_rx, &images_dir, frozen_at, carried, report).await,
        Some(dump),
    )
}

async fn migrate_external(
    ctl: &mut FrameSender,
    ctl_rx: &mut FrameReceiver,
    lanes: LaneSpec<'_>,
    mut sock: tokio::net::TcpStream,
    layout: Layout,
    images_dir: &Path,
    frozen_at: SystemTime,
) -> Result<StopCopyReport> {
    let mut report = StopCopyReport::default();
    let t0 = Instant::now();
    let served = serve_session(ctl, ctl_rx, lanes, &mut sock, layout, ParentSet::none())
        .await
        .context("serving the dump's page-server session")?;
    report.session_ms = t0.elapsed().as_secs_f64() * 1e3;
    fill(&mut report, &served);
    // CRIU writes stats-dump last, only after a successful dump.
    let stats = images_dir.join("stats-dump");
    let deadline = Instant::now() + Duration::from_secs(300);
    while !stats.exists() {
        if Instant::now() > deadline {
            bail!(
                "the external dump served its pages but {} did not appear within 300 s: did the \
                 dump fail, or is --images not its -D?",
                stats.display()
            );
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    finish_migration(ctl, ctl_rx, images_dir, frozen_at, Vec::new(), report).await
}

/// A runc container: paused, checkpointed into pageserv's loopback page server, then deleted
/// (restored at dst) or resumed (anything else).
async fn migrate_runc(
    ctl: &mut FrameSender,
    ctl_rx: &mut FrameReceiver,
    lanes: LaneSpec<'_>,
    layout: Layout,
    opts: &StopCopyOptions,
    runc: &Runc,
    name: &str,
) -> Result<StopCopyReport> {
    let listener = tokio::net::TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
        .await
        .context("listening on loopback for the container checkpoint's page server")?;
    let page_server = listener.local_addr()?;
    let (criu, runc_c, name_c, work) = (
        opts.criu.clone(),
        runc.clone(),
        name.to_string(),
        opts.work_dir.clone(),
    );
    let ck = tokio::task::spawn_blocking(move || {
        runc_dump::start(&criu, &runc_c, &name_c, &work, page_server)
    })
    .await??;
    let (r, ck) = runc_session(ctl, ctl_rx, lanes, listener, layout, ck).await;
    let restored = r.is_ok();
    // A checkpoint lost to a panicked watcher was resumed by its Drop.
    let ended = match ck {
        Some(mut ck) => Some(tokio::task::spawn_blocking(move || ck.finish(restored)).await?),
        None => None,
    };
    let problem = ended.as_ref().and_then(|e| e.problem.clone());
    match r {
        Ok(mut rep) => {
            rep.dump_ok = problem.is_none();
            Ok(rep)
        }
        Err(e) => Err(match problem {
            Some(p) => e.context(p),
            None => e.context(format!(
                "the migration of container {name} failed: it is resumed at the source"
            )),
        }),
    }
}

/// Serves the container checkpoint's session, waits for runc to end, lets dst restore. Hands
/// the checkpoint back whatever happens, for its verdict.
async fn runc_session(
    ctl: &mut FrameSender,
    ctl_rx: &mut FrameReceiver,
    lanes: LaneSpec<'_>,
    listener: tokio::net::TcpListener,
    layout: Layout,
    mut ck: RuncCheckpoint,
) -> (Result<StopCopyReport>, Option<RuncCheckpoint>) {
    let mut report = StopCopyReport::default();
    let t0 = Instant::now();
    let frozen_at = ck.paused_at;
    let mut sock = loop {
        tokio::select! {
            a = listener.accept() => match a {
                Ok((sock, peer)) if page_server_peer_ok(peer.ip(), Ipv4Addr::LOCALHOST.into()) => {
                    break sock;
                }
                Ok((_, peer)) => tracing::warn!(%peer, "refused a page-server connection from another address"),
                Err(e) => {
                    let e = anyhow::Error::new(e).context("accepting the checkpoint's page-server connection");
                    return (Err(e), Some(ck));
                }
            },
            _ = tokio::time::sleep(Duration::from_millis(10)) => {
                if let Some(e) = ck.ended_early() {
                    return (Err(e.into()), Some(ck));
                }
                if t0.elapsed() > RUNC_STEP_TIMEOUT {
                    let e = anyhow!(
                        "runc checkpoint of container {} did not connect to pageserv's page \
                         server within {RUNC_STEP_TIMEOUT:?}; see runc's log {} and CRIU's log {}",
                        ck.name, ck.runc_log.display(), ck.criu_log.display()
                    );
                    return (Err(e), Some(ck));
                }
            }
        }
    };
    drop(listener);
    let _ = sock.set_nodelay(true);
    let served = serve_session(ctl, ctl_rx, lanes, &mut sock, layout, ParentSet::none()).await;
    // Dropped unanswered on an error: CRIU fails the dump and leaves the container paused.
    drop(sock);
    let served = match served {
        Ok(s) => s,
        Err(e) => {
            let e = e.context("serving the container checkpoint's page-server session");
            return (Err(e), Some(ck));
        }
    };
    report.session_ms = t0.elapsed().as_secs_f64() * 1e3;
    fill(&mut report, &served);
    let waited = tokio::task::spawn_blocking(move || (ck.wait_done(RUNC_STEP_TIMEOUT), ck)).await;
    let ck = match waited {
        Ok((Ok(()), ck)) => ck,
        Ok((Err(e), ck)) => return (Err(e.into()), Some(ck)),
        Err(e) => return (Err(anyhow!("the checkpoint watcher failed: {e}")), None),
    };
    let images_dir = ck.images_dir.clone();
    let r = finish_migration(ctl, ctl_rx, &images_dir, frozen_at, Vec::new(), report).await;
    (r, Some(ck))
}

fn fill(report: &mut StopCopyReport, served: &Served) {
    report.page_bytes = served.page_bytes;
    report.images_bytes += served.pagemap_bytes;
    let s = &served.summary;
    report.pages_present = s.pages_present;
    report.pages_parent = s.pages_parent;
    report.pages_lazy_only = s.pages_lazy_only;
    report.pagemaps = s.pagemaps.len() as u64;
}

/// Ships the dump's own images, lets dst restore, and reports when it finished.
async fn finish_migration(
    ctl: &mut FrameSender,
    ctl_rx: &mut FrameReceiver,
    images_dir: &Path,
    frozen_at: SystemTime,
    carried: Vec<String>,
    mut report: StopCopyReport,
) -> Result<StopCopyReport> {
    report.images_bytes += ship_images(ctl, images_dir, frozen_at, carried, || {}).await?;
    loop {
        match next_ctl(ctl_rx).await.context("control stream from dst")? {
            Msg::RestoreStarted(_) => tracing::info!("dst started the restore"),
            Msg::RestoreFinished(f) => {
                let frozen = frozen_at.duration_since(UNIX_EPOCH)?.as_nanos() as u64;
                report.downtime_ms = f.finished_at_unix_ns.saturating_sub(frozen) as f64 / 1e6;
                tracing::info!(downtime_ms = report.downtime_ms, "restore finished at dst");
                return Ok(report);
            }
            Msg::RestoreFailed(f) => {
                let tail = if f.log_tail.is_empty() {
                    String::new()
                } else {
                    format!("\n{}", f.log_tail)
                };
                bail!("the restore failed at dst: {}{tail}", f.reason)
            }
            Msg::Abort(a) => bail!("dst aborted the migration: {}", a.reason),
            other => tracing::warn!("ignoring unexpected control message {other:?}"),
        }
    }
}
