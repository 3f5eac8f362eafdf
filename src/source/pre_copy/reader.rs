//! Reading a running task's memory: which pages exist (`/proc/PID/pagemap`), then their contents
//! with `process_vm_readv`, many ranges per call. The task keeps running; a page may change while
//! it is read, which is fine: dst's copy is whatever was read, and the hash that validates it
//! after the freeze is the hash of exactly those bytes.

use std::fs::File;
use std::io::IoSliceMut;
use std::os::unix::fs::FileExt;

use nix::errno::Errno;
use nix::sys::uio::{RemoteIoVec, process_vm_readv};
use nix::unistd::Pid;

use crate::pages::{PAGE_SIZE, PageRange};

/// Pagemap entries read per syscall (512 KiB of entries, 1 GiB of address space).
const PAGEMAP_CHUNK: u64 = 64 * 1024;
/// Remote ranges per process_vm_readv call (the kernel's IOV_MAX).
const MAX_IOV: usize = 1024;
const PM_PRESENT: u64 = 1 << 63;
const PM_SWAPPED: u64 = 1 << 62;

#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    #[error("cannot open /proc/{pid}/pagemap: {source}")]
    Open { pid: i32, source: std::io::Error },
    #[error("reading /proc/{pid}/pagemap at {vaddr:#x}: {source}")]
    Pagemap {
        pid: i32,
        vaddr: u64,
        source: std::io::Error,
    },
    #[error("process_vm_readv of pid {pid} at {vaddr:#x}: {source}")]
    Read { pid: i32, vaddr: u64, source: Errno },
    #[error("pid {pid} exited while being read")]
    Gone { pid: i32 },
}

/// Appends the runs of present (or swapped-out) pages among pagemap `entries`, the first of which
/// describes page `start`.
pub fn present_runs(entries: &[u64], start: u64, out: &mut Vec<PageRange>) {
    let mut i = 0;
    while i < entries.len() {
        if entries[i] & (PM_PRESENT | PM_SWAPPED) == 0 {
            i += 1;
            continue;
        }
        let n = entries[i..]
            .iter()
            .take_while(|e| **e & (PM_PRESENT | PM_SWAPPED) != 0)
            .count();
        let vaddr = start + i as u64 * PAGE_SIZE;
        match out.last_mut() {
            Some(last) if last.end() == vaddr => last.nr_pages += n as u64,
            _ => out.push(PageRange::new(vaddr, n as u64)),
        }
        i += n;
    }
}

/// Pages read into a buffer: `nr_pages` pages of `vaddr..` at byte `offset` of the buffer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReadRun {
    pub vaddr: u64,
    pub nr_pages: u64,
    pub offset: usize,
}

/// One task's memory, open for reading.
pub struct TaskReader {
    pid: i32,
    pagemap: File,
    entries: Vec<u64>,
}

impl TaskReader {
    pub fn open(pid: i32) -> Result<Self, ReadError> {
        let pagemap = File::open(format!("/proc/{pid}/pagemap"))
            .map_err(|source| ReadError::Open { pid, source })?;
        Ok(Self {
            pid,
            pagemap,
            entries: Vec::new(),
        })
    }

    /// Appends the present pages of `range` as runs.
    pub fn present(&mut self, range: PageRange, out: &mut Vec<PageRange>) -> Result<(), ReadError> {
        let mut page = range.start / PAGE_SIZE;
        let end = page + range.nr_pages;
        let mut bytes = Vec::new();
        while page < end {
            let n = (end - page).min(PAGEMAP_CHUNK);
            bytes.resize(n as usize * 8, 0);
            let vaddr = page * PAGE_SIZE;
            let got = self
                .pagemap
                .read_at(&mut bytes, page * 8)
                .map_err(|source| ReadError::Pagemap {
                    pid: self.pid,
                    vaddr,
                    source,
                })?;
            // A short read means the mapping shrank under us; the rest is simply not present.
            self.entries.clear();
            self.entries.extend(
                bytes[..got - got % 8]
                    .chunks_exact(8)
                    .map(|b| u64::from_ne_bytes(b.try_into().unwrap_or([0; 8]))),
            );
            present_runs(&self.entries, vaddr, out);
            if got < bytes.len() {
                break;
            }
            page += n;
        }
        Ok(())
    }

    /// Reads `runs` back to back into `buf` (which must hold them all). Pages that vanished
    /// meanwhile (unmapped: EFAULT or a short read) are left out, with the rest of their run.
    /// Returns what was read.
    pub fn read(&self, runs: &[PageRange], buf: &mut [u8]) -> Result<Vec<ReadRun>, ReadError> {
        let mut done = Vec::new();
        let mut offset = 0usize;
        let mut i = 0;
        while i < runs.len() {
            let remote: Vec<RemoteIoVec> = runs[i..]
                .iter()
                .take(MAX_IOV)
                .map(|r| RemoteIoVec {
                    base: r.start as usize,
                    len: (r.nr_pages * PAGE_SIZE) as usize,
                })
                .collect();
            let want: usize = remote.iter().map(|r| r.len).sum();
            let Some(local) = buf.get_mut(offset..offset + want) else {
                return Err(ReadError::Read {
                    pid: self.pid,
                    vaddr: runs[i].start,
                    source: Errno::ENOBUFS,
                });
            };
            let mut got = match process_vm_readv(
                Pid::from_raw(self.pid),
                &mut [IoSliceMut::new(local)],
                &remote,
            ) {
                Ok(n) => n,
                Err(Errno::EFAULT) => 0,
                Err(Errno::ESRCH) => return Err(ReadError::Gone { pid: self.pid }),
                Err(e) => {
                    return Err(ReadError::Read {
                        pid: self.pid,
                        vaddr: runs[i].start,
                        source: e,
                    });
                }
            };
            // Whole runs first; the call stops inside the first run it could not read whole,
            // whose pages read so far count and whose rest is dropped. The next call starts
            // after it.
            for rv in &remote {
                let take = got.min(rv.len) / PAGE_SIZE as usize * PAGE_SIZE as usize;
                if take > 0 {
                    done.push(ReadRun {
                        vaddr: rv.base as u64,
                        nr_pages: (take as u64) / PAGE_SIZE,
                        offset,
                    });
                }
                offset += rv.len;
                i += 1;
                if got < rv.len {
                    break;
                }
                got -= rv.len;
            }
        }
        Ok(done)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn present_runs_merge_and_skip_holes() {
        let p = PM_PRESENT;
        let s = PM_SWAPPED;
        let mut out = Vec::new();
        present_runs(&[p, p, 0, s, p, 0], 0x1000, &mut out);
        assert_eq!(
            out,
            vec![PageRange::new(0x1000, 2), PageRange::new(0x4000, 2)]
        );
        // A chunk continuing the last run merges with it.
        present_runs(&[p], 0x6000, &mut out);
        assert_eq!(out[1], PageRange::new(0x4000, 3));
    }

    #[test]
    fn reads_own_memory_and_skips_unmapped_pages() {
        // Read this process's own memory through the same path.
        let ps = PAGE_SIZE as usize;
        let mut mem = vec![0u8; 8 * ps];
        // Align to a page.
        let base = (mem.as_mut_ptr() as usize).div_ceil(ps) * ps;
        let off = base - mem.as_ptr() as usize;
        for i in 0..4 {
            mem[off + i * ps] = i as u8 + 1;
        }
        let me = std::process::id() as i32;
        let mut r = TaskReader::open(me).unwrap();
        let mut present = Vec::new();
        r.present(PageRange::new(base as u64, 4), &mut present)
            .unwrap();
        assert_eq!(present, vec![PageRange::new(base as u64, 4)]);
        let runs = [
            PageRange::new(base as u64, 2),
            PageRange::new(0x1000, 3), // never mapped
            PageRange::new(base as u64 + 2 * PAGE_SIZE, 2),
        ];
        let mut buf = vec![0u8; 7 * ps];
        let got = r.read(&runs, &mut buf).unwrap();
        assert_eq!(
            got,
            vec![
                ReadRun {
                    vaddr: base as u64,
                    nr_pages: 2,
                    offset: 0
                },
                ReadRun {
                    vaddr: base as u64 + 2 * PAGE_SIZE,
                    nr_pages: 2,
                    offset: 5 * ps
                },
            ]
        );
        assert_eq!(buf[0], 1);
        assert_eq!(buf[ps], 2);
        assert_eq!(buf[5 * ps], 3);
        assert_eq!(buf[6 * ps], 4);
    }
}
