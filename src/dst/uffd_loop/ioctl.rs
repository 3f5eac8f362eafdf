//! UFFDIO_COPY / ZEROPAGE / UNREGISTER with every outcome typed. The userfaultfd crate folds
//! the partial count of a failed copy into its error (and misreads a negative one), so the few
//! ioctls whose result matters are done here.

use std::os::fd::RawFd;

use nix::errno::Errno;

use crate::pages::PAGE_SIZE;

#[repr(C)]
pub(super) struct UffdioRange {
    start: u64,
    len: u64,
}

#[repr(C)]
pub(super) struct UffdioCopy {
    dst: u64,
    src: u64,
    len: u64,
    mode: u64,
    copy: i64,
}

#[repr(C)]
pub(super) struct UffdioZeropage {
    range: UffdioRange,
    mode: u64,
    zeropage: i64,
}

// _IOWR/_IOR(0xAA, nr, struct): COPY 0xC028AA03, ZEROPAGE 0xC020AA04, UNREGISTER 0x8010AA01.
nix::ioctl_readwrite!(ioc_copy, 0xAA, 0x03, UffdioCopy);
nix::ioctl_readwrite!(ioc_zeropage, 0xAA, 0x04, UffdioZeropage);
nix::ioctl_read!(ioc_unregister, 0xAA, 0x01, UffdioRange);

/// How a COPY or ZEROPAGE ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Fill {
    /// Every page is in place and its waiters are woken.
    Done,
    /// The first `pages` pages are in place, then the kernel stopped: a non-cooperative event is
    /// unread (EAGAIN), or the next page already exists. Read events, then retry the rest.
    Partial { pages: u64 },
    /// Nothing placed: an event (fork, mremap, madvise, munmap) is unread. Read it, then retry.
    Again,
    /// The first page is already present (EEXIST): it counts as placed.
    Exists,
    /// The range is not (or not entirely) registered in one VMA (ENOENT).
    NotRegistered,
    /// The process's memory is gone (ESRCH, ENOSPC): it exited.
    Gone,
}

/// Interprets an ioctl result and the kernel's count field (bytes placed, or -errno).
fn classify(res: nix::Result<i32>, count: i64, len: u64) -> Result<Fill, Errno> {
    match res {
        Ok(_) if count >= 0 && count as u64 >= len => Ok(Fill::Done),
        // A short count with success should not happen; treat it as a stop so the rest is retried.
        Ok(_) if count > 0 => Ok(Fill::Partial {
            pages: count as u64 / PAGE_SIZE,
        }),
        Ok(_) => Ok(Fill::Again),
        Err(_) if count > 0 && (count as u64) < len => Ok(Fill::Partial {
            pages: count as u64 / PAGE_SIZE,
        }),
        Err(Errno::EAGAIN) => Ok(Fill::Again),
        Err(Errno::EEXIST) => Ok(Fill::Exists),
        Err(Errno::ENOENT) => Ok(Fill::NotRegistered),
        Err(Errno::ESRCH | Errno::ENOSPC) => Ok(Fill::Gone),
        Err(e) => Err(e),
    }
}

/// UFFDIO_COPY `src` (whole pages) to `dst` in the uffd's process, waking waiters.
pub(super) fn copy(uffd: RawFd, dst: u64, src: &[u8]) -> Result<Fill, Errno> {
    let len = src.len() as u64;
    let mut arg = UffdioCopy {
        dst,
        src: src.as_ptr() as u64,
        len,
        mode: 0,
        copy: 0,
    };
    // SAFETY: `arg` is a valid uffdio_copy; the kernel reads `len` bytes from `src`, which is
    // borrowed for the call, and writes only into the target process's registered range.
    let res = unsafe { ioc_copy(uffd, &mut arg) };
    classify(res, arg.copy, len)
}

/// UFFDIO_ZEROPAGE `nr_pages` pages at `dst` in the uffd's process, waking waiters.
pub(super) fn zeropage(uffd: RawFd, dst: u64, nr_pages: u64) -> Result<Fill, Errno> {
    let len = nr_pages * PAGE_SIZE;
    let mut arg = UffdioZeropage {
        range: UffdioRange { start: dst, len },
        mode: 0,
        zeropage: 0,
    };
    // SAFETY: `arg` is a valid uffdio_zeropage; the kernel only maps zero pages in the target.
    let res = unsafe { ioc_zeropage(uffd, &mut arg) };
    classify(res, arg.zeropage, len)
}

/// UFFDIO_UNREGISTER `[start, start + len)`. ENOMEM means the process is gone.
pub(super) fn unregister(uffd: RawFd, start: u64, len: u64) -> Result<(), Errno> {
    let mut arg = UffdioRange { start, len };
    // SAFETY: `arg` is a valid uffdio_range for the duration of the call.
    unsafe { ioc_unregister(uffd, &mut arg) }.map(|_| ())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ioctl_numbers_match_the_kernel() {
        use nix::{request_code_read, request_code_readwrite};
        assert_eq!(
            request_code_readwrite!(0xAA, 0x03, size_of::<UffdioCopy>()) as u32,
            0xC028AA03
        );
        assert_eq!(
            request_code_readwrite!(0xAA, 0x04, size_of::<UffdioZeropage>()) as u32,
            0xC020AA04
        );
        assert_eq!(
            request_code_read!(0xAA, 0x01, size_of::<UffdioRange>()) as u32,
            0x8010AA01
        );
    }

    #[test]
    fn classifies_outcomes() {
        let len = 4 * PAGE_SIZE;
        assert_eq!(classify(Ok(0), len as i64, len), Ok(Fill::Done));
        assert_eq!(classify(Err(Errno::EAGAIN), -11, len), Ok(Fill::Again));
        assert_eq!(
            classify(Err(Errno::EAGAIN), 2 * PAGE_SIZE as i64, len),
            Ok(Fill::Partial { pages: 2 })
        );
        assert_eq!(classify(Err(Errno::EEXIST), -17, len), Ok(Fill::Exists));
        assert_eq!(
            classify(Err(Errno::ENOENT), -2, len),
            Ok(Fill::NotRegistered)
        );
        assert_eq!(classify(Err(Errno::ESRCH), -3, len), Ok(Fill::Gone));
        assert_eq!(classify(Err(Errno::ENOSPC), -28, len), Ok(Fill::Gone));
        assert_eq!(classify(Err(Errno::EINVAL), -22, len), Err(Errno::EINVAL));
    }
}
