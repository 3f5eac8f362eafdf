//! `pageserv demo`: a real migration on one machine, with nothing to configure.
//!
//! It starts the self-verifying workload in the root network namespace (as init of its own pid
//! namespace, so the restore finds its pids free), makes certificates, runs `pageserv dst` in a
//! network namespace joined by veth, runs `pageserv src --lazy` beside the workload, and then
//! reads the workload's own log: the largest heartbeat gap is the downtime users feel, and its
//! memory self-check must stay OK at the destination. The integration tests drive this same
//! code through `--json`.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use serde::Serialize;

use crate::testbed::Testbed;

pub mod faults;
use crate::workload_log::Summary;

#[derive(Debug, Clone, clap::Args)]
pub struct DemoArgs {
    /// Workload memory per process, MiB.
    #[arg(long, default_value_t = 256)]
    pub mib: u64,
    /// Writer threads per process.
    #[arg(long, default_value_t = 2)]
    pub threads: u32,
    /// Pages the workload writes per millisecond.
    #[arg(long, default_value = "10")]
    pub write_rate: String,
    /// Random pages the workload's heartbeat thread itself rewrites per beat (1 ms): with
    /// `--threads 0 --write-rate 0`, one thread both writes memory and heartbeats.
    #[arg(long, default_value_t = 0)]
    pub hb_writes: u64,
    /// Random pages the workload's heartbeat thread reads (and spot-checks) per beat, after its
    /// `--hb-writes`: with `--threads 0 --write-rate 0` a thread that only reads memory and
    /// heartbeats, so its gaps include the post-copy faults of a workload with no writes.
    #[arg(long, default_value_t = 0)]
    pub hb_reads: u64,
    /// Child processes, each with its own memory (a process tree).
    #[arg(long, default_value_t = 0)]
    pub children: u32,
    /// Fork, madvise(MADV_DONTNEED) and mremap while pages are still arriving.
    #[arg(long)]
    pub churn: bool,
    /// Limit the link (tbf on the veth), e.g. 1gbit.
    #[arg(long)]
    pub rate: Option<String>,
    /// The veth's MTU at both ends, e.g. 9000 (jumbo frames, as on a migration network); the
    /// kernel's 1500 if not given. QUIC's MTU discovery finds it and sends larger datagrams.
    #[arg(long, value_parser = clap::value_parser!(u32).range(1280..=65535))]
    pub mtu: Option<u32>,
    /// Start the dump by hand as runc does (--page-server, --status-fd) and let pageserv join it.
    #[arg(long)]
    pub external_dump: bool,
    /// Stop-and-copy (`pageserv src --stop-and-copy`) instead of post-copy.
    #[arg(long, conflicts_with = "external_dump")]
    pub stop_and_copy: bool,
    /// Seconds the workload runs at the destination after the migration, checking itself.
    #[arg(long, default_value_t = 3)]
    pub after: u64,
    /// Write the result as JSON here.
    #[arg(long)]
    pub json: Option<PathBuf>,
    /// Extra `pageserv src` arguments (repeatable).
    #[arg(long = "src-arg", allow_hyphen_values = true)]
    pub src_args: Vec<String>,
    /// Extra `pageserv dst` arguments (repeatable).
    #[arg(long = "dst-arg", allow_hyphen_values = true)]
    pub dst_args: Vec<String>,
    /// Extra argument for the workload (repeatable), e.g. `--workload-arg=--park-on-aligned-stack`.
    #[arg(long = "workload-arg", allow_hyphen_values = true)]
    pub workload_args: Vec<String>,
    /// Failure test: take the veth down for this many seconds mid post-copy.
    #[arg(long, default_value_t = 0.0)]
    pub cut_link: f64,
    /// Failure test: SIGKILL `src`, `dst` or `criu` (the dump) mid post-copy.
    #[arg(long)]
    pub kill: Option<String>,
    /// When to inject the failure: ms after the restore finished.
    #[arg(long, default_value_t = 1000)]
    pub fault_after_ms: u64,
    /// After an injected kill: restart dst and retry with `pageserv src --resume`.
    #[arg(long)]
    pub retry: bool,
    /// With `--kill dst`: restart dst on the same work directory this many ms after the kill
    /// (it adopts the restored tasks from their keeper; src, still running, resumes into it).
    #[arg(long, conflicts_with = "retry")]
    pub restart_dst_after_ms: Option<u64>,
}

/// What the demo saw.
#[derive(Debug, Clone, Serialize)]
pub struct DemoResult {
    pub ok: bool,
    pub mib: u64,
    /// Largest heartbeat gap across the migration: the downtime the workload felt.
    pub max_heartbeat_gap_ms: f64,
    pub checks_ok_after: u64,
    pub checks_failed: u64,
    pub src_exit: i32,
    pub dst_exit: i32,
    pub src: serde_json::Value,
    pub dst: serde_json::Value,
    pub workload_alive_at_dst: bool,
    pub workload_alive_at_src: bool,
    pub problems: Vec<String>,
    /// The injected failure, if any, and the state it left.
    pub fault: faults::FaultReport,
    /// `wait4` of `pageserv src` and `pageserv dst` as this process reaped them: their CPU time
    /// and peak RSS with those of the children they reaped (CRIU's dump, restore); none if
    /// either was not reaped here (killed, or restarted by a fault).
    pub src_rusage: Option<pageserv::usage::Rusage>,
    pub dst_rusage: Option<pageserv::usage::Rusage>,
    /// When the migration began (just before `pageserv src`, or the external dump, started),
    /// Unix ns: the workload's speed before the migration is measured up to here.
    pub started_unix_ns: u64,
    /// When the migration ended (both services exited), Unix ns.
    pub migrated_unix_ns: u64,
    /// The workload's whole log, for callers that measure more than the demo prints (the bench).
    #[serde(skip)]
    pub workload_log: String,
}

/// A program built beside this one (`pageserv`, `workload`, `linkem`: one `cargo build
/// --release` puts them all in `target/release`).
pub fn sibling(name: &str) -> Result<PathBuf> {
    let exe = std::env::current_exe().context("locating the pageserv-lab binary")?;
    let p = exe.with_file_name(name);
    if !p.is_file() {
        bail!(
            "{} not found beside {}: build it with `cargo build --release` (at the repository's \
             root, which builds pageserv and the lab)",
            name,
            exe.display()
        );
    }
    Ok(p)
}

/// Starts the workload on the source side of `bed` as pid 1 of a new pid namespace; returns
/// (unshare child, host pid).
pub(crate) fn start_workload(bed: &Testbed, args: &DemoArgs, log: &Path) -> Result<(Child, i32)> {
    let workload = sibling("workload")?;
    let mut cmd = bed.in_src("unshare");
    cmd.args(["-p", "-f", "setsid"])
        .arg(&workload)
        .args(["--mib", &args.mib.to_string()])
        .args(["--threads", &args.threads.to_string()])
        .args(["--write-rate", &args.write_rate])
        .args(["--children", &args.children.to_string()])
        .arg("--log")
        .arg(log)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    if args.churn {
        cmd.arg("--churn");
    }
    if args.hb_writes > 0 {
        cmd.args(["--hb-writes", &args.hb_writes.to_string()]);
    }
    if args.hb_reads > 0 {
        cmd.args(["--hb-reads", &args.hb_reads.to_string()]);
    }
    cmd.args(&args.workload_args);
    let child = cmd.spawn().context("starting the workload with unshare")?;
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let children =
            std::fs::read_to_string(format!("/proc/{}/task/{}/children", child.id(), child.id()))
                .unwrap_or_default();
        if let Some(pid) = children
            .split_whitespace()
            .next()
            .and_then(|p| p.parse().ok())
        {
            let ready = std::fs::read_to_string(log).unwrap_or_default();
            let want = 1 + args.children as usize;
            if ready.lines().filter(|l| l.starts_with("ready ")).count() >= want {
                return Ok((child, pid));
            }
        }
        if Instant::now() > deadline {
            bail!(
                "the workload did not get ready within 60 s (log {})",
                log.display()
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn wait_for_line(
    child: &mut Child,
    needle: &str,
    timeout: Duration,
    restored: Option<std::sync::mpsc::Sender<()>>,
) -> Result<()> {
    let stderr = child.stderr.take().context("dst stderr")?;
    let (tx, rx) = std::sync::mpsc::channel();
    let needle = needle.to_string();
    std::thread::spawn(move || {
        let mut found = false;
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            eprintln!("  [dst] {line}");
            if !found && line.contains(&needle) {
                found = true;
                let _ = tx.send(());
            }
            if line.contains("restore finished; tasks running")
                && let Some(r) = &restored
            {
                let _ = r.send(());
            }
        }
    });
    rx.recv_timeout(timeout)
        .context("pageserv dst did not start listening in time")
}

/// The source workload (`pid`, in the pid namespace of its `unshare` parent): ended when
/// dropped unless the migration ended it itself, so that a migration that fails early (a
/// service that does not start, a bad argument) leaves no workload running behind it.
struct SourceWorkload {
    unshare: Child,
    pid: i32,
    ended: bool,
}

impl SourceWorkload {
    /// Ends the `unshare` parent once the migration has dealt with the workload itself.
    fn end_unshare(&mut self) {
        let _ = self.unshare.kill();
        let _ = self.unshare.wait();
        self.ended = true;
    }
}

impl Drop for SourceWorkload {
    fn drop(&mut self) {
        if self.ended {
            return;
        }
        // While `unshare` runs, the workload (its child, the init of its pid namespace) has
        // not been reaped, so the pid is still the workload's.
        let parent_running = matches!(self.unshare.try_wait(), Ok(None));
        if parent_running && alive(self.pid) {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(self.pid),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
        self.end_unshare();
    }
}

pub(crate) fn alive(pid: i32) -> bool {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // A zombie is not alive: its memory is gone.
    !stat.is_empty() && !stat.contains(") Z ")
}

pub fn run(args: DemoArgs) -> Result<()> {
    let result = migrate(&args)?;
    if let Some(p) = &args.json {
        std::fs::write(p, serde_json::to_string_pretty(&result)?)?;
    }
    println!("\n== pageserv demo: {} MiB workload ==", args.mib);
    println!(
        "  downtime felt by the workload (largest heartbeat gap): {:.1} ms",
        result.max_heartbeat_gap_ms
    );
    println!(
        "  memory self-checks at the destination: {} ok, {} failed",
        result.checks_ok_after, result.checks_failed
    );
    println!(
        "  workload now runs at the destination: {}",
        result.workload_alive_at_dst
    );
    if result.ok {
        println!("  result: OK");
        Ok(())
    } else {
        bail!(
            "the migration did not verify: {}",
            result.problems.join("; ")
        )
    }
}

/// Runs one migration on a fresh testbed.
pub fn migrate(args: &DemoArgs) -> Result<DemoResult> {
    let bed = Testbed::new(0)?;
    if let Some(rate) = &args.rate {
        bed.limit_rate(rate)?;
    }
    if let Some(mtu) = args.mtu {
        bed.set_mtu(mtu)?;
    }
    migrate_on(&bed, args, None)
}

/// Runs one migration on `bed`: the workload and `pageserv src` on its source side, `pageserv
/// dst` in its destination namespace. With `timeout`, a `pageserv src` still running after it
/// is killed and the migration fails.
pub fn migrate_on(bed: &Testbed, args: &DemoArgs, timeout: Option<Duration>) -> Result<DemoResult> {
    let pageserv = sibling("pageserv")?;
    let (src_certs, dst_certs) = pageserv::keys::demo_identities(&bed.dir.join("keys"))?;
    let log = bed.dir.join("workload.log");
    let (unshare, pid) = start_workload(bed, args, &log)?;
    let mut workload = SourceWorkload {
        unshare,
        pid,
        ended: false,
    };
    eprintln!("workload pid {pid} ready; letting it run 1 s before the migration");
    std::thread::sleep(Duration::from_secs(1));

    let port = 40000 + (std::process::id() % 20000) as u16;
    let dst_addr = format!("{}:{port}", bed.dst_addr);
    let dst_json = bed.dir.join("dst.json");
    let src_json = bed.dir.join("src.json");
    let fault = match (args.kill.as_deref(), args.cut_link > 0.0) {
        (Some("dst"), _) => Some(faults::Fault::KillDst),
        (Some("src"), _) => Some(faults::Fault::KillSrc),
        (Some("criu"), _) => Some(faults::Fault::KillCriuDump),
        (Some(other), _) => bail!("--kill takes src, dst or criu, not {other:?}"),
        (None, true) => Some(faults::Fault::CutLink {
            secs: args.cut_link,
        }),
        (None, false) => None,
    };
    let mut dst_work = bed.dir.join("dst");
    let start_dst = |work: &Path, restored: Option<std::sync::mpsc::Sender<()>>| -> Result<Child> {
        let mut dst = bed
            .in_dst(&pageserv)
            .args(["dst", "--listen", &dst_addr, "--certs"])
            .arg(&dst_certs)
            .arg("--work")
            .arg(work)
            // The restored pid is read from the migration's pidfile afterwards.
            .arg("--keep-work")
            .arg("--stats-json")
            .arg(&dst_json)
            .args(&args.dst_args)
            .stdin(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .context("starting pageserv dst")?;
        wait_for_line(
            &mut dst,
            "pageserv dst ready",
            Duration::from_secs(20),
            restored,
        )?;
        Ok(dst)
    };
    let (restored_tx, restored_rx) = std::sync::mpsc::channel();
    let mut dst = start_dst(&dst_work, Some(restored_tx))?;

    let mut src_cmd = bed.in_src(&pageserv);
    src_cmd
        .arg("src")
        .arg(if args.stop_and_copy {
            "--stop-and-copy"
        } else {
            "--lazy"
        })
        .args(["--to", &dst_addr, "--dst-name", "dst", "--certs"])
        .arg(&src_certs)
        .arg("--work")
        .arg(bed.dir.join("src"))
        .arg("--stats-json")
        .arg(&src_json)
        .args(&args.src_args)
        .stdin(Stdio::null());
    let started_ns = unix_ns();
    let mut external = None;
    if args.external_dump {
        external = Some(start_external_dump(bed, pid, &mut src_cmd)?);
    } else {
        src_cmd.args(["--pid", &pid.to_string()]);
    }
    let mut src = src_cmd.spawn().context("running pageserv src")?;
    let mut fault_report = faults::FaultReport::default();
    let (src_id, dst_id) = (src.id() as i32, dst.id() as i32);
    let restart = args
        .restart_dst_after_ms
        .filter(|_| matches!(fault, Some(faults::Fault::KillDst)));
    let (mut src_rusage, mut dst_rusage) = (None, None);
    let (mut src_status, mut dst_status) = std::thread::scope(|s| -> Result<_> {
        let injector = fault.map(|f| {
            let (bed, rx, rep) = (&bed, restored_rx, &mut fault_report);
            let after = Duration::from_millis(args.fault_after_ms);
            let (start_dst, dst_work) = (&start_dst, &dst_work);
            s.spawn(move || -> Option<Result<Child>> {
                faults::inject(bed, f, after, &rx, dst_id, src_id, rep);
                let wait = restart.filter(|_| rep.injected)?;
                std::thread::sleep(Duration::from_millis(wait));
                rep.restored_before_restart = restored_identity(dst_work);
                eprintln!("restarting pageserv dst on the same work directory");
                Some(start_dst(dst_work, None))
            })
        });
        // No timeout: a year.
        let src_limit = timeout.unwrap_or(Duration::from_secs(365 * 86400));
        let src_status = pageserv::child::wait_timeout_usage(&mut src, src_limit)
            .context("waiting for pageserv src")?
            .map(|(s, u)| {
                src_rusage = Some(u);
                s
            });
        let mut dst_wait = Duration::from_secs(90);
        if let Some(restarted) = injector.and_then(|h| h.join().ok()).flatten() {
            dst = restarted?;
            if !src_status.is_some_and(|s| s.success()) {
                // src gave up: the restarted dst has nothing to finish (it waits for a new
                // migration); end it soon.
                dst_wait = Duration::from_secs(3);
            }
        }
        // With src killed, dst keeps the restored tasks waiting for it to come back: the retry
        // below continues that migration.
        let dst_status = if matches!(fault, Some(faults::Fault::KillSrc)) && args.retry {
            None
        } else {
            let s = pageserv::child::wait_timeout_usage(&mut dst, dst_wait)?.map(|(s, u)| {
                dst_rusage = Some(u);
                s
            });
            if s.is_none() && dst_wait < Duration::from_secs(90) {
                let _ = dst.kill();
                let _ = dst.wait();
            }
            s
        };
        Ok((src_status, dst_status))
    })?;
    let src_failed = !src_status.is_some_and(|s| s.success());
    if fault.is_none() && src_failed && faults::proc_state(pid) == "t" {
        // An unplanned failure left the source frozen (the failure rule): the demo started it,
        // so it ends it rather than leave a frozen tree, its dump and keeper behind.
        let src_work = bed.dir.join("src").join(src_id.to_string());
        if let Err(e) = pageserv::source::keeper::settle_frozen(&src_work, false) {
            eprintln!("cannot settle the frozen source: {e}");
        }
    }
    if fault.is_some() && src_failed {
        // The state the failure left, before anything retries.
        std::thread::sleep(Duration::from_millis(500));
        fault_report.source_state = faults::proc_state(pid);
        fault_report.restored_alive_after_failure = find_restore_pid(&dst_work).is_some_and(alive);
        eprintln!(
            "after the failure: source state {:?}, restored copy alive: {}",
            fault_report.source_state, fault_report.restored_alive_after_failure
        );
        if !args.retry && fault_report.source_state == "t" {
            // Left frozen on purpose by the failure rule; the demo started it, so it ends it.
            let src_work = bed.dir.join("src").join(src_id.to_string());
            match pageserv::source::keeper::settle_frozen(&src_work, false) {
                Ok(()) => fault_report.source_settled = true,
                Err(e) => eprintln!("cannot settle the frozen source: {e}"),
            }
        }
        if args.retry {
            // The services of the retry are measured with their own reports only.
            (src_rusage, dst_rusage) = (None, None);
            let src_work = bed.dir.join("src").join(src_id.to_string());
            if dst_status.is_some() || dst.try_wait()?.is_some() {
                dst_work = bed.dir.join("dst-retry");
                dst = start_dst(&dst_work, None)?;
            }
            let mut src2 = bed
                .in_src(&pageserv)
                .args([
                    "src",
                    "--lazy",
                    "--to",
                    &dst_addr,
                    "--dst-name",
                    "dst",
                    "--certs",
                ])
                .arg(&src_certs)
                .arg("--resume")
                .arg(&src_work)
                .args(&args.src_args)
                .arg("--stats-json")
                .arg(&src_json)
                .stdin(Stdio::null())
                .spawn()
                .context("running pageserv src --resume")?;
            src_status = Some(src2.wait()?);
            dst_status = pageserv::child::wait_timeout(&mut dst, Duration::from_secs(60))?;
            fault_report.retry_src_exit = src_status.and_then(|s| s.code());
            fault_report.retry_dst_exit = dst_status.and_then(|s| s.code());
        }
    }
    if let Some(mut c) = external {
        let _ = pageserv::child::wait_timeout(&mut c, Duration::from_secs(10));
    }
    let migrated_ns = unix_ns();
    eprintln!(
        "migration ended; watching the workload at the destination for {} s",
        args.after
    );
    let restored_pid: Option<i32> = find_restore_pid(&dst_work);
    fault_report.restored_after = restored_identity(&dst_work);
    std::thread::sleep(Duration::from_secs(args.after));

    let workload_alive_at_dst = restored_pid.is_some_and(alive);
    let workload_alive_at_src = alive(pid);
    // End only what we started: the restored workload (by the pid the restore recorded), the
    // source workload if the migration left it running, and the unshare parent.
    let live: Vec<i32> = restored_pid
        .into_iter()
        .chain(workload_alive_at_src.then_some(pid))
        .collect();
    for p in &live {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(*p),
            nix::sys::signal::Signal::SIGTERM,
        );
    }
    if !live.is_empty() {
        std::thread::sleep(Duration::from_millis(300));
    }
    workload.end_unshare();

    let text = std::fs::read_to_string(&log).unwrap_or_default();
    let wl = Summary::parse(&text);
    fault_report.rolled_back_heartbeats =
        crate::workload_log::rolled_back_heartbeats(&crate::workload_log::parse_log(&text).0);
    let read_json = |p: &Path| -> serde_json::Value {
        std::fs::read_to_string(p)
            .ok()
            .and_then(|t| serde_json::from_str(&t).ok())
            .unwrap_or(serde_json::Value::Null)
    };
    let mut problems = Vec::new();
    let src_exit = src_status.and_then(|s| s.code()).unwrap_or(-1);
    if src_status.is_none() {
        problems.push(format!(
            "pageserv src did not finish within {} s (killed)",
            timeout.map_or(0, |t| t.as_secs())
        ));
    }
    let dst_exit = dst_status.and_then(|s| s.code()).unwrap_or(-1);
    if src_exit != 0 {
        problems.push(format!("pageserv src exited {src_exit}"));
    }
    if dst_exit != 0 {
        problems.push(format!("pageserv dst exited {dst_exit}"));
    }
    if !workload_alive_at_dst {
        problems.push("the workload is not running at the destination".into());
    }
    if workload_alive_at_src {
        problems.push(if workload_alive_at_dst {
            "the workload runs at the source and the destination (two live copies)".into()
        } else {
            "the workload still runs at the source (it was not migrated)".into()
        });
    }
    // Every process of the tree must keep passing its checks after the last page arrived.
    let want = args.after.saturating_sub(1).max(1) as usize;
    let verified = wl.verify_after(migrated_ns, want);
    problems.extend(verified.problems);
    let checks_ok_after = verified.checks_ok_after;
    Ok(DemoResult {
        ok: problems.is_empty(),
        mib: args.mib,
        max_heartbeat_gap_ms: wl.max_gap().map_or(f64::NAN, |g| g.ms),
        checks_ok_after,
        checks_failed: wl.checks_failed() as u64,
        src_exit,
        dst_exit,
        src: read_json(&src_json),
        dst: read_json(&dst_json),
        workload_alive_at_dst,
        workload_alive_at_src,
        problems,
        fault: fault_report,
        src_rusage,
        dst_rusage,
        started_unix_ns: started_ns,
        migrated_unix_ns: migrated_ns,
        workload_log: text,
    })
}

/// Starts `criu dump --lazy-pages` as runc would: its own page server on loopback and a status
/// FIFO, then points `pageserv src` at both. At `-v4`, the level runc gives CRIU: this dump is
/// the user's (runc's), not one pageserv starts, so `--criu-verbosity` does not apply to it.
fn start_external_dump(bed: &Testbed, pid: i32, src: &mut Command) -> Result<Child> {
    let dir = &bed.dir;
    let criu = pageserv::criu::binary::Criu::locate(None)?;
    let images = dir.join("ext-images");
    std::fs::create_dir_all(&images)?;
    let fifo = dir.join("status.fifo");
    nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::from_bits_truncate(0o600))?;
    let port = 27000 + (std::process::id() % 1000) as u16;
    let line = format!(
        "exec {} dump -t {pid} -D {} -o dump.log -v4 --lazy-pages --address 127.0.0.1 --port {port} --status-fd 3 3>{}",
        criu.path.display(),
        images.display(),
        fifo.display()
    );
    let child = bed
        .in_src("/bin/sh")
        .arg("-c")
        .arg(line)
        .stdin(Stdio::null())
        .spawn()
        .context("starting the external criu dump")?;
    src.args([
        "--page-server",
        &format!("127.0.0.1:{port}"),
        "--status-fifo",
    ])
    .arg(&fifo)
    .arg("--images")
    .arg(&images);
    Ok(child)
}

pub(crate) fn unix_ns() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64)
}

/// The restored root's host pid and start time, if it is alive.
fn restored_identity(dst_base: &Path) -> Option<(i32, u64)> {
    let pid = find_restore_pid(dst_base).filter(|p| alive(*p))?;
    let start = pageserv::dst::uffd_keeper::start_time(pid).ok()?;
    Some((pid, start))
}

fn find_restore_pid(dst_base: &Path) -> Option<i32> {
    for entry in std::fs::read_dir(dst_base).ok()?.flatten() {
        let p = entry.path().join("work").join("restore.pid");
        if let Some(pid) = std::fs::read_to_string(&p)
            .ok()
            .and_then(|t| t.trim().parse().ok())
        {
            return Some(pid);
        }
    }
    None
}
