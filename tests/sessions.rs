//! Sessions end by themselves: activity keeps them, idle + grace ends them,
//! and cleanup removes exactly what the session created. Short timeouts.

mod support;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use support::delay::DelayRelay;
use support::*;

const LIMIT: Duration = Duration::from_secs(60);
const SHORT: [&str; 4] = ["--idle-timeout", "2s", "--grace", "1s"];

/// An agent on a loopback port with short timeouts and a private state dir.
fn agent(dir: &Path, port: u16, extra: &[&str]) -> (AgentProcess, String) {
    let mut args: Vec<String> = vec![
        "--listen".into(),
        format!("tcp://127.0.0.1:{port}"),
        "--insecure".into(),
        "--state-dir".into(),
        dir.join("agent-state").display().to_string(),
    ];
    args.extend(SHORT.iter().chain(extra).map(|a| a.to_string()));
    AgentProcess::start(dir, &args)
}

fn proxy_to(url: &str) -> Proxy {
    Proxy::start_with(&["--remote", url, "--insecure"])
}

fn docker(proxy: &Proxy, args: &[&str]) -> String {
    let mut command = proxy.docker(DOCKER_28);
    command.args(args);
    ok(run(command, None, LIMIT))
}

fn engine_has(kind: &str, name: &str) -> bool {
    let mut command = engine();
    command.args([kind, "inspect", name]).stdout(Stdio::null()).stderr(Stdio::null());
    command.status().map(|s| s.success()).unwrap_or(false)
}

#[test]
fn idle_session_removes_exactly_what_it_created() {
    ensure_images();
    let dir = tempfile::tempdir().expect("dir");
    let (_agent, url) = agent(dir.path(), 0, &[]);
    let proxy = proxy_to(&url);
    let mut cleanup = Cleanup::default();

    // Things that existed before the session, of every kind.
    let pre_container = cleanup.container(&unique("pre"));
    let pre_volume = cleanup.volume(&unique("pre-vol"));
    let pre_network = cleanup.network(&unique("pre-net"));
    let pre_image = cleanup.image(&format!("{}:pre", unique("pre-img")));
    for args in [
        vec!["create", "--name", &pre_container, IMAGE, "true"],
        vec!["volume", "create", &pre_volume],
        vec!["network", "create", &pre_network],
        vec!["tag", IMAGE, &pre_image],
    ] {
        let mut command = engine();
        command.args(&args);
        ok(run(command, None, LIMIT));
    }

    // Things the session creates, with the CLI and with Compose.
    let container = cleanup.container(&unique("sess"));
    let volume = cleanup.volume(&unique("sess-vol"));
    let network = cleanup.network(&unique("sess-net"));
    let image = cleanup.image(&format!("{}:mine", unique("sess-img")));
    docker(&proxy, &["run", "--name", &container, IMAGE, "true"]);
    docker(&proxy, &["volume", "create", &volume]);
    docker(&proxy, &["network", "create", &network]);
    docker(&proxy, &["tag", IMAGE, &image]);
    // Re-tagging what already exists does not make it the session's.
    docker(&proxy, &["tag", IMAGE, &pre_image]);

    let project = unique("proj");
    let compose_dir = tempfile::tempdir().expect("compose dir");
    std::fs::write(
        compose_dir.path().join("docker-compose.yml"),
        format!("version: '2.4'\nservices:\n  job:\n    image: {IMAGE}\n    command: ['true']\n    volumes: ['data:/data']\nvolumes:\n  data: {{}}\n"),
    )
    .expect("compose file");
    let mut command = Command::new("docker-compose");
    command
        .args(["-p", &project, "up", "-d"])
        .current_dir(compose_dir.path())
        .env("DOCKER_HOST", proxy.host());
    ok(run(command, None, LIMIT));
    let compose_volume = cleanup.volume(&format!("{project}_data"));
    let compose_network = cleanup.network(&format!("{project}_default"));
    cleanup.container(&format!("{project}_job_1"));

    let report = agent_status(&proxy);
    assert!(report["resources"]["images"].as_array().is_some_and(|i| i.len() == 1), "{report}");
    assert!(report["resources"]["containers"].as_array().is_some_and(|c| c.len() == 2), "{report}");

    let gone = eventually(Duration::from_secs(20), || {
        !engine_has("container", &container)
            && !engine_has("volume", &volume)
            && !engine_has("network", &network)
            && !engine_has("image", &image)
            && !engine_has("volume", &compose_volume)
            && !engine_has("network", &compose_network)
            && !engine_has("container", &format!("{project}_job_1"))
    });
    assert!(gone, "the session's resources were not all removed");
    for (kind, name) in [
        ("container", &pre_container),
        ("volume", &pre_volume),
        ("network", &pre_network),
        ("image", &pre_image),
        ("image", &IMAGE.to_string()),
    ] {
        assert!(engine_has(kind, name), "pre-existing {kind} {name} was removed");
    }
}

#[test]
fn running_containers_and_open_streams_keep_a_session() {
    ensure_images();
    let dir = tempfile::tempdir().expect("dir");
    let (_agent, url) = agent(dir.path(), 0, &[]);
    let proxy = proxy_to(&url);
    let mut cleanup = Cleanup::default();
    let sleeper = cleanup.container(&unique("sleeper"));
    docker(&proxy, &["run", "-d", "--name", &sleeper, IMAGE, "sleep", "300"]);
    std::thread::sleep(Duration::from_secs(5));
    assert!(engine_has("container", &sleeper), "a running container did not keep its session");
    let report = agent_status(&proxy);
    assert_eq!(report["activity"]["running_containers"], 1, "{report}");

    // The container stops; an open `docker events` still keeps the session.
    docker(&proxy, &["stop", "-t", "0", &sleeper]);
    let mut events = proxy
        .docker(DOCKER_28)
        .args(["events"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("events");
    std::thread::sleep(Duration::from_secs(5));
    let kept = engine_has("container", &sleeper);
    let _ = events.kill();
    let _ = events.wait();
    assert!(kept, "an open events stream did not keep its session");
    assert!(
        eventually(Duration::from_secs(15), || !engine_has("container", &sleeper)),
        "not cleaned up at last"
    );
}

/// A client that vanishes from an attach to a silent container leaves no
/// stream at the agent counting as activity. (This engine ends the attach
/// when stdin closes; the agent's own end on the proxy's reset, for targets
/// that stay silent, is tested on a tunnel in `ports`.)
#[test]
fn an_abandoned_attach_stops_counting_as_activity() {
    ensure_images();
    let dir = tempfile::tempdir().expect("dir");
    let (_agent, url) = agent(dir.path(), 0, &[]);
    let proxy = proxy_to(&url);
    let mut cleanup = Cleanup::default();
    let quiet = cleanup.container(&unique("quiet"));
    docker(&proxy, &["run", "-d", "-i", "--name", &quiet, IMAGE, "sleep", "300"]);
    let mut attach = proxy
        .docker(DOCKER_28)
        .args(["attach", &quiet])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("attach");
    let streams = |proxy: &Proxy| agent_status(proxy)["activity"]["streams"].as_u64();
    assert!(eventually(Duration::from_secs(10), || streams(&proxy) == Some(1)), "{}", agent_status(&proxy));
    let _ = attach.kill();
    let _ = attach.wait();
    assert!(
        eventually(Duration::from_secs(10), || streams(&proxy) == Some(0)),
        "the abandoned attach still counts: {}",
        agent_status(&proxy)
    );
}

#[test]
fn a_reconnect_within_the_grace_resumes_the_session() {
    ensure_images();
    let dir = tempfile::tempdir().expect("dir");
    let (_agent, url) = agent(dir.path(), 0, &["--grace", "4s"]);
    let agent_addr = url.trim_start_matches("tcp://").parse().expect("addr");
    let relay = DelayRelay::start(agent_addr, Duration::ZERO);
    let proxy = proxy_to(&format!("tcp://{}", relay.addr));
    let mut cleanup = Cleanup::default();
    let name = cleanup.container(&unique("grace"));
    docker(&proxy, &["create", "--name", &name, IMAGE, "true"]);
    relay.cut();
    // Past the idle timeout (2 s), inside the grace (4 s more).
    std::thread::sleep(Duration::from_millis(3500));
    docker(&proxy, &["ps", "-a"]);
    assert!(proxy.log_text().contains("session resumed"), "{}", proxy.log_text());
    assert!(engine_has("container", &name), "the container went although the session resumed");
}

#[test]
fn two_sessions_are_cleaned_independently() {
    ensure_images();
    let dir = tempfile::tempdir().expect("dir");
    let (_agent, url) = agent(dir.path(), 0, &[]);
    let busy = proxy_to(&url);
    let idle = proxy_to(&url);
    let mut cleanup = Cleanup::default();
    let busy_container = cleanup.container(&unique("busy"));
    let idle_container = cleanup.container(&unique("idle"));
    docker(&busy, &["run", "-d", "--name", &busy_container, IMAGE, "sleep", "300"]);
    docker(&idle, &["create", "--name", &idle_container, IMAGE, "true"]);
    assert!(eventually(Duration::from_secs(15), || !engine_has("container", &idle_container)));
    assert!(engine_has("container", &busy_container), "the busy session lost its container");
}

#[test]
fn an_agent_killed_and_restarted_cleans_up_the_orphaned_session() {
    ensure_images();
    let dir = tempfile::tempdir().expect("dir");
    let (mut first, url) = agent(dir.path(), 0, &[]);
    let port: u16 = url.rsplit(':').next().and_then(|p| p.parse().ok()).expect("port");
    let proxy = proxy_to(&url);
    let mut cleanup = Cleanup::default();
    let name = cleanup.container(&unique("orphan"));
    docker(&proxy, &["create", "--name", &name, IMAGE, "true"]);
    drop(proxy);
    first.kill(); // SIGKILL: no chance to clean up
    std::thread::sleep(Duration::from_secs(4));
    assert!(engine_has("container", &name), "removed without an agent?");

    let (_second, _) = agent(dir.path(), port, &[]);
    assert!(eventually(Duration::from_secs(15), || !engine_has("container", &name)), "orphan not cleaned");
}

#[test]
fn the_build_cache_survives_a_sessions_cleanup() {
    ensure_images();
    let dir = tempfile::tempdir().expect("dir");
    let (_agent, url) = agent(dir.path(), 0, &[]);
    let mut cleanup = Cleanup::default();
    let context = tempfile::tempdir().expect("context");
    let marker = unique("cache");
    std::fs::write(
        context.path().join("Dockerfile"),
        format!("FROM {IMAGE}\nRUN echo {marker} > /marker && sleep 1\n"),
    )
    .expect("Dockerfile");
    let build = |proxy: &Proxy, tag: &str| {
        let mut command = proxy.docker(DOCKER_20);
        command
            .env("DOCKER_BUILDKIT", "1")
            .args(["build", "--progress", "plain", "-t", tag])
            .arg(context.path());
        let output = run(command, None, Duration::from_secs(120));
        assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
        String::from_utf8_lossy(&output.stderr).into_owned()
    };
    let first_tag = cleanup.image(&format!("{}:1", unique("cached")));
    let first = proxy_to(&url);
    let run_step =
        |log: &str| log.lines().skip_while(|l| !l.contains(&marker)).take(3).collect::<Vec<_>>().join("\n");
    let log = build(&first, &first_tag);
    assert!(!run_step(&log).contains("CACHED"), "first build already cached: {log}");
    drop(first);
    assert!(eventually(Duration::from_secs(15), || !engine_has("image", &first_tag)), "image not cleaned");

    let second_tag = cleanup.image(&format!("{}:2", unique("cached")));
    let second = proxy_to(&url);
    let log = build(&second, &second_tag);
    assert!(run_step(&log).contains("CACHED"), "the RUN step was not cached after cleanup:\n{log}");
}

#[test]
fn ending_a_session_cleans_up_now_and_the_next_command_starts_another() {
    ensure_images();
    let dir = tempfile::tempdir().expect("dir");
    let (_agent, url) = agent(dir.path(), 0, &["--idle-timeout", "1h"]);
    let proxy = proxy_to(&url);
    let mut cleanup = Cleanup::default();
    let name = cleanup.container(&unique("ended"));
    docker(&proxy, &["create", "--name", &name, IMAGE, "true"]);
    let response = raw_exchange(
        &proxy.socket,
        b"DELETE /_offload/v1/session HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
        Duration::from_secs(30),
    );
    let text = String::from_utf8_lossy(&response);
    assert!(text.starts_with("HTTP/1.1 200") && text.contains("\"containers\":1"), "{text}");
    assert!(!engine_has("container", &name));
    docker(&proxy, &["ps"]);
    assert!(eventually(Duration::from_secs(5), || proxy
        .log_text()
        .contains("the previous session had ended")));
}

#[test]
fn on_idle_exit_runs_once_no_session_is_left() {
    let dir = tempfile::tempdir().expect("dir");
    let marker: PathBuf = dir.path().join("powered-off");
    let command = format!("touch {}", marker.display());
    let (mut agent, _) = agent(dir.path(), 0, &["--idle-timeout", "1s", "--on-idle-exit", &command]);
    assert!(eventually(Duration::from_secs(10), || marker.exists()), "--on-idle-exit did not run");
    assert!(eventually(Duration::from_secs(10), || agent.exited()), "the agent did not exit");
}

#[test]
fn an_oversized_create_body_is_refused_with_a_clear_error() {
    use std::io::{Read, Write};
    let dir = tempfile::tempdir().expect("dir");
    let (_agent, url) = agent(dir.path(), 0, &[]);
    let proxy = proxy_to(&url);
    // 17 MiB of valid JSON: the agent reads create bodies (to label them) up to 16 MiB.
    let filler = "a".repeat(17 << 20);
    let body = format!(r#"{{"Image":"{IMAGE}","Env":["X={filler}"]}}"#);
    let head = format!(
        "POST /containers/create HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    let mut stream = std::os::unix::net::UnixStream::connect(&proxy.socket).expect("connect");
    stream.set_read_timeout(Some(Duration::from_secs(30))).expect("timeout");
    let mut writer = stream.try_clone().expect("clone");
    // The answer may come before the whole body is sent; write on the side.
    let sender = std::thread::spawn(move || {
        let _ = writer.write_all(head.as_bytes()).and_then(|()| writer.write_all(body.as_bytes()));
    });
    let mut response = Vec::new();
    let _ = stream.read_to_end(&mut response);
    let _ = sender.join();
    let text = String::from_utf8_lossy(&response);
    assert!(text.starts_with("HTTP/1.1 413"), "{}", &text[..text.len().min(400)]);
    assert!(text.contains("larger than 16 MiB"), "{text}");
    // The proxy still serves everyone else.
    assert!(ping_ok(&proxy.socket));
}
