//! `atoll node status`: a person's view of a node's admin endpoints.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use anyhow::{Context, bail};

use crate::metrics_text::{self, Sample};

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
    let ready = match fetch(&addr, "/readyz")? {
        (200, _) => "ready".to_string(),
        (_, why) => why.trim().to_string(),
    };

    let samples = metrics_text::parse(&metrics);
    let total = |name: &str| sum(&samples, name, &[]);
    writeln!(out, "node {addr}   {ready}")?;
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
        "  by status: {}   terminations by limit: {}",
        or_dash(&by_label(&samples, "atoll_requests_total", None, "status")),
        or_dash(&by_label(
            &samples,
            "atoll_limit_terminations_total",
            None,
            "limit"
        )),
    )?;
    writeln!(
        out,
        "  isolates live {}   pooled {}   evicted {}   isolate memory {:.1} of {:.0} MiB   resident memory {:.1} MiB",
        sum(&samples, "atoll_isolates", &[("state", "live")]),
        sum(&samples, "atoll_isolates", &[("state", "pooled")]),
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
    write_tenant_requests(
        &samples,
        tenants["tenants"].as_array().unwrap_or(&empty),
        out,
    )
}

/// Per tenant: requests by status, latency percentiles (as the histogram
/// bucket that holds them) and limit terminations by limit.
fn write_tenant_requests(
    samples: &[Sample],
    tenants: &[serde_json::Value],
    out: &mut impl Write,
) -> anyhow::Result<()> {
    let mut names: Vec<String> = tenants
        .iter()
        .filter_map(|t| t["tenant"].as_str().map(str::to_string))
        .collect();
    // Tenants that served requests but are no longer configured.
    for s in samples {
        if s.name == "atoll_requests_total"
            && let Some(t) = s.label("tenant")
            && !names.iter().any(|n| n == t)
        {
            names.push(t.to_string());
        }
    }
    writeln!(out)?;
    writeln!(
        out,
        "  {:<24} {:<28} {:>9} {:>9}  LIMIT TERMINATIONS",
        "TENANT", "REQUESTS BY STATUS", "P50 ms", "P99 ms"
    )?;
    for name in &names {
        let buckets: Vec<(f64, f64)> = samples
            .iter()
            .filter(|s| {
                s.name == "atoll_request_duration_seconds_bucket" && s.label("tenant") == Some(name)
            })
            .filter_map(|s| {
                let le = match s.label("le")? {
                    "+Inf" => f64::INFINITY,
                    v => v.parse().ok()?,
                };
                Some((le, s.value))
            })
            .collect();
        let pct = |q| match metrics_text::quantile_bound(&buckets, q) {
            None => "-".to_string(),
            Some(le) if le.is_infinite() => "> 5000".to_string(),
            // Whole microseconds: no float noise such as 25.000000000000004.
            Some(le) => format!("<= {}", (le * 1e6).round() / 1e3),
        };
        writeln!(
            out,
            "  {:<24} {:<28} {:>9} {:>9}  {}",
            name,
            or_dash(&by_label(
                samples,
                "atoll_requests_total",
                Some(name),
                "status"
            )),
            pct(0.5),
            pct(0.99),
            or_dash(&by_label(
                samples,
                "atoll_limit_terminations_total",
                Some(name),
                "limit"
            )),
        )?;
    }
    Ok(())
}

/// The sum of the samples named `name` that carry all of `labels`.
fn sum(samples: &[Sample], name: &str, labels: &[(&str, &str)]) -> f64 {
    samples
        .iter()
        .filter(|s| s.name == name && labels.iter().all(|(k, v)| s.label(k) == Some(*v)))
        .map(|s| s.value)
        .sum::<f64>()
        // An empty float sum is -0.0, which would print as "-0".
        + 0.0
}

/// `key value` pairs of metric `name` summed by label `key` (for one
/// tenant, or all), e.g. "200 41, 404 2".
fn by_label(samples: &[Sample], name: &str, tenant: Option<&str>, key: &str) -> String {
    let mut totals: std::collections::BTreeMap<&str, f64> = std::collections::BTreeMap::new();
    for s in samples
        .iter()
        .filter(|s| s.name == name && tenant.is_none_or(|t| s.label("tenant") == Some(t)))
    {
        if let Some(k) = s.label(key) {
            *totals.entry(k).or_default() += s.value;
        }
    }
    totals
        .iter()
        .filter(|(_, n)| **n > 0.0)
        .map(|(k, n)| format!("{k} {n}"))
        .collect::<Vec<_>>()
        .join(", ")
}

fn or_dash(s: &str) -> &str {
    if s.is_empty() { "-" } else { s }
}

/// A minimal HTTP/1.1 GET; the admin listener answers with a fixed-length body.
fn get(addr: &str, path: &str) -> anyhow::Result<String> {
    match fetch(addr, path)? {
        (200, body) => Ok(body),
        (status, _) => bail!("{addr}{path}: HTTP status {status}"),
    }
}

/// GETs `path` from the admin listener at `addr`: status and body.
fn fetch(addr: &str, path: &str) -> anyhow::Result<(u16, String)> {
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
    let status = head
        .strip_prefix("HTTP/1.1 ")
        .and_then(|rest| rest.get(..3))
        .and_then(|code| code.parse::<u16>().ok())
        .with_context(|| {
            format!(
                "{addr}{path}: not an HTTP/1.1 status line: {}",
                head.lines().next().unwrap_or("")
            )
        })?;
    Ok((status, body.to_string()))
}
