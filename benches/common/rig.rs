//! Child processes of a bench and a private OpenSSH server, for benches that
//! include this file with `#[path = "common/rig.rs"] mod rig;` next to `mod common;`.
//! The same approach as `benches/link.rs`: every process runs under `setpriv
//! --pdeathsig`, is stopped with SIGTERM (SIGKILL after a grace period) on drop, and
//! the sshd never reads the machine's own `/etc/ssh` or `~/.ssh`.

use std::net::SocketAddr;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use tokio::io::AsyncReadExt;
use tokio::net::TcpStream;

use crate::common::procfs::{process_tree, stat_fields};
use crate::common::{guarded_command, Context, Result};

pub const START_TIMEOUT: Duration = Duration::from_secs(20);
pub const STOP_TIMEOUT: Duration = Duration::from_secs(5);
const SSHD_CANDIDATES: &[&str] = &["/usr/sbin/sshd", "/usr/local/sbin/sshd", "/sbin/sshd"];

/// A long-running child process (agent, proxy, ssh, sshd) with its output in
/// `<dir>/<name>.log`; stopped with SIGTERM (then SIGKILL) on drop, together with any
/// descendants it leaves.
pub struct Daemon {
    pub name: String,
    pub pid: u32,
    child: Option<Child>,
    pub log: PathBuf,
}

impl Daemon {
    pub fn spawn(name: &str, mut command: Command, dir: &Path) -> Result<Daemon> {
        let log = dir.join(format!("{name}.log"));
        let output = std::fs::File::create(&log).context(format!("creating {}", log.display()))?;
        let errors = output.try_clone().context("sharing a log file")?;
        let child = command
            .stdin(Stdio::null())
            .stdout(output)
            .stderr(errors)
            .spawn()
            .context(format!("starting {name}"))?;
        Ok(Daemon { name: name.to_string(), pid: child.id(), child: Some(child), log })
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn log_tail(&self) -> String {
        let text = self.log_text();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(20)..].join("\n")
    }

    pub fn exited(&mut self) -> Result<Option<ExitStatus>> {
        match self.child.as_mut() {
            Some(child) => child.try_wait().context(format!("checking {}", self.name)),
            None => Ok(None),
        }
    }

    /// Waits until the log holds a line containing `marker`; returns that line.
    pub async fn wait_for_line(&mut self, marker: &str) -> Result<String> {
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            if let Some(line) = self.log_text().lines().find(|line| line.contains(marker)) {
                return Ok(line.to_string());
            }
            if let Some(status) = self.exited()? {
                return Err(format!(
                    "{} exited ({status}) before it was ready:\n{}",
                    self.name,
                    self.log_tail()
                )
                .into());
            }
            if Instant::now() > deadline {
                return Err(format!(
                    "{} was not ready within {START_TIMEOUT:?}:\n{}",
                    self.name,
                    self.log_tail()
                )
                .into());
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// SIGTERM (by `kill`, no unsafe code needed), then SIGKILL after 5 s; then the
    /// same for descendants it left behind (sshd's per-connection processes).
    pub fn stop(&mut self) -> Result<(Duration, ExitStatus)> {
        let mut child = self.child.take().ok_or("already stopped")?;
        let descendants = process_tree(self.pid).into_iter().skip(1).collect::<Vec<_>>();
        let started = Instant::now();
        terminate(self.pid);
        let outcome = loop {
            if let Some(status) = child.try_wait().context(format!("waiting for {}", self.name))? {
                break Ok((started.elapsed(), status));
            }
            if started.elapsed() > STOP_TIMEOUT {
                let _ = child.kill();
                let _ = child.wait();
                break Err(format!(
                    "{} did not exit within {STOP_TIMEOUT:?} of SIGTERM; killed it",
                    self.name
                ));
            }
            std::thread::sleep(Duration::from_millis(5));
        };
        for pid in descendants {
            terminate(pid);
        }
        outcome.map_err(Into::into)
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if self.child.is_some() {
            if let Err(err) = self.stop() {
                eprintln!("warning: {err}");
            }
        }
    }
}

/// A live process (a zombie waiting for its reaper counts as gone).
pub fn alive(pid: u32) -> bool {
    stat_fields(pid).is_some_and(|fields| !matches!(fields.first().map(String::as_str), Some("Z" | "X")))
}

/// SIGTERM to one process the bench started (or that one of its children started).
pub fn terminate(pid: u32) {
    if alive(pid) {
        let _ = Command::new("kill")
            .arg("-TERM")
            .arg(pid.to_string())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
    }
}

/// A private OpenSSH server on a loopback port: its own host key, user key,
/// authorized_keys, known_hosts and configs under `<root>/ssh`. The machine's own
/// sshd, /etc/ssh and ~/.ssh are never read or written (`ssh -F` skips both the
/// system and the user config).
pub struct Sshd {
    pub daemon: Daemon,
    pub addr: SocketAddr,
    pub dir: PathBuf,
    pub client_config: PathBuf,
}

impl Sshd {
    pub async fn start(root: &Path) -> Result<Sshd> {
        let sshd = SSHD_CANDIDATES
            .iter()
            .map(PathBuf::from)
            .find(|p| p.is_file())
            .ok_or("no sshd found; install openssh-server")?;
        let dir = root.join("ssh");
        std::fs::create_dir_all(&dir).context("creating the ssh directory")?;
        // sshd running as root insists on its (empty) privilege separation directory.
        if !Path::new("/run/sshd").is_dir() {
            std::fs::create_dir_all("/run/sshd").context("creating /run/sshd")?;
            std::fs::set_permissions("/run/sshd", std::fs::Permissions::from_mode(0o755))
                .context("chmod /run/sshd")?;
        }
        keygen(&dir.join("host_key"))?;
        keygen(&dir.join("user_key"))?;
        let user_pub = std::fs::read_to_string(dir.join("user_key.pub")).context("reading user_key.pub")?;
        write_private(&dir.join("authorized_keys"), &user_pub)?;
        let host_pub = std::fs::read_to_string(dir.join("host_key.pub")).context("reading host_key.pub")?;
        let mut fields = host_pub.split_whitespace();
        let (Some(kind), Some(key)) = (fields.next(), fields.next()) else {
            return Err(format!("unexpected host public key {host_pub:?}").into());
        };
        write_private(&dir.join("known_hosts"), &format!("offload-bench {kind} {key}\n"))?;

        // A free port, learned by binding and letting go; retried if sshd loses a race.
        for _ in 0..3 {
            let port = std::net::TcpListener::bind("127.0.0.1:0")
                .and_then(|l| l.local_addr())
                .context("finding a free port")?
                .port();
            let config = dir.join("sshd_config");
            write_private(
                &config,
                &format!(
                    "ListenAddress 127.0.0.1:{port}\n\
                     HostKey {host_key}\n\
                     AuthorizedKeysFile {authorized_keys}\n\
                     PubkeyAuthentication yes\n\
                     PasswordAuthentication no\n\
                     KbdInteractiveAuthentication no\n\
                     PermitRootLogin prohibit-password\n\
                     StrictModes no\n\
                     UsePAM no\n\
                     PidFile none\n\
                     UseDNS no\n\
                     PrintMotd no\n\
                     PrintLastLog no\n\
                     AcceptEnv none\n\
                     PermitUserEnvironment no\n\
                     PermitUserRC no\n\
                     X11Forwarding no\n\
                     AllowAgentForwarding no\n\
                     AllowTcpForwarding yes\n\
                     AllowStreamLocalForwarding yes\n\
                     MaxStartups 100\n\
                     MaxSessions 100\n\
                     LogLevel ERROR\n",
                    host_key = dir.join("host_key").display(),
                    authorized_keys = dir.join("authorized_keys").display(),
                ),
            )?;
            let mut command = guarded_command(&sshd);
            command.arg("-D").arg("-e").arg("-f").arg(&config);
            let mut daemon = Daemon::spawn("sshd", command, &dir)?;
            let addr: SocketAddr = ([127, 0, 0, 1], port).into();
            let deadline = Instant::now() + START_TIMEOUT;
            while Instant::now() < deadline {
                if daemon.exited()?.is_some() {
                    break;
                }
                if ssh_banner(addr).await {
                    let client_config = dir.join("ssh_config");
                    return Ok(Sshd { daemon, addr, dir, client_config });
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            eprintln!("sshd on port {port} did not come up:\n{}", daemon.log_tail());
        }
        Err("could not start sshd on a loopback port".into())
    }

    /// The end of sshd's own log (its errors), for a failure message.
    pub fn log_tail(&self) -> String {
        self.daemon.log_tail()
    }

    /// Writes the client config: each `(alias, port)` reaches this sshd on loopback
    /// at that port (the sshd itself, or a relay in front of it). `extra` lines (two
    /// spaces indented) apply to every alias. No ControlMaster unless a command line
    /// asks for one.
    pub fn write_client_config(&self, hosts: &[(&str, u16)], extra: &str) -> Result<()> {
        let user = current_user()?;
        let aliases: Vec<&str> = hosts.iter().map(|(alias, _)| *alias).collect();
        let mut text = format!(
            "Host {aliases}\n\
             \x20 HostKeyAlias offload-bench\n\
             \x20 User {user}\n\
             \x20 IdentityFile {key}\n\
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
             \x20 ControlMaster no\n\
             \x20 ControlPath none\n\
             \x20 ForwardAgent no\n\
             \x20 ForwardX11 no\n\
             \x20 EscapeChar none\n\
             \x20 LogLevel ERROR\n\
             {extra}",
            aliases = aliases.join(" "),
            key = self.dir.join("user_key").display(),
            known_hosts = self.dir.join("known_hosts").display(),
        );
        for (alias, port) in hosts {
            text.push_str(&format!("Host {alias}\n  HostName 127.0.0.1\n  Port {port}\n"));
        }
        write_private(&self.client_config, &text)
    }
}

/// Whether an SSH server answers on `addr` with its version banner.
async fn ssh_banner(addr: SocketAddr) -> bool {
    let probe = async {
        let mut stream = TcpStream::connect(addr).await.ok()?;
        let mut buf = [0u8; 8];
        stream.read_exact(&mut buf).await.ok()?;
        Some(buf.starts_with(b"SSH-2.0"))
    };
    matches!(tokio::time::timeout(Duration::from_secs(2), probe).await, Ok(Some(true)))
}

fn keygen(path: &Path) -> Result<()> {
    let output = Command::new("ssh-keygen")
        .args(["-q", "-t", "ed25519", "-N", "", "-C", "offload-bench", "-f"])
        .arg(path)
        .stdin(Stdio::null())
        .output()
        .context("running ssh-keygen (install openssh-client)")?;
    if !output.status.success() {
        return Err(format!("ssh-keygen failed: {}", String::from_utf8_lossy(&output.stderr).trim()).into());
    }
    Ok(())
}

/// Writes a file only its owner can read (ssh refuses configs and keys others can write).
pub fn write_private(path: &Path, text: &str) -> Result<()> {
    std::fs::write(path, text).context(format!("writing {}", path.display()))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
        .context(format!("chmod 600 {}", path.display()))
}

fn current_user() -> Result<String> {
    let output = Command::new("id").arg("-un").stdin(Stdio::null()).output().context("running id -un")?;
    let user = String::from_utf8_lossy(&output.stdout).trim().to_string();
    if user.is_empty() {
        return Err("`id -un` printed nothing".into());
    }
    Ok(user)
}
