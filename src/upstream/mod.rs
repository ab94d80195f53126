//! Where the proxy sends Docker API requests.
//!
//! The proxy only knows the [`Upstream`] trait: send a request, get the response
//! head as soon as it exists, and, for a 101, a byte stream for the hijacked
//! connection. Today the one implementation is the engine itself
//! ([`engine::EngineUpstream`], over unix, tcp or tls); the link to a remote
//! agent is a second implementation of the same trait.

pub mod address;
pub mod engine;
pub mod link;

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::Arc;

use http::{Request, Response};
use tokio::io::{AsyncRead, AsyncWrite};

use crate::body::Body;
use crate::link::protocol::SessionInfo;
use crate::link::stream::{AnswerReader, LinkStream};
use crate::splice::{splice, Spliced};

/// A bidirectional byte stream with half-close (`poll_shutdown` = FIN / END_STREAM).
pub trait Duplex: AsyncRead + AsyncWrite + Send + Unpin + 'static {}
impl<T: AsyncRead + AsyncWrite + Send + Unpin + 'static> Duplex for T {}

pub type BoxedIo = Box<dyn Duplex>;
pub type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send + 'static>>;

/// A forwarded connection to a port on the remote.
pub enum Tunnel {
    /// The bodies of a link stream, relayed without copies.
    Stream(LinkStream<AnswerReader<hyper::body::Incoming>>),
    /// Any other byte stream (a `CONNECT` to an older agent).
    Io(BoxedIo),
}

impl Tunnel {
    /// Relays `local` with the remote port until both directions end.
    pub async fn splice<S>(&mut self, local: &mut S) -> io::Result<Spliced>
    where
        S: AsyncRead + AsyncWrite + Unpin,
    {
        match self {
            Tunnel::Stream(stream) => stream.splice(local).await,
            Tunnel::Io(io) => splice(io, local).await,
        }
    }
}

/// One request/response exchange with an upstream.
pub struct Exchange {
    pub response: Response<Body>,
    /// Present when the upstream switched protocols (101): resolves to the raw
    /// stream, which replays any bytes read ahead of the response head.
    pub upgrade: Option<BoxFuture<io::Result<BoxedIo>>>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FailureKind {
    /// Nothing was sent: the upstream could not be reached at all.
    Unreachable,
    /// The connection failed while the request was in flight.
    Broken,
    /// The session ended and the request was the proxy's own (background):
    /// no new session was started for it.
    SessionEnded,
}

#[derive(Debug, thiserror::Error)]
#[error("{target}: {reason}")]
pub struct UpstreamError {
    pub kind: FailureKind,
    /// What the upstream is, for messages: "the Docker engine", "the offload agent".
    pub what: &'static str,
    /// The upstream as the user named it, e.g. `unix:///var/run/docker.sock`.
    pub target: String,
    pub reason: String,
}

impl UpstreamError {
    /// The sentence a Docker client shows: what failed, why, what to check.
    pub fn user_message(&self) -> String {
        match self.kind {
            FailureKind::Unreachable => format!(
                "cannot reach {} at {}: {}. Is it running, and is the address right?",
                self.what, self.target, self.reason
            ),
            FailureKind::Broken => format!(
                "the connection to {} at {} failed during the request: {}",
                self.what, self.target, self.reason
            ),
            FailureKind::SessionEnded => {
                format!("the session with {} at {} has ended", self.what, self.target)
            }
        }
    }
}

pub trait Upstream: Send + Sync + 'static {
    /// Sends one request; resolves once the response head has arrived.
    fn send(&self, request: Request<Body>) -> BoxFuture<Result<Exchange, UpstreamError>>;

    /// The upstream as the user named it, for messages.
    fn describe(&self) -> &str;

    /// Whether published ports live on another machine and need local
    /// forwards (true for the agent link; the engine on this machine already
    /// serves its ports here).
    fn forwards_ports(&self) -> bool {
        false
    }

    /// Whether bind mounts name files of another machine and need syncing
    /// (true for any agent link, even one on this machine: the pipeline is
    /// the same).
    fn syncs_mounts(&self) -> bool {
        self.forwards_ports()
    }

    /// The session the link to the agent has open (opening the link if
    /// needed); `None` for an engine reached directly.
    fn session_info(&self) -> BoxFuture<Result<Option<Arc<SessionInfo>>, UpstreamError>> {
        Box::pin(async { Ok(None) })
    }

    /// A byte stream to `port` on the remote's loopback (a forwarded connection).
    fn open_tunnel(&self, port: u16) -> BoxFuture<io::Result<Tunnel>> {
        let _ = port;
        Box::pin(async { Err(io::Error::new(io::ErrorKind::Unsupported, "this upstream forwards no ports")) })
    }

    /// A stream of framed datagrams (`link::datagram`) to UDP `port` on the
    /// remote's loopback: one local peer of a forwarded UDP port.
    fn open_udp_tunnel(&self, port: u16) -> BoxFuture<io::Result<BoxedIo>> {
        let _ = port;
        Box::pin(async { Err(io::Error::new(io::ErrorKind::Unsupported, "this upstream forwards no ports")) })
    }
}

/// Walks an error's source chain into one line ("a: b: c").
pub fn error_chain(error: &(dyn std::error::Error + 'static)) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        let cause_text = cause.to_string();
        if !text.contains(&cause_text) {
            text.push_str(": ");
            text.push_str(&cause_text);
        }
        source = cause.source();
    }
    text
}
