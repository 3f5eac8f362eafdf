//! Self-describing page content: what a page must hold for a given (index, version), and the
//! verification of a page against that. Pure functions on a page's 512 words, no allocation (the
//! churn's forked child verifies pages and must not touch the allocator).

use std::fmt;

/// Bytes per page (x86-64 base pages).
pub const PAGE_BYTES: usize = 4096;
/// u64 words per page.
pub const PAGE_WORDS: usize = PAGE_BYTES / 8;
/// First word of every non-zero page. Chosen so that no payload word is likely to equal it.
pub const MAGIC: u64 = 0x5053_574b_4c44_5047;
/// Words 0..HEADER_WORDS are the header: magic, page index, version.
const HEADER_WORDS: usize = 3;
/// One page in ZERO_ONE_IN starts zero, and one write in ZERO_ONE_IN writes a zero page, so zero
/// pages exist (read as zero on check) throughout the run.
const ZERO_ONE_IN: u64 = 16;
const GOLDEN: u64 = 0x9e37_79b9_7f4a_7c15;

/// splitmix64's finaliser: a good cheap 64-bit mixer.
pub fn mix64(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

fn page_seed(salt: u64, index: u64, version: u64) -> u64 {
    mix64(salt ^ mix64(index.wrapping_mul(GOLDEN) ^ version.rotate_left(29)))
}

/// Payload word `i` of a page with seed `seed`. Only add/shift/xor so the fill and compare loops
/// vectorise: the full check is memory-bound, not compute-bound.
#[inline(always)]
fn payload_word(seed: u64, i: usize) -> u64 {
    let x = seed.wrapping_add((i as u64).wrapping_mul(GOLDEN));
    x ^ (x >> 29)
}

/// Whether version `version` of page `index` is a zero page. Version 0 (the initial content)
/// makes every 16th page zero; later versions pick zero one time in 16, pseudo-randomly.
pub fn is_zero_version(salt: u64, index: u64, version: u64) -> bool {
    if version == 0 {
        index % ZERO_ONE_IN == ZERO_ONE_IN - 1
    } else {
        mix64(page_seed(salt, index, version) ^ 0x7a65_726f).is_multiple_of(ZERO_ONE_IN)
    }
}

/// Writes the content of version `version` of page `index` (non-zero form) into `page`.
pub fn fill(page: &mut [u64; PAGE_WORDS], salt: u64, index: u64, version: u64) {
    let seed = page_seed(salt, index, version);
    page[0] = MAGIC;
    page[1] = index;
    page[2] = version;
    for (i, w) in page.iter_mut().enumerate().skip(HEADER_WORDS) {
        *w = payload_word(seed, i);
    }
}

/// Why a page does not hold what the version table says it must.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// Word 0 is not [`MAGIC`].
    Magic { found: u64 },
    /// The header names another page.
    Index { found: u64 },
    /// The header's version differs from the version table's.
    Version { header: u64, table: u64 },
    /// A payload word differs from the function of (index, version).
    Payload {
        word: usize,
        expected: u64,
        found: u64,
    },
    /// A page the table marks zero holds a non-zero word.
    NonZero { word: usize, found: u64 },
}

impl fmt::Display for Fault {
    /// `reason=<name>` first (the log parser reads that token), then details as key=value.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            Fault::Magic { found } => write!(f, "reason=magic found={found:#x}"),
            Fault::Index { found } => write!(f, "reason=index found={found}"),
            Fault::Version { header, table } => {
                write!(f, "reason=version header={header} table={table}")
            }
            Fault::Payload {
                word,
                expected,
                found,
            } => write!(
                f,
                "reason=payload word={word} expected={expected:#x} found={found:#x}"
            ),
            Fault::NonZero { word, found } => {
                write!(f, "reason=nonzero word={word} found={found:#x}")
            }
        }
    }
}

/// Checks `page` against version `version` of page `index`, zero or not as the table says.
pub fn verify(
    page: &[u64; PAGE_WORDS],
    salt: u64,
    index: u64,
    version: u64,
    zero: bool,
) -> Result<(), Fault> {
    if zero {
        // OR-fold first (vectorises); locate the word only on failure.
        if page.iter().fold(0, |acc, w| acc | w) == 0 {
            return Ok(());
        }
        let word = page.iter().position(|&w| w != 0).unwrap_or(0);
        return Err(Fault::NonZero {
            word,
            found: page[word],
        });
    }
    check_header(page, index, version)?;
    let seed = page_seed(salt, index, version);
    let diff = page
        .iter()
        .enumerate()
        .skip(HEADER_WORDS)
        .fold(0, |acc, (i, &w)| acc | (w ^ payload_word(seed, i)));
    if diff == 0 {
        return Ok(());
    }
    let word = (HEADER_WORDS..PAGE_WORDS)
        .find(|&i| page[i] != payload_word(seed, i))
        .unwrap_or(HEADER_WORDS);
    Err(Fault::Payload {
        word,
        expected: payload_word(seed, word),
        found: page[word],
    })
}

/// The three header words of a data page: magic, index and version.
fn check_header(page: &[u64; PAGE_WORDS], index: u64, version: u64) -> Result<(), Fault> {
    if page[0] != MAGIC {
        return Err(Fault::Magic { found: page[0] });
    }
    if page[1] != index {
        return Err(Fault::Index { found: page[1] });
    }
    if page[2] != version {
        return Err(Fault::Version {
            header: page[2],
            table: version,
        });
    }
    Ok(())
}

/// Spot-checks one word of `page` against version `version` of page `index`: the three header
/// words and payload word `word` (a zero page: word 0 and `word` must be zero). A few loads and
/// one mix, so a reader can afford it on every page it touches; [`verify`] checks all 512.
/// `word` is taken modulo [`PAGE_WORDS`]; a header index checks the header only.
pub fn spot_check(
    page: &[u64; PAGE_WORDS],
    salt: u64,
    index: u64,
    version: u64,
    zero: bool,
    word: usize,
) -> Result<(), Fault> {
    let word = word % PAGE_WORDS;
    if zero {
        return match [0, word].into_iter().find(|&w| page[w] != 0) {
            None => Ok(()),
            Some(w) => Err(Fault::NonZero {
                word: w,
                found: page[w],
            }),
        };
    }
    check_header(page, index, version)?;
    if word < HEADER_WORDS {
        return Ok(());
    }
    let expected = payload_word(page_seed(salt, index, version), word);
    if page[word] == expected {
        Ok(())
    } else {
        Err(Fault::Payload {
            word,
            expected,
            found: page[word],
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn page(salt: u64, index: u64, version: u64) -> Box<[u64; PAGE_WORDS]> {
        let mut p = Box::new([0u64; PAGE_WORDS]);
        fill(&mut p, salt, index, version);
        p
    }

    #[test]
    fn filled_page_verifies_and_every_single_byte_flip_is_caught() {
        let p = page(7, 123, 9);
        assert_eq!(verify(&p, 7, 123, 9, false), Ok(()));
        for byte in 0..PAGE_BYTES {
            let mut q = p.clone();
            q[byte / 8] ^= 1 << ((byte % 8) * 8);
            assert!(verify(&q, 7, 123, 9, false).is_err(), "flip at byte {byte}");
        }
    }

    #[test]
    fn wrong_index_version_or_salt_is_caught() {
        let p = page(7, 123, 9);
        assert_eq!(
            verify(&p, 7, 124, 9, false),
            Err(Fault::Index { found: 123 })
        );
        assert_eq!(
            verify(&p, 7, 123, 10, false),
            Err(Fault::Version {
                header: 9,
                table: 10
            })
        );
        assert!(matches!(
            verify(&p, 8, 123, 9, false),
            Err(Fault::Payload { word: 3, .. })
        ));
    }

    #[test]
    fn zero_pages_must_be_all_zero() {
        let mut z = Box::new([0u64; PAGE_WORDS]);
        assert_eq!(verify(&z, 1, 5, 3, true), Ok(()));
        z[511] = 1;
        assert_eq!(
            verify(&z, 1, 5, 3, true),
            Err(Fault::NonZero {
                word: 511,
                found: 1
            })
        );
        assert_eq!(verify(&z, 1, 5, 3, false), Err(Fault::Magic { found: 0 }));
    }

    #[test]
    fn about_one_write_in_sixteen_is_zero() {
        let zeros = (1..16_000u64)
            .filter(|&v| is_zero_version(3, v % 97, v))
            .count();
        assert!((700..1300).contains(&zeros), "{zeros}");
        assert!(is_zero_version(3, 15, 0) && !is_zero_version(3, 14, 0));
    }

    #[test]
    fn fault_display_starts_with_reason() {
        let f = Fault::Payload {
            word: 4,
            expected: 1,
            found: 2,
        };
        assert_eq!(
            f.to_string(),
            "reason=payload word=4 expected=0x1 found=0x2"
        );
    }

    #[test]
    fn spot_check_passes_good_pages_and_catches_the_words_it_reads() {
        let p = page(7, 123, 9);
        for word in 0..PAGE_WORDS {
            assert_eq!(spot_check(&p, 7, 123, 9, false, word), Ok(()));
            let mut q = p.clone();
            q[word] ^= 1 << 40;
            let got = spot_check(&q, 7, 123, 9, false, word);
            assert!(got.is_err(), "flip of the checked word {word} missed");
            // A flip elsewhere in the payload is the full check's job, not the spot check's.
            if word >= HEADER_WORDS {
                let other = if word == PAGE_WORDS - 1 {
                    HEADER_WORDS
                } else {
                    word + 1
                };
                let mut r = p.clone();
                r[other] ^= 1;
                assert_eq!(spot_check(&r, 7, 123, 9, false, word), Ok(()));
            }
        }
        assert_eq!(
            spot_check(&p, 7, 123, 10, false, 100),
            Err(Fault::Version {
                header: 9,
                table: 10
            })
        );
        assert!(matches!(
            spot_check(&p, 8, 123, 9, false, 100),
            Err(Fault::Payload { word: 100, .. })
        ));
        assert_eq!(spot_check(&p, 7, 123, 9, false, PAGE_WORDS + 100), Ok(()));
    }

    #[test]
    fn spot_check_of_a_zero_page_reads_word_zero_and_the_chosen_word() {
        let mut z = Box::new([0u64; PAGE_WORDS]);
        assert_eq!(spot_check(&z, 1, 5, 3, true, 77), Ok(()));
        z[77] = 4;
        assert_eq!(
            spot_check(&z, 1, 5, 3, true, 77),
            Err(Fault::NonZero { word: 77, found: 4 })
        );
        z[77] = 0;
        z[0] = 1;
        assert_eq!(
            spot_check(&z, 1, 5, 3, true, 77),
            Err(Fault::NonZero { word: 0, found: 1 })
        );
        let p = page(1, 5, 3);
        assert_eq!(
            spot_check(&p, 1, 5, 3, true, 9),
            Err(Fault::NonZero {
                word: 0,
                found: MAGIC
            })
        );
    }
}
