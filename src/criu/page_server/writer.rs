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

use crate::limits::{LimitHit, MAX_SESSION_PAGES_FILES, flag, mib};

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
    #[error("refusing the page-server session: {0}")]
    Limit(LimitHit),
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
    /// Page bytes the session may write (`pageserv dst --max-session-mib`).
    max_bytes: u64,
}

impl DirWriter {
    /// `dir` must exist; files of the same name in it are replaced, as CRIU's O_TRUNC does.
    pub fn new(dir: &Path) -> Self {
        Self {
            dir: dir.to_path_buf(),
            pages: BTreeMap::new(),
            summary: WrittenSummary::default(),
            max_bytes: crate::limits::DstLimits::default().max_session_bytes,
        }
    }

    /// At most `max_bytes` of page data (default: `--max-session-mib`'s default, this host's RAM).
    pub fn with_max_bytes(mut self, max_bytes: u64) -> Self {
        self.max_bytes = max_bytes;
        self
    }

    /// Page bytes written so far.
    pub fn page_bytes(&self) -> u64 {
        self.summary.page_bytes
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
        if self.pages.len() >= MAX_SESSION_PAGES_FILES {
            return Err(WriterError::Limit(LimitHit::fixed(
                format!("pages files of one session (creating pages-{pages_id}.img)"),
                format!("{MAX_SESSION_PAGES_FILES} files"),
                "CRIU writes one pages file per dumped process",
            )));
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
        if self.summary.page_bytes > self.max_bytes {
            return Err(WriterError::Limit(LimitHit::flag(
                format!(
                    "page data of the session in {}: more than {} MiB",
                    self.dir.display(),
                    mib(self.max_bytes)
                ),
                format!("{} MiB", mib(self.max_bytes)),
                flag::MAX_SESSION,
            )));
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
