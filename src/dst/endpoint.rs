//! `pageserv dst`'s endpoint: the accept loop, the hellos and the routing. One migration by
//! default ([`run`]); `--keep-serving` / `--max-migrations N`: many at once ([`serve`]).
//!
//! Each lazy source opens two connections (see source::service): its control connection (hello
//! role [`Role::Src`]) and its fault connection (role [`Role::SrcFaults`], same migration id).
//! This loop accepts every connection, reads its hello, and either answers it and starts the
//! per-migration code ([`migration::migrate_in`], or [`crate::dst::stop_and_copy::migrate_in`]
//! for role [`Role::SrcStopAndCopy`]) with its own images, work directory, restore and fault
//! thread, or hands the fault connection to the migration whose id it names. Migrations are
//! independent: one failing ends only itself. A source whose link died mid post-copy comes back
//! with a resume connection (role [`Role::SrcResume`]) naming its migration id; it is routed the
//! same way (see dst::post_copy).
//!
//! Trust: a source is admitted by mutual TLS and then by `--allow-source` / `--deny-cert`
//! ([`crate::keys::trust::Admission`]). A fault or resume connection joins a migration only if
//! it presents the very certificate of the control connection that opened it
//! ([`crate::keys::trust::may_join`]): knowing a migration's id is not enough. Peers learn
//! short reasons; the details stay in this host's log, where a migration is named by its tag
//! ([`protocol::id_tag`]), not its id.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result, anyhow, bail};
use serde::Serialize;
use tokio::sync::mpsc;
use tokio::task::JoinSet;

use crate::dst::options::{DstOptions, fresh_dir};
use crate::dst::post_copy::Routed;
use crate::dst::{adopt, migration};
use crate::keys::Identity;
use crate::keys::trust::{Admission, Fingerprint, may_join};
use crate::limits;
use crate::pb::pageserv::{Abort, Control, Hello, control::Msg};
use crate::protocol::{self, PROTOCOL_VERSION, Role, id_tag, peer_error, send_ctl};
use crate::stats::DstReport;
use crate::transport::{self, FrameReceiver, FrameSender, PeerIdentity};
use crate::wire::Frame;

/// How many migrations the loop takes.
#[derive(Debug, Clone)]
pub struct ServeLimits {
    /// Exit once this many migrations have ended (`None`: serve until killed).
    pub max_migrations: Option<u64>,
    /// Migrations running at once; a source beyond this is refused with an Abort.
    pub max_concurrent: usize,
}

/// How one migration ended.
#[derive(Debug, Clone, Serialize)]
pub struct MigrationOutcome {
    /// The migration's tag ([`protocol::id_tag`]), as the logs of both hosts name it.
    pub migration_id: String,
    pub ok: bool,
    pub error: Option<String>,
    pub report: Option<DstReport>,
}

/// A classified incoming connection.
enum Incoming {
    Migration {
        conn: quinn::Connection,
        ctl: (FrameSender, FrameReceiver, Hello),
        who: PeerIdentity,
    },
    /// A fault connection or a resume, for the migration named `migration_id`.
    Routed {
        migration_id: String,
        what: Routed,
        who: PeerIdentity,
    },
}

/// A running migration's inbox for its fault and resume connections, and who opened it.
struct Route {
    inbox: mpsc::Sender<Routed>,
    /// The control connection's certificate (for an adopted migration: as recorded in its
    /// directory by the dst that died, see dst::adopt).
    owner: Fingerprint,
    owner_name: String,
}

/// Accepts one migration and runs it to the end ([`serve`] with a limit
/// of one, so a source that reconnects mid post-copy finds its migration).
pub async fn run(opts: DstOptions) -> Result<DstReport> {
    let limits = ServeLimits {
        max_migrations: Some(1),
        max_concurrent: 1,
    };
    let mut outcomes = serve(opts, limits, |_| {}).await?;
    match outcomes.pop() {
        Some(MigrationOutcome {
            report: Some(r), ..
        }) => Ok(r),
        Some(o) => Err(anyhow!(
            o.error.unwrap_or_else(|| "the migration failed".into())
        )),
        None => bail!("no migration arrived"),
    }
}

/// Accepts migrations until `limits` says stop; calls `on_end` as each one ends (e.g. to write
/// the stats). Fails only if the endpoint cannot be set up; per-migration failures are outcomes.
pub async fn serve(
    opts: DstOptions,
    limits: ServeLimits,
    mut on_end: impl FnMut(&MigrationOutcome),
) -> Result<Vec<MigrationOutcome>> {
    let id = Arc::new(Identity::load(&opts.certs)?);
    let endpoint = transport::server_with(opts.listen, &id, &opts.transport)
        .with_context(|| format!("listening on {}", opts.listen))?;
    tracing::info!(
        listen = %endpoint.local_addr()?,
        max_migrations = ?limits.max_migrations,
        max_concurrent = limits.max_concurrent,
        "pageserv dst ready"
    );
    let early = opts.restore.starts_early();
    if let Some(w) = crate::criu::kdat::probe().and_then(|s| crate::criu::kdat::warning(s, early)) {
        tracing::warn!("{w}");
    }
    // Fault connections get an endpoint (a UDP socket) of their own, driven on the fault lane:
    // on the main socket a fault reply would queue behind every pushed packet the kernel holds
    // for it, and its connection's driver behind the push's tasks.
    let fault_endpoint = transport::server_with(
        SocketAddr::new(endpoint.local_addr()?.ip(), 0),
        &id,
        &opts.transport.clone().for_faults(),
    )
    .context("opening the fault endpoint")?;
    let fault_port = fault_endpoint.local_addr()?.port();
    let opts = Arc::new(opts);
    let (arrive_tx, mut arrive_rx) = mpsc::channel::<Incoming>(64);
    // Each running migration's inbox for its fault and resume connections.
    let mut routes: HashMap<String, Route> = HashMap::new();
    let mut running: JoinSet<(String, Option<quinn::Connection>, Result<DstReport>)> =
        JoinSet::new();
    // Accepting (TLS handshake, admission) and reading hellos run apart from this loop, so that
    // nothing here can cancel a half-accepted connection.
    let mut outcomes = Vec::new();
    let mut started: u64 = 0;
    // Migrations whose dst died mid post-copy, from their keepers, before any source can come
    // back: their resume finds them (dst::adopt).
    let base = opts.work_base.clone();
    let orphans = tokio::task::spawn_blocking(move || adopt::find(&base))
        .await
        .context("looking for migrations to adopt")?;
    for orphan in orphans {
        let mid = orphan.migration_id.clone();
        if routes.contains_key(&mid) {
            tracing::warn!(migration = %id_tag(&mid), "two directories claim this migration: the second is not adopted");
            continue;
        }
        started += 1;
        let (route_tx, route_rx) = mpsc::channel(limits::MAX_ROUTED_WAITING);
        // Adopted after a restart: bound to the certificate that opened it, as recorded.
        routes.insert(
            mid.clone(),
            Route {
                inbox: route_tx,
                owner: orphan.opener,
                owner_name: format!("{} (adopted)", orphan.opener_name),
            },
        );
        let opts = opts.clone();
        running.spawn(async move {
            let result = adopt::adopt_in(&opts, orphan, route_rx, fault_port)
                .await
                .map(with_usage);
            (mid, None, result)
        });
    }
    let rule = Arc::new(opts.admission.clone());
    let acceptor = tokio::spawn(accept_all(
        endpoint.clone(),
        id.clone(),
        rule.clone(),
        arrive_tx.clone(),
        false,
    ));
    let fault_acceptor = tokio::spawn(accept_all(
        fault_endpoint.clone(),
        id.clone(),
        rule,
        arrive_tx,
        true,
    ));
    let done = |started: u64, outcomes: &Vec<MigrationOutcome>| {
        limits
            .max_migrations
            .is_some_and(|m| started >= m && outcomes.len() as u64 >= m)
    };
    loop {
        if done(started, &outcomes) {
            break;
        }
        tokio::select! {
            Some(arrival) = arrive_rx.recv() => match arrival {
                Incoming::Migration { conn, ctl, who } => {
                    let mid = ctl.2.migration_id.clone();
                    let tag = id_tag(&mid);
                    let full = limits.max_migrations.is_some_and(|m| started >= m);
                    let refusal = if full {
                        Some("this dst takes no more migrations (--max-migrations reached)".to_string())
                    } else if running.len() >= limits.max_concurrent {
                        Some(format!("this dst is busy: {} migrations in progress", running.len()))
                    } else if routes.contains_key(&mid) || mid.is_empty() {
                        Some(format!("migration {tag} is empty or already in progress"))
                    } else {
                        None
                    };
                    if let Some(reason) = refusal {
                        tracing::warn!(migration = %tag, source = %who, "refusing a migration: {reason}");
                        tokio::spawn(refuse(conn, ctl.0, reason));
                        continue;
                    }
                    started += 1;
                    let (route_tx, route_rx) = mpsc::channel(limits::MAX_ROUTED_WAITING);
                    routes.insert(mid.clone(), Route {
                        inbox: route_tx,
                        owner: who.fingerprint,
                        owner_name: who.to_string(),
                    });
                    let opts = opts.clone();
                    tracing::info!(migration = %tag, source = %who, running = running.len() + 1, "migration accepted");
                    running.spawn(async move {
                        let result = migrate_in(&opts, &conn, ctl, route_rx, fault_port)
                            .await
                            .map(with_usage);
                        (mid, Some(conn), result)
                    });
                }
                Incoming::Routed { migration_id, what, who } => {
                    let tag = id_tag(&migration_id);
                    match routes.get(&migration_id) {
                        Some(route) if !may_join(&route.owner, &who.fingerprint) => {
                            tracing::warn!(
                                migration = %tag, from = %who, fingerprint = %who.fingerprint.short(),
                                owner = %route.owner_name, owner_fingerprint = %route.owner.short(),
                                "refused a {} connection: its certificate is not the one that \
                                 opened the migration", what.kind()
                            );
                            refuse_routed(what, format!(
                                "migration {tag} belongs to another certificate: a migration's \
                                 connections must all present the certificate that opened it"
                            ));
                        }
                        Some(route) => match route.inbox.try_send(what) {
                            Ok(()) => {}
                            Err(mpsc::error::TrySendError::Full(what)) => {
                                let hit = limits::LimitHit::fixed(
                                    format!("connections waiting for migration {tag}"),
                                    limits::MAX_ROUTED_WAITING.to_string(),
                                    "an honest source has one fault connection and one resume in flight",
                                );
                                tracing::warn!(migration = %tag, from = %who, "refused a {} connection: {hit}", what.kind());
                                refuse_routed(what, format!(
                                    "migration {tag} has {} connections waiting already (the limit)",
                                    limits::MAX_ROUTED_WAITING
                                ));
                            }
                            Err(mpsc::error::TrySendError::Closed(what)) => {
                                tracing::warn!(migration = %tag, "connection for an ended migration: closed");
                                refuse_routed(what, "this migration has ended".into());
                            }
                        },
                        None => {
                            tracing::warn!(migration = %tag, from = %who, "connection for no running migration: refused");
                            refuse_routed(
                                what,
                                format!(
                                    "no migration {tag} runs here (it ended, or this dst was \
                                     restarted): the source stays frozen; retry it with `pageserv \
                                     src --resume DIR`"
                                ),
                            );
                        }
                    }
                }
            },
            Some(joined) = running.join_next(), if !running.is_empty() => {
                let outcome = match joined {
                    Ok((mid, conn, result)) => {
                        routes.remove(&mid);
                        let tag = id_tag(&mid);
                        match (&result, conn) {
                            (Ok(_), Some(conn)) => conn.close(0u32.into(), b"done"),
                            (Err(_), Some(conn)) => conn.close(
                                1u32.into(),
                                peer_error("the migration failed at the destination", &mid).as_bytes(),
                            ),
                            (_, None) => {}
                        }
                        match result {
                            Ok(r) => MigrationOutcome { migration_id: tag, ok: true, error: None, report: Some(r) },
                            Err(e) => {
                                tracing::error!(migration = %tag, "migration failed: {e:#}");
                                MigrationOutcome { migration_id: tag, ok: false, error: Some(format!("{e:#}")), report: None }
                            }
                        }
                    }
                    Err(e) => MigrationOutcome {
                        migration_id: String::new(),
                        ok: false,
                        error: Some(format!("a migration task panicked: {e}")),
                        report: None,
                    },
                };
                tracing::info!(migration = %outcome.migration_id, ok = outcome.ok, running = running.len(), "migration ended");
                on_end(&outcome);
                outcomes.push(outcome);
            },
        }
    }
    acceptor.abort();
    fault_acceptor.abort();
    fault_endpoint.close(0u32.into(), b"done");
    endpoint.close(0u32.into(), b"done");
    let _ = tokio::time::timeout(Duration::from_secs(3), async {
        endpoint.wait_idle().await;
        fault_endpoint.wait_idle().await;
    })
    .await;
    Ok(outcomes)
}

/// Connection attempts in their handshake, admission or hello at once; past half of it a new
/// client must first prove its address with a stateless QUIC Retry, past all of it it is
/// refused. Either way no state is held for it.
pub const MAX_HANDSHAKES: usize = 64;
/// One deadline over a client's TLS handshake, admission and hello: a client that starts a
/// handshake and stalls (or trickles) is dropped after it, and never holds up another.
pub const ADMIT_DEADLINE: Duration = Duration::from_secs(15);

/// Accepts every client and classifies it by its hello, each in a task of its own, under one
/// deadline (see [`ADMIT_DEADLINE`], [`MAX_HANDSHAKES`]), under the admission `rule`. On the
/// fault endpoint (`faults_only`) anything but a fault connection is dropped: its bulk would run
/// on the lane.
async fn accept_all(
    endpoint: quinn::Endpoint,
    id: Arc<Identity>,
    rule: Arc<Admission>,
    to_loop: mpsc::Sender<Incoming>,
    faults_only: bool,
) {
    let in_progress = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    loop {
        let incoming = match transport::next_incoming(&endpoint).await {
            Ok(i) => i,
            Err(transport::TransportError::EndpointClosed) => return,
            Err(e) => {
                tracing::warn!("accepting a client: {e}");
                continue;
            }
        };
        let busy = in_progress.load(std::sync::atomic::Ordering::Relaxed);
        let peer = incoming.remote_address();
        if busy >= MAX_HANDSHAKES / 2 && !incoming.remote_address_validated() {
            if busy >= MAX_HANDSHAKES || !incoming.may_retry() {
                tracing::warn!(%peer, busy, "refusing a client: {MAX_HANDSHAKES} handshakes at once");
                incoming.refuse();
            } else if let Err(e) = incoming.retry() {
                tracing::warn!(%peer, "could not send a QUIC Retry: {e}");
            }
            continue;
        }
        if busy >= MAX_HANDSHAKES {
            tracing::warn!(%peer, busy, "refusing a client: {MAX_HANDSHAKES} handshakes at once");
            incoming.refuse();
            continue;
        }
        in_progress.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let (tx, id, rule, in_progress) = (
            to_loop.clone(),
            id.clone(),
            rule.clone(),
            in_progress.clone(),
        );
        tokio::spawn(async move {
            let admitted = tokio::time::timeout(ADMIT_DEADLINE, async {
                let (conn, who) = transport::admit_checked(incoming, &id, &rule).await?;
                let arrival = classify(conn, who).await?;
                Ok::<_, anyhow::Error>(arrival)
            })
            .await;
            in_progress.fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
            match admitted {
                Ok(Ok(a))
                    if faults_only
                        && !matches!(
                            a,
                            Incoming::Routed {
                                what: Routed::Faults(_),
                                ..
                            }
                        ) =>
                {
                    tracing::warn!(%peer, "dropping a client: only fault connections belong on the fault endpoint");
                }
                Ok(Ok(a)) => {
                    let _ = tx.send(a).await;
                }
                Ok(Err(e)) => tracing::warn!(%peer, "dropping a client: {e:#}"),
                Err(_) => tracing::warn!(
                    %peer,
                    "dropping a client that did not finish its handshake, admission and hello \
                     within {ADMIT_DEADLINE:?}"
                ),
            }
        });
    }
}

async fn classify(conn: quinn::Connection, who: PeerIdentity) -> Result<Incoming> {
    let (tx, rx, hello) =
        tokio::time::timeout(Duration::from_secs(30), protocol::accept_control(&conn))
            .await
            .context("no hello within 30 s")??;
    let role = Role::of(&hello);
    Ok(if role == Some(Role::SrcFaults) {
        Incoming::Routed {
            migration_id: hello.migration_id.clone(),
            what: Routed::Faults((conn, tx, rx)),
            who,
        }
    } else if role == Some(Role::SrcLanes) {
        Incoming::Routed {
            migration_id: hello.migration_id.clone(),
            what: Routed::Lanes((conn, tx, rx)),
            who,
        }
    } else if role == Some(Role::SrcResume) {
        Incoming::Routed {
            migration_id: hello.migration_id.clone(),
            what: Routed::Resume {
                conn,
                ctl: tx,
                ctl_rx: rx,
                hello,
            },
            who,
        }
    } else {
        Incoming::Migration {
            conn,
            ctl: (tx, rx, hello),
            who,
        }
    })
}

/// Refuses a fault or resume connection: a resume learns why (src then stops retrying).
fn refuse_routed(what: Routed, reason: String) {
    match what {
        Routed::Faults((conn, _, _)) | Routed::Lanes((conn, _, _)) => {
            conn.close(2u32.into(), reason.as_bytes())
        }
        Routed::Resume { conn, ctl, .. } => {
            tokio::spawn(refuse(conn, ctl, reason));
        }
    }
}

/// Tells a source why it is refused, then closes its connection.
async fn refuse(conn: quinn::Connection, mut ctl: FrameSender, reason: String) {
    let abort = Frame::Control(Control {
        msg: Some(Msg::Abort(Abort {
            reason: reason.clone(),
        })),
    });
    let _ = tokio::time::timeout(Duration::from_secs(3), ctl.send(&abort)).await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    conn.close(3u32.into(), reason.as_bytes());
}

/// The report with this process's CPU time and peak RSS so far (the whole service's, shared by
/// migrations running at once) against the migration's wall time and bytes.
fn with_usage(mut r: DstReport) -> DstReport {
    r.usage = crate::usage::ServiceUsage::measure(r.total_ms, r.bytes_received);
    r
}

/// Answers a migration's hello (or refuses its protocol version / page size) and runs it: a
/// stop-and-copy one ([`crate::dst::stop_and_copy`]) or a post-copy one ([`migration`]).
async fn migrate_in(
    opts: &DstOptions,
    conn: &quinn::Connection,
    ctl: (FrameSender, FrameReceiver, Hello),
    routes: mpsc::Receiver<Routed>,
    fault_port: u16,
) -> Result<DstReport> {
    let started = std::time::Instant::now();
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
    let answer = Hello {
        fault_port: fault_port.into(),
        ..protocol::hello(
            Role::Dst,
            opts.criu.version.to_string(),
            hello.migration_id.clone(),
        )
    };
    send_ctl(&mut ctl, Msg::Hello(answer)).await?;

    if Role::of(&hello) == Some(Role::SrcStopAndCopy) {
        let tag = id_tag(&hello.migration_id);
        let dir = fresh_dir(&opts.work_base, &tag)?;
        let r = crate::dst::stop_and_copy::migrate_in(
            opts,
            &mut ctl,
            &mut ctl_rx,
            (conn, routes),
            &dir,
            &tag,
        )
        .await;
        return crate::dst::options::leave_dir(&dir, r, opts.keep_work);
    }
    migration::migrate_in(
        opts,
        conn,
        (ctl, ctl_rx, hello),
        routes,
        started,
        fault_port,
    )
    .await
}
