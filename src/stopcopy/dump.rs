//! Running `criu dump --page-server` for stop-and-copy, or waiting for one someone else runs.
//!
//! pageserv's own dump: `criu dump --page-server --ps-socket 3 --action-script HOOK`. The
//! socketpair carries the page-server session (CRIU needs no port and no TLS: QUIC carries the
//! pages on). A non-lazy dump has no status-fd handshake; instead its post-dump action script
//! is the commit point: CRIU runs it after every image is written and flushed, while the tasks are
//! still frozen, and resumes them if it fails (`cr_dump_finish()`). The hook tells pageserv
//! "images ready" through one FIFO and waits on a second for the verdict: "ok" once dst has
//! restored (CRIU then kills the source tasks), anything else to make CRIU resume them. So the
//! source is never lost: it is killed only after the restore at dst succeeded.

use std::io::{ErrorKind, Read, Write};
use std::os::fd::OwnedFd;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, ExitStatus};
use std::time::{Duration, Instant, SystemTime};

use crate::criu::binary::{Criu, log_tail, pass_fds};

/// SO_SNDBUF of the dump's end of the page-server socketpair.
const PS_SOCKET_BUF: usize = 16 << 20;

const PS_SOCKET_FD: i32 = 3;
/// How long the hook waits for the verdict before failing (CRIU then resumes the tasks).
const HOOK_TIMEOUT_S: u64 = 600;

#[derive(Debug, thiserror::Error)]
pub enum StopCopyDumpError {
    #[error("setting up the dump ({what}): {source}")]
    Setup {
        what: String,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "criu dump of pid {pid} ended ({status}) before its images were ready; CRIU resumes the \
         tasks on failure. Last lines of {log}:\n{tail}"
    )]
    Failed {
        pid: i32,
        status: String,
        log: PathBuf,
        tail: String,
    },
    #[error("criu dump did not reach its post-dump hook within {0:?}")]
    Timeout(Duration),
}

/// A running `criu dump --page-server` that pageserv started.
#[derive(Debug)]
pub struct StopCopyDump {
    pub pid: i32,
    pub child: Child,
    pub images_dir: PathBuf,
    pub log: PathBuf,
    /// When the dump started: an upper bound of the freeze.
    pub started_at: SystemTime,
    ready_fifo: PathBuf,
    verdict_fifo: PathBuf,
}

/// Starts the dump of `pid`; returns it and pageserv's end of the page-server socket.
pub fn start(
    criu: &Criu,
    pid: i32,
    work: &Path,
    extra: &[String],
) -> Result<(StopCopyDump, UnixStream), StopCopyDumpError> {
    let setup = |what: &str| {
        let what = what.to_string();
        move |source| StopCopyDumpError::Setup { what, source }
    };
    let images_dir = work.join("images");
    std::fs::create_dir_all(&images_dir).map_err(setup("creating the images directory"))?;
    let ready_fifo = work.join("hook.ready");
    let verdict_fifo = work.join("hook.verdict");
    for f in [&ready_fifo, &verdict_fifo] {
        let _ = std::fs::remove_file(f);
        nix::unistd::mkfifo(f, nix::sys::stat::Mode::from_bits_truncate(0o600)).map_err(|e| {
            StopCopyDumpError::Setup {
                what: format!("mkfifo {}", f.display()),
                source: e.into(),
            }
        })?;
    }
    // CRIU execs the script by path, once per action; only post-dump waits for pageserv.
    let hook = work.join("post-dump-hook.sh");
    let script = format!(
        "#!/bin/sh\n\
         # pageserv stop-and-copy: hold the frozen tasks until dst has restored them.\n\
         [ \"$CRTOOLS_SCRIPT_ACTION\" = post-dump ] || exit 0\n\
         echo ready > '{ready}' || exit 1\n\
         read verdict < '{verdict}' || exit 1\n\
         [ \"$verdict\" = ok ]\n",
        ready = ready_fifo.display(),
        verdict = verdict_fifo.display()
    );
    std::fs::write(&hook, script).map_err(setup("writing the post-dump hook"))?;
    std::fs::set_permissions(&hook, std::fs::Permissions::from_mode(0o700))
        .map_err(setup("making the hook executable"))?;

    let (ours, theirs) = UnixStream::pair().map_err(setup("the page-server socketpair"))?;
    // A unix stream socket holds only its sender's SO_SNDBUF (~200 KiB by default): the dump
    // would stall every time pageserv is busy sending. Room for a few of CRIU's 4 MiB batches
    // lets both run at once. Forcing needs CAP_NET_ADMIN; a smaller buffer only costs speed.
    if nix::sys::socket::setsockopt(
        &theirs,
        nix::sys::socket::sockopt::SndBufForce,
        &PS_SOCKET_BUF,
    )
    .is_err()
    {
        let _ = nix::sys::socket::setsockopt(
            &theirs,
            nix::sys::socket::sockopt::SndBuf,
            &PS_SOCKET_BUF,
        );
    }
    let theirs = OwnedFd::from(theirs);
    let log = work.join("dump.log");
    let mut cmd = criu.command();
    cmd.arg("dump")
        .arg("-t")
        .arg(pid.to_string())
        .arg("-D")
        .arg(&images_dir)
        .arg("-W")
        .arg(work)
        .args(criu.log_args(&log))
        .arg("--page-server")
        .arg("--ps-socket")
        .arg(PS_SOCKET_FD.to_string())
        .arg("--action-script")
        .arg(&hook)
        .args(extra);
    pass_fds(&mut cmd, &[(&theirs, PS_SOCKET_FD)]);
    let started_at = SystemTime::now();
    let child = cmd.spawn().map_err(setup("spawning criu dump"))?;
    drop(theirs);
    Ok((
        StopCopyDump {
            pid,
            child,
            images_dir,
            log,
            started_at,
            ready_fifo,
            verdict_fifo,
        },
        ours,
    ))
}

impl StopCopyDump {
    /// Blocks until the dump runs its post-dump hook (every image is written), or fails.
    pub fn wait_images_ready(&mut self, timeout: Duration) -> Result<(), StopCopyDumpError> {
        let mut fifo = std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NONBLOCK)
            .open(&self.ready_fifo)
            .map_err(|source| StopCopyDumpError::Setup {
                what: format!("opening {}", self.ready_fifo.display()),
                source,
            })?;
        let deadline = Instant::now() + timeout;
        let mut buf = [0u8; 16];
        loop {
            match fifo.read(&mut buf) {
                Ok(n) if n > 0 => return Ok(()),
                Ok(_) => {}
                Err(e) if e.kind() == ErrorKind::WouldBlock => {}
                Err(source) => {
                    return Err(StopCopyDumpError::Setup {
                        what: "reading the hook's ready FIFO".into(),
                        source,
                    });
                }
            }
            if let Ok(Some(status)) = self.child.try_wait() {
                return Err(self.failed(status));
            }
            if Instant::now() > deadline {
                return Err(StopCopyDumpError::Timeout(timeout));
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// Tells the hook the verdict: `true` lets CRIU finish the dump and kill the source tasks,
    /// `false` makes it resume them. Then waits for the dump to exit.
    pub fn finish(&mut self, restored: bool) -> Result<ExitStatus, StopCopyDumpError> {
        // The hook may not be waiting (the dump failed first): never block on the FIFO then.
        let deadline = Instant::now() + Duration::from_secs(HOOK_TIMEOUT_S.min(30));
        loop {
            match std::fs::OpenOptions::new()
                .write(true)
                .custom_flags(libc::O_NONBLOCK)
                .open(&self.verdict_fifo)
            {
                Ok(mut f) => {
                    let _ = f.write_all(if restored { b"ok\n" } else { b"fail\n" });
                    break;
                }
                // ENXIO: no reader yet.
                Err(_) if Instant::now() < deadline => {
                    if self.child.try_wait().ok().flatten().is_some() {
                        break;
                    }
                    std::thread::sleep(Duration::from_millis(5));
                }
                Err(_) => break,
            }
        }
        self.child
            .wait()
            .map_err(|source| StopCopyDumpError::Setup {
                what: "waiting for criu dump".into(),
                source,
            })
    }

    fn failed(&self, status: ExitStatus) -> StopCopyDumpError {
        StopCopyDumpError::Failed {
            pid: self.pid,
            status: status.to_string(),
            log: self.log.clone(),
            tail: log_tail(&self.log, 20),
        }
    }

    /// The log tail, for reports.
    pub fn log_tail(&self) -> String {
        log_tail(&self.log, 20)
    }
}
