//! The restored process changes its address space while pages are pending: madvise(DONTNEED),
//! mremap and fork (events the loop reads), copies racing with mremap events (EAGAIN), and a VMA
//! split after the dump inside one pushed run (ENOENT, no event).

use std::io::Read;
use std::os::fd::FromRawFd;
use std::time::Duration;

use pageserv::dst::uffd_loop::LoopConfig;

use crate::support::*;

// ---- (b) madvise(DONTNEED) while pending ----

#[test]
fn removed_pages_are_never_copied() {
    require_root!();
    let _g = serial();
    let (region, img, h) = serve_region(8 * MIB, LoopConfig::default(), 7);
    let (base, pages) = (region.addr, region.pages());

    expect_page(base, base);
    let (rm_start, rm_len) = (base + MIB, MIB);
    // Blocks until the loop has read the REMOVE event.
    assert_eq!(
        unsafe {
            libc::madvise(
                rm_start as *mut libc::c_void,
                rm_len as usize,
                libc::MADV_DONTNEED,
            )
        },
        0
    );
    for pg in (0..rm_len / P).step_by(17) {
        assert!(is_zero_page(rm_start + pg * P), "removed page reads zero");
    }
    push_all(&h.tx, 7, base, &img, pages, 1024);
    wait_complete(&h.events, Duration::from_secs(30));
    for pg in 0..pages {
        let a = base + pg * P;
        if (rm_start..rm_start + rm_len).contains(&a) {
            assert!(
                is_zero_page(a),
                "page {a:#x} in the removed range was written"
            );
        } else {
            expect_page(a, a);
        }
    }
    let c = h.stats.counters();
    eprintln!("(b) {c:?}");
    assert_eq!(c.pages_dropped, rm_len / P);
    assert_eq!(
        c.pages_copied_urgent + c.pages_copied_pushed,
        pages - rm_len / P
    );
    h.finish();
}

// ---- (c) mremap while pending ----

#[test]
fn remapped_pages_get_their_image_data() {
    require_root!();
    let _g = serial();
    let (region, img, h) = serve_region(8 * MIB, LoopConfig::default(), 9);
    let (base, pages) = (region.addr, region.pages());

    // Move image [base+2M, base+3M) to a fresh place (a placeholder we own).
    let target = Region::new(MIB);
    let (from, len) = (base + 2 * MIB, MIB);
    let moved = unsafe {
        libc::mremap(
            from as *mut libc::c_void,
            len as usize,
            len as usize,
            libc::MREMAP_MAYMOVE | libc::MREMAP_FIXED,
            target.addr as *mut libc::c_void,
        )
    };
    assert_eq!(
        moved as u64,
        target.addr,
        "mremap: {}",
        std::io::Error::last_os_error()
    );
    // Faults at the new address are served with the old (image) address's data.
    for pg in [0, 5, 255, 100] {
        expect_page(target.addr + pg * P, from + pg * P);
    }
    push_all(&h.tx, 9, base, &img, pages, 1024);
    wait_complete(&h.events, Duration::from_secs(30));
    for pg in 0..pages {
        let a = base + pg * P;
        if (from..from + len).contains(&a) {
            expect_page(target.addr + (a - from), a);
        } else {
            expect_page(a, a);
        }
    }
    let c = h.stats.counters();
    eprintln!("(c) {c:?}");
    assert_eq!(c.pages_copied_urgent + c.pages_copied_pushed, pages);
    h.finish();
    // Region's munmap covers the hole; target unmaps the moved part.
    drop(target);
}

// ---- (d) fork while pending ----

#[test]
fn fork_child_gets_its_pages() {
    require_root!();
    let _g = serial();
    let (region, img, h) = serve_region(8 * MIB, LoopConfig::default(), 11);
    let (base, pages) = (region.addr, region.pages());
    expect_page(base + 1000 * P, base + 1000 * P);

    let (first, n) = (100u64, 64u64);
    let mut fds = [0; 2];
    assert_eq!(unsafe { libc::pipe(fds.as_mut_ptr()) }, 0);
    // The fork blocks until the loop has read the FORK event. That loop runs in this process,
    // so fork with the bare syscall: glibc's fork() holds every malloc arena lock across the
    // syscall (its atfork handlers), and the loop allocating while it handles the event would
    // then deadlock (measured: 4 hangs in 40 runs). A restored task is another process than
    // dst, so this only concerns the test.
    let child = unsafe { libc::syscall(libc::SYS_clone, libc::SIGCHLD as libc::c_long, 0, 0, 0, 0) }
        as libc::pid_t;
    if child == 0 {
        // Child: async-signal-safe only. Reads pages nobody has copied yet.
        let sum = checksum(base + first * P, n);
        unsafe {
            libc::write(fds[1], (&sum as *const u64).cast(), 8);
            libc::_exit(0);
        }
    }
    assert!(child > 0);
    unsafe { libc::close(fds[1]) };
    let mut pipe = unsafe { std::fs::File::from_raw_fd(fds[0]) };
    let mut buf = [0u8; 8];
    pipe.read_exact(&mut buf).unwrap();
    assert_eq!(
        u64::from_ne_bytes(buf),
        expected_checksum(base, first, n),
        "child read wrong data"
    );
    let mut status = 0;
    assert_eq!(unsafe { libc::waitpid(child, &mut status, 0) }, child);
    assert!(libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0);

    push_all(&h.tx, 11, base, &img, pages, 1024);
    wait_complete(&h.events, Duration::from_secs(30));
    assert_whole(&region, &img);
    let c = h.stats.counters();
    eprintln!("(d) {c:?}");
    assert!(
        c.pages_copied_urgent >= 2 * n,
        "the child's pages go to parent and child"
    );
    h.finish();
}

// ---- EAGAIN: copies racing with mremap events ----

#[test]
fn copies_survive_concurrent_remaps() {
    require_root!();
    let _g = serial();
    let (region, img, h) = serve_region(32 * MIB, LoopConfig::default(), 31);
    let (base, pages) = (region.addr, region.pages());
    // One page goes back and forth while every page is pushed; each mremap holds the
    // process's uffd "changing" until the loop reads the event, so copies meet EAGAIN.
    let parking = Region::new(P);
    let (x, y) = (base + 5 * MIB, parking.addr);
    let mover = std::thread::spawn(move || {
        for _ in 0..1000 {
            for (from, to) in [(x, y), (y, x)] {
                let r = unsafe {
                    libc::mremap(
                        from as *mut libc::c_void,
                        P as usize,
                        P as usize,
                        libc::MREMAP_MAYMOVE | libc::MREMAP_FIXED,
                        to as *mut libc::c_void,
                    )
                };
                assert_eq!(r as u64, to);
            }
        }
    });
    std::thread::sleep(Duration::from_millis(2));
    push_all(&h.tx, 31, base, &img, pages, 1024);
    mover.join().unwrap();
    wait_complete(&h.events, Duration::from_secs(60));
    assert_whole(&region, &img);
    let c = h.stats.counters();
    eprintln!("(eagain) {c:?}");
    assert_eq!(c.pages_copied_pushed, pages);
    h.finish();
}

// ---- ENOENT: a VMA split after the dump (mprotect, no event) inside one pushed run ----

#[test]
fn runs_across_a_vma_split_are_placed_page_by_page() {
    require_root!();
    let _g = serial();
    let region = Region::new(8 * MIB);
    let (base, pages) = (region.addr, region.pages());
    let img = image(base, pages);
    let uffd = new_uffd(base, region.len);
    let split = base + MIB + 3 * P;
    assert_eq!(
        unsafe { libc::mprotect(split as *mut libc::c_void, P as usize, libc::PROT_READ) },
        0
    );
    let h = start(LoopConfig::default(), 33, base, img.clone(), never);
    h.restored(33, uffd, region.lazy(), None);
    push_all(&h.tx, 33, base, &img, pages, 1024);
    wait_complete(&h.events, Duration::from_secs(30));
    assert_whole(&region, &img);
    let c = h.stats.counters();
    eprintln!("(enoent) {c:?}");
    assert_eq!((c.pages_copied_pushed, c.pages_dropped), (pages, 0));
    h.finish();
}
