//! The engine reached over `tcp://` and `tls://` (mutual TLS with Docker's
//! file names), through relays this test owns in front of the real engine.

mod support;

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::{TcpListener, UnixStream};
use tokio_rustls::rustls;

use support::*;

const LIMIT: Duration = Duration::from_secs(60);

/// Relays every accepted TCP (or TLS) connection to the engine's socket.
struct Relay {
    port: u16,
    /// Owns the relay tasks: dropping it ends them.
    _runtime: tokio::runtime::Runtime,
}

impl Relay {
    fn start(tls: Option<rustls::ServerConfig>) -> Relay {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .expect("runtime");
        let listener = runtime.block_on(TcpListener::bind("127.0.0.1:0")).expect("bind");
        let port = listener.local_addr().expect("addr").port();
        let acceptor = tls.map(|config| tokio_rustls::TlsAcceptor::from(Arc::new(config)));
        runtime.spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                let acceptor = acceptor.clone();
                tokio::spawn(async move {
                    let Ok(mut engine) = UnixStream::connect(ENGINE_SOCKET).await else {
                        return;
                    };
                    match acceptor {
                        Some(acceptor) => {
                            if let Ok(mut tls) = acceptor.accept(tcp).await {
                                let _ = tokio::io::copy_bidirectional(&mut tls, &mut engine).await;
                            }
                        }
                        None => {
                            let mut tcp = tcp;
                            let _ = tokio::io::copy_bidirectional(&mut tcp, &mut engine).await;
                        }
                    }
                });
            }
        });
        Relay { port, _runtime: runtime }
    }
}

/// The relay's TLS side: the agent's certificate from `offload certs init`,
/// requiring client certificates from the same CA (what `dockerd --tlsverify` does).
fn engine_tls(certs: &Path) -> rustls::ServerConfig {
    let files = offload::tls::TlsFiles {
        ca: Some(certs.join("ca.pem")),
        cert: Some(certs.join("server-cert.pem")),
        key: Some(certs.join("server-key.pem")),
    };
    offload::tls::server_config(&files, &[b"http/1.1"]).expect("server config")
}

fn tls_proxy(relay: &Relay, files: &Path) -> Proxy {
    let dir = files.display();
    Proxy::start_with(&[
        "--docker",
        &format!("tls://localhost:{}", relay.port),
        "--tlscacert",
        &format!("{dir}/ca.pem"),
        "--tlscert",
        &format!("{dir}/cert.pem"),
        "--tlskey",
        &format!("{dir}/key.pem"),
    ])
}

/// `docker ps` through the proxy must fail; returns what the CLI printed.
fn failing_ps(proxy: &Proxy) -> String {
    let mut command = proxy.docker(DOCKER_28);
    command.arg("ps");
    let output = run(command, None, LIMIT);
    assert!(!output.status.success());
    String::from_utf8_lossy(&output.stderr).into_owned()
}

fn attach_round_trip(proxy: &Proxy) {
    let mut command = proxy.docker(DOCKER_28);
    command.args(["run", "-i", "--rm", IMAGE, "cat"]);
    assert_eq!(ok(run(command, Some(b"over the wire\n"), LIMIT)), "over the wire\n");
}

#[test]
fn engine_over_plain_tcp() {
    ensure_images();
    let relay = Relay::start(None);
    let proxy = Proxy::start_with(&["--docker", &format!("tcp://127.0.0.1:{}", relay.port)]);
    attach_round_trip(&proxy);
}

#[test]
fn engine_over_mutual_tls() {
    ensure_images();
    let certs = tempfile::tempdir().expect("certs");
    make_certs(certs.path());
    let relay = Relay::start(Some(engine_tls(certs.path())));
    let proxy = tls_proxy(&relay, certs.path());
    attach_round_trip(&proxy);
}

#[test]
fn tls_refusals_are_explained() {
    let (ours, stranger) = (tempfile::tempdir().expect("ours"), tempfile::tempdir().expect("stranger"));
    make_certs(ours.path());
    make_certs(stranger.path());
    let relay = Relay::start(Some(engine_tls(ours.path())));

    // A client certificate from another CA: the engine side refuses the handshake.
    let files = client_files(ours.path(), stranger.path());
    let stderr = failing_ps(&tls_proxy(&relay, files.path()));
    assert!(
        stderr.contains("offload: cannot reach the Docker engine at tls://localhost:")
            && stderr.contains("does not accept our client certificate"),
        "{stderr}"
    );

    // An engine certificate that the pinned CA did not sign: we refuse it.
    let stderr = failing_ps(&tls_proxy(&relay, stranger.path()));
    assert!(stderr.contains("certificate is not trusted (UnknownIssuer)"), "{stderr}");
}
