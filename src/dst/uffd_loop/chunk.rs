//! Cutting background page messages into small pieces, so the fault thread looks at its uffds
//! between pieces instead of after a whole message.
//!
//! A pushed message carries up to 4 MiB, and one UFFDIO_COPY of 4 MiB takes about 1.1 ms
//! (3.5 GiB/s): a fault read just after the copy began would wait all of it. Pieces of
//! [`BULK_PIECE`] bound that wait to about 70 µs, for one epoll_wait per piece.

use super::Inbound;
use crate::pages::PAGE_SIZE;

/// Background bytes placed before the fault thread polls its uffds and fault answers again.
pub(super) const BULK_PIECE: u64 = 256 << 10;

/// Splits a background message into its first `max_bytes` (at least one page) and the rest, if
/// any. Fault answers and everything but page messages are returned whole.
pub(super) fn split_front(msg: Inbound, max_bytes: u64) -> (Inbound, Option<Inbound>) {
    let max_pages = (max_bytes / PAGE_SIZE).clamp(1, u64::from(u32::MAX)) as u32;
    match msg {
        Inbound::Pages {
            pid,
            img_vaddr,
            nr_pages,
            mut data,
            urgent: false,
        } if nr_pages > max_pages && data.len() as u64 == u64::from(nr_pages) * PAGE_SIZE => {
            let front_len = u64::from(max_pages) * PAGE_SIZE;
            let rest = data.split_off(front_len as usize);
            (
                Inbound::Pages {
                    pid,
                    img_vaddr,
                    nr_pages: max_pages,
                    data,
                    urgent: false,
                },
                Some(Inbound::Pages {
                    pid,
                    img_vaddr: img_vaddr + front_len,
                    nr_pages: nr_pages - max_pages,
                    data: rest,
                    urgent: false,
                }),
            )
        }
        Inbound::Zero {
            pid,
            img_vaddr,
            nr_pages,
            urgent: false,
        } if nr_pages > max_pages => (
            Inbound::Zero {
                pid,
                img_vaddr,
                nr_pages: max_pages,
                urgent: false,
            },
            Some(Inbound::Zero {
                pid,
                img_vaddr: img_vaddr + u64::from(max_pages) * PAGE_SIZE,
                nr_pages: nr_pages - max_pages,
                urgent: false,
            }),
        ),
        other => (other, None),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;
    use proptest::prelude::*;

    /// (img_vaddr, nr_pages, first byte of each page) of a Pages message.
    fn pages_of(msg: &Inbound) -> (u64, u32, Vec<u8>) {
        match msg {
            Inbound::Pages {
                img_vaddr,
                nr_pages,
                data,
                ..
            } => {
                assert_eq!(data.len() as u64, u64::from(*nr_pages) * PAGE_SIZE);
                let firsts = data.chunks(PAGE_SIZE as usize).map(|p| p[0]).collect();
                (*img_vaddr, *nr_pages, firsts)
            }
            other => panic!("not pages: {other:?}"),
        }
    }

    proptest! {
        #[test]
        fn pieces_cover_the_message_in_order(nr in 1u32..300, max_pages in 0u64..100) {
            let data: Vec<u8> = (0..nr)
                .flat_map(|i| std::iter::repeat_n(i as u8, PAGE_SIZE as usize))
                .collect();
            let base = 0x7f00_0000_0000;
            let mut next = Some(Inbound::Pages {
                pid: 7,
                img_vaddr: base,
                nr_pages: nr,
                data: Bytes::from(data),
                urgent: false,
            });
            let (mut vaddr, mut firsts) = (base, Vec::new());
            while let Some(msg) = next {
                let (piece, rest) = split_front(msg, max_pages * PAGE_SIZE);
                let (v, n, f) = pages_of(&piece);
                prop_assert_eq!(v, vaddr);
                prop_assert!(u64::from(n) <= max_pages.max(1));
                vaddr += u64::from(n) * PAGE_SIZE;
                firsts.extend(f);
                next = rest;
            }
            prop_assert_eq!(firsts, (0..nr).map(|i| i as u8).collect::<Vec<_>>());
        }
    }

    #[test]
    fn zero_runs_are_cut_too() {
        let msg = Inbound::Zero {
            pid: 1,
            img_vaddr: 0x1000,
            nr_pages: 10,
            urgent: false,
        };
        let (piece, rest) = split_front(msg, 4 * PAGE_SIZE);
        assert!(matches!(
            piece,
            Inbound::Zero {
                img_vaddr: 0x1000,
                nr_pages: 4,
                ..
            }
        ));
        assert!(matches!(
            rest,
            Some(Inbound::Zero {
                img_vaddr: 0x5000,
                nr_pages: 6,
                ..
            })
        ));
    }

    #[test]
    fn fault_answers_and_malformed_messages_stay_whole() {
        let urgent = Inbound::Pages {
            pid: 1,
            img_vaddr: 0,
            nr_pages: 8,
            data: Bytes::from(vec![0; 8 * PAGE_SIZE as usize]),
            urgent: true,
        };
        assert!(split_front(urgent, PAGE_SIZE).1.is_none());
        // The engine reports a length mismatch as an error: it must see the message as sent.
        let short = Inbound::Pages {
            pid: 1,
            img_vaddr: 0,
            nr_pages: 8,
            data: Bytes::from(vec![0; 3]),
            urgent: false,
        };
        assert!(split_front(short, PAGE_SIZE).1.is_none());
    }
}
