//! Published ports answer on this machine. The proxy runs in a network
//! namespace of the test's own, linked to an agent here through a unix
//! socket, so its loopback and the "remote" one are distinct; connections are
//! made from inside the namespace, and remote-side checks ask the engine.

mod support;

use std::process::{Child, Command, Stdio};
use std::time::Duration;

use support::*;

const LIMIT: Duration = Duration::from_secs(60);
/// A web server that answers with its own container name.
const HTTPD: &str = "hostname > /srv/index.html; exec httpd -f -p 80 -h /srv";

fn docker(proxy: &Proxy, args: &[&str]) -> String {
    let mut command = proxy.docker(DOCKER_28);
    command.args(args);
    ok(run(command, None, LIMIT))
}

/// An HTTP GET from inside the namespace; the body, or None on any failure.
fn fetch(netns: &NetNs, port: u16) -> Option<String> {
    try_fetch(netns, port).ok()
}

/// An HTTP GET from inside the namespace; the body, or what wget said.
fn try_fetch(netns: &NetNs, port: u16) -> Result<String, String> {
    // (busybox's own `wget -T` crashes in Debian's static build; `timeout` bounds it.)
    let mut command = netns.command("timeout");
    command.args(["10", "busybox", "wget", "-q", "-O", "-", &format!("http://127.0.0.1:{port}/")]);
    let output = run(command, None, LIMIT);
    match output.status.success() {
        true => Ok(String::from_utf8_lossy(&output.stdout).into_owned()),
        false => Err(String::from_utf8_lossy(&output.stderr).into_owned()),
    }
}

fn host_port(proxy: &Proxy, container: &str, port: &str) -> u16 {
    let out = docker(proxy, &["port", container, port]);
    let first = out.lines().next().unwrap_or_default();
    first
        .rsplit(':')
        .next()
        .and_then(|p| p.trim().parse().ok())
        .unwrap_or_else(|| panic!("no port in {out:?}"))
}

fn short_id(proxy: &Proxy, container: &str) -> String {
    docker(proxy, &["inspect", "--format", "{{.Config.Hostname}}", container]).trim().to_string()
}

#[test]
fn a_published_port_answers_as_soon_as_run_returns() {
    ensure_images();
    let netns = NetNs::new();
    let proxy = Proxy::start_in_netns(&netns);
    let mut refused = 0;
    for round in 0..100 {
        let mut cleanup = Cleanup::default();
        let name = cleanup.container(&unique(&format!("web{round}")));
        docker(&proxy, &["run", "-d", "--name", &name, "-p", "80", IMAGE, "sh", "-c", HTTPD]);
        let port = host_port(&proxy, &name, "80/tcp");
        // The local listener must exist the moment `run -d` returns: a refused
        // connection means it did not. (httpd itself may need a moment to
        // listen inside the container; that shows as a reset, so retry those.)
        if let Err(said) = try_fetch(&netns, port) {
            if said.contains("refused") {
                refused += 1;
            }
        }
        if !eventually(Duration::from_secs(10), || fetch(&netns, port).is_some()) {
            let log = proxy.log_text();
            let tail: Vec<&str> = log.lines().rev().take(40).collect::<Vec<_>>().into_iter().rev().collect();
            panic!("round {round}: no answer on {port}: {:?}\n{}", try_fetch(&netns, port), tail.join("\n"));
        }
        docker(&proxy, &["rm", "-f", &name]);
    }
    assert_eq!(refused, 0, "{refused} of 100 runs had no answer on their published port");
}

#[test]
fn fixed_random_all_and_ranged_ports() {
    ensure_images();
    let netns = NetNs::new();
    let proxy = Proxy::start_in_netns(&netns);
    let mut cleanup = Cleanup::default();

    let fixed = cleanup.container(&unique("fixed"));
    let fixed_port = free_port();
    docker(
        &proxy,
        &["run", "-d", "--name", &fixed, "-p", &format!("0.0.0.0:{fixed_port}:80"), IMAGE, "sh", "-c", HTTPD],
    );
    let all = cleanup.container(&unique("all"));
    docker(&proxy, &["run", "-d", "--name", &all, "--expose", "80", "-P", IMAGE, "sh", "-c", HTTPD]);
    let ranged = cleanup.container(&unique("ranged"));
    let base = free_port();
    let range = format!("{base}-{}:80", base + 5);
    docker(&proxy, &["run", "-d", "--name", &ranged, "-p", &range, IMAGE, "sh", "-c", HTTPD]);

    for (name, port) in [
        (&fixed, fixed_port),
        (&all, host_port(&proxy, &all, "80/tcp")),
        (&ranged, host_port(&proxy, &ranged, "80/tcp")),
    ] {
        let hostname = short_id(&proxy, name);
        assert!(
            eventually(Duration::from_secs(10), || fetch(&netns, port).is_some_and(|b| b.trim() == hostname)),
            "{name} on {port}"
        );
        // On the remote side the port is bound to loopback only, even for 0.0.0.0.
        let mut command = engine();
        command.args([
            "inspect",
            "--format",
            "{{range $p, $b := .NetworkSettings.Ports}}{{range $b}}{{.HostIp}} {{end}}{{end}}",
            name,
        ]);
        let addresses = ok(run(command, None, LIMIT));
        assert!(
            !addresses.trim().is_empty() && addresses.split_whitespace().all(|a| a == "127.0.0.1"),
            "{addresses}"
        );
    }
    let ranged_port = host_port(&proxy, &ranged, "80/tcp");
    assert!((base..=base + 5).contains(&ranged_port), "{ranged_port} outside {range}");

    // Stopping closes the local listener.
    docker(&proxy, &["stop", "-t", "0", &fixed]);
    assert!(fetch(&netns, fixed_port).is_none(), "the forward outlived its container");
}

/// A port that is free on this machine right now (the kernel picks it).
fn free_port() -> u16 {
    loop {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let port = listener.local_addr().expect("addr").port();
        // Leave room for a small range above it.
        if port < 60000 {
            return port;
        }
    }
}

#[test]
fn a_container_restarted_by_its_policy_gets_its_forward_back() {
    ensure_images();
    let netns = NetNs::new();
    let proxy = Proxy::start_in_netns(&netns);
    let mut cleanup = Cleanup::default();
    let name = cleanup.container(&unique("phoenix"));
    let port = free_port();
    // Serves for 3 s, then fails; the engine restarts it (not this proxy).
    let script = "hostname > /srv/index.html; httpd -p 80 -h /srv; sleep 3; exit 1";
    docker(
        &proxy,
        &[
            "run",
            "-d",
            "--name",
            &name,
            "--restart",
            "on-failure",
            "-p",
            &format!("{port}:80"),
            IMAGE,
            "sh",
            "-c",
            script,
        ],
    );
    assert!(eventually(Duration::from_secs(10), || fetch(&netns, port).is_some()));
    let restarted = eventually(Duration::from_secs(20), || {
        let mut command = engine();
        command.args(["inspect", "--format", "{{.RestartCount}}", &name]);
        ok(run(command, None, LIMIT)).trim().parse::<u32>().unwrap_or(0) >= 1
    });
    assert!(restarted, "the engine did not restart the container");
    assert!(
        eventually(Duration::from_secs(10), || fetch(&netns, port).is_some()),
        "no forward after the restart: {}",
        proxy.log_text()
    );
}

#[test]
fn a_taken_local_port_does_not_fail_the_container() {
    ensure_images();
    let netns = NetNs::new();
    let proxy = Proxy::start_in_netns(&netns);
    let mut cleanup = Cleanup::default();
    let port = free_port();
    // Something on "this machine" (the namespace) already listens there.
    let mut squatter: Child = netns
        .command("busybox")
        .args(["nc", "-l", "-p", &port.to_string()])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .spawn()
        .expect("nc");
    std::thread::sleep(Duration::from_millis(300));
    let name = cleanup.container(&unique("taken"));
    docker(&proxy, &["run", "-d", "--name", &name, "-p", &format!("{port}:80"), IMAGE, "sh", "-c", HTTPD]);
    let mut command = engine();
    command.args(["inspect", "--format", "{{.State.Running}}", &name]);
    assert_eq!(ok(run(command, None, LIMIT)), "true\n");
    assert!(
        eventually(Duration::from_secs(5), || proxy
            .log_text()
            .contains("cannot listen for a published port")),
        "{}",
        proxy.log_text()
    );
    let _ = squatter.kill();
    let _ = squatter.wait();
    assert!(eventually(Duration::from_secs(15), || fetch(&netns, port).is_some()), "the forward never came");
}

#[test]
fn compose_services_publish_their_ports() {
    ensure_images();
    let netns = NetNs::new();
    let proxy = Proxy::start_in_netns(&netns);
    let project = unique("ports");
    let dir = tempfile::tempdir().expect("dir");
    let (first, second) = (free_port(), free_port());
    std::fs::write(
        dir.path().join("docker-compose.yml"),
        format!(
            "version: '2.4'\nservices:\n  a:\n    image: {IMAGE}\n    command: ['sh', '-c', '{HTTPD}']\n    ports: ['{first}:80']\n  b:\n    image: {IMAGE}\n    command: ['sh', '-c', '{HTTPD}']\n    ports: ['{second}:80']\n"
        ),
    )
    .expect("compose file");
    let compose = |args: &[&str]| {
        let mut command = Command::new("docker-compose");
        command.arg("-p").arg(&project).args(args).current_dir(dir.path()).env("DOCKER_HOST", proxy.host());
        run(command, None, LIMIT)
    };
    let up = compose(&["up", "-d"]);
    let result = std::panic::catch_unwind(|| {
        assert!(up.status.success(), "{}", String::from_utf8_lossy(&up.stderr));
        for port in [first, second] {
            assert!(eventually(Duration::from_secs(10), || fetch(&netns, port).is_some()), "port {port}");
        }
    });
    ok(compose(&["down", "-v", "--timeout", "1"]));
    if let Err(panic) = result {
        std::panic::resume_unwind(panic);
    }
}

#[test]
fn the_proxy_refuses_connect_from_clients() {
    let netns = NetNs::new();
    let proxy = Proxy::start_in_netns(&netns);
    let response = raw_exchange(
        &proxy.socket,
        b"CONNECT 127.0.0.1:80 HTTP/1.1\r\nHost: 127.0.0.1:80\r\n\r\n",
        Duration::from_secs(10),
    );
    let text = String::from_utf8_lossy(&response);
    assert!(text.starts_with("HTTP/1.1 405"), "{text}");
    assert!(text.contains("CONNECT is not part of the Docker API"), "{text}");
}

/// Speaks the link to an agent directly, as a proxy (or an attacker with
/// access to the agent) would: only the agent's own loopback is a target.
#[tokio::test]
async fn the_agent_forwards_only_to_its_own_loopback() {
    use http_body_util::{BodyExt, Empty, Full};
    use hyper::body::Bytes;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    let dir = tempfile::tempdir().expect("dir");
    let socket = dir.path().join("agent.sock");
    let args = [
        "--listen".to_string(),
        format!("unix://{}", socket.display()),
        "--insecure".into(),
        "--state-dir".into(),
        dir.path().join("state").display().to_string(),
    ];
    let (_agent, _) = AgentProcess::start(dir.path(), &args);
    let io = tokio::net::UnixStream::connect(&socket).await.expect("agent");
    let (mut link, connection) = hyper::client::conn::http2::handshake(
        hyper_util::rt::TokioExecutor::new(),
        hyper_util::rt::TokioIo::new(io),
    )
    .await
    .expect("h2");
    tokio::spawn(connection);
    let session = hyper::Request::post("http://agent/_offload/v1/session")
        .body(Full::new(Bytes::from_static(b"{}")).boxed())
        .expect("request");
    assert!(link.send_request(session).await.expect("session").status().is_success());

    let connect = |target: String| {
        hyper::Request::connect(target).body(Empty::<Bytes>::new().map_err(|never| match never {}).boxed())
    };
    // Anything but loopback is refused, with a reason.
    let refused = link.send_request(connect("192.0.2.1:80".into()).expect("request")).await.expect("answer");
    assert_eq!(refused.status(), 403);
    let body = refused.into_body().collect().await.expect("body").to_bytes();
    assert!(String::from_utf8_lossy(&body).contains("forwards only to its own loopback"), "{body:?}");

    // Loopback is tunnelled, bytes both ways.
    let echo = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("echo");
    let port = echo.local_addr().expect("addr").port();
    tokio::spawn(async move {
        let (mut stream, _) = echo.accept().await.expect("accept");
        let mut buffer = [0u8; 5];
        stream.read_exact(&mut buffer).await.expect("read");
        stream.write_all(&buffer.to_ascii_uppercase()).await.expect("write");
    });
    let mut tunnel =
        link.send_request(connect(format!("127.0.0.1:{port}")).expect("request")).await.expect("answer");
    assert_eq!(tunnel.status(), 200);
    let upgraded = hyper::upgrade::on(&mut tunnel).await.expect("upgrade");
    let mut upgraded = hyper_util::rt::TokioIo::new(upgraded);
    upgraded.write_all(b"hello").await.expect("send");
    let mut answer = [0u8; 5];
    upgraded.read_exact(&mut answer).await.expect("receive");
    assert_eq!(&answer, b"HELLO");
}
