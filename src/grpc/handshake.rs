//! TLS on the accepted sockets: each connection that `limits::incoming` lets in is handshaken
//! on a task of its own, within the handshake timeout (a client that stalls loses its place
//! under `--max-connections`), with the configuration served at that moment (a certificate
//! reload never touches connections already open); the identity of the client's certificate
//! goes into the connection's `ConnInfo`.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::task::{Context, Poll};
use std::time::Duration;

use futures::{Stream, StreamExt};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio_rustls::TlsAcceptor;
use tokio_rustls::server::TlsStream;
use tonic::transport::server::Connected;

use super::limits::{Conn, ConnInfo, Shed};
use crate::tls::Tls;

/// A connection the server serves: plaintext, or TLS over the accepted socket.
pub enum Io {
    Plain(Conn),
    Tls(Box<TlsStream<Conn>>),
}

impl Connected for Io {
    type ConnectInfo = ConnInfo;

    fn connect_info(&self) -> ConnInfo {
        match self {
            Io::Plain(c) => c.connect_info(),
            Io::Tls(s) => s.get_ref().0.connect_info(),
        }
    }
}

/// The connections of `accepted`, as they are (no TLS).
pub fn plain(
    accepted: impl Stream<Item = io::Result<Conn>> + Send + 'static,
) -> impl Stream<Item = io::Result<Io>> + Send + 'static {
    accepted.map(|c| c.map(Io::Plain))
}

/// The connections of `accepted` once their TLS handshake is done. Handshakes run side by
/// side; one that fails or takes longer than `timeout` is dropped (counted in `shed`).
pub fn tls(
    accepted: impl Stream<Item = io::Result<Conn>> + Send + 'static,
    tls: Arc<Tls>,
    timeout: Duration,
    shed: Arc<Shed>,
) -> impl Stream<Item = io::Result<Io>> + Send + 'static {
    let (tx, rx) = tokio::sync::mpsc::channel::<io::Result<Io>>(64);
    tokio::spawn(async move {
        let mut accepted = std::pin::pin!(accepted);
        loop {
            // The server stopped taking connections: stop accepting (and let the socket go).
            let next = tokio::select! {
                () = tx.closed() => return,
                next = accepted.next() => next,
            };
            let conn = match next {
                Some(Ok(conn)) => conn,
                Some(Err(e)) => {
                    if tx.send(Err(e)).await.is_err() {
                        return;
                    }
                    continue;
                }
                None => return,
            };
            let acceptor = TlsAcceptor::from(tls.config());
            let (tx, shed) = (tx.clone(), shed.clone());
            tokio::spawn(async move {
                let remote = conn.connect_info().remote;
                match tokio::time::timeout(timeout, acceptor.accept(conn)).await {
                    Ok(Ok(mut stream)) => {
                        let identity = stream
                            .get_ref()
                            .1
                            .peer_certificates()
                            .and_then(|chain| chain.first())
                            .and_then(|leaf| crate::tls::identity(leaf))
                            .map(Arc::<str>::from);
                        stream.get_mut().0.set_identity(identity);
                        let _ = tx.send(Ok(Io::Tls(Box::new(stream)))).await;
                    }
                    Ok(Err(e)) => {
                        shed.metrics.refused(crate::metrics::Refusal::TlsHandshake);
                        let n = shed.handshakes_failed.fetch_add(1, Ordering::Relaxed);
                        // A scanner could fill the log: the first failure and every 1,000th
                        // are warnings, the rest debug lines.
                        if n % 1000 == 0 {
                            tracing::warn!(remote = ?remote, error = %e, failed = n + 1, "TLS handshake failed");
                        } else {
                            tracing::debug!(remote = ?remote, error = %e, "TLS handshake failed");
                        }
                    }
                    Err(_) => {
                        shed.metrics.refused(crate::metrics::Refusal::TlsHandshakeTimeout);
                        let n = shed.handshakes_timed_out.fetch_add(1, Ordering::Relaxed);
                        if n % 1000 == 0 {
                            tracing::warn!(remote = ?remote, timed_out = n + 1, "TLS handshake not done in time: connection closed");
                        }
                    }
                }
            });
        }
    });
    tokio_stream::wrappers::ReceiverStream::new(rx)
}

impl AsyncRead for Io {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Io::Plain(c) => Pin::new(c).poll_read(cx, buf),
            Io::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Io {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Io::Plain(c) => Pin::new(c).poll_write(cx, buf),
            Io::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Io::Plain(c) => Pin::new(c).poll_write_vectored(cx, bufs),
            Io::Tls(s) => Pin::new(s.as_mut()).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match self {
            Io::Plain(c) => c.is_write_vectored(),
            Io::Tls(s) => s.is_write_vectored(),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Io::Plain(c) => Pin::new(c).poll_flush(cx),
            Io::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Io::Plain(c) => Pin::new(c).poll_shutdown(cx),
            Io::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }
}
