//! CRIU's image-streamer protocol, the restore side, as a pure codec (no I/O).
//!
//! `criu restore --stream -D DIR` reads no image file itself: at start (`open_image_dir`, before
//! `kerndat_init`) it connects to the AF_UNIX stream socket `DIR/streamer-serve.sock`
//! (`img_streamer_init`), and for every image it opens (`img_streamer_open`) it sends a request
//! naming the file, reads a reply saying whether the file exists and, if it does, passes the read
//! end's peer of a fresh pipe with SCM_RIGHTS (one dummy byte, `send_fd`): the streamer writes the
//! file's bytes into that pipe and closes it, and CRIU reads the image from the pipe
//! (`criu/img-streamer.c`). Requests and replies are framed as CRIU frames any protobuf record
//! (`pb_write_one` / `pb_read_one` over a bare descriptor): a 32-bit little-endian length, then
//! the message; no image magic. One request is in flight at a time (CRIU holds
//! `img_streamer_fd_lock` across request, reply and descriptor).
//!
//! [`crate::dst::early_restore`] is the driver: it serves a migration's received images to a
//! `criu restore` started before they arrived.
//!
//! Invariants: a request longer than [`MAX_REQUEST_BYTES`] or one that does not decode is an
//! error, never a panic or an unbounded buffer; [`plain_name`] accepts only a file name inside
//! the images directory (no `/`, not `.` or `..`), so a request can never name another path.

use prost::Message;

use crate::pb::criu::{ImgStreamerReplyEntry, ImgStreamerRequestEntry};

/// The socket `criu restore --stream` connects to, in its `-D` directory
/// (`IMG_STREAMER_SERVE_SOCKET_NAME`).
pub const SERVE_SOCKET: &str = "streamer-serve.sock";

/// The longest request taken, length prefix included. CRIU's image names are short
/// (`pagemap-<pid>.img`, at most a few dozen bytes); this bounds what a peer can make dst buffer.
pub const MAX_REQUEST_BYTES: usize = 4096;

/// The longest file name [`plain_name`] accepts (NAME_MAX).
pub const MAX_NAME_BYTES: usize = 255;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum StreamerError {
    #[error(
        "CRIU's image-streamer request is {0} bytes, over the {MAX_REQUEST_BYTES} taken: is the \
         peer on streamer-serve.sock a criu restore?"
    )]
    TooLong(usize),
    #[error("CRIU's image-streamer request does not decode ({0}): is the peer a criu restore?")]
    Malformed(String),
}

/// Decodes the request at the start of `buf`: `Ok(None)` while it is incomplete, else the file
/// name and the bytes it took.
pub fn decode_request(buf: &[u8]) -> Result<Option<(String, usize)>, StreamerError> {
    let Some(len) = buf.get(..4) else {
        return Ok(None);
    };
    let len = u32::from_le_bytes([len[0], len[1], len[2], len[3]]) as usize;
    let total = len.saturating_add(4);
    if total > MAX_REQUEST_BYTES {
        return Err(StreamerError::TooLong(total));
    }
    let Some(body) = buf.get(4..total) else {
        return Ok(None);
    };
    let req = ImgStreamerRequestEntry::decode(body)
        .map_err(|e| StreamerError::Malformed(e.to_string()))?;
    Ok(Some((req.filename, total)))
}

/// The reply to a request: whether the image exists.
pub fn encode_reply(exists: bool) -> Vec<u8> {
    frame(&ImgStreamerReplyEntry { exists })
}

/// A request as CRIU frames it (for tests and tools).
pub fn encode_request(filename: &str) -> Vec<u8> {
    frame(&ImgStreamerRequestEntry {
        filename: filename.to_string(),
    })
}

fn frame(m: &impl Message) -> Vec<u8> {
    let body = m.encode_to_vec();
    let mut out = Vec::with_capacity(4 + body.len());
    out.extend_from_slice(&(body.len() as u32).to_le_bytes());
    out.extend_from_slice(&body);
    out
}

/// `name` if it names a file directly inside the images directory, else `None`.
pub fn plain_name(name: &str) -> Option<&str> {
    let ok = !name.is_empty()
        && name.len() <= MAX_NAME_BYTES
        && name != "."
        && name != ".."
        && !name.contains(['/', '\0']);
    ok.then_some(name)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn a_reply_is_framed_as_criu_reads_it() {
        // pb_read_one: u32 length, then the record; field 1 (bool) is 0x08 <value>.
        assert_eq!(encode_reply(true), vec![2, 0, 0, 0, 0x08, 1]);
        assert_eq!(encode_reply(false), vec![2, 0, 0, 0, 0x08, 0]);
    }

    #[test]
    fn a_request_as_criu_writes_it_decodes() {
        // criu restore --stream's first request: length 15, field 1 (string) 0x0a, 13 bytes.
        let mut wire = vec![15, 0, 0, 0, 0x0a, 13];
        wire.extend_from_slice(b"inventory.img");
        assert_eq!(
            decode_request(&wire),
            Ok(Some(("inventory.img".to_string(), 19)))
        );
    }

    #[test]
    fn an_oversized_request_is_refused_before_it_is_buffered() {
        let wire = [0xff, 0xff, 0xff, 0x7f];
        assert!(matches!(
            decode_request(&wire),
            Err(StreamerError::TooLong(_))
        ));
    }

    #[test]
    fn only_plain_names_inside_the_directory_are_taken() {
        assert_eq!(plain_name("pagemap-42.img"), Some("pagemap-42.img"));
        for bad in ["", ".", "..", "../etc/passwd", "/etc/passwd", "a/b", "a\0b"] {
            assert_eq!(plain_name(bad), None, "{bad:?}");
        }
        assert_eq!(plain_name(&"x".repeat(256)), None);
    }

    proptest! {
        #[test]
        fn every_request_round_trips_in_any_split(name in "[a-z0-9.-]{1,64}", cut in 0usize..80) {
            let wire = encode_request(&name);
            let cut = cut.min(wire.len());
            if cut < wire.len() {
                prop_assert_eq!(decode_request(&wire[..cut]), Ok(None));
            }
            let mut more = wire.clone();
            more.extend_from_slice(b"next");
            prop_assert_eq!(decode_request(&more), Ok(Some((name, wire.len()))));
        }

        #[test]
        fn arbitrary_bytes_never_panic_or_take_more_than_the_limit(bytes in proptest::collection::vec(any::<u8>(), 0..64)) {
            if let Ok(Some((_, used))) = decode_request(&bytes) {
                prop_assert!(used <= bytes.len() && used <= MAX_REQUEST_BYTES);
            }
        }
    }
}
