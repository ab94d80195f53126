//! A forwarded UDP port, local side: one socket on the published port; each
//! local peer (source address) is one flow, carried as one stream of framed
//! datagrams (`link::datagram`) over the link. Replies go back to that peer.
//! A flow with nothing in either direction for [`IDLE_TIMEOUT`] ends (its
//! stream closes); the peer's next datagram opens a new one.

use std::collections::HashMap;
use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::UdpSocket;
use tokio::sync::mpsc::{self, error::TrySendError};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::lifecycle::Lifecycle;
use crate::link::datagram::{self, Decoder, IDLE_TIMEOUT, MAX_DATAGRAM};
use crate::upstream::Upstream;

/// At most this many peers have a flow at once per port; datagrams of new
/// peers beyond it are dropped (and said so) until a flow idles out.
pub const MAX_PEERS: usize = 1024;

/// Datagrams waiting for a peer's stream (while it opens, or while the link
/// is behind). More are dropped, as a full socket buffer would.
const PEER_QUEUE: usize = 64;

/// Datagrams already queued are written together, up to about this much.
const BATCH_BYTES: usize = 64 << 10;

/// Serves the forward on `socket` until `stop`.
pub async fn serve(
    socket: UdpSocket,
    port: u16,
    upstream: Arc<dyn Upstream>,
    lifecycle: Lifecycle,
    stop: CancellationToken,
) {
    let socket = Arc::new(socket);
    let mut flows: HashMap<SocketAddr, mpsc::Sender<Bytes>> = HashMap::new();
    let mut buffer = vec![0u8; MAX_DATAGRAM];
    let mut said_full = false;
    loop {
        let received = tokio::select! {
            _ = stop.cancelled() => break,
            received = socket.recv_from(&mut buffer) => received,
        };
        let (n, peer) = match received {
            Ok(received) => received,
            Err(error) => {
                tracing::debug!(port, %error, "receiving on a forwarded UDP port");
                // An error that repeats (memory pressure) must not spin the runtime.
                tokio::time::sleep(std::time::Duration::from_millis(10)).await;
                continue;
            }
        };
        let mut datagram = Bytes::copy_from_slice(&buffer[..n]);
        if let Some(flow) = flows.get(&peer) {
            match flow.try_send(datagram) {
                Ok(()) | Err(TrySendError::Full(_)) => continue,
                // The flow idled out or its stream ended: a new one takes it.
                Err(TrySendError::Closed(back)) => {
                    datagram = back;
                    flows.remove(&peer);
                }
            }
        }
        if flows.len() >= MAX_PEERS {
            flows.retain(|_, flow| !flow.is_closed());
        }
        if flows.len() >= MAX_PEERS {
            if !said_full {
                tracing::warn!(port, MAX_PEERS, "too many peers on a forwarded UDP port; dropping new ones");
                said_full = true;
            }
            continue;
        }
        said_full = false;
        let (sender, receiver) = mpsc::channel(PEER_QUEUE);
        let _ = sender.try_send(datagram);
        flows.insert(peer, sender);
        let flow = Flow { socket: socket.clone(), peer, datagrams: receiver, idle: IDLE_TIMEOUT };
        lifecycle.spawn(run_flow(flow, port, upstream.clone(), stop.clone()));
    }
}

/// One local peer's flow.
pub struct Flow {
    pub socket: Arc<UdpSocket>,
    pub peer: SocketAddr,
    /// The peer's datagrams, from the socket's receive loop.
    pub datagrams: mpsc::Receiver<Bytes>,
    pub idle: Duration,
}

async fn run_flow(mut flow: Flow, port: u16, upstream: Arc<dyn Upstream>, stop: CancellationToken) {
    let peer = flow.peer;
    let tunnel = tokio::select! {
        _ = stop.cancelled() => return,
        tunnel = upstream.open_udp_tunnel(port) => tunnel,
    };
    let mut tunnel = match tunnel {
        Ok(tunnel) => tunnel,
        Err(error) => return tracing::warn!(%peer, port, %error, "cannot forward a UDP flow"),
    };
    tracing::debug!(%peer, port, "UDP flow open");
    match relay(&mut tunnel, &mut flow, &stop).await {
        Ok(()) => tracing::debug!(%peer, port, "UDP flow ended"),
        Err(error) => tracing::debug!(%peer, port, %error, "UDP flow aborted"),
    }
}

/// Relays between the peer and its stream until the stream ends, the flow
/// idles out (the stream is then closed), or `stop`.
pub async fn relay<T>(tunnel: &mut T, flow: &mut Flow, stop: &CancellationToken) -> io::Result<()>
where
    T: AsyncRead + AsyncWrite + Unpin + ?Sized,
{
    let mut decoder = Decoder::new();
    let mut buffer = vec![0u8; 16 << 10];
    let mut frames = BytesMut::new();
    let mut deadline = Instant::now() + flow.idle;
    loop {
        tokio::select! {
            _ = stop.cancelled() => return Ok(()),
            datagram = flow.datagrams.recv() => {
                // The receive loop is gone: the forward closed.
                let Some(datagram) = datagram else { return Ok(()) };
                frames.clear();
                datagram::encode(&datagram, &mut frames).map_err(io::Error::other)?;
                while frames.len() < BATCH_BYTES {
                    let Ok(more) = flow.datagrams.try_recv() else { break };
                    datagram::encode(&more, &mut frames).map_err(io::Error::other)?;
                }
                tunnel.write_all(&frames).await?;
                tunnel.flush().await?;
            }
            read = tunnel.read(&mut buffer) => {
                let n = read?;
                if n == 0 {
                    return Ok(());
                }
                decoder.push(&buffer[..n]);
                while let Some(datagram) = decoder.next_datagram() {
                    if let Err(error) = flow.socket.send_to(&datagram, flow.peer).await {
                        tracing::debug!(peer = %flow.peer, %error, "a reply datagram was not delivered");
                    }
                }
            }
            _ = tokio::time::sleep_until(deadline) => {
                let _ = tunnel.shutdown().await;
                return Ok(());
            }
        }
        deadline = Instant::now() + flow.idle;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn local_socket() -> UdpSocket {
        UdpSocket::bind("127.0.0.1:0").await.unwrap()
    }

    /// The far end of a flow's stream, as the agent would be.
    async fn read_frames<R: AsyncRead + Unpin>(reader: &mut R, count: usize) -> Vec<Bytes> {
        let mut decoder = Decoder::new();
        let mut out = Vec::new();
        let mut buffer = [0u8; 1024];
        while out.len() < count {
            let n = reader.read(&mut buffer).await.unwrap();
            assert!(n > 0, "the stream ended early");
            decoder.push(&buffer[..n]);
            out.extend(std::iter::from_fn(|| decoder.next_datagram()));
        }
        out
    }

    #[tokio::test]
    async fn datagrams_go_framed_and_replies_reach_the_peer() {
        let forward = Arc::new(local_socket().await);
        let peer = local_socket().await;
        let (sender, receiver) = mpsc::channel(8);
        let mut flow = Flow {
            socket: forward.clone(),
            peer: peer.local_addr().unwrap(),
            datagrams: receiver,
            idle: Duration::from_secs(30),
        };
        let (mut ours, mut agent) = tokio::io::duplex(1 << 16);
        let stop = CancellationToken::new();
        let task = tokio::spawn({
            let stop = stop.clone();
            async move { relay(&mut ours, &mut flow, &stop).await }
        });
        for datagram in [&b"ping"[..], b"", b"pong"] {
            sender.send(Bytes::copy_from_slice(datagram)).await.unwrap();
        }
        assert_eq!(read_frames(&mut agent, 3).await, vec![&b"ping"[..], b"", b"pong"]);
        let mut frames = BytesMut::new();
        datagram::encode(b"reply one", &mut frames).unwrap();
        datagram::encode(b"reply two", &mut frames).unwrap();
        agent.write_all(&frames).await.unwrap();
        let mut buffer = [0u8; 64];
        for expected in [&b"reply one"[..], b"reply two"] {
            let (n, from) = peer.recv_from(&mut buffer).await.unwrap();
            assert_eq!(&buffer[..n], expected);
            assert_eq!(from, forward.local_addr().unwrap());
        }
        // The agent's end closing ends the flow.
        drop(agent);
        task.await.unwrap().unwrap();
    }

    #[tokio::test]
    async fn an_idle_flow_closes_its_stream() {
        let (_sender, receiver) = mpsc::channel(8);
        let mut flow = Flow {
            socket: Arc::new(local_socket().await),
            peer: "127.0.0.1:9".parse().unwrap(),
            datagrams: receiver,
            idle: Duration::from_millis(100),
        };
        let (mut ours, mut agent) = tokio::io::duplex(1024);
        let started = std::time::Instant::now();
        relay(&mut ours, &mut flow, &CancellationToken::new()).await.unwrap();
        assert!(started.elapsed() >= Duration::from_millis(100));
        // The agent sees the end of the stream.
        let mut buffer = [0u8; 8];
        assert_eq!(agent.read(&mut buffer).await.unwrap(), 0);
    }
}
