//! HTTP-level behaviour of the server in front of the isolates.

use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::harness::{Dev, client};

const HANDLER: &str = r#"
export default {
  async fetch(request) {
    if (new URL(request.url).pathname === "/uncaught") {
      return new Response(`read ${(await request.arrayBuffer()).byteLength}`);
    }
    try {
      const body = await request.arrayBuffer();
      return new Response(`read ${body.byteLength}`);
    } catch (e) {
      return new Response(`body error: ${e.message}`, { status: 413 });
    }
  },
};
"#;

#[tokio::test]
async fn oversized_heads_and_bodies_are_refused() {
    let dev = Dev::start(&[("h.js", HANDLER)], &["h.js", "--max-body-mb", "1"]);
    let c = client();

    // A 100 KiB header: 431 from the server, the handler never runs.
    let resp = c
        .get(dev.url("/"))
        .header("x-big", "a".repeat(100 * 1024))
        .send()
        .await
        .expect("request");
    assert_eq!(resp.status(), 431);
    // hyper answers it itself; the node still logs it.
    dev.wait_for_log("request head too large").await;

    // A declared length over the limit: 413 before any body is read.
    let addr = dev.base.trim_start_matches("http://").to_string();
    let mut tcp = tokio::net::TcpStream::connect(&addr)
        .await
        .expect("connect");
    tcp.write_all(
        b"POST / HTTP/1.1\r\nhost: x\r\ncontent-length: 2000000\r\nconnection: close\r\n\r\n",
    )
    .await
    .expect("write");
    let mut answer = Vec::new();
    let _ = tcp.read_to_end(&mut answer).await;
    let answer = String::from_utf8_lossy(&answer);
    assert!(answer.starts_with("HTTP/1.1 413"), "{answer}");
    assert!(answer.contains("limit of 1048576 bytes"), "{answer}");

    // A streamed (chunked) body of 2.5 MiB, without a declared length.
    let post_chunked = |path: &str| {
        let chunks: Vec<Result<bytes::Bytes, std::io::Error>> = (0..40)
            .map(|_| Ok(bytes::Bytes::from(vec![7u8; 64 * 1024])))
            .collect();
        c.post(dev.url(path))
            .body(reqwest::Body::wrap_stream(futures_util::stream::iter(
                chunks,
            )))
            .send()
    };
    // Growing past the limit, it errors in the handler.
    let resp = post_chunked("/").await.expect("request");
    assert_eq!(resp.status(), 413, "node log:\n{}", dev.log());
    let text = resp.text().await.expect("text");
    assert!(text.contains("larger than the limit"), "{text}");
    // A handler that lets that error escape: the server answers 413 itself.
    let resp = post_chunked("/uncaught").await.expect("request");
    assert_eq!(resp.status(), 413, "node log:\n{}", dev.log());
    let text = resp.text().await.expect("text");
    assert!(
        text.contains("larger than the limit of 1048576 bytes"),
        "{text}"
    );

    // A Host that is not a plain authority never reaches routing.
    let mut tcp = tokio::net::TcpStream::connect(&addr)
        .await
        .expect("connect");
    tcp.write_all(b"GET / HTTP/1.1\r\nhost: x/admin#.example.com\r\nconnection: close\r\n\r\n")
        .await
        .expect("write");
    let mut answer = Vec::new();
    let _ = tcp.read_to_end(&mut answer).await;
    let answer = String::from_utf8_lossy(&answer);
    assert!(answer.starts_with("HTTP/1.1 400"), "{answer}");

    // Within the limit all is well.
    let resp = c
        .post(dev.url("/"))
        .body(vec![1u8; 1000])
        .send()
        .await
        .expect("request");
    assert_eq!(resp.text().await.expect("text"), "read 1000");
}

/// A client that goes on uploading a body the node already refused reads
/// the 413 rather than a reset: the node drains the rest before it closes.
#[tokio::test]
async fn a_client_still_uploading_a_refused_body_reads_the_413() {
    let dev = Dev::start(&[("h.js", HANDLER)], &["h.js", "--max-body-mb", "1"]);
    let addr = dev.base.trim_start_matches("http://").to_string();
    // The handler's read fails past the limit: it answers 413 itself
    // ("/"), or lets the error escape and the node answers ("/uncaught").
    for path in ["/", "/uncaught", "/", "/uncaught"] {
        let mut tcp = tokio::net::TcpStream::connect(&addr)
            .await
            .expect("connect");
        let head = format!("POST {path} HTTP/1.1\r\nhost: x\r\ntransfer-encoding: chunked\r\n\r\n");
        tcp.write_all(head.as_bytes()).await.expect("head");
        // 3 MiB in chunks, read only once all is sent, as simple clients do.
        let mut chunk = b"10000\r\n".to_vec();
        chunk.extend(vec![b'a'; 0x10000]);
        chunk.extend(b"\r\n");
        for i in 0..48 {
            if i == 24 {
                // Past the limit: let the node answer and end the request.
                tokio::time::sleep(std::time::Duration::from_millis(300)).await;
            }
            tcp.write_all(&chunk).await.expect("the upload goes on");
        }
        tcp.write_all(b"0\r\n\r\n").await.expect("the last chunk");
        let mut answer = Vec::new();
        tcp.read_to_end(&mut answer).await.expect("read the answer");
        let answer = String::from_utf8_lossy(&answer);
        assert!(answer.starts_with("HTTP/1.1 413"), "{path}: {answer}");
    }
}

#[tokio::test]
async fn http2_with_prior_knowledge() {
    let dev = Dev::start(&[("h.js", HANDLER)], &["h.js"]);
    let h2 = reqwest::Client::builder()
        .no_proxy()
        .http2_prior_knowledge()
        .build()
        .expect("client");
    let resp = h2
        .post(dev.url("/"))
        .body("four")
        .send()
        .await
        .expect("request");
    assert_eq!(resp.version(), reqwest::Version::HTTP_2);
    assert_eq!(resp.text().await.expect("text"), "read 4");
}

#[tokio::test]
async fn sigterm_finishes_in_flight_requests_then_exits() {
    let mut dev = Dev::start(
        &[(
            "slow.js",
            r#"
            export default {
              async fetch() {
                console.log("slow request started");
                await new Promise((r) => setTimeout(r, 700));
                return new Response("finished");
              },
            };
            "#,
        )],
        &["slow.js"],
    );
    let url = dev.url("/");
    let in_flight = tokio::spawn(async move {
        let resp = client().get(url).send().await.expect("request");
        (resp.status(), resp.text().await.expect("text"))
    });
    // Let the request reach the handler, then ask the process to stop.
    dev.wait_for_log("slow request started").await;
    let status = tokio::task::spawn_blocking(move || {
        let s = dev.terminate();
        (s, dev)
    });
    let (code, text) = in_flight.await.expect("join");
    assert_eq!(code, 200);
    assert_eq!(text, "finished");
    let (exit, dev) = status.await.expect("join");
    assert!(exit.success(), "exit status {exit}");
    assert!(dev.out().contains("atoll dev: stopped"), "{}", dev.out());
    // New connections are refused once it has stopped.
    assert!(client().get(dev.url("/")).send().await.is_err());
}

/// Reads one HTTP/1.1 response with a `content-length` from `tcp`; returns
/// its head and body, or None if the connection ended first.
async fn read_response(tcp: &mut tokio::net::TcpStream) -> Option<(String, Vec<u8>)> {
    let mut buf = Vec::new();
    let mut byte = [0u8; 1];
    while !buf.ends_with(b"\r\n\r\n") {
        if tcp.read(&mut byte).await.ok()? == 0 {
            return None;
        }
        buf.push(byte[0]);
    }
    let head = String::from_utf8_lossy(&buf).to_string();
    let length: usize = head
        .lines()
        .find_map(|l| l.strip_prefix("content-length: "))
        .and_then(|v| v.trim().parse().ok())?;
    let mut body = vec![0u8; length];
    tcp.read_exact(&mut body).await.ok()?;
    Some((head, body))
}

#[tokio::test]
async fn a_body_the_handler_ignores_does_not_cost_the_connection() {
    let dev = Dev::start(
        &[(
            "ignore.js",
            "export default { fetch() { return new Response('ignored'); } };",
        )],
        &["ignore.js"],
    );
    let addr = dev.base.trim_start_matches("http://").to_string();
    let mut tcp = tokio::net::TcpStream::connect(&addr)
        .await
        .expect("connect");
    let body = vec![b'x'; 100 * 1024];
    tcp.write_all(
        format!(
            "POST / HTTP/1.1\r\nhost: x\r\ncontent-length: {}\r\n\r\n",
            body.len()
        )
        .as_bytes(),
    )
    .await
    .expect("write head");
    tcp.write_all(&body).await.expect("write body");
    let (head, text) = read_response(&mut tcp).await.expect("first response");
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    assert_eq!(text, b"ignored");
    // The unread body was drained: the same connection serves the next one.
    tcp.write_all(b"GET / HTTP/1.1\r\nhost: x\r\n\r\n")
        .await
        .expect("write second");
    let (head, _) = read_response(&mut tcp)
        .await
        .expect("a second response on the same connection");
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
}

#[tokio::test]
async fn a_client_that_half_closes_after_its_request_gets_the_answer() {
    let dev = Dev::start(
        &[(
            "later.js",
            r#"export default {
              async fetch() {
                await new Promise((r) => setTimeout(r, 100));
                return new Response("answered after the client's FIN");
              },
            };"#,
        )],
        &["later.js"],
    );
    let addr = dev.base.trim_start_matches("http://").to_string();
    let mut tcp = tokio::net::TcpStream::connect(&addr)
        .await
        .expect("connect");
    tcp.write_all(b"GET / HTTP/1.1\r\nhost: x\r\n\r\n")
        .await
        .expect("write");
    // Like `nc -N` or `curl` uploading from stdin: nothing more to send.
    tcp.shutdown().await.expect("shutdown");
    let mut answer = Vec::new();
    tcp.read_to_end(&mut answer).await.expect("read");
    let answer = String::from_utf8_lossy(&answer);
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert!(
        answer.ends_with("answered after the client's FIN"),
        "{answer}"
    );
}
