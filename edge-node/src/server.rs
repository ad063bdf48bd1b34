//! The HTTP server: connections, request conversion, error responses, logs.

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use arc_swap::ArcSwap;
use atoll_runtime::{DispatchError, HttpRequest, LimitKind, RequestId, Runtime};
use http::{HeaderName, HeaderValue, Request, Response, StatusCode};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::net::TcpListener;

use crate::body::{ResponseBody, TooLarge, full, request_body, response_body};
use crate::drain::Connections;
use crate::head_deadline::{ActiveRequest, HeadDeadline, Idle, TrackedBody, WriteProgress};
use crate::linger::LingerOnDrop;
use crate::routes::Routes;
use hyper_util::server::graceful::GracefulConnection;

/// Limits the server applies before a request reaches a tenant.
#[derive(Debug, Clone, Copy)]
pub struct ServerLimits {
    /// Largest request head (request line + headers); beyond it: 431.
    pub max_header_bytes: usize,
    /// Largest request body; a larger declared length gets 413, a larger
    /// streamed body is cut off with an error.
    pub max_body_bytes: u64,
    /// Time a client has to send the complete request head.
    pub header_read_timeout: std::time::Duration,
}

impl Default for ServerLimits {
    fn default() -> Self {
        ServerLimits {
            max_header_bytes: 64 * 1024,
            max_body_bytes: 100 * 1024 * 1024,
            header_read_timeout: std::time::Duration::from_secs(10),
        }
    }
}

/// An edge node: routes plus the runtime that executes them.
pub struct EdgeNode {
    runtime: Arc<Runtime>,
    routes: ArcSwap<Routes>,
    limits: ServerLimits,
    metrics: crate::metrics::Metrics,
    /// A listener has begun its shutdown: the node finishes what it has
    /// and is no longer ready for traffic.
    draining: std::sync::atomic::AtomicBool,
}

impl EdgeNode {
    /// A node serving `routes` with `runtime`.
    pub fn new(runtime: Arc<Runtime>, routes: Routes) -> Arc<EdgeNode> {
        Self::with_limits(runtime, routes, ServerLimits::default())
    }

    /// A node serving `routes` with `runtime` under `limits`.
    pub fn with_limits(
        runtime: Arc<Runtime>,
        routes: Routes,
        limits: ServerLimits,
    ) -> Arc<EdgeNode> {
        Arc::new(EdgeNode {
            runtime,
            routes: ArcSwap::from_pointee(routes),
            limits,
            metrics: crate::metrics::Metrics::default(),
            draining: std::sync::atomic::AtomicBool::new(false),
        })
    }

    /// Replaces the route table. Requests in flight finish on the
    /// deployment they started with; tenants whose version changed get a
    /// fresh isolate on their next request.
    pub fn set_routes(&self, routes: Routes) {
        self.routes.store(Arc::new(routes));
    }

    /// The current route table.
    pub fn routes(&self) -> Arc<Routes> {
        self.routes.load_full()
    }

    /// The node's request metrics.
    pub fn metrics(&self) -> &crate::metrics::Metrics {
        &self.metrics
    }

    /// Whether the node is shutting down (finishing in-flight requests,
    /// refusing new connections).
    pub fn is_draining(&self) -> bool {
        self.draining.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// The runtime behind this node.
    pub fn runtime(&self) -> &Arc<Runtime> {
        &self.runtime
    }

    /// Starts the isolate of the script that serves `host`, ahead of its
    /// first request.
    pub fn warm_host(&self, host: &str) {
        for deployment in self.routes.load().for_host(host) {
            self.runtime.warm(deployment);
        }
    }

    /// Accepts connections on `listener` until `shutdown` resolves, then
    /// stops accepting, lets in-flight requests finish (idle keep-alive
    /// connections are closed at once) and returns when all connections are
    /// done or `drain_deadline` has passed.
    pub async fn serve(
        self: Arc<Self>,
        listener: TcpListener,
        tls: Option<tokio_rustls::TlsAcceptor>,
        shutdown: impl Future<Output = ()>,
        drain_deadline: std::time::Duration,
    ) -> std::io::Result<()> {
        let protocols = Protocols::new(&self.limits);
        let connections = Arc::new(Connections::default());
        tokio::pin!(shutdown);
        loop {
            let (stream, peer) = tokio::select! {
                _ = &mut shutdown => break,
                accepted = listener.accept() => match accepted {
                    Ok(a) => a,
                    Err(e) => {
                        // Out of descriptors and similar: back off, keep serving.
                        tracing::warn!("accept failed: {e}");
                        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                        continue;
                    }
                },
            };
            let _ = stream.set_nodelay(true);
            // The connection is served on a worker thread, next to the
            // isolates: its socket moves to that thread's event loop.
            let stream = match stream.into_std() {
                Ok(s) => s,
                Err(e) => {
                    tracing::warn!(%peer, "could not hand the connection to a worker: {e}");
                    continue;
                }
            };
            let node = self.clone();
            let conn_node = self.clone();
            let scheme = if tls.is_some() { "https" } else { "http" };
            let deadline = HeadDeadline::new();
            let conn_deadline = deadline.clone();
            let service = service_fn(move |req| {
                let active = deadline.request_started();
                Served {
                    handling: node.handle(req, peer, scheme),
                    active: Some(active),
                }
            });
            // Counted from here, so shutdown also waits for a connection
            // whose task has not started on its worker yet.
            let registration = connections.register(&conn_deadline);
            let protocols = protocols.clone();
            let tls = tls.clone();
            let warm_node = self.clone();
            let handshake_timeout = self.limits.header_read_timeout;
            self.runtime.spawn_on_worker(move || async move {
                let _registration = registration;
                let stream = match tokio::net::TcpStream::from_std(stream) {
                    Ok(s) => s,
                    Err(e) => {
                        tracing::warn!(%peer, "could not register the connection: {e}");
                        return;
                    }
                };
                let result = match tls {
                    None => {
                        // The head deadline runs once the protocol is known:
                        // bound the wait for the first bytes that pick it.
                        let h2 =
                            match tokio::time::timeout(handshake_timeout, is_h2_preface(&stream))
                                .await
                            {
                                Ok(Ok(h2)) => h2,
                                _ => return,
                            };
                        protocols.serve(stream, h2, service, &conn_deadline).await
                    }
                    Some(acceptor) => {
                        let handshake = async {
                            let start = tokio_rustls::LazyConfigAcceptor::new(
                                rustls::server::Acceptor::default(),
                                stream,
                            )
                            .await?;
                            // The ClientHello names the host: boot its isolate
                            // while the handshake and the request are still
                            // on the wire.
                            if let Some(name) = start.client_hello().server_name() {
                                warm_node.warm_host(name);
                            }
                            start.into_stream(acceptor.config().clone()).await
                        };
                        let tls_stream =
                            match tokio::time::timeout(handshake_timeout, handshake).await {
                                Ok(Ok(s)) => s,
                                Ok(Err(e)) => {
                                    tracing::debug!(%peer, "TLS handshake failed: {e}");
                                    return;
                                }
                                Err(_) => {
                                    tracing::debug!(%peer, "TLS handshake timed out");
                                    return;
                                }
                            };
                        let h2 = tls_stream.get_ref().1.alpn_protocol() == Some(b"h2");
                        protocols
                            .serve(tls_stream, h2, service, &conn_deadline)
                            .await
                    }
                };
                match result {
                    // hyper answered 431 itself and closed the connection.
                    Err(e) if e.is_parse_too_large() => {
                        tracing::info!(target: "atoll::request", %peer, status = 431, "request head too large");
                        conn_node.metrics.rejected(431);
                    }
                    Err(e) => tracing::debug!(%peer, "connection ended: {e}"),
                    Ok(()) => {}
                }
            });
        }
        drop(listener);
        self.draining
            .store(true, std::sync::atomic::Ordering::Relaxed);
        tracing::info!("shutting down: finishing in-flight requests");
        tokio::select! {
            _ = connections.drain() => tracing::info!("all connections closed"),
            _ = tokio::time::sleep(drain_deadline) => tracing::warn!(
                "shutdown deadline of {} s passed with requests still in flight",
                drain_deadline.as_secs()
            ),
        }
        Ok(())
    }

    /// Handles one request: routes it and hands it to its tenant's isolate
    /// now; the returned future waits for the answer. Doing the first part
    /// before returning keeps the future hyper holds (and moves) per request
    /// small: it carries only what the answer needs.
    pub fn handle(
        self: &Arc<Self>,
        req: Request<Incoming>,
        peer: SocketAddr,
        scheme: &'static str,
    ) -> Handling {
        Handling(self.start(req, peer, scheme))
    }

    /// Routes `req` and hands it to its tenant's isolate, or answers it
    /// at once (bad host, no route, body too large).
    fn start(
        self: &Arc<Self>,
        req: Request<Incoming>,
        peer: SocketAddr,
        scheme: &'static str,
    ) -> HandlingState {
        let started = Instant::now();
        let request_id = new_request_id();
        let (parts, body) = req.into_parts();
        let http::request::Parts {
            method,
            uri,
            headers,
            ..
        } = parts;
        // The host becomes part of the URL the handler parses and selects
        // the route: it must be a plain authority. The usual Host header
        // (lowercase name, optional port) is checked and split in one pass.
        let host_header = headers.get(http::header::HOST);
        let (host, route_host) = match host_header.and_then(|h| split_plain_host(h.as_bytes())) {
            Some((host, name)) => (Some(host), Some(name)),
            None => {
                let host = match host_header {
                    Some(h) => h.to_str().ok(),
                    // HTTP/2 carries the host in :authority, not a Host header.
                    None => Some(uri.authority().map_or("localhost", |a| a.as_str())),
                }
                .filter(|h| is_plain_authority(h));
                (host, None)
            }
        };
        let path = uri.path_and_query().map_or("/", |p| p.as_str());
        let Some(host) = host else {
            tracing::info!(target: "atoll::request", %request_id, %method, %path, %peer, status = 400, "Host is not a valid host name");
            self.metrics.rejected(400);
            return HandlingState::Answered(Some(Box::new(plain(
                StatusCode::BAD_REQUEST,
                &request_id,
                "the Host header is not a valid host name\n".to_string(),
            ))));
        };

        let routes = self.routes.load();
        let routed = match route_host {
            Some(name) => routes.lookup_plain(name, uri.path()),
            None => routes.lookup(host, path),
        };
        let Some(deployment) = routed.cloned() else {
            tracing::info!(target: "atoll::request", %request_id, %method, %host, %path, %peer, status = 404, "no route");
            self.metrics.unrouted();
            return HandlingState::Answered(Some(Box::new(plain(
                StatusCode::NOT_FOUND,
                &request_id,
                format!("no worker is routed for host {host} and path {path}\n"),
            ))));
        };
        drop(routes);

        // hyper has parsed a declared `content-length` into the body's
        // exact size (HTTP/1 and HTTP/2): no second header lookup.
        let declared = hyper::body::Body::size_hint(&body).exact();
        if declared.is_some_and(|n| n > self.limits.max_body_bytes) {
            tracing::info!(target: "atoll::request", %request_id, %method, %host, %path, %peer, status = 413, "body too large");
            self.metrics
                .request(&deployment.tenant, 413, started, started.elapsed());
            return HandlingState::Answered(Some(Box::new(too_large(
                &request_id,
                self.limits.max_body_bytes,
            ))));
        }

        let span = tracing::info_span!(
            "request",
            %request_id,
            tenant = %deployment.tenant,
            deployment = %deployment.version
        );
        let url = [scheme, "://", host, path].concat();
        // Only the request's log lines show its CPU time: untracked unless
        // they will be written.
        let cpu = if tracing::enabled!(target: "atoll::request", tracing::Level::INFO) {
            atoll_runtime::RequestCpu::tracked()
        } else {
            atoll_runtime::RequestCpu::default()
        };
        let (body, body_too_large) = request_body(body, self.limits.max_body_bytes);
        let request = HttpRequest {
            request_id,
            received: started,
            method: method.clone(),
            url,
            headers,
            body,
            cpu: cpu.clone(),
        };
        // A cold start may log (pool misses, evictions): under this request.
        // Entered by a guard, not `in_scope`: a closure would take the
        // request (some 200 bytes) by a copy first.
        let entered = span.enter();
        let answer = self.runtime.dispatch(&deployment, request);
        drop(entered);
        HandlingState::Dispatched(Box::new(Dispatched {
            node: self.clone(),
            ctx: RequestContext {
                started,
                request_id,
                method,
                uri,
                peer,
                deployment,
                span,
                cpu,
                body_too_large,
            },
            answer,
        }))
    }

    /// Records and logs the outcome of a dispatched request and turns it
    /// into the client's response, its body wrapped by `wrap`. `ctx` is
    /// borrowed, not moved: the context and the response are large, and
    /// each move is a memcpy on this path.
    fn finish<B>(
        &self,
        ctx: &RequestContext,
        result: Result<Box<atoll_runtime::OutgoingResponse>, DispatchError>,
        wrap: impl FnOnce(ResponseBody) -> B,
    ) -> Response<B> {
        let RequestContext {
            started,
            request_id,
            method,
            uri,
            peer,
            deployment,
            span,
            cpu,
            body_too_large,
        } = ctx;
        // Rounded to hundredths of a millisecond for the log.
        // Absent (not tracked) when the access log is off: warnings then
        // go without it.
        let cpu_ms = || {
            cpu.get()
                .map(|cpu| (cpu.as_secs_f64() * 1e5).round() / 100.0)
        };
        let _entered = span.enter();
        let path = uri.path_and_query().map_or("/", |p| p.as_str());
        let elapsed = started.elapsed();
        // A handler that let the read error of an oversized body escape
        // gets the 413 the server would have sent for a declared length.
        let oversized = matches!(result, Err(DispatchError::Exception(_)))
            && body_too_large.as_ref().is_some_and(TooLarge::is_set);
        let status = match &result {
            _ if oversized => 413,
            Ok(r) => r.status,
            Err(e) => e.status(),
        };
        self.metrics
            .request(&deployment.tenant, status, *started, elapsed);
        if let Err(DispatchError::Limit(kind, _)) = &result {
            self.metrics.limit_termination(
                &deployment.tenant,
                match kind {
                    LimitKind::Cpu => "cpu",
                    LimitKind::Memory => "memory",
                    LimitKind::WallClock => "wall_clock",
                    LimitKind::Concurrency => "concurrency",
                },
            );
        }
        match result {
            Ok(resp) => {
                let status = resp.status;
                tracing::info!(
                    target: "atoll::request",
                    cpu_ms = cpu_ms(),
                    %peer,
                    "{method} {path} {status} {:.1}ms",
                    elapsed.as_secs_f64() * 1e3
                );
                build_response(resp, request_id, wrap)
            }
            Err(e) if oversized => {
                tracing::info!(
                    target: "atoll::request",
                    cpu_ms = cpu_ms(),
                    %peer,
                    "{method} {path} 413 {:.1}ms: the request body grew past the limit: {e}",
                    elapsed.as_secs_f64() * 1e3
                );
                too_large(request_id, self.limits.max_body_bytes).map(wrap)
            }
            Err(e) => {
                let status = e.status();
                match &e {
                    DispatchError::Limit(..) => tracing::warn!(
                        target: "atoll::request",
                        cpu_ms = cpu_ms(),
                        "{method} {path} {status} {:.1}ms: {e}",
                        elapsed.as_secs_f64() * 1e3
                    ),
                    _ => tracing::error!(
                        target: "atoll::request",
                        cpu_ms = cpu_ms(),
                        "{method} {path} {status} {:.1}ms: {e}",
                        elapsed.as_secs_f64() * 1e3
                    ),
                }
                let mut resp = plain(
                    StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR),
                    request_id,
                    format!("{} (request id {request_id})\n", e.public_message()),
                );
                if matches!(e, DispatchError::Limit(LimitKind::Concurrency, _)) {
                    resp.headers_mut()
                        .insert(http::header::RETRY_AFTER, HeaderValue::from_static("1"));
                }
                resp.map(wrap)
            }
        }
    }
}

/// A request being handled (see [`EdgeNode::handle`]); resolves to the
/// client's response.
pub struct Handling(HandlingState);

/// A request handed to its tenant's isolate.
struct Dispatched {
    /// The node, for metrics and logs once the answer arrives.
    node: Arc<EdgeNode>,
    /// For the log and metrics once the answer arrives.
    ctx: RequestContext,
    /// The isolate's answer.
    answer: atoll_runtime::Answer,
}

/// How [`EdgeNode::start`] left a request.
enum HandlingState {
    /// Answered without a tenant. Boxed: this rare answer would otherwise
    /// make every request's service future (which hyper moves into the
    /// connection's state) the size of a whole response.
    Answered(Option<Box<Response<ResponseBody>>>),
    /// Waiting for the tenant's isolate. Boxed: hyper moves the service
    /// future several times per request (into its slot, through polls), and
    /// unboxed this state made each move a `memcpy` of some 280 bytes.
    Dispatched(Box<Dispatched>),
    /// Resolved.
    Done,
}

impl HandlingState {
    /// Polls for the response, its body wrapped by `wrap`.
    fn poll_response<B>(
        &mut self,
        cx: &mut std::task::Context<'_>,
        wrap: impl FnOnce(ResponseBody) -> B,
    ) -> std::task::Poll<Response<B>> {
        use std::task::Poll;
        let result = match self {
            HandlingState::Dispatched(d) => {
                let Poll::Ready(result) = std::pin::Pin::new(&mut d.answer).poll(cx) else {
                    return Poll::Pending;
                };
                Some(result)
            }
            _ => None,
        };
        // The response is built as the returned value, not into a local
        // that is then copied out (it is some 160 bytes); the context is
        // dropped in place, not moved out.
        match (std::mem::replace(self, HandlingState::Done), result) {
            (HandlingState::Dispatched(d), Some(result)) => {
                Poll::Ready(d.node.finish(&d.ctx, result, wrap))
            }
            (HandlingState::Answered(Some(resp)), _) => Poll::Ready((*resp).map(wrap)),
            _ => panic!("Handling polled after completion"),
        }
    }
}

impl Future for Handling {
    type Output = Response<ResponseBody>;

    fn poll(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Self::Output> {
        self.0.poll_response(cx, |body| body)
    }
}

/// hyper's service future: a request's [`Handling`], whose response body
/// keeps the connection's request active until hyper has sent it.
struct Served {
    handling: Handling,
    active: Option<ActiveRequest>,
}

// hyper moves each request's service future into the connection's state,
// memory that has gone cold since the connection's last request: a few
// words move in registers, a larger future is a `memcpy` through cache misses.
const _: () = assert!(std::mem::size_of::<Served>() <= 32);

impl Future for Served {
    type Output = Result<Response<TrackedBody<ResponseBody>>, Infallible>;

    fn poll(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Self::Output> {
        let this = &mut *self;
        // The body is wrapped as the response is built, not mapped after.
        let active = &mut this.active;
        this.handling
            .0
            .poll_response(cx, |body| {
                TrackedBody::new(body, active.take().expect("Served polled after completion"))
            })
            .map(Ok)
    }
}

/// What logging and metrics need of a request once its answer arrives.
struct RequestContext {
    started: Instant,
    request_id: RequestId,
    method: http::Method,
    uri: http::Uri,
    peer: SocketAddr,
    deployment: Arc<atoll_runtime::Deployment>,
    span: tracing::Span,
    /// CPU the isolate charged the request, by the time it answered.
    cpu: atoll_runtime::RequestCpu,
    /// Set if its body grew past the limit while the handler read it.
    body_too_large: Option<TooLarge>,
}

/// hyper's HTTP/1 and HTTP/2 servers, configured from the node's limits.
/// TLS's ALPN or a cleartext connection's first bytes choose one, so
/// requests do not pass through a protocol-detecting wrapper.
#[derive(Clone)]
struct Protocols {
    h1: hyper::server::conn::http1::Builder,
    h2: hyper::server::conn::http2::Builder<TokioExecutor>,
    /// How long an HTTP/1 connection may wait for a request head, and an
    /// HTTP/2 connection may stay open with no stream.
    head_timeout: std::time::Duration,
}

impl Protocols {
    fn new(limits: &ServerLimits) -> Protocols {
        // hyper answers an oversized head with 431 itself. Its read buffer
        // limit alone is not enough: a head that arrives in one large read
        // is parsed whole before that limit is checked.
        let max_buf = limits.max_header_bytes.max(8192);
        let max_header_list = u32::try_from(limits.max_header_bytes).unwrap_or(u32::MAX);
        // Head and body go out in one buffer and one send(): a writev of
        // two small slices costs more in the kernel than the copy.
        let writev = false;
        // Idle or dead HTTP/2 peers are detected and dropped.
        let ping_every = std::time::Duration::from_secs(30);
        let ping_timeout = std::time::Duration::from_secs(10);

        let mut h1 = hyper::server::conn::http1::Builder::new();
        // The head timeout is the connection's HeadDeadline, not hyper's
        // per-request timer.
        // Half-close: a client may shut down its sending side after the
        // request and still gets the answer. Without it hyper reads the
        // socket again while each request is in flight, only to notice a
        // departed client early; that read reallocates its 8 KiB buffer
        // (the request's headers still share the old one) and cost about
        // 5 % of a small request's instructions. A client that leaves is
        // now noticed at the next write of its response, or by the head
        // deadline's look at the socket (see `HeadDeadline::serve`).
        h1.timer(TokioTimer::new())
            .max_buf_size(max_buf)
            .max_header_size(limits.max_header_bytes)
            .header_read_timeout(None)
            .writev(writev)
            .half_close(true);
        let mut h2 = hyper::server::conn::http2::Builder::new(TokioExecutor::new());
        h2.timer(TokioTimer::new())
            .max_header_list_size(max_header_list)
            .keep_alive_interval(ping_every)
            .keep_alive_timeout(ping_timeout);
        Protocols {
            h1,
            h2,
            head_timeout: limits.header_read_timeout,
        }
    }

    /// Serves `io` with HTTP/2 or HTTP/1 until it closes, the node shuts
    /// down (`deadline` is told to drain), or an HTTP/1 client keeps it
    /// waiting for a request head past the limit (HTTP/2 peers answer pings
    /// instead).
    async fn serve<I, S, B>(
        &self,
        io: I,
        h2: bool,
        service: S,
        deadline: &Arc<HeadDeadline>,
    ) -> Result<(), hyper::Error>
    where
        I: tokio::io::AsyncRead
            + tokio::io::AsyncWrite
            + std::os::fd::AsRawFd
            + Unpin
            + Send
            + 'static,
        S: hyper::service::HttpService<Incoming, ResBody = B> + Send + 'static,
        S::Future: Send + 'static,
        S::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
        B: hyper::body::Body + Send + 'static,
        B::Data: Send,
        B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    {
        let served = if h2 {
            let connection = self.h2.serve_connection(TokioIo::new(io), service);
            // A peer that answers pings but opens no streams is idle too.
            // HTTP/2 reads all the time: it sees a departed peer itself.
            deadline
                .serve(
                    connection,
                    Some((self.head_timeout, Idle::ShutDown)),
                    None,
                    GracefulConnection::graceful_shutdown,
                )
                .await
        } else {
            // hyper's HTTP/1 half-close: the deadline looks for a departed
            // client of a long request instead.
            let peer = io.as_raw_fd();
            // Closed lingering: a client still sending when the
            // connection ends reads its answer rather than a reset.
            let io = TokioIo::new(WriteProgress::new(LingerOnDrop::new(io), deadline.clone()));
            let connection = self.h1.serve_connection(io, service);
            deadline
                .serve(
                    connection,
                    Some((self.head_timeout, Idle::Drop)),
                    Some(peer),
                    GracefulConnection::graceful_shutdown,
                )
                .await
        };
        served.unwrap_or_else(|| {
            // Dropping the connection closed it: it sent no request head
            // in time, or its client left with a request in flight.
            tracing::debug!("closed an idle or abandoned connection");
            Ok(())
        })
    }
}

/// Whether a cleartext connection starts with HTTP/2's preface
/// (`PRI * HTTP/2.0`, prior knowledge) rather than an HTTP/1 request line.
/// Waits for the first bytes without consuming them.
async fn is_h2_preface(stream: &tokio::net::TcpStream) -> std::io::Result<bool> {
    // "PRI " is the preface's request line start; no HTTP/1 request begins
    // with it (RFC 9113 chose the method so), while PROPFIND and other
    // methods do begin with "PR".
    const PREFIX: &[u8; 4] = b"PRI ";
    let mut first = [0u8; 4];
    let mut pause = std::time::Duration::from_millis(1);
    loop {
        let n = stream.peek(&mut first).await?;
        if n == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        if n == PREFIX.len() || first[..n] != PREFIX[..n] {
            return Ok(first == *PREFIX);
        }
        // Rare: a client that sent less than four bytes of a possible
        // preface. peek does not wait for more once something is buffered,
        // so back off instead of spinning (the caller bounds the wait).
        tokio::time::sleep(pause).await;
        pause = (pause * 2).min(std::time::Duration::from_millis(100));
    }
}

/// Whether `host` is a plain authority (`name`, `name:port`, `[v6]:port`)
/// with no user info and a port a URL can have. Host headers are almost
/// always letters, digits, dots and dashes with an optional port: those
/// are accepted by a scan, anything else goes through the `http` crate's
/// full parse.
fn is_plain_authority(host: &str) -> bool {
    // A byte search: the char-aware rsplit costs more on this hot path.
    let (name, port) = match host.bytes().rposition(|b| b == b':') {
        Some(i) => (&host[..i], Some(&host[i + 1..])),
        None => (host, None),
    };
    let simple = !name.is_empty()
        && name.bytes().all(is_name_byte)
        && port.is_none_or(|p| is_port(p.as_bytes()));
    if simple {
        return true;
    }
    // The http crate accepts an empty host (`:80`) and any digits as a
    // port; a URL can have neither.
    let Ok(authority) = host.parse::<http::uri::Authority>() else {
        return false;
    };
    let after_host = host.strip_prefix(authority.host()).unwrap_or(":");
    !host.contains('@')
        && !authority.host().is_empty()
        && match after_host.as_bytes() {
            [] | [b':'] => true,
            [b':', port @ ..] => is_port(port),
            _ => false,
        }
}

/// The common Host header in one pass: a lowercase name of letters,
/// digits, dots and dashes (not ending in a dot), then optionally `:` and
/// a port. Returns it whole and its name alone (what routes match), or
/// `None` for anything else, which the full checks handle.
fn split_plain_host(value: &[u8]) -> Option<(&str, &str)> {
    // One loop finds the colon and checks the name's bytes: two passes
    // (a search, then a check) cost twice the loop overhead per byte.
    let mut end = value.len();
    for (i, &b) in value.iter().enumerate() {
        match HOST_BYTES[usize::from(b)] {
            HostByte::Name => {}
            HostByte::Colon => {
                end = i;
                break;
            }
            HostByte::Other => return None,
        }
    }
    let (name, port) = value.split_at(end);
    // `port` is empty or starts with the colon.
    if name.is_empty()
        || name.ends_with(b".")
        || port.get(1..).is_some_and(|digits| !is_port(digits))
    {
        return None;
    }
    // SAFETY: every byte is ASCII: the name's were checked above, the
    // port's are digits (`is_port`), and the colon between them. (The
    // checked conversion costs more than the whole check on this path.)
    let host = unsafe { std::str::from_utf8_unchecked(value) };
    Some((host, &host[..end]))
}

/// What a byte of the usual Host header is to [`split_plain_host`].
#[derive(Clone, Copy)]
enum HostByte {
    /// A lowercase letter, digit, dot or dash.
    Name,
    /// The colon before the port.
    Colon,
    /// Anything else.
    Other,
}

/// [`HostByte`] by byte: one load per byte, not a chain of range checks.
static HOST_BYTES: [HostByte; 256] = {
    let mut table = [HostByte::Other; 256];
    let mut b = 0;
    while b < 256 {
        table[b] = match b as u8 {
            b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' => HostByte::Name,
            b':' => HostByte::Colon,
            _ => HostByte::Other,
        };
        b += 1;
    }
    table
};

/// A byte of a plain host name: letters, digits, dots and dashes.
fn is_name_byte(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b == b'.' || b == b'-'
}

/// Whether `digits` is a TCP port number (0 to 65535).
fn is_port(digits: &[u8]) -> bool {
    !digits.is_empty()
        && digits.len() <= 5
        && digits.iter().all(u8::is_ascii_digit)
        && digits
            .iter()
            .fold(0u32, |n, d| n * 10 + u32::from(d - b'0'))
            <= 65535
}

/// A 16-hex-digit id, unique within the process and unlikely to repeat
/// across restarts: a random start plus a counter, scrambled by a bijective
/// mix so ids do not look sequential. No system call per request.
fn new_request_id() -> RequestId {
    use std::cell::Cell;
    use std::sync::atomic::{AtomicU64, Ordering};
    /// Counter values a thread takes at a time: the shared counter's cache
    /// line moves between cores once per block, not once per request.
    const BLOCK: u64 = 1 << 16;
    static SEED: std::sync::OnceLock<u64> = std::sync::OnceLock::new();
    static NEXT: AtomicU64 = AtomicU64::new(0);
    thread_local! {
        /// This thread's next counter value and the end of its block.
        static TAKEN: Cell<(u64, u64)> = const { Cell::new((0, 0)) };
    }
    let seed = *SEED.get_or_init(|| uuid::Uuid::new_v4().as_u64_pair().0);
    let n = TAKEN.with(|taken| {
        let (mut next, mut end) = taken.get();
        if next == end {
            next = NEXT.fetch_add(BLOCK, Ordering::Relaxed);
            end = next.wrapping_add(BLOCK);
        }
        taken.set((next.wrapping_add(1), end));
        next
    });
    let mut z = seed.wrapping_add(n);
    // splitmix64's finalizer: a bijection on u64.
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^= z >> 31;
    RequestId::from_u64(z)
}

/// The 413 for a body over `max_bytes`.
fn too_large(request_id: &RequestId, max_bytes: u64) -> Response<ResponseBody> {
    plain(
        StatusCode::PAYLOAD_TOO_LARGE,
        request_id,
        format!("the request body is larger than the limit of {max_bytes} bytes\n"),
    )
}

fn plain(status: StatusCode, request_id: &RequestId, text: String) -> Response<ResponseBody> {
    let mut resp = Response::new(full(text));
    *resp.status_mut() = status;
    let headers = resp.headers_mut();
    headers.insert(
        http::header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    if let Ok(v) = HeaderValue::from_str(request_id.as_str()) {
        headers.insert(HeaderName::from_static("x-request-id"), v);
    }
    resp
}

#[allow(
    clippy::boxed_local,
    reason = "the head arrives boxed; unboxing it for the call would copy it"
)]
fn build_response<B>(
    resp: Box<atoll_runtime::OutgoingResponse>,
    request_id: &RequestId,
    wrap: impl FnOnce(ResponseBody) -> B,
) -> Response<B> {
    let status = match StatusCode::from_u16(resp.status) {
        Ok(s) => s,
        Err(_) => {
            return plain(
                StatusCode::INTERNAL_SERVER_ERROR,
                request_id,
                format!("the worker returned an invalid status {}\n", resp.status),
            )
            .map(wrap);
        }
    };
    let mut out = Response::new(wrap(response_body(resp.body)));
    *out.status_mut() = status;
    let mut headers = resp.headers;
    // Framing belongs to the server: a tenant-chosen content-length that
    // disagrees with the body would desynchronize keep-alive connections
    // (response smuggling). Checked by scanning: responses rarely carry
    // any, and a lookup per name costs more than the scan.
    if headers.keys().any(is_hop_by_hop) {
        let hop: Vec<HeaderName> = headers
            .keys()
            .filter(|n| is_hop_by_hop(n))
            .cloned()
            .collect();
        for name in hop {
            headers.remove(name);
        }
    }
    *out.headers_mut() = headers;
    out
}

/// Headers that describe the connection or the body's framing, not the
/// response: hyper sets them from the body it sends. A name `http` knows
/// is compared by its tag, without reading its text from the table of
/// standard names (a cache miss on every response); the two it does not
/// know (`keep-alive`, `proxy-connection`) by their text.
fn is_hop_by_hop(name: &HeaderName) -> bool {
    use http::header::{CONNECTION, CONTENT_LENGTH, TE, TRAILER, TRANSFER_ENCODING, UPGRADE};
    static KEEP_ALIVE: HeaderName = HeaderName::from_static("keep-alive");
    static PROXY_CONNECTION: HeaderName = HeaderName::from_static("proxy-connection");
    *name == CONTENT_LENGTH
        || *name == TRANSFER_ENCODING
        || *name == CONNECTION
        || *name == UPGRADE
        || *name == TE
        || *name == TRAILER
        || *name == KEEP_ALIVE
        || *name == PROXY_CONNECTION
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What `is_h2_preface` decides for a client that sends `parts`, with
    /// a pause between them.
    async fn preface(parts: &[&'static [u8]]) -> bool {
        use tokio::io::AsyncWriteExt;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        let parts: Vec<&'static [u8]> = parts.to_vec();
        let client = tokio::spawn(async move {
            let mut c = tokio::net::TcpStream::connect(addr).await.expect("connect");
            for p in parts {
                c.write_all(p).await.expect("write");
                tokio::time::sleep(std::time::Duration::from_millis(20)).await;
            }
            c
        });
        let (server, _) = listener.accept().await.expect("accept");
        let h2 = is_h2_preface(&server).await.expect("peek");
        drop(client.await);
        h2
    }

    #[tokio::test]
    async fn only_the_http2_preface_selects_http2() {
        assert!(preface(&[b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"]).await);
        assert!(preface(&[b"PR", b"I * HTTP/2.0\r\n"]).await);
        assert!(!preface(&[b"PROPFIND / HTTP/1.1\r\n"]).await);
        assert!(!preface(&[b"POST / HTTP/1.1\r\n"]).await);
        assert!(!preface(&[b"P", b"UT / HTTP/1.1\r\n"]).await);
        assert!(!preface(&[b"GET / HTTP/1.1\r\n"]).await);
    }

    #[test]
    fn hop_by_hop_names_are_found_however_they_were_parsed() {
        for name in [
            "content-length",
            "Transfer-Encoding",
            "connection",
            "UPGRADE",
            "te",
            "trailer",
            "Keep-Alive",
            "proxy-connection",
        ] {
            let parsed = HeaderName::from_bytes(name.as_bytes()).expect("a valid name");
            assert!(is_hop_by_hop(&parsed), "{name} is hop-by-hop");
        }
        for name in [
            "content-type",
            "x-keep-alive",
            "tee",
            "date",
            "x-request-id",
        ] {
            let parsed = HeaderName::from_bytes(name.as_bytes()).expect("a valid name");
            assert!(!is_hop_by_hop(&parsed), "{name} is not hop-by-hop");
        }
    }

    #[test]
    fn host_headers_must_be_plain_authorities() {
        let host = |v: &'static str| {
            HeaderValue::from_static(v)
                .to_str()
                .ok()
                .filter(|h| is_plain_authority(h))
                .map(str::to_string)
        };
        for ok in [
            "example.com",
            "example.com:8080",
            "127.0.0.1:18900",
            "a-b.c:1",
            "[::1]:8080",
            "[::1]",
            "x:65535",
            "example.com:",
        ] {
            assert_eq!(host(ok).as_deref(), Some(ok), "{ok}");
        }
        for bad in [
            "",
            ":80",
            "example.com:65536",
            "[::1]:99999",
            "example.com:123456",
            "user@example.com",
            "example.com/path",
            "exa mple.com",
            "example.com:80:80",
            "example.com:8a",
        ] {
            assert_eq!(host(bad), None, "{bad}");
        }
    }

    #[test]
    fn the_one_pass_host_split_agrees_with_the_full_checks() {
        assert_eq!(
            split_plain_host(b"127.0.0.1:18900"),
            Some(("127.0.0.1:18900", "127.0.0.1"))
        );
        assert_eq!(
            split_plain_host(b"a-b.example.com"),
            Some(("a-b.example.com", "a-b.example.com"))
        );
        // Left to the full checks: uppercase (routes lowercase it), a
        // trailing dot, brackets, an empty or oversized port, junk.
        for slow in [
            "Example.com",
            "example.com.",
            "[::1]:8080",
            "example.com:",
            "x:65536",
            "x:1:2",
            "x:8a",
            "",
            ":80",
            "user@example.com",
        ] {
            assert_eq!(split_plain_host(slow.as_bytes()), None, "{slow}");
        }
        // Whatever it accepts, the full checks accept too.
        for ok in [
            "example.com",
            "example.com:8080",
            "a-b.c:1",
            "x:65535",
            "1.2.3.4",
        ] {
            assert!(split_plain_host(ok.as_bytes()).is_some(), "{ok}");
            assert!(is_plain_authority(ok), "{ok}");
        }
    }

    #[test]
    fn request_ids_stay_distinct_across_threads_and_blocks() {
        // Each thread goes past the end of its first block of counter values.
        let per_thread: Vec<Vec<String>> = std::thread::scope(|scope| {
            let threads: Vec<_> = (0..3)
                .map(|_| {
                    scope.spawn(|| (0..66_000).map(|_| new_request_id().to_string()).collect())
                })
                .collect();
            threads
                .into_iter()
                .map(|t| t.join().expect("thread"))
                .collect()
        });
        let ids: std::collections::HashSet<&String> = per_thread.iter().flatten().collect();
        assert_eq!(ids.len(), 3 * 66_000);
    }

    #[test]
    fn request_ids_are_distinct_16_digit_hex() {
        let ids: std::collections::HashSet<String> =
            (0..1000).map(|_| new_request_id().to_string()).collect();
        assert_eq!(ids.len(), 1000);
        for id in &ids {
            assert_eq!(id.len(), 16, "{id}");
            assert!(
                id.bytes()
                    .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase()),
                "{id}"
            );
        }
    }
}
