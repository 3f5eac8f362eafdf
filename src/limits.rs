//! Every bound on what a peer can make this host hold, in one place: memory, disk, open files
//! and time. A certified peer is still a peer: `pageserv dst` bounds what a source can make it
//! keep, `pageserv src` what a destination can. README "Limits" lists each one with its default,
//! its flag and what happens when it is hit; a limit that is hit ends that migration with an
//! error naming the limit, its value and the flag that raises it (or "fixed" when there is none).
//!
//! [`DstLimits`] are the ones a flag of `pageserv dst` sets; the constants are fixed, each sized
//! from what an honest peer does (see their docs).

use std::time::Duration;

use crate::pages::PAGE_SIZE;

/// `pageserv dst`'s limits that a flag sets (see each field for the flag and the default).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DstLimits {
    /// Bytes of image files (everything but the lazy memory) one migration may send.
    /// `--max-images-mib`, default 8 GiB. The source announces its images' size before it sends
    /// them; a larger announcement is refused before any image is written, and the source may
    /// then not send more than it announced.
    pub max_images_bytes: u64,
    /// Free space that must remain on the work directory's file system after the announced
    /// images (and the stop-and-copy session's pages, checked as they are written).
    /// `--min-free-disk-mib`, default 1 GiB.
    pub min_free_disk_bytes: u64,
    /// Longest silence of a source while dst receives its pre-copy and images (until the
    /// restore starts): an idle source gives up its `--max-concurrent` slot after it.
    /// `--receive-idle-secs`, default 60 s.
    pub receive_idle: Duration,
    /// Longest time from a migration's hello to its last image (pre-copy included): a source
    /// that trickles frames cannot hold a slot either. `--receive-deadline-secs`, default 15 min.
    pub receive_deadline: Duration,
    /// Memory the pre-copy page store (a RAM-backed memfd, plus its index) may use.
    /// `--max-page-store-mib`, default half of this host's RAM (MemTotal / 2). Once the images
    /// arrived, the store may also hold no more pages than the dump's lazy memory
    /// ([`page_store_fits_lazy`]).
    pub max_page_store_bytes: u64,
    /// Page bytes one stop-and-copy session may write to the images directory.
    /// `--max-session-mib`, default this host's RAM (MemTotal): a tree that does not fit in
    /// dst's memory cannot be restored here anyway.
    pub max_session_bytes: u64,
    /// Longest a fault request may wait for its page on a live link before dst treats the link
    /// as lost (see [`crate::dst::answer_watch`]). `--fault-answer-secs`, default 60 s.
    pub fault_answer: Duration,
}

/// Flag names, for errors that tell the user what to raise.
pub mod flag {
    pub const MAX_IMAGES: &str = "--max-images-mib";
    pub const MIN_FREE_DISK: &str = "--min-free-disk-mib";
    pub const RECEIVE_IDLE: &str = "--receive-idle-secs";
    pub const RECEIVE_DEADLINE: &str = "--receive-deadline-secs";
    pub const MAX_PAGE_STORE: &str = "--max-page-store-mib";
    pub const MAX_SESSION: &str = "--max-session-mib";
    pub const FAULT_ANSWER: &str = "--fault-answer-secs";
}

/// Default of [`DstLimits::max_images_bytes`].
pub const DEFAULT_MAX_IMAGES_MIB: u64 = 8 << 10;
/// Default of [`DstLimits::min_free_disk_bytes`].
pub const DEFAULT_MIN_FREE_DISK_MIB: u64 = 1 << 10;
/// Default of [`DstLimits::receive_idle`].
pub const DEFAULT_RECEIVE_IDLE_SECS: u64 = 60;
/// Default of [`DstLimits::fault_answer`].
pub const DEFAULT_FAULT_ANSWER_SECS: u64 = 60;
/// Links in a row dst drops because a fault request went unanswered past
/// [`DstLimits::fault_answer`], with no request answered in between, before the migration fails
/// (see [`crate::dst::answer_watch`]).
pub const MAX_SILENT_LINKS: u32 = 3;
/// Default of [`DstLimits::receive_deadline`].
pub const DEFAULT_RECEIVE_DEADLINE_SECS: u64 = 15 * 60;

impl Default for DstLimits {
    fn default() -> Self {
        let ram = mem_total_bytes().unwrap_or(8 << 30);
        DstLimits {
            max_images_bytes: DEFAULT_MAX_IMAGES_MIB << 20,
            min_free_disk_bytes: DEFAULT_MIN_FREE_DISK_MIB << 20,
            receive_idle: Duration::from_secs(DEFAULT_RECEIVE_IDLE_SECS),
            receive_deadline: Duration::from_secs(DEFAULT_RECEIVE_DEADLINE_SECS),
            max_page_store_bytes: ram / 2,
            max_session_bytes: ram,
            fault_answer: Duration::from_secs(DEFAULT_FAULT_ANSWER_SECS),
        }
    }
}

/// Image files one migration may send (pageserv src sends one file at a time; a CRIU image
/// directory of a tree with thousands of tasks has a few files per task).
pub const MAX_IMAGE_FILES: usize = 65_536;
/// Image files open for writing at once: pageserv src sends each file whole before the next,
/// so one is open at a time; this leaves room and bounds dst's descriptors.
pub const MAX_OPEN_IMAGE_FILES: usize = 16;
/// pages-*.img files one stop-and-copy session may create (each stays open until the session
/// ends; CRIU writes one per dumped process).
pub const MAX_SESSION_PAGES_FILES: usize = 4096;
/// Background (pushed) page data dst holds before the restore finished, and page data of a task
/// the restore has not handed over yet: pageserv src pushes only after the restore finished, so
/// this bounds only what a misbehaving source can make dst hold. Every held message counts its
/// data plus [`HELD_MESSAGE_COST`], so zero runs count too.
pub const MAX_EARLY_HELD_BYTES: u64 = 64 << 20;
/// What one held message costs besides its data (its bookkeeping), for [`MAX_EARLY_HELD_BYTES`].
pub const HELD_MESSAGE_COST: u64 = 128;
/// Fault answers and zero runs queued for dst's fault loop (each at most 4 MiB): a full queue
/// stops the reading of the source's stream, so QUIC flow control holds back the rest.
pub const URGENT_QUEUE: usize = 64;
/// Pages dst asked for on one link that pageserv src has not answered yet (1 GiB): an honest
/// dst has one faulting page (plus its read-ahead) per waiting thread open, and never asks
/// twice; a request for more pages than this is refused as well.
pub const MAX_OUTSTANDING_FAULT_PAGES: u64 = 1 << 18;
/// Fault and resume connections of one migration waiting for it to take them (it takes its
/// fault connection at the start, and resumes and new fault connections once its post-copy
/// runs): an honest source has one fault connection and one resume in flight, so more are
/// refused (closed with a reason) instead of queued without bound.
pub const MAX_ROUTED_WAITING: usize = 8;
/// Ranges in the missing lists of one resume (16 bytes each): a dst that sends more is refused.
pub const MAX_MISSING_RANGES: usize = 1 << 22;

/// True if a page store holding `held_pages` fits the dump's `lazy_pages` (plus 1/16 and 4096
/// pages of slack: pages of a task that unmapped them between a round and the freeze).
pub fn page_store_fits_lazy(held_pages: u64, lazy_pages: u64) -> bool {
    held_pages <= lazy_pages + lazy_pages / 16 + 4096
}

/// Bytes a page store of `data_pages` data pages and `index_blocks` index blocks (2 KiB each)
/// uses, for [`DstLimits::max_page_store_bytes`].
pub fn page_store_bytes(data_pages: u64, index_blocks: u64) -> u64 {
    data_pages
        .saturating_mul(PAGE_SIZE)
        .saturating_add(index_blocks.saturating_mul(2048))
}

/// MiB, rounded down, for messages.
pub fn mib(bytes: u64) -> u64 {
    bytes >> 20
}

/// This host's RAM (`MemTotal` of /proc/meminfo), if it can be read.
pub fn mem_total_bytes() -> Option<u64> {
    let s = std::fs::read_to_string("/proc/meminfo").ok()?;
    let kib: u64 = s
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))?
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .ok()?;
    Some(kib * 1024)
}

/// Free bytes for an unprivileged writer on the file system holding `path` (statvfs).
pub fn free_disk_bytes(path: &std::path::Path) -> std::io::Result<u64> {
    let st = nix::sys::statvfs::statvfs(path).map_err(std::io::Error::from)?;
    Ok((st.blocks_available() as u64).saturating_mul(st.fragment_size() as u64))
}

/// A limit a peer hit: which, its value, and how to raise it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{what}: over the limit of {value} ({how})")]
pub struct LimitHit {
    /// What went over, on which object.
    pub what: String,
    /// The limit's value, with its unit.
    pub value: String,
    /// "raise it with --flag N" or "fixed: ...".
    pub how: String,
}

impl LimitHit {
    /// A limit a flag sets.
    pub fn flag(what: impl Into<String>, value: impl Into<String>, flag: &str) -> Self {
        LimitHit {
            what: what.into(),
            value: value.into(),
            how: format!("pageserv dst {flag} raises it"),
        }
    }

    /// A fixed limit (no honest peer reaches it).
    pub fn fixed(what: impl Into<String>, value: impl Into<String>, why: &str) -> Self {
        LimitHit {
            what: what.into(),
            value: value.into(),
            how: format!("fixed: {why}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_follow_this_host() {
        let d = DstLimits::default();
        let ram = mem_total_bytes().expect("MemTotal");
        assert_eq!(d.max_page_store_bytes, ram / 2);
        assert_eq!(d.max_session_bytes, ram);
        assert_eq!(d.max_images_bytes, 8 << 30);
        assert!(d.receive_idle < d.receive_deadline);
    }

    #[test]
    fn the_store_fits_the_lazy_memory_with_slack() {
        assert!(page_store_fits_lazy(4096, 0));
        assert!(!page_store_fits_lazy(4097, 0));
        assert!(page_store_fits_lazy(1_000_000 + 62_500 + 4096, 1_000_000));
        assert!(!page_store_fits_lazy(1_000_000 + 62_500 + 4097, 1_000_000));
    }

    #[test]
    fn a_limit_hit_names_the_flag() {
        let e = LimitHit::flag(
            "images of migration m: 9 GiB announced",
            "8192 MiB",
            flag::MAX_IMAGES,
        );
        let s = e.to_string();
        assert!(
            s.contains("8192 MiB") && s.contains("--max-images-mib"),
            "{s}"
        );
    }

    #[test]
    fn free_disk_is_read() {
        assert!(free_disk_bytes(std::path::Path::new("/")).expect("statvfs") > 0);
    }
}
