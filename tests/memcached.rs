//! A real server from Debian migrates under client load: memcached (threads, epoll, slab memory)
//! in a network namespace of its own, at least 512 MiB of items, a client that keeps sending
//! requests on its connection throughout the migration. Every item is checked at dst, and the
//! client reports its longest gap (the downtime it felt, first post-copy faults included: its
//! gets touch migrated items) and its errors. Lazy, and pre-copy + lazy.
//!
//! memcached runs under the test's control: started by it as pid 1 of its own pid namespace,
//! inside a network namespace the test made (it listens on nothing else), killed by pid at the
//! end. Needs root, CRIU >= 4.2 and memcached (tools/setup).

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

#[path = "common/criu.rs"]
mod criu;
#[path = "common/netmig.rs"]
mod netmig;
#[path = "common/root.rs"]
mod root;

use netmig::{ServiceNet, Started, alive};

/// Items and their size: 131072 x 4 KiB = 512 MiB of values.
const ITEMS: u64 = 131_072;
const VALUE: usize = 4096;
const PORT: u16 = 11211;

fn memcached_bin() -> Option<std::path::PathBuf> {
    let found = std::env::var_os("PATH").and_then(|p| {
        std::env::split_paths(&p)
            .map(|d| d.join("memcached"))
            .find(|p| p.is_file())
    });
    if found.is_none() {
        assert!(
            std::env::var_os("CI").is_none(),
            "memcached missing in CI: tools/setup should have installed it"
        );
        eprintln!("SKIP: memcached not installed (apt-get install memcached)");
    }
    found
}

/// The value of item `i`: 4 KiB that depend on `i` (and `gen`, for rewritten items).
fn value(i: u64, generation: u64) -> Vec<u8> {
    let mut v = Vec::with_capacity(VALUE);
    let mut x = i.wrapping_mul(0x9E37_79B9_7F4A_7C15)
        ^ generation.wrapping_mul(0xD1B5_4A32_D192_ED03)
        ^ 0x6d656d63;
    while v.len() < VALUE {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        // Printable bytes keep a protocol slip visible in the messages.
        v.extend(x.to_le_bytes().iter().map(|b| b'!' + b % 90));
    }
    v.truncate(VALUE);
    v
}

fn key(i: u64) -> String {
    format!("item:{i}")
}

/// A text-protocol connection.
struct Conn {
    r: BufReader<TcpStream>,
    w: TcpStream,
}

impl Conn {
    fn new(s: TcpStream) -> Conn {
        let _ = s.set_nodelay(true);
        let _ = s.set_read_timeout(Some(Duration::from_secs(120)));
        Conn {
            w: s.try_clone().expect("clone"),
            r: BufReader::new(s),
        }
    }

    fn line(&mut self) -> Result<String, String> {
        let mut l = String::new();
        match self.r.read_line(&mut l) {
            Ok(0) => Err("connection closed".into()),
            Ok(_) => Ok(l.trim_end().to_string()),
            Err(e) => Err(e.to_string()),
        }
    }

    fn set(&mut self, k: &str, v: &[u8], noreply: bool) -> Result<(), String> {
        let mut buf = format!(
            "set {k} 0 0 {}{}\r\n",
            v.len(),
            if noreply { " noreply" } else { "" }
        )
        .into_bytes();
        buf.extend_from_slice(v);
        buf.extend_from_slice(b"\r\n");
        self.w.write_all(&buf).map_err(|e| e.to_string())?;
        if noreply {
            return Ok(());
        }
        match self.line()? {
            l if l == "STORED" => Ok(()),
            l => Err(format!("set {k}: {l}")),
        }
    }

    /// `get k1 k2 ...`: the values in order, `None` for a miss.
    fn get_many(&mut self, keys: &[String]) -> Result<Vec<(String, Vec<u8>)>, String> {
        self.w
            .write_all(format!("get {}\r\n", keys.join(" ")).as_bytes())
            .map_err(|e| e.to_string())?;
        let mut out = Vec::new();
        loop {
            let l = self.line()?;
            if l == "END" {
                return Ok(out);
            }
            let f: Vec<&str> = l.split(' ').collect();
            if f.len() != 4 || f[0] != "VALUE" {
                return Err(format!("unexpected line {l:?}"));
            }
            let n: usize = f[3].parse().map_err(|_| format!("bad length in {l:?}"))?;
            let mut data = vec![0u8; n + 2];
            self.r.read_exact(&mut data).map_err(|e| e.to_string())?;
            data.truncate(n);
            out.push((f[1].to_string(), data));
        }
    }
}

fn connect(net: &ServiceNet) -> Conn {
    let to = format!("{}:{PORT}", net.svc_ip);
    net.cli.run(move || {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            match TcpStream::connect(&to) {
                Ok(s) => return Conn::new(s),
                Err(e) if Instant::now() > deadline => panic!("connect to memcached at {to}: {e}"),
                Err(_) => std::thread::sleep(Duration::from_millis(50)),
            }
        }
    })
}

/// Loads every item, pipelined (noreply), then checks the last one arrived.
fn load(c: &mut Conn) {
    for i in 0..ITEMS {
        c.set(&key(i), &value(i, 0), true).expect("load");
    }
    c.set("loaded", b"1", false).expect("load barrier");
}

/// Checks every item; returns (items checked, problems).
fn verify_all(c: &mut Conn, rewritten: &std::collections::HashMap<u64, u64>) -> (u64, Vec<String>) {
    let mut checked = 0;
    let mut problems = Vec::new();
    let batch = 64;
    let mut i = 0;
    while i < ITEMS {
        let keys: Vec<String> = (i..(i + batch).min(ITEMS)).map(key).collect();
        match c.get_many(&keys) {
            Ok(got) => {
                if got.len() != keys.len() {
                    problems.push(format!(
                        "{} of {} items from {} missing",
                        keys.len() - got.len(),
                        keys.len(),
                        keys[0]
                    ));
                }
                for (k, v) in got {
                    let idx: u64 = k[5..].parse().unwrap_or(u64::MAX);
                    let generation = rewritten.get(&idx).copied().unwrap_or(0);
                    if v != value(idx, generation) {
                        problems.push(format!("{k}: wrong value"));
                    }
                    checked += 1;
                }
            }
            Err(e) => {
                problems.push(format!("get from {}: {e}", keys[0]));
                break;
            }
        }
        if problems.len() > 10 {
            break;
        }
        i += batch;
    }
    (checked, problems)
}

/// What the load client saw.
#[derive(Debug, Default)]
struct Load {
    requests: u64,
    errors: Vec<String>,
    max_gap: Duration,
    /// Items the client rewrote (index → generation), checked at the end.
    rewritten: std::collections::HashMap<u64, u64>,
}

/// Keeps one connection busy until `stop`: gets of pseudo-random items (checked) and, every
/// eighth request, a rewrite of one; the longest time between two answered requests is the gap.
fn load_client(mut c: Conn, stop: Arc<AtomicBool>, done: Arc<AtomicU64>) -> Load {
    let mut l = Load::default();
    let mut x: u64 = 0x1234_5678_9abc_def1;
    let mut last = Instant::now();
    while !stop.load(Ordering::Relaxed) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let i = x % ITEMS;
        let r = if l.requests % 8 == 7 {
            let generation = l.rewritten.get(&i).copied().unwrap_or(0) + 1;
            let r = c.set(&key(i), &value(i, generation), false);
            if r.is_ok() {
                l.rewritten.insert(i, generation);
            }
            r
        } else {
            let generation = l.rewritten.get(&i).copied().unwrap_or(0);
            match c.get_many(&[key(i)]) {
                Ok(v) if v.len() == 1 && v[0].1 == value(i, generation) => Ok(()),
                Ok(v) if v.is_empty() => Err(format!("{} missing", key(i))),
                Ok(_) => Err(format!("{}: wrong value", key(i))),
                Err(e) => Err(e),
            }
        };
        let now = Instant::now();
        l.max_gap = l.max_gap.max(now - last);
        last = now;
        l.requests += 1;
        done.store(l.requests, Ordering::Relaxed);
        if let Err(e) = r {
            l.errors.push(format!("request {}: {e}", l.requests));
            if l.errors.len() > 10 {
                break;
            }
        }
    }
    l
}

fn migrate_memcached(mode: &str, src_args: &[&str]) {
    if !root::can_run() {
        return;
    }
    let Some(bin) = memcached_bin() else {
        return;
    };
    let dir = criu::TestDir::new(&format!("memcached-{mode}"));
    let bed = netmig::testbed(if mode == "lazy" { 81 } else { 82 });
    let net = ServiceNet::new(if mode == "lazy" { 2 } else { 3 });
    let mut started = Started::default();
    let mut cmd = std::process::Command::new("nsenter");
    cmd.arg(format!("--net={}", net.svc.path()))
        .args(["unshare", "-p", "-f", "setsid"])
        .arg(&bin)
        .args([
            "-u",
            "root",
            "-m",
            "1024",
            "-p",
            &PORT.to_string(),
            "-U",
            "0",
            "-t",
            "4",
        ])
        .args(["-l", &net.svc_ip])
        .current_dir(dir.path());
    // memcached has no ready file: connect() below retries until it listens.
    let pid = netmig::start_init(cmd, None, &mut started);
    let mut c = connect(&net);
    let t0 = Instant::now();
    load(&mut c);
    eprintln!(
        "loaded {ITEMS} items of {VALUE} bytes in {:?}",
        t0.elapsed()
    );
    let rss_kib: u64 = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        })
        .unwrap_or(0);
    eprintln!("memcached pid {pid}: VmRSS {} MiB", rss_kib / 1024);
    assert!(rss_kib >= 512 * 1024, "memcached holds only {rss_kib} KiB");

    let stop = Arc::new(AtomicBool::new(false));
    let done = Arc::new(AtomicU64::new(0));
    let lc = connect(&net);
    let client = {
        let (stop, done) = (stop.clone(), done.clone());
        std::thread::spawn(move || load_client(lc, stop, done))
    };
    std::thread::sleep(Duration::from_secs(1));
    let mover = net.spawn_mover(&bed.netns, bed.dir.join("dst"), stop.clone());
    let mut args: Vec<String> = vec!["--criu-opt=--tcp-established".into()];
    args.extend(src_args.iter().map(|s| s.to_string()));
    let out = netmig::migrate(&bed, pid, &args, &[net.dst_arg()], Duration::from_secs(180));
    if !out.ok() {
        stop.store(true, Ordering::Relaxed);
        panic!("memcached migration ({mode}) failed: {}", out.explain());
    }
    mover.join().unwrap().expect("outer veth");
    let restored = out.restored_pid.expect("restore pidfile");
    started.pids.push(restored);
    let at_end = done.load(Ordering::Relaxed);
    std::thread::sleep(Duration::from_secs(2));
    stop.store(true, Ordering::Relaxed);
    let load = client.join().expect("load client");
    let after = load.requests - at_end;
    assert!(
        alive(restored) && !alive(pid),
        "memcached must run at dst only"
    );

    // Every item, on the connection that was open before the migration.
    let t1 = Instant::now();
    let (checked, problems) = verify_all(&mut c, &load.rewritten);
    let felt_ms = load.max_gap.as_secs_f64() * 1e3;
    let downtime = out.dst_json["downtime_ms"].as_f64().unwrap_or(f64::NAN);
    println!(
        "FIGURES memcached {mode}: items {checked}/{ITEMS} ({} MiB of values) checked in {:?}, \
         client requests {} (errors {}), longest client gap {felt_ms:.1} ms, pageserv downtime \
         {downtime:.1} ms, lazy pages {}, on demand {}, migration {:.1} s",
        (ITEMS * VALUE as u64) >> 20,
        t1.elapsed(),
        load.requests,
        load.errors.len(),
        out.dst_json["lazy_pages"],
        out.dst_json["pages_on_demand"],
        out.elapsed.as_secs_f64()
    );
    assert!(load.errors.is_empty(), "client errors: {:?}", load.errors);
    assert!(problems.is_empty(), "items wrong at dst: {problems:?}");
    assert_eq!(checked, ITEMS);
    assert!(
        after > 100,
        "the client's connection stalled after the migration: {after} requests in 2 s"
    );
    assert!(
        out.dst_json["lazy_pages"].as_u64().unwrap_or(0) > 0,
        "{}",
        out.dst_json
    );
}

#[test]
fn memcached_512_mib_under_load_lazy() {
    migrate_memcached("lazy", &[]);
}

#[test]
fn memcached_512_mib_under_load_pre_copy_and_lazy() {
    migrate_memcached("pre-copy", &["--pre-copy=2"]);
}
