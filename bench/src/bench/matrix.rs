//! What the bench runs: modes, links, and the matrix of cells (pure, no IO).

use serde::{Deserialize, Serialize};

use crate::testbed::link::LinkShape;

/// CRIU's lazy-pages daemon needs minutes for 1 GiB on the slower links; a step (a dump, a
/// restore, the lazy transfer) longer than this and the run counts as failed (it did not
/// finish), named so in the report.
pub const DEFAULT_STEP_TIMEOUT_S: u64 = 300;
/// Pages the one-thread workload's heartbeat thread reads per beat in cells with no writes
/// unless `--hb-reads` says otherwise: 100 random pages per 1 ms beat, as many as a 100
/// pages/ms write cell touches, so a 0-write cell has a thread that touches migrated memory and
/// a speed figure.
pub const DEFAULT_HB_READS: u64 = 100;

/// A way to migrate the workload.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Mode {
    /// `criu dump` to a local directory, `criu restore` from it: stop-and-copy through disk.
    CriuDisk,
    /// `criu dump --page-server` to a `criu page-server` at the destination: stop-and-copy over TCP.
    CriuPageserver,
    /// `criu dump --lazy-pages` + `criu lazy-pages` at the destination: CRIU's own post-copy.
    CriuLazy,
    /// `pageserv src --lazy` + `pageserv dst`: post-copy over QUIC.
    PageservLazy,
    /// `pageserv src --lazy --pre-copy auto` + `pageserv dst`: pre-copy rounds while the
    /// workload runs, then post-copy of the rest.
    PageservPrecopy,
    /// `pageserv src --stop-and-copy` + `pageserv dst`: `criu dump --page-server` through
    /// pageserv over QUIC, then `criu restore`.
    PageservStopAndCopy,
    /// Unavailable on this kernel (listed as unavailable).
    CriuPredump,
    /// The workload in a runc container: runc's own post-copy (`runc checkpoint --lazy-pages`,
    /// `criu lazy-pages`, `runc restore --lazy-pages`).
    RuncLazy,
    /// A runc container: `runc checkpoint --page-server` to `criu page-server`, `runc restore`.
    RuncPageserver,
    /// A runc container: `pageserv src --lazy --runc` + `pageserv dst --runc-bundle`.
    PageservRuncLazy,
    /// A runc container: as `pageserv-runc-lazy` with `--pre-copy auto`.
    PageservRuncPrecopy,
    /// A runc container: `pageserv src --stop-and-copy --runc` (runc pause, `runc checkpoint
    /// --leave-running` into pageserv) + `pageserv dst --runc-bundle` (`runc restore`).
    PageservRuncStopAndCopy,
}

impl Mode {
    pub const ALL: [Mode; 12] = [
        Mode::CriuDisk,
        Mode::CriuPageserver,
        Mode::CriuLazy,
        Mode::PageservLazy,
        Mode::PageservPrecopy,
        Mode::PageservStopAndCopy,
        Mode::CriuPredump,
        Mode::RuncLazy,
        Mode::RuncPageserver,
        Mode::PageservRuncLazy,
        Mode::PageservRuncPrecopy,
        Mode::PageservRuncStopAndCopy,
    ];

    /// The container modes (their own table in the report).
    pub const CONTAINERS: [Mode; 5] = [
        Mode::RuncLazy,
        Mode::RuncPageserver,
        Mode::PageservRuncLazy,
        Mode::PageservRuncPrecopy,
        Mode::PageservRuncStopAndCopy,
    ];

    /// Whether the workload runs in a runc container.
    pub fn is_container(self) -> bool {
        Mode::CONTAINERS.contains(&self)
    }

    pub fn name(self) -> &'static str {
        match self {
            Mode::CriuDisk => "criu-disk",
            Mode::CriuPageserver => "criu-pageserver",
            Mode::CriuLazy => "criu-lazy",
            Mode::PageservLazy => "pageserv-lazy",
            Mode::PageservPrecopy => "pageserv-precopy",
            Mode::PageservStopAndCopy => "pageserv-stop-and-copy",
            Mode::CriuPredump => "criu-predump",
            Mode::RuncLazy => "runc-lazy",
            Mode::RuncPageserver => "runc-pageserver",
            Mode::PageservRuncLazy => "pageserv-runc-lazy",
            Mode::PageservRuncPrecopy => "pageserv-runc-precopy",
            Mode::PageservRuncStopAndCopy => "pageserv-runc-stop-and-copy",
        }
    }

    /// Why this mode cannot run, or None if it can.
    pub fn unavailable(self) -> Option<&'static str> {
        match self {
            Mode::CriuPredump => Some(
                "criu pre-dump aborts on this kernel: no soft-dirty tracking (BUG at criu/mem.c:45)",
            ),
            _ => None,
        }
    }

    /// pageserv's own modes (compared with CRIU's in the ratio tables).
    pub fn is_pageserv(self) -> bool {
        self.name().starts_with("pageserv")
    }

    /// Whether the link matters: criu-disk copies through the local disk, so it runs on the first
    /// link of a matrix only and stands for every link in the comparisons.
    pub fn uses_link(self) -> bool {
        !matches!(self, Mode::CriuDisk)
    }

    /// Stop-and-copy: nothing is left to copy once the workload runs again (no post-copy
    /// speed to report).
    pub fn is_stop_and_copy(self) -> bool {
        matches!(
            self,
            Mode::CriuDisk
                | Mode::CriuPageserver
                | Mode::PageservStopAndCopy
                | Mode::RuncPageserver
                | Mode::PageservRuncStopAndCopy
        )
    }

    /// Whether the mode reports fault latency (the pageserv destination measures it).
    pub fn has_fault_latency(self) -> bool {
        matches!(
            self,
            Mode::PageservLazy
                | Mode::PageservPrecopy
                | Mode::PageservRuncLazy
                | Mode::PageservRuncPrecopy
        )
    }

    pub fn parse(s: &str) -> Result<Mode, String> {
        Mode::ALL
            .into_iter()
            .find(|m| m.name() == s)
            .ok_or_else(|| {
                let names: Vec<&str> = Mode::ALL.iter().map(|m| m.name()).collect();
                format!("unknown mode {s:?}: one of {}", names.join(", "))
            })
    }
}

/// The link between the source and destination namespaces: rate, round-trip time and random
/// loss, the same in each direction. Written as its label: `unlimited`, or parts joined by `+`:
/// a rate (`100mbit`, `1gbit`, or `unlimited`), a round-trip time (`40ms`, `500us`), a loss
/// per direction (`0.5%`) and an MTU (`mtu9000`, jumbo frames; veth links only), e.g.
/// `100mbit+40ms+0.5%` or `unlimited+mtu9000`.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct Link {
    /// Bits per second per direction; `None` is unlimited.
    pub rate_bps: Option<u64>,
    /// Round-trip time added by the link (half of it each way).
    pub rtt_us: u64,
    /// Loss per direction in parts per million (5000 is 0.5%).
    pub loss_ppm: u32,
    /// The interfaces' MTU; `None` is the kernel's default (1500).
    pub mtu: Option<u32>,
}

/// A link slower than 1 kbit/s, a round trip over 10 s or loss over 50% is a typo, not a link.
const MAX_RTT_US: u64 = 10_000_000;
const MAX_LOSS_PPM: u32 = 500_000;
/// IPv6's smallest MTU to a veth's largest.
const MTU_RANGE: std::ops::RangeInclusive<u32> = 1_280..=65_535;

impl Link {
    /// The bare veth.
    pub const UNLIMITED: Link = Link {
        rate_bps: None,
        rtt_us: 0,
        loss_ppm: 0,
        mtu: None,
    };

    pub fn new(rate_bps: Option<u64>, rtt_us: u64, loss_ppm: u32) -> Link {
        Link {
            rate_bps,
            rtt_us,
            loss_ppm,
            mtu: None,
        }
    }

    /// The label it parses from, e.g. `100mbit+40ms+0.5%`.
    pub fn label(&self) -> String {
        let mut parts = vec![match self.rate_bps {
            None => "unlimited".to_string(),
            Some(r) => {
                let (div, unit) = [
                    (1_000_000_000, "gbit"),
                    (1_000_000, "mbit"),
                    (1_000, "kbit"),
                ]
                .into_iter()
                .find(|(d, _)| r % d == 0)
                .unwrap_or((1, "bit"));
                format!("{}{unit}", r / div)
            }
        }];
        if self.rtt_us > 0 {
            parts.push(match self.rtt_us % 1000 {
                0 => format!("{}ms", self.rtt_us / 1000),
                _ => format!("{}us", self.rtt_us),
            });
        }
        if self.loss_ppm > 0 {
            parts.push(format!("{}%", f64::from(self.loss_ppm) / 1e4));
        }
        if let Some(mtu) = self.mtu {
            parts.push(format!("mtu{mtu}"));
        }
        parts.join("+")
    }

    /// A name for files: the label without `+` and `%`.
    pub fn slug(&self) -> String {
        self.label().replace('+', "_").replace('%', "pct")
    }

    /// Parses a label (see [`Link`]).
    pub fn parse(s: &str) -> Result<Link, String> {
        let bad = |why: &str| {
            format!(
                "link {s:?}: {why}; give `unlimited` or rate+rtt+loss+mtu such as 1gbit+2ms, \
                 100mbit+40ms+0.5% or unlimited+mtu9000"
            )
        };
        let mut parts = s.split('+');
        let rate = parts.next().unwrap_or_default();
        let rate_bps = if rate == "unlimited" {
            None
        } else {
            let digits = rate.chars().take_while(char::is_ascii_digit).count();
            let mult: u64 = match &rate[digits..] {
                "bit" => 1,
                "kbit" => 1_000,
                "mbit" => 1_000_000,
                "gbit" => 1_000_000_000,
                _ => return Err(bad("the rate needs a unit: bit, kbit, mbit or gbit")),
            };
            let n: u64 = rate[..digits]
                .parse()
                .ok()
                .filter(|n| (1..=999_999).contains(n))
                .ok_or_else(|| bad("the rate must be 1 to 999999 of its unit"))?;
            let bps = n * mult;
            if bps < 1_000 {
                return Err(bad("rates below 1kbit are not links"));
            }
            Some(bps)
        };
        let mut link = Link::new(rate_bps, 0, 0);
        let (mut rtt_seen, mut loss_seen) = (false, false);
        for p in parts {
            if let Some(mtu) = p.strip_prefix("mtu") {
                let v: u32 = mtu
                    .parse()
                    .map_err(|_| bad("the MTU is a number of bytes"))?;
                if link.mtu.is_some() || !MTU_RANGE.contains(&v) {
                    return Err(bad("one MTU between 1280 and 65535 bytes"));
                }
                link.mtu = Some(v);
            } else if let Some(pct) = p.strip_suffix('%') {
                let v: f64 = pct.parse().map_err(|_| bad("loss is a percentage"))?;
                let ppm = (v * 1e4).round();
                if loss_seen || !(0.0..=f64::from(MAX_LOSS_PPM)).contains(&ppm) {
                    return Err(bad("one loss between 0% and 50%"));
                }
                link.loss_ppm = ppm as u32;
                loss_seen = true;
            } else {
                let (num, scale) = if let Some(v) = p.strip_suffix("ms") {
                    (v, 1000.0)
                } else if let Some(v) = p.strip_suffix("us") {
                    (v, 1.0)
                } else {
                    return Err(bad(&format!(
                        "{p:?} is neither a round-trip time nor a loss"
                    )));
                };
                let v: f64 = num
                    .parse()
                    .map_err(|_| bad("the round-trip time is a number"))?;
                let us = (v * scale).round();
                if rtt_seen || !(0.0..=MAX_RTT_US as f64).contains(&us) {
                    return Err(bad("one round-trip time up to 10 s"));
                }
                link.rtt_us = us as u64;
                rtt_seen = true;
            }
        }
        Ok(link)
    }

    /// The shape the testbed gives the link: half the round trip each way.
    pub fn shape(&self) -> LinkShape {
        LinkShape {
            rate_bps: self.rate_bps,
            delay_us: self.rtt_us / 2,
            loss: f64::from(self.loss_ppm) / 1e6,
            mtu: self.mtu,
        }
    }
}

impl TryFrom<String> for Link {
    type Error = String;
    fn try_from(s: String) -> Result<Link, String> {
        Link::parse(&s)
    }
}

impl From<Link> for String {
    fn from(l: Link) -> String {
        l.label()
    }
}

/// One cell of the matrix: a mode on one workload size, link and dirty rate.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Cell {
    pub mode: Mode,
    pub mib: u64,
    pub link: Link,
    /// Pages the workload writes per millisecond.
    pub write_rate: u64,
}

/// The cells to run, and how often each.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Matrix {
    pub modes: Vec<Mode>,
    pub sizes_mib: Vec<u64>,
    pub links: Vec<Link>,
    pub write_rates: Vec<u64>,
    pub runs: u32,
    /// Seconds one step of a run may take before the run fails.
    #[serde(default)]
    pub timeout_s: u64,
    /// Extra `pageserv src` arguments the pageserv modes ran with.
    #[serde(default)]
    pub pageserv_src_args: Vec<String>,
    /// Extra `pageserv dst` arguments the pageserv modes ran with.
    #[serde(default)]
    pub pageserv_dst_args: Vec<String>,
    /// The workload's heartbeat thread wrote the cell's pages itself (`--one-thread-workload`).
    #[serde(default)]
    pub one_thread_workload: bool,
    /// Pages the one-thread workload's heartbeat thread read per beat in cells with no writes
    /// (`--hb-reads`; 0 in results from before it: those cells had no thread touching memory).
    #[serde(default)]
    pub hb_reads: u64,
    /// criu-pageserver ran with CRIU's own TLS (`--criu-tls`).
    #[serde(default)]
    pub criu_tls: bool,
    /// CRIU's stop-and-copy kept its source stopped until the restore finished
    /// (`--criu-keep-source`).
    #[serde(default)]
    pub criu_keep_source: bool,
}

/// Named matrices: `default` is the full matrix, `short` fits in 10 minutes on a
/// 2-core machine, `quick` is the CI check.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Profile {
    /// Sizes 256 and 1024 MiB, three links, dirty rates 0 and 100 pages/ms, 3 runs.
    Default,
    /// 256 MiB, three links, 100 pages/ms, 1 run, steps cut at 150 s: about 10 minutes, no
    /// spread.
    Short,
    /// One 64 MiB cell per mode on the plain link, 1 run: does every mode complete and verify?
    Quick,
}

impl Matrix {
    /// Every mode the bench runs by default (the others are listed as unavailable). The
    /// container modes are asked for by name (`--modes runc-lazy,...`): they need runc.
    pub fn runnable_modes() -> Vec<Mode> {
        Mode::ALL
            .into_iter()
            .filter(|m| m.unavailable().is_none() && !m.is_container())
            .collect()
    }

    /// The links: a bare veth, a fast LAN, a lossy WAN.
    pub fn default_links() -> Vec<Link> {
        vec![
            Link::UNLIMITED,
            Link::new(Some(1_000_000_000), 2_000, 0),
            Link::new(Some(100_000_000), 40_000, 5_000),
        ]
    }

    /// The matrix: 2 sizes x 3 links x 2 dirty rates x every mode, 3 runs each. It takes
    /// far longer than 10 minutes here (see bench/README.md); `short` is the 10-minute cut.
    pub fn default_matrix() -> Matrix {
        Matrix {
            modes: Matrix::runnable_modes(),
            sizes_mib: vec![256, 1024],
            links: Matrix::default_links(),
            write_rates: vec![0, 100],
            runs: 3,
            timeout_s: DEFAULT_STEP_TIMEOUT_S,
            pageserv_src_args: Vec::new(),
            pageserv_dst_args: Vec::new(),
            one_thread_workload: false,
            hb_reads: 0,
            criu_tls: false,
            criu_keep_source: false,
        }
    }

    /// The matrix of a profile.
    pub fn profile(p: Profile) -> Matrix {
        match p {
            Profile::Default => Matrix::default_matrix(),
            Profile::Short => Matrix {
                sizes_mib: vec![256],
                write_rates: vec![100],
                runs: 1,
                // criu-lazy needs minutes here; past this it is shown as failed, not waited for.
                timeout_s: 150,
                ..Matrix::default_matrix()
            },
            Profile::Quick => Matrix::quick(),
        }
    }

    /// One small cell per mode, one run.
    pub fn quick() -> Matrix {
        Matrix {
            sizes_mib: vec![64],
            links: vec![Link::UNLIMITED],
            write_rates: vec![10],
            runs: 1,
            ..Matrix::default_matrix()
        }
    }

    /// The available modes' cells, in run order (size, link, rate, then mode, so a partial run
    /// still compares modes). Modes that do not use the link run on the first link only.
    pub fn cells(&self) -> Vec<Cell> {
        let mut out = Vec::new();
        for &mib in &self.sizes_mib {
            for (i, link) in self.links.iter().enumerate() {
                for &write_rate in &self.write_rates {
                    for &mode in &self.modes {
                        if mode.unavailable().is_none() && (i == 0 || mode.uses_link()) {
                            out.push(Cell {
                                mode,
                                mib,
                                link: link.clone(),
                                write_rate,
                            });
                        }
                    }
                }
            }
        }
        out
    }

    /// Every mode the bench knows that cannot run, with the reason.
    pub fn unavailable(&self) -> Vec<(Mode, &'static str)> {
        Mode::ALL
            .into_iter()
            .filter_map(|m| m.unavailable().map(|r| (m, r)))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn modes_round_trip_their_names() {
        for m in Mode::ALL {
            assert_eq!(Mode::parse(m.name()), Ok(m));
        }
        assert!(Mode::parse("criu").is_err());
    }

    #[test]
    fn links_parse_their_labels_and_refuse_the_rest() {
        assert_eq!(Link::parse("unlimited"), Ok(Link::UNLIMITED));
        assert_eq!(
            Link::parse("1gbit"),
            Ok(Link::new(Some(1_000_000_000), 0, 0))
        );
        assert_eq!(
            Link::parse("100mbit+40ms+0.5%"),
            Ok(Link::new(Some(100_000_000), 40_000, 5_000))
        );
        assert_eq!(
            Link::parse("unlimited+0.5%+500us"),
            Ok(Link::new(None, 500, 5_000))
        );
        let jumbo = Link::parse("1gbit+mtu9000").unwrap();
        assert_eq!(
            (jumbo.rate_bps, jumbo.mtu),
            (Some(1_000_000_000), Some(9000))
        );
        assert_eq!(jumbo.label(), "1gbit+mtu9000");
        assert_eq!(jumbo.shape().mtu, Some(9000));
        for l in Matrix::default_links() {
            assert_eq!(Link::parse(&l.label()), Ok(l.clone()), "{}", l.label());
        }
        assert_eq!(
            Matrix::default_links()
                .iter()
                .map(Link::label)
                .collect::<Vec<_>>(),
            ["unlimited", "1gbit+2ms", "100mbit+40ms+0.5%"]
        );
        assert_eq!(
            Link::parse("100mbit+40ms+0.5%").unwrap().slug(),
            "100mbit_40ms_0.5pct"
        );
        for bad in [
            "",
            "gbit",
            "1gb",
            "20ms",
            "1gbit;rm",
            "99999999mbit",
            "1gbit+2ms+3ms",
            "1gbit+60%",
            "1gbit+-1ms",
            "1gbit+x",
            "1gbit+20s",
            "10bit",
            "unlimited+mtu",
            "unlimited+mtu1000",
            "unlimited+mtu70000",
            "unlimited+mtu9000+mtu1500",
        ] {
            assert!(Link::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn link_shape_splits_the_round_trip() {
        let s = Link::new(Some(100_000_000), 40_000, 5_000).shape();
        assert_eq!(
            (s.rate_bps, s.delay_us, s.loss),
            (Some(100_000_000), 20_000, 0.005)
        );
        assert!(Link::UNLIMITED.shape().is_plain());
    }

    #[test]
    fn links_serialize_as_labels() {
        let l = Link::new(Some(1_000_000_000), 2_000, 0);
        assert_eq!(serde_json::to_string(&l).unwrap(), "\"1gbit+2ms\"");
        let back: Link = serde_json::from_str("\"1gbit+2ms\"").unwrap();
        assert_eq!(back, l);
        assert!(serde_json::from_str::<Link>("\"fast\"").is_err());
    }

    #[test]
    fn cells_skip_unavailable_modes_and_cover_the_product() {
        let mut m = Matrix::default_matrix();
        let n = m.modes.len();
        m.modes.push(Mode::CriuPredump);
        let cells = m.cells();
        // criu-disk runs on the first link only.
        assert_eq!(cells.len(), (n * 3 - 2) * 2 * 2);
        assert_eq!(m.runs, 3);
        assert!(cells.iter().all(|c| c.mode.unavailable().is_none()));
        assert_eq!(Matrix::quick().cells().len(), n);
        assert_eq!(Matrix::profile(Profile::Short).cells().len(), n * 3 - 2);
        assert!(m.unavailable().iter().any(|(m, _)| *m == Mode::CriuPredump));
    }

    #[test]
    fn quic_gets_the_kernel_tcp_congestion_controller() {
        assert_eq!(
            crate::bench::matching_congestion("bbr"),
            ["--congestion", "bbr"]
        );
        assert_eq!(
            crate::bench::matching_congestion("reno"),
            ["--congestion", "newreno"]
        );
        assert!(crate::bench::matching_congestion("vegas").is_empty());
    }

    #[test]
    fn quinn_alone_runs_with_the_controller_pageserv_src_was_given() {
        let args = |a: &[&str]| a.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        let cc = crate::bench::quinn_alone_congestion;
        assert_eq!(cc(&args(&["--congestion=cubic"]), "bbr"), "cubic");
        assert_eq!(cc(&args(&["--congestion", "newreno"]), "bbr"), "newreno");
        let both = args(&["--congestion", "bbr", "--lanes", "2", "--congestion=cubic"]);
        assert_eq!(cc(&both, "reno"), "cubic");
        // The scavenger has no quinn-alone twin: the kernel TCP's controller, else cubic.
        assert_eq!(cc(&args(&["--congestion=scavenger"]), "bbr"), "bbr");
        assert_eq!(cc(&args(&["--congestion"]), "vegas"), "cubic");
        assert_eq!(cc(&args(&["--congestion-window", "9"]), "bbr"), "bbr");
        assert_eq!(cc(&[], "cubic"), "cubic");
    }
}
