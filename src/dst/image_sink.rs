//! Receives the image directory from the source, one chunk at a time.
//!
//! The peer chooses file names and sizes, so both are checked: a name is a single plain path
//! component (no `/`, no `..`, no hidden files), chunks of a file arrive in order, and the whole
//! directory is capped (`--max-images-mib`, then the source's own plan: see
//! [`ImageSink::plan`]), as are the files open at once. Nothing is written outside the fresh
//! directory made for this migration. Limits: [`crate::limits`].

use std::collections::BTreeMap;
use std::fs::File;
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use crate::limits::{self, LimitHit, MAX_IMAGE_FILES, MAX_OPEN_IMAGE_FILES, flag, mib};

#[derive(Debug, thiserror::Error)]
pub enum SinkError {
    #[error("the source sent an image named {0:?}, which is not a plain file name; refusing it")]
    BadName(String),
    #[error(
        "image {name}: chunk at offset {got}, expected {want}: the source sent chunks out of order"
    )]
    OutOfOrder { name: String, got: u64, want: u64 },
    #[error("image {0} was sent again after it was closed")]
    Reopened(String),
    #[error("refusing the source's images: {0}")]
    Limit(LimitHit),
    #[error(
        "the source sent more images than it announced ({what}: {got} > {planned}); refusing them"
    )]
    OverPlan {
        what: &'static str,
        got: u64,
        planned: u64,
    },
    #[error(
        "cannot read the free space of {path} (statvfs): {source}; check that the work \
         directory exists and is readable"
    )]
    Statvfs {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("writing image {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "the source said it sent {said} files / {said_bytes} bytes, but {got} / {got_bytes} arrived"
    )]
    Mismatch {
        said: u32,
        said_bytes: u64,
        got: u32,
        got_bytes: u64,
    },
}

struct Open {
    file: File,
    next: u64,
}

/// Writes received images into one directory.
pub struct ImageSink {
    dir: PathBuf,
    open: BTreeMap<String, Open>,
    closed: BTreeMap<String, u64>,
    bytes: u64,
    /// `--max-images-mib`.
    max_bytes: u64,
    /// The source's announced (files, bytes), once [`ImageSink::plan`] accepted it.
    planned: Option<(u64, u64)>,
}

impl ImageSink {
    /// `dir` must exist and be empty (a fresh directory for this migration); at most
    /// `max_bytes` (`--max-images-mib`) of images are accepted.
    pub fn new(dir: &Path, max_bytes: u64) -> Self {
        Self {
            dir: dir.to_path_buf(),
            open: BTreeMap::new(),
            closed: BTreeMap::new(),
            bytes: 0,
            max_bytes,
            planned: None,
        }
    }

    /// The source announced `files` files of `bytes` bytes: refused if over `--max-images-mib`,
    /// over [`MAX_IMAGE_FILES`], or if the work directory's file system would keep less than
    /// `min_free` (`--min-free-disk-mib`) free after them. From here on the source may send no
    /// more than it announced.
    pub fn plan(&mut self, files: u64, bytes: u64, min_free: u64) -> Result<(), SinkError> {
        let dir = self.dir.display();
        if bytes > self.max_bytes {
            return Err(SinkError::Limit(LimitHit::flag(
                format!(
                    "the source announced {} MiB of images for {dir}",
                    mib(bytes)
                ),
                format!("{} MiB", mib(self.max_bytes)),
                flag::MAX_IMAGES,
            )));
        }
        if files > MAX_IMAGE_FILES as u64 {
            return Err(SinkError::Limit(too_many_files(files)));
        }
        let free = limits::free_disk_bytes(&self.dir).map_err(|source| SinkError::Statvfs {
            path: self.dir.clone(),
            source,
        })?;
        if bytes.saturating_add(min_free) > free {
            return Err(SinkError::Limit(LimitHit::flag(
                format!(
                    "the source announced {} MiB of images, but the file system of {dir} has {} \
                     MiB free, which would leave less than the required free space (free disk \
                     space, or lower it with {})",
                    mib(bytes),
                    mib(free),
                    flag::MIN_FREE_DISK
                ),
                format!("{} MiB left free", mib(min_free)),
                flag::MIN_FREE_DISK,
            )));
        }
        self.planned = Some((files, bytes));
        Ok(())
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Accepts one chunk.
    pub fn chunk(
        &mut self,
        name: &str,
        offset: u64,
        data: &[u8],
        last: bool,
    ) -> Result<(), SinkError> {
        check_name(name)?;
        if self.closed.contains_key(name) {
            return Err(SinkError::Reopened(name.to_string()));
        }
        self.bytes += data.len() as u64;
        let files =
            (self.open.len() + self.closed.len()) as u64 + u64::from(!self.open.contains_key(name));
        if let Some((planned_files, planned_bytes)) = self.planned {
            if self.bytes > planned_bytes {
                return Err(SinkError::OverPlan {
                    what: "bytes",
                    got: self.bytes,
                    planned: planned_bytes,
                });
            }
            if files > planned_files {
                return Err(SinkError::OverPlan {
                    what: "files",
                    got: files,
                    planned: planned_files,
                });
            }
        }
        if self.bytes > self.max_bytes {
            return Err(SinkError::Limit(LimitHit::flag(
                format!(
                    "the source sent more than {} MiB of images",
                    mib(self.max_bytes)
                ),
                format!("{} MiB", mib(self.max_bytes)),
                flag::MAX_IMAGES,
            )));
        }
        if files > MAX_IMAGE_FILES as u64 {
            return Err(SinkError::Limit(too_many_files(files)));
        }
        if !self.open.contains_key(name) && self.open.len() >= MAX_OPEN_IMAGE_FILES {
            return Err(SinkError::Limit(LimitHit::fixed(
                format!("image files open at once (opening {name})"),
                format!("{MAX_OPEN_IMAGE_FILES} files"),
                "pageserv src sends each image file whole before the next",
            )));
        }
        let path = self.dir.join(name);
        let io = |source| SinkError::Io {
            path: path.clone(),
            source,
        };
        if !self.open.contains_key(name) {
            let file = std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(&path)
                .map_err(io)?;
            self.open.insert(name.to_string(), Open { file, next: 0 });
        }
        let Some(f) = self.open.get_mut(name) else {
            return Err(SinkError::Reopened(name.to_string()));
        };
        if offset != f.next {
            return Err(SinkError::OutOfOrder {
                name: name.to_string(),
                got: offset,
                want: f.next,
            });
        }
        f.file.write_all(data).map_err(io)?;
        f.next += data.len() as u64;
        // No fsync: the restore reads these at once, and a crash of this host ends the migration
        // anyway (the source stays frozen); syncing would only add downtime.
        if last && let Some(f) = self.open.remove(name) {
            self.closed.insert(name.to_string(), f.next);
        }
        Ok(())
    }

    /// Checks the source's totals against what arrived; every file must be closed.
    pub fn finish(self, files: u32, bytes: u64) -> Result<PathBuf, SinkError> {
        let got = self.closed.len() as u32;
        if !self.open.is_empty() || got != files || self.bytes != bytes {
            return Err(SinkError::Mismatch {
                said: files,
                said_bytes: bytes,
                got,
                got_bytes: self.bytes,
            });
        }
        Ok(self.dir)
    }
}

fn too_many_files(files: u64) -> LimitHit {
    LimitHit::fixed(
        format!("{files} image files"),
        format!("{MAX_IMAGE_FILES} files"),
        "a CRIU image directory has a few files per task",
    )
}

fn check_name(name: &str) -> Result<(), SinkError> {
    let ok = !name.is_empty()
        && name.len() <= 255
        && !name.starts_with('.')
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b'_'));
    if ok {
        Ok(())
    } else {
        Err(SinkError::BadName(name.to_string()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tmp() -> PathBuf {
        let d = std::env::temp_dir().join(format!("sink-{}-{}", std::process::id(), rand_suffix()));
        std::fs::create_dir_all(&d).unwrap();
        d
    }
    fn rand_suffix() -> u64 {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos() as u64
    }

    #[test]
    fn writes_files_in_chunks() {
        let d = tmp();
        let mut s = ImageSink::new(&d, 1 << 30);
        s.chunk("core-1.img", 0, b"abc", false).unwrap();
        s.chunk("core-1.img", 3, b"def", true).unwrap();
        s.chunk("pstree.img", 0, b"", true).unwrap();
        let dir = s.finish(2, 6).unwrap();
        assert_eq!(std::fs::read(dir.join("core-1.img")).unwrap(), b"abcdef");
        std::fs::remove_dir_all(d).unwrap();
    }

    #[test]
    fn refuses_hostile_names_and_disorder() {
        let d = tmp();
        let mut s = ImageSink::new(&d, 1 << 30);
        for bad in ["../x", "a/b", ".hidden", "", "x\0y", "lazy-pages.socket/.."] {
            assert!(
                matches!(s.chunk(bad, 0, b"", true), Err(SinkError::BadName(_))),
                "{bad}"
            );
        }
        s.chunk("a.img", 0, b"1", false).unwrap();
        assert!(matches!(
            s.chunk("a.img", 5, b"1", false),
            Err(SinkError::OutOfOrder { .. })
        ));
        s.chunk("a.img", 1, b"", true).unwrap();
        assert!(matches!(
            s.chunk("a.img", 1, b"", true),
            Err(SinkError::Reopened(_))
        ));
        assert!(matches!(s.finish(2, 1), Err(SinkError::Mismatch { .. })));
        std::fs::remove_dir_all(d).unwrap();
    }

    #[test]
    fn a_plan_over_the_limit_or_the_disk_is_refused_and_binds_the_source() {
        let d = tmp();
        let mut s = ImageSink::new(&d, 1 << 20);
        let e = s.plan(1, 2 << 20, 0).unwrap_err().to_string();
        assert!(e.contains("--max-images-mib") && e.contains("1 MiB"), "{e}");
        // More than the disk has free (whatever it has) with the margin.
        let e = s.plan(1, 1 << 20, u64::MAX / 2).unwrap_err().to_string();
        assert!(e.contains("--min-free-disk-mib"), "{e}");
        s.plan(1, 4, 0).unwrap();
        s.chunk("a.img", 0, b"1234", false).unwrap();
        assert!(matches!(
            s.chunk("a.img", 4, b"5", true),
            Err(SinkError::OverPlan { what: "bytes", .. })
        ));
        let mut s = ImageSink::new(&d, 1 << 20);
        assert!(matches!(
            s.chunk("big.img", 0, &vec![0u8; (1 << 20) + 1], true),
            Err(SinkError::Limit(_))
        ));
        std::fs::remove_dir_all(d).unwrap();
    }

    #[test]
    fn files_open_at_once_are_bounded() {
        let d = tmp();
        let mut s = ImageSink::new(&d, 1 << 20);
        for i in 0..MAX_OPEN_IMAGE_FILES {
            s.chunk(&format!("f{i}.img"), 0, b"x", false).unwrap();
        }
        let e = s
            .chunk("one-more.img", 0, b"x", false)
            .unwrap_err()
            .to_string();
        assert!(e.contains("open at once"), "{e}");
        std::fs::remove_dir_all(d).unwrap();
    }
}
