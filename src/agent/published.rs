//! Where a published TCP port leads, so that a forwarded connection can go
//! straight to the container.
//!
//! The engine serves a published port with its userland proxy: one
//! `docker-proxy -proto tcp -host-ip 127.0.0.1 -host-port 32780
//! -container-ip 172.17.0.2 -container-port 80` process per port, which
//! copies every byte once more between two more sockets. On a forwarded
//! connection that hop costs about as much CPU as the whole link, so the
//! agent dials the container address that proxy serves. Those processes are
//! the engine's own statement of where the port leads, current to the
//! moment: a target is read from a running `docker-proxy` whose parent is
//! `dockerd`, both as root, and re-checked against it on every use. Without
//! one (the userland proxy turned off, rootless engines, an agent that cannot
//! see the host's processes), or when the container does not answer, the
//! agent dials the loopback port as before.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::path::Path;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// A scan that found nothing for a port is not repeated sooner than this:
/// with the userland proxy off, every new connection would walk `/proc`.
const RESCAN_AFTER: Duration = Duration::from_millis(500);

/// One `docker-proxy` process: a host address and the container behind it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UserlandProxy {
    pub host: SocketAddr,
    pub container: SocketAddr,
}

/// Reads a `docker-proxy` command line (its arguments after the program).
/// Only TCP is of interest; both `-flag value` and `-flag=value` are Go's forms.
pub fn parse_docker_proxy<'a>(args: impl IntoIterator<Item = &'a str>) -> Option<UserlandProxy> {
    let mut values: HashMap<&str, &str> = HashMap::new();
    let mut args = args.into_iter();
    while let Some(arg) = args.next() {
        let Some(flag) = arg.strip_prefix("--").or_else(|| arg.strip_prefix('-')) else { continue };
        match flag.split_once('=') {
            Some((name, value)) => {
                values.insert(name, value);
            }
            // Boolean flags (`-use-listen-fd`) take no value.
            None if matches!(flag, "proto" | "host-ip" | "host-port" | "container-ip" | "container-port") => {
                values.insert(flag, args.next()?);
            }
            None => {}
        }
    }
    if values.get("proto").copied().unwrap_or("tcp") != "tcp" {
        return None;
    }
    let address = |ip: &str, port: &str| -> Option<SocketAddr> {
        let ip: IpAddr = values.get(ip)?.trim_start_matches('[').trim_end_matches(']').parse().ok()?;
        Some(SocketAddr::new(ip, values.get(port)?.parse().ok()?))
    };
    Some(UserlandProxy {
        host: address("host-ip", "host-port")?,
        container: address("container-ip", "container-port")?,
    })
}

/// Whether a userland proxy listening on `host` serves a dial to `target`:
/// the same address, or the any-address of the same family.
fn serves(proxy: &UserlandProxy, target: SocketAddr) -> bool {
    proxy.host.port() == target.port()
        && (proxy.host.ip() == target.ip()
            || (proxy.host.ip().is_unspecified() && proxy.host.is_ipv4() == target.is_ipv4()))
}

/// A container address that did not answer is not tried again for this long:
/// every new connection would wait `DIRECT_DIAL_LIMIT` first.
const UNREACHABLE_FOR: Duration = Duration::from_secs(60);

/// The agent's view of the engine's userland proxies, read from `/proc`.
pub struct PublishedPorts {
    proc_root: std::path::PathBuf,
    state: Mutex<Known>,
}

#[derive(Default)]
struct Known {
    /// The processes found by the last scan and what each serves.
    proxies: Vec<(u32, UserlandProxy)>,
    scanned: Option<Instant>,
    /// Container addresses that did not answer a direct dial, and when.
    unreachable: HashMap<SocketAddr, Instant>,
}

impl Default for PublishedPorts {
    fn default() -> Self {
        Self::new("/proc")
    }
}

impl PublishedPorts {
    pub fn new(proc_root: impl Into<std::path::PathBuf>) -> Self {
        Self { proc_root: proc_root.into(), state: Mutex::new(Known::default()) }
    }

    fn known(&self) -> std::sync::MutexGuard<'_, Known> {
        self.state.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// The container address behind TCP `target` (a loopback address and
    /// port), if a userland proxy of the engine serves it right now. Reads
    /// `/proc`: call it off the async runtime.
    pub fn container_for(&self, target: SocketAddr) -> Option<SocketAddr> {
        let found = self.lookup(target)?;
        let mut known = self.known();
        match known.unreachable.get(&found) {
            Some(at) if at.elapsed() < UNREACHABLE_FOR => None,
            Some(_) => {
                known.unreachable.remove(&found);
                Some(found)
            }
            None => Some(found),
        }
    }

    /// Remembers that `container` did not answer a direct dial.
    pub fn mark_unreachable(&self, container: SocketAddr) {
        self.known().unreachable.insert(container, Instant::now());
    }

    fn lookup(&self, target: SocketAddr) -> Option<SocketAddr> {
        let (candidate, fresh) = {
            let known = self.known();
            let candidate = best(&known.proxies, target);
            (candidate, known.scanned.map_or(true, |at| at.elapsed() >= RESCAN_AFTER))
        };
        // The same process, still the engine's and saying the same: a port
        // freed and published again has a new process.
        if let Some((pid, proxy)) = candidate {
            if read_proxy(&self.proc_root, pid) == Some(proxy) {
                return Some(proxy.container);
            }
        }
        // A stale entry is rescanned at once; a port with none at most every
        // RESCAN_AFTER. The walk runs without the lock held.
        if !fresh && candidate.is_none() {
            return None;
        }
        let proxies = scan(&self.proc_root);
        let found = best(&proxies, target).map(|(_, proxy)| proxy.container);
        let mut known = self.known();
        known.proxies = proxies;
        known.scanned = Some(Instant::now());
        found
    }
}

/// The proxy for `target`: one on its exact address before one on the
/// any-address, and an IPv4 container address (a bridge always routes it)
/// before an IPv6 one.
fn best(proxies: &[(u32, UserlandProxy)], target: SocketAddr) -> Option<(u32, UserlandProxy)> {
    proxies
        .iter()
        .filter(|(_, proxy)| serves(proxy, target))
        .min_by_key(|(pid, proxy)| (proxy.host.ip() != target.ip(), !proxy.container.is_ipv4(), *pid))
        .copied()
}

/// Every userland proxy of the engine on this host.
fn scan(proc_root: &Path) -> Vec<(u32, UserlandProxy)> {
    let Ok(entries) = std::fs::read_dir(proc_root) else { return Vec::new() };
    entries
        .flatten()
        .filter_map(|entry| entry.file_name().to_str().and_then(|name| name.parse::<u32>().ok()))
        .filter(|pid| {
            std::fs::read_to_string(proc_root.join(pid.to_string()).join("comm"))
                .is_ok_and(|comm| comm.trim_end() == "docker-proxy")
        })
        .filter_map(|pid| read_proxy(proc_root, pid).map(|proxy| (pid, proxy)))
        .collect()
}

/// What process `pid` forwards, if it is a userland proxy of the engine.
/// Its name and arguments prove nothing (anyone can start a program under
/// that name, a setuid one runs as root, a container's root is root): it
/// must run `docker-proxy` with every uid 0, and its parent must be a
/// `dockerd` with every uid 0, which no other user can arrange.
fn read_proxy(proc_root: &Path, pid: u32) -> Option<UserlandProxy> {
    let dir = proc_root.join(pid.to_string());
    if !runs_as_root(&dir, "docker-proxy") {
        return None;
    }
    let parent = parent_pid(&dir)?;
    if !runs_as_root(&proc_root.join(parent.to_string()), "dockerd") {
        return None;
    }
    let cmdline = std::fs::read(dir.join("cmdline")).ok()?;
    let text = std::str::from_utf8(&cmdline).ok()?;
    let mut args = text.split('\0').filter(|arg| !arg.is_empty());
    args.next()?;
    parse_docker_proxy(args)
}

/// The process in `dir` runs the executable named `program` (the file
/// itself, not the name it was started by) with real, effective, saved and
/// filesystem uid 0.
fn runs_as_root(dir: &Path, program: &str) -> bool {
    let runs_program = std::fs::read_link(dir.join("exe"))
        .is_ok_and(|exe| exe.file_name().is_some_and(|name| name == program));
    runs_program
        && std::fs::read_to_string(dir.join("status")).is_ok_and(|status| {
            status.lines().find_map(|line| line.strip_prefix("Uid:")).is_some_and(|uids| {
                let uids: Vec<&str> = uids.split_whitespace().collect();
                uids.len() == 4 && uids.iter().all(|uid| *uid == "0")
            })
        })
}

/// The parent pid from `stat` (after the name, which may hold spaces or parentheses).
fn parent_pid(dir: &Path) -> Option<u32> {
    let stat = std::fs::read_to_string(dir.join("stat")).ok()?;
    let (_, rest) = stat.rsplit_once(')')?;
    rest.split_whitespace().nth(1)?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parsed(line: &str) -> Option<UserlandProxy> {
        parse_docker_proxy(line.split(' '))
    }

    #[test]
    fn reads_the_engines_command_lines() {
        let expected = UserlandProxy {
            host: "127.0.0.1:32780".parse().unwrap(),
            container: "172.17.0.2:80".parse().unwrap(),
        };
        // Docker 20.10.
        assert_eq!(
            parsed(
                "-proto tcp -host-ip 127.0.0.1 -host-port 32780 -container-ip 172.17.0.2 -container-port 80"
            ),
            Some(expected)
        );
        // Docker 28 adds a boolean flag, and Go accepts `-flag=value`.
        assert_eq!(
            parsed("-proto tcp -host-ip 127.0.0.1 -host-port 32780 -container-ip=172.17.0.2 -container-port 80 -use-listen-fd"),
            Some(expected)
        );
        assert_eq!(
            parsed("-proto tcp -host-ip :: -host-port 8080 -container-ip fd00::2 -container-port 80")
                .map(|p| p.container),
            Some("[fd00::2]:80".parse().unwrap())
        );
    }

    #[test]
    fn ignores_udp_and_incomplete_lines() {
        assert_eq!(
            parsed("-proto udp -host-ip 127.0.0.1 -host-port 53 -container-ip 172.17.0.2 -container-port 53"),
            None
        );
        assert_eq!(parsed("-proto tcp -host-ip 127.0.0.1 -host-port 53 -container-ip 172.17.0.2"), None);
        assert_eq!(parsed("-proto tcp -host-ip 127.0.0.1 -host-port"), None);
        assert_eq!(parsed("-host-ip nonsense -host-port 1 -container-ip 172.17.0.2 -container-port 2"), None);
    }

    #[test]
    fn a_proxy_serves_its_own_address_or_its_familys_any_address() {
        let proxy = |host: &str| UserlandProxy {
            host: host.parse().unwrap(),
            container: "172.17.0.2:80".parse().unwrap(),
        };
        let target: SocketAddr = "127.0.0.1:8080".parse().unwrap();
        assert!(serves(&proxy("127.0.0.1:8080"), target));
        assert!(serves(&proxy("0.0.0.0:8080"), target));
        assert!(!serves(&proxy("127.0.0.2:8080"), target));
        assert!(!serves(&proxy("[::]:8080"), target));
        assert!(!serves(&proxy("127.0.0.1:8081"), target));
    }

    /// A fake `/proc` entry: name, executable, uids, parent and arguments.
    struct FakeProcess<'a> {
        pid: u32,
        comm: &'a str,
        exe: &'a str,
        uids: &'a str,
        parent: u32,
        args: &'a str,
    }

    fn fake(root: &Path, process: FakeProcess<'_>) {
        let dir = root.join(process.pid.to_string());
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("comm"), format!("{}\n", process.comm)).unwrap();
        std::os::unix::fs::symlink(process.exe, dir.join("exe")).unwrap();
        std::fs::write(dir.join("status"), format!("Name:\t{}\nUid:\t{}\n", process.comm, process.uids))
            .unwrap();
        std::fs::write(
            dir.join("stat"),
            format!("{} ({}) S {} 1 1 0", process.pid, process.comm, process.parent),
        )
        .unwrap();
        let cmdline: Vec<u8> = process.args.split(' ').flat_map(|arg| arg.bytes().chain([0])).collect();
        std::fs::write(dir.join("cmdline"), cmdline).unwrap();
    }

    const ROOT: &str = "0\t0\t0\t0";

    fn dockerd(root: &Path, pid: u32) {
        fake(
            root,
            FakeProcess {
                pid,
                comm: "dockerd",
                exe: "/usr/sbin/dockerd",
                uids: ROOT,
                parent: 1,
                args: "/usr/sbin/dockerd",
            },
        );
    }

    fn docker_proxy(root: &Path, pid: u32, parent: u32, host: &str, container_ip: &str) {
        let (host_ip, host_port) = host.rsplit_once(':').unwrap();
        let args = format!(
            "/usr/sbin/docker-proxy -proto tcp -host-ip {host_ip} -host-port {host_port} -container-ip {container_ip} -container-port 80"
        );
        fake(
            root,
            FakeProcess {
                pid,
                comm: "docker-proxy",
                exe: "/usr/sbin/docker-proxy",
                uids: ROOT,
                parent,
                args: &args,
            },
        );
    }

    fn loopback(port: u16) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], port))
    }

    #[test]
    fn follows_the_engines_proxy_serving_a_port() {
        let root = tempfile::tempdir().unwrap();
        dockerd(root.path(), 10);
        docker_proxy(root.path(), 4242, 10, "127.0.0.1:32780", "172.17.0.2");
        let ports = PublishedPorts::new(root.path());
        assert_eq!(ports.container_for(loopback(32780)), Some("172.17.0.2:80".parse().unwrap()));
        assert_eq!(ports.container_for(loopback(32781)), None);

        // The port freed and published again for another container: a new
        // process, read at once, never the old address.
        std::fs::remove_dir_all(root.path().join("4242")).unwrap();
        docker_proxy(root.path(), 5000, 10, "127.0.0.1:32780", "172.17.0.9");
        assert_eq!(ports.container_for(loopback(32780)), Some("172.17.0.9:80".parse().unwrap()));

        std::fs::remove_dir_all(root.path().join("5000")).unwrap();
        assert_eq!(ports.container_for(loopback(32780)), None);
    }

    #[test]
    fn impostors_named_docker_proxy_are_ignored() {
        let root = tempfile::tempdir().unwrap();
        dockerd(root.path(), 10);
        let args = "docker-proxy -proto tcp -host-ip 127.0.0.1 -host-port 5432 -container-ip 10.9.9.9 -container-port 9999";
        // A setuid program started under that name: root, but not the executable.
        fake(
            root.path(),
            FakeProcess {
                pid: 20,
                comm: "docker-proxy",
                exe: "/usr/bin/sudo",
                uids: "1000\t0\t0\t0",
                parent: 1,
                args,
            },
        );
        // The real executable run by a user, or by root outside the engine
        // (a container's root process has containerd-shim as parent).
        fake(
            root.path(),
            FakeProcess {
                pid: 21,
                comm: "docker-proxy",
                exe: "/usr/sbin/docker-proxy",
                uids: "1000\t1000\t1000\t1000",
                parent: 10,
                args,
            },
        );
        fake(
            root.path(),
            FakeProcess {
                pid: 30,
                comm: "containerd-shim",
                exe: "/usr/bin/containerd-shim-runc-v2",
                uids: ROOT,
                parent: 1,
                args: "shim",
            },
        );
        fake(
            root.path(),
            FakeProcess {
                pid: 31,
                comm: "docker-proxy",
                exe: "/usr/sbin/docker-proxy",
                uids: ROOT,
                parent: 30,
                args,
            },
        );
        let ports = PublishedPorts::new(root.path());
        assert_eq!(ports.container_for(loopback(5432)), None);
    }

    #[test]
    fn the_exact_address_and_the_ipv4_container_address_win() {
        let root = tempfile::tempdir().unwrap();
        dockerd(root.path(), 10);
        docker_proxy(root.path(), 100, 10, "[::]:8080", "fd00::2");
        docker_proxy(root.path(), 101, 10, "0.0.0.0:8080", "172.17.0.2");
        docker_proxy(root.path(), 102, 10, "127.0.0.2:8080", "172.17.0.3");
        docker_proxy(root.path(), 200, 10, "0.0.0.0:9090", "172.17.0.4");
        docker_proxy(root.path(), 201, 10, "127.0.0.1:9090", "172.17.0.5");
        let ports = PublishedPorts::new(root.path());
        assert_eq!(ports.container_for(loopback(8080)), Some("172.17.0.2:80".parse().unwrap()));
        assert_eq!(ports.container_for(loopback(9090)), Some("172.17.0.5:80".parse().unwrap()));
        assert_eq!(ports.container_for("[::1]:8080".parse().unwrap()), Some("[fd00::2]:80".parse().unwrap()));
    }

    #[test]
    fn a_container_that_did_not_answer_is_not_dialled_again_at_once() {
        let root = tempfile::tempdir().unwrap();
        dockerd(root.path(), 10);
        docker_proxy(root.path(), 4242, 10, "127.0.0.1:32780", "172.17.0.2");
        let ports = PublishedPorts::new(root.path());
        let container = ports.container_for(loopback(32780)).unwrap();
        ports.mark_unreachable(container);
        assert_eq!(ports.container_for(loopback(32780)), None);
    }

    #[test]
    fn a_proc_tree_without_proxies_gives_no_target() {
        let empty = tempfile::tempdir().unwrap();
        let ports = PublishedPorts::new(empty.path());
        assert_eq!(ports.container_for(loopback(8080)), None);
    }
}
