//! Property and malformed-input tests for the page-server codec.

use bytes::{BufMut, BytesMut};
use proptest::prelude::*;

use super::*;
use crate::criu::PeFlags;
use crate::pages::PAGE_SIZE;

const LAYOUTS: [Layout; 2] = [Layout::V41, Layout::V42];

fn layout() -> impl Strategy<Value = Layout> {
    prop_oneof![Just(Layout::V41), Just(Layout::V42)]
}

fn pagemap_dst() -> impl Strategy<Value = DstId> {
    (
        prop_oneof![Just(PagemapKind::Pid), Just(PagemapKind::Shmem)],
        0..=(u64::MAX >> 8),
    )
        .prop_map(|(kind, id)| DstId::Pagemap { kind, id })
}

/// Every header a well-behaved peer can send, with the dst_id kind its command requires.
fn valid_header() -> impl Strategy<Value = Header> {
    let nr = 0..=MAX_FRAME_PAGES;
    let pagemap_cmd = prop_oneof![
        Just(Command::Add),
        Just(Command::Hole),
        Just(Command::Open),
        Just(Command::Open2),
        Just(Command::Parent),
    ];
    prop_oneof![
        (pagemap_cmd, nr.clone(), any::<u64>(), pagemap_dst()).prop_map(
            |(command, nr_pages, vaddr, dst_id)| Header {
                command,
                flags: PeFlags(0),
                nr_pages,
                vaddr,
                dst_id
            }
        ),
        (0u32..8, nr.clone(), any::<u64>(), pagemap_dst()).prop_map(
            |(flags, nr_pages, vaddr, dst_id)| Header {
                command: Command::AddF,
                flags: PeFlags(flags),
                nr_pages,
                vaddr,
                dst_id
            }
        ),
        (nr, any::<u64>(), any::<u32>()).prop_map(|(nr_pages, vaddr, pid)| Header {
            command: Command::Get,
            flags: PeFlags(0),
            nr_pages,
            vaddr,
            dst_id: DstId::Pid(pid)
        }),
        prop_oneof![Just(Command::Close), Just(Command::ForceClose)].prop_map(|command| Header {
            command,
            flags: PeFlags(0),
            nr_pages: 0,
            vaddr: 0,
            dst_id: DstId::None
        }),
    ]
}

/// Page `i` of a reply for (pid, vaddr): every byte depends on all three, so a misplaced page
/// or an off-by-one split shows up.
fn page_bytes(pid: u32, vaddr: u64, i: u64) -> Vec<u8> {
    let addr = vaddr + i * PAGE_SIZE;
    (0..PAGE_SIZE)
        .map(|b| {
            (addr >> 12)
                .wrapping_mul(31)
                .wrapping_add(u64::from(pid) * 7 + b) as u8
        })
        .collect()
}

fn reply_data(pid: u32, vaddr: u64, n: u64) -> Vec<u8> {
    (0..n).flat_map(|i| page_bytes(pid, vaddr, i)).collect()
}

/// Feeds `bytes` in chunks ending at the (sorted) cut points, polling after each chunk.
fn feed_in_chunks<E>(
    bytes: &[u8],
    cuts: &[usize],
    mut feed: impl FnMut(&[u8]),
    mut poll: impl FnMut() -> Result<Option<E>, PsError>,
) -> Result<Vec<E>, PsError> {
    let mut cuts: Vec<usize> = cuts.iter().map(|c| c % (bytes.len() + 1)).collect();
    cuts.push(bytes.len());
    cuts.sort_unstable();
    let mut events = Vec::new();
    let mut start = 0;
    for cut in cuts {
        feed(&bytes[start..cut]);
        start = cut;
        while let Some(e) = poll()? {
            events.push(e);
        }
    }
    Ok(events)
}

proptest! {
    #[test]
    fn header_round_trip(layout in layout(), h in valid_header()) {
        let mut out = BytesMut::new();
        h.encode(layout, &mut out).unwrap();
        prop_assert_eq!(out.len(), layout.header_len());
        prop_assert_eq!(Header::decode(layout, &out).unwrap(), h);
    }

    #[test]
    fn get_reply_header_round_trip(layout in layout(), pid: u32, vaddr: u64,
                                   nr in 1..=MAX_FRAME_PAGES) {
        let mut out = BytesMut::new();
        encode_get_reply_header(layout, pid, vaddr, nr, &mut out).unwrap();
        let h = Header::decode_get_reply(layout, &out).unwrap();
        prop_assert_eq!(h, Header {
            command: Command::AddF, flags: PeFlags::PRESENT, nr_pages: nr, vaddr,
            dst_id: DstId::Pid(pid),
        });
        let mut again = BytesMut::new();
        h.encode(layout, &mut again).unwrap();
        prop_assert_eq!(again, out);
    }

    /// Whatever decodes re-encodes to a header that decodes the same (the wire form can differ
    /// only in V42 padding and legacy pagemap types).
    #[test]
    fn decode_arbitrary_bytes_is_stable(
        layout in layout(),
        command in prop_oneof![Just(1u16), Just(2), Just(3), Just(4), Just(5), Just(6), Just(7),
                               Just(0x1023), Just(0x1024), any::<u16>()],
        flags in prop_oneof![Just(0u16), 0u16..16, any::<u16>()],
        rest in proptest::collection::vec(any::<u8>(), 0..36),
    ) {
        let mut bytes = (u32::from(command) | (u32::from(flags) << 16)).to_le_bytes().to_vec();
        bytes.extend_from_slice(&rest);
        if let Ok(h) = Header::decode(layout, &bytes) {
            let mut out = BytesMut::new();
            h.encode(layout, &mut out).unwrap();
            prop_assert_eq!(Header::decode(layout, &out).unwrap(), h);
        }
    }

    /// Byte soup never panics either decoder and never makes them buffer beyond one frame.
    #[test]
    fn decoders_survive_garbage(layout in layout(),
                                bytes in proptest::collection::vec(any::<u8>(), 0..300),
                                cuts in proptest::collection::vec(any::<usize>(), 0..5)) {
        let mut server = ServerDecoder::with_max_pages(layout, 4);
        let s = std::cell::RefCell::new(&mut server);
        let _ = feed_in_chunks(&bytes, &cuts, |b| s.borrow_mut().feed(b), || s.borrow_mut().poll());
        prop_assert!(server.read_buf().capacity() <= layout.header_len() + 4 * 4096 + 300);
        let _ = server.on_eof();

        let mut client = GetClient::new(layout);
        let mut sink = BytesMut::new();
        client.request(1, 0x1000, 2, &mut sink).unwrap();
        client.close(false, &mut sink).unwrap();
        let c = std::cell::RefCell::new(&mut client);
        let _ = feed_in_chunks(&bytes, &cuts, |b| c.borrow_mut().feed(b), || c.borrow_mut().poll());
        let _ = client.on_eof();
    }

    /// Random pipelined GETs, replies (possibly clamped) from the server-side encoder, the whole
    /// stream cut at random points: the client gives back exactly the requested pages in order.
    #[test]
    fn client_matches_pipelined_replies(
        layout in layout(),
        reqs in proptest::collection::vec(
            (1u32..5, 0u64..1 << 30, 1u64..=8, 0u64..8), 0..12),
        force in any::<bool>(),
        cuts in proptest::collection::vec(any::<usize>(), 0..8),
    ) {
        let mut client = GetClient::new(layout);
        let mut wire = BytesMut::new();
        let mut expected = Vec::new();
        for &(pid, page, nr, clamp) in &reqs {
            let vaddr = page * PAGE_SIZE;
            client.request(pid, vaddr, nr, &mut wire).unwrap();
            expected.push((pid, vaddr, nr - clamp % nr));
        }
        client.close(force, &mut wire).unwrap();
        prop_assert_eq!(client.outstanding(), reqs.len() + 1);

        // The server side decodes the requests exactly.
        let mut server = ServerDecoder::new(layout);
        server.feed(&wire);
        for &(pid, page, nr, _) in &reqs {
            prop_assert_eq!(server.poll().unwrap(),
                Some(ServerEvent::Get { pid, vaddr: page * PAGE_SIZE, nr_pages: nr }));
        }
        prop_assert_eq!(server.poll().unwrap(), Some(ServerEvent::Close { force }));
        prop_assert_eq!(server.poll().unwrap(), None);
        server.on_eof().unwrap();

        let mut replies = BytesMut::new();
        for &(pid, vaddr, n) in &expected {
            encode_get_reply(layout, pid, vaddr, &reply_data(pid, vaddr, n), &mut replies).unwrap();
        }
        encode_close_reply(&mut replies);

        let c = std::cell::RefCell::new(&mut client);
        let events = feed_in_chunks(&replies, &cuts,
            |b| c.borrow_mut().feed(b), || c.borrow_mut().poll()).unwrap();
        prop_assert_eq!(events.len(), expected.len() + 1);
        for (ev, &(pid, vaddr, n)) in events.iter().zip(&expected) {
            let ClientEvent::Pages(r) = ev else { panic!("expected pages, got {ev:?}") };
            prop_assert_eq!((r.pid, r.vaddr, r.nr_pages), (pid, vaddr, n));
            prop_assert!(r.data == reply_data(pid, vaddr, n), "page data differs");
        }
        prop_assert_eq!(events.last(), Some(&ClientEvent::Closed));
        prop_assert_eq!(client.outstanding(), 0);
        prop_assert!(client.is_closed());
        client.on_eof().unwrap();
    }

    /// A dump-side session (OPEN2, ADD_F runs with and without data, PARENT, CLOSE) split at
    /// random points decodes to the same frames.
    #[test]
    fn server_decodes_dump_session(
        layout in layout(),
        frames in proptest::collection::vec((0u8..4, 1u32..100_000, any::<u32>(), 0u64..5, 0u32..8), 0..12),
        cuts in proptest::collection::vec(any::<usize>(), 0..8),
    ) {
        let mut wire = BytesMut::new();
        let mut expected = Vec::new();
        for &(kind, pid, page, nr, flags) in &frames {
            let id = PagemapId { kind: PagemapKind::Pid, id: u64::from(pid) };
            let vaddr = u64::from(page) * PAGE_SIZE;
            let command = match kind { 0 => Command::Open2, 1 => Command::Parent, _ => Command::AddF };
            let flags = if command == Command::AddF { PeFlags(flags) } else { PeFlags(0) };
            let nr_pages = if command == Command::AddF { nr } else { 0 };
            let h = Header { command, flags, nr_pages, vaddr: if command == Command::AddF { vaddr } else { 0 },
                             dst_id: id.into() };
            h.encode(layout, &mut wire).unwrap();
            expected.push(match command {
                Command::Open2 => ServerEvent::Open { id, want_reply: true },
                Command::Parent => ServerEvent::Parent { id },
                _ => {
                    let data = flags.is_present().then(|| reply_data(pid, vaddr, nr));
                    if let Some(d) = &data { wire.extend_from_slice(d); }
                    ServerEvent::Pages { dst: id, vaddr, nr_pages: nr, flags,
                                         data: data.map(Into::into) }
                }
            });
        }
        GetClient::new(layout).close(false, &mut wire).unwrap();
        expected.push(ServerEvent::Close { force: false });

        let mut server = ServerDecoder::new(layout);
        let s = std::cell::RefCell::new(&mut server);
        let events = feed_in_chunks(&wire, &cuts,
            |b| s.borrow_mut().feed(b), || s.borrow_mut().poll()).unwrap();
        prop_assert_eq!(events, expected);
        prop_assert_eq!(server.offset(), wire.len() as u64);
        server.on_eof().unwrap();
    }
}

#[test]
fn known_wire_bytes() {
    // OPEN2 for pid 1234 in the 24-byte layout: dst_id 0x4D201 (§1.4).
    let mut out = BytesMut::new();
    let open2 = Header {
        command: Command::Open2,
        flags: PeFlags(0),
        nr_pages: 0,
        vaddr: 0,
        dst_id: DstId::Pagemap {
            kind: PagemapKind::Pid,
            id: 1234,
        },
    };
    open2.encode(Layout::V41, &mut out).unwrap();
    let mut want = vec![4, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0];
    want.extend_from_slice(&0x4D201u64.to_le_bytes());
    assert_eq!(&out[..], &want[..]);

    // GET reply in the 32-byte layout: word 0x00040006, padding, nr_pages, vaddr, raw pid.
    let mut out = BytesMut::new();
    encode_get_reply_header(Layout::V42, 42, 0x7f00_0000_0000, 3, &mut out).unwrap();
    let mut want = vec![6, 0, 4, 0, 0, 0, 0, 0];
    want.extend_from_slice(&3u64.to_le_bytes());
    want.extend_from_slice(&0x7f00_0000_0000u64.to_le_bytes());
    want.extend_from_slice(&42u64.to_le_bytes());
    assert_eq!(&out[..], &want[..]);

    let mut out = BytesMut::new();
    GetClient::new(Layout::V41).close(true, &mut out).unwrap();
    assert_eq!(&out[..4], &[0x24, 0x10, 0, 0]);
    assert!(out[4..].iter().all(|&b| b == 0));

    assert_eq!(Layout::for_criu_version(4, 1), Layout::V41);
    assert_eq!(Layout::for_criu_version(3, 19), Layout::V41);
    assert_eq!(Layout::for_criu_version(4, 2), Layout::V42);
    assert_eq!(Layout::for_criu_version(5, 0), Layout::V42);
}

fn raw(layout: Layout, word: u32, nr_pages: u64, vaddr: u64, dst_id: u64) -> BytesMut {
    let mut out = BytesMut::new();
    RawHeader {
        word,
        nr_pages,
        vaddr,
        dst_id,
    }
    .encode(layout, &mut out)
    .unwrap();
    out
}

fn server_error(layout: Layout, bytes: &[u8]) -> PsError {
    let mut s = ServerDecoder::new(layout);
    s.feed(bytes);
    loop {
        match s.poll() {
            Ok(Some(_)) => continue,
            Ok(None) => return s.on_eof().unwrap_err(),
            Err(e) => {
                assert_eq!(s.poll().unwrap_err(), e, "decoder must stay failed");
                return e;
            }
        }
    }
}

#[test]
fn truncated_header_and_frame() {
    for layout in LAYOUTS {
        let full = raw(layout, 6 | (4 << 16), 2, 0x1000, 0x4D201);
        let e = Header::decode(layout, &full[..layout.header_len() - 1]).unwrap_err();
        assert_eq!(
            e,
            PsError::ShortHeader {
                have: layout.header_len() - 1,
                need: layout.header_len()
            }
        );

        // Header complete, data cut short: the decoder waits, EOF names the frame.
        let mut bytes = full.to_vec();
        bytes.extend_from_slice(&[0u8; 4096 + 10]);
        let e = server_error(layout, &bytes);
        let msg = e.to_string();
        assert!(
            matches!(e, PsError::UnexpectedEof { offset, .. } if offset == bytes.len() as u64),
            "{msg}"
        );
        assert!(
            msg.contains(&format!("{} bytes of an incomplete frame", bytes.len())),
            "{msg}"
        );

        // A clean stream that ends without CLOSE.
        let open = raw(layout, 4, 0, 0, 0x4D201);
        let e = server_error(layout, &open);
        assert!(e.to_string().contains("no CLOSE"), "{e}");
    }
}

#[test]
fn unknown_command_names_offset() {
    for layout in LAYOUTS {
        let mut bytes = raw(layout, 4, 0, 0, 0x4D201);
        bytes.extend_from_slice(&raw(layout, 9, 0, 0, 0));
        let e = server_error(layout, &bytes);
        let hl = layout.header_len();
        assert_eq!(
            e,
            PsError::UnknownCommand {
                offset: hl as u64,
                command: 9,
                word: 9
            }
        );
        assert_eq!(
            e.to_string().split(" (").next().unwrap(),
            format!("page-server header at stream offset {hl}: unknown command 0x0009")
        );
    }
}

#[test]
fn absurd_nr_pages_is_refused_before_buffering() {
    for layout in LAYOUTS {
        let e = server_error(
            layout,
            &raw(layout, 6 | (4 << 16), u64::from(u32::MAX), 0, 0x101),
        );
        assert!(
            matches!(e, PsError::TooManyPages { nr_pages, max: MAX_FRAME_PAGES, .. } if nr_pages == u64::from(u32::MAX)),
            "{e}"
        );
        assert!(
            e.to_string().contains("cap of 1048576 pages per frame"),
            "{e}"
        );

        let mut small = ServerDecoder::with_max_pages(layout, 16);
        small.feed(&raw(layout, 6 | (4 << 16), 17, 0, 0x101));
        assert!(matches!(
            small.poll(),
            Err(PsError::TooManyPages { max: 16, .. })
        ));
    }
    assert!(Header::decode(Layout::V42, &raw(Layout::V42, 7, 1 << 40, 0, 1)).is_err());
}

#[test]
fn header_alone_does_not_reserve_its_frame() {
    // Found by fuzzing: a header claiming MAX_FRAME_PAGES made the decoder reserve 4 GiB before
    // any page byte arrived. Capacity must stay within a bounded step of what was received.
    for layout in LAYOUTS {
        let mut s = ServerDecoder::new(layout);
        s.feed(&raw(layout, 6 | (4 << 16), MAX_FRAME_PAGES, 0, 0x101));
        assert_eq!(s.poll(), Ok(None));
        assert!(
            s.read_buf().capacity() <= 16 << 20,
            "{}",
            s.read_buf().capacity()
        );
        s.feed(&vec![0u8; 1 << 20]);
        assert_eq!(s.poll(), Ok(None));
        assert!(
            s.read_buf().capacity() <= 16 << 20,
            "{}",
            s.read_buf().capacity()
        );
    }
}

#[test]
fn flags_and_dst_rules() {
    let l = Layout::V41;
    // CLOSE with flags would not end CRIU's loop: refused.
    let e = server_error(l, &raw(l, 0x1023 | (4 << 16), 0, 0, 0));
    assert!(
        matches!(
            e,
            PsError::FlagsOnCommand {
                command: Command::Close,
                flags: 4,
                ..
            }
        ),
        "{e}"
    );
    let e = server_error(l, &raw(l, 0x1024, 1, 0, 0));
    assert!(matches!(e, PsError::CloseWithFields { .. }), "{e}");
    let e = server_error(l, &raw(l, 6 | (8 << 16), 0, 0, 0x101));
    assert!(matches!(e, PsError::UnknownFlags { unknown: 8, .. }), "{e}");
    let e = server_error(l, &raw(l, 4, 0, 0, (7 << 8) | 3));
    assert!(
        matches!(e, PsError::UnknownPagemapType { ty: 3, .. }),
        "{e}"
    );
    let e = server_error(l, &raw(l, 7, 1, 0, 1 << 32));
    assert!(matches!(e, PsError::BadPid { .. }), "{e}");

    // Legacy dst types decode to the current kinds; GET keeps the raw pid.
    for (ty, kind) in [
        (10, PagemapKind::Pid),
        (17, PagemapKind::Pid),
        (27, PagemapKind::Shmem),
        (34, PagemapKind::Shmem),
    ] {
        let h = Header::decode(l, &raw(l, 3, 0, 0, (99 << 8) | ty)).unwrap();
        assert_eq!(h.dst_id, DstId::Pagemap { kind, id: 99 });
    }
    let h = Header::decode(l, &raw(l, 7, 1, 0x1000, 0x4D201)).unwrap();
    assert_eq!(h.dst_id, DstId::Pid(0x4D201));

    // Legacy ADD carries data and HOLE none.
    let mut bytes = raw(l, 1, 1, 0x2000, 0x501);
    bytes.put_slice(&[7u8; 4096]);
    bytes.put_slice(&raw(l, 2, 3, 0x3000, 0x501));
    bytes.put_slice(&raw(l, 0x1023, 0, 0, 0));
    let mut s = ServerDecoder::new(l);
    s.feed(&bytes);
    let id = PagemapId {
        kind: PagemapKind::Pid,
        id: 5,
    };
    assert!(matches!(s.poll().unwrap(),
        Some(ServerEvent::Pages { dst, flags: PeFlags::PRESENT, data: Some(d), .. }) if dst == id && d.len() == 4096));
    assert_eq!(
        s.poll().unwrap(),
        Some(ServerEvent::Pages {
            dst: id,
            vaddr: 0x3000,
            nr_pages: 3,
            flags: PeFlags::PARENT,
            data: None
        })
    );
    assert_eq!(s.poll().unwrap(), Some(ServerEvent::Close { force: false }));
    s.feed(&[0]);
    assert!(matches!(
        s.poll(),
        Err(PsError::Unsolicited { count: 1, .. })
    ));

    // Encoder refuses what the decoder would refuse.
    let bad = Header {
        command: Command::Close,
        flags: PeFlags::PRESENT,
        nr_pages: 0,
        vaddr: 0,
        dst_id: DstId::None,
    };
    assert!(bad.encode(l, &mut BytesMut::new()).is_err());
    let bad = Header {
        command: Command::Get,
        flags: PeFlags(0),
        nr_pages: 1,
        vaddr: 0,
        dst_id: DstId::Pagemap {
            kind: PagemapKind::Pid,
            id: 1,
        },
    };
    assert!(bad.encode(l, &mut BytesMut::new()).is_err());
}

fn client_with(layout: Layout, reqs: &[(u32, u64, u64)]) -> GetClient {
    let mut c = GetClient::new(layout);
    let mut sink = BytesMut::new();
    for &(pid, vaddr, nr) in reqs {
        c.request(pid, vaddr, nr, &mut sink).unwrap();
    }
    c
}

#[test]
fn reply_out_of_order_is_refused() {
    for layout in LAYOUTS {
        let mut c = client_with(layout, &[(42, 0x10000, 4), (42, 0x20000, 4)]);
        let mut r = BytesMut::new();
        encode_get_reply(layout, 42, 0x20000, &reply_data(42, 0x20000, 4), &mut r).unwrap();
        c.feed(&r);
        let e = c.poll().unwrap_err();
        assert_eq!(
            e,
            PsError::ReplyMismatch {
                offset: 0,
                pid: 42,
                vaddr: 0x10000,
                got_dst_id: 42,
                got_vaddr: 0x20000
            }
        );
        assert!(
            e.to_string()
                .contains("oldest outstanding request is pid 42 vaddr 0x10000"),
            "{e}"
        );
        assert_eq!(c.poll().unwrap_err(), e);

        // Wrong pid, after one good reply: the offset points at the second header.
        let mut c = client_with(layout, &[(42, 0x10000, 1), (42, 0x20000, 1)]);
        let mut r = BytesMut::new();
        encode_get_reply(layout, 42, 0x10000, &reply_data(42, 0x10000, 1), &mut r).unwrap();
        encode_get_reply(layout, 43, 0x20000, &reply_data(43, 0x20000, 1), &mut r).unwrap();
        c.feed(&r);
        assert!(matches!(c.poll().unwrap(), Some(ClientEvent::Pages(_))));
        let e = c.poll().unwrap_err();
        let off = (layout.header_len() + 4096) as u64;
        assert!(
            matches!(e, PsError::ReplyMismatch { offset, got_dst_id: 43, .. } if offset == off),
            "{e}"
        );
    }
}

#[test]
fn reply_page_count_and_command_are_checked() {
    let l = Layout::V41;
    let mut c = client_with(l, &[(42, 0x7f00_0000_0000, 256)]);
    c.feed(&raw(l, 0x40006, 300, 0x7f00_0000_0000, 42));
    let e = c.poll().unwrap_err();
    assert_eq!(
        e.to_string(),
        "GET reply at stream offset 0 for pid 42 vaddr 0x7f0000000000 carries 300 pages, request \
         was 256 (a reply must carry between 1 and the requested count)"
    );

    let mut c = client_with(l, &[(42, 0x1000, 1)]);
    c.feed(&raw(l, 0x40006, 0, 0x1000, 42));
    assert!(matches!(
        c.poll(),
        Err(PsError::ReplyPageCount { got: 0, .. })
    ));

    let mut c = client_with(l, &[(42, 0x1000, 1)]);
    c.feed(&raw(l, 0x60006, 1, 0x1000, 42));
    assert!(matches!(
        c.poll(),
        Err(PsError::ReplyCommand { word: 0x60006, .. })
    ));

    // A short reply (CRIU's clamp) is fine; the caller asks again for the rest.
    let mut c = client_with(l, &[(42, 0x1000, 8)]);
    let mut r = BytesMut::new();
    encode_get_reply(l, 42, 0x1000, &reply_data(42, 0x1000, 3), &mut r).unwrap();
    c.feed(&r);
    assert!(matches!(
        c.poll().unwrap(),
        Some(ClientEvent::Pages(GetReply { nr_pages: 3, .. }))
    ));
}

#[test]
fn client_close_and_eof() {
    let l = Layout::V42;
    let mut c = client_with(l, &[(42, 0x1000, 1)]);
    let mut sink = BytesMut::new();
    c.close(false, &mut sink).unwrap();
    assert!(c.request(42, 0x2000, 1, &mut sink).is_err());
    assert!(c.close(true, &mut sink).is_err());
    // CRIU ends the session without a reply (e.g. GET for an address it does not hold).
    let e = c.on_eof().unwrap_err();
    assert!(
        e.to_string()
            .contains("waiting for the reply to GET pid 42 vaddr 0x1000"),
        "{e}"
    );

    let mut c = GetClient::new(l);
    c.close(false, &mut sink).unwrap();
    c.feed(&(-1i32).to_le_bytes());
    assert!(matches!(
        c.poll(),
        Err(PsError::CloseStatus { status: -1, .. })
    ));

    let mut c = GetClient::new(l);
    c.feed(&[1, 2, 3]);
    assert!(matches!(
        c.poll(),
        Err(PsError::Unsolicited { count: 3, .. })
    ));

    let mut c = GetClient::new(l);
    for bad in [
        (0, 0x1000, 1),
        (1, 0x1001, 1),
        (1, 0x1000, 0),
        (1, 0x1000, MAX_FRAME_PAGES + 1),
        (1, !0xfff, 2),
    ] {
        assert!(
            c.request(bad.0, bad.1, bad.2, &mut sink).is_err(),
            "{bad:?}"
        );
    }
    assert_eq!(c.outstanding(), 0);
}
