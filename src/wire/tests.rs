use super::*;
use crate::pb::pageserv::{Abort, Hello, ImageChunk, MemoryWhole, control::Msg};
use proptest::prelude::*;

fn control(msg: Msg) -> Frame {
    Frame::Control(Control { msg: Some(msg) })
}

fn encode_all(frames: &[Frame]) -> BytesMut {
    let mut out = BytesMut::new();
    for f in frames {
        encode(f, &mut out).unwrap();
    }
    out
}

/// Feeds `bytes` in pieces of the given sizes (cycled), polling after each piece.
fn decode_split(
    bytes: &[u8],
    splits: &[usize],
    via_read_buf: bool,
) -> Result<Vec<Frame>, WireError> {
    let mut d = FrameDecoder::new();
    let mut frames = Vec::new();
    let mut rest = bytes;
    let mut i = 0;
    while !rest.is_empty() {
        let n = splits
            .get(i % splits.len().max(1))
            .copied()
            .unwrap_or(rest.len());
        let n = n.clamp(1, rest.len());
        i += 1;
        if via_read_buf {
            d.read_buf().extend_from_slice(&rest[..n]);
        } else {
            d.feed(&rest[..n]);
        }
        rest = &rest[n..];
        while let Some(f) = d.poll()? {
            frames.push(f);
        }
    }
    d.finish()?;
    Ok(frames)
}

fn page_data(nr_pages: u32, seed: u8) -> Bytes {
    (0..nr_pages as usize * PAGE_SIZE as usize)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
        .collect::<Vec<u8>>()
        .into()
}

fn arb_control() -> impl Strategy<Value = Frame> {
    prop_oneof![
        (any::<u32>(), "[a-z]{0,8}", any::<u32>()).prop_map(|(v, role, ps)| control(Msg::Hello(
            Hello {
                protocol_version: v,
                role,
                page_size: ps,
                criu_version: "4.1.1".into(),
                migration_id: String::new(),
                fault_port: 0,
                restore_criu_opts: vec!["--tcp-established".into()],
            }
        ))),
        (
            "[a-z./-]{0,12}",
            any::<u64>(),
            prop::collection::vec(any::<u8>(), 0..300),
            any::<bool>()
        )
            .prop_map(
                |(name, offset, data, last)| control(Msg::ImageChunk(ImageChunk {
                    name,
                    offset,
                    data: data.into(),
                    last,
                    mode: 0o600,
                }))
            ),
        (any::<u64>(), any::<u64>()).prop_map(|(a, b)| control(Msg::MemoryWhole(MemoryWhole {
            pages_on_demand: a,
            pages_pushed: b,
            pages_zero: 0,
            pages_local: a / 2,
        }))),
        ".{0,20}".prop_map(|reason| control(Msg::Abort(Abort { reason }))),
        Just(Frame::Control(Control { msg: None })),
    ]
}

/// (pid, page-aligned vaddr, nr_pages) that keep the range inside the address space.
fn arb_range(max_pages: u32) -> impl Strategy<Value = (u32, u64, u32)> {
    (any::<u32>(), 0u64..(1 << 40), 1..=max_pages).prop_map(|(p, page, n)| (p, page * PAGE_SIZE, n))
}

fn arb_frame() -> impl Strategy<Value = Frame> {
    prop_oneof![
        arb_control(),
        arb_range(MAX_FRAME_PAGES).prop_map(|(pid, vaddr, nr_pages)| Frame::PageRequest {
            pid,
            vaddr,
            nr_pages
        }),
        (arb_range(3), any::<u8>()).prop_map(|((pid, vaddr, nr_pages), seed)| Frame::Pages {
            pid,
            vaddr,
            nr_pages,
            data: page_data(nr_pages, seed),
        }),
        arb_range(MAX_FRAME_PAGES).prop_map(|(pid, vaddr, nr_pages)| Frame::Zero {
            pid,
            vaddr,
            nr_pages
        }),
        (arb_range(MAX_FRAME_PAGES), any::<u16>()).prop_map(|((pid, vaddr, nr_pages), reason)| {
            Frame::Refused {
                pid,
                vaddr,
                nr_pages,
                reason,
            }
        }),
        (arb_range(3), any::<u8>()).prop_map(|((pid, vaddr, nr_pages), seed)| {
            Frame::PreCopyPages {
                pid,
                vaddr,
                nr_pages,
                data: page_data(nr_pages, seed),
            }
        }),
        arb_range(MAX_FRAME_PAGES).prop_map(|(pid, vaddr, nr_pages)| Frame::PreCopyZero {
            pid,
            vaddr,
            nr_pages
        }),
        (arb_range(MAX_FRAME_PAGES), any::<u64>()).prop_map(|((pid, vaddr, nr_pages), seed)| {
            Frame::Valid {
                pid,
                vaddr,
                nr_pages,
                bitmap: valid_bitmap(nr_pages, seed),
            }
        }),
    ]
}

/// A pseudo-random Valid bitmap for `nr_pages` with no bit past the last page.
fn valid_bitmap(nr_pages: u32, seed: u64) -> Bytes {
    let mut x = seed | 1;
    let mut bytes: Vec<u8> = (0..valid_bitmap_len(nr_pages))
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect();
    if !nr_pages.is_multiple_of(8)
        && let Some(last) = bytes.last_mut()
    {
        *last &= (1u8 << (nr_pages % 8)) - 1;
    }
    bytes.into()
}

proptest! {
    #[test]
    fn any_frames_in_any_splits_round_trip(
        frames in prop::collection::vec(arb_frame(), 0..12),
        splits in prop::collection::vec(1usize..5000, 1..20),
        via_read_buf in any::<bool>(),
    ) {
        let bytes = encode_all(&frames);
        let got = decode_split(&bytes, &splits, via_read_buf).unwrap();
        prop_assert_eq!(got, frames);
    }

    #[test]
    fn arbitrary_bytes_never_panic(
        bytes in prop::collection::vec(any::<u8>(), 0..4000),
        splits in prop::collection::vec(1usize..100, 1..10),
    ) {
        let _ = decode_split(&bytes, &splits, false);
    }

    #[test]
    fn corrupted_streams_never_panic(
        frames in prop::collection::vec(arb_frame(), 1..6),
        flips in prop::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..8),
        splits in prop::collection::vec(1usize..3000, 1..10),
    ) {
        let mut bytes = encode_all(&frames).to_vec();
        for (at, v) in flips {
            let i = at.index(bytes.len());
            bytes[i] = v;
        }
        let _ = decode_split(&bytes, &splits, true);
    }
}

fn header(kind: u16, flags: u16, pid: u32, vaddr: u64, nr_pages: u32, payload_len: u32) -> Vec<u8> {
    let mut v = Vec::new();
    v.extend_from_slice(&kind.to_le_bytes());
    v.extend_from_slice(&flags.to_le_bytes());
    v.extend_from_slice(&pid.to_le_bytes());
    v.extend_from_slice(&vaddr.to_le_bytes());
    v.extend_from_slice(&nr_pages.to_le_bytes());
    v.extend_from_slice(&payload_len.to_le_bytes());
    v
}

/// Decodes one valid Zero frame, then `bad`; returns the error for `bad`.
fn error_after_one_frame(bad: &[u8]) -> WireError {
    let mut bytes = encode_all(&[Frame::Zero {
        pid: 1,
        vaddr: 0x1000,
        nr_pages: 1,
    }])
    .to_vec();
    bytes.extend_from_slice(bad);
    let mut d = FrameDecoder::new();
    d.feed(&bytes);
    assert!(matches!(d.poll(), Ok(Some(Frame::Zero { .. }))));
    let e = d.poll().unwrap_err();
    // The decoder stays failed.
    assert_eq!(d.poll().unwrap_err(), e);
    e
}

#[test]
fn header_layout_is_little_endian_24_bytes() {
    let mut out = BytesMut::new();
    let f = Frame::Refused {
        pid: 0x0102_0304,
        vaddr: 0x7f00_0000_1000,
        nr_pages: 3,
        reason: refuse_reason::UNKNOWN_PID,
    };
    encode(&f, &mut out).unwrap();
    let mut expect = header(5, 0, 0x0102_0304, 0x7f00_0000_1000, 3, 2);
    expect.extend_from_slice(&2u16.to_le_bytes());
    assert_eq!(&out[..], &expect[..]);
}

#[test]
fn unknown_kind_names_offset_and_field() {
    let e = error_after_one_frame(&header(99, 0, 0, 0, 0, 0));
    assert_eq!(
        e,
        WireError::UnknownKind {
            offset: 24,
            kind: 99
        }
    );
    let msg = e.to_string();
    assert!(msg.contains("offset 24") && msg.contains("`kind`"), "{msg}");
}

#[test]
fn bad_header_fields_are_named() {
    let cases: &[(Vec<u8>, &str)] = &[
        (header(4, 1, 1, 0x1000, 1, 0), "flags"),
        (header(2, 0, 1, 0x1001, 1, 0), "vaddr"),
        (header(2, 0, 1, 0x1000, 0, 0), "nr_pages"),
        (header(3, 0, 1, 0x1000, 4097, 4097 * 4096), "nr_pages"),
        (header(3, 0, 1, 0x1000, 2, 4096), "payload_len"),
        (header(4, 0, 1, 0x1000, 1, 8), "payload_len"),
        (header(5, 0, 1, 0x1000, 1, 0), "payload_len"),
        (header(1, 0, 0, 0, 0, MAX_CONTROL_LEN + 1), "payload_len"),
        (header(1, 0, 7, 0, 0, 0), "pid"),
        (header(2, 0, 1, u64::MAX - 4095, 2, 0), "nr_pages"),
    ];
    for (bytes, field) in cases {
        match error_after_one_frame(bytes) {
            WireError::BadField {
                offset, field: f, ..
            } => {
                assert_eq!(offset, 24);
                assert_eq!(f, *field);
            }
            other => panic!("expected BadField({field}), got {other:?}"),
        }
    }
}

#[test]
fn header_is_rejected_before_its_payload_arrives() {
    // A 4 GiB payload claim must fail at once, not wait for (or buffer) the payload.
    let mut d = FrameDecoder::new();
    d.feed(&header(1, 0, 0, 0, 0, u32::MAX));
    assert!(matches!(
        d.poll(),
        Err(WireError::BadField {
            field: "payload_len",
            ..
        })
    ));
}

#[test]
fn garbage_control_payload_is_an_error() {
    let mut bytes = header(1, 0, 0, 0, 0, 3);
    bytes.extend_from_slice(&[0xff, 0xff, 0xff]);
    let mut d = FrameDecoder::new();
    d.feed(&bytes);
    assert!(matches!(
        d.poll(),
        Err(WireError::BadControl {
            offset: 0,
            len: 3,
            ..
        })
    ));
}

#[test]
fn truncated_stream_is_reported_by_finish() {
    let bytes = encode_all(&[Frame::Pages {
        pid: 1,
        vaddr: 0,
        nr_pages: 2,
        data: page_data(2, 0),
    }]);
    let mut d = FrameDecoder::new();
    d.feed(&bytes[..100]);
    assert_eq!(d.poll(), Ok(None));
    assert_eq!(d.wanted(), 8192 - 76);
    assert_eq!(
        d.finish(),
        Err(WireError::Truncated {
            offset: 0,
            have: 100,
            need: 24 + 8192
        })
    );
    let mut d = FrameDecoder::new();
    d.feed(&bytes[..10]);
    assert!(matches!(
        d.finish(),
        Err(WireError::Truncated {
            have: 10,
            need: 24,
            ..
        })
    ));
    assert_eq!(FrameDecoder::new().finish(), Ok(()));
}

#[test]
fn encode_refuses_frames_the_peer_would_reject() {
    let mut out = BytesMut::new();
    let bad = [
        Frame::Pages {
            pid: 1,
            vaddr: 0,
            nr_pages: 2,
            data: page_data(1, 0),
        },
        Frame::PageRequest {
            pid: 1,
            vaddr: 12,
            nr_pages: 1,
        },
        Frame::Zero {
            pid: 1,
            vaddr: 0,
            nr_pages: MAX_FRAME_PAGES + 1,
        },
        control(Msg::ImageChunk(ImageChunk {
            data: vec![0u8; MAX_CONTROL_LEN as usize].into(),
            ..Default::default()
        })),
    ];
    for f in &bad {
        assert!(
            matches!(encode(f, &mut out), Err(WireError::Unencodable { .. })),
            "{f:?}"
        );
        assert!(out.is_empty(), "nothing written for {f:?}");
    }
    assert!(encode_data_header(PageData::Pages, 1, 0, 0, &mut out).is_err());
}

#[test]
fn data_header_plus_data_equals_the_frame() {
    for (kind, code) in [(PageData::Pages, 3u16), (PageData::PreCopyPages, 16)] {
        let data = page_data(2, 9);
        let mut a = BytesMut::new();
        encode_data_header(kind, 3, 0x2000, 2, &mut a).unwrap();
        a.extend_from_slice(&data);
        let f = match kind {
            PageData::Pages => Frame::Pages {
                pid: 3,
                vaddr: 0x2000,
                nr_pages: 2,
                data,
            },
            PageData::PreCopyPages => Frame::PreCopyPages {
                pid: 3,
                vaddr: 0x2000,
                nr_pages: 2,
                data,
            },
        };
        let mut b = BytesMut::new();
        encode(&f, &mut b).unwrap();
        assert_eq!(a, b, "{kind:?}");
        assert_eq!(&a[..2], &code.to_le_bytes());
    }
}

#[test]
fn valid_bitmaps_are_checked_both_ways() {
    // 10 pages: 2 bytes, bits 10..16 must be clear.
    let mut out = BytesMut::new();
    let bad = Frame::Valid {
        pid: 1,
        vaddr: 0x1000,
        nr_pages: 10,
        bitmap: Bytes::from_static(&[0xff, 0x07]),
    };
    assert!(matches!(
        encode(&bad, &mut out),
        Err(WireError::Unencodable {
            field: "bitmap",
            ..
        })
    ));
    let short = Frame::Valid {
        pid: 1,
        vaddr: 0x1000,
        nr_pages: 10,
        bitmap: Bytes::from_static(&[0xff]),
    };
    assert!(encode(&short, &mut out).is_err());
    assert!(out.is_empty());
    let mut bytes = header(18, 0, 1, 0x1000, 10, 2);
    bytes.extend_from_slice(&[0xff, 0x07]);
    match error_after_one_frame(&bytes) {
        WireError::BadField { field, .. } => assert_eq!(field, "bitmap"),
        other => panic!("expected a bitmap error, got {other:?}"),
    }
    let mut bytes = header(18, 0, 1, 0x1000, 10, 1);
    bytes.push(0xff);
    match error_after_one_frame(&bytes) {
        WireError::BadField { field, .. } => assert_eq!(field, "payload_len"),
        other => panic!("expected a payload_len error, got {other:?}"),
    }
}

#[test]
fn a_payload_owns_no_room_grown_for_the_frames_after_it() {
    // Two 256 KiB Pages frames fed in QUIC-sized chunks, one chunk carrying the end of the first
    // and the start of the second: the first payload's allocation must end where the payload
    // does (before the fix it was doubled to 512 KiB, twice the memory a queue of frames
    // was sized for).
    let frames: Vec<Frame> = (0..2u8)
        .map(|i| Frame::Pages {
            pid: 1,
            vaddr: u64::from(i) * 64 * PAGE_SIZE,
            nr_pages: 64,
            data: page_data(64, i),
        })
        .collect();
    let bytes = encode_all(&frames);
    let mut d = FrameDecoder::new();
    let mut got = Vec::new();
    for chunk in bytes.chunks(1_400) {
        d.feed(chunk);
        while let Some(f) = d.poll().unwrap() {
            got.push(f);
        }
    }
    d.finish().unwrap();
    assert_eq!(got, frames);
    let Some(Frame::Pages { data, .. }) = got.into_iter().next() else {
        unreachable!()
    };
    let len = data.len();
    // The decoder has moved on to a buffer of its own, so the payload is its allocation's
    // only owner.
    let owned = data
        .try_into_mut()
        .expect("the decoder still shares the first payload's allocation");
    assert!(
        owned.capacity() - len < HEADER_LEN + 1_400,
        "{} bytes of room after a {len}-byte payload",
        owned.capacity() - len
    );
}
