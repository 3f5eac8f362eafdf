//! The port between the fault engine and the kernel: the uffd operations the engine asks for,
//! one view at a time, and the events it hears. `driver.rs` implements it with real uffds, the
//! engine's tests with a simulated kernel.

use std::time::Instant;

use nix::errno::Errno;

use super::ioctl::Fill;
use super::place;

/// One uffd the engine serves: a restored process, or a fork child of one.
pub(super) type ViewId = u64;

/// A uffd event, as the kernel reported it for one view.
#[derive(Debug)]
pub(super) enum UffdEvent<U> {
    Fault {
        addr: u64,
    },
    /// The process forked; the child's memory is served through `uffd`.
    Fork {
        uffd: U,
    },
    Remap {
        from: u64,
        to: u64,
        len: u64,
    },
    /// madvise(DONTNEED) and friends.
    Remove {
        start: u64,
        end: u64,
    },
    Unmap {
        start: u64,
        end: u64,
    },
}

/// Who owns a view's memory, for killing it at an incomplete shutdown.
#[derive(Debug, Clone, Copy)]
pub(super) enum Owner {
    /// A restored process; its host pid if the restore named it.
    Host(Option<i32>),
    /// A fork child of the process behind this view.
    ChildOf(ViewId),
    /// A fork child adopted from a dead dst's keeper: some descendant of this host pid.
    DescendantOf(i32),
}

/// What the core asks of the kernel, one view at a time.
pub(super) trait Kernel {
    /// A userfaultfd as handed over (the real driver's `userfaultfd::Uffd`).
    type Uffd;
    /// The current time: every timestamp of the core comes from here.
    fn now(&self) -> Instant;
    /// Takes `uffd` over as view `id`; `poll`: read its events (a broken view is only kept open).
    fn attach(
        &mut self,
        id: ViewId,
        uffd: Self::Uffd,
        owner: Owner,
        poll: bool,
    ) -> Result<(), String>;
    /// Stops reading view `id`'s events (it is kept open).
    fn unwatch(&mut self, id: ViewId);
    /// Closes view `id`: its process is gone, so no missing page can read as zero any more.
    fn close(&mut self, id: ViewId);
    /// Every event queued on view `id` now (empty: none).
    fn read_events(&mut self, id: ViewId) -> Result<Vec<UffdEvent<Self::Uffd>>, String>;
    /// UFFDIO_COPY of `data` to runtime address `addr`.
    fn copy(&mut self, id: ViewId, addr: u64, data: &[u8]) -> Result<Fill, Errno>;
    /// UFFDIO_ZEROPAGE of `pages` pages at runtime address `addr`.
    fn zeropage(&mut self, id: ViewId, addr: u64, pages: u64) -> Result<Fill, Errno>;
    /// UFFDIO_UNREGISTER of `[start, +len)`.
    fn unregister(&mut self, id: ViewId, start: u64, len: u64) -> Result<(), Errno>;
}

/// One view's fill operations, as [`place::place`] wants them.
pub(super) struct ViewFills<'a, K> {
    k: &'a mut K,
    id: ViewId,
}

impl<K: Kernel> place::Fills for ViewFills<'_, K> {
    fn copy(&mut self, addr: u64, data: &[u8]) -> Result<Fill, Errno> {
        self.k.copy(self.id, addr, data)
    }

    fn zeropage(&mut self, addr: u64, pages: u64) -> Result<Fill, Errno> {
        self.k.zeropage(self.id, addr, pages)
    }
}

impl<'a, K> ViewFills<'a, K> {
    pub(super) fn new(k: &'a mut K, id: ViewId) -> Self {
        ViewFills { k, id }
    }
}
