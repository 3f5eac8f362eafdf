//! Running the rounds: a reader thread walks the tree and reads, hashes and compares memory; the
//! async side sends what changed to dst on the control stream, ahead of the images (so dst holds
//! every pre-copied page before the restore starts).

use std::time::Instant;

use anyhow::{Context, Result, anyhow};
use bytes::Bytes;
use serde::Serialize;
use tokio::sync::mpsc;

use super::held::{HeldMemory, Observed};
use super::page_hash::PageHasher;
use super::policy::{AutoRule, Decision, PreCopyMode, RoundOutcome, StopReason, decide};
use super::reader::{ReadError, TaskReader};
use super::tree;
use crate::pages::{PAGE_SIZE, PageRange};
use crate::transport::FrameSender;
use crate::wire::{Frame, HEADER_LEN, MAX_FRAME_PAGES};

/// Read batches in flight between the reader thread and the sender (each `batch_pages` pages).
const BATCHES_IN_FLIGHT: usize = 2;

/// How to pre-copy.
#[derive(Debug, Clone, Copy)]
pub struct PreCopyConfig {
    pub mode: PreCopyMode,
    pub rule: AutoRule,
    /// Pages per process_vm_readv batch (and per buffer in flight).
    pub batch_pages: u64,
}

impl PreCopyConfig {
    pub fn new(mode: PreCopyMode) -> Self {
        Self {
            mode,
            rule: AutoRule::default(),
            batch_pages: 1024,
        }
    }
}

/// One round, as reported.
#[derive(Debug, Clone, Default, Serialize)]
pub struct RoundStats {
    pub round: u32,
    pub tasks: u32,
    pub pages_read: u64,
    /// Pages new to dst or different from its copy: what the round sent.
    pub pages_changed: u64,
    /// Of those, pages dst had an older copy of.
    pub pages_rewritten: u64,
    /// Of those, pages sent as data (the rest were all zero: PreCopyZero frames).
    pub pages_sent: u64,
    pub pages_zero: u64,
    pub bytes_sent: u64,
    pub seconds: f64,
}

/// What the rounds did, and after the freeze what the validation sent.
#[derive(Debug, Clone, Default, Serialize)]
pub struct PreCopyReport {
    pub rounds: Vec<RoundStats>,
    pub stop_reason: Option<StopReason>,
    pub seconds: f64,
    /// Pages dst holds a copy of at the freeze.
    pub pages_held: u64,
    /// Memory the source used for the hashes.
    pub hash_bytes: u64,
    /// After the freeze.
    pub sweep: super::SweepStats,
}

impl PreCopyReport {
    pub fn render(&self) -> String {
        let mut s = String::from("  pre-copy rounds (stop: ");
        s += &format!(
            "{:?}, {:.2} s, dst holds {} pages, src hashes {:.1} MiB)\n",
            self.stop_reason,
            self.seconds,
            self.pages_held,
            self.hash_bytes as f64 / (1 << 20) as f64
        );
        s += "    round  tasks   pages read      changed    (rewritten)       sent       zero       MiB sent   seconds\n";
        for r in &self.rounds {
            s += &format!(
                "    {:>5} {:>6} {:>12} {:>12} {:>14} {:>10} {:>10} {:>14.1} {:>9.2}\n",
                r.round,
                r.tasks,
                r.pages_read,
                r.pages_changed,
                r.pages_rewritten,
                r.pages_sent,
                r.pages_zero,
                r.bytes_sent as f64 / (1 << 20) as f64,
                r.seconds
            );
        }
        s += &self.sweep.render();
        s
    }
}

/// Pages to send from one read batch: runs inside `data`.
struct Outgoing {
    pid: u32,
    data: Bytes,
    /// (vaddr, nr_pages, byte offset in data, all zero)
    runs: Vec<(u64, u64, usize, bool)>,
}

enum Out {
    Batch(Outgoing),
    Round(RoundStats),
}

/// Runs the rounds on the tree under `root` and sends every new or changed page on `tx`. Returns
/// the hashes of what dst now holds, for the validation after the freeze.
pub async fn run(
    root: i32,
    cfg: PreCopyConfig,
    tx: &mut FrameSender,
) -> Result<(HeldMemory, PreCopyReport)> {
    let started = Instant::now();
    let (out_tx, mut out_rx) = mpsc::channel::<Out>(BATCHES_IN_FLIGHT);
    let reader = std::thread::Builder::new()
        .name("pre-copy".into())
        .spawn(move || read_rounds(root, cfg, out_tx))
        .context("starting the pre-copy reader thread")?;
    let mut report = PreCopyReport::default();
    let mut bytes = 0u64;
    let sent: Result<()> = async {
        while let Some(out) = out_rx.recv().await {
            match out {
                Out::Batch(b) => bytes += send_batch(tx, b).await?,
                Out::Round(mut r) => {
                    r.bytes_sent = std::mem::take(&mut bytes);
                    tracing::info!(
                        round = r.round,
                        read = r.pages_read,
                        changed = r.pages_changed,
                        sent = r.pages_sent,
                        zero = r.pages_zero,
                        seconds = r.seconds,
                        "pre-copy round done"
                    );
                    report.rounds.push(r);
                }
            }
        }
        Ok(())
    }
    .await;
    // Dropping the receiver makes a reader still running stop at its next batch.
    drop(out_rx);
    let joined = tokio::task::spawn_blocking(move || reader.join())
        .await
        .context("joining the pre-copy reader")?
        .map_err(|_| anyhow!("the pre-copy reader thread panicked"))?;
    sent.context("sending pre-copied pages to dst")?;
    let (held, stop) = joined?;
    report.stop_reason = Some(stop);
    report.seconds = started.elapsed().as_secs_f64();
    report.pages_held = held.pages_held();
    report.hash_bytes = held.bytes();
    Ok((held, report))
}

async fn send_batch(tx: &mut FrameSender, b: Outgoing) -> Result<u64> {
    let mut bytes = 0;
    for (vaddr, n, offset, zero) in b.runs {
        let mut done = 0;
        while done < n {
            let k = (n - done).min(u64::from(MAX_FRAME_PAGES));
            let at = vaddr + done * PAGE_SIZE;
            if zero {
                tx.send(&Frame::PreCopyZero {
                    pid: b.pid,
                    vaddr: at,
                    nr_pages: k as u32,
                })
                .await?;
                bytes += HEADER_LEN as u64;
            } else {
                let from = offset + (done * PAGE_SIZE) as usize;
                let data = b.data.slice(from..from + (k * PAGE_SIZE) as usize);
                tx.send_precopy_pages(b.pid, at, k as u32, data).await?;
                bytes += HEADER_LEN as u64 + k * PAGE_SIZE;
            }
            done += k;
        }
    }
    Ok(bytes)
}

/// The reader thread: rounds until the policy says stop or the sender is gone.
fn read_rounds(
    root: i32,
    cfg: PreCopyConfig,
    out: mpsc::Sender<Out>,
) -> Result<(HeldMemory, StopReason)> {
    let mut held = HeldMemory::new(PageHasher::random());
    let started = Instant::now();
    let mut outcomes = Vec::new();
    let batch_pages = cfg.batch_pages.clamp(1, 16 * 1024);
    loop {
        let round_start = Instant::now();
        let tasks = tree::walk(root).context("walking the process tree to pre-copy")?;
        let mut st = RoundStats {
            round: outcomes.len() as u32 + 1,
            tasks: tasks.len() as u32,
            ..Default::default()
        };
        for task in &tasks {
            match read_task(task, batch_pages, &mut held, &mut st, &out) {
                Ok(()) => {}
                // Exited or changed beyond reading: its pages are simply not pre-copied.
                Err(RoundError::SenderGone) => {
                    return Err(anyhow!("the pre-copy sender stopped"));
                }
                Err(e) if task.host_pid != root => {
                    tracing::debug!("pre-copy skipped pid {}: {e}", task.host_pid)
                }
                Err(e) => {
                    return Err(anyhow!(e).context("reading the root task's memory"));
                }
            }
        }
        st.seconds = round_start.elapsed().as_secs_f64();
        outcomes.push(RoundOutcome {
            pages_read: st.pages_read,
            pages_changed: st.pages_changed,
        });
        if out.blocking_send(Out::Round(st)).is_err() {
            return Err(anyhow!("the pre-copy sender stopped"));
        }
        if let Decision::Stop(why) = decide(cfg.mode, &cfg.rule, &outcomes, started.elapsed()) {
            return Ok((held, why));
        }
    }
}

#[derive(Debug, thiserror::Error)]
enum RoundError {
    #[error(transparent)]
    Read(#[from] ReadError),
    #[error(transparent)]
    Tree(#[from] tree::TreeError),
    #[error("the pre-copy sender stopped")]
    SenderGone,
}

fn read_task(
    task: &tree::Task,
    batch_pages: u64,
    held: &mut HeldMemory,
    st: &mut RoundStats,
    out: &mpsc::Sender<Out>,
) -> Result<(), RoundError> {
    let mut reader = TaskReader::open(task.host_pid)?;
    let maps = tree::mappings(task.host_pid)?;
    let mut present = Vec::new();
    for m in maps {
        present.clear();
        reader.present(m, &mut present)?;
        let mut batch: Vec<PageRange> = Vec::new();
        let mut pages = 0;
        for r in &present {
            let mut r = *r;
            while r.nr_pages > 0 {
                let n = r.nr_pages.min(batch_pages - pages);
                batch.push(PageRange::new(r.start, n));
                pages += n;
                r = PageRange::new(r.start + n * PAGE_SIZE, r.nr_pages - n);
                if pages == batch_pages {
                    read_batch(&reader, task.ns_pid, &batch, pages, held, st, out)?;
                    batch.clear();
                    pages = 0;
                }
            }
        }
        if pages > 0 {
            read_batch(&reader, task.ns_pid, &batch, pages, held, st, out)?;
        }
    }
    Ok(())
}

fn read_batch(
    reader: &TaskReader,
    pid: u32,
    batch: &[PageRange],
    pages: u64,
    held: &mut HeldMemory,
    st: &mut RoundStats,
    out: &mpsc::Sender<Out>,
) -> Result<(), RoundError> {
    let mut buf = vec![0u8; (pages * PAGE_SIZE) as usize];
    let read = reader.read(batch, &mut buf)?;
    let mut runs: Vec<(u64, u64, usize, bool)> = Vec::new();
    let mut obs = Vec::new();
    for rr in read {
        obs.clear();
        let len = (rr.nr_pages * PAGE_SIZE) as usize;
        held.observe(pid, rr.vaddr, &buf[rr.offset..rr.offset + len], &mut obs);
        st.pages_read += rr.nr_pages;
        for (i, o) in obs.iter().enumerate() {
            let Observed::Send { zero, changed } = *o else {
                continue;
            };
            st.pages_changed += 1;
            st.pages_rewritten += u64::from(changed);
            if zero {
                st.pages_zero += 1;
            } else {
                st.pages_sent += 1;
            }
            let vaddr = rr.vaddr + i as u64 * PAGE_SIZE;
            let offset = rr.offset + i * PAGE_SIZE as usize;
            match runs.last_mut() {
                Some((v, n, off, z))
                    if *z == zero
                        && *v + *n * PAGE_SIZE == vaddr
                        && *off + (*n * PAGE_SIZE) as usize == offset =>
                {
                    *n += 1
                }
                _ => runs.push((vaddr, 1, offset, zero)),
            }
        }
    }
    if runs.is_empty() {
        return Ok(());
    }
    let batch = Outgoing {
        pid,
        data: Bytes::from(buf),
        runs,
    };
    out.blocking_send(Out::Batch(batch))
        .map_err(|_| RoundError::SenderGone)
}
