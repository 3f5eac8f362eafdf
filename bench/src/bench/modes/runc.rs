//! Container modes: the same workload inside a runc container, migrated five ways.
//!
//! - `runc-lazy`: runc's own post-copy, the path `runc checkpoint --lazy-pages` exists for:
//!   `runc checkpoint --lazy-pages --page-server SRC:PORT --status-fd` at the source, `criu
//!   lazy-pages` and `runc restore --lazy-pages` at the destination.
//! - `runc-pageserver`: runc's stop-and-copy over TCP: `criu page-server` at the destination,
//!   `runc checkpoint --page-server DST:PORT`, the other images copied, `runc restore`.
//! - `pageserv-runc-lazy` / `pageserv-runc-precopy`: `pageserv src --lazy --runc NAME [--pre-copy
//!   auto]` and `pageserv dst --runc-bundle DIR`.
//! - `pageserv-runc-stop-and-copy`: `pageserv src --stop-and-copy --runc NAME` (runc pause,
//!   `runc checkpoint --leave-running` into pageserv's page server, the paused source deleted
//!   after the restore) and `pageserv dst --runc-bundle DIR` (`runc restore`).
//!
//! The container's rootfs holds the workload and the libraries `ldd` names; its log is on a bind
//! mount of the run's directory, so the bench reads it as for a bare process. Two runc state
//! directories stand for the two hosts, each bundle with a cgroup path of its own. Commands that
//! talk across the link run in the testbed's namespaces (CRIU's page server and lazy-pages
//! daemon, pageserv); `runc restore` and `pageserv dst` enter only the destination's network
//! namespace, never `ip netns exec`'s private /sys, where runc finds no cgroup mounts.

use std::io::{BufRead, BufReader};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use serde_json::Value;

use super::{AFTER_S, ModeOutcome};
use crate::bench::matrix::{Cell, Mode};
use crate::demo;
use crate::testbed::{Testbed, container};
use pageserv::criu::binary::{Criu, log_tail, pass_fds};
use pageserv::runc::{Runc, STATUS_FD};

/// One container run's names and places.
struct Ctr<'a> {
    bed: &'a Testbed,
    criu: Criu,
    runc: PathBuf,
    name: String,
    src_root: PathBuf,
    dst_root: PathBuf,
    src_bundle: PathBuf,
    dst_bundle: PathBuf,
    children: Vec<Child>,
}

/// Runs one container mode on `bed`.
pub fn run(cell: &Cell, bed: &Testbed) -> Result<ModeOutcome> {
    let criu = Criu::locate(None)?;
    let runc = Runc::locate(None, None)?.bin;
    let log = bed.dir.join("workload.log");
    let rootfs = container::make_rootfs(&bed.dir.join("rootfs"), &demo::sibling("workload")?)?;
    let name = format!("psb{}", std::process::id());
    // The same shape as the bare-process modes: with `--one-thread-workload` the heartbeat
    // thread itself writes (or in 0-write cells reads) the cell's pages, so its gaps include the
    // first post-copy faults.
    let mut args = vec!["--mib".to_string(), cell.mib.to_string()];
    args.extend(super::workload_shape(cell.write_rate).args());
    args.extend(["--log".into(), "/log/workload.log".into()]);
    let src_bundle = container::write_bundle(
        &runc,
        &bed.dir.join("bundle-src"),
        &rootfs,
        &args,
        &format!("/{name}-src"),
        &bed.dir,
    )?;
    let dst_bundle = container::write_bundle(
        &runc,
        &bed.dir.join("bundle-dst"),
        &rootfs,
        &args,
        &format!("/{name}-dst"),
        &bed.dir,
    )?;
    let mut c = Ctr {
        bed,
        criu,
        runc,
        src_root: bed.dir.join("runc-src"),
        dst_root: bed.dir.join("runc-dst"),
        src_bundle,
        dst_bundle,
        name,
        children: Vec::new(),
    };
    let st = c
        .runc_cmd(&c.src_root.clone(), false)
        .args(["run", "-d", "--bundle"])
        .arg(&c.src_bundle)
        .arg(&c.name)
        .status()
        .context("runc run")?;
    if !st.success() {
        bail!("runc run of the workload container failed ({st})");
    }
    let deadline = Instant::now() + Duration::from_secs(60);
    while !std::fs::read_to_string(&log)
        .unwrap_or_default()
        .lines()
        .any(|l| l.starts_with("ready "))
    {
        if Instant::now() > deadline {
            c.cleanup();
            bail!("the container's workload did not get ready within 60 s");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    std::thread::sleep(Duration::from_secs(1));

    let started = Instant::now();
    let started_ns = demo::unix_ns();
    let migrated = match cell.mode {
        Mode::RuncLazy => c.runc_lazy().map(|()| (None, None)),
        Mode::RuncPageserver => c.runc_page_server().map(|()| (None, None)),
        Mode::PageservRuncLazy => c.pageserv(Via::Lazy),
        Mode::PageservRuncPrecopy => c.pageserv(Via::PreCopy),
        Mode::PageservRuncStopAndCopy => c.pageserv(Via::StopAndCopy),
        m => Err(anyhow::anyhow!("{} is not a container mode", m.name())),
    };
    let total_ms = started.elapsed().as_secs_f64() * 1e3;
    let migrated_ns = demo::unix_ns();
    let mut problems = Vec::new();
    let (mut p50, mut p99) = (None, None);
    match migrated {
        Ok((a, b)) => {
            (p50, p99) = (a, b);
            std::thread::sleep(Duration::from_secs(AFTER_S));
            if c.status(&c.dst_root).as_deref() != Some("running") {
                problems.push("the container is not running at the destination".into());
            }
            if c.status(&c.src_root).is_some() {
                problems.push("the source container still exists (two copies)".into());
            }
        }
        Err(ref e) => problems.push(format!("{e:#}")),
    }
    let ok = problems.is_empty();
    c.cleanup();
    Ok(ModeOutcome {
        started_ns,
        migrated_ns,
        total_ms: ok.then_some(total_ms),
        wire_bytes: None,
        fault_p50_us: p50,
        fault_p99_us: p99,
        // runc freezes the container through its cgroup before CRIU seizes it: not watched.
        criu_freeze_ms: None,
        restore_ms: None,
        problems,
        log: std::fs::read_to_string(&log).unwrap_or_default(),
        usage: None,
    })
}

impl Ctr<'_> {
    /// `runc --criu C --root ROOT ...`, optionally in the destination's network namespace.
    fn runc_cmd(&self, root: &Path, in_dst_net: bool) -> Command {
        let mut cmd = Command::new(&self.runc);
        cmd.arg("--criu")
            .arg(&self.criu.path)
            .arg("--root")
            .arg(root)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        if in_dst_net {
            enter_net(&mut cmd, &self.bed.netns);
        }
        cmd
    }

    fn status(&self, root: &Path) -> Option<String> {
        let out = Command::new(&self.runc)
            .arg("--root")
            .arg(root)
            .args(["state", &self.name])
            .output()
            .ok()?;
        let v: Value = serde_json::from_slice(&out.stdout).ok()?;
        out.status
            .success()
            .then(|| v["status"].as_str().map(str::to_string))?
    }

    /// Ends what this run started: both containers, the CRIU helpers.
    fn cleanup(&mut self) {
        for root in [self.src_root.clone(), self.dst_root.clone()] {
            if self.status(&root).is_some() {
                let _ = Command::new(&self.runc)
                    .arg("--root")
                    .arg(&root)
                    .args(["delete", "--force", &self.name])
                    .output();
            }
        }
        for c in &mut self.children {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    fn wait(&mut self, mut child: Child, what: &str, log: &Path) -> Result<()> {
        match pageserv::child::wait_timeout(&mut child, super::step_timeout())? {
            Some(s) if s.success() => Ok(()),
            other => {
                self.children.push(child);
                bail!(
                    "{what} failed ({}); {} ends:\n{}",
                    other.map_or_else(|| "timed out".to_string(), |s| s.to_string()),
                    log.display(),
                    log_tail(log, 15)
                )
            }
        }
    }

    /// Starts `cmd` with a status pipe on [`STATUS_FD`] and waits for its ready byte (EOF:
    /// it ended without getting ready).
    fn start_ready(&mut self, mut cmd: Command, what: &str, log: &Path) -> Result<Child> {
        let (r, w) = nix::unistd::pipe().context("status pipe")?;
        pass_fds(&mut cmd, &[(&w, STATUS_FD)]);
        let child = cmd.spawn().with_context(|| format!("starting {what}"))?;
        drop(w);
        let mut b = [0u8; 1];
        let ready = std::io::Read::read(&mut std::fs::File::from(r), &mut b);
        if !matches!(ready, Ok(1)) || b[0] != 0 {
            self.children.push(child);
            bail!(
                "{what} did not become ready; {} ends:\n{}",
                log.display(),
                log_tail(log, 15)
            );
        }
        Ok(child)
    }

    fn runc_restore(&mut self, images: &Path, work: &Path, lazy: bool) -> Result<Child> {
        let mut cmd = self.runc_cmd(&self.dst_root.clone(), true);
        cmd.args(["restore", "-d", "--bundle"])
            .arg(&self.dst_bundle)
            .arg("--image-path")
            .arg(images)
            .arg("--work-path")
            .arg(work);
        if lazy {
            cmd.arg("--lazy-pages");
        }
        cmd.arg(&self.name);
        cmd.spawn().context("runc restore")
    }

    fn runc_lazy(&mut self) -> Result<()> {
        let dir = self.bed.dir.clone();
        let (img, src_work, dst_work) = (dir.join("img"), dir.join("src-w"), dir.join("dst-w"));
        for d in [&img, &src_work, &dst_work] {
            std::fs::create_dir_all(d)?;
        }
        let port = 27000 + (std::process::id() % 3000) as u16;
        let ps = format!("{}:{port}", self.bed.src_addr);
        let mut ck = self.runc_cmd(&self.src_root.clone(), false);
        self.bed.enter_src(&mut ck);
        ck.args(["checkpoint", "--lazy-pages", "--page-server", &ps])
            .args(["--status-fd", &STATUS_FD.to_string(), "--image-path"])
            .arg(&img)
            .arg("--work-path")
            .arg(&src_work)
            .arg(&self.name);
        let dump_log = src_work.join("dump.log");
        let dump = self.start_ready(ck, "runc checkpoint --lazy-pages", &dump_log)?;
        let lp_log = dst_work.join("lazy-pages.log");
        let mut lp = self.bed.in_dst(&self.criu.path);
        lp.args(["lazy-pages", "--page-server", "--address"])
            .arg(self.bed.src_addr.to_string())
            .args(["--port", &port.to_string(), "-D"])
            .arg(&img)
            .arg("-W")
            .arg(&dst_work)
            .arg("-o")
            .arg(&lp_log)
            .args(["--status-fd", &STATUS_FD.to_string()])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        let daemon = self.start_ready(lp, "criu lazy-pages", &lp_log)?;
        let restore = self.runc_restore(&img, &dst_work, true);
        let restored = restore.and_then(|r| {
            self.wait(
                r,
                "runc restore --lazy-pages",
                &dst_work.join("restore.log"),
            )
        });
        if let Err(e) = restored {
            self.children.extend([dump, daemon]);
            return Err(e);
        }
        // Done when every page went over: the dump and the daemon end.
        let dumped = self.wait(dump, "runc checkpoint --lazy-pages", &dump_log);
        let served = self.wait(daemon, "criu lazy-pages", &lp_log);
        dumped.and(served)
    }

    fn runc_page_server(&mut self) -> Result<()> {
        let dir = self.bed.dir.clone();
        let (src_img, dst_img) = (dir.join("src-img"), dir.join("dst-img"));
        let (src_work, dst_work) = (dir.join("src-w"), dir.join("dst-w"));
        for d in [&src_img, &dst_img, &src_work, &dst_work] {
            std::fs::create_dir_all(d)?;
        }
        let port = 28000 + (std::process::id() % 3000) as u16;
        let ps_log = dst_work.join("page-server.log");
        let mut ps = self.bed.in_dst(&self.criu.path);
        ps.args(["page-server", "-D"])
            .arg(&dst_img)
            .args(["--address", &self.bed.dst_addr.to_string()])
            .args(["--port", &port.to_string(), "-o"])
            .arg(&ps_log)
            .args(["--status-fd", &STATUS_FD.to_string()])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        let server = self.start_ready(ps, "criu page-server", &ps_log)?;
        let mut ck = self.runc_cmd(&self.src_root.clone(), false);
        self.bed.enter_src(&mut ck);
        ck.args(["checkpoint", "--page-server"])
            .arg(format!("{}:{port}", self.bed.dst_addr))
            .arg("--image-path")
            .arg(&src_img)
            .arg("--work-path")
            .arg(&src_work)
            .arg(&self.name);
        let dumped = ck
            .spawn()
            .context("runc checkpoint --page-server")
            .and_then(|d| {
                self.wait(
                    d,
                    "runc checkpoint --page-server",
                    &src_work.join("dump.log"),
                )
            });
        if let Err(e) = dumped {
            self.children.push(server);
            return Err(e);
        }
        self.wait(server, "criu page-server", &ps_log)?;
        for e in std::fs::read_dir(&src_img)? {
            let e = e?;
            let to = dst_img.join(e.file_name());
            if e.file_type()?.is_file() && !to.exists() {
                std::fs::copy(e.path(), to)?;
            }
        }
        let restore = self.runc_restore(&dst_img, &dst_work, false)?;
        self.wait(restore, "runc restore", &dst_work.join("restore.log"))
    }

    /// pageserv's container modes; returns the destination's fault latency p50/p99.
    fn pageserv(&mut self, via: Via) -> Result<(Option<f64>, Option<f64>)> {
        let exe = crate::demo::sibling("pageserv")?;
        let (src_certs, dst_certs) = pageserv::keys::demo_identities(&self.bed.dir.join("keys"))?;
        let port = 41000 + (std::process::id() % 20000) as u16;
        let to = format!("{}:{port}", self.bed.dst_addr);
        let (src_json, dst_json) = (self.bed.dir.join("src.json"), self.bed.dir.join("dst.json"));
        let extra = super::pageserv_args();
        let mut dst = Command::new(&exe);
        enter_net(&mut dst, &self.bed.netns);
        dst.args(["dst", "--listen", &to, "--certs"])
            .arg(&dst_certs)
            .arg("--work")
            .arg(self.bed.dir.join("dst"))
            .arg("--stats-json")
            .arg(&dst_json)
            .arg("--runc-bundle")
            .arg(&self.dst_bundle)
            .args(["--name", &self.name, "--runc-root"])
            .arg(&self.dst_root)
            .args(&extra.dst)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        let mut dst = dst.spawn().context("starting pageserv dst")?;
        let stderr = dst.stderr.take().context("dst stderr")?;
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut said = false;
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if !said && line.contains("pageserv dst ready") {
                    said = true;
                    let _ = tx.send(());
                }
            }
        });
        if rx.recv_timeout(Duration::from_secs(20)).is_err() {
            self.children.push(dst);
            bail!("pageserv dst did not get ready within 20 s");
        }
        let mut src = Command::new(&exe);
        self.bed.enter_src(&mut src);
        let mode = match via {
            Via::StopAndCopy => "--stop-and-copy",
            Via::Lazy | Via::PreCopy => "--lazy",
        };
        src.args(["src", mode, "--to", &to, "--dst-name", "dst", "--certs"])
            .arg(&src_certs)
            .arg("--work")
            .arg(self.bed.dir.join("src"))
            .arg("--stats-json")
            .arg(&src_json)
            .args(["--runc", &self.name, "--runc-root"])
            .arg(&self.src_root)
            .args(&extra.src)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        if let Via::PreCopy = via {
            src.arg("--pre-copy=auto");
        }
        let src = src.spawn().context("starting pageserv src")?;
        let src_done = self.wait(src, "pageserv src", &src_json);
        let dst_done = self.wait(dst, "pageserv dst", &dst_json);
        src_done?;
        dst_done?;
        if let Via::StopAndCopy = via {
            // A stop-and-copy restore has no faults to time.
            return Ok((None, None));
        }
        let v: Value = serde_json::from_str(&std::fs::read_to_string(&dst_json)?)?;
        let f = |k: &str| v["fault_latency"][k].as_f64();
        Ok((f("p50_us"), f("p99_us")))
    }
}

/// How pageserv migrates the container.
#[derive(Clone, Copy)]
enum Via {
    Lazy,
    PreCopy,
    StopAndCopy,
}

/// Makes `cmd` enter the network namespace `/var/run/netns/NAME` (and nothing else).
fn enter_net(cmd: &mut Command, netns: &str) {
    let Ok(f) = std::fs::File::open(format!("/var/run/netns/{netns}")) else {
        return;
    };
    let raw = f.as_raw_fd();
    // The file must stay open until exec: it is leaked into this process on purpose, one per
    // command (a few per bench run).
    std::mem::forget(f);
    // SAFETY: setns is a plain system call, async-signal-safe.
    unsafe {
        use std::os::unix::process::CommandExt;
        cmd.pre_exec(move || {
            if libc::setns(raw, libc::CLONE_NEWNET) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            libc::close(raw);
            Ok(())
        });
    }
}
