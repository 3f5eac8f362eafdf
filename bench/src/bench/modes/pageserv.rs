//! pageserv modes: post-copy, pre-copy rounds + post-copy, and stop-and-copy, through the demo's
//! own migration (same testbed, same workload).

use anyhow::Result;

use super::{AFTER_S, ModeOutcome};
use crate::bench::matrix::{Cell, Mode};
use crate::demo::{self, DemoArgs};
use crate::testbed::Testbed;

/// Extra `pageserv src` arguments that make each pageserv mode (the demo runs `src --lazy`),
/// then the bench's `--pageserv-src-arg`s.
fn src_args(mode: Mode, extra: &[String]) -> Vec<String> {
    let mut args: Vec<String> = match mode {
        Mode::PageservLazy => Vec::new(),
        Mode::PageservPrecopy => vec!["--pre-copy=auto".into()],
        _ => Vec::new(),
    };
    args.extend(extra.iter().cloned());
    args
}

/// `pageserv src` + `pageserv dst` on `bed`, as `pageserv demo` runs them: the workload and
/// `src` on the source side, `dst` in the destination namespace.
pub fn run(cell: &Cell, bed: &Testbed) -> Result<ModeOutcome> {
    let extra = super::pageserv_args();
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
        stop_and_copy: cell.mode == Mode::PageservStopAndCopy,
        after: AFTER_S,
        json: None,
        src_args: src_args(cell.mode, &extra.src),
        dst_args: extra.dst,
        workload_args: Vec::new(),
        cut_link: 0.0,
        kill: None,
        fault_after_ms: 0,
        retry: false,
        restart_dst_after_ms: None,
    };
    let r = demo::migrate_on(bed, &args, Some(super::step_timeout()))?;
    // Only post-copy has faults; a stop-and-copy restore has none to time.
    let lazy = cell.mode != Mode::PageservStopAndCopy;
    let f = |v: &serde_json::Value, path: &[&str]| -> Option<f64> {
        path.iter().try_fold(v, |v, k| v.get(k))?.as_f64()
    };
    let total_ms = f(&r.src, &["total_ms"]);
    let usage = crate::bench::usage::from_pageserv(
        total_ms.unwrap_or(0.0),
        &r.src,
        &r.dst,
        r.src_rusage,
        r.dst_rusage,
    );
    Ok(ModeOutcome {
        started_ns: r.started_unix_ns,
        migrated_ns: r.migrated_unix_ns,
        total_ms,
        wire_bytes: None,
        fault_p50_us: lazy
            .then(|| f(&r.dst, &["fault_latency", "p50_us"]))
            .flatten(),
        fault_p99_us: lazy
            .then(|| f(&r.dst, &["fault_latency", "p99_us"]))
            .flatten(),
        criu_freeze_ms: f(&r.src, &["dump_phases", "criu_freeze_ms"]),
        restore_ms: f(&r.dst, &["restore_ms"]),
        problems: r.problems,
        log: r.workload_log,
        usage: Some(usage),
    })
}
