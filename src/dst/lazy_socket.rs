//! `lazy-pages.socket`: where `criu restore --lazy-pages` hands us each restored process's
//! userfaultfd (criu-protocols.md §2.1–2.3).
//!
//! Per task: an `int32` vpid, then one byte carrying the uffd as SCM_RIGHTS; a zombie sends
//! `-vpid` and no fd. After every task, the restore sends the u32 `0x52535446`. All host order.
//! We also turn on SO_PASSCRED, so each fd arrives with the pid of the process that sent it:
//! the restored process itself, which is what an incomplete shutdown must kill.

use std::io::{self, IoSliceMut};
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use nix::cmsg_space;
use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
use nix::sys::socket::{
    ControlMessageOwned, MsgFlags, UnixCredentials, getsockopt, recvmsg, setsockopt, sockopt,
};

/// The socket's name inside the work dir (CRIU's `LAZY_PAGES_SOCK_NAME`).
pub const SOCKET_NAME: &str = "lazy-pages.socket";
/// `LAZY_PAGES_RESTORE_FINISHED`: every task is restored.
pub const RESTORE_FINISHED: u32 = 0x5253_5446;

/// What went wrong on lazy-pages.socket.
#[derive(Debug, thiserror::Error)]
pub enum LazySocketError {
    #[error("cannot {what} {path}: {source}")]
    Io {
        what: &'static str,
        path: PathBuf,
        source: io::Error,
    },
    #[error(
        "timed out after {after:?} waiting for {waiting}: is `criu restore --lazy-pages` running \
         with the same work dir?"
    )]
    Timeout {
        after: Duration,
        waiting: &'static str,
    },
    #[error(
        "restore ended before it finished: see restore log (connection closed while waiting for {waiting})"
    )]
    Hangup { waiting: &'static str },
    #[error(
        "lazy-pages.socket peer runs as uid {uid}, not root or us: refusing its file descriptors"
    )]
    Foreign { uid: u32 },
    #[error("bad message from the restore on lazy-pages.socket: {0}")]
    Protocol(String),
}

type Result<T> = std::result::Result<T, LazySocketError>;

/// One task record, decoded from its pid word (sans-IO).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TaskRecord {
    /// A live process: its uffd follows as SCM_RIGHTS.
    Live { pid: i32 },
    /// A zombie: no uffd follows.
    Zombie { pid: i32 },
}

/// Decodes a task record's pid word: `vpid` for a live task, `-vpid` for a zombie.
pub fn decode_task_word(bytes: [u8; 4]) -> std::result::Result<TaskRecord, String> {
    match i32::from_ne_bytes(bytes) {
        0 => Err("task pid 0".into()),
        i32::MIN => Err(format!("task pid {}", i32::MIN)),
        p if p > 0 => Ok(TaskRecord::Live { pid: p }),
        p => Ok(TaskRecord::Zombie { pid: -p }),
    }
}

/// A task handed over by the restore.
#[derive(Debug)]
pub struct TaskUffd {
    /// The task's pid in the image (pstree.img vpid), positive for zombies too.
    pub pid: i32,
    /// Its userfaultfd; None for a zombie.
    pub uffd: Option<OwnedFd>,
    /// The pid (in our pid namespace) of the process that sent the uffd: the restored process.
    pub sender_pid: Option<i32>,
}

impl TaskUffd {
    pub fn is_zombie(&self) -> bool {
        self.uffd.is_none()
    }
}

/// The listening socket, bound before the restore starts.
pub struct LazySocket {
    listener: UnixListener,
    path: PathBuf,
}

impl LazySocket {
    /// Unlinks a stale socket and listens on `work_dir/lazy-pages.socket`.
    pub fn bind(work_dir: &Path) -> Result<Self> {
        let path = work_dir.join(SOCKET_NAME);
        let io = |what| {
            let path = path.clone();
            move |source| LazySocketError::Io { what, path, source }
        };
        match std::fs::remove_file(&path) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(io("remove the stale socket")(e)),
        }
        let listener = bind_long(work_dir, &path).map_err(io("listen on"))?;
        // Set on the listener so the accepted socket has it before the first record.
        setsockopt(&listener, sockopt::PassCred, &true)
            .map_err(|e| io("enable SO_PASSCRED on")(e.into()))?;
        Ok(Self { listener, path })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Accepts the one restore connection, then stops listening. The restore sends
    /// `expected_tasks` records: one per pstree.img entry, zombies included.
    pub fn accept_restore(self, expected_tasks: usize) -> Result<RestoreConn> {
        self.accept(expected_tasks, None)
    }

    /// Like [`LazySocket::accept_restore`], giving up after `timeout`.
    pub fn accept_restore_within(
        self,
        expected_tasks: usize,
        timeout: Duration,
    ) -> Result<RestoreConn> {
        self.accept(expected_tasks, Some(timeout))
    }

    fn accept(self, expected: usize, timeout: Option<Duration>) -> Result<RestoreConn> {
        let io = |what, source| LazySocketError::Io {
            what,
            path: self.path.clone(),
            source,
        };
        wait_readable(
            self.listener.as_fd(),
            timeout.map(|t| Instant::now() + t),
            "the restore to connect",
        )
        .map_err(|e| e.with_path(&self.path))?;
        let (stream, _) = self.listener.accept().map_err(|e| io("accept on", e))?;
        // CRIU accepts one connection and closes the listener; the name is useless afterwards.
        let _ = std::fs::remove_file(&self.path);
        setsockopt(&stream, sockopt::PassCred, &true)
            .map_err(|e| io("enable SO_PASSCRED on", e.into()))?;
        let peer = getsockopt(&stream, sockopt::PeerCredentials)
            .map_err(|e| io("get the peer of", e.into()))?;
        let uid = peer.uid();
        if uid != 0 && uid != nix::unistd::geteuid().as_raw() {
            return Err(LazySocketError::Foreign { uid });
        }
        Ok(RestoreConn {
            stream,
            path: self.path,
            expected,
            received: 0,
            timeout: None,
        })
    }
}

/// Binds `path`, or, when it is longer than sun_path allows, the same file through
/// /proc/self/fd/DIRFD (CRIU itself binds the relative name after chdir).
fn bind_long(dir: &Path, path: &Path) -> io::Result<UnixListener> {
    if path.as_os_str().len() < 108 {
        return UnixListener::bind(path);
    }
    let dirfd = std::fs::File::open(dir)?;
    UnixListener::bind(format!("/proc/self/fd/{}/{SOCKET_NAME}", dirfd.as_raw_fd()))
}

/// The restore's connection.
pub struct RestoreConn {
    stream: UnixStream,
    path: PathBuf,
    expected: usize,
    received: usize,
    timeout: Option<Duration>,
}

impl RestoreConn {
    /// Bounds every later call (None: wait as long as the restore takes).
    pub fn set_timeout(&mut self, timeout: Option<Duration>) {
        self.timeout = timeout;
    }

    /// Task records still to come.
    pub fn tasks_remaining(&self) -> usize {
        self.expected - self.received
    }

    /// The next task record (they come in arbitrary order).
    pub fn next_task(&mut self) -> Result<TaskUffd> {
        if self.received >= self.expected {
            return Err(LazySocketError::Protocol(format!(
                "asked for a task record after all {} arrived",
                self.expected
            )));
        }
        let deadline = self.timeout.map(|t| Instant::now() + t);
        let mut word = [0u8; 4];
        let mut got = Received::default();
        self.recv_exact(&mut word, deadline, "a task record", &mut got)?;
        if !got.fds.is_empty() {
            return Err(LazySocketError::Protocol(
                "a file descriptor arrived with a pid".into(),
            ));
        }
        let record = decode_task_word(word).map_err(LazySocketError::Protocol)?;
        let task = match record {
            TaskRecord::Zombie { pid } => TaskUffd {
                pid,
                uffd: None,
                sender_pid: got.sender,
            },
            TaskRecord::Live { pid } => {
                let mut byte = [0u8; 1];
                let mut got = Received::default();
                self.recv_exact(&mut byte, deadline, "a task's userfaultfd", &mut got)?;
                let n = got.fds.len();
                let Some(uffd) = got.fds.pop().filter(|_| n == 1) else {
                    return Err(LazySocketError::Protocol(format!(
                        "task {pid}: expected 1 userfaultfd, got {n} file descriptors"
                    )));
                };
                TaskUffd {
                    pid,
                    uffd: Some(uffd),
                    sender_pid: got.sender,
                }
            }
        };
        self.received += 1;
        Ok(task)
    }

    /// Waits for the restore's "every task restored" word.
    pub fn wait_restore_finished(&mut self) -> Result<()> {
        if self.received < self.expected {
            return Err(LazySocketError::Protocol(format!(
                "{} task records still expected before the restore can finish",
                self.expected - self.received
            )));
        }
        let deadline = self.timeout.map(|t| Instant::now() + t);
        let mut word = [0u8; 4];
        let mut got = Received::default();
        self.recv_exact(&mut word, deadline, "the restore to finish", &mut got)?;
        match u32::from_ne_bytes(word) {
            RESTORE_FINISHED if got.fds.is_empty() => Ok(()),
            w => Err(LazySocketError::Protocol(format!(
                "expected the restore-finished word {RESTORE_FINISHED:#x}, got {w:#x}"
            ))),
        }
    }

    /// Fills `buf`, collecting any fds and the sender's pid.
    fn recv_exact(
        &mut self,
        buf: &mut [u8],
        deadline: Option<Instant>,
        waiting: &'static str,
        got: &mut Received,
    ) -> Result<()> {
        let mut filled = 0;
        while filled < buf.len() {
            wait_readable(self.stream.as_fd(), deadline, waiting)
                .map_err(|e| e.with_path(&self.path))?;
            let mut iov = [IoSliceMut::new(&mut buf[filled..])];
            let mut cmsg = cmsg_space!([std::os::fd::RawFd; 4], UnixCredentials);
            let msg = match recvmsg::<()>(
                self.stream.as_raw_fd(),
                &mut iov,
                Some(&mut cmsg),
                MsgFlags::MSG_CMSG_CLOEXEC,
            ) {
                Ok(m) => m,
                Err(nix::errno::Errno::EINTR | nix::errno::Errno::EAGAIN) => continue,
                Err(e) => {
                    return Err(LazySocketError::Io {
                        what: "read from",
                        path: self.path.clone(),
                        source: e.into(),
                    });
                }
            };
            let bytes = msg.bytes;
            let truncated = msg.flags.contains(MsgFlags::MSG_CTRUNC);
            if let Ok(cmsgs) = msg.cmsgs() {
                for c in cmsgs {
                    match c {
                        ControlMessageOwned::ScmRights(fds) => {
                            // SAFETY: the kernel just installed these fds for us.
                            got.fds.extend(
                                fds.into_iter()
                                    .map(|fd| unsafe { OwnedFd::from_raw_fd(fd) }),
                            );
                        }
                        ControlMessageOwned::ScmCredentials(c) => got.sender = Some(c.pid()),
                        _ => {}
                    }
                }
            }
            if truncated {
                return Err(LazySocketError::Protocol(
                    "control data truncated: file descriptors lost".into(),
                ));
            }
            if bytes == 0 {
                return Err(LazySocketError::Hangup { waiting });
            }
            filled += bytes;
        }
        Ok(())
    }
}

#[derive(Default)]
struct Received {
    fds: Vec<OwnedFd>,
    sender: Option<i32>,
}

/// Timeout errors carry no path; IO errors get the socket's.
enum WaitError {
    Timeout {
        after: Duration,
        waiting: &'static str,
    },
    Io(io::Error),
}

impl WaitError {
    fn with_path(self, path: &Path) -> LazySocketError {
        match self {
            WaitError::Timeout { after, waiting } => LazySocketError::Timeout { after, waiting },
            WaitError::Io(source) => LazySocketError::Io {
                what: "poll",
                path: path.to_owned(),
                source,
            },
        }
    }
}

fn wait_readable(
    fd: std::os::fd::BorrowedFd<'_>,
    deadline: Option<Instant>,
    waiting: &'static str,
) -> std::result::Result<(), WaitError> {
    let start = Instant::now();
    loop {
        let timeout = match deadline {
            None => PollTimeout::NONE,
            Some(d) => {
                let left = d.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    return Err(WaitError::Timeout {
                        after: start.elapsed(),
                        waiting,
                    });
                }
                PollTimeout::try_from(left.as_millis().clamp(1, 60_000) as i32)
                    .unwrap_or(PollTimeout::MAX)
            }
        };
        let mut fds = [PollFd::new(fd, PollFlags::POLLIN)];
        match poll(&mut fds, timeout) {
            Ok(0) => continue,
            // POLLHUP/POLLERR too: the read reports them.
            Ok(_) => return Ok(()),
            Err(nix::errno::Errno::EINTR) => continue,
            Err(e) => return Err(WaitError::Io(e.into())),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decodes_task_words() {
        assert_eq!(
            decode_task_word(42i32.to_ne_bytes()),
            Ok(TaskRecord::Live { pid: 42 })
        );
        assert_eq!(
            decode_task_word((-42i32).to_ne_bytes()),
            Ok(TaskRecord::Zombie { pid: 42 })
        );
        assert!(decode_task_word(0i32.to_ne_bytes()).is_err());
        assert!(decode_task_word(i32::MIN.to_ne_bytes()).is_err());
        assert_eq!(RESTORE_FINISHED.to_le_bytes(), [0x46, 0x54, 0x53, 0x52]);
    }
}
