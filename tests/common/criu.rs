//! Test helpers for running the real CRIU: find the binary, start a process tree CRIU can dump
//! (init of its own pid namespace), run CRIU with a log file and show the log's tail on failure.
//!
//! Include from an integration test with
//! `#[path = "common/criu.rs"] mod criu;`
//! (no tests/common/mod.rs needed). Functions return `Result<_, String>` with messages ready to
//! `panic!` on; only [`require`] prints and returns `None` to let a test skip.
#![allow(dead_code)]

use std::ffi::OsStr;
use std::fs::File;
use std::io::Read;
use std::os::fd::AsRawFd;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

/// Where setup-criu installs CRIU (4.2.x from Debian forky by default).
pub const CRIU_PREFIX_BIN: &str = "/opt/pageserv/criu/bin/criu";
/// Lazy dumps need a 4 MiB pipe (docs/criu-protocols.md §6); we ask for 8 MiB like the hosts.
pub const PIPE_MAX_SIZE: u64 = 8 << 20;

/// A located CRIU binary.
#[derive(Debug, Clone)]
pub struct Criu {
    pub bin: PathBuf,
}

/// Finds CRIU: `$PAGESERV_CRIU`, else [`CRIU_PREFIX_BIN`], else `criu` on `PATH`.
pub fn locate() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("PAGESERV_CRIU").filter(|p| !p.is_empty()) {
        return Some(PathBuf::from(p));
    }
    let prefix = PathBuf::from(CRIU_PREFIX_BIN);
    if prefix.exists() {
        return Some(prefix);
    }
    std::env::var_os("PATH").and_then(|path| {
        std::env::split_paths(&path)
            .map(|d| d.join("criu"))
            .find(|p| p.is_file())
    })
}

/// The CRIU to test with, or `None` after printing why the test is skipped (CRIU absent, or
/// not root). A set but broken `$PAGESERV_CRIU` is a failure, not a skip.
pub fn require(test: &str) -> Option<Criu> {
    if !nix::unistd::geteuid().is_root() {
        eprintln!("SKIP {test}: needs root to run CRIU");
        return None;
    }
    match locate() {
        Some(bin) => {
            assert!(
                bin.exists(),
                "{test}: CRIU {} (from $PAGESERV_CRIU) does not exist",
                bin.display()
            );
            Some(Criu { bin })
        }
        None => {
            eprintln!(
                "SKIP {test}: CRIU not found ($PAGESERV_CRIU, {CRIU_PREFIX_BIN}, PATH); \
                 install it with tools/setup-criu"
            );
            None
        }
    }
}

/// The last `n` lines of a log file, or a note that it could not be read.
pub fn log_tail(path: &Path, n: usize) -> String {
    match std::fs::read(path) {
        Ok(bytes) => {
            let text = String::from_utf8_lossy(&bytes);
            let lines: Vec<&str> = text.lines().collect();
            let from = lines.len().saturating_sub(n);
            format!(
                "--- last {} lines of {} ---\n{}",
                lines.len() - from,
                path.display(),
                lines[from..].join("\n")
            )
        }
        Err(e) => format!("--- {}: {e} ---", path.display()),
    }
}

fn describe_failure(what: &str, status: ExitStatus, log: &Path) -> String {
    let stderr = log.with_extension("stderr");
    let err = std::fs::read_to_string(&stderr).unwrap_or_default();
    format!(
        "{what} failed ({status})\nstderr: {}\n{}",
        err.trim(),
        log_tail(log, 40)
    )
}

impl Criu {
    /// A `criu` command with `-o LOG -v4` (LOG absolute, so it does not land in `-D`), stdin
    /// from /dev/null, stdout and stderr into `LOG` with extension `stderr`.
    pub fn command<S: AsRef<OsStr>>(&self, args: &[S], log: &Path) -> Result<Command, String> {
        let log = std::path::absolute(log).map_err(|e| format!("{}: {e}", log.display()))?;
        let err = File::create(log.with_extension("stderr"))
            .map_err(|e| format!("{}: {e}", log.with_extension("stderr").display()))?;
        let out = err.try_clone().map_err(|e| e.to_string())?;
        let mut cmd = Command::new(&self.bin);
        cmd.args(args)
            .arg("-o")
            .arg(&log)
            .arg("-v4")
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err);
        Ok(cmd)
    }

    /// Runs CRIU to completion (at most `timeout`); a failure carries the log tail.
    pub fn run<S: AsRef<OsStr>>(
        &self,
        args: &[S],
        log: &Path,
        timeout: Duration,
    ) -> Result<(), String> {
        let mut child = self.spawn(args, log, false)?;
        let status = child.wait(timeout)?;
        if status.success() {
            Ok(())
        } else {
            Err(describe_failure(&self.describe(args), status, log))
        }
    }

    fn describe<S: AsRef<OsStr>>(&self, args: &[S]) -> String {
        let args: Vec<_> = args.iter().map(|a| a.as_ref().to_string_lossy()).collect();
        format!("{} {}", self.bin.display(), args.join(" "))
    }

    /// Starts CRIU in the background. With `status_fd`, a pipe is passed as `--status-fd` so
    /// [`CriuChild::wait_ready`] can wait for its "ready" byte (lazy dump, page-server,
    /// lazy-pages).
    pub fn spawn<S: AsRef<OsStr>>(
        &self,
        args: &[S],
        log: &Path,
        status_fd: bool,
    ) -> Result<CriuChild, String> {
        let mut cmd = self.command(args, log)?;
        let mut status = None;
        if status_fd {
            let (r, w) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)
                .map_err(|e| format!("pipe2: {e}"))?;
            let wfd = w.as_raw_fd();
            cmd.arg("--status-fd").arg(wfd.to_string());
            // SAFETY: only fcntl, which is async-signal-safe, runs between fork and exec.
            unsafe {
                cmd.pre_exec(move || {
                    if libc::fcntl(wfd, libc::F_SETFD, 0) == -1 {
                        return Err(std::io::Error::last_os_error());
                    }
                    Ok(())
                });
            }
            status = Some((r, w));
        }
        let child = cmd
            .spawn()
            .map_err(|e| format!("{}: {e}", self.describe(args)))?;
        // Drop our copy of the write end so EOF tells us CRIU died without a ready byte.
        let status = status.map(|(r, _w)| File::from(r));
        Ok(CriuChild {
            child: Some(child),
            status,
            log: log.to_path_buf(),
            what: self.describe(args),
        })
    }
}

impl Criu {
    /// `criu dump --lazy-pages` of `pid` into `img`, its page server on 127.0.0.1 at a free
    /// port, once it is ready (the images complete, the tree frozen): the dump and the port.
    pub fn lazy_dump(
        &self,
        pid: i32,
        img: &Path,
        log: &Path,
    ) -> Result<(CriuChild, String), String> {
        let port = free_tcp_port()?.to_string();
        let img = img.to_str().ok_or("non-UTF-8 image path")?;
        let pid = pid.to_string();
        let mut dump = self.spawn(
            &[
                "dump",
                "-t",
                &pid,
                "-D",
                img,
                "--lazy-pages",
                "--address",
                "127.0.0.1",
                "--port",
                &port,
            ],
            log,
            true,
        )?;
        dump.wait_ready(Duration::from_secs(120))?;
        Ok((dump, port))
    }
}

/// A CRIU process started by [`Criu::spawn`]; killed on drop if still running.
pub struct CriuChild {
    child: Option<Child>,
    status: Option<File>,
    log: PathBuf,
    what: String,
}

impl CriuChild {
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Waits for the `--status-fd` byte 0x00. EOF or another byte means CRIU failed first.
    pub fn wait_ready(&mut self, timeout: Duration) -> Result<(), String> {
        let mut f = self
            .status
            .take()
            .ok_or("wait_ready: CRIU was not started with status_fd")?;
        let fd = f.as_raw_fd();
        let mut pfd = [libc::pollfd {
            fd,
            events: libc::POLLIN,
            revents: 0,
        }];
        let ms = timeout.as_millis().min(i32::MAX as u128) as i32;
        // SAFETY: pfd is a valid array of one pollfd for the duration of the call.
        let n = unsafe { libc::poll(pfd.as_mut_ptr(), 1, ms) };
        if n == 0 {
            return Err(format!(
                "{}: not ready after {timeout:?}\n{}",
                self.what,
                log_tail(&self.log, 40)
            ));
        }
        let mut b = [0u8; 1];
        match f.read(&mut b) {
            Ok(1) if b[0] == 0 => Ok(()),
            other => {
                let status = self.wait(Duration::from_secs(10));
                Err(format!(
                    "{}: no ready byte (read {other:?}, exit {status:?})\n{}",
                    self.what,
                    log_tail(&self.log, 40)
                ))
            }
        }
    }

    /// Waits up to `timeout` for CRIU to exit and returns its status (killing it on timeout).
    pub fn wait(&mut self, timeout: Duration) -> Result<ExitStatus, String> {
        let child = self.child.as_mut().ok_or("CRIU already reaped")?;
        let deadline = Instant::now() + timeout;
        loop {
            match child.try_wait() {
                Ok(Some(st)) => {
                    self.child = None;
                    return Ok(st);
                }
                Ok(None) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(20))
                }
                Ok(None) => {
                    let _ = child.kill();
                    let _ = child.wait();
                    self.child = None;
                    return Err(format!(
                        "{}: still running after {timeout:?}, killed\n{}",
                        self.what,
                        log_tail(&self.log, 40)
                    ));
                }
                Err(e) => return Err(format!("{}: wait: {e}", self.what)),
            }
        }
    }

    /// Waits for exit and requires success, with the log tail otherwise.
    pub fn wait_success(&mut self, timeout: Duration) -> Result<(), String> {
        let st = self.wait(timeout)?;
        if st.success() {
            Ok(())
        } else {
            Err(describe_failure(&self.what, st, &self.log))
        }
    }
}

impl Drop for CriuChild {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// A process started as init of a new pid namespace by `unshare -p -f setsid PROG`, the shape
/// CRIU can dump and restore on one host. `pid` is its pid in our namespace (CRIU's `-t`); in the
/// images it is pid 1.
///
/// No `--mount-proc`: that also creates a mount namespace, which CRIU must then dump, and it
/// refuses mounts it cannot resolve (e.g. other tests' `/run/netns/*` bind mounts).
pub struct PidnsProcess {
    unshare: Option<Child>,
    pub pid: i32,
}

/// Starts `program args` with `envs` as init of a new pid namespace, in its own session, stdio
/// on /dev/null and no inherited fds above 2 (CRIU would have to dump them). Returns once the
/// process exists; wait for its own readiness signal separately.
///
/// `cwd` must be a writable directory of its own: without a /proc of its pid namespace, CRIU's
/// parasite mounts one at `./proc.crtools` relative to the process's cwd, so two processes dumped
/// at once from one cwd fail with "Can't create a directory (-17)".
pub fn spawn_in_pidns(
    program: &Path,
    args: &[&str],
    envs: &[(&str, &str)],
    cwd: &Path,
) -> Result<PidnsProcess, String> {
    let mut cmd = Command::new("unshare");
    cmd.args(["-p", "-f", "setsid"])
        .arg(program)
        .args(args)
        .envs(envs.iter().copied())
        .current_dir(cwd)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    // SAFETY: only the close_range syscall runs between fork and exec.
    unsafe {
        cmd.pre_exec(|| {
            libc::syscall(libc::SYS_close_range, 3u32, u32::MAX, 0u32);
            Ok(())
        });
    }
    let child = cmd
        .spawn()
        .map_err(|e| format!("unshare -p -f setsid {}: {e}", program.display()))?;
    let upid = child.id();
    let mut p = PidnsProcess {
        unshare: Some(child),
        pid: 0,
    };
    // unshare -f forks once; its only child is the namespace's init.
    let children = format!("/proc/{upid}/task/{upid}/children");
    let mut found = None;
    wait_for(Duration::from_secs(10), "unshare's child to appear", || {
        found = std::fs::read_to_string(&children)
            .ok()
            .and_then(|s| s.split_whitespace().next().and_then(|p| p.parse().ok()));
        found.is_some()
    })?;
    p.pid = found.unwrap_or(0);
    Ok(p)
}

impl PidnsProcess {
    /// Whether the namespace init still exists (a zombie counts as gone).
    pub fn is_alive(&self) -> bool {
        match std::fs::read_to_string(format!("/proc/{}/stat", self.pid)) {
            Ok(s) => !matches!(
                s.rsplit(')')
                    .next()
                    .map(str::trim_start)
                    .and_then(|r| r.chars().next()),
                Some('Z') | Some('X') | None
            ),
            Err(_) => false,
        }
    }

    /// Waits for the whole namespace to end (unshare exits once its child is gone).
    pub fn wait_gone(&mut self, timeout: Duration) -> Result<ExitStatus, String> {
        let child = self.unshare.as_mut().ok_or("already reaped")?;
        let deadline = Instant::now() + timeout;
        loop {
            match child.try_wait() {
                Ok(Some(st)) => {
                    self.unshare = None;
                    return Ok(st);
                }
                Ok(None) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(20))
                }
                Ok(None) => {
                    return Err(format!("pid {} still running after {timeout:?}", self.pid));
                }
                Err(e) => return Err(format!("wait for unshare: {e}")),
            }
        }
    }

    /// Kills the namespace init (which takes the whole namespace down) and reaps unshare.
    pub fn kill(&mut self) {
        if self.unshare.is_some() && self.pid > 0 {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(self.pid),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
        if let Some(mut c) = self.unshare.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for PidnsProcess {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Polls `cond` every 20 ms until it holds or `timeout` passes.
pub fn wait_for(
    timeout: Duration,
    what: &str,
    mut cond: impl FnMut() -> bool,
) -> Result<(), String> {
    let deadline = Instant::now() + timeout;
    loop {
        if cond() {
            return Ok(());
        }
        if Instant::now() >= deadline {
            return Err(format!("timed out after {timeout:?} waiting for {what}"));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Raises `fs.pipe-max-size` to at least [`PIPE_MAX_SIZE`] (needed by lazy dumps; root only).
pub fn ensure_pipe_max_size() -> Result<(), String> {
    let path = "/proc/sys/fs/pipe-max-size";
    let cur: u64 = std::fs::read_to_string(path)
        .map_err(|e| format!("{path}: {e}"))?
        .trim()
        .parse()
        .map_err(|e| format!("{path}: {e}"))?;
    if cur < PIPE_MAX_SIZE {
        std::fs::write(path, PIPE_MAX_SIZE.to_string()).map_err(|e| format!("{path}: {e}"))?;
    }
    Ok(())
}

/// A TCP port on 127.0.0.1 that was free a moment ago (the kernel picked it).
pub fn free_tcp_port() -> Result<u16, String> {
    let l = std::net::TcpListener::bind("127.0.0.1:0").map_err(|e| e.to_string())?;
    l.local_addr().map(|a| a.port()).map_err(|e| e.to_string())
}

/// A fresh scratch directory, removed on drop unless `PAGESERV_KEEP_TEST_DIRS` is set (then
/// its path is printed, for looking at images and logs after a failure).
pub struct TestDir(pub PathBuf);

impl TestDir {
    pub fn new(tag: &str) -> Self {
        use std::sync::atomic::{AtomicU32, Ordering};
        static N: AtomicU32 = AtomicU32::new(0);
        let p = std::env::temp_dir().join(format!(
            "pageserv-test-{tag}-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
        TestDir(p)
    }

    pub fn path(&self) -> &Path {
        &self.0
    }

    /// A subdirectory, created.
    pub fn sub(&self, name: &str) -> PathBuf {
        let p = self.0.join(name);
        std::fs::create_dir_all(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
        p
    }
}

impl Drop for TestDir {
    fn drop(&mut self) {
        if std::env::var_os("PAGESERV_KEEP_TEST_DIRS").is_some() {
            eprintln!("keeping {}", self.0.display());
        } else {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
}
