//! A client that opens a QUIC handshake with `pageserv dst` and then stalls must not hold up
//! anyone else: each connection attempt is handshaken, admitted and classified on a task of its
//! own under one deadline (dst::endpoint's `ADMIT_DEADLINE`). Needs no root: dst only listens.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use pageserv::keys::{self, Identity};
use pageserv::transport;

fn pageserv() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_pageserv"))
}

struct Dst(Child);

impl Drop for Dst {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A server-certificate verifier that takes `stall` before it answers: the client's side of
/// the handshake stops right after the server's first flight, as a slow or hostile client's.
#[derive(Debug)]
struct Stall {
    stall: Duration,
    inner: Arc<dyn rustls::client::danger::ServerCertVerifier>,
}

impl rustls::client::danger::ServerCertVerifier for Stall {
    fn verify_server_cert(
        &self,
        end_entity: &rustls::pki_types::CertificateDer<'_>,
        intermediates: &[rustls::pki_types::CertificateDer<'_>],
        server_name: &rustls::pki_types::ServerName<'_>,
        ocsp: &[u8],
        now: rustls::pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        std::thread::sleep(self.stall);
        self.inner
            .verify_server_cert(end_entity, intermediates, server_name, ocsp, now)
    }
    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &rustls::pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }
    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &rustls::pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }
    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

#[test]
fn a_stalled_handshake_does_not_delay_another_client() {
    if pageserv::criu::binary::Criu::locate(None).is_err() {
        eprintln!("SKIP: pageserv dst needs CRIU to start (tools/setup)");
        return;
    }
    let dir = std::env::temp_dir().join(format!("pageserv-admission-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let (src_certs, dst_certs) = keys::demo_identities(&dir.join("keys")).expect("certificates");
    let port = std::net::UdpSocket::bind("127.0.0.1:0")
        .and_then(|s| s.local_addr())
        .expect("a free port")
        .port();
    let addr: std::net::SocketAddr = format!("127.0.0.1:{port}").parse().expect("addr");
    let _dst = Dst(Command::new(pageserv())
        .args(["dst", "--listen", &addr.to_string(), "--certs"])
        .arg(&dst_certs)
        .arg("--work")
        .arg(dir.join("work"))
        .arg("--keep-serving")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start pageserv dst"));
    let src = Identity::load(&src_certs).expect("source identity");
    let rt = tokio::runtime::Runtime::new().expect("runtime");

    // Wait until dst answers at all.
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let ok = rt.block_on(async {
            tokio::time::timeout(
                Duration::from_secs(2),
                transport::connect("127.0.0.1:0".parse().unwrap(), addr, "dst", &src),
            )
            .await
        });
        if matches!(ok, Ok(Ok(_))) {
            break;
        }
        assert!(Instant::now() < deadline, "pageserv dst did not come up");
        std::thread::sleep(Duration::from_millis(200));
    }

    // The staller: a client whose handshake stops after the server's first flight for 20 s,
    // on a thread and runtime of its own (its verifier blocks them).
    let mut tls = transport::client_tls(&src).expect("client tls");
    let inner = rustls::client::WebPkiServerVerifier::builder_with_provider(
        Arc::new({
            let mut r = rustls::RootCertStore::empty();
            r.add(src.ca[0].clone()).expect("CA");
            r
        }),
        Arc::new(rustls::crypto::ring::default_provider()),
    )
    .build()
    .expect("verifier");
    tls.dangerous().set_certificate_verifier(Arc::new(Stall {
        stall: Duration::from_secs(20),
        inner,
    }));
    let staller = std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        rt.block_on(async move {
            let ep = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).expect("endpoint");
            let cfg = quinn::ClientConfig::new(Arc::new(
                quinn::crypto::rustls::QuicClientConfig::try_from(tls).expect("quic tls"),
            ));
            let connecting = ep
                .connect_with(cfg, addr, keys::SERVER_NAME)
                .expect("connect");
            let _ = tokio::time::timeout(Duration::from_secs(25), connecting).await;
        })
    });
    std::thread::sleep(Duration::from_millis(500));

    // Another source is handshaken and admitted while the staller holds its handshake open.
    let t0 = Instant::now();
    let admitted = rt.block_on(async {
        tokio::time::timeout(
            Duration::from_secs(10),
            transport::connect("127.0.0.1:0".parse().unwrap(), addr, "dst", &src),
        )
        .await
    });
    let took = t0.elapsed();
    assert!(
        matches!(admitted, Ok(Ok(_))),
        "the second client was not admitted: {admitted:?}"
    );
    println!("second client admitted {took:?} into a stalled handshake");
    assert!(
        took < Duration::from_secs(1),
        "a stalled handshake delayed another client by {took:?}"
    );
    let _ = staller.join();
    let _ = std::fs::remove_dir_all(&dir);
}
