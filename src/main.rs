use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use clap::{Parser, Subcommand};

use offload::duration::parse_duration;
use offload::proxy::{self, ProxyConfig};
use offload::upstream::address::EngineAddress;
use offload::upstream::engine::EngineUpstream;
use offload::upstream::tls::TlsFiles;

/// Run containers and builds on a remote Docker Engine with the Docker tools you already use.
#[derive(Parser)]
#[command(name = "offload", version)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Serve the Docker API on a local unix socket, forwarding to an engine.
    Proxy(ProxyArgs),
}

#[derive(clap::Args)]
struct ProxyArgs {
    /// Where Docker clients connect: unix:///path/to/offload.sock
    #[arg(long, value_parser = parse_unix_listen)]
    listen: PathBuf,
    /// The engine to forward to: unix:///var/run/docker.sock, tcp://host:port or tls://host:port
    #[arg(long, default_value = "unix:///var/run/docker.sock", value_parser = EngineAddress::parse)]
    docker: EngineAddress,
    /// CA certificate that the engine's certificate must chain to (tls://)
    #[arg(long)]
    tlscacert: Option<PathBuf>,
    /// Client certificate presented to the engine (tls://)
    #[arg(long)]
    tlscert: Option<PathBuf>,
    /// Client private key (tls://)
    #[arg(long)]
    tlskey: Option<PathBuf>,
    /// How long open streams may continue after SIGINT/SIGTERM
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    shutdown_grace: Duration,
}

fn parse_unix_listen(text: &str) -> Result<PathBuf, String> {
    match EngineAddress::parse(text)? {
        EngineAddress::Unix(path) => Ok(path),
        _ => Err(format!(
            "{text:?}: the proxy listens on a unix socket (unix:///path)"
        )),
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_tracing();
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("offload: cannot start the runtime: {error}");
            return ExitCode::FAILURE;
        }
    };
    let result = match cli.command {
        Command::Proxy(args) => runtime.block_on(run_proxy(args)),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(message) => {
            eprintln!("offload: {message}");
            ExitCode::FAILURE
        }
    }
}

async fn run_proxy(args: ProxyArgs) -> Result<(), String> {
    let tls = TlsFiles {
        ca: args.tlscacert,
        cert: args.tlscert,
        key: args.tlskey,
    };
    let upstream = EngineUpstream::new(args.docker, &tls).map_err(|e| e.to_string())?;
    let config = ProxyConfig {
        listen: args.listen,
        shutdown_grace: args.shutdown_grace,
    };
    proxy::serve(config, Arc::new(upstream))
        .await
        .map_err(|e| e.to_string())
}

fn init_tracing() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
}
