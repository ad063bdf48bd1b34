//! The time an HTTP/1 client has to send a request head, counted from when
//! its connection opened or its last response was sent: slow and idle
//! clients are dropped.
//!
//! hyper's own `header_read_timeout` does this with a timer armed and
//! cancelled for every request (a boxed sleep, a timer-wheel insert and
//! removal, clock reads), a few percent of a small request's CPU. Here each
//! connection has one timer that wakes at most once per limit and checks
//! shared state that requests update with an atomic add and a clock read.

use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use hyper::body::{Body, Frame, SizeHint};
// tokio's clock: the same as std's, but one tests can pause and advance.
use tokio::time::Instant;

/// One connection's request activity.
#[derive(Debug)]
pub(crate) struct HeadDeadline {
    /// When the connection opened; `idle_since` counts from here.
    opened: Instant,
    /// Requests whose response is not yet completely handed to hyper.
    active: AtomicU32,
    /// Nanoseconds after `opened` when the last response was handed over.
    idle_since: AtomicU64,
}

impl HeadDeadline {
    /// State for a connection that opened just now.
    pub(crate) fn new() -> Arc<HeadDeadline> {
        Arc::new(HeadDeadline {
            opened: Instant::now(),
            active: AtomicU32::new(0),
            idle_since: AtomicU64::new(0),
        })
    }

    /// Marks a request head as received; the request counts as active
    /// until the returned guard (moved into its response body) drops.
    pub(crate) fn request_started(self: &Arc<Self>) -> ActiveRequest {
        self.active.fetch_add(1, Ordering::Relaxed);
        ActiveRequest(self.clone())
    }

    /// Resolves once the connection has waited longer than `limit` for a
    /// request head, with no request active.
    pub(crate) async fn expired(&self, limit: Duration) {
        let mut wake = self.opened + limit;
        loop {
            tokio::time::sleep_until(wake).await;
            let now = Instant::now();
            if self.active.load(Ordering::Acquire) > 0 {
                wake = now + limit;
                continue;
            }
            let idle_since =
                self.opened + Duration::from_nanos(self.idle_since.load(Ordering::Acquire));
            let due = idle_since + limit;
            if due <= now {
                return;
            }
            wake = due;
        }
    }
}

/// Keeps its request counted as active while alive.
#[derive(Debug)]
pub(crate) struct ActiveRequest(Arc<HeadDeadline>);

impl Drop for ActiveRequest {
    fn drop(&mut self) {
        let state = &self.0;
        let since = u64::try_from(state.opened.elapsed().as_nanos()).unwrap_or(u64::MAX);
        // Stored before the count drops, so a check that sees no active
        // request also sees when the last one ended.
        state.idle_since.store(since, Ordering::Release);
        state.active.fetch_sub(1, Ordering::Release);
    }
}

/// A response body that keeps its request active until hyper drops it,
/// which it does once the body has been sent (or the connection failed).
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

    const LIMIT: Duration = Duration::from_secs(10);

    #[tokio::test(start_paused = true)]
    async fn an_idle_connection_expires_after_the_limit() {
        let state = HeadDeadline::new();
        let started = tokio::time::Instant::now();
        state.expired(LIMIT).await;
        assert_eq!(started.elapsed(), LIMIT);
    }

    #[tokio::test(start_paused = true)]
    async fn an_active_request_holds_the_deadline_off_and_its_end_restarts_it() {
        let state = HeadDeadline::new();
        let active = state.request_started();
        let expired = {
            let state = state.clone();
            tokio::spawn(async move { state.expired(LIMIT).await })
        };
        // A response that streams for three limits keeps the connection.
        tokio::time::sleep(3 * LIMIT).await;
        assert!(!expired.is_finished());
        drop(active);
        tokio::time::sleep(LIMIT / 2).await;
        assert!(!expired.is_finished());
        // The limit counts again from the end of the response.
        tokio::time::sleep(LIMIT).await;
        tokio::task::yield_now().await;
        assert!(expired.is_finished());
    }
}
