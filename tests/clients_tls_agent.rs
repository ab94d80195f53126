//! Every client scenario (docker CLI 28 and 20.10, BuildKit, docker-py,
//! compose 1.29, bollard) through the proxy linked to an agent over mutual TLS.

mod support;

fn start_proxy() -> support::Proxy {
    support::Proxy::start_via(support::Via::TlsAgent)
}

include!("scenarios/clients.rs");
