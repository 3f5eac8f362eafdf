//! The receiving page server as a pure state machine: what `criu page-server -D DIR` does with a
//! dump's or pre-dump's session (§1.8), minus the IO.
//!
//! It takes decoded [`ServerEvent`]s and produces the replies CRIU waits for plus the writes
//! that make up the image directory: `pages-<id>.img` created at each OPEN and filled in arrival
//! order, and `pagemap-*.img` complete when its pagemap is closed (by the next OPEN or by CLOSE).
//! The rules follow CRIU 4.1.1's `criu/page-xfer.c` (`page_server_open()`,
//! `open_page_local_xfer()`, `page_server_add()`, `write_pagemap_loc()`,
//! `check_pagehole_in_parent()`, `check_parent_local_xfer()`) and `criu/image.c`
//! (`up_page_ids_base()`, `open_pages_image_at()`):
//!
//! - pages ids count from 0x10001, one per pagemap opened (a reopen takes a new one);
//! - OPEN2 answers whether the parent set has this pagemap; PARENT answers the same as an int;
//! - an ADD_F for another pagemap than the open one opens it silently (legacy);
//! - every ADD_F becomes one pagemap entry with its flags; PRESENT data goes to the pages file;
//! - a PARENT run must be covered, page for page, by entries of the parent's pagemap.
//!
//! Where CRIU writes images its own restore would refuse, this refuses the session instead, so
//! the dump fails while its tasks can still be resumed: entries out of order or overlapping,
//! zero-length runs, PRESENT together with PARENT, no flags, and holes with no parent pagemap at
//! all (CRIU skips the check then). `--auto-dedup` (punching the parent's pages) is not done.

use std::collections::BTreeMap;

use bytes::Bytes;

use super::{PagemapId as WireId, PagemapKind, ServerEvent};
use crate::criu::PeFlags;
use crate::criu::images::{MAX_IMAGE_ADDR, MapEntry, PagemapId, encode_pagemap};
use crate::pages::PAGE_SIZE;

/// The first pages id of a receiving page server (`up_page_ids_base()`: 1 + 0x10000).
pub const FIRST_PAGES_ID: u32 = 0x10001;
/// Most pagemap entries one session may create (about 100 MiB of entries in memory); a real
/// dump has one per page-pipe buffer or hole.
pub const MAX_SESSION_ENTRIES: usize = 1 << 22;

/// The pagemaps of the parent image set (`-D/parent`), as far as the page server looks at them:
/// which exist, and which addresses their entries cover.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ParentSet {
    pagemaps: BTreeMap<PagemapKey, Vec<MapEntry>>,
}

/// `PagemapId` ordered, for maps.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
struct PagemapKey(u8, u64);

impl From<PagemapId> for PagemapKey {
    fn from(id: PagemapId) -> Self {
        match id {
            PagemapId::Pid(p) => PagemapKey(1, u64::from(p)),
            PagemapId::Shmem(s) => PagemapKey(2, s),
        }
    }
}

impl ParentSet {
    /// No parent: every OPEN2 answers 0.
    pub fn none() -> Self {
        Self::default()
    }

    /// Adds one parent pagemap (entries ascending, as decoded from `parent/pagemap-*.img`).
    pub fn insert(&mut self, id: PagemapId, entries: Vec<MapEntry>) {
        self.pagemaps.insert(id.into(), entries);
    }

    /// Whether `parent/pagemap-<id>.img` exists.
    pub fn has(&self, id: PagemapId) -> bool {
        self.pagemaps.contains_key(&id.into())
    }

    /// CRIU's `check_pagehole_in_parent()`: every page of the hole lies in some parent entry (of
    /// any kind: PRESENT, LAZY, or itself a hole one level further up). `None` if covered, else
    /// the first address that is not.
    pub fn first_uncovered(&self, id: PagemapId, vaddr: u64, nr_pages: u64) -> Option<u64> {
        let entries = self.pagemaps.get(&id.into())?;
        let end = vaddr + nr_pages * PAGE_SIZE;
        let mut at = vaddr;
        let mut i = entries.partition_point(|e| e.end() <= at);
        while at < end {
            match entries.get(i) {
                Some(e) if e.vaddr <= at => at = e.end(),
                _ => return Some(at),
            }
            i += 1;
        }
        None
    }
}

/// What the IO shell must do, in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Output {
    /// Send these bytes back to the dump (the OPEN2 byte or the PARENT int).
    Reply(Vec<u8>),
    /// Create (or truncate) `pages-<pages_id>.img`, empty.
    CreatePages { pages_id: u32 },
    /// Append `data` (whole pages of the run at `vaddr`) to `pages-<pages_id>.img`.
    AppendPages {
        pages_id: u32,
        vaddr: u64,
        data: Bytes,
    },
    /// The complete `pagemap-*.img` file of a pagemap that is now closed.
    Pagemap { name: String, bytes: Vec<u8> },
    /// CLOSE arrived and every write before it has been emitted: once they are durable, answer
    /// the dump with [`super::encode_close_reply`] (that answer is CRIU's commit point).
    Closed { force: bool },
}

/// Why a session cannot go on; the shell ends the session without a reply, which makes the dump
/// fail and resume its tasks.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SessionError {
    #[error(
        "page-server session: {what} for {pagemap} at vaddr {vaddr:#x} ({nr_pages} pages, flags \
         {flags:#x}) would give an image CRIU cannot restore: {why}"
    )]
    BadRun {
        what: &'static str,
        pagemap: String,
        vaddr: u64,
        nr_pages: u64,
        flags: u32,
        why: String,
    },
    #[error(
        "page-server session: hole {vaddr:#x}+{nr_pages} pages of {pagemap} is not in the parent \
         image set (first missing page {missing:#x}); CRIU's page server refuses it too"
    )]
    HoleNotInParent {
        pagemap: String,
        vaddr: u64,
        nr_pages: u64,
        missing: u64,
    },
    #[error(
        "page-server session: pagemap {id} has a pid that does not fit 32 bits; the stream is \
         corrupt"
    )]
    BadPid { id: u64 },
    #[error("page-server session: {0:?} arrived after CLOSE")]
    AfterClose(String),
    #[error(
        "page-server session: more than {MAX_SESSION_ENTRIES} pagemap entries; refusing to keep \
         more in memory"
    )]
    TooManyEntries,
    #[error("page-server session: the GET command belongs to a lazy dump, not to a page server")]
    Get,
    #[error("page-server session: encoding {name}: {why}")]
    Encode { name: String, why: String },
}

/// One pagemap file being written.
#[derive(Debug)]
struct OpenPagemap {
    id: PagemapId,
    pages_id: u32,
    entries: Vec<MapEntry>,
}

/// What one session wrote: per pagemap its pages id and entries (also the [`ParentSet`] of the
/// next session in a pre-dump chain).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SessionSummary {
    pub pagemaps: Vec<(PagemapId, u32, Vec<MapEntry>)>,
    pub pages_present: u64,
    pub pages_parent: u64,
    pub pages_lazy_only: u64,
}

impl SessionSummary {
    /// This session's pagemaps as the parent set of the next one.
    pub fn as_parent(&self) -> ParentSet {
        let mut p = ParentSet::none();
        for (id, _, entries) in &self.pagemaps {
            p.insert(*id, entries.clone());
        }
        p
    }
}

/// The receiving page server of one session.
#[derive(Debug)]
pub struct ImageSession {
    parent: ParentSet,
    next_pages_id: u32,
    open: Option<OpenPagemap>,
    closed: bool,
    entries_total: usize,
    summary: SessionSummary,
}

impl ImageSession {
    /// A session writing next to `parent` (use [`ParentSet::none`] for a first dump).
    pub fn new(parent: ParentSet) -> Self {
        Self {
            parent,
            next_pages_id: FIRST_PAGES_ID,
            open: None,
            closed: false,
            entries_total: 0,
            summary: SessionSummary::default(),
        }
    }

    /// Whether CLOSE has been handled.
    pub fn is_closed(&self) -> bool {
        self.closed
    }

    /// What was written so far (complete after CLOSE).
    pub fn summary(&self) -> &SessionSummary {
        &self.summary
    }

    /// Handles one event, appending what the shell must do to `out`.
    pub fn handle(&mut self, ev: ServerEvent, out: &mut Vec<Output>) -> Result<(), SessionError> {
        if self.closed {
            return Err(SessionError::AfterClose(format!("{ev:?}")));
        }
        match ev {
            ServerEvent::Open { id, want_reply } => {
                let id = to_image_id(id)?;
                self.open(id, out)?;
                if want_reply {
                    out.push(Output::Reply(vec![u8::from(self.parent.has(id))]));
                }
            }
            ServerEvent::Parent { id } => {
                let id = to_image_id(id)?;
                out.push(Output::Reply(
                    i32::from(self.parent.has(id)).to_le_bytes().to_vec(),
                ));
            }
            ServerEvent::Pages {
                dst,
                vaddr,
                nr_pages,
                flags,
                data,
            } => {
                let id = to_image_id(dst)?;
                if self.open.as_ref().map(|o| o.id) != Some(id) {
                    tracing::warn!(pagemap = %id.file_name(), "ADD without OPEN (legacy client)");
                    self.open(id, out)?;
                }
                self.add(vaddr, nr_pages, flags, data, out)?;
            }
            ServerEvent::Get { .. } => return Err(SessionError::Get),
            ServerEvent::Close { force } => {
                self.close_open(out)?;
                self.closed = true;
                out.push(Output::Closed { force });
            }
        }
        Ok(())
    }

    fn open(&mut self, id: PagemapId, out: &mut Vec<Output>) -> Result<(), SessionError> {
        self.close_open(out)?;
        let pages_id = self.next_pages_id;
        self.next_pages_id = self.next_pages_id.wrapping_add(1);
        out.push(Output::CreatePages { pages_id });
        self.open = Some(OpenPagemap {
            id,
            pages_id,
            entries: Vec::new(),
        });
        Ok(())
    }

    fn close_open(&mut self, out: &mut Vec<Output>) -> Result<(), SessionError> {
        let Some(pm) = self.open.take() else {
            return Ok(());
        };
        let name = pm.id.file_name();
        let bytes =
            encode_pagemap(&name, pm.pages_id, &pm.entries).map_err(|e| SessionError::Encode {
                name: name.clone(),
                why: e.to_string(),
            })?;
        out.push(Output::Pagemap { name, bytes });
        // A reopened pagemap replaces the earlier file, as CRIU's O_TRUNC does.
        self.summary.pagemaps.retain(|(id, _, _)| *id != pm.id);
        self.summary.pagemaps.push((pm.id, pm.pages_id, pm.entries));
        Ok(())
    }

    fn add(
        &mut self,
        vaddr: u64,
        nr_pages: u64,
        flags: PeFlags,
        data: Option<Bytes>,
        out: &mut Vec<Output>,
    ) -> Result<(), SessionError> {
        let Some(pm) = self.open.as_mut() else {
            return Err(SessionError::AfterClose("ADD_F with no pagemap".into()));
        };
        let bad = |why: String| SessionError::BadRun {
            what: "ADD_F",
            pagemap: pm.id.file_name(),
            vaddr,
            nr_pages,
            flags: flags.0,
            why,
        };
        if nr_pages == 0 {
            return Err(bad("the run has no pages".into()));
        }
        if !vaddr.is_multiple_of(PAGE_SIZE) {
            return Err(bad("vaddr is not page-aligned".into()));
        }
        let fits = vaddr
            .checked_add(nr_pages * PAGE_SIZE)
            .is_some_and(|end| end <= MAX_IMAGE_ADDR);
        if !fits {
            return Err(bad(format!("the run ends past {MAX_IMAGE_ADDR:#x}")));
        }
        if flags.0 == 0 {
            return Err(bad("no PE flag set".into()));
        }
        if flags.is_present() && flags.is_parent() {
            return Err(bad("PRESENT and PARENT together".into()));
        }
        if let Some(last) = pm.entries.last()
            && vaddr < last.end()
        {
            return Err(bad(format!(
                "it starts before the previous run of this pagemap ends ({:#x}); entries must \
                 ascend",
                last.end()
            )));
        }
        if u32::try_from(nr_pages).is_err() {
            return Err(bad("more pages than CRIU 4.1's 32-bit count".into()));
        }
        if flags.is_parent() {
            if !self.parent.has(pm.id) {
                return Err(bad(
                    "a hole, but the parent image set has no such pagemap".into()
                ));
            }
            if let Some(missing) = self.parent.first_uncovered(pm.id, vaddr, nr_pages) {
                return Err(SessionError::HoleNotInParent {
                    pagemap: pm.id.file_name(),
                    vaddr,
                    nr_pages,
                    missing,
                });
            }
        }
        if self.entries_total >= MAX_SESSION_ENTRIES {
            return Err(SessionError::TooManyEntries);
        }
        match (flags.is_present(), data) {
            (true, Some(data)) if data.len() as u64 == nr_pages * PAGE_SIZE => {
                out.push(Output::AppendPages {
                    pages_id: pm.pages_id,
                    vaddr,
                    data,
                });
                self.summary.pages_present += nr_pages;
            }
            (true, d) => {
                return Err(bad(format!(
                    "PRESENT with {} data bytes (the decoder hands over exactly nr_pages pages)",
                    d.map_or(0, |d| d.len())
                )));
            }
            (false, Some(_)) => return Err(bad("data on a run without PRESENT".into())),
            (false, None) if flags.is_parent() => self.summary.pages_parent += nr_pages,
            (false, None) => self.summary.pages_lazy_only += nr_pages,
        }
        pm.entries.push(MapEntry {
            vaddr,
            nr_pages,
            flags,
        });
        self.entries_total += 1;
        Ok(())
    }
}

fn to_image_id(id: WireId) -> Result<PagemapId, SessionError> {
    match id.kind {
        PagemapKind::Pid => u32::try_from(id.id)
            .map(PagemapId::Pid)
            .map_err(|_| SessionError::BadPid { id: id.id }),
        PagemapKind::Shmem => Ok(PagemapId::Shmem(id.id)),
    }
}

/// The name of `pages-<pages_id>.img`.
pub fn pages_file_name(pages_id: u32) -> String {
    format!("pages-{pages_id}.img")
}

#[cfg(test)]
#[path = "session_tests.rs"]
mod tests;
