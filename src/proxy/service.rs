//! Handles one Docker API request: forward it upstream, relay the response
//! head as soon as it arrives, stream bodies both ways, and bridge hijacked
//! connections (attach, exec, `/session`, `/grpc`) after a 101.

use std::convert::Infallible;
use std::sync::Arc;

use http::{Request, Response, StatusCode, Version};
use hyper::body::Incoming;
use hyper::upgrade::OnUpgrade;
use hyper_util::rt::TokioIo;
use tracing::Instrument;

use super::hangup::HangupWatch;
use super::ports::PortForwards;
use crate::body::{self, Body};
use crate::docker::error::error_response;
use crate::docker::headers::{
    client_response_headers, is_close_delimited, requested_upgrade, upstream_request_headers,
};
use crate::docker::route::{classify, container_started, container_stopped};
use crate::lifecycle::Lifecycle;
use crate::splice::splice;
use crate::upstream::{BoxFuture, BoxedIo, Upstream, UpstreamError};

/// What every request handler shares.
pub struct ProxyState {
    pub upstream: Arc<dyn Upstream>,
    pub lifecycle: Lifecycle,
    /// Local forwards of published ports, when the engine is remote.
    pub ports: Option<Arc<PortForwards>>,
}

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
    let route = classify(request.method(), request.uri().path());
    let started = container_started(request.method(), request.uri().path()).map(str::to_string);
    let stopped = container_stopped(request.method(), request.uri().path()).map(str::to_string);
    let method = request.method().clone();
    // Only HTTP/1.1 can upgrade; hyper ignores `Upgrade` on HTTP/1.0 too.
    let upgrade =
        (request.version() == Version::HTTP_11).then(|| requested_upgrade(request.headers())).flatten();
    let client_side = upgrade.is_some().then(|| hyper::upgrade::on(&mut request));

    let (mut parts, incoming) = request.into_parts();
    upstream_request_headers(&mut parts.headers, upgrade);
    let upstream_request = Request::from_parts(parts, body::stream(incoming));

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
        state.lifecycle.spawn(relay(client_side, upstream_side, watch).instrument(span));
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
    watch: Arc<HangupWatch>,
) {
    let (client, upstream) = tokio::join!(client_side, upstream_side);
    let (client, mut upstream) = match (client, upstream) {
        (Ok(client), Ok(upstream)) => (client, upstream),
        (Err(error), _) => return tracing::debug!(%error, "client left before the upgrade completed"),
        (_, Err(error)) => return tracing::debug!(%error, "upstream upgrade failed"),
    };
    let mut client = TokioIo::new(client);
    tokio::select! {
        result = splice(&mut client, &mut upstream) => match result {
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
