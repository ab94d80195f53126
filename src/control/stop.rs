//! `offload stop`: end the session now (full cleanup), stop the proxy, and
//! switch the docker context back.

use std::time::{Duration, Instant};

use http::Method;

use super::client::request;
use super::context;
use super::paths::Paths;
use super::start::{process_alive, signal};

/// How long `stop` waits for the proxy to drain its streams and exit.
const EXIT_WAIT: Duration = Duration::from_secs(15);

#[derive(Debug, Default)]
pub struct Stopped {
    pub was_running: bool,
    /// What the session's cleanup removed (the agent's answer), if it ended.
    pub cleanup: Option<serde_json::Value>,
    pub cleanup_error: Option<String>,
    pub context_restored: Option<String>,
}

pub async fn stop(paths: &Paths, force: bool, switch_context: bool) -> Result<Stopped, String> {
    let mut stopped = Stopped::default();
    let state = paths.read_state();
    let running = state.as_ref().filter(|s| process_alive(s.pid));
    if let Some(state) = running {
        stopped.was_running = true;
        match request(&paths.socket(), Method::DELETE, "/_offload/v1/session").await {
            Ok((status, body)) if status.is_success() => {
                stopped.cleanup = serde_json::from_slice(&body).ok();
            }
            Ok((status, body)) => {
                let value: serde_json::Value = serde_json::from_slice(&body).unwrap_or_default();
                stopped.cleanup_error = Some(
                    super::client::message_of(&value)
                        .unwrap_or_else(|| format!("the agent answered {status}")),
                );
            }
            Err(error) => stopped.cleanup_error = Some(error),
        }
        signal(state.pid, "TERM");
        if force {
            // No waiting for open streams: they end now.
            tokio::time::sleep(Duration::from_millis(100)).await;
            signal(state.pid, "KILL");
        }
        let deadline = Instant::now() + EXIT_WAIT;
        while process_alive(state.pid) && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        if process_alive(state.pid) {
            signal(state.pid, "KILL");
        }
    }
    if switch_context {
        let previous = state.as_ref().and_then(|s| s.previous_context.clone());
        stopped.context_restored = context::switch_back(previous.as_deref())?;
    }
    let _ = std::fs::remove_file(paths.state());
    // A proxy killed without its shutdown leaves its socket file behind.
    if !stopped.was_running || force {
        let _ = std::fs::remove_file(paths.socket());
    }
    Ok(stopped)
}

pub fn summary(stopped: &Stopped) -> String {
    let mut lines = Vec::new();
    if stopped.was_running {
        lines.push("offload stopped".to_string());
        if let Some(removed) = &stopped.cleanup {
            let count = |k: &str| removed[k].as_u64().unwrap_or(0);
            lines.push(format!(
                "  session ended: removed {} containers, {} images, {} volumes, {} networks",
                count("containers"),
                count("images"),
                count("volumes"),
                count("networks")
            ));
        }
        if let Some(error) = &stopped.cleanup_error {
            lines.push(format!(
                "  the session could not be ended now ({error}); the agent removes it after its idle timeout"
            ));
        }
    } else {
        lines.push("offload is not running".to_string());
    }
    if let Some(context) = &stopped.context_restored {
        lines.push(format!("  docker context: offload -> {context}"));
    }
    lines.join("\n")
}
