//! Running one cell once: the mode families, and what every run measures the same way (from
//! the workload's own log, outside the migration tool).

pub mod criu;
pub mod pageserv;

use serde::{Deserialize, Serialize};

use super::matrix::{Cell, Mode};
use crate::workload_log::Summary;

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
    /// Bytes that crossed the link (both ways), or for criu-disk the image bytes copied.
    pub wire_bytes: Option<u64>,
    pub fault_p50_us: Option<f64>,
    pub fault_p99_us: Option<f64>,
    /// Time the root process wrote below 50% of its pre-migration rate after it ran again.
    pub degraded_ms: Option<f64>,
    pub checks_ok_after: u64,
    pub checks_failed: u64,
}

/// What a mode reports besides the workload log.
#[derive(Debug, Default)]
pub struct ModeOutcome {
    /// Unix ns when the last page was at the destination (checks after it count).
    pub migrated_ns: u64,
    pub total_ms: Option<f64>,
    pub wire_bytes: Option<u64>,
    pub fault_p50_us: Option<f64>,
    pub fault_p99_us: Option<f64>,
    pub problems: Vec<String>,
    pub log: String,
}

/// Runs one cell once on a fresh workload and testbed.
pub fn run_once(cell: &Cell, run: u32) -> RunRecord {
    let outcome = match cell.mode {
        Mode::CriuDisk | Mode::CriuPageserver | Mode::CriuLazy => criu::run(cell),
        Mode::PageservLazy => pageserv::run(cell),
        Mode::PageservPrecopy => pageserv::run_pre_copy(cell),
        m => Err(anyhow::anyhow!(
            "{}: {}",
            m.name(),
            m.unavailable().unwrap_or("not runnable")
        )),
    };
    match outcome {
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
            checks_ok_after: 0,
            checks_failed: 0,
        },
    }
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
        checks_ok_after,
        checks_failed: wl.checks_failed() as u64,
    }
}
