//! SIGTERM to `pageserv demo` in the middle of a migration: every process it started (the
//! frozen source, `criu dump`, `pageserv src`/`dst`, the restored copy) ends, and its network
//! namespaces and testbed directory are gone (`pageserv_lab::interrupt`). Needs root and CRIU.

use std::os::fd::{AsFd, FromRawFd, OwnedFd};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

#[path = "common/root.rs"]
mod root;
use root::can_run;

fn pageserv() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_pageserv"))
}

fn netns_of(lab: u32) -> Vec<String> {
    let prefix = format!("psv{lab}-");
    std::fs::read_dir("/run/netns")
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with(&prefix))
        .collect()
}

fn dirs_of(lab: u32) -> Vec<PathBuf> {
    let prefix = format!("pageserv-psv{lab}-");
    std::fs::read_dir(std::env::temp_dir())
        .into_iter()
        .flatten()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with(&prefix))
        .map(|e| e.path())
        .collect()
}

/// Pidfds of the processes inside `ns` (`ip netns pids`).
fn pidfds_in(ns: &str) -> Vec<(i32, OwnedFd)> {
    let out = Command::new("ip")
        .args(["netns", "pids", ns])
        .output()
        .expect("ip netns pids");
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .filter_map(|p| p.parse::<i32>().ok())
        .filter_map(|pid| {
            // SAFETY: pidfd_open takes a pid and flags; a non-negative result is ours.
            let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
            (fd >= 0).then(|| (pid, unsafe { OwnedFd::from_raw_fd(fd as i32) }))
        })
        .collect()
}

/// Pidfds of the descendants of `root` (the `/proc` parent chain).
fn pidfds_below(root: i32) -> Vec<(i32, OwnedFd)> {
    let parent = |pid: i32| -> Option<i32> {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
        stat[stat.rfind(')')? + 1..]
            .split_whitespace()
            .nth(1)?
            .parse()
            .ok()
    };
    let all: Vec<(i32, i32)> = std::fs::read_dir("/proc")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
        .filter_map(|p| Some((p, parent(p)?)))
        .collect();
    let mut below = vec![root];
    let mut i = 0;
    while i < below.len() {
        let p = below[i];
        below.extend(all.iter().filter(|(_, pp)| *pp == p).map(|(c, _)| *c));
        i += 1;
    }
    below
        .into_iter()
        .skip(1)
        .filter_map(|pid| {
            // SAFETY: pidfd_open takes a pid and flags; a non-negative result is ours.
            let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
            (fd >= 0).then(|| (pid, unsafe { OwnedFd::from_raw_fd(fd as i32) }))
        })
        .collect()
}

/// Whether a `criu dump --lazy-pages` runs below `root`.
fn lazy_dump_below(root: i32) -> bool {
    pidfds_below(root).iter().any(|(pid, _)| {
        let cmd = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
        let cmd = String::from_utf8_lossy(&cmd);
        cmd.contains("criu") && cmd.contains("dump") && cmd.contains("--lazy-pages")
    })
}

fn exited(fd: &OwnedFd) -> bool {
    let mut fds = [nix::poll::PollFd::new(
        fd.as_fd(),
        nix::poll::PollFlags::POLLIN,
    )];
    matches!(nix::poll::poll(&mut fds, nix::poll::PollTimeout::ZERO), Ok(n) if n > 0)
}

#[test]
fn sigterm_mid_migration_leaves_no_process_namespace_or_directory() {
    if !can_run() {
        return;
    }
    // A 1 Gbit/s link makes the post-copy of 512 MiB last ~5 s: long enough to interrupt it.
    let mut lab = Command::new(pageserv())
        .args(["demo", "--mib", "512", "--rate", "1gbit", "--after", "30"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start pageserv demo");
    let pid = lab.id();
    // A failed assertion before the SIGTERM below must not leave the demo running: the guard
    // sends it (and so exercises the cleanup) when the test unwinds.
    struct Stop(u32);
    impl Drop for Stop {
        fn drop(&mut self) {
            // SAFETY: our child's pid; a no-op once it has exited and been reaped.
            unsafe { libc::kill(self.0 as i32, libc::SIGTERM) };
        }
    }
    let _stop = Stop(pid);
    // Wait until the destination's namespace holds pageserv dst and the restored workload
    // (3 processes or more: dst, its keeper or criu restore, the workload).
    let deadline = Instant::now() + Duration::from_secs(90);
    let mut watched = Vec::new();
    while Instant::now() < deadline {
        if let Some(status) = lab.try_wait().expect("try_wait") {
            panic!("the demo ended before it could be interrupted: {status}");
        }
        // Post-copy: `criu dump --lazy-pages` serving (its tasks frozen) while the restored copy
        // runs in the destination's namespace beside pageserv dst.
        watched = netns_of(pid).iter().flat_map(|ns| pidfds_in(ns)).collect();
        if watched.len() >= 2 && lazy_dump_below(pid as i32) {
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(
        watched.len() >= 2 && lazy_dump_below(pid as i32),
        "no post-copy running in the demo within 90 s"
    );
    watched = netns_of(pid).iter().flat_map(|ns| pidfds_in(ns)).collect();
    let below = pidfds_below(pid as i32);
    assert!(
        below.len() >= 3,
        "the demo should have started the workload, pageserv src and dst: {:?}",
        below.iter().map(|(p, _)| p).collect::<Vec<_>>()
    );
    // Nothing the lab starts inherits a blocked SIGINT/SIGTERM/SIGHUP (a blocked mask in the lab
    // once did: the workloads then ignored the bench's SIGTERM and outlived their runs).
    for (p, _) in &below {
        // Only the workloads: `unshare -f`, their parent, blocks SIGINT and SIGTERM by design
        // and is skipped.
        let comm = std::fs::read_to_string(format!("/proc/{p}/comm")).unwrap_or_default();
        if comm.trim() != "workload" {
            continue;
        }
        let status = std::fs::read_to_string(format!("/proc/{p}/status")).unwrap_or_default();
        if let Some(blk) = status.lines().find_map(|l| l.strip_prefix("SigBlk:")) {
            let mask = u64::from_str_radix(blk.trim(), 16).expect("SigBlk is hex");
            let ours =
                (1 << (libc::SIGHUP - 1)) | (1 << (libc::SIGINT - 1)) | (1 << (libc::SIGTERM - 1));
            assert_eq!(
                mask & ours,
                0,
                "workload {p} blocks SIGHUP/SIGINT/SIGTERM: {blk}"
            );
        }
    }
    watched.extend(below);
    // SAFETY: signalling our own child by its pid; it has not been reaped (try_wait said so).
    assert_eq!(unsafe { libc::kill(pid as i32, libc::SIGTERM) }, 0);
    // Read stderr on a thread: a survivor holding the pipe must fail the test, not hang it.
    let mut pipe = lab.stderr.take().expect("stderr piped");
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut text = String::new();
        let _ = std::io::Read::read_to_string(&mut pipe, &mut text);
        let _ = tx.send(text);
    });
    let deadline = Instant::now() + Duration::from_secs(60);
    let status = loop {
        if let Some(s) = lab.try_wait().expect("try_wait") {
            break s;
        }
        assert!(
            Instant::now() < deadline,
            "the demo did not exit within 60 s of SIGTERM"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    let stderr = rx
        .recv_timeout(Duration::from_secs(10))
        .unwrap_or_else(|_| "(stderr still held open by a survivor)".into());
    assert_eq!(
        status.code(),
        Some(128 + libc::SIGTERM),
        "the demo's exit after SIGTERM; stderr:\n{stderr}"
    );
    assert!(
        stderr.contains("stopping what this run started"),
        "{stderr}"
    );
    eprintln!(
        "watched {} processes; the demo said:\n{stderr}",
        watched.len()
    );
    let left: Vec<i32> = watched
        .iter()
        .filter(|(_, fd)| !exited(fd))
        .map(|(p, _)| *p)
        .collect();
    assert!(
        left.is_empty(),
        "still running after the demo's exit: {left:?}\n{stderr}"
    );
    assert!(
        netns_of(pid).is_empty(),
        "namespaces left: {:?}",
        netns_of(pid)
    );
    assert!(
        dirs_of(pid).is_empty(),
        "directories left: {:?}",
        dirs_of(pid)
    );
}
