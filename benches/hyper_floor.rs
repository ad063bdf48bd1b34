//! The floor Atoll's HTTP path is measured against: hyper alone, set up as
//! Atoll's worker threads are (tokio current-thread runtime with a
//! `LocalSet`, mimalloc, HTTP/1 with `half_close`), answering every request
//! with the head and body Atoll and `deno serve` send for hello world, and
//! running no JavaScript. Whatever a server spends per request above this
//! is its own layer.
//!
//! Serves until killed: `cargo bench --bench hyper_floor -- PORT`, or
//! `SERVERS=hyper benches/instructions.sh`.

use std::convert::Infallible;

use bytes::Bytes;
use http_body_util::Full;
use hyper::header::{CONTENT_TYPE, HeaderValue};
use hyper::{Request, Response, body::Incoming, service::service_fn};

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> std::io::Result<()> {
    // cargo bench passes `--bench`; the port is the first plain number.
    let port: u16 = std::env::args()
        .skip(1)
        .find_map(|a| a.parse().ok())
        .unwrap_or(18790);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let local = tokio::task::LocalSet::new();
    local.block_on(&rt, async move {
        let listener = tokio::net::TcpListener::bind(("127.0.0.1", port)).await?;
        println!("hyper floor listening on http://127.0.0.1:{port}");
        loop {
            let (stream, _) = listener.accept().await?;
            stream.set_nodelay(true)?;
            tokio::task::spawn_local(async move {
                let hello = service_fn(|_: Request<Incoming>| async {
                    let mut resp = Response::new(Full::new(Bytes::from_static(b"hello")));
                    resp.headers_mut().insert(
                        CONTENT_TYPE,
                        HeaderValue::from_static("text/plain;charset=UTF-8"),
                    );
                    Ok::<_, Infallible>(resp)
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .half_close(true)
                    .serve_connection(hyper_util::rt::TokioIo::new(stream), hello)
                    .await;
            });
        }
    })
}
