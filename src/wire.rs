//! pageserv's own frame codec for the QUIC streams between `pageserv src` and `pageserv dst`
//! (sans-IO: bytes in, frames out).
//!
//! Every frame is a fixed 24-byte little-endian header, then its payload:
//!
//! | offset | field         | type |
//! |--------|---------------|------|
//! | 0      | `kind`        | u16  |
//! | 2      | `flags`       | u16 (no flags defined yet: must be 0) |
//! | 4      | `pid`         | u32  |
//! | 8      | `vaddr`       | u64 (page aligned) |
//! | 16     | `nr_pages`    | u32  |
//! | 20     | `payload_len` | u32  |
//!
//! The header is validated as soon as its 24 bytes arrive, so a hostile or confused peer can never
//! make the decoder buffer more than one capped frame.

use bytes::{BufMut, Bytes, BytesMut};
use prost::Message;

use crate::pages::PAGE_SIZE;
use crate::pb::pageserv::Control;

/// Length of the fixed frame header.
pub const HEADER_LEN: usize = 24;
/// Most pages one frame may carry or name (16 MiB of page data).
pub const MAX_FRAME_PAGES: u32 = 4096;
/// Largest protobuf payload of a Control frame (4 MiB). Image files travel in smaller chunks.
pub const MAX_CONTROL_LEN: u32 = 4 << 20;
/// Payload length of a Refused frame: its u16 reason code.
const REFUSED_PAYLOAD_LEN: u32 = 2;

/// Reason codes carried by [`Frame::Refused`].
pub mod refuse_reason {
    /// The page range is not a lazy range of that process: dst should not have asked.
    pub const NOT_LAZY: u16 = 1;
    /// No process with that pid is in the dump.
    pub const UNKNOWN_PID: u16 = 2;
    /// The range is lazy but the source no longer holds it (already sent, or the dump ended).
    pub const GONE: u16 = 3;

    /// A name for logs and error messages.
    pub fn name(reason: u16) -> &'static str {
        match reason {
            NOT_LAZY => "range is not lazy",
            UNKNOWN_PID => "unknown pid",
            GONE => "source no longer holds these pages",
            _ => "unknown reason",
        }
    }
}

/// One unit of pageserv's stream protocol.
#[derive(Debug, Clone, PartialEq)]
pub enum Frame {
    /// A control message; payload is the protobuf encoding.
    Control(Control),
    /// dst -> src: a process faulted on these pages; urgent. No payload.
    PageRequest { pid: u32, vaddr: u64, nr_pages: u32 },
    /// Page contents; `data` is exactly `nr_pages * 4096` bytes.
    Pages {
        pid: u32,
        vaddr: u64,
        nr_pages: u32,
        data: Bytes,
    },
    /// These pages are all zero; no payload.
    Zero { pid: u32, vaddr: u64, nr_pages: u32 },
    /// src refuses a request; see [`refuse_reason`].
    Refused {
        pid: u32,
        vaddr: u64,
        nr_pages: u32,
        reason: u16,
    },
    /// src -> dst before the freeze: a copy of these pages as read from the running task, for
    /// dst's page store. Never placed before a [`Frame::Valid`] confirms it.
    PreCopyPages {
        pid: u32,
        vaddr: u64,
        nr_pages: u32,
        data: Bytes,
    },
    /// src -> dst before the freeze: these pages read as all zero.
    PreCopyZero { pid: u32, vaddr: u64, nr_pages: u32 },
    /// src -> dst after the freeze: every page whose bit is set in `bitmap` (bit `i`, LSB first
    /// in byte `i / 8`, is page `vaddr + i * 4096`) equals the frozen page: dst may place its
    /// pre-copied copy. `bitmap` is exactly `ceil(nr_pages / 8)` bytes, no bit past `nr_pages`.
    Valid {
        pid: u32,
        vaddr: u64,
        nr_pages: u32,
        bitmap: Bytes,
    },
}

/// Length of a [`Frame::Valid`] bitmap for `nr_pages` pages.
pub fn valid_bitmap_len(nr_pages: u32) -> u32 {
    nr_pages.div_ceil(8)
}

/// Why bytes could not be decoded into frames, or a frame could not be encoded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WireError {
    #[error(
        "pageserv frame at stream offset {offset}: field `kind` = {kind} is not a known frame \
         kind; the peer speaks another protocol version or the stream is corrupt"
    )]
    UnknownKind { offset: u64, kind: u16 },
    #[error(
        "pageserv {kind} frame at stream offset {offset}: field `{field}` = {value:#x} is \
         invalid: {why}; the peer is faulty or speaks another protocol version"
    )]
    BadField {
        offset: u64,
        kind: &'static str,
        field: &'static str,
        value: u64,
        why: &'static str,
    },
    #[error(
        "pageserv Control frame at stream offset {offset}: its {len}-byte payload is not a valid \
         Control message: {source}"
    )]
    BadControl {
        offset: u64,
        len: u32,
        source: prost::DecodeError,
    },
    #[error(
        "stream ended inside a pageserv frame starting at stream offset {offset}: got {have} of \
         its {need} bytes; the peer closed the stream early"
    )]
    Truncated { offset: u64, have: u64, need: u64 },
    #[error("refusing to encode a pageserv {kind} frame: `{field}` = {value:#x} is invalid: {why}")]
    Unencodable {
        kind: &'static str,
        field: &'static str,
        value: u64,
        why: &'static str,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum FrameKind {
    Control = 1,
    PageRequest = 2,
    Pages = 3,
    Zero = 4,
    Refused = 5,
    // Pre-copy kinds start at 16, apart from the post-copy ones.
    PreCopyPages = 16,
    PreCopyZero = 17,
    Valid = 18,
}

impl FrameKind {
    fn from_u16(v: u16) -> Option<FrameKind> {
        Some(match v {
            1 => FrameKind::Control,
            2 => FrameKind::PageRequest,
            3 => FrameKind::Pages,
            4 => FrameKind::Zero,
            5 => FrameKind::Refused,
            16 => FrameKind::PreCopyPages,
            17 => FrameKind::PreCopyZero,
            18 => FrameKind::Valid,
            _ => return None,
        })
    }

    fn name(self) -> &'static str {
        match self {
            FrameKind::Control => "Control",
            FrameKind::PageRequest => "PageRequest",
            FrameKind::Pages => "Pages",
            FrameKind::Zero => "Zero",
            FrameKind::Refused => "Refused",
            FrameKind::PreCopyPages => "PreCopyPages",
            FrameKind::PreCopyZero => "PreCopyZero",
            FrameKind::Valid => "Valid",
        }
    }
}

/// The decoded fixed header.
#[derive(Debug, Clone, Copy)]
struct FrameHeader {
    kind: FrameKind,
    flags: u16,
    pid: u32,
    vaddr: u64,
    nr_pages: u32,
    payload_len: u32,
}

/// A header field that breaks the rules: (field, value, why).
type FieldError = (&'static str, u64, &'static str);

impl FrameHeader {
    /// The rules both the encoder and the decoder enforce.
    fn check(&self) -> Result<(), FieldError> {
        if self.flags != 0 {
            return Err(("flags", self.flags.into(), "no flags are defined"));
        }
        let payload = self.payload_len.into();
        if self.kind == FrameKind::Control {
            if self.pid != 0 {
                return Err(("pid", self.pid.into(), "must be 0 in a Control frame"));
            }
            if self.vaddr != 0 {
                return Err(("vaddr", self.vaddr, "must be 0 in a Control frame"));
            }
            if self.nr_pages != 0 {
                return Err((
                    "nr_pages",
                    self.nr_pages.into(),
                    "must be 0 in a Control frame",
                ));
            }
            if self.payload_len > MAX_CONTROL_LEN {
                return Err((
                    "payload_len",
                    payload,
                    "Control payloads are capped at 4 MiB",
                ));
            }
            return Ok(());
        }
        if !self.vaddr.is_multiple_of(PAGE_SIZE) {
            return Err(("vaddr", self.vaddr, "not page aligned"));
        }
        if self.nr_pages == 0 || self.nr_pages > MAX_FRAME_PAGES {
            return Err(("nr_pages", self.nr_pages.into(), "must be 1..=4096"));
        }
        let len = u64::from(self.nr_pages) * PAGE_SIZE;
        if self.vaddr.checked_add(len).is_none() {
            return Err((
                "nr_pages",
                self.nr_pages.into(),
                "range runs past the address space",
            ));
        }
        let expected = match self.kind {
            FrameKind::Pages | FrameKind::PreCopyPages => len,
            FrameKind::Refused => REFUSED_PAYLOAD_LEN.into(),
            FrameKind::Valid => valid_bitmap_len(self.nr_pages).into(),
            _ => 0,
        };
        if payload != expected {
            let why = match self.kind {
                FrameKind::Pages | FrameKind::PreCopyPages => "must be nr_pages * 4096",
                FrameKind::Refused => "must be 2 (the reason code)",
                FrameKind::Valid => "must be ceil(nr_pages / 8) (the bitmap)",
                _ => "must be 0: this frame kind has no payload",
            };
            return Err(("payload_len", payload, why));
        }
        Ok(())
    }

    fn put(&self, out: &mut BytesMut) {
        out.reserve(HEADER_LEN + self.payload_len as usize);
        out.put_u16_le(self.kind as u16);
        out.put_u16_le(self.flags);
        out.put_u32_le(self.pid);
        out.put_u64_le(self.vaddr);
        out.put_u32_le(self.nr_pages);
        out.put_u32_le(self.payload_len);
    }
}

fn unencodable(kind: FrameKind, (field, value, why): FieldError) -> WireError {
    WireError::Unencodable {
        kind: kind.name(),
        field,
        value,
        why,
    }
}

fn paged(kind: FrameKind, pid: u32, vaddr: u64, nr_pages: u32, payload_len: u32) -> FrameHeader {
    FrameHeader {
        kind,
        flags: 0,
        pid,
        vaddr,
        nr_pages,
        payload_len,
    }
}

fn put_checked(h: FrameHeader, out: &mut BytesMut) -> Result<(), WireError> {
    h.check().map_err(|e| unencodable(h.kind, e))?;
    h.put(out);
    Ok(())
}

/// Appends `frame` to `out`. Fails, writing nothing, if the peer would reject the frame
/// (misaligned address, too many pages, data of the wrong length, oversized Control).
pub fn encode(frame: &Frame, out: &mut BytesMut) -> Result<(), WireError> {
    match frame {
        Frame::Control(msg) => {
            let len = msg.encoded_len();
            let payload_len = u32::try_from(len).unwrap_or(u32::MAX);
            put_checked(paged(FrameKind::Control, 0, 0, 0, payload_len), out)?;
            msg.encode_raw(out);
        }
        Frame::PageRequest {
            pid,
            vaddr,
            nr_pages,
        } => put_checked(
            paged(FrameKind::PageRequest, *pid, *vaddr, *nr_pages, 0),
            out,
        )?,
        Frame::Pages {
            pid,
            vaddr,
            nr_pages,
            data,
        } => {
            check_data_len(FrameKind::Pages, *nr_pages, data)?;
            encode_data_header(PageData::Pages, *pid, *vaddr, *nr_pages, out)?;
            out.extend_from_slice(data);
        }
        Frame::PreCopyPages {
            pid,
            vaddr,
            nr_pages,
            data,
        } => {
            check_data_len(FrameKind::PreCopyPages, *nr_pages, data)?;
            encode_data_header(PageData::PreCopyPages, *pid, *vaddr, *nr_pages, out)?;
            out.extend_from_slice(data);
        }
        Frame::PreCopyZero {
            pid,
            vaddr,
            nr_pages,
        } => put_checked(
            paged(FrameKind::PreCopyZero, *pid, *vaddr, *nr_pages, 0),
            out,
        )?,
        Frame::Valid {
            pid,
            vaddr,
            nr_pages,
            bitmap,
        } => {
            let h = paged(
                FrameKind::Valid,
                *pid,
                *vaddr,
                *nr_pages,
                bitmap.len() as u32,
            );
            h.check().map_err(|e| unencodable(FrameKind::Valid, e))?;
            check_bitmap_tail(*nr_pages, bitmap).map_err(|e| unencodable(FrameKind::Valid, e))?;
            h.put(out);
            out.extend_from_slice(bitmap);
        }
        Frame::Zero {
            pid,
            vaddr,
            nr_pages,
        } => put_checked(paged(FrameKind::Zero, *pid, *vaddr, *nr_pages, 0), out)?,
        Frame::Refused {
            pid,
            vaddr,
            nr_pages,
            reason,
        } => {
            let h = paged(
                FrameKind::Refused,
                *pid,
                *vaddr,
                *nr_pages,
                REFUSED_PAYLOAD_LEN,
            );
            put_checked(h, out)?;
            out.put_u16_le(*reason);
        }
    }
    Ok(())
}

fn check_data_len(kind: FrameKind, nr_pages: u32, data: &Bytes) -> Result<(), WireError> {
    if data.len() as u64 != u64::from(nr_pages) * PAGE_SIZE {
        let why = "must be nr_pages * 4096";
        return Err(unencodable(kind, ("data.len()", data.len() as u64, why)));
    }
    Ok(())
}

/// A Valid bitmap may not name pages past `nr_pages`: a peer that does is confused about ranges.
fn check_bitmap_tail(nr_pages: u32, bitmap: &[u8]) -> Result<(), FieldError> {
    let tail = nr_pages % 8;
    if tail != 0
        && let Some(last) = bitmap.last()
        && last >> tail != 0
    {
        return Err(("bitmap", u64::from(*last), "has bits set past nr_pages"));
    }
    Ok(())
}

/// The two frames that carry page data: after the freeze ([`Frame::Pages`]) or before it
/// ([`Frame::PreCopyPages`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PageData {
    Pages,
    PreCopyPages,
}

/// Appends only the header of a `data` frame; the caller sends exactly `nr_pages * 4096` bytes of
/// page data right after it (so page bytes need not be copied into a [`Frame`]).
pub fn encode_data_header(
    data: PageData,
    pid: u32,
    vaddr: u64,
    nr_pages: u32,
    out: &mut BytesMut,
) -> Result<(), WireError> {
    let kind = match data {
        PageData::Pages => FrameKind::Pages,
        PageData::PreCopyPages => FrameKind::PreCopyPages,
    };
    let payload_len = u64::from(nr_pages) * PAGE_SIZE;
    let payload_len = u32::try_from(payload_len).unwrap_or(u32::MAX);
    put_checked(paged(kind, pid, vaddr, nr_pages, payload_len), out)
}

mod decoder;
pub use decoder::FrameDecoder;

#[cfg(test)]
mod tests;
