//! Stop-and-copy with real CRIU: a plain `criu dump --page-server` sends its memory to
//! `pageserv src --stop-and-copy`, which forwards every page over QUIC (mutual TLS) to
//! `pageserv dst`; dst writes a standard image directory and runs a plain `criu restore`.
//!
//! Each test runs `pageserv demo --stop-and-copy --json` (netns + veth, the self-verifying
//! workload); the workload's own log decides: it runs only at the destination afterwards and its
//! memory checks stay OK. Needs root and CRIU (`tools/setup`). Run under
//! `flock -o /work/wt/measure.lock`: without `-o` the lock's fd leaks into the workload and CRIU
//! refuses to dump a task holding a file lock.

use std::path::PathBuf;
use std::process::Command;

use serde_json::Value;

fn pageserv() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_pageserv"))
}

#[path = "common/root.rs"]
mod root;
use root::can_run;

/// Runs one demo with `args`; returns its JSON and stderr.
fn demo(name: &str, args: &[&str]) -> (Value, String, bool) {
    let json = std::env::temp_dir().join(format!("pageserv-sc-{name}-{}.json", std::process::id()));
    let out = Command::new(pageserv())
        .args(["demo", "--stop-and-copy", "--json"])
        .arg(&json)
        .args(args)
        .output()
        .expect("run pageserv demo");
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    let text = std::fs::read_to_string(&json)
        .unwrap_or_else(|_| panic!("{name}: demo wrote no result ({}):\n{stderr}", out.status));
    let _ = std::fs::remove_file(&json);
    (
        serde_json::from_str(&text).expect("demo JSON"),
        stderr,
        out.status.success(),
    )
}

fn check_migrated(name: &str, v: &Value, stderr: &str, min_pages: u64) {
    assert_eq!(v["ok"], true, "{name}: {}\n{stderr}", v["problems"]);
    assert_eq!(v["src_exit"], 0, "{name}");
    assert_eq!(v["dst_exit"], 0, "{name}");
    assert_eq!(v["workload_alive_at_dst"], true, "{name}");
    assert_eq!(v["workload_alive_at_src"], false, "{name}: two live copies");
    assert_eq!(v["checks_failed"], 0, "{name}");
    assert!(
        v["checks_ok_after"].as_u64().unwrap_or(0) >= 3,
        "{name}: {v}"
    );
    // Every page crossed in the session: what src forwarded is what dst wrote.
    let sent = v["src"]["pages_present"].as_u64().unwrap_or(0);
    let got = v["dst"]["stop_and_copy_pages"].as_u64().unwrap_or(0);
    assert_eq!(sent, got, "{name}: pages sent vs written");
    assert!(got >= min_pages, "{name}: only {got} pages: {}", v["dst"]);
    assert_eq!(
        v["dst"]["lazy_pages"], 0,
        "{name}: a plain restore has no lazy pages"
    );
    assert!(v["src"]["dump_ok"] == true, "{name}: {}", v["src"]);
    assert!(v["dst"]["downtime_ms"].as_f64().unwrap_or(0.0) > 0.0);
}

#[test]
fn stop_and_copy_256_mib_writing_workload() {
    if !can_run() {
        return;
    }
    let (v, stderr, _) = demo(
        "basic",
        &[
            "--mib",
            "256",
            "--threads",
            "2",
            "--write-rate",
            "20",
            "--after",
            "4",
        ],
    );
    check_migrated("basic", &v, &stderr, 65_536);
}

/// The session dealt over 5 lanes on 3 QUIC connections (`--lanes`, `--lane-connections`):
/// every page arrives once, in order, and the restored workload verifies its memory.
#[test]
fn stop_and_copy_over_lanes_on_three_connections() {
    if !can_run() {
        return;
    }
    let (v, stderr, _) = demo(
        "lanes",
        &[
            "--mib",
            "64",
            "--write-rate",
            "10",
            "--after",
            "4",
            "--src-arg=--lanes",
            "--src-arg=5",
            "--src-arg=--lane-connections",
            "--src-arg=3",
        ],
    );
    check_migrated("lanes", &v, &stderr, 16_384);
}

#[test]
fn stop_and_copy_a_process_tree() {
    if !can_run() {
        return;
    }
    let (v, stderr, _) = demo(
        "tree",
        &[
            "--mib",
            "64",
            "--children",
            "2",
            "--write-rate",
            "10",
            "--after",
            "4",
        ],
    );
    check_migrated("tree", &v, &stderr, 3 * 16_384);
    assert_eq!(v["dst"]["tasks"], 3, "parent + 2 children");
}

/// The restore fails at dst: the post-dump hook hears "fail", so CRIU resumes the source tasks
/// instead of killing them; the workload keeps running and checking itself at the source.
#[test]
fn stop_and_copy_failed_restore_resumes_the_source() {
    if !can_run() {
        return;
    }
    let (v, stderr, success) = demo(
        "fail",
        &[
            "--mib",
            "64",
            "--after",
            "3",
            "--dst-arg=--restore-cmd=exit 3",
        ],
    );
    assert!(!success, "the demo must report the failed migration");
    assert_ne!(v["src_exit"], 0, "{stderr}");
    assert_ne!(v["dst_exit"], 0, "{stderr}");
    assert!(stderr.contains("restore failed"), "{stderr}");
    assert_eq!(v["workload_alive_at_src"], true, "source resumed: {stderr}");
    assert_eq!(v["workload_alive_at_dst"], false);
    assert_eq!(v["checks_failed"], 0);
    assert!(v["checks_ok_after"].as_u64().unwrap_or(0) >= 2, "{v}");
}
