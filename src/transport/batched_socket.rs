//! The UDP socket of a bulk endpoint, read by the [`Batcher`]'s rule ([`super::recv_batch`]).
//!
//! A hold must keep arriving datagrams from waking the endpoint's thread, or it saves nothing:
//! tokio watches a socket edge-triggered, and every arriving datagram is an edge. So the socket
//! is watched through two descriptors of the same socket: one for writability only, always (an
//! arriving datagram never wakes it), and a duplicate for readability, watched only while the
//! socket is read as datagrams come. While a hold runs the readable one is not watched at all,
//! and a one-shot `timerfd` (microsecond precision; tokio's timers tick in milliseconds) wakes the
//! endpoint's driver when the hold is over; the driver then reads the socket dry, and the rule
//! either holds again or goes back to watching.
//!
//! Measured with `pageserv-lab quinn-bulk --link 1gbit+2ms` (512 MiB, cubic): a hold that still
//! let datagrams wake the thread cut `recvmmsg` calls 4x and the receiver's CPU hardly at all
//! (27-29% of a core); this one cuts its context switches 2.6x and its CPU to 24-25% (29-30%
//! without batching).
//!
//! Sending is quinn-udp's, as in quinn's own tokio socket (GSO, ECN, the send errors it ignores).

use std::fmt;
use std::io::{self, IoSliceMut};
use std::net::UdpSocket;
use std::os::fd::{AsFd, AsRawFd, OwnedFd, RawFd};
use std::pin::Pin;
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll, ready};
use std::time::Instant;

use nix::sys::time::TimeSpec;
use nix::sys::timerfd::{ClockId, Expiration, TimerFd, TimerFlags, TimerSetTimeFlags};
use quinn::udp::{RecvMeta, Transmit, UdpSocketState};
use quinn::{AsyncUdpSocket, UdpPoller};
use tokio::io::Interest;
use tokio::io::unix::AsyncFd;

use super::recv_batch::{Batcher, RecvBatching};

/// A `timerfd` tokio can watch.
struct Timer(TimerFd);

impl AsRawFd for Timer {
    fn as_raw_fd(&self) -> RawFd {
        self.0.as_fd().as_raw_fd()
    }
}

/// The receiving descriptor: watched for readability, or not (during and right after a hold).
enum RecvFd {
    Watched(AsyncFd<OwnedFd>),
    Unwatched(OwnedFd),
    /// Only between taking one and putting the other back.
    Moving,
}

struct RecvSide {
    fd: RecvFd,
    batcher: Batcher,
    /// Do not read before this.
    hold_until: Option<Instant>,
    /// Whether the timer is set for `hold_until`.
    armed: bool,
}

/// A bulk endpoint's socket, read in batches.
pub(super) struct BatchedSocket {
    udp: UdpSocketState,
    /// The socket, watched for writability only.
    send: AsyncFd<UdpSocket>,
    recv: Mutex<RecvSide>,
    timer: AsyncFd<Timer>,
}

impl fmt::Debug for BatchedSocket {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("BatchedSocket")
            .field("fd", &self.send.as_raw_fd())
            .finish_non_exhaustive()
    }
}

fn watch<T: AsRawFd>(fd: T, interest: Interest) -> io::Result<AsyncFd<T>> {
    // SAFETY: every `T` here owns its descriptor (a socket, its duplicate, a timerfd), which
    // stays open and the same until the AsyncFd returns or drops it.
    unsafe { AsyncFd::register_with_interest(fd, interest) }.map_err(|e| e.into_parts().1)
}

impl BatchedSocket {
    /// Takes `sock` over. Must run inside the tokio runtime that drives the endpoint: the
    /// descriptors register with its reactor.
    pub(super) fn new(sock: UdpSocket, cfg: RecvBatching) -> io::Result<Self> {
        sock.set_nonblocking(true)?;
        let udp = UdpSocketState::new((&sock).into())?;
        let recv_fd = sock.as_fd().try_clone_to_owned()?;
        let timer = TimerFd::new(
            ClockId::CLOCK_MONOTONIC,
            TimerFlags::TFD_NONBLOCK | TimerFlags::TFD_CLOEXEC,
        )
        .map_err(io::Error::from)?;
        Ok(BatchedSocket {
            udp,
            send: watch(sock, Interest::WRITABLE)?,
            recv: Mutex::new(RecvSide {
                fd: RecvFd::Watched(watch(recv_fd, Interest::READABLE)?),
                batcher: Batcher::new(cfg),
                hold_until: None,
                armed: false,
            }),
            timer: watch(Timer(timer), Interest::READABLE)?,
        })
    }

    /// `Ready` once the hold (if any) is over; `Pending` with only the timer watched otherwise.
    fn poll_hold(&self, side: &mut RecvSide, cx: &mut Context) -> Poll<io::Result<()>> {
        let Some(until) = side.hold_until else {
            return Poll::Ready(Ok(()));
        };
        let timer = &self.timer.get_ref().0;
        loop {
            let now = Instant::now();
            if now >= until {
                break;
            }
            if !side.armed {
                let left = TimeSpec::from_duration(until - now);
                timer
                    .set(Expiration::OneShot(left), TimerSetTimeFlags::empty())
                    .map_err(io::Error::from)?;
                side.armed = true;
            }
            let mut guard = ready!(self.timer.poll_read_ready(cx))?;
            // Consume the expiration; EAGAIN: it has not fired (a stale readiness).
            let mut count = [0u8; 8];
            match nix::unistd::read(timer.as_fd(), &mut count) {
                Ok(_) => side.armed = false,
                Err(nix::errno::Errno::EAGAIN) => {}
                Err(e) => return Poll::Ready(Err(e.into())),
            }
            guard.clear_ready();
        }
        if side.armed {
            timer.unset().map_err(io::Error::from)?;
            side.armed = false;
        }
        side.hold_until = None;
        Poll::Ready(Ok(()))
    }
}

/// Moves the receiving descriptor to `watched` (or away from it).
fn set_watched(side: &mut RecvSide, watched: bool) -> io::Result<()> {
    let fd = std::mem::replace(&mut side.fd, RecvFd::Moving);
    side.fd = match (fd, watched) {
        (RecvFd::Unwatched(fd), true) => RecvFd::Watched(watch(fd, Interest::READABLE)?),
        (RecvFd::Watched(w), false) => RecvFd::Unwatched(w.into_inner()),
        (fd, _) => fd,
    };
    Ok(())
}

impl AsyncUdpSocket for BatchedSocket {
    fn create_io_poller(self: Arc<Self>) -> Pin<Box<dyn UdpPoller>> {
        Box::pin(WritePoller(self))
    }

    fn try_send(&self, transmit: &Transmit) -> io::Result<()> {
        self.send.try_io(Interest::WRITABLE, |sock| {
            self.udp.send(sock.into(), transmit)
        })
    }

    fn poll_recv(
        &self,
        cx: &mut Context,
        bufs: &mut [IoSliceMut<'_>],
        meta: &mut [RecvMeta],
    ) -> Poll<io::Result<usize>> {
        // Only quinn's endpoint driver reads, so the lock is never contended.
        let mut side = self.recv.lock().unwrap_or_else(PoisonError::into_inner);
        loop {
            ready!(self.poll_hold(&mut side, cx))?;
            let read = match &side.fd {
                RecvFd::Watched(w) => {
                    let mut guard = ready!(w.poll_read_ready(cx))?;
                    match guard.try_io(|fd| self.udp.recv(fd.get_ref().into(), bufs, meta)) {
                        Ok(read) => read,
                        // Drained: the guard cleared the readiness; wait for the next edge.
                        Err(_would_block) => continue,
                    }
                }
                RecvFd::Unwatched(fd) => self.udp.recv(fd.into(), bufs, meta),
                RecvFd::Moving => {
                    return Poll::Ready(Err(io::Error::other(
                        "the batched socket lost its receiving descriptor (a failed re-watch)",
                    )));
                }
            };
            match read {
                Ok(n) => {
                    // With GRO one buffer holds several datagrams of `stride` bytes each.
                    let datagrams = meta[..n]
                        .iter()
                        .map(|m| m.len.div_ceil(m.stride.max(1)))
                        .sum();
                    side.hold_until = side.batcher.on_read(Instant::now(), datagrams);
                    let watched = side.hold_until.is_none();
                    set_watched(&mut side, watched)?;
                    return Poll::Ready(Ok(n));
                }
                // Read dry right after a hold: watch it again and wait.
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => set_watched(&mut side, true)?,
                Err(e) => return Poll::Ready(Err(e)),
            }
        }
    }

    fn local_addr(&self) -> io::Result<std::net::SocketAddr> {
        self.send.get_ref().local_addr()
    }

    fn max_transmit_segments(&self) -> usize {
        self.udp.max_gso_segments()
    }

    fn max_receive_segments(&self) -> usize {
        self.udp.gro_segments()
    }

    fn may_fragment(&self) -> bool {
        self.udp.may_fragment()
    }
}

/// Wakes quinn's sender when the socket can take datagrams again.
#[derive(Debug)]
struct WritePoller(Arc<BatchedSocket>);

impl UdpPoller for WritePoller {
    fn poll_writable(self: Pin<&mut Self>, cx: &mut Context) -> Poll<io::Result<()>> {
        // The readiness stays set: the next `try_send` clears it if the socket is still full.
        ready!(self.0.send.poll_write_ready(cx))?.retain_ready();
        Poll::Ready(Ok(()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    /// One `poll_recv` run to completion: (datagrams, when it returned).
    async fn read(sock: &BatchedSocket) -> (usize, Instant) {
        let mut storage = vec![[0u8; 2048]; 8];
        let mut bufs: Vec<IoSliceMut> = storage.iter_mut().map(|b| IoSliceMut::new(b)).collect();
        let mut meta = [RecvMeta::default(); 8];
        let n = std::future::poll_fn(|cx| sock.poll_recv(cx, &mut bufs, &mut meta));
        let n = tokio::time::timeout(Duration::from_secs(5), n)
            .await
            .expect("a datagram was waiting or sent: the read must complete (lost wakeup?)")
            .expect("recv");
        (n, Instant::now())
    }

    #[tokio::test]
    async fn a_hold_delays_the_next_read_and_hands_over_everything_that_came_meanwhile() {
        let cfg = RecvBatching {
            target: 4,
            max_hold: Duration::from_millis(50),
            min_hold: Duration::ZERO,
            window: Duration::from_millis(1),
            max_per_ms: 10_000,
        };
        let rx = UdpSocket::bind("127.0.0.1:0").unwrap();
        let to = rx.local_addr().unwrap();
        let sock = BatchedSocket::new(rx, cfg).unwrap();
        let tx = UdpSocket::bind("127.0.0.1:0").unwrap();
        let send = |n: usize| {
            for _ in 0..n {
                tx.send_to(b"datagram", to).unwrap();
            }
        };
        // No rate measured yet: read as it comes.
        send(2);
        assert_eq!(read(&sock).await.0, 2);
        // A window later the rate is ~2 per ms or less, so 4 take 2 ms or more: a hold.
        tokio::time::sleep(Duration::from_millis(2)).await;
        send(2);
        let (n, held_from) = read(&sock).await;
        assert_eq!(n, 2);
        let hold = sock.recv.lock().unwrap().hold_until.expect("a hold") - held_from;
        assert!(hold >= Duration::from_millis(1), "{hold:?}");
        // What arrives during the hold waits for it, then comes in one read.
        send(3);
        let (n, at) = read(&sock).await;
        assert_eq!(n, 3);
        assert!(
            at - held_from >= hold,
            "read {:?} into a {hold:?} hold",
            at - held_from
        );
        // An empty socket after a hold is watched again: a datagram sent later wakes the read.
        tokio::time::sleep(Duration::from_millis(60)).await;
        let late = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(20));
            tx.send_to(b"late", to).unwrap();
        });
        assert_eq!(read(&sock).await.0, 1);
        late.join().unwrap();
    }
}
