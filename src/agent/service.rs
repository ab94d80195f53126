//! Handles one stream of the link: the session handshake, or a Docker API
//! request forwarded to the engine (plain, or upgraded into a byte stream).

use std::convert::Infallible;
use std::sync::Arc;

use bytes::{Bytes, BytesMut};
use http::header::{self, HeaderName, HeaderValue};
use http::{Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Limited};
use hyper::body::Incoming;
use tracing::Instrument;

use super::session::Sessions;
use crate::body::{self, Body};
use crate::docker::error::error_response;
use crate::docker::headers::{is_close_delimited, strip_hop_by_hop};
use crate::link::protocol::{self, EngineFacts, PingFacts, SessionInfo, SessionRequest};
use crate::link::stream::{self, BodyReader};
use crate::splice::splice;
use crate::upstream::engine::EngineUpstream;
use crate::upstream::{Exchange, Upstream, UpstreamError};

pub struct AgentState {
    pub engine: EngineUpstream,
    pub sessions: Sessions,
}

pub async fn handle(
    state: Arc<AgentState>,
    request: Request<Incoming>,
) -> Result<Response<Body>, Infallible> {
    let path = request.uri().path();
    let response = if path == protocol::SESSION_PATH && request.method() == Method::POST {
        open_session(&state, request).await
    } else if path.starts_with(protocol::PREFIX) {
        error_response(StatusCode::NOT_FOUND, "unknown offload endpoint; is the proxy newer than the agent?")
    } else if request.method() == Method::CONNECT {
        error_response(StatusCode::NOT_IMPLEMENTED, "port forwarding is not supported by this agent yet")
    } else if let Some(protocol_value) = request.headers().get(protocol::UPGRADE).cloned() {
        upgrade(&state, request, protocol_value).await
    } else {
        forward(&state, request).await
    };
    Ok(response)
}

async fn open_session(state: &AgentState, request: Request<Incoming>) -> Response<Body> {
    let bytes = match Limited::new(request.into_body(), 64 << 10).collect().await {
        Ok(collected) => collected.to_bytes(),
        Err(error) => {
            return error_response(StatusCode::BAD_REQUEST, &format!("unreadable session request: {error}"))
        }
    };
    let asked: SessionRequest = serde_json::from_slice(&bytes).unwrap_or_default();
    let (record, resumed) = match state.sessions.open(asked.resume_token.as_deref()) {
        Ok(opened) => opened,
        Err(error) => return error_response(StatusCode::INTERNAL_SERVER_ERROR, &error.to_string()),
    };
    let (engine, ping) = match engine_facts(&state.engine).await {
        Ok(facts) => facts,
        Err(message) => return error_response(StatusCode::BAD_GATEWAY, &message),
    };
    let info = SessionInfo {
        session_id: record.id,
        resume_token: record.resume_token,
        resumed,
        agent_version: env!("CARGO_PKG_VERSION").to_string(),
        engine,
        ping,
    };
    if !resumed {
        tracing::info!(session = %info.session_id, "session started");
    }
    match serde_json::to_vec(&info) {
        Ok(json) => json_response(json),
        Err(error) => error_response(StatusCode::INTERNAL_SERVER_ERROR, &error.to_string()),
    }
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
    let version = engine.send(engine_get("/version")).await.map_err(unreachable)?;
    let text = collect_text(version.response.into_body()).await?;
    let json: serde_json::Value = serde_json::from_str(&text).map_err(|e| format!("engine /version: {e}"))?;
    let field = |name: &str| json[name].as_str().unwrap_or_default().to_string();
    let facts = EngineFacts {
        version: field("Version"),
        api_version: field("ApiVersion"),
        min_api_version: field("MinAPIVersion"),
        os: field("Os"),
        arch: field("Arch"),
    };
    Ok((facts, PingFacts { headers, body: ping_text }))
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

/// A plain Docker API request: forwarded with its body streaming.
async fn forward(state: &AgentState, request: Request<Incoming>) -> Response<Body> {
    let method = request.method().clone();
    let (mut parts, incoming) = request.into_parts();
    parts.headers.remove(protocol::BACKGROUND);
    match state.engine.send(Request::from_parts(parts, body::stream(incoming))).await {
        Ok(exchange) => to_link_response(exchange, &method),
        Err(error) => engine_failure(&error),
    }
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
    request: Request<Incoming>,
    protocol_value: HeaderValue,
) -> Response<Body> {
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
    for name in [protocol::UPGRADE, protocol::BODY_LENGTH, protocol::BACKGROUND] {
        parts.headers.remove(name);
    }
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
    let (writer, response_body) = stream::channel();
    let relay = async move {
        let mut engine = match engine_side.await {
            Ok(io) => io,
            Err(error) => return tracing::debug!(%error, "engine upgrade failed"),
        };
        let mut link = tokio::io::join(BodyReader::with_prefix(incoming, leftover), writer);
        match splice(&mut link, &mut engine).await {
            Ok(counts) => {
                tracing::debug!(sent = counts.a_to_b, received = counts.b_to_a, "upgraded stream ended")
            }
            Err(error) => tracing::debug!(%error, "upgraded stream aborted"),
        }
    };
    // The relay lives as long as the stream: it ends when both directions end
    // or either side aborts.
    tokio::spawn(relay.instrument(tracing::debug_span!("upgraded")));
    Response::from_parts(head, body::stream(response_body))
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
}
