//! `atoll node --config`: a node built from its config file.

use crate::harness::{
    Dev, ca_and_leaf, client, get_status, get_text, run_to_exit, single_script_config,
};

const CONFIG: &str = r#"
[node]
threads = 2

[[listen]]
addr = "127.0.0.1:0"

[admin]
addr = "127.0.0.1:0"

[limits]
cpu_ms = 200

[[scripts]]
name = "site"
entry = "site.js"

[[scripts]]
name = "api"
entry = "api/main.ts"
vars = { VERSION = "v2" }

[[routes]]
pattern = "*.example.test"
script = "site"

[[routes]]
pattern = "www.example.test/api"
script = "api"

[[routes]]
pattern = "api.example.test"
script = "api"
"#;

#[tokio::test]
async fn node_serves_scripts_by_route_from_its_config() {
    let node = Dev::start_node(&[
        ("node.toml", CONFIG),
        (
            "site.js",
            "export default { fetch: (r) => new Response('site ' + new URL(r.url).pathname) };\n",
        ),
        (
            "api/main.ts",
            "export default { fetch: (_r: Request, env: { VERSION: string }) => Response.json({ api: env.VERSION }) };\n",
        ),
    ]);
    let c = client();
    let get = |host: &'static str, path: &'static str| {
        let c = c.clone();
        let url = node.url(path);
        async move {
            let resp = c
                .get(url)
                .header("host", host)
                .send()
                .await
                .expect("request");
            (resp.status().as_u16(), resp.text().await.expect("text"))
        }
    };
    assert_eq!(get("www.example.test", "/").await, (200, "site /".into()));
    assert_eq!(
        get("www.example.test", "/api/x").await,
        (200, r#"{"api":"v2"}"#.into())
    );
    assert_eq!(
        get("blog.example.test", "/api").await,
        (200, "site /api".into())
    );
    // An exact host beats the wildcard that also matches it.
    assert_eq!(
        get("api.example.test", "/").await,
        (200, r#"{"api":"v2"}"#.into())
    );
    let (status, text) = get("other.test", "/nope").await;
    assert_eq!(status, 404);
    assert!(
        text.contains("other.test") && text.contains("/nope"),
        "{text}"
    );
}

#[test]
fn a_malformed_config_is_refused_with_file_line_and_key() {
    let out = run_to_exit(
        &[(
            "node.toml",
            "[[listen]]\naddr = \"127.0.0.1:0\"\n\n[limits]\ncpu_ms = \"lots\"\n",
        )],
        &["node", "--config", "node.toml"],
    );
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("node.toml:5:"), "{stderr}");
    assert!(stderr.contains("cpu_ms"), "{stderr}");
    assert!(
        !String::from_utf8_lossy(&out.stdout).contains("listening"),
        "a bad config must not start listening"
    );

    let out = run_to_exit(
        &[(
            "node.toml",
            "[[listen]]\naddr = \"127.0.0.1:0\"\n\n[[routes]]\npattern = \"a.test\"\nscript = \"ghost\"\n",
        )],
        &["node", "--config", "node.toml"],
    );
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("node.toml:6:") && stderr.contains("routes.script"),
        "{stderr}"
    );

    let out = run_to_exit(&[], &["node", "--config", "missing.toml"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("missing.toml"));
}

#[tokio::test]
async fn admin_listener_reports_health_metrics_and_tenants() {
    let node = Dev::start_node(&[
        ("node.toml", CONFIG),
        (
            "site.js",
            "export default { fetch: () => new Response('site') };\n",
        ),
        (
            "api/main.ts",
            "export default { fetch: () => new Response('api') };\n",
        ),
    ]);
    let admin = node.admin().await;
    let c = client();
    let get = |path: &str| get_status(&c, format!("{admin}{path}"));
    assert_eq!(get("/healthz").await, (200, "ok\n".into()));
    assert_eq!(get("/readyz").await.0, 200);

    let hit = || {
        let c = c.clone();
        let url = node.url("/");
        async move {
            c.get(url)
                .header("host", "www.example.test")
                .send()
                .await
                .expect("request");
        }
    };
    hit().await;
    let (_, metrics) = get("/metrics").await;
    assert!(
        metrics.contains("atoll_requests_total{tenant=\"site\",status=\"200\"} 1"),
        "{metrics}"
    );
    assert!(metrics.contains("atoll_cold_starts_total 1"), "{metrics}");
    assert!(
        metrics.contains("atoll_isolates{state=\"live\"} 1"),
        "{metrics}"
    );
    assert!(metrics.contains("# TYPE atoll_request_duration_seconds histogram"));
    hit().await;
    let (_, metrics) = get("/metrics").await;
    assert!(
        metrics.contains("atoll_requests_total{tenant=\"site\",status=\"200\"} 2"),
        "counter must move: {metrics}"
    );
    assert!(
        metrics.contains("atoll_cold_starts_total 1"),
        "no second cold start"
    );

    let (status, tenants) = get("/tenants").await;
    assert_eq!(status, 200);
    let v: serde_json::Value = serde_json::from_str(&tenants).expect("json");
    let isolates = v["isolates"].as_array().expect("array");
    assert_eq!(isolates.len(), 1, "{tenants}");
    assert_eq!(isolates[0]["tenant"], "site");
    assert!(isolates[0]["heap_used_bytes"].as_u64().expect("bytes") > 0);
    // Per tenant, with or without a live isolate.
    let by_name = |name: &str| {
        v["tenants"]
            .as_array()
            .expect("tenants")
            .iter()
            .find(|t| t["tenant"] == name)
            .unwrap_or_else(|| panic!("no {name} in {tenants}"))
            .clone()
    };
    let site = by_name("site");
    assert_eq!(site["isolates"], 1, "{site}");
    assert_eq!(site["requests"], 2, "{site}");
    assert!(site["memory_bytes"].as_u64().expect("bytes") > 0, "{site}");
    assert!(
        site["version"].as_str().is_some_and(|v| !v.is_empty()),
        "{site}"
    );
    let ago = site["last_request_seconds_ago"].as_f64().expect("seconds");
    assert!((0.0..60.0).contains(&ago), "{site}");
    let api = by_name("api");
    assert_eq!(api["isolates"], 0, "{api}");
    assert_eq!(api["requests"], 0, "{api}");
    assert!(api["last_request_seconds_ago"].is_null(), "{api}");

    // The same for a person.
    let out = run_to_exit(&[], &["node", "status", "--admin", &admin]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout} {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("requests 2"), "{stdout}");
    assert!(stdout.contains("by status: 200 2 "), "{stdout}");
    // The per-tenant request table: statuses and latency percentiles.
    let site_row = stdout
        .lines()
        .filter(|l| l.trim_start().starts_with("site "))
        .find(|l| l.contains("200 2"))
        .unwrap_or_else(|| panic!("no request row for site: {stdout}"));
    assert!(site_row.contains("<= "), "{site_row}");
    // The tenant without an isolate is listed too.
    assert!(
        stdout.lines().any(|l| l.trim_start().starts_with("api ")),
        "{stdout}"
    );
    let out = run_to_exit(&[], &["node", "status", "--admin", "127.0.0.1:1"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("cannot reach"));
}

#[tokio::test]
async fn https_picks_the_certificate_by_sni_and_offers_http2() {
    let (ca_a, cert_a, key_a) = ca_and_leaf("a.example.test");
    let (ca_b, cert_b, key_b) = ca_and_leaf("b.example.test");
    let config = r#"
[[listen]]
addr = "127.0.0.1:0"
tls = true

[admin]
addr = "127.0.0.1:0"

[[certificates]]
hosts = ["a.example.test"]
cert = "a.pem"
key = "a-key.pem"

[[certificates]]
hosts = ["b.example.test"]
cert = "b.pem"
key = "b-key.pem"

[[scripts]]
name = "a"
entry = "a.js"

[[scripts]]
name = "b"
entry = "b.js"

[[routes]]
pattern = "a.example.test"
script = "a"

[[routes]]
pattern = "b.example.test"
script = "b"
"#;
    let node = Dev::start_node(&[
        ("node.toml", config),
        ("a.pem", &cert_a),
        ("a-key.pem", &key_a),
        ("b.pem", &cert_b),
        ("b-key.pem", &key_b),
        (
            "a.js",
            "export default { fetch: () => new Response('tenant a') };\n",
        ),
        (
            "b.js",
            "export default { fetch: () => new Response('tenant b') };\n",
        ),
    ]);
    assert!(node.base.starts_with("https://"), "{}", node.base);
    let addr = node.addr();
    let trusting = |ca: &str| {
        reqwest::Client::builder()
            .no_proxy()
            .use_rustls_tls()
            .tls_built_in_root_certs(false)
            .add_root_certificate(reqwest::Certificate::from_pem(ca.as_bytes()).expect("CA"))
            // The names resolve to the node on loopback, never to the network.
            .resolve("a.example.test", addr)
            .resolve("b.example.test", addr)
            .build()
            .expect("client")
    };
    let only_a = trusting(&ca_a);
    let only_b = trusting(&ca_b);
    let port = addr.port();

    let resp = only_a
        .get(format!("https://a.example.test:{port}/"))
        .send()
        .await
        .expect("a over TLS");
    assert_eq!(
        resp.version(),
        reqwest::Version::HTTP_2,
        "ALPN should pick h2"
    );
    assert_eq!(resp.text().await.expect("text"), "tenant a");
    let resp = only_b
        .get(format!("https://b.example.test:{port}/"))
        .send()
        .await
        .expect("b over TLS");
    assert_eq!(resp.text().await.expect("text"), "tenant b");

    // Each client trusts only its own CA: the other host's certificate fails.
    assert!(
        only_a
            .get(format!("https://b.example.test:{port}/"))
            .send()
            .await
            .is_err()
    );
    assert!(
        only_b
            .get(format!("https://a.example.test:{port}/"))
            .send()
            .await
            .is_err()
    );
}

#[tokio::test]
async fn https_without_certificates_generates_a_development_one() {
    let node = Dev::start_node(&[
        (
            "node.toml",
            "[[listen]]\naddr = \"127.0.0.1:0\"\ntls = true\n\n[admin]\naddr = \"127.0.0.1:0\"\n\n[[scripts]]\nname = \"s\"\nentry = \"s.js\"\n\n[[routes]]\npattern = \"*\"\nscript = \"s\"\n",
        ),
        (
            "s.js",
            "export default { fetch: () => new Response('dev tls') };\n",
        ),
    ]);
    let out = node.out();
    let line = out
        .lines()
        .find(|l| l.contains("generated a self-signed certificate"))
        .expect("the generated certificate is announced");
    let path = line.rsplit(": ").next().expect("path").trim();
    let pem = std::fs::read(path).expect("the certificate file exists");
    let addr = node.addr();
    let c = reqwest::Client::builder()
        .no_proxy()
        .use_rustls_tls()
        .tls_built_in_root_certs(false)
        .add_root_certificate(reqwest::Certificate::from_pem(&pem).expect("cert"))
        .resolve("localhost", addr)
        .build()
        .expect("client");
    let text = get_text(&c, &format!("https://localhost:{}/", addr.port()), None).await;
    assert_eq!(text, "dev tls");
}

#[test]
fn a_key_that_does_not_match_its_certificate_stops_the_node() {
    let (_, cert_a, _) = ca_and_leaf("a.example.test");
    let (_, _, key_b) = ca_and_leaf("b.example.test");
    let out = run_to_exit(
        &[
            (
                "node.toml",
                "[[listen]]\naddr = \"127.0.0.1:0\"\ntls = true\n\n[admin]\naddr = \"127.0.0.1:0\"\n\n[[certificates]]\nhosts = [\"a.example.test\"]\ncert = \"a.pem\"\nkey = \"wrong-key.pem\"\n",
            ),
            ("a.pem", &cert_a),
            ("wrong-key.pem", &key_b),
        ],
        &["node", "--config", "node.toml"],
    );
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("wrong-key.pem") && stderr.contains("does not match"),
        "{stderr}"
    );
    assert!(!String::from_utf8_lossy(&out.stdout).contains("listening"));
}

#[tokio::test]
async fn slow_and_idle_clients_are_dropped_after_the_head_timeout() {
    use std::time::Duration;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let node = Dev::start_node(&[
        (
            "node.toml",
            &single_script_config("head_timeout_ms = 300", "slow.js"),
        ),
        (
            "slow.js",
            // Answers after three head timeouts: a running request is not
            // a client that keeps the node waiting.
            "export default { async fetch() { await new Promise((r) => setTimeout(r, 900)); return new Response('late'); } };\n",
        ),
    ]);
    // Without the timeout these reads would wait forever; 10 s is far past
    // the limit.
    let closed_within = |mut conn: tokio::net::TcpStream| async move {
        let mut rest = Vec::new();
        tokio::time::timeout(Duration::from_secs(10), conn.read_to_end(&mut rest))
            .await
            .expect("the node should have closed the connection")
            .map(|_| String::from_utf8_lossy(&rest).into_owned())
    };

    // A head that never completes.
    let mut dribbling = tokio::net::TcpStream::connect(node.addr())
        .await
        .expect("connect");
    dribbling
        .write_all(b"GET / HTTP/1.1\r\nHost: a.test\r\n")
        .await
        .expect("write");
    let answer = closed_within(dribbling).await.unwrap_or_default();
    assert!(!answer.contains("200"), "{answer}");

    // A slow response completes; the idle connection after it is closed.
    let mut keep_alive = tokio::net::TcpStream::connect(node.addr())
        .await
        .expect("connect");
    keep_alive
        .write_all(b"GET / HTTP/1.1\r\nHost: a.test\r\n\r\n")
        .await
        .expect("write");
    let answer = closed_within(keep_alive).await.expect("read");
    assert!(
        answer.starts_with("HTTP/1.1 200") && answer.ends_with("late"),
        "{answer}"
    );

    // HTTP/2: a stream that takes three timeouts is served ...
    let h2 = reqwest::Client::builder()
        .no_proxy()
        .http2_prior_knowledge()
        .build()
        .expect("client");
    let resp = h2.get(node.url("/")).send().await.expect("h2 request");
    assert_eq!(resp.text().await.expect("text"), "late");
    // ... and a connection with no stream is shut down with a GOAWAY,
    // though its peer answers pings, then closed.
    let mut idle = tokio::net::TcpStream::connect(node.addr())
        .await
        .expect("connect");
    idle.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\0\0\0\x04\0\0\0\0\0")
        .await
        .expect("write preface");
    let frame_types = async {
        let mut types = Vec::new();
        loop {
            let mut head = [0u8; 9];
            if idle.read_exact(&mut head).await.is_err() {
                return types; // closed
            }
            let len = usize::from(head[0]) << 16 | usize::from(head[1]) << 8 | usize::from(head[2]);
            let mut payload = vec![0u8; len];
            if idle.read_exact(&mut payload).await.is_err() {
                return types;
            }
            types.push(head[3]);
            // A PING without the ACK flag: answer it, as a live peer does.
            if head[3] == 6 && head[4] & 1 == 0 {
                let mut ack = vec![0, 0, 8, 6, 1, 0, 0, 0, 0];
                ack.extend_from_slice(&payload);
                let _ = idle.write_all(&ack).await;
            }
        }
    };
    let types = tokio::time::timeout(Duration::from_secs(10), frame_types)
        .await
        .expect("the node should have closed the idle HTTP/2 connection");
    assert!(types.contains(&7), "frame types {types:?}");
}

#[tokio::test]
async fn a_slow_reader_gets_a_whole_large_response_past_the_head_timeout() {
    use std::time::Duration;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    // More than the kernel buffers on both ends hold: hyper's writes block.
    const SIZE: usize = 8 * 1024 * 1024;
    let node = Dev::start_node(&[
        (
            "node.toml",
            &single_script_config("head_timeout_ms = 300", "big.js"),
        ),
        (
            "big.js",
            &format!(
                "const body = new Uint8Array({SIZE}).fill(120);\nexport default {{ fetch() {{ return new Response(body); }} }};\n"
            ),
        ),
    ]);
    // A small receive buffer: the node's writes block on this reader.
    let socket = tokio::net::TcpSocket::new_v4().expect("socket");
    socket.set_recv_buffer_size(64 * 1024).expect("rcvbuf");
    let mut conn = socket.connect(node.addr()).await.expect("connect");
    conn.write_all(b"GET / HTTP/1.1\r\nHost: a.test\r\n\r\n")
        .await
        .expect("write");
    // Well over a second for the whole body, several head timeouts.
    let mut head = Vec::new();
    let mut body_bytes = 0usize;
    let mut chunk = vec![0u8; 64 * 1024];
    while body_bytes < SIZE {
        let n = tokio::time::timeout(Duration::from_secs(10), conn.read(&mut chunk))
            .await
            .expect("the node stopped sending")
            .expect("read");
        if n == 0 {
            break; // closed early
        }
        if body_bytes == 0 && !head.ends_with(b"\r\n\r\n") {
            head.extend_from_slice(&chunk[..n]);
            if let Some(end) = head.windows(4).position(|w| w == b"\r\n\r\n") {
                body_bytes = head.len() - end - 4;
                head.truncate(end + 4);
            }
        } else {
            body_bytes += n;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(
        head.starts_with(b"HTTP/1.1 200"),
        "{:?}",
        String::from_utf8_lossy(&head)
    );
    assert_eq!(body_bytes, SIZE, "the body was cut: {}", node.log());
}

#[tokio::test]
async fn the_request_head_limit_comes_from_the_config() {
    let config = single_script_config("max_header_kb = 4", "h.js");
    let node = Dev::start_node(&[
        ("node.toml", &config),
        (
            "h.js",
            "export default { fetch: (r) => new Response(String(r.headers.get('x-pad').length)) };\n",
        ),
    ]);
    let c = client();
    let send = |pad: usize| c.get(node.url("/")).header("x-pad", "a".repeat(pad)).send();
    // Under the 4 KiB limit: the handler sees the whole header.
    let resp = send(3 * 1024).await.expect("request");
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.text().await.expect("text"), "3072");
    // Over it, though far under the 64 KiB default: 431 from the server.
    let resp = send(6 * 1024).await.expect("request");
    assert_eq!(resp.status(), 431);
}
