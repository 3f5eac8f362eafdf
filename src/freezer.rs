//! The cgroup freezer of a container: a second lock on its tasks while CRIU holds them.
//!
//! During a lazy migration the source tasks are ptrace-stopped by `criu dump` until the dump
//! ends. If the dump process dies (killed, OOM, a bug), the kernel detaches its tracees and
//! they run again — at the source, while the restored copy runs at the destination: two live
//! copies. CRIU uses the freezer runc names (`FreezeCgroup`) only to seize a container's tasks:
//! `freeze_processes` in criu/seize.c (4.2) thaws the cgroup again once every task is seized,
//! unless it was frozen before. So pageserv freezes the container's cgroup again once the dump
//! is ready, before dst may restore: ptrace-stopped tasks count as frozen, so this returns at
//! once, and should the dump die, the detached tasks stay in the freezer instead of running.
//! The migration's end decides ([`crate::source::service`]): thawed after CRIU acknowledged the
//! page server's close (CRIU still holds the tasks then; it kills them next, and a cgroup v1
//! freezer would defer that SIGKILL, so CRIU would wait on them for ever), thawed after a dump
//! pageserv made fail (CRIU resumes the tasks), thawed after a dump that died once dst was told
//! to kill its incomplete copy, and kept when the split-brain rule keeps the source frozen.
//!
//! Only for a tree that has a cgroup of its own (a container): a bare process shares its cgroup
//! with unrelated tasks. Cgroup v1's freezer controller is used where it is mounted (as runc
//! does on a v1/v2 hybrid), else v2's `cgroup.freeze`.
//!
//! Parsing (`/proc/PID/cgroup`, `/proc/self/mountinfo`) is pure and unit-tested; the writes are
//! a thin shell.

use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum FreezerError {
    #[error("could not read {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path} did not reach FROZEN within {waited:?} (it reads {state:?})")]
    NotFrozen {
        path: PathBuf,
        waited: std::time::Duration,
        state: String,
    },
    #[error(
        "pid {pid} is in no cgroup pageserv can freeze (no freezer controller and no cgroup v2 \
         hierarchy in /proc/{pid}/cgroup)"
    )]
    NoFreezer { pid: i32 },
    #[error(
        "could not write {value:?} to {path}: {source}. Check the cgroup still exists; thaw a \
         container left frozen with `runc resume NAME` (or write THAWED / 0 there)"
    )]
    Write {
        path: PathBuf,
        value: &'static str,
        #[source]
        source: std::io::Error,
    },
}

/// A cgroup that can be frozen and thawed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Freezer {
    /// cgroup v1: `DIR/freezer.state`, FROZEN or THAWED.
    V1(PathBuf),
    /// cgroup v2: `DIR/cgroup.freeze`, 1 or 0.
    V2(PathBuf),
}

impl Freezer {
    /// The freezer of the cgroup `pid` is in.
    pub fn of_pid(pid: i32) -> Result<Freezer, FreezerError> {
        let read = |p: PathBuf| {
            std::fs::read_to_string(&p).map_err(|source| FreezerError::Read { path: p, source })
        };
        let cgroups = read(PathBuf::from(format!("/proc/{pid}/cgroup")))?;
        let mounts = read(PathBuf::from("/proc/self/mountinfo"))?;
        freezer_for(&cgroups, &mounts).ok_or(FreezerError::NoFreezer { pid })
    }

    fn file_and_values(&self) -> (PathBuf, &'static str, &'static str) {
        match self {
            Freezer::V1(d) => (d.join("freezer.state"), "FROZEN", "THAWED"),
            Freezer::V2(d) => (d.join("cgroup.freeze"), "1", "0"),
        }
    }

    fn write(&self, freeze: bool) -> Result<(), FreezerError> {
        let (path, on, off) = self.file_and_values();
        let value = if freeze { on } else { off };
        std::fs::write(&path, value).map_err(|source| FreezerError::Write {
            path,
            value,
            source,
        })
    }

    pub fn freeze(&self) -> Result<(), FreezerError> {
        self.write(true)
    }

    pub fn thaw(&self) -> Result<(), FreezerError> {
        self.write(false)
    }

    /// Freezes and waits until the kernel says the whole cgroup is frozen (v1 `freezer.state`
    /// FROZEN, v2 `cgroup.events` "frozen 1"), asking again every 10 ms as v1 may need.
    pub fn freeze_and_wait(&self, timeout: std::time::Duration) -> Result<(), FreezerError> {
        let start = std::time::Instant::now();
        loop {
            self.freeze()?;
            let (path, state) = match self {
                Freezer::V1(d) => (d.join("freezer.state"), None),
                Freezer::V2(d) => (d.join("cgroup.events"), Some(())),
            };
            let text = std::fs::read_to_string(&path).map_err(|source| FreezerError::Read {
                path: path.clone(),
                source,
            })?;
            if is_frozen(&text, state.is_some()) {
                return Ok(());
            }
            if start.elapsed() > timeout {
                return Err(FreezerError::NotFrozen {
                    path,
                    waited: timeout,
                    state: text.trim().to_string(),
                });
            }
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
    }

    /// The directory of the cgroup.
    pub fn dir(&self) -> &Path {
        match self {
            Freezer::V1(d) | Freezer::V2(d) => d,
        }
    }
}

/// Whether a v1 `freezer.state` (or, `v2`, a `cgroup.events`) says the cgroup is frozen.
pub fn is_frozen(text: &str, v2: bool) -> bool {
    if v2 {
        text.lines().any(|l| l.trim() == "frozen 1")
    } else {
        text.trim() == "FROZEN"
    }
}

/// From `/proc/PID/cgroup` and `/proc/self/mountinfo`: v1's freezer where it is mounted, else
/// the v2 hierarchy's cgroup.
pub fn freezer_for(proc_cgroup: &str, mountinfo: &str) -> Option<Freezer> {
    let mut v2_path = None;
    for line in proc_cgroup.lines() {
        let mut f = line.splitn(3, ':');
        let (Some(_), Some(controllers), Some(path)) = (f.next(), f.next(), f.next()) else {
            continue;
        };
        if controllers.split(',').any(|c| c == "freezer")
            && let Some(root) = mount_point(mountinfo, |fstype, opts| {
                fstype == "cgroup" && opts.split(',').any(|o| o == "freezer")
            })
        {
            return Some(Freezer::V1(join(&root, path)));
        }
        if controllers.is_empty() {
            v2_path = Some(path.to_string());
        }
    }
    let path = v2_path?;
    let root = mount_point(mountinfo, |fstype, _| fstype == "cgroup2")?;
    Some(Freezer::V2(join(&root, &path)))
}

fn join(root: &Path, cgroup_path: &str) -> PathBuf {
    root.join(cgroup_path.trim_start_matches('/'))
}

/// The mount point of the first mount whose filesystem type and super options match.
fn mount_point(mountinfo: &str, want: impl Fn(&str, &str) -> bool) -> Option<PathBuf> {
    for line in mountinfo.lines() {
        // "36 25 0:31 / /sys/fs/cgroup/freezer rw,nosuid - cgroup cgroup rw,freezer"
        let Some((left, right)) = line.split_once(" - ") else {
            continue;
        };
        let mut r = right.split_whitespace();
        let fstype = r.next().unwrap_or("");
        let opts = r.nth(1).unwrap_or("");
        // The root of the mount must be the hierarchy's root for paths to line up.
        let l: Vec<&str> = left.split_whitespace().collect();
        if l.len() >= 5 && l[3] == "/" && want(fstype, opts) {
            return Some(PathBuf::from(unescape(l[4])));
        }
    }
    None
}

/// mountinfo escapes space, tab, newline and backslash as octal.
fn unescape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let b = s.as_bytes();
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\'
            && i + 3 < b.len()
            && let Ok(v) = u8::from_str_radix(&s[i + 1..i + 4], 8)
        {
            out.push(v as char);
            i += 4;
            continue;
        }
        out.push(b[i] as char);
        i += 1;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const HYBRID_MOUNTS: &str = "\
25 30 0:23 / /sys rw,nosuid,nodev,noexec,relatime shared:7 - sysfs sysfs rw
26 25 0:24 / /sys/fs/cgroup ro,nosuid,nodev,noexec shared:8 - tmpfs tmpfs ro,mode=755
27 26 0:25 / /sys/fs/cgroup/unified rw,nosuid,nodev,noexec,relatime shared:9 - cgroup2 cgroup2 rw,nsdelegate
36 26 0:34 / /sys/fs/cgroup/freezer rw,nosuid,nodev,noexec,relatime shared:19 - cgroup cgroup rw,freezer
37 26 0:35 / /sys/fs/cgroup/memory rw,nosuid,nodev,noexec,relatime shared:20 - cgroup cgroup rw,memory
";

    #[test]
    fn v1_freezer_on_a_hybrid_host() {
        let cg = "12:memory:/ctr1\n7:freezer:/ctr1\n1:name=systemd:/ctr1\n0::/ctr1\n";
        assert_eq!(
            freezer_for(cg, HYBRID_MOUNTS),
            Some(Freezer::V1("/sys/fs/cgroup/freezer/ctr1".into()))
        );
    }

    #[test]
    fn v2_when_no_v1_freezer() {
        let cg = "0::/system.slice/web.scope\n";
        let mounts = "27 26 0:25 / /sys/fs/cgroup rw - cgroup2 cgroup2 rw\n";
        assert_eq!(
            freezer_for(cg, mounts),
            Some(Freezer::V2("/sys/fs/cgroup/system.slice/web.scope".into()))
        );
        // Hybrid host, v1 freezer not mounted: the unified hierarchy's cgroup.
        let no_freezer: String = HYBRID_MOUNTS
            .lines()
            .filter(|l| !l.contains("freezer"))
            .map(|l| format!("{l}\n"))
            .collect();
        assert_eq!(
            freezer_for("7:freezer:/x\n0::/x\n", &no_freezer),
            Some(Freezer::V2("/sys/fs/cgroup/unified/x".into()))
        );
    }

    #[test]
    fn none_without_a_hierarchy() {
        assert_eq!(freezer_for("7:freezer:/x\n", ""), None);
        assert_eq!(freezer_for("", HYBRID_MOUNTS), None);
        assert_eq!(freezer_for("garbage\n", "also garbage\n"), None);
    }

    #[test]
    fn a_bind_mounted_subtree_is_not_taken_for_the_root() {
        let mounts = "36 26 0:34 /sub /sys/fs/cgroup/freezer rw - cgroup cgroup rw,freezer\n";
        assert_eq!(freezer_for("7:freezer:/x\n", mounts), None);
    }

    #[test]
    fn mountinfo_escapes() {
        assert_eq!(unescape("/a\\040b"), "/a b");
        assert_eq!(unescape("/plain"), "/plain");
    }

    #[test]
    fn frozen_states() {
        assert!(is_frozen("FROZEN\n", false));
        assert!(!is_frozen("FREEZING\n", false));
        assert!(!is_frozen("THAWED\n", false));
        assert!(is_frozen("populated 1\nfrozen 1\n", true));
        assert!(!is_frozen("populated 1\nfrozen 0\n", true));
    }

    #[test]
    fn files_and_values() {
        let v1 = Freezer::V1("/c".into());
        assert_eq!(
            v1.file_and_values(),
            ("/c/freezer.state".into(), "FROZEN", "THAWED")
        );
        let v2 = Freezer::V2("/c".into());
        assert_eq!(v2.file_and_values(), ("/c/cgroup.freeze".into(), "1", "0"));
    }
}
