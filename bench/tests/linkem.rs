//! Acceptance tests of the `linkem` link emulator against its own settings: RTT, throughput and
//! loss measured end to end between two network namespaces it joins.
//!
//! The measuring endpoints are sockets this test process creates from threads that entered the
//! namespaces (a socket stays in the namespace it was created in), so nothing beyond iproute2 is
//! needed. Needs root and /dev/net/tun; skips with a reason otherwise. Tests run one at a time:
//! throughput on a 2-core machine does not survive sharing.

use std::fs::File;
use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4, TcpListener, TcpStream, UdpSocket};
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread;
use std::time::{Duration, Instant};

const ADDR_A: Ipv4Addr = Ipv4Addr::new(10, 77, 0, 1);
const ADDR_B: Ipv4Addr = Ipv4Addr::new(10, 77, 0, 2);
/// IPv4 + UDP headers: the link carries IP packets, the sockets see payloads.
const UDP_OVERHEAD: usize = 28;

static SERIAL: Mutex<()> = Mutex::new(());
static NEXT_ID: AtomicU32 = AtomicU32::new(0);

fn serial() -> MutexGuard<'static, ()> {
    SERIAL
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Runs a timing check, and once more if it fails: these tests measure the emulator against
/// the wall clock on a shared 2-core VM, where a stall of the host (seen in CI: four checks
/// failing in one half-minute, all passing when run again minutes later) is not linkem's error.
/// A second failure in a row fails the test; the tolerances are not widened.
fn timed_check(what: &str, check: impl Fn()) {
    if std::panic::catch_unwind(std::panic::AssertUnwindSafe(&check)).is_err() {
        eprintln!("{what}: failed once; measuring again in case the host stalled");
        std::thread::sleep(Duration::from_secs(2));
        check();
    }
}

/// Why the tests cannot run here, if they cannot.
fn skip_reason() -> Option<String> {
    if !nix::unistd::Uid::effective().is_root() {
        return Some("needs root (network namespaces, TUN)".into());
    }
    if !std::path::Path::new("/dev/net/tun").exists() {
        return Some("no /dev/net/tun".into());
    }
    if Command::new("ip").arg("-V").output().is_err() {
        return Some("no `ip` (iproute2)".into());
    }
    None
}

macro_rules! require_env {
    () => {
        if let Some(reason) = skip_reason() {
            eprintln!("SKIPPED: {reason}");
            return;
        }
    };
}

/// A pair of network namespaces, deleted on drop.
struct NsPair {
    a: String,
    b: String,
}

/// Deletes `lkt-<pid>-*` namespaces left by earlier runs of these tests that were killed
/// before their Drop guards ran (their pid no longer exists).
fn remove_stale_namespaces() {
    let Ok(entries) = std::fs::read_dir("/var/run/netns") else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some(pid) = name
            .strip_prefix("lkt-")
            .and_then(|rest| rest.split('-').next())
            .and_then(|pid| pid.parse::<u32>().ok())
        else {
            continue;
        };
        if pid != std::process::id() && !std::path::Path::new(&format!("/proc/{pid}")).exists() {
            let _ = Command::new("ip").args(["netns", "del", &name]).status();
        }
    }
}

impl NsPair {
    fn new() -> Self {
        static CLEANUP: std::sync::Once = std::sync::Once::new();
        CLEANUP.call_once(remove_stale_namespaces);
        let id = NEXT_ID.fetch_add(1, Ordering::Relaxed);
        let base = format!("lkt-{}-{id}", std::process::id());
        let pair = NsPair {
            a: format!("{base}-a"),
            b: format!("{base}-b"),
        };
        for ns in [&pair.a, &pair.b] {
            let st = Command::new("ip")
                .args(["netns", "add", ns])
                .status()
                .unwrap();
            assert!(st.success(), "ip netns add {ns}");
        }
        pair
    }
}

impl Drop for NsPair {
    fn drop(&mut self) {
        for ns in [&self.a, &self.b] {
            let _ = Command::new("ip").args(["netns", "del", ns]).status();
        }
    }
}

/// Counters linkem printed for one direction.
#[derive(Debug, Default, Clone, Copy)]
struct DirCounters {
    rx: u64,
    tx: u64,
    loss: u64,
    queue: u64,
    behind: u64,
}

/// The binary under test: `$LINKEM_BIN` if set (e.g. a release build), else Cargo's build.
fn linkem_bin() -> PathBuf {
    std::env::var_os("LINKEM_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_BIN_EXE_linkem")))
}

/// `$LINKEM_EXTRA_ARGS` (whitespace-separated), appended to every linkem command line, to try
/// settings such as `--spin 0` against the same acceptance criteria.
fn extra_args() -> Vec<String> {
    std::env::var("LINKEM_EXTRA_ARGS")
        .map(|s| s.split_whitespace().map(String::from).collect())
        .unwrap_or_default()
}

/// A running linkem between the pair; SIGTERMed (then killed) on drop.
struct Linkem {
    child: Option<Child>,
    ready: PathBuf,
}

impl Linkem {
    fn start(ns: &NsPair, extra: &[&str]) -> Self {
        let ready = std::env::temp_dir().join(format!("{}.ready", ns.a));
        let _ = std::fs::remove_file(&ready);
        let mut cmd = Command::new(linkem_bin());
        cmd.args(["--ns-a", &ns.a, "--ns-b", &ns.b])
            .args(["--addr-a", &format!("{ADDR_A}/24")])
            .args(["--addr-b", &format!("{ADDR_B}/24")])
            .arg("--ready-file")
            .arg(&ready)
            .args(extra)
            .args(extra_args())
            .stdout(Stdio::piped());
        // SAFETY: prctl is async-signal-safe. If this test dies without running Drop, linkem
        // goes too instead of holding the namespaces' devices forever.
        unsafe {
            cmd.pre_exec(|| {
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM);
                Ok(())
            });
        }
        let child = cmd.spawn().unwrap();
        let mut me = Linkem {
            child: Some(child),
            ready,
        };
        let deadline = Instant::now() + Duration::from_secs(10);
        while !me.ready.exists() {
            if let Some(st) = me.child.as_mut().unwrap().try_wait().unwrap() {
                panic!("linkem exited before ready: {st}");
            }
            assert!(Instant::now() < deadline, "linkem not ready in 10 s");
            thread::sleep(Duration::from_millis(20));
        }
        me
    }

    /// Stops linkem and returns its counters (A->B, B->A).
    fn stop(mut self) -> [DirCounters; 2] {
        let mut child = self.child.take().unwrap();
        terminate(&mut child);
        let mut out = String::new();
        child
            .stdout
            .take()
            .unwrap()
            .read_to_string(&mut out)
            .unwrap();
        let st = child.wait().unwrap();
        assert!(st.success(), "linkem failed: {st}\n{out}");
        eprint!("{out}");
        let lines: Vec<&str> = out.lines().collect();
        assert_eq!(
            lines.len(),
            3,
            "expected two counter lines and cpu, got:\n{out}"
        );
        [parse_counters(lines[0]), parse_counters(lines[1])]
    }
}

fn terminate(child: &mut Child) {
    let pid = nix::unistd::Pid::from_raw(child.id() as i32);
    let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
    let deadline = Instant::now() + Duration::from_secs(5);
    while Instant::now() < deadline {
        if let Ok(Some(_)) = child.try_wait() {
            return;
        }
        thread::sleep(Duration::from_millis(10));
    }
    let _ = child.kill();
}

impl Drop for Linkem {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            terminate(&mut child);
            let _ = child.wait();
        }
        let _ = std::fs::remove_file(&self.ready);
    }
}

/// Parses "X->Y: rx N pkts N bytes, tx N pkts N bytes, dropped: loss N queue N, write errors N".
fn parse_counters(line: &str) -> DirCounters {
    let words: Vec<&str> = line.split([' ', ',']).filter(|w| !w.is_empty()).collect();
    let after = |key: &str| -> u64 {
        let i = words
            .iter()
            .position(|w| *w == key)
            .unwrap_or_else(|| panic!("{key} in {line}"));
        words[i + 1].parse().unwrap()
    };
    DirCounters {
        rx: after("rx"),
        tx: after("tx"),
        loss: after("loss"),
        queue: after("queue"),
        behind: after("behind"),
    }
}

/// Runs `f` on a thread that has entered network namespace `ns`; sockets it creates live there.
fn in_netns<T: Send + 'static>(ns: &str, f: impl FnOnce() -> T + Send + 'static) -> T {
    let path = format!("/var/run/netns/{ns}");
    thread::spawn(move || {
        let fd = File::open(&path).unwrap();
        nix::sched::setns(&fd, nix::sched::CloneFlags::CLONE_NEWNET).unwrap();
        f()
    })
    .join()
    .unwrap()
}

fn udp_in(ns: &str, ip: Ipv4Addr, port: u16) -> UdpSocket {
    in_netns(ns, move || {
        let s = UdpSocket::bind(SocketAddrV4::new(ip, port)).unwrap();
        // Bursts at 1 Gbit/s overflow the default 208 KiB receive buffer.
        let buf: usize = 8 << 20;
        nix::sys::socket::setsockopt(&s, nix::sys::socket::sockopt::RcvBufForce, &buf).unwrap();
        s
    })
}

/// Echoes UDP datagrams on `sock` until `stop`.
fn spawn_echo(sock: UdpSocket, stop: Arc<AtomicBool>) -> thread::JoinHandle<()> {
    sock.set_read_timeout(Some(Duration::from_millis(50)))
        .unwrap();
    thread::spawn(move || {
        let mut buf = [0u8; 2048];
        while !stop.load(Ordering::Relaxed) {
            if let Ok((n, from)) = sock.recv_from(&mut buf) {
                let _ = sock.send_to(&buf[..n], from);
            }
        }
    })
}

fn median(mut v: Vec<f64>) -> f64 {
    assert!(!v.is_empty());
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// Median RTT in ms of `count` 64-byte UDP probes sent every `interval` from A to an echo in B.
fn measure_rtt_ms(ns: &NsPair, count: usize, interval: Duration) -> (f64, usize) {
    let stop = Arc::new(AtomicBool::new(false));
    let echo = spawn_echo(udp_in(&ns.b, ADDR_B, 7000), stop.clone());
    let client = udp_in(&ns.a, ADDR_A, 0);
    client.connect(SocketAddrV4::new(ADDR_B, 7000)).unwrap();
    let receiver = client.try_clone().unwrap();
    receiver
        .set_read_timeout(Some(Duration::from_secs(2)))
        .unwrap();
    let epoch = Instant::now();
    let collect = thread::spawn(move || {
        let mut rtts = Vec::with_capacity(count);
        let mut buf = [0u8; 64];
        while rtts.len() < count {
            let Ok(n) = receiver.recv(&mut buf) else {
                break;
            };
            assert_eq!(n, 64);
            let sent = u64::from_le_bytes(buf[8..16].try_into().unwrap());
            let now = epoch.elapsed().as_nanos() as u64;
            rtts.push((now - sent) as f64 / 1e6);
        }
        rtts
    });
    let mut pkt = [0u8; 64];
    for seq in 0..count as u64 {
        pkt[..8].copy_from_slice(&seq.to_le_bytes());
        pkt[8..16].copy_from_slice(&(epoch.elapsed().as_nanos() as u64).to_le_bytes());
        client.send(&pkt).unwrap();
        thread::sleep(interval);
    }
    let rtts = collect.join().unwrap();
    stop.store(true, Ordering::Relaxed);
    echo.join().unwrap();
    let got = rtts.len();
    (median(rtts), got)
}

/// Checks the RTT linkem adds against 2 x delay. The RTT with no delay (linkem's processing and
/// this test's echo, ~0.1 ms on a VM) is measured first and subtracted: the setting under test
/// is the delay, not the host's wake-up latency.
fn check_rtt(delay_ms: f64) {
    let _serial = serial();
    let ns = NsPair::new();
    let link = Linkem::start(&ns, &["--rate", "100mbit"]);
    let (baseline, _) = measure_rtt_ms(&ns, 100, Duration::from_millis(5));
    link.stop();
    let link = Linkem::start(
        &ns,
        &["--rate", "100mbit", "--delay", &format!("{delay_ms}ms")],
    );
    let (rtt, got) = measure_rtt_ms(&ns, 200, Duration::from_millis(5));
    link.stop();
    let expected = 2.0 * delay_ms;
    let added = rtt - baseline;
    let tolerance = (expected * 0.10).max(0.2);
    eprintln!(
        "delay {delay_ms} ms: median RTT {rtt:.3} ms over {got} probes, {baseline:.3} ms without \
         delay, so {added:.3} ms added; expected {expected:.3} ms"
    );
    assert!(got >= 190, "only {got} of 200 probes came back");
    assert!(
        (added - expected).abs() <= tolerance,
        "linkem added {added:.3} ms of RTT (median {rtt:.3} minus {baseline:.3} without delay), \
         expected {expected:.3} ± {tolerance:.3} ms"
    );
    // Sanity on the raw figure: the processing overhead itself stays small.
    assert!(baseline < 1.0, "RTT without delay is {baseline:.3} ms");
}

#[test]
fn rtt_matches_delay_1ms() {
    require_env!();
    timed_check("rtt 1 ms", || check_rtt(1.0));
}

#[test]
fn rtt_matches_delay_20ms() {
    require_env!();
    timed_check("rtt 20 ms", || check_rtt(20.0));
}

/// One-way delays (ms) and sequence numbers, in arrival order, of `count` 64-byte probes sent
/// from A to B every `interval` (both ends share this process's monotonic clock).
fn one_way_probes(ns: &NsPair, port: u16, count: u64, interval: Duration) -> Vec<(u64, f64)> {
    let receiver = udp_in(&ns.b, ADDR_B, port);
    receiver
        .set_read_timeout(Some(Duration::from_millis(500)))
        .unwrap();
    let sender = udp_in(&ns.a, ADDR_A, 0);
    sender.connect(SocketAddrV4::new(ADDR_B, port)).unwrap();
    let epoch = Instant::now();
    let collect = thread::spawn(move || {
        let mut seen = Vec::new();
        let mut buf = [0u8; 64];
        while let Ok(64) = receiver.recv(&mut buf) {
            let seq = u64::from_le_bytes(buf[..8].try_into().unwrap());
            let sent = u64::from_le_bytes(buf[8..16].try_into().unwrap());
            let now = epoch.elapsed().as_nanos() as u64;
            seen.push((seq, (now - sent) as f64 / 1e6));
        }
        seen
    });
    let mut pkt = [0u8; 64];
    for seq in 0..count {
        pkt[..8].copy_from_slice(&seq.to_le_bytes());
        pkt[8..16].copy_from_slice(&(epoch.elapsed().as_nanos() as u64).to_le_bytes());
        sender.send(&pkt).unwrap();
        thread::sleep(interval);
    }
    collect.join().unwrap()
}

fn percentile(v: &[f64], p: f64) -> f64 {
    let mut v = v.to_vec();
    v.sort_by(f64::total_cmp);
    v[((v.len() - 1) as f64 * p).round() as usize]
}

fn check_jitter(allow_reorder: bool) {
    let _serial = serial();
    let ns = NsPair::new();
    let mut args = vec!["--rate", "100mbit", "--delay", "5ms", "--jitter", "2ms"];
    if allow_reorder {
        args.push("--allow-reorder");
    }
    let link = Linkem::start(&ns, &args);
    // Probes 2 ms apart with delays spread over 3..7 ms: reordering is likely unless prevented.
    let seen = one_way_probes(&ns, 7006, 300, Duration::from_millis(2));
    link.stop();
    let delays: Vec<f64> = seen.iter().map(|s| s.1).collect();
    let reordered = seen.windows(2).filter(|w| w[1].0 < w[0].0).count();
    let (p10, p50, p90) = (
        percentile(&delays, 0.1),
        percentile(&delays, 0.5),
        percentile(&delays, 0.9),
    );
    eprintln!(
        "jitter 5ms±2ms reorder={allow_reorder}: {} probes, one-way p10 {p10:.2} p50 {p50:.2} \
         p90 {p90:.2} ms, min {:.2} ms, {reordered} reordered",
        seen.len(),
        percentile(&delays, 0.0)
    );
    assert!(
        seen.len() >= 290,
        "only {} of 300 probes arrived",
        seen.len()
    );
    assert!(
        percentile(&delays, 0.0) >= 2.95,
        "a probe beat the minimum delay of 3 ms"
    );
    assert!(
        p90 - p10 >= 2.0,
        "jitter barely spread the delay: p10 {p10:.2} p90 {p90:.2} ms"
    );
    assert!(
        (4.0..=6.8).contains(&p50),
        "median one-way delay {p50:.2} ms"
    );
    if allow_reorder {
        assert!(reordered > 0, "jitter never reordered although allowed");
    } else {
        assert_eq!(reordered, 0, "jitter reordered packets");
    }
}

#[test]
fn jitter_without_reordering() {
    require_env!();
    check_jitter(false);
}

#[test]
fn jitter_with_reordering_allowed() {
    require_env!();
    check_jitter(true);
}

#[test]
fn queue_limit_bounds_queueing_delay() {
    require_env!();
    let _serial = serial();
    let ns = NsPair::new();
    // 25,000 bytes at 10 Mbit/s is 20 ms of queue.
    let link = Linkem::start(
        &ns,
        &["--rate", "10mbit", "--delay", "1ms", "--queue", "25000"],
    );
    let sender = udp_in(&ns.a, ADDR_A, 0);
    sender.connect(SocketAddrV4::new(ADDR_B, 7007)).unwrap();
    let sink = spawn_counter(udp_in(&ns.b, ADDR_B, 7007), Duration::from_millis(500));
    let blaster =
        thread::spawn(move || blast(&sender, 1472, 15e6, Duration::from_millis(2500), u64::MAX));
    thread::sleep(Duration::from_millis(500));
    let seen = one_way_probes(&ns, 7008, 100, Duration::from_millis(15));
    blaster.join().unwrap();
    sink.join().unwrap();
    let [ab, _] = link.stop();
    let delays: Vec<f64> = seen.iter().map(|s| s.1).collect();
    let p50 = percentile(&delays, 0.5);
    // A probe admitted to a nearly full queue waits ~20 ms, then 1 ms on the wire.
    let expected = 1.0 + 25_000.0 * 8.0 / 10e6 * 1e3;
    eprintln!(
        "queue 25000 B at 10mbit: {} probes arrived, one-way median {p50:.2} ms (expected \
         about {expected:.1}), linkem {ab:?}",
        seen.len()
    );
    assert!(ab.queue > 0, "the overloaded queue never dropped: {ab:?}");
    assert!(
        seen.len() >= 10,
        "too few probes got through: {}",
        seen.len()
    );
    assert!(
        (expected * 0.85..=expected * 1.1).contains(&p50),
        "median one-way delay {p50:.2} ms under a full queue, expected about {expected:.1} ms"
    );
}

/// What a UDP receiver saw: IP-level bytes and the arrival times of the first and last packet.
struct Received {
    packets: u64,
    ip_bytes: u64,
    first: Option<Instant>,
    last: Option<Instant>,
    first_len: u64,
}

impl Received {
    /// IP-level bit/s from the first to the last arrival (the first packet's bytes precede the
    /// interval).
    fn rate_bps(&self) -> f64 {
        let (Some(first), Some(last)) = (self.first, self.last) else {
            return 0.0;
        };
        (self.ip_bytes - self.first_len) as f64 * 8.0 / (last - first).as_secs_f64()
    }
}

/// Counts datagrams on `sock` until none arrive for `idle`.
fn spawn_counter(sock: UdpSocket, idle: Duration) -> thread::JoinHandle<Received> {
    sock.set_read_timeout(Some(idle)).unwrap();
    thread::spawn(move || {
        let mut r = Received {
            packets: 0,
            ip_bytes: 0,
            first: None,
            last: None,
            first_len: 0,
        };
        let mut buf = vec![0u8; 65536];
        while let Ok(n) = sock.recv(&mut buf) {
            let now = Instant::now();
            let ip_len = (n + UDP_OVERHEAD) as u64;
            if r.first.is_none() {
                r.first = Some(now);
                r.first_len = ip_len;
            }
            r.last = Some(now);
            r.packets += 1;
            r.ip_bytes += ip_len;
        }
        r
    })
}

/// Sends `payload`-byte datagrams from A to B paced at `offered_bps` (IP level) for
/// `duration`, or until `max_packets`; returns how many were sent. Uses UDP GSO, so one
/// syscall carries up to 64 datagrams and the blaster leaves the CPU to the link under test.
fn blast(
    sock: &UdpSocket,
    payload: usize,
    offered_bps: f64,
    duration: Duration,
    max_packets: u64,
) -> u64 {
    let segs = (65_507 / payload).clamp(1, 64);
    if segs > 1 {
        let size = payload as i32;
        nix::sys::socket::setsockopt(sock, nix::sys::socket::sockopt::UdpGsoSegment, &size)
            .unwrap();
    }
    let buf = vec![0x5au8; payload * segs];
    let per_packet = (payload + UDP_OVERHEAD) as f64 * 8.0 / offered_bps;
    let start = Instant::now();
    let mut sent = 0u64;
    while start.elapsed() < duration && sent < max_packets {
        // Catch up in bursts after each sleep: pacing per packet is finer than a timer.
        let due = ((start.elapsed().as_secs_f64() / per_packet) as u64 + 1).min(max_packets);
        while sent < due && start.elapsed() < duration {
            let n = (due - sent).min(segs as u64) as usize;
            match sock.send(&buf[..n * payload]) {
                Ok(_) => sent += n as u64,
                // The sender's own queue is full: the offered load is already above the link's.
                Err(e) if e.raw_os_error() == Some(libc::ENOBUFS) => thread::yield_now(),
                Err(e) => panic!("send: {e}"),
            }
        }
        thread::sleep(Duration::from_micros(200));
    }
    sent
}

fn check_udp_throughput(rate: &str, rate_bps: f64, mtu: usize) {
    let _serial = serial();
    let ns = NsPair::new();
    let mtu_s = mtu.to_string();
    let link = Linkem::start(&ns, &["--rate", rate, "--delay", "1ms", "--mtu", &mtu_s]);
    let counter = spawn_counter(udp_in(&ns.b, ADDR_B, 7001), Duration::from_millis(500));
    let sender = udp_in(&ns.a, ADDR_A, 0);
    sender.connect(SocketAddrV4::new(ADDR_B, 7001)).unwrap();
    let payload = mtu - UDP_OVERHEAD;
    let sent = blast(
        &sender,
        payload,
        rate_bps * 1.2,
        Duration::from_secs(3),
        u64::MAX,
    );
    let got = counter.join().unwrap();
    let [ab, _] = link.stop();
    let measured = got.rate_bps();
    eprintln!(
        "rate {rate} mtu {mtu}: received {:.1} Mbit/s ({} of {sent} packets), linkem {ab:?}",
        measured / 1e6,
        got.packets
    );
    assert!(
        (measured / rate_bps - 1.0).abs() <= 0.10,
        "throughput {:.1} Mbit/s, set {rate}",
        measured / 1e6
    );
    // The offered load exceeded the rate, so the emulated queue, not something else, dropped.
    assert!(ab.queue > 0, "no queue drops at 120% load: {ab:?}");
}

#[test]
fn udp_throughput_100mbit() {
    require_env!();
    timed_check("udp 100mbit", || {
        check_udp_throughput("100mbit", 100e6, 1500)
    });
}

#[test]
fn udp_throughput_1gbit() {
    require_env!();
    timed_check("udp 1gbit", || check_udp_throughput("1gbit", 1e9, 1500));
}

/// TCP goodput from A to B over `secs` seconds, measured after the first `skip` (slow start),
/// and the rate on the wire that implies (a full 1500-byte packet carries 1448 payload bytes
/// with TCP timestamps). Returns (goodput, wire) in bit/s.
fn tcp_goodput(ns: &NsPair, port: u16, secs: u64, skip: u64) -> (f64, f64) {
    let listener = in_netns(&ns.b, move || TcpListener::bind((ADDR_B, port)).unwrap());
    let server = thread::spawn(move || {
        let (mut conn, _) = listener.accept().unwrap();
        let mut buf = vec![0u8; 1 << 16];
        // (time, cumulative bytes) samples to measure after slow start.
        let mut samples = Vec::new();
        let mut total = 0u64;
        loop {
            match conn.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    total += n as u64;
                    samples.push((Instant::now(), total));
                }
            }
        }
        samples
    });
    let mut conn = in_netns(&ns.a, move || {
        TcpStream::connect(SocketAddr::from((ADDR_B, port))).unwrap()
    });
    let chunk = vec![0u8; 1 << 16];
    let start = Instant::now();
    while start.elapsed() < Duration::from_secs(secs) {
        conn.write_all(&chunk).unwrap();
    }
    drop(conn);
    let samples = server.join().unwrap();
    let t0 = samples[0].0 + Duration::from_secs(skip);
    let from = samples.iter().find(|s| s.0 >= t0).unwrap();
    let to = samples.last().unwrap();
    let goodput = (to.1 - from.1) as f64 * 8.0 / (to.0 - from.0).as_secs_f64();
    (goodput, goodput * 1500.0 / 1448.0)
}

#[test]
fn tcp_throughput_100mbit_20ms() {
    require_env!();
    timed_check("tcp 100mbit 20ms", check_tcp_100mbit_20ms);
}

fn check_tcp_100mbit_20ms() {
    let _serial = serial();
    let ns = NsPair::new();
    let link = Linkem::start(&ns, &["--rate", "100mbit", "--delay", "20ms"]);
    // Goodput over seconds 2..6, after slow start has filled the pipe.
    let (goodput, wire) = tcp_goodput(&ns, 7002, 6, 2);
    link.stop();
    eprintln!(
        "tcp 100mbit 20ms: goodput {:.1} Mbit/s, on the wire {:.1} Mbit/s",
        goodput / 1e6,
        wire / 1e6
    );
    assert!(
        (wire / 100e6 - 1.0).abs() <= 0.10,
        "TCP at 100mbit+20ms ran at {:.1} Mbit/s on the wire",
        wire / 1e6
    );
}

/// Measurement, not acceptance: TCP through linkem at the bench's links (1 Gbit/s + 1 ms each
/// way, 100 Mbit/s + 20 ms each way + 0.5% loss), reported with linkem's counters (`behind`
/// counts packets linkem itself could not keep up with). Run with `-- --ignored --nocapture`;
/// `$LINKEM_EXTRA_ARGS` tries other settings.
#[test]
#[ignore]
fn tcp_throughput_bench_links() {
    require_env!();
    let _serial = serial();
    for (label, args) in [
        ("1gbit 1ms", &["--rate", "1gbit", "--delay", "1ms"][..]),
        (
            "100mbit 20ms 0.5%",
            &["--rate", "100mbit", "--delay", "20ms", "--loss", "0.5%"][..],
        ),
    ] {
        let ns = NsPair::new();
        let link = Linkem::start(&ns, args);
        let (goodput, wire) = tcp_goodput(&ns, 7006, 8, 2);
        let counters = link.stop();
        eprintln!(
            "tcp {label}: goodput {:.1} Mbit/s, on the wire {:.1} Mbit/s; linkem {counters:?}",
            goodput / 1e6,
            wire / 1e6
        );
    }
}

fn check_loss(loss_pct: f64) {
    let _serial = serial();
    let ns = NsPair::new();
    let loss = format!("{loss_pct}%");
    let link = Linkem::start(&ns, &["--rate", "1gbit", "--loss", &loss, "--seed", "42"]);
    let counter = spawn_counter(udp_in(&ns.b, ADDR_B, 7003), Duration::from_millis(500));
    let sender = udp_in(&ns.a, ADDR_A, 0);
    sender.connect(SocketAddrV4::new(ADDR_B, 7003)).unwrap();
    // 10,000 packets at 80 Mbit/s: far below the rate, so only the emulated loss drops.
    let n = 10_000;
    let sent = blast(&sender, 472, 80e6, Duration::from_secs(30), n);
    let got = counter.join().unwrap();
    let [ab, _] = link.stop();
    assert_eq!(sent, n);
    let measured = 1.0 - got.packets as f64 / n as f64;
    let p = loss_pct / 100.0;
    eprintln!(
        "loss {loss}: {} of {n} arrived, measured {:.3}%, linkem {ab:?}",
        got.packets,
        measured * 100.0
    );
    assert_eq!(
        ab.queue + ab.behind,
        0,
        "other drops at a fraction of the rate: {ab:?}"
    );
    assert!(
        (measured / p - 1.0).abs() <= 0.20,
        "measured loss {:.3}%, set {loss}",
        measured * 100.0
    );
    // The emulator's own count agrees with what the receiver saw.
    assert!(ab.loss <= n && ab.rx >= n && ab.tx >= got.packets);
}

#[test]
fn loss_1_percent() {
    require_env!();
    check_loss(1.0);
}

/// The bench's lossy link.
#[test]
fn loss_half_percent() {
    require_env!();
    check_loss(0.5);
}

#[test]
fn loss_5_percent() {
    require_env!();
    check_loss(5.0);
}

#[test]
fn jumbo_mtu_carries_large_datagrams_intact() {
    require_env!();
    let _serial = serial();
    let ns = NsPair::new();
    let mtu = 65000;
    let link = Linkem::start(
        &ns,
        &["--mtu", "65000", "--rate", "1gbit", "--delay", "1ms"],
    );
    let receiver = udp_in(&ns.b, ADDR_B, 7009);
    receiver
        .set_read_timeout(Some(Duration::from_millis(500)))
        .unwrap();
    let sender = udp_in(&ns.a, ADDR_A, 0);
    sender.connect(SocketAddrV4::new(ADDR_B, 7009)).unwrap();
    let payload = mtu - UDP_OVERHEAD;
    let make = |seq: u8| -> Vec<u8> {
        (0..payload)
            .map(|i| (i as u8).wrapping_mul(7).wrapping_add(seq))
            .collect()
    };
    let collect = thread::spawn(move || {
        let mut buf = vec![0u8; 65536];
        let mut got = Vec::new();
        while let Ok(n) = receiver.recv(&mut buf) {
            got.push(buf[..n].to_vec());
        }
        got
    });
    for seq in 0..50u8 {
        sender.send(&make(seq)).unwrap();
        // 65 KB at 1 Gbit/s is 0.5 ms on the wire; stay well below the rate.
        thread::sleep(Duration::from_millis(2));
    }
    let got = collect.join().unwrap();
    let [ab, _] = link.stop();
    assert_eq!(got.len(), 50, "linkem {ab:?}");
    for (seq, pkt) in got.iter().enumerate() {
        assert!(
            *pkt == make(seq as u8),
            "datagram {seq} arrived changed or out of order"
        );
    }
    // Each datagram crossed the TUN devices as one IP packet, not as 44 fragments.
    assert!((50..55).contains(&ab.rx), "{ab:?}");
}

#[test]
fn netem_probe_agrees_with_tc() {
    require_env!();
    let _serial = serial();
    let out = Command::new(linkem_bin())
        .arg("--netem-available")
        .output()
        .unwrap();
    let code = out.status.code();
    let said = String::from_utf8_lossy(&out.stdout).trim().to_string();
    // Ask tc directly, in a namespace of our own.
    let ns = NsPair::new();
    let tc = Command::new("ip")
        .args([
            "netns", "exec", &ns.a, "tc", "qdisc", "add", "dev", "lo", "root", "netem",
        ])
        .args(["delay", "1ms"])
        .output()
        .unwrap();
    eprintln!(
        "linkem --netem-available: {code:?} {said:?}; tc says {:?}",
        tc.status
    );
    if tc.status.success() {
        assert_eq!((code, said.as_str()), (Some(0), "netem available"));
    } else {
        assert_eq!((code, said.as_str()), (Some(1), "netem not available"));
    }
}

/// Measurement, not acceptance: how fast linkem forwards with no rate limit, per MTU, with UDP
/// and TCP. Run with `cargo test --release --test linkem -- --ignored --nocapture`.
#[test]
#[ignore]
fn max_forwarding_rate() {
    require_env!();
    let _serial = serial();
    for mtu in [1500usize, 9000, 65000] {
        let ns = NsPair::new();
        let mtu_s = mtu.to_string();
        let link = Linkem::start(&ns, &["--mtu", &mtu_s]);
        let counter = spawn_counter(udp_in(&ns.b, ADDR_B, 7004), Duration::from_millis(500));
        let sender = udp_in(&ns.a, ADDR_A, 0);
        sender.connect(SocketAddrV4::new(ADDR_B, 7004)).unwrap();
        let sent = blast(
            &sender,
            mtu - UDP_OVERHEAD,
            100e9,
            Duration::from_secs(2),
            u64::MAX,
        );
        let got = counter.join().unwrap();
        let udp = got.rate_bps();
        let listener = in_netns(&ns.b, || TcpListener::bind((ADDR_B, 7005)).unwrap());
        let server = thread::spawn(move || {
            let (mut conn, _) = listener.accept().unwrap();
            let mut buf = vec![0u8; 1 << 20];
            let mut total = 0u64;
            while let Ok(n @ 1..) = conn.read(&mut buf) {
                total += n as u64;
            }
            total
        });
        let mut conn = in_netns(&ns.a, || {
            TcpStream::connect(SocketAddr::from((ADDR_B, 7005))).unwrap()
        });
        let chunk = vec![0u8; 1 << 20];
        let start = Instant::now();
        while start.elapsed() < Duration::from_secs(2) {
            conn.write_all(&chunk).unwrap();
        }
        drop(conn);
        let tcp = server.join().unwrap() as f64 * 8.0 / start.elapsed().as_secs_f64();
        link.stop();
        eprintln!(
            "mtu {mtu}: UDP {:.0} Mbit/s ({} of {sent} datagrams), TCP {:.0} Mbit/s goodput",
            udp / 1e6,
            got.packets,
            tcp / 1e6
        );
    }
}

/// Measurement, not acceptance: the RTT linkem adds with no delay (its processing and wake-up
/// latency, plus this test's echo). Run with `-- --ignored --nocapture`.
#[test]
#[ignore]
fn rtt_overhead() {
    require_env!();
    let _serial = serial();
    let ns = NsPair::new();
    let link = Linkem::start(&ns, &[]);
    let (rtt, got) = measure_rtt_ms(&ns, 200, Duration::from_millis(5));
    link.stop();
    eprintln!("no delay: median RTT {rtt:.3} ms over {got} probes");
}
