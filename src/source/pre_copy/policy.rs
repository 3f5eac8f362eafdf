//! When to stop the pre-copy rounds and freeze (sans-IO).
//!
//! `--pre-copy N` runs exactly N rounds. `--pre-copy auto` stops after a round when any of these
//! holds, checked in this order:
//! 1. the round bound ([`AutoRule::max_rounds`]) or the time bound ([`AutoRule::max_time`]) is
//!    reached;
//! 2. the changed set is small: at most [`AutoRule::small_fraction`] of the pages read, or at most
//!    [`AutoRule::small_pages`] pages, since freezing now costs no more than that much post-copy;
//! 3. from the second round on, the round shrank the changed set by less than
//!    [`AutoRule::min_shrink`] against the round before: the workload dirties memory about as fast
//!    as the rounds copy it, and more rounds would only resend the same pages.
//!
//! The first round copies everything (its "changed set" is all memory), so rule 3 starts with the
//! second round.

use std::time::Duration;

/// How many rounds to run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PreCopyMode {
    /// Exactly this many rounds (at least 1).
    Rounds(u32),
    /// Stop by [`AutoRule`].
    Auto,
}

impl std::str::FromStr for PreCopyMode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        if s == "auto" {
            return Ok(PreCopyMode::Auto);
        }
        match s.parse::<u32>() {
            Ok(n) if (1..=1000).contains(&n) => Ok(PreCopyMode::Rounds(n)),
            _ => Err(format!(
                "--pre-copy {s:?}: give a number of rounds (1..=1000) or \"auto\""
            )),
        }
    }
}

/// The `auto` stop rule's thresholds.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AutoRule {
    /// A round must shrink the changed set by at least this fraction to earn another round.
    pub min_shrink: f64,
    /// A changed set at most this fraction of the pages read is small enough to freeze.
    pub small_fraction: f64,
    /// A changed set of at most this many pages is small enough to freeze.
    pub small_pages: u64,
    pub max_rounds: u32,
    pub max_time: Duration,
}

impl Default for AutoRule {
    fn default() -> Self {
        Self {
            min_shrink: 0.2,
            small_fraction: 0.01,
            small_pages: 1024, // 4 MiB
            max_rounds: 10,
            max_time: Duration::from_secs(60),
        }
    }
}

/// What one finished round measured, as the rule sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RoundOutcome {
    pub pages_read: u64,
    /// Pages that were new to dst or differed from its copy.
    pub pages_changed: u64,
}

/// Why the rounds ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum StopReason {
    /// `--pre-copy N` ran its N rounds.
    RoundsDone,
    MaxRounds,
    MaxTime,
    SmallChangedSet,
    NotShrinking,
}

/// After a round: go on, or freeze now and why.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    Continue,
    Stop(StopReason),
}

/// Decides after each round; `rounds` holds every finished round, oldest first, and `elapsed`
/// is the time since the first round started.
pub fn decide(
    mode: PreCopyMode,
    rule: &AutoRule,
    rounds: &[RoundOutcome],
    elapsed: Duration,
) -> Decision {
    let Some(last) = rounds.last() else {
        return Decision::Continue;
    };
    let n = rounds.len() as u32;
    match mode {
        PreCopyMode::Rounds(want) if n >= want => Decision::Stop(StopReason::RoundsDone),
        PreCopyMode::Rounds(_) => Decision::Continue,
        PreCopyMode::Auto => {
            if n >= rule.max_rounds {
                return Decision::Stop(StopReason::MaxRounds);
            }
            if elapsed >= rule.max_time {
                return Decision::Stop(StopReason::MaxTime);
            }
            let small = (last.pages_read as f64 * rule.small_fraction) as u64;
            if last.pages_changed <= small.max(rule.small_pages) {
                return Decision::Stop(StopReason::SmallChangedSet);
            }
            if let [.., before, last] = rounds
                && rounds.len() >= 2
                && last.pages_changed as f64 > before.pages_changed as f64 * (1.0 - rule.min_shrink)
            {
                return Decision::Stop(StopReason::NotShrinking);
            }
            Decision::Continue
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn r(read: u64, changed: u64) -> RoundOutcome {
        RoundOutcome {
            pages_read: read,
            pages_changed: changed,
        }
    }

    const S: Duration = Duration::from_secs(1);

    #[test]
    fn parses_the_flag() {
        assert_eq!("auto".parse(), Ok(PreCopyMode::Auto));
        assert_eq!("3".parse(), Ok(PreCopyMode::Rounds(3)));
        assert!("0".parse::<PreCopyMode>().is_err());
        assert!("x".parse::<PreCopyMode>().is_err());
    }

    #[test]
    fn fixed_rounds_run_exactly_n() {
        let m = PreCopyMode::Rounds(2);
        let rule = AutoRule::default();
        assert_eq!(decide(m, &rule, &[], S), Decision::Continue);
        assert_eq!(decide(m, &rule, &[r(100, 100)], S), Decision::Continue);
        assert_eq!(
            decide(m, &rule, &[r(100, 100), r(100, 1)], S),
            Decision::Stop(StopReason::RoundsDone)
        );
    }

    #[test]
    fn auto_stops_for_each_reason() {
        let rule = AutoRule::default();
        let a = PreCopyMode::Auto;
        let big = 262_144;
        // Round 1 copies everything: go on.
        assert_eq!(decide(a, &rule, &[r(big, big)], S), Decision::Continue);
        // Shrinks a lot: go on.
        assert_eq!(
            decide(a, &rule, &[r(big, big), r(big, 20_000)], S),
            Decision::Continue
        );
        // Shrinks by only 10%: stop.
        assert_eq!(
            decide(a, &rule, &[r(big, big), r(big, 20_000), r(big, 18_000)], S),
            Decision::Stop(StopReason::NotShrinking)
        );
        // Small: < 1% of memory.
        assert_eq!(
            decide(a, &rule, &[r(big, big), r(big, 2_000)], S),
            Decision::Stop(StopReason::SmallChangedSet)
        );
        // Small in absolute terms, even when it is a large share of a tiny memory.
        assert_eq!(
            decide(a, &rule, &[r(1000, 1000)], S),
            Decision::Stop(StopReason::SmallChangedSet)
        );
        assert_eq!(
            decide(a, &rule, &[r(big, big)], rule.max_time),
            Decision::Stop(StopReason::MaxTime)
        );
        let many: Vec<_> = (0..rule.max_rounds as u64)
            .map(|i| r(big, big >> i))
            .collect();
        assert_eq!(
            decide(a, &rule, &many, S),
            Decision::Stop(StopReason::MaxRounds)
        );
    }

    proptest! {
        /// auto always ends within max_rounds, whatever the workload does.
        #[test]
        fn auto_is_bounded(changed in prop::collection::vec(0u64..1_000_000, 1..30)) {
            let rule = AutoRule::default();
            let mut rounds = Vec::new();
            for c in changed {
                rounds.push(r(1_000_000, c));
                if let Decision::Stop(_) = decide(PreCopyMode::Auto, &rule, &rounds, S) {
                    break;
                }
            }
            prop_assert!(rounds.len() as u32 <= rule.max_rounds);
        }
    }
}
