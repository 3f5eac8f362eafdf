//! The `pageserv-lab` command line: `pageserv demo` and `pageserv bench` run it (the `pageserv`
//! binary hands those two subcommands to the `pageserv-lab` beside it).

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "pageserv",
    bin_name = "pageserv",
    about = "pageserv's lab: a demo migration and the downtime bench (run as `pageserv demo`, `pageserv bench`)"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Migrate a memory-writing workload between two network namespaces on this machine.
    Demo(pageserv_lab::demo::DemoArgs),
    /// Downtime benchmark: CRIU's modes and pageserv's over a matrix of sizes, links and rates.
    Bench(pageserv_lab::bench::BenchArgs),
    /// quinn's bulk rate over the testbed's bare veth with pageserv's transport settings.
    QuinnBulk(pageserv_lab::quinn_bulk::QuinnBulkArgs),
}

fn main() -> std::process::ExitCode {
    // Every `pageserv` the lab starts takes the measurement knobs (see `pageserv::child::LAB_ENV`).
    // SAFETY: the first statement of main, before any thread exists.
    unsafe { std::env::set_var(pageserv::child::LAB_ENV, "1") };
    // Next: Ctrl-C and SIGTERM stop what the lab starts (see `interrupt`).
    if let Err(e) = pageserv_lab::interrupt::install() {
        eprintln!(
            "pageserv: cannot watch for Ctrl-C ({e}): an interrupted run leaves its processes"
        );
    }
    pageserv::logging::init();
    let result = match Cli::parse().cmd {
        Cmd::Demo(d) => pageserv_lab::demo::run(d),
        Cmd::Bench(b) => pageserv_lab::bench::run(b),
        Cmd::QuinnBulk(q) => pageserv_lab::quinn_bulk::run(q),
    };
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("pageserv: error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
