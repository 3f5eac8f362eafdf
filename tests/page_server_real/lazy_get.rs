//! `criu dump --lazy-pages` serves GETs from `GetClient`, over TCP and over a socketpair
//! (`--ps-socket`), with throughput measurements; whether pageserv sees a dump CRIU wrote
//! eagerly; and what happens on a GET for an address the dump does not serve, or does not hold
//! lazily.

use std::fs;
use std::path::Path;
use std::time::Duration;

use pageserv::criu::PeFlags;
use pageserv::criu::page_server::Header;
use pageserv::pages::PAGE_SIZE;

use crate::environment::{Run, log_tail, setup, wait_timeout};
use crate::lazy_session::LazySession;
use crate::{SERIAL, TIMEOUT, layout, written_pages};

/// Correctness of pipelined GETs against the real server, with clamping and repeated pages.
fn check_gets(s: &mut LazySession) {
    let lazy = s.lazy_region_runs();
    let covered: u64 = lazy.iter().map(|r| r.nr_pages).sum();
    assert_eq!(
        covered,
        written_pages(),
        "lazy pages in the region = pages the holder wrote"
    );
    let big = *lazy.iter().max_by_key(|r| r.nr_pages).unwrap();
    assert!(big.nr_pages >= 4, "expected a long lazy run, got {big:?}");
    let tail = big.vaddr + (big.nr_pages - 2) * PAGE_SIZE;

    // Pipeline: every lazy run whole, a GET past the end of the longest run (CRIU clamps it),
    // the same page twice in a row, then its first page again.
    let mut expect = Vec::new();
    for r in &lazy {
        s.send_get(r.vaddr, r.nr_pages);
        expect.push((r.vaddr, r.nr_pages));
    }
    s.send_get(tail, 10);
    expect.push((tail, 2));
    for _ in 0..2 {
        s.send_get(big.vaddr + PAGE_SIZE, 1);
        expect.push((big.vaddr + PAGE_SIZE, 1));
    }
    s.send_get(big.vaddr, 1);
    expect.push((big.vaddr, 1));
    assert_eq!(s.client.outstanding(), expect.len());
    for (vaddr, nr) in expect {
        let r = s.next_pages();
        assert_eq!((r.vaddr, r.nr_pages), (vaddr, nr), "reply order / clamp");
        s.check_pattern(r.vaddr, &r.data);
    }
    eprintln!(
        "lazy GET check: {} lazy runs in the region ({} pages, longest {} pages); GET of 10 pages \
         2 pages before a run end came back with 2",
        lazy.len(),
        covered,
        big.nr_pages
    );
}

fn measure(s: &mut LazySession, transport: &str) {
    for window in [1, 8] {
        for size in [1, 16, 256, 1024] {
            let reqs = s.tiling(size);
            let (mibs, rps) = s.throughput(&reqs, window);
            eprintln!(
                "GET throughput {transport} window {window}: {size:>4}-page requests: \
                 {mibs:7.1} MiB/s ({rps:7.0} req/s)"
            );
        }
    }
    // CRIU tee()s everything in front of vaddr in its pipe and splices it to /dev/null, so a
    // small GET should cost more the further into its page-pipe buffer it starts.
    let long: Vec<Run> = s
        .lazy_region_runs()
        .into_iter()
        .filter(|r| r.nr_pages >= 1024)
        .collect();
    let first: Vec<(u64, u64)> = long.iter().map(|r| (r.vaddr, 1)).collect();
    let last: Vec<(u64, u64)> = long
        .iter()
        .map(|r| (r.vaddr + (r.nr_pages - 1) * PAGE_SIZE, 1))
        .collect();
    let (_, rps_first) = s.throughput(&first, 8);
    let (_, rps_last) = s.throughput(&last, 8);
    eprintln!(
        "GET 1-page {transport} window 8: first page of a 1024-page run {rps_first:7.0} req/s, \
         last page {rps_last:7.0} req/s"
    );
}

#[test]
fn lazy_get_tcp() {
    let Some(criu) = setup("lazy_get_tcp") else {
        return;
    };
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let mut s = LazySession::start(&criu, "lazy-tcp", false);
    check_gets(&mut s);
    measure(&mut s, "TCP loopback");
    s.close_and_finish(false);
}

#[test]
fn lazy_get_ps_socket() {
    let Some(criu) = setup("lazy_get_ps_socket") else {
        return;
    };
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let mut s = LazySession::start(&criu, "lazy-unix", true);
    check_gets(&mut s);
    measure(&mut s, "AF_UNIX --ps-socket");
    s.close_and_finish(true);
}

/// CRIU 4.1.1 writes a lazy dump eagerly when a thread's stack pointer is page-aligned at the
/// freeze (`source::eager_dump`): the check pageserv runs on its own dumps must see that, and
/// must not see it in an ordinary lazy dump. If the first assertion fails, CRIU's stack-page
/// test has changed: see whether the re-dump in `source::service` is still needed.
#[cfg(target_arch = "x86_64")]
#[test]
fn eager_dump_is_seen() {
    use pageserv::criu::images::ImageDir;
    use pageserv::source::eager_dump::eager_tasks;
    let Some(criu) = setup("eager_dump_is_seen") else {
        return;
    };
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let s = LazySession::start_with(&criu, "eager", true, true);
    assert!(
        s.lazy_region_runs().is_empty(),
        "CRIU kept pages lazy although a stack pointer was page-aligned: {:?}",
        s.runs
    );
    let eager = eager_tasks(&ImageDir::open(&s.dir).unwrap()).unwrap();
    assert_eq!(eager, vec![s.holder.vpid], "eager tasks");
    s.close_and_finish(true);

    let s = LazySession::start(&criu, "not-eager", true);
    assert!(!s.lazy_region_runs().is_empty());
    let eager = eager_tasks(&ImageDir::open(&s.dir).unwrap()).unwrap();
    assert!(eager.is_empty(), "a lazy dump called eager: {eager:?}");
    s.close_and_finish(true);
}

/// A GET for an address the dump does not hold: CRIU ends the session without a reply (§1.9).
#[test]
fn lazy_get_unknown_address_ends_session() {
    let Some(criu) = setup("lazy_get_unknown_address_ends_session") else {
        return;
    };
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let mut s = LazySession::start(&criu, "lazy-unknown", false);
    // First a good GET, so the session is known to work.
    let r = s.lazy_region_runs()[0];
    s.send_get(r.vaddr, 1);
    let good = s.next_pages();
    s.check_pattern(good.vaddr, &good.data);
    s.conn.set_timeout(Duration::from_secs(20));
    s.send_get(0x1000, 1);
    let err = s
        .next_event()
        .expect_err("CRIU must not answer a GET for an unmapped address");
    assert!(err.contains("waiting for the reply to GET pid"), "{err}");
    let st = wait_timeout(&mut s.dump, TIMEOUT).expect("dump did not exit after the failed GET");
    let alive = Path::new(&format!("/proc/{}", s.holder.pid)).exists();
    eprintln!(
        "GET for unmapped 0x1000: session ended ({err}); criu dump exit: {st}; holder alive after: {alive}"
    );
    let _ = fs::remove_dir_all(&s.dir);
}

/// A GET for a page the dump holds but did not mark lazy: CRIU logs "PPB flags mismatch", sends
/// a reply header and then blocks forever in splice (docs §1.9 step 2, gotcha 17). Bounded by a
/// timeout; CRIU is killed afterwards. Pinned to CRIU 4.1.1 behaviour.
#[test]
fn lazy_get_non_lazy_page_hangs_criu() {
    let Some(criu) = setup("lazy_get_non_lazy_page_hangs_criu") else {
        return;
    };
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let mut s = LazySession::start(&criu, "lazy-nonlazy", false);
    let Some(eager) = s.runs.iter().find(|r| r.flags == PeFlags::PRESENT).copied() else {
        panic!("no PRESENT-only run in the lazy dump: {:?}", s.runs);
    };
    s.conn.set_timeout(Duration::from_secs(5));
    s.send_get(eager.vaddr, 1);
    let outcome = s.next_event();
    let buffered = s.client.read_buf().to_vec();
    let still_running = wait_timeout(&mut s.dump, Duration::from_secs(1)).is_none();
    let log = fs::read_to_string(s.dir.join("dump.log")).unwrap_or_default();
    let header = Header::decode_get_reply(layout(), &buffered);
    eprintln!(
        "GET for non-lazy page {:#x}: {outcome:?}; buffered reply header {header:?}; criu still \
         running: {still_running}",
        eager.vaddr
    );
    if still_running {
        let _ = s.dump.kill();
        let _ = s.dump.wait();
    }
    assert!(
        matches!(outcome, Err(ref e) if e.starts_with("read:")),
        "expected a read timeout"
    );
    assert!(
        still_running,
        "criu dump exited instead of hanging:\n{}",
        log_tail(&s.dir)
    );
    assert!(log.contains("PPB flags mismatch"), "{}", log_tail(&s.dir));
    let header = header.expect("a complete reply header");
    assert_eq!((header.vaddr, header.nr_pages), (eager.vaddr, 1));
    assert_eq!(
        buffered.len(),
        layout().header_len(),
        "no page data follows the header"
    );
    let _ = fs::remove_dir_all(&s.dir);
}
