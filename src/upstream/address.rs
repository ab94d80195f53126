//! Engine addresses in Docker's own notation: `unix:///path`, `tcp://host:port`,
//! `tls://host:port` (tcp with TLS, as `--tlsverify` would use).

use std::fmt;
use std::path::PathBuf;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EngineAddress {
    Unix(PathBuf),
    Tcp { host: String, port: u16 },
    Tls { host: String, port: u16 },
}

impl EngineAddress {
    pub fn parse(text: &str) -> Result<Self, String> {
        if let Some(path) = text.strip_prefix("unix://") {
            if !path.starts_with('/') {
                return Err(format!("{text:?}: a unix socket path must be absolute (unix:///path)"));
            }
            return Ok(EngineAddress::Unix(PathBuf::from(path)));
        }
        if let Some(rest) = text.strip_prefix("tcp://") {
            let (host, port) = host_port(text, rest)?;
            return Ok(EngineAddress::Tcp { host, port });
        }
        if let Some(rest) = text.strip_prefix("tls://") {
            let (host, port) = host_port(text, rest)?;
            return Ok(EngineAddress::Tls { host, port });
        }
        Err(format!("{text:?}: expected unix:///path, tcp://host:port or tls://host:port"))
    }
}

fn host_port(text: &str, rest: &str) -> Result<(String, u16), String> {
    let rest = rest.trim_end_matches('/');
    let (host, port) = rest.rsplit_once(':').ok_or_else(|| format!("{text:?}: missing port (host:port)"))?;
    let host = host.trim_start_matches('[').trim_end_matches(']');
    if host.is_empty() {
        return Err(format!("{text:?}: missing host"));
    }
    let port = port.parse::<u16>().map_err(|_| format!("{text:?}: invalid port {port:?}"))?;
    Ok((host.to_string(), port))
}

impl fmt::Display for EngineAddress {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            EngineAddress::Unix(path) => write!(f, "unix://{}", path.display()),
            EngineAddress::Tcp { host, port } if host.contains(':') => {
                write!(f, "tcp://[{host}]:{port}")
            }
            EngineAddress::Tcp { host, port } => write!(f, "tcp://{host}:{port}"),
            EngineAddress::Tls { host, port } if host.contains(':') => {
                write!(f, "tls://[{host}]:{port}")
            }
            EngineAddress::Tls { host, port } => write!(f, "tls://{host}:{port}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_docker_addresses() {
        assert_eq!(
            EngineAddress::parse("unix:///var/run/docker.sock"),
            Ok(EngineAddress::Unix("/var/run/docker.sock".into()))
        );
        assert_eq!(
            EngineAddress::parse("tcp://127.0.0.1:2375"),
            Ok(EngineAddress::Tcp { host: "127.0.0.1".into(), port: 2375 })
        );
        assert_eq!(
            EngineAddress::parse("tls://[::1]:2376"),
            Ok(EngineAddress::Tls { host: "::1".into(), port: 2376 })
        );
        assert_eq!(
            EngineAddress::parse("tls://[::1]:2376").map(|a| a.to_string()),
            Ok("tls://[::1]:2376".to_string())
        );
    }

    #[test]
    fn rejects_bad_addresses() {
        assert!(EngineAddress::parse("unix://relative.sock").is_err());
        assert!(EngineAddress::parse("tcp://host").is_err());
        assert!(EngineAddress::parse("tcp://:2375").is_err());
        assert!(EngineAddress::parse("tcp://host:99999").is_err());
        assert!(EngineAddress::parse("http://host:1").is_err());
        assert!(EngineAddress::parse("/var/run/docker.sock").is_err());
    }
}
