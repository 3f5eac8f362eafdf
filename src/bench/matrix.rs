//! What the bench runs: modes, links, and the matrix of cells (pure, no IO).

use serde::{Deserialize, Serialize};

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
    /// Not implemented yet (listed as unavailable).
    PageservPrecopy,
    /// Not implemented yet (listed as unavailable).
    PageservStopAndCopy,
    /// Unavailable on this kernel (listed as unavailable).
    CriuPredump,
}

impl Mode {
    pub const ALL: [Mode; 7] = [
        Mode::CriuDisk,
        Mode::CriuPageserver,
        Mode::CriuLazy,
        Mode::PageservLazy,
        Mode::PageservPrecopy,
        Mode::PageservStopAndCopy,
        Mode::CriuPredump,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Mode::CriuDisk => "criu-disk",
            Mode::CriuPageserver => "criu-pageserver",
            Mode::CriuLazy => "criu-lazy",
            Mode::PageservLazy => "pageserv-lazy",
            Mode::PageservPrecopy => "pageserv-precopy",
            Mode::PageservStopAndCopy => "pageserv-stop-and-copy",
            Mode::CriuPredump => "criu-predump",
        }
    }

    /// Why this mode cannot run, or None if it can.
    pub fn unavailable(self) -> Option<&'static str> {
        match self {
            Mode::PageservStopAndCopy => {
                Some("not implemented in pageserv yet (issue 4: stop-and-copy)")
            }
            Mode::CriuPredump => Some(
                "criu pre-dump aborts on this kernel: no soft-dirty tracking (BUG at criu/mem.c:45)",
            ),
            _ => None,
        }
    }

    /// Whether the mode reports fault latency (the pageserv destination measures it).
    pub fn has_fault_latency(self) -> bool {
        matches!(self, Mode::PageservLazy | Mode::PageservPrecopy)
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

/// The link between source and destination.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum Link {
    /// The bare veth.
    Unlimited,
    /// tbf on both ends of the veth at this tc rate (e.g. "1gbit").
    Rate(String),
}

impl Link {
    pub fn label(&self) -> String {
        match self {
            Link::Unlimited => "unlimited".into(),
            Link::Rate(r) => r.clone(),
        }
    }

    /// `unlimited`, or a tc rate: digits followed by kbit, mbit, gbit (or bit).
    pub fn parse(s: &str) -> Result<Link, String> {
        if s == "unlimited" {
            return Ok(Link::Unlimited);
        }
        let digits = s.chars().take_while(char::is_ascii_digit).count();
        let unit = &s[digits..];
        if digits == 0 || digits > 6 || !["bit", "kbit", "mbit", "gbit"].contains(&unit) {
            return Err(format!(
                "link {s:?}: give `unlimited` or a rate like 100mbit or 1gbit (delay and loss \
                 need linkem, not supported by the bench yet)"
            ));
        }
        Ok(Link::Rate(s.to_string()))
    }

    pub fn tc_rate(&self) -> Option<&str> {
        match self {
            Link::Unlimited => None,
            Link::Rate(r) => Some(r),
        }
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
}

/// Links the bench cannot emulate yet (they need linkem and a source namespace).
pub const TODO_LINKS: [&str; 2] = [
    "100mbit + 20ms delay (linkem)",
    "1gbit + 0.5% loss (linkem)",
];

impl Matrix {
    /// The default: sized to finish in about 10 minutes on a 2-core machine. One run per cell:
    /// criu-lazy alone needs ~190 s for 1024 MiB (CRIU's lazy-pages daemon moves ~5 MiB/s
    /// here), so three runs of the full default would take ~30 min; ask for them with --runs 3.
    pub fn default_matrix() -> Matrix {
        Matrix {
            modes: vec![
                Mode::CriuDisk,
                Mode::CriuPageserver,
                Mode::CriuLazy,
                Mode::PageservLazy,
            ],
            sizes_mib: vec![256, 1024],
            links: vec![Link::Unlimited, Link::Rate("1gbit".into())],
            write_rates: vec![10],
            runs: 1,
        }
    }

    /// One small cell per mode, one run.
    pub fn quick() -> Matrix {
        Matrix {
            sizes_mib: vec![64],
            links: vec![Link::Unlimited],
            write_rates: vec![10],
            runs: 1,
            ..Matrix::default_matrix()
        }
    }

    /// The available modes' cells, in run order (size, link, rate, then mode, so a partial run
    /// still compares modes).
    pub fn cells(&self) -> Vec<Cell> {
        let mut out = Vec::new();
        for &mib in &self.sizes_mib {
            for link in &self.links {
                for &write_rate in &self.write_rates {
                    for &mode in &self.modes {
                        if mode.unavailable().is_none() {
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
    fn links_parse_rates_and_refuse_the_rest() {
        assert_eq!(Link::parse("unlimited"), Ok(Link::Unlimited));
        assert_eq!(Link::parse("1gbit"), Ok(Link::Rate("1gbit".into())));
        for bad in ["", "gbit", "1gb", "20ms", "1gbit;rm", "99999999mbit"] {
            assert!(Link::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn cells_skip_unavailable_modes_and_cover_the_product() {
        let mut m = Matrix::default_matrix();
        m.modes.push(Mode::CriuPredump);
        let cells = m.cells();
        assert_eq!(cells.len(), 4 * 2 * 2);
        assert_eq!(m.runs, 1);
        assert!(cells.iter().all(|c| c.mode.unavailable().is_none()));
        assert_eq!(Matrix::quick().cells().len(), 4);
        assert_eq!(m.unavailable().len(), 2);
    }
}
