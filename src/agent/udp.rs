//! A forwarded UDP flow, agent side: datagrams framed on the link stream
//! (`link::datagram`) go to a UDP socket connected to the published port on
//! this host's loopback, and what comes back is framed onto the stream.

use std::io;

use bytes::BytesMut;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::UdpSocket;
use tokio::time::Instant;

use crate::link::datagram::{self, Decoder, IDLE_TIMEOUT, MAX_DATAGRAM};

/// A UDP socket on loopback, connected to `target` (a loopback address).
pub async fn connect(target: std::net::SocketAddr) -> io::Result<UdpSocket> {
    let local: std::net::SocketAddr = match target {
        std::net::SocketAddr::V4(_) => (std::net::Ipv4Addr::LOCALHOST, 0).into(),
        std::net::SocketAddr::V6(_) => (std::net::Ipv6Addr::LOCALHOST, 0).into(),
    };
    let socket = UdpSocket::bind(local).await?;
    socket.connect(target).await?;
    Ok(socket)
}

/// Relays until the stream ends, fails, or nothing moved either way for
/// [`IDLE_TIMEOUT`].
pub async fn relay<L>(link: &mut L, socket: &UdpSocket) -> io::Result<()>
where
    L: AsyncRead + AsyncWrite + Unpin + ?Sized,
{
    let mut decoder = Decoder::new();
    let mut from_link = vec![0u8; 16 << 10];
    let mut from_port = vec![0u8; MAX_DATAGRAM];
    let mut frames = BytesMut::new();
    let mut deadline = Instant::now() + IDLE_TIMEOUT;
    loop {
        tokio::select! {
            read = link.read(&mut from_link) => {
                let n = read?;
                if n == 0 {
                    if decoder.is_mid_frame() {
                        tracing::debug!("a UDP flow's stream ended inside a datagram");
                    }
                    return Ok(());
                }
                decoder.push(&from_link[..n]);
                while let Some(datagram) = decoder.next_datagram() {
                    // Nobody listening (ICMP refused) loses the datagram, as UDP would.
                    if let Err(error) = socket.send(&datagram).await {
                        tracing::debug!(%error, "a forwarded datagram was not delivered");
                    }
                }
            }
            received = socket.recv(&mut from_port) => {
                match received {
                    Ok(n) => {
                        frames.clear();
                        datagram::encode(&from_port[..n], &mut frames).map_err(io::Error::other)?;
                        link.write_all(&frames).await?;
                        link.flush().await?;
                    }
                    // An earlier datagram was refused (ICMP); the flow goes on.
                    Err(error) => tracing::debug!(%error, "receiving on a forwarded UDP port"),
                }
            }
            _ = tokio::time::sleep_until(deadline) => {
                let _ = link.shutdown().await;
                return Ok(());
            }
        }
        deadline = Instant::now() + IDLE_TIMEOUT;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn framed_datagrams_reach_the_port_and_answers_come_back_framed() {
        // A UDP echo server on loopback: the container's published port.
        let echo = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let target = echo.local_addr().unwrap();
        tokio::spawn(async move {
            let mut buffer = [0u8; 64];
            while let Ok((n, from)) = echo.recv_from(&mut buffer).await {
                let _ = echo.send_to(&buffer[..n].to_ascii_uppercase(), from).await;
            }
        });
        let socket = connect(target).await.unwrap();
        let (mut agent_end, mut proxy_end) = tokio::io::duplex(1 << 16);
        let relay_task = tokio::spawn(async move { relay(&mut agent_end, &socket).await });
        let mut frames = BytesMut::new();
        for datagram in [&b"one"[..], b"", b"three"] {
            datagram::encode(datagram, &mut frames).unwrap();
        }
        // Split mid-frame on the way, as HTTP/2 data frames may be.
        proxy_end.write_all(&frames[..4]).await.unwrap();
        proxy_end.write_all(&frames[4..]).await.unwrap();
        let mut decoder = Decoder::new();
        let mut answers = Vec::new();
        let mut buffer = [0u8; 256];
        while answers.len() < 3 {
            let n = proxy_end.read(&mut buffer).await.unwrap();
            assert!(n > 0);
            decoder.push(&buffer[..n]);
            answers.extend(std::iter::from_fn(|| decoder.next_datagram()));
        }
        answers.sort();
        assert_eq!(answers, vec![&b""[..], b"ONE", b"THREE"]);
        // The stream's end ends the flow.
        drop(proxy_end);
        relay_task.await.unwrap().unwrap();
    }
}
