//! The restore started early: `criu restore --stream` runs from the moment a post-copy
//! migration begins, long before the source freezes, and is fed its images through CRIU's
//! image-streamer socket once they are in and checked.
//!
//! Why: a `criu restore` spends its first ~25-60 ms on this VM (more on a loaded one) before it
//! opens its first image: exec through CRIU's loader, then `kerndat_init` probing the kernel
//! (CRIU caches the probe only on a tmpfs `/run`, see [`crate::criu::kdat`]). Started after the
//! images arrive, all of it is downtime. Started with the migration, it happens while the
//! source still runs (or while pre-copy rounds go), and the restore proper begins the moment the
//! images are accepted. With `--stream` CRIU connects to the streamer before `kerndat_init`
//! (`open_image_dir` in `criu/crtools.c`'s `main`), so it cannot start without us, and then
//! blocks on its first request (`inventory.img`) until [`EarlyRestore::go`].
//!
//! Invariants:
//! - Nothing is restored before `go`: until then the streamer answers no request, so CRIU has
//!   read no image. Dropping an [`EarlyRestore`] that was not sent on kills its process group
//!   and reaps it; the streamer thread then ends (its gate is gone).
//! - The restore's command line is fixed at spawn. It is the one a cold start would run, plus
//!   `--stream`, with the restore options the source announced in its hello; dst::migration
//!   sends on an early restore only if ImagesDone's options are the same, and otherwise drops it
//!   and starts one anew (logged). Templates (`--restore-cmd`) and runc restores never start early.
//! - Its socket lives in the migration's directory (0700, root's): only root can connect, and the
//!   first connection is taken as CRIU's (CRIU connects within milliseconds of its exec).
//! - The streamer serves only regular files directly inside the images directory
//!   ([`image_streamer::plain_name`]); a name that is not there is answered "no such image",
//!   which CRIU takes as an empty image. So an image that exists is never answered so: a file
//!   that cannot be opened for another reason, or whose copy into CRIU's pipe fails (other than
//!   CRIU closing it), kills the restore, which then fails loudly rather than restore a part.
//! - It buffers at most one request ([`image_streamer::MAX_REQUEST_BYTES`]). Images up to
//!   [`PIPE_FILL_MAX`] go into their pipe in one write; larger ones are copied by threads, at most
//!   [`MAX_FEEDERS`] at once, and a restore that holds more large images open at once is killed
//!   (the streamer never waits for a copy: CRIU's next request may be what the copy waits for).
//! - [`EarlyRestore::is_waiting`] tells whether the restore is still there and connected; a
//!   caller sends on only such a restore, and starts a new one the usual way otherwise.
//! - Images a streamed restore would misread are never sent: see [`crate::criu::stream_restore`].

use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicI32, Ordering};
use std::sync::mpsc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::criu::binary::Criu;
use crate::criu::image_streamer::{self, SERVE_SOCKET, StreamerError};
use crate::dst::restore::{Restore, RestoreError, RestoreOptions};

/// How long the streamer waits for `criu restore` to connect (it does so within milliseconds
/// of its exec: before its log or its kernel probe).
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(30);
/// At most this many images larger than [`PIPE_FILL_MAX`] are being copied into CRIU's pipes at
/// once (CRIU reads an image to its end before it opens most others).
pub const MAX_FEEDERS: usize = 64;
/// Images up to this size go into their pipe in one write (the pipe is grown to fit them, up to
/// Linux's default `pipe-max-size`), with no thread.
pub const PIPE_FILL_MAX: u64 = 1 << 20;

#[derive(Debug, thiserror::Error)]
pub enum EarlyRestoreError {
    #[error("listening on {path} for the early restore's image streamer: {source}")]
    Listen {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Spawn(#[from] RestoreError),
    #[error("starting the early restore's image-streamer thread: {0}")]
    Thread(#[source] std::io::Error),
}

/// Why the streamer stopped before CRIU closed its connection.
#[derive(Debug, thiserror::Error)]
enum ServeError {
    #[error("criu restore did not connect to the image streamer within {0:?}")]
    NoConnection(Duration),
    #[error("reading or answering criu restore's image requests: {0}")]
    Io(#[from] std::io::Error),
    #[error(transparent)]
    Protocol(#[from] StreamerError),
    #[error("criu restore sent no pipe with its descriptor message for {0}")]
    NoPipe(String),
    #[error("criu restore sent more than one request at a time")]
    Pipelined,
    #[error("opening image {path} for criu restore: {source}")]
    Open {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("criu restore holds more than {MAX_FEEDERS} large images open at once")]
    TooManyFeeders,
}

/// A `criu restore --stream` waiting for its images.
pub struct EarlyRestore {
    /// The restore and the gate that sends it on; `None` once [`EarlyRestore::go`] took them.
    waiting: Option<(Restore, mpsc::Sender<PathBuf>)>,
    shared: Arc<Shared>,
    carried: Vec<String>,
}

/// What the streamer thread and the restore's owner share.
#[derive(Default)]
struct Shared {
    /// The owner dropped the restore before it was sent on: stop waiting for CRIU.
    stop: AtomicBool,
    /// CRIU connected to the streamer.
    connected: AtomicBool,
    /// The restore's process group (0 until it is spawned), killed on a failure of the streamer.
    pgid: AtomicI32,
}

impl Shared {
    /// Kills the restore: it must fail loudly rather than read a part of an image.
    fn kill_restore(&self, why: &dyn std::fmt::Display) {
        let pgid = self.pgid.load(Ordering::Relaxed);
        tracing::error!("killing the early restore (process group {pgid}): {why}");
        if pgid > 0 {
            let _ = nix::sys::signal::killpg(
                nix::unistd::Pid::from_raw(pgid),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
    }
}

impl EarlyRestore {
    /// Listens on `stream_dir/streamer-serve.sock` and starts `criu restore --stream` with
    /// `opts` plus `carried` (the restore options the source announced) in `work`. `Ok(None)`
    /// unless `opts` [starts early](RestoreOptions::starts_early).
    pub fn start(
        criu: &Criu,
        stream_dir: &Path,
        work: &Path,
        opts: &RestoreOptions,
        carried: Vec<String>,
    ) -> Result<Option<EarlyRestore>, EarlyRestoreError> {
        if !opts.starts_early() {
            return Ok(None);
        }
        let path = stream_dir.join(SERVE_SOCKET);
        let listen = |source| EarlyRestoreError::Listen {
            path: path.clone(),
            source,
        };
        std::fs::create_dir_all(stream_dir).map_err(listen)?;
        let listener = UnixListener::bind(&path).map_err(listen)?;
        listener.set_nonblocking(true).map_err(listen)?;
        let shared = Arc::new(Shared::default());
        let (gate, gate_rx) = mpsc::channel();
        let serving = shared.clone();
        std::thread::Builder::new()
            .name("image-streamer".into())
            .spawn(move || {
                if let Err(e) = serve(listener, &serving, gate_rx) {
                    tracing::warn!("the early restore's image streamer stopped: {e}");
                }
            })
            .map_err(EarlyRestoreError::Thread)?;
        let restore = Restore::start_streamed(criu, stream_dir, work, &opts.with_carried(&carried));
        match restore {
            Ok(r) => {
                shared
                    .pgid
                    .store(i32::try_from(r.pid()).unwrap_or(0), Ordering::Relaxed);
                Ok(Some(EarlyRestore {
                    waiting: Some((r, gate)),
                    shared,
                    carried,
                }))
            }
            Err(e) => {
                shared.stop.store(true, Ordering::Relaxed);
                Err(e.into())
            }
        }
    }

    /// The restore is still running and connected to the streamer, waiting for its images.
    pub fn is_waiting(&mut self) -> bool {
        let connected = self.shared.connected.load(Ordering::Relaxed);
        self.waiting
            .as_mut()
            .is_some_and(|(r, _)| connected && matches!(r.try_wait(), Ok(None)))
    }

    /// The waiting `criu restore`'s pid.
    pub fn pid(&self) -> Option<u32> {
        self.waiting.as_ref().map(|(r, _)| r.pid())
    }

    /// The restore options the restore was started with (beyond dst's own).
    pub fn carried(&self) -> &[String] {
        &self.carried
    }

    /// The images in `images` are in and checked: the streamer serves them from now on, and the
    /// restore proceeds.
    pub fn go(mut self, images: &Path) -> Restore {
        let (restore, gate) = self
            .waiting
            .take()
            .expect("an EarlyRestore holds its restore until go, which consumes it");
        // A streamer that already ended (CRIU died) is no reason to fail here: the restore's
        // exit status tells.
        let _ = gate.send(images.to_path_buf());
        restore
    }
}

impl Drop for EarlyRestore {
    fn drop(&mut self) {
        if let Some((mut restore, _gate)) = self.waiting.take() {
            self.shared.stop.store(true, Ordering::Relaxed);
            restore.kill();
        }
    }
}

/// Accepts CRIU's connection, waits for the gate, then answers requests until CRIU closes.
fn serve(
    listener: UnixListener,
    shared: &Arc<Shared>,
    gate: mpsc::Receiver<PathBuf>,
) -> Result<(), ServeError> {
    let conn = match accept(&listener, &shared.stop) {
        Ok(Some(c)) => c,
        Ok(None) => return Ok(()),
        Err(e) => {
            shared.kill_restore(&e);
            return Err(e);
        }
    };
    drop(listener);
    shared.connected.store(true, Ordering::Relaxed);
    let served = answer(&conn, shared, gate);
    if let Err(e) = &served {
        // Before the connection closes: CRIU must not see a clean end first and exit on its own.
        shared.kill_restore(e);
    }
    served
}

/// Answers CRIU's requests on `conn` until it closes it (or the gate is dropped).
fn answer(
    conn: &UnixStream,
    shared: &Arc<Shared>,
    gate: mpsc::Receiver<PathBuf>,
) -> Result<(), ServeError> {
    let mut images: Option<PathBuf> = None;
    let mut buf = Vec::with_capacity(256);
    let mut feeders = Vec::new();
    loop {
        let Some(name) = next_request(conn, &mut buf)? else {
            return Ok(());
        };
        let dir = match &images {
            Some(d) => d.clone(),
            None => match gate.recv() {
                Ok(d) => images.insert(d).clone(),
                // Cancelled: closing the connection ends a CRIU that is still alive.
                Err(_) => return Ok(()),
            },
        };
        let file = match image_streamer::plain_name(&name) {
            Some(n) => open_image(&dir.join(n))?,
            None => {
                tracing::warn!(image = %name, "criu restore asked for an image outside its directory");
                None
            }
        };
        let mut w = conn;
        w.write_all(&image_streamer::encode_reply(file.is_some()))?;
        let Some(file) = file else {
            continue;
        };
        let (got, pipe) = crate::fdpass::recv_fd(conn, &mut [0u8; 1])?;
        if got == 0 {
            return Ok(());
        }
        let pipe = pipe.ok_or_else(|| ServeError::NoPipe(name.clone()))?;
        feed(file, pipe, name, shared, &mut feeders)?;
    }
}

fn accept(listener: &UnixListener, stop: &AtomicBool) -> Result<Option<UnixStream>, ServeError> {
    let deadline = Instant::now() + CONNECT_TIMEOUT;
    loop {
        match listener.accept() {
            Ok((conn, _)) => {
                conn.set_nonblocking(false)?;
                return Ok(Some(conn));
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
            Err(e) => return Err(e.into()),
        }
        if stop.load(Ordering::Relaxed) {
            return Ok(None);
        }
        if Instant::now() >= deadline {
            return Err(ServeError::NoConnection(CONNECT_TIMEOUT));
        }
        let mut fds = [nix::poll::PollFd::new(
            listener.as_fd(),
            nix::poll::PollFlags::POLLIN,
        )];
        // Wakes at once for a connection; the timeout only bounds how late a stop is seen.
        let _ = nix::poll::poll(&mut fds, nix::poll::PollTimeout::from(100u16));
    }
}

/// The next request's file name; `None` when CRIU closed the connection.
fn next_request(mut conn: &UnixStream, buf: &mut Vec<u8>) -> Result<Option<String>, ServeError> {
    loop {
        if let Some((name, used)) = image_streamer::decode_request(buf)? {
            if used != buf.len() {
                // CRIU waits for each reply before its next request; more is not CRIU.
                return Err(ServeError::Pipelined);
            }
            buf.clear();
            return Ok(Some(name));
        }
        let mut chunk = [0u8; 512];
        let n = conn.read(&mut chunk)?;
        if n == 0 {
            return Ok(None);
        }
        buf.extend_from_slice(&chunk[..n]);
    }
}

/// The image at `path`; `None` only if there is no such file (or it is not a regular file).
fn open_image(path: &Path) -> Result<Option<File>, ServeError> {
    let open = |source| ServeError::Open {
        path: path.to_path_buf(),
        source,
    };
    match File::open(path) {
        Ok(f) => Ok(f.metadata().map_err(open)?.is_file().then_some(f)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(open(e)),
    }
}

/// Writes `file` into CRIU's `pipe` and closes it: here if it fits in the pipe, else on a
/// thread (at most [`MAX_FEEDERS`] at once). A copy that fails other than by CRIU closing the
/// pipe kills the restore.
fn feed(
    mut file: File,
    pipe: OwnedFd,
    name: String,
    shared: &Arc<Shared>,
    feeders: &mut Vec<JoinHandle<()>>,
) -> Result<(), ServeError> {
    let len = file.metadata().map(|m| m.len()).unwrap_or(u64::MAX);
    let fits = len <= PIPE_FILL_MAX && pipe_fits(&pipe, len);
    let mut pipe = File::from(pipe);
    let shared = shared.clone();
    let copy = move |file: &mut File, pipe: &mut File| match std::io::copy(file, pipe) {
        Ok(_) => {}
        // CRIU stopped reading (it failed or was killed): its exit tells why.
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => {
            tracing::debug!(image = %name, "criu restore closed the image's pipe: {e}")
        }
        Err(e) => shared.kill_restore(&format!("feeding image {name}: {e}")),
    };
    if fits {
        copy(&mut file, &mut pipe);
        return Ok(());
    }
    feeders.retain(|h| !h.is_finished());
    if feeders.len() >= MAX_FEEDERS {
        return Err(ServeError::TooManyFeeders);
    }
    let h = std::thread::Builder::new()
        .name("image-feeder".into())
        .spawn(move || copy(&mut file, &mut pipe))?;
    feeders.push(h);
    Ok(())
}

/// True if an empty `pipe` takes `len` bytes without blocking (growing it if it must).
fn pipe_fits(pipe: &OwnedFd, len: u64) -> bool {
    use nix::fcntl::{FcntlArg, fcntl};
    let cap = fcntl(pipe, FcntlArg::F_GETPIPE_SZ).unwrap_or(0) as u64;
    if len <= cap {
        return true;
    }
    let want = i32::try_from(len).unwrap_or(i32::MAX);
    fcntl(pipe, FcntlArg::F_SETPIPE_SZ(want)).is_ok_and(|c| c as u64 >= len)
}
