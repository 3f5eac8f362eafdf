//! A small socket service for migration tests: the test binary re-executes itself as a server
//! with a TCP listener and optionally a unix-socket listener, [`SERVER_MIB`] of patterned memory
//! and a request counter. Line protocol, one reply line per request line:
//!
//! - `ping` → `pong N`: N counts every request the server answered, so an answer after the
//!   migration proves the state came along;
//! - `echo K` → `echo K W`: W is a word of memory page K mod pages, which the client can compute
//!   ([`expected_word`]): the answer depends on migrated memory, so a lazy page must arrive;
//! - `check` → `ok PAGES` or `bad PAGE`: the server verifies its whole memory.
//!
//! Include with `#[path = "common/sockserv.rs"] mod sockserv;` (needs `mod criu` too).
#![allow(dead_code)]

use std::io::{BufRead, BufReader, Write};
use std::net::TcpListener;
use std::os::unix::net::UnixListener;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

pub const SERVER_ENV: &str = "PAGESERV_TEST_SOCKSRV";
pub const SERVER_MIB: u64 = 64;
const PAGE: u64 = 4096;

/// Word `w` of page `i`.
pub fn pattern(i: u64, w: u64) -> u64 {
    (i.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ 0x736f_636b).rotate_left((w % 64) as u32) ^ w
}

/// `K [PAD]` of an `echo` request.
fn parse_echo(rest: &str) -> Option<(u64, &str)> {
    let (k, pad) = rest.split_once(' ').unwrap_or((rest, ""));
    Some((k.parse().ok()?, pad))
}

/// The checksum of an `echo` request's padding the server answers with.
pub fn pad_sum(pad: &str) -> u64 {
    pad.bytes()
        .fold(0u64, |a, b| a.wrapping_mul(31).wrapping_add(u64::from(b)))
}

/// The padding a streaming client sends with request `k` (so both directions carry data that
/// depends on the position in the stream).
pub fn pad_for(k: u64) -> String {
    let n = 16 + (k % 97) as usize;
    (0..n)
        .map(|i| (b'a' + ((k as usize + i * 7) % 26) as u8) as char)
        .collect()
}

/// The reply to `echo K PAD`.
pub fn expected_echo(k: u64, pad: &str) -> String {
    format!("echo {k} {} {}", expected_word(k), pad_sum(pad))
}

/// What `echo K` answers: word 7 of page K mod pages.
pub fn expected_word(k: u64) -> u64 {
    pattern(k % (SERVER_MIB * 256), 7)
}

struct Mem {
    base: *mut u64,
    pages: u64,
}
// SAFETY: the mapping lives for the whole process and is only read after setup.
unsafe impl Send for Mem {}
unsafe impl Sync for Mem {}

impl Mem {
    fn word(&self, i: u64, w: u64) -> u64 {
        // SAFETY: i < pages, w < 512: inside the mapping.
        unsafe { std::ptr::read_volatile(self.base.add((i * PAGE / 8 + w) as usize)) }
    }
    fn check(&self) -> Result<u64, u64> {
        for i in 0..self.pages {
            for w in 0..PAGE / 8 {
                if self.word(i, w) != pattern(i, w) {
                    return Err(i);
                }
            }
        }
        Ok(self.pages)
    }
}

fn serve(stream: impl std::io::Read + Write, mem: &Mem, count: &AtomicU64) {
    let mut reader = BufReader::new(stream);
    let mut line = String::new();
    let mut out = Vec::new();
    loop {
        line.clear();
        match reader.read_line(&mut line) {
            Ok(0) | Err(_) => return,
            Ok(_) => {}
        }
        let n = count.fetch_add(1, Ordering::Relaxed) + 1;
        let req = line.trim();
        out.clear();
        if req == "ping" {
            let _ = writeln!(out, "pong {n}");
        } else if let Some((k, pad)) = req.strip_prefix("echo ").and_then(parse_echo) {
            let _ = writeln!(
                out,
                "echo {k} {} {}",
                mem.word(k % mem.pages, 7),
                pad_sum(pad)
            );
        } else if req == "check" {
            match mem.check() {
                Ok(p) => {
                    let _ = writeln!(out, "ok {p}");
                }
                Err(p) => {
                    let _ = writeln!(out, "bad {p}");
                }
            }
        } else {
            let _ = writeln!(out, "what {req}");
        }
        if reader.get_mut().write_all(&out).is_err() {
            return;
        }
    }
}

/// In a process started by [`spawn`], becomes the server and never returns.
pub fn run_if_requested() {
    let Some(ready) = std::env::var_os(SERVER_ENV) else {
        return;
    };
    let tcp_addr = std::env::var("SOCKSRV_TCP").expect("SOCKSRV_TCP");
    let unix_path = std::env::var_os("SOCKSRV_UNIX");
    let pages = SERVER_MIB * 256;
    let len = (pages * PAGE) as usize;
    // SAFETY: a fresh private anonymous mapping, written only here, within its length.
    let base = unsafe {
        let p = libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
            -1,
            0,
        );
        assert_ne!(p, libc::MAP_FAILED);
        libc::madvise(p, len, libc::MADV_NOHUGEPAGE);
        p as *mut u64
    };
    for i in 0..pages {
        for w in 0..PAGE / 8 {
            // SAFETY: inside the mapping.
            unsafe { base.add((i * PAGE / 8 + w) as usize).write(pattern(i, w)) };
        }
    }
    let mem = Arc::new(Mem { base, pages });
    let count = Arc::new(AtomicU64::new(0));
    let tcp = TcpListener::bind(&tcp_addr).expect("bind tcp");
    {
        let (mem, count) = (mem.clone(), count.clone());
        std::thread::spawn(move || {
            for s in tcp.incoming().flatten() {
                let (mem, count) = (mem.clone(), count.clone());
                std::thread::spawn(move || serve(s, &mem, &count));
            }
        });
    }
    if let Some(p) = unix_path {
        let _ = std::fs::remove_file(&p);
        let unix = UnixListener::bind(&p).expect("bind unix");
        let (mem, count) = (mem.clone(), count.clone());
        std::thread::spawn(move || {
            for s in unix.incoming().flatten() {
                let (mem, count) = (mem.clone(), count.clone());
                std::thread::spawn(move || serve(s, &mem, &count));
            }
        });
    }
    let ready = std::path::PathBuf::from(ready);
    let tmp = ready.with_extension("tmp");
    std::fs::write(&tmp, "ready\n").expect("ready file");
    std::fs::rename(&tmp, &ready).expect("ready file");
    loop {
        std::thread::sleep(Duration::from_secs(3600));
    }
}

/// One request, one reply line, on a fresh or kept connection.
pub fn request(stream: &mut (impl std::io::Read + Write), req: &str) -> Result<String, String> {
    stream
        .write_all(format!("{req}\n").as_bytes())
        .map_err(|e| format!("send {req:?}: {e}"))?;
    let mut reply = Vec::new();
    let mut b = [0u8; 1];
    loop {
        match stream.read(&mut b) {
            Ok(0) => return Err(format!("{req:?}: connection closed before the reply")),
            Ok(_) if b[0] == b'\n' => break,
            Ok(_) => reply.push(b[0]),
            Err(e) => return Err(format!("{req:?}: {e}")),
        }
        if reply.len() > 200 {
            return Err(format!("{req:?}: reply too long"));
        }
    }
    String::from_utf8(reply).map_err(|e| e.to_string())
}

/// Where [`spawn`] starts the server: argv prefix (e.g. `nsenter --net=...`) before `unshare`.
pub fn spawn_cmd(
    prefix: &[String],
    test_name: &str,
    scratch: &Path,
    tcp: &str,
    unix: Option<&Path>,
) -> std::process::Command {
    let exe = std::env::current_exe().expect("current_exe");
    let ready = scratch.join("server.ready");
    let mut cmd = if prefix.is_empty() {
        std::process::Command::new("unshare")
    } else {
        let mut c = std::process::Command::new(&prefix[0]);
        c.args(&prefix[1..]).arg("unshare");
        c
    };
    cmd.args(["-p", "-f", "setsid"])
        .arg(exe)
        .args(["--exact", test_name, "--nocapture", "--test-threads=1"])
        .env(SERVER_ENV, ready)
        .env("SOCKSRV_TCP", tcp)
        .current_dir(scratch);
    if let Some(u) = unix {
        cmd.env("SOCKSRV_UNIX", u);
    }
    cmd
}

/// What a streaming client saw.
#[derive(Debug, Default, Clone)]
pub struct StreamStats {
    /// Requests sent and replies checked (every reply in order, each matching its request).
    pub sent: u64,
    pub replies: u64,
    /// The longest time between two replies: the stall the client felt.
    pub max_gap: Duration,
    pub errors: Vec<String>,
}

/// Streams `echo K PAD` requests (K = 0, 1, 2, ...; at most `window` unanswered) on `stream`
/// until `stop` is set, and checks every reply: in order, no gap, no duplicate, each matching
/// its request (which covers the request bytes too: the reply carries their checksum).
pub fn stream_client(
    stream: std::net::TcpStream,
    stop: Arc<std::sync::atomic::AtomicBool>,
    window: u64,
    acked: Arc<AtomicU64>,
) -> StreamStats {
    use std::sync::atomic::AtomicBool;
    let sent = Arc::new(AtomicU64::new(0));
    let done_sending = Arc::new(AtomicBool::new(false));
    let _ = stream.set_read_timeout(Some(Duration::from_millis(100)));
    let mut w = stream.try_clone().expect("clone stream");
    let writer = {
        let (acked, sent, stop, done) = (
            acked.clone(),
            sent.clone(),
            stop.clone(),
            done_sending.clone(),
        );
        std::thread::spawn(move || -> Option<String> {
            let mut k = 0u64;
            let r = loop {
                if stop.load(Ordering::Relaxed) {
                    break None;
                }
                if k - acked.load(Ordering::Relaxed) >= window {
                    std::thread::sleep(Duration::from_micros(200));
                    continue;
                }
                let line = format!("echo {k} {}\n", pad_for(k));
                if let Err(e) = w.write_all(line.as_bytes()) {
                    break Some(format!("send {k}: {e}"));
                }
                k += 1;
                sent.store(k, Ordering::Relaxed);
            };
            done.store(true, Ordering::Relaxed);
            r
        })
    };
    let mut stats = StreamStats::default();
    let mut reader = BufReader::new(stream);
    let mut line = String::new();
    let mut last = std::time::Instant::now();
    let mut next = 0u64;
    loop {
        if done_sending.load(Ordering::Relaxed) && next >= sent.load(Ordering::Relaxed) {
            break;
        }
        match reader.read_line(&mut line) {
            Ok(0) => {
                stats
                    .errors
                    .push(format!("connection closed after {next} replies"));
                break;
            }
            Ok(_) if !line.ends_with('\n') => continue,
            Ok(_) => {}
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                if last.elapsed() > Duration::from_secs(60) {
                    stats.errors.push(format!("no reply {next} for 60 s"));
                    break;
                }
                continue;
            }
            Err(e) => {
                stats.errors.push(format!("reading reply {next}: {e}"));
                break;
            }
        }
        let now = std::time::Instant::now();
        stats.max_gap = stats.max_gap.max(now - last);
        last = now;
        let want = expected_echo(next, &pad_for(next));
        if line.trim_end() != want {
            stats.errors.push(format!(
                "reply {next}: got {:?}, want {want:?}",
                line.trim_end()
            ));
            break;
        }
        line.clear();
        next += 1;
        acked.store(next, Ordering::Relaxed);
    }
    stop.store(true, Ordering::Relaxed);
    if let Ok(Some(e)) = writer.join() {
        stats.errors.push(e);
    }
    stats.sent = sent.load(Ordering::Relaxed);
    stats.replies = next;
    stats
}
