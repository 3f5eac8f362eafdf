//! dst's early restore (`dst::early_restore`) against real CRIU: `criu restore --stream` started
//! before any image exists reads nothing until it is sent on, a dropped one is killed and
//! reaped, and one sent on restores a real lazy dump through the image streamer, its lazy pages
//! served by CRIU's own lazy-pages daemon from the dump's page server. Needs root and CRIU
//! (skips with a message otherwise).

#[path = "common/criu.rs"]
mod criu;
#[path = "common/holder.rs"]
mod holder;

use std::os::unix::fs::FileExt;
use std::time::Duration;

use pageserv::dst::early_restore::EarlyRestore;
use pageserv::dst::restore::RestoreOptions;

use holder::{HOLDER_PAGES, PAGE};

/// The holder's entry point when the binary is re-executed (a no-op in a normal run).
#[test]
fn memory_holder() {
    holder::run_if_requested();
}

fn early(criu: &criu::Criu, dir: &criu::TestDir) -> EarlyRestore {
    let criu = pageserv::criu::binary::Criu::at(&criu.bin).expect("CRIU's version");
    let opts = RestoreOptions {
        early: true,
        ..Default::default()
    };
    EarlyRestore::start(
        &criu,
        &dir.sub("stream"),
        &dir.sub("work"),
        &opts,
        Vec::new(),
    )
    .expect("starting criu restore --stream")
    .expect("the default restore command starts early")
}

/// `/proc/PID/stat`'s state letter; `None` once the pid is gone.
fn state(pid: u32) -> Option<char> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    s.rsplit(')').next()?.trim_start().chars().next()
}

#[test]
fn an_early_restore_reads_nothing_until_sent_on_and_dies_with_its_guard() {
    let Some(c) =
        criu::require("an_early_restore_reads_nothing_until_sent_on_and_dies_with_its_guard")
    else {
        return;
    };
    let dir = criu::TestDir::new("early-restore-drop");
    // CRIU opens its log after connecting to the streamer, then probes the kernel, then asks for
    // inventory.img, which no one answers.
    let mut e = early_and_connected(&c, &dir);
    let pid = e.pid().expect("a waiting restore has a pid");
    let log = dir.path().join("work/restore.log");
    std::thread::sleep(Duration::from_millis(700));
    assert!(
        matches!(state(pid), Some(s) if s != 'Z'),
        "criu restore (pid {pid}) must still wait for its images: {:?}\n{}",
        state(pid),
        criu::log_tail(&log, 20)
    );
    assert!(
        !dir.path().join("work/restore.pid").exists(),
        "nothing may be restored before go"
    );
    assert!(e.is_waiting(), "a connected, running restore is waiting");
    drop(e);
    criu::wait_for(
        Duration::from_secs(5),
        "the dropped restore to be gone",
        || state(pid).is_none(),
    )
    .unwrap_or_else(|err| panic!("{err}: pid {pid} is {:?}", state(pid)));
}

#[test]
fn an_early_restore_sent_on_restores_a_lazy_dump() {
    let Some(c) = criu::require("an_early_restore_sent_on_restores_a_lazy_dump") else {
        return;
    };
    criu::ensure_pipe_max_size().unwrap();
    let dir = criu::TestDir::new("early-restore-go");
    let img = dir.sub("img");
    let work = dir.sub("work");
    // As in a migration: the restore starts before the tree is even dumped.
    let e = early(&c, &dir);
    let mut h = holder::spawn("memory_holder", dir.path()).unwrap();
    let (mut dump, port) = c
        .lazy_dump(h.proc.pid, &img, &dir.path().join("dump.log"))
        .unwrap();
    let img_s = img.to_str().unwrap();
    h.proc.wait_gone(Duration::from_secs(1)).ok();
    // CRIU's own lazy-pages daemon, on the restore's work directory's lazy-pages.socket.
    let mut daemon = c
        .spawn(
            &[
                "lazy-pages",
                "-D",
                img_s,
                "-W",
                work.to_str().unwrap(),
                "--page-server",
                "--address",
                "127.0.0.1",
                "--port",
                &port,
            ],
            &dir.path().join("lazy-pages.log"),
            false,
        )
        .unwrap();
    criu::wait_for(Duration::from_secs(20), "lazy-pages.socket", || {
        work.join("lazy-pages.socket").exists()
    })
    .unwrap();

    let mut restore = e.go(&img);
    let status = criu::wait_for(Duration::from_secs(60), "the restore to finish", || {
        matches!(restore.try_wait(), Ok(Some(_)))
    });
    let log = work.join("restore.log");
    status.unwrap_or_else(|err| panic!("{err}\n{}", criu::log_tail(&log, 30)));
    let restored: u32 = restore
        .root_pid()
        .unwrap_or_else(|| panic!("no pidfile\n{}", criu::log_tail(&log, 30)))
        as u32;
    // The daemon ends once it has placed every lazy page (a page still missing cannot be read
    // from another process: userfaultfd serves only the faults of the tasks themselves).
    daemon.wait(Duration::from_secs(60)).unwrap_or_else(|e| {
        panic!(
            "{e}\n{}",
            criu::log_tail(&dir.path().join("lazy-pages.log"), 20)
        )
    });
    // Every page the holder wrote reads back as it wrote it: the images came through the
    // streamer, in the order CRIU asked for them, and the restore placed the rest right.
    let mem = std::fs::File::open(format!("/proc/{restored}/mem")).unwrap();
    let mut page = vec![0u8; PAGE as usize];
    let mut checked = 0;
    for i in (0..HOLDER_PAGES)
        .filter(|&i| holder::is_dumped(i))
        .step_by(7)
    {
        mem.read_exact_at(&mut page, h.addr + i * PAGE).unwrap();
        assert_eq!(page, holder::expected_page(i), "page {i}");
        checked += 1;
    }
    assert!(checked > 10, "{checked} pages checked");
    let _ = nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(restored as i32),
        nix::sys::signal::Signal::SIGKILL,
    );
    if let Err(e) = dump.wait(Duration::from_secs(20)) {
        panic!("{e}\n{}", criu::log_tail(&dir.path().join("dump.log"), 10));
    }
}

/// Starts an early restore and waits until CRIU has connected and probed (its log exists).
fn early_and_connected(c: &criu::Criu, dir: &criu::TestDir) -> EarlyRestore {
    let e = early(c, dir);
    let log = dir.path().join("work/restore.log");
    criu::wait_for(Duration::from_secs(20), "criu restore's log", || {
        log.exists()
    })
    .unwrap();
    e
}

/// A restore that ended while it waited (here: killed) is not waiting any more, so dst starts a
/// new one rather than send on a dead one.
#[test]
fn an_early_restore_that_ended_is_not_waiting() {
    let Some(c) = criu::require("an_early_restore_that_ended_is_not_waiting") else {
        return;
    };
    let dir = criu::TestDir::new("early-restore-ended");
    let mut e = early_and_connected(&c, &dir);
    let pid = e.pid().expect("a waiting restore has a pid");
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid as i32),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    criu::wait_for(
        Duration::from_secs(5),
        "the killed restore to stop waiting",
        || !e.is_waiting(),
    )
    .unwrap();
}

/// An image that exists but cannot be opened is never answered "no such image" (CRIU would
/// take it as empty and restore without it): the restore is killed and fails.
#[test]
fn an_image_that_cannot_be_opened_kills_the_restore() {
    let Some(c) = criu::require("an_image_that_cannot_be_opened_kills_the_restore") else {
        return;
    };
    let dir = criu::TestDir::new("early-restore-unreadable");
    let images = dir.sub("images");
    // A symlink loop: open() fails with ELOOP, not ENOENT.
    std::os::unix::fs::symlink("inventory.img", images.join("inventory.img")).unwrap();
    let e = early_and_connected(&c, &dir);
    let mut restore = e.go(&images);
    let mut status = None;
    criu::wait_for(Duration::from_secs(20), "the restore to end", || {
        status = restore.try_wait().ok().flatten();
        status.is_some()
    })
    .unwrap();
    let status = status.unwrap();
    use std::os::unix::process::ExitStatusExt;
    assert_eq!(
        status.signal(),
        Some(nix::libc::SIGKILL),
        "the streamer kills the restore: {status}"
    );
}
