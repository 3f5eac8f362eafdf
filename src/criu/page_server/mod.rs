//! CRIU's page-server protocol, sans-IO: header codec, the GET client that `pageserv src` runs
//! against `criu dump --lazy-pages`, the receiving side that `criu dump --page-server` talks to,
//! and ([`ImageSession`]) what that receiving side writes into an image directory.
//!
//! The protocol (see docs/criu-protocols.md §1) is a byte stream of raw C structs in host order:
//! a fixed-size header, then page bytes or a fixed-size reply. There is no version, no magic and
//! no error reply; CRIU reports every failure by closing the stream. The header is 24 bytes up to
//! CRIU 4.1.x and 32 bytes from 4.2 ([`Layout`]); nothing on the wire tells them apart.
//!
//! Nothing here does IO but [`writer`], the shell that applies an [`ImageSession`]'s output to
//! an image directory: callers feed bytes read from the socket and write out the bytes the
//! encoders append to a `BytesMut`. Page data is handed out as `Bytes` split off the receive
//! buffer, so it is not copied again.

mod client;
mod error;
mod header;
mod server;
mod session;
#[cfg(test)]
mod tests;
pub mod writer;

pub use client::{ClientEvent, GetClient, GetReply};
pub use error::PsError;
pub use header::{DstId, Header, PagemapId, PagemapKind, RawHeader};
pub use server::{
    ServerDecoder, ServerEvent, encode_close_reply, encode_get_reply, encode_get_reply_header,
    encode_open2_reply, encode_parent_reply,
};
pub use session::{
    FIRST_PAGES_ID, ImageSession, MAX_SESSION_ENTRIES, Output, ParentSet, SessionError,
    SessionSummary, pages_file_name,
};

/// Largest `nr_pages` any decoder accepts in one frame (4 GiB of page data). CRIU sends at most
/// 1024 pages per data frame (one page-pipe buffer); the cap only bounds what a hostile or corrupt
/// stream can make us buffer. [`ServerDecoder::with_max_pages`] can lower it.
pub const MAX_FRAME_PAGES: u64 = 1 << 20;

/// The header layout, which depends on the CRIU release (§1.2).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Layout {
    /// CRIU up to 4.1.x: `u32 cmd, u32 nr_pages, u64 vaddr, u64 dst_id` (24 bytes).
    V41,
    /// CRIU 4.2 and later: `u32 cmd, u32 pad, u64 nr_pages, u64 vaddr, u64 dst_id` (32 bytes).
    V42,
}

impl Layout {
    /// The layout spoken by CRIU `major.minor` (the change shipped in 4.2, commit 7e0da4d97).
    pub fn for_criu_version(major: u32, minor: u32) -> Layout {
        if (major, minor) >= (4, 2) {
            Layout::V42
        } else {
            Layout::V41
        }
    }

    /// Size of one header on the wire.
    pub fn header_len(self) -> usize {
        match self {
            Layout::V41 => 24,
            Layout::V42 => 32,
        }
    }

    /// Largest nr_pages the header's field can carry.
    pub fn max_nr_pages(self) -> u64 {
        match self {
            Layout::V41 => u64::from(u32::MAX),
            Layout::V42 => u64::MAX,
        }
    }
}

/// Page-server commands: the low 16 bits of the command word (§1.3).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Command {
    /// Legacy: page data follows, treated as ADD_F with PRESENT.
    Add,
    /// Legacy: a hole, treated as ADD_F with PARENT.
    Hole,
    /// Legacy: open a pagemap, no reply.
    Open,
    /// Open a pagemap; the server answers one byte `has_parent`.
    Open2,
    /// Ask whether the parent image set has this pagemap; the server answers an `int` 0/1.
    Parent,
    /// A pagemap run with PE_* flags in the high 16 bits; data follows if PRESENT. Also the GET reply.
    AddF,
    /// Lazy-pages request for pages of a pid; answered by ADD_F|PRESENT plus data.
    Get,
    /// End of session (TCP); the server answers int32 0.
    Close,
    /// End of session on `--ps-socket`; the server answers int32 0 and does not wait for EOF.
    ForceClose,
}

impl Command {
    /// The wire value (low 16 bits of the command word).
    pub fn to_u16(self) -> u16 {
        match self {
            Command::Add => 1,
            Command::Hole => 2,
            Command::Open => 3,
            Command::Open2 => 4,
            Command::Parent => 5,
            Command::AddF => 6,
            Command::Get => 7,
            Command::Close => 0x1023,
            Command::ForceClose => 0x1024,
        }
    }

    /// The command for a wire value, if CRIU defines one.
    pub fn from_u16(value: u16) -> Option<Command> {
        Some(match value {
            1 => Command::Add,
            2 => Command::Hole,
            3 => Command::Open,
            4 => Command::Open2,
            5 => Command::Parent,
            6 => Command::AddF,
            7 => Command::Get,
            0x1023 => Command::Close,
            0x1024 => Command::ForceClose,
            _ => return None,
        })
    }
}
