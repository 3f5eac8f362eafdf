//! `criu dump --page-server` sends a whole dump to our listener, which answers with the
//! server-side encoders: every frame must decode and the pages must match what the holder wrote.
//! The session is also the fuzz seed `tests/data/ps-dump-session.bin`.

use std::collections::BTreeMap;
use std::fs;
use std::io::{Read, Write};
use std::net::TcpListener;
use std::path::Path;

use bytes::BytesMut;
use pageserv::criu::PeFlags;
use pageserv::criu::page_server::{
    GetClient, Layout, PagemapId, PagemapKind, ServerDecoder, ServerEvent, encode_close_reply,
    encode_open2_reply, encode_parent_reply,
};
use pageserv::pages::PAGE_SIZE;

use crate::environment::{Run, log_tail, scratch_dir, setup, spawn_dump, wait_timeout};
use crate::{Holder, SERIAL, TIMEOUT, layout, page_written, pattern_page, written_pages};

// ----- (a) dump --page-server into our listener ---------------------------------------------------

#[test]
fn dump_session_decodes() {
    let Some(criu) = setup("dump_session_decodes") else {
        return;
    };
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let dir = scratch_dir("dump");
    let holder = Holder::spawn(&dir);
    let (anon_region, anon_total) = holder.anon_pages();
    assert_eq!(
        anon_region,
        written_pages(),
        "holder's region residency (smaps)"
    );

    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let server = std::thread::spawn(move || serve_dump_session(listener));
    let extra = [
        "--page-server",
        "--address",
        "127.0.0.1",
        "--port",
        &port.to_string(),
    ];
    let mut dump = spawn_dump(&criu, &holder, &dir, &extra.map(String::from), &[]);
    let st = wait_timeout(&mut dump, TIMEOUT).expect("criu dump --page-server did not finish");
    let (session, events) = server.join().unwrap();
    assert!(st.success(), "criu dump failed ({st}):\n{}", log_tail(&dir));

    // The frame sequence: per pagemap, OPEN2 then its ADD_F runs, ascending and disjoint.
    let mut runs: BTreeMap<PagemapId, Vec<Run>> = BTreeMap::new();
    let mut region_data: BTreeMap<u64, Vec<u8>> = BTreeMap::new();
    let (mut current, mut present_total, mut closes) = (None, 0u64, 0);
    for ev in &events {
        match ev {
            ServerEvent::Open { id, want_reply } => {
                assert!(want_reply, "CRIU dump sends OPEN2");
                current = Some(*id);
            }
            ServerEvent::Pages {
                dst,
                vaddr,
                nr_pages,
                flags,
                data,
            } => {
                assert_eq!(Some(*dst), current, "ADD_F for a pagemap not opened");
                let r = runs.entry(*dst).or_default();
                if let Some(prev) = r.last() {
                    let prev_end = prev.vaddr + prev.nr_pages * PAGE_SIZE;
                    assert!(*vaddr >= prev_end, "runs overlap or go backwards");
                }
                r.push(Run {
                    vaddr: *vaddr,
                    nr_pages: *nr_pages,
                    flags: *flags,
                });
                assert_eq!(flags.is_present(), data.is_some());
                if let Some(d) = data {
                    assert_eq!(d.len() as u64, nr_pages * PAGE_SIZE);
                    present_total += nr_pages;
                    if dst.kind == PagemapKind::Pid && dst.id == u64::from(holder.vpid) {
                        for p in 0..*nr_pages {
                            if let Some(i) = holder.region_page(vaddr + p * PAGE_SIZE) {
                                let o = (p * PAGE_SIZE) as usize;
                                region_data.insert(i, d[o..o + PAGE_SIZE as usize].to_vec());
                            }
                        }
                    }
                }
            }
            ServerEvent::Close { force } => {
                assert!(!force, "TCP session ends with CLOSE");
                closes += 1;
            }
            other => panic!("unexpected frame in a dump session: {other:?}"),
        }
    }
    assert_eq!(closes, 1);
    assert!(matches!(events.last(), Some(ServerEvent::Close { .. })));
    assert!(present_total > 0);
    let holder_pagemap = PagemapId {
        kind: PagemapKind::Pid,
        id: u64::from(holder.vpid),
    };
    let mine = runs.get(&holder_pagemap).expect("holder's pagemap");
    // A normal dump transfers every page; lazy-capable ones are flagged LAZY|PRESENT.
    for r in mine {
        let ok = r.flags == PeFlags::PRESENT || r.flags == PeFlags::LAZY | PeFlags::PRESENT;
        assert!(ok, "flags {:?} at {:#x}+{}", r.flags, r.vaddr, r.nr_pages);
    }
    let region_runs = mine
        .iter()
        .filter(|r| holder.region_page(r.vaddr).is_some())
        .count();
    assert_eq!(
        region_data.len() as u64,
        written_pages(),
        "PRESENT pages in the holder's region"
    );
    for (i, data) in &region_data {
        assert!(
            page_written(*i),
            "page {i} was never written but was dumped"
        );
        assert!(
            *data == pattern_page(*i),
            "page {i} differs from the pattern"
        );
    }
    eprintln!(
        "dump session: {} bytes, {} frames; pagemaps {:?}; {present_total} PRESENT pages in total \
         (smaps Anonymous of the holder: {anon_total} pages); region: {} pages in {region_runs} runs",
        session.len(),
        events.len(),
        runs.keys().collect::<Vec<_>>(),
        region_data.len()
    );

    save_session_seed(&session);
    fs::remove_dir_all(&dir).unwrap();
}

/// Accepts one `criu dump --page-server` connection, answers like a page server without a parent
/// image set, and returns the raw session bytes and the decoded frames.
fn serve_dump_session(listener: TcpListener) -> (Vec<u8>, Vec<ServerEvent>) {
    listener.set_nonblocking(false).unwrap();
    let (mut sock, _) = listener.accept().unwrap();
    sock.set_read_timeout(Some(TIMEOUT)).unwrap();
    let mut dec = ServerDecoder::new(layout());
    let (mut session, mut events, mut buf) = (Vec::new(), Vec::new(), vec![0u8; 1 << 16]);
    loop {
        let n = sock.read(&mut buf).expect("reading the dump session");
        if n == 0 {
            dec.on_eof().expect("dump session ended cleanly");
            return (session, events);
        }
        session.extend_from_slice(&buf[..n]);
        dec.feed(&buf[..n]);
        while let Some(ev) = dec.poll().expect("decoding the dump session") {
            let mut reply = BytesMut::new();
            match &ev {
                ServerEvent::Open {
                    want_reply: true, ..
                } => encode_open2_reply(false, &mut reply),
                ServerEvent::Parent { .. } => encode_parent_reply(false, &mut reply),
                ServerEvent::Close { .. } => encode_close_reply(&mut reply),
                _ => {}
            }
            sock.write_all(&reply).unwrap();
            events.push(ev);
        }
    }
}

/// Stores the session (or a prefix cut at a frame boundary, with CLOSE appended, if it is over
/// 2 MiB) as a fuzz seed when `PAGESERV_SAVE_SESSION` is set; always checks the stored seed still
/// decodes.
fn save_session_seed(session: &[u8]) {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/ps-dump-session.bin");
    // The committed seed was recorded from CRIU 4.1.1: it is replayed (and re-recorded) only
    // in that layout.
    if std::env::var_os("PAGESERV_SAVE_SESSION").is_some() && layout() == Layout::V41 {
        let limit = 2 << 20;
        let seed = if session.len() < limit {
            session.to_vec()
        } else {
            let mut dec = ServerDecoder::new(layout());
            let mut cut = 0;
            for chunk in session.chunks(4096) {
                dec.feed(chunk);
                while dec.poll().unwrap().is_some() {
                    if dec.offset() as usize <= limit - layout().header_len() {
                        cut = dec.offset() as usize;
                    }
                }
            }
            let mut seed = session[..cut].to_vec();
            let mut close = BytesMut::new();
            GetClient::new(layout()).close(false, &mut close).unwrap();
            seed.extend_from_slice(&close);
            seed
        };
        fs::create_dir_all(path.parent().unwrap()).unwrap();
        fs::write(&path, &seed).unwrap();
        eprintln!(
            "saved {} bytes of session to {}",
            seed.len(),
            path.display()
        );
    }
    if let Ok(seed) = fs::read(&path) {
        let mut dec = ServerDecoder::new(Layout::V41);
        dec.feed(&seed);
        while dec.poll().unwrap().is_some() {}
        dec.on_eof().unwrap();
    }
}
