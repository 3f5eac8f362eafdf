//! CRIU's own migration modes, as a user would run them by hand, on the same testbed and
//! workload as pageserv: stop-and-copy through disk, stop-and-copy through `criu page-server`,
//! and CRIU's post-copy (`criu lazy-pages`). At CRIU's default verbosity, as users run it (its
//! `-v4` logging costs time on the dump and restore paths); the logs keep its errors.

use std::io::Read;
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU16, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

use super::{AFTER_S, ModeOutcome};
use crate::bench::matrix::{Cell, Mode};
use crate::demo::{self, DemoArgs};
use crate::testbed::Testbed;
use pageserv::criu::binary::{Criu, log_tail, pass_fds};

/// Writer threads of the workload in every mode.
pub const WORKLOAD_THREADS: u32 = 2;
/// The fd number CRIU writes its ready byte to.
const STATUS_FD: i32 = 3;

static NEXT_PORT: AtomicU16 = AtomicU16::new(0);

/// A fresh TCP port per CRIU run, so a socket in TIME_WAIT from the last run never collides.
fn next_port() -> u16 {
    let base = 30000 + (std::process::id() % 5000) as u16 * 4;
    base + NEXT_PORT.fetch_add(1, Ordering::Relaxed) % 4000
}

/// The processes and files of one run, ended and read whatever happens.
struct Run<'a> {
    bed: &'a Testbed,
    criu: Criu,
    logs: PathBuf,
    /// Background CRIU processes (page server, lazy dump, lazy-pages daemon); taken out once
    /// reaped.
    children: Vec<Option<Child>>,
    /// `wait4` of each CRIU process reaped, by name ("criu dump", "criu restore", ...).
    usage: Vec<(String, pageserv::usage::Rusage)>,
    pidfile: PathBuf,
    /// The lazy dump's freeze (root seen stopped -> dump ready).
    criu_freeze_ms: Option<f64>,
    /// `criu restore` from its start to its exit (`-d`: the restored tasks run).
    restore_ms: Option<f64>,
}

/// Runs one CRIU mode on `bed` with a fresh workload: the workload and `criu dump` on the
/// source side, the page server, lazy-pages daemon and restore in the destination namespace.
pub fn run(cell: &Cell, bed: &Testbed) -> Result<ModeOutcome> {
    let criu = Criu::locate(None)?;
    let logs = bed.dir.join("logs");
    std::fs::create_dir_all(&logs)?;
    let log = bed.dir.join("workload.log");
    let shape = super::workload_shape(cell.write_rate);
    let args = DemoArgs {
        mib: cell.mib,
        threads: shape.threads,
        write_rate: shape.write_rate,
        hb_writes: shape.hb_writes,
        hb_reads: shape.hb_reads,
        children: 0,
        churn: false,
        rate: None,
        mtu: None,
        external_dump: false,
        stop_and_copy: false,
        after: AFTER_S,
        json: None,
        src_args: Vec::new(),
        dst_args: Vec::new(),
        workload_args: Vec::new(),
        cut_link: 0.0,
        kill: None,
        fault_after_ms: 0,
        retry: false,
        restart_dst_after_ms: None,
    };
    let (mut unshare, pid) = demo::start_workload(bed, &args, &log)?;
    std::thread::sleep(Duration::from_secs(1));
    let mut run = Run {
        bed,
        criu,
        pidfile: bed.dir.join("restore.pid"),
        logs,
        children: Vec::new(),
        usage: Vec::new(),
        criu_freeze_ms: None,
        restore_ms: None,
    };
    let started = Instant::now();
    let started_ns = demo::unix_ns();
    let migrated = match cell.mode {
        Mode::CriuDisk => run.disk(pid),
        Mode::CriuPageserver => run.page_server(pid),
        Mode::CriuLazy => run.lazy(pid),
        m => Err(anyhow::anyhow!("{} is not a CRIU mode", m.name())),
    };
    let total_ms = started.elapsed().as_secs_f64() * 1e3;
    let migrated_ns = demo::unix_ns();
    let mut problems = Vec::new();
    let mut wire_bytes = None;
    match &migrated {
        Ok(Some(image_bytes)) => wire_bytes = Some(*image_bytes),
        Ok(None) => {}
        Err(e) => problems.push(format!("{e:#}")),
    }
    let restored = std::fs::read_to_string(&run.pidfile)
        .ok()
        .and_then(|t| t.trim().parse::<i32>().ok());
    if migrated.is_ok() {
        std::thread::sleep(Duration::from_secs(AFTER_S));
        if !restored.is_some_and(demo::alive) {
            problems.push("the workload is not running at the destination".into());
        }
        if demo::alive(pid) {
            problems.push("the workload still runs at the source (two live copies)".into());
        }
    }
    // End only what this run started: the restored tree, the source tree, the CRIU helpers.
    if let Some(p) = restored {
        stop(p);
    }
    if demo::alive(pid) {
        let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
    }
    let _ = unshare.kill();
    let _ = unshare.wait();
    for c in run.children.iter_mut().flatten() {
        let _ = c.kill();
        let _ = c.wait();
    }
    let usage = crate::bench::usage::RunUsage::from_criu(total_ms, std::mem::take(&mut run.usage));
    Ok(ModeOutcome {
        started_ns,
        migrated_ns,
        total_ms: migrated.is_ok().then_some(total_ms),
        wire_bytes,
        fault_p50_us: None,
        fault_p99_us: None,
        criu_freeze_ms: run.criu_freeze_ms,
        restore_ms: run.restore_ms,
        problems,
        log: std::fs::read_to_string(&log).unwrap_or_default(),
        usage: Some(usage),
    })
}

fn timed_out() -> String {
    format!(
        "did not finish within {} s, the bench's --timeout",
        super::step_timeout().as_secs()
    )
}

/// SIGTERM (the workload logs its exit), then SIGKILL if it lingers.
fn stop(pid: i32) {
    let _ = kill(Pid::from_raw(pid), Signal::SIGTERM);
    let deadline = Instant::now() + Duration::from_secs(2);
    while demo::alive(pid) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    if demo::alive(pid) {
        let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
    }
}

fn dir_bytes(dir: &Path) -> u64 {
    std::fs::read_dir(dir)
        .map(|rd| {
            rd.flatten()
                .filter_map(|e| e.metadata().ok())
                .filter(|m| m.is_file())
                .map(|m| m.len())
                .sum()
        })
        .unwrap_or(0)
}

/// Copies the files of `from` that `to` lacks.
fn copy_missing(from: &Path, to: &Path) -> Result<()> {
    std::fs::create_dir_all(to)?;
    for e in std::fs::read_dir(from).with_context(|| format!("reading {}", from.display()))? {
        let e = e?;
        let target = to.join(e.file_name());
        if e.file_type()?.is_file() && !target.exists() {
            std::fs::copy(e.path(), &target)
                .with_context(|| format!("copying {} to {}", e.path().display(), to.display()))?;
        }
    }
    Ok(())
}

/// Waits for CRIU's status byte on `r`; EOF or a timeout means CRIU failed.
fn wait_ready(r: OwnedFd, what: &str, log: &Path) -> Result<()> {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut f = std::fs::File::from(r);
        let mut b = [0u8; 1];
        let _ = tx.send(f.read(&mut b).map(|n| n == 1 && b[0] == 0));
    });
    match rx.recv_timeout(Duration::from_secs(60)) {
        Ok(Ok(true)) => Ok(()),
        _ => bail!(
            "{what} did not become ready; its log ends:\n{}",
            log_tail(log, 15)
        ),
    }
}

/// CRIU's TLS (GnuTLS) with the certificate and key in `certs` and the CA beside it (the
/// bench's pageserv identities: `demo_identities`); the certificates name no address, so the
/// name check is off.
fn tls_args(cmd: &mut Command, certs: &Path) {
    let ca = certs.with_file_name("ca").join(pageserv::keys::CA_CERT);
    cmd.arg("--tls")
        .arg("--tls-cacert")
        .arg(ca)
        .arg("--tls-cert")
        .arg(certs.join(pageserv::keys::CERT))
        .arg("--tls-key")
        .arg(certs.join(pageserv::keys::KEY))
        .arg("--tls-no-cn-verify");
}

impl Run<'_> {
    fn criu_cmd(&self, in_dst: bool) -> Command {
        let mut c = if in_dst {
            self.bed.in_dst(&self.criu.path)
        } else {
            let mut c = self.criu.command();
            self.bed.enter_src(&mut c);
            c
        };
        c.stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        c
    }

    /// Runs a CRIU step to completion; on failure the error carries its log tail.
    fn step(&mut self, what: &str, mut cmd: Command, log: &Path) -> Result<()> {
        let mut child = cmd.spawn().with_context(|| format!("starting {what}"))?;
        let done = pageserv::child::wait_timeout_usage(&mut child, super::step_timeout())?;
        self.reaped(what, done, log)
    }

    /// Records a reaped CRIU process's usage; fails unless it exited 0.
    fn reaped(
        &mut self,
        what: &str,
        done: Option<(std::process::ExitStatus, pageserv::usage::Rusage)>,
        log: &Path,
    ) -> Result<()> {
        let status = done.map(|(s, u)| {
            self.usage
                .push((crate::bench::usage::process_name(what), u));
            s
        });
        match status {
            Some(s) if s.success() => Ok(()),
            other => bail!(
                "{what} failed ({}); its log ends:\n{}",
                other.map_or_else(timed_out, |s| s.to_string()),
                log_tail(log, 15)
            ),
        }
    }

    /// Starts a CRIU process that reports readiness on --status-fd, and waits for it.
    fn start_ready(&mut self, what: &str, mut cmd: Command, log: &Path) -> Result<usize> {
        let (r, w) = nix::unistd::pipe().context("creating a status pipe")?;
        pass_fds(&mut cmd, &[(&w, STATUS_FD)]);
        cmd.args(["--status-fd", &STATUS_FD.to_string()]);
        let child = cmd.spawn().with_context(|| format!("starting {what}"))?;
        drop(w);
        self.children.push(Some(child));
        wait_ready(r, what, log)?;
        Ok(self.children.len() - 1)
    }

    fn wait_child(&mut self, i: usize, what: &str, log: &Path) -> Result<()> {
        let Some(mut child) = self.children.get_mut(i).and_then(Option::take) else {
            bail!("{what}: no such process in this run (already reaped)");
        };
        let done = pageserv::child::wait_timeout_usage(&mut child, super::step_timeout())?;
        self.reaped(what, done, log)
    }

    fn restore(&mut self, images: &Path, lazy: bool) -> Result<()> {
        let log = self.logs.join("restore.log");
        let mut cmd = self.criu_cmd(true);
        cmd.arg("restore")
            .arg("-D")
            .arg(images)
            .arg("-d")
            .arg("--pidfile")
            .arg(&self.pidfile)
            .arg("-o")
            .arg(&log);
        if lazy {
            cmd.arg("--lazy-pages");
        }
        let started = Instant::now();
        self.step("criu restore (in the destination netns)", cmd, &log)?;
        self.restore_ms = Some(started.elapsed().as_secs_f64() * 1e3);
        Ok(())
    }

    /// Dump to a local directory, restore from it. Returns the image bytes (the copy).
    fn disk(&mut self, pid: i32) -> Result<Option<u64>> {
        let dir = self.bed.dir.join("images");
        std::fs::create_dir_all(&dir)?;
        let log = self.logs.join("dump.log");
        let mut cmd = self.criu_cmd(false);
        cmd.args(["dump", "-t", &pid.to_string(), "-D"])
            .arg(&dir)
            .arg("-o")
            .arg(&log);
        if super::criu_keep_source() {
            cmd.arg("--leave-stopped");
        }
        self.step("criu dump", cmd, &log)?;
        self.restore(&dir, false)?;
        end_kept_source(pid);
        Ok(Some(dir_bytes(&dir)))
    }

    /// `criu page-server` at the destination receives the memory over TCP during the dump.
    fn page_server(&mut self, pid: i32) -> Result<Option<u64>> {
        let dst_dir = self.bed.dir.join("dst-images");
        let src_dir = self.bed.dir.join("src-images");
        std::fs::create_dir_all(&dst_dir)?;
        std::fs::create_dir_all(&src_dir)?;
        let port = next_port().to_string();
        let addr = self.bed.dst_addr.to_string();
        let ps_log = self.logs.join("page-server.log");
        let mut ps = self.criu_cmd(true);
        ps.arg("page-server")
            .arg("-D")
            .arg(&dst_dir)
            .args(["--port", &port, "--address", &addr, "-o"])
            .arg(&ps_log);
        let tls = if super::criu_tls() {
            Some(pageserv::keys::demo_identities(&self.bed.dir.join("keys"))?)
        } else {
            None
        };
        if let Some((_, dst)) = &tls {
            tls_args(&mut ps, dst);
        }
        let server = self.start_ready("criu page-server (destination)", ps, &ps_log)?;
        let log = self.logs.join("dump.log");
        let mut dump = self.criu_cmd(false);
        dump.args(["dump", "-t", &pid.to_string(), "-D"])
            .arg(&src_dir)
            .args(["--page-server", "--address", &addr, "--port", &port, "-o"])
            .arg(&log);
        if let Some((src, _)) = &tls {
            tls_args(&mut dump, src);
        }
        if super::criu_keep_source() {
            dump.arg("--leave-stopped");
        }
        self.step("criu dump --page-server", dump, &log)?;
        self.wait_child(server, "criu page-server", &ps_log)?;
        copy_missing(&src_dir, &dst_dir)?;
        self.restore(&dst_dir, false)?;
        end_kept_source(pid);
        Ok(None)
    }

    /// CRIU's post-copy: lazy dump at the source, lazy-pages daemon and lazy restore at the
    /// destination; done when the dump exits (every page transferred).
    fn lazy(&mut self, pid: i32) -> Result<Option<u64>> {
        let src_dir = self.bed.dir.join("src-images");
        let dst_dir = self.bed.dir.join("dst-images");
        std::fs::create_dir_all(&src_dir)?;
        let port = next_port().to_string();
        let addr = self.bed.src_addr.to_string();
        let log = self.logs.join("dump.log");
        let mut dump = self.criu_cmd(false);
        dump.args(["dump", "-t", &pid.to_string(), "-D"])
            .arg(&src_dir)
            .args(["--lazy-pages", "--address", &addr, "--port", &port, "-o"])
            .arg(&log);
        let watch = pageserv::source::freeze_watch::FreezeWatch::start(pid);
        let dumper = self.start_ready("criu dump --lazy-pages", dump, &log)?;
        let ready = std::time::SystemTime::now();
        self.criu_freeze_ms = watch
            .finish()
            .and_then(|seen| ready.duration_since(seen).ok())
            .map(|d| d.as_secs_f64() * 1e3);
        copy_missing(&src_dir, &dst_dir)?;
        let lp_log = self.logs.join("lazy-pages.log");
        let mut lp = self.criu_cmd(true);
        lp.args([
            "lazy-pages",
            "--page-server",
            "--address",
            &addr,
            "--port",
            &port,
        ])
        .arg("-D")
        .arg(&dst_dir)
        .arg("-o")
        .arg(&lp_log);
        let daemon = self.start_ready("criu lazy-pages (destination)", lp, &lp_log)?;
        self.restore(&dst_dir, true)?;
        self.wait_child(dumper, "criu dump --lazy-pages", &log)?;
        self.wait_child(daemon, "criu lazy-pages", &lp_log)?;
        Ok(None)
    }
}

/// With `--criu-keep-source`: the source CRIU left stopped ends now that the restore finished
/// (with it, pageserv's stop-and-copy kills its frozen source at this point too).
fn end_kept_source(pid: i32) {
    if super::criu_keep_source() && demo::alive(pid) {
        let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
        let deadline = Instant::now() + Duration::from_secs(2);
        while demo::alive(pid) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}
