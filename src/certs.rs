//! `offload certs init`: a private CA, the agent's server certificate and the
//! proxy's client certificate for the TLS link between the halves, in Docker's
//! file layout (`ca.pem`, `server-cert.pem`/`server-key.pem`, `cert.pem`/`key.pem`)
//! so the same directory also works with `docker --tlsverify`.
//!
//! Both sides are authenticated: the agent only accepts client certificates
//! signed by this CA, and the proxy only trusts an agent certificate signed by
//! it. Key material is written to disk and nowhere else: nothing here logs,
//! prints or puts it in an error.

use std::fs::{self, DirBuilder, OpenOptions, Permissions};
use std::io::{self, Write};
use std::net::IpAddr;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use rcgen::{
    BasicConstraints, Certificate, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair,
    KeyUsagePurpose, SanType,
};
use rustls::pki_types::DnsName;

/// The CA certificate: given to the proxy (`--tlscacert`) and the agent.
pub const CA_CERT: &str = "ca.pem";
/// The CA's private key: only needed to sign more certificates later.
pub const CA_KEY: &str = "ca-key.pem";
/// The agent's certificate (`--tlscert` of a TLS server, in Docker's naming).
pub const SERVER_CERT: &str = "server-cert.pem";
/// The agent's private key.
pub const SERVER_KEY: &str = "server-key.pem";
/// The proxy's client certificate (`--tlscert`).
pub const CLIENT_CERT: &str = "cert.pem";
/// The proxy's private key (`--tlskey`).
pub const CLIENT_KEY: &str = "key.pem";

/// Validity of the generated certificates unless told otherwise: 825 days is
/// the longest that Apple's TLS stack accepts for a server certificate.
pub const DEFAULT_DAYS: u32 = 825;

/// Upper bound on `days`, so the expiry date stays far from the limits of the
/// date arithmetic (which panics on overflow) and of X.509 itself.
const MAX_DAYS: u32 = 100 * 366;

/// Certificates start to be valid a little in the past: the agent's clock may
/// run behind the machine that ran `certs init`.
const CLOCK_SKEW: Duration = Duration::from_secs(60 * 60);

/// Names and addresses every agent certificate carries, so an agent reached
/// through an SSH tunnel or on the same machine verifies too.
const ALWAYS_HOSTS: [&str; 3] = ["localhost", "127.0.0.1", "::1"];

/// What `offload certs init` was asked to do.
#[derive(Debug, Clone)]
pub struct CertsPlan {
    /// Where the files go; created (0700) when missing.
    pub dir: PathBuf,
    /// Host names and IP addresses the agent is reached by (`--host`).
    pub hosts: Vec<String>,
    /// Validity of every certificate, in days.
    pub days: u32,
    /// Replace existing files instead of refusing.
    pub force: bool,
}

impl CertsPlan {
    /// A plan for `dir` with the defaults: no extra hosts, [`DEFAULT_DAYS`], no force.
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        Self { dir: dir.into(), hosts: Vec::new(), days: DEFAULT_DAYS, force: false }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum CertsError {
    #[error("invalid --host {host:?}: {reason}")]
    InvalidHost { host: String, reason: &'static str },
    #[error("invalid validity of {days} days: give between 1 and {MAX_DAYS} days")]
    InvalidDays { days: u32 },
    #[error(
        "{} already exists; pass --force to replace it and the other certificates next to it",
        path.display()
    )]
    AlreadyExists { path: PathBuf },
    #[error("cannot create the certificate directory {}: {source}", dir.display())]
    CreateDir { dir: PathBuf, source: io::Error },
    #[error("cannot write {}: {source}", path.display())]
    Write { path: PathBuf, source: io::Error },
    #[error("cannot generate the {what}: {source}")]
    Generate { what: &'static str, source: rcgen::Error },
    #[error("the system clock is set before 1970; fix it before generating certificates")]
    Clock,
}

/// The files `init` wrote, in the order CA, agent, proxy (certificate, then key).
#[derive(Debug, Clone)]
pub struct CertsWritten {
    pub files: Vec<PathBuf>,
}

/// Generates the CA, agent and proxy certificates and writes them to `plan.dir`.
///
/// Everything that can be checked is checked before anything is written, and
/// all six files are generated before the first one touches the disk, so a
/// refusal or a bad `--host` leaves the directory as it was.
pub fn init(plan: &CertsPlan) -> Result<CertsWritten, CertsError> {
    let sans = subject_alt_names(&plan.hosts)?;
    let validity = Validity::starting_now(plan.days)?;
    if !plan.force {
        refuse_existing(&plan.dir)?;
    }
    let files = generate(sans, &validity)?;
    create_dir(&plan.dir)?;
    write_files(&plan.dir, &files, plan.force)
}

// ---------------------------------------------------------------------------
// Subject alternative names

/// The agent certificate's SANs: the always-present loopback names, then each
/// `--host` as an IP address when it parses as one, else as a DNS name.
/// Duplicates are dropped (DNS names compare case-insensitively).
fn subject_alt_names(hosts: &[String]) -> Result<Vec<SanType>, CertsError> {
    let mut sans = Vec::new();
    let all = ALWAYS_HOSTS.iter().copied().chain(hosts.iter().map(String::as_str));
    for host in all {
        let san = parse_host(host)?;
        if !sans.contains(&san) {
            sans.push(san);
        }
    }
    Ok(sans)
}

fn parse_host(host: &str) -> Result<SanType, CertsError> {
    let invalid = |reason| CertsError::InvalidHost { host: host.to_string(), reason };
    let trimmed = host.trim();
    // `[::1]` is how IPv6 addresses appear in URLs and DOCKER_HOST; accept it.
    let unbracketed = trimmed.strip_prefix('[').and_then(|rest| rest.strip_suffix(']')).unwrap_or(trimmed);
    if let Ok(ip) = unbracketed.parse::<IpAddr>() {
        return Ok(SanType::IpAddress(ip));
    }
    if trimmed.is_empty() {
        return Err(invalid("it is empty"));
    }
    // The same validation rustls applies to the name it connects to, so a
    // name accepted here is one the proxy can actually verify.
    if DnsName::try_from(trimmed).is_err() {
        return Err(invalid(
            "not an IP address or a valid DNS name (give a bare name such as \
             agent.example.com or 10.0.0.5, without scheme, port or wildcard)",
        ));
    }
    // DNS is case-insensitive and a trailing dot names the same host.
    let name = trimmed.trim_end_matches('.').to_ascii_lowercase();
    let name = name.try_into().map_err(|_| invalid("not an ASCII DNS name"))?;
    Ok(SanType::DnsName(name))
}

// ---------------------------------------------------------------------------
// Generation

/// The validity window shared by all three certificates, as offsets from the
/// Unix epoch.
struct Validity {
    not_before: Duration,
    not_after: Duration,
}

impl Validity {
    fn starting_now(days: u32) -> Result<Self, CertsError> {
        if days == 0 || days > MAX_DAYS {
            return Err(CertsError::InvalidDays { days });
        }
        let now = SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).map_err(|_| CertsError::Clock)?;
        // Exactly `days` long, counted from the backdated start, so the
        // 825-day limit holds for the default.
        let not_before = now.saturating_sub(CLOCK_SKEW);
        let not_after = not_before + Duration::from_secs(u64::from(days) * 24 * 60 * 60);
        Ok(Self { not_before, not_after })
    }

    fn apply(&self, params: &mut CertificateParams) {
        // rcgen's dates are `time::OffsetDateTime`; starting from its own
        // epoch value avoids a direct dependency on the `time` crate.
        let epoch = rcgen::date_time_ymd(1970, 1, 1);
        params.not_before = epoch + self.not_before;
        params.not_after = epoch + self.not_after;
    }
}

/// One PEM file to write.
struct PemFile {
    name: &'static str,
    contents: String,
    /// Private keys are created 0600, certificates 0644.
    secret: bool,
}

impl PemFile {
    fn mode(&self) -> u32 {
        if self.secret {
            0o600
        } else {
            0o644
        }
    }
}

fn generate(sans: Vec<SanType>, validity: &Validity) -> Result<Vec<PemFile>, CertsError> {
    let ca_key = new_key("CA key")?;
    let ca = ca_params(&ca_key, validity).self_signed(&ca_key).map_err(generate_error("CA certificate"))?;

    let server_key = new_key("agent key")?;
    let server = leaf_params("offload agent", sans, ExtendedKeyUsagePurpose::ServerAuth, validity)
        .signed_by(&server_key, &ca, &ca_key)
        .map_err(generate_error("agent certificate"))?;

    // The proxy is identified by its certificate alone, not by a name.
    let client_key = new_key("proxy key")?;
    let client = leaf_params("offload proxy", Vec::new(), ExtendedKeyUsagePurpose::ClientAuth, validity)
        .signed_by(&client_key, &ca, &ca_key)
        .map_err(generate_error("proxy certificate"))?;

    Ok(vec![
        cert_file(CA_CERT, &ca),
        key_file(CA_KEY, &ca_key),
        cert_file(SERVER_CERT, &server),
        key_file(SERVER_KEY, &server_key),
        cert_file(CLIENT_CERT, &client),
        key_file(CLIENT_KEY, &client_key),
    ])
}

/// An ECDSA P-256 key: small, fast, and accepted by rustls, Go (docker CLI)
/// and OpenSSL alike.
fn new_key(what: &'static str) -> Result<KeyPair, CertsError> {
    KeyPair::generate().map_err(generate_error(what))
}

fn generate_error(what: &'static str) -> impl FnOnce(rcgen::Error) -> CertsError {
    move |source| CertsError::Generate { what, source }
}

fn ca_params(ca_key: &KeyPair, validity: &Validity) -> CertificateParams {
    let mut params = CertificateParams::default();
    params.distinguished_name = common_name(&ca_name(ca_key));
    // Path length 0: this CA signs the agent and proxy certificates directly
    // and must not be able to mint intermediate CAs.
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages =
        vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
    validity.apply(&mut params);
    params
}

/// A CA name unique to this run. TLS libraries find an issuer by its name, so
/// two `certs init` runs sharing one would make a certificate from the wrong
/// set fail as "bad signature" instead of "unknown issuer"; a distinct name
/// also tells sets apart in `openssl x509 -text`.
fn ca_name(ca_key: &KeyPair) -> String {
    // The public key's first coordinate bytes are as random as the key.
    let id: String = ca_key.public_key_raw()[1..9].iter().map(|byte| format!("{byte:02x}")).collect();
    format!("offload CA {id}")
}

fn leaf_params(
    name: &str,
    sans: Vec<SanType>,
    usage: ExtendedKeyUsagePurpose,
    validity: &Validity,
) -> CertificateParams {
    let mut params = CertificateParams::default();
    params.distinguished_name = common_name(name);
    params.subject_alt_names = sans;
    // Say explicitly that this certificate is not a CA.
    params.is_ca = IsCa::ExplicitNoCa;
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    // One purpose each: the proxy's certificate cannot serve as an agent's,
    // nor the agent's authenticate a client.
    params.extended_key_usages = vec![usage];
    // Lets OpenSSL-based tools find the issuer quickly; rustls does not need it.
    params.use_authority_key_identifier_extension = true;
    validity.apply(&mut params);
    params
}

fn common_name(name: &str) -> rcgen::DistinguishedName {
    let mut dn = rcgen::DistinguishedName::new();
    dn.push(DnType::CommonName, name);
    dn
}

fn cert_file(name: &'static str, cert: &Certificate) -> PemFile {
    PemFile { name, contents: cert.pem(), secret: false }
}

fn key_file(name: &'static str, key: &KeyPair) -> PemFile {
    PemFile { name, contents: key.serialize_pem(), secret: true }
}

// ---------------------------------------------------------------------------
// Writing

const ALL_FILES: [&str; 6] = [CA_CERT, CA_KEY, SERVER_CERT, SERVER_KEY, CLIENT_CERT, CLIENT_KEY];

/// Fails on the first file that already exists, so nothing is generated or
/// written when the directory holds an earlier set.
fn refuse_existing(dir: &Path) -> Result<(), CertsError> {
    for name in ALL_FILES {
        let path = dir.join(name);
        // `symlink_metadata`: a dangling symlink is in the way too.
        if fs::symlink_metadata(&path).is_ok() {
            return Err(CertsError::AlreadyExists { path });
        }
    }
    Ok(())
}

fn create_dir(dir: &Path) -> Result<(), CertsError> {
    DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(|source| CertsError::CreateDir { dir: dir.to_path_buf(), source })
}

/// Writes every file, never through an existing path:
/// - without `force`, each file is created exclusively (`O_EXCL`) where it
///   belongs, so a file that appeared since the check is not clobbered;
/// - with `force`, each file is created exclusively under a temporary name and
///   then renamed over the old one. A fresh inode gets the right mode even
///   when the old key file was world-readable, and a symlink in its place is
///   replaced rather than followed.
///
/// If writing fails, the files created so far are removed again, so the old
/// set (or none) stays. Only a rename failing part-way, which in one
/// directory takes an I/O error, could leave old and new files mixed.
fn write_files(dir: &Path, files: &[PemFile], force: bool) -> Result<CertsWritten, CertsError> {
    let mut created = Created::default();
    let mut renames = Vec::new();
    for file in files {
        let target = dir.join(file.name);
        let path = if force {
            let temporary = temporary_path(dir, file.name);
            // Only a crashed earlier run with the same pid leaves one behind.
            let _ = fs::remove_file(&temporary);
            temporary
        } else {
            target.clone()
        };
        write_new(&path, file)?;
        created.paths.push(path.clone());
        if force {
            renames.push((path, target));
        }
    }
    for (from, to) in &renames {
        fs::rename(from, to).map_err(|source| CertsError::Write { path: to.clone(), source })?;
    }
    created.keep();
    Ok(CertsWritten { files: files.iter().map(|file| dir.join(file.name)).collect() })
}

/// A hidden name next to the target (a rename must stay on one filesystem),
/// unique to this process.
fn temporary_path(dir: &Path, name: &str) -> PathBuf {
    dir.join(format!(".{name}.{}.tmp", std::process::id()))
}

/// Creates `path` (it must not exist) with the file's mode from the start, so
/// a key is never readable by others, not even for a moment.
fn write_new(path: &Path, file: &PemFile) -> Result<(), CertsError> {
    let failed = |source: io::Error| match source.kind() {
        io::ErrorKind::AlreadyExists => CertsError::AlreadyExists { path: path.to_path_buf() },
        _ => CertsError::Write { path: path.to_path_buf(), source },
    };
    let mut out =
        OpenOptions::new().write(true).create_new(true).mode(file.mode()).open(path).map_err(failed)?;
    // The umask may have narrowed the mode; set exactly the intended one
    // before any byte is written (it only ever widens certificates to 0644).
    out.set_permissions(Permissions::from_mode(file.mode())).map_err(failed)?;
    out.write_all(file.contents.as_bytes()).map_err(failed)?;
    out.sync_all().map_err(failed)
}

/// Files this run created, removed on drop unless [`Created::keep`] was
/// called: a failed run leaves no half-written set behind.
#[derive(Default)]
struct Created {
    paths: Vec<PathBuf>,
}

impl Created {
    fn keep(mut self) {
        self.paths.clear();
    }
}

impl Drop for Created {
    fn drop(&mut self) {
        for path in &self.paths {
            // Best effort: a renamed temporary file is already gone.
            let _ = fs::remove_file(path);
        }
    }
}

#[cfg(test)]
mod tests {
    use std::io::BufReader;
    use std::sync::Arc;

    use rustls::client::danger::ServerCertVerifier;
    use rustls::client::WebPkiServerVerifier;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
    use rustls::server::WebPkiClientVerifier;
    use rustls::{ClientConfig, RootCertStore, ServerConfig};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::*;

    fn provider() -> Arc<rustls::crypto::CryptoProvider> {
        Arc::new(rustls::crypto::ring::default_provider())
    }

    fn plan(dir: &Path, hosts: &[&str]) -> CertsPlan {
        CertsPlan { hosts: hosts.iter().map(|h| h.to_string()).collect(), ..CertsPlan::new(dir) }
    }

    fn certs(path: &Path) -> Vec<CertificateDer<'static>> {
        let mut reader = BufReader::new(fs::File::open(path).unwrap());
        rustls_pemfile::certs(&mut reader).collect::<Result<_, _>>().unwrap()
    }

    fn cert(path: &Path) -> CertificateDer<'static> {
        certs(path).remove(0)
    }

    fn key(path: &Path) -> PrivateKeyDer<'static> {
        let mut reader = BufReader::new(fs::File::open(path).unwrap());
        rustls_pemfile::private_key(&mut reader).unwrap().unwrap()
    }

    fn roots(dir: &Path) -> Arc<RootCertStore> {
        let mut roots = RootCertStore::empty();
        for cert in certs(&dir.join(CA_CERT)) {
            roots.add(cert).unwrap();
        }
        Arc::new(roots)
    }

    fn mode(path: &Path) -> u32 {
        fs::metadata(path).unwrap().permissions().mode() & 0o777
    }

    fn read_all(dir: &Path) -> Vec<Vec<u8>> {
        ALL_FILES.iter().map(|name| fs::read(dir.join(name)).unwrap()).collect()
    }

    fn verify_server(dir: &Path, server_cert: &Path, name: &str) -> Result<(), rustls::Error> {
        let verifier = WebPkiServerVerifier::builder_with_provider(roots(dir), provider()).build().unwrap();
        let name = ServerName::try_from(name).unwrap();
        verifier.verify_server_cert(&cert(server_cert), &[], &name, &[], UnixTime::now()).map(|_| ())
    }

    fn verify_client(dir: &Path, client_cert: &Path) -> Result<(), rustls::Error> {
        let verifier = WebPkiClientVerifier::builder_with_provider(roots(dir), provider()).build().unwrap();
        verifier.verify_client_cert(&cert(client_cert), &[], UnixTime::now()).map(|_| ())
    }

    #[test]
    fn writes_docker_named_files_with_private_modes() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("nested").join("certs");
        let written = init(&plan(&dir, &[])).unwrap();

        let names: Vec<_> =
            written.files.iter().map(|p| p.strip_prefix(&dir).unwrap().to_str().unwrap()).collect();
        assert_eq!(names, ALL_FILES);
        assert_eq!(mode(&dir), 0o700);
        for name in [CA_KEY, SERVER_KEY, CLIENT_KEY] {
            assert_eq!(mode(&dir.join(name)), 0o600, "{name}");
            let pem = fs::read_to_string(dir.join(name)).unwrap();
            assert!(pem.starts_with("-----BEGIN PRIVATE KEY-----"), "{name}");
        }
        for name in [CA_CERT, SERVER_CERT, CLIENT_CERT] {
            assert_eq!(mode(&dir.join(name)), 0o644, "{name}");
        }
        // Nothing but the six files: no temporary leftovers.
        assert_eq!(fs::read_dir(&dir).unwrap().count(), 6);
    }

    #[test]
    fn server_cert_verifies_for_loopback_and_every_host() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path();
        let hosts = ["Agent.Example.com.", "10.1.2.3", "[fd00::7]", "gpu-box"];
        init(&plan(dir, &hosts)).unwrap();
        let server = dir.join(SERVER_CERT);

        for name in ["localhost", "127.0.0.1", "::1", "agent.example.com", "10.1.2.3", "fd00::7", "gpu-box"] {
            verify_server(dir, &server, name).unwrap_or_else(|e| panic!("{name}: {e}"));
        }
        for name in ["other.example.com", "10.1.2.4"] {
            let err = verify_server(dir, &server, name).unwrap_err();
            assert!(matches!(err, rustls::Error::InvalidCertificate(_)), "{name}: {err}");
        }
    }

    #[test]
    fn validity_is_the_given_days_starting_slightly_in_the_past() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path();
        init(&CertsPlan { days: 2, ..plan(dir, &[]) }).unwrap();
        let verifier = WebPkiServerVerifier::builder_with_provider(roots(dir), provider()).build().unwrap();
        let server = cert(&dir.join(SERVER_CERT));
        let name = ServerName::try_from("localhost").unwrap();
        let now = UnixTime::now().as_secs();
        let at = |offset: i64| {
            let time = UnixTime::since_unix_epoch(Duration::from_secs(now.saturating_add_signed(offset)));
            verifier.verify_server_cert(&server, &[], &name, &[], time).map(|_| ())
        };

        const HOUR: i64 = 60 * 60;
        const DAY: i64 = 24 * HOUR;
        // A verifier whose clock runs half an hour behind still accepts it.
        at(-HOUR / 2).unwrap();
        // It ends `days` after its backdated start.
        at(2 * DAY - 2 * HOUR).unwrap();
        let expired = at(2 * DAY).unwrap_err();
        assert!(
            matches!(
                expired,
                rustls::Error::InvalidCertificate(
                    rustls::CertificateError::Expired | rustls::CertificateError::ExpiredContext { .. }
                )
            ),
            "{expired}"
        );
    }

    #[test]
    fn each_leaf_is_good_for_its_own_purpose_only() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path();
        init(&plan(dir, &[])).unwrap();

        verify_client(dir, &dir.join(CLIENT_CERT)).unwrap();
        // ExtendedKeyUsage keeps the two apart.
        verify_client(dir, &dir.join(SERVER_CERT)).unwrap_err();
        verify_server(dir, &dir.join(CLIENT_CERT), "localhost").unwrap_err();
    }

    #[test]
    fn refuses_to_overwrite_without_force_and_replaces_with_it() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path();
        init(&plan(dir, &[])).unwrap();
        let first = read_all(dir);

        let err = init(&plan(dir, &[])).unwrap_err();
        assert!(matches!(err, CertsError::AlreadyExists { .. }), "{err}");
        let message = err.to_string();
        assert!(message.contains(CA_CERT) && message.contains("--force"), "{message}");
        assert_eq!(read_all(dir), first, "a refused init changed the files");

        // A key made world-readable by hand comes back private.
        fs::set_permissions(dir.join(CLIENT_KEY), Permissions::from_mode(0o644)).unwrap();
        let forced = CertsPlan { force: true, ..plan(dir, &[]) };
        init(&forced).unwrap();
        let second = read_all(dir);
        for (name, (old, new)) in ALL_FILES.iter().zip(first.iter().zip(&second)) {
            assert_ne!(old, new, "{name} was not replaced");
        }
        assert_eq!(mode(&dir.join(CLIENT_KEY)), 0o600);
        assert_eq!(fs::read_dir(dir).unwrap().count(), 6);
        verify_client(dir, &dir.join(CLIENT_CERT)).unwrap();
    }

    #[test]
    fn refuses_when_any_one_file_exists_and_writes_nothing() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path();
        fs::write(dir.join(CLIENT_KEY), "mine").unwrap();

        let err = init(&plan(dir, &[])).unwrap_err();
        assert!(err.to_string().contains(CLIENT_KEY), "{err}");
        assert_eq!(fs::read_dir(dir).unwrap().count(), 1);
        assert_eq!(fs::read_to_string(dir.join(CLIENT_KEY)).unwrap(), "mine");
    }

    #[test]
    fn rejects_bad_hosts_and_days_before_writing() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("certs");
        for host in ["", "https://agent", "agent:2376", "bad host", "*.example.com"] {
            let err = init(&plan(&dir, &[host])).unwrap_err();
            assert!(
                matches!(err, CertsError::InvalidHost { .. }) && err.to_string().contains("--host"),
                "{host:?}: {err}"
            );
        }
        for days in [0, MAX_DAYS + 1] {
            let err = init(&CertsPlan { days, ..plan(&dir, &[]) }).unwrap_err();
            assert!(matches!(err, CertsError::InvalidDays { .. }), "{err}");
        }
        assert!(!dir.exists());
    }

    #[test]
    fn sans_are_typed_and_deduplicated() {
        let hosts = ["LOCALHOST", "127.0.0.1", "[::1]", "192.168.1.9", "a.b"].map(String::from);
        let sans = subject_alt_names(&hosts).unwrap();
        let ip = |s: &str| SanType::IpAddress(s.parse().unwrap());
        let dns = |s: &str| SanType::DnsName(s.to_string().try_into().unwrap());
        assert_eq!(sans, vec![dns("localhost"), ip("127.0.0.1"), ip("::1"), ip("192.168.1.9"), dns("a.b"),]);
    }

    /// Server side: the agent's certificate, client certificates required
    /// from `server_dir`'s CA.
    fn server_config(server_dir: &Path) -> Arc<ServerConfig> {
        let verifier =
            WebPkiClientVerifier::builder_with_provider(roots(server_dir), provider()).build().unwrap();
        let mut config = ServerConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_client_cert_verifier(verifier)
            .with_single_cert(certs(&server_dir.join(SERVER_CERT)), key(&server_dir.join(SERVER_KEY)))
            .unwrap();
        config.alpn_protocols = vec![b"h2".to_vec()];
        Arc::new(config)
    }

    /// Client side: trusts `trust_dir`'s CA, presents `identity_dir`'s proxy
    /// certificate.
    fn client_config(trust_dir: &Path, identity_dir: &Path) -> Arc<ClientConfig> {
        let mut config = ClientConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots(trust_dir))
            .with_client_auth_cert(
                certs(&identity_dir.join(CLIENT_CERT)),
                key(&identity_dir.join(CLIENT_KEY)),
            )
            .unwrap();
        config.alpn_protocols = vec![b"h2".to_vec()];
        Arc::new(config)
    }

    /// Runs a handshake plus one ping/pong over an in-memory pipe and returns
    /// what each side saw.
    async fn exchange(
        server: Arc<ServerConfig>,
        client: Arc<ClientConfig>,
    ) -> (io::Result<Vec<u8>>, io::Result<Vec<u8>>) {
        let (client_io, server_io) = tokio::io::duplex(64 * 1024);
        let server_side = async {
            let mut tls = tokio_rustls::TlsAcceptor::from(server).accept(server_io).await?;
            let mut ping = [0; 4];
            tls.read_exact(&mut ping).await?;
            tls.write_all(b"pong").await?;
            tls.shutdown().await?;
            Ok(ping.to_vec())
        };
        let client_side = async {
            let name = ServerName::try_from("localhost").unwrap();
            let mut tls = tokio_rustls::TlsConnector::from(client).connect(name, client_io).await?;
            assert_eq!(tls.get_ref().1.alpn_protocol(), Some(&b"h2"[..]));
            tls.write_all(b"ping").await?;
            let mut pong = Vec::new();
            tls.read_to_end(&mut pong).await?;
            Ok(pong)
        };
        tokio::join!(server_side, client_side)
    }

    fn tls_error(err: &io::Error) -> Option<&rustls::Error> {
        err.get_ref()?.downcast_ref::<rustls::Error>()
    }

    #[tokio::test]
    async fn mutual_tls_handshake_works_with_the_generated_files() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path();
        init(&plan(dir, &[])).unwrap();

        let (server, client) = exchange(server_config(dir), client_config(dir, dir)).await;
        assert_eq!(server.unwrap(), b"ping");
        assert_eq!(client.unwrap(), b"pong");
    }

    #[tokio::test]
    async fn agent_refuses_a_client_certificate_from_another_ca() {
        let tmp = tempfile::tempdir().unwrap();
        let (ours, theirs) = (tmp.path().join("ours"), tmp.path().join("theirs"));
        init(&plan(&ours, &[])).unwrap();
        init(&plan(&theirs, &[])).unwrap();

        // The client trusts our agent but presents a certificate from another CA.
        let (server, client) = exchange(server_config(&ours), client_config(&ours, &theirs)).await;
        let err = server.unwrap_err();
        assert!(
            matches!(
                tls_error(&err),
                Some(rustls::Error::InvalidCertificate(rustls::CertificateError::UnknownIssuer))
            ),
            "{err}"
        );
        client.unwrap_err();
    }

    #[tokio::test]
    async fn proxy_refuses_an_agent_from_another_ca() {
        let tmp = tempfile::tempdir().unwrap();
        let (ours, theirs) = (tmp.path().join("ours"), tmp.path().join("theirs"));
        init(&plan(&ours, &[])).unwrap();
        init(&plan(&theirs, &[])).unwrap();

        let (server, client) = exchange(server_config(&theirs), client_config(&ours, &ours)).await;
        let err = client.unwrap_err();
        assert!(
            matches!(
                tls_error(&err),
                Some(rustls::Error::InvalidCertificate(rustls::CertificateError::UnknownIssuer))
            ),
            "{err}"
        );
        server.unwrap_err();
    }
}
