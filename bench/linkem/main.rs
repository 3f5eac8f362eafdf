//! linkem: a userspace link emulator for kernels without `tc netem`.
//!
//! It joins two network namespaces with a TUN device in each and forwards IP packets between
//! them, applying per direction a rate limit with real serialisation delay, a one-way delay with
//! optional jitter, random loss and a drop-tail queue. Stop it with SIGTERM or SIGINT; it then
//! prints its counters.

mod forward;
mod model;
mod netem;
mod ring;
mod rng;
mod tun;
mod units;

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::time::Instant;

use anyhow::{Context, Result, bail};
use clap::Parser;
use nix::sys::signal::{SigSet, SigmaskHow, Signal, pthread_sigmask};

use forward::{DirStats, Direction, ring_capacity};
use model::{LinkConfig, LinkModel};
use ring::PacketRing;
use rng::Xoshiro256;
use tun::TunSpec;

/// Userspace link emulator between two network namespaces (rate, delay, jitter, loss, queue).
///
/// Settings apply to each direction independently. Rates take bit, kbit, mbit, gbit (powers of
/// 1000, like tc); times ns, us, ms, s; sizes b, kb, kib, mb, mib.
#[derive(Debug, Parser)]
#[command(
    name = "linkem",
    version,
    after_help = "On SIGTERM or SIGINT, prints one line of counters per direction \
                  (rx/tx packets and bytes, drops by loss, by the queue, and `behind` when linkem \
                  itself could not keep up; how late releases were) and one line of CPU use."
)]
struct Cli {
    /// Only report whether the kernel has netem: exit 0 if `tc qdisc add dev lo root netem`
    /// works (in a scratch namespace), 1 if not.
    #[arg(long)]
    netem_available: bool,

    /// Network namespace of side A (created beforehand with `ip netns add`).
    #[arg(long, required_unless_present = "netem_available")]
    ns_a: Option<String>,
    /// Network namespace of side B.
    #[arg(long, required_unless_present = "netem_available")]
    ns_b: Option<String>,
    /// Address with prefix for side A's device, e.g. 10.77.0.1/24.
    #[arg(long, required_unless_present = "netem_available")]
    addr_a: Option<String>,
    /// Address with prefix for side B's device, e.g. 10.77.0.2/24.
    #[arg(long, required_unless_present = "netem_available")]
    addr_b: Option<String>,
    /// Interface name of the TUN device in each namespace.
    #[arg(long, default_value = "linkem0")]
    ifname: String,

    /// Link rate per direction, or "unlimited".
    #[arg(long, default_value = "unlimited", value_parser = rate_arg)]
    rate: Rate,
    /// One-way delay.
    #[arg(long, default_value = "0", value_parser = units::parse_duration_ns)]
    delay: u64,
    /// Uniform jitter of the delay, plus or minus this much; never reorders unless
    /// --allow-reorder.
    #[arg(long, default_value = "0", value_parser = units::parse_duration_ns)]
    jitter: u64,
    /// Let jitter reorder packets.
    #[arg(long)]
    allow_reorder: bool,
    /// Random loss probability per packet, e.g. 0.5% or 0.005.
    #[arg(long, default_value = "0", value_parser = units::parse_probability)]
    loss: f64,
    /// Drop-tail queue in front of the rate limiter [default: one BDP of the delay, >= 1 MiB].
    #[arg(long, value_parser = units::parse_size)]
    queue: Option<u64>,
    /// MTU of both devices (68 to 65535; TUN accepts up to 65535).
    #[arg(long, default_value_t = 1500, value_parser = clap::value_parser!(u32).range(68..=65535))]
    mtu: u32,
    /// Packets each kernel may queue towards linkem (txqueuelen of the TUN devices).
    #[arg(long, default_value_t = 10_000)]
    txqueuelen: u32,
    /// Busy-wait this long before a lone packet's release instead of sleeping, for precise
    /// timing; limited to 10% of a core per direction.
    #[arg(long, default_value = "50us", value_parser = units::parse_duration_ns)]
    spin: u64,
    /// When more than one packet is waiting, let releases be up to this late so one wake-up
    /// sends several (like NIC interrupt moderation); saves CPU on busy links. A lone packet is
    /// always sent on time.
    #[arg(long, default_value = "50us", value_parser = units::parse_duration_ns)]
    coalesce: u64,
    /// SCHED_FIFO priority of the forwarding threads (1-99), so CPU load does not stall the
    /// link; 0 keeps the normal scheduler.
    #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(i32).range(0..=99))]
    rt_priority: i32,
    /// Seed for loss and jitter [default: from the clock]; the two directions derive their own.
    #[arg(long)]
    seed: Option<u64>,
    /// Write this file once both devices are up and forwarding starts.
    #[arg(long)]
    ready_file: Option<PathBuf>,
}

/// A rate in bit/s, `None` for unlimited (a newtype, since clap treats `Option` as "optional").
#[derive(Debug, Clone, Copy)]
struct Rate(Option<u64>);

fn rate_arg(s: &str) -> Result<Rate, units::UnitError> {
    units::parse_rate(s).map(Rate)
}

fn main() {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    if cli.netem_available {
        match netem::netem_available() {
            Ok(true) => println!("netem available"),
            Ok(false) => {
                println!("netem not available");
                std::process::exit(1);
            }
            Err(e) => {
                eprintln!("linkem: {e:#}");
                std::process::exit(2);
            }
        }
        return;
    }
    if let Err(e) = run(cli) {
        eprintln!("linkem: {e:#}");
        std::process::exit(1);
    }
}

fn run(cli: Cli) -> Result<()> {
    let (Some(ns_a), Some(ns_b), Some(addr_a), Some(addr_b)) =
        (cli.ns_a, cli.ns_b, cli.addr_a, cli.addr_b)
    else {
        bail!("--ns-a, --ns-b, --addr-a and --addr-b are required");
    };
    if ns_a == ns_b {
        bail!("--ns-a and --ns-b are both {ns_a:?}: the two ends need different namespaces");
    }
    let rate = cli.rate.0;
    let queue = cli
        .queue
        .unwrap_or_else(|| LinkConfig::default_queue_bytes(rate, cli.delay));
    let cfg = LinkConfig {
        rate_bps: rate,
        delay_ns: cli.delay,
        jitter_ns: cli.jitter,
        loss: cli.loss,
        queue_bytes: queue,
        allow_reorder: cli.allow_reorder,
    };

    // Signals go to the main thread only, which waits for them; workers inherit the mask.
    let mut signals = SigSet::empty();
    signals.add(Signal::SIGTERM);
    signals.add(Signal::SIGINT);
    pthread_sigmask(SigmaskHow::SIG_BLOCK, Some(&signals), None)
        .context("blocking SIGTERM/SIGINT")?;

    let spec = |netns: &str, addr: &str| TunSpec {
        netns: netns.to_string(),
        ifname: cli.ifname.clone(),
        addr: addr.to_string(),
        mtu: cli.mtu,
        txqueuelen: cli.txqueuelen,
    };
    let tun_a = tun::create(&spec(&ns_a, &addr_a))?;
    let tun_b = tun::create(&spec(&ns_b, &addr_b))?;

    let seed = cli.seed.unwrap_or_else(|| {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as u64)
    });
    let stop = Arc::new(AtomicBool::new(false));
    let epoch = Instant::now();
    let mtu = cli.mtu as usize;
    let capacity = ring_capacity(cfg.rate_bps, cfg.delay_ns, cfg.jitter_ns, queue, mtu);
    let make = |name: &str, input: &std::fs::File, output: &std::fs::File, salt: u64| {
        Ok::<_, anyhow::Error>(Direction {
            name: name.to_string(),
            input: input.try_clone().context("duplicating a TUN fd")?,
            output: output.try_clone().context("duplicating a TUN fd")?,
            model: LinkModel::new(cfg.clone()),
            rng: Xoshiro256::seed_from_u64(seed ^ salt),
            ring: PacketRing::new(capacity, cfg.allow_reorder),
            max_packet: mtu,
            spin_ns: cli.spin,
            coalesce_ns: cli.coalesce,
            stats: Arc::new(DirStats::default()),
            stop: stop.clone(),
            epoch,
            rt_priority: (cli.rt_priority > 0).then_some(cli.rt_priority),
        })
    };
    let a_to_b = make(&format!("{ns_a}->{ns_b}"), &tun_a, &tun_b, 0)?;
    let b_to_a = make(&format!("{ns_b}->{ns_a}"), &tun_b, &tun_a, 0x5bd1_e995)?;
    let stats = [
        (a_to_b.name.clone(), a_to_b.stats.clone()),
        (b_to_a.name.clone(), b_to_a.stats.clone()),
    ];
    let workers = [a_to_b, b_to_a].map(|dir| {
        let name = dir.name.clone();
        std::thread::Builder::new()
            .name(name.clone())
            .spawn(move || {
                let result = dir.run();
                if result.is_err() {
                    // Wake the main thread, which waits for signals only, so linkem exits
                    // with the error instead of running half a link.
                    let _ = nix::sys::signal::kill(nix::unistd::Pid::this(), Signal::SIGTERM);
                }
                result
            })
            .with_context(|| format!("spawning forwarding thread {name}"))
    });

    if let Some(path) = &cli.ready_file {
        write_ready(path)?;
    }
    tracing::info!(
        "linkem forwarding {ns_a} ({addr_a}) <-> {ns_b} ({addr_b}): rate {}, delay {} us, \
         jitter {} us, loss {}, queue {queue} B, mtu {mtu}, seed {seed}",
        rate.map_or("unlimited".to_string(), |r| format!("{r} bit/s")),
        cfg.delay_ns / 1000,
        cfg.jitter_ns / 1000,
        cfg.loss,
    );

    let sig = signals.wait().context("waiting for SIGTERM/SIGINT")?;
    tracing::info!("stopping on {sig:?}");
    stop.store(true, Relaxed);
    let mut failed = None;
    for worker in workers {
        match worker?.join() {
            Ok(Ok(())) => {}
            Ok(Err(e)) => failed = Some(e),
            Err(_) => failed = Some(anyhow::anyhow!("a forwarding thread panicked")),
        }
    }
    for (name, s) in &stats {
        let tx = s.tx_packets.load(Relaxed);
        println!(
            "{name}: rx {} pkts {} bytes, tx {tx} pkts {} bytes, dropped: loss {} queue {} \
             behind {}, write errors {}, late us: mean {:.1} max {:.1}",
            s.rx_packets.load(Relaxed),
            s.rx_bytes.load(Relaxed),
            s.tx_bytes.load(Relaxed),
            s.dropped_loss.load(Relaxed),
            s.dropped_queue.load(Relaxed),
            s.dropped_behind.load(Relaxed),
            s.write_errors.load(Relaxed),
            s.late_ns_sum.load(Relaxed) as f64 / tx.max(1) as f64 / 1e3,
            s.late_ns_max.load(Relaxed) as f64 / 1e3,
        );
    }
    let wall = epoch.elapsed().as_secs_f64();
    if let Some((user, sys)) = cpu_seconds() {
        println!(
            "cpu: user {user:.2} s, sys {sys:.2} s over {wall:.2} s ({:.0}% of one core)",
            (user + sys) / wall * 100.0
        );
    }
    match failed {
        Some(e) => Err(e),
        None => Ok(()),
    }
}

/// User and system CPU seconds this process has used.
fn cpu_seconds() -> Option<(f64, f64)> {
    // SAFETY: getrusage fills the zeroed struct it is given and keeps no pointer to it.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    if unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut usage) } != 0 {
        return None;
    }
    let secs = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    Some((secs(usage.ru_utime), secs(usage.ru_stime)))
}

/// Writes the ready file atomically, so a watcher never sees it half-written.
fn write_ready(path: &std::path::Path) -> Result<()> {
    let tmp = path.with_extension("tmp-linkem");
    std::fs::write(&tmp, format!("{}\n", std::process::id()))
        .with_context(|| format!("writing ready file {}", tmp.display()))?;
    std::fs::rename(&tmp, path).with_context(|| format!("renaming to {}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn cli_definition_is_consistent_and_parses_units() {
        Cli::command().debug_assert();
        let cli = Cli::try_parse_from([
            "linkem",
            "--ns-a",
            "a",
            "--ns-b",
            "b",
            "--addr-a",
            "10.77.0.1/24",
            "--addr-b",
            "10.77.0.2/24",
            "--rate",
            "1gbit",
            "--delay",
            "1ms",
            "--jitter",
            "0.1ms",
            "--loss",
            "0.5%",
            "--queue",
            "2MiB",
            "--mtu",
            "9000",
        ])
        .unwrap();
        assert_eq!(cli.rate.0, Some(1_000_000_000));
        assert_eq!((cli.delay, cli.jitter), (1_000_000, 100_000));
        assert_eq!(cli.loss, 0.005);
        assert_eq!(cli.queue, Some(2 << 20));
        assert_eq!(cli.mtu, 9000);
        let defaults = Cli::try_parse_from(["linkem", "--netem-available"]).unwrap();
        assert_eq!(defaults.rate.0, None);
        assert!(Cli::try_parse_from(["linkem", "--ns-a", "a"]).is_err());
        assert!(Cli::try_parse_from(["linkem", "--netem-available", "--mtu", "70000"]).is_err());
    }
}
