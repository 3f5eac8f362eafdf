//! One lazy migration of a given process tree with the real services, for tests whose workload
//! is not the demo's: `pageserv dst` in the testbed's destination namespace, `pageserv src --lazy
//! --pid` in the root namespace; and network namespaces with veth for services whose address
//! moves with them. Everything created carries the test process's pid and is removed on drop.
//!
//! Include with `#[path = "common/netmig.rs"] mod netmig;`.
#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use pageserv_lab::testbed::Testbed;
use serde_json::Value;

pub fn pageserv() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_pageserv"))
}

/// Runs `ip ARGS`, panicking with its stderr on failure.
pub fn ip(args: &[&str]) {
    let out = Command::new("ip")
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("run ip");
    assert!(
        out.status.success(),
        "ip {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A network namespace this test made (`ip netns add`), deleted on drop.
pub struct NetNs(pub String);

impl NetNs {
    pub fn new(name: String) -> NetNs {
        let _ = Command::new("ip").args(["netns", "del", &name]).output();
        ip(&["netns", "add", &name]);
        ip(&["-n", &name, "link", "set", "lo", "up"]);
        NetNs(name)
    }
    pub fn path(&self) -> String {
        format!("/var/run/netns/{}", self.0)
    }
    /// `nsenter --net=PATH`: a prefix that runs a command in this namespace only.
    pub fn prefix(&self) -> Vec<String> {
        vec!["nsenter".into(), format!("--net={}", self.path())]
    }
    /// Runs `f` on a thread that has joined this namespace: sockets it creates live here.
    pub fn run<T: Send + 'static>(&self, f: impl FnOnce() -> T + Send + 'static) -> T {
        run_in(self.path(), f)
    }
}

/// Runs `f` on a thread that has joined the network namespace at `path`.
pub fn run_in<T: Send + 'static>(path: String, f: impl FnOnce() -> T + Send + 'static) -> T {
    std::thread::spawn(move || {
        enter_netns(&path);
        f()
    })
    .join()
    .expect("netns thread panicked")
}

/// Makes the calling thread join the network namespace at `path`.
pub fn enter_netns(path: &str) {
    let f = std::fs::File::open(path).unwrap_or_else(|e| panic!("{path}: {e}"));
    nix::sched::setns(f, nix::sched::CloneFlags::CLONE_NEWNET)
        .unwrap_or_else(|e| panic!("setns {path}: {e}"));
}

impl Drop for NetNs {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.0]).output();
    }
}

/// What one migration did.
#[derive(Debug)]
pub struct Outcome {
    pub src: Option<ExitStatus>,
    pub dst: Option<ExitStatus>,
    pub src_log: String,
    pub dst_log: String,
    pub src_json: Value,
    pub dst_json: Value,
    /// The restored tree's root pid (dst's report, else the restore's pidfile).
    pub restored_pid: Option<i32>,
    /// Migration directories left under dst's `--work` after the run (a successful
    /// migration's is removed).
    pub dst_dirs_left: Vec<PathBuf>,
    pub elapsed: Duration,
}

impl Outcome {
    pub fn ok(&self) -> bool {
        self.src.is_some_and(|s| s.success()) && self.dst.is_some_and(|s| s.success())
    }
    pub fn explain(&self) -> String {
        format!(
            "src {:?}, dst {:?}\n--- src ---\n{}\n--- dst ---\n{}",
            self.src, self.dst, self.src_log, self.dst_log
        )
    }
}

fn collect(
    child: &mut Child,
    tag: &'static str,
) -> (Arc<Mutex<String>>, std::sync::mpsc::Receiver<String>) {
    let text = Arc::new(Mutex::new(String::new()));
    let (tx, rx) = std::sync::mpsc::channel();
    let err = child.stderr.take().expect("piped stderr");
    let t = text.clone();
    std::thread::spawn(move || {
        for line in BufReader::new(err).lines().map_while(Result::ok) {
            eprintln!("  [{tag}] {line}");
            if let Ok(mut t) = t.lock() {
                t.push_str(&line);
                t.push('\n');
            }
            let _ = tx.send(line);
        }
    });
    (text, rx)
}

fn wait(child: &mut Child, timeout: Duration) -> Option<ExitStatus> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Ok(Some(s)) = child.try_wait() {
            return Some(s);
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            return None;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn read_json(p: &Path) -> Value {
    std::fs::read_to_string(p)
        .ok()
        .and_then(|t| serde_json::from_str(&t).ok())
        .unwrap_or(Value::Null)
}

/// Migrates the tree of `pid` (root namespace) into `bed`'s destination namespace with
/// `pageserv src --lazy --pid PID SRC_ARGS` and `pageserv dst DST_ARGS`; each gets `timeout`.
pub fn migrate(
    bed: &Testbed,
    pid: i32,
    src_args: &[String],
    dst_args: &[String],
    timeout: Duration,
) -> Outcome {
    let started = Instant::now();
    let (src_certs, dst_certs) =
        pageserv::keys::demo_identities(&bed.dir.join("keys")).expect("certificates");
    let port = 41000 + (std::process::id() % 20000) as u16;
    let to = format!("{}:{port}", bed.dst_addr);
    let dst_work = bed.dir.join("dst");
    let (src_json, dst_json) = (bed.dir.join("src.json"), bed.dir.join("dst.json"));
    let mut dst = bed
        .in_dst(pageserv())
        .args(["dst", "--listen", &to, "--certs"])
        .arg(&dst_certs)
        .arg("--work")
        .arg(&dst_work)
        .arg("--stats-json")
        .arg(&dst_json)
        .args(dst_args)
        .stdin(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start pageserv dst");
    let (dst_log, dst_lines) = collect(&mut dst, "dst");
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        match dst_lines.recv_timeout(Duration::from_millis(200)) {
            Ok(l) if l.contains("pageserv dst ready") => break,
            _ if Instant::now() > deadline => {
                let _ = dst.kill();
                panic!(
                    "pageserv dst did not get ready: {}",
                    dst_log.lock().unwrap()
                );
            }
            _ => {}
        }
    }
    std::thread::spawn(move || for _ in dst_lines {});
    let mut src = Command::new(pageserv())
        .args(["src", "--lazy", "--to", &to, "--dst-name", "dst", "--certs"])
        .arg(&src_certs)
        .arg("--work")
        .arg(bed.dir.join("src"))
        .arg("--stats-json")
        .arg(&src_json)
        .args(["--pid", &pid.to_string()])
        .args(src_args)
        .stdin(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start pageserv src");
    let (src_log, src_lines) = collect(&mut src, "src");
    std::thread::spawn(move || for _ in src_lines {});
    let src_status = wait(&mut src, timeout);
    let dst_status = if src_status.is_some_and(|s| s.success()) {
        wait(&mut dst, timeout)
    } else {
        wait(&mut dst, Duration::from_secs(10))
    };
    let dst_report = read_json(&dst_json);
    // dst removes a successful migration's directory: its report names the restored pid.
    let reported = dst_report["restored_pid"].as_i64().map(|p| p as i32);
    let restored_pid = reported.or_else(|| {
        std::fs::read_dir(&dst_work).ok().and_then(|d| {
            d.flatten().find_map(|e| {
                std::fs::read_to_string(e.path().join("work").join("restore.pid"))
                    .ok()
                    .and_then(|t| t.trim().parse().ok())
            })
        })
    });
    let dst_dirs_left = std::fs::read_dir(&dst_work)
        .map(|d| d.flatten().map(|e| e.path()).collect())
        .unwrap_or_default();
    let src_log = src_log.lock().map(|s| s.clone()).unwrap_or_default();
    let dst_log = dst_log.lock().map(|s| s.clone()).unwrap_or_default();
    Outcome {
        src: src_status,
        dst: dst_status,
        src_log,
        dst_log,
        src_json: read_json(&src_json),
        dst_json: dst_report,
        restored_pid,
        dst_dirs_left,
        elapsed: started.elapsed(),
    }
}

/// Whether `pid` exists and is not a zombie.
pub fn alive(pid: i32) -> bool {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    !stat.is_empty() && !stat.contains(") Z ")
}

pub fn kill(pid: i32) {
    let _ = nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid),
        nix::sys::signal::Signal::SIGKILL,
    );
}

/// Pids this test started, killed (by pid) on drop.
#[derive(Default)]
pub struct Started {
    pub pids: Vec<i32>,
    pub children: Vec<Child>,
}

impl Drop for Started {
    fn drop(&mut self) {
        for p in &self.pids {
            kill(*p);
        }
        for c in &mut self.children {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Starts `cmd` (an `unshare -p -f ...` command line) and returns the namespace init's pid once
/// it exists and, with `ready`, that file exists; both processes are recorded in `started`.
pub fn start_init(mut cmd: Command, ready: Option<&Path>, started: &mut Started) -> i32 {
    if let Some(r) = ready {
        let _ = std::fs::remove_file(r);
    }
    cmd.stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    // SAFETY: only the close_range syscall runs between fork and exec.
    unsafe {
        use std::os::unix::process::CommandExt;
        cmd.pre_exec(|| {
            libc::syscall(libc::SYS_close_range, 3u32, u32::MAX, 0u32);
            Ok(())
        });
    }
    let child = cmd.spawn().expect("start the service");
    let top = child.id() as i32;
    started.children.push(child);
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        // nsenter execs unshare, so `top` is unshare; its only child is the namespace's init.
        let kids =
            std::fs::read_to_string(format!("/proc/{top}/task/{top}/children")).unwrap_or_default();
        if let Some(pid) = kids.split_whitespace().next().and_then(|p| p.parse().ok()) {
            if !started.pids.contains(&pid) {
                started.pids.push(pid);
            }
            if ready.is_none_or(|r| r.exists()) {
                return pid;
            }
        }
        assert!(
            Instant::now() < deadline,
            "the service did not get ready in 60 s"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The testbed for these tests, with a tag of their own.
pub fn testbed(tag: u8) -> Testbed {
    Testbed::new(tag).expect("testbed")
}

/// A service's own network namespace (as a container has) joined by veth to a client's
/// namespace, both made by the test: the service at `svc_ip`, the client at `cli_ip`.
/// CRIU dumps the service's namespace with it; at dst the restore recreates it and the veth,
/// whose outer end (`--external veth[v_in]:v_out`, [`ServiceNet::dst_arg`]) appears in dst's
/// namespace; [`ServiceNet::spawn_mover`] moves that end to the client and routes the service's
/// address through it: the address moved with the service.
pub struct ServiceNet {
    pub svc: NetNs,
    pub cli: NetNs,
    pub v_in: String,
    pub v_out: String,
    pub svc_ip: String,
    pub cli_ip: String,
}

impl ServiceNet {
    pub fn new(tag: u32) -> ServiceNet {
        let me = std::process::id();
        let net = (me + tag * 7) % 250;
        let svc = NetNs::new(format!("psv{me}-svc{tag}"));
        let cli = NetNs::new(format!("psv{me}-cli{tag}"));
        let id = format!("{}{tag}", me % 100_000);
        let (v_in, v_cli, v_out) = (format!("ps{id}i"), format!("ps{id}c"), format!("ps{id}o"));
        let (svc_ip, cli_ip) = (format!("10.251.{net}.2"), format!("10.251.{net}.1"));
        ip(&["link", "add", &v_in, "type", "veth", "peer", "name", &v_cli]);
        ip(&["link", "set", &v_in, "netns", &svc.0]);
        ip(&["link", "set", &v_cli, "netns", &cli.0]);
        ip(&[
            "-n",
            &svc.0,
            "addr",
            "add",
            &format!("{svc_ip}/24"),
            "dev",
            &v_in,
        ]);
        ip(&[
            "-n",
            &cli.0,
            "addr",
            "add",
            &format!("{cli_ip}/24"),
            "dev",
            &v_cli,
        ]);
        ip(&["-n", &svc.0, "link", "set", &v_in, "up"]);
        ip(&["-n", &cli.0, "link", "set", &v_cli, "up"]);
        ServiceNet {
            svc,
            cli,
            v_in,
            v_out,
            svc_ip,
            cli_ip,
        }
    }

    /// The `pageserv dst` argument naming the restored veth's outer end.
    pub fn dst_arg(&self) -> String {
        format!("--criu-opt=--external=veth[{}]:{}", self.v_in, self.v_out)
    }

    /// Waits (until `stop`) for the outer end to appear in `dst_ns` and for the restore under
    /// `dst_work` to finish (its `restore.pid`), then moves the end to the client's namespace and
    /// routes the service's address through it; returns when it appeared.
    ///
    /// Not before the restore finished: CRIU makes the namespace and its veth before it restores
    /// the sockets, and a client packet that reaches the namespace in between finds no socket
    /// and is answered with a reset (seen in about one migration in ten when the route moved as
    /// soon as the veth appeared). Until then the client's packets go to the frozen source,
    /// whose network CRIU keeps locked, and are retransmitted after.
    pub fn spawn_mover(
        &self,
        dst_ns: &str,
        dst_work: std::path::PathBuf,
        stop: Arc<std::sync::atomic::AtomicBool>,
    ) -> std::thread::JoinHandle<Result<Duration, String>> {
        let (d, o, c, s) = (
            dst_ns.to_string(),
            self.v_out.clone(),
            self.cli.0.clone(),
            self.svc_ip.clone(),
        );
        std::thread::spawn(move || {
            let t0 = Instant::now();
            loop {
                let found = Command::new("ip")
                    .args(["-n", &d, "link", "show", &o])
                    .output()
                    .is_ok_and(|o| o.status.success());
                if found {
                    break;
                }
                if stop.load(std::sync::atomic::Ordering::Relaxed) {
                    return Err(format!("{o} never appeared in {d}"));
                }
                std::thread::sleep(Duration::from_millis(5));
            }
            let at = t0.elapsed();
            let restored = || {
                std::fs::read_dir(&dst_work).is_ok_and(|rd| {
                    rd.flatten()
                        .any(|e| e.path().join("work").join("restore.pid").exists())
                })
            };
            while !restored() {
                if stop.load(std::sync::atomic::Ordering::Relaxed) {
                    return Err(format!(
                        "the restore under {} never finished",
                        dst_work.display()
                    ));
                }
                std::thread::sleep(Duration::from_millis(2));
            }
            ip(&["-n", &d, "link", "set", &o, "netns", &c]);
            ip(&["-n", &c, "link", "set", &o, "up"]);
            ip(&["-n", &c, "route", "replace", &format!("{s}/32"), "dev", &o]);
            Ok(at)
        })
    }
}
