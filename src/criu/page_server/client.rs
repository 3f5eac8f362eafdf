//! The GET client: the lazy-pages side of a session with `criu dump --lazy-pages` (§1.9, §1.11).

use std::collections::VecDeque;

use bytes::{Buf, Bytes, BytesMut};

use super::header::{GET_REPLY_WORD, RawHeader};
use super::{Command, DstId, Header, Layout, MAX_FRAME_PAGES, PsError};
use crate::criu::PeFlags;
use crate::pages::PAGE_SIZE;

/// Pages answering one GET: `nr_pages` (1..=requested) pages starting at the requested `vaddr`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GetReply {
    pub pid: u32,
    pub vaddr: u64,
    pub nr_pages: u64,
    /// `nr_pages * 4096` bytes, split off the receive buffer without copying. It shares that
    /// buffer's allocation, so holding it keeps the allocation alive.
    pub data: Bytes,
}

/// What the server sent, in request order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ClientEvent {
    /// The reply to the oldest outstanding GET.
    Pages(GetReply),
    /// The int32 0 answering CLOSE/FORCE_CLOSE; the session is over.
    Closed,
}

#[derive(Debug, Clone, Copy)]
enum Expect {
    Get { pid: u32, vaddr: u64, nr_pages: u64 },
    Close,
}

/// Client side of a GET session. It keeps CRIU's one ordering invariant: the server answers
/// strictly in request order, so each reply must echo the oldest outstanding request's pid and
/// vaddr, carry between 1 and the requested number of pages, and have the command word
/// ADD_F|PRESENT. CRIU's own client checks none of this except the pid; a violation here means the
/// stream is out of sync, and the client stays failed (every later `poll` returns the same error).
///
/// CRIU may answer with fewer pages than asked when the request runs past the end of the
/// page-pipe run holding `vaddr`; the caller must re-request the rest.
#[derive(Debug)]
pub struct GetClient {
    layout: Layout,
    buf: BytesMut,
    /// Stream offset of `buf[0]`: bytes received and consumed so far.
    offset: u64,
    queue: VecDeque<Expect>,
    close_sent: bool,
    closed: bool,
    failed: Option<PsError>,
}

impl GetClient {
    pub fn new(layout: Layout) -> Self {
        Self {
            layout,
            buf: BytesMut::new(),
            offset: 0,
            queue: VecDeque::new(),
            close_sent: false,
            closed: false,
            failed: None,
        }
    }

    pub fn layout(&self) -> Layout {
        self.layout
    }

    /// Appends a GET for `nr_pages` pages of `pid` at dump-time address `vaddr` and queues its
    /// expected reply. Only ask for ranges that are PE_LAZY in the dump's pagemap: CRIU ends the
    /// session without a reply for an address it does not hold, and hangs on a non-lazy one.
    pub fn request(
        &mut self,
        pid: u32,
        vaddr: u64,
        nr_pages: u64,
        out: &mut BytesMut,
    ) -> Result<(), PsError> {
        let invalid = |reason: String| PsError::InvalidRequest {
            command: Command::Get,
            reason,
        };
        if self.close_sent {
            return Err(invalid(format!(
                "GET pid {pid} vaddr 0x{vaddr:x} after CLOSE was sent"
            )));
        }
        if pid == 0 {
            return Err(invalid(
                "pid 0 (CRIU crashes on a pid it does not know)".into(),
            ));
        }
        if !vaddr.is_multiple_of(PAGE_SIZE) {
            return Err(invalid(format!("vaddr 0x{vaddr:x} is not page-aligned")));
        }
        if nr_pages == 0 || nr_pages > MAX_FRAME_PAGES {
            return Err(invalid(format!(
                "pid {pid} vaddr 0x{vaddr:x}: nr_pages {nr_pages} is outside 1..={MAX_FRAME_PAGES}"
            )));
        }
        if vaddr.checked_add(nr_pages * PAGE_SIZE).is_none() {
            return Err(invalid(format!(
                "pid {pid} vaddr 0x{vaddr:x} + {nr_pages} pages overflows the address space"
            )));
        }
        let header = Header {
            command: Command::Get,
            flags: PeFlags::default(),
            nr_pages,
            vaddr,
            dst_id: DstId::Pid(pid),
        };
        header.encode(self.layout, out)?;
        self.queue.push_back(Expect::Get {
            pid,
            vaddr,
            nr_pages,
        });
        Ok(())
    }

    /// Appends CLOSE, or FORCE_CLOSE when CRIU was given the socket with `--ps-socket`, and
    /// queues the int32 0 it answers with after all outstanding GET replies.
    pub fn close(&mut self, force: bool, out: &mut BytesMut) -> Result<(), PsError> {
        let command = if force {
            Command::ForceClose
        } else {
            Command::Close
        };
        if self.close_sent {
            return Err(PsError::InvalidRequest {
                command,
                reason: "CLOSE was already sent".into(),
            });
        }
        let header = Header {
            command,
            flags: PeFlags::default(),
            nr_pages: 0,
            vaddr: 0,
            dst_id: DstId::None,
        };
        header.encode(self.layout, out)?;
        self.close_sent = true;
        self.queue.push_back(Expect::Close);
        Ok(())
    }

    /// Adds bytes read from the socket.
    pub fn feed(&mut self, bytes: &[u8]) {
        self.buf.extend_from_slice(bytes);
    }

    /// The receive buffer, for reading from the socket straight into it (e.g. tokio's
    /// `read_buf`). While a reply's data is incomplete it has capacity reserved for the rest.
    pub fn read_buf(&mut self) -> &mut BytesMut {
        &mut self.buf
    }

    /// Requests (including a CLOSE) whose reply has not been delivered yet.
    pub fn outstanding(&self) -> usize {
        self.queue.len()
    }

    /// Whether the CLOSE reply has been delivered.
    pub fn is_closed(&self) -> bool {
        self.closed
    }

    /// The next complete reply, `None` if more bytes are needed.
    pub fn poll(&mut self) -> Result<Option<ClientEvent>, PsError> {
        if let Some(e) = &self.failed {
            return Err(e.clone());
        }
        let result = self.poll_inner();
        if let Err(e) = &result {
            self.failed = Some(e.clone());
        }
        result
    }

    /// Call when the peer closed the stream: fails if anything was still expected.
    pub fn on_eof(&self) -> Result<(), PsError> {
        if let Some(e) = &self.failed {
            return Err(e.clone());
        }
        let waiting_for = match self.queue.front() {
            None if self.buf.is_empty() => return Ok(()),
            None => format!(
                "{} bytes that answer no request are buffered",
                self.buf.len()
            ),
            Some(Expect::Get {
                pid,
                vaddr,
                nr_pages,
            }) => format!(
                "waiting for the reply to GET pid {pid} vaddr 0x{vaddr:x} ({nr_pages} pages; \
                 {} bytes of it received, {} requests outstanding)",
                self.buf.len(),
                self.queue.len()
            ),
            Some(Expect::Close) => "waiting for the CLOSE reply".into(),
        };
        Err(PsError::UnexpectedEof {
            offset: self.offset + self.buf.len() as u64,
            waiting_for,
        })
    }

    fn poll_inner(&mut self) -> Result<Option<ClientEvent>, PsError> {
        let Some(expect) = self.queue.front().copied() else {
            if self.buf.is_empty() {
                return Ok(None);
            }
            return Err(PsError::Unsolicited {
                offset: self.offset,
                count: self.buf.len(),
                context: if self.closed {
                    "the session is closed"
                } else {
                    "no GET is outstanding"
                },
            });
        };
        let event = match expect {
            Expect::Get {
                pid,
                vaddr,
                nr_pages,
            } => {
                let hl = self.layout.header_len();
                let Ok(raw) = RawHeader::decode(self.layout, &self.buf) else {
                    return Ok(None);
                };
                let offset = self.offset;
                if raw.word != GET_REPLY_WORD {
                    return Err(PsError::ReplyCommand {
                        offset,
                        pid,
                        vaddr,
                        word: raw.word,
                    });
                }
                if raw.dst_id != u64::from(pid) || raw.vaddr != vaddr {
                    return Err(PsError::ReplyMismatch {
                        offset,
                        pid,
                        vaddr,
                        got_dst_id: raw.dst_id,
                        got_vaddr: raw.vaddr,
                    });
                }
                if raw.nr_pages == 0 || raw.nr_pages > nr_pages {
                    return Err(PsError::ReplyPageCount {
                        offset,
                        pid,
                        vaddr,
                        got: raw.nr_pages,
                        requested: nr_pages,
                    });
                }
                // Bounded by the request, which is capped at MAX_FRAME_PAGES.
                let len = (raw.nr_pages * PAGE_SIZE) as usize;
                let frame = hl + len;
                if self.buf.len() < frame {
                    self.buf.reserve(frame - self.buf.len());
                    return Ok(None);
                }
                self.buf.advance(hl);
                let data = self.buf.split_to(len).freeze();
                self.offset += frame as u64;
                ClientEvent::Pages(GetReply {
                    pid,
                    vaddr,
                    nr_pages: raw.nr_pages,
                    data,
                })
            }
            Expect::Close => {
                let Some(b) = self.buf.get(..4) else {
                    return Ok(None);
                };
                let status = i32::from_le_bytes([b[0], b[1], b[2], b[3]]);
                if status != 0 {
                    return Err(PsError::CloseStatus {
                        offset: self.offset,
                        status,
                    });
                }
                self.buf.advance(4);
                self.offset += 4;
                self.closed = true;
                ClientEvent::Closed
            }
        };
        self.queue.pop_front();
        Ok(Some(event))
    }
}
