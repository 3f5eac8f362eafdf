//! The IO shell of [`ImageSession`](crate::criu::page_server::ImageSession): applies its
//! [`Output`]s to an image directory. Page data is written straight from the received buffers
//! (no copy, no per-page allocation); pagemap files are written whole when their pagemap closes.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use crate::criu::page_server::{Output, pages_file_name};
use crate::pages::PAGE_SIZE;

/// Most page bytes one session may write (1 TiB): a bound on a hostile peer, not on real dumps.
pub const MAX_SESSION_BYTES: u64 = 1 << 40;
/// Most pages files one session may create.
pub const MAX_PAGES_FILES: usize = 1 << 20;

#[derive(Debug, thiserror::Error)]
pub enum WriterError {
    #[error("writing {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "page data for pages-{pages_id}.img arrived before that file was created: the session's \
         writes are out of order"
    )]
    NotOpen { pages_id: u32 },
    #[error(
        "pages data of {len} bytes at vaddr {vaddr:#x} for pages-{pages_id}.img is not whole pages"
    )]
    NotWholePages {
        pages_id: u32,
        vaddr: u64,
        len: usize,
    },
    #[error("the session wrote more than {MAX_SESSION_BYTES} bytes or {MAX_PAGES_FILES} files")]
    TooBig,
    #[error("{0:?} is not a pagemap file name; refusing to write it")]
    BadName(String),
}

/// What a session left in the directory.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct WrittenSummary {
    pub pages_files: u64,
    pub pagemap_files: u64,
    pub page_bytes: u64,
}

/// Applies a session's writes to one directory.
#[derive(Debug)]
pub struct DirWriter {
    dir: PathBuf,
    pages: BTreeMap<u32, File>,
    summary: WrittenSummary,
}

impl DirWriter {
    /// `dir` must exist; files of the same name in it are replaced, as CRIU's O_TRUNC does.
    pub fn new(dir: &Path) -> Self {
        Self {
            dir: dir.to_path_buf(),
            pages: BTreeMap::new(),
            summary: WrittenSummary::default(),
        }
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Applies one output. `Reply` and `Closed` are the page-server socket's business and
    /// ignored here.
    pub fn apply(&mut self, out: &Output) -> Result<(), WriterError> {
        match out {
            Output::Reply(_) | Output::Closed { .. } => Ok(()),
            Output::CreatePages { pages_id } => self.create_pages(*pages_id),
            Output::AppendPages {
                pages_id,
                vaddr,
                data,
            } => self.append_pages(*pages_id, *vaddr, data),
            Output::Pagemap { name, bytes } => self.write_pagemap(name, bytes),
        }
    }

    /// Creates (truncates) `pages-<pages_id>.img`.
    pub fn create_pages(&mut self, pages_id: u32) -> Result<(), WriterError> {
        if self.pages.len() >= MAX_PAGES_FILES {
            return Err(WriterError::TooBig);
        }
        let path = self.dir.join(pages_file_name(pages_id));
        let file = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&path)
            .map_err(|source| WriterError::Io { path, source })?;
        self.pages.insert(pages_id, file);
        self.summary.pages_files += 1;
        Ok(())
    }

    /// Appends whole pages to an open pages file.
    pub fn append_pages(
        &mut self,
        pages_id: u32,
        vaddr: u64,
        data: &[u8],
    ) -> Result<(), WriterError> {
        if !(data.len() as u64).is_multiple_of(PAGE_SIZE) {
            return Err(WriterError::NotWholePages {
                pages_id,
                vaddr,
                len: data.len(),
            });
        }
        self.summary.page_bytes += data.len() as u64;
        if self.summary.page_bytes > MAX_SESSION_BYTES {
            return Err(WriterError::TooBig);
        }
        let file = self
            .pages
            .get_mut(&pages_id)
            .ok_or(WriterError::NotOpen { pages_id })?;
        file.write_all(data).map_err(|source| WriterError::Io {
            path: self.dir.join(pages_file_name(pages_id)),
            source,
        })
    }

    /// Writes a complete pagemap file (name checked: `pagemap-<n>.img` or
    /// `pagemap-shmem-<n>.img`).
    pub fn write_pagemap(&mut self, name: &str, bytes: &[u8]) -> Result<(), WriterError> {
        let num = name
            .strip_suffix(".img")
            .and_then(|n| n.strip_prefix("pagemap-"))
            .map(|n| n.strip_prefix("shmem-").unwrap_or(n));
        if !num.is_some_and(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit())) {
            return Err(WriterError::BadName(name.to_string()));
        }
        let path = self.dir.join(name);
        std::fs::write(&path, bytes).map_err(|source| WriterError::Io { path, source })?;
        self.summary.pagemap_files += 1;
        Ok(())
    }

    /// Closes every pages file; returns what was written.
    pub fn finish(self) -> WrittenSummary {
        self.summary
    }
}
