//! The loop over the matrix: every cell `runs` times, results written after each run so an
//! interrupted bench still leaves its numbers.

use std::path::Path;
use std::time::Instant;

use anyhow::{Context, Result, bail};

use super::clock_step;
use super::machine::Machine;
use super::matrix::Matrix;
use super::modes::{self, RunRecord};
use super::report::{self, Results};
use pageserv::criu::binary::Criu;

/// Deletes testbed namespaces (`psv<pid>-<tag>`, `psv<pid>-<tag>s`) whose creator no longer
/// exists: an interrupted bench leaves them behind, and their addresses would collide.
fn remove_stale_namespaces() {
    let Ok(entries) = std::fs::read_dir("/var/run/netns") else {
        return;
    };
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let Some(pid) = name
            .strip_prefix("psv")
            .and_then(|r| r.split('-').next())
            .and_then(|p| p.parse::<u32>().ok())
        else {
            continue;
        };
        if pid != std::process::id() && !std::path::Path::new(&format!("/proc/{pid}")).exists() {
            tracing::info!("removing namespace {name} left by an earlier run (pid {pid} is gone)");
            let _ = std::process::Command::new("ip")
                .args(["netns", "del", &name])
                .status();
        }
    }
}

/// Runs the matrix and writes results.json, results.md and the plots into `out`. With `quick`
/// it fails unless every run verified.
pub fn run(matrix: &Matrix, out: &Path, quick: bool) -> Result<()> {
    if !nix::unistd::geteuid().is_root() {
        bail!("the bench needs root (network namespaces, CRIU); run it as root");
    }
    let criu = Criu::locate(None)?;
    let pipe_max: u64 = std::fs::read_to_string("/proc/sys/fs/pipe-max-size")
        .ok()
        .and_then(|t| t.trim().parse().ok())
        .unwrap_or(0);
    if pipe_max < 8_388_608 {
        bail!(
            "/proc/sys/fs/pipe-max-size is {pipe_max}, lazy dumps need >= 8388608: run \
             tools/setup-criu or `echo 8388608 > /proc/sys/fs/pipe-max-size`"
        );
    }
    std::fs::create_dir_all(out).with_context(|| format!("creating {}", out.display()))?;
    remove_stale_namespaces();
    let linkem = crate::demo::sibling("linkem")?;
    let mut machine = Machine::probe(&criu, &linkem);
    // The yardstick of the post-copy's goodput, measured in the same run (about 5 s), with the
    // congestion controller pageserv src runs with (`--pageserv-src-arg=--congestion=X`, else
    // the kernel TCP's, which the bench gives pageserv by default).
    let cc =
        crate::bench::quinn_alone_congestion(&matrix.pageserv_src_args, &machine.tcp_congestion);
    // quinn alone on the bare veth and on each other veth link of the run with a rate or an
    // MTU only: the floor under the services' CPU there (256 MiB on a shaped link: a few
    // seconds at 1 Gbit/s).
    let mut links = vec![crate::bench::matrix::Link::UNLIMITED];
    links.extend(
        matrix
            .links
            .iter()
            .filter(|l| **l != crate::bench::matrix::Link::UNLIMITED)
            .filter(|l| l.rtt_us == 0 && l.loss_ppm == 0)
            .cloned(),
    );
    for link in links {
        let mib = if link.rate_bps.is_some() { 256 } else { 1024 };
        match crate::quinn_bulk::measure(mib, &cc, &link) {
            Ok(q) => {
                let (tx, rx) = q.core_pct();
                eprintln!(
                    "[bench] quinn alone over {}: {:.0} MiB/s ({cc}), sender {tx:.0}%, receiver \
                     {rx:.0}% of a core",
                    link.label(),
                    q.mib_s
                );
                if link == crate::bench::matrix::Link::UNLIMITED {
                    machine.quinn_bulk_mib_s = Some(q.mib_s);
                }
                machine.quinn_floor.push(crate::bench::machine::QuinnFloor {
                    link: link.label(),
                    mib_s: q.mib_s,
                    sender_core_pct: tx,
                    receiver_core_pct: rx,
                });
            }
            Err(e) => eprintln!("[bench] quinn over {} not measured: {e:#}", link.label()),
        }
    }
    let cells = matrix.cells();
    let total = cells.len() * matrix.runs as usize;
    let started = Instant::now();
    let mut records: Vec<RunRecord> = Vec::new();
    for run in 0..matrix.runs {
        // Runs outermost: an interrupted bench still has every cell once.
        for cell in &cells {
            let t = Instant::now();
            eprintln!(
                "[bench {}/{total}] {} {} MiB, link {}, {} pages/ms, run {}",
                records.len() + 1,
                cell.mode.name(),
                cell.mib,
                cell.link.label(),
                cell.write_rate,
                run + 1
            );
            let clock_before = clock_step::offset_ns();
            let mut rec = modes::run_once(cell, run);
            rec.wall_s = Some(t.elapsed().as_secs_f64());
            let elapsed_ns = u64::try_from(t.elapsed().as_nanos()).unwrap_or(u64::MAX);
            if let Some(step) =
                clock_step::stepped(clock_before, clock_step::offset_ns(), elapsed_ns)
            {
                rec.verified = false;
                rec.problems.push(clock_step::problem(step));
            }
            eprintln!(
                "[bench] {} in {:.1} s: downtime {:?} ms, total {:?} ms{}",
                if rec.verified { "verified" } else { "FAILED" },
                t.elapsed().as_secs_f64(),
                rec.downtime_ms.map(|v| v.round()),
                rec.total_ms.map(|v| v.round()),
                if rec.problems.is_empty() {
                    String::new()
                } else {
                    format!(": {}", rec.problems.join("; "))
                }
            );
            records.push(rec);
            let results = Results::new(
                machine.clone(),
                matrix.clone(),
                records.clone(),
                started.elapsed().as_secs_f64(),
            );
            report::write(&results, out)?;
        }
    }
    let results = Results::new(
        machine,
        matrix.clone(),
        records,
        started.elapsed().as_secs_f64(),
    );
    report::write(&results, out)?;
    super::plots::write_all(&results, out)?;
    let failed = results.runs.iter().filter(|r| !r.verified).count();
    println!(
        "bench: {} runs in {:.0} s, {failed} failed; results in {}",
        results.runs.len(),
        results.duration_s,
        out.display()
    );
    if quick && failed > 0 {
        bail!("{failed} quick runs did not verify (see results.md)");
    }
    Ok(())
}
