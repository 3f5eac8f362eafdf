//! Finding the CRIU binary, checking its version, and building its command lines.
//!
//! pageserv looks for CRIU in this order: `--criu PATH`, `$PAGESERV_CRIU`, the private prefix that
//! `tools/setup-criu` installs, then `criu` on PATH. CRIU older than 4.0 is refused: 3.x fails on
//! current kernels (vDSO) and its lazy-pages path predates the behaviour pageserv relies on.

use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use crate::criu::page_server::Layout;

/// Where `tools/setup-criu` installs its wrapper.
pub const PRIVATE_PREFIX_CRIU: &str = "/opt/pageserv/criu/bin/criu";

#[derive(Debug, thiserror::Error)]
pub enum CriuBinaryError {
    #[error(
        "no CRIU found (tried {tried}); run `tools/setup-criu` as root, or pass --criu PATH / set PAGESERV_CRIU"
    )]
    NotFound { tried: String },
    #[error("could not run `{path} --version`: {source}")]
    Run {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("`{path} --version` printed no version line (got {output:?}); is it really CRIU?")]
    NoVersion { path: PathBuf, output: String },
    #[error(
        "CRIU at {path} is version {version}; pageserv needs CRIU >= 4.0 (older releases fail on this \
         kernel's vDSO and lack the lazy-pages behaviour pageserv relies on). Run `tools/setup-criu`."
    )]
    TooOld { path: PathBuf, version: Version },
}

/// A CRIU release number.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Version {
    pub major: u32,
    pub minor: u32,
    pub patch: u32,
}

impl std::fmt::Display for Version {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}.{}.{}", self.major, self.minor, self.patch)
    }
}

impl Version {
    /// Parses CRIU's `--version` output ("Version: 4.1.1" on its first line; a GitCommitID line may follow).
    pub fn parse_criu_output(out: &str) -> Option<Version> {
        let line = out
            .lines()
            .find_map(|l| l.trim().strip_prefix("Version:"))?;
        let mut parts = line.trim().split(|c: char| !c.is_ascii_digit());
        let major = parts.next()?.parse().ok()?;
        let minor = parts.next().and_then(|p| p.parse().ok()).unwrap_or(0);
        let patch = parts.next().and_then(|p| p.parse().ok()).unwrap_or(0);
        Some(Version {
            major,
            minor,
            patch,
        })
    }
}

/// The highest CRIU log level (`-v4`, debug: every VMA, page pipe and restore step).
pub const MAX_VERBOSITY: u8 = 4;

/// A located, version-checked CRIU.
#[derive(Debug, Clone)]
pub struct Criu {
    pub path: PathBuf,
    pub version: Version,
    /// CRIU's log level for the dumps and restores pageserv starts (`-vN`, 0..=4); `None` passes
    /// no `-v`, so CRIU logs at its own default (2: errors and warnings), as a user's CRIU does.
    /// Everything pageserv reads from CRIU's logs (its `Error` lines and the tail an error
    /// message carries) is there at the default; 3 and 4 are for debugging CRIU itself, and 4
    /// writes a line per VMA and page pipe, which costs the frozen dump time.
    pub verbosity: Option<u8>,
}

impl Criu {
    /// Finds CRIU (see the module docs for the order) and checks its version.
    pub fn locate(explicit: Option<&Path>) -> Result<Criu, CriuBinaryError> {
        let mut candidates: Vec<PathBuf> = Vec::new();
        if let Some(p) = explicit {
            candidates.push(p.to_path_buf());
        } else {
            if let Some(p) = std::env::var_os("PAGESERV_CRIU") {
                candidates.push(PathBuf::from(p));
            }
            candidates.push(PathBuf::from(PRIVATE_PREFIX_CRIU));
            if let Some(path) = std::env::var_os("PATH") {
                candidates.extend(std::env::split_paths(&path).map(|d| d.join("criu")));
            }
        }
        let found = candidates.iter().find(|p| p.is_file());
        let Some(path) = found else {
            let tried = candidates
                .iter()
                .take(3)
                .map(|p| p.display().to_string())
                .collect::<Vec<_>>()
                .join(", ");
            return Err(CriuBinaryError::NotFound {
                tried: format!("{tried}, PATH"),
            });
        };
        Self::at(path)
    }

    /// Checks the CRIU at `path`.
    pub fn at(path: &Path) -> Result<Criu, CriuBinaryError> {
        let out = Command::new(path)
            .arg("--version")
            .stdin(Stdio::null())
            .output()
            .map_err(|source| CriuBinaryError::Run {
                path: path.to_path_buf(),
                source,
            })?;
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        let version =
            Version::parse_criu_output(&text).ok_or_else(|| CriuBinaryError::NoVersion {
                path: path.to_path_buf(),
                output: text.chars().take(200).collect(),
            })?;
        if version.major < 4 {
            return Err(CriuBinaryError::TooOld {
                path: path.to_path_buf(),
                version,
            });
        }
        Ok(Criu {
            path: path.to_path_buf(),
            version,
            verbosity: None,
        })
    }

    /// This CRIU logging at `verbosity` (see [`Criu::verbosity`]; above
    /// [`MAX_VERBOSITY`] counts as it).
    pub fn with_verbosity(mut self, verbosity: Option<u8>) -> Criu {
        self.verbosity = verbosity.map(|v| v.min(MAX_VERBOSITY));
        self
    }

    /// CRIU's logging options for one invocation: `-o LOG`, then `-vN` if a level was asked
    /// for. The one place pageserv sets CRIU's log level.
    pub fn log_args(&self, log: &Path) -> Vec<std::ffi::OsString> {
        let mut args = vec!["-o".into(), log.as_os_str().to_owned()];
        if let Some(v) = self.verbosity {
            args.push(format!("-v{v}").into());
        }
        args
    }

    /// The page-server header layout this CRIU speaks (it has no version field on the wire).
    pub fn layout(&self) -> Layout {
        Layout::for_criu_version(self.version.major, self.version.minor)
    }

    /// A bare command for this CRIU.
    pub fn command(&self) -> Command {
        let mut cmd = Command::new(&self.path);
        cmd.stdin(Stdio::null());
        cmd
    }
}

/// Makes each `(fd, n)` appear in the child as descriptor number `n`, without CLOEXEC.
/// CRIU takes `--ps-socket N` and `--status-fd N` as numbers, so they must survive `exec`. The
/// caller keeps ownership and must drop its copies right after spawning: a parent that keeps the
/// status pipe's write end open would never see EOF when CRIU dies.
pub fn pass_fds(cmd: &mut Command, fds: &[(&OwnedFd, i32)]) {
    let raw: Vec<(i32, i32)> = fds.iter().map(|(fd, to)| (fd.as_raw_fd(), *to)).collect();
    // SAFETY: between fork and exec only async-signal-safe calls (fcntl, dup2, close) are made on
    // memory allocated before the fork.
    unsafe {
        cmd.pre_exec(move || {
            // Move every source above the targets first, so no dup2 clobbers a later source.
            let mut hi_fds = [0i32; 8];
            for (i, (from, _)) in raw.iter().enumerate().take(hi_fds.len()) {
                let hi = libc::fcntl(*from, libc::F_DUPFD_CLOEXEC, 100);
                if hi < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                hi_fds[i] = hi;
            }
            for (i, (_, to)) in raw.iter().enumerate().take(hi_fds.len()) {
                // dup2 clears CLOEXEC on the new descriptor.
                if libc::dup2(hi_fds[i], *to) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
            }
            Ok(())
        });
    }
}

/// The last `max_lines` lines of a CRIU log, for error messages.
pub fn log_tail(log: &Path, max_lines: usize) -> String {
    match std::fs::read_to_string(log) {
        Ok(text) => {
            let lines: Vec<&str> = text.lines().collect();
            let start = lines.len().saturating_sub(max_lines);
            lines[start..].join("\n")
        }
        Err(e) => format!("(no log at {}: {e})", log.display()),
    }
}

/// The last `max` lines of a CRIU log text that report an error (CRIU writes them as
/// `(time) pid: Error (file:line): what`), oldest first.
pub fn error_lines(text: &str, max: usize) -> Vec<String> {
    let errors: Vec<&str> = text
        .lines()
        .filter(|l| l.contains("Error") || l.contains("ERROR"))
        .collect();
    let start = errors.len().saturating_sub(max);
    errors[start..]
        .iter()
        .map(|l| l.trim().to_string())
        .collect()
}

/// [`error_lines`] of the CRIU log at `log` (none if it cannot be read).
pub fn log_errors(log: &Path, max: usize) -> Vec<String> {
    std::fs::read_to_string(log)
        .map(|t| error_lines(&t, max))
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn picks_the_last_error_lines() {
        let log = "(00.01) 1: restoring\n\
                   (00.02) 1: Error (criu/files-reg.c:2101): File tmp/wl.log has bad size 10 (expect 4)\n\
                   (00.03) 1: Error (criu/cr-restore.c:1480): Restoring FAILED.\n\
                   (00.04) 1: done\n";
        let e = error_lines(log, 3);
        assert_eq!(e.len(), 2);
        assert!(e[0].contains("has bad size"), "{e:?}");
        assert_eq!(error_lines(log, 1).len(), 1);
        assert!(error_lines("all good\n", 3).is_empty());
    }

    #[test]
    fn log_level_is_criu_default_unless_asked() {
        let c = Criu {
            path: PathBuf::from("/x/criu"),
            version: Version {
                major: 4,
                minor: 2,
                patch: 1,
            },
            verbosity: None,
        };
        let log = Path::new("/w/dump.log");
        assert_eq!(c.log_args(log), ["-o", "/w/dump.log"]);
        let c = c.with_verbosity(Some(4));
        assert_eq!(c.log_args(log), ["-o", "/w/dump.log", "-v4"]);
        assert_eq!(c.with_verbosity(Some(9)).verbosity, Some(MAX_VERBOSITY));
    }

    #[test]
    fn parses_criu_version_lines() {
        let v = Version::parse_criu_output("Version: 4.1.1\n").unwrap();
        assert_eq!((v.major, v.minor, v.patch), (4, 1, 1));
        let v = Version::parse_criu_output("Version: 4.2\nGitID: v4.2-10-gabc\n").unwrap();
        assert_eq!((v.major, v.minor, v.patch), (4, 2, 0));
        assert!(Version::parse_criu_output("criu: command not found").is_none());
    }

    /// A fake `criu` that prints `version_line` for `--version` (CRIU 3.x cannot be installed
    /// here); its directory is removed on drop.
    struct FakeCriu(PathBuf);

    impl std::ops::Deref for FakeCriu {
        type Target = Path;
        fn deref(&self) -> &Path {
            &self.0
        }
    }

    impl Drop for FakeCriu {
        fn drop(&mut self) {
            if let Some(dir) = self.0.parent() {
                let _ = std::fs::remove_dir_all(dir);
            }
        }
    }

    fn fake_criu(name: &str, version_line: &str) -> FakeCriu {
        use std::os::unix::fs::PermissionsExt;
        let dir = std::env::temp_dir().join(format!("fake-criu-{}-{name}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("criu");
        std::fs::write(&path, format!("#!/bin/sh\necho '{version_line}'\n")).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
        FakeCriu(path)
    }

    #[test]
    fn refuses_criu_older_than_4() {
        let old = fake_criu("old", "Version: 3.17.1");
        let err = Criu::at(&old).unwrap_err();
        assert!(matches!(err, CriuBinaryError::TooOld { .. }), "{err}");
        assert!(err.to_string().contains("needs CRIU >= 4.0"), "{err}");
        let new = fake_criu("new", "Version: 4.2");
        let c = Criu::locate(Some(&new)).unwrap();
        assert_eq!(c.version.to_string(), "4.2.0");
        assert!(matches!(c.layout(), Layout::V42));
        let junk = fake_criu("junk", "hello");
        assert!(matches!(
            Criu::at(&junk),
            Err(CriuBinaryError::NoVersion { .. })
        ));
        let missing = std::env::temp_dir().join("no-such-dir-pageserv/criu");
        assert!(matches!(
            Criu::locate(Some(&missing)),
            Err(CriuBinaryError::NotFound { .. })
        ));
    }

    #[test]
    fn orders_versions() {
        let a = Version {
            major: 3,
            minor: 17,
            patch: 1,
        };
        let b = Version {
            major: 4,
            minor: 0,
            patch: 0,
        };
        assert!(a < b);
    }
}
