//! CPU and memory per run: the migration tool's service on each side (pageserv src and dst from
//! their reports; CRIU's dump and its page server or lazy-pages daemon from `wait4`), the dst
//! page store, and every CRIU process of the run apart, over the migration's wall time (the
//! results.md table of them is `report::usage_table`). Pure.

use pageserv::usage::{Rusage, core_pct};
use serde::{Deserialize, Serialize};

/// dst's memory bound besides its page store (issue 18: 64 MiB + the page store).
pub const DST_RSS_BUDGET_BYTES: u64 = 64 << 20;

/// One run's CPU and memory.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct RunUsage {
    /// The wall time the percentages are over: the migration's total.
    pub wall_ms: f64,
    /// The source-side service itself: `pageserv src` (its report, children apart) or, for a
    /// CRIU mode, `criu dump`.
    pub src: Option<Rusage>,
    /// The destination-side service itself: `pageserv dst` (its report, children apart) or
    /// CRIU's `page-server` / `lazy-pages` daemon (none for criu-disk).
    pub dst: Option<Rusage>,
    /// dst's pre-copy page store at its peak (pageserv; 0 without a pre-copy).
    pub page_store_bytes: Option<u64>,
    /// Every CRIU process of the run, by what it was: for CRIU modes each one's `wait4`; for
    /// pageserv the children each service reaped (CRIU's dump under src, restore under dst).
    pub criu: Vec<(String, Rusage)>,
    /// `wait4` of the pageserv processes as the bench reaped them (children included): a
    /// check on their own reports.
    #[serde(default)]
    pub pageserv_wait4: Vec<(String, Rusage)>,
}

impl RunUsage {
    pub fn src_core_pct(&self) -> Option<f64> {
        self.src.and_then(|r| core_pct(r.cpu_ms(), self.wall_ms))
    }

    pub fn dst_core_pct(&self) -> Option<f64> {
        self.dst.and_then(|r| core_pct(r.cpu_ms(), self.wall_ms))
    }

    pub fn dst_peak_rss_bytes(&self) -> Option<u64> {
        self.dst.map(|r| r.max_rss_bytes)
    }

    /// dst's peak RSS over its bound (64 MiB + page store), negative when within it.
    pub fn dst_rss_over_budget(&self) -> Option<i64> {
        let peak = i64::try_from(self.dst_peak_rss_bytes()?).ok()?;
        let store = i64::try_from(self.page_store_bytes.unwrap_or(0)).ok()?;
        Some(peak - DST_RSS_BUDGET_BYTES as i64 - store)
    }

    /// A CRIU mode's usage from the `wait4` of its processes: `criu dump` is the source side,
    /// the page server or lazy-pages daemon the destination side.
    pub fn from_criu(wall_ms: f64, criu: Vec<(String, Rusage)>) -> RunUsage {
        let find = |name: &str| criu.iter().find(|(n, _)| n == name).map(|(_, r)| *r);
        RunUsage {
            wall_ms,
            src: find("criu dump"),
            dst: find("criu page-server").or_else(|| find("criu lazy-pages")),
            page_store_bytes: None,
            criu,
            pageserv_wait4: Vec::new(),
        }
    }
}

/// The first two words of a step's description ("criu restore (in the destination netns)" ->
/// "criu restore"): the name a CRIU process is listed under.
pub fn process_name(what: &str) -> String {
    what.split_whitespace()
        .take(2)
        .collect::<Vec<_>>()
        .join(" ")
}

/// A pageserv mode's usage from the services' `--stats-json` (`usage.own`, `usage.children`,
/// dst's `page_store_bytes`) and the bench's `wait4` of them.
pub fn from_pageserv(
    wall_ms: f64,
    src: &serde_json::Value,
    dst: &serde_json::Value,
    src_wait4: Option<Rusage>,
    dst_wait4: Option<Rusage>,
) -> RunUsage {
    let rusage = |v: &serde_json::Value, part: &str| -> Option<Rusage> {
        serde_json::from_value(v.get("usage")?.get(part)?.clone()).ok()
    };
    let mut criu = Vec::new();
    if let Some(r) = rusage(src, "children") {
        criu.push(("criu dump (under pageserv src)".to_string(), r));
    }
    if let Some(r) = rusage(dst, "children") {
        criu.push(("criu restore (under pageserv dst)".to_string(), r));
    }
    let pageserv_wait4 = [("pageserv src", src_wait4), ("pageserv dst", dst_wait4)]
        .into_iter()
        .filter_map(|(n, r)| Some((n.to_string(), r?)))
        .collect();
    RunUsage {
        wall_ms,
        src: rusage(src, "own"),
        dst: rusage(dst, "own"),
        page_store_bytes: dst.get("page_store_bytes").and_then(|v| v.as_u64()),
        criu,
        pageserv_wait4,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ru(cpu_ms: f64, rss_mib: u64) -> Rusage {
        Rusage {
            user_ms: cpu_ms / 2.0,
            system_ms: cpu_ms / 2.0,
            max_rss_bytes: rss_mib << 20,
        }
    }

    #[test]
    fn pageserv_usage_comes_from_the_reports() {
        let src = serde_json::json!({"usage": {"own": ru(3000.0, 40), "children": ru(1000.0, 20)}});
        let dst = serde_json::json!({"page_store_bytes": 8u64 << 20,
            "usage": {"own": ru(2000.0, 90), "children": ru(500.0, 30)}});
        let u = from_pageserv(10_000.0, &src, &dst, Some(ru(4000.0, 40)), None);
        assert_eq!(u.src_core_pct(), Some(30.0));
        assert_eq!(u.dst_core_pct(), Some(20.0));
        assert_eq!(u.dst_peak_rss_bytes(), Some(90 << 20));
        // 90 - (64 + 8) = 18 MiB over.
        assert_eq!(u.dst_rss_over_budget(), Some(18 << 20));
        assert_eq!(u.criu.len(), 2);
        assert_eq!(u.criu[0].0, "criu dump (under pageserv src)");
        assert_eq!(
            u.pageserv_wait4,
            vec![("pageserv src".into(), ru(4000.0, 40))]
        );
    }

    #[test]
    fn a_report_without_usage_gives_none_not_zero() {
        let u = from_pageserv(
            1000.0,
            &serde_json::Value::Null,
            &serde_json::json!({}),
            None,
            None,
        );
        assert_eq!(u.src_core_pct(), None);
        assert_eq!(u.dst_rss_over_budget(), None);
        assert!(u.criu.is_empty());
    }

    #[test]
    fn criu_modes_pick_dump_and_daemon() {
        let list = vec![
            (
                process_name("criu page-server (destination)"),
                ru(800.0, 10),
            ),
            (process_name("criu dump --page-server"), ru(1200.0, 30)),
            (
                process_name("criu restore (in the destination netns)"),
                ru(400.0, 50),
            ),
        ];
        let u = RunUsage::from_criu(4000.0, list);
        assert_eq!(u.src_core_pct(), Some(30.0));
        assert_eq!(u.dst_core_pct(), Some(20.0));
        assert_eq!(u.dst_peak_rss_bytes(), Some(10 << 20));
        let lazy = RunUsage::from_criu(1000.0, vec![("criu lazy-pages".into(), ru(1000.0, 5))]);
        assert_eq!(lazy.dst_core_pct(), Some(100.0));
        assert_eq!(lazy.src, None);
    }
}
