//! A certified but hostile source against the real `pageserv dst` over real QUIC with mutual
//! TLS: oversized images are refused at the announced size with an error naming the limit and
//! its flag (and the work directory is kept and named), and a source that goes idle gives up its
//! `--max-concurrent` slot after `--receive-idle-secs`. The limits: `pageserv::limits`, README
//! "Limits". Needs no root: dst only listens and writes images (no restore starts).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant, SystemTime};

use pageserv::keys::{self, Identity};
use pageserv::pb::pageserv::control::Msg;
use pageserv::protocol::{self, Role, connect_control, next_ctl, send_ctl};
use pageserv::transport::{FrameReceiver, FrameSender, TransportOptions};

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

struct Setup {
    dir: PathBuf,
    src: Identity,
    addr: SocketAddr,
    dst: Dst,
}

fn setup(tag: &str, extra: &[&str]) -> Option<Setup> {
    if pageserv::criu::binary::Criu::locate(None).is_err() {
        eprintln!("SKIP: pageserv dst needs CRIU to start (tools/setup)");
        return None;
    }
    let dir = std::env::temp_dir().join(format!("pageserv-hostile-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("test directory");
    let (src_certs, dst_certs) = keys::demo_identities(&dir.join("keys")).expect("certificates");
    let port = std::net::UdpSocket::bind("127.0.0.1:0")
        .and_then(|s| s.local_addr())
        .expect("a free port")
        .port();
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse().expect("addr");
    let dst = Dst(Command::new(pageserv())
        .args(["dst", "--listen", &addr.to_string(), "--certs"])
        .arg(&dst_certs)
        .arg("--work")
        .arg(dir.join("work"))
        .args(extra)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(dir.join("dst.log")).expect("dst log"))
        .spawn()
        .expect("start pageserv dst"));
    let src = Identity::load(&src_certs).expect("source identity");
    Some(Setup {
        dir,
        src,
        addr,
        dst,
    })
}

/// A source's two connections, as pageserv src opens them: control with hello "src", dst's
/// answer, then (if dst took it) the fault connection with hello "src-faults" at the fault
/// endpoint the answer names. Returns dst's answer.
async fn open_migration(
    s: &Setup,
    id: &str,
) -> (
    quinn::Connection,
    FrameSender,
    FrameReceiver,
    Msg,
    Option<quinn::Connection>,
) {
    let opts = TransportOptions::default();
    let deadline = Instant::now() + Duration::from_secs(20);
    let (conn, mut tx, mut rx) = loop {
        match connect_control(&s.src, s.addr, "dst", &opts).await {
            Ok(c) => break c,
            Err(e) if Instant::now() < deadline => {
                eprintln!("dst not up yet: {e:#}");
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            Err(e) => panic!("pageserv dst did not come up: {e:#}"),
        }
    };
    send_ctl(
        &mut tx,
        Msg::Hello(protocol::hello(Role::Src, "4.2.1".into(), id.into())),
    )
    .await
    .expect("hello");
    let answer = tokio::time::timeout(Duration::from_secs(10), next_ctl(&mut rx))
        .await
        .expect("dst answered within 10 s")
        .expect("dst's answer");
    let Msg::Hello(h) = &answer else {
        return (conn, tx, rx, answer, None);
    };
    let (fconn, mut ftx, _frx) =
        connect_control(&s.src, protocol::fault_addr(s.addr, h), "dst", &opts)
            .await
            .expect("fault connection");
    send_ctl(
        &mut ftx,
        Msg::Hello(protocol::hello(Role::SrcFaults, "4.2.1".into(), id.into())),
    )
    .await
    .expect("fault hello");
    (conn, tx, rx, answer, Some(fconn))
}

fn dst_log(s: &Setup) -> String {
    std::fs::read_to_string(s.dir.join("dst.log")).unwrap_or_default()
}

fn wait_exit(dst: &mut Dst, within: Duration) -> Option<std::process::ExitStatus> {
    let deadline = Instant::now() + within;
    while Instant::now() < deadline {
        if let Ok(Some(st)) = dst.0.try_wait() {
            return Some(st);
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    None
}

/// Files (recursively) under `dir`.
fn files_under(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    if let Ok(rd) = std::fs::read_dir(dir) {
        for e in rd.flatten() {
            let p = e.path();
            if p.is_dir() {
                out.extend(files_under(&p));
            } else {
                out.push(p);
            }
        }
    }
    out
}

#[test]
fn oversized_images_are_refused_at_the_announced_size() {
    let Some(mut s) = setup("images", &["--max-images-mib", "1"]) else {
        return;
    };
    // A 2 MiB "image" set: over the 1 MiB limit.
    let images = s.dir.join("src-images");
    std::fs::create_dir_all(&images).unwrap();
    std::fs::write(images.join("pstree.img"), vec![7u8; 2 << 20]).unwrap();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let (reason, closed) = rt.block_on(async {
        let (conn, mut tx, mut rx, answer, _f) = open_migration(&s, "0123456789abcdef").await;
        assert!(
            matches!(answer, Msg::Hello(_)),
            "dst refused the hello: {answer:?}"
        );
        // Ship as pageserv src does: the plan, the chunks, ImagesDone. dst refuses at the plan;
        // the chunks may or may not get through before it closes.
        let shipped =
            protocol::images::ship_images(&mut tx, &images, SystemTime::now(), Vec::new(), || {})
                .await;
        eprintln!("shipping: {:?}", shipped.map_err(|e| format!("{e:#}")));
        let reason = match tokio::time::timeout(Duration::from_secs(10), next_ctl(&mut rx)).await {
            Ok(Ok(Msg::Abort(a))) => a.reason,
            other => panic!("expected an Abort, got {other:?}"),
        };
        (reason, conn.closed().await)
    });
    eprintln!("dst aborted: {reason}\nclosed: {closed}");
    assert!(
        reason.contains("--max-images-mib") && reason.contains("1 MiB") && reason.contains("2 MiB"),
        "{reason}"
    );
    let status = wait_exit(&mut s.dst, Duration::from_secs(15)).expect("dst exits");
    assert!(!status.success(), "a refused migration is not a success");
    let err = dst_log(&s);
    // The migration's directory is kept and named; no image byte was written.
    let work = s.dir.join("work");
    let kept: Vec<PathBuf> = std::fs::read_dir(&work)
        .expect("the work base exists")
        .flatten()
        .map(|e| e.path())
        .collect();
    assert_eq!(kept.len(), 1, "{kept:?}");
    assert!(
        err.contains(&kept[0].display().to_string()) && err.contains("kept"),
        "{err}"
    );
    let written = files_under(&kept[0].join("images"));
    assert!(written.is_empty(), "image files written: {written:?}");
    let _ = std::fs::remove_dir_all(&s.dir);
}

#[test]
fn an_idle_source_gives_up_its_slot_after_the_receive_idle_limit() {
    let Some(mut s) = setup(
        "idle",
        &[
            "--keep-serving",
            "--max-concurrent",
            "1",
            "--receive-idle-secs",
            "2",
        ],
    ) else {
        return;
    };
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        // The idler: opens a migration, then sends nothing.
        let (idle_conn, _tx, mut idle_rx, answer, _f) =
            open_migration(&s, "1111111111111111").await;
        assert!(matches!(answer, Msg::Hello(_)), "{answer:?}");
        // While it holds the only slot, another source is refused as busy.
        let (_c, _t, _r, busy, _f2) = open_migration(&s, "2222222222222222").await;
        match busy {
            Msg::Abort(a) => assert!(a.reason.contains("busy"), "{}", a.reason),
            other => panic!("a second source was taken while the slot was held: {other:?}"),
        }
        // After the idle limit the idler is told why, and its slot is free again.
        let t0 = Instant::now();
        let told = tokio::time::timeout(Duration::from_secs(10), next_ctl(&mut idle_rx)).await;
        eprintln!("idler told after {:?}: {told:?}", t0.elapsed());
        match told {
            Ok(Ok(Msg::Abort(a))) => assert!(
                a.reason.contains("--receive-idle-secs") && a.reason.contains("2 s"),
                "{}",
                a.reason
            ),
            other => panic!("the idle source was not told within 10 s: {other:?}"),
        }
        let _ = tokio::time::timeout(Duration::from_secs(5), idle_conn.closed()).await;
        tokio::time::sleep(Duration::from_millis(300)).await;
        let (_c, _t, _r, third, _f3) = open_migration(&s, "3333333333333333").await;
        assert!(
            matches!(third, Msg::Hello(_)),
            "the slot was not freed: {third:?}"
        );
    });
    assert!(
        s.dst.0.try_wait().unwrap().is_none(),
        "dst --keep-serving exited"
    );
    let _ = s.dst.0.kill();
    let err = dst_log(&s);
    assert!(err.contains("--receive-idle-secs"), "{err}");
    let _ = std::fs::remove_dir_all(&s.dir);
}

/// The migration's own source opens fault connection after fault connection while dst is still
/// receiving its images (when no connection is taken from the migration's queue): past
/// `pageserv::limits::MAX_ROUTED_WAITING` waiting, each further one is closed with a reason
/// naming the limit instead of being queued without bound; the migration itself goes on.
#[test]
fn extra_routed_connections_past_the_queue_limit_are_refused() {
    let Some(s) = setup("routed", &["--receive-idle-secs", "30"]) else {
        return;
    };
    let limit = pageserv::limits::MAX_ROUTED_WAITING;
    let rt = tokio::runtime::Runtime::new().unwrap();
    let (closed, open, ctl_open) = rt.block_on(async {
        let mid = "4444444444444444";
        let (ctl, _tx, _rx, answer, first) = open_migration(&s, mid).await;
        let Msg::Hello(h) = &answer else {
            panic!("dst refused the hello: {answer:?}")
        };
        assert!(first.is_some());
        // The migration takes its fault connection first.
        tokio::time::sleep(Duration::from_millis(500)).await;
        let opts = TransportOptions::default();
        let mut extra = Vec::new();
        for _ in 0..limit + 3 {
            let (c, mut tx, _rx) =
                connect_control(&s.src, protocol::fault_addr(s.addr, h), "dst", &opts)
                    .await
                    .expect("fault connection");
            send_ctl(
                &mut tx,
                Msg::Hello(protocol::hello(Role::SrcFaults, "4.2.1".into(), mid.into())),
            )
            .await
            .expect("fault hello");
            extra.push((c, tx));
        }
        tokio::time::sleep(Duration::from_millis(1500)).await;
        let mut closed = Vec::new();
        let mut open = 0;
        for (c, _) in &extra {
            match c.close_reason() {
                Some(r) => closed.push(r.to_string()),
                None => open += 1,
            }
        }
        (closed, open, ctl.close_reason().is_none())
    });
    eprintln!("closed: {closed:?}; open: {open}");
    assert_eq!(open, limit, "connections left waiting: {open}");
    assert_eq!(closed.len(), 3, "{closed:?}");
    assert!(
        closed
            .iter()
            .all(|r| r.contains("connections waiting already")),
        "{closed:?}"
    );
    assert!(ctl_open, "the migration's control connection was closed");
    let err = dst_log(&s);
    assert!(
        err.contains("over the limit of 8") && err.contains("fixed"),
        "{err}"
    );
    let _ = std::fs::remove_dir_all(&s.dir);
}
