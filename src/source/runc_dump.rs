//! `pageserv src --lazy --runc NAME`: pageserv starts `runc checkpoint --lazy-pages` itself and
//! joins the dump it makes, as it joins any external dump (see [`crate::runc`] for what runc
//! does around CRIU).
//!
//! The page server CRIU opens for runc listens on a loopback port pageserv picks (runc has no
//! option to hand CRIU a socket); the status byte comes through a pipe pageserv owns, passed to
//! runc as fd [`crate::runc::STATUS_FD`]. The runc process is the dump's `child`: its exit is
//! the dump's (success destroys the source container, a failed dump leaves it running).

use std::net::{Ipv4Addr, SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::SystemTime;

use crate::criu::binary::{Criu, pass_fds};
use crate::freezer::Freezer;
use crate::runc::{CheckpointMode, Runc, STATUS_FD};
use crate::source::dump::{DumpError, ReadyDump, join_after_status};

/// Which container to checkpoint, with which runc.
#[derive(Debug, Clone)]
pub struct RuncDump {
    pub runc: Runc,
    pub name: String,
}

/// Starts the lazy checkpoint of `dump.name` with its images in `work/images` and runc's work
/// directory (CRIU's `dump.log`) in `work/runc-work`; returns once CRIU serves pages.
pub fn start_runc_checkpoint(
    criu: &Criu,
    dump: &RuncDump,
    work: &Path,
) -> Result<ReadyDump, DumpError> {
    let setup = |what| move |source| DumpError::Setup { what, source };
    let images = work.join("images");
    let runc_work = work.join("runc-work");
    std::fs::create_dir_all(&images).map_err(setup("the images directory"))?;
    std::fs::create_dir_all(&runc_work).map_err(setup("runc's work directory"))?;
    let page_server =
        free_loopback_port().map_err(setup("a loopback port for CRIU's page server"))?;
    let (status_r, status_w) =
        nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).map_err(|e| DumpError::Setup {
            what: "the status pipe",
            source: e.into(),
        })?;
    // The container's cgroup, found while it runs (see crate::freezer); without one the
    // migration goes on as before, unprotected against a dying dump.
    let freezer = match dump.runc.running(&dump.name) {
        Ok(st) => Freezer::of_pid(st.pid)
            .map_err(|e| tracing::warn!(container = %dump.name, "no freezer: {e}"))
            .ok(),
        Err(e) => {
            tracing::warn!(container = %dump.name, "no freezer: {e}");
            None
        }
    };
    let mut cmd = dump.runc.command(Some(&criu.path));
    cmd.args(Runc::checkpoint_args(
        &dump.name,
        CheckpointMode::Lazy { page_server },
        &images,
        &runc_work,
    ))
    .stdin(Stdio::null())
    .stdout(Stdio::null());
    pass_fds(&mut cmd, &[(&status_w, STATUS_FD)]);
    let started_at = SystemTime::now();
    let mut child = cmd.spawn().map_err(|source| DumpError::Spawn {
        criu: dump.runc.bin.clone(),
        pid: 0,
        source,
    })?;
    // Our copy must go, or EOF on the status pipe would never come if runc dies.
    drop(status_w);
    let log = runc_work.join("dump.log");
    let status_name = PathBuf::from(format!("(runc checkpoint {} status pipe)", dump.name));
    match join_after_status(
        &images,
        page_server,
        std::fs::File::from(status_r),
        &status_name,
        started_at,
    ) {
        Ok(mut ready) => {
            ready.child = Some(child);
            ready.log = Some(log);
            ready.freezer = freezer;
            Ok(ready)
        }
        Err(e) => {
            // runc ended (or never got ready): its exit and CRIU's log say why.
            let status = child
                .wait()
                .map(|s| s.to_string())
                .unwrap_or_else(|e| format!("wait failed: {e}"));
            Err(DumpError::RuncNotReady {
                name: dump.name.clone(),
                status,
                cause: e.to_string(),
                tail: crate::criu::binary::log_tail(&log, 20),
                log,
            })
        }
    }
}

/// A loopback port free at the moment of asking (CRIU binds it right after).
fn free_loopback_port() -> std::io::Result<SocketAddr> {
    let l = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))?;
    l.local_addr()
}
