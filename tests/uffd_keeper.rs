//! The uffd keeper process on its own (no CRIU): what it holds when its dst dies, that a
//! restarted dst adopts it over its socket, and that past the recover timeout it kills.
//!
//! The "restored task" is a `sleep` started here, with a real userfaultfd of this process as
//! the uffd it holds (the keeper only keeps descriptors open; it never reads them).

use std::os::fd::{AsFd, FromRawFd, OwnedFd};
use std::path::PathBuf;
use std::process::{Child, Command};
use std::time::{Duration, Instant};

use pageserv::dst::uffd_keeper::policy::Holding;
use pageserv::dst::uffd_keeper::{self, KEEPER_SOCKET, UffdKeeper};

fn exe() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_pageserv"))
}

fn dir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("pageserv-keeper-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// A userfaultfd (falls back to an eventfd where userfaultfd is not allowed: the keeper only
/// holds descriptors).
fn some_uffd() -> OwnedFd {
    // SAFETY: plain syscalls returning a new descriptor or -1.
    let fd = unsafe { libc::syscall(libc::SYS_userfaultfd, libc::O_CLOEXEC) } as i32;
    let fd = if fd >= 0 {
        fd
    } else {
        unsafe { libc::eventfd(0, libc::EFD_CLOEXEC) }
    };
    assert!(fd >= 0);
    // SAFETY: fresh descriptor.
    unsafe { OwnedFd::from_raw_fd(fd) }
}

fn sleeper() -> Child {
    Command::new("sleep").arg("60").spawn().unwrap()
}

fn wait_for(what: &str, timeout: Duration, mut f: impl FnMut() -> bool) {
    let end = Instant::now() + timeout;
    while !f() {
        assert!(Instant::now() < end, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn alive(c: &mut Child) -> bool {
    c.try_wait().unwrap().is_none()
}

#[test]
fn orphaned_keeper_is_adopted_then_kills_at_the_timeout() {
    let d = dir("adopt");
    let mut task = sleeper();
    let pid = task.id() as i32;
    let keeper = UffdKeeper::spawn(&exe(), &d, Duration::from_millis(1500)).unwrap();
    let uffd = some_uffd();
    keeper.hold(7, pid, uffd.as_fd()).unwrap();
    // dst dies: the keeper holds on and listens.
    drop(keeper);
    let sock = d.join(KEEPER_SOCKET);
    wait_for("the keeper socket", Duration::from_secs(5), || {
        sock.exists()
    });
    assert!(alive(&mut task), "the keeper killed at once");

    let adopted = uffd_keeper::adopt(&d).unwrap();
    assert_eq!(adopted.held.len(), 1);
    let start = uffd_keeper::start_time(pid).unwrap();
    assert_eq!(
        adopted.held[0].0,
        Holding::Task {
            image_pid: 7,
            host_pid: pid,
            start_time: start
        }
    );
    // A second adopter finds nobody listening (the keeper is attached again).
    wait_for("the socket to go", Duration::from_secs(5), || {
        !sock.exists()
    });
    assert!(uffd_keeper::adopt(&d).is_err());
    // Well past the first timeout: the adopter holds it.
    std::thread::sleep(Duration::from_millis(2000));
    assert!(alive(&mut task), "the adopted task was killed");

    // The adopter dies too: after another recover timeout the task is killed.
    drop(adopted);
    wait_for("the keeper socket again", Duration::from_secs(5), || {
        sock.exists()
    });
    wait_for("the kill", Duration::from_secs(10), || !alive(&mut task));
    let _ = std::fs::remove_dir_all(&d);
}

#[test]
fn released_keeper_kills_nothing() {
    let d = dir("release");
    let mut task = sleeper();
    let keeper = UffdKeeper::spawn(&exe(), &d, Duration::from_millis(200)).unwrap();
    keeper
        .hold(1, task.id() as i32, some_uffd().as_fd())
        .unwrap();
    keeper.release();
    std::thread::sleep(Duration::from_millis(600));
    assert!(alive(&mut task));
    assert!(!d.join(KEEPER_SOCKET).exists());
    let _ = task.kill();
    let _ = task.wait();
    let _ = std::fs::remove_dir_all(&d);
}
