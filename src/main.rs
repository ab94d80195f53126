use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use clap::{Parser, Subcommand};

use offload::agent::resident::{bridge_stdio, ResidentPlan};
use offload::agent::session::SessionConfig;
use offload::agent::sync::SyncConfig;
use offload::agent::{Agent, AgentListener};
use offload::certs::CertsPlan;
use offload::duration::{parse_duration, parse_size};
use offload::lifecycle::{termination_signal, Lifecycle};
use offload::link::transport::{Dialer, RemoteAddress, SshOptions};
use offload::proxy::{self, ProxyConfig};
use offload::tls::TlsFiles;
use offload::unix_socket::{self, SocketFile};
use offload::upstream::address::EngineAddress;
use offload::upstream::engine::EngineUpstream;
use offload::upstream::link::LinkUpstream;
use offload::upstream::Upstream;
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;

/// Run containers and builds on a remote Docker Engine with the Docker tools you already use.
#[derive(Parser)]
#[command(name = "offload", version, args_override_self = true)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Serve the Docker API on a local unix socket, forwarding to an engine or an agent.
    Proxy(ProxyArgs),
    /// Run the remote half next to dockerd (over TLS, or on stdio for ssh).
    Agent(AgentArgs),
    /// Certificates for the TLS link.
    #[command(subcommand)]
    Certs(CertsCommand),
    /// Start offload in the background and switch the docker context to it
    /// (without --remote: an embedded agent against this machine's engine).
    Start(StartArgs),
    /// End the session (removing what it created), stop offload, switch the context back.
    Stop(StopArgs),
    /// Show the link, the session, port forwards and synced mounts.
    Status(StatusArgs),
    /// Install `docker offload ...` as a docker CLI plugin (~/.docker/cli-plugins).
    InstallPlugin,
    /// Check each step to the remote engine, say what failed and what to do, write a bundle.
    Diagnose(DiagnoseArgs),
}

#[derive(clap::Args)]
struct DiagnoseArgs {
    /// The remote to check (default: the running offload's)
    #[arg(long)]
    remote: Option<String>,
    /// An argument for ssh, before the host (repeatable)
    #[arg(long = "ssh-arg", allow_hyphen_values = true)]
    ssh_args: Vec<String>,
    /// The command ssh runs on the remote host
    #[arg(long, default_value = "offload agent --stdio")]
    remote_command: String,
    #[command(flatten)]
    tls: TlsArgs,
}

#[derive(clap::Args)]
struct StartArgs {
    /// The remote: tls://HOST:PORT or ssh://[user@]host[:port] (default: embedded)
    #[arg(long)]
    remote: Option<String>,
    /// Require the remote to have an NVIDIA GPU
    #[arg(long)]
    gpu: bool,
    /// End the session after this long without activity (embedded agent; default 30m)
    #[arg(long)]
    idle_timeout: Option<String>,
    /// How long to wait for the remote to answer
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    timeout: Duration,
    /// Leave the docker context alone (print DOCKER_HOST instead)
    #[arg(long)]
    no_context: bool,
    /// Allow a plain tcp:// or unix:// remote (tests only)
    #[arg(long)]
    insecure: bool,
    /// An argument for ssh, before the host (repeatable)
    #[arg(long = "ssh-arg", allow_hyphen_values = true)]
    ssh_args: Vec<String>,
    /// The command ssh runs on the remote host
    #[arg(long)]
    remote_command: Option<String>,
    /// Where published ports listen on this machine when `-p` names no address
    #[arg(long)]
    publish_address: Option<String>,
    #[command(flatten)]
    tls: TlsArgs,
}

#[derive(clap::Args)]
struct StopArgs {
    /// Do not wait for open streams to finish
    #[arg(long)]
    force: bool,
    /// Leave the docker context alone
    #[arg(long)]
    no_context: bool,
}

#[derive(clap::Args)]
struct StatusArgs {
    /// Refresh every 2 seconds
    #[arg(long)]
    watch: bool,
    /// pretty or json
    #[arg(long, default_value = "pretty")]
    format: String,
}

#[derive(Subcommand)]
enum CertsCommand {
    /// Make a CA, an agent (server) and a proxy (client) certificate, with Docker's file names
    Init(CertsInitArgs),
}

#[derive(clap::Args)]
struct CertsInitArgs {
    /// Where to write ca.pem, server-cert.pem, server-key.pem, cert.pem, key.pem
    #[arg(long)]
    dir: PathBuf,
    /// A name or IP address the agent is reached by (repeatable); localhost is always included
    #[arg(long = "host")]
    hosts: Vec<String>,
    /// Replace existing files
    #[arg(long)]
    force: bool,
}

#[derive(clap::Args)]
struct AgentArgs {
    /// Where proxies connect: tls://ADDR:PORT (port 0 picks one; the log names it)
    #[arg(long, required_unless_present = "stdio", conflicts_with = "stdio")]
    listen: Option<String>,
    /// Speak the link on stdin/stdout (what `ssh host offload agent --stdio` runs):
    /// bridges to the user's resident agent, starting it if needed
    #[arg(long)]
    stdio: bool,
    /// Run as the resident agent behind --stdio (started by it; exits when idle)
    #[arg(long, hide = true)]
    resident: bool,
    /// Allow a plain tcp:// (loopback only) or unix:// listener: for tests
    #[arg(long)]
    insecure: bool,
    /// The engine: unix:///var/run/docker.sock, tcp://host:port or tls://host:port
    #[arg(long, default_value = "unix:///var/run/docker.sock", value_parser = EngineAddress::parse)]
    docker: EngineAddress,
    #[command(flatten)]
    tls: TlsArgs,
    /// How long open streams may continue after SIGINT/SIGTERM
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    shutdown_grace: Duration,
    /// A session with no activity for this long is idle
    #[arg(long, default_value = "30m", value_parser = parse_duration)]
    idle_timeout: Duration,
    /// After idle, this long without a reconnect ends the session and removes what it created
    #[arg(long, default_value = "5m", value_parser = parse_duration)]
    grace: Duration,
    /// Where session records live, so a restarted agent still cleans up
    /// (default: /var/lib/offload/agent as root, else ~/.local/state/offload/agent)
    #[arg(long)]
    state_dir: Option<PathBuf>,
    /// Also prune the build cache at cleanup (by default it is shared and kept)
    #[arg(long)]
    purge_build_cache: bool,
    /// Run this command (sh -c) and exit once no session has existed for the idle timeout
    #[arg(long)]
    on_idle_exit: Option<String>,
    /// Where synced bind-mount copies live (default: <state-dir>/sync)
    #[arg(long)]
    sync_root: Option<PathBuf>,
    /// A host path containers may bind besides their synced mounts (repeatable;
    /// default: the engine's socket)
    #[arg(long = "allow-host-path")]
    allow_host_paths: Vec<String>,
    /// The most file content one session may sync to this host (e.g. 500M, 20G)
    #[arg(long, default_value = "20G", value_parser = parse_size)]
    max_sync_bytes: u64,
}

#[derive(clap::Args)]
struct ProxyArgs {
    /// Where Docker clients connect: unix:///path/to/offload.sock
    #[arg(long, value_parser = parse_unix_listen)]
    listen: PathBuf,
    /// The engine to forward to directly: unix:///var/run/docker.sock, tcp://host:port or tls://host:port
    #[arg(long, default_value = "unix:///var/run/docker.sock", value_parser = EngineAddress::parse)]
    docker: EngineAddress,
    /// A remote agent instead: tls://HOST:PORT or ssh://[user@]host[:port]
    #[arg(long, value_parser = RemoteAddress::parse)]
    remote: Option<RemoteAddress>,
    /// Allow a plain tcp:// (loopback only) or unix:// --remote: for tests
    #[arg(long)]
    insecure: bool,
    /// An argument for ssh, before the host (repeatable), e.g. --ssh-arg=-F --ssh-arg=FILE
    #[arg(long = "ssh-arg", allow_hyphen_values = true)]
    ssh_args: Vec<String>,
    /// Interval of the link's keepalive pings; a link silent for two is dead
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    keepalive: Duration,
    /// Where published ports listen on this machine when `-p` names no address
    #[arg(long, default_value = "127.0.0.1")]
    publish_address: std::net::IpAddr,
    /// The command ssh runs on the remote host
    #[arg(long, default_value = "offload agent --stdio")]
    remote_command: String,
    /// A sync ignore rule for every bind mount, gitignore syntax (repeatable)
    #[arg(long)]
    ignore: Vec<String>,
    /// Run an agent inside this process against --docker (the embedded default of `offload start`)
    #[arg(long, conflicts_with = "remote")]
    embedded: bool,
    /// The embedded agent's state (session records, synced copies)
    #[arg(long, requires = "embedded")]
    state_dir: Option<PathBuf>,
    /// The embedded agent's idle timeout
    #[arg(long, default_value = "30m", value_parser = parse_duration)]
    idle_timeout: Duration,
    #[command(flatten)]
    tls: TlsArgs,
    /// How long open streams may continue after SIGINT/SIGTERM
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    shutdown_grace: Duration,
}

/// Docker's TLS flags. The proxy presents `--tlscert`/`--tlskey` and pins
/// `--tlscacert`; the agent presents its own pair and requires client
/// certificates signed by `--tlscacert`.
#[derive(clap::Args)]
struct TlsArgs {
    /// CA certificate: the proxy pins the remote to it; the agent requires clients signed by it
    #[arg(long)]
    tlscacert: Option<PathBuf>,
    /// This side's certificate
    #[arg(long)]
    tlscert: Option<PathBuf>,
    /// This side's private key
    #[arg(long)]
    tlskey: Option<PathBuf>,
}

impl TlsArgs {
    fn files(&self) -> TlsFiles {
        TlsFiles { ca: self.tlscacert.clone(), cert: self.tlscert.clone(), key: self.tlskey.clone() }
    }
}

fn parse_unix_listen(text: &str) -> Result<PathBuf, String> {
    match EngineAddress::parse(text)? {
        EngineAddress::Unix(path) => Ok(path),
        _ => Err(format!("{text:?}: the proxy listens on a unix socket (unix:///path)")),
    }
}

fn runtime(threads: usize) -> std::io::Result<tokio::runtime::Runtime> {
    if threads <= 1 {
        tokio::runtime::Builder::new_current_thread().enable_all().build()
    } else {
        tokio::runtime::Builder::new_multi_thread().worker_threads(threads).enable_all().build()
    }
}

fn main() -> ExitCode {
    let args: Vec<std::ffi::OsString> = std::env::args_os().collect();
    if args.get(1).is_some_and(|a| a == "docker-cli-plugin-metadata") {
        say(&offload::control::plugin::metadata());
        return ExitCode::SUCCESS;
    }
    let cli = match offload::control::plugin::plugin_arguments(&args) {
        Some(as_offload) => Cli::parse_from(as_offload),
        None => Cli::parse(),
    };
    init_tracing();
    // One thread: the proxy and agent are relays; two worker threads gave no
    // measurable latency gain on a 2-core machine. OFFLOAD_WORKER_THREADS overrides.
    let threads =
        std::env::var("OFFLOAD_WORKER_THREADS").ok().and_then(|n| n.parse::<usize>().ok()).unwrap_or(1);
    let runtime = match runtime(threads) {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("offload: cannot start the runtime: {error}");
            return ExitCode::FAILURE;
        }
    };
    let result = match cli.command {
        Command::Proxy(args) => runtime.block_on(run_proxy(args)),
        Command::Agent(args) => runtime.block_on(run_agent(args)),
        Command::Certs(CertsCommand::Init(args)) => certs_init(args),
        Command::Start(args) => runtime.block_on(start(args)),
        Command::Stop(args) => runtime.block_on(stop(args)),
        Command::Status(args) => runtime.block_on(status(args)),
        Command::Diagnose(args) => runtime.block_on(diagnose(args)),
        Command::InstallPlugin => offload::control::plugin::install().map(|path| {
            say(&format!("installed {}: `docker offload start|stop|status` now work", path.display()));
        }),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(message) => {
            eprintln!("offload: {message}");
            ExitCode::FAILURE
        }
    }
}

fn certs_init(args: CertsInitArgs) -> Result<(), String> {
    let mut plan = CertsPlan::new(&args.dir);
    plan.hosts = args.hosts;
    plan.force = args.force;
    let written = offload::certs::init(&plan).map_err(|e| e.to_string())?;
    for file in written.files {
        println!("{}", file.display());
    }
    Ok(())
}

async fn start(args: StartArgs) -> Result<(), String> {
    use offload::control::config::{load, pick};
    // A flag, else OFFLOAD_*, else ~/.config/offload/config.toml.
    let file = load()?;
    let shown = |p: &Option<PathBuf>| p.as_ref().map(|p| p.display().to_string());
    let remote = pick(args.remote, "OFFLOAD_REMOTE", file.remote.clone());
    let idle_timeout = pick(args.idle_timeout, "OFFLOAD_IDLE_TIMEOUT", file.idle_timeout.clone());
    let idle_timeout = parse_duration(idle_timeout.as_deref().unwrap_or("30m"))?;
    let publish_address = pick(args.publish_address, "OFFLOAD_PUBLISH_ADDRESS", file.publish_address.clone());
    if let Some(address) = &publish_address {
        address
            .parse::<std::net::IpAddr>()
            .map_err(|_| format!("publish address {address:?} is not an IP address"))?;
    }
    let mut proxy_args: Vec<std::ffi::OsString> = Vec::new();
    let mut flag = |name: &str, value: Option<String>| {
        if let Some(value) = value {
            proxy_args.push(format!("--{name}={value}").into());
        }
    };
    flag("tlscacert", pick(shown(&args.tls.tlscacert), "OFFLOAD_TLSCACERT", shown(&file.tlscacert)));
    flag("tlscert", pick(shown(&args.tls.tlscert), "OFFLOAD_TLSCERT", shown(&file.tlscert)));
    flag("tlskey", pick(shown(&args.tls.tlskey), "OFFLOAD_TLSKEY", shown(&file.tlskey)));
    flag("remote-command", pick(args.remote_command, "OFFLOAD_REMOTE_COMMAND", file.remote_command.clone()));
    flag("publish-address", publish_address);
    if remote.is_none() {
        flag("idle-timeout", Some(format!("{}ms", idle_timeout.as_millis())));
    }
    let ssh_args = if args.ssh_args.is_empty() { file.ssh_args.clone() } else { args.ssh_args };
    for arg in &ssh_args {
        proxy_args.push(format!("--ssh-arg={arg}").into());
    }
    for rule in &file.ignore {
        proxy_args.push(format!("--ignore={rule}").into());
    }
    if args.insecure {
        proxy_args.push("--insecure".into());
    }
    if let Some(remote) = &remote {
        check_plain(&RemoteAddress::parse(remote)?, args.insecure)?;
    }
    let options = offload::control::start::StartOptions {
        remote,
        proxy_args,
        require_gpu: args.gpu,
        timeout: args.timeout,
        switch_context: !args.no_context,
    };
    let paths = offload::control::paths::Paths::resolve();
    let started = offload::control::start::start(&paths, options).await?;
    say(&offload::control::start::summary(&started));
    if args.no_context {
        say(&format!("  export DOCKER_HOST=unix://{}", paths.socket().display()));
    }
    Ok(())
}

async fn stop(args: StopArgs) -> Result<(), String> {
    let paths = offload::control::paths::Paths::resolve();
    let stopped = offload::control::stop::stop(&paths, args.force, !args.no_context).await?;
    say(&offload::control::stop::summary(&stopped));
    Ok(())
}

async fn status(args: StatusArgs) -> Result<(), String> {
    let json = match args.format.as_str() {
        "json" => true,
        "pretty" => false,
        other => return Err(format!("--format {other}: use pretty or json")),
    };
    let paths = offload::control::paths::Paths::resolve();
    loop {
        let report = offload::control::status::status(&paths).await;
        if json {
            say(&serde_json::to_string_pretty(&report).unwrap_or_default());
        } else {
            if args.watch {
                // Clear the screen between refreshes.
                say_raw("\x1b[2J\x1b[H");
            }
            say(&offload::control::status::pretty(&report));
        }
        if !args.watch {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_secs(2)).await;
    }
}

async fn diagnose(args: DiagnoseArgs) -> Result<(), String> {
    use offload::control::config::{load, pick};
    let file = load()?;
    let or_file = |flag: &Option<PathBuf>, variable: &str, file: &Option<PathBuf>| {
        let shown = |p: &Option<PathBuf>| p.as_ref().map(|p| p.display().to_string());
        pick(shown(flag), variable, shown(file)).map(PathBuf::from)
    };
    let tls = TlsFiles {
        ca: or_file(&args.tls.tlscacert, "OFFLOAD_TLSCACERT", &file.tlscacert),
        cert: or_file(&args.tls.tlscert, "OFFLOAD_TLSCERT", &file.tlscert),
        key: or_file(&args.tls.tlskey, "OFFLOAD_TLSKEY", &file.tlskey),
    };
    let ssh_args = if args.ssh_args.is_empty() { file.ssh_args.clone() } else { args.ssh_args };
    let options = offload::control::diagnose::DiagnoseOptions {
        remote: pick(args.remote, "OFFLOAD_REMOTE", file.remote.clone()),
        tls,
        ssh: SshOptions { args: ssh_args, remote_command: args.remote_command },
    };
    let paths = offload::control::paths::Paths::resolve();
    let report = offload::control::diagnose::diagnose(&paths, options).await;
    say(&report.pretty());
    if report.failed() {
        return Err("a check failed (see above)".to_string());
    }
    Ok(())
}

/// Prints a line; a closed stdout (`offload status | head`) is not an error.
fn say(text: &str) {
    say_raw(&format!("{text}\n"));
}

fn say_raw(text: &str) {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    let _ = out.write_all(text.as_bytes()).and_then(|()| out.flush());
}

async fn run_proxy(args: ProxyArgs) -> Result<(), String> {
    let tls = args.tls.files();
    let mut embedded_agent = None;
    if args.embedded {
        let state_dir =
            args.state_dir.clone().unwrap_or_else(|| offload::control::paths::Paths::resolve().agent_dir());
        let options = offload::control::embedded::EmbeddedOptions {
            engine: args.docker.clone(),
            idle_timeout: args.idle_timeout,
            grace: Duration::from_secs(5 * 60),
            keepalive: args.keepalive,
        };
        embedded_agent = Some(offload::control::embedded::start(&state_dir, options)?);
    }
    let upstream: Arc<dyn Upstream> = match (args.remote, embedded_agent.as_ref()) {
        (_, Some((upstream, _))) => upstream.clone(),
        (Some(remote), None) => {
            check_plain(&remote, args.insecure)?;
            let ssh = SshOptions { args: args.ssh_args, remote_command: args.remote_command };
            let dialer = Dialer::new(remote, &tls, ssh).map_err(|e| e.to_string())?;
            Arc::new(LinkUpstream::new(dialer, args.keepalive))
        }
        (None, None) => Arc::new(EngineUpstream::new(args.docker, &tls).map_err(|e| e.to_string())?),
    };
    let config = ProxyConfig {
        listen: args.listen,
        shutdown_grace: args.shutdown_grace,
        publish_address: args.publish_address,
        ignore: args.ignore,
    };
    proxy::serve(config, upstream).await.map_err(|e| e.to_string())
}

async fn run_agent(args: AgentArgs) -> Result<(), String> {
    let state_dir = args.state_dir.clone().unwrap_or_else(default_state_dir);
    if args.stdio {
        // ssh runs this: bridge to the resident agent, which owns the sessions.
        let plan = resident_plan(&args, &state_dir)?;
        return bridge_stdio(&plan).await.map_err(|e| format!("cannot reach the resident agent: {e}"));
    }
    let engine = EngineUpstream::new(args.docker.clone(), &TlsFiles::default()).map_err(|e| e.to_string())?;
    let config = SessionConfig {
        idle_timeout: args.idle_timeout,
        grace: args.grace,
        state_dir: Some(state_dir.clone()),
        purge_build_cache: args.purge_build_cache,
        on_idle_exit: args.on_idle_exit,
        exit_when_idle: args.resident,
    };
    let mut allowed_host_paths = args.allow_host_paths.clone();
    if allowed_host_paths.is_empty() {
        if let EngineAddress::Unix(socket) = &args.docker {
            allowed_host_paths.push(socket.to_string_lossy().into_owned());
        }
    }
    let sync = SyncConfig {
        root: args.sync_root.clone().unwrap_or_else(|| state_dir.join("sync")),
        allowed_host_paths,
        max_session_bytes: args.max_sync_bytes,
    };
    let agent = Agent::new(engine, config, sync);
    let lifecycle = Lifecycle::new();
    let listen = RemoteAddress::parse(args.listen.as_deref().unwrap_or_default())?;
    // The resident agent's socket is private to its user (0600): no --insecure needed.
    let private_unix = args.resident && matches!(listen, RemoteAddress::Unix(_));
    if !private_unix {
        check_plain(&listen, args.insecure)?;
    }
    let tls = args.tls.files();
    let (listener, shown, socket_file) = agent_listener(&listen, &tls).await?;
    let pid_file = args.resident.then(|| state_dir.join("agent.pid"));
    if let Some(pid_file) = &pid_file {
        let _ = std::fs::write(pid_file, std::process::id().to_string());
    }
    agent.start_idle_watcher(&lifecycle);
    tracing::info!(listen = %shown, "offload agent ready");
    let serving = {
        let lifecycle = lifecycle.clone();
        tokio::spawn(async move { agent.serve(listener, lifecycle).await })
    };
    // Stops on a signal, or when the idle watcher decides to exit.
    tokio::select! {
        signal = termination_signal() => {
            if let Err(error) = signal {
                tracing::error!(%error, "cannot wait for signals; shutting down");
            }
        }
        _ = lifecycle.token.cancelled() => {}
    }
    lifecycle.token.cancel();
    let _ = serving.await;
    drop(socket_file);
    if let Some(pid_file) = pid_file {
        let _ = std::fs::remove_file(pid_file);
    }
    if !lifecycle.shutdown(args.shutdown_grace).await {
        tracing::warn!("streams still open after the grace period; closing them");
    }
    Ok(())
}

/// How `--stdio` reaches the resident agent, and how it starts one.
fn resident_plan(args: &AgentArgs, state_dir: &std::path::Path) -> Result<ResidentPlan, String> {
    let program = std::env::current_exe().map_err(|e| format!("cannot find this program: {e}"))?;
    let socket = state_dir.join("agent.sock");
    let millis = |d: Duration| format!("{}ms", d.as_millis());
    let mut resident: Vec<std::ffi::OsString> = vec![
        "agent".into(),
        "--resident".into(),
        "--listen".into(),
        format!("unix://{}", socket.display()).into(),
        "--docker".into(),
        args.docker.to_string().into(),
        "--state-dir".into(),
        state_dir.into(),
        "--idle-timeout".into(),
        millis(args.idle_timeout).into(),
        "--grace".into(),
        millis(args.grace).into(),
    ];
    if args.purge_build_cache {
        resident.push("--purge-build-cache".into());
    }
    if let Some(root) = &args.sync_root {
        resident.push("--sync-root".into());
        resident.push(root.into());
    }
    for path in &args.allow_host_paths {
        resident.push(format!("--allow-host-path={path}").into());
    }
    resident.push(format!("--max-sync-bytes={}", args.max_sync_bytes).into());
    if let Some(command) = &args.on_idle_exit {
        resident.push("--on-idle-exit".into());
        resident.push(command.into());
    }
    Ok(ResidentPlan { socket, program, args: resident, log: state_dir.join("agent.log") })
}

fn default_state_dir() -> PathBuf {
    let is_root =
        std::env::var("USER").is_ok_and(|u| u == "root") || std::env::var("HOME").is_ok_and(|h| h == "/root");
    if is_root {
        return PathBuf::from("/var/lib/offload/agent");
    }
    let base = std::env::var_os("XDG_STATE_HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(std::env::var_os("HOME").unwrap_or_default()).join(".local/state"));
    base.join("offload/agent")
}

/// Binds the agent's listener; returns it, its address as a URL, and (for a
/// unix socket) the file that is removed again on exit.
async fn agent_listener(
    listen: &RemoteAddress,
    tls: &TlsFiles,
) -> Result<(AgentListener, String, Option<SocketFile>), String> {
    let bind_error = |e: std::io::Error| format!("cannot listen on {listen}: {e}");
    match listen {
        RemoteAddress::Tls { host, port } => {
            let config = offload::tls::server_config(tls, &[b"h2"]).map_err(|e| e.to_string())?;
            let tcp = TcpListener::bind((host.as_str(), *port)).await.map_err(bind_error)?;
            let local = tcp.local_addr().map_err(bind_error)?;
            let acceptor = TlsAcceptor::from(Arc::new(config));
            Ok((AgentListener::Tls(tcp, acceptor), format!("tls://{local}"), None))
        }
        RemoteAddress::Tcp { host, port } => {
            let tcp = TcpListener::bind((host.as_str(), *port)).await.map_err(bind_error)?;
            let local = tcp.local_addr().map_err(bind_error)?;
            Ok((AgentListener::PlainTcp(tcp), format!("tcp://{local}"), None))
        }
        RemoteAddress::Unix(path) => {
            if let Some(dir) = path.parent() {
                create_private_dir(dir).map_err(bind_error)?;
            }
            let (unix, file) = unix_socket::bind(path).map_err(|e| e.to_string())?;
            Ok((AgentListener::Unix(unix, path.clone()), format!("unix://{}", path.display()), Some(file)))
        }
        RemoteAddress::Ssh { .. } => Err("the agent listens on tls://; for ssh, use --stdio".to_string()),
    }
}

/// Creates `dir` (mode 0700 when new): it holds sockets and session records.
fn create_private_dir(dir: &std::path::Path) -> std::io::Result<()> {
    use std::os::unix::fs::DirBuilderExt;
    if dir.is_dir() {
        return Ok(());
    }
    std::fs::DirBuilder::new().recursive(true).mode(0o700).create(dir)
}

/// Plain links carry Docker API access unencrypted and unauthenticated: only
/// with --insecure, and over tcp only on loopback.
fn check_plain(address: &RemoteAddress, insecure: bool) -> Result<(), String> {
    if !address.is_plain() {
        return Ok(());
    }
    if !insecure {
        return Err(format!(
            "{address} is unencrypted and unauthenticated; it needs --insecure (tests only)"
        ));
    }
    if let RemoteAddress::Tcp { host, .. } = address {
        let loopback =
            host == "localhost" || host.parse::<std::net::IpAddr>().is_ok_and(|ip| ip.is_loopback());
        if !loopback {
            return Err(format!("{address}: a plain tcp link is only allowed on loopback"));
        }
    }
    Ok(())
}

fn init_tracing() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).with_ansi(ansi).init();
}
