//! A real runc container for tests: an OCI bundle whose rootfs holds the self-verifying
//! `workload` (and the libraries `ldd` names), its log on a bind mount of a host directory so
//! the test reads it at the source and, after the migration, at the destination.
//!
//! Include with `#[path = "common/container.rs"] mod container;`.

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

/// Debian's runc (tools/setup installs it).
pub fn runc_bin() -> Option<PathBuf> {
    std::env::var_os("PATH")
        .iter()
        .flat_map(std::env::split_paths)
        .map(|d| d.join("runc"))
        .find(|p| p.is_file())
}

/// Where a test's bundles, state and logs live; removed on drop.
pub struct Lab {
    pub dir: PathBuf,
    pub log_dir: PathBuf,
}

impl Lab {
    pub fn new(test: &str) -> Lab {
        let dir = PathBuf::from(format!("/var/tmp/pageserv-{test}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("make the lab directory");
        let log_dir = dir.join("log");
        std::fs::create_dir_all(&log_dir).expect("make the log directory");
        Lab { dir, log_dir }
    }

    /// The workload's log as the host sees it.
    pub fn log(&self) -> PathBuf {
        self.log_dir.join("wl.log")
    }

    /// Makes the root filesystem (shared by the source and destination bundles, as two hosts
    /// would each have their copy).
    pub fn rootfs(&self, workload: &Path) -> PathBuf {
        pageserv_lab::testbed::container::make_rootfs(&self.dir.join("rootfs"), workload)
            .expect("make the container's rootfs")
    }

    /// Writes bundle `bundle`: the workload with `args`, the log directory at /log, its own
    /// cgroup path.
    pub fn bundle(&self, bundle: &str, rootfs: &Path, args: &[&str], cgroup: &str) -> PathBuf {
        let args: Vec<String> = args.iter().map(|s| s.to_string()).collect();
        pageserv_lab::testbed::container::write_bundle(
            &runc_bin().expect("runc"),
            &self.dir.join(bundle),
            rootfs,
            &args,
            cgroup,
            &self.log_dir,
        )
        .expect("write the bundle")
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// One runc state directory (`runc --root`), standing for one host.
pub struct Host {
    pub root: PathBuf,
}

impl Host {
    pub fn runc(&self) -> Command {
        let mut c = Command::new(runc_bin().expect("runc"));
        c.arg("--root").arg(&self.root);
        c
    }

    /// `runc run -d`, stdio /dev/null (a container's stdio must not be a host file).
    pub fn run(&self, bundle: &Path, name: &str) {
        let st = self
            .runc()
            .args(["run", "-d", "--bundle"])
            .arg(bundle)
            .arg(name)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .expect("runc run");
        assert!(st.success(), "runc run {name} failed");
    }

    /// The container's status (`running`, `stopped`...), or None when runc does not know it.
    pub fn status(&self, name: &str) -> Option<String> {
        let out = self.runc().args(["state", name]).output().ok()?;
        if !out.status.success() {
            return None;
        }
        let v: Value = serde_json::from_slice(&out.stdout).ok()?;
        v["status"].as_str().map(str::to_string)
    }

    /// Kills and deletes the container if runc knows it (test cleanup).
    pub fn remove(&self, name: &str) {
        if self.status(name).is_some() {
            let _ = self.runc().args(["delete", "--force", name]).output();
        }
    }
}

/// The workload's log: heartbeat sequence numbers of the root process and its checks.
pub struct LogFacts {
    pub heartbeats: Vec<u64>,
    pub checks_ok: usize,
    pub checks_failed: usize,
}

pub fn read_log(path: &Path) -> LogFacts {
    let text = std::fs::read(path).unwrap_or_default();
    let text = String::from_utf8_lossy(&text);
    let mut f = LogFacts {
        heartbeats: Vec::new(),
        checks_ok: 0,
        checks_failed: 0,
    };
    for line in text.lines() {
        let w: Vec<&str> = line.split_whitespace().collect();
        match w.as_slice() {
            ["hb", "r", seq, ..] => {
                if let Ok(n) = seq.parse() {
                    f.heartbeats.push(n)
                }
            }
            ["check", "r", "ok", ..] => f.checks_ok += 1,
            ["check", _, "FAIL", ..] => f.checks_failed += 1,
            _ => {}
        }
    }
    f
}

/// Waits until `cond` holds or `timeout` passes.
pub fn wait_for(timeout: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let end = Instant::now() + timeout;
    while Instant::now() < end {
        if cond() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    cond()
}
