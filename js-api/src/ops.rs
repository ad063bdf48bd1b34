//! Ops behind `js/bootstrap.js`: take the next request, answer it, stream
//! its response body, forward console output.

use std::borrow::Cow;
use std::cell::RefCell;
use std::rc::Rc;

use bytes::Bytes;
use deno_core::{
    AsyncRefCell, AsyncResult, BufView, CancelFuture, CancelHandle, OpState, RcRef, Resource, op2,
    v8,
};
use deno_error::JsErrorBox;
use tokio::sync::mpsc;

use crate::bridge::{
    BodyChunks, FailureKind, HandlerError, HostBridge, LogLine, OutgoingBody, OutgoingResponse,
};
use crate::header_list;

/// How many response chunks may wait for the client before JS is paused.
const RESPONSE_CHUNK_BUFFER: usize = 4;

/// The request body as a resource that `readableStreamForRid` reads.
pub(crate) struct RequestBodyResource {
    chunks: AsyncRefCell<BodyChunks>,
    /// Bytes of a chunk larger than the reader's buffer, kept for the next read.
    leftover: RefCell<Option<Bytes>>,
    /// The declared length, if any.
    length: Option<u64>,
    cancel: CancelHandle,
}

impl RequestBodyResource {
    pub(crate) fn new(chunks: BodyChunks, length: Option<u64>) -> Self {
        RequestBodyResource {
            chunks: AsyncRefCell::new(chunks),
            leftover: RefCell::new(None),
            length,
            cancel: CancelHandle::new(),
        }
    }
}

impl Resource for RequestBodyResource {
    fn name(&self) -> Cow<'_, str> {
        "atollRequestBody".into()
    }

    fn read(self: Rc<Self>, limit: usize) -> AsyncResult<BufView> {
        Box::pin(async move {
            let limit = limit.max(1);
            let next = self.leftover.borrow_mut().take();
            let chunk = match next {
                Some(c) => c,
                None => {
                    let mut chunks = RcRef::map(&self, |r| &r.chunks).borrow_mut().await;
                    let cancel = RcRef::map(&self, |r| &r.cancel);
                    let received = std::future::poll_fn(|cx| (*chunks).as_mut().poll_chunk(cx))
                        .or_cancel(cancel)
                        .await
                        .map_err(|_| JsErrorBox::generic("request body read was cancelled"))?;
                    match received {
                        None => return Ok(BufView::empty()),
                        Some(Err(e)) => {
                            return Err(JsErrorBox::type_error(format!(
                                "request body could not be read: {e}"
                            )));
                        }
                        Some(Ok(c)) => c,
                    }
                }
            };
            if chunk.len() > limit {
                let mut chunk = chunk;
                let rest = chunk.split_off(limit);
                *self.leftover.borrow_mut() = Some(rest);
                Ok(BufView::from(chunk))
            } else {
                Ok(BufView::from(chunk))
            }
        })
    }

    /// The declared length, exact: `req.text()` and friends (deno_core's
    /// read-all) then size their buffer to the body instead of starting at
    /// a zeroed 64 KiB and growing it, and a piped echo keeps the length.
    fn size_hint(&self) -> (u64, Option<u64>) {
        match self.length {
            Some(n) => (n, Some(n)),
            None => (0, None),
        }
    }

    fn close(self: Rc<Self>) {
        self.cancel.cancel();
    }
}

fn bridge(state: &OpState) -> &HostBridge {
    state.borrow::<HostBridge>()
}

/// Starts the next request of the batch `dispatchAll` walks, if the host's
/// gate lets it: takes it in and returns its id; 0 when the batch is done
/// or the rest must wait for a later poll (host ids start at 1).
#[op2(fast)]
pub fn op_atoll_next_request(state: &mut OpState) -> u32 {
    HostBridge::start_next(state).unwrap_or(0)
}

/// The body resource of request `id` (one `op_atoll_next_request` took in
/// with a body).
#[op2(fast)]
pub fn op_atoll_request_body(state: &mut OpState, id: u32) -> Result<u32, JsErrorBox> {
    bridge(state)
        .body_of(id)
        .ok_or_else(|| JsErrorBox::type_error("the request has no body"))
}

/// The headers of request `id`, handed over once (JS caches them): one
/// flat array, name and value after name (a common name as its index in
/// `COMMON_REQUEST_HEADERS`), which bootstrap.js pairs up as deno_fetch's
/// header list. Built with direct V8 calls: serde_v8's nested
/// arrays cost about 1,800 instructions a header.
#[op2]
pub fn op_atoll_request_headers<'s>(
    scope: &mut v8::PinScope<'s, '_>,
    state: &mut OpState,
    id: u32,
) -> Result<v8::Local<'s, v8::Array>, JsErrorBox> {
    let bridge = bridge(state);
    let headers = bridge
        .pending
        .borrow_mut()
        .get_mut(&id)
        .and_then(|p| {
            p.touch(id, bridge);
            p.take_headers()
        })
        .ok_or_else(|| JsErrorBox::type_error("the request has finished"))?;
    let mut flat: Vec<v8::Local<'s, v8::Value>> = Vec::with_capacity(headers.len() * 2);
    // Byte strings, as deno_fetch's header list holds them: one character
    // per byte.
    let byte_string = |scope: &mut v8::PinScope<'s, '_>, bytes: &[u8]| {
        v8::String::new_from_one_byte(scope, bytes, v8::NewStringType::Normal)
            .map(v8::Local::<v8::Value>::from)
            .ok_or_else(|| JsErrorBox::type_error("a request header is too large"))
    };
    for (name, value) in &headers {
        // A common name goes as its index: no string to make.
        let name = match header_list::common_request_header(name.as_str()) {
            Some(index) => v8::Integer::new(scope, index).into(),
            None => byte_string(scope, name.as_str().as_bytes())?,
        };
        flat.push(name);
        flat.push(byte_string(scope, value.as_bytes())?);
    }
    Ok(v8::Array::new_with_elements(scope, &flat))
}

/// The names `op_atoll_request_headers` may send as an index, in index
/// order. Called once, when the snapshot is built.
#[op2]
#[serde]
pub fn op_atoll_common_request_headers() -> Vec<&'static str> {
    header_list::COMMON_REQUEST_HEADERS.to_vec()
}

// The respond ops take the header list as bootstrap.js splits it: the
// first header's name and value, the others joined (see `header_list`).
// Reading them runs no tenant code. (Ops baked into a deno_core 0.413
// snapshot are bound as slow calls; bootstrap.js's `bindFastCalls` gives a
// busy isolate the fast versions of the text ops and of
// `op_atoll_next_request`.)

/// Answers request `id` with a body known in full. With `done`, the
/// request also finishes (as [`op_atoll_request_done`]): the handler
/// answered synchronously and left no `waitUntil` work.
#[op2]
pub fn op_atoll_respond(
    state: &mut OpState,
    id: u32,
    #[smi] status: u16,
    #[string] name: &str,
    #[string] value: &str,
    #[string] rest: &str,
    #[buffer(copy)] body: Option<Vec<u8>>,
    done: bool,
) -> Result<(), JsErrorBox> {
    let headers = header_list::from_parts(name, value, rest)?;
    let body = body.map(Bytes::from).unwrap_or_default();
    respond_full(state, id, status, |_| headers, body, done);
    Ok(())
}

/// Answers request `id` with a body given as a string (the common
/// `new Response("...")`), without encoding it into a buffer in JS first.
/// `done` as for [`op_atoll_respond`].
#[op2(fast)]
pub fn op_atoll_respond_text(
    state: &mut OpState,
    id: u32,
    #[smi] status: u16,
    #[string] name: &str,
    #[string] value: &str,
    #[string] rest: &str,
    #[string] body: &str,
    done: bool,
) -> Result<(), JsErrorBox> {
    let headers = header_list::from_parts(name, value, rest)?;
    let body = Bytes::copy_from_slice(body.as_bytes());
    respond_full(state, id, status, |_| headers, body, done);
    Ok(())
}

/// Answers request `id` with a text body whose only header is a common
/// content type (`header_list::common_content_type`): the usual
/// `new Response("...")`, without passing the header as strings.
/// `done` as for [`op_atoll_respond`].
#[op2(fast)]
pub fn op_atoll_respond_text_typed(
    state: &mut OpState,
    id: u32,
    #[smi] status: u16,
    #[smi] content_type: u32,
    #[string] body: &str,
    done: bool,
) -> Result<(), JsErrorBox> {
    let content_type = header_list::common_content_type(content_type)?;
    let body = Bytes::copy_from_slice(body.as_bytes());
    respond_full(
        state,
        id,
        status,
        |spare| header_list::only_content_type(spare, content_type),
        body,
        done,
    );
    Ok(())
}

/// Sends request `id`'s response head with a body known in full, its
/// header map made by `headers` (given a spare map to fill); with `done`,
/// finishes the request too. One lookup of the request serves both.
fn respond_full(
    state: &mut OpState,
    id: u32,
    status: u16,
    headers: impl FnOnce(http::HeaderMap) -> http::HeaderMap,
    body: Bytes,
    done: bool,
) {
    let body = if body.is_empty() {
        OutgoingBody::Empty
    } else {
        OutgoingBody::Full(body)
    };
    if !done {
        send_head(
            state,
            id,
            Ok(Box::new(OutgoingResponse {
                status,
                headers: headers(http::HeaderMap::new()),
                body,
            })),
        );
        return;
    }
    let bridge = bridge(state);
    let Some(mut p) = bridge.pending.borrow_mut().remove(&id) else {
        return;
    };
    p.touch(id, bridge);
    if p.req.respond.is_waiting() {
        // The request ends with this answer, so its own header map (unless
        // JS took it) is free: the response's headers reuse its allocation.
        let spare = p.take_headers().unwrap_or_default();
        // The client may have gone away; nothing to do then.
        p.req.respond.send(Ok(Box::new(OutgoingResponse {
            status,
            headers: headers(spare),
            body,
        })));
    }
    close_body(state, p.body_rid);
}

/// Sends request `id`'s response head (or its failure), unless one was sent.
fn send_head(state: &OpState, id: u32, response: crate::HandlerResult) {
    let bridge = bridge(state);
    if let Some(p) = bridge.pending.borrow_mut().get_mut(&id) {
        p.touch(id, bridge);
        // The client may have gone away; nothing to do then.
        p.req.respond.send(response);
    }
}

/// Answers request `id` with a streamed body; JS then writes the chunks.
#[op2(fast)]
pub fn op_atoll_respond_stream(
    state: &mut OpState,
    id: u32,
    #[smi] status: u16,
    #[string] name: &str,
    #[string] value: &str,
    #[string] rest: &str,
) -> Result<(), JsErrorBox> {
    let headers = header_list::from_parts(name, value, rest)?;
    let tx = send_stream_head(state, id, status, headers, None);
    if let Some(p) = bridge(state).pending.borrow_mut().get_mut(&id) {
        p.body = Some(tx);
    }
    Ok(())
}

/// Sends request `id`'s response head with a body that arrives through
/// the returned channel (an empty chunk ends it) and, if known, is
/// `length` bytes long.
fn send_stream_head(
    state: &mut OpState,
    id: u32,
    status: u16,
    headers: http::HeaderMap,
    length: Option<u64>,
) -> mpsc::Sender<Result<Bytes, String>> {
    let (tx, rx) = mpsc::channel(RESPONSE_CHUNK_BUFFER);
    send_head(
        state,
        id,
        Ok(Box::new(OutgoingResponse {
            status,
            headers,
            body: OutgoingBody::Stream { chunks: rx, length },
        })),
    );
    tx
}

/// Bytes asked of a resource per read when the host pipes it into a
/// response (as deno_web's streams read them).
const PIPE_READ_SIZE: usize = 64 * 1024;

/// Answers request `id` with the body of resource `rid` (a `fetch()`
/// response's body, or the request's own): the host reads it and passes
/// it on chunk by chunk, with no JS (and no buffer in the isolate's heap)
/// per chunk. With `auto_close` the resource leaves the table and is
/// closed once piped; otherwise JS still owns it.
#[op2(fast)]
#[allow(clippy::too_many_arguments)]
pub fn op_atoll_respond_resource(
    state: &mut OpState,
    id: u32,
    #[smi] status: u16,
    #[string] name: &str,
    #[string] value: &str,
    #[string] rest: &str,
    #[smi] rid: deno_core::ResourceId,
    auto_close: bool,
) -> Result<(), JsErrorBox> {
    let headers = header_list::from_parts(name, value, rest)?;
    let resource = if auto_close {
        state.resource_table.take_any(rid)
    } else {
        state.resource_table.get_any(rid)
    }
    .map_err(|e| JsErrorBox::type_error(format!("the response body is unavailable: {e}")))?;
    // A fetch() body with a declared length reports it exactly (a
    // decompressed one does not): the client then gets that length too.
    let length = match resource.size_hint() {
        (lower, Some(upper)) if lower == upper => Some(lower),
        _ => None,
    };
    // The first chunk has usually arrived with the upstream's head (or
    // with the request's): taken now, it waits in the channel when the
    // connection writes the head, and both leave in one send instead of
    // the head alone and the body a turn later. A read that is not ready
    // is not waited for: the head goes out at once, as it would anyway.
    let mut first = resource.clone().read(PIPE_READ_SIZE);
    let noop = &mut std::task::Context::from_waker(std::task::Waker::noop());
    let ready = match first.as_mut().poll(noop) {
        std::task::Poll::Ready(read) => Some(read),
        std::task::Poll::Pending => None,
    };
    let tx = send_stream_head(state, id, status, headers, length);
    let pending = match ready {
        None => Some(first),
        Some(read) => {
            let (message, last) = body_message(read);
            // A fresh channel has room for one chunk.
            if tx.try_send(message).is_err() || last {
                if auto_close {
                    resource.close();
                }
                return Ok(());
            }
            None
        }
    };
    deno_core::unsync::spawn(pipe(resource, tx, auto_close, pending));
    Ok(())
}

/// Reads `resource` to its end into a response body channel, starting with
/// the read already `pending`, if any; stops early when the client goes
/// away.
async fn pipe(
    resource: Rc<dyn Resource>,
    tx: mpsc::Sender<Result<Bytes, String>>,
    close: bool,
    mut pending: Option<AsyncResult<BufView>>,
) {
    loop {
        let next = pending
            .take()
            .unwrap_or_else(|| resource.clone().read(PIPE_READ_SIZE));
        let read = tokio::select! {
            read = next => read,
            _ = tx.closed() => break,
        };
        let (message, last) = body_message(read);
        if tx.send(message).await.is_err() || last {
            break;
        }
    }
    if close {
        resource.close();
    }
}

/// What one read of a piped resource sends into the response body channel,
/// and whether it ends the body: the end of the resource becomes the empty
/// end marker (real chunks are never empty), an error becomes the body's
/// failure.
fn body_message(read: Result<BufView, JsErrorBox>) -> (Result<Bytes, String>, bool) {
    match read {
        Ok(buf) if buf.is_empty() => (Ok(Bytes::new()), true),
        Ok(buf) => (Ok(Bytes::copy_from_slice(&buf)), false),
        Err(e) => (Err(e.to_string()), true),
    }
}

/// [`op_atoll_body_try_write`] sent the chunk.
const CHUNK_SENT: u8 = 0;
/// [`op_atoll_body_try_write`] found the client's buffer full: the chunk
/// goes through [`op_atoll_body_write`], which waits for room.
const CHUNK_WAIT: u8 = 1;
/// [`op_atoll_body_try_write`] found the client gone.
const CHUNK_GONE: u8 = 2;

/// Calls `f` with request `id`'s streamed-body sender (`None` once the
/// body has ended), noting that the request's code called into the host;
/// `None` if the request is no longer pending.
fn with_body_sender<R>(
    state: &OpState,
    id: u32,
    f: impl FnOnce(&mut Option<mpsc::Sender<Result<Bytes, String>>>) -> R,
) -> Option<R> {
    let bridge = bridge(state);
    let mut pending = bridge.pending.borrow_mut();
    let p = pending.get_mut(&id)?;
    p.touch(id, bridge);
    Some(f(&mut p.body))
}

/// Writes one chunk of a streamed body if the client's buffer has room for
/// it now, as it has for most chunks: then no promise and no op future is
/// made for it. Answers [`CHUNK_SENT`], [`CHUNK_WAIT`] or [`CHUNK_GONE`]
/// (bootstrap.js keeps the same numbers).
#[op2(fast)]
pub fn op_atoll_body_try_write(state: &mut OpState, id: u32, #[buffer] chunk: &[u8]) -> u8 {
    with_body_sender(state, id, |body| {
        match body.as_ref().map(mpsc::Sender::try_reserve) {
            Some(Ok(permit)) => {
                permit.send(Ok(Bytes::copy_from_slice(chunk)));
                CHUNK_SENT
            }
            Some(Err(mpsc::error::TrySendError::Full(()))) => CHUNK_WAIT,
            _ => CHUNK_GONE,
        }
    })
    .unwrap_or(CHUNK_GONE)
}

/// Ends a streamed body normally if the client's buffer has room for the
/// end marker now; false means it had none, and [`op_atoll_body_close`]
/// must end it.
#[op2(fast)]
pub fn op_atoll_body_try_close(state: &mut OpState, id: u32) -> bool {
    with_body_sender(state, id, |body| {
        let ended = match body.as_ref().map(mpsc::Sender::try_reserve) {
            Some(Ok(permit)) => {
                // The empty chunk is the end marker (real chunks are never empty).
                permit.send(Ok(Bytes::new()));
                true
            }
            Some(Err(mpsc::error::TrySendError::Full(()))) => false,
            // Ended already, or the client is gone.
            _ => true,
        };
        if ended {
            *body = None;
        }
        ended
    })
    .unwrap_or(true)
}

/// Writes one chunk of a streamed body. Resolves `false` when the client is
/// gone, so JS can cancel the stream.
#[op2]
pub async fn op_atoll_body_write(
    state: Rc<RefCell<OpState>>,
    id: u32,
    #[buffer(copy)] chunk: Vec<u8>,
) -> bool {
    let tx = with_body_sender(&state.borrow(), id, |body| body.clone()).flatten();
    match tx {
        Some(tx) => tx.send(Ok(Bytes::from(chunk))).await.is_ok(),
        None => false,
    }
}

/// Ends a streamed body; with `error`, the client sees the body cut short.
#[op2]
pub async fn op_atoll_body_close(
    state: Rc<RefCell<OpState>>,
    id: u32,
    #[string] error: Option<String>,
) {
    let tx = with_body_sender(&state.borrow(), id, Option::take).flatten();
    if let Some(tx) = tx {
        // The empty chunk is the end marker (real chunks are never empty).
        let last = match error {
            None => Ok(Bytes::new()),
            Some(e) => Err(e),
        };
        let _ = tx.send(last).await;
    }
}

/// Reports that the handler threw or returned something that is not a Response.
#[op2(fast)]
pub fn op_atoll_respond_error(state: &mut OpState, id: u32, #[string] detail: &str) {
    send_head(
        state,
        id,
        Err(HandlerError {
            kind: FailureKind::Exception,
            detail: detail.to_string(),
        }),
    );
}

/// Marks request `id` finished: handler settled and all `waitUntil` promises too.
#[op2(fast)]
pub fn op_atoll_request_done(state: &mut OpState, id: u32) {
    finish_request(state, id);
}

/// Forgets request `id`: closes its unread body and fails it if it never
/// answered.
fn finish_request(state: &mut OpState, id: u32) {
    let removed = bridge(state).pending.borrow_mut().remove(&id);
    if let Some(mut p) = removed {
        close_body(state, p.body_rid.take());
        p.req.respond.send(Err(HandlerError {
            kind: FailureKind::Exception,
            detail: "the handler finished without producing a response".into(),
        }));
    }
}

/// Lets the client's upload of a finished request go (already gone if JS
/// read it to the end; that is fine).
fn close_body(state: &mut OpState, rid: Option<deno_core::ResourceId>) {
    if let Some(rid) = rid
        && let Ok(body) = state.resource_table.take_any(rid)
    {
        body.close();
    }
}

/// Forwards one line of console output, tagged with its request.
#[op2(fast)]
pub fn op_atoll_log(state: &mut OpState, #[smi] level: u8, id: u32, #[string] message: &str) {
    let bridge = bridge(state);
    let request_id = if id == 0 {
        None
    } else {
        bridge.pending.borrow_mut().get_mut(&id).map(|p| {
            p.touch(id, bridge);
            p.req.request_id
        })
    };
    (bridge.log)(LogLine {
        level,
        request_id,
        message: message.to_string(),
    });
}

/// What [`op_atoll_fetch_begin`] answers when the request's fetches
/// already waiting for a response head fill all its slots (bootstrap.js
/// knows it).
const SLOTS_FULL: &str = "slots full";

/// Admits a `fetch()` of request `id`; returns why it is refused,
/// [`SLOTS_FULL`] when it must wait for a slot, or "".
#[op2]
#[string]
pub fn op_atoll_fetch_begin(state: &mut OpState, id: u32) -> String {
    let bridge = bridge(state);
    let limits = bridge.fetch_limits.get();
    let mut pending = bridge.pending.borrow_mut();
    let Some(p) = pending.get_mut(&id) else {
        return "fetch() can only be used while a request is being handled \
                (in the handler or in work passed to ctx.waitUntil)"
            .into();
    };
    if p.subrequests >= limits.subrequests {
        return format!(
            "this request already made {} subrequests, the most a request may make",
            limits.subrequests
        );
    }
    if p.open_fetches >= limits.concurrent {
        // JS queues the fetch until one of these has its response head.
        return SLOTS_FULL.into();
    }
    p.touch(id, bridge);
    p.subrequests += 1;
    p.open_fetches += 1;
    String::new()
}

/// Ends a `fetch()` of request `id` begun by [`op_atoll_fetch_begin`];
/// returns why its response is refused (a declared body over the limit;
/// `declared_length` < 0 when none is declared), or "".
#[op2]
#[string]
pub fn op_atoll_fetch_end(state: &mut OpState, id: u32, declared_length: f64) -> String {
    let bridge = bridge(state);
    if let Some(p) = bridge.pending.borrow_mut().get_mut(&id) {
        p.touch(id, bridge);
        p.open_fetches = p.open_fetches.saturating_sub(1);
    }
    let limit = bridge.fetch_limits.get().response_bytes;
    if declared_length > limit as f64 {
        return format!(
            "the response body of {declared_length} bytes is larger than the limit of {limit} bytes"
        );
    }
    String::new()
}

/// The most bytes a `fetch()` response body may have: its declared length
/// is checked by [`op_atoll_fetch_end`]; JS counts a body without one.
#[op2(fast)]
pub fn op_atoll_fetch_response_limit(state: &mut OpState) -> f64 {
    bridge(state).fetch_limits.get().response_bytes as f64
}

/// Reports the outcome of evaluating the tenant's entry module.
#[op2]
pub fn op_atoll_boot_done(state: &mut OpState, #[string] error: Option<String>) {
    if let Some(tx) = bridge(state).boot.borrow_mut().take() {
        let _ = tx.send(match error {
            None => Ok(()),
            Some(e) => Err(e),
        });
    }
}
