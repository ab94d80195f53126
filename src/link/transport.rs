//! How the proxy reaches the agent: `tls://host:port` (mutual TLS, ALPN h2),
//! `ssh://[user@]host[:port]` (the system `ssh` running `offload agent --stdio`),
//! and, for tests only, `tcp://` or `unix://` with `--insecure`.

use std::fmt;
use std::io;
use std::path::PathBuf;
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::{Buf, Bytes};
use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncReadExt, AsyncWrite, BufReader, ReadBuf};
use tokio::net::{TcpStream, UnixStream};
use tokio::process::{Child, Command};
use tokio_rustls::TlsConnector;

use crate::tls::{self, TlsError, TlsFiles};
use crate::upstream::BoxedIo;

const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Lines of ssh's stderr kept to explain a failed connection.
const SSH_STDERR_LINES: usize = 8;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RemoteAddress {
    Tls { host: String, port: u16 },
    Ssh { user: Option<String>, host: String, port: Option<u16> },
    Tcp { host: String, port: u16 },
    Unix(PathBuf),
}

impl RemoteAddress {
    pub fn parse(text: &str) -> Result<Self, String> {
        if let Some(rest) = text.strip_prefix("ssh://") {
            let rest = rest.trim_end_matches('/');
            let (user, host_port) = match rest.rsplit_once('@') {
                Some((user, host)) => (Some(user.to_string()), host),
                None => (None, rest),
            };
            let (host, port) = match host_port.rsplit_once(':') {
                Some((host, port)) if !host.contains(':') || host.ends_with(']') => {
                    let port = port.parse().map_err(|_| format!("{text:?}: invalid port {port:?}"))?;
                    (host.trim_start_matches('[').trim_end_matches(']'), Some(port))
                }
                _ => (host_port, None),
            };
            if host.is_empty() {
                return Err(format!("{text:?}: missing host"));
            }
            return Ok(RemoteAddress::Ssh { user, host: host.to_string(), port });
        }
        match crate::upstream::address::EngineAddress::parse(text) {
            Ok(crate::upstream::address::EngineAddress::Tls { host, port }) => Ok(RemoteAddress::Tls { host, port }),
            Ok(crate::upstream::address::EngineAddress::Tcp { host, port }) => Ok(RemoteAddress::Tcp { host, port }),
            Ok(crate::upstream::address::EngineAddress::Unix(path)) => Ok(RemoteAddress::Unix(path)),
            Err(_) => Err(format!(
                "{text:?}: expected tls://host:port or ssh://[user@]host[:port] (tcp:// and unix:// need --insecure)"
            )),
        }
    }

    /// Plain transports carry no encryption: tests only, and only on this machine.
    pub fn is_plain(&self) -> bool {
        matches!(self, RemoteAddress::Tcp { .. } | RemoteAddress::Unix(_))
    }
}

impl fmt::Display for RemoteAddress {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            RemoteAddress::Tls { host, port } => write!(f, "tls://{host}:{port}"),
            RemoteAddress::Ssh { user, host, port } => {
                write!(f, "ssh://")?;
                if let Some(user) = user {
                    write!(f, "{user}@")?;
                }
                write!(f, "{host}")?;
                match port {
                    Some(port) => write!(f, ":{port}"),
                    None => Ok(()),
                }
            }
            RemoteAddress::Tcp { host, port } => write!(f, "tcp://{host}:{port}"),
            RemoteAddress::Unix(path) => write!(f, "unix://{}", path.display()),
        }
    }
}

/// How to run ssh for `ssh://` remotes.
#[derive(Debug, Clone)]
pub struct SshOptions {
    /// Extra arguments for ssh, before the host (e.g. `-F config`).
    pub args: Vec<String>,
    /// The command ssh runs on the remote host.
    pub remote_command: String,
}

impl Default for SshOptions {
    fn default() -> Self {
        Self { args: Vec::new(), remote_command: "offload agent --stdio".to_string() }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum DialError {
    #[error("{0}")]
    Io(#[from] io::Error),
    #[error("{0}")]
    Tls(#[from] TlsError),
    #[error("ssh failed: {0}")]
    Ssh(String),
}

#[derive(Clone)]
pub struct Dialer {
    address: RemoteAddress,
    tls: Option<TlsConnector>,
    ssh: SshOptions,
}

impl Dialer {
    pub fn new(address: RemoteAddress, tls_files: &TlsFiles, ssh: SshOptions) -> Result<Self, TlsError> {
        let tls = match &address {
            RemoteAddress::Tls { .. } => {
                Some(TlsConnector::from(Arc::new(tls::client_config(tls_files, &[b"h2"])?)))
            }
            _ => None,
        };
        Ok(Self { address, tls, ssh })
    }

    pub fn address(&self) -> &RemoteAddress {
        &self.address
    }

    /// Opens one connection to the agent; the link then runs HTTP/2 on it.
    pub async fn dial(&self) -> Result<Dialed, DialError> {
        match &self.address {
            RemoteAddress::Tls { host, port } => {
                let tcp = tcp_connect(host, *port).await?;
                tune_link_socket(&tcp)?;
                let connector = self.tls.clone().ok_or_else(|| io::Error::other("TLS is not configured"))?;
                let name = rustls::pki_types::ServerName::try_from(host.clone())
                    .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
                let mut stream = connector.connect(name, tls::read_ahead(tcp)).await?;
                stream.get_mut().1.set_buffer_limit(Some(tls::LINK_SEND_BUFFER));
                // TLS 1.3 checks our certificate after our side of the handshake
                // is done; a refusal arrives as an alert, which a request sent at
                // once could lose to a connection reset. The agent speaks first
                // (its HTTP/2 SETTINGS), so wait for that: an alert, deterministically.
                let mut first = vec![0u8; 4096];
                let n = tokio::time::timeout(CONNECT_TIMEOUT, stream.read(&mut first))
                    .await
                    .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "the agent did not answer"))??;
                if n == 0 {
                    return Err(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        "the agent closed the connection",
                    )
                    .into());
                }
                first.truncate(n);
                Ok(Dialed { io: Box::new(Prefixed { prefix: Bytes::from(first), inner: stream }), ssh: None })
            }
            RemoteAddress::Tcp { host, port } => {
                let tcp = tcp_connect(host, *port).await?;
                tune_link_socket(&tcp)?;
                Ok(Dialed { io: Box::new(tcp), ssh: None })
            }
            RemoteAddress::Unix(path) => {
                Ok(Dialed { io: Box::new(UnixStream::connect(path).await?), ssh: None })
            }
            RemoteAddress::Ssh { user, host, port } => self.spawn_ssh(user.as_deref(), host, *port),
        }
    }

    fn spawn_ssh(&self, user: Option<&str>, host: &str, port: Option<u16>) -> Result<Dialed, DialError> {
        let mut command = Command::new("ssh");
        command.args(&self.ssh.args).arg("-T").arg("-o").arg("BatchMode=yes");
        if let Some(user) = user {
            command.arg("-l").arg(user);
        }
        if let Some(port) = port {
            command.arg("-p").arg(port.to_string());
        }
        command
            .arg(host)
            .arg("--")
            .arg(&self.ssh.remote_command)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        let mut child = command.spawn().map_err(|e| DialError::Ssh(format!("cannot run ssh: {e}")))?;
        let (Some(stdin), Some(stdout), Some(stderr)) =
            (child.stdin.take(), child.stdout.take(), child.stderr.take())
        else {
            return Err(DialError::Ssh("ssh started without pipes".into()));
        };
        let messages = Arc::new(Mutex::new(Vec::new()));
        let collected = messages.clone();
        tokio::spawn(async move {
            let mut lines = BufReader::new(stderr).lines();
            while let Ok(Some(line)) = lines.next_line().await {
                tracing::warn!(target: "offload::ssh", "{line}");
                if let Ok(mut kept) = collected.lock() {
                    if kept.len() == SSH_STDERR_LINES {
                        kept.remove(0);
                    }
                    kept.push(line);
                }
            }
        });
        Ok(Dialed {
            io: Box::new(tokio::io::join(stdout, stdin)),
            ssh: Some(SshProcess { _child: child, stderr: messages }),
        })
    }
}

/// A connection to the agent, and the ssh process that carries it, if any.
pub struct Dialed {
    pub io: BoxedIo,
    pub ssh: Option<SshProcess>,
}

/// Keeps ssh running while the link lives (killed on drop) and remembers
/// what it said, to explain failures.
pub struct SshProcess {
    _child: Child,
    stderr: Arc<Mutex<Vec<String>>>,
}

impl SshProcess {
    pub fn stderr_text(&self) -> String {
        self.stderr.lock().map(|lines| lines.join("; ")).unwrap_or_default()
    }
}

/// A stream whose first bytes were already read.
struct Prefixed<S> {
    prefix: Bytes,
    inner: S,
}

impl<S: AsyncRead + Unpin> AsyncRead for Prefixed<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if !self.prefix.is_empty() {
            let n = self.prefix.len().min(buf.remaining());
            buf.put_slice(&self.prefix[..n]);
            self.prefix.advance(n);
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Prefixed<S> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    // Forwarded, or h2 takes the stream for one without vectored writes and
    // sends each data frame in two writes (its first KiB copied, then the
    // rest): two TLS records, two syscalls and two TCP segments per frame.
    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// Bytes a link socket may hold not yet sent. Beyond it the socket reports
/// itself full, so a bulk stream's backlog waits in HTTP/2, where frames of
/// all streams take turns, instead of in the kernel's send buffer (megabytes
/// once autotuned), where an interactive frame would queue behind all of it.
/// Unacknowledged bytes in flight are not limited: a long link still fills.
pub const LINK_NOTSENT_LOWAT: u32 = 128 << 10;

/// Tunes a TCP socket that carries a link: Nagle off (small interactive
/// frames go at once) and the unsent backlog bounded ([`LINK_NOTSENT_LOWAT`]).
pub fn tune_link_socket(stream: &TcpStream) -> io::Result<()> {
    stream.set_nodelay(true)?;
    // Best effort: a link without it works, only with longer queues.
    #[cfg(any(target_os = "linux", target_os = "android"))]
    if let Err(error) = socket2::SockRef::from(stream).set_tcp_notsent_lowat(LINK_NOTSENT_LOWAT) {
        tracing::debug!(%error, "TCP_NOTSENT_LOWAT not set");
    }
    Ok(())
}

/// A TCP connection with a deadline and Nagle off (small interactive frames).
pub async fn tcp_connect(host: &str, port: u16) -> io::Result<TcpStream> {
    let stream = tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect((host, port)))
        .await
        .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "connect timed out"))??;
    stream.set_nodelay(true)?;
    Ok(stream)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_remotes() {
        assert_eq!(
            RemoteAddress::parse("ssh://me@build-box:2222"),
            Ok(RemoteAddress::Ssh { user: Some("me".into()), host: "build-box".into(), port: Some(2222) })
        );
        assert_eq!(
            RemoteAddress::parse("ssh://build-box"),
            Ok(RemoteAddress::Ssh { user: None, host: "build-box".into(), port: None })
        );
        assert_eq!(
            RemoteAddress::parse("tls://10.0.0.5:7443"),
            Ok(RemoteAddress::Tls { host: "10.0.0.5".into(), port: 7443 })
        );
        assert!(RemoteAddress::parse("unix:///tmp/agent.sock").is_ok_and(|a| a.is_plain()));
        assert!(RemoteAddress::parse("ssh://").is_err());
        assert!(RemoteAddress::parse("http://x:1").is_err());
        assert_eq!(
            RemoteAddress::parse("ssh://me@build-box:2222").map(|a| a.to_string()),
            Ok("ssh://me@build-box:2222".to_string())
        );
    }
}
