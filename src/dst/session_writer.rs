//! dst's stop-and-copy writer: a thread of its own applies the page-server session's pages files
//! to the image directory ([`DirWriter`]), so copying into the page cache never blocks the
//! runtime that decrypts and reads the lanes, and the two run on both cores at once. At most
//! [`MAX_QUEUED_BYTES`] of page data wait for it; beyond that the lanes' reader waits, and QUIC
//! flow control holds the source back.

use std::path::Path;
use std::sync::Arc;
use std::sync::mpsc;
use std::thread::JoinHandle;

use anyhow::{Context, Result, anyhow};
use bytes::Bytes;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::criu::page_server::writer::{DirWriter, WriterError, WrittenSummary};

/// Page bytes queued for the writer thread at most (a frame is at most 16 MiB; the source's
/// lanes send 256 KiB ones). With the 16 MiB of QUIC's connection window in front of it, dst
/// buffers 24 MiB of the session, ~40 ms at the bare veth's rate: enough, as 8, 16 and 32 MiB
/// made no measurable difference to the session's time there, and within dst's 64 MiB bound
/// when the writer is slower than the link (measured with a `sync`-mounted image directory:
/// 48-49 MiB peak at 8 MiB, 57-65 MiB at 16; README, Status).
pub const MAX_QUEUED_BYTES: u32 = 8 << 20;

enum Cmd {
    Create(u32),
    Append {
        pages_id: u32,
        vaddr: u64,
        data: Bytes,
        _permit: OwnedSemaphorePermit,
    },
}

/// The writer thread's handle.
pub struct SessionWriter {
    tx: Option<mpsc::Sender<Cmd>>,
    budget: Arc<Semaphore>,
    thread: Option<JoinHandle<Result<WrittenSummary, WriterError>>>,
    queued: u64,
}

impl SessionWriter {
    /// Starts the thread writing into `dir`, at most `max_bytes` of page data.
    pub fn start(dir: &Path, max_bytes: u64) -> Result<Self> {
        let mut writer = DirWriter::new(dir).with_max_bytes(max_bytes);
        let (tx, rx) = mpsc::channel::<Cmd>();
        let thread = std::thread::Builder::new()
            .name("ps-session-writer".into())
            .spawn(move || {
                for cmd in rx {
                    match cmd {
                        Cmd::Create(id) => writer.create_pages(id)?,
                        Cmd::Append {
                            pages_id,
                            vaddr,
                            data,
                            _permit,
                        } => writer.append_pages(pages_id, vaddr, &data)?,
                    }
                }
                Ok(writer.finish())
            })
            .context("starting dst's session writer thread")?;
        Ok(SessionWriter {
            tx: Some(tx),
            budget: Arc::new(Semaphore::new(MAX_QUEUED_BYTES as usize)),
            thread: Some(thread),
            queued: 0,
        })
    }

    /// Page bytes handed to the thread so far.
    pub fn queued_bytes(&self) -> u64 {
        self.queued
    }

    /// Creates (truncates) `pages-<pages_id>.img`.
    pub async fn create_pages(&mut self, pages_id: u32) -> Result<()> {
        self.send(Cmd::Create(pages_id)).await
    }

    /// Appends whole pages to an open pages file; waits while the queue is full.
    pub async fn append_pages(&mut self, pages_id: u32, vaddr: u64, data: Bytes) -> Result<()> {
        let want = u32::try_from(data.len())
            .unwrap_or(u32::MAX)
            .clamp(1, MAX_QUEUED_BYTES);
        let permit = self
            .budget
            .clone()
            .acquire_many_owned(want)
            .await
            .map_err(|_| anyhow!("dst's session writer stopped"))?;
        self.queued += data.len() as u64;
        self.send(Cmd::Append {
            pages_id,
            vaddr,
            data,
            _permit: permit,
        })
        .await
    }

    async fn send(&mut self, cmd: Cmd) -> Result<()> {
        let sent = self.tx.as_ref().map(|tx| tx.send(cmd).is_ok());
        if sent == Some(true) {
            return Ok(());
        }
        // The thread ended early: it failed; its error says why.
        self.tx = None;
        match self.join().await {
            Err(e) => Err(e),
            Ok(_) => Err(anyhow!(
                "dst's session writer ended before the session did (internal error)"
            )),
        }
    }

    /// Waits until everything queued is written; what the session left in the directory.
    pub async fn finish(mut self) -> Result<WrittenSummary> {
        self.tx = None;
        self.join().await
    }

    async fn join(&mut self) -> Result<WrittenSummary> {
        let thread = self
            .thread
            .take()
            .ok_or_else(|| anyhow!("dst's session writer was already joined"))?;
        let joined = tokio::task::spawn_blocking(move || thread.join())
            .await
            .context("waiting for dst's session writer")?;
        match joined {
            Ok(r) => Ok(r?),
            Err(_) => Err(anyhow!("dst's session writer thread panicked")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A fresh directory, removed when dropped.
    struct Tmp(std::path::PathBuf);
    impl Tmp {
        fn new(tag: &str) -> Tmp {
            let d =
                std::env::temp_dir().join(format!("pageserv-writer-{}-{tag}", std::process::id()));
            let _ = std::fs::remove_dir_all(&d);
            std::fs::create_dir_all(&d).unwrap();
            Tmp(d)
        }
        fn path(&self) -> &Path {
            &self.0
        }
    }
    impl Drop for Tmp {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    #[tokio::test]
    async fn writes_pages_in_order_and_reports_them() {
        let dir = Tmp::new("order");
        let mut w = SessionWriter::start(dir.path(), 1 << 30).unwrap();
        w.create_pages(3).await.unwrap();
        for i in 0..10u8 {
            w.append_pages(3, u64::from(i) * 4096, Bytes::from(vec![i; 4096]))
                .await
                .unwrap();
        }
        assert_eq!(w.queued_bytes(), 10 * 4096);
        let s = w.finish().await.unwrap();
        assert_eq!((s.pages_files, s.page_bytes), (1, 10 * 4096));
        let f = std::fs::read(dir.path().join("pages-3.img")).unwrap();
        assert_eq!(f.len(), 10 * 4096);
        assert!((0..10u8).all(|i| f[usize::from(i) * 4096] == i));
    }

    #[tokio::test]
    async fn a_write_error_surfaces_on_a_later_call_or_at_finish() {
        let dir = Tmp::new("limit");
        let mut w = SessionWriter::start(dir.path(), 4096).unwrap();
        w.create_pages(1).await.unwrap();
        // Over the session limit: the thread fails and says so.
        let r1 = w.append_pages(1, 0, Bytes::from(vec![0; 8192])).await;
        let r2 = w.append_pages(1, 8192, Bytes::from(vec![0; 4096])).await;
        let err = match (r1, r2) {
            (Err(e), _) | (Ok(()), Err(e)) => e,
            (Ok(()), Ok(())) => w.finish().await.unwrap_err(),
        };
        assert!(format!("{err:#}").contains("MiB"), "{err:#}");
    }

    #[tokio::test]
    async fn pages_for_a_file_never_created_are_refused() {
        let dir = Tmp::new("unopened");
        let mut w = SessionWriter::start(dir.path(), 1 << 20).unwrap();
        let _ = w.append_pages(9, 0, Bytes::from(vec![0; 4096])).await;
        let e = w.finish().await.unwrap_err();
        assert!(format!("{e:#}").contains("pages-9.img"), "{e:#}");
    }
}
