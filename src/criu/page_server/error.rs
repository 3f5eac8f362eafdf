//! Errors of the page-server codec. Every decode error names the stream offset of the frame that
//! failed, the field and the value, because the protocol itself has no error replies and a peer
//! that disagrees with us only ever shows up as bytes we cannot explain.

use super::Command;

/// Why a page-server frame could not be encoded, decoded or matched to a request.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PsError {
    /// [`super::Header::decode`] was given fewer bytes than one header.
    #[error(
        "page-server header needs {need} bytes for this layout but only {have} were given \
         (truncated frame, or the peer runs a CRIU version with the other header size)"
    )]
    ShortHeader { have: usize, need: usize },

    /// The low 16 bits of the command word are not a command CRIU knows.
    #[error(
        "page-server header at stream offset {offset}: unknown command 0x{command:04x} \
         (command word 0x{word:08x}); the stream is corrupt or the peer uses another header layout"
    )]
    UnknownCommand {
        offset: u64,
        command: u16,
        word: u32,
    },

    /// Flags (high 16 bits of the command word) on a command other than ADD_F.
    #[error(
        "page-server header at stream offset {offset}: {command:?} carries flags 0x{flags:04x}; \
         only ADD_F has flags (CRIU stops after CLOSE/FORCE_CLOSE only when the whole word matches)"
    )]
    FlagsOnCommand {
        offset: u64,
        command: Command,
        flags: u32,
    },

    /// ADD_F flags with bits CRIU does not define.
    #[error(
        "page-server header at stream offset {offset}: ADD_F flags 0x{flags:04x} have unknown \
         bits 0x{unknown:04x} (known: PARENT=1, LAZY=2, PRESENT=4)"
    )]
    UnknownFlags {
        offset: u64,
        flags: u32,
        unknown: u32,
    },

    /// nr_pages above the per-frame cap; refusing it bounds the memory one frame can take.
    #[error(
        "page-server header at stream offset {offset}: {command:?} has nr_pages {nr_pages}, above \
         this decoder's cap of {max} pages per frame (CRIU never sends more than 1024 per data frame)"
    )]
    TooManyPages {
        offset: u64,
        command: Command,
        nr_pages: u64,
        max: u64,
    },

    /// CLOSE/FORCE_CLOSE with non-zero fields; CRIU always sends them zeroed.
    #[error(
        "page-server header at stream offset {offset}: {command:?} has non-zero fields \
         (nr_pages {nr_pages}, vaddr 0x{vaddr:x}, dst_id 0x{dst_id:x}); CRIU sends them as zero"
    )]
    CloseWithFields {
        offset: u64,
        command: Command,
        nr_pages: u64,
        vaddr: u64,
        dst_id: u64,
    },

    /// The low byte of a pagemap dst_id is neither a current nor a legacy pagemap type.
    #[error(
        "page-server header at stream offset {offset}: {command:?} dst_id 0x{dst_id:x} has unknown \
         pagemap type {ty} (known: 1 pid, 2 shmem, legacy 10/11/16/17 and 27/28/29/32/33/34)"
    )]
    UnknownPagemapType {
        offset: u64,
        command: Command,
        dst_id: u64,
        ty: u8,
    },

    /// A GET (or GET reply) whose dst_id does not fit a pid.
    #[error(
        "page-server header at stream offset {offset}: {command:?} dst_id 0x{dst_id:x} is not a \
         pid (GET carries the plain virtual pid)"
    )]
    BadPid {
        offset: u64,
        command: Command,
        dst_id: u64,
    },

    /// A GET reply whose command word is not ADD_F|PRESENT.
    #[error(
        "GET reply at stream offset {offset} for pid {pid} vaddr 0x{vaddr:x}: command word \
         0x{word:08x}, expected 0x00040006 (ADD_F|PRESENT)"
    )]
    ReplyCommand {
        offset: u64,
        pid: u32,
        vaddr: u64,
        word: u32,
    },

    /// A GET reply that does not echo the oldest outstanding request (replies are FIFO).
    #[error(
        "GET reply at stream offset {offset} is for dst_id {got_dst_id} vaddr 0x{got_vaddr:x}, but \
         the oldest outstanding request is pid {pid} vaddr 0x{vaddr:x}; CRIU answers strictly in \
         request order, so the stream is out of sync"
    )]
    ReplyMismatch {
        offset: u64,
        pid: u32,
        vaddr: u64,
        got_dst_id: u64,
        got_vaddr: u64,
    },

    /// A GET reply with more pages than requested, or with none.
    #[error(
        "GET reply at stream offset {offset} for pid {pid} vaddr 0x{vaddr:x} carries {got} pages, \
         request was {requested} (a reply must carry between 1 and the requested count)"
    )]
    ReplyPageCount {
        offset: u64,
        pid: u32,
        vaddr: u64,
        got: u64,
        requested: u64,
    },

    /// The int32 answer to CLOSE/FORCE_CLOSE was not 0.
    #[error("CLOSE reply at stream offset {offset}: status {status}, expected 0")]
    CloseStatus { offset: u64, status: i32 },

    /// Bytes arrived when no reply was expected.
    #[error(
        "{count} unexpected bytes at stream offset {offset}: no request is outstanding \
         ({context})"
    )]
    Unsolicited {
        offset: u64,
        count: usize,
        context: &'static str,
    },

    /// The peer closed the stream in the middle of a frame or with requests unanswered.
    #[error(
        "page-server stream ended at offset {offset} while {waiting_for}; CRIU reports every \
         failure (including a GET for an address it does not hold) by closing the session"
    )]
    UnexpectedEof { offset: u64, waiting_for: String },

    /// A request the caller asked us to encode cannot be expressed or is meaningless.
    #[error("cannot encode page-server {command:?}: {reason}")]
    InvalidRequest { command: Command, reason: String },

    /// A bug in this codec, not in the input.
    #[error("page-server codec bug at stream offset {offset}: {what}; please report it")]
    Internal { offset: u64, what: String },
}
