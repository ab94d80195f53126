//! The wire contract of the link, version 1 (see ARCHITECTURE.md).
//!
//! - `POST /_offload/v1/session` first: the agent answers with [`SessionInfo`].
//!   `DELETE` on the same path ends the session now (with cleanup);
//!   `GET /_offload/v1/status` reports it.
//! - Any other path not under `/_offload/` is a Docker API request, forwarded
//!   verbatim (hop-by-hop headers removed), bodies streamed both ways.
//! - An upgrade (attach, exec start, `/session`, `/grpc`) is an ordinary
//!   request carrying [`UPGRADE`]. Its request body is the original HTTP body
//!   ([`BODY_LENGTH`] bytes) followed by the client→engine bytes; the response
//!   carries [`STATUS`] = 101 and the engine's headers, and its body is the
//!   engine→client bytes. END_STREAM is a half-close, RST_STREAM an abort.
//! - [`CLOSE_DELIMITED`] marks a response the engine sent close-delimited.
//! - [`BACKGROUND`] marks streams the proxy opens for itself (not activity).
//! - `CONNECT 127.0.0.1:<port>` forwards a published port (loopback only);
//!   with [`PROTOCOL`] = `udp` the stream carries datagrams framed by
//!   `link::datagram`, otherwise TCP bytes.
//! - `POST /_offload/v1/tunnel/<port>` forwards a published TCP port in one
//!   round trip: the request body carries the client's bytes from the start
//!   (no wait for a CONNECT's 200), the response body the port's bytes. Used
//!   when the session lists [`FEATURE_STREAM_TUNNEL`]; CONNECT otherwise.
//! - `/_offload/v1/sync/mounts...`: bind-mount sync (see `agent::sync`).

use serde::{Deserialize, Serialize};

pub const SESSION_PATH: &str = "/_offload/v1/session";
/// `GET`: the session's facts (activity, idle deadline, resources).
pub const STATUS_PATH: &str = "/_offload/v1/status";
pub const PREFIX: &str = "/_offload/";
/// `POST`: the agent reads and discards the body and answers `{"bytes": N}`
/// (`offload diagnose`'s throughput probe).
pub const PROBE_PATH: &str = "/_offload/v1/probe";

/// What every header of the link's own starts with: the proxy sets them, and
/// drops any a local client sends.
pub const HEADER_PREFIX: &str = "x-offload-";
/// Removes every header of the link's own: from a local client's request
/// (the agent believes them), and from what the agent sends the engine.
pub fn strip_link_headers(headers: &mut http::HeaderMap) {
    let ours: Vec<http::HeaderName> =
        headers.keys().filter(|name| name.as_str().starts_with(HEADER_PREFIX)).cloned().collect();
    for name in ours {
        headers.remove(name);
    }
}

/// The client's `Upgrade` value (`tcp`, `h2c`), on an upgraded request.
pub const UPGRADE: &str = "x-offload-upgrade";
/// How many leading request-body bytes are the HTTP body (the rest is the stream).
pub const BODY_LENGTH: &str = "x-offload-body-length";
/// The engine's real status on an upgraded response (101, or 200 for a hijack).
pub const STATUS: &str = "x-offload-status";
/// Present when the engine's response body ran until the connection closed.
pub const CLOSE_DELIMITED: &str = "x-offload-close-delimited";
/// Present on streams the proxy opens for itself.
pub const BACKGROUND: &str = "x-offload-background";
/// On a `CONNECT`: `udp` for a forwarded UDP port (absent means TCP).
pub const PROTOCOL: &str = "x-offload-protocol";
pub const PROTOCOL_UDP: &str = "udp";
/// `POST <TUNNEL_PATH>/<port>`: a forwarded TCP connection on one stream.
pub const TUNNEL_PATH: &str = "/_offload/v1/tunnel";
/// In [`SessionInfo::features`]: the agent serves [`TUNNEL_PATH`].
pub const FEATURE_STREAM_TUNNEL: &str = "stream-tunnel";
/// On an upgrade or a tunnel: the proxy's number for the stream (unique on
/// its link), by which [`ABORT_PATH`] names it.
pub const STREAM_ID: &str = "x-offload-stream";
/// `POST <ABORT_PATH>/<stream id>`: the proxy's side of that stream failed;
/// the agent ends it as an abort. A RST_STREAM would say the same, but hyper
/// cannot send one while the stream waits for flow-control window.
pub const ABORT_PATH: &str = "/_offload/v1/abort";

/// The largest upgrade request body the proxy reads before sending (exec
/// start bodies are a few dozen bytes).
pub const MAX_UPGRADE_BODY: usize = 1 << 20;

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct SessionRequest {
    /// Present when resuming a session after a reconnect.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resume_token: Option<String>,
    /// Set when the proxy reconnects only for its own background streams:
    /// resume the session, but never start a new one (410 Gone instead), so
    /// a watcher cannot keep an ended session's successor alive.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub resume_only: bool,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SessionInfo {
    pub session_id: String,
    pub resume_token: String,
    pub resumed: bool,
    pub agent_version: String,
    pub engine: EngineFacts,
    /// The engine's `/_ping` answer, so the proxy can answer pings itself.
    pub ping: PingFacts,
    /// The engine's unix socket on the remote host, for binds of the docker
    /// socket (`-v /var/run/docker.sock:...`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub engine_socket: Option<String>,
    /// What this agent serves beyond link contract v1 (older agents: none).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub features: Vec<String>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct EngineFacts {
    pub version: String,
    pub api_version: String,
    pub min_api_version: String,
    pub os: String,
    pub arch: String,
    /// What the engine offers `docker run --gpus`; `None` from agents that
    /// predate it, or when the engine's `/info` could not be read.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gpu: Option<GpuFacts>,
}

/// The engine's GPUs, as its `GET /info` tells (see `docker::gpu`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct GpuFacts {
    /// A GPU create can work there; when false the agent refuses it.
    #[serde(default)]
    pub available: bool,
    /// The engine's GPU runtimes (`nvidia`, `nvidia-cdi`, ...).
    #[serde(default)]
    pub runtimes: Vec<String>,
    /// GPUs the engine found through CDI (`nvidia.com/gpu=0`; newer engines).
    #[serde(default)]
    pub cdi_devices: Vec<String>,
}

/// The headers of the engine's `GET /_ping` response, in order, and its body.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct PingFacts {
    pub headers: Vec<(String, String)>,
    pub body: String,
}

#[cfg(test)]
mod link_header_tests {
    use super::*;

    #[test]
    fn only_the_links_own_headers_are_stripped() {
        let mut headers = http::HeaderMap::new();
        for name in [UPGRADE, BODY_LENGTH, BACKGROUND, STREAM_ID, "X-Offload-Anything"] {
            headers.insert(http::HeaderName::from_bytes(name.as_bytes()).unwrap(), "1".parse().unwrap());
        }
        headers.insert("x-offloaded", "kept".parse().unwrap());
        headers.insert("content-type", "application/json".parse().unwrap());
        strip_link_headers(&mut headers);
        let mut left: Vec<&str> = headers.keys().map(|name| name.as_str()).collect();
        left.sort_unstable();
        assert_eq!(left, ["content-type", "x-offloaded"]);
    }
}
