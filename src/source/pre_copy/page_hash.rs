//! The 128-bit content hash that decides whether dst's pre-copied page still equals the page.
//!
//! xxh3-128, seeded with a random value per migration. Measured on this project's 2-core VM
//! (see README, "Pre-copy"): xxh3-128 hashes 4 KiB pages at ~6 GB/s on one core against
//! blake3's ~2 GB/s, and a round hashes all memory. A collision (two different page contents,
//! same hash) would let dst keep a stale page: 2^-128 per page for contents the workload does not
//! choose against the seed, which it never sees.

use crate::pages::is_zero;

/// A page's content hash.
pub type PageHash = u128;

/// Hashes pages with one per-migration seed; all-zero pages get a precomputed hash.
#[derive(Debug, Clone, Copy)]
pub struct PageHasher {
    seed: u64,
    zero: PageHash,
}

impl PageHasher {
    pub fn new(seed: u64) -> Self {
        let zero =
            xxhash_rust::xxh3::xxh3_128_with_seed(&[0u8; crate::pages::PAGE_SIZE as usize], seed);
        Self { seed, zero }
    }

    /// A hasher with a seed from the kernel's random pool (a fixed fallback seed only if that
    /// cannot be read, which costs nothing but the seed's secrecy).
    pub fn random() -> Self {
        let mut b = [0u8; 8];
        let seed = match std::fs::File::open("/dev/urandom")
            .and_then(|mut f| std::io::Read::read_exact(&mut f, &mut b))
        {
            Ok(()) => u64::from_ne_bytes(b),
            Err(e) => {
                tracing::warn!("cannot read /dev/urandom for the page-hash seed: {e}");
                0x9e37_79b9_7f4a_7c15 ^ u64::from(std::process::id())
            }
        };
        Self::new(seed)
    }

    /// The hash of one 4 KiB page and whether it is all zero.
    pub fn hash(&self, page: &[u8]) -> (PageHash, bool) {
        if is_zero(page) {
            (self.zero, true)
        } else {
            (
                xxhash_rust::xxh3::xxh3_128_with_seed(page, self.seed),
                false,
            )
        }
    }

    /// The hash of an all-zero page.
    pub fn zero_hash(&self) -> PageHash {
        self.zero
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zero_pages_hash_like_any_other_content() {
        let h = PageHasher::new(7);
        let zero = vec![0u8; 4096];
        assert_eq!(h.hash(&zero), (h.zero_hash(), true));
        assert_eq!(
            h.zero_hash(),
            xxhash_rust::xxh3::xxh3_128_with_seed(&zero, 7)
        );
        let mut one = zero.clone();
        one[4095] = 1;
        let (hash, z) = h.hash(&one);
        assert!(!z);
        assert_ne!(hash, h.zero_hash());
        assert_ne!(PageHasher::new(8).hash(&one).0, hash, "the seed matters");
    }
}
