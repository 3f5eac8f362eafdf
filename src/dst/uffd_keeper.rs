//! The uffd keeper: a small process holding a copy of every restored task's userfaultfd, so a
//! `pageserv dst` that dies (SIGKILL, OOM, crash) neither turns missing pages into silent zero
//! pages nor loses the restored tree.
//!
//! When the last reference to a uffd closes, the kernel unregisters its ranges and later faults
//! read zeros (criu-protocols.md §2.9). With the keeper's copy the uffds outlive dst: a task that
//! faults simply waits (nothing reads its fault), and so does one that forks or remaps (its
//! event waits to be read). dst hands the keeper each restored task's uffd before the task can
//! run, and each fork child's uffd as the fault loop reads its UFFD_EVENT_FORK.
//!
//! If dst's control connection closes without a release, the keeper holds everything for the
//! recover timeout and listens on `<migration dir>/uffd-keeper.sock`: a `pageserv dst` restarted
//! with the same `--work` adopts the uffds from there ([`adopt`]) and continues the migration
//! with the same restored tasks (dst::adopt). Past the timeout the keeper SIGKILLs every held task
//! and its descendants (pinned by pidfd) and waits for them to die before its copies close. The
//! decisions are [`policy`] (pure); this file is the sockets, pidfds and signals.

pub mod policy;
pub mod table_guard;

use std::io::Read;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use nix::sys::socket::{getsockopt, sockopt};

use self::policy::{Action, Holding, Peer, Phase, Policy, RECORD_LEN, Record};
use self::table_guard::SlotHandle;
use crate::criu::binary::pass_fds;
use crate::dst::uffd_loop::ForkHolder;
use crate::dst::uffd_loop::kill::{Process, descendants, wait_exited};
use crate::fdpass;

const CTL_FD: i32 = 3;
/// The socket an orphaned keeper listens on, inside the migration's directory.
pub const KEEPER_SOCKET: &str = "uffd-keeper.sock";
/// The keeper's log, beside it.
pub const KEEPER_LOG: &str = "uffd-keeper.log";
/// How long an adopter waits for the keeper's whole handover.
const HANDOVER_WAIT: Duration = Duration::from_secs(10);

/// Why talking to a keeper failed.
#[derive(Debug, thiserror::Error)]
pub enum KeeperError {
    #[error("uffd keeper: {what}: {source}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "no uffd keeper to adopt from in {dir} ({source}): the restored tasks there are gone \
         (their keeper killed them at the recover timeout, or the migration ended)"
    )]
    NoKeeper {
        dir: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("the uffd keeper in {dir} refused the adoption: {why}")]
    Refused { dir: PathBuf, why: String },
}

fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> KeeperError {
    let what = what.into();
    move |source| KeeperError::Io { what, source }
}

/// dst's handle on its keeper.
#[derive(Debug)]
pub struct UffdKeeper {
    ctl: Mutex<UnixStream>,
    child: Mutex<Option<Child>>,
    /// Released: every lazy page is in place and the keeper has exited.
    released: std::sync::atomic::AtomicBool,
    /// This migration's entry for the table guard (none outside `pageserv dst`).
    slot: Option<SlotHandle>,
}

impl UffdKeeper {
    /// Starts `exe keep-uffds` for the migration in `dir`, in its own session so signals to dst's
    /// group do not reach it. It holds orphaned uffds for `recover` (zero: kills at once).
    pub fn spawn(exe: &Path, dir: &Path, recover: Duration) -> std::io::Result<Self> {
        let (ours, theirs) = UnixStream::pair()?;
        let theirs = OwnedFd::from(theirs);
        let mut cmd = Command::new(exe);
        cmd.arg("keep-uffds")
            .arg("--dir")
            .arg(dir)
            .arg("--recover-ms")
            .arg(recover.as_millis().to_string())
            .env(crate::child::INTERNAL_ENV, "1")
            .stdin(Stdio::null())
            .stdout(Stdio::null());
        // Holding dst's stderr would keep a caller's pipe open after dst exits: a file instead.
        match std::fs::File::create(dir.join(KEEPER_LOG)) {
            Ok(f) => cmd.stderr(f),
            Err(_) => cmd.stderr(Stdio::null()),
        };
        pass_fds(&mut cmd, &[(&theirs, CTL_FD)]);
        // SAFETY: setsid is async-signal-safe.
        unsafe {
            std::os::unix::process::CommandExt::pre_exec(&mut cmd, || {
                libc::setsid();
                Ok(())
            });
        }
        let child = cmd.spawn()?;
        tracing::info!(pid = child.id(), "uffd keeper started");
        Ok(UffdKeeper {
            slot: SlotHandle::claim(ours.as_raw_fd()),
            ctl: Mutex::new(ours),
            child: Mutex::new(Some(child)),
            released: Default::default(),
        })
    }

    fn send(&self, rec: Record, fd: Option<BorrowedFd<'_>>) -> std::io::Result<()> {
        let ctl = self
            .ctl
            .lock()
            .map_err(|_| std::io::Error::other("the keeper's socket lock is poisoned"))?;
        let res = match fd {
            Some(fd) => fdpass::send_fd(&ctl, &rec.encode(), fd.as_raw_fd()),
            None => std::io::Write::write_all(&mut &*ctl, &rec.encode()),
        };
        if res.is_err()
            && matches!(rec, Record::Hold(_))
            && let Some(slot) = &self.slot
        {
            slot.poison();
        }
        res
    }

    /// Every restored task's uffd is held (the table guard may attribute a fork child now).
    pub fn tasks_held(&self) {
        if let Some(slot) = &self.slot {
            slot.tasks_held();
        }
    }

    /// Hands the keeper a copy of the uffd of restored task `image_pid` (host process
    /// `host_pid`). Call it before the task can run.
    pub fn hold(&self, image_pid: i32, host_pid: i32, uffd: BorrowedFd<'_>) -> std::io::Result<()> {
        let start_time = start_time(host_pid)?;
        let h = Holding::Task {
            image_pid,
            host_pid,
            start_time,
        };
        self.send(Record::Hold(h), Some(uffd))
    }

    /// Every lazy page is in place: the keeper drops its copies and exits (waited for, so no
    /// stale uffd copy outlives this call and leaves a later fault unanswered). Once only.
    pub fn release(&self) {
        self.released
            .store(true, std::sync::atomic::Ordering::SeqCst);
        if let Some(slot) = &self.slot {
            slot.released();
        }
        if let Err(e) = self.send(Record::Release, None) {
            tracing::warn!("cannot release the uffd keeper: {e}");
        }
        let child = self.child.lock().ok().and_then(|mut c| c.take());
        match child {
            Some(mut c) => {
                let _ = crate::child::wait_timeout(&mut c, Duration::from_secs(10));
            }
            // An adopted keeper is not our child: it has exited once its end closes.
            None => {
                if let Ok(ctl) = self.ctl.lock() {
                    let _ = ctl.set_read_timeout(Some(Duration::from_secs(10)));
                    let mut b = [0u8; 64];
                    while matches!((&*ctl).read(&mut b), Ok(n) if n > 0) {}
                }
            }
        }
    }
}

impl ForkHolder for UffdKeeper {
    fn hold_child(&self, root_host_pid: i32, uffd: BorrowedFd<'_>) -> std::io::Result<()> {
        // After the release every page is in place: a child forked since needs no keeping (and
        // the keeper is gone).
        if self.released.load(std::sync::atomic::Ordering::SeqCst) {
            return Ok(());
        }
        self.send(Record::Hold(Holding::Child { root_host_pid }), Some(uffd))
    }

    fn reading(&self, root_host_pid: Option<i32>) {
        if let Some(slot) = &self.slot {
            slot.reading(root_host_pid.unwrap_or(-1));
        }
    }

    fn read_done(&self) {
        if let Some(slot) = &self.slot {
            slot.read_done();
        }
    }
}

/// /proc/PID/stat field 22: when the process started, in clock ticks since boot.
pub fn start_time(pid: i32) -> std::io::Result<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    parse_start_time(&stat).ok_or_else(|| {
        std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("no start time in /proc/{pid}/stat"),
        )
    })
}

/// Field 22 of a stat line (the command may hold spaces and parentheses: count after the last
/// ')', where field 3 is the first).
pub fn parse_start_time(stat: &str) -> Option<u64> {
    let rest = &stat[stat.rfind(')')? + 1..];
    rest.split_whitespace().nth(19)?.parse().ok()
}

/// What an adopter takes over: the keeper (now attached to it) and every uffd it held.
pub struct Adoption {
    pub keeper: UffdKeeper,
    pub held: Vec<(Holding, OwnedFd)>,
}

/// Adopts the orphaned keeper of the migration in `dir`.
pub fn adopt(dir: &Path) -> Result<Adoption, KeeperError> {
    let path = dir.join(KEEPER_SOCKET);
    let ctl = UnixStream::connect(&path).map_err(|source| KeeperError::NoKeeper {
        dir: dir.to_path_buf(),
        source,
    })?;
    ctl.set_read_timeout(Some(HANDOVER_WAIT))
        .map_err(io("setting a timeout"))?;
    let mut held = Vec::new();
    loop {
        let mut b = [0u8; RECORD_LEN];
        let (n, fd) = fdpass::recv_fd(&ctl, &mut b).map_err(io("receiving the handover"))?;
        if n < RECORD_LEN {
            // The keeper writes its refusal as text and closes.
            let mut why = String::from_utf8_lossy(&b[..n]).into_owned();
            let _ = (&ctl).read_to_string(&mut why);
            return Err(KeeperError::Refused {
                dir: dir.to_path_buf(),
                why: if why.is_empty() {
                    format!("it closed the connection (see {})", KEEPER_LOG)
                } else {
                    why
                },
            });
        }
        match Record::decode(&b) {
            Ok(Record::Hold(h)) => match fd {
                Some(fd) => held.push((h, fd)),
                None => tracing::warn!(?h, "the keeper sent a record without its uffd"),
            },
            Ok(Record::End { count }) => {
                if count as usize != held.len() {
                    return Err(KeeperError::Refused {
                        dir: dir.to_path_buf(),
                        why: format!("it announced {count} uffds but sent {}", held.len()),
                    });
                }
                break;
            }
            Ok(Record::Release) | Err(_) => {
                return Err(KeeperError::Refused {
                    dir: dir.to_path_buf(),
                    why: "it sent a record that is not part of a handover".into(),
                });
            }
        }
    }
    ctl.set_read_timeout(None)
        .map_err(io("clearing a timeout"))?;
    Ok(Adoption {
        keeper: UffdKeeper {
            slot: SlotHandle::claim(ctl.as_raw_fd()),
            ctl: Mutex::new(ctl),
            child: Mutex::new(None),
            released: Default::default(),
        },
        held,
    })
}

/// One held uffd, and the restored task it belongs to (pinned by pidfd; none for a fork child).
struct Kept {
    holding: Holding,
    uffd: OwnedFd,
    task: Option<Process>,
}

/// The keeper process (`pageserv keep-uffds`): fd 3 is dst's control connection.
pub fn keeper_main(dir: &Path, recover: Duration) -> Result<(), KeeperError> {
    // SAFETY: dst passed this descriptor to us; nothing else in this process owns it.
    let mut ctl = unsafe { UnixStream::from_raw_fd(CTL_FD) };
    let mut policy = Policy::new(recover, nix::unistd::geteuid().as_raw());
    let mut kept: Vec<Kept> = Vec::new();
    let path = dir.join(KEEPER_SOCKET);
    loop {
        let action = match policy.phase() {
            Phase::Attached => follow(&ctl, &mut policy, &mut kept),
            Phase::Orphaned { .. } => {
                let _ = std::fs::remove_file(&path);
                let listener =
                    UnixListener::bind(&path).map_err(io(format!("binding {}", path.display())))?;
                tracing::warn!(
                    tasks = policy.held().count(),
                    timeout_s = recover.as_secs_f64(),
                    socket = %path.display(),
                    "pageserv dst ended before the memory was whole: holding the restored tasks \
                     for a restarted dst to adopt"
                );
                let r = wait_for_adopter(&listener, &mut policy, &mut kept);
                let _ = std::fs::remove_file(&path);
                match r {
                    Some(conn) => {
                        ctl = conn;
                        continue;
                    }
                    None => Action::KillAll,
                }
            }
            Phase::Released | Phase::Expired => return Ok(()),
        };
        match action {
            Action::Exit => return Ok(()),
            Action::KillAll => {
                kill_all(&kept, &policy);
                return Ok(());
            }
            Action::None | Action::Listen { .. } => {}
        }
    }
}

/// Follows an attached dst until it releases or goes away.
fn follow(ctl: &UnixStream, policy: &mut Policy, kept: &mut Vec<Kept>) -> Action {
    loop {
        let mut b = [0u8; RECORD_LEN];
        let (n, fd) = match fdpass::recv_fd(ctl, &mut b) {
            Ok(x) => x,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(_) => (0, None),
        };
        if n < RECORD_LEN {
            return policy.ctl_closed(Instant::now());
        }
        match Record::decode(&b) {
            Ok(Record::Release) => return policy.release(),
            Ok(Record::Hold(holding)) => {
                let Some(uffd) = fd else {
                    tracing::warn!(?holding, "a record without its uffd: ignored");
                    continue;
                };
                let task = match holding {
                    Holding::Task { host_pid, .. } => match Process::open(host_pid) {
                        Ok(p) => Some(p),
                        Err(e) => {
                            tracing::warn!(host_pid, "cannot pin restored task: {e}");
                            None
                        }
                    },
                    // The table guard sends every uffd of a dead dst's table: keep only the
                    // ones not held yet (the fork children dst could not hand over).
                    Holding::Child { .. } if already_kept(kept, &uffd) => continue,
                    Holding::Child { .. } => None,
                };
                if policy.hold(holding).is_some() {
                    kept.push(Kept {
                        holding,
                        uffd,
                        task,
                    });
                }
            }
            Ok(Record::End { .. }) | Err(_) => {
                tracing::warn!("a bad record from dst: ignored");
            }
        }
    }
}

/// Whether `uffd` is the same open file as one already kept (kcmp(2) KCMP_FILE; CRIU needs
/// kcmp, so it is there wherever a restore ran). If kcmp fails, it is kept again: a second copy
/// of a uffd only delays its close.
fn already_kept(kept: &[Kept], uffd: &OwnedFd) -> bool {
    const KCMP_FILE: libc::c_int = 0;
    // SAFETY: getpid(2) cannot fail.
    let me = unsafe { libc::getpid() };
    kept.iter().any(|k| {
        // SAFETY: kcmp(2) compares two descriptors of this process; it reads nothing of ours.
        let r = unsafe {
            libc::syscall(
                libc::SYS_kcmp,
                me,
                me,
                KCMP_FILE,
                uffd.as_raw_fd(),
                k.uffd.as_raw_fd(),
            )
        };
        r == 0
    })
}

/// Marks entries whose task has exited.
fn note_exits(policy: &mut Policy, kept: &[Kept]) {
    for (i, k) in kept.iter().enumerate() {
        if k.task.as_ref().is_some_and(Process::has_exited) {
            policy.exited(i);
        }
    }
}

/// Waits for an adopter until the recover deadline; hands it everything held and returns its connection
/// (the new control connection), or `None` once the deadline passed.
fn wait_for_adopter(
    listener: &UnixListener,
    policy: &mut Policy,
    kept: &mut [Kept],
) -> Option<UnixStream> {
    use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
    loop {
        note_exits(policy, kept);
        if policy.tick(Instant::now()) == Action::KillAll {
            return None;
        }
        // Every restored task exited (dst killed them, or they ended): nothing left to keep.
        policy.held().next()?;
        let Phase::Orphaned { deadline } = policy.phase() else {
            return None;
        };
        let left = deadline.saturating_duration_since(Instant::now());
        let ms = left.as_millis().clamp(1, 1000) as i32;
        let mut fds = [PollFd::new(listener.as_fd(), PollFlags::POLLIN)];
        match poll(
            &mut fds,
            PollTimeout::try_from(ms).unwrap_or(PollTimeout::MAX),
        ) {
            Ok(0) | Err(_) => continue,
            Ok(_) => {}
        }
        let Ok((conn, _)) = listener.accept() else {
            continue;
        };
        let peer = match getsockopt(&conn, sockopt::PeerCredentials) {
            Ok(c) => Peer {
                pid: c.pid(),
                uid: c.uid(),
            },
            Err(e) => {
                tracing::warn!("cannot read an adopter's credentials: {e}");
                continue;
            }
        };
        note_exits(policy, kept);
        let give = match policy.adopt(peer, Instant::now()) {
            Ok(g) => g,
            Err(why) => {
                tracing::warn!(pid = peer.pid, "adoption refused: {why}");
                let _ = std::io::Write::write_all(&mut &conn, why.to_string().as_bytes());
                continue;
            }
        };
        let sent = hand_over(&conn, kept, &give);
        match sent {
            Ok(()) => {
                tracing::info!(
                    pid = peer.pid,
                    uffds = give.len(),
                    "adopted by a restarted pageserv dst"
                );
                return Some(conn);
            }
            Err(e) => {
                // The adopter got a partial handover at most: the keeper still holds everything.
                tracing::warn!(pid = peer.pid, "handing over to the adopter failed: {e}");
                let now = Instant::now();
                if policy.ctl_closed(now) == Action::KillAll {
                    return None;
                }
            }
        }
    }
}

fn hand_over(conn: &UnixStream, kept: &[Kept], give: &[usize]) -> std::io::Result<()> {
    for &i in give {
        let k = &kept[i];
        fdpass::send_fd(conn, &Record::Hold(k.holding).encode(), k.uffd.as_raw_fd())?;
    }
    let end = Record::End {
        count: give.len() as u32,
    };
    std::io::Write::write_all(&mut &*conn, &end.encode())
}

/// Kills every held task and every descendant of one (fork children included), then waits for
/// them to die: only then may the uffds close.
fn kill_all(kept: &[Kept], policy: &Policy) {
    let roots: Vec<i32> = policy.held().map(|(_, h)| h.root_host_pid()).collect();
    tracing::warn!(
        tasks = roots.len(),
        "the recover timeout passed and no pageserv dst adopted the restored tasks: killing them"
    );
    // Find descendants before killing anything: a killed parent's children are reparented.
    let mut extra = Vec::new();
    for root in &roots {
        for d in descendants(*root) {
            if let Ok(p) = Process::open(d) {
                extra.push(p);
            }
        }
    }
    let mut victims: Vec<&Process> = kept.iter().filter_map(|k| k.task.as_ref()).collect();
    victims.extend(extra.iter());
    for p in &victims {
        if let Err(e) = p.kill() {
            tracing::error!(pid = p.pid, "cannot kill restored task: {e}");
        }
    }
    for pid in wait_exited(&victims, Duration::from_secs(10)) {
        tracing::error!(pid, "restored task did not die within 10 s");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_start_time_after_odd_names() {
        let stat = "42 (a) b) S 1 42 42 0 -1 4194560 100 0 0 0 5 3 0 0 20 0 1 0 123456 1000 50";
        assert_eq!(parse_start_time(stat), Some(123456));
        assert_eq!(parse_start_time("42 (x"), None);
        let me = std::process::id() as i32;
        assert!(start_time(me).unwrap() > 0);
    }
}
