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
