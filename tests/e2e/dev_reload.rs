//! `atoll dev` rebuilds when a file of the module graph changes.

use std::time::{Duration, Instant};

use crate::harness::{Dev, client, get_text};

async fn body(dev: &Dev) -> String {
    get_text(&client(), &dev.url("/"), None).await
}

#[tokio::test]
async fn editing_an_imported_file_reloads_and_syntax_errors_keep_the_old_version() {
    let dev = Dev::start(
        &[
            (
                "main.ts",
                "import { v } from './version.ts';\nexport default { fetch: () => new Response(v) };\n",
            ),
            ("version.ts", "export const v: string = 'v1';\n"),
        ],
        &["main.ts"],
    );
    assert_eq!(body(&dev).await, "v1");

    dev.write("version.ts", "export const v: string = 'v2';\n");
    let started = Instant::now();
    loop {
        if body(&dev).await == "v2" {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "never reloaded"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // The new routes are live a moment before the line is printed.
    dev.wait_for_out("reloaded (2 modules)").await;

    // A broken edit is reported and the last good version keeps serving.
    dev.write("version.ts", "export const v: string = ;\n");
    let started = Instant::now();
    while !dev.out().contains("reload failed") {
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "no reload error shown"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(body(&dev).await, "v2");
}

#[tokio::test]
async fn a_reload_lets_requests_in_flight_finish_on_the_old_version() {
    let slow = |v: &str| {
        format!(
            "export default {{ async fetch(req) {{\n  if (new URL(req.url).pathname === '/slow') {{\n    console.log('slow {v} started');\n    await new Promise((r) => setTimeout(r, 3000));\n  }}\n  return new Response('{v}');\n}} }};\n"
        )
    };
    let dev = Dev::start(&[("main.js", &slow("v1"))], &["main.js"]);
    let url = dev.url("/slow");
    let in_flight = tokio::spawn(async move { get_text(&client(), &url, None).await });
    dev.wait_for_log("slow v1 started").await;
    // The script changes while that request waits in the old isolate.
    dev.write("main.js", &slow("v2"));
    dev.wait_for_out("reloaded (1 modules)").await;
    assert_eq!(body(&dev).await, "v2");
    assert!(!in_flight.is_finished(), "the slow request ended early");
    assert_eq!(in_flight.await.expect("join"), "v1");
}
