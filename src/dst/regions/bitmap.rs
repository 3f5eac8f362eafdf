//! A fixed-size bitmap with range operations: one bit per lazy page, so 4 GiB of lazy memory
//! costs 128 KiB per state.

/// Bits `[0, len)`, all clear at first.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Bitmap {
    words: Vec<u64>,
    len: u64,
}

/// Mask of the bits `[from, to)` inside one word (`from < to <= 64`).
fn mask(from: u64, to: u64) -> u64 {
    let high = if to == 64 { u64::MAX } else { (1u64 << to) - 1 };
    high & !((1u64 << from) - 1)
}

impl Bitmap {
    pub(super) fn new(len: u64) -> Self {
        Self {
            words: vec![0; len.div_ceil(64) as usize],
            len,
        }
    }

    pub(super) fn get(&self, bit: u64) -> bool {
        bit < self.len && self.words[(bit / 64) as usize] & (1 << (bit % 64)) != 0
    }

    /// Calls `f(word_index, mask)` for each word that `[from, to)` touches.
    fn for_words(from: u64, to: u64, mut f: impl FnMut(usize, u64)) {
        let mut bit = from;
        while bit < to {
            let word_end = (bit / 64 + 1) * 64;
            let end = to.min(word_end);
            f((bit / 64) as usize, mask(bit % 64, end - (bit / 64) * 64));
            bit = end;
        }
    }

    /// Sets `[from, to)`; returns how many bits were clear before.
    pub(super) fn set_range(&mut self, from: u64, to: u64) -> u64 {
        let to = to.min(self.len);
        let mut changed = 0;
        Self::for_words(from, to, |w, m| {
            changed += u64::from((!self.words[w] & m).count_ones());
            self.words[w] |= m;
        });
        changed
    }

    /// Clears `[from, to)`; returns how many bits were set before.
    pub(super) fn clear_range(&mut self, from: u64, to: u64) -> u64 {
        let to = to.min(self.len);
        let mut changed = 0;
        Self::for_words(from, to, |w, m| {
            changed += u64::from((self.words[w] & m).count_ones());
            self.words[w] &= !m;
        });
        changed
    }

    /// Sets every bit that is set in `other` and clears them there (`self |= other; other = 0`).
    pub(super) fn absorb(&mut self, other: &mut Bitmap) {
        for (a, b) in self.words.iter_mut().zip(other.words.iter_mut()) {
            *a |= *b;
            *b = 0;
        }
    }

    /// The first bit in `[from, to)` that is set in `self` or in `other`.
    pub(super) fn first_set_either(&self, other: &Bitmap, from: u64, to: u64) -> Option<u64> {
        self.scan(from, to, |w| self.words[w] | other.words[w])
    }

    /// The first bit in `[from, to)` that is clear in both `self` and `other`.
    pub(super) fn first_clear_both(&self, other: &Bitmap, from: u64, to: u64) -> Option<u64> {
        self.scan(from, to, |w| !(self.words[w] | other.words[w]))
    }

    /// The first set bit in `[from, to)`.
    pub(super) fn first_set(&self, from: u64, to: u64) -> Option<u64> {
        self.scan(from, to, |w| self.words[w])
    }

    /// The first clear bit in `[from, to)`.
    pub(super) fn first_clear(&self, from: u64, to: u64) -> Option<u64> {
        self.scan(from, to, |w| !self.words[w])
    }

    /// The last set bit in `[from, to)`.
    pub(super) fn last_set(&self, from: u64, to: u64) -> Option<u64> {
        let to = to.min(self.len);
        let mut end = to;
        while end > from {
            let w = (end - 1) / 64;
            let lo = from.max(w * 64);
            let bits = self.words[w as usize] & mask(lo - w * 64, end - w * 64);
            if bits != 0 {
                return Some(w * 64 + 63 - u64::from(bits.leading_zeros()));
            }
            end = lo;
        }
        None
    }

    /// The first bit in `[from, to)` whose word (as computed by `word`) has it set.
    fn scan(&self, from: u64, to: u64, word: impl Fn(usize) -> u64) -> Option<u64> {
        let to = to.min(self.len);
        let mut bit = from;
        while bit < to {
            let w = bit / 64;
            let end = to.min((w + 1) * 64);
            let bits = word(w as usize) & mask(bit - w * 64, end - w * 64);
            if bits != 0 {
                return Some(w * 64 + u64::from(bits.trailing_zeros()));
            }
            bit = end;
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn agrees_with_a_bool_vector(
            len in 1u64..300,
            ops in proptest::collection::vec((0u8..3, 0u64..300, 0u64..300), 0..40),
        ) {
            let mut a = Bitmap::new(len);
            let mut b = Bitmap::new(len);
            let mut ma = vec![false; len as usize];
            let mut mb = vec![false; len as usize];
            for (op, x, y) in ops {
                let (from, to) = (x.min(y).min(len), x.max(y).min(len));
                let range = from as usize..to as usize;
                match op {
                    0 => {
                        let was = ma[range.clone()].iter().filter(|v| !**v).count() as u64;
                        prop_assert_eq!(a.set_range(from, to), was);
                        ma[range].iter_mut().for_each(|v| *v = true);
                    }
                    1 => {
                        let was = ma[range.clone()].iter().filter(|v| **v).count() as u64;
                        prop_assert_eq!(a.clear_range(from, to), was);
                        ma[range].iter_mut().for_each(|v| *v = false);
                    }
                    _ => {
                        b.set_range(from, to);
                        mb[range].iter_mut().for_each(|v| *v = true);
                    }
                }
                let find = |p: &dyn Fn(usize) -> bool| (from..to).find(|&i| p(i as usize));
                prop_assert_eq!(a.first_set_either(&b, from, to), find(&|i| ma[i] || mb[i]));
                prop_assert_eq!(a.first_clear_both(&b, from, to), find(&|i| !ma[i] && !mb[i]));
                prop_assert_eq!(a.first_set(from, to), find(&|i| ma[i]));
                prop_assert_eq!(a.first_clear(from, to), find(&|i| !ma[i]));
                prop_assert_eq!(a.last_set(from, to), (from..to).rev().find(|&i| ma[i as usize]));
                for i in 0..len {
                    prop_assert_eq!(a.get(i), ma[i as usize]);
                }
            }
        }
    }
}
