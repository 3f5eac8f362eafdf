//! `--churn`: every period (1) fork a short-lived child that verifies one chunk and exits with
//! its verdict, (2) re-initialise the pages dropped last time and MADV_DONTNEED the next range
//! (they read zero until re-initialised, and the checker verifies exactly that), (3) mremap one
//! chunk to a new address. These are the memory events a migration must carry over: a process
//! tree that changes, pages that vanish, mappings that move.

use crate::log::{StackLine, unix_ns};
use crate::logline;
use crate::shared::{Shared, next_deadline};
use std::fmt::Write as _;
use std::io;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

/// Pages dropped per tick (fewer at the end of a chunk).
const DONTNEED_PAGES: usize = 64;

pub fn run(sh: &Shared, period: Duration) {
    let chunks = sh.mem.chunks.len();
    let mut tick = 0usize;
    let mut cursor = 0usize;
    let mut dropped: Option<(usize, usize)> = None;
    let mut deadline = Instant::now() + period;
    while sh.sleep_until(deadline) {
        fork_verify(sh, tick % chunks);

        if let Some((first, count)) = dropped.take() {
            sh.mem.reinit(first, count);
            logline!(
                sh.log,
                "churn {} reinit first={first} count={count} unix_ns={}",
                sh.tag,
                unix_ns()
            );
        }
        let chunk = &sh.mem.chunks[sh.mem.chunk_of(cursor)];
        let (first, count) = (
            cursor,
            DONTNEED_PAGES.min(chunk.first + chunk.pages - cursor),
        );
        cursor = if first + count >= sh.mem.pages {
            0
        } else {
            first + count
        };
        match sh.mem.dontneed(first, count) {
            Ok(()) => {
                dropped = Some((first, count));
                logline!(
                    sh.log,
                    "churn {} dontneed first={first} count={count} unix_ns={}",
                    sh.tag,
                    unix_ns()
                );
            }
            Err(e) => fail(sh, "dontneed", &e),
        }

        let moved = (tick + chunks / 2) % chunks;
        match sh.mem.move_chunk(moved) {
            Ok((from, to)) => logline!(
                sh.log,
                "churn {} mremap chunk={moved} from={from:#x} to={to:#x} pages={} unix_ns={}",
                sh.tag,
                sh.mem.chunks[moved].pages,
                unix_ns()
            ),
            Err(e) => fail(sh, "mremap", &e),
        }
        tick += 1;
        deadline = next_deadline(deadline, period, Instant::now());
    }
}

fn fail(sh: &Shared, what: &str, e: &io::Error) {
    sh.churn_failed.fetch_add(1, Ordering::Relaxed);
    logline!(
        sh.log,
        "churn {} {what} FAIL error={:?} unix_ns={}",
        sh.tag,
        e.to_string(),
        unix_ns()
    );
}

/// Forks a child that verifies chunk `chunk` of its copy of the memory, logs a failure itself,
/// and exits 0 (ok) or 1 (bad page); the parent logs the verdict.
fn fork_verify(sh: &Shared, chunk: usize) {
    let t0 = Instant::now();
    // SAFETY: the child only runs allocation-free, lock-free code (verify_chunk_unlocked,
    // formatting into a stack buffer, write(2)) and leaves with _exit.
    let pid = unsafe { libc::fork() };
    if pid < 0 {
        return fail(sh, "fork", &io::Error::last_os_error());
    }
    if pid == 0 {
        let code = match sh.mem.verify_chunk_unlocked(chunk) {
            Ok(_) => 0,
            Err((page, fault)) => {
                let mut line = StackLine::new();
                let _ = writeln!(
                    line,
                    "churn {} forkchild FAIL chunk={chunk} page={page} {fault}",
                    sh.tag
                );
                let _ = sh.log.write_raw(line.as_bytes());
                1
            }
        };
        // SAFETY: ends the forked child without running the parent's atexit handlers.
        unsafe { libc::_exit(code) };
    }
    let mut status = 0;
    loop {
        // SAFETY: waits for our own child.
        let r = unsafe { libc::waitpid(pid, &mut status, 0) };
        if r == pid {
            break;
        }
        let e = io::Error::last_os_error();
        if r < 0 && e.kind() != io::ErrorKind::Interrupted {
            return fail(sh, "fork-wait", &e);
        }
    }
    let ms = t0.elapsed().as_secs_f64() * 1e3;
    if libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0 {
        logline!(
            sh.log,
            "churn {} fork ok pid={pid} chunk={chunk} ms={ms:.3} unix_ns={}",
            sh.tag,
            unix_ns()
        );
    } else {
        sh.churn_failed.fetch_add(1, Ordering::Relaxed);
        logline!(
            sh.log,
            "churn {} fork FAIL pid={pid} chunk={chunk} status={status:#x} unix_ns={}",
            sh.tag,
            unix_ns()
        );
    }
}
