//! The page-server codec against real CRIU, 4.1.x or 4.2.x in its own header layout (needs root
//! and CRIU; skips with a printed reason when CRIU is absent).
//!
//! - `dump_session_decodes`: `criu dump --page-server` sends a whole dump to our listener, which
//!   answers with the server-side encoders; every frame must decode and the pages must match what
//!   the holder process wrote.
//! - `lazy_get_*`: `criu dump --lazy-pages` serves GETs from `GetClient`, over TCP and over a
//!   socketpair (`--ps-socket`), with throughput measurements; and what happens on a GET for an
//!   address the dump does not serve.
//!
//! The holder process is this test binary re-executed (`holder_entry` with `PAGESERV_PS_HOLDER`
//! set) as init of its own pid namespace.

use std::collections::BTreeMap;
use std::fs;
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use bytes::BytesMut;
use pageserv::criu::PeFlags;
use pageserv::criu::page_server::{
    ClientEvent, GetClient, Header, Layout, PagemapId, PagemapKind, ServerDecoder, ServerEvent,
    encode_close_reply, encode_open2_reply, encode_parent_reply,
};
use pageserv::pages::PAGE_SIZE;
use prost::Message;

const HOLDER_ENV: &str = "PAGESERV_PS_HOLDER";
/// Set: the holder parks its thread on a page-aligned stack pointer (see `eager_dump_is_seen`).
const ALIGNED_SP_ENV: &str = "PAGESERV_PS_HOLDER_ALIGNED_SP";
/// The holder's region: 32 MiB of private anonymous memory.
const REGION_PAGES: u64 = 8192;
/// The first 28 MiB are written completely (long runs, for clamping and throughput); in the last
/// 4 MiB every fourth page stays untouched (absent pages must not be dumped).
const FULL_PAGES: u64 = 7168;
/// The header layout of the CRIU under test (4.1's 24 bytes or 4.2's 32).
fn layout() -> Layout {
    static L: std::sync::OnceLock<Layout> = std::sync::OnceLock::new();
    *L.get_or_init(|| {
        let bin = find_criu().expect("CRIU (setup checked it)");
        pageserv::criu::binary::Criu::at(&bin)
            .expect("CRIU version")
            .layout()
    })
}
const TIMEOUT: Duration = Duration::from_secs(60);
/// fd numbers CRIU gets for `--status-fd` and `--ps-socket`.
const STATUS_FD: i32 = 100;
const PS_SOCKET_FD: i32 = 101;

/// One CRIU dump at a time: they freeze and infect processes, and the throughput numbers are
/// only meaningful without a second dump competing for the 2 cores.
static SERIAL: Mutex<()> = Mutex::new(());

fn page_written(i: u64) -> bool {
    i < FULL_PAGES || i % 4 != 3
}

fn written_pages() -> u64 {
    (0..REGION_PAGES).filter(|&i| page_written(i)).count() as u64
}

/// The holder's bytes for page `i` of its region: every 8-byte word is distinct.
fn pattern_page(i: u64) -> Vec<u8> {
    (0..PAGE_SIZE / 8)
        .flat_map(|w| (0x5053_0000_0000_0000u64 ^ (i << 16) ^ w).to_le_bytes())
        .collect()
}

/// Not a test: the holder process, run by `Holder::spawn` with `HOLDER_ENV` set.
#[test]
#[ignore = "the holder process of the other tests; Holder::spawn runs it"]
fn holder_entry() {
    let Ok(ready) = std::env::var(HOLDER_ENV) else {
        return;
    };
    let len = (REGION_PAGES * PAGE_SIZE) as usize;
    // SAFETY: a fresh private anonymous mapping, only written through `region` below.
    let addr = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
            -1,
            0,
        )
    };
    assert_ne!(addr, libc::MAP_FAILED);
    // Huge pages would make untouched pages resident; the test counts pages exactly.
    // SAFETY: advising the mapping just created.
    unsafe { libc::madvise(addr, len, libc::MADV_NOHUGEPAGE) };
    // SAFETY: the mapping is `len` bytes, readable and writable, and nothing else aliases it.
    let region = unsafe { std::slice::from_raw_parts_mut(addr as *mut u8, len) };
    for i in (0..REGION_PAGES).filter(|&i| page_written(i)) {
        let o = (i * PAGE_SIZE) as usize;
        region[o..o + PAGE_SIZE as usize].copy_from_slice(&pattern_page(i));
    }
    let tmp = format!("{ready}.tmp");
    fs::write(&tmp, format!("{:#x}\n", addr as u64)).unwrap();
    fs::rename(&tmp, &ready).unwrap();
    #[cfg(target_arch = "x86_64")]
    if std::env::var_os(ALIGNED_SP_ENV).is_some() {
        park_on_page_aligned_stack();
    }
    loop {
        std::thread::sleep(Duration::from_secs(3600));
    }
}

/// Blocks this thread in pause(2) with its stack pointer exactly on a page boundary, as the
/// freeze of a dump may find a thread by chance.
#[cfg(target_arch = "x86_64")]
fn park_on_page_aligned_stack() -> ! {
    #[repr(C, align(4096))]
    struct Stack([u8; 1 << 16]);
    static mut STACK: Stack = Stack([0; 1 << 16]);
    let top = std::ptr::addr_of_mut!(STACK) as usize + (1 << 16);
    // SAFETY: the thread never returns or touches its old stack; the new one is ours alone and
    // the loop only makes the pause syscall (34), which needs no stack.
    unsafe {
        std::arch::asm!(
            "mov rsp, {top}",
            "2:",
            "mov eax, 34",
            "syscall",
            "jmp 2b",
            top = in(reg) top,
            options(noreturn)
        )
    }
}

// ----- environment -------------------------------------------------------------------------------

fn find_criu() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("PAGESERV_CRIU") {
        return Some(PathBuf::from(p));
    }
    let opt = PathBuf::from("/opt/pageserv/criu/bin/criu");
    if opt.exists() {
        return Some(opt);
    }
    std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|d| d.join("criu"))
            .find(|p| p.exists())
    })
}

/// CRIU, root and a large enough pipe-max-size, or `None` after printing why the test skips.
fn setup(test: &str) -> Option<PathBuf> {
    let Some(criu) = find_criu() else {
        eprintln!(
            "SKIP {test}: CRIU not found ($PAGESERV_CRIU, /opt/pageserv/criu/bin/criu, PATH)"
        );
        return None;
    };
    // SAFETY: geteuid has no preconditions.
    assert_eq!(
        unsafe { libc::geteuid() },
        0,
        "{test} needs root to run CRIU"
    );
    let max: u64 = fs::read_to_string("/proc/sys/fs/pipe-max-size")
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    if max < 8_388_608 {
        fs::write("/proc/sys/fs/pipe-max-size", "8388608").unwrap();
    }
    Some(criu)
}

fn scratch_dir(tag: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("pageserv-psreal-{}-{tag}", std::process::id()));
    let _ = fs::remove_dir_all(&dir);
    fs::create_dir_all(&dir).unwrap();
    dir
}

/// The holder: init of its own pid namespace, region written, waiting to be dumped.
struct Holder {
    unshare: Child,
    /// Host pid (for `criu dump -t`).
    pid: i32,
    /// Pid inside its namespace (what the images and GET's dst_id use).
    vpid: u32,
    region: u64,
}

impl Holder {
    fn spawn(dir: &Path) -> Holder {
        Holder::spawn_with(dir, false)
    }

    fn spawn_with(dir: &Path, aligned_sp: bool) -> Holder {
        let ready = dir.join("holder.ready");
        let exe = std::env::current_exe().unwrap();
        // No --mount-proc: a private mount namespace makes CRIU dump the mount table, which fails
        // on this host whenever some /run/netns/* nsfs mount exists ("doesn't have a proper root
        // mount"). Sharing our mount namespace keeps mounts out of the dump.
        let unshare = Command::new("unshare")
            .args(["-p", "-f", "setsid"])
            .arg(&exe)
            .args([
                "--exact",
                "holder_entry",
                "--ignored",
                "--test-threads=1",
                "--nocapture",
            ])
            .env(HOLDER_ENV, &ready)
            .envs(aligned_sp.then_some((ALIGNED_SP_ENV, "1")))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let mut holder = Holder {
            unshare,
            pid: 0,
            vpid: 0,
            region: 0,
        };
        let deadline = Instant::now() + TIMEOUT;
        while !ready.exists() {
            assert!(
                Instant::now() < deadline,
                "holder did not get ready in {TIMEOUT:?}"
            );
            if let Some(st) = holder.unshare.try_wait().unwrap() {
                panic!("holder exited early: {st}");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let text = fs::read_to_string(&ready).unwrap();
        holder.region = u64::from_str_radix(text.trim().trim_start_matches("0x"), 16).unwrap();
        let up = holder.unshare.id();
        let children = fs::read_to_string(format!("/proc/{up}/task/{up}/children")).unwrap();
        holder.pid = children.split_whitespace().next().unwrap().parse().unwrap();
        let status = fs::read_to_string(format!("/proc/{}/status", holder.pid)).unwrap();
        let nspid = status.lines().find(|l| l.starts_with("NSpid:")).unwrap();
        holder.vpid = nspid.split_whitespace().last().unwrap().parse().unwrap();
        holder
    }

    /// Resident private anonymous pages per /proc/PID/smaps: (in the region, in the process).
    fn anon_pages(&self) -> (u64, u64) {
        let smaps = fs::read_to_string(format!("/proc/{}/smaps", self.pid)).unwrap();
        let (mut in_region, mut total, mut cur_is_region) = (0, 0, false);
        for line in smaps.lines() {
            let mut f = line.split_whitespace();
            match f.next() {
                Some(range) if range.contains('-') && !range.ends_with(':') => {
                    let start = range.split('-').next().unwrap();
                    cur_is_region = u64::from_str_radix(start, 16).unwrap() == self.region;
                }
                Some("Anonymous:") => {
                    let kb: u64 = f.next().unwrap().parse().unwrap();
                    total += kb / 4;
                    if cur_is_region {
                        in_region += kb / 4;
                    }
                }
                _ => {}
            }
        }
        (in_region, total)
    }

    fn region_page(&self, vaddr: u64) -> Option<u64> {
        let i = vaddr.checked_sub(self.region)? / PAGE_SIZE;
        (i < REGION_PAGES).then_some(i)
    }
}

impl Drop for Holder {
    fn drop(&mut self) {
        if self.pid > 0 {
            // SAFETY: signalling a pid we started; it is ours even if it has exited (unshare,
            // its parent, has not reaped it until we wait below).
            unsafe { libc::kill(self.pid, libc::SIGKILL) };
        }
        let _ = self.unshare.kill();
        let _ = self.unshare.wait();
    }
}

fn wait_timeout(child: &mut Child, timeout: Duration) -> Option<ExitStatus> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(st) = child.try_wait().unwrap() {
            return Some(st);
        }
        if Instant::now() >= deadline {
            return None;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn log_tail(dir: &Path) -> String {
    let log = fs::read_to_string(dir.join("dump.log")).unwrap_or_default();
    let lines: Vec<&str> = log.lines().collect();
    lines[lines.len().saturating_sub(40)..].join("\n")
}

/// Starts `criu dump -t PID -D DIR -o dump.log -v4 EXTRA...`, passing `fds` as (our fd, its
/// number in CRIU).
fn spawn_dump(
    criu: &Path,
    holder: &Holder,
    dir: &Path,
    extra: &[String],
    fds: &[(i32, i32)],
) -> Child {
    let mut cmd = Command::new(criu);
    cmd.arg("dump")
        .args(["-t", &holder.pid.to_string(), "-D"])
        .arg(dir)
        .args(["-o", "dump.log", "-v4"])
        .args(extra)
        .stdin(Stdio::null())
        .stdout(fs::File::create(dir.join("dump.out")).unwrap())
        .stderr(fs::File::create(dir.join("dump.err")).unwrap());
    let fds = fds.to_vec();
    // SAFETY: only dup2, which is async-signal-safe, between fork and exec.
    unsafe {
        cmd.pre_exec(move || {
            for &(from, to) in &fds {
                if libc::dup2(from, to) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
            }
            Ok(())
        });
    }
    cmd.spawn().unwrap()
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A pipe whose read end we keep (CLOEXEC) and whose write end CRIU gets as `STATUS_FD`.
fn status_pipe() -> (OwnedFd, OwnedFd) {
    nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).unwrap()
}

/// Waits for CRIU's status byte; `Err` with the reason if it does not come.
fn wait_status(read: OwnedFd, dump: &mut Child, dir: &Path) {
    let mut f = fs::File::from(read);
    let deadline = Instant::now() + TIMEOUT;
    let fd = f.as_raw_fd();
    loop {
        let mut pfd = libc::pollfd {
            fd,
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd.
        let n = unsafe { libc::poll(&mut pfd, 1, 200) };
        if n > 0 {
            break;
        }
        if let Some(st) = dump.try_wait().unwrap() {
            panic!(
                "criu dump exited ({st}) before its status byte:\n{}",
                log_tail(dir)
            );
        }
        assert!(
            Instant::now() < deadline,
            "no status byte in {TIMEOUT:?}:\n{}",
            log_tail(dir)
        );
    }
    let mut b = [0xffu8; 1];
    let n = f.read(&mut b).unwrap();
    assert_eq!(
        (n, b[0]),
        (1, 0),
        "status-fd: expected one 0 byte:\n{}",
        log_tail(dir)
    );
}

// ----- images ------------------------------------------------------------------------------------

#[derive(Debug, Clone, Copy)]
struct Run {
    vaddr: u64,
    nr_pages: u64,
    flags: PeFlags,
}

/// Minimal pagemap-<vpid>.img reader: 8-byte header, PagemapHead, then PagemapEntry records.
fn read_pagemap(path: &Path) -> Vec<Run> {
    let bytes = fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let mut rest = &bytes[8..];
    let mut records = Vec::new();
    while !rest.is_empty() {
        let len = u32::from_le_bytes(rest[..4].try_into().unwrap()) as usize;
        records.push(&rest[4..4 + len]);
        rest = &rest[4 + len..];
    }
    pageserv::pb::criu::PagemapHead::decode(records[0]).unwrap();
    records[1..]
        .iter()
        .map(|r| {
            let e = pageserv::pb::criu::PagemapEntry::decode(*r).unwrap();
            let flags = if e.in_parent == Some(true) {
                PeFlags::PARENT
            } else {
                PeFlags(e.flags.unwrap_or(PeFlags::PRESENT.0))
            };
            Run {
                vaddr: e.vaddr,
                nr_pages: e.nr_pages.unwrap_or(u64::from(e.compat_nr_pages)),
                flags,
            }
        })
        .collect()
}

// ----- (a) dump --page-server into our listener ---------------------------------------------------

#[test]
fn dump_session_decodes() {
    let Some(criu) = setup("dump_session_decodes") else {
        return;
    };
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let dir = scratch_dir("dump");
    let holder = Holder::spawn(&dir);
    let (anon_region, anon_total) = holder.anon_pages();
    assert_eq!(
        anon_region,
        written_pages(),
        "holder's region residency (smaps)"
    );

    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let server = std::thread::spawn(move || serve_dump_session(listener));
    let extra = [
        "--page-server",
        "--address",
        "127.0.0.1",
        "--port",
        &port.to_string(),
    ];
    let mut dump = spawn_dump(&criu, &holder, &dir, &extra.map(String::from), &[]);
    let st = wait_timeout(&mut dump, TIMEOUT).expect("criu dump --page-server did not finish");
    let (session, events) = server.join().unwrap();
    assert!(st.success(), "criu dump failed ({st}):\n{}", log_tail(&dir));

    // The frame sequence: per pagemap, OPEN2 then its ADD_F runs, ascending and disjoint.
    let mut runs: BTreeMap<PagemapId, Vec<Run>> = BTreeMap::new();
    let mut region_data: BTreeMap<u64, Vec<u8>> = BTreeMap::new();
    let (mut current, mut present_total, mut closes) = (None, 0u64, 0);
    for ev in &events {
        match ev {
            ServerEvent::Open { id, want_reply } => {
                assert!(want_reply, "CRIU dump sends OPEN2");
                current = Some(*id);
            }
            ServerEvent::Pages {
                dst,
                vaddr,
                nr_pages,
                flags,
                data,
            } => {
                assert_eq!(Some(*dst), current, "ADD_F for a pagemap not opened");
                let r = runs.entry(*dst).or_default();
                if let Some(prev) = r.last() {
                    let prev_end = prev.vaddr + prev.nr_pages * PAGE_SIZE;
                    assert!(*vaddr >= prev_end, "runs overlap or go backwards");
                }
                r.push(Run {
                    vaddr: *vaddr,
                    nr_pages: *nr_pages,
                    flags: *flags,
                });
                assert_eq!(flags.is_present(), data.is_some());
                if let Some(d) = data {
                    assert_eq!(d.len() as u64, nr_pages * PAGE_SIZE);
                    present_total += nr_pages;
                    if dst.kind == PagemapKind::Pid && dst.id == u64::from(holder.vpid) {
                        for p in 0..*nr_pages {
                            if let Some(i) = holder.region_page(vaddr + p * PAGE_SIZE) {
                                let o = (p * PAGE_SIZE) as usize;
                                region_data.insert(i, d[o..o + PAGE_SIZE as usize].to_vec());
                            }
                        }
                    }
                }
            }
            ServerEvent::Close { force } => {
                assert!(!force, "TCP session ends with CLOSE");
                closes += 1;
            }
            other => panic!("unexpected frame in a dump session: {other:?}"),
        }
    }
    assert_eq!(closes, 1);
    assert!(matches!(events.last(), Some(ServerEvent::Close { .. })));
    assert!(present_total > 0);
    let holder_pagemap = PagemapId {
        kind: PagemapKind::Pid,
        id: u64::from(holder.vpid),
    };
    let mine = runs.get(&holder_pagemap).expect("holder's pagemap");
    // A normal dump transfers every page; lazy-capable ones are flagged LAZY|PRESENT.
    for r in mine {
        let ok = r.flags == PeFlags::PRESENT || r.flags == PeFlags::LAZY | PeFlags::PRESENT;
        assert!(ok, "flags {:?} at {:#x}+{}", r.flags, r.vaddr, r.nr_pages);
    }
    let region_runs = mine
        .iter()
        .filter(|r| holder.region_page(r.vaddr).is_some())
        .count();
    assert_eq!(
        region_data.len() as u64,
        written_pages(),
        "PRESENT pages in the holder's region"
    );
    for (i, data) in &region_data {
        assert!(
            page_written(*i),
            "page {i} was never written but was dumped"
        );
        assert!(
            *data == pattern_page(*i),
            "page {i} differs from the pattern"
        );
    }
    eprintln!(
        "dump session: {} bytes, {} frames; pagemaps {:?}; {present_total} PRESENT pages in total \
         (smaps Anonymous of the holder: {anon_total} pages); region: {} pages in {region_runs} runs",
        session.len(),
        events.len(),
        runs.keys().collect::<Vec<_>>(),
        region_data.len()
    );

    save_session_seed(&session);
    fs::remove_dir_all(&dir).unwrap();
}

/// Accepts one `criu dump --page-server` connection, answers like a page server without a parent
/// image set, and returns the raw session bytes and the decoded frames.
fn serve_dump_session(listener: TcpListener) -> (Vec<u8>, Vec<ServerEvent>) {
    listener.set_nonblocking(false).unwrap();
    let (mut sock, _) = listener.accept().unwrap();
    sock.set_read_timeout(Some(TIMEOUT)).unwrap();
    let mut dec = ServerDecoder::new(layout());
    let (mut session, mut events, mut buf) = (Vec::new(), Vec::new(), vec![0u8; 1 << 16]);
    loop {
        let n = sock.read(&mut buf).expect("reading the dump session");
        if n == 0 {
            dec.on_eof().expect("dump session ended cleanly");
            return (session, events);
        }
        session.extend_from_slice(&buf[..n]);
        dec.feed(&buf[..n]);
        while let Some(ev) = dec.poll().expect("decoding the dump session") {
            let mut reply = BytesMut::new();
            match &ev {
                ServerEvent::Open {
                    want_reply: true, ..
                } => encode_open2_reply(false, &mut reply),
                ServerEvent::Parent { .. } => encode_parent_reply(false, &mut reply),
                ServerEvent::Close { .. } => encode_close_reply(&mut reply),
                _ => {}
            }
            sock.write_all(&reply).unwrap();
            events.push(ev);
        }
    }
}

/// Stores the session (or a prefix cut at a frame boundary, with CLOSE appended, if it is over
/// 2 MiB) as a fuzz seed when `PAGESERV_SAVE_SESSION` is set; always checks the stored seed still
/// decodes.
fn save_session_seed(session: &[u8]) {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/ps-dump-session.bin");
    // The committed seed was recorded from CRIU 4.1.1: it is replayed (and re-recorded) only
    // in that layout.
    if std::env::var_os("PAGESERV_SAVE_SESSION").is_some() && layout() == Layout::V41 {
        let limit = 2 << 20;
        let seed = if session.len() < limit {
            session.to_vec()
        } else {
            let mut dec = ServerDecoder::new(layout());
            let mut cut = 0;
            for chunk in session.chunks(4096) {
                dec.feed(chunk);
                while dec.poll().unwrap().is_some() {
                    if dec.offset() as usize <= limit - layout().header_len() {
                        cut = dec.offset() as usize;
                    }
                }
            }
            let mut seed = session[..cut].to_vec();
            let mut close = BytesMut::new();
            GetClient::new(layout()).close(false, &mut close).unwrap();
            seed.extend_from_slice(&close);
            seed
        };
        fs::create_dir_all(path.parent().unwrap()).unwrap();
        fs::write(&path, &seed).unwrap();
        eprintln!(
            "saved {} bytes of session to {}",
            seed.len(),
            path.display()
        );
    }
    if let Ok(seed) = fs::read(&path) {
        let mut dec = ServerDecoder::new(Layout::V41);
        dec.feed(&seed);
        while dec.poll().unwrap().is_some() {}
        dec.on_eof().unwrap();
    }
}

// ----- (b) lazy GET -------------------------------------------------------------------------------

/// Either transport CRIU can serve GETs on.
enum Conn {
    Tcp(TcpStream),
    Unix(UnixStream),
}

impl Conn {
    fn write_all(&mut self, b: &[u8]) {
        match self {
            Conn::Tcp(s) => s.write_all(b).unwrap(),
            Conn::Unix(s) => s.write_all(b).unwrap(),
        }
    }
    fn read(&mut self, b: &mut [u8]) -> std::io::Result<usize> {
        match self {
            Conn::Tcp(s) => s.read(b),
            Conn::Unix(s) => s.read(b),
        }
    }
    fn set_timeout(&self, t: Duration) {
        match self {
            Conn::Tcp(s) => s.set_read_timeout(Some(t)).unwrap(),
            Conn::Unix(s) => s.set_read_timeout(Some(t)).unwrap(),
        }
    }
}

/// A lazy dump of a fresh holder, status byte received, connected.
struct LazySession {
    dir: PathBuf,
    holder: Holder,
    dump: Child,
    conn: Conn,
    client: GetClient,
    runs: Vec<Run>,
    scratch: Vec<u8>,
}

impl LazySession {
    fn start(criu: &Path, tag: &str, unix: bool) -> LazySession {
        LazySession::start_with(criu, tag, unix, false)
    }

    fn start_with(criu: &Path, tag: &str, unix: bool, aligned_sp: bool) -> LazySession {
        let dir = scratch_dir(tag);
        let holder = Holder::spawn_with(&dir, aligned_sp);
        let (status_r, status_w) = status_pipe();
        let mut extra = vec![
            "--lazy-pages".to_string(),
            "--status-fd".into(),
            STATUS_FD.to_string(),
        ];
        let mut fds = vec![(status_w.as_raw_fd(), STATUS_FD)];
        let (conn, port, theirs) = if unix {
            let (ours, theirs) = UnixStream::pair().unwrap();
            extra.extend(["--ps-socket".into(), PS_SOCKET_FD.to_string()]);
            fds.push((theirs.as_raw_fd(), PS_SOCKET_FD));
            (Some(Conn::Unix(ours)), 0, Some(theirs))
        } else {
            let port = free_port();
            extra.extend([
                "--address".into(),
                "127.0.0.1".into(),
                "--port".into(),
                port.to_string(),
            ]);
            (None, port, None)
        };
        let mut dump = spawn_dump(criu, &holder, &dir, &extra, &fds);
        drop(status_w);
        drop(theirs);
        wait_status(status_r, &mut dump, &dir);
        let conn =
            conn.unwrap_or_else(|| Conn::Tcp(TcpStream::connect(("127.0.0.1", port)).unwrap()));
        conn.set_timeout(TIMEOUT);
        let runs = read_pagemap(&dir.join(format!("pagemap-{}.img", holder.vpid)));
        LazySession {
            dir,
            holder,
            dump,
            conn,
            client: GetClient::new(layout()),
            runs,
            scratch: vec![0; 1 << 18],
        }
    }

    fn lazy_region_runs(&self) -> Vec<Run> {
        self.runs
            .iter()
            .filter(|r| r.flags.is_lazy() && self.holder.region_page(r.vaddr).is_some())
            .copied()
            .collect()
    }

    fn send_get(&mut self, vaddr: u64, nr_pages: u64) {
        let mut out = BytesMut::new();
        self.client
            .request(self.holder.vpid, vaddr, nr_pages, &mut out)
            .unwrap();
        self.conn.write_all(&out);
    }

    /// Reads until the next event; `Err` carries the read error or the EOF diagnosis.
    fn next_event(&mut self) -> Result<ClientEvent, String> {
        loop {
            if let Some(ev) = self.client.poll().map_err(|e| e.to_string())? {
                return Ok(ev);
            }
            match self.conn.read(&mut self.scratch) {
                Ok(0) => return Err(self.client.on_eof().unwrap_err().to_string()),
                Ok(n) => self.client.feed(&self.scratch[..n]),
                Err(e) => return Err(format!("read: {e}")),
            }
        }
    }

    fn next_pages(&mut self) -> pageserv::criu::page_server::GetReply {
        match self.next_event() {
            Ok(ClientEvent::Pages(r)) => r,
            other => panic!("expected pages, got {other:?}\n{}", log_tail(&self.dir)),
        }
    }

    fn check_pattern(&self, vaddr: u64, data: &[u8]) {
        for (p, page) in data.chunks(PAGE_SIZE as usize).enumerate() {
            let i = self
                .holder
                .region_page(vaddr + p as u64 * PAGE_SIZE)
                .expect("page in region");
            assert!(
                page == pattern_page(i),
                "GET data for region page {i} differs from the pattern"
            );
        }
    }

    /// GETs of `size` pages tiling every lazy run in the region's fully written part.
    fn tiling(&self, size: u64) -> Vec<(u64, u64)> {
        let full_end = self.holder.region + FULL_PAGES * PAGE_SIZE;
        let mut reqs = Vec::new();
        for r in self
            .lazy_region_runs()
            .iter()
            .filter(|r| r.vaddr < full_end)
        {
            let end = (r.vaddr + r.nr_pages * PAGE_SIZE).min(full_end);
            let mut v = r.vaddr;
            while v < end {
                let n = size.min((end - v) / PAGE_SIZE);
                reqs.push((v, n));
                v += n * PAGE_SIZE;
            }
        }
        reqs
    }

    /// Runs `reqs` with `window` GETs in flight, repeating the list until at least 0.5 s have
    /// passed (at most 50 times). Returns (MiB/s, requests/s).
    fn throughput(&mut self, reqs: &[(u64, u64)], window: usize) -> (f64, f64) {
        let t = Instant::now();
        let (mut bytes, mut count) = (0u64, 0u64);
        for _ in 0..50 {
            let (mut next, mut done, mut out) = (0, 0, BytesMut::new());
            while done < reqs.len() {
                while next < reqs.len() && self.client.outstanding() < window {
                    let (v, n) = reqs[next];
                    self.client
                        .request(self.holder.vpid, v, n, &mut out)
                        .unwrap();
                    next += 1;
                }
                if !out.is_empty() {
                    self.conn.write_all(&out);
                    out.clear();
                }
                let r = self.next_pages();
                let (v, n) = reqs[done];
                assert_eq!(
                    (r.vaddr, r.nr_pages),
                    (v, n),
                    "reply in request order, unclamped"
                );
                // A cheap spot check; the full pattern is verified in check_gets.
                let i = self.holder.region_page(v).unwrap();
                assert_eq!(r.data[..8], pattern_page(i)[..8]);
                bytes += r.data.len() as u64;
                done += 1;
            }
            count += reqs.len() as u64;
            if t.elapsed() >= Duration::from_millis(500) {
                break;
            }
        }
        let secs = t.elapsed().as_secs_f64();
        (bytes as f64 / (1 << 20) as f64 / secs, count as f64 / secs)
    }

    fn close_and_finish(mut self, force: bool) {
        let mut out = BytesMut::new();
        self.client.close(force, &mut out).unwrap();
        self.conn.write_all(&out);
        assert_eq!(self.next_event(), Ok(ClientEvent::Closed));
        drop(self.conn);
        let st = wait_timeout(&mut self.dump, TIMEOUT).expect("lazy dump did not exit after CLOSE");
        assert!(
            st.success(),
            "lazy dump exited with {st}:\n{}",
            log_tail(&self.dir)
        );
        let _ = fs::remove_dir_all(&self.dir);
    }
}

/// Correctness of pipelined GETs against the real server, with clamping and repeated pages.
fn check_gets(s: &mut LazySession) {
    let lazy = s.lazy_region_runs();
    let covered: u64 = lazy.iter().map(|r| r.nr_pages).sum();
    assert_eq!(
        covered,
        written_pages(),
        "lazy pages in the region = pages the holder wrote"
    );
    let big = *lazy.iter().max_by_key(|r| r.nr_pages).unwrap();
    assert!(big.nr_pages >= 4, "expected a long lazy run, got {big:?}");
    let tail = big.vaddr + (big.nr_pages - 2) * PAGE_SIZE;

    // Pipeline: every lazy run whole, a GET past the end of the longest run (CRIU clamps it),
    // the same page twice in a row, then its first page again.
    let mut expect = Vec::new();
    for r in &lazy {
        s.send_get(r.vaddr, r.nr_pages);
        expect.push((r.vaddr, r.nr_pages));
    }
    s.send_get(tail, 10);
    expect.push((tail, 2));
    for _ in 0..2 {
        s.send_get(big.vaddr + PAGE_SIZE, 1);
        expect.push((big.vaddr + PAGE_SIZE, 1));
    }
    s.send_get(big.vaddr, 1);
    expect.push((big.vaddr, 1));
    assert_eq!(s.client.outstanding(), expect.len());
    for (vaddr, nr) in expect {
        let r = s.next_pages();
        assert_eq!((r.vaddr, r.nr_pages), (vaddr, nr), "reply order / clamp");
        s.check_pattern(r.vaddr, &r.data);
    }
    eprintln!(
        "lazy GET check: {} lazy runs in the region ({} pages, longest {} pages); GET of 10 pages \
         2 pages before a run end came back with 2",
        lazy.len(),
        covered,
        big.nr_pages
    );
}

fn measure(s: &mut LazySession, transport: &str) {
    for window in [1, 8] {
        for size in [1, 16, 256, 1024] {
            let reqs = s.tiling(size);
            let (mibs, rps) = s.throughput(&reqs, window);
            eprintln!(
                "GET throughput {transport} window {window}: {size:>4}-page requests: \
                 {mibs:7.1} MiB/s ({rps:7.0} req/s)"
            );
        }
    }
    // CRIU tee()s everything in front of vaddr in its pipe and splices it to /dev/null, so a
    // small GET should cost more the further into its page-pipe buffer it starts.
    let long: Vec<Run> = s
        .lazy_region_runs()
        .into_iter()
        .filter(|r| r.nr_pages >= 1024)
        .collect();
    let first: Vec<(u64, u64)> = long.iter().map(|r| (r.vaddr, 1)).collect();
    let last: Vec<(u64, u64)> = long
        .iter()
        .map(|r| (r.vaddr + (r.nr_pages - 1) * PAGE_SIZE, 1))
        .collect();
    let (_, rps_first) = s.throughput(&first, 8);
    let (_, rps_last) = s.throughput(&last, 8);
    eprintln!(
        "GET 1-page {transport} window 8: first page of a 1024-page run {rps_first:7.0} req/s, \
         last page {rps_last:7.0} req/s"
    );
}

#[test]
fn lazy_get_tcp() {
    let Some(criu) = setup("lazy_get_tcp") else {
        return;
    };
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let mut s = LazySession::start(&criu, "lazy-tcp", false);
    check_gets(&mut s);
    measure(&mut s, "TCP loopback");
    s.close_and_finish(false);
}

#[test]
fn lazy_get_ps_socket() {
    let Some(criu) = setup("lazy_get_ps_socket") else {
        return;
    };
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let mut s = LazySession::start(&criu, "lazy-unix", true);
    check_gets(&mut s);
    measure(&mut s, "AF_UNIX --ps-socket");
    s.close_and_finish(true);
}

/// CRIU 4.1.1 writes a lazy dump eagerly when a thread's stack pointer is page-aligned at the
/// freeze (`source::eager_dump`): the check pageserv runs on its own dumps must see that, and
/// must not see it in an ordinary lazy dump. If the first assertion fails, CRIU's stack-page
/// test has changed: see whether the re-dump in `source::service` is still needed.
#[cfg(target_arch = "x86_64")]
#[test]
fn eager_dump_is_seen() {
    use pageserv::criu::images::ImageDir;
    use pageserv::source::eager_dump::eager_tasks;
    let Some(criu) = setup("eager_dump_is_seen") else {
        return;
    };
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let s = LazySession::start_with(&criu, "eager", true, true);
    assert!(
        s.lazy_region_runs().is_empty(),
        "CRIU kept pages lazy although a stack pointer was page-aligned: {:?}",
        s.runs
    );
    let eager = eager_tasks(&ImageDir::open(&s.dir).unwrap()).unwrap();
    assert_eq!(eager, vec![s.holder.vpid], "eager tasks");
    s.close_and_finish(true);

    let s = LazySession::start(&criu, "not-eager", true);
    assert!(!s.lazy_region_runs().is_empty());
    let eager = eager_tasks(&ImageDir::open(&s.dir).unwrap()).unwrap();
    assert!(eager.is_empty(), "a lazy dump called eager: {eager:?}");
    s.close_and_finish(true);
}

/// A GET for an address the dump does not hold: CRIU ends the session without a reply (§1.9).
#[test]
fn lazy_get_unknown_address_ends_session() {
    let Some(criu) = setup("lazy_get_unknown_address_ends_session") else {
        return;
    };
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let mut s = LazySession::start(&criu, "lazy-unknown", false);
    // First a good GET, so the session is known to work.
    let r = s.lazy_region_runs()[0];
    s.send_get(r.vaddr, 1);
    let good = s.next_pages();
    s.check_pattern(good.vaddr, &good.data);
    s.conn.set_timeout(Duration::from_secs(20));
    s.send_get(0x1000, 1);
    let err = s
        .next_event()
        .expect_err("CRIU must not answer a GET for an unmapped address");
    assert!(err.contains("waiting for the reply to GET pid"), "{err}");
    let st = wait_timeout(&mut s.dump, TIMEOUT).expect("dump did not exit after the failed GET");
    let alive = Path::new(&format!("/proc/{}", s.holder.pid)).exists();
    eprintln!(
        "GET for unmapped 0x1000: session ended ({err}); criu dump exit: {st}; holder alive after: {alive}"
    );
    let _ = fs::remove_dir_all(&s.dir);
}

/// A GET for a page the dump holds but did not mark lazy: CRIU logs "PPB flags mismatch", sends
/// a reply header and then blocks forever in splice (docs §1.9 step 2, gotcha 17). Bounded by a
/// timeout; CRIU is killed afterwards. Pinned to CRIU 4.1.1 behaviour.
#[test]
fn lazy_get_non_lazy_page_hangs_criu() {
    let Some(criu) = setup("lazy_get_non_lazy_page_hangs_criu") else {
        return;
    };
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let mut s = LazySession::start(&criu, "lazy-nonlazy", false);
    let Some(eager) = s.runs.iter().find(|r| r.flags == PeFlags::PRESENT).copied() else {
        panic!("no PRESENT-only run in the lazy dump: {:?}", s.runs);
    };
    s.conn.set_timeout(Duration::from_secs(5));
    s.send_get(eager.vaddr, 1);
    let outcome = s.next_event();
    let buffered = s.client.read_buf().to_vec();
    let still_running = wait_timeout(&mut s.dump, Duration::from_secs(1)).is_none();
    let log = fs::read_to_string(s.dir.join("dump.log")).unwrap_or_default();
    let header = Header::decode_get_reply(layout(), &buffered);
    eprintln!(
        "GET for non-lazy page {:#x}: {outcome:?}; buffered reply header {header:?}; criu still \
         running: {still_running}",
        eager.vaddr
    );
    if still_running {
        let _ = s.dump.kill();
        let _ = s.dump.wait();
    }
    assert!(
        matches!(outcome, Err(ref e) if e.starts_with("read:")),
        "expected a read timeout"
    );
    assert!(
        still_running,
        "criu dump exited instead of hanging:\n{}",
        log_tail(&s.dir)
    );
    assert!(log.contains("PPB flags mismatch"), "{}", log_tail(&s.dir));
    let header = header.expect("a complete reply header");
    assert_eq!((header.vaddr, header.nr_pages), (eager.vaddr, 1));
    assert_eq!(
        buffered.len(),
        layout().header_len(),
        "no page data follows the header"
    );
    let _ = fs::remove_dir_all(&s.dir);
}
