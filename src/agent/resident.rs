//! `offload agent --stdio` as ssh runs it: a thin bridge from stdin/stdout to
//! the user's resident agent on a unix socket, started on first use.
//!
//! Sessions must outlive the ssh connection that opened them: a session
//! idles, gets its grace, and is cleaned up whether or not the user ever
//! reconnects, and a reconnect (a new ssh process) must find it. So sessions
//! live in one resident agent per user and state directory, which exits by
//! itself once it has had no session for the idle timeout.

use std::ffi::OsString;
use std::io;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::Stdio;
use std::time::{Duration, Instant};

use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::unix::pipe;
use tokio::net::UnixStream;

use crate::splice::splice;

/// How to reach, or start, the resident agent.
pub struct ResidentPlan {
    /// The resident agent's socket (mode 0600 in a 0700 directory).
    pub socket: PathBuf,
    /// This program and the arguments that start the resident agent.
    pub program: PathBuf,
    pub args: Vec<OsString>,
    /// Where the resident agent logs.
    pub log: PathBuf,
}

const START_TIMEOUT: Duration = Duration::from_secs(15);

/// Relays stdin/stdout to the resident agent until both directions end.
pub async fn bridge_stdio(plan: &ResidentPlan) -> io::Result<()> {
    let mut agent = match UnixStream::connect(&plan.socket).await {
        Ok(stream) => stream,
        Err(_) => {
            start(plan)?;
            wait_for(plan).await?
        }
    };
    let mut stdio = tokio::io::join(stdin(), stdout());
    splice(&mut stdio, &mut agent).await.map(|_| ())
}

/// stdin as a non-blocking stream when it is a pipe or a socket (as under
/// sshd). tokio's `stdin()` hands every read to a blocking thread, which
/// halved a bulk transfer over an ssh link.
fn stdin() -> Box<dyn AsyncRead + Unpin + Send> {
    let duplicate = || std::io::stdin().as_fd().try_clone_to_owned();
    if let Some(receiver) = duplicate().ok().and_then(|fd| pipe::Receiver::from_owned_fd(fd).ok()) {
        tracing::debug!("stdin is a pipe");
        return Box::new(receiver);
    }
    match duplicate().ok().and_then(socket) {
        Some(stream) => Box::new(stream),
        None => {
            tracing::debug!("stdin is neither a pipe nor a socket: reading it on a blocking thread");
            Box::new(tokio::io::stdin())
        }
    }
}

/// stdout the same way (see [`stdin`]).
fn stdout() -> Box<dyn AsyncWrite + Unpin + Send> {
    let duplicate = || std::io::stdout().as_fd().try_clone_to_owned();
    if let Some(sender) = duplicate().ok().and_then(|fd| pipe::Sender::from_owned_fd(fd).ok()) {
        return Box::new(sender);
    }
    match duplicate().ok().and_then(socket) {
        Some(stream) => Box::new(stream),
        None => Box::new(tokio::io::stdout()),
    }
}

fn socket(fd: OwnedFd) -> Option<UnixStream> {
    let stream = std::os::unix::net::UnixStream::from(fd);
    // A file or a terminal is not a socket: asking for its peer fails.
    stream.peer_addr().ok()?;
    stream.set_nonblocking(true).ok()?;
    UnixStream::from_std(stream).ok()
}

/// Starts the resident agent in its own process group, so the end of the ssh
/// session (SIGHUP to the session's group) does not end it.
fn start(plan: &ResidentPlan) -> io::Result<()> {
    if let Some(dir) = plan.socket.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let log = std::fs::OpenOptions::new().create(true).append(true).open(&plan.log)?;
    std::process::Command::new(&plan.program)
        .args(&plan.args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log)
        .process_group(0)
        .spawn()?;
    Ok(())
}

/// Waits until the resident agent accepts (another bridge may have started it).
async fn wait_for(plan: &ResidentPlan) -> io::Result<UnixStream> {
    let deadline = Instant::now() + START_TIMEOUT;
    loop {
        match UnixStream::connect(&plan.socket).await {
            Ok(stream) => return Ok(stream),
            Err(error) if Instant::now() > deadline => {
                return Err(io::Error::new(
                    error.kind(),
                    format!(
                        "the resident agent did not start on {} ({error}); see {}",
                        plan.socket.display(),
                        plan.log.display()
                    ),
                ))
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    }
}
