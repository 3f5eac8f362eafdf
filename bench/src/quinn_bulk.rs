//! quinn's bulk rate on this machine: the yardstick for the post-copy's goodput.
//!
//! `pageserv quinn-bulk` builds the bench's testbed (two network namespaces joined by a bare
//! veth), starts a receiver in the destination namespace and a sender in the source namespace,
//! two processes as `pageserv dst` and `pageserv src` are, each with pageserv's own transport
//! (mutual TLS, the push connection's settings and congestion controller), and sends `--mib`
//! MiB on one stream. The receiver times from its first byte to its last and prints the rate:
//! what quinn alone moves here, with no CRIU, no userfaultfd and no page handling. Each side also
//! reports its own CPU time (`getrusage`), so the CPU a service spends per byte can be set
//! against quinn's own floor; `--link` shapes the veth as the bench does (e.g. `1gbit`: tbf).

use std::net::{Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::time::Instant;

use anyhow::{Context, Result, bail};
use bytes::Bytes;
use pageserv::keys::Identity;
use pageserv::transport::{self, Congestion, TransportOptions};

use pageserv::usage::{Rusage, Who, core_pct};
use serde::{Deserialize, Serialize};

use crate::bench::matrix::Link;
use crate::testbed::Testbed;

#[derive(clap::Args, Debug)]
pub struct QuinnBulkArgs {
    /// MiB to send.
    #[arg(long, default_value_t = 1024)]
    pub mib: u64,
    /// Congestion controller: cubic, bbr or newreno (the bench gives pageserv the kernel TCP's).
    #[arg(long, default_value = "bbr")]
    pub congestion: String,
    /// The link, as the bench's `--links` takes it (`unlimited`, `1gbit`, ...).
    #[arg(long, default_value = "unlimited")]
    pub link: String,
    /// Ack-eliciting packets the receiver may take before it must acknowledge them (QUIC's
    /// ACK-frequency extension), with `transport::BULK_SPARSE_ACKS`'s delay unless
    /// `--ack-max-delay-us` says otherwise; 0 is quinn's own (an ACK for every second packet);
    /// unset leaves the push connection's (`TransportOptions::with_sparse_bulk_acks`: sparse
    /// under cubic and newreno, quinn's own under bbr).
    #[arg(long)]
    pub ack_threshold: Option<u32>,
    /// With `--ack-threshold N` (N > 0): the longest the receiver holds an ACK back, in µs.
    #[arg(long, requires = "ack_threshold")]
    pub ack_max_delay_us: Option<u64>,
    /// Read the socket as each datagram arrives, as the services do with `--no-recv-batching`
    /// (default: in batches, `transport::recv_batch`).
    #[arg(long)]
    pub no_recv_batching: bool,
    /// Internal: run one side (receiver or sender) in the current namespace.
    #[arg(long, hide = true)]
    pub side: Option<String>,
    #[arg(long, hide = true)]
    pub addr: Option<SocketAddr>,
    #[arg(long, hide = true)]
    pub certs: Option<PathBuf>,
}

fn congestion(name: &str) -> Result<Congestion> {
    Ok(match name {
        "cubic" => Congestion::Cubic,
        "bbr" => Congestion::Bbr,
        "newreno" => Congestion::NewReno,
        other => bail!("unknown congestion controller {other:?}: cubic, bbr or newreno"),
    })
}

/// One side's report, printed as one JSON line.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct SideReport {
    /// The receiver's: first byte to last.
    transfer_ms: f64,
    bytes: u64,
    cpu: Rusage,
}

/// What one bulk transfer measured.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct QuinnBulk {
    pub mib_s: f64,
    pub transfer_ms: f64,
    /// CPU of each whole side process (handshake included).
    pub sender_cpu_ms: f64,
    pub receiver_cpu_ms: f64,
}

impl QuinnBulk {
    /// Percent of a core each side used over the transfer: (sender, receiver).
    pub fn core_pct(&self) -> (f64, f64) {
        let pct = |ms| core_pct(ms, self.transfer_ms).unwrap_or(0.0);
        (pct(self.sender_cpu_ms), pct(self.receiver_cpu_ms))
    }
}

fn side_report(out: &[u8], side: &str) -> Result<SideReport> {
    let text = String::from_utf8_lossy(out);
    serde_json::from_str(text.trim())
        .with_context(|| format!("the {side} printed {text:?}, not its report"))
}

/// quinn's bulk rate (and each side's CPU) over the testbed's veth, shaped as `link`.
pub fn measure(mib: u64, congestion_name: &str, link: &Link) -> Result<QuinnBulk> {
    measure_with(mib, congestion_name, link, &[])
}

/// [`measure`] with extra arguments for both sides (`--ack-threshold`, `--ack-max-delay-us`).
pub fn measure_with(
    mib: u64,
    congestion_name: &str,
    link: &Link,
    side_args: &[String],
) -> Result<QuinnBulk> {
    let linkem = std::env::current_exe()?.with_file_name("linkem");
    let bed = Testbed::pair(3, &link.shape(), &linkem).context("building the testbed")?;
    let (src_certs, dst_certs) = pageserv::keys::demo_identities(&bed.dir.join("keys"))?;
    let exe = std::env::current_exe()?;
    let addr = SocketAddr::new(bed.dst_addr.into(), 47_000);
    let side = |mut cmd: std::process::Command, side: &str, certs: &std::path::Path| {
        cmd.args([
            "quinn-bulk",
            "--side",
            side,
            "--congestion",
            congestion_name,
        ])
        .arg("--mib")
        .arg(mib.to_string())
        .arg("--addr")
        .arg(addr.to_string())
        .arg("--certs")
        .arg(certs);
        cmd.args(side_args);
        cmd.stdout(std::process::Stdio::piped());
        cmd
    };
    let receiver = side(bed.in_dst(&exe), "receiver", &dst_certs)
        .spawn()
        .context("starting the receiver")?;
    std::thread::sleep(std::time::Duration::from_millis(300));
    let sender = side(bed.in_src(&exe), "sender", &src_certs)
        .output()
        .context("running the sender")?;
    let out = receiver
        .wait_with_output()
        .context("waiting for the receiver")?;
    if !sender.status.success() || !out.status.success() {
        bail!(
            "quinn-bulk: sender {}, receiver {}",
            sender.status,
            out.status
        );
    }
    let (rx, tx) = (
        side_report(&out.stdout, "receiver")?,
        side_report(&sender.stdout, "sender")?,
    );
    if rx.transfer_ms <= 0.0 {
        bail!("quinn-bulk: the receiver got nothing");
    }
    Ok(QuinnBulk {
        mib_s: rx.bytes as f64 / (1u64 << 20) as f64 / (rx.transfer_ms / 1e3),
        transfer_ms: rx.transfer_ms,
        sender_cpu_ms: tx.cpu.cpu_ms(),
        receiver_cpu_ms: rx.cpu.cpu_ms(),
    })
}

pub fn run(a: QuinnBulkArgs) -> Result<()> {
    let cc = congestion(&a.congestion)?;
    let mut opts = TransportOptions {
        congestion: cc,
        ..Default::default()
    }
    .with_sparse_bulk_acks();
    let mut side_args = Vec::new();
    if a.no_recv_batching {
        opts.recv_batching = None;
        side_args.push("--no-recv-batching".to_string());
    }
    if let Some(threshold) = a.ack_threshold {
        let max_delay = a.ack_max_delay_us.map_or(
            transport::BULK_SPARSE_ACKS.max_delay,
            std::time::Duration::from_micros,
        );
        opts.sparse_acks = (threshold > 0).then_some(transport::SparseAcks {
            threshold,
            max_delay,
        });
        side_args.extend(["--ack-threshold".to_string(), threshold.to_string()]);
        side_args.extend([
            "--ack-max-delay-us".to_string(),
            max_delay.as_micros().to_string(),
        ]);
    }
    match a.side.as_deref() {
        None => {
            let link = Link::parse(&a.link).map_err(anyhow::Error::msg)?;
            let q = measure_with(a.mib, &a.congestion, &link, &side_args)?;
            let (tx, rx) = q.core_pct();
            println!(
                "quinn bulk rate: {:.0} MiB/s ({} MiB, {}, link {}); CPU: sender {:.0} ms \
                 ({tx:.0}% of a core), receiver {:.0} ms ({rx:.0}% of a core) over {:.0} ms",
                q.mib_s,
                a.mib,
                a.congestion,
                link.label(),
                q.sender_cpu_ms,
                q.receiver_cpu_ms,
                q.transfer_ms
            );
            Ok(())
        }
        Some(side) => {
            let (Some(addr), Some(certs)) = (a.addr, a.certs) else {
                bail!("--side needs --addr and --certs");
            };
            let id = Identity::load(&certs)?;
            // The runtime pageserv's services run a migration on (see `async_runtime`).
            let rt = pageserv::async_runtime::build(pageserv::async_runtime::Flavor::OneThread)?;
            rt.block_on(async {
                match side {
                    "receiver" => receive(addr, &id, &opts).await,
                    "sender" => send(addr, &id, &opts, a.mib).await,
                    other => bail!("unknown side {other:?}"),
                }
            })
        }
    }
}

async fn receive(addr: SocketAddr, id: &Identity, opts: &TransportOptions) -> Result<()> {
    let ep = transport::server_with(addr, id, opts)?;
    let (conn, _) = transport::accept(&ep, id).await?;
    let mut stream = conn.accept_uni().await?;
    let mut got = 0u64;
    let mut first: Option<Instant> = None;
    while let Some(chunk) = stream.read_chunk(1 << 20, true).await? {
        first.get_or_insert_with(Instant::now);
        got += chunk.bytes.len() as u64;
    }
    let secs = first.map(|t| t.elapsed().as_secs_f64()).unwrap_or(0.0);
    if secs <= 0.0 {
        bail!("nothing received");
    }
    conn.close(0u32.into(), b"done");
    // Let the close reach the sender: a process that exits first leaves it waiting out its
    // idle timeout (30 s).
    tokio::time::timeout(std::time::Duration::from_secs(2), ep.wait_idle())
        .await
        .ok();
    print_report(secs * 1e3, got)
}

async fn send(addr: SocketAddr, id: &Identity, opts: &TransportOptions, mib: u64) -> Result<()> {
    let local = SocketAddr::new(Ipv4Addr::UNSPECIFIED.into(), 0);
    // The demo identities' destination certificate is named "dst" (see keys::demo_identities).
    let conn = transport::connect_with(local, addr, "dst", id, opts).await?;
    let mut s = conn.open_uni().await?;
    let chunk = Bytes::from(vec![0x5au8; 1 << 20]);
    for _ in 0..mib {
        s.write_chunk(chunk.clone()).await?;
    }
    s.finish()?;
    s.stopped().await.ok();
    conn.closed().await;
    print_report(0.0, mib << 20)
}

fn print_report(transfer_ms: f64, bytes: u64) -> Result<()> {
    let r = SideReport {
        transfer_ms,
        bytes,
        cpu: Rusage::of(Who::Own),
    };
    println!("{}", serde_json::to_string(&r)?);
    Ok(())
}
