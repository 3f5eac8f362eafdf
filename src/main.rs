//! The `pageserv` command line.

use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::{Context, Result};
use std::time::Duration;

use clap::{ArgGroup, Args, Parser, Subcommand, ValueEnum};

use pageserv::async_runtime::Flavor;
use pageserv::criu::binary::Criu;
use pageserv::dst::endpoint;
use pageserv::dst::options::DstOptions;
use pageserv::dst::restore::RestoreOptions;
use pageserv::keys::trust::DenyList;

#[path = "main/limit_args.rs"]
mod limit_args;
use limit_args::DstLimitArgs;
use pageserv::source::pre_copy::{PreCopyConfig, PreCopyMode};
use pageserv::source::pump::PumpConfig;
use pageserv::source::service::{self as src_service, DumpSource, SourceOptions};
use pageserv::stopcopy::source::{StopCopyOptions, StopCopySource};
use runc_cli::RuncArgs;

#[derive(Parser)]
#[command(
    name = "pageserv",
    version,
    about = "Post-copy live migration of Linux process trees with CRIU, userfaultfd and QUIC"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Source host: dump (or join a dump of) a process tree and migrate it to a pageserv dst.
    Src(SrcArgs),
    /// Destination host: receive a migration, restore it and serve its memory.
    Dst(DstArgs),
    /// Inspect CRIU image directories.
    Images {
        #[command(subcommand)]
        cmd: ImagesCmd,
    },
    /// Make certificates: a CA, and a certificate for each host signed by it.
    Keygen(KeygenArgs),
    /// Migrate a memory-writing workload between two network namespaces on this machine (runs
    /// `pageserv-lab demo`; `pageserv demo --help` for its options).
    #[command(disable_help_flag = true)]
    Demo(LabArgs),
    /// Downtime benchmark: CRIU's modes and pageserv's over a matrix of sizes, links and rates
    /// (runs `pageserv-lab bench`; `pageserv bench --help` for its options).
    #[command(disable_help_flag = true)]
    Bench(LabArgs),
    /// quinn's bulk rate over the testbed's bare veth with pageserv's transport settings, the
    /// yardstick of the post-copy's goodput (runs `pageserv-lab quinn-bulk`).
    #[command(disable_help_flag = true)]
    QuinnBulk(LabArgs),
    /// Settle a source left frozen by a failed migration (see `pageserv src` errors).
    Frozen(FrozenArgs),
    /// Internal: holds the lazy dump's socket for `pageserv src` (see source::keeper).
    #[command(hide = true)]
    KeepDump {
        #[arg(long)]
        work: PathBuf,
        #[arg(long)]
        criu_pid: i32,
        #[arg(long)]
        header_len: usize,
    },
    /// Internal: holds the restored tasks' uffds for `pageserv dst` (see dst::uffd_keeper).
    #[command(hide = true)]
    KeepUffds {
        /// The migration's directory (the keeper listens there once dst is gone).
        #[arg(long)]
        dir: PathBuf,
        /// How long orphaned uffds are held for an adopter, in ms (0: kill at once).
        #[arg(long)]
        recover_ms: u64,
    },
}

/// The arguments of a lab subcommand, handed to `pageserv-lab` as they are.
#[derive(Args)]
struct LabArgs {
    #[arg(trailing_var_arg = true, allow_hyphen_values = true, num_args = 0..)]
    args: Vec<std::ffi::OsString>,
}

/// Runs `pageserv-lab CMD ARGS...` in place of this process (git-style external subcommand):
/// the lab (demo, bench, their testbed and plots) is a crate of its own, built beside pageserv.
fn lab(cmd: &str, args: Vec<std::ffi::OsString>) -> Result<()> {
    use std::os::unix::process::CommandExt;
    let exe = std::env::current_exe().context("locating the pageserv binary")?;
    let lab = exe.with_file_name("pageserv-lab");
    if !lab.is_file() {
        anyhow::bail!(
            "`pageserv {cmd}` runs pageserv's lab, {}, which is not there: build it with `cargo \
             build --release` at the repository's root (it builds pageserv-lab beside pageserv), \
             or `cargo build --release -p pageserv-lab`",
            lab.display()
        );
    }
    let err = std::process::Command::new(&lab).arg(cmd).args(args).exec();
    Err(err).with_context(|| format!("running {} {cmd}", lab.display()))
}

#[derive(Args)]
struct FrozenArgs {
    /// The source work directory the error named.
    dir: PathBuf,
    /// Make the dump fail so CRIU resumes the source. Only if no restored copy runs anywhere.
    #[arg(
        long,
        conflicts_with = "kill_source",
        required_unless_present = "kill_source"
    )]
    resume_source: bool,
    /// End the dump so CRIU kills the source (the migration is given up).
    #[arg(long)]
    kill_source: bool,
}

#[derive(Subcommand)]
enum ImagesCmd {
    /// Summarise a CRIU image directory: tasks and their lazy / present / zero memory.
    Show {
        dir: PathBuf,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Args)]
struct Common {
    /// Directory with ca.pem, cert.pem and key.pem (see `pageserv keygen`).
    #[arg(long, default_value = "/etc/pageserv/certs")]
    certs: PathBuf,
    /// CRIU binary (default: $PAGESERV_CRIU, /opt/pageserv/criu/bin/criu, then PATH).
    #[arg(long)]
    criu: Option<PathBuf>,
    /// An extra option for CRIU (repeatable), e.g. --criu-opt=--tcp-established.
    #[arg(long = "criu-opt", allow_hyphen_values = true)]
    criu_opts: Vec<String>,
    /// CRIU's log level (`-vN`) for the dumps and restores pageserv starts: 0 none, 1 errors,
    /// 2 warnings, 3 info, 4 debug. Default: no -v, CRIU's own default (2), which holds every
    /// line pageserv reads; 4 writes a line per VMA and page pipe, costing the frozen dump time.
    /// runc paths log at runc's level (4) whatever this says.
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u8).range(0..=4))]
    criu_verbosity: Option<u8>,
    /// Run pageserv's threads and the `criu dump` it starts under SCHED_FIFO, so each hop of a
    /// page fault preempts ordinary tasks instead of queueing behind them (needs CAP_SYS_NICE;
    /// processes pageserv starts, the restored tasks among them, keep the normal policy). See
    /// README, "Sharing the bottleneck".
    #[arg(long)]
    realtime: bool,
    /// Write the final report as JSON here.
    #[arg(long)]
    stats_json: Option<PathBuf>,
    /// Read the bulk connections' socket as each datagram arrives instead of in batches
    /// (`transport::recv_batch`): more CPU on links slower than ~1.7 Gbit/s. For measurements;
    /// see README, "Receive batching".
    #[arg(long)]
    no_recv_batching: bool,
}

impl Common {
    /// The bulk connections' receive batching.
    fn recv_batching(&self) -> Option<pageserv::transport::recv_batch::RecvBatching> {
        (!self.no_recv_batching).then(Default::default)
    }

    /// The CRIU to run, logging at `--criu-verbosity` (`runc`: runc starts it, at its own level).
    fn criu(&self, runc: bool) -> Result<Criu> {
        if runc && let Some(v) = self.criu_verbosity {
            tracing::warn!(
                "--criu-verbosity {v} does not reach CRIU under runc: runc sets CRIU's log level \
                 itself (4, debug); its log is in runc's work directory"
            );
        }
        Ok(Criu::locate(self.criu.as_deref())?.with_verbosity(self.criu_verbosity))
    }
}

/// How the two services treat a dead link (post-copy only: a stop-and-copy source refuses
/// these).
#[derive(Args)]
struct LinkArgs {
    /// Time without a packet after which the link counts as dead (QUIC's idle timeout; the
    /// shorter of the two sides' applies). A shorter outage is only a pause.
    #[arg(long, value_name = "DURATION", default_value = "30s", value_parser = duration)]
    idle_timeout: Duration,
    /// After the link died mid post-copy: how long src keeps reconnecting and dst keeps the
    /// restored tasks waiting for it, with the source frozen, before each gives up (0: at once).
    /// See README, "When things fail".
    #[arg(long, value_name = "DURATION", default_value = "300s", value_parser = duration)]
    recover_timeout: Duration,
}

/// Every duration on the command line: a number with a unit, `ms`, `s` or `m` (a bare number
/// is seconds), e.g. `250ms`, `2.5s`, `5m`.
fn duration(text: &str) -> std::result::Result<Duration, String> {
    let t = text.trim();
    let (num, scale) = if let Some(n) = t.strip_suffix("ms") {
        (n, 1e-3)
    } else if let Some(n) = t.strip_suffix('s') {
        (n, 1.0)
    } else if let Some(n) = t.strip_suffix('m') {
        (n, 60.0)
    } else {
        (t, 1.0)
    };
    num.trim()
        .parse::<f64>()
        .ok()
        .and_then(|v| Duration::try_from_secs_f64(v * scale).ok())
        .ok_or_else(|| {
            format!(
                "{text:?} is no duration >= 0: give a number with ms, s or m, e.g. 250ms or 30s"
            )
        })
}

#[derive(Args)]
struct KeygenArgs {
    /// Where to write the host's certificate (cert.pem, key.pem, ca.pem).
    #[arg(long, required_unless_present = "fingerprint")]
    out: Option<PathBuf>,
    /// The CA directory; created with a new CA if it has none.
    #[arg(long, required_unless_present = "fingerprint")]
    ca: Option<PathBuf>,
    /// A name of the host (repeatable: its DNS names and IP addresses): a source dials it by
    /// one of them, a destination's --allow-source lists one. The first is the common name.
    #[arg(long, default_value = "pageserv")]
    name: Vec<String>,
    /// Print the SHA-256 fingerprint of this certificate file (for --deny-cert) and exit.
    #[arg(long, value_name = "CERT", conflicts_with_all = ["out", "ca"])]
    fingerprint: Option<PathBuf>,
    /// What the certificate lets the host do: `source` (migrate out: pageserv src),
    /// `destination` (accept migrations: pageserv dst) or `both`. A leaked source key cannot
    /// pose as a destination, nor a destination key open migrations into another host.
    #[arg(long, value_parser = pageserv::keys::Role::parse_set,
          required_unless_present = "fingerprint")]
    role: Option<std::vec::Vec<pageserv::keys::Role>>,
}

fn main() -> std::process::ExitCode {
    pageserv::logging::init();
    let cli = Cli::parse();
    if let Cmd::Dst(_) = &cli.cmd {
        // First, while this process is one thread (see the module).
        if let Err(e) = pageserv::dst::uffd_keeper::table_guard::start() {
            tracing::warn!("{e}");
        }
    }
    match run(cli) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("pageserv: error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn runtime(flavor: Flavor) -> Result<tokio::runtime::Runtime> {
    pageserv::async_runtime::build(flavor)
        .with_context(|| format!("starting the async runtime ({flavor:?})"))
}

/// Runs a service to its end, then lets its closed connections tell their peers (at most one
/// second: `transport::flush_client_closes`). Blocking helpers still waiting (e.g. for a restore
/// that will never connect after a failure) must not keep the process alive, so the runtime gets
/// one second more.
fn run_async<T>(flavor: Flavor, fut: impl std::future::Future<Output = Result<T>>) -> Result<T> {
    let rt = runtime(flavor)?;
    let result = rt.block_on(async {
        let result = fut.await;
        pageserv::transport::flush_client_closes(std::time::Duration::from_secs(1)).await;
        result
    });
    rt.shutdown_timeout(std::time::Duration::from_secs(1));
    result
}

fn write_json(path: &Option<PathBuf>, value: &impl serde::Serialize) -> Result<()> {
    if let Some(p) = path {
        let text = serde_json::to_string_pretty(value)?;
        std::fs::write(p, text).with_context(|| format!("writing {}", p.display()))?;
    }
    Ok(())
}

/// Several migrations through one dst; `--stats-json` gets the array of outcomes so far.
fn dst_many(
    opts: DstOptions,
    limits: endpoint::ServeLimits,
    stats_json: &Option<PathBuf>,
) -> Result<()> {
    let mut all = Vec::new();
    let at_once = (limits.max_concurrent as u64).min(limits.max_migrations.unwrap_or(u64::MAX));
    let flavor = Flavor::for_migrations_at_once(at_once);
    let outcomes = run_async(
        flavor,
        endpoint::serve(opts, limits, |o| {
            match &o.report {
                Some(r) => eprint!("migration {}:\n{}", o.migration_id, r.render()),
                None => eprintln!(
                    "migration {} failed: {}",
                    o.migration_id,
                    o.error.as_deref().unwrap_or("?")
                ),
            }
            all.push(o.clone());
            if let Err(e) = write_json(stats_json, &all) {
                eprintln!("pageserv: {e:#}");
            }
        }),
    )?;
    let failed = outcomes.iter().filter(|o| !o.ok).count();
    if failed > 0 {
        anyhow::bail!("{failed} of {} migrations failed", outcomes.len());
    }
    Ok(())
}

fn run(cli: Cli) -> Result<()> {
    if let Cmd::Src(SrcArgs { common, .. }) | Cmd::Dst(DstArgs { common, .. }) = &cli.cmd
        && common.realtime
    {
        pageserv::sched::enable_realtime()?;
    }
    match cli.cmd {
        Cmd::Src(a) if a.stop_and_copy => {
            let criu = a.common.criu(a.runc.is_some())?;
            let source = match (a.pid, a.listen_page_server) {
                _ if a.runc.is_some() => StopCopySource::Runc {
                    runc: a.runc_opts.runc()?,
                    name: a.runc.clone().unwrap_or_default(),
                },
                (Some(pid), None) => StopCopySource::Pid {
                    pid,
                    extra: a.common.criu_opts.clone(),
                },
                (None, Some(listen)) => StopCopySource::Listen {
                    peer: pageserv::stopcopy::source::page_server_peer(listen, a.page_server_peer)?,
                    listen,
                    images_dir: a
                        .images
                        .clone()
                        .context("--listen-page-server needs --images DIR, the dump's -D")?,
                },
                _ => anyhow::bail!(
                    "--stop-and-copy needs --pid PID, --runc NAME or --listen-page-server ADDR:PORT"
                ),
            };
            let (to, dst_name) = pageserv::protocol::resolve_dst(&a.to, a.dst_name.as_deref())?;
            let opts = StopCopyOptions {
                to,
                dst_name,
                certs: a.common.certs.clone(),
                work_dir: a.work.join(format!("{}", std::process::id())),
                criu,
                source,
                // The pages travel on this one connection: it gets the push's controller.
                transport: pageserv::transport::TransportOptions {
                    congestion: a.congestion.into(),
                    deny: DenyList::load_optional(a.deny_cert.as_deref())?.into(),
                    recv_batching: a.common.recv_batching(),
                    ..Default::default()
                }
                .with_sparse_bulk_acks(),
                lanes: a.lanes,
                connections: a.lane_connections,
            };
            let report = run_async(Flavor::OneThread, pageserv::stopcopy::source::run(opts))?;
            eprint!("{}", report.render());
            write_json(&a.common.stats_json, &report)
        }
        Cmd::Src(a) => {
            a.measure.allowed(pageserv::child::started_by_lab())?;
            let criu = a.common.criu(a.runc.is_some())?;
            if a.pre_copy.is_some() && a.pid.is_none() && a.runc.is_none() {
                anyhow::bail!(
                    "--pre-copy needs --pid or --runc: pageserv reads the tree's memory before it dumps it"
                );
            }
            let dump = match (a.pid, a.page_server, a.status_fifo) {
                _ if a.resume.is_some() => DumpSource::Resume {
                    work: a.resume.clone().unwrap_or_default(),
                },
                _ if a.runc.is_some() => DumpSource::Runc(pageserv::source::runc_dump::RuncDump {
                    runc: a.runc_opts.runc()?,
                    name: a.runc.clone().unwrap_or_default(),
                }),
                (Some(pid), None, None) => DumpSource::Pid {
                    pid,
                    extra: a.common.criu_opts.clone(),
                },
                (None, Some(page_server), Some(status_fifo)) => DumpSource::External {
                    page_server,
                    status_fifo,
                    images_dir: a
                        .images
                        .clone()
                        .context("--page-server needs --images DIR, the dump's -D directory")?,
                },
                _ => anyhow::bail!(
                    "give either --pid PID, --runc NAME, or --page-server ADDR with --status-fifo PATH"
                ),
            };
            let (to, dst_name) = pageserv::protocol::resolve_dst(&a.to, a.dst_name.as_deref())?;
            let opts = SourceOptions {
                to,
                dst_name,
                certs: a.common.certs.clone(),
                work_dir: a.work.join(format!("{}", std::process::id())),
                criu,
                dump,
                pump: PumpConfig {
                    batch_pages: a.batch_pages,
                    push: !a.measure.no_push,
                    push_delay: a.measure.push_after,
                    read_frozen: a.serve_from == "frozen",
                    verify_served: a.measure.verify_served,
                    ..PumpConfig::default()
                },
                push_transport: pageserv::transport::TransportOptions {
                    congestion: a.congestion.into(),
                    idle_timeout: a.link.idle_timeout,
                    deny: DenyList::load_optional(a.deny_cert.as_deref())?.into(),
                    recv_batching: a.common.recv_batching(),
                    ..Default::default()
                }
                .with_sparse_bulk_acks(),
                progress: true,
                pre_copy: a.pre_copy.map(PreCopyConfig::new),
                recover_timeout: a.link.recover_timeout,
            };
            let report = run_async(Flavor::OneThread, src_service::run(opts))?;
            eprint!("{}", report.render());
            write_json(&a.common.stats_json, &report)
        }
        Cmd::Dst(a) => {
            let criu = a.common.criu(a.runc_bundle.is_some())?;
            let runc = match &a.runc_bundle {
                Some(bundle) => Some(runc_cli::restore(&a.runc_opts, bundle, a.name.as_deref())?),
                None => None,
            };
            let opts = DstOptions {
                listen: a.listen,
                certs: a.common.certs.clone(),
                work_base: a.work.clone(),
                readahead_pages: a.readahead,
                sequential_readahead: a.sequential_readahead,
                criu,
                restore: RestoreOptions {
                    extra: a.common.criu_opts.clone(),
                    template: a.restore_cmd.clone(),
                    runc,
                    early: !a.late_restore,
                },
                transport: pageserv::transport::TransportOptions {
                    idle_timeout: a.link.idle_timeout,
                    recv_batching: a.common.recv_batching(),
                    ..Default::default()
                },
                recover_timeout: a.link.recover_timeout,
                admission: pageserv::keys::trust::Admission::new(
                    a.allow_source.clone(),
                    DenyList::load_optional(a.deny_cert.as_deref())?,
                )
                .map_err(anyhow::Error::msg)?,
                limits: a.limits.limits(),
                keep_work: a.keep_work,
            };
            if a.max_migrations.is_none() && !a.keep_serving {
                let report = run_async(Flavor::OneThread, endpoint::run(opts))?;
                eprint!("{}", report.render());
                return write_json(&a.common.stats_json, &report);
            }
            let limits = endpoint::ServeLimits {
                max_migrations: a.max_migrations,
                max_concurrent: a.max_concurrent.max(1),
            };
            dst_many(opts, limits, &a.common.stats_json)
        }
        Cmd::Images {
            cmd: ImagesCmd::Show { dir, json },
        } => pageserv::images_show::run(&dir, json),
        Cmd::Keygen(k) => {
            if let Some(cert) = &k.fingerprint {
                println!("{}", pageserv::keys::fingerprint_file(cert)?);
                return Ok(());
            }
            let (Some(ca), Some(out), Some(role)) = (&k.ca, &k.out, &k.role) else {
                anyhow::bail!("keygen needs --ca DIR, --out DIR and --role");
            };
            if !ca.join(pageserv::keys::CA_KEY).exists() {
                pageserv::keys::generate_ca(ca)?;
                println!("new CA in {}", ca.display());
            }
            pageserv::keys::issue_names(ca, &k.name, role, out)?;
            let roles: Vec<&str> = role.iter().map(|r| r.name()).collect();
            let cert = out.join(pageserv::keys::CERT);
            println!(
                "{} certificate for {:?} in {} (CA in {}), valid {} days, SHA-256 {}; copy the \
                 CA's ca.pem to every host",
                roles.join(" and "),
                k.name,
                out.display(),
                ca.display(),
                pageserv::keys::LEAF_VALIDITY.as_secs() / 86400,
                pageserv::keys::fingerprint_file(&cert)?,
            );
            Ok(())
        }
        Cmd::Demo(d) => lab("demo", d.args),
        Cmd::Frozen(f) => {
            pageserv::source::keeper::settle_frozen(&f.dir, f.resume_source)?;
            println!(
                "{}",
                if f.resume_source {
                    "the dump failed on purpose: CRIU resumes the source tasks"
                } else {
                    "the dump ended: CRIU kills the source tasks"
                }
            );
            Ok(())
        }
        Cmd::KeepDump { .. } | Cmd::KeepUffds { .. } if !pageserv::child::started_as_helper() => {
            anyhow::bail!(
                "keep-dump and keep-uffds are helper processes that `pageserv src` and `pageserv \
                 dst` start themselves; they are not run by hand"
            )
        }
        Cmd::KeepDump {
            work,
            criu_pid,
            header_len,
        } => Ok(pageserv::source::keeper::keeper_main(
            &work, criu_pid, header_len,
        )?),
        Cmd::KeepUffds { dir, recover_ms } => Ok(pageserv::dst::uffd_keeper::keeper_main(
            &dir,
            Duration::from_millis(recover_ms),
        )?),
        Cmd::Bench(b) => lab("bench", b.args),
        Cmd::QuinnBulk(q) => lab("quinn-bulk", q.args),
    }
}

#[path = "main/runc_cli.rs"]
mod runc_cli;
#[path = "main/service_args.rs"]
mod service_args;
use service_args::{DstArgs, SrcArgs};
#[cfg(test)]
#[path = "main/tests.rs"]
mod tests;
