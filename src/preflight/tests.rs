use super::scan::*;
use super::*;
use proptest::prelude::*;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};

const NET: u64 = 4026531840;
const MNT: u64 = 4026531841;

fn task(pid: i32, fds: Vec<FdKind>) -> Task {
    Task {
        pid,
        comm: "srv".into(),
        sid: 1000,
        netns: NET,
        mntns: MNT,
        fds: fds
            .into_iter()
            .enumerate()
            .map(|(i, kind)| Fd {
                fd: 3 + i as i32,
                kind,
            })
            .collect(),
        ..Default::default()
    }
}

fn tree(tasks: Vec<Task>) -> TreeFacts {
    TreeFacts {
        tasks,
        own_netns: NET,
        own_mntns: MNT,
    }
}

fn tcp(state: TcpState) -> FdKind {
    FdKind::Tcp {
        state,
        local: "10.1.0.2:11211".parse().unwrap(),
        remote: "10.1.0.1:40000".parse().unwrap(),
    }
}

fn opts(o: &[&str]) -> Vec<String> {
    o.iter().map(|s| s.to_string()).collect()
}

fn root(fds: Vec<FdKind>) -> Task {
    let mut t = task(1000, fds);
    t.sid = 1000;
    t
}

#[test]
fn listening_and_unix_servers_need_nothing() {
    let t = tree(vec![root(vec![
        tcp(TcpState::Listen),
        tcp(TcpState::Close),
        FdKind::Udp,
        FdKind::Unix {
            ino: 5,
            stream: true,
            path: Some("/run/s.sock".into()),
            peer: None,
        },
        FdKind::Other,
    ])]);
    let v = check(&t, &[]);
    assert!(v.refusals.is_empty(), "{v:?}");
}

#[test]
fn established_tcp_names_tcp_established() {
    let t = tree(vec![root(vec![
        tcp(TcpState::Listen),
        tcp(TcpState::Established),
    ])]);
    let v = check(&t, &[]);
    assert_eq!(v.refusals.len(), 1);
    let r = &v.refusals[0];
    assert_eq!(r.option, "--tcp-established");
    let msg = Refused {
        pid: 1000,
        refusals: v.refusals.clone(),
    }
    .to_string();
    assert!(msg.contains("--criu-opt=--tcp-established"), "{msg}");
    assert!(msg.contains("10.1.0.2:11211 <-> 10.1.0.1:40000"), "{msg}");
    assert!(msg.contains("pid 1000 (srv) fd 4"), "{msg}");
    for o in [&["--tcp-established"][..], &["--tcp-close"]] {
        assert!(check(&t, &opts(o)).refusals.is_empty());
    }
}

#[test]
fn many_connections_are_summarised() {
    let fds = (0..1000).map(|_| tcp(TcpState::Established)).collect();
    let v = check(&tree(vec![root(fds)]), &[]);
    assert_eq!(v.refusals.len(), 4);
    assert_eq!(v.refusals[3].what, "and more like it");
}

#[test]
fn terminal_and_outside_session_name_shell_job() {
    let mut t = root(vec![FdKind::Tty {
        path: "/dev/pts/3".into(),
    }]);
    t.sid = 77;
    let v = check(&tree(vec![t]), &[]);
    assert_eq!(v.refusals.len(), 2);
    assert!(v.refusals.iter().all(|r| r.option == "--shell-job"));
    let t2 = tree(vec![root(vec![FdKind::Tty {
        path: "/dev/pts/3".into(),
    }])]);
    assert!(check(&t2, &opts(&["-j"])).refusals.is_empty());
    // A child in its parent's session is inside the tree.
    let mut child = task(1001, vec![]);
    child.sid = 1000;
    assert!(
        check(&tree(vec![root(vec![]), child]), &[])
            .refusals
            .is_empty()
    );
}

#[test]
fn locks_ghosts_and_mounts() {
    let mut t = root(vec![FdKind::Deleted {
        path: "/tmp/big".into(),
        size: 5 << 20,
    }]);
    t.file_locks = 2;
    t.mntns = 99;
    t.bind_mounts = vec!["/data".into()];
    let facts = tree(vec![t]);
    let v = check(&facts, &[]);
    let names: Vec<_> = v.refusals.iter().map(|r| r.option).collect();
    assert_eq!(names, ["--file-locks", "--external=mnt[]", "--ghost-limit"]);
    let ok = opts(&["--file-locks", "--external", "mnt[]", "--ghost-limit=8M"]);
    assert!(
        check(&facts, &ok).refusals.is_empty(),
        "{:?}",
        check(&facts, &ok)
    );
    // Under the default limit CRIU copies it: no refusal.
    let small = tree(vec![root(vec![FdKind::Deleted {
        path: "/tmp/s".into(),
        size: 4096,
    }])]);
    assert!(check(&small, &[]).refusals.is_empty());
}

#[test]
fn unix_peer_outside_the_tree_names_ext_unix_sk() {
    let inside = FdKind::Unix {
        ino: 10,
        stream: true,
        path: None,
        peer: Some(11),
    };
    let inside_peer = FdKind::Unix {
        ino: 11,
        stream: true,
        path: None,
        peer: Some(10),
    };
    assert!(
        check(&tree(vec![root(vec![inside.clone(), inside_peer])]), &[])
            .refusals
            .is_empty()
    );
    let v = check(&tree(vec![root(vec![inside])]), &[]);
    assert_eq!(v.refusals[0].option, "--ext-unix-sk");
    assert!(
        check(
            &tree(vec![root(vec![FdKind::Unix {
                ino: 10,
                stream: true,
                path: None,
                peer: Some(11),
            }])]),
            &opts(&["--ext-unix-sk"])
        )
        .refusals
        .is_empty()
    );
}

#[test]
fn network_lock_choice() {
    let both = LockTools {
        nftables: true,
        iptables: true,
    };
    let ipt = LockTools {
        nftables: false,
        iptables: true,
    };
    let none = LockTools {
        nftables: false,
        iptables: false,
    };
    assert!(network_lock(false, &[], none).unwrap().is_empty());
    assert_eq!(
        network_lock(true, &[], both).unwrap(),
        ["--network-lock", "nftables"]
    );
    assert!(network_lock(true, &[], ipt).unwrap().is_empty());
    assert!(
        network_lock(true, &opts(&["--network-lock=iptables"]), none)
            .unwrap()
            .is_empty()
    );
    assert_eq!(
        network_lock(true, &[], none).unwrap_err().option,
        "--network-lock"
    );
    let mut t = root(vec![]);
    assert!(!locks_network(&tree(vec![t.clone()]), &[]));
    assert!(locks_network(
        &tree(vec![t.clone()]),
        &opts(&["--tcp-established"])
    ));
    t.netns = 5;
    assert!(locks_network(&tree(vec![t.clone()]), &[]));
    assert!(!check(&tree(vec![t]), &[]).notes.is_empty());
}

#[test]
fn option_parsing() {
    let o = opts(&["--ghost-limit", "2M", "--network-lock=nftables", "-l"]);
    assert_eq!(opt_value(&o, "--ghost-limit"), Some("2M"));
    assert_eq!(opt_value(&o, "--network-lock"), Some("nftables"));
    assert!(has_opt(&o, "--file-locks", Some("-l")));
    assert!(!has_opt(&o, "--network", None));
    assert_eq!(parse_size("2M"), Some(2 << 20));
    assert_eq!(parse_size("10"), Some(10));
    assert_eq!(parse_size("1G"), Some(1 << 30));
    assert_eq!(parse_size("x"), None);
    assert_eq!(parse_size("99999999999999G"), None);
}

#[test]
fn proc_parsers() {
    let tcp = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode\n   0: 0100007F:1F90 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 170 1 0000000034dbf6ba 100 0 0 10 0\n   1: 0200000A:2BCB 0100000A:9C40 01 00000000:00000000 00:00000000 00000000     0        0 171 1 0\n";
    let s = parse_tcp(tcp, false);
    assert_eq!(s.len(), 2);
    assert_eq!(
        s[0],
        (
            170,
            FdKind::Tcp {
                state: TcpState::Listen,
                local: "127.0.0.1:8080".parse().unwrap(),
                remote: "0.0.0.0:0".parse().unwrap()
            }
        )
    );
    assert!(
        matches!(s[1].1, FdKind::Tcp { state: TcpState::Established, local, .. } if local == "10.0.0.2:11211".parse().unwrap())
    );
    let v6 = parse_addr("00000000000000000000000001000000:0050", true).unwrap();
    assert_eq!(v6, "[::1]:80".parse().unwrap());
    assert_eq!(parse_addr("zz:1", false), None);
    let unix = "Num       RefCount Protocol Flags    Type St Inode Path\n0000: 00000002 00000000 00010000 0001 01 3000 /run/a.sock\n0000: 00000003 00000000 00000000 0002 03 3001\n";
    assert_eq!(
        parse_unix(unix),
        [
            (3000, true, Some("/run/a.sock".into())),
            (3001, false, None)
        ]
    );
    let ss = "u_str ESTAB 0      0      * 166 * 167\nu_str LISTEN 0 10 /run/a.sock 3000 * 0\n";
    let p = parse_ss_unix(ss);
    assert_eq!(p.get(&166), Some(&167));
    assert_eq!(p.get(&3000), None);
    let locks = "1: POSIX  ADVISORY  WRITE 25784 fe:00:914212 0 EOF\n1: -> POSIX  ADVISORY  WRITE 999 fe:00:914212 0 EOF\n2: FLOCK  ADVISORY  WRITE 25784 fe:00:1 0 EOF\n";
    let l = parse_locks(locks);
    assert_eq!(l.get(&25784), Some(&2));
    assert_eq!(l.get(&999), None);
    let stat = "1234 (a b) c) S 1 1234 1230 0 -1";
    assert_eq!(parse_sid(stat), Some(1230));
    assert_eq!(parse_state(stat), Some('S'));
    assert_eq!(parse_state("9 (x) Z 1 9 9"), Some('Z'));
    let mi = "36 35 98:0 /mnt1 /mnt2 rw,noatime master:1 - ext3 /dev/root rw\n37 35 0:5 / /proc rw - proc proc rw\n";
    assert_eq!(parse_bind_mounts(mi), ["/mnt2"]);
}

#[test]
fn classify_targets() {
    let mut socks = Sockets::new();
    socks.insert(9, FdKind::Udp);
    let none = || None;
    assert_eq!(classify("socket:[9]", &socks, none), FdKind::Udp);
    assert_eq!(classify("socket:[8]", &socks, none), FdKind::OtherSocket);
    assert!(matches!(
        classify("/dev/pts/0", &socks, none),
        FdKind::Tty { .. }
    ));
    assert!(matches!(
        classify("/dev/tty1", &socks, none),
        FdKind::Tty { .. }
    ));
    assert_eq!(classify("/dev/ttyS", &socks, none), FdKind::Other);
    assert_eq!(classify("/dev/null", &socks, none), FdKind::Other);
    assert_eq!(
        classify("/tmp/x (deleted)", &socks, || Some(7)),
        FdKind::Deleted {
            path: "/tmp/x".into(),
            size: 7
        }
    );
    assert_eq!(classify("/tmp/x (deleted)", &socks, none), FdKind::Other);
    assert_eq!(classify("pipe:[123]", &socks, none), FdKind::Other);
}

fn arb_state() -> impl Strategy<Value = TcpState> {
    (0u8..16).prop_map(TcpState::from_proc)
}

proptest! {
    /// The rule for connections: refused exactly when some TCP socket of the tree has a peer and
    /// neither --tcp-established nor --tcp-close was given; the refusal names the option.
    #[test]
    fn connected_tcp_is_refused_exactly_without_the_option(
        states in proptest::collection::vec(arb_state(), 0..20),
        given in 0u8..3,
    ) {
        let fds = states.iter().map(|s| tcp(*s)).collect();
        let o = match given { 0 => vec![], 1 => opts(&["--tcp-established"]), _ => opts(&["--tcp-close"]) };
        let v = check(&tree(vec![root(fds)]), &o);
        let connected = states.iter().any(|s| s.is_connected());
        prop_assert_eq!(!v.refusals.is_empty(), connected && given == 0);
        prop_assert!(v.refusals.iter().all(|r| r.option == "--tcp-established"));
        prop_assert!(v.refusals.len() <= 4);
    }

    /// Any address round-trips through the kernel's hex form.
    #[test]
    fn addr_roundtrip(a in any::<[u8; 4]>(), b in any::<[u8; 16]>(), port in any::<u16>()) {
        let hex4 = format!("{:08X}:{port:04X}", u32::from_ne_bytes(a));
        prop_assert_eq!(parse_addr(&hex4, false), Some(SocketAddr::new(Ipv4Addr::from(a).into(), port)));
        let words: String = b.chunks(4).map(|c| format!("{:08X}", u32::from_ne_bytes([c[0], c[1], c[2], c[3]]))).collect();
        prop_assert_eq!(parse_addr(&format!("{words}:{port:04X}"), true), Some(SocketAddr::new(Ipv6Addr::from(b).into(), port)));
    }

    /// Hostile /proc-like text never panics the parsers.
    #[test]
    fn parsers_never_panic(s in ".{0,400}") {
        let _ = parse_tcp(&s, false);
        let _ = parse_tcp(&s, true);
        let _ = parse_unix(&s);
        let _ = parse_ss_unix(&s);
        let _ = parse_locks(&s);
        let _ = parse_sid(&s);
        let _ = parse_state(&s);
        let _ = parse_bind_mounts(&s);
        let _ = parse_size(&s);
    }
}

/// The /proc reader on a live process (this test's): a listening socket, both ends of a TCP
/// connection, a socketpair, a lock and a deleted 2 MiB file, and what the checker makes of them.
#[test]
fn scan_reads_a_live_process() {
    use std::io::Write;
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    let c = std::net::TcpStream::connect(addr).unwrap();
    let (s, peer) = l.accept().unwrap();
    let (u1, _u2) = std::os::unix::net::UnixStream::pair().unwrap();
    let dir = std::env::temp_dir().join(format!("pageserv-scan-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("deleted");
    let mut f = std::fs::File::create(&path).unwrap();
    f.write_all(&vec![7u8; 2 << 20]).unwrap();
    std::fs::remove_file(&path).unwrap();
    let locked = std::fs::File::create(dir.join("lock")).unwrap();
    let _lock = nix::fcntl::Flock::lock(locked, nix::fcntl::FlockArg::LockExclusive).unwrap();
    let me = std::process::id() as i32;
    let facts = scan::scan(me).unwrap();
    let t = &facts.tasks[0];
    assert_eq!(t.pid, me);
    assert_eq!(t.netns, facts.own_netns);
    let has = |want: &FdKind| t.fds.iter().any(|f| &f.kind == want);
    assert!(has(&FdKind::Tcp {
        state: TcpState::Listen,
        local: addr,
        remote: "0.0.0.0:0".parse().unwrap()
    }));
    assert!(has(&FdKind::Tcp {
        state: TcpState::Established,
        local: addr,
        remote: peer
    }));
    assert!(has(&FdKind::Tcp {
        state: TcpState::Established,
        local: peer,
        remote: addr
    }));
    assert!(has(&FdKind::Deleted {
        path: path.display().to_string(),
        size: 2 << 20
    }));
    assert!(t.file_locks >= 1, "{t:?}");
    let pair = t
        .fds
        .iter()
        .filter(|f| matches!(f.kind, FdKind::Unix { stream: true, .. }))
        .count();
    assert!(pair >= 2, "{t:?}");
    let v = check(&facts, &[]);
    let names: Vec<_> = v.refusals.iter().map(|r| r.option).collect();
    for want in ["--tcp-established", "--file-locks", "--ghost-limit"] {
        assert!(names.contains(&want), "{want} missing from {names:?}");
    }
    // Both ends of the socketpair are in the tree: no --ext-unix-sk for them.
    assert!(!v.refusals.iter().any(|r| {
        r.option == "--ext-unix-sk"
            && r.what
                .contains(&format!("fd {}:", std::os::fd::AsRawFd::as_raw_fd(&u1)))
    }));
    drop((c, s, f));
    let _ = std::fs::remove_dir_all(&dir);
}
