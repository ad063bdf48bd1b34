//! Tenants share a process, never a JS heap.

use crate::harness::{Dev, client, get_text};

#[tokio::test]
async fn tenants_cannot_see_each_others_globals() {
    let writer = r#"
        globalThis.secret = "tenant-a-secret";
        var leaked = "var-a";
        export default { fetch() { return new Response(String(globalThis.secret)); } };
    "#;
    let reader = r#"
        export default {
          fetch() {
            return Response.json({
              secret: typeof globalThis.secret,
              leaked: typeof leaked,
              keys: Object.keys(globalThis).filter((k) => k.includes("secret") || k === "leaked"),
            });
          },
        };
    "#;
    let dev = Dev::start(
        &[("a.js", writer), ("b.js", reader)],
        // One worker thread: both isolates live on the same thread.
        &["a.local=a.js", "b.local=b.js", "--threads", "1"],
    );
    let c = client();
    let a = c
        .get(dev.url("/"))
        .header("host", "a.local")
        .send()
        .await
        .expect("request");
    assert_eq!(a.text().await.expect("text"), "tenant-a-secret");
    let b: serde_json::Value = c
        .get(dev.url("/"))
        .header("host", "b.local")
        .send()
        .await
        .expect("request")
        .json()
        .await
        .expect("json");
    assert_eq!(
        b,
        serde_json::json!({"secret": "undefined", "leaked": "undefined", "keys": []})
    );
    // An unrouted host gets a plain 404 naming it.
    let nf = c
        .get(dev.url("/x"))
        .header("host", "nobody.local")
        .send()
        .await
        .expect("request");
    assert_eq!(nf.status(), 404);
    let text = nf.text().await.expect("text");
    assert!(
        text.contains("nobody.local") && text.contains("/x"),
        "{text}"
    );
}

#[tokio::test]
async fn the_most_specific_route_wins() {
    let handler = |name: &str| {
        format!(
            "export default {{ fetch: (r) => new Response('{name} ' + new URL(r.url).pathname) }};\n"
        )
    };
    let (any, wild, exact, v2) = (
        handler("any"),
        handler("wild"),
        handler("exact"),
        handler("v2"),
    );
    let dev = Dev::start(
        &[
            ("any.js", &any),
            ("wild.js", &wild),
            ("exact.js", &exact),
            ("v2.js", &v2),
        ],
        &[
            "any.js",
            "*.example.test=wild.js",
            "api.example.test=exact.js",
            "api.example.test/v2=v2.js",
        ],
    );
    let c = client();
    for (host, path, expected) in [
        ("api.example.test", "/", "exact /"),
        ("api.example.test", "/v2/users", "v2 /v2/users"),
        ("api.example.test", "/v2x", "exact /v2x"),
        ("www.example.test", "/v2", "wild /v2"),
        ("example.test", "/", "any /"),
        ("elsewhere.test", "/a", "any /a"),
    ] {
        let text = get_text(&c, &dev.url(path), Some(host)).await;
        assert_eq!(text, expected, "{host}{path}");
    }
}

/// Connections are served on whichever worker thread has the fewest, but a
/// tenant's requests all reach its one isolate: with two threads and four
/// open connections, each tenant is reached both from its own thread and
/// from the other, and its module-level counter still counts every request
/// once, in order.
#[tokio::test]
async fn every_connection_reaches_the_tenants_one_isolate() {
    let counter = r#"
        let n = 0;
        export default { fetch() { n += 1; return new Response(String(n)); } };
    "#;
    let dev = Dev::start(
        &[("a.js", counter), ("b.js", counter)],
        &["a.local=a.js", "b.local=b.js", "--threads", "2"],
    );
    // Four clients, each with its own keep-alive connection, opened at once
    // so the node spreads them over both worker threads.
    let clients: Vec<_> = (0..4).map(|_| client()).collect();
    let url = dev.url("/");
    let first = clients.iter().map(|c| get_text(c, &url, Some("a.local")));
    let mut seen_a: Vec<u32> = futures_util::future::join_all(first)
        .await
        .iter()
        .map(|t| t.parse().expect("a number"))
        .collect();
    let mut seen_b = Vec::new();
    for round in 0..3 {
        for c in &clients {
            let tenant = if round % 2 == 0 { "b.local" } else { "a.local" };
            let n: u32 = get_text(c, &url, Some(tenant))
                .await
                .parse()
                .expect("a number");
            if tenant == "a.local" {
                seen_a.push(n);
            } else {
                seen_b.push(n);
            }
        }
    }
    seen_a.sort_unstable();
    assert_eq!(seen_a, (1..=8).collect::<Vec<_>>(), "tenant a's counter");
    assert_eq!(seen_b, (1..=8).collect::<Vec<_>>(), "tenant b's counter");
}

#[tokio::test]
async fn a_burst_of_heavy_requests_does_not_hold_up_another_tenant_on_its_thread() {
    let heavy = r#"
        export default {
          fetch() {
            // 40 ms of CPU per request.
            const end = Date.now() + 40;
            while (Date.now() < end) {}
            return new Response("a");
          },
        };
    "#;
    let light = r#"export default { fetch() { return new Response("b"); } };"#;
    let dev = Dev::start(
        &[("a.js", heavy), ("b.js", light)],
        // One worker thread: both isolates live on the same thread.
        &["a.local=a.js", "b.local=b.js", "--threads", "1"],
    );
    let c = client();
    let get = |host: &'static str| c.get(dev.url("/")).header("host", host).send();
    // Both isolates booted first.
    assert_eq!(get("a.local").await.expect("request").status(), 200);
    assert_eq!(get("b.local").await.expect("request").status(), 200);

    const BURST: usize = 12;
    let done = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let burst: Vec<_> = (0..BURST)
        .map(|_| {
            let (request, done) = (get("a.local"), done.clone());
            tokio::spawn(async move {
                let resp = request.await.expect("request");
                assert_eq!(resp.text().await.expect("text"), "a");
                done.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            })
        })
        .collect();
    // Let the burst reach the isolate (about half a second of work).
    tokio::time::sleep(std::time::Duration::from_millis(80)).await;
    let resp = get("b.local").await.expect("request");
    assert_eq!(resp.text().await.expect("text"), "b");
    let before_b = done.load(std::sync::atomic::Ordering::SeqCst);
    for task in burst {
        task.await.expect("burst request");
    }
    // Handlers start a few at a time, between which the thread serves its
    // other connections: b is not answered after the whole burst.
    assert!(
        before_b < BURST / 2,
        "{before_b} of {BURST} heavy requests were answered before the light one"
    );
}
