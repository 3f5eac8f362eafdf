//! Reading page data back out of an image set: pread from `pages-<id>.img` for PRESENT runs,
//! the `parent/` chain for PARENT runs.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::PathBuf;

use super::{ImageDir, MAX_PARENT_DEPTH, MAX_READ_PAGES, Pagemap, PagemapId, PresentIndex};
use super::{ReadPiece, plan_read};
use crate::criu::image::{ImageError, Result};
use crate::pages::{PAGE_SIZE, PageRange};

/// One pagemap's data, ready to read: the decoded pagemap, where its PRESENT runs sit in the
/// pages file, the open pages file, and (if it has PARENT runs) a reader for the parent set.
#[derive(Debug)]
pub struct PageReader {
    file: String,
    pagemap: Pagemap,
    index: PresentIndex,
    pages_path: PathBuf,
    pages: Option<File>,
    parent: Option<Box<PageReader>>,
    /// Why `parent` is absent although PARENT runs exist (reported when one is read).
    no_parent: Option<String>,
}

impl PageReader {
    /// Opens pagemap `id` of `dir`. Checks that the pages file holds every PRESENT run, and opens
    /// the parent chain when PARENT runs need it (at most [`MAX_PARENT_DEPTH`] links).
    pub(super) fn open(dir: &ImageDir, id: PagemapId, depth: usize) -> Result<Self> {
        let file = dir.file(&id.file_name()).display().to_string();
        let pagemap = dir.pagemap_of(id)?;
        let index = PresentIndex::new(&pagemap);
        let pages_path = dir.pages_file(pagemap.pages_id);
        let pages = if index.runs.is_empty() {
            None
        } else {
            let f = File::open(&pages_path).map_err(|source| ImageError::Io {
                path: pages_path.clone(),
                source,
            })?;
            let have = f
                .metadata()
                .map_err(|source| ImageError::Io {
                    path: pages_path.clone(),
                    source,
                })?
                .len();
            let need = index.total_bytes();
            if have < need {
                return Err(ImageError::BadFile {
                    file: pages_path.display().to_string(),
                    problem: format!(
                        "is {have} bytes but the PRESENT entries of {file} need {need} \
                         (truncated copy?)"
                    ),
                });
            }
            Some(f)
        };
        let mut parent = None;
        let mut no_parent = None;
        if pagemap.entries.iter().any(|e| e.flags.is_parent()) {
            if depth >= MAX_PARENT_DEPTH {
                return Err(ImageError::BadFile {
                    file,
                    problem: format!("more than {MAX_PARENT_DEPTH} parent links: a parent loop?"),
                });
            }
            match dir.parent()? {
                Some(p) => parent = Some(Box::new(PageReader::open(&p, id, depth + 1)?)),
                None => {
                    no_parent = Some(format!("{} has no parent link", dir.path().display()));
                }
            }
        }
        Ok(PageReader {
            file,
            pagemap,
            index,
            pages_path,
            pages,
            parent,
            no_parent,
        })
    }

    /// The decoded pagemap.
    pub fn pagemap(&self) -> &Pagemap {
        &self.pagemap
    }

    /// Offsets of the PRESENT runs in the pages file.
    pub fn index(&self) -> &PresentIndex {
        &self.index
    }

    /// Reads `nr_pages` pages from `vaddr` (at most [`MAX_READ_PAGES`]).
    pub fn read(&self, vaddr: u64, nr_pages: u64) -> Result<Vec<u8>> {
        if nr_pages > MAX_READ_PAGES {
            return Err(ImageError::BadFile {
                file: self.file.clone(),
                problem: format!(
                    "read of {nr_pages} pages at {vaddr:#x} exceeds the {MAX_READ_PAGES}-page \
                     limit per call; read in pieces"
                ),
            });
        }
        let mut out = vec![0u8; (nr_pages * PAGE_SIZE) as usize];
        self.read_into(vaddr, &mut out)?;
        Ok(out)
    }

    /// Fills `out` (a whole number of pages) with the pages from `vaddr`.
    pub fn read_into(&self, vaddr: u64, out: &mut [u8]) -> Result<()> {
        if !(out.len() as u64).is_multiple_of(PAGE_SIZE) {
            return Err(ImageError::BadFile {
                file: self.file.clone(),
                problem: format!("read buffer of {} bytes is not whole pages", out.len()),
            });
        }
        let want = PageRange::new(vaddr, out.len() as u64 / PAGE_SIZE);
        let mut at = 0usize;
        for piece in plan_read(&self.file, &self.pagemap, &self.index, want)? {
            match piece {
                ReadPiece::Here { offset, len } => {
                    let buf = &mut out[at..at + len as usize];
                    self.pread(buf, offset)?;
                    at += len as usize;
                }
                ReadPiece::Parent(range) => {
                    let len = range.len_bytes() as usize;
                    let parent = self.parent.as_ref().ok_or_else(|| ImageError::BadFile {
                        file: self.file.clone(),
                        problem: format!(
                            "pages [{:#x}, {:#x}) are in the parent image set, but {}",
                            range.start,
                            range.end(),
                            self.no_parent.as_deref().unwrap_or("it is missing")
                        ),
                    })?;
                    parent.read_into(range.start, &mut out[at..at + len])?;
                    at += len;
                }
            }
        }
        Ok(())
    }

    fn pread(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        let path = &self.pages_path;
        let f = self.pages.as_ref().ok_or_else(|| ImageError::BadFile {
            file: self.file.clone(),
            problem: "has no PRESENT entries, yet a read wanted its pages file".into(),
        })?;
        f.read_exact_at(buf, offset)
            .map_err(|source| match source.kind() {
                // The file shrank after we opened it.
                std::io::ErrorKind::UnexpectedEof => ImageError::BadFile {
                    file: path.display().to_string(),
                    problem: format!(
                        "ends before offset {} that {} needs (truncated while in use?)",
                        offset + buf.len() as u64,
                        self.file
                    ),
                },
                _ => ImageError::Io {
                    path: path.clone(),
                    source,
                },
            })
    }
}
