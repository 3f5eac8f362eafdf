//! How the loop places pages: faults answered by the fake source while every page is pushed,
//! faults answered from pages already held here, zero runs (non-lazy faults, `Inbound::Zero`,
//! pages before their task), several arrivals in one message, and pushes that arrive before the
//! restorer registered the ranges.

use std::os::fd::{FromRawFd, OwnedFd};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use pageserv::dst::uffd_loop::{HeldAnswer, HeldPages, Inbound, LoopConfig};
use pageserv::pages::{PageRange, PidRange};

use crate::support::*;

// ---- (a) faults and background pushes on 64 MiB ----

#[test]
fn serves_faults_and_pushes_until_complete() {
    require_root!();
    let _g = serial();
    let config = LoopConfig {
        readahead_pages: 3,
        ..LoopConfig::default()
    };
    let (region, img, h) = serve_region(64 * MIB, config, 1000);
    let (base, pages) = (region.addr, region.pages());

    let readers: Vec<_> = (0..4u64)
        .map(|r| {
            std::thread::spawn(move || {
                let mut order: Vec<u64> = (0..pages).filter(|p| p % 4 == r).collect();
                Rng(r + 7).shuffle(&mut order);
                for pg in order.into_iter().take(600) {
                    expect_page(base + pg * P, base + pg * P);
                }
            })
        })
        .collect();
    // The background push starts while the readers fault.
    std::thread::sleep(Duration::from_millis(20));
    push_all(&h.tx, 1000, base, &img, pages, 1024);
    for r in readers {
        r.join().unwrap();
    }
    wait_complete(&h.events, Duration::from_secs(60));
    // Every page holds its data (nothing zero), compared in full.
    assert_whole(&region, &img);
    let c = h.stats.counters();
    eprintln!("(a) {c:?}");
    assert_eq!(
        c.pages_copied_urgent + c.pages_copied_pushed,
        pages,
        "each page copied exactly once"
    );
    assert!(c.faults > 0 && c.requests > 0 && c.pages_copied_urgent > 0);
    assert_eq!(c.zero_pages, 0);
    let lat = h.stats.fault_latency.snapshot();
    assert!(lat.count > 0);
    let report = h.handle.shutdown(false).unwrap();
    assert!(report.incomplete.is_empty() && report.killed.is_empty());
    drop(h.tx);
    assert!(!h.source.join().unwrap().is_empty());
}

// ---- (a2) pages already held here answer faults on the fault loop ----

/// Holds the image pages of `[base, base + held_pages)`, each handed out once.
#[derive(Debug)]
struct Held {
    base: u64,
    img: Bytes,
    left: Mutex<std::collections::BTreeSet<u64>>,
}

impl HeldPages for Held {
    fn take(&self, link: u64, r: PidRange) -> HeldAnswer {
        assert_eq!(link, 0, "the fault loop's only link");
        let mut left = self.left.lock().unwrap();
        let mut answer = HeldAnswer::default();
        for pg in 0..r.nr_pages() {
            let at = PidRange::new(r.pid, r.start() + pg * P, 1);
            if left.remove(&at.start()) {
                let off = (at.start() - self.base) as usize;
                let data = self.img.slice(off..off + P as usize);
                answer.found.push((at, Some(data)));
            } else {
                answer.rest.push(at);
            }
        }
        answer
    }
}

#[test]
fn held_pages_answer_faults_without_asking_the_source() {
    require_root!();
    let _g = serial();
    let region = Region::new(16 * MIB);
    let (base, pages) = (region.addr, region.pages());
    let held_pages = pages / 2;
    let img = image(base, pages);
    let held = Arc::new(Held {
        base,
        img: img.clone(),
        left: Mutex::new((0..held_pages).map(|pg| base + pg * P).collect()),
    });
    let config = LoopConfig {
        readahead_pages: 3,
        held: Some(held.clone()),
        ..LoopConfig::default()
    };
    let h = start(config, 1000, base, img, never);
    h.restored(1000, new_uffd(base, region.len), region.lazy(), None);
    let mut order: Vec<u64> = (0..pages).collect();
    Rng(11).shuffle(&mut order);
    for pg in order {
        expect_page(base + pg * P, base + pg * P);
    }
    let c = h.stats.counters();
    eprintln!("(a2) {c:?}");
    let report = h.handle.shutdown(false).unwrap();
    assert!(report.incomplete.is_empty());
    drop(h.tx);
    let asked = h.source.join().unwrap();
    // Every held page was taken here, and the source was asked only for the others.
    assert!(
        held.left.lock().unwrap().is_empty(),
        "every held page taken"
    );
    assert!(!asked.is_empty(), "the pages not held were asked for");
    for at in &asked {
        assert!(
            at.start() >= base + held_pages * P,
            "the source was asked for held page(s) {at:?}"
        );
    }
    let asked_pages: u64 = asked.iter().map(|a| a.nr_pages()).sum();
    assert_eq!(asked_pages + held_pages, pages, "each page came once");
    assert_eq!(c.pages_copied_urgent, pages, "every page answered a fault");
}

// ---- zero pages: faults outside the lazy set, `Inbound::Zero`, and pages before their task ----

#[test]
fn zero_runs_non_lazy_faults_and_early_pages() {
    require_root!();
    let _g = serial();
    let region = Region::new(2 * MIB);
    let base = region.addr;
    let lazy_pages = 256;
    let img = image(base, lazy_pages);
    let uffd = new_uffd(base, region.len);
    let h = start(LoopConfig::default(), 21, base, img.clone(), never);
    // Pages before the task: kept until it arrives.
    push_all(
        &h.tx,
        21,
        base + 16 * P,
        &img.slice((16 * P) as usize..),
        lazy_pages - 16,
        100,
    );
    h.tx.send(Inbound::Zero {
        at: PidRange::new(21, base, 16),
        urgent: false,
        link: 0,
    })
    .unwrap();
    h.restored(21, uffd, vec![PageRange::new(base, lazy_pages)], None);
    wait_complete(&h.events, Duration::from_secs(30));
    for pg in 0..16 {
        assert!(is_zero_page(base + pg * P));
    }
    for pg in 16..lazy_pages {
        expect_page(base + pg * P, base + pg * P);
    }
    // Registered but not lazy: answered with a zero page, no request.
    assert!(is_zero_page(base + 300 * P));
    // The loop counts the zero page just after the ioctl that woke us.
    let deadline = Instant::now() + Duration::from_secs(5);
    while h.stats.counters().zero_pages < 1 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(1));
    }
    let c = h.stats.counters();
    eprintln!("(zero) {c:?}");
    assert_eq!((c.lazy_zero_pages, c.zero_pages), (16, 1));
    assert_eq!((c.requests, c.pages_copied_pushed), (0, lazy_pages - 16));
    h.finish();
}

// ---- several arrivals in one message (the push placer's batches) ----

/// `Inbound::Arrivals` places its runs as separate messages would: every 16th page a zero run
/// between data runs (the bench workload's layout), while threads fault; a Shutdown sent right
/// behind the last batch finds every page placed.
#[test]
fn arrivals_in_one_message_place_data_and_zero_runs() {
    require_root!();
    let _g = serial();
    let (region, img, h) = serve_region(8 * MIB, LoopConfig::default(), 41);
    let (base, pages) = (region.addr, region.pages());
    let is_zero = |pg: u64| pg % 16 == 15;
    let readers: Vec<_> = (0..2u64)
        .map(|r| {
            std::thread::spawn(move || {
                // Data pages only: the fake source answers a fault with the image's data.
                let mut order: Vec<u64> =
                    (0..pages).filter(|p| p % 2 == r && !is_zero(*p)).collect();
                Rng(r + 11).shuffle(&mut order);
                for pg in order.into_iter().take(300) {
                    expect_page(base + pg * P, base + pg * P);
                }
            })
        })
        .collect();
    // The readers fault before the first batch leaves: since the loop runs on the fault lane it
    // can place every batch before a reader touches a page, and the test would see no fault.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while h.stats.counters().faults == 0 {
        assert!(
            std::time::Instant::now() < deadline,
            "no reader faulted within 10 s"
        );
        std::thread::sleep(std::time::Duration::from_millis(1));
    }
    // Batches of 64 pages: 4 data runs of 15 pages and 4 zero pages each.
    for batch in 0..pages / 64 {
        let mut runs = Vec::new();
        for k in 0..4 {
            let first = batch * 64 + k * 16;
            let data = img.slice((first * P) as usize..((first + 15) * P) as usize);
            runs.push((PidRange::new(41, base + first * P, 15), Some(data)));
            runs.push((PidRange::new(41, base + (first + 15) * P, 1), None));
        }
        h.tx.send(Inbound::Arrivals { runs, link: 0 }).unwrap();
    }
    // Right behind the last batch, before anything said Complete: every run of every batch is
    // placed before the Shutdown is handled.
    let report = h.handle.shutdown(false).unwrap();
    assert!(report.incomplete.is_empty() && report.killed.is_empty());
    for r in readers {
        r.join().unwrap();
    }
    for pg in 0..pages {
        if is_zero(pg) {
            assert!(is_zero_page(base + pg * P), "page {pg} should read zero");
        } else {
            expect_page(base + pg * P, base + pg * P);
        }
    }
    let c = h.stats.counters();
    eprintln!("(arrivals) {c:?}");
    assert_eq!(c.lazy_zero_pages, pages / 16, "every zero run placed");
    assert_eq!(
        c.pages_copied_urgent + c.pages_copied_pushed + c.lazy_zero_pages,
        pages,
        "each page placed exactly once"
    );
    assert!(c.faults > 0 && c.pages_copied_pushed > 0);
    h.source.join().unwrap();
}

// ---- pushes that arrive before the restorer registered the ranges ----

/// CRIU hands over each task's uffd before its restorer mremaps and registers the lazy ranges.
/// Background pages that arrive in between must wait for the restore to finish: copied at once
/// they fail with ENOENT, and a loop that dropped them then would answer the later faults with
/// zero pages (seen for real as a restored workload dying on a zeroed TLS page).
#[test]
fn pushes_before_the_ranges_are_registered_wait_for_the_restore() {
    require_root!();
    let _g = serial();
    let region = Region::new(2 * MIB);
    let base = region.addr;
    let lazy_pages = 256;
    let img = image(base, lazy_pages);
    let fd = raw_uffd();
    assert!(fd >= 0, "userfaultfd: {}", std::io::Error::last_os_error());
    // The uffd exists but nothing is registered yet, as right after CRIU's handover.
    let uffd = unsafe { OwnedFd::from_raw_fd(fd) };
    let h = start(LoopConfig::default(), 22, base, img.clone(), never);
    h.tx.send(Inbound::Task {
        pid: 22,
        uffd,
        lazy: vec![PageRange::new(base, lazy_pages)],
        host_pid: None,
    })
    .unwrap();
    push_all(&h.tx, 22, base, &img, lazy_pages, 64);
    std::thread::sleep(Duration::from_millis(100));
    // Now the "restorer" registers the range, and the restore finishes.
    assert!(
        raw_register(fd, base, region.len),
        "UFFDIO_REGISTER: {}",
        std::io::Error::last_os_error()
    );
    h.tx.send(Inbound::RestoreFinished).unwrap();
    wait_complete(&h.events, Duration::from_secs(30));
    for pg in 0..lazy_pages {
        expect_page(base + pg * P, base + pg * P);
    }
    let c = h.stats.counters();
    assert_eq!(
        (c.pages_copied_pushed, c.pages_dropped),
        (lazy_pages, 0),
        "{c:?}"
    );
    h.finish();
}
