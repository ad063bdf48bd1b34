//! Streaming bodies between hyper and the runtime.

use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use atoll_runtime::{ChunkSource, OutgoingBody, RequestBody};
use bytes::Bytes;
use http_body_util::BodyExt;
use hyper::body::{Body, Frame, Incoming, SizeHint};
use tokio::sync::mpsc;

/// Why a response body stopped early.
#[derive(Debug, thiserror::Error)]
#[error("response body aborted: {0}")]
pub struct BodyAborted(String);

/// The response body type of the server: a buffer known in full, or the
/// chunks a handler streams. An enum rather than a boxed body: most
/// responses are a buffer, and they then cost no allocation and no dynamic
/// call per poll.
pub enum ResponseBody {
    /// The whole body; taken when sent.
    Full(Option<Bytes>),
    /// Chunks as the handler writes them.
    Stream(ChannelBody),
}

impl Body for ResponseBody {
    type Data = Bytes;
    type Error = BodyAborted;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BodyAborted>>> {
        match self.get_mut() {
            ResponseBody::Full(data) => Poll::Ready(data.take().map(|b| Ok(Frame::data(b)))),
            ResponseBody::Stream(body) => Pin::new(body).poll_frame(cx),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            ResponseBody::Full(data) => data.is_none(),
            ResponseBody::Stream(body) => body.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            ResponseBody::Full(data) => {
                SizeHint::with_exact(data.as_ref().map_or(0, |b| b.len() as u64))
            }
            ResponseBody::Stream(body) => body.size_hint(),
        }
    }
}

/// The request body as the handler reads it: straight from hyper, cut
/// off with an error past `max_bytes`; and, for a body, the flag set when
/// that happens.
pub fn request_body(incoming: Incoming, max_bytes: u64) -> (RequestBody, Option<TooLarge>) {
    if incoming.is_end_stream() {
        return (RequestBody::Empty, None);
    }
    // hyper knows it exactly from a `content-length` header.
    let length = incoming.size_hint().exact();
    let too_large = TooLarge::default();
    let body = RequestBody::Stream {
        chunks: Box::pin(IncomingChunks {
            incoming: Some(incoming),
            received: 0,
            max_bytes,
            too_large: too_large.clone(),
        }),
        length,
    };
    (body, Some(too_large))
}

/// Set once a request body grew past the limit while the handler read it.
#[derive(Debug, Clone, Default)]
pub struct TooLarge(Arc<AtomicBool>);

impl TooLarge {
    /// Whether the body grew past the limit.
    pub fn is_set(&self) -> bool {
        self.0.load(Ordering::Relaxed)
    }
}

/// Most of a body its handler left unread that is still read (and
/// dropped) once the request is over, so the connection can carry the next
/// request: hyper closes it otherwise, and a close with unread input can
/// reset the response before the client has read it.
const DRAIN_BYTES: u64 = 256 * 1024;

/// Longest that draining may take.
const DRAIN_TIME: Duration = Duration::from_secs(5);

/// hyper's body of a request, read as the handler asks for chunks: hyper
/// takes more from the socket only then, so a handler that reads slowly
/// slows the client down.
struct IncomingChunks {
    /// Let go once the body ended, failed or passed its limit; taken by the
    /// drain when the handler leaves it unread.
    incoming: Option<Incoming>,
    received: u64,
    max_bytes: u64,
    too_large: TooLarge,
}

impl ChunkSource for IncomingChunks {
    fn poll_chunk(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Bytes, String>>> {
        let this = self.get_mut();
        while let Some(incoming) = this.incoming.as_mut() {
            let frame = match Pin::new(incoming).poll_frame(cx) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(frame) => frame,
            };
            match frame {
                None => this.incoming = None,
                Some(Ok(frame)) => {
                    // Trailers are not passed on.
                    let Ok(data) = frame.into_data() else {
                        continue;
                    };
                    if data.is_empty() {
                        continue;
                    }
                    this.received += data.len() as u64;
                    if this.received > this.max_bytes {
                        this.too_large.0.store(true, Ordering::Relaxed);
                        // Nothing more is read: hyper may close at once.
                        this.incoming = None;
                        return Poll::Ready(Some(Err(format!(
                            "the request body is larger than the limit of {} bytes",
                            this.max_bytes
                        ))));
                    }
                    return Poll::Ready(Some(Ok(data)));
                }
                Some(Err(e)) => {
                    this.incoming = None;
                    return Poll::Ready(Some(Err(e.to_string())));
                }
            }
        }
        Poll::Ready(None)
    }
}

impl Drop for IncomingChunks {
    fn drop(&mut self) {
        // Still here: the handler stopped reading before the end.
        let Some(mut incoming) = self.incoming.take() else {
            return;
        };
        let left = incoming.size_hint().exact();
        if left.is_some_and(|n| n > DRAIN_BYTES) {
            return; // Not worth it: hyper closes the connection.
        }
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        runtime.spawn(async move {
            let drain = async {
                let mut budget = DRAIN_BYTES;
                while let Some(Ok(frame)) = incoming.frame().await {
                    let n = frame.data_ref().map_or(0, |d| d.len() as u64);
                    budget = budget.saturating_sub(n);
                    if budget == 0 {
                        break;
                    }
                }
            };
            let _ = tokio::time::timeout(DRAIN_TIME, drain).await;
        });
    }
}

/// A body from a fixed buffer.
pub fn full(bytes: impl Into<Bytes>) -> ResponseBody {
    let bytes = bytes.into();
    // An empty body is already at its end (hyper then sends no chunk).
    ResponseBody::Full((!bytes.is_empty()).then_some(bytes))
}

/// The handler's body as a hyper body.
pub fn response_body(body: OutgoingBody) -> ResponseBody {
    match body {
        OutgoingBody::Empty => full(Bytes::new()),
        OutgoingBody::Full(b) => full(b),
        OutgoingBody::Stream { chunks, length } => ResponseBody::Stream(ChannelBody {
            rx: chunks,
            length,
            finished: false,
        }),
    }
}

/// A response body fed by the handler through a channel.
pub struct ChannelBody {
    rx: mpsc::Receiver<Result<Bytes, String>>,
    /// Declared length: hyper sends it as `content-length` and fails the
    /// body if the chunks come to more or less.
    length: Option<u64>,
    finished: bool,
}

impl Body for ChannelBody {
    type Data = Bytes;
    type Error = BodyAborted;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BodyAborted>>> {
        if self.finished {
            return Poll::Ready(None);
        }
        match self.rx.poll_recv(cx) {
            // The empty chunk marks a body that ended normally.
            Poll::Ready(Some(Ok(b))) if b.is_empty() => {
                self.finished = true;
                Poll::Ready(None)
            }
            Poll::Ready(Some(Ok(b))) => Poll::Ready(Some(Ok(Frame::data(b)))),
            Poll::Ready(Some(Err(e))) => Poll::Ready(Some(Err(BodyAborted(e)))),
            // Closed without the end marker: the isolate went away mid-body.
            Poll::Ready(None) => Poll::Ready(Some(Err(BodyAborted(
                "the worker stopped before finishing the response body".into(),
            )))),
            Poll::Pending => Poll::Pending,
        }
    }

    fn is_end_stream(&self) -> bool {
        self.finished
    }

    fn size_hint(&self) -> SizeHint {
        self.length
            .map_or_else(SizeHint::default, SizeHint::with_exact)
    }
}
