//! Measurements (printed with `--nocapture`): UFFDIO_COPY throughput, raw and through the loop,
//! and the fault round trip with an instant source.

use std::os::fd::{AsRawFd, RawFd};
use std::time::{Duration, Instant};

use pageserv::dst::uffd_loop::LoopConfig;

use crate::support::*;

// ---- measurements ----

fn raw_copy(fd: RawFd, dst: u64, src: &[u8]) {
    let mut c = UffdioCopy {
        dst,
        src: src.as_ptr() as u64,
        len: src.len() as u64,
        mode: 0,
        copy: 0,
    };
    unsafe { uffdio_copy(fd, &mut c) }.unwrap();
    assert_eq!(c.copy as usize, src.len());
}

#[test]
fn measure_copy_throughput() {
    require_root!();
    let _g = serial();
    let batch = 4 * MIB;
    let region = Region::new(256 * MIB);
    let uffd = new_uffd(region.addr, region.len);
    let src = image(0, batch / P);
    let t = Instant::now();
    for off in (0..region.len).step_by(batch as usize) {
        raw_copy(uffd.as_raw_fd(), region.addr + off, &src);
    }
    let raw = region.len as f64 / t.elapsed().as_secs_f64() / (1u64 << 30) as f64;
    expect_page(region.addr + 5 * P, 5 * P);
    drop(uffd);
    drop(region);

    // The same through the loop: 4 MiB background pushes until Complete.
    let (region, img, h) = serve_region(256 * MIB, LoopConfig::default(), 3);
    let t = Instant::now();
    push_all(&h.tx, 3, region.addr, &img, region.pages(), batch / P);
    wait_complete(&h.events, Duration::from_secs(60));
    let through_loop = region.len as f64 / t.elapsed().as_secs_f64() / (1u64 << 30) as f64;
    assert_eq!(h.stats.counters().pages_copied_pushed, region.pages());
    expect_page(region.addr + 12345 * P, region.addr + 12345 * P);
    eprintln!(
        "MEASURE UFFDIO_COPY 4 MiB batches: raw {raw:.2} GiB/s, through the loop {through_loop:.2} GiB/s"
    );
    h.finish();
}

#[test]
fn measure_fault_round_trip() {
    require_root!();
    let _g = serial();
    let (region, _img, h) = serve_region(16 * MIB, LoopConfig::default(), 4);
    let (base, pages) = (region.addr, region.pages());
    let mut order: Vec<u64> = (0..pages).collect();
    Rng(99).shuffle(&mut order);
    let mut samples = Vec::with_capacity(pages as usize);
    for pg in order {
        let a = base + pg * P;
        let t = Instant::now();
        let v = unsafe { std::ptr::read_volatile(a as *const u64) };
        samples.push(t.elapsed().as_nanos() as u64);
        assert_eq!(v, word(a, 0));
    }
    wait_complete(&h.events, Duration::from_secs(30));
    samples.sort();
    let q = |f: f64| samples[((samples.len() - 1) as f64 * f) as usize] as f64 / 1000.0;
    let lat = h.stats.fault_latency.snapshot();
    let lq = |f| lat.quantile(f).unwrap() as f64 / 1000.0;
    eprintln!(
        "MEASURE fault round trip ({} faults, instant source): touch p50 {:.1} us p99 {:.1} us; \
         loop fault->copy p50 {:.1} us p99 {:.1} us",
        samples.len(),
        q(0.5),
        q(0.99),
        lq(0.5),
        lq(0.99)
    );
    assert_eq!(lat.count, pages);
    assert_eq!(h.stats.counters().pages_copied_urgent, pages);
    h.finish();
}
