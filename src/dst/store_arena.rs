//! The page store's arena: one memfd, a 4 KiB slot per page, mapped read-only into dst, so a
//! confirmed run is handed to the fault loop as a view of the mapping ([`Arena::view`]): no
//! buffer to allocate and zero, no copy out of the memfd. The fault loop's UFFDIO_COPY reads
//! the slots themselves, which was a third of what dst did per page besides the copy into the
//! process (the `pread` into a fresh buffer).
//!
//! Invariants:
//! - The file is sized once to its slots and sealed against shrinking and growing
//!   (`F_SEAL_SHRINK | F_SEAL_GROW | F_SEAL_SEAL`), so every byte of the mapping stays inside
//!   the file: reading the mapping never raises SIGBUS. A slot never written, or punched out,
//!   reads as zeros; the store never hands one out (see `dst::page_store`).
//! - A slot outside the arena is refused with an error, never read or written.
//! - The mapping lives while the arena or any view of it does (each view holds it).
//! - Punching a slot out gives its memory back at once; a view that still covers it (a read that
//!   raced the release) reads zeros, and the kernel gives that view a fresh page, held until dst
//!   ends. The store only punches slots whose page is in every process of its pid already, and
//!   such a view only reaches UFFDIO_COPY, which never places over a page in place.

use std::fs::File;
use std::os::fd::AsFd;
use std::os::unix::fs::FileExt;
use std::ptr::NonNull;
use std::sync::Arc;

use bytes::Bytes;
use nix::fcntl::{FallocateFlags, FcntlArg, SealFlag, fallocate, fcntl};
use nix::sys::memfd::{MFdFlags, memfd_create};
use nix::sys::mman::{MapFlags, ProtFlags, mmap, munmap};

use crate::pages::PAGE_SIZE;

/// The arena: the memfd and its read-only mapping.
#[derive(Debug)]
pub struct Arena {
    file: File,
    map: Arc<Mapping>,
    slots: u32,
}

/// The whole memfd, mapped shared and read-only; unmapped when the last holder goes.
#[derive(Debug)]
struct Mapping {
    at: NonNull<u8>,
    len: usize,
}

// SAFETY: the mapping is plain memory, readable from any thread; nothing in it is tied to the
// thread that mapped it, and it is only unmapped by the last holder (Drop).
unsafe impl Send for Mapping {}
// SAFETY: as above; no one writes through the mapping (it is PROT_READ).
unsafe impl Sync for Mapping {}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: `at` and `len` are exactly what mmap returned, and no view is left (every view
        // holds this mapping).
        if let Err(e) = unsafe { munmap(self.at.cast(), self.len) } {
            tracing::warn!("cannot unmap the page store's arena ({e}); its address space stays");
        }
    }
}

/// `len` bytes of the mapping from `off`: what a [`Bytes`] of [`Arena::view`] reads.
struct View {
    map: Arc<Mapping>,
    off: usize,
    len: usize,
}

impl AsRef<[u8]> for View {
    fn as_ref(&self) -> &[u8] {
        // SAFETY: `off + len <= map.len` (checked in `Arena::view`), the mapping is alive while
        // this view holds it, and it is readable to its end (module docs: the file is sealed at
        // its full size). Nothing in this process writes through it; the one change from outside
        // is a punched slot turning to zeros, for a page already placed (module docs).
        unsafe { std::slice::from_raw_parts(self.map.at.as_ptr().add(self.off), self.len) }
    }
}

fn beyond(first: u32, n: u64, slots: u32) -> std::io::Error {
    std::io::Error::new(
        std::io::ErrorKind::InvalidInput,
        format!("slots {first}..+{n} are beyond the arena's {slots} slots"),
    )
}

impl Arena {
    /// An arena of `slots` pages (at least one): sized, sealed and mapped at once.
    pub fn new(slots: u32) -> std::io::Result<Self> {
        let slots = slots.max(1);
        let len = u64::from(slots) * PAGE_SIZE;
        let fd = memfd_create(
            "pageserv-precopy",
            MFdFlags::MFD_CLOEXEC | MFdFlags::MFD_ALLOW_SEALING,
        )?;
        let file = File::from(fd);
        file.set_len(len)?;
        let seals = SealFlag::F_SEAL_SHRINK | SealFlag::F_SEAL_GROW | SealFlag::F_SEAL_SEAL;
        fcntl(&file, FcntlArg::F_ADD_SEALS(seals))?;
        let len = usize::try_from(len).map_err(std::io::Error::other)?;
        let size = std::num::NonZeroUsize::new(len)
            .ok_or_else(|| std::io::Error::other("an arena of no slots"))?;
        // SAFETY: a new shared read-only mapping of our own memfd at an address the kernel picks;
        // it overlaps nothing and is unmapped only by `Mapping::drop`.
        let at = unsafe {
            mmap(
                None,
                size,
                ProtFlags::PROT_READ,
                MapFlags::MAP_SHARED | MapFlags::MAP_NORESERVE,
                file.as_fd(),
                0,
            )?
        };
        Ok(Self {
            file,
            map: Arc::new(Mapping { at: at.cast(), len }),
            slots,
        })
    }

    /// The byte range of `n` slots from `first`, if they are all in the arena.
    fn range(&self, first: u32, n: u64) -> std::io::Result<(u64, u64)> {
        if u64::from(first) + n > u64::from(self.slots) {
            return Err(beyond(first, n, self.slots));
        }
        Ok((u64::from(first) * PAGE_SIZE, n * PAGE_SIZE))
    }

    /// Writes whole pages `bytes` into the slots from `first`.
    pub fn write(&self, first: u32, bytes: &[u8]) -> std::io::Result<()> {
        let (off, _) = self.range(first, (bytes.len() as u64).div_ceil(PAGE_SIZE))?;
        self.file.write_all_at(bytes, off)
    }

    /// The data of `n` consecutive slots from `first`, as a view of the mapping (no copy).
    pub fn view(&self, first: u32, n: u64) -> std::io::Result<Bytes> {
        let (off, len) = self.range(first, n)?;
        let (off, len) = (
            usize::try_from(off).map_err(std::io::Error::other)?,
            usize::try_from(len).map_err(std::io::Error::other)?,
        );
        Ok(Bytes::from_owner(View {
            map: Arc::clone(&self.map),
            off,
            len,
        }))
    }

    /// Gives the memory of `n` slots from `first` back to the host (they read as zeros after).
    pub fn punch(&self, first: u32, n: u64) -> std::io::Result<()> {
        let (off, len) = self.range(first, n)?;
        let big = |_| std::io::Error::other("punch range beyond i64");
        fallocate(
            &self.file,
            FallocateFlags::FALLOC_FL_PUNCH_HOLE | FallocateFlags::FALLOC_FL_KEEP_SIZE,
            i64::try_from(off).map_err(big)?,
            i64::try_from(len).map_err(big)?,
        )?;
        Ok(())
    }

    /// Bytes of the arena the kernel holds (allocated blocks).
    #[cfg(test)]
    pub fn held_bytes(&self) -> std::io::Result<u64> {
        use std::os::unix::fs::MetadataExt;
        Ok(self.file.metadata()?.blocks() * 512)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const P: usize = PAGE_SIZE as usize;

    /// Views read what was written, outlive the arena, read zeros once punched, and every slot
    /// outside the arena is refused.
    #[test]
    fn views_read_the_slots_and_nothing_outside_the_arena() {
        let a = Arena::new(4).unwrap();
        a.write(1, &[[7u8; P], [8u8; P]].concat()).unwrap();
        let v = a.view(1, 2).unwrap();
        assert_eq!((v.len(), v[0], v[P], v[2 * P - 1]), (2 * P, 7, 8, 8));
        assert_eq!(
            a.held_bytes().unwrap(),
            2 * P as u64,
            "only written slots are held"
        );
        a.punch(2, 1).unwrap();
        assert_eq!(a.held_bytes().unwrap(), P as u64);
        assert!(v[P..].iter().all(|&b| b == 0), "a punched slot reads zeros");
        assert!(a.view(3, 2).is_err() && a.view(4, 1).is_err());
        assert!(a.write(4, &[1u8; P]).is_err() && a.punch(0, 5).is_err());
        assert!(
            a.write(3, &[1u8; 2 * P]).is_err(),
            "runs past the last slot"
        );
        // The seals: the file cannot grow past its slots nor shrink under the mapping.
        assert!(a.file.set_len(0).is_err() && a.file.set_len(8 * P as u64).is_err());
        let tail = a.view(0, 1).unwrap();
        drop(a);
        assert!(tail.iter().all(|&b| b == 0), "a view outlives the arena");
        assert_eq!(v[0], 7);
    }
}
