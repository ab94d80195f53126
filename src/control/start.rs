//! `offload start`: the proxy in the background, the remote answering, the
//! docker context switched, and one short summary.

use std::ffi::OsString;
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use super::client::get_json;
use super::context;
use super::paths::{Paths, RunState};

pub struct StartOptions {
    /// `None`: the embedded default (an agent in the proxy, this machine's engine).
    pub remote: Option<String>,
    /// Arguments for the background `offload proxy` besides listen/remote
    /// (TLS files, ssh args, keepalive, publish address, idle timeout...).
    pub proxy_args: Vec<OsString>,
    pub require_gpu: bool,
    /// How long the remote may take to answer.
    pub timeout: Duration,
    /// Switch the docker context (tests turn it off to stay hermetic).
    pub switch_context: bool,
}

/// What `start` found, for its summary.
#[derive(Debug, Default)]
pub struct Started {
    pub remote: String,
    pub engine_version: String,
    pub api_version: String,
    pub os_arch: String,
    pub gpu: bool,
    pub session_id: String,
    pub idle_timeout_seconds: f64,
    pub grace_seconds: f64,
    pub context_switch: Option<(Option<String>, String)>,
    pub already_running: bool,
}

/// The step that failed and what to do, as one message.
fn step(what: &str, detail: impl std::fmt::Display) -> String {
    format!("{what}: {detail}")
}

pub async fn start(paths: &Paths, options: StartOptions) -> Result<Started, String> {
    paths.create().map_err(|e| step("creating the state directory", e))?;
    let socket = paths.socket();
    let remote_name = options.remote.clone().unwrap_or_else(|| "embedded".to_string());
    let running = paths.read_state().filter(|state| process_alive(state.pid));
    let mut already_running = false;
    match &running {
        Some(state) if state.remote == remote_name => already_running = true,
        Some(state) => {
            return Err(format!(
                "offload is already running with remote {} (pid {}); run `offload stop` first",
                state.remote, state.pid
            ))
        }
        None => spawn_proxy(paths, &options)?,
    }
    let deadline = Instant::now() + options.timeout;
    // Step 1: the local proxy answers on its socket.
    loop {
        if tokio::net::UnixStream::connect(&socket).await.is_ok() {
            break;
        }
        if Instant::now() > deadline {
            return Err(step(
                "starting the local proxy",
                format!(
                    "no socket at {} after {:?}; see {}",
                    socket.display(),
                    options.timeout,
                    paths.log().display()
                ),
            ));
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    // Step 2: the remote answers through it (this opens the link and the session).
    let remaining = deadline.saturating_duration_since(Instant::now()).max(Duration::from_secs(1));
    let version = match tokio::time::timeout(remaining, get_json(&socket, "/version")).await {
        Ok(Ok(version)) => version,
        Ok(Err(message)) => {
            stop_spawned(paths, already_running);
            return Err(step("reaching the remote engine", message));
        }
        Err(_) => {
            stop_spawned(paths, already_running);
            return Err(step(
                "reaching the remote engine",
                format!("no answer within {:?}", options.timeout),
            ));
        }
    };
    let info = get_json(&socket, "/info").await.unwrap_or_default();
    let gpu = has_gpu(&info);
    if options.require_gpu && !gpu {
        stop_spawned(paths, already_running);
        return Err(step(
            "checking for a GPU",
            format!("the remote {remote_name} has no NVIDIA GPU runtime; start with a GPU host as --remote"),
        ));
    }
    let status = get_json(&socket, "/_offload/v1/status").await.unwrap_or_default();
    let mut started = Started {
        remote: remote_name.clone(),
        engine_version: version["Version"].as_str().unwrap_or("?").to_string(),
        api_version: version["ApiVersion"].as_str().unwrap_or("?").to_string(),
        os_arch: format!(
            "{}/{}",
            version["Os"].as_str().unwrap_or("?"),
            version["Arch"].as_str().unwrap_or("?")
        ),
        gpu,
        session_id: status["session_id"].as_str().unwrap_or("").to_string(),
        idle_timeout_seconds: status["idle_timeout_seconds"].as_f64().unwrap_or(0.0),
        grace_seconds: status["grace_seconds"].as_f64().unwrap_or(0.0),
        context_switch: None,
        already_running,
    };
    let mut state = paths.read_state().unwrap_or_default();
    if options.switch_context {
        let previous = context::switch_to(&socket).map_err(|e| step("switching the docker context", e))?;
        if !already_running || state.previous_context.is_none() {
            state.previous_context = previous.clone();
        }
        started.context_switch = Some((state.previous_context.clone(), context::CONTEXT.to_string()));
    }
    paths.write_state(&state).map_err(|e| step("recording the state", e))?;
    Ok(started)
}

/// The engine can run `--gpus` (the agent's rule, from the same `/info`).
fn has_gpu(info: &serde_json::Value) -> bool {
    crate::docker::gpu::EngineGpus::from_info(info).available()
}

fn spawn_proxy(paths: &Paths, options: &StartOptions) -> Result<(), String> {
    let program = std::env::current_exe().map_err(|e| step("finding this program", e))?;
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(paths.log())
        .map_err(|e| step("opening the log", e))?;
    let log_err = log.try_clone().map_err(|e| step("opening the log", e))?;
    let mut command = Command::new(program);
    command.arg("proxy").arg(format!("--listen=unix://{}", paths.socket().display()));
    match &options.remote {
        Some(remote) => {
            command.arg(format!("--remote={remote}"));
        }
        None => {
            command.arg("--embedded").arg(format!("--state-dir={}", paths.agent_dir().display()));
        }
    }
    command.args(&options.proxy_args);
    command.stdin(Stdio::null()).stdout(log).stderr(log_err);
    // Its own process group: a Ctrl-C in the terminal that ran `start` is not for it.
    command.process_group(0);
    let child = command.spawn().map_err(|e| step("starting the proxy", e))?;
    let state = RunState {
        pid: child.id(),
        remote: options.remote.clone().unwrap_or_else(|| "embedded".to_string()),
        previous_context: None,
        started_unix: std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0),
    };
    paths.write_state(&state).map_err(|e| step("recording the state", e))?;
    // Not waited for: the proxy outlives this command (dropping a `Child`
    // neither kills nor waits).
    drop(child);
    Ok(())
}

/// A proxy this `start` spawned goes again when a later step fails.
fn stop_spawned(paths: &Paths, already_running: bool) {
    if already_running {
        return;
    }
    if let Some(state) = paths.read_state() {
        signal(state.pid, "TERM");
    }
    let _ = std::fs::remove_file(paths.state());
}

pub fn process_alive(pid: u32) -> bool {
    pid != 0 && PathBuf::from(format!("/proc/{pid}")).exists() && !is_zombie(pid)
}

fn is_zombie(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|stat| stat.rsplit_once(") ").map(|(_, rest)| rest.starts_with('Z')))
        .unwrap_or(false)
}

/// Sends a signal with `kill(1)`: std has no safe way to signal another process.
pub fn signal(pid: u32, name: &str) {
    let _ = Command::new("kill").arg(format!("-{name}")).arg(pid.to_string()).stderr(Stdio::null()).status();
}

/// The summary `start` prints.
pub fn summary(started: &Started) -> String {
    let duration = |secs: f64| crate::duration::format_duration(Duration::from_secs_f64(secs.max(0.0)));
    let mut lines = vec![format!(
        "offload {}: remote {}",
        if started.already_running { "is running" } else { "started" },
        if started.remote == "embedded" {
            "embedded (this machine's engine)".to_string()
        } else {
            started.remote.clone()
        }
    )];
    lines.push(format!(
        "  engine {} (API {}), {}, GPU: {}",
        started.engine_version,
        started.api_version,
        started.os_arch,
        if started.gpu { "yes (nvidia)" } else { "none" }
    ));
    lines.push(format!(
        "  session {}, ends after {} idle (+{} grace)",
        if started.session_id.is_empty() { "?" } else { &started.session_id },
        duration(started.idle_timeout_seconds),
        duration(started.grace_seconds)
    ));
    if let Some((previous, now)) = &started.context_switch {
        lines.push(format!(
            "  docker context: {} -> {now} (`offload stop` switches back)",
            previous.as_deref().unwrap_or("default")
        ));
    }
    lines.join("\n")
}
