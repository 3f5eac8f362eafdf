//! Throughput and fault latency under a bulk push (ignored by default; run with
//! `cargo test --release --test transport -- --ignored --nocapture`).
//!
//! PAGESERV_BENCH_MIB sets the push size (default 1024), PAGESERV_BENCH_ONLY a substring of the
//! configuration names to run, PAGESERV_BENCH_RATE a push rate limit in MiB/s, and
//! PAGESERV_BENCH_OPTS="stream=4,conn=16,send=16,rcvbuf=0,sndbuf=0,cc=bbr,sep=1" (windows in MiB,
//! socket buffers in KiB) adds a "custom" configuration.

use super::*;

const PUSH_FRAME_PAGES: u32 = 256; // 1 MiB

struct Measured {
    push_mib_s: f64,
    rtts: Vec<Duration>,
    /// How late the 2 ms sleeps between probes woke: the CPU contention the RTTs include.
    wake_delays: Vec<Duration>,
    /// The pushing side's view of the bulk connection.
    sender: quinn::ConnectionStats,
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

fn summary(samples: &mut [Duration]) -> String {
    samples.sort();
    let ms = |d: Duration| d.as_secs_f64() * 1e3;
    format!(
        "n={} p50={:.2}ms p99={:.2}ms max={:.2}ms",
        samples.len(),
        ms(percentile(samples, 0.5)),
        ms(percentile(samples, 0.99)),
        ms(samples.last().copied().unwrap_or_default())
    )
}

/// Answers each PageRequest on the next bidirectional stream of `conn` with one page.
pub(super) async fn serve_faults(conn: quinn::Connection) {
    let (send, recv) = conn.accept_bi().await.unwrap();
    let mut tx = FrameSender::with_priority(send, FAULT_PRIORITY);
    let mut rx = FrameReceiver::new(recv);
    let page = pages(1, 7);
    while let Some(Frame::PageRequest { pid, vaddr, .. }) = rx.next().await.unwrap() {
        tx.send_pages(pid, vaddr, 1, page.clone()).await.unwrap();
    }
    tx.finish();
    let _ = tx.stream().stopped().await;
}

/// The faulting side of one FAULT stream: one-page PageRequests, each awaited.
pub(super) struct Requester {
    req: FrameSender,
    rep: FrameReceiver,
}

impl Requester {
    pub(super) async fn open(conn: &quinn::Connection) -> Requester {
        let (send, recv) = conn.open_bi().await.unwrap();
        Requester {
            req: FrameSender::with_priority(send, FAULT_PRIORITY),
            rep: FrameReceiver::new(recv),
        }
    }

    /// Asks for page `i` (of 1000) and waits for it: the round trip.
    pub(super) async fn round_trip(&mut self, i: u64) -> Duration {
        let f = Frame::PageRequest {
            pid: 1,
            vaddr: 0x1000 * (i % 1000),
            nr_pages: 1,
        };
        let t0 = Instant::now();
        self.req.send(&f).await.unwrap();
        match self.rep.next().await.unwrap() {
            Some(Frame::Pages { nr_pages: 1, .. }) => t0.elapsed(),
            other => panic!("unexpected {other:?}"),
        }
    }

    /// Ends the stream and reads it to its end.
    pub(super) async fn finish(mut self) {
        self.req.finish();
        while self.rep.next().await.unwrap().is_some() {}
    }
}

/// Pushes `bytes` of 1 MiB Pages frames on a new PUSH-priority stream of `conn`, at most
/// `mib_s` MiB/s if given.
async fn push(conn: quinn::Connection, bytes: u64, mib_s: Option<u64>) {
    let mut tx = FrameSender::with_priority(conn.open_uni().await.unwrap(), PUSH_PRIORITY);
    let chunk = pages(PUSH_FRAME_PAGES, 3);
    let start = tokio::time::Instant::now();
    for i in 0..bytes / chunk.len() as u64 {
        if let Some(rate) = mib_s {
            let due = start + Duration::from_secs_f64(i as f64 / rate as f64);
            tokio::time::sleep_until(due).await;
        }
        let vaddr = 0x7f00_0000_0000 + i * chunk.len() as u64;
        tx.send_pages(1, vaddr, PUSH_FRAME_PAGES, chunk.clone())
            .await
            .unwrap();
    }
    tx.finish();
    let _ = tx.stream().stopped().await;
}

/// Receives a push; returns MiB/s from its first frame to its end.
async fn receive_push(conn: &quinn::Connection, expect: u64) -> f64 {
    let mut rx = FrameReceiver::new(conn.accept_uni().await.unwrap());
    let (mut bytes, mut start) = (0u64, None);
    while let Some(f) = rx.next().await.unwrap() {
        start.get_or_insert_with(Instant::now);
        match f {
            Frame::Pages { nr_pages, data, .. } => {
                assert_eq!(nr_pages, PUSH_FRAME_PAGES);
                assert_eq!(data[4095], 0xff ^ 3);
                bytes += data.len() as u64;
            }
            other => panic!("unexpected {other:?}"),
        }
    }
    assert_eq!(bytes, expect);
    let secs = start.map(|s| s.elapsed().as_secs_f64()).unwrap_or(f64::NAN);
    bytes as f64 / (1 << 20) as f64 / secs
}

/// src (server) pushes `push_bytes` on a PUSH stream while dst (client) sends 1-page
/// PageRequests on a FAULT stream, every 2 ms until the push ends (or `probes` times without a
/// push). `fault_conn`: faults use a second connection (own UDP socket on dst) instead of a
/// stream of the push connection.
async fn measure(
    opts: &TransportOptions,
    push_bytes: u64,
    probes: usize,
    fault_conn: bool,
    rate: Option<u64>,
) -> Measured {
    let t = TempDir::new();
    let (src, dst) = pair(&t.0, "ca");
    let ep = transport::server_with(any_port(), &src, opts).unwrap();
    let addr = ep.local_addr().unwrap();
    let server = tokio::spawn(async move {
        let (bulk, _) = transport::accept(&ep, &src).await.unwrap();
        let faults = match fault_conn {
            true => transport::accept(&ep, &src).await.unwrap().0,
            false => bulk.clone(),
        };
        let f = tokio::spawn(serve_faults(faults.clone()));
        if push_bytes > 0 {
            push(bulk.clone(), push_bytes, rate).await;
        }
        f.await.unwrap();
        let stats = bulk.stats();
        faults.closed().await;
        bulk.closed().await;
        stats
    });

    let bulk = transport::connect_with(any_port(), addr, "dst", &dst, opts)
        .await
        .unwrap();
    let faults = match fault_conn {
        true => transport::connect_with(any_port(), addr, "dst", &dst, opts)
            .await
            .unwrap(),
        false => bulk.clone(),
    };
    let mut requester = Requester::open(&faults).await;
    for i in 0..20 {
        requester.round_trip(i).await; // warm up
    }
    let push_done = std::sync::atomic::AtomicBool::new(false);
    let probe = async {
        let (mut rtts, mut wake_delays) = (Vec::new(), Vec::new());
        let mut i = 0;
        let more = |n: usize| match push_bytes {
            0 => n < probes,
            _ => !push_done.load(Ordering::Relaxed),
        };
        while more(rtts.len()) {
            i += 1;
            rtts.push(requester.round_trip(i).await);
            let t0 = Instant::now();
            tokio::time::sleep(Duration::from_millis(2)).await;
            wake_delays.push(t0.elapsed().saturating_sub(Duration::from_millis(2)));
        }
        (rtts, wake_delays)
    };
    let pushed = async {
        let r = match push_bytes {
            0 => 0.0,
            _ => receive_push(&bulk, push_bytes).await,
        };
        push_done.store(true, Ordering::Relaxed);
        r
    };
    let (push_mib_s, (rtts, wake_delays)) = tokio::join!(pushed, probe);
    requester.finish().await;
    bulk.close(0u32.into(), b"done");
    faults.close(0u32.into(), b"done");
    let sender = server.await.unwrap();
    Measured {
        push_mib_s,
        rtts,
        wake_delays,
        sender,
    }
}

/// The "custom" configuration from PAGESERV_BENCH_OPTS.
fn custom(base: &TransportOptions, spec: &str) -> (String, TransportOptions, bool) {
    let mut o = base.clone();
    let mut sep = false;
    for kv in spec.split(',') {
        let (k, v) = kv
            .split_once('=')
            .expect("PAGESERV_BENCH_OPTS: key=value,...");
        let n = || v.parse::<u64>().expect("PAGESERV_BENCH_OPTS: a number");
        match k {
            "stream" => o.stream_receive_window = n() << 20,
            "conn" => o.receive_window = n() << 20,
            "send" => o.send_window = n() << 20,
            "rcvbuf" => o.udp_recv_buffer = (n() << 10) as usize,
            "sndbuf" => o.udp_send_buffer = (n() << 10) as usize,
            "cc" => {
                o.congestion = match v {
                    "bbr" => Congestion::Bbr,
                    "newreno" => Congestion::NewReno,
                    _ => Congestion::Cubic,
                }
            }
            "sep" => sep = v == "1",
            _ => panic!("unknown PAGESERV_BENCH_OPTS key {k}"),
        }
    }
    (format!("custom {spec}"), o, sep)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "measurement: run with --release -- --ignored --nocapture"]
async fn throughput_and_fault_latency_under_push() {
    let env = |k| std::env::var(k).ok();
    let mib: u64 = env("PAGESERV_BENCH_MIB")
        .and_then(|v| v.parse().ok())
        .unwrap_or(1024);
    let only = env("PAGESERV_BENCH_ONLY").unwrap_or_default();
    let rate = env("PAGESERV_BENCH_RATE").and_then(|v| v.parse().ok());
    let ours = TransportOptions::default();
    let with_cc = |c| TransportOptions {
        congestion: c,
        ..ours.clone()
    };
    let quinn = TransportOptions::quinn_defaults();
    let configs = [
        ("default, faults on own connection", ours.clone(), true),
        (
            "default, faults on the push connection",
            ours.clone(),
            false,
        ),
        (
            "bbr, faults on own connection",
            with_cc(Congestion::Bbr),
            true,
        ),
        (
            "newreno, faults on own connection",
            with_cc(Congestion::NewReno),
            true,
        ),
        (
            "quinn defaults, faults on the push connection",
            quinn.clone(),
            false,
        ),
        ("quinn defaults, faults on own connection", quinn, true),
    ];
    let configs = configs
        .into_iter()
        .map(|(n, o, s)| (n.to_string(), o, s))
        .chain(env("PAGESERV_BENCH_OPTS").map(|spec| custom(&ours, &spec)));
    for (name, opts, fault_conn) in configs {
        if !name.contains(only.as_str()) {
            continue;
        }
        let mut idle = measure(&opts, 0, 300, fault_conn, None).await.rtts;
        let mut m = measure(&opts, mib << 20, 0, fault_conn, rate).await;
        let p = &m.sender.path;
        println!(
            "{name}: push {:.0} MiB/s | fault RTT idle: {} | under push: {} | timer wake delay \
             under push: {} | sender: {} packets, {} lost, {} congestion events, final cwnd {} KiB",
            m.push_mib_s,
            summary(&mut idle),
            summary(&mut m.rtts),
            summary(&mut m.wake_delays),
            p.sent_packets,
            p.lost_packets,
            p.congestion_events,
            p.cwnd >> 10
        );
    }
}
