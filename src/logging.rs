//! Logs: `tracing` to stderr, filtered by `$PAGESERV_LOG` (`info` when unset), for the
//! `pageserv` binary and the lab's alike.

/// Installs the process's log subscriber; call once, first thing in `main`.
pub fn init() {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("PAGESERV_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
}
