//! QUIC transport over loopback: mutual TLS refusals, frames both ways, and (ignored, run with
//! `cargo test --release --test transport -- --ignored --nocapture`) throughput and fault latency
//! under a bulk push.
//!
//! By topic: `connections` (frames both ways between good identities, UDP garbage, no server),
//! `tls_refusals` (certificates, names, roles and protocols the other side must refuse),
//! `acks_and_datagrams` (sparse ACKs, datagram sizes, the initial window) and `measure` (the
//! ignored measurement). The imports and helpers here serve them all (`use super::*`).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use pageserv::keys::{self, Identity, KeyError};
use pageserv::pb::pageserv::{Control, Hello, MemoryWhole, control::Msg};
use pageserv::transport::{
    self, Congestion, FAULT_PRIORITY, FrameReceiver, FrameSender, PUSH_PRIORITY, RefusalReason,
    RefusedBy, TransportError, TransportOptions,
};
use pageserv::wire::{Frame, refuse_reason};
use quinn::crypto::rustls::QuicClientConfig;

const LOOPBACK: &str = "127.0.0.1:0";
const TEST_TIMEOUT: Duration = Duration::from_secs(30);

/// A fresh directory under the system temp dir, removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new() -> TempDir {
        static N: AtomicU32 = AtomicU32::new(0);
        let n = N.fetch_add(1, Ordering::Relaxed);
        let p = std::env::temp_dir().join(format!("pageserv-transport-{}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).unwrap();
        TempDir(p)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// (server, client) identities from one CA under `base/name`: a destination certificate
/// ("dst") for the side that listens and a source certificate ("src") for the side that
/// connects, as pageserv's roles are.
fn pair(base: &Path, name: &str) -> (Identity, Identity) {
    let (src, dst) = keys::demo_identities(&base.join(name)).unwrap();
    (Identity::load(&dst).unwrap(), Identity::load(&src).unwrap())
}

fn any_port() -> SocketAddr {
    LOOPBACK.parse().unwrap()
}

fn control(msg: Msg) -> Frame {
    Frame::Control(Control { msg: Some(msg) })
}

fn pages(nr_pages: u32, seed: u8) -> Bytes {
    (0..nr_pages as usize * 4096)
        .map(|i| (i as u8) ^ seed)
        .collect::<Vec<_>>()
        .into()
}

fn refusal(e: &TransportError) -> (RefusedBy, RefusalReason) {
    match e {
        TransportError::Refused(r) => (r.by, r.reason),
        other => panic!("expected a TLS refusal, got: {other}"),
    }
}

/// A quinn client with an arbitrary TLS config (no admission wait): a foreign or broken peer.
async fn raw_client(
    tls: rustls::ClientConfig,
    remote: SocketAddr,
) -> Result<quinn::Connection, quinn::ConnectionError> {
    let ep = quinn::Endpoint::client(any_port()).unwrap();
    let cfg = quinn::ClientConfig::new(Arc::new(QuicClientConfig::try_from(tls).unwrap()));
    ep.connect_with(cfg, remote, keys::SERVER_NAME)
        .unwrap()
        .await
}

/// A client TLS builder trusting `id`'s CA, TLS 1.3, before its certificate choice: for
/// clients built by hand (no certificate, or one of the wrong role).
fn raw_client_tls(
    id: &Identity,
) -> rustls::ConfigBuilder<rustls::ClientConfig, rustls::client::WantsClientCert> {
    let mut roots = rustls::RootCertStore::empty();
    roots.add(id.ca[0].clone()).unwrap();
    rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .with_root_certificates(roots)
}

/// Our client (`client`) against a quinn server with an arbitrary TLS config: a foreign,
/// broken or impostor server.
async fn connect_to_raw_server(
    tls: rustls::ServerConfig,
    client: &Identity,
) -> Result<quinn::Connection, TransportError> {
    let qtls = quinn::crypto::rustls::QuicServerConfig::try_from(tls).unwrap();
    let server =
        quinn::Endpoint::server(quinn::ServerConfig::with_crypto(Arc::new(qtls)), any_port())
            .unwrap();
    let addr = server.local_addr().unwrap();
    let (_, connected) = tokio::join!(
        async {
            if let Some(i) = server.accept().await {
                let _ = i.await;
            }
        },
        transport::connect(any_port(), addr, "dst", client)
    );
    connected
}

async fn with_timeout<F: std::future::Future>(f: F) -> F::Output {
    tokio::time::timeout(TEST_TIMEOUT, f)
        .await
        .expect("test timed out")
}

mod acks_and_datagrams;
mod connections;
mod measure;
mod tls_refusals;
