//! The operator's listener: health, readiness, metrics and tenants.

use std::convert::Infallible;
use std::future::Future;
use std::sync::Arc;

use http::{Request, Response, StatusCode};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpListener;

use crate::body::{ResponseBody, full};
use crate::server::EdgeNode;

/// Serves `/healthz`, `/readyz`, `/metrics` (Prometheus text) and `/tenants`
/// (JSON) for `node` on `listener` until `shutdown` resolves.
pub async fn serve_admin(
    node: Arc<EdgeNode>,
    listener: TcpListener,
    shutdown: impl Future<Output = ()>,
) -> std::io::Result<()> {
    tokio::pin!(shutdown);
    loop {
        let (stream, _) = tokio::select! {
            _ = &mut shutdown => return Ok(()),
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    tracing::warn!("admin accept failed: {e}");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let node = node.clone();
        tokio::spawn(async move {
            let service = service_fn(move |req| {
                let node = node.clone();
                async move { Ok::<_, Infallible>(answer(&node, req).await) }
            });
            let mut builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
            builder
                .http1()
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(std::time::Duration::from_secs(10));
            let _ = builder
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}

/// One entry per tenant the node routes to or has served, live isolate or
/// not: its version, live isolates and their memory, requests, total CPU
/// (ended isolates included) and how long ago its last request came.
fn tenant_view(node: &EdgeNode, stats: &[atoll_runtime::WorkerStats]) -> Vec<serde_json::Value> {
    #[derive(Default)]
    struct Tenant {
        version: Option<String>,
        isolates: usize,
        memory: usize,
        in_flight: usize,
        requests: u64,
        cpu: std::time::Duration,
        last_request: Option<std::time::Instant>,
    }
    let mut tenants: std::collections::BTreeMap<String, Tenant> = Default::default();
    for d in node.routes().deployments() {
        tenants.entry(d.tenant.clone()).or_default().version = Some(d.version.clone());
    }
    for i in stats.iter().flat_map(|w| w.isolates.iter()) {
        let t = tenants.entry(i.tenant.clone()).or_default();
        t.isolates += 1;
        t.memory += i.memory;
        t.in_flight += i.in_flight;
        t.version.get_or_insert_with(|| i.version.clone());
    }
    for (tenant, cpu) in stats.iter().flat_map(|w| w.cpu_by_tenant.iter()) {
        tenants.entry(tenant.clone()).or_default().cpu += *cpu;
    }
    for r in node.metrics().tenant_requests() {
        let t = tenants.entry(r.tenant).or_default();
        t.requests = r.requests;
        t.last_request = r.last_request;
    }
    tenants
        .into_iter()
        .map(|(tenant, t)| {
            serde_json::json!({
                "tenant": tenant,
                "version": t.version,
                "isolates": t.isolates,
                "memory_bytes": t.memory,
                "in_flight": t.in_flight,
                "requests": t.requests,
                "cpu_ms": t.cpu.as_secs_f64() * 1e3,
                "last_request_seconds_ago": t.last_request.map(|at| at.elapsed().as_secs_f64()),
            })
        })
        .collect()
}

/// The runtime's stats, or none if a worker is too busy to answer soon.
async fn stats(node: &EdgeNode) -> Vec<atoll_runtime::WorkerStats> {
    tokio::time::timeout(std::time::Duration::from_secs(5), node.runtime().stats())
        .await
        .unwrap_or_default()
}

/// How long `/readyz` waits for each worker thread to answer.
const READY_PING: std::time::Duration = std::time::Duration::from_secs(2);

/// Whether the node should get traffic: not shutting down, and every
/// worker thread turning its event loop (one held by a script, up to its
/// CPU limit, or stopped, leaves its connections unserved meanwhile).
async fn readiness(node: &EdgeNode) -> Result<(), String> {
    if node.is_draining() {
        return Err("not ready: draining (shutting down; finishing in-flight requests)\n".into());
    }
    match node.runtime().unresponsive_worker(READY_PING).await {
        None => Ok(()),
        Some(worker) => Err(format!(
            "not ready: worker thread {worker} did not answer within {} s\n",
            READY_PING.as_secs()
        )),
    }
}

async fn answer(node: &EdgeNode, req: Request<Incoming>) -> Response<ResponseBody> {
    let (status, content_type, body) = match req.uri().path() {
        "/healthz" => (StatusCode::OK, "text/plain", "ok\n".to_string()),
        "/readyz" => match readiness(node).await {
            Ok(()) => (StatusCode::OK, "text/plain", "ready\n".to_string()),
            Err(why) => (StatusCode::SERVICE_UNAVAILABLE, "text/plain", why),
        },
        "/metrics" => {
            let stats = stats(node).await;
            (
                StatusCode::OK,
                "text/plain; version=0.0.4",
                node.metrics().render(&stats),
            )
        }
        "/tenants" => {
            let stats = stats(node).await;
            let tenants = tenant_view(node, &stats);
            let isolates: Vec<serde_json::Value> = stats
                .iter()
                .flat_map(|w| w.isolates.iter())
                .map(|i| {
                    serde_json::json!({
                        "tenant": i.tenant,
                        "version": i.version,
                        "heap_used_bytes": i.heap_used,
                        "memory_bytes": i.memory,
                        "in_flight": i.in_flight,
                        "queued": i.queued,
                        "cpu_ms": i.cpu_total.as_secs_f64() * 1e3,
                        "idle_seconds": i.last_used.map(|t| t.elapsed().as_secs_f64()),
                    })
                })
                .collect();
            (
                StatusCode::OK,
                "application/json",
                serde_json::json!({ "tenants": tenants, "isolates": isolates }).to_string(),
            )
        }
        other => (
            StatusCode::NOT_FOUND,
            "text/plain",
            format!("no admin endpoint {other}; try /healthz, /readyz, /metrics, /tenants\n"),
        ),
    };
    let mut resp = Response::new(full(body));
    *resp.status_mut() = status;
    if let Ok(v) = http::HeaderValue::from_str(content_type) {
        resp.headers_mut().insert(http::header::CONTENT_TYPE, v);
    }
    resp
}
