//! What a dump of this tree needs, decided before the freeze.
//!
//! CRIU finds out that a tree holds an established TCP connection, a terminal, a file lock or a
//! socket whose peer lives outside the tree only in the middle of the dump, after the freeze, and
//! then fails with a line deep in its log. pageserv reads the same facts from /proc first
//! ([`scan`]) and refuses early, naming the option to pass ([`check`]). It also chooses CRIU's
//! network lock for the user ([`network_lock`]): a dump locks the network when it dumps a network
//! namespace or established connections, and CRIU's default lock runs `iptables-restore`, which
//! a host need not have.
//!
//! This module is the pure core: [`TreeFacts`] in, [`Verdict`] out. The /proc reader is [`scan`].

pub mod scan;

use std::net::SocketAddr;

pub use crate::criu::opts::{has_opt, opt_value, parse_size};

/// CRIU's default `--ghost-limit`: deleted files up to this size are copied into the images.
pub const DEFAULT_GHOST_LIMIT: u64 = 1 << 20;

/// A TCP socket's state, as /proc/net/tcp numbers it (`include/net/tcp_states.h`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TcpState {
    Established,
    SynSent,
    SynRecv,
    FinWait1,
    FinWait2,
    TimeWait,
    Close,
    CloseWait,
    LastAck,
    Listen,
    Closing,
    Other(u8),
}

impl TcpState {
    pub fn from_proc(code: u8) -> TcpState {
        use TcpState::*;
        match code {
            0x01 => Established,
            0x02 => SynSent,
            0x03 => SynRecv,
            0x04 => FinWait1,
            0x05 => FinWait2,
            0x06 => TimeWait,
            0x07 => Close,
            0x08 => CloseWait,
            0x09 => LastAck,
            0x0A => Listen,
            0x0B => Closing,
            n => Other(n),
        }
    }

    /// A state with a peer: CRIU dumps it only with `--tcp-established` (or closes it with
    /// `--tcp-close`). Listening and unconnected sockets need nothing.
    pub fn is_connected(self) -> bool {
        !matches!(self, TcpState::Listen | TcpState::Close)
    }
}

/// What one open descriptor of a task is, as far as the dump is concerned.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FdKind {
    Tcp {
        state: TcpState,
        local: SocketAddr,
        remote: SocketAddr,
    },
    Udp,
    /// An AF_UNIX socket; `peer` is the peer socket's inode when it is connected and known.
    Unix {
        ino: u64,
        stream: bool,
        path: Option<String>,
        peer: Option<u64>,
    },
    /// Another socket family (netlink, packet, raw): CRIU's own checks apply.
    OtherSocket,
    /// A terminal (`/dev/pts/N`, `/dev/ttyN`, `/dev/console`).
    Tty {
        path: String,
    },
    /// A regular file deleted from its directory: CRIU copies it into the images up to
    /// `--ghost-limit`.
    Deleted {
        path: String,
        size: u64,
    },
    Other,
}

/// One open descriptor.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Fd {
    pub fd: i32,
    pub kind: FdKind,
}

/// One task (thread-group leader) of the tree.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Task {
    pub pid: i32,
    pub comm: String,
    /// Session id (`/proc/PID/stat`).
    pub sid: i32,
    pub netns: u64,
    pub mntns: u64,
    pub fds: Vec<Fd>,
    /// POSIX/flock locks this task holds (`/proc/locks`).
    pub file_locks: u32,
    /// Mount points of the task's mount namespace that bind a subtree of another filesystem
    /// (mountinfo's root field is not `/`): the host's bind mounts, when the namespace is not
    /// pageserv's.
    pub bind_mounts: Vec<String>,
}

/// The tree as /proc shows it, and pageserv's own namespaces.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TreeFacts {
    pub tasks: Vec<Task>,
    pub own_netns: u64,
    pub own_mntns: u64,
}

/// A reason the dump would fail, and the option that makes it succeed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    /// The object: "pid 42 (memcached) fd 7: TCP 10.1.0.2:11211 <-> 10.1.0.1:40000 ESTABLISHED".
    pub what: String,
    /// The CRIU option to pass through `--criu-opt`.
    pub option: &'static str,
    /// What the option does and what else the user may do.
    pub why: &'static str,
}

impl std::fmt::Display for Refusal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{}: pass --criu-opt={} ({})",
            self.what, self.option, self.why
        )
    }
}

/// What [`check`] decided.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Verdict {
    /// Each problem once per option and object; empty means the dump can start.
    pub refusals: Vec<Refusal>,
    /// Facts worth a log line that need no option (e.g. the network namespace goes along).
    pub notes: Vec<String>,
}

#[derive(Debug, thiserror::Error)]
#[error(
    "pageserv refused to freeze pid {pid}: the dump would fail. {} Nothing was frozen.",
    list(.refusals)
)]
pub struct Refused {
    pub pid: i32,
    pub refusals: Vec<Refusal>,
}

fn list(r: &[Refusal]) -> String {
    r.iter()
        .map(|r| format!("{r}."))
        .collect::<Vec<_>>()
        .join(" ")
}

fn describe(t: &Task, fd: &Fd) -> String {
    let obj = match &fd.kind {
        FdKind::Tcp {
            state,
            local,
            remote,
        } => format!("TCP {local} <-> {remote} {state:?}"),
        FdKind::Unix { path, .. } => {
            format!("unix socket {}", path.as_deref().unwrap_or("(unnamed)"))
        }
        FdKind::Tty { path } => format!("terminal {path}"),
        FdKind::Deleted { path, size } => format!("deleted file {path} ({size} bytes)"),
        other => format!("{other:?}"),
    };
    format!("pid {} ({}) fd {}: {obj}", t.pid, t.comm, fd.fd)
}

/// Decides, from what /proc says of the tree, whether `criu dump` with `opts` would fail on it.
pub fn check(facts: &TreeFacts, opts: &[String]) -> Verdict {
    let mut v = Verdict::default();
    let tcp_ok = has_opt(opts, "--tcp-established", None) || has_opt(opts, "--tcp-close", None);
    let shell_job = has_opt(opts, "--shell-job", Some("-j"));
    let locks_ok = has_opt(opts, "--file-locks", Some("-l"));
    let ext_unix = has_opt(opts, "--ext-unix-sk", None) || opts.iter().any(|o| o.contains("unix["));
    let ext_mnt = opts
        .iter()
        .any(|o| o.contains("mnt[") || o.starts_with("--ext-mount-map"));
    let ghost_limit = opt_value(opts, "--ghost-limit")
        .and_then(parse_size)
        .unwrap_or(DEFAULT_GHOST_LIMIT);
    let link_remap = has_opt(opts, "--link-remap", None);
    let pids: Vec<i32> = facts.tasks.iter().map(|t| t.pid).collect();
    let unix_inos: std::collections::HashSet<u64> = facts
        .tasks
        .iter()
        .flat_map(|t| &t.fds)
        .filter_map(|f| match f.kind {
            FdKind::Unix { ino, .. } => Some(ino),
            _ => None,
        })
        .collect();
    let mut refuse = |what: String, option: &'static str, why: &'static str| {
        // One line per option and object is enough; a server with 1000 connections gets the
        // first few and a count.
        let same = v.refusals.iter().filter(|r| r.option == option).count();
        if same < 3 {
            v.refusals.push(Refusal { what, option, why });
        } else if same == 3 {
            v.refusals.push(Refusal {
                what: "and more like it".into(),
                option,
                why,
            });
        }
    };
    for t in &facts.tasks {
        if !shell_job && t.sid != 0 && !pids.contains(&t.sid) {
            refuse(
                format!(
                    "pid {} ({}): its session leader {} is outside the tree",
                    t.pid, t.comm, t.sid
                ),
                "--shell-job",
                "dump a shell job; or start the tree with setsid",
            );
        }
        if !locks_ok && t.file_locks > 0 {
            refuse(
                format!(
                    "pid {} ({}) holds {} file lock(s)",
                    t.pid, t.comm, t.file_locks
                ),
                "--file-locks",
                "dump and restore the locks; only safe when the locked files move with the tree",
            );
        }
        if !ext_mnt && t.mntns != facts.own_mntns && !t.bind_mounts.is_empty() {
            refuse(
                format!(
                    "pid {} ({}): its mount namespace has bind mounts from outside it ({})",
                    t.pid,
                    t.comm,
                    t.bind_mounts.join(", ")
                ),
                "--external=mnt[]",
                "CRIU then treats them as external and the restore binds the same paths",
            );
        }
        for fd in &t.fds {
            match &fd.kind {
                FdKind::Tcp { state, .. } if state.is_connected() && !tcp_ok => refuse(
                    describe(t, fd),
                    "--tcp-established",
                    "keeps the connection open across the migration when the service's address \
                     moves with it (the tree in a network namespace of its own); \
                     --criu-opt=--tcp-close restores it closed instead",
                ),
                FdKind::Tty { .. } if !shell_job => refuse(
                    describe(t, fd),
                    "--shell-job",
                    "dump a task attached to a terminal; or start it with stdio on /dev/null",
                ),
                FdKind::Deleted { size, .. } if *size > ghost_limit && !link_remap => refuse(
                    describe(t, fd),
                    "--ghost-limit",
                    "with a size above the file's (e.g. --criu-opt=--ghost-limit=1G) CRIU copies \
                     the deleted file into the images",
                ),
                FdKind::Unix {
                    stream: true,
                    peer: Some(peer),
                    ..
                } if !ext_unix && *peer != 0 && !unix_inos.contains(peer) => refuse(
                    describe(t, fd),
                    "--ext-unix-sk",
                    "its peer is outside the tree; the restored socket is then connected to \
                     nothing, so only for peers that can cope",
                ),
                _ => {}
            }
        }
    }
    let foreign_netns: Vec<&Task> = facts
        .tasks
        .iter()
        .filter(|t| t.netns != facts.own_netns)
        .collect();
    if let Some(t) = foreign_netns.first() {
        v.notes.push(format!(
            "pid {} ({}) is in a network namespace of its own: CRIU dumps the namespace with it \
             (devices, addresses, routes) and the restore recreates it",
            t.pid, t.comm
        ));
    }
    v
}

/// Whether the dump locks the network: it does when it dumps a network namespace (the tree is
/// in one other than CRIU's) or established connections.
pub fn locks_network(facts: &TreeFacts, opts: &[String]) -> bool {
    has_opt(opts, "--tcp-established", None)
        || facts.tasks.iter().any(|t| t.netns != facts.own_netns)
}

/// The tools CRIU's network lock can use on this host.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LockTools {
    /// `criu check --feature network_lock_nftables` passed (CRIU built with libnftables).
    pub nftables: bool,
    /// `iptables-restore` is on PATH (CRIU's default method runs it).
    pub iptables: bool,
}

/// The options that choose CRIU's network lock: none when the dump does not lock, the user chose
/// a method, or the default (iptables) can run; `--network-lock nftables` when only that can.
/// Nftables is preferred when both can: it needs no host tool and its table goes away with a
/// dumped network namespace.
pub fn network_lock(
    locks: bool,
    opts: &[String],
    tools: LockTools,
) -> Result<Vec<String>, Refusal> {
    if !locks || has_opt(opts, "--network-lock", None) {
        return Ok(Vec::new());
    }
    if tools.nftables {
        return Ok(vec!["--network-lock".into(), "nftables".into()]);
    }
    if tools.iptables {
        return Ok(Vec::new());
    }
    Err(Refusal {
        what: "the dump locks the network (a network namespace or established connections), \
               and this CRIU has no nftables support and iptables-restore is not installed"
            .into(),
        option: "--network-lock",
        why: "install iptables, or a CRIU built with nftables (tools/setup-criu), then pass \
              --criu-opt=--network-lock=iptables or nftables",
    })
}

#[cfg(test)]
mod tests;
