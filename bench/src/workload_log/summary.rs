//! Aggregates of a workload log, per process tag: heartbeat gaps (downtime), checks, write rate
//! over time windows (post-copy slowdown).

use super::{Check, ChildExit, ChunkInfo, Churn, Event, Exit, Heartbeat, ParseError, Ready};
use std::collections::BTreeMap;

/// At most this many windows per rate query, whatever the timestamps claim.
const MAX_WINDOWS: u64 = 1_000_000;
const NS_PER_MS: u64 = 1_000_000;
const NS_PER_S: u64 = 1_000_000_000;

/// The time between two consecutive heartbeats of one process.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Gap {
    pub ms: f64,
    /// The heartbeat before the gap.
    pub from_ns: u64,
    pub from_seq: u64,
    /// The heartbeat after the gap.
    pub to_ns: u64,
    pub to_seq: u64,
}

/// Everything one process (`r`, `c1`, ...) logged.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct TagSummary {
    pub tag: String,
    pub ready: Option<Ready>,
    pub exit: Option<Exit>,
    pub chunks: Vec<ChunkInfo>,
    /// In log order.
    pub heartbeats: Vec<Heartbeat>,
    pub checks: Vec<Check>,
    pub churn: Vec<Churn>,
    /// Children this process reaped.
    pub children: Vec<ChildExit>,
    /// `error` lines.
    pub errors: Vec<String>,
}

/// A whole log: per-tag summaries plus the lines that did not parse.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Summary {
    pub tags: BTreeMap<String, TagSummary>,
    pub errors: Vec<ParseError>,
}

/// Whether a migrated workload verified its memory (see [`Summary::verify_after`]).
#[derive(Debug, Clone, Default)]
pub struct Verification {
    /// The fewest passing checks any process had after the migration.
    pub checks_ok_after: u64,
    /// What was wrong; empty when the workload verified.
    pub problems: Vec<String>,
}

impl Summary {
    /// The verification rule for a migrated workload, used by the demo, the tests and the
    /// bench alike: the log is readable, no check failed anywhere, and every process of the
    /// tree passed at least `min_ok` whole-memory checks after `migrated_ns`.
    pub fn verify_after(&self, migrated_ns: u64, min_ok: usize) -> Verification {
        let mut problems = Vec::new();
        if !self.errors.is_empty() {
            problems.push(format!("unreadable workload log lines: {:?}", self.errors));
        }
        if self.checks_failed() > 0 {
            problems.push(format!(
                "{} memory self-checks failed: {:?}",
                self.checks_failed(),
                self.first_fail()
            ));
        }
        let mut checks_ok_after = u64::MAX;
        for (tag, t) in &self.tags {
            let (ok, failed) = t.checks_between(migrated_ns, u64::MAX);
            checks_ok_after = checks_ok_after.min(ok as u64);
            if ok < min_ok || failed > 0 {
                problems.push(format!(
                    "process {tag}: {ok} checks ok, {failed} failed after the migration"
                ));
            }
        }
        if self.tags.is_empty() {
            checks_ok_after = 0;
            problems.push("the workload log is empty".into());
        }
        Verification {
            checks_ok_after,
            problems,
        }
    }

    /// Parses the complete lines of a log text.
    pub fn parse(text: &str) -> Self {
        let (events, errors) = super::parse_log(text);
        Summary {
            errors,
            ..Self::from_events(events)
        }
    }

    /// Aggregates events in log order.
    pub fn from_events(events: impl IntoIterator<Item = Event>) -> Self {
        let mut s = Summary::default();
        for e in events {
            let t = s
                .tags
                .entry(e.tag().to_string())
                .or_insert_with(|| TagSummary {
                    tag: e.tag().to_string(),
                    ..TagSummary::default()
                });
            match e {
                Event::Chunk(c) => t.chunks.push(c),
                Event::Ready(r) => t.ready = Some(r),
                Event::Heartbeat { hb, .. } => t.heartbeats.push(hb),
                Event::Check(c) => t.checks.push(c),
                Event::Churn(c) => t.churn.push(c),
                Event::Child(c) => t.children.push(c),
                Event::Exit(x) => t.exit = Some(x),
                Event::Error { text, .. } => t.errors.push(text),
            }
        }
        s
    }

    pub fn tag(&self, tag: &str) -> Option<&TagSummary> {
        self.tags.get(tag)
    }

    /// Passed checks, all processes.
    pub fn checks_ok(&self) -> usize {
        self.tags.values().map(TagSummary::checks_ok).sum()
    }

    /// Failed checks, all processes.
    pub fn checks_failed(&self) -> usize {
        self.tags.values().map(TagSummary::checks_failed).sum()
    }

    /// The earliest failed check of any process.
    pub fn first_fail(&self) -> Option<&Check> {
        self.tags
            .values()
            .filter_map(TagSummary::first_fail)
            .min_by_key(|c| c.unix_ns)
    }

    /// The largest heartbeat gap of any process.
    pub fn max_gap(&self) -> Option<Gap> {
        self.max_gap_between(0, u64::MAX)
    }

    /// The largest heartbeat gap of any process that overlaps `[from_ns, to_ns]`.
    pub fn max_gap_between(&self, from_ns: u64, to_ns: u64) -> Option<Gap> {
        self.tags
            .values()
            .filter_map(|t| t.max_gap_between(from_ns, to_ns))
            .max_by(|a, b| a.ms.total_cmp(&b.ms))
    }
}

impl TagSummary {
    pub fn checks_ok(&self) -> usize {
        self.checks.iter().filter(|c| c.ok).count()
    }

    pub fn checks_failed(&self) -> usize {
        self.checks.iter().filter(|c| !c.ok).count()
    }

    pub fn first_fail(&self) -> Option<&Check> {
        self.checks.iter().find(|c| !c.ok)
    }

    /// (passed, failed) checks that ended within `[from_ns, to_ns]`.
    pub fn checks_between(&self, from_ns: u64, to_ns: u64) -> (usize, usize) {
        let within = || {
            self.checks
                .iter()
                .filter(move |c| (from_ns..=to_ns).contains(&c.unix_ns))
        };
        (
            within().filter(|c| c.ok).count(),
            within().filter(|c| !c.ok).count(),
        )
    }

    /// How many churn lines of kind `what` (fork, forkchild, dontneed, reinit, mremap) had
    /// verdict `ok`.
    pub fn churn_count(&self, what: &str, ok: bool) -> usize {
        self.churn
            .iter()
            .filter(|c| c.what == what && c.ok == ok)
            .count()
    }

    /// The largest gap between consecutive heartbeats (downtime of this process).
    pub fn max_gap(&self) -> Option<Gap> {
        self.max_gap_between(0, u64::MAX)
    }

    /// The largest gap between consecutive heartbeats whose span overlaps `[from_ns, to_ns]`
    /// (a gap that starts before `from_ns` and ends inside counts whole).
    pub fn max_gap_between(&self, from_ns: u64, to_ns: u64) -> Option<Gap> {
        self.heartbeats
            .windows(2)
            .filter(|w| w[1].unix_ns >= from_ns && w[0].unix_ns <= to_ns)
            .map(|w| Gap {
                ms: w[1].unix_ns.saturating_sub(w[0].unix_ns) as f64 / 1e6,
                from_ns: w[0].unix_ns,
                from_seq: w[0].seq,
                to_ns: w[1].unix_ns,
                to_seq: w[1].seq,
            })
            .max_by(|a, b| a.ms.total_cmp(&b.ms))
    }

    /// Heartbeat samples (unix_ns, count) sorted by time for interpolation.
    fn samples(&self, what: Count) -> Vec<(u64, u64)> {
        let mut s: Vec<(u64, u64)> = self
            .heartbeats
            .iter()
            .map(|h| (h.unix_ns, what.of(h)))
            .collect();
        s.sort_by_key(|&(t, _)| t);
        s
    }

    /// Total writes at `t_ns`, interpolated linearly between heartbeats; None outside them.
    pub fn writes_at(&self, t_ns: u64) -> Option<f64> {
        count_at(&self.samples(Count::Writes), t_ns)
    }

    /// Write rate over consecutive windows of `window_ms` from the first heartbeat: (window
    /// start unix_ns, writes per second). Only whole windows; during downtime the rate is ~0.
    pub fn write_rate(&self, window_ms: u64) -> Vec<(u64, f64)> {
        match self.heartbeats.iter().map(|h| h.unix_ns).min() {
            Some(t0) => self.write_rate_from(t0, window_ms),
            None => Vec::new(),
        }
    }

    /// As [`Self::write_rate`], windows starting at `start_ns`.
    pub fn write_rate_from(&self, start_ns: u64, window_ms: u64) -> Vec<(u64, f64)> {
        self.rate_from(Count::Writes, start_ns, window_ms)
    }

    /// Rate of `what` (per second) over consecutive windows of `window_ms` starting at
    /// `start_ns`: (window start unix_ns, rate). Only whole windows inside the heartbeats.
    pub fn rate_from(&self, what: Count, start_ns: u64, window_ms: u64) -> Vec<(u64, f64)> {
        let samples = self.samples(what);
        let (Some(&(first, _)), Some(&(last, _))) = (samples.first(), samples.last()) else {
            return Vec::new();
        };
        let window_ns = window_ms.saturating_mul(NS_PER_MS);
        if window_ns == 0 || start_ns < first || start_ns >= last {
            return Vec::new();
        }
        let n = ((last - start_ns) / window_ns).min(MAX_WINDOWS);
        (0..n)
            .filter_map(|k| {
                let a = start_ns + k * window_ns;
                let wa = count_at(&samples, a)?;
                let wb = count_at(&samples, a + window_ns)?;
                Some((a, ((wb - wa) / window_ms as f64 * 1e3).max(0.0)))
            })
            .collect()
    }

    /// Mean write rate (writes per second) over `[from_ns, to_ns]`, clamped to the heartbeats.
    pub fn mean_rate(&self, from_ns: u64, to_ns: u64) -> Option<f64> {
        self.mean_rate_of(Count::Writes, from_ns, to_ns)
    }

    /// Mean rate of `what` (per second) over `[from_ns, to_ns]`, clamped to the heartbeats;
    /// None when less than no time is left. `Count::Beats` is heartbeats per second: the speed
    /// of the one-thread workload, whose thread touches its pages and then beats.
    pub fn mean_rate_of(&self, what: Count, from_ns: u64, to_ns: u64) -> Option<f64> {
        let samples = self.samples(what);
        let a = from_ns.max(samples.first()?.0);
        let b = to_ns.min(samples.last()?.0);
        if b <= a {
            return None;
        }
        let dw = count_at(&samples, b)? - count_at(&samples, a)?;
        Some((dw / ((b - a) as f64 / 1e9)).max(0.0))
    }

    /// Milliseconds after `after_ns` spent below `fraction` of `normal_per_s` (writes per
    /// second), counted in whole windows of `window_ms` starting at `after_ns`.
    pub fn time_below_rate(
        &self,
        after_ns: u64,
        fraction: f64,
        normal_per_s: f64,
        window_ms: u64,
    ) -> u64 {
        self.time_below(Count::Writes, after_ns, fraction, normal_per_s, window_ms)
    }

    /// As [`Self::time_below_rate`] for the rate of `what`.
    pub fn time_below(
        &self,
        what: Count,
        after_ns: u64,
        fraction: f64,
        normal_per_s: f64,
        window_ms: u64,
    ) -> u64 {
        let floor = fraction * normal_per_s;
        let below = self
            .rate_from(what, after_ns, window_ms)
            .iter()
            .filter(|(_, r)| *r < floor)
            .count() as u64;
        below * window_ms
    }

    /// "Workload speed during the post-copy": the mean rate of `what` from `resumed_ns` (the
    /// heartbeat that ended the freeze) to `end_ns` (the last page at the destination), in
    /// percent of its mean rate over the second before `before_ns` (when the migration began:
    /// pre-copy rounds already slow the workload, so the second before the freeze is not
    /// "before"). None when the rate before was 0 (nothing to compare with) or when less than
    /// `min_ns` of post-copy was left after the freeze (too short to be a rate).
    pub fn speed_pct(
        &self,
        what: Count,
        before_ns: u64,
        resumed_ns: u64,
        end_ns: u64,
        min_ns: u64,
    ) -> Option<f64> {
        let normal = self.mean_rate_of(what, before_ns.saturating_sub(NS_PER_S), before_ns)?;
        if normal <= 0.0 || end_ns <= resumed_ns.saturating_add(min_ns) {
            return None;
        }
        let during = self.mean_rate_of(what, resumed_ns, end_ns)?;
        Some(100.0 * during / normal)
    }

    /// Milliseconds after `resumed_ns` in windows of `window_ms` where the rate of `what` was
    /// below half its mean over the second before `before_ns`; None when that mean was 0.
    pub fn degraded_ms(
        &self,
        what: Count,
        before_ns: u64,
        resumed_ns: u64,
        window_ms: u64,
    ) -> Option<u64> {
        let normal = self.mean_rate_of(what, before_ns.saturating_sub(NS_PER_S), before_ns)?;
        (normal > 0.0).then(|| self.time_below(what, resumed_ns, 0.5, normal, window_ms))
    }
}

/// What a rate counts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Count {
    /// Page writes (`writes_total`): all writer threads and the heartbeat thread's.
    Writes,
    /// Heartbeats (their sequence numbers): with the one-thread workload every beat follows
    /// its page writes or reads, so beats per second is how fast that thread works.
    Beats,
}

impl Count {
    fn of(self, h: &Heartbeat) -> u64 {
        match self {
            Count::Writes => h.writes,
            Count::Beats => h.seq,
        }
    }
}

fn count_at(samples: &[(u64, u64)], t: u64) -> Option<f64> {
    let i = samples.partition_point(|&(ts, _)| ts < t);
    let &(tb, wb) = samples.get(i)?;
    if tb == t {
        return Some(wb as f64);
    }
    let &(ta, wa) = samples.get(i.checked_sub(1)?)?;
    let frac = (t - ta) as f64 / (tb - ta) as f64;
    Some(wa as f64 + (wb as f64 - wa as f64) * frac)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::workload_log::{LineError, parse_line};
    use proptest::prelude::*;

    const T0: u64 = 1_700_000_000_000_000_000;

    /// Heartbeats every `period_ms`, `rate` writes per ms, with a stall of `stall_ms` after
    /// heartbeat `stall_at`.
    fn synthetic(n: u64, period_ms: u64, rate: u64, stall_at: u64, stall_ms: u64) -> String {
        let mut log =
            format!("ready r pid=1 mib=64 pages=16384 chunks=16 threads=2 unix_ns={T0}\n");
        let mut t = T0;
        let mut w = 0;
        for seq in 0..n {
            log += &format!("hb r {seq} {t} {w}\n");
            let dt = if seq == stall_at { stall_ms } else { period_ms };
            t += dt * NS_PER_MS;
            if seq != stall_at {
                w += rate * dt;
            }
            if seq % 100 == 99 {
                log += &format!("check r ok pages=16384 ms=12.5 skipped=0 zero=1024 unix_ns={t}\n");
            }
        }
        log
    }

    #[test]
    fn a_repeated_heartbeat_is_a_rollback() {
        let (ev, _) = crate::workload_log::parse_log(&synthetic(50, 1, 1, 0, 1));
        assert!(crate::workload_log::rolled_back_heartbeats(&ev).is_empty());
        let log = format!(
            "{}hb r 30 {T0} 0\nhb c1 3 {T0} 0\n",
            synthetic(50, 1, 1, 0, 1)
        );
        let (ev, _) = crate::workload_log::parse_log(&log);
        assert_eq!(
            crate::workload_log::rolled_back_heartbeats(&ev),
            vec![("r".to_string(), 30)]
        );
    }

    #[test]
    fn finds_the_stall_as_max_gap() {
        let s = Summary::parse(&synthetic(1000, 1, 5, 400, 250));
        assert!(s.errors.is_empty(), "{:?}", s.errors);
        let g = s.max_gap().unwrap();
        assert_eq!((g.ms, g.from_seq, g.to_seq), (250.0, 400, 401));
        assert_eq!(g.from_ns, T0 + 400 * NS_PER_MS);
        // Outside the stall the gaps are 1 ms.
        let before = s.max_gap_between(T0, T0 + 300 * NS_PER_MS).unwrap();
        assert_eq!(before.ms, 1.0);
        // A window inside the stall still sees the whole gap.
        let inside = s
            .max_gap_between(T0 + 500 * NS_PER_MS, T0 + 501 * NS_PER_MS)
            .unwrap();
        assert_eq!(inside.ms, 250.0);
        assert_eq!(s.checks_ok(), 10);
        assert_eq!(s.tag("r").unwrap().ready.as_ref().unwrap().pid, 1);
    }

    #[test]
    fn write_rate_drops_to_zero_during_the_stall() {
        let s = Summary::parse(&synthetic(1000, 1, 5, 400, 250));
        let r = s.tag("r").unwrap();
        let rates = r.write_rate(50);
        assert!(
            rates[..8].iter().all(|&(_, x)| (x - 5000.0).abs() < 1e-6),
            "{rates:?}"
        );
        // Windows fully inside [400, 650) ms are zero.
        assert!(rates[9..12].iter().all(|&(_, x)| x == 0.0), "{rates:?}");
        let normal = r.mean_rate(T0, T0 + 400 * NS_PER_MS).unwrap();
        assert!((normal - 5000.0).abs() < 1e-6);
        let below = r.time_below_rate(T0 + 400 * NS_PER_MS, 0.5, normal, 10);
        assert_eq!(below, 250);
    }

    #[test]
    fn partial_last_line_is_ignored_and_bad_lines_are_reported() {
        let s = Summary::parse("hb r 0 10 0\nbogus x\nhb r 1 20\nhb r 2 3");
        assert_eq!(s.tag("r").unwrap().heartbeats.len(), 1);
        assert_eq!(s.errors.len(), 2);
        assert_eq!(s.errors[0].line, 2);
        assert!(matches!(s.errors[0].error, LineError::UnknownKind(_)));
        assert!(matches!(
            s.errors[1].error,
            LineError::Missing {
                field: "writes_total",
                ..
            }
        ));
    }

    #[test]
    fn parses_every_line_kind_the_workload_writes() {
        let lines = [
            "chunk r 3 addr=0x7f00 first=3072 pages=1024",
            "check c1 FAIL page=1000 reason=payload word=17 expected=0x1 found=0x2 bad=1 pages=16384 ms=3.5 unix_ns=9",
            "churn r fork ok pid=77 chunk=0 ms=1.5 unix_ns=5",
            "churn r fork FAIL pid=77 chunk=0 status=0x100 unix_ns=5",
            "churn r forkchild FAIL chunk=2 page=9 reason=nonzero word=0 found=0x1",
            "churn r dontneed first=0 count=64 unix_ns=6",
            "churn r mremap FAIL error=\"Cannot allocate memory (os error 12)\" unix_ns=7",
            "child r c2 pid=12 status=0 unix_ns=8",
            "exit r checks_ok=3 checks_failed=1 churn_failed=0 children_failed=0 writes=99 unix_ns=10",
            "error r pidfile \"/x\": denied",
        ];
        let s = Summary::parse(&(lines.join("\n") + "\n"));
        assert!(s.errors.is_empty(), "{:?}", s.errors);
        let r = s.tag("r").unwrap();
        assert_eq!(r.chunks[0].addr, 0x7f00);
        assert_eq!(
            (r.churn_count("fork", true), r.churn_count("fork", false)),
            (1, 1)
        );
        assert_eq!(r.churn_count("forkchild", false), 1);
        assert_eq!(r.churn_count("mremap", false), 1);
        assert_eq!(r.churn[0].detail, "pid=77 chunk=0 ms=1.5 unix_ns=5");
        assert_eq!(r.children[0].child, "c2");
        assert_eq!(r.exit.as_ref().unwrap().checks_failed, 1);
        assert_eq!(r.errors, ["pidfile \"/x\": denied"]);
        let fail = s.first_fail().unwrap();
        assert_eq!(fail.tag, "c1");
        let f = fail.fail.as_ref().unwrap();
        assert_eq!((f.page, f.reason.as_str()), (1000, "payload"));
        assert!(f.detail.starts_with("word=17 "));
        assert_eq!(
            parse_line("check r maybe pages=1 ms=1 unix_ns=1"),
            Err(LineError::BadVerdict("maybe".into()))
        );
    }

    /// A one-thread workload's log: a beat every `period_ms` with `per_beat` writes and
    /// `reads` reads before it; the freeze is a gap of `freeze_ms` after beat `freeze_at`, then
    /// beats every `slow_ms` for `slow_beats` beats (the post-copy), then every `period_ms`.
    fn one_thread(
        per_beat: u64,
        reads: u64,
        (period_ms, freeze_at, freeze_ms): (u64, u64, u64),
        (slow_ms, slow_beats): (u64, u64),
        n: u64,
    ) -> (String, u64, u64, u64) {
        let (mut log, mut t) = (String::new(), T0);
        let (mut frozen, mut resumed, mut end) = (0, 0, 0);
        for seq in 0..n {
            log += &format!("hb r {seq} {t} {} reads={}\n", seq * per_beat, seq * reads);
            let dt = if seq == freeze_at {
                frozen = t;
                freeze_ms
            } else if seq > freeze_at && seq <= freeze_at + slow_beats {
                slow_ms
            } else {
                period_ms
            };
            if seq == freeze_at + 1 {
                resumed = t;
            }
            if seq == freeze_at + slow_beats + 1 {
                end = t;
            }
            t += dt * NS_PER_MS;
        }
        (log, frozen, resumed, end)
    }

    #[test]
    fn speed_of_a_reading_thread_is_its_beat_rate_against_before() {
        // 0 writes, 100 reads a beat; 1 ms beats, a 200 ms freeze, then 4 ms beats for 500
        // beats (2 s of post-copy): 25% of the speed before.
        let (log, frozen, resumed, end) = one_thread(0, 100, (1, 1500, 200), (4, 500), 3000);
        let s = Summary::parse(&log);
        assert!(s.errors.is_empty(), "{:?}", s.errors);
        let r = s.tag("r").unwrap();
        assert_eq!(r.heartbeats[10].reads, 1000);
        let beats = r
            .speed_pct(Count::Beats, frozen, resumed, end, 50 * NS_PER_MS)
            .unwrap();
        assert!((beats - 25.0).abs() < 1e-9, "{beats}");
        // No writes: the write rate has nothing to compare.
        assert_eq!(
            r.speed_pct(Count::Writes, frozen, resumed, end, 50 * NS_PER_MS),
            None
        );
        assert_eq!(r.degraded_ms(Count::Writes, frozen, resumed, 10), None);
        // Every 10 ms window of the 2 s post-copy is below half speed, nothing after it.
        assert_eq!(r.degraded_ms(Count::Beats, frozen, resumed, 10), Some(2000));
        // A post-copy shorter than the minimum is no rate.
        assert_eq!(
            r.speed_pct(
                Count::Beats,
                frozen,
                resumed,
                resumed + NS_PER_MS,
                50 * NS_PER_MS
            ),
            None
        );
    }

    #[test]
    fn before_is_the_second_before_the_migration_not_the_slowed_pre_copy() {
        // 1 ms beats, then 2 ms beats during 1 s of pre-copy rounds, a freeze, 4 ms beats for
        // 2 s of post-copy.
        let (mut log, mut t) = (String::new(), T0);
        let mut seq = 0;
        let mut beat = |log: &mut String, t: &mut u64, dt_ms: u64| {
            *log += &format!("hb r {seq} {t} 0 reads={}\n", seq * 100);
            seq += 1;
            *t += dt_ms * NS_PER_MS;
        };
        (0..2000).for_each(|_| beat(&mut log, &mut t, 1));
        let started = t;
        (0..499).for_each(|_| beat(&mut log, &mut t, 2));
        let frozen = t;
        beat(&mut log, &mut t, 300);
        let resumed = t;
        (0..500).for_each(|_| beat(&mut log, &mut t, 4));
        let end = t;
        (0..500).for_each(|_| beat(&mut log, &mut t, 1));
        let s = Summary::parse(&log);
        let r = s.tag("r").unwrap();
        let min = 50 * NS_PER_MS;
        let from_start = r
            .speed_pct(Count::Beats, started, resumed, end, min)
            .unwrap();
        assert!((from_start - 25.0).abs() < 1e-6, "{from_start}");
        // Against the second before the freeze (pre-copy already at half speed) it would be 50%.
        let from_freeze = r
            .speed_pct(Count::Beats, frozen, resumed, end, min)
            .unwrap();
        assert!((from_freeze - 50.0).abs() < 0.2, "{from_freeze}");
        assert_eq!(
            r.degraded_ms(Count::Beats, started, resumed, 10),
            Some(2000)
        );
    }

    #[test]
    fn logs_without_reads_parse_with_zero_reads() {
        let s = Summary::parse(&synthetic(20, 1, 5, 100, 1));
        assert!(s.tag("r").unwrap().heartbeats.iter().all(|h| h.reads == 0));
        let e =
            parse_line("exit r checks_ok=1 checks_failed=0 writes=3 reads=7 unix_ns=9").unwrap();
        assert!(matches!(e, crate::workload_log::Event::Exit(x) if (x.writes, x.reads) == (3, 7)));
        let e = parse_line(
            "check r FAIL page=9 reason=payload word=4 expected=0x1 found=0x2 bad=1 pages=100 ms=0.250 by=hb unix_ns=5",
        )
        .unwrap();
        let crate::workload_log::Event::Check(c) = e else {
            panic!("{e:?}")
        };
        assert!(!c.ok && c.cpu_ms.is_none() && c.pages == 100);
        assert_eq!(c.fail.unwrap().page, 9);
    }

    proptest! {
        #[test]
        fn parser_never_panics(line in "\\PC{0,200}") {
            let _ = parse_line(&line);
            let _ = Summary::parse(&line);
        }

        #[test]
        fn max_gap_is_the_largest_interval(gaps in proptest::collection::vec(0u64..10_000, 1..200)) {
            let mut log = String::new();
            let mut t = T0;
            for (seq, g) in gaps.iter().enumerate() {
                log += &format!("hb c1 {seq} {t} {seq}\n");
                t += g * 1000;
            }
            log += &format!("hb c1 {} {t} 0\n", gaps.len());
            let s = Summary::parse(&log);
            let g = s.max_gap().unwrap();
            let want = *gaps.iter().max().unwrap();
            prop_assert_eq!(g.ms, (want * 1000) as f64 / 1e6);
            prop_assert_eq!(g.to_ns - g.from_ns, want * 1000);
        }

        /// With a fixed number of writes per beat, the write rate is that many times the beat
        /// rate, so a write cell's speed is the same figure counted either way.
        #[test]
        fn beat_speed_equals_write_speed_of_the_one_thread_workload(
            per_beat in 1u64..200,
            period_ms in 1u64..4,
            freeze_ms in 5u64..500,
            slow_ms in 1u64..30,
            slow_beats in 20u64..400,
        ) {
            let (log, frozen, resumed, end) =
                one_thread(per_beat, 0, (period_ms, 1200, freeze_ms), (slow_ms, slow_beats), 2000);
            let s = Summary::parse(&log);
            let r = s.tag("r").unwrap();
            let min = 10 * NS_PER_MS;
            let beats = r.speed_pct(Count::Beats, frozen, resumed, end, min).unwrap();
            let writes = r.speed_pct(Count::Writes, frozen, resumed, end, min).unwrap();
            prop_assert!((beats - writes).abs() < 1e-6, "{} vs {}", beats, writes);
            let want = 100.0 * period_ms as f64 / slow_ms as f64;
            prop_assert!((beats - want).abs() < 1e-6 * want, "{} vs {}", beats, want);
        }

        /// The speed is a ratio of rates: never negative, and a log whose beats keep their
        /// period through the "post-copy" runs at 100%.
        #[test]
        fn an_unchanged_beat_period_is_full_speed(
            period_ms in 1u64..5,
            freeze_ms in 1u64..300,
            beats in 20u64..300,
        ) {
            let (log, frozen, resumed, end) =
                one_thread(0, 10, (period_ms, 1100, freeze_ms), (period_ms, beats), 1600);
            let s = Summary::parse(&log);
            let r = s.tag("r").unwrap();
            let v = r.speed_pct(Count::Beats, frozen, resumed, end, 0).unwrap();
            prop_assert!((v - 100.0).abs() < 1e-6, "{}", v);
            prop_assert_eq!(r.degraded_ms(Count::Beats, frozen, resumed, 10), Some(0));
        }

        #[test]
        fn window_rates_add_up_to_total_writes(
            steps in proptest::collection::vec((1u64..20, 0u64..100), 2..300),
            window_ms in 1u64..50,
        ) {
            let mut log = String::new();
            let (mut t, mut w) = (T0, 0u64);
            for (seq, (dt_ms, dw)) in steps.iter().enumerate() {
                log += &format!("hb r {seq} {t} {w}\n");
                t += dt_ms * NS_PER_MS;
                w += dw;
            }
            let s = Summary::parse(&log);
            let r = s.tag("r").unwrap();
            let rates = r.write_rate(window_ms);
            let covered = rates.len() as u64 * window_ms * NS_PER_MS;
            let sum: f64 = rates.iter().map(|(_, x)| x * window_ms as f64 / 1e3).sum();
            let want = r.writes_at(T0 + covered).unwrap_or(0.0) - r.writes_at(T0).unwrap();
            prop_assert!((sum - want).abs() < 1e-6 * want.max(1.0), "{} vs {}", sum, want);
        }
    }
}
