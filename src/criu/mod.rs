//! Everything that speaks CRIU: its image files, its page-server protocol, and the binary itself.

pub mod binary;
pub mod image;
pub mod image_streamer;
pub mod images;
pub mod kdat;
pub mod opts;
pub mod page_server;
pub mod stream_restore;

/// Pagemap entry flags (`PE_*` in CRIU's `criu/include/pagemap.h`), as stored in
/// `pagemap_entry.flags` and carried in the high 16 bits of a page-server ADD_F command word.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct PeFlags(pub u32);

impl PeFlags {
    /// Data lives in the parent image set (a pre-dump hole).
    pub const PARENT: PeFlags = PeFlags(1);
    /// The page may be restored lazily through userfaultfd.
    pub const LAZY: PeFlags = PeFlags(2);
    /// Data is in this image set's pages file (on the wire: data follows the header).
    pub const PRESENT: PeFlags = PeFlags(4);
    const KNOWN: u32 = 7;

    pub fn contains(self, other: PeFlags) -> bool {
        self.0 & other.0 == other.0
    }
    pub fn is_lazy(self) -> bool {
        self.contains(Self::LAZY)
    }
    pub fn is_present(self) -> bool {
        self.contains(Self::PRESENT)
    }
    pub fn is_parent(self) -> bool {
        self.contains(Self::PARENT)
    }
    /// Bits CRIU does not define; a reader should refuse them rather than guess.
    pub fn unknown_bits(self) -> u32 {
        self.0 & !Self::KNOWN
    }
}

impl std::ops::BitOr for PeFlags {
    type Output = PeFlags;
    fn bitor(self, rhs: PeFlags) -> PeFlags {
        PeFlags(self.0 | rhs.0)
    }
}
