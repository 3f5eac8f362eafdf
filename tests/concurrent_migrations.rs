//! Load: one `pageserv dst --max-migrations 8` takes 8 lazy migrations at once, each of its own
//! workload (pid 1 of its own pid namespace) with its own images, work directory, restore and
//! uffds. All must verify: every workload's own memory self-check stays OK at dst, runs only
//! there, all 8 `pageserv src` and the dst exit 0, and dst's page accounting of each migration
//! covers every lazy page. Needs root and CRIU (`tools/setup`).

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use pageserv_lab::testbed::Testbed;
use pageserv_lab::workload_log::Summary;
use serde_json::Value;

const MIGRATIONS: usize = 8;
const MIB: u32 = 32;

fn bin(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_pageserv")).with_file_name(name)
}

#[path = "common/root.rs"]
mod root;
use root::can_run;

fn unix_ns() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64)
}

fn alive(pid: i32) -> bool {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    !stat.is_empty() && !stat.contains(") Z ")
}

fn kill(pid: i32) {
    let _ = nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid),
        nix::sys::signal::Signal::SIGKILL,
    );
}

/// Everything this test started, ended (by pid) however the test ends.
#[derive(Default)]
struct Started {
    children: Vec<Child>,
    pids: Vec<i32>,
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

/// Starts a workload as pid 1 of a new pid namespace; returns its host pid once it is ready.
/// Each workload gets a working directory of its own: CRIU's parasite mounts a private /proc at
/// `proc.crtools` in the dumped task's cwd when /proc is not of its pid namespace, so concurrent
/// dumps of tasks sharing a cwd fail with EEXIST ("Can't create a directory (-17)").
fn start_workload(log: &Path, seed: usize, started: &mut Started) -> i32 {
    let cwd = log.with_extension("cwd");
    std::fs::create_dir_all(&cwd).unwrap();
    let child = Command::new("unshare")
        .current_dir(&cwd)
        .args(["-p", "-f", "setsid"])
        .arg(bin("workload"))
        .args([
            "--mib",
            &MIB.to_string(),
            "--threads",
            "1",
            "--write-rate",
            "2",
        ])
        .args(["--seed", &(1000 + seed).to_string()])
        .arg("--log")
        .arg(log)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("unshare workload");
    let unshare = child.id();
    started.children.push(child);
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let kids = std::fs::read_to_string(format!("/proc/{unshare}/task/{unshare}/children"))
            .unwrap_or_default();
        if let Some(pid) = kids.split_whitespace().next().and_then(|p| p.parse().ok()) {
            let text = std::fs::read_to_string(log).unwrap_or_default();
            if text.lines().any(|l| l.starts_with("ready ")) {
                started.pids.push(pid);
                return pid;
            }
        }
        assert!(
            Instant::now() < deadline,
            "workload {seed} not ready in 60 s"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn wait_timeout(child: &mut Child, timeout: Duration) -> Option<i32> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(s) = child.try_wait().unwrap() {
            return Some(s.code().unwrap_or(-1));
        }
        if Instant::now() > deadline {
            return None;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn eight_concurrent_migrations_into_one_dst() {
    if !can_run() {
        return;
    }
    let bed = Testbed::new(61).expect("testbed");
    let dir = bed.dir.clone();
    let (src_certs, dst_certs) = pageserv::keys::demo_identities(&dir.join("keys")).unwrap();
    let mut started = Started::default();

    let logs: Vec<PathBuf> = (0..MIGRATIONS)
        .map(|i| dir.join(format!("workload-{i}.log")))
        .collect();
    let pids: Vec<i32> = logs
        .iter()
        .enumerate()
        .map(|(i, log)| start_workload(log, i, &mut started))
        .collect();
    std::thread::sleep(Duration::from_secs(1));

    let port = 42000 + (std::process::id() % 20000) as u16;
    let addr = format!("{}:{port}", bed.dst_addr);
    let dst_json = dir.join("dst.json");
    let dst_log = dir.join("dst.log");
    let dst = bed
        .in_dst(bin("pageserv"))
        .args(["dst", "--listen", &addr, "--certs"])
        .arg(&dst_certs)
        .arg("--work")
        .arg(dir.join("dst"))
        // The restored pids are read from each migration's pidfile afterwards.
        .arg("--keep-work")
        .args(["--max-migrations", &MIGRATIONS.to_string()])
        .arg("--stats-json")
        .arg(&dst_json)
        .stdin(Stdio::null())
        .stderr(std::fs::File::create(&dst_log).unwrap())
        .spawn()
        .expect("pageserv dst");
    started.children.push(dst);
    let deadline = Instant::now() + Duration::from_secs(20);
    while !std::fs::read_to_string(&dst_log)
        .unwrap_or_default()
        .contains("pageserv dst ready")
    {
        assert!(Instant::now() < deadline, "dst not ready in 20 s");
        std::thread::sleep(Duration::from_millis(50));
    }

    // All 8 sources at once.
    let mut srcs: Vec<Child> = pids
        .iter()
        .enumerate()
        .map(|(i, pid)| {
            Command::new(bin("pageserv"))
                .args([
                    "src",
                    "--lazy",
                    "--to",
                    &addr,
                    "--dst-name",
                    "dst",
                    "--certs",
                ])
                .arg(&src_certs)
                .arg("--work")
                .arg(dir.join(format!("src-{i}")))
                .args(["--pid", &pid.to_string()])
                .arg("--stats-json")
                .arg(dir.join(format!("src-{i}.json")))
                .stdin(Stdio::null())
                .stderr(std::fs::File::create(dir.join(format!("src-{i}.log"))).unwrap())
                .spawn()
                .expect("pageserv src")
        })
        .collect();
    let src_exits: Vec<Option<i32>> = srcs
        .iter_mut()
        .map(|c| wait_timeout(c, Duration::from_secs(240)))
        .collect();
    for c in &mut srcs {
        let _ = c.kill();
        let _ = c.wait();
    }
    let dst_exit = wait_timeout(
        started.children.last_mut().unwrap(),
        Duration::from_secs(60),
    );
    let migrated_ns = unix_ns();

    // The restored trees, from each migration's pidfile.
    let mut restored = Vec::new();
    for entry in std::fs::read_dir(dir.join("dst")).unwrap().flatten() {
        let pidfile = entry.path().join("work").join("restore.pid");
        if let Some(pid) = std::fs::read_to_string(&pidfile)
            .ok()
            .and_then(|t| t.trim().parse::<i32>().ok())
        {
            started.pids.push(pid);
            restored.push(pid);
        }
    }
    // Watch the workloads at dst: at least 3 whole-memory checks each after the last page.
    std::thread::sleep(Duration::from_secs(4));
    let alive_at_dst = restored.iter().filter(|p| alive(**p)).count();
    let alive_at_src: Vec<i32> = pids.iter().copied().filter(|p| alive(*p)).collect();
    for p in &restored {
        kill(*p);
    }

    let describe = || {
        let mut s = format!(
            "--- dst log ---\n{}",
            std::fs::read_to_string(&dst_log).unwrap_or_default()
        );
        for i in 0..MIGRATIONS {
            let t = std::fs::read_to_string(dir.join(format!("src-{i}.log"))).unwrap_or_default();
            let tail: Vec<&str> = t.lines().rev().take(5).collect();
            s += &format!(
                "\n--- src {i} (last lines, newest first) ---\n{}",
                tail.join("\n")
            );
        }
        s
    };
    assert!(
        src_exits.iter().all(|e| *e == Some(0)),
        "src exits {src_exits:?}\n{}",
        describe()
    );
    assert_eq!(dst_exit, Some(0), "dst exit\n{}", describe());
    assert_eq!(restored.len(), MIGRATIONS, "restored trees {restored:?}");
    assert_eq!(alive_at_dst, MIGRATIONS, "workloads running at dst");
    assert!(alive_at_src.is_empty(), "two live copies: {alive_at_src:?}");

    for (i, log) in logs.iter().enumerate() {
        let wl = Summary::parse(&std::fs::read_to_string(log).unwrap());
        let v = wl.verify_after(migrated_ns, 3);
        assert!(v.problems.is_empty(), "workload {i}: {:?}", v.problems);
        assert_eq!(wl.checks_failed(), 0, "workload {i}");
    }

    let outcomes: Value =
        serde_json::from_str(&std::fs::read_to_string(&dst_json).unwrap()).expect("dst stats JSON");
    let outcomes = outcomes.as_array().expect("an array of outcomes");
    assert_eq!(outcomes.len(), MIGRATIONS);
    let mut ids: Vec<&str> = Vec::new();
    for o in outcomes {
        assert_eq!(o["ok"], true, "{o}");
        ids.push(o["migration_id"].as_str().unwrap());
        let r = &o["report"];
        let lazy = r["lazy_pages"].as_u64().unwrap();
        assert!(lazy >= u64::from(MIB) * 256 / 2, "too few lazy pages: {r}");
        let placed = r["pages_on_demand"].as_u64().unwrap()
            + r["pages_pushed"].as_u64().unwrap()
            + r["pages_zero_lazy"].as_u64().unwrap();
        assert_eq!(placed, lazy, "page accounting: {r}");
    }
    ids.sort_unstable();
    ids.dedup();
    assert_eq!(ids.len(), MIGRATIONS, "migration ids are distinct");
    eprintln!(
        "8 concurrent migrations verified; dst reports: {}",
        serde_json::to_string(outcomes).unwrap()
    );
}
