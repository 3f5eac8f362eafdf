//! A two-host migration on one machine: the source is the root network namespace, the
//! destination a network namespace this process creates, joined by a veth pair. The demo, the
//! integration tests and the bench all use it, so what the tests check is what users run.
//!
//! Everything it creates carries this process's pid in its name and is removed on drop.

use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::process::{Command, Stdio};

#[derive(Debug, thiserror::Error)]
pub enum TestbedError {
    #[error("the testbed needs root (network namespaces, CRIU); run it as root")]
    NotRoot,
    #[error("`{cmd}` failed: {detail}")]
    Command { cmd: String, detail: String },
}

/// A destination network namespace joined to the root namespace by a veth pair.
#[derive(Debug)]
pub struct Testbed {
    pub netns: String,
    pub host_if: String,
    pub ns_if: String,
    pub src_addr: Ipv4Addr,
    pub dst_addr: Ipv4Addr,
    /// Scratch directory for keys, images and logs.
    pub dir: PathBuf,
    keep_dir: bool,
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
    /// Creates the namespace `psv<pid>-<tag>` and a /30 in 10.250.0.0/16 chosen from the pid and
    /// `tag`, so concurrent testbeds do not collide.
    pub fn new(tag: u8) -> Result<Testbed, TestbedError> {
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
        let dir = std::env::temp_dir().join(format!("pageserv-{netns}"));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).map_err(|e| TestbedError::Command {
            cmd: format!("mkdir {}", dir.display()),
            detail: e.to_string(),
        })?;
        let bed = Testbed {
            netns,
            host_if,
            ns_if,
            src_addr,
            dst_addr,
            dir,
            keep_dir: std::env::var_os("PAGESERV_KEEP").is_some(),
        };
        bed.setup()?;
        Ok(bed)
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
        tbf(&[], &self.host_if)?;
        tbf(&["-n", &self.netns], &self.ns_if)?;
        Ok(())
    }

    /// Takes the link down or up (for link-loss tests).
    pub fn set_link(&self, up: bool) -> Result<(), TestbedError> {
        let state = if up { "up" } else { "down" };
        ip(&["link", "set", &self.host_if, state]).map(|_| ())
    }
}

impl Drop for Testbed {
    fn drop(&mut self) {
        let _ = ip(&["link", "del", &self.host_if]);
        let _ = ip(&["netns", "del", &self.netns]);
        if !self.keep_dir {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}
