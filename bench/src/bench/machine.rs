//! The machine the bench's numbers come from, as its report states it.

use serde::{Deserialize, Serialize};

use pageserv::criu::binary::Criu;

/// The machine the numbers come from.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Machine {
    pub kernel: String,
    pub cpu: String,
    pub cores: usize,
    pub memory_mib: u64,
    pub criu_version: String,
    pub criu_path: String,
    /// Whether the kernel has tc netem (else linkem emulates the links).
    #[serde(default)]
    pub netem_available: bool,
    /// net.ipv4.tcp_congestion_control: CRIU's TCP modes run with it.
    #[serde(default)]
    pub tcp_congestion: String,
    /// The pageserv commit the bench ran (`git describe`), if it ran from a checkout.
    #[serde(default)]
    pub pageserv_commit: String,
    /// quinn's bulk rate over the testbed's bare veth in this run, MiB/s
    /// ([`crate::quinn_bulk`]): the yardstick of the post-copy's goodput.
    #[serde(default)]
    pub quinn_bulk_mib_s: Option<f64>,
    /// quinn alone over each link of the run that has only a rate (and the bare veth): its rate
    /// and each side's CPU, the floor under the services' CPU on that link.
    #[serde(default)]
    pub quinn_floor: Vec<QuinnFloor>,
}

/// One bulk transfer of quinn alone ([`crate::quinn_bulk`]) on one link.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct QuinnFloor {
    pub link: String,
    pub mib_s: f64,
    /// Percent of a core over the transfer.
    pub sender_core_pct: f64,
    pub receiver_core_pct: f64,
}

impl Machine {
    pub fn probe(criu: &Criu, linkem: &std::path::Path) -> Machine {
        let read = |p: &str| std::fs::read_to_string(p).unwrap_or_default();
        let cpu = read("/proc/cpuinfo")
            .lines()
            .find_map(|l| l.strip_prefix("model name"))
            .map(|v| v.trim_start_matches([' ', '\t', ':']).to_string())
            .unwrap_or_default();
        let memory_mib = read("/proc/meminfo")
            .lines()
            .find_map(|l| l.strip_prefix("MemTotal:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
            .map_or(0, |kb| kb / 1024);
        Machine {
            kernel: read("/proc/sys/kernel/osrelease").trim().to_string(),
            cpu,
            cores: std::thread::available_parallelism().map_or(0, |n| n.get()),
            memory_mib,
            criu_version: criu.version.to_string(),
            criu_path: criu.path.display().to_string(),
            netem_available: crate::testbed::link::netem_available(linkem),
            tcp_congestion: read("/proc/sys/net/ipv4/tcp_congestion_control")
                .trim()
                .to_string(),
            pageserv_commit: std::process::Command::new("git")
                .args(["describe", "--always", "--dirty"])
                .stderr(std::process::Stdio::null())
                .output()
                .ok()
                .filter(|o| o.status.success())
                .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
                .unwrap_or_default(),
            quinn_bulk_mib_s: None,
            quinn_floor: Vec::new(),
        }
    }
}
