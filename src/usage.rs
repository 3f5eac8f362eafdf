//! What a service costs its host: CPU time (user and system) and peak resident memory of the
//! process itself and, kept apart, of the children it started and reaped (CRIU's dump and
//! restore, pageserv's own helpers), from `getrusage(2)`; and the ratios the reports print
//! (percent of a core over the migration's wall time, bytes moved per CPU-second).
//!
//! [`ServiceUsage::from_parts`] and the ratio functions are pure; [`ServiceUsage::measure`] and
//! [`Rusage::of`] are the thin shells that ask the kernel.

use serde::{Deserialize, Serialize};

/// CPU time and peak RSS of one process (or of the reaped children of one).
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq)]
pub struct Rusage {
    pub user_ms: f64,
    pub system_ms: f64,
    /// `ru_maxrss`: for a process its VmHWM; for reaped children the largest one's.
    pub max_rss_bytes: u64,
}

/// Whose usage [`Rusage::of`] reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Who {
    /// This process, all its threads.
    Own,
    /// The children this process waited for (and theirs, if they waited for them).
    Children,
}

impl Rusage {
    /// User plus system time.
    pub fn cpu_ms(&self) -> f64 {
        self.user_ms + self.system_ms
    }

    /// From the kernel's `struct rusage` (`ru_maxrss` is in KiB on Linux).
    pub fn from_raw(r: &libc::rusage) -> Rusage {
        let ms = |t: libc::timeval| t.tv_sec as f64 * 1e3 + t.tv_usec as f64 / 1e3;
        Rusage {
            user_ms: ms(r.ru_utime),
            system_ms: ms(r.ru_stime),
            max_rss_bytes: u64::try_from(r.ru_maxrss).unwrap_or(0) * 1024,
        }
    }

    /// `getrusage(2)` of this process or of its reaped children; zero if the call fails (it
    /// only fails on a bad argument).
    pub fn of(who: Who) -> Rusage {
        let which = match who {
            Who::Own => libc::RUSAGE_SELF,
            Who::Children => libc::RUSAGE_CHILDREN,
        };
        let mut r = std::mem::MaybeUninit::<libc::rusage>::zeroed();
        // SAFETY: getrusage writes a whole `struct rusage` into the pointer it is given.
        let rc = unsafe { libc::getrusage(which, r.as_mut_ptr()) };
        if rc != 0 {
            return Rusage::default();
        }
        // SAFETY: zero-initialised, then filled by the kernel.
        Rusage::from_raw(unsafe { r.assume_init_ref() })
    }

    /// The sum of several processes' usage; the peak is the largest one's (they need not
    /// have run at the same time).
    pub fn sum<'a>(all: impl IntoIterator<Item = &'a Rusage>) -> Rusage {
        all.into_iter().fold(Rusage::default(), |a, r| Rusage {
            user_ms: a.user_ms + r.user_ms,
            system_ms: a.system_ms + r.system_ms,
            max_rss_bytes: a.max_rss_bytes.max(r.max_rss_bytes),
        })
    }
}

/// `cpu_ms` over `wall_ms` in percent of one core (200 = two cores busy); none without a wall
/// time.
pub fn core_pct(cpu_ms: f64, wall_ms: f64) -> Option<f64> {
    (wall_ms > 0.0 && cpu_ms >= 0.0).then(|| 100.0 * cpu_ms / wall_ms)
}

/// Bytes moved per CPU-second; none without CPU time.
pub fn bytes_per_cpu_s(bytes: u64, cpu_ms: f64) -> Option<f64> {
    (cpu_ms > 0.0).then(|| bytes as f64 / (cpu_ms / 1e3))
}

/// A service's costs over one migration, as its report and `--stats-json` carry them.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct ServiceUsage {
    /// The service process itself, from its start to the report.
    pub own: Rusage,
    /// The children it started and reaped by the report (CRIU dump or restore, helpers).
    pub children: Rusage,
    /// The wall time the percentages are over: the migration's total.
    pub wall_ms: f64,
    /// Bytes the service moved: UDP bytes sent (src) or received (dst).
    pub bytes_moved: u64,
    /// The service's own CPU in percent of a core over `wall_ms`.
    pub own_core_pct: Option<f64>,
    /// Its children's CPU in percent of a core over `wall_ms`.
    pub children_core_pct: Option<f64>,
    /// `bytes_moved` per CPU-second of the service itself.
    pub bytes_per_cpu_s: Option<f64>,
}

impl ServiceUsage {
    /// Pure: the figures and ratios from the two usages.
    pub fn from_parts(own: Rusage, children: Rusage, wall_ms: f64, bytes_moved: u64) -> Self {
        ServiceUsage {
            own,
            children,
            wall_ms,
            bytes_moved,
            own_core_pct: core_pct(own.cpu_ms(), wall_ms),
            children_core_pct: core_pct(children.cpu_ms(), wall_ms),
            bytes_per_cpu_s: bytes_per_cpu_s(bytes_moved, own.cpu_ms()),
        }
    }

    /// This process's usage now, against the migration's `wall_ms` and `bytes_moved`.
    pub fn measure(wall_ms: f64, bytes_moved: u64) -> Self {
        Self::from_parts(
            Rusage::of(Who::Own),
            Rusage::of(Who::Children),
            wall_ms,
            bytes_moved,
        )
    }

    /// Two report lines: the service, then its children.
    pub fn render(&self) -> String {
        let mib = |b: u64| b as f64 / (1 << 20) as f64;
        let pct = |p: Option<f64>| p.map_or_else(|| "-".into(), |p| format!("{p:.0}%"));
        let rate = self.bytes_per_cpu_s.map_or_else(
            || "-".into(),
            |r| format!("{:.0} MiB", r / (1 << 20) as f64),
        );
        format!(
            "  CPU {:.0} ms (user {:.0}, system {:.0}) = {} of a core over {:.0} ms; peak RSS {:.1} MiB; {rate} moved per CPU-second\n\
             \x20 children (CRIU, helpers) CPU {:.0} ms (user {:.0}, system {:.0}) = {}; largest peak RSS {:.1} MiB\n",
            self.own.cpu_ms(),
            self.own.user_ms,
            self.own.system_ms,
            pct(self.own_core_pct),
            self.wall_ms,
            mib(self.own.max_rss_bytes),
            self.children.cpu_ms(),
            self.children.user_ms,
            self.children.system_ms,
            pct(self.children_core_pct),
            mib(self.children.max_rss_bytes),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn ru(user_ms: f64, system_ms: f64, rss: u64) -> Rusage {
        Rusage {
            user_ms,
            system_ms,
            max_rss_bytes: rss,
        }
    }

    #[test]
    fn ratios_of_a_migration() {
        let u = ServiceUsage::from_parts(
            ru(300.0, 200.0, 80 << 20),
            ru(50.0, 50.0, 1 << 20),
            2000.0,
            1 << 30,
        );
        assert_eq!(u.own_core_pct, Some(25.0));
        assert_eq!(u.children_core_pct, Some(5.0));
        // 1 GiB in half a CPU-second.
        assert_eq!(u.bytes_per_cpu_s, Some(2.0 * (1u64 << 30) as f64));
        let text = u.render();
        assert!(text.contains("CPU 500 ms (user 300, system 200) = 25% of a core over 2000 ms"));
        assert!(text.contains("peak RSS 80.0 MiB; 2048 MiB moved per CPU-second"));
        assert!(text.contains("children (CRIU, helpers) CPU 100 ms (user 50, system 50) = 5%"));
    }

    #[test]
    fn no_wall_time_or_no_cpu_gives_no_ratio() {
        let u = ServiceUsage::from_parts(Rusage::default(), Rusage::default(), 0.0, 10);
        assert_eq!(u.own_core_pct, None);
        assert_eq!(u.bytes_per_cpu_s, None);
        assert!(u.render().contains("= - of a core"));
    }

    #[test]
    fn raw_rusage_converts_kib_and_microseconds() {
        // SAFETY: rusage is plain old data; all-zero is a valid value.
        let mut r: libc::rusage = unsafe { std::mem::zeroed() };
        r.ru_utime.tv_sec = 1;
        r.ru_utime.tv_usec = 500_000;
        r.ru_stime.tv_usec = 2_000;
        r.ru_maxrss = 2048;
        assert_eq!(Rusage::from_raw(&r), ru(1500.0, 2.0, 2 << 20));
    }

    #[test]
    fn this_process_has_used_some_cpu_and_memory() {
        let mut x = 0u64;
        for i in 0..2_000_000u64 {
            x = x.wrapping_mul(31).wrapping_add(i);
        }
        std::hint::black_box(x);
        let own = Rusage::of(Who::Own);
        assert!(own.cpu_ms() > 0.0, "{own:?}");
        assert!(own.max_rss_bytes > 1 << 20, "{own:?}");
    }

    proptest! {
        #[test]
        fn sum_adds_time_and_keeps_the_largest_peak(
            a in (0.0..1e6f64, 0.0..1e6f64, 0u64..1 << 40),
            b in (0.0..1e6f64, 0.0..1e6f64, 0u64..1 << 40),
        ) {
            let (x, y) = (ru(a.0, a.1, a.2), ru(b.0, b.1, b.2));
            let s = Rusage::sum([&x, &y]);
            prop_assert!((s.cpu_ms() - (x.cpu_ms() + y.cpu_ms())).abs() < 1e-6);
            prop_assert_eq!(s.max_rss_bytes, a.2.max(b.2));
        }

        #[test]
        fn core_pct_scales_with_cpu_and_inverts_with_wall(cpu in 0.0..1e7f64, wall in 1.0..1e7f64) {
            let p = core_pct(cpu, wall).unwrap_or(-1.0);
            prop_assert!((p * wall / 100.0 - cpu).abs() < 1e-3 * cpu.max(1.0));
            prop_assert_eq!(core_pct(cpu, 0.0), None);
        }
    }
}
