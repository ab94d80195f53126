//! `offload diagnose`: each step from this machine to the remote engine,
//! checked in order, with what failed and what to do, and a bundle file
//! (versions, settings without secrets, recent log lines) to attach to a report.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use http::{Method, Request};
use http_body_util::{BodyExt, Limited};

use super::paths::Paths;
use super::start::process_alive;
use crate::body;
use crate::link::protocol::PROBE_PATH;
use crate::link::transport::{Dialer, RemoteAddress, SshOptions};
use crate::tls::TlsFiles;
use crate::upstream::address::EngineAddress;
use crate::upstream::engine::EngineUpstream;
use crate::upstream::link::LinkUpstream;
use crate::upstream::Upstream;

const STEP_LIMIT: Duration = Duration::from_secs(15);
const PROBE_BYTES: usize = 32 << 20;
/// A certificate closer than this to its end is worth a warning.
const EXPIRY_WARNING_DAYS: i64 = 30;
const LOG_LINES: usize = 200;
/// The oldest engine API the clients offload is tested with (docker CLI 28) speak.
const MIN_API: (u32, u32) = (1, 24);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Pass,
    Warn,
    Fail,
}

#[derive(Debug, Clone)]
pub struct Check {
    pub step: String,
    pub outcome: Outcome,
    pub detail: String,
    /// What to do, for a warning or failure.
    pub hint: Option<String>,
}

pub struct DiagnoseOptions {
    /// `None`: the running offload's remote, else the embedded default.
    pub remote: Option<String>,
    pub tls: TlsFiles,
    pub ssh: SshOptions,
}

pub struct Report {
    pub checks: Vec<Check>,
    pub bundle: Option<PathBuf>,
}

impl Report {
    pub fn failed(&self) -> bool {
        self.checks.iter().any(|c| c.outcome == Outcome::Fail)
    }

    pub fn pretty(&self) -> String {
        let mut lines = Vec::new();
        for check in &self.checks {
            let mark = match check.outcome {
                Outcome::Pass => "ok  ",
                Outcome::Warn => "warn",
                Outcome::Fail => "FAIL",
            };
            lines.push(format!("{mark} {}: {}", check.step, check.detail));
            if let Some(hint) = &check.hint {
                lines.push(format!("     -> {hint}"));
            }
        }
        if let Some(bundle) = &self.bundle {
            lines.push(format!("bundle written to {} (attach it to a bug report)", bundle.display()));
        }
        lines.join("\n")
    }
}

fn check(step: &str, outcome: Outcome, detail: impl Into<String>, hint: Option<&str>) -> Check {
    Check { step: step.to_string(), outcome, detail: detail.into(), hint: hint.map(str::to_string) }
}

pub async fn diagnose(paths: &Paths, options: DiagnoseOptions) -> Report {
    let mut checks = Vec::new();
    let running = paths.read_state().filter(|s| process_alive(s.pid));
    local_checks(paths, running.is_some(), &mut checks);
    let remote = options.remote.clone().or_else(|| running.as_ref().map(|s| s.remote.clone()));
    let through_proxy = running.as_ref().is_some_and(|s| Some(&s.remote) == remote.as_ref());
    let mut own_session = false;
    let upstream: Option<Arc<dyn Upstream>> = if through_proxy {
        // The running proxy's socket speaks the Docker API: probe through it.
        EngineUpstream::new(EngineAddress::Unix(paths.socket()), &TlsFiles::default())
            .ok()
            .map(|u| Arc::new(u) as Arc<dyn Upstream>)
    } else {
        match remote.as_deref().filter(|r| *r != "embedded") {
            Some(remote) => match RemoteAddress::parse(remote) {
                Ok(address) => {
                    transport_checks(&address, &options, &mut checks).await;
                    own_session = true;
                    Dialer::new(address, &options.tls, options.ssh.clone())
                        .ok()
                        .map(|d| Arc::new(LinkUpstream::new(d, Duration::from_secs(10))) as Arc<dyn Upstream>)
                }
                Err(error) => {
                    checks.push(check(
                        "remote address",
                        Outcome::Fail,
                        error,
                        Some("use tls://HOST:PORT or ssh://[user@]host[:port]"),
                    ));
                    None
                }
            },
            None => {
                let engine = EngineAddress::Unix("/var/run/docker.sock".into());
                match EngineUpstream::new(engine, &TlsFiles::default()) {
                    Ok(engine) => Some(Arc::new(engine) as Arc<dyn Upstream>),
                    Err(error) => {
                        checks.push(check("local engine", Outcome::Fail, error.to_string(), None));
                        None
                    }
                }
            }
        }
    };
    if let Some(upstream) = upstream {
        // Only an agent (directly, or behind the running proxy) has the probe.
        link_checks(upstream.as_ref(), own_session, through_proxy || own_session, &mut checks).await;
    }
    let bundle = write_bundle(paths, &options, remote.as_deref(), &checks).ok();
    Report { checks, bundle }
}

fn local_checks(paths: &Paths, running: bool, checks: &mut Vec<Check>) {
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    if !running {
        checks.push(check(
            "local proxy",
            Outcome::Warn,
            "offload is not running",
            Some("start it with `offload start`"),
        ));
        return;
    }
    let socket = paths.socket();
    match std::fs::metadata(&socket) {
        Ok(meta) => {
            let mode = meta.permissions().mode() & 0o777;
            let mine = std::fs::metadata(&paths.dir).is_ok_and(|dir| dir.uid() == meta.uid());
            if mode & 0o077 != 0 || !mine {
                checks.push(check(
                    "local socket",
                    Outcome::Fail,
                    format!("{} has mode {mode:o}", socket.display()),
                    Some("only you should reach it: `offload stop` and `offload start` recreate it with mode 600"),
                ));
            } else {
                checks.push(check(
                    "local socket",
                    Outcome::Pass,
                    format!("{} (mode {mode:o})", socket.display()),
                    None,
                ));
            }
        }
        Err(error) => checks.push(check(
            "local socket",
            Outcome::Fail,
            format!("{}: {error}", socket.display()),
            Some("`offload stop` and `offload start` recreate it"),
        )),
    }
}

async fn transport_checks(address: &RemoteAddress, options: &DiagnoseOptions, checks: &mut Vec<Check>) {
    match address {
        RemoteAddress::Tls { host, port } => {
            let connect = crate::link::transport::tcp_connect(host, *port);
            match tokio::time::timeout(STEP_LIMIT, connect).await {
                Ok(Ok(_)) => checks.push(check("agent port", Outcome::Pass, format!("{host}:{port} accepts connections"), None)),
                Ok(Err(error)) => checks.push(check(
                    "agent port",
                    Outcome::Fail,
                    format!("{host}:{port}: {error}"),
                    Some("is `offload agent --listen tls://...` running there, on this port, and open in the firewall?"),
                )),
                Err(_) => checks.push(check("agent port", Outcome::Fail, format!("{host}:{port}: no answer"), Some("a firewall may drop the connection"))),
            }
            for (what, file) in
                [("CA certificate", &options.tls.ca), ("client certificate", &options.tls.cert)]
            {
                certificate_check(what, file.as_ref(), checks);
            }
        }
        RemoteAddress::Ssh { user, host, port } => {
            let mut command = tokio::process::Command::new("ssh");
            command.args(&options.ssh.args).args(["-T", "-o", "BatchMode=yes", "-o", "ConnectTimeout=10"]);
            if let Some(user) = user {
                command.arg("-l").arg(user);
            }
            if let Some(port) = port {
                command.arg("-p").arg(port.to_string());
            }
            command.arg(host).arg("--").arg("true").kill_on_drop(true);
            match tokio::time::timeout(STEP_LIMIT, command.output()).await {
                Ok(Ok(output)) if output.status.success() => {
                    checks.push(check("ssh", Outcome::Pass, format!("{host} accepts ssh"), None))
                }
                Ok(Ok(output)) => checks.push(check(
                    "ssh",
                    Outcome::Fail,
                    format!("ssh {host}: {}", String::from_utf8_lossy(&output.stderr).trim()),
                    Some("check `ssh HOST true` works without a password prompt (keys or ssh-agent)"),
                )),
                Ok(Err(error)) => checks.push(check(
                    "ssh",
                    Outcome::Fail,
                    format!("cannot run ssh: {error}"),
                    Some("install an ssh client"),
                )),
                Err(_) => checks.push(check("ssh", Outcome::Fail, format!("ssh {host}: no answer"), None)),
            }
        }
        RemoteAddress::Tcp { .. } | RemoteAddress::Unix(_) => {}
    }
}

fn certificate_check(what: &str, file: Option<&PathBuf>, checks: &mut Vec<Check>) {
    let Some(file) = file else {
        checks.push(check(
            what,
            Outcome::Fail,
            "not given",
            Some("pass --tlscacert, --tlscert and --tlskey (see `offload certs init`)"),
        ));
        return;
    };
    let pem = match std::fs::read(file) {
        Ok(pem) => pem,
        Err(error) => {
            checks.push(check(what, Outcome::Fail, format!("{}: {error}", file.display()), None));
            return;
        }
    };
    let Some(Ok(der)) = rustls_pemfile::certs(&mut pem.as_slice()).next() else {
        checks.push(check(
            what,
            Outcome::Fail,
            format!("{}: no PEM certificate in it", file.display()),
            None,
        ));
        return;
    };
    let Some((_, not_after)) = super::cert_dates::validity(der.as_ref()) else {
        checks.push(check(
            what,
            Outcome::Warn,
            format!("{}: cannot read its validity", file.display()),
            None,
        ));
        return;
    };
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0);
    let days = (not_after - now) / 86_400;
    let renew =
        Some("make new ones with `offload certs init --force` and copy the server files to the agent");
    if not_after <= now {
        checks.push(check(
            what,
            Outcome::Fail,
            format!("{} expired {} days ago", file.display(), -days),
            renew,
        ));
    } else if days < EXPIRY_WARNING_DAYS {
        checks.push(check(what, Outcome::Warn, format!("{} expires in {days} days", file.display()), renew));
    } else {
        checks.push(check(
            what,
            Outcome::Pass,
            format!("{} valid for {days} more days", file.display()),
            None,
        ));
    }
}

async fn link_checks(upstream: &dyn Upstream, own_session: bool, agent: bool, checks: &mut Vec<Check>) {
    // Agent and session (only a link has them).
    match tokio::time::timeout(STEP_LIMIT, upstream.session_info()).await {
        Ok(Ok(Some(session))) => {
            let ours = env!("CARGO_PKG_VERSION");
            let (outcome, hint) = if session.agent_version == ours {
                (Outcome::Pass, None)
            } else {
                (Outcome::Warn, Some("install the same offload version on both sides"))
            };
            checks.push(check(
                "agent",
                outcome,
                format!("offload agent {} (this is {ours})", session.agent_version),
                hint,
            ));
        }
        Ok(Ok(None)) => {}
        Ok(Err(error)) => {
            checks.push(check(
                "link",
                Outcome::Fail,
                error.user_message(),
                Some("see the steps above; `offload status` shows the running link"),
            ));
            return;
        }
        Err(_) => {
            checks.push(check("link", Outcome::Fail, "no answer from the agent", None));
            return;
        }
    }
    let version = match tokio::time::timeout(STEP_LIMIT, get_json(upstream, "/version")).await {
        Ok(Ok(version)) => version,
        Ok(Err(error)) => {
            checks.push(check(
                "engine",
                Outcome::Fail,
                error,
                Some("is dockerd running next to the agent, and may the agent's user use its socket?"),
            ));
            return;
        }
        Err(_) => {
            checks.push(check("engine", Outcome::Fail, "no answer", None));
            return;
        }
    };
    let api = version["ApiVersion"].as_str().unwrap_or("?").to_string();
    checks.push(check(
        "engine",
        Outcome::Pass,
        format!(
            "Docker {} on {}/{}",
            version["Version"].as_str().unwrap_or("?"),
            version["Os"].as_str().unwrap_or("?"),
            version["Arch"].as_str().unwrap_or("?")
        ),
        None,
    ));
    let parsed =
        api.split_once('.').and_then(|(a, b)| Some((a.parse::<u32>().ok()?, b.parse::<u32>().ok()?)));
    match parsed {
        Some(api_version) if api_version >= MIN_API => checks.push(check(
            "API version",
            Outcome::Pass,
            format!("{api} (clients need at least 1.24)"),
            None,
        )),
        _ => checks.push(check(
            "API version",
            Outcome::Fail,
            format!("{api}: older than 1.24"),
            Some("upgrade Docker on the remote"),
        )),
    }
    if agent {
        probes(upstream, checks).await;
    }
    if own_session {
        let request =
            Request::builder().method(Method::DELETE).uri("/_offload/v1/session").body(body::empty());
        if let Ok(request) = request {
            let _ = upstream.send(request).await;
        }
    }
}

/// Round trip and throughput over the link (the agent's probe endpoint).
async fn probes(upstream: &dyn Upstream, checks: &mut Vec<Check>) {
    let mut samples = Vec::new();
    for _ in 0..10 {
        let started = Instant::now();
        if post_probe(upstream, Vec::new()).await.is_err() {
            checks.push(check(
                "round trip",
                Outcome::Warn,
                "the agent has no probe endpoint (older version?)",
                None,
            ));
            return;
        }
        samples.push(started.elapsed());
    }
    samples.sort();
    let median = samples[samples.len() / 2];
    checks.push(check(
        "round trip",
        Outcome::Pass,
        format!("{:.1} ms (median of 10)", median.as_secs_f64() * 1000.0),
        None,
    ));
    let started = Instant::now();
    match post_probe(upstream, vec![0u8; PROBE_BYTES]).await {
        Ok(received) if received == PROBE_BYTES as u64 => {
            let rate = PROBE_BYTES as f64 / started.elapsed().as_secs_f64() / 1_048_576.0;
            checks.push(check("throughput", Outcome::Pass, format!("{rate:.0} MiB/s upload (32 MiB)"), None));
        }
        Ok(received) => checks.push(check(
            "throughput",
            Outcome::Fail,
            format!("the agent received {received} of {PROBE_BYTES} bytes"),
            None,
        )),
        Err(error) => checks.push(check("throughput", Outcome::Fail, error, None)),
    }
}

async fn post_probe(upstream: &dyn Upstream, payload: Vec<u8>) -> Result<u64, String> {
    let request = Request::builder()
        .method(Method::POST)
        .uri(PROBE_PATH)
        .header(http::header::HOST, "offload")
        .header(http::header::CONTENT_LENGTH, payload.len())
        .body(body::full(payload))
        .map_err(|e| e.to_string())?;
    let exchange = upstream.send(request).await.map_err(|e| e.user_message())?;
    if !exchange.response.status().is_success() {
        return Err(format!("the probe was answered {}", exchange.response.status()));
    }
    let bytes = Limited::new(exchange.response.into_body(), 1 << 16)
        .collect()
        .await
        .map_err(|e| e.to_string())?
        .to_bytes();
    let answer: serde_json::Value = serde_json::from_slice(&bytes).map_err(|e| e.to_string())?;
    answer["bytes"].as_u64().ok_or_else(|| "the probe answer has no byte count".to_string())
}

async fn get_json(upstream: &dyn Upstream, path: &str) -> Result<serde_json::Value, String> {
    let request = Request::builder()
        .uri(path)
        .header(http::header::HOST, "offload")
        .body(body::empty())
        .map_err(|e| e.to_string())?;
    let exchange = upstream.send(request).await.map_err(|e| e.user_message())?;
    let status = exchange.response.status();
    let bytes = Limited::new(exchange.response.into_body(), 1 << 20)
        .collect()
        .await
        .map_err(|e| e.to_string())?
        .to_bytes();
    let value: serde_json::Value = serde_json::from_slice(&bytes).unwrap_or_default();
    if !status.is_success() {
        return Err(super::client::message_of(&value).unwrap_or_else(|| format!("{path}: {status}")));
    }
    Ok(value)
}

/// Versions, the checks, settings (paths, never key contents) and the end of
/// the proxy's log.
fn write_bundle(
    paths: &Paths,
    options: &DiagnoseOptions,
    remote: Option<&str>,
    checks: &[Check],
) -> std::io::Result<PathBuf> {
    paths.create()?;
    let stamp =
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
    let file = paths.dir.join(format!("diagnose-{stamp}.txt"));
    let mut text =
        format!("offload {}\nremote: {}\n", env!("CARGO_PKG_VERSION"), remote.unwrap_or("embedded"));
    let shown =
        |p: &Option<PathBuf>| p.as_ref().map(|p| p.display().to_string()).unwrap_or_else(|| "-".into());
    text.push_str(&format!(
        "tlscacert: {}\ntlscert: {}\ntlskey: {} (contents not included)\nssh args: {:?}\nremote command: {}\n\nchecks:\n",
        shown(&options.tls.ca),
        shown(&options.tls.cert),
        shown(&options.tls.key),
        options.ssh.args,
        options.ssh.remote_command
    ));
    for check in checks {
        text.push_str(&format!("  {:?} {}: {}\n", check.outcome, check.step, check.detail));
    }
    let log = std::fs::read_to_string(paths.log()).unwrap_or_default();
    let tail: Vec<&str> = log.lines().rev().take(LOG_LINES).collect();
    text.push_str(&format!("\nlast {} lines of {}:\n", tail.len(), paths.log().display()));
    for line in tail.into_iter().rev() {
        text.push_str(line);
        text.push('\n');
    }
    std::fs::write(&file, text)?;
    Ok(file)
}
