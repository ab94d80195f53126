//! Published ports answer on this machine: for every running container with
//! published ports, a local listener (TCP) or socket (UDP, see `proxy::udp`)
//! on the same port number; each accepted connection, or each UDP peer, is
//! one tunnel over the link to the remote's loopback.
//!
//! Forwards are opened when a start through this proxy succeeds (before the
//! start response goes back, so a client connecting right after `docker run
//! -d` never sees a refusal), and kept true by a background watch of the
//! engine's events (restart policies, other clients, Compose).

use std::collections::{HashMap, HashSet};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{header::HeaderName, HeaderValue, Method, Request};
use http_body_util::{BodyExt, Limited};
use tokio::net::{TcpListener, UdpSocket};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use crate::body;
use crate::docker::ports::{published, Published};
use crate::lifecycle::Lifecycle;
use crate::link::protocol::BACKGROUND;
use crate::upstream::Upstream;

/// Short retries first (a port we are just releasing), then the slow ones.
const QUICK_RETRIES: usize = 10;
const QUICK_RETRY: Duration = Duration::from_millis(20);

/// How often a listener whose port is taken locally is tried again.
const RETRY_TAKEN_PORT: Duration = Duration::from_secs(2);

pub struct PortForwards {
    upstream: Arc<dyn Upstream>,
    lifecycle: Lifecycle,
    /// Where ports published without an address listen (`--publish-address`).
    default_address: IpAddr,
    forwards: Mutex<HashMap<String, Vec<Forward>>>,
    /// Containers that have had forwards and still exist: a container that
    /// dies can be restarted by its policy, so its events are still followed.
    watched: Mutex<HashSet<String>>,
    /// Wakes the event watch when the first forward appears.
    wanted: Notify,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Protocol {
    Tcp,
    Udp,
}

impl Protocol {
    /// `None` for what is not forwarded (`sctp`).
    fn parse(name: &str) -> Option<Self> {
        match name {
            "tcp" => Some(Self::Tcp),
            "udp" => Some(Self::Udp),
            _ => None,
        }
    }

    fn name(self) -> &'static str {
        match self {
            Self::Tcp => "tcp",
            Self::Udp => "udp",
        }
    }
}

struct Forward {
    port: u16,
    protocol: Protocol,
    /// The container's name, so requests that name it find its forwards.
    container: String,
    /// A reconcile only drops forwards older than its container list: a
    /// start that lands while the list is on its way is newer than the list.
    opened: Instant,
    stop: CancellationToken,
}

impl Drop for Forward {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

impl PortForwards {
    pub fn new(upstream: Arc<dyn Upstream>, lifecycle: Lifecycle, default_address: IpAddr) -> Arc<Self> {
        let forwards = Arc::new(Self {
            upstream,
            lifecycle: lifecycle.clone(),
            default_address,
            forwards: Mutex::new(HashMap::new()),
            watched: Mutex::new(HashSet::new()),
            wanted: Notify::new(),
        });
        lifecycle.spawn(forwards.clone().watch_events());
        forwards
    }

    fn watched(&self) -> std::sync::MutexGuard<'_, HashSet<String>> {
        self.watched.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn table(&self) -> std::sync::MutexGuard<'_, HashMap<String, Vec<Forward>>> {
        self.forwards.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Makes the forwards of one container match its real bindings.
    pub async fn sync(&self, container: &str) {
        let inspect = match self.get_json(&format!("/containers/{container}/json")).await {
            Some(inspect) => inspect,
            None => return,
        };
        let id = inspect["Id"].as_str().unwrap_or(container).to_string();
        let running = inspect["State"]["Running"].as_bool() == Some(true);
        let ports: Vec<Published> = if running { published(&inspect) } else { Vec::new() };
        let ports: Vec<(Protocol, Published)> =
            ports.into_iter().filter_map(|p| Some((Protocol::parse(&p.protocol)?, p))).collect();
        let mut table = self.table();
        let existing: Vec<(Protocol, u16)> =
            table.get(&id).map(|f| f.iter().map(|f| (f.protocol, f.port)).collect()).unwrap_or_default();
        let wanted: Vec<(Protocol, u16)> =
            ports.iter().map(|(protocol, p)| (*protocol, p.host_port)).collect();
        if existing == wanted {
            return;
        }
        table.remove(&id);
        if ports.is_empty() {
            return;
        }
        let name = inspect["Name"].as_str().unwrap_or("").trim_start_matches('/').to_string();
        let mut opened = Vec::new();
        for (protocol, port) in ports {
            let address = SocketAddr::new(self.listen_address(&port.requested_address), port.host_port);
            let stop = self.lifecycle.token.child_token();
            match protocol {
                Protocol::Tcp => self.open(address, name.clone(), stop.clone()),
                Protocol::Udp => self.open_udp(address, name.clone(), stop.clone()),
            }
            opened.push(Forward {
                port: port.host_port,
                protocol,
                container: name.clone(),
                opened: Instant::now(),
                stop,
            });
        }
        table.insert(id.clone(), opened);
        drop(table);
        self.watched().insert(id);
        self.wanted.notify_one();
    }

    /// The open forwards, for `offload status`.
    pub fn snapshot(&self) -> Vec<serde_json::Value> {
        let mut list: Vec<serde_json::Value> = self
            .table()
            .values()
            .flatten()
            .map(|f| serde_json::json!({"container": f.container, "port": f.port, "protocol": f.protocol.name()}))
            .collect();
        list.sort_by_key(|f| f["port"].as_u64());
        list
    }

    /// Closes the forwards of a container (by id, id prefix or name), e.g.
    /// after a stop, kill or remove through this proxy.
    pub fn remove(&self, container: &str) {
        if container.is_empty() {
            return;
        }
        self.table().retain(|id, forwards| {
            !(id.starts_with(container) || forwards.first().is_some_and(|f| f.container == container))
        });
    }

    fn listen_address(&self, requested: &str) -> IpAddr {
        match requested.parse::<IpAddr>() {
            Ok(address) => address,
            Err(_) => self.default_address,
        }
    }

    /// Binds synchronously when it can (so the start response only goes back
    /// once the port answers), else keeps retrying in the background.
    fn open(&self, address: SocketAddr, container: String, stop: CancellationToken) {
        let listener = bind_tcp(address);
        let upstream = self.upstream.clone();
        let lifecycle = self.lifecycle.clone();
        let task = async move {
            let listener = match listener {
                Ok(listener) => listener,
                Err(error) => match retry_bind(address, &container, error, &stop, bind_tcp).await {
                    Some(listener) => listener,
                    None => return,
                },
            };
            tracing::info!(%address, %container, "port forward open");
            loop {
                let accepted = tokio::select! {
                    _ = stop.cancelled() => break,
                    accepted = listener.accept() => accepted,
                };
                let Ok((mut local, peer)) = accepted else { continue };
                let _ = local.set_nodelay(true);
                let upstream = upstream.clone();
                let port = address.port();
                lifecycle.spawn(async move {
                    match upstream.open_tunnel(port).await {
                        Ok(mut remote) => {
                            match remote.splice(&mut local).await {
                                // The agent's refusal shows on the first read.
                                Err(error) if error.kind() == std::io::ErrorKind::ConnectionRefused => {
                                    tracing::warn!(%peer, port, %error, "cannot forward a connection")
                                }
                                Err(error) => {
                                    tracing::debug!(%peer, port, %error, "forwarded connection aborted");
                                    // The abort reaches the client as one (RST), not as a clean end.
                                    let _ = local.set_zero_linger();
                                }
                                Ok(_) => {}
                            }
                        }
                        Err(error) => tracing::warn!(%peer, port, %error, "cannot forward a connection"),
                    }
                });
            }
            tracing::info!(%address, %container, "port forward closed");
        };
        self.lifecycle.spawn(task);
    }

    /// The same for a UDP port: the socket is bound before the start
    /// response goes back when it can be.
    fn open_udp(&self, address: SocketAddr, container: String, stop: CancellationToken) {
        let socket = bind_udp(address);
        let upstream = self.upstream.clone();
        let lifecycle = self.lifecycle.clone();
        let task = async move {
            let socket = match socket {
                Ok(socket) => socket,
                Err(error) => match retry_bind(address, &container, error, &stop, bind_udp).await {
                    Some(socket) => socket,
                    None => return,
                },
            };
            tracing::info!(%address, %container, "UDP port forward open");
            super::udp::serve(socket, address.port(), upstream, lifecycle, stop).await;
            tracing::info!(%address, %container, "UDP port forward closed");
        };
        self.lifecycle.spawn(task);
    }

    async fn get_json(&self, path: &str) -> Option<serde_json::Value> {
        let mut request = Request::new(body::empty());
        *request.method_mut() = Method::GET;
        *request.uri_mut() = path.parse().ok()?;
        request.headers_mut().insert(HeaderName::from_static(BACKGROUND), HeaderValue::from_static("1"));
        let exchange = self.upstream.send(request).await.ok()?;
        if !exchange.response.status().is_success() {
            return None;
        }
        let bytes = Limited::new(exchange.response.into_body(), 16 << 20).collect().await.ok()?.to_bytes();
        serde_json::from_slice(&bytes).ok()
    }

    /// Follows the engine's container events while any forward exists, and
    /// reconciles with the running containers after every (re)connect.
    async fn watch_events(self: Arc<Self>) {
        loop {
            while self.watched().is_empty() {
                tokio::select! {
                    _ = self.lifecycle.token.cancelled() => return,
                    _ = self.wanted.notified() => {}
                }
            }
            // Subscribe first, then list: whatever changes after the list
            // is in the events still to be read, so nothing falls between.
            let events = self.subscribe_events().await;
            self.reconcile().await;
            if let Some(events) = events {
                self.follow_events(events).await;
            }
            tokio::select! {
                _ = self.lifecycle.token.cancelled() => return,
                _ = tokio::time::sleep(Duration::from_secs(1)) => {}
            }
        }
    }

    /// After a (re)connect: forwards for every running container, and only
    /// still-existing containers stay watched.
    async fn reconcile(&self) {
        let listed = Instant::now();
        let Some(all) = self.get_json("/containers/json?all=1").await else { return };
        let containers: Vec<(String, bool)> = all
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|c| Some((c["Id"].as_str()?.to_string(), c["State"].as_str() == Some("running"))))
            .collect();
        let running: Vec<&String> = containers.iter().filter(|(_, up)| *up).map(|(id, _)| id).collect();
        self.table().retain(|id, forwards| {
            running.contains(&id) || forwards.first().is_some_and(|f| f.opened >= listed)
        });
        self.watched().retain(|id| containers.iter().any(|(known, _)| known == id));
        for id in running {
            self.sync(id).await;
        }
    }

    async fn subscribe_events(&self) -> Option<body::Body> {
        let mut request = Request::new(body::empty());
        let filter = "/events?filters=%7B%22type%22%3A%5B%22container%22%5D%7D";
        *request.uri_mut() = http::Uri::from_static(filter);
        request.headers_mut().insert(HeaderName::from_static(BACKGROUND), HeaderValue::from_static("1"));
        let exchange = self.upstream.send(request).await.ok()?;
        exchange.response.status().is_success().then(|| exchange.response.into_body())
    }

    async fn follow_events(&self, mut events: body::Body) {
        let mut pending = Vec::new();
        loop {
            let frame = tokio::select! {
                _ = self.lifecycle.token.cancelled() => return,
                frame = events.frame() => frame,
            };
            let Some(Ok(frame)) = frame else { return };
            let Ok(data) = frame.into_data() else { continue };
            pending.extend_from_slice(&data);
            while let Some(end) = pending.iter().position(|b| *b == b'\n') {
                let line: Vec<u8> = pending.drain(..=end).collect();
                self.on_event(Bytes::from(line)).await;
            }
            if self.watched().is_empty() {
                return;
            }
        }
    }

    async fn on_event(&self, line: Bytes) {
        let Ok(event) = serde_json::from_slice::<serde_json::Value>(&line) else { return };
        let id = event["id"].as_str().unwrap_or_default();
        match event["Action"].as_str().unwrap_or_default() {
            "start" | "restart" | "unpause" => self.sync(id).await,
            // `remove` ignores an empty id.
            "die" | "stop" | "kill" | "pause" => self.remove(id),
            "destroy" => {
                self.remove(id);
                self.watched().remove(id);
            }
            _ => {}
        }
    }
}

fn bind_tcp(address: SocketAddr) -> std::io::Result<TcpListener> {
    let listener = std::net::TcpListener::bind(address)?;
    listener.set_nonblocking(true)?;
    TcpListener::from_std(listener)
}

fn bind_udp(address: SocketAddr) -> std::io::Result<UdpSocket> {
    let socket = std::net::UdpSocket::bind(address)?;
    socket.set_nonblocking(true)?;
    UdpSocket::from_std(socket)
}

async fn retry_bind<T>(
    address: SocketAddr,
    container: &str,
    error: std::io::Error,
    stop: &CancellationToken,
    bind: fn(SocketAddr) -> std::io::Result<T>,
) -> Option<T> {
    // Often the port is ours: a container that died and was restarted frees
    // its old listener only when that task next runs. So try again briefly
    // before calling the port taken.
    for _ in 0..QUICK_RETRIES {
        tokio::select! {
            _ = stop.cancelled() => return None,
            _ = tokio::time::sleep(QUICK_RETRY) => {}
        }
        if let Ok(bound) = bind(address) {
            return Some(bound);
        }
    }
    tracing::warn!(
        %address, container, %error,
        "cannot listen for a published port (taken on this machine?); retrying until it frees up"
    );
    loop {
        tokio::select! {
            _ = stop.cancelled() => return None,
            _ = tokio::time::sleep(RETRY_TAKEN_PORT) => {}
        }
        if let Ok(bound) = bind(address) {
            return Some(bound);
        }
    }
}

/// The default local address for ports published without one.
pub const DEFAULT_PUBLISH_ADDRESS: IpAddr = IpAddr::V4(Ipv4Addr::LOCALHOST);
