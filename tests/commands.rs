//! `offload start`, `status` and `stop` as a user runs them: the real binary,
//! the real docker CLI with the context `start` made. Each test has its own
//! runtime directory and docker config, so contexts stay private to it.

mod support;

use std::path::Path;
use std::process::{Command, Output};
use std::time::Duration;

use support::*;

const LIMIT: Duration = Duration::from_secs(60);
const IMAGE: &str = "offload-test/busybox:latest";

struct User {
    home: tempfile::TempDir,
}

impl User {
    fn new() -> User {
        let user = User { home: tempfile::tempdir().expect("tmp") };
        std::fs::create_dir_all(user.runtime_dir()).expect("runtime dir");
        user
    }

    fn runtime_dir(&self) -> std::path::PathBuf {
        self.home.path().join("run")
    }

    fn env(&self, command: &mut Command) {
        command
            .env("XDG_RUNTIME_DIR", self.runtime_dir())
            .env("DOCKER_CONFIG", self.home.path().join("docker-config"))
            .env("XDG_CONFIG_HOME", self.home.path().join("config"))
            .env_remove("OFFLOAD_CONFIG")
            .env_remove("OFFLOAD_REMOTE")
            .env_remove("OFFLOAD_IDLE_TIMEOUT")
            .env("OFFLOAD_DOCKER_CLI", DOCKER_28)
            .env_remove("DOCKER_HOST")
            .env_remove("DOCKER_CONTEXT");
    }

    fn offload(&self, args: &[&str]) -> Output {
        let mut command = Command::new(env!("CARGO_BIN_EXE_offload"));
        self.env(&mut command);
        command.args(args);
        run(command, None, LIMIT)
    }

    /// The docker CLI as this user: whatever context is current.
    fn docker(&self, args: &[&str]) -> String {
        let mut command = Command::new(DOCKER_28);
        self.env(&mut command);
        command.args(args);
        ok(run(command, None, LIMIT)).trim_end().to_string()
    }

    fn status(&self) -> serde_json::Value {
        let text = ok(self.offload(&["status", "--format", "json"]));
        serde_json::from_str(&text).unwrap_or_else(|e| panic!("{e}: {text}"))
    }
}

impl Drop for User {
    fn drop(&mut self) {
        // Whatever happened, no proxy outlives the test.
        let _ = self.offload(&["stop", "--force"]);
    }
}

fn text(output: &Output) -> String {
    String::from_utf8_lossy(&output.stdout).into_owned() + &String::from_utf8_lossy(&output.stderr)
}

#[test]
fn embedded_start_runs_the_whole_pipeline_and_stop_restores_everything() {
    ensure_images();
    let user = User::new();
    assert_eq!(user.docker(&["context", "show"]), "default");
    let started = ok(user.offload(&["start"]));
    assert!(started.contains("remote embedded"), "{started}");
    assert!(started.contains("engine ") && started.contains("linux/"), "{started}");
    assert!(started.contains("default -> offload"), "{started}");
    assert_eq!(user.docker(&["context", "show"]), "offload");

    // A bind mount through the embedded agent's sync, written back.
    let work = tempfile::tempdir().expect("tmp");
    let spec = format!("{}:/w", work.path().display());
    user.docker(&["run", "--rm", "-v", &spec, IMAGE, "sh", "-c", "echo done > /w/out"]);
    assert_eq!(std::fs::read_to_string(work.path().join("out")).unwrap_or_default(), "done\n");

    // --platform passes through (this engine's own platform here).
    let platform = user.docker(&["run", "--rm", "--platform", "linux/amd64", IMAGE, "uname", "-m"]);
    assert_eq!(platform, "x86_64");

    // A published port: the engine's own binding answers on this machine.
    let mut cleanup = Cleanup::default();
    let name = cleanup.container(&unique("web"));
    let script = "echo hello > /srv/index.html; httpd -f -p 80 -h /srv";
    user.docker(&["run", "-d", "--name", &name, "-p", "127.0.0.1::80", IMAGE, "sh", "-c", script]);
    let port = user.docker(&["port", &name, "80/tcp"]);
    let port = port.rsplit(':').next().unwrap_or_default().to_string();
    let fetched = eventually(Duration::from_secs(10), || {
        let mut command = Command::new("timeout");
        command.args(["5", "busybox", "wget", "-q", "-O", "-", &format!("http://127.0.0.1:{port}/")]);
        run(command, None, LIMIT).stdout == b"hello\n"
    });
    assert!(fetched, "no answer on port {port}");

    let status = user.status();
    assert_eq!(status["running"], true);
    assert_eq!(status["remote"], "embedded");
    assert_eq!(status["link"]["state"], "up", "{status}");
    assert!(status["link"]["round_trip_ms"].as_f64().is_some(), "{status}");
    assert!(!status["session"]["session_id"].as_str().unwrap_or("").is_empty(), "{status}");
    let containers = status["session"]["resources"]["containers"].as_array().map(Vec::len);
    assert_eq!(containers, Some(1), "the session's one container: {status}");
    assert!(status["forwards"].as_array().is_some_and(|f| f.is_empty()), "embedded: no forwards");
    let mounts = status["mounts"].as_array().cloned().unwrap_or_default();
    assert!(
        mounts.iter().any(|m| m["source"] == work.path().display().to_string() && m["files"] == 1),
        "{status}"
    );
    let pretty = ok(user.offload(&["status"]));
    assert!(pretty.contains("link: up") && pretty.contains("running containers"), "{pretty}");

    let stopped = ok(user.offload(&["stop"]));
    assert!(stopped.contains("offload stopped"), "{stopped}");
    assert!(stopped.contains("removed 1 containers"), "the session's cleanup: {stopped}");
    assert!(stopped.contains("offload -> default"), "{stopped}");
    assert_eq!(user.docker(&["context", "show"]), "default");
    assert_eq!(user.status()["running"], false);
    assert!(!user.runtime_dir().join("offload/offload.sock").exists());
    let mut command = engine();
    command.args(["inspect", &name]);
    assert!(!run(command, None, LIMIT).status.success(), "the session's container was removed");
}

#[test]
fn start_names_the_step_that_failed_and_leaves_nothing_running() {
    let user = User::new();
    let dir = tempfile::tempdir().expect("tmp");
    let nowhere = format!("unix://{}", dir.path().join("no-agent.sock").display());
    let output = user.offload(&["start", "--remote", &nowhere, "--insecure", "--timeout", "3s"]);
    assert!(!output.status.success());
    let said = text(&output);
    assert!(said.contains("reaching the remote engine") && said.contains("no-agent.sock"), "{said}");
    assert_eq!(user.status()["running"], false);
    assert_eq!(user.docker(&["context", "show"]), "default", "the context is untouched");
    assert!(!Path::new(&user.runtime_dir().join("offload/offload.sock")).exists());
}

#[test]
fn status_and_stop_when_nothing_runs() {
    let user = User::new();
    assert_eq!(user.status(), serde_json::json!({"running": false}));
    let said = ok(user.offload(&["stop"]));
    assert!(said.contains("not running"), "{said}");
}

#[test]
fn the_docker_cli_plugin_runs_the_commands() {
    ensure_images();
    let user = User::new();
    let installed = ok(user.offload(&["install-plugin"]));
    assert!(installed.contains("docker-offload"), "{installed}");
    let plugin = user.home.path().join("docker-config/cli-plugins/docker-offload");
    assert!(plugin.exists(), "{installed}");
    // The docker CLI lists it (it asked docker-cli-plugin-metadata).
    let help = user.docker(&["--help"]);
    assert!(help.contains("offload*") || help.contains("offload "), "{help}");
    let status = user.docker(&["offload", "status", "--format", "json"]);
    assert_eq!(
        serde_json::from_str::<serde_json::Value>(&status).ok(),
        Some(serde_json::json!({"running": false}))
    );
    let started = user.docker(&["offload", "start"]);
    assert!(started.contains("remote embedded"), "{started}");
    assert_eq!(user.docker(&["context", "show"]), "offload");
    assert_eq!(user.docker(&["run", "--rm", IMAGE, "echo", "via the plugin"]), "via the plugin");
    let stopped = user.docker(&["offload", "stop"]);
    assert!(stopped.contains("offload stopped"), "{stopped}");
    assert_eq!(user.docker(&["context", "show"]), "default");
}

fn diagnose(user: &User, args: &[&str]) -> (bool, String) {
    let mut all = vec!["diagnose"];
    all.extend_from_slice(args);
    let output = user.offload(&all);
    (output.status.success(), text(&output))
}

/// A TLS agent on loopback with its own CA, and that CA's directory.
fn tls_agent(dir: &Path) -> (AgentProcess, String, std::path::PathBuf) {
    let certs = dir.join("certs");
    make_certs(&certs);
    let file = |name: &str| certs.join(name).display().to_string();
    let state = dir.join("state").display().to_string();
    let args = [
        "--listen",
        "tls://127.0.0.1:0",
        "--state-dir",
        &state,
        "--tlscacert",
        &file("ca.pem"),
        "--tlscert",
        &file("server-cert.pem"),
        "--tlskey",
        &file("server-key.pem"),
    ]
    .map(String::from);
    let (agent, url) = AgentProcess::start(dir, &args);
    (agent, url, certs)
}

#[test]
fn diagnose_passes_a_good_remote_and_pinpoints_broken_ones() {
    ensure_images();
    let user = User::new();
    let dir = tempfile::tempdir().expect("tmp");
    let (_agent, url, certs) = tls_agent(dir.path());
    let flags = |certs: &Path| {
        ["ca.pem", "cert.pem", "key.pem"]
            .iter()
            .zip(["--tlscacert", "--tlscert", "--tlskey"])
            .flat_map(|(name, flag)| [flag.to_string(), certs.join(name).display().to_string()])
            .collect::<Vec<String>>()
    };
    let good = flags(&certs);
    let mut args = vec!["--remote", url.as_str()];
    args.extend(good.iter().map(String::as_str));
    let (success, said) = diagnose(&user, &args);
    assert!(success, "{said}");
    for step in ["agent port", "CA certificate", "agent", "engine", "API version", "round trip", "throughput"]
    {
        assert!(said.contains(&format!("ok   {step}:")), "{step}: {said}");
    }
    assert!(said.contains("bundle written to"), "{said}");
    let bundle =
        said.lines().find_map(|l| l.strip_prefix("bundle written to ")).and_then(|l| l.split(" (").next());
    let bundle_text = std::fs::read_to_string(bundle.unwrap_or_default()).unwrap_or_default();
    assert!(
        bundle_text.contains("offload ") && bundle_text.contains("contents not included"),
        "{bundle_text}"
    );
    assert!(!bundle_text.contains("PRIVATE KEY"), "no secrets in the bundle");

    // Wrong port: the agent port step fails and says what to check.
    let closed = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let wrong_port = format!("tls://127.0.0.1:{}", closed.local_addr().expect("addr").port());
    drop(closed);
    let mut args = vec!["--remote", wrong_port.as_str()];
    args.extend(good.iter().map(String::as_str));
    let (success, said) = diagnose(&user, &args);
    assert!(!success && said.contains("FAIL agent port"), "{said}");

    // Wrong certificate: another CA's files; the link step names the cause.
    let other = dir.path().join("other-certs");
    make_certs(&other);
    let wrong = flags(&other);
    let mut args = vec!["--remote", url.as_str()];
    args.extend(wrong.iter().map(String::as_str));
    let (success, said) = diagnose(&user, &args);
    assert!(!success && said.contains("ok   agent port") && said.contains("FAIL link"), "{said}");
    assert!(said.to_lowercase().contains("certificate"), "{said}");

    // ssh refused.
    let (success, said) = diagnose(&user, &["--remote", &wrong_port.replace("tls://", "ssh://")]);
    assert!(!success && said.contains("FAIL ssh") && said.contains("refused"), "{said}");
}

#[test]
fn the_config_file_sets_defaults_that_the_environment_and_flags_override() {
    ensure_images();
    let user = User::new();
    let config = user.home.path().join("config/offload");
    std::fs::create_dir_all(&config).expect("mkdir");
    std::fs::write(config.join("config.toml"), "idle_timeout = \"7m\"\nignore = [\"*.log\"]\n")
        .expect("write");
    ok(user.offload(&["start", "--no-context"]));
    assert_eq!(user.status()["session"]["idle_timeout_seconds"], 420.0, "from the file");
    // The file's ignore rules apply to every mount.
    let work = tempfile::tempdir().expect("tmp");
    std::fs::write(work.path().join("debug.log"), "x").expect("write");
    std::fs::write(work.path().join("keep.txt"), "x").expect("write");
    let socket = user.runtime_dir().join("offload/offload.sock");
    let mut command = Command::new(DOCKER_28);
    user.env(&mut command);
    command.env("DOCKER_HOST", format!("unix://{}", socket.display()));
    command.args(["run", "--rm", "-v", &format!("{}:/w", work.path().display()), IMAGE, "ls", "/w"]);
    assert_eq!(ok(run(command, None, LIMIT)).trim(), "keep.txt");
    ok(user.offload(&["stop", "--no-context"]));

    let mut command = Command::new(env!("CARGO_BIN_EXE_offload"));
    user.env(&mut command);
    command.env("OFFLOAD_IDLE_TIMEOUT", "9m").args(["start", "--no-context"]);
    ok(run(command, None, LIMIT));
    assert_eq!(user.status()["session"]["idle_timeout_seconds"], 540.0, "the environment wins over the file");
    ok(user.offload(&["stop", "--no-context"]));
    ok(user.offload(&["start", "--no-context", "--idle-timeout", "11m"]));
    assert_eq!(user.status()["session"]["idle_timeout_seconds"], 660.0, "a flag wins");
    ok(user.offload(&["stop", "--no-context"]));

    std::fs::write(config.join("config.toml"), "idel_timeout = \"7m\"\n").expect("write");
    let said = text(&user.offload(&["start", "--no-context"]));
    assert!(said.contains("config.toml") && said.contains("idel_timeout"), "a typo is named: {said}");
}
