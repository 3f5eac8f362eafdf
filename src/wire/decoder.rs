//! The incremental frame decoder: stream bytes in, validated frames out.
//!
//! Invariant: a frame's payload is split off the buffer the moment its last byte arrives, before
//! any byte of the next frame is appended, so a payload handed out owns one allocation of its
//! own size (plus at most the header and small frames before it) and never the room the buffer
//! grew for the frames after it. Appending across a frame boundary instead made the buffer
//! double (`Vec`'s amortized growth): every 256 KiB stop-and-copy frame then held a 512 KiB
//! allocation while it waited for dst's writer, twice the memory its queue is sized for.

use std::collections::VecDeque;

use bytes::{Buf, Bytes, BytesMut};
use prost::Message;

use super::{Frame, FrameHeader, FrameKind, HEADER_LEN, WireError, check_bitmap_tail};
use crate::pb::pageserv::Control;

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
    pending: Option<(FrameHeader, u64)>,
    /// Frames whose bytes have all arrived, split off `buf`, in stream order, not yet polled:
    /// header, offset, payload. At most what was fed since the last poll that returned
    /// `Ok(None)` (for [`crate::transport::FrameReceiver`], one read of the stream).
    ready: VecDeque<(FrameHeader, u64, Bytes)>,
    /// Once the stream is found corrupt, every later poll (after the frames before the fault)
    /// repeats the error, and nothing more is buffered.
    failed: Option<WireError>,
}

impl FrameDecoder {
    pub fn new() -> Self {
        Self::default()
    }

    /// Appends received stream bytes, a frame at a time (see the module's invariant).
    pub fn feed(&mut self, mut data: &[u8]) {
        while !data.is_empty() && self.failed.is_none() {
            // Reserving the whole rest of the frame at once saves repeated regrowth (and
            // copying) of a payload that arrives in ~1.4 KiB QUIC chunks.
            let want = self.wanted();
            let n = want.min(data.len());
            self.buf.reserve(want);
            self.buf.extend_from_slice(&data[..n]);
            data = &data[n..];
            self.split_complete();
        }
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
        if self.ready.is_empty() {
            // Bytes appended through read_buf are split here.
            self.split_complete();
        }
        if let Some((h, at, payload)) = self.ready.pop_front() {
            return match decode(h, at, payload) {
                Ok(f) => Ok(Some(f)),
                Err(e) => {
                    // The first fault in stream order is the one reported from now on.
                    self.ready.clear();
                    self.buf.clear();
                    self.failed = Some(e.clone());
                    Err(e)
                }
            };
        }
        match &self.failed {
            Some(e) => Err(e.clone()),
            None => Ok(None),
        }
    }

    /// Checks that the stream ended on a frame boundary; call it when the peer finishes the stream.
    pub fn finish(&mut self) -> Result<(), WireError> {
        self.split_complete();
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

    /// Parses every complete header in `buf` and moves every complete frame to `ready`; stops at
    /// the first invalid header (the stream is then failed and its rest dropped).
    fn split_complete(&mut self) {
        while self.failed.is_none() {
            match self.pending {
                None => {
                    if self.buf.len() < HEADER_LEN {
                        return;
                    }
                    let at = self.offset;
                    match parse_header(&self.buf[..HEADER_LEN], at) {
                        Ok(h) => {
                            self.consume(HEADER_LEN);
                            self.pending = Some((h, at));
                        }
                        Err(e) => {
                            self.buf.clear();
                            self.failed = Some(e);
                        }
                    }
                }
                Some((h, at)) => {
                    let len = h.payload_len as usize;
                    if self.buf.len() < len {
                        return;
                    }
                    let payload = if len == 0 {
                        Bytes::new()
                    } else {
                        self.buf.split_to(len).freeze()
                    };
                    self.offset += len as u64;
                    self.pending = None;
                    self.ready.push_back((h, at, payload));
                }
            }
        }
    }

    fn consume(&mut self, n: usize) {
        self.buf.advance(n);
        self.offset += n as u64;
    }
}

fn parse_header(mut b: &[u8], offset: u64) -> Result<FrameHeader, WireError> {
    let kind = b.get_u16_le();
    let Some(kind) = FrameKind::from_u16(kind) else {
        return Err(WireError::UnknownKind { offset, kind });
    };
    let h = FrameHeader {
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

/// The frame a validated header and its whole payload make, or why the payload is invalid.
fn decode(h: FrameHeader, at: u64, payload: Bytes) -> Result<Frame, WireError> {
    let (pid, vaddr, nr_pages) = (h.pid, h.vaddr, h.nr_pages);
    Ok(match h.kind {
        FrameKind::Control => {
            let msg = Control::decode(payload).map_err(|source| WireError::BadControl {
                offset: at,
                len: h.payload_len,
                source,
            })?;
            Frame::Control(msg)
        }
        FrameKind::PageRequest => Frame::PageRequest {
            pid,
            vaddr,
            nr_pages,
        },
        FrameKind::Pages => Frame::Pages {
            pid,
            vaddr,
            nr_pages,
            data: payload,
        },
        FrameKind::Zero => Frame::Zero {
            pid,
            vaddr,
            nr_pages,
        },
        FrameKind::Refused => Frame::Refused {
            pid,
            vaddr,
            nr_pages,
            reason: (&payload[..]).get_u16_le(),
        },
        FrameKind::PreCopyPages => Frame::PreCopyPages {
            pid,
            vaddr,
            nr_pages,
            data: payload,
        },
        FrameKind::PreCopyZero => Frame::PreCopyZero {
            pid,
            vaddr,
            nr_pages,
        },
        FrameKind::Valid => {
            check_bitmap_tail(nr_pages, &payload).map_err(|(field, value, why)| {
                WireError::BadField {
                    offset: at,
                    kind: h.kind.name(),
                    field,
                    value,
                    why,
                }
            })?;
            Frame::Valid {
                pid,
                vaddr,
                nr_pages,
                bitmap: payload,
            }
        }
    })
}
