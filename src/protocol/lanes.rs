//! A stop-and-copy session's frames spread over several QUIC streams ("lanes"), sans-IO.
//!
//! One stream has one flow-control window (2 MiB at dst), so a single stream lets the source run
//! at most that far ahead of dst's writer: every pause of the writer stalls the sender. The
//! source therefore deals the session's frames (pages files created, page data in
//! [`STRIPE_PAGES`] pieces, pagemap chunks) round-robin over `n` unidirectional streams, frame
//! `i` on lane `i mod n`, and finishes every lane after the last frame. dst reads them back in the
//! same order ([`Merger`]), so the session is applied exactly in the order the dump produced it
//! (a pages file is appended sequentially, created before its first page) and no frame carries
//! anything new on the wire.
//!
//! The end of the session is the first lane to finish where a frame was expected; every later
//! lane, in dealing order, must then finish without another frame. Anything else is a source
//! error.

/// Most lanes a source may announce; dst refuses more (each is a stream it must read).
pub const MAX_LANES: u32 = 16;
/// Lanes a source uses unless told otherwise: with dst's 2 MiB stream windows, 8 lanes fill its
/// 16 MiB connection window.
pub const DEFAULT_LANES: u32 = 8;
/// Pages of one page-data frame on a lane (256 KiB): small enough to spread a dump's runs evenly,
/// large enough that the 24-byte frame header costs nothing.
pub const STRIPE_PAGES: u32 = 64;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LaneError {
    #[error(
        "the source announced {got} lanes for its page-server session; 1 to {MAX_LANES} are \
         allowed: is it a pageserv of another version?"
    )]
    BadCount { got: u32 },
    #[error(
        "frame {seq} of the page-server session arrived on lane {got}, lane {want} was due: the \
         source does not deal its frames round-robin"
    )]
    OutOfTurn { seq: u64, got: usize, want: usize },
    #[error(
        "lane {lane} carried a frame after the page-server session ended (at frame {seq}): the \
         source is faulty"
    )]
    AfterEnd { lane: usize, seq: u64 },
    #[error(
        "lane {lane} ended out of turn (lane {want} was due, frame {seq}): the source ended its \
         page-server session on a broken stream"
    )]
    EndOutOfTurn { lane: usize, want: usize, seq: u64 },
}

/// Checks an announced lane count.
pub fn check_count(lanes: u32) -> Result<usize, LaneError> {
    if (1..=MAX_LANES).contains(&lanes) {
        Ok(lanes as usize)
    } else {
        Err(LaneError::BadCount { got: lanes })
    }
}

/// The source's dealer: which lane the next frame goes on.
#[derive(Debug, Clone)]
pub struct Striper {
    lanes: usize,
    seq: u64,
}

impl Striper {
    pub fn new(lanes: u32) -> Result<Self, LaneError> {
        Ok(Striper {
            lanes: check_count(lanes)?,
            seq: 0,
        })
    }

    /// The lane of the next frame (advances).
    pub fn next_lane(&mut self) -> usize {
        let lane = (self.seq % self.lanes as u64) as usize;
        self.seq += 1;
        lane
    }

    /// Frames dealt so far.
    pub fn dealt(&self) -> u64 {
        self.seq
    }
}

/// What dst does next.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Next {
    /// Read the next frame (or the end) of this lane.
    Read(usize),
    /// Every lane ended: the session's frames are all in.
    Done,
}

/// dst's side: the order to read the lanes in, and the end rule.
#[derive(Debug, Clone)]
pub struct Merger {
    lanes: usize,
    /// Frames taken so far.
    seq: u64,
    /// Lanes ended so far (once the first ended, they end in dealing order).
    ended: usize,
}

impl Merger {
    pub fn new(lanes: u32) -> Result<Self, LaneError> {
        Ok(Merger {
            lanes: check_count(lanes)?,
            seq: 0,
            ended: 0,
        })
    }

    /// The lane to read next.
    pub fn next(&self) -> Next {
        if self.ended == self.lanes {
            Next::Done
        } else {
            Next::Read(self.due())
        }
    }

    fn due(&self) -> usize {
        ((self.seq + self.ended as u64) % self.lanes as u64) as usize
    }

    /// A frame arrived on `lane`.
    pub fn on_frame(&mut self, lane: usize) -> Result<(), LaneError> {
        if self.ended > 0 {
            return Err(LaneError::AfterEnd {
                lane,
                seq: self.seq,
            });
        }
        let want = self.due();
        if lane != want {
            return Err(LaneError::OutOfTurn {
                seq: self.seq,
                got: lane,
                want,
            });
        }
        self.seq += 1;
        Ok(())
    }

    /// `lane` was finished by the source.
    pub fn on_end(&mut self, lane: usize) -> Result<(), LaneError> {
        let want = self.due();
        if self.ended == self.lanes || lane != want {
            return Err(LaneError::EndOutOfTurn {
                lane,
                want,
                seq: self.seq,
            });
        }
        self.ended += 1;
        Ok(())
    }

    /// Frames taken so far.
    pub fn taken(&self) -> u64 {
        self.seq
    }
}

/// The pieces a run of `nr_pages` pages is cut into: (first page, pages), each at most `max`.
pub fn pieces(nr_pages: u64, max: u32) -> impl Iterator<Item = (u64, u32)> {
    let max = u64::from(max.max(1));
    (0..nr_pages.div_ceil(max)).map(move |i| {
        let first = i * max;
        (first, (nr_pages - first).min(max) as u32)
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// Deals `frames` frames, then ends every lane in the order the source's `finish` calls
    /// would be seen by dst's reader: what dst reads, lane by lane.
    fn deal(lanes: u32, frames: u64) -> Vec<Vec<u64>> {
        let mut s = Striper::new(lanes).unwrap();
        let mut out = vec![Vec::new(); lanes as usize];
        for f in 0..frames {
            out[s.next_lane()].push(f);
        }
        out
    }

    /// Reads `dealt` back as dst does; returns the frames in the order taken.
    fn merge(lanes: u32, dealt: &[Vec<u64>]) -> Result<Vec<u64>, LaneError> {
        let mut m = Merger::new(lanes).unwrap();
        let mut pos = vec![0usize; dealt.len()];
        let mut got = Vec::new();
        loop {
            match m.next() {
                Next::Done => return Ok(got),
                Next::Read(l) => match dealt[l].get(pos[l]) {
                    Some(f) => {
                        pos[l] += 1;
                        m.on_frame(l)?;
                        got.push(*f);
                    }
                    None => m.on_end(l)?,
                },
            }
        }
    }

    #[test]
    fn counts_outside_one_to_max_are_refused() {
        assert!(check_count(0).is_err());
        assert!(check_count(MAX_LANES + 1).is_err());
        assert_eq!(check_count(1), Ok(1));
        assert_eq!(check_count(MAX_LANES), Ok(MAX_LANES as usize));
    }

    #[test]
    fn an_empty_session_ends_every_lane_in_turn() {
        let mut m = Merger::new(3).unwrap();
        assert_eq!(m.next(), Next::Read(0));
        m.on_end(0).unwrap();
        assert_eq!(m.next(), Next::Read(1));
        assert!(m.on_end(2).is_err(), "lane 2 may not end before lane 1");
    }

    #[test]
    fn a_frame_after_the_end_is_refused() {
        let mut m = Merger::new(2).unwrap();
        m.on_frame(0).unwrap();
        m.on_end(1).unwrap();
        assert_eq!(m.next(), Next::Read(0));
        assert_eq!(m.on_frame(0), Err(LaneError::AfterEnd { lane: 0, seq: 1 }));
    }

    #[test]
    fn pieces_cover_a_run_exactly() {
        assert_eq!(pieces(0, 64).count(), 0);
        assert_eq!(
            pieces(130, 64).collect::<Vec<_>>(),
            vec![(0, 64), (64, 64), (128, 2)]
        );
    }

    proptest! {
        #[test]
        fn merging_what_was_dealt_gives_the_session_back_in_order(
            lanes in 1u32..=MAX_LANES, frames in 0u64..200,
        ) {
            let dealt = deal(lanes, frames);
            let got = merge(lanes, &dealt).unwrap();
            prop_assert_eq!(got, (0..frames).collect::<Vec<_>>());
        }

        #[test]
        fn a_lane_short_of_its_frames_or_with_extra_ones_is_refused(
            lanes in 2u32..=MAX_LANES, frames in 1u64..200, which in 0usize..16, extra in any::<bool>(),
        ) {
            let mut dealt = deal(lanes, frames);
            let l = which % lanes as usize;
            // An extra frame on the lane next in turn, or the session's last frame missing,
            // is just another (valid) session: only the rest must be refused.
            if extra {
                if l == (frames % u64::from(lanes)) as usize {
                    return Ok(());
                }
                dealt[l].push(u64::MAX);
            } else {
                match dealt[l].pop() {
                    None => return Ok(()),
                    Some(f) if f == frames - 1 => return Ok(()),
                    Some(_) => {}
                }
            }
            prop_assert!(merge(lanes, &dealt).is_err());
        }

        #[test]
        fn frames_taken_in_any_other_order_are_refused(
            lanes in 2u32..=MAX_LANES, order in proptest::collection::vec(0usize..16, 1..64),
        ) {
            // Feed lanes as given; the merger accepts exactly the round-robin prefix.
            let mut m = Merger::new(lanes).unwrap();
            for (i, l) in order.iter().map(|l| l % lanes as usize).enumerate() {
                let ok = m.on_frame(l).is_ok();
                prop_assert_eq!(ok, l == i % lanes as usize);
                if !ok { break; }
            }
        }

        #[test]
        fn pieces_are_bounded_contiguous_and_whole(n in 0u64..100_000, max in 1u32..5000) {
            let mut next = 0u64;
            for (first, len) in pieces(n, max) {
                prop_assert_eq!(first, next);
                prop_assert!(len >= 1 && len <= max);
                next += u64::from(len);
            }
            prop_assert_eq!(next, n);
        }
    }
}
