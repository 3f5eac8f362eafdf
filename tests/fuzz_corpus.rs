//! Replays the committed fuzz corpus (tests/fuzz/corpus/<target>/*) through the same target
//! functions cargo-fuzz runs (tests/fuzz/src/lib.rs), on stable, so every `cargo test` checks
//! that no input ever found by fuzzing panics again. The long fuzzing runs are `tools/fuzz`.
//!
//! `write_seeds` (ignored) regenerates the hand-made part of the seed corpus from real data.

#[path = "fuzz/src/lib.rs"]
#[allow(dead_code)]
mod targets;

use std::path::{Path, PathBuf};

use bytes::{Bytes, BytesMut};
use pageserv::criu::page_server::{Layout, ServerDecoder, encode_get_reply};
use pageserv::pb::pageserv::{Control, Hello, ImageChunk, ImagesDone, MemoryWhole, control};
use pageserv::wire::{self, Frame, refuse_reason};

fn corpus(target: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fuzz/corpus")
        .join(target)
}

/// Runs every file of a target's corpus; returns how many there were.
fn replay(target: &str, run: fn(&[u8])) -> usize {
    let dir = corpus(target);
    let mut n = 0;
    for entry in std::fs::read_dir(&dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display())) {
        let path = entry.unwrap().path();
        let data = std::fs::read(&path).unwrap();
        let outcome = std::panic::catch_unwind(|| run(&data));
        assert!(outcome.is_ok(), "{target}: input {} panics", path.display());
        n += 1;
    }
    n
}

#[test]
fn page_server_corpus() {
    assert!(replay("page_server", targets::page_server) >= 5);
}

#[test]
fn criu_images_corpus() {
    assert!(replay("criu_images", targets::criu_images) >= 5);
    let _ = std::fs::remove_dir_all(targets::scratch_dir());
}

#[test]
fn wire_corpus() {
    assert!(replay("wire", targets::wire) >= 5);
}

fn write_seed(target: &str, name: &str, data: &[u8]) {
    let dir = corpus(target);
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join(format!("seed-{name}")), data).unwrap();
}

/// Regenerates the seeds: `cargo test --release --test fuzz_corpus -- --ignored write_seeds`,
/// with `PAGESERV_FUZZ_IMAGE_DIRS` naming real CRIU image directories (colon-separated).
#[test]
#[ignore]
fn write_seeds() {
    // page_server, side "server": the recorded `criu dump --page-server` session, whole and
    // frame by frame (both layouts' selector bit: the recording is 24-byte CRIU 4.1 headers).
    let session =
        std::fs::read(Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/ps-dump-session.bin"))
            .unwrap();
    let mut whole = vec![0u8];
    whole.extend_from_slice(&session);
    write_seed("page_server", "session-v41", &whole);
    let mut dec = ServerDecoder::new(Layout::V41);
    dec.feed(&session);
    let mut start = 0usize;
    let mut i = 0;
    while let Some(_ev) = dec.poll().unwrap() {
        let end = dec.offset() as usize;
        // Frames with more than 4 pages are cut to keep seeds small for the fuzzer.
        if end - start <= 24 + 4 * 4096 {
            let mut seed = vec![4u8 * (i as u8 % 4)];
            seed.extend_from_slice(&session[start..end]);
            write_seed("page_server", &format!("frame-{i:03}"), &seed);
        }
        start = end;
        i += 1;
    }
    // page_server, side "GET client": requests and CRIU-shaped replies in both layouts.
    for (sel, layout) in [(2u8, Layout::V41), (3u8, Layout::V42)] {
        let mut seed = vec![sel, 0x82];
        for (pid, page, nr) in [(1u16, 0x7f00_0000u32, 2u16), (1, 0x5555_0000, 1)] {
            seed.extend_from_slice(&pid.to_le_bytes());
            seed.extend_from_slice(&page.to_le_bytes());
            seed.extend_from_slice(&nr.to_le_bytes());
        }
        let mut out = BytesMut::new();
        let page = vec![0xa5u8; 4096];
        encode_get_reply(layout, 1, 0x7f00_0000 * 4096, &page, &mut out).unwrap();
        encode_get_reply(layout, 1, 0x5555_0000 * 4096, &page, &mut out).unwrap();
        out.extend_from_slice(&0i32.to_le_bytes());
        seed.extend_from_slice(&out);
        write_seed("page_server", &format!("get-replies-{layout:?}"), &seed);
    }

    // wire: every frame kind, alone and as one stream.
    let control = |msg| Frame::Control(Control { msg: Some(msg) });
    let frames = [
        control(control::Msg::Hello(Hello {
            protocol_version: 1,
            role: "src".into(),
            page_size: 4096,
            criu_version: "4.1.1".into(),
            migration_id: "m-1".into(),
            fault_port: 0,
            restore_criu_opts: Vec::new(),
        })),
        control(control::Msg::ImageChunk(ImageChunk {
            name: "pagemap-1.img".into(),
            offset: 0,
            data: Bytes::from_static(&[1, 2, 3, 4]),
            last: true,
            mode: 0o600,
        })),
        control(control::Msg::ImagesDone(ImagesDone {
            files: 12,
            bytes: 4242,
            frozen_at_unix_ns: 1,
            restore_criu_opts: vec!["--tcp-established".into()],
        })),
        control(control::Msg::MemoryWhole(MemoryWhole {
            pages_on_demand: 3,
            pages_pushed: 5,
            pages_zero: 7,
            pages_local: 11,
        })),
        Frame::PageRequest {
            pid: 1,
            vaddr: 0x7f00_0000_0000,
            nr_pages: 16,
        },
        Frame::Pages {
            pid: 1,
            vaddr: 0x7f00_0000_0000,
            nr_pages: 2,
            data: Bytes::from(vec![0x5au8; 8192]),
        },
        Frame::Zero {
            pid: 1,
            vaddr: 0x7f00_0000_2000,
            nr_pages: 4096,
        },
        Frame::Refused {
            pid: 9,
            vaddr: 0x1000,
            nr_pages: 1,
            reason: refuse_reason::NOT_LAZY,
        },
        Frame::PreCopyPages {
            pid: 1,
            vaddr: 0x7f00_0000_4000,
            nr_pages: 1,
            data: Bytes::from(vec![0xa5u8; 4096]),
        },
        Frame::PreCopyZero {
            pid: 1,
            vaddr: 0x7f00_0000_5000,
            nr_pages: 8,
        },
        Frame::Valid {
            pid: 1,
            vaddr: 0x7f00_0000_0000,
            nr_pages: 12,
            bitmap: Bytes::from(vec![0xffu8, 0x0a]),
        },
    ];
    let mut stream = vec![0u8];
    for (i, f) in frames.iter().enumerate() {
        let mut out = BytesMut::new();
        wire::encode(f, &mut out).unwrap();
        stream.extend_from_slice(&out);
        let mut seed = vec![i as u8];
        seed.extend_from_slice(&out);
        write_seed("wire", &format!("frame-{i}"), &seed);
    }
    write_seed("wire", "stream", &stream);

    // criu_images: real dumps (inventory, pstree, pagemap-1, mm-1, core-1, pages).
    let dirs = std::env::var("PAGESERV_FUZZ_IMAGE_DIRS").unwrap_or_default();
    for (d, dir) in dirs.split(':').filter(|d| !d.is_empty()).enumerate() {
        let dir = Path::new(dir);
        let mut seed = Vec::new();
        for (i, file) in targets::IMAGE_FILES.iter().enumerate() {
            if i > 0 {
                seed.extend_from_slice(targets::IMAGE_SEPARATOR);
            }
            seed.extend_from_slice(&std::fs::read(dir.join(file)).unwrap());
        }
        let pages = std::fs::read(dir.join("pages-1.img")).unwrap_or_default();
        // Metadata with no page data (the reader must refuse the short pages file cleanly),
        // and with the first pages, and whole when small.
        for (tag, cut) in [
            ("nopages", 0usize),
            ("4pages", 4 * 4096),
            ("whole", usize::MAX),
        ] {
            if tag == "whole" && pages.len() > 128 << 10 {
                continue;
            }
            let mut s = seed.clone();
            s.extend_from_slice(targets::IMAGE_SEPARATOR);
            s.extend_from_slice(&pages[..cut.min(pages.len())]);
            write_seed("criu_images", &format!("dump{d}-{tag}"), &s);
        }
    }
}
