//! The bench workload, run for real: its checks pass, catch corruption, survive churn and a
//! process tree, and survive a real CRIU dump and restore.

use pageserv_lab::workload_log::Summary;
use std::fs;
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

const WORKLOAD: &str = env!("CARGO_BIN_EXE_workload");
const PAGE: u64 = 4096;

mod support;
use support::{alive, scratch, summary, wait_for};

/// A workload process killed (SIGKILL) if the test fails before terminating it.
struct Running {
    child: Option<Child>,
}

impl Running {
    fn start(args: &[&str]) -> Self {
        let child = Command::new(WORKLOAD)
            .args(args)
            .stdin(Stdio::null())
            .spawn()
            .expect("spawning the workload");
        Running { child: Some(child) }
    }

    fn pid(&self) -> i32 {
        self.child.as_ref().unwrap().id() as i32
    }

    /// SIGTERM, then the exit status (within 20 s).
    fn terminate(mut self) -> ExitStatus {
        let mut child = self.child.take().unwrap();
        // SAFETY: signals our own child.
        unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
        let t0 = Instant::now();
        loop {
            if let Some(st) = child.try_wait().unwrap() {
                return st;
            }
            if t0.elapsed() > Duration::from_secs(20) {
                let _ = child.kill();
                panic!("workload did not exit within 20 s of SIGTERM");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

fn assert_clean(s: &Summary) {
    assert!(s.errors.is_empty(), "unparsable lines: {:?}", s.errors);
    for t in s.tags.values() {
        assert!(t.errors.is_empty(), "{}: error lines {:?}", t.tag, t.errors);
    }
    assert_eq!(s.checks_failed(), 0, "first failure: {:?}", s.first_fail());
}

#[test]
fn runs_checks_ok_and_exits_cleanly() {
    let dir = scratch("workload", "basic");
    let log = dir.join("log");
    let w = Running::start(&[
        "--mib",
        "64",
        "--threads",
        "2",
        "--write-rate",
        "20",
        "--check-every-ms",
        "300",
        "--log",
        log.to_str().unwrap(),
    ]);
    wait_for(&log, Duration::from_secs(60), "3 checks", |s| {
        s.checks_ok() >= 3
    });
    let status = w.terminate();
    let s = summary(&log);
    assert_clean(&s);
    assert!(status.success(), "exit status {status:?}");
    let r = s.tag("r").unwrap();
    let ready = r.ready.as_ref().expect("ready line");
    assert_eq!((ready.mib, ready.pages), (64, 64 * 256));
    assert!(
        r.checks.iter().all(|c| c.pages + 64 >= 64 * 256),
        "checks must cover all pages"
    );
    let exit = r.exit.as_ref().expect("exit line");
    assert_eq!(
        (exit.checks_ok as usize, exit.checks_failed),
        (r.checks_ok(), 0)
    );
    let gap = r.max_gap().unwrap();
    assert!(gap.ms < 500.0, "heartbeat gap {gap:?}");
    assert!(
        r.heartbeats.len() > 500,
        "{} heartbeats",
        r.heartbeats.len()
    );
    // 20 pages/ms requested; the debug build on a loaded 2-core host may fall somewhat short.
    let rate = r.mean_rate(ready.unix_ns, exit.unix_ns).unwrap();
    assert!((5_000.0..=22_000.0).contains(&rate), "write rate {rate}/s");
    println!(
        "max gap {:.2} ms, rate {rate:.0}/s, check {:.1} ms / 64 MiB",
        gap.ms, r.checks[0].ms
    );
}

#[test]
fn checks_stay_consistent_under_max_rate_writers() {
    let dir = scratch("workload", "max");
    let log = dir.join("log");
    let w = Running::start(&[
        "--mib",
        "16",
        "--threads",
        "2",
        "--write-rate",
        "max",
        "--check-every-ms",
        "50",
        "--log",
        log.to_str().unwrap(),
    ]);
    wait_for(&log, Duration::from_secs(60), "8 checks", |s| {
        s.checks() >= 8
    });
    let status = w.terminate();
    let s = summary(&log);
    assert_clean(&s);
    assert!(status.success(), "exit status {status:?}");
    let r = s.tag("r").unwrap();
    assert!(
        r.exit.as_ref().unwrap().writes > 10_000,
        "writers did not run flat out"
    );
}

trait Checks {
    fn checks(&self) -> usize;
}
impl Checks for Summary {
    fn checks(&self) -> usize {
        self.checks_ok() + self.checks_failed()
    }
}

/// Flips a byte of page `page` (word `word`) of process `pid` through /proc/PID/mem; returns the
/// original byte.
fn corrupt(pid: i32, s: &Summary, page: u64, word: u64, xor: u8) -> u8 {
    let r = s.tag("r").unwrap();
    let chunk = r
        .chunks
        .iter()
        .find(|c| (c.first..c.first + c.pages).contains(&page))
        .unwrap();
    let addr = chunk.addr + (page - chunk.first) * PAGE + word * 8;
    let mut mem = fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(format!("/proc/{pid}/mem"))
        .unwrap();
    let mut b = [0u8];
    mem.seek(SeekFrom::Start(addr)).unwrap();
    mem.read_exact(&mut b).unwrap();
    mem.seek(SeekFrom::Start(addr)).unwrap();
    mem.write_all(&[b[0] ^ xor]).unwrap();
    b[0]
}

#[test]
fn corruption_is_detected() {
    let dir = scratch("workload", "corrupt");
    let log = dir.join("log");
    // No writers: nothing rewrites the corrupted pages behind the test's back.
    let w = Running::start(&[
        "--mib",
        "64",
        "--write-rate",
        "0",
        "--check-every-ms",
        "200",
        "--log",
        log.to_str().unwrap(),
    ]);
    let s = wait_for(&log, Duration::from_secs(60), "a first check", |s| {
        s.checks_ok() >= 1
    });
    assert_clean(&s);

    // A payload byte of a data page.
    let original = corrupt(w.pid(), &s, 1000, 100, 0x40);
    let s = wait_for(&log, Duration::from_secs(30), "a failed check", |s| {
        s.checks_failed() >= 1
    });
    let fail = s.first_fail().unwrap().fail.clone().unwrap();
    assert_eq!(
        (fail.page, fail.reason.as_str()),
        (1000, "payload"),
        "{fail:?}"
    );
    assert!(fail.detail.starts_with("word=100 "), "{fail:?}");

    // Repaired, the checks pass again.
    corrupt(w.pid(), &s, 1000, 100, 0x40);
    let failed_so_far = s.checks_failed();
    let t_fixed = s.tag("r").unwrap().checks.last().unwrap().unix_ns;
    wait_for(
        &log,
        Duration::from_secs(30),
        "an ok check after repair",
        |s| {
            let r = s.tag("r").unwrap();
            r.checks.iter().any(|c| c.ok && c.unix_ns > t_fixed)
        },
    );
    assert_ne!(original, original ^ 0x40);

    // A page that must read zero (every 16th page starts zero).
    corrupt(w.pid(), &s, 15, 7, 0x01);
    let s = wait_for(&log, Duration::from_secs(30), "a nonzero failure", |s| {
        s.tag("r")
            .unwrap()
            .checks
            .iter()
            .any(|c| c.fail.as_ref().is_some_and(|f| f.page == 15))
    });
    let r = s.tag("r").unwrap();
    let f = r.checks.iter().rev().find_map(|c| c.fail.clone()).unwrap();
    assert_eq!(f.reason, "nonzero", "{f:?}");
    assert!(r.checks_failed() > failed_so_far);

    let status = w.terminate();
    assert_eq!(
        status.code(),
        Some(1),
        "a failed check must make the exit status 1"
    );
    let s = summary(&log);
    assert!(s.tag("r").unwrap().exit.as_ref().unwrap().checks_failed >= 2);
}

#[test]
fn children_and_churn_keep_checks_ok() {
    let dir = scratch("workload", "tree");
    let log = dir.join("log");
    let w = Running::start(&[
        "--mib",
        "32",
        "--threads",
        "2",
        "--write-rate",
        "10",
        "--children",
        "2",
        "--churn",
        "--churn-every-ms",
        "100",
        "--check-every-ms",
        "300",
        "--log",
        log.to_str().unwrap(),
    ]);
    let tags = ["r", "c1", "c2"];
    wait_for(
        &log,
        Duration::from_secs(90),
        "checks and churn in every process",
        |s| {
            tags.iter().all(|t| {
                s.tag(t).is_some_and(|t| {
                    t.checks_ok() >= 3
                        && ["fork", "dontneed", "reinit", "mremap"]
                            .iter()
                            .all(|w| t.churn_count(w, true) >= 3)
                })
            })
        },
    );
    let status = w.terminate();
    let s = summary(&log);
    assert_clean(&s);
    assert!(status.success(), "exit status {status:?}");
    let root = s.tag("r").unwrap();
    let mut reaped: Vec<(&str, i64)> = root
        .children
        .iter()
        .map(|c| (c.child.as_str(), c.status))
        .collect();
    reaped.sort();
    assert_eq!(reaped, [("c1", 0), ("c2", 0)]);
    let pids: Vec<i64> = tags
        .iter()
        .map(|t| s.tag(t).unwrap().ready.as_ref().unwrap().pid)
        .collect();
    assert!(
        pids[0] != pids[1] && pids[1] != pids[2] && pids[0] != pids[2],
        "{pids:?}"
    );
    for t in tags {
        let t = s.tag(t).unwrap();
        assert!(t.exit.is_some(), "{} has no exit line", t.tag);
        assert!(
            t.churn.iter().all(|c| c.ok),
            "{}: {:?}",
            t.tag,
            t.churn.iter().find(|c| !c.ok)
        );
        assert!(
            t.max_gap().unwrap().ms < 1000.0,
            "{}: {:?}",
            t.tag,
            t.max_gap()
        );
    }
}

// ---------------------------------------------------------------------------------------------
// Real CRIU.

fn criu_path() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("PAGESERV_CRIU") {
        return Some(PathBuf::from(p));
    }
    let installed = PathBuf::from("/opt/pageserv/criu/bin/criu");
    if installed.exists() {
        return Some(installed);
    }
    let on_path = std::env::var_os("PATH")?;
    std::env::split_paths(&on_path)
        .map(|d| d.join("criu"))
        .find(|p| p.exists())
}

fn unix_ns_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos() as u64
}

fn run_criu(criu: &Path, args: &[&str], dir: &Path, log_name: &str) {
    let out = Command::new(criu)
        .args(args)
        .output()
        .expect("running criu");
    if !out.status.success() {
        let log = fs::read_to_string(dir.join(log_name)).unwrap_or_default();
        let tail: Vec<&str> = log
            .lines()
            .rev()
            .take(40)
            .collect::<Vec<_>>()
            .into_iter()
            .rev()
            .collect();
        panic!(
            "criu {args:?} failed: {:?}\nstderr: {}\n{log_name} tail:\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr),
            tail.join("\n")
        );
    }
}

/// What a dump/restore round trip observed.
struct RoundTrip {
    summary: Summary,
    dump_start: u64,
    dump_end: u64,
    restore_start: u64,
    restore_end: u64,
}

/// Runs the workload with `args` as init of its own pid namespace, dumps it with CRIU, restores
/// it (same host), waits until every process in `tags` has run >= 3 s and passed >= `checks`
/// checks after the restore, then SIGTERMs it and waits for its exit lines. None if CRIU or
/// root is missing.
fn criu_round_trip(name: &str, args: &[&str], tags: &[&str], checks: usize) -> Option<RoundTrip> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        println!("SKIP {name}: needs root for CRIU");
        return None;
    }
    let Some(criu) = criu_path() else {
        println!("SKIP {name}: no CRIU ($PAGESERV_CRIU, /opt/pageserv/criu/bin/criu, PATH)");
        return None;
    };
    let dir = scratch("workload", name);
    let images = dir.join("images");
    fs::create_dir_all(&images).unwrap();
    let log = dir.join("log");

    // Init of its own pid namespace, so that its pids are free again at restore on this host.
    // Not --mount-proc: that adds a mount namespace, which CRIU must then dump, and it refuses
    // this host's mounts ("./run/netns/... doesn't have a proper root mount").
    let mut unshare = Command::new("unshare")
        .args(["-p", "-f", "setsid", WORKLOAD])
        .args(args)
        .args(["--log", log.to_str().unwrap()])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawning unshare");
    let s = wait_for(
        &log,
        Duration::from_secs(60),
        "ready and a check everywhere",
        |s| {
            tags.iter().all(|t| {
                s.tag(t)
                    .is_some_and(|t| t.ready.is_some() && t.checks_ok() >= 1)
            })
        },
    );
    assert_eq!(
        s.tag("r").unwrap().ready.as_ref().unwrap().pid,
        1,
        "the workload must be the namespace's init"
    );
    // The workload is unshare's only child (setsid execs in place: it is not a group leader).
    let children =
        fs::read_to_string(format!("/proc/{0}/task/{0}/children", unshare.id())).unwrap();
    let pid: i32 = children
        .split_whitespace()
        .next()
        .expect("unshare has no child")
        .parse()
        .unwrap();
    let mut kill_guard = KillOnDrop(pid);

    std::thread::sleep(Duration::from_secs(1));
    let dump_start = unix_ns_now();
    let images_arg = images.to_str().unwrap();
    run_criu(
        &criu,
        &[
            "dump",
            "-t",
            &pid.to_string(),
            "-D",
            images_arg,
            "-o",
            "dump.log",
            "-v4",
        ],
        &images,
        "dump.log",
    );
    let dump_end = unix_ns_now();
    // The dump killed the workload (pid 1 of the namespace), so unshare ends too; from now on
    // its pid may be reused: stop guarding it.
    kill_guard.disarm();
    let _ = unshare.wait();
    std::thread::sleep(Duration::from_millis(500));

    let restore_start = unix_ns_now();
    let pidfile = dir.join("restored.pid");
    let pidfile_arg = pidfile.to_str().unwrap();
    run_criu(
        &criu,
        &[
            "restore",
            "-D",
            images_arg,
            "-d",
            "--pidfile",
            pidfile_arg,
            "-o",
            "restore.log",
            "-v4",
        ],
        &images,
        "restore.log",
    );
    let restore_end = unix_ns_now();
    let restored: i32 = fs::read_to_string(&pidfile)
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    let _kill_restored = KillOnDrop(restored);
    assert!(
        alive(restored),
        "restored workload {restored} is not running"
    );

    wait_for(
        &log,
        Duration::from_secs(60),
        "3 s of checks after restore",
        |s| {
            s.checks_failed() > 0
                || tags.iter().all(|t| {
                    let t = s.tag(t).unwrap();
                    t.checks_between(restore_end, u64::MAX).0 >= checks
                        && t.heartbeats
                            .last()
                            .is_some_and(|h| h.unix_ns > restore_end + 3_000_000_000)
                })
        },
    );
    // SAFETY: signals the process CRIU restored for us.
    unsafe { libc::kill(restored, libc::SIGTERM) };
    let summary = wait_for(&log, Duration::from_secs(20), "the exit lines", |s| {
        tags.iter().all(|t| s.tag(t).unwrap().exit.is_some())
    });
    Some(RoundTrip {
        summary,
        dump_start,
        dump_end,
        restore_start,
        restore_end,
    })
}

/// Asserts that process `tag` ran through the round trip: its largest heartbeat gap is the
/// dump→restore window, and after the restore it writes, beats and checks normally.
fn assert_survived(rt: &RoundTrip, tag: &str) {
    let r = rt.summary.tag(tag).unwrap();
    let gap = r.max_gap().unwrap();
    assert!(
        gap.from_ns <= rt.dump_end && gap.to_ns >= rt.restore_start,
        "{tag}: max gap {gap:?} must span dump end {} .. restore start {}",
        rt.dump_end,
        rt.restore_start
    );
    assert!(
        gap.from_ns + 1_000_000_000 >= rt.dump_start,
        "{tag}: gap starts long before the dump: {gap:?}"
    );
    let after = r
        .max_gap_between(rt.restore_end + 500_000_000, u64::MAX)
        .unwrap();
    assert!(
        after.ms < 500.0,
        "{tag}: heartbeats after restore have a gap of {after:?}"
    );
    let first_after = r
        .heartbeats
        .iter()
        .find(|h| h.unix_ns >= rt.restore_start)
        .unwrap();
    assert!(
        r.heartbeats.last().unwrap().writes > first_after.writes,
        "{tag}: no writes after restore"
    );
    let exit = r.exit.as_ref().unwrap();
    assert_eq!(
        (exit.checks_failed, exit.churn_failed),
        (0, 0),
        "{tag}: {exit:?}"
    );
    println!(
        "{tag}: downtime {:.1} ms (dump {:.1} ms, restore {:.1} ms), {} checks ok after restore",
        gap.ms,
        (rt.dump_end - rt.dump_start) as f64 / 1e6,
        (rt.restore_end - rt.restore_start) as f64 / 1e6,
        r.checks_between(rt.restore_end, u64::MAX).0
    );
}

#[test]
fn survives_criu_dump_and_restore() {
    let args = [
        "--mib",
        "128",
        "--threads",
        "2",
        "--write-rate",
        "10",
        "--check-every-ms",
        "500",
    ];
    let Some(rt) = criu_round_trip("criu", &args, &["r"], 5) else {
        return;
    };
    assert_clean(&rt.summary);
    assert_survived(&rt, "r");
}

#[test]
fn process_tree_with_churn_survives_criu_dump_and_restore() {
    // Copy-on-write children (memory shared with the root at fork) are the harder case for CRIU.
    let args = [
        "--mib",
        "32",
        "--threads",
        "2",
        "--write-rate",
        "5",
        "--check-every-ms",
        "500",
        "--children",
        "2",
        "--cow-children",
        "--churn",
    ];
    let tags = ["r", "c1", "c2"];
    let Some(rt) = criu_round_trip("criu-tree", &args, &tags, 5) else {
        return;
    };
    assert_clean(&rt.summary);
    for tag in tags {
        assert_survived(&rt, tag);
        let t = rt.summary.tag(tag).unwrap();
        for what in ["fork", "dontneed", "reinit", "mremap"] {
            let after = t
                .churn
                .iter()
                .filter(|c| c.what == what && c.unix_ns > Some(rt.restore_end))
                .count();
            assert!(after >= 5, "{tag}: only {after} churn {what} after restore");
        }
    }
}

/// SIGKILLs a process (not our child) when the test ends, if it still runs.
struct KillOnDrop(i32);

impl KillOnDrop {
    fn disarm(&mut self) {
        self.0 = 0;
    }
}

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        if self.0 > 0 && alive(self.0) {
            // SAFETY: a process this test started (directly or through CRIU).
            unsafe { libc::kill(self.0, libc::SIGKILL) };
        }
    }
}
