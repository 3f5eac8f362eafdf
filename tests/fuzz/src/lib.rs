//! Fuzz target bodies for pageserv's decoders of untrusted bytes. Each function takes arbitrary
//! input and must return normally: a decoder may refuse the bytes with an error, but may not
//! panic, loop or allocate beyond its caps. The assertions check what a decoded value promises
//! (data lengths, request order, encode/decode round trips), so a decoder that accepts nonsense
//! fails too.
//!
//! Used by the cargo-fuzz binaries in `fuzz_targets/` and, through `#[path]`, by
//! `tests/fuzz_corpus.rs`, which replays the committed corpus on stable in `cargo test`.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use bytes::BytesMut;
use pageserv::criu::images::{self, ImageDir, PagemapId, PresentIndex};
use pageserv::criu::page_server::{
    ClientEvent, GetClient, Header, Layout, PsError, ServerDecoder, ServerEvent,
};
use pageserv::pages::PAGE_SIZE;
use pageserv::wire::{self, Frame, FrameDecoder};

/// Splits `data` into feed chunks whose sizes come from `seed`, so one input exercises both
/// byte-at-a-time and bulk delivery.
fn chunks(data: &[u8], seed: u8) -> impl Iterator<Item = &[u8]> {
    let size = match seed % 4 {
        0 => usize::MAX,
        1 => 1,
        2 => 7,
        _ => 4096 + usize::from(seed),
    };
    data.chunks(size.min(data.len().max(1)))
}

/// (a) CRIU's page-server protocol: the receiving decoder ([`ServerDecoder`], what
/// `criu dump --page-server` sends) and the GET reply path ([`GetClient`], what
/// `criu dump --lazy-pages` answers). Byte 0 picks the header layout, the side and the chunking.
pub fn page_server(data: &[u8]) {
    let Some((&ctl, rest)) = data.split_first() else {
        return;
    };
    let layout = if ctl & 1 == 0 {
        Layout::V41
    } else {
        Layout::V42
    };
    header_round_trip(layout, rest);
    if ctl & 2 == 0 {
        server_stream(layout, rest, ctl >> 2);
    } else {
        get_replies(layout, rest, ctl >> 2);
    }
}

/// A header that decodes must encode back to a header that decodes to the same value.
fn header_round_trip(layout: Layout, bytes: &[u8]) {
    type Decode = fn(Layout, &[u8]) -> Result<Header, PsError>;
    let decoders: [Decode; 2] = [Header::decode, Header::decode_get_reply];
    for decode in decoders {
        let Ok(h) = decode(layout, bytes) else {
            continue;
        };
        let mut out = BytesMut::new();
        if h.encode(layout, &mut out).is_ok() {
            assert_eq!(out.len(), layout.header_len());
            assert_eq!(decode(layout, &out), Ok(h), "header round trip");
        }
    }
}

fn server_stream(layout: Layout, stream: &[u8], seed: u8) {
    let mut dec = ServerDecoder::new(layout);
    let mut fed = 0u64;
    for chunk in chunks(stream, seed) {
        dec.feed(chunk);
        fed += chunk.len() as u64;
        loop {
            match dec.poll() {
                Ok(Some(ev)) => check_server_event(&ev),
                Ok(None) => break,
                Err(e) => {
                    // A failed decoder stays failed with the same error.
                    assert_eq!(dec.poll(), Err(e.clone()));
                    assert!(!e.to_string().is_empty());
                    return;
                }
            }
            assert!(dec.offset() <= fed);
        }
    }
    let _ = dec.on_eof();
}

fn check_server_event(ev: &ServerEvent) {
    if let ServerEvent::Pages {
        nr_pages,
        flags,
        data,
        ..
    } = ev
    {
        match data {
            Some(d) => {
                assert!(flags.is_present());
                assert_eq!(d.len() as u64, nr_pages * PAGE_SIZE);
            }
            None => assert!(!flags.is_present() || *nr_pages == 0),
        }
    }
}

/// Input: `[n] n * [pid u16][page u32][nr u16]` requests, then the server's byte stream.
fn get_replies(layout: Layout, input: &[u8], seed: u8) {
    let Some((&n, mut rest)) = input.split_first() else {
        return;
    };
    let mut client = GetClient::new(layout);
    let mut out = BytesMut::new();
    let mut asked = std::collections::VecDeque::new();
    for _ in 0..(n % 8) {
        let Some((req, tail)) = rest.split_first_chunk::<8>() else {
            break;
        };
        rest = tail;
        let pid = u32::from(u16::from_le_bytes([req[0], req[1]]));
        let vaddr = u64::from(u32::from_le_bytes([req[2], req[3], req[4], req[5]])) * PAGE_SIZE;
        let nr = u64::from(u16::from_le_bytes([req[6], req[7]]) % 1024);
        if client.request(pid, vaddr, nr, &mut out).is_ok() {
            asked.push_back((pid, vaddr, nr));
        }
    }
    if n & 0x80 != 0 {
        let _ = client.close(n & 0x40 != 0, &mut out);
    }
    for chunk in chunks(rest, seed) {
        client.feed(chunk);
        loop {
            match client.poll() {
                Ok(Some(ClientEvent::Pages(r))) => {
                    let (pid, vaddr, nr) = asked.pop_front().expect("reply without a request");
                    assert_eq!((r.pid, r.vaddr), (pid, vaddr), "reply out of order");
                    assert!(r.nr_pages >= 1 && r.nr_pages <= nr);
                    assert_eq!(r.data.len() as u64, r.nr_pages * PAGE_SIZE);
                }
                Ok(Some(ClientEvent::Closed)) => assert!(asked.is_empty() && client.is_closed()),
                Ok(None) => break,
                Err(e) => {
                    assert_eq!(client.poll(), Err(e));
                    return;
                }
            }
        }
    }
    let _ = client.on_eof();
}

/// Separator between the image files packed into one input of [`criu_images`].
pub const IMAGE_SEPARATOR: &[u8] = b"--PSFZ--";
/// The files of one [`criu_images`] input, in order; pid 1 is the dump's root (CRIU dumps of a
/// process started as init of its own pid namespace).
pub const IMAGE_FILES: [&str; 5] = [
    "inventory.img",
    "pstree.img",
    "pagemap-1.img",
    "mm-1.img",
    "core-1.img",
];

/// Scratch image directory, one per process, reused across inputs.
pub fn scratch_dir() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let base = Path::new("/dev/shm");
        let base = if base.is_dir() {
            base.to_path_buf()
        } else {
            std::env::temp_dir()
        };
        let dir = base.join(format!("pageserv-fuzz-images-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("create the scratch image directory");
        dir
    })
}

/// (b) CRIU image files as pageserv reads them at dst (where the source chose every byte):
/// the input is `inventory, pstree, pagemap-1, mm-1, core-1, pages` separated by
/// [`IMAGE_SEPARATOR`], written as files and read through [`ImageDir`] and the pure decoders.
pub fn criu_images(data: &[u8]) {
    let mut parts: Vec<&[u8]> = Vec::with_capacity(6);
    let mut rest = data;
    while parts.len() < 5 {
        match find(rest, IMAGE_SEPARATOR) {
            Some(i) => {
                parts.push(&rest[..i]);
                rest = &rest[i + IMAGE_SEPARATOR.len()..];
            }
            None => break,
        }
    }
    parts.push(rest);

    // The pure decoders on each part.
    let name = "fuzz.img";
    let part = |i: usize| parts.get(i).copied().unwrap_or_default();
    let pstree = images::decode_pstree(name, part(1));
    let pagemap = images::decode_pagemap(name, part(2));
    let vmas = images::decode_vmas(name, part(3));
    let _ = images::decode_task_state(name, part(4));
    if let Ok(tasks) = &pstree {
        assert!(!tasks.is_empty() && tasks.iter().all(|t| t.pid != 0));
    }
    if let Ok(pm) = &pagemap {
        check_pagemap(pm);
        if let Ok(vmas) = &vmas
            && let Ok(lazy) = images::lazy_ranges(name, name, &pm.entries, vmas)
        {
            for r in lazy {
                assert!(r.nr_pages > 0);
                assert!(vmas.iter().any(|v| v.start <= r.start && r.end() <= v.end));
            }
        }
    }
    if let Ok(vmas) = &vmas {
        assert!(vmas.windows(2).all(|w| w[0].end <= w[1].start));
    }

    // The IO shell over the same bytes as files.
    let dir = scratch_dir();
    clear_dir(dir);
    for (i, file) in IMAGE_FILES.iter().enumerate() {
        if let Some(p) = parts.get(i) {
            std::fs::write(dir.join(file), p).expect("write a scratch image");
        }
    }
    let pages_id = pagemap.as_ref().map_or(1, |pm| pm.pages_id);
    std::fs::write(dir.join(format!("pages-{pages_id}.img")), part(5)).expect("write pages");
    let Ok(img) = ImageDir::open(dir) else {
        return;
    };
    let _ = img.inventory();
    let _ = img.pstree();
    let _ = img.task_state(1);
    let _ = img.lazy_ranges(1);
    let _ = img.shmem_ids();
    if let Ok(reader) = img.page_reader(PagemapId::Pid(1)) {
        // Every PRESENT run is readable (the reader checked the pages file's size), a few
        // pages of it at a time.
        for run in reader.index().runs.clone().iter().take(16) {
            let nr = run.range.nr_pages.min(4);
            let pages = reader
                .read(run.range.start, nr)
                .expect("a PRESENT run the reader accepted is readable");
            assert_eq!(pages.len() as u64, nr * PAGE_SIZE);
        }
        // Reads of arbitrary ranges fail cleanly or return exactly what was asked.
        for e in reader.pagemap().entries.iter().take(16) {
            let nr = e.nr_pages.min(4);
            if let Ok(p) = reader.read(e.vaddr, nr) {
                assert_eq!(p.len() as u64, nr * PAGE_SIZE);
            }
        }
    }
}

fn check_pagemap(pm: &images::Pagemap) {
    for w in pm.entries.windows(2) {
        assert!(w[0].end() <= w[1].vaddr, "pagemap entries overlap");
    }
    let index = PresentIndex::new(pm);
    let mut total = 0;
    for run in &index.runs {
        assert_eq!(run.offset, total);
        total += run.range.len_bytes();
        assert_eq!(index.offset_of(run.range.start), Some(run.offset));
    }
    assert_eq!(index.total_bytes(), total);
}

fn clear_dir(dir: &Path) {
    if let Ok(entries) = std::fs::read_dir(dir) {
        for e in entries.flatten() {
            let _ = std::fs::remove_file(e.path());
        }
    }
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

/// (c) pageserv's own frames (src <-> dst over QUIC): the incremental [`FrameDecoder`]. Every
/// frame it yields must re-encode, and page frames must re-encode to the very bytes received.
pub fn wire(data: &[u8]) {
    let Some((&seed, stream)) = data.split_first() else {
        return;
    };
    let mut dec = FrameDecoder::new();
    let mut consumed = 0usize;
    for chunk in chunks(stream, seed) {
        dec.feed(chunk);
        loop {
            match dec.poll() {
                Ok(Some(frame)) => {
                    let mut out = BytesMut::new();
                    wire::encode(&frame, &mut out).expect("a decoded frame re-encodes");
                    if !matches!(frame, Frame::Control(_)) {
                        // Non-Control frames have one encoding: it is what came in.
                        assert_eq!(&stream[consumed..consumed + out.len()], &out[..]);
                    }
                    let mut again = FrameDecoder::new();
                    again.feed(&out);
                    assert_eq!(again.poll(), Ok(Some(frame.clone())));
                    assert_eq!(again.finish(), Ok(()));
                    consumed += frame_len(&frame, &stream[consumed..]);
                }
                Ok(None) => break,
                Err(e) => {
                    assert_eq!(dec.poll(), Err(e));
                    return;
                }
            }
        }
    }
    let finished = dec.finish();
    assert_eq!(finished.is_ok(), consumed == stream.len());
}

/// Length on the wire of a decoded frame that starts `rest`: header plus the header's
/// `payload_len` field (bytes 20..24), which the decoder checked.
fn frame_len(_frame: &Frame, rest: &[u8]) -> usize {
    let len = u32::from_le_bytes([rest[20], rest[21], rest[22], rest[23]]);
    wire::HEADER_LEN + len as usize
}
