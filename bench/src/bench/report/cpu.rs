//! results.md's "CPU and memory" section: each side's CPU and dst's peak RSS per cell, and
//! quinn's own CPU on the run's links (the floor under the services').

use std::fmt::Write as _;

use super::super::modes::RunRecord;
use super::Stat;

fn fmt_usage(s: Option<Stat>, digits: usize) -> String {
    match s {
        None => "–".into(),
        Some(s) if s.n == 1 => format!("{:.*}", digits, s.median),
        Some(s) => format!(
            "{:.*} ({:.*}–{:.*})",
            digits, s.median, digits, s.min, digits, s.max
        ),
    }
}

/// quinn alone on the run's links: the floor under the services' CPU per link.
pub(super) fn quinn_floor(floor: &[crate::bench::machine::QuinnFloor]) -> String {
    let mut s = String::new();
    if floor.is_empty() {
        return s;
    }
    let _ = writeln!(
        s,
        "\nquinn alone in this run (`pageserv-lab quinn-bulk --link L`: pageserv's transport and \
         congestion controller, one stream, no CRIU, no userfaultfd): the CPU the services cannot \
         go below on that link with quinn.\n\n| link | MiB/s | sender CPU % | receiver CPU % |\n\
         |---|---|---|---|"
    );
    for q in floor {
        let _ = writeln!(
            s,
            "| {} | {:.0} | {:.0} | {:.0} |",
            q.link, q.mib_s, q.sender_core_pct, q.receiver_core_pct
        );
    }
    s
}

/// The results.md section: per cell (verified runs, median (min–max)), each side's CPU in % of
/// a core over the migration, dst's peak RSS against its bound, and CRIU's processes.
pub(super) fn usage_table(runs: &[RunRecord]) -> String {
    let mut s = String::new();
    let _ = writeln!(
        s,
        "\n## CPU and memory\n\nCPU in % of one core over the migration's wall time (user + system). \
         src / dst: the service itself (pageserv's from its report, children apart; for CRIU \
         modes `criu dump` and its page server or lazy-pages daemon, from wait4). dst bound: \
         {} MiB + the page store. CRIU processes: CPU ms (% of a core), peak RSS MiB.\n",
        crate::bench::usage::DST_RSS_BUDGET_BYTES >> 20
    );
    let _ = writeln!(
        s,
        "| mode | MiB | link | dirty pages/ms | src CPU % | dst CPU % | dst peak RSS MiB | page store MiB | dst RSS over bound MiB | workload MiB per src CPU-s | CRIU processes |"
    );
    let _ = writeln!(s, "|---|---|---|---|---|---|---|---|---|---|---|");
    let mut cells: Vec<&crate::bench::matrix::Cell> = Vec::new();
    for r in runs {
        if !cells.contains(&&r.cell) {
            cells.push(&r.cell);
        }
    }
    let mib = |b: u64| b as f64 / (1 << 20) as f64;
    for cell in cells {
        let ok: Vec<&crate::bench::usage::RunUsage> = runs
            .iter()
            .filter(|r| &r.cell == cell && r.verified)
            .filter_map(|r| r.usage.as_ref())
            .collect();
        if ok.is_empty() {
            continue;
        }
        let stat = |f: &dyn Fn(&crate::bench::usage::RunUsage) -> Option<f64>| {
            Stat::of(ok.iter().filter_map(|u| f(u)))
        };
        let mut names: Vec<&str> = Vec::new();
        for u in &ok {
            for (n, _) in &u.criu {
                if !names.contains(&n.as_str()) {
                    names.push(n);
                }
            }
        }
        let criu = names
            .iter()
            .map(|n| {
                let of = |f: &dyn Fn(&pageserv::usage::Rusage, f64) -> Option<f64>| {
                    Stat::of(ok.iter().filter_map(|u| {
                        let r = u.criu.iter().find(|(m, _)| m == n)?;
                        f(&r.1, u.wall_ms)
                    }))
                };
                format!(
                    "{n}: {} ms ({}%), {} MiB",
                    fmt_usage(of(&|r, _| Some(r.cpu_ms())), 0),
                    fmt_usage(of(&|r, w| pageserv::usage::core_pct(r.cpu_ms(), w)), 0),
                    fmt_usage(of(&|r, _| Some(mib(r.max_rss_bytes))), 0),
                )
            })
            .collect::<Vec<_>>()
            .join("; ");
        // The workload's memory per CPU-second of the source side.
        let bytes_per_cpu = |u: &crate::bench::usage::RunUsage| -> Option<f64> {
            let b = pageserv::usage::bytes_per_cpu_s(cell.mib << 20, u.src?.cpu_ms())?;
            Some(b / (1 << 20) as f64)
        };
        let _ = writeln!(
            s,
            "| {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |",
            cell.mode.name(),
            cell.mib,
            if cell.mode.uses_link() {
                cell.link.label()
            } else {
                "(local disk)".into()
            },
            cell.write_rate,
            fmt_usage(stat(&|u| u.src_core_pct()), 0),
            fmt_usage(stat(&|u| u.dst_core_pct()), 0),
            fmt_usage(stat(&|u| u.dst_peak_rss_bytes().map(mib)), 1),
            fmt_usage(stat(&|u| u.page_store_bytes.map(mib)), 1),
            fmt_usage(
                stat(&|u| u.dst_rss_over_budget().map(|b| b as f64 / (1 << 20) as f64)),
                1
            ),
            fmt_usage(stat(&bytes_per_cpu), 0),
            if criu.is_empty() { "–".into() } else { criu },
        );
    }
    s.push('\n');
    s
}

#[cfg(test)]
mod tests {
    use super::super::tests::record;
    use super::*;
    use crate::bench::matrix::Mode;

    #[test]
    fn usage_table_shows_each_side_and_criu_per_cell() {
        let ru = |cpu_ms: f64, mib: u64| pageserv::usage::Rusage {
            user_ms: cpu_ms / 2.0,
            system_ms: cpu_ms / 2.0,
            max_rss_bytes: mib << 20,
        };
        let mut ok = record(Mode::PageservLazy, true, 100.0);
        ok.usage = Some(crate::bench::usage::RunUsage {
            wall_ms: 10_000.0,
            src: Some(ru(3000.0, 30)),
            dst: Some(ru(5000.0, 80)),
            page_store_bytes: Some(0),
            criu: vec![("criu restore".into(), ru(100.0, 10))],
            pageserv_wait4: Vec::new(),
        });
        // A failed run's figures are never aggregated.
        let mut failed = ok.clone();
        failed.verified = false;
        failed.usage = failed.usage.map(|mut u| {
            u.src = Some(ru(9e6, 1));
            u
        });
        let t = usage_table(&[ok, failed]);
        assert!(
            t.contains("| pageserv-lazy | 64 | unlimited | 10 | 30 | 50 | 80.0 | 0.0 | 16.0 | 21 | criu restore: 100 ms (1%), 10 MiB |"),
            "{t}"
        );
    }

    #[test]
    fn quinn_floor_lists_each_link_measured() {
        use crate::bench::machine::QuinnFloor;
        assert!(quinn_floor(&[]).is_empty());
        let t = quinn_floor(&[
            QuinnFloor {
                link: "unlimited".into(),
                mib_s: 402.4,
                sender_core_pct: 75.2,
                receiver_core_pct: 72.0,
            },
            QuinnFloor {
                link: "1gbit".into(),
                mib_s: 112.6,
                sender_core_pct: 33.4,
                receiver_core_pct: 44.6,
            },
        ]);
        assert!(t.contains("| unlimited | 402 | 75 | 72 |"), "{t}");
        assert!(t.contains("| 1gbit | 113 | 33 | 45 |"), "{t}");
    }
}
