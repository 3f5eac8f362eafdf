//! The deadlines over what dst receives before a restore starts (pre-copy, images, a
//! stop-and-copy session): a source silent for `--receive-idle-secs`, or not done within
//! `--receive-deadline-secs` of its hello, loses its migration (and its `--max-concurrent`
//! slot). See [`crate::limits::DstLimits`].

use std::time::Duration;

use tokio::time::Instant;

use crate::limits::{DstLimits, LimitHit, flag};
use crate::transport::FrameReceiver;
use crate::wire::Frame;

/// A receive phase's two deadlines.
#[derive(Debug, Clone, Copy)]
pub struct ReceiveClock {
    idle: Duration,
    total: Duration,
    until: Instant,
}

impl ReceiveClock {
    /// Starts now (the migration's hello was read just before).
    pub fn start(limits: &DstLimits) -> Self {
        ReceiveClock {
            idle: limits.receive_idle,
            total: limits.receive_deadline,
            until: Instant::now() + limits.receive_deadline,
        }
    }

    /// The next frame of `rx` (`what` names the phase for the error), or a [`LimitHit`] if the
    /// source stays silent past the idle limit or the phase passes its deadline.
    pub async fn next(&self, rx: &mut FrameReceiver, what: &str) -> anyhow::Result<Option<Frame>> {
        Ok(self.within(rx.next(), what).await??)
    }

    /// `fut`'s output, under the same two deadlines as [`ReceiveClock::next`].
    pub async fn within<T>(
        &self,
        fut: impl std::future::Future<Output = T>,
        what: &str,
    ) -> anyhow::Result<T> {
        let now = Instant::now();
        let by = (now + self.idle).min(self.until);
        match tokio::time::timeout_at(by, fut).await {
            Ok(r) => Ok(r),
            Err(_) if by >= self.until => Err(LimitHit::flag(
                format!("receiving {what}: the source was not done"),
                format!("{} s", self.total.as_secs()),
                flag::RECEIVE_DEADLINE,
            )
            .into()),
            Err(_) => Err(LimitHit::flag(
                format!("receiving {what}: the source sent nothing"),
                format!("{} s", self.idle.as_secs()),
                flag::RECEIVE_IDLE,
            )
            .into()),
        }
    }

    /// How long is left before the phase's deadline.
    pub fn left(&self) -> Duration {
        self.until.saturating_duration_since(Instant::now())
    }
}
