//! Pushed pages that reached dst and are not placed yet (sans-IO queue, and the small shared
//! wrapper the push reader, its placer and the fault writer use).
//!
//! The push stream carries page data, zero runs and, after a pre-copy, Valid frames (a few bytes
//! per 1024 pages confirming dst's stored copies). dst places pushed pages at the pace of the
//! fault loop's copies, so frames wait at dst before they are placed; Valid frames, which cost
//! the source almost nothing to send, pile up by the thousand. Before this queue they waited
//! unread in the push stream or in the fault loop's queue, and a thread that faulted on one of
//! those pages asked the source for it: a round trip for a page dst already had, and the page
//! judged and sent twice (measured: half the faults of a sequential reader after a pre-copy, 40–150
//! ms after the source had confirmed the page).
//!
//! Now the push reader takes frames off the stream as they arrive and queues them here; a placer
//! takes them in order and hands them to the fault loop; the fault writer
//! ([`crate::dst::fault_requests`]) first takes a faulting page out of the queue, if it is there,
//! and hands it to the fault loop as the fault's answer at once, asking the source only for the
//! rest.
//!
//! Invariants (property-tested below):
//! - every queued page is handed out at most once: by [`PushQueue::pop`] (the placer) or by
//!   [`PushQueue::take`] (a fault), never both, and none is lost while its link lives;
//! - a fault takes only pages of its own link ([`PushQueue::take`] is given the link): the fault
//!   thread drops pages of any other link, and a request it raised for the new link must be
//!   answered on that link;
//! - the queue holds at most `max_pages` pages, `max_data_bytes` of page data and
//!   [`MAX_QUEUED_FRAMES`] frames ([`MAX_QUEUED_PAGES`], [`MAX_QUEUED_DATA_BYTES`]; one frame may
//!   go past the first two); the reader waits while it is full, so QUIC flow control holds the
//!   source back and a lying source cannot grow dst's memory;
//! - a fault's lookup is a range of an index by (link, pid, address), not a walk of the queue.

use std::collections::{BTreeMap, VecDeque};
use std::sync::Mutex;

use bytes::Bytes;

use crate::pages::PAGE_SIZE;

/// Pages queued at most (a bit each): 1 Mi pages.
pub const MAX_QUEUED_PAGES: u64 = 1 << 20;
/// Page data queued at most (pushed Pages frames; Valid pages stay in the page store).
pub const MAX_QUEUED_DATA_BYTES: u64 = 4 << 20;
/// Frames queued at most (~150 bytes of bookkeeping each: ~2.5 MiB), so a source that sends
/// one-page frames cannot make the bookkeeping outgrow the data bound.
pub const MAX_QUEUED_FRAMES: usize = 16 << 10;

/// Where a queued frame's pages come from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Origin {
    /// Confirmed pre-copied pages: read them from the page store.
    Store,
    /// Page data, `nr_pages * 4096` bytes.
    Data(Bytes),
    /// All zero.
    Zero,
}

/// One frame of link `link` (or the run of one a fault took): pages `[vaddr, +nr_pages)` of image
/// pid `pid` whose bit is set (bit `i`, LSB first, is page `i`) are still to be placed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Queued {
    pub link: u64,
    pub pid: u32,
    pub vaddr: u64,
    pub nr_pages: u32,
    pub bitmap: Vec<u8>,
    pub origin: Origin,
}

impl Queued {
    /// A frame whose pages are all to be placed.
    pub fn whole(link: u64, pid: u32, vaddr: u64, nr_pages: u32, origin: Origin) -> Self {
        let mut bitmap = vec![0xff; (nr_pages as usize).div_ceil(8)];
        if !nr_pages.is_multiple_of(8)
            && let Some(last) = bitmap.last_mut()
        {
            *last = (1u8 << (nr_pages % 8)) - 1;
        }
        Self {
            link,
            pid,
            vaddr,
            nr_pages,
            bitmap,
            origin,
        }
    }

    pub fn bit(&self, i: u64) -> bool {
        i < u64::from(self.nr_pages)
            && self
                .bitmap
                .get((i / 8) as usize)
                .is_some_and(|b| b & (1 << (i % 8)) != 0)
    }

    fn clear(&mut self, i: u64) {
        if let Some(b) = self.bitmap.get_mut((i / 8) as usize) {
            *b &= !(1 << (i % 8));
        }
    }

    /// The runs of pages still to place: (first page index, pages).
    pub fn runs(&self) -> Vec<(u64, u64)> {
        let mut out: Vec<(u64, u64)> = Vec::new();
        for i in (0..u64::from(self.nr_pages)).filter(|i| self.bit(*i)) {
            match out.last_mut() {
                Some((first, n)) if *first + *n == i => *n += 1,
                _ => out.push((i, 1)),
            }
        }
        out
    }

    /// The origin of pages `[first, +n)` of this frame.
    pub fn slice(&self, first: u64, n: u64) -> Origin {
        match &self.origin {
            Origin::Data(d) => {
                let page = PAGE_SIZE as usize;
                let from = first as usize * page;
                Origin::Data(d.slice(from..from + n as usize * page))
            }
            o => o.clone(),
        }
    }

    fn data_bytes(&self) -> u64 {
        match &self.origin {
            Origin::Data(d) => d.len() as u64,
            _ => 0,
        }
    }

    fn end(&self) -> u64 {
        self.vaddr + u64::from(self.nr_pages) * PAGE_SIZE
    }
}

/// (link, pid, first page, arrival number): frames of one link never overlap, so a fault finds
/// the frames holding its pages by a range of this key.
type Key = (u64, u32, u64, u64);

/// See the module docs.
#[derive(Debug)]
pub struct PushQueue {
    frames: BTreeMap<Key, Queued>,
    /// Arrival order, for the placer.
    order: VecDeque<Key>,
    next: u64,
    /// Pages the queued frames cover (taken or not), and their data bytes.
    pages: u64,
    data_bytes: u64,
    max_pages: u64,
    max_data_bytes: u64,
}

impl PushQueue {
    pub fn new(max_pages: u64, max_data_bytes: u64) -> Self {
        Self {
            frames: BTreeMap::new(),
            order: VecDeque::new(),
            next: 0,
            pages: 0,
            data_bytes: 0,
            max_pages,
            max_data_bytes,
        }
    }

    /// Whether another frame may be queued (at most one frame past the page and data bounds).
    pub fn has_room(&self) -> bool {
        self.pages < self.max_pages
            && self.data_bytes < self.max_data_bytes
            && self.order.len() < MAX_QUEUED_FRAMES
    }

    /// Queues a frame (the caller waits for [`PushQueue::has_room`] first).
    pub fn push(&mut self, q: Queued) {
        self.pages += u64::from(q.nr_pages);
        self.data_bytes += q.data_bytes();
        let key = (q.link, q.pid, q.vaddr, self.next);
        self.next += 1;
        self.order.push_back(key);
        self.frames.insert(key, q);
    }

    /// The oldest frame of `link`, with the pages faults took out of it cleared; frames of older
    /// links are dropped on the way (a new link sends again what is missing), a newer link's
    /// are left for that link's placer.
    pub fn pop(&mut self, link: u64) -> Option<Queued> {
        self.pop_within(link, u64::MAX)
    }

    /// As [`PushQueue::pop`], but only a frame of at most `max_pages` pages: a larger oldest
    /// frame of `link` stays queued (and `None` is returned).
    pub fn pop_within(&mut self, link: u64, max_pages: u64) -> Option<Queued> {
        while let Some(&key) = self.order.front() {
            if key.0 > link {
                return None;
            }
            match self.frames.get(&key) {
                Some(q) if key.0 == link && u64::from(q.nr_pages) > max_pages => return None,
                _ => {}
            }
            self.order.pop_front();
            let Some(q) = self.frames.remove(&key) else {
                continue;
            };
            self.pages -= u64::from(q.nr_pages);
            self.data_bytes -= q.data_bytes();
            if key.0 == link {
                return Some(q);
            }
        }
        None
    }

    /// Takes the queued pages of `[vaddr, +nr_pages)` of `pid` for `link` out of the queue, as
    /// runs within one frame each (each a [`Queued`] whose pages are all set), in address order.
    pub fn take(&mut self, link: u64, pid: u32, vaddr: u64, nr_pages: u64) -> Vec<Queued> {
        let end = vaddr.saturating_add(nr_pages.saturating_mul(PAGE_SIZE));
        // A frame holds at most MAX_FRAME_PAGES pages, so one that reaches `vaddr` starts at
        // most that far below it.
        let reach = u64::from(crate::wire::MAX_FRAME_PAGES) * PAGE_SIZE;
        let from = (link, pid, vaddr.saturating_sub(reach), 0);
        let to = (link, pid, end, 0);
        let mut out = Vec::new();
        for q in self.frames.range_mut(from..to).map(|(_, q)| q) {
            if q.end() <= vaddr {
                continue;
            }
            let first = (vaddr.max(q.vaddr) - q.vaddr) / PAGE_SIZE;
            let last = (end.min(q.end()) - q.vaddr) / PAGE_SIZE;
            let mut i = first;
            while i < last {
                if !q.bit(i) {
                    i += 1;
                    continue;
                }
                let mut n = 0;
                while i + n < last && q.bit(i + n) {
                    q.clear(i + n);
                    n += 1;
                }
                let origin = q.slice(i, n);
                out.push(Queued::whole(
                    q.link,
                    q.pid,
                    q.vaddr + i * PAGE_SIZE,
                    n as u32,
                    origin,
                ));
                i += n;
            }
        }
        out
    }
}

/// The queue shared by one migration's push reader, its placer and the fault writer.
pub struct SharedPushQueue {
    queue: Mutex<PushQueue>,
    /// Signalled when a frame is queued or the reader ends (the placer waits on it).
    pub queued: tokio::sync::Notify,
    /// Signalled when a frame leaves the queue (the reader waits on it while the queue is full).
    pub room: tokio::sync::Notify,
}

impl Default for SharedPushQueue {
    fn default() -> Self {
        Self::new(MAX_QUEUED_PAGES, MAX_QUEUED_DATA_BYTES)
    }
}

impl SharedPushQueue {
    pub fn new(max_pages: u64, max_data_bytes: u64) -> Self {
        Self {
            queue: Mutex::new(PushQueue::new(max_pages, max_data_bytes)),
            queued: tokio::sync::Notify::new(),
            room: tokio::sync::Notify::new(),
        }
    }

    /// Runs `f` on the queue (a poisoned lock still holds a consistent queue: no method panics
    /// halfway).
    pub fn with<R>(&self, f: impl FnOnce(&mut PushQueue) -> R) -> R {
        let mut q = match self.queue.lock() {
            Ok(q) => q,
            Err(p) => p.into_inner(),
        };
        f(&mut q)
    }

    /// Queues `q`, waiting while the queue is full.
    pub async fn push(&self, q: Queued) {
        let mut q = Some(q);
        loop {
            let room = self.room.notified();
            tokio::pin!(room);
            room.as_mut().enable();
            let pushed = self.with(|queue| {
                if queue.has_room() {
                    if let Some(q) = q.take() {
                        queue.push(q);
                    }
                    true
                } else {
                    false
                }
            });
            if pushed {
                self.queued.notify_one();
                return;
            }
            room.await;
        }
    }

    /// The oldest frame of `link`, waiting for one; `None` once `done()` says the reader has
    /// ended and the queue holds nothing more of `link`.
    pub async fn pop(&self, link: u64, done: impl Fn() -> bool) -> Option<Queued> {
        loop {
            let queued = self.queued.notified();
            tokio::pin!(queued);
            queued.as_mut().enable();
            let finished = done();
            if let Some(q) = self.with(|queue| queue.pop(link)) {
                self.room.notify_waiters();
                return Some(q);
            }
            if finished {
                return None;
            }
            queued.await;
        }
    }

    /// The oldest frame of `link` if one of at most `max_pages` pages is queued now, without
    /// waiting (see [`PushQueue::pop_within`]).
    pub fn try_pop_within(&self, link: u64, max_pages: u64) -> Option<Queued> {
        let q = self.with(|queue| queue.pop_within(link, max_pages))?;
        self.room.notify_waiters();
        Some(q)
    }

    /// Takes the queued pages of a fault request (see [`PushQueue::take`]).
    pub fn take(&self, link: u64, pid: u32, vaddr: u64, nr_pages: u64) -> Vec<Queued> {
        self.with(|q| q.take(link, pid, vaddr, nr_pages))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::BTreeSet;

    const P: u64 = PAGE_SIZE;

    fn store(link: u64, pid: u32, first: u64, bits: &[bool]) -> Queued {
        let mut bitmap = vec![0u8; bits.len().div_ceil(8)];
        for (i, b) in bits.iter().enumerate() {
            if *b {
                bitmap[i / 8] |= 1 << (i % 8);
            }
        }
        Queued {
            link,
            pid,
            vaddr: first * P,
            nr_pages: bits.len() as u32,
            bitmap,
            origin: Origin::Store,
        }
    }

    fn data(link: u64, first: u64, n: u32) -> Queued {
        let bytes: Vec<u8> = (0..u64::from(n) * P).map(|b| (b / P) as u8).collect();
        Queued::whole(link, 1, first * P, n, Origin::Data(Bytes::from(bytes)))
    }

    #[test]
    fn a_fault_takes_its_pages_and_the_placer_gets_the_rest() {
        let mut q = PushQueue::new(1 << 20, 1 << 30);
        q.push(store(0, 7, 10, &[true, true, false, true, true]));
        let t = q.take(0, 7, 11 * P, 3);
        assert_eq!(
            t.iter().map(|t| (t.vaddr, t.nr_pages)).collect::<Vec<_>>(),
            vec![(11 * P, 1), (13 * P, 1)]
        );
        assert!(q.take(0, 7, 11 * P, 3).is_empty());
        assert!(q.take(1, 7, 10 * P, 1).is_empty(), "another link's fault");
        assert!(q.take(0, 8, 10 * P, 1).is_empty(), "another pid");
        let c = q.pop(0).unwrap();
        assert_eq!(c.runs(), vec![(0, 1), (4, 1)]);
        assert!(q.order.is_empty() && q.has_room());
    }

    #[test]
    fn a_fault_takes_data_pages_as_slices_and_the_placer_the_rest() {
        let mut q = PushQueue::new(1 << 20, 1 << 30);
        q.push(data(0, 100, 10));
        let t = q.take(0, 1, 103 * P, 2);
        assert_eq!(t.len(), 1);
        let Origin::Data(d) = &t[0].origin else {
            panic!("data expected: {t:?}")
        };
        assert_eq!((d.len() as u64, d[0], d[P as usize]), (2 * P, 3, 4));
        let rest = q.pop(0).unwrap();
        assert_eq!(rest.runs(), vec![(0, 3), (5, 5)]);
        let Origin::Data(d) = rest.slice(5, 5) else {
            panic!()
        };
        assert_eq!((d.len() as u64, d[0]), (5 * P, 5));
    }

    #[test]
    fn a_fault_finds_the_far_end_of_the_largest_frame_and_frames_are_bounded() {
        let mut q = PushQueue::new(u64::MAX, u64::MAX);
        let max = crate::wire::MAX_FRAME_PAGES;
        q.push(Queued::whole(0, 1, 0, max, Origin::Zero));
        let t = q.take(0, 1, u64::from(max - 1) * P, 2);
        assert_eq!(t.len(), 1);
        assert_eq!((t[0].vaddr, t[0].nr_pages), (u64::from(max - 1) * P, 1));
        while q.has_room() {
            q.push(Queued::whole(0, 1, 1 << 40, 1, Origin::Zero));
        }
        assert_eq!(q.order.len(), MAX_QUEUED_FRAMES);
    }

    #[test]
    fn whole_frames_have_exactly_their_pages() {
        for n in [1u32, 7, 8, 9, 64, 4096] {
            let q = Queued::whole(0, 1, 0, n, Origin::Zero);
            assert_eq!(q.runs(), vec![(0, u64::from(n))]);
        }
    }

    #[test]
    fn a_full_queue_has_no_room_and_old_links_are_dropped() {
        let mut q = PushQueue::new(8, 1 << 30);
        q.push(store(0, 1, 0, &[true; 8]));
        assert!(!q.has_room());
        q.push(store(1, 1, 8, &[true; 8]));
        assert_eq!(q.pop(2), None, "no frame of link 2; older ones dropped");
        assert!(q.order.is_empty() && q.has_room());
        q.push(store(1, 1, 0, &[true; 8]));
        q.push(store(2, 1, 8, &[true; 8]));
        assert_eq!(
            q.pop(0),
            None,
            "a dead link's placer leaves newer links alone"
        );
        assert_eq!(q.order.len(), 2);
        assert_eq!(
            q.pop(2).unwrap().link,
            2,
            "link 1's frame dropped on the way"
        );
        assert!(q.order.is_empty());
        let mut q = PushQueue::new(1 << 20, 4 * P);
        q.push(data(0, 0, 4));
        assert!(!q.has_room(), "data bytes are bounded too");
        q.pop(0);
        assert!(q.has_room());
    }

    #[test]
    fn pop_within_leaves_a_larger_oldest_frame_queued() {
        let mut q = PushQueue::new(1 << 20, 1 << 30);
        q.push(data(1, 0, 4));
        q.push(data(2, 100, 8));
        q.push(data(2, 200, 2));
        assert_eq!(
            q.pop_within(2, 7),
            None,
            "link 2's oldest frame has 8 pages"
        );
        assert_eq!(q.order.len(), 2, "link 1's frame dropped on the way");
        let c = q.pop_within(2, 8).unwrap();
        assert_eq!((c.vaddr, c.nr_pages), (100 * P, 8));
        assert_eq!(q.pop_within(2, 1), None);
        assert_eq!(q.pop_within(2, 2).unwrap().vaddr, 200 * P);
        assert!(q.order.is_empty() && q.pages == 0 && q.data_bytes == 0);
    }

    #[tokio::test]
    async fn the_shared_queue_waits_for_room_and_ends_when_done() {
        use std::sync::Arc;
        use std::sync::atomic::{AtomicBool, Ordering};
        let s = Arc::new(SharedPushQueue::new(4, 1 << 30));
        let done = Arc::new(AtomicBool::new(false));
        let (s2, d2) = (s.clone(), done.clone());
        let reader = tokio::spawn(async move {
            for i in 0..10 {
                s2.push(store(0, 1, i * 4, &[true; 4])).await;
            }
            d2.store(true, Ordering::SeqCst);
            s2.queued.notify_waiters();
        });
        let mut got = 0;
        while let Some(c) = s.pop(0, || done.load(Ordering::SeqCst)).await {
            assert!(s.with(|q| q.order.len()) <= 1, "the reader waited for room");
            got += c.nr_pages;
        }
        reader.await.unwrap();
        assert_eq!(got, 40);
    }

    proptest! {
        /// Whatever the faults take, every queued page of the live link is handed out exactly
        /// once (by a fault or by the placer), with its own bytes, never one that was not queued.
        #[test]
        fn every_queued_page_is_handed_out_once(
            frames in proptest::collection::btree_map(0u64..64, (proptest::collection::vec(any::<bool>(), 1..40), any::<bool>()), 1..12),
            faults in proptest::collection::vec((0u64..4100, 1u64..6, 0usize..3), 0..40),
        ) {
            let mut q = PushQueue::new(u64::MAX, u64::MAX);
            let mut queued = BTreeSet::new();
            for (first, (bits, is_data)) in &frames {
                // Frames of one link never overlap (the source sends each page once).
                let first = first * 64;
                if *is_data {
                    queued.extend((0..bits.len() as u64).map(|i| first + i));
                    q.push(data(3, first, bits.len() as u32));
                } else {
                    queued.extend((0..bits.len() as u64).filter(|i| bits[*i as usize]).map(|i| first + i));
                    let mut s = store(3, 1, first, bits);
                    s.pid = 1;
                    q.push(s);
                }
            }
            let mut handed = Vec::new();
            let check = |vaddr: u64, n: u64, o: &Origin| -> Vec<u64> {
                if let Origin::Data(d) = o {
                    assert_eq!(d.len() as u64, n * P);
                    for k in 0..n {
                        // Each data page carries its index in its frame; frames start at 64 * j.
                        assert_eq!(u64::from(d[(k * P) as usize]), (vaddr / P + k) % 64);
                    }
                }
                (0..n).map(|k| vaddr / P + k).collect()
            };
            let placer = |c: Queued, handed: &mut Vec<u64>| {
                for (first, n) in c.runs() {
                    handed.extend(check(c.vaddr + first * P, n, &c.slice(first, n)));
                }
            };
            for (page, n, pops) in faults {
                for t in q.take(3, 1, page * P, n) {
                    handed.extend(check(t.vaddr, t.nr_pages.into(), &t.origin));
                }
                prop_assert!(q.take(4, 1, page * P, n).is_empty(), "another link's fault");
                for _ in 0..pops {
                    // The placer's batching pops only frames that fit what is left of a batch.
                    if let Some(c) = q.pop_within(3, 1 + page % 40) {
                        placer(c, &mut handed);
                    }
                }
            }
            while let Some(c) = q.pop(3) {
                placer(c, &mut handed);
            }
            let set: BTreeSet<u64> = handed.iter().copied().collect();
            prop_assert_eq!(set.len(), handed.len(), "a page handed out twice");
            prop_assert_eq!(set, queued);
        }
    }
}
