//! After the freeze: every page fetched from the dump (pushed or a fault's answer) is judged
//! against dst's pre-copied copy and sent as a Valid bit, a Zero frame or data.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

use anyhow::Result;
use bytes::Bytes;
use serde::Serialize;

use super::held::HeldMemory;
use super::validate::{Piece, pieces};
use crate::pages::PAGE_SIZE;
use crate::source::pump::Served;
use crate::transport::FrameSender;
use crate::wire::{Frame, HEADER_LEN};

/// What the validation sent after the freeze.
#[derive(Debug, Clone, Default, Serialize)]
pub struct SweepStats {
    /// Frozen pages equal to dst's copy: confirmed in Valid bitmaps.
    pub pages_valid: u64,
    /// Pages that changed after the last round (or were never pre-copied), sent as data...
    pub pages_data: u64,
    /// ...or as Zero frames.
    pub pages_zero: u64,
    pub frames_valid: u64,
    /// Bytes on the stream, headers included, per kind.
    pub bytes_valid: u64,
    pub bytes_data: u64,
    pub bytes_zero: u64,
}

impl SweepStats {
    /// Pages that changed after the last round: dst's copy was missing or stale.
    pub fn pages_changed_after(&self) -> u64 {
        self.pages_data + self.pages_zero
    }

    /// Bytes of memory sent after the freeze (images are counted apart).
    pub fn bytes_after(&self) -> u64 {
        self.bytes_valid + self.bytes_data + self.bytes_zero
    }

    pub fn render(&self) -> String {
        // Changed pages that are all zero cross as 24-byte frames, so the yardstick is the
        // changed pages sent as data.
        let ideal = self.pages_data * PAGE_SIZE;
        format!(
            "  after the freeze: {} pages valid at dst ({} Valid frames, {} bytes), {} changed after \
             the last round ({} as data, {} zero)\n\
             \x20   memory bytes sent {} = data {} + valid {} + zero {}; changed data pages x 4 KiB \
             = {} ({:+.2}%)\n",
            self.pages_valid,
            self.frames_valid,
            self.bytes_valid,
            self.pages_changed_after(),
            self.pages_data,
            self.pages_zero,
            self.bytes_after(),
            self.bytes_data,
            self.bytes_valid,
            self.bytes_zero,
            ideal,
            if ideal > 0 {
                (self.bytes_after() as f64 / ideal as f64 - 1.0) * 100.0
            } else {
                0.0
            }
        )
    }
}

/// The hashes of what dst holds, and counters of what the validation sent. Shared by the push
/// and the fault answers.
pub struct Validator {
    held: HeldMemory,
    pages_valid: AtomicU64,
    pages_data: AtomicU64,
    pages_zero: AtomicU64,
    frames_valid: AtomicU64,
    bytes_valid: AtomicU64,
    bytes_data: AtomicU64,
    bytes_zero: AtomicU64,
}

impl Validator {
    pub fn new(held: HeldMemory) -> Self {
        Self {
            held,
            pages_valid: AtomicU64::new(0),
            pages_data: AtomicU64::new(0),
            pages_zero: AtomicU64::new(0),
            frames_valid: AtomicU64::new(0),
            bytes_valid: AtomicU64::new(0),
            bytes_data: AtomicU64::new(0),
            bytes_zero: AtomicU64::new(0),
        }
    }

    pub fn held(&self) -> &HeldMemory {
        &self.held
    }

    pub fn stats(&self) -> SweepStats {
        SweepStats {
            pages_valid: self.pages_valid.load(Relaxed),
            pages_data: self.pages_data.load(Relaxed),
            pages_zero: self.pages_zero.load(Relaxed),
            frames_valid: self.frames_valid.load(Relaxed),
            bytes_valid: self.bytes_valid.load(Relaxed),
            bytes_data: self.bytes_data.load(Relaxed),
            bytes_zero: self.bytes_zero.load(Relaxed),
        }
    }

    /// Sends one batch fetched from the dump; returns how many of its pages were all zero and
    /// sent as Zero frames.
    pub async fn send(&self, tx: &mut FrameSender, s: Served) -> Result<u64> {
        let page = PAGE_SIZE as usize;
        let verdicts = self.held.verdicts(s.pid, s.vaddr, &s.data);
        let mut zero = 0;
        for p in pieces(&verdicts) {
            match p {
                Piece::Valid {
                    first,
                    nr_pages,
                    bitmap,
                } => {
                    let valid: u32 = bitmap.iter().map(|b| b.count_ones()).sum();
                    let len = bitmap.len() as u64;
                    tx.send(&Frame::Valid {
                        pid: s.pid,
                        vaddr: s.vaddr + (first * page) as u64,
                        nr_pages: nr_pages as u32,
                        bitmap: Bytes::from(bitmap),
                    })
                    .await?;
                    self.pages_valid.fetch_add(valid.into(), Relaxed);
                    self.frames_valid.fetch_add(1, Relaxed);
                    self.bytes_valid.fetch_add(HEADER_LEN as u64 + len, Relaxed);
                }
                Piece::Zero { first, nr_pages } => {
                    tx.send(&Frame::Zero {
                        pid: s.pid,
                        vaddr: s.vaddr + (first * page) as u64,
                        nr_pages: nr_pages as u32,
                    })
                    .await?;
                    zero += nr_pages as u64;
                    self.pages_zero.fetch_add(nr_pages as u64, Relaxed);
                    self.bytes_zero.fetch_add(HEADER_LEN as u64, Relaxed);
                }
                Piece::Data { first, nr_pages } => {
                    tx.send_pages(
                        s.pid,
                        s.vaddr + (first * page) as u64,
                        nr_pages as u32,
                        s.data.slice(first * page..(first + nr_pages) * page),
                    )
                    .await?;
                    self.pages_data.fetch_add(nr_pages as u64, Relaxed);
                    self.bytes_data
                        .fetch_add(HEADER_LEN as u64 + (nr_pages * page) as u64, Relaxed);
                }
            }
        }
        Ok(zero)
    }
}
