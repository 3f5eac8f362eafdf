//! pageserv's lab: what measures and demonstrates pageserv, outside the product.
//!
//! - [`demo`]: one migration of the self-verifying workload between two network namespaces
//!   (`pageserv demo`).
//! - [`bench`]: CRIU's modes against pageserv's over a matrix of sizes, links and rates, with
//!   tables and plots (`pageserv bench`).
//! - [`quinn_bulk`]: quinn's bulk rate over the testbed's bare veth (`pageserv quinn-bulk`), the
//!   yardstick of the post-copy's goodput.
//! - [`testbed`]: network namespaces, veth, emulated links, container bundles.
//! - [`workload_log`]: the workload's log format and the verdict read from it.
//! - [`interrupt`]: Ctrl-C or SIGTERM stops and removes what the lab started.
//!
//! It drives the `pageserv` binary found beside its own (`sibling`), never pageserv's library
//! internals beyond CRIU lookup, certificates and child-process helpers.

pub mod bench;
pub mod demo;
pub mod interrupt;
pub mod quinn_bulk;
pub mod testbed;
pub mod workload_log;
