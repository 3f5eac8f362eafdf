//! `pageserv src`: runs or joins the lazy dump, ships images, serves faults and pushes pages.

pub mod dump;
pub mod eager_dump;
pub mod freeze_watch;
pub mod frozen;
pub mod keeper;
mod link_tasks;
mod open_dump;
pub mod options;
pub mod pre_copy;
pub mod pump;
pub mod push_plan;
pub mod recovery;
pub mod report;
pub mod runc_dump;
pub mod service;
mod serving;
mod start;
