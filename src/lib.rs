//! pageserv: post-copy-first live migration of Linux process trees with CRIU, userfaultfd and QUIC.
//!
//! The crate splits a sans-IO core from thin IO shells:
//! - core (pure, property-tested): [`criu::image`], [`criu::images`], [`criu::page_server`],
//!   [`wire`], [`dst::regions`], `dst::uffd_loop`'s engine, [`source::push_plan`], [`stats`].
//! - shells: [`transport`] (QUIC), [`protocol`] (what both services say on it),
//!   [`dst::uffd_loop`] (userfaultfd), [`dst::lazy_socket`], [`source::pump`] (CRIU's page
//!   server socket), [`criu::binary`] (running CRIU), [`child`].

pub mod async_runtime;
pub mod child;
pub mod criu;
pub mod dst;
pub mod fault_lane;
pub mod fdpass;
pub mod freezer;
pub mod images_show;
pub mod keys;
pub mod latency;
pub mod limits;
pub mod logging;
pub mod outcome;
pub mod pages;
pub mod pb;
pub mod preflight;
pub mod protocol;
pub mod runc;
pub mod sched;
pub mod source;
pub mod stats;
pub mod stopcopy;
pub mod transport;
pub mod usage;
pub mod wire;
