//! A lazy dump that came out eager: CRIU's stack-page test, and what pageserv does about it.
//!
//! `criu dump --lazy-pages` keeps each thread's current stack page out of the lazy set
//! (`is_stack()` in criu/mem.c). Since CRIU commit 1bc68dd87 (2019, still in 4.1.1) the test
//! reads `!((sp ^ vaddr) & ~PAGE_MASK)`, which compares the offsets within the page instead of
//! the page numbers. Every `vaddr` it sees is page-aligned, so the test never matches a stack
//! page, and when any thread's stack pointer happens to be page-aligned at the freeze (one
//! 16-byte-aligned pointer in 256), it matches *every* page of the task: the whole memory goes
//! into the images, the restore waits for all of it, and post-copy becomes a copy of everything
//! during the downtime (seen here: 512 MiB, 0 lazy pages, 6.7 s downtime instead of 0.1 s;
//! reproduced with a thread parked on a page-aligned stack: 16384 pages, 0 lazy, against 16384
//! lazy with the pointer 16 bytes lower). The memory stays correct.
//!
//! The stack pointer is a property of the moment of the freeze, so a second dump a moment later
//! almost always comes out lazy: pageserv checks the images of a dump it started, and if a task
//! came out eager it makes that dump fail (CRIU then resumes the tree, as for any failure before
//! the restore) and dumps again, at most [`RETRIES`] times.

use crate::criu::image::Result;
use crate::criu::images::ImageDir;

/// Fresh dumps after an eager one before pageserv goes on with an eager dump.
pub const RETRIES: u32 = 2;

/// Below this many present pages in lazy-capable memory a task with no lazy page is not called
/// eager: a fixed CRIU keeps one stack page per thread out of the lazy set.
pub const MIN_PAGES: u64 = 64;

/// Image pids of the tasks whose lazy-capable memory the dump wrote completely into the images:
/// no lazy page at all, and at least [`MIN_PAGES`] present pages inside VMAs a lazy restore would
/// register ([`crate::criu::images::Vma::can_be_lazy`]).
pub fn eager_tasks(images: &ImageDir) -> Result<Vec<u32>> {
    let mut eager = Vec::new();
    for task in images.pstree()? {
        // A zombie has no memory (and no pagemap image).
        if !images.has_memory(task.pid)? {
            continue;
        }
        let entries = images.pagemap(task.pid)?.entries;
        if entries
            .iter()
            .any(|e| e.flags.is_lazy() && !e.flags.is_present())
        {
            continue;
        }
        let vmas = images.vmas(task.pid)?;
        let present_lazy_capable: u64 = entries
            .iter()
            .filter(|e| e.flags.is_present())
            .filter(|e| {
                vmas.iter()
                    .any(|v| v.can_be_lazy() && v.start <= e.vaddr && e.vaddr < v.end)
            })
            .map(|e| e.nr_pages)
            .sum();
        if present_lazy_capable >= MIN_PAGES {
            eager.push(task.pid);
        }
    }
    Ok(eager)
}
