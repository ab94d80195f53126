//! docker-py and docker-compose 1.29 through the proxy (scripts in tests/python/).

mod support;

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use support::*;

fn run_script(proxy: &Proxy, script: &str) {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/python")
        .join(script);
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
    let proxy = Proxy::start();
    run_script(&proxy, "docker_py_checks.py");
}

#[test]
fn docker_compose_v1_scenarios() {
    ensure_images();
    let proxy = Proxy::start();
    run_script(&proxy, "compose_checks.py");
}
