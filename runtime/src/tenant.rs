//! A tenant's isolate at work: boot, serve, account CPU, enforce limits.
//!
//! Each tenant isolate is driven by one task on its worker thread. The task
//! polls the isolate's event loop with the CPU watchdog armed, charges the
//! CPU time of every poll to the requests in flight, fails requests that
//! overrun the wall clock, and on any termination fails what is left and
//! drops the isolate. The tenant's next request starts a fresh one.

use std::cell::{Cell, RefCell};
use std::collections::VecDeque;
use std::future::poll_fn;
use std::rc::Rc;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Poll, Waker};
use std::time::{Duration, Instant};

use atoll_js_api::{FailureKind, HandlerError, HostBridge, IncomingRequest, Stage};
use deno_core::PollEventLoopOptions;
use rustc_hash::FxHashMap;
use tokio::sync::oneshot;
use tracing::Instrument;

use crate::deployment::Deployment;
use crate::isolate::Isolate;
use crate::limits::{CpuWatch, ThreadCpuClock, sample_period, thread_cpu_time};
use crate::running_request::OnSample;

/// How often deadlines are checked while requests are in flight.
const WALL_CHECK_EVERY: Duration = Duration::from_millis(20);

/// How often an isolate's memory is measured (V8's heap statistics walk
/// every space: too slow for every poll). Heap limits are enforced by V8
/// itself; this figure feeds eviction and metrics.
const MEMORY_SAMPLE_EVERY: Duration = Duration::from_millis(25);

/// Longest a poll goes on starting handlers (it always starts one): the
/// requests left wait for the next poll, after the thread has served its
/// other connections and isolates, so a burst of heavy requests to one
/// tenant does not hold up everything else on its thread.
const DELIVERY_SLICE: Duration = Duration::from_millis(5);

/// How much later a handler's CPU deadline may fall than its own budget
/// would put it: the handlers a poll starts within this much of each other
/// share one move of the watchdog's deadline instead of a move each.
/// Lenient only, and by far less than the watchdog's sampling period.
const REARM_SLACK: Duration = Duration::from_micros(100);

/// Rounds of the thread's other ready work (socket reads, other isolates,
/// new connections) an isolate lets run after a poll that used its whole
/// delivery slice: a new connection takes several such rounds to reach its
/// own isolate, and would otherwise wait a slice for each.
const YIELD_ROUNDS_AFTER_SLICE: u8 = 8;

/// How many requests' CPU budgets one turn of an isolate's event loop may
/// use in all. Continuations of many requests that resume together run back
/// to back, each within its own budget, and the thread serves nothing else
/// meanwhile: past this, the isolate is ended for the others' sake.
const TURN_BUDGETS: u32 = 4;

/// How old the isolate's last reading of its thread's CPU clock (a system
/// call, 0.5–0.7 µs here) may be before it reads it again; until then
/// the wall time since is taken as all CPU (`ThreadCpuClock`). Being
/// preempted that briefly can over-charge a poll's handlers, and loosen
/// its CPU deadline, by at most this much; under load, polls come every few
/// hundred microseconds and most of them read no clock at all.
const CPU_CLOCK_FRESH: Duration = Duration::from_micros(500);

/// A request on its way into an isolate, with where its answer goes.
pub(crate) struct Dispatch {
    /// The request, boxed once by the server's call: it passes through
    /// several queues on its way in, and each move of the unboxed record
    /// (some 200 bytes) was a `memcpy`.
    pub(crate) incoming: Box<IncomingRequest>,
    /// When the server received it (its wall-clock limit counts from here).
    pub(crate) received: Instant,
    /// Where the isolate keeps the CPU time it charged the request.
    pub(crate) cpu: crate::RequestCpu,
}

/// A request taken into the isolate; it has finished once the isolate's
/// bridge no longer lists it as pending.
struct InFlight {
    cpu: Duration,
    /// `cpu`, as the server sees it.
    shared_cpu: crate::RequestCpu,
    deadline: Instant,
    /// The response is complete; `deadline` now bounds its waitUntil work.
    answered: bool,
}

impl InFlight {
    fn charge(&mut self, cpu: Duration) {
        self.cpu += cpu;
        self.shared_cpu.set(self.cpu);
    }
}

/// A request waiting for one of the isolate's concurrency slots.
struct Queued {
    incoming: Box<IncomingRequest>,
    deadline: Instant,
    cpu: crate::RequestCpu,
}

#[derive(Default)]
struct SlotState {
    /// Requests the isolate is running, by id (Fx-hashed: host-made keys).
    in_flight: FxHashMap<u32, InFlight>,
    /// Requests over the concurrency limit, oldest first.
    queue: VecDeque<Queued>,
    /// Wakes the driving task when a request is queued or the slot retires.
    waker: Option<Waker>,
    next_id: u32,
    ended: bool,
    /// CPU used while no request was in flight (timers after the response),
    /// since the last request arrived. Bounded by the per-request limit so
    /// background work cannot burn CPU forever.
    idle_cpu: Duration,
    /// No new requests will come; end once those in flight finish.
    retired: bool,
    /// The tenant's module has been evaluated; requests are admitted.
    booted: bool,
    last_used: Option<Instant>,
    heap_used: usize,
    /// V8 heap pages plus ArrayBuffer memory: what evicting the isolate frees.
    memory: usize,
    cpu_total: Duration,
}

impl SlotState {
    fn wake(&mut self) {
        if let Some(w) = self.waker.take() {
            w.wake();
        }
    }
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
    /// Memory the isolate holds (V8 heap pages plus ArrayBuffers).
    pub memory: usize,
    /// Requests in flight.
    pub in_flight: usize,
    /// Requests waiting for a concurrency slot.
    pub queued: usize,
    /// CPU time used by this isolate so far.
    pub cpu_total: Duration,
    /// When it last received a request.
    pub last_used: Option<Instant>,
}

/// The worker's handle on one tenant isolate.
pub(crate) struct TenantSlot {
    pub(crate) deployment: Arc<Deployment>,
    state: Rc<RefCell<SlotState>>,
}

impl TenantSlot {
    /// Hands `isolate` to `deployment` and spawns the task that drives it.
    /// The isolate's CPU time is also added to `cpu_counter`, which
    /// outlives it.
    pub(crate) fn start(
        isolate: Isolate,
        deployment: Arc<Deployment>,
        watch: Arc<CpuWatch>,
        cpu_counter: Rc<Cell<Duration>>,
    ) -> Rc<TenantSlot> {
        let state = Rc::new(RefCell::new(SlotState {
            last_used: Some(Instant::now()),
            ..SlotState::default()
        }));
        let slot = Rc::new(TenantSlot {
            deployment: deployment.clone(),
            state: state.clone(),
        });
        // A root span: the isolate outlives the request that started it,
        // and its log lines (console output of later requests) must not
        // carry that request's id.
        let span = tracing::info_span!(
            parent: None,
            "isolate",
            tenant = %deployment.tenant,
            deployment = %deployment.version
        );
        deno_core::unsync::spawn(
            run(isolate, deployment, state, watch, cpu_counter).instrument(span),
        );
        slot
    }

    /// Whether the isolate still takes requests.
    pub(crate) fn is_alive(&self) -> bool {
        let st = self.state.borrow();
        !st.ended && !st.retired
    }

    /// Whether nothing is running or waiting in the isolate.
    pub(crate) fn is_idle(&self) -> bool {
        let st = self.state.borrow();
        st.in_flight.is_empty() && st.queue.is_empty()
    }

    /// Queues a request for the isolate; the driving task admits it once
    /// the isolate is under its concurrency limit.
    pub(crate) fn dispatch(&self, mut d: Dispatch) {
        let mut st = self.state.borrow_mut();
        if st.ended || st.retired {
            // The isolate's task is gone (or going): the caller starts a
            // fresh one for the next request.
            let _ = d.incoming.respond.send(Err(HandlerError {
                kind: FailureKind::Unavailable,
                detail: "the isolate has stopped".into(),
            }));
            return;
        }
        let limits = &self.deployment.limits;
        if st.in_flight.len() + st.queue.len() >= limits.max_concurrent + limits.max_queued {
            let _ = d.incoming.respond.send(Err(HandlerError {
                kind: FailureKind::Overloaded,
                detail: format!(
                    "{} requests in flight and {} queued, the most this script allows",
                    st.in_flight.len(),
                    st.queue.len()
                ),
            }));
            return;
        }
        st.next_id = st.next_id.wrapping_add(1).max(1);
        let id = st.next_id;
        // The server's clock reading: no second one per request here.
        let now = d.received;
        st.last_used = Some(now);
        st.idle_cpu = Duration::ZERO;
        let mut incoming = d.incoming;
        incoming.id = id;
        st.queue.push_back(Queued {
            incoming,
            deadline: now + limits.wall_per_request,
            cpu: d.cpu,
        });
        st.wake();
    }

    /// Stops taking requests; the isolate ends once those in flight and
    /// queued finish.
    pub(crate) fn retire(&self) {
        let mut st = self.state.borrow_mut();
        st.retired = true;
        st.wake();
    }

    /// Memory the isolate holds, as last sampled.
    pub(crate) fn memory(&self) -> usize {
        self.state.borrow().memory
    }

    /// When it last received a request.
    pub(crate) fn last_used(&self) -> Option<Instant> {
        self.state.borrow().last_used
    }

    pub(crate) fn info(&self) -> IsolateInfo {
        let st = self.state.borrow();
        IsolateInfo {
            tenant: self.deployment.tenant.clone(),
            version: self.deployment.version.clone(),
            heap_used: st.heap_used,
            memory: st.memory,
            in_flight: st.in_flight.len(),
            queued: st.queue.len(),
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
    cpu_counter: Rc<Cell<Duration>>,
) {
    let end = EndGuard(state.clone());
    let (kind, detail, culprit) =
        drive(&mut isolate, &deployment, &state, &watch, &cpu_counter).await;
    {
        // Requests that waited for the module to load share its failure.
        let mut st = state.borrow_mut();
        if !st.booted {
            for mut q in st.queue.drain(..) {
                let _ = q.incoming.respond.send(Err(HandlerError {
                    kind,
                    detail: detail.clone(),
                }));
            }
        }
    }
    drop(end);
    match kind {
        FailureKind::Unavailable => tracing::debug!("isolate retired: {detail}"),
        FailureKind::Startup => tracing::error!("script failed to start: {detail}"),
        _ => tracing::warn!(reason = ?kind, "isolate terminated: {detail}"),
    }
    {
        let op_state = isolate.js.op_state();
        let op_state = op_state.borrow();
        let bridge = op_state.borrow::<HostBridge>();
        if let Some(id) = culprit {
            // The others did nothing wrong: tell their clients so.
            bridge.fail_one(id, kind, &detail);
            bridge.fail_all(
                kind,
                &format!(
                    "{detail} by another request running in the same isolate; \
                     this one was ended with it"
                ),
            );
        } else {
            bridge.fail_all(kind, &detail);
        }
    }
    if kind == FailureKind::Unavailable {
        // Retired or evicted while idle, typically by the cold start of
        // another tenant on this thread, which goes first.
        crate::worker::after_pending_work().await;
    }
    drop(isolate);
}

/// Marks the slot ended when its task stops, even by a panic, so the worker
/// starts a fresh isolate instead of queueing into a dead one; fails the
/// requests still queued (they never ran here, so whatever ended the
/// isolate is not theirs).
struct EndGuard(Rc<RefCell<SlotState>>);

impl Drop for EndGuard {
    fn drop(&mut self) {
        // A panic may have left the state borrowed; then the requests are
        // failed when their senders drop with it.
        let Ok(mut st) = self.0.try_borrow_mut() else {
            return;
        };
        st.ended = true;
        for mut q in st.queue.drain(..) {
            let _ = q.incoming.respond.send(Err(HandlerError {
                kind: FailureKind::Unavailable,
                detail: "the isolate ended before the request could start".into(),
            }));
        }
    }
}

/// The handler starts of one poll's delivery, as [`StartClock`] records
/// them for the poll's CPU accounting.
struct Starts {
    /// When the poll began, by the wall clock and the thread's CPU clock.
    wall0: Instant,
    t0: Duration,
    /// When the poll's delivery slice ends.
    slice_end: Instant,
    /// Until when handlers may start under the deadline armed last (see
    /// [`REARM_SLACK`]).
    covered: Instant,
    /// The request started last, and when.
    current: Option<(u32, Instant)>,
    /// The wall time each earlier request's start took until the next one.
    charges: Vec<(u32, Duration)>,
}

/// Lets a delivered request start while the poll is within its delivery
/// slice; gives each handler the whole per-request CPU budget from its
/// start (the CPU the poll used before it is at most the wall time since
/// the poll began) and notes the wall time its start took, which becomes
/// its share of the batch's CPU.
struct StartClock {
    starts: Rc<RefCell<Starts>>,
    watch: Arc<CpuWatch>,
    cpu_per_request: Duration,
}

impl atoll_js_api::StartGate for StartClock {
    fn start(&mut self, id: u32) -> bool {
        let mut s = self.starts.borrow_mut();
        let now = Instant::now();
        if s.current.is_some() && now >= s.slice_end {
            return false;
        }
        if let Some((prev, since)) = s.current.replace((id, now)) {
            s.charges.push((prev, now.saturating_duration_since(since)));
        }
        if now > s.covered {
            // The deadline of a handler starting up to REARM_SLACK from now.
            s.covered = now + REARM_SLACK;
            let into_poll = s.covered.saturating_duration_since(s.wall0);
            self.watch.rearm(s.t0 + into_poll + self.cpu_per_request);
        }
        true
    }
}

/// Runs the isolate until it ends; returns why, and the request that
/// overran its CPU limit when that ended it and the request is known.
async fn drive(
    isolate: &mut Isolate,
    deployment: &Arc<Deployment>,
    state: &Rc<RefCell<SlotState>>,
    watch: &Arc<CpuWatch>,
    cpu_counter: &Rc<Cell<Duration>>,
) -> (FailureKind, String, Option<u32>) {
    let limits = deployment.limits;
    let mut admitted = Vec::new();
    let (_, booted_placeholder) = oneshot::channel();
    let mut booted = Some(std::mem::replace(
        &mut isolate.host.booted,
        booted_placeholder,
    ));
    if let Err(e) = isolate.boot(deployment) {
        return (FailureKind::Startup, e, None);
    }
    let terminated = Arc::new(AtomicBool::new(false));
    // Top-level code may await; its CPU is summed over all boot polls.
    let mut startup_cpu = Duration::ZERO;
    let handle = isolate.js.v8_isolate().thread_safe_handle();
    let mut memory_sampled: Option<Instant> = None;
    let mut wall_check = tokio::time::interval(WALL_CHECK_EVERY);
    wall_check.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // Reused across polls: the handler time of each request delivered in
    // a poll, and the requests whose code called into the host.
    let mut charges: Vec<(u32, Duration)> = Vec::new();
    let starts = Rc::new(RefCell::new(Starts {
        wall0: Instant::now(),
        t0: Duration::ZERO,
        slice_end: Instant::now(),
        covered: Instant::now(),
        current: None,
        charges: Vec::new(),
    }));
    isolate
        .js
        .op_state()
        .borrow()
        .borrow::<HostBridge>()
        .set_gate(Box::new(StartClock {
            starts: starts.clone(),
            watch: watch.clone(),
            cpu_per_request: limits.cpu_per_request,
        }));
    let mut touched: Vec<u32> = Vec::new();
    let phase = Rc::new(RefCell::new(LoopPhase::default()));
    let sample = isolate.sampler.as_ref().map(|sampler| {
        sampler.set_handler(charge_samples(
            phase.clone(),
            state.clone(),
            watch.clone(),
            handle.clone(),
            terminated.clone(),
            limits.cpu_per_request,
        ));
        sampler.interrupt()
    });

    let mut cpu_clock = ThreadCpuClock::new(CPU_CLOCK_FRESH);
    let mut yields_left = 0u8;
    let mut culprit = None;
    let (kind, detail) = poll_fn(|cx| {
        if yields_left > 0 {
            yields_left -= 1;
            defer_wake(cx);
            return Poll::Pending;
        }
        {
            let mut st = state.borrow_mut();
            if !st.waker.as_ref().is_some_and(|w| w.will_wake(cx.waker())) {
                st.waker = Some(cx.waker().clone());
            }
            // Requests wait in the queue until the tenant's module is ready.
            if booted.is_none() {
                admit(&mut st, &mut admitted, limits.max_concurrent);
            }
        }
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
        let wall0 = Instant::now();
        let t0 = cpu_clock.at(wall0);
        let mut sliced = false;
        let limit = if booted.is_some() {
            limits.cpu_startup
        } else {
            limits.cpu_per_request
        };
        watch.arm(t0, budget, limit, handle.clone(), terminated.clone());
        let measure = memory_sampled.is_none_or(|at| at.elapsed() >= MEMORY_SAMPLE_EVERY);
        let (polled, memory) = isolate.run(|iso| {
            let heap_exceeded = iso.heap_exceeded.clone();
            let stopped =
                || terminated.load(Ordering::SeqCst) || heap_exceeded.load(Ordering::SeqCst);
            // After a limit ends a handler, nothing more runs here: the
            // requests not yet delivered are dropped, so their clients
            // hear the isolate ended.
            // The bridge's gate (`StartClock`) gives each delivered
            // handler its budget and notes its start.
            // This thread's CPU time when the event loop's turn begins.
            let mut loop_start = t0;
            {
                let mut s = starts.borrow_mut();
                (s.wall0, s.t0, s.current) = (wall0, t0, None);
                (s.slice_end, s.covered) = (wall0 + DELIVERY_SLICE, wall0);
                std::mem::swap(&mut s.charges, &mut charges);
            }
            iso.deliver_all(&mut admitted, &stopped);
            let current = {
                let mut s = starts.borrow_mut();
                std::mem::swap(&mut s.charges, &mut charges);
                s.current.take()
            };
            if !admitted.is_empty() {
                // Out of time for this poll: the rest go back to the head
                // of the queue, in order, until the next one.
                sliced = true;
                let mut st = state.borrow_mut();
                for incoming in admitted.drain(..).rev() {
                    let (deadline, cpu) = st.in_flight.remove(&incoming.id).map_or_else(
                        || (Instant::now() + limits.wall_per_request, Default::default()),
                        |f| (f.deadline, f.shared_cpu),
                    );
                    st.queue.push_front(Queued {
                        incoming,
                        deadline,
                        cpu,
                    });
                }
            }
            if stopped() {
                // A limit ended the handler delivered last.
                culprit = current.map(|(id, _)| id);
            }
            if let Some((last, since)) = current {
                let now = Instant::now();
                charges.push((last, now - since));
                // Time the thread spent preempted is in the wall times but
                // is no handler's CPU: scale them down to what the calls used.
                let wall: Duration = charges.iter().map(|(_, took)| *took).sum();
                let elapsed = now - wall0;
                loop_start = cpu_clock.at(now);
                let cpu = loop_start.saturating_sub(t0);
                if cpu < wall {
                    let scale = cpu.as_secs_f64() / wall.as_secs_f64();
                    for (_, took) in &mut charges {
                        *took = took.mul_f64(scale);
                    }
                }
                // The event loop runs continuations of requests in flight:
                // the least budget left among them applies again.
                let mut st = state.borrow_mut();
                for (id, took) in &charges {
                    if let Some(f) = st.in_flight.get_mut(id) {
                        f.charge(*took);
                    }
                }
                let most = st
                    .in_flight
                    .values()
                    .map(|f| f.cpu)
                    .max()
                    .unwrap_or_default();
                watch.rearm(t0 + elapsed + limits.cpu_per_request.saturating_sub(most));
            }
            if stopped() {
                return (Poll::Pending, None);
            }
            // The turn runs continuations of requests in flight: samples
            // charge each its own CPU.
            let sampling = booted.is_none() && !idle;
            if let Some(interrupt) = sample.filter(|_| sampling) {
                *phase.borrow_mut() = LoopPhase {
                    active: true,
                    start: loop_start,
                    last: loop_start,
                    attributed: Duration::ZERO,
                    overran: None,
                    capped: false,
                };
                watch.sample(interrupt);
            }
            let polled = iso.js.poll_event_loop(cx, PollEventLoopOptions::default());
            phase.borrow_mut().active = false;
            (polled, measure.then(|| iso.memory()))
        });
        if measure {
            memory_sampled = Some(Instant::now());
        }
        watch.disarm();
        let used = cpu_clock.at(Instant::now()).saturating_sub(t0);
        cpu_counter.set(cpu_counter.get() + used);
        isolate
            .js
            .op_state()
            .borrow()
            .borrow::<HostBridge>()
            .take_touched(&mut touched);
        {
            let mut st = state.borrow_mut();
            st.cpu_total += used;
            if let Some(memory) = memory {
                (st.heap_used, st.memory) = memory;
            }
            if booted.is_some() {
                // Startup has its own budget; requests waiting for it are not charged.
                startup_cpu += used;
            } else if idle {
                st.idle_cpu += used;
            } else {
                // Delivered handlers were charged above, and the samples of
                // the event loop's turn to the requests they found running.
                // The rest of the turn ran continuations and timers: it goes
                // to the requests whose code called into the host meanwhile
                // (or, if none did, to all in flight), split between them,
                // so a request that only waits is not charged for the
                // others' work.
                let delivered: Duration = charges.iter().map(|(_, took)| *took).sum();
                let rest = used
                    .saturating_sub(delivered)
                    .saturating_sub(phase.borrow().attributed);
                let ran = touched
                    .iter()
                    .filter(|id| st.in_flight.contains_key(id))
                    .count();
                if ran > 0 {
                    let share = rest / u32::try_from(ran).unwrap_or(u32::MAX);
                    for id in &touched {
                        if let Some(f) = st.in_flight.get_mut(id) {
                            f.charge(share);
                        }
                    }
                } else {
                    let n = u32::try_from(st.in_flight.len()).unwrap_or(u32::MAX).max(1);
                    for f in st.in_flight.values_mut() {
                        f.charge(rest / n);
                    }
                }
            }
            charges.clear();
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
            culprit = culprit.or(phase.borrow().overran);
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
            } else if culprit.is_none() && phase.borrow().capped {
                format!(
                    "continuations of requests that resumed together used more than {} ms of \
                     CPU in one turn of the event loop, holding up everything else on its thread",
                    (limits.cpu_per_request * TURN_BUDGETS).as_millis()
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
                Poll::Ready(Ok(Ok(()))) => {
                    booted = None;
                    state.borrow_mut().booted = true;
                }
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
            // Nothing pending in the event loop: the isolate is idle until
            // the next request wakes this task.
            Poll::Ready(Ok(())) | Poll::Pending => {}
        }

        // Finished requests leave; those past the wall clock are failed.
        let op_state = isolate.js.op_state();
        let op_state = op_state.borrow();
        let bridge = op_state.borrow::<HostBridge>();
        let now = Instant::now();
        let mut st = state.borrow_mut();
        // Upload bodies of requests ended here, closed once `op_state` is free.
        let mut unread_bodies = Vec::new();
        st.in_flight.retain(|id, f| {
            let Some(stage) = bridge.stage(*id) else {
                return false;
            };
            if stage == Stage::WaitUntil && !f.answered {
                // The response is complete: ctx.waitUntil work gets one
                // more wall-clock limit from now (Workers gives it 30 s).
                f.answered = true;
                f.deadline = now + limits.wall_per_request;
                return true;
            }
            if now < f.deadline {
                return true;
            }
            match stage {
                // A body stream runs as long as the client reads it; only
                // CPU limits apply.
                Stage::Body => {
                    f.deadline = now + limits.wall_per_request;
                    true
                }
                // The request ends without its waitUntil work, which
                // would otherwise hold a concurrency slot forever.
                Stage::WaitUntil => {
                    if let Some((request_id, body)) = bridge.abandon(*id) {
                        unread_bodies.extend(body);
                        tracing::warn!(
                            %request_id,
                            "work left after the response (ctx.waitUntil, or a stream whose \
                             client went away) was still running {} ms later; the request \
                             ended without it",
                            limits.wall_per_request.as_millis()
                        );
                    }
                    false
                }
                Stage::Handler => {
                    bridge.fail_one(
                        *id,
                        FailureKind::WallClockLimit,
                        "the handler did not respond within the wall-clock limit",
                    );
                    false
                }
            }
        });
        st.queue.retain_mut(|q| {
            if now < q.deadline {
                return true;
            }
            let _ = q.incoming.respond.send(Err(HandlerError {
                kind: FailureKind::WallClockLimit,
                detail: "the request waited for a free slot past the wall-clock limit".into(),
            }));
            false
        });
        if !unread_bodies.is_empty() {
            drop(op_state);
            let op_state = isolate.js.op_state();
            let mut op_state = op_state.borrow_mut();
            for rid in unread_bodies {
                // Lets the client's upload go; already gone if JS read it all.
                if let Ok(body) = op_state.resource_table.take_any(rid) {
                    body.close();
                }
            }
        }
        if sliced {
            yields_left = YIELD_ROUNDS_AFTER_SLICE;
            defer_wake(cx);
        } else if st.in_flight.len() < limits.max_concurrent && !st.queue.is_empty() {
            // Finished requests made room: admit and poll again.
            cx.waker().wake_by_ref();
        }
        if st.in_flight.is_empty() && st.queue.is_empty() {
            if st.retired {
                return Poll::Ready((FailureKind::Unavailable, "retired".into()));
            }
        } else {
            while wall_check.poll_tick(cx).is_ready() {}
        }
        Poll::Pending
    })
    .await;
    let culprit = culprit.filter(|_| kind == FailureKind::CpuLimit);
    (kind, detail, culprit)
}

/// Where the samples of an event loop's turn stand.
#[derive(Default)]
struct LoopPhase {
    /// The turn is running: samples count.
    active: bool,
    /// This thread's CPU time at the turn's start.
    start: Duration,
    /// This thread's CPU time at the turn's start or its last sample.
    last: Duration,
    /// CPU charged by samples to the requests they found running.
    attributed: Duration,
    /// The request a sample took past its limit.
    overran: Option<u32>,
    /// The turn has used [`TURN_BUDGETS`] budgets: samples no longer move
    /// its deadline.
    capped: bool,
}

/// Charges the CPU since the last sample of an event loop's turn to the
/// request in flight whose code is running, and ends the isolate if that
/// takes the request past `limit`. Moves the watchdog's deadline for the
/// turn, which bounds what no sample could put on one request, by what it
/// charges, until the turn has used [`TURN_BUDGETS`] budgets. Time found
/// running no request in flight stays against that deadline.
fn charge_samples(
    phase: Rc<RefCell<LoopPhase>>,
    state: Rc<RefCell<SlotState>>,
    watch: Arc<CpuWatch>,
    isolate: deno_core::v8::IsolateHandle,
    terminated: Arc<AtomicBool>,
    limit: Duration,
) -> OnSample {
    // V8 takes an interrupt at the next stack check of JS. CPU used before
    // that without one (a collection, a long builtin, host work) may be
    // another request's than the one found running: a sample charges it
    // at most two periods; the rest stays against the shared deadline.
    let most_per_sample = 2 * sample_period(limit);
    let turn_cap = limit * TURN_BUDGETS;
    Box::new(move |id| {
        let Ok(mut phase) = phase.try_borrow_mut() else {
            return;
        };
        if !phase.active {
            // Requested during an earlier turn and run only now, outside one.
            return;
        }
        let now = thread_cpu_time();
        let took = now.saturating_sub(phase.last).min(most_per_sample);
        phase.last = now;
        let Ok(mut st) = state.try_borrow_mut() else {
            return;
        };
        let Some(f) = st.in_flight.get_mut(&id) else {
            return;
        };
        f.charge(took);
        phase.attributed += took;
        if f.cpu >= limit {
            phase.overran = Some(id);
            terminated.store(true, Ordering::SeqCst);
            isolate.terminate_execution();
        } else if now.saturating_sub(phase.start) < turn_cap {
            watch.extend(took);
        } else {
            phase.capped = true;
        }
    })
}

/// Wakes the task of `cx` once the thread has polled its sockets and run
/// the tasks already waiting (tokio's `yield_now` defers its wake so).
fn defer_wake(cx: &mut std::task::Context<'_>) {
    let _ = std::pin::pin!(tokio::task::yield_now()).poll(cx);
}

/// Moves queued requests into `admitted` (to be delivered to the isolate)
/// while it is under `max_concurrent`.
#[allow(
    clippy::vec_box,
    reason = "requests stay boxed from the server to the bridge: a move is a pointer"
)]
fn admit(st: &mut SlotState, admitted: &mut Vec<Box<IncomingRequest>>, max_concurrent: usize) {
    while st.in_flight.len() < max_concurrent {
        let Some(q) = st.queue.pop_front() else { break };
        st.in_flight.insert(
            q.incoming.id,
            InFlight {
                cpu: Duration::ZERO,
                shared_cpu: q.cpu,
                deadline: q.deadline,
                answered: false,
            },
        );
        admitted.push(q.incoming);
    }
}

use std::future::Future as _;
