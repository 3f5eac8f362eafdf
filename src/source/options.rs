//! What one `pageserv src` migration is told to do: where to, with which identity, from which
//! dump, and how to move the pages.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use crate::criu::binary::Criu;
use crate::source::open_dump::DumpSource;
use crate::source::pre_copy::PreCopyConfig;
use crate::source::pump::PumpConfig;
use crate::transport;

/// A `pageserv src` migration's options (see [`crate::source::service::run`]).
#[derive(Debug, Clone)]
pub struct SourceOptions {
    pub to: SocketAddr,
    /// The name dst's certificate must carry: `--dst-name`, else the host part of `--to` (see
    /// [`crate::keys::trust::dst_name`]).
    pub dst_name: String,
    pub certs: PathBuf,
    pub work_dir: PathBuf,
    pub criu: Criu,
    pub dump: DumpSource,
    pub pump: PumpConfig,
    /// Transport settings of the push connection (the fault connection keeps the defaults).
    pub push_transport: transport::TransportOptions,
    pub progress: bool,
    /// Pre-copy rounds before the freeze (needs [`DumpSource::Pid`]).
    pub pre_copy: Option<PreCopyConfig>,
    /// How long to keep reconnecting after the link died mid post-copy (0: never; the source
    /// then stays frozen at once). See [`crate::source::recovery`].
    pub recover_timeout: Duration,
}

impl SourceOptions {
    /// The fault connection's transport: defaults, but the push connection's idle timeout, so a
    /// dead link is noticed on both at the same time.
    pub(crate) fn fault_transport(&self) -> transport::TransportOptions {
        transport::TransportOptions {
            idle_timeout: self.push_transport.idle_timeout,
            keep_alive: self.push_transport.keep_alive,
            deny: self.push_transport.deny.clone(),
            ..Default::default()
        }
        .for_faults()
    }
}
