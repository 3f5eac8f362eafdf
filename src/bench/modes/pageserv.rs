//! pageserv modes: post-copy, and pre-copy rounds + post-copy, through the demo's own migration
//! (same testbed, same workload).

use anyhow::Result;

use super::{AFTER_S, ModeOutcome};
use crate::bench::matrix::Cell;
use crate::demo::{self, DemoArgs};

/// `pageserv src --lazy` + `pageserv dst` on a fresh testbed, as `pageserv demo` runs them.
pub fn run(cell: &Cell) -> Result<ModeOutcome> {
    run_with(cell, Vec::new())
}

/// The same with `--pre-copy auto`: rounds while the workload runs, then post-copy of what
/// changed after the last round.
pub fn run_pre_copy(cell: &Cell) -> Result<ModeOutcome> {
    run_with(cell, vec!["--pre-copy=auto".into()])
}

fn run_with(cell: &Cell, src_args: Vec<String>) -> Result<ModeOutcome> {
    let args = DemoArgs {
        mib: cell.mib,
        threads: super::criu::WORKLOAD_THREADS,
        write_rate: cell.write_rate.to_string(),
        children: 0,
        churn: false,
        rate: cell.link.tc_rate().map(str::to_string),
        external_dump: false,
        after: AFTER_S,
        json: None,
        src_args,
        dst_args: Vec::new(),
    };
    let r = demo::migrate(&args)?;
    let f = |v: &serde_json::Value, path: &[&str]| -> Option<f64> {
        path.iter().try_fold(v, |v, k| v.get(k))?.as_f64()
    };
    Ok(ModeOutcome {
        migrated_ns: r.migrated_unix_ns,
        total_ms: f(&r.src, &["total_ms"]),
        wire_bytes: f(&r.dst, &["bytes_received"]).map(|b| b as u64),
        fault_p50_us: f(&r.dst, &["fault_latency", "p50_us"]),
        fault_p99_us: f(&r.dst, &["fault_latency", "p99_us"]),
        problems: r.problems,
        log: r.workload_log,
    })
}
