//! Everything that speaks CRIU: its image files, its page-server protocol, and the binary itself.

pub mod binary;
pub mod image;
pub mod images;
pub mod page_server;
