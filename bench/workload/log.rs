//! The workload's log: a regular file opened by path with O_WRONLY|O_APPEND|O_CREAT (CRIU
//! reopens it by path on restore, and skips its size check for exactly those flags), one
//! write(2) per line with no userspace buffering, so lines from several processes and threads
//! never interleave and nothing is lost when the process is frozen or killed.

use std::fmt::{self, Write as _};
use std::fs::OpenOptions;
use std::io;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;
use std::time::{SystemTime, UNIX_EPOCH};

/// The shared append-only log file.
pub struct LogFile {
    fd: OwnedFd,
}

/// Wall-clock time in ns since the Unix epoch (comparable across hosts and with the bench).
pub fn unix_ns() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0)
}

impl LogFile {
    /// Opens (creating) `path` for appending.
    pub fn open(path: &Path) -> io::Result<Self> {
        let file = OpenOptions::new()
            .append(true)
            .create(true)
            .mode(0o644)
            .open(path)?;
        Ok(LogFile { fd: file.into() })
    }

    /// Appends `line` (which must end with '\n') with a single write(2). Allocation-free.
    pub fn write_raw(&self, line: &[u8]) -> io::Result<()> {
        let mut rest = line;
        while !rest.is_empty() {
            // SAFETY: valid buffer and an fd we own.
            let n = unsafe { libc::write(self.fd.as_raw_fd(), rest.as_ptr().cast(), rest.len()) };
            if n < 0 {
                let err = io::Error::last_os_error();
                if err.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(err);
            }
            rest = &rest[n as usize..];
        }
        Ok(())
    }

    /// Formats one line (newline added) and appends it. Errors are dropped: the log is the only
    /// place to report them, and stdio is /dev/null under CRIU.
    pub fn line(&self, args: fmt::Arguments<'_>) {
        let mut buf = StackLine::new();
        if buf.write_fmt(args).is_ok() && buf.push_newline() {
            let _ = self.write_raw(buf.as_bytes());
        } else {
            let mut s = String::new();
            let _ = s.write_fmt(args);
            s.push('\n');
            let _ = self.write_raw(s.as_bytes());
        }
    }
}

/// Appends a formatted line to a [`LogFile`].
#[macro_export]
macro_rules! logline {
    ($log:expr, $($arg:tt)*) => { $log.line(format_args!($($arg)*)) };
}

/// A fixed line buffer, so the churn's forked child can log without the allocator.
pub struct StackLine {
    buf: [u8; 256],
    len: usize,
}

impl StackLine {
    pub fn new() -> Self {
        StackLine {
            buf: [0; 256],
            len: 0,
        }
    }
    fn push_newline(&mut self) -> bool {
        self.write_str("\n").is_ok()
    }
    pub fn as_bytes(&self) -> &[u8] {
        &self.buf[..self.len]
    }
}

impl fmt::Write for StackLine {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        let end = self.len + s.len();
        if end > self.buf.len() {
            return Err(fmt::Error);
        }
        self.buf[self.len..end].copy_from_slice(s.as_bytes());
        self.len = end;
        Ok(())
    }
}
