//! What the workload's tests share: a scratch directory kept when a test fails, and reading and
//! waiting on the workload's log.
#![allow(dead_code)]

use pageserv_lab::workload_log::Summary;
use std::fs;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// A scratch directory, removed when the test passes (kept for inspection when it fails).
pub struct Scratch(PathBuf);

impl std::ops::Deref for Scratch {
    type Target = Path;
    fn deref(&self) -> &Path {
        &self.0
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        if !std::thread::panicking() {
            let _ = fs::remove_dir_all(&self.0);
        }
    }
}

/// A fresh scratch directory for test `name` of test file `file`.
pub fn scratch(file: &str, name: &str) -> Scratch {
    let dir = std::env::temp_dir().join(format!("pageserv-{file}-{name}-{}", std::process::id()));
    let _ = fs::remove_dir_all(&dir);
    fs::create_dir_all(&dir).unwrap();
    Scratch(dir)
}

pub fn summary(log: &Path) -> Summary {
    Summary::parse(&fs::read_to_string(log).unwrap_or_default())
}

/// Polls the log until `done` holds; panics with the log's tail after `timeout`.
pub fn wait_for(
    log: &Path,
    timeout: Duration,
    what: &str,
    done: impl Fn(&Summary) -> bool,
) -> Summary {
    let t0 = Instant::now();
    loop {
        let s = summary(log);
        if done(&s) {
            return s;
        }
        if t0.elapsed() > timeout {
            let text = fs::read_to_string(log).unwrap_or_default();
            let tail: Vec<&str> = text.lines().filter(|l| !l.starts_with("hb ")).collect();
            panic!(
                "timed out waiting for {what}; log without heartbeats:\n{}",
                tail.join("\n")
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Whether process `pid` runs (a zombie counts as gone).
pub fn alive(pid: i32) -> bool {
    fs::read_to_string(format!("/proc/{pid}/stat"))
        .map(|s| {
            s.rsplit(')')
                .next()
                .is_some_and(|rest| !rest.trim_start().starts_with('Z'))
        })
        .unwrap_or(false)
}
