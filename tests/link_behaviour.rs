//! The proxy–agent link as a user lives with it: authentication failures,
//! the cached `/_ping`, link loss, a dead link noticed by pings, and an agent
//! that comes and goes.

mod support;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use support::delay::DelayRelay;
use support::*;

const LIMIT: Duration = Duration::from_secs(60);

fn cert(dir: &Path, name: &str) -> String {
    dir.join(name).display().to_string()
}

/// An agent on a loopback TLS port, with certificates from `offload certs init`.
fn tls_agent(dir: &Path, port: u16) -> (AgentProcess, SocketAddr, PathBuf) {
    let certs = dir.join("certs");
    if !certs.join("ca.pem").exists() {
        make_certs(&certs);
    }
    let args = [
        "--state-dir".to_string(),
        dir.join("agent-state").display().to_string(),
        "--listen".to_string(),
        format!("tls://127.0.0.1:{port}"),
        "--tlscacert".into(),
        cert(&certs, "ca.pem"),
        "--tlscert".into(),
        cert(&certs, "server-cert.pem"),
        "--tlskey".into(),
        cert(&certs, "server-key.pem"),
    ];
    let (agent, url) = AgentProcess::start(dir, &args);
    let addr: SocketAddr = url.trim_start_matches("tls://").parse().expect("agent address");
    (agent, addr, certs)
}

/// A proxy that reaches `addr` over TLS with the client files in `certs`.
fn tls_proxy(addr: SocketAddr, certs: &Path, extra: &[&str]) -> Proxy {
    let remote = format!("tls://127.0.0.1:{}", addr.port());
    let (ca, cert_pem, key) = (cert(certs, "ca.pem"), cert(certs, "cert.pem"), cert(certs, "key.pem"));
    let mut args = vec!["--remote", &remote, "--tlscacert", &ca, "--tlscert", &cert_pem, "--tlskey", &key];
    args.extend_from_slice(extra);
    Proxy::start_with(&args)
}

fn docker_ps(proxy: &Proxy) -> std::process::Output {
    let mut command = proxy.docker(DOCKER_28);
    command.args(["ps", "--format", "{{.ID}}"]);
    run(command, None, LIMIT)
}

fn stderr_of(output: &std::process::Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

#[test]
fn wrong_certificates_are_refused_and_explained() {
    let dir = tempfile::tempdir().expect("dir");
    let (agent, addr, _) = tls_agent(dir.path(), 0);

    // A client certificate from another CA (that also pins another CA).
    let stranger = dir.path().join("stranger");
    make_certs(&stranger);
    let proxy = tls_proxy(addr, &stranger, &[]);
    let output = docker_ps(&proxy);
    assert!(!output.status.success());
    let stderr = stderr_of(&output);
    assert!(stderr.contains("offload: cannot reach the offload agent at tls://127.0.0.1:"), "{stderr}");
    assert!(stderr.contains("certificate is not trusted (UnknownIssuer)"), "{stderr}");

    // The right CA pinned, but a client certificate the agent's CA did not sign.
    let mixed = client_files(&dir.path().join("certs"), &stranger);
    let proxy = tls_proxy(addr, mixed.path(), &[]);
    let output = docker_ps(&proxy);
    assert!(!output.status.success());
    let stderr = stderr_of(&output);
    assert!(stderr.contains("does not accept our client certificate"), "{stderr}");
    assert!(agent.log_text().contains("TLS handshake refused"), "{}", agent.log_text());
    assert!(!agent.log_text().contains("session started"), "a refused client got a session");
}

#[test]
fn cached_ping_carries_the_engines_headers() {
    let proxy = Proxy::start_via(Via::TlsAgent);
    let ask = |socket: &Path, method: &str| {
        let request = format!("{method} /_ping HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
        String::from_utf8_lossy(&raw_exchange(socket, request.as_bytes(), Duration::from_secs(10)))
            .into_owned()
    };
    for method in ["HEAD", "GET"] {
        let direct = ask(Path::new(ENGINE_SOCKET), method);
        let linked = ask(&proxy.socket, method);
        for header in
            ["Api-Version", "Ostype", "Docker-Experimental", "Builder-Version", "Swarm", "Content-Type"]
        {
            let line =
                |text: &str| text.lines().find(|l| l.starts_with(&format!("{header}: "))).map(str::to_string);
            // The engine omits Builder-Version/Swarm on some versions: then so must we.
            assert_eq!(line(&linked), line(&direct), "{method} {header}\n{linked}\n---\n{direct}");
        }
        assert!(linked.starts_with("HTTP/1.1 200 OK\r\n"), "{linked}");
        if method == "GET" {
            assert!(linked.ends_with("\r\n\r\nOK"), "{linked}");
        } else {
            assert!(linked.contains("Content-Length: 0\r\n") && linked.ends_with("\r\n\r\n"), "{linked}");
        }
    }
}

#[test]
fn link_loss_fails_streams_and_the_next_command_reconnects() {
    ensure_images();
    let dir = tempfile::tempdir().expect("dir");
    let (_agent, agent_addr, certs) = tls_agent(dir.path(), 0);
    let relay = DelayRelay::start(agent_addr, Duration::ZERO);
    let proxy = tls_proxy(relay.addr, &certs, &[]);
    let mut cleanup = Cleanup::default();
    let name = cleanup.container(&unique("linkloss"));
    let mut command = proxy.docker(DOCKER_28);
    command.args(["run", "-d", "--name", &name, IMAGE, "sleep", "300"]);
    ok(run(command, None, LIMIT));

    let mut follower = proxy
        .docker(DOCKER_28)
        .args(["logs", "-f", &name])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("logs -f");
    std::thread::sleep(Duration::from_millis(500));
    assert!(follower.try_wait().expect("poll").is_none(), "logs -f ended early");

    relay.cut();
    let deadline = Instant::now() + Duration::from_secs(15);
    let status = loop {
        if let Some(status) = follower.try_wait().expect("poll") {
            break status;
        }
        assert!(Instant::now() < deadline, "logs -f hung after the link died");
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(!status.success(), "a cut stream must end with an error");

    // The next command just works, on a new link that resumes the session.
    let output = docker_ps(&proxy);
    assert!(output.status.success(), "{}", stderr_of(&output));
    assert!(proxy.log_text().contains("session resumed"), "{}", proxy.log_text());
    // Nothing on the engine was lost.
    let mut command = engine();
    command.args(["inspect", "--format", "{{.State.Running}}", &name]);
    assert_eq!(ok(run(command, None, LIMIT)), "true\n");
}

#[test]
fn a_silent_dead_link_is_noticed_by_pings() {
    let dir = tempfile::tempdir().expect("dir");
    let (_agent, agent_addr, certs) = tls_agent(dir.path(), 0);
    let relay = DelayRelay::start(agent_addr, Duration::ZERO);
    let proxy = tls_proxy(relay.addr, &certs, &["--keepalive", "1s"]);
    let mut events = proxy
        .docker(DOCKER_28)
        .args(["events", "--filter", &format!("container={}", unique("none"))])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("events");
    std::thread::sleep(Duration::from_millis(1500));
    assert!(events.try_wait().expect("poll").is_none(), "events ended early");
    let frozen_at = Instant::now();
    relay.freeze();
    let deadline = frozen_at + Duration::from_secs(20);
    loop {
        if events.try_wait().expect("poll").is_some() {
            break;
        }
        assert!(Instant::now() < deadline, "events still hanging on a dead link");
        std::thread::sleep(Duration::from_millis(50));
    }
    // Two 1 s ping intervals, plus scheduling slack.
    let noticed = frozen_at.elapsed();
    assert!(noticed < Duration::from_secs(5), "took {noticed:?} to notice the dead link");
}

#[test]
fn the_proxy_waits_for_an_agent_that_is_down() {
    let dir = tempfile::tempdir().expect("dir");
    // Learn a free port from a first agent, then stop it.
    let (mut agent, addr, certs) = tls_agent(dir.path(), 0);
    agent.kill();
    let proxy = tls_proxy(addr, &certs, &[]);

    let output = docker_ps(&proxy);
    assert!(!output.status.success());
    let stderr = stderr_of(&output);
    assert!(
        stderr.contains(&format!("cannot reach the offload agent at tls://127.0.0.1:{}", addr.port())),
        "{stderr}"
    );
    assert!(stderr.contains("Connection refused") || stderr.contains("refused"), "{stderr}");

    // The agent comes back: the next command works without touching the proxy.
    let (_agent, _, _) = tls_agent(dir.path(), addr.port());
    let output = docker_ps(&proxy);
    assert!(output.status.success(), "{}", stderr_of(&output));
}

#[test]
fn a_run_whose_link_dies_does_not_look_successful() {
    ensure_images();
    for extra in [&[][..], &["--rm"][..], &["-i"][..], &["--rm", "-i"][..]] {
        run_cut_off(extra);
    }
}

/// `docker run EXTRA` whose link is cut while the container runs.
fn run_cut_off(extra: &[&str]) {
    let dir = tempfile::tempdir().expect("dir");
    let (_agent, agent_addr, certs) = tls_agent(dir.path(), 0);
    let relay = DelayRelay::start(agent_addr, Duration::ZERO);
    let proxy = tls_proxy(relay.addr, &certs, &[]);
    let mut cleanup = Cleanup::default();
    let name = cleanup.container(&unique("runcut"));
    let mut args = vec!["run", "--name", &name];
    args.extend_from_slice(extra);
    args.extend_from_slice(&[IMAGE, "sh", "-c", "echo begun; sleep 4; echo finished"]);
    let mut runner = proxy
        .docker(DOCKER_28)
        .args(&args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("docker run");
    // Cut once the container runs (its first line has been written).
    let running = eventually(Duration::from_secs(20), || {
        let mut command = engine();
        command.args(["logs", &name]);
        run(command, None, LIMIT).stdout.starts_with(b"begun")
    });
    assert!(running, "{extra:?}: the container never started");
    relay.cut();
    let deadline = Instant::now() + Duration::from_secs(20);
    let status = loop {
        if let Some(status) = runner.try_wait().expect("poll") {
            break status;
        }
        assert!(Instant::now() < deadline, "{extra:?}: docker run hung after the link died");
        std::thread::sleep(Duration::from_millis(50));
    };
    let output = runner.wait_with_output().expect("output");
    let said = String::from_utf8_lossy(&output.stderr).into_owned();
    let printed = String::from_utf8_lossy(&output.stdout).into_owned();
    assert_eq!(status.code(), Some(125), "{extra:?}: the CLI's code for a failed wait: {printed:?} {said}");
    assert!(printed.starts_with("begun"), "{extra:?}: the output so far arrived: {printed:?}");
    // The client hears why, not a bare "unexpected EOF".
    assert!(said.contains("offload: the connection to") && said.contains("was lost"), "{extra:?}: {said}");
}

/// A program that exits while its stdin still flows (`docker run -i ... head
/// -c 5` fed a large input) still has its output delivered, and its attach
/// ends with the client. The engine stops reading a finished container's
/// stdin but keeps the connection open until the client closes it; the
/// agent's relay must end then. Before, each run left a relay holding its
/// stream's window and the session's activity, and after a handful the link
/// carried no request with a body (`docker create` hung).
#[test]
fn programs_that_stop_reading_stdin_lose_no_output_and_do_not_wedge_the_link() {
    ensure_images();
    let proxy = Proxy::start_via(Via::UnixAgent);
    let mut cleanup = Cleanup::default();
    let streams = |proxy: &Proxy| agent_status(proxy)["activity"]["streams"].as_u64();
    let input = b"y\n".repeat(10 << 20);
    for round in 0..8 {
        let name = cleanup.container(&unique("stdin"));
        let mut command = proxy.docker(DOCKER_28);
        command.args(["run", "-i", "--name", &name, IMAGE, "head", "-c", "5"]);
        let output = run_offering(command, &input, LIMIT);
        assert_eq!(
            String::from_utf8_lossy(&output.stdout),
            "y\ny\ny",
            "round {round}: {}\n{}",
            stderr_of(&output),
            proxy.log_text()
        );
    }
    // The relays ended with their clients.
    assert!(
        eventually(Duration::from_secs(20), || streams(&proxy) == Some(0)),
        "relays still open: {}",
        agent_status(&proxy)
    );
    // A request with a body still passes.
    let name = cleanup.container(&unique("after"));
    let mut command = proxy.docker(DOCKER_28);
    command.args(["create", "--name", &name, IMAGE, "true"]);
    let output = run(command, None, LIMIT);
    assert!(output.status.success(), "{}\n{}", stderr_of(&output), proxy.log_text());
}

/// The link's own `x-offload-*` headers are the proxy's to set: a client's
/// are dropped. Believed, `x-offload-upgrade` on a create would make the
/// agent send the engine an upgrade with an empty body.
#[test]
fn a_clients_link_headers_are_not_believed() {
    ensure_images();
    let proxy = Proxy::start_via(Via::UnixAgent);
    let mut cleanup = Cleanup::default();
    let name = cleanup.container(&unique("spoof"));
    let body = format!(r#"{{"Image":"{IMAGE}","Cmd":["true"]}}"#);
    let request = format!(
        "POST /containers/create?name={name} HTTP/1.1\r\nHost: docker\r\nContent-Type: application/json\r\n\
         X-Offload-Upgrade: tcp\r\nX-Offload-Body-Length: 0\r\nX-Offload-Background: 1\r\n\
         Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    let response =
        String::from_utf8_lossy(&raw_exchange(&proxy.socket, request.as_bytes(), LIMIT)).to_string();
    assert!(response.starts_with("HTTP/1.1 201"), "{response}\n{}", proxy.log_text());
}
