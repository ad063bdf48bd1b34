//! Cold start and idle-isolate memory of the isolate runtime.
//!
//! Cold start: a never-seen tenant's first request, in process — taking an
//! isolate from the pool (or deserializing one from the snapshot when the
//! pool is empty), evaluating the tenant's module, running `fetch` and
//! returning the response. Idle memory: RSS growth per tenant isolate that
//! has served one request and sits idle.
//!
//! Run: `cargo bench --bench cold_start` (release build).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use atoll_protocol::{Bundle, Module, ModuleKind};
use atoll_runtime::{
    Deployment, HttpRequest, Limits, OutgoingBody, RequestBody, Runtime, RuntimeConfig,
};

// The allocator the `atoll` binary uses, so memory and timings match it.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

const HANDLER: &str = r#"
const started = Date.now();
export default {
  fetch(request) {
    return new Response(`hello from ${new URL(request.url).hostname} ${started > 0}`);
  },
};
"#;

fn bundle(tenant: usize) -> Arc<Bundle> {
    let mut modules = BTreeMap::new();
    // Distinct code per tenant, so nothing is shared by accident.
    modules.insert(
        "file:///worker.js".to_string(),
        Module {
            kind: ModuleKind::Js,
            code: format!("{HANDLER}\n// tenant {tenant}\n"),
            source_map: None,
        },
    );
    Arc::new(Bundle::new("file:///worker.js".into(), modules).expect("bundle"))
}

fn request(tenant: usize) -> HttpRequest {
    HttpRequest {
        received: std::time::Instant::now(),
        request_id: atoll_runtime::RequestId::from_u64(tenant as u64),
        method: http::Method::GET,
        url: format!("http://t{tenant}.example/"),
        headers: Default::default(),
        body: RequestBody::Empty,
        cpu: Default::default(),
    }
}

/// Times `tenant`'s first request from the worker thread, where the node
/// serves the connection that carries it.
async fn first_request(rt: &Arc<Runtime>, tenant: usize) -> Duration {
    let dep = Arc::new(Deployment::new(
        format!("t{tenant}"),
        bundle(tenant),
        BTreeMap::new(),
        Limits::default(),
    ));
    let (tx, rx) = tokio::sync::oneshot::channel();
    let on_worker = rt.clone();
    rt.spawn_on_worker(move || async move {
        let t0 = Instant::now();
        let resp = on_worker
            .dispatch(&dep, request(tenant))
            .await
            .expect("dispatch");
        let elapsed = t0.elapsed();
        assert_eq!(resp.status, 200);
        match resp.body {
            OutgoingBody::Full(b) => assert!(b.starts_with(b"hello from")),
            _ => panic!("expected a full body"),
        }
        let _ = tx.send(elapsed);
    });
    rx.await.expect("the request ran")
}

/// A one-thread runtime keeping `pool` pre-booted isolates.
fn runtime(pool: usize) -> Arc<Runtime> {
    Arc::new(
        Runtime::start(RuntimeConfig {
            threads: 1,
            pool_per_thread: pool,
            ..RuntimeConfig::default()
        })
        .expect("runtime"),
    )
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let idx = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[idx]
}

fn report(name: &str, mut samples: Vec<Duration>) {
    samples.sort();
    let ms = |d: Duration| d.as_secs_f64() * 1e3;
    println!(
        "{name:<34} n={:<4} p50={:>7.3} ms  p99={:>7.3} ms  min={:>7.3} ms  max={:>7.3} ms",
        samples.len(),
        ms(percentile(&samples, 0.50)),
        ms(percentile(&samples, 0.99)),
        ms(samples[0]),
        ms(samples[samples.len() - 1]),
    );
}

fn rss_bytes() -> usize {
    let statm = std::fs::read_to_string("/proc/self/statm").unwrap_or_default();
    let pages: usize = statm
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    pages * 4096
}

fn main() {
    let samples: usize = std::env::var("ATOLL_BENCH_N")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(400);
    let tokio_rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .expect("tokio");
    tokio_rt.block_on(async move {
        let rt = runtime(4);
        tokio::time::sleep(Duration::from_millis(500)).await; // pool filled
        // 1. Idle memory: RSS growth per additional idle tenant isolate,
        //    measured first, on a fresh runtime: once isolates have come and
        //    gone, new ones reuse their freed pages and hide the growth.
        let idle: usize = 200;
        let base_tenant = 200_000;
        // Warm up allocator/arena growth with a first batch that is not measured.
        for t in 0..20 {
            first_request(&rt, base_tenant + t).await;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
        let before = rss_bytes();
        for t in 20..20 + idle {
            first_request(&rt, base_tenant + t).await;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
        let after = rss_bytes();
        let stats = rt.stats().await;
        let live: usize = stats.iter().map(|s| s.isolates.len()).sum();
        let heap: usize = stats
            .iter()
            .flat_map(|s| s.isolates.iter())
            .map(|i| i.heap_used)
            .sum();
        let physical: usize = stats
            .iter()
            .flat_map(|s| s.isolates.iter())
            .map(|i| i.memory)
            .sum();
        println!(
            "idle tenant isolate                RSS {:.2} MiB each ({} isolates, +{:.1} MiB); V8 heap used {:.2} MiB, physical {:.2} MiB each",
            (after.saturating_sub(before)) as f64 / idle as f64 / 1048576.0,
            idle,
            (after.saturating_sub(before)) as f64 / 1048576.0,
            heap as f64 / live.max(1) as f64 / 1048576.0,
            physical as f64 / live.max(1) as f64 / 1048576.0,
        );

        // 2. Pool hit: new tenants arrive 25 ms apart, so the pool (refilled on
        //    the same worker thread, ~10-20 ms per isolate) keeps up.
        tokio::time::sleep(Duration::from_millis(500)).await; // pool refilled
        let mut pooled = Vec::with_capacity(samples);
        for t in 0..samples {
            pooled.push(first_request(&rt, t).await);
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        report("cold start, isolate from pool", pooled);

        // 3. Pool miss: no pool, every cold start deserializes the snapshot.
        let rt_nopool = runtime(0);
        let mut inline = Vec::with_capacity(samples);
        for t in 0..samples {
            inline.push(first_request(&rt_nopool, 100_000 + t).await);
        }
        report("cold start, isolate from snapshot", inline);
        drop(rt_nopool);
    });
}
