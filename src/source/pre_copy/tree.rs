//! The process tree to pre-copy and each task's private writable anonymous memory, from /proc.
//!
//! Pages are keyed as CRIU's pstree image will record them: by the task's pid in its innermost
//! pid namespace (the last `NSpid:` field; the dumped root is usually init of its own namespace),
//! so that they match the dump's pagemap entries after the freeze.

use std::path::PathBuf;

use crate::pages::{PAGE_SIZE, PageRange};

/// Most tasks one tree walk follows: a bound against a fork bomb under the root.
pub const MAX_TASKS: usize = 4096;

/// A process of the tree.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Task {
    /// The pid as this host sees it (for /proc and process_vm_readv).
    pub host_pid: i32,
    /// The pid as the dump records it.
    pub ns_pid: u32,
}

#[derive(Debug, thiserror::Error)]
pub enum TreeError {
    #[error("cannot read {path}: {source}; is pid {pid} still running?")]
    Read {
        pid: i32,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path} has no usable NSpid line: cannot tell the pid CRIU will record for {pid}")]
    NoNsPid { pid: i32, path: PathBuf },
    #[error("the tree under pid {root} has more than {MAX_TASKS} processes: not pre-copying it")]
    TooMany { root: i32 },
}

/// The innermost pid of a `/proc/PID/status` text.
pub fn parse_nspid(status: &str) -> Option<u32> {
    let line = status.lines().find(|l| l.starts_with("NSpid:"))?;
    line["NSpid:".len()..]
        .split_whitespace()
        .last()?
        .parse()
        .ok()
}

/// The pids in a `/proc/PID/task/TID/children` text.
pub fn parse_children(text: &str) -> Vec<i32> {
    text.split_whitespace()
        .filter_map(|p| p.parse().ok())
        .collect()
}

/// The range of one `/proc/PID/maps` line if it is private, readable, writable, anonymous
/// memory (plain anonymous, `[heap]`, `[stack]`, or a named `[anon:...]` region): what CRIU
/// dumps as lazy pages.
pub fn parse_maps_line(line: &str) -> Option<PageRange> {
    let mut f = line.split_whitespace();
    let range = f.next()?;
    let perms = f.next()?.as_bytes();
    let _offset = f.next()?;
    let _dev = f.next()?;
    let inode = f.next()?;
    let path = f.next();
    if perms.len() < 4 || perms[0] != b'r' || perms[1] != b'w' || perms[3] != b'p' || inode != "0" {
        return None;
    }
    match path {
        None => {}
        Some(p) if p == "[heap]" || p == "[stack]" || p.starts_with("[anon:") => {}
        Some(_) => return None,
    }
    let (a, b) = range.split_once('-')?;
    let start = u64::from_str_radix(a, 16).ok()?;
    let end = u64::from_str_radix(b, 16).ok()?;
    if end <= start || !start.is_multiple_of(PAGE_SIZE) || !end.is_multiple_of(PAGE_SIZE) {
        return None;
    }
    Some(PageRange::new(start, (end - start) / PAGE_SIZE))
}

fn read(pid: i32, path: String) -> Result<String, TreeError> {
    std::fs::read_to_string(&path).map_err(|source| TreeError::Read {
        pid,
        path: path.into(),
        source,
    })
}

/// The root and every descendant (children of every thread), parents first.
pub fn walk(root: i32) -> Result<Vec<Task>, TreeError> {
    let mut out = Vec::new();
    let mut todo = vec![root];
    while let Some(pid) = todo.pop() {
        let path = format!("/proc/{pid}/status");
        let status = match read(pid, path.clone()) {
            Ok(s) => s,
            // A descendant may exit during the walk; the root may not.
            Err(_) if pid != root => continue,
            Err(e) => return Err(e),
        };
        let ns_pid = parse_nspid(&status).ok_or(TreeError::NoNsPid {
            pid,
            path: path.into(),
        })?;
        out.push(Task {
            host_pid: pid,
            ns_pid,
        });
        if out.len() > MAX_TASKS {
            return Err(TreeError::TooMany { root });
        }
        let Ok(threads) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
            continue;
        };
        for t in threads.flatten() {
            let children = t.path().join("children");
            if let Ok(text) = std::fs::read_to_string(children) {
                todo.extend(parse_children(&text));
            }
        }
    }
    Ok(out)
}

/// The private writable anonymous ranges of `pid`, in address order.
pub fn mappings(pid: i32) -> Result<Vec<PageRange>, TreeError> {
    let maps = read(pid, format!("/proc/{pid}/maps"))?;
    Ok(maps.lines().filter_map(parse_maps_line).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn innermost_pid() {
        let s = "Name:\tworkload\nTgid:\t4242\nPid:\t4242\nNSpid:\t4242\t1\nNStgid:\t4242\t1\n";
        assert_eq!(parse_nspid(s), Some(1));
        assert_eq!(parse_nspid("NSpid:\t77\n"), Some(77));
        assert_eq!(parse_nspid("Pid:\t77\n"), None);
    }

    #[test]
    fn children_list() {
        assert_eq!(parse_children("12 13 \n"), vec![12, 13]);
        assert!(parse_children("").is_empty());
    }

    #[test]
    fn picks_private_writable_anonymous_memory() {
        let yes = [
            "7f0000000000-7f0000200000 rw-p 00000000 00:00 0 ",
            "55d000000000-55d000021000 rw-p 00000000 00:00 0                          [heap]",
            "7ffd00000000-7ffd00021000 rw-p 00000000 00:00 0                          [stack]",
            "7f0000000000-7f0000001000 rw-p 00000000 00:00 0   [anon:workload]",
        ];
        for l in yes {
            assert!(parse_maps_line(l).is_some(), "{l}");
        }
        assert_eq!(
            parse_maps_line(yes[0]),
            Some(PageRange::new(0x7f00_0000_0000, 512))
        );
        let no = [
            "7f0000000000-7f0000200000 r--p 00000000 00:00 0 ",
            "7f0000000000-7f0000200000 rw-s 00000000 00:01 1234 /dev/zero (deleted)",
            "7f0000000000-7f0000200000 rw-p 00001000 08:01 5678 /usr/lib/libc.so.6",
            "7ffd00000000-7ffd00002000 r--p 00000000 00:00 0 [vvar]",
            "7f0000000000-7f0000200000 -w-p 00000000 00:00 0 ",
            "garbage",
            "2000-1000 rw-p 00000000 00:00 0",
        ];
        for l in no {
            assert!(parse_maps_line(l).is_none(), "{l}");
        }
    }

    #[test]
    fn walks_this_process() {
        let me = std::process::id() as i32;
        let tasks = walk(me).unwrap();
        assert_eq!(tasks[0].host_pid, me);
        assert!(
            !mappings(me).unwrap().is_empty(),
            "a test binary has a heap"
        );
    }
}
