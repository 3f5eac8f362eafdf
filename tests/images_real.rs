//! Image reading against real CRIU 4.1.1 output: a holder process with a known memory layout is
//! dumped normally and with `--lazy-pages`, and what `ImageDir` and `images show` report must
//! match what the holder did to its pages. Needs root and CRIU (skips with a message otherwise).

#[path = "common/criu.rs"]
mod criu;
#[path = "common/holder.rs"]
mod holder;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use pageserv::criu::PeFlags;
use pageserv::criu::images::{ImageDir, MapEntry, Pagemap, PagemapId};
use pageserv::criu::page_server::{Layout, RawHeader};
use pageserv::images_show::{self, Summary};
use pageserv::pages::PageRange;

use holder::{HOLDER_PAGES, PAGE};

/// The holder's entry point when the binary is re-executed (a no-op in a normal run).
#[test]
fn memory_holder() {
    holder::run_if_requested();
}

/// The flags of every page of the holder's mapping, `None` where no pagemap entry covers it.
fn flags_in_region(pm: &Pagemap, addr: u64) -> Vec<Option<PeFlags>> {
    let mut out = vec![None; HOLDER_PAGES as usize];
    let end = addr + HOLDER_PAGES * PAGE;
    for e in &pm.entries {
        for p in 0..e.nr_pages {
            let va = e.vaddr + p * PAGE;
            if (addr..end).contains(&va) {
                out[((va - addr) / PAGE) as usize] = Some(e.flags);
            }
        }
    }
    out
}

/// Maximal runs of dumped page indices in the holder's layout.
fn dumped_runs() -> Vec<(u64, u64)> {
    let mut runs: Vec<(u64, u64)> = Vec::new();
    for i in (0..HOLDER_PAGES).filter(|&i| holder::is_dumped(i)) {
        match runs.last_mut() {
            Some((s, n)) if *s + *n == i => *n += 1,
            _ => runs.push((i, 1)),
        }
    }
    runs
}

fn expected(start: u64, n: u64) -> Vec<u8> {
    (start..start + n).flat_map(holder::expected_page).collect()
}

/// Checks `images show` numbers against the pages files themselves and prints the table.
fn check_summary(images: &ImageDir) -> Summary {
    let s = images_show::summarize(images).unwrap();
    println!("{}", images_show::render_text(&s));
    assert_eq!(s.tasks.len(), 1, "one process in the holder's tree");
    let t = &s.tasks[0];
    assert_eq!((t.pid, t.ppid, t.state.as_str()), (1, 0, "alive"));
    assert!(t.threads >= 1);
    let pages_id = t.pages_id.expect("live task has a pages file");
    let file_bytes = images.pages_file_len(pages_id).unwrap();
    assert_eq!(
        t.memory.present.pages,
        file_bytes / PAGE,
        "present pages vs pages-{pages_id}.img"
    );
    assert_eq!(t.memory.present.bytes, file_bytes);
    assert_eq!(s.totals.pages_file_bytes, file_bytes);
    assert!(s.warnings.is_empty(), "{:?}", s.warnings);
    // The holder's untouched and read-only pages are never dumped: they count as zero pages.
    let never = (0..HOLDER_PAGES).filter(|&i| !holder::is_dumped(i)).count() as u64;
    assert!(
        t.memory.zero.pages >= never,
        "zero {} < {never}",
        t.memory.zero.pages
    );
    let json: serde_json::Value = serde_json::to_value(&s).unwrap();
    assert_eq!(
        json["tasks"][0]["memory"]["present"]["pages"],
        t.memory.present.pages
    );
    s
}

#[test]
fn plain_dump_holds_touched_pages() {
    let Some(criu) = criu::require("plain_dump_holds_touched_pages") else {
        return;
    };
    let dir = criu::TestDir::new("images-plain");
    let img = dir.sub("img");
    let mut h = holder::spawn("memory_holder", dir.path()).unwrap();
    let pid = h.proc.pid.to_string();
    criu.run(
        &["dump", "-t", &pid, "-D", img.to_str().unwrap()],
        &dir.path().join("dump.log"),
        Duration::from_secs(120),
    )
    .unwrap();
    // A dump without -R kills the tree.
    h.proc.wait_gone(Duration::from_secs(10)).unwrap();
    assert!(!h.proc.is_alive());

    let images = ImageDir::open(&img).unwrap();
    assert_eq!(images.inventory().unwrap().img_version, 2);
    let s = check_summary(&images);
    let dumped = (0..HOLDER_PAGES).filter(|&i| holder::is_dumped(i)).count() as u64;
    assert!(s.tasks[0].memory.present.pages >= dumped);
    assert_eq!(
        s.tasks[0].memory.lazy.pages, 0,
        "a plain dump leaves nothing lazy"
    );

    // Exactly the touched pages are in the pagemap, as lazy-capable present pages.
    let pm = images.pagemap(1).unwrap();
    let flags = flags_in_region(&pm, h.addr);
    for (i, f) in flags.iter().enumerate() {
        let i = i as u64;
        let want = holder::is_dumped(i).then_some(PeFlags::LAZY | PeFlags::PRESENT);
        assert_eq!(
            *f,
            want,
            "page {i} ({:?}) at {:#x}",
            holder::page_kind(i),
            h.addr + i * PAGE
        );
    }
    // So their data is in the pages file, which a lazy restore skips: a streamed one cannot
    // (dst::early_restore), and dst restores such images the usual way.
    assert!(images.lazy_pages_with_data(1).unwrap() >= dumped);
    let blockers = pageserv::criu::stream_restore::blockers(&images).unwrap();
    assert!(
        blockers.len() == 1 && blockers[0].contains("marked lazy"),
        "{blockers:?}"
    );
    // Their data reads back as written, run by run (the 1 MiB run in one read).
    let reader = images.page_reader(PagemapId::Pid(1)).unwrap();
    for (start, n) in dumped_runs() {
        let got = reader.read(h.addr + start * PAGE, n).unwrap();
        assert!(
            got == expected(start, n),
            "data of pages {start}..{}",
            start + n
        );
    }
    let index = images.present_index(1).unwrap();
    assert_eq!(&index, reader.index());
    // One read spanning many runs and the gaps between them fails on the first gap page.
    let err = images.read_pages(1, h.addr, 8).unwrap_err();
    assert!(
        err.to_string()
            .contains(&format!("page {:#x}", h.addr + 4 * PAGE)),
        "{err}"
    );
    assert_eq!(
        index.total_bytes(),
        images.pages_file_len(pm.pages_id).unwrap()
    );
    // Untouched pages have no data anywhere.
    let err = images.read_pages(1, h.addr + 4 * PAGE, 1).unwrap_err();
    assert!(err.to_string().contains("never dumped"), "{err}");
}

/// Sends one 24-byte v4.1.1 page-server header.
/// Sends one page-server header in the layout of the CRIU under test (4.1's 24 bytes or
/// 4.2's 32), built by pageserv's own codec.
fn send_iov(s: &mut TcpStream, layout: Layout, cmd: u32, nr_pages: u64, vaddr: u64, dst_id: u64) {
    let mut h = bytes::BytesMut::new();
    RawHeader {
        word: cmd,
        nr_pages,
        vaddr,
        dst_id,
    }
    .encode(layout, &mut h)
    .unwrap();
    s.write_all(&h).unwrap();
}

#[test]
fn lazy_dump_marks_touched_pages_lazy() {
    let Some(criu) = criu::require("lazy_dump_marks_touched_pages_lazy") else {
        return;
    };
    criu::ensure_pipe_max_size().unwrap();
    let dir = criu::TestDir::new("images-lazy");
    let img = dir.sub("img");
    let mut h = holder::spawn("memory_holder", dir.path()).unwrap();
    let (mut dump, port) = criu
        .lazy_dump(h.proc.pid, &img, &dir.path().join("dump.log"))
        .unwrap();

    // The images are complete once the lazy dump serves pages.
    let images = ImageDir::open(&img).unwrap();
    let s = check_summary(&images);
    let dumped = (0..HOLDER_PAGES).filter(|&i| holder::is_dumped(i)).count() as u64;
    assert!(s.tasks[0].memory.lazy.pages >= dumped);
    // A lazy dump keeps lazy pages' data out of the pages file: a streamed restore may read it.
    assert_eq!(images.lazy_pages_with_data(1).unwrap(), 0);
    assert_eq!(
        pageserv::criu::stream_restore::blockers(&images).unwrap(),
        Vec::<String>::new()
    );

    let pm = images.pagemap(1).unwrap();
    let flags = flags_in_region(&pm, h.addr);
    for (i, f) in flags.iter().enumerate() {
        let i = i as u64;
        let want = holder::is_dumped(i).then_some(PeFlags::LAZY);
        assert_eq!(*f, want, "page {i} ({:?})", holder::page_kind(i));
    }
    // lazy_ranges inside the mapping cover exactly the touched pages.
    let end = h.addr + HOLDER_PAGES * PAGE;
    let mut lazy_pages = Vec::new();
    for r in images.lazy_ranges(1).unwrap() {
        for p in 0..r.nr_pages {
            let va = r.start + p * PAGE;
            if (h.addr..end).contains(&va) {
                lazy_pages.push((va - h.addr) / PAGE);
            }
        }
    }
    let want: Vec<u64> = (0..HOLDER_PAGES)
        .filter(|&i| holder::is_dumped(i))
        .collect();
    assert_eq!(lazy_pages, want);
    let err = images.read_pages(1, h.addr, 1).unwrap_err();
    assert!(err.to_string().contains("LAZY only"), "{err}");

    // The dump's page server returns the 1 MiB run's data for a GET (dst_id = vpid 1) ...
    let run: &MapEntry = pm
        .entries
        .iter()
        .find(|e| e.range().contains(h.addr + 8192 * PAGE))
        .expect("entry of the 1 MiB run");
    let got_range = PageRange::new(run.vaddr, run.nr_pages);
    let layout = pageserv::criu::binary::Criu::at(&criu.bin)
        .unwrap()
        .layout();
    let mut sock = TcpStream::connect(format!("127.0.0.1:{port}")).unwrap();
    sock.set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    send_iov(&mut sock, layout, 7, run.nr_pages, run.vaddr, 1);
    let mut reply = vec![0u8; layout.header_len()];
    sock.read_exact(&mut reply).unwrap();
    let reply = RawHeader::decode(layout, &reply).unwrap();
    let nr = reply.nr_pages;
    assert_eq!(reply.word, 0x0004_0006);
    assert_eq!(nr, got_range.nr_pages);
    let mut data = vec![0u8; (nr * PAGE) as usize];
    sock.read_exact(&mut data).unwrap();
    let first = (run.vaddr - h.addr) / PAGE;
    assert!(
        data == expected(first, nr),
        "GET data of pages {first}..{}",
        first + nr
    );
    // ... and ends on PS_IOV_CLOSE, replying 0, then kills the tree.
    send_iov(&mut sock, layout, 0x1023, 0, 0, 0);
    let mut status = [0u8; 4];
    sock.read_exact(&mut status).unwrap();
    assert_eq!(i32::from_ne_bytes(status), 0);
    drop(sock);
    dump.wait_success(Duration::from_secs(60)).unwrap();
    h.proc.wait_gone(Duration::from_secs(10)).unwrap();
    assert!(!h.proc.is_alive());
}
