//! The local half: a Docker API endpoint on a unix socket that forwards
//! everything to an [`Upstream`], transparently.

pub mod hangup;
pub mod mounts;
pub mod parse_errors;
pub mod ports;
pub mod service;
pub mod udp;
pub mod wait_answer;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::net::UnixListener;
use tracing::Instrument;

use crate::lifecycle::{termination_signal, Lifecycle};
use crate::upstream::Upstream;
use hangup::HangupWatch;
use parse_errors::JsonParseErrors;
use service::{handle, ProxyState};

/// Go's `http.DefaultMaxHeaderBytes` (1 MiB) plus room for the request line,
/// so anything dockerd accepts, we accept.
pub(crate) const MAX_HEAD_BYTES: usize = (1 << 20) + 4096;
/// hyper's default is 100 header lines. BuildKit's `/session` sends one per
/// gRPC method (a few dozen), so allow more; but hyper zeroes a slot per line
/// for every request it parses (a 2048-line limit cost ~5% of the proxy's CPU
/// per request in a profile), so not unboundedly more. Go has no such limit.
const MAX_HEADER_LINES: usize = 256;

#[derive(Debug, Clone)]
pub struct ProxyConfig {
    pub listen: PathBuf,
    /// How long streams may keep running after SIGINT/SIGTERM.
    pub shutdown_grace: Duration,
    /// Where published ports listen locally when the user named no address.
    pub publish_address: std::net::IpAddr,
    /// Sync ignore rules for every bind mount (gitignore lines).
    pub ignore: Vec<String>,
}

/// Binds the socket, serves until SIGINT/SIGTERM, then drains and removes it.
pub async fn serve(
    config: ProxyConfig,
    upstream: Arc<dyn Upstream>,
) -> Result<(), crate::unix_socket::ListenError> {
    let (listener, socket_file) = crate::unix_socket::bind(&config.listen)?;
    let lifecycle = Lifecycle::new();
    tracing::info!(
        listen = %format!("unix://{}", socket_file.path().display()),
        upstream = upstream.describe(),
        "offload proxy ready"
    );
    let accept = tokio::spawn(run(listener, upstream, lifecycle.clone(), config.clone()));
    if let Err(error) = termination_signal().await {
        tracing::error!(%error, "cannot wait for signals; shutting down");
    }
    tracing::info!(grace = ?config.shutdown_grace, "shutting down: no new connections, draining streams");
    // Stop accepting and unlink the socket first, so new clients fail fast.
    lifecycle.token.cancel();
    let _ = accept.await;
    drop(socket_file);
    if !lifecycle.shutdown(config.shutdown_grace).await {
        tracing::warn!("streams still open after the grace period; closing them");
    }
    Ok(())
}

/// Accepts connections until `lifecycle.token` is cancelled. One task per
/// connection; every task is tracked by the lifecycle.
pub async fn run(
    listener: UnixListener,
    upstream: Arc<dyn Upstream>,
    lifecycle: Lifecycle,
    config: ProxyConfig,
) {
    // Ports need forwards only when the engine is on another machine.
    let ports = upstream
        .forwards_ports()
        .then(|| ports::PortForwards::new(upstream.clone(), lifecycle.clone(), config.publish_address));
    let mounts = upstream.syncs_mounts().then(|| {
        mounts::Mounts::new(upstream.clone(), lifecycle.clone(), config.listen.clone(), config.ignore.clone())
    });
    let state = Arc::new(ProxyState { upstream, lifecycle: lifecycle.clone(), ports, mounts });
    let mut next_id: u64 = 0;
    loop {
        let stream = tokio::select! {
            _ = lifecycle.token.cancelled() => break,
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(error) => {
                    on_accept_error(error).await;
                    continue;
                }
            },
        };
        next_id += 1;
        let span = tracing::debug_span!("conn", id = next_id);
        lifecycle.spawn(serve_connection(stream, state.clone(), lifecycle.clone()).instrument(span));
    }
}

async fn serve_connection(stream: tokio::net::UnixStream, state: Arc<ProxyState>, lifecycle: Lifecycle) {
    let (stream, watch) = match HangupWatch::new(stream) {
        Ok(split) => split,
        Err(error) => return tracing::warn!(%error, "cannot watch the client connection"),
    };
    let watch = Arc::new(watch);
    let service_watch = watch.clone();
    let service = service_fn(move |request| handle(state.clone(), service_watch.clone(), request));
    let connection = http1::Builder::new()
        // Answer clients that shut down their write side after the request
        // (HTTP/1.0 tools do); a real hang-up is caught by `watch` instead.
        .half_close(true)
        // Go canonicalizes header names (`Api-Version`, `Ostype`); so do we.
        .title_case_headers(true)
        .max_buf_size(MAX_HEAD_BYTES)
        .max_headers(MAX_HEADER_LINES)
        .serve_connection(TokioIo::new(JsonParseErrors::new(stream)), service)
        .with_upgrades();
    let mut connection = std::pin::pin!(connection);
    let result = tokio::select! {
        result = connection.as_mut() => result,
        _ = watch.hung_up() => {
            // Dropping the connection drops the upstream request with it.
            return tracing::debug!("client hung up; cancelling its request");
        }
        _ = lifecycle.token.cancelled() => {
            // Finish the request in flight, then close.
            connection.as_mut().graceful_shutdown();
            connection.as_mut().await
        }
    };
    if let Err(error) = result {
        tracing::debug!(%error, "client connection ended with an error");
    }
}

/// Per-connection failures are not fatal; running out of descriptors is
/// transient, so back off briefly instead of spinning.
async fn on_accept_error(error: std::io::Error) {
    tracing::warn!(%error, "accept failed");
    if matches!(error.raw_os_error(), Some(23 | 24)) {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
