//! A restarted `pageserv dst` adopting the restored tasks of a dst that died mid post-copy.
//!
//! The dead dst's uffd keeper (dst::uffd_keeper) holds every restored task's uffd (and its fork
//! children's) for the recover timeout; the tasks wait on their faults meanwhile. A dst started
//! with the same `--work` finds each such migration directory (its `uffd-keeper.sock`), checks
//! that the restore had finished there (`restore-finished`), and takes the uffds over. What the
//! dead dst knew is gone, so what is still missing is rebuilt from the tasks themselves: a lazy
//! page present in `/proc/PID/pagemap` was placed (UFFDIO_COPY or ZEROPAGE), every other one is
//! missing (and a page placed in between makes its UFFDIO_COPY fail with EEXIST, never twice).
//! Each task's start time must still match the keeper's record (the pid was not reused). The
//! source then comes back through the resume path (source::recovery): dst tells it what is
//! missing and that the restore finished, so it neither ships the images nor restores again.
//!
//! Known gaps: an mremap the dead dst had processed is not known here (lazy memory is looked
//! for at its image address); a fork child whose restored ancestor has exited cannot be
//! matched to its image pid and is kept, unserved (the migration then cannot complete and ends
//! at the recover timeout); a fault the dead dst had read but not answered is answered only
//! when the push reaches its page.

use std::collections::BTreeMap;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::AtomicU64;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};
use tokio::sync::mpsc;

use crate::criu::images::ImageDir;
use crate::dst::migration::{bridge, memory_whole};
use crate::dst::options::{DstOptions, MIGRATION_ID_FILE, RESTORE_FINISHED_FILE, read_opener};
use crate::dst::post_copy::{End, LocalPages, PostCopy, Routed, Step, Wiring};
use crate::dst::uffd_keeper::policy::Holding;
use crate::dst::uffd_keeper::{self, Adoption, KEEPER_SOCKET, UffdKeeper};
use crate::dst::uffd_loop::{self, Inbound, Outbound, UffdStats};
use crate::keys::trust::Fingerprint;
use crate::pages::{PAGE_SIZE, PageRange};
use crate::stats::DstReport;

/// pagemap entry bits: page present in RAM, page swapped out.
const PM_PRESENT: u64 = 1 << 63;
const PM_SWAP: u64 = 1 << 62;
/// Pagemap entries read per call (64 KiB of entries, 32 MiB of memory).
const PAGEMAP_CHUNK: u64 = 8192;

/// A migration whose dst died, taken over from its keeper.
pub(crate) struct Orphan {
    pub dir: PathBuf,
    pub migration_id: String,
    pub finished_at_ns: u64,
    /// The certificate that opened the migration (and its names): only it may resume it.
    pub opener: Fingerprint,
    pub opener_name: String,
    adoption: Adoption,
}

/// Every migration under `work_base` whose keeper waits for an adopter, adopted. A directory
/// that cannot be adopted is logged and skipped (its keeper kills its tasks at the timeout).
pub(crate) fn find(work_base: &Path) -> Vec<Orphan> {
    let Ok(entries) = std::fs::read_dir(work_base) else {
        return Vec::new();
    };
    let mut out = Vec::new();
    for dir in entries.flatten().map(|e| e.path()) {
        if !dir.join(KEEPER_SOCKET).exists() {
            continue;
        }
        match take(&dir) {
            Ok(o) => {
                tracing::info!(
                    migration = %o.migration_id,
                    dir = %dir.display(),
                    uffds = o.adoption.held.len(),
                    "adopted the restored tasks of a pageserv dst that died; waiting for the \
                     source to resume"
                );
                out.push(o);
            }
            Err(e) => tracing::error!(dir = %dir.display(), "cannot adopt this migration: {e:#}"),
        }
    }
    out
}

fn take(dir: &Path) -> Result<Orphan> {
    let migration_id = std::fs::read_to_string(dir.join(MIGRATION_ID_FILE))
        .with_context(|| format!("reading the migration id in {}", dir.display()))?
        .trim()
        .to_string();
    let finished = std::fs::read_to_string(dir.join(RESTORE_FINISHED_FILE)).map_err(|_| {
        anyhow!(
            "its restore had not finished when dst died (no {RESTORE_FINISHED_FILE}), so \
             there is no whole restored tree to adopt; its keeper kills the tasks at the recover \
             timeout and the source, still frozen, can be retried with `pageserv src --resume DIR`"
        )
    })?;
    let finished_at_ns = finished
        .split_whitespace()
        .next()
        .and_then(|t| t.parse().ok())
        .with_context(|| format!("a malformed {RESTORE_FINISHED_FILE} in {}", dir.display()))?;
    let (opener, opener_name) = read_opener(dir)?;
    let adoption = uffd_keeper::adopt(dir)?;
    Ok(Orphan {
        dir: dir.to_path_buf(),
        migration_id,
        finished_at_ns,
        opener,
        opener_name,
        adoption,
    })
}

/// Splits `range` by its pagemap `entries` (one per page): the runs still missing, and how many
/// pages are in place.
pub(crate) fn missing_runs(range: PageRange, entries: &[u64]) -> (Vec<PageRange>, u64) {
    let mut runs: Vec<PageRange> = Vec::new();
    let mut present = 0;
    for (i, e) in entries.iter().take(range.nr_pages as usize).enumerate() {
        if e & (PM_PRESENT | PM_SWAP) != 0 {
            present += 1;
            continue;
        }
        let addr = range.start + i as u64 * PAGE_SIZE;
        match runs.last_mut() {
            Some(r) if r.end() == addr => r.nr_pages += 1,
            _ => runs.push(PageRange::new(addr, 1)),
        }
    }
    // Entries the kernel did not return (past the end of the mappings) count as missing.
    if (entries.len() as u64) < range.nr_pages {
        let from = range.start + entries.len() as u64 * PAGE_SIZE;
        let n = range.nr_pages - entries.len() as u64;
        match runs.last_mut() {
            Some(r) if r.end() == from => r.nr_pages += n,
            _ => runs.push(PageRange::new(from, n)),
        }
    }
    (runs, present)
}

/// What task `host_pid` still lacks of its `lazy` ranges, from its pagemap, and how many of
/// them are in place.
fn rebuild(host_pid: i32, lazy: &[PageRange]) -> Result<(Vec<PageRange>, u64)> {
    let path = format!("/proc/{host_pid}/pagemap");
    let f = std::fs::File::open(&path).with_context(|| format!("opening {path}"))?;
    let (mut missing, mut present) = (Vec::new(), 0);
    for r in lazy {
        let mut at = 0;
        while at < r.nr_pages {
            let n = PAGEMAP_CHUNK.min(r.nr_pages - at);
            let part = PageRange::new(r.start + at * PAGE_SIZE, n);
            let mut buf = vec![0u8; (n * 8) as usize];
            let got = f
                .read_at(&mut buf, part.start / PAGE_SIZE * 8)
                .with_context(|| format!("reading {path} at {:#x}", part.start))?;
            let entries: Vec<u64> = buf[..got - got % 8]
                .chunks_exact(8)
                .map(|c| u64::from_ne_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]]))
                .collect();
            let (runs, p) = missing_runs(part, &entries);
            missing.extend(runs);
            present += p;
            at += n;
        }
    }
    Ok((crate::pages::merge_ranges(missing), present))
}

/// Runs an adopted migration to its end: rebuild what is missing, wait for the source to
/// resume, place the rest.
pub(crate) async fn adopt_in(
    opts: &DstOptions,
    orphan: Orphan,
    mut routes: mpsc::Receiver<Routed>,
    fault_port: u16,
) -> Result<DstReport> {
    let started = Instant::now();
    let mut report = DstReport {
        adopted: true,
        ..Default::default()
    };
    let Orphan {
        dir,
        finished_at_ns,
        adoption,
        ..
    } = orphan;
    let images = ImageDir::open(dir.join("images"))?;
    let mut lazy: BTreeMap<i32, Vec<PageRange>> = BTreeMap::new();
    for t in images.pstree()? {
        let ranges = images.lazy_ranges(t.pid)?;
        report.lazy_pages += ranges.iter().map(|r| r.nr_pages).sum::<u64>();
        lazy.insert(t.pid as i32, ranges);
    }
    report.tasks = lazy.len() as u64;
    let keeper: Arc<UffdKeeper> = Arc::new(adoption.keeper);
    // Every uffd here came from the keeper, so it holds them all.
    keeper.tasks_held();
    let answers = crate::dst::post_copy::answer_watch(&opts.limits);
    let (sink, mut ev_rx, requests) = bridge(answers.clone());
    let stats = Arc::new(UffdStats::default());
    let held = LocalPages::new(None, Arc::new(AtomicU64::new(0)));
    let config = uffd_loop::LoopConfig {
        readahead_pages: opts.readahead_pages,
        sequential_readahead: opts.sequential_readahead,
        fork_holder: Some(keeper.clone()),
        held: Some(Arc::new(held.clone())),
        ..Default::default()
    };
    let handle =
        uffd_loop::spawn_with(config, sink, stats.clone()).context("starting the fault loop")?;

    // Restored tasks first (their children need their missing lists), then fork children.
    let mut missing_of: BTreeMap<i32, (i32, Vec<PageRange>)> = BTreeMap::new();
    let (tasks, children): (Vec<_>, Vec<_>) = adoption
        .held
        .into_iter()
        .partition(|(h, _)| matches!(h, Holding::Task { .. }));
    for (h, uffd) in tasks {
        let Holding::Task {
            image_pid,
            host_pid,
            start_time,
        } = h
        else {
            continue;
        };
        match uffd_keeper::start_time(host_pid) {
            Ok(t) if t == start_time => {}
            _ => {
                tracing::warn!(
                    image_pid,
                    host_pid,
                    "a restored task exited before the adoption (or its pid was reused): skipped"
                );
                continue;
            }
        }
        let ranges = lazy.get(&image_pid).cloned().ok_or_else(|| {
            anyhow!(
                "the keeper holds task {image_pid}, which the images in {} do not list: not \
                 this migration's task",
                dir.display()
            )
        })?;
        let (missing, present) = crate::async_runtime::blocking(|| rebuild(host_pid, &ranges))
            .with_context(|| format!("rebuilding what task {image_pid} (pid {host_pid}) lacks"))?;
        report.pages_adopted += present;
        tracing::info!(
            image_pid,
            host_pid,
            in_place = present,
            missing = missing.iter().map(|r| r.nr_pages).sum::<u64>(),
            "adopted task"
        );
        missing_of.insert(host_pid, (image_pid, missing.clone()));
        handle.send(Inbound::Task {
            pid: image_pid,
            uffd,
            lazy: missing,
            host_pid: Some(host_pid),
        })?;
    }
    for (h, uffd) in children {
        let root_host_pid = h.root_host_pid();
        // A child lacks at most what its ancestor lacks (every page lands in every view of a
        // pid); a page it has after all fails with EEXIST and is not placed twice.
        let (pid, missing) = missing_of
            .get(&root_host_pid)
            .cloned()
            .unwrap_or((0, Vec::new()));
        if pid == 0 {
            tracing::error!(
                root_host_pid,
                "a fork child whose restored ancestor is gone: kept, but it cannot be served"
            );
        }
        handle.send(Inbound::Child {
            pid,
            uffd,
            lazy: missing,
            root_host_pid,
        })?;
    }
    handle.send(Inbound::RestoreFinished)?;

    let wiring = Wiring {
        to_loop: handle.sender(),
        held,
        recover_timeout: opts.recover_timeout,
        // Every adopted task is handed over already.
        lazy: BTreeMap::new(),
        fault_port,
        requests,
        answers,
    };
    let mut post = PostCopy::adopted(wiring, finished_at_ns);
    let mut tick = tokio::time::interval(Duration::from_millis(50));
    let post_copy_start = Instant::now();
    let mut released = false;
    let outcome: Result<End> = loop {
        match post.next(&mut ev_rx, &mut routes, &mut tick).await {
            Err(e) => break Err(e),
            Ok(Step::Done(end)) => break Ok(end),
            Ok(Step::Idle) => {}
            Ok(Step::Event(Outbound::Complete)) => {
                if !released {
                    released = true;
                    keeper.release();
                }
                report.post_copy_ms = post_copy_start.elapsed().as_secs_f64() * 1e3;
                memory_whole(&mut post, &mut report, &stats).await;
            }
            Ok(Step::Event(Outbound::TaskGone { pid })) => {
                tracing::info!(pid, "restored task exited")
            }
            Ok(Step::Event(Outbound::Error(e))) => break Err(anyhow!("fault loop: {e}")),
            Ok(Step::Event(other)) => tracing::debug!("fault loop: {other:?}"),
        }
    };
    report.reconnects = post.reconnects;
    report.bytes_received = post.bytes_received();
    match outcome {
        Ok(end) => {
            if matches!(end, End::WholeNoRelease) {
                tracing::warn!(
                    "the source did not confirm it ended its dump; check it is gone there"
                );
            }
            post.close(0, b"done");
            handle
                .send(Inbound::Shutdown {
                    kill_incomplete: false,
                })
                .ok();
        }
        Err(e) => {
            // As in any failed post-copy: incomplete tasks die before their uffds close (the
            // keeper, still attached, sees this dst go and holds nothing alive any more).
            let shut = tokio::task::spawn_blocking(move || handle.shutdown(true)).await;
            tracing::warn!(?shut, "stopped the fault loop after a failure");
            post.close(1, format!("{e:#}").as_bytes());
            bail!("the adopted migration in {} failed: {e:#}", dir.display());
        }
    }
    report.total_ms = started.elapsed().as_secs_f64() * 1e3;
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn present_pages_are_not_missing() {
        let r = PageRange::new(0x10000, 6);
        let e = [PM_PRESENT, 0, 0, PM_SWAP, 0, PM_PRESENT];
        let (runs, present) = missing_runs(r, &e);
        assert_eq!(present, 3);
        assert_eq!(
            runs,
            vec![PageRange::new(0x11000, 2), PageRange::new(0x14000, 1)]
        );
    }

    #[test]
    fn entries_past_the_end_count_as_missing() {
        let r = PageRange::new(0x10000, 4);
        let (runs, present) = missing_runs(r, &[0, PM_PRESENT]);
        assert_eq!(present, 1);
        assert_eq!(
            runs,
            vec![PageRange::new(0x10000, 1), PageRange::new(0x12000, 2)]
        );
    }

    #[test]
    fn rebuilds_from_a_live_process() {
        // Our own memory: a touched page is present, an untouched anonymous page is not.
        let len = 4 * PAGE_SIZE as usize;
        // SAFETY: a fresh private anonymous mapping, unmapped below.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        assert_ne!(p, libc::MAP_FAILED);
        // SAFETY: inside the mapping.
        unsafe { *(p as *mut u8).add(PAGE_SIZE as usize) = 1 };
        let r = PageRange::new(p as u64, 4);
        let (missing, present) = rebuild(std::process::id() as i32, &[r]).unwrap();
        // SAFETY: the mapping made above.
        unsafe { libc::munmap(p, len) };
        assert_eq!(present, 1);
        assert_eq!(
            missing,
            vec![
                PageRange::new(p as u64, 1),
                PageRange::new(p as u64 + 2 * PAGE_SIZE, 2)
            ]
        );
    }
}
