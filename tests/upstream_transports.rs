//! The engine reached over `tcp://` and `tls://` (mutual TLS with Docker's
//! file names), through relays this test owns in front of the real engine.

mod support;

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair, KeyUsagePurpose};
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

/// A CA with one server and one client certificate, written with Docker's names.
struct Pki {
    ca_cert: rcgen::Certificate,
    ca_key: KeyPair,
}

impl Pki {
    fn new(name: &str) -> Pki {
        let mut params = CertificateParams::new(Vec::<String>::new()).expect("params");
        params.distinguished_name.push(DnType::CommonName, name);
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::DigitalSignature];
        let ca_key = KeyPair::generate().expect("key");
        let ca_cert = params.self_signed(&ca_key).expect("ca");
        Pki { ca_cert, ca_key }
    }

    fn issue(&self, names: &[&str]) -> (String, String) {
        let params =
            CertificateParams::new(names.iter().map(|n| n.to_string()).collect::<Vec<_>>()).expect("params");
        let key = KeyPair::generate().expect("key");
        let cert = params.signed_by(&key, &self.ca_cert, &self.ca_key).expect("sign");
        (cert.pem(), key.serialize_pem())
    }

    fn server_config(&self) -> rustls::ServerConfig {
        let (cert, key) = self.issue(&["localhost", "127.0.0.1"]);
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut roots = rustls::RootCertStore::empty();
        roots.add(self.ca_cert.der().clone()).expect("root");
        let verifier =
            rustls::server::WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider.clone())
                .build()
                .expect("verifier");
        let certs =
            rustls_pemfile::certs(&mut cert.as_bytes()).collect::<Result<Vec<_>, _>>().expect("certs");
        let key = rustls_pemfile::private_key(&mut key.as_bytes()).expect("key").expect("a key");
        rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .expect("versions")
            .with_client_cert_verifier(verifier)
            .with_single_cert(certs, key)
            .expect("server config")
    }

    /// Writes ca.pem, cert.pem and key.pem (a client identity) into `dir`.
    fn write_client_files(&self, dir: &Path, client_ca: &Pki) {
        std::fs::write(dir.join("ca.pem"), self.ca_cert.pem()).expect("ca.pem");
        let (cert, key) = client_ca.issue(&["offload-proxy"]);
        std::fs::write(dir.join("cert.pem"), cert).expect("cert.pem");
        std::fs::write(dir.join("key.pem"), key).expect("key.pem");
    }
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
    let pki = Pki::new("offload test CA");
    let relay = Relay::start(Some(pki.server_config()));
    let files = tempfile::tempdir().expect("dir");
    pki.write_client_files(files.path(), &pki);
    let proxy = tls_proxy(&relay, files.path());
    attach_round_trip(&proxy);
}

#[test]
fn tls_refusals_are_explained() {
    let pki = Pki::new("offload test CA");
    let relay = Relay::start(Some(pki.server_config()));

    // A client certificate from another CA: the engine side refuses the handshake.
    let stranger = Pki::new("stranger CA");
    let files = tempfile::tempdir().expect("dir");
    pki.write_client_files(files.path(), &stranger);
    let proxy = tls_proxy(&relay, files.path());
    let mut command = proxy.docker(DOCKER_28);
    command.arg("ps");
    let output = run(command, None, LIMIT);
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("offload: cannot reach the Docker engine at tls://localhost:")
            && stderr.contains("does not accept our client certificate"),
        "{stderr}"
    );

    // An engine certificate that the pinned CA did not sign: we refuse it.
    let files = tempfile::tempdir().expect("dir");
    stranger.write_client_files(files.path(), &pki);
    let proxy = tls_proxy(&relay, files.path());
    let mut command = proxy.docker(DOCKER_28);
    command.arg("ps");
    let output = run(command, None, LIMIT);
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("UnknownIssuer") || stderr.contains("certificate"), "{stderr}");
}
