//! A separate (forked) process whose memory is incomplete at shutdown is killed, and so is its
//! own fork child.

use std::io::Read;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

use pageserv::dst::uffd_loop::LoopConfig;

use crate::support::*;

// ---- (f) a separate process whose memory is incomplete at shutdown is killed ----

/// What a restored child does first: creates its own uffd, registers `[addr, addr + len)`,
/// sends the uffd over `sock` and closes its copy. Async-signal-safe; exits 10 or 11 on failure.
fn uffd_handed_over(sock: RawFd, addr: u64, len: u64) {
    unsafe {
        let fd = raw_uffd();
        if fd < 0 || !raw_register(fd, addr, len) {
            libc::_exit(10);
        }
        let mut byte = 0u8;
        let mut iov = libc::iovec {
            iov_base: (&mut byte as *mut u8).cast(),
            iov_len: 1,
        };
        let mut cbuf = [0u64; 4];
        let mut msg: libc::msghdr = std::mem::zeroed();
        msg.msg_iov = &mut iov;
        msg.msg_iovlen = 1;
        msg.msg_control = cbuf.as_mut_ptr().cast();
        msg.msg_controllen = libc::CMSG_SPACE(4) as usize;
        let c = libc::CMSG_FIRSTHDR(&msg);
        (*c).cmsg_level = libc::SOL_SOCKET;
        (*c).cmsg_type = libc::SCM_RIGHTS;
        (*c).cmsg_len = libc::CMSG_LEN(4) as usize;
        std::ptr::write_unaligned(libc::CMSG_DATA(c).cast::<RawFd>(), fd);
        if libc::sendmsg(sock, &msg, 0) != 1 {
            libc::_exit(11);
        }
        libc::close(fd);
    }
}

/// Child side of a "restored process": creates its own uffd, registers `addr`, sends it over
/// `sock`, closes it, reads page 0 (served), reports a checksum, then reads page 100 (never
/// served). Async-signal-safe only.
fn restored_child(sock: RawFd, pipe: RawFd, addr: u64, len: u64) -> ! {
    unsafe {
        uffd_handed_over(sock, addr, len);
        let sum = checksum(addr, 1);
        libc::write(pipe, (&sum as *const u64).cast(), 8);
        let _ = std::ptr::read_volatile((addr + 100 * P) as *const u8);
        libc::_exit(12);
    }
}

fn recv_fd(sock: &UnixStream) -> OwnedFd {
    use nix::sys::socket::{ControlMessageOwned, MsgFlags, recvmsg};
    let mut b = [0u8; 1];
    let mut iov = [std::io::IoSliceMut::new(&mut b)];
    let mut cmsg = nix::cmsg_space!([RawFd; 1]);
    let msg = recvmsg::<()>(
        sock.as_raw_fd(),
        &mut iov,
        Some(&mut cmsg),
        MsgFlags::empty(),
    )
    .unwrap();
    for c in msg.cmsgs().unwrap() {
        if let ControlMessageOwned::ScmRights(fds) = c {
            return unsafe { OwnedFd::from_raw_fd(fds[0]) };
        }
    }
    panic!("no fd from the child");
}

/// Forks a "restored process" running `child` on `region`; returns its pid, the read end of
/// its report pipe and the uffd it handed over.
fn restored_process(
    region: &Region,
    child: fn(RawFd, RawFd, u64, u64) -> !,
) -> (libc::pid_t, std::fs::File, OwnedFd) {
    let (parent_sock, child_sock) = UnixStream::pair().unwrap();
    let mut fds = [0; 2];
    assert_eq!(unsafe { libc::pipe(fds.as_mut_ptr()) }, 0);
    let pid = unsafe { libc::fork() };
    if pid == 0 {
        child(child_sock.as_raw_fd(), fds[1], region.addr, region.len);
    }
    assert!(pid > 0, "fork: {}", std::io::Error::last_os_error());
    unsafe { libc::close(fds[1]) };
    let pipe = unsafe { std::fs::File::from_raw_fd(fds[0]) };
    (pid, pipe, recv_fd(&parent_sock))
}

fn refuse_beyond_first_page(base: u64, img: u64) -> bool {
    img != base
}

#[test]
fn incomplete_processes_are_killed_at_shutdown() {
    require_root!();
    let _g = serial();
    let region = Region::new(MIB);
    let (base, pages) = (region.addr, region.pages());
    let img = image(base, pages);
    let (child, mut pipe, uffd) = restored_process(&region, restored_child);
    let h = start(
        LoopConfig::default(),
        2000,
        base,
        img,
        refuse_beyond_first_page,
    );
    h.restored(2000, uffd, region.lazy(), Some(child));
    // Cross-process copy: the child saw page 0's image data.
    let mut buf = [0u8; 8];
    pipe.read_exact(&mut buf).unwrap();
    assert_eq!(u64::from_ne_bytes(buf), expected_checksum(base, 0, 1));
    // Let it block on page 100, which the source never answers.
    let deadline = Instant::now() + Duration::from_secs(10);
    while h.stats.counters().faults < 2 {
        assert!(
            Instant::now() < deadline,
            "the child never faulted on page 100"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    let report = h.handle.shutdown(true).unwrap();
    assert_eq!(report.incomplete, vec![2000]);
    assert_eq!(report.killed, vec![child]);
    let mut status = 0;
    assert_eq!(unsafe { libc::waitpid(child, &mut status, 0) }, child);
    assert!(
        libc::WIFSIGNALED(status) && libc::WTERMSIG(status) == libc::SIGKILL,
        "status {status:#x}"
    );
    h.source.join().unwrap();
}

// ---- a restored process's fork child is killed too ----

/// Like `restored_child`, but forks first: the grandchild reports its pid, then both block on
/// pages the source never sends.
fn forking_child(sock: RawFd, pipe: RawFd, addr: u64, len: u64) -> ! {
    unsafe {
        uffd_handed_over(sock, addr, len);
        let g = libc::fork();
        if g == 0 {
            let _ = std::ptr::read_volatile((addr + 100 * P) as *const u8);
            libc::_exit(13);
        }
        libc::write(pipe, (&g as *const i32).cast(), 4);
        let _ = std::ptr::read_volatile((addr + 101 * P) as *const u8);
        libc::_exit(12);
    }
}

#[test]
fn fork_children_of_incomplete_processes_are_killed() {
    require_root!();
    let _g = serial();
    let region = Region::new(MIB);
    let (base, pages) = (region.addr, region.pages());
    let img = image(base, pages);
    let (child, mut pipe, uffd) = restored_process(&region, forking_child);
    let h = start(LoopConfig::default(), 2100, base, img, |_, _| true);
    h.restored(2100, uffd, region.lazy(), Some(child));
    let mut buf = [0u8; 4];
    pipe.read_exact(&mut buf).unwrap();
    let grandchild = i32::from_ne_bytes(buf);
    let deadline = Instant::now() + Duration::from_secs(10);
    while h.stats.counters().faults < 2 {
        assert!(
            Instant::now() < deadline,
            "child and grandchild never faulted"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    assert_eq!(
        h.stats.counters().tasks,
        2,
        "the fork child has its own view"
    );
    let report = h.handle.shutdown(true).unwrap();
    assert_eq!(report.incomplete, vec![2100, 2100]);
    let mut want = vec![child, grandchild];
    want.sort();
    assert_eq!(report.killed, want);
    let mut status = 0;
    assert_eq!(unsafe { libc::waitpid(child, &mut status, 0) }, child);
    assert!(libc::WIFSIGNALED(status) && libc::WTERMSIG(status) == libc::SIGKILL);
    // The grandchild is not ours to reap: it is dead once /proc shows it gone or a zombie.
    let stat = std::fs::read_to_string(format!("/proc/{grandchild}/stat")).unwrap_or_default();
    let state = stat
        .rsplit(')')
        .next()
        .and_then(|r| r.split_whitespace().next());
    assert!(
        matches!(state, None | Some("Z") | Some("X")),
        "grandchild state {state:?}"
    );
    h.source.join().unwrap();
}
