//! Tenants share a process, never a JS heap.

use crate::harness::{Dev, client};

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
