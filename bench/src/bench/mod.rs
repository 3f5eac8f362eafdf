//! `pageserv bench`: the downtime benchmark. It migrates the self-verifying workload with every
//! available mode (CRIU's stop-and-copy and post-copy, pageserv's post-copy) over a matrix of
//! memory sizes, links and dirty rates, measures each run from the workload's own log, and writes
//! `results.json`, `results.md` and plots (PNG + SVG) into an output directory.
//!
//! - [`matrix`]: modes, links, cells (pure).
//! - [`modes`]: one run of one cell (`modes::criu`, `modes::pageserv`).
//! - [`run`]: the loop over the matrix and the machine facts.
//! - [`report`]: aggregation (median, min, max over verified runs), JSON and Markdown.
//! - [`plots`]: the charts.

pub mod clock_step;
pub mod machine;
pub mod matrix;
pub mod modes;
pub mod plots;
pub mod report;
pub mod run;
pub mod usage;

use std::path::PathBuf;

use matrix::{Link, Matrix, Mode, Profile};

/// `pageserv bench` options. Without flags it runs the full default matrix (sizes 256 and 1024
/// MiB, links unlimited, 1gbit+2ms and 100mbit+40ms+0.5%, dirty rates 0 and 100 pages/ms, 3
/// runs); matrix flags override parts of the chosen profile.
#[derive(Debug, Clone, clap::Args)]
pub struct BenchArgs {
    /// Output directory for results.json, results.md and the plots.
    #[arg(long, default_value = "bench/results")]
    pub out: PathBuf,
    /// Matrix to start from: default (the full matrix; long, see bench/README.md), short (about
    /// 10 minutes: 256 MiB, 100 pages/ms, one run per cell) or quick (the CI check).
    #[arg(long, value_enum, default_value_t = Profile::Default)]
    pub profile: Profile,
    /// Same as --profile quick: one 64 MiB cell per mode on the plain link, one run; fails unless
    /// every run completed and verified.
    #[arg(long)]
    pub quick: bool,
    /// Workload sizes in MiB (comma-separated).
    #[arg(long, value_delimiter = ',')]
    pub sizes: Vec<u64>,
    /// Links (comma-separated): `unlimited`, or rate+rtt+loss+mtu such as 1gbit+2ms,
    /// 100mbit+40ms+0.5% (loss per direction) or unlimited+mtu9000 (jumbo frames on the veth).
    #[arg(long, value_delimiter = ',', value_parser = Link::parse)]
    pub links: Vec<Link>,
    /// Workload dirty rates in pages per millisecond (comma-separated).
    #[arg(long, value_delimiter = ',')]
    pub rates: Vec<u64>,
    /// Runs per cell.
    #[arg(long)]
    pub runs: Option<u32>,
    /// Modes (comma-separated), e.g. criu-disk, criu-pageserver, criu-lazy, pageserv-lazy,
    /// pageserv-stop-and-copy.
    #[arg(long, value_delimiter = ',', value_parser = Mode::parse)]
    pub modes: Vec<Mode>,
    /// Seconds one step of a run (a dump, a restore, a lazy transfer) may take before the run
    /// counts as failed [default: 300; short profile 150].
    #[arg(long)]
    pub timeout: Option<u64>,
    /// Extra `pageserv src` argument for every pageserv mode (repeatable), e.g.
    /// `--pageserv-src-arg=--congestion --pageserv-src-arg=cubic`; recorded in results.json.
    /// Without any, pageserv's QUIC uses the congestion controller the kernel's TCP uses (CRIU's
    /// connections), so both cross the link under the same controller.
    #[arg(long = "pageserv-src-arg", allow_hyphen_values = true)]
    pub pageserv_src_args: Vec<String>,
    /// Extra `pageserv dst` argument for every pageserv mode (repeatable), e.g.
    /// `--pageserv-dst-arg=--realtime`; recorded in results.json.
    #[arg(long = "pageserv-dst-arg", allow_hyphen_values = true)]
    pub pageserv_dst_args: Vec<String>,
    /// The workload's one thread both writes the cell's random pages per ms and heartbeats (its
    /// heartbeat gaps include every post-copy fault it waits on); default: writer threads apart
    /// from a heartbeat thread that touches no memory.
    #[arg(long)]
    pub one_thread_workload: bool,
    /// With `--one-thread-workload`: random pages its thread reads (and spot-checks) per 1 ms
    /// beat in cells with no writes (rate 0), so those cells too have a thread that touches
    /// migrated memory, and a speed during the post-copy (heartbeats/s against before). 0: the
    /// thread touches nothing in those cells.
    #[arg(long, default_value_t = matrix::DEFAULT_HB_READS)]
    pub hb_reads: u64,
    /// criu-pageserver with CRIU's own TLS (`criu page-server --tls`, `criu dump --tls`, with
    /// certificates of a CA the bench makes): CRIU's encrypted stop-and-copy, to set against
    /// pageserv's QUIC + TLS.
    #[arg(long)]
    pub criu_tls: bool,
    /// CRIU's stop-and-copy (criu-pageserver, criu-disk) dumps with `--leave-stopped` and the
    /// bench kills the source only once the restore finished, as pageserv's source stays frozen
    /// until then. With both hosts on one VM the restore otherwise reuses the memory the dump
    /// just freed, which the VM's host still backs; on two hosts (and for pageserv here) it
    /// touches memory the host must back first (2.4 s per GiB against 0.9 s on this VM).
    #[arg(long)]
    pub criu_keep_source: bool,
    /// Run nothing: re-render results.md and the plots into --out from this results.json.
    #[arg(long)]
    pub from_json: Option<PathBuf>,
}

impl BenchArgs {
    /// The matrix these flags ask for.
    pub fn matrix(&self) -> Matrix {
        let mut m = if self.quick {
            Matrix::quick()
        } else {
            Matrix::profile(self.profile)
        };
        if !self.sizes.is_empty() {
            m.sizes_mib = self.sizes.clone();
        }
        if !self.links.is_empty() {
            m.links = self.links.clone();
        }
        if !self.rates.is_empty() {
            m.write_rates = self.rates.clone();
        }
        if let Some(r) = self.runs {
            m.runs = r.max(1);
        }
        if !self.modes.is_empty() {
            m.modes = self.modes.clone();
        }
        m.pageserv_src_args = if self.pageserv_src_args.is_empty() {
            let tcp = std::fs::read_to_string("/proc/sys/net/ipv4/tcp_congestion_control")
                .unwrap_or_default();
            matching_congestion(tcp.trim())
        } else {
            self.pageserv_src_args.clone()
        };
        m.pageserv_dst_args = self.pageserv_dst_args.clone();
        m.one_thread_workload = self.one_thread_workload;
        m.hb_reads = if self.one_thread_workload {
            self.hb_reads
        } else {
            0
        };
        m.criu_tls = self.criu_tls;
        m.criu_keep_source = self.criu_keep_source;
        if let Some(t) = self.timeout {
            m.timeout_s = t.max(1);
        }
        m
    }
}

/// The `pageserv src` arguments that give its QUIC the kernel TCP's congestion controller
/// (`net.ipv4.tcp_congestion_control`), if pageserv has that one.
pub fn matching_congestion(tcp: &str) -> Vec<String> {
    let quic = match tcp {
        "bbr" => "bbr",
        "cubic" => "cubic",
        "reno" => "newreno",
        _ => return Vec::new(),
    };
    vec!["--congestion".into(), quic.into()]
}

/// The congestion controller the bench's yardstick (`pageserv-lab quinn-bulk`) runs with: the
/// one `pageserv src` runs its QUIC with under `src_args` (`--congestion X` or `--congestion=X`;
/// the last one given wins, as clap takes it), else the kernel TCP's (`tcp`, which the bench
/// gives pageserv by default), else cubic: quinn alone is measured with the controller the
/// migrations use, as far as quinn-bulk has it (not the scavenger).
pub fn quinn_alone_congestion(src_args: &[String], tcp: &str) -> String {
    let mut given = None;
    let mut it = src_args.iter();
    while let Some(a) = it.next() {
        let value = match a.strip_prefix("--congestion") {
            Some("") => it.next().map(String::as_str),
            Some(rest) => rest.strip_prefix('='),
            None => None,
        };
        if value.is_some() {
            given = value;
        }
    }
    [given, Some(tcp)]
        .into_iter()
        .flatten()
        .find(|c| matches!(*c, "bbr" | "cubic" | "newreno"))
        .unwrap_or("cubic")
        .to_string()
}

/// Runs the bench and writes its results.
pub fn run(args: BenchArgs) -> anyhow::Result<()> {
    use anyhow::Context;
    match &args.from_json {
        Some(path) => {
            let text = std::fs::read_to_string(path)
                .with_context(|| format!("reading {}", path.display()))?;
            let old: report::Results = serde_json::from_str(&text)
                .with_context(|| format!("{} is not a bench results.json", path.display()))?;
            let results = report::Results::new(old.machine, old.matrix, old.runs, old.duration_s);
            std::fs::create_dir_all(&args.out)?;
            report::write(&results, &args.out)?;
            plots::write_all(&results, &args.out)
        }
        None => {
            let matrix = args.matrix();
            modes::set_pageserv_args(modes::PageservArgs {
                src: matrix.pageserv_src_args.clone(),
                dst: matrix.pageserv_dst_args.clone(),
            });
            modes::set_step_timeout(matrix.timeout_s);
            modes::set_one_thread_workload(matrix.one_thread_workload, matrix.hb_reads);
            modes::set_criu_tls(matrix.criu_tls);
            modes::set_criu_keep_source(matrix.criu_keep_source);
            run::run(
                &matrix,
                &args.out,
                args.quick || args.profile == Profile::Quick,
            )
        }
    }
}
