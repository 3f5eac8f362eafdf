//! Whether CRIU can keep its kernel-facts cache on this host.
//!
//! Every `criu` run starts by probing the kernel (`criu/kerndat.c: kerndat_init()`): ~30 ms here,
//! most of a `criu restore` of a small tree, and inside the migration's downtime when the
//! restore starts only once the images are in (stop-and-copy; post-copy with `--late-restore`,
//! `--restore-cmd` or `--runc-bundle`). A post-copy restore by default starts with the migration
//! and probes before the freeze ([`crate::dst::early_restore`]). CRIU skips the probing when `/run/criu.kdat` holds
//! the facts of an earlier run, and writes that file (`kerndat_save_cache()`) only if `/run` is a
//! tmpfs, so that a reboot drops it: it creates `/run/criu.kdat.tmp` with O_EXCL, checks the file
//! system, and renames the file into place. On a `/run` that is not a tmpfs, CRIU 4.x then unlinks
//! `criu.kdat` instead of the `.tmp` file it made (the `unl:` path of `kerndat_save_cache`), so
//! the `.tmp` file stays, and every later run's O_EXCL create fails: no cache, ever, until the
//! file is removed.
//!
//! [`judge`] is the rule, pure; [`probe`] reads the host.

use std::path::Path;

/// CRIU's cache file and its temporary, as a root CRIU names them (`KDAT_RUNDIR "/criu.kdat"`).
pub const KDAT_FILE: &str = "/run/criu.kdat";
pub const KDAT_TMP_FILE: &str = "/run/criu.kdat.tmp";

/// What this host's `/run` means for CRIU's cache.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KdatCache {
    /// A cache is there (or the next run writes one).
    Works,
    /// `/run` is not a tmpfs: CRIU never keeps a cache, every run probes the kernel again.
    RunNotTmpfs,
    /// A leftover `criu.kdat.tmp` stops CRIU from writing the cache (see the module docs).
    StaleTmp,
}

/// The facts [`judge`] needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RunDir {
    pub is_tmpfs: bool,
    pub cache_exists: bool,
    pub tmp_exists: bool,
}

/// CRIU reads a cache that exists whatever the file system; without one it writes one only on a
/// tmpfs, and only if no `.tmp` file is in the way.
pub fn judge(run: RunDir) -> KdatCache {
    if run.cache_exists {
        KdatCache::Works
    } else if !run.is_tmpfs {
        KdatCache::RunNotTmpfs
    } else if run.tmp_exists {
        KdatCache::StaleTmp
    } else {
        KdatCache::Works
    }
}

/// Reads `/run` (None if it cannot be examined).
pub fn probe() -> Option<KdatCache> {
    let fs = nix::sys::statfs::statfs("/run").ok()?;
    Some(judge(RunDir {
        is_tmpfs: fs.filesystem_type() == nix::sys::statfs::TMPFS_MAGIC,
        cache_exists: Path::new(KDAT_FILE).exists(),
        tmp_exists: Path::new(KDAT_TMP_FILE).exists(),
    }))
}

/// The warning for a host where every `criu restore` probes the kernel again, if it is one.
/// `early`: post-copy restores start with the migration, so only the others pay the probe.
pub fn warning(state: KdatCache, early: bool) -> Option<String> {
    let who = if early {
        "each stop-and-copy migration (a post-copy one starts its restore early and does not \
         pay it)"
    } else {
        "each migration"
    };
    match state {
        KdatCache::Works => None,
        KdatCache::RunNotTmpfs => Some(format!(
            "/run is not a tmpfs, so CRIU cannot cache its kernel probe ({KDAT_FILE}) and \
             probes again in every restore: about 30 ms more downtime for {who}. Mount a \
             tmpfs on /run (as systemd does) and remove {KDAT_TMP_FILE} if it is there"
        )),
        KdatCache::StaleTmp => Some(format!(
            "a leftover {KDAT_TMP_FILE} stops CRIU from caching its kernel probe, so it probes \
             again in every restore: about 30 ms more downtime for {who}. Remove the file \
             (no criu may be running)"
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(is_tmpfs: bool, cache_exists: bool, tmp_exists: bool) -> KdatCache {
        judge(RunDir {
            is_tmpfs,
            cache_exists,
            tmp_exists,
        })
    }

    #[test]
    fn a_cache_is_kept_only_on_a_tmpfs_without_a_leftover_tmp_file() {
        assert_eq!(run(true, false, false), KdatCache::Works);
        assert_eq!(run(true, false, true), KdatCache::StaleTmp);
        assert_eq!(run(false, false, false), KdatCache::RunNotTmpfs);
        assert_eq!(run(false, false, true), KdatCache::RunNotTmpfs);
        // An existing cache is read wherever it is.
        assert_eq!(run(false, true, true), KdatCache::Works);
        assert_eq!(run(true, true, true), KdatCache::Works);
        assert!(warning(KdatCache::Works, false).is_none());
        assert!(
            warning(KdatCache::StaleTmp, false)
                .unwrap()
                .contains(KDAT_TMP_FILE)
        );
        assert!(
            warning(KdatCache::RunNotTmpfs, true)
                .unwrap()
                .contains("stop-and-copy")
        );
    }
}
