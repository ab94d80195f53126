//! The Docker Engine itself as an upstream, over unix, tcp or tls.
//!
//! HTTP/1.1 only (the engine cannot hijack an HTTP/2 request), keep-alive
//! connections pooled, and upgrades handed back as raw streams.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use http::{Request, StatusCode, Uri};
use hyper_util::client::legacy::connect::{Connected, Connection};
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpStream, UnixStream};
use tokio_rustls::client::TlsStream;
use tokio_rustls::TlsConnector;

use super::address::EngineAddress;
use super::{error_chain, BoxFuture, BoxedIo, Exchange, FailureKind, Upstream, UpstreamError};
use crate::body::{self, Body};
use crate::link::transport::tcp_connect;
use crate::tls::{self, TlsError, TlsFiles};

/// Where the pooled client thinks it connects; the connector ignores it.
const POOL_ORIGIN: &str = "http://api.moby.localhost";

pub struct EngineUpstream {
    client: Client<EngineConnector, Body>,
    described: String,
}

impl EngineUpstream {
    pub fn new(address: EngineAddress, tls_files: &TlsFiles) -> Result<Self, TlsError> {
        let tls = match &address {
            EngineAddress::Tls { .. } => {
                Some(TlsConnector::from(Arc::new(tls::client_config(tls_files, &[b"http/1.1"])?)))
            }
            _ => None,
        };
        let described = address.to_string();
        let connector = EngineConnector { address: Arc::new(address), tls };
        // Idle engine connections are closed after a while and bounded in
        // number: a burst of long requests must not pin its peak forever
        // (the idle reaper only runs with a timer).
        let client = Client::builder(TokioExecutor::new())
            .pool_timer(TokioTimer::new())
            .pool_idle_timeout(Duration::from_secs(30))
            .pool_max_idle_per_host(16)
            .http1_title_case_headers(true)
            .build(connector);
        Ok(Self { client, described })
    }
}

impl Upstream for EngineUpstream {
    fn send(&self, mut request: Request<Body>) -> BoxFuture<Result<Exchange, UpstreamError>> {
        let client = self.client.clone();
        let target = self.described.clone();
        Box::pin(async move {
            *request.uri_mut() = pool_uri(request.uri());
            // The pooled client speaks HTTP/1.1 upstream whatever the client spoke.
            *request.version_mut() = http::Version::HTTP_11;
            let mut response = client.request(request).await.map_err(|error| {
                // A refused TLS handshake can surface mid-request (TLS 1.3
                // checks the client certificate after the client finished).
                let tls = tls::explain_failure(&error);
                UpstreamError {
                    kind: if error.is_connect() || tls.is_some() {
                        FailureKind::Unreachable
                    } else {
                        FailureKind::Broken
                    },
                    what: "the Docker engine",
                    target: target.clone(),
                    reason: tls.unwrap_or_else(|| error_chain(&error)),
                }
            })?;
            let upgrade = (response.status() == StatusCode::SWITCHING_PROTOCOLS).then(|| {
                let pending = hyper::upgrade::on(&mut response);
                Box::pin(async move {
                    let upgraded = pending.await.map_err(io::Error::other)?;
                    Ok(Box::new(TokioIo::new(upgraded)) as BoxedIo)
                }) as BoxFuture<io::Result<BoxedIo>>
            });
            Ok(Exchange { response: response.map(body::stream), upgrade })
        })
    }

    fn describe(&self) -> &str {
        &self.described
    }
}

/// The absolute URI the pooled client needs; path and query stay byte-exact.
fn pool_uri(uri: &Uri) -> Uri {
    let path = uri.path_and_query().map(|pq| pq.as_str()).unwrap_or("/");
    format!("{POOL_ORIGIN}{path}").parse().unwrap_or_else(|_| uri.clone())
}

#[derive(Clone)]
struct EngineConnector {
    address: Arc<EngineAddress>,
    tls: Option<TlsConnector>,
}

impl tower_service::Service<Uri> for EngineConnector {
    type Response = TokioIo<EngineStream>;
    type Error = io::Error;
    type Future = BoxFuture<io::Result<TokioIo<EngineStream>>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, _: Uri) -> Self::Future {
        let address = self.address.clone();
        let tls = self.tls.clone();
        Box::pin(async move { connect(&address, tls).await.map(TokioIo::new) })
    }
}

async fn connect(address: &EngineAddress, tls: Option<TlsConnector>) -> io::Result<EngineStream> {
    match address {
        EngineAddress::Unix(path) => UnixStream::connect(path).await.map(EngineStream::Unix),
        EngineAddress::Tcp { host, port } => tcp_connect(host, *port).await.map(EngineStream::Tcp),
        EngineAddress::Tls { host, port } => {
            let tcp = tcp_connect(host, *port).await?;
            let connector = tls.ok_or_else(|| io::Error::other("TLS is not configured"))?;
            let name = rustls::pki_types::ServerName::try_from(host.clone())
                .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
            let stream = connector.connect(name, tcp).await?;
            Ok(EngineStream::Tls(Box::new(stream)))
        }
    }
}

/// One connection to the engine, whatever the transport.
pub enum EngineStream {
    Unix(UnixStream),
    Tcp(TcpStream),
    Tls(Box<TlsStream<TcpStream>>),
}

impl Connection for EngineStream {
    fn connected(&self) -> Connected {
        Connected::new()
    }
}

macro_rules! delegate {
    ($self:ident, $stream:ident => $call:expr) => {
        match $self.get_mut() {
            EngineStream::Unix($stream) => $call,
            EngineStream::Tcp($stream) => $call,
            EngineStream::Tls($stream) => $call,
        }
    };
}

impl AsyncRead for EngineStream {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        delegate!(self, s => Pin::new(s).poll_read(cx, buf))
    }
}

impl AsyncWrite for EngineStream {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        delegate!(self, s => Pin::new(s).poll_write(cx, buf))
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        delegate!(self, s => Pin::new(s).poll_write_vectored(cx, bufs))
    }

    fn is_write_vectored(&self) -> bool {
        match self {
            EngineStream::Unix(s) => s.is_write_vectored(),
            EngineStream::Tcp(s) => s.is_write_vectored(),
            EngineStream::Tls(s) => s.is_write_vectored(),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        delegate!(self, s => Pin::new(s).poll_flush(cx))
    }

    /// Half-close: a FIN (after TLS close_notify), never a full close.
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        delegate!(self, s => Pin::new(s).poll_shutdown(cx))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pool_uri_keeps_path_and_query_exact() {
        let uri: Uri = "/v1.41/containers/json?all=1&filters=%7B%22a%22%3A1%7D".parse().unwrap();
        assert_eq!(
            pool_uri(&uri).to_string(),
            "http://api.moby.localhost/v1.41/containers/json?all=1&filters=%7B%22a%22%3A1%7D"
        );
    }
}
