//! Test bed shared by the integration tests: a real proxy process on a
//! temporary socket in front of the real engine, real clients, and cleanup of
//! everything a test creates (and nothing else).
#![allow(dead_code)] // each test binary uses a different part of it

pub mod delay;
pub mod ssh;

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

pub const IMAGE: &str = "offload-test/busybox:latest";
pub const ENGINE: &str = "unix:///var/run/docker.sock";
pub const ENGINE_SOCKET: &str = "/var/run/docker.sock";
pub const DOCKER_28: &str = "/usr/local/bin/docker";
pub const DOCKER_20: &str = "/usr/bin/docker";

/// Builds the fixture images once per test binary (the script is idempotent and locked).
pub fn ensure_images() {
    static BUILT: OnceLock<()> = OnceLock::new();
    BUILT.get_or_init(|| {
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/build-images.sh");
        let output = Command::new("bash").arg(script).output().expect("run fixtures/build-images.sh");
        assert!(
            output.status.success(),
            "fixtures/build-images.sh failed: {}",
            String::from_utf8_lossy(&output.stderr)
        );
    });
}

/// A name no other test (or test run) uses; every resource name starts with `offload-test-`.
pub fn unique(what: &str) -> String {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    format!("offload-test-{what}-{}-{n}-{nanos:x}", std::process::id())
}

/// A running `offload proxy` on a private socket.
pub struct Proxy {
    /// What the proxy's upstream needs alive (an agent, an sshd). Declared
    /// first so it is dropped before `dir` (it may keep files there).
    guards: Vec<Box<dyn std::any::Any>>,
    child: Option<Child>,
    pub dir: tempfile::TempDir,
    pub socket: PathBuf,
    log: PathBuf,
}

/// Stops the resident agent that `offload agent --stdio` started, by its pid file.
struct ResidentAgent {
    pid_file: PathBuf,
}

impl Drop for ResidentAgent {
    fn drop(&mut self) {
        if let Ok(pid) = std::fs::read_to_string(&self.pid_file) {
            let _ = Command::new("kill").arg("-TERM").arg(pid.trim()).stderr(Stdio::null()).status();
        }
    }
}

/// How the proxy reaches the engine.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Via {
    /// `--docker unix:///var/run/docker.sock`
    Direct,
    /// an agent over mutual TLS on a loopback port
    TlsAgent,
    /// an agent started by a real `ssh` talking to a real `sshd`
    SshAgent,
    /// an agent on a unix socket with `--insecure`
    UnixAgent,
}

/// A running `offload agent`.
pub struct AgentProcess {
    child: Child,
    log: PathBuf,
}

impl AgentProcess {
    /// Starts an agent and returns it with the address it listens on.
    pub fn start(dir: &Path, args: &[String]) -> (AgentProcess, String) {
        let log = dir.join(format!("agent-{}.log", unique("log")));
        let log_file = std::fs::File::create(&log).expect("agent log");
        let child = Command::new(env!("CARGO_BIN_EXE_offload"))
            .arg("agent")
            .args(args)
            .env("RUST_LOG", "offload=debug,info")
            .stdout(Stdio::null())
            .stderr(log_file)
            .spawn()
            .expect("spawn offload agent");
        let mut agent = AgentProcess { child, log };
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let text = agent.log_text();
            if let Some(line) = text.lines().find(|l| l.contains("offload agent ready")) {
                let listen =
                    line.split("listen=").nth(1).unwrap_or("").split_whitespace().next().unwrap_or("");
                return (agent, listen.to_string());
            }
            if let Ok(Some(status)) = agent.child.try_wait() {
                panic!("agent exited early ({status}): {text}");
            }
            assert!(Instant::now() < deadline, "agent did not start: {text}");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// True once the agent has exited by itself.
    pub fn exited(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(Some(_)))
    }
}

impl Drop for AgentProcess {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A network namespace of the test's own (loopback up), deleted on drop.
pub struct NetNs {
    pub name: String,
}

impl NetNs {
    pub fn new() -> NetNs {
        // Namespace names are short; keep them unique per process and test.
        static COUNTER: AtomicU64 = AtomicU64::new(0);
        let name = format!("offt-{}-{}", std::process::id(), COUNTER.fetch_add(1, Ordering::Relaxed));
        for args in
            [vec!["netns", "add", &name], vec!["netns", "exec", &name, "ip", "link", "set", "lo", "up"]]
        {
            let status = Command::new("ip").args(&args).status().expect("ip");
            assert!(status.success(), "ip {args:?} failed (tests need root and iproute2)");
        }
        // The test's own clients in here take ephemeral ports; keep them out
        // of the range the engine picks published host ports from (32768 and
        // up), or a client's port can be the one a forward must listen on.
        let status = Command::new("ip")
            .args(["netns", "exec", &name, "sh", "-c"])
            .arg("echo '10000 30000' > /proc/sys/net/ipv4/ip_local_port_range")
            .status()
            .expect("ip");
        assert!(status.success(), "cannot set the namespace's ephemeral port range");
        NetNs { name }
    }

    /// A command run inside the namespace.
    pub fn command(&self, program: &str) -> Command {
        let mut command = Command::new("ip");
        command.args(["netns", "exec", &self.name, program]);
        command
    }
}

impl Drop for NetNs {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.name]).status();
    }
}

/// A directory with `ca.pem` from `ca_dir` and `cert.pem`/`key.pem` from
/// `client_dir`: a client that pins one CA but holds another CA's certificate.
pub fn client_files(ca_dir: &Path, client_dir: &Path) -> tempfile::TempDir {
    let dir = tempfile::tempdir().expect("dir");
    for (from, name) in [(ca_dir, "ca.pem"), (client_dir, "cert.pem"), (client_dir, "key.pem")] {
        std::fs::copy(from.join(name), dir.path().join(name)).expect(name);
    }
    dir
}

/// `offload certs init` into `dir`, for a TLS link on loopback.
pub fn make_certs(dir: &Path) {
    let mut command = Command::new(env!("CARGO_BIN_EXE_offload"));
    command.args(["certs", "init", "--host", "127.0.0.1", "--dir"]).arg(dir);
    ok(run(command, None, Duration::from_secs(30)));
}

impl Proxy {
    /// A proxy in front of the local engine.
    pub fn start() -> Proxy {
        Proxy::start_with(&["--docker", ENGINE])
    }

    pub fn start_with(extra: &[&str]) -> Proxy {
        let dir = tempfile::tempdir().expect("temp dir");
        let socket = dir.path().join("offload.sock");
        Proxy::spawn_at(dir, socket, extra)
    }

    pub fn spawn_at(dir: tempfile::TempDir, socket: PathBuf, extra: &[&str]) -> Proxy {
        Proxy::spawn_with(Command::new(env!("CARGO_BIN_EXE_offload")), dir, socket, extra)
    }

    /// A proxy running inside `netns`, linked to an agent on this machine
    /// through a unix socket: the only way one machine can play both sides of
    /// a port forward (the remote's loopback and the local one would collide).
    pub fn start_in_netns(netns: &NetNs) -> Proxy {
        let dir = tempfile::tempdir().expect("temp dir");
        let socket = dir.path().join("offload.sock");
        let agent_socket = dir.path().join("agent.sock");
        let state = dir.path().join("agent-state").display().to_string();
        let listen = format!("unix://{}", agent_socket.display());
        let (agent, url) = AgentProcess::start(
            dir.path(),
            &["--listen".into(), listen, "--insecure".into(), "--state-dir".into(), state],
        );
        let mut proxy = Proxy::spawn_with(
            netns.command(env!("CARGO_BIN_EXE_offload")),
            dir,
            socket,
            &["--remote", &url, "--insecure"],
        );
        proxy.guards.push(Box::new(agent));
        proxy
    }

    fn spawn_with(mut command: Command, dir: tempfile::TempDir, socket: PathBuf, extra: &[&str]) -> Proxy {
        let log = dir.path().join("proxy.log");
        let log_file = std::fs::File::create(&log).expect("log file");
        let child = command
            .arg("proxy")
            .arg("--listen")
            .arg(format!("unix://{}", socket.display()))
            .args(extra)
            .env("RUST_LOG", "offload=debug,info")
            .stdout(Stdio::null())
            .stderr(log_file)
            .spawn()
            .expect("spawn offload proxy");
        let mut proxy = Proxy { guards: Vec::new(), child: Some(child), dir, socket, log };
        proxy.wait_ready();
        proxy
    }

    /// A proxy whose upstream is reached `via` the given path.
    pub fn start_via(via: Via) -> Proxy {
        let offload = env!("CARGO_BIN_EXE_offload");
        let dir = tempfile::tempdir().expect("temp dir");
        let socket = dir.path().join("offload.sock");
        let mut guards: Vec<Box<dyn std::any::Any>> = Vec::new();
        let proxy_args: Vec<String> = match via {
            Via::Direct => vec!["--docker".into(), ENGINE.into()],
            Via::UnixAgent => {
                let agent_socket = dir.path().join("agent.sock");
                let listen = format!("unix://{}", agent_socket.display());
                let state = dir.path().join("agent-state").display().to_string();
                let (agent, url) = AgentProcess::start(
                    dir.path(),
                    &["--listen".into(), listen, "--insecure".into(), "--state-dir".into(), state],
                );
                guards.push(Box::new(agent));
                vec!["--remote".into(), url, "--insecure".into()]
            }
            Via::TlsAgent => {
                let certs = dir.path().join("certs");
                make_certs(&certs);
                let file = |name: &str| certs.join(name).display().to_string();
                let state = dir.path().join("agent-state").display().to_string();
                let agent_args = [
                    "--state-dir",
                    &state,
                    "--listen",
                    "tls://127.0.0.1:0",
                    "--tlscacert",
                    &file("ca.pem"),
                    "--tlscert",
                    &file("server-cert.pem"),
                    "--tlskey",
                    &file("server-key.pem"),
                ]
                .map(String::from);
                let (agent, url) = AgentProcess::start(dir.path(), &agent_args);
                guards.push(Box::new(agent));
                [
                    "--remote",
                    &url,
                    "--tlscacert",
                    &file("ca.pem"),
                    "--tlscert",
                    &file("cert.pem"),
                    "--tlskey",
                    &file("key.pem"),
                ]
                .map(String::from)
                .to_vec()
            }
            Via::SshAgent => {
                let remote = ssh::SshRemote::start();
                let mut args = vec!["--remote".to_string(), remote.url()];
                for arg in remote.ssh_args() {
                    args.push(format!("--ssh-arg={arg}"));
                }
                let state = dir.path().join("agent-state");
                guards.push(Box::new(ResidentAgent { pid_file: state.join("agent.pid") }));
                args.push(format!(
                    "--remote-command={offload} agent --stdio --docker {ENGINE} --state-dir {}",
                    state.display()
                ));
                // Dropped after the resident agent's guard: last in, last out.
                guards.push(Box::new(remote));
                args
            }
        };
        let args: Vec<&str> = proxy_args.iter().map(String::as_str).collect();
        let mut proxy = Proxy::spawn_at(dir, socket, &args);
        proxy.guards = guards;
        if via != Via::Direct {
            // Prove the path: the first request opens the link and a session.
            assert!(ping_ok(&proxy.socket), "no ping through {via:?}: {}", proxy.log_text());
            let log = proxy.log_text();
            assert!(log.contains("connected to the agent; new session"), "{via:?} not used: {log}");
        }
        proxy
    }

    fn wait_ready(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            if UnixStream::connect(&self.socket).is_ok() {
                return;
            }
            if let Some(child) = self.child.as_mut() {
                if let Ok(Some(status)) = child.try_wait() {
                    panic!("proxy exited early ({status}): {}", self.log_text());
                }
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        panic!("proxy did not start: {}", self.log_text());
    }

    pub fn host(&self) -> String {
        format!("unix://{}", self.socket.display())
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().map(|c| c.id()).unwrap_or(0)
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Sends SIGTERM (as a user's Ctrl-C would) without waiting.
    pub fn terminate(&self) {
        let status = Command::new("kill").arg("-TERM").arg(self.pid().to_string()).status().expect("kill");
        assert!(status.success());
    }

    /// Waits for the proxy to exit by itself, up to `limit`.
    pub fn wait_exit(&mut self, limit: Duration) -> Option<ExitStatus> {
        let child = self.child.as_mut()?;
        let deadline = Instant::now() + limit;
        while Instant::now() < deadline {
            if let Ok(Some(status)) = child.try_wait() {
                self.child = None;
                return Some(status);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        None
    }

    /// A docker CLI command aimed at this proxy.
    pub fn docker(&self, cli: &str) -> Command {
        let mut command = Command::new(cli);
        command.env("DOCKER_HOST", self.host()).env_remove("DOCKER_CONTEXT");
        command.env("DOCKER_CONFIG", self.dir.path().join("docker-config"));
        command
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// Runs a command to completion with a deadline; kills it when it overruns.
/// All of `stdin` must be taken.
pub fn run(command: Command, stdin: Option<&[u8]>, limit: Duration) -> Output {
    run_feeding(command, stdin, limit, false)
}

/// The same for a program that may stop reading its stdin early (`head -c`):
/// feeding ends at the broken pipe, as it does for `yes | ...`.
pub fn run_offering(command: Command, stdin: &[u8], limit: Duration) -> Output {
    run_feeding(command, Some(stdin), limit, true)
}

fn run_feeding(
    mut command: Command,
    stdin: Option<&[u8]>,
    limit: Duration,
    may_stop_reading: bool,
) -> Output {
    command
        .stdin(if stdin.is_some() { Stdio::piped() } else { Stdio::null() })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let description = format!("{command:?}");
    let mut child = command.spawn().unwrap_or_else(|e| panic!("spawn {description}: {e}"));
    // Fed from a thread: a program that stops reading must not stall the deadline.
    let feeder = stdin.map(|input| {
        let mut pipe = child.stdin.take().expect("stdin");
        let input = input.to_vec();
        std::thread::spawn(move || match pipe.write_all(&input) {
            Err(error) if may_stop_reading && error.kind() == std::io::ErrorKind::BrokenPipe => Ok(()),
            written => written,
        })
    });
    let stdout = child.stdout.take().expect("stdout");
    let stderr = child.stderr.take().expect("stderr");
    let out_reader = std::thread::spawn(move || read_all(stdout));
    let err_reader = std::thread::spawn(move || read_all(stderr));
    let deadline = Instant::now() + limit;
    let status = loop {
        if let Some(status) = child.try_wait().expect("wait") {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("{description} did not finish within {limit:?}");
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    if let Some(feeder) = feeder {
        feeder.join().expect("stdin feeder").expect("write stdin");
    }
    Output {
        status,
        stdout: out_reader.join().unwrap_or_default(),
        stderr: err_reader.join().unwrap_or_default(),
    }
}

fn read_all(mut reader: impl Read) -> Vec<u8> {
    let mut buffer = Vec::new();
    let _ = reader.read_to_end(&mut buffer);
    buffer
}

/// Asserts success and returns stdout as text.
pub fn ok(output: Output) -> String {
    assert!(
        output.status.success(),
        "command failed ({}):\nstdout: {}\nstderr: {}",
        output.status,
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout).into_owned()
}

/// The engine, directly (not through the proxy): for setup and cleanup.
pub fn engine() -> Command {
    let mut command = Command::new(DOCKER_28);
    command.env("DOCKER_HOST", ENGINE).env_remove("DOCKER_CONTEXT");
    command
}

/// Removes, on drop, the engine resources a test registered, directly at the engine.
#[derive(Default)]
pub struct Cleanup {
    containers: Vec<String>,
    images: Vec<String>,
    volumes: Vec<String>,
    networks: Vec<String>,
}

impl Cleanup {
    pub fn container(&mut self, name: &str) -> String {
        self.containers.push(name.to_string());
        name.to_string()
    }
    pub fn image(&mut self, name: &str) -> String {
        self.images.push(name.to_string());
        name.to_string()
    }
    pub fn volume(&mut self, name: &str) -> String {
        self.volumes.push(name.to_string());
        name.to_string()
    }
    pub fn network(&mut self, name: &str) -> String {
        self.networks.push(name.to_string());
        name.to_string()
    }
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        let quiet = |args: &[&str], names: &[String]| {
            if names.is_empty() {
                return;
            }
            let mut command = engine();
            command.args(args).args(names).stdout(Stdio::null()).stderr(Stdio::null());
            let _ = command.status();
        };
        quiet(&["rm", "-f", "-v"], &self.containers);
        quiet(&["rmi", "-f"], &self.images);
        quiet(&["volume", "rm", "-f"], &self.volumes);
        quiet(&["network", "rm"], &self.networks);
    }
}

/// Polls until `done` holds or `limit` passes; returns whether it held.
pub fn eventually(limit: Duration, mut done: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + limit;
    while Instant::now() < deadline {
        if done() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    done()
}

/// Sends raw bytes on a fresh connection and reads until the peer closes (or `limit`).
pub fn raw_exchange(socket: &Path, request: &[u8], limit: Duration) -> Vec<u8> {
    let mut stream = UnixStream::connect(socket).expect("connect");
    stream.set_read_timeout(Some(limit)).expect("timeout");
    if let Err(error) = stream.write_all(request) {
        // A peer that refuses an oversized request may answer and close
        // before reading all of it; its answer is still there to read.
        assert!(
            matches!(error.kind(), std::io::ErrorKind::BrokenPipe | std::io::ErrorKind::ConnectionReset),
            "write: {error}"
        );
    }
    let mut response = Vec::new();
    let mut chunk = [0u8; 8192];
    loop {
        match stream.read(&mut chunk) {
            Ok(0) => break,
            Ok(n) => response.extend_from_slice(&chunk[..n]),
            Err(_) => break,
        }
    }
    response
}

/// The agent's session status through the proxy (`GET /_offload/v1/status`).
pub fn agent_status(proxy: &Proxy) -> serde_json::Value {
    let response = raw_exchange(
        &proxy.socket,
        b"GET /_offload/v1/status HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
        Duration::from_secs(10),
    );
    let text = String::from_utf8_lossy(&response);
    let body = text.split_once("\r\n\r\n").map(|(_, b)| b).unwrap_or("");
    // The answer may be chunked: take the JSON object inside.
    let start = body.find('{').unwrap_or(0);
    let end = body.rfind('}').map(|e| e + 1).unwrap_or(body.len());
    serde_json::from_str(&body[start..end]).unwrap_or_else(|e| panic!("status: {e}: {text}"))
}

/// A `GET /_ping` through `socket` succeeds: the proxy is still serving.
pub fn ping_ok(socket: &Path) -> bool {
    let response = raw_exchange(
        socket,
        b"GET /_ping HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
        Duration::from_secs(10),
    );
    response.starts_with(b"HTTP/1.1 200") && response.ends_with(b"OK")
}
