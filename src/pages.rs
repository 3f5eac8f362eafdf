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

/// Rounds an address down to its page.
pub fn page_floor(addr: u64) -> u64 {
    addr & !(PAGE_SIZE - 1)
}
