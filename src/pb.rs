//! Generated protobuf types: CRIU's image records and pageserv's control messages.
#![allow(clippy::all, missing_docs)]

/// CRIU image records (proto2, package-less in CRIU's tree).
pub mod criu {
    include!(concat!(env!("OUT_DIR"), "/_.rs"));
}

/// pageserv's own control messages.
pub mod pageserv {
    include!(concat!(env!("OUT_DIR"), "/pageserv.rs"));
}
