//! Benchmark of published-port forwarding (issue 5): a container's published TCP
//! port reached through `offload proxy`'s local listener, one HTTP/2 CONNECT stream
//! per connection over the link to `offload agent`, which dials the port on its own
//! loopback. Everything runs on this machine, each figure next to its baseline in
//! the same run, variants interleaved round by round:
//!
//! * throughput of one forwarded connection into a sink in a container, vs
//!   `ssh -L` (aes128-gcm) and `socat` to the same published port, and the port
//!   itself;
//! * the first byte on a new forwarded connection over a 20 ms link (the tests'
//!   delay relay, `tests/support/delay.rs`, between proxy and agent), vs the same
//!   connection made straight to the published port, and the relay's round trip;
//! * RSS of both halves per idle forwarded connection (1,000 of them).
//!
//! The proxy and the "remote" engine share this machine's loopback: the engine
//! publishes on 127.0.0.1:PORT (the agent rewrites every binding to loopback), and
//! the proxies listen on the same port number at 127.0.0.2 (`--publish-address`,
//! straight to the agent) and 127.0.0.3 (through the delay relay).
//!
//! See benches/README.md ("Port-forward benchmark"). Run with `cargo bench --bench
//! ports`. Without `--bench` (when `cargo test --all-targets` runs this target) it
//! only prints how to run it.

#[allow(dead_code)] // the relay can also cut and freeze links; the bench only delays
#[path = "../tests/support/delay.rs"]
mod delay;

#[path = "common/relay.rs"]
mod relay;

mod common;

#[path = "common/rig.rs"]
mod rig;

use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use delay::DelayRelay;
use hyper::{Method, StatusCode};
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use common::engine::{api_expect, api_json, ensure_image, sweep_leftovers, ApiClient, Container};
use common::procfs::{load_average, process_tree, stat_fields};
use common::report::{Columns, Paired, Report, Style, Target};
use common::stats::{median, megabytes_per_sec, WyRand};
use common::{
    env_or, free_port, guarded_command, is_running, run_bounded, sections, within, Context, Result,
    DEFAULT_IMAGE,
};
use relay::{measure_rtt, start_relay, RttFigures};
use rig::{Daemon, Sshd};

/// Label on every container the bench creates; its value is the bench's pid.
const LABEL: &str = "offload-ports-bench.pid";
/// Temporary directories are `$TMPDIR/offload-ports-bench-<pid>-*`.
const TEMP_PREFIX: &str = "offload-ports-bench-";
const SSH_LO: &str = "offload-bench-lo";
const SSH_WAN: &str = "offload-bench-wan";
/// The fastest kex and cipher of OpenSSH here, as in the link and sync benches.
const SSH_TUNING: &str = "  Ciphers aes128-gcm@openssh.com\n  KexAlgorithms curve25519-sha256\n";
/// Where the proxy straight to the agent listens for published ports.
const LO_ADDRESS: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 2);
/// Where the proxy behind the delay relay listens.
const WAN_ADDRESS: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 3);
/// The engine publishes on loopback (the agent rewrites every binding to it).
const ENGINE_ADDRESS: Ipv4Addr = Ipv4Addr::LOCALHOST;
/// The sink reads in blocks of this size (`dd iflag=fullblock`), and every transfer
/// is a whole number of them, so `N+0 records in` proves that all bytes arrived.
const SINK_BLOCK: u64 = 64 * 1024;
/// busybox `nc -ll` forks a child per connection and runs the rest of the command
/// line with the connection as stdin and stdout. `dd` reports on stderr, hence `sh`.
const SINK_CMD: &[&str] =
    &["nc", "-ll", "-p", "80", "-e", "sh", "-c", "dd of=/dev/null bs=65536 iflag=fullblock 2>&1"];
const ECHO_CMD: &[&str] = &["nc", "-ll", "-p", "80", "-e", "cat"];
/// Setup steps: a container create, start, a forward answering.
const SETUP_LIMIT: Duration = Duration::from_secs(30);
/// One bulk transfer.
const TRANSFER_LIMIT: Duration = Duration::from_secs(180);
/// One first-byte sample.
const SAMPLE_LIMIT: Duration = Duration::from_secs(10);
/// Pause between first-byte samples, so that one connection's teardown (and the
/// container's `cat` exiting) does not overlap the next connection's setup.
const SAMPLE_GAP: Duration = Duration::from_millis(20);

// ---------------------------------------------------------------------------------
// Configuration
// ---------------------------------------------------------------------------------

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Section {
    Idle,
    FirstByte,
    Throughput,
}

impl Section {
    const ALL: [Section; 3] = [Section::Idle, Section::FirstByte, Section::Throughput];

    fn parse(name: &str) -> Result<Section> {
        match name {
            "idle" => Ok(Section::Idle),
            "first-byte" | "firstbyte" => Ok(Section::FirstByte),
            "throughput" => Ok(Section::Throughput),
            other => {
                Err(format!("unknown section {other:?}; the sections are idle, first-byte, throughput")
                    .into())
            }
        }
    }
}

struct Config {
    binary: PathBuf,
    engine: PathBuf,
    image: String,
    sections: Vec<Section>,
    /// Round trip the delay relays add.
    rtt: Duration,
    /// Throughput: bytes per measured transfer, measured rounds (one transfer of each
    /// variant per round), bytes of the discarded warm-up transfer of each variant.
    mib: u64,
    rounds: usize,
    warmup_mib: u64,
    /// First byte: measured rounds (plus one discarded), new connections per variant
    /// per round.
    first_byte_rounds: usize,
    samples: usize,
    /// Idle: forwarded connections held open at once.
    connections: usize,
    timeout: Duration,
    strict: bool,
}

impl Config {
    fn from_env(args: &[String]) -> Result<Config> {
        let binary = match std::env::var("OFFLOAD_PORTS_BENCH_BINARY") {
            Ok(path) if !path.is_empty() => PathBuf::from(path),
            _ => PathBuf::from(env!("CARGO_BIN_EXE_offload")),
        };
        let config = Config {
            binary,
            engine: PathBuf::from(env_or("OFFLOAD_PORTS_BENCH_ENGINE", "/var/run/docker.sock".to_string())?),
            image: env_or("OFFLOAD_PORTS_BENCH_IMAGE", DEFAULT_IMAGE.to_string())?,
            sections: sections(args, "OFFLOAD_PORTS_BENCH_ONLY", &Section::ALL, Section::parse)?,
            rtt: Duration::from_millis(env_or("OFFLOAD_PORTS_BENCH_RTT_MS", 20)?),
            mib: env_or("OFFLOAD_PORTS_BENCH_MIB", 512)?,
            rounds: env_or("OFFLOAD_PORTS_BENCH_ROUNDS", 5)?,
            warmup_mib: env_or("OFFLOAD_PORTS_BENCH_WARMUP_MIB", 32)?,
            first_byte_rounds: env_or("OFFLOAD_PORTS_BENCH_FIRST_BYTE_ROUNDS", 6)?,
            samples: env_or("OFFLOAD_PORTS_BENCH_SAMPLES", 10)?,
            connections: env_or("OFFLOAD_PORTS_BENCH_CONNECTIONS", 1000)?,
            timeout: Duration::from_secs(env_or("OFFLOAD_PORTS_BENCH_TIMEOUT_S", 600)?),
            strict: env_or("OFFLOAD_PORTS_BENCH_STRICT", 0u8)? != 0,
        };
        let positive = [
            ("OFFLOAD_PORTS_BENCH_RTT_MS", config.rtt.as_millis() as u64),
            ("OFFLOAD_PORTS_BENCH_MIB", config.mib),
            ("OFFLOAD_PORTS_BENCH_ROUNDS", config.rounds as u64),
            ("OFFLOAD_PORTS_BENCH_FIRST_BYTE_ROUNDS", config.first_byte_rounds as u64),
            ("OFFLOAD_PORTS_BENCH_SAMPLES", config.samples as u64),
            ("OFFLOAD_PORTS_BENCH_CONNECTIONS", config.connections as u64),
        ];
        for (name, value) in positive {
            if value == 0 {
                return Err(format!("{name} must be at least 1").into());
            }
        }
        Ok(config)
    }

    fn runs(&self, section: Section) -> bool {
        self.sections.contains(&section)
    }
}

// ---------------------------------------------------------------------------------
// Entry point
// ---------------------------------------------------------------------------------

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if !args.iter().any(|arg| arg == "--bench") {
        println!("ports bench: skipped; run it with `cargo bench --bench ports`");
        return ExitCode::SUCCESS;
    }
    let config = match Config::from_env(&args) {
        Ok(config) => config,
        Err(err) => {
            eprintln!("ports bench: {err}");
            return ExitCode::FAILURE;
        }
    };
    // Child processes are spawned from the main thread only (block_on runs there), so
    // their parent-death signal fires only when the bench exits.
    let runtime = match tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build() {
        Ok(runtime) => runtime,
        Err(err) => {
            eprintln!("ports bench: building a tokio runtime: {err}");
            return ExitCode::FAILURE;
        }
    };
    let mut report = Report::new(REPORT_STYLE);
    let outcome = runtime.block_on(run_bounded(
        config.timeout,
        "OFFLOAD_PORTS_BENCH_TIMEOUT_S",
        run(&config, &mut report),
    ));
    report.print(&format!("offload ports bench ({})", config.binary.display()));
    runtime.shutdown_timeout(Duration::from_secs(1));
    report.exit_code(outcome, config.strict, "ports bench")
}

async fn run(config: &Config, report: &mut Report) -> Result<()> {
    report.note(format!("offload binary: {}", config.binary.display()));
    report.note(format!("load average at the start: {}", load_average()));
    describe_engine(&config.engine, report).await?;
    ensure_image(&config.engine, &config.image).await?;
    sweep_leftovers(&config.engine, LABEL, "ports bench").await?;
    sweep_temp_dirs();
    // The bench holds one socket per idle connection; the proxy (its local side and
    // nothing else: the link is one connection) and the agent (its loopback side)
    // inherit the limit.
    let nofile = raise_nofile_limit(config.connections as u64 + 512)?;
    report.note(format!("RLIMIT_NOFILE (bench, proxies, agent): {nofile}"));

    let dir = tempfile::Builder::new()
        .prefix(&format!("{TEMP_PREFIX}{}-", std::process::id()))
        .tempdir()
        .context("creating a temporary directory")?;
    let mut rig = Rig::start(config, dir.path()).await?;
    report.note(format!(
        "forwards: client -> proxy listener ({LO_ADDRESS} straight to the agent, {WAN_ADDRESS} through \
         the delay relay) -> tunnel stream on the link (POST /_offload/v1/tunnel/PORT, mutual TLS, h2) \
         -> agent -> the container's own address, read from the engine's docker-proxy for \
         {ENGINE_ADDRESS}:PORT (the baselines go through that docker-proxy)"
    ));
    let targets = match rig.targets(config).await {
        Ok(targets) => targets,
        Err(err) => return Err(format!("{err}{}", rig.logs()).into()),
    };
    report.note(format!(
        "containers ({}): sink `{}` published on {ENGINE_ADDRESS}:{}, echo `{}` on {ENGINE_ADDRESS}:{}",
        config.image,
        SINK_CMD.join(" "),
        targets.sink.port,
        ECHO_CMD.join(" "),
        targets.echo.port
    ));

    let outcome = run_sections(config, &rig, &targets, report).await;
    if let Err(err) = outcome {
        return Err(format!("{err}{}", rig.logs()).into());
    }
    drop(targets);
    rig.stop_all(report);
    Ok(())
}

async fn run_sections(config: &Config, rig: &Rig, targets: &Targets, report: &mut Report) -> Result<()> {
    // Memory first: after bulk transfers the allocator keeps freed pages, and new
    // connections would reuse them without the RSS growing.
    if config.runs(Section::Idle) {
        idle_phase(config, rig, targets, report).await?;
    }
    if config.runs(Section::FirstByte) {
        first_byte_phase(config, rig, targets, report).await?;
    }
    if config.runs(Section::Throughput) {
        throughput_phase(config, rig, targets, report).await?;
    }
    Ok(())
}

// ---------------------------------------------------------------------------------
// The rig: certificates, an agent, two proxies, a relay, sshd with ssh -L, socat
// ---------------------------------------------------------------------------------

/// Fields drop in declaration order: forwarders and proxies stop before the relays,
/// the agent and sshd.
struct Rig {
    socat: Option<Daemon>,
    ssh_lo: Option<Daemon>,
    ssh_wan: Option<Daemon>,
    proxy_lo: Daemon,
    proxy_wan: Daemon,
    /// Held: dropping it stops the relay between the second proxy and the agent.
    _relay: DelayRelay,
    agent: Daemon,
    /// Held: the relay in front of sshd.
    _ssh_relay: DelayRelay,
    sshd: Sshd,
    root: PathBuf,
    /// Local ports of the `ssh -L` (straight, through the relay) and socat listeners.
    ssh_lo_port: u16,
    ssh_wan_port: u16,
    socat_port: u16,
    /// The proxies' API sockets.
    lo_socket: PathBuf,
    wan_socket: PathBuf,
}

/// A container with a published port, and the addresses that reach it.
struct Published {
    /// Held: dropping it removes the container.
    _container: Container,
    port: u16,
}

impl Published {
    fn direct(&self) -> SocketAddr {
        (ENGINE_ADDRESS, self.port).into()
    }

    fn lo(&self) -> SocketAddr {
        (LO_ADDRESS, self.port).into()
    }

    fn wan(&self) -> SocketAddr {
        (WAN_ADDRESS, self.port).into()
    }
}

struct Targets {
    sink: Published,
    echo: Published,
}

impl Rig {
    async fn start(config: &Config, root: &Path) -> Result<Rig> {
        let certs = root.join("certs");
        make_certs(&config.binary, &certs)?;

        let mut command = guarded_command(&config.binary);
        command
            .arg("agent")
            .args(["--listen", "tls://127.0.0.1:0"])
            .arg(format!("--docker=unix://{}", config.engine.display()))
            .arg("--tlscacert")
            .arg(certs.join("ca.pem"))
            .arg("--tlscert")
            .arg(certs.join("server-cert.pem"))
            .arg("--tlskey")
            .arg(certs.join("server-key.pem"))
            .arg("--state-dir")
            .arg(root.join("agent-state"))
            .env("RUST_LOG", "info");
        let mut agent = Daemon::spawn("agent", command, root)?;
        let line = agent.wait_for_line("offload agent ready").await?;
        let url = line.split("listen=").nth(1).and_then(|rest| rest.split_whitespace().next()).unwrap_or("");
        let agent_addr: SocketAddr =
            url.trim_start_matches("tls://").parse().context(format!("agent address in {line:?}"))?;
        let relay = start_relay(agent_addr, config.rtt)?;
        let proxy_lo = start_proxy(config, root, "proxy-lo", agent_addr, LO_ADDRESS, &certs).await?;
        let proxy_wan = start_proxy(config, root, "proxy-wan", relay.addr, WAN_ADDRESS, &certs).await?;

        let sshd = Sshd::start(root).await?;
        let ssh_relay = start_relay(sshd.addr, config.rtt)?;
        sshd.write_client_config(
            &[(SSH_LO, sshd.addr.port()), (SSH_WAN, ssh_relay.addr.port())],
            SSH_TUNING,
        )?;

        Ok(Rig {
            socat: None,
            ssh_lo: None,
            ssh_wan: None,
            proxy_lo,
            proxy_wan,
            _relay: relay,
            agent,
            _ssh_relay: ssh_relay,
            sshd,
            root: root.to_path_buf(),
            ssh_lo_port: free_port()?,
            ssh_wan_port: free_port()?,
            socat_port: free_port()?,
            lo_socket: root.join("proxy-lo.sock"),
            wan_socket: root.join("proxy-wan.sock"),
        })
    }

    /// Creates and starts the sink and the echo container through the straight proxy
    /// (which opens its forwards before the start answer comes back), starts them
    /// again through the relayed proxy (the engine answers 304, and that proxy opens
    /// its forwards too), then starts the baselines' forwarders to the same ports and
    /// waits until every path answers.
    async fn targets(&mut self, config: &Config) -> Result<Targets> {
        let sink = self.container(config, "sink", SINK_CMD).await?;
        let echo = self.container(config, "echo", ECHO_CMD).await?;

        let mut command = guarded_command(&find_tool("socat")?);
        command
            .arg(format!("TCP-LISTEN:{},bind=127.0.0.1,reuseaddr,fork", self.socat_port))
            .arg(format!("TCP:127.0.0.1:{}", sink.port));
        self.socat = Some(Daemon::spawn("socat", command, &self.root)?);
        self.ssh_lo = Some(self.ssh_forward(SSH_LO, self.ssh_lo_port, sink.port)?);
        self.ssh_wan = Some(self.ssh_forward(SSH_WAN, self.ssh_wan_port, echo.port)?);

        let sinks = [
            ("the published port", sink.direct()),
            ("the straight proxy", sink.lo()),
            ("the relayed proxy", sink.wan()),
            ("socat", self.socat_addr()),
            ("ssh -L", self.ssh_lo_addr()),
        ];
        for (what, addr) in sinks {
            within(SETUP_LIMIT, format!("the sink through {what} ({addr})"), until_ok(|| sink_probe(addr)))
                .await?;
        }
        let echoes = [
            ("the published port", echo.direct()),
            ("the straight proxy", echo.lo()),
            ("the relayed proxy", echo.wan()),
            ("ssh -L through the relay", self.ssh_wan_addr()),
        ];
        for (what, addr) in echoes {
            within(SETUP_LIMIT, format!("the echo through {what} ({addr})"), until_ok(|| echo_probe(addr)))
                .await?;
        }
        Ok(Targets { sink, echo })
    }

    async fn container(&self, config: &Config, name: &str, cmd: &[&str]) -> Result<Published> {
        let spec = json!({
            "Image": config.image,
            "Cmd": cmd,
            "Labels": { LABEL: std::process::id().to_string() },
            "ExposedPorts": { "80/tcp": {} },
            "HostConfig": { "PortBindings": { "80/tcp": [{ "HostIp": "", "HostPort": "" }] } },
        });
        let created = within(
            SETUP_LIMIT,
            format!("creating the {name} container"),
            api_expect(&self.lo_socket, Method::POST, "/containers/create", Some(spec), StatusCode::CREATED),
        )
        .await?;
        let id = created["Id"].as_str().ok_or("container create: no Id in the answer")?;
        let container = Container { engine: config.engine.clone(), id: id.to_string() };
        let start = format!("/containers/{id}/start");
        within(
            SETUP_LIMIT,
            format!("starting the {name} container"),
            api_expect(&self.lo_socket, Method::POST, &start, None, StatusCode::NO_CONTENT),
        )
        .await?;
        let (status, answer) = within(
            SETUP_LIMIT,
            format!("starting the {name} container again through the relayed proxy"),
            api_json(&self.wan_socket, Method::POST, &start, None),
        )
        .await?;
        if status != StatusCode::NOT_MODIFIED {
            return Err(
                format!("second start of the {name} container: {status}, expected 304: {answer}").into()
            );
        }
        let inspect =
            api_expect(&config.engine, Method::GET, &format!("/containers/{id}/json"), None, StatusCode::OK)
                .await?;
        let binding = &inspect["NetworkSettings"]["Ports"]["80/tcp"][0];
        let port = binding["HostPort"].as_str().and_then(|p| p.parse::<u16>().ok());
        let port = port.ok_or_else(|| format!("the {name} container publishes no port 80: {binding}"))?;
        if binding["HostIp"].as_str() != Some("127.0.0.1") {
            return Err(
                format!("the agent did not bind the {name} container's port to loopback: {binding}").into()
            );
        }
        Ok(Published { _container: container, port })
    }

    /// `ssh -N -L 127.0.0.1:LOCAL:127.0.0.1:TARGET host`: one ssh connection, one
    /// channel per forwarded connection.
    fn ssh_forward(&self, host: &str, local: u16, target: u16) -> Result<Daemon> {
        let mut command = guarded_command(&find_tool("ssh")?);
        command
            .arg("-F")
            .arg(&self.sshd.client_config)
            .args(["-N", "-o", "ExitOnForwardFailure=yes", "-L"])
            .arg(format!("127.0.0.1:{local}:127.0.0.1:{target}"))
            .arg(host);
        Daemon::spawn(&format!("ssh-L-{host}"), command, &self.sshd.dir)
    }

    fn socat_addr(&self) -> SocketAddr {
        (Ipv4Addr::LOCALHOST, self.socat_port).into()
    }

    fn ssh_lo_addr(&self) -> SocketAddr {
        (Ipv4Addr::LOCALHOST, self.ssh_lo_port).into()
    }

    fn ssh_wan_addr(&self) -> SocketAddr {
        (Ipv4Addr::LOCALHOST, self.ssh_wan_port).into()
    }

    /// CPU seconds so far of the offload side of the straight forward (proxy and
    /// agent), of the `ssh -L` side (client and sshd with its session processes),
    /// and of socat (with its reaped per-connection children).
    fn cpu(&self) -> [f64; 3] {
        let ssh = self.ssh_lo.as_ref().map_or(0.0, |d| tree_cpu_secs(d.pid));
        [
            tree_cpu_secs(self.proxy_lo.pid) + tree_cpu_secs(self.agent.pid),
            ssh + tree_cpu_secs(self.sshd.daemon.pid),
            self.socat.as_ref().map_or(0.0, |d| tree_cpu_secs(d.pid)),
        ]
    }

    /// The tails of the logs, for an error message.
    fn logs(&self) -> String {
        let mut text = String::new();
        for daemon in [&self.agent, &self.proxy_lo, &self.proxy_wan] {
            text.push_str(&format!("\n{}:\n{}", daemon.name, daemon.log_tail()));
        }
        for daemon in [&self.socat, &self.ssh_lo, &self.ssh_wan].into_iter().flatten() {
            text.push_str(&format!("\n{}:\n{}", daemon.name, daemon.log_tail()));
        }
        text.push_str(&format!("\nsshd:\n{}", self.sshd.log_tail()));
        text
    }

    /// Stops the proxies and the agent with SIGTERM and reports how they went; the
    /// rest stops on drop.
    fn stop_all(mut self, report: &mut Report) {
        let mut outcomes = Vec::new();
        let mut all_ok = true;
        for daemon in [&mut self.proxy_lo, &mut self.proxy_wan, &mut self.agent] {
            let outcome = match daemon.stop() {
                Ok((took, status)) => {
                    all_ok &= status.success() && took < rig::STOP_TIMEOUT;
                    let code =
                        status.code().map_or_else(|| status.to_string(), |code| format!("exit {code}"));
                    format!("{} {code} in {:.2} s", daemon.name, took.as_secs_f64())
                }
                Err(err) => {
                    all_ok = false;
                    format!("{}: {err}", daemon.name)
                }
            };
            outcomes.push(outcome);
        }
        report.single("proxies and agent stop on SIGTERM", outcomes.join(", "), "exit 0", Some(all_ok));
    }
}

/// `offload certs init` into `dir`, for a TLS link on loopback.
fn make_certs(binary: &Path, dir: &Path) -> Result<()> {
    let output = Command::new(binary)
        .args(["certs", "init", "--host", "127.0.0.1", "--dir"])
        .arg(dir)
        .stdin(Stdio::null())
        .output()
        .context("running offload certs init")?;
    if !output.status.success() {
        return Err(format!(
            "offload certs init failed ({}): {}",
            output.status,
            String::from_utf8_lossy(&output.stderr).trim()
        )
        .into());
    }
    Ok(())
}

/// A proxy on `<root>/<name>.sock` whose remote is the agent (or a relay in front of
/// it) at `addr`, publishing ports on `publish`; ready once `/_ping` answers (the
/// first request opens the link and the session).
async fn start_proxy(
    config: &Config,
    root: &Path,
    name: &str,
    addr: SocketAddr,
    publish: Ipv4Addr,
    certs: &Path,
) -> Result<Daemon> {
    let socket = root.join(format!("{name}.sock"));
    let mut command = guarded_command(&config.binary);
    command
        .arg("proxy")
        .arg(format!("--listen=unix://{}", socket.display()))
        .arg(format!("--remote=tls://127.0.0.1:{}", addr.port()))
        .arg(format!("--publish-address={publish}"))
        .arg("--tlscacert")
        .arg(certs.join("ca.pem"))
        .arg("--tlscert")
        .arg(certs.join("cert.pem"))
        .arg("--tlskey")
        .arg(certs.join("key.pem"))
        .env("RUST_LOG", "info");
    let mut proxy = Daemon::spawn(name, command, root)?;
    let deadline = Instant::now() + rig::START_TIMEOUT;
    loop {
        if let Some(status) = proxy.exited()? {
            return Err(format!("{name} exited ({status}) before it was ready:\n{}", proxy.log_tail()).into());
        }
        if socket.exists() {
            if let Ok(mut client) = ApiClient::connect(&socket).await {
                if client.get("/_ping").await.is_ok() {
                    return Ok(proxy);
                }
            }
        }
        if Instant::now() > deadline {
            return Err(format!("{name} did not answer /_ping:\n{}", proxy.log_tail()).into());
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn find_tool(name: &str) -> Result<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .map(|dir| dir.join(name))
        .find(|candidate| candidate.is_file())
        .ok_or_else(|| format!("{name} not found in PATH (install it)").into())
}

/// Retries `probe` every 50 ms until it succeeds (the caller bounds it in time); the
/// last error is lost, the caller's limit says what did not answer.
async fn until_ok<F, Fut>(mut probe: F) -> Result<()>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<()>>,
{
    loop {
        if probe().await.is_ok() {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// An empty transfer must come back as `0+0 records in`.
async fn sink_probe(addr: SocketAddr) -> Result<()> {
    within(SAMPLE_LIMIT, "sink probe", async { push(addr, 0, &[]).await.map(|_| ()) }).await
}

async fn echo_probe(addr: SocketAddr) -> Result<()> {
    within(SAMPLE_LIMIT, "echo probe", async { first_byte(addr).await.map(|_| ()) }).await
}

// ---------------------------------------------------------------------------------
// Phase: idle connections
// ---------------------------------------------------------------------------------

/// RSS and fds of a process tree.
#[derive(Clone, Copy)]
struct Usage {
    rss_kib: f64,
    fds: usize,
}

impl Usage {
    fn of(pid: u32) -> Usage {
        let tree = process_tree(pid);
        Usage {
            rss_kib: tree.iter().filter_map(|pid| status_kib(*pid, "VmRSS")).sum(),
            fds: tree.iter().map(|pid| fd_count(*pid)).sum(),
        }
    }
}

async fn idle_phase(config: &Config, rig: &Rig, targets: &Targets, report: &mut Report) -> Result<()> {
    let n = config.connections;
    println!("idle: {n} forwarded connections to the echo container through {}", targets.echo.lo());
    // Warm-up: the first connections allocate what every later one reuses.
    for _ in 0..20 {
        within(SAMPLE_LIMIT, "warm-up echo", first_byte(targets.echo.lo())).await?;
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    let pids = [rig.proxy_lo.pid, rig.agent.pid];
    let before = pids.map(Usage::of);

    let started = Instant::now();
    let mut streams = Vec::with_capacity(n);
    for i in 0..n {
        let stream = within(SAMPLE_LIMIT, format!("idle connection {i}"), async {
            let mut stream = TcpStream::connect(targets.echo.lo()).await.context("connecting")?;
            echo_once(&mut stream, i as u8).await?;
            Ok(stream)
        })
        .await?;
        streams.push(stream);
    }
    let opening = started.elapsed();
    tokio::time::sleep(Duration::from_secs(2)).await;
    let with = pids.map(Usage::of);

    // Every connection is still live end to end after its rest.
    let mut live = 0;
    for (i, stream) in streams.iter_mut().enumerate() {
        if within(SAMPLE_LIMIT, "second echo", echo_once(stream, (i as u8).wrapping_add(1))).await.is_ok() {
            live += 1;
        }
    }
    drop(streams);
    // Closing is asynchronous on both halves: wait until the fds come back.
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut after = pids.map(Usage::of);
    while after.iter().zip(&before).any(|(a, b)| a.fds > b.fds + 4) && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(100)).await;
        after = pids.map(Usage::of);
    }

    report.note(format!(
        "idle: opening {n} forwarded connections one after another (connect, one byte echoed) took {:.2} s",
        opening.as_secs_f64()
    ));
    for (side, index) in [("proxy", 0), ("agent", 1)] {
        let per_connection = (with[index].rss_kib - before[index].rss_kib) / n as f64;
        report.single(
            &format!("{side} RSS per idle forwarded connection (KiB), {n} open"),
            format!("{per_connection:.1}"),
            "<= 16",
            Some(per_connection <= 16.0),
        );
        report.single(
            &format!("{side} RSS before / with {n} / after close (MiB)"),
            format!(
                "{:.1} / {:.1} / {:.1}",
                before[index].rss_kib / 1024.0,
                with[index].rss_kib / 1024.0,
                after[index].rss_kib / 1024.0
            ),
            "info",
            None,
        );
        report.single(
            &format!("{side} open fds before / with {n} / after close"),
            format!("{} / {} / {}", before[index].fds, with[index].fds, after[index].fds),
            "back to before (+4)",
            Some(after[index].fds <= before[index].fds + 4),
        );
    }
    report.single(
        &format!("idle forwarded connections that still echo after 2 s of rest, of {n}"),
        live.to_string(),
        "all",
        Some(live == n),
    );
    Ok(())
}

/// Sends one byte and reads it back.
async fn echo_once(stream: &mut TcpStream, byte: u8) -> Result<()> {
    stream.write_all(&[byte]).await.context("sending a byte")?;
    let mut answer = [0u8; 1];
    stream.read_exact(&mut answer).await.context("reading the echo")?;
    if answer[0] != byte {
        return Err(format!("sent {byte}, the echo answered {}", answer[0]).into());
    }
    Ok(())
}

/// `VmRSS`-style fields of /proc/PID/status, in KiB.
fn status_kib(pid: u32, field: &str) -> Option<f64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|line| line.starts_with(field))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

fn fd_count(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd")).map(|dir| dir.count()).unwrap_or(0)
}

/// Raises the soft RLIMIT_NOFILE to the hard one with util-linux `prlimit` on our
/// own pid (no unsafe code needed); children inherit it. Fails if it is still below
/// `wanted`.
fn raise_nofile_limit(wanted: u64) -> Result<u64> {
    let pid = std::process::id().to_string();
    let read = |column: &str| -> u64 {
        Command::new("prlimit")
            .args(["--pid", &pid, "--nofile", "--raw", "--noheadings", "--output", column])
            .output()
            .ok()
            .and_then(|o| String::from_utf8_lossy(&o.stdout).trim().parse().ok())
            .unwrap_or(0)
    };
    let hard = read("HARD");
    let _ = Command::new("prlimit").args(["--pid", &pid, &format!("--nofile={hard}:{hard}")]).status();
    let soft = read("SOFT");
    if soft < wanted {
        return Err(format!(
            "RLIMIT_NOFILE is {soft}, below the {wanted} fds needed; lower OFFLOAD_PORTS_BENCH_CONNECTIONS"
        )
        .into());
    }
    Ok(soft)
}

// ---------------------------------------------------------------------------------
// Phase: first byte on a new connection
// ---------------------------------------------------------------------------------

#[derive(Clone, Copy)]
enum FirstBytePath {
    Direct,
    Lo,
    Wan,
    SshWan,
}

impl FirstBytePath {
    const ALL: [FirstBytePath; 4] =
        [FirstBytePath::Direct, FirstBytePath::Lo, FirstBytePath::Wan, FirstBytePath::SshWan];
}

async fn first_byte_phase(config: &Config, rig: &Rig, targets: &Targets, report: &mut Report) -> Result<()> {
    let rtt = measure_rtt(config.rtt).await?;
    report.rtt_row(config, &rtt);
    let rtt_ms = rtt.relay.p50 / 1e6;
    let addr = |path: FirstBytePath| -> SocketAddr {
        match path {
            FirstBytePath::Direct => targets.echo.direct(),
            FirstBytePath::Lo => targets.echo.lo(),
            FirstBytePath::Wan => targets.echo.wan(),
            FirstBytePath::SshWan => rig.ssh_wan_addr(),
        }
    };
    println!(
        "first byte: {} new connections per path per round, {} rounds (+1 warm-up)",
        config.samples, config.first_byte_rounds
    );
    // Per round: the p50 of each path's samples (ms).
    let mut rounds: Vec<[f64; 4]> = Vec::new();
    for round in 0..=config.first_byte_rounds {
        let mut figures = [0.0; 4];
        let mut order = FirstBytePath::ALL.to_vec();
        order.rotate_left(round % 4);
        for path in order {
            let mut samples = Vec::with_capacity(config.samples);
            for _ in 0..config.samples {
                let took = within(SAMPLE_LIMIT, "first byte", first_byte(addr(path))).await?;
                samples.push(took.as_secs_f64() * 1e3);
                tokio::time::sleep(SAMPLE_GAP).await;
            }
            figures[path as usize] = median(samples);
        }
        if round == 0 {
            continue;
        }
        println!(
            "    round {round}: direct {:.2} ms, offload @0ms {:.2} ms, offload @{}ms {:.2} ms, ssh -L @{}ms {:.2} ms",
            figures[0],
            figures[1],
            config.rtt.as_millis(),
            figures[2],
            config.rtt.as_millis(),
            figures[3]
        );
        rounds.push(figures);
    }
    let pair = |figure: FirstBytePath, baseline: FirstBytePath| {
        let mut paired = Paired::default();
        for r in &rounds {
            paired.push(r[baseline as usize], r[figure as usize]);
        }
        paired
    };
    let ms = |v: f64| format!("{v:.2} ms");
    let at = config.rtt.as_millis();
    let wan = pair(FirstBytePath::Wan, FirstBytePath::Direct);
    let limit = rtt_ms + 2.0;
    let within_target = wan.median_difference() <= limit;
    report.paired_difference(
        &format!("first byte, new connection: offload @{at}ms vs the published port"),
        &wan,
        ms,
        format!("diff <= RTT + 2 = {limit:.1} ms"),
        Some(within_target),
    );
    report.paired_difference(
        "first byte, new connection: offload @0ms vs the published port",
        &pair(FirstBytePath::Lo, FirstBytePath::Direct),
        ms,
        "info".to_string(),
        None,
    );
    report.paired_difference(
        &format!("first byte, new connection: ssh -L @{at}ms vs the published port"),
        &pair(FirstBytePath::SshWan, FirstBytePath::Direct),
        ms,
        "info".to_string(),
        None,
    );
    report.paired(
        &format!("first byte, new connection: offload @{at}ms vs ssh -L @{at}ms"),
        &pair(FirstBytePath::Wan, FirstBytePath::SshWan),
        ms,
        Target::Info("info"),
    );
    Ok(())
}

/// Connects, sends one byte, and times until the echo's first byte comes back.
async fn first_byte(addr: SocketAddr) -> Result<Duration> {
    let started = Instant::now();
    let mut stream = TcpStream::connect(addr).await.context(format!("connecting to {addr}"))?;
    stream.set_nodelay(true).context("nodelay")?;
    echo_once(&mut stream, b'x').await?;
    Ok(started.elapsed())
}

// ---------------------------------------------------------------------------------
// Phase: throughput
// ---------------------------------------------------------------------------------

#[derive(Clone, Copy)]
enum Bulk {
    Direct,
    Offload,
    Ssh,
    Socat,
}

impl Bulk {
    const ALL: [Bulk; 4] = [Bulk::Direct, Bulk::Offload, Bulk::Ssh, Bulk::Socat];

    fn name(self) -> &'static str {
        match self {
            Bulk::Direct => "published port",
            Bulk::Offload => "offload",
            Bulk::Ssh => "ssh -L",
            Bulk::Socat => "socat",
        }
    }
}

async fn throughput_phase(config: &Config, rig: &Rig, targets: &Targets, report: &mut Report) -> Result<()> {
    let bytes = config.mib << 20;
    let warmup = config.warmup_mib << 20;
    let addr = |variant: Bulk| match variant {
        Bulk::Direct => targets.sink.direct(),
        Bulk::Offload => targets.sink.lo(),
        Bulk::Ssh => rig.ssh_lo_addr(),
        Bulk::Socat => rig.socat_addr(),
    };
    // 1 MiB of fresh pseudo-random bytes, sent over and over: nothing on these paths
    // compresses, so repeating it costs the client nothing and changes nothing.
    let mut payload = vec![0u8; 1 << 20];
    WyRand(0x0ff1_0ad5).fill(&mut payload);
    println!(
        "throughput: {} MiB per transfer into the sink, {} rounds (+1 warm-up of {} MiB per variant)",
        config.mib, config.rounds, config.warmup_mib
    );
    for variant in Bulk::ALL {
        within(
            TRANSFER_LIMIT,
            format!("warm-up through {}", variant.name()),
            push(addr(variant), warmup, &payload),
        )
        .await?;
    }
    let mut rates: Vec<[f64; 4]> = Vec::new();
    // CPU seconds of offload, ssh -L and socat during their own measured transfers.
    let mut cpu = [0.0; 3];
    // CPU seconds of the engine's userland proxies (`docker-proxy`) during each
    // variant's transfers: the agent dials the container past them.
    let mut engine_proxy_cpu = [0.0; 4];
    for round in 0..config.rounds {
        let mut figures = [0.0; 4];
        let mut order = Bulk::ALL.to_vec();
        order.rotate_left(round % 4);
        for variant in order {
            let cpu_before = rig.cpu();
            let engine_proxy_before = docker_proxy_cpu_secs();
            let took = within(
                TRANSFER_LIMIT,
                format!("{} MiB through {}", config.mib, variant.name()),
                push(addr(variant), bytes, &payload),
            )
            .await?;
            let cpu_after = rig.cpu();
            engine_proxy_cpu[variant as usize] += docker_proxy_cpu_secs() - engine_proxy_before;
            if let Some(slot) = match variant {
                Bulk::Direct => None,
                Bulk::Offload => Some(0),
                Bulk::Ssh => Some(1),
                Bulk::Socat => Some(2),
            } {
                cpu[slot] += cpu_after[slot] - cpu_before[slot];
            }
            figures[variant as usize] = megabytes_per_sec(bytes, took);
        }
        println!(
            "    round {}: published port {:.0}, offload {:.0}, ssh -L {:.0}, socat {:.0} MB/s",
            round + 1,
            figures[0],
            figures[1],
            figures[2],
            figures[3]
        );
        rates.push(figures);
    }
    let pair = |figure: Bulk, baseline: Bulk| {
        let mut paired = Paired::default();
        for r in &rates {
            paired.push(r[baseline as usize], r[figure as usize]);
        }
        paired
    };
    let mbs = |v: f64| format!("{v:.0} MB/s");
    report.paired(
        "forwarded port throughput: offload (TLS link) vs ssh -L (aes128-gcm)",
        &pair(Bulk::Offload, Bulk::Ssh),
        mbs,
        Target::AtLeast(1.2),
    );
    report.paired(
        "forwarded port throughput: offload (TLS link) vs socat",
        &pair(Bulk::Offload, Bulk::Socat),
        mbs,
        Target::AtLeast(0.6),
    );
    report.paired(
        "forwarded port throughput: offload (TLS link) vs the published port itself",
        &pair(Bulk::Offload, Bulk::Direct),
        mbs,
        Target::Info("info"),
    );
    let gb = (bytes * config.rounds as u64) as f64 / 1e9;
    report.single(
        "CPU-s per GB forwarded: offload (proxy + agent) / ssh -L (ssh + sshd) / socat",
        format!("{:.2} / {:.2} / {:.2}", cpu[0] / gb, cpu[1] / gb, cpu[2] / gb),
        "info",
        None,
    );
    let [direct, offload, ssh, socat] = engine_proxy_cpu.map(|secs| secs / gb);
    report.single(
        "CPU-s per GB in the engine's docker-proxy: published port / offload / ssh -L / socat",
        format!("{direct:.2} / {offload:.2} / {ssh:.2} / {socat:.2}"),
        "info",
        None,
    );
    Ok(())
}

/// CPU seconds of every `docker-proxy` on this machine (the engine's userland
/// proxy, one process per published port).
fn docker_proxy_cpu_secs() -> f64 {
    let Ok(entries) = std::fs::read_dir("/proc") else { return 0.0 };
    entries
        .flatten()
        .filter_map(|entry| entry.file_name().to_str().and_then(|name| name.parse::<u32>().ok()))
        .filter(|pid| {
            std::fs::read_to_string(format!("/proc/{pid}/comm"))
                .is_ok_and(|comm| comm.trim_end() == "docker-proxy")
        })
        .map(tree_cpu_secs)
        .sum()
}

/// Connects, sends `bytes` (a multiple of the sink's block), half-closes, and reads
/// the sink's report to EOF: the time runs until the sink has read everything.
async fn push(addr: SocketAddr, bytes: u64, payload: &[u8]) -> Result<Duration> {
    let started = Instant::now();
    let mut stream = TcpStream::connect(addr).await.context(format!("connecting to {addr}"))?;
    let mut left = bytes;
    while left > 0 {
        let n = left.min(payload.len() as u64) as usize;
        stream.write_all(&payload[..n]).await.context(format!("sending to {addr}"))?;
        left -= n as u64;
    }
    stream.shutdown().await.context("half-closing")?;
    let mut answer = Vec::new();
    (&mut stream).take(4096).read_to_end(&mut answer).await.context("reading the sink's report")?;
    let took = started.elapsed();
    let answer = String::from_utf8_lossy(&answer);
    let expected = format!("{}+0 records in", bytes / SINK_BLOCK);
    if !answer.lines().any(|line| line.trim() == expected) {
        return Err(format!("sent {bytes} bytes to {addr}, the sink said {:?}", answer.trim()).into());
    }
    Ok(took)
}

/// CPU seconds of a process, of its children it reaped, and of its live
/// descendants (each counted once: a reaped process is in its parent's cutime).
fn tree_cpu_secs(root: u32) -> f64 {
    // utime, stime, cutime, cstime: fields 14 to 17.
    process_tree(root).into_iter().map(|pid| stat_ticks(pid, 11..15)).sum()
}

/// The sum of some clock-tick fields of /proc/PID/stat, in seconds.
fn stat_ticks(pid: u32, fields: std::ops::Range<usize>) -> f64 {
    static TICKS: OnceLock<f64> = OnceLock::new();
    let ticks_per_sec = *TICKS.get_or_init(|| {
        Command::new("getconf")
            .arg("CLK_TCK")
            .output()
            .ok()
            .and_then(|out| String::from_utf8_lossy(&out.stdout).trim().parse().ok())
            .unwrap_or(100.0)
    });
    let ticks: u64 = stat_fields(pid)
        .map(|values| {
            values.get(fields).unwrap_or_default().iter().filter_map(|f| f.parse::<u64>().ok()).sum()
        })
        .unwrap_or(0);
    ticks as f64 / ticks_per_sec
}

// ---------------------------------------------------------------------------------
// The engine: description, image, leftovers
// ---------------------------------------------------------------------------------

async fn describe_engine(engine: &Path, report: &mut Report) -> Result<()> {
    let version = api_expect(engine, Method::GET, "/version", None, StatusCode::OK)
        .await
        .map_err(|err| format!("is the engine running at {}? {err}", engine.display()))?;
    report.note(format!(
        "engine: Docker {} (API {}) at {}",
        version["Version"].as_str().unwrap_or("?"),
        version["ApiVersion"].as_str().unwrap_or("?"),
        engine.display()
    ));
    let ssh = Command::new("ssh").arg("-V").stdin(Stdio::null()).output();
    let ssh = ssh.map(|out| String::from_utf8_lossy(&out.stderr).trim().to_string());
    let socat = Command::new("socat").arg("-V").stdin(Stdio::null()).output();
    let socat = socat.map(|out| {
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        text.lines().find(|line| line.contains("socat version")).unwrap_or("socat").trim().to_string()
    });
    report.note(format!(
        "baselines: {} (curve25519, aes128-gcm) to a private sshd on loopback; {}",
        ssh.unwrap_or_else(|_| "ssh: not found".to_string()),
        socat.unwrap_or_else(|_| "socat: not found".to_string())
    ));
    Ok(())
}

/// Removes temporary directories of killed bench runs (their processes died with
/// them: every child runs under `setpriv --pdeathsig`).
fn sweep_temp_dirs() {
    let entries = std::fs::read_dir(std::env::temp_dir()).into_iter().flatten().flatten();
    for entry in entries {
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some(rest) = name.strip_prefix(TEMP_PREFIX) else {
            continue;
        };
        let owner = rest.split('-').next().unwrap_or_default();
        if !is_running(owner) {
            let _ = std::fs::remove_dir_all(entry.path());
        }
    }
}

// ---------------------------------------------------------------------------------
// Statistics
// ---------------------------------------------------------------------------------

// ---------------------------------------------------------------------------------
// Report
// ---------------------------------------------------------------------------------

const REPORT_STYLE: Style = Style {
    columns: Columns::FigureBaseline,
    marks: ["PASS", "MISS"],
    ratio_digits: 2,
    footnote: "ratios are figure/baseline (first-byte rows: figure - baseline): the median of per-round \
               values, with a bootstrap 95% interval; figure and baseline columns are medians over rounds",
};

impl Report {
    fn rtt_row(&mut self, config: &Config, rtt: &RttFigures) {
        let measured = self.relay_rtt(config.rtt, &rtt.relay, &rtt.direct);
        self.notes.push(format!(
            "RTT = {measured:.2} ms (measured p50 through the relay) in the first-byte target below"
        ));
    }
}
