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

/// The agent skips the engine's userland proxy: for a published port it
/// dials the container's own address, exactly the one the engine reports, and
/// the forward answers. A port nothing publishes, or no longer, has no target.
#[test]
fn the_agent_dials_the_container_behind_a_published_port() {
    ensure_images();
    let netns = NetNs::new();
    let proxy = Proxy::start_in_netns(&netns);
    let mut cleanup = Cleanup::default();
    let name = cleanup.container(&unique("direct"));
    docker(&proxy, &["run", "-d", "--name", &name, "-p", "80", IMAGE, "sh", "-c", HTTPD]);
    let port = host_port(&proxy, &name, "80/tcp");
    let mut command = engine();
    command.args(["inspect", "--format", "{{.NetworkSettings.IPAddress}}", &name]);
    let ip = ok(run(command, None, LIMIT)).trim().to_string();
    let container: std::net::SocketAddr = format!("{ip}:80").parse().expect("the container's address");

    let published = offload::agent::published::PublishedPorts::default();
    let loopback = |port: u16| std::net::SocketAddr::from(([127, 0, 0, 1], port));
    assert_eq!(published.container_for(loopback(port)), Some(container));
    assert_eq!(published.container_for(loopback(free_port())), None, "a port nothing publishes");
    let hostname = short_id(&proxy, &name);
    assert!(
        eventually(Duration::from_secs(10), || fetch(&netns, port).is_some_and(|b| b.trim() == hostname)),
        "the forward to {port} answers"
    );

    docker(&proxy, &["rm", "-f", &name]);
    assert_eq!(published.container_for(loopback(port)), None, "the port was freed with its container");
}

/// A connection the container's program resets reaches the local client as a
/// reset, not as a clean end (which would claim everything sent arrived).
#[test]
fn a_reset_in_the_container_reaches_the_client_as_a_reset() {
    ensure_images();
    let netns = NetNs::new();
    let proxy = Proxy::start_in_netns(&netns);
    let mut cleanup = Cleanup::default();
    let name = cleanup.container(&unique("reset"));
    // `sleep` gets the connection and never reads it: closing a socket with
    // unread bytes sends an RST.
    docker(
        &proxy,
        &["run", "-d", "--name", &name, "-p", "80", IMAGE, "nc", "-l", "-p", "80", "-e", "sleep", "1"],
    );
    let port = host_port(&proxy, &name, "80/tcp");
    let listening = || {
        let mut command = engine();
        command.args(["exec", &name, "netstat", "-ltn"]);
        String::from_utf8_lossy(&run(command, None, LIMIT).stdout).contains(":80 ")
    };
    assert!(eventually(Duration::from_secs(10), listening), "nc listens in the container");

    let mut client = netns.command("python3");
    client.args(["-c", RESET_PROBE, &port.to_string()]);
    let output = run(client, None, LIMIT);
    let said = String::from_utf8_lossy(&output.stdout).trim().to_string();
    assert_eq!(said, "reset", "{}\n{}", String::from_utf8_lossy(&output.stderr), proxy.log_text());
}

/// Connects to 127.0.0.1:PORT, sends bytes, and says how the connection ended.
const RESET_PROBE: &str = r#"
import socket, sys
s = socket.create_connection(("127.0.0.1", int(sys.argv[1])), timeout=20)
s.sendall(b"never read")
try:
    print("eof" if s.recv(100) == b"" else "data")
except ConnectionResetError:
    print("reset")
"#;

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
    // Nor may a client use the link's own tunnel route through the proxy.
    let response = raw_exchange(
        &proxy.socket,
        b"POST /_offload/v1/tunnel/80 HTTP/1.1\r\nHost: docker\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
        Duration::from_secs(10),
    );
    let text = String::from_utf8_lossy(&response);
    assert!(text.starts_with("HTTP/1.1 403"), "{text}");
}

type LinkSender = hyper::client::conn::http2::SendRequest<
    http_body_util::combinators::BoxBody<hyper::body::Bytes, std::convert::Infallible>,
>;

/// An agent on a unix socket in `dir`, and a link to it with a session open,
/// spoken directly as a proxy (or an attacker with access to the agent) would.
async fn agent_link(dir: &std::path::Path) -> (AgentProcess, LinkSender) {
    let agent = start_agent(dir);
    (agent, open_link(&dir.join("agent.sock")).await)
}

/// An agent listening on `agent.sock` in `dir`.
fn start_agent(dir: &std::path::Path) -> AgentProcess {
    let socket = dir.join("agent.sock");
    let args = [
        "--listen".to_string(),
        format!("unix://{}", socket.display()),
        "--insecure".into(),
        "--state-dir".into(),
        dir.join("state").display().to_string(),
    ];
    AgentProcess::start(dir, &args).0
}

/// A link to the agent at `socket` with a session open; its request bodies
/// may fail with `E` (a failed body is how a proxy aborts a stream).
async fn open_link<E>(
    socket: &std::path::Path,
) -> hyper::client::conn::http2::SendRequest<http_body_util::combinators::BoxBody<hyper::body::Bytes, E>>
where
    E: Into<Box<dyn std::error::Error + Send + Sync>> + 'static,
{
    use http_body_util::{BodyExt, Full};
    use hyper::body::Bytes;

    let io = tokio::net::UnixStream::connect(socket).await.expect("agent");
    let (mut link, connection) = hyper::client::conn::http2::handshake(
        hyper_util::rt::TokioExecutor::new(),
        hyper_util::rt::TokioIo::new(io),
    )
    .await
    .expect("h2");
    tokio::spawn(connection);
    let session = hyper::Request::post("http://agent/_offload/v1/session")
        .body(Full::new(Bytes::from_static(b"{}")).map_err(|never| match never {}).boxed())
        .expect("request");
    assert!(link.send_request(session).await.expect("session").status().is_success());
    link
}

/// An abort crosses a tunnel as an abort, both ways: a port that resets
/// fails the tunnel's answer (not a clean end), and a proxy whose client
/// aborted (its writer dropped unshut) resets the agent's connection.
#[tokio::test]
async fn aborts_cross_a_tunnel_as_resets() {
    use http_body_util::BodyExt;
    use offload::link::stream;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    let dir = tempfile::tempdir().expect("dir");
    let _agent = start_agent(dir.path());
    let mut link = open_link::<offload::body::BodyError>(&dir.path().join("agent.sock")).await;
    let tunnel = |port: u16, body: offload::body::Body| {
        hyper::Request::post(format!("http://agent/_offload/v1/tunnel/{port}")).body(body).expect("request")
    };

    // The port resets after reading: the answer's body fails.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let port = listener.local_addr().expect("addr").port();
    let server = tokio::spawn(async move {
        let (mut socket, _) = listener.accept().await.expect("accept");
        let mut buffer = [0u8; 5];
        socket.read_exact(&mut buffer).await.expect("read");
        socket.write_all(b"partial").await.expect("write");
        socket.set_zero_linger().expect("linger");
    });
    let (mut writer, body) = stream::channel();
    writer.write_all(b"hello").await.expect("send");
    let answer = link.send_request(tunnel(port, offload::body::stream(body))).await.expect("answer");
    assert_eq!(answer.status(), 200);
    server.await.expect("server");
    let outcome = answer.into_body().collect().await;
    assert!(outcome.is_err(), "a reset port ended the tunnel cleanly: {outcome:?}");
    drop(writer);

    // The proxy's side aborts: the port's program reads a reset, not an end.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let port = listener.local_addr().expect("addr").port();
    let (read_hello, hello_read) = tokio::sync::oneshot::channel();
    let server = tokio::spawn(async move {
        let (mut socket, _) = listener.accept().await.expect("accept");
        let mut buffer = [0u8; 5];
        socket.read_exact(&mut buffer).await.expect("read");
        let _ = read_hello.send(());
        let mut rest = Vec::new();
        socket.read_to_end(&mut rest).await.map(|_| rest)
    });
    let (mut writer, body) = stream::channel();
    writer.write_all(b"hello").await.expect("send");
    let answer = link.send_request(tunnel(port, offload::body::stream(body))).await.expect("answer");
    assert_eq!(answer.status(), 200);
    hello_read.await.expect("the port read the first bytes");
    drop(writer);
    let outcome =
        tokio::time::timeout(LIMIT, server).await.expect("the port's connection ended").expect("server");
    let error = outcome.expect_err("an aborted tunnel ended the port's connection cleanly");
    assert_eq!(error.kind(), std::io::ErrorKind::ConnectionReset, "{error}");
    drop(answer);
}

/// The proxy's abort of a stream: by number, with POST; one that is not
/// relayed (ended, or never was) is no error of the link's.
#[tokio::test]
async fn the_agent_takes_aborts_by_stream_number() {
    use offload::body;
    use tokio::io::AsyncReadExt;

    let dir = tempfile::tempdir().expect("dir");
    let _agent = start_agent(dir.path());
    let mut link = open_link::<body::BodyError>(&dir.path().join("agent.sock")).await;
    let request = |method: hyper::Method, path: &str| {
        hyper::Request::builder()
            .method(method)
            .uri(format!("http://agent{path}"))
            .body(body::empty())
            .expect("request")
    };
    let (status, said) = answer_of(&mut link, request(hyper::Method::POST, "/_offload/v1/abort/x")).await;
    assert!(status == 400 && said.contains("not a stream number"), "{status} {said}");
    let (status, said) = answer_of(&mut link, request(hyper::Method::GET, "/_offload/v1/abort/1")).await;
    assert!(status == 405 && said.contains("POST"), "{status} {said}");
    assert_eq!(answer_of(&mut link, request(hyper::Method::POST, "/_offload/v1/abort/1")).await.0, 404);

    // A tunnel numbered 7, its client still open: the abort ends it at once,
    // as a reset of the port's connection.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let port = listener.local_addr().expect("addr").port();
    let (writer, request_body) = offload::link::stream::channel();
    let tunnel = hyper::Request::post(format!("http://agent/_offload/v1/tunnel/{port}"))
        .header("x-offload-stream", "7")
        .body(body::stream(request_body))
        .expect("request");
    let answer = link.send_request(tunnel).await.expect("answer");
    assert_eq!(answer.status(), 200);
    let (mut socket, _) = listener.accept().await.expect("accept");
    assert_eq!(answer_of(&mut link, request(hyper::Method::POST, "/_offload/v1/abort/7")).await.0, 204);
    let mut rest = Vec::new();
    let read =
        tokio::time::timeout(LIMIT, socket.read_to_end(&mut rest)).await.expect("the connection ended");
    assert_eq!(read.expect_err("an abort is no clean end").kind(), std::io::ErrorKind::ConnectionReset);
    drop((answer, writer));
}

/// The status and body of the agent's answer to `request`.
async fn answer_of(
    link: &mut hyper::client::conn::http2::SendRequest<offload::body::Body>,
    request: hyper::Request<offload::body::Body>,
) -> (u16, String) {
    use http_body_util::BodyExt;
    let answer = link.send_request(request).await.expect("answer");
    let status = answer.status().as_u16();
    (
        status,
        String::from_utf8_lossy(&answer.into_body().collect().await.expect("body").to_bytes()).to_string(),
    )
}

/// `CONNECT target` as the proxy sends it, marked as a UDP flow when `udp`.
fn connect_request(
    target: &str,
    udp: bool,
) -> hyper::Request<http_body_util::combinators::BoxBody<hyper::body::Bytes, std::convert::Infallible>> {
    use http_body_util::{BodyExt, Empty};
    let mut request = hyper::Request::connect(target);
    if udp {
        request = request.header("x-offload-protocol", "udp");
    }
    request.body(Empty::new().boxed()).expect("request")
}

/// Sends `request` and checks the agent's refusal: its status and what it says.
async fn assert_refused(
    link: &mut LinkSender,
    request: hyper::Request<
        http_body_util::combinators::BoxBody<hyper::body::Bytes, std::convert::Infallible>,
    >,
    status: u16,
    says: &str,
) {
    use http_body_util::BodyExt;
    let answer = link.send_request(request).await.expect("answer");
    assert_eq!(answer.status(), status);
    let body = answer.into_body().collect().await.expect("body").to_bytes();
    assert!(String::from_utf8_lossy(&body).contains(says), "{body:?}");
}

/// Only the agent's own loopback is a target.
#[tokio::test]
async fn the_agent_forwards_only_to_its_own_loopback() {
    use http_body_util::{BodyExt, Empty};
    use hyper::body::Bytes;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    let dir = tempfile::tempdir().expect("dir");
    let (_agent, mut link) = agent_link(dir.path()).await;

    // Anything but loopback is refused, with a reason.
    let refused = connect_request("192.0.2.1:80", false);
    assert_refused(&mut link, refused, 403, "forwards only to its own loopback").await;

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
        link.send_request(connect_request(&format!("127.0.0.1:{port}"), false)).await.expect("answer");
    assert_eq!(tunnel.status(), 200);
    let upgraded = hyper::upgrade::on(&mut tunnel).await.expect("upgrade");
    let mut upgraded = hyper_util::rt::TokioIo::new(upgraded);
    upgraded.write_all(b"hello").await.expect("send");
    let mut answer = [0u8; 5];
    upgraded.read_exact(&mut answer).await.expect("receive");
    assert_eq!(&answer, b"HELLO");
    // Ends the CONNECT stream (its port side has ended already).
    drop(upgraded);

    // The one-round-trip form: the client's bytes ride in the request body
    // (its end is the client's half-close), the port's in the response body.
    let echo = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("echo");
    let port = echo.local_addr().expect("addr").port();
    let served = tokio::spawn(async move {
        let (mut stream, _) = echo.accept().await.expect("accept");
        let mut got = Vec::new();
        stream.read_to_end(&mut got).await.expect("read to the half-close");
        stream.write_all(&got.to_ascii_uppercase()).await.expect("write");
    });
    let post = |port: u16, bytes: &'static [u8]| {
        hyper::Request::post(format!("http://agent/_offload/v1/tunnel/{port}"))
            .body(
                http_body_util::Full::new(Bytes::from_static(bytes)).map_err(|never| match never {}).boxed(),
            )
            .expect("request")
    };
    let answer = link.send_request(post(port, b"one trip")).await.expect("answer");
    assert_eq!(answer.status(), 200);
    let body = answer.into_body().collect().await.expect("body").to_bytes();
    assert_eq!(&body[..], b"ONE TRIP");
    served.await.expect("echo server");
    // Nothing listening: the agent says so instead of an empty stream.
    let closed = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let closed_port = closed.local_addr().expect("addr").port();
    drop(closed);
    assert_refused(&mut link, post(closed_port, b"x"), 502, "cannot connect to port").await;
    // Bad input on the tunnel route: a path that is no port, a method that is not POST.
    let not_a_port = hyper::Request::post("http://agent/_offload/v1/tunnel/http")
        .body(http_body_util::Full::new(Bytes::from_static(b"x")).map_err(|never| match never {}).boxed())
        .expect("request");
    assert_refused(&mut link, not_a_port, 400, "not a port number").await;
    let not_post = hyper::Request::get(format!("http://agent/_offload/v1/tunnel/{port}"))
        .body(Empty::<Bytes>::new().map_err(|never| match never {}).boxed())
        .expect("request");
    assert_refused(&mut link, not_post, 405, "opened with POST").await;

    // A tunnel the proxy resets after its half-close, to a port that keeps
    // the connection open and silent, ends at the agent (no stream is left
    // counting as activity).
    let silent = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("silent");
    let silent_port = silent.local_addr().expect("addr").port();
    let held = tokio::spawn(async move {
        let (mut stream, _) = silent.accept().await.expect("accept");
        let mut got = Vec::new();
        stream.read_to_end(&mut got).await.expect("read to the half-close");
        tokio::time::sleep(Duration::from_secs(30)).await;
        drop(stream);
    });
    let answer = link.send_request(post(silent_port, b"x")).await.expect("answer");
    assert_eq!(answer.status(), 200);
    drop(answer);
    let mut streams = None;
    for _ in 0..50 {
        let status = hyper::Request::get("http://agent/_offload/v1/status")
            .body(Empty::<Bytes>::new().map_err(|never| match never {}).boxed())
            .expect("request");
        let answer = link.send_request(status).await.expect("status");
        let body = answer.into_body().collect().await.expect("body").to_bytes();
        let json: serde_json::Value = serde_json::from_slice(&body).expect("status json");
        streams = json["activity"]["streams"].as_u64();
        if streams == Some(0) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(streams, Some(0), "the reset tunnel still counts as a stream: {}", _agent.log_text());
    held.abort();
}

/// A helper process of a test, killed on drop.
struct Killed(Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A UDP echo server for a container's port 53: busybox has no UDP server,
/// so a python3 of this machine runs in the container's network namespace.
/// Ends on drop (and by itself after two minutes, whatever happens).
fn udp_echo(container: &str) -> Killed {
    let mut command = engine();
    command.args(["inspect", "--format", "{{.State.Pid}}", container]);
    let pid = ok(run(command, None, LIMIT)).trim().to_string();
    let script = "import signal, socket\nsignal.alarm(120)\n\
                  s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\ns.bind(('0.0.0.0', 53))\n\
                  while True:\n    data, peer = s.recvfrom(65535)\n    s.sendto(data, peer)\n";
    let child = Command::new("nsenter")
        .args(["-t", &pid, "-n", "python3", "-c", script])
        .stdout(Stdio::null())
        .spawn()
        .expect("nsenter python3");
    Killed(child)
}

/// Sends datagrams to 127.0.0.1:`port` inside the namespace from two
/// sockets (two peers), each retried until answered; prints what came back.
fn udp_exchange(netns: &NetNs, port: u16) -> String {
    let script = format!(
        "import socket, sys\n\
         answers = []\n\
         for payload in [b'hello', b'x' * 1400]:\n\
         \x20   s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n\
         \x20   s.settimeout(0.5)\n\
         \x20   for attempt in range(20):\n\
         \x20       s.sendto(payload, ('127.0.0.1', {port}))\n\
         \x20       try:\n\
         \x20           data, peer = s.recvfrom(65535)\n\
         \x20           break\n\
         \x20       except socket.timeout:\n\
         \x20           data = b'(nothing)'\n\
         \x20   answers.append('%d:%s' % (len(data), data[:5].decode()))\n\
         print(' '.join(answers))\n"
    );
    let mut command = netns.command("python3");
    command.args(["-c", &script]);
    ok(run(command, None, LIMIT)).trim().to_string()
}

/// Whether UDP 127.0.0.1:`port` inside the namespace is free (no forward).
fn udp_port_free(netns: &NetNs, port: u16) -> bool {
    let mut command = netns.command("python3");
    command.args([
        "-c",
        &format!(
            "import socket; socket.socket(socket.AF_INET, socket.SOCK_DGRAM).bind(('127.0.0.1', {port}))"
        ),
    ]);
    run(command, None, LIMIT).status.success()
}

/// A UDP port that is free on this machine right now (the kernel picks it).
fn free_udp_port() -> u16 {
    let socket = std::net::UdpSocket::bind("127.0.0.1:0").expect("bind");
    socket.local_addr().expect("addr").port()
}

#[test]
fn a_published_udp_port_echoes_through_the_link() {
    ensure_images();
    let netns = NetNs::new();
    let proxy = Proxy::start_in_netns(&netns);
    let mut cleanup = Cleanup::default();
    let name = cleanup.container(&unique("udp"));
    let port = free_udp_port();
    let publish = format!("{port}:53/udp");
    docker(&proxy, &["run", "-d", "--name", &name, "-p", &publish, IMAGE, "sleep", "300"]);
    let _echo = udp_echo(&name);

    // Both peers get their own answers back, the large datagram whole.
    let answers = udp_exchange(&netns, port);
    assert_eq!(answers, "5:hello 1400:xxxxx", "{}", proxy.log_text());
    assert!(proxy.log_text().contains("UDP port forward open"), "{}", proxy.log_text());

    // On the remote side the port is bound to loopback only.
    let mut command = engine();
    command.args([
        "inspect",
        "--format",
        "{{range (index .NetworkSettings.Ports \"53/udp\")}}{{.HostIp}}:{{.HostPort}} {{end}}",
        &name,
    ]);
    let bindings = ok(run(command, None, LIMIT));
    assert_eq!(
        bindings.split_whitespace().collect::<Vec<_>>(),
        vec![format!("127.0.0.1:{port}")],
        "{bindings}"
    );
    // And the forward is listed.
    let status = raw_exchange(&proxy.socket, b"GET /_offload/v1/proxy HTTP/1.0\r\n\r\n", LIMIT);
    let status = String::from_utf8_lossy(&status);
    assert!(status.contains(&format!(r#""port":{port},"protocol":"udp""#)), "{status}");

    // Stopping the container closes the local socket.
    assert!(!udp_port_free(&netns, port));
    docker(&proxy, &["stop", "-t", "0", &name]);
    assert!(
        eventually(Duration::from_secs(5), || udp_port_free(&netns, port)),
        "the UDP forward outlived its container"
    );
}

/// A UDP flow on the link: `CONNECT` marked `x-offload-protocol: udp`,
/// datagrams framed with a 2-byte length; loopback only, like TCP.
#[tokio::test]
async fn the_agent_forwards_udp_only_to_its_own_loopback() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    let dir = tempfile::tempdir().expect("dir");
    let (_agent, mut link) = agent_link(dir.path()).await;
    let refused = connect_request("192.0.2.1:53", true);
    assert_refused(&mut link, refused, 403, "forwards only to its own loopback").await;

    let echo = tokio::net::UdpSocket::bind("127.0.0.1:0").await.expect("echo");
    let port = echo.local_addr().expect("addr").port();
    tokio::spawn(async move {
        let mut buffer = [0u8; 64];
        while let Ok((n, from)) = echo.recv_from(&mut buffer).await {
            let _ = echo.send_to(&buffer[..n].to_ascii_uppercase(), from).await;
        }
    });
    let mut tunnel =
        link.send_request(connect_request(&format!("127.0.0.1:{port}"), true)).await.expect("answer");
    assert_eq!(tunnel.status(), 200);
    let upgraded = hyper::upgrade::on(&mut tunnel).await.expect("upgrade");
    let mut upgraded = hyper_util::rt::TokioIo::new(upgraded);
    upgraded.write_all(b"\x00\x05hello\x00\x03abc").await.expect("send");
    let mut answer = [0u8; 12];
    upgraded.read_exact(&mut answer).await.expect("receive");
    assert_eq!(&answer, b"\x00\x05HELLO\x00\x03ABC");
}

#[test]
fn a_taken_local_udp_port_is_retried_until_it_frees_up() {
    ensure_images();
    let netns = NetNs::new();
    let proxy = Proxy::start_in_netns(&netns);
    let mut cleanup = Cleanup::default();
    let port = free_udp_port();
    // Something in the namespace already has the UDP port.
    let squat = format!(
        "import socket, time\ns = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n\
         s.bind(('127.0.0.1', {port}))\nprint('bound', flush=True)\ntime.sleep(120)\n"
    );
    let mut squatter = netns.command("python3");
    squatter.args(["-c", &squat]).stdout(Stdio::piped());
    let mut squatter = Killed(squatter.spawn().expect("python3"));
    let mut said = String::new();
    let stdout = squatter.0.stdout.take().expect("stdout");
    std::io::BufRead::read_line(&mut std::io::BufReader::new(stdout), &mut said).expect("squatter");
    assert_eq!(said.trim(), "bound");

    let name = cleanup.container(&unique("udptaken"));
    docker(&proxy, &["run", "-d", "--name", &name, "-p", &format!("{port}:53/udp"), IMAGE, "sleep", "300"]);
    let _echo = udp_echo(&name);
    assert!(
        eventually(Duration::from_secs(5), || proxy
            .log_text()
            .contains("cannot listen for a published port")),
        "{}",
        proxy.log_text()
    );
    drop(squatter);
    assert_eq!(udp_exchange(&netns, port), "5:hello 1400:xxxxx", "{}", proxy.log_text());
}
