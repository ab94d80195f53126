//! Benchmark harness for the link between the halves: `offload proxy` talking to a
//! remote `offload agent` over one HTTP/2 connection (mutual TLS, or ssh stdio).
//!
//! Everything runs on this machine, side by side and interleaved round by round, each
//! figure next to its baseline: the engine's own socket, Docker's own `ssh://`
//! transport, or an `ssh -L` forward. WAN latency comes from the tests' delay relay
//! (`tests/support/delay.rs`; this kernel has no netem), and the round trip it adds is
//! measured in the same run with a TCP ping-pong through an identical relay. See
//! `benches/README.md` ("Link benchmark") for what each row means.
//!
//! Run with `cargo bench --bench link`. Without `--bench` (when `cargo test
//! --all-targets` runs this target) it only prints how to run it.

#[allow(dead_code)] // the relay can also cut and freeze links; the bench only delays
#[path = "../tests/support/delay.rs"]
mod delay;

#[path = "common/relay.rs"]
mod relay;

mod common;

use std::collections::VecDeque;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitCode, ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use bytes::Bytes;
use delay::DelayRelay;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::header::CONTENT_TYPE;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpStream, UnixListener, UnixStream};

use common::engine::{
    api_expect, ensure_image, expect_status, open_connection, request, sweep_leftovers, ApiClient, Container,
};
use common::procfs::{load_average, process_tree, stat_fields};
use common::report::{Columns, Paired, Report, Row, Style, Target};
use common::stats::{megabytes_per_sec, micros, Percentiles};
use common::upload::{verify_upload, TarUpload};
use common::{env_or, guarded_command, run_bounded, sections, DOCKER_CLI};
use common::{is_running, within, Context, Result, API_HOST, DEFAULT_IMAGE};
use relay::{measure_rtt, start_relay, RttFigures};

/// Label on every container the bench creates; its value is the bench's pid, so a
/// later run can tell leftovers of a killed run from containers of a live one.
const LABEL: &str = "offload-link-bench.pid";
/// Prefix of the bench's temporary directory, followed by the bench's pid.
const TEMP_PREFIX: &str = "offload-link-bench-";
const SSHD_CANDIDATES: &[&str] = &["/usr/sbin/sshd", "/usr/local/sbin/sshd", "/sbin/sshd"];
/// `ssh` config host names: straight to the bench's sshd, or through the delay relay.
const SSH_LOOPBACK: &str = "offload-bench-lo";
const SSH_WAN: &str = "offload-bench-wan";
/// The cipher of the `ssh -L` baseline and of the ssh-stdio link (the fastest one
/// OpenSSH has on this CPU; the default chacha20-poly1305 is slower).
const SSH_CIPHER: &str = "aes128-gcm@openssh.com";
/// Name of the one file inside the uploaded tar.
const BULK_FILE: &str = "offload-link-bench.bin";
const START_TIMEOUT: Duration = Duration::from_secs(20);
const STOP_TIMEOUT: Duration = Duration::from_secs(5);

// ---------------------------------------------------------------------------------
// Configuration
// ---------------------------------------------------------------------------------

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Section {
    Ps,
    Latency,
    Bulk,
    Echo,
    Parallel,
}

impl Section {
    const ALL: [Section; 5] =
        [Section::Ps, Section::Latency, Section::Bulk, Section::Echo, Section::Parallel];

    fn parse(name: &str) -> Result<Section> {
        match name {
            "ps" => Ok(Section::Ps),
            "latency" => Ok(Section::Latency),
            "bulk" => Ok(Section::Bulk),
            "echo" => Ok(Section::Echo),
            "parallel" => Ok(Section::Parallel),
            other => {
                Err(format!("unknown section {other:?} (expected ps, latency, bulk, echo or parallel)")
                    .into())
            }
        }
    }
}

struct Config {
    binary: PathBuf,
    /// Whether this `offload agent` takes `--state-dir` (session records; without it a
    /// root agent writes them to /var/lib/offload/agent).
    state_dir_flag: bool,
    engine: PathBuf,
    image: String,
    sections: Vec<Section>,
    /// Round trip the delay relay adds.
    rtt: Duration,
    /// docker ps: measured and discarded rounds (one run of each variant per round).
    ps_rounds: usize,
    ps_warmup: usize,
    /// Latency: rounds, warm-up rounds, sequential requests per path per variant.
    rounds: usize,
    warmup_rounds: usize,
    requests: usize,
    /// Bulk: payload per upload, rounds, warm-up payload.
    bulk_mib: u64,
    bulk_rounds: usize,
    bulk_warmup_mib: u64,
    /// Echo: the upload that loads the link, the idle run's length, the interval.
    load_mib: u64,
    echo_secs: u64,
    echo_interval: Duration,
    /// Parallel: requests in flight at once, rounds.
    parallel: usize,
    parallel_rounds: usize,
    timeout: Duration,
    strict: bool,
}

impl Config {
    fn from_env(args: &[String]) -> Result<Config> {
        let binary = match std::env::var("OFFLOAD_LINK_BENCH_BINARY") {
            Ok(path) if !path.is_empty() => PathBuf::from(path),
            _ => PathBuf::from(env!("CARGO_BIN_EXE_offload")),
        };
        let state_dir_flag = Command::new(&binary)
            .args(["agent", "--help"])
            .output()
            .map(|out| String::from_utf8_lossy(&out.stdout).contains("--state-dir"))
            .context(format!("running {} agent --help", binary.display()))?;
        let config = Config {
            binary,
            state_dir_flag,
            engine: PathBuf::from(env_or("OFFLOAD_LINK_BENCH_ENGINE", "/var/run/docker.sock".to_string())?),
            image: env_or("OFFLOAD_LINK_BENCH_IMAGE", DEFAULT_IMAGE.to_string())?,
            sections: sections(args, "OFFLOAD_LINK_BENCH_ONLY", &Section::ALL, Section::parse)?,
            rtt: Duration::from_millis(env_or("OFFLOAD_LINK_BENCH_RTT_MS", 20)?),
            ps_rounds: env_or("OFFLOAD_LINK_BENCH_PS_ROUNDS", 15)?,
            ps_warmup: env_or("OFFLOAD_LINK_BENCH_PS_WARMUP", 2)?,
            rounds: env_or("OFFLOAD_LINK_BENCH_ROUNDS", 5)?,
            warmup_rounds: env_or("OFFLOAD_LINK_BENCH_WARMUP_ROUNDS", 1)?,
            requests: env_or("OFFLOAD_LINK_BENCH_REQUESTS", 1000)?,
            bulk_mib: env_or("OFFLOAD_LINK_BENCH_BULK_MIB", 1024)?,
            bulk_rounds: env_or("OFFLOAD_LINK_BENCH_BULK_ROUNDS", 3)?,
            bulk_warmup_mib: env_or("OFFLOAD_LINK_BENCH_BULK_WARMUP_MIB", 64)?,
            load_mib: env_or("OFFLOAD_LINK_BENCH_LOAD_MIB", 1024)?,
            echo_secs: env_or("OFFLOAD_LINK_BENCH_ECHO_SECS", 5)?,
            echo_interval: Duration::from_millis(env_or("OFFLOAD_LINK_BENCH_ECHO_INTERVAL_MS", 10)?),
            parallel: env_or("OFFLOAD_LINK_BENCH_PARALLEL", 64)?,
            parallel_rounds: env_or("OFFLOAD_LINK_BENCH_PARALLEL_ROUNDS", 10)?,
            timeout: Duration::from_secs(env_or("OFFLOAD_LINK_BENCH_TIMEOUT_S", 900)?),
            strict: env_or("OFFLOAD_LINK_BENCH_STRICT", 0u8)? != 0,
        };
        let positive = [
            ("OFFLOAD_LINK_BENCH_RTT_MS", config.rtt.as_millis() as u64),
            ("OFFLOAD_LINK_BENCH_PS_ROUNDS", config.ps_rounds as u64),
            ("OFFLOAD_LINK_BENCH_ROUNDS", config.rounds as u64),
            ("OFFLOAD_LINK_BENCH_REQUESTS", config.requests as u64),
            ("OFFLOAD_LINK_BENCH_BULK_MIB", config.bulk_mib),
            ("OFFLOAD_LINK_BENCH_BULK_ROUNDS", config.bulk_rounds as u64),
            ("OFFLOAD_LINK_BENCH_LOAD_MIB", config.load_mib),
            ("OFFLOAD_LINK_BENCH_ECHO_SECS", config.echo_secs),
            ("OFFLOAD_LINK_BENCH_ECHO_INTERVAL_MS", config.echo_interval.as_millis() as u64),
            ("OFFLOAD_LINK_BENCH_PARALLEL", config.parallel as u64),
            ("OFFLOAD_LINK_BENCH_PARALLEL_ROUNDS", config.parallel_rounds as u64),
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

    fn rtt_ms(&self) -> u128 {
        self.rtt.as_millis()
    }
}

// ---------------------------------------------------------------------------------
// Entry point
// ---------------------------------------------------------------------------------

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if !args.iter().any(|arg| arg == "--bench") {
        println!("link bench: skipped; run it with `cargo bench --bench link`");
        return ExitCode::SUCCESS;
    }
    let config = match Config::from_env(&args) {
        Ok(config) => config,
        Err(err) => {
            eprintln!("link bench: {err}");
            return ExitCode::FAILURE;
        }
    };
    // Two workers (this box has two cores): uploads and their connections run on
    // them while the main thread times echoes. Child processes are spawned from the
    // main thread only, so their parent-death signal fires only when the bench exits.
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("building a tokio runtime");

    let mut report = Report::new(REPORT_STYLE);
    let outcome = runtime.block_on(run_bounded(
        config.timeout,
        "OFFLOAD_LINK_BENCH_TIMEOUT_S",
        run(&config, &mut report),
    ));
    report.print(&format!("offload link bench ({})", config.binary.display()));
    // Connection tasks of the null engine and of clients may still be parked.
    runtime.shutdown_timeout(Duration::from_secs(1));
    report.exit_code(outcome, config.strict, "link bench")
}

async fn run(config: &Config, report: &mut Report) -> Result<()> {
    report.note(format!("offload binary: {}", config.binary.display()));
    report.note(format!("load average at the start: {}", load_average()));
    describe_engine(&config.engine, report).await?;
    ensure_image(&config.engine, &config.image).await?;
    sweep_leftovers(&config.engine, LABEL, "link bench").await?;
    sweep_temp_dirs();

    let mut rig = Rig::start(config).await?;
    report.note(format!(
        "link: offload proxy -> TLS (ALPN h2, mutual) -> offload agent -> {}; \
         at {} ms the proxy dials the agent through a delay relay",
        config.engine.display(),
        config.rtt_ms()
    ));
    let rtt = measure_rtt(config.rtt).await?;
    report.rtt_row(config, &rtt);
    let rtt_ms = rtt.relay.p50 / 1e6;

    let outcome = run_sections(config, &rig, rtt_ms, report).await;
    if let Err(err) = outcome {
        return Err(format!("{err}{}", rig.post_mortem()).into());
    }
    rig.stop_all(report);
    Ok(())
}

async fn run_sections(config: &Config, rig: &Rig, rtt_ms: f64, report: &mut Report) -> Result<()> {
    if config.runs(Section::Ps) {
        ps_phase(config, rig, rtt_ms, report).await?;
    }
    if config.runs(Section::Latency) {
        latency_phase(config, rig, report).await?;
    }
    if config.runs(Section::Parallel) {
        parallel_phase(config, rig, rtt_ms, report).await?;
    }
    if config.runs(Section::Echo) {
        echo_phase(config, rig, rtt_ms, report).await?;
    }
    if config.runs(Section::Bulk) {
        bulk_phase(config, rig, report).await?;
    }
    Ok(())
}

// ---------------------------------------------------------------------------------
// The rig: certificates, agents, proxies, relays, sshd, ssh -L, a null engine
// ---------------------------------------------------------------------------------

/// Everything the bench starts. Fields drop in declaration order: clients of a
/// process stop before it (proxies before agents, ssh before sshd), and the
/// temporary directory that holds sockets, keys and logs goes last.
struct Rig {
    /// Proxy over the ssh-stdio link to an agent on the null engine (bulk).
    proxy_ssh_null: Option<Daemon>,
    /// The resident agent that `offload agent --stdio` starts behind ssh.
    resident: Option<ResidentAgent>,
    /// `ssh -L` forwards to the engine and to the null engine (bulk baseline).
    ssh_forward: Option<SshForward>,
    /// Proxy over TLS through the delay relay (docker ps, echo, parallel).
    proxy_wan: Option<Daemon>,
    /// Proxy over TLS on loopback, to the real engine and to the null engine.
    proxy_lo: Option<Daemon>,
    proxy_lo_null: Option<Daemon>,
    /// Two socat relays chained over loopback TCP in front of the engine: the
    /// same two process hops as proxy and agent, with nothing else (latency).
    relay_floor: Option<RelayFloor>,
    relay_agent: Option<DelayRelay>,
    relay_ssh: Option<DelayRelay>,
    agent: Daemon,
    agent_null: Option<Daemon>,
    null_engine: Option<NullEngine>,
    sshd: Option<Sshd>,
    paths: RigPaths,
    /// Holds sockets, keys, configs and logs; removed when dropped.
    _dir: tempfile::TempDir,
}

struct RigPaths {
    /// A directory put first in PATH for the docker CLI: its `ssh` adds `-F config`.
    ssh_wrapper_dir: PathBuf,
    docker_config: PathBuf,
}

impl Rig {
    async fn start(config: &Config) -> Result<Rig> {
        let dir = tempfile::Builder::new()
            .prefix(&format!("{TEMP_PREFIX}{}-", std::process::id()))
            .tempdir()
            .context("creating a temporary directory")?;
        let root = dir.path().to_path_buf();
        let certs = root.join("certs");
        make_certs(&config.binary, &certs)?;
        let paths = RigPaths { ssh_wrapper_dir: root.join("bin"), docker_config: root.join("docker-config") };
        std::fs::create_dir_all(&paths.docker_config).context("creating the docker config dir")?;

        let wants = |sections: &[Section]| sections.iter().any(|s| config.runs(*s));
        let need_wan = wants(&[Section::Ps, Section::Echo, Section::Parallel]);
        let need_lo = wants(&[Section::Ps, Section::Latency, Section::Bulk]);
        let need_bulk = config.runs(Section::Bulk);
        let need_sshd = wants(&[Section::Ps, Section::Bulk]);

        let engine_url = format!("unix://{}", config.engine.display());
        let agent = Daemon::agent(config, &root, "agent", &engine_url).await?;
        let mut rig = Rig {
            proxy_ssh_null: None,
            resident: None,
            ssh_forward: None,
            proxy_wan: None,
            proxy_lo: None,
            proxy_lo_null: None,
            relay_floor: None,
            relay_agent: None,
            relay_ssh: None,
            agent,
            agent_null: None,
            null_engine: None,
            sshd: None,
            paths,
            _dir: dir,
        };
        let agent_addr = rig.agent.listen_addr()?;
        if need_lo {
            let proxy = Daemon::tls_proxy(config, &root, "proxy-lo", agent_addr, &certs).await?;
            rig.proxy_lo = Some(proxy);
        }
        if config.runs(Section::Latency) {
            rig.relay_floor = RelayFloor::start(&root, &config.engine).await?;
        }
        if need_wan {
            let relay = start_relay(agent_addr, config.rtt)?;
            let proxy = Daemon::tls_proxy(config, &root, "proxy-wan", relay.addr, &certs).await?;
            rig.relay_agent = Some(relay);
            rig.proxy_wan = Some(proxy);
        }
        if need_sshd {
            let sshd = Sshd::start(&root).await?;
            let relay = start_relay(sshd.addr, config.rtt)?;
            sshd.write_client_config(relay.addr)?;
            write_ssh_wrapper(&rig.paths.ssh_wrapper_dir, &sshd.client_config)?;
            rig.relay_ssh = Some(relay);
            rig.sshd = Some(sshd);
        }
        if need_bulk {
            let null = NullEngine::start(&root.join("null-engine.sock")).await?;
            let null_url = format!("unix://{}", null.path.display());
            let agent_null = Daemon::agent(config, &root, "agent-null", &null_url).await?;
            let proxy =
                Daemon::tls_proxy(config, &root, "proxy-lo-null", agent_null.listen_addr()?, &certs).await?;
            rig.null_engine = Some(null);
            rig.agent_null = Some(agent_null);
            rig.proxy_lo_null = Some(proxy);
            let sshd = rig.sshd.as_ref().ok_or("sshd is not running")?;
            let forward =
                SshForward::start(&root, sshd, &config.engine, &root.join("null-engine.sock")).await?;
            rig.ssh_forward = Some(forward);
            let mut remote_command = format!(
                "{} agent --stdio --docker unix://{}",
                config.binary.display(),
                root.join("null-engine.sock").display()
            );
            if config.state_dir_flag {
                let state_dir = root.join("state-ssh");
                remote_command.push_str(&format!(" --state-dir {}", state_dir.display()));
                rig.resident = Some(ResidentAgent { state_dir });
            }
            let proxy = Daemon::ssh_proxy(config, &root, "proxy-ssh-null", sshd, &remote_command).await?;
            rig.proxy_ssh_null = Some(proxy);
        }
        Ok(rig)
    }

    fn proxy_lo(&self) -> Result<&Daemon> {
        self.proxy_lo.as_ref().ok_or_else(|| "the loopback proxy is not running".into())
    }

    fn proxy_wan(&self) -> Result<&Daemon> {
        self.proxy_wan.as_ref().ok_or_else(|| "the WAN proxy is not running".into())
    }

    fn sshd(&self) -> Result<&Sshd> {
        self.sshd.as_ref().ok_or_else(|| "sshd is not running".into())
    }

    /// Which of the bench's processes died, with the tail of their logs.
    fn post_mortem(&mut self) -> String {
        let mut text = String::new();
        let daemons = [
            self.proxy_ssh_null.as_mut(),
            self.proxy_wan.as_mut(),
            self.proxy_lo.as_mut(),
            self.proxy_lo_null.as_mut(),
            Some(&mut self.agent),
            self.agent_null.as_mut(),
        ];
        for daemon in daemons.into_iter().flatten() {
            if let Ok(Some(status)) = daemon.exited() {
                text.push_str(&format!(
                    "\n{} exited ({status}); its log:\n{}",
                    daemon.name,
                    daemon.log_tail()
                ));
            }
        }
        text
    }

    /// Stops the proxies and agents with SIGTERM and reports how they went.
    fn stop_all(&mut self, report: &mut Report) {
        let mut outcomes = Vec::new();
        let daemons = [
            self.proxy_ssh_null.as_mut(),
            self.proxy_wan.as_mut(),
            self.proxy_lo.as_mut(),
            self.proxy_lo_null.as_mut(),
            Some(&mut self.agent),
            self.agent_null.as_mut(),
        ];
        let mut all_ok = true;
        for daemon in daemons.into_iter().flatten() {
            match daemon.stop() {
                Ok((took, status)) => {
                    all_ok &= status.success();
                    outcomes.push(format!("{} {} ms", daemon.name, took.as_millis()))
                }
                Err(err) => {
                    all_ok = false;
                    outcomes.push(format!("{}: {err}", daemon.name))
                }
            }
        }
        report.single("proxies and agents stop on SIGTERM", outcomes.join(", "), "exit 0", Some(all_ok));
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

/// A long-running child process of the bench (agent, proxy, ssh, sshd); stopped with
/// SIGTERM (then SIGKILL) on drop, together with any descendants it leaves.
struct Daemon {
    name: String,
    child: Option<Child>,
    pid: u32,
    log: PathBuf,
    socket: PathBuf,
}

impl Daemon {
    fn spawn(name: &str, mut command: Command, dir: &Path) -> Result<Daemon> {
        let log = dir.join(format!("{name}.log"));
        let output = std::fs::File::create(&log).context(format!("creating {}", log.display()))?;
        let errors = output.try_clone().context("sharing a log file")?;
        let child = command
            .stdin(Stdio::null())
            .stdout(output)
            .stderr(errors)
            .spawn()
            .context(format!("starting {name}"))?;
        Ok(Daemon {
            name: name.to_string(),
            pid: child.id(),
            child: Some(child),
            log,
            socket: PathBuf::new(),
        })
    }

    /// An agent on a fresh loopback TLS port, in front of `docker`.
    async fn agent(config: &Config, dir: &Path, name: &str, docker: &str) -> Result<Daemon> {
        let certs = dir.join("certs");
        let mut command = guarded_command(&config.binary);
        command
            .arg("agent")
            .args(["--listen", "tls://127.0.0.1:0", "--docker", docker])
            .arg("--tlscacert")
            .arg(certs.join("ca.pem"))
            .arg("--tlscert")
            .arg(certs.join("server-cert.pem"))
            .arg("--tlskey")
            .arg(certs.join("server-key.pem"))
            .env("RUST_LOG", "info");
        if config.state_dir_flag {
            command.arg("--state-dir").arg(dir.join(format!("state-{name}")));
        }
        let mut agent = Daemon::spawn(name, command, dir)?;
        let deadline = Instant::now() + START_TIMEOUT;
        while !agent.log_text().contains("offload agent ready") {
            if let Some(status) = agent.exited()? {
                return Err(
                    format!("{name} exited ({status}) before it was ready:\n{}", agent.log_tail()).into()
                );
            }
            if Instant::now() > deadline {
                return Err(
                    format!("{name} was not ready within {START_TIMEOUT:?}:\n{}", agent.log_tail()).into()
                );
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        Ok(agent)
    }

    /// The address from the agent's `offload agent ready listen=tls://...` line.
    fn listen_addr(&self) -> Result<SocketAddr> {
        let text = self.log_text();
        let line = text.lines().find(|line| line.contains("offload agent ready")).ok_or("agent not ready")?;
        let url = line.split("listen=").nth(1).and_then(|rest| rest.split_whitespace().next()).unwrap_or("");
        url.trim_start_matches("tls://").parse().context(format!("agent address in {line:?}"))
    }

    /// A proxy whose remote is the agent (or a relay in front of it) at `addr`.
    async fn tls_proxy(
        config: &Config,
        dir: &Path,
        name: &str,
        addr: SocketAddr,
        certs: &Path,
    ) -> Result<Daemon> {
        let mut command = guarded_command(&config.binary);
        command
            .arg("proxy")
            .arg(format!("--remote=tls://127.0.0.1:{}", addr.port()))
            .arg("--tlscacert")
            .arg(certs.join("ca.pem"))
            .arg("--tlscert")
            .arg(certs.join("cert.pem"))
            .arg("--tlskey")
            .arg(certs.join("key.pem"));
        Daemon::proxy(name, command, dir).await
    }

    /// A proxy whose link runs on the stdio of `ssh` to the bench's sshd (no delay).
    async fn ssh_proxy(
        config: &Config,
        dir: &Path,
        name: &str,
        sshd: &Sshd,
        remote_command: &str,
    ) -> Result<Daemon> {
        let mut command = guarded_command(&config.binary);
        command
            .arg("proxy")
            .arg(format!("--remote=ssh://{SSH_LOOPBACK}"))
            .arg("--ssh-arg=-F")
            .arg(format!("--ssh-arg={}", sshd.client_config.display()))
            .arg("--ssh-arg=-c")
            .arg(format!("--ssh-arg={SSH_CIPHER}"))
            .arg(format!("--remote-command={remote_command}"));
        Daemon::proxy(name, command, dir).await
    }

    /// Starts a proxy on `<dir>/<name>.sock` and waits until `/_ping` answers through
    /// it: the first request opens the link and its session.
    async fn proxy(name: &str, mut command: Command, dir: &Path) -> Result<Daemon> {
        let socket = dir.join(format!("{name}.sock"));
        command.arg(format!("--listen=unix://{}", socket.display())).env("RUST_LOG", "info");
        let mut proxy = Daemon::spawn(name, command, dir)?;
        proxy.socket = socket;
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            if let Some(status) = proxy.exited()? {
                return Err(
                    format!("{name} exited ({status}) before it was ready:\n{}", proxy.log_tail()).into()
                );
            }
            if proxy.socket.exists() {
                if let Ok(mut client) = ApiClient::connect(&proxy.socket).await {
                    if client.get("/_ping").await.is_ok() {
                        return Ok(proxy);
                    }
                }
            }
            if Instant::now() > deadline {
                return Err(format!(
                    "{name} did not answer /_ping within {START_TIMEOUT:?}:\n{}",
                    proxy.log_tail()
                )
                .into());
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn log_tail(&self) -> String {
        let text = self.log_text();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(20)..].join("\n")
    }

    fn exited(&mut self) -> Result<Option<ExitStatus>> {
        match self.child.as_mut() {
            Some(child) => child.try_wait().context(format!("checking {}", self.name)),
            None => Ok(None),
        }
    }

    /// SIGTERM (by `kill`, no unsafe code needed), then SIGKILL after 5 s; then the
    /// same for descendants it left behind (sshd's per-connection processes).
    fn stop(&mut self) -> Result<(Duration, ExitStatus)> {
        let mut child = self.child.take().ok_or("already stopped")?;
        let descendants = process_tree(self.pid).into_iter().skip(1).collect::<Vec<_>>();
        let started = Instant::now();
        terminate(self.pid);
        let outcome = loop {
            if let Some(status) = child.try_wait().context(format!("waiting for {}", self.name))? {
                break Ok((started.elapsed(), status));
            }
            if started.elapsed() > STOP_TIMEOUT {
                let _ = child.kill();
                let _ = child.wait();
                break Err(format!(
                    "{} did not exit within {STOP_TIMEOUT:?} of SIGTERM; killed it",
                    self.name
                ));
            }
            std::thread::sleep(Duration::from_millis(5));
        };
        for pid in descendants {
            terminate(pid);
        }
        outcome.map_err(Into::into)
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if self.child.is_some() {
            if let Err(err) = self.stop() {
                eprintln!("warning: {err}");
            }
        }
    }
}

/// The resident agent `offload agent --stdio` starts on first use: in its own process
/// group, outliving the ssh session that started it, with its pid in its state
/// directory. Stopped on drop, after the proxy (and so the ssh link) is gone.
struct ResidentAgent {
    state_dir: PathBuf,
}

impl ResidentAgent {
    /// Its pid, if it runs: only the agent of this state directory, never a recycled pid.
    fn pid(&self) -> Option<u32> {
        let text = std::fs::read_to_string(self.state_dir.join("agent.pid")).ok()?;
        let pid = text.trim().parse::<u32>().ok()?;
        let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
        String::from_utf8_lossy(&cmdline).contains(&*self.state_dir.to_string_lossy()).then_some(pid)
    }
}

impl Drop for ResidentAgent {
    fn drop(&mut self) {
        let Some(pid) = self.pid() else {
            return;
        };
        terminate(pid);
        let deadline = Instant::now() + STOP_TIMEOUT;
        while Instant::now() < deadline {
            if !alive(pid) {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        eprintln!("warning: the resident agent (pid {pid}) ignored SIGTERM; killing it");
        let _ = Command::new("kill").arg("-KILL").arg(pid.to_string()).status();
    }
}

/// A live process (a zombie waiting for its reaper counts as gone).
fn alive(pid: u32) -> bool {
    stat_fields(pid).is_some_and(|fields| !matches!(fields.first().map(String::as_str), Some("Z" | "X")))
}

/// SIGTERM to one process the bench started (or that one of its children started).
fn terminate(pid: u32) {
    if Path::new("/proc").join(pid.to_string()).exists() {
        let _ = Command::new("kill")
            .arg("-TERM")
            .arg(pid.to_string())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
    }
}

// ---------------------------------------------------------------------------------
// sshd and ssh
// ---------------------------------------------------------------------------------

/// A private OpenSSH server on a loopback port: its own host key, user key,
/// authorized_keys, known_hosts and configs in the bench's temporary directory. The
/// machine's own sshd, /etc/ssh and ~/.ssh are never read or written (`ssh -F` skips
/// both the system and the user config).
struct Sshd {
    daemon: Daemon,
    addr: SocketAddr,
    dir: PathBuf,
    client_config: PathBuf,
}

impl Sshd {
    async fn start(root: &Path) -> Result<Sshd> {
        let sshd = SSHD_CANDIDATES
            .iter()
            .map(PathBuf::from)
            .find(|p| p.is_file())
            .ok_or("no sshd found; install openssh-server")?;
        let dir = root.join("ssh");
        std::fs::create_dir_all(&dir).context("creating the ssh directory")?;
        // sshd running as root insists on its (empty) privilege separation directory.
        if !Path::new("/run/sshd").is_dir() {
            std::fs::create_dir_all("/run/sshd").context("creating /run/sshd")?;
            std::fs::set_permissions("/run/sshd", std::fs::Permissions::from_mode(0o755))
                .context("chmod /run/sshd")?;
        }
        keygen(&dir.join("host_key"))?;
        keygen(&dir.join("user_key"))?;
        let user_pub = std::fs::read_to_string(dir.join("user_key.pub")).context("reading user_key.pub")?;
        write_private(&dir.join("authorized_keys"), &user_pub)?;
        let host_pub = std::fs::read_to_string(dir.join("host_key.pub")).context("reading host_key.pub")?;
        let mut fields = host_pub.split_whitespace();
        let (Some(kind), Some(key)) = (fields.next(), fields.next()) else {
            return Err(format!("unexpected host public key {host_pub:?}").into());
        };
        write_private(&dir.join("known_hosts"), &format!("offload-bench {kind} {key}\n"))?;

        // A free port, learned by binding and letting go; retried if sshd loses a race.
        for _ in 0..3 {
            let port = std::net::TcpListener::bind("127.0.0.1:0")
                .and_then(|l| l.local_addr())
                .context("finding a free port")?
                .port();
            let config = dir.join("sshd_config");
            write_private(
                &config,
                &format!(
                    "ListenAddress 127.0.0.1:{port}\n\
                     HostKey {host_key}\n\
                     AuthorizedKeysFile {authorized_keys}\n\
                     PubkeyAuthentication yes\n\
                     PasswordAuthentication no\n\
                     KbdInteractiveAuthentication no\n\
                     PermitRootLogin prohibit-password\n\
                     StrictModes no\n\
                     UsePAM no\n\
                     PidFile none\n\
                     UseDNS no\n\
                     PrintMotd no\n\
                     PrintLastLog no\n\
                     AcceptEnv none\n\
                     PermitUserEnvironment no\n\
                     PermitUserRC no\n\
                     X11Forwarding no\n\
                     AllowAgentForwarding no\n\
                     AllowTcpForwarding yes\n\
                     AllowStreamLocalForwarding yes\n\
                     MaxStartups 100\n\
                     MaxSessions 100\n\
                     LogLevel ERROR\n",
                    host_key = dir.join("host_key").display(),
                    authorized_keys = dir.join("authorized_keys").display(),
                ),
            )?;
            let mut command = guarded_command(&sshd);
            command.arg("-D").arg("-e").arg("-f").arg(&config);
            let mut daemon = Daemon::spawn("sshd", command, &dir)?;
            let addr: SocketAddr = ([127, 0, 0, 1], port).into();
            let deadline = Instant::now() + START_TIMEOUT;
            while Instant::now() < deadline {
                if daemon.exited()?.is_some() {
                    break;
                }
                if ssh_banner(addr).await {
                    let client_config = dir.join("ssh_config");
                    return Ok(Sshd { daemon, addr, dir, client_config });
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            eprintln!("sshd on port {port} did not come up:\n{}", daemon.log_tail());
        }
        Err("could not start sshd on a loopback port".into())
    }

    /// `offload-bench-lo` reaches sshd directly; `offload-bench-wan` goes through the
    /// delay relay. A fresh connection every time (no ControlMaster), as Docker's
    /// `ssh://` transport does without user tuning.
    fn write_client_config(&self, relay: SocketAddr) -> Result<()> {
        let user = current_user()?;
        write_private(
            &self.client_config,
            &format!(
                "Host {SSH_LOOPBACK} {SSH_WAN}\n\
                 \x20 HostKeyAlias offload-bench\n\
                 \x20 User {user}\n\
                 \x20 IdentityFile {key}\n\
                 \x20 IdentitiesOnly yes\n\
                 \x20 IdentityAgent none\n\
                 \x20 PreferredAuthentications publickey\n\
                 \x20 UserKnownHostsFile {known_hosts}\n\
                 \x20 GlobalKnownHostsFile /dev/null\n\
                 \x20 StrictHostKeyChecking yes\n\
                 \x20 CheckHostIP no\n\
                 \x20 UpdateHostKeys no\n\
                 \x20 BatchMode yes\n\
                 \x20 ConnectTimeout 20\n\
                 \x20 ControlMaster no\n\
                 \x20 ControlPath none\n\
                 \x20 ForwardAgent no\n\
                 \x20 ForwardX11 no\n\
                 \x20 EscapeChar none\n\
                 \x20 LogLevel ERROR\n\
                 Host {SSH_LOOPBACK}\n\
                 \x20 HostName 127.0.0.1\n\
                 \x20 Port {direct}\n\
                 Host {SSH_WAN}\n\
                 \x20 HostName 127.0.0.1\n\
                 \x20 Port {relayed}\n",
                key = self.dir.join("user_key").display(),
                known_hosts = self.dir.join("known_hosts").display(),
                direct = self.addr.port(),
                relayed = relay.port(),
            ),
        )
    }

    /// The sshd listener and every session process under it.
    fn pids(&self) -> Vec<u32> {
        process_tree(self.daemon.pid)
    }
}

/// Whether an SSH server answers on `addr` with its version banner.
async fn ssh_banner(addr: SocketAddr) -> bool {
    let probe = async {
        let mut stream = TcpStream::connect(addr).await.ok()?;
        let mut buf = [0u8; 8];
        stream.read_exact(&mut buf).await.ok()?;
        Some(buf.starts_with(b"SSH-2.0"))
    };
    matches!(tokio::time::timeout(Duration::from_secs(2), probe).await, Ok(Some(true)))
}

fn keygen(path: &Path) -> Result<()> {
    let output = Command::new("ssh-keygen")
        .args(["-q", "-t", "ed25519", "-N", "", "-C", "offload-link-bench", "-f"])
        .arg(path)
        .stdin(Stdio::null())
        .output()
        .context("running ssh-keygen (install openssh-client)")?;
    if !output.status.success() {
        return Err(format!("ssh-keygen failed: {}", String::from_utf8_lossy(&output.stderr).trim()).into());
    }
    Ok(())
}

/// Writes a file only its owner can read (ssh refuses configs and keys others can write).
fn write_private(path: &Path, text: &str) -> Result<()> {
    std::fs::write(path, text).context(format!("writing {}", path.display()))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
        .context(format!("chmod 600 {}", path.display()))
}

fn current_user() -> Result<String> {
    let output = Command::new("id").arg("-un").stdin(Stdio::null()).output().context("running id -un")?;
    let user = String::from_utf8_lossy(&output.stdout).trim().to_string();
    if user.is_empty() {
        return Err("`id -un` printed nothing".into());
    }
    Ok(user)
}

/// The docker CLI runs `ssh` from PATH for `ssh://` hosts; this one adds our config.
fn write_ssh_wrapper(dir: &Path, config: &Path) -> Result<()> {
    std::fs::create_dir_all(dir).context("creating the ssh wrapper directory")?;
    let ssh = which("ssh").ok_or("no ssh on PATH; install openssh-client")?;
    let path = dir.join("ssh");
    std::fs::write(&path, format!("#!/bin/sh\nexec {} -F {} \"$@\"\n", ssh.display(), config.display()))
        .context("writing the ssh wrapper")?;
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).context("chmod the ssh wrapper")
}

fn which(tool: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path).map(|dir| dir.join(tool)).find(|candidate| candidate.is_file())
}

/// `socat UNIX-LISTEN → TCP` and `socat TCP-LISTEN → UNIX-CONNECT engine`: a
/// request crosses two relay processes and a loopback TCP hop, as through
/// the proxy and the agent, with no parsing, TLS or HTTP/2. Its latency is
/// the floor of any such two-process design on this machine.
struct RelayFloor {
    _front: Daemon,
    _back: Daemon,
    socket: PathBuf,
}

impl RelayFloor {
    /// `None` when socat is not installed (the floor rows are then left out).
    async fn start(dir: &Path, engine: &Path) -> Result<Option<RelayFloor>> {
        let Some(socat) = which("socat") else {
            println!("relay floor: socat not found, its rows are left out");
            return Ok(None);
        };
        let port = common::free_port()?;
        let mut command = guarded_command(&socat);
        command
            .arg(format!("TCP-LISTEN:{port},bind=127.0.0.1,reuseaddr,fork,nodelay"))
            .arg(format!("UNIX-CONNECT:{}", engine.display()));
        let back = Daemon::spawn("relay-floor-back", command, dir)?;
        let socket = dir.join("relay-floor.sock");
        let mut command = guarded_command(&socat);
        command
            .arg(format!("UNIX-LISTEN:{},fork", socket.display()))
            .arg(format!("TCP:127.0.0.1:{port},nodelay"));
        let front = Daemon::spawn("relay-floor-front", command, dir)?;
        within(Duration::from_secs(10), "the relay floor's sockets", async {
            while !socket.exists() || std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            Ok(())
        })
        .await?;
        Ok(Some(RelayFloor { _front: front, _back: back, socket }))
    }
}

/// One `ssh -N` process holding two local unix-socket forwards: to the engine and to
/// the null engine. Each upload opens its own channel on the one SSH connection.
struct SshForward {
    daemon: Daemon,
    engine: PathBuf,
    null: PathBuf,
}

impl SshForward {
    async fn start(root: &Path, sshd: &Sshd, engine: &Path, null: &Path) -> Result<SshForward> {
        let (engine_fwd, null_fwd) = (root.join("ssh-engine.sock"), root.join("ssh-null.sock"));
        let ssh = which("ssh").ok_or("no ssh on PATH")?;
        let mut command = guarded_command(&ssh);
        command
            .arg("-F")
            .arg(&sshd.client_config)
            .args(["-N", "-T", "-o", "ExitOnForwardFailure=yes", "-o", "StreamLocalBindUnlink=yes"])
            .args(["-c", SSH_CIPHER])
            .arg("-L")
            .arg(format!("{}:{}", engine_fwd.display(), engine.display()))
            .arg("-L")
            .arg(format!("{}:{}", null_fwd.display(), null.display()))
            .arg(SSH_LOOPBACK);
        let mut daemon = Daemon::spawn("ssh-forward", command, root)?;
        let deadline = Instant::now() + START_TIMEOUT;
        for socket in [&engine_fwd, &null_fwd] {
            loop {
                if let Some(status) = daemon.exited()? {
                    return Err(format!("ssh -L exited ({status}):\n{}", daemon.log_tail()).into());
                }
                if socket.exists() {
                    if let Ok(mut client) = ApiClient::connect(socket).await {
                        if client.get("/_ping").await.is_ok() {
                            break;
                        }
                    }
                }
                if Instant::now() > deadline {
                    return Err(format!(
                        "ssh -L forward {} did not work:\n{}",
                        socket.display(),
                        daemon.log_tail()
                    )
                    .into());
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
        Ok(SshForward { daemon, engine: engine_fwd, null: null_fwd })
    }
}

// ---------------------------------------------------------------------------------
// A null engine: answers /_ping and /version, drains archive uploads
// ---------------------------------------------------------------------------------

/// A tiny Docker-API-shaped server on a unix socket, so that bulk figures measure the
/// transports rather than the engine's disk writes (fuse-overlayfs here).
struct NullEngine {
    path: PathBuf,
    /// Body bytes of the last completed archive upload.
    received: Arc<AtomicU64>,
    task: tokio::task::JoinHandle<()>,
}

impl NullEngine {
    async fn start(path: &Path) -> Result<NullEngine> {
        let listener = UnixListener::bind(path).context(format!("binding {}", path.display()))?;
        let received = Arc::new(AtomicU64::new(0));
        let counter = received.clone();
        let task = tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let counter = counter.clone();
                tokio::spawn(async move {
                    let service =
                        hyper::service::service_fn(move |request| null_answer(request, counter.clone()));
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        Ok(NullEngine { path: path.to_path_buf(), received, task })
    }
}

impl Drop for NullEngine {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn null_answer(
    request: Request<Incoming>,
    received: Arc<AtomicU64>,
) -> std::result::Result<Response<Full<Bytes>>, Infallible> {
    let path = request.uri().path().to_string();
    // Strip a `/v1.41`-style version prefix.
    let route = match path.strip_prefix("/v").and_then(|rest| rest.find('/').map(|i| &rest[i..])) {
        Some(rest) if path[2..].starts_with(|c: char| c.is_ascii_digit()) => rest.to_string(),
        _ => path.clone(),
    };
    let reply = |status: StatusCode, kind: &'static str, body: Bytes| {
        let mut response = Response::new(Full::new(body));
        *response.status_mut() = status;
        response.headers_mut().insert(CONTENT_TYPE, hyper::header::HeaderValue::from_static(kind));
        response.headers_mut().insert("api-version", hyper::header::HeaderValue::from_static("1.41"));
        response.headers_mut().insert("ostype", hyper::header::HeaderValue::from_static("linux"));
        response
    };
    let response = if route == "/_ping" {
        reply(StatusCode::OK, "text/plain; charset=utf-8", Bytes::from_static(b"OK"))
    } else if route == "/version" {
        let version = json!({"Version": "null", "ApiVersion": "1.41", "MinAPIVersion": "1.12",
                             "Os": "linux", "Arch": std::env::consts::ARCH});
        reply(StatusCode::OK, "application/json", Bytes::from(version.to_string()))
    } else if request.method() == Method::PUT && route.ends_with("/archive") {
        let mut body = request.into_body();
        let mut bytes = 0u64;
        while let Some(frame) = body.frame().await {
            match frame {
                Ok(frame) => bytes += frame.data_ref().map_or(0, |data| data.len() as u64),
                Err(_) => break,
            }
        }
        received.store(bytes, Ordering::SeqCst);
        reply(StatusCode::OK, "text/plain", Bytes::new())
    } else {
        reply(
            StatusCode::NOT_FOUND,
            "application/json",
            Bytes::from(json!({"message": format!("null engine: no route {path}")}).to_string()),
        )
    };
    Ok(response)
}

// ---------------------------------------------------------------------------------
// Phase: docker ps
// ---------------------------------------------------------------------------------

#[derive(Clone, Copy)]
enum PsVariant {
    Local,
    Link0,
    LinkRtt,
    SshRtt,
}

impl PsVariant {
    const ALL: [PsVariant; 4] = [PsVariant::Local, PsVariant::Link0, PsVariant::LinkRtt, PsVariant::SshRtt];
}

async fn ps_phase(config: &Config, rig: &Rig, rtt_ms: f64, report: &mut Report) -> Result<()> {
    let hosts = [
        format!("unix://{}", config.engine.display()),
        format!("unix://{}", rig.proxy_lo()?.socket.display()),
        format!("unix://{}", rig.proxy_wan()?.socket.display()),
        format!("ssh://{SSH_WAN}"),
    ];
    rig.sshd()?;
    let path = format!(
        "{}:{}",
        rig.paths.ssh_wrapper_dir.display(),
        std::env::var("PATH").unwrap_or_else(|_| "/usr/bin:/bin".to_string())
    );
    let mut rounds: Vec<[f64; 4]> = Vec::new();
    for round in 0..config.ps_warmup + config.ps_rounds {
        let mut times = [0.0; 4];
        // Rotate the order each round so that no variant always follows another.
        for k in 0..PsVariant::ALL.len() {
            let variant = PsVariant::ALL[(round + k) % PsVariant::ALL.len()];
            let index = variant as usize;
            times[index] = docker_ps(&hosts[index], &path, &rig.paths.docker_config).await?;
        }
        if round >= config.ps_warmup {
            progress(
                &format!("docker ps round {round}"),
                format!(
                    "local {:.1} | link@0 {:.1} | link@{} {:.1} | ssh://@{} {:.1} ms",
                    times[0],
                    times[1],
                    config.rtt_ms(),
                    times[2],
                    config.rtt_ms(),
                    times[3]
                ),
            );
            rounds.push(times);
        }
    }
    let pair = |figure: PsVariant, baseline: PsVariant| Paired {
        rounds: rounds.iter().map(|r| [r[baseline as usize], r[figure as usize]]).collect(),
    };
    let ms = |v: f64| format!("{v:.1}");
    let rtt = config.rtt_ms();

    let vs_local = pair(PsVariant::LinkRtt, PsVariant::Local);
    let delta = vs_local.median_difference();
    let limit = rtt_ms + 5.0;
    report.paired_with(
        &format!("docker ps (ms): link @{rtt}ms vs local socket"),
        &vs_local,
        ms,
        format!("<= local + RTT + 5 = {:.1}", vs_local.median_baseline() + limit),
        Some(delta <= limit),
    );
    report.single(
        &format!("docker ps: link @{rtt}ms minus local, paired (ms)"),
        format!("{delta:.1}"),
        &format!("<= RTT + 5 = {limit:.1}"),
        Some(delta <= limit),
    );
    report.paired(
        &format!("docker ps (ms): link @{rtt}ms vs ssh:// @{rtt}ms"),
        &pair(PsVariant::LinkRtt, PsVariant::SshRtt),
        ms,
        Target::AtMost(0.15),
    );
    report.paired(
        "docker ps (ms): link @0ms vs local socket",
        &pair(PsVariant::Link0, PsVariant::Local),
        ms,
        Target::None,
    );
    let link_delay = pair(PsVariant::LinkRtt, PsVariant::Link0).median_difference();
    report.single(
        "docker ps: round trips over the link, (link@RTT - link@0) / RTT",
        format!("{:.2}", link_delay / rtt_ms),
        "(1 with the cached /_ping)",
        None,
    );
    report.note(format!(
        "docker ps: {} CLI runs per variant ({}), +{} warm-up rounds; ssh:// = a fresh ssh \
         (default kex/cipher) per run through the same {rtt} ms relay, remote `docker system dial-stdio`",
        config.ps_rounds, DOCKER_CLI, config.ps_warmup
    ));
    Ok(())
}

/// One `docker ps` run; returns its wall time in ms (process start to exit).
async fn docker_ps(host: &str, path: &str, docker_config: &Path) -> Result<f64> {
    let mut command = tokio::process::Command::new(DOCKER_CLI);
    command
        .arg("ps")
        .env("DOCKER_HOST", host)
        .env("DOCKER_CONFIG", docker_config)
        .env("PATH", path)
        .env_remove("DOCKER_CONTEXT")
        .env_remove("DOCKER_TLS_VERIFY")
        .env_remove("DOCKER_CERT_PATH")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    let started = Instant::now();
    let output = tokio::time::timeout(Duration::from_secs(60), command.output())
        .await
        .map_err(|_| format!("docker ps via {host} took over 60 s"))?
        .context(format!("running {DOCKER_CLI}"))?;
    let elapsed = started.elapsed();
    if !output.status.success() {
        return Err(format!(
            "docker ps via {host} failed ({}): {}",
            output.status,
            String::from_utf8_lossy(&output.stderr).trim()
        )
        .into());
    }
    Ok(elapsed.as_secs_f64() * 1e3)
}

// ---------------------------------------------------------------------------------
// Phase: API latency on loopback
// ---------------------------------------------------------------------------------

async fn latency_phase(config: &Config, rig: &Rig, report: &mut Report) -> Result<()> {
    // `/version` would time the engine running `runc --version` and friends each time.
    let container =
        Container::create(&config.engine, LABEL, json!({"Image": config.image, "Cmd": ["true"]})).await?;
    let inspect = format!("/containers/{}/json", container.id);
    let paths = ["/_ping", inspect.as_str(), "/containers/json"];
    let names = ["/_ping", "/containers/{id}/json", "/containers/json"];
    // One keep-alive connection per variant for the whole phase, as a client would:
    // the engine, the link, and (when socat is here) the two-relay floor.
    let mut clients =
        vec![ApiClient::connect(&config.engine).await?, ApiClient::connect(&rig.proxy_lo()?.socket).await?];
    if let Some(floor) = &rig.relay_floor {
        clients.push(ApiClient::connect(&floor.socket).await?);
    }
    let variants = clients.len();
    let mut p50 = [(); 3].map(|_| Paired::default());
    let mut p99 = [(); 3].map(|_| Paired::default());
    // Per path: the link against the floor, and the floor against the engine.
    let mut link_vs_floor = [(); 3].map(|_| Paired::default());
    let mut floor_vs_direct = [(); 3].map(|_| Paired::default());
    for round in 0..config.warmup_rounds + config.rounds {
        let mut figures = [[Percentiles::default(); 3]; 3];
        let mut order: Vec<usize> = (0..variants).collect();
        order.rotate_left(round % variants);
        for variant in order {
            for (p, path) in paths.iter().enumerate() {
                let samples = within(
                    Duration::from_secs(120),
                    format!("{} round {round}", names[p]),
                    clients[variant].time_gets(path, config.requests),
                )
                .await?;
                figures[p][variant] = Percentiles::of(samples);
            }
        }
        if round >= config.warmup_rounds {
            for (p, path) in names.iter().enumerate() {
                let [direct, link, floor] = figures[p];
                p50[p].push(direct.p50, link.p50);
                p99[p].push(direct.p99, link.p99);
                let mut line = format!("p50 direct {} / link {}", micros(direct.p50), micros(link.p50));
                if variants == 3 {
                    link_vs_floor[p].push(floor.p50, link.p50);
                    floor_vs_direct[p].push(direct.p50, floor.p50);
                    line.push_str(&format!(" / relay floor {}", micros(floor.p50)));
                }
                progress(&format!("latency round {round} {path}"), format!("{line} µs"));
            }
        }
    }
    for (p, path) in names.iter().enumerate() {
        let cached = if *path == "/_ping" { ", proxy's cache" } else { "" };
        report.paired(
            &format!("GET {path} p50 (µs{cached}): link @0ms vs direct socket"),
            &p50[p],
            micros,
            Target::AtMost(1.5),
        );
        report.paired(
            &format!("GET {path} p99 (µs{cached}): link @0ms vs direct socket"),
            &p99[p],
            micros,
            Target::Info("(G1: <= 2.00)"),
        );
        if variants == 3 && p > 0 {
            report.paired(
                &format!("GET {path} p50 (µs): relay floor (2 socat, TCP between) vs direct socket"),
                &floor_vs_direct[p],
                micros,
                Target::Info("info"),
            );
            report.paired(
                &format!("GET {path} p50 (µs): link @0ms vs relay floor"),
                &link_vs_floor[p],
                micros,
                Target::Info("info"),
            );
        }
    }
    report.note(format!(
        "latency: keep-alive hyper HTTP/1.1 client, {} sequential requests per path per variant per \
         round, {} rounds (+{} warm-up); /_ping is answered by the proxy from its session cache",
        config.requests, config.rounds, config.warmup_rounds
    ));
    Ok(())
}

// ---------------------------------------------------------------------------------
// Phase: 64 parallel inspects at RTT
// ---------------------------------------------------------------------------------

async fn parallel_phase(config: &Config, rig: &Rig, rtt_ms: f64, report: &mut Report) -> Result<()> {
    let container =
        Container::create(&config.engine, LABEL, json!({"Image": config.image, "Cmd": ["true"]})).await?;
    let path = format!("/containers/{}/json", container.id);
    let sockets = [config.engine.clone(), rig.proxy_wan()?.socket.clone()];
    let mut walls = Paired::default();
    let mut worst = 0.0f64;
    for round in 0..1 + config.parallel_rounds {
        let mut wall = [0.0; 2];
        let order = if round % 2 == 0 { [0, 1] } else { [1, 0] };
        for variant in order {
            let took = within(
                Duration::from_secs(60),
                "parallel inspects",
                parallel_gets(&sockets[variant], &path, config.parallel),
            )
            .await?;
            wall[variant] = took.as_secs_f64() * 1e3;
        }
        if round > 0 {
            walls.push(wall[0], wall[1]);
            worst = worst.max(wall[1]);
            progress(
                &format!("parallel round {round}"),
                format!("direct {:.1} / link {:.1} ms", wall[0], wall[1]),
            );
        }
    }
    let limit = 3.0 * rtt_ms;
    let link = walls.median_figure();
    report.paired_with(
        &format!(
            "{} parallel GET /containers/{{id}}/json, wall (ms): link @{}ms vs direct",
            config.parallel,
            config.rtt_ms()
        ),
        &walls,
        |v| format!("{v:.1}"),
        format!("<= 3 RTT = {limit:.1}"),
        Some(link <= limit),
    );
    report.single(
        "parallel inspects: slowest round over the link (ms)",
        format!("{worst:.1}"),
        &format!("(3 RTT = {limit:.1})"),
        None,
    );
    report.note(format!(
        "parallel: {} requests at once, each on its own new HTTP/1.1 connection to the proxy (one \
         HTTP/2 link behind it), timed from the first connect to the last body; {} rounds (+1 warm-up)",
        config.parallel, config.parallel_rounds
    ));
    Ok(())
}

async fn parallel_gets(socket: &Path, path: &str, count: usize) -> Result<Duration> {
    let started = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..count {
        let (socket, path) = (socket.to_path_buf(), path.to_string());
        tasks.spawn(async move {
            let mut client = ApiClient::connect(&socket).await?;
            client.get(&path).await.map(drop)
        });
    }
    while let Some(joined) = tasks.join_next().await {
        joined.context("a parallel request task")??;
    }
    Ok(started.elapsed())
}

// ---------------------------------------------------------------------------------
// Phase: interactive echo, idle and under a bulk upload on the same link
// ---------------------------------------------------------------------------------

async fn echo_phase(config: &Config, rig: &Rig, rtt_ms: f64, report: &mut Report) -> Result<()> {
    let socket = rig.proxy_wan()?.socket.clone();
    let cat = Container::create(
        &config.engine,
        LABEL,
        json!({"Image": config.image, "Cmd": ["cat"], "OpenStdin": true, "StdinOnce": false}),
    )
    .await?;
    cat.start().await?;
    let sink =
        Container::create(&config.engine, LABEL, json!({"Image": config.image, "Cmd": ["true"]})).await?;

    // The engine's own echo (direct socket, no link, no delay), then the idle link.
    let direct = timed_echo(&config.engine, &cat.id, config).await?;
    let idle = timed_echo(&socket, &cat.id, config).await?;

    // The same, while one upload of `load_mib` runs through the same proxy and link.
    let (loaded, upload_time, upload_bytes) = echo_during_upload(&socket, &cat.id, &sink.id, config).await?;
    verify_upload(&config.engine, &sink.id, BULK_FILE, config.load_mib << 20).await?;
    // And the engine's own echo while the same upload goes straight to it: what
    // the load alone (the engine writing, two busy cores) does to the tail.
    let (direct_loaded, ..) = echo_during_upload(&config.engine, &cat.id, &sink.id, config).await?;
    verify_upload(&config.engine, &sink.id, BULK_FILE, config.load_mib << 20).await?;
    let rtt = config.rtt_ms();
    let limit = rtt_ms + 15.0;
    let shown = |samples: &[u64]| {
        let figures = Percentiles::of(samples.to_vec());
        let ms = |nanos: f64| nanos / 1e6;
        (format!("{:.1} / {:.1} / {:.1}", ms(figures.p50), ms(figures.p99), ms(figures.max)), ms(figures.p99))
    };
    let rows = [
        (
            format!("echo p50/p99/max (ms): link @{rtt}ms idle (n={}) vs direct socket", idle.len()),
            &idle,
            &direct,
        ),
        (
            format!("echo p50/p99/max (ms): link @{rtt}ms during upload (n={}) vs idle", loaded.len()),
            &loaded,
            &idle,
        ),
    ];
    for (metric, samples, baseline) in rows {
        let (figure, p99) = shown(samples);
        report.row(Row {
            metric,
            figure,
            baseline: shown(baseline).0,
            ratio: "-".to_string(),
            target: format!("p99 <= RTT + 15 = {limit:.1}"),
            ok: Some(p99 <= limit),
        });
    }
    report.row(Row {
        metric: format!(
            "echo p50/p99/max (ms): direct socket during a direct upload (n={}) vs direct idle",
            direct_loaded.len()
        ),
        figure: shown(&direct_loaded).0,
        baseline: shown(&direct).0,
        ratio: "-".to_string(),
        target: "info".to_string(),
        ok: None,
    });
    report.single(
        &format!("upload on the link @{rtt}ms during the echo (MB/s)"),
        format!("{:.0}", megabytes_per_sec(upload_bytes, upload_time)),
        "-",
        None,
    );
    report.note(format!(
        "echo: 1 byte every {} ms into `cat` over POST /attach (Upgrade: tcp) through the link at {rtt} ms, \
         echo timed to its return; {} s direct and {} s over the idle link, then while a {} MiB archive \
         PUT runs on the same link",
        config.echo_interval.as_millis(),
        config.echo_secs,
        config.echo_secs,
        config.load_mib
    ));
    Ok(())
}

/// Echo samples taken through `socket` while one archive upload of `load_mib`
/// into `sink` runs through the same socket; with the upload's time and size.
async fn echo_during_upload(
    socket: &Path,
    cat: &str,
    sink: &str,
    config: &Config,
) -> Result<(Vec<u64>, Duration, u64)> {
    let stop = Arc::new(AtomicBool::new(false));
    let size = config.load_mib << 20;
    let upload_task = {
        let (socket, path, stop) = (socket.to_path_buf(), archive_path(sink), stop.clone());
        tokio::spawn(async move {
            let outcome = upload(&socket, &path, size).await;
            stop.store(true, Ordering::SeqCst);
            outcome
        })
    };
    // Let the upload open its stream and fill the windows first.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let loaded = echo_run(socket, cat, config.echo_interval, stop).await;
    let uploaded = upload_task.await.context("the upload task")?;
    let (loaded, (upload_time, upload_bytes)) = (loaded?, uploaded?);
    if loaded.len() < 50 {
        println!(
            "echo under load: only {} samples (the upload ended in {:.1} s); raise OFFLOAD_LINK_BENCH_LOAD_MIB",
            loaded.len(),
            upload_time.as_secs_f64()
        );
    }
    Ok((loaded, upload_time, upload_bytes))
}

/// An echo run of `echo_secs` seconds through `socket`.
async fn timed_echo(socket: &Path, id: &str, config: &Config) -> Result<Vec<u64>> {
    let stop = Arc::new(AtomicBool::new(false));
    let stopper = {
        let (stop, secs) = (stop.clone(), config.echo_secs);
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_secs(secs)).await;
            stop.store(true, Ordering::SeqCst);
        })
    };
    let samples = echo_run(socket, id, config.echo_interval, stop).await;
    stopper.abort();
    samples
}

/// Sends one byte every `interval` into an attach stream of `cat` until `stop`, and
/// times each byte until it comes back; nanoseconds per byte.
async fn echo_run(socket: &Path, id: &str, interval: Duration, stop: Arc<AtomicBool>) -> Result<Vec<u64>> {
    let stream = within(Duration::from_secs(20), "attach for the echo", open_attach(socket, id)).await?;
    let (mut reader, mut writer) = stream.into_split();
    let pending: Arc<Mutex<VecDeque<(u8, Instant)>>> = Arc::default();
    let writer_done = Arc::new(AtomicBool::new(false));

    let writing = {
        let (pending, writer_done) = (pending.clone(), writer_done.clone());
        async move {
            let mut ticks = tokio::time::interval(interval);
            ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            let mut sequence = 0u8;
            let outcome = loop {
                ticks.tick().await;
                if stop.load(Ordering::SeqCst) {
                    break Ok(());
                }
                if let Ok(mut queue) = pending.lock() {
                    queue.push_back((sequence, Instant::now()));
                }
                if let Err(err) = writer.write_all(&[sequence]).await {
                    break Err(format!("writing to the attach stream: {err}"));
                }
                sequence = sequence.wrapping_add(1);
            };
            writer_done.store(true, Ordering::SeqCst);
            // Keep the write side open until the reader is done: a half-close ends `cat`'s stdin.
            (outcome, writer)
        }
    };
    let reading = async {
        let mut samples = Vec::new();
        let mut buffered: Vec<u8> = Vec::new();
        let mut chunk = [0u8; 4096];
        let mut writer_done_at: Option<Instant> = None;
        loop {
            if writer_done.load(Ordering::SeqCst) {
                let done_at = *writer_done_at.get_or_insert_with(Instant::now);
                if pending.lock().map(|queue| queue.is_empty()).unwrap_or(true) {
                    return Ok(samples);
                }
                if done_at.elapsed() > Duration::from_secs(10) {
                    return Err::<Vec<u64>, String>("an echo did not come back within 10 s".to_string());
                }
            }
            // `read` is cancel-safe: a timeout loses no bytes.
            let n = match tokio::time::timeout(Duration::from_millis(100), reader.read(&mut chunk)).await {
                Err(_) => continue,
                Ok(Err(err)) => return Err(format!("reading the attach stream: {err}")),
                Ok(Ok(0)) => return Err("the attach stream closed".to_string()),
                Ok(Ok(n)) => n,
            };
            let arrived = Instant::now();
            buffered.extend_from_slice(&chunk[..n]);
            // Multiplexed stdout frames: [stream, 0, 0, 0, length (u32 BE)] + payload.
            while buffered.len() >= 8 {
                let length =
                    u32::from_be_bytes([buffered[4], buffered[5], buffered[6], buffered[7]]) as usize;
                if buffered.len() < 8 + length {
                    break;
                }
                let payload: Vec<u8> = buffered.drain(..8 + length).skip(8).collect();
                let mut queue = pending.lock().map_err(|_| "echo queue poisoned".to_string())?;
                for byte in payload {
                    match queue.pop_front() {
                        Some((sent, at)) if sent == byte => samples.push((arrived - at).as_nanos() as u64),
                        other => return Err(format!("echo out of order: got {byte}, expected {other:?}")),
                    }
                }
            }
        }
    };
    let ((written, _writer), read) = tokio::join!(writing, reading);
    written?;
    Ok(read?)
}

/// Opens `POST /attach` with an upgrade and returns the hijacked connection.
async fn open_attach(socket: &Path, id: &str) -> Result<UnixStream> {
    let mut stream =
        UnixStream::connect(socket).await.context(format!("connecting to {}", socket.display()))?;
    let request = format!(
        "POST /containers/{id}/attach?stream=1&stdin=1&stdout=1&stderr=1 HTTP/1.1\r\n\
         Host: {API_HOST}\r\nConnection: Upgrade\r\nUpgrade: tcp\r\nContent-Length: 0\r\n\r\n"
    );
    stream.write_all(request.as_bytes()).await.context("sending attach")?;
    // Byte by byte, so that nothing after the head is consumed.
    let mut head = Vec::new();
    while !head.ends_with(b"\r\n\r\n") {
        let byte = stream.read_u8().await.context("reading the attach answer")?;
        head.push(byte);
        if head.len() > 16 * 1024 {
            return Err("attach: response head too long".into());
        }
    }
    let head = String::from_utf8_lossy(&head);
    let status = head.lines().next().unwrap_or_default();
    if !status.starts_with("HTTP/1.1 101") {
        return Err(format!("attach answered {status:?}, expected 101").into());
    }
    Ok(stream)
}

// ---------------------------------------------------------------------------------
// Phase: bulk upload on loopback
// ---------------------------------------------------------------------------------

#[derive(Clone, Copy, PartialEq, Eq)]
enum BulkVariant {
    Direct,
    LinkTls,
    SshForward,
    LinkSsh,
}

impl BulkVariant {
    fn name(self) -> &'static str {
        match self {
            BulkVariant::Direct => "direct",
            BulkVariant::LinkTls => "link (TLS)",
            BulkVariant::SshForward => "ssh -L",
            BulkVariant::LinkSsh => "link (ssh)",
        }
    }
}

struct BulkTarget<'a> {
    label: &'static str,
    /// (variant, socket, pids whose CPU counts for it)
    variants: Vec<(BulkVariant, &'a Path, Vec<u32>)>,
    /// Where the archive goes: a created container, or the null engine.
    path: String,
    /// Write back dirty pages before each timed upload (the real engine writes to disk).
    flush: bool,
    verify: Verify,
}

/// How an upload is checked after the timing: the file's size in the container, or
/// the bytes the null engine counted.
enum Verify {
    Container { engine: PathBuf, id: String },
    Null(Arc<AtomicU64>),
}

impl Verify {
    async fn check(&self, size: u64) -> Result<()> {
        match self {
            Verify::Container { engine, id } => verify_upload(engine, id, BULK_FILE, size).await,
            Verify::Null(received) => {
                let got = received.load(Ordering::SeqCst);
                let want = TarUpload::new(BULK_FILE, size).total_len();
                if got == want {
                    Ok(())
                } else {
                    Err(format!("the null engine received {got} bytes, expected {want}").into())
                }
            }
        }
    }
}

async fn bulk_phase(config: &Config, rig: &Rig, report: &mut Report) -> Result<()> {
    let forward = rig.ssh_forward.as_ref().ok_or("ssh -L is not running")?;
    let null = rig.null_engine.as_ref().ok_or("the null engine is not running")?;
    let sshd_pids = rig.sshd()?.pids();
    let ssh_side = |extra: u32| {
        let mut pids = sshd_pids.clone();
        pids.push(extra);
        pids
    };
    let proxy_lo = rig.proxy_lo()?;
    let proxy_lo_null = rig.proxy_lo_null.as_ref().ok_or("the null-engine proxy is not running")?;
    let agent_null = rig.agent_null.as_ref().ok_or("the null-engine agent is not running")?;
    let proxy_ssh_null = rig.proxy_ssh_null.as_ref().ok_or("the ssh-link proxy is not running")?;

    let container =
        Container::create(&config.engine, LABEL, json!({"Image": config.image, "Cmd": ["true"]})).await?;
    let targets = [
        BulkTarget {
            label: "real engine",
            variants: vec![
                (BulkVariant::Direct, &config.engine, vec![]),
                (BulkVariant::LinkTls, &proxy_lo.socket, vec![proxy_lo.pid, rig.agent.pid]),
                (BulkVariant::SshForward, &forward.engine, ssh_side(forward.daemon.pid)),
            ],
            path: archive_path(&container.id),
            flush: true,
            verify: Verify::Container { engine: config.engine.clone(), id: container.id.clone() },
        },
        BulkTarget {
            label: "null engine",
            variants: vec![
                (BulkVariant::Direct, &null.path, vec![]),
                (BulkVariant::LinkTls, &proxy_lo_null.socket, vec![proxy_lo_null.pid, agent_null.pid]),
                (BulkVariant::SshForward, &forward.null, ssh_side(forward.daemon.pid)),
                (BulkVariant::LinkSsh, &proxy_ssh_null.socket, {
                    let mut pids = process_tree(proxy_ssh_null.pid);
                    pids.extend(sshd_pids.iter().copied());
                    pids.extend(rig.resident.as_ref().and_then(ResidentAgent::pid));
                    pids
                }),
            ],
            path: archive_path("null"),
            flush: false,
            verify: Verify::Null(null.received.clone()),
        },
    ];

    let size = config.bulk_mib << 20;
    for target in &targets {
        let count = target.variants.len();
        for (_, socket, _) in &target.variants {
            upload(socket, &target.path, config.bulk_warmup_mib << 20).await?;
        }
        let mut rates: Vec<Vec<f64>> = Vec::new();
        let mut cpu = vec![0.0; count];
        for round in 0..config.bulk_rounds {
            let mut rate = vec![0.0; count];
            for k in 0..count {
                let index = (round + k) % count;
                let (_, socket, pids) = &target.variants[index];
                if target.flush {
                    flush_dirty_pages().await?;
                }
                let cpu_before = cpu_secs(pids);
                let (elapsed, bytes) = upload(socket, &target.path, size).await?;
                cpu[index] += cpu_secs(pids) - cpu_before;
                target.verify.check(size).await?;
                rate[index] = megabytes_per_sec(bytes, elapsed);
            }
            let shown: Vec<String> = target
                .variants
                .iter()
                .zip(&rate)
                .map(|((variant, _, _), rate)| format!("{} {rate:.0}", variant.name()))
                .collect();
            progress(&format!("bulk {} round {round}", target.label), format!("{} MB/s", shown.join(" | ")));
            rates.push(rate);
        }
        let index_of = |wanted: BulkVariant| target.variants.iter().position(|(v, _, _)| *v == wanted);
        let pair = |figure: usize, baseline: usize| Paired {
            rounds: rates.iter().map(|r| [r[baseline], r[figure]]).collect(),
        };
        let mbps = |v: f64| format!("{v:.0}");
        let gigabytes = (size as f64 / 1e9) * config.bulk_rounds as f64;
        let (Some(link), Some(ssh), Some(direct)) = (
            index_of(BulkVariant::LinkTls),
            index_of(BulkVariant::SshForward),
            index_of(BulkVariant::Direct),
        ) else {
            continue;
        };
        report.paired(
            &format!(
                "archive PUT {} MiB, {} (MB/s): link (TLS) vs ssh -L {SSH_CIPHER}",
                config.bulk_mib, target.label
            ),
            &pair(link, ssh),
            mbps,
            Target::AtLeast(1.3),
        );
        report.paired(
            &format!(
                "archive PUT {} MiB, {} (MB/s): link (TLS) vs direct socket",
                config.bulk_mib, target.label
            ),
            &pair(link, direct),
            mbps,
            Target::Info("(G5: >= 0.45)"),
        );
        if let Some(link_ssh) = index_of(BulkVariant::LinkSsh) {
            report.paired(
                &format!(
                    "archive PUT {} MiB, {} (MB/s): link (ssh stdio) vs ssh -L",
                    config.bulk_mib, target.label
                ),
                &pair(link_ssh, ssh),
                mbps,
                Target::None,
            );
        }
        let per_gb = |index: usize| cpu[index] / gigabytes;
        report.row(Row {
            metric: format!("CPU-s per GB, both ends, {}: link (TLS) vs ssh -L", target.label),
            figure: format!("{:.2}", per_gb(link)),
            baseline: format!("{:.2}", per_gb(ssh)),
            ratio: format!("{:.2}", per_gb(link) / per_gb(ssh)),
            target: "-".to_string(),
            ok: None,
        });
        if let Some(link_ssh) = index_of(BulkVariant::LinkSsh) {
            report.row(Row {
                metric: format!("CPU-s per GB, both ends, {}: link (ssh stdio) vs ssh -L", target.label),
                figure: format!("{:.2}", per_gb(link_ssh)),
                baseline: format!("{:.2}", per_gb(ssh)),
                ratio: format!("{:.2}", per_gb(link_ssh) / per_gb(ssh)),
                target: "-".to_string(),
                ok: None,
            });
        }
    }
    report.note(format!(
        "bulk: chunked PUT /containers/{{id}}/archive of a tar holding {} MiB of fresh random bytes, \
         {} rounds per variant (+{} MiB warm-up), on loopback; ssh -L = one `ssh -N -c {SSH_CIPHER}` \
         with unix-socket forwards; link (ssh stdio) = the proxy's link over `ssh -c {SSH_CIPHER}` to \
         `offload agent --stdio`; CPU = proxy+agent or ssh+sshd processes, not the engine or the bench",
        config.bulk_mib, config.bulk_rounds, config.bulk_warmup_mib
    ));
    Ok(())
}

/// `sync`, outside the timing: so that no variant pays for the writeback of the
/// previous variant's upload.
async fn flush_dirty_pages() -> Result<()> {
    let status = tokio::process::Command::new("sync").status().await.context("running sync")?;
    if status.success() {
        Ok(())
    } else {
        Err(format!("sync failed: {status}").into())
    }
}

fn archive_path(id: &str) -> String {
    format!("/containers/{id}/archive?path=/tmp")
}

/// Streams a tar holding one `size`-byte file of random bytes to `path`. Returns the
/// time from sending the request to the complete response, and the body bytes sent.
async fn upload(socket: &Path, path: &str, size: u64) -> Result<(Duration, u64)> {
    let body = TarUpload::new(BULK_FILE, size);
    let body_bytes = body.total_len();
    // No Content-Length: hyper sends the body chunked, as the CLI does.
    let mut request = request(Method::PUT, path, body)?;
    request.headers_mut().insert(CONTENT_TYPE, "application/x-tar".parse().expect("static header value"));
    let limit = Duration::from_secs(120.max(size / 5_000_000));
    let mut sender = open_connection::<TarUpload>(socket).await?;
    let started = Instant::now();
    let send = async {
        let response =
            sender.send_request(request).await.context(format!("PUT {path} via {}", socket.display()))?;
        expect_status(&response, StatusCode::OK, path)?;
        response.into_body().collect().await.context("reading the upload's answer")?;
        Ok(())
    };
    within(limit, format!("uploading via {}", socket.display()), send).await?;
    Ok((started.elapsed(), body_bytes))
}

// ---------------------------------------------------------------------------------
// A minimal Engine API client
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
    Ok(())
}

/// Removes temporary directories of killed bench runs.
fn sweep_temp_dirs() {
    let entries = std::fs::read_dir(std::env::temp_dir()).into_iter().flatten().flatten();
    for entry in entries {
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some(rest) = name.strip_prefix(TEMP_PREFIX) else {
            continue;
        };
        let owner = rest.split('-').next().unwrap_or_default();
        if !is_running(owner) {
            // A killed run's resident agent outlives it; dropping the guard stops it.
            drop(ResidentAgent { state_dir: entry.path().join("state-ssh") });
            let _ = std::fs::remove_dir_all(entry.path());
        }
    }
}

// ---------------------------------------------------------------------------------
// /proc readings
// ---------------------------------------------------------------------------------

/// User + system CPU seconds of the given processes and their live descendants
/// (and of children they already reaped).
fn cpu_secs(roots: &[u32]) -> f64 {
    static TICKS: OnceLock<f64> = OnceLock::new();
    let ticks_per_sec = *TICKS.get_or_init(|| {
        Command::new("getconf")
            .arg("CLK_TCK")
            .output()
            .ok()
            .and_then(|out| String::from_utf8_lossy(&out.stdout).trim().parse().ok())
            .unwrap_or(100.0)
    });
    let mut pids: Vec<u32> = roots.iter().flat_map(|&root| process_tree(root)).collect();
    pids.sort_unstable();
    pids.dedup();
    let ticks: u64 = pids
        .into_iter()
        .filter_map(stat_fields)
        // utime, stime, cutime, cstime are fields 14-17, that is 11-14 here.
        .map(|fields| {
            fields.get(11..15).unwrap_or_default().iter().filter_map(|f| f.parse::<u64>().ok()).sum::<u64>()
        })
        .sum();
    ticks as f64 / ticks_per_sec
}

// ---------------------------------------------------------------------------------
// Statistics
// ---------------------------------------------------------------------------------

fn progress(what: &str, figures: String) {
    println!("    {what}: {figures}");
}

// ---------------------------------------------------------------------------------
// Report
// ---------------------------------------------------------------------------------

const REPORT_STYLE: Style = Style {
    columns: Columns::FigureBaseline,
    marks: ["yes", "NO"],
    ratio_digits: 2,
    footnote: "ratios are figure/baseline: the median of per-round ratios, with a bootstrap 95% interval; \
               figure and baseline columns are medians over rounds",
};

impl Report {
    fn rtt_row(&mut self, config: &Config, rtt: &RttFigures) {
        let measured = self.relay_rtt(config.rtt, &rtt.relay, &rtt.direct);
        self.notes.push(format!(
            "RTT = {measured:.2} ms (measured p50 through the relay) in every RTT-based target below"
        ));
    }
}
