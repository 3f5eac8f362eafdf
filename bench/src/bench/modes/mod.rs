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

use super::matrix::{Cell, DEFAULT_HB_READS, DEFAULT_STEP_TIMEOUT_S, Mode};
use crate::testbed::Testbed;
use crate::testbed::link::Emulator;
use crate::workload_log::{Count, Summary};

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

static CRIU_KEEP_SOURCE: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// CRIU's stop-and-copy keeps its source stopped until the restore finished
/// (`--criu-keep-source`).
pub fn set_criu_keep_source(on: bool) {
    CRIU_KEEP_SOURCE.store(on, std::sync::atomic::Ordering::Relaxed);
}

/// Whether CRIU's stop-and-copy keeps its source until the restore finished.
pub fn criu_keep_source() -> bool {
    CRIU_KEEP_SOURCE.load(std::sync::atomic::Ordering::Relaxed)
}

/// Whether criu-pageserver runs with CRIU's TLS.
pub fn criu_tls() -> bool {
    CRIU_TLS.load(std::sync::atomic::Ordering::Relaxed)
}

static ONE_THREAD: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);
static HB_READS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(DEFAULT_HB_READS);

/// Runs the one-thread workload (`--one-thread-workload`): its heartbeat thread itself writes
/// the cell's pages per ms, and no other thread writes; in cells with no writes it reads
/// `hb_reads` random pages per beat instead (`--hb-reads`).
pub fn set_one_thread_workload(on: bool, hb_reads: u64) {
    ONE_THREAD.store(on, std::sync::atomic::Ordering::Relaxed);
    HB_READS.store(hb_reads, std::sync::atomic::Ordering::Relaxed);
}

/// Whether the runs use the one-thread workload.
pub fn one_thread_workload() -> bool {
    ONE_THREAD.load(std::sync::atomic::Ordering::Relaxed)
}

/// The workload a cell runs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WorkloadShape {
    /// Writer threads (`--threads`).
    pub threads: u32,
    /// `--write-rate`, pages per ms of the writer threads.
    pub write_rate: String,
    /// Pages the heartbeat thread writes per beat (`--hb-writes`).
    pub hb_writes: u64,
    /// Pages the heartbeat thread reads per beat (`--hb-reads`).
    pub hb_reads: u64,
}

impl WorkloadShape {
    /// The shape for a cell's write rate: with the one-thread workload the heartbeat thread
    /// writes the cell's pages per beat, or reads `hb_reads` pages per beat in a cell with no
    /// writes; otherwise writer threads write them and the heartbeat thread touches nothing.
    pub fn for_cell(one_thread: bool, write_rate: u64, hb_reads: u64) -> Self {
        if one_thread {
            WorkloadShape {
                threads: 0,
                write_rate: "0".into(),
                hb_writes: write_rate,
                hb_reads: if write_rate == 0 { hb_reads } else { 0 },
            }
        } else {
            WorkloadShape {
                threads: criu::WORKLOAD_THREADS,
                write_rate: write_rate.to_string(),
                hb_writes: 0,
                hb_reads: 0,
            }
        }
    }

    /// The workload's arguments beyond `--mib` and `--log` for this shape.
    pub fn args(&self) -> Vec<String> {
        let mut a = vec![
            "--threads".into(),
            self.threads.to_string(),
            "--write-rate".into(),
            self.write_rate.clone(),
        ];
        if self.hb_writes > 0 {
            a.extend(["--hb-writes".into(), self.hb_writes.to_string()]);
        }
        if self.hb_reads > 0 {
            a.extend(["--hb-reads".into(), self.hb_reads.to_string()]);
        }
        a
    }

    /// What the workload's speed counts: heartbeats when its heartbeat thread does the
    /// touching (each beat follows its page writes or reads), else the writers' page writes.
    pub fn speed_count(&self) -> Count {
        if self.hb_writes > 0 || self.hb_reads > 0 {
            Count::Beats
        } else {
            Count::Writes
        }
    }
}

/// The workload of a cell with `write_rate` pages/ms under the bench's settings.
pub fn workload_shape(write_rate: u64) -> WorkloadShape {
    WorkloadShape::for_cell(
        one_thread_workload(),
        write_rate,
        HB_READS.load(std::sync::atomic::Ordering::Relaxed),
    )
}

/// Seconds the workload runs at the destination after the migration ended, checking itself.
pub const AFTER_S: u64 = 3;
/// Passed self-checks each process needs after the migration for the run to count.
pub const MIN_CHECKS_AFTER: usize = 2;
/// Rate windows for the post-copy degradation.
pub const RATE_WINDOW_MS: u64 = 10;
/// A post-copy shorter than this after the freeze gets no speed figure (too short for a rate).
pub const MIN_POST_COPY_NS: u64 = 50_000_000;

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
    /// CRIU's freeze of a lazy dump: the root seen in its ptrace stop to the dump ready (its
    /// status-fd byte), the part of the downtime CRIU spends at the source before anything can
    /// be restored (`pageserv::source::freeze_watch`).
    #[serde(default)]
    pub criu_freeze_ms: Option<f64>,
    /// The restore at the destination: from the images there to the restored tasks running
    /// (`criu restore` for CRIU's modes, timed by the bench; pageserv dst's own `restore_ms`).
    /// Part of every mode's downtime: it runs while the tasks are stopped at both ends.
    #[serde(default)]
    pub restore_ms: Option<f64>,
    /// From the start of the dump to the last page at the destination.
    pub total_ms: Option<f64>,
    /// Bytes that crossed the link (both ways, headers included), or for criu-disk the image
    /// bytes copied.
    pub wire_bytes: Option<u64>,
    pub fault_p50_us: Option<f64>,
    pub fault_p99_us: Option<f64>,
    /// Time the root process ran below 50% of its speed before the migration after it ran
    /// again (the speed counted and "before" taken as for `speed_pct`).
    pub degraded_ms: Option<f64>,
    /// The root process's speed from when it ran again to the end of the post-copy, in percent
    /// of its speed in the second before the migration began ("workload speed during the
    /// post-copy"; pre-copy rounds already slow it before the freeze):
    /// heartbeats per second with the one-thread workload (its thread writes or reads its
    /// pages, then beats), page writes per second with writer threads; none when nothing was
    /// left to copy after it ran again, or when nothing counted ran before (no writes).
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
    /// Unix ns when the migration began (the dump or the first pre-copy round started); 0 if
    /// the mode does not say (then "before" is the second before the freeze).
    pub started_ns: u64,
    /// Unix ns when the last page was at the destination (checks after it count).
    pub migrated_ns: u64,
    pub total_ms: Option<f64>,
    /// Set by modes whose bytes do not cross the link (criu-disk: image bytes); otherwise the
    /// link's counters are used.
    pub wire_bytes: Option<u64>,
    pub fault_p50_us: Option<f64>,
    pub fault_p99_us: Option<f64>,
    /// See [`RunRecord::criu_freeze_ms`].
    pub criu_freeze_ms: Option<f64>,
    /// See [`RunRecord::restore_ms`].
    pub restore_ms: Option<f64>,
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
            criu_freeze_ms: None,
            restore_ms: None,
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
    // Heartbeats per second when the heartbeat thread touches the memory (the one-thread
    // workload, writes or reads), page writes per second otherwise; the same for every mode.
    let count = workload_shape(cell.write_rate).speed_count();
    // "Before" is the second before the migration began, or before the freeze if earlier.
    let before = |g: &crate::workload_log::Gap| match o.started_ns {
        0 => g.from_ns,
        t => t.min(g.from_ns),
    };
    let degraded_ms = gap.zip(wl.tag("r")).and_then(|(g, r)| {
        r.degraded_ms(count, before(&g), g.to_ns, RATE_WINDOW_MS)
            .map(|ms| ms as f64)
    });
    let speed_pct = gap
        .zip(wl.tag("r"))
        .filter(|_| !cell.mode.is_stop_and_copy())
        .and_then(|(g, r)| {
            r.speed_pct(count, before(&g), g.to_ns, o.migrated_ns, MIN_POST_COPY_NS)
        });
    RunRecord {
        cell: cell.clone(),
        run,
        verified: problems.is_empty(),
        problems,
        criu_freeze_ms: o.criu_freeze_ms,
        restore_ms: o.restore_ms,
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_thread_cells_read_only_when_they_do_not_write() {
        let read = WorkloadShape::for_cell(true, 0, 100);
        assert_eq!((read.threads, read.hb_writes, read.hb_reads), (0, 0, 100));
        assert_eq!(
            read.args(),
            ["--threads", "0", "--write-rate", "0", "--hb-reads", "100"]
        );
        assert_eq!(read.speed_count(), Count::Beats);
        let write = WorkloadShape::for_cell(true, 100, 100);
        assert_eq!((write.hb_writes, write.hb_reads), (100, 0));
        assert_eq!(
            write.args(),
            ["--threads", "0", "--write-rate", "0", "--hb-writes", "100"]
        );
        assert_eq!(write.speed_count(), Count::Beats);
        // --hb-reads 0: the 0-write cell's thread touches nothing, and no writes count.
        let idle = WorkloadShape::for_cell(true, 0, 0);
        assert_eq!(idle.args(), ["--threads", "0", "--write-rate", "0"]);
        assert_eq!(idle.speed_count(), Count::Writes);
        // Writer threads: the heartbeat thread touches nothing, the writes are the speed.
        let threads = WorkloadShape::for_cell(false, 0, 100);
        assert_eq!((threads.hb_writes, threads.hb_reads), (0, 0));
        assert_eq!(threads.speed_count(), Count::Writes);
        assert_eq!(
            WorkloadShape::for_cell(false, 100, 100).write_rate,
            "100".to_string()
        );
    }
}
