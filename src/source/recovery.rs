//! Post-copy recovery at the source: when the link to dst dies mid post-copy (past QUIC's idle
//! timeout), reconnect with backoff and continue the same migration, like QEMU's postcopy
//! recover. The dump stays frozen and its pump keeps CRIU's session the whole time; only the
//! QUIC side is rebuilt.
//!
//! The resume handshake (proto/pageserv.proto, `Missing`/`ResumeReady`): a new control
//! connection with the hello role [`Role::SrcResume`] and the migration's id; dst answers with its
//! hello, every lazy range it still lacks and `ResumeReady`; then a new fault connection. Nothing
//! sent on the dead link is assumed to have arrived: the push plan becomes dst's missing list,
//! and dst asks again for every fault it is still waiting on.

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use tokio::time::Instant;

use crate::keys::Identity;
use crate::limits::{LimitHit, MAX_MISSING_RANGES};
use crate::pages::PageRange;
use crate::pb::pageserv::{ResumeReady, control::Msg};
use crate::protocol::{self, Role, connect_control, next_ctl, send_ctl};
use crate::transport::{self, FrameReceiver, FrameSender, TransportOptions};

/// First wait between reconnect attempts; it doubles up to [`MAX_BACKOFF`].
const FIRST_BACKOFF: Duration = Duration::from_millis(250);
const MAX_BACKOFF: Duration = Duration::from_secs(4);

/// Per image pid, the lazy ranges dst still lacks.
pub type MissingList = Vec<(u32, Vec<PageRange>)>;

/// One link to dst: the control connection (which also carries the push stream) and the fault
/// connection.
pub struct DstConnections {
    pub conn: quinn::Connection,
    pub fault_conn: quinn::Connection,
    pub ctl: FrameSender,
    pub ctl_rx: FrameReceiver,
}

impl DstConnections {
    /// UDP bytes this link sent so far.
    pub fn tx_bytes(&self) -> u64 {
        self.conn.stats().udp_tx.bytes + self.fault_conn.stats().udp_tx.bytes
    }
}

/// What dst reported when the link came back.
pub struct Resumed {
    pub link: DstConnections,
    /// The fault connection's stream, for a new fault server.
    pub fault_stream: (FrameSender, FrameReceiver),
    pub missing: MissingList,
    pub ready: ResumeReady,
}

pub use crate::protocol::link_lost;

/// Everything a reconnect needs to say who it is.
pub struct Reconnect<'a> {
    pub id: &'a Identity,
    pub to: SocketAddr,
    /// The name dst's certificate must carry (see [`crate::keys::trust::dst_name`]).
    pub dst_name: &'a str,
    pub migration_id: &'a str,
    pub criu_version: String,
    pub push_transport: &'a TransportOptions,
    pub fault_transport: &'a TransportOptions,
}

/// Reconnects until `deadline`, with backoff. An answer from dst that it cannot resume this
/// migration (it ended it, or never knew it) is final: no more attempts.
pub async fn reconnect(r: &Reconnect<'_>, deadline: Instant) -> Result<Resumed> {
    let mut backoff = FIRST_BACKOFF;
    let mut attempt = 0u32;
    loop {
        attempt += 1;
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            bail!("dst did not come back within the recover timeout ({attempt} attempts)");
        }
        // One handshake may take up to QUIC's idle timeout against an unreachable host.
        match tokio::time::timeout(left, resume_once(r)).await {
            Ok(Ok(resumed)) => {
                tracing::info!(
                    attempt,
                    "link to dst re-established; resuming the post-copy"
                );
                return Ok(resumed);
            }
            Ok(Err(Attempt::Final(e))) => return Err(e),
            Ok(Err(Attempt::Retry(e))) => {
                tracing::warn!(attempt, "reconnecting to dst at {}: {e:#}", r.to)
            }
            Err(_) => {
                bail!("dst did not come back within the recover timeout ({attempt} attempts)")
            }
        }
        let wait = backoff.min(deadline.saturating_duration_since(Instant::now()));
        tokio::time::sleep(wait).await;
        backoff = (backoff * 2).min(MAX_BACKOFF);
    }
}

enum Attempt {
    /// The link is still down (or broke again): try again.
    Retry(anyhow::Error),
    /// dst answered and will not resume: stop.
    Final(anyhow::Error),
}

fn hello(r: &Reconnect<'_>, role: Role) -> Msg {
    Msg::Hello(protocol::hello(
        role,
        r.criu_version.clone(),
        r.migration_id.to_string(),
    ))
}

async fn resume_once(r: &Reconnect<'_>) -> Result<Resumed, Attempt> {
    let retry = Attempt::Retry;
    let (conn, mut ctl, mut ctl_rx) = connect_control(r.id, r.to, r.dst_name, r.push_transport)
        .await
        .map_err(retry)?;
    send_ctl(&mut ctl, hello(r, Role::SrcResume))
        .await
        .map_err(retry)?;
    let fault_at = match next_ctl(&mut ctl_rx).await.map_err(retry)? {
        Msg::Hello(h) if Role::of(&h) == Some(Role::Dst) => protocol::fault_addr(r.to, &h),
        Msg::Abort(a) => {
            return Err(Attempt::Final(anyhow::anyhow!(
                "dst will not resume migration {}: {}",
                protocol::id_tag(r.migration_id),
                a.reason
            )));
        }
        other => {
            return Err(Attempt::Final(anyhow::anyhow!(
                "dst answered the resume hello with {other:?}"
            )));
        }
    };
    let mut missing = Vec::new();
    let mut ranges_seen = 0usize;
    let ready = loop {
        match next_ctl(&mut ctl_rx).await.map_err(retry)? {
            Msg::Missing(m) => {
                if m.vaddr.len() != m.nr_pages.len() {
                    return Err(Attempt::Final(anyhow::anyhow!(
                        "dst sent a malformed missing list for pid {} ({} addresses, {} lengths)",
                        m.pid,
                        m.vaddr.len(),
                        m.nr_pages.len()
                    )));
                }
                ranges_seen += m.vaddr.len();
                if ranges_seen > MAX_MISSING_RANGES {
                    return Err(Attempt::Final(
                        LimitHit::fixed(
                            format!(
                                "ranges in dst's missing lists of one resume (pid {})",
                                m.pid
                            ),
                            format!("{MAX_MISSING_RANGES} ranges"),
                            "dst lists each missing lazy range once, merged",
                        )
                        .into(),
                    ));
                }
                let ranges = m
                    .vaddr
                    .iter()
                    .zip(&m.nr_pages)
                    .map(|(&v, &n)| PageRange::new(v, n))
                    .collect();
                missing.push((m.pid, ranges));
            }
            Msg::ResumeReady(ready) => break ready,
            Msg::Abort(a) => {
                return Err(Attempt::Final(anyhow::anyhow!(
                    "dst aborted the resume: {}",
                    a.reason
                )));
            }
            other => {
                return Err(Attempt::Final(anyhow::anyhow!(
                    "dst sent {other:?} during the resume handshake"
                )));
            }
        }
    };
    let fault_conn = transport::connect_with(
        protocol::any_addr(r.to),
        fault_at,
        r.dst_name,
        r.id,
        r.fault_transport,
    )
    .await
    .context("opening the fault connection")
    .map_err(retry)?;
    let (send, recv) = fault_conn
        .open_bi()
        .await
        .context("opening the fault stream")
        .map_err(retry)?;
    let mut fault_tx = FrameSender::new(send);
    send_ctl(&mut fault_tx, hello(r, Role::SrcFaults))
        .await
        .map_err(retry)?;
    Ok(Resumed {
        link: DstConnections {
            conn,
            fault_conn,
            ctl,
            ctl_rx,
        },
        fault_stream: (fault_tx, FrameReceiver::new(recv)),
        missing,
        ready,
    })
}
