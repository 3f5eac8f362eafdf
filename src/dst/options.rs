//! What `pageserv dst` is told on its command line, shared by the accept loop
//! ([`crate::dst::endpoint`]), the post-copy migration ([`crate::dst::migration`]) and the
//! stop-and-copy one ([`crate::dst::stop_and_copy`]).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::time::Duration;

use crate::criu::binary::Criu;
use crate::dst::restore::RestoreOptions;
use crate::keys::trust::Fingerprint;
use crate::transport;

#[derive(Debug, Clone)]
pub struct DstOptions {
    pub listen: SocketAddr,
    pub certs: PathBuf,
    /// Each migration gets a fresh directory below this one.
    pub work_base: PathBuf,
    pub criu: Criu,
    pub restore: RestoreOptions,
    /// Pages after a faulting page requested with it.
    pub readahead_pages: u64,
    /// Adaptive read-ahead for faults in address order (`--sequential-readahead`).
    pub sequential_readahead: bool,
    /// The endpoint's transport (its idle timeout above all: how soon a dead link is noticed).
    pub transport: transport::TransportOptions,
    /// How long a migration whose link died keeps its restored tasks waiting for the source to
    /// reconnect (0: fail at once). See dst::post_copy.
    pub recover_timeout: Duration,
    /// Which verified sources are admitted (`--allow-source`, `--deny-cert`).
    pub admission: crate::keys::trust::Admission,
    /// What a source may make this dst hold (memory, disk, files, time): see [`crate::limits`].
    pub limits: crate::limits::DstLimits,
    /// Keep a migration's directory after it succeeded too (`--keep-work`); a failed one's is
    /// always kept.
    pub keep_work: bool,
}

/// A migration in `dir` ended with `r`: on success its directory is removed (unless `keep`);
/// on failure it is kept, and the error names it.
pub(crate) fn leave_dir<T>(dir: &Path, r: Result<T>, keep: bool) -> Result<T> {
    match r {
        Ok(v) => {
            if !keep && let Err(e) = std::fs::remove_dir_all(dir) {
                tracing::warn!(dir = %dir.display(), "removing the migration's directory: {e}");
            }
            Ok(v)
        }
        Err(e) => Err(e.context(format!(
            "migration directory {} kept for inspection (images, restore.log); remove it when done",
            dir.display()
        ))),
    }
}

/// The file in a migration's directory naming its id (a restarted dst adopts by it).
pub const MIGRATION_ID_FILE: &str = "migration-id";
/// The file in a migration's directory naming who opened it: the SHA-256 fingerprint of the
/// control connection's certificate, then its names (for logs). 0600, beside
/// [`MIGRATION_ID_FILE`]: a restarted dst that adopts the migration (dst::adopt) routes its
/// resume and fault connections to that certificate only, as the dst that died did.
pub const OPENER_FILE: &str = "opener-cert";

/// Records migration `migration_id`'s id and opener (`opener`, named `name`) in its fresh
/// directory `dir`, each file new and 0600.
pub(crate) fn record_opener(
    dir: &Path,
    migration_id: &str,
    opener: &Fingerprint,
    name: &str,
) -> Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    for (file, text) in [
        (MIGRATION_ID_FILE, migration_id.to_string()),
        (OPENER_FILE, format!("{opener}\n{name}\n")),
    ] {
        std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(dir.join(file))
            .and_then(|mut f| f.write_all(text.as_bytes()))
            .with_context(|| format!("recording the migration's {file} in {}", dir.display()))?;
    }
    Ok(())
}

/// The opener [`record_opener`] wrote in `dir`: its fingerprint and names.
pub(crate) fn read_opener(dir: &Path) -> Result<(Fingerprint, String)> {
    let path = dir.join(OPENER_FILE);
    let text = std::fs::read_to_string(&path).with_context(|| {
        format!(
            "reading {} (who opened the migration): without it no source could be bound to              the migration, so it is not adopted",
            path.display()
        )
    })?;
    let mut lines = text.lines();
    let fp = lines
        .next()
        .and_then(|l| Fingerprint::parse(l.trim()))
        .with_context(|| {
            format!(
                "{} does not start with a SHA-256 fingerprint: the migration is not adopted",
                path.display()
            )
        })?;
    Ok((fp, lines.next().unwrap_or("").trim().to_string()))
}

/// The file in a migration's directory written once the restore finished: `<unix ns> <freeze
/// unix ns>`. Only such a migration can be adopted by a restarted dst.
pub const RESTORE_FINISHED_FILE: &str = "restore-finished";

/// A new directory for migration `migration_id` below `base` (its id cleaned to a file name;
/// `.1`, `.2`, … if taken).
pub(crate) fn fresh_dir(base: &Path, migration_id: &str) -> Result<PathBuf> {
    let clean: String = migration_id
        .chars()
        .filter(|c| c.is_ascii_alphanumeric() || *c == '-')
        .take(64)
        .collect();
    let clean = if clean.is_empty() {
        "migration".to_string()
    } else {
        clean
    };
    for n in 0..1000 {
        let d = base.join(if n == 0 {
            clean.clone()
        } else {
            format!("{clean}.{n}")
        });
        // 0700: the images hold the tree's memory and the directory name its migration id.
        let private = || {
            std::fs::DirBuilder::new()
                .mode(0o700)
                .create(&d)
                .and_then(|()| std::fs::set_permissions(&d, std::fs::Permissions::from_mode(0o700)))
        };
        match std::fs::create_dir_all(base).and_then(|_| private()) {
            Ok(()) => return Ok(d),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
            Err(e) => return Err(e).with_context(|| format!("creating {}", d.display())),
        }
    }
    bail!("no free migration directory under {}", base.display())
}
