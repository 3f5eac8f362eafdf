//! Pre-copy: rounds that copy a running tree's memory to dst before the freeze, and the
//! validation after it that lets dst place its copies only where they equal the frozen pages.
//!
//! Before the freeze ([`rounds`]): every round walks the tree ([`tree`]), reads each task's
//! private writable anonymous memory while it runs ([`reader`]), compares each page's 128-bit
//! hash ([`page_hash`]) with the hash of the copy dst holds ([`held`]), and sends dst what is new
//! or changed; [`policy`] decides when to freeze. No soft-dirty bits are needed.
//!
//! After the freeze ([`sweep`]): the lazy dump is the truth. Every page the source fetches from
//! the dump (the background push and fault answers alike) is hashed and judged by [`validate`]:
//! dst's copy is confirmed valid in a bitmap of a few bytes, or the page crosses again.

pub mod held;
pub mod page_hash;
pub mod policy;
pub mod reader;
pub mod rounds;
pub mod sweep;
pub mod tree;
pub mod validate;

pub use policy::{AutoRule, PreCopyMode};
pub use rounds::{PreCopyConfig, PreCopyReport, RoundStats};
pub use sweep::{SweepStats, Validator};
