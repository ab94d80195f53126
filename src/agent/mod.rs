//! The remote half: serves the link next to dockerd, forwards Docker API
//! streams to the engine, and (later) owns sessions and remote security.

pub mod aborts;
pub mod cleanup;
pub mod engine_calls;
pub mod idle;
pub mod published;
pub mod resident;
pub mod service;
pub mod session;
pub mod sync;
pub mod tracked_body;
pub mod udp;

use std::io;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use hyper::server::conn::http2;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, UnixListener};
use tokio_rustls::TlsAcceptor;
use tracing::Instrument;

use crate::lifecycle::Lifecycle;
use crate::upstream::engine::EngineUpstream;
use service::{AgentState, LinkContext};
use session::{SessionConfig, Sessions};
use sync::{AgentSync, SyncConfig};

/// Must exceed anything a session keeps open at once: long-lived streams
/// (events, logs -f, attach, wait) never free their slot, and `docker run`
/// deadlocks if its `wait` cannot start.
const MAX_CONCURRENT_STREAMS: u32 = 100_000;
const STREAM_WINDOW: u32 = 4 << 20;
/// Many times a stream's window: a stream whose reader stopped (a paused
/// container, a slow `logs -f` consumer) holds its whole window, and the
/// connection's must stay open for every other stream past dozens of them.
const CONNECTION_WINDOW: u32 = 256 << 20;
const MAX_FRAME: u32 = 64 << 10;
const MAX_SEND_BUFFER: usize = 256 << 10;
const PING_INTERVAL: Duration = Duration::from_secs(10);
const PING_TIMEOUT: Duration = Duration::from_secs(10);
const TLS_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(15);

/// Where the agent listens.
pub enum AgentListener {
    Tls(TcpListener, TlsAcceptor),
    /// `--insecure` only, loopback only: for tests.
    PlainTcp(TcpListener),
    /// `--insecure` only: for tests (a proxy in another network namespace).
    Unix(UnixListener, PathBuf),
}

pub struct Agent {
    state: Arc<AgentState>,
}

impl Agent {
    /// An agent with the sessions an earlier agent recorded in `config.state_dir`.
    pub fn new(engine: EngineUpstream, config: SessionConfig, sync: SyncConfig) -> Self {
        let sync = AgentSync::new(sync);
        let sessions = Sessions::load(config);
        Self {
            state: Arc::new(AgentState {
                engine,
                sessions,
                sync,
                ports_on_loopback: true,
                published: Arc::new(published::PublishedPorts::default()),
                gpus: std::sync::Mutex::new(None),
            }),
        }
    }

    /// For an agent on the proxy's own machine (the embedded default): the
    /// engine's port bindings already serve this machine, so they are kept.
    pub fn on_the_proxys_machine(mut self) -> Self {
        if let Some(state) = Arc::get_mut(&mut self.state) {
            state.ports_on_loopback = false;
        }
        self
    }

    /// Starts the idle watcher (ends idle sessions, runs `--on-idle-exit`);
    /// it cancels `lifecycle` when `--on-idle-exit` has run.
    pub fn start_idle_watcher(&self, lifecycle: &Lifecycle) {
        lifecycle.spawn(idle::watch(self.state.clone(), lifecycle.clone()));
    }

    /// Serves connections until the lifecycle is cancelled.
    pub async fn serve(&self, listener: AgentListener, lifecycle: Lifecycle) {
        loop {
            let accepted = tokio::select! {
                _ = lifecycle.token.cancelled() => break,
                accepted = accept(&listener) => accepted,
            };
            match accepted {
                Ok(Accepted::Tls(tcp, acceptor, peer)) => {
                    let state = self.state.clone();
                    let span = tracing::info_span!("link", %peer);
                    let token = lifecycle.token.clone();
                    lifecycle.spawn(
                        async move {
                            match tokio::time::timeout(
                                TLS_HANDSHAKE_TIMEOUT,
                                acceptor.accept(crate::tls::read_ahead(tcp)),
                            )
                            .await
                            {
                                Ok(Ok(mut tls)) => {
                                    tls.get_mut().1.set_buffer_limit(Some(crate::tls::LINK_SEND_BUFFER));
                                    serve_link(tls, state, token).await
                                }
                                Ok(Err(error)) => tracing::warn!(%error, "TLS handshake refused"),
                                Err(_) => tracing::warn!("TLS handshake timed out"),
                            }
                        }
                        .instrument(span),
                    );
                }
                Ok(Accepted::Plain(io, peer)) => {
                    let span = tracing::info_span!("link", %peer);
                    lifecycle
                        .spawn(serve_link(io, self.state.clone(), lifecycle.token.clone()).instrument(span));
                }
                Err(error) => {
                    tracing::warn!(%error, "accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }
    }
}

enum Accepted {
    Tls(tokio::net::TcpStream, TlsAcceptor, String),
    Plain(Box<dyn crate::upstream::Duplex>, String),
}

async fn accept(listener: &AgentListener) -> io::Result<Accepted> {
    match listener {
        AgentListener::Tls(tcp, acceptor) => {
            let (stream, peer) = tcp.accept().await?;
            crate::link::transport::tune_link_socket(&stream)?;
            Ok(Accepted::Tls(stream, acceptor.clone(), peer.to_string()))
        }
        AgentListener::PlainTcp(tcp) => {
            let (stream, peer) = tcp.accept().await?;
            crate::link::transport::tune_link_socket(&stream)?;
            Ok(Accepted::Plain(Box::new(stream), peer.to_string()))
        }
        AgentListener::Unix(unix, path) => {
            let (stream, _) = unix.accept().await?;
            Ok(Accepted::Plain(Box::new(stream), path.display().to_string()))
        }
    }
}

/// Serves HTTP/2 on one link until it closes; on shutdown, sends GOAWAY and
/// lets streams in flight finish.
async fn serve_link<I>(io: I, state: Arc<AgentState>, token: tokio_util::sync::CancellationToken)
where
    I: AsyncRead + AsyncWrite + Send + Unpin + 'static,
{
    tracing::info!("link up");
    let link = Arc::new(LinkContext {
        session: std::sync::OnceLock::new(),
        closer: token.child_token(),
        aborts: Arc::default(),
    });
    let closer = link.closer.clone();
    let service = service_fn(move |request| service::handle(state.clone(), link.clone(), request));
    let connection = http2::Builder::new(TokioExecutor::new())
        .timer(TokioTimer::new())
        .max_concurrent_streams(MAX_CONCURRENT_STREAMS)
        .initial_stream_window_size(STREAM_WINDOW)
        .initial_connection_window_size(CONNECTION_WINDOW)
        .max_frame_size(MAX_FRAME)
        .max_send_buf_size(MAX_SEND_BUFFER)
        .keep_alive_interval(PING_INTERVAL)
        .keep_alive_timeout(PING_TIMEOUT)
        .serve_connection(TokioIo::new(io), service);
    let mut connection = std::pin::pin!(connection);
    let result = tokio::select! {
        result = connection.as_mut() => result,
        // Agent shutdown, or the session of this link ended.
        _ = closer.cancelled() => {
            connection.as_mut().graceful_shutdown();
            connection.as_mut().await
        }
    };
    match result {
        Ok(()) => tracing::info!("link closed"),
        Err(error) => tracing::info!(%error, "link ended"),
    }
}
