//! Code shared by the three benchmarks (`proxy`, `link`, `soak`): errors with
//! context, time bounds, Engine API requests over a unix socket, container guards,
//! the streamed random tar upload, statistics, the result table (`report`) and /proc
//! readings.
//!
//! Each bench includes this with `mod common;`. This is a directory with `mod.rs`, so
//! cargo does not take it for a bench target of its own.

// Each bench compiles this module on its own and uses only part of it (the soak has
// no uploads or paired statistics, for example), so what one bench leaves unused is
// not dead code.
#![allow(dead_code)]

pub mod engine;
pub mod procfs;
pub mod report;
pub mod stats;
pub mod upload;

use std::error::Error as StdError;
use std::fmt::Display;
use std::future::Future;
use std::path::Path;
use std::process::Command;
use std::str::FromStr;
use std::time::Duration;

pub type BoxError = Box<dyn StdError + Send + Sync>;

pub type Result<T> = std::result::Result<T, BoxError>;

/// `anyhow`-style context without the dependency: turns any displayable error into a
/// message that says what the bench was doing.
pub trait Context<T> {
    fn context(self, what: impl Display) -> Result<T>;
}

impl<T, E: Display> Context<T> for std::result::Result<T, E> {
    fn context(self, what: impl Display) -> Result<T> {
        self.map_err(|err| format!("{what}: {err}").into())
    }
}

/// The value of the environment variable `name`, parsed, or `default` when it is unset.
pub fn env_or<T: FromStr>(name: &str, default: T) -> Result<T>
where
    T::Err: Display,
{
    match std::env::var(name) {
        Ok(text) => text.trim().parse().context(format!("{name}={text:?} is not valid")),
        Err(_) => Ok(default),
    }
}

/// The sections to run: from positional arguments (`cargo bench --bench link -- ps
/// echo`) or the comma-separated list in the variable `only` (`OFFLOAD_LINK_BENCH_ONLY=ps,echo`);
/// `all` when neither is given.
pub fn sections<S: Copy>(
    args: &[String],
    only: &str,
    all: &[S],
    parse: fn(&str) -> Result<S>,
) -> Result<Vec<S>> {
    let from_env = std::env::var(only).unwrap_or_default();
    let names: Vec<&str> = args
        .iter()
        .filter(|arg| !arg.starts_with('-'))
        .map(String::as_str)
        .chain(from_env.split(',').map(str::trim))
        .filter(|name| !name.is_empty())
        .collect();
    if names.is_empty() {
        return Ok(all.to_vec());
    }
    names.into_iter().map(parse).collect()
}

/// Runs a bench's `run` under its global time limit (`limit`, set by the environment
/// variable `variable`) and Ctrl-C. Whichever ends it, the `run` future is dropped
/// here, and with it every guard (processes, relays, containers, temporary
/// directory), so cleanup happens on every path, panics included.
pub async fn run_bounded(
    limit: Duration,
    variable: &str,
    run: impl Future<Output = Result<()>>,
) -> Result<()> {
    tokio::select! {
        outcome = tokio::time::timeout(limit, run) => {
            outcome.map_err(|_| format!("the run took longer than {variable}={}", limit.as_secs()))?
        }
        _ = tokio::signal::ctrl_c() => Err("interrupted".into()),
    }
}

/// Host header for every request: the engine ignores it, but HTTP/1.1 (and Go's
/// server) requires one.
pub const API_HOST: &str = "docker";

pub const DEFAULT_IMAGE: &str = "offload-test/busybox:latest";

/// Bounds a step in time, so that a hung proxy fails the bench instead of stalling it.
pub async fn within<T>(
    limit: Duration,
    what: impl Display,
    step: impl Future<Output = Result<T>>,
) -> Result<T> {
    tokio::time::timeout(limit, step).await.map_err(|_| format!("{what}: no answer within {limit:?}"))?
}

/// A free loopback port, learned by binding and letting go.
pub fn free_port() -> Result<u16> {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|listener| listener.local_addr())
        .map(|addr| addr.port())
        .context("finding a free port")
}

/// Whether `pid` (as text, from a label or a directory name) is a live process.
pub fn is_running(pid: &str) -> bool {
    pid.parse::<u32>().is_ok() && Path::new("/proc").join(pid).exists()
}

pub fn print_line(cells: &[String; 6], widths: &[usize; 6]) {
    let padded: Vec<String> =
        cells.iter().zip(widths).map(|(cell, width)| format!("{cell:<width$}", width = *width)).collect();
    println!("{}", padded.join(" | ").trim_end());
}

pub const DOCKER_CLI: &str = "/usr/local/bin/docker";

/// A command run under `setpriv --pdeathsig`, so that it gets SIGTERM if the soak is
/// killed outright (SIGKILL, no guard runs). Falls back to a plain command.
pub fn guarded_command(program: &Path) -> Command {
    if Path::new("/usr/bin/setpriv").exists() {
        let mut command = Command::new("/usr/bin/setpriv");
        command.args(["--pdeathsig", "TERM", "--"]).arg(program);
        command
    } else {
        Command::new(program)
    }
}
