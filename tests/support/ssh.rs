//! A real OpenSSH "remote" on this machine, for tests of `ssh://` upstreams.
//!
//! No port, no daemon, nothing outside a temporary directory: the client's
//! `ProxyCommand` runs `sshd -i` (inetd mode), which speaks SSH on its
//! stdin/stdout and exits with the connection. Each [`SshRemote`] has its own
//! host key, user key, `authorized_keys`, `known_hosts`, `sshd_config` and
//! client config, all in its temporary directory; the machine's own sshd,
//! `/etc/ssh/*_config` and `~/.ssh` are never read or written (`ssh -F` skips
//! both the system and the user config). The one thing outside the temporary
//! directory is `/run/sshd`, the privilege separation directory sshd insists on
//! when run as root; it is created (empty, 0755) if missing.
//!
//! The "remote" user is the current user, with their own shell and home: a
//! remote command runs as `$SHELL -c '<command>'` in `$HOME`, like on a real
//! host (bash reads `~/.bashrc` there, as it does for any ssh command).
//!
//! ```ignore
//! let remote = SshRemote::start();
//! let out = Command::new("ssh").args(remote.ssh_args()).arg(remote.host()).arg("echo hi").output();
//! ```

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

/// The `Host` alias of every test remote (its client config is private, so
/// several remotes can share it).
pub const SSH_HOST: &str = "offload-test-remote";

const SSHD_CANDIDATES: &[&str] = &["/usr/sbin/sshd", "/usr/local/sbin/sshd", "/sbin/sshd"];
const PRIVSEP_DIR: &str = "/run/sshd";
const INSTALL_HINT: &str = "install OpenSSH: apt-get install -y openssh-server openssh-client";

/// A private OpenSSH server reachable as `ssh -F <config> offload-test-remote`.
/// Dropping it removes its directory; no process outlives a connection.
pub struct SshRemote {
    dir: tempfile::TempDir,
    config: PathBuf,
    sshd: PathBuf,
}

impl SshRemote {
    /// A remote that accepts the test user's key.
    pub fn start() -> SshRemote {
        SshRemote::create(true)
    }

    /// A remote whose `authorized_keys` is empty: every login fails with
    /// "Permission denied (publickey)" (ssh exits 255).
    pub fn start_refusing() -> SshRemote {
        SshRemote::create(false)
    }

    /// The host to give `ssh` (after [`SshRemote::ssh_args`]).
    pub fn host(&self) -> &str {
        SSH_HOST
    }

    /// The client config file (`ssh -F` this).
    pub fn config_path(&self) -> &Path {
        &self.config
    }

    /// Arguments to put before the host: `["-F", "<config>"]`.
    pub fn ssh_args(&self) -> Vec<String> {
        vec!["-F".to_string(), self.config.display().to_string()]
    }

    /// `ssh://offload-test-remote` (only meaningful with [`SshRemote::ssh_args`]).
    pub fn url(&self) -> String {
        format!("ssh://{SSH_HOST}")
    }

    /// The temporary directory holding keys and configs.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// The `sshd` binary the `ProxyCommand` runs.
    pub fn sshd_path(&self) -> &Path {
        &self.sshd
    }

    /// `ssh -F <config> offload-test-remote <remote_command>`, stdin null
    /// (callers that stream set their own stdio).
    pub fn command(&self, remote_command: &str) -> Command {
        let mut command = Command::new("ssh");
        command.args(self.ssh_args()).arg(SSH_HOST).arg(remote_command).stdin(Stdio::null());
        command
    }

    fn create(accept_user_key: bool) -> SshRemote {
        let sshd = find_sshd();
        for tool in ["ssh", "ssh-keygen"] {
            if !on_path(tool) {
                panic!("`{tool}` is not on PATH; the SSH tests need the OpenSSH client ({INSTALL_HINT})");
            }
        }
        if is_root() {
            ensure_privsep_dir();
        }

        let dir = tempfile::Builder::new()
            .prefix("offload-test-ssh-")
            .tempdir()
            .expect("create a temporary directory for the SSH remote");
        let root = dir.path().to_path_buf();
        let root_text = root.display().to_string();
        // The paths go into config files and a shell command line unquoted.
        assert!(
            root_text.chars().all(|c| c.is_ascii_alphanumeric() || "/._-+".contains(c)),
            "temporary directory path {root_text:?} has characters the SSH configs cannot take; set TMPDIR"
        );

        let host_key = root.join("host_key");
        let user_key = root.join("user_key");
        keygen(&host_key, "offload-test-host");
        keygen(&user_key, "offload-test-user");

        let authorized_keys = root.join("authorized_keys");
        let user_pub = read(&user_key.with_extension("pub"));
        write(&authorized_keys, if accept_user_key { &user_pub } else { "" });

        // `<alias> <type> <base64>`: the host key for the alias only.
        let host_pub = read(&host_key.with_extension("pub"));
        let mut fields = host_pub.split_whitespace();
        let (key_type, key_data) = match (fields.next(), fields.next()) {
            (Some(t), Some(d)) => (t, d),
            _ => panic!("unexpected ssh-keygen public key: {host_pub:?}"),
        };
        let known_hosts = root.join("known_hosts");
        write(&known_hosts, &format!("{SSH_HOST} {key_type} {key_data}\n"));

        let sshd_config = root.join("sshd_config");
        write(
            &sshd_config,
            &format!(
                "# offload test remote: sshd -i through the client's ProxyCommand\n\
                 HostKey {host_key}\n\
                 AuthorizedKeysFile {authorized_keys}\n\
                 PubkeyAuthentication yes\n\
                 PasswordAuthentication no\n\
                 KbdInteractiveAuthentication no\n\
                 HostbasedAuthentication no\n\
                 GSSAPIAuthentication no\n\
                 KerberosAuthentication no\n\
                 PermitRootLogin prohibit-password\n\
                 PermitEmptyPasswords no\n\
                 StrictModes no\n\
                 UsePAM no\n\
                 PidFile none\n\
                 UseDNS no\n\
                 PrintMotd no\n\
                 PrintLastLog no\n\
                 Banner none\n\
                 AcceptEnv none\n\
                 PermitUserEnvironment no\n\
                 PermitUserRC no\n\
                 X11Forwarding no\n\
                 AllowAgentForwarding no\n\
                 AllowTcpForwarding no\n\
                 AllowStreamLocalForwarding no\n\
                 PermitTunnel no\n\
                 ClientAliveInterval 0\n\
                 LogLevel ERROR\n",
                host_key = host_key.display(),
                authorized_keys = authorized_keys.display(),
            ),
        );

        let config = root.join("ssh_config");
        write(
            &config,
            &format!(
                "Host {SSH_HOST}\n\
                 \x20 HostName {SSH_HOST}\n\
                 \x20 HostKeyAlias {SSH_HOST}\n\
                 \x20 User {user}\n\
                 \x20 IdentityFile {user_key}\n\
                 \x20 IdentitiesOnly yes\n\
                 \x20 IdentityAgent none\n\
                 \x20 PreferredAuthentications publickey\n\
                 \x20 UserKnownHostsFile {known_hosts}\n\
                 \x20 GlobalKnownHostsFile /dev/null\n\
                 \x20 StrictHostKeyChecking yes\n\
                 \x20 CheckHostIP no\n\
                 \x20 UpdateHostKeys no\n\
                 \x20 BatchMode yes\n\
                 \x20 ConnectTimeout 20\n\
                 \x20 ProxyCommand {sshd} -i -e -f {sshd_config}\n\
                 \x20 ControlMaster no\n\
                 \x20 ControlPath none\n\
                 \x20 ForwardAgent no\n\
                 \x20 ForwardX11 no\n\
                 \x20 EscapeChar none\n\
                 \x20 LogLevel ERROR\n",
                user = current_user(),
                user_key = user_key.display(),
                known_hosts = known_hosts.display(),
                sshd = sshd.display(),
                sshd_config = sshd_config.display(),
            ),
        );

        // Fail here, with sshd's own words, rather than deep inside a test.
        let check = Command::new(&sshd)
            .arg("-t")
            .arg("-f")
            .arg(&sshd_config)
            .stdin(Stdio::null())
            .output()
            .unwrap_or_else(|e| panic!("run {} -t: {e}", sshd.display()));
        assert!(
            check.status.success(),
            "{} -t -f {} rejected the test config ({}): {}",
            sshd.display(),
            sshd_config.display(),
            check.status,
            String::from_utf8_lossy(&check.stderr).trim()
        );

        SshRemote { dir, config, sshd }
    }
}

fn find_sshd() -> PathBuf {
    SSHD_CANDIDATES.iter().map(PathBuf::from).find(|p| p.is_file()).unwrap_or_else(|| {
        panic!("no sshd in {SSHD_CANDIDATES:?}; the SSH tests need the OpenSSH server ({INSTALL_HINT})")
    })
}

fn on_path(tool: &str) -> bool {
    std::env::var_os("PATH")
        .map(|path| std::env::split_paths(&path).any(|dir| dir.join(tool).is_file()))
        .unwrap_or(false)
}

fn is_root() -> bool {
    // std has no getuid; /proc/self/status says it ("Uid: real effective ...").
    fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("Uid:"))
                .and_then(|l| l.split_whitespace().nth(2).map(|euid| euid == "0"))
        })
        .unwrap_or(false)
}

/// sshd running as root refuses to start without its (empty, root-owned,
/// not group/world-writable) privilege separation directory.
fn ensure_privsep_dir() {
    let dir = Path::new(PRIVSEP_DIR);
    if dir.is_dir() {
        return;
    }
    fs::create_dir_all(dir)
        .unwrap_or_else(|e| panic!("create {PRIVSEP_DIR} (sshd's privilege separation directory): {e}"));
    fs::set_permissions(dir, fs::Permissions::from_mode(0o755))
        .unwrap_or_else(|e| panic!("chmod 755 {PRIVSEP_DIR}: {e}"));
}

fn current_user() -> String {
    let output = Command::new("id").arg("-un").stdin(Stdio::null()).output().expect("run `id -un`");
    assert!(output.status.success(), "`id -un` failed: {}", String::from_utf8_lossy(&output.stderr));
    let user = String::from_utf8(output.stdout).expect("user name is UTF-8").trim().to_string();
    assert!(!user.is_empty(), "`id -un` printed nothing");
    user
}

fn keygen(path: &Path, comment: &str) {
    let output = Command::new("ssh-keygen")
        .args(["-q", "-t", "ed25519", "-N", "", "-C", comment, "-f"])
        .arg(path)
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("run ssh-keygen ({INSTALL_HINT}): {e}"));
    assert!(
        output.status.success(),
        "ssh-keygen -f {} failed ({}): {}",
        path.display(),
        output.status,
        String::from_utf8_lossy(&output.stderr).trim()
    );
}

fn read(path: &Path) -> String {
    fs::read_to_string(path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()))
}

/// Writes a file readable by its owner only (ssh refuses a config or key that
/// others can write).
fn write(path: &Path, text: &str) {
    fs::write(path, text).unwrap_or_else(|e| panic!("write {}: {e}", path.display()));
    fs::set_permissions(path, fs::Permissions::from_mode(0o600))
        .unwrap_or_else(|e| panic!("chmod 600 {}: {e}", path.display()));
}
