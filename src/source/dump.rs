//! Running the lazy dump at the source, or joining one that someone else started.
//!
//! pageserv's own path: `criu dump --lazy-pages --ps-socket 3 --status-fd 4`, one end of a
//! socketpair as the page-server connection (CRIU then needs no TCP port and no TLS of its own:
//! the QUIC link carries the pages), and a pipe for the status byte. The external path is what
//! runc does: the dump listens on `--page-server HOST:PORT` and writes its status byte into a FIFO.

use std::io::Read;
use std::net::{SocketAddr, TcpStream};
use std::os::fd::OwnedFd;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, ExitStatus};
use std::time::{Duration, SystemTime};

use crate::criu::binary::{Criu, log_tail, pass_fds};

/// Descriptor numbers the dump sees.
const PS_SOCKET_FD: i32 = 3;
const STATUS_FD: i32 = 4;

#[derive(Debug, thiserror::Error)]
pub enum DumpError {
    #[error("could not create {what} for the dump: {source}")]
    Setup {
        what: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("could not start `{criu} dump` for pid {pid}: {source}")]
    Spawn {
        criu: PathBuf,
        pid: i32,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "criu dump of pid {pid} ended before it was ready ({status}); the source process keeps running. \
         Last lines of {log}:\n{tail}"
    )]
    NotReady {
        pid: i32,
        status: String,
        log: PathBuf,
        tail: String,
    },
    #[error(
        "the dump wrote {byte:#04x} to its status fd instead of 0x00; treating the dump as failed"
    )]
    BadStatus { byte: u8 },
    #[error("could not read the dump's status from {path}: {source}")]
    Status {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "the dump's status {path} closed without the ready byte: the dump failed before it was ready \
         (see its log)"
    )]
    StatusEof { path: PathBuf },
    #[error(
        "runc checkpoint of container {name} ended before it was ready ({status}: {cause}); the \
         container keeps running at the source. Last lines of CRIU's log {log}:\n{tail}"
    )]
    RuncNotReady {
        name: String,
        status: String,
        cause: String,
        log: PathBuf,
        tail: String,
    },
    #[error("could not connect to the dump's page server at {addr}: {source}")]
    Connect {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
}

/// The connection to the dump's page server.
#[derive(Debug)]
pub enum PageServerConn {
    /// Our end of the `--ps-socket` socketpair; the session ends with FORCE_CLOSE.
    Unix(UnixStream),
    /// A TCP connection to `--page-server HOST:PORT`; the session ends with CLOSE.
    Tcp(TcpStream),
}

impl PageServerConn {
    /// CRIU expects FORCE_CLOSE on an inherited socket and CLOSE on TCP.
    pub fn wants_force_close(&self) -> bool {
        matches!(self, PageServerConn::Unix(_))
    }
}

/// A lazy dump whose tasks are frozen and whose page server is ready for GETs.
#[derive(Debug)]
pub struct ReadyDump {
    pub images_dir: PathBuf,
    pub conn: PageServerConn,
    /// The dump process, when pageserv started it.
    pub child: Option<Child>,
    pub log: Option<PathBuf>,
    /// When the dump started: an upper bound for the moment the tasks froze.
    pub started_at: SystemTime,
    /// When the root task was seen in its ptrace stop ([`crate::source::freeze_watch`]), for
    /// dumps pageserv starts itself.
    pub frozen_seen_at: Option<SystemTime>,
    /// When pageserv read the dump's ready byte (its page server answers from then on).
    pub ready_at: SystemTime,
    /// Dumps pageserv made fail and repeated because they came out eager
    /// ([`crate::source::eager_dump`]), and whether this one still is.
    pub redumps: u32,
    pub eager: bool,
    /// The container's freezer (runc dumps): frozen before dst may restore, so a dump that
    /// dies mid post-copy leaves the tasks stopped ([`crate::freezer`]).
    pub freezer: Option<crate::freezer::Freezer>,
}

impl ReadyDump {
    /// Waits for the dump process (if ours) to end; returns its status and log tail.
    pub fn wait(&mut self, timeout: Duration) -> Option<(ExitStatus, String)> {
        let child = self.child.as_mut()?;
        let deadline = std::time::Instant::now() + timeout;
        loop {
            match child.try_wait() {
                Ok(Some(status)) => {
                    let tail = self
                        .log
                        .as_deref()
                        .map(|l| log_tail(l, 15))
                        .unwrap_or_default();
                    return Some((status, tail));
                }
                Ok(None) if std::time::Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(20))
                }
                _ => return None,
            }
        }
    }
}

/// Options for a dump pageserv starts itself.
#[derive(Debug, Clone)]
pub struct DumpOptions {
    pub pid: i32,
    pub images_dir: PathBuf,
    pub work_dir: PathBuf,
    /// Extra CRIU options, e.g. `--shell-job`, `--tcp-established`.
    pub extra: Vec<String>,
}

/// Starts `criu dump --lazy-pages` on `opts.pid` and waits until its page server is ready.
pub fn start_lazy_dump(criu: &Criu, opts: &DumpOptions) -> Result<ReadyDump, DumpError> {
    let setup = |what| move |source| DumpError::Setup { what, source };
    std::fs::create_dir_all(&opts.images_dir).map_err(setup("the images directory"))?;
    std::fs::create_dir_all(&opts.work_dir).map_err(setup("the work directory"))?;
    let (ours, theirs) = UnixStream::pair().map_err(setup("the page-server socketpair"))?;
    let (status_r, status_w) =
        nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).map_err(|e| DumpError::Setup {
            what: "the status pipe",
            source: e.into(),
        })?;
    let log = opts.work_dir.join("dump.log");
    let theirs = OwnedFd::from(theirs);
    let mut cmd = criu.command();
    cmd.arg("dump")
        .arg("-t")
        .arg(opts.pid.to_string())
        .arg("-D")
        .arg(&opts.images_dir)
        .arg("-W")
        .arg(&opts.work_dir)
        .args(criu.log_args(&log))
        .arg("--lazy-pages")
        .arg("--ps-socket")
        .arg(PS_SOCKET_FD.to_string())
        .arg("--status-fd")
        .arg(STATUS_FD.to_string())
        .args(&opts.extra);
    pass_fds(&mut cmd, &[(&theirs, PS_SOCKET_FD), (&status_w, STATUS_FD)]);
    let started_at = SystemTime::now();
    let watch = crate::source::freeze_watch::FreezeWatch::start(opts.pid);
    let mut child = cmd.spawn().map_err(|source| DumpError::Spawn {
        criu: criu.path.clone(),
        pid: opts.pid,
        source,
    })?;
    // Our copies must go now, or EOF on the status pipe would never come if the dump dies.
    drop(theirs);
    drop(status_w);
    let status_path = PathBuf::from("(status pipe)");
    match read_status(std::fs::File::from(status_r), &status_path) {
        Ok(()) => {
            let ready_at = SystemTime::now();
            // From now on its page server answers every fault request. The dump itself (freeze,
            // parasite, images) stays at the normal policy, as without --realtime.
            crate::sched::raise_child(child.id());
            Ok(ReadyDump {
                images_dir: opts.images_dir.clone(),
                conn: PageServerConn::Unix(ours),
                child: Some(child),
                log: Some(log.clone()),
                started_at,
                frozen_seen_at: watch.finish(),
                ready_at,
                redumps: 0,
                eager: false,
                freezer: None,
            })
        }
        Err(DumpError::StatusEof { .. }) => {
            let status = child
                .wait()
                .map(|s| s.to_string())
                .unwrap_or_else(|e| format!("wait failed: {e}"));
            Err(DumpError::NotReady {
                pid: opts.pid,
                status,
                tail: log_tail(&log, 20),
                log,
            })
        }
        Err(e) => Err(e),
    }
}

/// Joins a dump started elsewhere (runc style): waits for its status byte on `status_fifo`,
/// then connects to its page server.
pub fn join_external_dump(
    images_dir: &Path,
    page_server: SocketAddr,
    status_fifo: &Path,
) -> Result<ReadyDump, DumpError> {
    let started_at = SystemTime::now();
    let fifo = std::fs::File::open(status_fifo).map_err(|source| DumpError::Status {
        path: status_fifo.to_path_buf(),
        source,
    })?;
    join_after_status(images_dir, page_server, fifo, status_fifo, started_at)
}

/// Joins an external dump whose status descriptor (named `status_name` in errors) is `status`:
/// waits for the ready byte, then connects to its page server.
pub fn join_after_status(
    images_dir: &Path,
    page_server: SocketAddr,
    status: impl Read,
    status_name: &Path,
    started_at: SystemTime,
) -> Result<ReadyDump, DumpError> {
    read_status(status, status_name)?;
    let tcp = TcpStream::connect(page_server).map_err(|source| DumpError::Connect {
        addr: page_server,
        source,
    })?;
    // Replies are read as soon as they arrive; requests must not sit in Nagle's buffer.
    let _ = tcp.set_nodelay(true);
    Ok(ReadyDump {
        images_dir: images_dir.to_path_buf(),
        conn: PageServerConn::Tcp(tcp),
        child: None,
        log: None,
        started_at,
        frozen_seen_at: None,
        ready_at: SystemTime::now(),
        redumps: 0,
        eager: false,
        freezer: None,
    })
}

/// Reads CRIU's status-fd handshake: exactly one 0x00 byte means ready.
fn read_status(mut from: impl Read, path: &Path) -> Result<(), DumpError> {
    let mut byte = [0u8; 1];
    loop {
        match from.read(&mut byte) {
            Ok(0) => {
                return Err(DumpError::StatusEof {
                    path: path.to_path_buf(),
                });
            }
            Ok(_) if byte[0] == 0 => return Ok(()),
            Ok(_) => return Err(DumpError::BadStatus { byte: byte[0] }),
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(source) => {
                return Err(DumpError::Status {
                    path: path.to_path_buf(),
                    source,
                });
            }
        }
    }
}

/// Sends CRIU a command it does not know: the lazy session fails and CRIU resumes the source.
pub fn fail_dump(conn: &PageServerConn, header_len: usize) {
    use std::io::Write;
    let mut header = vec![0u8; header_len];
    header[..4].copy_from_slice(&0xBAD0u32.to_ne_bytes());
    let r = match conn {
        PageServerConn::Unix(s) => (&*s).write_all(&header),
        PageServerConn::Tcp(s) => (&*s).write_all(&header),
    };
    if let Err(e) = r {
        tracing::warn!("could not tell the dump to fail: {e}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_handshake() {
        let p = Path::new("x");
        assert!(read_status(&[0u8][..], p).is_ok());
        assert!(matches!(
            read_status(&[][..], p),
            Err(DumpError::StatusEof { .. })
        ));
        assert!(matches!(
            read_status(&[7u8][..], p),
            Err(DumpError::BadStatus { byte: 7 })
        ));
    }
}
