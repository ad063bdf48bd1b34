//! Bodies stream both ways, chunk by chunk.

use futures_util::StreamExt;
use sha2::{Digest, Sha256};

use crate::harness::{Dev, client};

/// The handler produces its last chunk only after the client has confirmed
/// (with a second request) that the first chunk arrived. A buffering server
/// would deadlock here instead of passing.
#[tokio::test]
async fn first_chunk_arrives_before_the_last_is_produced() {
    let dev = Dev::start(
        &[(
            "stream.js",
            r#"
            let release;
            const acked = new Promise((r) => { release = r; });
            export default {
              fetch(request) {
                if (new URL(request.url).pathname === "/ack") {
                  release();
                  return new Response("acked");
                }
                const enc = new TextEncoder();
                const body = new ReadableStream({
                  async start(controller) {
                    controller.enqueue(enc.encode("first;"));
                    await acked;
                    controller.enqueue(enc.encode("last"));
                    controller.close();
                  },
                });
                return new Response(body, { headers: { "content-type": "text/plain" } });
              },
            };
            "#,
        )],
        &["stream.js"],
    );
    let c = client();
    let resp = c.get(dev.url("/stream")).send().await.expect("request");
    assert_eq!(resp.status(), 200);
    let mut body = resp.bytes_stream();
    let first = body.next().await.expect("a chunk").expect("chunk ok");
    assert_eq!(&first[..], b"first;");
    let ack = c.get(dev.url("/ack")).send().await.expect("ack");
    assert_eq!(ack.text().await.expect("text"), "acked");
    let mut rest = Vec::new();
    while let Some(chunk) = body.next().await {
        rest.extend_from_slice(&chunk.expect("chunk ok"));
    }
    assert_eq!(rest, b"last");
}

/// 10 MiB streamed up, read by JS chunk by chunk, hashed with
/// crypto.subtle.digest and streamed back.
#[tokio::test]
async fn ten_mib_upload_is_streamed_hashed_and_echoed() {
    let dev = Dev::start(
        &[(
            "echo.js",
            r#"
            export default {
              async fetch(request) {
                const reader = request.body.getReader();
                const parts = [];
                let total = 0;
                for (;;) {
                  const { value, done } = await reader.read();
                  if (done) break;
                  parts.push(value);
                  total += value.byteLength;
                }
                const all = new Uint8Array(total);
                let off = 0;
                for (const p of parts) { all.set(p, off); off += p.byteLength; }
                const digest = await crypto.subtle.digest("SHA-256", all);
                const hex = [...new Uint8Array(digest)]
                  .map((b) => b.toString(16).padStart(2, "0")).join("");
                let i = 0;
                const out = new ReadableStream({
                  pull(controller) {
                    if (i >= total) { controller.close(); return; }
                    controller.enqueue(all.subarray(i, i + 65536));
                    i += 65536;
                  },
                });
                return new Response(out, {
                  headers: { "x-sha256": hex, "x-chunks": String(parts.length) },
                });
              },
            };
            "#,
        )],
        // Copying 10 MiB in a debug build takes more than the 50 ms default.
        &["echo.js", "--cpu-ms", "5000"],
    );
    let size = 10 * 1024 * 1024;
    let data: Vec<u8> = (0..size).map(|i| (i * 31 % 251) as u8).collect();
    let expected = hex::encode(Sha256::digest(&data));
    let chunks: Vec<Result<bytes::Bytes, std::io::Error>> = data
        .chunks(256 * 1024)
        .map(|c| Ok(bytes::Bytes::copy_from_slice(c)))
        .collect();
    let body = reqwest::Body::wrap_stream(futures_util::stream::iter(chunks));
    let resp = client()
        .post(dev.url("/"))
        .body(body)
        .send()
        .await
        .expect("request");
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["x-sha256"], expected.as_str());
    let chunks: usize = resp.headers()["x-chunks"]
        .to_str()
        .expect("ascii")
        .parse()
        .expect("number");
    assert!(chunks > 1, "the body reached JS as {chunks} chunk(s)");
    let echoed = resp.bytes().await.expect("body");
    assert_eq!(echoed.len(), size);
    assert!(echoed[..] == data[..], "echoed body differs");
}

/// A stream that fails midway must reach the client as a broken body, never
/// as a complete (truncated) response.
#[tokio::test]
async fn a_failing_stream_is_not_delivered_as_complete() {
    let dev = Dev::start(
        &[(
            "broken.js",
            r#"
            export default {
              fetch() {
                const body = new ReadableStream({
                  async start(controller) {
                    controller.enqueue(new TextEncoder().encode("partial;"));
                    await new Promise((r) => setTimeout(r, 20));
                    controller.error(new Error("upstream broke"));
                  },
                });
                return new Response(body);
              },
            };
            "#,
        )],
        &["broken.js"],
    );
    // Usually the head and the first chunk go out before the error, and
    // the body read fails. On a busy machine the chunk and the error can
    // reach the connection in the same turn; the connection is then closed
    // before the head is flushed, and the request itself fails. Either way
    // the client must never see a complete body.
    match client().get(dev.url("/")).send().await {
        Ok(resp) => {
            assert_eq!(resp.status(), 200);
            assert!(resp.bytes().await.is_err(), "a cut body must be an error");
        }
        Err(e) => assert!(e.is_request(), "{e:?}"),
    }
    dev.wait_for_log("upstream broke").await;
}

/// A handler that answers with the request's own body, unread: the host
/// pipes the upload back without JS touching the chunks.
#[tokio::test]
async fn an_unread_request_body_is_echoed_whole() {
    let dev = Dev::start(
        &[(
            "echo.js",
            r#"
            export default {
              fetch(request) {
                return new Response(request.body, { headers: { "x-echo": "1" } });
              },
            };
            "#,
        )],
        &["echo.js"],
    );
    const SIZE: usize = 3 * 1024 * 1024 + 17;
    let upload: Vec<u8> = (0..SIZE).map(|i| (i * 7 % 251) as u8).collect();
    let resp = client()
        .post(dev.url("/"))
        .body(upload.clone())
        .send()
        .await
        .expect("request");
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["x-echo"], "1");
    // The upload's declared length carries over to the piped echo.
    assert_eq!(resp.content_length(), Some(SIZE as u64));
    let echoed = resp.bytes().await.expect("body");
    assert_eq!(echoed.len(), SIZE);
    assert_eq!(Sha256::digest(&echoed), Sha256::digest(&upload));
}
