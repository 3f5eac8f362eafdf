//! runc around CRIU: the checkpoint `pageserv src --runc NAME` starts and the restore
//! `pageserv dst --runc-bundle DIR` runs.
//!
//! A thin shell over the `runc` binary (Debian's runc 1.1.5 is what this was built against).
//! What it builds — the checkpoint's arguments, the restore's shell template — and what it reads
//! — `runc state` JSON — are pure functions, unit-tested here; the end-to-end behaviour with real
//! runc and CRIU is `tests/runc.rs`.
//!
//! How runc drives CRIU, and what pageserv relies on (runc's `checkpoint.go`/`restore.go` and
//! libcontainer's `criu_linux.go`):
//! - `runc checkpoint --lazy-pages --page-server ADDR --status-fd FD` makes CRIU (through its RPC
//!   "swrk" mode) dump everything but the lazy memory, start its own page server on ADDR, and
//!   write one byte to FD once it serves pages: the same handshake as `criu dump --lazy-pages
//!   --status-fd`, so pageserv joins it as any external dump (`source::dump::join_external_dump`).
//!   runc passes the CRIU binary from its global `--criu` option; pageserv gives it the CRIU it
//!   uses itself (4.2.x handles the container's TCP sockets on current kernels).
//! - When the page server is closed as CRIU expects (PS_IOV_CLOSE after the memory is whole)
//!   the dump succeeds and runc destroys the source container (no `--leave-running`). When
//!   pageserv makes the dump fail instead (any failure before the container runs at dst), CRIU
//!   resumes the tasks and runc leaves the container running, its state untouched.
//! - `runc restore -d --lazy-pages` makes CRIU restore with the lazy-pages daemon at
//!   `WORK/lazy-pages.socket` (WORK = `--work-path`), which is where `pageserv dst` listens.
//!   The container's stdio is what runc's own stdio is (runc maps it with `--inherit-fd`):
//!   pageserv gives it /dev/null, as a container's stdio must not be a host file for the next
//!   checkpoint either; runc's own messages go to `WORK/runc.log`, CRIU's to `WORK/restore.log`.

use std::ffi::OsString;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

/// What can go wrong talking to runc.
#[derive(Debug, thiserror::Error)]
pub enum RuncError {
    #[error("runc not found at {tried}: install it (apt-get install runc) or pass --runc-bin")]
    NotFound { tried: String },
    #[error("running `{cmd}` failed: {source}")]
    Spawn {
        cmd: String,
        #[source]
        source: std::io::Error,
    },
    #[error("`{cmd}` failed ({status}): {stderr}")]
    Failed {
        cmd: String,
        status: String,
        stderr: String,
    },
    #[error("`runc state` printed what pageserv cannot read ({reason}): {text}")]
    BadState { reason: String, text: String },
    #[error(
        "container {id} is {status}, not running: only a running container can be migrated \
         (see `runc list`)"
    )]
    NotRunning { id: String, status: String },
}

/// One runc installation and state directory (`runc --root`).
#[derive(Debug, Clone)]
pub struct Runc {
    pub bin: PathBuf,
    /// runc's `--root`; runc's default (/run/runc for root) when `None`.
    pub root: Option<PathBuf>,
}

/// What `runc state NAME` says of a container.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ContainerState {
    pub id: String,
    /// The container's init process, as the host sees it.
    pub pid: i32,
    /// created, running, paused or stopped.
    pub status: String,
    pub bundle: PathBuf,
}

/// How the checkpoint hands its memory over.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CheckpointMode {
    /// Post-copy: CRIU serves lazy pages on `page_server` and writes the ready byte to fd 3.
    Lazy { page_server: SocketAddr },
    /// Stop-and-copy: CRIU sends every page to the page server listening on `page_server`.
    /// With `leave_running` (`--leave-running`) runc neither kills nor destroys the container
    /// when the dump succeeds: a container paused before stays frozen (CRIU puts a cgroup it
    /// found frozen back to frozen), so pageserv decides its end after the restore at dst.
    PageServer {
        page_server: SocketAddr,
        leave_running: bool,
    },
}

/// The container runc restores at dst (`pageserv dst --runc-bundle`): the restore command is
/// built per migration, with `--lazy-pages` for post-copy and without for stop-and-copy.
#[derive(Debug, Clone)]
pub struct RuncRestore {
    pub runc: Runc,
    pub name: String,
    /// The container's OCI bundle at dst.
    pub bundle: PathBuf,
}

/// The fd number runc's `--status-fd` is given (the caller puts the status FIFO there).
pub const STATUS_FD: i32 = 3;

impl Runc {
    /// `bin`, or `runc` on PATH.
    pub fn locate(bin: Option<&Path>, root: Option<PathBuf>) -> Result<Runc, RuncError> {
        let bin = match bin {
            Some(b) if b.is_file() => b.to_path_buf(),
            Some(b) => {
                return Err(RuncError::NotFound {
                    tried: b.display().to_string(),
                });
            }
            None => std::env::var_os("PATH")
                .iter()
                .flat_map(std::env::split_paths)
                .map(|d| d.join("runc"))
                .find(|p| p.is_file())
                .ok_or(RuncError::NotFound {
                    tried: "runc on PATH".into(),
                })?,
        };
        Ok(Runc { bin, root })
    }

    /// runc's global options: the CRIU to use and the state directory.
    fn global_args(&self, criu: Option<&Path>) -> Vec<OsString> {
        let mut a = Vec::new();
        if let Some(c) = criu {
            a.push("--criu".into());
            a.push(c.into());
        }
        if let Some(r) = &self.root {
            a.push("--root".into());
            a.push(r.into());
        }
        a
    }

    /// A `runc` command with the global options.
    pub fn command(&self, criu: Option<&Path>) -> Command {
        let mut c = Command::new(&self.bin);
        c.args(self.global_args(criu));
        c
    }

    /// Runs `runc state NAME`.
    pub fn state(&self, name: &str) -> Result<ContainerState, RuncError> {
        let mut cmd = self.command(None);
        cmd.arg("state").arg(name).stdin(Stdio::null());
        let text = output(cmd)?;
        parse_state(&text)
    }

    /// `runc state NAME`, refusing a container that is not running.
    pub fn running(&self, name: &str) -> Result<ContainerState, RuncError> {
        let s = self.state(name)?;
        if s.status != "running" {
            return Err(RuncError::NotRunning {
                id: s.id,
                status: s.status,
            });
        }
        Ok(s)
    }

    /// Whether runc knows a container of this name (in any status).
    pub fn exists(&self, name: &str) -> bool {
        self.state(name).is_ok()
    }

    /// `runc delete --force NAME`: removes a container runc left behind (e.g. by a failed
    /// restore), its cgroup included.
    pub fn delete_force(&self, name: &str) -> Result<(), RuncError> {
        let mut cmd = self.command(None);
        cmd.args(["delete", "--force", name]).stdin(Stdio::null());
        output(cmd).map(|_| ())
    }

    /// `runc pause NAME`: freezes the container's cgroup.
    pub fn pause(&self, name: &str) -> Result<(), RuncError> {
        self.simple(&["pause", name])
    }

    /// `runc resume NAME`: thaws a paused container.
    pub fn resume(&self, name: &str) -> Result<(), RuncError> {
        self.simple(&["resume", name])
    }

    /// `runc kill --all NAME KILL`: SIGKILL to every task of the container. runc freezes the
    /// cgroup while it signals and thaws it after, so no task of a paused container runs
    /// again before it dies.
    pub fn kill_all(&self, name: &str) -> Result<(), RuncError> {
        self.simple(&["kill", "--all", name, "KILL"])
    }

    fn simple(&self, args: &[&str]) -> Result<(), RuncError> {
        let mut cmd = self.command(None);
        cmd.args(args).stdin(Stdio::null());
        output(cmd).map(|_| ())
    }

    /// The checkpoint's arguments after runc's global options.
    pub fn checkpoint_args(
        name: &str,
        mode: CheckpointMode,
        images: &Path,
        work: &Path,
    ) -> Vec<OsString> {
        let mut a: Vec<OsString> = vec!["checkpoint".into()];
        match mode {
            CheckpointMode::Lazy { page_server } => {
                a.push("--lazy-pages".into());
                a.push("--page-server".into());
                a.push(page_server.to_string().into());
                a.push("--status-fd".into());
                a.push(STATUS_FD.to_string().into());
            }
            CheckpointMode::PageServer {
                page_server,
                leave_running,
            } => {
                if leave_running {
                    a.push("--leave-running".into());
                }
                a.push("--page-server".into());
                a.push(page_server.to_string().into());
            }
        }
        a.push("--image-path".into());
        a.push(images.into());
        a.push("--work-path".into());
        a.push(work.into());
        a.push(name.into());
        a
    }

    /// The shell template `pageserv dst` runs to restore (see [`crate::dst::restore`]); its
    /// `{images}` and `{work}` are filled in per migration.
    pub fn restore_template(&self, criu: &Path, bundle: &Path, name: &str, lazy: bool) -> String {
        let mut words: Vec<String> = vec![sh_quote(&self.bin.display().to_string())];
        words.extend(
            self.global_args(Some(criu))
                .iter()
                .map(|w| sh_quote(&w.to_string_lossy())),
        );
        words.push("--log".into());
        words.push("{work}/runc.log".into());
        words.extend(
            [
                "restore",
                "--detach",
                "--bundle",
                &bundle.display().to_string(),
            ]
            .iter()
            .map(|w| sh_quote(w)),
        );
        words.extend(
            [
                "--image-path",
                "{images}",
                "--work-path",
                "{work}",
                "--pid-file",
                "{work}/restore.pid",
            ]
            .map(String::from),
        );
        if lazy {
            words.push("--lazy-pages".into());
        }
        words.push(sh_quote(name));
        // The container's stdio is runc's (see the module doc).
        words.push("</dev/null >/dev/null 2>&1".into());
        words.join(" ")
    }
}

/// Runs `cmd`, returning its stdout; a non-zero exit is an error with its stderr.
fn output(mut cmd: Command) -> Result<String, RuncError> {
    let shown = format!("{cmd:?}");
    let out = cmd.output().map_err(|source| RuncError::Spawn {
        cmd: shown.clone(),
        source,
    })?;
    if !out.status.success() {
        return Err(RuncError::Failed {
            cmd: shown,
            status: out.status.to_string(),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        });
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Reads `runc state` output.
pub fn parse_state(text: &str) -> Result<ContainerState, RuncError> {
    let bad = |reason: &str| RuncError::BadState {
        reason: reason.into(),
        text: text.chars().take(200).collect(),
    };
    let v: serde_json::Value = serde_json::from_str(text).map_err(|e| bad(&e.to_string()))?;
    let str_of = |k: &str| v.get(k).and_then(|x| x.as_str()).map(str::to_string);
    let pid = v
        .get("pid")
        .and_then(|p| p.as_i64())
        .ok_or_else(|| bad("no pid"))?;
    Ok(ContainerState {
        id: str_of("id").ok_or_else(|| bad("no id"))?,
        pid: i32::try_from(pid).map_err(|_| bad("pid out of range"))?,
        status: str_of("status").ok_or_else(|| bad("no status"))?,
        bundle: PathBuf::from(str_of("bundle").ok_or_else(|| bad("no bundle"))?),
    })
}

/// Quotes one word for /bin/sh (single quotes; a `'` inside becomes `'\''`).
pub fn sh_quote(w: &str) -> String {
    if !w.is_empty()
        && w.chars()
            .all(|c| c.is_ascii_alphanumeric() || "/._-:=+@,".contains(c))
    {
        return w.to_string();
    }
    format!("'{}'", w.replace('\'', r"'\''"))
}

#[cfg(test)]
mod tests {
    use super::*;

    const STATE: &str = r#"{
  "ociVersion": "1.0.2-dev",
  "id": "web",
  "pid": 31235,
  "status": "running",
  "bundle": "/var/tmp/ctr1d",
  "rootfs": "/var/tmp/ctr1/rootfs",
  "created": "2026-12-05T00:51:35.221173033Z",
  "owner": ""
}"#;

    #[test]
    fn reads_runc_state() {
        let s = parse_state(STATE).unwrap();
        assert_eq!(
            s,
            ContainerState {
                id: "web".into(),
                pid: 31235,
                status: "running".into(),
                bundle: "/var/tmp/ctr1d".into(),
            }
        );
        assert!(matches!(
            parse_state("{\"id\":\"x\"}"),
            Err(RuncError::BadState { .. })
        ));
        assert!(matches!(
            parse_state("not json"),
            Err(RuncError::BadState { .. })
        ));
    }

    #[test]
    fn lazy_checkpoint_arguments() {
        let a = Runc::checkpoint_args(
            "web",
            CheckpointMode::Lazy {
                page_server: "127.0.0.1:27000".parse().unwrap(),
            },
            Path::new("/w/images"),
            Path::new("/w/runc-work"),
        );
        let a: Vec<_> = a.iter().map(|s| s.to_string_lossy().into_owned()).collect();
        assert_eq!(
            a.join(" "),
            "checkpoint --lazy-pages --page-server 127.0.0.1:27000 --status-fd 3 \
             --image-path /w/images --work-path /w/runc-work web"
        );
    }

    #[test]
    fn stop_and_copy_checkpoint_arguments() {
        let args = |leave_running| {
            let a = Runc::checkpoint_args(
                "web",
                CheckpointMode::PageServer {
                    page_server: "127.0.0.1:27001".parse().unwrap(),
                    leave_running,
                },
                Path::new("/w/images"),
                Path::new("/w/runc-work"),
            );
            let a: Vec<_> = a.iter().map(|s| s.to_string_lossy().into_owned()).collect();
            a.join(" ")
        };
        assert_eq!(
            args(true),
            "checkpoint --leave-running --page-server 127.0.0.1:27001 \
             --image-path /w/images --work-path /w/runc-work web"
        );
        assert!(!args(false).contains("--leave-running"));
        assert!(!args(true).contains("--lazy-pages"));
    }

    #[test]
    fn restore_template_quotes_and_keeps_placeholders() {
        let r = Runc {
            bin: "/usr/bin/runc".into(),
            root: Some("/run/my runc".into()),
        };
        let t = r.restore_template(
            Path::new("/opt/pageserv/criu/bin/criu"),
            Path::new("/srv/it's"),
            "web",
            true,
        );
        assert_eq!(
            t,
            "/usr/bin/runc --criu /opt/pageserv/criu/bin/criu --root '/run/my runc' --log \
             {work}/runc.log restore --detach --bundle '/srv/it'\\''s' --image-path {images} \
             --work-path {work} --pid-file {work}/restore.pid --lazy-pages web \
             </dev/null >/dev/null 2>&1"
        );
        let plain = r.restore_template(Path::new("/c"), Path::new("/b"), "web", false);
        assert!(!plain.contains("--lazy-pages"));
    }

    #[test]
    fn quoting() {
        assert_eq!(sh_quote("abc/d.e"), "abc/d.e");
        assert_eq!(sh_quote(""), "''");
        assert_eq!(sh_quote("a b"), "'a b'");
        assert_eq!(sh_quote("$(x)"), "'$(x)'");
    }
}
