//! The time an HTTP/1 client has to send a request head, counted from when
//! its connection opened or its last response was sent: slow and idle
//! clients are dropped. The same per-connection state carries the node's
//! request to finish and close (see `drain`).
//!
//! hyper's own `header_read_timeout` does this with a timer armed and
//! cancelled for every request (a boxed sleep, a timer-wheel insert and
//! removal, clock reads), a few percent of a small request's CPU. Here each
//! connection has one timer task that wakes every eighth of the limit and
//! checks state that requests keep with one atomic add as they start and
//! one as they end (no clock read per request); the connection itself only
//! reads a flag when it is polled.

use std::future::Future;
use std::os::fd::RawFd;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use atomic_waker::AtomicWaker;
use bytes::Bytes;
use hyper::body::{Body, Frame, SizeHint};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
// tokio's clock: the same as std's, but one tests can pause and advance.
use tokio::time::Instant;

/// `HeadDeadline::active`'s parts: one event (a request started or ended),
/// requests in flight.
const ONE_EVENT: u64 = 1 << 32;
const IN_FLIGHT: u64 = u32::MAX as u64;

/// `HeadDeadline::flags`: the client kept the connection waiting too long.
const EXPIRED: u8 = 1;
/// The node shuts down: finish the request in flight, then close.
const DRAINING: u8 = 1 << 1;
/// A request has been in flight for a whole limit: the connection looks
/// whether its client is still there.
const CHECK_PEER: u8 = 1 << 2;
/// A wake took the connection's waker: its next poll registers it again.
/// Until then the registration stands, and the connection's two polls per
/// request skip `register`'s two compare-and-swaps.
const WAKER_TAKEN: u8 = 1 << 3;

/// How many checks per limit the timer task makes. A request that starts
/// and ends between two checks is seen by the next one, so an idle
/// connection is dropped between one limit and one limit and an eighth
/// after its last response.
const CHECKS_PER_LIMIT: u32 = 8;

/// Longest wait for a client to make room for more of a response.
const SEND_TIMEOUT: Duration = Duration::from_secs(60);

/// What [`HeadDeadline::serve`] does with a connection left idle too long.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Idle {
    /// Drop it: the socket closes.
    Drop,
    /// Shut it down gracefully (HTTP/2's GOAWAY).
    ShutDown,
}

/// One connection's request activity.
#[derive(Debug)]
pub(crate) struct HeadDeadline {
    /// When the connection opened; `write_progress` counts from here.
    opened: Instant,
    /// Low 32 bits: requests whose response is not yet completely handed
    /// to hyper. High 32 bits: requests started plus requests ended,
    /// wrapping (one atomic add keeps both).
    active: AtomicU64,
    /// A write to the client is waiting for it to read.
    write_blocked: AtomicBool,
    /// Nanoseconds after `opened` when a write last blocked or progressed.
    write_progress: AtomicU64,
    /// `EXPIRED`, `DRAINING`, `CHECK_PEER`, `WAKER_TAKEN`: rarely set, so
    /// one word, read once per poll of the connection, carries them all.
    flags: AtomicU8,
    /// The connection's task, woken when `EXPIRED`, `DRAINING` or
    /// `CHECK_PEER` is set.
    connection: AtomicWaker,
}

impl HeadDeadline {
    /// State for a connection that opened just now.
    pub(crate) fn new() -> Arc<HeadDeadline> {
        Arc::new(HeadDeadline {
            opened: Instant::now(),
            active: AtomicU64::new(0),
            write_blocked: AtomicBool::new(false),
            write_progress: AtomicU64::new(0),
            flags: AtomicU8::new(WAKER_TAKEN),
            connection: AtomicWaker::new(),
        })
    }

    /// Asks the connection to finish its request in flight and close.
    pub(crate) fn drain(&self) {
        self.flags.fetch_or(DRAINING, Ordering::Release);
        self.wake_connection();
    }

    /// Wakes the connection's task, if it is waiting.
    fn wake_connection(&self) {
        if let Some(waker) = self.connection.take() {
            // Before the wake: the poll it causes must see the flag.
            self.flags.fetch_or(WAKER_TAKEN, Ordering::Release);
            waker.wake();
        }
    }

    #[cfg(test)]
    pub(crate) fn is_draining(&self) -> bool {
        self.flags.load(Ordering::Acquire) & DRAINING != 0
    }

    /// Marks a request head as received; the request counts as active
    /// until the returned guard (moved into its response body) drops.
    pub(crate) fn request_started(self: &Arc<Self>) -> ActiveRequest {
        self.active.fetch_add(ONE_EVENT | 1, Ordering::Relaxed);
        ActiveRequest(self.clone())
    }

    /// Runs `connection` until it finishes; calls `shut_down` on it (hyper's
    /// graceful shutdown) once [`HeadDeadline::drain`] is called. With a
    /// `limit`, once the client has kept it waiting longer than that with no
    /// request active: with [`Idle::Drop`] (HTTP/1, waiting for a request
    /// head) drops it, closing the socket, and returns `None`; with
    /// [`Idle::ShutDown`] (HTTP/2, whose peer may still open streams) shuts
    /// it down gracefully, as on drain.
    ///
    /// `peer` is the socket `connection` owns, for HTTP/1 served with
    /// half-close (hyper then does not read while a request is in flight):
    /// once a request has been in flight for a whole limit (checked once
    /// per limit), the socket is peeked and a connection its client closed or
    /// reset is dropped, which cancels a response stream nobody reads.
    pub(crate) async fn serve<F: Future>(
        self: &Arc<Self>,
        connection: F,
        limit: Option<(Duration, Idle)>,
        peer: Option<RawFd>,
        shut_down: impl Fn(Pin<&mut F>),
    ) -> Option<F::Output> {
        let graceful = matches!(limit, Some((_, Idle::ShutDown)));
        let limit = limit.map(|(limit, _)| limit);
        let _timer = limit.map(|limit| AbortOnDrop(tokio::spawn(self.clone().expire_after(limit))));
        let mut connection = std::pin::pin!(connection);
        let mut shutting_down = false;
        let mut registered: Option<std::task::Waker> = None;
        // Whether `flags` end the connection at once, or ask to shut it
        // down gracefully.
        let ends = |flags: u8| !graceful && flags & EXPIRED != 0;
        let stops = |flags: u8| flags & DRAINING != 0 || (graceful && flags & EXPIRED != 0);
        std::future::poll_fn(|cx| {
            let flags = self.flags.load(Ordering::Acquire);
            if flags & !WAKER_TAKEN != 0 {
                if ends(flags) {
                    return Poll::Ready(None);
                }
                if let Some(fd) = peer
                    && flags & CHECK_PEER != 0
                    && self.flags.fetch_and(!CHECK_PEER, Ordering::AcqRel) & CHECK_PEER != 0
                    && crate::linger::peer_closed(fd)
                {
                    tracing::debug!("the client closed its connection with a request in flight");
                    return Poll::Ready(None);
                }
                if !shutting_down && stops(flags) {
                    shutting_down = true;
                    shut_down(connection.as_mut());
                }
            }
            if let Poll::Ready(out) = connection.as_mut().poll(cx) {
                return Poll::Ready(Some(out));
            }
            // Registered again only once a wake took the waker, or if the
            // task's waker changed (tokio's stays the same). A standing
            // registration receives the wake of any flag set from here on.
            if self.flags.load(Ordering::Acquire) & WAKER_TAKEN != 0
                || !registered.as_ref().is_some_and(|w| w.will_wake(cx.waker()))
            {
                self.flags.fetch_and(!WAKER_TAKEN, Ordering::Relaxed);
                self.connection.register(cx.waker());
                registered = Some(cx.waker().clone());
                // Expired or told to drain between the checks and
                // registering (a wake that found no waker meanwhile): no
                // wake is coming for it.
                let flags = self.flags.load(Ordering::Acquire);
                if ends(flags) || (!shutting_down && stops(flags)) {
                    cx.waker().wake_by_ref();
                }
            }
            Poll::Pending
        })
        .await
    }

    /// Sets `expired` (and wakes the connection) once the connection has
    /// waited longer than `limit` for a request head with no request active.
    async fn expire_after(self: Arc<Self>, limit: Duration) {
        let period = limit / CHECKS_PER_LIMIT;
        // The events count as of the last check, and the first check that
        // saw it: the last request started or ended before that check (and
        // after the one before it), so the connection has been idle at
        // least since then.
        let mut events = 0;
        let mut events_seen = self.opened;
        let mut wake = self.opened + period;
        loop {
            tokio::time::sleep_until(wake).await;
            let now = Instant::now();
            let active = self.active.load(Ordering::Acquire);
            if active >> 32 != events {
                events = active >> 32;
                events_seen = now;
            }
            wake = now + period;
            if active & IN_FLIGHT != 0 {
                if now.saturating_duration_since(events_seen) >= limit {
                    // No request started or ended for a whole limit, one is
                    // in flight: is its client still there? (Asked again a
                    // limit later.)
                    events_seen = now;
                    self.flags.fetch_or(CHECK_PEER, Ordering::Release);
                    self.wake_connection();
                }
                continue;
            }
            let since =
                |at: &AtomicU64| self.opened + Duration::from_nanos(at.load(Ordering::Acquire));
            let write_progress = since(&self.write_progress);
            // A response hyper already took may still be on its way to a
            // slow reader. The kernel reports room in the socket only now
            // and then, so that wait gets its own, longer limit from the
            // last progress (as nginx's send_timeout).
            let due = if self.write_blocked.load(Ordering::Acquire) {
                write_progress + limit.max(SEND_TIMEOUT)
            } else {
                events_seen.max(write_progress) + limit
            };
            if due <= now {
                self.flags.fetch_or(EXPIRED, Ordering::Release);
                self.wake_connection();
                return;
            }
            wake = wake.min(due);
        }
    }
}

/// The now, as nanoseconds after `opened`.
fn nanos_since(opened: Instant) -> u64 {
    u64::try_from(opened.elapsed().as_nanos()).unwrap_or(u64::MAX)
}

/// A connection's socket that tells its deadline when writes to the client
/// block and when they progress again. Writes that complete at once (the
/// usual case) cost a branch.
pub(crate) struct WriteProgress<I> {
    io: I,
    deadline: Arc<HeadDeadline>,
    blocked: bool,
}

impl<I> WriteProgress<I> {
    /// `io`, reporting to `deadline`.
    pub(crate) fn new(io: I, deadline: Arc<HeadDeadline>) -> WriteProgress<I> {
        WriteProgress {
            io,
            deadline,
            blocked: false,
        }
    }

    fn note<T>(&mut self, result: &Poll<std::io::Result<T>>) {
        match result {
            Poll::Pending if !self.blocked => {
                self.blocked = true;
                let d = &self.deadline;
                d.write_progress
                    .store(nanos_since(d.opened), Ordering::Release);
                d.write_blocked.store(true, Ordering::Release);
            }
            Poll::Ready(Ok(_)) if self.blocked => {
                self.blocked = false;
                let d = &self.deadline;
                d.write_progress
                    .store(nanos_since(d.opened), Ordering::Release);
                d.write_blocked.store(false, Ordering::Release);
            }
            _ => {}
        }
    }
}

impl<I: AsyncRead + Unpin> AsyncRead for WriteProgress<I> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_read(cx, buf)
    }
}

impl<I: AsyncWrite + Unpin> AsyncWrite for WriteProgress<I> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let this = self.get_mut();
        let result = Pin::new(&mut this.io).poll_write(cx, buf);
        this.note(&result);
        result
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        let this = self.get_mut();
        let result = Pin::new(&mut this.io).poll_write_vectored(cx, bufs);
        this.note(&result);
        result
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        let this = self.get_mut();
        let result = Pin::new(&mut this.io).poll_flush(cx);
        this.note(&result);
        result
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_shutdown(cx)
    }
}

/// Stops the deadline's timer task with its connection.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Keeps its request counted as active while alive.
#[derive(Debug)]
pub(crate) struct ActiveRequest(Arc<HeadDeadline>);

impl Drop for ActiveRequest {
    fn drop(&mut self) {
        // One event more, one request fewer in flight.
        self.0.active.fetch_add(ONE_EVENT - 1, Ordering::Release);
    }
}

/// A response body that keeps its request active until hyper drops it,
/// which it does once it has taken the last chunk (that chunk may still
/// wait in hyper's write buffer: `WriteProgress` covers that part) or the
/// connection failed.
pub(crate) struct TrackedBody<B> {
    inner: B,
    _active: ActiveRequest,
}

impl<B> TrackedBody<B> {
    /// `inner`, counted as part of `active`'s request.
    pub(crate) fn new(inner: B, active: ActiveRequest) -> TrackedBody<B> {
        TrackedBody {
            inner,
            _active: active,
        }
    }
}

impl<B: Body<Data = Bytes> + Unpin> Body for TrackedBody<B> {
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, B::Error>>> {
        Pin::new(&mut self.get_mut().inner).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicU32;

    const LIMIT: Duration = Duration::from_secs(10);

    /// A connection that never finishes on its own.
    fn forever() -> std::future::Pending<()> {
        std::future::pending()
    }

    #[tokio::test(start_paused = true)]
    async fn an_idle_connection_is_dropped_after_the_limit() {
        let state = HeadDeadline::new();
        let started = tokio::time::Instant::now();
        assert_eq!(
            state
                .serve(forever(), Some((LIMIT, Idle::Drop)), None, |_| {})
                .await,
            None
        );
        assert_eq!(started.elapsed(), LIMIT);
    }

    #[tokio::test(start_paused = true)]
    async fn drain_shuts_the_connection_down_once_and_lets_it_finish() {
        let state = HeadDeadline::new();
        let shut_downs = Arc::new(AtomicU32::new(0));
        let served = {
            let (state, seen) = (state.clone(), shut_downs.clone());
            let counter = shut_downs.clone();
            tokio::spawn(async move {
                // A connection that finishes only once it was shut down.
                let connection = std::future::poll_fn(move |_| {
                    if seen.load(Ordering::SeqCst) > 0 {
                        Poll::Ready("closed")
                    } else {
                        Poll::Pending
                    }
                });
                state
                    .serve(connection, None, None, |_| {
                        counter.fetch_add(1, Ordering::SeqCst);
                    })
                    .await
            })
        };
        tokio::task::yield_now().await;
        assert!(!served.is_finished());
        state.drain();
        assert_eq!(served.await.ok(), Some(Some("closed")));
        assert_eq!(shut_downs.load(Ordering::SeqCst), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn every_wake_reaches_the_connection_not_only_the_first() {
        // The waker is registered again only after a wake took it: a second
        // wake must still find it.
        let state = HeadDeadline::new();
        let polls = Arc::new(AtomicU32::new(0));
        let served = {
            let (state, polls) = (state.clone(), polls.clone());
            tokio::spawn(async move {
                let connection = std::future::poll_fn(move |_| {
                    polls.fetch_add(1, Ordering::SeqCst);
                    Poll::<()>::Pending
                });
                state.serve(connection, None, None, |_| {}).await
            })
        };
        tokio::task::yield_now().await;
        assert_eq!(polls.load(Ordering::SeqCst), 1);
        for wake in 1..=3 {
            state.wake_connection();
            tokio::task::yield_now().await;
            assert_eq!(polls.load(Ordering::SeqCst), 1 + wake);
        }
        served.abort();
    }

    #[tokio::test(start_paused = true)]
    async fn a_connection_that_finishes_returns_its_output() {
        let state = HeadDeadline::new();
        assert_eq!(
            state
                .serve(async { 7 }, Some((LIMIT, Idle::Drop)), None, |_| {})
                .await,
            Some(7)
        );
    }

    #[tokio::test(start_paused = true)]
    async fn an_active_request_holds_the_deadline_off_and_its_end_restarts_it() {
        let state = HeadDeadline::new();
        let active = state.request_started();
        let served = {
            let state = state.clone();
            tokio::spawn(async move {
                state
                    .serve(forever(), Some((LIMIT, Idle::Drop)), None, |_| {})
                    .await
            })
        };
        // A response that streams for three limits keeps the connection.
        tokio::time::sleep(3 * LIMIT).await;
        assert!(!served.is_finished());
        drop(active);
        tokio::time::sleep(LIMIT / 2).await;
        assert!(!served.is_finished());
        // The limit counts again from the end of the response.
        tokio::time::sleep(LIMIT).await;
        tokio::task::yield_now().await;
        assert!(served.is_finished());
        assert_eq!(served.await.ok(), Some(None));
    }
}
