//! An OCI bundle around the self-verifying workload, for the bench's container modes and the
//! container tests: a root filesystem with the workload and the libraries `ldd` names, and a
//! `config.json` from `runc spec` changed to run it without a terminal, with a host directory
//! bind-mounted at /log for its log and a cgroup path of its own.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, bail};
use serde_json::{Value, json};

/// Copies `workload` and the shared libraries it needs into `root` (created).
pub fn make_rootfs(root: &Path, workload: &Path) -> Result<PathBuf> {
    for d in ["bin", "proc", "dev", "sys", "tmp", "log"] {
        std::fs::create_dir_all(root.join(d))
            .with_context(|| format!("making {}", root.join(d).display()))?;
    }
    std::fs::copy(workload, root.join("bin/workload")).context("copying the workload")?;
    let ldd = Command::new("ldd")
        .arg(workload)
        .output()
        .context("running ldd")?;
    for line in String::from_utf8_lossy(&ldd.stdout).lines() {
        // "libc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x...)" or "/lib64/ld-linux... (0x...)"
        if let Some(p) = line.split_whitespace().find(|w| w.starts_with('/')) {
            let to = root.join(p.trim_start_matches('/'));
            std::fs::create_dir_all(to.parent().context("a library path has a parent")?)?;
            std::fs::copy(p, &to).with_context(|| format!("copying {p}"))?;
        }
    }
    Ok(root.to_path_buf())
}

/// Writes the bundle `dir` (created): `runc spec`, then `/bin/workload ARGS`, no terminal,
/// `log_dir` bind-mounted at /log, cgroup path `cgroup`.
pub fn write_bundle(
    runc: &Path,
    dir: &Path,
    rootfs: &Path,
    args: &[String],
    cgroup: &str,
    log_dir: &Path,
) -> Result<PathBuf> {
    std::fs::create_dir_all(dir).with_context(|| format!("making {}", dir.display()))?;
    let st = Command::new(runc)
        .arg("spec")
        .current_dir(dir)
        .status()
        .context("runc spec")?;
    if !st.success() {
        bail!("runc spec failed in {}", dir.display());
    }
    let path = dir.join("config.json");
    let mut c: Value = serde_json::from_str(&std::fs::read_to_string(&path)?)
        .with_context(|| format!("reading {}", path.display()))?;
    let mut argv = vec!["/bin/workload".to_string()];
    argv.extend(args.iter().cloned());
    c["process"]["terminal"] = json!(false);
    c["process"]["args"] = json!(argv);
    c["root"]["path"] = json!(rootfs);
    c["root"]["readonly"] = json!(false);
    c["linux"]["cgroupsPath"] = json!(cgroup);
    c["mounts"]
        .as_array_mut()
        .context("config.json has no mounts")?
        .push(
            json!({"destination": "/log", "type": "bind", "source": log_dir,
                     "options": ["rbind", "rw"]}),
        );
    std::fs::write(&path, serde_json::to_string_pretty(&c)?)
        .with_context(|| format!("writing {}", path.display()))?;
    Ok(dir.to_path_buf())
}
