//! The agent as an upstream: Docker API requests travel as HTTP/2 streams on
//! one long-lived link (see `link::protocol` for the contract).
//!
//! The link is opened on the first request (the proxy starts even when the
//! agent is down), reopened on the next request after it dies (HTTP/2 pings
//! notice a dead link within two intervals), and each new link resumes the
//! session with its token. `/_ping` is answered from what the session
//! handshake learned, saving a round trip per docker command.

use std::io;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex as StdMutex};
use std::time::Duration;

use bytes::Bytes;
use http::header::{self, HeaderName, HeaderValue};
use http::{Method, Request, Response, StatusCode, Uri};
use http_body_util::{BodyExt, Limited};
use hyper::client::conn::http2::{self, SendRequest};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::io::AsyncWriteExt;
use tokio::sync::Mutex;

use super::{error_chain, BoxFuture, BoxedIo, Exchange, FailureKind, Tunnel, Upstream, UpstreamError};
use crate::body::{self, Body};
use crate::docker::headers::strip_hop_by_hop;
use crate::docker::route::{classify, Route};
use crate::link::protocol::{self, SessionInfo, SessionRequest};
use crate::link::stream::{self, AnswerReader, BodyReader, LinkStream};
use crate::link::transport::{Dialer, SshProcess};

/// HTTP/2 tuning for a link that may be long and fat (performance-anchors §2.3):
/// large windows so one stream can fill the pipe, 64 KiB frames so an
/// interactive frame never waits long behind a bulk one.
pub const STREAM_WINDOW: u32 = 4 << 20;
/// Many times a stream's window: a stream whose reader stopped (a paused
/// container, a slow `logs -f` consumer) holds its whole window, and the
/// connection's must stay open for every other stream past dozens of them.
pub const CONNECTION_WINDOW: u32 = 256 << 20;
pub const MAX_FRAME: u32 = 64 << 10;
pub const MAX_SEND_BUFFER: usize = 256 << 10;
/// Default time between HTTP/2 pings; a link that misses one answer for as
/// long is dead, so a dead link is noticed within two intervals.
pub const DEFAULT_KEEPALIVE: Duration = Duration::from_secs(10);

const LINK_ORIGIN: &str = "http://offload.link";

pub struct LinkUpstream {
    inner: Arc<Inner>,
}

struct Inner {
    dialer: Dialer,
    keepalive: Duration,
    described: String,
    link: Mutex<Option<Link>>,
    resume_token: StdMutex<Option<String>>,
    same_machine: bool,
}

#[derive(Clone)]
struct Link {
    sender: SendRequest<Body>,
    session: Arc<SessionInfo>,
    /// Numbers this link's relayed streams (see [`Link::abortable`]).
    streams: Arc<AtomicU64>,
    /// Kept so ssh lives exactly as long as the link.
    _ssh: Option<Arc<SshProcess>>,
}

impl LinkUpstream {
    pub fn new(dialer: Dialer, keepalive: Duration) -> Self {
        let described = dialer.address().to_string();
        Self {
            inner: Arc::new(Inner {
                dialer,
                keepalive,
                described,
                link: Mutex::new(None),
                resume_token: StdMutex::new(None),
                same_machine: false,
            }),
        }
    }

    /// For an agent on this machine (the embedded default): its engine's
    /// published ports already answer here, so none are forwarded.
    pub fn on_this_machine(mut self) -> Self {
        if let Some(inner) = Arc::get_mut(&mut self.inner) {
            inner.same_machine = true;
        }
        self
    }

    /// The current session, opening the link if needed.
    pub async fn session(&self) -> Result<Arc<SessionInfo>, UpstreamError> {
        Ok(self.inner.link().await?.session)
    }
}

impl Upstream for LinkUpstream {
    fn send(&self, request: Request<Body>) -> BoxFuture<Result<Exchange, UpstreamError>> {
        let inner = self.inner.clone();
        Box::pin(async move {
            let background = request.headers().contains_key(protocol::BACKGROUND);
            let link = inner.link_for(background).await?;
            if classify(request.method(), request.uri().path()) == Route::Ping {
                return Ok(cached_ping(&link.session, request.method()));
            }
            match request.headers().get(header::UPGRADE).cloned() {
                Some(protocol) => inner.send_upgrade(link, request, protocol).await,
                None => inner.send_plain(link, request).await,
            }
        })
    }

    fn describe(&self) -> &str {
        &self.inner.described
    }

    fn forwards_ports(&self) -> bool {
        !self.inner.same_machine
    }

    fn syncs_mounts(&self) -> bool {
        true
    }

    fn session_info(&self) -> BoxFuture<Result<Option<Arc<SessionInfo>>, UpstreamError>> {
        let inner = self.inner.clone();
        Box::pin(async move { Ok(Some(inner.link().await?.session)) })
    }

    fn open_tunnel(&self, port: u16) -> BoxFuture<io::Result<Tunnel>> {
        Box::pin(self.inner.clone().open_tcp(port))
    }

    fn open_udp_tunnel(&self, port: u16) -> BoxFuture<io::Result<BoxedIo>> {
        Box::pin(self.inner.clone().connect(port, true))
    }
}

/// The handshake's answer to a resume-only reconnect whose session is gone.
const SESSION_GONE: &str = "session gone";

impl Inner {
    fn failure(&self, kind: FailureKind, reason: String) -> UpstreamError {
        UpstreamError { kind, what: "the offload agent", target: self.described.clone(), reason }
    }

    /// A forwarded TCP connection: a one-round-trip stream tunnel when the
    /// agent serves it, else a CONNECT.
    async fn open_tcp(self: Arc<Self>, port: u16) -> io::Result<Tunnel> {
        let link = self.link().await.map_err(|e| io::Error::other(e.user_message()))?;
        if link.session.features.iter().any(|f| f == protocol::FEATURE_STREAM_TUNNEL) {
            return Ok(Tunnel::Stream(stream_tunnel(link, port)));
        }
        self.connect(port, false).await.map(Tunnel::Io)
    }

    /// A forwarded connection (TCP) or UDP flow: `CONNECT 127.0.0.1:<port>`.
    async fn connect(self: Arc<Self>, port: u16, udp: bool) -> io::Result<BoxedIo> {
        let link = self.link().await.map_err(|e| io::Error::other(e.user_message()))?;
        let mut request = Request::connect(format!("127.0.0.1:{port}"));
        if udp {
            request = request.header(protocol::PROTOCOL, protocol::PROTOCOL_UDP);
        }
        let request = request.body(body::empty()).map_err(io::Error::other)?;
        let mut sender = link.sender;
        let mut response = sender.send_request(request).await.map_err(io::Error::other)?;
        if response.status() != StatusCode::OK {
            let what = if udp { "UDP port" } else { "port" };
            return Err(io::Error::new(
                io::ErrorKind::ConnectionRefused,
                format!("the agent refused the forward to {what} {port}: {}", response.status()),
            ));
        }
        let upgraded = hyper::upgrade::on(&mut response).await.map_err(io::Error::other)?;
        Ok(Box::new(TokioIo::new(upgraded)))
    }

    /// The live link, or a new one (single-flight: concurrent callers wait).
    async fn link(&self) -> Result<Link, UpstreamError> {
        self.link_for(false).await
    }

    /// The same; for the proxy's own background streams a new link may only
    /// resume the session, never start one.
    async fn link_for(&self, background: bool) -> Result<Link, UpstreamError> {
        let mut current = self.link.lock().await;
        if let Some(link) = current.as_ref() {
            if !link.sender.is_closed() {
                return Ok(link.clone());
            }
            tracing::warn!(remote = %self.described, "the link to the agent was lost; reconnecting");
        }
        let link = self.open(background).await?;
        *current = Some(link.clone());
        Ok(link)
    }

    async fn open(&self, resume_only: bool) -> Result<Link, UpstreamError> {
        let unreachable = |reason: String| self.failure(FailureKind::Unreachable, reason);
        let dialed = self.dialer.dial().await.map_err(|e| unreachable(explain(&e)))?;
        let ssh = dialed.ssh.map(Arc::new);
        let explain_ssh =
            |reason: String| match ssh.as_ref().map(|s| s.stderr_text()).filter(|t| !t.is_empty()) {
                Some(said) => format!("{reason} (ssh said: {said})"),
                None => reason,
            };
        let (sender, connection) = http2::Builder::new(TokioExecutor::new())
            .timer(TokioTimer::new())
            .initial_stream_window_size(STREAM_WINDOW)
            .initial_connection_window_size(CONNECTION_WINDOW)
            .max_frame_size(MAX_FRAME)
            .max_send_buf_size(MAX_SEND_BUFFER)
            .keep_alive_interval(self.keepalive)
            .keep_alive_timeout(self.keepalive)
            .keep_alive_while_idle(true)
            .handshake::<_, Body>(TokioIo::new(dialed.io))
            .await
            .map_err(|e| {
                unreachable(explain_ssh(format!("the link handshake failed: {}", error_chain(&e))))
            })?;
        // The connection task ends when the link closes or every sender is
        // dropped. Its error says why a link died (a TLS alert, say), which a
        // request on it only sees as "connection closed".
        let (ended_tx, ended_rx) = tokio::sync::oneshot::channel();
        tokio::spawn(async move {
            let result = connection.await;
            if let Err(error) = &result {
                tracing::debug!(%error, "link closed");
            }
            let _ = ended_tx.send(result);
        });
        let session = match self.handshake(sender.clone(), resume_only).await {
            Ok(session) => session,
            Err(reason) if reason == SESSION_GONE => {
                return Err(self.failure(FailureKind::SessionEnded, "the session has ended".into()))
            }
            Err(reason) => {
                let cause = tokio::time::timeout(Duration::from_secs(1), ended_rx).await;
                let reason = match cause {
                    Ok(Ok(Err(error))) => crate::tls::explain_failure(&error).unwrap_or(reason),
                    _ => reason,
                };
                return Err(unreachable(explain_ssh(reason)));
            }
        };
        let had_session = self.resume_token.lock().map(|t| t.is_some()).unwrap_or(false);
        if session.resumed {
            tracing::info!(session = %session.session_id, "link re-established; session resumed");
        } else if had_session {
            tracing::warn!(
                session = %session.session_id,
                "the previous session had ended (idle, or stopped) and the agent removed the containers, \
                 images, volumes and networks it created; a new session began"
            );
        } else {
            tracing::info!(
                session = %session.session_id,
                remote = %self.described,
                engine = %session.engine.version,
                api = %session.engine.api_version,
                arch = %session.engine.arch,
                "connected to the agent; new session"
            );
        }
        if let Ok(mut token) = self.resume_token.lock() {
            *token = Some(session.resume_token.clone());
        }
        Ok(Link { sender, session: Arc::new(session), streams: Arc::default(), _ssh: ssh })
    }

    async fn handshake(
        &self,
        mut sender: SendRequest<Body>,
        resume_only: bool,
    ) -> Result<SessionInfo, String> {
        let resume_token = self.resume_token.lock().ok().and_then(|t| t.clone());
        let payload =
            serde_json::to_vec(&SessionRequest { resume_token, resume_only }).map_err(|e| e.to_string())?;
        let request = Request::post(link_uri(protocol::SESSION_PATH))
            .header(header::CONTENT_TYPE, "application/json")
            .header(HeaderName::from_static(protocol::BACKGROUND), "1")
            .body(body::full(payload))
            .map_err(|e| e.to_string())?;
        let response = sender.send_request(request).await.map_err(|e| {
            crate::tls::explain_failure(&e)
                .unwrap_or_else(|| format!("the session handshake failed: {}", error_chain(&e)))
        })?;
        let status = response.status();
        let bytes = Limited::new(response.into_body(), 1 << 20)
            .collect()
            .await
            .map_err(|e| format!("the session handshake failed: {e}"))?
            .to_bytes();
        if status == StatusCode::GONE && resume_only {
            return Err(SESSION_GONE.to_string());
        }
        if !status.is_success() {
            return Err(format!(
                "the agent refused the session ({status}): {}",
                String::from_utf8_lossy(&bytes)
            ));
        }
        serde_json::from_slice(&bytes)
            .map_err(|e| format!("the agent's session answer is not understood: {e}"))
    }

    async fn send_plain(&self, link: Link, request: Request<Body>) -> Result<Exchange, UpstreamError> {
        let method = request.method().clone();
        let request = to_link_request(request);
        let mut sender = link.sender;
        let response = sender.send_request(request).await.map_err(|e| self.in_flight_failure(&e))?;
        Ok(Exchange { response: from_link_response(response, &method), upgrade: None })
    }

    /// An upgrade: the HTTP body goes first on the stream, then the raw bytes.
    async fn send_upgrade(
        &self,
        link: Link,
        request: Request<Body>,
        protocol_value: HeaderValue,
    ) -> Result<Exchange, UpstreamError> {
        let method = request.method().clone();
        let (mut parts, request_body) = request.into_parts();
        let http_body = Limited::new(request_body, protocol::MAX_UPGRADE_BODY)
            .collect()
            .await
            .map_err(|e| {
                self.failure(FailureKind::Broken, format!("cannot read the upgrade request's body: {e}"))
            })?
            .to_bytes();
        parts.headers.remove(header::CONTENT_LENGTH);
        parts.headers.insert(HeaderName::from_static(protocol::UPGRADE), protocol_value);
        parts
            .headers
            .insert(HeaderName::from_static(protocol::BODY_LENGTH), HeaderValue::from(http_body.len()));
        let (mut writer, channel_body) = stream::channel();
        let (id, abort) = link.abortable();
        parts.headers.insert(HeaderName::from_static(protocol::STREAM_ID), HeaderValue::from(id));
        writer.on_abort(abort);
        writer.write_all(&http_body).await.map_err(|e| self.failure(FailureKind::Broken, e.to_string()))?;
        let request = to_link_request(Request::from_parts(parts, body::stream(channel_body)));
        let mut sender = link.sender;
        let response = sender.send_request(request).await.map_err(|e| self.in_flight_failure(&e))?;
        let switched =
            response.headers().get(protocol::STATUS).is_some_and(|status| status.as_bytes() == b"101");
        if !switched {
            // The engine answered without switching (an error, usually): end
            // our side cleanly (a dropped writer would reset the stream, and
            // with it the answer's body).
            let _ = writer.shutdown().await;
            return Ok(Exchange { response: from_link_response(response, &method), upgrade: None });
        }
        let (mut head, response_body) = response.into_parts();
        head.status = StatusCode::SWITCHING_PROTOCOLS;
        head.version = http::Version::HTTP_11;
        head.headers.remove(protocol::STATUS);
        // HTTP/2 cannot carry `Upgrade`; the agent relays the engine's value.
        let engine_upgrade =
            head.headers.remove(protocol::UPGRADE).unwrap_or(HeaderValue::from_static("tcp"));
        head.headers.insert(header::CONNECTION, HeaderValue::from_static("Upgrade"));
        head.headers.insert(header::UPGRADE, engine_upgrade);
        let io: BoxedIo = Box::new(tokio::io::join(BodyReader::new(response_body), writer));
        let upgrade: BoxFuture<io::Result<BoxedIo>> = Box::pin(async move { Ok(io) });
        Ok(Exchange { response: Response::from_parts(head, body::empty()), upgrade: Some(upgrade) })
    }

    fn in_flight_failure(&self, error: &hyper::Error) -> UpstreamError {
        self.failure(
            FailureKind::Broken,
            format!("{} (the link to the agent failed; the next command reconnects)", error_chain(error)),
        )
    }
}

/// The client's bytes go out as the request body at once; the agent's answer
/// (its status, then the port's bytes) is awaited on the first read. So a
/// client that speaks first gets its first reply after one round trip.
fn stream_tunnel(link: Link, port: u16) -> LinkStream<AnswerReader<hyper::body::Incoming>> {
    let (mut writer, request_body) = stream::channel();
    let (id, abort) = link.abortable();
    writer.on_abort(abort);
    let mut sender = link.sender;
    let request = Request::post(link_uri(&format!("{}/{port}", protocol::TUNNEL_PATH)))
        .header(protocol::STREAM_ID, id)
        .body(body::stream(request_body))
        .map(|request| sender.send_request(request));
    let answer: BoxFuture<io::Result<hyper::body::Incoming>> = Box::pin(async move {
        let response = request.map_err(io::Error::other)?.await.map_err(io::Error::other)?;
        if response.status() != StatusCode::OK {
            return Err(io::Error::new(
                io::ErrorKind::ConnectionRefused,
                format!("the agent refused the forward to port {port}: {}", response.status()),
            ));
        }
        Ok(response.into_body())
    });
    LinkStream { reader: AnswerReader::new(answer), writer }
}

impl Link {
    /// A number for a new relayed stream, and what tells the agent that the
    /// stream failed on this side (see [`stream::BodyWriter::on_abort`]).
    fn abortable(&self) -> (u64, impl FnOnce() + Send + 'static) {
        let id = self.streams.fetch_add(1, Ordering::Relaxed);
        let sender = self.sender.clone();
        (id, move || send_abort(sender, id))
    }
}

/// `POST /_offload/v1/abort/<id>`: headers only, so no flow-control window
/// can hold it back. Its own task (a writer's drop cannot wait), which ends
/// with the answer or with the link.
fn send_abort(mut sender: SendRequest<Body>, id: u64) {
    let Ok(runtime) = tokio::runtime::Handle::try_current() else { return };
    let Ok(request) = Request::post(link_uri(&format!("{}/{id}", protocol::ABORT_PATH))).body(body::empty())
    else {
        return;
    };
    runtime.spawn(async move {
        if let Err(error) = sender.send_request(request).await {
            tracing::debug!(%error, id, "cannot tell the agent of an aborted stream");
        }
    });
}

fn link_uri(path_and_query: &str) -> Uri {
    format!("{LINK_ORIGIN}{path_and_query}").parse().unwrap_or_else(|_| Uri::from_static(LINK_ORIGIN))
}

/// HTTP/2 has no hop-by-hop headers and carries the authority itself.
fn to_link_request(mut request: Request<Body>) -> Request<Body> {
    // CONNECT names its target in the URI (authority form): keep it.
    if request.method() != Method::CONNECT {
        let path =
            request.uri().path_and_query().map(|pq| pq.as_str().to_string()).unwrap_or_else(|| "/".into());
        *request.uri_mut() = link_uri(&path);
    }
    *request.version_mut() = http::Version::HTTP_2;
    let headers = request.headers_mut();
    strip_hop_by_hop(headers);
    headers.remove(header::HOST);
    request
}

/// Restores HTTP/1.1 framing facts that HTTP/2 cannot carry: a close-delimited
/// body stays close-delimited, any other body without a length is chunked.
fn from_link_response(response: Response<hyper::body::Incoming>, method: &Method) -> Response<Body> {
    let (mut head, incoming) = response.into_parts();
    let close_delimited = head.headers.remove(protocol::CLOSE_DELIMITED).is_some();
    head.headers.remove(protocol::STATUS);
    let bodiless = method == Method::HEAD
        || head.status.is_informational()
        || head.status == StatusCode::NO_CONTENT
        || head.status == StatusCode::NOT_MODIFIED;
    if !close_delimited && !bodiless && !head.headers.contains_key(header::CONTENT_LENGTH) {
        head.headers.insert(header::TRANSFER_ENCODING, HeaderValue::from_static("chunked"));
    }
    head.version = http::Version::HTTP_11;
    Response::from_parts(head, body::stream(incoming))
}

/// The engine's own `/_ping` answer, replayed: all of its headers, so the CLI
/// still learns the API version, OS type, builder and swarm state.
fn cached_ping(session: &SessionInfo, method: &Method) -> Exchange {
    let mut response = Response::new(if method == Method::HEAD {
        body::empty()
    } else {
        body::full(Bytes::from(session.ping.body.clone()))
    });
    for (name, value) in &session.ping.headers {
        if let (Ok(name), Ok(value)) =
            (HeaderName::try_from(name.as_str()), HeaderValue::try_from(value.as_str()))
        {
            response.headers_mut().append(name, value);
        }
    }
    let length = if method == Method::HEAD { 0 } else { session.ping.body.len() };
    response.headers_mut().insert(header::CONTENT_LENGTH, HeaderValue::from(length));
    Exchange { response, upgrade: None }
}

fn explain(error: &crate::link::transport::DialError) -> String {
    crate::tls::explain_failure(error).unwrap_or_else(|| error_chain(error))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::link::protocol::{EngineFacts, PingFacts};

    fn session() -> SessionInfo {
        SessionInfo {
            session_id: "s".into(),
            resume_token: "t".into(),
            resumed: false,
            agent_version: "0".into(),
            engine: EngineFacts::default(),
            ping: PingFacts {
                headers: vec![
                    ("Api-Version".into(), "1.41".into()),
                    ("Builder-Version".into(), "2".into()),
                    ("Content-Type".into(), "text/plain; charset=utf-8".into()),
                ],
                body: "OK".into(),
            },
            engine_socket: None,
            features: Vec::new(),
        }
    }

    #[test]
    fn cached_ping_replays_headers() {
        let exchange = cached_ping(&session(), &Method::GET);
        let headers = exchange.response.headers();
        assert_eq!(headers["api-version"], "1.41");
        assert_eq!(headers["builder-version"], "2");
        assert_eq!(headers["content-length"], "2");
        let head = cached_ping(&session(), &Method::HEAD);
        assert_eq!(head.response.headers()["content-length"], "0");
    }

    #[test]
    fn link_requests_lose_hop_by_hop_headers_and_keep_the_path() {
        let request = Request::post("/v1.41/containers/x/start?a=1")
            .header("host", "api.moby.localhost")
            .header("connection", "keep-alive")
            .header("content-length", "0")
            .body(body::empty())
            .unwrap();
        let request = to_link_request(request);
        assert_eq!(request.uri(), "http://offload.link/v1.41/containers/x/start?a=1");
        assert!(!request.headers().contains_key("host"));
        assert!(!request.headers().contains_key("connection"));
        assert_eq!(request.headers()["content-length"], "0");
    }
}
