//! One V8 isolate booted from the snapshot, and its hand-over to a tenant.

use std::cell::RefCell;
use std::rc::Rc;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use atoll_js_api::{
    FailureKind, HostBridge, HostHandle, IncomingRequest, LogLine, LogSink, RequestId,
};
use deno_core::{JsRuntime, RuntimeOptions, v8};

use crate::deployment::Deployment;
use crate::extensions::extensions;
use crate::module_loader::BundleLoader;
use crate::running_request::RequestSampler;
use crate::snapshot::{RESIDUAL_LAZY_ESM, RESIDUAL_LAZY_JS, SNAPSHOT};

/// Event-loop turns a pooled isolate gets to finish its warm-up boot.
const WARM_UP_TURNS: usize = 8;

/// Extra heap granted once the limit is hit, so V8 can unwind the
/// terminated script instead of aborting the process.
const HEAP_HEADROOM: usize = 32 * 1024 * 1024;

/// An isolate with the runtime's JS in place and no tenant code yet.
pub(crate) struct Isolate {
    pub(crate) js: JsRuntime,
    pub(crate) host: HostHandle,
    pub(crate) heap_limit: usize,
    /// Set by the near-heap-limit callback.
    pub(crate) heap_exceeded: Arc<AtomicBool>,
    /// The JS functions that load the tenant's module (`boot`) and run a
    /// batch of requests (`dispatchAll`), from bootstrap.js.
    entry_points: Option<EntryPoints>,
    loader: Rc<BundleLoader>,
    owner: Rc<RefCell<Option<Arc<Deployment>>>>,
    /// What the CPU watchdog's interrupts point at. After `js`, so it is
    /// dropped only once the isolate is, with any interrupt still pending.
    pub(crate) sampler: Option<Box<RequestSampler>>,
}

impl Isolate {
    /// Deserializes a fresh isolate from the snapshot; its `fetch()` uses
    /// the node-wide `client`.
    pub(crate) fn new(heap_limit: usize, client: &deno_fetch::Client) -> Isolate {
        let loader = Rc::new(BundleLoader::default());
        let owner: Rc<RefCell<Option<Arc<Deployment>>>> = Rc::new(RefCell::new(None));
        let sink_owner = owner.clone();
        let sink: LogSink = Rc::new(move |line| log_console(&sink_owner.borrow(), line));
        let (bridge, host) = HostBridge::new(sink);

        let mut js = JsRuntime::new(RuntimeOptions {
            module_loader: Some(loader.clone()),
            startup_snapshot: Some(SNAPSHOT),
            extensions: extensions(Some(crate::outbound::check_request)),
            residual_lazy_js_sources: RESIDUAL_LAZY_JS,
            residual_lazy_esm_sources: RESIDUAL_LAZY_ESM,
            // Atomics.wait would block the whole worker thread without using
            // CPU, invisible to the CPU watchdog: forbid it.
            create_params: Some(
                v8::CreateParams::default()
                    .heap_limits(0, heap_limit)
                    // ArrayBuffer memory is outside the V8 heap. V8 weighs it
                    // when deciding it is near the heap limit, and this budget
                    // is the hard cap behind that: past it allocation fails.
                    .array_buffer_allocator(crate::array_buffers::allocator(heap_limit))
                    .allow_atomics_wait(false),
            ),
            ..Default::default()
        });
        {
            let state = js.op_state();
            let mut state = state.borrow_mut();
            state.put(bridge);
            state.put(crate::outbound::isolate_permissions());
            // deno_fetch uses a client found in the state instead of making its own.
            state.put(client.clone());
        }
        let heap_exceeded = Arc::new(AtomicBool::new(false));
        let flag = heap_exceeded.clone();
        let handle = js.v8_isolate().thread_safe_handle();
        js.add_near_heap_limit_callback(move |current, _initial| {
            flag.store(true, Ordering::SeqCst);
            handle.terminate_execution();
            current + HEAP_HEADROOM
        });
        // Hide the runtime's internals and warm the request path now, while
        // no request is waiting; keep the entry points it returns.
        let entry_points = match js.execute_script(
            "ext:atoll/prepare.js",
            "globalThis[Symbol.for('atoll.prepare')]()",
        ) {
            Ok(value) => {
                let context = js.main_context();
                let isolate = &mut *js.v8_isolate();
                v8::scope!(let scope, isolate);
                let context = v8::Local::new(scope, context);
                let scope = &mut v8::ContextScope::new(scope, context);
                let value = v8::Local::new(scope, value);
                let function = |i: u32| {
                    let array = v8::Local::<v8::Array>::try_from(value).ok()?;
                    let f = array.get_index(scope, i)?;
                    let f = v8::Local::<v8::Function>::try_from(f).ok()?;
                    Some(v8::Global::new(scope, f))
                };
                let methods = COMMON_METHODS
                    .iter()
                    .filter_map(|m| {
                        let s = v8::String::new_from_one_byte(
                            scope,
                            m.as_str().as_bytes(),
                            v8::NewStringType::Internalized,
                        )?;
                        Some((m.clone(), v8::Global::new(scope, s)))
                    })
                    .collect();
                match (function(0), function(1)) {
                    (Some(boot), Some(dispatch_all)) => Some(EntryPoints {
                        boot,
                        dispatch_all,
                        methods,
                    }),
                    _ => {
                        tracing::error!("preparing an isolate returned no entry points");
                        None
                    }
                }
            }
            Err(e) => {
                // Only a bug in the runtime's own JS gets here.
                tracing::error!("preparing an isolate failed: {e}");
                None
            }
        };
        // Finish the warm-up boot prepare() started. Its module loads
        // synchronously, so one turn settles it; none needs a wake-up. If
        // it did not settle, the tenant's boot is unaffected: with its
        // warm-up flag set, boot reports nothing and installs nothing.
        {
            let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
            for _ in 0..WARM_UP_TURNS {
                match js.poll_event_loop(&mut cx, deno_core::PollEventLoopOptions::default()) {
                    std::task::Poll::Pending => {}
                    std::task::Poll::Ready(Ok(())) => break,
                    std::task::Poll::Ready(Err(e)) => {
                        tracing::error!("warming up an isolate failed: {e}");
                        break;
                    }
                }
            }
        }
        let sampler = RequestSampler::new(&mut js);
        // V8 tracks one "current" isolate per thread and a new isolate is
        // entered on creation. Many isolates share this thread, so each is
        // entered only while it runs (see `Isolate::run`), never left entered.
        // SAFETY: balances the enter done by isolate creation; this thread
        // entered no other isolate since.
        unsafe { js.v8_isolate().exit() };
        Isolate {
            js,
            host,
            heap_limit,
            heap_exceeded,
            entry_points,
            loader,
            owner,
            sampler,
        }
    }

    /// Starts each of `reqs` in the tenant's handler, in order, each running
    /// until its handler first awaits: one call into JS walks them all,
    /// asking the bridge's gate (`HostBridge::set_gate`) before each one.
    /// When the gate says no, that request and the rest stay in `reqs`, for
    /// a later poll. Once `stopped()` says a limit ended a handler, the
    /// requests left are dropped (their clients hear the isolate ended).
    /// Call inside [`Isolate::run`], with the CPU watchdog armed; the
    /// caller polls the event loop next.
    #[allow(
        clippy::vec_box,
        reason = "requests stay boxed from the server to the bridge: a move is a pointer"
    )]
    pub(crate) fn deliver_all(
        &mut self,
        reqs: &mut Vec<Box<IncomingRequest>>,
        stopped: &dyn Fn() -> bool,
    ) {
        if reqs.is_empty() {
            // Most polls run continuations and timers only.
            return;
        }
        let op_state = self.js.op_state();
        let Some(entry_points) = &self.entry_points else {
            for req in reqs.drain(..) {
                // Only a bug in the runtime's own JS gets here.
                fail_undelivered(req, "the isolate was not prepared");
            }
            return;
        };
        let context = self.js.main_context();
        let isolate = &mut *self.js.v8_isolate();
        v8::scope!(let scope, isolate);
        let context = v8::Local::new(scope, context);
        let scope = &mut v8::ContextScope::new(scope, context);
        let dispatch_all = v8::Local::new(scope, &entry_points.dispatch_all);
        let methods = &entry_points.methods;
        // [method, url, has body] for each request, in delivery order.
        let mut elements: Vec<v8::Local<v8::Value>> = Vec::with_capacity(reqs.len() * 3);
        {
            let state = op_state.borrow();
            let bridge = state.borrow::<HostBridge>();
            for req in reqs.drain(..) {
                let method = match methods.iter().find(|(m, _)| *m == req.method) {
                    Some((_, s)) => Some(v8::Local::new(scope, s)),
                    None => v8::String::new(scope, req.method.as_str()),
                };
                let (Some(method), Some(url)) = (method, v8::String::new(scope, &req.url)) else {
                    fail_undelivered(req, "an argument is too long for V8");
                    continue;
                };
                let has_body = matches!(req.body, atoll_js_api::RequestBody::Stream { .. });
                let has_body: v8::Local<v8::Value> = v8::Boolean::new(scope, has_body).into();
                elements.extend([method.into(), url.into(), has_body]);
                bridge.deliver(req);
            }
        }
        let batch = v8::Array::new_with_elements(scope, &elements);
        let total = elements.len() / 3;
        loop {
            let left = {
                let state = op_state.borrow();
                let bridge = state.borrow::<HostBridge>();
                bridge.take_last_started();
                bridge.delivery_len()
            };
            if left == 0 || stopped() {
                break;
            }
            v8::tc_scope!(let scope, scope);
            let from = v8::Integer::new_from_unsigned(scope, ((total - left) * 3) as u32);
            let Err(e) = call_guarded(scope, dispatch_all, &[batch.into(), from.into()]) else {
                // Done, or the gate held the rest back.
                break;
            };
            if stopped() {
                break;
            }
            // Something threw past a request's own catch (dispatch
            // catches everything a handler throws): fail the request it
            // threw in and go on with the rest.
            let mut state = op_state.borrow_mut();
            let Some(id) = state.borrow::<HostBridge>().take_last_started() else {
                // It threw before starting any: the rest cannot run either.
                let mut rest = Vec::new();
                state.borrow::<HostBridge>().take_undelivered(&mut rest);
                for req in rest {
                    fail_undelivered(req, &e);
                }
                break;
            };
            let body = {
                let bridge = state.borrow::<HostBridge>();
                let body = bridge.body_of(id);
                bridge.fail_one(
                    id,
                    FailureKind::Exception,
                    &format!("the request could not be dispatched: {e}"),
                );
                body
            };
            // Nobody will read the body: let the client's upload go.
            if let Some(rid) = body
                && let Ok(body) = state.resource_table.take_any(rid)
            {
                body.close();
            }
        }
        let state = op_state.borrow();
        let bridge = state.borrow::<HostBridge>();
        // The last handler's start is over: what its request does from
        // here on (continuations in the event loop) counts as touched.
        bridge.take_last_started();
        if stopped() {
            // Dropped: their clients hear the isolate ended.
            let mut dropped = Vec::new();
            bridge.take_undelivered(&mut dropped);
        } else {
            bridge.take_undelivered(reqs);
        }
    }

    /// Runs `f` with this isolate entered as the thread's current isolate.
    pub(crate) fn run<R>(&mut self, f: impl FnOnce(&mut Isolate) -> R) -> R {
        /// Exits the isolate even if `f` unwinds, so a panic never leaves a
        /// dead isolate as the thread's current one.
        struct Exit(*mut v8::Isolate);
        impl Drop for Exit {
            fn drop(&mut self) {
                // SAFETY: the pointer is the isolate entered just below; it
                // outlives this guard, which lives inside `run`'s borrow.
                unsafe { (*self.0).exit() };
            }
        }
        let raw: *mut v8::Isolate = &mut **self.js.v8_isolate();
        // SAFETY: enter/exit are balanced (the guard exits), and isolates on
        // this thread are never used re-entrantly, so the thread's isolate
        // stack is empty outside of `run`.
        unsafe { (*raw).enter() };
        let _exit = Exit(raw);
        f(self)
    }

    /// Hands the isolate to `deployment` and starts evaluating its entry
    /// module; completion is reported on `host.booted`.
    pub(crate) fn boot(&mut self, deployment: &Arc<Deployment>) -> Result<(), String> {
        self.run(|iso| iso.boot_entered(deployment))
    }

    fn boot_entered(&mut self, deployment: &Arc<Deployment>) -> Result<(), String> {
        self.loader.assign(deployment.bundle.clone());
        self.js
            .op_state()
            .borrow()
            .borrow::<HostBridge>()
            .set_fetch_limits(deployment.limits.fetch);
        *self.owner.borrow_mut() = Some(deployment.clone());
        let env = deployment.env_json();
        let entry = &deployment.bundle.entry;
        self.call_boot([entry, &env])
    }

    /// Calls bootstrap.js's `boot` with string arguments. A call ended by
    /// termination (a limit) is not an error here: the caller sees the
    /// limit's flag.
    fn call_boot(&mut self, args: [&str; 2]) -> Result<(), String> {
        let Some(entry_points) = &self.entry_points else {
            return Err("the isolate was not prepared".into());
        };
        let context = self.js.main_context();
        let isolate = &mut *self.js.v8_isolate();
        v8::scope!(let scope, isolate);
        let context = v8::Local::new(scope, context);
        let scope = &mut v8::ContextScope::new(scope, context);
        v8::tc_scope!(let scope, scope);
        let f = v8::Local::new(scope, &entry_points.boot);
        let mut values = [v8::null(scope).into(); 2];
        for (value, arg) in values.iter_mut().zip(args) {
            *value = match v8::String::new(scope, arg) {
                Some(s) => s.into(),
                None => return Err("an argument is too long for V8".into()),
            };
        }
        call_guarded(scope, f, &values)
    }

    /// Bytes of V8 heap in use, and the memory the isolate holds (heap
    /// pages plus ArrayBuffers).
    pub(crate) fn memory(&mut self) -> (usize, usize) {
        let stats = self.js.v8_isolate().get_heap_statistics();
        (
            stats.used_heap_size(),
            stats.total_physical_size() + stats.external_memory(),
        )
    }
}

/// Calls `f` with `args` inside the try-catch `scope`; returns the thrown
/// exception as text. A call ended by termination (a limit) counts as
/// done: the caller sees the limit's flag.
fn call_guarded<'s>(
    scope: &mut v8::PinnedRef<'_, v8::TryCatch<'_, 's, v8::HandleScope<'_>>>,
    f: v8::Local<'s, v8::Function>,
    args: &[v8::Local<'s, v8::Value>],
) -> Result<(), String> {
    let recv = v8::undefined(scope).into();
    if f.call(scope, recv, args).is_some() {
        return Ok(());
    }
    if scope.has_terminated() || scope.is_execution_terminating() {
        // V8 cancels a termination when it leaves the outermost try/catch,
        // and this is it: terminate again, so no more of the tenant's JS
        // (say, a loop queued as a microtask) runs before the isolate's task
        // sees the limit's flag and ends it.
        scope.terminate_execution();
        return Ok(());
    }
    Err(scope
        .exception()
        .map(|e| e.to_rust_string_lossy(scope))
        .unwrap_or_else(|| "unknown error".into()))
}

/// Answers `req`, which never reached JS, with a dispatch failure.
fn fail_undelivered(mut req: Box<IncomingRequest>, why: &str) {
    let _ = req.respond.send(Err(atoll_js_api::HandlerError {
        kind: FailureKind::Exception,
        detail: format!("the request could not be dispatched: {why}"),
    }));
}

/// bootstrap.js's functions the host calls.
struct EntryPoints {
    boot: v8::Global<v8::Function>,
    dispatch_all: v8::Global<v8::Function>,
    /// The common methods as internalized strings, made once per isolate
    /// rather than once per request.
    methods: Vec<(http::Method, v8::Global<v8::String>)>,
}

/// Methods whose JS strings each isolate keeps ready.
const COMMON_METHODS: [http::Method; 7] = [
    http::Method::GET,
    http::Method::HEAD,
    http::Method::POST,
    http::Method::PUT,
    http::Method::DELETE,
    http::Method::OPTIONS,
    http::Method::PATCH,
];

impl Drop for Isolate {
    fn drop(&mut self) {
        // Dropping the runtime disposes the isolate, which exits it once:
        // enter it so that exit is balanced and the thread's stack stays empty.
        // SAFETY: the isolate is alive until `js` drops right after this.
        unsafe { self.js.v8_isolate().enter() };
    }
}

fn log_console(owner: &Option<Arc<Deployment>>, line: LogLine) {
    let tenant = owner.as_ref().map(|d| d.tenant.as_str()).unwrap_or("-");
    let request_id = line.request_id.as_ref().map_or("-", RequestId::as_str);
    let msg = line.message;
    match line.level {
        0 => tracing::debug!(target: "atoll::console", tenant, request_id, "{msg}"),
        1 => tracing::info!(target: "atoll::console", tenant, request_id, "{msg}"),
        2 => tracing::warn!(target: "atoll::console", tenant, request_id, "{msg}"),
        _ => tracing::error!(target: "atoll::console", tenant, request_id, "{msg}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Heap bytes allocated per object the JS expression `make` builds,
    /// over a batch small enough that no collection runs meanwhile (one
    /// would only make the figure smaller). No collection runs before
    /// either: a full one completes V8's in-object slack tracking, which
    /// is what the test below looks for.
    fn allocated_per_object(isolate: &mut Isolate, make: &str) -> usize {
        const N: usize = 200;
        isolate.run(|iso| {
            iso.js
                .execute_script(
                    "<keep>",
                    format!("globalThis.keep = new Array({N}).fill(0)"),
                )
                .expect("the keeping array");
            let before = iso.js.v8_isolate().get_heap_statistics().used_heap_size();
            iso.js
                .execute_script(
                    "<make>",
                    format!("for (let i = 0; i < {N}; i++) keep[i] = {make}"),
                )
                .expect("the objects");
            let after = iso.js.v8_isolate().get_heap_statistics().used_heap_size();
            after.saturating_sub(before) / N
        })
    }

    #[test]
    fn classes_warmed_in_the_snapshot_have_compact_instances() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("a tokio runtime");
        let _guard = rt.enter();
        // As `Runtime::start` does: more than one provider is linked in.
        let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
        let client = crate::outbound::client(&crate::OutboundConfig::default())
            .expect("the outbound client");
        let mut isolate = Isolate::new(64 * 1024 * 1024, &client);
        // A Response, its inner response, two empty lists and a method, plus
        // what the interpreter's first runs leave: 423 bytes once V8 has
        // shrunk the classes, 638 when the snapshot kept them at their
        // initial, generous size (bootstrap.js, SLACK_TRACKING_ROUNDS).
        let response = allocated_per_object(&mut isolate, r#"new Response("x")"#);
        assert!(
            response < 530,
            "new Response(\"x\") allocates {response} bytes: the snapshot's classes kept their slack"
        );
    }
}
