//! Processes with sockets migrate (real CRIU, real userfaultfd, QUIC): a TCP server and a
//! unix-socket server answer at dst with their state; a TCP connection to a service in a network
//! namespace of its own stays open across the migration, every byte checked both ways; and a
//! tree CRIU could not dump is refused before the freeze, naming the option to pass.
//!
//! The servers are this test binary re-executed (`tests/common/sockserv.rs`), each as pid 1 of
//! its own pid namespace. Needs root and CRIU >= 4.2 (tools/setup).

use std::io::Write;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

#[path = "common/criu.rs"]
mod criu;
#[path = "common/netmig.rs"]
mod netmig;
#[path = "common/root.rs"]
mod root;
#[path = "common/sockserv.rs"]
mod sockserv;

use netmig::{Started, alive};
use sockserv::request;

/// Re-executed as the server by the tests below; a no-op in a normal run.
#[test]
fn socket_server() {
    sockserv::run_if_requested();
}

fn pages() -> u64 {
    sockserv::SERVER_MIB * 256
}

/// Asks `echo K` for pages spread over the whole memory: each answer needs a migrated page.
fn check_memory(s: &mut (impl std::io::Read + Write), n: u64) -> Result<(), String> {
    for j in 0..n {
        let k = j * (pages() / n) + j % 7;
        let got = request(s, &format!("echo {k}"))?;
        let want = sockserv::expected_echo(k, "");
        if got != want {
            return Err(format!("echo {k}: got {got:?}, want {want:?}"));
        }
    }
    Ok(())
}

#[test]
fn listening_tcp_and_unix_servers_answer_at_dst() {
    if !root::can_run() {
        return;
    }
    let dir = criu::TestDir::new("sockets-listen");
    let bed = netmig::testbed(71);
    let port = criu::free_tcp_port().expect("port");
    let addr = format!("127.0.0.1:{port}");
    let unix = dir.path().join("srv.sock");
    let mut started = Started::default();
    let cmd = sockserv::spawn_cmd(&[], "socket_server", dir.path(), &addr, Some(&unix));
    let pid = netmig::start_init(cmd, Some(&dir.path().join("server.ready")), &mut started);

    // Before: three requests, so the counter the restored server continues is known.
    let mut t = std::net::TcpStream::connect(&addr).expect("connect tcp");
    assert_eq!(request(&mut t, "ping").unwrap(), "pong 1");
    let mut u = std::os::unix::net::UnixStream::connect(&unix).expect("connect unix");
    assert_eq!(request(&mut u, "ping").unwrap(), "pong 2");
    assert_eq!(request(&mut t, "ping").unwrap(), "pong 3");
    // The clients hang up: a connection with a peer outside the tree is refused before the
    // freeze (see refuses_..._before_the_freeze); listening sockets need no option.
    drop((t, u));
    std::thread::sleep(Duration::from_millis(200));

    let out = netmig::migrate(&bed, pid, &[], &[], Duration::from_secs(120));
    assert!(out.ok(), "migration failed: {}", out.explain());
    let restored = out.restored_pid.expect("restore pidfile");
    started.pids.push(restored);
    assert!(alive(restored), "the restored server is not running");
    assert!(!alive(pid), "the source server still runs: two copies");
    assert!(
        out.dst_dirs_left.is_empty(),
        "dst left {:?} after a successful migration",
        out.dst_dirs_left
    );
    assert!(
        out.dst_json["lazy_pages"].as_u64().unwrap_or(0) > 0,
        "{}",
        out.dst_json
    );

    // After: the TCP server answers in dst's namespace, where its listening socket now lives,
    // with its counter continued and its memory whole.
    let addr2 = addr.clone();
    let r = netmig::run_in(
        format!("/var/run/netns/{}", bed.netns),
        move || -> Result<(), String> {
            let mut t =
                std::net::TcpStream::connect(&addr2).map_err(|e| format!("connect at dst: {e}"))?;
            let pong = request(&mut t, "ping")?;
            if pong != "pong 4" {
                return Err(format!("the counter did not come along: {pong:?}"));
            }
            check_memory(&mut t, 256)?;
            match request(&mut t, "check")? {
                r if r == format!("ok {}", pages()) => Ok(()),
                r => Err(format!("memory check at dst: {r}")),
            }
        },
    );
    r.expect("TCP server at dst");
    // The unix socket was bound again at its path by the restore.
    let mut u = std::os::unix::net::UnixStream::connect(&unix).expect("connect unix at dst");
    let pong = request(&mut u, "ping").expect("unix ping at dst");
    assert!(pong.starts_with("pong "), "{pong}");
    let n: u64 = pong[5..].parse().unwrap();
    assert!(
        n > 4 + 256,
        "the unix server is not the restored one: {pong}"
    );
    check_memory(&mut u, 64).expect("unix server memory at dst");
    // Only the restored copy answers: its pid is the one whose socket we reach.
    netmig::kill(restored);
    std::thread::sleep(Duration::from_millis(200));
    assert!(
        std::os::unix::net::UnixStream::connect(&unix).is_err(),
        "something else still answers at {}",
        unix.display()
    );
}

/// A tree with an established connection to a peer outside it: CRIU would fail mid-dump
/// ("Connected TCP socket"); pageserv refuses before freezing anything, names the option, and
/// the service never stops serving.
#[test]
fn refuses_an_established_connection_before_the_freeze() {
    if !root::can_run() {
        return;
    }
    let dir = criu::TestDir::new("sockets-refuse");
    let port = criu::free_tcp_port().expect("port");
    let addr = format!("127.0.0.1:{port}");
    let mut started = Started::default();
    let cmd = sockserv::spawn_cmd(&[], "socket_server", dir.path(), &addr, None);
    let pid = netmig::start_init(cmd, Some(&dir.path().join("server.ready")), &mut started);
    let mut t = std::net::TcpStream::connect(&addr).expect("connect");
    assert_eq!(request(&mut t, "ping").unwrap(), "pong 1");
    let (src_certs, _) =
        pageserv::keys::demo_identities(&dir.path().join("keys")).expect("certificates");
    let work = dir.path().join("src");
    let t0 = Instant::now();
    let out = std::process::Command::new(netmig::pageserv())
        // Nothing listens there: the refusal must come before pageserv even connects.
        .args([
            "src",
            "--lazy",
            "--to",
            "127.0.0.1:9",
            "--dst-name",
            "dst",
            "--certs",
        ])
        .arg(&src_certs)
        .arg("--work")
        .arg(&work)
        .args(["--pid", &pid.to_string()])
        .output()
        .expect("run pageserv src");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "pageserv src must refuse: {stderr}");
    assert!(
        stderr.contains("--criu-opt=--tcp-established") && stderr.contains("refused to freeze"),
        "the refusal must name the option: {stderr}"
    );
    assert!(
        stderr.contains(&format!("127.0.0.1:{port} <-> 127.0.0.1:")),
        "and the connection: {stderr}"
    );
    assert!(t0.elapsed() < Duration::from_secs(10), "refused late");
    let dumped = walk_has(&work, "dump.log");
    assert!(!dumped, "criu dump must not have started");
    assert!(alive(pid));
    // Never frozen: the same connection keeps answering.
    assert_eq!(request(&mut t, "ping").unwrap(), "pong 2");
}

fn walk_has(dir: &std::path::Path, name: &str) -> bool {
    std::fs::read_dir(dir).is_ok_and(|d| {
        d.flatten()
            .any(|e| e.file_name() == name || (e.path().is_dir() && walk_has(&e.path(), name)))
    })
}

/// The service runs in a network namespace of its own (as a container does), joined to the
/// client's by veth. pageserv migrates it with `--tcp-established` (choosing CRIU's network lock
/// itself and telling dst's restore to take the connections) while a client outside the tree
/// streams requests on one connection; the restore recreates the namespace at dst, its veth's
/// outer end is moved to the client, and the same connection carries on: every reply in order,
/// none lost or doubled, each matching its request's bytes.
#[test]
fn keeps_an_established_connection_open_across_the_migration() {
    if !root::can_run() {
        return;
    }
    let dir = criu::TestDir::new("sockets-estab");
    let bed = netmig::testbed(72);
    let net = netmig::ServiceNet::new(1);
    let svc_ip = net.svc_ip.clone();

    let mut started = Started::default();
    let cmd = sockserv::spawn_cmd(
        &net.svc.prefix(),
        "socket_server",
        dir.path(),
        "0.0.0.0:7070",
        None,
    );
    let pid = netmig::start_init(cmd, Some(&dir.path().join("server.ready")), &mut started);

    // The client: one connection from the client's namespace, streaming until told to stop.
    let stop = Arc::new(AtomicBool::new(false));
    let (tx, rx) = std::sync::mpsc::channel();
    let acked = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let client = {
        let (stop, path, to) = (stop.clone(), net.cli.path(), format!("{svc_ip}:7070"));
        let acked = acked.clone();
        std::thread::spawn(move || {
            netmig::enter_netns(&path);
            let s = std::net::TcpStream::connect(&to).expect("client connect");
            let _ = s.set_nodelay(true);
            let _ = tx.send(());
            sockserv::stream_client(s, stop, 32, acked)
        })
    };
    rx.recv_timeout(Duration::from_secs(10))
        .expect("client connected");
    std::thread::sleep(Duration::from_secs(1));

    let mover = net.spawn_mover(&bed.netns, bed.dir.join("dst"), stop.clone());
    let out = netmig::migrate(
        &bed,
        pid,
        &["--criu-opt=--tcp-established".into()],
        &[net.dst_arg()],
        Duration::from_secs(120),
    );
    if !out.ok() {
        stop.store(true, Ordering::Relaxed);
        panic!("migration failed: {}", out.explain());
    }
    let moved = mover.join().unwrap().expect("outer veth");
    let restored = out.restored_pid.expect("restore pidfile");
    started.pids.push(restored);
    eprintln!(
        "outer veth moved {moved:?} after src started; migration took {:?}",
        out.elapsed
    );
    // The stream goes on at dst for a while, then the client checks what it saw.
    let at_end = acked.load(Ordering::Relaxed);
    std::thread::sleep(Duration::from_secs(2));
    let after = acked.load(Ordering::Relaxed) - at_end;
    stop.store(true, Ordering::Relaxed);
    let stats = client.join().expect("client thread");
    eprintln!(
        "client: {} requests, {} replies checked, longest gap {:?}, errors {:?}",
        stats.sent, stats.replies, stats.max_gap, stats.errors
    );
    assert!(stats.errors.is_empty(), "{:?}", stats.errors);
    assert_eq!(
        stats.replies, stats.sent,
        "every request answered once, in order"
    );
    assert!(
        alive(restored) && !alive(pid),
        "the service must run at dst only"
    );
    assert!(
        out.src_log.contains("nftables"),
        "pageserv chose the network lock: {}",
        out.src_log
    );
    // The connection outlived the migration: the replies kept coming after it ended.
    assert!(
        after > 100,
        "only {after} replies in the 2 s after the migration: {stats:?}"
    );
    assert!(
        stats.max_gap < Duration::from_secs(30),
        "the connection stalled {:?}",
        stats.max_gap
    );
}
