//! Issue 16, finding 5: a dst killed right after a post-restore fork leaves no child reading
//! zeros. Real CRIU (a lazy dump of a holder process in its own pid namespace), the real
//! `pageserv src --lazy --pid` (background push held back, so the memory stays lazy) and the
//! real `pageserv dst` restoring it on loopback. Once restored, the holder forks a child that
//! waits a moment and then reads every pattern page of its (still lazy) memory, checking each
//! against the pattern. `pageserv dst` is SIGKILLed as soon as the child exists, which is while
//! its fault loop holds the child's uffd and has not yet handed it to the uffd keeper (a lab
//! pause makes that window 2 s long; unpaused it is microseconds, and CI once hit it). dst's
//! table guard shares its descriptor table, so the uffd is not closed with dst and reaches the
//! keeper: the child's reads wait, and either the keeper kills the tree at `--recover-timeout`
//! (nothing read zeros), or a dst restarted on the same `--work` adopts it and the child reads
//! correct bytes. Needs root and CRIU; skips otherwise.

#[path = "common/criu.rs"]
mod criu;
#[path = "common/holder.rs"]
mod holder;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

#[test]
fn memory_holder() {
    holder::run_if_requested();
}

fn alive(pid: i32) -> bool {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    !stat.is_empty() && !stat.contains(") Z ")
}

fn kill(pid: i32) {
    let _ = nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid),
        nix::sys::signal::Signal::SIGKILL,
    );
}

/// The children of every thread of `pid`.
fn children(pid: i32) -> Vec<i32> {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return Vec::new();
    };
    tasks
        .flatten()
        .filter_map(|t| std::fs::read_to_string(t.path().join("children")).ok())
        .flat_map(|s| {
            s.split_whitespace()
                .filter_map(|p| p.parse().ok())
                .collect::<Vec<i32>>()
        })
        .collect()
}

/// `pageserv dst` on `addr` with `--work work`, logging to `log`.
fn start_dst(
    c: &criu::Criu,
    certs: &Path,
    addr: &str,
    work: &Path,
    log: &Path,
    recover_timeout: &str,
    pause: bool,
) -> Child {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_pageserv"));
    if pause {
        // The fault loop holds a fork child's uffd this long before it hands it to the
        // keeper: the kill lands inside that window every time.
        cmd.env(pageserv::child::LAB_ENV, "1").env(
            pageserv::dst::uffd_loop::FORK_HANDOVER_PAUSE_ENV,
            FORK_HANDOVER_PAUSE_MS,
        );
    }
    let child = cmd
        .args(["dst", "--listen", addr, "--certs"])
        .arg(certs)
        .arg("--work")
        .arg(work)
        .arg("--criu")
        .arg(&c.bin)
        .args(["--recover-timeout", recover_timeout])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(log).expect("dst log"))
        .spawn()
        .expect("start pageserv dst");
    criu::wait_for(Duration::from_secs(20), "pageserv dst ready", || {
        std::fs::read_to_string(log).is_ok_and(|l| l.contains("pageserv dst ready"))
    })
    .unwrap_or_else(|e| panic!("{e}: {}", std::fs::read_to_string(log).unwrap_or_default()));
    child
}

/// dst's recover timeout: how long its keeper holds the restored tasks after dst died.
const RECOVER_TIMEOUT: &str = "3s";

/// How long dst's fault loop waits between reading a fork event and handing the child's uffd
/// to the keeper: only the table guard (dst::uffd_keeper::table_guard) saves a child whose dst
/// is killed in that window.
const FORK_HANDOVER_PAUSE_MS: &str = "2000";

/// What the table guard logs when it sent a dead dst's uffds to the keeper.
const GUARD_SENT: &str = "went to the uffd keeper";

/// The restored root's host pid (dst's pidfile in its migration directory).
fn restored_root(work: &Path) -> Option<i32> {
    std::fs::read_dir(work).ok()?.flatten().find_map(|e| {
        std::fs::read_to_string(e.path().join("work").join("restore.pid"))
            .ok()
            .and_then(|t| t.trim().parse().ok())
    })
}

/// What happened after dst was killed.
struct Run {
    /// The forked child's verdict, if it wrote one.
    verdict: Option<String>,
    child: i32,
    root: i32,
    dst_log: String,
    src: Option<std::process::ExitStatus>,
    dst2: Option<std::process::ExitStatus>,
    /// With a restart: what the restarted dst answered a resume of this migration from another
    /// source certificate of the same CA (sent before the real source came back).
    foreign_resume: Option<String>,
    dst2_log: String,
}

/// Migrates a fork-after-restore holder, kills dst as soon as the child exists, then (with
/// `restart`) starts a dst again on the same `--work` 500 ms later; waits until the child has
/// either written its verdict or is gone.
fn fork_then_kill_dst(tag: &str, restart: bool, pause: bool) -> Option<Run> {
    let c = criu::require(tag)?;
    criu::ensure_pipe_max_size().expect("pipe-max-size");
    let scratch = criu::TestDir::new(tag);
    let trigger = scratch.path().join("fork.trigger");
    let trigger_s = trigger.to_str().expect("utf-8 scratch").to_string();
    let mut holder = holder::spawn_with(
        "memory_holder",
        scratch.path(),
        &[(holder::FORK_ENV, trigger_s.as_str())],
    )
    .expect("holder");
    let (src_certs, dst_certs) =
        pageserv::keys::demo_identities(&scratch.sub("keys")).expect("certificates");
    let port = std::net::UdpSocket::bind("127.0.0.1:0")
        .and_then(|s| s.local_addr())
        .expect("a free port")
        .port();
    let addr = format!("127.0.0.1:{port}");
    let dst_work = scratch.sub("dst");
    let dst_log = scratch.path().join("dst.log");
    let mut dst = start_dst(
        &c,
        &dst_certs,
        &addr,
        &dst_work,
        &dst_log,
        RECOVER_TIMEOUT,
        pause,
    );
    let src_log = scratch.path().join("src.log");
    let mut src = Command::new(env!("CARGO_BIN_EXE_pageserv"))
        .env(pageserv::child::LAB_ENV, "1")
        .args([
            "src",
            "--lazy",
            "--to",
            &addr,
            "--dst-name",
            "dst",
            "--certs",
        ])
        .arg(&src_certs)
        .arg("--work")
        .arg(scratch.sub("src"))
        .arg("--criu")
        .arg(&c.bin)
        .args(["--pid", &holder.proc.pid.to_string()])
        // Only faults are served for a while: the child's pages are still lazy at the kill.
        .args(["--push-after", "20s", "--idle-timeout", "3s"])
        .args(["--recover-timeout", if restart { "60s" } else { "5s" }])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&src_log).expect("src log"))
        .spawn()
        .expect("start pageserv src");

    let mut root = None;
    criu::wait_for(Duration::from_secs(60), "the restore", || {
        root = restored_root(&dst_work);
        root.is_some() || dst.try_wait().ok().flatten().is_some()
    })
    .unwrap_or_else(|e| panic!("{e}\n{}", std::fs::read_to_string(&dst_log).unwrap()));
    let root = root.unwrap_or_else(|| {
        panic!(
            "dst ended before restoring:\n{}\n{}",
            std::fs::read_to_string(&dst_log).unwrap_or_default(),
            std::fs::read_to_string(&src_log).unwrap_or_default()
        )
    });
    // Only the restored copy sees this (the source stays frozen from the dump on).
    std::fs::write(&trigger, b"fork").expect("trigger");
    let t0 = Instant::now();
    let child = loop {
        if let Some(&p) = children(root).first() {
            break p;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(30),
            "the restored holder never forked:\n{}",
            std::fs::read_to_string(&dst_log).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(1));
    };
    let _ = dst.kill();
    let _ = dst.wait();
    let killed_after = t0.elapsed();
    let result = holder::fork_result(&trigger);
    assert!(
        !result.exists(),
        "the child read before dst was killed: the test proves nothing"
    );
    eprintln!("fork seen and dst SIGKILLed {killed_after:?} after the trigger");

    let (mut dst2, dst2_log) = if restart {
        std::thread::sleep(Duration::from_millis(500));
        let log = scratch.path().join("dst2.log");
        // This one waits long enough for src to notice the dead link and reconnect.
        let dst2 = start_dst(&c, &dst_certs, &addr, &dst_work, &log, "60s", false);
        (Some(dst2), log)
    } else {
        (None, PathBuf::new())
    };
    // src notices the dead link only after its idle timeout: meanwhile another source
    // certificate tries to resume the adopted migration.
    let foreign_resume =
        restart.then(|| foreign_resume(scratch.path(), &addr, &scratch.path().join("src")));
    // The child reads once its delay is over: wait for its verdict or its end.
    let _ = criu::wait_for(
        Duration::from_secs(60),
        "the child's verdict or end",
        || result.exists() || !alive(child),
    );
    // A verdict is written in one write(2); give it a moment to land after the exit.
    std::thread::sleep(Duration::from_millis(50));
    let verdict = std::fs::read_to_string(&result).ok();
    let src_status = {
        let end = Instant::now() + Duration::from_secs(if restart { 90 } else { 30 });
        loop {
            if let Ok(Some(st)) = src.try_wait() {
                break Some(st);
            }
            if Instant::now() > end {
                break None;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    };
    let dst2_status = dst2.as_mut().and_then(|d| {
        let end = Instant::now() + Duration::from_secs(30);
        loop {
            if let Ok(Some(st)) = d.try_wait() {
                break Some(st);
            }
            if Instant::now() > end {
                break None;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    });
    let run = Run {
        verdict,
        child,
        root,
        dst_log: std::fs::read_to_string(&dst_log).unwrap_or_default(),
        src: src_status,
        dst2: dst2_status,
        dst2_log: std::fs::read_to_string(&dst2_log).unwrap_or_default(),
        foreign_resume,
    };
    // Cleanup: the restored tree (a pid namespace: its init takes it down), whatever of ours
    // still runs, the dump a keeper holds frozen past src's end (dst killed, no restart: the
    // failure rule keeps the source frozen), and the source tree.
    kill(root);
    for p in [Some(&mut src), dst2.as_mut()].into_iter().flatten() {
        let _ = p.kill();
        let _ = p.wait();
    }
    end_frozen_dumps(&scratch.sub("src"));
    holder.proc.kill();
    eprintln!(
        "src log:\n{}",
        std::fs::read_to_string(&src_log).unwrap_or_default()
    );
    Some(run)
}

/// Ends every dump a keeper still holds frozen under the source work directory `src_work` (CRIU
/// then kills the source tree), so neither the keeper nor `criu dump` outlives the test.
fn end_frozen_dumps(src_work: &Path) {
    let dirs = std::fs::read_dir(src_work).into_iter().flatten().flatten();
    for dir in dirs.map(|e| e.path()) {
        if dir.join(pageserv::source::keeper::KEEPER_SOCKET).exists()
            && let Err(e) = pageserv::source::keeper::settle_frozen(&dir, false)
        {
            eprintln!("could not end the frozen dump in {}: {e}", dir.display());
        }
    }
}

/// Resumes the migration whose id src recorded under `src_work` from a second source
/// certificate of the demo CA in `scratch/keys`, and returns what dst answered.
fn foreign_resume(scratch: &Path, addr: &str, src_work: &Path) -> String {
    use pageserv::pb::pageserv::control::Msg;
    use pageserv::protocol::{self, Role};
    let keys = scratch.join("keys");
    pageserv::keys::issue_names(
        &keys.join("ca"),
        &["src-b".to_string()],
        &[pageserv::keys::Role::Source],
        &keys.join("src-b"),
    )
    .expect("a second source certificate");
    let other = pageserv::keys::Identity::load(&keys.join("src-b")).expect("src-b");
    let mid = std::fs::read_dir(src_work)
        .expect("src's work directory")
        .flatten()
        .find_map(|e| std::fs::read_to_string(e.path().join("migration-id")).ok())
        .expect("src recorded the migration id");
    let addr: std::net::SocketAddr = addr.parse().expect("addr");
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    rt.block_on(async {
        let opts = pageserv::transport::TransportOptions::default();
        let (_conn, mut tx, mut rx) = protocol::connect_control(&other, addr, "dst", &opts)
            .await
            .expect("src-b is admitted (any source of the CA is)");
        protocol::send_ctl(
            &mut tx,
            Msg::Hello(protocol::hello(
                Role::SrcResume,
                "4.2.1".into(),
                mid.trim().into(),
            )),
        )
        .await
        .expect("resume hello");
        match tokio::time::timeout(Duration::from_secs(5), protocol::next_ctl(&mut rx)).await {
            Ok(Ok(Msg::Abort(a))) => format!("Abort: {}", a.reason),
            other => format!("{other:?}"),
        }
    })
}

/// `log` without its terminal colours.
fn plain(log: &str) -> String {
    let mut out = String::with_capacity(log.len());
    let mut chars = log.chars();
    while let Some(c) = chars.next() {
        if c == '\x1b' {
            for c in chars.by_ref() {
                if c == 'm' {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// Nobody adopts: the keeper holds the child's uffd, the child's reads wait, and at dst's
/// recover timeout the keeper kills the restored root and the child. No zero is ever read.
#[test]
fn a_dst_killed_after_a_post_restore_fork_leaves_no_child_reading_zeros() {
    let Some(run) = fork_then_kill_dst("fork-kill", false, true) else {
        return;
    };
    assert!(
        !run.verdict.as_deref().unwrap_or("").starts_with("bad"),
        "the forked child read wrong bytes after dst died: {:?}\n{}",
        run.verdict,
        run.dst_log
    );
    assert_eq!(
        run.verdict, None,
        "the child got its memory though no dst was left"
    );
    assert!(
        run.dst_log.contains(GUARD_SENT),
        "the table guard did not hand the dead dst's uffds to the keeper:\n{}",
        run.dst_log
    );
    assert!(!alive(run.child), "the forked child still runs");
    assert!(!alive(run.root), "the restored root still runs");
    assert!(
        run.src.is_some_and(|s| !s.success()),
        "src: {:?} (the migration cannot have succeeded)",
        run.src
    );
}

/// Killed inside the window, a dst restarted on the same `--work` adopts the restored root and
/// the forked child (whose uffd only the table guard got to the keeper) from the keeper; a resume from another source certificate of the CA is refused (the adopted migration
/// is still bound to the certificate that opened it, recorded in its directory); src resumes
/// into it and the child reads every page right.
#[test]
fn a_dst_restarted_after_a_post_restore_fork_serves_the_child() {
    restarted_dst_serves_the_child("fork-adopt", true);
}

/// The same with no pause: the fault loop handed the child's uffd to the keeper itself, as it
/// read the fork event, before the kill.
#[test]
fn a_dst_restarted_after_a_post_restore_fork_it_handed_over_serves_the_child() {
    restarted_dst_serves_the_child("fork-adopt-own", false);
}

fn restarted_dst_serves_the_child(tag: &str, pause: bool) {
    let Some(run) = fork_then_kill_dst(tag, true, pause) else {
        return;
    };
    assert_eq!(
        run.verdict.as_deref(),
        Some("ok\n"),
        "the forked child did not read its memory right\n--- dst ---\n{}\n--- dst2 ---\n{}",
        run.dst_log,
        run.dst2_log
    );
    assert!(
        !pause || run.dst_log.contains(GUARD_SENT),
        "the table guard did not hand the dead dst's uffds to the keeper:\n{}",
        run.dst_log
    );
    // The restored task's and the child's, once each: a guard that sends (always when paused)
    // sends the task's uffd again with the child's, and the keeper keeps one copy of it.
    let log = plain(&run.dst2_log);
    let adopted = log
        .lines()
        .find(|l| l.contains("adopted the restored tasks"));
    assert!(
        adopted.is_some_and(|l| l.contains("uffds=2")),
        "not the task and its child alone: {adopted:?}\n{log}"
    );
    // The adopted migration stays bound to the certificate that opened it.
    let foreign = run.foreign_resume.as_deref().unwrap_or("");
    assert!(
        foreign.starts_with("Abort") && foreign.contains("another certificate"),
        "a resume from another source certificate was not refused: {foreign}\n{}",
        run.dst2_log
    );
    assert!(run.src.is_some_and(|s| s.success()), "src: {:?}", run.src);
    assert!(
        run.dst2.is_some_and(|s| s.success()),
        "dst2: {:?}\n{}",
        run.dst2,
        run.dst2_log
    );
}
