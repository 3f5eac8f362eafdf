//! Aggregation and the two result files: results.json (everything) and results.md (tables).
//! Only verified runs are aggregated; failed runs are counted and listed, never averaged in.

use std::fmt::Write as _;
use std::path::Path;

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};

use super::machine::Machine;
use super::matrix::{Cell, Link, Matrix, Mode};
use super::modes::RunRecord;
use crate::testbed::link::Emulator;

mod cpu;
use cpu::{quinn_floor, usage_table};

/// Median, min and max of one metric over a cell's verified runs.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Stat {
    pub median: f64,
    pub min: f64,
    pub max: f64,
    pub n: usize,
}

impl Stat {
    /// None when there are no finite values.
    pub fn of(values: impl IntoIterator<Item = f64>) -> Option<Stat> {
        let mut v: Vec<f64> = values.into_iter().filter(|x| x.is_finite()).collect();
        if v.is_empty() {
            return None;
        }
        v.sort_by(f64::total_cmp);
        let n = v.len();
        let median = if n % 2 == 1 {
            v[n / 2]
        } else {
            (v[n / 2 - 1] + v[n / 2]) / 2.0
        };
        Some(Stat {
            median,
            min: v[0],
            max: v[n - 1],
            n,
        })
    }
}

/// One cell over its runs.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CellSummary {
    pub cell: Cell,
    pub runs: usize,
    pub verified: usize,
    pub downtime_ms: Option<Stat>,
    /// See `RunRecord::criu_freeze_ms`.
    #[serde(default)]
    pub criu_freeze_ms: Option<Stat>,
    /// See `RunRecord::restore_ms`.
    #[serde(default)]
    pub restore_ms: Option<Stat>,
    pub total_ms: Option<Stat>,
    pub wire_bytes: Option<Stat>,
    pub fault_p50_us: Option<Stat>,
    pub fault_p99_us: Option<Stat>,
    pub degraded_ms: Option<Stat>,
    /// Workload speed during the post-copy, % of before.
    #[serde(default)]
    pub speed_pct: Option<Stat>,
    /// Wall-clock seconds per run, setup and the watch afterwards included (all runs).
    #[serde(default)]
    pub wall_s: Option<Stat>,
    /// The first problem of a failed run, if any failed.
    pub first_problem: Option<String>,
}

/// A mode the bench lists but cannot run.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Unavailable {
    pub mode: Mode,
    pub reason: String,
}

/// Everything results.json holds.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Results {
    pub machine: Machine,
    pub matrix: Matrix,
    pub duration_s: f64,
    pub unavailable: Vec<Unavailable>,
    /// What emulated each link (from its runs).
    #[serde(default)]
    pub link_emulators: Vec<(Link, Emulator)>,
    pub cells: Vec<CellSummary>,
    pub runs: Vec<RunRecord>,
}

impl Results {
    pub fn new(machine: Machine, matrix: Matrix, runs: Vec<RunRecord>, duration_s: f64) -> Self {
        let unavailable = matrix
            .unavailable()
            .into_iter()
            .map(|(mode, r)| Unavailable {
                mode,
                reason: format!("not available: {r}"),
            })
            .collect();
        let mut link_emulators: Vec<(Link, Emulator)> = Vec::new();
        for r in &runs {
            if let Some(e) = r.emulator
                && !link_emulators.iter().any(|(l, _)| *l == r.cell.link)
            {
                link_emulators.push((r.cell.link.clone(), e));
            }
        }
        Results {
            cells: summarize(&runs),
            link_emulators,
            machine,
            matrix,
            duration_s,
            unavailable,
            runs,
        }
    }

    /// The cell of `mode` on `link`; for a mode that does not use the link, its cell on any.
    pub fn cell(&self, mode: Mode, mib: u64, link: &Link, rate: u64) -> Option<&CellSummary> {
        self.cells.iter().find(|c| {
            c.cell.mode == mode
                && c.cell.mib == mib
                && (&c.cell.link == link || !mode.uses_link())
                && c.cell.write_rate == rate
        })
    }
}

/// Groups runs by cell (in cell order) and aggregates the verified ones.
pub fn summarize(runs: &[RunRecord]) -> Vec<CellSummary> {
    let mut cells: Vec<Cell> = runs.iter().map(|r| r.cell.clone()).collect();
    cells.sort();
    cells.dedup();
    cells
        .into_iter()
        .map(|cell| {
            let all: Vec<&RunRecord> = runs.iter().filter(|r| r.cell == cell).collect();
            let ok: Vec<&RunRecord> = all.iter().copied().filter(|r| r.verified).collect();
            let stat =
                |f: &dyn Fn(&RunRecord) -> Option<f64>| Stat::of(ok.iter().filter_map(|r| f(r)));
            CellSummary {
                runs: all.len(),
                verified: ok.len(),
                downtime_ms: stat(&|r| r.downtime_ms),
                criu_freeze_ms: stat(&|r| r.criu_freeze_ms),
                restore_ms: stat(&|r| r.restore_ms),
                total_ms: stat(&|r| r.total_ms),
                wire_bytes: stat(&|r| r.wire_bytes.map(|b| b as f64)),
                fault_p50_us: stat(&|r| r.fault_p50_us),
                fault_p99_us: stat(&|r| r.fault_p99_us),
                degraded_ms: stat(&|r| r.degraded_ms),
                speed_pct: stat(&|r| r.speed_pct),
                wall_s: Stat::of(all.iter().filter_map(|r| r.wall_s)),
                first_problem: all
                    .iter()
                    .find(|r| !r.verified)
                    .and_then(|r| r.problems.first().cloned()),
                cell,
            }
        })
        .collect()
}

/// Writes results.json and results.md.
pub fn write(results: &Results, out: &Path) -> Result<()> {
    let json = out.join("results.json");
    std::fs::write(&json, serde_json::to_string_pretty(results)?)
        .with_context(|| format!("writing {}", json.display()))?;
    let md = out.join("results.md");
    std::fs::write(&md, markdown(results)).with_context(|| format!("writing {}", md.display()))
}

fn fmt_stat(s: Option<Stat>, scale: f64, digits: usize) -> String {
    match s {
        None => "–".into(),
        Some(s) if s.n == 1 => format!("{:.*}", digits, s.median / scale),
        Some(s) => format!(
            "{:.*} ({:.*}–{:.*})",
            digits,
            s.median / scale,
            digits,
            s.min / scale,
            digits,
            s.max / scale
        ),
    }
}

fn ratio(a: Option<Stat>, b: Option<Stat>) -> String {
    match (a, b) {
        (Some(a), Some(b)) if b.median > 0.0 => format!("{:.2}", a.median / b.median),
        _ => "–".into(),
    }
}

fn emulator_name(e: Emulator) -> &'static str {
    match e {
        Emulator::Veth => "bare veth",
        Emulator::Netem => "veth + netem",
        Emulator::Linkem => "linkem (TUN, userspace)",
        Emulator::Tbf => "veth + tbf (rate only)",
    }
}

/// The Markdown report: machine, per-cell table, ratios per link, unavailable modes, failures.
pub fn markdown(r: &Results) -> String {
    let mut s = String::new();
    let m = &r.machine;
    let _ = writeln!(s, "# pageserv downtime benchmark\n");
    let _ = writeln!(
        s,
        "Machine: kernel {}, {} cores ({}), {} MiB RAM, CRIU {}, TCP congestion control {}, \
         netem {}. {} runs in {:.0} s.\n",
        m.kernel,
        m.cores,
        m.cpu,
        m.memory_mib,
        m.criu_version,
        if m.tcp_congestion.is_empty() {
            "?"
        } else {
            &m.tcp_congestion
        },
        if m.netem_available {
            "available"
        } else {
            "missing (links emulated by linkem)"
        },
        r.runs.len(),
        r.duration_s
    );
    if let Some(q) = m.quinn_bulk_mib_s {
        let _ = writeln!(
            s,
            "quinn's bulk rate over the bare veth in this run (pageserv's transport, no migration; \
             `pageserv-lab quinn-bulk`): {q:.0} MiB/s. pageserv dst's report gives each \
             post-copy's goodput (MiB/s) to compare with it.\n"
        );
    }
    let shape = if r.matrix.one_thread_workload {
        let reads = if r.matrix.hb_reads > 0 {
            format!(
                "; in cells with no writes it reads {} random pages per beat instead (a header \
                 and a word of each, checked; `--hb-reads`)",
                r.matrix.hb_reads
            )
        } else {
            "; in cells with no writes it touches nothing".to_string()
        };
        format!(
            "one thread that both writes the cell's random pages and heartbeats \
             (`--one-thread-workload`), so its largest heartbeat gap is the felt downtime, first \
             post-copy faults included, in every mode, containers too{reads}"
        )
    } else {
        format!(
            "{} writer threads and a heartbeat thread that touches no migrated memory (its gaps \
             measure the freeze, not the first post-copy faults)",
            super::modes::criu::WORKLOAD_THREADS
        )
    };
    let speed = if r.matrix.one_thread_workload {
        "its heartbeats per second (each beat follows its page writes or reads)"
    } else {
        "the write rate (none at 0 pages/ms)"
    };
    let _ = writeln!(
        s,
        "Workload: bench/workload, {shape}, heartbeat every 1 ms, full self-check every \
         1 s. Downtime = largest heartbeat gap (from the workload's log); of it CRIU's freeze = a \
         lazy dump's root task seen in its ptrace stop to the dump's ready byte (pageserv's \
         and CRIU's lazy modes), the source-side part of the downtime neither can start a \
         restore in; of it the restore = the restore at the destination, from its images there \
         to the restored tasks running (`criu restore -d` timed by the bench for CRIU's modes, \
         pageserv dst's own figure for pageserv's; not for runc). Speed during post-copy \
         = {speed} from when it ran again to the end of the post-copy, in % of the same in the \
         second before the migration began (before any pre-copy round), the same way for every \
         mode. Degraded = time the speed stayed below 50% of that after it ran again ({} ms \
         windows). A run counts only if the workload verified its memory at the destination \
         (>= {} checks ok, none failed) and this host's wall clock did not step during the run \
         (heartbeats are wall-clock times); failed runs are listed, never aggregated. Median \
         (min–max) over verified runs. Source and destination each run in a network namespace \
         of their own (the workload, `criu dump` and `pageserv src` in the source's; page \
         server, lazy-pages daemon, `pageserv dst` and the restore in the destination's), joined \
         by the link; rtt is the round trip the link adds, loss applies to each direction. MiB \
         on the wire = bytes through the source's interface, both ways, headers included. \
         criu-disk copies through local disk: its bytes are the image bytes, the link does not \
         apply and it runs once per size and rate, standing for every link.\n",
        super::modes::RATE_WINDOW_MS,
        super::modes::MIN_CHECKS_AFTER
    );
    if !r.matrix.pageserv_src_args.is_empty() {
        let _ = writeln!(
            s,
            "pageserv src ran with `{}` (unless given, the bench gives pageserv's QUIC the \
             congestion controller of the kernel's TCP, which CRIU's connections use).\n",
            r.matrix.pageserv_src_args.join(" ")
        );
    }
    if r.matrix.criu_tls {
        let _ = writeln!(
            s,
            "criu-pageserver ran with CRIU's own TLS (`--tls`, GnuTLS, certificates of the \
             bench's CA; `--criu-tls`).\n"
        );
    }
    if r.matrix.criu_keep_source {
        let _ = writeln!(
            s,
            "CRIU's stop-and-copy dumped with `--leave-stopped` and its source was killed once \
             the restore finished, as pageserv keeps its source frozen until then \
             (`--criu-keep-source`): its restore cannot reuse the memory the dump freed on this \
             one-VM testbed.\n"
        );
    }
    if !r.matrix.pageserv_dst_args.is_empty() {
        let _ = writeln!(
            s,
            "pageserv dst ran with `{}`.\n",
            r.matrix.pageserv_dst_args.join(" ")
        );
    }
    if !r.link_emulators.is_empty() {
        let _ = writeln!(s, "Links:\n");
        for (l, e) in &r.link_emulators {
            let _ = writeln!(s, "- {}: {}", l.label(), emulator_name(*e));
        }
        let _ = writeln!(s);
    }
    let _ = writeln!(
        s,
        "| mode | MiB | link | dirty pages/ms | verified | downtime ms | of it CRIU's freeze ms | of it the restore ms | total ms | MiB on the wire | fault p50 us | fault p99 us | degraded ms | speed during post-copy % | s per run |"
    );
    let _ = writeln!(
        s,
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"
    );
    for c in &r.cells {
        let verified = if c.verified == 0 {
            format!("**FAILED** 0/{}", c.runs)
        } else if c.verified < c.runs {
            format!("{}/{} (some FAILED)", c.verified, c.runs)
        } else {
            format!("{}/{}", c.verified, c.runs)
        };
        let _ = writeln!(
            s,
            "| {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |",
            c.cell.mode.name(),
            c.cell.mib,
            if c.cell.mode.uses_link() {
                c.cell.link.label()
            } else {
                "(local disk)".into()
            },
            c.cell.write_rate,
            verified,
            fmt_stat(c.downtime_ms, 1.0, 1),
            fmt_stat(c.criu_freeze_ms, 1.0, 1),
            fmt_stat(c.restore_ms, 1.0, 1),
            fmt_stat(c.total_ms, 1.0, 0),
            fmt_stat(c.wire_bytes, 1048576.0, 1),
            fmt_stat(c.fault_p50_us, 1.0, 0),
            fmt_stat(c.fault_p99_us, 1.0, 0),
            fmt_stat(c.degraded_ms, 1.0, 0),
            fmt_stat(c.speed_pct, 1.0, 0),
            fmt_stat(c.wall_s, 1.0, 0),
        );
    }
    ratio_tables(&mut s, r);
    s += &usage_table(&r.runs);
    s += &quinn_floor(&r.machine.quinn_floor);
    let _ = writeln!(s, "\n## Not benchmarked\n");
    for u in &r.unavailable {
        let _ = writeln!(s, "- {}: {}", u.mode.name(), u.reason);
    }
    let failed: Vec<&RunRecord> = r.runs.iter().filter(|x| !x.verified).collect();
    if !failed.is_empty() {
        let _ = writeln!(s, "\n## Failed runs\n");
        for f in failed {
            let problem: String = f.problems.join("; ").chars().take(600).collect();
            let _ = writeln!(
                s,
                "- {} {} MiB, {}, {} pages/ms, run {}: {}",
                f.cell.mode.name(),
                f.cell.mib,
                f.cell.link.label(),
                f.cell.write_rate,
                f.run + 1,
                problem.replace('\n', " / ")
            );
        }
    }
    s
}

/// Per link: each pageserv mode's downtime and total time as ratios to CRIU's post-copy and
/// stop-and-copy modes in the same run; pageserv's container modes against runc's own.
fn ratio_tables(s: &mut String, r: &Results) {
    ratio_table(
        s,
        r,
        "\n## pageserv vs CRIU, per link\n\nRatios of medians from the same bench run; < 1 means \
         pageserv is better. criu-pageserver is CRIU's stop-and-copy over the same link, \
         criu-disk its stop-and-copy through local disk.",
        &[Mode::CriuLazy, Mode::CriuPageserver, Mode::CriuDisk],
        |m| m.is_pageserv() && !m.is_container(),
    );
    if r.matrix.modes.iter().any(|m| m.is_container()) {
        ratio_table(
            s,
            r,
            "\n## Containers: pageserv vs runc, per link\n\nThe workload in a runc container; \
             ratios of medians from the same bench run, < 1 means pageserv is better. runc-lazy \
             is runc's own post-copy (`runc checkpoint --lazy-pages`, `criu lazy-pages`, `runc \
             restore --lazy-pages`), runc-pageserver its stop-and-copy through `criu page-server`.",
            &[Mode::RuncLazy, Mode::RuncPageserver],
            |m| m.is_pageserv() && m.is_container(),
        );
    }
}

fn ratio_table(
    s: &mut String,
    r: &Results,
    title: &str,
    baselines: &[Mode],
    compared: impl Fn(Mode) -> bool,
) {
    let _ = writeln!(s, "{title}");
    let header: Vec<String> = ["downtime", "total"]
        .iter()
        .flat_map(|what| {
            baselines
                .iter()
                .map(move |b| format!("{what} / {}", b.name()))
        })
        .collect();
    for link in &r.matrix.links {
        let mut rows = Vec::new();
        for mode in r.matrix.modes.iter().copied().filter(|m| compared(*m)) {
            for &mib in &r.matrix.sizes_mib {
                for &rate in &r.matrix.write_rates {
                    let Some(ps) = r.cell(mode, mib, link, rate) else {
                        continue;
                    };
                    let get = |b: Mode| r.cell(b, mib, link, rate);
                    let mut cols: Vec<String> = baselines
                        .iter()
                        .map(|&b| ratio(ps.downtime_ms, get(b).and_then(|c| c.downtime_ms)))
                        .collect();
                    cols.extend(
                        baselines
                            .iter()
                            .map(|&b| ratio(ps.total_ms, get(b).and_then(|c| c.total_ms))),
                    );
                    rows.push(format!(
                        "| {} | {mib} | {rate} | {} |",
                        mode.name(),
                        cols.join(" | ")
                    ));
                }
            }
        }
        if rows.is_empty() {
            continue;
        }
        let _ = writeln!(s, "\n### {}\n", link.label());
        let _ = writeln!(
            s,
            "| mode | MiB | dirty pages/ms | {} |",
            header.join(" | ")
        );
        let _ = writeln!(s, "|---|---|---|{}", "---|".repeat(header.len()));
        for row in rows {
            let _ = writeln!(s, "{row}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    pub(super) fn record(mode: Mode, verified: bool, downtime: f64) -> RunRecord {
        RunRecord {
            cell: Cell {
                mode,
                mib: 64,
                link: Link::UNLIMITED,
                write_rate: 10,
            },
            run: 0,
            verified,
            problems: if verified {
                vec![]
            } else {
                vec!["broken".into()]
            },
            downtime_ms: Some(downtime),
            criu_freeze_ms: None,
            restore_ms: None,
            total_ms: Some(downtime * 2.0),
            wire_bytes: None,
            fault_p50_us: None,
            fault_p99_us: None,
            degraded_ms: None,
            speed_pct: None,
            checks_ok_after: 2,
            checks_failed: 0,
            emulator: Some(Emulator::Veth),
            link_counters: None,
            wall_s: Some(5.0),
            usage: None,
        }
    }

    #[test]
    fn stat_takes_median_min_max() {
        let s = Stat::of([3.0, 1.0, 2.0]).unwrap();
        assert_eq!((s.median, s.min, s.max, s.n), (2.0, 1.0, 3.0, 3));
        assert_eq!(Stat::of([1.0, 4.0]).unwrap().median, 2.5);
        assert!(Stat::of([f64::NAN]).is_none());
        assert!(Stat::of([]).is_none());
    }

    #[test]
    fn failed_runs_are_never_averaged_in() {
        let runs = vec![
            record(Mode::CriuLazy, true, 10.0),
            record(Mode::CriuLazy, false, 9999.0),
            record(Mode::CriuLazy, true, 20.0),
            record(Mode::PageservLazy, false, 1.0),
        ];
        let cells = summarize(&runs);
        assert_eq!(cells.len(), 2);
        let lazy = &cells[0];
        assert_eq!(lazy.cell.mode, Mode::CriuLazy);
        assert_eq!((lazy.runs, lazy.verified), (3, 2));
        assert_eq!(lazy.downtime_ms.unwrap().max, 20.0);
        assert_eq!(lazy.first_problem.as_deref(), Some("broken"));
        let ps = &cells[1];
        assert!(ps.downtime_ms.is_none());
    }

    #[test]
    fn markdown_marks_failed_cells_and_lists_unavailable_modes() {
        let machine = Machine {
            kernel: "k".into(),
            cpu: "c".into(),
            cores: 2,
            memory_mib: 1,
            criu_version: "4.1.1".into(),
            criu_path: "criu".into(),
            ..Machine::default()
        };
        let r = Results::new(
            machine,
            Matrix::quick(),
            vec![
                record(Mode::CriuLazy, true, 10.0),
                record(Mode::PageservLazy, false, 1.0),
            ],
            1.0,
        );
        let md = markdown(&r);
        assert!(
            md.contains("| pageserv-lazy | 64 | unlimited | 10 | **FAILED** 0/1 |"),
            "{md}"
        );
        assert!(md.contains("criu-predump: not available"));
        assert!(md.contains("- unlimited: bare veth"), "{md}");
        // The failed pageserv run gives no ratio; the table row still shows the gap.
        assert!(md.contains("### unlimited"), "{md}");
        assert!(
            md.contains("| pageserv-lazy | 64 | 10 | – | – | – |"),
            "{md}"
        );
    }

    #[test]
    fn ratio_tables_compare_pageserv_with_criu_on_each_link() {
        let wan = Link::parse("100mbit+40ms+0.5%").unwrap();
        let mut disk = record(Mode::CriuDisk, true, 400.0);
        // criu-disk ran on the first link only and stands for every link.
        disk.cell.link = Link::UNLIMITED;
        let on_wan = |mode, downtime| {
            let mut r = record(mode, true, downtime);
            r.cell.link = wan.clone();
            r
        };
        let mut m = Matrix::quick();
        m.links = vec![Link::UNLIMITED, wan.clone()];
        let r = Results::new(
            Machine::default(),
            m,
            vec![
                disk,
                on_wan(Mode::CriuLazy, 100.0),
                on_wan(Mode::CriuPageserver, 1000.0),
                on_wan(Mode::PageservLazy, 50.0),
            ],
            1.0,
        );
        let md = markdown(&r);
        assert!(md.contains("### 100mbit+40ms+0.5%"), "{md}");
        assert!(
            md.contains("| pageserv-lazy | 64 | 10 | 0.50 | 0.05 | 0.12 | 0.50 | 0.05 | 0.12 |"),
            "{md}"
        );
        // No pageserv run on the plain link: no table for it.
        assert!(!md.contains("### unlimited"), "{md}");
    }
}
