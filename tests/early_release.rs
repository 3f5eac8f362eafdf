//! A source that says it released its dump (SourceReleased) before dst has every lazy page is
//! not a success: the pages it still lacks can never arrive, so dst fails the migration and the
//! failure rule applies (restored tasks lacking memory are killed before their uffds close,
//! never left to read zero pages). Real CRIU (a lazy dump of a holder process in its own pid
//! namespace, restored by the real `pageserv dst`), real userfaultfd, real QUIC; only the source
//! is played by this test, which ships the dump's images and then releases without sending a
//! page. Needs root and CRIU; skips otherwise.
//!
//! Also here, with the same hand-made source: a source that takes fault requests and never
//! answers them loses its link after `--fault-answer-secs`, and the migration at the recover
//! timeout (dst::answer_watch).

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
use pageserv::transport::{FrameReceiver, FrameSender};

#[test]
fn memory_holder() {
    holder::run_if_requested();
}

fn alive(pid: i32) -> bool {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    !stat.is_empty() && !stat.contains(") Z ")
}

/// One migration played by this test as its source: a lazy dump of a holder (with `envs`), a
/// real `pageserv dst` (with `dst_args`) on loopback, and the source's two connections, over
/// which the dump's images are shipped. Nothing else is sent.
struct HandMade {
    scratch: criu::TestDir,
    holder: holder::Holder,
    dump: pageserv::source::dump::ReadyDump,
    dst: std::process::Child,
    dst_log: std::path::PathBuf,
    dst_work: std::path::PathBuf,
    src: Identity,
    addr: SocketAddr,
    version: String,
}

/// With `fork`, the restored holder forks a child that reads its lazy memory (see
/// `holder::FORK_ENV`): faults are certain.
fn start(tag: &str, dst_args: &[&str], fork: bool) -> Option<HandMade> {
    let c = criu::require(tag)?;
    criu::ensure_pipe_max_size().expect("pipe-max-size");
    let criu_bin = Criu::locate(Some(c.bin.as_path())).expect("CRIU version");
    let scratch = criu::TestDir::new(tag);
    let trigger = scratch.path().join("fork.trigger");
    let trigger_s = trigger.to_str().expect("utf-8 scratch").to_string();
    let envs: &[(&str, &str)] = if fork {
        &[(holder::FORK_ENV, trigger_s.as_str())]
    } else {
        &[]
    };
    let holder = holder::spawn_with("memory_holder", scratch.path(), envs).expect("holder");
    let work = scratch.sub("src");
    let dump = start_lazy_dump(
        &criu_bin,
        &DumpOptions {
            pid: holder.proc.pid,
            images_dir: work.join("images"),
            work_dir: work.clone(),
            extra: Vec::new(),
        },
    )
    .expect("criu dump --lazy-pages ready");
    if fork {
        // The source is frozen from here on: only the restored copy sees this.
        std::fs::write(&trigger, b"fork").expect("trigger");
    }
    let (src_certs, dst_certs) = keys::demo_identities(&scratch.sub("keys")).expect("certificates");
    let port = std::net::UdpSocket::bind("127.0.0.1:0")
        .and_then(|s| s.local_addr())
        .expect("a free port")
        .port();
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse().expect("addr");
    let dst_work = scratch.sub("dst");
    let dst_log = scratch.path().join("dst.log");
    let dst = Command::new(env!("CARGO_BIN_EXE_pageserv"))
        .args(["dst", "--listen", &addr.to_string(), "--certs"])
        .arg(&dst_certs)
        .arg("--work")
        .arg(&dst_work)
        .arg("--criu")
        .arg(&c.bin)
        .args(dst_args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&dst_log).expect("dst log"))
        .spawn()
        .expect("start pageserv dst");
    let src = Identity::load(&src_certs).expect("source identity");
    Some(HandMade {
        scratch,
        holder,
        dump,
        dst,
        dst_log,
        dst_work,
        src,
        addr,
        version: criu_bin.version.to_string(),
    })
}

type Link = (
    quinn::Connection,
    FrameSender,
    FrameReceiver,
    quinn::Connection,
);

impl HandMade {
    /// Opens the migration (control and fault connections, as pageserv src does) and ships the
    /// dump's images.
    async fn open(&self) -> Link {
        let opts = TransportOptions::default();
        let deadline = Instant::now() + Duration::from_secs(20);
        let (conn, mut tx, mut rx) = loop {
            match connect_control(&self.src, self.addr, "dst", &opts).await {
                Ok(c) => break c,
                Err(e) if Instant::now() < deadline => {
                    eprintln!("dst not up yet: {e:#}");
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
                Err(e) => panic!("pageserv dst did not come up: {e:#}"),
            }
        };
        let id = "feedfacefeedface".to_string();
        send_ctl(
            &mut tx,
            Msg::Hello(protocol::hello(Role::Src, self.version.clone(), id.clone())),
        )
        .await
        .expect("hello");
        let answer = match next_ctl(&mut rx).await.expect("dst's hello") {
            Msg::Hello(h) => h,
            other => panic!("dst refused: {other:?}"),
        };
        let (fconn, mut ftx, _frx) = connect_control(
            &self.src,
            protocol::fault_addr(self.addr, &answer),
            "dst",
            &opts,
        )
        .await
        .expect("fault connection");
        send_ctl(
            &mut ftx,
            Msg::Hello(protocol::hello(Role::SrcFaults, self.version.clone(), id)),
        )
        .await
        .expect("fault hello");
        protocol::images::ship_images(
            &mut tx,
            &self.dump.images_dir,
            SystemTime::now(),
            Vec::new(),
            || {},
        )
        .await
        .expect("images shipped");
        (conn, tx, rx, fconn)
    }

    /// Waits up to `within` for dst to exit; its status and log.
    fn dst_exit(&mut self, within: Duration) -> (Option<std::process::ExitStatus>, String) {
        let deadline = Instant::now() + within;
        let status = loop {
            if let Some(st) = self.dst.try_wait().expect("wait dst") {
                break Some(st);
            }
            if Instant::now() > deadline {
                break None;
            }
            std::thread::sleep(Duration::from_millis(50));
        };
        (
            status,
            std::fs::read_to_string(&self.dst_log).unwrap_or_default(),
        )
    }

    /// The restored tree's root, if the restore got as far as its pidfile.
    fn restored(&self) -> Option<i32> {
        std::fs::read_dir(&self.dst_work).ok().and_then(|d| {
            d.flatten().find_map(|e| {
                std::fs::read_to_string(e.path().join("work").join("restore.pid"))
                    .ok()
                    .and_then(|t| t.trim().parse().ok())
            })
        })
    }

    /// Whether `pid` is gone within 10 s (then or already).
    fn gone(pid: i32) -> bool {
        let t0 = Instant::now();
        while alive(pid) && t0.elapsed() < Duration::from_secs(10) {
            std::thread::sleep(Duration::from_millis(50));
        }
        !alive(pid)
    }
}

impl Drop for HandMade {
    fn drop(&mut self) {
        if let Some(p) = self.restored().filter(|p| alive(*p)) {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(p),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
        let _ = self.dst.kill();
        let _ = self.dst.wait();
        if let Some(mut d) = self.dump.child.take() {
            let _ = d.kill();
            let _ = d.wait();
        }
        self.holder.proc.kill();
        let _ = &self.scratch;
    }
}

/// Whether the fault loop's shutdown killed an incomplete task (its log line).
fn killed_some(log: &str) -> bool {
    log.lines()
        .filter(|l| l.contains("stopped the fault loop after a failure"))
        .any(|l| {
            l.split("killed: [")
                .nth(1)
                .is_some_and(|rest| rest.starts_with(|c: char| c.is_ascii_digit()))
        })
}

#[test]
fn an_early_source_release_is_not_success() {
    let Some(mut h) = start("early_release", &[], false) else {
        return;
    };
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let seen = rt.block_on(async {
        let (conn, mut tx, mut rx, _fconn) = h.open().await;
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
        seen
    });
    eprintln!("dst said: {seen:?}");
    assert!(seen.contains(&"started"), "the restore never started");
    let (status, log) = h.dst_exit(Duration::from_secs(30));
    let status = status.expect("dst did not end after the release");
    let restored = h.restored();
    eprintln!("dst exit {status}, restored pid {restored:?}");
    let dead = restored.is_none_or(HandMade::gone);
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
    // The fault loop's shutdown killed the incomplete task (pidfd), whether or not the
    // restore got as far as its pidfile.
    assert!(killed_some(&log), "no incomplete task was killed:\n{log}");
}

/// A source that takes dst's fault requests and never answers (its link stays alive: QUIC's
/// keep-alives flow) cannot keep the restored tasks waiting forever: past `--fault-answer-secs`
/// dst drops the link, as if it had died; the source does not resume within `--recover-timeout`,
/// so the migration fails and the incomplete restored tasks are killed before any missing page
/// could read as zero. The restored holder forks a child that reads its lazy memory, so faults
/// are certain.
#[test]
fn a_source_that_never_answers_faults_loses_the_link_and_the_migration() {
    let Some(mut h) = start(
        "unanswered_faults",
        &["--fault-answer-secs", "2", "--recover-timeout", "2s"],
        true,
    ) else {
        return;
    };
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let t0 = Instant::now();
    let dropped = rt.block_on(async {
        let (conn, _tx, mut rx, fconn) = h.open().await;
        // Read dst's control messages; answer nothing, keep both connections open.
        let reader = tokio::spawn(async move { while next_ctl(&mut rx).await.is_ok() {} });
        let closed = tokio::time::timeout(Duration::from_secs(40), fconn.closed()).await;
        reader.abort();
        drop(conn);
        closed.map(|e| e.to_string())
    });
    eprintln!("fault connection after {:?}: {dropped:?}", t0.elapsed());
    let (status, log) = h.dst_exit(Duration::from_secs(20));
    assert!(
        dropped
            .as_ref()
            .is_ok_and(|r| r.contains("fault requests unanswered")),
        "dst did not drop the link of a source that never answers: {dropped:?}\n{log}"
    );
    let status = status.unwrap_or_else(|| panic!("dst did not end:\n{log}"));
    assert!(!status.success(), "{log}");
    assert!(
        log.contains("--fault-answer-secs") && log.contains("recover timeout"),
        "{log}"
    );
    let restored = h.restored();
    assert!(
        restored.is_none_or(HandMade::gone),
        "a restored task waiting on unanswered faults still runs:\n{log}"
    );
    assert!(killed_some(&log), "no incomplete task was killed:\n{log}");
}
