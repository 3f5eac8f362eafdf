//! The validation rule after the freeze (sans-IO): which of dst's pre-copied pages may be placed.
//!
//! The lazy dump is the truth. For each frozen page the source fetched from the dump, it compares
//! the page's hash with the hash of the copy dst holds (the last one pre-copied, see
//! [`super::held`]). Only an equal hash makes the page `Valid`: dst then places its stored copy.
//! Anything else crosses again, as a zero frame if the frozen page is all zero, else as data. dst
//! places a stored page only for a bit set in a Valid frame, so a page changed after the last
//! round is never served from its stale copy.

use super::page_hash::PageHash;
use crate::wire::MAX_FRAME_PAGES;

/// What to tell dst about one frozen page.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// dst's stored copy equals the frozen page: a bit in a Valid frame.
    Valid,
    /// The frozen page is all zero and dst holds no equal copy: a Zero frame.
    Zero,
    /// The frozen page must cross as data.
    Data,
}

/// The rule for one page: `held` is the hash of the copy dst holds (None: it holds none),
/// `frozen` the hash of the frozen page, `zero` whether the frozen page is all zero.
pub fn verdict(held: Option<PageHash>, frozen: PageHash, zero: bool) -> Verdict {
    match held {
        Some(h) if h == frozen => Verdict::Valid,
        _ if zero => Verdict::Zero,
        _ => Verdict::Data,
    }
}

/// One frame's worth of a batch's verdicts; page indices are relative to the batch start.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Piece {
    /// Pages `[first, first + nr_pages)`; bit `i` of `bitmap` (LSB first) set means page
    /// `first + i` is valid. Starts and ends on a valid page.
    Valid {
        first: usize,
        nr_pages: usize,
        bitmap: Vec<u8>,
    },
    /// All-zero pages `[first, first + nr_pages)`.
    Zero { first: usize, nr_pages: usize },
    /// Pages `[first, first + nr_pages)` that cross as data.
    Data { first: usize, nr_pages: usize },
}

/// Splits a batch's verdicts into frames: maximal zero and data runs, and Valid bitmaps that span
/// from a valid page to the last valid page at most [`MAX_FRAME_PAGES`] later. Every page is in
/// exactly one piece's set (a set bit, a zero run or a data run).
pub fn pieces(verdicts: &[Verdict]) -> Vec<Piece> {
    let mut out = Vec::new();
    let max = MAX_FRAME_PAGES as usize;
    let mut i = 0;
    while i < verdicts.len() {
        let v = verdicts[i];
        match v {
            Verdict::Valid => {
                let limit = (i + max).min(verdicts.len());
                let last = (i..limit)
                    .rev()
                    .find(|&j| verdicts[j] == Verdict::Valid)
                    .unwrap_or(i);
                let n = last + 1 - i;
                let mut bitmap = vec![0u8; n.div_ceil(8)];
                for (k, _) in verdicts[i..=last]
                    .iter()
                    .enumerate()
                    .filter(|(_, v)| **v == Verdict::Valid)
                {
                    bitmap[k / 8] |= 1 << (k % 8);
                }
                out.push(Piece::Valid {
                    first: i,
                    nr_pages: n,
                    bitmap,
                });
                i = last + 1;
            }
            Verdict::Zero | Verdict::Data => {
                let n = verdicts[i..]
                    .iter()
                    .take(max)
                    .take_while(|w| **w == v)
                    .count();
                out.push(if v == Verdict::Zero {
                    Piece::Zero {
                        first: i,
                        nr_pages: n,
                    }
                } else {
                    Piece::Data {
                        first: i,
                        nr_pages: n,
                    }
                });
                i += n;
            }
        }
    }
    // Zero and data pages inside a Valid span come after it, in their own runs: emit them now.
    let mut extra = Vec::new();
    for p in &out {
        if let Piece::Valid {
            first, nr_pages, ..
        } = p
        {
            let mut j = *first;
            while j < first + nr_pages {
                let v = verdicts[j];
                if v == Verdict::Valid {
                    j += 1;
                    continue;
                }
                let n = verdicts[j..first + nr_pages]
                    .iter()
                    .take_while(|w| **w == v)
                    .count();
                extra.push(if v == Verdict::Zero {
                    Piece::Zero {
                        first: j,
                        nr_pages: n,
                    }
                } else {
                    Piece::Data {
                        first: j,
                        nr_pages: n,
                    }
                });
                j += n;
            }
        }
    }
    out.extend(extra);
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn only_an_equal_hash_is_valid() {
        assert_eq!(verdict(Some(7), 7, false), Verdict::Valid);
        assert_eq!(verdict(Some(7), 8, false), Verdict::Data, "stale copy");
        assert_eq!(verdict(None, 8, false), Verdict::Data, "never pre-copied");
        assert_eq!(verdict(None, 0, true), Verdict::Zero);
        assert_eq!(verdict(Some(7), 0, true), Verdict::Zero, "became zero");
        assert_eq!(
            verdict(Some(0), 0, true),
            Verdict::Valid,
            "held zero, still zero"
        );
    }

    #[test]
    fn splits_into_frames() {
        use Verdict::*;
        let v = [Valid, Data, Valid, Zero, Zero, Data, Valid];
        assert_eq!(
            pieces(&v),
            vec![
                Piece::Valid {
                    first: 0,
                    nr_pages: 7,
                    bitmap: vec![0b0100_0101]
                },
                Piece::Data {
                    first: 1,
                    nr_pages: 1
                },
                Piece::Zero {
                    first: 3,
                    nr_pages: 2
                },
                Piece::Data {
                    first: 5,
                    nr_pages: 1
                },
            ]
        );
        assert_eq!(
            pieces(&[Data, Data, Zero]),
            vec![
                Piece::Data {
                    first: 0,
                    nr_pages: 2
                },
                Piece::Zero {
                    first: 2,
                    nr_pages: 1
                }
            ]
        );
        assert!(pieces(&[]).is_empty());
    }

    fn arb_verdict() -> impl Strategy<Value = Verdict> {
        prop_oneof![
            Just(Verdict::Valid),
            Just(Verdict::Zero),
            Just(Verdict::Data)
        ]
    }

    proptest! {
        /// Every page lands in exactly one piece, in a piece of its own verdict; no piece is
        /// longer than a frame; bitmaps have no bits past their span.
        #[test]
        fn pieces_cover_each_page_once_with_its_verdict(
            runs in prop::collection::vec((arb_verdict(), 1usize..3000), 0..8)
        ) {
            let verdicts: Vec<Verdict> = runs.iter().flat_map(|&(v, n)| std::iter::repeat_n(v, n)).collect();
            let mut seen = vec![None; verdicts.len()];
            for p in pieces(&verdicts) {
                match p {
                    Piece::Valid { first, nr_pages, bitmap } => {
                        prop_assert!(nr_pages >= 1 && nr_pages <= MAX_FRAME_PAGES as usize);
                        prop_assert_eq!(bitmap.len(), nr_pages.div_ceil(8));
                        prop_assert_eq!(verdicts[first], Verdict::Valid);
                        prop_assert_eq!(verdicts[first + nr_pages - 1], Verdict::Valid);
                        for k in 0..bitmap.len() * 8 {
                            let set = bitmap[k / 8] & (1 << (k % 8)) != 0;
                            if k >= nr_pages {
                                prop_assert!(!set, "bit past the span");
                                continue;
                            }
                            prop_assert_eq!(set, verdicts[first + k] == Verdict::Valid);
                            if set {
                                prop_assert!(seen[first + k].replace(Verdict::Valid).is_none());
                            }
                        }
                    }
                    Piece::Zero { first, nr_pages } | Piece::Data { first, nr_pages } => {
                        let v = if matches!(p, Piece::Zero { .. }) { Verdict::Zero } else { Verdict::Data };
                        prop_assert!(nr_pages >= 1 && nr_pages <= MAX_FRAME_PAGES as usize);
                        for slot in &mut seen[first..first + nr_pages] {
                            prop_assert!(slot.replace(v).is_none(), "page in two pieces");
                        }
                        for w in &verdicts[first..first + nr_pages] {
                            prop_assert_eq!(*w, v);
                        }
                    }
                }
            }
            for (i, s) in seen.iter().enumerate() {
                prop_assert_eq!(*s, Some(verdicts[i]), "page {} not covered", i);
            }
        }

        /// A page whose frozen content differs from dst's copy is never valid, whatever the hashes.
        #[test]
        fn a_changed_page_is_never_valid(held in any::<Option<u128>>(), frozen in any::<u128>(), zero in any::<bool>()) {
            let v = verdict(held, frozen, zero);
            prop_assert_eq!(v == Verdict::Valid, held == Some(frozen));
        }
    }
}
