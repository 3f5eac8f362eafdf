//! `--park-on-aligned-stack`: one thread that sleeps forever with a page-aligned stack pointer.
//!
//! It exists to reproduce, on demand, CRIU's stack-page test (see pageserv's
//! `source::eager_dump`): when any thread's stack pointer is page-aligned at the freeze,
//! `criu dump --lazy-pages` writes the whole memory of the task into the images instead of
//! leaving it lazy. A thread blocked in a syscall keeps the same stack pointer at every freeze,
//! so every dump of this process comes out eager, and tests can check what pageserv does then.
//!
//! The thread blocks every signal, switches to a stack of its own whose top is page-aligned and
//! loops on `pause(2)` there; it never returns and touches no memory of that stack.

use anyhow::{Context, bail};

/// Bytes of the parked thread's own stack (it pushes nothing; a signal is never delivered to it).
const STACK_BYTES: usize = 64 * 1024;

/// Starts the parked thread (detached: it ends with the process).
pub fn spawn() -> anyhow::Result<()> {
    // SAFETY: an anonymous private mapping; the pointer is checked below.
    let stack = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            STACK_BYTES,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
            -1,
            0,
        )
    };
    if stack == libc::MAP_FAILED {
        bail!(
            "mapping the aligned stack: {}",
            std::io::Error::last_os_error()
        );
    }
    let top = stack as usize + STACK_BYTES;
    std::thread::Builder::new()
        .name("aligned-stack".into())
        .spawn(move || park(top))
        .context("starting the aligned-stack thread")?;
    Ok(())
}

#[cfg(not(target_arch = "x86_64"))]
fn park(_top: usize) -> ! {
    panic!("--park-on-aligned-stack is built for x86_64 only")
}

#[cfg(target_arch = "x86_64")]
fn park(top: usize) -> ! {
    // SAFETY: blocks signals of this thread only.
    unsafe {
        let mut all: libc::sigset_t = std::mem::zeroed();
        libc::sigfillset(&mut all);
        libc::pthread_sigmask(libc::SIG_BLOCK, &all, std::ptr::null_mut());
    }
    // SAFETY: `top` is the page-aligned end of a mapping this thread alone uses; from here the
    // thread only issues pause(2) in a loop (no call, no push), so nothing is written below it,
    // and it never returns to Rust code.
    unsafe {
        std::arch::asm!(
            "mov rsp, {top}",
            "2:",
            "mov eax, {nr}",
            "syscall",
            "jmp 2b",
            top = in(reg) top,
            nr = const libc::SYS_pause,
            options(noreturn)
        )
    }
}
