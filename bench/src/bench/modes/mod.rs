//! Running one cell once: the mode families, and what every run measures the same way (from
//! the workload's own log and the link's counters, outside the migration tool).
//!
//! Every run gets a fresh [`Testbed::pair`]: the source and destination namespaces joined by
//! the cell's link. A mode runs the workload and its source-side tools on the testbed's source
//! side (`Testbed::in_src`/`enter_src`, or `demo::start_workload`) and the restore in the
//! destination namespace (`Testbed::in_dst`). Adding a mode is a variant in
//! [`Mode`](super::matrix::Mode) and one line in [`runner`].

pub mod criu;
pub mod pageserv;
pub mod runc;

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};

use super::matrix::{Cell, DEFAULT_STEP_TIMEOUT_S, Mode};
use crate::testbed::Testbed;
use crate::testbed::link::Emulator;
use crate::workload_log::Summary;

/// Runs one mode once on a prepared testbed.
pub type Runner = fn(&Cell, &Testbed) -> Result<ModeOutcome>;

/// The runner of each mode that can run.
pub fn runner(mode: Mode) -> Option<Runner> {
    match mode {
        Mode::CriuDisk | Mode::CriuPageserver | Mode::CriuLazy => Some(criu::run),
        Mode::PageservLazy | Mode::PageservPrecopy | Mode::PageservStopAndCopy => {
            Some(pageserv::run)
        }
        Mode::CriuPredump => None,
        Mode::RuncLazy
        | Mode::RuncPageserver
        | Mode::PageservRuncLazy
        | Mode::PageservRuncPrecopy
        | Mode::PageservRuncStopAndCopy => Some(runc::run),
    }
}

/// The testbed tag of bench runs (the demo uses 0).
const BED_TAG: u8 = 2;

/// Seconds any one step of a run may take (see [`set_step_timeout`]).
static STEP_TIMEOUT_S: std::sync::atomic::AtomicU64 =
    std::sync::atomic::AtomicU64::new(DEFAULT_STEP_TIMEOUT_S);

/// Sets how long any one step (a CRIU dump, restore, the lazy transfer) may take.
pub fn set_step_timeout(secs: u64) {
    STEP_TIMEOUT_S.store(secs.max(1), std::sync::atomic::Ordering::Relaxed);
}

/// Extra arguments for every `pageserv src` and `pageserv dst` the bench starts (e.g.
/// `--congestion bbr`, `--realtime`).
#[derive(Debug, Clone, Default)]
pub struct PageservArgs {
    pub src: Vec<String>,
    pub dst: Vec<String>,
}

static PAGESERV_ARGS: std::sync::Mutex<PageservArgs> = std::sync::Mutex::new(PageservArgs {
    src: Vec::new(),
    dst: Vec::new(),
});

pub fn set_pageserv_args(args: PageservArgs) {
    if let Ok(mut a) = PAGESERV_ARGS.lock() {
        *a = args;
    }
}

fn pageserv_args() -> PageservArgs {
    PAGESERV_ARGS.lock().map(|a| a.clone()).unwrap_or_default()
}

/// How long any one step may take.
pub fn step_timeout() -> std::time::Duration {
    std::time::Duration::from_secs(STEP_TIMEOUT_S.load(std::sync::atomic::Ordering::Relaxed))
}

static CRIU_TLS: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Runs criu-pageserver with CRIU's own TLS (`--criu-tls`).
pub fn set_criu_tls(on: bool) {
    CRIU_TLS.store(on, std::sync::atomic::Ordering::Relaxed);
}

/// Whether criu-pageserver runs with CRIU's TLS.
pub fn criu_tls() -> bool {
    CRIU_TLS.load(std::sync::atomic::Ordering::Relaxed)
}

static ONE_THREAD: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Runs the one-thread workload (`--one-thread-workload`): its heartbeat thread itself writes
/// the cell's pages per ms, and no other thread writes.
pub fn set_one_thread_workload(on: bool) {
    ONE_THREAD.store(on, std::sync::atomic::Ordering::Relaxed);
}

/// The workload's (threads, --write-rate, --hb-writes) for a cell's write rate.
pub fn workload_shape(write_rate: u64) -> (u32, String, u64) {
    if ONE_THREAD.load(std::sync::atomic::Ordering::Relaxed) {
        (0, "0".into(), write_rate)
    } else {
        (criu::WORKLOAD_THREADS, write_rate.to_string(), 0)
    }
}

/// Seconds the workload runs at the destination after the migration ended, checking itself.
pub const AFTER_S: u64 = 3;
/// Passed self-checks each process needs after the migration for the run to count.
pub const MIN_CHECKS_AFTER: usize = 2;
/// Rate windows for the post-copy degradation.
pub const RATE_WINDOW_MS: u64 = 10;

/// What one run of one cell measured.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RunRecord {
    pub cell: Cell,
    pub run: u32,
    /// The workload's memory checked out at the destination (ok >= 2, none failed) and every
    /// step succeeded. Unverified runs are never aggregated.
    pub verified: bool,
    pub problems: Vec<String>,
    /// Largest heartbeat gap across the migration.
    pub downtime_ms: Option<f64>,
    /// From the start of the dump to the last page at the destination.
    pub total_ms: Option<f64>,
    /// Bytes that crossed the link (both ways, headers included), or for criu-disk the image
    /// bytes copied.
    pub wire_bytes: Option<u64>,
    pub fault_p50_us: Option<f64>,
    pub fault_p99_us: Option<f64>,
    /// Time the root process wrote below 50% of its pre-migration rate after it ran again.
    pub degraded_ms: Option<f64>,
    /// The root process's write rate from when it ran again to the end of the post-copy, in
    /// percent of its rate in the second before the freeze ("workload speed during the
    /// post-copy"); none when nothing was left to copy after it ran again.
    #[serde(default)]
    pub speed_pct: Option<f64>,
    pub checks_ok_after: u64,
    pub checks_failed: u64,
    /// What joined the namespaces.
    #[serde(default)]
    pub emulator: Option<Emulator>,
    /// Wall-clock seconds of the whole run: testbed, workload start, migration, watch after.
    #[serde(default)]
    pub wall_s: Option<f64>,
    /// linkem's own counters at the end of the run (drops by loss, queue, and `behind` if it
    /// could not keep up; its CPU use).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub link_counters: Option<String>,
    /// CPU and memory of each side and of CRIU's processes (see `bench::usage`).
    #[serde(default)]
    pub usage: Option<super::usage::RunUsage>,
}

/// What a mode reports besides the workload log.
#[derive(Debug, Default)]
pub struct ModeOutcome {
    /// Unix ns when the last page was at the destination (checks after it count).
    pub migrated_ns: u64,
    pub total_ms: Option<f64>,
    /// Set by modes whose bytes do not cross the link (criu-disk: image bytes); otherwise the
    /// link's counters are used.
    pub wire_bytes: Option<u64>,
    pub fault_p50_us: Option<f64>,
    pub fault_p99_us: Option<f64>,
    pub problems: Vec<String>,
    pub log: String,
    pub usage: Option<super::usage::RunUsage>,
}

/// Runs one cell once on a fresh workload and testbed.
pub fn run_once(cell: &Cell, run: u32) -> RunRecord {
    let mut emulator = None;
    let mut link_counters = None;
    let outcome = match runner(cell.mode) {
        Some(r) => on_testbed(cell, r, &mut emulator, &mut link_counters),
        None => Err(anyhow::anyhow!(
            "{}: {}",
            cell.mode.name(),
            cell.mode.unavailable().unwrap_or("not runnable")
        )),
    };
    let mut rec = match outcome {
        Ok(o) => measure(cell, run, o),
        Err(e) => RunRecord {
            cell: cell.clone(),
            run,
            verified: false,
            problems: vec![format!("{e:#}")],
            downtime_ms: None,
            total_ms: None,
            wire_bytes: None,
            fault_p50_us: None,
            fault_p99_us: None,
            degraded_ms: None,
            speed_pct: None,
            checks_ok_after: 0,
            checks_failed: 0,
            emulator: None,
            wall_s: None,
            link_counters: None,
            usage: None,
        },
    };
    rec.emulator = emulator;
    rec.link_counters = link_counters;
    rec
}

/// Makes the cell's testbed, runs the mode on it and counts the bytes that crossed the link.
fn on_testbed(
    cell: &Cell,
    runner: Runner,
    emulator: &mut Option<Emulator>,
    link_counters: &mut Option<String>,
) -> Result<ModeOutcome> {
    let linkem = crate::demo::sibling("linkem")?;
    let mut bed = Testbed::pair(BED_TAG, &cell.link.shape(), &linkem)
        .with_context(|| format!("setting up link {}", cell.link.label()))?;
    *emulator = Some(bed.emulator);
    let before = bed.link_bytes();
    let mut o = runner(cell, &bed)?;
    if o.wire_bytes.is_none() {
        o.wire_bytes = bed
            .link_bytes()
            .zip(before)
            .map(|(a, b)| a.saturating_sub(b));
    }
    *link_counters = bed.stop_link();
    Ok(o)
}

/// Reads the workload log of a finished run: downtime, degradation, verification.
pub fn measure(cell: &Cell, run: u32, o: ModeOutcome) -> RunRecord {
    let wl = Summary::parse(&o.log);
    let mut problems = o.problems;
    let verified = wl.verify_after(o.migrated_ns, MIN_CHECKS_AFTER);
    problems.extend(verified.problems);
    let checks_ok_after = verified.checks_ok_after;
    let gap = wl.max_gap();
    let degraded_ms = gap.zip(wl.tag("r")).and_then(|(g, r)| {
        let before = g.from_ns.saturating_sub(1_000_000_000);
        let normal = r.mean_rate(before, g.from_ns)?;
        (normal > 0.0).then(|| r.time_below_rate(g.to_ns, 0.5, normal, RATE_WINDOW_MS) as f64)
    });
    let speed_pct = gap.zip(wl.tag("r")).and_then(|(g, r)| {
        let normal = r.mean_rate(g.from_ns.saturating_sub(1_000_000_000), g.from_ns)?;
        (normal > 0.0 && !cell.mode.is_stop_and_copy() && o.migrated_ns > g.to_ns + 50_000_000)
            .then(|| r.mean_rate(g.to_ns, o.migrated_ns))
            .flatten()
            .map(|during| 100.0 * during / normal)
    });
    RunRecord {
        cell: cell.clone(),
        run,
        verified: problems.is_empty(),
        problems,
        downtime_ms: gap.map(|g| g.ms),
        total_ms: o.total_ms,
        wire_bytes: o.wire_bytes,
        fault_p50_us: o.fault_p50_us,
        fault_p99_us: o.fault_p99_us,
        degraded_ms,
        speed_pct,
        checks_ok_after,
        checks_failed: wl.checks_failed() as u64,
        emulator: None,
        wall_s: None,
        link_counters: None,
        usage: o.usage,
    }
}
