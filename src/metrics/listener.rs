//! The metrics listener (`serve --metrics-listen ADDR`): `GET /metrics` (Prometheus text),
//! `GET /healthz` (the process is up) and `GET /readyz` (a bundle is loaded and served) over
//! HTTP/1.1, for scrapers and probes that do not speak gRPC. Small on purpose: a few
//! connections at once, each with deadlines, and nothing but these three paths.

use std::convert::Infallible;
use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use http::{Method, Request, Response, StatusCode, header};
use http_body_util::Full;
use hyper::body::{Bytes, Incoming};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tokio::sync::Semaphore;

use super::{Metrics, Sample};

/// Connections served at once; more are closed as soon as they are accepted.
const MAX_CONNECTIONS: usize = 16;
/// The longest a client may take to send a request's headers.
const HEADER_TIMEOUT: Duration = Duration::from_secs(5);
/// The longest one connection stays open, whatever it does.
const CONNECTION_TIMEOUT: Duration = Duration::from_secs(30);
/// The largest request head read (a scraper's is a few hundred bytes).
const MAX_HEAD_BYTES: usize = 16 * 1024;

/// What the listener reads from the running service.
pub trait Source: Send + Sync + 'static {
    fn metrics(&self) -> &Arc<Metrics>;
    /// The gauges read at scrape time.
    fn sample(&self) -> Sample;
    /// True while the service takes traffic (a bundle is served and decisions can be audited).
    fn ready(&self) -> bool;
}

/// The state the probes answer from: nothing until the service is up, then the service.
#[derive(Default)]
pub struct Probes {
    source: OnceLock<Arc<dyn Source>>,
    stopping: AtomicBool,
}

impl Probes {
    pub fn new() -> Arc<Probes> {
        Arc::new(Probes::default())
    }

    /// The service is up: `/readyz` and `/metrics` answer from it from now on.
    pub fn serve_from(&self, source: Arc<dyn Source>) {
        let _ = self.source.set(source);
    }

    /// The server is shutting down: `/readyz` answers 503 from now on.
    pub fn stopping(&self) {
        self.stopping.store(true, Ordering::Relaxed);
    }

    fn ready(&self) -> bool {
        !self.stopping.load(Ordering::Relaxed) && self.source.get().is_some_and(|s| s.ready())
    }

    fn answer(&self, method: &Method, path: &str) -> Response<Full<Bytes>> {
        if !matches!(path, "/metrics" | "/healthz" | "/readyz") {
            return text(StatusCode::NOT_FOUND, "not found: the paths are /metrics, /healthz and /readyz\n");
        }
        if method != Method::GET && method != Method::HEAD {
            let mut response = text(StatusCode::METHOD_NOT_ALLOWED, "method not allowed: use GET\n");
            response.headers_mut().insert(header::ALLOW, header::HeaderValue::from_static("GET, HEAD"));
            return response;
        }
        match path {
            "/healthz" => text(StatusCode::OK, "ok\n"),
            "/readyz" if self.ready() => text(StatusCode::OK, "ready\n"),
            "/readyz" if self.stopping.load(Ordering::Relaxed) => {
                text(StatusCode::SERVICE_UNAVAILABLE, "not ready: shutting down\n")
            }
            "/readyz" if self.source.get().is_none() => {
                text(StatusCode::SERVICE_UNAVAILABLE, "not ready: the bundle is loading\n")
            }
            "/readyz" => text(
                StatusCode::SERVICE_UNAVAILABLE,
                "not ready: audit writes are failing, or the fleet's live state is older than --live-stale-after\n",
            ),
            _ => match self.source.get() {
                Some(source) => {
                    let body = source.metrics().render(source.sample());
                    let mut response = Response::new(Full::new(Bytes::from(body)));
                    response.headers_mut().insert(
                        header::CONTENT_TYPE,
                        header::HeaderValue::from_static(prometheus_client::encoding::prometheus_text::CONTENT_TYPE),
                    );
                    response
                }
                None => text(StatusCode::SERVICE_UNAVAILABLE, "no metrics yet: the bundle is loading\n"),
            },
        }
    }
}

fn text(status: StatusCode, body: &'static str) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from_static(body.as_bytes())));
    *response.status_mut() = status;
    response.headers_mut().insert(header::CONTENT_TYPE, header::HeaderValue::from_static("text/plain; charset=utf-8"));
    response
}

/// Serves the probes on `listener` until `shutdown` completes.
pub async fn serve(listener: TcpListener, probes: Arc<Probes>, shutdown: impl Future<Output = ()>) {
    let open = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    tokio::pin!(shutdown);
    loop {
        let accepted = tokio::select! {
            () = &mut shutdown => return,
            accepted = listener.accept() => accepted,
        };
        let stream = match accepted {
            Ok((stream, _)) => stream,
            Err(e) => {
                // Out of file descriptors: back off rather than spin.
                tracing::warn!(error = %e, "metrics listener: cannot accept a connection");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let Ok(permit) = open.clone().try_acquire_owned() else {
            drop(stream);
            continue;
        };
        let probes = probes.clone();
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |request: Request<Incoming>| {
                let response = probes.answer(request.method(), request.uri().path());
                std::future::ready(Ok::<_, Infallible>(response))
            });
            let connection = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(HEADER_TIMEOUT)
                .max_buf_size(MAX_HEAD_BYTES)
                .serve_connection(TokioIo::new(stream), service);
            // A malformed request is answered 400 by hyper and ends the connection.
            if let Ok(Err(e)) = tokio::time::timeout(CONNECTION_TIMEOUT, connection).await {
                tracing::debug!(error = %e, "metrics listener: connection ended");
            }
            drop(permit);
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Up(Arc<Metrics>, bool);

    impl Source for Up {
        fn metrics(&self) -> &Arc<Metrics> {
            &self.0
        }
        fn sample(&self) -> Sample {
            Sample::default()
        }
        fn ready(&self) -> bool {
            self.1
        }
    }

    #[test]
    fn probes_answer_by_state_path_and_method() {
        let probes = Probes::new();
        let status = |m: Method, p: &str| probes.answer(&m, p).status();
        assert_eq!(status(Method::GET, "/healthz"), StatusCode::OK);
        assert_eq!(status(Method::GET, "/readyz"), StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(status(Method::GET, "/metrics"), StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(status(Method::GET, "/nope"), StatusCode::NOT_FOUND);
        assert_eq!(status(Method::POST, "/metrics"), StatusCode::METHOD_NOT_ALLOWED);
        probes.serve_from(Arc::new(Up(Metrics::new(), true)));
        assert_eq!(status(Method::GET, "/readyz"), StatusCode::OK);
        assert_eq!(status(Method::GET, "/metrics"), StatusCode::OK);
        probes.stopping();
        assert_eq!(status(Method::GET, "/readyz"), StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(status(Method::GET, "/healthz"), StatusCode::OK);
    }

    #[test]
    fn not_ready_while_the_service_says_so() {
        let probes = Probes::new();
        probes.serve_from(Arc::new(Up(Metrics::new(), false)));
        assert_eq!(probes.answer(&Method::GET, "/readyz").status(), StatusCode::SERVICE_UNAVAILABLE);
    }
}
