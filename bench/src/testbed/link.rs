//! The emulated link between the source and destination namespaces of a two-namespace testbed:
//! its shape (rate, delay, loss), which emulator provides it, and the running linkem process.
//!
//! A plain veth when the shape asks for nothing; tbf on both ends of a veth when it asks for a
//! rate only (the kernel's segmentation offloads stay, as on a real NIC); otherwise the kernel's netem on both ends of a
//! veth where the kernel has it, else `linkem` (bench/linkem) joining the namespaces with a TUN
//! device in each. TCP and UDP cross the same link either way.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use super::{TestbedError, sh};

/// Rate, delay and loss of the link, the same in each direction.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct LinkShape {
    /// Bits per second per direction; `None` is as fast as the emulator goes.
    pub rate_bps: Option<u64>,
    /// One-way delay per direction (the round trip is twice this).
    pub delay_us: u64,
    /// Probability that a packet is dropped, per packet and direction (0.005 is 0.5%).
    pub loss: f64,
    /// The MTU of both ends of the veth; `None` leaves the kernel's 1500. Not for linkem.
    pub mtu: Option<u32>,
}

impl LinkShape {
    /// A link with nothing to emulate: a bare veth does.
    pub fn is_plain(&self) -> bool {
        self.rate_bps.is_none() && self.delay_us == 0 && self.loss == 0.0
    }
}

/// What joins the two namespaces.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Emulator {
    /// A bare veth pair.
    Veth,
    /// netem (rate, delay, loss) on both ends of a veth pair.
    Netem,
    /// bench/linkem between two TUN devices.
    Linkem,
    /// tbf (rate only) on both ends of a veth pair.
    Tbf,
}

impl Emulator {
    /// The emulator for `shape`: none for a plain link, tbf for a rate alone (no delay, no
    /// loss), netem where the kernel has it, else linkem. A userspace TUN emulator takes every
    /// datagram apart (no GSO/GRO) and costs the senders CPU a real link does not; tbf does not.
    pub fn choose(shape: &LinkShape, netem_available: bool) -> Emulator {
        if shape.is_plain() {
            Emulator::Veth
        } else if shape.delay_us == 0 && shape.loss == 0.0 {
            Emulator::Tbf
        } else if netem_available {
            Emulator::Netem
        } else {
            Emulator::Linkem
        }
    }
}

/// Whether this kernel has netem, asked of linkem's own probe (a scratch namespace, so the
/// host is never touched). Asked once per process.
pub fn netem_available(linkem: &Path) -> bool {
    static ANSWER: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ANSWER.get_or_init(|| {
        Command::new(linkem)
            .arg("--netem-available")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    })
}

/// `tc` arguments that give one end of a veth this shape with netem.
pub fn netem_args(dev: &str, shape: &LinkShape) -> Vec<String> {
    let mut a: Vec<String> = ["qdisc", "replace", "dev", dev, "root", "netem"]
        .map(String::from)
        .into();
    // netem's default queue of 1000 packets is shorter than one bandwidth-delay product of the
    // faster links; a drop-tail that short would measure the queue, not the link.
    a.extend(["limit".into(), "100000".into()]);
    if shape.delay_us > 0 {
        a.extend(["delay".into(), format!("{}us", shape.delay_us)]);
    }
    if shape.loss > 0.0 {
        a.extend(["loss".into(), format!("{}%", shape.loss * 100.0)]);
    }
    if let Some(r) = shape.rate_bps {
        a.extend(["rate".into(), format!("{r}bit")]);
    }
    a
}

/// `linkem` arguments for this shape between the two namespaces.
pub fn linkem_args(
    ns_a: &str,
    ns_b: &str,
    addr_a: &str,
    addr_b: &str,
    ifname: &str,
    shape: &LinkShape,
) -> Vec<String> {
    let mut a: Vec<String> = vec![
        "--ns-a".into(),
        ns_a.into(),
        "--ns-b".into(),
        ns_b.into(),
        "--addr-a".into(),
        addr_a.into(),
        "--addr-b".into(),
        addr_b.into(),
        "--ifname".into(),
        ifname.into(),
        "--delay".into(),
        format!("{}us", shape.delay_us),
        "--loss".into(),
        format!("{}", shape.loss),
        "--rate".into(),
        shape
            .rate_bps
            .map_or("unlimited".into(), |r| format!("{r}bit")),
    ];
    if shape.loss > 0.0 {
        // A fixed seed: every run of a cell sees the same loss pattern for the same packets.
        a.extend(["--seed".into(), "42".into()]);
    }
    a
}

/// A running linkem, stopped (SIGTERM, then SIGKILL) on drop; its counters go to its log.
#[derive(Debug)]
pub struct LinkemProcess {
    child: Option<Child>,
    pub log: PathBuf,
}

impl LinkemProcess {
    /// Starts linkem with `args` and waits until it forwards.
    pub fn start(bin: &Path, args: &[String], dir: &Path) -> Result<LinkemProcess, TestbedError> {
        let ready = dir.join("linkem.ready");
        let log = dir.join("linkem.log");
        let _ = std::fs::remove_file(&ready);
        let err = |detail: String| TestbedError::Command {
            cmd: format!("{} {}", bin.display(), args.join(" ")),
            detail,
        };
        let out =
            std::fs::File::create(&log).map_err(|e| err(format!("{}: {e}", log.display())))?;
        let errout = out.try_clone().map_err(|e| err(e.to_string()))?;
        let mut cmd = Command::new(bin);
        cmd.args(args)
            .arg("--ready-file")
            .arg(&ready)
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(errout);
        // SAFETY: prctl is async-signal-safe. If the bench dies without dropping the testbed,
        // linkem ends too instead of holding the namespaces' devices.
        unsafe {
            use std::os::unix::process::CommandExt;
            cmd.pre_exec(|| {
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM);
                Ok(())
            });
        }
        let child = cmd.spawn().map_err(|e| err(e.to_string()))?;
        let mut me = LinkemProcess {
            child: Some(child),
            log,
        };
        let deadline = Instant::now() + Duration::from_secs(10);
        while !ready.exists() {
            if let Some(Ok(Some(st))) = me.child.as_mut().map(Child::try_wait) {
                let said = std::fs::read_to_string(&me.log).unwrap_or_default();
                return Err(err(format!(
                    "exited ({st}) before forwarding: {}",
                    said.trim()
                )));
            }
            if Instant::now() > deadline {
                return Err(err("not forwarding after 10 s".into()));
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        Ok(me)
    }
}

impl LinkemProcess {
    /// Stops linkem (SIGTERM, SIGKILL after 3 s) and returns what it reported on stopping: a
    /// line of counters per direction and one of CPU use. Empty if it was stopped before.
    pub fn stop(&mut self) -> String {
        let Some(mut child) = self.child.take() else {
            return String::new();
        };
        let pid = nix::unistd::Pid::from_raw(child.id() as i32);
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
        let deadline = Instant::now() + Duration::from_secs(3);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = child.try_wait() {
                break;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        if let Ok(None) = child.try_wait() {
            let _ = child.kill();
            let _ = child.wait();
        }
        std::fs::read_to_string(&self.log)
            .unwrap_or_default()
            .lines()
            .filter(|l| l.contains(": rx ") || l.starts_with("cpu:"))
            .collect::<Vec<_>>()
            .join("\n")
    }
}

impl Drop for LinkemProcess {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Bytes received plus sent by interface `dev` in namespace `netns` (root namespace if None).
pub fn interface_bytes(netns: Option<&str>, dev: &str) -> Option<u64> {
    let mut cmd = Command::new("ip");
    if let Some(ns) = netns {
        cmd.args(["-n", ns]);
    }
    cmd.args(["-j", "-s", "link", "show", "dev", dev]);
    let out = sh(&mut cmd).ok()?;
    let v: serde_json::Value = serde_json::from_str(&out).ok()?;
    let stats = v.get(0)?.get("stats64")?;
    let bytes = |dir: &str| stats.get(dir)?.get("bytes")?.as_u64();
    Some(bytes("rx")? + bytes("tx")?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plain_links_use_a_bare_veth_and_the_rest_an_emulator() {
        let plain = LinkShape::default();
        assert_eq!(Emulator::choose(&plain, true), Emulator::Veth);
        let lossy = LinkShape {
            loss: 0.005,
            ..plain
        };
        assert_eq!(Emulator::choose(&lossy, true), Emulator::Netem);
        assert_eq!(Emulator::choose(&lossy, false), Emulator::Linkem);
        let rate_only = LinkShape {
            rate_bps: Some(1_000_000_000),
            ..plain
        };
        assert_eq!(Emulator::choose(&rate_only, false), Emulator::Tbf);
        let delayed = LinkShape {
            delay_us: 1000,
            ..rate_only
        };
        assert_eq!(Emulator::choose(&delayed, false), Emulator::Linkem);
    }

    #[test]
    fn emulator_arguments_carry_the_shape() {
        let shape = LinkShape {
            rate_bps: Some(100_000_000),
            delay_us: 20_000,
            loss: 0.005,
            mtu: None,
        };
        assert_eq!(
            netem_args("v0", &shape).join(" "),
            "qdisc replace dev v0 root netem limit 100000 delay 20000us loss 0.5% rate 100000000bit"
        );
        let a = linkem_args("s", "d", "10.0.0.1/30", "10.0.0.2/30", "lk0", &shape).join(" ");
        assert_eq!(
            a,
            "--ns-a s --ns-b d --addr-a 10.0.0.1/30 --addr-b 10.0.0.2/30 --ifname lk0 \
             --delay 20000us --loss 0.005 --rate 100000000bit --seed 42"
        );
        let fast = linkem_args("s", "d", "a", "b", "i", &LinkShape::default()).join(" ");
        assert!(fast.ends_with("--rate unlimited"), "{fast}");
    }
}
