//! `pageserv src --stop-and-copy --runc NAME`: the container's checkpoint for stop-and-copy,
//! held frozen until the restore at dst is known.
//!
//! runc destroys a container as soon as its dump succeeds, unless `--leave-running`; and CRIU
//! (4.2, `criu/seize.c`) remembers whether the container's freezer cgroup was frozen when the
//! dump began and, after a dump with `--leave-running` or a failed one, freezes it again before
//! it lets the tasks go (`freezer_restore_state`). So pageserv:
//! 1. `runc pause NAME` (the freeze: the container's downtime starts here);
//! 2. `runc checkpoint --leave-running --page-server 127.0.0.1:PORT` to a page server pageserv
//!    listens on (bound before runc starts; only a loopback peer is taken);
//! 3. once runc exits 0 every image is written and the container is still paused, its tasks
//!    frozen by the cgroup, not by CRIU: pageserv dying leaves it paused, never running twice;
//! 4. restore at dst succeeded: `runc kill --all NAME KILL` (runc signals a paused container's
//!    tasks while they are frozen) and `runc delete --force NAME`; anything else:
//!    `runc resume NAME` (the failure rule: the source keeps running).
//!
//! Tried with Debian's runc 1.1.5 and CRIU 4.2.1 (cgroup v1 freezer): after the checkpoint the
//! container is `paused`, its workload writes nothing; a checkpoint whose page server drops the
//! session fails and leaves it `paused` too; `runc resume` runs it on; dst's `runc restore`
//! starts it running (runc makes its cgroup before CRIU, which then restores no freezer state).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, ExitStatus, Stdio};
use std::time::{Duration, Instant, SystemTime};

use crate::criu::binary::{Criu, log_tail};
use crate::runc::{CheckpointMode, Runc, RuncError};

/// What can go wrong checkpointing a container for stop-and-copy.
#[derive(Debug, thiserror::Error)]
pub enum RuncStopCopyError {
    #[error("container {name} cannot be migrated: {source}")]
    NotReady {
        name: String,
        #[source]
        source: RuncError,
    },
    #[error(
        "`runc pause {name}` failed, so nothing was dumped and the container runs on: {source}"
    )]
    Pause {
        name: String,
        #[source]
        source: RuncError,
    },
    #[error("setting up the checkpoint of container {name} ({what}): {source}")]
    Setup {
        name: String,
        what: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "`runc checkpoint` of container {name} ended ({status}) before its images were complete. \
         Fix what runc's log {runc_log} or CRIU's log {criu_log} names. Last lines of CRIU's \
         log:\n{tail}"
    )]
    Checkpoint {
        name: String,
        status: String,
        runc_log: PathBuf,
        criu_log: PathBuf,
        tail: String,
    },
    #[error(
        "`runc checkpoint` of container {name} did not end within {timeout:?} of its last \
         page; it is killed. See runc's log {runc_log} and CRIU's log {criu_log}"
    )]
    Timeout {
        name: String,
        timeout: Duration,
        runc_log: PathBuf,
        criu_log: PathBuf,
    },
}

/// The container's checkpoint in progress, the container paused.
#[derive(Debug)]
pub struct RuncCheckpoint {
    runc: Runc,
    pub name: String,
    child: Option<Child>,
    pub images_dir: PathBuf,
    /// runc's own messages (`runc --log`).
    pub runc_log: PathBuf,
    /// CRIU's dump log (`dump.log` in runc's work directory).
    pub criu_log: PathBuf,
    /// Just before `runc pause`: the start of the container's downtime.
    pub paused_at: SystemTime,
    /// [`Self::finish`] ran: the container was deleted or resumed.
    decided: bool,
}

/// How the container's end at the source went (after [`RuncCheckpoint::finish`]).
#[derive(Debug)]
pub struct Ended {
    /// The checkpoint's own exit (None: never reaped).
    pub checkpoint: Option<ExitStatus>,
    /// Why the container could not be deleted (restored) or resumed (not restored); the user
    /// must then end or resume it by hand.
    pub problem: Option<String>,
}

/// Pauses container `name`, then starts `runc checkpoint --leave-running` sending its memory to
/// `page_server` (pageserv's listener), images in `work/images`, runc's work directory
/// `work/runc-work`.
pub fn start(
    criu: &Criu,
    runc: &Runc,
    name: &str,
    work: &Path,
    page_server: SocketAddr,
) -> Result<RuncCheckpoint, RuncStopCopyError> {
    let setup = |what| {
        move |source| RuncStopCopyError::Setup {
            name: name.to_string(),
            what,
            source,
        }
    };
    // A paused container is the user's to resume, not pageserv's: only a running one is taken.
    runc.running(name)
        .map_err(|source| RuncStopCopyError::NotReady {
            name: name.to_string(),
            source,
        })?;
    let images_dir = work.join("images");
    let runc_work = work.join("runc-work");
    std::fs::create_dir_all(&images_dir).map_err(setup("the images directory"))?;
    std::fs::create_dir_all(&runc_work).map_err(setup("runc's work directory"))?;
    let runc_log = work.join("runc.log");
    let paused_at = SystemTime::now();
    runc.pause(name)
        .map_err(|source| RuncStopCopyError::Pause {
            name: name.to_string(),
            source,
        })?;
    let mut cmd = runc.command(Some(&criu.path));
    cmd.arg("--log")
        .arg(&runc_log)
        .args(Runc::checkpoint_args(
            name,
            CheckpointMode::PageServer {
                page_server,
                leave_running: true,
            },
            &images_dir,
            &runc_work,
        ))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    let mut ck = RuncCheckpoint {
        runc: runc.clone(),
        name: name.to_string(),
        child: None,
        images_dir,
        runc_log,
        criu_log: runc_work.join("dump.log"),
        paused_at,
        decided: false,
    };
    match cmd.spawn() {
        Ok(c) => ck.child = Some(c),
        Err(e) => {
            // Nothing dumped: the container runs on.
            let _ = ck.finish(false);
            return Err(setup("spawning runc checkpoint")(e));
        }
    }
    Ok(ck)
}

impl RuncCheckpoint {
    /// Non-blocking: the checkpoint's exit, as an error if it ended (before its page-server
    /// session was served it never succeeds).
    pub fn ended_early(&mut self) -> Option<RuncStopCopyError> {
        let st = self.child.as_mut()?.try_wait().ok().flatten()?;
        self.child = None;
        Some(self.failed(st))
    }

    /// Blocks until the checkpoint ends (at most `timeout`); Ok once it succeeded, so every
    /// image is in [`Self::images_dir`].
    pub fn wait_done(&mut self, timeout: Duration) -> Result<(), RuncStopCopyError> {
        let Some(child) = self.child.as_mut() else {
            return Err(self.failed_status("already reaped".into()));
        };
        let deadline = Instant::now() + timeout;
        loop {
            match child.try_wait() {
                Ok(Some(st)) => {
                    self.child = None;
                    return if st.success() {
                        Ok(())
                    } else {
                        Err(self.failed(st))
                    };
                }
                Ok(None) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(2))
                }
                Ok(None) => {
                    let _ = child.kill();
                    let _ = child.wait();
                    self.child = None;
                    return Err(RuncStopCopyError::Timeout {
                        name: self.name.clone(),
                        timeout,
                        runc_log: self.runc_log.clone(),
                        criu_log: self.criu_log.clone(),
                    });
                }
                Err(e) => return Err(self.failed_status(format!("wait failed: {e}"))),
            }
        }
    }

    /// Ends the source side: `restored` deletes the container (its tasks killed while
    /// frozen), otherwise it is resumed. Waits first for a checkpoint still running (the
    /// page-server session, dropped by the caller, makes it fail; CRIU leaves the container
    /// paused).
    pub fn finish(&mut self, restored: bool) -> Ended {
        self.decided = true;
        let checkpoint = self.child.take().and_then(|mut c| {
            let deadline = Instant::now() + Duration::from_secs(60);
            loop {
                match c.try_wait() {
                    Ok(Some(st)) => return Some(st),
                    Ok(None) if Instant::now() < deadline => {
                        std::thread::sleep(Duration::from_millis(10))
                    }
                    _ => {
                        let _ = c.kill();
                        return c.wait().ok();
                    }
                }
            }
        });
        let problem = if restored {
            self.runc
                .kill_all(&self.name)
                .and_then(|()| self.runc.delete_force(&self.name))
                .err()
                .map(|e| {
                    format!(
                        "the container runs at dst, but its paused copy here could not be \
                         deleted ({e}): delete it with `runc delete --force {}`",
                        self.name
                    )
                })
        } else {
            self.resume()
        };
        if let Some(p) = &problem {
            tracing::error!(container = %self.name, "{p}");
        }
        Ended {
            checkpoint,
            problem,
        }
    }

    /// Resumes the container unless it runs already (a CRIU killed mid-dump lets it go).
    fn resume(&self) -> Option<String> {
        match self.runc.state(&self.name) {
            Ok(s) if s.status == "paused" => self.runc.resume(&self.name).err().map(|e| {
                format!(
                    "the migration failed and container {} stays paused here: `runc resume {}` \
                     failed ({e}); resume it by hand",
                    self.name, self.name
                )
            }),
            Ok(s) if s.status == "running" => None,
            Ok(s) => Some(format!(
                "the migration failed and container {} is {} here (not paused): see runc's log \
                 {} and CRIU's log {}",
                self.name,
                s.status,
                self.runc_log.display(),
                self.criu_log.display()
            )),
            Err(e) => Some(format!(
                "the migration failed and runc cannot say what became of container {} ({e}): \
                 see runc's log {} and CRIU's log {}",
                self.name,
                self.runc_log.display(),
                self.criu_log.display()
            )),
        }
    }

    fn failed(&self, st: ExitStatus) -> RuncStopCopyError {
        self.failed_status(st.to_string())
    }

    fn failed_status(&self, status: String) -> RuncStopCopyError {
        RuncStopCopyError::Checkpoint {
            name: self.name.clone(),
            status,
            runc_log: self.runc_log.clone(),
            criu_log: self.criu_log.clone(),
            tail: log_tail(&self.criu_log, 15),
        }
    }
}

impl Drop for RuncCheckpoint {
    /// A checkpoint never given a verdict (a panic, an early return) resumes the container:
    /// the failure rule.
    fn drop(&mut self) {
        if !self.decided {
            let _ = self.finish(false);
        }
    }
}
