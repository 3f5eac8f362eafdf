//! `workload`: the self-verifying process tree the bench and the integration tests migrate.
//!
//! Each process (the root `r`, children `c1`, `c2`, ...) owns N MiB of self-describing pages,
//! rewrites them from writer threads, logs a heartbeat and periodically verifies every page.
//! Everything goes to one append-only log (see `pageserv_lab::workload_log` for the format and the
//! parser). Built to be CRIU-friendly: a log file opened by path, threads, plain anonymous
//! memory, no sockets or special fds. SIGTERM (or SIGINT) ends it: exit status 0 if every check
//! passed, 1 if any failed, 2 if it could not start.

mod aligned_stack;
mod checker;
mod churn;
mod heartbeat;
mod log;
mod memory;
mod page;
mod shared;
mod writers;

use anyhow::{Context, bail};
use clap::Parser;
use log::{LogFile, unix_ns};
use memory::Memory;
use shared::Shared;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;
use writers::WriteRate;

#[derive(Parser, Debug)]
#[command(about = "Self-verifying memory workload for live-migration tests")]
struct Args {
    /// MiB of private anonymous memory per process.
    #[arg(long)]
    mib: usize,
    /// Writer threads per process.
    #[arg(long, default_value_t = 2)]
    threads: usize,
    /// Pages written per millisecond per process, all writers together ("max": unlimited).
    #[arg(long, default_value = "1")]
    write_rate: WriteRate,
    /// Log file, appended to (created if missing).
    #[arg(long)]
    log: PathBuf,
    /// Child processes forked at start, each with its own memory, writers, heartbeat and checks.
    #[arg(long, default_value_t = 0)]
    children: usize,
    /// Children inherit the root's initialised memory copy-on-write instead of mapping their own.
    #[arg(long)]
    cow_children: bool,
    /// Periodically fork a verifying child, MADV_DONTNEED and re-initialise pages, mremap a chunk.
    #[arg(long)]
    churn: bool,
    /// Churn period.
    #[arg(long, default_value_t = 200)]
    churn_every_ms: u64,
    /// Full self-check period (0: no checks).
    #[arg(long, default_value_t = 1000)]
    check_every_ms: u64,
    /// Heartbeat period.
    #[arg(long, default_value_t = 1000)]
    heartbeat_us: u64,
    /// Random pages the heartbeat thread itself rewrites before each beat. With `--threads 0
    /// --write-rate 0` one thread both writes memory and heartbeats, so its heartbeat gaps
    /// include every post-copy fault it waits on (e.g. `--hb-writes 100` at the default 1 ms
    /// period: 100 random page writes per ms).
    #[arg(long, default_value_t = 0)]
    hb_writes: u64,
    /// Random pages the heartbeat thread reads before each beat (after its `--hb-writes`): it
    /// loads each page's header and one random word and checks them against the version table
    /// (a failure is logged as a failed check). With `--threads 0 --write-rate 0` a thread that
    /// only reads still waits on every post-copy fault it takes: its beat rate is the speed of
    /// a workload with no writes.
    #[arg(long, default_value_t = 0)]
    hb_reads: u64,
    /// Seed of the page content and of the writers' page choice.
    #[arg(long, default_value_t = 0x5eed)]
    seed: u64,
    /// Park one more thread of the root on a page-aligned stack pointer, which makes every
    /// `criu dump --lazy-pages` of the root come out eager (CRIU's stack-page test; tests use it
    /// to check what pageserv does with such a dump).
    #[arg(long)]
    park_on_aligned_stack: bool,
    /// Leave one more child of the root a zombie (it exits at once and is never reaped), so the
    /// tree is dumped with a task that has no memory.
    #[arg(long)]
    zombie_child: bool,
    /// Write the root's pid (as it sees it: 1 when it is a pid namespace's init) here when ready.
    #[arg(long)]
    pidfile: Option<PathBuf>,
}

/// Set by the SIGTERM/SIGINT handler; the main thread polls it.
static TERMINATE: AtomicBool = AtomicBool::new(false);

extern "C" fn on_terminate(_: libc::c_int) {
    TERMINATE.store(true, Ordering::Relaxed);
}

fn install_signal_handlers() -> anyhow::Result<()> {
    for sig in [libc::SIGTERM, libc::SIGINT] {
        // SAFETY: the handler only stores to an atomic (async-signal-safe).
        let r = unsafe {
            let mut sa: libc::sigaction = std::mem::zeroed();
            sa.sa_sigaction = on_terminate as *const () as usize;
            sa.sa_flags = libc::SA_RESTART;
            libc::sigemptyset(&mut sa.sa_mask);
            libc::sigaction(sig, &sa, std::ptr::null_mut())
        };
        if r != 0 {
            bail!("sigaction({sig}): {}", std::io::Error::last_os_error());
        }
    }
    Ok(())
}

fn main() -> ExitCode {
    let args = Args::parse();
    match start(&args) {
        Ok(code) => ExitCode::from(code),
        Err(e) => {
            eprintln!("workload: {e:#}");
            ExitCode::from(2)
        }
    }
}

/// Forks the children (before any thread exists), then runs the root.
fn start(args: &Args) -> anyhow::Result<u8> {
    if args.threads == 0 && args.write_rate != WriteRate::PerMs(0.0) {
        bail!(
            "--threads 0 cannot write at --write-rate {:?}; use --write-rate 0",
            args.write_rate
        );
    }
    if args.heartbeat_us == 0 || args.churn_every_ms == 0 {
        bail!("--heartbeat-us and --churn-every-ms must be > 0");
    }
    install_signal_handlers()?;
    let log =
        || LogFile::open(&args.log).with_context(|| format!("opening log {}", args.log.display()));
    let root_mem = if args.cow_children {
        Some(
            Memory::new(args.mib, args.seed)
                .with_context(|| format!("mapping {} MiB of workload memory", args.mib))?,
        )
    } else {
        None
    };
    let mut children = Vec::new();
    for k in 1..=args.children {
        // SAFETY: still single-threaded, so the child may do anything.
        let pid = unsafe { libc::fork() };
        if pid < 0 {
            bail!("fork of child c{k}: {}", std::io::Error::last_os_error());
        }
        if pid == 0 {
            // SAFETY: plain prctl; a child must not outlive the root (tests kill the root).
            unsafe { libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM) };
            let mem = match root_mem {
                Some(m) => m,
                None => Memory::new(args.mib, args.seed ^ k as u64)
                    .with_context(|| format!("mapping {} MiB of workload memory", args.mib))?,
            };
            let code = run_process(
                args,
                Shared::new(format!("c{k}"), mem, log()?, writer_count(args)),
                &[],
            );
            std::process::exit(i32::from(code));
        }
        children.push((format!("c{k}"), pid));
    }
    if args.zombie_child {
        // SAFETY: still single-threaded; the child only calls _exit.
        match unsafe { libc::fork() } {
            0 => unsafe { libc::_exit(0) },
            pid if pid < 0 => bail!(
                "fork of the zombie child: {}",
                std::io::Error::last_os_error()
            ),
            _ => {}
        }
    }
    let mem = match root_mem {
        Some(m) => m,
        None => Memory::new(args.mib, args.seed)
            .with_context(|| format!("mapping {} MiB of workload memory", args.mib))?,
    };
    if args.park_on_aligned_stack {
        aligned_stack::spawn()?;
    }
    Ok(run_process(
        args,
        Shared::new("r".into(), mem, log()?, writer_count(args)),
        &children,
    ))
}

fn writer_count(args: &Args) -> usize {
    if args.write_rate == WriteRate::PerMs(0.0) {
        0
    } else {
        args.threads
    }
}

/// Runs one process's threads until SIGTERM; returns its exit status.
fn run_process(args: &Args, sh: Shared, children: &[(String, libc::pid_t)]) -> u8 {
    let mem = &sh.mem;
    for (i, c) in mem.chunks.iter().enumerate() {
        logline!(
            sh.log,
            "chunk {} {i} addr={:#x} first={} pages={}",
            sh.tag,
            c.addr(),
            c.first,
            c.pages
        );
    }
    // SAFETY: getpid has no preconditions.
    let pid = unsafe { libc::getpid() };
    if let Some(path) = args.pidfile.as_ref().filter(|_| sh.tag == "r")
        && let Err(e) = std::fs::write(path, format!("{pid}\n"))
    {
        logline!(
            sh.log,
            "error {} pidfile {:?}: {e}",
            sh.tag,
            path.display().to_string()
        );
    }
    logline!(
        sh.log,
        "ready {} pid={pid} mib={} pages={} chunks={} threads={} unix_ns={}",
        sh.tag,
        args.mib,
        mem.pages,
        mem.chunks.len(),
        sh.writes.len(),
        unix_ns()
    );
    let per_thread = match args.write_rate {
        WriteRate::Max => None,
        WriteRate::PerMs(r) => Some(r / sh.writes.len().max(1) as f64),
    };
    let mut child_status = vec![None; children.len()];
    std::thread::scope(|s| {
        for (i, counter) in sh.writes.iter().enumerate() {
            let (sh, seed) = (
                &sh,
                args.seed ^ ((i as u64 + 1) << 32) ^ u64::from(pid as u32),
            );
            s.spawn(move || writers::run(&sh.mem, per_thread, seed, counter, &sh.stop));
        }
        let hb_seed = args.seed ^ 0x6862 ^ u64::from(pid as u32);
        let hb_sh = &sh;
        s.spawn(move || {
            heartbeat::run(
                hb_sh,
                Duration::from_micros(args.heartbeat_us),
                heartbeat::PerBeat {
                    writes: args.hb_writes,
                    reads: args.hb_reads,
                },
                hb_seed,
            )
        });
        if args.check_every_ms > 0 {
            s.spawn(|| checker::run(&sh, Duration::from_millis(args.check_every_ms)));
        }
        if args.churn {
            s.spawn(|| churn::run(&sh, Duration::from_millis(args.churn_every_ms)));
        }
        while !TERMINATE.load(Ordering::Relaxed) {
            std::thread::sleep(Duration::from_millis(20));
            reap_children(&sh, children, &mut child_status, false);
        }
        sh.stop.store(true, Ordering::Relaxed);
    });
    for (_, pid) in children
        .iter()
        .zip(&child_status)
        .filter(|(_, st)| st.is_none())
        .map(|(c, _)| c)
    {
        // SAFETY: signals our own child.
        unsafe { libc::kill(*pid, libc::SIGTERM) };
    }
    reap_children(&sh, children, &mut child_status, true);
    let (ok, failed, churn_failed) = (
        sh.checks_ok.load(Ordering::Relaxed),
        sh.checks_failed.load(Ordering::Relaxed),
        sh.churn_failed.load(Ordering::Relaxed),
    );
    let children_failed = child_status.iter().filter(|st| **st != Some(0)).count();
    logline!(
        sh.log,
        "exit {} checks_ok={ok} checks_failed={failed} churn_failed={churn_failed} children_failed={children_failed} writes={} reads={} unix_ns={}",
        sh.tag,
        sh.writes_total(),
        sh.hb_reads.0.load(Ordering::Relaxed),
        unix_ns()
    );
    u8::from(failed + churn_failed > 0 || children_failed > 0)
}

/// Collects exited children (blocking if `wait`), logging `child <tag> <child-tag> ...`.
/// Status: the exit code, or 128 + signal.
fn reap_children(
    sh: &Shared,
    children: &[(String, libc::pid_t)],
    status: &mut [Option<i32>],
    wait: bool,
) {
    for ((tag, pid), st) in children.iter().zip(status.iter_mut()) {
        while st.is_none() {
            let mut raw = 0;
            // SAFETY: waits for our own child.
            let r = unsafe { libc::waitpid(*pid, &mut raw, if wait { 0 } else { libc::WNOHANG }) };
            if r == *pid {
                let code = if libc::WIFEXITED(raw) {
                    libc::WEXITSTATUS(raw)
                } else {
                    128 + libc::WTERMSIG(raw)
                };
                *st = Some(code);
                logline!(
                    sh.log,
                    "child {} {tag} pid={pid} status={code} unix_ns={}",
                    sh.tag,
                    unix_ns()
                );
            } else if r < 0
                && std::io::Error::last_os_error().kind() == std::io::ErrorKind::Interrupted
            {
                continue;
            } else if r < 0 {
                *st = Some(-1);
                logline!(
                    sh.log,
                    "child {} {tag} pid={pid} status=-1 unix_ns={}",
                    sh.tag,
                    unix_ns()
                );
            } else {
                break;
            }
        }
    }
}
