//! The idle watcher: notices activity the request path cannot see (running
//! containers), ends sessions after idle + grace, and runs `--on-idle-exit`.

use std::sync::Arc;
use std::time::{Duration, Instant};

use super::cleanup::clean_up;
use super::engine_calls::{labelled, Kind};
use super::service::AgentState;
use super::session::Session;
use crate::lifecycle::Lifecycle;

/// Further cleanup passes when one left something (each re-lists what remains).
const CLEANUP_RETRIES: usize = 3;
const CLEANUP_RETRY_DELAY: Duration = Duration::from_secs(1);

/// How often records are rewritten while a session is busy.
const SAVE_EVERY: Duration = Duration::from_secs(5);

pub async fn watch(state: Arc<AgentState>, lifecycle: Lifecycle) {
    let config = state.sessions.config.clone();
    let tick =
        (config.idle_timeout.min(config.grace) / 4).clamp(Duration::from_millis(100), Duration::from_secs(5));
    let mut empty_since = Instant::now();
    let mut last_save = Instant::now();
    loop {
        tokio::select! {
            _ = lifecycle.token.cancelled() => return,
            _ = tokio::time::sleep(tick) => {}
        }
        let save_now = last_save.elapsed() >= SAVE_EVERY;
        for session in state.sessions.all() {
            check(&state, &session).await;
            if save_now && !session.is_ended() {
                state.sessions.save(&session);
            }
        }
        if save_now {
            last_save = Instant::now();
        }
        if !state.sessions.is_empty() {
            empty_since = Instant::now();
        } else if (config.on_idle_exit.is_some() || config.exit_when_idle)
            && empty_since.elapsed() >= config.idle_timeout
        {
            if let Some(command) = &config.on_idle_exit {
                run_on_idle_exit(command).await;
            }
            tracing::info!("no session for the idle timeout; exiting");
            lifecycle.token.cancel();
            return;
        }
    }
}

async fn check(state: &AgentState, session: &Arc<Session>) {
    let config = &state.sessions.config;
    if session.busy() {
        session.touch();
    } else if let Ok(running) = labelled(&state.engine, &session.id, Kind::RunningContainers).await {
        session.set_running_containers(running.len());
    }
    if session.idle_for() < config.idle_timeout + config.grace {
        return;
    }
    end_session(state, session, "idle").await;
}

/// Ends a session now: closes its links, removes what it created, forgets it.
pub async fn end_session(state: &AgentState, session: &Session, why: &str) -> super::cleanup::Removed {
    if !session.end() {
        return super::cleanup::Removed::default();
    }
    tracing::info!(session = %session.id, reason = why, "session ended; cleaning up");
    let purge = state.sessions.config.purge_build_cache;
    let mut removed = clean_up(&state.engine, session, purge).await;
    // A removal can race the engine's own work (an `--rm` container still
    // being removed holds its volume: 409): try again shortly, a few times.
    for _ in 0..CLEANUP_RETRIES {
        if removed.failures.is_empty() {
            break;
        }
        tokio::time::sleep(CLEANUP_RETRY_DELAY).await;
        let again = clean_up(&state.engine, session, purge).await;
        removed.containers += again.containers;
        removed.images += again.images;
        removed.volumes += again.volumes;
        removed.networks += again.networks;
        removed.failures = again.failures;
    }
    state.sync.end_session(&session.id);
    let complete = removed.failures.is_empty();
    if !complete {
        tracing::warn!(session = %session.id, failures = ?removed.failures, "cleanup incomplete; the record stays for the next agent start");
    }
    state.sessions.forget(session, !complete);
    tracing::info!(
        session = %session.id,
        containers = removed.containers,
        images = removed.images,
        volumes = removed.volumes,
        networks = removed.networks,
        "session cleaned up"
    );
    removed
}

async fn run_on_idle_exit(command: &str) {
    tracing::info!(%command, "no session for the idle timeout; running --on-idle-exit and exiting");
    match tokio::process::Command::new("sh").arg("-c").arg(command).status().await {
        Ok(status) if status.success() => {}
        Ok(status) => tracing::warn!(%status, "--on-idle-exit failed"),
        Err(error) => tracing::warn!(%error, "cannot run --on-idle-exit"),
    }
}
