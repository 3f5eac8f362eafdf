//! Receives the image directory from the source, one chunk at a time.
//!
//! The peer chooses file names and sizes, so both are checked: a name is a single plain path
//! component (no `/`, no `..`, no hidden files), chunks of a file arrive in order, and the whole
//! directory is capped. Nothing is written outside the fresh directory made for this migration.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

/// More than any real image set without its lazy memory (pages-*.img of eager pages included).
pub const MAX_IMAGES_BYTES: u64 = 8 << 30;
pub const MAX_FILES: usize = 100_000;

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
    #[error(
        "the source sent more than {MAX_IMAGES_BYTES} bytes or {MAX_FILES} files of images; refusing"
    )]
    TooBig,
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
}

impl ImageSink {
    /// `dir` must exist and be empty (a fresh directory for this migration).
    pub fn new(dir: &Path) -> Self {
        Self {
            dir: dir.to_path_buf(),
            open: BTreeMap::new(),
            closed: BTreeMap::new(),
            bytes: 0,
        }
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
        if self.bytes > MAX_IMAGES_BYTES || self.open.len() + self.closed.len() > MAX_FILES {
            return Err(SinkError::TooBig);
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
        let mut s = ImageSink::new(&d);
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
        let mut s = ImageSink::new(&d);
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
}
