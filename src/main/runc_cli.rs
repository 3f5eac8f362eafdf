//! The command line's runc options (`src --runc`, `dst --runc-bundle`).

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use clap::Args;

use pageserv::runc::{Runc, RuncRestore};

/// Which runc (with `src --runc` or `dst --runc-bundle`).
#[derive(Args)]
pub struct RuncArgs {
    /// runc's state directory (`runc --root`; runc's default when not given).
    #[arg(long, value_name = "DIR")]
    runc_root: Option<PathBuf>,
    /// The runc binary (default: `runc` on PATH).
    #[arg(long, value_name = "PATH")]
    runc_bin: Option<PathBuf>,
}

impl RuncArgs {
    pub fn runc(&self) -> Result<Runc> {
        Ok(Runc::locate(
            self.runc_bin.as_deref(),
            self.runc_root.clone(),
        )?)
    }
}

/// `dst --runc-bundle DIR [--name NAME]`: the container dst restores with runc. The bundle must
/// exist here, as at the source; NAME defaults to the bundle directory's name.
pub fn restore(opts: &RuncArgs, bundle: &Path, name: Option<&str>) -> Result<RuncRestore> {
    let runc = opts.runc()?;
    let bundle = std::fs::canonicalize(bundle).with_context(|| {
        format!(
            "the runc bundle {} (it must exist at dst, as at the source)",
            bundle.display()
        )
    })?;
    anyhow::ensure!(
        bundle.join("config.json").is_file(),
        "{} has no config.json: --runc-bundle takes the container's OCI bundle, as at the source",
        bundle.display()
    );
    let name = match name {
        Some(n) => n.to_string(),
        None => bundle
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .context("the bundle path has no last component: pass --name")?,
    };
    Ok(RuncRestore { runc, name, bundle })
}
