//! quinn's bulk rate on this machine: the yardstick for the post-copy's goodput.
//!
//! `pageserv quinn-bulk` builds the bench's testbed (two network namespaces joined by a bare
//! veth), starts a receiver in the destination namespace and a sender in the source namespace,
//! two processes as `pageserv dst` and `pageserv src` are, each with pageserv's own transport
//! (mutual TLS, the push connection's settings and congestion controller), and sends `--mib`
//! MiB on one stream. The receiver times from its first byte to its last and prints the rate:
//! what quinn alone moves here, with no CRIU, no userfaultfd and no page handling.

use std::net::{Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::time::Instant;

use anyhow::{Context, Result, bail};
use bytes::Bytes;
use pageserv::keys::Identity;
use pageserv::transport::{self, Congestion, TransportOptions};

use crate::testbed::Testbed;
use crate::testbed::link::LinkShape;

#[derive(clap::Args, Debug)]
pub struct QuinnBulkArgs {
    /// MiB to send.
    #[arg(long, default_value_t = 1024)]
    pub mib: u64,
    /// Congestion controller: cubic, bbr or newreno (the bench gives pageserv the kernel TCP's).
    #[arg(long, default_value = "bbr")]
    pub congestion: String,
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

/// The receiver's rate in MiB/s over the testbed's bare veth.
pub fn measure(mib: u64, congestion_name: &str) -> Result<f64> {
    let linkem = std::env::current_exe()?.with_file_name("linkem");
    let bed = Testbed::pair(
        3,
        &LinkShape {
            rate_bps: None,
            delay_us: 0,
            loss: 0.0,
        },
        &linkem,
    )
    .context("building the testbed")?;
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
        cmd
    };
    let receiver = side(bed.in_dst(&exe), "receiver", &dst_certs)
        .stdout(std::process::Stdio::piped())
        .spawn()
        .context("starting the receiver")?;
    std::thread::sleep(std::time::Duration::from_millis(300));
    let sender = side(bed.in_src(&exe), "sender", &src_certs)
        .status()
        .context("running the sender")?;
    let out = receiver
        .wait_with_output()
        .context("waiting for the receiver")?;
    if !sender.success() || !out.status.success() {
        bail!("quinn-bulk: sender {sender}, receiver {}", out.status);
    }
    let text = String::from_utf8_lossy(&out.stdout);
    text.trim()
        .parse::<f64>()
        .with_context(|| format!("the receiver printed {text:?}, not a rate"))
}

pub fn run(a: QuinnBulkArgs) -> Result<()> {
    let cc = congestion(&a.congestion)?;
    let opts = TransportOptions {
        congestion: cc,
        ..Default::default()
    };
    match a.side.as_deref() {
        None => {
            let rate = measure(a.mib, &a.congestion)?;
            println!(
                "quinn bulk rate: {rate:.0} MiB/s ({} MiB, {})",
                a.mib, a.congestion
            );
            Ok(())
        }
        Some(side) => {
            let (Some(addr), Some(certs)) = (a.addr, a.certs) else {
                bail!("--side needs --addr and --certs");
            };
            let id = Identity::load(&certs)?;
            let rt = tokio::runtime::Runtime::new()?;
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
    println!("{:.1}", got as f64 / (1u64 << 20) as f64 / secs);
    conn.close(0u32.into(), b"done");
    Ok(())
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
    Ok(())
}
