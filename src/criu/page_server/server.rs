//! The page-server side: decoding what `criu dump --page-server` (or a lazy-pages daemon) sends,
//! and encoding the few replies the protocol has (§1.5, §1.7, §1.8).

use bytes::{Buf, BufMut, Bytes, BytesMut};

use super::header::{GET_REPLY_WORD, RawHeader};
use super::{Command, DstId, Header, Layout, MAX_FRAME_PAGES, PagemapId, PsError};
use crate::criu::PeFlags;
use crate::pages::PAGE_SIZE;

/// Most receive-buffer capacity [`ServerDecoder`] reserves ahead of the bytes it holds. CRIU's
/// data frames are at most 4 MiB (1024 pages), so a real frame still gets its whole buffer at once.
const MAX_RESERVE_AHEAD: usize = 4 << 20;

/// One client frame, decoded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ServerEvent {
    /// OPEN2 (`want_reply`: answer with [`encode_open2_reply`]) or legacy OPEN (no reply).
    Open { id: PagemapId, want_reply: bool },
    /// PARENT: answer with [`encode_parent_reply`].
    Parent { id: PagemapId },
    /// ADD_F (legacy ADD arrives as PRESENT, HOLE as PARENT): a pagemap run, with its
    /// `nr_pages * 4096` data bytes if PRESENT. `dst` may differ from the last opened pagemap;
    /// CRIU then opens `dst` implicitly.
    Pages {
        dst: PagemapId,
        vaddr: u64,
        nr_pages: u64,
        flags: PeFlags,
        data: Option<Bytes>,
    },
    /// GET: answer with [`encode_get_reply`], or close the stream if the pages are not held.
    Get { pid: u32, vaddr: u64, nr_pages: u64 },
    /// CLOSE (`force` = FORCE_CLOSE): answer with [`encode_close_reply`]. Nothing may follow.
    Close { force: bool },
}

/// Decodes the client-to-server byte stream into [`ServerEvent`]s. Memory is bounded by one
/// frame: at most `max_pages * 4096` bytes plus a header are buffered.
#[derive(Debug)]
pub struct ServerDecoder {
    layout: Layout,
    max_pages: u64,
    buf: BytesMut,
    offset: u64,
    closed: bool,
    failed: Option<PsError>,
}

impl ServerDecoder {
    pub fn new(layout: Layout) -> Self {
        Self::with_max_pages(layout, MAX_FRAME_PAGES)
    }

    /// A decoder refusing frames above `max_pages` (clamped to [`MAX_FRAME_PAGES`]).
    pub fn with_max_pages(layout: Layout, max_pages: u64) -> Self {
        Self {
            layout,
            max_pages: max_pages.min(MAX_FRAME_PAGES),
            buf: BytesMut::new(),
            offset: 0,
            closed: false,
            failed: None,
        }
    }

    /// Adds bytes read from the socket.
    pub fn feed(&mut self, bytes: &[u8]) {
        self.buf.extend_from_slice(bytes);
    }

    /// The receive buffer, for reading from the socket straight into it. While a frame's data is
    /// incomplete it has capacity reserved for the rest.
    pub fn read_buf(&mut self) -> &mut BytesMut {
        &mut self.buf
    }

    /// Bytes consumed so far (the stream offset of the next frame).
    pub fn offset(&self) -> u64 {
        self.offset
    }

    /// Whether CLOSE/FORCE_CLOSE has been decoded.
    pub fn is_closed(&self) -> bool {
        self.closed
    }

    /// The next complete frame, `None` if more bytes are needed. After an error the decoder stays
    /// failed and returns that error again.
    pub fn poll(&mut self) -> Result<Option<ServerEvent>, PsError> {
        if let Some(e) = &self.failed {
            return Err(e.clone());
        }
        let result = self.poll_inner();
        if let Err(e) = &result {
            self.failed = Some(e.clone());
        }
        result
    }

    /// Call when the client closed the stream. Like CRIU's receiving page server, an EOF before
    /// CLOSE is an error (the client may not have sent everything), as is one inside a frame.
    pub fn on_eof(&self) -> Result<(), PsError> {
        if let Some(e) = &self.failed {
            return Err(e.clone());
        }
        let waiting_for = if !self.buf.is_empty() {
            format!(
                "{} bytes of an incomplete frame were buffered",
                self.buf.len()
            )
        } else if !self.closed {
            "no CLOSE had been received".to_string()
        } else {
            return Ok(());
        };
        Err(PsError::UnexpectedEof {
            offset: self.offset + self.buf.len() as u64,
            waiting_for,
        })
    }

    fn poll_inner(&mut self) -> Result<Option<ServerEvent>, PsError> {
        if self.closed {
            if self.buf.is_empty() {
                return Ok(None);
            }
            return Err(PsError::Unsolicited {
                offset: self.offset,
                count: self.buf.len(),
                context: "the client already sent CLOSE",
            });
        }
        let Ok(raw) = RawHeader::decode(self.layout, &self.buf) else {
            return Ok(None);
        };
        let header = Header::from_raw(raw, self.offset, self.max_pages)?;
        let hl = self.layout.header_len();
        // nr_pages <= max_pages <= MAX_FRAME_PAGES, so this fits.
        let len = if header.carries_data() {
            (header.nr_pages * PAGE_SIZE) as usize
        } else {
            0
        };
        if self.buf.len() < hl + len {
            // Reserve room for the rest of the frame only a bounded step ahead of the bytes that
            // arrived: a 24-byte header alone may claim 4 GiB (found by fuzzing).
            let missing = hl + len - self.buf.len();
            self.buf.reserve(missing.min(MAX_RESERVE_AHEAD));
            return Ok(None);
        }
        self.buf.advance(hl);
        let data = header
            .carries_data()
            .then(|| self.buf.split_to(len).freeze());
        self.offset += (hl + len) as u64;

        let offset = self.offset - (hl + len) as u64;
        let event = match (header.command, header.dst_id) {
            (Command::Open | Command::Open2, DstId::Pagemap { kind, id }) => ServerEvent::Open {
                id: PagemapId { kind, id },
                want_reply: header.command == Command::Open2,
            },
            (Command::Parent, DstId::Pagemap { kind, id }) => ServerEvent::Parent {
                id: PagemapId { kind, id },
            },
            (Command::Add | Command::Hole | Command::AddF, DstId::Pagemap { kind, id }) => {
                ServerEvent::Pages {
                    dst: PagemapId { kind, id },
                    vaddr: header.vaddr,
                    nr_pages: header.nr_pages,
                    flags: match header.command {
                        Command::Add => PeFlags::PRESENT,
                        Command::Hole => PeFlags::PARENT,
                        _ => header.flags,
                    },
                    data,
                }
            }
            (Command::Get, DstId::Pid(pid)) => ServerEvent::Get {
                pid,
                vaddr: header.vaddr,
                nr_pages: header.nr_pages,
            },
            (Command::Close | Command::ForceClose, _) => {
                self.closed = true;
                ServerEvent::Close {
                    force: header.command == Command::ForceClose,
                }
            }
            // Header::from_raw never pairs a command with another dst_id kind.
            (command, dst_id) => {
                return Err(PsError::Internal {
                    offset,
                    what: format!("{command:?} decoded with dst_id {dst_id:?}"),
                });
            }
        };
        Ok(Some(event))
    }
}

/// The 1-byte answer to OPEN2: whether a parent pagemap exists for this id.
pub fn encode_open2_reply(has_parent: bool, out: &mut BytesMut) {
    out.put_u8(u8::from(has_parent));
}

/// The `int` answer to PARENT: 1 if `parent/pagemap-<id>.img` exists, else 0.
pub fn encode_parent_reply(has_parent: bool, out: &mut BytesMut) {
    out.put_i32_le(i32::from(has_parent));
}

/// The int32 0 answering CLOSE and FORCE_CLOSE.
pub fn encode_close_reply(out: &mut BytesMut) {
    out.put_i32_le(0);
}

/// The header of a GET reply (ADD_F|PRESENT echoing `pid` and `vaddr`); `nr_pages * 4096` data
/// bytes must follow. `nr_pages` must be between 1 and what the GET asked for.
pub fn encode_get_reply_header(
    layout: Layout,
    pid: u32,
    vaddr: u64,
    nr_pages: u64,
    out: &mut BytesMut,
) -> Result<(), PsError> {
    if nr_pages == 0 || nr_pages > MAX_FRAME_PAGES {
        return Err(PsError::InvalidRequest {
            command: Command::AddF,
            reason: format!(
                "GET reply for pid {pid} vaddr 0x{vaddr:x} with {nr_pages} pages (must be \
                 1..={MAX_FRAME_PAGES}; CRIU closes the session instead of answering 0 pages)"
            ),
        });
    }
    let raw = RawHeader {
        word: GET_REPLY_WORD,
        nr_pages,
        vaddr,
        dst_id: u64::from(pid),
    };
    raw.encode(layout, out)
}

/// A whole GET reply: header plus `data`, which must be a non-empty multiple of 4096 bytes.
pub fn encode_get_reply(
    layout: Layout,
    pid: u32,
    vaddr: u64,
    data: &[u8],
    out: &mut BytesMut,
) -> Result<(), PsError> {
    if !(data.len() as u64).is_multiple_of(PAGE_SIZE) {
        return Err(PsError::InvalidRequest {
            command: Command::AddF,
            reason: format!(
                "GET reply for pid {pid} vaddr 0x{vaddr:x}: {} data bytes are not whole pages",
                data.len()
            ),
        });
    }
    encode_get_reply_header(layout, pid, vaddr, data.len() as u64 / PAGE_SIZE, out)?;
    out.extend_from_slice(data);
    Ok(())
}
