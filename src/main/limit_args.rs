//! `pageserv dst`'s limit flags (README "Limits"; `pageserv::limits`).

use std::time::Duration;

use clap::Args;
use pageserv::limits;

/// What a source may make `pageserv dst` hold (README "Limits"; `pageserv::limits`).
#[derive(Args)]
pub(crate) struct DstLimitArgs {
    /// Image bytes one migration may send (its announced size is checked before any is written).
    #[arg(long, value_name = "MIB", default_value_t = limits::DEFAULT_MAX_IMAGES_MIB)]
    max_images_mib: u64,
    /// Free space the work directory's file system must keep after the images.
    #[arg(long, value_name = "MIB", default_value_t = limits::DEFAULT_MIN_FREE_DISK_MIB)]
    min_free_disk_mib: u64,
    /// A source silent this long while sending its pre-copy and images loses its migration.
    #[arg(long, value_name = "SECS", default_value_t = limits::DEFAULT_RECEIVE_IDLE_SECS)]
    receive_idle_secs: u64,
    /// A source not done with its pre-copy and images this long after its hello loses its
    /// migration.
    #[arg(long, value_name = "SECS", default_value_t = limits::DEFAULT_RECEIVE_DEADLINE_SECS)]
    receive_deadline_secs: u64,
    /// Memory the pre-copy page store may use (default: half of this host's RAM).
    #[arg(long, value_name = "MIB")]
    max_page_store_mib: Option<u64>,
    /// Page bytes one stop-and-copy session may write (default: this host's RAM).
    #[arg(long, value_name = "MIB")]
    max_session_mib: Option<u64>,
    /// A fault request unanswered this long on a live link makes dst drop the link (the source
    /// may resume within --recover-timeout); three such links in a row fail the migration.
    #[arg(long, value_name = "SECS", default_value_t = limits::DEFAULT_FAULT_ANSWER_SECS)]
    fault_answer_secs: u64,
}

impl DstLimitArgs {
    pub(crate) fn limits(&self) -> limits::DstLimits {
        let d = limits::DstLimits::default();
        limits::DstLimits {
            max_images_bytes: self.max_images_mib << 20,
            min_free_disk_bytes: self.min_free_disk_mib << 20,
            receive_idle: Duration::from_secs(self.receive_idle_secs.max(1)),
            receive_deadline: Duration::from_secs(self.receive_deadline_secs.max(1)),
            max_page_store_bytes: self
                .max_page_store_mib
                .map_or(d.max_page_store_bytes, |m| m << 20),
            max_session_bytes: self
                .max_session_mib
                .map_or(d.max_session_bytes, |m| m << 20),
            fault_answer: Duration::from_secs(self.fault_answer_secs.max(1)),
        }
    }
}
