//! A source that says it released its dump (SourceReleased) before dst has every lazy page is
//! not a success: the pages it still lacks can never arrive, so dst fails the migration and the
//! failure rule applies (restored tasks lacking memory are killed before their uffds close,
//! never left to read zero pages). Real CRIU (a lazy dump of a holder process in its own pid
//! namespace, restored by the real `pageserv dst`), real userfaultfd, real QUIC; only the source
//! is played by this test, which ships the dump's images and then releases without sending a
//! page. Needs root and CRIU; skips otherwise.

#[path = "common/criu.rs"]
mod criu;
#[path = "common/holder.rs"]
mod holder;

use std::net::SocketAddr;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant, SystemTime};

use pageserv::criu::binary::Criu;
use pageserv::keys::{self, Identity};
use pageserv::pb::pageserv::{SourceReleased, control::Msg};
use pageserv::protocol::{self, Role, connect_control, next_ctl, send_ctl};
use pageserv::source::dump::{DumpOptions, start_lazy_dump};
use pageserv::transport::TransportOptions;

#[test]
fn memory_holder() {
    holder::run_if_requested();
}

fn alive(pid: i32) -> bool {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    !stat.is_empty() && !stat.contains(") Z ")
}

#[test]
fn an_early_source_release_is_not_success() {
    let Some(c) = criu::require("early_release") else {
        return;
    };
    criu::ensure_pipe_max_size().expect("pipe-max-size");
    let criu_bin = Criu::locate(Some(c.bin.as_path())).expect("CRIU version");
    let scratch = criu::TestDir::new("early-release");
    let mut holder = holder::spawn("memory_holder", scratch.path()).expect("holder");
    let work = scratch.sub("src");
    let mut dump = start_lazy_dump(
        &criu_bin,
        &DumpOptions {
            pid: holder.proc.pid,
            images_dir: work.join("images"),
            work_dir: work.clone(),
            extra: Vec::new(),
        },
    )
    .expect("criu dump --lazy-pages ready");

    let (src_certs, dst_certs) = keys::demo_identities(&scratch.sub("keys")).expect("certificates");
    let port = std::net::UdpSocket::bind("127.0.0.1:0")
        .and_then(|s| s.local_addr())
        .expect("a free port")
        .port();
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse().expect("addr");
    let dst_work = scratch.sub("dst");
    let dst_log = scratch.path().join("dst.log");
    let mut dst = Command::new(env!("CARGO_BIN_EXE_pageserv"))
        .args(["dst", "--listen", &addr.to_string(), "--certs"])
        .arg(&dst_certs)
        .arg("--work")
        .arg(&dst_work)
        .arg("--criu")
        .arg(&c.bin)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&dst_log).expect("dst log"))
        .spawn()
        .expect("start pageserv dst");
    let src = Identity::load(&src_certs).expect("source identity");

    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let seen = rt.block_on(async {
        let opts = TransportOptions::default();
        let deadline = Instant::now() + Duration::from_secs(20);
        let (conn, mut tx, mut rx) = loop {
            match connect_control(&src, addr, "dst", &opts).await {
                Ok(c) => break c,
                Err(e) if Instant::now() < deadline => {
                    eprintln!("dst not up yet: {e:#}");
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
                Err(e) => panic!("pageserv dst did not come up: {e:#}"),
            }
        };
        let id = "feedfacefeedface".to_string();
        let version = criu_bin.version.to_string();
        send_ctl(
            &mut tx,
            Msg::Hello(protocol::hello(Role::Src, version.clone(), id.clone())),
        )
        .await
        .expect("hello");
        let answer = match next_ctl(&mut rx).await.expect("dst's hello") {
            Msg::Hello(h) => h,
            other => panic!("dst refused: {other:?}"),
        };
        let (_fconn, mut ftx, _frx) =
            connect_control(&src, protocol::fault_addr(addr, &answer), "dst", &opts)
                .await
                .expect("fault connection");
        send_ctl(
            &mut ftx,
            Msg::Hello(protocol::hello(Role::SrcFaults, version, id)),
        )
        .await
        .expect("fault hello");
        protocol::images::ship_images(
            &mut tx,
            &dump.images_dir,
            SystemTime::now(),
            Vec::new(),
            || {},
        )
        .await
        .expect("images shipped");
        // The restore starts (and, unless a restored task faults first, finishes) with no page
        // sent; then this source claims it released its dump.
        let mut seen = Vec::new();
        let until = tokio::time::Instant::now() + Duration::from_secs(10);
        loop {
            match tokio::time::timeout_at(until, next_ctl(&mut rx)).await {
                Ok(Ok(Msg::RestoreStarted(_))) => seen.push("started"),
                Ok(Ok(Msg::RestoreFinished(_))) => {
                    seen.push("finished");
                    break;
                }
                Ok(Ok(other)) => panic!("unexpected {other:?} from dst"),
                Ok(Err(e)) => panic!("dst's control stream: {e:#}"),
                Err(_) => break,
            }
        }
        send_ctl(
            &mut tx,
            Msg::SourceReleased(SourceReleased {
                dump_ok: true,
                detail: String::new(),
            }),
        )
        .await
        .expect("release sent");
        // Keep both connections open until dst ends the migration (closing them would be a
        // link failure instead).
        let closed = tokio::time::timeout(Duration::from_secs(30), conn.closed()).await;
        eprintln!("dst closed the link: {closed:?}");
        drop(_fconn);
        seen
    });
    eprintln!("dst said: {seen:?}");
    assert!(seen.contains(&"started"), "the restore never started");

    let deadline = Instant::now() + Duration::from_secs(30);
    let status = loop {
        if let Some(st) = dst.try_wait().expect("wait dst") {
            break st;
        }
        assert!(
            Instant::now() < deadline,
            "dst did not end after the release"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    let log = std::fs::read_to_string(&dst_log).unwrap_or_default();
    // The restored tree, if the restore got as far as its pidfile.
    let restored: Option<i32> = std::fs::read_dir(&dst_work).ok().and_then(|d| {
        d.flatten().find_map(|e| {
            std::fs::read_to_string(e.path().join("work").join("restore.pid"))
                .ok()
                .and_then(|t| t.trim().parse().ok())
        })
    });
    eprintln!("dst exit {status}, restored pid {restored:?}");
    let dead = restored.is_none_or(|p| {
        let t0 = Instant::now();
        while alive(p) && t0.elapsed() < Duration::from_secs(10) {
            std::thread::sleep(Duration::from_millis(50));
        }
        !alive(p)
    });
    if let Some(p) = restored.filter(|p| alive(*p)) {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(p),
            nix::sys::signal::Signal::SIGKILL,
        );
    }
    if let Some(mut d) = dump.child.take() {
        let _ = d.kill();
        let _ = d.wait();
    }
    holder.proc.kill();
    assert!(
        !status.success(),
        "dst reported success though no lazy page ever arrived:\n{log}"
    );
    assert!(
        log.contains("released its dump") && log.contains("before dst had every lazy page"),
        "{log}"
    );
    assert!(
        dead,
        "a restored task with missing memory still runs:\n{log}"
    );
    // The fault thread's shutdown killed the incomplete task (pidfd), whether or not the
    // restore got as far as its pidfile.
    let killed_some = log
        .lines()
        .filter(|l| l.contains("stopped the fault thread after a failure"))
        .any(|l| {
            l.split("killed: [")
                .nth(1)
                .is_some_and(|rest| rest.starts_with(|c: char| c.is_ascii_digit()))
        });
    assert!(killed_some, "no incomplete task was killed:\n{log}");
}
