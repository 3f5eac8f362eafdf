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
//!
//! The lanes may span several QUIC connections ([`Spread`]), so that the encryption and the
//! packets of the session are handled by one connection driver per core at each end: lane `i`
//! is stream `i / c` of connection `i mod c`, connection 0 being the control connection.

/// Most lanes a source may announce; dst refuses more (each is a stream it must read).
pub const MAX_LANES: u32 = 16;
/// Lanes a source uses unless told otherwise: with dst's 2 MiB stream windows, 8 lanes fill its
/// 16 MiB connection window.
pub const DEFAULT_LANES: u32 = 8;
/// Connections a session's lanes may span at most; dst refuses more.
pub const MAX_CONNECTIONS: u32 = 4;
/// Connections a source spreads its lanes over unless told otherwise. One: on the bare veth of
/// a 2-core host two connections were no faster (session 4.1 s against 3.4-3.8 s for 1 GiB,
/// dst peak RSS 50 MiB against 34-40 MiB; issue 18), since neither end's connection driver
/// is saturated there; `src --lane-connections` spreads them for hosts where one is.
pub const DEFAULT_CONNECTIONS: u32 = 1;

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
        "the source announced {lanes} lanes over {connections} connections; 1 to \
         {MAX_CONNECTIONS} connections, no more than lanes, are allowed"
    )]
    BadSpread { lanes: u32, connections: u32 },
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

/// Which connection and which of its streams carries each lane.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Spread {
    lanes: u32,
    connections: u32,
}

impl Spread {
    pub fn new(lanes: u32, connections: u32) -> Result<Self, LaneError> {
        check_count(lanes)?;
        if connections == 0 || connections > MAX_CONNECTIONS || connections > lanes {
            return Err(LaneError::BadSpread { lanes, connections });
        }
        Ok(Spread { lanes, connections })
    }

    pub fn lanes(&self) -> u32 {
        self.lanes
    }

    pub fn connections(&self) -> u32 {
        self.connections
    }

    /// (connection, stream index on it) of `lane`: its streams are that connection's first
    /// unidirectional streams of the source, in lane order.
    pub fn place(&self, lane: usize) -> (usize, u64) {
        let c = self.connections as usize;
        (lane % c, (lane / c) as u64)
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
    fn spreads_need_one_to_max_connections_and_no_more_than_lanes() {
        assert!(Spread::new(8, 0).is_err());
        assert!(Spread::new(8, MAX_CONNECTIONS + 1).is_err());
        assert!(Spread::new(2, 3).is_err());
        assert!(Spread::new(0, 1).is_err());
        let s = Spread::new(8, 2).unwrap();
        assert_eq!(
            (s.place(0), s.place(1), s.place(2), s.place(7)),
            ((0, 0), (1, 0), (0, 1), (1, 3))
        );
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
        fn every_connection_carries_its_first_streams_in_lane_order(
            lanes in 1u32..=MAX_LANES, conns in 1u32..=MAX_CONNECTIONS,
        ) {
            prop_assume!(conns <= lanes);
            let s = Spread::new(lanes, conns).unwrap();
            let mut next = vec![0u64; conns as usize];
            for lane in 0..lanes as usize {
                let (c, i) = s.place(lane);
                prop_assert!(c < conns as usize);
                prop_assert_eq!(i, next[c], "streams of a connection are used in order");
                next[c] += 1;
            }
            prop_assert!(next.iter().all(|&n| n >= 1), "every connection carries a lane");
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
