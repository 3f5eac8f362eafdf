//! What must succeed between the images' arrival at dst and a running `criu restore`: the
//! images' lazy ranges checked against the pre-copied page store, then the uffd keeper, the
//! fault loop, the lazy-pages socket and the restore command started. A failure here leaves
//! nothing restored, so dst::migration tells the source to resume its tree (`Abort`).

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;

use anyhow::{Context, Result};

use crate::criu::images::ImageDir;
use crate::dst::early_restore::EarlyRestore;
use crate::dst::lazy_socket::LazySocket;
use crate::dst::options::DstOptions;
use crate::dst::page_store::PageStore;
use crate::dst::restore::Restore;
use crate::dst::uffd_keeper::UffdKeeper;
use crate::dst::uffd_loop::{self, UffdStats};
use crate::pages::PageRange;
use crate::stats::DstReport;

/// Reads the lazy ranges of every task from the images (into `report`) and checks the page store
/// against them. A task whose memory the dump wrote whole into the images (CRIU's stack-page
/// test, see source::eager_dump) has no lazy page: its pre-copied pages can never be confirmed,
/// so they are dropped from the store; the rest must fit the dump's lazy pages.
pub(crate) fn check_images(
    images_dir: &Path,
    store: &mut Option<PageStore>,
    report: &mut DstReport,
) -> Result<(BTreeMap<u32, Vec<PageRange>>, usize)> {
    let images = ImageDir::open(images_dir)?;
    let mut lazy: BTreeMap<u32, Vec<PageRange>> = BTreeMap::new();
    let tasks = images.pstree()?;
    for t in &tasks {
        let ranges = images.lazy_ranges(t.pid)?;
        report.lazy_pages += ranges.iter().map(|r| r.nr_pages).sum::<u64>();
        lazy.insert(t.pid, ranges);
    }
    report.tasks = tasks.len() as u64;
    if let Some(s) = store {
        for (&pid, _) in lazy.iter().filter(|(_, ranges)| ranges.is_empty()) {
            let dropped = s.forget(pid)?;
            if dropped > 0 {
                report.precopy_pages_unused += dropped;
                tracing::warn!(
                    pid,
                    dropped,
                    "the dump wrote this task's memory whole into the images (no lazy page): \
                     its pre-copied pages are not needed and were dropped"
                );
            }
        }
        let held = s.pages_data() + s.pages_zero();
        if !crate::limits::page_store_fits_lazy(held, report.lazy_pages) {
            return Err(PreCopyMismatch {
                held,
                lazy: report.lazy_pages,
            }
            .into());
        }
    }
    Ok((lazy, tasks.len()))
}

/// The page store holds more pages than the dump's lazy pages allow.
#[derive(Debug, thiserror::Error)]
#[error(
    "the source pre-copied {held} pages, more than the dump's {lazy} lazy pages allow: the \
     pre-copy and the images disagree (is it the same migration?)"
)]
pub(crate) struct PreCopyMismatch {
    held: u64,
    lazy: u64,
}

/// What [`start_restore`] started.
pub(crate) struct Started {
    pub keeper: Arc<UffdKeeper>,
    pub handle: uffd_loop::LoopHandle,
    pub stats: Arc<UffdStats>,
    pub socket: LazySocket,
    pub restore: Restore,
    /// The restore is the one started with the migration (`criu restore --stream`).
    pub early: bool,
}

/// What the fault loop is connected to: the pages already here it answers faults from, and
/// where its events go.
pub(crate) struct FaultThreadIo<S> {
    pub held: Arc<dyn uffd_loop::HeldPages>,
    pub sink: S,
}

/// `early` if it may be sent on: started with the dump's restore options, still waiting, and
/// the images in `images_dir` are ones a streamed restore reads right
/// ([`crate::criu::stream_restore`]); else why not (and it is dropped, which kills it).
fn send_on(
    mut early: EarlyRestore,
    carried: &[String],
    images_dir: &Path,
) -> Result<EarlyRestore, String> {
    if early.carried() != carried {
        return Err(format!(
            "the dump calls for restore options {carried:?}, the source announced {:?}",
            early.carried()
        ));
    }
    let blockers = ImageDir::open(images_dir)
        .and_then(|images| crate::criu::stream_restore::blockers(&images))
        .map_err(|e| format!("reading the images: {e}"))?;
    if !blockers.is_empty() {
        return Err(format!(
            "a streamed restore would misread these images: {}",
            blockers.join("; ")
        ));
    }
    if !early.is_waiting() {
        return Err(
            "the restore started with the migration is no longer waiting for its \
                    images (it ended, or never connected to the image streamer)"
                .into(),
        );
    }
    Ok(early)
}

/// Starts the uffd keeper, the fault loop, the lazy-pages socket and `criu restore` (sends on
/// `early`, the restore started with the migration, if its options are the dump's; see
/// [`crate::dst::early_restore`]); on a failure, stops what it had started.
#[allow(clippy::too_many_arguments)]
pub(crate) fn start_restore(
    opts: &DstOptions,
    dir: &Path,
    images_dir: &Path,
    work: &Path,
    carried: &[String],
    lazy: &BTreeMap<u32, Vec<PageRange>>,
    io: FaultThreadIo<impl uffd_loop::OutboundSink>,
    early: Option<EarlyRestore>,
) -> Result<Started> {
    let FaultThreadIo { held, sink } = io;
    // A copy of every uffd lives in the keeper (fork children's too, as they appear), so even
    // this process dying cannot zero-fill; a dst restarted on the same --work adopts them.
    let keeper = Arc::new(
        UffdKeeper::spawn(
            &std::env::current_exe().context("locating the pageserv binary")?,
            dir,
            opts.recover_timeout,
        )
        .context("starting the uffd keeper")?,
    );
    let stats = Arc::new(UffdStats::default());
    let config = uffd_loop::LoopConfig {
        readahead_pages: opts.readahead_pages,
        sequential_readahead: opts.sequential_readahead,
        image_pids: Some(lazy.keys().copied().collect()),
        fork_holder: Some(keeper.clone()),
        held: Some(held),
        ..Default::default()
    };
    let handle = match uffd_loop::spawn_with(config, sink, stats.clone()) {
        Ok(h) => h,
        Err(e) => {
            keeper.release();
            return Err(anyhow::Error::new(e).context("starting the fault loop"));
        }
    };
    let mut used_early = false;
    let started = LazySocket::bind(work)
        .context("listening on lazy-pages.socket")
        .and_then(|socket| {
            let restore = match early.map(|e| send_on(e, carried, images_dir)) {
                Some(Ok(e)) => {
                    used_early = true;
                    e.go(images_dir)
                }
                other => {
                    if let Some(Err(why)) = other {
                        tracing::warn!("not sending the early restore on, restoring anew: {why}");
                    }
                    Restore::start(
                        &opts.criu,
                        images_dir,
                        work,
                        &opts.restore.with_carried(carried),
                    )?
                }
            };
            Ok((socket, restore))
        });
    match started {
        Ok((socket, restore)) => Ok(Started {
            keeper,
            handle,
            stats,
            socket,
            restore,
            early: used_early,
        }),
        Err(e) => {
            let _ = handle.shutdown(false);
            keeper.release();
            Err(e)
        }
    }
}
