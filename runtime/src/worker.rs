//! Worker threads: each owns a tokio current-thread runtime, the isolates of
//! the tenants hashed to it, and a pool of pre-booted blank isolates.

use std::cell::RefCell;
use std::collections::HashMap;
use std::rc::Rc;
use std::sync::Arc;

use tokio::sync::{Notify, mpsc, oneshot};

use crate::deployment::Deployment;
use crate::isolate::Isolate;
use crate::limits::{CpuWatch, CpuWatchdog};
use crate::tenant::{Dispatch, IsolateInfo, TenantSlot};

/// Messages a worker thread accepts.
pub(crate) enum WorkerMsg {
    /// Run a request in the deployment's isolate (starting one if needed).
    Dispatch {
        deployment: Arc<Deployment>,
        dispatch: Dispatch,
    },
    /// Stop the tenant's isolate once its requests finish.
    Retire { tenant: String },
    /// Report live isolates.
    Stats { reply: oneshot::Sender<WorkerStats> },
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
}

struct Worker {
    slots: RefCell<HashMap<String, Rc<TenantSlot>>>,
    pool: RefCell<Vec<Isolate>>,
    pool_target: usize,
    default_heap: usize,
    watch: Arc<CpuWatch>,
    refill: Notify,
    cold_starts: std::cell::Cell<u64>,
    pool_misses: std::cell::Cell<u64>,
}

/// Spawns worker thread `index`; returns its inbox.
pub(crate) fn spawn(
    index: usize,
    pool_target: usize,
    default_heap: usize,
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
                .build()
            {
                Ok(rt) => rt,
                Err(e) => {
                    tracing::error!("worker {index} could not start its event loop: {e}");
                    return;
                }
            };
            let local = tokio::task::LocalSet::new();
            local.block_on(&rt, async move {
                let worker = Rc::new(Worker {
                    slots: RefCell::new(HashMap::new()),
                    pool: RefCell::new(Vec::new()),
                    pool_target,
                    default_heap,
                    watch: watchdog.register_current_thread(),
                    refill: Notify::new(),
                    cold_starts: Default::default(),
                    pool_misses: Default::default(),
                });
                tokio::task::spawn_local(refill_pool(worker.clone()));
                serve(worker, rx).await;
            });
        })?;
    Ok(tx)
}

async fn serve(worker: Rc<Worker>, mut rx: mpsc::UnboundedReceiver<WorkerMsg>) {
    while let Some(msg) = rx.recv().await {
        match msg {
            WorkerMsg::Dispatch {
                deployment,
                dispatch,
            } => worker.slot_for(&deployment).dispatch(dispatch),
            WorkerMsg::Retire { tenant } => {
                if let Some(slot) = worker.slots.borrow_mut().remove(&tenant) {
                    slot.retire();
                }
            }
            WorkerMsg::Stats { reply } => {
                let _ = reply.send(worker.stats());
            }
        }
    }
    // Runtime dropped: let every isolate finish what it has.
    for (_, slot) in worker.slots.borrow_mut().drain() {
        slot.retire();
    }
}

impl Worker {
    /// The live isolate of this exact deployment, or a new one.
    fn slot_for(&self, deployment: &Arc<Deployment>) -> Rc<TenantSlot> {
        if let Some(slot) = self.slots.borrow().get(&deployment.tenant)
            && slot.is_alive()
            && (slot.deployment.version == deployment.version
                // A request routed just before a deploy arrives after it:
                // serve it on the newer version instead of flapping back.
                || slot.deployment.generation > deployment.generation)
        {
            return slot.clone();
        }
        if let Some(old) = self.slots.borrow_mut().remove(&deployment.tenant) {
            // A new version (or a dead isolate): in-flight requests of the
            // old one finish there; new ones go to the new isolate.
            old.retire();
        }
        let isolate = self.take_isolate(deployment.limits.heap_bytes);
        self.cold_starts.set(self.cold_starts.get() + 1);
        let slot = TenantSlot::start(isolate, deployment.clone(), self.watch.clone());
        self.slots
            .borrow_mut()
            .insert(deployment.tenant.clone(), slot.clone());
        slot
    }

    fn take_isolate(&self, heap: usize) -> Isolate {
        let pooled = if heap == self.default_heap {
            self.pool.borrow_mut().pop()
        } else {
            None
        };
        self.refill.notify_one();
        match pooled {
            Some(isolate) => isolate,
            None => {
                self.pool_misses.set(self.pool_misses.get() + 1);
                Isolate::new(heap)
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
        }
    }
}

/// Keeps the pool topped up, one isolate at a time, yielding in between so
/// requests are never stuck behind a batch of snapshot deserializations.
async fn refill_pool(worker: Rc<Worker>) {
    loop {
        while worker.pool.borrow().len() < worker.pool_target {
            tokio::task::yield_now().await;
            let isolate = Isolate::new(worker.default_heap);
            worker.pool.borrow_mut().push(isolate);
        }
        worker.refill.notified().await;
    }
}
