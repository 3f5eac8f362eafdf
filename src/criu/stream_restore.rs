//! Which images `criu restore --stream` reads as it would read the files, and which it would
//! misread: in stream mode every image is a pipe, read once from its start
//! ([`crate::criu::image_streamer`]), and a few restore paths in CRIU 4.x still seek in an
//! image or ask for its size:
//!
//! - a lazy restore skips the data of pages marked both lazy and present
//!   (`restore_priv_vma_content` -> `skip_pages`), and `skip_pagemap_pages` only moves a file
//!   offset: the pages after them would be read from the wrong place. `criu dump --lazy-pages`
//!   never writes such pages (lazy pages are PE_LAZY alone); CRIU's plain dumps mark every
//!   lazy-capable page so (seen: a plain dump restored streamed fails in CRIU's vdso check);
//! - present pages of hugetlb and plugin mappings are read by CRIU's restorer with `preadv` at
//!   their offsets in the pages image (`prepare_vma_ios` in criu/mem.c), which a pipe refuses;
//! - `do_restore_nftables` (criu/net.c) sizes `nftables-*.img` with `fstat`, which a pipe
//!   answers with 0: the ruleset would be restored empty, silently;
//! - `--auto-dedup` opens the pages image for writing, which a streamed restore cannot
//!   (`BUG_ON` in `img_streamer_open`).
//!
//! [`blockers`] lists what of this a migration's images have; dst::migration sends an early
//! restore on only when the list is empty, and otherwise restores the usual way (logged). Options
//! are checked before the restore starts ([`option_blocker`]).

use crate::criu::image::{ImageError, Result};
use crate::criu::images::{ImageDir, lazy_pages_with_data, pages_read_by_restorer};

/// Why a streamed restore would misread `images`, one line per cause found (empty: none).
pub fn blockers(images: &ImageDir) -> Result<Vec<String>> {
    let mut why = Vec::new();
    for t in images.pstree()? {
        if !images.has_memory(t.pid)? {
            continue;
        }
        // One read of each image per task: this runs between the images' arrival and the
        // restore.
        let entries = images.pagemap(t.pid)?.entries;
        let skipped = lazy_pages_with_data(&entries);
        if skipped > 0 {
            why.push(format!(
                "task {}: {skipped} pages are marked lazy and have data in the pages image, which \
                 a lazy restore skips and a pipe cannot (not a `criu dump --lazy-pages` dump?)",
                t.pid
            ));
        }
        let preadv = pages_read_by_restorer(&entries, &images.vmas(t.pid)?);
        if preadv > 0 {
            why.push(format!(
                "task {}: {preadv} present pages in hugetlb or plugin mappings, which CRIU's \
                 restorer reads with preadv from the pages image",
                t.pid
            ));
        }
    }
    let dir = images.path();
    let entries = std::fs::read_dir(dir).map_err(|source| ImageError::Io {
        path: dir.to_path_buf(),
        source,
    })?;
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if name.starts_with("nftables-") && name.ends_with(".img") {
            why.push(format!(
                "{name}: CRIU sizes the nftables image with fstat, which a pipe answers with 0"
            ));
        }
    }
    Ok(why)
}

/// Why restore options `opts` rule out a streamed restore, if they do.
pub fn option_blocker(opts: &[String]) -> Option<String> {
    crate::criu::opts::has_opt(opts, "--auto-dedup", None).then(|| {
        "--auto-dedup opens the pages image for writing, which a streamed restore cannot".into()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn auto_dedup_rules_out_a_streamed_restore() {
        assert!(option_blocker(&["--auto-dedup".into()]).is_some());
        assert!(option_blocker(&["--tcp-established".into()]).is_none());
        assert!(option_blocker(&[]).is_none());
    }
}
