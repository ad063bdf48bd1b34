//! Isolate lifecycle on a real node: eviction under the memory budget,
//! the per-isolate concurrency limit, and warming on the TLS ClientHello.

use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::harness::{
    Dev, ca_and_leaf, client, get_status, get_text, run_to_exit, single_script_config,
};

/// GETs `path` on `node` with `host`; returns status and body.
async fn get(c: &reqwest::Client, node: &Dev, host: &str, path: &str) -> (u16, String) {
    let resp = c
        .get(node.url(path))
        .header("host", host)
        .send()
        .await
        .expect("request");
    (resp.status().as_u16(), resp.text().await.expect("text"))
}

/// The admin listener's `path` as text.
async fn admin(c: &reqwest::Client, node: &Dev, path: &str) -> String {
    get_text(c, &format!("{}{path}", node.admin().await), None).await
}

/// Live isolates from `/tenants`.
async fn isolates(c: &reqwest::Client, node: &Dev) -> Vec<serde_json::Value> {
    let v: serde_json::Value =
        serde_json::from_str(&admin(c, node, "/tenants").await).expect("json");
    v["isolates"].as_array().cloned().unwrap_or_default()
}

/// Polls `/tenants` until `pred` holds for some isolate of `tenant`.
async fn wait_for_isolate(
    c: &reqwest::Client,
    node: &Dev,
    tenant: &str,
    pred: impl Fn(&serde_json::Value) -> bool,
) {
    let started = Instant::now();
    loop {
        if isolates(c, node)
            .await
            .iter()
            .any(|i| i["tenant"] == tenant && pred(i))
        {
            return;
        }
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "{tenant}'s isolate never reached the expected state: {:?}",
            isolates(c, node).await
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The value of metric line `name` (exact, labels included).
fn metric(text: &str, name: &str) -> f64 {
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
        .unwrap_or_else(|| panic!("no metric {name} in:\n{text}"))
}

/// Counts requests per isolate and holds a few MiB, so two isolates do not
/// fit a 1 MiB budget.
const COUNTER: &str = r#"
let served = 0;
const ballast = Array.from({ length: 100000 }, (_, i) => "entry " + i);
export default {
  async fetch(req) {
    if (new URL(req.url).pathname === "/slow") {
      await new Promise((r) => setTimeout(r, 1500));
    }
    served += 1;
    return new Response(`${served} ${ballast.length}`);
  },
};
"#;

#[tokio::test]
async fn idle_isolates_are_evicted_over_the_memory_budget_and_restart_cleanly() {
    let node = Dev::start_node(&[
        (
            "node.toml",
            r#"
[node]
threads = 1
isolate_memory_mb = 1

[[listen]]
addr = "127.0.0.1:0"

[admin]
addr = "127.0.0.1:0"

[[scripts]]
name = "a"
entry = "counter.js"

[[scripts]]
name = "b"
entry = "counter.js"

[[routes]]
pattern = "a.test"
script = "a"

[[routes]]
pattern = "b.test"
script = "b"
"#,
        ),
        ("counter.js", COUNTER),
    ]);
    let c = client();
    assert_eq!(
        get(&c, &node, "a.test", "/").await,
        (200, "1 100000".into())
    );

    // b's cold start pushes the worker over budget: idle a is evicted.
    assert_eq!(
        get(&c, &node, "b.test", "/").await,
        (200, "1 100000".into())
    );
    node.wait_for_log("evicted idle isolate").await;
    let metrics = admin(&c, &node, "/metrics").await;
    assert!(metric(&metrics, "atoll_isolates_evicted_total") >= 1.0);
    assert_eq!(
        metric(&metrics, "atoll_isolate_memory_budget_bytes"),
        1048576.0
    );
    assert!(
        !isolates(&c, &node).await.iter().any(|i| i["tenant"] == "a"),
        "a must be gone"
    );

    // a comes back in a fresh isolate: its module state starts over.
    assert_eq!(
        get(&c, &node, "a.test", "/").await,
        (200, "1 100000".into())
    );
    let metrics = admin(&c, &node, "/metrics").await;
    assert_eq!(metric(&metrics, "atoll_cold_starts_total"), 3.0);

    // An isolate with a request in flight is never evicted: b's slow
    // request finishes while a (busy) and b's cold start compete.
    let slow = {
        let c = c.clone();
        let url = node.url("/slow");
        tokio::spawn(async move {
            let resp = c
                .get(url)
                .header("host", "a.test")
                .send()
                .await
                .expect("slow request");
            (resp.status().as_u16(), resp.text().await.expect("text"))
        })
    };
    wait_for_isolate(&c, &node, "a", |i| i["in_flight"] == 1).await;
    let (status, _) = get(&c, &node, "b.test", "/").await;
    assert_eq!(status, 200);
    assert_eq!(slow.await.expect("join"), (200, "2 100000".into()));
}

#[tokio::test]
async fn a_full_isolate_queues_then_refuses_with_503() {
    let node = Dev::start_node(&[
        (
            "node.toml",
            r#"
[[listen]]
addr = "127.0.0.1:0"

[admin]
addr = "127.0.0.1:0"

[[scripts]]
name = "q"
entry = "slow.js"
limits = { max_concurrent = 1, max_queued = 1 }

[[routes]]
pattern = "*"
script = "q"
"#,
        ),
        (
            "slow.js",
            r#"
let n = 0;
export default {
  async fetch() {
    const mine = ++n;
    await new Promise((r) => setTimeout(r, 700));
    return new Response(`done ${mine}`);
  },
};
"#,
        ),
    ]);
    let c = client();
    let spawn_get = || {
        let c = c.clone();
        let url = node.url("/");
        tokio::spawn(async move {
            let resp = c.get(url).send().await.expect("request");
            (resp.status().as_u16(), resp.text().await.expect("text"))
        })
    };
    let first = spawn_get();
    wait_for_isolate(&c, &node, "q", |i| i["in_flight"] == 1).await;
    let second = spawn_get();
    wait_for_isolate(&c, &node, "q", |i| i["queued"] == 1).await;

    // One running, one waiting: the third is refused at once.
    let started = Instant::now();
    let resp = c.get(node.url("/")).send().await.expect("request");
    assert_eq!(resp.status().as_u16(), 503);
    assert_eq!(
        resp.headers()
            .get("retry-after")
            .map(|v| v.as_bytes().to_vec()),
        Some(b"1".to_vec())
    );
    let text = resp.text().await.expect("text");
    assert!(text.contains("too many requests"), "{text}");
    assert!(
        started.elapsed() < Duration::from_millis(600),
        "the refusal must not wait for the running request"
    );

    // The queued request runs after the first, in order.
    assert_eq!(first.await.expect("join"), (200, "done 1".into()));
    assert_eq!(second.await.expect("join"), (200, "done 2".into()));
    let metrics = admin(&c, &node, "/metrics").await;
    assert_eq!(
        metric(
            &metrics,
            "atoll_limit_terminations_total{tenant=\"q\",limit=\"concurrency\"}"
        ),
        1.0
    );
    assert!(
        node.log().contains("concurrency limit"),
        "the log names the limit"
    );
    // `atoll node status` breaks both down for a person.
    let admin_addr = node.admin().await;
    let out = run_to_exit(&[], &["node", "status", "--admin", &admin_addr]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}");
    assert!(
        stdout.contains("terminations by limit: concurrency 1"),
        "{stdout}"
    );
    assert!(
        stdout.lines().any(|l| l.trim_start().starts_with("q ")
            && l.contains("200 2, 503 1")
            && l.trim_end().ends_with("concurrency 1")),
        "{stdout}"
    );
}

#[tokio::test]
async fn a_tls_client_hello_warms_the_named_tenant_before_the_request() {
    let (ca, leaf, key) = ca_and_leaf("warm.example.test");
    let node = Dev::start_node(&[
        (
            "node.toml",
            r#"
[[listen]]
addr = "127.0.0.1:0"
tls = true

[admin]
addr = "127.0.0.1:0"

[[certificates]]
hosts = ["warm.example.test", "cold.example.test"]
cert = "leaf.pem"
key = "leaf.key"

[[scripts]]
name = "warm"
entry = "hello.js"

[[scripts]]
name = "cold"
entry = "hello.js"

[[routes]]
pattern = "warm.example.test/app"
script = "warm"

[[routes]]
pattern = "cold.example.test"
script = "cold"
"#,
        ),
        ("leaf.pem", &leaf),
        ("leaf.key", &key),
        (
            "hello.js",
            "export default { fetch: (r) => new Response('hello ' + new URL(r.url).pathname) };\n",
        ),
    ]);
    let c = client();
    let addr = node.addr();

    // Only the TLS handshake: no HTTP request yet.
    let mut roots = rustls::RootCertStore::empty();
    let mut pem = ca.as_bytes();
    for cert in rustls_pemfile::certs(&mut pem) {
        roots.add(cert.expect("CA pem")).expect("add CA");
    }
    // reqwest brings ring, the node aws-lc-rs: name the provider.
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::aws_lc_rs::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .expect("protocol versions")
    .with_root_certificates(roots)
    .with_no_client_auth();
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    let tcp = tokio::net::TcpStream::connect(addr).await.expect("connect");
    let name = rustls::pki_types::ServerName::try_from("warm.example.test").expect("name");
    let mut tls = connector.connect(name, tcp).await.expect("handshake");

    // The isolate of the script routed for that host (under any path) boots
    // before any request names it; the other tenant stays cold.
    wait_for_isolate(&c, &node, "warm", |_| true).await;
    assert!(
        !isolates(&c, &node)
            .await
            .iter()
            .any(|i| i["tenant"] == "cold"),
        "only the named host is warmed"
    );

    // The request on that connection is served by the warmed isolate.
    tls.write_all(b"GET /app/x HTTP/1.1\r\nhost: warm.example.test\r\nconnection: close\r\n\r\n")
        .await
        .expect("write");
    let mut raw = Vec::new();
    tls.read_to_end(&mut raw).await.expect("read");
    let text = String::from_utf8_lossy(&raw);
    assert!(text.starts_with("HTTP/1.1 200"), "{text}");
    assert!(text.ends_with("hello /app/x"), "{text}");
    let metrics = admin(&c, &node, "/metrics").await;
    assert_eq!(metric(&metrics, "atoll_cold_starts_total"), 1.0);
}

#[tokio::test]
async fn json_logs_give_each_request_its_tenant_id_status_and_cpu_time() {
    let config = single_script_config("", "burn.js");
    let handler = r#"
export default {
  fetch(req) {
    console.log("burning for", new URL(req.url).pathname);
    const end = Date.now() + 20;
    while (Date.now() < end) {}
    return new Response("ok");
  },
};
"#;
    let node = Dev::spawn(
        &[("node.toml", &config), ("burn.js", handler)],
        &["node", "--config", "node.toml", "--log-format", "json"],
    );
    let (status, _) = get(&client(), &node, "app.test", "/burn").await;
    assert_eq!(status, 200);
    let log = node.wait_for_log("GET /burn 200").await;
    let lines: Vec<serde_json::Value> = log
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect();
    let request = lines
        .iter()
        .find(|l| l["target"] == "atoll::request")
        .unwrap_or_else(|| panic!("no request line in {log}"));
    let message = request["fields"]["message"].as_str().unwrap_or_default();
    assert!(message.starts_with("GET /burn 200 "), "{message}");
    assert_eq!(request["span"]["tenant"], "only", "{request}");
    let request_id = request["span"]["request_id"].as_str().unwrap_or_default();
    assert_eq!(request_id.len(), 16, "{request}");
    // The 20 ms loop shows as CPU time (less if the thread was preempted),
    // never more than the request took.
    let cpu_ms = request["fields"]["cpu_ms"].as_f64().expect("cpu_ms");
    let took_ms: f64 = message
        .rsplit(' ')
        .next()
        .and_then(|t| t.strip_suffix("ms"))
        .and_then(|t| t.parse().ok())
        .expect("duration");
    assert!(cpu_ms > 1.0 && cpu_ms <= took_ms + 0.1, "{request}");
    // The handler's console output is tagged with the same request.
    let console = lines
        .iter()
        .find(|l| l["target"] == "atoll::console")
        .unwrap_or_else(|| panic!("no console line in {log}"));
    assert_eq!(console["fields"]["message"], "burning for /burn");
    assert_eq!(console["fields"]["tenant"], "only");
    assert_eq!(console["fields"]["request_id"], request_id);

    // A later request's console line names only that request, not the
    // one that started the isolate.
    let (status, _) = get(&client(), &node, "app.test", "/again").await;
    assert_eq!(status, 200);
    let log = node.wait_for_log("GET /again 200").await;
    let again = log
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .find(|l| l["fields"]["message"] == "burning for /again")
        .unwrap_or_else(|| panic!("no console line for /again in {log}"));
    let own_id = again["fields"]["request_id"].clone();
    assert_ne!(own_id, request_id, "{again}");
    for span in again["spans"].as_array().into_iter().flatten() {
        if let Some(id) = span.get("request_id") {
            assert_eq!(*id, own_id, "{again}");
        }
    }
}

#[tokio::test]
async fn sigint_drains_the_node_refusing_new_connections_meanwhile() {
    let config = single_script_config("", "slow.js");
    let handler = r#"
export default {
  async fetch() {
    console.log("slow request started");
    // Long enough for the checks made while it drains, on a loaded machine.
    await new Promise((r) => setTimeout(r, 4000));
    return new Response("finished");
  },
};
"#;
    let mut node = Dev::start_node(&[("node.toml", &config), ("slow.js", handler)]);
    let url = node.url("/");
    let in_flight = tokio::spawn(async move {
        let resp = client().get(url).send().await.expect("request");
        (resp.status(), resp.text().await.expect("text"))
    });
    node.wait_for_log("slow request started").await;
    let admin_url = node.admin().await;
    let c = client();
    let status = |path: &str| get_status(&c, format!("{admin_url}{path}"));
    assert_eq!(status("/readyz").await, (200, "ready\n".to_string()));
    node.signal("INT");
    node.wait_for_log("shutting down: finishing in-flight requests")
        .await;
    // Draining: the request in flight goes on, new connections are refused,
    // and the admin listener says the node is alive but not ready.
    let refused = tokio::net::TcpStream::connect(node.addr()).await;
    assert!(
        refused.is_err(),
        "a new connection was accepted while draining"
    );
    let (code, text) = status("/readyz").await;
    assert_eq!(code, 503, "{text}");
    assert!(text.contains("draining"), "{text}");
    assert_eq!(status("/healthz").await, (200, "ok\n".to_string()));
    let admin_addr = admin_url.clone();
    let out = tokio::task::spawn_blocking(move || {
        run_to_exit(&[], &["node", "status", "--admin", &admin_addr])
    })
    .await
    .expect("join");
    let summary = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{summary}");
    assert!(
        summary
            .lines()
            .next()
            .is_some_and(|l| l.contains("not ready: draining")),
        "{summary}"
    );
    let (code, text) = in_flight.await.expect("join");
    assert_eq!((code.as_u16(), text.as_str()), (200, "finished"));
    let exit = tokio::task::spawn_blocking(move || node.wait_exit())
        .await
        .expect("join");
    assert!(exit.success(), "exit status {exit}");
}

#[tokio::test]
async fn a_worker_thread_held_by_a_script_makes_the_node_not_ready_until_it_is_freed() {
    // One worker thread, and a CPU limit long enough for /readyz to see
    // the thread held.
    let config = single_script_config("cpu_ms = 4000", "spin.js")
        .replace("[[listen]]", "[node]\nthreads = 1\n\n[[listen]]");
    let handler = r#"
export default {
  fetch(request) {
    if (new URL(request.url).pathname === "/spin") {
      console.log("spinning");
      for (;;) {}
    }
    return new Response("ok");
  },
};
"#;
    let node = Dev::start_node(&[("node.toml", &config), ("spin.js", handler)]);
    let c = client();
    assert_eq!(get(&c, &node, "example.com", "/").await.0, 200);
    let admin_url = node.admin().await;
    let readyz_url = format!("{admin_url}/readyz");
    let readyz = || get_status(&c, readyz_url.as_str());
    assert_eq!(readyz().await.0, 200);

    let spin_url = node.url("/spin");
    let spinning = tokio::spawn(async move {
        client()
            .get(spin_url)
            .send()
            .await
            .expect("request")
            .status()
    });
    node.wait_for_log("spinning").await;
    let (code, text) = readyz().await;
    assert_eq!(code, 503, "{text}");
    assert!(text.contains("worker thread 0 did not answer"), "{text}");
    // The CPU limit ends the script; the thread serves again.
    assert_eq!(spinning.await.expect("join").as_u16(), 503);
    assert_eq!(readyz().await, (200, "ready\n".to_string()));
    assert_eq!(
        get(&c, &node, "example.com", "/").await,
        (200, "ok".to_string())
    );
}
