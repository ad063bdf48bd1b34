//! A tenant's isolate at work: boot, serve, account CPU, enforce limits.
//!
//! Each tenant isolate is driven by one task on its worker thread. The task
//! polls the isolate's event loop with the CPU watchdog armed, charges the
//! CPU time of every poll to the requests in flight, fails requests that
//! overrun the wall clock, and on any termination fails what is left and
//! drops the isolate. The tenant's next request starts a fresh one.

use std::cell::RefCell;
use std::collections::HashMap;
use std::future::poll_fn;
use std::rc::Rc;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::Poll;
use std::time::{Duration, Instant};

use atoll_js_api::{FailureKind, HandlerError, HostBridge, IncomingRequest};
use deno_core::PollEventLoopOptions;
use tokio::sync::{mpsc, oneshot};
use tracing::Instrument;

use crate::HttpRequest;
use crate::deployment::Deployment;
use crate::isolate::Isolate;
use crate::limits::{CpuWatch, thread_cpu_time};

/// How often deadlines are checked while requests are in flight.
const WALL_CHECK_EVERY: Duration = Duration::from_millis(20);

/// A request on its way into an isolate, with where its answer goes.
pub(crate) struct Dispatch {
    pub(crate) request: HttpRequest,
    pub(crate) respond: oneshot::Sender<Result<atoll_js_api::OutgoingResponse, HandlerError>>,
}

struct InFlight {
    cpu: Duration,
    deadline: Instant,
    done: oneshot::Receiver<()>,
}

#[derive(Default)]
struct SlotState {
    in_flight: HashMap<u32, InFlight>,
    next_id: u32,
    ended: bool,
    /// CPU used while no request was in flight (timers after the response),
    /// since the last request arrived. Bounded by the per-request limit so
    /// background work cannot burn CPU forever.
    idle_cpu: Duration,
    /// No new requests will come; end once those in flight finish.
    retired: bool,
    last_used: Option<Instant>,
    heap_used: usize,
    cpu_total: Duration,
}

/// Snapshot of one live isolate, for stats.
#[derive(Debug, Clone)]
pub struct IsolateInfo {
    /// Tenant name.
    pub tenant: String,
    /// Deployment version.
    pub version: String,
    /// V8 heap in use at the last poll.
    pub heap_used: usize,
    /// Requests in flight.
    pub in_flight: usize,
    /// CPU time used by this isolate so far.
    pub cpu_total: Duration,
    /// When it last received a request.
    pub last_used: Option<Instant>,
}

/// The worker's handle on one tenant isolate.
pub(crate) struct TenantSlot {
    pub(crate) deployment: Arc<Deployment>,
    requests: RefCell<Option<mpsc::UnboundedSender<IncomingRequest>>>,
    state: Rc<RefCell<SlotState>>,
}

impl TenantSlot {
    /// Hands `isolate` to `deployment` and spawns the task that drives it.
    pub(crate) fn start(
        mut isolate: Isolate,
        deployment: Arc<Deployment>,
        watch: Arc<CpuWatch>,
    ) -> Rc<TenantSlot> {
        let requests = isolate.host.requests.clone();
        // The slot's sender must be the only one, so retiring closes the inbox.
        let (dead_tx, _) = mpsc::unbounded_channel();
        isolate.host.requests = dead_tx;
        let state = Rc::new(RefCell::new(SlotState::default()));
        let slot = Rc::new(TenantSlot {
            deployment: deployment.clone(),
            requests: RefCell::new(Some(requests)),
            state: state.clone(),
        });
        let span = tracing::info_span!(
            "isolate",
            tenant = %deployment.tenant,
            deployment = %deployment.version
        );
        tokio::task::spawn_local(run(isolate, deployment, state, watch).instrument(span));
        slot
    }

    /// Whether the isolate is still serving.
    pub(crate) fn is_alive(&self) -> bool {
        !self.state.borrow().ended && self.requests.borrow().is_some()
    }

    /// Sends a request into the isolate.
    pub(crate) fn dispatch(&self, d: Dispatch) {
        let mut st = self.state.borrow_mut();
        st.next_id = st.next_id.wrapping_add(1).max(1);
        let id = st.next_id;
        st.last_used = Some(Instant::now());
        st.idle_cpu = Duration::ZERO;
        let (done_tx, done_rx) = oneshot::channel();
        let r = d.request;
        let incoming = IncomingRequest {
            id,
            request_id: r.request_id,
            method: r.method,
            url: r.url,
            headers: r.headers,
            body: r.body,
            respond: d.respond,
            done: done_tx,
        };
        let sent = match self.requests.borrow().as_ref() {
            Some(tx) => tx.send(incoming).map_err(|e| e.0),
            None => Err(incoming),
        };
        match sent {
            Ok(()) => {
                st.in_flight.insert(
                    id,
                    InFlight {
                        cpu: Duration::ZERO,
                        deadline: Instant::now() + self.deployment.limits.wall_per_request,
                        done: done_rx,
                    },
                );
            }
            Err(incoming) => {
                // The isolate's task is gone (it ended or panicked): the
                // next request starts a fresh one.
                st.ended = true;
                let _ = incoming.respond.send(Err(HandlerError {
                    kind: FailureKind::Unavailable,
                    detail: "the isolate has stopped".into(),
                }));
            }
        }
    }

    /// Stops taking requests; the isolate ends once those in flight finish.
    pub(crate) fn retire(&self) {
        self.requests.borrow_mut().take();
        self.state.borrow_mut().retired = true;
    }

    pub(crate) fn info(&self) -> IsolateInfo {
        let st = self.state.borrow();
        IsolateInfo {
            tenant: self.deployment.tenant.clone(),
            version: self.deployment.version.clone(),
            heap_used: st.heap_used,
            in_flight: st.in_flight.len(),
            cpu_total: st.cpu_total,
            last_used: st.last_used,
        }
    }
}

async fn run(
    mut isolate: Isolate,
    deployment: Arc<Deployment>,
    state: Rc<RefCell<SlotState>>,
    watch: Arc<CpuWatch>,
) {
    let (kind, detail) = drive(&mut isolate, &deployment, &state, &watch).await;
    state.borrow_mut().ended = true;
    match kind {
        FailureKind::Unavailable => tracing::debug!("isolate retired: {detail}"),
        FailureKind::Startup => tracing::error!("script failed to start: {detail}"),
        _ => tracing::warn!(reason = ?kind, "isolate terminated: {detail}"),
    }
    {
        let op_state = isolate.js.op_state();
        let op_state = op_state.borrow();
        op_state.borrow::<HostBridge>().fail_all(kind, &detail);
    }
    drop(isolate);
}

/// Runs the isolate until it ends; returns why.
async fn drive(
    isolate: &mut Isolate,
    deployment: &Arc<Deployment>,
    state: &Rc<RefCell<SlotState>>,
    watch: &Arc<CpuWatch>,
) -> (FailureKind, String) {
    let limits = deployment.limits;
    let (_, booted_placeholder) = oneshot::channel();
    let mut booted = Some(std::mem::replace(
        &mut isolate.host.booted,
        booted_placeholder,
    ));
    if let Err(e) = isolate.boot(deployment) {
        return (FailureKind::Startup, e);
    }
    let terminated = Arc::new(AtomicBool::new(false));
    // Top-level code may await; its CPU is summed over all boot polls.
    let mut startup_cpu = Duration::ZERO;
    let handle = isolate.js.v8_isolate().thread_safe_handle();
    let mut wall_check = tokio::time::interval(WALL_CHECK_EVERY);
    wall_check.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);

    poll_fn(|cx| {
        let idle = state.borrow().in_flight.is_empty();
        let budget = if booted.is_some() {
            limits.cpu_startup.saturating_sub(startup_cpu)
        } else if idle {
            limits
                .cpu_per_request
                .saturating_sub(state.borrow().idle_cpu)
        } else {
            let used = state
                .borrow()
                .in_flight
                .values()
                .map(|f| f.cpu)
                .max()
                .unwrap_or_default();
            limits.cpu_per_request.saturating_sub(used)
        };
        let t0 = thread_cpu_time();
        watch.arm(budget, handle.clone(), terminated.clone());
        let (polled, heap) = isolate.run(|iso| {
            let polled = iso.js.poll_event_loop(cx, PollEventLoopOptions::default());
            (polled, iso.heap_used())
        });
        watch.disarm();
        let used = thread_cpu_time().saturating_sub(t0);
        {
            let mut st = state.borrow_mut();
            st.cpu_total += used;
            st.heap_used = heap;
            if booted.is_some() {
                // Startup has its own budget; requests waiting for it are not charged.
                startup_cpu += used;
            } else if idle {
                st.idle_cpu += used;
            } else {
                for f in st.in_flight.values_mut() {
                    f.cpu += used;
                }
            }
        }

        if isolate.heap_exceeded.load(Ordering::SeqCst) {
            return Poll::Ready((
                FailureKind::MemoryLimit,
                format!(
                    "heap limit of {} MiB exceeded",
                    isolate.heap_limit / (1024 * 1024)
                ),
            ));
        }
        if terminated.load(Ordering::SeqCst) {
            let what = if booted.is_some() {
                format!(
                    "startup CPU time limit of {} ms exceeded",
                    limits.cpu_startup.as_millis()
                )
            } else if idle {
                format!(
                    "background work after the last response exceeded the CPU time limit of {} ms",
                    limits.cpu_per_request.as_millis()
                )
            } else {
                format!(
                    "CPU time limit of {} ms per request exceeded",
                    limits.cpu_per_request.as_millis()
                )
            };
            return Poll::Ready((FailureKind::CpuLimit, what));
        }
        if let Some(rx) = booted.as_mut() {
            match std::pin::Pin::new(rx).poll(cx) {
                Poll::Ready(Ok(Ok(()))) => booted = None,
                Poll::Ready(Ok(Err(e))) => return Poll::Ready((FailureKind::Startup, e)),
                Poll::Ready(Err(_)) => {
                    return Poll::Ready((
                        FailureKind::Startup,
                        "the entry module never finished evaluating".into(),
                    ));
                }
                Poll::Pending => {}
            }
        }

        match polled {
            Poll::Ready(Err(e)) => {
                return Poll::Ready((FailureKind::Exception, format!("isolate failed: {e}")));
            }
            Poll::Ready(Ok(())) => {
                return Poll::Ready((FailureKind::Unavailable, "no more work".into()));
            }
            Poll::Pending => {}
        }

        // Finished requests leave; those past the wall clock are failed.
        let op_state = isolate.js.op_state();
        let op_state = op_state.borrow();
        let bridge = op_state.borrow::<HostBridge>();
        let now = Instant::now();
        let mut st = state.borrow_mut();
        st.in_flight.retain(|id, f| {
            match f.done.try_recv() {
                Err(oneshot::error::TryRecvError::Empty) => {}
                _ => return false,
            }
            if now < f.deadline {
                return true;
            }
            if bridge.responded(*id) {
                // Streaming or in waitUntil: only CPU limits apply now.
                f.deadline = now + limits.wall_per_request;
                return true;
            }
            bridge.fail_one(
                *id,
                FailureKind::WallClockLimit,
                "the handler did not respond within the wall-clock limit",
            );
            false
        });
        if st.in_flight.is_empty() {
            if st.retired {
                return Poll::Ready((FailureKind::Unavailable, "retired".into()));
            }
        } else {
            while wall_check.poll_tick(cx).is_ready() {}
        }
        Poll::Pending
    })
    .await
}

use std::future::Future as _;
