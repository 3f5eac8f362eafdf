//! Connections between good identities: frames both ways on one bidirectional stream, a server
//! that survives UDP garbage, and a connection to a port nobody answers on, which times out with
//! advice.

use super::*;

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
                restore_criu_opts: Vec::new(),
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
