//! Running the restore at the destination.
//!
//! The default is `criu restore --lazy-pages -d`, run in the work directory where pageserv's
//! lazy-pages socket already listens (CRIU resolves `lazy-pages.socket` relative to `-W`); by
//! default a post-copy starts it with `--stream` when the migration begins
//! ([`Restore::start_streamed`], driven by [`crate::dst::early_restore`]).
//! `--restore-cmd` replaces it for runc/podman-style restores: a shell command in which
//! `{images}` and `{work}` are replaced by the directories (e.g.
//! `runc restore --image-path {images} --work-path {work} --lazy-pages --detach ctr`).
//! `--runc-bundle` builds that command itself, with `--lazy-pages` for post-copy and without
//! for stop-and-copy ([`crate::runc::RuncRestore`]).

use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};

use crate::criu::binary::{Criu, log_tail};
use crate::runc::RuncRestore;

#[derive(Debug, thiserror::Error)]
pub enum RestoreError {
    #[error("could not start the restore ({what}): {source}")]
    Spawn {
        what: String,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "the restore failed ({status}){errors}. Fix what CRIU names, then retry. Last lines of \
         {log}:\n{tail}"
    )]
    Failed {
        status: String,
        /// CRIU's own last `Error` lines, as `: <line>; <line>`, or empty.
        errors: String,
        log: PathBuf,
        tail: String,
    },
}

/// A restore in progress.
#[derive(Debug)]
pub struct Restore {
    child: Child,
    pub log: PathBuf,
    pub pidfile: PathBuf,
    runc: Option<RuncRestore>,
}

/// How to run the restore.
#[derive(Debug, Clone, Default)]
pub struct RestoreOptions {
    /// Extra CRIU options for the default command.
    pub extra: Vec<String>,
    /// A shell template replacing the default command.
    pub template: Option<String>,
    /// The restore is `runc restore` of this container (replacing `template`): a failed
    /// restore deletes what runc left of it, so the next attempt finds no half-made container
    /// or cgroup.
    pub runc: Option<RuncRestore>,
    /// Start `criu restore` when a post-copy migration begins, before the freeze, and feed it
    /// the images when they are in ([`crate::dst::early_restore`]); the default command only.
    pub early: bool,
}

impl RestoreOptions {
    /// The restore is started with the migration: [`RestoreOptions::early`] and the default
    /// command (a template or runc builds CRIU's command line itself).
    pub fn starts_early(&self) -> bool {
        self.early && self.template.is_none() && self.runc.is_none()
    }

    /// These options plus the ones the source's dump calls for ([`crate::criu::opts`]).
    pub fn with_carried(&self, carried: &[String]) -> RestoreOptions {
        RestoreOptions {
            extra: crate::criu::opts::merge(&self.extra, carried),
            template: self.template.clone(),
            runc: self.runc.clone(),
            early: self.early,
        }
    }
}

/// The restore of `images` in `work`: `runc restore` of `opts.runc`, `opts.template` through
/// the shell, or `criu restore -d` (each with `--lazy-pages` when `lazy`, the template as
/// given) logging to `work/restore.log`, pidfile `work/restore.pid`.
pub(crate) fn restore_command(
    criu: &Criu,
    images: &Path,
    work: &Path,
    opts: &RestoreOptions,
    lazy: bool,
) -> Command {
    let template = match &opts.runc {
        Some(r) => Some(
            r.runc
                .restore_template(&criu.path, &r.bundle, &r.name, lazy),
        ),
        None => opts.template.clone(),
    };
    let mut cmd = match &template {
        Some(t) => {
            let line = t
                .replace("{images}", &images.display().to_string())
                .replace("{work}", &work.display().to_string());
            let mut c = Command::new("/bin/sh");
            c.arg("-c").arg(line);
            c
        }
        None => {
            let mut c = criu.command();
            c.arg("restore")
                .arg("-D")
                .arg(images)
                .arg("-W")
                .arg(work)
                .args(criu.log_args(&work.join("restore.log")));
            if lazy {
                c.arg("--lazy-pages");
            }
            c.arg("-d")
                .arg("--pidfile")
                .arg(work.join("restore.pid"))
                .args(&opts.extra);
            c
        }
    };
    // A process group of its own: a failed restore is ended as a whole (the shell, runc and the
    // `criu restore` under them), not just the command dst started.
    cmd.current_dir(work)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .process_group(0);
    cmd
}

impl Restore {
    /// Starts the restore of `images` with `work` as its work directory.
    pub fn start(
        criu: &Criu,
        images: &Path,
        work: &Path,
        opts: &RestoreOptions,
    ) -> Result<Restore, RestoreError> {
        Restore::spawn(restore_command(criu, images, work, opts, true), work, opts)
    }

    /// Starts `criu restore --stream` with `stream_dir` as its images directory: it connects
    /// to the image streamer listening there and reads every image through it
    /// ([`crate::dst::early_restore`]). The default command only (see
    /// [`RestoreOptions::starts_early`]): a template's is not CRIU's command line.
    pub fn start_streamed(
        criu: &Criu,
        stream_dir: &Path,
        work: &Path,
        opts: &RestoreOptions,
    ) -> Result<Restore, RestoreError> {
        let mut cmd = restore_command(criu, stream_dir, work, opts, true);
        cmd.arg("--stream");
        Restore::spawn(cmd, work, opts)
    }

    fn spawn(
        mut cmd: Command,
        work: &Path,
        opts: &RestoreOptions,
    ) -> Result<Restore, RestoreError> {
        let log = work.join("restore.log");
        let pidfile = work.join("restore.pid");
        let child = cmd.spawn().map_err(|source| RestoreError::Spawn {
            what: format!("{cmd:?}"),
            source,
        })?;
        Ok(Restore {
            child,
            log,
            pidfile,
            runc: opts.runc.clone(),
        })
    }

    /// The restore command's pid (the leader of its process group).
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Non-blocking: the restore command's exit status, once it has ended.
    pub fn try_wait(&mut self) -> std::io::Result<Option<ExitStatus>> {
        self.child.try_wait()
    }

    /// Turns a non-zero exit into an error carrying the log tail.
    pub fn check(&self, status: ExitStatus) -> Result<(), RestoreError> {
        if status.success() {
            Ok(())
        } else {
            let mut tail = log_tail(&self.log, 20);
            if self.runc.is_some() {
                tail.push_str(&runc_log_tail(&self.log));
            }
            let errors = crate::criu::binary::log_errors(&self.log, 3);
            Err(RestoreError::Failed {
                status: status.to_string(),
                errors: if errors.is_empty() {
                    String::new()
                } else {
                    format!(": {}", errors.join("; "))
                },
                log: self.log.clone(),
                tail,
            })
        }
    }

    /// The restored tree's root pid, from the pidfile (default command only).
    pub fn root_pid(&self) -> Option<i32> {
        std::fs::read_to_string(&self.pidfile)
            .ok()?
            .trim()
            .parse()
            .ok()
    }

    /// Ends a restore that failed: SIGKILL to the restore command's process group (the shell,
    /// runc and `criu restore` under them; restored tasks still in it die too, which is what a
    /// failed restore wants), unmounts a cgroup yard the killed CRIU left in the work directory,
    /// and for a runc restore deletes what runc left of the container.
    pub fn kill(&mut self) {
        // The group exists while its leader is unreaped; SIGKILL to it reaches every member.
        let group = i32::try_from(self.child.id()).map(nix::unistd::Pid::from_raw);
        if group.map_or(true, |g| {
            nix::sys::signal::killpg(g, nix::sys::signal::Signal::SIGKILL).is_err()
        }) {
            let _ = self.child.kill();
        }
        let _ = self.child.wait();
        if let Some(work) = self.log.parent() {
            unmount_cgyard(work);
        }
        delete_failed_runc(self.runc.as_ref());
    }

    /// After a failure once the restore had finished (the fault loop killed the incomplete
    /// tasks): deletes the container runc now lists as stopped, so nothing is left behind. A
    /// container still running (its memory was whole) is left alone.
    pub fn delete_stopped_container(&self) {
        let Some(RuncRestore { runc, name, .. }) = self.runc.as_ref() else {
            return;
        };
        match runc.state(name) {
            Ok(s) if s.status == "stopped" => delete_failed_runc(self.runc.as_ref()),
            Ok(s) => tracing::warn!(
                container = %name,
                status = %s.status,
                "the migration failed after the restore, but the container is not stopped: left as it is"
            ),
            Err(_) => {}
        }
    }
}

/// CRIU mounts its cgroup yard (`.criu.cgyard.XXXXXX`, a tmpfs with the cgroup hierarchies) in
/// its working directory and unmounts it when it ends; a CRIU killed mid-restore cannot. Lazily
/// unmounts (with everything below) and removes any such yard in `work`.
fn unmount_cgyard(work: &Path) {
    let Ok(entries) = std::fs::read_dir(work) else {
        return;
    };
    for e in entries.flatten() {
        if !e.file_name().to_string_lossy().starts_with(".criu.cgyard.") {
            continue;
        }
        let path = e.path();
        if let Err(err) = nix::mount::umount2(&path, nix::mount::MntFlags::MNT_DETACH)
            && err != nix::errno::Errno::EINVAL
        {
            tracing::warn!(path = %path.display(), "cannot unmount CRIU's cgroup yard: {err}");
            continue;
        }
        let _ = std::fs::remove_dir(&path);
    }
}

/// After a failed `runc restore`: deletes what runc left of the container (its state and
/// cgroup), so the next attempt finds nothing half-made.
pub(crate) fn delete_failed_runc(runc: Option<&RuncRestore>) {
    let Some(RuncRestore { runc, name, .. }) = runc else {
        return;
    };
    if !runc.exists(name) {
        return;
    }
    match runc.delete_force(name) {
        Ok(()) => {
            tracing::info!(container = %name, "deleted the container the failed runc restore left")
        }
        Err(e) => {
            tracing::warn!(container = %name, "could not delete the container the failed runc restore left: {e}")
        }
    }
}

/// runc's own reason for a failed restore (a missing rootfs, a cgroup it cannot make) is in
/// its log beside CRIU's `restore_log`: its last lines, as a paragraph to append.
pub(crate) fn runc_log_tail(restore_log: &Path) -> String {
    let runc_log = restore_log.with_file_name("runc.log");
    format!(
        "\nLast lines of runc's log {}:\n{}",
        runc_log.display(),
        log_tail(&runc_log, 10)
    )
}
