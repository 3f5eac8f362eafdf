//! Packets on the wire: the fault connection's ACKs ride on the next request, bulk receivers
//! acknowledge sparsely (under loss-based congestion control only) and sparse-ACK connections
//! start with a larger window; datagrams grow to what the path carries, within what UDP and QUIC
//! allow.

use super::*;

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
