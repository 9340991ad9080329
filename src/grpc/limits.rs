//! What one caller can take from the server: connections (a cap, and idle ones closed),
//! streams per connection, calls in flight (shed with RESOURCE_EXHAUSTED, with a separate
//! allowance for admin and health calls so that a flood cannot lock out the kill switch),
//! and batch items in flight. Accepted sockets get TCP_NODELAY and keepalive here, because
//! tonic ignores its own socket options on a stream it is handed.

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use futures::Stream;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::time::{Instant, Sleep};
use tonic::transport::server::Connected;

use crate::metrics::{Metrics, Refusal, Rpc};

/// The server's limits; every one is a flag of `agentca serve`.
#[derive(Debug, Clone)]
pub struct Limits {
    /// Open connections; one more is closed as soon as it is accepted.
    pub max_connections: usize,
    /// HTTP/2 streams one connection may have open at once.
    pub max_streams_per_connection: u32,
    /// Decision calls (Evaluate, EvaluateBatch, Check) in flight; one more is RESOURCE_EXHAUSTED.
    pub max_in_flight: usize,
    /// Admin, health and reflection calls in flight, apart from decisions.
    pub max_admin_in_flight: usize,
    /// EvaluateBatch items in flight across all batches.
    pub max_batch_items_in_flight: usize,
    /// A connection with no call for this long is closed (None: never).
    pub idle_timeout: Option<Duration>,
    /// A call not answered within this is ended (DEADLINE_EXCEEDED), so a caller that opens a
    /// stream and never sends its message cannot hold a place in flight for ever.
    pub call_timeout: Duration,
    /// HTTP/2 PING interval, and how long to wait for its answer before closing.
    pub keepalive_interval: Duration,
    pub keepalive_timeout: Duration,
    /// A TLS handshake not done within this is dropped, and its place under
    /// `max_connections` freed: a client that connects and stalls cannot hold one.
    pub handshake_timeout: Duration,
}

impl Default for Limits {
    /// Defaults that hold about 2 GB: 128 calls in flight × (a 4 MiB message + its decoded
    /// form) ≈ 1 GiB, plus 1,024 connections × their HTTP/2 receive windows.
    fn default() -> Self {
        Limits {
            max_connections: 1024,
            max_streams_per_connection: 128,
            max_in_flight: 128,
            max_admin_in_flight: 16,
            max_batch_items_in_flight: 20_000,
            idle_timeout: Some(Duration::from_secs(120)),
            call_timeout: Duration::from_secs(30),
            keepalive_interval: Duration::from_secs(30),
            keepalive_timeout: Duration::from_secs(10),
            handshake_timeout: Duration::from_secs(10),
        }
    }
}

/// Counters of what the limits turned away, and the metrics that calls are recorded in.
#[derive(Debug, Default)]
pub struct Shed {
    pub connections: AtomicU64,
    pub calls: AtomicU64,
    pub idle_closed: AtomicU64,
    /// TLS handshakes that failed (no or an untrusted client certificate, not TLS at all).
    pub handshakes_failed: AtomicU64,
    /// TLS handshakes not done within the handshake timeout.
    pub handshakes_timed_out: AtomicU64,
    pub metrics: Arc<Metrics>,
}

impl Shed {
    pub fn new(metrics: Arc<Metrics>) -> Shed {
        Shed { metrics, ..Shed::default() }
    }
}

/// Accepted connections, at most `max_connections` open at once.
pub fn incoming(
    listener: TcpListener,
    limits: &Limits,
    shed: Arc<Shed>,
) -> impl Stream<Item = io::Result<Conn>> + Send + 'static {
    let open = Arc::new(Semaphore::new(limits.max_connections.clamp(1, Semaphore::MAX_PERMITS)));
    let idle = limits.idle_timeout;
    let keepalive =
        socket2::TcpKeepalive::new().with_time(Duration::from_secs(60)).with_interval(Duration::from_secs(10));
    futures::stream::unfold(listener, move |listener| {
        let (open, shed, keepalive) = (open.clone(), shed.clone(), keepalive.clone());
        async move {
            loop {
                let (stream, remote) = match listener.accept().await {
                    Ok(accepted) => accepted,
                    Err(e) => {
                        // Out of file descriptors (EMFILE) or memory: tonic would retry at once,
                        // in a busy loop. Back off a little; idle connections close meanwhile.
                        tracing::warn!(error = %e, "cannot accept a connection");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                };
                let Ok(permit) = open.clone().try_acquire_owned() else {
                    shed.metrics.refused(Refusal::Connections);
                    if shed.connections.fetch_add(1, Ordering::Relaxed) % 1000 == 0 {
                        tracing::warn!(%remote, "too many connections (--max-connections): closing new ones");
                    }
                    drop(stream);
                    continue;
                };
                if let Err(e) = stream.set_nodelay(true) {
                    tracing::debug!(error = %e, "cannot set TCP_NODELAY");
                }
                if let Err(e) = socket2::SockRef::from(&stream).set_tcp_keepalive(&keepalive) {
                    tracing::debug!(error = %e, "cannot set TCP keepalive");
                }
                let state = Arc::new(Activity::new());
                let timer = idle.map(|d| Box::pin(tokio::time::sleep(d)));
                let conn = Conn {
                    io: stream,
                    remote: Some(remote),
                    peer: Some(remote.to_string().into()),
                    identity: None,
                    state,
                    idle,
                    timer,
                    shed: shed.clone(),
                    _open: permit,
                };
                return Some((Ok(conn), listener));
            }
        }
    })
}

/// What is known of a connection's calls: how many are running, and when the last one ended.
#[derive(Debug)]
pub struct Activity {
    born: Instant,
    running: AtomicU32,
    /// Milliseconds after `born` when a call last started or ended.
    last_ms: AtomicU64,
}

impl Activity {
    fn new() -> Self {
        Activity { born: Instant::now(), running: AtomicU32::new(0), last_ms: AtomicU64::new(0) }
    }

    fn stamp(&self) {
        self.last_ms.store(self.born.elapsed().as_millis() as u64, Ordering::Relaxed);
    }

    /// Marks a call running until the guard drops.
    fn begin(self: &Arc<Self>) -> Running {
        self.running.fetch_add(1, Ordering::AcqRel);
        self.stamp();
        Running(self.clone())
    }

    /// When the connection will have been idle for `idle`; None while a call runs.
    fn idle_deadline(&self, idle: Duration) -> Option<Instant> {
        if self.running.load(Ordering::Acquire) > 0 {
            return None;
        }
        Some(self.born + Duration::from_millis(self.last_ms.load(Ordering::Relaxed)) + idle)
    }
}

struct Running(Arc<Activity>);

impl Drop for Running {
    fn drop(&mut self) {
        self.0.stamp();
        self.0.running.fetch_sub(1, Ordering::AcqRel);
    }
}

/// An accepted connection: the socket, its place under `max_connections`, and its idle timer.
pub struct Conn {
    io: TcpStream,
    remote: Option<SocketAddr>,
    /// `remote` as text, written once for every record of the connection's calls.
    peer: Option<Arc<str>>,
    /// The identity of the client's certificate, once a TLS handshake has given one.
    identity: Option<Arc<str>>,
    state: Arc<Activity>,
    idle: Option<Duration>,
    timer: Option<Pin<Box<Sleep>>>,
    shed: Arc<Shed>,
    _open: OwnedSemaphorePermit,
}

/// What a call knows of its connection (in the request's extensions).
#[derive(Debug, Clone)]
pub struct ConnInfo {
    pub remote: Option<SocketAddr>,
    /// `remote` as text.
    pub peer: Option<Arc<str>>,
    /// The identity of the client's certificate (mutual TLS), if it has one.
    pub identity: Option<Arc<str>>,
    activity: Arc<Activity>,
}

impl Connected for Conn {
    type ConnectInfo = ConnInfo;

    fn connect_info(&self) -> ConnInfo {
        ConnInfo {
            remote: self.remote,
            peer: self.peer.clone(),
            identity: self.identity.clone(),
            activity: self.state.clone(),
        }
    }
}

impl Conn {
    /// Records the identity of the client's certificate, once the TLS handshake is done.
    pub fn set_identity(&mut self, identity: Option<Arc<str>>) {
        self.identity = identity;
    }

    /// True once the connection has had no call for the idle timeout. A PING answer is not a
    /// call: a client that only keeps the connection alive is idle all the same.
    fn idle_expired(&mut self, cx: &mut Context<'_>) -> bool {
        let (Some(timer), Some(idle)) = (&mut self.timer, self.idle) else { return false };
        loop {
            if timer.as_mut().poll(cx).is_pending() {
                return false;
            }
            match self.state.idle_deadline(idle) {
                Some(deadline) if deadline <= Instant::now() => {
                    self.shed.idle_closed.fetch_add(1, Ordering::Relaxed);
                    return true;
                }
                Some(deadline) => timer.as_mut().reset(deadline),
                None => timer.as_mut().reset(Instant::now() + idle),
            }
        }
    }
}

impl AsyncRead for Conn {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        match Pin::new(&mut this.io).poll_read(cx, buf) {
            Poll::Pending if this.idle_expired(cx) => Poll::Ready(Ok(())), // end of stream: close
            other => other,
        }
    }
}

impl AsyncWrite for Conn {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_shutdown(cx)
    }
}

/// The tower layer that sheds calls past the in-flight limits and marks connection activity.
#[derive(Clone)]
pub struct GuardLayer {
    decisions: Arc<Semaphore>,
    admin: Arc<Semaphore>,
    call_timeout: Duration,
    shed: Arc<Shed>,
}

impl GuardLayer {
    pub fn new(limits: &Limits, shed: Arc<Shed>) -> Self {
        GuardLayer {
            decisions: Arc::new(Semaphore::new(limits.max_in_flight.clamp(1, Semaphore::MAX_PERMITS))),
            admin: Arc::new(Semaphore::new(limits.max_admin_in_flight.clamp(1, Semaphore::MAX_PERMITS))),
            call_timeout: limits.call_timeout,
            shed,
        }
    }
}

impl<S> tower::Layer<S> for GuardLayer {
    type Service = Guard<S>;

    fn layer(&self, inner: S) -> Guard<S> {
        Guard { inner, layer: self.clone() }
    }
}

#[derive(Clone)]
pub struct Guard<S> {
    inner: S,
    layer: GuardLayer,
}

impl<S, B> tower::Service<http::Request<B>> for Guard<S>
where
    S: tower::Service<http::Request<B>, Response = http::Response<tonic::body::Body>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
    B: Send + 'static,
{
    type Response = http::Response<tonic::body::Body>;
    type Error = S::Error;
    type Future = futures::future::BoxFuture<'static, Result<Self::Response, Self::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        let started = Instant::now();
        let running = request.extensions().get::<ConnInfo>().map(|c| c.activity.begin());
        // Admin and health calls have an allowance of their own: a flood of decisions must not
        // keep an operator from disabling an agent or a probe from reading health.
        let path = request.uri().path();
        let rpc = Rpc::of_path(path);
        let metrics = self.layer.shed.metrics.clone();
        let decision = path.starts_with("/agentca.v1.DecisionService/") || path.starts_with("/envoy.");
        let pool = if decision { &self.layer.decisions } else { &self.layer.admin };
        let Ok(permit) = pool.clone().try_acquire_owned() else {
            self.layer.shed.calls.fetch_add(1, Ordering::Relaxed);
            metrics.refused(if decision { Refusal::InFlight } else { Refusal::AdminInFlight });
            metrics.handled(rpc, tonic::Code::ResourceExhausted as i32, started.elapsed());
            let status = tonic::Status::resource_exhausted(
                "the server is at its limit of calls in flight (--max-in-flight): retry with backoff",
            );
            return Box::pin(std::future::ready(Ok(status.into_http())));
        };
        // The service that was polled ready takes the call; its clone waits for the next one.
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        let call_timeout = self.layer.call_timeout;
        Box::pin(async move {
            let in_flight = metrics.call();
            let Ok(answered) = tokio::time::timeout(call_timeout, inner.call(request)).await else {
                metrics.refused(Refusal::CallTimeout);
                metrics.handled(rpc, tonic::Code::DeadlineExceeded as i32, started.elapsed());
                let status = tonic::Status::deadline_exceeded(
                    "the call was not answered within the server's call timeout (--call-timeout-secs)",
                );
                return Ok(status.into_http());
            };
            let mut response = answered?;
            drop(permit);
            drop(running);
            drop(in_flight);
            if remap_limits(&mut response) {
                metrics.refused(Refusal::MessageSize);
            }
            metrics.handled(rpc, status_code(&response), started.elapsed());
            Ok(response)
        })
    }
}

/// tonic answers a request over the message limit with OUT_OF_RANGE; it is a resource limit.
/// True if the answer was such.
fn remap_limits(response: &mut http::Response<tonic::body::Body>) -> bool {
    let too_large = response
        .extensions()
        .get::<tonic::Status>()
        .is_some_and(|s| s.code() == tonic::Code::OutOfRange && s.message().contains("message length too large"));
    if too_large {
        let code = http::HeaderValue::from(tonic::Code::ResourceExhausted as i32);
        response.headers_mut().insert(tonic::Status::GRPC_STATUS, code);
    }
    too_large
}

/// The gRPC status of an answer: in its headers when it is an error (trailers only), else OK
/// (a unary answer's OK comes in its trailers, after the message).
fn status_code(response: &http::Response<tonic::body::Body>) -> i32 {
    response
        .headers()
        .get(tonic::Status::GRPC_STATUS)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse().ok())
        .unwrap_or(tonic::Code::Ok as i32)
}

/// Batch items in flight across all batches.
#[derive(Debug, Clone)]
pub struct BatchItems(Arc<Semaphore>);

impl BatchItems {
    pub fn new(limit: usize) -> Self {
        BatchItems(Arc::new(Semaphore::new(limit.clamp(1, Semaphore::MAX_PERMITS))))
    }

    /// Room for `n` items, or None when the server is at its limit.
    pub fn try_take(&self, n: usize) -> Option<OwnedSemaphorePermit> {
        let n = u32::try_from(n.max(1)).ok()?;
        self.0.clone().try_acquire_many_owned(n).ok()
    }
}

#[cfg(test)]
mod tests {
    use futures::StreamExt;
    use tokio::io::AsyncReadExt;

    use super::*;

    async fn accept_one(limits: &Limits) -> (Conn, TcpStream, Arc<Shed>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let shed = Arc::new(Shed::default());
        let mut incoming = Box::pin(incoming(listener, limits, shed.clone()));
        let client = TcpStream::connect(addr).await.unwrap();
        let conn = incoming.next().await.unwrap().unwrap();
        (conn, client, shed)
    }

    #[tokio::test]
    async fn accepted_sockets_have_nodelay_and_keepalive() {
        let (conn, _client, _) = accept_one(&Limits::default()).await;
        assert!(conn.io.nodelay().unwrap());
        assert!(socket2::SockRef::from(&conn.io).keepalive().unwrap());
        assert_eq!(socket2::SockRef::from(&conn.io).tcp_keepalive_time().unwrap(), Duration::from_secs(60));
    }

    #[tokio::test]
    async fn an_idle_connection_ends_and_a_running_call_keeps_it() {
        let limits = Limits { idle_timeout: Some(Duration::from_millis(50)), ..Limits::default() };
        let (mut conn, _client, shed) = accept_one(&limits).await;
        // A call in flight: the connection is not idle however long it takes.
        let running = conn.state.begin();
        let mut buf = [0u8; 16];
        let waited = tokio::time::timeout(Duration::from_millis(200), conn.read(&mut buf)).await;
        assert!(waited.is_err(), "closed while a call was running");
        drop(running);
        // No call: the read ends (end of stream) once the idle timeout has passed.
        let n = tokio::time::timeout(Duration::from_secs(5), conn.read(&mut buf)).await.unwrap().unwrap();
        assert_eq!(n, 0);
        assert_eq!(shed.idle_closed.load(Ordering::Relaxed), 1);
    }

    #[tokio::test]
    async fn connections_past_the_cap_are_closed() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let shed = Arc::new(Shed::default());
        let limits = Limits { max_connections: 2, ..Limits::default() };
        let mut incoming = Box::pin(incoming(listener, &limits, shed.clone()));
        let _a = TcpStream::connect(addr).await.unwrap();
        let _b = TcpStream::connect(addr).await.unwrap();
        let (first, second) = (incoming.next().await.unwrap().unwrap(), incoming.next().await.unwrap().unwrap());
        let mut c = TcpStream::connect(addr).await.unwrap();
        let accepting = tokio::spawn(async move { incoming.next().await.map(|c| c.is_ok()) });
        // The third is accepted and closed at once: its reader sees the end.
        let mut buf = [0u8; 1];
        let n = tokio::time::timeout(Duration::from_secs(5), c.read(&mut buf)).await.unwrap().unwrap_or(0);
        assert_eq!(n, 0);
        assert_eq!(shed.connections.load(Ordering::Relaxed), 1);
        // Once one closes, the next is served.
        drop(first);
        let _d = TcpStream::connect(addr).await.unwrap();
        assert_eq!(tokio::time::timeout(Duration::from_secs(5), accepting).await.unwrap().unwrap(), Some(true));
        drop(second);
    }
}
