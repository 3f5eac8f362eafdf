//! `pageserv src` and `pageserv dst`'s flags (the builders of their options stay in main).

use super::*;

/// The congestion controller of the connection that carries the bulk of the pages.
#[derive(Clone, Copy, Debug, ValueEnum)]
pub(crate) enum CongestionArg {
    Cubic,
    /// Delay-based: keeps the bottleneck's queue short, so fault replies do not wait behind
    /// pushed pages (see README, "Sharing the bottleneck").
    Scavenger,
    Bbr,
    Newreno,
}

impl From<CongestionArg> for pageserv::transport::Congestion {
    fn from(c: CongestionArg) -> Self {
        use pageserv::transport::Congestion;
        match c {
            CongestionArg::Cubic => Congestion::Cubic,
            CongestionArg::Scavenger => Congestion::Scavenger,
            CongestionArg::Bbr => Congestion::Bbr,
            CongestionArg::Newreno => Congestion::NewReno,
        }
    }
}

/// `src` serves two modes; the flags only post-copy uses are refused with --stop-and-copy.
#[derive(Args)]
#[command(group(
    ArgGroup::new("post_copy_only")
        .args([
            "pre_copy", "resume", "page_server", "status_fifo", "batch_pages", "no_push",
            "push_after", "idle_timeout", "recover_timeout", "serve_from", "verify_served",
        ])
        .multiple(true)
        .conflicts_with("stop_and_copy")
))]
pub(crate) struct SrcArgs {
    /// Post-copy migration (pre-copy rounds come with --pre-copy).
    #[arg(long, required_unless_present = "stop_and_copy")]
    pub(crate) lazy: bool,
    /// Stop-and-copy: pageserv is the page server of a plain `criu dump --page-server`, dst
    /// writes the images and runs `criu restore`. With --pid the source tasks are killed only
    /// after the restore succeeded (else CRIU resumes them).
    #[arg(long, conflicts_with = "lazy")]
    pub(crate) stop_and_copy: bool,
    /// Stop-and-copy: accept an external `criu dump --page-server --address H --port P` here
    /// (with --images, its -D) instead of starting the dump.
    /// Only a dump on this host (a loopback peer) may connect, unless --page-server-peer says
    /// which address may.
    #[arg(long, requires = "stop_and_copy", conflicts_with = "pid")]
    pub(crate) listen_page_server: Option<SocketAddr>,
    /// With --listen-page-server: the one address the dump connects from (needed to listen
    /// beyond loopback; any other peer is refused).
    #[arg(long, requires = "listen_page_server")]
    pub(crate) page_server_peer: Option<std::net::IpAddr>,
    /// Stop-and-copy: QUIC streams the page-server session is dealt over (1-16), so dst's
    /// per-stream flow control never holds the transfer back.
    #[arg(long, requires = "stop_and_copy", default_value_t = pageserv::protocol::lanes::DEFAULT_LANES,
          value_parser = clap::value_parser!(u32).range(1..=pageserv::protocol::lanes::MAX_LANES as i64))]
    pub(crate) lanes: u32,
    /// Stop-and-copy: QUIC connections the lanes span (1-4), so that each end encrypts and
    /// sends the session on that many cores.
    #[arg(long, requires = "stop_and_copy", default_value_t = pageserv::protocol::lanes::DEFAULT_CONNECTIONS,
          value_parser = clap::value_parser!(u32).range(1..=pageserv::protocol::lanes::MAX_CONNECTIONS as i64))]
    pub(crate) lane_connections: u32,
    /// Copy memory while the tree runs, in N rounds or until `auto` says the rounds stopped
    /// paying off; after the freeze only pages that changed since cross again. Needs --pid.
    #[arg(long, value_name = "N|auto")]
    pub(crate) pre_copy: Option<PreCopyMode>,
    /// The pageserv dst to migrate to, HOST:PORT (a DNS name or an IP address; [v6]:PORT).
    /// Its certificate must carry HOST (or --dst-name).
    #[arg(long, value_name = "HOST:PORT")]
    pub(crate) to: String,
    /// The name dst's certificate must carry, when it is not --to's host (e.g. dialling an IP
    /// address of a host whose certificate names it by DNS). `pageserv` accepts any destination
    /// certificate of the CA.
    #[arg(long, value_name = "NAME")]
    pub(crate) dst_name: Option<String>,
    /// Refuse destinations whose certificates' SHA-256 fingerprints this file lists, one a line
    /// (`pageserv keygen --fingerprint CERT` prints one): revoked before they expire.
    #[arg(long, value_name = "FILE")]
    pub(crate) deny_cert: Option<PathBuf>,
    /// Dump this process tree (its root pid) with `criu dump --lazy-pages`.
    #[arg(long, conflicts_with_all = ["page_server", "status_fifo"])]
    pub(crate) pid: Option<i32>,
    /// Retry a migration whose source a failure left frozen in this work directory (the path
    /// the error printed): images are shipped again and dst restores from the frozen dump.
    #[arg(long, conflicts_with_all = ["pid", "page_server", "status_fifo"])]
    pub(crate) resume: Option<PathBuf>,
    /// Join a dump started elsewhere (runc style): its page server address...
    #[arg(long, requires = "status_fifo")]
    pub(crate) page_server: Option<SocketAddr>,
    /// ...and the FIFO its --status-fd writes the ready byte into.
    #[arg(long, requires = "page_server")]
    pub(crate) status_fifo: Option<PathBuf>,
    /// The external dump's image directory (with --page-server or --listen-page-server).
    #[arg(long, conflicts_with_all = ["pid", "resume"])]
    pub(crate) images: Option<PathBuf>,
    /// Migrate this runc container: pageserv runs `runc checkpoint --lazy-pages` itself (page
    /// server on a loopback port, status through a pipe) and joins the dump; with --pre-copy
    /// the rounds read the container's process tree first. With --stop-and-copy: `runc pause`,
    /// `runc checkpoint --leave-running` into pageserv's page server, then the container is
    /// deleted once dst restored it, else resumed. Restore it at dst with `pageserv dst
    /// --runc-bundle`.
    #[arg(long, value_name = "NAME", conflicts_with_all = ["pid", "page_server", "status_fifo", "resume", "listen_page_server"])]
    pub(crate) runc: Option<String>,
    #[command(flatten)]
    pub(crate) runc_opts: RuncArgs,
    /// Work directory for images and logs of a dump pageserv starts.
    #[arg(long, default_value = "/var/lib/pageserv/src")]
    pub(crate) work: PathBuf,
    /// Pages per background fetch from the dump (at most one CRIU pagemap entry is fetched at once).
    #[arg(long, default_value_t = 1024)]
    pub(crate) batch_pages: u64,
    /// Congestion controller of the connection that carries the pages (post-copy: the push
    /// connection; stop-and-copy: the only one). Under cubic and newreno that connection asks
    /// dst for one ACK per 64 packets instead of one per two (less CPU on both ends; README,
    /// "Stop-and-copy").
    #[arg(long, value_enum, default_value = "cubic")]
    pub(crate) congestion: CongestionArg,
    /// Where lazy pages are read after the freeze: `frozen` (from the frozen tasks' memory when
    /// pageserv runs the dump; CRIU's page server only for tasks it cannot read) or
    /// `page-server` (every page through the dump's page-server connection, as external dumps
    /// always do).
    #[arg(long, default_value = "frozen", value_parser = ["frozen", "page-server"])]
    pub(crate) serve_from: String,
    #[command(flatten)]
    pub(crate) measure: MeasureArgs,
    #[command(flatten)]
    pub(crate) link: LinkArgs,
    #[command(flatten)]
    pub(crate) common: Common,
}

/// Knobs for measuring, not for operating: hidden from `--help` and the README's user flags
/// (the bench and the latency measurements set them).
#[derive(Args)]
pub(crate) struct MeasureArgs {
    /// Serve faults only, push nothing in the background (fault latency of an idle link).
    #[arg(long, hide = true)]
    pub(crate) no_push: bool,
    /// Start the background push this long after the restore finished (fault latency with and
    /// without the push in one migration).
    #[arg(long, hide = true, value_name = "DURATION", default_value = "0s",
          value_parser = duration)]
    pub(crate) push_after: Duration,
    /// Before ending the dump, fetch every lazy page from CRIU again and compare it with what
    /// was served, page by page (a test of the frozen-memory path).
    #[arg(long, hide = true)]
    pub(crate) verify_served: bool,
}

impl MeasureArgs {
    /// The knobs are taken only from pageserv's lab (`lab`: see `pageserv::child::LAB_ENV`).
    pub(crate) fn allowed(&self, lab: bool) -> Result<()> {
        let given: Vec<&str> = [
            (self.no_push, "--no-push"),
            (!self.push_after.is_zero(), "--push-after"),
            (self.verify_served, "--verify-served"),
        ]
        .into_iter()
        .filter_map(|(set, name)| set.then_some(name))
        .collect();
        if given.is_empty() || lab {
            return Ok(());
        }
        let (what, it) = match given.len() {
            1 => ("is a measurement knob", "it"),
            _ => ("are measurement knobs", "them"),
        };
        anyhow::bail!(
            "{} {what} of pageserv's lab (`pageserv bench` and the tests pass them), not an \
             option of a migration: run `pageserv src` without {it}",
            given.join(", ")
        )
    }
}

#[derive(Args)]
#[command(group(ArgGroup::new("serving").args(["max_migrations", "keep_serving"])))]
pub(crate) struct DstArgs {
    /// Address to accept migrations on.
    #[arg(long)]
    pub(crate) listen: SocketAddr,
    /// Each migration gets a fresh directory (images, work dir, logs) below this one.
    #[arg(long, default_value = "/var/lib/pageserv/dst")]
    pub(crate) work: PathBuf,
    /// Pages after a faulting page requested with it (same lazy range).
    #[arg(long, default_value_t = 0)]
    pub(crate) readahead: u64,
    /// Adaptive read-ahead: a thread that faults in address order (a scan) gets twice as many
    /// pages per fault as its last one, up to 32 (128 KiB); random faults still get one page
    /// (plus --readahead). Off by default: fewer faults, but each waits longer (README).
    #[arg(long)]
    pub(crate) sequential_readahead: bool,
    /// Restore with this shell command instead of `criu restore`; {images} and {work} are
    /// replaced by the directories (e.g. a runc or podman restore with --lazy-pages).
    #[arg(long)]
    pub(crate) restore_cmd: Option<String>,
    /// Start `criu restore` only once the images are in, not when the migration begins: by
    /// default it starts with the migration (`criu restore --stream`, its images fed
    /// through CRIU's image-streamer socket), so CRIU's start-up and kernel probing are not
    /// downtime. Never early with --restore-cmd or --runc-bundle.
    #[arg(long)]
    pub(crate) late_restore: bool,
    /// Restore a container migrated with `pageserv src --runc` with `runc restore --lazy-pages`
    /// from this OCI bundle (config.json and rootfs must exist here, as at the source).
    #[arg(long, value_name = "DIR", conflicts_with = "restore_cmd")]
    pub(crate) runc_bundle: Option<PathBuf>,
    /// The restored container's name (with --runc-bundle; default: the bundle directory's name).
    #[arg(long, requires = "runc_bundle")]
    pub(crate) name: Option<String>,
    #[command(flatten)]
    pub(crate) runc_opts: RuncArgs,
    /// Take this many migrations (concurrently), then exit once all have ended; the exit status
    /// is non-zero if any failed. Default: one migration, as without the flag.
    #[arg(long, conflicts_with = "keep_serving")]
    pub(crate) max_migrations: Option<u64>,
    /// Keep taking migrations until killed.
    #[arg(long)]
    pub(crate) keep_serving: bool,
    /// With --max-migrations or --keep-serving: migrations running at once (more are refused).
    #[arg(long, default_value_t = 16, requires = "serving")]
    pub(crate) max_concurrent: usize,
    /// Admit only source certificates carrying this name (repeatable; their keygen --name).
    /// Without it any source certificate of the CA is admitted.
    #[arg(long, value_name = "NAME")]
    pub(crate) allow_source: Vec<String>,
    /// Refuse the certificates whose SHA-256 fingerprints this file lists, one a line
    /// (`pageserv keygen --fingerprint CERT` prints one): revoked before they expire.
    #[arg(long, value_name = "FILE")]
    pub(crate) deny_cert: Option<PathBuf>,
    #[command(flatten)]
    pub(crate) limits: DstLimitArgs,
    /// Keep each migration's directory (images, work) after it succeeded too; a failed
    /// migration's is always kept and named in its error.
    #[arg(long)]
    pub(crate) keep_work: bool,
    #[command(flatten)]
    pub(crate) link: LinkArgs,
    #[command(flatten)]
    pub(crate) common: Common,
}
