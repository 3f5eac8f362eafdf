//! A two-host migration on one machine. [`Testbed::new`]: the source is the root network
//! namespace, the destination a network namespace this process creates, joined by a veth pair
//! (the demo and the integration tests). [`Testbed::pair`]: source and destination each get a
//! namespace of their own, joined by an emulated link ([`link`]), so everything that crosses
//! (CRIU's TCP, pageserv's QUIC) crosses the same link (the bench). What the tests check is
//! what users run.
//!
//! Everything it creates carries this process's pid in its name and is removed on drop.

pub mod container;
pub mod link;

use std::net::Ipv4Addr;
use std::os::fd::{AsRawFd, OwnedFd};
use std::path::PathBuf;
use std::process::{Command, Stdio};

use link::{Emulator, LinkShape, LinkemProcess};

#[derive(Debug, thiserror::Error)]
pub enum TestbedError {
    #[error("the testbed needs root (network namespaces, CRIU); run it as root")]
    NotRoot,
    #[error("`{cmd}` failed: {detail}")]
    Command { cmd: String, detail: String },
}

/// A destination network namespace joined to the source (the root namespace, or a namespace of
/// its own) by a veth pair or an emulated link.
#[derive(Debug)]
pub struct Testbed {
    /// The destination's namespace.
    pub netns: String,
    /// The source's namespace, `None` for the root namespace.
    pub src_netns: Option<String>,
    /// The source side's interface (in `src_netns`).
    pub host_if: String,
    /// The destination side's interface (in `netns`).
    pub ns_if: String,
    /// What joins the two sides.
    pub emulator: Emulator,
    pub src_addr: Ipv4Addr,
    pub dst_addr: Ipv4Addr,
    /// Scratch directory for keys, images and logs.
    pub dir: PathBuf,
    keep_dir: bool,
    /// Open handle of the source namespace, entered by [`Testbed::enter_src`].
    src_ns: Option<OwnedFd>,
    linkem: Option<LinkemProcess>,
}

/// Runs a command; its stderr goes into the error.
pub fn sh(cmd: &mut Command) -> Result<String, TestbedError> {
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .map_err(|e| TestbedError::Command {
            cmd: format!("{cmd:?}"),
            detail: e.to_string(),
        })?;
    if !out.status.success() {
        return Err(TestbedError::Command {
            cmd: format!("{cmd:?}"),
            detail: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        });
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn ip(args: &[&str]) -> Result<String, TestbedError> {
    sh(Command::new("ip").args(args))
}

impl Testbed {
    /// Creates the namespace `psv<pid>-<tag>` joined to the root namespace by a veth pair, and
    /// a /30 in 10.250.0.0/16 chosen from the pid and `tag`, so concurrent testbeds do not
    /// collide.
    pub fn new(tag: u8) -> Result<Testbed, TestbedError> {
        let bed = Testbed::blank(tag, false)?;
        bed.setup()?;
        Ok(bed)
    }

    /// Creates two namespaces, `psv<pid>-<tag>s` for the source and `psv<pid>-<tag>` for the
    /// destination, joined by a link of `shape`: a bare veth if the shape is plain, else netem
    /// where the kernel has it, else `linkem` (the binary at `linkem_bin`). Commands for the
    /// source side go through [`Testbed::in_src`] or [`Testbed::enter_src`].
    pub fn pair(
        tag: u8,
        shape: &LinkShape,
        linkem_bin: &std::path::Path,
    ) -> Result<Testbed, TestbedError> {
        let mut bed = Testbed::blank(tag, true)?;
        let Some(src) = bed.src_netns.clone() else {
            return Err(TestbedError::Command {
                cmd: "testbed".into(),
                detail: "a pair testbed without a source namespace".into(),
            });
        };
        ip(&["netns", "add", &src])?;
        ip(&["netns", "add", &bed.netns])?;
        let ns_path = format!("/var/run/netns/{src}");
        let fd = std::fs::File::open(&ns_path).map_err(|e| TestbedError::Command {
            cmd: format!("open {ns_path}"),
            detail: e.to_string(),
        })?;
        bed.src_ns = Some(fd.into());
        for ns in [&src, &bed.netns] {
            ip(&["-n", ns, "link", "set", "lo", "up"])?;
        }
        let netem = !shape.is_plain() && link::netem_available(linkem_bin);
        bed.emulator = Emulator::choose(shape, netem);
        let (a, b) = (
            format!("{}/30", bed.src_addr),
            format!("{}/30", bed.dst_addr),
        );
        match bed.emulator {
            Emulator::Veth | Emulator::Netem | Emulator::Tbf => {
                let (h, n) = (&bed.host_if, &bed.ns_if);
                ip(&["link", "add", h, "type", "veth", "peer", "name", n])?;
                ip(&["link", "set", h, "netns", &src])?;
                ip(&["link", "set", n, "netns", &bed.netns])?;
                for (ns, dev, addr) in [(&src, h, &a), (&bed.netns, n, &b)] {
                    ip(&["-n", ns, "addr", "add", addr, "dev", dev])?;
                    ip(&["-n", ns, "link", "set", dev, "up"])?;
                    if bed.emulator == Emulator::Netem {
                        let mut args = vec!["-n".to_string(), ns.to_string()];
                        args.extend(link::netem_args(dev, shape));
                        sh(Command::new("tc").args(&args))?;
                    }
                }
                if let Some(mtu) = shape.mtu {
                    bed.set_mtu(mtu)?;
                }
                if let (Emulator::Tbf, Some(bps)) = (bed.emulator, shape.rate_bps) {
                    bed.limit_rate(&format!("{bps}bit"))?;
                }
            }
            Emulator::Linkem if shape.mtu.is_some() => {
                return Err(TestbedError::Command {
                    cmd: "testbed".into(),
                    detail: "an MTU is set on veth links only (bare, tbf or netem), and this \
                             link needs linkem: drop the MTU or the delay and loss"
                        .into(),
                });
            }
            Emulator::Linkem => {
                // One TUN device per side, with the same name in both namespaces.
                bed.ns_if = bed.host_if.clone();
                let args = link::linkem_args(&src, &bed.netns, &a, &b, &bed.host_if, shape);
                bed.linkem = Some(LinkemProcess::start(linkem_bin, &args, &bed.dir)?);
            }
        }
        Ok(bed)
    }

    fn blank(tag: u8, pair: bool) -> Result<Testbed, TestbedError> {
        if !nix::unistd::geteuid().is_root() {
            return Err(TestbedError::NotRoot);
        }
        let pid = std::process::id();
        let netns = format!("psv{pid}-{tag}");
        let host_if = format!("psv{}h{tag}", pid % 100_000);
        let ns_if = format!("psv{}n{tag}", pid % 100_000);
        let net = ((pid as u16).wrapping_mul(7).wrapping_add(u16::from(tag))) % 16_000;
        let base = u32::from(Ipv4Addr::new(10, 250, 0, 0)) + u32::from(net) * 4;
        let src_addr = Ipv4Addr::from(base + 1);
        let dst_addr = Ipv4Addr::from(base + 2);
        // mkdtemp: a fresh 0700 directory with an unpredictable name, created atomically, so
        // nobody can plant a directory or symlink there first (this runs as root in /tmp).
        let template = std::env::temp_dir().join(format!("pageserv-{netns}-XXXXXX"));
        let dir = nix::unistd::mkdtemp(&template).map_err(|e| TestbedError::Command {
            cmd: format!("mkdtemp {}", template.display()),
            detail: e.to_string(),
        })?;
        Ok(Testbed {
            src_netns: pair.then(|| format!("{netns}s")),
            netns,
            host_if,
            ns_if,
            emulator: Emulator::Veth,
            src_addr,
            dst_addr,
            dir,
            keep_dir: std::env::var_os("PAGESERV_KEEP").is_some(),
            src_ns: None,
            linkem: None,
        })
    }

    fn setup(&self) -> Result<(), TestbedError> {
        let (ns, h, n) = (&self.netns, &self.host_if, &self.ns_if);
        ip(&["netns", "add", ns])?;
        ip(&["link", "add", h, "type", "veth", "peer", "name", n])?;
        ip(&["link", "set", n, "netns", ns])?;
        ip(&["addr", "add", &format!("{}/30", self.src_addr), "dev", h])?;
        ip(&["link", "set", h, "up"])?;
        ip(&[
            "-n",
            ns,
            "addr",
            "add",
            &format!("{}/30", self.dst_addr),
            "dev",
            n,
        ])?;
        ip(&["-n", ns, "link", "set", n, "up"])?;
        ip(&["-n", ns, "link", "set", "lo", "up"])?;
        Ok(())
    }

    /// A command that runs on the source side (its namespace, if it has one).
    pub fn in_src(&self, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let mut c = Command::new(program);
        self.enter_src(&mut c);
        c
    }

    /// Makes `cmd` run in the source namespace, if the source has one. Only the network
    /// namespace changes (unlike `ip netns exec`, which also makes a mount namespace): CRIU
    /// refuses to dump a task whose mount namespace differs from its own.
    pub fn enter_src<'c>(&self, cmd: &'c mut Command) -> &'c mut Command {
        if let Some(fd) = &self.src_ns {
            let raw = fd.as_raw_fd();
            // SAFETY: setns is a plain system call, async-signal-safe; `raw` stays open in the
            // child until exec (the parent keeps it open while the testbed lives).
            unsafe {
                use std::os::unix::process::CommandExt;
                cmd.pre_exec(move || {
                    if libc::setns(raw, libc::CLONE_NEWNET) != 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                    Ok(())
                });
            }
        }
        cmd
    }

    /// Bytes that crossed the source side's interface so far, both ways.
    pub fn link_bytes(&self) -> Option<u64> {
        link::interface_bytes(self.src_netns.as_deref(), &self.host_if)
    }

    /// Stops the link emulator, if it is a process, and returns its final counters (linkem: one
    /// line per direction, one of CPU use). The link is gone afterwards.
    pub fn stop_link(&mut self) -> Option<String> {
        self.linkem.as_mut().map(LinkemProcess::stop)
    }

    /// A command that runs inside the destination namespace.
    pub fn in_dst(&self, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.netns]).arg(program);
        c
    }

    /// Limits the veth to `rate` (tc syntax, e.g. "1gbit") both ways with tbf.
    pub fn limit_rate(&self, rate: &str) -> Result<(), TestbedError> {
        let tbf = |pre: &[&str], dev: &str| {
            let mut args: Vec<&str> = pre.to_vec();
            args.extend([
                "qdisc", "replace", "dev", dev, "root", "tbf", "rate", rate, "burst", "256kb",
                "latency", "20ms",
            ]);
            sh(Command::new("tc").args(&args))
        };
        match &self.src_netns {
            Some(ns) => tbf(&["-n", ns], &self.host_if)?,
            None => tbf(&[], &self.host_if)?,
        };
        tbf(&["-n", &self.netns], &self.ns_if)?;
        Ok(())
    }

    /// Sets the MTU of both ends of the veth (e.g. 9000 for jumbo frames).
    pub fn set_mtu(&self, mtu: u32) -> Result<(), TestbedError> {
        let mtu = mtu.to_string();
        match &self.src_netns {
            Some(ns) => ip(&["-n", ns, "link", "set", &self.host_if, "mtu", &mtu])?,
            None => ip(&["link", "set", &self.host_if, "mtu", &mtu])?,
        };
        ip(&["-n", &self.netns, "link", "set", &self.ns_if, "mtu", &mtu])?;
        Ok(())
    }

    /// Takes the link down or up (for link-loss tests).
    pub fn set_link(&self, up: bool) -> Result<(), TestbedError> {
        let state = if up { "up" } else { "down" };
        match &self.src_netns {
            Some(ns) => ip(&["-n", ns, "link", "set", &self.host_if, state]).map(|_| ()),
            None => ip(&["link", "set", &self.host_if, state]).map(|_| ()),
        }
    }
}

impl Drop for Testbed {
    fn drop(&mut self) {
        // linkem first: its devices go with it.
        self.linkem = None;
        match &self.src_netns {
            Some(ns) => {
                let _ = ip(&["netns", "del", ns]);
            }
            None => {
                let _ = ip(&["link", "del", &self.host_if]);
            }
        }
        let _ = ip(&["netns", "del", &self.netns]);
        if !self.keep_dir {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn is_root() -> bool {
        nix::unistd::geteuid().is_root()
    }

    /// The demo's and bench's testbed runs as root in /tmp: its directory is made by mkdtemp, so
    /// its name cannot be planted in advance, and nobody else can look inside.
    #[test]
    fn the_testbed_directory_is_fresh_private_and_unpredictable() {
        if !is_root() {
            eprintln!("SKIP: needs root");
            return;
        }
        let predictable =
            std::env::temp_dir().join(format!("pageserv-psv{}-201", std::process::id()));
        let _ = std::fs::remove_dir_all(&predictable);
        std::fs::create_dir_all(&predictable).unwrap();
        std::fs::write(predictable.join("planted"), "x").unwrap();
        let bed = Testbed::new(201).expect("testbed");
        assert_ne!(bed.dir, predictable);
        assert!(!bed.dir.join("planted").exists());
        let mode = std::fs::metadata(&bed.dir).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o700, "{}", bed.dir.display());
        drop(bed);
        let _ = std::fs::remove_dir_all(&predictable);
    }
}
