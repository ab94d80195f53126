//! The docker context named `offload`: created or updated to point at the
//! proxy's socket, made current, and switched back on stop. Done with the
//! docker CLI itself, so its config directory and format stay its own.

use std::path::Path;
use std::process::Command;

pub const CONTEXT: &str = "offload";

fn docker() -> Command {
    let mut command = Command::new(std::env::var_os("OFFLOAD_DOCKER_CLI").unwrap_or_else(|| "docker".into()));
    // The context commands must act on contexts, not on an engine.
    command.env_remove("DOCKER_HOST").env_remove("DOCKER_CONTEXT");
    command
}

fn run(args: &[&str]) -> Result<String, String> {
    let output = docker().args(args).output().map_err(|e| format!("cannot run the docker CLI: {e}"))?;
    if output.status.success() {
        Ok(String::from_utf8_lossy(&output.stdout).trim().to_string())
    } else {
        Err(format!("docker {}: {}", args.join(" "), String::from_utf8_lossy(&output.stderr).trim()))
    }
}

/// The current context's name.
pub fn current() -> Result<String, String> {
    run(&["context", "show"])
}

/// Points the `offload` context at `socket` and makes it current; returns
/// the context that was current before (unless it was `offload` already).
pub fn switch_to(socket: &Path) -> Result<Option<String>, String> {
    let previous = current().ok().filter(|name| name != CONTEXT);
    let host = format!("host=unix://{}", socket.display());
    if run(&["context", "inspect", CONTEXT]).is_ok() {
        run(&["context", "update", CONTEXT, "--docker", &host])?;
    } else {
        run(&[
            "context",
            "create",
            CONTEXT,
            "--description",
            "offload: a remote Docker engine",
            "--docker",
            &host,
        ])?;
    }
    run(&["context", "use", CONTEXT])?;
    Ok(previous)
}

/// Switches back to `previous` (or `default`) if `offload` is current.
pub fn switch_back(previous: Option<&str>) -> Result<Option<String>, String> {
    if current()? != CONTEXT {
        return Ok(None);
    }
    let target = previous.unwrap_or("default");
    run(&["context", "use", target])?;
    Ok(Some(target.to_string()))
}
