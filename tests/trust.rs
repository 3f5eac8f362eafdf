//! Trust between hosts (README, "Security model"), with real certificates from `pageserv
//! keygen`'s code, real QUIC on loopback and a real `pageserv dst` where one is needed:
//! the destination's name as dialled, `--allow-source`, `--deny-cert`, fault and resume
//! connections bound to the identity that opened the migration, private modes, and the source
//! keeper's peer check.

use std::net::SocketAddr;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use pageserv::keys::{self, Identity, Role};
use pageserv::pb::pageserv::control::Msg;
use pageserv::protocol::{self, Role as Hello};
use pageserv::transport::{
    self, FrameReceiver, FrameSender, RefusalReason, RefusedBy, TransportError,
};

fn pageserv() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_pageserv"))
}

fn any_port() -> SocketAddr {
    "127.0.0.1:0".parse().unwrap()
}

fn is_root() -> bool {
    nix::unistd::geteuid().is_root()
}

/// A fresh directory, removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new(name: &str) -> TempDir {
        let p = std::env::temp_dir().join(format!("pageserv-trust-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).unwrap();
        TempDir(p)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// The demo CA with its "src" and "dst" hosts, plus source certificates for `more` names.
fn identities(base: &Path, more: &[&str]) -> (PathBuf, PathBuf) {
    let (src, dst) = keys::demo_identities(&base.join("keys")).unwrap();
    for n in more {
        keys::issue_names(
            &base.join("keys/ca"),
            &[n.to_string()],
            &[Role::Source],
            &base.join("keys").join(n),
        )
        .unwrap();
    }
    (src, dst)
}

fn load(base: &Path, name: &str) -> Identity {
    Identity::load(&base.join("keys").join(name)).unwrap()
}

/// A server that admits one client under `rule` after another, reporting each outcome.
fn spawn_server(
    id: Identity,
    rule: keys::trust::Admission,
) -> (SocketAddr, tokio::task::JoinHandle<()>) {
    let ep = transport::server(any_port(), &id).unwrap();
    let addr = ep.local_addr().unwrap();
    let task = tokio::spawn(async move {
        while let Ok(i) = transport::next_incoming(&ep).await {
            match transport::admit_checked(i, &id, &rule).await {
                Ok((conn, _)) => {
                    tokio::spawn(async move { conn.closed().await });
                }
                Err(e) => eprintln!("server: {e}"),
            }
        }
    });
    (addr, task)
}

#[tokio::test]
async fn the_destination_must_carry_the_name_the_source_dialled() {
    let t = TempDir::new("names");
    let (_, dst) = identities(&t.0, &[]);
    let src = load(&t.0, "src");
    let (addr, server) = spawn_server(Identity::load(&dst).unwrap(), Default::default());

    transport::connect(any_port(), addr, "dst", &src)
        .await
        .expect("the name in its certificate");
    for wrong in ["other.example", "127.0.0.1"] {
        let e = transport::connect(any_port(), addr, wrong, &src)
            .await
            .expect_err(wrong);
        match &e {
            TransportError::Refused(r) => {
                assert_eq!(
                    (r.by, r.reason),
                    (RefusedBy::Us, RefusalReason::WrongServerName)
                )
            }
            other => panic!("{wrong}: expected a name refusal, got {other}"),
        }
        let msg = e.to_string();
        assert!(msg.contains(wrong) && msg.contains("--dst-name"), "{msg}");
    }
    // keygen puts every --name into the certificate, IP addresses as IP addresses.
    keys::issue_names(
        &t.0.join("keys/ca"),
        &["dst2.example".into(), "127.0.0.1".into()],
        &[Role::Destination],
        &t.0.join("keys/dst2"),
    )
    .unwrap();
    server.abort();
    let (addr, _server) = spawn_server(load(&t.0, "dst2"), Default::default());
    for name in ["dst2.example", "127.0.0.1", "pageserv"] {
        transport::connect(any_port(), addr, name, &src)
            .await
            .unwrap_or_else(|e| panic!("{name}: {e}"));
    }
    assert!(
        transport::connect(any_port(), addr, "dst", &src)
            .await
            .is_err(),
        "another destination's name"
    );
}

#[tokio::test]
async fn sources_off_the_allow_list_or_on_the_deny_list_are_refused() {
    let t = TempDir::new("admission");
    let (_, dst) = identities(&t.0, &["src-b", "src-revoked"]);
    let revoked = keys::fingerprint_file(&t.0.join("keys/src-revoked/cert.pem")).unwrap();
    let deny = keys::trust::DenyList::parse(&format!("# revoked 2026-12-05\n{revoked}\n")).unwrap();
    let rule = keys::trust::Admission::new(vec!["src".into(), "src-revoked".into()], deny).unwrap();
    let (addr, _server) = spawn_server(Identity::load(&dst).unwrap(), rule);

    transport::connect(any_port(), addr, "dst", &load(&t.0, "src"))
        .await
        .expect("an allowed source");
    for (who, says) in [
        ("src-b", "source not allowed at this destination"),
        ("src-revoked", "certificate revoked at this destination"),
    ] {
        let e = transport::connect(any_port(), addr, "dst", &load(&t.0, who))
            .await
            .expect_err(who);
        match &e {
            TransportError::RefusedByPolicy { reason, .. } => assert_eq!(reason, says),
            other => panic!("{who}: expected a policy refusal, got {other}"),
        }
    }
}

/// `pageserv dst --keep-serving` on a free loopback port, its log in `log`.
struct Dst(Child);

impl Drop for Dst {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn start_dst(dir: &Path, certs: &Path, extra: &[&str]) -> (Dst, SocketAddr) {
    let port = std::net::UdpSocket::bind("127.0.0.1:0")
        .and_then(|s| s.local_addr())
        .unwrap()
        .port();
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let log = std::fs::File::create(dir.join("dst.log")).unwrap();
    let dst = Dst(Command::new(pageserv())
        .args([
            "dst",
            "--listen",
            &addr.to_string(),
            "--keep-serving",
            "--certs",
        ])
        .arg(certs)
        .arg("--work")
        .arg(dir.join("work"))
        .args(extra)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .expect("start pageserv dst"));
    (dst, addr)
}

async fn wait_up(addr: SocketAddr, id: &Identity) {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let c = tokio::time::timeout(
            Duration::from_secs(2),
            transport::connect(any_port(), addr, "dst", id),
        )
        .await;
        if let Ok(Ok(c)) = c {
            c.close(0u32.into(), b"probe");
            return;
        }
        assert!(Instant::now() < deadline, "pageserv dst did not come up");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// A hand-made source connection: connect as `id` and send a hello of `role` for `mid`.
async fn open(
    addr: SocketAddr,
    id: &Identity,
    role: Hello,
    mid: &str,
) -> (quinn::Connection, FrameSender, FrameReceiver) {
    let conn = transport::connect(any_port(), addr, "dst", id)
        .await
        .unwrap();
    let (s, r) = conn.open_bi().await.unwrap();
    let mut tx = FrameSender::new(s);
    let hello = protocol::hello(role, "4.2.1".into(), mid.into());
    protocol::send_ctl(&mut tx, Msg::Hello(hello))
        .await
        .unwrap();
    (conn, tx, FrameReceiver::new(r))
}

/// Opens migration `mid` as `id`: its control connection, dst's hello read.
async fn open_migration(
    addr: SocketAddr,
    id: &Identity,
    mid: &str,
) -> (quinn::Connection, FrameSender, FrameReceiver) {
    let (conn, tx, mut rx) = open(addr, id, Hello::Src, mid).await;
    match protocol::next_ctl(&mut rx).await.unwrap() {
        Msg::Hello(h) => assert!(protocol::is_dst_answer(&h)),
        other => panic!("dst answered {other:?}"),
    }
    (conn, tx, rx)
}

fn still_open(conn: &quinn::Connection) -> bool {
    conn.close_reason().is_none()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fault_and_resume_connections_must_present_the_migration_s_certificate() {
    if pageserv::criu::binary::Criu::locate(None).is_err() {
        eprintln!("SKIP: pageserv dst needs CRIU to start (tools/setup)");
        return;
    }
    let t = TempDir::new("binding");
    let (src_certs, dst_certs) = identities(&t.0, &["src-b", "src-x", "src-revoked"]);
    let revoked = keys::fingerprint_file(&t.0.join("keys/src-revoked/cert.pem")).unwrap();
    std::fs::write(t.0.join("deny"), format!("{revoked}  # lost laptop\n")).unwrap();
    let deny = t.0.join("deny");
    let (_dst, addr) = start_dst(
        &t.0,
        &dst_certs,
        &[
            "--allow-source",
            "src",
            "--allow-source",
            "src-b",
            "--allow-source",
            "src-revoked",
            "--deny-cert",
            deny.to_str().unwrap(),
        ],
    );
    let a = Identity::load(&src_certs).unwrap();
    let b = load(&t.0, "src-b");
    wait_up(addr, &a).await;

    // --allow-source and --deny-cert, through the command line: short reasons to the peer.
    for (who, says) in [
        ("src-x", "source not allowed"),
        ("src-revoked", "certificate revoked"),
    ] {
        let e = transport::connect(any_port(), addr, "dst", &load(&t.0, who))
            .await
            .expect_err(who);
        assert!(e.to_string().contains(says), "{who}: {e}");
    }

    // A fault connection from another (valid, allowed, source-role) certificate is refused,
    // and the migration goes on with its own.
    let mid = "m1733379000-4242-00112233445566aa";
    let (ctl_a, _tx_a, _rx_a) = open_migration(addr, &a, mid).await;
    let (faults_b, _, _) = open(addr, &b, Hello::SrcFaults, mid).await;
    let closed = tokio::time::timeout(Duration::from_secs(5), faults_b.closed()).await;
    let why = format!("{closed:?}");
    assert!(
        why.contains("another certificate"),
        "the other identity's fault connection must be refused: {why}"
    );
    assert!(
        still_open(&ctl_a),
        "the live control connection is untouched"
    );
    let (faults_a, _, _) = open(addr, &a, Hello::SrcFaults, mid).await;
    // The migration took A's fault connection: it made its (private) directory.
    let work = t.0.join("work");
    let deadline = Instant::now() + Duration::from_secs(5);
    let made = loop {
        let dirs: Vec<_> = std::fs::read_dir(&work)
            .map(|d| d.flatten().map(|e| e.path()).collect())
            .unwrap_or_default();
        if let Some(d) = dirs.into_iter().next() {
            break d;
        }
        assert!(Instant::now() < deadline, "no migration directory appeared");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let mode = std::fs::metadata(&made).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o700, "{}", made.display());
    let name = made.file_name().unwrap().to_string_lossy().into_owned();
    assert_eq!(name, protocol::id_tag(mid), "named by the tag, not the id");
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(
        still_open(&ctl_a) && still_open(&faults_a),
        "A's link is live"
    );

    // A resume from another certificate is refused with a reason; the live migration (which
    // such a resume would have ended) keeps its link.
    let mid2 = "m1733379000-4242-00112233445566bb";
    let (ctl_a2, _tx_a2, _rx_a2) = open_migration(addr, &a, mid2).await;
    let (_resume_b, _tx_b, mut rx_b) = open(addr, &b, Hello::SrcResume, mid2).await;
    match tokio::time::timeout(Duration::from_secs(5), protocol::next_ctl(&mut rx_b)).await {
        Ok(Ok(Msg::Abort(a))) => assert!(a.reason.contains("another certificate"), "{}", a.reason),
        other => panic!("the other identity's resume must be refused: {other:?}"),
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(still_open(&ctl_a2), "the live migration is untouched");
    let (faults_a2, _, _) = open(addr, &a, Hello::SrcFaults, mid2).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(still_open(&ctl_a2) && still_open(&faults_a2));

    let log = std::fs::read_to_string(t.0.join("dst.log")).unwrap();
    assert!(
        log.contains("src-x") && log.contains("--allow-source"),
        "{log}"
    );
    assert!(
        !log.contains(mid) && !log.contains(mid2),
        "ids stay out of the log: {log}"
    );
}

#[test]
fn a_source_refuses_a_destination_not_dialled_or_revoked() {
    if !is_root() || pageserv::criu::binary::Criu::locate(None).is_err() {
        eprintln!("SKIP: needs root and CRIU");
        return;
    }
    let t = TempDir::new("dialled");
    let (src_certs, dst_certs) = identities(&t.0, &[]);
    let (_dst, addr) = start_dst(&t.0, &dst_certs, &[]);
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(wait_up(addr, &Identity::load(&src_certs).unwrap()));
    let mut sleeper = Command::new("sleep");
    sleeper.arg("300");
    // SAFETY: setsid is async-signal-safe. A session of its own: a tree CRIU can dump.
    unsafe {
        std::os::unix::process::CommandExt::pre_exec(&mut sleeper, || {
            libc::setsid();
            Ok(())
        });
    }
    let mut sleeper = sleeper.spawn().unwrap();
    let pid = sleeper.id().to_string();
    // The destination's certificate, revoked at this source (`pageserv src --deny-cert`).
    let fp = keys::fingerprint_file(&dst_certs.join("cert.pem")).unwrap();
    let deny = t.0.join("deny-dst");
    std::fs::write(&deny, format!("# stolen dst key\n{fp}\n")).unwrap();
    let deny = deny.to_str().unwrap().to_string();
    for (name, args, says) in [
        (
            "wrong.example",
            vec!["--dst-name", "wrong.example"],
            "not valid for the name \"wrong.example\"",
        ),
        // An IP literal is checked against the certificate's IP addresses: "dst" has none.
        ("127.0.0.1", vec![], "not valid for the name \"127.0.0.1\""),
        (
            "revoked",
            vec!["--dst-name", "dst", "--deny-cert", deny.as_str()],
            "deny list (--deny-cert)",
        ),
    ] {
        let out = Command::new(pageserv())
            .args([
                "src",
                "--lazy",
                "--to",
                &addr.to_string(),
                "--pid",
                &pid,
                "--certs",
            ])
            .arg(&src_certs)
            .arg("--work")
            .arg(t.0.join("src"))
            .args(&args)
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{name}: {err}");
        assert!(err.contains(says), "{name}: {err}");
        assert!(
            sleeper.try_wait().unwrap().is_none(),
            "the tree was never touched"
        );
    }
    let _ = sleeper.kill();
    let _ = sleeper.wait();
}

#[test]
fn listening_for_a_dump_beyond_loopback_needs_its_peer() {
    let out = Command::new(pageserv())
        .args([
            "src",
            "--stop-and-copy",
            "--listen-page-server",
            "0.0.0.0:27999",
            "--images",
            "/nonexistent",
            "--to",
            "127.0.0.1:9",
        ])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(err.contains("--page-server-peer"), "{err}");
    let ok = pageserv::stopcopy::source::page_server_peer_ok;
    let lo: std::net::IpAddr = "127.0.0.1".parse().unwrap();
    let peer: std::net::IpAddr = "10.9.0.2".parse().unwrap();
    assert!(ok(lo, lo) && ok(peer, peer));
    assert!(!ok(peer, lo) && !ok(lo, peer));
}

#[test]
fn the_migration_id_file_is_private() {
    let t = TempDir::new("idfile");
    let f = t.0.join("migration-id");
    std::fs::write(&f, "old").unwrap();
    std::fs::set_permissions(&f, std::fs::Permissions::from_mode(0o644)).unwrap();
    pageserv::source::service::write_private(&f, "m1-2-3").unwrap();
    assert_eq!(std::fs::read_to_string(&f).unwrap(), "m1-2-3");
    assert_eq!(
        std::fs::metadata(&f).unwrap().permissions().mode() & 0o777,
        0o600
    );
}

/// `pageserv keep-dump` holding a fake dump socket whose "CRIU" is a thread of this test
/// blocked in recvfrom (what the keeper waits for before it talks to the dump).
#[test]
fn the_keeper_takes_commands_only_from_root_or_its_own_user() {
    use std::os::unix::net::UnixStream;
    if !is_root() {
        eprintln!("SKIP: needs root (a child setuid()s to nobody)");
        return;
    }
    let t = TempDir::new("keeper");
    std::fs::set_permissions(&t.0, std::fs::Permissions::from_mode(0o755)).unwrap();
    let (criu_end, ps_end) = UnixStream::pair().unwrap();
    let (tid_tx, tid_rx) = std::sync::mpsc::channel();
    let criu = std::thread::spawn(move || {
        tid_tx.send(nix::unistd::gettid().as_raw()).unwrap();
        let mut got = Vec::new();
        let mut buf = [0u8; 64];
        // recv(2) is recvfrom: the keeper sees syscall 45 and knows "CRIU" is idle.
        while let Ok(n) = nix::sys::socket::recv(
            std::os::fd::AsRawFd::as_raw_fd(&criu_end),
            &mut buf,
            nix::sys::socket::MsgFlags::empty(),
        ) {
            if n == 0 {
                break;
            }
            got.extend_from_slice(&buf[..n]);
            if got.len() >= 4 {
                break; // a command header: "CRIU" ends the session.
            }
        }
        got
    });
    let criu_tid = tid_rx.recv().unwrap();
    let mut link =
        pageserv::source::keeper::KeeperLink::spawn(&pageserv(), &t.0, &ps_end, criu_tid as u32, 8)
            .unwrap();
    link.images_shipped();
    link.leave(); // src "died" after the images: the keeper listens on keeper.sock.
    drop(ps_end);
    let sock = t.0.join(pageserv::source::keeper::KEEPER_SOCKET);
    let deadline = Instant::now() + Duration::from_secs(10);
    while !sock.exists() {
        assert!(Instant::now() < deadline, "the keeper did not listen");
        std::thread::sleep(Duration::from_millis(20));
    }
    // As if the socket were reachable by everyone (a permissive umask or directory).
    std::fs::set_permissions(&sock, std::fs::Permissions::from_mode(0o777)).unwrap();

    // A child that becomes nobody asks the keeper to resume the source.
    let reply = as_nobody_ask(&sock, b"resume-source\n");
    assert!(
        reply.starts_with('-') && reply.contains("uid 65534"),
        "nobody must be refused, got {reply:?}"
    );
    assert!(!criu.is_finished(), "the dump was not touched");

    // Root is obeyed.
    pageserv::source::keeper::settle_frozen(&t.0, true).expect("root may resume the source");
    let header = criu.join().unwrap();
    assert_eq!(&header[..4], &0xBAD0u32.to_ne_bytes(), "the resume command");
}

/// Forks; the child setuid()s to nobody, connects to `sock`, sends `line` and returns what it
/// read through a pipe. Only raw system calls between fork and _exit.
fn as_nobody_ask(sock: &Path, line: &[u8]) -> String {
    use std::os::unix::ffi::OsStrExt;
    let mut addr: libc::sockaddr_un = unsafe { std::mem::zeroed() };
    addr.sun_family = libc::AF_UNIX as libc::sa_family_t;
    let p = sock.as_os_str().as_bytes();
    assert!(p.len() < addr.sun_path.len());
    for (d, s) in addr.sun_path.iter_mut().zip(p) {
        *d = *s as libc::c_char;
    }
    let mut pipe = [0i32; 2];
    assert_eq!(unsafe { libc::pipe(pipe.as_mut_ptr()) }, 0);
    let pid = unsafe { libc::fork() };
    assert!(pid >= 0);
    if pid == 0 {
        unsafe {
            libc::close(pipe[0]);
            if libc::setgid(65534) != 0 || libc::setuid(65534) != 0 {
                libc::_exit(2);
            }
            let s = libc::socket(libc::AF_UNIX, libc::SOCK_STREAM, 0);
            let len = std::mem::size_of::<libc::sockaddr_un>() as libc::socklen_t;
            if libc::connect(s, &addr as *const _ as *const libc::sockaddr, len) != 0 {
                let msg = b"connect failed";
                libc::write(pipe[1], msg.as_ptr().cast(), msg.len());
                libc::_exit(3);
            }
            libc::write(s, line.as_ptr().cast(), line.len());
            let mut buf = [0u8; 256];
            loop {
                let n = libc::read(s, buf.as_mut_ptr().cast(), buf.len());
                if n <= 0 {
                    break;
                }
                libc::write(pipe[1], buf.as_ptr().cast(), n as usize);
                if n > 0 && buf[0] == b'+' {
                    break;
                }
            }
            libc::_exit(0);
        }
    }
    unsafe { libc::close(pipe[1]) };
    let mut out = Vec::new();
    let mut f = unsafe { <std::fs::File as std::os::fd::FromRawFd>::from_raw_fd(pipe[0]) };
    // The keeper keeps a refused client's connection until its next accept: read with a bound.
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut status = 0;
    loop {
        let r = unsafe { libc::waitpid(pid, &mut status, libc::WNOHANG) };
        if r == pid {
            break;
        }
        if Instant::now() > deadline {
            unsafe { libc::kill(pid, libc::SIGKILL) };
            unsafe { libc::waitpid(pid, &mut status, 0) };
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    use std::io::Read;
    let _ = f.read_to_end(&mut out);
    String::from_utf8_lossy(&out).into_owned()
}
