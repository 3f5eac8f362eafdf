//! Stop-and-copy over QUIC: `pageserv src --stop-and-copy` is the page server a plain
//! `criu dump --page-server` sends its memory to; the pages travel to `pageserv dst` as they
//! arrive, dst writes a standard CRIU image directory and runs a plain `criu restore`.
//!
//! The page-server logic itself is the sans-IO [`crate::criu::page_server::ImageSession`]; this
//! module holds the source's IO shells around it; dst's side is [`crate::dst::stop_and_copy`],
//! which writes the images with [`crate::criu::page_server::writer`]. A runc container's
//! checkpoint is [`runc_dump`].

pub mod dump;
pub mod runc_dump;
pub mod session;
pub mod source;
