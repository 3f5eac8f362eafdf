//! TUN devices inside named network namespaces.
//!
//! The device is created by a short-lived thread that joins the namespace: a TUN device belongs
//! to the namespace of whoever created it, and the file descriptor keeps working from any
//! namespace afterwards. The device is not persistent, so it disappears when linkem exits.

use std::fs::{File, OpenOptions};
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;
use std::process::Command;

use anyhow::{Context, Result, bail};
use nix::sched::{CloneFlags, setns};

/// Where `ip netns add` puts its namespace handles.
pub const NETNS_DIR: &str = "/var/run/netns";

/// Settings of one TUN endpoint.
#[derive(Debug, Clone)]
pub struct TunSpec {
    /// Name of the network namespace (as in `ip netns`).
    pub netns: String,
    /// Interface name inside the namespace.
    pub ifname: String,
    /// Address with prefix, e.g. `10.77.0.1/24`.
    pub addr: String,
    pub mtu: u32,
    /// Packets the kernel may queue towards linkem before it drops (the device's txqueuelen).
    pub txqueuelen: u32,
}

/// Creates and configures the TUN device `spec` describes; returns its non-blocking fd.
pub fn create(spec: &TunSpec) -> Result<File> {
    // An IPv6 address needs IPv6 on the device; an IPv4-only link is kept free of IPv6 chatter.
    let ipv6 = spec.addr.contains(':');
    let file = open_in_netns(&spec.netns, &spec.ifname, ipv6)?;
    let (mtu, qlen) = (spec.mtu.to_string(), spec.txqueuelen.to_string());
    let mut addr_args = vec!["addr", "add", &spec.addr, "dev", &spec.ifname];
    if ipv6 {
        // Duplicate address detection would keep the address unusable for a second or more,
        // and there is nobody else on a point-to-point TUN link.
        addr_args.push("nodad");
    }
    ip(&spec.netns, &addr_args)?;
    ip(
        &spec.netns,
        &[
            "link",
            "set",
            "dev",
            &spec.ifname,
            "mtu",
            &mtu,
            "txqueuelen",
            &qlen,
            "up",
        ],
    )?;
    Ok(file)
}

/// Creates the device inside `netns`; `ipv6` keeps IPv6 enabled on it.
fn open_in_netns(netns: &str, ifname: &str, ipv6: bool) -> Result<File> {
    if ifname.is_empty() || ifname.len() >= libc::IFNAMSIZ {
        bail!(
            "interface name {ifname:?} must be 1 to {} bytes long",
            libc::IFNAMSIZ - 1
        );
    }
    let ns_path = format!("{NETNS_DIR}/{netns}");
    let ns = File::open(&ns_path).with_context(|| {
        format!("opening network namespace {ns_path} (create it with `ip netns add {netns}`)")
    })?;
    let ifname = ifname.to_string();
    let worker = std::thread::Builder::new()
        .name(format!("tun-{netns}"))
        .spawn(move || -> Result<File> {
            // setns affects only this thread, which ends right after.
            setns(&ns, CloneFlags::CLONE_NEWNET)
                .with_context(|| format!("entering network namespace {ns_path} (needs root)"))?;
            let tun = OpenOptions::new()
                .read(true)
                .write(true)
                .custom_flags(libc::O_NONBLOCK)
                .open("/dev/net/tun")
                .context("opening /dev/net/tun (is the tun module loaded?)")?;
            set_iff(&tun, &ifname)
                .with_context(|| format!("creating TUN device {ifname} in netns {ns_path}"))?;
            if !ipv6 {
                // Without this the kernel sends MLD reports over the link as soon as it is
                // up: stray packets in the traffic being measured. /proc/sys/net belongs to
                // the namespace of the thread that opens it, which is the one we are in.
                let knob = format!("/proc/sys/net/ipv6/conf/{ifname}/disable_ipv6");
                if let Err(e) = std::fs::write(&knob, "1") {
                    tracing::debug!("cannot disable IPv6 on {ifname} ({knob}: {e})");
                }
            }
            Ok(tun)
        })
        .context("spawning the thread that enters the namespace")?;
    match worker.join() {
        Ok(result) => result,
        Err(_) => bail!("the thread creating TUN device in netns {netns} panicked"),
    }
}

fn set_iff(tun: &File, ifname: &str) -> std::io::Result<()> {
    // SAFETY: ifreq is plain old data; all-zero is a valid value.
    let mut ifr: libc::ifreq = unsafe { std::mem::zeroed() };
    for (dst, src) in ifr.ifr_name.iter_mut().zip(ifname.bytes()) {
        *dst = src as libc::c_char;
    }
    ifr.ifr_ifru.ifru_flags = (libc::IFF_TUN | libc::IFF_NO_PI) as libc::c_short;
    // SAFETY: TUNSETIFF reads and writes one ifreq, which outlives the call.
    let rc = unsafe { libc::ioctl(tun.as_raw_fd(), libc::TUNSETIFF as _, &mut ifr) };
    if rc < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// Runs `ip -n NETNS ARGS...`, turning a failure into an error that shows the command.
fn ip(netns: &str, args: &[&str]) -> Result<()> {
    let out = Command::new("ip")
        .arg("-n")
        .arg(netns)
        .args(args)
        .output()
        .context("running `ip` (install iproute2)")?;
    if !out.status.success() {
        bail!(
            "`ip -n {netns} {}` failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}
