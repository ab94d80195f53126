//! GPUs on a remote: the agent reads its engine's GPU support from `/info`,
//! reports it in the session answer and the status, refuses `--gpus` on an
//! engine without a GPU (this machine's), and passes GPU creates through
//! untouched on an engine with one (a fake: there is no GPU here).

mod support;

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::rt::{TokioExecutor, TokioIo};
use offload::link::protocol::{GpuFacts, SessionInfo};
use support::*;

const LIMIT: Duration = Duration::from_secs(60);

/// Runs a docker CLI command; returns (success, exit code, stdout + stderr).
fn try_docker(mut command: Command, args: &[&str]) -> (bool, Option<i32>, String) {
    command.args(args);
    let output = run(command, None, LIMIT);
    let text =
        String::from_utf8_lossy(&output.stdout).into_owned() + &String::from_utf8_lossy(&output.stderr);
    (output.status.success(), output.status.code(), text)
}

/// The proxy's status answer (the agent's session facts).
fn status(proxy: &Proxy) -> serde_json::Value {
    let response = raw_exchange(
        &proxy.socket,
        b"GET /_offload/v1/status HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
        Duration::from_secs(10),
    );
    let text = String::from_utf8_lossy(&response);
    let body = text.split_once("\r\n\r\n").map(|(_, b)| b).unwrap_or("");
    let start = body.find('{').unwrap_or(0);
    let end = body.rfind('}').map(|e| e + 1).unwrap_or(body.len());
    serde_json::from_str(&body[start..end]).unwrap_or_else(|e| panic!("status: {e}: {text}"))
}

/// Opens a session on an agent's unix socket (HTTP/2, as the proxy does) and
/// returns the agent's answer.
fn session_answer(agent_socket: &Path) -> SessionInfo {
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
    runtime.block_on(async {
        let stream = tokio::net::UnixStream::connect(agent_socket).await.expect("connect to the agent");
        let (mut sender, connection) =
            hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(stream))
                .await
                .expect("HTTP/2 handshake");
        tokio::spawn(connection);
        let request = http::Request::post("http://offload-agent/_offload/v1/session")
            .body(Full::new(Bytes::from_static(b"{}")))
            .expect("request");
        let response = sender.send_request(request).await.expect("session answer");
        assert!(response.status().is_success(), "{}", response.status());
        let body = response.into_body().collect().await.expect("answer body").to_bytes();
        serde_json::from_slice(&body)
            .unwrap_or_else(|e| panic!("session answer: {e}: {}", String::from_utf8_lossy(&body)))
    })
}

#[test]
fn gpus_on_a_remote_without_a_gpu_fail_clearly_and_the_rest_works() {
    ensure_images();
    let proxy = Proxy::start_via(Via::UnixAgent);
    let mut cleanup = Cleanup::default();
    let name = cleanup.container(&unique("gpu"));

    let (ok, code, text) = try_docker(
        proxy.docker(DOCKER_28),
        &["run", "--rm", "--name", &name, "--gpus", "all", IMAGE, "true"],
    );
    assert!(!ok, "--gpus ran on an engine without a GPU: {text}");
    assert_eq!(code, Some(125), "{text}");
    assert!(text.contains("offload: this offload remote has no GPU"), "{text}");
    assert!(text.contains("nvidia-ctk runtime configure"), "{text}");
    // Refused before the engine saw it: no container was created.
    let mut inspect = engine();
    inspect.args(["container", "inspect", &name]);
    assert!(!run(inspect, None, LIMIT).status.success(), "the refused create left a container");

    // The same with `--device nvidia.com/gpu=all` (a CDI request).
    let cdi_name = cleanup.container(&unique("gpu-cdi"));
    let (ok, _, text) = try_docker(
        proxy.docker(DOCKER_28),
        &["create", "--name", &cdi_name, "--device", "nvidia.com/gpu=all", IMAGE, "true"],
    );
    assert!(!ok && text.contains("this offload remote has no GPU"), "{text}");

    // Without --gpus nothing changes.
    let (ok, _, text) = try_docker(proxy.docker(DOCKER_28), &["run", "--rm", IMAGE, "true"]);
    assert!(ok, "a run without --gpus failed: {text}");

    let report = status(&proxy);
    assert_eq!(report["gpu"]["available"], false, "{report}");
    assert_eq!(report["gpu"]["runtimes"], serde_json::json!([]), "{report}");

    let answer = session_answer(&proxy.dir.path().join("agent.sock"));
    let gpu = answer.engine.gpu.expect("the session answer has no gpu facts");
    assert_eq!(gpu, GpuFacts { available: false, runtimes: vec![], cdi_devices: vec![] });
}

/// A fake engine with an NVIDIA runtime that records the create bodies it gets.
struct FakeGpuEngine {
    dir: tempfile::TempDir,
    socket: PathBuf,
    creates: Arc<Mutex<Vec<Vec<u8>>>>,
}

impl FakeGpuEngine {
    fn start() -> FakeGpuEngine {
        let dir = tempfile::tempdir().expect("dir");
        let socket = dir.path().join("engine.sock");
        let listener = UnixListener::bind(&socket).expect("bind the fake engine");
        let creates = Arc::new(Mutex::new(Vec::new()));
        let recorded = creates.clone();
        std::thread::spawn(move || {
            for stream in listener.incoming().map_while(Result::ok) {
                let recorded = recorded.clone();
                std::thread::spawn(move || serve(stream, &recorded));
            }
        });
        FakeGpuEngine { dir, socket, creates }
    }

    fn address(&self) -> String {
        format!("unix://{}", self.socket.display())
    }

    fn take_creates(&self) -> Vec<Vec<u8>> {
        std::mem::take(&mut *self.creates.lock().expect("creates"))
    }
}

fn serve(stream: UnixStream, creates: &Mutex<Vec<Vec<u8>>>) {
    let Ok(mut writer) = stream.try_clone() else { return };
    let mut reader = BufReader::new(stream);
    while let Some((head, body)) = read_request(&mut reader) {
        let request_line = head.lines().next().unwrap_or("").to_string();
        let mut words = request_line.split(' ');
        let method = words.next().unwrap_or("");
        let target = words.next().unwrap_or("");
        let path = target.split('?').next().unwrap_or("");
        // `/v1.47/info` and `/info` are the same endpoint.
        let path = match path.strip_prefix("/v1.") {
            Some(rest) => rest.find('/').map(|at| &rest[at..]).unwrap_or(path),
            None => path,
        };
        let (status, answer) = match (method, path) {
            ("GET" | "HEAD", "/_ping") => ("200 OK", "OK".to_string()),
            ("GET", "/version") => ("200 OK", r#"{"Version":"28.3.0","ApiVersion":"1.47","MinAPIVersion":"1.24","Os":"linux","Arch":"amd64"}"#.to_string()),
            ("GET", "/info") => ("200 OK", r#"{"ServerVersion":"28.3.0","Runtimes":{"nvidia":{"path":"nvidia-container-runtime"},"runc":{"path":"runc"}},"DefaultRuntime":"runc","CDISpecDirs":["/etc/cdi","/var/run/cdi"]}"#.to_string()),
            ("POST", "/containers/create") => {
                creates.lock().expect("creates").push(body);
                ("201 Created", r#"{"Id":"0123456789ab","Warnings":[]}"#.to_string())
            }
            ("GET", "/containers/json" | "/networks") => ("200 OK", "[]".to_string()),
            ("GET", "/volumes") => ("200 OK", r#"{"Volumes":[],"Warnings":[]}"#.to_string()),
            _ => ("404 Not Found", r#"{"message":"page not found"}"#.to_string()),
        };
        let content_type = if path == "/_ping" { "text/plain; charset=utf-8" } else { "application/json" };
        let response = format!(
            "HTTP/1.1 {status}\r\nApi-Version: 1.47\r\nOstype: linux\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\n\r\n{}",
            answer.len(),
            if method == "HEAD" { "" } else { answer.as_str() }
        );
        if writer.write_all(response.as_bytes()).is_err() {
            return;
        }
    }
}

/// One request: its head, and its body framed by Content-Length or chunked.
fn read_request(reader: &mut BufReader<UnixStream>) -> Option<(String, Vec<u8>)> {
    let mut head = String::new();
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line).ok()? == 0 {
            return None;
        }
        head.push_str(&line);
        if line == "\r\n" {
            break;
        }
    }
    let lower = head.to_ascii_lowercase();
    let mut body = Vec::new();
    if lower.contains("transfer-encoding: chunked") {
        loop {
            let mut size_line = String::new();
            reader.read_line(&mut size_line).ok()?;
            let size = usize::from_str_radix(size_line.trim(), 16).ok()?;
            let mut chunk = vec![0u8; size + 2];
            reader.read_exact(&mut chunk).ok()?;
            body.extend_from_slice(&chunk[..size]);
            if size == 0 {
                break;
            }
        }
    } else if let Some(length) = lower.lines().find_map(|l| l.strip_prefix("content-length: ")) {
        body = vec![0u8; length.trim().parse().ok()?];
        reader.read_exact(&mut body).ok()?;
    }
    Some((head, body))
}

#[test]
fn gpu_creates_pass_through_untouched_on_a_remote_with_a_gpu() {
    let engine = FakeGpuEngine::start();
    let state = engine.dir.path().join("agent-state").display().to_string();
    let agent_socket = engine.dir.path().join("agent.sock");
    let (_agent, url) = AgentProcess::start(
        engine.dir.path(),
        &[
            "--listen".into(),
            format!("unix://{}", agent_socket.display()),
            "--insecure".into(),
            "--state-dir".into(),
            state,
            "--docker".into(),
            engine.address(),
        ],
    );
    let proxy = Proxy::start_with(&["--remote", &url, "--insecure"]);
    let direct = || {
        let mut command = Command::new(DOCKER_28);
        command.env("DOCKER_HOST", engine.address()).env_remove("DOCKER_CONTEXT");
        command.env("DOCKER_CONFIG", engine.dir.path().join("docker-config"));
        command
    };

    for gpus in [
        &["--gpus", "all"][..],
        &["--gpus", "device=0,capabilities=compute"],
        &["--device", "nvidia.com/gpu=all"],
    ] {
        // What the CLI sends the engine itself, then what arrives through offload.
        let mut args = vec!["create"];
        args.extend_from_slice(gpus);
        args.extend_from_slice(&["offload-test/cuda:none", "nvidia-smi"]);
        let (ok, _, text) = try_docker(direct(), &args);
        assert!(ok, "{text}");
        let (ok, _, text) = try_docker(proxy.docker(DOCKER_28), &args);
        assert!(ok, "a GPU create on a GPU remote failed: {text}");
        let creates = engine.take_creates();
        assert_eq!(creates.len(), 2, "{gpus:?}");
        let (sent, arrived) = (String::from_utf8_lossy(&creates[0]), String::from_utf8_lossy(&creates[1]));

        let requests_of = |body: &str| {
            let value: serde_json::Value = serde_json::from_str(body).expect("create body");
            value["HostConfig"]["DeviceRequests"].clone()
        };
        let requests = requests_of(&sent);
        assert!(requests.as_array().is_some_and(|r| !r.is_empty()), "{sent}");
        assert_eq!(requests_of(&arrived), requests);
        // Byte for byte: the only change is the session label.
        let arrived_value: serde_json::Value = serde_json::from_str(&arrived).expect("arrived body");
        let session = arrived_value["Labels"]["offload.session"].as_str().expect("session label");
        let expected =
            sent.replacen(r#""Labels":{}"#, &format!(r#""Labels":{{"offload.session":"{session}"}}"#), 1);
        assert_eq!(arrived.trim_end(), expected.trim_end(), "{gpus:?}");
    }

    let report = status(&proxy);
    assert_eq!(report["gpu"]["available"], true, "{report}");
    assert_eq!(report["gpu"]["runtimes"], serde_json::json!(["nvidia"]), "{report}");
    let gpu = session_answer(&agent_socket).engine.gpu.expect("gpu facts");
    assert_eq!(gpu, GpuFacts { available: true, runtimes: vec!["nvidia".into()], cdi_devices: vec![] });
}
