//! `atoll node --config`: a node built from its config file.

use crate::harness::{Dev, client, run_to_exit};

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
    let admin = node
        .out()
        .lines()
        .find_map(|l| l.strip_prefix("atoll node: admin on ").map(str::to_string))
        .expect("admin address printed");
    let c = client();
    let get = |path: &str| {
        let c = c.clone();
        let url = format!("{admin}{path}");
        async move {
            let resp = c.get(url).send().await.expect("admin request");
            (resp.status().as_u16(), resp.text().await.expect("text"))
        }
    };
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

    // The same for a person.
    let out = run_to_exit(&[], &["node", "status", "--admin", &admin]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout} {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("requests 2"), "{stdout}");
    assert!(stdout.contains("site"), "{stdout}");
    let out = run_to_exit(&[], &["node", "status", "--admin", "127.0.0.1:1"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("cannot reach"));
}
