//! The proxy as a process: its socket, its errors, and its shutdown.

mod support;

use std::os::unix::fs::PermissionsExt;
use std::process::{Command, Stdio};
use std::time::Duration;

use support::*;

const LIMIT: Duration = Duration::from_secs(60);

#[test]
fn socket_is_private_and_a_stale_one_is_replaced() {
    let dir = tempfile::tempdir().expect("dir");
    let socket = dir.path().join("offload.sock");
    // A socket file left behind by a proxy that died.
    drop(std::os::unix::net::UnixListener::bind(&socket).expect("stale"));
    let mut proxy = Proxy::spawn_at(dir, socket.clone(), &["--docker", ENGINE]);
    let mode = std::fs::metadata(&socket).expect("socket").permissions().mode();
    assert_eq!(mode & 0o777, 0o600);
    assert!(ping_ok(&socket));

    // A second proxy on the same path refuses to start, and the first keeps serving.
    let output = run(
        {
            let mut command = Command::new(env!("CARGO_BIN_EXE_offload"));
            command.args(["proxy", "--listen", &proxy.host()]);
            command
        },
        None,
        LIMIT,
    );
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("another process is already serving on"), "{stderr}");
    assert!(ping_ok(&socket));

    proxy.terminate();
    let status = proxy.wait_exit(Duration::from_secs(20)).expect("proxy exits");
    assert!(status.success(), "{status}");
    assert!(!socket.exists(), "socket file left behind");
}

#[test]
fn sigterm_lets_running_streams_finish() {
    ensure_images();
    let mut proxy = Proxy::start();
    let mut cleanup = Cleanup::default();
    let name = cleanup.container(&unique("drain"));
    let client = proxy
        .docker(DOCKER_28)
        .args(["run", "--name", &name, IMAGE, "sh", "-c", "sleep 2; echo finished"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("docker run");
    // Wait until the container runs, i.e. the attach and wait streams are open.
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        let mut command = engine();
        command.args(["inspect", "--format", "{{.State.Running}}", &name]);
        if run(command, None, LIMIT).stdout == b"true\n" {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "container never ran");
        std::thread::sleep(Duration::from_millis(50));
    }
    proxy.terminate();
    // New clients are turned away at once: the socket is gone.
    std::thread::sleep(Duration::from_millis(300));
    assert!(!proxy.socket.exists(), "socket still there after SIGTERM");

    let output = client.wait_with_output().expect("docker run output");
    assert_eq!(String::from_utf8_lossy(&output.stdout), "finished\n");
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    let status = proxy.wait_exit(Duration::from_secs(20)).expect("proxy exits after draining");
    assert!(status.success());
}

#[test]
fn unreachable_engine_gives_a_clear_error() {
    let dir = tempfile::tempdir().expect("dir");
    let missing = dir.path().join("no-engine.sock");
    let proxy = Proxy::start_with(&["--docker", &format!("unix://{}", missing.display())]);
    let mut command = proxy.docker(DOCKER_28);
    command.args(["ps"]);
    let output = run(command, None, LIMIT);
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("offload: cannot reach the Docker engine at unix://")
            && stderr.contains("Is it running, and is the address right?"),
        "{stderr}"
    );
    // The proxy itself is fine and answers again.
    let response =
        raw_exchange(&proxy.socket, b"GET /_ping HTTP/1.1\r\nHost: x\r\n\r\n", Duration::from_secs(5));
    let response = String::from_utf8_lossy(&response);
    assert!(response.starts_with("HTTP/1.1 502 Bad Gateway\r\n"), "{response}");
    assert!(response.contains("Content-Type: application/json"), "{response}");
}

#[test]
fn malformed_requests_get_docker_style_errors() {
    let proxy = Proxy::start();
    let response = raw_exchange(&proxy.socket, b"NOT A REQUEST\r\n\r\n", Duration::from_secs(5));
    let response = String::from_utf8_lossy(&response);
    assert!(response.starts_with("HTTP/1.1 400 Bad Request\r\n"), "{response}");
    let body = response.split_once("\r\n\r\n").map(|(_, b)| b).unwrap_or("");
    let json: serde_json::Value = serde_json::from_str(body).expect(&response);
    assert!(json["message"].as_str().is_some_and(|m| m.starts_with("offload: ")), "{body}");

    // Headers over the engine's own limit (1 MiB).
    let mut huge = b"GET /_ping HTTP/1.1\r\nHost: x\r\nX-Filler: ".to_vec();
    huge.extend(std::iter::repeat_n(b'a', 1_200_000));
    huge.extend_from_slice(b"\r\n\r\n");
    let response = raw_exchange(&proxy.socket, &huge, Duration::from_secs(5));
    let response = String::from_utf8_lossy(&response);
    assert!(response.starts_with("HTTP/1.1 431 "), "{}", &response[..response.len().min(300)]);
    assert!(response.contains("\"message\":\"offload: the request's headers are too large"), "{response}");

    // Large but legal headers (under 1 MiB) still reach the engine.
    let mut big = b"GET /_ping HTTP/1.1\r\nHost: x\r\nConnection: close\r\nX-Filler: ".to_vec();
    big.extend(std::iter::repeat_n(b'a', 500_000));
    big.extend_from_slice(b"\r\n\r\n");
    let response = raw_exchange(&proxy.socket, &big, Duration::from_secs(5));
    assert!(response.starts_with(b"HTTP/1.1 200 OK\r\n"), "{}", String::from_utf8_lossy(&response));

    // Everyone else is still served.
    assert!(ping_ok(&proxy.socket));
    let mut command = proxy.docker(DOCKER_28);
    command.args(["version", "--format", "{{.Server.APIVersion}}"]);
    assert!(!ok(run(command, None, LIMIT)).trim().is_empty());
}

#[test]
fn http_1_0_client_gets_an_http_1_0_answer() {
    let proxy = Proxy::start();
    // Sent like `printf ... | nc -U`: the request, then the write side shut.
    let mut stream = std::os::unix::net::UnixStream::connect(&proxy.socket).expect("connect");
    use std::io::{Read, Write};
    stream.write_all(b"GET /info HTTP/1.0\r\n\r\n").expect("write");
    stream.shutdown(std::net::Shutdown::Write).expect("half-close");
    stream.set_read_timeout(Some(Duration::from_secs(10))).expect("timeout");
    let mut response = Vec::new();
    stream.read_to_end(&mut response).expect("read");
    let response = String::from_utf8_lossy(&response);
    let (head, body) = response.split_once("\r\n\r\n").expect(&response);
    assert!(head.starts_with("HTTP/1.0 200 OK\r\n"), "{head}");
    assert!(!head.to_ascii_lowercase().contains("transfer-encoding"), "{head}");
    let info: serde_json::Value = serde_json::from_str(body).expect("info json");
    assert!(info["ServerVersion"].is_string(), "{body}");
}
