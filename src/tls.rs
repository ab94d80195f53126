//! TLS configuration from Docker's file conventions (`ca.pem`, `cert.pem`,
//! `key.pem`). Keys are read, never logged.

use std::fs::File;
use std::io::BufReader;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;
use rustls::{ClientConfig, RootCertStore, ServerConfig};

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("cannot read {path}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("{path} holds no {what}")]
    Missing { path: PathBuf, what: &'static str },
    #[error("invalid TLS setup: {0}")]
    Rustls(#[from] rustls::Error),
    #[error("{0} is required: the agent only accepts clients with a certificate from its CA")]
    Required(&'static str),
    #[error("cannot build the client certificate check: {0}")]
    Verifier(#[from] rustls::server::VerifierBuilderError),
}

/// Files that make a TLS client identity, named like Docker's flags.
#[derive(Debug, Clone, Default)]
pub struct TlsFiles {
    pub ca: Option<PathBuf>,
    pub cert: Option<PathBuf>,
    pub key: Option<PathBuf>,
}

/// Encrypted bytes rustls may hold before they are written to the socket, on
/// both ends of a TLS link. Its default (64 KiB) is below one full link frame
/// (64 KiB of payload plus the frame header and record overhead), so rustls
/// took a bulk frame in two writes: the frame less its last bytes, then those
/// as a record, a syscall and a TCP segment of their own. One buffer per link,
/// so the memory it may take is small.
pub const LINK_SEND_BUFFER: usize = 256 << 10;

/// rustls reads the socket 4 KiB at a time (at most one record): a bulk
/// stream paid a syscall, and a wakeup, per 4 KiB. A read-ahead buffer under
/// it takes what the socket holds in one read. One per link.
pub const LINK_READ_AHEAD: usize = 128 << 10;

/// The socket under a TLS link, read through [`LINK_READ_AHEAD`]; writes
/// (vectored too) go straight through.
pub fn read_ahead<S: tokio::io::AsyncRead>(socket: S) -> tokio::io::BufReader<S> {
    tokio::io::BufReader::with_capacity(LINK_READ_AHEAD, socket)
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

pub fn load_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let read = |source| TlsError::Read { path: path.to_path_buf(), source };
    let mut reader = BufReader::new(File::open(path).map_err(read)?);
    let certs = rustls_pemfile::certs(&mut reader).collect::<Result<Vec<_>, _>>().map_err(read)?;
    if certs.is_empty() {
        return Err(TlsError::Missing { path: path.to_path_buf(), what: "certificate" });
    }
    Ok(certs)
}

pub fn load_key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    let read = |source| TlsError::Read { path: path.to_path_buf(), source };
    let mut reader = BufReader::new(File::open(path).map_err(read)?);
    rustls_pemfile::private_key(&mut reader)
        .map_err(read)?
        .ok_or_else(|| TlsError::Missing { path: path.to_path_buf(), what: "private key" })
}

/// A client config that trusts `files.ca` (or nothing else) and presents
/// `files.cert`/`files.key` when both are given.
pub fn client_config(files: &TlsFiles, alpn: &[&[u8]]) -> Result<ClientConfig, TlsError> {
    let mut roots = RootCertStore::empty();
    if let Some(ca) = &files.ca {
        for cert in load_certs(ca)? {
            roots.add(cert)?;
        }
    }
    let builder = ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots);
    let mut config = match (&files.cert, &files.key) {
        (Some(cert), Some(key)) => builder.with_client_auth_cert(load_certs(cert)?, load_key(key)?)?,
        _ => builder.with_no_client_auth(),
    };
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    Ok(config)
}

/// A server config that requires a client certificate signed by `files.ca`
/// and presents `files.cert`/`files.key`.
pub fn server_config(files: &TlsFiles, alpn: &[&[u8]]) -> Result<ServerConfig, TlsError> {
    let ca = files.ca.as_ref().ok_or(TlsError::Required("--tlscacert"))?;
    let cert = files.cert.as_ref().ok_or(TlsError::Required("--tlscert"))?;
    let key = files.key.as_ref().ok_or(TlsError::Required("--tlskey"))?;
    let mut roots = RootCertStore::empty();
    for cert in load_certs(ca)? {
        roots.add(cert)?;
    }
    let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider()).build()?;
    let mut config = ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()?
        .with_client_cert_verifier(verifier)
        .with_single_cert(load_certs(cert)?, load_key(key)?)?;
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    Ok(config)
}

/// Finds a TLS failure anywhere in an error chain and says what it means for
/// the user: which side refused whom, and which flag to check.
pub fn explain_failure(error: &(dyn std::error::Error + 'static)) -> Option<String> {
    let mut current = Some(error);
    while let Some(e) = current {
        let tls = e.downcast_ref::<rustls::Error>().or_else(|| {
            e.downcast_ref::<std::io::Error>()
                .and_then(|io| io.get_ref())
                .and_then(|inner| inner.downcast_ref::<rustls::Error>())
        });
        if let Some(tls) = tls {
            return Some(describe(tls));
        }
        // HTTP/2 keeps only the text of an I/O error (h2 rebuilds it from a
        // string), so a TLS alert that ended the link is known by its words.
        if let Some((_, alert)) = e.to_string().split_once("received fatal alert: ") {
            return Some(refused(alert.trim()));
        }
        current = e.source();
    }
    None
}

fn describe(error: &rustls::Error) -> String {
    match error {
        rustls::Error::AlertReceived(alert) => refused(&format!("{alert:?}")),
        rustls::Error::InvalidCertificate(reason) => format!(
            "the remote's certificate is not trusted ({reason:?}): it must be signed by the CA \
             in --tlscacert and name the host you connect to"
        ),
        other => format!("TLS failed: {other}"),
    }
}

fn refused(alert: &str) -> String {
    format!(
        "the remote refused the TLS handshake ({alert}): it does not accept our client \
         certificate; check --tlscert/--tlskey and the CA the remote trusts"
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn explains_tls_errors_wrapped_in_io_errors() {
        let alert = std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            rustls::Error::AlertReceived(rustls::AlertDescription::UnknownCA),
        );
        let text = explain_failure(&alert).expect("found");
        assert!(text.contains("UnknownCA") && text.contains("--tlscert"), "{text}");

        let untrusted = rustls::Error::InvalidCertificate(rustls::CertificateError::UnknownIssuer);
        let text = explain_failure(&untrusted).expect("found");
        assert!(text.contains("UnknownIssuer") && text.contains("--tlscacert"), "{text}");

        let h2_text = std::io::Error::other("connection error: received fatal alert: UnknownCA");
        assert!(explain_failure(&h2_text).is_some_and(|t| t.contains("(UnknownCA)")));

        let plain = std::io::Error::other("refused");
        assert!(explain_failure(&plain).is_none());
    }
}
