//! Page arithmetic shared by every layer. Addresses are the dump-time virtual addresses
//! ("image addresses") unless a name says otherwise.

/// CRIU and pageserv work in 4 KiB pages (x86-64, arm64 with 4K pages).
pub const PAGE_SIZE: u64 = 4096;

/// A run of whole pages: `[start, start + nr_pages * PAGE_SIZE)`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct PageRange {
    pub start: u64,
    pub nr_pages: u64,
}

impl PageRange {
    pub fn new(start: u64, nr_pages: u64) -> Self {
        Self { start, nr_pages }
    }
    pub fn end(&self) -> u64 {
        self.start + self.nr_pages * PAGE_SIZE
    }
    pub fn len_bytes(&self) -> u64 {
        self.nr_pages * PAGE_SIZE
    }
    pub fn contains(&self, addr: u64) -> bool {
        addr >= self.start && addr < self.end()
    }
}

/// Pages of one image pid: what a fault asks the source for, and what the source's pages and
/// zero runs cover, from dst's fault engine to its link (the wire's frames carry the same three
/// numbers, with a `u32` page count).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct PidRange {
    pub pid: u32,
    pub range: PageRange,
}

impl PidRange {
    pub fn new(pid: u32, start: u64, nr_pages: u64) -> Self {
        Self {
            pid,
            range: PageRange::new(start, nr_pages),
        }
    }
    /// The first image address.
    pub fn start(&self) -> u64 {
        self.range.start
    }
    pub fn nr_pages(&self) -> u64 {
        self.range.nr_pages
    }
    /// The page count as the wire carries it; `None` past `u32::MAX` pages.
    pub fn wire_pages(&self) -> Option<u32> {
        u32::try_from(self.range.nr_pages).ok()
    }
}

/// Rounds an address down to its page.
pub fn page_floor(addr: u64) -> u64 {
    addr & !(PAGE_SIZE - 1)
}

/// Sorted, overlapping or touching ranges joined.
pub fn merge_ranges(mut ranges: Vec<PageRange>) -> Vec<PageRange> {
    ranges.sort();
    let mut out: Vec<PageRange> = Vec::with_capacity(ranges.len());
    for r in ranges {
        match out.last_mut() {
            Some(last) if r.start <= last.end() => {
                let end = last.end().max(r.end());
                last.nr_pages = (end - last.start) / PAGE_SIZE;
            }
            _ => out.push(r),
        }
    }
    out
}

/// Splits page data into runs of all-zero and non-zero pages: `(first_page, nr_pages, is_zero)`.
/// Zero pages never cross the network as 4 KiB; this is how every sender finds them.
pub fn zero_runs(data: &[u8]) -> Vec<(usize, usize, bool)> {
    let mut runs: Vec<(usize, usize, bool)> = Vec::new();
    for (i, page) in data.chunks(PAGE_SIZE as usize).enumerate() {
        let zero = is_zero(page);
        match runs.last_mut() {
            Some((_, n, z)) if *z == zero => *n += 1,
            _ => runs.push((i, 1, zero)),
        }
    }
    runs
}

/// True when every byte is zero. Folds 16-byte words so a typical non-zero page exits early and
/// a zero page is checked at memory speed, with no allocation.
pub fn is_zero(buf: &[u8]) -> bool {
    let mut chunks = buf.chunks_exact(64);
    for c in &mut chunks {
        let mut acc = 0u128;
        for w in c.chunks_exact(16) {
            let mut b = [0u8; 16];
            b.copy_from_slice(w);
            acc |= u128::from_ne_bytes(b);
        }
        if acc != 0 {
            return false;
        }
    }
    chunks.remainder().iter().all(|&b| b == 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_zero_runs() {
        let mut data = vec![0u8; 5 * PAGE_SIZE as usize];
        data[PAGE_SIZE as usize + 7] = 1;
        data[4 * PAGE_SIZE as usize] = 9;
        assert_eq!(
            zero_runs(&data),
            vec![(0, 1, true), (1, 1, false), (2, 2, true), (4, 1, false)]
        );
        assert!(zero_runs(&[]).is_empty());
    }
}
