//! Typed access to a CRIU image directory: the thin IO shell over the sans-IO decoders in
//! [`pagemap`] and [`task`] (and the framing in [`crate::criu::image`]).
//!
//! Every error names the file it came from (its path as joined onto the directory given to
//! [`ImageDir::open`]).

mod pagemap;
mod reader;
mod task;

use std::fs::File;
use std::io::Read;
use std::path::{Path, PathBuf};

pub use self::pagemap::{
    MAX_IMAGE_ADDR, MapEntry, Pagemap, PagemapId, PresentIndex, PresentRun, ReadPiece,
    decode_pagemap, encode_pagemap, entry_from_pb, lazy_ranges, plan_read,
};
pub use self::reader::PageReader;
pub use self::task::{
    Task, TaskState, Vma, decode_pstree, decode_task_state, decode_vmas, vma_status,
};
use crate::criu::image::{self, ImageError, ImageKind, Result};
use crate::pages::PageRange;
use crate::pb::criu::InventoryEntry;

/// Largest metadata image (anything but pages-*.img) we read into memory. A pagemap of a
/// 1 TiB process with every other page dumped is about 3 GiB of 4 KiB pages but only ~2.5 MB of
/// records per 100k runs; 256 MiB leaves room for extreme trees while refusing garbage.
pub const MAX_IMAGE_FILE: u64 = 256 << 20;
/// Largest single [`ImageDir::read_pages`] request (1 GiB), so a bad count cannot exhaust memory.
pub const MAX_READ_PAGES: u64 = 1 << 18;
/// How many `parent/` links [`ImageDir::read_pages`] follows before assuming a loop.
pub const MAX_PARENT_DEPTH: usize = 64;

/// A directory of CRIU images (`criu dump -D DIR`), possibly with a `parent` link to the
/// previous image set.
#[derive(Debug, Clone)]
pub struct ImageDir {
    path: PathBuf,
}

impl ImageDir {
    /// Opens `path`, which must be a readable directory. Files are read on demand, so a
    /// directory that only holds pagemaps (a page server's `-D`) opens fine.
    pub fn open(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref().to_path_buf();
        let meta = std::fs::metadata(&path).map_err(|source| ImageError::Io {
            path: path.clone(),
            source,
        })?;
        if !meta.is_dir() {
            return Err(ImageError::NotADir {
                path,
                reason: "it is a file; give the directory passed to criu -D".into(),
            });
        }
        Ok(ImageDir { path })
    }

    /// The directory as given to [`ImageDir::open`].
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Path of a file inside the directory.
    pub fn file(&self, name: &str) -> PathBuf {
        self.path.join(name)
    }

    /// The parent image set behind the `parent` symlink, if there is one. The link is followed as
    /// the kernel resolves it (a relative target is relative to this directory) and the result
    /// is canonical, so chains of parents do not grow the path.
    pub fn parent(&self) -> Result<Option<ImageDir>> {
        let link = self.file("parent");
        match std::fs::symlink_metadata(&link) {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(source) => Err(ImageError::Io { path: link, source }),
            Ok(_) => {
                let target = std::fs::canonicalize(&link)
                    .map_err(|source| ImageError::Io { path: link, source })?;
                ImageDir::open(target).map(Some)
            }
        }
    }

    /// Reads a metadata image whole, refusing files over [`MAX_IMAGE_FILE`].
    fn read_image(&self, name: &str) -> Result<(String, Vec<u8>)> {
        let path = self.file(name);
        let io = |source| ImageError::Io {
            path: path.clone(),
            source,
        };
        let f = File::open(&path).map_err(io)?;
        let mut bytes = Vec::new();
        f.take(MAX_IMAGE_FILE + 1)
            .read_to_end(&mut bytes)
            .map_err(io)?;
        let display = path.display().to_string();
        if bytes.len() as u64 > MAX_IMAGE_FILE {
            return Err(ImageError::BadFile {
                file: display,
                problem: format!(
                    "larger than {MAX_IMAGE_FILE} bytes; no CRIU metadata image is this big"
                ),
            });
        }
        Ok((display, bytes))
    }

    /// inventory.img, with the checks CRIU's restore makes (`img_version` 1 or 2).
    pub fn inventory(&self) -> Result<InventoryEntry> {
        let (file, bytes) = self.read_image("inventory.img")?;
        let inv: InventoryEntry =
            image::decode_first(&file, ImageKind::Inventory, "inventory_entry", &bytes)?;
        if !matches!(inv.img_version, 1 | 2) {
            return Err(ImageError::BadFile {
                file,
                problem: format!(
                    "img_version is {}, CRIU writes 1 or 2: images from an unknown CRIU",
                    inv.img_version
                ),
            });
        }
        Ok(inv)
    }

    /// pstree.img: every process, root first.
    pub fn pstree(&self) -> Result<Vec<Task>> {
        let (file, bytes) = self.read_image("pstree.img")?;
        decode_pstree(&file, &bytes)
    }

    /// `pagemap-<pid>.img`.
    pub fn pagemap(&self, pid: u32) -> Result<Pagemap> {
        self.pagemap_of(PagemapId::Pid(pid))
    }

    /// A task's or shared-memory segment's pagemap.
    pub fn pagemap_of(&self, id: PagemapId) -> Result<Pagemap> {
        let (file, bytes) = self.read_image(&id.file_name())?;
        decode_pagemap(&file, &bytes)
    }

    /// Ids of the `pagemap-shmem-<id>.img` files present, ascending.
    pub fn shmem_ids(&self) -> Result<Vec<u64>> {
        let io = |source| ImageError::Io {
            path: self.path.clone(),
            source,
        };
        let mut ids = Vec::new();
        for ent in std::fs::read_dir(&self.path).map_err(io)? {
            let name = ent.map_err(io)?.file_name();
            let id = name
                .to_str()
                .and_then(|n| n.strip_prefix("pagemap-shmem-"))
                .and_then(|n| n.strip_suffix(".img"))
                .and_then(|n| n.parse::<u64>().ok());
            ids.extend(id);
        }
        ids.sort_unstable();
        Ok(ids)
    }

    /// The VMAs of `mm-<pid>.img`, sorted.
    pub fn vmas(&self, pid: u32) -> Result<Vec<Vma>> {
        let (file, bytes) = self.read_image(&format!("mm-{pid}.img"))?;
        decode_vmas(&file, &bytes)
    }

    /// The task's state from `core-<pid>.img`.
    pub fn task_state(&self, pid: u32) -> Result<TaskState> {
        let (file, bytes) = self.read_image(&format!("core-{pid}.img"))?;
        decode_task_state(&file, &bytes)
    }

    /// Whether `pid` was dumped as a zombie: CRIU writes no mm or pagemap image for it
    /// (`dump_one_zombie()` in criu/cr-dump.c), and a lazy restore sends no uffd for it.
    pub fn is_zombie(&self, pid: u32) -> Result<bool> {
        Ok(self.task_state(pid)? == TaskState::Dead)
    }

    /// Whether `pid` has memory images: false only for a zombie, which has no pagemap image
    /// (a pagemap image missing for any other task is the error reading it gives).
    pub fn has_memory(&self, pid: u32) -> Result<bool> {
        let pagemap = self.file(&PagemapId::Pid(pid).file_name());
        Ok(pagemap.exists() || !self.is_zombie(pid)?)
    }

    /// The ranges a lazy-pages daemon would serve for `pid`: its PE_LAZY entries split at VMA
    /// ends, as CRIU's `collect_iovs()` does. None for a zombie.
    pub fn lazy_ranges(&self, pid: u32) -> Result<Vec<PageRange>> {
        if !self.has_memory(pid)? {
            return Ok(Vec::new());
        }
        let pm = self.pagemap(pid)?;
        let vmas = self.vmas(pid)?;
        lazy_ranges(
            &self
                .file(&PagemapId::Pid(pid).file_name())
                .display()
                .to_string(),
            &self.file(&format!("mm-{pid}.img")).display().to_string(),
            &pm.entries,
            &vmas,
        )
    }

    /// Pages `pid`'s pagemap marks both lazy and present ([`lazy_pages_with_data`]).
    pub fn lazy_pages_with_data(&self, pid: u32) -> Result<u64> {
        if !self.has_memory(pid)? {
            return Ok(0);
        }
        Ok(lazy_pages_with_data(&self.pagemap(pid)?.entries))
    }

    /// Path of `pages-<pages_id>.img`.
    pub fn pages_file(&self, pages_id: u32) -> PathBuf {
        self.file(&format!("pages-{pages_id}.img"))
    }

    /// Size of `pages-<pages_id>.img` in bytes.
    pub fn pages_file_len(&self, pages_id: u32) -> Result<u64> {
        let path = self.pages_file(pages_id);
        std::fs::metadata(&path)
            .map(|m| m.len())
            .map_err(|source| ImageError::Io { path, source })
    }

    /// Where each PRESENT entry of `pid`'s pagemap lives in its pages file. Checks that the
    /// pages file exists and is large enough for them.
    pub fn present_index(&self, pid: u32) -> Result<PresentIndex> {
        Ok(self.page_reader(PagemapId::Pid(pid))?.index().clone())
    }

    /// A reader for one pagemap's data that keeps the pagemap, its index and the pages file
    /// open, for callers reading many runs (a lazy-pages server).
    pub fn page_reader(&self, id: PagemapId) -> Result<PageReader> {
        PageReader::open(self, id, 0)
    }

    /// Reads `nr_pages` pages of `pid` from `vaddr` (dump-time address): PRESENT pages from this
    /// set's pages file, PARENT pages from the `parent/` chain. LAZY-only and never-dumped pages
    /// are errors: their data is not in any image. At most [`MAX_READ_PAGES`] per call.
    pub fn read_pages(&self, pid: u32, vaddr: u64, nr_pages: u64) -> Result<Vec<u8>> {
        self.page_reader(PagemapId::Pid(pid))?.read(vaddr, nr_pages)
    }
}

/// Writes `pagemap-<pid>.img` or `pagemap-shmem-<id>.img` into `dir` so that CRIU 4.1.1 and 4.2+
/// can read it (both count fields filled, flags always set). The entries must be ascending and
/// disjoint; the data of PRESENT entries goes to `pages-<pages_id>.img`, which the caller writes.
pub fn write_pagemap(dir: &Path, id: PagemapId, pages_id: u32, entries: &[MapEntry]) -> Result<()> {
    let path = dir.join(id.file_name());
    let bytes = encode_pagemap(&path.display().to_string(), pages_id, entries)?;
    std::fs::write(&path, bytes).map_err(|source| ImageError::Io { path, source })
}

#[cfg(test)]
mod tests;

/// Pages `entries` mark both lazy and present: their data is in the pages file, and a lazy
/// restore skips over it (`restore_priv_vma_content` -> `skip_pages` in criu/mem.c). CRIU's plain
/// dumps mark every lazy-capable page so; `criu dump --lazy-pages` never does (`ppb_xfer_flags`
/// with `transfer_lazy` off: lazy pages are PE_LAZY alone, no data).
pub fn lazy_pages_with_data(entries: &[MapEntry]) -> u64 {
    entries
        .iter()
        .filter(|e| e.flags.is_lazy() && e.flags.is_present())
        .map(|e| e.nr_pages)
        .sum()
}

/// Present pages in `entries` that CRIU's restorer reads itself from the pages file, with
/// `preadv` at their offsets (`prepare_vma_ios` in criu/mem.c): those of the private mappings
/// in `vmas` CRIU does not premap, hugetlb (`MAP_HUGETLB`) and plugin (`VMA_EXT_PLUGIN`) ones.
pub fn pages_read_by_restorer(entries: &[MapEntry], vmas: &[Vma]) -> u64 {
    let mut pages = 0;
    let unpremapped = vmas.iter().filter(|v| {
        v.flags as i32 & libc::MAP_HUGETLB != 0 || v.status & vma_status::EXT_PLUGIN != 0
    });
    for v in unpremapped {
        for e in entries.iter().filter(|e| e.flags.is_present()) {
            let (start, end) = (e.vaddr.max(v.start), e.range().end().min(v.end));
            if start < end {
                pages += (end - start) / crate::pages::PAGE_SIZE;
            }
        }
    }
    pages
}
