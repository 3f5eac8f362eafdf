//! Mutual TLS refusals: a client or server certificate from another CA, a client without a
//! certificate, a server certificate without the pageserv name, a peer speaking another ALPN
//! protocol, and a certificate acting as the other role. Each side says who refused what.

use super::*;

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
