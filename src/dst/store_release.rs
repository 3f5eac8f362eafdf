//! Gives the page store's slots back as their pages are placed, off the fault loop.
//!
//! The fault loop reports each arrival it has put into every process of its pid
//! ([`crate::dst::uffd_loop::HeldPages::placed`]); that costs it a lock and a push onto a list.
//! A thread of its own (`ps-store-release`) takes the list every [`PERIOD`] and punches those
//! pages' slots out of the store's arena ([`PageStore::release`]), so a post-copy after a pre-copy
//! holds about one copy of the memory at dst, not the store and the placed memory both.
//!
//! Invariant: only ranges the fault loop has placed in every view of their pid are released
//! (never pages of a replaced link, never pages whose copy failed); the store skips a released
//! slot on every later read. A failed punch is logged once and leaves the slot's memory held
//! until dst ends, as before this module existed.

use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use crate::dst::page_store::PageStore;
use crate::pages::PidRange;

/// How often the releaser takes the list: placement runs at up to a few GiB/s, so each round
/// gives back at most some tens of MiB.
pub const PERIOD: Duration = Duration::from_millis(20);

/// Placed ranges waiting to be released (shared by the fault loop and the releaser).
#[derive(Debug, Default)]
pub(crate) struct StoreRelease {
    pending: Mutex<Vec<PidRange>>,
    /// Held for a whole round of releases, so [`StoreRelease::release_pending`] called from
    /// outside returns only once a round the releaser had under way is done too (the count dst
    /// reports at memory-whole then has every range reported placed before it).
    round: Mutex<()>,
    warned: AtomicBool,
}

impl StoreRelease {
    /// Starts the releaser for `store`; it ends once every handle is dropped.
    pub(crate) fn start(store: Arc<PageStore>) -> std::io::Result<Arc<StoreRelease>> {
        let me = Arc::new(StoreRelease::default());
        let weak: Weak<StoreRelease> = Arc::downgrade(&me);
        std::thread::Builder::new()
            .name("ps-store-release".into())
            .spawn(move || run(&weak, &store))?;
        Ok(me)
    }

    /// `at` is in place in every process of its pid: its slots may go.
    pub(crate) fn placed(&self, at: PidRange) {
        let mut p = self.pending.lock().unwrap_or_else(|e| e.into_inner());
        // Arrivals come in address order: most extend the last range.
        if let Some(last) = p.last_mut()
            && last.pid == at.pid
            && last.start() + last.nr_pages() * crate::pages::PAGE_SIZE == at.start()
        {
            *last = PidRange::new(at.pid, last.start(), last.nr_pages() + at.nr_pages());
            return;
        }
        p.push(at);
    }

    /// Releases every range reported so far, after any round under way (a failed punch is
    /// logged once per migration).
    pub(crate) fn release_pending(&self, store: &PageStore) {
        let _round = self.round.lock().unwrap_or_else(|e| e.into_inner());
        let taken = std::mem::take(&mut *self.pending.lock().unwrap_or_else(|e| e.into_inner()));
        for r in taken {
            if let Err(e) = store.release(r.pid, r.start(), r.nr_pages())
                && !self.warned.swap(true, Relaxed)
            {
                tracing::warn!(
                    "{e}; the page store keeps that memory until this migration ends (further \
                     failures are not logged)"
                );
            }
        }
    }
}

fn run(me: &Weak<StoreRelease>, store: &PageStore) {
    loop {
        std::thread::sleep(PERIOD);
        let Some(me) = me.upgrade() else {
            return;
        };
        me.release_pending(store);
    }
}
