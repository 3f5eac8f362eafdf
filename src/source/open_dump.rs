//! Opening the dump a migration serves from: pageserv's own `criu dump --lazy-pages` (dumped
//! again while CRIU writes it eagerly, see [`crate::source::eager_dump`]), an external or runc
//! dump it joins, or the frozen dump a keeper holds for `--resume`. A dump pageserv started gets
//! its keeper at once, so that src dying can neither kill nor resume the source behind the
//! failure rule's back.

use std::path::Path;
use std::time::{Duration, SystemTime};

use anyhow::{Context, Result, bail};

use crate::criu::binary::Criu;
use crate::criu::images::ImageDir;
use crate::source::dump::fail_dump;
use crate::source::dump::{
    DumpOptions, PageServerConn, ReadyDump, join_external_dump, start_lazy_dump,
};
use crate::source::eager_dump;
use crate::source::keeper::KeeperLink;
use crate::source::runc_dump::RuncDump;
use crate::source::runc_dump::start_runc_checkpoint;
use std::net::SocketAddr;
use std::path::PathBuf;

/// Where the dump comes from.
#[derive(Debug, Clone)]
pub enum DumpSource {
    /// pageserv runs `criu dump --lazy-pages` on this pid.
    Pid { pid: i32, extra: Vec<String> },
    /// A dump started elsewhere (runc style).
    External {
        page_server: SocketAddr,
        status_fifo: PathBuf,
        images_dir: PathBuf,
    },
    /// Retry a migration whose source was left frozen in this work directory (its dump keeper
    /// hands the dump's socket over).
    Resume { work: PathBuf },
    /// pageserv runs `runc checkpoint --lazy-pages` on this container and joins its dump.
    Runc(RuncDump),
}

pub(super) async fn open_dump(
    criu: &Criu,
    dump: &DumpSource,
    work: &Path,
) -> Result<(ReadyDump, Option<KeeperLink>)> {
    let header_len = criu.layout().header_len();
    let criu = criu.clone();
    let d = dump.clone();
    let work = work.to_path_buf();
    tokio::task::spawn_blocking(move || {
        let dump = open_dump_blocking(&criu, d, &work)?;
        if let Some(r) = dump.1 {
            return Ok((dump.0, Some(r)));
        }
        let mut dump = dump.0;
        // A dump pageserv started gets a keeper at once: from here on, src dying must neither
        // kill nor resume the source behind the rule's back (see source::keeper).
        let keeper = match (&dump.conn, dump.child.as_ref()) {
            (PageServerConn::Unix(s), Some(child)) => {
                let exe = std::env::current_exe().context("locating the pageserv binary")?;
                match KeeperLink::spawn(&exe, &work, s, child.id(), header_len) {
                    Ok(k) => Some(k),
                    Err(e) => {
                        // Without a keeper the migration must not start: resume the source.
                        drop(std::mem::replace(
                            &mut dump.conn,
                            PageServerConn::Unix(std::os::unix::net::UnixStream::pair()?.0),
                        ));
                        return Err(anyhow::Error::from(e));
                    }
                }
            }
            _ => None,
        };
        Ok((dump, keeper))
    })
    .await?
}

fn open_dump_blocking(
    criu: &Criu,
    d: DumpSource,
    work: &Path,
) -> Result<(ReadyDump, Option<KeeperLink>)> {
    let work = work.to_path_buf();
    let fresh = |r: Result<ReadyDump, _>| r.map(|d| (d, None)).map_err(anyhow::Error::from);
    match d {
        DumpSource::Pid { pid, extra } => {
            let opts = DumpOptions {
                pid,
                images_dir: work.join("images"),
                work_dir: work.clone(),
                extra,
            };
            lazy_dump_not_eager(criu, &opts).map(|d| (d, None))
        }
        DumpSource::External {
            page_server,
            status_fifo,
            images_dir,
        } => fresh(join_external_dump(&images_dir, page_server, &status_fifo)),
        DumpSource::Runc(r) => fresh(start_runc_checkpoint(criu, &r, &work)),
        DumpSource::Resume { work } => {
            let (link, sock) = KeeperLink::take(&work)?;
            tracing::info!(dir = %work.display(), "took over the frozen dump");
            Ok((
                ReadyDump {
                    images_dir: work.join("images"),
                    conn: PageServerConn::Unix(sock),
                    child: None,
                    log: Some(work.join("dump.log")),
                    started_at: SystemTime::now(),
                    frozen_seen_at: None,
                    ready_at: SystemTime::now(),
                    redumps: 0,
                    eager: false,
                    freezer: None,
                },
                Some(link),
            ))
        }
    }
}

/// Starts the lazy dump; while it comes out eager (CRIU's stack-page test, see
/// [`eager_dump`]), makes it fail, which resumes the tree, and dumps again.
fn lazy_dump_not_eager(criu: &Criu, opts: &DumpOptions) -> Result<ReadyDump> {
    let mut redumps = 0;
    loop {
        let mut dump = start_lazy_dump(criu, opts)?;
        let eager = match ImageDir::open(&dump.images_dir).and_then(|d| eager_dump::eager_tasks(&d))
        {
            Ok(eager) => eager,
            Err(e) => {
                tracing::warn!("could not check whether the dump came out lazy: {e}");
                Vec::new()
            }
        };
        dump.redumps = redumps;
        dump.eager = !eager.is_empty();
        if eager.is_empty() {
            return Ok(dump);
        }
        if redumps == eager_dump::RETRIES {
            tracing::warn!(
                tasks = ?eager,
                "criu dump wrote these tasks' memory into the images although the dump is lazy \
                 (CRIU's stack-page test, see source::eager_dump), {} dumps in a row: going on; \
                 all their memory crosses before the restore (a longer downtime)",
                redumps + 1
            );
            return Ok(dump);
        }
        tracing::warn!(
            tasks = ?eager,
            "criu dump came out eager (a thread's stack pointer was page-aligned at the freeze, \
             CRIU's stack-page test then keeps every page out of the lazy set): resuming the tree \
             and dumping again"
        );
        fail_dump(&dump.conn, criu.layout().header_len());
        match dump.wait(Duration::from_secs(60)) {
            Some((status, _)) if !status.success() => {}
            Some((status, tail)) => bail!(
                "criu dump of {} ended with {status} after being told to fail; the tree may be \
                 gone. Its log ends:\n{tail}",
                opts.pid
            ),
            None => bail!(
                "criu dump of {} did not end within 60 s after being told to fail; its tasks \
                 may still be frozen (see {})",
                opts.pid,
                opts.work_dir.join("dump.log").display()
            ),
        }
        std::fs::remove_dir_all(&opts.images_dir)
            .with_context(|| format!("clearing {} for the next dump", opts.images_dir.display()))?;
        redumps += 1;
        // A moment for the tree to run on: the stack pointer is a property of the freeze.
        std::thread::sleep(Duration::from_millis(20));
    }
}
