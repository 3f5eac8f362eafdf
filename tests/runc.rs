//! Containers with Debian's runc: `pageserv src --lazy --runc NAME` into `pageserv dst
//! --runc-bundle DIR`, real runc, real CRIU, real userfaultfd, QUIC with mutual TLS on loopback.
//!
//! Each test builds an OCI bundle around the self-verifying workload (tests/common/container.rs)
//! and two runc state directories standing for the two hosts. Needs root, CRIU and runc
//! (`tools/setup` installs both); outside CI a missing runc skips.

use std::net::{Ipv4Addr, SocketAddr, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

#[path = "common/container.rs"]
mod container;
#[path = "common/root.rs"]
mod root;

use container::{Host, Lab, read_log, runc_bin, wait_for};

fn pageserv() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_pageserv"))
}

/// The lab's workload, built beside pageserv (`cargo build --release` at the root).
fn workload() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_pageserv")).with_file_name("workload")
}

fn can_run() -> bool {
    if !root::can_run() {
        return false;
    }
    if runc_bin().is_none() {
        assert!(
            std::env::var_os("CI").is_none(),
            "runc missing in CI: tools/setup should have installed it"
        );
        eprintln!("SKIP: no runc (apt-get install runc)");
        return false;
    }
    true
}

fn free_udp_port() -> SocketAddr {
    let s = UdpSocket::bind((Ipv4Addr::LOCALHOST, 0)).expect("bind a UDP port");
    s.local_addr().expect("local addr")
}

fn wait_child(name: &str, c: &mut Child, timeout: Duration) -> ExitStatus {
    let end = Instant::now() + timeout;
    loop {
        if let Some(st) = c.try_wait().expect("try_wait") {
            return st;
        }
        if Instant::now() > end {
            let _ = c.kill();
            let _ = c.wait();
            panic!("{name} did not end within {timeout:?}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

struct Setup {
    lab: Lab,
    src: Host,
    dst: Host,
    name: String,
    src_bundle: PathBuf,
    dst_bundle: PathBuf,
    certs: PathBuf,
}

impl Drop for Setup {
    fn drop(&mut self) {
        self.src.remove(&self.name);
        self.dst.remove(&self.name);
    }
}

/// A running container `name` of `mib` MiB at the "source host", a bundle for it at the
/// "destination host" (same rootfs, its own cgroup), and certificates for both.
fn setup(test: &str, mib: u32) -> Setup {
    let lab = Lab::new(test);
    let name = format!("ps-{test}-{}", std::process::id());
    let rootfs = lab.rootfs(&workload());
    let args = [
        "--mib",
        &mib.to_string(),
        "--threads",
        "2",
        "--write-rate",
        "20",
        "--log",
        "/log/wl.log",
    ];
    let src_bundle = lab.bundle("bundle-src", &rootfs, &args, &format!("/{name}-src"));
    let dst_bundle = lab.bundle("bundle-dst", &rootfs, &args, &format!("/{name}-dst"));
    let src = Host {
        root: lab.dir.join("runc-src"),
    };
    let dst = Host {
        root: lab.dir.join("runc-dst"),
    };
    let certs = lab.dir.join("certs");
    let st = Command::new(pageserv())
        .args(["keygen", "--ca"])
        .arg(certs.join("ca"))
        .arg("--out")
        .arg(certs.join("host"))
        .args(["--role", "both", "--name", "host"])
        .stdout(Stdio::null())
        .status()
        .expect("pageserv keygen");
    assert!(st.success());
    src.run(&src_bundle, &name);
    // Running, and its memory made and checked once.
    assert!(
        wait_for(Duration::from_secs(30), || read_log(&lab.log()).checks_ok
            >= 1),
        "{test}: the container's workload did not start"
    );
    Setup {
        lab,
        src,
        dst,
        name,
        src_bundle,
        dst_bundle,
        certs,
    }
}

struct Run {
    src: ExitStatus,
    dst: ExitStatus,
    src_err: String,
    dst_err: String,
}

/// How the source migrates.
#[derive(Clone, Copy)]
enum How {
    /// `src --lazy --runc`.
    Lazy,
    /// `src --stop-and-copy --runc`.
    StopAndCopy,
    /// `src --lazy --runc` with the push held back, its `criu dump` killed (SIGKILL) once the
    /// container runs at dst.
    LazyKillingTheDump,
}

fn migrate(s: &Setup, dst_bundle: &Path, how: How) -> Run {
    let listen = free_udp_port();
    let work = s.lab.dir.join("work");
    let mut dst = Command::new(pageserv())
        .arg("dst")
        .arg("--listen")
        .arg(listen.to_string())
        .arg("--certs")
        .arg(s.certs.join("host"))
        .arg("--work")
        .arg(work.join("dst"))
        .arg("--runc-bundle")
        .arg(dst_bundle)
        .arg("--name")
        .arg(&s.name)
        .arg("--runc-root")
        .arg(&s.dst.root)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start pageserv dst");
    std::thread::sleep(Duration::from_millis(300));
    let mode = match how {
        How::Lazy | How::LazyKillingTheDump => "--lazy",
        How::StopAndCopy => "--stop-and-copy",
    };
    let mut src = Command::new(pageserv());
    src.args(["src", mode, "--dst-name", "host", "--to"])
        .arg(listen.to_string())
        .arg("--certs")
        .arg(s.certs.join("host"))
        .arg("--work")
        .arg(work.join("src"))
        .arg("--runc")
        .arg(&s.name)
        .arg("--runc-root")
        .arg(&s.src.root)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    if let How::LazyKillingTheDump = how {
        // The push held back (a knob only the lab's children get): the post-copy stays open.
        src.env("PAGESERV_LAB", "1").arg("--push-after=30s");
    }
    let src = src.spawn().expect("start pageserv src");
    if let How::LazyKillingTheDump = how {
        // runc writes its pid file once the restore is done (runc says "running" earlier).
        let restored = || {
            std::fs::read_dir(work.join("dst"))
                .into_iter()
                .flatten()
                .flatten()
                .any(|m| m.path().join("work/restore.pid").is_file())
        };
        assert!(
            wait_for(Duration::from_secs(30), restored),
            "the container was not restored at dst"
        );
        std::thread::sleep(Duration::from_millis(300));
        // Looked for again for a while: on a loaded machine /proc may show runc's child late.
        let mut criu = None;
        assert!(
            wait_for(Duration::from_secs(5), || {
                criu = descendant(src.id() as i32, is_criu_dump);
                criu.is_some()
            }),
            "no criu dump under pageserv src's runc checkpoint"
        );
        let criu = criu.expect("found above");
        // SAFETY: kill(2) on a process this test started (pageserv src's runc's criu).
        unsafe { libc::kill(criu, libc::SIGKILL) };
    }
    let src = src.wait_with_output().expect("run pageserv src");
    let dst_status = wait_child("pageserv dst", &mut dst, Duration::from_secs(60));
    let dst_err = {
        use std::io::Read;
        let mut e = String::new();
        let _ = dst.stderr.take().expect("stderr").read_to_string(&mut e);
        e
    };
    Run {
        src: src.status,
        dst: dst_status,
        src_err: String::from_utf8_lossy(&src.stderr).into_owned(),
        dst_err,
    }
}

#[test]
fn migrates_a_runc_container_lazily() {
    migrates_a_runc_container("runc-lazy", How::Lazy);
}

/// `runc pause`, `runc checkpoint --leave-running` into pageserv, restore at dst, then the
/// paused source container deleted.
#[test]
fn migrates_a_runc_container_stop_and_copy() {
    migrates_a_runc_container("runc-stop-copy", How::StopAndCopy);
}

fn migrates_a_runc_container(test: &str, how: How) {
    if !can_run() {
        return;
    }
    let s = setup(test, 256);
    let before = read_log(&s.lab.log());
    let r = migrate(&s, &s.dst_bundle, how);
    assert!(
        r.src.success() && r.dst.success(),
        "migration failed: src {} dst {}\n--- src ---\n{}\n--- dst ---\n{}",
        r.src,
        r.dst,
        r.src_err,
        r.dst_err
    );
    // The source container is gone (runc destroyed it after the dump succeeded, or pageserv
    // deleted the paused one after the restore) ...
    assert_eq!(
        s.src.status(&s.name),
        None,
        "the source container still exists"
    );
    // ... the destination's runs, and its memory checks go on passing there.
    assert_eq!(s.dst.status(&s.name).as_deref(), Some("running"));
    let at_switch = read_log(&s.lab.log()).checks_ok;
    assert!(
        wait_for(Duration::from_secs(20), || read_log(&s.lab.log()).checks_ok
            >= at_switch + 3),
        "no further memory checks at the destination"
    );
    let after = read_log(&s.lab.log());
    assert_eq!(after.checks_failed, 0, "memory checks failed");
    // One heartbeat sequence, no rollback or restart: strictly increasing across the switch.
    assert!(after.heartbeats.len() > before.heartbeats.len());
    assert!(
        after.heartbeats.windows(2).all(|w| w[1] > w[0]),
        "the heartbeat sequence went back: the workload restarted or was rolled back"
    );
    assert!(r.src_err.contains("downtime"), "src report:\n{}", r.src_err);
}

/// A `criu dump` (the installed CRIU runs through its loader; it names itself "criu: dump").
fn is_criu_dump(pid: i32, comm: &str) -> bool {
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
    comm == "criu" || String::from_utf8_lossy(&cmdline).contains("criu: dump")
}

/// The first descendant of `pid` that `is` says is the one.
fn descendant(pid: i32, is: impl Fn(i32, &str) -> bool) -> Option<i32> {
    let mut parents = Vec::new();
    for e in std::fs::read_dir("/proc").ok()?.flatten() {
        let Some(p) = e.file_name().to_str().and_then(|n| n.parse::<i32>().ok()) else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{p}/stat")) else {
            continue;
        };
        // "PID (COMM) S PPID ...": the name may hold spaces, so split after its last ')'.
        let Some((left, right)) = stat.rsplit_once(')') else {
            continue;
        };
        let name = left.split_once('(').map_or("", |(_, n)| n).to_string();
        let Some(ppid) = right
            .split_whitespace()
            .nth(1)
            .and_then(|x| x.parse::<i32>().ok())
        else {
            continue;
        };
        parents.push((p, ppid, name));
    }
    let mut ours = vec![pid];
    let mut i = 0;
    while i < ours.len() {
        for (p, pp, name) in &parents {
            if *pp == ours[i] && !ours.contains(p) {
                if is(*p, name) {
                    return Some(*p);
                }
                ours.push(*p);
            }
        }
        i += 1;
    }
    None
}

/// A `criu dump` killed mid post-copy under `runc checkpoint`: the container's freezer keeps
/// the source tasks stopped until dst was told to kill its incomplete copy, so the two copies
/// never run at once; then the source runs on as the live copy.
#[test]
fn a_dump_killed_mid_post_copy_never_lets_both_copies_run() {
    if !can_run() {
        return;
    }
    let s = setup("runc-killed", 64);
    let r = migrate(&s, &s.dst_bundle, How::LazyKillingTheDump);
    assert!(!r.src.success(), "src succeeded:\n{}", r.src_err);
    assert!(
        r.src_err.contains("stayed frozen") && r.src_err.contains("thawed the container"),
        "src did not hold and release the container in its freezer:\n{}",
        r.src_err
    );
    // The source runs on, checking its memory; dst's copy is gone.
    assert!(
        wait_for(Duration::from_secs(20), || s.src.status(&s.name).as_deref()
            == Some("running")),
        "source container is {:?}",
        s.src.status(&s.name)
    );
    assert_ne!(s.dst.status(&s.name).as_deref(), Some("running"));
    let n = read_log(&s.lab.log()).checks_ok;
    assert!(
        wait_for(Duration::from_secs(10), || read_log(&s.lab.log()).checks_ok
            > n),
        "the source container's workload does not run"
    );
    let log = read_log(&s.lab.log());
    assert_eq!(log.checks_failed, 0);
    // Both copies log to the same file. One step back (dst's copy killed, the source going on
    // from its freeze point) is the rule; more mean the two ran at once.
    let back = log.heartbeats.windows(2).filter(|w| w[1] < w[0]).count();
    assert!(
        back <= 1,
        "the heartbeat sequence went back {back} times: both copies ran at once"
    );
}

#[test]
fn failed_runc_restore_leaves_the_source_container_running() {
    failed_restore_leaves_the_source_running("runc-fail", How::Lazy);
}

/// The stop-and-copy source was paused through the checkpoint: a failed restore resumes it.
#[test]
fn failed_stop_and_copy_runc_restore_resumes_the_source_container() {
    failed_restore_leaves_the_source_running("runc-sc-fail", How::StopAndCopy);
}

fn failed_restore_leaves_the_source_running(test: &str, how: How) {
    if !can_run() {
        return;
    }
    let s = setup(test, 64);
    // A destination bundle whose rootfs does not exist: runc restore fails before the
    // container runs there.
    let broken = s.lab.dir.join("bundle-broken");
    std::fs::create_dir_all(&broken).expect("dir");
    let cfg = std::fs::read_to_string(s.dst_bundle.join("config.json")).expect("config");
    let mut v: serde_json::Value = serde_json::from_str(&cfg).expect("json");
    v["root"]["path"] = serde_json::json!(s.lab.dir.join("no-such-rootfs"));
    std::fs::write(broken.join("config.json"), v.to_string()).expect("write");
    let r = migrate(&s, &broken, how);
    assert!(!r.src.success(), "src succeeded:\n{}", r.src_err);
    assert!(!r.dst.success(), "dst succeeded:\n{}", r.dst_err);
    // The error names both logs: CRIU's and runc's (whose reason this is).
    assert!(
        r.dst_err.contains("restore.log") && r.dst_err.contains("runc.log"),
        "dst's error does not name CRIU's and runc's logs:\n{}",
        r.dst_err
    );
    if let How::StopAndCopy = how {
        assert!(
            r.src_err.contains("resumed at the source"),
            "src's error does not say the container was resumed:\n{}",
            r.src_err
        );
    }
    // The source container runs on, untouched, and goes on checking its memory.
    assert!(
        wait_for(Duration::from_secs(20), || s.src.status(&s.name).as_deref()
            == Some("running")),
        "source container is {:?}\n--- src ---\n{}",
        s.src.status(&s.name),
        r.src_err
    );
    let n = read_log(&s.lab.log()).checks_ok;
    assert!(
        wait_for(Duration::from_secs(10), || read_log(&s.lab.log()).checks_ok
            > n),
        "the source container's workload does not run"
    );
    assert_eq!(read_log(&s.lab.log()).checks_failed, 0);
    // Nothing half-made at the destination.
    assert_eq!(s.dst.status(&s.name), None, "dst runc kept a container");
    let _ = &s.src_bundle;
}
