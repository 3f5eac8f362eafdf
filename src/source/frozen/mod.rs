//! Serving lazy pages from the frozen tasks themselves, not through CRIU's one in-order queue.
//!
//! After the freeze the source tasks stay ptrace-stopped by `criu dump` until its page-server
//! session ends, so their memory is exactly what CRIU's page pipes hold for the lazy pages.
//! pageserv src reads it with process_vm_readv ([`tasks`]): fault reads on a thread of their
//! own, bulk reads for the push on another, so a fault never waits behind a bulk read. What to
//! read next, faults first, link generations and finishing are the sans-IO [`core`]; [`driver`]
//! is the thin loop around it.
//!
//! CRIU's connection stays open for what must come from CRIU: pages of a task whose memory
//! cannot be read or trusted (it died or was killed, is not verifiably stopped by this dump, has
//! no host pid, or the mapping refuses process_vm_readv, e.g. PROT_NONE), and it is closed at
//! the end exactly as before (FORCE_CLOSE on `--ps-socket`), after the last read of frozen
//! memory. External (runc-style) dumps and `--resume` keep the page-server path
//! (`source::pump`): there pageserv does not know the tree or cannot verify its tracer.

pub mod core;
pub mod driver;
pub mod switch_watch;
pub mod tasks;

use std::collections::BTreeSet;
use std::sync::Arc;

pub use self::core::{Core, CoreConfig};
pub use self::tasks::FrozenTasks;
use crate::source::push_plan::PushPlan;

/// Finds the dump's tasks under host pid `root`, frozen by the dump process `dump_pid`, and
/// builds the serving core: tasks that cannot be verified are served from CRIU.
pub fn prepare(
    root: i32,
    dump_pid: u32,
    image_pids: &[u32],
    plan: PushPlan,
    batch_pages: u64,
) -> std::io::Result<(Core, Arc<FrozenTasks>)> {
    let tasks = FrozenTasks::discover(root, dump_pid, image_pids)?;
    for (pid, why) in tasks.unreadable() {
        tracing::warn!(pid, %why, "this task's lazy pages come from CRIU's page server");
    }
    let readable: BTreeSet<u32> = tasks.readable().collect();
    tracing::info!(
        readable = readable.len(),
        unreadable = tasks.unreadable().len(),
        "serving lazy pages from the frozen tasks"
    );
    let core = Core::new(
        plan,
        CoreConfig {
            batch_pages,
            ..CoreConfig::default()
        },
        readable,
    );
    Ok((core, Arc::new(tasks)))
}
