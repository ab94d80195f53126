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
//! moment: a target is read from a running root-owned `docker-proxy` and
//! re-checked against it on every use. Without one (the userland proxy
//! turned off, rootless engines, an agent that cannot see the host's
//! processes), or when the container does not answer, the agent dials the
//! loopback port as before.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::os::unix::fs::MetadataExt;
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

/// Whether a userland proxy listening on `host` serves loopback `port`.
fn serves_loopback(proxy: &UserlandProxy, port: u16) -> bool {
    proxy.host.port() == port && (proxy.host.ip().is_loopback() || proxy.host.ip().is_unspecified())
}

/// The agent's view of the engine's userland proxies, read from `/proc`.
pub struct PublishedPorts {
    proc_root: std::path::PathBuf,
    state: Mutex<Known>,
}

#[derive(Default)]
struct Known {
    /// Host port → the process serving it and what it said.
    by_port: HashMap<u16, (u32, UserlandProxy)>,
    scanned: Option<Instant>,
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

    /// The container address behind loopback TCP `port`, if a userland proxy
    /// of the engine serves it right now.
    pub fn container_for(&self, port: u16) -> Option<SocketAddr> {
        let mut known = self.state.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some((pid, proxy)) = known.by_port.get(&port).copied() {
            // The same process, still saying the same: a port freed and
            // taken again by another container has a new process.
            if read_proxy(&self.proc_root, pid) == Some(proxy) {
                return Some(proxy.container);
            }
        }
        let fresh = known.scanned.map_or(true, |at| at.elapsed() >= RESCAN_AFTER);
        if !fresh && !known.by_port.contains_key(&port) {
            return None;
        }
        known.by_port = scan(&self.proc_root);
        known.scanned = Some(Instant::now());
        known.by_port.get(&port).map(|(_, proxy)| proxy.container)
    }
}

/// Every root-owned `docker-proxy` serving a loopback (or any-address) port.
fn scan(proc_root: &Path) -> HashMap<u16, (u32, UserlandProxy)> {
    let mut found = HashMap::new();
    let Ok(entries) = std::fs::read_dir(proc_root) else { return found };
    for entry in entries.flatten() {
        let Some(pid) = entry.file_name().to_str().and_then(|name| name.parse::<u32>().ok()) else {
            continue;
        };
        let is_proxy = std::fs::read_to_string(entry.path().join("comm"))
            .is_ok_and(|comm| comm.trim_end() == "docker-proxy");
        if !is_proxy {
            continue;
        }
        if let Some(proxy) = read_proxy(proc_root, pid) {
            // A port published on both families has a proxy for each; the
            // IPv4 container address is the one a bridge always routes.
            let taken_by_v4 = found
                .get(&proxy.host.port())
                .is_some_and(|(_, known): &(u32, UserlandProxy)| known.container.is_ipv4());
            if serves_loopback(&proxy, proxy.host.port()) && !taken_by_v4 {
                found.insert(proxy.host.port(), (pid, proxy));
            }
        }
    }
    found
}

/// What process `pid` forwards, if it is a root-owned userland proxy: only
/// root can start one, so no other user can point the agent elsewhere.
fn read_proxy(proc_root: &Path, pid: u32) -> Option<UserlandProxy> {
    let dir = proc_root.join(pid.to_string());
    if std::fs::metadata(&dir).ok()?.uid() != 0 {
        return None;
    }
    let cmdline = std::fs::read(dir.join("cmdline")).ok()?;
    let text = std::str::from_utf8(&cmdline).ok()?;
    let mut args = text.split('\0').filter(|arg| !arg.is_empty());
    let program = args.next()?;
    if !program.ends_with("docker-proxy") {
        return None;
    }
    parse_docker_proxy(args)
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
    fn only_loopback_or_any_address_proxies_serve_the_agents_dials() {
        let proxy = |host: &str| UserlandProxy {
            host: host.parse().unwrap(),
            container: "172.17.0.2:80".parse().unwrap(),
        };
        assert!(serves_loopback(&proxy("127.0.0.1:8080"), 8080));
        assert!(serves_loopback(&proxy("0.0.0.0:8080"), 8080));
        assert!(!serves_loopback(&proxy("192.168.1.5:8080"), 8080));
        assert!(!serves_loopback(&proxy("127.0.0.1:8081"), 8080));
    }

    fn fake_process(root: &Path, pid: u32, comm: &str, args: &[&str]) {
        let dir = root.join(pid.to_string());
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("comm"), format!("{comm}\n")).unwrap();
        let cmdline: Vec<u8> = args.iter().flat_map(|arg| arg.bytes().chain([0])).collect();
        std::fs::write(dir.join("cmdline"), cmdline).unwrap();
    }

    fn proxy_args(host_port: &str, container_ip: &str) -> Vec<String> {
        ["/usr/sbin/docker-proxy", "-proto", "tcp", "-host-ip", "127.0.0.1", "-host-port", host_port]
            .into_iter()
            .chain(["-container-ip", container_ip, "-container-port", "80"])
            .map(String::from)
            .collect()
    }

    #[test]
    fn follows_the_userland_proxy_serving_a_port() {
        if own_uid() != 0 {
            return; // The tree must be root-owned, as the real one is.
        }
        let root = tempfile::tempdir().unwrap();
        let args = proxy_args("32780", "172.17.0.2");
        fake_process(root.path(), 4242, "docker-proxy", &args.iter().map(String::as_str).collect::<Vec<_>>());
        fake_process(root.path(), 4243, "sleep", &["sleep", "-host-port", "9"]);
        let ports = PublishedPorts::new(root.path());
        assert_eq!(ports.container_for(32780), Some("172.17.0.2:80".parse().unwrap()));
        assert_eq!(ports.container_for(32781), None);

        // The port freed and published again for another container: a new
        // process, read at once, never the old address.
        std::fs::remove_dir_all(root.path().join("4242")).unwrap();
        let args = proxy_args("32780", "172.17.0.9");
        fake_process(root.path(), 5000, "docker-proxy", &args.iter().map(String::as_str).collect::<Vec<_>>());
        assert_eq!(ports.container_for(32780), Some("172.17.0.9:80".parse().unwrap()));

        std::fs::remove_dir_all(root.path().join("5000")).unwrap();
        assert_eq!(ports.container_for(32780), None);
    }

    #[test]
    fn a_port_on_both_families_leads_to_the_ipv4_container_address() {
        if own_uid() != 0 {
            return;
        }
        let root = tempfile::tempdir().unwrap();
        let v6: Vec<&str> = "/usr/sbin/docker-proxy -proto tcp -host-ip :: -host-port 8080 -container-ip fd00::2 -container-port 80"
            .split(' ')
            .collect();
        let v4: Vec<&str> = "/usr/sbin/docker-proxy -proto tcp -host-ip 0.0.0.0 -host-port 8080 -container-ip 172.17.0.2 -container-port 80"
            .split(' ')
            .collect();
        // Directory order decides which one a scan meets first: try both.
        fake_process(root.path(), 100, "docker-proxy", &v6);
        fake_process(root.path(), 101, "docker-proxy", &v4);
        fake_process(root.path(), 102, "docker-proxy", &v6);
        let ports = PublishedPorts::new(root.path());
        assert_eq!(ports.container_for(8080), Some("172.17.0.2:80".parse().unwrap()));
    }

    fn own_uid() -> u32 {
        std::fs::metadata("/proc/self").map(|m| m.uid()).unwrap_or(u32::MAX)
    }

    #[test]
    fn a_proc_tree_without_proxies_gives_no_target() {
        let empty = tempfile::tempdir().unwrap();
        let ports = PublishedPorts::new(empty.path());
        assert_eq!(ports.container_for(8080), None);
    }
}
