//! Limits are enforced: the offender gets a clear 5xx, the node keeps
//! serving, and the tenant's next request runs in a fresh isolate.

use std::time::Duration;

use crate::harness::{Dev, client, get_text, single_script_config};

/// One request at a time, none waiting, a short wall clock: a request that
/// lingers shows as a 503 for the next one.
const ONE_SLOT: &str = "wall_ms = 300\nmax_concurrent = 1\nmax_queued = 0";

const HANDLER: &str = r#"
let served = 0;
export default {
  fetch(request) {
    served++;
    const path = new URL(request.url).pathname;
    if (path === "/loop") { for (;;) {} }
    if (path === "/loop-then") {
      // A second loop waits in a microtask: stopping the first must not
      // let this one run unwatched.
      Promise.resolve().then(() => { for (;;) {} });
      for (;;) {}
    }
    if (path === "/bomb") {
      const hoard = [];
      for (;;) hoard.push(new Array(100000).fill(Math.random()));
    }
    if (path === "/sleep") return new Promise(() => {});
    if (path === "/buffers") {
      // ArrayBuffer memory lives outside the V8 heap; it has its own budget.
      globalThis.kept = [];
      try {
        for (;;) globalThis.kept.push(new Uint8Array(16 * 1024 * 1024).fill(1));
      } catch (e) {
        const n = globalThis.kept.length;
        globalThis.kept = [];
        return new Response(`${e.name} after ${n}`);
      }
    }
    return new Response(`served=${served}`);
  },
};
"#;

#[tokio::test]
async fn infinite_loop_is_terminated_and_the_next_request_works() {
    let dev = Dev::start(&[("limits.js", HANDLER)], &["limits.js", "--cpu-ms", "50"]);
    let c = client();
    assert_eq!(get_text(&c, &dev.url("/"), None).await, "served=1");
    let resp = c.get(dev.url("/loop")).send().await.expect("request");
    assert_eq!(resp.status(), 503);
    assert!(resp.text().await.expect("text").contains("CPU time limit"));
    dev.wait_for_log("CPU time limit of 50 ms per request exceeded")
        .await;
    // Fresh isolate: module state starts over.
    let resp = c.get(dev.url("/")).send().await.expect("request");
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.text().await.expect("text"), "served=1");
    // The same with a loop queued behind the first: the isolate stays
    // terminated, it does not go on to run the queued one.
    stays_terminated(&c, &dev, "/loop-then").await;
}

/// GETs `path`, whose handler hits a limit with more of the same queued as
/// a microtask: the client gets a 503 within 10 s (a limit that let the
/// queued work run would hang the worker thread) and the next request runs
/// in a fresh isolate. (The heap limit needs no such case: a queued heap
/// bomb reaches the limit again and is stopped by it.)
async fn stays_terminated(c: &reqwest::Client, dev: &Dev, path: &str) {
    let within = Duration::from_secs(10);
    let resp = c
        .get(dev.url(path))
        .timeout(within)
        .send()
        .await
        .unwrap_or_else(|e| panic!("no response to {path} within 10 s: {e}"));
    assert_eq!(resp.status(), 503);
    let resp = c
        .get(dev.url("/"))
        .timeout(within)
        .send()
        .await
        .unwrap_or_else(|e| panic!("no response after {path} within 10 s: {e}"));
    assert_eq!(resp.text().await.expect("text"), "served=1");
}

#[tokio::test]
async fn heap_bomb_is_terminated_and_the_next_request_works() {
    let dev = Dev::start(
        &[("limits.js", HANDLER)],
        &["limits.js", "--heap-mb", "64", "--cpu-ms", "10000"],
    );
    let c = client();
    let resp = c.get(dev.url("/bomb")).send().await.expect("request");
    assert_eq!(resp.status(), 503);
    assert!(resp.text().await.expect("text").contains("memory limit"));
    dev.wait_for_log("heap limit of 64 MiB exceeded").await;
    let resp = c.get(dev.url("/")).send().await.expect("request");
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.text().await.expect("text"), "served=1");
}

#[tokio::test]
async fn array_buffer_memory_is_budgeted_per_isolate() {
    let dev = Dev::start(
        &[("limits.js", HANDLER)],
        &["limits.js", "--heap-mb", "64", "--cpu-ms", "10000"],
    );
    let c = client();
    let resp = c.get(dev.url("/buffers")).send().await.expect("request");
    let status = resp.status();
    let text = resp.text().await.expect("text");
    // Either V8's external-memory accounting ends the isolate at the heap
    // limit, or the per-isolate buffer budget makes the allocation throw;
    // never more than 64 MiB of buffers.
    if status == 503 {
        assert!(text.contains("memory limit"), "{text}");
    } else {
        let n: usize = text
            .strip_prefix("RangeError after ")
            .and_then(|n| n.parse().ok())
            .unwrap_or_else(|| panic!("unexpected answer {status} {text}"));
        assert!(n * 16 <= 64, "{n} buffers of 16 MiB exceed the budget");
    }
    let resp = c.get(dev.url("/")).send().await.expect("request");
    assert_eq!(resp.status(), 200);
}

#[tokio::test]
async fn wall_clock_limit_answers_504_and_other_requests_continue() {
    let dev = Dev::start(
        &[("limits.js", HANDLER)],
        &["limits.js", "--wall-ms", "300"],
    );
    let c = client();
    let hung = c.get(dev.url("/sleep")).send();
    let ok = c.get(dev.url("/")).send();
    let (hung, ok) = tokio::join!(hung, ok);
    assert_eq!(ok.expect("request").status(), 200);
    let hung = hung.expect("request");
    assert_eq!(hung.status(), 504);
    // Same isolate keeps serving (no restart for a wall-clock overrun).
    let text = get_text(&c, &dev.url("/"), None).await;
    assert_eq!(text, "served=3");
}

#[tokio::test]
async fn background_work_after_the_response_is_bounded() {
    let dev = Dev::start(
        &[(
            "bg.js",
            r#"
            let served = 0;
            export default {
              fetch(request) {
                served++;
                if (new URL(request.url).pathname === "/bg") {
                  // Burn CPU forever from a timer, after the response.
                  setInterval(() => { const end = Date.now() + 5; while (Date.now() < end) {} }, 1);
                }
                return new Response(`served=${served}`);
              },
            };
            "#,
        )],
        &["bg.js", "--cpu-ms", "50"],
    );
    let c = client();
    let resp = c.get(dev.url("/bg")).send().await.expect("request");
    assert_eq!(resp.text().await.expect("text"), "served=1");
    dev.wait_for_log("background work after the last response exceeded")
        .await;
    let resp = c.get(dev.url("/")).send().await.expect("request");
    assert_eq!(
        resp.text().await.expect("text"),
        "served=1",
        "a fresh isolate"
    );
}

#[tokio::test]
async fn wait_until_work_that_never_settles_does_not_hold_its_slot() {
    let node = Dev::start_node(&[
        ("node.toml", &single_script_config(ONE_SLOT, "forgetful.js")),
        (
            "forgetful.js",
            r#"
            export default {
              fetch(request, env, ctx) {
                if (new URL(request.url).pathname === "/forget") ctx.waitUntil(new Promise(() => {}));
                return new Response("answered");
              },
            };
            "#,
        ),
    ]);
    let c = client();
    let resp = c.get(node.url("/forget")).send().await.expect("request");
    assert_eq!(resp.text().await.expect("text"), "answered");
    // Its waitUntil work holds the only slot: the next request is refused.
    let resp = c.get(node.url("/")).send().await.expect("request");
    assert_eq!(resp.status(), 503);
    // One wall-clock limit after the response the request ends without it.
    node.wait_for_log("the request ended without it").await;
    let resp = c.get(node.url("/")).send().await.expect("request");
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.text().await.expect("text"), "answered");
}

#[tokio::test]
async fn a_stream_whose_client_left_does_not_hold_its_slot() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let node = Dev::start_node(&[
        ("node.toml", &single_script_config(ONE_SLOT, "stuck.js")),
        (
            "stuck.js",
            r#"
            export default {
              fetch(request) {
                if (new URL(request.url).pathname !== "/stream") return new Response("answered");
                // Chunks forever; cancelling never finishes.
                const body = new ReadableStream({
                  pull(c) { c.enqueue(new TextEncoder().encode("chunk;")); return new Promise((r) => setTimeout(r, 10)); },
                  cancel() { return new Promise(() => {}); },
                });
                return new Response(body);
              },
            };
            "#,
        ),
    ]);
    let mut conn = tokio::net::TcpStream::connect(node.addr())
        .await
        .expect("connect");
    conn.write_all(b"GET /stream HTTP/1.1\r\nHost: a.test\r\n\r\n")
        .await
        .expect("write");
    let mut first = [0u8; 64];
    let n = conn.read(&mut first).await.expect("read");
    assert!(n > 0 && first.starts_with(b"HTTP/1.1 200"));
    drop(conn);
    // Once the node notices the client is gone, the stream's leftover work
    // gets one wall-clock limit, then the slot is free again.
    node.wait_for_log("the request ended without it").await;
    let resp = client().get(node.url("/")).send().await.expect("request");
    assert_eq!(resp.status(), 200);
}

#[tokio::test]
async fn an_idle_stream_whose_client_left_is_noticed_without_a_write() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let limits = format!("{ONE_SLOT}\nhead_timeout_ms = 200");
    let node = Dev::start_node(&[
        ("node.toml", &single_script_config(&limits, "idle.js")),
        (
            "idle.js",
            r#"
            export default {
              fetch(request) {
                if (new URL(request.url).pathname !== "/stream") return new Response("answered");
                // One chunk, then silence: no write will fail for a departed client.
                let sent = false;
                const body = new ReadableStream({
                  pull(c) {
                    if (sent) return new Promise(() => {});
                    sent = true;
                    c.enqueue(new TextEncoder().encode("first;"));
                  },
                });
                return new Response(body);
              },
            };
            "#,
        ),
    ]);
    let mut conn = tokio::net::TcpStream::connect(node.addr())
        .await
        .expect("connect");
    conn.write_all(b"GET /stream HTTP/1.1\r\nHost: a.test\r\n\r\n")
        .await
        .expect("write");
    let mut first = [0u8; 256];
    let n = conn.read(&mut first).await.expect("read");
    assert!(n > 0 && first.starts_with(b"HTTP/1.1 200"));
    // While its client listens, the stream holds the only slot.
    let resp = client().get(node.url("/")).send().await.expect("request");
    assert_eq!(resp.status(), 503);
    drop(conn);
    // The head deadline's look at the socket finds the client gone; the
    // stream's leftover work then gets one wall-clock limit.
    node.wait_for_log("the request ended without it").await;
    let resp = client().get(node.url("/")).send().await.expect("request");
    assert_eq!(resp.status(), 200);
}

#[tokio::test]
async fn a_waiting_request_is_not_charged_for_other_requests_cpu() {
    let dev = Dev::start(
        &[(
            "mixed.js",
            r#"
            export default {
              async fetch(request) {
                const path = new URL(request.url).pathname;
                if (path === "/wait") {
                  await new Promise((resolve) => setTimeout(resolve, 1500));
                  return new Response("waited");
                }
                // 10 ms of CPU: a fifth of the limit.
                const end = Date.now() + 10;
                while (Date.now() < end) {}
                return new Response("burned");
              },
            };
            "#,
        )],
        &["mixed.js", "--cpu-ms", "50"],
    );
    let c = client();
    let waiting = tokio::spawn({
        let (c, url) = (c.clone(), dev.url("/wait"));
        async move { c.get(url).send().await }
    });
    tokio::time::sleep(Duration::from_millis(200)).await;
    // Together far more than the limit, while /wait is in flight; each
    // is well within it.
    for i in 0..15 {
        let resp = c.get(dev.url("/burn")).send().await.expect("request");
        assert_eq!(resp.status(), 200, "burn {i}");
    }
    let waited = waiting.await.expect("task").expect("request");
    assert_eq!(waited.status(), 200);
    assert_eq!(waited.text().await.expect("text"), "waited");
    // Sent at once, they reach the isolate together and run in one batch:
    // each handler still has its own budget.
    let burns: Vec<_> = (0..12)
        .map(|_| tokio::spawn(c.get(dev.url("/burn")).send()))
        .collect();
    for burn in burns {
        let resp = burn.await.expect("task").expect("request");
        assert_eq!(resp.status(), 200);
    }
    assert!(!dev.log().contains("CPU time limit"), "{}", dev.log());
}

#[tokio::test]
async fn continuations_that_resume_together_each_have_their_own_budget() {
    let dev = Dev::start(
        &[(
            "gate.js",
            r#"
            // Every request waits for one timer, so all their continuations
            // run in the same turn of the event loop.
            let gate;
            export default {
              async fetch(request) {
                const path = new URL(request.url).pathname;
                if (path === "/wait") {
                  await new Promise((resolve) => setTimeout(resolve, 5000));
                  return new Response("waited");
                }
                gate ??= new Promise((resolve) => setTimeout(resolve, 600));
                await gate;
                if (path === "/runaway") { for (;;) {} }
                // 15 ms of CPU each: together more than twice the limit.
                const end = Date.now() + 15;
                while (Date.now() < end) {}
                return new Response("burned");
              },
            };
            "#,
        )],
        &["gate.js", "--cpu-ms", "50"],
    );
    let c = client();
    let burns: Vec<_> = (0..8)
        .map(|_| tokio::spawn(c.get(dev.url("/burn")).send()))
        .collect();
    for (i, burn) in burns.into_iter().enumerate() {
        let resp = burn.await.expect("task").expect("request");
        assert_eq!(resp.status(), 200, "burn {i}: {}", dev.log());
    }
    assert!(!dev.log().contains("CPU time limit"), "{}", dev.log());
    // A continuation that never yields is still stopped. A request that
    // was only waiting in the same isolate ends with it, and the log says
    // which of them was at fault.
    let waiting = tokio::spawn(c.get(dev.url("/wait")).send());
    tokio::time::sleep(Duration::from_millis(200)).await;
    let resp = c.get(dev.url("/runaway")).send().await.expect("request");
    assert_eq!(resp.status(), 503);
    assert!(resp.text().await.expect("text").contains("CPU time limit"));
    let resp = waiting.await.expect("task").expect("request");
    assert_eq!(resp.status(), 503);
    dev.wait_for_log("GET /runaway 503").await;
    dev.wait_for_log("GET /wait 503").await;
    let log = dev.log();
    let line = |path: &str| {
        log.lines()
            .find(|l| l.contains(&format!("GET {path} 503")))
            .unwrap_or_default()
            .to_string()
    };
    assert!(
        line("/runaway").contains("CPU time limit of 50 ms per request exceeded"),
        "{log}"
    );
    assert!(!line("/runaway").contains("another request"), "{log}");
    assert!(
        line("/wait").contains("by another request running in the same isolate"),
        "{log}"
    );
}

#[tokio::test]
async fn a_loop_that_lost_its_requests_context_is_still_stopped() {
    // The loop is a continuation registered at module load, outside any
    // request: no sample can charge it to one, and the isolate's shared
    // deadline must end it. No request is blamed for it either.
    let dev = Dev::start(
        &[(
            "orphan.js",
            r#"
            let release;
            const gate = new Promise((resolve) => { release = resolve; });
            gate.then(() => { for (;;) {} });
            export default {
              async fetch(request) {
                const path = new URL(request.url).pathname;
                if (path === "/release") release();
                if (path !== "/") {
                  await new Promise((resolve) => setTimeout(resolve, 5000));
                }
                return new Response("ok");
              },
            };
            "#,
        )],
        &["orphan.js", "--cpu-ms", "50"],
    );
    let c = client();
    let waiting = tokio::spawn(
        c.get(dev.url("/wait"))
            .timeout(Duration::from_secs(10))
            .send(),
    );
    tokio::time::sleep(Duration::from_millis(200)).await;
    let resp = c
        .get(dev.url("/release"))
        .timeout(Duration::from_secs(10))
        .send()
        .await
        .expect("an answer within 10 s");
    assert_eq!(resp.status(), 503);
    let waited = waiting.await.expect("task").expect("an answer within 10 s");
    assert_eq!(waited.status(), 503);
    let log = dev.wait_for_log("GET /wait 503").await;
    assert!(
        log.contains("CPU time limit of 50 ms per request exceeded"),
        "{log}"
    );
    // Had the loop been charged to /release, /wait would be told another
    // request was at fault.
    assert!(!log.contains("by another request"), "{log}");
    let resp = c.get(dev.url("/")).send().await.expect("request");
    assert_eq!(resp.text().await.expect("text"), "ok");
}

#[tokio::test]
async fn requests_resuming_together_cannot_hold_the_thread_for_long() {
    let dev = Dev::start(
        &[(
            "herd.js",
            r#"
            let gate;
            export default {
              async fetch() {
                gate ??= new Promise((resolve) => setTimeout(resolve, 600));
                await gate;
                // 30 ms each, within the limit; sixteen of them are far
                // more than one turn may use (four budgets, 200 ms).
                const end = Date.now() + 30;
                while (Date.now() < end) {}
                return new Response("burned");
              },
            };
            "#,
        )],
        &["herd.js", "--cpu-ms", "50"],
    );
    let c = client();
    let burns: Vec<_> = (0..16)
        .map(|_| tokio::spawn(c.get(dev.url("/")).send()))
        .collect();
    let mut refused = 0;
    for burn in burns {
        let resp = burn.await.expect("task").expect("request");
        if resp.status() == 503 {
            refused += 1;
        }
    }
    assert!(refused > 0, "{}", dev.log());
    dev.wait_for_log("resumed together used more than 200 ms of CPU in one turn")
        .await;
    assert!(!dev.log().contains("per request exceeded"), "{}", dev.log());
    let resp = c.get(dev.url("/")).send().await.expect("request");
    assert_eq!(resp.status(), 200);
}
