//! Resource limits and the CPU-time watchdog that enforces them.
//!
//! CPU time is measured with the worker thread's CPU clock
//! (`pthread_getcpuclockid`), so time the thread spends descheduled or
//! waiting on I/O is never charged to a tenant. A single watchdog thread
//! compares each armed worker's clock with its deadline and calls
//! `terminate_execution` on the isolate that overran.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use deno_core::v8;

/// Limits applied to a tenant's requests and isolate.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// CPU time one request may use (handler plus its `waitUntil` work).
    pub cpu_per_request: Duration,
    /// CPU time the entry module's top-level evaluation may use.
    pub cpu_startup: Duration,
    /// Wall-clock time until the response head must be produced.
    pub wall_per_request: Duration,
    /// V8 heap limit of the tenant's isolate.
    pub heap_bytes: usize,
    /// Requests one isolate runs at once (including responses still
    /// streaming and `waitUntil` work); more wait in a queue.
    pub max_concurrent: usize,
    /// Requests that may wait for a free slot; beyond that they get 503.
    pub max_queued: usize,
    /// Limits on each request's outbound `fetch()` calls.
    pub fetch: atoll_js_api::FetchLimits,
}

impl Default for Limits {
    /// Workers-like defaults: 50 ms CPU, 30 s wall clock, 128 MiB heap.
    fn default() -> Self {
        Limits {
            cpu_per_request: Duration::from_millis(50),
            cpu_startup: Duration::from_millis(400),
            wall_per_request: Duration::from_secs(30),
            heap_bytes: 128 * 1024 * 1024,
            max_concurrent: 128,
            max_queued: 256,
            fetch: atoll_js_api::FetchLimits::default(),
        }
    }
}

/// Which limit ended an isolate or request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LimitKind {
    /// CPU time per request (or at startup).
    Cpu,
    /// Heap size of the isolate.
    Memory,
    /// Wall-clock time per request.
    WallClock,
    /// The isolate's concurrency limit and queue were both full.
    Concurrency,
}

impl std::fmt::Display for LimitKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            LimitKind::Cpu => "CPU time limit",
            LimitKind::Memory => "memory limit",
            LimitKind::WallClock => "wall-clock time limit",
            LimitKind::Concurrency => "concurrency limit",
        })
    }
}

/// CPU time consumed by the calling thread so far.
pub fn thread_cpu_time() -> Duration {
    clock_time(libc::CLOCK_THREAD_CPUTIME_ID)
}

/// The calling thread's CPU clock, read by a system call (0.5–0.7 µs
/// here, against 20 ns for the wall clock) only when its last reading is
/// `fresh` or more old by the wall clock. In between it answers that
/// reading plus the wall time since: one thread's CPU time cannot run ahead
/// of the wall clock, so the answer is never below the true value, and is
/// above it by at most the time the thread was preempted within `fresh`.
/// A deadline armed from it is that much more lenient. An isolate reads
/// the clock at both ends of each poll, and under load polls come every
/// few hundred microseconds: most reads are then estimates.
pub struct ThreadCpuClock {
    fresh: Duration,
    /// The last real reading and the wall time just before it.
    anchor: Option<(Instant, Duration)>,
}

impl ThreadCpuClock {
    /// A clock that reads the thread's CPU clock again once `fresh` has
    /// passed since it last did.
    pub fn new(fresh: Duration) -> ThreadCpuClock {
        ThreadCpuClock {
            fresh,
            anchor: None,
        }
    }

    /// The thread's CPU time at `wall` (a wall-clock reading just taken).
    pub fn at(&mut self, wall: Instant) -> Duration {
        if let Some((at, cpu)) = self.anchor {
            let since = wall.saturating_duration_since(at);
            if since < self.fresh {
                return cpu + since;
            }
        }
        let cpu = thread_cpu_time();
        self.anchor = Some((wall, cpu));
        cpu
    }
}

fn clock_time(clock: libc::clockid_t) -> Duration {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid out-pointer; an invalid clock id only makes
    // clock_gettime return an error, which leaves `ts` zeroed.
    unsafe { libc::clock_gettime(clock, &mut ts) };
    Duration::new(ts.tv_sec.max(0) as u64, ts.tv_nsec.max(0) as u32)
}

struct Armed {
    isolate: v8::IsolateHandle,
    fired: Arc<AtomicBool>,
    sample: Option<Interrupt>,
}

/// A V8 interrupt the watchdog requests on the armed isolate at each
/// sample that finds it within its deadline, so the isolate's thread can
/// see whose code is running and charge the CPU since the last sample.
#[derive(Clone, Copy)]
pub struct Interrupt {
    /// Runs on the isolate's thread, between two steps of its JS.
    pub callback: unsafe extern "C" fn(v8::UnsafeRawIsolatePtr, *mut std::ffi::c_void),
    /// Passed to `callback`; must stay valid for as long as the isolate
    /// lives (an interrupt runs whenever the isolate next runs JS).
    pub data: *mut std::ffi::c_void,
}

// SAFETY: the watchdog thread only hands `data` back to V8, which passes it
// to `callback` on the isolate's own thread; it never dereferences it.
unsafe impl Send for Interrupt {}

/// One worker thread's slot in the watchdog.
pub struct CpuWatch {
    clock: libc::clockid_t,
    armed: Mutex<Option<Armed>>,
    /// The armed deadline, this thread's CPU time in nanoseconds. Only the
    /// worker moves it, and only while armed: outside the lock, since it
    /// moves as every request of a batch starts. The watchdog reads it
    /// while holding `armed`, so it sees at least the value `arm` set.
    deadline_ns: AtomicU64,
    shared: Arc<Shared>,
}

struct Shared {
    slots: Mutex<Vec<Arc<CpuWatch>>>,
    /// Held by the watchdog from deciding to sleep until it waits, so a
    /// wake-up cannot slip in between.
    sleep: Mutex<()>,
    wake: Condvar,
    /// The watchdog waits on `wake` instead of sampling: arming must wake it.
    asleep: AtomicBool,
    /// Smallest configured limit ever armed, in microseconds: it sets how
    /// often the watchdog samples.
    min_budget_us: AtomicU64,
}

/// The watchdog thread; one per runtime.
#[derive(Clone)]
pub struct CpuWatchdog {
    shared: Arc<Shared>,
}

/// Bounds on how often armed workers' CPU clocks are sampled. Between
/// them the period is a tenth of the smallest budget, so an overrun is
/// caught within about 10 % of its budget. Every sample is a thread wake-up
/// that preempts a worker on a busy core: sampling no faster than that
/// keeps the watchdog's cost out of request throughput.
const SAMPLE_MIN: Duration = Duration::from_millis(1);
const SAMPLE_MAX: Duration = Duration::from_millis(10);

/// How often the watchdog samples while the smallest armed limit is `limit`.
pub fn sample_period(limit: Duration) -> Duration {
    (limit / 10).clamp(SAMPLE_MIN, SAMPLE_MAX)
}

/// Time with nothing armed at any sample before the watchdog sleeps until
/// woken. Arming is on every poll of every isolate: while workers are busy
/// the watchdog keeps ticking, so arming costs a lock, not a thread wake-up.
const IDLE_BEFORE_SLEEP: Duration = Duration::from_millis(100);

impl CpuWatchdog {
    /// Starts the watchdog thread.
    pub fn start() -> std::io::Result<Self> {
        let shared = Arc::new(Shared {
            slots: Mutex::new(Vec::new()),
            sleep: Mutex::new(()),
            wake: Condvar::new(),
            asleep: AtomicBool::new(false),
            min_budget_us: AtomicU64::new(u64::MAX),
        });
        let s = shared.clone();
        std::thread::Builder::new()
            .name("atoll-cpu-watchdog".into())
            .spawn(move || watch(s))?;
        Ok(CpuWatchdog { shared })
    }

    /// Registers the calling thread; the returned slot arms and disarms
    /// deadlines for isolates running on it.
    pub fn register_current_thread(&self) -> Arc<CpuWatch> {
        let mut clock: libc::clockid_t = 0;
        // SAFETY: pthread_self is always valid for the calling thread and
        // `clock` is a valid out-pointer.
        let rc = unsafe { libc::pthread_getcpuclockid(libc::pthread_self(), &mut clock) };
        let clock = if rc == 0 {
            clock
        } else {
            libc::CLOCK_THREAD_CPUTIME_ID
        };
        let slot = Arc::new(CpuWatch {
            clock,
            armed: Mutex::new(None),
            deadline_ns: AtomicU64::new(0),
            shared: self.shared.clone(),
        });
        lock(&self.shared.slots).push(slot.clone());
        slot
    }
}

/// `d` in nanoseconds, saturating (a CPU clock reading fits for 584 years).
fn duration_ns(d: Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // A panic while holding these locks cannot leave them inconsistent
    // (plain assignments only), so poisoning is ignored.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl CpuWatch {
    /// Terminates `isolate` if this thread's CPU clock passes `now + budget`
    /// before [`CpuWatch::disarm`]; `fired` is set when it does. `now` is
    /// this thread's CPU time, as the caller just read it; `limit` is the
    /// configured limit `budget` is what remains of, which sets how often
    /// the watchdog samples.
    pub fn arm(
        &self,
        now: Duration,
        budget: Duration,
        limit: Duration,
        isolate: v8::IsolateHandle,
        fired: Arc<AtomicBool>,
    ) {
        let limit_us = u64::try_from(limit.as_micros()).unwrap_or(u64::MAX);
        let smallest = self
            .shared
            .min_budget_us
            .fetch_min(limit_us, Ordering::Relaxed);
        self.deadline_ns
            .store(duration_ns(now + budget), Ordering::Relaxed);
        *lock(&self.armed) = Some(Armed {
            isolate,
            fired,
            sample: None,
        });
        // Pairs with the fence in `watch`: either it sees this deadline or
        // this sees that it sleeps. A smaller limit than any before also
        // wakes it, so its current (longer) pause does not overrun this one.
        std::sync::atomic::fence(Ordering::SeqCst);
        if self.shared.asleep.load(Ordering::SeqCst) || limit_us < smallest {
            let _sleeping = lock(&self.shared.sleep);
            self.shared.wake.notify_one();
        }
    }

    /// Moves the armed deadline (this thread's CPU time) to `deadline`, as
    /// when the next request of a batch starts with a budget of its own.
    pub fn rearm(&self, deadline: Duration) {
        self.deadline_ns
            .store(duration_ns(deadline), Ordering::Relaxed);
    }

    /// From now until disarmed, each sample requests `interrupt` on the
    /// armed isolate, and the deadline is enforced one sample period late:
    /// the interrupt may find the CPU since the last sample to be one
    /// request's own and move the deadline (see [`CpuWatch::extend`]).
    pub fn sample(&self, interrupt: Interrupt) {
        if let Some(a) = lock(&self.armed).as_mut() {
            a.sample = Some(interrupt);
        }
    }

    /// Moves the armed deadline `by` later, as when CPU counted against it
    /// turns out to be one request's, charged to that request's own budget.
    pub fn extend(&self, by: Duration) {
        let by = duration_ns(by);
        // Only this thread writes it: the update never retries.
        let _ = self
            .deadline_ns
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |d| {
                Some(d.saturating_add(by))
            });
    }

    /// Stops watching.
    pub fn disarm(&self) {
        lock(&self.armed).take();
    }
}

fn watch(shared: Arc<Shared>) {
    let mut idle = Duration::ZERO;
    let mut next_sample = SAMPLE_MIN;
    loop {
        {
            // A timed wait rather than a sleep: `arm` cuts it short when a
            // smaller limit appears.
            let sleeping = lock(&shared.sleep);
            let _ = shared.wake.wait_timeout(sleeping, next_sample);
        }
        let slept = next_sample;
        let period = sample_period(Duration::from_micros(
            shared.min_budget_us.load(Ordering::Relaxed),
        ));
        next_sample = period;
        let slots = lock(&shared.slots).clone();
        let mut any_armed = false;
        for slot in &slots {
            let mut armed = lock(&slot.armed);
            let Some(a) = armed.as_ref() else { continue };
            any_armed = true;
            let used = clock_time(slot.clock);
            // While sampling, the interrupt of the last sample has had a
            // period to move the deadline.
            let deadline = Duration::from_nanos(slot.deadline_ns.load(Ordering::Relaxed))
                + if a.sample.is_some() {
                    period
                } else {
                    Duration::ZERO
                };
            if used >= deadline {
                if let Some(a) = armed.take() {
                    a.fired.store(true, Ordering::SeqCst);
                    a.isolate.terminate_execution();
                }
            } else {
                if let Some(i) = a.sample {
                    // Fails only once the isolate is gone.
                    let _ = a.isolate.request_interrupt(i.callback, i.data);
                }
                // A CPU clock cannot run faster than the wall clock: the
                // deadline cannot pass before `deadline - used` from now.
                next_sample = next_sample.min((deadline - used).max(SAMPLE_MIN));
            }
        }
        idle = if any_armed {
            Duration::ZERO
        } else {
            idle + slept
        };
        if idle < IDLE_BEFORE_SLEEP {
            continue;
        }
        {
            let sleeping = lock(&shared.sleep);
            shared.asleep.store(true, Ordering::SeqCst);
            std::sync::atomic::fence(Ordering::SeqCst);
            // Re-read the slots: a worker registered since may be the one arming.
            if !lock(&shared.slots).iter().any(|s| lock(&s.armed).is_some()) {
                // Woken by an arm (or spuriously): go back to sampling for
                // a while even if that poll has already disarmed, so a run
                // of short polls wakes this thread once, not once per poll.
                let _sleeping = shared.wake.wait(sleeping);
            }
        }
        shared.asleep.store(false, Ordering::SeqCst);
        idle = Duration::ZERO;
        next_sample = SAMPLE_MIN;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn thread_cpu_clock_counts_work_not_sleep() {
        let t0 = thread_cpu_time();
        std::thread::sleep(Duration::from_millis(30));
        let slept = thread_cpu_time() - t0;
        assert!(slept < Duration::from_millis(10), "sleep charged {slept:?}");
        let t1 = thread_cpu_time();
        let mut x = 0u64;
        while thread_cpu_time() - t1 < Duration::from_millis(20) {
            x = x.wrapping_add(1);
        }
        assert!(x > 0);
        assert!(thread_cpu_time() - t1 >= Duration::from_millis(20));
    }

    #[test]
    fn cpu_clock_estimates_from_above_and_reads_again_when_stale() {
        let mut clock = ThreadCpuClock::new(Duration::from_millis(1));
        let first = clock.at(Instant::now());
        // Work for a while within the fresh period: the estimate must not
        // fall below the real clock, or deadlines armed from it would be
        // stricter than the limit.
        let spin = Instant::now();
        let mut x = 0u64;
        while spin.elapsed() < Duration::from_micros(300) {
            x = x.wrapping_add(1);
        }
        assert!(x > 0);
        let real = thread_cpu_time();
        let estimate = clock.at(Instant::now());
        assert!(
            estimate >= real,
            "estimate {estimate:?} below real {real:?}"
        );
        // Asleep past the fresh period: no CPU used, and the clock reads
        // the real value again instead of adding the sleep.
        let asleep = Instant::now();
        std::thread::sleep(Duration::from_millis(5));
        let after = clock.at(Instant::now());
        assert!(
            after < estimate + asleep.elapsed() - Duration::from_millis(2),
            "{after:?} counted the sleep after {estimate:?}"
        );
        assert!(after >= first);
    }
}
