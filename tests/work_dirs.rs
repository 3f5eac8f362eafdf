//! A migration's directory at dst (images, work, restore.log) is removed once it succeeded and
//! kept, named in the error, after a failure (README "Limits"). Real CRIU, real userfaultfd,
//! QUIC: a TCP/unix echo server (`tests/common/sockserv.rs`, pid 1 of its own pid namespace)
//! migrated into a network namespace. Needs root and CRIU >= 4.2 (tools/setup).

use std::time::Duration;

#[path = "common/criu.rs"]
mod criu;
#[path = "common/netmig.rs"]
mod netmig;
#[path = "common/root.rs"]
mod root;
#[path = "common/sockserv.rs"]
mod sockserv;

use netmig::{Started, alive};
use pageserv_lab::testbed::Testbed;

/// Re-executed as the server by the tests below; a no-op in a normal run.
#[test]
fn socket_server() {
    sockserv::run_if_requested();
}

fn server(dir: &criu::TestDir, started: &mut Started) -> i32 {
    let port = criu::free_tcp_port().expect("port");
    let addr = format!("127.0.0.1:{port}");
    let cmd = sockserv::spawn_cmd(&[], "socket_server", dir.path(), &addr, None);
    netmig::start_init(cmd, Some(&dir.path().join("server.ready")), started)
}

/// One test's run: a socket server in its own scratch directory and testbed, migrated with
/// these extra `pageserv src` / `pageserv dst` arguments. Everything it started is ended when
/// the run is dropped.
struct Run {
    _dir: criu::TestDir,
    _bed: Testbed,
    started: Started,
    /// The source server.
    pid: i32,
    out: netmig::Outcome,
}

fn migrate_server(tag: &str, bed: u8, src_args: &[String], dst_args: &[String]) -> Run {
    let dir = criu::TestDir::new(tag);
    let bed = netmig::testbed(bed);
    let mut started = Started::default();
    let pid = server(&dir, &mut started);
    let out = netmig::migrate(&bed, pid, src_args, dst_args, Duration::from_secs(120));
    Run {
        _dir: dir,
        _bed: bed,
        started,
        pid,
        out,
    }
}

#[test]
fn the_directory_of_a_successful_migration_is_removed() {
    if !root::can_run() {
        return;
    }
    let mut run = migrate_server("workdirs-ok", 73, &[], &[]);
    let out = &run.out;
    assert!(out.ok(), "migration failed: {}", out.explain());
    let restored = out
        .restored_pid
        .expect("dst's report names the restored pid");
    run.started.pids.push(restored);
    assert!(alive(restored), "the restored server is not running");
    assert!(
        out.dst_dirs_left.is_empty(),
        "dst left {:?} after a successful migration",
        out.dst_dirs_left
    );
}

#[test]
fn the_directory_of_a_failed_migration_is_kept_and_named() {
    if !root::can_run() {
        return;
    }
    let run = migrate_server(
        "workdirs-fail",
        74,
        &[],
        &["--restore-cmd".into(), "exit 3".into()],
    );
    let (out, pid) = (&run.out, run.pid);
    assert!(!out.ok(), "a failed restore must fail the migration");
    assert!(alive(pid), "the source must be resumed: {}", out.explain());
    assert_eq!(out.dst_dirs_left.len(), 1, "{:?}", out.dst_dirs_left);
    let kept = out.dst_dirs_left[0].display().to_string();
    assert!(
        out.dst_log.contains(&kept) && out.dst_log.contains("kept"),
        "dst's error does not name {kept}:\n{}",
        out.dst_log
    );
    assert!(
        out.dst_dirs_left[0]
            .join("images")
            .join("pstree.img")
            .exists()
    );
}

/// A restore that CRIU itself refuses, at CRIU's default log level (pageserv passes no `-v`):
/// dst's error still quotes CRIU's own `Error` line from restore.log (`pr_err`, level 1), and
/// the log holds no debug lines. The option asks for an AppArmor profile that does not exist:
/// CRIU fails before it restores anything, whether or not the kernel has AppArmor.
#[test]
fn a_failed_criu_restore_quotes_criu_errors_at_the_default_level() {
    if !root::can_run() {
        return;
    }
    let run = migrate_server(
        "workdirs-criu-error",
        75,
        &[],
        &["--criu-opt=--lsm-profile=apparmor:pageserv-no-such-profile".into()],
    );
    let (out, pid) = (&run.out, run.pid);
    assert!(!out.ok(), "a refused restore must fail the migration");
    assert!(alive(pid), "the source must be resumed: {}", out.explain());
    assert_eq!(out.dst_dirs_left.len(), 1, "{:?}", out.dst_dirs_left);
    let log = std::fs::read_to_string(out.dst_dirs_left[0].join("work").join("restore.log"))
        .expect("restore.log kept");
    let last_error = log
        .lines()
        .rfind(|l| l.contains("Error ("))
        .unwrap_or_else(|| panic!("restore.log has no Error line:\n{log}"));
    assert!(
        out.dst_log.contains(last_error.trim()),
        "dst's error does not quote CRIU's last Error line {last_error:?}:\n{}",
        out.dst_log
    );
    // CRIU's default level writes no timestamps and no info/debug lines ("(00.000123) ...").
    assert!(
        !log.lines().any(|l| l.starts_with('(')),
        "restore.log has info/debug lines, so it did not run at CRIU's default level:\n{log}"
    );
}

/// A source that fails after it reached dst (here its `criu dump` refuses an option) tells dst
/// before it exits: dst ends the migration at once, not at its idle timeout (30 s), because src
/// lets QUIC send its CONNECTION_CLOSE before the process ends
/// (`transport::flush_client_closes`).
#[test]
fn a_source_that_fails_ends_the_migration_at_dst_at_once() {
    if !root::can_run() {
        return;
    }
    let run = migrate_server(
        "workdirs-src-fails",
        76,
        &["--criu-opt=--pageserv-no-such-criu-option".into()],
        &[],
    );
    let (out, pid) = (&run.out, run.pid);
    assert!(!out.ok(), "a failed dump must fail the migration");
    assert!(
        alive(pid),
        "the source must keep running: {}",
        out.explain()
    );
    // migrate() gives dst 10 s after a failed src, then kills it (status None).
    let dst = out.dst.unwrap_or_else(|| {
        panic!(
            "dst was still waiting 10 s after the source failed: {}",
            out.explain()
        )
    });
    assert!(!dst.success(), "dst must report the failed migration");
    assert!(
        out.elapsed < Duration::from_secs(20),
        "took {:?}: {}",
        out.elapsed,
        out.explain()
    );
}
