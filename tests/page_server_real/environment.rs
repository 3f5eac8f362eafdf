//! The environment the tests run in: CRIU found and checked, scratch directories, `criu dump`
//! started with the fds it is given, its status byte and log, and the pagemap image it writes.

use std::fs;
use std::io::Read;
use std::net::TcpListener;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use pageserv::criu::PeFlags;
use prost::Message;

use crate::{Holder, TIMEOUT};

// ----- environment -------------------------------------------------------------------------------

pub(crate) fn find_criu() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("PAGESERV_CRIU") {
        return Some(PathBuf::from(p));
    }
    let opt = PathBuf::from("/opt/pageserv/criu/bin/criu");
    if opt.exists() {
        return Some(opt);
    }
    std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|d| d.join("criu"))
            .find(|p| p.exists())
    })
}

/// CRIU, root and a large enough pipe-max-size, or `None` after printing why the test skips.
pub(crate) fn setup(test: &str) -> Option<PathBuf> {
    let Some(criu) = find_criu() else {
        eprintln!(
            "SKIP {test}: CRIU not found ($PAGESERV_CRIU, /opt/pageserv/criu/bin/criu, PATH)"
        );
        return None;
    };
    // SAFETY: geteuid has no preconditions.
    assert_eq!(
        unsafe { libc::geteuid() },
        0,
        "{test} needs root to run CRIU"
    );
    let max: u64 = fs::read_to_string("/proc/sys/fs/pipe-max-size")
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    if max < 8_388_608 {
        fs::write("/proc/sys/fs/pipe-max-size", "8388608").unwrap();
    }
    Some(criu)
}

pub(crate) fn scratch_dir(tag: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("pageserv-psreal-{}-{tag}", std::process::id()));
    let _ = fs::remove_dir_all(&dir);
    fs::create_dir_all(&dir).unwrap();
    dir
}

pub(crate) fn wait_timeout(child: &mut Child, timeout: Duration) -> Option<ExitStatus> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(st) = child.try_wait().unwrap() {
            return Some(st);
        }
        if Instant::now() >= deadline {
            return None;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

pub(crate) fn log_tail(dir: &Path) -> String {
    let log = fs::read_to_string(dir.join("dump.log")).unwrap_or_default();
    let lines: Vec<&str> = log.lines().collect();
    lines[lines.len().saturating_sub(40)..].join("\n")
}

/// Starts `criu dump -t PID -D DIR -o dump.log -v4 EXTRA...`, passing `fds` as (our fd, its
/// number in CRIU).
pub(crate) fn spawn_dump(
    criu: &Path,
    holder: &Holder,
    dir: &Path,
    extra: &[String],
    fds: &[(i32, i32)],
) -> Child {
    let mut cmd = Command::new(criu);
    cmd.arg("dump")
        .args(["-t", &holder.pid.to_string(), "-D"])
        .arg(dir)
        .args(["-o", "dump.log", "-v4"])
        .args(extra)
        .stdin(Stdio::null())
        .stdout(fs::File::create(dir.join("dump.out")).unwrap())
        .stderr(fs::File::create(dir.join("dump.err")).unwrap());
    let fds = fds.to_vec();
    // SAFETY: only dup2, which is async-signal-safe, between fork and exec.
    unsafe {
        cmd.pre_exec(move || {
            for &(from, to) in &fds {
                if libc::dup2(from, to) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
            }
            Ok(())
        });
    }
    cmd.spawn().unwrap()
}

pub(crate) fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A pipe whose read end we keep (CLOEXEC) and whose write end CRIU gets as `STATUS_FD`.
pub(crate) fn status_pipe() -> (OwnedFd, OwnedFd) {
    nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).unwrap()
}

/// Waits for CRIU's status byte; `Err` with the reason if it does not come.
pub(crate) fn wait_status(read: OwnedFd, dump: &mut Child, dir: &Path) {
    let mut f = fs::File::from(read);
    let deadline = Instant::now() + TIMEOUT;
    let fd = f.as_raw_fd();
    loop {
        let mut pfd = libc::pollfd {
            fd,
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd.
        let n = unsafe { libc::poll(&mut pfd, 1, 200) };
        if n > 0 {
            break;
        }
        if let Some(st) = dump.try_wait().unwrap() {
            panic!(
                "criu dump exited ({st}) before its status byte:\n{}",
                log_tail(dir)
            );
        }
        assert!(
            Instant::now() < deadline,
            "no status byte in {TIMEOUT:?}:\n{}",
            log_tail(dir)
        );
    }
    let mut b = [0xffu8; 1];
    let n = f.read(&mut b).unwrap();
    assert_eq!(
        (n, b[0]),
        (1, 0),
        "status-fd: expected one 0 byte:\n{}",
        log_tail(dir)
    );
}

// ----- images ------------------------------------------------------------------------------------

#[derive(Debug, Clone, Copy)]
pub(crate) struct Run {
    pub(crate) vaddr: u64,
    pub(crate) nr_pages: u64,
    pub(crate) flags: PeFlags,
}

/// Minimal pagemap-<vpid>.img reader: 8-byte header, PagemapHead, then PagemapEntry records.
pub(crate) fn read_pagemap(path: &Path) -> Vec<Run> {
    let bytes = fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let mut rest = &bytes[8..];
    let mut records = Vec::new();
    while !rest.is_empty() {
        let len = u32::from_le_bytes(rest[..4].try_into().unwrap()) as usize;
        records.push(&rest[4..4 + len]);
        rest = &rest[4 + len..];
    }
    pageserv::pb::criu::PagemapHead::decode(records[0]).unwrap();
    records[1..]
        .iter()
        .map(|r| {
            let e = pageserv::pb::criu::PagemapEntry::decode(*r).unwrap();
            let flags = if e.in_parent == Some(true) {
                PeFlags::PARENT
            } else {
                PeFlags(e.flags.unwrap_or(PeFlags::PRESENT.0))
            };
            Run {
                vaddr: e.vaddr,
                nr_pages: e.nr_pages.unwrap_or(u64::from(e.compat_nr_pages)),
                flags,
            }
        })
        .collect()
}
