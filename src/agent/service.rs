//! Handles one stream of the link: the session handshake, or a Docker API
//! request forwarded to the engine (plain, or upgraded into a byte stream).

use std::convert::Infallible;
use std::sync::{Arc, OnceLock};

use tokio_util::sync::CancellationToken;

use bytes::{Bytes, BytesMut};
use http::header::{self, HeaderName, HeaderValue};
use http::{Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Limited};
use hyper::body::Incoming;
use tracing::Instrument;

use super::aborts::{aborted, AbortWatch, StreamAborts};
use super::engine_calls::{call, json, labelled, Kind};
use super::idle::end_session;
use super::session::{ActivityGuard, ActivityKind, Session, Sessions};
use super::sync::{AgentSync, SYNC_PREFIX};
use super::tracked_body::{Guarded, Inspected};
use super::udp;
use crate::body::{self, Body};
use crate::docker::error::error_response;
use crate::docker::gpu::{requests_gpu, EngineGpus, NO_GPU};
use crate::docker::headers::{is_close_delimited, strip_hop_by_hop};
use crate::docker::ownership::{add_label, creation, loaded_images, Creation, SESSION_LABEL};
use crate::docker::ports::bind_to_loopback;
use crate::link::protocol::{self, EngineFacts, GpuFacts, PingFacts, SessionInfo, SessionRequest};
use crate::link::stream::{self, BodyReader, LinkStream};
use crate::splice::{splice, OnBrokenPipe};
use crate::upstream::engine::EngineUpstream;
use crate::upstream::{Exchange, Upstream, UpstreamError};

pub struct AgentState {
    pub engine: EngineUpstream,
    pub sessions: Sessions,
    pub sync: AgentSync,
    /// Published ports bind to the remote's loopback (they are forwarded);
    /// false when the proxy is on the engine's own machine (embedded).
    pub ports_on_loopback: bool,
    /// Where the engine's published ports lead (forwards skip its proxy).
    pub published: Arc<super::published::PublishedPorts>,
    /// The engine's GPUs as last read, so a GPU create is checked without
    /// asking the engine again.
    pub gpus: std::sync::Mutex<Option<GpuFacts>>,
}

impl AgentState {
    fn known_gpus(&self) -> std::sync::MutexGuard<'_, Option<GpuFacts>> {
        self.gpus.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

/// One link's state: the session its handshake opened, and the token that
/// closes the link (when that session ends).
pub struct LinkContext {
    pub session: OnceLock<Arc<Session>>,
    pub closer: CancellationToken,
    /// This link's relayed streams, for the proxy's aborts.
    pub aborts: Arc<StreamAborts>,
}

pub async fn handle(
    state: Arc<AgentState>,
    link: Arc<LinkContext>,
    request: Request<Incoming>,
) -> Result<Response<Body>, Infallible> {
    let path = request.uri().path();
    if path == protocol::SESSION_PATH && request.method() == Method::POST {
        return Ok(open_session(&state, &link, request).await);
    }
    let Some(session) = link.session.get().cloned() else {
        return Ok(error_response(
            StatusCode::PRECONDITION_REQUIRED,
            "open a session first (POST /_offload/v1/session)",
        ));
    };
    let response = if path == protocol::SESSION_PATH && request.method() == Method::DELETE {
        let removed = end_session(&state, &session, "ended by the proxy").await;
        json_response(serde_json::to_vec(&removed).unwrap_or_default())
    } else if path == protocol::STATUS_PATH && request.method() == Method::GET {
        status(&state, &session).await
    } else if path == protocol::PROBE_PATH && request.method() == Method::POST {
        probe(request).await
    } else if path.starts_with(SYNC_PREFIX) {
        // Sync requests are the user's activity (their files changed); the
        // events stream is marked background by the proxy.
        let _activity = (!request.headers().contains_key(protocol::BACKGROUND))
            .then(|| session.activity(ActivityKind::Request));
        state.sync.handle(&session, request).await
    } else if let Some(id) = path.strip_prefix(protocol::ABORT_PATH).and_then(|rest| rest.strip_prefix('/')) {
        match id.parse::<u64>() {
            Ok(id) if request.method() == Method::POST => {
                let status =
                    if link.aborts.abort(id) { StatusCode::NO_CONTENT } else { StatusCode::NOT_FOUND };
                Response::builder().status(status).body(body::empty()).unwrap_or_default()
            }
            Ok(_) => error_response(StatusCode::METHOD_NOT_ALLOWED, "an abort is sent with POST"),
            Err(_) => error_response(StatusCode::BAD_REQUEST, &format!("not a stream number: {id}")),
        }
    } else if let Some(port) =
        path.strip_prefix(protocol::TUNNEL_PATH).and_then(|rest| rest.strip_prefix('/'))
    {
        if request.method() == Method::POST {
            let port = port.to_string();
            stream_tunnel(&state, &session, &link, request, &port).await
        } else {
            error_response(StatusCode::METHOD_NOT_ALLOWED, "a tunnel is opened with POST")
        }
    } else if path.starts_with(protocol::PREFIX) {
        error_response(StatusCode::NOT_FOUND, "unknown offload endpoint; is the proxy newer than the agent?")
    } else if request.method() == Method::CONNECT {
        tunnel(&state, &session, request).await
    } else {
        // Background streams of the proxy itself are not the user's activity.
        let activity = (!request.headers().contains_key(protocol::BACKGROUND))
            .then(|| session.activity(ActivityKind::Request));
        match request.headers().get(protocol::UPGRADE).cloned() {
            Some(protocol_value) => upgrade(&state, &session, &link, request, protocol_value).await,
            None => forward(&state, &session, request, activity).await,
        }
    };
    Ok(response)
}

async fn open_session(state: &AgentState, link: &LinkContext, request: Request<Incoming>) -> Response<Body> {
    let bytes = match Limited::new(request.into_body(), 64 << 10).collect().await {
        Ok(collected) => collected.to_bytes(),
        Err(error) => {
            return error_response(StatusCode::BAD_REQUEST, &format!("unreadable session request: {error}"))
        }
    };
    let asked: SessionRequest = serde_json::from_slice(&bytes).unwrap_or_default();
    let (engine, ping) = match engine_facts(&state.engine).await {
        Ok(facts) => facts,
        Err(message) => return error_response(StatusCode::BAD_GATEWAY, &message),
    };
    // Read anew at every session open; creates are checked against it.
    if let Some(gpu) = &engine.gpu {
        *state.known_gpus() = Some(gpu.clone());
    }
    let opened = if asked.resume_only {
        // The proxy's own watchers reconnecting: never a new session for them.
        match state.sessions.resume(asked.resume_token.as_deref()) {
            Some(session) => Ok((session, true)),
            None => return error_response(StatusCode::GONE, "the session has ended"),
        }
    } else {
        state.sessions.open(asked.resume_token.as_deref())
    };
    let (session, resumed) = match opened {
        Ok(opened) => opened,
        Err(error) => return error_response(StatusCode::INTERNAL_SERVER_ERROR, &error.to_string()),
    };
    if link.session.set(session.clone()).is_err() {
        return error_response(StatusCode::CONFLICT, "this link already has a session");
    }
    session.bind_link(link.closer.clone());
    let info = SessionInfo {
        session_id: session.id.clone(),
        resume_token: session.resume_token.clone(),
        resumed,
        agent_version: env!("CARGO_PKG_VERSION").to_string(),
        engine,
        ping,
        engine_socket: state.engine.describe().strip_prefix("unix://").map(str::to_string),
        features: vec![protocol::FEATURE_STREAM_TUNNEL.to_string()],
    };
    if resumed {
        tracing::info!(session = %info.session_id, "session resumed");
    } else {
        tracing::info!(session = %info.session_id, "session started");
    }
    match serde_json::to_vec(&info) {
        Ok(json) => json_response(json),
        Err(error) => error_response(StatusCode::INTERNAL_SERVER_ERROR, &error.to_string()),
    }
}

/// The session's facts, for `offload status`.
async fn status(state: &AgentState, session: &Session) -> Response<Body> {
    let config = &state.sessions.config;
    let idle_for = session.idle_for();
    let (requests, streams) = session.counts();
    let list = |kind| labelled(&state.engine, &session.id, kind);
    let (containers, volumes, networks) =
        (list(Kind::Containers).await, list(Kind::Volumes).await, list(Kind::Networks).await);
    let gpu = state.known_gpus().clone();
    let report = serde_json::json!({
        "session_id": session.id,
        "started_unix": session.started.duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0),
        "idle_seconds": idle_for.as_secs_f64(),
        "state": if idle_for < config.idle_timeout { "active" } else { "grace" },
        "idle_timeout_seconds": config.idle_timeout.as_secs_f64(),
        "grace_seconds": config.grace.as_secs_f64(),
        "ends_in_seconds": (config.idle_timeout + config.grace).saturating_sub(idle_for).as_secs_f64(),
        "activity": {
            "requests": requests,
            "streams": streams,
            "running_containers": session.running_containers(),
        },
        "resources": {
            "containers": containers.unwrap_or_default(),
            "images": session.images(),
            "volumes": volumes.unwrap_or_default(),
            "networks": networks.unwrap_or_default(),
        },
        "gpu": gpu,
    });
    json_response(serde_json::to_vec(&report).unwrap_or_default())
}

/// Reads and discards a body, for a throughput measurement.
async fn probe(request: Request<Incoming>) -> Response<Body> {
    let mut incoming = request.into_body();
    let mut bytes: u64 = 0;
    while let Some(frame) = incoming.frame().await {
        match frame {
            Ok(frame) => bytes += frame.data_ref().map_or(0, |d| d.len() as u64),
            Err(error) => return error_response(StatusCode::BAD_REQUEST, &format!("probe body: {error}")),
        }
    }
    json_response(serde_json::to_vec(&serde_json::json!({ "bytes": bytes })).unwrap_or_default())
}

fn json_response(json: Vec<u8>) -> Response<Body> {
    let length = json.len();
    let mut response = Response::new(body::full(json));
    response.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
    response.headers_mut().insert(header::CONTENT_LENGTH, HeaderValue::from(length));
    response
}

/// Asks the engine for its ping headers and version, for the session answer.
async fn engine_facts(engine: &EngineUpstream) -> Result<(EngineFacts, PingFacts), String> {
    let unreachable = |e: UpstreamError| format!("the agent cannot reach its Docker engine at {e}");
    let ping = engine.send(engine_get("/_ping")).await.map_err(unreachable)?;
    let (head, ping_body) = ping.response.into_parts();
    let ping_text = collect_text(ping_body).await?;
    let headers = head
        .headers
        .iter()
        .filter(|(name, _)| *name != header::DATE && *name != header::CONTENT_LENGTH)
        .filter_map(|(name, value)| Some((title_case(name.as_str()), value.to_str().ok()?.to_string())))
        .collect();
    let (version, gpu) = tokio::join!(engine.send(engine_get("/version")), detect_gpus(engine));
    let version = version.map_err(unreachable)?;
    let text = collect_text(version.response.into_body()).await?;
    let json: serde_json::Value = serde_json::from_str(&text).map_err(|e| format!("engine /version: {e}"))?;
    let field = |name: &str| json[name].as_str().unwrap_or_default().to_string();
    let facts = EngineFacts {
        version: field("Version"),
        api_version: field("ApiVersion"),
        min_api_version: field("MinAPIVersion"),
        os: field("Os"),
        arch: field("Arch"),
        gpu,
    };
    Ok((facts, PingFacts { headers, body: ping_text }))
}

/// Reads the engine's GPUs from its `/info`; `None` when `/info` cannot be
/// read (the session opens all the same).
async fn detect_gpus(engine: &EngineUpstream) -> Option<GpuFacts> {
    let info = match json(engine, "/info").await {
        Ok(info) => info,
        Err(error) => {
            tracing::warn!(%error, "cannot read the engine's /info: GPU support unknown");
            return None;
        }
    };
    let found = EngineGpus::from_info(&info);
    let facts =
        GpuFacts { available: found.available(), runtimes: found.runtimes, cdi_devices: found.cdi_devices };
    tracing::debug!(available = facts.available, runtimes = ?facts.runtimes, "engine GPUs");
    Some(facts)
}

/// True only when the engine is known to have no GPU: when unsure, the
/// engine answers for itself.
async fn engine_lacks_gpu(state: &AgentState) -> bool {
    let known = state.known_gpus().clone();
    let facts = match known {
        Some(facts) => Some(facts),
        None => detect_gpus(&state.engine).await,
    };
    if let Some(facts) = &facts {
        *state.known_gpus() = Some(facts.clone());
    }
    facts.is_some_and(|facts| !facts.available)
}

fn engine_get(path: &str) -> Request<Body> {
    let mut request = Request::new(body::empty());
    *request.uri_mut() = http::Uri::try_from(path).unwrap_or_default();
    request
}

async fn collect_text(body: Body) -> Result<String, String> {
    let bytes = Limited::new(body, 1 << 20)
        .collect()
        .await
        .map_err(|e| format!("reading the engine's answer: {e}"))?
        .to_bytes();
    Ok(String::from_utf8_lossy(&bytes).into_owned())
}

/// Go canonical header casing, so the proxy's replay looks like the engine.
fn title_case(name: &str) -> String {
    name.split('-')
        .map(|part| {
            let mut chars = part.chars();
            match chars.next() {
                Some(first) => first.to_ascii_uppercase().to_string() + chars.as_str(),
                None => String::new(),
            }
        })
        .collect::<Vec<_>>()
        .join("-")
}

/// The largest create body the agent reads to label it (the engine's own
/// limit for JSON bodies is far below this).
const MAX_CREATE_BODY: usize = 16 << 20;

/// A plain Docker API request: forwarded with its body streaming. Requests
/// that create something are labelled or recorded for the session's cleanup.
async fn forward(
    state: &AgentState,
    session: &Arc<Session>,
    request: Request<Incoming>,
    activity: Option<ActivityGuard>,
) -> Response<Body> {
    let method = request.method().clone();
    let creation = creation(&method, request.uri().path(), request.uri().query());
    let (mut parts, incoming) = request.into_parts();
    protocol::strip_link_headers(&mut parts.headers);
    let mut outgoing = body::stream(incoming);
    let mut new_images = Vec::new();
    let mut images_before = None;
    match &creation {
        Some(Creation::Container | Creation::Volume | Creation::Network) => {
            let bytes = match Limited::new(outgoing, MAX_CREATE_BODY).collect().await {
                Ok(collected) => collected.to_bytes(),
                Err(_) => {
                    return error_response(
                        StatusCode::PAYLOAD_TOO_LARGE,
                        "the create request's body is larger than 16 MiB; the agent reads create bodies to label them",
                    )
                }
            };
            // The engine's own error would come only at start, and obscure.
            if creation == Some(Creation::Container) && requests_gpu(&bytes) && engine_lacks_gpu(state).await
            {
                tracing::warn!(session = %session.id, "GPU create refused: the engine has no GPU");
                return error_response(StatusCode::BAD_REQUEST, NO_GPU);
            }
            // What the body binds is checked after the proxy rewrote it: a
            // client that bypasses the proxy gets no host path it may not have.
            let volume = creation == Some(Creation::Volume);
            if creation != Some(Creation::Network) {
                if let Err(why) = state.sync.check_create(&session.id, &bytes, volume) {
                    tracing::warn!(session = %session.id, %why, "create refused");
                    return error_response(StatusCode::FORBIDDEN, &why);
                }
            }
            let mut labelled =
                add_label(&bytes, SESSION_LABEL, &session.id).map(Bytes::from).unwrap_or(bytes);
            if creation == Some(Creation::Container) && state.ports_on_loopback {
                labelled = publish_on_loopback(&state.engine, labelled).await;
            }
            parts.headers.remove(header::TRANSFER_ENCODING);
            parts.headers.insert(header::CONTENT_LENGTH, HeaderValue::from(labelled.len()));
            outgoing = body::full(labelled);
        }
        Some(Creation::Images(references)) => {
            for reference in references {
                // A reference that already exists is not the session's to remove.
                let exists = matches!(
                    call(&state.engine, Method::GET, &format!("/images/{reference}/json")).await,
                    Ok((status, _)) if status.is_success()
                );
                if !exists {
                    new_images.push(reference.clone());
                }
            }
        }
        Some(Creation::ImageLoad) => images_before = Some(image_tags(&state.engine).await),
        None => {}
    }
    match state.engine.send(Request::from_parts(parts, outgoing)).await {
        Ok(exchange) => {
            let succeeded = exchange.response.status().is_success();
            if succeeded && !new_images.is_empty() {
                session.record_images(new_images);
                state.sessions.save(session);
            }
            let mut response = to_link_response(exchange, &method);
            if let (Some(before), true) = (images_before, succeeded) {
                response = record_loaded_images(response, session.clone(), before);
            }
            // The request stays activity until its response body has been sent.
            match activity {
                Some(guard) => response.map(|b| body::stream(Guarded::new(b, guard))),
                None => response,
            }
        }
        Err(error) => engine_failure(&error),
    }
}

/// Published ports bind to the remote's loopback only: they are reached
/// through the link, never on the remote host's interfaces.
async fn publish_on_loopback(engine: &EngineUpstream, create: Bytes) -> Bytes {
    let parsed: serde_json::Value = serde_json::from_slice(&create).unwrap_or_default();
    let publish_all = parsed
        .as_object()
        .and_then(|o| o.iter().find(|(k, _)| k.eq_ignore_ascii_case("HostConfig")))
        .and_then(|(_, hc)| hc.as_object())
        .and_then(|hc| hc.iter().find(|(k, _)| k.eq_ignore_ascii_case("PublishAllPorts")))
        .is_some_and(|(_, v)| v.as_bool() == Some(true));
    let mut image_exposed = Vec::new();
    if publish_all {
        let image = parsed
            .as_object()
            .and_then(|o| o.iter().find(|(k, _)| k.eq_ignore_ascii_case("Image")))
            .and_then(|(_, v)| v.as_str())
            .unwrap_or_default();
        if let Ok(inspect) = json(engine, &format!("/images/{image}/json")).await {
            if let Some(ports) = inspect["Config"]["ExposedPorts"].as_object() {
                image_exposed = ports.keys().cloned().collect();
            }
        }
    }
    bind_to_loopback(&create, &image_exposed).map(Bytes::from).unwrap_or(create)
}

/// A forwarded connection: `CONNECT 127.0.0.1:<port>`. Only the agent's own
/// loopback is a target; the stream counts as the session's activity.
async fn tunnel(
    state: &AgentState,
    session: &Arc<Session>,
    mut request: Request<Incoming>,
) -> Response<Body> {
    let target = request.uri().authority().map(|a| (a.host().to_string(), a.port_u16()));
    let Some((host, Some(port))) = target else {
        return error_response(StatusCode::BAD_REQUEST, "CONNECT needs host:port");
    };
    let address = host.trim_start_matches('[').trim_end_matches(']').parse::<std::net::IpAddr>();
    let ip = match address {
        Ok(ip) if ip.is_loopback() => ip,
        _ => {
            return error_response(
                StatusCode::FORBIDDEN,
                &format!("the agent forwards only to its own loopback, not to {host}:{port}"),
            )
        }
    };
    let udp = request.headers().get(protocol::PROTOCOL).is_some_and(|p| p == protocol::PROTOCOL_UDP);
    if udp {
        return udp_tunnel(session, request, std::net::SocketAddr::new(ip, port)).await;
    }
    let stream = match dial_forward(state, ip, port).await {
        Ok(stream) => stream,
        Err(refusal) => return refusal,
    };
    let pending = hyper::upgrade::on(&mut request);
    let activity = session.activity(ActivityKind::Stream);
    tokio::spawn(async move {
        let _activity = activity;
        let Ok(upgraded) = pending.await else { return };
        let mut link = hyper_util::rt::TokioIo::new(upgraded);
        let mut stream = stream;
        if let Err(error) = splice(&mut link, &mut stream).await {
            tracing::debug!(%error, port, "forwarded connection aborted");
            reset(&stream);
        }
    });
    Response::new(body::empty())
}

/// Dials a forwarded port on this host (the callers allow only loopback):
/// straight to the container when the engine's userland proxy serves the
/// port (see `published`), else the port itself.
async fn dial_forward(
    state: &AgentState,
    ip: std::net::IpAddr,
    port: u16,
) -> Result<tokio::net::TcpStream, Response<Body>> {
    let direct = if ip.is_loopback() {
        // It reads /proc: not on the runtime's thread.
        let published = state.published.clone();
        let target = std::net::SocketAddr::new(ip, port);
        tokio::task::spawn_blocking(move || published.container_for(target)).await.ok().flatten()
    } else {
        None
    };
    if let Some(container) = direct {
        match tokio::time::timeout(DIRECT_DIAL_LIMIT, tokio::net::TcpStream::connect(container)).await {
            Ok(Ok(stream)) => {
                let _ = stream.set_nodelay(true);
                return Ok(stream);
            }
            Ok(Err(error)) => {
                tracing::debug!(%error, %container, port, "container not reachable; dialing the port");
                // Refused: reachable, not listening yet. Anything else: the
                // route is the problem, and would be next time too.
                if error.kind() != std::io::ErrorKind::ConnectionRefused {
                    state.published.mark_unreachable(container);
                }
            }
            Err(_) => {
                tracing::debug!(%container, port, "container did not answer; dialing the port");
                state.published.mark_unreachable(container);
            }
        }
    }
    match tokio::net::TcpStream::connect((ip, port)).await {
        Ok(stream) => {
            let _ = stream.set_nodelay(true);
            Ok(stream)
        }
        Err(error) => {
            Err(error_response(StatusCode::BAD_GATEWAY, &format!("cannot connect to port {port}: {error}")))
        }
    }
}

/// Ends a forwarded connection with a reset (RST) when it is dropped: the
/// other end of the link aborted, and a clean close would tell the port's
/// program that everything it was sent arrived.
fn reset(stream: &tokio::net::TcpStream) {
    if let Err(error) = stream.set_zero_linger() {
        tracing::debug!(%error, "cannot set SO_LINGER 0; the connection ends with a FIN");
    }
}

/// A container on a bridge of this host answers a connect at once; one that
/// does not (a network the agent cannot route to) is reached through its port.
const DIRECT_DIAL_LIMIT: std::time::Duration = std::time::Duration::from_millis(500);

/// A forwarded TCP connection in one round trip (`POST /_offload/v1/tunnel/<port>`):
/// the request body is what the local client sends, the response body what the
/// port answers. Always the agent's own loopback.
async fn stream_tunnel(
    state: &AgentState,
    session: &Arc<Session>,
    link_context: &LinkContext,
    request: Request<Incoming>,
    port: &str,
) -> Response<Body> {
    let Ok(port) = port.parse::<u16>() else {
        return error_response(StatusCode::BAD_REQUEST, &format!("not a port number: {port}"));
    };
    // Watched from the start: an abort may come while the port is dialled.
    let abort = abort_watch(link_context, request.headers());
    let stream = match dial_forward(state, std::net::Ipv4Addr::LOCALHOST.into(), port).await {
        Ok(stream) => stream,
        Err(refusal) => return refusal,
    };
    let (writer, response_body, ended) = stream::channel_noticing_drop();
    let activity = session.activity(ActivityKind::Stream);
    tokio::spawn(async move {
        let _activity = activity;
        let mut link = LinkStream { reader: BodyReader::new(request.into_body()), writer };
        let mut stream = stream;
        match relay_link_stream(&mut link, &mut stream, ended, abort, OnBrokenPipe::EndSplice).await {
            Ok(Some(_)) => return,
            Ok(None) => tracing::debug!(port, "forwarded connection reset by the proxy"),
            Err(error) => tracing::debug!(%error, port, "forwarded connection aborted"),
        }
        reset(&stream);
    });
    Response::new(body::stream(response_body))
}

/// A forwarded UDP flow (`CONNECT` with `x-offload-protocol: udp`): framed
/// datagrams to and from a UDP socket connected to `target` (loopback).
async fn udp_tunnel(
    session: &Arc<Session>,
    mut request: Request<Incoming>,
    target: std::net::SocketAddr,
) -> Response<Body> {
    let socket = match udp::connect(target).await {
        Ok(socket) => socket,
        Err(error) => {
            return error_response(
                StatusCode::BAD_GATEWAY,
                &format!("cannot open a UDP socket to port {}: {error}", target.port()),
            )
        }
    };
    let pending = hyper::upgrade::on(&mut request);
    let activity = session.activity(ActivityKind::Stream);
    tokio::spawn(async move {
        let _activity = activity;
        let Ok(upgraded) = pending.await else { return };
        let mut link = hyper_util::rt::TokioIo::new(upgraded);
        if let Err(error) = udp::relay(&mut link, &socket).await {
            tracing::debug!(%error, port = target.port(), "forwarded UDP flow aborted");
        }
    });
    Response::new(body::empty())
}

async fn image_tags(engine: &EngineUpstream) -> Vec<String> {
    let images = json(engine, "/images/json").await.unwrap_or_default();
    images
        .as_array()
        .map(|list| {
            list.iter()
                .flat_map(|image| {
                    let tags = image["RepoTags"].as_array().cloned().unwrap_or_default();
                    tags.into_iter()
                        .filter_map(|t| t.as_str().map(str::to_string))
                        .chain(image["Id"].as_str().map(str::to_string))
                })
                .collect()
        })
        .unwrap_or_default()
}

/// Watches a load's progress stream for the images it loaded.
fn record_loaded_images(
    response: Response<Body>,
    session: Arc<Session>,
    before: Vec<String>,
) -> Response<Body> {
    response.map(|inner| {
        body::stream(Inspected::new(inner, move |text| {
            let loaded: Vec<String> = loaded_images(&String::from_utf8_lossy(text))
                .into_iter()
                .filter(|r| !before.contains(r))
                .collect();
            session.record_images(loaded);
        }))
    })
}

/// Marks what HTTP/2 cannot carry: a close-delimited body.
fn to_link_response(exchange: Exchange, method: &Method) -> Response<Body> {
    let (mut head, response_body) = exchange.response.into_parts();
    let close_delimited = is_close_delimited(method, head.status, &head.headers);
    strip_hop_by_hop(&mut head.headers);
    if close_delimited {
        head.headers
            .insert(HeaderName::from_static(protocol::CLOSE_DELIMITED), HeaderValue::from_static("1"));
    }
    head.version = http::Version::HTTP_2;
    Response::from_parts(head, response_body)
}

fn engine_failure(error: &UpstreamError) -> Response<Body> {
    tracing::warn!(engine = %error.target, reason = %error.reason, "engine request failed");
    error_response(
        StatusCode::BAD_GATEWAY,
        &format!("the agent cannot reach its Docker engine at {}: {}", error.target, error.reason),
    )
}

/// An upgrade: the first `BODY_LENGTH` bytes of the stream are the HTTP body
/// for the engine; after the engine's 101, the rest is relayed raw both ways.
async fn upgrade(
    state: &AgentState,
    session: &Arc<Session>,
    link_context: &LinkContext,
    request: Request<Incoming>,
    protocol_value: HeaderValue,
) -> Response<Body> {
    let background = request.headers().contains_key(protocol::BACKGROUND);
    let abort = abort_watch(link_context, request.headers());
    let method = request.method().clone();
    let (mut parts, mut incoming) = request.into_parts();
    let body_length: usize = parts
        .headers
        .get(protocol::BODY_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    if body_length > protocol::MAX_UPGRADE_BODY {
        return error_response(StatusCode::PAYLOAD_TOO_LARGE, "the upgrade request's body is too large");
    }
    let (http_body, leftover) = match read_prefix(&mut incoming, body_length).await {
        Ok(split) => split,
        Err(message) => return error_response(StatusCode::BAD_REQUEST, &message),
    };
    protocol::strip_link_headers(&mut parts.headers);
    parts.headers.insert(header::CONNECTION, HeaderValue::from_static("Upgrade"));
    parts.headers.insert(header::UPGRADE, protocol_value);
    parts.headers.insert(header::CONTENT_LENGTH, HeaderValue::from(body_length));
    let engine_request = Request::from_parts(parts, body::full(http_body));
    let exchange = match state.engine.send(engine_request).await {
        Ok(exchange) => exchange,
        Err(error) => return engine_failure(&error),
    };
    let Some(engine_side) = exchange.upgrade else {
        return to_link_response(exchange, &method);
    };
    let (mut head, _) = exchange.response.into_parts();
    let engine_upgrade = head.headers.get(header::UPGRADE).cloned();
    strip_hop_by_hop(&mut head.headers);
    head.status = StatusCode::OK;
    head.version = http::Version::HTTP_2;
    head.headers.insert(HeaderName::from_static(protocol::STATUS), HeaderValue::from_static("101"));
    if let Some(value) = engine_upgrade {
        head.headers.insert(HeaderName::from_static(protocol::UPGRADE), value);
    }
    let (writer, response_body, ended) = stream::channel_noticing_drop();
    // An open attach, exec or build session is activity for as long as it lives.
    let activity = (!background).then(|| session.activity(ActivityKind::Stream));
    let relay = async move {
        let _activity = activity;
        let mut engine = match engine_side.await {
            Ok(io) => io,
            Err(error) => return tracing::debug!(%error, "engine upgrade failed"),
        };
        let mut link = LinkStream { reader: BodyReader::with_prefix(incoming, leftover), writer };
        // A program that exits while its stdin still flows: its last output
        // is relayed before the stream ends.
        match relay_link_stream(&mut link, &mut engine, ended, abort, OnBrokenPipe::FinishOtherWay).await {
            Ok(Some(counts)) => {
                tracing::debug!(sent = counts.a_to_b, received = counts.b_to_a, "upgraded stream ended")
            }
            Ok(None) => tracing::debug!("upgraded stream reset by the proxy"),
            Err(error) => tracing::debug!(%error, "upgraded stream aborted"),
        }
    };
    // The relay lives as long as the stream (see `relay_link_stream`).
    tokio::spawn(relay.instrument(tracing::debug_span!("upgraded")));
    Response::from_parts(head, body::stream(response_body))
}

/// Splices a link stream (request body in, response body out) with `target`
/// until both directions end or either side aborts. The proxy's reset may
/// come after its END_STREAM while `target` is silent (an idle attach, a
/// quiet port); hyper then drops our response body, `ended` fails, and the
/// relay ends too instead of holding `target` and the session's activity.
/// `None`: ended by such a reset. The proxy's abort (see [`StreamAborts`])
/// ends it too, as a failure.
async fn relay_link_stream<T>(
    link: &mut LinkStream<BodyReader<Incoming>>,
    target: &mut T,
    ended: tokio::sync::oneshot::Receiver<()>,
    mut abort: Option<AbortWatch>,
    on_broken_pipe: OnBrokenPipe,
) -> std::io::Result<Option<crate::splice::Spliced>>
where
    T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + ?Sized,
{
    tokio::select! {
        spliced = link.splice_with(target, on_broken_pipe) => spliced.map(Some),
        Err(_) = ended => Ok(None),
        () = aborted(&mut abort) => {
            Err(std::io::Error::new(std::io::ErrorKind::ConnectionAborted, "aborted by the proxy"))
        }
    }
}

/// Watches for the proxy's abort of the stream its `x-offload-stream` names.
fn abort_watch(link: &LinkContext, headers: &http::HeaderMap) -> Option<AbortWatch> {
    let id = headers.get(protocol::STREAM_ID)?.to_str().ok()?.parse().ok()?;
    Some(link.aborts.watch(id))
}

/// Reads exactly `length` bytes from the start of the body; returns them and
/// whatever else the last frame held (the first bytes of the raw stream).
async fn read_prefix(incoming: &mut Incoming, length: usize) -> Result<(Bytes, Bytes), String> {
    let mut prefix = BytesMut::with_capacity(length);
    while prefix.len() < length {
        let frame = match incoming.frame().await {
            Some(Ok(frame)) => frame,
            Some(Err(error)) => return Err(format!("reading the upgrade request: {error}")),
            None => return Err("the upgrade request's body ended early".to_string()),
        };
        if let Ok(mut data) = frame.into_data() {
            let wanted = length - prefix.len();
            if data.len() > wanted {
                let rest = data.split_off(wanted);
                prefix.extend_from_slice(&data);
                return Ok((prefix.freeze(), rest));
            }
            prefix.extend_from_slice(&data);
        }
    }
    Ok((prefix.freeze(), Bytes::new()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn title_cases_like_go() {
        assert_eq!(title_case("api-version"), "Api-Version");
        assert_eq!(title_case("ostype"), "Ostype");
        assert_eq!(title_case("docker-experimental"), "Docker-Experimental");
    }

    #[test]
    fn gpu_facts_are_optional_on_the_wire() {
        // An older agent's engine facts: no `gpu`, which reads as unknown.
        let old = r#"{"version":"28.3.0","api_version":"1.51","min_api_version":"1.24","os":"linux","arch":"amd64"}"#;
        let facts: EngineFacts = serde_json::from_str(old).unwrap();
        assert_eq!(facts.gpu, None);
        assert!(!serde_json::to_string(&facts).unwrap().contains("gpu"));
        let gpu = GpuFacts { available: true, runtimes: vec!["nvidia".into()], cdi_devices: vec![] };
        let new = serde_json::to_value(EngineFacts { gpu: Some(gpu), ..facts }).unwrap();
        assert_eq!(
            new["gpu"],
            serde_json::json!({"available": true, "runtimes": ["nvidia"], "cdi_devices": []})
        );
        let partial: GpuFacts = serde_json::from_str(r#"{"available":false}"#).unwrap();
        assert_eq!(partial, GpuFacts::default());
    }
}
