//! `pageserv dst`: receives the images, runs the restore, and is CRIU's lazy-pages daemon.

pub(crate) mod adopt;
pub mod answer_watch;
pub mod arrival_guard;
pub mod early_restore;
pub mod endpoint;
pub(crate) mod fault_requests;
pub mod image_sink;
pub mod lazy_socket;
pub mod migration;
pub mod options;
pub(crate) mod page_feed;
pub mod page_store;
pub(crate) mod post_copy;
pub mod push_queue;
pub mod receive_clock;
pub mod regions;
pub mod restore;
pub mod restore_start;
pub mod session_writer;
pub mod stop_and_copy;
pub mod store_arena;
pub(crate) mod store_release;
pub mod uffd_keeper;
pub mod uffd_loop;
