//! Atoll's isolate engine.
//!
//! Boots V8 isolates from a startup snapshot, runs tenants' module-worker
//! handlers in them, enforces CPU, wall-clock and heap limits, and schedules
//! tenants onto worker threads. Knows nothing of HTTP servers, QUIC or the
//! CLI: callers hand it [`HttpRequest`]s and get back
//! [`OutgoingResponse`]s.

mod array_buffers;
mod deployment;
mod extensions;
mod isolate;
mod limits;
mod module_loader;
mod outbound;
mod running_request;
mod snapshot;
mod tenant;
mod worker;

use std::future::Future;
use std::hash::{Hash, Hasher};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

use tokio::sync::{mpsc, oneshot};

pub use atoll_js_api::{
    ChunkSource, FailureKind, FetchLimits, OutgoingBody, OutgoingResponse, RequestBody, RequestId,
};
pub use atoll_protocol::Bundle;
pub use deno_core::ByteString;
pub use deployment::Deployment;
pub use limits::{LimitKind, Limits};
pub use outbound::{Allowance, BadAllowance, Blocked, OutboundConfig, OutboundError, classify};
pub use tenant::IsolateInfo;
pub use worker::WorkerStats;

use crate::limits::CpuWatchdog;
use crate::tenant::Dispatch;
use crate::worker::WorkerMsg;
use atoll_js_api::IncomingRequest;

/// A request as the runtime receives it from a server.
pub struct HttpRequest {
    /// Request id for logs.
    pub request_id: RequestId,
    /// When the server received it; its wall-clock limit counts from here.
    pub received: std::time::Instant,
    /// HTTP method.
    pub method: http::Method,
    /// Absolute URL the handler sees.
    pub url: String,
    /// Headers; handlers that never read them never pay for converting them.
    pub headers: http::HeaderMap,
    /// Body.
    pub body: RequestBody,
    /// Where the isolate keeps the CPU time it charged the request.
    pub cpu: RequestCpu,
}

/// CPU time charged to one request so far, shared with the server that
/// logs it: the isolate's thread updates it as it charges the request.
/// The default tracks nothing (reads as `None`) and costs nothing: a server
/// that will not log a request's CPU time skips the shared counter's
/// allocation and updates.
#[derive(Debug, Clone, Default)]
pub struct RequestCpu(Option<std::sync::Arc<std::sync::atomic::AtomicU64>>);

impl RequestCpu {
    /// A counter the isolate keeps up to date.
    pub fn tracked() -> RequestCpu {
        RequestCpu(Some(Default::default()))
    }

    /// The CPU time charged so far, if this counter is tracked.
    pub fn get(&self) -> Option<std::time::Duration> {
        let nanos = self.0.as_ref()?.load(std::sync::atomic::Ordering::Relaxed);
        Some(std::time::Duration::from_nanos(nanos))
    }

    pub(crate) fn set(&self, cpu: std::time::Duration) {
        if let Some(shared) = &self.0 {
            let nanos = u64::try_from(cpu.as_nanos()).unwrap_or(u64::MAX);
            shared.store(nanos, std::sync::atomic::Ordering::Relaxed);
        }
    }
}

/// How the runtime is sized.
#[derive(Debug, Clone)]
pub struct RuntimeConfig {
    /// Worker threads (one per core is right for production).
    pub threads: usize,
    /// Pre-booted blank isolates kept per worker thread.
    pub pool_per_thread: usize,
    /// Heap limit of pooled isolates (tenants with another limit boot their own).
    pub default_heap_bytes: usize,
    /// Memory all tenant isolates together may hold; past it, idle isolates
    /// are evicted least recently used first. Split evenly between threads.
    pub memory_budget_bytes: usize,
    /// How handlers' `fetch()` reaches the network.
    pub outbound: OutboundConfig,
}

impl Default for RuntimeConfig {
    fn default() -> Self {
        RuntimeConfig {
            threads: std::thread::available_parallelism()
                .map(|n| n.get())
                .unwrap_or(1),
            pool_per_thread: 4,
            default_heap_bytes: Limits::default().heap_bytes,
            memory_budget_bytes: 1024 * 1024 * 1024,
            outbound: OutboundConfig::default(),
        }
    }
}

/// Why a request produced no handler response.
#[derive(Debug, thiserror::Error)]
pub enum DispatchError {
    /// The handler threw or returned something that is not a Response.
    #[error("the handler threw: {0}")]
    Exception(String),
    /// The script's entry module failed to load or evaluate.
    #[error("the script failed to start: {0}")]
    Startup(String),
    /// A limit was hit.
    #[error("the script exceeded its {0}: {1}")]
    Limit(LimitKind, String),
    /// The runtime is shutting down or the isolate vanished.
    #[error("the script is unavailable: {0}")]
    Unavailable(String),
}

impl DispatchError {
    /// The HTTP status a client should get for this failure.
    pub fn status(&self) -> u16 {
        match self {
            DispatchError::Exception(_) | DispatchError::Startup(_) => 500,
            DispatchError::Limit(LimitKind::WallClock, _) => 504,
            DispatchError::Limit(_, _) | DispatchError::Unavailable(_) => 503,
        }
    }

    /// A short, internals-free explanation for the client.
    pub fn public_message(&self) -> &'static str {
        match self {
            DispatchError::Exception(_) => "the worker threw an exception",
            DispatchError::Startup(_) => "the worker failed to start",
            DispatchError::Limit(LimitKind::Cpu, _) => "the worker exceeded its CPU time limit",
            DispatchError::Limit(LimitKind::Memory, _) => "the worker exceeded its memory limit",
            DispatchError::Limit(LimitKind::WallClock, _) => "the worker did not respond in time",
            DispatchError::Limit(LimitKind::Concurrency, _) => {
                "the worker is busy with too many requests; retry later"
            }
            DispatchError::Unavailable(_) => "the worker is unavailable",
        }
    }
}

/// The response head of a dispatched request, once the isolate produces it
/// (see [`Runtime::dispatch`]).
pub struct Answer {
    state: AnswerState,
}

enum AnswerState {
    Waiting {
        rx: oneshot::Receiver<atoll_js_api::HandlerResult>,
        backstop: Option<std::pin::Pin<Box<tokio::time::Sleep>>>,
        wall: std::time::Duration,
    },
    Failed(&'static str),
    Done,
}

impl Answer {
    fn failed(why: &'static str) -> Answer {
        Answer {
            state: AnswerState::Failed(why),
        }
    }
}

impl Future for Answer {
    type Output = Result<Box<OutgoingResponse>, DispatchError>;

    fn poll(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Self::Output> {
        use std::task::Poll;
        let outcome = match &mut self.state {
            AnswerState::Waiting { rx, backstop, wall } => match std::pin::Pin::new(rx).poll(cx) {
                Poll::Ready(Ok(outcome)) => outcome.map_err(failure),
                Poll::Ready(Err(_)) => Err(DispatchError::Unavailable(
                    "the isolate stopped before answering".into(),
                )),
                Poll::Pending => {
                    let expired = backstop
                        .as_mut()
                        .is_some_and(|sleep| sleep.as_mut().poll(cx).is_ready());
                    if !expired {
                        return Poll::Pending;
                    }
                    Err(DispatchError::Limit(
                        LimitKind::WallClock,
                        format!("no response within {} ms", wall.as_millis()),
                    ))
                }
            },
            AnswerState::Failed(why) => Err(DispatchError::Unavailable((*why).into())),
            // A caller bug (polled after completion): no response, no panic.
            AnswerState::Done => Err(DispatchError::Unavailable(
                "the answer was already taken".into(),
            )),
        };
        self.state = AnswerState::Done;
        Poll::Ready(outcome)
    }
}

/// The dispatch error for a handler's failure.
fn failure(e: atoll_js_api::HandlerError) -> DispatchError {
    match e.kind {
        FailureKind::Exception => DispatchError::Exception(e.detail),
        FailureKind::Startup => DispatchError::Startup(e.detail),
        FailureKind::CpuLimit => DispatchError::Limit(LimitKind::Cpu, e.detail),
        FailureKind::MemoryLimit => DispatchError::Limit(LimitKind::Memory, e.detail),
        FailureKind::WallClockLimit => DispatchError::Limit(LimitKind::WallClock, e.detail),
        FailureKind::Unavailable => DispatchError::Unavailable(e.detail),
        FailureKind::Overloaded => DispatchError::Limit(LimitKind::Concurrency, e.detail),
    }
}

/// Failed to start the runtime.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// A thread could not be started.
    #[error("could not start the runtime: {0}")]
    Io(#[from] std::io::Error),
    /// The outbound client could not be set up.
    #[error(transparent)]
    Outbound(#[from] OutboundError),
}

/// Sets V8's process-wide flags, once, before the first isolate exists.
/// `ATOLL_V8_FLAGS` (space-separated) adds to them, for experiments.
fn set_v8_flags() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        // A 4 MiB young generation instead of V8's default (which
        // scavenged every 0.8 MB allocated): a busy isolate scavenges 3.6
        // times less often. Each scavenge costs the same at any size (much
        // of it walks the snapshot's roots; almost nothing a request
        // allocates survives). New-space pages are touched only as they are
        // allocated into, so an idle isolate's memory does not change
        // (benches/cold_start.rs: 3.01 MiB either way); a busy one holds
        // about 7.5 MiB more.
        let mut args = vec![String::new(), "--min-semi-space-size=4".to_string()];
        if let Ok(extra) = std::env::var("ATOLL_V8_FLAGS") {
            args.extend(extra.split_whitespace().map(str::to_string));
        }
        let unknown = deno_core::v8_set_flags(args);
        for flag in unknown.iter().skip(1) {
            tracing::warn!("V8 does not know the flag {flag} in ATOLL_V8_FLAGS");
        }
    });
}

/// The isolate engine: worker threads and the tenants scheduled on them.
pub struct Runtime {
    /// Tells this runtime's workers apart from another runtime's in the
    /// same process.
    id: u64,
    workers: Vec<mpsc::UnboundedSender<WorkerMsg>>,
    /// Tasks running on each worker through [`Runtime::spawn_on_worker`].
    tasks: Vec<Arc<AtomicUsize>>,
}

/// Counts down a worker's task count when the task ends.
struct TaskCount(Arc<AtomicUsize>);

impl Drop for TaskCount {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

impl Runtime {
    /// Starts the worker threads and the CPU watchdog.
    pub fn start(config: RuntimeConfig) -> Result<Runtime, StartError> {
        set_v8_flags();
        let watchdog = CpuWatchdog::start()?;
        let threads = config.threads.max(1);
        // deno_fetch's TLS asks rustls for the process default provider,
        // and more than one is linked in: pick the one the node uses.
        let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
        let client = outbound::client(&config.outbound)?;
        let allowance = Arc::new(config.outbound.allow.clone());
        static NEXT_ID: AtomicU64 = AtomicU64::new(1);
        let id = NEXT_ID.fetch_add(1, Ordering::Relaxed);
        let mut workers = Vec::with_capacity(threads);
        for i in 0..threads {
            workers.push(worker::spawn(
                id,
                i,
                worker::WorkerConfig {
                    client: client.clone(),
                    allowance: allowance.clone(),
                    pool_target: config.pool_per_thread,
                    default_heap: config.default_heap_bytes,
                    memory_budget: config.memory_budget_bytes / threads,
                },
                watchdog.clone(),
            )?);
        }
        Ok(Runtime {
            id,
            tasks: workers.iter().map(|_| Arc::default()).collect(),
            workers,
        })
    }

    /// The worker that runs `tenant`'s isolate.
    fn home_of(&self, tenant: &str) -> usize {
        if self.workers.len() == 1 {
            return 0;
        }
        let mut h = std::collections::hash_map::DefaultHasher::new();
        tenant.hash(&mut h);
        (h.finish() % self.workers.len() as u64) as usize
    }

    /// Sends `msg` to worker `index`, handling it in place when the caller
    /// runs on that worker's thread (no thread crossing, no wake-up).
    /// Returns whether it was handled in place.
    fn deliver(&self, index: usize, msg: WorkerMsg) -> Result<bool, ()> {
        match worker::deliver_local(self.id, index, msg) {
            None => Ok(true),
            Some(msg) => self.workers[index].send(msg).map(|_| false).map_err(|_| ()),
        }
    }

    /// Runs the future `task` makes on the worker thread with the fewest
    /// such tasks. Servers run their connections this way: a request then
    /// reaches a tenant whose isolate lives on that thread without leaving
    /// it. `task` is called on the worker thread, inside its event loop, so
    /// it may register I/O there (e.g. `TcpStream::from_std`).
    pub fn spawn_on_worker<F, Fut>(&self, task: F)
    where
        F: FnOnce() -> Fut + Send + 'static,
        Fut: Future<Output = ()> + 'static,
    {
        let index = (0..self.tasks.len())
            .min_by_key(|&i| self.tasks[i].load(Ordering::Relaxed))
            .unwrap_or(0);
        let count = self.tasks[index].clone();
        count.fetch_add(1, Ordering::Relaxed);
        let guard = TaskCount(count);
        let msg = WorkerMsg::Spawn(Box::new(move || {
            Box::pin(async move {
                let _guard = guard;
                task().await;
            })
        }));
        // A stopped runtime drops the task (and the guard with it).
        let _ = self.workers[index].send(msg);
    }

    /// Runs `request` in `deployment`'s isolate; the returned future
    /// resolves to the response head. The request is handed over before
    /// this returns, so the future is small and holds only the answer's
    /// receiver (moving it around costs little). `deployment` is borrowed:
    /// a request handled on its tenant's own thread takes no reference to it.
    pub fn dispatch(&self, deployment: &Arc<Deployment>, request: HttpRequest) -> Answer {
        let (tx, rx) = oneshot::channel();
        let wall = deployment.limits.wall_per_request;
        let home = self.home_of(&deployment.tenant);
        let HttpRequest {
            request_id,
            received,
            method,
            url,
            headers,
            body,
            cpu,
        } = request;
        let dispatch = Dispatch {
            incoming: Box::new(IncomingRequest {
                // The isolate's slot numbers it.
                id: 0,
                request_id,
                method,
                url,
                headers,
                body,
                respond: atoll_js_api::Responder::new(tx),
            }),
            received,
            cpu,
        };
        let local = match worker::dispatch_local(self.id, home, deployment, dispatch) {
            None => true,
            Some(dispatch) => {
                let msg = WorkerMsg::Dispatch {
                    deployment: deployment.clone(),
                    dispatch,
                };
                if self.workers[home].send(msg).is_err() {
                    return Answer::failed("the runtime has stopped");
                }
                false
            }
        };
        // The isolate's task fails requests past the wall clock, queued or
        // running. Across threads, this bound is the backstop should the
        // isolate's thread be stuck; on that same thread it could not fire
        // either, so it would only cost a timer per request.
        let backstop = (!local).then(|| Box::pin(tokio::time::sleep(wall + wall / 10)));
        Answer {
            state: AnswerState::Waiting { rx, backstop, wall },
        }
    }

    /// Starts `deployment`'s isolate ahead of its first request (a no-op if
    /// it is running), e.g. when a TLS ClientHello names its host.
    pub fn warm(&self, deployment: Arc<Deployment>) {
        let home = self.home_of(&deployment.tenant);
        let _ = self.deliver(home, WorkerMsg::Warm { deployment });
    }

    /// Stops `tenant`'s isolate once its in-flight requests finish.
    pub fn retire(&self, tenant: &str) {
        let home = self.home_of(tenant);
        let _ = self.deliver(
            home,
            WorkerMsg::Retire {
                tenant: tenant.to_string(),
            },
        );
    }

    /// The first worker whose thread did not answer a ping `within` the
    /// given time (stuck, or stopped), if any. Workers are pinged at once,
    /// so this waits at most `within` in all.
    pub async fn unresponsive_worker(&self, within: std::time::Duration) -> Option<usize> {
        let pings: Vec<_> = self
            .workers
            .iter()
            .map(|w| {
                let (tx, rx) = oneshot::channel();
                w.send(WorkerMsg::Ping { reply: tx }).ok().map(|_| rx)
            })
            .collect();
        let deadline = tokio::time::Instant::now() + within;
        for (index, ping) in pings.into_iter().enumerate() {
            let answered = match ping {
                Some(rx) => matches!(tokio::time::timeout_at(deadline, rx).await, Ok(Ok(()))),
                None => false,
            };
            if !answered {
                return Some(index);
            }
        }
        None
    }

    /// Stats of every worker.
    pub async fn stats(&self) -> Vec<WorkerStats> {
        let mut out = Vec::new();
        for w in &self.workers {
            let (tx, rx) = oneshot::channel();
            if w.send(WorkerMsg::Stats { reply: tx }).is_ok()
                && let Ok(s) = rx.await
            {
                out.push(s);
            }
        }
        out
    }
}
