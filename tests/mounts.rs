//! Bind mounts on a "remote" engine: the proxy talks to an agent over the
//! link, so every local source is synced to the agent's copy and back. The
//! engine is this machine's, which lets the tests look at both sides.

mod support;

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use support::*;

const LIMIT: Duration = Duration::from_secs(60);
const IMAGE: &str = "offload-test/busybox:latest";

fn docker(proxy: &Proxy, args: &[&str]) -> String {
    let mut command = proxy.docker(DOCKER_28);
    command.args(args);
    ok(run(command, None, LIMIT)).trim_end().to_string()
}

/// Runs the docker CLI and returns (success, stdout + stderr).
fn try_docker(proxy: &Proxy, args: &[&str]) -> (bool, String) {
    let mut command = proxy.docker(DOCKER_28);
    command.args(args);
    let output = run(command, None, LIMIT);
    let text =
        String::from_utf8_lossy(&output.stdout).into_owned() + &String::from_utf8_lossy(&output.stderr);
    (output.status.success(), text)
}

/// A proxy whose link to the agent has `rtt` of delay: long enough that a
/// sync without a barrier would lose the race against the docker CLI.
struct DelayedLink {
    // Field order is drop order: the proxy first, then relay and agent.
    proxy: Proxy,
    _relay: support::delay::DelayRelay,
    _agent: AgentProcess,
    _dir: tempfile::TempDir,
}

fn delayed_link(rtt: Duration) -> DelayedLink {
    let dir = tempfile::tempdir().expect("tmp");
    let state = dir.path().join("state").display().to_string();
    let (agent, url) = AgentProcess::start(
        dir.path(),
        &["--listen".into(), "tcp://127.0.0.1:0".into(), "--insecure".into(), "--state-dir".into(), state],
    );
    let address = url.trim_start_matches("tcp://").parse().expect("agent address");
    let relay = support::delay::DelayRelay::start(address, rtt);
    let proxy = Proxy::start_with(&["--remote", &format!("tcp://{}", relay.addr), "--insecure"]);
    DelayedLink { proxy, _relay: relay, _agent: agent, _dir: dir }
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_default()
}

fn bind(dir: &Path, target: &str) -> String {
    format!("{}:{target}", dir.display())
}

#[test]
fn what_the_container_writes_is_here_when_run_returns_every_time() {
    ensure_images();
    let link = delayed_link(Duration::from_millis(40));
    let proxy = &link.proxy;
    let work = tempfile::tempdir().expect("tmp");
    std::fs::write(work.path().join("in.txt"), "hello").expect("write");
    for i in 0..50 {
        // Every tenth run writes 16 MB first: without the barrier, the last
        // write would still be on its way over the delayed link when the CLI returns.
        let blob = if i % 10 == 9 { 16_000_000 } else { 0 };
        let script = format!(
            "cat /w/in.txt > /dev/null && head -c {blob} /dev/urandom > /w/blob && echo done{i} > /w/out"
        );
        docker(proxy, &["run", "--rm", "-v", &bind(work.path(), "/w"), IMAGE, "sh", "-c", &script]);
        assert_eq!(
            read(&work.path().join("out")).trim(),
            format!("done{i}"),
            "run {i}: {}",
            proxy.log_text()
        );
        assert_eq!(std::fs::metadata(work.path().join("blob")).map(|m| m.len()).ok(), Some(blob), "run {i}");
    }
}

#[test]
fn what_an_exec_writes_is_here_when_exec_returns() {
    ensure_images();
    let link = delayed_link(Duration::from_millis(100));
    let proxy = &link.proxy;
    let work = tempfile::tempdir().expect("tmp");
    let mut cleanup = Cleanup::default();
    let name = cleanup.container(&unique("exec"));
    docker(proxy, &["run", "-d", "--name", &name, "-v", &bind(work.path(), "/w"), IMAGE, "sleep", "60"]);
    for i in 0..20 {
        // With and without a TTY-less attach: `-i` keeps stdin attached.
        let interactive = if i % 2 == 0 { "-i" } else { "-d=false" };
        let script = format!("head -c 8000000 /dev/urandom > /w/big.bin && echo exec{i} > /w/exec.txt");
        docker(proxy, &["exec", interactive, &name, "sh", "-c", &script]);
        assert_eq!(read(&work.path().join("exec.txt")).trim(), format!("exec{i}"), "exec {i}");
        assert_eq!(std::fs::metadata(work.path().join("big.bin")).map(|m| m.len()).unwrap_or(0), 8_000_000);
    }
}

#[test]
fn a_running_container_sees_edits_and_its_writes_come_back_without_any_barrier() {
    ensure_images();
    let proxy = Proxy::start_via(Via::UnixAgent);
    let work = tempfile::tempdir().expect("tmp");
    let mut cleanup = Cleanup::default();
    let name = cleanup.container(&unique("live"));
    // The container answers each trigger by itself: no docker call in between.
    let script = "i=0; while [ $i -lt 3 ]; do while [ ! -f /w/trigger$i ]; do sleep 0.02; done; \
                  cat /w/trigger$i > /w/seen$i; i=$((i+1)); done; sleep 30";
    docker(
        &proxy,
        &["run", "-d", "--name", &name, "-v", &bind(work.path(), "/w"), IMAGE, "sh", "-c", script],
    );
    for i in 0..3 {
        let started = Instant::now();
        std::fs::write(work.path().join(format!("trigger{i}")), format!("edit {i}")).expect("write");
        let seen = work.path().join(format!("seen{i}"));
        let arrived = eventually(Duration::from_secs(10), || read(&seen) == format!("edit {i}"));
        assert!(arrived, "edit {i} never came back: {}", proxy.log_text());
        // There and back again: each direction well within a second.
        assert!(started.elapsed() < Duration::from_secs(2), "round trip took {:?}", started.elapsed());
    }
}

#[test]
fn deletions_and_renames_travel_both_ways() {
    ensure_images();
    let proxy = Proxy::start_via(Via::UnixAgent);
    let work = tempfile::tempdir().expect("tmp");
    let mut cleanup = Cleanup::default();
    let name = cleanup.container(&unique("renames"));
    std::fs::create_dir_all(work.path().join("dir/sub")).expect("mkdir");
    for file in ["a.txt", "b.txt", "dir/sub/c.txt", "gone.txt"] {
        std::fs::write(work.path().join(file), file).expect("write");
    }
    docker(&proxy, &["run", "-d", "--name", &name, "-v", &bind(work.path(), "/w"), IMAGE, "sleep", "60"]);
    // Here → there (exec flushes first, so no waiting is needed).
    std::fs::remove_file(work.path().join("gone.txt")).expect("rm");
    std::fs::rename(work.path().join("a.txt"), work.path().join("renamed.txt")).expect("mv");
    std::fs::rename(work.path().join("dir"), work.path().join("moved")).expect("mv dir");
    let listing = docker(&proxy, &["exec", &name, "sh", "-c", "cd /w && find . | sort"]);
    let paths: Vec<&str> = listing.lines().collect();
    assert_eq!(paths, vec![".", "./b.txt", "./moved", "./moved/sub", "./moved/sub/c.txt", "./renamed.txt"]);
    // There → here, with no docker call to trigger it.
    docker(
        &proxy,
        &["exec", &name, "sh", "-c", "rm /w/b.txt && mv /w/renamed.txt /w/back.txt && rm -r /w/moved"],
    );
    let synced = eventually(Duration::from_secs(10), || {
        let mut names: Vec<String> = std::fs::read_dir(work.path())
            .map(|d| d.flatten().map(|e| e.file_name().to_string_lossy().into_owned()).collect())
            .unwrap_or_default();
        names.sort();
        names == ["back.txt"]
    });
    assert!(synced, "{:?}", std::fs::read_dir(work.path()).map(|d| d.count()));
    assert_eq!(read(&work.path().join("back.txt")), "a.txt");
}

#[test]
fn a_single_file_bind_follows_edits_that_replace_the_file() {
    ensure_images();
    let proxy = Proxy::start_via(Via::UnixAgent);
    let work = tempfile::tempdir().expect("tmp");
    let mut cleanup = Cleanup::default();
    let name = cleanup.container(&unique("single"));
    let config = work.path().join("app.conf");
    std::fs::write(&config, "version 1").expect("write");
    docker(
        &proxy,
        &[
            "run",
            "-d",
            "--name",
            &name,
            "-v",
            &format!("{}:/etc/app.conf", config.display()),
            IMAGE,
            "sleep",
            "60",
        ],
    );
    assert_eq!(docker(&proxy, &["exec", &name, "cat", "/etc/app.conf"]), "version 1");
    // Editors save by writing a new file and renaming it over the old one.
    let temporary = work.path().join(".app.conf.swp");
    std::fs::write(&temporary, "version 2").expect("write");
    std::fs::rename(&temporary, &config).expect("rename");
    assert_eq!(docker(&proxy, &["exec", &name, "cat", "/etc/app.conf"]), "version 2");
    assert!(!work.path().join(".app.conf.swp").exists());
    let listing = docker(&proxy, &["exec", &name, "ls", "/etc"]);
    assert!(!listing.contains("swp"), "only the one file is synced: {listing}");
}

#[test]
fn missing_sources_binds_mounts_and_read_only() {
    ensure_images();
    let proxy = Proxy::start_via(Via::UnixAgent);
    let work = tempfile::tempdir().expect("tmp");
    // `-v` creates a missing source, as the engine does on its own host.
    let missing = work.path().join("new/dir");
    let script = "echo made > /m/file";
    docker(&proxy, &["run", "--rm", "-v", &bind(&missing, "/m"), IMAGE, "sh", "-c", script]);
    assert_eq!(read(&missing.join("file")).trim(), "made");
    // `--mount` refuses one, with the engine's wording and the local path.
    let absent = work.path().join("absent");
    let mount = format!("type=bind,source={},target=/m", absent.display());
    let (success, text) = try_docker(&proxy, &["run", "--rm", "--mount", &mount, IMAGE, "true"]);
    assert!(!success);
    assert!(text.contains(&format!("bind source path does not exist: {}", absent.display())), "{text}");
    assert!(!absent.exists());
    // `--mount` and `:ro` on an existing directory.
    std::fs::write(work.path().join("data.txt"), "data").expect("write");
    let mount = format!("type=bind,source={},target=/d,readonly", work.path().display());
    assert_eq!(docker(&proxy, &["run", "--rm", "--mount", &mount, IMAGE, "cat", "/d/data.txt"]), "data");
    let read_only = format!("{}:/d:ro", work.path().display());
    let (success, text) =
        try_docker(&proxy, &["run", "--rm", "-v", &read_only, IMAGE, "sh", "-c", "echo x > /d/data.txt"]);
    assert!(!success && text.contains("Read-only"), "{text}");
}

#[test]
fn inspect_and_list_show_local_paths() {
    ensure_images();
    let proxy = Proxy::start_via(Via::UnixAgent);
    let work = tempfile::tempdir().expect("tmp");
    let mut cleanup = Cleanup::default();
    let name = cleanup.container(&unique("inspect"));
    let spec = format!("{}:/w:ro", work.path().display());
    docker(&proxy, &["create", "--name", &name, "-v", &spec, IMAGE, "true"]);
    let sources = docker(&proxy, &["inspect", "--format", "{{range .Mounts}}{{.Source}}{{end}}", &name]);
    assert_eq!(sources, work.path().display().to_string());
    let binds = docker(&proxy, &["inspect", "--format", "{{json .HostConfig.Binds}}", &name]);
    assert_eq!(binds, format!("[\"{spec}\"]"));
    let listed = docker(
        &proxy,
        &["ps", "-a", "--no-trunc", "--filter", &format!("name={name}"), "--format", "{{.Mounts}}"],
    );
    assert_eq!(listed, work.path().display().to_string());
    // The engine itself holds the agent's copy, not the local path.
    let mut command = engine();
    command.args(["inspect", "--format", "{{range .Mounts}}{{.Source}}{{end}}", &name]);
    let remote = ok(run(command, None, LIMIT));
    assert!(remote.contains("/sync/") && remote != work.path().display().to_string(), "{remote}");
}

#[test]
fn sync_stops_when_no_container_uses_the_mount() {
    ensure_images();
    let proxy = Proxy::start_via(Via::UnixAgent);
    let work = tempfile::tempdir().expect("tmp");
    let mut cleanup = Cleanup::default();
    let (first, second) = (cleanup.container(&unique("user1")), cleanup.container(&unique("user2")));
    for name in [&first, &second] {
        docker(&proxy, &["create", "--name", name, "-v", &bind(work.path(), "/w"), IMAGE, "true"]);
    }
    let stopped = || proxy.log_text().contains("no container uses the mount any more");
    docker(&proxy, &["rm", &first]);
    std::thread::sleep(Duration::from_millis(500));
    assert!(!stopped(), "another container still uses it");
    docker(&proxy, &["rm", &second]);
    // Checked every 15 s, and only once no create has named it for 10 s.
    assert!(eventually(Duration::from_secs(40), stopped), "{}", proxy.log_text());
}

#[test]
fn offloadignore_excludes_paths_both_ways() {
    ensure_images();
    let proxy = Proxy::start_via(Via::UnixAgent);
    let work = tempfile::tempdir().expect("tmp");
    std::fs::write(work.path().join(".offloadignore"), "*.log\nnode_modules/\n").expect("write");
    std::fs::create_dir_all(work.path().join("node_modules/pkg")).expect("mkdir");
    std::fs::write(work.path().join("node_modules/pkg/index.js"), "x").expect("write");
    std::fs::write(work.path().join("debug.log"), "x").expect("write");
    std::fs::write(work.path().join("keep.txt"), "x").expect("write");
    let script = "cd /w && find . | sort && echo out > /w/written.log && echo out > /w/written.txt";
    let listing = docker(&proxy, &["run", "--rm", "-v", &bind(work.path(), "/w"), IMAGE, "sh", "-c", script]);
    assert_eq!(listing.lines().collect::<Vec<_>>(), vec![".", "./.offloadignore", "./keep.txt"]);
    assert!(work.path().join("written.txt").exists(), "not ignored: comes back");
    assert!(!work.path().join("written.log").exists(), "ignored: stays remote");
}

#[test]
fn the_docker_socket_bind_means_the_remote_engine() {
    ensure_images();
    let proxy = Proxy::start_via(Via::UnixAgent);
    for source in ["/var/run/docker.sock".to_string(), proxy.socket.display().to_string()] {
        let spec = format!("{source}:/var/run/docker.sock");
        let kind =
            docker(&proxy, &["run", "--rm", "-v", &spec, IMAGE, "stat", "-c", "%F", "/var/run/docker.sock"]);
        assert_eq!(kind, "socket", "{source}");
    }
}

#[test]
fn both_sides_writing_at_once_keeps_the_local_version_and_the_remote_one_beside_it() {
    ensure_images();
    let proxy = Proxy::start_via(Via::UnixAgent);
    let work = tempfile::tempdir().expect("tmp");
    let mut cleanup = Cleanup::default();
    let name = cleanup.container(&unique("conflict"));
    std::fs::write(work.path().join("notes.txt"), "original").expect("write");
    docker(&proxy, &["run", "-d", "--name", &name, "-v", &bind(work.path(), "/w"), IMAGE, "sleep", "60"]);
    // Freeze the proxy so neither write can be synced before the other.
    let signal = |sig: &str| {
        let status = Command::new("kill").args([sig, &proxy.pid().to_string()]).status().expect("kill");
        assert!(status.success());
    };
    signal("-STOP");
    let mut command = engine();
    command.args(["exec", &name, "sh", "-c", "echo container > /w/notes.txt"]);
    let container_write = run(command, None, LIMIT);
    std::fs::write(work.path().join("notes.txt"), "local").expect("write");
    signal("-CONT");
    ok(container_write);
    let conflict_copy = || {
        std::fs::read_dir(work.path()).ok()?.flatten().map(|e| e.path()).find(|p| {
            p.file_name().is_some_and(|n| n.to_string_lossy().starts_with("notes.conflict-remote-"))
        })
    };
    assert!(eventually(Duration::from_secs(10), || conflict_copy().is_some()), "{}", proxy.log_text());
    assert_eq!(read(&work.path().join("notes.txt")), "local", "the local version wins");
    let copy = conflict_copy().expect("conflict copy");
    assert_eq!(read(&copy).trim(), "container");
    let copy_name = copy.file_name().expect("name").to_string_lossy().into_owned();
    let inside =
        docker(&proxy, &["exec", &name, "sh", "-c", &format!("cat /w/notes.txt; echo; cat /w/{copy_name}")]);
    assert_eq!(inside.lines().collect::<Vec<_>>(), vec!["local", "container"]);
    assert!(proxy.log_text().contains("your version wins"), "the proxy says so: {}", proxy.log_text());
}

#[test]
fn compose_relative_binds_and_file_secrets() {
    ensure_images();
    let proxy = Proxy::start_via(Via::UnixAgent);
    let project = tempfile::tempdir().expect("tmp");
    std::fs::create_dir(project.path().join("app")).expect("mkdir");
    std::fs::write(project.path().join("app/code.txt"), "code").expect("write");
    std::fs::write(project.path().join("secret.txt"), "s3cret").expect("write");
    let compose = format!(
        "version: '3.7'\nservices:\n  app:\n    image: {IMAGE}\n    volumes: ['./app:/app']\n    secrets: [token]\n\
         secrets:\n  token:\n    file: ./secret.txt\n"
    );
    std::fs::write(project.path().join("docker-compose.yml"), compose).expect("write");
    let project_name = unique("compose").replace('-', "");
    let compose_cmd = |args: &[&str]| {
        let mut command = Command::new("docker-compose");
        command
            .current_dir(project.path())
            .env("DOCKER_HOST", proxy.host())
            .args(["-p", &project_name])
            .args(args);
        run(command, None, LIMIT)
    };
    let output = compose_cmd(&[
        "run",
        "--rm",
        "app",
        "sh",
        "-c",
        "cat /app/code.txt /run/secrets/token; echo out > /app/new.txt",
    ]);
    let down = compose_cmd(&["down", "-v"]);
    let text = ok(output);
    ok(down);
    assert!(text.contains("codes3cret"), "{text}");
    assert_eq!(read(&project.path().join("app/new.txt")).trim(), "out");
}

#[test]
fn the_agent_caps_what_a_session_may_sync() {
    ensure_images();
    let dir = tempfile::tempdir().expect("tmp");
    let listen = format!("unix://{}", dir.path().join("agent.sock").display());
    let state = dir.path().join("state").display().to_string();
    let (_agent, url) = AgentProcess::start(
        dir.path(),
        &[
            "--listen".into(),
            listen,
            "--insecure".into(),
            "--state-dir".into(),
            state,
            "--max-sync-bytes".into(),
            "1M".into(),
        ],
    );
    let proxy = Proxy::start_with(&["--remote", &url, "--insecure"]);
    let work = tempfile::tempdir().expect("tmp");
    std::fs::write(work.path().join("big.bin"), vec![7u8; 2 << 20]).expect("write");
    let (success, text) = try_docker(&proxy, &["run", "--rm", "-v", &bind(work.path(), "/w"), IMAGE, "true"]);
    assert!(!success);
    assert!(text.contains("--max-sync-bytes"), "{text}");
}

/// A client that talks to the agent without the proxy (and so without its
/// rewriting): what it may bind is the agent's decision.
#[test]
fn the_agent_refuses_binds_and_sync_streams_that_leave_the_session() {
    use http_body_util::BodyExt;
    use offload::link::transport::{Dialer, RemoteAddress, SshOptions};
    use offload::upstream::link::LinkUpstream;
    use offload::upstream::Upstream;

    ensure_images();
    let dir = tempfile::tempdir().expect("tmp");
    let listen = format!("unix://{}", dir.path().join("agent.sock").display());
    let state = dir.path().join("state").display().to_string();
    let (_agent, url) = AgentProcess::start(
        dir.path(),
        &["--listen".into(), listen, "--insecure".into(), "--state-dir".into(), state],
    );
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
    runtime.block_on(async {
        let address = RemoteAddress::parse(&url).expect("address");
        let dialer = Dialer::new(address, &Default::default(), SshOptions::default()).expect("dialer");
        let link = LinkUpstream::new(dialer, Duration::from_secs(10));
        let send = |method: &str, path: &str, body: Vec<u8>| {
            let request = http::Request::builder()
                .method(method)
                .uri(path)
                .header("host", "docker")
                .header("content-type", "application/json")
                .body(offload::body::full(body))
                .expect("request");
            let link = &link;
            async move {
                let exchange = link.send(request).await.expect("send");
                let status = exchange.response.status();
                let body = exchange.response.into_body().collect().await.expect("body").to_bytes();
                (status.as_u16(), String::from_utf8_lossy(&body).into_owned())
            }
        };
        for bind in ["/:/host", "/etc:/x", "/tmp/../etc:/x"] {
            let create = format!(r#"{{"Image":"{IMAGE}","HostConfig":{{"Binds":["{bind}"]}}}}"#);
            let (status, text) = send("POST", "/containers/create", create.into_bytes()).await;
            assert_eq!(status, 403, "{bind}: {text}");
            assert!(text.contains("refuses to bind the remote host path"), "{text}");
        }
        let mount = r#"{"Image":"offload-test/busybox:latest","HostConfig":{"Mounts":[{"Type":"bind","Source":"/etc","Target":"/x"}]}}"#;
        let (status, _) = send("POST", "/containers/create", mount.as_bytes().to_vec()).await;
        assert_eq!(status, 403);
        let volume = r#"{"Name":"x","Driver":"local","DriverOpts":{"type":"none","o":"bind","device":"/etc"}}"#;
        let (status, text) = send("POST", "/volumes/create", volume.as_bytes().to_vec()).await;
        assert_eq!(status, 403, "{text}");
        // A sync stream with a path out of the mount is refused, nothing written.
        let (status, text) =
            send("POST", "/_offload/v1/sync/mounts", br#"{"local_path":"/home/u/app"}"#.to_vec()).await;
        assert_eq!(status, 200, "{text}");
        let info: serde_json::Value = serde_json::from_str(&text).expect("json");
        let id = info["mount_id"].as_str().expect("id");
        let hostile = hostile_stream("../escaped.txt");
        let (status, text) = send("POST", &format!("/_offload/v1/sync/mounts/{id}/push"), hostile).await;
        assert_eq!(status, 403, "{text}");
        let root = Path::new(info["remote_root"].as_str().expect("root"));
        assert!(!root.parent().expect("parent").join("escaped.txt").exists());
        let (status, _) = send("POST", &format!("/_offload/v1/sync/mounts/{id}/push"), b"garbage".to_vec()).await;
        assert_eq!(status, 400);
    });
}

/// A sync stream (zstd: `OFS1`, one record) whose one file has `path`.
fn hostile_stream(path: &str) -> Vec<u8> {
    use std::io::Write;
    let head = serde_json::json!({"path": path, "kind": "file", "mode": 420, "size": 1, "mtime_ns": 0});
    let head = serde_json::to_vec(&head).expect("json");
    let mut plain = b"OFS1".to_vec();
    plain.extend_from_slice(&(head.len() as u32).to_be_bytes());
    plain.extend_from_slice(&head);
    plain.push(b'x');
    plain.extend_from_slice(&0u32.to_be_bytes());
    let mut encoder = zstd::stream::Encoder::new(Vec::new(), 1).expect("zstd");
    encoder.write_all(&plain).expect("write");
    encoder.finish().expect("finish")
}
