//! Outbound `fetch()` from handlers on a real node, against a real upstream
//! HTTP server and a real DNS server, both on loopback.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, UdpSocket};

use crate::harness::{Dev, client};

/// Size of the upstream's `/big` body.
const BIG: usize = 8 * 1024 * 1024;

/// The byte at `i` of the upstream's `/big` body.
fn big_byte(i: usize) -> u8 {
    (i % 251) as u8
}

/// Reads a request head from `conn`; `None` if it closes first.
async fn read_head(conn: &mut tokio::net::TcpStream) -> Option<String> {
    let mut head = Vec::new();
    let mut buf = [0u8; 4096];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
        match conn.read(&mut buf).await {
            Ok(0) | Err(_) => return None,
            Ok(n) => head.extend_from_slice(&buf[..n]),
        }
    }
    Some(String::from_utf8_lossy(&head).to_string())
}

/// A minimal HTTP/1.1 upstream on 127.0.0.1: `/hello`, `/big` (chunked),
/// `/big-sized` (declared length), `/cut-short` (declared length, closed
/// early), `/slow` (never answers), `/redirect?to=URL` (302). Returns its
/// port.
async fn upstream() -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let port = listener.local_addr().expect("addr").port();
    tokio::spawn(async move {
        while let Ok((mut conn, _)) = listener.accept().await {
            tokio::spawn(async move {
                let Some(head) = read_head(&mut conn).await else {
                    return;
                };
                let target = head.split(' ').nth(1).unwrap_or("/").to_string();
                if target == "/hello" {
                    let _ = conn
                        .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 14\r\nconnection: close\r\n\r\nupstream hello")
                        .await;
                } else if target == "/big-sized" {
                    // The same body with its length declared: the node
                    // pipes it to the client without JS per chunk.
                    let head = format!(
                        "HTTP/1.1 200 OK\r\ncontent-length: {BIG}\r\nconnection: close\r\n\r\n"
                    );
                    if conn.write_all(head.as_bytes()).await.is_err() {
                        return;
                    }
                    let body: Vec<u8> = (0..BIG).map(big_byte).collect();
                    for chunk in body.chunks(64 * 1024) {
                        if conn.write_all(chunk).await.is_err() {
                            return;
                        }
                    }
                } else if target == "/cut-short" {
                    // Declares the big body, sends 64 KiB of it, hangs up.
                    let head = format!(
                        "HTTP/1.1 200 OK\r\ncontent-length: {BIG}\r\nconnection: close\r\n\r\n"
                    );
                    let part: Vec<u8> = (0..64 * 1024).map(big_byte).collect();
                    let _ = conn.write_all(head.as_bytes()).await;
                    let _ = conn.write_all(&part).await;
                } else if target == "/big" {
                    let _ = conn
                        .write_all(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\nconnection: close\r\n\r\n")
                        .await;
                    let mut sent = 0;
                    while sent < BIG {
                        let n = (64 * 1024).min(BIG - sent);
                        let chunk: Vec<u8> = (sent..sent + n).map(big_byte).collect();
                        if conn
                            .write_all(format!("{n:x}\r\n").as_bytes())
                            .await
                            .is_err()
                            || conn.write_all(&chunk).await.is_err()
                            || conn.write_all(b"\r\n").await.is_err()
                        {
                            return;
                        }
                        sent += n;
                    }
                    let _ = conn.write_all(b"0\r\n\r\n").await;
                } else if let Some(to) = target.strip_prefix("/redirect?to=") {
                    let _ = conn
                        .write_all(
                            format!("HTTP/1.1 302 Found\r\nlocation: {to}\r\ncontent-length: 0\r\nconnection: close\r\n\r\n")
                                .as_bytes(),
                        )
                        .await;
                } else if target == "/slow" {
                    tokio::time::sleep(Duration::from_secs(30)).await;
                } else {
                    let _ = conn
                        .write_all(b"HTTP/1.1 404 Not Found\r\ncontent-length: 0\r\nconnection: close\r\n\r\n")
                        .await;
                }
            });
        }
    });
    port
}

/// A DNS server on 127.0.0.1 that answers every A query with 127.0.0.1
/// (and AAAA with no records). Returns its port and a query counter.
async fn loopback_dns() -> (u16, Arc<AtomicUsize>) {
    let socket = UdpSocket::bind("127.0.0.1:0").await.expect("bind udp");
    let port = socket.local_addr().expect("addr").port();
    let queries = Arc::new(AtomicUsize::new(0));
    let counter = queries.clone();
    tokio::spawn(async move {
        let mut buf = [0u8; 512];
        while let Ok((n, from)) = socket.recv_from(&mut buf).await {
            let q = &buf[..n];
            if n < 12 {
                continue;
            }
            // Skip the question's name to find its type.
            let mut i = 12;
            while i < n && q[i] != 0 {
                i += 1 + q[i] as usize;
            }
            if i + 5 > n {
                continue;
            }
            counter.fetch_add(1, Ordering::SeqCst);
            let qtype = u16::from_be_bytes([q[i + 1], q[i + 2]]);
            let question = &q[12..i + 5];
            let is_a = qtype == 1;
            let mut r = Vec::new();
            r.extend_from_slice(&q[..2]); // id
            r.extend_from_slice(&[0x81, 0x80]); // response, recursion available
            r.extend_from_slice(&[0, 1, 0, u8::from(is_a), 0, 0, 0, 0]);
            r.extend_from_slice(question);
            if is_a {
                r.extend_from_slice(&[0xc0, 12, 0, 1, 0, 1, 0, 0, 0, 60, 0, 4, 127, 0, 0, 1]);
            }
            let _ = socket.send_to(&r, from).await;
        }
    });
    (port, queries)
}

/// A node whose only script is `handler`, routed for every host, with
/// `extra` config (an `[outbound]` section) appended.
fn node(handler: &str, extra: &str) -> Dev {
    let config = format!(
        "[[listen]]\naddr = \"127.0.0.1:0\"\n\n[admin]\naddr = \"127.0.0.1:0\"\n\n\
         [[scripts]]\nname = \"proxy\"\nentry = \"proxy.js\"\n\n\
         [[routes]]\npattern = \"*\"\nscript = \"proxy\"\n\n{extra}"
    );
    Dev::start_node(&[("node.toml", &config), ("proxy.js", handler)])
}

/// Fetches `?url=` and answers with the upstream's body, or with the
/// error's name and message (status 502).
const PROXY: &str = r#"
export default {
  async fetch(req) {
    const target = new URL(req.url).searchParams.get("url");
    try {
      return await fetch(target);
    } catch (e) {
      return new Response(`${e.name}: ${e.message}`, { status: 502 });
    }
  },
};
"#;

/// Asks `node`'s PROXY handler for `target`.
async fn proxied(node: &Dev, target: &str) -> reqwest::Response {
    client()
        .get(node.url("/"))
        .query(&[("url", target)])
        .send()
        .await
        .expect("request")
}

async fn via(node: &Dev, target: &str) -> (u16, String) {
    let resp = proxied(node, target).await;
    (resp.status().as_u16(), resp.text().await.expect("text"))
}

#[tokio::test]
async fn with_the_dev_allowance_a_handler_proxies_and_streams_upstream() {
    let port = upstream().await;
    let default_limits = node(PROXY, "[outbound]\nallow = [\"127.0.0.1\"]\n");
    // Every chunk of the chunked 8 MiB body passes through JS streams: the
    // raised CPU limit keeps a slow debug build clear of the default 50 ms.
    let node = node(
        PROXY,
        "[outbound]\nallow = [\"127.0.0.1\"]\n\n[limits]\ncpu_ms = 5000\n",
    );
    assert_eq!(
        via(&node, &format!("http://127.0.0.1:{port}/hello")).await,
        (200, "upstream hello".into())
    );

    let want: Vec<u8> = (0..BIG).map(big_byte).collect();
    // Chunked (through JS streams, counted against the response limit)
    // and with a declared length (piped by the host), the latter under the
    // default limits too.
    for (proxy, path) in [
        (&node, "big"),
        (&node, "big-sized"),
        (&default_limits, "big-sized"),
    ] {
        let resp = proxied(proxy, &format!("http://127.0.0.1:{port}/{path}")).await;
        assert_eq!(resp.status().as_u16(), 200, "{path}\n{}", proxy.log());
        // A declared upstream length reaches the client only through the
        // host's pipe (JS streaming sends chunked): this shows it was taken.
        let declared = (path == "big-sized").then_some(BIG as u64);
        assert_eq!(resp.content_length(), declared, "{path}");
        let body = match resp.bytes().await {
            Ok(b) => b,
            Err(e) => panic!("the proxied body of /{path} broke: {e}\n{}", proxy.log()),
        };
        assert_eq!(body.len(), BIG, "{path}");
        assert_eq!(
            hex::encode(Sha256::digest(&body)),
            hex::encode(Sha256::digest(&want)),
            "{path}"
        );
    }

    // An upstream that hangs up before its declared length: the client
    // sees the body fail, never a short body passed off as complete.
    let resp = proxied(&node, &format!("http://127.0.0.1:{port}/cut-short")).await;
    assert_eq!(resp.status().as_u16(), 200);
    assert!(
        resp.bytes().await.is_err(),
        "a cut-short body arrived whole"
    );

    // Other schemes never reach the node's files.
    let (status, text) = via(&node, "file:///etc/passwd").await;
    assert_eq!(status, 502);
    assert!(text.starts_with("TypeError"), "{text}");
    assert!(!text.contains("root:"), "{text}");
}

#[tokio::test]
async fn private_addresses_are_refused_directly_via_dns_and_via_redirects() {
    let port = upstream().await;
    let (dns_port, queries) = loopback_dns().await;
    // Only the name allowed.test is opened up; the DNS server says every
    // name is 127.0.0.1.
    let node = node(
        PROXY,
        &format!(
            "[outbound]\nallow = [\"allowed.test\"]\nnameservers = [\"127.0.0.1:{dns_port}\"]\n"
        ),
    );
    assert_eq!(
        via(&node, &format!("http://allowed.test:{port}/hello")).await,
        (200, "upstream hello".into())
    );
    assert!(
        queries.load(Ordering::SeqCst) >= 1,
        "the node asked its DNS server"
    );

    // A name whose DNS answer is loopback (DNS rebinding): refused at the
    // resolved address.
    let (status, text) = via(&node, &format!("http://rebind.test:{port}/hello")).await;
    assert_eq!(status, 502, "{text}");
    assert!(text.starts_with("TypeError"), "{text}");
    assert!(
        text.contains("rebind.test (127.0.0.1)") && text.contains("loopback"),
        "{text}"
    );

    // The address itself, written as a literal.
    let (status, text) = via(&node, &format!("http://127.0.0.1:{port}/hello")).await;
    assert_eq!(status, 502, "{text}");
    assert!(text.contains("fetch() to 127.0.0.1 was refused"), "{text}");

    // An allowed host redirecting to a private one: refused on the hop,
    // whether the hop names an address or a name.
    for hop in [
        format!("http://127.0.0.2:{port}/hello"),
        format!("http://rebind.test:{port}/hello"),
    ] {
        let (status, text) = via(
            &node,
            &format!("http://allowed.test:{port}/redirect?to={hop}"),
        )
        .await;
        assert_eq!(status, 502, "{text}");
        assert!(
            text.starts_with("TypeError") && text.contains("refused"),
            "{text}"
        );
    }
    // A redirect within the allowance is followed.
    let ok = format!("http://allowed.test:{port}/hello");
    assert_eq!(
        via(
            &node,
            &format!("http://allowed.test:{port}/redirect?to={ok}")
        )
        .await,
        (200, "upstream hello".into())
    );
}

#[tokio::test]
async fn without_the_allowance_loopback_is_refused() {
    let port = upstream().await;
    let node = node(PROXY, "");
    let (status, text) = via(&node, &format!("http://127.0.0.1:{port}/hello")).await;
    assert_eq!(status, 502, "{text}");
    assert_eq!(
        text,
        format!(
            "TypeError: fetch() to 127.0.0.1 was refused: it is a loopback address, which workers may not reach"
        )
    );
    let (_, text) = via(&node, &format!("http://[::ffff:127.0.0.1]:{port}/hello")).await;
    assert!(text.contains("loopback"), "{text}");
}

#[tokio::test]
async fn subrequest_and_concurrency_limits_abort_and_timeout() {
    let port = upstream().await;
    let handler = format!(
        r#"
const up = "http://127.0.0.1:{port}";
export default {{
  async fetch(req) {{
    const test = new URL(req.url).pathname;
    if (test === "/subrequests") {{
      let ok = 0;
      try {{
        for (;;) {{ await (await fetch(up + "/hello")).text(); ok++; }}
      }} catch (e) {{
        return new Response(`${{ok}} ${{e.name}}: ${{e.message}}`);
      }}
    }}
    if (test === "/concurrency") {{
      // Six fetches wait for heads that never come: a seventh waits for
      // one of their slots; one whose signal aborts meanwhile gives up.
      const ctl = new AbortController();
      const open = [];
      for (let i = 0; i < 6; i++) open.push(fetch(up + "/slow", {{ signal: ctl.signal }}).catch((e) => e.name));
      let settled = false;
      // What it was called with counts, not what its init holds later.
      const init = {{ method: "GET" }};
      const queued = fetch(up + "/hello", init).then((r) => r.text()).finally(() => {{ settled = true; }});
      init.method = "NOT A METHOD";
      let timedOut;
      try {{ await fetch(up + "/hello", {{ signal: AbortSignal.timeout(200) }}); timedOut = "not aborted"; }}
      catch (e) {{ timedOut = e.name; }}
      const early = settled;
      ctl.abort();
      const names = await Promise.all(open);
      return new Response(`${{timedOut}} ${{early}} | ${{names.join(",")}} | ${{await queued}}`);
    }}
    if (test === "/timeout") {{
      const t0 = Date.now();
      try {{ await fetch(up + "/slow", {{ signal: AbortSignal.timeout(200) }}); }}
      catch (e) {{ return new Response(`${{e.name}} ${{Date.now() - t0}}`); }}
    }}
    if (test === "/abort") {{
      const ctl = new AbortController();
      setTimeout(() => ctl.abort(), 100);
      try {{ await fetch(up + "/slow", {{ signal: ctl.signal }}); }}
      catch (e) {{ return new Response(e.name); }}
    }}
    return new Response("unreachable", {{ status: 500 }});
  }},
}};
"#
    );
    // Fifty fetches cost more than 50 ms of CPU in a debug build.
    let node = node(
        &handler,
        "[outbound]\nallow = [\"127.0.0.1\"]\n\n[limits]\ncpu_ms = 5000\n",
    );
    let c = client();
    let get = |path: &'static str| {
        let c = c.clone();
        let url = node.url(path);
        async move {
            c.get(url)
                .send()
                .await
                .expect("request")
                .text()
                .await
                .expect("text")
        }
    };

    let text = get("/subrequests").await;
    assert!(text.starts_with("50 TypeError: "), "{text}");
    assert!(text.contains("50 subrequests"), "{text}");

    assert_eq!(
        get("/concurrency").await,
        "TimeoutError false | AbortError,AbortError,AbortError,AbortError,AbortError,AbortError \
         | upstream hello"
    );

    let started = Instant::now();
    let text = get("/timeout").await;
    let (name, ms) = text.split_once(' ').expect("name and time");
    assert_eq!(name, "TimeoutError", "{text}");
    let ms: u64 = ms.parse().expect("ms");
    assert!((150..5000).contains(&ms), "{text}");
    assert_eq!(get("/abort").await, "AbortError");
    assert!(started.elapsed() < Duration::from_secs(10));
}

#[tokio::test]
async fn a_body_without_a_declared_length_is_held_to_the_response_limit() {
    let port = upstream().await;
    // Reads the whole upstream body; answers with its size or the error.
    let handler = r#"
export default {
  async fetch(req) {
    const target = new URL(req.url).searchParams.get("url");
    try {
      const body = await (await fetch(target)).arrayBuffer();
      return new Response(`read ${body.byteLength}`);
    } catch (e) {
      return new Response(`${e.name}: ${e.message}`, { status: 502 });
    }
  },
};
"#;
    let node = node(
        handler,
        "[outbound]\nallow = [\"127.0.0.1\"]\n\n[limits]\ncpu_ms = 5000\nfetch_response_mb = 1\n",
    );
    // `/big` streams 8 MiB in chunks, with no content-length.
    let (status, text) = via(&node, &format!("http://127.0.0.1:{port}/big")).await;
    assert_eq!(status, 502, "{text}");
    assert_eq!(
        text,
        "TypeError: the response body is larger than the limit of 1048576 bytes"
    );
    // A declared length within the limit is read as before.
    let (status, text) = via(&node, &format!("http://127.0.0.1:{port}/hello")).await;
    assert_eq!((status, text.as_str()), (200, "read 14"));
}

#[tokio::test]
async fn a_piped_body_does_not_hold_back_the_head() {
    // An upstream that sends its head (with a declared length) and then
    // only sends the body once the client has seen that head, as an event
    // stream or long poll does. The node reads a first chunk early when one
    // is ready; when none is, the head must still go out at once.
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let port = listener.local_addr().expect("addr").port();
    let (seen_tx, seen_rx) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(async move {
        let Ok((mut conn, _)) = listener.accept().await else {
            return;
        };
        if read_head(&mut conn).await.is_none() {
            return;
        }
        let _ = conn
            .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\nconnection: close\r\n\r\n")
            .await;
        if seen_rx.await.is_ok() {
            let _ = conn.write_all(b"later").await;
        }
    });
    let node = node(PROXY, "[outbound]\nallow = [\"127.0.0.1\"]\n");
    let target = format!("http://127.0.0.1:{port}/");
    let resp = tokio::time::timeout(Duration::from_secs(10), proxied(&node, &target))
        .await
        .unwrap_or_else(|_| panic!("the head waited for the body\n{}", node.log()));
    assert_eq!(resp.status().as_u16(), 200);
    assert_eq!(resp.content_length(), Some(5));
    let _ = seen_tx.send(());
    assert_eq!(resp.text().await.expect("body"), "later");
}
