//! QUIC transport over loopback: mutual TLS refusals, frames both ways, and (ignored, run with
//! `cargo test --release --test transport -- --ignored --nocapture`) throughput and fault latency
//! under a bulk push.

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

#[tokio::test]
async fn good_identities_exchange_frames_both_ways() {
    with_timeout(async {
        let t = TempDir::new();
        let (src, dst) = pair(&t.0, "ca1");
        let ep = transport::server(any_port(), &src).unwrap();
        let addr = ep.local_addr().unwrap();

        let server = tokio::spawn(async move {
            let (conn, peer) = transport::accept(&ep, &src).await.unwrap();
            assert_eq!(peer.common_name.as_deref(), Some("src"));
            assert_eq!(peer.names, vec!["pageserv", "src"]);
            let (send, recv) = conn.accept_bi().await.unwrap();
            let mut rx = FrameReceiver::new(recv);
            let mut tx = FrameSender::with_priority(send, FAULT_PRIORITY);
            let mut got = Vec::new();
            while let Some(f) = rx.next().await.unwrap() {
                got.push(f);
            }
            tx.send(&control(Msg::MemoryWhole(MemoryWhole {
                pages_on_demand: 1,
                pages_pushed: 2,
                pages_zero: 3,
                ..Default::default()
            })))
            .await
            .unwrap();
            tx.send_pages(7, 0x10000, 2, pages(2, 0x5a)).await.unwrap();
            tx.send(&Frame::Zero {
                pid: 7,
                vaddr: 0x20000,
                nr_pages: 16,
            })
            .await
            .unwrap();
            tx.send(&Frame::Refused {
                pid: 8,
                vaddr: 0,
                nr_pages: 1,
                reason: refuse_reason::UNKNOWN_PID,
            })
            .await
            .unwrap();
            tx.finish();
            // Keep the connection until the client has read everything.
            let _ = conn.closed().await;
            got
        });

        let conn = transport::connect(any_port(), addr, "dst", &dst)
            .await
            .unwrap();
        let peer = transport::peer_identity(&conn).unwrap();
        assert_eq!(peer.common_name.as_deref(), Some("dst"));
        let (send, recv) = conn.open_bi().await.unwrap();
        let mut tx = FrameSender::new(send);
        let sent = vec![
            control(Msg::Hello(Hello {
                protocol_version: 1,
                role: "dst".into(),
                page_size: 4096,
                criu_version: "4.1.1".into(),
                migration_id: "m1".into(),
                fault_port: 0,
            })),
            Frame::PageRequest {
                pid: 7,
                vaddr: 0x10000,
                nr_pages: 2,
            },
            Frame::Pages {
                pid: 7,
                vaddr: 0x30000,
                nr_pages: 3,
                data: pages(3, 1),
            },
        ];
        for f in &sent {
            tx.send(f).await.unwrap();
        }
        tx.finish();
        let mut rx = FrameReceiver::new(recv);
        let mut got = Vec::new();
        while let Some(f) = rx.next().await.unwrap() {
            got.push(f);
        }
        conn.close(0u32.into(), b"done");
        assert_eq!(server.await.unwrap(), sent);
        assert_eq!(got.len(), 4);
        assert!(matches!(&got[0], Frame::Control(c) if matches!(c.msg, Some(Msg::MemoryWhole(_)))));
        assert_eq!(
            got[1],
            Frame::Pages {
                pid: 7,
                vaddr: 0x10000,
                nr_pages: 2,
                data: pages(2, 0x5a)
            }
        );
        assert!(matches!(got[2], Frame::Zero { nr_pages: 16, .. }));
        assert!(matches!(got[3], Frame::Refused { reason: 2, .. }));
    })
    .await
}

#[tokio::test]
async fn client_with_certificate_from_another_ca_is_refused_and_server_reads_nothing() {
    with_timeout(async {
        let t = TempDir::new();
        let (src, _) = pair(&t.0, "ca1");
        let (_, other) = pair(&t.0, "ca2");
        // It trusts our CA, but its own certificate was issued by another one.
        let misissued = Identity {
            ca: src.ca.clone(),
            ..other.clone()
        };
        let ep = transport::server(any_port(), &src).unwrap();
        let addr = ep.local_addr().unwrap();

        // Our own client: connect() itself must fail, saying the server refused our certificate.
        let (accepted, connected) = tokio::join!(
            transport::accept(&ep, &src),
            transport::connect(any_port(), addr, "dst", &misissued)
        );
        let server_err = accepted.unwrap_err();
        println!("server said: {server_err}");
        assert_eq!(
            refusal(&server_err),
            (RefusedBy::Us, RefusalReason::NotSignedByCa)
        );
        let msg = server_err.to_string();
        let ca = src.ca_path().display().to_string();
        assert!(msg.contains("refused client 127.0.0.1"), "{msg}");
        assert!(
            msg.contains(&format!("peer certificate not signed by the CA in {ca}")),
            "{msg}"
        );
        let client_err = connected.unwrap_err();
        println!("client said: {client_err}");
        assert_eq!(
            refusal(&client_err),
            (RefusedBy::Peer, RefusalReason::NotSignedByCa)
        );
        assert!(
            client_err
                .to_string()
                .contains(&format!("server {addr} refused")),
            "{client_err}"
        );

        // A client that writes as soon as its side of the handshake is done (TLS 1.3 lets it
        // finish before the server has checked its certificate): the server hands out no
        // connection, so nothing it sent can be read.
        let tls = transport::client_tls(&misissued).unwrap();
        let (accepted, _) = tokio::join!(transport::accept(&ep, &src), async {
            if let Ok(c) = raw_client(tls, addr).await {
                if let Ok(mut s) = c.open_uni().await {
                    let _ = s.write_all(b"should never be read").await;
                    let _ = s.finish();
                }
                let _ = c.closed().await;
            }
        });
        assert_eq!(
            refusal(&accepted.unwrap_err()),
            (RefusedBy::Us, RefusalReason::NotSignedByCa)
        );
        let next = tokio::time::timeout(Duration::from_millis(300), transport::accept(&ep, &src));
        assert!(next.await.is_err(), "no further connection may appear");

        // A client wholly from another CA refuses our server first.
        let (accepted, connected) = tokio::join!(
            transport::accept(&ep, &src),
            transport::connect(any_port(), addr, "dst", &other)
        );
        assert_eq!(
            refusal(&connected.unwrap_err()),
            (RefusedBy::Us, RefusalReason::NotSignedByCa)
        );
        assert_eq!(refusal(&accepted.unwrap_err()).0, RefusedBy::Peer);
    })
    .await
}

#[tokio::test]
async fn client_without_certificate_is_refused() {
    with_timeout(async {
        let t = TempDir::new();
        let (src, dst) = pair(&t.0, "ca1");
        let ep = transport::server(any_port(), &src).unwrap();
        let addr = ep.local_addr().unwrap();
        let mut tls = raw_client_tls(&dst).with_no_client_auth();
        tls.alpn_protocols = vec![transport::ALPN.to_vec()];
        let (accepted, client) = tokio::join!(transport::accept(&ep, &src), async {
            let c = raw_client(tls, addr).await?;
            c.accept_uni().await.map(|_| ())
        });
        let e = accepted.unwrap_err();
        assert_eq!(refusal(&e), (RefusedBy::Us, RefusalReason::NoCertificate));
        assert!(e.to_string().contains("presented no certificate"), "{e}");
        assert!(
            client.is_err(),
            "the certificate-less client must not be admitted"
        );
    })
    .await
}

#[tokio::test]
async fn server_with_certificate_from_another_ca_is_refused_by_client() {
    with_timeout(async {
        let t = TempDir::new();
        let (_, dst) = pair(&t.0, "ca1");
        let (foreign_src, _) = pair(&t.0, "ca2");
        let ep = transport::server(any_port(), &foreign_src).unwrap();
        let addr = ep.local_addr().unwrap();
        let (accepted, connected) = tokio::join!(
            transport::accept(&ep, &foreign_src),
            transport::connect(any_port(), addr, "dst", &dst)
        );
        let e = connected.unwrap_err();
        assert_eq!(refusal(&e), (RefusedBy::Us, RefusalReason::NotSignedByCa));
        let ca = dst.ca_path().display().to_string();
        let msg = e.to_string();
        assert!(msg.contains(&format!("refused server {addr}")), "{msg}");
        assert!(
            msg.contains(&format!("peer certificate not signed by the CA in {ca}")),
            "{msg}"
        );
        let se = accepted.unwrap_err();
        assert_eq!(
            refusal(&se),
            (RefusedBy::Peer, RefusalReason::NotSignedByCa)
        );
        println!("client said: {e}\nserver said: {se}");
    })
    .await
}

#[tokio::test]
async fn server_certificate_without_the_pageserv_name_is_refused() {
    with_timeout(async {
        let t = TempDir::new();
        let (src, dst) = pair(&t.0, "ca1");
        // A certificate from the right CA, but only for "other-name".
        let ca_dir = t.0.join("ca1/ca");
        let ca_pem = std::fs::read_to_string(ca_dir.join(keys::CA_CERT)).unwrap();
        let ca_key =
            rcgen::KeyPair::from_pem(&std::fs::read_to_string(ca_dir.join(keys::CA_KEY)).unwrap())
                .unwrap();
        let issuer = rcgen::Issuer::from_ca_cert_pem(&ca_pem, ca_key).unwrap();
        let mut params = rcgen::CertificateParams::new(vec!["other-name".to_string()]).unwrap();
        params.extended_key_usages = vec![
            rcgen::ExtendedKeyUsagePurpose::ServerAuth,
            rcgen::ExtendedKeyUsagePurpose::ClientAuth,
        ];
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = params.signed_by(&key, &issuer).unwrap();
        let dir = t.0.join("misnamed");
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join(keys::CERT), cert.pem()).unwrap();
        std::fs::write(dir.join(keys::KEY), key.serialize_pem()).unwrap();
        std::fs::write(dir.join(keys::CA_CERT), &ca_pem).unwrap();
        // Loading it is refused up front...
        let e = Identity::load(&dir).unwrap_err();
        assert!(
            matches!(e, KeyError::NotTrusted { role: "server", .. }),
            "{e}"
        );
        // ...and a server using it anyway is refused by the client.
        let misnamed = Identity {
            dir: dir.clone(),
            ca: src.ca.clone(),
            chain: vec![cert.der().clone()],
            key: rustls::pki_types::PrivateKeyDer::try_from(key.serialize_der()).unwrap(),
        };
        let ep = transport::server(any_port(), &misnamed).unwrap();
        let addr = ep.local_addr().unwrap();
        let (_, connected) = tokio::join!(
            transport::accept(&ep, &misnamed),
            transport::connect(any_port(), addr, "dst", &dst)
        );
        let e = connected.unwrap_err();
        println!("client said: {e}");
        assert_eq!(refusal(&e), (RefusedBy::Us, RefusalReason::WrongServerName));
    })
    .await
}

#[tokio::test]
async fn peer_with_another_alpn_is_refused() {
    with_timeout(async {
        let t = TempDir::new();
        let (src, dst) = pair(&t.0, "ca1");

        // A client offering only another protocol.
        let ep = transport::server(any_port(), &src).unwrap();
        let addr = ep.local_addr().unwrap();
        let mut tls = transport::client_tls(&dst).unwrap();
        tls.alpn_protocols = vec![b"pageserv/0".to_vec()];
        let (accepted, client) = tokio::join!(transport::accept(&ep, &src), raw_client(tls, addr));
        let e = accepted.unwrap_err();
        assert_eq!(refusal(&e), (RefusedBy::Us, RefusalReason::WrongProtocol));
        assert!(e.to_string().contains("does not speak pageserv/1"), "{e}");
        assert!(client.is_err());

        // A server speaking only another protocol: our client is told so.
        let mut tls = transport::server_tls(&src).unwrap();
        tls.alpn_protocols = vec![b"h3".to_vec()];
        let e = connect_to_raw_server(tls, &dst).await.unwrap_err();
        assert_eq!(refusal(&e), (RefusedBy::Peer, RefusalReason::WrongProtocol));
        println!("client said: {e}");
    })
    .await
}

#[tokio::test]
async fn udp_garbage_does_not_crash_the_server() {
    with_timeout(async {
        let t = TempDir::new();
        let (src, dst) = pair(&t.0, "ca1");
        let ep = transport::server(any_port(), &src).unwrap();
        let addr = ep.local_addr().unwrap();
        let sock = tokio::net::UdpSocket::bind(any_port()).await.unwrap();
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
        for i in 0..2000usize {
            let len = [0, 1, 5, 21, 1200, 1350, 1500, 9000][i % 8];
            let mut d: Vec<u8> = (0..len)
                .map(|_| {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    x as u8
                })
                .collect();
            // Every other datagram looks like a QUIC v1 Initial header.
            if i % 2 == 0 && len > 8 {
                d[0] = 0xc0 | (d[0] & 0x0f);
                d[1..5].copy_from_slice(&1u32.to_be_bytes());
            }
            let _ = sock.send_to(&d, addr).await;
        }
        let (accepted, connected) = tokio::join!(
            transport::accept(&ep, &src),
            transport::connect(any_port(), addr, "dst", &dst)
        );
        let (_c, peer) = accepted.unwrap();
        assert_eq!(peer.common_name.as_deref(), Some("src"));
        connected.unwrap();
    })
    .await
}

#[tokio::test]
async fn refused_connection_without_server_times_out_with_advice() {
    with_timeout(async {
        let t = TempDir::new();
        let (_, dst) = pair(&t.0, "ca1");
        // A bound UDP port nobody answers on.
        let silent = std::net::UdpSocket::bind(any_port()).unwrap();
        let opts = TransportOptions {
            idle_timeout: Duration::from_millis(500),
            ..Default::default()
        };
        let e =
            transport::connect_with(any_port(), silent.local_addr().unwrap(), "dst", &dst, &opts)
                .await
                .unwrap_err();
        assert!(matches!(e, TransportError::NoAnswer { .. }), "{e}");
        assert!(e.to_string().contains("UDP"), "{e}");
    })
    .await
}

#[path = "transport/measure.rs"]
mod measure;

/// The roles of issue "trust between hosts": a certificate from the right CA but for the other
/// role is refused by TLS itself, whatever the peer's software does.
#[tokio::test]
async fn a_certificate_acting_as_the_other_role_is_refused() {
    with_timeout(async {
        let t = TempDir::new();
        let (dst, src) = pair(&t.0, "ca1");
        // pageserv's own code will not even build the wrong side's TLS with it.
        assert!(matches!(
            transport::client_tls(&dst),
            Err(TransportError::Keys(KeyError::WrongRole {
                want: "source",
                ..
            }))
        ));
        assert!(matches!(
            transport::server_tls(&src),
            Err(TransportError::Keys(KeyError::WrongRole {
                want: "destination",
                ..
            }))
        ));

        // A leaked source key posing as a destination (a server built by hand with it): the
        // source refuses it, so it never receives images or memory.
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
            Arc::new({
                let mut r = rustls::RootCertStore::empty();
                r.add(src.ca[0].clone()).unwrap();
                r
            }),
            provider.clone(),
        )
        .build()
        .unwrap();
        let mut tls = rustls::ServerConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13])
            .unwrap()
            .with_client_cert_verifier(verifier)
            .with_single_cert(src.chain.clone(), src.key.clone_key())
            .unwrap();
        tls.alpn_protocols = vec![b"pageserv/1".to_vec()];
        let e = connect_to_raw_server(tls, &src).await.unwrap_err();
        println!("source said: {e}");
        assert_eq!(
            refusal(&e),
            (RefusedBy::Us, RefusalReason::WrongRole),
            "{e}"
        );

        // A leaked destination key opening a migration into a destination (a client built by
        // hand with it): the destination refuses it before any hello.
        let ep = transport::server(any_port(), &dst).unwrap();
        let addr = ep.local_addr().unwrap();
        let mut tls = raw_client_tls(&dst)
            .with_client_auth_cert(dst.chain.clone(), dst.key.clone_key())
            .unwrap();
        tls.alpn_protocols = vec![b"pageserv/1".to_vec()];
        let (accepted, client) = tokio::join!(transport::accept(&ep, &dst), raw_client(tls, addr));
        let e = accepted.unwrap_err();
        println!("destination said: {e}");
        assert_eq!(
            refusal(&e),
            (RefusedBy::Us, RefusalReason::WrongRole),
            "{e}"
        );
        if let Ok(c) = client {
            // The handshake may complete on the client's side before the refusal arrives; it
            // must never be admitted.
            assert!(c.accept_uni().await.is_err());
        }
    })
    .await
}

/// For `n` request/answer round trips on one stream, each answer one page, with both ends on
/// `opts`: (packets the requester sent, datagrams it received: the answers and any ACKs).
async fn round_trip_packets(opts: &TransportOptions, n: u64) -> (u64, u64) {
    let t = TempDir::new();
    let (dst, src) = pair(&t.0, "ca");
    let ep = transport::server_with(any_port(), &dst, opts).unwrap();
    let addr = ep.local_addr().unwrap();
    let answerer = tokio::spawn(async move {
        let (conn, _) = transport::accept(&ep, &dst).await.unwrap();
        measure::serve_faults(conn.clone()).await;
        conn.closed().await;
    });
    let conn = transport::connect_with(any_port(), addr, "dst", &src, opts)
        .await
        .unwrap();
    let mut requester = measure::Requester::open(&conn).await;
    // The handshake and both ends' MTU discovery settle (a probe's ACK may wait out the
    // sparse-ACK delay).
    for i in 0..20 {
        requester.round_trip(i).await;
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let (sent, received) = (
        conn.stats().path.sent_packets,
        conn.stats().udp_rx.datagrams,
    );
    for i in 0..n {
        requester.round_trip(i).await;
    }
    let stats = conn.stats();
    let counts = (
        stats.path.sent_packets - sent,
        stats.udp_rx.datagrams - received,
    );
    requester.finish().await;
    conn.close(0u32.into(), b"done");
    answerer.await.unwrap();
    counts
}

/// The transport's defaults with quinn's largest datagram (1,472 bytes: a 1,500-byte path),
/// where a one-page answer is three packets.
fn ethernet() -> TransportOptions {
    TransportOptions {
        max_datagram: transport::QUINN_MAX_DATAGRAM,
        ..TransportOptions::default()
    }
}

/// The fault connection (`TransportOptions::for_faults`, both ends' settings) asks its peer for
/// sparse ACKs (QUIC ACK frequency): the side waiting for pages sends one packet per request,
/// the ACK of the last answer riding on it, instead of a stand-alone ACK for every answer that
/// wakes the answering side on the fault's path. Shown on 1,472-byte datagrams ([`ethernet`]),
/// where an answer is three packets.
#[tokio::test]
async fn fault_connection_acks_ride_on_the_next_request() {
    with_timeout(async {
        let n = 200;
        let (default, _) = round_trip_packets(&ethernet(), n).await;
        let (sparse, _) = round_trip_packets(&ethernet().for_faults(), n).await;
        eprintln!("requester packets for {n} round trips: quinn's ACKs {default}, sparse {sparse}");
        assert!(
            default >= n * 3 / 2,
            "quinn's default should ACK every answer on its own: {default} packets"
        );
        assert!(
            sparse <= n * 11 / 10,
            "with sparse ACKs the requester should send about one packet per request: {sparse}"
        );
    })
    .await
}

/// MTU discovery finds the largest datagram the path carries up to `max_datagram`: on loopback
/// (MTU 65536) a fault answer of one page is one datagram with pageserv's default, and three
/// with quinn's 1,472 bytes, the Ethernet default that would otherwise cap it.
#[tokio::test]
async fn datagrams_grow_to_what_the_path_carries() {
    with_timeout(async {
        let n = 100;
        let (_, small) = round_trip_packets(&ethernet().for_faults(), n).await;
        let (_, large) = round_trip_packets(&TransportOptions::default().for_faults(), n).await;
        eprintln!("answer datagrams for {n} pages: 1,472-byte limit {small}, default {large}");
        assert!(
            small >= n * 5 / 2,
            "a 4 KiB answer should take three 1,472-byte datagrams: {small}"
        );
        assert!(
            large <= n * 11 / 10,
            "with MTU discovery up to {} bytes an answer should be one datagram: {large}",
            transport::MAX_DATAGRAM
        );
    })
    .await
}

/// A `max_datagram` outside what UDP and QUIC allow is refused with the option's name, not
/// clamped in silence.
#[test]
fn an_impossible_datagram_size_is_refused() {
    for bad in [0u16, 1_199, 65_528] {
        let opts = TransportOptions {
            max_datagram: bad,
            ..TransportOptions::default()
        };
        let e = opts.transport_config().unwrap_err().to_string();
        assert!(e.contains("max_datagram"), "{e}");
        let e = opts.endpoint_config().unwrap_err().to_string();
        assert!(e.contains("max_datagram"), "{e}");
    }
    let ok = TransportOptions::default();
    assert_eq!(
        ok.endpoint_config().unwrap().get_max_udp_payload_size(),
        u64::from(transport::MAX_DATAGRAM)
    );
}

/// Sends `packets` small writes (1,000 bytes, ~one packet each) on one stream from a client to
/// a server, both with `opts`, from a thread that sleeps 50 us between writes, so the packets
/// arrive spread out as on a paced link (back to back, quinn acknowledges a whole received batch
/// at once whatever its policy). Returns the packets the server received and the packets it
/// sent back (its ACKs, flow-control credit and the like) while it read them.
async fn spread_packets(opts: &TransportOptions, packets: usize) -> (u64, u64) {
    const WRITE: usize = 1_000;
    let t = TempDir::new();
    let (dst, src) = pair(&t.0, "ca");
    let ep = transport::server_with(any_port(), &dst, opts).unwrap();
    let addr = ep.local_addr().unwrap();
    let receiver = tokio::spawn(async move {
        let (conn, _) = transport::accept(&ep, &dst).await.unwrap();
        let mut stream = conn.accept_uni().await.unwrap();
        let (sent, received) = (
            conn.stats().path.sent_packets,
            conn.stats().udp_rx.datagrams,
        );
        let mut got = 0;
        while let Some(chunk) = stream.read_chunk(1 << 20, true).await.unwrap() {
            got += chunk.bytes.len();
        }
        assert_eq!(got, packets * WRITE, "the stream's bytes");
        let stats = conn.stats();
        conn.close(0u32.into(), b"done");
        (
            stats.udp_rx.datagrams - received,
            stats.path.sent_packets - sent,
        )
    });
    let conn = transport::connect_with(any_port(), addr, "dst", &src, opts)
        .await
        .unwrap();
    let mut s = conn.open_uni().await.unwrap();
    let rt = tokio::runtime::Handle::current();
    let sender = std::thread::spawn(move || {
        let data = [0x5a; WRITE];
        for _ in 0..packets {
            rt.block_on(s.write_all(&data)).unwrap();
            std::thread::sleep(Duration::from_micros(50));
        }
        s.finish().unwrap();
    });
    let counts = receiver.await.unwrap();
    sender.join().unwrap();
    conn.closed().await;
    counts
}

/// A connection that asks for [`transport::BULK_SPARSE_ACKS`]'s threshold gets about one ACK
/// per that many packets instead of one per two: the receiver sends a small fraction of the
/// packets quinn's own policy makes it send, each of which the sender would receive and decrypt
/// too. Packet counts, not timings: the test holds ACKs back for up to 25 ms rather than the
/// bulk connections' 1 ms, so that a slow machine spacing the writes further apart still sees
/// the threshold, not the delay, decide.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bulk_receivers_acknowledge_sparsely() {
    with_timeout(async {
        let n = 4_000;
        let (data, quinn_sent) = spread_packets(&ethernet(), n).await;
        let sparse = TransportOptions {
            sparse_acks: Some(transport::SparseAcks {
                max_delay: Duration::from_millis(25),
                ..transport::BULK_SPARSE_ACKS
            }),
            ..ethernet()
        };
        let (sparse_data, sparse_sent) = spread_packets(&sparse, n).await;
        eprintln!(
            "{n} writes: quinn's ACKs {quinn_sent} packets back for {data}; \
             sparse {sparse_sent} for {sparse_data}"
        );
        assert!(
            quinn_sent >= data / 4,
            "quinn's policy should acknowledge every second packet: {quinn_sent} for {data}"
        );
        assert!(
            sparse_sent <= sparse_data / 20,
            "the bulk threshold should acknowledge sparsely: {sparse_sent} for {sparse_data}"
        );
    })
    .await
}

/// The bulk connections (the post-copy's push, stop-and-copy) ask for sparse ACKs only under a
/// loss-based controller; BBR and the scavenger keep quinn's, as does every other connection.
#[test]
fn sparse_bulk_acks_follow_the_congestion_controller() {
    use pageserv::transport::{BULK_SPARSE_ACKS, FAULT_SPARSE_ACKS};
    let bulk = |congestion| {
        TransportOptions {
            congestion,
            ..TransportOptions::default()
        }
        .with_sparse_bulk_acks()
        .sparse_acks
    };
    assert_eq!(bulk(Congestion::Cubic), Some(BULK_SPARSE_ACKS));
    assert_eq!(bulk(Congestion::NewReno), Some(BULK_SPARSE_ACKS));
    assert_eq!(bulk(Congestion::Bbr), None);
    assert_eq!(bulk(Congestion::Scavenger), None);
    assert_eq!(TransportOptions::default().sparse_acks, None);
    assert_eq!(
        TransportOptions::default().for_faults().sparse_acks,
        Some(FAULT_SPARSE_ACKS)
    );
}

/// A connection that asks for sparse ACKs starts with a congestion window of at least the
/// threshold's packets (`SparseAcks::initial_window`), so slow start's first round trips do not
/// each wait for the delayed ACK; every other connection keeps quinn's window.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sparse_ack_connections_start_with_a_window_past_the_threshold() {
    use pageserv::transport::{BULK_SPARSE_ACKS, QUINN_INITIAL_WINDOW};
    assert!(BULK_SPARSE_ACKS.initial_window() >= u64::from(BULK_SPARSE_ACKS.threshold) * 1_466);
    with_timeout(async {
        let cases = [
            ("bulk", ethernet().with_sparse_bulk_acks(), true),
            ("default", ethernet(), false),
            ("faults", ethernet().for_faults(), false),
        ];
        for (name, opts, large) in cases {
            let t = TempDir::new();
            let (dst, src) = pair(&t.0, "ca");
            let ep = transport::server_with(any_port(), &dst, &opts).unwrap();
            let addr = ep.local_addr().unwrap();
            let server = tokio::spawn(async move {
                let (conn, _) = transport::accept(&ep, &dst).await.unwrap();
                conn.closed().await;
            });
            let conn = transport::connect_with(any_port(), addr, "dst", &src, &opts)
                .await
                .unwrap();
            // Slow start has grown the window by the handshake's acknowledged bytes (a few KB).
            let cwnd = conn.stats().path.cwnd;
            conn.close(0u32.into(), b"done");
            server.await.unwrap();
            if large {
                assert!(
                    cwnd >= BULK_SPARSE_ACKS.initial_window(),
                    "{name}: window {cwnd}"
                );
            } else {
                assert!(
                    (QUINN_INITIAL_WINDOW..BULK_SPARSE_ACKS.initial_window() / 2).contains(&cwnd),
                    "{name}: window {cwnd}"
                );
            }
        }
    })
    .await
}
