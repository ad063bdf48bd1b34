//! Worker threads: each owns a tokio current-thread runtime, the isolates of
//! the tenants hashed to it, and a pool of pre-booted blank isolates.

use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::rc::Rc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use rustc_hash::FxHashMap;
use tokio::sync::{Notify, mpsc, oneshot};

use crate::deployment::Deployment;
use crate::isolate::Isolate;
use crate::limits::{CpuWatch, CpuWatchdog};
use crate::tenant::{Dispatch, IsolateInfo, TenantSlot};

/// Messages a worker thread accepts.
// Nearly every message is a Dispatch, and most are handled in place on
// the tenant's own thread: boxing it would cost an allocation per request
// to shrink messages that are rarely queued.
#[allow(clippy::large_enum_variant)]
pub(crate) enum WorkerMsg {
    /// Run a request in the deployment's isolate (starting one if needed).
    Dispatch {
        deployment: Arc<Deployment>,
        dispatch: Dispatch,
    },
    /// Start the deployment's isolate now, ahead of its first request.
    Warm { deployment: Arc<Deployment> },
    /// Stop the tenant's isolate once its requests finish.
    Retire { tenant: String },
    /// Report live isolates.
    Stats { reply: oneshot::Sender<WorkerStats> },
    /// Answer at once: the worker's thread is turning its event loop.
    Ping { reply: oneshot::Sender<()> },
    /// Run a task on this worker's thread (see [`crate::Runtime::spawn_on_worker`]).
    Spawn(Box<dyn FnOnce() -> LocalTask + Send>),
}

/// A task that runs on one worker thread.
pub(crate) type LocalTask = std::pin::Pin<Box<dyn std::future::Future<Output = ()>>>;

thread_local! {
    /// The worker running on this thread, with the id of its runtime: lets a
    /// request that arrives on a tenant's home worker skip the inbox.
    static CURRENT: RefCell<Option<(u64, usize, Rc<Worker>)>> = const { RefCell::new(None) };
}

/// Worker `index` of runtime `runtime`, if it runs on this thread.
fn current(runtime: u64, index: usize) -> Option<Rc<Worker>> {
    CURRENT.with(|c| match &*c.borrow() {
        Some((r, i, w)) if *r == runtime && *i == index => Some(w.clone()),
        _ => None,
    })
}

/// Handles `msg` right here if this thread is worker `index` of runtime
/// `runtime`; otherwise gives it back for the inbox.
pub(crate) fn deliver_local(runtime: u64, index: usize, msg: WorkerMsg) -> Option<WorkerMsg> {
    match current(runtime, index) {
        Some(w) => {
            handle(&w, msg);
            None
        }
        None => Some(msg),
    }
}

/// Hands `dispatch` to `deployment`'s isolate right here if this thread is
/// worker `index` of runtime `runtime`; otherwise gives it back for the
/// inbox. Unlike a message, it needs no reference of its own to the
/// deployment.
pub(crate) fn dispatch_local(
    runtime: u64,
    index: usize,
    deployment: &Arc<Deployment>,
    dispatch: Dispatch,
) -> Option<Dispatch> {
    match current(runtime, index) {
        Some(w) => {
            w.dispatch(deployment, dispatch);
            None
        }
        None => Some(dispatch),
    }
}

/// One worker's view for stats.
#[derive(Debug, Clone, Default)]
pub struct WorkerStats {
    /// Live tenant isolates.
    pub isolates: Vec<IsolateInfo>,
    /// Pre-booted isolates waiting in the pool.
    pub pooled: usize,
    /// Isolates started for a tenant (cold starts).
    pub cold_starts: u64,
    /// Cold starts that found the pool empty and booted from the snapshot inline.
    pub pool_misses: u64,
    /// Idle isolates ended to bring the worker back under its memory budget.
    pub evictions: u64,
    /// This worker's share of the node's isolate memory budget.
    pub memory_budget: usize,
    /// CPU time used by each tenant's isolates on this worker, ended ones included.
    pub cpu_by_tenant: Vec<(String, Duration)>,
}

/// See the runtime builder in [`spawn`].
const EVENT_INTERVAL: u32 = 256;

/// Turns of a worker's event loop that background work (disposing of an
/// isolate, booting a pool replacement) lets pass first.
const BACKGROUND_YIELDS: usize = 4;

/// Waits until the work already runnable on this worker has had its turns:
/// a cold start that triggered background work answers its first request
/// before that work (milliseconds of heap teardown or snapshot boot) takes
/// the thread.
pub(crate) async fn after_pending_work() {
    for _ in 0..BACKGROUND_YIELDS {
        tokio::task::yield_now().await;
    }
}

/// How often the memory budget is checked between cold starts (isolates
/// grow while they serve).
const BUDGET_CHECK_EVERY: Duration = Duration::from_secs(1);

/// How a worker thread is sized.
#[derive(Clone)]
pub(crate) struct WorkerConfig {
    /// The node-wide outbound HTTP client.
    pub(crate) client: deno_fetch::Client,
    /// Private addresses handlers may reach anyway.
    pub(crate) allowance: Arc<crate::outbound::Allowance>,
    pub(crate) pool_target: usize,
    pub(crate) default_heap: usize,
    /// Memory this worker's tenant isolates may hold before idle ones are evicted.
    pub(crate) memory_budget: usize,
}

struct Worker {
    /// Fx-hashed: looked up on every request; tenant names come from the
    /// operator's config, not from clients.
    slots: RefCell<FxHashMap<String, Rc<TenantSlot>>>,
    /// The slot the last request went to: a worker's next request is
    /// usually for the same deployment, found without hashing its tenant.
    last: RefCell<std::rc::Weak<TenantSlot>>,
    pool: RefCell<Vec<Isolate>>,
    config: WorkerConfig,
    watch: Arc<CpuWatch>,
    refill: Notify,
    cold_starts: Cell<u64>,
    pool_misses: Cell<u64>,
    evictions: Cell<u64>,
    cpu_by_tenant: RefCell<HashMap<String, Rc<Cell<Duration>>>>,
}

/// Spawns worker thread `index`; returns its inbox.
pub(crate) fn spawn(
    runtime: u64,
    index: usize,
    config: WorkerConfig,
    watchdog: CpuWatchdog,
) -> std::io::Result<mpsc::UnboundedSender<WorkerMsg>> {
    let (tx, rx) = mpsc::unbounded_channel();
    std::thread::Builder::new()
        .name(format!("atoll-worker-{index}"))
        .spawn(move || {
            // Blocking work (deno_crypto's key derivation and generation) runs
            // on this pool, outside the CPU watchdog's view: keep it small.
            let rt = match tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .max_blocking_threads(2)
                // Tasks polled between two looks at the sockets. Under load
                // a turn reads the requests of all ready connections, runs
                // them in their isolates as one batch each, and writes the
                // answers: 61 (tokio's default, and a `LocalSet`'s fixed
                // turn) split that into two or three batches.
                .event_interval(EVENT_INTERVAL)
                .build()
            {
                Ok(rt) => rt,
                Err(e) => {
                    tracing::error!("worker {index} could not start its event loop: {e}");
                    return;
                }
            };
            crate::outbound::install_on_thread(config.allowance.clone());
            // The worker's tasks are `!Send` (isolates, `Rc` state): they
            // are spawned on this current-thread runtime directly, as
            // deno_core's own tasks are, not through a `LocalSet`.
            rt.block_on(async move {
                let worker = Rc::new(Worker {
                    slots: RefCell::new(FxHashMap::default()),
                    last: RefCell::new(std::rc::Weak::new()),
                    pool: RefCell::new(Vec::new()),
                    config,
                    watch: watchdog.register_current_thread(),
                    refill: Notify::new(),
                    cold_starts: Default::default(),
                    pool_misses: Default::default(),
                    evictions: Default::default(),
                    cpu_by_tenant: Default::default(),
                });
                CURRENT.with(|c| *c.borrow_mut() = Some((runtime, index, worker.clone())));
                deno_core::unsync::spawn(refill_pool(worker.clone()));
                deno_core::unsync::spawn(check_budget(worker.clone()));
                serve(worker, rx).await;
                CURRENT.with(|c| c.borrow_mut().take());
            });
        })?;
    Ok(tx)
}

async fn serve(worker: Rc<Worker>, mut rx: mpsc::UnboundedReceiver<WorkerMsg>) {
    while let Some(msg) = rx.recv().await {
        handle(&worker, msg);
    }
    // Runtime dropped: let every isolate finish what it has.
    for (_, slot) in worker.slots.borrow_mut().drain() {
        slot.retire();
    }
}

/// Acts on one message, from the inbox or delivered on this thread. Never
/// called from inside an isolate's poll: it may start isolates.
fn handle(worker: &Rc<Worker>, msg: WorkerMsg) {
    match msg {
        WorkerMsg::Dispatch {
            deployment,
            dispatch,
        } => worker.dispatch(&deployment, dispatch),
        WorkerMsg::Warm { deployment } => {
            if worker.slot_for(&deployment).1 {
                tracing::debug!(tenant = %deployment.tenant, "warming isolate");
                worker.enforce_budget(&deployment.tenant);
            }
        }
        WorkerMsg::Retire { tenant } => {
            if let Some(slot) = worker.slots.borrow_mut().remove(&tenant) {
                slot.retire();
            }
        }
        WorkerMsg::Stats { reply } => {
            let _ = reply.send(worker.stats());
        }
        WorkerMsg::Ping { reply } => {
            let _ = reply.send(());
        }
        WorkerMsg::Spawn(task) => {
            deno_core::unsync::spawn(task());
        }
    }
}

impl Worker {
    /// Queues `dispatch` on `deployment`'s isolate, starting one if needed.
    fn dispatch(&self, deployment: &Arc<Deployment>, dispatch: Dispatch) {
        let (slot, started) = self.slot_for(deployment);
        slot.dispatch(dispatch);
        if started {
            self.enforce_budget(&deployment.tenant);
        }
    }

    /// The live isolate of this exact deployment, or a new one (then `true`).
    fn slot_for(&self, deployment: &Arc<Deployment>) -> (Rc<TenantSlot>, bool) {
        // A live slot is the one its tenant maps to (a slot leaves the map
        // only retired), and it holds its deployment, so that address
        // cannot have been reused for another.
        if let Some(slot) = self.last.borrow().upgrade()
            && Arc::ptr_eq(&slot.deployment, deployment)
            && slot.is_alive()
        {
            return (slot, false);
        }
        let (slot, started) = self.slot_in_map(deployment);
        *self.last.borrow_mut() = Rc::downgrade(&slot);
        (slot, started)
    }

    /// [`Worker::slot_for`], looked up by tenant.
    fn slot_in_map(&self, deployment: &Arc<Deployment>) -> (Rc<TenantSlot>, bool) {
        if let Some(slot) = self.slots.borrow().get(&deployment.tenant)
            && slot.is_alive()
            // Routes hand out the same Arc until they change: usually no
            // version strings to compare.
            && (Arc::ptr_eq(&slot.deployment, deployment)
                || slot.deployment.version == deployment.version
                // A request routed just before a deploy arrives after it:
                // serve it on the newer version instead of flapping back.
                || slot.deployment.generation > deployment.generation)
        {
            return (slot.clone(), false);
        }
        if let Some(old) = self.slots.borrow_mut().remove(&deployment.tenant) {
            // A new version (or a dead isolate): in-flight requests of the
            // old one finish there; new ones go to the new isolate.
            old.retire();
        }
        let isolate = self.take_isolate(deployment.limits.heap_bytes);
        self.cold_starts.set(self.cold_starts.get() + 1);
        let cpu = self
            .cpu_by_tenant
            .borrow_mut()
            .entry(deployment.tenant.clone())
            .or_default()
            .clone();
        let slot = TenantSlot::start(isolate, deployment.clone(), self.watch.clone(), cpu);
        self.slots
            .borrow_mut()
            .insert(deployment.tenant.clone(), slot.clone());
        (slot, true)
    }

    /// Evicts idle isolates, least recently used first, until this
    /// worker's isolates fit its memory budget. `keep` (the tenant just
    /// started) is never evicted: evicting what is about to be used would
    /// only thrash.
    fn enforce_budget(&self, keep: &str) {
        let mut slots = self.slots.borrow_mut();
        // Runs at every cold start over every isolate: no allocation here.
        let total: usize = slots
            .values()
            .filter(|s| s.is_alive())
            .map(|s| s.memory())
            .sum();
        if total <= self.config.memory_budget {
            return;
        }
        let idle = slots
            .iter()
            .filter(|(tenant, s)| tenant.as_str() != keep && s.is_alive() && s.is_idle())
            .map(|(tenant, s)| (tenant.clone(), s.memory(), s.last_used()))
            .collect();
        for (tenant, memory) in victims(idle, total, self.config.memory_budget) {
            if let Some(slot) = slots.remove(&tenant) {
                slot.retire();
                self.evictions.set(self.evictions.get() + 1);
                tracing::info!(
                    tenant = %tenant,
                    memory_mib = memory as f64 / (1024.0 * 1024.0),
                    budget_mib = self.config.memory_budget as f64 / (1024.0 * 1024.0),
                    "evicted idle isolate: worker over its memory budget"
                );
            }
        }
    }

    fn take_isolate(&self, heap: usize) -> Isolate {
        let pooled = if heap == self.config.default_heap {
            self.pool.borrow_mut().pop()
        } else {
            None
        };
        self.refill.notify_one();
        match pooled {
            Some(isolate) => isolate,
            None => {
                self.pool_misses.set(self.pool_misses.get() + 1);
                Isolate::new(heap, &self.config.client)
            }
        }
    }

    fn stats(&self) -> WorkerStats {
        WorkerStats {
            isolates: self
                .slots
                .borrow()
                .values()
                .filter(|s| s.is_alive())
                .map(|s| s.info())
                .collect(),
            pooled: self.pool.borrow().len(),
            cold_starts: self.cold_starts.get(),
            pool_misses: self.pool_misses.get(),
            evictions: self.evictions.get(),
            memory_budget: self.config.memory_budget,
            cpu_by_tenant: self
                .cpu_by_tenant
                .borrow()
                .iter()
                .map(|(t, c)| (t.clone(), c.get()))
                .collect(),
        }
    }
}

/// Keeps the pool topped up, one isolate at a time, yielding in between so
/// requests are never stuck behind a batch of snapshot deserializations.
async fn refill_pool(worker: Rc<Worker>) {
    loop {
        while worker.pool.borrow().len() < worker.config.pool_target {
            // The cold start that emptied the slot goes first.
            after_pending_work().await;
            let isolate = Isolate::new(worker.config.default_heap, &worker.config.client);
            worker.pool.borrow_mut().push(isolate);
        }
        worker.refill.notified().await;
    }
}

/// Which idle isolates `(key, memory, last used)` to evict, least recently
/// used first, to bring `total` down to `budget`; with their memory.
fn victims<K>(
    mut idle: Vec<(K, usize, Option<Instant>)>,
    mut total: usize,
    budget: usize,
) -> Vec<(K, usize)> {
    idle.sort_by_key(|(_, _, last_used)| *last_used);
    let mut out = Vec::new();
    for (key, memory, _) in idle {
        if total <= budget {
            break;
        }
        total = total.saturating_sub(memory);
        out.push((key, memory));
    }
    out
}

/// Re-checks the memory budget periodically: isolates grow as they serve.
async fn check_budget(worker: Rc<Worker>) {
    let mut tick = tokio::time::interval(BUDGET_CHECK_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        worker.enforce_budget("");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn evicts_least_recently_used_until_under_budget() {
        let t0 = Instant::now();
        let at = |ms| Some(t0 + Duration::from_millis(ms));
        let idle = vec![("new", 4, at(30)), ("old", 4, at(10)), ("mid", 4, at(20))];
        // 16 in use (the busy rest is not a candidate), budget 9: the two
        // oldest idle isolates go, the newest stays.
        assert_eq!(victims(idle.clone(), 16, 9), [("old", 4), ("mid", 4)]);
        assert_eq!(victims(idle.clone(), 9, 9), []);
        // Never used counts as oldest.
        let idle = vec![("used", 4, at(1)), ("never", 4, None)];
        assert_eq!(victims(idle, 10, 8), [("never", 4)]);
        // Over budget with nothing idle: nothing to evict.
        assert_eq!(victims(Vec::<(&str, usize, _)>::new(), 100, 1), []);
    }
}
