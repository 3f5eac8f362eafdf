//! Whether this host's wall clock stepped during a run. The workload stamps its heartbeats with
//! CLOCK_REALTIME (so logs of two hosts compare, `workload_log`), so a step of the wall clock
//! between two heartbeats is read as a stall of that size: on this VM a restore of the VM's
//! snapshot once stepped it by ~22 s in the middle of a 1 GiB run, and that run "felt" 22 s of
//! downtime. The bench reads the wall clock's offset from CLOCK_MONOTONIC before and after each
//! run ([`offset_ns`]); a run whose offset moved more than a clock may slew ([`stepped`]) is not
//! counted. Pure apart from [`offset_ns`].

/// How far the offset may move without a step: 1% of the run for slewing (NTP slews by at most
/// 0.05%; this VM's wall clock ran 0.5% fast against CLOCK_MONOTONIC after a snapshot restore),
/// plus 20 ms for reading the two clocks apart.
pub const SLEW_PPM: u64 = 10_000;
pub const JITTER_NS: u64 = 20_000_000;

/// CLOCK_REALTIME minus CLOCK_MONOTONIC, in ns, read back to back.
pub fn offset_ns() -> i128 {
    let read = |clock| {
        nix::time::clock_gettime(clock)
            .map(|t| i128::from(t.tv_sec()) * 1_000_000_000 + i128::from(t.tv_nsec()))
            .unwrap_or(0)
    };
    read(nix::time::ClockId::CLOCK_REALTIME) - read(nix::time::ClockId::CLOCK_MONOTONIC)
}

/// The step (ns, signed) if the offset moved from `before` to `after` over `elapsed_ns` by more
/// than slewing allows.
pub fn stepped(before: i128, after: i128, elapsed_ns: u64) -> Option<i128> {
    let moved = after - before;
    let allowed = i128::from(elapsed_ns) * i128::from(SLEW_PPM) / 1_000_000 + i128::from(JITTER_NS);
    (moved.abs() > allowed).then_some(moved)
}

/// The problem a stepped run is listed with.
pub fn problem(step_ns: i128) -> String {
    format!(
        "this host's wall clock stepped by {:+.0} ms during the run (CLOCK_REALTIME against \
         CLOCK_MONOTONIC); the workload's heartbeats are wall-clock times, so its gaps are not \
         trustworthy: the run is not counted (run the bench again)",
        step_ns as f64 / 1e6
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_step_is_told_from_slewing() {
        let s = 1_000_000_000i128;
        // The 22 s step seen on this VM, in an 11 s run.
        assert_eq!(stepped(5 * s, 27 * s, 11_000_000_000), Some(22 * s));
        assert_eq!(stepped(27 * s, 5 * s, 11_000_000_000), Some(-22 * s));
        // 0.5% slew over 11 s (55 ms) and jitter are not steps; 200 ms is.
        assert_eq!(stepped(0, 55_000_000, 11_000_000_000), None);
        assert_eq!(stepped(0, -15_000_000, 1_000_000), None);
        assert_eq!(stepped(0, 200_000_000, 1_000_000_000), Some(200_000_000));
        assert!(problem(22 * s).contains("+22000 ms"));
    }

    #[test]
    fn the_offset_is_read_from_the_real_clocks() {
        let (a, b) = (offset_ns(), offset_ns());
        assert!(a > 0, "the wall clock is past the boot time");
        assert!(stepped(a, b, 0).is_none(), "{a} then {b}");
    }
}
