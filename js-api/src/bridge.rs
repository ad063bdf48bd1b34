//! Types that cross between the host (the runtime) and the isolate's JS.
//!
//! The host owns the sending halves; the isolate's [`HostBridge`], stored in
//! `OpState`, owns the receiving halves. Everything is single-threaded
//! (`Rc`), because an isolate never leaves its worker thread.

use rustc_hash::FxHashMap;
use std::cell::{Cell, RefCell};
use std::collections::VecDeque;
use std::pin::Pin;
use std::rc::Rc;
use std::task::{Context, Poll};

use bytes::Bytes;
use tokio::sync::{mpsc, oneshot};

/// Where a request body's chunks come from: the host's HTTP server, read
/// directly as the handler asks, with no task or channel in between.
pub trait ChunkSource: Send {
    /// The next chunk, or `None` at the end of the body; an error ends it.
    fn poll_chunk(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Bytes, String>>>;
}

/// A request body's chunks.
pub type BodyChunks = Pin<Box<dyn ChunkSource>>;

/// The body of an incoming request.
pub enum RequestBody {
    /// No body at all (GET, HEAD, or an empty POST).
    Empty,
    /// Chunks arriving from the client, read by JS on demand.
    Stream {
        /// The chunks.
        chunks: BodyChunks,
        /// The declared length (`content-length`), if the client gave one.
        length: Option<u64>,
    },
}

/// A request's id as logs and the `x-request-id` header show it: 16
/// lowercase hex digits, kept inline so passing it along allocates nothing.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct RequestId([u8; 16]);

impl RequestId {
    /// The id that shows `n` in hex.
    pub fn from_u64(n: u64) -> RequestId {
        // Every request gets one: eight nibbles at a time, in a register,
        // rather than a table lookup per digit.
        let mut digits = [0u8; 16];
        digits[..8].copy_from_slice(&hex8((n >> 32) as u32));
        digits[8..].copy_from_slice(&hex8(n as u32));
        RequestId(digits)
    }

    /// The 16 hex digits.
    pub fn as_str(&self) -> &str {
        // Always ASCII hex digits (see from_u64).
        std::str::from_utf8(&self.0).unwrap_or("-")
    }
}

/// `x` as 8 lowercase hex digits, most significant first.
fn hex8(x: u32) -> [u8; 8] {
    // One nibble per byte, the lowest in the lowest byte.
    let mut v = u64::from(x);
    v = (v | (v << 16)) & 0x0000_ffff_0000_ffff;
    v = (v | (v << 8)) & 0x00ff_00ff_00ff_00ff;
    v = (v | (v << 4)) & 0x0f0f_0f0f_0f0f_0f0f;
    // Bytes of 10 and more get the 0x10 bit from adding 6: those become
    // letters ('a' is 39 past '9' + 1).
    let letters = ((v + 0x0606_0606_0606_0606) & 0x1010_1010_1010_1010) >> 4;
    (v + 0x3030_3030_3030_3030 + letters * 39).to_be_bytes()
}

impl std::fmt::Display for RequestId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::fmt::Debug for RequestId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A request handed to the isolate.
pub struct IncomingRequest {
    /// The host's id for this request; unique within the isolate.
    pub id: u32,
    /// Request id for logs (also sent to the client as `x-request-id`).
    pub request_id: RequestId,
    /// HTTP method.
    pub method: http::Method,
    /// Absolute URL as the handler will see it.
    pub url: String,
    /// Headers as the server parsed them; converted for JS only if read.
    pub headers: http::HeaderMap,
    /// Request body.
    pub body: RequestBody,
    /// Receives the response head (or the handler's error) exactly once.
    pub respond: Responder,
}

/// What a request's answer is: its response head (boxed: the head passes
/// through the channel and several frames on the connection's side, and
/// each move of the unboxed head, some 150 bytes, was a `memcpy`) or why
/// the handler failed.
pub type HandlerResult = Result<Box<OutgoingResponse>, HandlerError>;

/// Where a request's answer goes, exactly once: later answers are dropped.
pub struct Responder(Option<oneshot::Sender<HandlerResult>>);

impl Responder {
    /// Answers go to `tx`.
    pub fn new(tx: oneshot::Sender<HandlerResult>) -> Responder {
        Responder(Some(tx))
    }

    /// Sends `answer` unless one was sent; returns whether this one was
    /// (a client that went away still counts as sent to).
    pub fn send(&mut self, answer: HandlerResult) -> bool {
        match self.0.take() {
            Some(tx) => {
                let _ = tx.send(answer);
                true
            }
            None => false,
        }
    }

    /// Whether no answer has been sent yet.
    pub fn is_waiting(&self) -> bool {
        self.0.is_some()
    }
}

/// The body of a handler's response.
pub enum OutgoingBody {
    /// Empty body.
    Empty,
    /// A body known in full when the response was returned.
    Full(Bytes),
    /// A body produced chunk by chunk by a `ReadableStream`, or piped by
    /// the host from a resource. An empty chunk marks the normal end; a
    /// channel that closes without it (or an `Err`) means the body was cut
    /// short.
    Stream {
        /// The chunks.
        chunks: mpsc::Receiver<Result<Bytes, String>>,
        /// The body's exact length, when its source declared one (a piped
        /// `fetch()` body with a `content-length`): the server then sends
        /// that length instead of chunked framing.
        length: Option<u64>,
    },
}

/// A handler's response.
pub struct OutgoingResponse {
    /// HTTP status.
    pub status: u16,
    /// Headers, in the order the handler set them.
    pub headers: http::HeaderMap,
    /// Body.
    pub body: OutgoingBody,
}

/// Why a request got no response from its handler.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FailureKind {
    /// The handler threw, rejected, or returned something other than a Response.
    Exception,
    /// The entry module failed to load or evaluate.
    Startup,
    /// The isolate was terminated for using too much CPU time.
    CpuLimit,
    /// The isolate was terminated for using too much memory.
    MemoryLimit,
    /// The response did not start within the wall-clock limit.
    WallClockLimit,
    /// The isolate went away (shutdown, crash) before answering.
    Unavailable,
    /// The isolate was at its concurrency limit with a full queue.
    Overloaded,
}

/// A request that failed instead of producing a response.
#[derive(Debug, Clone)]
pub struct HandlerError {
    /// What went wrong.
    pub kind: FailureKind,
    /// The error with its (source-mapped) stack, for logs only.
    pub detail: String,
}

/// One line of tenant console output.
#[derive(Debug, Clone)]
pub struct LogLine {
    /// 0 debug, 1 info/log, 2 warn, 3 error.
    pub level: u8,
    /// The request it was written under, if any.
    pub request_id: Option<RequestId>,
    /// The formatted message.
    pub message: String,
}

/// Receives tenant console output.
pub type LogSink = Rc<dyn Fn(LogLine)>;

pub(crate) struct Pending {
    /// The request as delivered, kept in its box: the map's entry stays
    /// small, so inserting and removing it moves a few words, not the
    /// request's header map. Its headers are there until JS first asks for
    /// them (most handlers never do, so they are not converted up front);
    /// its `respond` until the head is sent.
    pub(crate) req: Box<IncomingRequest>,
    /// JS took the request's headers (left empty in `req`).
    pub(crate) headers_taken: bool,
    /// The request body resource, closed when the request finishes so an
    /// unread upload does not hold the client's connection.
    pub(crate) body_rid: Option<deno_core::ResourceId>,
    pub(crate) body: Option<mpsc::Sender<Result<Bytes, String>>>,
    /// `fetch()` calls made so far.
    pub(crate) subrequests: usize,
    /// `fetch()` calls still waiting for their response head.
    pub(crate) open_fetches: usize,
    /// Listed in `HostBridge::touched` since the host last took that list.
    pub(crate) touched: bool,
}

impl Pending {
    /// The request's headers, unless JS took them already.
    pub(crate) fn take_headers(&mut self) -> Option<http::HeaderMap> {
        if std::mem::replace(&mut self.headers_taken, true) {
            return None;
        }
        Some(std::mem::take(&mut self.req.headers))
    }

    /// Notes that the request's code called into the host (see
    /// [`HostBridge::take_touched`]), unless the call comes from its
    /// handler's synchronous start: the host times each start itself, so
    /// listing it would only make the host look the request up again.
    pub(crate) fn touch(&mut self, id: u32, bridge: &HostBridge) {
        if !self.touched && bridge.last_started.get() != Some(id) {
            self.touched = true;
            bridge.touched.borrow_mut().push(id);
        }
    }
}

/// Limits on the `fetch()` calls one request makes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FetchLimits {
    /// Subrequests per request (Workers: 50).
    pub subrequests: usize,
    /// Fetches waiting for their response head at once (Workers: 6
    /// connections); more wait for one of them to get its head.
    pub concurrent: usize,
    /// Largest declared response body.
    pub response_bytes: u64,
}

impl Default for FetchLimits {
    fn default() -> Self {
        FetchLimits {
            subrequests: 50,
            concurrent: 6,
            response_bytes: 100 * 1024 * 1024,
        }
    }
}

/// Decides, right before each request of a delivered batch starts, whether
/// it starts now (see [`HostBridge::deliver`]).
pub trait StartGate {
    /// Whether request `id` may start now; false leaves it and the rest of
    /// the batch undelivered.
    fn start(&mut self, id: u32) -> bool;
}

/// The isolate's end of the host bridge; lives in `OpState`.
pub struct HostBridge {
    /// In-flight requests by id. Fx-hashed: a lookup happens several times
    /// per request, and the ids are the host's own, not a client's.
    pub(crate) pending: RefCell<FxHashMap<u32, Pending>>,
    pub(crate) boot: RefCell<Option<oneshot::Sender<Result<(), String>>>>,
    pub(crate) log: LogSink,
    pub(crate) fetch_limits: std::cell::Cell<FetchLimits>,
    /// Requests whose code called a host op (answered, streamed, fetched,
    /// logged) since the host last took this list.
    pub(crate) touched: RefCell<Vec<u32>>,
    /// The batch being delivered, in the order JS's `dispatchAll` walks it;
    /// `op_atoll_next_request` takes them in one by one.
    pub(crate) delivery: RefCell<VecDeque<Box<IncomingRequest>>>,
    /// Asked before each of them starts; none lets every one start.
    pub(crate) gate: RefCell<Option<Box<dyn StartGate>>>,
    /// The request `op_atoll_next_request` started last.
    pub(crate) last_started: Cell<Option<u32>>,
}

/// The host's end of the bridge for one isolate.
pub struct HostHandle {
    /// Resolves when the tenant's module has been evaluated (or failed to).
    pub booted: oneshot::Receiver<Result<(), String>>,
}

impl HostBridge {
    /// Creates both ends of a bridge. Put the [`HostBridge`] into the
    /// isolate's `OpState`; keep the [`HostHandle`].
    pub fn new(log: LogSink) -> (HostBridge, HostHandle) {
        let (boot_tx, boot_rx) = oneshot::channel();
        (
            HostBridge {
                pending: RefCell::new(FxHashMap::default()),
                boot: RefCell::new(Some(boot_tx)),
                log,
                fetch_limits: Default::default(),
                touched: RefCell::new(Vec::new()),
                delivery: RefCell::new(VecDeque::new()),
                gate: RefCell::new(None),
                last_started: Cell::new(None),
            },
            HostHandle { booted: boot_rx },
        )
    }

    /// Sets what decides whether each delivered request starts.
    pub fn set_gate(&self, gate: Box<dyn StartGate>) {
        *self.gate.borrow_mut() = Some(gate);
    }

    /// Queues `req` for the batch JS walks next: it is taken in (registered
    /// as pending, its body made a resource) only when its handler starts.
    pub fn deliver(&self, req: Box<IncomingRequest>) {
        self.delivery.borrow_mut().push_back(req);
    }

    /// How many requests of the batch are still undelivered.
    pub fn delivery_len(&self) -> usize {
        self.delivery.borrow().len()
    }

    /// The body resource of pending request `id`, if it has one.
    pub fn body_of(&self, id: u32) -> Option<deno_core::ResourceId> {
        self.pending.borrow().get(&id).and_then(|p| p.body_rid)
    }

    /// Moves the undelivered requests of the batch, in order, to the end
    /// of `into`.
    pub fn take_undelivered(&self, into: &mut Vec<Box<IncomingRequest>>) {
        into.extend(self.delivery.borrow_mut().drain(..));
    }

    /// The request started last, since the previous call.
    pub fn take_last_started(&self) -> Option<u32> {
        self.last_started.take()
    }

    /// Starts the next undelivered request if the gate lets it: takes it
    /// in and returns its id.
    pub(crate) fn start_next(state: &mut deno_core::OpState) -> Option<u32> {
        let bridge = state.borrow::<HostBridge>();
        let mut req = bridge.delivery.borrow_mut().pop_front()?;
        let starts = bridge
            .gate
            .borrow_mut()
            .as_mut()
            .is_none_or(|gate| gate.start(req.id));
        if !starts {
            bridge.delivery.borrow_mut().push_front(req);
            return None;
        }
        let id = req.id;
        bridge.last_started.set(Some(id));
        // The URL went to JS with the batch: free it now, not with the request.
        drop(std::mem::take(&mut req.url));
        // Taken in: registered as pending, its body (if any) made a resource.
        let body = std::mem::replace(&mut req.body, RequestBody::Empty);
        let mut pending = Pending {
            req,
            headers_taken: false,
            body_rid: None,
            body: None,
            subrequests: 0,
            open_fetches: 0,
            touched: false,
        };
        match body {
            // The common case: one look-up of the bridge in the state.
            RequestBody::Empty => {
                bridge.pending.borrow_mut().insert(id, pending);
            }
            RequestBody::Stream { chunks, length } => {
                pending.body_rid = Some(
                    state
                        .resource_table
                        .add(crate::ops::RequestBodyResource::new(chunks, length)),
                );
                state
                    .borrow::<HostBridge>()
                    .pending
                    .borrow_mut()
                    .insert(id, pending);
            }
        }
        Some(id)
    }

    /// Sets the limits on the `fetch()` calls of each request.
    pub fn set_fetch_limits(&self, limits: FetchLimits) {
        self.fetch_limits.set(limits);
    }

    /// Fails every request the isolate has taken, e.g. after it was
    /// terminated; their clients get `error` instead of hanging.
    pub fn fail_all(&self, kind: FailureKind, detail: &str) {
        let ids: Vec<u32> = self.pending.borrow().keys().copied().collect();
        for id in ids {
            self.fail_one(id, kind, detail);
        }
    }

    /// Fails request `id` if its response has not started; returns whether
    /// it had. A started streamed body is cut short with `detail`.
    pub fn fail_one(&self, id: u32, kind: FailureKind, detail: &str) -> bool {
        let Some(mut p) = self.pending.borrow_mut().remove(&id) else {
            return false;
        };
        let had_head = !p.req.respond.send(Err(HandlerError {
            kind,
            detail: detail.to_string(),
        }));
        if let Some(body) = p.body.take() {
            let _ = body.try_send(Err(detail.to_string()));
        }
        had_head
    }

    /// Moves the ids of the requests that called a host op since the last
    /// call into `into` (cleared first): the requests whose code ran. The
    /// host charges them the CPU time it cannot attribute more precisely.
    pub fn take_touched(&self, into: &mut Vec<u32>) {
        into.clear();
        std::mem::swap(into, &mut *self.touched.borrow_mut());
        let mut pending = self.pending.borrow_mut();
        for id in into.iter() {
            if let Some(p) = pending.get_mut(id) {
                p.touched = false;
            }
        }
    }

    /// How far request `id` has got; `None` once it has finished.
    pub fn stage(&self, id: u32) -> Option<Stage> {
        self.pending.borrow().get(&id).map(|p| {
            if p.req.respond.is_waiting() {
                Stage::Handler
            } else if p.body.as_ref().is_some_and(|b| !b.is_closed()) {
                Stage::Body
            } else {
                // Complete, or the client went away mid-body: what is left
                // is the tenant's own work.
                Stage::WaitUntil
            }
        })
    }

    /// Forgets request `id` without waiting for it to finish (its
    /// response is complete); returns its request id and the body resource
    /// the caller must close, if it was pending.
    pub fn abandon(&self, id: u32) -> Option<(RequestId, Option<deno_core::ResourceId>)> {
        self.pending
            .borrow_mut()
            .remove(&id)
            .map(|p| (p.req.request_id, p.body_rid))
    }
}

/// How far a pending request has got.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stage {
    /// The handler has not produced the response head yet.
    Handler,
    /// The head is out; the handler is still streaming the body.
    Body,
    /// The response is complete, or its client went away mid-body; the
    /// tenant's remaining work (`ctx.waitUntil`, a stream's cancellation)
    /// is still running.
    WaitUntil,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_ids_show_their_number_in_hex() {
        for n in [
            0,
            1,
            9,
            10,
            15,
            0xdead_beef,
            u64::MAX,
            0x0123_4567_89ab_cdef,
            1 << 63,
        ] {
            assert_eq!(RequestId::from_u64(n).as_str(), format!("{n:016x}"));
        }
    }
}
