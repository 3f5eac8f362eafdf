//! The workload's heartbeat reads (`--hb-reads`), run for real: they spot-check what they read
//! (a corrupted page is reported as a failed check), and at a post-copy destination they fault
//! through userfaultfd like writes do, so a workload with no writes still feels the post-copy.

use pageserv_lab::workload_log::Summary;
use std::fs;
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const WORKLOAD: &str = env!("CARGO_BIN_EXE_workload");
const PAGE: u64 = 4096;

mod support;
use support::{Scratch, alive, scratch, summary, wait_for};

/// SIGKILLs a process this test started (directly or through CRIU) when the test ends.
struct KillOnDrop(i32);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        if self.0 > 0 && alive(self.0) {
            // SAFETY: a process this test started.
            unsafe { libc::kill(self.0, libc::SIGKILL) };
        }
    }
}

/// A child process killed and reaped if the test ends before it exits.
struct Reaped(Option<Child>);

impl Reaped {
    /// Waits up to `within` for the exit; panics with `log`'s tail if it fails or hangs.
    fn wait(mut self, what: &str, within: Duration, log: &Path) {
        let mut child = self.0.take().unwrap();
        let t0 = Instant::now();
        let st = loop {
            if let Some(st) = child.try_wait().unwrap() {
                break st;
            }
            if t0.elapsed() > within {
                let _ = child.kill();
                let _ = child.wait();
                panic!("{what} did not exit within {within:?}\n{}", tail(log));
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        assert!(st.success(), "{what} failed: {st:?}\n{}", tail(log));
    }
}

impl Drop for Reaped {
    fn drop(&mut self) {
        if let Some(mut c) = self.0.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

fn tail(log: &Path) -> String {
    let text = fs::read_to_string(log).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(30)..].join("\n")
}

#[test]
fn heartbeat_reads_report_a_corrupted_page() {
    let dir = scratch("reads", "corrupt");
    let log = dir.join("log");
    // 1 MiB (256 pages) read at 200 pages per beat and nothing else touching memory (no
    // writers, no full checks): only the heartbeat's reads can see the corruption.
    let mut w = Command::new(WORKLOAD)
        .args([
            "--mib",
            "1",
            "--threads",
            "0",
            "--write-rate",
            "0",
            "--hb-reads",
            "200",
            "--check-every-ms",
            "0",
            "--log",
        ])
        .arg(&log)
        .stdin(Stdio::null())
        .spawn()
        .expect("spawning the workload");
    let _guard = KillOnDrop(w.id() as i32);
    let s = wait_for(&log, Duration::from_secs(30), "500 beats", |s| {
        s.tag("r").is_some_and(|r| r.heartbeats.len() >= 500)
    });
    let r = s.tag("r").unwrap();
    assert_eq!(s.checks_failed(), 0, "{:?}", s.first_fail());
    let last = r.heartbeats.last().unwrap();
    assert!(
        last.reads >= 200 * (last.seq - 10),
        "{} reads by beat {}",
        last.reads,
        last.seq
    );
    assert_eq!(last.writes, 0, "a reading thread must not write");

    // Flip the index word of page 100 (a data page: every 16th page is a zero page).
    let chunk = r
        .chunks
        .iter()
        .find(|c| (c.first..c.first + c.pages).contains(&100))
        .unwrap();
    let addr = chunk.addr + (100 - chunk.first) * PAGE + 8;
    let mut mem = fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(format!("/proc/{}/mem", w.id()))
        .unwrap();
    let mut b = [0u8];
    mem.seek(SeekFrom::Start(addr)).unwrap();
    mem.read_exact(&mut b).unwrap();
    mem.seek(SeekFrom::Start(addr)).unwrap();
    mem.write_all(&[b[0] ^ 0x01]).unwrap();

    let s = wait_for(&log, Duration::from_secs(30), "a failed read", |s| {
        s.checks_failed() >= 1
    });
    let f = s.first_fail().unwrap();
    let fail = f.fail.clone().unwrap();
    assert_eq!((fail.page, fail.reason.as_str()), (100, "index"), "{f:?}");
    assert!(fail.detail.contains("by=hb"), "{f:?}");
    // SAFETY: signals our own child.
    unsafe { libc::kill(w.id() as i32, libc::SIGTERM) };
    let st = w.wait().unwrap();
    assert_eq!(
        st.code(),
        Some(1),
        "a failed read must make the exit status 1"
    );
    let exit = summary(&log).tag("r").unwrap().exit.clone().unwrap();
    assert!(exit.reads > 0 && exit.checks_failed >= 1, "{exit:?}");
}

// ---------------------------------------------------------------------------------------------
// Real CRIU post-copy (`criu lazy-pages`) on this host.

fn criu_path() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("PAGESERV_CRIU") {
        return Some(PathBuf::from(p));
    }
    let installed = PathBuf::from("/opt/pageserv/criu/bin/criu");
    installed.exists().then_some(installed)
}

/// A network namespace of this test whose loopback is limited by tbf, so that CRIU's page
/// transfer (dump page server to lazy-pages daemon, both on its 127.0.0.1) takes seconds, not
/// the ~50 ms that loopback takes: otherwise the daemon's background transfer may finish
/// before the restored thread runs, and nothing is left to fault on. Deleted on drop.
struct SlowLoopback(String);

impl SlowLoopback {
    fn new(tag: &str, rate: &str) -> Self {
        let name = format!("psr{}{tag}", std::process::id());
        let _ = Command::new("ip").args(["netns", "del", &name]).status();
        let ns = SlowLoopback(name);
        let run = |args: &[&str]| {
            let st = Command::new(args[0]).args(&args[1..]).status().unwrap();
            assert!(st.success(), "{args:?}: {st:?}");
        };
        run(&["ip", "netns", "add", &ns.0]);
        run(&["ip", "-n", &ns.0, "link", "set", "lo", "up"]);
        run(&[
            "tc", "-n", &ns.0, "qdisc", "replace", "dev", "lo", "root", "tbf", "rate", rate,
            "burst", "256kb", "latency", "50ms",
        ]);
        ns
    }

    /// `program` run in the namespace (`nsenter` execs it in place: same pid).
    fn command(&self, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let mut c = Command::new("nsenter");
        c.arg(format!("--net=/var/run/netns/{}", self.0))
            .arg("--")
            .arg(program);
        c
    }
}

impl Drop for SlowLoopback {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.0]).status();
    }
}

/// Starts `cmd` with a pipe on fd 3 as CRIU's `--status-fd` and waits for its ready byte.
fn start_ready(mut cmd: Command, what: &str, log: &Path) -> Reaped {
    let mut fds = [0; 2];
    // SAFETY: a valid out-array of two fds.
    assert_eq!(unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) }, 0);
    // SAFETY: fresh fds we own.
    let (rd, wr) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
    let raw = wr.as_raw_fd();
    cmd.args(["--status-fd", "3"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    // SAFETY: only dup2 (async-signal-safe) between fork and exec.
    unsafe {
        cmd.pre_exec(move || {
            if libc::dup2(raw, 3) < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let child = Reaped(Some(cmd.spawn().expect("spawning criu")));
    drop(wr);
    let mut f = fs::File::from(rd);
    let mut b = [0u8; 1];
    let n = f.read(&mut b).unwrap_or(0);
    assert_eq!(n, 1, "{what} ended before it was ready\n{}", tail(log));
    child
}

/// What one lazy migration of the workload saw.
struct Lazy {
    summary: Summary,
    /// `#PF` lines of the lazy-pages daemon at addresses inside the workload's page chunks.
    faults_in_pages: usize,
    restore_end: u64,
    /// Its files: kept for inspection if the test then fails.
    _dir: Scratch,
}

fn unix_ns() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos() as u64
}

/// Migrates a 64 MiB workload whose only memory access is `hb_reads` page reads per beat
/// (no writers, no full checks) with CRIU's own post-copy on this host, and counts the page
/// faults CRIU's lazy-pages daemon served inside its pages. None without root or CRIU.
fn lazy_migrate(name: &str, hb_reads: u64) -> Option<Lazy> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        println!("SKIP {name}: needs root for CRIU");
        return None;
    }
    let Some(criu) = criu_path() else {
        println!("SKIP {name}: no CRIU ($PAGESERV_CRIU, /opt/pageserv/criu/bin/criu)");
        return None;
    };
    let dir = scratch("reads", name);
    let (src, dst) = (dir.join("src"), dir.join("dst"));
    fs::create_dir_all(&src).unwrap();
    fs::create_dir_all(&dst).unwrap();
    let log = dir.join("log");
    let reads = hb_reads.to_string();
    // 64 MiB at 200 Mbit/s: about 3 s of transfer.
    let net = SlowLoopback::new(if hb_reads > 0 { "r" } else { "i" }, "200mbit");
    // Init of its own pid namespace, so its pids are free at the restore on this host; in the
    // slow loopback's network namespace, with CRIU (which then has no namespace to dump).
    let mut unshare = net
        .command("unshare")
        .args(["-p", "-f", "setsid", WORKLOAD])
        .args(["--mib", "64", "--threads", "0", "--write-rate", "0"])
        .args(["--hb-reads", &reads, "--check-every-ms", "0", "--log"])
        .arg(&log)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawning unshare");
    wait_for(&log, Duration::from_secs(60), "200 beats", |s| {
        s.tag("r").is_some_and(|r| r.heartbeats.len() >= 200)
    });
    let children =
        fs::read_to_string(format!("/proc/{0}/task/{0}/children", unshare.id())).unwrap();
    let pid: i32 = children.split_whitespace().next().unwrap().parse().unwrap();
    let mut src_guard = KillOnDrop(pid);
    let port = (31000 + std::process::id() % 20000).to_string();

    let dump_log = dir.join("dump.log");
    let mut dump = net.command(&criu);
    dump.args(["dump", "-t", &pid.to_string(), "-D"])
        .arg(&src)
        .args(["--lazy-pages", "--address", "127.0.0.1", "--port", &port])
        .arg("-o")
        .arg(&dump_log);
    let dumper = start_ready(dump, "criu dump --lazy-pages", &dump_log);
    for e in fs::read_dir(&src).unwrap() {
        let e = e.unwrap();
        fs::copy(e.path(), dst.join(e.file_name())).unwrap();
    }
    let lp_log = dir.join("lazy-pages.log");
    let mut lp = net.command(&criu);
    lp.args(["lazy-pages", "--page-server", "--address", "127.0.0.1"])
        .args(["--port", &port, "-D"])
        .arg(&dst)
        .args(["-v4", "-o"])
        .arg(&lp_log);
    let daemon = start_ready(lp, "criu lazy-pages", &lp_log);
    let pidfile = dir.join("restored.pid");
    let restore_log = dir.join("restore.log");
    let st = net
        .command(&criu)
        .args(["restore", "-D"])
        .arg(&dst)
        .args(["--lazy-pages", "-d", "--pidfile"])
        .arg(&pidfile)
        .arg("-o")
        .arg(&restore_log)
        .status()
        .expect("running criu restore");
    assert!(st.success(), "criu restore: {st:?}\n{}", tail(&restore_log));
    let restore_end = unix_ns();
    let restored: i32 = fs::read_to_string(&pidfile)
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    let _restored_guard = KillOnDrop(restored);
    dumper.wait("criu dump", Duration::from_secs(120), &dump_log);
    daemon.wait("criu lazy-pages", Duration::from_secs(120), &lp_log);
    // The dump killed the source (pid 1 of its namespace), so unshare ended too.
    src_guard.0 = 0;
    let _ = unshare.wait();
    wait_for(
        &log,
        Duration::from_secs(30),
        "1 s of beats after restore",
        |s| {
            s.tag("r")
                .and_then(|r| r.heartbeats.last())
                .is_some_and(|h| h.unix_ns > restore_end + 1_000_000_000)
        },
    );
    // SAFETY: signals the process CRIU restored for us.
    unsafe { libc::kill(restored, libc::SIGTERM) };
    let summary = wait_for(&log, Duration::from_secs(20), "the exit line", |s| {
        s.tag("r").is_some_and(|r| r.exit.is_some())
    });
    let r = summary.tag("r").unwrap();
    let faults_in_pages = fs::read_to_string(&lp_log)
        .unwrap()
        .lines()
        .filter_map(|l| l.split("#PF at 0x").nth(1))
        .filter_map(|a| u64::from_str_radix(a.trim(), 16).ok())
        .filter(|a| {
            r.chunks
                .iter()
                .any(|c| (c.addr..c.addr + c.pages * PAGE).contains(a))
        })
        .count();
    Some(Lazy {
        faults_in_pages,
        restore_end,
        summary,
        _dir: dir,
    })
}

#[test]
fn heartbeat_reads_fault_at_a_criu_post_copy_destination() {
    // The control: a thread that touches nothing takes no fault in the pages, so the count
    // below is the reads' own.
    let Some(idle) = lazy_migrate("lazy-idle", 0) else {
        return;
    };
    assert_eq!(
        idle.faults_in_pages, 0,
        "nothing read the pages, yet CRIU served faults in them"
    );
    let Some(lazy) = lazy_migrate("lazy-reads", 100) else {
        return;
    };
    let r = lazy.summary.tag("r").unwrap();
    assert_eq!(
        lazy.summary.checks_failed(),
        0,
        "{:?}",
        lazy.summary.first_fail()
    );
    let exit = r.exit.as_ref().unwrap();
    assert_eq!((exit.checks_failed, exit.writes), (0, 0), "{exit:?}");
    let before = r
        .heartbeats
        .iter()
        .find(|h| h.unix_ns >= lazy.restore_end)
        .unwrap();
    assert!(
        r.heartbeats.last().unwrap().reads > before.reads,
        "no reads after the restore"
    );
    assert!(
        lazy.faults_in_pages >= 10,
        "only {} faults in the workload's pages: its reads did not fault",
        lazy.faults_in_pages
    );
    println!(
        "faults in the pages: {} with 100 reads/beat, {} with none",
        lazy.faults_in_pages, idle.faults_in_pages
    );
}
