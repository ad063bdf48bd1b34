//! `atoll node status`: a person's view of a node's admin endpoints.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use anyhow::{Context, bail};

/// Fetches `/tenants` and `/metrics` from `admin` and prints a summary.
/// A reader that stops early (`| head`) is not an error.
pub fn print(admin: &str) -> anyhow::Result<()> {
    match write_summary(admin, &mut std::io::stdout().lock()) {
        Err(e)
            if e.downcast_ref::<std::io::Error>()
                .is_some_and(|e| e.kind() == std::io::ErrorKind::BrokenPipe) =>
        {
            Ok(())
        }
        other => other,
    }
}

fn write_summary(admin: &str, out: &mut impl Write) -> anyhow::Result<()> {
    let addr = admin
        .trim_start_matches("http://")
        .trim_end_matches('/')
        .to_string();
    let tenants: serde_json::Value = serde_json::from_str(&get(&addr, "/tenants")?)
        .context("the admin listener returned invalid JSON for /tenants")?;
    let metrics = get(&addr, "/metrics")?;

    let total = |name: &str| -> f64 {
        metrics
            .lines()
            .filter(|l| l.starts_with(name) && !l.starts_with('#'))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum::<f64>()
            // An empty float sum is -0.0, which would print as "-0".
            + 0.0
    };
    writeln!(out, "node {addr}")?;
    writeln!(
        out,
        "  requests {}   unrouted {}   rejected {}   cold starts {}   pool misses {}   limit terminations {}",
        total("atoll_requests_total"),
        total("atoll_unrouted_requests_total"),
        total("atoll_rejected_requests_total"),
        total("atoll_cold_starts_total"),
        total("atoll_pool_misses_total"),
        total("atoll_limit_terminations_total"),
    )?;
    writeln!(
        out,
        "  isolates live {}   pooled {}   evicted {}   isolate memory {:.1} of {:.0} MiB   resident memory {:.1} MiB",
        total("atoll_isolates{state=\"live\"}"),
        total("atoll_isolates{state=\"pooled\"}"),
        total("atoll_isolates_evicted_total"),
        total("atoll_isolate_memory_bytes") / 1048576.0,
        total("atoll_isolate_memory_budget_bytes") / 1048576.0,
        total("process_resident_memory_bytes") / 1048576.0
    )?;
    let empty = Vec::new();
    writeln!(out)?;
    writeln!(
        out,
        "  {:<24} {:<18} {:>8} {:>9} {:>9} {:>10} {:>12}",
        "TENANT", "VERSION", "ISOLATES", "MEM MiB", "REQUESTS", "CPU ms", "LAST REQ s"
    )?;
    for t in tenants["tenants"].as_array().unwrap_or(&empty) {
        let last = t["last_request_seconds_ago"]
            .as_f64()
            .map_or_else(|| "-".to_string(), |s| format!("{s:.1}"));
        writeln!(
            out,
            "  {:<24} {:<18} {:>8} {:>9.1} {:>9} {:>10.1} {:>12}",
            t["tenant"].as_str().unwrap_or("?"),
            t["version"].as_str().unwrap_or("-"),
            t["isolates"].as_u64().unwrap_or(0),
            t["memory_bytes"].as_f64().unwrap_or(0.0) / 1048576.0,
            t["requests"].as_u64().unwrap_or(0),
            t["cpu_ms"].as_f64().unwrap_or(0.0),
            last,
        )?;
    }
    let isolates = tenants["isolates"].as_array().unwrap_or(&empty);
    writeln!(out)?;
    writeln!(
        out,
        "  {:<24} {:<18} {:>9} {:>9} {:>9} {:>7} {:>10} {:>9}",
        "TENANT", "VERSION", "HEAP MiB", "MEM MiB", "IN FLIGHT", "QUEUED", "CPU ms", "IDLE s"
    )?;
    for i in isolates {
        writeln!(
            out,
            "  {:<24} {:<18} {:>9.1} {:>9.1} {:>9} {:>7} {:>10.1} {:>9.1}",
            i["tenant"].as_str().unwrap_or("?"),
            i["version"].as_str().unwrap_or("?"),
            i["heap_used_bytes"].as_f64().unwrap_or(0.0) / 1048576.0,
            i["memory_bytes"].as_f64().unwrap_or(0.0) / 1048576.0,
            i["in_flight"].as_u64().unwrap_or(0),
            i["queued"].as_u64().unwrap_or(0),
            i["cpu_ms"].as_f64().unwrap_or(0.0),
            i["idle_seconds"].as_f64().unwrap_or(0.0),
        )?;
    }
    if isolates.is_empty() {
        writeln!(out, "  (no live isolates)")?;
    }
    Ok(())
}

/// A minimal HTTP/1.1 GET; the admin listener answers with a fixed-length body.
fn get(addr: &str, path: &str) -> anyhow::Result<String> {
    let mut stream = TcpStream::connect(addr).with_context(|| {
        format!(
            "cannot reach the node's admin listener at {addr} (is the node running? try --admin)"
        )
    })?;
    stream.set_read_timeout(Some(Duration::from_secs(10)))?;
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nhost: {addr}\r\nconnection: close\r\n\r\n"
    )?;
    let mut raw = Vec::new();
    stream
        .read_to_end(&mut raw)
        .with_context(|| format!("reading {path} from {addr}"))?;
    let text = String::from_utf8_lossy(&raw);
    let Some((head, body)) = text.split_once("\r\n\r\n") else {
        bail!("{addr}{path}: not an HTTP response");
    };
    if !head.starts_with("HTTP/1.1 200") {
        bail!(
            "{addr}{path}: {}",
            head.lines().next().unwrap_or("no status line")
        );
    }
    Ok(body.to_string())
}
