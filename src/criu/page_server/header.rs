//! The `struct page_server_iov` header: byte layout ([`RawHeader`]) and its meaning ([`Header`]).

use bytes::{BufMut, BytesMut};

use super::{Command, Layout, MAX_FRAME_PAGES, PsError};
use crate::criu::PeFlags;

/// The command word CRIU puts on every GET reply: `ADD_F | PE_PRESENT << 16`.
pub(crate) const GET_REPLY_WORD: u32 = (4 << 16) | 6;

const CMD_BITS: u32 = 16;
const TYPE_BITS: u32 = 8;
/// Pagemap ids are packed above an 8-bit type, so they have 56 bits.
const MAX_PAGEMAP_ID: u64 = u64::MAX >> TYPE_BITS;

/// Which kind of pagemap image a dst_id names (§1.4).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum PagemapKind {
    /// `pagemap-<vpid>.img` (type 1; legacy 10, 11, 16, 17).
    Pid,
    /// `pagemap-shmem-<shmid>.img` (type 2; legacy 27, 28, 29, 32, 33, 34).
    Shmem,
}

/// A pagemap image: the kind and the id (virtual pid or shmid; at most 56 bits).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct PagemapId {
    pub kind: PagemapKind,
    pub id: u64,
}

/// The meaning of the header's `dst_id`, which depends on the command (§1.4).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DstId {
    /// OPEN, OPEN2, PARENT, ADD, ADD_F, HOLE: `(id << 8) | type`.
    Pagemap { kind: PagemapKind, id: u64 },
    /// GET and its reply: the plain virtual pid.
    Pid(u32),
    /// CLOSE and FORCE_CLOSE carry none (CRIU sends 0).
    None,
}

impl DstId {
    /// The pagemap this dst_id names, if it names one.
    pub fn pagemap(self) -> Option<PagemapId> {
        match self {
            DstId::Pagemap { kind, id } => Some(PagemapId { kind, id }),
            DstId::Pid(_) | DstId::None => None,
        }
    }

    /// The wire value; `None` for a pagemap id that does not fit 56 bits.
    fn to_wire(self) -> Option<u64> {
        match self {
            DstId::Pagemap { kind, id } if id <= MAX_PAGEMAP_ID => {
                let ty = match kind {
                    PagemapKind::Pid => 1,
                    PagemapKind::Shmem => 2,
                };
                Some((id << TYPE_BITS) | ty)
            }
            DstId::Pagemap { .. } => None,
            DstId::Pid(pid) => Some(u64::from(pid)),
            DstId::None => Some(0),
        }
    }
}

impl From<PagemapId> for DstId {
    fn from(p: PagemapId) -> DstId {
        DstId::Pagemap {
            kind: p.kind,
            id: p.id,
        }
    }
}

/// A header's fields exactly as on the wire, before any interpretation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct RawHeader {
    /// `(flags << 16) | command`.
    pub word: u32,
    pub nr_pages: u64,
    pub vaddr: u64,
    pub dst_id: u64,
}

impl RawHeader {
    /// Appends the header. Fails only if `nr_pages` does not fit the layout's field.
    pub fn encode(&self, layout: Layout, out: &mut BytesMut) -> Result<(), PsError> {
        out.reserve(layout.header_len());
        out.put_u32_le(self.word);
        match layout {
            Layout::V41 => {
                let nr = u32::try_from(self.nr_pages).map_err(|_| PsError::InvalidRequest {
                    command: command_of(self.word),
                    reason: format!(
                        "nr_pages {} does not fit the 24-byte (CRIU 4.1) header's u32",
                        self.nr_pages
                    ),
                })?;
                out.put_u32_le(nr);
            }
            Layout::V42 => {
                out.put_u32_le(0);
                out.put_u64_le(self.nr_pages);
            }
        }
        out.put_u64_le(self.vaddr);
        out.put_u64_le(self.dst_id);
        Ok(())
    }

    /// Reads one header from the start of `buf`; the V42 padding is ignored.
    pub fn decode(layout: Layout, buf: &[u8]) -> Result<RawHeader, PsError> {
        let need = layout.header_len();
        let b = buf.get(..need).ok_or(PsError::ShortHeader {
            have: buf.len(),
            need,
        })?;
        let u32_at = |o: usize| u32::from_le_bytes([b[o], b[o + 1], b[o + 2], b[o + 3]]);
        let u64_at = |o: usize| u64::from(u32_at(o)) | (u64::from(u32_at(o + 4)) << 32);
        Ok(match layout {
            Layout::V41 => RawHeader {
                word: u32_at(0),
                nr_pages: u64::from(u32_at(4)),
                vaddr: u64_at(8),
                dst_id: u64_at(16),
            },
            Layout::V42 => RawHeader {
                word: u32_at(0),
                nr_pages: u64_at(8),
                vaddr: u64_at(16),
                dst_id: u64_at(24),
            },
        })
    }

    pub fn command_bits(&self) -> u16 {
        (self.word & 0xffff) as u16
    }

    pub fn flag_bits(&self) -> u32 {
        self.word >> CMD_BITS
    }
}

/// Best-effort command for error messages about a raw word.
fn command_of(word: u32) -> Command {
    Command::from_u16((word & 0xffff) as u16).unwrap_or(Command::AddF)
}

/// A decoded header. `flags` is non-empty only on ADD_F.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Header {
    pub command: Command,
    pub flags: PeFlags,
    pub nr_pages: u64,
    pub vaddr: u64,
    pub dst_id: DstId,
}

impl Header {
    /// Appends the header in `layout`. Refuses headers CRIU would misread or that our decoders
    /// reject: flags on anything but ADD_F, unknown flag bits, a dst_id kind that does not fit the
    /// command, non-zero fields on CLOSE, or nr_pages above [`MAX_FRAME_PAGES`] or the layout.
    pub fn encode(&self, layout: Layout, out: &mut BytesMut) -> Result<(), PsError> {
        self.to_raw()?.encode(layout, out)
    }

    /// The wire fields, after the checks described on [`Header::encode`].
    pub fn to_raw(&self) -> Result<RawHeader, PsError> {
        let invalid = |reason: String| PsError::InvalidRequest {
            command: self.command,
            reason,
        };
        let flags = self.flags.0;
        if flags != 0 && self.command != Command::AddF {
            return Err(invalid(format!(
                "flags 0x{flags:x} on a command without flags"
            )));
        }
        if self.flags.unknown_bits() != 0 {
            return Err(invalid(format!(
                "flags 0x{flags:x} have bits CRIU does not define"
            )));
        }
        if self.nr_pages > MAX_FRAME_PAGES {
            return Err(invalid(format!(
                "nr_pages {} is above the per-frame cap {MAX_FRAME_PAGES}",
                self.nr_pages
            )));
        }
        let dst_fits = match (self.command, self.dst_id) {
            (Command::Close | Command::ForceClose, DstId::None) => {
                self.nr_pages == 0 && self.vaddr == 0
            }
            (Command::Get, DstId::Pid(_)) => true,
            (Command::AddF, DstId::Pid(_)) => self.flags == PeFlags::PRESENT,
            (
                Command::Add
                | Command::Hole
                | Command::Open
                | Command::Open2
                | Command::Parent
                | Command::AddF,
                DstId::Pagemap { .. },
            ) => true,
            _ => false,
        };
        if !dst_fits {
            return Err(invalid(format!(
                "dst_id {:?} with flags 0x{flags:x}, nr_pages {}, vaddr 0x{:x} does not fit this \
                 command (GET and its ADD_F|PRESENT reply carry a pid, CLOSE carries nothing, \
                 the rest a pagemap)",
                self.dst_id, self.nr_pages, self.vaddr
            )));
        }
        let dst_id = self
            .dst_id
            .to_wire()
            .ok_or_else(|| invalid(format!("pagemap id in {:?} exceeds 56 bits", self.dst_id)))?;
        Ok(RawHeader {
            word: (flags << CMD_BITS) | u32::from(self.command.to_u16()),
            nr_pages: self.nr_pages,
            vaddr: self.vaddr,
            dst_id,
        })
    }

    /// Decodes a header travelling to a page server (every command a client sends), capping
    /// nr_pages at [`MAX_FRAME_PAGES`]. A GET reply is an ADD_F whose dst_id is a pid, which this
    /// would read as a pagemap: use [`Header::decode_get_reply`] for those.
    pub fn decode(layout: Layout, buf: &[u8]) -> Result<Header, PsError> {
        Header::from_raw(RawHeader::decode(layout, buf)?, 0, MAX_FRAME_PAGES)
    }

    /// Decodes a GET reply header: command word exactly ADD_F|PRESENT, dst_id a pid.
    pub fn decode_get_reply(layout: Layout, buf: &[u8]) -> Result<Header, PsError> {
        let raw = RawHeader::decode(layout, buf)?;
        let pid = u32::try_from(raw.dst_id).map_err(|_| PsError::BadPid {
            offset: 0,
            command: Command::AddF,
            dst_id: raw.dst_id,
        })?;
        if raw.word != GET_REPLY_WORD {
            return Err(PsError::ReplyCommand {
                offset: 0,
                pid,
                vaddr: raw.vaddr,
                word: raw.word,
            });
        }
        if raw.nr_pages > MAX_FRAME_PAGES {
            return Err(PsError::TooManyPages {
                offset: 0,
                command: Command::AddF,
                nr_pages: raw.nr_pages,
                max: MAX_FRAME_PAGES,
            });
        }
        Ok(Header {
            command: Command::AddF,
            flags: PeFlags::PRESENT,
            nr_pages: raw.nr_pages,
            vaddr: raw.vaddr,
            dst_id: DstId::Pid(pid),
        })
    }

    /// Interprets a raw header sent to a page server; `offset` is only for error messages.
    pub(crate) fn from_raw(raw: RawHeader, offset: u64, max_pages: u64) -> Result<Header, PsError> {
        let command = Command::from_u16(raw.command_bits()).ok_or(PsError::UnknownCommand {
            offset,
            command: raw.command_bits(),
            word: raw.word,
        })?;
        let flags = raw.flag_bits();
        if flags != 0 && command != Command::AddF {
            return Err(PsError::FlagsOnCommand {
                offset,
                command,
                flags,
            });
        }
        let unknown = PeFlags(flags).unknown_bits();
        if unknown != 0 {
            return Err(PsError::UnknownFlags {
                offset,
                flags,
                unknown,
            });
        }
        if raw.nr_pages > max_pages {
            return Err(PsError::TooManyPages {
                offset,
                command,
                nr_pages: raw.nr_pages,
                max: max_pages,
            });
        }
        let dst_id = match command {
            Command::Close | Command::ForceClose => {
                if raw.nr_pages != 0 || raw.vaddr != 0 || raw.dst_id != 0 {
                    return Err(PsError::CloseWithFields {
                        offset,
                        command,
                        nr_pages: raw.nr_pages,
                        vaddr: raw.vaddr,
                        dst_id: raw.dst_id,
                    });
                }
                DstId::None
            }
            Command::Get => DstId::Pid(u32::try_from(raw.dst_id).map_err(|_| PsError::BadPid {
                offset,
                command,
                dst_id: raw.dst_id,
            })?),
            _ => decode_pagemap(raw.dst_id).ok_or(PsError::UnknownPagemapType {
                offset,
                command,
                dst_id: raw.dst_id,
                ty: (raw.dst_id & 0xff) as u8,
            })?,
        };
        Ok(Header {
            command,
            flags: PeFlags(flags),
            nr_pages: raw.nr_pages,
            vaddr: raw.vaddr,
            dst_id,
        })
    }

    /// Whether page bytes follow this header on the wire.
    pub fn carries_data(&self) -> bool {
        match self.command {
            Command::Add => true,
            Command::AddF => self.flags.is_present(),
            _ => false,
        }
    }
}

/// `decode_pm()`: current and legacy pagemap types (§1.4).
fn decode_pagemap(dst_id: u64) -> Option<DstId> {
    let kind = match dst_id & 0xff {
        1 | 10 | 11 | 16 | 17 => PagemapKind::Pid,
        2 | 27 | 28 | 29 | 32 | 33 | 34 => PagemapKind::Shmem,
        _ => return None,
    };
    Some(DstId::Pagemap {
        kind,
        id: dst_id >> TYPE_BITS,
    })
}
