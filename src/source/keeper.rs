//! The dump keeper: a small process that holds a copy of the lazy dump's page-server socket so
//! the frozen source survives `pageserv src`.
//!
//! Measured with CRIU 4.1.1: when the process at the other end of `--ps-socket` dies, the dump
//! sees EOF, counts the lazy transfer as *successful* and kills the source tasks ("Lazy pages
//! transfer finished successfully / Unfreezing tasks into 2"), even though dst lacks pages; if it
//! dies while CRIU writes a reply, CRIU gets EPIPE and *resumes* them instead. Either breaks the
//! rule in [`crate::outcome`]. The keeper's copy of the socket means CRIU never sees the peer go.
//!
//! `pageserv src` talks to it over a control socket (bytes: `S` images shipped, `R` release).
//! If that socket closes without `R`, src died or gave up: before the images were shipped the
//! keeper makes the dump fail (CRIU resumes the source, see [`crate::outcome`]); after, it keeps
//! the source frozen and listens on `<work>/keeper.sock` for one line:
//! `take` (a resumed `pageserv src` gets the socket back, at a request boundary, and the same
//! connection then acts as its control socket), `resume-source` (make the dump fail: CRIU resumes
//! the source; only when no restored copy runs) or `kill-source` (end the dump: CRIU kills it).

use std::io::{Read, Write};
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::criu::binary::pass_fds;
use crate::fdpass;

/// The socket a frozen dump's keeper listens on, inside the source's work directory.
pub const KEEPER_SOCKET: &str = "keeper.sock";
const PS_FD: i32 = 3;
const CTL_FD: i32 = 4;
/// A page-server command CRIU does not know: the session fails and CRIU resumes the source.
const BOGUS_COMMAND: u32 = 0xBAD0;
const FORCE_CLOSE: u32 = 0x1024;

#[derive(Debug, thiserror::Error)]
pub enum KeeperError {
    #[error("dump keeper: {what}: {source}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "no frozen dump to take over in {dir}: its keeper is not listening ({source}). Was the \
         migration left frozen there (see the message pageserv src printed)?"
    )]
    NoKeeper {
        dir: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("the dump keeper in {dir} refused: {why}")]
    Refused { dir: PathBuf, why: String },
}

fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> KeeperError {
    let what = what.into();
    move |source| KeeperError::Io { what, source }
}

/// src's handle on its keeper.
#[derive(Debug)]
pub struct KeeperLink {
    ctl: UnixStream,
    child: Option<Child>,
}

impl KeeperLink {
    /// Starts `exe keep-dump` holding a copy of `ps_socket` (src's end of the dump's socket).
    pub fn spawn(
        exe: &Path,
        work: &Path,
        ps_socket: &UnixStream,
        criu_pid: u32,
        header_len: usize,
    ) -> Result<Self, KeeperError> {
        let (ours, theirs) = UnixStream::pair().map_err(io("creating the control socket"))?;
        let ps: OwnedFd = ps_socket
            .as_fd()
            .try_clone_to_owned()
            .map_err(io("duplicating the dump socket"))?;
        let theirs = OwnedFd::from(theirs);
        let mut cmd = Command::new(exe);
        cmd.arg("keep-dump")
            .env(crate::child::INTERNAL_ENV, "1")
            .arg("--work")
            .arg(work)
            .arg("--criu-pid")
            .arg(criu_pid.to_string())
            .arg("--header-len")
            .arg(header_len.to_string())
            .stdin(Stdio::null())
            .stdout(Stdio::null());
        // Its log goes to a file: holding src's stderr would keep a caller's pipe open forever.
        match std::fs::File::create(work.join("keeper.log")) {
            Ok(f) => cmd.stderr(f),
            Err(_) => cmd.stderr(Stdio::null()),
        };
        pass_fds(&mut cmd, &[(&ps, PS_FD), (&theirs, CTL_FD)]);
        // Its own session: a signal to src's process group must not reach the keeper.
        // SAFETY: setsid is async-signal-safe.
        unsafe {
            std::os::unix::process::CommandExt::pre_exec(&mut cmd, || {
                libc::setsid();
                Ok(())
            });
        }
        let child = cmd.spawn().map_err(io("starting the dump keeper"))?;
        tracing::info!(pid = child.id(), "dump keeper holds the dump's socket");
        Ok(KeeperLink {
            ctl: ours,
            child: Some(child),
        })
    }

    /// Takes over a frozen dump left in `work`: returns the link and the dump's socket, positioned
    /// at a request boundary.
    pub fn take(work: &Path) -> Result<(Self, UnixStream), KeeperError> {
        let path = work.join(KEEPER_SOCKET);
        let ctl = UnixStream::connect(&path).map_err(|source| KeeperError::NoKeeper {
            dir: work.to_path_buf(),
            source,
        })?;
        (&ctl)
            .write_all(b"take\n")
            .map_err(io("asking the keeper"))?;
        let mut b = [0u8; 1];
        let (n, fd) = fdpass::recv_fd(&ctl, &mut b).map_err(io("receiving the dump socket"))?;
        match (n, fd) {
            (1, Some(fd)) if b[0] == b'+' => {
                Ok((KeeperLink { ctl, child: None }, UnixStream::from(fd)))
            }
            _ => Err(KeeperError::Refused {
                dir: work.to_path_buf(),
                why: "no socket came back (see its log beside keeper.sock)".into(),
            }),
        }
    }

    /// dst has every image: from now on a restored copy may run.
    pub fn images_shipped(&mut self) {
        if let Err(e) = (&self.ctl).write_all(b"S") {
            tracing::warn!("cannot tell the dump keeper the images are shipped: {e}");
        }
    }

    /// The dump has been ended or made to fail by src itself: the keeper exits.
    pub fn release(mut self) {
        let _ = (&self.ctl).write_all(b"R");
        if let Some(mut c) = self.child.take() {
            let _ = crate::child::wait_timeout(&mut c, Duration::from_secs(5));
        }
    }

    /// src leaves: the keeper keeps the source frozen (or resumes it if no image was shipped).
    pub fn leave(self) {}
}

/// Asks the keeper of a frozen dump in `work` to end it: `resume` makes CRIU resume the source
/// tasks, otherwise CRIU kills them.
pub fn settle_frozen(work: &Path, resume: bool) -> Result<(), KeeperError> {
    let path = work.join(KEEPER_SOCKET);
    let mut s = UnixStream::connect(&path).map_err(|source| KeeperError::NoKeeper {
        dir: work.to_path_buf(),
        source,
    })?;
    let line: &[u8] = if resume {
        b"resume-source\n"
    } else {
        b"kill-source\n"
    };
    s.write_all(line).map_err(io("asking the keeper"))?;
    let mut ack = Vec::new();
    let _ = s.read_to_end(&mut ack);
    if ack.first() == Some(&b'+') {
        Ok(())
    } else {
        Err(KeeperError::Refused {
            dir: work.to_path_buf(),
            why: String::from_utf8_lossy(&ack).into_owned(),
        })
    }
}

/// The keeper process (`pageserv keep-dump`): fd 3 is the dump socket, fd 4 the control socket.
pub fn keeper_main(work: &Path, criu_pid: i32, header_len: usize) -> Result<(), KeeperError> {
    use std::os::fd::FromRawFd;
    // SAFETY: src passed these two descriptors to us; nothing else in this process owns them.
    let ps = unsafe { UnixStream::from_raw_fd(PS_FD) };
    let ctl = unsafe { UnixStream::from_raw_fd(CTL_FD) };
    let mut shipped = false;
    if follow(&ctl, &mut shipped) {
        return Ok(());
    }
    if !shipped {
        tracing::warn!("pageserv src left before any image was shipped: resuming the source");
        end_dump(&ps, BOGUS_COMMAND, header_len);
        return Ok(());
    }
    let path = work.join(KEEPER_SOCKET);
    let _ = std::fs::remove_file(&path);
    let listener = UnixListener::bind(&path).map_err(io(format!("binding {}", path.display())))?;
    tracing::warn!(
        criu_pid,
        "pageserv src is gone after the images were shipped: the source stays frozen"
    );
    loop {
        if !wait_for_client(&listener, &ps) {
            tracing::warn!(criu_pid, "the dump is gone: nothing left to keep");
            let _ = std::fs::remove_file(&path);
            return Ok(());
        }
        let (conn, _) = listener.accept().map_err(io("accepting"))?;
        // Whoever may take, resume or kill a frozen tree must be who could anyway: root or
        // pageserv's own user (as dst's lazy-pages.socket checks its peer).
        match peer_uid(&conn) {
            Ok(uid) if uid_may_command(uid, nix::unistd::geteuid().as_raw()) => {}
            Ok(uid) => {
                tracing::warn!(uid, "refused a keeper.sock client of another user");
                let _ = (&conn).write_all(
                    format!("-refused: uid {uid} is neither root nor pageserv's user").as_bytes(),
                );
                continue;
            }
            Err(e) => {
                tracing::warn!("refused a keeper.sock client whose credentials are unknown: {e}");
                continue;
            }
        }
        let mut line = String::new();
        let mut b = [0u8; 1];
        while (&conn).read(&mut b).map_err(io("reading a command"))? == 1 && b[0] != b'\n' {
            line.push(b[0] as char);
        }
        match line.as_str() {
            "take" => {
                if let Err(e) = resync(&ps, criu_pid) {
                    let _ = (&conn).write_all(format!("-{e}").as_bytes());
                    continue;
                }
                fdpass::send_fd(&conn, b"+", ps.as_raw_fd()).map_err(io("passing the socket"))?;
                if follow(&conn, &mut shipped) {
                    return Ok(());
                }
                tracing::warn!("the resumed pageserv src is gone too: the source stays frozen");
            }
            "resume-source" | "kill-source" => {
                let cmd = if line == "resume-source" {
                    BOGUS_COMMAND
                } else {
                    FORCE_CLOSE
                };
                let _ = resync(&ps, criu_pid);
                end_dump(&ps, cmd, header_len);
                let _ = (&conn).write_all(b"+");
                let _ = std::fs::remove_file(&path);
                return Ok(());
            }
            other => {
                let _ = (&conn).write_all(format!("-unknown command {other:?}").as_bytes());
            }
        }
    }
}

/// The uid of the process at the other end of `conn` (SO_PEERCRED: as of its connect).
fn peer_uid(conn: &UnixStream) -> std::io::Result<u32> {
    nix::sys::socket::getsockopt(conn, nix::sys::socket::sockopt::PeerCredentials)
        .map(|c| c.uid())
        .map_err(std::io::Error::from)
}

/// May a client running as `uid` command the keeper of a pageserv running as `ours`? Root, or
/// the same user.
pub fn uid_may_command(uid: u32, ours: u32) -> bool {
    uid == 0 || uid == ours
}

/// Waits for a client; false if the dump closed its socket first (CRIU ended). Leftover reply
/// bytes are read and dropped meanwhile (a retry resynchronises anyway).
fn wait_for_client(listener: &UnixListener, ps: &UnixStream) -> bool {
    use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
    use std::os::fd::AsFd;
    let mut sink = vec![0u8; 1 << 16];
    loop {
        let mut fds = [
            PollFd::new(listener.as_fd(), PollFlags::POLLIN),
            PollFd::new(ps.as_fd(), PollFlags::POLLIN),
        ];
        if poll(&mut fds, PollTimeout::NONE).is_err() {
            continue;
        }
        let client = fds[0].revents().is_some_and(|r| !r.is_empty());
        let dump = fds[1].revents().unwrap_or(PollFlags::empty());
        if dump.intersects(PollFlags::POLLHUP | PollFlags::POLLERR) {
            return false;
        }
        if dump.contains(PollFlags::POLLIN) && matches!((&*ps).read(&mut sink), Ok(0)) {
            return false;
        }
        if client {
            return true;
        }
    }
}

/// Follows a control connection; true when released.
fn follow(ctl: &UnixStream, shipped: &mut bool) -> bool {
    let mut b = [0u8; 1];
    loop {
        match (&*ctl).read(&mut b) {
            Ok(1) if b[0] == b'S' => *shipped = true,
            Ok(1) if b[0] == b'R' => return true,
            Ok(1) => {}
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            _ => return false,
        }
    }
}

/// Sends one header-only command (unknown: the session fails; FORCE_CLOSE: it ends cleanly) and
/// reads until CRIU closes its end, so it never blocks writing a reply nobody reads.
fn end_dump(ps: &UnixStream, cmd: u32, header_len: usize) {
    let mut header = vec![0u8; header_len.clamp(4, 64)];
    header[..4].copy_from_slice(&cmd.to_ne_bytes());
    if let Err(e) = (&*ps).write_all(&header) {
        tracing::warn!("cannot send the final command to the dump: {e}");
    }
    let _ = ps.set_read_timeout(Some(Duration::from_secs(60)));
    let mut sink = vec![0u8; 1 << 16];
    while matches!((&*ps).read(&mut sink), Ok(n) if n > 0) {}
}

/// Brings the dump socket to a request boundary: CRIU serves requests strictly one after the
/// other and only reads the next header after writing a whole reply, so once it blocks in
/// recvfrom (syscall 45) and nothing is left to read on our side, the stream is between replies.
/// Every half-read reply of the process that died is thrown away; dst asks again for what it
/// still lacks.
fn resync(ps: &UnixStream, criu_pid: i32) -> Result<(), String> {
    ps.set_nonblocking(true).map_err(|e| e.to_string())?;
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut sink = vec![0u8; 1 << 16];
    let mut drain = || {
        let mut n = 0usize;
        while let Ok(k) = (&*ps).read(&mut sink) {
            if k == 0 {
                return Err("the dump closed its socket".to_string());
            }
            n += k;
        }
        Ok(n)
    };
    let result = loop {
        drain()?;
        let sys = std::fs::read_to_string(format!("/proc/{criu_pid}/syscall"))
            .map_err(|e| format!("cannot read the state of criu dump {criu_pid}: {e}"))?;
        if sys.split_whitespace().next() == Some("45") && drain()? == 0 {
            break Ok(());
        }
        if Instant::now() > deadline {
            break Err(format!(
                "criu dump {criu_pid} never went idle on its page-server socket ({})",
                sys.trim()
            ));
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    ps.set_nonblocking(false).map_err(|e| e.to_string())?;
    result
}
