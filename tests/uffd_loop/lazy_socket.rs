//! lazy-pages.socket with a fake restore: tasks with their uffds (and zombies), the restore's
//! finish or early hangup, a long work dir, and the accept timeout.

use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::UnixStream;
use std::time::Duration;

use pageserv::dst::lazy_socket::{LazySocket, LazySocketError, RESTORE_FINISHED};

use crate::support::*;

// ---- (e) lazy-pages.socket with a fake restore ----

fn send_fd(sock: &UnixStream, fd: RawFd) {
    use nix::sys::socket::{ControlMessage, MsgFlags, sendmsg};
    let iov = [std::io::IoSlice::new(&[0u8])];
    let fds = [fd];
    sendmsg::<()>(
        sock.as_raw_fd(),
        &iov,
        &[ControlMessage::ScmRights(&fds)],
        MsgFlags::empty(),
        None,
    )
    .unwrap();
}

fn temp_dir(tag: &str) -> std::path::PathBuf {
    let d = std::env::temp_dir().join(format!("pageserv-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

#[test]
fn lazy_socket_receives_tasks_and_finish() {
    require_root!();
    let _g = serial();
    let dir = temp_dir("lazysock");
    // A stale socket file is replaced.
    std::fs::write(dir.join("lazy-pages.socket"), b"stale").unwrap();
    let sock = LazySocket::bind(&dir).unwrap();
    let path = sock.path().to_owned();
    let region = Region::new(MIB);
    let uffd = new_uffd(region.addr, region.len);
    let uffd_raw = uffd.as_raw_fd();
    let restore = std::thread::spawn(move || {
        use std::io::Write;
        let mut s = UnixStream::connect(&path).unwrap();
        s.write_all(&100i32.to_ne_bytes()).unwrap();
        send_fd(&s, uffd_raw);
        s.write_all(&(-101i32).to_ne_bytes()).unwrap();
        // A pid split over two writes.
        let w = 102i32.to_ne_bytes();
        s.write_all(&w[..2]).unwrap();
        std::thread::sleep(Duration::from_millis(20));
        s.write_all(&w[2..]).unwrap();
        send_fd(&s, uffd_raw);
        std::thread::sleep(Duration::from_millis(20));
        s.write_all(&RESTORE_FINISHED.to_ne_bytes()).unwrap();
        s
    });
    let mut conn = sock
        .accept_restore_within(3, Duration::from_secs(10))
        .unwrap();
    conn.set_timeout(Some(Duration::from_secs(10)));
    let me = std::process::id() as i32;
    let t1 = conn.next_task().unwrap();
    assert_eq!((t1.pid, t1.sender_pid), (100, Some(me)));
    let fd = t1.uffd.expect("a live task's uffd");
    let link = std::fs::read_link(format!("/proc/self/fd/{}", fd.as_raw_fd())).unwrap();
    assert_eq!(link.to_str().unwrap(), "anon_inode:[userfaultfd]");
    let t2 = conn.next_task().unwrap();
    assert!(t2.is_zombie() && t2.pid == 101);
    let t3 = conn.next_task().unwrap();
    assert_eq!(t3.pid, 102);
    assert!(t3.uffd.is_some());
    assert_eq!(conn.tasks_remaining(), 0);
    assert!(conn.next_task().is_err(), "no fourth record");
    conn.wait_restore_finished().unwrap();
    drop(restore.join().unwrap());
    drop(uffd);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn lazy_socket_reports_an_early_hangup() {
    let _g = serial();
    let dir = temp_dir("lazyhup");
    let sock = LazySocket::bind(&dir).unwrap();
    let path = sock.path().to_owned();
    let restore = std::thread::spawn(move || {
        use std::io::Write;
        let mut s = UnixStream::connect(&path).unwrap();
        s.write_all(&(-5i32).to_ne_bytes()).unwrap();
    });
    let mut conn = sock.accept_restore(1).unwrap();
    assert!(conn.next_task().unwrap().is_zombie());
    restore.join().unwrap();
    let err = conn.wait_restore_finished().unwrap_err();
    assert!(matches!(err, LazySocketError::Hangup { .. }), "{err}");
    assert!(
        err.to_string()
            .contains("restore ended before it finished: see restore log")
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn lazy_socket_binds_in_a_long_work_dir() {
    let _g = serial();
    let dir = temp_dir(&"d".repeat(120));
    let sock = LazySocket::bind(&dir).unwrap();
    assert!(dir.join("lazy-pages.socket").exists());
    let d = std::fs::File::open(&dir).unwrap();
    let short = format!("/proc/self/fd/{}/lazy-pages.socket", d.as_raw_fd());
    let client = std::thread::spawn(move || {
        use std::io::Write;
        let mut s = UnixStream::connect(short).unwrap();
        s.write_all(&RESTORE_FINISHED.to_ne_bytes()).unwrap();
    });
    let mut conn = sock
        .accept_restore_within(0, Duration::from_secs(10))
        .unwrap();
    conn.wait_restore_finished().unwrap();
    client.join().unwrap();
    assert!(
        !dir.join("lazy-pages.socket").exists(),
        "unlinked after accept"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn accept_times_out_without_a_restore() {
    let _g = serial();
    let dir = temp_dir("lazyto");
    let sock = LazySocket::bind(&dir).unwrap();
    let err = sock
        .accept_restore_within(1, Duration::from_millis(100))
        .err()
        .unwrap();
    assert!(matches!(err, LazySocketError::Timeout { .. }), "{err}");
    let _ = std::fs::remove_dir_all(&dir);
}
