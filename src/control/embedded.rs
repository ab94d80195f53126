//! The embedded default: an agent inside the proxy's process, against this
//! machine's engine, reached over a private unix socket. The whole pipeline
//! (link, session, create rewriting, bind-mount sync, cleanup) runs as it
//! would against a remote; only ports are left to the engine, whose own
//! bindings already answer on this machine.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use crate::agent::session::SessionConfig;
use crate::agent::sync::SyncConfig;
use crate::agent::{Agent, AgentListener};
use crate::lifecycle::Lifecycle;
use crate::link::transport::{Dialer, RemoteAddress, SshOptions};
use crate::tls::TlsFiles;
use crate::unix_socket::SocketFile;
use crate::upstream::address::EngineAddress;
use crate::upstream::engine::EngineUpstream;
use crate::upstream::link::LinkUpstream;
use crate::upstream::Upstream;

/// Keeps the embedded agent serving; stops it when dropped.
pub struct EmbeddedAgent {
    lifecycle: Lifecycle,
    _socket: SocketFile,
}

impl Drop for EmbeddedAgent {
    fn drop(&mut self) {
        self.lifecycle.token.cancel();
    }
}

pub struct EmbeddedOptions {
    pub engine: EngineAddress,
    pub idle_timeout: Duration,
    pub grace: Duration,
    pub keepalive: Duration,
}

/// Starts the agent under `state_dir` and returns the upstream that reaches it.
pub fn start(
    state_dir: &Path,
    options: EmbeddedOptions,
) -> Result<(Arc<dyn Upstream>, EmbeddedAgent), String> {
    crate::control::paths::Paths::at(state_dir)
        .create()
        .map_err(|e| format!("{}: {e}", state_dir.display()))?;
    let engine =
        EngineUpstream::new(options.engine.clone(), &TlsFiles::default()).map_err(|e| e.to_string())?;
    let sessions = SessionConfig {
        idle_timeout: options.idle_timeout,
        grace: options.grace,
        state_dir: Some(state_dir.to_path_buf()),
        ..SessionConfig::default()
    };
    let mut allowed_host_paths = Vec::new();
    if let EngineAddress::Unix(socket) = &options.engine {
        allowed_host_paths.push(socket.to_string_lossy().into_owned());
    }
    let sync = SyncConfig { root: state_dir.join("sync"), allowed_host_paths, ..SyncConfig::default() };
    let agent = Agent::new(engine, sessions, sync).on_the_proxys_machine();
    let socket_path = state_dir.join("agent.sock");
    let (listener, socket) = crate::unix_socket::bind(&socket_path).map_err(|e| e.to_string())?;
    let lifecycle = Lifecycle::new();
    agent.start_idle_watcher(&lifecycle);
    let serving = lifecycle.clone();
    tokio::spawn(async move {
        agent.serve(AgentListener::Unix(listener, socket_path.clone()), serving).await;
    });
    let dialer = Dialer::new(
        RemoteAddress::Unix(state_dir.join("agent.sock")),
        &TlsFiles::default(),
        SshOptions::default(),
    )
    .map_err(|e| e.to_string())?;
    let upstream = LinkUpstream::new(dialer, options.keepalive).on_this_machine();
    Ok((Arc::new(upstream), EmbeddedAgent { lifecycle, _socket: socket }))
}
