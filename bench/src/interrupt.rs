//! Ctrl-C, SIGTERM or SIGHUP during `pageserv demo`, `bench` or `quinn-bulk`: what the lab
//! started goes with it, instead of a frozen source, a restored copy, a `criu dump` or
//! `lazy-pages`, network namespaces and a testbed directory left behind.
//!
//! [`install`] catches those signals (a handler that writes to a pipe; one the lab was started
//! ignoring, as `nohup` does SIGHUP, stays ignored) and waits for them on a thread of its own,
//! which then:
//! 1. SIGSTOPs, then SIGKILLs, by pidfd, every process the lab started that is still around:
//!    its descendants (the `/proc` parent chain) and every process inside a network namespace
//!    it made (named `psv<its pid>-*`, [`crate::testbed`]), which catches what daemonized out
//!    of the tree (`criu restore -d`'s restored tasks, reparented to init). Everything is
//!    stopped before anything is killed, pass after pass (up to [`PASSES`]) until no new
//!    process turns up: a killed parent would orphan its children to init before they were
//!    found. A pid is signalled only through a pidfd opened before the process is checked
//!    again, so a pid reused in between is never hit. The frozen source dies with its dump.
//! 2. Deletes those namespaces (their veth pairs and the routes go with them).
//! 3. Removes the testbed directories (`pageserv-psv<its pid>-*` in the temp dir), unless
//!    `PAGESERV_KEEP` is set, after lazily unmounting anything mounted inside them (a runc
//!    bundle's rootfs), so nothing outside them is ever deleted; a directory that cannot be
//!    unmounted is kept and named.
//!
//! Then the lab exits with 128 + the signal's number. `bench`'s results.json already holds
//! every run that finished (it is rewritten after each run).

use std::collections::{BTreeMap, BTreeSet};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::{Path, PathBuf};

use nix::sys::signal::{SigSet, Signal};

/// Stop passes: a process may start another before it is stopped.
pub const PASSES: usize = 5;

/// The write end of the pipe the signal handler reports on (-1 before [`install`]).
static PIPE_WRITE: std::sync::atomic::AtomicI32 = std::sync::atomic::AtomicI32::new(-1);

extern "C" fn on_signal(sig: libc::c_int) {
    let fd = PIPE_WRITE.load(std::sync::atomic::Ordering::Relaxed);
    let byte = sig as u8;
    // SAFETY: write(2) is async-signal-safe; one byte from a local; a full pipe only drops it.
    let _ = unsafe { libc::write(fd, (&raw const byte).cast(), 1) };
}

/// Catches SIGINT, SIGTERM and SIGHUP with a handler that reports them on a pipe, and starts the
/// thread that cleans up when one arrives. A handler, not a blocked mask with `sigwait`: the
/// mask would be inherited by every process the lab starts (it was: the workloads then ignored
/// the bench's SIGTERM and outlived their runs), while exec resets handlers.
pub fn install() -> std::io::Result<()> {
    let (r, w) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)?;
    PIPE_WRITE.store(
        std::os::fd::IntoRawFd::into_raw_fd(w),
        std::sync::atomic::Ordering::Relaxed,
    );
    let action = nix::sys::signal::SigAction::new(
        nix::sys::signal::SigHandler::Handler(on_signal),
        nix::sys::signal::SaFlags::SA_RESTART,
        SigSet::empty(),
    );
    for s in [Signal::SIGINT, Signal::SIGTERM, Signal::SIGHUP] {
        // SAFETY: the handler only does an async-signal-safe write to a pipe.
        let old = unsafe { nix::sys::signal::sigaction(s, &action) }?;
        if matches!(old.handler(), nix::sys::signal::SigHandler::SigIgn) {
            // Ignored by whoever started the lab (`nohup` ignores SIGHUP): it stays ignored.
            // SAFETY: restores the disposition the process started with.
            unsafe { nix::sys::signal::sigaction(s, &old) }?;
        }
    }
    std::thread::Builder::new()
        .name("lab-interrupt".into())
        .spawn(move || {
            let mut byte = [0u8; 1];
            let mut pipe = std::fs::File::from(r);
            if std::io::Read::read_exact(&mut pipe, &mut byte).is_err() {
                return;
            }
            let sig = Signal::try_from(i32::from(byte[0])).unwrap_or(Signal::SIGTERM);
            // Not eprintln!: it panics when stderr is gone (a closed terminal, a dead reader),
            // and the cleanup must run all the same.
            let say = |text: String| {
                let _ = std::io::Write::write_all(&mut std::io::stderr(), text.as_bytes());
            };
            say(format!("pageserv: {sig}: stopping what this run started\n"));
            let summary = clean_up(std::process::id());
            say(format!("pageserv: {summary}\n"));
            std::process::exit(128 + sig as i32);
        })?;
    Ok(())
}

/// What [`clean_up`] did.
#[derive(Debug, Default)]
pub struct Summary {
    pub killed: Vec<i32>,
    pub namespaces: Vec<String>,
    pub removed: Vec<PathBuf>,
    /// Directories kept: something inside could not be unmounted, or `PAGESERV_KEEP`.
    pub kept: Vec<PathBuf>,
}

impl std::fmt::Display for Summary {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "killed {} process(es), deleted namespaces {:?}, removed {:?}",
            self.killed.len(),
            self.namespaces,
            self.removed
        )?;
        if !self.kept.is_empty() {
            write!(f, "; kept {:?} (remove by hand)", self.kept)?;
        }
        Ok(())
    }
}

/// Kills what the lab process `lab` started, deletes its namespaces and directories.
pub fn clean_up(lab: u32) -> Summary {
    let mut summary = Summary::default();
    let prefix = format!("psv{lab}-");
    let namespaces = lab_namespaces(&prefix);
    summary.killed = stop_then_kill(lab, &namespaces);
    // Let the kernel finish the exits before the namespaces go.
    std::thread::sleep(std::time::Duration::from_millis(100));
    for (name, _) in &namespaces {
        let ok = std::process::Command::new("ip")
            .args(["netns", "del", name])
            .stdin(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        if ok {
            summary.namespaces.push(name.clone());
        }
    }
    let keep = std::env::var_os("PAGESERV_KEEP").is_some();
    for dir in lab_dirs(&std::env::temp_dir(), &format!("pageserv-{prefix}")) {
        if keep || !unmount_below(&dir) {
            summary.kept.push(dir);
        } else if std::fs::remove_dir_all(&dir).is_ok() {
            summary.removed.push(dir);
        } else {
            summary.kept.push(dir);
        }
    }
    summary
}

/// The lab's network namespaces (name, inode of the namespace).
fn lab_namespaces(prefix: &str) -> Vec<(String, u64)> {
    use std::os::unix::fs::MetadataExt;
    let mut out = Vec::new();
    for root in ["/run/netns", "/var/run/netns"] {
        let Ok(dir) = std::fs::read_dir(root) else {
            continue;
        };
        for e in dir.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if name.starts_with(prefix)
                && let Ok(m) = std::fs::metadata(e.path())
                && !out.iter().any(|(n, _)| *n == name)
            {
                out.push((name, m.ino()));
            }
        }
    }
    out
}

/// Every pid with its parent, from `/proc`.
fn parents() -> BTreeMap<i32, i32> {
    let mut out = BTreeMap::new();
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return out;
    };
    for e in dir.flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<i32>().ok()) else {
            continue;
        };
        if let Some(ppid) = parent_of(pid) {
            out.insert(pid, ppid);
        }
    }
    out
}

fn parent_of(pid: i32) -> Option<i32> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // "pid (comm) S ppid ...": comm may hold spaces and parentheses.
    let rest = &stat[stat.rfind(')')? + 1..];
    rest.split_whitespace().nth(1)?.parse().ok()
}

fn net_ns_of(pid: i32) -> Option<u64> {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(format!("/proc/{pid}/ns/net"))
        .ok()
        .map(|m| m.ino())
}

/// The descendants of `root` in a pid -> parent map.
fn descendants(root: i32, parents: &BTreeMap<i32, i32>) -> BTreeSet<i32> {
    let mut children: BTreeMap<i32, Vec<i32>> = BTreeMap::new();
    for (&pid, &ppid) in parents {
        children.entry(ppid).or_default().push(pid);
    }
    let mut out = BTreeSet::new();
    let mut todo = vec![root];
    while let Some(p) = todo.pop() {
        for &c in children.get(&p).map(Vec::as_slice).unwrap_or(&[]) {
            if out.insert(c) {
                todo.push(c);
            }
        }
    }
    out
}

/// SIGSTOPs the lab's descendants and whatever runs in its namespaces, pass after pass until a
/// pass finds nothing new (a stopped process neither forks nor exits, so its children keep it
/// as their parent and are found by the next pass); then SIGKILLs them all. Killing before
/// everything is stopped would orphan children to init before they were found.
fn stop_then_kill(lab: u32, namespaces: &[(String, u64)]) -> Vec<i32> {
    let lab = lab as i32;
    let ns: BTreeSet<u64> = namespaces.iter().map(|(_, ino)| *ino).collect();
    let in_ns = |pid: i32| net_ns_of(pid).is_some_and(|i| ns.contains(&i));
    let mut held: BTreeMap<i32, OwnedFd> = BTreeMap::new();
    for _ in 0..PASSES {
        let parents = parents();
        let ours = descendants(lab, &parents);
        let new: Vec<i32> = parents
            .keys()
            .copied()
            .filter(|p| *p != lab && !held.contains_key(p) && (ours.contains(p) || in_ns(*p)))
            .collect();
        if new.is_empty() {
            break;
        }
        for pid in new {
            let Some(fd) = pidfd_open(pid) else { continue };
            // Checked again through the pidfd's process: a pid reused since the scan fails this
            // (its parent chain or namespace is not the lab's).
            let still =
                in_ns(pid) || parent_of(pid).is_some_and(|pp| pp == lab || ours.contains(&pp));
            if still && pidfd_signal(&fd, libc::SIGSTOP) {
                held.insert(pid, fd);
            }
        }
    }
    held.iter()
        .filter(|(_, fd)| pidfd_signal(fd, libc::SIGKILL))
        .map(|(pid, _)| *pid)
        .collect()
}

fn pidfd_open(pid: i32) -> Option<OwnedFd> {
    // SAFETY: pidfd_open takes a pid and flags and returns a new descriptor or -1.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
    // SAFETY: the kernel just returned this descriptor to us; nothing else owns it.
    (fd >= 0).then(|| unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

fn pidfd_signal(fd: &OwnedFd, sig: libc::c_int) -> bool {
    // SAFETY: a valid pidfd, a signal number, no siginfo, no flags.
    let r = unsafe {
        libc::syscall(
            libc::SYS_pidfd_send_signal,
            fd.as_raw_fd(),
            sig,
            std::ptr::null::<libc::siginfo_t>(),
            0,
        )
    };
    r == 0
}

/// The lab's testbed directories in `tmp`.
fn lab_dirs(tmp: &Path, prefix: &str) -> Vec<PathBuf> {
    let Ok(dir) = std::fs::read_dir(tmp) else {
        return Vec::new();
    };
    dir.flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with(prefix))
        .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
        .map(|e| e.path())
        .collect()
}

/// Lazily unmounts every mount at or below `dir`, deepest first; false if one remains.
fn unmount_below(dir: &Path) -> bool {
    let below = |m: &Path| m.starts_with(dir);
    let mut mounts: Vec<PathBuf> = mount_points().into_iter().filter(|m| below(m)).collect();
    mounts.sort_by_key(|m| std::cmp::Reverse(m.components().count()));
    for m in &mounts {
        let _ = nix::mount::umount2(m, nix::mount::MntFlags::MNT_DETACH);
    }
    !mount_points().iter().any(|m| below(m))
}

/// Mount points of this mount namespace (`/proc/self/mountinfo`, octal escapes decoded).
fn mount_points() -> Vec<PathBuf> {
    let Ok(info) = std::fs::read_to_string("/proc/self/mountinfo") else {
        return Vec::new();
    };
    info.lines()
        .filter_map(|l| l.split(' ').nth(4))
        .map(|p| PathBuf::from(unescape(p)))
        .collect()
}

fn unescape(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let octal = b
            .get(i + 1..i + 4)
            .filter(|d| d.iter().all(|c| (b'0'..=b'7').contains(c)));
        if b[i] == b'\\'
            && let Some(d) = octal
        {
            out.push(
                d.iter()
                    .fold(0u8, |v, c| v.wrapping_mul(8).wrapping_add(c - b'0')),
            );
            i += 4;
            continue;
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn descendants_follow_the_parent_chain_only() {
        let parents: BTreeMap<i32, i32> =
            [(10, 1), (11, 10), (12, 11), (13, 1), (14, 13), (15, 12)].into();
        assert_eq!(
            descendants(10, &parents),
            [11, 12, 15].into_iter().collect::<BTreeSet<_>>()
        );
        assert!(descendants(15, &parents).is_empty());
    }

    #[test]
    fn mountinfo_escapes_are_decoded() {
        assert_eq!(unescape(r"/tmp/a\040b\011c"), "/tmp/a b\tc");
        assert_eq!(unescape(r"/x\\y"), r"/x\\y");
        assert_eq!(unescape("/plain"), "/plain");
        assert_eq!(
            unescape("/\\é1"),
            "/\\é1",
            "a backslash before a multibyte character"
        );
    }

    #[test]
    fn a_process_s_parent_is_read_past_a_comm_with_parentheses() {
        let me = std::process::id() as i32;
        assert_eq!(parent_of(me), Some(nix::unistd::getppid().as_raw()));
    }
}
