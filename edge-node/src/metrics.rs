//! Request metrics kept by the node and rendered in Prometheus text format.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use atoll_runtime::WorkerStats;
use rustc_hash::FxHashMap;

/// Upper bounds (seconds) of the request latency histogram buckets.
const BUCKETS: [f64; 12] = [
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 5.0,
];

/// [`BUCKETS`] in nanoseconds: a request's latency is placed by integer
/// compares, most often by the first.
const BUCKETS_NS: [u64; BUCKETS.len()] = {
    let mut ns = [0; BUCKETS.len()];
    let mut i = 0;
    while i < BUCKETS.len() {
        ns[i] = (BUCKETS[i] * 1e9) as u64;
        i += 1;
    }
    ns
};

/// A latency histogram; `counts[i]` holds the requests that fell in bucket
/// `i` alone (made cumulative when rendered), so recording is one increment.
#[derive(Default, Clone)]
struct Histogram {
    counts: [u64; BUCKETS.len()],
    count: u64,
    sum: f64,
}

/// What is recorded for one tenant.
#[derive(Default)]
struct TenantStats {
    /// Requests by status, ordered by status: a tenant answers with few
    /// statuses, so a search of this short list beats a map on the
    /// per-request path.
    by_status: Vec<(u16, u64)>,
    latency: Histogram,
    /// When the last request recorded arrived.
    last_request: Option<Instant>,
}

/// One tenant's request totals, for `/tenants`.
#[derive(Debug, Clone)]
pub struct TenantRequests {
    /// Tenant name.
    pub tenant: String,
    /// Requests answered.
    pub requests: u64,
    /// When the last of them arrived.
    pub last_request: Option<Instant>,
}

#[derive(Default)]
struct Inner {
    /// Each tenant's stats, in the order they first appeared; a scrape
    /// sorts them (see [`Inner::tenants_by_name`]).
    tenants: Vec<(String, TenantStats)>,
    /// Where each tenant is in `tenants`.
    index: FxHashMap<String, usize>,
    /// The tenant recorded last: a thread's next request is most often
    /// for the same one, found without hashing its name.
    last: usize,
    limit_terminations: BTreeMap<(String, &'static str), u64>,
    unrouted: u64,
    /// Requests refused before routing, by status (400, 431).
    rejected: BTreeMap<u16, u64>,
}

impl Histogram {
    fn add(&mut self, other: &Histogram) {
        for (c, n) in self.counts.iter_mut().zip(other.counts) {
            *c += n;
        }
        self.count += other.count;
        self.sum += other.sum;
    }
}

impl TenantStats {
    /// The counter of requests answered with `status`.
    fn count_of(&mut self, status: u16) -> &mut u64 {
        let i = match self.by_status.binary_search_by_key(&status, |&(s, _)| s) {
            Ok(i) => i,
            Err(at) => {
                self.by_status.insert(at, (status, 0));
                at
            }
        };
        &mut self.by_status[i].1
    }
}

impl Inner {
    /// The tenants' stats, ordered by tenant name (as they are rendered).
    fn tenants_by_name(&self) -> Vec<(&String, &TenantStats)> {
        let mut tenants: Vec<_> = self.tenants.iter().map(|(t, s)| (t, s)).collect();
        tenants.sort_unstable_by(|a, b| a.0.cmp(b.0));
        tenants
    }

    /// `tenant`'s stats, added if new.
    fn tenant(&mut self, tenant: &str) -> &mut TenantStats {
        let hit = self
            .tenants
            .get(self.last)
            .is_some_and(|(name, _)| name == tenant);
        if !hit {
            self.last = match self.index.get(tenant) {
                Some(&i) => i,
                None => {
                    // After a tenant's first request the hot path allocates nothing.
                    self.tenants
                        .push((tenant.to_string(), TenantStats::default()));
                    self.index
                        .insert(tenant.to_string(), self.tenants.len() - 1);
                    self.tenants.len() - 1
                }
            };
        }
        &mut self.tenants[self.last].1
    }

    /// Adds `self`'s counts to `total`.
    fn add_to(&self, total: &mut Inner) {
        for (tenant, stats) in &self.tenants {
            let t = total.tenant(tenant);
            for &(status, n) in &stats.by_status {
                *t.count_of(status) += n;
            }
            t.latency.add(&stats.latency);
            t.last_request = t.last_request.max(stats.last_request);
        }
        for (key, n) in &self.limit_terminations {
            *total.limit_terminations.entry(key.clone()).or_default() += n;
        }
        total.unrouted += self.unrouted;
        for (status, n) in &self.rejected {
            *total.rejected.entry(*status).or_default() += n;
        }
    }
}

/// One thread's share of the counters, on its own cache lines.
#[derive(Default)]
#[repr(align(128))]
struct Shard(Mutex<Inner>);

/// Counters and histograms of one node. Every request records into the
/// shard of the thread that served it, so worker threads on other cores
/// do not contend for one lock; a scrape adds the shards up.
pub struct Metrics {
    shards: Box<[Shard]>,
}

impl Default for Metrics {
    fn default() -> Self {
        let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
        // A power of two: a thread finds its shard with a mask, not a division.
        let shards = threads.clamp(1, 64).next_power_of_two();
        Metrics {
            shards: (0..shards).map(|_| Shard::default()).collect(),
        }
    }
}

/// The number this thread was given on its first metrics update, in order.
fn thread_slot() -> usize {
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    thread_local! {
        static SLOT: usize = NEXT.fetch_add(1, Ordering::Relaxed);
    }
    SLOT.with(|slot| *slot)
}

impl Metrics {
    /// The calling thread's shard.
    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        let shard = &self.shards[thread_slot() & (self.shards.len() - 1)];
        // Plain counters: a panic mid-update cannot leave them inconsistent.
        shard.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// All shards added up.
    fn total(&self) -> Inner {
        let mut total = Inner::default();
        for shard in &self.shards {
            shard
                .0
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .add_to(&mut total);
        }
        total
    }

    /// Records a request for `tenant` that arrived at `started` and was
    /// answered `elapsed` later.
    pub fn request(&self, tenant: &str, status: u16, started: Instant, elapsed: Duration) {
        let mut m = self.lock();
        let t = m.tenant(tenant);
        *t.count_of(status) += 1;
        t.last_request = t.last_request.max(Some(started));
        let nanos = u64::try_from(elapsed.as_nanos()).unwrap_or(u64::MAX);
        let h = &mut t.latency;
        // Slower than the last bound: only in +Inf (the total count).
        if let Some(bucket) = BUCKETS_NS.iter().position(|&le| nanos <= le) {
            h.counts[bucket] += 1;
        }
        h.count += 1;
        h.sum += elapsed.as_secs_f64();
    }

    /// Each tenant's request totals.
    pub fn tenant_requests(&self) -> Vec<TenantRequests> {
        self.total()
            .tenants_by_name()
            .into_iter()
            .map(|(tenant, t)| TenantRequests {
                tenant: tenant.clone(),
                requests: t.by_status.iter().map(|&(_, n)| n).sum(),
                last_request: t.last_request,
            })
            .collect()
    }

    /// Records a request that matched no route.
    pub fn unrouted(&self) {
        self.lock().unrouted += 1;
    }

    /// Records a request refused with `status` before it could be routed.
    pub fn rejected(&self, status: u16) {
        *self.lock().rejected.entry(status).or_default() += 1;
    }

    /// Records an isolate or request ended by a limit.
    pub fn limit_termination(&self, tenant: &str, limit: &'static str) {
        *self
            .lock()
            .limit_terminations
            .entry((tenant.to_string(), limit))
            .or_default() += 1;
    }

    /// Prometheus text exposition of these metrics plus the runtime's stats.
    pub fn render(&self, workers: &[WorkerStats]) -> String {
        let m = self.total();
        let mut out = String::new();
        let _ = writeln!(
            out,
            "# HELP atoll_requests_total Requests answered, by tenant and status."
        );
        let _ = writeln!(out, "# TYPE atoll_requests_total counter");
        let tenants = m.tenants_by_name();
        for (tenant, status, n) in tenants
            .iter()
            .flat_map(|(t, stats)| stats.by_status.iter().map(move |(s, n)| (t, s, n)))
        {
            let _ = writeln!(
                out,
                "atoll_requests_total{{tenant=\"{}\",status=\"{status}\"}} {n}",
                escape(tenant)
            );
        }
        let _ = writeln!(
            out,
            "# HELP atoll_unrouted_requests_total Requests no route matched (404)."
        );
        let _ = writeln!(out, "# TYPE atoll_unrouted_requests_total counter");
        let _ = writeln!(out, "atoll_unrouted_requests_total {}", m.unrouted);
        let _ = writeln!(
            out,
            "# HELP atoll_rejected_requests_total Requests refused before routing (a bad Host, a head too large), by status."
        );
        let _ = writeln!(out, "# TYPE atoll_rejected_requests_total counter");
        for (status, n) in &m.rejected {
            let _ = writeln!(
                out,
                "atoll_rejected_requests_total{{status=\"{status}\"}} {n}"
            );
        }
        let _ = writeln!(
            out,
            "# HELP atoll_request_duration_seconds Time to the response head, by tenant."
        );
        let _ = writeln!(out, "# TYPE atoll_request_duration_seconds histogram");
        for (tenant, stats) in &tenants {
            let h = &stats.latency;
            let t = escape(tenant);
            let mut cumulative = 0;
            for (le, n) in BUCKETS.iter().zip(h.counts) {
                cumulative += n;
                let _ = writeln!(
                    out,
                    "atoll_request_duration_seconds_bucket{{tenant=\"{t}\",le=\"{le}\"}} {cumulative}"
                );
            }
            let _ = writeln!(
                out,
                "atoll_request_duration_seconds_bucket{{tenant=\"{t}\",le=\"+Inf\"}} {}",
                h.count
            );
            let _ = writeln!(
                out,
                "atoll_request_duration_seconds_sum{{tenant=\"{t}\"}} {}",
                h.sum
            );
            let _ = writeln!(
                out,
                "atoll_request_duration_seconds_count{{tenant=\"{t}\"}} {}",
                h.count
            );
        }
        let _ = writeln!(
            out,
            "# HELP atoll_limit_terminations_total Requests ended by a limit, by tenant and limit."
        );
        let _ = writeln!(out, "# TYPE atoll_limit_terminations_total counter");
        for ((tenant, limit), n) in &m.limit_terminations {
            let _ = writeln!(
                out,
                "atoll_limit_terminations_total{{tenant=\"{}\",limit=\"{limit}\"}} {n}",
                escape(tenant)
            );
        }
        drop(tenants);
        drop(m);

        let cold: u64 = workers.iter().map(|w| w.cold_starts).sum();
        let misses: u64 = workers.iter().map(|w| w.pool_misses).sum();
        let pooled: usize = workers.iter().map(|w| w.pooled).sum();
        let evicted: u64 = workers.iter().map(|w| w.evictions).sum();
        let budget: usize = workers.iter().map(|w| w.memory_budget).sum();
        let live: usize = workers.iter().map(|w| w.isolates.len()).sum();
        let _ = writeln!(
            out,
            "# HELP atoll_cold_starts_total Isolates started for a tenant."
        );
        let _ = writeln!(out, "# TYPE atoll_cold_starts_total counter");
        let _ = writeln!(out, "atoll_cold_starts_total {cold}");
        let _ = writeln!(
            out,
            "# HELP atoll_pool_misses_total Cold starts that found the pre-booted pool empty."
        );
        let _ = writeln!(out, "# TYPE atoll_pool_misses_total counter");
        let _ = writeln!(out, "atoll_pool_misses_total {misses}");
        let _ = writeln!(
            out,
            "# HELP atoll_isolates_evicted_total Idle isolates evicted to stay under the memory budget."
        );
        let _ = writeln!(out, "# TYPE atoll_isolates_evicted_total counter");
        let _ = writeln!(out, "atoll_isolates_evicted_total {evicted}");
        let _ = writeln!(out, "# HELP atoll_isolates Isolates by state.");
        let _ = writeln!(out, "# TYPE atoll_isolates gauge");
        let _ = writeln!(out, "atoll_isolates{{state=\"live\"}} {live}");
        let _ = writeln!(out, "atoll_isolates{{state=\"pooled\"}} {pooled}");
        let mut cpu: BTreeMap<&str, f64> = BTreeMap::new();
        for (tenant, used) in workers.iter().flat_map(|w| w.cpu_by_tenant.iter()) {
            *cpu.entry(tenant).or_default() += used.as_secs_f64();
        }
        let _ = writeln!(
            out,
            "# HELP atoll_cpu_seconds_total CPU time used by each tenant's isolates."
        );
        let _ = writeln!(out, "# TYPE atoll_cpu_seconds_total counter");
        for (tenant, secs) in &cpu {
            let _ = writeln!(
                out,
                "atoll_cpu_seconds_total{{tenant=\"{}\"}} {secs}",
                escape(tenant)
            );
        }
        let live_isolates: Vec<_> = workers.iter().flat_map(|w| w.isolates.iter()).collect();
        let _ = writeln!(
            out,
            "# HELP atoll_isolate_heap_bytes V8 heap in use by live isolates, by tenant."
        );
        let _ = writeln!(out, "# TYPE atoll_isolate_heap_bytes gauge");
        for i in &live_isolates {
            let _ = writeln!(
                out,
                "atoll_isolate_heap_bytes{{tenant=\"{}\"}} {}",
                escape(&i.tenant),
                i.heap_used
            );
        }
        let _ = writeln!(
            out,
            "# HELP atoll_isolate_memory_bytes Memory held by live isolates (heap pages and ArrayBuffers), by tenant."
        );
        let _ = writeln!(out, "# TYPE atoll_isolate_memory_bytes gauge");
        for i in &live_isolates {
            let _ = writeln!(
                out,
                "atoll_isolate_memory_bytes{{tenant=\"{}\"}} {}",
                escape(&i.tenant),
                i.memory
            );
        }
        let _ = writeln!(
            out,
            "# HELP atoll_isolate_memory_budget_bytes Memory live isolates may hold before idle ones are evicted."
        );
        let _ = writeln!(out, "# TYPE atoll_isolate_memory_budget_bytes gauge");
        let _ = writeln!(out, "atoll_isolate_memory_budget_bytes {budget}");
        let _ = writeln!(
            out,
            "# HELP process_resident_memory_bytes Resident memory of the node."
        );
        let _ = writeln!(out, "# TYPE process_resident_memory_bytes gauge");
        let _ = writeln!(out, "process_resident_memory_bytes {}", resident_bytes());
        out
    }
}

fn escape(label: &str) -> String {
    label
        .replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

fn resident_bytes() -> u64 {
    let statm = std::fs::read_to_string("/proc/self/statm").unwrap_or_default();
    let pages: u64 = statm
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    // SAFETY: sysconf has no preconditions.
    let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    pages * u64::try_from(page).unwrap_or(4096)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_counters_and_cumulative_buckets() {
        let m = Metrics::default();
        m.request("a\"b", 200, Instant::now(), Duration::from_micros(700));
        m.request("a\"b", 200, Instant::now(), Duration::from_millis(30));
        m.request("a\"b", 503, Instant::now(), Duration::from_millis(60));
        m.limit_termination("a\"b", "cpu");
        m.unrouted();
        m.rejected(431);
        m.rejected(431);
        let text = m.render(&[]);
        assert!(
            text.contains("atoll_requests_total{tenant=\"a\\\"b\",status=\"200\"} 2"),
            "{text}"
        );
        assert!(text.contains("atoll_requests_total{tenant=\"a\\\"b\",status=\"503\"} 1"));
        assert!(text.contains("le=\"0.001\"} 1"));
        assert!(text.contains("le=\"0.05\"} 2"));
        assert!(text.contains("le=\"+Inf\"} 3"));
        assert!(text.contains("atoll_limit_terminations_total{tenant=\"a\\\"b\",limit=\"cpu\"} 1"));
        assert!(text.contains("atoll_unrouted_requests_total 1"));
        assert!(text.contains("atoll_rejected_requests_total{status=\"431\"} 2"));
        let tenants = m.tenant_requests();
        assert_eq!(tenants.len(), 1);
        assert_eq!(tenants[0].requests, 3);
        assert!(tenants[0].last_request.is_some());
    }

    #[test]
    fn a_latency_on_a_bound_counts_in_that_bucket() {
        let m = Metrics::default();
        let now = Instant::now();
        m.request("t", 200, now, Duration::from_micros(500));
        m.request("t", 200, now, Duration::from_nanos(500_001));
        m.request("t", 200, now, Duration::from_secs(6));
        // Another tenant in between: the next request of "t" is found again.
        m.request("u", 200, now, Duration::from_millis(1));
        m.request("t", 404, now, Duration::from_millis(1));
        let text = m.render(&[]);
        for needle in [
            "atoll_request_duration_seconds_bucket{tenant=\"t\",le=\"0.0005\"} 1",
            "atoll_request_duration_seconds_bucket{tenant=\"t\",le=\"0.001\"} 3",
            "atoll_request_duration_seconds_bucket{tenant=\"t\",le=\"5\"} 3",
            "atoll_request_duration_seconds_bucket{tenant=\"t\",le=\"+Inf\"} 4",
            "atoll_requests_total{tenant=\"t\",status=\"404\"} 1",
            "atoll_requests_total{tenant=\"u\",status=\"200\"} 1",
        ] {
            assert!(text.contains(needle), "{needle} missing from:\n{text}");
        }
    }

    #[test]
    fn counts_from_many_threads_add_up() {
        let m = Metrics::default();
        let last = Instant::now();
        std::thread::scope(|scope| {
            for thread in 0..8u64 {
                let m = &m;
                scope.spawn(move || {
                    for i in 0..1000u64 {
                        let tenant = if i % 2 == 0 { "even" } else { "odd" };
                        let status = if i % 10 == 0 { 500 } else { 200 };
                        m.request(tenant, status, last, Duration::from_millis(thread + 1));
                    }
                    m.limit_termination("odd", "cpu");
                    m.unrouted();
                    m.rejected(400);
                });
            }
        });
        let text = m.render(&[]);
        for needle in [
            "atoll_requests_total{tenant=\"even\",status=\"200\"} 3200",
            "atoll_requests_total{tenant=\"even\",status=\"500\"} 800",
            "atoll_requests_total{tenant=\"odd\",status=\"200\"} 4000",
            "atoll_request_duration_seconds_count{tenant=\"odd\"} 4000",
            // 1 ms and 2 ms: two threads' worth under 2.5 ms.
            "atoll_request_duration_seconds_bucket{tenant=\"odd\",le=\"0.0025\"} 1000",
            "atoll_request_duration_seconds_bucket{tenant=\"odd\",le=\"0.01\"} 4000",
            "atoll_limit_terminations_total{tenant=\"odd\",limit=\"cpu\"} 8",
            "atoll_unrouted_requests_total 8",
            "atoll_rejected_requests_total{status=\"400\"} 8",
        ] {
            assert!(text.contains(needle), "{needle} missing from:\n{text}");
        }
        // Each tenant once, however many shards saw it.
        assert_eq!(
            text.matches("atoll_request_duration_seconds_sum{tenant=\"odd\"}")
                .count(),
            1
        );
        let mut tenants = m.tenant_requests();
        tenants.sort_by(|a, b| a.tenant.cmp(&b.tenant));
        assert_eq!(tenants.len(), 2);
        assert_eq!((tenants[0].requests, tenants[1].requests), (4000, 4000));
        assert_eq!(tenants[0].last_request, Some(last));
    }
}
