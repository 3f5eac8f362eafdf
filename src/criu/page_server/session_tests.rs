//! The page-server session against generated dump and pre-dump sessions: the images it writes
//! (through the same writer `pageserv dst` uses) read back with [`ImageDir`], through parents.

use std::path::{Path, PathBuf};

use bytes::BytesMut;
use proptest::prelude::*;

use super::*;
use crate::criu::PeFlags;
use crate::criu::images::{ImageDir, MapEntry, PagemapId};
use crate::criu::page_server::writer::DirWriter;
use crate::criu::page_server::{
    Command, DstId, Header, Layout, PagemapId as WireId, PagemapKind, ServerDecoder,
};
use crate::pages::PAGE_SIZE;

const P: PeFlags = PeFlags::PRESENT;
const LP: PeFlags = PeFlags(6);
const L: PeFlags = PeFlags::LAZY;
const H: PeFlags = PeFlags::PARENT;

fn tmp(tag: &str) -> PathBuf {
    use std::sync::atomic::{AtomicU32, Ordering};
    static N: AtomicU32 = AtomicU32::new(0);
    let d = std::env::temp_dir().join(format!(
        "pageserv-session-{}-{tag}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    ));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// Content of page `vaddr` in generation `version`: differs per page and per generation.
fn page(version: u8, vaddr: u64) -> Vec<u8> {
    (0..PAGE_SIZE)
        .map(|i| {
            (vaddr >> 12)
                .wrapping_mul(131)
                .wrapping_add(i * 7 + u64::from(version) * 61) as u8
        })
        .collect()
}

fn pages(version: u8, vaddr: u64, n: u64) -> Vec<u8> {
    (0..n)
        .flat_map(|i| page(version, vaddr + i * PAGE_SIZE))
        .collect()
}

/// Builds the byte stream a dumping CRIU sends.
struct Client {
    layout: Layout,
    out: BytesMut,
}

impl Client {
    fn new(layout: Layout) -> Self {
        Client {
            layout,
            out: BytesMut::new(),
        }
    }
    fn cmd(&mut self, command: Command, id: PagemapId, vaddr: u64, nr: u64, flags: PeFlags) {
        let (kind, id) = match id {
            PagemapId::Pid(p) => (PagemapKind::Pid, u64::from(p)),
            PagemapId::Shmem(s) => (PagemapKind::Shmem, s),
        };
        Header {
            command,
            flags,
            nr_pages: nr,
            vaddr,
            dst_id: DstId::Pagemap { kind, id },
        }
        .encode(self.layout, &mut self.out)
        .unwrap();
    }
    fn open2(&mut self, id: PagemapId) {
        self.cmd(Command::Open2, id, 0, 0, PeFlags(0));
    }
    fn parent(&mut self, id: PagemapId) {
        self.cmd(Command::Parent, id, 0, 0, PeFlags(0));
    }
    fn add(&mut self, id: PagemapId, vaddr: u64, nr: u64, flags: PeFlags, version: u8) {
        self.cmd(Command::AddF, id, vaddr, nr, flags);
        if flags.is_present() {
            self.out.extend_from_slice(&pages(version, vaddr, nr));
        }
    }
    fn close(&mut self, force: bool) {
        Header {
            command: if force {
                Command::ForceClose
            } else {
                Command::Close
            },
            flags: PeFlags(0),
            nr_pages: 0,
            vaddr: 0,
            dst_id: DstId::None,
        }
        .encode(self.layout, &mut self.out)
        .unwrap();
    }
}

/// What serving a session produced: the replies in order, and whether CLOSE was reached.
struct Served {
    replies: Vec<u8>,
    closed: bool,
    summary: SessionSummary,
}

/// Feeds `bytes` in `chunk`-sized pieces through the decoder and the session into `dir`.
fn serve(
    layout: Layout,
    bytes: &[u8],
    chunk: usize,
    parent: ParentSet,
    dir: &Path,
) -> Result<Served, String> {
    let mut dec = ServerDecoder::new(layout);
    let mut session = ImageSession::new(parent);
    let mut writer = DirWriter::new(dir);
    let mut replies = Vec::new();
    let mut closed = false;
    let mut outs = Vec::new();
    for piece in bytes.chunks(chunk.max(1)) {
        dec.feed(piece);
        while let Some(ev) = dec.poll().map_err(|e| e.to_string())? {
            outs.clear();
            session.handle(ev, &mut outs).map_err(|e| e.to_string())?;
            for o in &outs {
                writer.apply(o).map_err(|e| e.to_string())?;
                match o {
                    Output::Reply(r) => replies.extend_from_slice(r),
                    Output::Closed { .. } => closed = true,
                    _ => {}
                }
            }
        }
    }
    dec.on_eof().map_err(|e| e.to_string())?;
    writer.finish();
    Ok(Served {
        replies,
        closed,
        summary: session.summary().clone(),
    })
}

/// The parent set CRIU's page server would see behind `dir/parent`.
fn parent_of(dir: &Path) -> ParentSet {
    let d = ImageDir::open(dir).unwrap();
    let mut p = ParentSet::none();
    for e in std::fs::read_dir(dir).unwrap() {
        let name = e.unwrap().file_name().into_string().unwrap();
        let id = name
            .strip_prefix("pagemap-")
            .and_then(|n| n.strip_suffix(".img"))
            .map(|n| match n.strip_prefix("shmem-") {
                Some(s) => PagemapId::Shmem(s.parse().unwrap()),
                None => PagemapId::Pid(n.parse().unwrap()),
            });
        if let Some(id) = id {
            p.insert(id, d.pagemap_of(id).unwrap().entries);
        }
    }
    p
}

fn link_parent(dir: &Path, parent: &Path) {
    let name = parent.file_name().unwrap();
    std::os::unix::fs::symlink(Path::new("..").join(name), dir.join("parent")).unwrap();
}

fn read(dir: &Path, pid: u32, vaddr: u64, n: u64) -> Vec<u8> {
    ImageDir::open(dir)
        .unwrap()
        .page_reader(PagemapId::Pid(pid))
        .unwrap()
        .read(vaddr, n)
        .unwrap()
}

const PID: u32 = 1;
const BASE: u64 = 0x7f00_0000_0000;

/// A pre-dump (no parent), then a second pre-dump and a dump, each with holes for the pages that
/// did not change since the previous one, as CRIU sends them with `--track-mem`
/// `--prev-images-dir ../N`. Every page must read back as its newest version through the chain.
#[test]
fn predump_chain_resolves_through_parents() {
    let root = tmp("chain");
    let (d1, d2, d3) = (root.join("1"), root.join("2"), root.join("3"));
    for d in [&d1, &d2, &d3] {
        std::fs::create_dir_all(d).unwrap();
    }
    let pm = PagemapId::Pid(PID);
    let sh = PagemapId::Shmem(77);
    let at = |i: u64| BASE + i * PAGE_SIZE;

    // Pre-dump 1: PARENT query (no parent: 0), shmem, then the task's memory after resume.
    let mut c = Client::new(Layout::V41);
    c.parent(pm);
    c.open2(sh);
    c.add(sh, 0, 4, P, 1);
    c.open2(pm);
    c.add(pm, at(0), 16, LP, 1);
    c.add(pm, at(20), 4, P, 1);
    c.close(false);
    let s1 = serve(Layout::V41, &c.out, 4096 * 3 + 5, parent_of(&d1), &d1).unwrap();
    assert!(s1.closed);
    // PARENT int 0, shmem OPEN2 byte 0, pid OPEN2 byte 0.
    assert_eq!(s1.replies, [0, 0, 0, 0, 0, 0]);

    // Pre-dump 2: pages 4..8 changed; the rest are holes.
    link_parent(&d2, &d1);
    let mut c = Client::new(Layout::V41);
    c.parent(pm);
    c.open2(sh);
    c.add(sh, 0, 4, H, 0);
    c.open2(pm);
    c.add(pm, at(0), 4, H, 0);
    c.add(pm, at(4), 4, LP, 2);
    c.add(pm, at(8), 8, H, 0);
    c.add(pm, at(20), 4, H, 0);
    c.close(false);
    let s2 = serve(Layout::V41, &c.out, 1000, parent_of(&d1), &d2).unwrap();
    // PARENT int 1, shmem OPEN2 1, pid OPEN2 1.
    assert_eq!(s2.replies, [1, 0, 0, 0, 1, 1]);
    assert_eq!(s2.summary.pages_parent, 4 + 4 + 8 + 4);

    // The dump: page 6 and 21 changed again, a new run appeared at 30; the hole over 0..6 spans
    // a hole and a present run of the parent, which is allowed.
    link_parent(&d3, &d2);
    let mut c = Client::new(Layout::V42);
    c.open2(pm);
    c.add(pm, at(0), 6, H, 0);
    c.add(pm, at(6), 1, LP, 3);
    c.add(pm, at(7), 9, H, 0);
    c.add(pm, at(20), 1, H, 0);
    c.add(pm, at(21), 1, P, 3);
    c.add(pm, at(22), 2, H, 0);
    c.add(pm, at(30), 2, L, 0);
    c.open2(sh);
    c.add(sh, 0, 4, H, 0);
    c.close(true);
    let s3 = serve(Layout::V42, &c.out, 7, parent_of(&d2), &d3).unwrap();
    assert_eq!(s3.replies, [1, 1]);

    // What CRIU's page server would have written: one entry per ADD_F, pages ids from 0x10001 in
    // OPEN order, pages files holding exactly the PRESENT runs.
    let img = ImageDir::open(&d3).unwrap();
    let got = img.pagemap(PID).unwrap();
    assert_eq!(got.pages_id, FIRST_PAGES_ID);
    let e = |vaddr, nr_pages, flags| MapEntry {
        vaddr,
        nr_pages,
        flags,
    };
    assert_eq!(
        got.entries,
        vec![
            e(at(0), 6, H),
            e(at(6), 1, LP),
            e(at(7), 9, H),
            e(at(20), 1, H),
            e(at(21), 1, P),
            e(at(22), 2, H),
            e(at(30), 2, L),
        ]
    );
    assert_eq!(img.pagemap_of(sh).unwrap().pages_id, FIRST_PAGES_ID + 1);
    assert_eq!(img.pages_file_len(FIRST_PAGES_ID).unwrap(), 2 * PAGE_SIZE);
    assert_eq!(img.pages_file_len(FIRST_PAGES_ID + 1).unwrap(), 0);
    assert_eq!(
        ImageDir::open(&d1)
            .unwrap()
            .pagemap_of(sh)
            .unwrap()
            .pages_id,
        FIRST_PAGES_ID
    );

    // Newest version of every page, resolved through the parents.
    let newest = |i: u64| -> u8 {
        match i {
            6 | 21 => 3,
            4..=7 => 2,
            _ => 1,
        }
    };
    for i in (0..16).chain(20..24) {
        assert_eq!(read(&d3, PID, at(i), 1), page(newest(i), at(i)), "page {i}");
    }
    let all = read(&d3, PID, at(0), 16);
    let want: Vec<u8> = (0..16).flat_map(|i| page(newest(i), at(i))).collect();
    assert_eq!(all, want);
    let shm = ImageDir::open(&d3)
        .unwrap()
        .page_reader(sh)
        .unwrap()
        .read(0, 4)
        .unwrap();
    assert_eq!(shm, pages(1, 0, 4));
    std::fs::remove_dir_all(root).unwrap();
}

#[test]
fn holes_must_lie_in_the_parent() {
    let root = tmp("holes");
    let d1 = root.join("1");
    std::fs::create_dir_all(&d1).unwrap();
    let pm = PagemapId::Pid(PID);
    let mut parent = ParentSet::none();
    parent.insert(
        pm,
        vec![
            MapEntry {
                vaddr: BASE,
                nr_pages: 4,
                flags: P,
            },
            MapEntry {
                vaddr: BASE + 4 * PAGE_SIZE,
                nr_pages: 2,
                flags: H,
            },
            MapEntry {
                vaddr: BASE + 8 * PAGE_SIZE,
                nr_pages: 2,
                flags: L,
            },
        ],
    );
    // Contiguous across entries of any kind: fine.
    assert_eq!(parent.first_uncovered(pm, BASE, 6), None);
    assert_eq!(parent.first_uncovered(pm, BASE + 8 * PAGE_SIZE, 2), None);
    // A gap at pages 6..8.
    assert_eq!(
        parent.first_uncovered(pm, BASE + 5 * PAGE_SIZE, 4),
        Some(BASE + 6 * PAGE_SIZE)
    );
    let mut c = Client::new(Layout::V41);
    c.open2(pm);
    c.add(pm, BASE + 5 * PAGE_SIZE, 4, H, 0);
    c.close(false);
    let err = serve(Layout::V41, &c.out, 64, parent.clone(), &d1)
        .err()
        .unwrap();
    assert!(err.contains("not in the parent"), "{err}");

    // No parent pagemap at all: CRIU writes the hole unchecked; we refuse it.
    let mut c = Client::new(Layout::V41);
    c.open2(PagemapId::Pid(2));
    c.add(PagemapId::Pid(2), BASE, 1, H, 0);
    let err = serve(Layout::V41, &c.out, 64, parent, &d1).err().unwrap();
    assert!(err.contains("no such pagemap"), "{err}");
    std::fs::remove_dir_all(root).unwrap();
}

#[test]
fn refuses_runs_restore_could_not_read() {
    let pm = PagemapId::Pid(PID);
    let wire = WireId {
        kind: PagemapKind::Pid,
        id: u64::from(PID),
    };
    let run = |vaddr: u64, nr_pages: u64, flags: PeFlags| {
        let mut s = ImageSession::new(ParentSet::none());
        let mut out = Vec::new();
        s.handle(
            ServerEvent::Open {
                id: wire,
                want_reply: true,
            },
            &mut out,
        )
        .unwrap();
        s.handle(
            ServerEvent::Pages {
                dst: wire,
                vaddr: BASE + 8 * PAGE_SIZE,
                nr_pages: 2,
                flags: P,
                data: Some(bytes::Bytes::from(pages(0, 0, 2))),
            },
            &mut out,
        )
        .unwrap();
        let data = flags
            .is_present()
            .then(|| bytes::Bytes::from(vec![0u8; (nr_pages * PAGE_SIZE) as usize]));
        s.handle(
            ServerEvent::Pages {
                dst: wire,
                vaddr,
                nr_pages,
                flags,
                data,
            },
            &mut out,
        )
    };
    assert!(run(BASE + 10 * PAGE_SIZE, 1, P).is_ok());
    assert!(run(BASE + 9 * PAGE_SIZE, 1, P).is_err(), "overlap");
    assert!(run(BASE, 1, P).is_err(), "descending");
    assert!(run(BASE + 10 * PAGE_SIZE, 0, L).is_err(), "empty");
    assert!(
        run(BASE + 10 * PAGE_SIZE, 1, PeFlags(0)).is_err(),
        "no flags"
    );
    assert!(
        run(BASE + 10 * PAGE_SIZE, 1, PeFlags(5)).is_err(),
        "present+parent"
    );
    let _ = pm;

    // Nothing after CLOSE; GET is not a page-server-session command.
    let mut s = ImageSession::new(ParentSet::none());
    let mut out = Vec::new();
    s.handle(ServerEvent::Close { force: false }, &mut out)
        .unwrap();
    assert_eq!(out, vec![Output::Closed { force: false }]);
    assert!(
        s.handle(ServerEvent::Close { force: false }, &mut out)
            .is_err()
    );
    let mut s = ImageSession::new(ParentSet::none());
    assert_eq!(
        s.handle(
            ServerEvent::Get {
                pid: 1,
                vaddr: 0,
                nr_pages: 1
            },
            &mut out
        ),
        Err(SessionError::Get)
    );
}

/// A reopened pagemap gets a new pages id and replaces the earlier file, like CRIU's O_TRUNC; an
/// ADD_F without OPEN opens its pagemap (legacy); legacy OPEN sends no reply.
#[test]
fn reopen_and_legacy_open() {
    let d = tmp("reopen");
    let a = PagemapId::Pid(5);
    let b = PagemapId::Pid(6);
    let mut c = Client::new(Layout::V41);
    c.cmd(Command::Open, a, 0, 0, PeFlags(0));
    c.add(a, BASE, 1, P, 1);
    c.add(b, BASE, 2, P, 1); // implicit open of b
    c.open2(a); // a again: new pages id, file replaced
    c.add(a, BASE + PAGE_SIZE, 1, P, 2);
    c.close(false);
    let s = serve(Layout::V41, &c.out, 100_000, ParentSet::none(), &d).unwrap();
    assert_eq!(s.replies, [0]);
    let img = ImageDir::open(&d).unwrap();
    assert_eq!(img.pagemap_of(b).unwrap().pages_id, FIRST_PAGES_ID + 1);
    let pa = img.pagemap_of(a).unwrap();
    assert_eq!(pa.pages_id, FIRST_PAGES_ID + 2);
    assert_eq!(pa.entries.len(), 1);
    assert_eq!(read(&d, 5, BASE + PAGE_SIZE, 1), page(2, BASE + PAGE_SIZE));
    assert_eq!(read(&d, 6, BASE, 2), pages(1, BASE, 2));
    // The orphan pages file of the first `a` stays, as with CRIU.
    assert_eq!(img.pages_file_len(FIRST_PAGES_ID).unwrap(), PAGE_SIZE);
    std::fs::remove_dir_all(d).unwrap();
}

/// One generated pagemap: ascending runs (gap before each) with flags.
fn runs() -> impl Strategy<Value = Vec<(u64, u64, PeFlags)>> {
    prop::collection::vec(
        (
            0u64..4,
            1u64..20,
            prop_oneof![Just(P), Just(LP), Just(L), Just(H)],
        ),
        1..12,
    )
    .prop_map(|v| {
        let mut at = BASE;
        v.into_iter()
            .map(|(gap, n, f)| {
                at += gap * PAGE_SIZE;
                let r = (at, n, f);
                at += n * PAGE_SIZE;
                r
            })
            .collect()
    })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(48))]

    /// Any session of ascending runs over several pagemaps, cut into arbitrary socket reads, in
    /// either header layout: the directory holds exactly one entry per ADD_F with its flags,
    /// pages ids in OPEN order, and every PRESENT page reads back; holes read from the parent,
    /// whose pagemap covers exactly the holes.
    #[test]
    fn sessions_round_trip(
        maps in prop::collection::vec(runs(), 1..4),
        chunk in 1usize..20_000,
        v42 in any::<bool>(),
    ) {
        let layout = if v42 { Layout::V42 } else { Layout::V41 };
        let root = tmp("prop");
        let (pd, d) = (root.join("p"), root.join("d"));
        std::fs::create_dir_all(&pd).unwrap();
        std::fs::create_dir_all(&d).unwrap();
        // The parent: a PRESENT entry (generation 9) under every hole of the session.
        let mut pc = Client::new(Layout::V41);
        for (i, runs) in maps.iter().enumerate() {
            let id = PagemapId::Pid(10 + i as u32);
            pc.open2(id);
            for &(v, n, f) in runs {
                if f == H {
                    pc.add(id, v, n, P, 9);
                }
            }
        }
        pc.close(false);
        serve(Layout::V41, &pc.out, 1 << 20, ParentSet::none(), &pd).unwrap();
        link_parent(&d, &pd);

        let mut c = Client::new(layout);
        for (i, runs) in maps.iter().enumerate() {
            let id = PagemapId::Pid(10 + i as u32);
            c.open2(id);
            for &(v, n, f) in runs {
                c.add(id, v, n, f, i as u8);
            }
        }
        c.close(v42);
        let s = serve(layout, &c.out, chunk, parent_of(&pd), &d).unwrap();
        prop_assert!(s.closed);
        let img = ImageDir::open(&d).unwrap();
        for (i, runs) in maps.iter().enumerate() {
            let id = PagemapId::Pid(10 + i as u32);
            // The parent has every pagemap (some without entries): OPEN2 answers 1.
            prop_assert_eq!(s.replies[i], 1);
            let pm = img.pagemap_of(id).unwrap();
            prop_assert_eq!(pm.pages_id, FIRST_PAGES_ID + i as u32);
            let want: Vec<MapEntry> = runs
                .iter()
                .map(|&(vaddr, nr_pages, flags)| MapEntry { vaddr, nr_pages, flags })
                .collect();
            prop_assert_eq!(&pm.entries, &want);
            let reader = img.page_reader(id).unwrap();
            for &(v, n, f) in runs {
                if f.is_present() {
                    prop_assert_eq!(reader.read(v, n).unwrap(), pages(i as u8, v, n));
                } else if f == H {
                    prop_assert_eq!(reader.read(v, n).unwrap(), pages(9, v, n));
                }
            }
        }
        std::fs::remove_dir_all(root).unwrap();
    }
}
