// Client scenarios shared by every path to the engine (direct, agent over TLS,
// agent over SSH). Included by tests/clients_*.rs, each of which defines
// `start_proxy()`; kept in one file so every path runs exactly the same checks.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use bollard::container::LogOutput;
use bollard::exec::{CreateExecOptions, StartExecResults};
use bollard::models::ContainerCreateBody;
use bollard::query_parameters::{CreateContainerOptionsBuilder, RemoveContainerOptionsBuilder, StartContainerOptions};
use bollard::Docker;
use futures_util::StreamExt;
use tokio::io::AsyncWriteExt;

use support::*;

const LIMIT: Duration = Duration::from_secs(60);

fn both_clis() -> [&'static str; 2] {
    [DOCKER_28, DOCKER_20]
}

#[test]
fn run_with_stdin_eof_prints_input_and_exits_zero() {
    ensure_images();
    let proxy = start_proxy();
    for cli in both_clis() {
        let mut command = proxy.docker(cli);
        command.args(["run", "-i", "--rm", IMAGE, "cat"]);
        let out = ok(run(command, Some(b"hi\n"), LIMIT));
        assert_eq!(out, "hi\n", "{cli}");
    }
}

#[test]
fn run_reports_the_container_exit_code() {
    ensure_images();
    let proxy = start_proxy();
    for cli in both_clis() {
        let mut command = proxy.docker(cli);
        command.args(["run", "--rm", IMAGE, "sh", "-c", "echo out; echo err >&2; exit 3"]);
        let output = run(command, None, LIMIT);
        assert_eq!(output.status.code(), Some(3), "{cli}");
        assert_eq!(output.stdout, b"out\n", "{cli}");
        assert_eq!(output.stderr, b"err\n", "{cli}");
    }
}

#[test]
fn exec_with_and_without_stdin() {
    ensure_images();
    let proxy = start_proxy();
    let mut cleanup = Cleanup::default();
    let name = cleanup.container(&unique("exec"));
    let mut command = proxy.docker(DOCKER_28);
    command.args(["run", "-d", "--name", &name, IMAGE, "sleep", "300"]);
    ok(run(command, None, LIMIT));

    for cli in both_clis() {
        // Without -i the CLI half-closes right after the upgrade and still reads.
        let mut command = proxy.docker(cli);
        command.args(["exec", &name, "echo", "hi"]);
        assert_eq!(ok(run(command, None, LIMIT)), "hi\n", "{cli}");

        let mut command = proxy.docker(cli);
        command.args(["exec", "-i", &name, "cat"]);
        assert_eq!(ok(run(command, Some(b"piped\n"), LIMIT)), "piped\n", "{cli}");

        let mut command = proxy.docker(cli);
        command.args(["exec", &name, "sh", "-c", "exit 5"]);
        assert_eq!(run(command, None, LIMIT).status.code(), Some(5), "{cli}");
    }
}

#[test]
fn tty_session_through_a_pseudo_terminal() {
    ensure_images();
    let proxy = start_proxy();
    let inner = format!("{DOCKER_28} run -it --rm {IMAGE} sh -c 'tty; stty size; echo tty-ok; exit 4'");
    let mut command = Command::new("script");
    command
        .args(["-q", "-e", "-c", &inner, "/dev/null"])
        .env("DOCKER_HOST", proxy.host())
        .env("DOCKER_CONFIG", proxy.dir.path().join("docker-config"));
    let output = run(command, None, LIMIT);
    let text = String::from_utf8_lossy(&output.stdout);
    assert!(text.contains("/dev/pts/"), "no tty inside: {text:?}");
    assert!(text.contains("tty-ok"), "{text:?}");
    assert_eq!(output.status.code(), Some(4), "{text:?}");
}

#[test]
fn logs_follow_delivers_each_line_promptly() {
    ensure_images();
    let proxy = start_proxy();
    let mut cleanup = Cleanup::default();
    let name = cleanup.container(&unique("logs"));
    // `cat` with stdin open: whatever we write to its stdin becomes a log line.
    let mut command = engine();
    command.args(["run", "-d", "-i", "--name", &name, IMAGE, "cat"]);
    ok(run(command, None, LIMIT));
    let mut stdin = attach_stdin(&name);

    let mut follower = proxy
        .docker(DOCKER_28)
        .args(["logs", "-f", &name])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("docker logs -f");
    let (lines_tx, lines) = mpsc::channel();
    let stdout = follower.stdout.take().expect("stdout");
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            let _ = lines_tx.send((line, Instant::now()));
        }
    });

    // Wait until the follower is attached: a first line makes it through.
    stdin.write_all(b"warm-up\n").expect("write");
    let (first, _) = lines.recv_timeout(Duration::from_secs(20)).expect("first line");
    assert_eq!(first, "warm-up");

    let mut delays = Vec::new();
    for i in 0..5 {
        std::thread::sleep(Duration::from_millis(200));
        let sent = Instant::now();
        stdin.write_all(format!("line-{i}\n").as_bytes()).expect("write");
        let (line, arrived) = lines.recv_timeout(Duration::from_secs(10)).expect("line arrives");
        assert_eq!(line, format!("line-{i}"));
        delays.push(arrived - sent);
    }
    let _ = follower.kill();
    let _ = follower.wait();
    delays.sort();
    let median = delays[delays.len() / 2];
    assert!(median < Duration::from_millis(100), "logs -f delays {delays:?}");
}

/// Opens a raw attach to the container's stdin directly at the engine.
fn attach_stdin(name: &str) -> UnixStream {
    let mut stream = UnixStream::connect(ENGINE_SOCKET).expect("engine");
    let request = format!(
        "POST /containers/{name}/attach?stream=1&stdin=1 HTTP/1.1\r\nHost: api.moby.localhost\r\nConnection: Upgrade\r\nUpgrade: tcp\r\nContent-Length: 0\r\n\r\n"
    );
    stream.write_all(request.as_bytes()).expect("attach");
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        stream.read_exact(&mut byte).expect("attach head");
        head.push(byte[0]);
    }
    assert!(head.starts_with(b"HTTP/1.1 101"), "{}", String::from_utf8_lossy(&head));
    stream
}

#[test]
fn events_stream_delivers_container_lifecycle() {
    ensure_images();
    let proxy = start_proxy();
    let mut cleanup = Cleanup::default();
    let name = cleanup.container(&unique("events"));
    let mut events = proxy
        .docker(DOCKER_28)
        .args(["events", "--filter", &format!("container={name}"), "--format", "{{.Action}}"])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("docker events");
    let (tx, actions) = mpsc::channel();
    let stdout = events.stdout.take().expect("stdout");
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    // Let the events request reach the engine before anything happens.
    std::thread::sleep(Duration::from_millis(500));
    let mut command = proxy.docker(DOCKER_28);
    command.args(["run", "--name", &name, "--rm", IMAGE, "true"]);
    ok(run(command, None, LIMIT));

    let mut seen = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(20);
    while !seen.iter().any(|a| a == "destroy") && Instant::now() < deadline {
        if let Ok(action) = actions.recv_timeout(Duration::from_millis(200)) {
            seen.push(action);
        }
    }
    let _ = events.kill();
    let _ = events.wait();
    for expected in ["create", "start", "die", "destroy"] {
        assert!(seen.iter().any(|a| a == expected), "missing {expected} in {seen:?}");
    }
}

#[test]
fn wait_and_stats() {
    ensure_images();
    let proxy = start_proxy();
    let mut cleanup = Cleanup::default();
    let sleeper = cleanup.container(&unique("wait"));
    let mut command = proxy.docker(DOCKER_28);
    command.args(["run", "-d", "--name", &sleeper, IMAGE, "sh", "-c", "sleep 1; exit 7"]);
    ok(run(command, None, LIMIT));
    let mut command = proxy.docker(DOCKER_28);
    command.args(["wait", &sleeper]);
    assert_eq!(ok(run(command, None, LIMIT)), "7\n");

    let runner = cleanup.container(&unique("stats"));
    let mut command = proxy.docker(DOCKER_28);
    command.args(["run", "-d", "--name", &runner, IMAGE, "sleep", "300"]);
    ok(run(command, None, LIMIT));
    let mut command = proxy.docker(DOCKER_28);
    command.args(["stats", "--no-stream", "--format", "{{.Name}} {{.MemUsage}}", &runner]);
    let out = ok(run(command, None, LIMIT));
    assert!(out.starts_with(&format!("{runner} ")), "{out:?}");
    assert!(out.contains("iB"), "{out:?}");
}

fn build_context(dir: &std::path::Path, marker: &str) {
    std::fs::write(dir.join("payload.txt"), format!("{marker}\n")).expect("payload");
    std::fs::write(
        dir.join("Dockerfile"),
        format!("FROM {IMAGE}\nCOPY payload.txt /payload.txt\nRUN cat /payload.txt\nCMD [\"cat\", \"/payload.txt\"]\n"),
    )
    .expect("Dockerfile");
}

#[test]
fn classic_and_buildkit_builds() {
    ensure_images();
    let proxy = start_proxy();
    let mut cleanup = Cleanup::default();
    // Classic builder with CLI 28 (no buildx here) and CLI 20.10; BuildKit with
    // CLI 20.10, which drives the build through the hijacked `/session`.
    let cases = [(DOCKER_28, "0"), (DOCKER_20, "0"), (DOCKER_20, "1")];
    for (cli, buildkit) in cases {
        let dir = tempfile::tempdir().expect("context");
        let tag = cleanup.image(&format!("{}:latest", unique("build")));
        let marker = unique("marker");
        build_context(dir.path(), &marker);
        let mut command = proxy.docker(cli);
        command.env("DOCKER_BUILDKIT", buildkit).args(["build", "--no-cache", "-t", &tag]).arg(dir.path());
        let output = run(command, None, Duration::from_secs(120));
        let log =
            format!("{}{}", String::from_utf8_lossy(&output.stdout), String::from_utf8_lossy(&output.stderr));
        assert!(output.status.success(), "{cli} BUILDKIT={buildkit}: {log}");
        if buildkit == "1" {
            assert!(log.contains("naming to"), "not a BuildKit build: {log}");
        }
        let mut command = proxy.docker(DOCKER_28);
        command.args(["run", "--rm", &tag]);
        assert_eq!(ok(run(command, None, LIMIT)), format!("{marker}\n"));
    }
}

#[test]
fn cp_both_ways() {
    ensure_images();
    let proxy = start_proxy();
    let mut cleanup = Cleanup::default();
    let name = cleanup.container(&unique("cp"));
    let mut command = proxy.docker(DOCKER_28);
    command.args(["run", "-d", "--name", &name, IMAGE, "sleep", "300"]);
    ok(run(command, None, LIMIT));

    let dir = tempfile::tempdir().expect("dir");
    let source = dir.path().join("in.bin");
    let content: Vec<u8> = (0..300_000u32).map(|i| (i * 7 % 251) as u8).collect();
    std::fs::write(&source, &content).expect("write");
    let mut command = proxy.docker(DOCKER_28);
    command.arg("cp").arg(&source).arg(format!("{name}:/tmp/in.bin"));
    ok(run(command, None, LIMIT));
    let back = dir.path().join("back.bin");
    let mut command = proxy.docker(DOCKER_20);
    command.arg("cp").arg(format!("{name}:/tmp/in.bin")).arg(&back);
    ok(run(command, None, LIMIT));
    assert_eq!(std::fs::read(&back).expect("read back"), content);
}

#[test]
fn save_and_load_a_large_image() {
    ensure_images();
    let proxy = start_proxy();
    let mut cleanup = Cleanup::default();
    let dir = tempfile::tempdir().expect("dir");

    // A 100 MiB incompressible root filesystem, imported through the proxy.
    let rootfs = dir.path().join("rootfs");
    std::fs::create_dir(&rootfs).expect("rootfs");
    let mut blob = std::fs::File::create(rootfs.join("blob")).expect("blob");
    let mut state: u64 = 0x9E37_79B9_7F4A_7C15;
    let mut chunk = vec![0u8; 1 << 20];
    for _ in 0..100 {
        for byte in chunk.iter_mut() {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            *byte = state as u8;
        }
        blob.write_all(&chunk).expect("write blob");
    }
    drop(blob);
    let tarball = dir.path().join("rootfs.tar");
    ok(run(
        {
            let mut tar = Command::new("tar");
            tar.arg("-C").arg(&rootfs).arg("-cf").arg(&tarball).arg(".");
            tar
        },
        None,
        LIMIT,
    ));
    let tag = cleanup.image(&format!("{}:latest", unique("big")));
    let mut command = proxy.docker(DOCKER_28);
    command.arg("import").arg(&tarball).arg(&tag);
    ok(run(command, None, Duration::from_secs(180)));
    let image_id = |proxy: &Proxy| {
        let mut command = proxy.docker(DOCKER_28);
        command.args(["image", "inspect", "--format", "{{.Id}}", &tag]);
        ok(run(command, None, LIMIT)).trim().to_string()
    };
    let original = image_id(&proxy);

    let saved = dir.path().join("saved.tar");
    let mut command = proxy.docker(DOCKER_28);
    command.arg("save").arg("-o").arg(&saved).arg(&tag);
    ok(run(command, None, Duration::from_secs(180)));
    let size = std::fs::metadata(&saved).expect("saved").len();
    assert!(size >= 100 << 20, "saved archive is only {size} bytes");

    let mut command = proxy.docker(DOCKER_28);
    command.args(["rmi", &tag]);
    ok(run(command, None, LIMIT));
    let mut command = proxy.docker(DOCKER_20);
    command.arg("load").arg("-i").arg(&saved);
    let out = ok(run(command, None, Duration::from_secs(180)));
    assert!(out.contains(&format!("Loaded image: {tag}")), "{out}");
    assert_eq!(image_id(&proxy), original);
}

fn run_script(proxy: &Proxy, script: &str) {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/python").join(script);
    let mut command = Command::new("python3");
    command
        .arg(path)
        .env("DOCKER_HOST", proxy.host())
        .env("DOCKER_CONFIG", proxy.dir.path().join("docker-config"))
        .env("OFFLOAD_TEST_IMAGE", IMAGE)
        .env_remove("DOCKER_CONTEXT");
    let output = run(command, None, Duration::from_secs(150));
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "{script} failed:\n{stdout}\n{}\nproxy log:\n{}",
        String::from_utf8_lossy(&output.stderr),
        proxy.log_text()
    );
    assert!(stdout.contains(" passed, 0 failed"), "{stdout}");
}

#[test]
fn docker_py_scenarios() {
    ensure_images();
    let proxy = start_proxy();
    run_script(&proxy, "docker_py_checks.py");
}

#[test]
fn docker_compose_v1_scenarios() {
    ensure_images();
    let proxy = start_proxy();
    run_script(&proxy, "compose_checks.py");
}

fn connect(proxy: &Proxy) -> Docker {
    let socket = proxy.socket.to_str().expect("utf-8 path");
    Docker::connect_with_unix(socket, 60, bollard::API_DEFAULT_VERSION).expect("connect")
}

#[tokio::test]
async fn ping_version_and_negotiation() {
    let proxy = start_proxy();
    let docker = connect(&proxy).negotiate_version().await.expect("negotiate");
    assert_eq!(docker.ping().await.expect("ping"), "OK");
    let version = docker.version().await.expect("version");
    assert!(version.api_version.is_some_and(|v| !v.is_empty()));
}

#[tokio::test]
async fn exec_with_stdin_and_write_half_shutdown() {
    ensure_images();
    let proxy = start_proxy();
    let mut cleanup = Cleanup::default();
    let name = cleanup.container(&unique("bollard"));
    let docker = connect(&proxy);
    docker
        .create_container(
            Some(CreateContainerOptionsBuilder::new().name(&name).build()),
            ContainerCreateBody {
                image: Some(IMAGE.to_string()),
                cmd: Some(vec!["sleep".to_string(), "300".to_string()]),
                ..Default::default()
            },
        )
        .await
        .expect("create");
    docker.start_container(&name, None::<StartContainerOptions>).await.expect("start");

    for round in 0..3 {
        let exec = docker
            .create_exec(
                &name,
                CreateExecOptions {
                    cmd: Some(vec!["sh", "-c", "cat; echo done >&2"]),
                    attach_stdin: Some(true),
                    attach_stdout: Some(true),
                    attach_stderr: Some(true),
                    ..Default::default()
                },
            )
            .await
            .expect("create exec");
        let StartExecResults::Attached { mut output, mut input } =
            docker.start_exec(&exec.id, None).await.expect("start exec")
        else {
            panic!("exec started detached");
        };
        let payload = format!("round-{round}\n").repeat(5000);
        input.write_all(payload.as_bytes()).await.expect("stdin");
        // Half-close: `cat` sees EOF, finishes, and the output still arrives.
        input.shutdown().await.expect("shutdown");
        let mut stdout = Vec::new();
        let mut stderr = Vec::new();
        while let Some(frame) = output.next().await {
            match frame.expect("frame") {
                LogOutput::StdOut { message } => stdout.extend_from_slice(&message),
                LogOutput::StdErr { message } => stderr.extend_from_slice(&message),
                _ => {}
            }
        }
        assert_eq!(stdout, payload.as_bytes(), "round {round}");
        assert_eq!(stderr, b"done\n", "round {round}");
        let inspect = docker.inspect_exec(&exec.id).await.expect("inspect exec");
        assert_eq!(inspect.exit_code, Some(0));
    }

    docker
        .remove_container(&name, Some(RemoveContainerOptionsBuilder::new().force(true).build()))
        .await
        .expect("remove");
}
