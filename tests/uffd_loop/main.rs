//! The fault loop and lazy-pages.socket against the real kernel (needs root: uffds with
//! EVENT_FORK need CAP_SYS_PTRACE). Run `cargo test --release --test uffd_loop -- --nocapture`
//! for the throughput and latency numbers.
//!
//! By topic:
//! - `faults_and_pushes`: faults answered by a fake source and by pages held here, background
//!   pushes, zero runs, batched arrivals, and pushes that come before the ranges are registered;
//! - `address_space_changes`: madvise(DONTNEED), mremap and fork while pages are pending, copies
//!   racing with mremap (EAGAIN) and a VMA split inside a pushed run (ENOENT);
//! - `lazy_socket`: lazy-pages.socket with a fake restore;
//! - `killed_at_shutdown`: restored processes (and their fork children) whose memory is
//!   incomplete at shutdown are killed;
//! - `measure`: UFFDIO_COPY throughput and the fault round trip;
//! - `on_the_lane`: a sender on the fault lane, where the loop runs, never blocks it;
//! - `support`: what they share (raw userfaultfd setup, regions, page content, the loop around a
//!   fake source).

macro_rules! require_root {
    () => {
        if unsafe { libc::geteuid() } != 0 {
            eprintln!("SKIP: needs root (userfaultfd with EVENT_FORK needs CAP_SYS_PTRACE)");
            return;
        }
    };
}

mod address_space_changes;
mod faults_and_pushes;
mod killed_at_shutdown;
mod lazy_socket;
mod measure;
mod on_the_lane;
mod support;
