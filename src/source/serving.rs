//! How lazy pages are served after the freeze: from the frozen tasks
//! ([`crate::source::frozen`]) or through the dump's page-server connection
//! ([`crate::source::pump`]); either way one task owns the dump's connection.

use std::sync::Arc;

use tokio::sync::{mpsc, watch};

use crate::source::frozen;
use crate::source::pump::{self, FaultReply, PumpConfig, PumpControl, PumpInput, Served, Tagged};
use crate::source::push_plan::PushPlan;

/// How lazy pages are served after the freeze.
pub(super) enum Serving {
    /// From the frozen tasks (`source::frozen`); CRIU only for tasks that cannot be read. The
    /// lazy ranges are kept to verify served pages against CRIU's (`PumpConfig::verify_served`).
    Frozen(
        Box<frozen::Core>,
        Arc<frozen::FrozenTasks>,
        Vec<(u32, Vec<crate::pages::PageRange>)>,
    ),
    /// Every page through the dump's page-server connection (`source::pump`).
    PageServer(PushPlan),
}

pub(super) type PumpChannels = (
    mpsc::UnboundedReceiver<PumpInput>,
    mpsc::UnboundedSender<Tagged<FaultReply>>,
    mpsc::Sender<Tagged<Served>>,
    watch::Receiver<Option<PumpControl>>,
);

/// Starts the task that owns the dump's connection and serves pages.
pub(super) fn spawn_serving<S>(
    stream: S,
    layout: crate::criu::page_server::Layout,
    force_close: bool,
    serving: Serving,
    cfg: PumpConfig,
    (inputs, replies, push, control): PumpChannels,
) -> tokio::task::JoinHandle<Result<pump::PumpStats, pump::PumpError>>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    match serving {
        // The serving core answers faults: it runs on the fault lane (crate::fault_lane); its
        // bulk reads happen on a reader thread of their own.
        Serving::Frozen(core, ftasks, lazy) => crate::fault_lane::spawn(frozen::driver::run(
            stream,
            layout,
            force_close,
            *core,
            ftasks,
            lazy,
            cfg,
            inputs,
            replies,
            push,
            control,
        )),
        Serving::PageServer(plan) => tokio::spawn(pump::run(
            stream,
            layout,
            force_close,
            plan,
            cfg,
            inputs,
            replies,
            push,
            control,
        )),
    }
}
