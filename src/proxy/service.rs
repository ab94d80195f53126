//! Handles one Docker API request: forward it upstream, relay the response
//! head as soon as it arrives, stream bodies both ways, and bridge hijacked
//! connections (attach, exec, `/session`, `/grpc`) after a 101.

use std::convert::Infallible;
use std::sync::Arc;

use http::{Request, Response, StatusCode, Version};
use http_body_util::{BodyExt, Limited};
use hyper::body::Incoming;
use hyper::upgrade::OnUpgrade;
use hyper_util::rt::TokioIo;
use tracing::Instrument;

use super::hangup::{HangupWatch, ReadNotice};
use super::mounts::{Mounts, Rewritten};
use super::ports::PortForwards;
use super::wait_answer;
use crate::body::{self, Body};
use crate::docker::error::error_response;
use crate::docker::headers::{
    client_response_headers, is_close_delimited, requested_upgrade, upstream_request_headers,
};
use crate::docker::route::{classify, container_started, container_stopped, Route};
use crate::lifecycle::Lifecycle;
use crate::splice::{splice_with, OnBrokenPipe};
use crate::upstream::{BoxFuture, BoxedIo, Upstream, UpstreamError};

/// What every request handler shares.
pub struct ProxyState {
    pub upstream: Arc<dyn Upstream>,
    pub lifecycle: Lifecycle,
    /// Local forwards of published ports, when the engine is remote.
    pub ports: Option<Arc<PortForwards>>,
    /// Synced bind mounts, when the engine is remote.
    pub mounts: Option<Arc<Mounts>>,
}

/// The proxy's own facts (`offload status`); answered here, never forwarded.
pub const LOCAL_STATUS_PATH: &str = "/_offload/v1/proxy";

/// The largest create body the proxy reads to rewrite its bind mounts.
const MAX_CREATE_BODY: usize = 16 << 20;
/// How long a hijacked stream's first bytes wait for the client to read the
/// 101 head (it normally has within microseconds).
const HEAD_READ_LIMIT: std::time::Duration = std::time::Duration::from_millis(200);
/// The largest inspect or list answer whose mount paths are mapped back.
const MAX_LOCALIZED_ANSWER: usize = 64 << 20;

pub async fn handle(
    state: Arc<ProxyState>,
    watch: Arc<HangupWatch>,
    mut request: Request<Incoming>,
) -> Result<Response<Body>, Infallible> {
    if request.method() == http::Method::CONNECT {
        // The Docker API has no CONNECT; the proxy opens port forwards itself.
        return Ok(error_response(
            StatusCode::METHOD_NOT_ALLOWED,
            "CONNECT is not part of the Docker API; published ports are forwarded by offload itself",
        ));
    }
    if super::parse_errors::head_size(request.method(), request.uri(), request.headers())
        > super::MAX_HEAD_BYTES
    {
        let mut response = error_response(
            StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
            super::parse_errors::HEADERS_TOO_LARGE,
        );
        response.headers_mut().insert(http::header::CONNECTION, http::HeaderValue::from_static("close"));
        return Ok(response);
    }
    let path = request.uri().path();
    if path.starts_with(crate::link::protocol::TUNNEL_PATH)
        || path.starts_with(crate::link::protocol::ABORT_PATH)
    {
        // Like CONNECT: a local client must not dial the remote's loopback.
        return Ok(error_response(
            StatusCode::FORBIDDEN,
            "offload's tunnels are its own; published ports are forwarded by offload itself",
        ));
    }
    // The agent believes the link's headers: only the proxy may set them.
    crate::link::protocol::strip_link_headers(request.headers_mut());
    if request.uri().path() == LOCAL_STATUS_PATH && request.method() == http::Method::GET {
        return Ok(local_status(&state));
    }
    let route = classify(request.method(), request.uri().path());
    let started = container_started(request.method(), request.uri().path()).map(str::to_string);
    let stopped = container_stopped(request.method(), request.uri().path()).map(str::to_string);
    let method = request.method().clone();
    // Only HTTP/1.1 can upgrade; hyper ignores `Upgrade` on HTTP/1.0 too.
    let upgrade =
        (request.version() == Version::HTTP_11).then(|| requested_upgrade(request.headers())).flatten();
    let client_side = upgrade.is_some().then(|| hyper::upgrade::on(&mut request));
    let head_read = match upgrade {
        Some(_) => watch.read_notice().await,
        None => None,
    };

    let (mut parts, incoming) = request.into_parts();
    upstream_request_headers(&mut parts.headers, upgrade);
    let mut outgoing = body::stream(incoming);
    let mut mounts_used = None;
    if let Some(mounts) = &state.mounts {
        // Nobody sees stale files: pending edits reach the remote copy first.
        if matches!(route, Route::ExecCreate | Route::ExecStart) || started.is_some() {
            mounts.flush().await;
        }
        if matches!(route, Route::ContainerCreate | Route::VolumeCreate) {
            match rewrite_binds(mounts, &mut parts, outgoing, route == Route::VolumeCreate).await {
                Ok((rewritten, used)) => {
                    outgoing = rewritten;
                    mounts_used = Some(used);
                }
                Err(refusal) => return Ok(refusal),
            }
        }
    }
    let upstream_request = Request::from_parts(parts, outgoing);

    let exchange = match state.upstream.send(upstream_request).await {
        Ok(exchange) => exchange,
        Err(error) => return Ok(upstream_failure(&error)),
    };
    let (mut head, response_body) = exchange.response.into_parts();
    let close_delimited = is_close_delimited(&method, head.status, &head.headers);
    client_response_headers(&mut head.headers, head.status);

    if head.status == StatusCode::SWITCHING_PROTOCOLS {
        let (Some(client_side), Some(upstream_side)) = (client_side, exchange.upgrade) else {
            return Ok(error_response(
                StatusCode::BAD_GATEWAY,
                "the engine switched protocols for a request that did not ask to upgrade",
            ));
        };
        let span = tracing::debug_span!("hijack", route = route.name());
        let mut upstream_side = upstream_side;
        if let (Some(mounts), Route::ContainerAttach | Route::ExecStart) = (&state.mounts, route) {
            // The output's end tells the client the process is done: its
            // writes must be here by then.
            let mounts = mounts.clone();
            upstream_side = Box::pin(async move {
                let io = upstream_side.await?;
                let gate: BoxFuture<()> = Box::pin(async move { mounts.pull().await });
                Ok(Box::new(PullBeforeEof { inner: io, gate: Some(gate) }) as BoxedIo)
            });
        }
        state.lifecycle.spawn(relay(client_side, upstream_side, head_read, watch).instrument(span));
    }

    // A started container's ports answer here before the client hears
    // "started"; a stopped one's close at once (events would be later).
    if let Some(ports) = &state.ports {
        let done = head.status.is_success() || head.status == StatusCode::NOT_MODIFIED;
        if let (Some(container), true) = (started.as_deref(), done) {
            ports.sync(container).await;
        }
        if let (Some(container), true) = (stopped.as_deref(), done) {
            ports.remove(container);
        }
    }

    let mut response_body = response_body;
    if route == Route::ContainerWait && head.status.is_success() {
        response_body = wait_answer::explain_failures(response_body, state.upstream.describe().to_string());
    }
    if let (Some(mounts), true) = (&state.mounts, head.status.is_success()) {
        match route {
            // The container's last writes are here before the client hears it exited.
            Route::ContainerWait => {
                let mounts = mounts.clone();
                response_body = gated(response_body, Box::pin(async move { mounts.pull().await }));
            }
            Route::ContainerInspect | Route::ContainerList if !mounts.is_empty() => {
                response_body = localize(mounts, &mut head.headers, response_body, route).await;
            }
            Route::ContainerCreate => {
                if let Some(used) = mounts_used.filter(|u| !u.is_empty()) {
                    response_body = note_container(mounts, &used, &mut head.headers, response_body).await;
                }
            }
            _ if stopped.is_some() && method == http::Method::DELETE => mounts.check_unused(),
            _ => {}
        }
    }

    // The engine answers a hijack without `Upgrade` close-delimited; hyper
    // would re-frame that as chunked on HTTP/1.1, which some clients refuse.
    head.version = if close_delimited { Version::HTTP_10 } else { Version::HTTP_11 };
    Ok(Response::from_parts(head, response_body))
}

/// Bridges the client's upgraded connection with the upstream's.
/// Ends when both directions have ended, or at once when the client hangs up
/// (a half-close keeps it going: `docker exec` without `-i` relies on that).
async fn relay(
    client_side: OnUpgrade,
    upstream_side: BoxFuture<std::io::Result<BoxedIo>>,
    head_read: Option<ReadNotice>,
    watch: Arc<HangupWatch>,
) {
    let (client, upstream) = tokio::join!(client_side, upstream_side);
    let (client, mut upstream) = match (client, upstream) {
        (Ok(client), Ok(upstream)) => (client, upstream),
        (Err(error), _) => return tracing::debug!(%error, "client left before the upgrade completed"),
        (_, Err(error)) => return tracing::debug!(%error, "upstream upgrade failed"),
    };
    // The 101 head is sent; the stream's first bytes go out once the client
    // has read it (see `ReadNotice`), so no client finds both in one read.
    if let Some(head_read) = head_read {
        head_read.wait(HEAD_READ_LIMIT).await;
    }
    let mut client = TokioIo::new(client);
    tokio::select! {
        // A hang-up seen with the splice's end is no abort.
        biased;
        // The engine's last output reaches the client even when it stopped
        // reading stdin (a container that exited).
        result = splice_with(&mut client, &mut upstream, OnBrokenPipe::FinishOtherWay) => match result {
            Ok(counts) => tracing::debug!(sent = counts.a_to_b, received = counts.b_to_a, "hijacked stream ended"),
            Err(error) => tracing::debug!(%error, "hijacked stream aborted"),
        },
        _ = watch.hung_up() => tracing::debug!("client hung up; closing the hijacked stream"),
    }
}

fn upstream_failure(error: &UpstreamError) -> Response<Body> {
    tracing::warn!(upstream = %error.target, reason = %error.reason, "upstream request failed");
    error_response(StatusCode::BAD_GATEWAY, &error.user_message())
}

/// Reads a create body and points its bind sources at synced copies.
async fn rewrite_binds(
    mounts: &Mounts,
    parts: &mut http::request::Parts,
    incoming: Body,
    volume: bool,
) -> Result<(Body, Rewritten), Response<Body>> {
    let bytes = match Limited::new(incoming, MAX_CREATE_BODY).collect().await {
        Ok(collected) => collected.to_bytes(),
        Err(_) => {
            return Err(error_response(
                StatusCode::PAYLOAD_TOO_LARGE,
                "the create request's body is larger than 16 MiB; offload reads create bodies to sync their bind mounts",
            ))
        }
    };
    let mut used = match mounts.rewrite_create(&bytes, volume).await {
        Ok(used) => used,
        Err(error) => return Err(error_response(error.status, &error.message)),
    };
    let rewritten = used.body.take().map(bytes::Bytes::from).unwrap_or(bytes);
    parts.headers.remove(http::header::TRANSFER_ENCODING);
    parts.headers.insert(http::header::CONTENT_LENGTH, http::HeaderValue::from(rewritten.len()));
    Ok((body::full(rewritten), used))
}

/// Reads a create answer (`{"Id": ...}`) to note which container uses the
/// mounts, and passes it on unchanged.
async fn note_container(
    mounts: &Mounts,
    used: &Rewritten,
    headers: &mut http::HeaderMap,
    answer: Body,
) -> Body {
    let bytes = match Limited::new(answer, 1 << 20).collect().await {
        Ok(collected) => collected.to_bytes(),
        Err(error) => {
            tracing::warn!(%error, "cannot read a create answer");
            return body::empty();
        }
    };
    if let Some(id) = serde_json::from_slice::<serde_json::Value>(&bytes)
        .ok()
        .and_then(|v| v["Id"].as_str().map(str::to_string))
    {
        mounts.used_by(used, &id);
    }
    headers.remove(http::header::TRANSFER_ENCODING);
    headers.insert(http::header::CONTENT_LENGTH, http::HeaderValue::from(bytes.len()));
    body::full(bytes)
}

/// Maps synced copies' paths in an inspect or list answer back to local ones.
async fn localize(mounts: &Mounts, headers: &mut http::HeaderMap, answer: Body, route: Route) -> Body {
    let bytes = match Limited::new(answer, MAX_LOCALIZED_ANSWER).collect().await {
        Ok(collected) => collected.to_bytes(),
        Err(error) => {
            tracing::warn!(%error, "cannot read an answer to map its mount paths");
            return body::empty();
        }
    };
    let Ok(mut parsed) = serde_json::from_slice::<serde_json::Value>(&bytes) else {
        return body::full(bytes);
    };
    let local = |remote: &str| mounts.local_path(remote);
    let changed = match route {
        Route::ContainerList => crate::docker::binds::localize_list(&mut parsed, &local),
        _ => crate::docker::binds::localize_inspect(&mut parsed, &local),
    };
    let bytes = match changed.then(|| serde_json::to_vec(&parsed)) {
        Some(Ok(mut json)) => {
            // The engine ends JSON answers with a newline; keep it.
            if bytes.ends_with(b"\n") {
                json.push(b'\n');
            }
            bytes::Bytes::from(json)
        }
        _ => bytes,
    };
    headers.remove(http::header::TRANSFER_ENCODING);
    headers.insert(http::header::CONTENT_LENGTH, http::HeaderValue::from(bytes.len()));
    body::full(bytes)
}

/// Holds a body's first frame (or its end) until `gate` has finished.
fn gated(inner: Body, gate: BoxFuture<()>) -> Body {
    body::stream(Gated { inner, gate: Some(std::sync::Mutex::new(gate)), held: None })
}

struct Gated {
    inner: Body,
    /// In a mutex only to be `Sync` (bodies must be); polled through `get_mut`.
    gate: Option<std::sync::Mutex<BoxFuture<()>>>,
    held: Option<Option<Result<http_body::Frame<bytes::Bytes>, body::BodyError>>>,
}

impl http_body::Body for Gated {
    type Data = bytes::Bytes;
    type Error = body::BodyError;

    fn poll_frame(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<bytes::Bytes>, body::BodyError>>> {
        use std::task::ready;
        let this = self.get_mut();
        let Some(gate) = this.gate.as_mut() else {
            return std::pin::Pin::new(&mut this.inner).poll_frame(cx);
        };
        if this.held.is_none() {
            this.held = Some(ready!(std::pin::Pin::new(&mut this.inner).poll_frame(cx)));
        }
        let gate = gate.get_mut().unwrap_or_else(|poisoned| poisoned.into_inner());
        ready!(gate.as_mut().poll(cx));
        this.gate = None;
        std::task::Poll::Ready(this.held.take().flatten())
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

/// A hijacked stream whose end (EOF from the engine) waits for `gate`.
struct PullBeforeEof {
    inner: BoxedIo,
    gate: Option<BoxFuture<()>>,
}

impl tokio::io::AsyncRead for PullBeforeEof {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        use std::task::ready;
        let this = &mut *self;
        if this.gate.is_none() {
            return std::pin::Pin::new(&mut this.inner).poll_read(cx, buf);
        }
        let before = buf.filled().len();
        ready!(std::pin::Pin::new(&mut this.inner).poll_read(cx, buf))?;
        if buf.filled().len() > before {
            return std::task::Poll::Ready(Ok(()));
        }
        // EOF: hold it until the gate has passed (the next poll reads EOF again).
        if let Some(gate) = this.gate.as_mut() {
            ready!(gate.as_mut().poll(cx));
        }
        this.gate = None;
        std::task::Poll::Ready(Ok(()))
    }
}

impl tokio::io::AsyncWrite for PullBeforeEof {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        data: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        std::pin::Pin::new(&mut self.inner).poll_write(cx, data)
    }

    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// What only the proxy knows: where it forwards, its port forwards and mounts.
fn local_status(state: &ProxyState) -> Response<Body> {
    let report = serde_json::json!({
        "pid": std::process::id(),
        "version": env!("CARGO_PKG_VERSION"),
        "upstream": state.upstream.describe(),
        "forwards_ports": state.ports.is_some(),
        "forwards": state.ports.as_ref().map(|p| p.snapshot()).unwrap_or_default(),
        "mounts": state.mounts.as_ref().map(|m| m.snapshot()).unwrap_or_default(),
    });
    let json = serde_json::to_vec(&report).unwrap_or_default();
    let mut response = Response::new(body::full(json));
    response
        .headers_mut()
        .insert(http::header::CONTENT_TYPE, http::HeaderValue::from_static("application/json"));
    response
}
