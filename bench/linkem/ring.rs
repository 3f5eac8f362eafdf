//! Storage for packets between arrival and release: one preallocated byte ring, so forwarding
//! allocates nothing per packet and memory is proportional to the bytes held, not to a
//! worst-case packet count times the MTU.
//!
//! Packets are stored in arrival order. The next packet to send is the earliest release; in FIFO
//! mode that is always the oldest, with reordering a heap picks it and space is reclaimed once
//! every older packet has gone too.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, VecDeque};

#[derive(Debug, Clone, Copy)]
struct Slot {
    off: usize,
    len: usize,
    release: u64,
    sent: bool,
}

/// A byte ring of packets waiting for their release time.
#[derive(Debug)]
pub struct PacketRing {
    buf: Vec<u8>,
    /// Write position: the byte after the newest packet.
    tail: usize,
    slots: VecDeque<Slot>,
    /// Sequence number of `slots[0]`.
    base_seq: u64,
    /// Present only when reordering is allowed: (release, seq) of unsent packets.
    order: Option<BinaryHeap<Reverse<(u64, u64)>>>,
    held_bytes: usize,
}

impl PacketRing {
    /// A ring of `capacity` bytes; `reorder` releases by time rather than arrival order.
    pub fn new(capacity: usize, reorder: bool) -> Self {
        Self {
            buf: vec![0; capacity],
            tail: 0,
            slots: VecDeque::with_capacity(4096),
            base_seq: 0,
            order: reorder.then(|| BinaryHeap::with_capacity(4096)),
            held_bytes: 0,
        }
    }

    /// Payload bytes currently held (not counting space lost to wrap-around).
    #[cfg(test)]
    pub fn held_bytes(&self) -> usize {
        self.held_bytes
    }

    /// Where a packet of up to `max_len` bytes can be written, or `None` if the ring is full.
    fn free_offset(&self, max_len: usize) -> Option<usize> {
        let Some(front) = self.slots.front() else {
            return (max_len <= self.buf.len()).then_some(0);
        };
        let head = front.off;
        if self.tail > head {
            if self.buf.len() - self.tail >= max_len {
                Some(self.tail)
            } else if head >= max_len {
                Some(0)
            } else {
                None
            }
        } else if head - self.tail >= max_len {
            Some(self.tail)
        } else {
            None
        }
    }

    /// Packets waiting to be sent.
    pub fn len(&self) -> usize {
        match &self.order {
            Some(order) => order.len(),
            None => self.slots.len(),
        }
    }

    /// Space to receive a packet of up to `max_len` bytes into; `None` if the ring is full.
    /// Follow with [`PacketRing::commit`] to keep it, or drop the packet by doing nothing.
    pub fn reserve(&mut self, max_len: usize) -> Option<&mut [u8]> {
        let off = self.free_offset(max_len)?;
        Some(&mut self.buf[off..off + max_len])
    }

    /// Keeps the first `len` bytes of the last [`PacketRing::reserve`]d space (of `max_len`),
    /// to be released at `release`.
    pub fn commit(&mut self, max_len: usize, len: usize, release: u64) {
        let Some(off) = self.free_offset(max_len) else {
            debug_assert!(false, "commit without a successful reserve");
            return;
        };
        debug_assert!(len <= max_len);
        let seq = self.base_seq + self.slots.len() as u64;
        self.slots.push_back(Slot {
            off,
            len,
            release,
            sent: false,
        });
        if let Some(order) = &mut self.order {
            order.push(Reverse((release, seq)));
        }
        self.tail = off + len;
        self.held_bytes += len;
    }

    /// Release time of the next packet to send.
    pub fn next_release(&self) -> Option<u64> {
        match &self.order {
            Some(order) => order.peek().map(|Reverse((t, _))| *t),
            None => self.slots.front().map(|s| s.release),
        }
    }

    /// The next packet to send, and its release time, if that is at or before `now`. Call
    /// [`PacketRing::pop`] once it has been sent.
    pub fn due(&self, now: u64) -> Option<(&[u8], u64)> {
        let slot = match &self.order {
            Some(order) => {
                let Reverse((t, seq)) = *order.peek()?;
                if t > now {
                    return None;
                }
                self.slots[(seq - self.base_seq) as usize]
            }
            None => *self.slots.front().filter(|s| s.release <= now)?,
        };
        Some((&self.buf[slot.off..slot.off + slot.len], slot.release))
    }

    /// Forgets the packet [`PacketRing::due`] returned, freeing its space as soon as every older
    /// packet is gone too.
    pub fn pop(&mut self) {
        if let Some(order) = &mut self.order {
            let Some(Reverse((_, seq))) = order.pop() else {
                return;
            };
            let slot = &mut self.slots[(seq - self.base_seq) as usize];
            slot.sent = true;
            self.held_bytes -= slot.len;
            while self.slots.front().is_some_and(|s| s.sent) {
                self.slots.pop_front();
                self.base_seq += 1;
            }
        } else if let Some(slot) = self.slots.pop_front() {
            self.base_seq += 1;
            self.held_bytes -= slot.len;
        }
        if self.slots.is_empty() {
            self.tail = 0;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// Operations: Some(len, release) = receive a packet, None = send everything due at a clock
    /// that advances with each send.
    fn ops() -> impl Strategy<Value = Vec<Option<(usize, u64)>>> {
        prop::collection::vec(
            prop::option::weighted(0.7, (1usize..3000, 0u64..1000)),
            1..600,
        )
    }

    fn fill(data: &mut [u8], seq: u32) {
        for (i, b) in data.iter_mut().enumerate() {
            *b = (seq as usize).wrapping_mul(31).wrapping_add(i) as u8;
        }
    }

    proptest! {
        #[test]
        fn packets_come_back_intact_in_release_order(ops in ops(), reorder: bool, cap in 3000usize..20000) {
            const MAX: usize = 3000;
            let mut ring = PacketRing::new(cap, reorder);
            // Model: (release, seq, len) of packets held.
            let mut held: Vec<(u64, u32, usize)> = Vec::new();
            let mut seq = 0u32;
            let mut last_release = 0u64;
            let mut clock = 0u64;
            for op in ops {
                match op {
                    Some((len, jitter)) => {
                        // FIFO mode requires non-decreasing releases, as the model produces.
                        let release = if reorder { clock + jitter } else { last_release.max(clock + jitter) };
                        let Some(space) = ring.reserve(MAX) else {
                            // Free space is split in at most two pieces, one lost to wrap-around.
                            // (With reordering, sent packets behind an unsent one still hold
                            // their space.)
                            prop_assert!(reorder || ring.held_bytes() + 2 * MAX > cap);
                            continue;
                        };
                        fill(&mut space[..len], seq);
                        ring.commit(MAX, len, release);
                        held.push((release, seq, len));
                        last_release = release;
                        seq += 1;
                    }
                    None => {
                        clock += 300;
                        while let Some((pkt, at)) = ring.due(clock) {
                            let idx = if reorder {
                                let min = held.iter().map(|h| h.0).min().unwrap();
                                held.iter().position(|h| h.0 == min).unwrap()
                            } else {
                                0
                            };
                            let (release, s, len) = held.remove(idx);
                            prop_assert!(release <= clock);
                            prop_assert_eq!(at, release);
                            prop_assert_eq!(pkt.len(), len);
                            let mut expect = vec![0u8; len];
                            fill(&mut expect, s);
                            // Ties in release time go oldest first, as in the model above.
                            prop_assert_eq!(pkt, &expect[..]);
                            ring.pop();
                        }
                        prop_assert!(held.iter().all(|h| h.0 > clock));
                    }
                }
                prop_assert_eq!(ring.held_bytes(), held.iter().map(|h| h.2).sum::<usize>());
                prop_assert_eq!(ring.len(), held.len());
                prop_assert_eq!(ring.next_release(), if reorder { held.iter().map(|h| h.0).min() } else { held.first().map(|h| h.0) });
            }
        }
    }

    #[test]
    fn full_ring_refuses_then_recovers() {
        let mut ring = PacketRing::new(10_000, false);
        let mut n = 0;
        while ring.reserve(1500).is_some() {
            ring.commit(1500, 1500, n);
            n += 1;
        }
        assert_eq!(n, 6);
        assert!(ring.due(0).is_some());
        ring.pop();
        assert!(
            ring.reserve(1500).is_some(),
            "space freed at the head is reused after wrap"
        );
    }
}
