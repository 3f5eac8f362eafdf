//! pagemap-*.img, sans-IO: decoding with CRIU's read rules and strict sanity checks, encoding that
//! CRIU 4.1.1 and 4.2+ both read, and the derived views (offsets into pages-*.img, lazy ranges,
//! read plans).

use serde::Serialize;

use super::task::Vma;
use crate::criu::PeFlags;
use crate::criu::image::{self, ImageError, ImageKind, Records, Result};
use crate::pages::{PAGE_SIZE, PageRange};
use crate::pb::criu::{PagemapEntry, PagemapHead};

/// Highest address (exclusive) an entry may reach: 57-bit virtual addresses (x86-64 5-level
/// paging, arm64 52-bit) fit below it. Anything past it is a corrupt `vaddr`/`nr_pages`.
pub const MAX_IMAGE_ADDR: u64 = 1 << 57;

/// Which pagemap file: a task's, or a shared-memory segment's (vaddr = offset in the segment).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum PagemapId {
    Pid(u32),
    Shmem(u64),
}

impl PagemapId {
    /// The file name CRIU uses for this pagemap.
    pub fn file_name(self) -> String {
        match self {
            PagemapId::Pid(pid) => format!("pagemap-{pid}.img"),
            PagemapId::Shmem(id) => format!("pagemap-shmem-{id}.img"),
        }
    }
}

/// One pagemap run: `nr_pages` pages from `vaddr`, all with the same flags.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct MapEntry {
    pub vaddr: u64,
    pub nr_pages: u64,
    #[serde(serialize_with = "ser_flags")]
    pub flags: PeFlags,
}

fn ser_flags<S: serde::Serializer>(f: &PeFlags, s: S) -> std::result::Result<S::Ok, S::Error> {
    s.serialize_u32(f.0)
}

impl MapEntry {
    /// The pages this entry covers.
    pub fn range(&self) -> PageRange {
        PageRange::new(self.vaddr, self.nr_pages)
    }
    /// First address past the entry.
    pub fn end(&self) -> u64 {
        self.vaddr + self.nr_pages * PAGE_SIZE
    }
    /// Data in this image set's pages file (PARENT wins over PRESENT, as in CRIU's reader).
    pub fn has_data_here(&self) -> bool {
        self.flags.is_present() && !self.flags.is_parent()
    }
}

/// A decoded pagemap: the pages file id from `pagemap_head` and the entries in ascending order.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Pagemap {
    pub pages_id: u32,
    pub entries: Vec<MapEntry>,
}

/// Applies CRIU's read rules to one `pagemap_entry` (`init_compat_pagemap_entry()`): `in_parent`
/// gives PARENT; no `flags` means PRESENT; field 5 `nr_pages` wins over field 2. Then refuses what
/// CRIU would misread: unknown flag bits, no flag at all, PRESENT with PARENT, zero or absurd
/// sizes, unaligned addresses.
pub fn entry_from_pb(file: &str, offset: usize, pe: &PagemapEntry) -> Result<MapEntry> {
    let bad = |problem: String| ImageError::BadRecord {
        file: file.to_string(),
        offset,
        problem: format!("pagemap entry at vaddr {:#x}: {problem}", pe.vaddr),
    };
    let mut flags = PeFlags(pe.flags.unwrap_or(0));
    if pe.in_parent == Some(true) {
        flags = flags | PeFlags::PARENT;
    } else if pe.flags.is_none() {
        flags = PeFlags::PRESENT;
    }
    if flags.unknown_bits() != 0 {
        return Err(bad(format!(
            "unknown flag bits {:#x} in flags {:#x} (CRIU defines PARENT=1, LAZY=2, PRESENT=4)",
            flags.unknown_bits(),
            flags.0
        )));
    }
    if flags.0 == 0 {
        return Err(bad("flags are 0: neither PRESENT, PARENT nor LAZY".into()));
    }
    if flags.is_present() && flags.is_parent() {
        return Err(bad(format!(
            "flags {:#x} combine PRESENT and PARENT, which CRIU never writes",
            flags.0
        )));
    }
    let nr_pages = pe.nr_pages.unwrap_or(u64::from(pe.compat_nr_pages));
    if !pe.vaddr.is_multiple_of(PAGE_SIZE) {
        return Err(bad("vaddr is not page-aligned".into()));
    }
    let end = nr_pages
        .checked_mul(PAGE_SIZE)
        .and_then(|len| pe.vaddr.checked_add(len));
    match end {
        _ if nr_pages == 0 => Err(bad("nr_pages is 0".into())),
        Some(end) if end <= MAX_IMAGE_ADDR => Ok(MapEntry {
            vaddr: pe.vaddr,
            nr_pages,
            flags,
        }),
        _ => Err(bad(format!(
            "nr_pages {nr_pages} runs past the highest possible address {MAX_IMAGE_ADDR:#x}"
        ))),
    }
}

/// Refuses an entry that starts before the previous one ends (CRIU's readers rely on order).
fn check_order(file: &str, offset: usize, prev: Option<&MapEntry>, e: &MapEntry) -> Result<()> {
    match prev {
        Some(p) if e.vaddr < p.end() => Err(ImageError::BadRecord {
            file: file.to_string(),
            offset,
            problem: format!(
                "pagemap entry at vaddr {:#x} starts before the previous entry [{:#x}, {:#x}) \
                 ends: entries must be ascending and disjoint",
                e.vaddr,
                p.vaddr,
                p.end()
            ),
        }),
        _ => Ok(()),
    }
}

/// Decodes a whole pagemap file.
pub fn decode_pagemap(file: &str, bytes: &[u8]) -> Result<Pagemap> {
    let header = image::parse_header(file, ImageKind::Pagemap, bytes)?;
    let mut recs = Records::new(file, bytes, header.len);
    let head: PagemapHead = match recs.next() {
        Some(rec) => image::decode_record(file, "pagemap_head", rec?)?,
        None => {
            return Err(ImageError::MissingRecord {
                file: file.to_string(),
                what: "pagemap_head",
            });
        }
    };
    let mut entries: Vec<MapEntry> = Vec::new();
    for rec in recs {
        let rec = rec?;
        let pe: PagemapEntry = image::decode_record(file, "pagemap_entry", rec)?;
        let e = entry_from_pb(file, rec.offset, &pe)?;
        check_order(file, rec.offset, entries.last(), &e)?;
        entries.push(e);
    }
    Ok(Pagemap {
        pages_id: head.pages_id,
        entries,
    })
}

/// Encodes a pagemap file readable by CRIU 4.1.1 and 4.2+: both field 2 and field 5 carry
/// `nr_pages`, `flags` is always set. Refuses what [`decode_pagemap`] would refuse, and runs of
/// 2^32 pages or more (field 2 cannot hold them).
pub fn encode_pagemap(file: &str, pages_id: u32, entries: &[MapEntry]) -> Result<Vec<u8>> {
    let mut out = image::header_bytes(ImageKind::Pagemap);
    image::encode_record(&mut out, file, &PagemapHead { pages_id })?;
    let mut prev: Option<&MapEntry> = None;
    for e in entries {
        let offset = out.len();
        let compat = u32::try_from(e.nr_pages).map_err(|_| ImageError::Encode {
            what: file.to_string(),
            problem: format!(
                "entry at {:#x} has {} pages; CRIU 4.1.1 reads only 32-bit counts: split it",
                e.vaddr, e.nr_pages
            ),
        })?;
        let pe = PagemapEntry {
            vaddr: e.vaddr,
            compat_nr_pages: compat,
            in_parent: None,
            flags: Some(e.flags.0),
            nr_pages: Some(e.nr_pages),
        };
        let checked = entry_from_pb(file, offset, &pe).map_err(|err| ImageError::Encode {
            what: file.to_string(),
            problem: err.to_string(),
        })?;
        check_order(file, offset, prev, &checked).map_err(|err| ImageError::Encode {
            what: file.to_string(),
            problem: err.to_string(),
        })?;
        image::encode_record(&mut out, file, &pe)?;
        prev = Some(e);
    }
    Ok(out)
}

/// A PRESENT run and the byte offset of its first page in `pages-<pages_id>.img`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PresentRun {
    pub range: PageRange,
    pub offset: u64,
}

/// Where each PRESENT entry's data lives in the pages file: CRIU concatenates the data of PRESENT
/// entries in entry order, so an entry's offset is the size of all earlier PRESENT entries.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PresentIndex {
    pub pages_id: u32,
    pub runs: Vec<PresentRun>,
}

impl PresentIndex {
    /// Lays out `pm`'s PRESENT entries as CRIU wrote them.
    pub fn new(pm: &Pagemap) -> Self {
        let mut offset = 0;
        let runs = pm
            .entries
            .iter()
            .filter(|e| e.has_data_here())
            .map(|e| {
                let run = PresentRun {
                    range: e.range(),
                    offset,
                };
                offset += e.range().len_bytes();
                run
            })
            .collect();
        PresentIndex {
            pages_id: pm.pages_id,
            runs,
        }
    }

    /// Bytes the pages file must hold.
    pub fn total_bytes(&self) -> u64 {
        self.runs
            .last()
            .map_or(0, |r| r.offset + r.range.len_bytes())
    }

    /// Byte offset of the page holding `vaddr`, if that page is PRESENT.
    pub fn offset_of(&self, vaddr: u64) -> Option<u64> {
        let i = self.runs.partition_point(|r| r.range.end() <= vaddr);
        let run = self.runs.get(i)?;
        run.range
            .contains(vaddr)
            .then(|| run.offset + crate::pages::page_floor(vaddr - run.range.start))
    }
}

/// CRIU's `collect_iovs()`: every LAZY entry (value 2 or 6) as page ranges, split where a VMA
/// ends. Unlike CRIU, which silently mis-splits or drops them, entries not inside the VMAs are
/// an error naming `file` (the pagemap) and `mm_file`.
pub fn lazy_ranges(
    file: &str,
    mm_file: &str,
    entries: &[MapEntry],
    vmas: &[Vma],
) -> Result<Vec<PageRange>> {
    let mut out = Vec::new();
    let mut v = 0;
    for e in entries.iter().filter(|e| e.flags.is_lazy()) {
        let mut start = e.vaddr;
        let end = e.end();
        while start < end {
            while v < vmas.len() && vmas[v].end <= start {
                v += 1;
            }
            let vma = match vmas.get(v) {
                Some(vma) if vma.start <= start => vma,
                _ => {
                    return Err(ImageError::BadFile {
                        file: file.to_string(),
                        problem: format!(
                            "lazy entry [{:#x}, {end:#x}) has page {start:#x} outside every VMA \
                             of {mm_file}: images from different dumps?",
                            e.vaddr
                        ),
                    });
                }
            };
            let piece_end = end.min(vma.end);
            out.push(PageRange::new(start, (piece_end - start) / PAGE_SIZE));
            start = piece_end;
        }
    }
    Ok(out)
}

/// Where a page run's data comes from when reading it back.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReadPiece {
    /// `len` bytes at `offset` of this set's pages file.
    Here { offset: u64, len: u64 },
    /// Pages held by the parent image set (PE_PARENT).
    Parent(PageRange),
}

/// Splits `want` into pieces read from this set or its parent. Every page must be covered by an
/// entry with data (PRESENT or PARENT): LAZY-only pages live at the dump's page server and
/// never-dumped pages have no data at all, so both are errors naming `file`.
pub fn plan_read(
    file: &str,
    pm: &Pagemap,
    index: &PresentIndex,
    want: PageRange,
) -> Result<Vec<ReadPiece>> {
    let missing = |addr: u64, why: &str| ImageError::BadFile {
        file: file.to_string(),
        problem: format!(
            "page {addr:#x} (wanted [{:#x}, {:#x})) {why}",
            want.start,
            want.end()
        ),
    };
    let fits = want
        .nr_pages
        .checked_mul(PAGE_SIZE)
        .and_then(|len| want.start.checked_add(len))
        .is_some_and(|end| end <= MAX_IMAGE_ADDR);
    if !fits {
        return Err(ImageError::BadFile {
            file: file.to_string(),
            problem: format!(
                "read of {} pages at {:#x} runs past the highest possible address",
                want.nr_pages, want.start
            ),
        });
    }
    if !want.start.is_multiple_of(PAGE_SIZE) {
        return Err(missing(want.start, "is not page-aligned"));
    }
    let mut pieces = Vec::new();
    let mut at = want.start;
    let end = want.end();
    let mut i = pm.entries.partition_point(|e| e.end() <= at);
    while at < end {
        let e = match pm.entries.get(i) {
            Some(e) if e.vaddr <= at => e,
            _ => {
                return Err(missing(
                    at,
                    "is not in the pagemap (never dumped: a zero page)",
                ));
            }
        };
        let piece_end = end.min(e.end());
        let n = (piece_end - at) / PAGE_SIZE;
        if e.flags.is_parent() {
            pieces.push(ReadPiece::Parent(PageRange::new(at, n)));
        } else if e.flags.is_present() {
            let offset = index
                .offset_of(at)
                .ok_or_else(|| missing(at, "has no offset in the present index"))?;
            pieces.push(ReadPiece::Here {
                offset,
                len: n * PAGE_SIZE,
            });
        } else {
            return Err(missing(
                at,
                "is LAZY only: its data stayed with the dumping criu",
            ));
        }
        at = piece_end;
        i += 1;
    }
    Ok(pieces)
}

#[cfg(test)]
mod tests;
