//! Reads what [`super::check`] needs of a process tree from /proc (and `ss` for the peers of
//! unix sockets, which /proc does not show). Parsers are pure and tested; the readers are thin.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::Path;
use std::process::{Command, Stdio};

use super::{
    Fd, FdKind, LockTools, Refused, Task, TcpState, TreeFacts, check, has_opt, locks_network,
    network_lock,
};
use crate::criu::binary::Criu;

/// Most tasks a tree may have before the scan gives up (a runaway fork bomb is not a migration).
pub const MAX_TASKS: usize = 4096;

#[derive(Debug, thiserror::Error)]
pub enum ScanError {
    #[error("cannot read {path}: {source}; is pid {pid} running (and are we root)?")]
    Read {
        pid: i32,
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("the tree of pid {0} has more than {MAX_TASKS} processes")]
    TooMany(i32),
}

/// Before the freeze: reads the tree of `pid`, refuses a dump that would fail (naming the option
/// to pass), and returns the CRIU options pageserv adds to `given` (the network lock).
pub fn prepare(pid: i32, given: &[String], criu: &Criu) -> Result<Vec<String>, PrepareError> {
    let facts = scan(pid)?;
    let verdict = check(&facts, given);
    for n in &verdict.notes {
        tracing::info!("{n}");
    }
    let mut refusals = verdict.refusals;
    let locks = locks_network(&facts, given);
    let added = if locks && !has_opt(given, "--network-lock", None) {
        let tools = LockTools {
            nftables: nftables_lock(criu),
            iptables: on_path("iptables-restore"),
        };
        match network_lock(true, given, tools) {
            Ok(a) => a,
            Err(r) => {
                refusals.push(r);
                Vec::new()
            }
        }
    } else {
        Vec::new()
    };
    if !refusals.is_empty() {
        return Err(PrepareError::Refused(Refused { pid, refusals }));
    }
    if !added.is_empty() {
        tracing::info!(
            options = ?added,
            "the dump locks the network (a network namespace or established connections): \
             pageserv chose CRIU's lock"
        );
    }
    Ok(added)
}

#[derive(Debug, thiserror::Error)]
pub enum PrepareError {
    #[error(transparent)]
    Scan(#[from] ScanError),
    #[error(transparent)]
    Refused(#[from] Refused),
}

/// Whether this CRIU can lock the network with nftables (`criu check --feature`).
fn nftables_lock(criu: &Criu) -> bool {
    let mut c = criu.command();
    c.args(["check", "--feature", "network_lock_nftables"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    c.status().is_ok_and(|s| s.success())
}

/// The socket table of one network namespace: inode → what the socket is.
pub type Sockets = HashMap<u64, FdKind>;

/// Reads the tree rooted at `root` (the root and every descendant process).
pub fn scan(root: i32) -> Result<TreeFacts, ScanError> {
    let own_netns = ns_inode("/proc/self/ns/net").unwrap_or(0);
    let own_mntns = ns_inode("/proc/self/ns/mnt").unwrap_or(0);
    let pids = tree_pids(root)?;
    let locks = std::fs::read_to_string("/proc/locks")
        .map(|s| parse_locks(&s))
        .unwrap_or_default();
    let mut by_netns: HashMap<u64, Sockets> = HashMap::new();
    let mut tasks = Vec::new();
    for pid in pids {
        match read_task(pid, own_netns, own_mntns, &locks, &mut by_netns) {
            Ok(Some(t)) => tasks.push(t),
            Ok(None) => {}
            // A process of the tree may exit while it is read (a forking workload): only the
            // root must be there.
            Err(_) if pid != root => {}
            Err(e) => return Err(e),
        }
    }
    Ok(TreeFacts {
        tasks,
        own_netns,
        own_mntns,
    })
}

/// One task of the tree; `None` for a zombie (no descriptors, no namespaces left to read).
fn read_task(
    pid: i32,
    own_netns: u64,
    own_mntns: u64,
    locks: &HashMap<i32, u32>,
    by_netns: &mut HashMap<u64, Sockets>,
) -> Result<Option<Task>, ScanError> {
    let read = |what: &str| {
        let path = format!("/proc/{pid}/{what}");
        std::fs::read_to_string(&path).map_err(|source| ScanError::Read { pid, path, source })
    };
    let stat = read("stat")?;
    if parse_state(&stat) == Some('Z') {
        return Ok(None);
    }
    let ns = |kind: &str| {
        let path = format!("/proc/{pid}/ns/{kind}");
        ns_inode(&path).ok_or_else(|| ScanError::Read {
            pid,
            source: std::io::Error::other("no namespace link"),
            path,
        })
    };
    let (netns, mntns) = (ns("net")?, ns("mnt")?);
    let sockets = by_netns
        .entry(netns)
        .or_insert_with(|| read_sockets(pid, netns != own_netns));
    let fds = read_fds(pid, sockets);
    let bind_mounts = if mntns != own_mntns {
        parse_bind_mounts(&read("mountinfo")?)
    } else {
        Vec::new()
    };
    Ok(Some(Task {
        pid,
        comm: read("comm")?.trim().to_string(),
        sid: parse_sid(&stat).unwrap_or(0),
        netns,
        mntns,
        fds,
        file_locks: locks.get(&pid).copied().unwrap_or(0),
        bind_mounts,
    }))
}

fn ns_inode(link: &str) -> Option<u64> {
    let t = std::fs::read_link(link).ok()?;
    let t = t.to_string_lossy();
    t.split_once('[')?.1.strip_suffix(']')?.parse().ok()
}

/// The root and its descendants, parents first.
fn tree_pids(root: i32) -> Result<Vec<i32>, ScanError> {
    let mut out = vec![root];
    let mut i = 0;
    while i < out.len() {
        let pid = out[i];
        let tasks = format!("/proc/{pid}/task");
        let dir = match std::fs::read_dir(&tasks) {
            Ok(d) => d,
            // A child that exited meanwhile has no children to list.
            Err(_) if pid != root => {
                i += 1;
                continue;
            }
            Err(source) => {
                return Err(ScanError::Read {
                    pid,
                    path: tasks.clone(),
                    source,
                });
            }
        };
        for t in dir.flatten() {
            let children = std::fs::read_to_string(t.path().join("children")).unwrap_or_default();
            out.extend(
                children
                    .split_whitespace()
                    .filter_map(|c| c.parse::<i32>().ok()),
            );
        }
        if out.len() > MAX_TASKS {
            return Err(ScanError::TooMany(root));
        }
        i += 1;
    }
    Ok(out)
}

/// Every socket of `pid`'s network namespace.
fn read_sockets(pid: i32, foreign_netns: bool) -> Sockets {
    let mut s = Sockets::new();
    for (file, v6) in [("tcp", false), ("tcp6", true)] {
        if let Ok(t) = std::fs::read_to_string(format!("/proc/{pid}/net/{file}")) {
            s.extend(parse_tcp(&t, v6));
        }
    }
    for file in ["udp", "udp6"] {
        if let Ok(t) = std::fs::read_to_string(format!("/proc/{pid}/net/{file}")) {
            s.extend(parse_inodes(&t, 9).into_iter().map(|i| (i, FdKind::Udp)));
        }
    }
    let peers = unix_peers(pid, foreign_netns);
    if let Ok(t) = std::fs::read_to_string(format!("/proc/{pid}/net/unix")) {
        for (ino, stream, path) in parse_unix(&t) {
            let peer = peers.get(&ino).copied();
            s.insert(
                ino,
                FdKind::Unix {
                    ino,
                    stream,
                    path,
                    peer,
                },
            );
        }
    }
    s
}

/// Unix socket inode → peer inode, from `ss -xaHn` run in `pid`'s network namespace; empty if
/// `ss` cannot run (the peer check is then skipped; CRIU's own check still applies).
fn unix_peers(pid: i32, foreign_netns: bool) -> HashMap<u64, u64> {
    let mut cmd = if foreign_netns {
        let mut c = Command::new("nsenter");
        c.arg(format!("--net=/proc/{pid}/ns/net")).arg("ss");
        c
    } else {
        Command::new("ss")
    };
    cmd.arg("-xaHn").stdin(Stdio::null()).stderr(Stdio::null());
    match cmd.output() {
        Ok(o) if o.status.success() => parse_ss_unix(&String::from_utf8_lossy(&o.stdout)),
        _ => HashMap::new(),
    }
}

fn read_fds(pid: i32, sockets: &Sockets) -> Vec<Fd> {
    let dir = format!("/proc/{pid}/fd");
    let Ok(entries) = std::fs::read_dir(&dir) else {
        return Vec::new();
    };
    let mut fds = Vec::new();
    for e in entries.flatten() {
        let Some(fd) = e.file_name().to_str().and_then(|n| n.parse::<i32>().ok()) else {
            continue;
        };
        let Ok(target) = std::fs::read_link(e.path()) else {
            continue;
        };
        let target = target.to_string_lossy().into_owned();
        let size = || {
            std::fs::metadata(e.path())
                .ok()
                .filter(|m| m.is_file())
                .map(|m| m.len())
        };
        let kind = classify(&target, sockets, size);
        fds.push(Fd { fd, kind });
    }
    fds.sort_by_key(|f| f.fd);
    fds
}

/// What a descriptor whose /proc link reads `target` is; `size` is asked only for deleted files.
pub fn classify(target: &str, sockets: &Sockets, size: impl FnOnce() -> Option<u64>) -> FdKind {
    if let Some(ino) = target
        .strip_prefix("socket:[")
        .and_then(|r| r.strip_suffix(']'))
        .and_then(|i| i.parse::<u64>().ok())
    {
        return sockets.get(&ino).cloned().unwrap_or(FdKind::OtherSocket);
    }
    if target.starts_with("/dev/pts/")
        || target == "/dev/console"
        || target == "/dev/tty"
        || target
            .strip_prefix("/dev/tty")
            .is_some_and(|n| n.chars().all(|c| c.is_ascii_digit()) && !n.is_empty())
    {
        return FdKind::Tty {
            path: target.to_string(),
        };
    }
    if let Some(path) = target.strip_suffix(" (deleted)")
        && target.starts_with('/')
        && let Some(size) = size()
    {
        return FdKind::Deleted {
            path: path.to_string(),
            size,
        };
    }
    FdKind::Other
}

/// The state letter from `/proc/PID/stat` (`R`, `S`, `Z`, ...).
pub fn parse_state(stat: &str) -> Option<char> {
    stat.rsplit_once(')')?
        .1
        .split_whitespace()
        .next()?
        .chars()
        .next()
}

/// The session id from `/proc/PID/stat` (the field after pgrp).
pub fn parse_sid(stat: &str) -> Option<i32> {
    let rest = stat.rsplit_once(')')?.1;
    rest.split_whitespace().nth(3)?.parse().ok()
}

/// Locks per pid from `/proc/locks` (blocked waiters, the `->` lines, hold nothing).
pub fn parse_locks(text: &str) -> HashMap<i32, u32> {
    let mut m = HashMap::new();
    for line in text.lines() {
        let f: Vec<&str> = line.split_whitespace().collect();
        if f.get(1) == Some(&"->") {
            continue;
        }
        if let Some(pid) = f.get(4).and_then(|p| p.parse::<i32>().ok()) {
            *m.entry(pid).or_insert(0) += 1;
        }
    }
    m
}

/// Mount points whose mountinfo root is not `/` (bind mounts of a subtree).
pub fn parse_bind_mounts(mountinfo: &str) -> Vec<String> {
    mountinfo
        .lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            (f.len() > 4 && f[3] != "/").then(|| f[4].to_string())
        })
        .collect()
}

/// The inode column (`col`, 0-based) of each data line of a /proc/net table.
fn parse_inodes(text: &str, col: usize) -> Vec<u64> {
    text.lines()
        .skip(1)
        .filter_map(|l| l.split_whitespace().nth(col)?.parse().ok())
        .collect()
}

/// `/proc/net/tcp` or `tcp6`: inode → the socket.
pub fn parse_tcp(text: &str, v6: bool) -> Vec<(u64, FdKind)> {
    text.lines()
        .skip(1)
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            let local = parse_addr(f.get(1)?, v6)?;
            let remote = parse_addr(f.get(2)?, v6)?;
            let state = TcpState::from_proc(u8::from_str_radix(f.get(3)?, 16).ok()?);
            let ino = f.get(9)?.parse().ok()?;
            Some((
                ino,
                FdKind::Tcp {
                    state,
                    local,
                    remote,
                },
            ))
        })
        .collect()
}

/// `0100007F:1F90` (the kernel prints the address as host-order 32-bit words) → 127.0.0.1:8080.
pub fn parse_addr(s: &str, v6: bool) -> Option<SocketAddr> {
    let (addr, port) = s.split_once(':')?;
    let port = u16::from_str_radix(port, 16).ok()?;
    let ip: IpAddr = if v6 {
        if addr.len() != 32 {
            return None;
        }
        let mut b = [0u8; 16];
        for i in 0..4 {
            let w = u32::from_str_radix(addr.get(i * 8..i * 8 + 8)?, 16).ok()?;
            b[i * 4..i * 4 + 4].copy_from_slice(&w.to_ne_bytes());
        }
        Ipv6Addr::from(b).into()
    } else {
        if addr.len() != 8 {
            return None;
        }
        Ipv4Addr::from(u32::from_str_radix(addr, 16).ok()?.to_ne_bytes()).into()
    };
    Some(SocketAddr::new(ip, port))
}

/// `/proc/net/unix`: (inode, stream or seqpacket, bound path).
pub fn parse_unix(text: &str) -> Vec<(u64, bool, Option<String>)> {
    text.lines()
        .skip(1)
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            let ty = u32::from_str_radix(f.get(4)?, 16).ok()?;
            let ino = f.get(6)?.parse().ok()?;
            // SOCK_STREAM 1, SOCK_SEQPACKET 5.
            Some((ino, ty == 1 || ty == 5, f.get(7).map(|p| p.to_string())))
        })
        .collect()
}

/// `ss -xaHn` lines (`u_str ESTAB 0 0 /path 1234 * 1235`): inode → peer inode, connected ones.
pub fn parse_ss_unix(text: &str) -> HashMap<u64, u64> {
    text.lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            if f.len() < 8 {
                return None;
            }
            let peer: u64 = f[f.len() - 1].parse().ok()?;
            let ino: u64 = f[f.len() - 3].parse().ok()?;
            (peer != 0).then_some((ino, peer))
        })
        .collect()
}

/// Whether `iptables-restore` is on PATH.
pub fn on_path(name: &str) -> bool {
    std::env::var_os("PATH")
        .is_some_and(|p| std::env::split_paths(&p).any(|d| Path::new(&d).join(name).is_file()))
}
