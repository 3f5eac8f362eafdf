//! Failures the demo can inject mid post-copy, for the failure tests: the link cut for a while,
//! or one of the two pageserv processes killed. The end state each leaves is checked by the
//! workload's own log and by the processes the demo started (see README, "When things fail").

use std::process::Child;
use std::sync::mpsc::Receiver;
use std::time::Duration;

use serde::Serialize;

use crate::testbed::Testbed;

/// What to break, `after` the restore finished at dst.
#[derive(Debug, Clone, Copy)]
pub enum Fault {
    CutLink {
        secs: f64,
    },
    KillDst,
    KillSrc,
    /// SIGKILL the `criu dump` that `pageserv src` runs (the one holding the source frozen).
    KillCriuDump,
}

/// What the fault injection saw.
#[derive(Debug, Clone, Default, Serialize)]
pub struct FaultReport {
    pub injected: bool,
    /// When the link came back (Unix ns), for measuring the recovery.
    pub link_up_unix_ns: u64,
    /// After the failure, before any retry: the source workload's /proc state letter ("t" is
    /// frozen by the dump's ptrace; "" gone).
    pub source_state: String,
    /// After the failure: was the restored copy at dst still alive?
    pub restored_alive_after_failure: bool,
    /// The retry's exit codes: `pageserv src --resume`, into the same dst if it still runs the
    /// migration (src was killed), else into a restarted one.
    pub retry_src_exit: Option<i32>,
    pub retry_dst_exit: Option<i32>,
    /// With `--restart-dst`: the restored root (host pid, start time in clock ticks) just after
    /// dst was killed, and again after the migration: the same process if it was adopted.
    pub restored_before_restart: Option<(i32, u64)>,
    pub restored_after: Option<(i32, u64)>,
    /// Without `--retry`, a source left frozen is settled by the demo (`pageserv frozen DIR
    /// --kill-source`, as an operator would): whether that worked.
    pub source_settled: bool,
    /// Heartbeats in the workload's log that went backwards (tag, seq): a rolled-back copy.
    pub rolled_back_heartbeats: Vec<(String, u64)>,
}

/// Waits for the restore to finish (`restored` fires), waits `after`, then injects `fault`.
pub fn inject(
    bed: &Testbed,
    fault: Fault,
    after: Duration,
    restored: &Receiver<()>,
    dst_pid: i32,
    src_pid: i32,
    report: &mut FaultReport,
) {
    if restored.recv_timeout(Duration::from_secs(120)).is_err() {
        eprintln!("fault injection: the restore never finished; nothing injected");
        return;
    }
    std::thread::sleep(after);
    let kill = |pid: i32| {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid),
            nix::sys::signal::Signal::SIGKILL,
        );
    };
    match fault {
        Fault::CutLink { secs } => {
            eprintln!("fault injection: link down for {secs} s");
            if let Err(e) = bed.set_link(false) {
                eprintln!("fault injection: cannot take the link down: {e}");
                return;
            }
            std::thread::sleep(Duration::from_secs_f64(secs));
            if let Err(e) = bed.set_link(true) {
                eprintln!("fault injection: cannot bring the link back: {e}");
            }
            report.link_up_unix_ns = super::unix_ns();
        }
        Fault::KillDst => {
            eprintln!("fault injection: SIGKILL pageserv dst ({dst_pid})");
            kill(dst_pid);
        }
        Fault::KillSrc => {
            eprintln!("fault injection: SIGKILL pageserv src ({src_pid})");
            kill(src_pid);
        }
        Fault::KillCriuDump => {
            let dumps: Vec<i32> = pageserv::dst::uffd_loop::kill::descendants(src_pid)
                .into_iter()
                .filter(|p| {
                    // By its arguments: the installed criu runs under its own loader.
                    let cmd = std::fs::read(format!("/proc/{p}/cmdline")).unwrap_or_default();
                    let args: Vec<&[u8]> = cmd.split(|b| *b == 0).collect();
                    args.iter().any(|a| a.ends_with(b"criu")) && args.contains(&&b"dump"[..])
                })
                .collect();
            if dumps.is_empty() {
                eprintln!("fault injection: no criu dump under pageserv src ({src_pid})");
                return;
            }
            eprintln!("fault injection: SIGKILL criu dump ({dumps:?})");
            for p in dumps {
                kill(p);
            }
        }
    }
    report.injected = true;
}

/// The /proc state letter of `pid` ("" if it is gone).
pub fn proc_state(pid: i32) -> String {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    stat.rsplit_once(')')
        .and_then(|(_, rest)| rest.split_whitespace().next())
        .unwrap_or("")
        .to_string()
}

/// Kills `child` if it is still running after `timeout`.
pub fn finish(child: &mut Child, timeout: Duration) -> Option<i32> {
    pageserv::child::wait_timeout(child, timeout)
        .ok()
        .flatten()
        .and_then(|s| s.code())
}
