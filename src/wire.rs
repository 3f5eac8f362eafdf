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

use bytes::{Buf, BufMut, Bytes, BytesMut};
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
enum Kind {
    Control = 1,
    PageRequest = 2,
    Pages = 3,
    Zero = 4,
    Refused = 5,
}

impl Kind {
    fn from_u16(v: u16) -> Option<Kind> {
        Some(match v {
            1 => Kind::Control,
            2 => Kind::PageRequest,
            3 => Kind::Pages,
            4 => Kind::Zero,
            5 => Kind::Refused,
            _ => return None,
        })
    }

    fn name(self) -> &'static str {
        match self {
            Kind::Control => "Control",
            Kind::PageRequest => "PageRequest",
            Kind::Pages => "Pages",
            Kind::Zero => "Zero",
            Kind::Refused => "Refused",
        }
    }
}

/// The decoded fixed header.
#[derive(Debug, Clone, Copy)]
struct Header {
    kind: Kind,
    flags: u16,
    pid: u32,
    vaddr: u64,
    nr_pages: u32,
    payload_len: u32,
}

/// A header field that breaks the rules: (field, value, why).
type FieldError = (&'static str, u64, &'static str);

impl Header {
    /// The rules both the encoder and the decoder enforce.
    fn check(&self) -> Result<(), FieldError> {
        if self.flags != 0 {
            return Err(("flags", self.flags.into(), "no flags are defined"));
        }
        let payload = self.payload_len.into();
        if self.kind == Kind::Control {
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
            Kind::Pages => len,
            Kind::Refused => REFUSED_PAYLOAD_LEN.into(),
            _ => 0,
        };
        if payload != expected {
            let why = match self.kind {
                Kind::Pages => "must be nr_pages * 4096",
                Kind::Refused => "must be 2 (the reason code)",
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

fn unencodable(kind: Kind, (field, value, why): FieldError) -> WireError {
    WireError::Unencodable {
        kind: kind.name(),
        field,
        value,
        why,
    }
}

fn paged(kind: Kind, pid: u32, vaddr: u64, nr_pages: u32, payload_len: u32) -> Header {
    Header {
        kind,
        flags: 0,
        pid,
        vaddr,
        nr_pages,
        payload_len,
    }
}

fn put_checked(h: Header, out: &mut BytesMut) -> Result<(), WireError> {
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
            put_checked(paged(Kind::Control, 0, 0, 0, payload_len), out)?;
            msg.encode_raw(out);
        }
        Frame::PageRequest {
            pid,
            vaddr,
            nr_pages,
        } => put_checked(paged(Kind::PageRequest, *pid, *vaddr, *nr_pages, 0), out)?,
        Frame::Pages {
            pid,
            vaddr,
            nr_pages,
            data,
        } => {
            let expected = u64::from(*nr_pages) * PAGE_SIZE;
            if data.len() as u64 != expected {
                let why = "must be nr_pages * 4096";
                return Err(unencodable(
                    Kind::Pages,
                    ("data.len()", data.len() as u64, why),
                ));
            }
            encode_pages_header(*pid, *vaddr, *nr_pages, out)?;
            out.extend_from_slice(data);
        }
        Frame::Zero {
            pid,
            vaddr,
            nr_pages,
        } => put_checked(paged(Kind::Zero, *pid, *vaddr, *nr_pages, 0), out)?,
        Frame::Refused {
            pid,
            vaddr,
            nr_pages,
            reason,
        } => {
            let h = paged(Kind::Refused, *pid, *vaddr, *nr_pages, REFUSED_PAYLOAD_LEN);
            put_checked(h, out)?;
            out.put_u16_le(*reason);
        }
    }
    Ok(())
}

/// Appends only the header of a Pages frame; the caller sends exactly `nr_pages * 4096` bytes of
/// page data right after it (so page bytes need not be copied into a [`Frame`]).
pub fn encode_pages_header(
    pid: u32,
    vaddr: u64,
    nr_pages: u32,
    out: &mut BytesMut,
) -> Result<(), WireError> {
    let payload_len = u64::from(nr_pages) * PAGE_SIZE;
    let payload_len = u32::try_from(payload_len).unwrap_or(u32::MAX);
    put_checked(paged(Kind::Pages, pid, vaddr, nr_pages, payload_len), out)
}

/// Incremental decoder: push stream bytes in with [`feed`](Self::feed) or
/// [`read_buf`](Self::read_buf), take frames out with [`poll`](Self::poll).
///
/// Page data of a Pages frame is split off the internal buffer without copying.
#[derive(Debug, Default)]
pub struct FrameDecoder {
    /// Bytes received and not yet consumed.
    buf: BytesMut,
    /// Stream offset of `buf[0]`.
    offset: u64,
    /// Validated header of the frame whose payload is still arriving, with the frame's offset.
    pending: Option<(Header, u64)>,
    /// Once the stream is found corrupt, every later poll repeats the error.
    failed: Option<WireError>,
}

impl FrameDecoder {
    pub fn new() -> Self {
        Self::default()
    }

    /// Appends received stream bytes.
    pub fn feed(&mut self, data: &[u8]) {
        // Reserving the whole rest of the frame at once saves repeated regrowth (and copying) of
        // a 16 MiB Pages payload that arrives in ~1.2 KiB QUIC chunks.
        self.buf.reserve(self.wanted().max(data.len()));
        self.buf.extend_from_slice(data);
    }

    /// The buffer to append received bytes to directly (e.g. with `AsyncReadExt::read_buf`).
    /// Only append: bytes already in it are part of the stream.
    pub fn read_buf(&mut self) -> &mut BytesMut {
        let want = self.wanted();
        self.buf.reserve(want);
        &mut self.buf
    }

    /// How many more bytes complete the frame in progress (or the next header).
    pub fn wanted(&self) -> usize {
        let need = match self.pending {
            Some((h, _)) => h.payload_len as usize,
            None => HEADER_LEN,
        };
        need.saturating_sub(self.buf.len()).max(1)
    }

    /// Stream offset just past the last byte fed in.
    pub fn stream_offset(&self) -> u64 {
        self.offset + self.buf.len() as u64
    }

    /// Returns the next complete frame, `Ok(None)` if more bytes are needed, or the reason the
    /// stream is corrupt (after which the decoder stays failed).
    pub fn poll(&mut self) -> Result<Option<Frame>, WireError> {
        if let Some(e) = &self.failed {
            return Err(e.clone());
        }
        let r = self.poll_inner();
        if let Err(e) = &r {
            self.failed = Some(e.clone());
        }
        r
    }

    /// Checks that the stream ended on a frame boundary; call it when the peer finishes the stream.
    pub fn finish(&self) -> Result<(), WireError> {
        if let Some(e) = &self.failed {
            return Err(e.clone());
        }
        let (start, need) = match self.pending {
            Some((h, at)) => (at, HEADER_LEN as u64 + u64::from(h.payload_len)),
            None if self.buf.is_empty() => return Ok(()),
            None => (self.offset, HEADER_LEN as u64),
        };
        Err(WireError::Truncated {
            offset: start,
            have: self.stream_offset() - start,
            need,
        })
    }

    fn poll_inner(&mut self) -> Result<Option<Frame>, WireError> {
        if self.pending.is_none() {
            if self.buf.len() < HEADER_LEN {
                return Ok(None);
            }
            let at = self.offset;
            let h = parse_header(&self.buf[..HEADER_LEN], at)?;
            self.consume(HEADER_LEN);
            self.pending = Some((h, at));
        }
        let Some((h, at)) = self.pending else {
            return Ok(None);
        };
        let len = h.payload_len as usize;
        if self.buf.len() < len {
            return Ok(None);
        }
        let payload = self.buf.split_to(len).freeze();
        self.offset += len as u64;
        self.pending = None;
        let (pid, vaddr, nr_pages) = (h.pid, h.vaddr, h.nr_pages);
        Ok(Some(match h.kind {
            Kind::Control => {
                let msg = Control::decode(payload).map_err(|source| WireError::BadControl {
                    offset: at,
                    len: h.payload_len,
                    source,
                })?;
                Frame::Control(msg)
            }
            Kind::PageRequest => Frame::PageRequest {
                pid,
                vaddr,
                nr_pages,
            },
            Kind::Pages => Frame::Pages {
                pid,
                vaddr,
                nr_pages,
                data: payload,
            },
            Kind::Zero => Frame::Zero {
                pid,
                vaddr,
                nr_pages,
            },
            Kind::Refused => Frame::Refused {
                pid,
                vaddr,
                nr_pages,
                reason: (&payload[..]).get_u16_le(),
            },
        }))
    }

    fn consume(&mut self, n: usize) {
        self.buf.advance(n);
        self.offset += n as u64;
    }
}

fn parse_header(mut b: &[u8], offset: u64) -> Result<Header, WireError> {
    let kind = b.get_u16_le();
    let Some(kind) = Kind::from_u16(kind) else {
        return Err(WireError::UnknownKind { offset, kind });
    };
    let h = Header {
        kind,
        flags: b.get_u16_le(),
        pid: b.get_u32_le(),
        vaddr: b.get_u64_le(),
        nr_pages: b.get_u32_le(),
        payload_len: b.get_u32_le(),
    };
    h.check()
        .map_err(|(field, value, why)| WireError::BadField {
            offset,
            kind: kind.name(),
            field,
            value,
            why,
        })?;
    Ok(h)
}

#[cfg(test)]
mod tests;
