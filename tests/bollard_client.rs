//! bollard (hyper-based Rust client) through the proxy.

mod support;

use bollard::container::LogOutput;
use bollard::exec::{CreateExecOptions, StartExecResults};
use bollard::models::ContainerCreateBody;
use bollard::query_parameters::{
    CreateContainerOptionsBuilder, RemoveContainerOptionsBuilder, StartContainerOptions,
};
use bollard::Docker;
use futures_util::StreamExt;
use tokio::io::AsyncWriteExt;

use support::*;

fn connect(proxy: &Proxy) -> Docker {
    let socket = proxy.socket.to_str().expect("utf-8 path");
    Docker::connect_with_unix(socket, 60, bollard::API_DEFAULT_VERSION).expect("connect")
}

#[tokio::test]
async fn ping_version_and_negotiation() {
    let proxy = Proxy::start();
    let docker = connect(&proxy)
        .negotiate_version()
        .await
        .expect("negotiate");
    assert_eq!(docker.ping().await.expect("ping"), "OK");
    let version = docker.version().await.expect("version");
    assert!(version.api_version.is_some_and(|v| !v.is_empty()));
}

#[tokio::test]
async fn exec_with_stdin_and_write_half_shutdown() {
    ensure_images();
    let proxy = Proxy::start();
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
    docker
        .start_container(&name, None::<StartContainerOptions>)
        .await
        .expect("start");

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
        let StartExecResults::Attached {
            mut output,
            mut input,
        } = docker.start_exec(&exec.id, None).await.expect("start exec")
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
        .remove_container(
            &name,
            Some(RemoveContainerOptionsBuilder::new().force(true).build()),
        )
        .await
        .expect("remove");
}
