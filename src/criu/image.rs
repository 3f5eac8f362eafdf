//! CRIU image file framing, sans-IO: the magic header at the start of a file and the
//! length-prefixed protobuf records after it (see docs/criu-protocols.md §4.1-4.2).
//!
//! Every function here works on bytes already in memory and takes the file's display name only to
//! put it into errors, so a message always says which file, which offset and what was wrong.

use std::path::PathBuf;

/// First word of every ordinary image written by CRIU ≥ 1.x ("common magic", `IMG_COMMON_MAGIC`).
pub const IMG_COMMON_MAGIC: u32 = 0x5456_4319;
/// First word of CRIU's service files (`stats-*`, `irmap-cache`).
pub const IMG_SERVICE_MAGIC: u32 = 0x5510_5940;
/// Largest record we accept. CRIU's own records are small (an mm entry with thousands of VMAs is
/// well below 1 MiB); the cap stops a corrupt length from making us allocate or scan gigabytes.
pub const MAX_RECORD_LEN: u32 = 16 << 20;

/// The image files pageserv reads or writes, each with its type magic (`criu/include/magic.h`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ImageKind {
    /// `inventory.img`: header is the bare type magic, never the common magic.
    Inventory,
    /// `pstree.img`.
    Pstree,
    /// `pagemap-<pid>.img` and `pagemap-shmem-<shmid>.img` (same magic).
    Pagemap,
    /// `mm-<pid>.img`.
    Mm,
    /// `core-<tid>.img`.
    Core,
    /// `ids-<pid>.img`.
    Ids,
}

impl ImageKind {
    /// The type magic CRIU writes after the common magic.
    pub fn magic(self) -> u32 {
        match self {
            ImageKind::Inventory => 0x5831_3116,
            ImageKind::Pstree => 0x5027_3030,
            ImageKind::Pagemap => 0x5608_4025,
            ImageKind::Mm => 0x5749_2820,
            ImageKind::Core => 0x5505_3847,
            ImageKind::Ids => 0x5443_2030,
        }
    }

    /// Short name used in error messages ("a CRIU pagemap image").
    pub fn name(self) -> &'static str {
        match self {
            ImageKind::Inventory => "inventory",
            ImageKind::Pstree => "pstree",
            ImageKind::Pagemap => "pagemap",
            ImageKind::Mm => "mm",
            ImageKind::Core => "core",
            ImageKind::Ids => "ids",
        }
    }
}

/// Everything that can go wrong reading or writing an image directory. Each variant names the
/// file (as the caller displayed it) and, for content errors, the byte offset of the bad item.
#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: not a directory of CRIU images ({reason})")]
    NotADir { path: PathBuf, reason: String },
    #[error(
        "{file}: file is {len} bytes, too short for the {need}-byte header of a CRIU {kind} image \
         (truncated copy?)"
    )]
    TruncatedHeader {
        file: String,
        kind: &'static str,
        len: usize,
        need: usize,
    },
    #[error(
        "{file}: magic at offset {offset} is {found:#010x}, expected {expected:#010x}: \
         not a CRIU {kind} image (wrong file, or written by something else)"
    )]
    WrongMagic {
        file: String,
        kind: &'static str,
        offset: usize,
        found: u32,
        expected: u32,
    },
    #[error(
        "{file}: record length at offset {offset} needs 4 bytes, file has {left} left (truncated?)"
    )]
    TruncatedLength {
        file: String,
        offset: usize,
        left: usize,
    },
    #[error(
        "{file}: record at offset {offset} claims {len} bytes, file has {left} left (truncated?)"
    )]
    TruncatedRecord {
        file: String,
        offset: usize,
        len: u32,
        left: usize,
    },
    #[error(
        "{file}: record at offset {offset} claims {len} bytes, more than the {limit}-byte limit \
         (corrupt length)"
    )]
    RecordTooLarge {
        file: String,
        offset: usize,
        len: u32,
        limit: u32,
    },
    #[error("{file}: record at offset {offset} is not a valid {what}: {source}")]
    Decode {
        file: String,
        offset: usize,
        what: &'static str,
        #[source]
        source: prost::DecodeError,
    },
    #[error("{file}: no {what} record (the file ends after its header)")]
    MissingRecord { file: String, what: &'static str },
    #[error("{file}: record at offset {offset}: {problem}")]
    BadRecord {
        file: String,
        offset: usize,
        problem: String,
    },
    #[error("{file}: {problem}")]
    BadFile { file: String, problem: String },
    #[error("cannot write {what}: {problem}")]
    Encode { what: String, problem: String },
}

/// Result alias for image reading and writing.
pub type Result<T, E = ImageError> = std::result::Result<T, E>;

/// How a file's header looked, for callers that care (e.g. a verbose `images show`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HeaderStyle {
    /// `[IMG_COMMON_MAGIC][type magic]`, what CRIU writes today.
    Common,
    /// `[IMG_SERVICE_MAGIC][type magic]`.
    Service,
    /// `[type magic]` alone: inventory.img, and version-1 images of every kind.
    Bare,
}

/// A parsed header: its style and the offset of the first record.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    pub style: HeaderStyle,
    pub len: usize,
}

fn read_u32(bytes: &[u8], at: usize) -> Option<u32> {
    let b = bytes.get(at..at.checked_add(4)?)?;
    Some(u32::from_ne_bytes([b[0], b[1], b[2], b[3]]))
}

/// Checks the magic header of `bytes`, the whole content of `file`, for an image of `kind`.
/// Accepts the common and service forms and the bare type magic of version-1 images; inventory.img
/// must carry its bare magic.
pub fn parse_header(file: &str, kind: ImageKind, bytes: &[u8]) -> Result<Header> {
    let truncated = |need| ImageError::TruncatedHeader {
        file: file.to_string(),
        kind: kind.name(),
        len: bytes.len(),
        need,
    };
    let wrong = |offset, found| ImageError::WrongMagic {
        file: file.to_string(),
        kind: kind.name(),
        offset,
        found,
        expected: kind.magic(),
    };
    let first = read_u32(bytes, 0).ok_or_else(|| truncated(4))?;
    if kind == ImageKind::Inventory {
        return if first == kind.magic() {
            Ok(Header {
                style: HeaderStyle::Bare,
                len: 4,
            })
        } else {
            Err(wrong(0, first))
        };
    }
    let style = match first {
        IMG_COMMON_MAGIC => HeaderStyle::Common,
        IMG_SERVICE_MAGIC => HeaderStyle::Service,
        m if m == kind.magic() => {
            return Ok(Header {
                style: HeaderStyle::Bare,
                len: 4,
            });
        }
        other => return Err(wrong(0, other)),
    };
    let second = read_u32(bytes, 4).ok_or_else(|| truncated(8))?;
    if second != kind.magic() {
        return Err(wrong(4, second));
    }
    Ok(Header { style, len: 8 })
}

/// The header CRIU writes for a new image of `kind` (common magic, or the bare inventory magic).
pub fn header_bytes(kind: ImageKind) -> Vec<u8> {
    let mut out = Vec::with_capacity(8);
    if kind != ImageKind::Inventory {
        out.extend_from_slice(&IMG_COMMON_MAGIC.to_ne_bytes());
    }
    out.extend_from_slice(&kind.magic().to_ne_bytes());
    out
}

/// One record's body and where its length prefix starts in the file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Record<'a> {
    pub offset: usize,
    pub body: &'a [u8],
}

/// Iterates the `[u32 length][body]` records of `bytes` from `start` (the header length).
/// EOF at a record boundary ends the iteration; a partial length or body is an error, after
/// which the iterator stops.
#[derive(Debug, Clone)]
pub struct Records<'a> {
    file: &'a str,
    bytes: &'a [u8],
    pos: usize,
    failed: bool,
}

impl<'a> Records<'a> {
    /// Records of `bytes` (the whole file, named `file` in errors) from offset `start`.
    pub fn new(file: &'a str, bytes: &'a [u8], start: usize) -> Self {
        Records {
            file,
            bytes,
            pos: start,
            failed: false,
        }
    }

    fn next_record(&mut self) -> Result<Option<Record<'a>>> {
        let offset = self.pos;
        let left = self.bytes.len().saturating_sub(offset);
        if left == 0 {
            return Ok(None);
        }
        let len = read_u32(self.bytes, offset).ok_or_else(|| ImageError::TruncatedLength {
            file: self.file.to_string(),
            offset,
            left,
        })?;
        let body_at = offset + 4;
        let body_left = left - 4;
        if len as usize > body_left {
            return Err(ImageError::TruncatedRecord {
                file: self.file.to_string(),
                offset,
                len,
                left: body_left,
            });
        }
        if len > MAX_RECORD_LEN {
            return Err(ImageError::RecordTooLarge {
                file: self.file.to_string(),
                offset,
                len,
                limit: MAX_RECORD_LEN,
            });
        }
        let end = body_at + len as usize;
        self.pos = end;
        Ok(Some(Record {
            offset,
            body: &self.bytes[body_at..end],
        }))
    }
}

impl<'a> Iterator for Records<'a> {
    type Item = Result<Record<'a>>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.failed {
            return None;
        }
        match self.next_record() {
            Ok(r) => r.map(Ok),
            Err(e) => {
                self.failed = true;
                Some(Err(e))
            }
        }
    }
}

/// Decodes one record's body as protobuf message `M`, naming `what` in the error.
pub fn decode_record<M: prost::Message + Default>(
    file: &str,
    what: &'static str,
    rec: Record<'_>,
) -> Result<M> {
    M::decode(rec.body).map_err(|source| ImageError::Decode {
        file: file.to_string(),
        offset: rec.offset,
        what,
        source,
    })
}

/// Checks the header, then decodes every record as `M`.
pub fn decode_all<M: prost::Message + Default>(
    file: &str,
    kind: ImageKind,
    what: &'static str,
    bytes: &[u8],
) -> Result<Vec<(usize, M)>> {
    let header = parse_header(file, kind, bytes)?;
    Records::new(file, bytes, header.len)
        .map(|rec| {
            let rec = rec?;
            Ok((rec.offset, decode_record(file, what, rec)?))
        })
        .collect()
}

/// Checks the header and decodes the single leading record as `M` (the rest is not read).
pub fn decode_first<M: prost::Message + Default>(
    file: &str,
    kind: ImageKind,
    what: &'static str,
    bytes: &[u8],
) -> Result<M> {
    let header = parse_header(file, kind, bytes)?;
    match Records::new(file, bytes, header.len).next() {
        Some(rec) => decode_record(file, what, rec?),
        None => Err(ImageError::MissingRecord {
            file: file.to_string(),
            what,
        }),
    }
}

/// Appends `msg` as one length-prefixed record. Refuses messages over [`MAX_RECORD_LEN`], which
/// no reader (ours or CRIU's pb_read_one buffer) would accept.
pub fn encode_record(out: &mut Vec<u8>, what: &str, msg: &impl prost::Message) -> Result<()> {
    let len = msg.encoded_len();
    let len32 = u32::try_from(len)
        .ok()
        .filter(|l| *l <= MAX_RECORD_LEN)
        .ok_or_else(|| ImageError::Encode {
            what: what.to_string(),
            problem: format!("record of {len} bytes exceeds the {MAX_RECORD_LEN}-byte limit"),
        })?;
    out.reserve(4 + len);
    out.extend_from_slice(&len32.to_ne_bytes());
    msg.encode(out).map_err(|e| ImageError::Encode {
        what: what.to_string(),
        problem: e.to_string(),
    })
}

#[cfg(test)]
mod tests;
